//! The run file: one declarative TOML document describing a training run.
//!
//! Parsing is two-staged. The text is read into loose serde structs that refuse unknown fields
//! and wrong types, with the path of the offending field (`sync.inner_steps`); then [`RunSpec::parse`]
//! turns them into a validated [`RunSpec`] whose fields can be trusted (parse, don't validate).
//! Every error names the field, the value found and what was expected.
//!
//! `longhaul init` writes [`EXAMPLE`], an annotated file that parses.

use std::fmt;

use serde::Deserialize;
use thiserror::Error;

/// An annotated example run file, written by `longhaul init`. It parses (see the tests).
///
/// It trains a small GPT on synthetic addition, a task that needs no data files and whose
/// accuracy shows within a few hundred steps that training works.
pub const EXAMPLE: &str = r#"# longhaul run file. Submit with `longhaul submit run.toml --follow`.
# Every field is documented; remove the optional ones you do not need.

# A name for humans (letters, digits, '-', '_', '.'; at most 63 characters).
name = "gpt-addition"

[model]
# Either a built-in architecture...
builtin = "gpt"           # gpt (decoder-only transformer) | mlp | convnet
layers = 2                # 1..=96 (default: gpt 4, mlp 2, convnet 2)
width = 64                # model width, 1..=16384 (default: gpt 128, mlp 256, convnet 32)
heads = 4                 # gpt only; must divide width (default 4)
# context = 16            # gpt only: positions, >= training.seq_len (default: seq_len)
# ...or a TorchScript module, at this path (or file:// URI) on every worker:
# torchscript = "models/my_model.pt"

[dataset]
format = "synthetic-addition"  # synthetic-addition | text | tokens-u16 | tokens-u32 | safetensors
# synthetic-addition generates "a+b=c" samples on the workers: no files, no uri.
digits = 3                # operands of up to this many digits, 1..=9
# shards = 64             # virtual shards to lease, 1..=1000000
# samples_per_shard = 4096
#
# A real dataset instead: a manifest listing the shards (uri, size, sha256), or one local file
# that the coordinator serves as a single shard. Paths and file:// URIs are read by the
# coordinator; workers fetch the bytes from it over HTTPS.
# format = "text"         # the bytes of a text file (vocabulary 256)
# uri = "file:///data/book.txt"
#
# format = "tokens-u16"   # little-endian token ids (tokens-u32: 4 bytes each)
# uri = "file:///data/wikitext/manifest.json"
# vocab = 50257           # tokens-u16: 2..=65536, tokens-u32: 2..=2147483648
#
# format = "safetensors"  # `inputs` [N, ...] float and `targets` [N] integer classes per shard
# uri = "file:///data/images/manifest.json"
# classes = 10            # target classes, 2..=1000000

[optimizer]
name = "adamw"            # adamw | sgd
lr = 3e-3                 # peak learning rate, > 0
weight_decay = 0.1        # >= 0
# betas = [0.9, 0.95]     # adamw only, each in [0, 1)
# eps = 1e-8              # adamw only, > 0
# momentum = 0.9          # sgd only, in [0, 1)

[schedule]
kind = "cosine"           # constant | linear | cosine
warmup_steps = 50
min_lr = 3e-4             # floor for linear and cosine, <= lr

[training]
batch_size = 32           # sequences per worker per step
seq_len = 16              # tokens per sequence (an addition sample fits)
steps = 600               # total optimizer steps; or a token budget instead:
# tokens = "2.5b"         # k, m, b suffixes allowed
# grad_clip = 1.0         # clip the gradient norm to this; 0 disables
# seed = 0                # initialisation and data order
# precision = "auto"      # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16

[sync]
mode = "diloco"           # ddp (all-reduce every step) | diloco (every inner_steps, outer optimizer)
inner_steps = 50          # diloco only: local steps between synchronisations
outer_lr = 0.7            # diloco only: outer Nesterov learning rate
outer_momentum = 0.9      # diloco only: in [0, 1)
compression = "int8"      # none | bf16 | int8, applied to what crosses the ring
# bucket_mb = 25          # all-reduce bucket size in MiB, 1..=1024

[workers]
min = 3                   # the run waits for this many live workers
max = 8                   # workers beyond this stay idle
# restart_budget = 5      # epoch restarts after failures before the run is failed (default 10)

[checkpoint]
interval_steps = 100      # a checkpoint every this many committed steps
# keep = 3                # checkpoints kept, 1..=1000

# Audits: a member's contribution to a sync, recomputed by another member from what it
# committed. On by default in ddp; in diloco (a whole round recomputed, with the member's inner
# optimizer state fetched from it) set audit_probability to turn them on. See
# docs/verification.md.
[verification]
# audit_probability = 0.05     # ddp default; diloco 0. The chance a sync of an established
#                              # member is audited; 0 = no audits
# probation_probability = 0.5  # the chance during a member's first probation_syncs contributions
# probation_syncs = 20
# strikes_to_evict = 2         # confirmed wrong contributions that evict a member
# escrow_syncs = 100           # the ledger's credit for a sync is final this many syncs later
#                              # if no strike came meanwhile (a strike forfeits what is in escrow)
# require_profile = false      # refuse contributions no auditor can recompute (CUDA, for now)
"#;

/// A run file that could not be accepted.
#[derive(Debug, Error, PartialEq)]
pub enum RunFileError {
    #[error("run file is not valid TOML: {0}")]
    Syntax(String),
    #[error("`{field}`: {message}")]
    Shape { field: String, message: String },
    #[error("`{field}` = {value}: expected {expected}")]
    Invalid { field: &'static str, value: String, expected: String },
    #[error("`{field}` is missing: expected {expected}")]
    Missing { field: &'static str, expected: &'static str },
}

impl RunFileError {
    /// The dotted path of the field at fault, if the error concerns one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Syntax(_) => None,
            Self::Shape { field, .. } => Some(field),
            Self::Invalid { field, .. } | Self::Missing { field, .. } => Some(field),
        }
    }
}

/// A validated run specification.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub name: String,
    pub model: Model,
    pub dataset: Dataset,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub batch_size: u32,
    pub seq_len: u32,
    pub budget: Budget,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub grad_clip: f64,
    /// Seeds initialisation and data order.
    pub seed: u64,
    pub precision: Precision,
    pub sync: SyncMode,
    pub compression: Compression,
    /// All-reduce bucket size in MiB.
    pub bucket_mb: u32,
    pub min_workers: u32,
    pub max_workers: u32,
    pub restart_budget: u32,
    pub checkpoint_interval: u64,
    /// How many checkpoints are kept.
    pub checkpoint_keep: u32,
    pub verification: Verification,
}

/// `[verification]`: audits of contributions by recomputation (see `docs/verification.md`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verification {
    /// The chance that a sync of an established member is audited; 0 disables audits.
    pub audit_probability: f64,
    /// The chance for a member on probation (its first `probation_syncs` contributions).
    pub probation_probability: f64,
    pub probation_syncs: u32,
    /// Confirmed wrong contributions (strikes) that evict a member from the run.
    pub strikes_to_evict: u32,
    /// A member's credit for a sync becomes final this many syncs later if no audit struck it
    /// meanwhile (the ledger's escrow window); a strike forfeits the credit still in escrow.
    pub escrow_syncs: u32,
    /// In a run with audits, refuse contributions that name no reproducibility profile (a CUDA
    /// worker's, for now, which no auditor can recompute): every applied contribution is then
    /// auditable. Off by default, so CUDA workers can train ddp runs.
    pub require_profile: bool,
}

