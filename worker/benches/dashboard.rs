//! What the web dashboard costs: the page's weight, the time to its first render of a run with
//! 10,000 metric points in headless Chromium, and the coordinator's CPU while 10 pages watch a
//! live run against the same run watched by none.
//!
//! `cargo bench -p worker --bench dashboard` (about 2 minutes on 2 cores), after
//! `cargo build --release --bins` (it runs `target/release/longhaul serve` as a process, for
//! its CPU time; Debian's `chromium`, see `worker::testing::browser`).
//!
//! 1. Page weight: the bytes of `/`, `/app.js`, `/app.css` (no compression is served; gzip's
//!    size beside it for reference) and of the JSON of `/api/runs/{id}` and
//!    `/api/runs/{id}/metrics` (the page's `max=1500`, and `max=10000`).
//! 2. First render: a run whose 10,000 points are written into the coordinator's store while it
//!    is down (a pending run: no training needed). From `Page.navigate` (to the address with
//!    the viewer token, cache disabled, from `about:blank`) to the loss chart in the DOM with
//!    points (a `MutationObserver` installed before the page's scripts, awaited over
//!    `Runtime.evaluate`), 5 loads; the page's own timings (navigation, the two API fetches),
//!    and a breakdown measured in the page: fetch, `JSON.parse`, building the five SVG charts.
//! 3. CPU: a live ddp run of 3 `longhaul-worker`s; the coordinator process's utime + stime
//!    (`/proc/<pid>/stat`) over 20 s with no page open, then over 20 s with 10 pages open on the
//!    run (each polls the run and its metrics every 5 s and holds an event stream). On 2 cores
//!    the workers and Chromium compete with the coordinator: the machine's busy share is printed
//!    beside it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use coordinator::cluster::Output;
use coordinator::store::{Batch, MetricPoint, Store};
use proto::{RunId, pb};
use serde_json::{Value, json};
use worker::testing::browser::Browser;
use worker::testing::cluster::{Coordinator, Worker, run_file};

const POINTS: u64 = 10_000;
const LOADS: usize = 5;
const PAGES: usize = 10;
const WINDOW: Duration = Duration::from_secs(20);
const DDP: &str = "mode = \"ddp\"\ncompression = \"none\"";

fn worker_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_longhaul-worker"))
}

fn coordinator_bin() -> PathBuf {
    worker_bin().with_file_name("longhaul")
}

/// A plain HTTP/1.1 GET of the dashboard: (status, body bytes).
fn get(base: &str, path: &str, bearer: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {bearer}\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("GET {path}: no head"))?;
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let mut body = out[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = unchunk(&body);
    }
    Ok((status, body))
}

fn unchunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}

/// The size of `bytes` through `gzip -6` (for reference: the dashboard serves no compression).
fn gzipped(bytes: &[u8]) -> Option<usize> {
    let mut child = Command::new("gzip")
        .arg("-6c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let data = bytes.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().ok()?;
    feeder.join().ok()?.ok()?;
    Some(out.stdout.len())
}

/// A plausible metric point of a 3-member run at `step` (deterministic noise).
fn point(step: u64) -> MetricPoint {
    let noise = |salt: f64| ((step as f64 * 12.9898 + salt).sin() * 43_758.545_3).fract();
    let s = step as f64;
    MetricPoint {
        step,
        loss: Some(2.3 * (-s / 2500.0).exp() + 0.25 + 0.05 * noise(1.0)),
        tokens_per_sec: 3_100.0 + 150.0 * noise(2.0),
        at_ms: 1_790_000_000_000 + step * 420,
        accuracy: step.is_multiple_of(100).then(|| 1.0 - (-s / 3000.0).exp() * 0.9),
        compute_utilisation: 0.62 + 0.05 * noise(3.0),
        bytes_moved: step * 3 * 1_254_400,
        workers: 3,
    }
}

/// Writes `n` points of `run` into the store of a stopped coordinator's home.
fn write_points(home: &Path, run: u64, n: u64) -> anyhow::Result<()> {
    let store = Store::open(&home.join("state.redb"))?;
    let outputs: Vec<Output> =
        (1..=n).map(|s| Output::Metric { run: RunId(run), point: point(s) }).collect();
    let mut batch = Batch::default();
    batch.append_outputs(0, outputs.iter());
    store.write(&[batch])?;
    anyhow::ensure!(store.metrics(RunId(run))?.len() as u64 == n, "the points were not written");
    Ok(())
}

/// Installed before the page's own scripts: resolves `window.__lhRendered` when the loss chart
/// is in the DOM with points (`dom`, ms since navigation start), then after the next frame.
const OBSERVE: &str = r#"(() => {
  if (location.protocol !== "http:") return;
  const lh = window.__lh = { dom: null, frame: null, points: null };
  window.__lhRendered = new Promise(resolve => {
    const check = () => {
      const c = document.querySelector('svg.chart[data-metric="loss"]');
      if (!c || !(Number(c.dataset.points) > 0)) return false;
      lh.dom = performance.now();
      lh.points = Number(c.dataset.points);
      requestAnimationFrame(() => setTimeout(() => { lh.frame = performance.now(); resolve(); }, 0));
      setTimeout(resolve, 2000);
      return true;
    };
    const obs = new MutationObserver(() => { if (check()) obs.disconnect(); });
    obs.observe(document, { childList: true, subtree: true });
  });
})()"#;

