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
pub const EXAMPLE: &str = r#"# longhaul run file. Submit with `longhaul submit run.toml --follow`.
# Every field is documented; remove the optional ones you do not need.

# A name for humans (letters, digits, '-', '_', '.'; at most 63 characters).
name = "gpt2-small-wikitext"

[model]
# Either a built-in architecture and size...
builtin = "gpt2"          # gpt2 | llama | mlp
size = "124m"             # a parameter count with k, m or b (e.g. "350m", "1.3b")
# ...or a TorchScript module (a path on every worker, or an https:// URI):
# torchscript = "models/my_model.pt"

[dataset]
# A manifest listing the shards (URI, size, sha256), as file://, https:// or a path.
uri = "file:///data/wikitext/manifest.json"
format = "tokens-u16"     # tokens-u16 | tokens-u32 | jsonl | text

[optimizer]
name = "adamw"            # adamw | sgd | lion
lr = 3e-4                 # peak learning rate, > 0
weight_decay = 0.1        # >= 0
# betas = [0.9, 0.95]     # adamw and lion only

[schedule]
kind = "cosine"           # constant | linear | cosine
warmup_steps = 200
min_lr = 3e-5             # floor for linear and cosine, <= lr

[training]
batch_size = 16           # sequences per worker per step
seq_len = 1024
steps = 10000             # total optimizer steps; or a token budget instead:
# tokens = "2.5b"         # k, m, b suffixes allowed

[sync]
mode = "diloco"           # ddp (all-reduce every step) | diloco (every inner_steps, outer optimizer)
inner_steps = 500         # diloco only: local steps between synchronisations
outer_lr = 0.7            # diloco only: outer Nesterov learning rate
outer_momentum = 0.9      # diloco only: in [0, 1)
compression = "int8"      # none | bf16 | int8, applied to what crosses the ring

[workers]
min = 2                   # the run waits for this many live workers
max = 16                  # workers beyond this stay idle
# restart_budget = 5      # epoch restarts after failures before the run is failed (default 10)

