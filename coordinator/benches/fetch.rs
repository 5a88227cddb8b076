//! `longhaul checkpoint fetch` through a real coordinator on 127.0.0.1: a holder (a scripted
//! worker with its own certificate and session) streams a checkpoint of `MIB` MiB (default 256)
//! in 1 MiB parts, the coordinator checks and relays it, and the CLI's own code
//! (`coordinator::fetch::fetch`) writes it into a directory. Prints the throughput and how much
//! this process's resident memory grew (the holder generates its parts on the fly and the CLI
//! writes them to disk, so the growth is what the relay holds).
//!
//! `cargo bench -p coordinator --bench fetch [-- MIB]`

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use coordinator::server::ServerConfig;
use coordinator::testing::{self, ScriptedAgent};
use proto::pb;
use sha2::{Digest, Sha256};

const PART: usize = 1 << 20;

/// Part `i` of the model: deterministic bytes.
fn part(i: usize) -> Vec<u8> {
    let mut h = Sha256::digest(i.to_le_bytes()).to_vec();
    h.resize(PART, (i % 251) as u8);
    h
}

/// The resident set's high-water mark of this process, in KiB (Linux).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let mib: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(bench(mib))
}

async fn bench(mib: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::new(dir.path().to_owned());
    config.cluster.suspect_after = 60_000;
    config.cluster.dead_after = 120_000;
    let server = testing::InProcess::start(config).await?;
    let (cfg, mut control) = (server.cfg.clone(), server.control.clone());
    let run = control
        .submit_run(pb::SubmitRunRequest { run_toml: testing::synthetic_run_file(1, 1, 1_000) })
        .await?
        .into_inner()
        .run_id;
    let token = control
        .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds: 600, uses: 1 })
        .await?
        .into_inner()
        .token;
    let mut a = ScriptedAgent::join(&cfg, &token, "127.0.0.1:7300").await?;
    let _beat = a.keep_beating(Duration::from_millis(500));
    let e = a.expect_epoch(1, Duration::from_secs(10)).await?;
    let hash = "000000000000abcd";
    testing::agree(&mut [&mut a], run, e.epoch, 0, hash, Duration::from_secs(10)).await?;
    testing::sync(&mut [&mut a], run, e.epoch, 50, hash, Duration::from_secs(10)).await?;
    // The holder's copy: meta.json and a model of `mib` parts (digested once, up front).
    let mut h = Sha256::new();
    for i in 0..mib {
        h.update(part(i));
    }
    let model_sha = client::pki::hex(&h.finalize());
    let meta = serde_json::to_vec(&serde_json::json!({
        "format": 1, "run": run, "step": 50, "param_hash": hash,
        "files": { "model.safetensors": model_sha },
    }))?;
    a.send(pb::agent_message::Msg::CheckpointDone(pb::CheckpointDone {
        run_id: run,
        step: 50,
        uri: "file:///bench".into(),
        sha256: client::pki::hex(&Sha256::digest(&meta)),
        model_sha256: model_sha,
        ..Default::default()
    }))
    .await?;
    loop {
        let r = control.get_run(pb::GetRunRequest { run_id: run }).await?.into_inner();
        if !r.latest_checkpoint.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let before = peak_rss_kib();
    let to = dir.path().join("home/model");
    let started = Instant::now();
    let client = {
        let (mut control, to) = (control.clone(), to.clone());
        tokio::spawn(async move {
            coordinator::fetch::fetch(&mut control, proto::RunId(run), None, &to).await
        })
    };
    let req = a
        .expect(Duration::from_secs(10), |m| match m {
            pb::coordinator_message::Msg::Upload(u) => Some(u.clone()),
            _ => None,
        })
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let producer = tokio::spawn(async move {
        let first = pb::CheckpointPart {
            transfer_id: req.transfer_id,
            file: "meta.json".into(),
            data: meta,
            error: String::new(),
        };
        if tx.send(first).await.is_err() {
            return;
        }
        for i in 0..mib {
            let p = pb::CheckpointPart {
                transfer_id: req.transfer_id,
                file: "model.safetensors".into(),
                data: part(i),
                error: String::new(),
            };
            if tx.send(p).await.is_err() {
                return;
            }
        }
    });
    let mut rpc = a.rpc.clone();
    let mut verdicts =
        rpc.upload_checkpoint(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let verdict = verdicts.message().await?.context("no verdict")?;
    anyhow::ensure!(verdict.error.is_empty(), "refused: {}", verdict.error);
    let fetched = client.await??;
    let took = started.elapsed();
    producer.await?;
    let after = peak_rss_kib();
    let size = std::fs::metadata(to.join("model.safetensors"))?.len();
    anyhow::ensure!(size == (mib * PART) as u64, "wrote {size} bytes");
    println!(
        "checkpoint fetch, {mib} MiB through the coordinator on loopback (TLS both legs, every byte \
         hashed by the relay and by the CLI, written and fsynced): {:.2} s, {:.0} MiB/s; \
         peak RSS of this process (holder, coordinator, CLI) grew {:.1} MiB; from worker-{}",
        took.as_secs_f64(),
        mib as f64 / took.as_secs_f64(),
        (after.saturating_sub(before)) as f64 / 1024.0,
        fetched.worker,
    );
    server.stop().await;
    Ok(())
}