/// Awaited in the page: what [`OBSERVE`] saw and the page's own timings, or null before the
/// page is there.
const RENDERED: &str = r#"window.__lhRendered === undefined ? null : Promise.race([
  window.__lhRendered, new Promise(r => setTimeout(r, 30000))
]).then(() => {
  const n = performance.getEntriesByType("navigation")[0] || {};
  const res = performance.getEntriesByType("resource").map(r => ({
    path: r.name.replace(location.origin, ""), start: r.startTime, end: r.responseEnd,
    bytes: r.decodedBodySize,
  }));
  return JSON.stringify({ ...window.__lh, nav: { response_end: n.responseEnd,
    dom_content_loaded: n.domContentLoadedEventEnd, load: n.loadEventEnd }, res });
})"#;

/// In the page (its functions `chart` and `perStep` are globals of its classic script): fetch,
/// parse and draw the five charts from `max` points, off screen. RUN is replaced.
const BREAKDOWN: &str = r#"(async () => {
  const out = {};
  for (const max of [1500, 10000]) {
    const t0 = performance.now();
    const r = await fetch(`/api/runs/RUN/metrics?max=${max}`, { credentials: "same-origin", cache: "no-store" });
    const text = await r.text();
    const t1 = performance.now();
    const { points } = JSON.parse(text);
    const t2 = performance.now();
    const host = document.createElement("div");
    for (const k of ["loss", "accuracy", "tokens_per_sec", "compute_utilisation"]) host.append(chart(points, k));
    host.append(chart(perStep(points), "bytes_per_step"));
    const t3 = performance.now();
    document.body.append(host);
    host.getBoundingClientRect();
    const t4 = performance.now();
    host.remove();
    out[max] = { points: points.length, fetch: t1 - t0, parse: t2 - t1, build: t3 - t2, layout: t4 - t3 };
  }
  return JSON.stringify(out);
})()"#;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn ms(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Evaluates `expr` awaiting its promise, retrying (every 20 ms, up to 60 s) while the page is
/// not there yet or navigates away under it; the string it returns, parsed.
async fn await_page(b: &mut Browser, session: &str, expr: &str) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = b
            .try_call_on(
                session,
                "Runtime.evaluate",
                json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        if let Ok(r) = &r
            && let Some(text) = r["result"]["value"].as_str()
        {
            return Ok(serde_json::from_str(text)?);
        }
        anyhow::ensure!(Instant::now() < deadline, "waited 60 s for the page: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU seconds (utime + stime) of process `pid` so far.
fn cpu_seconds(pid: u32, tick: f64) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name in parentheses: state is field 3; utime, stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<f64> {
        Ok(f.get(i - 3).ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: {stat}"))?.parse()?)
    };
    Ok((field(14)? + field(15)?) / tick)
}

/// The machine's (busy, total) jiffies so far (`/proc/stat`).
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The processes of the tree under `root` (itself included), from `/proc/*/stat`.
fn tree(root: u32) -> Vec<u32> {
    let mut parent = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1));
        if let Some(ppid) = ppid.and_then(|p| p.parse::<u32>().ok()) {
            parent.push((pid, ppid));
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// CPU seconds of the processes of the tree under `root` that are alive now.
fn tree_cpu(root: u32, tick: f64) -> f64 {
    tree(root).into_iter().filter_map(|p| cpu_seconds(p, tick).ok()).sum()
}

/// Chromium's processes at the lowest priority: on 2 cores the pages' own rendering would
/// otherwise slow the workers, and with them the run the coordinator serves. Every thread:
/// Linux's nice is per thread.
fn renice(root: u32) {
    let pids: Vec<String> = tree(root)
        .into_iter()
        .flat_map(|p| std::fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten())
        .filter_map(|t| t.file_name().to_str().map(str::to_owned))
        .collect();
    let _ = Command::new("renice")
        .args(["-n", "19", "-p"])
        .args(&pids)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

struct Window {
    /// The coordinator's CPU, in % of one core.
    coordinator: f64,
    /// Chromium's (all its processes), in % of one core.
    chromium: f64,
    /// The whole machine's busy share, in % of all its cores.
    machine: f64,
    /// Steps the run committed per second meanwhile.
    steps_per_s: f64,
}

async fn measure_cpu(
    c: &mut Coordinator,
    pid: u32,
    browser: u32,
    tick: f64,
    run: u64,
) -> anyhow::Result<Window> {
    let (busy0, total0) = machine_jiffies();
    let step0 = c.run(run).await.committed_step;
    let (cpu0, chromium0) = (cpu_seconds(pid, tick)?, tree_cpu(browser, tick));
    let t0 = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let (cpu1, chromium1) = (cpu_seconds(pid, tick)?, tree_cpu(browser, tick));
    let wall = t0.elapsed().as_secs_f64();
    let step1 = c.run(run).await.committed_step;
    let (busy1, total1) = machine_jiffies();
    Ok(Window {
        coordinator: 100.0 * (cpu1 - cpu0) / wall,
        chromium: 100.0 * (chromium1 - chromium0).max(0.0) / wall,
        machine: 100.0 * (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
        steps_per_s: step1.saturating_sub(step0) as f64 / wall,
    })
}

/// What a page shows: its connection line and the loss chart's points.
const READ: &str = r#"JSON.stringify({
  conn: (document.getElementById("conn") || {}).textContent || "",
  step: Number((document.getElementById("summary") || { dataset: {} }).dataset.step),
  loss: (c => c ? Number(c.dataset.points) : -1)(document.querySelector('svg.chart[data-metric="loss"]')),
})"#;

/// Counts the events a page's stream delivers (`source`, a global of the page's script) and
/// its API requests from now on.
const COUNT_START: &str = r#"(() => {
  const n = window.__lhCount = { status: 0, log: 0, t0: performance.now() };
  source.addEventListener("status", () => n.status++);
  source.addEventListener("log", () => n.log++);
  return true;
})()"#;