impl Verification {
    /// No audits.
    pub const OFF: Self = Self {
        audit_probability: 0.0,
        probation_probability: 0.0,
        probation_syncs: 0,
        strikes_to_evict: 2,
        escrow_syncs: 0,
        require_profile: false,
    };

    pub fn enabled(&self) -> bool {
        self.audit_probability > 0.0 || self.probation_probability > 0.0
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Model {
    Builtin(BuiltinModel),
    TorchScript { path: String },
}

/// A built-in architecture with its shape. `heads` and `context` are 0 for `mlp` and `convnet`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BuiltinModel {
    pub arch: Arch,
    pub layers: u32,
    pub width: u32,
    pub heads: u32,
    /// Positions the model embeds (gpt); at least `seq_len`.
    pub context: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// A decoder-only transformer.
    Gpt,
    Mlp,
    Convnet,
}

impl Arch {
    /// The default (layers, width) of the architecture.
    fn default_shape(self) -> (u32, u32) {
        match self {
            Self::Gpt => (4, 128),
            Self::Mlp => (2, 256),
            Self::Convnet => (2, 32),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// The manifest or file; "" for `SyntheticAddition`.
    pub uri: String,
    pub format: DataFormat,
    /// The vocabulary for `tokens-u16`/`tokens-u32`, the class count (`classes`) for
    /// `safetensors`; 0 for the others (the worker derives it: 256 for text, the task's own for
    /// synthetic data).
    pub vocab: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// "a+b=c" samples generated by the workers, `samples_per_shard` in each of `shards`
    /// virtual shards.
    SyntheticAddition {
        digits: u32,
        shards: u32,
        samples_per_shard: u32,
    },
    Text,
    TokensU16,
    TokensU32,
    Safetensors,
}

impl DataFormat {
    /// The name the run file uses.
    pub fn name(&self) -> &'static str {
        match self {
            Self::SyntheticAddition { .. } => "synthetic-addition",
            Self::Text => "text",
            Self::TokensU16 => "tokens-u16",
            Self::TokensU32 => "tokens-u32",
            Self::Safetensors => "safetensors",
        }
    }
}

/// The optimizer. Fields that do not apply to `kind` (betas and eps for sgd, momentum for adamw)
/// hold their defaults and are not used.
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub momentum: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    AdamW,
    Sgd,
}

/// The arithmetic of the forward and backward passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// bf16 autocast on CUDA, fp32 on CPU.
    Auto,
    Fp32,
    Bf16,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    pub min_lr: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

/// How long the run trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Steps(u64),
    Tokens(u64),
}

#[derive(Clone, Debug, PartialEq)]
pub enum SyncMode {
    Ddp,
    Diloco { inner_steps: u32, outer_lr: f64, outer_momentum: f64 },
}

impl SyncMode {
    /// Steps between two synchronisations: 1 in ddp, `inner_steps` (at least 1) in diloco.
    pub fn steps_per_sync(&self) -> u64 {
        match self {
            Self::Ddp => 1,
            Self::Diloco { inner_steps, .. } => u64::from(*inner_steps).max(1),
        }
    }
}

/// What crosses the ring; the names match `collectives::Compression`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Bf16,
    Int8,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Bf16 => "bf16",
            Self::Int8 => "int8",
        })
    }
}

impl RunSpec {
    /// Parses and validates a run file.
    pub fn parse(text: &str) -> Result<Self, RunFileError> {
        let value: toml::Table =
            toml::from_str(text).map_err(|e| RunFileError::Syntax(e.to_string().trim().into()))?;
        let raw: RawRun = serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(
            |e: serde_path_to_error::Error<toml::de::Error>| {
                let field = e.path().to_string();
                let message = e.into_inner().message().to_owned();
                RunFileError::Shape {
                    field: if field == "." { "(top level)".into() } else { field },
                    message,
                }
            },
        )?;
        raw.validate()
    }

    /// The number of optimizer steps the run trains for (a token budget is converted with the
    /// global batch of `workers` workers).
    pub fn total_steps(&self, workers: u32) -> u64 {
        match self.budget {
            Budget::Steps(s) => s,
            Budget::Tokens(t) => {
                let per_step = u64::from(self.batch_size)
                    * u64::from(self.seq_len)
                    * u64::from(workers.max(1));
                t.div_ceil(per_step.max(1))
            }
        }
    }
}

