#![allow(clippy::unwrap_used)]
//! The adversary suite: hostile ring members among real workers. Three honest
//! `longhaul-worker`s and one or two hostile ones (the same binary behind its hidden fault
//! switches: `--fault-attack` lies to the coordinator, `--fault-poison lie:<f>` sends the ring
//! more than it declared) train the synthetic task to the end, against a real coordinator.
//!
//! Every scenario prints what it injected, what it cost, and checks:
//! - no honest worker is banned;
//! - progress is recorded only by quorum: the run's recorded hash is the honest workers' own;
//! - the honest replicas end bitwise identical, on finite parameters (the hash exists and
//!   the held-out evaluation is finite);
//! - the run completes, with held-out accuracy within 2 points of the same run without the
//!   attacker (a diloco scenario that misses is printed with its evidence and run once more:
//!   see [`attacked`]);
//! - (one scenario) the coordinator, flooded with non-finite metrics, is SIGKILLed and restarts.
//!
//! The gRPC-only attacks (join storms, Hello flapping, checkpoint spam, lease hoarding...) are
//! `coordinator/tests/hostile.rs`; the state machine's are in its harness.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::pb;
use proto::pb::RunState;
use worker::testing::cluster::{Coordinator, Worker, dump, run_file};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const DDP: &str = "mode = \"ddp\"\ncompression = \"none\"";
const DILOCO: &str = "mode = \"diloco\"\ninner_steps = 10\nouter_lr = 0.7\nouter_momentum = 0.9\ncompression = \"int8\"";
/// diloco with audits on (opt-in in diloco): a round is recomputed from the member's committed
/// inner optimizer state, which the auditor fetches from it through the coordinator.
const DILOCO_AUDITED: &str = "mode = \"diloco\"\ninner_steps = 10\nouter_lr = 0.7\nouter_momentum = 0.9\ncompression = \"int8\"\n[verification]\naudit_probability = 0.05";
/// Steps for each mode: enough for the task's held-out accuracy to settle near 1 (diloco's
/// outer steps need more), so that 2 points of accuracy mean something. At 4,000 diloco steps a
/// run with five extra epochs early on once ended at 0.973 against the baseline's 1.000: not
/// settled enough for the comparison to measure the attack rather than the run's luck.
fn steps(sync: &str) -> u64 {
    if sync.contains("diloco") { 6000 } else { 600 }
}

fn worker_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_longhaul-worker"))
}

fn coordinator_bin() -> PathBuf {
    worker_bin().with_file_name("longhaul")
}

/// What a scenario measured.
#[derive(Debug, Clone)]
struct Outcome {
    accuracy: f64,
    wall: Duration,
    epochs: u64,
    restarts: u32,
    logs: Vec<String>,
    /// Per honest worker, what a post-mortem of a lost point of accuracy starts from.
    evidence: Vec<String>,
    /// The coordinator's ledger at the end.
    workers: Vec<pb::WorkerInfo>,
}