[checkpoint]
interval_steps = 500      # a checkpoint every this many committed steps
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
    pub sync: SyncMode,
    pub compression: Compression,
    pub min_workers: u32,
    pub max_workers: u32,
    pub restart_budget: u32,
    pub checkpoint_interval: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Model {
    Builtin { arch: Arch, params: u64 },
    TorchScript { path: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    Llama,
    Mlp,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub uri: String,
    pub format: DataFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    TokensU16,
    TokensU32,
    Jsonl,
    Text,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: Option<(f64, f64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    AdamW,
    Sgd,
    Lion,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    builtin: Option<String>,
    size: Option<String>,
    torchscript: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    uri: Option<String>,
    format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptimizer {
    name: Option<String>,
    lr: Option<f64>,
    weight_decay: Option<f64>,
    betas: Option<Vec<f64>>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    mode: Option<String>,
    inner_steps: Option<u32>,
    outer_lr: Option<f64>,
    outer_momentum: Option<f64>,
    compression: Option<String>,
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
struct RawCheckpoint {
    interval_steps: Option<u64>,
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
        let name = required(self.name, "name", "a run name such as \"gpt2-small\"")?;
        if !check_name(&name) {
            return Err(invalid("name", &name, "1 to 63 letters, digits, '-', '_' or '.'"));
        }

        let m = required(self.model, "model", "a [model] table")?;
        let model = match (m.builtin, m.torchscript) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "model.torchscript",
                    "set together with model.builtin",
                    "either `builtin` (with `size`) or `torchscript`, not both",
                ));
            }
            (None, None) => {
                return Err(RunFileError::Missing {
                    field: "model.builtin",
                    expected: "`builtin` (with `size`) or `torchscript`",
                });
            }
            (Some(b), None) => {
                let arch = choice(
                    &b,
                    "model.builtin",
                    &[("gpt2", Arch::Gpt2), ("llama", Arch::Llama), ("mlp", Arch::Mlp)],
                )?;
                let size = required(m.size, "model.size", "a parameter count such as \"124m\"")?;
                let params = parse_count(&size).ok_or_else(|| {
                    invalid("model.size", &size, "a parameter count such as \"124m\" or \"1.3b\"")
                })?;
                Model::Builtin { arch, params }
            }
            (None, Some(path)) => {
                if m.size.is_some() {
                    return Err(invalid(
                        "model.size",
                        m.size.unwrap_or_default(),
                        "no `size` with `torchscript` (the module defines its size)",
                    ));
                }
                if path.trim().is_empty() {
                    return Err(invalid("model.torchscript", &path, "a path or URI to a .pt file"));
                }
                Model::TorchScript { path }
            }
        };

        let d = required(self.dataset, "dataset", "a [dataset] table")?;
        let uri = required(d.uri, "dataset.uri", "the URI of a shard manifest")?;
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
                "a file://, https://, longhaul:// URI or a path to a shard manifest",
            ));
        }
        let format = choice(
            &required(
                d.format,
                "dataset.format",
                "one of \"tokens-u16\", \"tokens-u32\", \"jsonl\", \"text\"",
            )?,
            "dataset.format",
            &[
                ("tokens-u16", DataFormat::TokensU16),
                ("tokens-u32", DataFormat::TokensU32),
                ("jsonl", DataFormat::Jsonl),
                ("text", DataFormat::Text),
            ],
        )?;

        let o = required(self.optimizer, "optimizer", "an [optimizer] table")?;
        let kind = choice(
            &required(o.name, "optimizer.name", "one of \"adamw\", \"sgd\", \"lion\"")?,
            "optimizer.name",
            &[
                ("adamw", OptimizerKind::AdamW),
                ("sgd", OptimizerKind::Sgd),
                ("lion", OptimizerKind::Lion),
            ],
        )?;
        let lr = positive(required(o.lr, "optimizer.lr", "a learning rate > 0")?, "optimizer.lr")?;
        let weight_decay = o.weight_decay.unwrap_or(0.0);
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(invalid("optimizer.weight_decay", weight_decay, "a finite number >= 0"));
        }
        let betas = match o.betas {
            None => None,
            Some(_) if kind == OptimizerKind::Sgd => {
                return Err(invalid("optimizer.betas", "set", "no `betas` with \"sgd\""));
            }
            Some(b) if b.len() == 2 && b.iter().all(|x| (0.0..1.0).contains(x)) => {
                Some((b[0], b[1]))
            }
            Some(b) => return Err(invalid("optimizer.betas", b, "two numbers in [0, 1)")),
        };
        let optimizer = Optimizer { kind, lr, weight_decay, betas };

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

        let s = required(self.sync, "sync", "a [sync] table")?;
        let mode = required(s.mode, "sync.mode", "\"ddp\" or \"diloco\"")?;
        let sync = match mode.as_str() {
            "ddp" => {
                for (set, field) in [
                    (s.inner_steps.is_some(), "sync.inner_steps"),
                    (s.outer_lr.is_some(), "sync.outer_lr"),
                    (s.outer_momentum.is_some(), "sync.outer_momentum"),
                ] {
                    if set {
                        return Err(invalid(
                            field,
                            "set",
                            "nothing with mode = \"ddp\" (diloco only)",
                        ));
                    }
                }
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
                let outer_momentum = s.outer_momentum.unwrap_or(0.9);
                if !(0.0..1.0).contains(&outer_momentum) {
                    return Err(invalid(
                        "sync.outer_momentum",
                        outer_momentum,
                        "a number in [0, 1)",
                    ));
                }
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

        let checkpoint_interval = match self.checkpoint.and_then(|c| c.interval_steps) {
            None => 1000,
            Some(0) => return Err(invalid("checkpoint.interval_steps", 0, "an integer >= 1")),
            Some(n) => n,
        };

        Ok(RunSpec {
            name,
            model,
            dataset: Dataset { uri, format },
            optimizer,
            schedule,
            batch_size,
            seq_len,
            budget,
            sync,
            compression,
            min_workers,
            max_workers,
            restart_budget,
            checkpoint_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_parses() {
        let spec = RunSpec::parse(EXAMPLE).unwrap();
        assert_eq!(spec.name, "gpt2-small-wikitext");
        assert_eq!(spec.model, Model::Builtin { arch: Arch::Gpt2, params: 124_000_000 });
        assert_eq!(spec.budget, Budget::Steps(10_000));
        assert_eq!(
            spec.sync,
            SyncMode::Diloco { inner_steps: 500, outer_lr: 0.7, outer_momentum: 0.9 }
        );
        assert_eq!(spec.compression, Compression::Int8);
        assert_eq!((spec.min_workers, spec.max_workers), (2, 16));
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

    #[test]
    fn each_kind_of_bad_file_names_field_value_and_expectation() {
        check("inner_steps = 500", "inner_steps = \"ten\"", "sync.inner_steps", "\"ten\"");
        check(
            "inner_steps = 500",
            "inner_steps = 0",
            "sync.inner_steps",
            "expected an integer >= 1",
        );
        check("mode = \"diloco\"", "mode = \"fsdp\"", "sync.mode", "one of \"ddp\", \"diloco\"");
        check("compression = \"int8\"", "compression = \"fp4\"", "sync.compression", "\"fp4\"");
        check("outer_momentum = 0.9", "outer_momentum = 1.5", "sync.outer_momentum", "[0, 1)");
        check("builtin = \"gpt2\"", "builtin = \"gpt5\"", "model.builtin", "\"gpt5\"");
        check("size = \"124m\"", "size = \"huge\"", "model.size", "\"huge\"");
        check("lr = 3e-4", "lr = -1.0", "optimizer.lr", "> 0");
        check("min = 2", "min = 0", "workers.min", ">= 1");
        check("max = 16", "max = 1", "workers.max", "workers.min = 2");
        check("batch_size = 16", "batch_size = -3", "training.batch_size", "-3");
        check("steps = 10000", "steps = 10000\ntokens = 5", "training.tokens", "not both");
        check("uri = \"file://", "uri = \"ftp://", "dataset.uri", "ftp://");
        check("format = \"tokens-u16\"", "format = \"csv\"", "dataset.format", "\"csv\"");
        check("interval_steps = 500", "interval_steps = 0", "checkpoint.interval_steps", ">= 1");
        check(
            "interval_steps = 500",
            "interval_step = 500",
            "checkpoint.interval_step",
            "unknown field `interval_step`",
        );
        check("name = \"gpt2-small-wikitext\"", "name = \"a b\"", "name", "\"a b\"");
        check("name = \"gpt2-small-wikitext\"", "", "name", "is missing");
        check("min_lr = 3e-5", "min_lr = 1.0", "schedule.min_lr", "optimizer.lr");
        // ddp refuses diloco-only fields.
        check("mode = \"diloco\"", "mode = \"ddp\"", "sync.inner_steps", "diloco only");
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
        let spec = edit("steps = 10000", "tokens = \"2.5b\"").unwrap();
        assert_eq!(spec.budget, Budget::Tokens(2_500_000_000));
        // 16 × 1024 × 2 workers = 32768 tokens a step.
        assert_eq!(spec.total_steps(2), 2_500_000_000_u64.div_ceil(32768));
        let spec = edit(
            "builtin = \"gpt2\"          # gpt2 | llama | mlp\nsize = \"124m\"",
            "torchscript = \"m.pt\"",
        )
        .unwrap();
        assert_eq!(spec.model, Model::TorchScript { path: "m.pt".into() });
        check(
            "builtin = \"gpt2\"",
            "torchscript = \"m.pt\"\nbuiltin = \"gpt2\"",
            "model.torchscript",
            "not both",
        );
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
