//! A coordinator in this process and `longhaul-worker`s as real child processes, on loopback:
//! for the membership tests, the utilisation benchmark and the chaos scenarios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client::ConnectConfig;
use client::{Control, control};
use coordinator::cluster;
use coordinator::server::{self, Listeners, ServerConfig};
use coordinator::testing::connect_config;
use proto::pb;

/// A coordinator served from this process, or a `longhaul serve` child process.
#[derive(Debug)]
pub struct Coordinator {
    pub dir: PathBuf,
    pub url: String,
    pub cfg: ConnectConfig,
    pub control: Control,
    /// The web dashboard's base URL (`http://127.0.0.1:<port>`, plain HTTP on loopback).
    pub dashboard: String,
    /// The Prometheus endpoint's base URL (`http://127.0.0.1:<port>`; `/metrics`, `/healthz`).
    pub metrics: String,
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    InProcess { stop: Option<tokio::sync::oneshot::Sender<()>>, task: tokio::task::JoinHandle<()> },
    Process { bin: PathBuf, args: Vec<String>, child: Option<Child>, log: PathBuf },
}

/// Fast failure detection for tests: suspect after 600 ms, dead after 1.5 s, readmitted at
/// once; disputes bench for 10 s.
fn fast_cluster() -> cluster::Config {
    cluster::Config {
        suspect_after: 600,
        dead_after: 1_500,
        readmit_after: 0,
        lease_ttl: 60_000,
        bench_for: 10_000,
        ..cluster::Config::default()
    }
}

