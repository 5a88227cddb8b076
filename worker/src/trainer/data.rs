//! Datasets: shards turned into batches.
//!
//! - `synthetic-addition`: generated, no download. A sample is `a+b=c` with `a`, `b` of
//!   `digits` digits (zero-padded) and the sum `c` written *reversed* with `digits + 1` digits,
//!   then an end token, e.g. `042+919=1690$` for 42 + 919 = 961. The loss and the accuracy
//!   count only the answer and the end token; a sample is correct when all of them are (so
//!   greedy decoding reproduces the sum exactly).
//! - `text`: any file, one token per byte (vocabulary 256).
//! - `tokens-u16`, `tokens-u32`: flat little-endian token files (nanoGPT's `.bin`).
//! - `safetensors`: tensors `inputs` (`[N, ...]`, float) and `targets` (`[N]`, int64 classes).
//!
//! Token shards are cut into windows of `seq_len + 1` tokens (input and next-token target),
//! visited in an order shuffled by the run's seed, the shard and the data epoch, so every
//! worker that reads the same shard sees the same batches.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// Targets at this value are ignored by the loss and the accuracy.
pub const IGNORE: i64 = -100;

/// The synthetic task's vocabulary: digits 0–9, then these.
pub const PLUS: i64 = 10;
pub const EQUALS: i64 = 11;
pub const END: i64 = 12;
pub const PAD: i64 = 13;
pub const ADDITION_VOCAB: i64 = 14;

/// What a batch is for: next-token prediction or classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    /// Accuracy = fraction of samples whose every scored position is right.
    ExactMatch,
    /// Accuracy = fraction of scored positions that are right.
    PerToken,
}

/// One batch on the CPU.
#[derive(Debug)]
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
    pub scoring: Scoring,
    pub samples: i64,
    /// Scored positions (tokens for LM tasks, samples for classification).
    pub tokens: i64,
    /// Where the samples came from, in order (empty for data not read under a lease).
    pub spans: Vec<Span>,
}

/// Samples `[from, to)` of a shard's reading order under one lease: what a commitment names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub lease: u64,
    pub shard: u32,
    pub data_epoch: u64,
    pub from: u64,
    pub to: u64,
    /// The lease's grant (see `ShardLease.grant`).
    pub grant: String,
    /// A shared lease: the order is the reader's own (see the driver's feeder).
    pub shared: bool,
}

/// Appends `more` to `spans`, merging a span that continues the last one.
pub fn extend_spans(spans: &mut Vec<Span>, more: &[Span]) {
    for s in more {
        match spans.last_mut() {
            Some(last) if last.lease == s.lease && last.to == s.from => last.to = s.to,
            _ => spans.push(s.clone()),
        }
    }
}

impl Batch {
    /// Concatenates batches along the sample axis (one process standing in for several).
    pub fn cat(parts: &[Batch]) -> Batch {
        let inputs: Vec<&Tensor> = parts.iter().map(|b| &b.inputs).collect();
        let targets: Vec<&Tensor> = parts.iter().map(|b| &b.targets).collect();
        Batch {
            inputs: Tensor::cat(&inputs, 0),
            targets: Tensor::cat(&targets, 0),
            scoring: parts[0].scoring,
            samples: parts.iter().map(|b| b.samples).sum(),
            tokens: parts.iter().map(|b| b.tokens).sum(),
            spans: {
                let mut spans = Vec::new();
                for p in parts {
                    extend_spans(&mut spans, &p.spans);
                }
                spans
            },
        }
    }

    /// Its first `n` samples (spans are not kept: it is not what was read).
    /// Samples `[from, from + n)` (clamped to the batch), as tensors of their own (an audit's
    /// inner step computes on the same bits, laid out as the member's own batch was).
    pub fn rows(&self, from: i64, n: i64) -> Batch {
        let from = from.clamp(0, self.samples);
        let n = n.clamp(0, self.samples - from);
        Batch {
            inputs: self.inputs.narrow(0, from, n).copy(),
            targets: self.targets.narrow(0, from, n).copy(),
            scoring: self.scoring,
            samples: n,
            tokens: if self.samples > 0 { self.tokens * n / self.samples } else { 0 },
            spans: Vec::new(),
        }
    }

