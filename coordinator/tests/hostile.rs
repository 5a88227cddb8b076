#![allow(clippy::unwrap_used)]
//! Hostile clients of the real server: agents that speak the gRPC API with real certificates
//! and lie, flood and probe. Each scenario prints what it injected and what held.
//!
//! The training side of the adversary suite (hostile ring members among real workers) is
//! `worker/tests/adversary.rs`; the state machine's own adversarial cases are in
//! `coordinator/src/cluster/harness.rs`.

use std::path::Path;
use std::time::{Duration, Instant};

use client::ConnectConfig;
use coordinator::cluster;
use coordinator::server::{self, Listeners, ServerConfig};
use coordinator::testing::{self, ScriptedAgent};
use proto::pb;
use proto::pb::agent_message::Msg as Up;
use proto::pb::coordinator_message::Msg as Down;
use tonic::Code;

const T: Duration = Duration::from_secs(10);

struct Running {
    cfg: ConnectConfig,
    shards_port: u16,
    control: client::Control,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(dir: &Path) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shards = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shards_port = shards.local_addr().unwrap().port();
        let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let mut config = ServerConfig::new(dir.to_owned());
        config.cluster = cluster::Config {
            suspect_after: 1_000,
            dead_after: 3_000,
            readmit_after: 0,
            bench_for: 60_000,
            ..cluster::Config::default()
        };
        config.tick = Duration::from_millis(50);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            server::run(
                Listeners { api: listener, metrics: None, shards: Some(shards), dashboard: None },
                config,
                async move {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
        });
        for _ in 0..200 {
            if dir.join("admin.token").exists() && dir.join("ca.pem").exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cfg = testing::connect_config(&url, dir).unwrap();
        let control = client::control(&cfg, &testing::admin_token(dir).unwrap()).unwrap();
        Self { cfg, shards_port, control, stop: Some(stop), task }
    }