const COUNT_END: &str = r#"(() => {
  const n = window.__lhCount;
  const requests = performance.getEntriesByType("resource")
    .filter(r => r.startTime >= n.t0 && r.name.includes("/api/")).length;
  return JSON.stringify({ status: n.status, log: n.log, requests,
                          seconds: (performance.now() - n.t0) / 1000 });
})()"#;

/// How many of the pages of `sessions` show the run live with its loss chart drawn, and the
/// lowest step they show.
async fn live_pages(b: &mut Browser, sessions: &[String]) -> (usize, u64) {
    let (mut ready, mut lowest) = (0, u64::MAX);
    for s in sessions {
        let params = json!({ "expression": READ, "returnByValue": true });
        let v: Value = b
            .try_call_on(s, "Runtime.evaluate", params)
            .await
            .ok()
            .and_then(|r| r["result"]["value"].as_str().and_then(|t| serde_json::from_str(t).ok()))
            .unwrap_or(Value::Null);
        if v["conn"] == "live" && v["loss"].as_i64().unwrap_or(-1) > 0 {
            ready += 1;
        }
        lowest = lowest.min(v["step"].as_u64().unwrap_or(0));
    }
    (ready, lowest)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let bin = coordinator_bin();
    anyhow::ensure!(bin.is_file(), "{} is missing: cargo build --release --bins", bin.display());
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_owned();
    let home = dir.join("coordinator");

    // A run with 10,000 points: submitted (it stays pending: no workers yet), its points
    // written into the store while the coordinator is down.
    let mut c = Coordinator::spawn(&bin, &home).await;
    let old = c.submit(&run_file(3, 3, 1_000_000, DDP)).await;
    c.kill();
    let t = Instant::now();
    write_points(&home, old, POINTS)?;
    println!("wrote {POINTS} metric points of run {old} in {:.2} s", t.elapsed().as_secs_f64());
    c.restart().await;
    let viewer = c
        .control
        .create_viewer_token(pb::CreateViewerTokenRequest { ttl_seconds: 3600 })
        .await?
        .into_inner()
        .token;
    let base = c.dashboard.clone();

    // 1. Page weight.
    println!("\n1. page weight (bytes as served, uncompressed; gzip -6 for reference)");
    let mut total = (0, 0);
    let weigh = |path: &str| -> anyhow::Result<(usize, usize, f64)> {
        let t = Instant::now();
        let (status, body) = get(&base, path, &viewer)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(status == 200, "GET {path}: {status}");
        Ok((body.len(), gzipped(&body).unwrap_or(0), ms))
    };
    for path in ["/", "/app.js", "/app.css"] {
        let (n, z, _) = weigh(path)?;
        total = (total.0 + n, total.1 + z);
        println!("  {path:<36} {n:>9} B   gzip {z:>8} B");
    }
    println!("  {:<36} {:>9} B   gzip {:>8} B", "page total", total.0, total.1);
    for path in [
        format!("/api/runs/{old}"),
        format!("/api/runs/{old}/metrics"),
        format!("/api/runs/{old}/metrics?max=1500"),
        format!("/api/runs/{old}/metrics?max=10000"),
    ] {
        let (n, z, ms) = weigh(&path)?;
        println!("  {path:<36} {n:>9} B   gzip {z:>8} B   GET {ms:.1} ms");
    }
    let mut server = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        get(&base, &format!("/api/runs/{old}/metrics?max=10000"), &viewer)?;
        server.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "  GET /api/runs/{old}/metrics?max=10000 again: median {:.1} ms of 5",
        median(&mut server)
    );

    // 2. Time to first render.
    println!("\n2. first render of run {old} ({POINTS} points; the page asks for max=1500)");
    let mut b = Browser::launch().await;
    let page = b.open("about:blank").await;
    b.call_on(&page, "Page.enable", json!({})).await;
    b.call_on(&page, "Network.enable", json!({})).await;
    b.call_on(&page, "Network.setCacheDisabled", json!({ "cacheDisabled": true })).await;
    b.call_on(&page, "Page.addScriptToEvaluateOnNewDocument", json!({ "source": OBSERVE })).await;
    let url = format!("{base}/#token={viewer}&/runs/{old}");
    println!(
        "  {:>4} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>10} {:>7}",
        "load", "navigate", "in-page", "frame", "html", "DCL", "run json", "metrics", "points"
    );
    let (mut walls, mut doms) = (Vec::new(), Vec::new());
    let mut last = Value::Null;
    for i in 1..=LOADS {
        b.call_on(&page, "Page.navigate", json!({ "url": "about:blank" })).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t0 = Instant::now();
        b.call_on(&page, "Page.navigate", json!({ "url": url })).await;
        let r = await_page(&mut b, &page, RENDERED).await?;
        let wall = t0.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(r["points"].as_u64().unwrap_or(0) > 0, "the loss chart never drew: {r}");
        let res_end = |needle: &str| {
            r["res"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| {
                    let p = e["path"].as_str().unwrap_or("");
                    p.contains(needle) && (needle != "/api/runs/" || !p.contains("/metrics"))
                })
                .map(|e| ms(&e["end"]))
                .fold(f64::NAN, f64::max)
        };
        println!(
            "  {i:>4} {wall:>7.0}ms {:>7.0}ms {:>7.0}ms {:>6.0}ms {:>6.0}ms {:>8.0}ms {:>8.0}ms {:>7}",
            ms(&r["dom"]),
            ms(&r["frame"]),
            ms(&r["nav"]["response_end"]),
            ms(&r["nav"]["dom_content_loaded"]),
            res_end("/api/runs/"),
            res_end("/metrics"),
            r["points"]
        );
        walls.push(wall);
        doms.push(ms(&r["dom"]));
        last = r;
    }
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    println!(
        "  from Page.navigate to the loss chart drawn: median {:.0} ms, max {:.0} ms of {LOADS} \
         (in-page, from navigation start: median {:.0} ms, max {:.0} ms)",
        median(&mut walls.clone()),
        max(&walls),
        median(&mut doms.clone()),
        max(&doms)
    );
    println!("  the last load's resources (ms from navigation start):");
    for e in last["res"].as_array().into_iter().flatten() {
        println!(
            "    {:<36} {:>7.0} → {:>7.0}  {:>8} B",
            e["path"].as_str().unwrap_or(""),
            ms(&e["start"]),
            ms(&e["end"]),
            e["bytes"]
        );
    }
    println!(
        "  in the page, per step (median of 5): fetch, JSON.parse, build 5 SVG charts, layout"
    );
    let breakdown = BREAKDOWN.replace("RUN", &old.to_string());
    let mut rounds = Vec::new();
    for _ in 0..5 {
        rounds.push(await_page(&mut b, &page, &breakdown).await?);
    }
    for max in ["1500", "10000"] {
        let med = |k: &str| median(&mut rounds.iter().map(|r| ms(&r[max][k])).collect::<Vec<_>>());
        println!(
            "    max={max:<6} {:>6} points: fetch {:>6.1} ms, parse {:>6.1} ms, build {:>6.1} ms, \
             layout {:>6.1} ms",
            rounds[0][max]["points"],
            med("fetch"),
            med("parse"),
            med("build"),
            med("layout")
        );
    }
    b.call_on(&page, "Page.navigate", json!({ "url": "about:blank" })).await;
    // Out of the way of the live run's workers.
    c.control.stop_run(pb::StopRunRequest { run_id: old, reason: "measured".into() }).await?;

    // 3. The coordinator's CPU with and without 10 pages on a live run.
    let pid = c.pid().ok_or_else(|| anyhow::anyhow!("no coordinator process"))?;
    let tick: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    let token = c.token().await;
    let workers: Vec<Worker> = (1..=3)
        .map(|i| Worker::spawn(worker_bin(), &dir, &format!("w{i}"), &c, &token, &[]))
        .collect();
    c.wait_workers(3, Duration::from_secs(120)).await;
    let run = c.submit(&run_file(3, 3, 1_000_000, DDP)).await;
    c.wait_run(run, Duration::from_secs(180), "the run to train", |r| {
        r.workers == 3 && r.committed_step >= 30
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "\n3. coordinator (pid {pid}) CPU over {} s, live ddp run {run} of 3 workers \
         (CLK_TCK {tick}; Chromium at nice 19)",
        WINDOW.as_secs()
    );
    let browser = b.pid();
    renice(browser);
    let none = measure_cpu(&mut c, pid, browser, tick, run).await?;
    let live = format!("{base}/#token={viewer}&/runs/{run}");
    // Each page in a browser context of its own, as 10 people would (in one context Chromium
    // opens 6 connections to the host, and each page's event stream holds one: see below).
    let mut sessions = Vec::new();
    for _ in 0..PAGES {
        sessions.push(b.open_apart(&live).await);
        renice(browser);
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (ready, _) = live_pages(&mut b, &sessions).await;
        if ready == PAGES {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "90 s and only {ready} of {PAGES} pages live");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    renice(browser);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for s in &sessions {
        let params = json!({ "expression": COUNT_START, "returnByValue": true });
        b.call_on(s, "Runtime.evaluate", params).await;
    }
    let watched = measure_cpu(&mut c, pid, browser, tick, run).await?;
    // What the pages asked of the coordinator meanwhile.
    let (mut statuses, mut logs, mut requests, mut secs) = (0.0, 0.0, 0.0, 0.0);
    for s in &sessions {
        let v = await_page(&mut b, s, COUNT_END).await?;
        statuses += ms(&v["status"]);
        logs += ms(&v["log"]);
        requests += ms(&v["requests"]);
        secs += ms(&v["seconds"]);
    }
    let per_page_s = secs.max(1e-9);
    // Whether the pages kept up with the event stream (a page that lags reads fewer events).
    let (ready, shown) = live_pages(&mut b, &sessions).await;
    let now = c.run(run).await.committed_step;
    let (status, body) = get(&base, &format!("/api/runs/{run}"), &viewer)?;
    let (_, points) = get(&base, &format!("/api/runs/{run}/metrics"), &viewer)?;
    for s in &sessions {
        b.call_on(s, "Page.close", json!({})).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = measure_cpu(&mut c, pid, browser, tick, run).await?;
    println!(
        "  {:<22} {:>12} {:>10} {:>14} {:>8} {:>16}",
        "", "coordinator", "chromium", "machine busy", "steps/s", "coord. ms/step"
    );
    for (name, w) in
        [("no page", &none), (&*format!("{PAGES} pages"), &watched), ("no page again", &after)]
    {
        println!(
            "  {name:<22} {:>10.1} % {:>8.1} % {:>12.1} % {:>8.1} {:>16.2}",
            w.coordinator,
            w.chromium,
            w.machine,
            w.steps_per_s,
            10.0 * w.coordinator / w.steps_per_s
        );
    }
    let base_cpu = (none.coordinator + after.coordinator) / 2.0;
    println!(
        "  difference against the mean of the two windows without: {:+.1} % of one core \
         ({:+.2} % per page)",
        watched.coordinator - base_cpu,
        (watched.coordinator - base_cpu) / PAGES as f64
    );
    println!(
        "  each page meanwhile: {:.1} status and {:.1} log events/s on its event stream, \
         {:.2} API requests/s",
        statuses / per_page_s,
        logs / per_page_s,
        requests / per_page_s
    );
    println!(
        "  at the end of the watched window {ready} of {PAGES} pages were live, the furthest \
         behind showing step {shown} of {now}"
    );
    let total =
        serde_json::from_slice::<Value>(&points).map(|v| v["total"].clone()).unwrap_or_default();
    println!(
        "  the live run's JSON then: /api/runs/{run} {} B (status {status}), \
         /api/runs/{run}/metrics {} B ({total} points stored)",
        body.len(),
        points.len()
    );

    // The same 10 pages in one browser context (one person's tabs): how many go live.
    let mut tabs = Vec::new();
    for _ in 0..PAGES {
        tabs.push(b.open(&live).await);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = 0;
    while Instant::now() < deadline && ready < PAGES {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ready = live_pages(&mut b, &tabs).await.0;
    }
    println!(
        "  {PAGES} tabs of one browser context instead: {ready} live after 20 s (HTTP/1.1, at \
         most 6 connections to a host per context, one held by each event stream)"
    );
    for s in &tabs {
        let _ = b.try_call_on(s, "Page.close", json!({})).await;
    }

    c.control
        .stop_run(pb::StopRunRequest { run_id: run, reason: "the dashboard bench is done".into() })
        .await?;
    c.wait_run(run, Duration::from_secs(30), "the run to stop", |r| {
        r.state == pb::RunState::Stopped as i32
    })
    .await;
    drop(b);
    drop(workers);
    c.stop().await;
    Ok(())
}
