//! Tokens per second of the built-in `gpt` training on this machine (forward, backward, AdamW),
//! to compare with `worker/peers/gpt_eager.py` (the same model and batch in PyTorch eager).
//!
//! `cargo bench -p worker --bench gpt -- [layers width heads seq batch steps]`
//! (default `4 256 4 128 16 20`).

use std::time::Instant;

use collectives::Compression;
use rand::SeedableRng;
use tch::Device;
use worker::comm::{Solo, SoloPlan};
use worker::testing::gpt_spec;
use worker::trainer::data::{ShardData, ShardReader};
use worker::trainer::model::{Arch, Input, ModelConfig};
use worker::trainer::{ModelSource, SyncMode, Trainer};

fn main() -> anyhow::Result<()> {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let get = |i: usize, d: i64| args.get(i).copied().unwrap_or(d);
    let (layers, width, heads, seq, batch, steps) =
        (get(0, 4), get(1, 256), get(2, 4), get(3, 128), get(4, 16), get(5, 20));
    let vocab = 256;
    let device = Device::cuda_if_available();
    let mut spec = gpt_spec(SyncMode::Ddp, Compression::None, 2, steps as u64);
    spec.model = ModelSource::Builtin(ModelConfig {
        arch: Arch::Gpt,
        layers,
        width,
        heads,
        context: seq,
        outputs: vocab,
        input: Input::Tokens { vocab },
    });
    spec.seq_len = seq as usize;
    spec.batch_size = batch as usize;
    spec.device = device;
    let mut tr = Trainer::new(spec)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let tokens: Vec<i64> = (0..(seq * batch * (steps + 3) + 1))
        .map(|_| rand::Rng::random_range(&mut rng, 0..vocab))
        .collect();
    let mut reader = ShardReader::new(ShardData::Tokens { tokens, vocab }, seq as usize, 1);
    // Warm up: allocator, kernels.
    for _ in 0..3 {
        let b = reader.next_batch(batch as usize).ok_or_else(|| anyhow::anyhow!("no data"))?;
        tr.forward_backward(&b)?;
        tr.ddp_sync(&mut Solo, &mut SoloPlan)?;
    }
    let t = Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        let b = reader.next_batch(batch as usize).ok_or_else(|| anyhow::anyhow!("no data"))?;
        loss = tr.forward_backward(&b)?.loss;
        tr.ddp_sync(&mut Solo, &mut SoloPlan)?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "longhaul gpt: device {device:?}, threads {}, {} params, layers {layers} width {width} heads {heads} seq {seq} batch {batch}: {steps} steps in {secs:.2} s, {:.0} tokens/s, {:.1} ms/step (loss {loss:.3})",
        tch::get_num_threads(),
        tr.numel(),
        (steps * batch * seq) as f64 / secs,
        1e3 * secs / steps as f64,
    );
    Ok(())
}
