#![allow(clippy::unwrap_used)]
//! Membership with real processes: a coordinator on loopback, `longhaul-worker`s as child
//! processes training the synthetic task. A worker is SIGKILLed mid-run and another joins
//! mid-run; the survivors go on, the joiner takes over the ring's state (checked against the
//! hash the coordinator recorded), and every live worker ends with the same parameters.

use std::path::Path;
use std::time::Duration;

use proto::pb::RunState;
use worker::testing::cluster::{Coordinator, Worker, dump, run_file};

fn spawn(dir: &Path, name: &str, c: &Coordinator, token: &str) -> Worker {
    Worker::spawn(Path::new(env!("CARGO_BIN_EXE_longhaul-worker")), dir, name, c, token, &[])
}
const STEPS: u64 = 1200;

async fn kill_one_then_join_one(sync: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(&dir.path().join("coordinator")).await;
    let token = c.token().await;
    let run = c.submit(&run_file(2, 3, STEPS, sync)).await;
    let mut w: Vec<Worker> =
        (1..=3).map(|i| spawn(dir.path(), &format!("w{i}"), &c, &token)).collect();
    let result = async {
        let r = c
            .wait_run(run, Duration::from_secs(120), "3 workers training", |r| {
                r.workers == 3 && r.committed_step >= 150
            })
            .await;
        let (killed_at, epoch) = (r.committed_step, r.epoch);
        eprintln!("killing w3 at step {killed_at} (epoch {epoch})");
        w[2].kill();
        let r = c
            .wait_run(run, Duration::from_secs(60), "the survivors to go on", |r| {
                r.epoch > epoch && r.workers == 2 && r.committed_step >= killed_at + 100
            })
            .await;
        assert_eq!(r.state, RunState::Running as i32);
        let (join_at, epoch) = (r.committed_step, r.epoch);
        eprintln!("survivors reached step {join_at} in epoch {epoch}; w4 joins");
        w.push(spawn(dir.path(), "w4", &c, &token));
        c.wait_run(run, Duration::from_secs(60), "w4 to train with them", |r| {
            r.epoch > epoch && r.workers == 3 && r.committed_step >= join_at + 100
        })
        .await;
        let r = c
            .wait_run(run, Duration::from_secs(240), "the run to complete", |r| {
                r.state != RunState::Running as i32
            })
            .await;
        assert_eq!(r.state, RunState::Completed as i32, "{}", r.message);
        assert_eq!(r.committed_step, STEPS);
        r
    }
    .await;

    // The joiner adopted the ring's state and verified its hash before training.
    let joiner = w[3].log_text();
    assert!(joiner.contains("took over the ring's state (hash verified)"), "{joiner}");
    // Every live worker ends on the parameters the coordinator recorded for the last step.
    for i in [0, 1, 3] {
        // The coordinator completes the run on the first report of the last step; the others
        // finish it (checkpoint, evaluation) a moment later.
        let h = w[i].wait_final_hash(Duration::from_secs(20));
        if h.as_deref() != Some(result.committed_hash.as_str()) {
            dump(&[&w[0], &w[1], &w[2], &w[3]]);
            panic!("{} ended on {h:?}, the run on {}", w[i].name, result.committed_hash);
        }
    }
    // ... and wrote it as its latest checkpoint.
    for i in [0, 1, 3] {
        let meta = latest_checkpoint_meta(&w[i].state, run);
        assert_eq!(meta["step"], STEPS, "{}: {meta}", w[i].name);
        assert_eq!(meta["param_hash"], result.committed_hash.as_str(), "{}: {meta}", w[i].name);
    }
    let logs = c.logs(run).await;
    assert!(!logs.iter().any(|l| l.contains("diverged")), "{logs:#?}");
    eprintln!(
        "completed {} steps; final hash {} on w1, w2 and w4",
        result.committed_step, result.committed_hash
    );
    drop(w);
    c.stop().await;
}

/// The `meta.json` of the checkpoint `latest` names for `run` in a worker's state directory.
fn latest_checkpoint_meta(state: &std::path::Path, run: u64) -> serde_json::Value {
    let ns = std::fs::read_dir(state.join("checkpoints")).unwrap().next().unwrap().unwrap().path();
    let run_dir = ns.join(format!("run-{run}"));
    let latest = std::fs::read_to_string(run_dir.join("latest")).unwrap();
    let meta = std::fs::read(run_dir.join(latest.trim()).join("meta.json")).unwrap();
    serde_json::from_slice(&meta).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diloco_survives_a_kill_and_takes_a_joiner() {
    kill_one_then_join_one(
        "mode = \"diloco\"\ninner_steps = 10\nouter_lr = 0.7\nouter_momentum = 0.9\ncompression = \"int8\"",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddp_survives_a_kill_and_takes_a_joiner() {
    kill_one_then_join_one("mode = \"ddp\"\ncompression = \"none\"").await;
}

/// A run the coordinator accepts and no worker can train (its TorchScript file is on no
/// worker's disk) costs nothing but itself: the worker declines it and stays up, the run waits
/// saying why, and the same process trains the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_no_worker_can_train_costs_nothing_but_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(&dir.path().join("coordinator")).await;
    let token = c.token().await;
    let good = run_file(1, 1, 40, "mode = \"ddp\"");
    let builtin = "builtin = \"gpt\"\nlayers = 2\nwidth = 64\nheads = 4\n";
    assert!(good.contains(builtin));
    let bad = good.replace(builtin, "torchscript = \"/nonexistent/longhaul-test/model.pt\"\n");
    let bad_run = c.submit(&bad).await;
    let mut w = spawn(dir.path(), "w1", &c, &token);
    let r = c
        .wait_run(bad_run, Duration::from_secs(120), "the worker to decline the run", |r| {
            r.message.contains("declined it")
        })
        .await;
    assert!(r.message.contains("model.pt"), "{}", r.message);
    let declined = r.message.clone();
    assert_eq!(r.state, RunState::Running as i32, "a declined run waits: {}", r.message);
    let logs = c.logs(bad_run).await;
    assert!(logs.iter().any(|l| l.contains("cannot train this run")), "{logs:#?}");

    let good_run = c.submit(&good).await;
    let r = c
        .wait_run(
            good_run,
            Duration::from_secs(180),
            "the same worker to train the next run",
            |r| r.state != RunState::Running as i32 && r.state != RunState::Pending as i32,
        )
        .await;
    if r.state != RunState::Completed as i32 {
        dump(&[&w]);
        panic!("the next run ended {}: {}", r.state, r.message);
    }
    assert_eq!(r.committed_step, 40, "{}", r.message);
    eprintln!(
        "declined run: {declined:?}; next run: {} after {} steps",
        r.message, r.committed_step
    );
    // One process all along: it never exited for a run's content.
    assert!(w.child.try_wait().unwrap().is_none(), "the worker exited");
    let text = w.log_text();
    assert_eq!(text.matches("cannot train run").count(), 1, "declined once: {text}");
    drop(w);
    c.stop().await;
}
