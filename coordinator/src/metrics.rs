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

/// A per-run gauge: name, help, and its value from the run's record and the cluster (`None`:
/// unknown, and the series is left out rather than exported as NaN).
type Series = (
    &'static str,
    &'static str,
    fn(&crate::cluster::Cluster, &crate::cluster::RunRecord) -> Option<f64>,
);

/// A per-member counter: name, help, and its value from the worker's record and its latest
/// metrics report in its run.
type MemberSeries = (
    &'static str,
    &'static str,
    fn(&crate::cluster::WorkerRecord, Option<&crate::cluster::Metrics>) -> Option<f64>,
);

/// A label value with `\`, `"` and line breaks escaped (Prometheus' text format).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A figure over the current members' latest metrics reports: `f` of the values `get` finds
/// (`None` when no member reported one).
fn over_members(
    c: &crate::cluster::Cluster,
    r: &crate::cluster::RunRecord,
    get: impl Fn(&crate::cluster::Metrics) -> Option<f64>,
    f: impl Fn(&[f64]) -> f64,
) -> Option<f64> {
    let vs: Vec<f64> = r
        .members
        .iter()
        .filter_map(|m| c.latest_metrics(m.worker))
        .filter(|m| m.run == r.id)
        .filter_map(get)
        .filter(|v| v.is_finite())
        .collect();
    (!vs.is_empty()).then(|| f(&vs))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// The per-run series. The training figures carry the names torchtitan logs (`/` is not
/// allowed in a Prometheus name: `loss_metrics/global_avg_loss` is
/// `loss_metrics_global_avg_loss`), over the members' latest reports; `mfu` is not exported,
/// since the peak FLOPs of a stranger's device are not known.
const RUN_SERIES: [Series; 12] = [
    (
        "loss_metrics_global_avg_loss",
        "Mean over the current members of the loss each last reported (torchtitan's loss_metrics/global_avg_loss).",
        |c, r| over_members(c, r, |m| m.loss, mean),
    ),
    (
        "loss_metrics_global_max_loss",
        "Largest loss a current member last reported (torchtitan's loss_metrics/global_max_loss).",
        |c, r| over_members(c, r, |m| m.loss, max),
    ),
    (
        "grad_norm",
        "Mean over the current members of the norm of the contribution each last reported.",
        |c, r| over_members(c, r, |m| Some(m.grad_norm), mean),
    ),
    (
        "tps",
        "Tokens per second per member (torchtitan's tps, per device), mean over the current members.",
        |c, r| over_members(c, r, |m| Some(m.tokens_per_sec), mean),
    ),
    ("longhaul_run_epoch", "Current epoch of each active run.", |_, r| Some(r.epoch.0 as f64)),
    ("longhaul_run_committed_step", "Committed step of each active run.", |_, r| {
        Some(r.committed_step as f64)
    }),
    ("longhaul_run_total_steps", "Steps each active run trains for.", |_, r| {
        Some(r.total_steps as f64)
    }),
    ("longhaul_run_accuracy_ratio", "Last reported accuracy of each active run.", |_, r| {
        r.accuracy.filter(|a| a.is_finite())
    }),
    ("longhaul_run_tokens_per_second", "Throughput of each active run, all members.", |_, r| {
        Some(r.tokens_per_sec).filter(|t| t.is_finite())
    }),
    ("longhaul_run_workers", "Members of the current epoch of each active run.", |_, r| {
        Some(r.members.len() as f64)
    }),
    (
        "longhaul_run_compute_utilisation_ratio",
        "Mean compute / (compute + comm + idle) time of the current members.",
        |c, r| Some(c.compute_utilisation(r.id)),
    ),
    ("longhaul_run_ring_bytes", "Bytes the current members sent on the ring, summed.", |c, r| {
        Some(c.bytes_moved(r.id) as f64)
    }),
];

/// The per-member series, labelled by run and worker: only for the members of running runs,
/// so that the number of series stays bounded by what is live, never by every worker ever seen.
const MEMBER_SERIES: [MemberSeries; 5] = [
    (
        "longhaul_worker_ring_bytes_total",
        "Bytes each member reported moving on the ring.",
        |w, _| Some(w.ledger.bytes as f64),
    ),
    (
        "longhaul_worker_samples_total",
        "Samples of recorded steps each member trained on.",
        |w, _| Some(w.ledger.samples as f64),
    ),
    (
        "longhaul_worker_compute_seconds_total",
        "Time each member spent computing in its run.",
        |_, m| m.map(|m| m.compute_ms / 1e3),
    ),
    (
        "longhaul_worker_comm_seconds_total",
        "Time each member spent in ring operations in its run.",
        |_, m| m.map(|m| m.comm_ms / 1e3),
    ),
    (
        "longhaul_worker_idle_seconds_total",
        "Time each member spent waiting (data, epochs, peers) in its run.",
        |_, m| m.map(|m| m.idle_ms / 1e3),
    ),
];

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
        for (name, help, f) in RUN_SERIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for r in c.runs().filter(|r| !r.state.is_terminal()) {
                if let Some(v) = f(c, r) {
                    let _ =
                        writeln!(out, "{name}{{run=\"{}\",name=\"{}\"}} {v}", r.id, label(&r.name));
                }
            }
        }
        let members: Vec<(proto::RunId, &crate::cluster::WorkerRecord)> = c
            .runs()
            .filter(|r| r.state == RunState::Running)
            .flat_map(|r| r.members.iter().map(move |m| (r.id, m.worker)))
            .filter_map(|(run, w)| Some((run, c.worker(w)?)))
            .collect();
        for (name, help, f) in MEMBER_SERIES {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (run, w) in &members {
                let latest = c.latest_metrics(w.id).filter(|m| m.run == *run);
                if let Some(v) = f(w, latest) {
                    let _ = writeln!(out, "{name}{{run=\"{run}\",worker=\"{}\"}} {v}", w.id);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series the Grafana dashboard in `docs/` reads is one this exposition has: a
    /// renamed series fails here, not silently in someone's Grafana.
    #[test]
    fn the_grafana_dashboard_reads_only_exported_series() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/grafana-dashboard.json")).unwrap();
        let mut known: Vec<&str> = RUN_SERIES.iter().map(|s| s.0).collect();
        known.extend(MEMBER_SERIES.iter().map(|s| s.0));
        known.extend(["longhaul_runs", "longhaul_workers", "longhaul_rpc_duration_seconds_bucket"]);
        let mut read = 0;
        for panel in doc["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                // Metric names: identifiers followed by a selector, a range or the end, or any
                // identifier of ours (label names, functions and keywords are neither).
                let bytes = expr.as_bytes();
                let mut i = 0;
                while i < bytes.len() {
                    if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
                        let start = i;
                        while i < bytes.len()
                            && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_')
                        {
                            i += 1;
                        }
                        let word = &expr[start..i];
                        let next = bytes.get(i).copied();
                        let in_braces =
                            expr[..start].matches('{').count() > expr[..start].matches('}').count();
                        let metric = !in_braces
                            && (word.starts_with("longhaul_")
                                || matches!(next, Some(b'{') | Some(b'[') | None));
                        if metric {
                            assert!(known.contains(&word), "{word} in {expr:?} is not exported");
                            read += 1;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
        }
        assert!(read >= 15, "only {read} series read: the scan is broken");
    }
}
