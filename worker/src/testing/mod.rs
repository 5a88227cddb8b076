//! Small specs and loopback rings for tests, benches and examples, and a whole cluster of
//! processes ([`cluster`]).

pub mod cluster;

use std::thread;

use collectives::group::Emulation;
use collectives::testing::LocalRing;
use collectives::{Compression, NetConfig};
use tch::Device;

use crate::comm::RingComm;
use crate::schedule::{Decay, LrSchedule};
use crate::trainer::model::{Arch, Input, ModelConfig};
use crate::trainer::optim::{OptimConfig, OptimKind};
use crate::trainer::{ModelSource, SyncMode, TrainSpec};

/// A small gpt on the synthetic addition task with `digits` digits.
pub fn gpt_spec(sync: SyncMode, compression: Compression, digits: u32, steps: u64) -> TrainSpec {
    let seq_len = 3 * digits as usize + 3;
    TrainSpec {
        model: ModelSource::Builtin(ModelConfig {
            arch: Arch::Gpt,
            layers: 2,
            width: 64,
            heads: 4,
            context: seq_len as i64,
            outputs: crate::trainer::data::ADDITION_VOCAB,
            input: Input::Tokens { vocab: crate::trainer::data::ADDITION_VOCAB },
        }),
        optim: OptimConfig {
            kind: OptimKind::AdamW,
            weight_decay: 0.01,
            betas: (0.9, 0.98),
            eps: 1e-8,
            momentum: 0.9,
        },
        schedule: LrSchedule {
            decay: Decay::Cosine,
            peak: 3e-3,
            floor: 3e-4,
            warmup: 20,
            total: steps,
        },
        grad_clip: 1.0,
        seed: 7,
        batch_size: 32,
        seq_len,
        sync,
        compression,
        device: Device::Cpu,
        bucket_elems: 1 << 20,
    }
}

/// A ring of `world` members on loopback, formed on `rt`.
pub fn ring(
    rt: &tokio::runtime::Runtime,
    world: usize,
    emulation: Option<Emulation>,
) -> anyhow::Result<Vec<RingComm>> {
    let parts = LocalRing::build(world, 1, &NetConfig::default(), emulation)?;
    let joins: Vec<_> = parts.into_iter().map(|p| rt.spawn(p.join())).collect();
    let mut out = Vec::new();
    for j in joins {
        out.push(RingComm::new(rt.block_on(j)??, rt.handle().clone()));
    }
    Ok(out)
}

/// Runs `f(rank, item)` on one OS thread per item and collects the results in rank order.
pub fn per_rank<T: Send, R: Send>(items: Vec<T>, f: impl Fn(usize, T) -> R + Sync) -> Vec<R> {
    let f = &f;
    thread::scope(|s| {
        let handles: Vec<_> =
            items.into_iter().enumerate().map(|(r, t)| s.spawn(move || f(r, t))).collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}
