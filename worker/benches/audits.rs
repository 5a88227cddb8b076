//! What audits cost: the same run of 4 `longhaul-worker` processes (the adversary suite's gpt on
//! synthetic addition, loopback) with audits at 5 % (50 % on probation for 20 syncs: ddp's
//! defaults, diloco's when turned on) and with audits off, alternated; in ddp (800 steps) and
//! in diloco (H = 10, 2,000 steps: 200 rounds); wall time, the share of member-syncs spent
//! auditing, the audits performed, and the contributions that passed. Audits add no ring bytes
//! (an auditor sends zeros of the same size) and two small coordinator messages per audit
//! (`AuditTask`, `AuditResult`); a diloco audit also moves the audited member's inner optimizer
//! state through the coordinator (8 bytes per parameter with AdamW, printed).
//!
//! `cargo bench -p worker --bench audits` (about 6 minutes on 2 cores).

use std::path::Path;
use std::time::{Duration, Instant};

use proto::pb::{self, RunState};
use worker::testing::cluster::{Coordinator, Worker, run_file};

const WORKERS: u32 = 4;
const DDP: &str = "mode = \"ddp\"\ncompression = \"none\"";
const DILOCO: &str = "mode = \"diloco\"\ninner_steps = 10\nouter_lr = 0.7\nouter_momentum = 0.9\ncompression = \"int8\"";

struct Measured {
    wall: Duration,
    audits: u64,
    passed: u64,
    strikes: u64,
    syncs: u64,
    /// Parameters of the model (from a worker's log).
    params: u64,
}

async fn measure(sync: &str, steps: u64, audits_on: bool) -> anyhow::Result<Measured> {
    let dir = tempfile::tempdir()?;
    let mut c = Coordinator::start(&dir.path().join("coordinator")).await;
    let token = c.token().await;
    let mut toml = run_file(WORKERS, WORKERS, steps, sync);
    let p = if audits_on { "0.05" } else { "0.0" };
    toml.push_str(&format!("\n[verification]\naudit_probability = {p}\n"));
    let bin = Path::new(env!("CARGO_BIN_EXE_longhaul-worker"));
    let mut workers: Vec<Worker> = (1..=WORKERS)
        .map(|i| Worker::spawn(bin, dir.path(), &format!("w{i}"), &c, &token, &[]))
        .collect();
    c.wait_workers(WORKERS as usize, Duration::from_secs(120)).await;
    let run = c.submit(&toml).await;
    let ended = |r: &pb::RunInfo| {
        r.state != RunState::Running as i32 && r.state != RunState::Pending as i32
    };
    let within = Duration::from_secs(600);
    // Timed from the first recorded step, as the utilisation bench does.
    c.wait_run(run, within, "the first step", |r| r.committed_step > 0 || ended(r)).await;
    let started = Instant::now();
    let r = c.wait_run(run, within, "the run to end", ended).await;
    anyhow::ensure!(r.state == RunState::Completed as i32, "run ended: {}", r.message);
    let wall = started.elapsed();
    let ws = c.control.list_workers(pb::ListWorkersRequest::default()).await?.into_inner().workers;
    let sum = |f: fn(&pb::WorkerInfo) -> u64| ws.iter().map(f).sum::<u64>();
    let params = workers[0]
        .log_text()
        .split("params=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let m = Measured {
        wall,
        audits: sum(|w| w.audits_performed),
        passed: sum(|w| w.audits_passed),
        strikes: sum(|w| w.strikes),
        syncs: sum(|w| w.syncs),
        params,
    };
    for w in &mut workers {
        w.kill();
    }
    c.stop().await;
    Ok(m)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    compare("ddp", DDP, 800, 800).await?;
    compare("diloco", DILOCO, 2000, 200).await
}

/// Runs `sync` for `steps` steps (`syncs` syncs) with audits off and on, alternated twice.
async fn compare(mode: &str, sync: &str, steps: u64, syncs: u64) -> anyhow::Result<()> {
    println!(
        "audits: {WORKERS} workers, {mode} gpt 2x64 on synthetic addition, {steps} steps \
         ({syncs} syncs), loopback; 5 % (50 % on probation for 20 syncs) against off"
    );
    let member_syncs = syncs * u64::from(WORKERS);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..2 {
        off.push(measure(sync, steps, false).await?);
        on.push(measure(sync, steps, true).await?);
        let (a, b) = (&off[round], &on[round]);
        let moved = if mode == "diloco" {
            let bytes = b.audits * (8 + 8 * b.params);
            format!(", {:.1} MiB of inner state relayed", bytes as f64 / (1u64 << 20) as f64)
        } else {
            String::new()
        };
        println!(
            "  round {round}: off {:.1} s; on {:.1} s, {} audits performed ({:.1} % of member-syncs), \
             {} passed, {} strikes{moved}",
            a.wall.as_secs_f64(),
            b.wall.as_secs_f64(),
            b.audits,
            100.0 * b.audits as f64 / member_syncs as f64,
            b.passed,
            b.strikes
        );
    }
    let mean =
        |v: &[Measured]| v.iter().map(|m| m.wall.as_secs_f64()).sum::<f64>() / v.len() as f64;
    let contributed: u64 = on.iter().map(|m| m.syncs).sum::<u64>() / on.len() as u64;
    println!(
        "  mean wall: off {:.1} s, on {:.1} s ({:+.1} %); contributed member-syncs with audits {} \
         of {member_syncs}",
        mean(&off),
        mean(&on),
        100.0 * (mean(&on) / mean(&off) - 1.0),
        contributed,
    );
    Ok(())
}