// ---- the loose shape, straight from TOML ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    name: Option<String>,
    model: Option<RawModel>,
    dataset: Option<RawDataset>,
    optimizer: Option<RawOptimizer>,
    schedule: Option<RawSchedule>,
    training: Option<RawTraining>,
    sync: Option<RawSync>,
    workers: Option<RawWorkers>,
    checkpoint: Option<RawCheckpoint>,
    verification: Option<RawVerification>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    builtin: Option<String>,
    layers: Option<u32>,
    width: Option<u32>,
    heads: Option<u32>,
    context: Option<u32>,
    torchscript: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    uri: Option<String>,
    format: Option<String>,
    vocab: Option<u32>,
    classes: Option<u32>,
    digits: Option<u32>,
    shards: Option<u32>,
    samples_per_shard: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptimizer {
    name: Option<String>,
    lr: Option<f64>,
    weight_decay: Option<f64>,
    betas: Option<Vec<f64>>,
    eps: Option<f64>,
    momentum: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    kind: Option<String>,
    warmup_steps: Option<u64>,
    min_lr: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraining {
    batch_size: Option<u32>,
    seq_len: Option<u32>,
    steps: Option<u64>,
    tokens: Option<toml::Value>,
    grad_clip: Option<f64>,
    seed: Option<u64>,
    precision: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    mode: Option<String>,
    inner_steps: Option<u32>,
    outer_lr: Option<f64>,
    outer_momentum: Option<f64>,
    compression: Option<String>,
    bucket_mb: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkers {
    min: Option<u32>,
    max: Option<u32>,
    restart_budget: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerification {
    audit_probability: Option<f64>,
    probation_probability: Option<f64>,
    probation_syncs: Option<u32>,
    strikes_to_evict: Option<u32>,
    escrow_syncs: Option<u32>,
    require_profile: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckpoint {
    interval_steps: Option<u64>,
    keep: Option<u32>,
}

/// Tokens of one synthetic-addition sample of `digits`-digit operands (without padding):
/// `a+b=c` and an end token, where `c` may have one digit more. A model is trained on
/// `sample_len - 1` positions (inputs and next-token targets), so that is the shortest
/// `training.seq_len` that fits a sample.
pub fn addition_sample_len(digits: u32) -> u32 {
    3 * digits + 4
}

fn invalid(
    field: &'static str,
    value: impl fmt::Debug,
    expected: impl Into<String>,
) -> RunFileError {
    RunFileError::Invalid { field, value: format!("{value:?}"), expected: expected.into() }
}

fn required<T>(
    v: Option<T>,
    field: &'static str,
    expected: &'static str,
) -> Result<T, RunFileError> {
    v.ok_or(RunFileError::Missing { field, expected })
}

fn choice<T: Copy>(v: &str, field: &'static str, options: &[(&str, T)]) -> Result<T, RunFileError> {
    options.iter().find(|(name, _)| *name == v).map(|(_, t)| *t).ok_or_else(|| {
        let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        invalid(field, v, format!("one of {}", names.join(", ")))
    })
}

fn positive(v: f64, field: &'static str) -> Result<f64, RunFileError> {
    if v.is_finite() && v > 0.0 { Ok(v) } else { Err(invalid(field, v, "a finite number > 0")) }
}

/// `v`, or `default` when absent; either way within `lo..=hi`.
fn ranged<T>(v: Option<T>, default: T, lo: T, hi: T, field: &'static str) -> Result<T, RunFileError>
where
    T: PartialOrd + Copy + fmt::Debug + fmt::Display,
{
    let v = v.unwrap_or(default);
    if lo <= v && v <= hi {
        Ok(v)
    } else {
        Err(invalid(field, v, format!("an integer in [{lo}, {hi}]")))
    }
}

/// A fraction in [0, 1), such as a momentum.
fn unit(v: f64, field: &'static str) -> Result<f64, RunFileError> {
    if (0.0..1.0).contains(&v) { Ok(v) } else { Err(invalid(field, v, "a number in [0, 1)")) }
}

/// Refuses the fields in `set` that are present: they do not apply to `context` (for example
/// "with builtin = \"mlp\"").
fn refuse_set(set: &[(bool, &'static str)], context: &str) -> Result<(), RunFileError> {
    match set.iter().find(|(present, _)| *present) {
        Some((_, field)) => Err(invalid(field, "set", format!("nothing {context}"))),
        None => Ok(()),
    }
}

/// Parses counts such as `124m`, `1.3b`, `500k` or `1000`.
pub fn parse_count(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase().replace('_', "");
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1e3),
        'm' => (&s[..s.len() - 1], 1e6),
        'b' | 'g' => (&s[..s.len() - 1], 1e9),
        't' => (&s[..s.len() - 1], 1e12),
        _ => (s.as_str(), 1.0),
    };
    let n: f64 = num.parse().ok()?;
    let v = n * mult;
    (1.0..1.8e19).contains(&v).then_some(v.round() as u64)
}

fn check_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl RawRun {
    fn validate(self) -> Result<RunSpec, RunFileError> {
        let name = required(self.name, "name", "a run name such as \"gpt-addition\"")?;
        if !check_name(&name) {
            return Err(invalid("name", &name, "1 to 63 letters, digits, '-', '_' or '.'"));
        }

        // [training] first: the model's context depends on seq_len.
        let t = required(self.training, "training", "a [training] table")?;
        let batch_size = required(t.batch_size, "training.batch_size", "an integer >= 1")?;
        if batch_size == 0 {
            return Err(invalid("training.batch_size", 0, "an integer >= 1"));
        }
        let seq_len = t.seq_len.unwrap_or(1024);
        if seq_len == 0 {
            return Err(invalid("training.seq_len", 0, "an integer >= 1"));
        }
        let budget = match (t.steps, t.tokens) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "training.tokens",
                    "set together with training.steps",
                    "either `steps` or `tokens`, not both",
                ));
            }
            (None, None) => {
                return Err(RunFileError::Missing {
                    field: "training.steps",
                    expected: "`steps` (an integer >= 1) or `tokens` (a token budget)",
                });
            }
            (Some(0), None) => return Err(invalid("training.steps", 0, "an integer >= 1")),
            (Some(s), None) => Budget::Steps(s),
            (None, Some(v)) => {
                let n = match &v {
                    toml::Value::Integer(i) if *i > 0 => Some(*i as u64),
                    toml::Value::String(s) => parse_count(s),
                    _ => None,
                };
                Budget::Tokens(n.ok_or_else(|| {
                    invalid(
                        "training.tokens",
                        v.to_string(),
                        "a positive integer or a count such as \"2.5b\"",
                    )
                })?)
            }
        };
        let grad_clip = t.grad_clip.unwrap_or(1.0);
        if !(grad_clip.is_finite() && grad_clip >= 0.0) {
            return Err(invalid(
                "training.grad_clip",
                grad_clip,
                "a finite number >= 0 (0 disables)",
            ));
        }
        let seed = t.seed.unwrap_or(0);
        let precision = choice(
            t.precision.as_deref().unwrap_or("auto"),
            "training.precision",
            &[("auto", Precision::Auto), ("fp32", Precision::Fp32), ("bf16", Precision::Bf16)],
        )?;

        let m = required(self.model, "model", "a [model] table")?;
        let model = match (m.builtin, m.torchscript) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "model.torchscript",
                    "set together with model.builtin",
                    "either `builtin` or `torchscript`, not both",
                ));
            }
            (None, None) => {
                return Err(RunFileError::Missing {
                    field: "model.builtin",
                    expected: "`builtin` (\"gpt\", \"mlp\" or \"convnet\") or `torchscript`",
                });
            }
            (Some(b), None) => {
                let arch = choice(
                    &b,
                    "model.builtin",
                    &[("gpt", Arch::Gpt), ("mlp", Arch::Mlp), ("convnet", Arch::Convnet)],
                )?;
                let (layers, width) = arch.default_shape();
                let layers = ranged(m.layers, layers, 1, 96, "model.layers")?;
                let width = ranged(m.width, width, 1, 16384, "model.width")?;
                let (heads, context) = if arch == Arch::Gpt {
                    let heads = m.heads.unwrap_or(4);
                    if heads == 0 || width % heads != 0 {
                        return Err(invalid(
                            "model.heads",
                            heads,
                            format!("an integer >= 1 that divides model.width = {width}"),
                        ));
                    }
                    let context = m.context.unwrap_or(seq_len);
                    if context < seq_len {
                        return Err(invalid(
                            "model.context",
                            context,
                            format!("an integer >= training.seq_len = {seq_len}"),
                        ));
                    }
                    (heads, context)
                } else {
                    refuse_set(
                        &[
                            (m.heads.is_some(), "model.heads"),
                            (m.context.is_some(), "model.context"),
                        ],
                        &format!("with builtin = \"{b}\" (gpt only)"),
                    )?;
                    (0, 0)
                };
                Model::Builtin(BuiltinModel { arch, layers, width, heads, context })
            }
            (None, Some(path)) => {
                refuse_set(
                    &[
                        (m.layers.is_some(), "model.layers"),
                        (m.width.is_some(), "model.width"),
                        (m.heads.is_some(), "model.heads"),
                        (m.context.is_some(), "model.context"),
                    ],
                    "with `torchscript` (the module defines its shape)",
                )?;
                if path.trim().is_empty() {
                    return Err(invalid("model.torchscript", &path, "a path or URI to a .pt file"));
                }
                if path.contains("://") && !path.starts_with("file://") {
                    return Err(invalid(
                        "model.torchscript",
                        &path,
                        "a path (or file:// URI) that exists on every worker: workers load \
                         TorchScript from their own disk and download none",
                    ));
                }
                Model::TorchScript { path }
            }
        };

        let d = required(self.dataset, "dataset", "a [dataset] table")?;
        let dataset = validate_dataset(d)?;
        if let (Model::Builtin(BuiltinModel { arch: Arch::Gpt, .. }), DataFormat::Safetensors) =
            (&model, dataset.format)
        {
            return Err(invalid(
                "model.builtin",
                "gpt",
                "`mlp` or `convnet` for safetensors (gpt needs tokens: synthetic-addition, text, \
                 tokens-u16, tokens-u32)",
            ));
        }
        if let DataFormat::SyntheticAddition { digits, .. } = dataset.format {
            let min = addition_sample_len(digits) - 1;
            if seq_len < min {
                return Err(invalid(
                    "training.seq_len",
                    seq_len,
                    format!(
                        "at least {min}: a {digits}-digit addition sample is {} tokens",
                        min + 1
                    ),
                ));
            }
        }

        let o = required(self.optimizer, "optimizer", "an [optimizer] table")?;
        let kind = choice(
            &required(o.name, "optimizer.name", "one of \"adamw\", \"sgd\"")?,
            "optimizer.name",
            &[("adamw", OptimizerKind::AdamW), ("sgd", OptimizerKind::Sgd)],
        )?;
        let lr = positive(required(o.lr, "optimizer.lr", "a learning rate > 0")?, "optimizer.lr")?;
        let weight_decay = o.weight_decay.unwrap_or(0.0);
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(invalid("optimizer.weight_decay", weight_decay, "a finite number >= 0"));
        }
        match kind {
            OptimizerKind::AdamW => refuse_set(
                &[(o.momentum.is_some(), "optimizer.momentum")],
                "with \"adamw\" (sgd only; adamw has betas)",
            )?,
            OptimizerKind::Sgd => refuse_set(
                &[(o.betas.is_some(), "optimizer.betas"), (o.eps.is_some(), "optimizer.eps")],
                "with \"sgd\" (adamw only)",
            )?,
        }
        let betas = match o.betas {
            None => (0.9, 0.95),
            Some(b) if b.len() == 2 && b.iter().all(|x| (0.0..1.0).contains(x)) => (b[0], b[1]),
            Some(b) => return Err(invalid("optimizer.betas", b, "two numbers in [0, 1)")),
        };
        let eps = positive(o.eps.unwrap_or(1e-8), "optimizer.eps")?;
        let momentum = unit(o.momentum.unwrap_or(0.9), "optimizer.momentum")?;
        let optimizer = Optimizer { kind, lr, weight_decay, betas, eps, momentum };

        let schedule = match self.schedule {
            None => Schedule { kind: ScheduleKind::Constant, warmup_steps: 0, min_lr: lr },
            Some(s) => {
                let kind = choice(
                    &s.kind.unwrap_or_else(|| "constant".into()),
                    "schedule.kind",
                    &[
                        ("constant", ScheduleKind::Constant),
                        ("linear", ScheduleKind::Linear),
                        ("cosine", ScheduleKind::Cosine),
                    ],
                )?;
                let min_lr = s.min_lr.unwrap_or(0.0);
                if !(min_lr.is_finite() && min_lr >= 0.0 && min_lr <= lr) {
                    return Err(invalid(
                        "schedule.min_lr",
                        min_lr,
                        format!("a number in [0, optimizer.lr = {lr}]"),
                    ));
                }
                Schedule { kind, warmup_steps: s.warmup_steps.unwrap_or(0), min_lr }
            }
        };

        let s = required(self.sync, "sync", "a [sync] table")?;
        let mode = required(s.mode, "sync.mode", "\"ddp\" or \"diloco\"")?;
        let sync = match mode.as_str() {
            "ddp" => {
                refuse_set(
                    &[
                        (s.inner_steps.is_some(), "sync.inner_steps"),
                        (s.outer_lr.is_some(), "sync.outer_lr"),
                        (s.outer_momentum.is_some(), "sync.outer_momentum"),
                    ],
                    "with mode = \"ddp\" (diloco only)",
                )?;
                SyncMode::Ddp
            }
            "diloco" => {
                let inner_steps = required(s.inner_steps, "sync.inner_steps", "an integer >= 1")?;
                if inner_steps == 0 {
                    return Err(invalid("sync.inner_steps", 0, "an integer >= 1"));
                }
                let outer_lr = positive(
                    required(s.outer_lr, "sync.outer_lr", "a number > 0 (for example 0.7)")?,
                    "sync.outer_lr",
                )?;
                let outer_momentum = unit(s.outer_momentum.unwrap_or(0.9), "sync.outer_momentum")?;
                SyncMode::Diloco { inner_steps, outer_lr, outer_momentum }
            }
            other => return Err(invalid("sync.mode", other, "one of \"ddp\", \"diloco\"")),
        };
        let compression = choice(
            s.compression.as_deref().unwrap_or("none"),
            "sync.compression",
            &[
                ("none", Compression::None),
                ("bf16", Compression::Bf16),
                ("int8", Compression::Int8),
            ],
        )?;
        let bucket_mb = ranged(s.bucket_mb, 25, 1, 1024, "sync.bucket_mb")?;

        let w = required(self.workers, "workers", "a [workers] table with `min` and `max`")?;
        let min_workers = required(w.min, "workers.min", "an integer >= 1")?;
        if min_workers == 0 {
            return Err(invalid("workers.min", 0, "an integer >= 1"));
        }
        let max_workers = w.max.unwrap_or(min_workers);
        if max_workers < min_workers || max_workers > 4096 {
            return Err(invalid(
                "workers.max",
                max_workers,
                format!("an integer in [workers.min = {min_workers}, 4096]"),
            ));
        }
        let restart_budget = w.restart_budget.unwrap_or(10);

        let (interval, keep) = self.checkpoint.map_or((None, None), |c| (c.interval_steps, c.keep));
        let checkpoint_interval = match interval {
            None => 1000,
            Some(0) => return Err(invalid("checkpoint.interval_steps", 0, "an integer >= 1")),
            Some(n) => n,
        };
        let checkpoint_keep = ranged(keep, 3, 1, 1000, "checkpoint.keep")?;
        let verification = validate_verification(self.verification, &sync)?;

        Ok(RunSpec {
            name,
            model,
            dataset,
            optimizer,
            schedule,
            batch_size,
            seq_len,
            budget,
            grad_clip,
            seed,
            precision,
            sync,
            compression,
            bucket_mb,
            min_workers,
            max_workers,
            restart_budget,
            checkpoint_interval,
            checkpoint_keep,
            verification,
        })
    }
}

