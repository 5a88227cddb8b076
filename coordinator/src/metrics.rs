//! Prometheus exposition (`/metrics`) and a health endpoint (`/healthz`), over plain HTTP on a
//! separate listener (bind it to a private interface).
//!
//! A small hand-written exposition: gauges read from the state machine when scraped, and RPC
//! latency histograms recorded by the services.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use proto::{Liveness, RunState};
use tokio::net::TcpListener;

use crate::server::Shared;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// RPC latency histograms, by method.
#[derive(Debug, Default)]
pub struct Telemetry {
    rpcs: Mutex<BTreeMap<&'static str, Histogram>>,
}

/// Records the elapsed time into its method's histogram when dropped.
#[derive(Debug)]
pub struct Timer<'a> {
    telemetry: &'a Telemetry,
    method: &'static str,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        let mut map = self.telemetry.rpcs.lock().unwrap_or_else(|p| p.into_inner());
        let h = map.entry(self.method).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }
}

impl Telemetry {
    pub fn time(&self, method: &'static str) -> Timer<'_> {
        Timer { telemetry: self, method, start: Instant::now() }
    }
}

/// A per-run gauge: name, help, and its value from the run's record (and, for figures derived
/// from the members' latest reports, the cluster).
type Series =
    (&'static str, &'static str, fn(&crate::cluster::Cluster, &crate::cluster::RunRecord) -> f64);

/// A label value with `\`, `"` and line breaks escaped (Prometheus' text format).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders the exposition text.
pub(crate) fn render(shared: &Shared) -> String {
    let mut out = String::new();
    {
        let guard = shared.lock();
        let c = &*guard;
        let _ = writeln!(out, "# HELP longhaul_runs Runs by state.\n# TYPE longhaul_runs gauge");
        for s in [
            RunState::Pending,
            RunState::Running,
            RunState::Completed,
            RunState::Failed,
            RunState::Stopped,
        ] {
            let n = c.runs().filter(|r| r.state == s).count();
            let _ = writeln!(out, "longhaul_runs{{state=\"{s}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP longhaul_workers Workers by liveness.\n# TYPE longhaul_workers gauge"
        );
        for l in [Liveness::Alive, Liveness::Suspect, Liveness::Dead] {
            let n = c.workers().filter(|w| c.liveness(w.id) == Some(l)).count();
            let _ = writeln!(out, "longhaul_workers{{liveness=\"{l}\"}} {n}");
        }
        let series: [Series; 8] = [
            ("longhaul_run_epoch", "Current epoch of each active run.", |_, r| r.epoch.0 as f64),
            ("longhaul_run_committed_step", "Committed step of each active run.", |_, r| {
                r.committed_step as f64
            }),
            ("longhaul_run_loss", "Last reported loss of each active run.", |_, r| {
                r.loss.unwrap_or(f64::NAN)
            }),
            ("longhaul_run_accuracy", "Last reported accuracy of each active run.", |_, r| {
                r.accuracy.unwrap_or(f64::NAN)
            }),
            ("longhaul_run_tokens_per_second", "Throughput of each active run.", |_, r| {
                r.tokens_per_sec
            }),
            ("longhaul_run_workers", "Members of the current epoch of each active run.", |_, r| {
                r.members.len() as f64
            }),
            (
                "longhaul_run_compute_utilisation",
                "Mean compute / (compute + comm + idle) time of the current members.",
                |c, r| c.compute_utilisation(r.id),
            ),
            (
                "longhaul_run_ring_bytes",
                "Bytes the current members sent on the ring, summed.",
                |c, r| c.bytes_moved(r.id) as f64,
            ),
        ];
        for (name, help, f) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for r in c.runs().filter(|r| !r.state.is_terminal()) {
                let _ = writeln!(
                    out,
                    "{name}{{run=\"{}\",name=\"{}\"}} {}",
                    r.id,
                    label(&r.name),
                    f(c, r)
                );
            }
        }
        // Per-worker series only for the members of running runs: the number of series stays
        // bounded by what is live, never by every worker ever seen.
        let members: Vec<&crate::cluster::WorkerRecord> = c
            .runs()
            .filter(|r| r.state == RunState::Running)
            .flat_map(|r| r.members.iter())
            .filter_map(|m| c.worker(m.worker))
            .collect();
        let _ = writeln!(
            out,
            "# HELP longhaul_worker_bytes_total Bytes each member reported moving.\n# TYPE longhaul_worker_bytes_total counter"
        );
        for w in &members {
            let _ = writeln!(
                out,
                "longhaul_worker_bytes_total{{worker=\"{}\"}} {}",
                w.id, w.ledger.bytes
            );
        }
        let _ = writeln!(
            out,
            "# HELP longhaul_worker_samples_total Samples of recorded steps each member trained on.\n# TYPE longhaul_worker_samples_total counter"
        );
        for w in &members {
            let _ = writeln!(
                out,
                "longhaul_worker_samples_total{{worker=\"{}\"}} {}",
                w.id, w.ledger.samples
            );
        }
    }
    let map = shared.telemetry.rpcs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let _ = writeln!(
        out,
        "# HELP longhaul_rpc_duration_seconds Handling time of RPCs and session messages.\n# TYPE longhaul_rpc_duration_seconds histogram"
    );
    for (method, h) in map {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "longhaul_rpc_duration_seconds_bucket{{method=\"{method}\",le=\"{b}\"}} {}",
                h.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "longhaul_rpc_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "longhaul_rpc_duration_seconds_sum{{method=\"{method}\"}} {}", h.sum);
        let _ =
            writeln!(out, "longhaul_rpc_duration_seconds_count{{method=\"{method}\"}} {}", h.count);
    }
    out
}

/// Serves `/metrics` and `/healthz` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app =
        axum::Router::new()
            .route(
                "/metrics",
                get({
                    let shared = shared.clone();
                    move || async move {
                        ([("content-type", "text/plain; version=0.0.4")], render(&shared))
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