    pub fn head(&self, n: i64) -> Batch {
        let n = n.clamp(0, self.samples);
        Batch {
            inputs: self.inputs.narrow(0, 0, n),
            targets: self.targets.narrow(0, 0, n),
            scoring: self.scoring,
            samples: n,
            tokens: if self.samples > 0 { self.tokens * n / self.samples } else { 0 },
            spans: Vec::new(),
        }
    }
}

/// The synthetic addition task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addition {
    pub digits: u32,
}

impl Addition {
    /// Tokens of one sample (without padding): see [`runspec::addition_sample_len`], which
    /// the run file's `seq_len` is checked against.
    pub fn sample_len(&self) -> usize {
        runspec::addition_sample_len(self.digits) as usize
    }

    /// One sample: tokens and, per position, whether its next token is scored.
    pub fn sample(&self, rng: &mut impl Rng) -> (Vec<i64>, usize) {
        let d = self.digits;
        let max = 10u64.pow(d);
        let (a, b) = (rng.random_range(0..max), rng.random_range(0..max));
        let mut t = Vec::with_capacity(self.sample_len());
        push_digits(&mut t, a, d as usize);
        t.push(PLUS);
        push_digits(&mut t, b, d as usize);
        t.push(EQUALS);
        let answer_at = t.len();
        let mut digits = Vec::new();
        push_digits(&mut digits, a + b, d as usize + 1);
        digits.reverse();
        t.extend(digits);
        t.push(END);
        (t, answer_at)
    }

    /// A batch of `n` samples padded to `seq_len` from `rng`.
    pub fn batch(&self, rng: &mut impl Rng, n: usize, seq_len: usize) -> Batch {
        let mut inputs = Vec::with_capacity(n * seq_len);
        let mut targets = Vec::with_capacity(n * seq_len);
        let mut scored = 0;
        for _ in 0..n {
            let (mut t, answer_at) = self.sample(rng);
            let len = t.len();
            t.resize(seq_len + 1, PAD);
            for i in 0..seq_len {
                inputs.push(t[i]);
                // Position i predicts token i + 1; score the answer and the end token.
                let scored_pos = i + 1 >= answer_at && i + 1 < len;
                targets.push(if scored_pos { t[i + 1] } else { IGNORE });
                scored += usize::from(scored_pos);
            }
        }
        let shape = [n as i64, seq_len as i64];
        Batch {
            inputs: Tensor::from_slice(&inputs).view(shape),
            targets: Tensor::from_slice(&targets).view(shape),
            scoring: Scoring::ExactMatch,
            samples: n as i64,
            tokens: scored as i64,
            spans: Vec::new(),
        }
    }
}

fn push_digits(out: &mut Vec<i64>, v: u64, width: usize) {
    let s = format!("{v:0width$}");
    out.extend(s.bytes().map(|b| i64::from(b - b'0')));
}

/// The on-disk layout of a token shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenWidth {
    U8,
    U16,
    U32,
}

/// The samples of one shard, loaded.
#[derive(Debug)]
pub enum ShardData {
    Addition { task: Addition, seed: u64, samples: u64 },
    Tokens { tokens: Vec<i64>, vocab: i64 },
    Tensors { inputs: Tensor, targets: Tensor },
}

/// Why a shard could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read shard {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("shard {path}: {reason}")]
    Invalid { path: String, reason: String },
}

