#![allow(clippy::unwrap_used)]
//! The real server on 127.0.0.1:0 with scripted agents over real gRPC and TLS.

use std::path::Path;
use std::time::Duration;

use client::ConnectConfig;
use coordinator::cluster;
use coordinator::server::{self, Listeners, ServerConfig};
use coordinator::testing::{self, ScriptedAgent};
use proto::pb;
use tonic::Code;

struct Running {
    url: String,
    cfg: ConnectConfig,
    admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    /// The coordinator's clock. A manual one, unless a test needs time to pass by itself: time
    /// then passes for the coordinator only when the test says so, so no machine is too slow
    /// for the test (a worker falls silent when the test advances the clock, never because a
    /// loaded machine delayed its heartbeat).
    clock: server::Clock,
}

async fn start(dir: &Path) -> Running {
    start_with(dir, false, server::Clock::manual()).await
}

/// With `shards`, the coordinator also serves shard bytes over HTTPS on another port.
async fn start_with(dir: &Path, shards: bool, clock: server::Clock) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shards = match shards {
        true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        false => None,
    };
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let mut config = ServerConfig::new(dir.to_owned());
    config.cluster = cluster::Config {
        suspect_after: 600,
        dead_after: 1_500,
        readmit_after: 0,
        lease_ttl: 60_000,
        ..cluster::Config::default()
    };
    config.tick = Duration::from_millis(50);
    config.max_message_bytes = 1 << 20;
    config.clock = clock.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        server::run(
            Listeners { api: listener, metrics: None, shards, dashboard: None },
            config,
            async move {
                let _ = stopped.await;
            },
        )
        .await
        .unwrap();
    });
    // The CA and credentials exist once the server answers.
    for _ in 0..100 {
        if dir.join("admin.token").exists() && dir.join("ca.pem").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cfg = testing::connect_config(&url, dir).unwrap();
    let admin = testing::admin_token(dir).unwrap();
    Running { url, cfg, admin, stop: Some(stop), task, clock }
}

const T: Duration = Duration::from_secs(10);

async fn submit(control: &mut client::Control, run_toml: String) -> u64 {
    control.submit_run(pb::SubmitRunRequest { run_toml }).await.unwrap().into_inner().run_id
}

