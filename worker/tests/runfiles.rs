#![allow(clippy::unwrap_used)]
//! Every run file the parser accepts starts a trainer that takes a step. The coordinator and
//! the worker parse with one crate (`runspec`), so a run file can no longer be accepted at
//! submission and then refused by every worker it is sent to. The grid covers every built-in
//! model, every dataset format, sequences from one token to beyond a sample, and both sync
//! modes; combinations the parser refuses (heads on an mlp, a sample longer than the sequence,
//! gpt over tensors) are skipped, and at least one of each kind must be accepted. What only
//! the data can tell (a convnet over tensors that are not images) the worker refuses when it
//! reads the first shard, and reports the run failed rather than exiting.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use runspec::RunSpec;
use tch::{Device, Kind, Tensor};
use worker::trainer::Trainer;
use worker::trainer::data::{Addition, Batch, Scoring};
use worker::trainer::plan::{ShardFormat, train_spec};

const MODELS: &[&str] = &[
    "builtin = \"gpt\"\nlayers = 1\nwidth = 16\nheads = 2",
    "builtin = \"gpt\"\nlayers = 1\nwidth = 16\nheads = 2\ncontext = 80",
    "builtin = \"mlp\"\nlayers = 2\nwidth = 16",
    "builtin = \"convnet\"\nlayers = 2\nwidth = 8",
    "builtin = \"mlp\"\nheads = 2",
];

const DATASETS: &[&str] = &[
    "format = \"synthetic-addition\"\ndigits = 1",
    "format = \"synthetic-addition\"\ndigits = 3",
    "format = \"synthetic-addition\"\ndigits = 9",
    "format = \"text\"\nuri = \"file:///data/book.txt\"",
    "format = \"tokens-u16\"\nuri = \"file:///data/m.json\"\nvocab = 300",
    "format = \"tokens-u32\"\nuri = \"file:///data/m.json\"\nvocab = 70000",
    "format = \"safetensors\"\nuri = \"file:///data/m.json\"\nclasses = 10",
];

const SYNCS: &[&str] =
    &["mode = \"ddp\"", "mode = \"diloco\"\ninner_steps = 5\ncompression = \"int8\""];

fn run_file(model: &str, dataset: &str, seq_len: u32, sync: &str) -> String {
    format!(
        "name = \"grid\"\n[model]\n{model}\n[dataset]\n{dataset}\n[optimizer]\nname = \"adamw\"\n\
         lr = 1e-3\n[training]\nbatch_size = 4\nseq_len = {seq_len}\nsteps = 10\n[sync]\n{sync}\n\
         [workers]\nmin = 1\nmax = 2\n"
    )
}

/// A batch of `n` samples of what the shards of `format` hold.
fn batch(format: ShardFormat, seq_len: usize, features: &[i64], n: i64) -> Batch {
    match format {
        ShardFormat::Addition { digits, .. } => {
            Addition { digits }.batch(&mut ChaCha8Rng::seed_from_u64(7), n as usize, seq_len)
        }
        ShardFormat::Tokens { vocab, .. } => {
            let shape = [n, seq_len as i64];
            Batch {
                inputs: Tensor::randint(vocab, shape, (Kind::Int64, Device::Cpu)),
                targets: Tensor::randint(vocab, shape, (Kind::Int64, Device::Cpu)),
                scoring: Scoring::PerToken,
                samples: n,
                tokens: n * seq_len as i64,
                spans: Vec::new(),
            }
        }
        ShardFormat::Tensors { classes } => {
            let mut shape = vec![n];
            shape.extend_from_slice(features);
            Batch {
                inputs: Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)),
                targets: Tensor::randint(classes, [n], (Kind::Int64, Device::Cpu)),
                scoring: Scoring::PerToken,
                samples: n,
                tokens: n,
                spans: Vec::new(),
            }
        }
    }
}

#[test]
fn every_accepted_run_file_starts_a_trainer_that_steps() {
    tch::manual_seed(0);
    // Images (a convnet needs [C, H, W]; the mlp flattens them).
    let features = [2i64, 4, 4];
    let (mut accepted, mut refused) = (0, 0);
    let mut per_model = vec![0; MODELS.len()];
    let mut per_dataset = vec![0; DATASETS.len()];
    for (m, model) in MODELS.iter().enumerate() {
        for (d, dataset) in DATASETS.iter().enumerate() {
            for seq_len in [1u32, 4, 12, 30, 64] {
                for sync in SYNCS {
                    let text = run_file(model, dataset, seq_len, sync);
                    let spec = match RunSpec::parse(&text) {
                        Ok(s) => s,
                        Err(_) => {
                            refused += 1;
                            continue;
                        }
                    };
                    accepted += 1;
                    per_model[m] += 1;
                    per_dataset[d] += 1;
                    let what = format!("{model:?} / {dataset:?} / seq_len {seq_len} / {sync:?}");
                    let format = ShardFormat::of(&spec);
                    let feats =
                        matches!(format, ShardFormat::Tensors { .. }).then(|| features.to_vec());
                    let ts = train_spec(&spec, 10, Device::Cpu, feats)
                        .unwrap_or_else(|e| panic!("{what}: accepted, but no trainer spec: {e}"));
                    let mut t = Trainer::new(ts)
                        .unwrap_or_else(|e| panic!("{what}: accepted, but no trainer: {e}"));
                    let b = batch(format, seq_len as usize, &features, 4);
                    let s = t
                        .forward_backward(&b)
                        .unwrap_or_else(|e| panic!("{what}: accepted, but no step: {e}"));
                    assert!(s.loss.is_finite(), "{what}: loss {}", s.loss);
                    t.apply_local().unwrap_or_else(|e| panic!("{what}: accepted, no update: {e}"));
                }
            }
        }
    }
    println!("{accepted} run files accepted and trained a step, {refused} refused by the parser");
    // The grid means something: each model and each dataset was accepted somewhere, and the
    // parser refused what it must (an mlp with heads, a 9-digit sum in 4 tokens, gpt over
    // tensors).
    for (m, n) in per_model.iter().enumerate().take(4) {
        assert!(*n > 0, "no run file with {:?} was accepted", MODELS[m]);
    }
    assert_eq!(per_model[4], 0, "heads on an mlp must be refused");
    assert!(per_dataset.iter().all(|n| *n > 0), "{per_dataset:?}");
    assert!(refused > 0);
}