impl ShardData {
    /// Reads a token file of `width` (rejecting ids outside the vocabulary).
    pub fn load_tokens(path: &Path, width: TokenWidth, vocab: i64) -> Result<Self, DataError> {
        let p = path.display().to_string();
        let bytes =
            std::fs::read(path).map_err(|source| DataError::Read { path: p.clone(), source })?;
        let bad = |reason: String| DataError::Invalid { path: p.clone(), reason };
        let tokens: Vec<i64> = match width {
            TokenWidth::U8 => bytes.iter().map(|&b| i64::from(b)).collect(),
            TokenWidth::U16 => {
                if bytes.len() % 2 != 0 {
                    return Err(bad(format!("{} bytes is not a whole number of u16", bytes.len())));
                }
                bytes.chunks_exact(2).map(|c| i64::from(u16::from_le_bytes([c[0], c[1]]))).collect()
            }
            TokenWidth::U32 => {
                if bytes.len() % 4 != 0 {
                    return Err(bad(format!("{} bytes is not a whole number of u32", bytes.len())));
                }
                bytes
                    .chunks_exact(4)
                    .map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect()
            }
        };
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| **t >= vocab) {
            return Err(bad(format!("token {t} at {i} is outside the vocabulary of {vocab}")));
        }
        if tokens.len() < 2 {
            return Err(bad(format!("{} tokens: a shard needs at least 2", tokens.len())));
        }
        Ok(Self::Tokens { tokens, vocab })
    }

    /// Reads a safetensors file with `inputs` and `targets`.
    pub fn load_tensors(path: &Path, classes: i64) -> Result<Self, DataError> {
        let p = path.display().to_string();
        let bad = |reason: String| DataError::Invalid { path: p.clone(), reason };
        let named = Tensor::read_safetensors(path).map_err(|e| bad(e.to_string()))?;
        let get = |name: &str| {
            named
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| bad(format!("no tensor named `{name}`")))
        };
        let inputs = get("inputs")?.to_kind(Kind::Float);
        let targets = get("targets")?;
        if inputs.dim() < 2 || targets.dim() != 1 || inputs.size()[0] != targets.size()[0] {
            return Err(bad(format!(
                "inputs {:?} and targets {:?}: expected [N, ...] and [N]",
                inputs.size(),
                targets.size()
            )));
        }
        if !matches!(targets.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Uint8) {
            return Err(bad(format!("targets are {:?}: expected integer classes", targets.kind())));
        }
        let targets = targets.to_kind(Kind::Int64);
        let (lo, hi) = (targets.min().int64_value(&[]), targets.max().int64_value(&[]));
        if lo < 0 || hi >= classes {
            return Err(bad(format!("classes {lo}..={hi} outside 0..{classes}")));
        }
        Ok(Self::Tensors { inputs, targets })
    }

    /// How many samples of `seq_len` the shard holds.
    pub fn samples(&self, seq_len: usize) -> u64 {
        match self {
            Self::Addition { samples, .. } => *samples,
            Self::Tokens { tokens, .. } => ((tokens.len() - 1) / seq_len.max(1)).max(1) as u64,
            Self::Tensors { inputs, .. } => inputs.size()[0] as u64,
        }
    }
}

/// Reads one shard's samples in a seeded order, `batch` at a time, from sample `next`.
#[derive(Debug)]
pub struct ShardReader {
    data: ShardData,
    order: Vec<u64>,
    pub next: u64,
    seq_len: usize,
}

impl ShardReader {
    /// `seed` should mix the run's seed, the shard index and the data epoch.
    pub fn new(data: ShardData, seq_len: usize, seed: u64) -> Self {
        let n = data.samples(seq_len);
        let mut order: Vec<u64> = (0..n).collect();
        if !matches!(data, ShardData::Addition { .. }) {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        }
        Self { data, order, next: 0, seq_len }
    }

    pub fn data(&self) -> &ShardData {
        &self.data
    }

    pub fn remaining(&self) -> u64 {
        self.order.len() as u64 - self.next
    }

