//! The JSON shapes of runs and workers: one definition for `longhaul --output json` and the
//! web dashboard's API, so that what a script reads and what the page shows never disagree.

use proto::RunState;
use proto::pb;
use serde_json::{Value, json};

/// A run state's name (`running`, `completed`...), or `unknown` for a value this build does
/// not know.
pub fn state_name(s: i32) -> &'static str {
    proto::convert::run_state(s).map(RunState::as_str).unwrap_or("unknown")
}

/// A liveness's name (`alive`, `suspect`, `dead`), or `unknown`.
pub fn liveness_name(s: i32) -> &'static str {
    proto::convert::liveness(s).map(|l| l.as_str()).unwrap_or("unknown")
}

/// A run as JSON: every field of [`pb::RunInfo`], the state by name.
pub fn run_json(r: &pb::RunInfo) -> Value {
    json!({
        "run_id": r.run_id, "name": r.name, "state": state_name(r.state), "epoch": r.epoch,
        "committed_step": r.committed_step, "total_steps": r.total_steps, "workers": r.workers,
        "min_workers": r.min_workers, "max_workers": r.max_workers, "loss": r.loss,
        "tokens_per_sec": r.tokens_per_sec, "restarts": r.restarts, "restart_budget": r.restart_budget,
        "message": r.message, "created_unix_ms": r.created_unix_ms, "updated_unix_ms": r.updated_unix_ms,
        "data_epoch": r.data_epoch, "accuracy": r.accuracy,
        "compute_utilisation": r.compute_utilisation, "bytes_moved": r.bytes_moved,
        "committed_hash": r.committed_hash, "latest_checkpoint": r.latest_checkpoint,
        "ring": r.ring,
    })
}

/// A worker as JSON: every field of [`pb::WorkerInfo`], the liveness by name.
pub fn worker_json(w: &pb::WorkerInfo) -> Value {
    json!({
        "worker_id": w.worker_id, "name": w.name, "host": w.host, "ring_addr": w.ring_addr,
        "liveness": liveness_name(w.liveness), "run_id": w.run_id,
        "last_heartbeat_unix_ms": w.last_heartbeat_unix_ms, "samples": w.samples,
        "steps": w.steps, "bytes": w.bytes, "uptime_ms": w.uptime_ms,
        "joined_unix_ms": w.joined_unix_ms, "loss": w.loss,
        "param_hash": w.param_hash, "compute_utilisation": w.compute_utilisation,
        "syncs": w.syncs, "excluded": w.excluded, "verified_samples": w.verified_samples,
        "benched_until_unix_ms": w.benched_until_unix_ms, "banned_from": w.banned_from,
        "sitting_out_of": w.sitting_out_of,
        "audits_passed": w.audits_passed, "strikes": w.strikes,
        "audits_performed": w.audits_performed, "audits_wrong": w.audits_wrong,
    })
}

/// A duration for humans: `45s`, `12m03s`, `5h07m`, `3d04h`.
pub fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}