async fn join_token(control: &mut client::Control) -> String {
    control
        .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds: 600, uses: 10 })
        .await
        .unwrap()
        .into_inner()
        .token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_heartbeat_lease_complete_and_epoch_changes() {
    let dir = tempfile::tempdir().unwrap();
    // Epochs grow and members die as time passes, with heartbeats flowing: the system clock.
    let srv = start_with(dir.path(), false, server::Clock::System).await;
    let mut control = client::control(&srv.cfg, &srv.admin).unwrap();
    let manifest = testing::write_dataset(&dir.path().join("data"), 6).unwrap();
    let run = submit(&mut control, testing::run_file(&manifest, 2, 4, 1_000_000)).await;
    let token = join_token(&mut control).await;

    let mut a = ScriptedAgent::join(&srv.cfg, &token, "127.0.0.1:7001").await.unwrap();
    let mut b = ScriptedAgent::join(&srv.cfg, &token, "127.0.0.1:7002").await.unwrap();
    let beat_a = a.keep_beating(Duration::from_millis(100));
    let beat_b = b.keep_beating(Duration::from_millis(100));
    assert_ne!(a.id, b.id);
    // Heartbeats are acknowledged.
    a.expect(T, |m| matches!(m, pb::coordinator_message::Msg::HeartbeatAck(_)).then_some(()))
        .await
        .unwrap();

    let e1 = a.expect_epoch(1, T).await.unwrap();
    assert_eq!(e1.run_id, run);
    assert_eq!(e1.members.len(), 2);
    let names: Vec<_> = e1.members.iter().map(|m| m.name.clone()).collect();
    assert!(
        names.contains(&format!("worker-{}", a.id)) && names.contains(&format!("worker-{}", b.id))
    );
    assert!(e1.members.iter().any(|m| m.addr == "127.0.0.1:7001"));
    assert!(e1.run_toml.contains("[sync]"));
    assert_eq!(b.expect_epoch(1, T).await.unwrap().epoch, e1.epoch);

    // Lease and complete; a second completion of the same lease is refused.
    let lease = match a
        .rpc
        .lease_shard(pb::LeaseShardRequest {})
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
    {
        pb::lease_shard_response::Result::Lease(l) => l,
        other => panic!("no lease: {other:?}"),
    };
    assert_eq!(lease.run_id, run);
    assert_eq!(lease.sha256.len(), 64);
    a.rpc
        .complete_shard(pb::CompleteShardRequest { lease_id: lease.lease_id, samples: 10 })
        .await
        .unwrap();
    let err = a
        .rpc
        .complete_shard(pb::CompleteShardRequest { lease_id: lease.lease_id, samples: 10 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    // b cannot complete a's lease.
    let l2 = match a
        .rpc
        .lease_shard(pb::LeaseShardRequest {})
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
    {
        pb::lease_shard_response::Result::Lease(l) => l,
        other => panic!("no lease: {other:?}"),
    };
    let err = b
        .rpc
        .complete_shard(pb::CompleteShardRequest { lease_id: l2.lease_id, samples: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Progress through the session, by quorum: both report the state they hold, get the
    // agreement, commit their contributions to the first sync (diloco, 50 inner steps), get the
    // same plan, and report the same hash after it.
    const H0: &str = "000000000000abcd";
    const HASH: &str = "00000000deadbeef";
    let held = |step, hash: &str| {
        pb::agent_message::Msg::StepCommitted(pb::StepCommitted {
            run_id: run,
            epoch: e1.epoch,
            step,
            param_hash: hash.into(),
        })
    };
    a.send(held(0, H0)).await.unwrap();
    b.send(held(0, H0)).await.unwrap();
    let agreement = |m: &pb::coordinator_message::Msg| match m {
        pb::coordinator_message::Msg::Agreement(x) => Some(x.clone()),
        _ => None,
    };
    let ag = a.expect(T, agreement).await.unwrap();
    assert_eq!((ag.epoch, ag.step, ag.param_hash.as_str()), (e1.epoch, 0, H0));
    assert!(ag.receivers.is_empty() && ag.contributors == vec![0, 1], "{ag:?}");
    let commit = |epoch, step, start: &str| {
        pb::agent_message::Msg::SyncCommit(pb::SyncCommit {
            run_id: run,
            epoch,
            step,
            segment_norms: vec![0.5, 0.5],
            start_hash: start.into(),
            contribution_norm: 0.5f32.hypot(0.5),
            ..Default::default()
        })
    };
    a.send(commit(e1.epoch, 50, H0)).await.unwrap();
    b.send(commit(e1.epoch, 50, H0)).await.unwrap();
    let plan = |m: &pb::coordinator_message::Msg| match m {
        pb::coordinator_message::Msg::SyncPlan(x) => Some(x.clone()),
        _ => None,
    };
    let p = b.expect(T, plan).await.unwrap();
    assert_eq!((p.step, p.coefficients.clone()), (50, vec![0.5, 0.5]));
    assert_eq!(p.declared, vec![0.5; 4]);
    a.send(held(50, HASH)).await.unwrap();
    let info = control.get_run(pb::GetRunRequest { run_id: run }).await.unwrap().into_inner();
    assert_eq!(info.committed_step, 0, "one member's report records nothing");
    b.send(held(50, HASH)).await.unwrap();
    let metrics = |bytes_sent, compute_ms, loss| pb::Metrics {
        run_id: run,
        step: 50,
        loss: Some(loss),
        tokens_per_sec: 1000.0,
        samples: 5,
        bytes: 1 << 20,
        accuracy: Some(0.25),
        grad_norm: 0.5,
        compute_ms,
        comm_ms: 100.0,
        idle_ms: 100.0,
        bytes_sent,
        bytes_received: bytes_sent,
        param_hash: HASH.into(),
        epoch: e1.epoch,
    };
    a.send(pb::agent_message::Msg::Metrics(metrics(1000, 800.0, 2.5))).await.unwrap();
    // Two sessions are not ordered with each other: let a's report land first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.send(pb::agent_message::Msg::Metrics(metrics(3000, 200.0, 2.0))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = control.get_run(pb::GetRunRequest { run_id: run }).await.unwrap().into_inner();
    assert_eq!(info.committed_step, 50);
    assert_eq!(info.committed_hash, HASH);
    assert_eq!(info.loss, Some(2.0), "the latest report wins");
    assert_eq!(info.accuracy, Some(0.25));
    // a computes 80 % of its time, b 50 %.
    assert!((info.compute_utilisation - 0.65).abs() < 1e-9, "{info:?}");
    assert_eq!(info.bytes_moved, 4000);
    assert_eq!(info.state, pb::RunState::Running as i32);

    // A third worker joins: epoch 2 for everyone.
    let mut c = ScriptedAgent::join(&srv.cfg, &token, "127.0.0.1:7003").await.unwrap();
    let beat_c = c.keep_beating(Duration::from_millis(100));
    let e2 = a.expect_epoch(e1.epoch + 1, T).await.unwrap();
    assert_eq!(e2.members.len(), 3);
    assert_eq!(e2.committed_step, 50);
    assert_eq!(e2.committed_hash, HASH, "the recorded hash travels with the epoch");
    assert_eq!(c.expect_epoch(e2.epoch, T).await.unwrap().epoch, e2.epoch);

    // c dies: the others get an abort of epoch 2 and then epoch 3.
    beat_c.abort();
    drop(c);
    let aborted = a
        .expect(T, |m| match m {
            pb::coordinator_message::Msg::Abort(x) => Some(x.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(aborted.epoch, e2.epoch);
    assert!(aborted.reason.contains("died"), "{}", aborted.reason);
    let e3 = b.expect_epoch(e2.epoch + 1, T).await.unwrap();
    assert_eq!(e3.members.len(), 2);
    assert_eq!(e3.committed_hash, HASH);

    // In epoch 3 they sync again and report different states: no majority, the run's log and
    // message say so, naming both workers and hashes, and the ring re-forms.
    let mut watch =
        control.watch_run(pb::WatchRunRequest { run_id: run }).await.unwrap().into_inner();
    let held3 = |step, hash: &str| {
        pb::agent_message::Msg::StepCommitted(pb::StepCommitted {
            run_id: run,
            epoch: e3.epoch,
            step,
            param_hash: hash.into(),
        })
    };
    a.send(held3(50, HASH)).await.unwrap();
    b.send(held3(50, HASH)).await.unwrap();
    a.expect(T, |m| agreement(m).filter(|x| x.epoch == e3.epoch)).await.unwrap();
    a.send(commit(e3.epoch, 100, HASH)).await.unwrap();
    b.send(commit(e3.epoch, 100, HASH)).await.unwrap();
    a.expect(T, |m| plan(m).filter(|x| x.step == 100)).await.unwrap();
    a.send(held3(100, "00000000deadbeee")).await.unwrap();
    b.send(held3(100, "00000000deadbeed")).await.unwrap();
    let line = tokio::time::timeout(T, async {
        while let Some(ev) = watch.message().await.unwrap() {
            if let Some(pb::run_event::Event::Log(line)) = ev.event
                && line.contains("no majority")
            {
                return line;
            }
        }
        panic!("the watch ended without a log line");
    })
    .await
    .unwrap();
    for needle in [
        "step 100",
        "00000000deadbeee",
        "00000000deadbeed",
        &format!("worker-{}", b.id),
        &format!("worker-{}", a.id),
    ] {
        assert!(line.contains(needle), "{line:?} lacks {needle:?}");
    }
    // The log is kept: a later watcher hears it, before the run's state.
    let mut later =
        control.watch_run(pb::WatchRunRequest { run_id: run }).await.unwrap().into_inner();
    let mut seen = false;
    while let Some(ev) = later.message().await.unwrap() {
        match ev.event {
            Some(pb::run_event::Event::Log(l)) => seen |= l == line,
            _ => break,
        }
    }
    assert!(seen, "the log line is replayed to a later watcher");
    let info = control.get_run(pb::GetRunRequest { run_id: run }).await.unwrap().into_inner();
    assert_eq!((info.state, info.committed_step), (pb::RunState::Running as i32, 50));

    // Workers are listed with their ledger: what the quorum recorded, not what they claimed.
    let workers =
        control.list_workers(pb::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!(workers.len(), 3);
    let wa = workers.iter().find(|w| w.worker_id == a.id).unwrap();
    assert_eq!(wa.liveness, pb::Liveness::Alive as i32);
    // 50 steps of a batch of 32 in the one recorded sync; the reported 5 samples do not count.
    assert_eq!((wa.steps, wa.syncs, wa.samples), (50, 1, 50 * 32), "{wa:?}");
    assert_eq!(wa.bytes, 1 << 20);
    assert_eq!((wa.loss, wa.param_hash.as_str()), (Some(2.5), HASH));
    assert!((wa.compute_utilisation - 0.8).abs() < 1e-9, "{wa:?}");
    // Pages.
    let page = control
        .list_workers(pb::ListWorkersRequest { page_size: 2, after: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.workers.len(), 2);
    let rest = control
        .list_workers(pb::ListWorkersRequest { page_size: 2, after: page.next_after })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rest.workers.len(), rest.next_after), (1, 0));

    // Stop: members hear it.
    control.stop_run(pb::StopRunRequest { run_id: run, reason: String::new() }).await.unwrap();
    let stop = a
        .expect(T, |m| match m {
            pb::coordinator_message::Msg::Stop(s) => Some(s.clone()),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(stop.state, pb::RunState::Stopped as i32);
    beat_a.abort();
    beat_b.abort();
    let _ = srv.url;
    srv.stop.unwrap().send(()).unwrap();
    tokio::time::timeout(T, srv.task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let mut control = client::control(&srv.cfg, &srv.admin).unwrap();

    // A bad token.
    let err = testing::join(&srv.cfg, "lh_join_nope", "127.0.0.1:1").await.unwrap_err();
    let st = err.downcast_ref::<tonic::Status>().unwrap();
    assert_eq!(st.code(), Code::Unauthenticated);
    assert!(st.message().contains("not recognised"), "{st}");

    // An expired token.
    let t = control
        .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds: 1, uses: 1 })
        .await
        .unwrap()
        .into_inner()
        .token;
    srv.clock.advance(Duration::from_millis(1_100));
    let err = testing::join(&srv.cfg, &t, "127.0.0.1:1").await.unwrap_err();
    let st = err.downcast_ref::<tonic::Status>().unwrap();
    assert_eq!(st.code(), Code::Unauthenticated);
    assert!(st.message().contains("expired"), "{st}");

    // A token longer-lived than allowed.
    let st = control
        .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds: 365 * 86400, uses: 1 })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);

    // A wrong CA pin: the TLS handshake fails, naming the pin.
    let good = join_token(&mut control).await;
    let mut wrong = srv.cfg.clone();
    wrong.ca_pin = format!("sha256:{}", "0".repeat(64));
    let err = testing::join(&wrong, &good, "127.0.0.1:1").await.unwrap_err();
    let msg = format!("{err:?}");
    assert!(msg.contains("does not match the pin"), "{msg}");
    // A malformed pin is refused before connecting.
    wrong.ca_pin = "md5:abc".into();
    assert!(
        testing::join(&wrong, &good, "127.0.0.1:1")
            .await
            .unwrap_err()
            .to_string()
            .contains("sha256:")
    );

    // A missing or wrong admin credential.
    let mut plain =
        proto::pb::control_client::ControlClient::new(client::channel(&srv.cfg, None).unwrap());
    let st = plain.list_runs(pb::ListRunsRequest::default()).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    assert!(st.message().contains("admin credential"), "{st}");
    let mut bad_admin = client::control(&srv.cfg, "lh_admin_wrong").unwrap();
    let st = bad_admin.list_runs(pb::ListRunsRequest::default()).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);

    // An oversized message (the limit here is 1 MiB).
    let huge = "#".repeat(2 << 20);
    let st = control.submit_run(pb::SubmitRunRequest { run_toml: huge }).await.unwrap_err();
    assert!(matches!(st.code(), Code::OutOfRange | Code::ResourceExhausted), "{st:?}");
    // The server is fine afterwards.
    control.list_runs(pb::ListRunsRequest::default()).await.unwrap();

    // Malformed run files, over the wire: the error names the field.
    let manifest = testing::write_dataset(&dir.path().join("data"), 2).unwrap();
    let ok = testing::run_file(&manifest, 1, 1, 10);
    for (from, to, field) in [
        ("inner_steps = 50", "inner_steps = -1", "sync.inner_steps"),
        ("mode = \"diloco\"", "mode = \"gossip\"", "sync.mode"),
        ("lr = 3e-3", "lr = \"fast\"", "optimizer.lr"),
        ("vocab = 256", "vocab = 70000", "dataset.vocab"),
        ("[workers]", "[workerz]", "workerz"),
    ] {
        let st = control
            .submit_run(pb::SubmitRunRequest { run_toml: ok.replacen(from, to, 1) })
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(st.message().contains(field), "{field}: {st}");
    }
    let st =
        control.submit_run(pb::SubmitRunRequest { run_toml: "name = [".into() }).await.unwrap_err();
    assert!(st.message().contains("not valid TOML"), "{st}");
    let missing = ok.replace(&manifest.display().to_string(), "/nonexistent/manifest.json");
    let st = control.submit_run(pb::SubmitRunRequest { run_toml: missing }).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert!(st.message().contains("dataset.uri"), "{st}");

    // Agent calls need the worker's certificate, and it must be the worker's own.
    let mut anon =
        proto::pb::agent_client::AgentClient::new(client::channel(&srv.cfg, None).unwrap());
    let st = anon.lease_shard(pb::LeaseShardRequest {}).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st}");
    let (id, cert, key) = testing::join(&srv.cfg, &good, "127.0.0.1:2").await.unwrap();
    let mut impostor = client::agent_client(&srv.cfg, id + 1, &cert, &key).unwrap();
    let st = impostor.lease_shard(pb::LeaseShardRequest {}).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st}");
    // A bad CSR.
    let st = proto::pb::agent_client::AgentClient::new(client::channel(&srv.cfg, None).unwrap())
        .join(pb::JoinRequest {
            token: good.clone(),
            csr_pem: "garbage".into(),
            host: "h".into(),
            ring_addr: "127.0.0.1:3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    // A bad ring address.
    let err = testing::join(&srv.cfg, &good, "not-an-address").await.unwrap_err();
    assert!(err.to_string().contains("ring_addr"), "{err}");

    srv.stop.unwrap().send(()).unwrap();
    tokio::time::timeout(T, srv.task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let maddr = metrics.local_addr().unwrap();
    let config = ServerConfig::new(dir.path().to_owned());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::run(
        Listeners { api: listener, metrics: Some(metrics), shards: None, dashboard: None },
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for _ in 0..100 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(maddr).await {
                s.write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
                let mut body = String::new();
                s.read_to_string(&mut body).await.unwrap();
                return body;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("metrics endpoint down");
    };
    assert!(get("/healthz").await.contains("ok"));
    let m = get("/metrics").await;
    assert!(m.contains("longhaul_runs{state=\"running\"} 0"), "{m}");
    assert!(m.contains("longhaul_workers{liveness=\"alive\"} 0"), "{m}");
    assert!(m.contains("# TYPE longhaul_run_compute_utilisation_ratio gauge"), "{m}");
    stop.send(()).unwrap();
    tokio::time::timeout(T, task).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_over_https_with_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_with(dir.path(), true, server::Clock::manual()).await;
    let mut control = client::control(&srv.cfg, &srv.admin).unwrap();
    let manifest = testing::write_dataset(&dir.path().join("data"), 3).unwrap();
    let run = submit(&mut control, testing::run_file(&manifest, 1, 4, 1_000)).await;
    let token = join_token(&mut control).await;
    let mut a = ScriptedAgent::join(&srv.cfg, &token, "127.0.0.1:7001").await.unwrap();
    let _beat = a.keep_beating(Duration::from_millis(100));
    a.expect_epoch(1, T).await.unwrap();
    let lease = match a
        .rpc
        .lease_shard(pb::LeaseShardRequest {})
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
    {
        pb::lease_shard_response::Result::Lease(l) => l,
        other => panic!("no lease: {other:?}"),
    };
    assert!(
        lease.url.starts_with("https://") && lease.url.ends_with(&format!("/runs/{run}/shards/0")),
        "{}",
        lease.url
    );
    let me = Some((a.id, a.cert_pem.as_str(), a.key_pem.as_str()));

    // The worker with its issued certificate gets the bytes, which match the manifest's hash.
    let r = testing::https_get(&lease.url, &srv.cfg.ca_pin, me).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body.len() as u64, lease.size);
    assert_eq!(r.header("content-length"), Some(lease.size.to_string().as_str()));
    assert_eq!(r.header(coordinator::shard_server::SHA256_HEADER), Some(lease.sha256.as_str()));
    use sha2::Digest;
    assert_eq!(client::pki::hex(&sha2::Sha256::digest(&r.body)), lease.sha256);

    // No client certificate: refused in the TLS handshake.
    let err = testing::https_get(&lease.url, &srv.cfg.ca_pin, None).await.unwrap_err();
    assert!(!err.to_string().is_empty());

    // Unknown shard, unknown run: 404. Only manifest entries exist, so no path escapes.
    let base = lease.url.split("/runs/").next().unwrap().to_owned();
    for path in [format!("/runs/{run}/shards/3"), "/runs/999/shards/0".into()] {
        let r = testing::https_get(&format!("{base}{path}"), &srv.cfg.ca_pin, me).await.unwrap();
        assert_eq!(r.status, 404, "{path}");
    }
    let r = testing::https_get(
        &format!("{base}/runs/{run}/shards/..%2F..%2Fetc%2Fpasswd"),
        &srv.cfg.ca_pin,
        me,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);

    // A certificate used under another worker's id: 403.
    let other = Some((a.id + 1, a.cert_pem.as_str(), a.key_pem.as_str()));
    let r = testing::https_get(&lease.url, &srv.cfg.ca_pin, other).await.unwrap();
    assert_eq!(r.status, 403);
}

async fn lease(a: &mut ScriptedAgent) -> pb::ShardLease {
    match a.rpc.lease_shard(pb::LeaseShardRequest {}).await.unwrap().into_inner().result {
        Some(pb::lease_shard_response::Result::Lease(l)) => l,
        other => panic!("no lease: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_file_and_synthetic_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_with(dir.path(), true, server::Clock::manual()).await;
    let mut control = client::control(&srv.cfg, &srv.admin).unwrap();

    // Any local file is a one-shard text dataset, hashed at submission and served over HTTPS.
    let book = dir.path().join("book.txt");
    std::fs::write(&book, "It was the best of times, it was the worst of times.\n").unwrap();
    let synthetic = "format = \"synthetic-addition\"\ndigits = 3\n";
    let text = testing::synthetic_run_file(1, 1, 1_000).replacen(
        synthetic,
        &format!("format = \"text\"\nuri = \"file://{}\"\n", book.display()),
        1,
    );
    let run = submit(&mut control, text).await;
    let token = join_token(&mut control).await;
    let mut a = ScriptedAgent::join(&srv.cfg, &token, "127.0.0.1:7001").await.unwrap();
    let _beat = a.keep_beating(Duration::from_millis(100));
    a.expect_epoch(1, T).await.unwrap();
    let l = lease(&mut a).await;
    assert_eq!(l.run_id, run);
    assert!(l.uri.ends_with("/book.txt") && l.uri.starts_with("file:///"), "{}", l.uri);
    let (cert, key) = (a.cert_pem.clone(), a.key_pem.clone());
    let me = Some((a.id, cert.as_str(), key.as_str()));
    let r = testing::https_get(&l.url, &srv.cfg.ca_pin, me).await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.body, std::fs::read(&book).unwrap());
    use sha2::Digest;
    assert_eq!(client::pki::hex(&sha2::Sha256::digest(&r.body)), l.sha256);
    let base = l.url.split("/runs/").next().unwrap().to_owned();

    // Synthetic addition: virtual shards, no URL, nothing to serve.
    control.stop_run(pb::StopRunRequest { run_id: run, reason: String::new() }).await.unwrap();
    let run2 = submit(&mut control, testing::synthetic_run_file(1, 1, 1_000)).await;
    let e = a.expect_epoch(1, T).await.unwrap();
    assert_eq!(e.run_id, run2);
    let l = lease(&mut a).await;
    assert_eq!((l.run_id, l.uri.as_str()), (run2, "synthetic:addition/3/0"));
    assert_eq!((l.size, l.sha256.as_str(), l.url.as_str()), (4096, "", ""));
    let r = testing::https_get(&format!("{base}/runs/{run2}/shards/0"), &srv.cfg.ca_pin, me)
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert!(String::from_utf8_lossy(&r.body).contains("synthetic"));
    srv.stop.unwrap().send(()).unwrap();
    tokio::time::timeout(T, srv.task).await.unwrap().unwrap();
}

/// Liveness follows the coordinator's clock, not the machine's: a worker that falls silent is
/// suspected once `suspect_after` has passed on the clock and dead once `dead_after` has, and
/// while the clock stands still nothing changes, however slow the machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_is_suspected_then_dead_as_the_clock_says() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let mut control = client::control(&srv.cfg, &srv.admin).unwrap();
    let token = join_token(&mut control).await;
    let mut a = ScriptedAgent::join(&srv.cfg, &token, "127.0.0.1:7001").await.unwrap();
    a.heartbeat(1).await.unwrap();
    a.expect(T, |m| matches!(m, pb::coordinator_message::Msg::HeartbeatAck(_)).then_some(()))
        .await
        .unwrap();
    let id = a.id;
    let liveness = |control: client::Control| async move {
        let mut control = control;
        let page = control
            .list_workers(pb::ListWorkersRequest { after: 0, page_size: 0 })
            .await
            .unwrap()
            .into_inner();
        let w = page.workers.into_iter().find(|w| w.worker_id == id).unwrap();
        pb::Liveness::try_from(w.liveness).unwrap()
    };
    let until = |want: pb::Liveness| {
        let control = control.clone();
        async move {
            tokio::time::timeout(T, async {
                loop {
                    let now = liveness(control.clone()).await;
                    if now == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{id} never became {want:?}"));
        }
    };
    assert_eq!(liveness(control.clone()).await, pb::Liveness::Alive);
    // More real time than suspect_after passes (many ticks), the clock does not: still alive.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(liveness(control.clone()).await, pb::Liveness::Alive);
    // suspect_after is 600 ms, dead_after 1.5 s.
    srv.clock.advance(Duration::from_millis(700));
    until(pb::Liveness::Suspect).await;
    srv.clock.advance(Duration::from_millis(1_000));
    until(pb::Liveness::Dead).await;
    // A heartbeat brings it back.
    a.heartbeat(2).await.unwrap();
    until(pb::Liveness::Alive).await;
    drop(srv.stop);
    tokio::time::timeout(T, srv.task).await.unwrap().unwrap();
}

/// Commitments over real gRPC: a member that claims data under its own lease is summed; one that
/// claims data under a lease granted to another (its grant copied), or a forged grant, is left
/// out of the sync saying why, and banned for nothing; every claim and its verdict are in the
/// store once the plan is out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commitments_name_their_data_by_the_coordinators_grants() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path()).await;
    let mut control = client::control(&srv.cfg, &srv.admin).unwrap();
    let manifest = testing::write_dataset(&dir.path().join("data"), 6).unwrap();
    let run = submit(&mut control, testing::run_file(&manifest, 3, 3, 1_000_000)).await;
    let token = join_token(&mut control).await;
    let mut agents = Vec::new();
    for i in 0..3 {
        let a = ScriptedAgent::join(&srv.cfg, &token, &format!("127.0.0.1:{}", 7101 + i))
            .await
            .unwrap();
        agents.push(a);
    }
    let e = agents[0].expect_epoch(1, T).await.unwrap();
    for a in agents.iter_mut().skip(1) {
        a.expect_epoch(e.epoch, T).await.unwrap();
    }
    let rank = |id: u64| e.members.iter().position(|m| m.worker_id == id).unwrap();
    const H0: &str = "000000000000abcd";
    {
        let mut refs: Vec<&mut ScriptedAgent> = agents.iter_mut().collect();
        testing::agree(&mut refs, run, e.epoch, 0, H0, T).await.unwrap();
    }
    let own = lease(&mut agents[0]).await;
    let theirs = lease(&mut agents[1]).await;
    let span = |l: &pb::ShardLease, grant: &str| pb::DataSpan {
        lease_id: l.lease_id,
        shard: l.shard,
        data_epoch: l.data_epoch,
        from: 0,
        to: 10,
        grant: grant.into(),
        ..Default::default()
    };
    let commit = |spans: Vec<pb::DataSpan>| pb::SyncCommit {
        run_id: run,
        epoch: e.epoch,
        step: 50,
        segment_norms: vec![1.0; 3],
        start_hash: H0.into(),
        spans,
        samples: 10,
        contribution_sha256: "ab".repeat(32),
        contribution_norm: 3f32.sqrt(),
        ..Default::default()
    };
    // Agent 0 reads its own lease; agent 1 claims agent 0's lease with agent 0's grant (valid
    // for agent 0, not for it); agent 2 forges a grant for agent 1's lease.
    agents[0].send_commit(commit(vec![span(&own, &own.grant)])).await.unwrap();
    agents[1].send_commit(commit(vec![span(&own, &own.grant)])).await.unwrap();
    agents[2].send_commit(commit(vec![span(&theirs, &"0".repeat(32))])).await.unwrap();
    let p = agents[0].expect_plan(e.epoch, 50, T).await.unwrap();
    let (r0, r1, r2) = (rank(agents[0].id), rank(agents[1].id), rank(agents[2].id));
    assert_eq!(p.coefficients[r0], 1.0, "{p:?}");
    for r in [r1, r2] {
        assert_eq!(p.coefficients[r], 0.0, "{p:?}");
        assert!(p.excluded[r].contains("not granted to it"), "{p:?}");
    }
    // The sync is recorded; the samples of the accepted claim are credited as verified.
    for a in &agents {
        a.report(run, e.epoch, 50, "00000000deadbeef").await.unwrap();
    }
    tokio::time::timeout(T, async {
        loop {
            let r = control.get_run(pb::GetRunRequest { run_id: run }).await.unwrap().into_inner();
            if r.committed_step == 50 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the sync was recorded");
    // Nobody is banned for a claim.
    let workers = control
        .list_workers(pb::ListWorkersRequest { after: 0, page_size: 0 })
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert!(workers.iter().all(|w| w.banned_from.is_empty()), "{workers:?}");
    for w in &workers {
        let want = if w.worker_id == agents[0].id { 10 } else { 0 };
        assert_eq!(w.verified_samples, want, "{w:?}");
    }
    let honest = agents[0].id;
    drop(agents);
    drop(srv.stop);
    tokio::time::timeout(T, srv.task).await.unwrap().unwrap();
    // The claims and their verdicts were stored before the plan went out.
    let store = coordinator::store::Store::open(&dir.path().join("state.redb")).unwrap();
    let records = store.commitments(proto::RunId(run)).unwrap();
    assert_eq!(records.len(), 3, "{records:?}");
    let accepted: Vec<u64> = records
        .iter()
        .filter(|r| {
            matches!(r.verdict, coordinator::cluster::commitments::Verdict::Accepted { .. })
        })
        .map(|r| r.worker.0)
        .collect();
    assert_eq!(accepted, vec![honest]);
}

/// A request to a plain-HTTP listener: (status, headers and body as text).
async fn http(addr: std::net::SocketAddr, request: String) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

fn get(path: &str, auth: &str) -> String {
    let auth =
        if auth.is_empty() { String::new() } else { format!("Authorization: Bearer {auth}\r\n") };
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_reads_only_with_a_credential_and_a_viewer_token_expires() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dashboard = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let daddr = dashboard.local_addr().unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
    let mut config = ServerConfig::new(dir.path().to_owned());
    let clock = server::Clock::manual();
    config.clock = clock.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::run(
        Listeners { api: listener, metrics: None, shards: None, dashboard: Some(dashboard) },
        config,
        async move {
            let _ = stopped.await;
        },
    ));
    for _ in 0..100 {
        if dir.path().join("admin.token").exists() && dir.path().join("ca.pem").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cfg = testing::connect_config(&url, dir.path()).unwrap();
    let admin = testing::admin_token(dir.path()).unwrap();
    let mut control = client::control(&cfg, &admin).unwrap();
    let manifest = testing::write_dataset(&dir.path().join("data"), 2).unwrap();
    let run = submit(&mut control, testing::run_file(&manifest, 2, 4, 100)).await;

    // The page itself holds no data; every API path wants a credential.
    let (status, page) = http(daddr, get("/", "")).await;
    assert_eq!(status, 200);
    assert!(page.contains("content-security-policy: default-src 'none'"), "{page}");
    for path in ["/api/runs".to_owned(), format!("/api/runs/{run}"), "/api/workers".to_owned()] {
        let (status, body) = http(daddr, get(&path, "")).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(!body.contains("committed_step"), "{path}: {body}");
    }
    // The admin credential reads; a missing run is named.
    let (status, body) = http(daddr, get(&format!("/api/runs/{run}"), &admin)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"committed_step\":0"), "{body}");
    let (status, body) = http(daddr, get("/api/runs/999", &admin)).await;
    assert_eq!((status, body.contains("no run 999")), (404, true), "{body}");
    let (status, _) = http(daddr, get("/api/runs/x", &admin)).await;
    assert_eq!(status, 400);

    // A viewer token reads the dashboard but is no credential for the control API.
    let viewer = control
        .create_viewer_token(pb::CreateViewerTokenRequest { ttl_seconds: 60 })
        .await
        .unwrap()
        .into_inner();
    let (status, body) = http(daddr, get("/api/runs", &viewer.token)).await;
    assert_eq!(status, 200, "{body}");
    let mut as_viewer = client::control(&cfg, &viewer.token).unwrap();
    let st = as_viewer.list_runs(pb::ListRunsRequest::default()).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st}");
    // Tampered with (a later expiry under the same MAC), it is refused.
    let (prefix, mac) = viewer.token.rsplit_once('_').unwrap();
    let (head, expires) = prefix.rsplit_once('_').unwrap();
    let later = format!("{head}_{}_{mac}", expires.parse::<u64>().unwrap() + 3_600_000);
    assert_eq!(http(daddr, get("/api/runs", &later)).await.0, 401);
    // A login sets an HttpOnly, SameSite=Strict cookie that reads like the header.
    let login = format!(
        "POST /api/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
        viewer.token.len(),
        viewer.token
    );
    let (status, text) = http(daddr, login).await;
    assert_eq!(status, 200, "{text}");
    let cookie = text
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie: {text}"));
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let session = cookie.split(';').next().unwrap();
    let with_cookie = format!(
        "GET /api/runs HTTP/1.1\r\nHost: x\r\nCookie: {session}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(http(daddr, with_cookie.clone()).await.0, 200);
    // The admin credential signs in too, but its session cookie is a viewer token: the
    // credential itself never goes into a cookie.
    let login = format!(
        "POST /api/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
        admin.len(),
        admin
    );
    let (status, text) = http(daddr, login).await;
    assert_eq!(status, 200, "{text}");
    let admin_cookie = text.lines().find_map(|l| l.strip_prefix("set-cookie: ")).unwrap();
    assert!(admin_cookie.starts_with("lh_session=lh_view_"), "{admin_cookie}");
    assert!(!admin_cookie.contains(&admin), "the admin credential went into a cookie");
    // A browser's POST from another origin is refused.
    let cross = format!(
        "POST /api/login HTTP/1.1\r\nHost: {daddr}\r\nOrigin: http://127.0.0.1:1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
        viewer.token.len(),
        viewer.token
    );
    assert_eq!(http(daddr, cross).await.0, 403);
    // A body larger than a credential is refused before it is read.
    let big = "a".repeat(64 * 1024);
    let login = format!(
        "POST /api/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{big}",
        big.len()
    );
    assert_eq!(http(daddr, login).await.0, 413);

    // Expired: header and cookie alike get 401; the admin credential still reads.
    clock.advance(Duration::from_secs(61));
    assert_eq!(http(daddr, get("/api/runs", &viewer.token)).await.0, 401);
    assert_eq!(http(daddr, with_cookie).await.0, 401);
    assert_eq!(http(daddr, get("/api/runs", &admin)).await.0, 200);
    // Longer than the maximum lifetime: refused, and named.
    let st = control
        .create_viewer_token(pb::CreateViewerTokenRequest { ttl_seconds: 365 * 86400 })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st}");

    stop.send(()).unwrap();
    tokio::time::timeout(T, task).await.unwrap().unwrap().unwrap();
}