/// Audits recompute a member's contribution from its committed inputs: on by default in ddp
/// (a step is a function of the shared state and the data), opt-in in diloco (a round also
/// depends on the member's own inner optimizer state, which the auditor fetches from it: an
/// audit costs a round and a transfer of that state).
fn validate_verification(
    v: Option<RawVerification>,
    sync: &SyncMode,
) -> Result<Verification, RunFileError> {
    let v = v.unwrap_or(RawVerification {
        audit_probability: None,
        probation_probability: None,
        probation_syncs: None,
        strikes_to_evict: None,
        escrow_syncs: None,
        require_profile: None,
    });
    let probability = |x: Option<f64>, default: f64, field: &'static str| match x {
        None => Ok(default),
        Some(p) if (0.0..=1.0).contains(&p) => Ok(p),
        Some(p) => Err(invalid(field, p, "a probability in [0, 1]")),
    };
    let ddp = matches!(sync, SyncMode::Ddp);
    let audit_probability = probability(
        v.audit_probability,
        if ddp { 0.05 } else { 0.0 },
        "verification.audit_probability",
    )?;
    let probation_probability = probability(
        v.probation_probability,
        if audit_probability > 0.0 { 0.5 } else { 0.0 },
        "verification.probation_probability",
    )?;
    let probation_syncs =
        ranged(v.probation_syncs, 20, 0, 1_000_000, "verification.probation_syncs")?;
    let strikes_to_evict = ranged(v.strikes_to_evict, 2, 1, 100, "verification.strikes_to_evict")?;
    let escrow_syncs = ranged(v.escrow_syncs, 100, 0, 1_000_000, "verification.escrow_syncs")?;
    let require_profile = v.require_profile.unwrap_or(false);
    if require_profile && audit_probability == 0.0 && probation_probability == 0.0 {
        return Err(invalid(
            "verification.require_profile",
            require_profile,
            "false in a run without audits (it refuses contributions no auditor could \
             recompute; set audit_probability or probation_probability above 0)",
        ));
    }
    Ok(Verification {
        audit_probability,
        probation_probability,
        probation_syncs,
        strikes_to_evict,
        escrow_syncs,
        require_profile,
    })
}

