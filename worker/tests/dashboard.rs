#![allow(clippy::unwrap_used)]
//! The web dashboard in a real browser: a `longhaul serve` process, three real workers
//! training, and headless Chromium (Debian's `chromium`, installed by
//! `scripts/setup-system.sh`) driven over the DevTools protocol.
//!
//! It checks that:
//! - an unauthenticated request (and a wrong or forged credential) gets 401 and no data, for
//!   every API path, the event stream included;
//! - the page, signed in with a viewer token, renders the live run from real data: the curves
//!   have points, the ring shows the run's members in order, the workers table lists them, and
//!   the event log streams;
//! - a run stopped meanwhile shows as stopped through the live event stream (no reload), with
//!   the step, hash and state `longhaul status --output json` prints;
//! - `/metrics` of the same live run carries torchtitan's names and per-member series for the
//!   live members only, and `promtool check metrics` (Debian's `prometheus`) finds no problem;
//! - and it saves a screenshot (`target/dashboard.png`, a CI artefact).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proto::pb;
use serde_json::{Value, json};
use worker::testing::browser::Browser;
use worker::testing::cluster::{Coordinator, Worker, dump, run_file};

fn worker_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_longhaul-worker"))
}

fn coordinator_bin() -> PathBuf {
    worker_bin().with_file_name("longhaul")
}

/// A plain HTTP/1.1 request to the dashboard: (status, body).
fn http(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// `promtool check metrics` (Debian's `prometheus` package) on an exposition: it fails the
/// test on any problem promtool names (naming rules, units, types, duplicates).
fn promtool_check(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool: {e} (run scripts/setup-system.sh: Debian's `prometheus`)")
        });
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{exposition}"
    );
}

/// What the page shows, read from the DOM.
const READ_PAGE: &str = r##"JSON.stringify((() => {
  const s = document.getElementById("summary");
  const chart = m => { const c = document.querySelector(`svg.chart[data-metric="${m}"]`); return c ? Number(c.dataset.points) : -1; };
  return {
    login: !document.getElementById("login").hidden,
    summary: s ? Object.assign({}, s.dataset) : null,
    loss: chart("loss"), tokens: chart("tokens_per_sec"), utilisation: chart("compute_utilisation"),
    ring: [...document.querySelectorAll("#ring g.member")].map(g => Number(g.dataset.workerId)),
    workers: [...document.querySelectorAll("#workers tr[data-worker-id]")].map(r => Number(r.dataset.workerId)),
    log: document.querySelectorAll("#log .line").length,
    conn: document.getElementById("conn").textContent,
  };
})())"##;

/// What the page shows, or what kept it from showing anything (the page still loading, a
/// script error).
async fn read_page(b: &mut Browser) -> Value {
    let r =
        b.call("Runtime.evaluate", json!({ "expression": READ_PAGE, "returnByValue": true })).await;
    match r["result"]["value"].as_str() {
        Some(text) => serde_json::from_str(text).unwrap(),
        None => json!({ "not yet": r }),
    }
}

