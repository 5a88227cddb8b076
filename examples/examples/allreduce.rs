//! The all-reduce quickstart: four ranks on this machine, joined by emulated transatlantic
//! links (100 ms RTT, 1 Gbit/s, 0.01 % loss), all-reduce a sweep of buffer sizes over the QUIC
//! ring and print an nccl-tests-style table, first uncompressed, then with int8 compression.
//!
//! ```text
//! cargo run --release -p examples --example allreduce [PRESET]
//! ```

use std::time::Duration;

use anyhow::{Context, Result};
use benches::perf::{self, DTypeArg, Sweep};
use collectives::testing::LocalRing;
use collectives::{Compression, Emulation, LinkPreset, NetConfig};

fn main() -> Result<()> {
    let preset: LinkPreset =
        std::env::args().nth(1).as_deref().unwrap_or("transatlantic").parse()?;
    let condition = preset.condition();
    let world = 4;
    // Windows sized for the emulated path; everything else at its documented default.
    let net = NetConfig {
        rtt: condition.rtt().max(Duration::from_millis(1)),
        link_rate_bps: condition.rate_bps.unwrap_or(10_000_000_000),
        ..NetConfig::default()
    };
    println!(
        "# {world} ranks on loopback, each sending through an emulated {preset} link ({:?} RTT, {} Mbit/s, {:.2} % loss)",
        condition.rtt(),
        condition.rate_bps.unwrap_or(0) / 1_000_000,
        condition.loss.mean_loss() * 100.0
    );
    for compression in [Compression::None, Compression::Int8] {
        let sweep = Sweep {
            min_bytes: 1 << 20,
            max_bytes: 64 << 20,
            factor: 4,
            iters: 3,
            warmup: 1,
            dtype: DTypeArg::F32,
            compression,
            average: false,
        };
        // One thread and runtime per rank, as if each were its own machine.
        let parts = LocalRing::build(
            world,
            1,
            &net,
            Some(Emulation { condition: condition.clone(), seed: 7 }),
        )?;
        let ranks: Vec<_> = parts
            .into_iter()
            .map(|p| {
                let sweep = sweep.clone();
                std::thread::spawn(move || -> Result<Vec<perf::Row>> {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let mut group = p.join().await?;
                        let rows = perf::run(&mut group, &sweep).await?;
                        group.close().await;
                        Ok(rows)
                    })
                })
            })
            .collect();
        let mut tables = Vec::new();
        for r in ranks {
            tables.push(r.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??);
        }
        let rows = tables.first().context("no ranks")?;
        println!("{}", perf::table_header());
        for row in rows {
            println!("{}", perf::table_row(&sweep, row));
        }
    }
    println!(
        "# busbw = algbw * 2(N-1)/N: the per-rank link throughput; compare it with the link rate."
    );
    println!("# More: target/release/allreduce-perf --help");
    Ok(())
}