impl Coordinator {
    /// Starts one in this process with fast failure detection.
    pub async fn start(dir: &Path) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("test cluster");
        let shards = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("test cluster");
        let dashboard = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("test cluster");
        let url =
            format!("https://127.0.0.1:{}", listener.local_addr().expect("test cluster").port());
        let dash = format!("http://{}", dashboard.local_addr().expect("test cluster"));
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("test cluster");
        let prom = format!("http://{}", metrics.local_addr().expect("test cluster"));
        let mut config = ServerConfig::new(dir.to_owned());
        config.cluster = fast_cluster();
        config.tick = Duration::from_millis(50);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            server::run(
                Listeners {
                    api: listener,
                    metrics: Some(metrics),
                    shards: Some(shards),
                    dashboard: Some(dashboard),
                },
                config,
                async move {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("coordinator failed");
        });
        Self::connect(dir, url, dash, prom, Backend::InProcess { stop: Some(stop), task }).await
    }

    /// Starts `bin` (`longhaul`) as `longhaul serve` with its home in `dir` and fast failure
    /// detection; [`Coordinator::kill`] and [`Coordinator::restart`] act on the process.
    pub async fn spawn(bin: &Path, dir: &Path) -> Self {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let (grpc, shards, metrics, dashboard) = (free(), free(), free(), free());
        let c = fast_cluster();
        let args: Vec<String> = vec![
            "serve".into(),
            format!("--listen=127.0.0.1:{grpc}"),
            format!("--shards-listen=127.0.0.1:{shards}"),
            format!("--metrics-listen=127.0.0.1:{metrics}"),
            format!("--dashboard-listen=127.0.0.1:{dashboard}"),
            format!("--suspect-after-ms={}", c.suspect_after),
            format!("--dead-after-ms={}", c.dead_after),
            format!("--readmit-after-ms={}", c.readmit_after),
            format!("--lease-ttl-ms={}", c.lease_ttl),
            format!("--bench-for-ms={}", c.bench_for),
        ];
        std::fs::create_dir_all(dir).expect("test cluster");
        let log = dir.join("coordinator.log");
        let mut backend = Backend::Process { bin: bin.to_owned(), args, child: None, log };
        backend.start_process(dir);
        let dash = format!("http://127.0.0.1:{dashboard}");
        let prom = format!("http://127.0.0.1:{metrics}");
        Self::connect(dir, format!("https://127.0.0.1:{grpc}"), dash, prom, backend).await
    }

    async fn connect(
        dir: &Path,
        url: String,
        dashboard: String,
        metrics: String,
        backend: Backend,
    ) -> Self {
        let mut cfg = None;
        for _ in 0..400 {
            if let Ok(c) = connect_config(&url, dir)
                && coordinator::testing::admin_token(dir).is_ok()
            {
                cfg = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let cfg = cfg.expect("the coordinator wrote its CA");
        let admin = coordinator::testing::admin_token(dir).expect("test cluster");
        let control = control(&cfg, &admin).expect("test cluster");
        let mut c = Self { dir: dir.to_owned(), url, cfg, control, dashboard, metrics, backend };
        // Answers once it serves.
        for _ in 0..400 {
            if c.control.list_runs(pb::ListRunsRequest::default()).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        c
    }

    /// The process coordinator's process id (`None` in process, or while killed).
    pub fn pid(&self) -> Option<u32> {
        match &self.backend {
            Backend::Process { child: Some(c), .. } => Some(c.id()),
            _ => None,
        }
    }

    /// SIGKILLs a process coordinator.
    pub fn kill(&mut self) {
        if let Backend::Process { child: Some(child), .. } = &mut self.backend {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Backend::Process { child, .. } = &mut self.backend {
            *child = None;
        }
    }

    /// Starts a killed process coordinator again, on the same home and ports.
    pub async fn restart(&mut self) {
        self.backend.start_process(&self.dir);
        for _ in 0..400 {
            if self.control.list_runs(pb::ListRunsRequest::default()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the coordinator did not come back");
    }

    pub async fn token(&mut self) -> String {
        let req = pb::CreateJoinTokenRequest { ttl_seconds: 3600, uses: 1000 };
        self.control.create_join_token(req).await.expect("test cluster").into_inner().token
    }

    pub async fn submit(&mut self, run_toml: &str) -> u64 {
        let req = pb::SubmitRunRequest { run_toml: run_toml.to_owned() };
        self.control.submit_run(req).await.expect("test cluster").into_inner().run_id
    }

    pub async fn run(&mut self, id: u64) -> pb::RunInfo {
        self.control
            .get_run(pb::GetRunRequest { run_id: id })
            .await
            .expect("test cluster")
            .into_inner()
    }

    /// Polls the run until `f` holds, failing after `within`.
    pub async fn wait_run(
        &mut self,
        id: u64,
        within: Duration,
        what: &str,
        f: impl Fn(&pb::RunInfo) -> bool,
    ) -> pb::RunInfo {
        let deadline = Instant::now() + within;
        loop {
            let r = self.run(id).await;
            if f(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what}; the run is at step {}/{}, epoch {}, {} workers, \
                 state {}, message {:?}",
                r.committed_step,
                r.total_steps,
                r.epoch,
                r.workers,
                r.state,
                r.message
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `n` workers heartbeat over a session (so a run submitted next gets all of
    /// them in its first epoch), failing after `within`.
    pub async fn wait_workers(&mut self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ws = self
                .control
                .list_workers(pb::ListWorkersRequest::default())
                .await
                .expect("test cluster")
                .into_inner()
                .workers;
            let up = ws
                .iter()
                .filter(|w| {
                    w.liveness == pb::Liveness::Alive as i32 && w.last_heartbeat_unix_ms > 0
                })
                .count();
            if up >= n {
                return;
            }
            assert!(Instant::now() < deadline, "waited {within:?} for {n} workers; {up} are up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every log line of the run so far.
    pub async fn logs(&mut self, id: u64) -> Vec<String> {
        let mut stream = self
            .control
            .watch_run(pb::WatchRunRequest { run_id: id })
            .await
            .expect("test cluster")
            .into_inner();
        let mut lines = Vec::new();
        // The stream replays the run's state, then follows: read what is there now.
        while let Ok(Ok(Some(ev))) =
            tokio::time::timeout(Duration::from_millis(300), stream.message()).await
        {
            if let Some(pb::run_event::Event::Log(l)) = ev.event {
                lines.push(l);
            }
        }
        lines
    }

    pub async fn stop(mut self) {
        match &mut self.backend {
            Backend::InProcess { stop, task } => {
                if let Some(s) = stop.take() {
                    let _ = s.send(());
                }
                let _ = task.await;
            }
            Backend::Process { .. } => self.kill(),
        }
    }
}

impl Backend {
    fn start_process(&mut self, dir: &Path) {
        if let Self::Process { bin, args, child, log } = self {
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&*log)
                .expect("coordinator log");
            *child = Some(
                Command::new(&*bin)
                    .args(&*args)
                    .env("LONGHAUL_HOME", dir)
                    .env("LONGHAUL_LOG", "info")
                    .stdout(Stdio::null())
                    .stderr(out)
                    .spawn()
                    .expect("starting longhaul serve"),
            );
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Self::Process { child: Some(c), .. } = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `longhaul-worker` child process; killed when dropped.
#[derive(Debug)]
pub struct Worker {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    pub state: PathBuf,
}

impl Worker {
    /// Starts `bin` (a `longhaul-worker`) with its own state directory under `dir`.
    pub fn spawn(
        bin: &Path,
        dir: &Path,
        name: &str,
        c: &Coordinator,
        token: &str,
        extra: &[&str],
    ) -> Self {
        let state = dir.join(name);
        std::fs::create_dir_all(&state).expect("test cluster");
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("test cluster");
        let child = Command::new(bin)
            .args(["--coordinator", &c.url, "--ca-hash", &c.cfg.ca_pin, "--token", token])
            .arg("--state-dir")
            .arg(&state)
            .args(["--ring-listen", "127.0.0.1:0"])
            .args(["--threads", "1", "--host", name, "--metrics-every", "0.5"])
            .args(extra)
            .env("LONGHAUL_LOG", "info,worker=debug")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("starting longhaul-worker");
        Self { name: name.to_owned(), child, log, state }
    }

    /// SIGSTOP: the process freezes (no heartbeats, no ring traffic), as if cut off.
    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }

    /// The times (milliseconds into the UTC day) of the log lines containing `needle`.
    pub fn log_times(&self, needle: &str) -> Vec<u64> {
        self.log_text().lines().filter(|l| l.contains(needle)).filter_map(ms_of_day).collect()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The hash the worker logged when it finished the run's steps.
    pub fn final_hash(&self) -> Option<String> {
        self.log_text()
            .lines()
            .rev()
            .filter(|l| l.contains("finished the run's steps"))
            .find_map(|l| l.split("hash=").nth(1))
            .map(|h| h.trim().to_owned())
    }

    /// Waits (up to `within`) for the hash the worker logs when it finishes the run's steps.
    pub fn wait_final_hash(&self, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let h = self.final_hash();
            if h.is_some() || Instant::now() > deadline {
                return h;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A small gpt on 2-digit addition, `mode` being the `[sync]` table's body.
pub fn run_file(min: u32, max: u32, steps: u64, sync: &str) -> String {
    format!(
        r#"name = "membership"
[model]
builtin = "gpt"
layers = 2
width = 64
heads = 4
[dataset]
format = "synthetic-addition"
digits = 2
samples_per_shard = 2048
[optimizer]
name = "adamw"
lr = 3e-3
weight_decay = 0.01
[schedule]
kind = "cosine"
warmup_steps = 20
min_lr = 3e-4
[training]
batch_size = 32
seq_len = 10
steps = {steps}
[sync]
{sync}
[workers]
min = {min}
max = {max}
[checkpoint]
interval_steps = 100
"#
    )
}

/// Dumps worker logs to stderr (shown when a test fails).
pub fn dump(workers: &[&Worker]) {
    for w in workers {
        eprintln!("===== {} =====\n{}", w.name, w.log_text());
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

/// Milliseconds into the UTC day of a log line's RFC 3339 timestamp (`...T06:08:04.970207Z`).
pub fn ms_of_day(line: &str) -> Option<u64> {
    let t = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = t.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    let secs: f64 = s.parse().ok()?;
    Some(
        (h.parse::<u64>().ok()? * 3600 + m.parse::<u64>().ok()? * 60) * 1000
            + (secs * 1000.0) as u64,
    )
}

/// Milliseconds into the UTC day of a Unix time in milliseconds.
pub fn unix_ms_of_day(unix_ms: u64) -> u64 {
    unix_ms % 86_400_000
}