    async fn token(&mut self, uses: u32) -> String {
        self.control
            .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds: 600, uses })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    async fn run(&mut self, id: u64) -> pb::RunInfo {
        self.control.get_run(pb::GetRunRequest { run_id: id }).await.unwrap().into_inner()
    }

    async fn workers(&mut self) -> Vec<pb::WorkerInfo> {
        self.control
            .list_workers(pb::ListWorkersRequest::default())
            .await
            .unwrap()
            .into_inner()
            .workers
    }

    /// The run's record once `done` holds of it, or the last one read after `T` (the server
    /// decides asynchronously; a loaded machine takes its time, so nothing here waits a fixed
    /// time for something to happen).
    async fn run_when(&mut self, id: u64, done: impl Fn(&pb::RunInfo) -> bool) -> pb::RunInfo {
        let deadline = Instant::now() + T;
        loop {
            let r = self.run(id).await;
            if done(&r) || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The workers once `done` holds of them, or the last list read after `T`.
    async fn workers_when(
        &mut self,
        done: impl Fn(&[pb::WorkerInfo]) -> bool,
    ) -> Vec<pb::WorkerInfo> {
        let deadline = Instant::now() + T;
        loop {
            let ws = self.workers().await;
            if done(&ws) || Instant::now() > deadline {
                return ws;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(T, self.task).await.unwrap().unwrap();
    }
}

/// `n` members of a fresh synthetic run (min `n`), heartbeating, in epoch 1, agreed.
async fn members(s: &mut Running, n: usize, steps: u64) -> (u64, Vec<ScriptedAgent>) {
    let run = s
        .control
        .submit_run(pb::SubmitRunRequest {
            run_toml: testing::synthetic_run_file(n as u32, n as u32, steps),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let token = s.token(n as u32).await;
    let mut agents = Vec::new();
    for i in 0..n {
        let a =
            ScriptedAgent::join(&s.cfg, &token, &format!("127.0.0.1:{}", 7100 + i)).await.unwrap();
        std::mem::forget(a.keep_beating(Duration::from_millis(200)));
        agents.push(a);
    }
    for a in &mut agents {
        a.expect_epoch(1, T).await.unwrap();
    }
    let mut refs: Vec<&mut ScriptedAgent> = agents.iter_mut().collect();
    testing::agree(&mut refs, run, 1, 0, "000000000000abcd", T).await.unwrap();
    (run, agents)
}

fn metrics(run: u64, epoch: u64, step: u64, tps: f64, loss: Option<f64>) -> Up {
    Up::Metrics(pb::Metrics {
        run_id: run,
        epoch,
        step,
        tokens_per_sec: tps,
        loss,
        ..Default::default()
    })
}

/// Waits for the session to end with an error; returns its status.
async fn ended(a: &mut ScriptedAgent) -> tonic::Status {
    tokio::time::timeout(T, async {
        loop {
            match a.inbox.recv().await {
                Some(Err(s)) => return s,
                Some(Ok(_)) => {}
                None => return tonic::Status::cancelled("closed"),
            }
        }
    })
    .await
    .expect("the session ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_storm_with_one_token_and_idempotent_joins() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Running::start(dir.path()).await;
    let token = s.token(1).await;
    println!("scenario: 20 joins with one single-use token, then a retried join");
    let (csr, _key) = client::pki::new_csr().unwrap();
    let join = |csr: String| {
        let cfg = s.cfg.clone();
        let token = token.clone();
        async move {
            proto::pb::agent_client::AgentClient::new(client::channel(&cfg, None).unwrap())
                .join(pb::JoinRequest {
                    token,
                    csr_pem: csr,
                    host: "storm".into(),
                    ring_addr: "127.0.0.1:7001".into(),
                })
                .await
        }
    };
    let first = join(csr.clone()).await.unwrap().into_inner();
    let mut refused = 0;
    for _ in 0..20 {
        let (other, _) = client::pki::new_csr().unwrap();
        let st = join(other).await.unwrap_err();
        assert_eq!(st.code(), Code::Unauthenticated);
        assert!(st.message().contains("used up"), "{st}");
        refused += 1;
    }
    // The same key again (a lost response, a retry): the same worker, no use spent.
    let again = join(csr).await.unwrap().into_inner();
    assert_eq!(again.worker_id, first.worker_id);
    assert_eq!(s.workers().await.len(), 1, "no ghost workers");
    println!(
        "  checked: 1 worker joined, {refused} joins refused (token used up), the retry got the same worker"
    );
    // A host name with terminal escapes is refused.
    let (csr, _) = client::pki::new_csr().unwrap();
    let token2 = s.token(1).await;
    let st = proto::pb::agent_client::AgentClient::new(client::channel(&s.cfg, None).unwrap())
        .join(pb::JoinRequest {
            token: token2,
            csr_pem: csr,
            host: "\u{1b}]0;pwned\u{7}".into(),
            ring_addr: "127.0.0.1:7002".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_once_per_session_and_address_changes_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Running::start(dir.path()).await;
    let (run, mut agents) = members(&mut s, 2, 1_000).await;
    let epoch = s.run(run).await.epoch;
    println!("scenario: a member sends Hello twice, then flaps its ring address over 12 sessions");
    agents[0].send(Up::Hello(pb::Hello { ring_addr: "127.0.0.1:7200".into() })).await.unwrap();
    let st = ended(&mut agents[0]).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st}");
    let (id, cert, key) = (agents[0].id, agents[0].cert_pem.clone(), agents[0].key_pem.clone());
    let (mut accepted, mut current) = (0, "127.0.0.1:7100".to_owned());
    for i in 0..12u16 {
        let addr = format!("127.0.0.1:{}", 7300 + (i % 2));
        let mut a =
            ScriptedAgent::connect(&s.cfg, id, cert.clone(), key.clone(), &addr).await.unwrap();
        let _ = a.heartbeat(1).await;
        let r = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match a.inbox.recv().await {
                    Some(Err(st)) => return Some(st),
                    Some(Ok(_)) => continue,
                    None => return None,
                }
            }
        })
        .await;
        match r {
            Ok(Some(st)) if st.message().contains("ring address") => {}
            _ if addr != current => {
                accepted += 1;
                current = addr;
            }
            _ => {}
        }
    }
    let r = s.run(run).await;
    println!(
        "  checked: the second Hello closed the session; {accepted} of 12 address changes \
         accepted; epoch {} -> {}",
        epoch, r.epoch
    );
    assert!(accepted <= 3, "{accepted} changes accepted");
    assert!(r.epoch <= epoch + 4, "epoch churned to {}", r.epoch);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_flood_closes_the_flooder_and_honest_heartbeats_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Running::start(dir.path()).await;
    let (run, mut agents) = members(&mut s, 3, 1_000_000).await;
    println!("scenario: one member floods Metrics (and non-finite ones) while two heartbeat");
    let flood = {
        let up = agents[0].up.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            for i in 0..20_000u64 {
                let m = metrics(run, 1, 0, if i % 2 == 0 { f64::MAX } else { 1.0 }, Some(f64::NAN));
                if up.send(pb::AgentMessage { msg: Some(m) }).await.is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };
    // Honest members measure their heartbeat round trips meanwhile.
    let mut worst = Duration::ZERO;
    let t0 = Instant::now();
    let mut seq = 1000;
    while t0.elapsed() < Duration::from_secs(3) {
        for a in &mut agents[1..] {
            seq += 1;
            let t = Instant::now();
            a.heartbeat(seq).await.unwrap();
            a.expect(T, |m| match m {
                Down::HeartbeatAck(x) if x.seq == seq => Some(()),
                _ => None,
            })
            .await
            .unwrap();
            worst = worst.max(t.elapsed());
        }
        // A busy honest worker's pace (real ones beat once a second).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = flood.await.unwrap();
    let st = ended(&mut agents[0]).await;
    assert!(matches!(st.code(), Code::InvalidArgument | Code::ResourceExhausted), "{st}");
    let ws = s.workers().await;
    assert!(
        ws.iter()
            .filter(|w| w.worker_id != agents[0].id)
            .all(|w| w.liveness == pb::Liveness::Alive as i32),
        "{ws:?}"
    );
    let r = s.run(run).await;
    assert!(r.tokens_per_sec.is_finite());
    println!(
        "  checked: the flooder's session was closed ({}) after {sent} messages queued; the \
         honest members stayed alive, worst heartbeat round trip {worst:?}; the run's figures \
         stayed finite",
        st.code()
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_metrics_then_a_restart_and_a_corrupt_record_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Running::start(dir.path()).await;
    let (run, agents) = members(&mut s, 2, 1_000_000).await;
    println!(
        "scenario: f64::MAX tokens/s and NaN loss from a member, then a restart; then a corrupt record"
    );
    agents[0].send(metrics(run, 1, 0, f64::MAX, None)).await.unwrap();
    agents[1].send(metrics(run, 1, 0, 1e14, Some(f64::INFINITY))).await.unwrap();
    agents[1].send(metrics(run, 1, 0, 1e14, Some(2.0))).await.unwrap();
    // No honest worker reports such values: each sender's session is closed and it sits out
    // (a member that reconnected to do it again would otherwise re-form the ring each time).
    let before = s.run_when(run, |r| r.message.contains("no honest worker sends")).await;
    assert!(before.message.contains("no honest worker sends"), "{before:?}");
    let ids = [agents[0].id, agents[1].id];
    let out = |ws: &[pb::WorkerInfo]| {
        ws.iter().filter(|w| ids.contains(&w.worker_id)).all(|w| w.run_id.is_none())
    };
    let ws = s.workers_when(|ws| out(ws)).await;
    assert!(out(&ws), "both senders left the run: {ws:?}");
    assert!(before.tokens_per_sec.is_finite() && before.tokens_per_sec <= 1e15 * 2.0);
    drop(agents);
    s.stop().await;
    // Restart on the same state: it starts, and the run is as it was.
    let mut s = Running::start(dir.path()).await;
    let after = s.run(run).await;
    assert_eq!((after.run_id, after.committed_hash.clone()), (run, before.committed_hash.clone()));
    s.stop().await;
    // A record damaged on disk (a bug, a bit flip): quarantined, the coordinator still starts.
    {
        let store = coordinator::store::Store::open(&dir.path().join("state.redb")).unwrap();
        store.put_raw_run(999, b"{\"not\": \"a run\"").unwrap();
    }
    let mut s = Running::start(dir.path()).await;
    assert_eq!(s.run(run).await.run_id, run);
    s.stop().await;
    let store = coordinator::store::Store::open(&dir.path().join("state.redb")).unwrap();
    assert_eq!(store.quarantined().unwrap(), vec!["runs/999".to_owned()]);
    println!(
        "  checked: non-finite values refused, figures finite; the coordinator restarted twice, the damaged record quarantined"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_spam_and_foreign_shards_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Running::start(dir.path()).await;
    let (run, mut agents) = members(&mut s, 2, 1_000_000).await;
    // A second run with a real file dataset, which no member of the first may read.
    let book = dir.path().join("book.txt");
    std::fs::write(&book, "secret\n".repeat(100)).unwrap();
    let text = testing::synthetic_run_file(5, 5, 10).replacen(
        "format = \"synthetic-addition\"\ndigits = 3\n",
        &format!("format = \"text\"\nuri = \"file://{}\"\n", book.display()),
        1,
    );
    let other = s
        .control
        .submit_run(pb::SubmitRunRequest { run_toml: text })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    println!(
        "scenario: checkpoint reports for other runs, beyond the record, with escapes and 2 MB URIs; a shard of another run"
    );
    for (r, step, uri) in [
        (other, 1, "file:///x".to_owned()),
        (999_999, 1, "file:///x".to_owned()),
        (run, u64::MAX, "file:///x".to_owned()),
    ] {
        agents[0]
            .send(Up::CheckpointDone(pb::CheckpointDone {
                run_id: r,
                step,
                uri,
                ..Default::default()
            }))
            .await
            .unwrap();
    }
    let st = ended(&mut agents[0]).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st}");
    agents[1]
        .send(Up::CheckpointDone(pb::CheckpointDone {
            run_id: run,
            step: 1,
            uri: format!("\u{1b}]0;pwned\u{7}{}", "A".repeat(2 << 20)),
            ..Default::default()
        }))
        .await
        .unwrap();
    let st = ended(&mut agents[1]).await;
    assert!(
        matches!(st.code(), Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted),
        "{st}"
    );
    let r = s.run(run).await;
    assert_eq!(r.latest_checkpoint, "");
    s.control.list_runs(pb::ListRunsRequest::default()).await.unwrap();
    // Shard bytes go only to the members of that run's epoch: a known worker of another run
    // with its own valid certificate is refused.
    let url = format!("https://localhost:{}/runs/{other}/shards/0", s.shards_port);
    let me = Some((agents[1].id, agents[1].cert_pem.as_str(), agents[1].key_pem.as_str()));
    let r = testing::https_get(&url, &s.cfg.ca_pin, me).await.unwrap();
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    println!(
        "  checked: foreign and unreached checkpoints refused (session closed), the run's record \
         untouched, ListRuns fine; another run's shard refused (403)"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_progress_false_accusations_and_malformed_commitments() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Running::start(dir.path()).await;
    let (run, mut agents) = members(&mut s, 4, 200).await;
    let liar = agents[0].id;
    println!(
        "scenario: a member forges completion and hashes, accuses another, and commits a malformed contribution"
    );
    // Forged completion and a far step: nothing recorded.
    agents[0].report(run, 1, 200, "deadbeefdeadbeef").await.unwrap();
    agents[0].report(run, 1, u64::MAX, "deadbeefdeadbeef").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.run(run).await;
    assert_eq!((r.state, r.committed_step), (pb::RunState::Running as i32, 0), "{r:?}");
    // A sync where the liar reports a forged hash: the three honest reports record the step.
    let t = 50;
    for a in &agents {
        a.commit(run, 1, t, vec![1.0; 4]).await.unwrap();
    }
    for a in &mut agents {
        a.expect_plan(1, t, T).await.unwrap();
    }
    agents[0].report(run, 1, t, "1111111111111111").await.unwrap();
    for a in &agents[1..] {
        a.report(run, 1, t, "2222222222222222").await.unwrap();
    }
    let r = s.run_when(run, |r| r.committed_step == t).await;
    assert_eq!((r.committed_step, r.committed_hash.as_str()), (t, "2222222222222222"));
    // The liar's own two reports for one step contradict each other: banned, by id and key.
    agents[0].report(run, 1, t, "2222222222222222").await.unwrap();
    let ws = s
        .workers_when(|ws| ws.iter().any(|w| w.worker_id == liar && !w.banned_from.is_empty()))
        .await;
    let w0 = ws.iter().find(|w| w.worker_id == liar).unwrap();
    assert_eq!(w0.banned_from, vec![run], "its two reports of step {t} are its own evidence");
    println!(
        "  checked: forged completion and hash ignored; step {t} recorded with the majority's hash; the liar banned on its own contradicting reports"
    );
    s.stop().await;

    // A false accusation (in a fresh run): the coordinator cannot tell who lies, so one of the
    // two sits out of the run and they are never in one ring of it again; nobody is banned.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Running::start(dir.path()).await;
    let (run, agents) = members(&mut s, 4, 200).await;
    let e = s.run(run).await;
    let (accuser, accused) = (agents[1].id, agents[2].id);
    agents[1]
        .send(Up::RingFault(pb::RingFault {
            run_id: run,
            epoch: e.epoch,
            peer_worker_id: accused,
            kind: pb::FaultKind::Misbehaved as i32,
            detail: "it lied".into(),
        }))
        .await
        .unwrap();
    let sits_out = |w: &pb::WorkerInfo| w.sitting_out_of.contains(&run);
    let ws = s.workers_when(|ws| ws.iter().any(sits_out)).await;
    let out: Vec<u64> = ws.iter().filter(|w| sits_out(w)).map(|w| w.worker_id).collect();
    assert!(out == [accuser] || out == [accused], "one side of the dispute sits out: {ws:?}");
    assert!(ws.iter().all(|w| w.banned_from.is_empty()), "nobody is banned: {ws:?}");
    let w = ws.iter().find(|w| w.worker_id == out[0]).unwrap();
    assert_eq!(w.run_id, None, "it is no longer assigned to the run: {w:?}");
    // The run needs all four: it waits (for a fifth worker) rather than taking it back.
    let r = s.run(run).await;
    assert_eq!(r.state, pb::RunState::Running as i32, "{r:?}");
    println!(
        "  checked: an accusation kept one side ({}) out of the run, which waits for another worker; nobody is banned",
        out[0]
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_capped_and_certificates_renew_only_for_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Running::start(dir.path()).await;
    let manifest = testing::write_dataset(&dir.path().join("data"), 20).unwrap();
    let run = s
        .control
        .submit_run(pb::SubmitRunRequest {
            run_toml: testing::run_file(&manifest, 2, 2, 1_000_000),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let token = s.token(2).await;
    let mut a = ScriptedAgent::join(&s.cfg, &token, "127.0.0.1:7401").await.unwrap();
    let mut b = ScriptedAgent::join(&s.cfg, &token, "127.0.0.1:7402").await.unwrap();
    let _ha = a.keep_beating(Duration::from_millis(200));
    let _hb = b.keep_beating(Duration::from_millis(200));
    a.expect_epoch(1, T).await.unwrap();
    b.expect_epoch(1, T).await.unwrap();
    println!("scenario: a member leases 30 times in a row");
    let mut tracked = 0;
    for _ in 0..30 {
        if let Some(pb::lease_shard_response::Result::Lease(l)) =
            a.rpc.lease_shard(pb::LeaseShardRequest {}).await.unwrap().into_inner().result
            && !l.shared
        {
            tracked += 1;
        }
    }
    let l = b.rpc.lease_shard(pb::LeaseShardRequest {}).await.unwrap().into_inner().result;
    assert!(
        matches!(l, Some(pb::lease_shard_response::Result::Lease(ref x)) if !x.shared),
        "{l:?}"
    );
    assert!(tracked <= 2, "{tracked} tracked leases");
    println!(
        "  checked: {tracked} tracked leases for the hoarder; the other member still leases a shard of its own (run {run})"
    );
    // Renewal: the same key gets a fresh certificate; another key is refused.
    let csr = client::pki::csr_for_key(&a.key_pem).unwrap();
    let r = a.rpc.renew(pb::RenewRequest { csr_pem: csr }).await.unwrap().into_inner();
    assert!(r.cert_pem.contains("BEGIN CERTIFICATE"));
    let (other, _) = client::pki::new_csr().unwrap();
    let st = a.rpc.renew(pb::RenewRequest { csr_pem: other }).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);
    s.stop().await;
}

/// A checkpoint copy as an honest member would send it: meta.json and model.safetensors.
fn copy_of(run: u64, step: u64, hash: &str, model: &[u8]) -> (Vec<u8>, String, String) {
    use sha2::{Digest, Sha256};
    let hex = |b: &[u8]| client::pki::hex(&Sha256::digest(b));
    let meta = serde_json::json!({
        "format": 1, "run": run, "step": step, "param_hash": hash, "sync": "ddp",
        "files": { "model.safetensors": hex(model) },
    });
    let meta = serde_json::to_vec(&meta).unwrap();
    let (meta_sha, model_sha) = (hex(&meta), hex(model));
    (meta, meta_sha, model_sha)
}

/// Answers an upload request with `parts` ((file, bytes), in order); returns the verdict.
async fn upload(
    a: &ScriptedAgent,
    transfer: u64,
    parts: Vec<(&str, Vec<u8>)>,
) -> Result<String, tonic::Status> {
    let parts: Vec<pb::CheckpointPart> = parts
        .into_iter()
        .map(|(f, d)| pb::CheckpointPart {
            transfer_id: transfer,
            file: f.into(),
            data: d,
            error: String::new(),
        })
        .collect();
    let mut rpc = a.rpc.clone();
    let mut verdicts = rpc.upload_checkpoint(tokio_stream::iter(parts)).await?.into_inner();
    Ok(verdicts.message().await?.map(|v| v.error).unwrap_or_else(|| "no verdict".into()))
}

async fn upload_request(a: &mut ScriptedAgent) -> pb::UploadRequest {
    a.expect(T, |m| match m {
        Down::Upload(u) => Some(u.clone()),
        _ => None,
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_fetch_takes_no_single_members_word() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Running::start(dir.path()).await;
    let (run, mut agents) = members(&mut s, 3, 1_000).await;
    let hash = "000000000000abcd";
    {
        let mut refs: Vec<&mut ScriptedAgent> = agents.iter_mut().collect();
        testing::sync(&mut refs, run, 1, 50, hash, T).await.unwrap();
    }
    s.run_when(run, |r| r.committed_step == 50).await;
    let model = b"the replicas' model".to_vec();
    let (meta, meta_sha, model_sha) = copy_of(run, 50, hash, &model);
    let (evil_meta, evil_meta_sha, evil_sha) = copy_of(run, 50, hash, b"a poisoned model");
    let done = |meta_sha: &str, model_sha: &str| {
        Up::CheckpointDone(pb::CheckpointDone {
            run_id: run,
            step: 50,
            uri: "file:///ckpt".into(),
            sha256: meta_sha.into(),
            model_sha256: model_sha.into(),
            ..Default::default()
        })
    };
    let fetch = |c: &mut client::Control| {
        let mut c = c.clone();
        async move { c.fetch_checkpoint(pb::FetchCheckpointRequest { run_id: run, step: 0 }).await }
    };
    println!(
        "scenario: one member of three reports a poisoned model; fetches before and after a majority"
    );
    agents[0].send(done(&evil_meta_sha, &evil_sha)).await.unwrap();
    agents[1].send(done(&meta_sha, &model_sha)).await.unwrap();
    // One honest and one lying report: no majority, nothing to fetch.
    let st = loop {
        match fetch(&mut s.control).await {
            Err(st) if st.message().contains("no member reported") => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(st) => break st,
            Ok(_) => panic!("a model one of three members reported was fetched"),
        }
    };
    assert_eq!(st.code(), Code::FailedPrecondition, "{st}");
    agents[2].send(done(&meta_sha, &model_sha)).await.unwrap();
    let r = s.run_when(run, |r| !r.latest_checkpoint.is_empty()).await;
    assert!(r.latest_checkpoint.contains("(2 of 3 members)"), "{}", r.latest_checkpoint);
    assert!(r.latest_checkpoint.contains(&model_sha[..16]), "{}", r.latest_checkpoint);

    println!(
        "scenario: the first holder sends a tampered model; a non-holder answers another's transfer"
    );
    let mut stream = fetch(&mut s.control).await.unwrap().into_inner();
    let client = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(c) = stream.message().await.transpose() {
            got.push(c);
        }
        got
    });
    // The holders are asked in turn; the liar (not a holder of the majority's model) never is.
    let first = upload_request(&mut agents[1]).await;
    assert_eq!((first.run_id, first.step), (run, 50));
    let tampered =
        vec![("meta.json", meta.clone()), ("model.safetensors", b"the replicas' modeL".to_vec())];
    let verdict = upload(&agents[1], first.transfer_id, tampered).await.unwrap();
    assert!(verdict.contains("majority"), "{verdict}");
    let second = upload_request(&mut agents[2]).await;
    let stolen = vec![("meta.json", evil_meta.clone()), ("model.safetensors", b"x".to_vec())];
    let st = upload(&agents[0], second.transfer_id, stolen).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st}");
    let honest = vec![
        ("meta.json", meta[..7].to_vec()),
        ("meta.json", meta[7..].to_vec()),
        ("model.safetensors", model.clone()),
    ];
    assert_eq!(upload(&agents[2], second.transfer_id, honest).await.unwrap(), "");
    // A transfer answers once.
    let again = upload(&agents[2], second.transfer_id, vec![("meta.json", meta.clone())]).await;
    assert_eq!(again.unwrap_err().code(), Code::NotFound);
    let got = tokio::time::timeout(T, client).await.unwrap().unwrap();
    use pb::checkpoint_chunk::Part;
    let parts: Vec<Part> = got.into_iter().map(|c| c.unwrap().part.unwrap()).collect();
    let sources: Vec<&pb::FetchSource> =
        parts.iter().filter_map(|p| if let Part::Source(s) = p { Some(s) } else { None }).collect();
    assert_eq!(sources.len(), 2, "{parts:?}");
    assert_eq!((sources[0].worker_id, sources[1].worker_id), (agents[1].id, agents[2].id));
    assert!(sources[1].previous_error.contains("majority"), "{}", sources[1].previous_error);
    assert_eq!((sources[0].agreeing, sources[0].members), (2, 3));
    let Some(Part::Done(d)) = parts.last() else { panic!("no done: {parts:?}") };
    assert_eq!(d.sha256["model.safetensors"], model_sha);
    assert_eq!(d.sha256["meta.json"], meta_sha);
    // After the second source, exactly the honest bytes.
    let after: Vec<u8> = parts
        .iter()
        .skip_while(|p| !matches!(p, Part::Source(s) if s.worker_id == agents[2].id))
        .filter_map(|p| {
            if let Part::Data(d) = p {
                (d.file == "model.safetensors").then_some(d.data.clone())
            } else {
                None
            }
        })
        .flatten()
        .collect();
    assert_eq!(after, model);

    println!("scenario: members ask for inner optimizer states of audits that are not theirs");
    for (run_id, audit_id) in [(run, 0x1234_5678_9abc_def1), (run, 0), (run + 99, 1), (0, 1)] {
        let mut rpc = agents[1].rpc.clone();
        let req = pb::FetchAuditStateRequest { run_id, audit_id };
        let st = rpc.fetch_audit_state(req).await.map(|_| ()).unwrap_err();
        assert!(
            matches!(st.code(), Code::FailedPrecondition | Code::InvalidArgument),
            "run {run_id} audit {audit_id}: {st}"
        );
    }

    println!("scenario: a checkpoint report listing a file no checkpoint has");
    let mut files = std::collections::HashMap::new();
    files.insert("../../etc/passwd".to_owned(), model_sha.clone());
    agents[0]
        .send(Up::CheckpointDone(pb::CheckpointDone {
            run_id: run,
            step: 50,
            model_sha256: model_sha.clone(),
            files,
            ..Default::default()
        }))
        .await
        .unwrap();
    let st = ended(&mut agents[0]).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st}");
    s.stop().await;
}