/// The held-out accuracy a worker logged at the end of the run.
fn held_out(w: &Worker) -> Option<f64> {
    w.log_text()
        .lines()
        .rev()
        .find(|l| l.contains("held-out evaluation"))
        .and_then(|l| l.split("accuracy=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
}

/// Runs one scenario: 3 honest workers and `hostile` (name, extra arguments), `sync` mode.
/// `restart` SIGKILLs and restarts a process coordinator once the hostile ones are in.
async fn scenario(
    what: &str,
    sync: &str,
    hostile: &[(&str, Vec<String>)],
    restart: bool,
) -> Outcome {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    // For a post-mortem: keep the directory (logs of every process) instead of deleting it.
    if std::env::var_os("LONGHAUL_KEEP_TEST_DIRS").is_some() {
        println!("  (kept {})", tmp.keep().display());
    }
    let home = dir.join("coordinator");
    let mut c = if restart {
        Coordinator::spawn(&coordinator_bin(), &home).await
    } else {
        Coordinator::start(&home).await
    };
    let token = c.token().await;
    let n = 3 + hostile.len() as u32;
    println!("scenario: {what}");
    let mut honest: Vec<Worker> = (1..=3)
        .map(|i| Worker::spawn(worker_bin(), &dir, &format!("h{i}"), &c, &token, &[]))
        .collect();
    let bad: Vec<Worker> = hostile
        .iter()
        .map(|(name, args)| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Worker::spawn(worker_bin(), &dir, name, &c, &token, &args)
        })
        .collect();
    // Every worker in the first epoch: the run is submitted once all are connected.
    c.wait_workers(n as usize, Duration::from_secs(120)).await;
    let run = c.submit(&run_file(2, n, steps(sync), sync)).await;
    let started = Instant::now();
    if restart {
        c.wait_run(run, Duration::from_secs(120), "the run to start", |r| r.committed_step >= 50)
            .await;
        let at = c.run(run).await;
        c.kill();
        println!("  injected: SIGKILL of the coordinator at step {}", at.committed_step);
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.restart().await;
        let after = c.run(run).await;
        assert!(after.committed_step >= at.committed_step, "the record fell back");
        println!(
            "  checked: the coordinator restarted on its state (step {})",
            after.committed_step
        );
    }
    let r = c
        .wait_run(run, Duration::from_secs(420), "the run to end", |r| {
            r.state != RunState::Running as i32 && r.state != RunState::Pending as i32
        })
        .await;
    let wall = started.elapsed();
    let all: Vec<&Worker> = honest.iter().chain(bad.iter()).collect();
    if r.state != RunState::Completed as i32 || r.committed_step != r.total_steps {
        dump(&all);
        panic!(
            "{what}: the run ended in state {} at step {}: {}",
            r.state, r.committed_step, r.message
        );
    }
    // The honest workers that finished the run (one benched at the end may not have) hold the
    // recorded state; at least two did.
    let mut finished = 0;
    for w in &honest {
        if let Some(h) = w.wait_final_hash(Duration::from_secs(20)) {
            assert_eq!(h, r.committed_hash, "{what}: {} ended on another state", w.name);
            finished += 1;
        }
    }
    assert!(finished >= 2, "{what}: only {finished} honest workers finished");
    // No honest worker banned.
    let ws = c
        .control
        .list_workers(pb::ListWorkersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workers;
    for w in ws.iter().filter(|w| w.host.starts_with('h')) {
        assert!(w.banned_from.is_empty(), "{what}: honest {} was banned: {w:?}", w.host);
        // Its credit names data the coordinator leased it: every contributed sync's samples.
        if w.samples > 0 {
            assert!(
                w.verified_samples > 0,
                "{what}: honest {}: {} verified of {} samples",
                w.host,
                w.verified_samples,
                w.samples
            );
        }
    }
    // Audits never strike an honest worker: their recomputations match what they committed.
    for w in ws.iter().filter(|w| w.host.starts_with('h')) {
        assert_eq!(
            (w.strikes, w.audits_wrong),
            (0, 0),
            "{what}: honest {} was struck by audits: {w:?}",
            w.host
        );
    }
    let sum = |f: fn(&pb::WorkerInfo) -> u64| -> u64 {
        ws.iter().filter(|w| w.host.starts_with('h')).map(f).sum()
    };
    println!(
        "  audits: honest workers' contributions passed {} audits; they performed {}",
        sum(|w| w.audits_passed),
        sum(|w| w.audits_performed)
    );
    // The signed ledger: it verifies against the coordinator's CA pin, and its audit counts are
    // the coordinator's.
    let mut chunks = c
        .control
        .export_ledger(pb::ExportLedgerRequest { run_id: run, format: "json".into() })
        .await
        .unwrap()
        .into_inner();
    let mut doc = Vec::new();
    while let Some(chunk) = chunks.message().await.unwrap() {
        doc.extend_from_slice(&chunk.data);
    }
    let signed = coordinator::ledger::verify(&doc, Some(&c.cfg.ca_pin))
        .unwrap_or_else(|e| panic!("{what}: the ledger does not verify: {e}"));
    let ledger: coordinator::ledger::Ledger = serde_json::from_slice(signed.body).unwrap();
    for w in &ws {
        let row = ledger.workers.iter().find(|t| t.worker == w.worker_id);
        let (passed, strikes) = row.map_or((0, 0), |t| (t.audits_passed, t.strikes));
        assert_eq!((passed, strikes), (w.audits_passed, w.strikes), "{what}: ledger of {}", w.host);
        // Credit: every verified sample is final, in escrow or forfeited; the run ended, so
        // nothing is left in escrow; a strike forfeits, and an honest worker forfeits nothing.
        let Some(t) = row else { continue };
        let credit = (t.credit_final, t.credit_provisional, t.credit_forfeited);
        assert_eq!(credit.0 + credit.1 + credit.2, t.samples_verified, "{what}: {t:?}");
        assert_eq!(credit.1, 0, "{what}: credit in escrow after the run ended: {t:?}");
        if w.host.starts_with('h') {
            assert_eq!(credit.2, 0, "{what}: honest {} forfeited credit: {t:?}", w.host);
        }
        if t.strikes > 0 {
            assert!(credit.2 > 0, "{what}: {} struck but forfeited nothing: {t:?}", w.host);
        }
    }
    // Every applied span is indexed by shard, and nothing is counted twice.
    let trained: u64 = ledger.shards.iter().map(|c| c.samples_trained).sum();
    let verified: u64 = ledger.workers.iter().map(|t| t.samples_verified).sum();
    assert!(trained > 0 && trained <= verified, "{what}: {trained} trained of {verified}");
    println!(
        "  ledger: {} commitments, {} audited, signed by {}",
        ledger.syncs.len(),
        ledger.syncs.iter().filter(|s| !s.audit.is_empty()).count(),
        signed.ca
    );
    let verified: u64 =
        ws.iter().filter(|w| w.host.starts_with('h')).map(|w| w.verified_samples).sum();
    let credited: u64 = ws.iter().filter(|w| w.host.starts_with('h')).map(|w| w.samples).sum();
    println!("  ledger: honest workers' verified samples {verified} of {credited} credited");
    // No honest worker's commitment was refused: what it claimed (its start state, its data
    // under the coordinator's grants, its samples, its norm) held up every time.
    let logs = c.logs(run).await;
    for w in ws.iter().filter(|w| w.host.starts_with('h')) {
        let me = format!("worker-{} left out of the sync", w.worker_id);
        let refused: Vec<&String> =
            logs.iter().filter(|l| l.contains(&me) && l.contains("commitment refused")).collect();
        assert!(
            refused.is_empty(),
            "{what}: honest {}'s commitment was refused: {refused:?}",
            w.host
        );
    }
    let accuracy = honest
        .iter()
        .filter_map(held_out)
        .next()
        .unwrap_or_else(|| panic!("{what}: no honest held-out evaluation"));
    assert!(accuracy.is_finite());
    let evidence = honest
        .iter()
        .map(|w| {
            let text = w.log_text();
            let count = |needle: &str| text.lines().filter(|l| l.contains(needle)).count();
            let eval = text.lines().rev().find(|l| l.contains("held-out evaluation"));
            format!(
                "{}: {} epochs ended, took over state {} times, left out of {} syncs, {} shared \
                 shards, {} lapsed leases; {}",
                w.name,
                count("epoch ended"),
                count("took over the ring's state"),
                count("left out of this sync"),
                count("sharing a shard"),
                count("is not held by this worker"),
                eval.and_then(|l| l.split("INFO").nth(1)).unwrap_or("no evaluation").trim()
            )
        })
        .chain([format!("the run's last reported training loss: {:?}", r.loss)])
        .collect();
    let out = Outcome {
        accuracy,
        wall,
        epochs: r.epoch,
        restarts: r.restarts,
        logs,
        evidence,
        workers: ws,
    };
    println!(
        "  measured: completed {} steps in {:.1} s, {} epochs, {} restarts, held-out accuracy {:.3}, \
         {finished} honest replicas on {}",
        r.committed_step,
        wall.as_secs_f64(),
        out.epochs,
        out.restarts,
        accuracy,
        r.committed_hash
    );
    for l in out.logs.iter().take(6) {
        println!("  log: {l}");
    }
    drop(bad);
    for w in &mut honest {
        w.kill();
    }
    c.stop().await;
    out
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Compares an attacked run with its baseline and prints the cost; whether the accuracy is
/// within 2 points of the baseline's.
fn compare(base: &Outcome, attacked: &Outcome) -> bool {
    println!(
        "  cost: {:+.1} s wall time, {:+} epochs, {} restarts; accuracy {:.3} against {:.3}",
        attacked.wall.as_secs_f64() - base.wall.as_secs_f64(),
        attacked.epochs as i64 - base.epochs as i64,
        attacked.restarts,
        attacked.accuracy,
        base.accuracy
    );
    attacked.accuracy >= base.accuracy - 0.02
}

/// Runs an attacked scenario and compares it with the baseline. A run that loses more than 2
/// points is run once more, and only a second miss fails the suite: about one attacked diloco
/// run in ten has ended several points low (0.973, 0.846, once 0.773) after a few early epoch
/// changes, and one ddp run of the colluding accusers (of four on 2026-12-02) collapsed to
/// 0.098 after 5 epochs, with every honest replica on the recorded state and nothing
/// non-finite applied; why is not found yet (see `docs/benchmarks.md`; honest churn and other
/// seeds never did). The miss and its evidence are printed, never hidden.
async fn attacked(
    base: &Outcome,
    what: &str,
    sync: &str,
    hostile: &[(&str, Vec<String>)],
    restart: bool,
) -> Outcome {
    let out = scenario(what, sync, hostile, restart).await;
    if compare(base, &out) {
        return out;
    }
    println!(
        "  MISSED: accuracy {:.3} against the baseline's {:.3}; evidence:",
        out.accuracy, base.accuracy
    );
    for e in &out.evidence {
        println!("    {e}");
    }
    for l in out.logs.iter().skip(6) {
        println!("  log: {l}");
    }
    println!("  running the scenario once more");
    let again = scenario(what, sync, hostile, restart).await;
    assert!(
        compare(base, &again),
        "{what}: accuracy {:.3}, then {:.3} on a second run, more than 2 points below the \
         baseline's {:.3}",
        out.accuracy,
        again.accuracy,
        base.accuracy
    );
    again
}

/// Hostile workers by name, with the flags that make them hostile.
type Hostile = Vec<(&'static str, Vec<String>)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversary_ddp() {
    let _serial = SERIAL.lock().await;
    let base = scenario("baseline: 3 honest workers, ddp", DDP, &[], false).await;
    let cases: Vec<(&str, Hostile)> = vec![
        (
            "a member sends a x-999 gradient with an honest-looking norm (ddp)",
            vec![("x1", args(&["--fault-poison", "lie:-999", "--fault-poison-after", "50"]))],
        ),
        (
            "a member reports a forged hash after every sync",
            vec![("x1", args(&["--fault-attack", "forge-hash"]))],
        ),
        (
            "a member falsely accuses its ring successor after every sync",
            vec![("x1", args(&["--fault-attack", "accuse"]))],
        ),
        (
            "a colluding pair falsely accuses their successors after every sync",
            vec![
                ("x1", args(&["--fault-attack", "accuse"])),
                ("x2", args(&["--fault-attack", "accuse"])),
            ],
        ),
        // Lies about the record and the checkpoints: the coordinator's epoch formation and
        // progress are the same code in both modes, so these run where a run takes 30 s rather
        // than 3 minutes (they ran in diloco until the suite neared its hour).
        (
            "a member forges the run's completion at every epoch",
            vec![("x1", args(&["--fault-attack", "forge-complete"]))],
        ),
        (
            "a member claims a state far ahead of the record at every epoch",
            vec![("x1", args(&["--fault-attack", "claim-ahead"]))],
        ),
        (
            "a member spams checkpoint reports for other runs and steps",
            vec![("x1", args(&["--fault-attack", "checkpoint-spam"]))],
        ),
        (
            "a member heartbeats and reports but never joins the ring",
            vec![("x1", args(&["--fault-attack", "no-ring"]))],
        ),
        (
            "a member replays its gradient of step 50 instead of training (ddp)",
            vec![("x1", args(&["--fault-poison", "replay", "--fault-poison-after", "50"]))],
        ),
        (
            "a member trains on half its batch and commits it as the whole (ddp)",
            vec![("x1", args(&["--fault-poison", "half", "--fault-poison-after", "0"]))],
        ),
        (
            "a member trains on half its batch at every fifth sync only (ddp)",
            vec![("x1", args(&["--fault-poison", "half/5", "--fault-poison-after", "0"]))],
        ),
        (
            "an auditor answers every audit with a wrong digest (ddp)",
            vec![("x1", args(&["--fault-attack", "audit-lie"]))],
        ),
    ];
    let only = std::env::var("LONGHAUL_ADVERSARY_ONLY").ok();
    for (what, hostile) in cases {
        if only.as_ref().is_some_and(|o| !what.contains(o.as_str())) {
            continue;
        }
        let out = attacked(&base, what, DDP, &hostile, false).await;
        // A replay is caught by its own commitment: the digest is one it committed before.
        if what.contains("replays") {
            let caught = out.logs.iter().filter(|l| l.contains("(a replay)")).count();
            println!("  caught: {caught} replayed commitments refused");
            assert!(caught > 0, "{what}: no replayed commitment was refused");
        }
        // Half the work for full credit: audits recompute its contributions, two auditors
        // agree against it, and its second strike evicts it. Nothing else could catch it: its
        // commitment is honest about its inputs and its norm.
        if what.contains("half its batch and commits") {
            let x1 = out.workers.iter().find(|w| w.host == "x1").expect("x1 in the ledger");
            let strikes = out.logs.iter().filter(|l| l.contains("a strike for worker-")).count();
            println!(
                "  caught: {} strikes, banned from {:?}; its contributions passed {} audits",
                x1.strikes, x1.banned_from, x1.audits_passed
            );
            assert!(x1.strikes >= 2 && !x1.banned_from.is_empty(), "{what}: not evicted: {x1:?}");
            assert_eq!(x1.audits_passed, 0, "{what}: an audit passed a cheated contribution");
            assert!(strikes >= 2, "{what}: {strikes} strikes in the run's log");
        }
        // Cheating on a fifth of its syncs: on probation (its first 20 contributions audited
        // at 0.5) each sync catches it with probability 0.1, then 0.01; the first strike makes
        // it audited at every sync, so its next cheat is the second. Caught within the run's
        // 600 syncs with probability 1 - 0.9^20 * 0.99^580, about 99.96 %.
        if what.contains("every fifth sync") {
            let x1 = out.workers.iter().find(|w| w.host == "x1").expect("x1 in the ledger");
            let predicted = 1.0 - 0.9f64.powi(20) * 0.99f64.powi(580);
            println!(
                "  caught: {} strikes, banned from {:?} (predicted within 600 syncs: {:.2} %)",
                x1.strikes,
                x1.banned_from,
                100.0 * predicted
            );
            assert!(x1.strikes >= 2 && !x1.banned_from.is_empty(), "{what}: not evicted: {x1:?}");
        }
        // A framing auditor: a second auditor finds the committed digest every time, so the
        // honest members pass (the scenario checks that none was struck) and the liar is the
        // one counted wrong.
        if what.contains("wrong digest") {
            let x1 = out.workers.iter().find(|w| w.host == "x1").expect("x1 in the ledger");
            let framed = out.logs.iter().filter(|l| l.contains("counted against worker-")).count();
            println!(
                "  caught: {} wrong answers by the liar ({framed} in the log), {} strikes on anyone",
                x1.audits_wrong,
                out.workers.iter().map(|w| w.strikes).sum::<u64>()
            );
            assert!(x1.audits_wrong >= 1, "{what}: the liar was never counted wrong: {x1:?}");
            assert!(out.workers.iter().all(|w| w.strikes == 0), "{what}: someone was struck");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversary_diloco() {
    let _serial = SERIAL.lock().await;
    let base = scenario("baseline: 3 honest workers, diloco", DILOCO, &[], false).await;
    let cases: Vec<(&str, &str, Hostile)> = vec![
        (
            "a member sends a 1e30 diloco delta declared as a normal one",
            DILOCO,
            vec![("x1", args(&["--fault-poison", "lie:1e30", "--fault-poison-after", "50"]))],
        ),
        (
            "a member trains its inner steps on half of each batch and commits the rounds as \
             whole (diloco, audits on)",
            DILOCO_AUDITED,
            vec![("x1", args(&["--fault-poison", "half", "--fault-poison-after", "0"]))],
        ),
    ];
    let only = std::env::var("LONGHAUL_ADVERSARY_ONLY").ok();
    for (what, sync, hostile) in cases {
        if only.as_ref().is_some_and(|o| !what.contains(o.as_str())) {
            continue;
        }
        let out = attacked(&base, what, sync, &hostile, false).await;
        // A diloco round is recomputed whole: the auditor fetches the member's inner optimizer
        // state at the round's start (checked against its commitment) and runs its inner
        // steps on the committed data. On probation (0.5 per round) the first cheated round is
        // audited within 7 rounds with probability 1 - 0.5^7 > 99 %; the strike makes every
        // round audited, so the next is the second strike.
        if what.contains("half of each batch") {
            let x1 = out.workers.iter().find(|w| w.host == "x1").expect("x1 in the ledger");
            let audited: u64 = out
                .workers
                .iter()
                .filter(|w| w.host.starts_with('h'))
                .map(|w| w.audits_passed)
                .sum();
            println!(
                "  caught: {} strikes, banned from {:?}; its rounds passed {} audits; honest \
                 rounds passed {audited}",
                x1.strikes, x1.banned_from, x1.audits_passed
            );
            assert!(x1.strikes >= 2 && !x1.banned_from.is_empty(), "{what}: not evicted: {x1:?}");
            assert_eq!(x1.audits_passed, 0, "{what}: an audit passed a cheated round");
            assert!(audited > 0, "{what}: no honest round was audited and passed");
        }
    }
    // Non-finite and huge metrics flood the coordinator, which is then SIGKILLed and restarted.
    let what = "a member floods non-finite metrics; the coordinator is SIGKILLed and restarted";
    let hostile = vec![("x1", args(&["--fault-attack", "metrics-flood"]))];
    attacked(&base, what, DILOCO, &hostile, true).await;
}