    /// The next batch of up to `n` samples, or `None` when the shard is done.
    pub fn next_batch(&mut self, n: usize) -> Option<Batch> {
        let take = (n as u64).min(self.remaining()) as usize;
        if take == 0 {
            return None;
        }
        let ids = &self.order[self.next as usize..self.next as usize + take];
        self.next += take as u64;
        let t = self.seq_len;
        Some(match &self.data {
            ShardData::Addition { task, seed, .. } => {
                // Sample i of the shard comes from its own stream: any cursor resumes exactly.
                let parts: Vec<Batch> = ids
                    .iter()
                    .map(|&i| {
                        let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                        rng.set_stream(i);
                        task.batch(&mut rng, 1, t)
                    })
                    .collect();
                Batch::cat(&parts)
            }
            ShardData::Tokens { tokens, .. } => {
                let mut inputs = Vec::with_capacity(take * t);
                let mut targets = Vec::with_capacity(take * t);
                for &i in ids {
                    let start = (i as usize * t).min(tokens.len() - 1);
                    for k in 0..t {
                        // Short shards wrap around rather than pad.
                        let at = (start + k) % (tokens.len() - 1);
                        inputs.push(tokens[at]);
                        targets.push(tokens[at + 1]);
                    }
                }
                let shape = [take as i64, t as i64];
                Batch {
                    inputs: Tensor::from_slice(&inputs).view(shape),
                    targets: Tensor::from_slice(&targets).view(shape),
                    scoring: Scoring::PerToken,
                    samples: take as i64,
                    tokens: (take * t) as i64,
                    spans: Vec::new(),
                }
            }
            ShardData::Tensors { inputs, targets } => {
                let idx = Tensor::from_slice(&ids.iter().map(|&i| i as i64).collect::<Vec<_>>());
                Batch {
                    inputs: inputs.index_select(0, &idx),
                    targets: targets.index_select(0, &idx),
                    scoring: Scoring::PerToken,
                    samples: take as i64,
                    tokens: take as i64,
                    spans: Vec::new(),
                }
            }
        })
    }
}

/// Mixes a run seed, a shard and a data epoch into one seed.
pub fn shard_seed(run_seed: u64, shard: u32, data_epoch: u64) -> u64 {
    let mut x = run_seed ^ 0x9E37_79B9_7F4A_7C15;
    for v in [u64::from(shard), data_epoch] {
        x = (x ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
    }
    x
}

/// The seed of a lease's reading order: the shard's own in its data epoch, or, for a shared
/// lease (`shared_by`: the reading worker and the lease), the reader's own order of it. An
/// auditor rebuilding a member's batch uses the same.
pub fn order_seed(
    run_seed: u64,
    shard: u32,
    data_epoch: u64,
    shared_by: Option<(u64, u64)>,
) -> u64 {
    let seed = shard_seed(run_seed, shard, data_epoch);
    match shared_by {
        Some((worker, lease)) => shard_seed(seed, worker as u32, lease),
        None => seed,
    }
}

/// Loss (mean cross-entropy over scored positions) and (correct, counted) for accuracy.
pub fn loss_and_accuracy(logits: &Tensor, batch: &Batch) -> (Tensor, (i64, i64)) {
    let v = *logits.size().last().unwrap_or(&1);
    let flat = logits.reshape([-1, v]);
    let targets = batch.targets.reshape([-1]).to_device(logits.device());
    let loss = flat.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        &targets,
        None,
        tch::Reduction::Mean,
        IGNORE,
        0.0,
    );
    let _guard = tch::no_grad_guard();
    let pred = flat.argmax(-1, false);
    let scored = targets.ne(IGNORE);
    let right = pred.eq_tensor(&targets).logical_and(&scored);
    let acc = match batch.scoring {
        Scoring::PerToken => {
            (right.sum(Kind::Int64).int64_value(&[]), scored.sum(Kind::Int64).int64_value(&[]))
        }
        Scoring::ExactMatch => {
            let n = batch.samples;
            let wrong = scored.logical_and(&right.logical_not()).view([n, -1]);
            let ok = wrong.any_dim(1, false).logical_not();
            (ok.sum(Kind::Int64).int64_value(&[]), n)
        }
    };
    (loss, acc)
}