fn validate_dataset(d: RawDataset) -> Result<Dataset, RunFileError> {
    const FORMATS: &str =
        "one of \"synthetic-addition\", \"text\", \"tokens-u16\", \"tokens-u32\", \"safetensors\"";
    let name = required(d.format, "dataset.format", FORMATS)?;
    if name == "synthetic-addition" {
        refuse_set(
            &[
                (d.uri.is_some(), "dataset.uri"),
                (d.vocab.is_some(), "dataset.vocab"),
                (d.classes.is_some(), "dataset.classes"),
            ],
            "with format = \"synthetic-addition\" (the workers generate the data)",
        )?;
        let digits = ranged(d.digits, 3, 1, 9, "dataset.digits")?;
        let shards = ranged(d.shards, 64, 1, 1_000_000, "dataset.shards")?;
        let samples_per_shard =
            ranged(d.samples_per_shard, 4096, 1, 10_000_000, "dataset.samples_per_shard")?;
        return Ok(Dataset {
            uri: String::new(),
            format: DataFormat::SyntheticAddition { digits, shards, samples_per_shard },
            vocab: 0,
        });
    }
    let format = choice(
        &name,
        "dataset.format",
        &[
            ("text", DataFormat::Text),
            ("tokens-u16", DataFormat::TokensU16),
            ("tokens-u32", DataFormat::TokensU32),
            ("safetensors", DataFormat::Safetensors),
        ],
    )
    .map_err(|_| invalid("dataset.format", &name, FORMATS))?;
    refuse_set(
        &[
            (d.digits.is_some(), "dataset.digits"),
            (d.shards.is_some(), "dataset.shards"),
            (d.samples_per_shard.is_some(), "dataset.samples_per_shard"),
        ],
        &format!("with format = \"{name}\" (synthetic-addition only)"),
    )?;
    let uri =
        required(d.uri, "dataset.uri", "the URI of a shard manifest (.json) or of one data file")?;
    if !(uri.starts_with("file://")
        || uri.starts_with("https://")
        || uri.starts_with("http://")
        || uri.starts_with('/')
        || uri.starts_with("./")
        || uri.starts_with("longhaul://"))
    {
        return Err(invalid(
            "dataset.uri",
            &uri,
            "a file://, https://, longhaul:// URI or a path to a shard manifest or data file",
        ));
    }
    if format != DataFormat::Safetensors {
        refuse_set(
            &[(d.classes.is_some(), "dataset.classes")],
            &format!("with format = \"{name}\" (safetensors only)"),
        )?;
    }
    let vocab = match format {
        DataFormat::Safetensors => {
            refuse_set(
                &[(d.vocab.is_some(), "dataset.vocab")],
                "with format = \"safetensors\" (set dataset.classes)",
            )?;
            let c = required(
                d.classes,
                "dataset.classes",
                "the number of target classes, 2..=1000000",
            )?;
            ranged(Some(c), c, 2, 1_000_000, "dataset.classes")?
        }
        DataFormat::TokensU16 => {
            let v = required(d.vocab, "dataset.vocab", "the vocabulary size, 2..=65536")?;
            ranged(Some(v), v, 2, 1 << 16, "dataset.vocab")?
        }
        DataFormat::TokensU32 => {
            let v = required(d.vocab, "dataset.vocab", "the vocabulary size, 2..=2147483648")?;
            ranged(Some(v), v, 2, 1 << 31, "dataset.vocab")?
        }
        _ => {
            refuse_set(
                &[(d.vocab.is_some(), "dataset.vocab")],
                &format!("with format = \"{name}\" (tokens-u16 and tokens-u32 only)"),
            )?;
            0
        }
    };
    Ok(Dataset { uri, format, vocab })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_parses() {
        let spec = RunSpec::parse(EXAMPLE).unwrap();
        assert_eq!(spec.name, "gpt-addition");
        assert_eq!(
            spec.model,
            Model::Builtin(BuiltinModel {
                arch: Arch::Gpt,
                layers: 2,
                width: 64,
                heads: 4,
                context: 16
            })
        );
        assert_eq!(
            spec.dataset,
            Dataset {
                uri: String::new(),
                format: DataFormat::SyntheticAddition {
                    digits: 3,
                    shards: 64,
                    samples_per_shard: 4096
                },
                vocab: 0,
            }
        );
        assert_eq!(
            spec.optimizer,
            Optimizer {
                kind: OptimizerKind::AdamW,
                lr: 3e-3,
                weight_decay: 0.1,
                betas: (0.9, 0.95),
                eps: 1e-8,
                momentum: 0.9,
            }
        );
        assert_eq!(spec.schedule.kind, ScheduleKind::Cosine);
        assert_eq!((spec.batch_size, spec.seq_len), (32, 16));
        assert_eq!(spec.budget, Budget::Steps(600));
        assert_eq!((spec.grad_clip, spec.seed, spec.precision), (1.0, 0, Precision::Auto));
        assert_eq!(
            spec.sync,
            SyncMode::Diloco { inner_steps: 50, outer_lr: 0.7, outer_momentum: 0.9 }
        );
        assert_eq!((spec.compression, spec.bucket_mb), (Compression::Int8, 25));
        assert_eq!((spec.min_workers, spec.max_workers), (3, 8));
        assert_eq!((spec.checkpoint_interval, spec.checkpoint_keep), (100, 3));
    }

    /// Replaces `from` by `to` in the example (which must contain it) and parses.
    fn edit(from: &str, to: &str) -> Result<RunSpec, RunFileError> {
        assert!(EXAMPLE.contains(from), "example lacks {from:?}");
        RunSpec::parse(&EXAMPLE.replacen(from, to, 1))
    }

    /// One `check` per case: the error names `field` and its message contains `needle`.
    fn check(from: &str, to: &str, field: &str, needle: &str) {
        let err = edit(from, to).expect_err("should be refused");
        let msg = err.to_string();
        assert_eq!(err.field(), Some(field), "{msg}");
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }

    const SYNTHETIC: &str = "format = \"synthetic-addition\"";
    const TOKENS: &str = "format = \"tokens-u16\"\nuri = \"file:///d/m.json\"\nvocab = 256";

    #[test]
    fn each_kind_of_bad_file_names_field_value_and_expectation() {
        check("inner_steps = 50", "inner_steps = \"ten\"", "sync.inner_steps", "\"ten\"");
        check(
            "inner_steps = 50",
            "inner_steps = 0",
            "sync.inner_steps",
            "expected an integer >= 1",
        );
        check("mode = \"diloco\"", "mode = \"fsdp\"", "sync.mode", "one of \"ddp\", \"diloco\"");
        check("compression = \"int8\"", "compression = \"fp4\"", "sync.compression", "\"fp4\"");
        check("outer_momentum = 0.9", "outer_momentum = 1.5", "sync.outer_momentum", "[0, 1)");
        check("builtin = \"gpt\"", "builtin = \"gpt2\"", "model.builtin", "\"gpt2\"");
        check("lr = 3e-3", "lr = -1.0", "optimizer.lr", "> 0");
        check("name = \"adamw\"", "name = \"lion\"", "optimizer.name", "\"lion\"");
        check("min = 3", "min = 0", "workers.min", ">= 1");
        check("max = 8", "max = 1", "workers.max", "workers.min = 3");
        check("batch_size = 32", "batch_size = -3", "training.batch_size", "-3");
        check("steps = 600 ", "steps = 600\ntokens = 5", "training.tokens", "not both");
        check(SYNTHETIC, "format = \"csv\"", "dataset.format", "\"csv\"");
        check(SYNTHETIC, "format = \"jsonl\"", "dataset.format", "\"synthetic-addition\"");
        check("interval_steps = 100", "interval_steps = 0", "checkpoint.interval_steps", ">= 1");
        check(
            "interval_steps = 100",
            "interval_step = 100",
            "checkpoint.interval_step",
            "unknown field `interval_step`",
        );
        check("name = \"gpt-addition\"", "name = \"a b\"", "name", "\"a b\"");
        check("name = \"gpt-addition\"", "", "name", "is missing");
        check("min_lr = 3e-4", "min_lr = 1.0", "schedule.min_lr", "optimizer.lr");
        // ddp refuses diloco-only fields.
        check("mode = \"diloco\"", "mode = \"ddp\"", "sync.inner_steps", "diloco only");
        // The old model sizes are gone.
        check("layers = 2 ", "size = \"124m\"\nlayers = 2 ", "model.size", "unknown field");
    }

    #[test]
    fn model_shapes_are_checked() {
        check("layers = 2 ", "layers = 0 ", "model.layers", "[1, 96]");
        check("layers = 2 ", "layers = 97 ", "model.layers", "97");
        check("width = 64 ", "width = 0 ", "model.width", "[1, 16384]");
        check("width = 64 ", "width = 16385 ", "model.width", "16385");
        check("heads = 4 ", "heads = 5 ", "model.heads", "model.width = 64");
        check("heads = 4 ", "heads = 0 ", "model.heads", "divides");
        check("# context = 16", "context = 8", "model.context", "training.seq_len = 16");
        // heads and context are gpt's.
        check("builtin = \"gpt\"", "builtin = \"mlp\"", "model.heads", "gpt only");
        let convnet = EXAMPLE.replacen("builtin = \"gpt\"", "builtin = \"convnet\"", 1).replacen(
            "heads = 4 ",
            "context = 16 ",
            1,
        );
        let err = RunSpec::parse(&convnet).unwrap_err();
        assert_eq!(err.field(), Some("model.context"), "{err}");
        assert!(err.to_string().contains("gpt only"), "{err}");
        check(
            "builtin = \"gpt\"",
            "torchscript = \"m.pt\"\nbuiltin = \"gpt\"",
            "model.torchscript",
            "not both",
        );

        // Defaults per architecture; context follows seq_len.
        let spec = edit("layers = 2 ", "").unwrap();
        let Model::Builtin(m) = spec.model else { panic!("builtin expected") };
        assert_eq!((m.layers, m.width, m.heads, m.context), (4, 64, 4, 16));
        let spec = edit("# context = 16", "context = 64").unwrap();
        let Model::Builtin(m) = spec.model else { panic!("builtin expected") };
        assert_eq!(m.context, 64);
        let text = EXAMPLE
            .replacen("builtin = \"gpt\"", "builtin = \"mlp\"", 1)
            .replacen("layers = 2 ", "", 1)
            .replacen("width = 64 ", "", 1)
            .replacen("heads = 4 ", "", 1);
        let spec = RunSpec::parse(&text).unwrap();
        assert_eq!(
            spec.model,
            Model::Builtin(BuiltinModel {
                arch: Arch::Mlp,
                layers: 2,
                width: 256,
                heads: 0,
                context: 0
            })
        );
        let spec = RunSpec::parse(&text.replacen("builtin = \"mlp\"", "builtin = \"convnet\"", 1))
            .unwrap();
        assert_eq!(
            spec.model,
            Model::Builtin(BuiltinModel {
                arch: Arch::Convnet,
                layers: 2,
                width: 32,
                heads: 0,
                context: 0
            })
        );
    }

    #[test]
    fn datasets_are_checked_per_format() {
        // synthetic-addition: no uri, no vocab; digits, shards and samples bounded.
        check("digits = 3 ", "digits = 0 ", "dataset.digits", "[1, 9]");
        check("digits = 3 ", "digits = 10 ", "dataset.digits", "10");
        check("# shards = 64", "shards = 0", "dataset.shards", "[1, 1000000]");
        check(
            "# samples_per_shard = 4096",
            "samples_per_shard = 10000001",
            "dataset.samples_per_shard",
            "[1, 10000000]",
        );
        check(SYNTHETIC, "format = \"synthetic-addition\"\nuri = \"/x\"", "dataset.uri", "nothing");
        check(SYNTHETIC, "format = \"synthetic-addition\"\nvocab = 9", "dataset.vocab", "nothing");
        let spec = edit("# shards = 64", "shards = 5\nsamples_per_shard = 7").unwrap();
        assert_eq!(
            spec.dataset.format,
            DataFormat::SyntheticAddition { digits: 3, shards: 5, samples_per_shard: 7 }
        );

        // The others: a uri; synthetic-only keys refused; vocab for token formats only.
        let no_digits =
            |from: &str, to: &str| EXAMPLE.replacen("digits = 3 ", "", 1).replacen(from, to, 1);
        let parse = |from: &str, to: &str| RunSpec::parse(&no_digits(from, to));
        let spec = parse(SYNTHETIC, TOKENS).unwrap();
        assert_eq!(
            spec.dataset,
            Dataset { uri: "file:///d/m.json".into(), format: DataFormat::TokensU16, vocab: 256 }
        );
        let spec = parse(SYNTHETIC, "format = \"text\"\nuri = \"/data/book.txt\"").unwrap();
        assert_eq!(
            spec.dataset,
            Dataset { uri: "/data/book.txt".into(), format: DataFormat::Text, vocab: 0 }
        );
        let spec =
            parse(SYNTHETIC, "format = \"tokens-u32\"\nuri = \"/t\"\nvocab = 2147483648").unwrap();
        assert_eq!(spec.dataset.vocab, 1 << 31);
        // Over tensors, an mlp (gpt needs tokens: see `gpt_needs_tokens`).
        let tensors =
            no_digits(SYNTHETIC, "format = \"safetensors\"\nuri = \"/s.json\"\nclasses = 10")
                .replacen("builtin = \"gpt\" ", "builtin = \"mlp\" ", 1)
                .replacen("heads = 4 ", "", 1);
        let spec = RunSpec::parse(&tensors).unwrap();
        assert_eq!((spec.dataset.format, spec.dataset.vocab), (DataFormat::Safetensors, 10));

        let refused = |to: &str, field: &str, needle: &str| {
            let err = parse(SYNTHETIC, to).expect_err("should be refused");
            assert_eq!(err.field(), Some(field), "{err}");
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        };
        refused("format = \"text\"", "dataset.uri", "is missing");
        refused("format = \"text\"\nuri = \"ftp://x\"", "dataset.uri", "ftp://");
        refused("format = \"text\"\nuri = \"/t\"\nvocab = 256", "dataset.vocab", "tokens-u16");
        refused("format = \"tokens-u16\"\nuri = \"/t\"", "dataset.vocab", "is missing");
        refused("format = \"safetensors\"\nuri = \"/t\"", "dataset.classes", "is missing");
        refused("format = \"safetensors\"\nuri = \"/t\"\nclasses = 1", "dataset.classes", "[2,");
        refused("format = \"text\"\nuri = \"/t\"\nclasses = 3", "dataset.classes", "safetensors");
        refused("format = \"tokens-u16\"\nuri = \"/t\"\nvocab = 65537", "dataset.vocab", "65536");
        refused("format = \"tokens-u16\"\nuri = \"/t\"\nvocab = 1", "dataset.vocab", "[2, 65536]");
        refused(
            "format = \"tokens-u32\"\nuri = \"/t\"\nvocab = 2147483649",
            "dataset.vocab",
            "2147483648",
        );
        let err = RunSpec::parse(&EXAMPLE.replacen(SYNTHETIC, TOKENS, 1)).unwrap_err();
        assert_eq!(err.field(), Some("dataset.digits"), "{err}");
        assert!(err.to_string().contains("synthetic-addition only"), "{err}");
        let err = RunSpec::parse(&no_digits(SYNTHETIC, TOKENS).replacen(
            "# shards = 64",
            "shards = 64",
            1,
        ))
        .unwrap_err();
        assert_eq!(err.field(), Some("dataset.shards"), "{err}");
    }

    #[test]
    fn optimizer_training_sync_and_checkpoint_options() {
        check("# betas = [0.9, 0.95]", "betas = [0.9, 1.0]", "optimizer.betas", "[0, 1)");
        check("# betas = [0.9, 0.95]", "betas = [0.9]", "optimizer.betas", "two numbers");
        check("# eps = 1e-8", "eps = 0.0", "optimizer.eps", "> 0");
        check("# momentum = 0.9", "momentum = 0.5", "optimizer.momentum", "sgd only");
        check(
            "name = \"adamw\"",
            "name = \"sgd\"\nbetas = [0.9, 0.9]",
            "optimizer.betas",
            "adamw only",
        );
        check("name = \"adamw\"", "name = \"sgd\"\neps = 1e-6", "optimizer.eps", "adamw only");
        check("name = \"adamw\"", "name = \"sgd\"\nmomentum = 1.0", "optimizer.momentum", "[0, 1)");
        check("# grad_clip = 1.0", "grad_clip = -1.0", "training.grad_clip", ">= 0");
        check("# grad_clip = 1.0", "grad_clip = nan", "training.grad_clip", "finite");
        check("# seed = 0", "seed = -1", "training.seed", "");
        check("# precision = \"auto\"", "precision = \"fp16\"", "training.precision", "\"fp16\"");
        check("# bucket_mb = 25", "bucket_mb = 0", "sync.bucket_mb", "[1, 1024]");
        check("# bucket_mb = 25", "bucket_mb = 1025", "sync.bucket_mb", "1025");
        check("# keep = 3", "keep = 0", "checkpoint.keep", "[1, 1000]");
        check("# keep = 3", "keep = 1001", "checkpoint.keep", "1001");

        let spec = edit("name = \"adamw\"", "name = \"sgd\"\nmomentum = 0.5").unwrap();
        assert_eq!((spec.optimizer.kind, spec.optimizer.momentum), (OptimizerKind::Sgd, 0.5));
        let spec = edit("# betas = [0.9, 0.95]", "betas = [0.8, 0.99]\neps = 1e-6").unwrap();
        assert_eq!((spec.optimizer.betas, spec.optimizer.eps), ((0.8, 0.99), 1e-6));
        let text = EXAMPLE
            .replacen("# grad_clip = 1.0", "grad_clip = 0.0", 1)
            .replacen("# seed = 0", "seed = 18446744073709551615", 1)
            .replacen("# precision = \"auto\"", "precision = \"bf16\"", 1)
            .replacen("# bucket_mb = 25", "bucket_mb = 1024", 1)
            .replacen("# keep = 3", "keep = 1000", 1);
        // TOML integers are 64-bit signed: the largest seed is i64::MAX.
        let err = RunSpec::parse(&text).unwrap_err();
        assert!(matches!(err, RunFileError::Syntax(_)), "{err}");
        let spec = RunSpec::parse(&text.replacen("18446744073709551615", "9223372036854775807", 1))
            .unwrap();
        assert_eq!(spec.grad_clip, 0.0);
        assert_eq!(spec.seed, i64::MAX as u64);
        assert_eq!(spec.precision, Precision::Bf16);
        assert_eq!((spec.bucket_mb, spec.checkpoint_keep), (1024, 1000));
    }

    #[test]
    fn verification_defaults_and_limits() {
        let diloco = RunSpec::parse(EXAMPLE).unwrap();
        assert!(!diloco.verification.enabled(), "{:?}", diloco.verification);
        let as_ddp = EXAMPLE
            .replacen("mode = \"diloco\"", "mode = \"ddp\"", 1)
            .lines()
            .filter(|l| !(l.starts_with("inner_steps") || l.starts_with("outer_")))
            .collect::<Vec<_>>()
            .join("\n");
        let ddp = RunSpec::parse(&as_ddp).unwrap();
        assert_eq!(ddp.verification.audit_probability, 0.05);
        assert_eq!(ddp.verification.probation_probability, 0.5);
        assert_eq!((ddp.verification.probation_syncs, ddp.verification.strikes_to_evict), (20, 2));
        assert_eq!((ddp.verification.escrow_syncs, ddp.verification.require_profile), (100, false));
        let strict = RunSpec::parse(&as_ddp.replacen(
            "# require_profile = false",
            "require_profile = true",
            1,
        ))
        .unwrap();
        assert!(strict.verification.require_profile);
        let pointless = as_ddp
            .replacen("# require_profile = false", "require_profile = true", 1)
            .replacen("# audit_probability = 0.05", "audit_probability = 0.0", 1)
            .replacen("# probation_probability = 0.5", "probation_probability = 0.0", 1);
        let err = RunSpec::parse(&pointless).unwrap_err();
        assert_eq!(err.field(), Some("verification.require_profile"), "{err}");
        // diloco: off by default, on when asked (probation follows).
        let on = RunSpec::parse(&EXAMPLE.replacen(
            "# audit_probability = 0.05",
            "audit_probability = 0.1",
            1,
        ))
        .unwrap();
        assert_eq!(on.verification.audit_probability, 0.1);
        assert_eq!(on.verification.probation_probability, 0.5);
        let ddp = |from: &str, to: &str| as_ddp.replacen(from, to, 1);
        for (from, to, field) in [
            (
                "# audit_probability = 0.05",
                "audit_probability = 1.5",
                "verification.audit_probability",
            ),
            (
                "# audit_probability = 0.05",
                "audit_probability = nan",
                "verification.audit_probability",
            ),
            (
                "# probation_probability = 0.5",
                "probation_probability = -0.1",
                "verification.probation_probability",
            ),
            ("# strikes_to_evict = 2", "strikes_to_evict = 0", "verification.strikes_to_evict"),
            ("# escrow_syncs = 100", "escrow_syncs = -1", "verification.escrow_syncs"),
            ("# require_profile = false", "require_profile = 1", "verification.require_profile"),
        ] {
            let err = RunSpec::parse(&ddp(from, to)).unwrap_err();
            assert_eq!(err.field(), Some(field), "{err}");
        }
        let off =
            RunSpec::parse(&ddp("# audit_probability = 0.05", "audit_probability = 0.0")).unwrap();
        assert!(!off.verification.enabled(), "{:?}", off.verification);
        let err = RunSpec::parse(&ddp("[verification]", "[verification]\nauditors = \"all\""))
            .unwrap_err();
        assert!(err.to_string().contains("auditors"), "{err}");
    }

    #[test]
    fn missing_tables_and_syntax_errors() {
        let no_sync = EXAMPLE.split("[sync]").next().unwrap().to_owned() + "[workers]\nmin = 1\n";
        let err = RunSpec::parse(&no_sync).unwrap_err();
        assert_eq!(err.field(), Some("sync"), "{err}");
        let err = RunSpec::parse("name = \"x\"\n[model\n").unwrap_err();
        assert!(matches!(err, RunFileError::Syntax(_)), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = RunSpec::parse("").unwrap_err();
        assert_eq!(err.field(), Some("name"));
    }

    #[test]
    fn token_budgets_and_torchscript() {
        let spec = edit("steps = 600 ", "tokens = \"2.5b\"").unwrap();
        assert_eq!(spec.budget, Budget::Tokens(2_500_000_000));
        // 32 × 16 × 2 workers = 1024 tokens a step.
        assert_eq!(spec.total_steps(2), 2_500_000_000_u64.div_ceil(1024));
        let builtin =
            "builtin = \"gpt\"           # gpt (decoder-only transformer) | mlp | convnet";
        let text = EXAMPLE
            .replacen(builtin, "torchscript = \"m.pt\"", 1)
            .replacen("layers = 2 ", "", 1)
            .replacen("width = 64 ", "", 1)
            .replacen("heads = 4 ", "", 1);
        assert!(EXAMPLE.contains(builtin));
        let spec = RunSpec::parse(&text).unwrap();
        assert_eq!(spec.model, Model::TorchScript { path: "m.pt".into() });
        let err =
            RunSpec::parse(&text.replacen("torchscript", "width = 8\ntorchscript", 1)).unwrap_err();
        assert_eq!(err.field(), Some("model.width"), "{err}");
        assert!(err.to_string().contains("defines its shape"), "{err}");
        // A worker loads TorchScript from its own disk: a download URI is refused here, not by
        // every worker it is sent to.
        let local = RunSpec::parse(&text.replacen("\"m.pt\"", "\"file:///models/m.pt\"", 1));
        assert!(local.is_ok(), "{local:?}");
        for uri in ["https://example.com/m.pt", "http://h/m.pt", "s3://b/m.pt"] {
            let err = RunSpec::parse(&text.replacen("m.pt", uri, 1)).unwrap_err();
            assert_eq!(err.field(), Some("model.torchscript"), "{err}");
            assert!(err.to_string().contains("download none"), "{err}");
        }
    }

    /// gpt embeds tokens: over a safetensors dataset it is refused here, not by every worker.
    #[test]
    fn gpt_needs_tokens() {
        let tensors = "format = \"safetensors\"\nuri = \"file:///d/m.json\"\nclasses = 10";
        let text = EXAMPLE.replacen("digits = 3 ", "", 1).replacen(SYNTHETIC, tensors, 1);
        let err = RunSpec::parse(&text).unwrap_err();
        assert_eq!(err.field(), Some("model.builtin"), "{err}");
        assert!(err.to_string().contains("gpt needs tokens"), "{err}");
        let mlp = text.replacen("builtin = \"gpt\" ", "builtin = \"mlp\" ", 1).replacen(
            "heads = 4 ",
            "",
            1,
        );
        assert!(RunSpec::parse(&mlp).is_ok(), "{:?}", RunSpec::parse(&mlp));
    }

    /// A synthetic-addition sample must fit `seq_len`: refused here rather than by every
    /// worker the run is assigned to.
    #[test]
    fn an_addition_sample_fits_the_sequence() {
        check("digits = 3 ", "digits = 9 ", "training.seq_len", "9-digit addition sample is 31");
        for digits in 1..=9u32 {
            let min = addition_sample_len(digits) - 1;
            let text = EXAMPLE.replacen("digits = 3 ", &format!("digits = {digits} "), 1).replacen(
                "seq_len = 16 ",
                &format!("seq_len = {min} "),
                1,
            );
            let spec = RunSpec::parse(&text).unwrap();
            assert_eq!(spec.seq_len, min);
            let short =
                text.replacen(&format!("seq_len = {min} "), &format!("seq_len = {} ", min - 1), 1);
            let err = RunSpec::parse(&short).unwrap_err();
            assert_eq!(err.field(), Some("training.seq_len"), "{err}");
        }
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count("124m"), Some(124_000_000));
        assert_eq!(parse_count("1.3B"), Some(1_300_000_000));
        assert_eq!(parse_count("500"), Some(500));
        assert_eq!(parse_count("x"), None);
        assert_eq!(parse_count("-5k"), None);
        assert_eq!(parse_count(""), None);
    }
}
