//! Compute utilisation of 3 `longhaul-worker` processes whose ring links are emulated as
//! `transatlantic` (100 ms RTT, 1 Gbit/s, 0.01 % loss), in `ddp` and in `diloco` (H = 50,
//! int8): compute time / wall time since each worker began training, averaged over the
//! workers, as the coordinator reports it.
//!
//! `cargo bench -p worker --bench utilisation` (about 2 minutes on 2 cores). Each worker gets
//! one libtorch thread; on a machine with fewer cores than workers, the contention slows compute
//! and so flatters utilisation: compare modes, and read the step times beside them.

use std::path::Path;
use std::time::{Duration, Instant};

use proto::pb::RunState;
use worker::testing::cluster::{Coordinator, Worker, run_file};

async fn measure(name: &str, model: &str, sync: &str, steps: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut c = Coordinator::start(&dir.path().join("coordinator")).await;
    let token = c.token().await;
    let toml = run_file(3, 3, steps, sync).replace("layers = 2\nwidth = 64\nheads = 4", model);
    let run = c.submit(&toml).await;
    let bin = Path::new(env!("CARGO_BIN_EXE_longhaul-worker"));
    let emulate = ["--emulate", "transatlantic"];
    let workers: Vec<Worker> = (1..=3)
        .map(|i| Worker::spawn(bin, dir.path(), &format!("w{i}"), &c, &token, &emulate))
        .collect();
    // The last report while all three were members (the coordinator forgets them at the end).
    let mut last = None;
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let r = c.run(run).await;
        if r.state != RunState::Running as i32 && r.state != RunState::Pending as i32 {
            anyhow::ensure!(r.state == RunState::Completed as i32, "run ended: {}", r.message);
            break;
        }
        if r.workers == 3 && r.committed_step > 0 {
            started.get_or_insert_with(Instant::now);
            last = Some(r);
        }
        anyhow::ensure!(Instant::now() < deadline, "the run did not finish within 10 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wall = started.map(|t| t.elapsed()).unwrap_or_default();
    let r = last.ok_or_else(|| anyhow::anyhow!("no report with 3 workers"))?;
    // One worker's own account of where its time went (logged just after the run completes).
    workers[0].wait_final_hash(Duration::from_secs(20));
    let split = workers[0]
        .log_text()
        .lines()
        .rev()
        .find(|l| l.contains("finished the run's steps"))
        .map(|l| {
            let field = |k: &str| -> f64 {
                l.split(&format!(" {k}="))
                    .nth(1)
                    .and_then(|v| v.split(' ').next())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN)
            };
            format!(
                "compute {:.1} s, comm {:.1} s, idle {:.1} s of {:.1} s",
                field("compute_s"),
                field("comm_s"),
                field("idle_s"),
                field("wall_s")
            )
        })
        .unwrap_or_default();
    println!(
        "{name:<18} {:<28} {steps:>6} {:>9.1} {:>11.1} {:>8.1} %   w1: {split}",
        model.replace('\n', " ").replace(" = ", "="),
        wall.as_secs_f64(),
        wall.as_secs_f64() * 1e3 / steps as f64,
        r.compute_utilisation * 100.0
    );
    drop(workers);
    c.stop().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    println!("3 workers, transatlantic links (100 ms RTT, 1 Gbit/s, 0.01 % loss), gpt");
    println!(
        "{:<18} {:<28} {:>6} {:>9} {:>11} {:>10}",
        "mode", "model", "steps", "wall s", "ms/step", "compute"
    );
    let ddp = "mode = \"ddp\"\ncompression = \"none\"";
    let diloco = "mode = \"diloco\"\ninner_steps = 50\nouter_lr = 0.7\nouter_momentum = 0.9\n\
                  compression = \"int8\"";
    for (model, ddp_steps, diloco_steps) in [
        ("layers = 2\nwidth = 128\nheads = 4", 60, 300),
        ("layers = 4\nwidth = 256\nheads = 4", 20, 150),
    ] {
        measure("ddp", model, ddp, ddp_steps).await?;
        measure("diloco H=50 int8", model, diloco, diloco_steps).await?;
    }
    Ok(())
}
