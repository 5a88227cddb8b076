//! From a validated run file to what the trainer runs: the [`TrainSpec`], how shards are read,
//! and the device.

use std::path::{Path, PathBuf};

use runspec::{self, DataFormat, RunSpec};
use tch::Device;

use super::data::{Addition, DataError, ShardData, TokenWidth};
use super::model::{Arch, Input, ModelConfig};
use super::optim::{OptimConfig, OptimKind};
use super::{ModelSource, SyncMode, TrainSpec};
use crate::schedule::{Decay, LrSchedule};

/// Where the worker computes, as asked on its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first CUDA device when libtorch sees one, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("{s:?}: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

/// The device a choice means on this machine; an error if it names a missing GPU.
pub fn device(choice: DeviceChoice) -> Result<Device, String> {
    let n = cuda_devices();
    match choice {
        DeviceChoice::Auto => Ok(if n > 0 { Device::Cuda(0) } else { Device::Cpu }),
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(i) if i < n => Ok(Device::Cuda(i)),
        DeviceChoice::Cuda(i) => Err(format!(
            "cuda:{i} was asked for, libtorch sees {n} CUDA device(s){}",
            if n == 0 { " (no driver, no GPU, or a CPU-only torch wheel)" } else { "" }
        )),
    }
}

/// CUDA devices libtorch can use.
pub fn cuda_devices() -> usize {
    if tch::Cuda::is_available() { tch::Cuda::device_count().max(0) as usize } else { 0 }
}

/// Sets libtorch's intra-op threads (0 keeps its default: one per core).
pub fn set_threads(n: usize) {
    if n > 0 {
        tch::set_num_threads(n as i32);
    }
}

/// How the shards of a run are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardFormat {
    Addition { digits: u32, samples_per_shard: u64 },
    Tokens { width: TokenWidth, vocab: i64 },
    Tensors { classes: i64 },
}

impl ShardFormat {
    pub fn of(spec: &RunSpec) -> Self {
        match spec.dataset.format {
            DataFormat::SyntheticAddition { digits, samples_per_shard, .. } => {
                Self::Addition { digits, samples_per_shard: u64::from(samples_per_shard) }
            }
            DataFormat::Text => Self::Tokens { width: TokenWidth::U8, vocab: 256 },
            DataFormat::TokensU16 => {
                Self::Tokens { width: TokenWidth::U16, vocab: i64::from(spec.dataset.vocab) }
            }
            DataFormat::TokensU32 => {
                Self::Tokens { width: TokenWidth::U32, vocab: i64::from(spec.dataset.vocab) }
            }
            DataFormat::Safetensors => Self::Tensors { classes: i64::from(spec.dataset.vocab) },
        }
    }

    /// Whether shard bytes come from a file (everything but synthetic data).
    pub fn has_bytes(&self) -> bool {
        !matches!(self, Self::Addition { .. })
    }

    /// Whether samples are token sequences (tokens/s counts `seq_len` per sample).
    pub fn has_tokens(&self) -> bool {
        !matches!(self, Self::Tensors { .. })
    }

    /// Loads one shard: generated from its seed, or read from `path`.
    pub fn load(&self, path: Option<&Path>, seed: u64) -> Result<ShardData, DataError> {
        let need = || DataError::Invalid {
            path: "(none)".into(),
            reason: "this dataset's shards are files, and none was fetched".into(),
        };
        match *self {
            Self::Addition { digits, samples_per_shard } => Ok(ShardData::Addition {
                task: Addition { digits },
                seed,
                samples: samples_per_shard,
            }),
            Self::Tokens { width, vocab } => {
                ShardData::load_tokens(path.ok_or_else(need)?, width, vocab)
            }
            Self::Tensors { classes } => ShardData::load_tensors(path.ok_or_else(need)?, classes),
        }
    }
}

/// The per-sample feature shape of a tensor shard (`None` for token data).
pub fn feature_shape(data: &ShardData) -> Option<Vec<i64>> {
    match data {
        ShardData::Tensors { inputs, .. } => Some(inputs.size()[1..].to_vec()),
        _ => None,
    }
}

