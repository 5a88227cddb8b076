//! The coordinator under N simulated workers (default 1,000) on this machine: a real coordinator
//! on 127.0.0.1, every worker with its own TLS connection, certificate and session.
//!
//! Phases, each `SECONDS` long (default 5):
//! 1. join: how long N workers take to join and hear their first epoch;
//! 2. steady: every worker heartbeats once a second and leases (then completes) a shard every
//!    two seconds, as real workers do, all at once: the latency each sees (p50, p99);
//! 3. saturation: every worker heartbeats in a closed loop (each waits for its ack), then leases
//!    and completes in a closed loop: throughput.
//!
//! `cargo bench -p coordinator --bench rpc [-- WORKERS SECONDS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use coordinator::server::ServerConfig;
use coordinator::testing::{self, ScriptedAgent};
use hdrhistogram::Histogram;
use proto::pb;
use tokio::sync::Mutex;

fn report(name: &str, h: &Histogram<u64>, secs: f64) {
    println!(
        "{name:<22} {:>8} calls {:>9.0} /s   p50 {:>8.2} ms   p99 {:>8.2} ms   max {:>8.2} ms",
        h.len(),
        h.len() as f64 / secs,
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let workers: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(bench(workers, secs))
}

type Agents = Vec<Arc<Mutex<ScriptedAgent>>>;

async fn heartbeat(a: &mut ScriptedAgent, seq: u64) -> Result<Duration> {
    let t = Instant::now();
    a.heartbeat(seq).await?;
    a.expect(Duration::from_secs(60), |m| match m {
        pb::coordinator_message::Msg::HeartbeatAck(x) if x.seq == seq => Some(()),
        _ => None,
    })
    .await?;
    Ok(t.elapsed())
}

/// Leases a shard and completes it; the lease's latency.
async fn lease(a: &mut ScriptedAgent) -> Result<(Duration, Option<Duration>)> {
    let t = Instant::now();
    let r = a.rpc.lease_shard(pb::LeaseShardRequest {}).await?.into_inner();
    let leased = t.elapsed();
    let mut done = None;
    if let Some(pb::lease_shard_response::Result::Lease(l)) = r.result
        && !l.shared
    {
        let t = Instant::now();
        a.rpc.complete_shard(pb::CompleteShardRequest { lease_id: l.lease_id, samples: 1 }).await?;
        done = Some(t.elapsed());
    }
    Ok((leased, done))
}

async fn bench(n: usize, secs: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = ServerConfig::new(dir.path().to_owned());
    config.cluster.suspect_after = 60_000;
    config.cluster.dead_after = 120_000;
    config.max_connections = n + 100;
    let server = testing::InProcess::start(config).await?;
    let (cfg, mut control) = (server.cfg.clone(), server.control.clone());
    let manifest = testing::write_dataset(&dir.path().join("data"), 20_000)?;
    control
        .submit_run(pb::SubmitRunRequest {
            run_toml: testing::run_file(&manifest, 1, n as u32, 1 << 40),
        })
        .await?;
    let token = control
        .create_join_token(pb::CreateJoinTokenRequest { ttl_seconds: 3600, uses: n as u32 })
        .await?
        .into_inner()
        .token;
    let cores = std::thread::available_parallelism().map(|p| p.get()).unwrap_or(1);
    println!(
        "coordinator on {}; {n} workers (each: CSR, Join, own TLS connection, session); \
         {cores} cores, client and server in one process",
        cfg.url
    );

    // 1. Join.
    let t = Instant::now();
    let mut agents = Vec::with_capacity(n);
    let mut joins = tokio::task::JoinSet::new();
    for i in 0..n {
        let (cfg, token) = (cfg.clone(), token.clone());
        joins.spawn(async move {
            ScriptedAgent::join(&cfg, &token, &format!("127.0.0.1:{}", 10_000 + i)).await
        });
        if joins.len() >= 32
            && let Some(r) = joins.join_next().await
        {
            agents.push(r??);
        }
    }
    while let Some(r) = joins.join_next().await {
        agents.push(r??);
    }
    let joined = t.elapsed();
    for a in &mut agents {
        a.expect_epoch(1, Duration::from_secs(120)).await?;
    }
    let in_epoch = t.elapsed();
    let epoch = control.get_run(pb::GetRunRequest { run_id: 1 }).await?.into_inner().epoch;
    println!(
        "join: {n} joined in {:.2} s ({:.0} joins/s); all in an epoch after {:.2} s ({epoch} epochs \
         formed)",
        joined.as_secs_f64(),
        n as f64 / joined.as_secs_f64(),
        in_epoch.as_secs_f64()
    );
    let dur = Duration::from_secs(secs);
    let agents: Agents = agents.into_iter().map(|a| Arc::new(Mutex::new(a))).collect();

    // 2. Steady load: a heartbeat a second and a lease every two seconds per worker.
    let mut set = tokio::task::JoinSet::new();
    for (i, a) in agents.iter().enumerate() {
        let a = a.clone();
        set.spawn(async move {
            let mut hb = Histogram::<u64>::new(3).expect("valid sigfigs");
            let mut ls = Histogram::<u64>::new(3).expect("valid sigfigs");
            let mut a = a.lock().await;
            // Spread the workers over the second.
            tokio::time::sleep(Duration::from_micros(
                (i as u64 * 1_000_000 / n as u64) % 1_000_000,
            ))
            .await;
            let end = Instant::now() + dur;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut seq = 1_000_000;
            while Instant::now() < end {
                tick.tick().await;
                seq += 1;
                hb.record(heartbeat(&mut a, seq).await?.as_micros() as u64).ok();
                if seq % 2 == 0 {
                    ls.record(lease(&mut a).await?.0.as_micros() as u64).ok();
                }
            }
            anyhow::Ok((hb, ls))
        });
    }
    let (mut hb, mut ls) = (Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?);
    let t = Instant::now();
    while let Some(r) = set.join_next().await {
        let (h, l) = r??;
        hb.add(h)?;
        ls.add(l)?;
    }
    let steady = t.elapsed().as_secs_f64();
    println!("steady ({n} workers: a heartbeat a second, a lease every two, {secs} s):");
    report("  heartbeat", &hb, steady);
    report("  lease", &ls, steady);

    // 3. Saturation: closed loops.
    let mut set = tokio::task::JoinSet::new();
    for a in &agents {
        let a = a.clone();
        set.spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("valid sigfigs");
            let mut a = a.lock().await;
            let end = Instant::now() + dur;
            let mut seq = 0;
            while Instant::now() < end {
                seq += 1;
                h.record(heartbeat(&mut a, seq).await?.as_micros() as u64).ok();
            }
            anyhow::Ok(h)
        });
    }
    let mut hb = Histogram::<u64>::new(3)?;
    let t = Instant::now();
    while let Some(r) = set.join_next().await {
        hb.add(r??)?;
    }
    let hb_secs = t.elapsed().as_secs_f64();
    let mut set = tokio::task::JoinSet::new();
    for a in &agents {
        let a = a.clone();
        set.spawn(async move {
            let mut lease_h = Histogram::<u64>::new(3).expect("valid sigfigs");
            let mut done_h = Histogram::<u64>::new(3).expect("valid sigfigs");
            let mut a = a.lock().await;
            let end = Instant::now() + dur;
            while Instant::now() < end {
                let (l, d) = lease(&mut a).await?;
                lease_h.record(l.as_micros() as u64).ok();
                if let Some(d) = d {
                    done_h.record(d.as_micros() as u64).ok();
                }
            }
            anyhow::Ok((lease_h, done_h))
        });
    }
    let mut lease_all = Histogram::<u64>::new(3)?;
    let mut done = Histogram::<u64>::new(3)?;
    let t = Instant::now();
    while let Some(r) = set.join_next().await {
        let (l, d) = r??;
        lease_all.add(l)?;
        done.add(d)?;
    }
    let lease_secs = t.elapsed().as_secs_f64();
    println!("saturation ({n} workers in closed loops, {secs} s per phase):");
    report("  heartbeat", &hb, hb_secs);
    report("  lease", &lease_all, lease_secs);
    report("  complete", &done, lease_secs);
    server.stop().await;
    Ok(())
}