/// Polls the page until `f` holds, failing after `within` with what it showed last.
async fn wait_page(
    b: &mut Browser,
    within: Duration,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = read_page(b).await;
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "waited {within:?} for the page to show {what}; it shows {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_live_run_in_a_real_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let home = dir.join("coordinator");
    let mut c = Coordinator::spawn(&coordinator_bin(), &home).await;
    let token = c.token().await;
    let workers: Vec<Worker> = (1..=3)
        .map(|i| Worker::spawn(worker_bin(), &dir, &format!("w{i}"), &c, &token, &[]))
        .collect();
    let all: Vec<&Worker> = workers.iter().collect();
    c.wait_workers(3, Duration::from_secs(120)).await;
    // Long enough to stay live while the browser looks; it is stopped at the end.
    let run = c.submit(&run_file(3, 3, 1_000_000, "mode = \"ddp\"\ncompression = \"none\"")).await;
    c.wait_run(run, Duration::from_secs(120), "the run to train", |r| r.committed_step >= 30).await;
    let base = c.dashboard.clone();

    // Nothing without a credential, or with a wrong or forged one: 401, and no data.
    let name = "membership"; // the run's name (run_file)
    let forged = format!("{}9999999999999_{}", coordinator::ca::VIEWER_PREFIX, "0".repeat(64));
    for path in [
        "/api/runs".to_owned(),
        format!("/api/runs/{run}"),
        format!("/api/runs/{run}/metrics"),
        format!("/api/runs/{run}/events"),
        "/api/workers".to_owned(),
    ] {
        for auth in [None, Some("Bearer lh_wrong"), Some(&*format!("Bearer {forged}"))] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let (status, body) = http(&base, "GET", &path, &headers, "");
            assert_eq!(status, 401, "GET {path} with {auth:?}: {status} {body}");
            assert!(!body.contains(name) && !body.contains("committed_step"), "{path}: {body}");
        }
        let cookie = format!("lh_session={forged}");
        let (status, _) = http(&base, "GET", &path, &[("Cookie", &cookie)], "");
        assert_eq!(status, 401, "GET {path} with a forged cookie");
    }
    let (status, _) = http(&base, "POST", "/api/login", &[], "lh_view_1_00");
    assert_eq!(status, 401, "a login with a forged token");

    // A viewer token signs in; a bad query is named.
    let viewer = c
        .control
        .create_viewer_token(pb::CreateViewerTokenRequest { ttl_seconds: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    let bearer = format!("Bearer {viewer}");
    let (status, body) = http(
        &base,
        "GET",
        &format!("/api/runs/{run}/metrics?max=x"),
        &[("Authorization", &bearer)],
        "",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("max=x"), "{body}");
    let (status, body) = http(&base, "GET", "/api/runs", &[("Authorization", &bearer)], "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(name), "{body}");

    // The page, in a real browser, signed in by the token in the address's fragment.
    let mut b = Browser::launch().await;
    b.call("Page.enable", json!({})).await;
    b.call("Page.navigate", json!({ "url": format!("{base}/#token={viewer}&/runs/{run}") })).await;
    let shown = wait_page(&mut b, Duration::from_secs(90), "the run's curves, ring and log", |v| {
        v["loss"].as_i64().unwrap_or(-1) >= 2
            && v["tokens"].as_i64().unwrap_or(-1) >= 2
            && v["ring"].as_array().is_some_and(|r| r.len() == 3)
            && v["workers"].as_array().is_some_and(|w| w.len() >= 3)
            && v["log"].as_i64().unwrap_or(0) >= 1
            && v["conn"] == "live"
    })
    .await;
    println!("the page shows: {shown}");

    assert_eq!(shown["login"], false);
    assert_eq!(shown["summary"]["state"], "running");
    // The ring is the run's members, in the coordinator's order.
    let ws = c.control.list_workers(pb::ListWorkersRequest::default()).await.unwrap().into_inner();
    let mut members: Vec<u64> =
        ws.workers.iter().filter(|w| w.run_id == Some(run)).map(|w| w.worker_id).collect();
    let mut ring: Vec<u64> =
        shown["ring"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    ring.sort_unstable();
    members.sort_unstable();
    assert_eq!(ring, members, "the ring drawn is not the run's members");
    // Every link of the ring has the round-trip time its members' QUIC connections measured
    // (reported with heartbeats), loopback-small.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let links = loop {
        let (status, body) =
            http(&base, "GET", &format!("/api/runs/{run}"), &[("Authorization", &bearer)], "");
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let rtts: Vec<Option<f64>> =
            v["ring"].as_array().unwrap().iter().map(|m| m["rtt_ms_to_next"].as_f64()).collect();
        if rtts.iter().all(Option::is_some) || std::time::Instant::now() > deadline {
            break rtts;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("ring link RTTs (ms): {links:?}");
    assert_eq!(links.len(), 3);
    for rtt in &links {
        assert!(rtt.is_some_and(|ms| ms > 0.0 && ms < 10_000.0), "{links:?}");
    }
    // The Prometheus exposition of the same live run: torchtitan's names, per-member series
    // for the live members only, and what promtool accepts.
    let (status, exposition) = http(&c.metrics, "GET", "/metrics", &[], "");
    assert_eq!(status, 200, "{exposition}");
    for name in
        ["loss_metrics_global_avg_loss{", "grad_norm{", "tps{", "longhaul_run_tokens_per_second{"]
    {
        assert!(
            exposition.contains(&format!("\n{name}run=\"{run}\"")),
            "no {name} in {exposition}"
        );
    }
    let per_member = exposition
        .lines()
        .filter(|l| l.starts_with("longhaul_worker_compute_seconds_total{"))
        .count();
    assert_eq!(per_member, 3, "{exposition}");
    promtool_check(&exposition);
    // The fragment with the token is gone from the address.
    let href = b.eval("location.href").await;
    assert!(
        !href.as_str().unwrap().contains("lh_view_"),
        "the token stayed in the address: {href}"
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../dashboard.png");
    b.screenshot(&shot).await;
    println!("screenshot: {}", shot.display());

    // Stopped meanwhile: the page learns it from the event stream, without a reload, and
    // shows what `longhaul status` prints.
    c.control
        .stop_run(pb::StopRunRequest { run_id: run, reason: "the dashboard test is done".into() })
        .await
        .unwrap();
    let after = wait_page(&mut b, Duration::from_secs(60), "the run stopped", |v| {
        v["summary"]["state"] == "stopped"
    })
    .await;
    let out = Command::new(coordinator_bin())
        .args(["status", &run.to_string(), "--output", "json"])
        .env("LONGHAUL_HOME", &home)
        .env("LONGHAUL_COORDINATOR", &c.url)
        .output()
        .unwrap();
    assert!(out.status.success(), "longhaul status: {}", String::from_utf8_lossy(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &after["summary"];
    assert_eq!(s["state"], status["state"], "page {s}, status {status}");
    assert_eq!(s["step"], status["committed_step"].to_string(), "page {s}, status {status}");
    assert_eq!(s["total"], status["total_steps"].to_string(), "page {s}, status {status}");
    assert_eq!(s["hash"], status["committed_hash"], "page {s}, status {status}");
    assert_eq!(s["epoch"], status["epoch"].to_string(), "page {s}, status {status}");
    if std::thread::panicking() {
        dump(&all);
    }
    drop(b);
    drop(workers);
    c.stop().await;
}