/// The trainer's spec for a run. `features` is the per-sample shape of tensor data (read from
/// the first shard); `models` resolves a TorchScript path relative to the worker.
pub fn train_spec(
    spec: &RunSpec,
    total_steps: u64,
    device: Device,
    features: Option<Vec<i64>>,
) -> Result<TrainSpec, String> {
    let format = ShardFormat::of(spec);
    let seq_len = spec.seq_len as usize;
    let (input, outputs) = match format {
        // The run file's parser saw that a sample fits `seq_len`.
        ShardFormat::Addition { .. } => {
            let v = super::data::ADDITION_VOCAB;
            (Input::Tokens { vocab: v }, v)
        }
        ShardFormat::Tokens { vocab, .. } => (Input::Tokens { vocab }, vocab),
        ShardFormat::Tensors { classes } => {
            let shape = features.ok_or("a tensor dataset's feature shape is not known yet")?;
            if classes < 2 {
                return Err("dataset.classes must be set (2 or more) for safetensors".into());
            }
            (Input::Features(shape), classes)
        }
    };
    let model = match &spec.model {
        runspec::Model::Builtin(b) => ModelSource::Builtin(ModelConfig {
            arch: match b.arch {
                runspec::Arch::Gpt => Arch::Gpt,
                runspec::Arch::Mlp => Arch::Mlp,
                runspec::Arch::Convnet => Arch::Convnet,
            },
            layers: i64::from(b.layers),
            width: i64::from(b.width),
            heads: i64::from(b.heads),
            context: i64::from(b.context.max(spec.seq_len)),
            outputs,
            input,
        }),
        // A local path or file:// URI (the parser refuses any other scheme).
        runspec::Model::TorchScript { path } => {
            ModelSource::TorchScript(PathBuf::from(path.trim_start_matches("file://")))
        }
    };
    let o = &spec.optimizer;
    let optim = OptimConfig {
        kind: match o.kind {
            runspec::OptimizerKind::AdamW => OptimKind::AdamW,
            runspec::OptimizerKind::Sgd => OptimKind::Sgd,
        },
        weight_decay: o.weight_decay,
        betas: o.betas,
        eps: o.eps,
        momentum: o.momentum,
    };
    let schedule = LrSchedule {
        decay: match spec.schedule.kind {
            runspec::ScheduleKind::Constant => Decay::Constant,
            runspec::ScheduleKind::Linear => Decay::Linear,
            runspec::ScheduleKind::Cosine => Decay::Cosine,
        },
        peak: o.lr,
        floor: spec.schedule.min_lr,
        warmup: spec.schedule.warmup_steps,
        total: total_steps,
    };
    let sync = match spec.sync {
        runspec::SyncMode::Ddp => SyncMode::Ddp,
        runspec::SyncMode::Diloco { inner_steps, outer_lr, outer_momentum } => {
            SyncMode::Diloco { inner_steps: u64::from(inner_steps), outer_lr, outer_momentum }
        }
    };
    let compression = match spec.compression {
        runspec::Compression::None => collectives::Compression::None,
        runspec::Compression::Bf16 => collectives::Compression::Bf16,
        runspec::Compression::Int8 => collectives::Compression::Int8,
    };
    Ok(TrainSpec {
        model,
        optim,
        schedule,
        grad_clip: spec.grad_clip,
        seed: spec.seed,
        batch_size: spec.batch_size as usize,
        seq_len,
        sync,
        compression,
        device,
        bucket_elems: (spec.bucket_mb as usize) << 18, // MiB of f32
    })
}

/// A held-out batch of `n` samples for tasks that define one (synthetic addition: sums drawn
/// from a seed no shard uses), for the accuracy reported at the end of a run.
pub fn holdout(format: ShardFormat, seq_len: usize, n: usize) -> Option<super::data::Batch> {
    use rand::SeedableRng;
    match format {
        ShardFormat::Addition { digits, .. } => {
            let mut rng =
                rand_chacha::ChaCha8Rng::seed_from_u64(0x4E1D_0E7A_u64 ^ u64::from(digits));
            rng.set_stream(u64::MAX);
            Some(Addition { digits }.batch(&mut rng, n, seq_len))
        }
        _ => None,
    }
}
