#![allow(clippy::unwrap_used)]
//! The chaos suite: real worker processes (and, where it is the subject, a real coordinator
//! process) on loopback. Each scenario prints what it injected and what it checked.
//!
//! - workers SIGKILLed every ~15 s for 3 minutes, replacements joining;
//! - a worker SIGKILLed during an all-reduce: the survivors' abort latency;
//! - the coordinator SIGKILLed mid-run and restarted;
//! - a worker cut off (SIGSTOP) for 20 s, then back.
//!
//! The scenarios run one at a time (they measure latencies on a 2-core machine).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::pb::RunState;
use rand::{Rng, SeedableRng};
use worker::testing::cluster::{Coordinator, Worker, dump, run_file, unix_ms_of_day};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn worker_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_longhaul-worker"))
}

fn coordinator_bin() -> PathBuf {
    let p = worker_bin().with_file_name("longhaul");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p coordinator`",
        p.display()
    );
    p
}

const DILOCO: &str = "mode = \"diloco\"\ninner_steps = 10\nouter_lr = 0.7\nouter_momentum = 0.9\ncompression = \"int8\"";

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

/// Waits for the run to end and checks the outcome: completed, every step committed, and every
/// live worker on the recorded final parameters.
async fn check_completion(c: &mut Coordinator, run: u64, live: &[&Worker], within: Duration) {
    let r = c
        .wait_run(run, within, "the run to end", |r| {
            r.state != RunState::Running as i32 && r.state != RunState::Pending as i32
        })
        .await;
    if r.state != RunState::Completed as i32 {
        dump(live);
        panic!("run ended in state {}: {}", r.state, r.message);
    }
    assert_eq!(r.committed_step, r.total_steps);
    for w in live {
        let h = w.wait_final_hash(Duration::from_secs(30));
        if h.as_deref() != Some(r.committed_hash.as_str()) {
            dump(live);
            panic!("{} ended on {h:?}, the run on {}", w.name, r.committed_hash);
        }
    }
    let logs = c.logs(run).await;
    assert!(!logs.iter().any(|l| l.contains("diverged")), "{logs:#?}");
    println!(
        "  checked: completed {} steps, committed step never fell, {} live workers bitwise \
         identical (hash {}), no divergence reported",
        r.committed_step,
        live.len(),
        r.committed_hash
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_a_random_worker_every_15s_with_replacements() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(&dir.path().join("coordinator")).await;
    let token = c.token().await;
    let mut workers: Vec<Worker> = (1..=3)
        .map(|i| Worker::spawn(worker_bin(), dir.path(), &format!("w{i}"), &c, &token, &[]))
        .collect();
    c.wait_workers(3, Duration::from_secs(120)).await;
    // Every kill spends one restart of the run's budget, and how far the run gets per kill
    // depends on the machine's speed: the budget must outlast every kill the schedule can make
    // (about 12 in 3 minutes), or a slow machine fails the run for its budget, not for a bug.
    let file = run_file(2, 3, 7000, DILOCO).replacen(
        "[checkpoint]",
        "restart_budget = 100\n[checkpoint]",
        1,
    );
    let run = c.submit(&file).await;
    c.wait_run(run, Duration::from_secs(120), "3 workers training", |r| {
        r.workers == 3 && r.committed_step >= 50
    })
    .await;
    let seed: u64 =
        std::env::var("LONGHAUL_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    println!("scenario: SIGKILL a random worker every ~15 s for 3 minutes (seed {seed})");
    let started = Instant::now();
    let mut recoveries = Vec::new();
    let mut highest = 0;
    let mut next = 4;
    while started.elapsed() < Duration::from_secs(180) {
        let wait = Duration::from_millis(rng.random_range(12_000..18_000));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            let r = c.run(run).await;
            assert!(
                r.committed_step >= highest,
                "committed step fell: {} < {highest}",
                r.committed_step
            );
            highest = r.committed_step;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let r = c.run(run).await;
        if r.state != RunState::Running as i32 {
            break;
        }
        let victim = rng.random_range(0..workers.len());
        let (step, epoch) = (r.committed_step, r.epoch);
        let killed_at = Instant::now();
        workers[victim].kill();
        let name = workers.remove(victim).name.clone();
        workers.push(Worker::spawn(worker_bin(), dir.path(), &format!("w{next}"), &c, &token, &[]));
        next += 1;
        let r = c
            .wait_run(run, Duration::from_secs(60), "the ring's next step", |r| {
                r.state != RunState::Running as i32 || (r.epoch > epoch && r.committed_step > step)
            })
            .await;
        let took = killed_at.elapsed().as_secs_f64();
        recoveries.push(took);
        println!(
            "  injected: killed {name} at step {step} (epoch {epoch}); w{} joined; next step \
             {} committed {took:.2} s after the kill (epoch {})",
            next - 1,
            r.committed_step,
            r.epoch
        );
    }
    // A replacement spawned just before the last steps may find the run over before it is in a
    // ring (the others finish without it): it has nothing to hold. Every worker that trained
    // in the ring is checked.
    c.wait_run(run, Duration::from_secs(480), "the run to end", |r| {
        r.state != RunState::Running as i32 && r.state != RunState::Pending as i32
    })
    .await;
    let live: Vec<&Worker> =
        workers.iter().filter(|w| w.log_text().contains("training in the ring")).collect();
    for w in workers.iter().filter(|w| !w.log_text().contains("training in the ring")) {
        println!("  note: {} joined after the run's last ring formed; not checked", w.name);
    }
    assert!(live.len() >= 2, "only {} live workers trained in the ring", live.len());
    check_completion(&mut c, run, &live, Duration::from_secs(480)).await;
    let n = recoveries.len();
    assert!(n >= 5, "only {n} kills happened");
    println!(
        "  measured: death to the ring's next successful step over {n} kills: median {:.2} s, \
         max {:.2} s (the coordinator declares death after 1.5 s here)",
        percentile(&mut recoveries.clone(), 0.5),
        percentile(&mut recoveries, 1.0)
    );
    drop(workers);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_during_an_all_reduce() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(&dir.path().join("coordinator")).await;
    let token = c.token().await;
    // ddp over continental links (40 ms RTT): every step is mostly an all-reduce in flight.
    let emulate = ["--emulate", "continental"];
    let mut w: Vec<Worker> = (1..=3)
        .map(|i| Worker::spawn(worker_bin(), dir.path(), &format!("w{i}"), &c, &token, &emulate))
        .collect();
    c.wait_workers(3, Duration::from_secs(120)).await;
    let run = c.submit(&run_file(2, 3, 400, "mode = \"ddp\"\ncompression = \"none\"")).await;
    let r = c
        .wait_run(run, Duration::from_secs(120), "3 workers training", |r| {
            r.workers == 3 && r.committed_step >= 30
        })
        .await;
    println!("scenario: SIGKILL a worker while its ring all-reduces (ddp, continental links)");
    let (step, epoch) = (r.committed_step, r.epoch);
    w[2].kill();
    println!("  injected: killed w3 at step {step} (epoch {epoch})");
    let noticed = c
        .wait_run(run, Duration::from_secs(30), "the coordinator to notice", |r| {
            r.epoch > epoch || r.message.contains("died")
        })
        .await;
    let r = c
        .wait_run(run, Duration::from_secs(60), "the survivors' next step", |r| {
            r.epoch > epoch && r.committed_step > step
        })
        .await;
    // The coordinator marks the run when it notices (and sends the abort in the same tick).
    let notice_ms = unix_ms_of_day(noticed.updated_unix_ms);
    for s in &w[..2] {
        let aborted = s
            .log_times("epoch ended: coordinator:")
            .into_iter()
            .find(|t| *t + 200 >= notice_ms)
            .unwrap_or_else(|| {
                dump(&[&w[0], &w[1]]);
                panic!("{} logged no abort", s.name)
            });
        let latency = aborted as i64 - notice_ms as i64;
        println!(
            "  measured: {} aborted its all-reduce {latency} ms after the coordinator noticed",
            s.name
        );
        assert!(latency <= 1000, "{}: abort {latency} ms after the coordinator noticed", s.name);
    }
    println!(
        "  checked: both survivors aborted within 1 s; epoch {} committed step {} (> {step})",
        r.epoch, r.committed_step
    );
    check_completion(&mut c, run, &[&w[0], &w[1]], Duration::from_secs(240)).await;
    drop(w);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigkill_the_coordinator_mid_run() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::spawn(&coordinator_bin(), &dir.path().join("coordinator")).await;
    let token = c.token().await;
    let w: Vec<Worker> = (1..=3)
        .map(|i| Worker::spawn(worker_bin(), dir.path(), &format!("w{i}"), &c, &token, &[]))
        .collect();
    c.wait_workers(3, Duration::from_secs(120)).await;
    let run = c.submit(&run_file(2, 3, 1500, DILOCO)).await;
    let r = c
        .wait_run(run, Duration::from_secs(120), "3 workers training", |r| {
            r.workers == 3 && r.committed_step >= 200
        })
        .await;
    println!("scenario: SIGKILL the coordinator mid-run, restart it 3 s later on the same state");
    c.kill();
    println!("  injected: SIGKILL at committed step {} (epoch {})", r.committed_step, r.epoch);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.restart().await;
    let back = c.run(run).await;
    println!(
        "  restarted: the run is at committed step {} (epoch {})",
        back.committed_step, back.epoch
    );
    assert!(back.committed_step >= r.committed_step, "committed steps were lost");
    let r2 = c
        .wait_run(run, Duration::from_secs(60), "progress after the restart", |x| {
            x.committed_step > back.committed_step
        })
        .await;
    println!("  checked: no committed step lost; training went on (step {})", r2.committed_step);
    let live: Vec<&Worker> = w.iter().collect();
    check_completion(&mut c, run, &live, Duration::from_secs(240)).await;
    drop(w);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cut_a_worker_off_for_20s() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(&dir.path().join("coordinator")).await;
    let token = c.token().await;
    // Long enough that the survivors are still training when w3 comes back.
    let w: Vec<Worker> = (1..=3)
        .map(|i| Worker::spawn(worker_bin(), dir.path(), &format!("w{i}"), &c, &token, &[]))
        .collect();
    c.wait_workers(3, Duration::from_secs(120)).await;
    let run = c.submit(&run_file(2, 3, 8000, DILOCO)).await;
    let r = c
        .wait_run(run, Duration::from_secs(120), "3 workers training", |r| {
            r.workers == 3 && r.committed_step >= 100
        })
        .await;
    println!("scenario: cut w3 off for 20 s (SIGSTOP: no heartbeats, no ring traffic), then heal");
    w[2].pause();
    println!("  injected: w3 stopped at step {} (epoch {})", r.committed_step, r.epoch);
    let evicted = c
        .wait_run(run, Duration::from_secs(30), "w3's eviction", |x| {
            x.epoch > r.epoch && x.workers == 2
        })
        .await;
    println!("  checked: w3 evicted (epoch {} with 2 workers)", evicted.epoch);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = c.run(run).await;
    assert!(during.committed_step > evicted.committed_step, "the survivors stalled");
    w[2].resume();
    let resumed_at = worker::testing::cluster::unix_ms_of_day(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
            as u64,
    );
    println!("  injected: w3 resumed at step {}", during.committed_step);
    let back = c
        .wait_run(run, Duration::from_secs(60), "w3 back in the ring", |x| {
            x.epoch > during.epoch && x.workers == 3 && x.committed_step > during.committed_step
        })
        .await;
    // The epoch with w3 is announced before w3 has run its agreement: wait for w3's word.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let took_over = w[2].log_times("took over the ring's state (hash verified)");
        if took_over.iter().any(|t| *t + 100 >= resumed_at) {
            break;
        }
        if Instant::now() > deadline {
            dump(&[&w[2]]);
            panic!("w3 did not take over verified state after it came back: {took_over:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "  checked: w3 rejoined in epoch {} and took over the ring's state, hash verified",
        back.epoch
    );
    let live: Vec<&Worker> = w.iter().collect();
    check_completion(&mut c, run, &live, Duration::from_secs(240)).await;
    drop(w);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_worker_sending_nan_or_huge_values_never_reaches_the_parameters() {
    let _serial = SERIAL.lock().await;
    for kind in ["nan", "huge"] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Coordinator::start(&dir.path().join("coordinator")).await;
        let token = c.token().await;
        println!("scenario: w3 sends {kind} values in every sync from step 100 (declared as such)");
        let poison = ["--fault-poison", kind, "--fault-poison-after", "100"];
        let w = vec![
            Worker::spawn(worker_bin(), dir.path(), "w1", &c, &token, &[]),
            Worker::spawn(worker_bin(), dir.path(), "w2", &c, &token, &[]),
            Worker::spawn(worker_bin(), dir.path(), "w3", &c, &token, &poison),
        ];
        // All three in the first epoch: the run is submitted once they are connected.
        c.wait_workers(3, Duration::from_secs(120)).await;
        let run = c.submit(&run_file(2, 3, 600, DILOCO)).await;
        c.wait_run(run, Duration::from_secs(120), "3 workers training", |r| r.workers == 3).await;
        let needle = if kind == "nan" { "banned from the run" } else { "left out of the sync" };
        let mut logs = Vec::new();
        for _ in 0..240 {
            logs = c.logs(run).await;
            if logs.iter().any(|l| l.contains(needle)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let Some(line) = logs.iter().find(|l| l.contains(needle)) else {
            dump(&[&w[0], &w[2]]);
            panic!("w3's {kind} contribution was not dealt with: {logs:#?}");
        };
        println!("  injected: {kind} from w3; coordinator: {line:?}");
        if kind == "nan" {
            // Its own commitment (a non-finite norm) is the evidence: banned, never assigned
            // again; the others finish the run.
            check_completion(&mut c, run, &[&w[0], &w[1]], Duration::from_secs(240)).await;
            assert!(w[2].final_hash().is_none(), "the banned worker finished the run");
            println!(
                "  checked: w3 declared a non-finite contribution, was banned on that evidence \
                 before the plan went out, and nothing of it reached the others' parameters"
            );
        } else {
            // A truthful outlier is left out of every sync, nothing more: it finishes with the
            // others, bitwise identical, and its ledger says it contributed nothing since.
            check_completion(&mut c, run, &[&w[0], &w[1], &w[2]], Duration::from_secs(240)).await;
            println!(
                "  checked: w3's 1e30x contribution was left out of every sync by the plan \
                 (coefficient 0), never reached a replica, and w3 was not punished for telling \
                 the truth"
            );
        }
        drop(w);
        c.stop().await;
    }
}
