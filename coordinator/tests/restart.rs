#![allow(clippy::unwrap_used)]
//! The real `longhaul serve` binary, SIGKILLed mid-run and restarted: state intact, agents
//! reconnect. Also drives the CLI (`init`, `token create`, `status --output json`, `stop`,
//! `submit --follow`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use coordinator::testing::{self, ScriptedAgent};
use proto::pb;

const BIN: &str = env!("CARGO_BIN_EXE_longhaul");
const T: Duration = Duration::from_secs(15);

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    client::pki::hex(&sha2::Sha256::digest(b))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn serve(home: &Path, port: u16) -> Child {
    Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(["--suspect-after-ms", "1000", "--dead-after-ms", "3000", "--readmit-after-ms", "0"])
        .env("LONGHAUL_HOME", home)
        .env("LONGHAUL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn wait_up(port: u16) {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("coordinator did not come up on {port}");
}

fn cli(home: &Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("LONGHAUL_HOME", home)
        .env("LONGHAUL_COORDINATOR", url)
        .output()
        .unwrap()
}

/// Reconnects with exponential backoff, as a worker does.
async fn reconnect(cfg: &client::ConnectConfig, a: &ScriptedAgent, addr: &str) -> ScriptedAgent {
    let mut delay = Duration::from_millis(50);
    for _ in 0..30 {
        // The session call succeeds only once the server answered (the channel connects then).
        if let Ok(n) =
            ScriptedAgent::connect(cfg, a.id, a.cert_pem.clone(), a.key_pem.clone(), addr).await
            && n.heartbeat(1).await.is_ok()
        {
            return n;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    panic!("worker {} could not reconnect", a.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_mid_run_keeps_every_run_epoch_step_and_lease() {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let mut server = serve(home.path(), port);
    wait_up(port).await;
    // The port can accept before the CA and the admin credential are on disk.
    let mut cfg = testing::connect_config(&url, home.path());
    for _ in 0..200 {
        if cfg.is_ok() && testing::admin_token(home.path()).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        cfg = testing::connect_config(&url, home.path());
    }
    let cfg = cfg.unwrap();

    // The CLI: init writes a file that validates; token create; ca-hash.
    let runfile = home.path().join("run.toml");
    let out = cli(home.path(), &url, &["init", runfile.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = cli(home.path(), &url, &["ca-hash"]);
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), cfg.ca_pin);
    let out = cli(home.path(), &url, &["token", "create", "--ttl", "10m", "--uses", "2"]);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("lh_join_"));

    let manifest = testing::write_dataset(&home.path().join("data"), 8).unwrap();
    std::fs::write(&runfile, testing::run_file(&manifest, 2, 2, 1_000_000)).unwrap();
    let out = cli(home.path(), &url, &["submit", runfile.to_str().unwrap(), "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = v["run_id"].as_u64().unwrap();

    let mut a = ScriptedAgent::join(&cfg, &token, "127.0.0.1:7101").await.unwrap();
    let mut b = ScriptedAgent::join(&cfg, &token, "127.0.0.1:7102").await.unwrap();
    let ha = a.keep_beating(Duration::from_millis(200));
    let hb = b.keep_beating(Duration::from_millis(200));
    let e1 = a.expect_epoch(1, T).await.unwrap();
    b.expect_epoch(e1.epoch, T).await.unwrap();
    const HASH: &str = "0123456789abcdef";
    testing::agree(&mut [&mut a, &mut b], run, e1.epoch, 0, "000000000000abcd", T).await.unwrap();
    testing::sync(&mut [&mut a, &mut b], run, e1.epoch, 50, HASH, T).await.unwrap();
    // Both members checkpoint step 50 with the same model: verified, and durable.
    let model = b"model of step 50".to_vec();
    let meta = serde_json::to_vec(&serde_json::json!({
        "format": 1, "run": run, "step": 50, "param_hash": HASH,
        "files": { "model.safetensors": sha256(&model) },
    }))
    .unwrap();
    for x in [&a, &b] {
        x.send(pb::agent_message::Msg::CheckpointDone(pb::CheckpointDone {
            run_id: run,
            step: 50,
            uri: "file:///ckpt".into(),
            sha256: sha256(&meta),
            model_sha256: sha256(&model),
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    let held = match a
        .rpc
        .lease_shard(pb::LeaseShardRequest {})
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
    {
        pb::lease_shard_response::Result::Lease(l) => l,
        other => panic!("{other:?}"),
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // SIGKILL, then restart on the same port and state directory.
    server.kill().unwrap();
    server.wait().unwrap();
    ha.abort();
    hb.abort();
    let mut server = serve(home.path(), port);
    wait_up(port).await;

    let mut a = reconnect(&cfg, &a, "127.0.0.1:7101").await;
    let mut b = reconnect(&cfg, &b, "127.0.0.1:7102").await;
    let ha = a.keep_beating(Duration::from_millis(200));
    let hb = b.keep_beating(Duration::from_millis(200));
    // A new epoch (what the old one did in memory is gone) with both members and the record.
    let again = a.expect_epoch(e1.epoch + 1, T).await.unwrap();
    assert_eq!(again.members.len(), 2);
    assert_eq!(again.committed_step, 50);
    assert_eq!(again.committed_hash, HASH, "the recorded hash is durable");

    let out = cli(home.path(), &url, &["status", &run.to_string(), "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["epoch"], again.epoch);
    assert_eq!(v["committed_step"], 50);
    assert_eq!(v["committed_hash"], HASH);
    assert!(v["latest_checkpoint"].as_str().unwrap().contains("(2 of 2 members)"), "{v}");
    b.expect_epoch(again.epoch, T).await.unwrap();
    testing::agree(&mut [&mut a, &mut b], run, again.epoch, 50, HASH, T).await.unwrap();

    // The checkpoint index survived the restart: `checkpoint fetch` asks a holder, which
    // answers, and the copy lands in the directory only once it verified.
    let to = home.path().join("fetched");
    let fetch = {
        let (home, url, to) = (home.path().to_owned(), url.clone(), to.clone());
        tokio::task::spawn_blocking(move || {
            cli(
                &home,
                &url,
                &["checkpoint", "fetch", &run.to_string(), "--to", to.to_str().unwrap()],
            )
        })
    };
    let wanted = |m: &pb::coordinator_message::Msg| match m {
        pb::coordinator_message::Msg::Upload(u) => Some(u.clone()),
        _ => None,
    };
    let (asked, req) = tokio::select! {
        r = a.expect(T, wanted) => (&a, r.unwrap()),
        r = b.expect(T, wanted) => (&b, r.unwrap()),
    };
    assert_eq!((req.run_id, req.step), (run, 50));
    let parts =
        [("meta.json", meta.clone()), ("model.safetensors", model.clone())].map(|(f, d)| {
            pb::CheckpointPart {
                transfer_id: req.transfer_id,
                file: f.into(),
                data: d,
                error: String::new(),
            }
        });
    let mut rpc = asked.rpc.clone();
    let mut verdict = rpc.upload_checkpoint(tokio_stream::iter(parts)).await.unwrap().into_inner();
    assert_eq!(verdict.message().await.unwrap().unwrap().error, "");
    let out = fetch.await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(to.join("model.safetensors")).unwrap(), model);
    assert_eq!(std::fs::read(to.join("meta.json")).unwrap(), meta);

    // The lease survived: the held shard is not handed out again, and it can be completed.
    let next = match b
        .rpc
        .lease_shard(pb::LeaseShardRequest {})
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap()
    {
        pb::lease_shard_response::Result::Lease(l) => l,
        other => panic!("{other:?}"),
    };
    assert_ne!(next.shard, held.shard);
    assert!(next.lease_id > held.lease_id, "lease ids are never reused");
    a.rpc
        .complete_shard(pb::CompleteShardRequest { lease_id: held.lease_id, samples: 1 })
        .await
        .unwrap();

    // A stale report is ignored; progress continues by quorum; a death makes a newer epoch.
    a.report(run, e1.epoch, 100, "00000000000000ff").await.unwrap();
    testing::sync(&mut [&mut a, &mut b], run, again.epoch, 100, "0000000000000100", T)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    hb.abort();
    drop(b);
    let e2 = a.expect_epoch(e1.epoch + 1, Duration::from_secs(5)).await;
    // min_workers = 2: with one left, the run waits (no epoch); check the store said so.
    let out = cli(home.path(), &url, &["status", &run.to_string(), "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["committed_step"], 100);
    assert!(e2.is_err() || e2.unwrap().epoch > again.epoch);
    assert!(
        v["message"].as_str().unwrap().contains("died")
            || v["message"].as_str().unwrap().contains("waiting"),
        "{v}"
    );

    // stop via the CLI; then submit --follow a short run that a single worker completes.
    let out = cli(home.path(), &url, &["stop", &run.to_string()]);
    assert!(out.status.success(), "{out:?}");
    let short = home.path().join("short.toml");
    std::fs::write(&short, testing::run_file(&manifest, 1, 1, 3)).unwrap();
    let follow = Command::new(BIN)
        .args(["submit", short.to_str().unwrap(), "--follow"])
        .env("LONGHAUL_HOME", home.path())
        .env("LONGHAUL_COORDINATOR", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let e = a
        .expect(T, |m| match m {
            pb::coordinator_message::Msg::Epoch(e) if e.run_id != run => Some(e.clone()),
            _ => None,
        })
        .await
        .unwrap();
    testing::agree(&mut [&mut a], e.run_id, e.epoch, 0, "000000000000abcd", T).await.unwrap();
    testing::sync(&mut [&mut a], e.run_id, e.epoch, 3, "0000000000000003", T).await.unwrap();
    let status =
        tokio::task::spawn_blocking(move || follow.wait_with_output().unwrap()).await.unwrap();
    assert!(status.status.success(), "--follow exits 0 on completion: {status:?}");
    assert!(String::from_utf8_lossy(&status.stderr).contains("completed"));
    // Its stdout is not a terminal: plain progress lines, the last one at the run's end.
    let out = String::from_utf8_lossy(&status.stdout);
    let last = out.lines().rfind(|l| l.starts_with("run ")).unwrap_or_default();
    assert!(last.contains("step 3/3") && last.ends_with("completed"), "{out}");
    ha.abort();
    server.kill().unwrap();
    server.wait().unwrap();
}
