//! The trainer: model, optimizer and synchronisation, on its own OS thread. The only module of
//! longhaul that names `tch`.
//!
//! One [`Trainer`] holds the replica. The driver (`crate::run`) feeds it batches and a
//! [`Comm`](crate::comm::Comm) per epoch:
//!
//! - **ddp**: [`Trainer::forward_backward`], then [`Trainer::ddp_sync`]: the local gradient is
//!   the contribution, summed over the ring by plan (below), clipped, and the optimizer applied.
//!   A failed sync leaves the parameters as they were and keeps the local gradients, so the
//!   step is retried in the next epoch.
//! - **diloco**: `inner_steps` local steps ([`Trainer::apply_local`]), then
//!   [`Trainer::diloco_sync`]: the pseudo-gradient `global − local` is the contribution, summed
//!   by plan (optionally bf16 or int8 on the wire), and an outer Nesterov step on the global
//!   parameters, which every member then adopts.
//!
//! # Every sync goes by plan
//!
//! No member's word about another counts, and none can write into another's entry: a member
//! commits the norms of its own contribution, per ring segment, to the coordinator
//! ([`Coordinate::plan`]), and every member gets the same plan back: one coefficient per member
//! (equal shares, each clipped to the median contributor's norm; 0 for the excluded). Each
//! scales its own contribution, and the ring sums with every partial sum checked at every hop
//! against the declared norms (`collectives::Group::all_reduce_bounded`): a member that sends
//! more than it declared is named by its successor and nothing is applied. The sum is checked
//! again (finite, within the plan's bound) before anything is applied.
//!
//! After every sync the replicated state is hashed ([`Trainer::hash`]: the parameters and, in
//! ddp, the optimizer state; in diloco the global parameters and the outer momentum); the
//! coordinator records a step when a majority of the members report the same hash. At the
//! start of each epoch [`Trainer::agree`] follows the coordinator's decision: the named source
//! sends the recorded state to the members that lack it, which check it (size, finite, bounded,
//! hash) before adopting it.

pub mod checkpoint;
pub mod data;
pub mod model;
pub mod optim;
pub mod plan;
pub mod state;

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use collectives::Compression;
use collectives::group::OpError;
use proto::ParamHash;
use tch::{Device, Kind, Tensor, nn};

use crate::comm::Comm;
use crate::schedule::LrSchedule;
use data::Batch;
use model::{ModelConfig, Net};
use optim::{OptimConfig, Optimizer, Outer};

/// How replicas synchronise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SyncMode {
    Ddp,
    Diloco { inner_steps: u64, outer_lr: f64, outer_momentum: f64 },
}

/// Where the model comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    Builtin(ModelConfig),
    TorchScript(PathBuf),
}

/// Everything the trainer needs, derived from the run file (see `crate::spec`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainSpec {
    pub model: ModelSource,
    pub optim: OptimConfig,
    pub schedule: LrSchedule,
    pub grad_clip: f64,
    pub seed: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub sync: SyncMode,
    pub compression: Compression,
    pub device: Device,
    /// Elements per ddp bucket.
    pub bucket_elems: usize,
}

/// Why training cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("model: {0}")]
    Model(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("collective: {0}")]
    Comm(#[from] OpError),
    #[error("state: {0}")]
    State(String),
    #[error("non-finite {what} at step {step}: refusing to apply it")]
    NonFinite { what: &'static str, step: u64 },
    /// The sum of a sync is not consistent with the plan (larger than the members declared):
    /// nothing was applied.
    #[error("the sum of step {step} is inconsistent with the plan: {detail}")]
    Inconsistent { step: u64, detail: String },
    /// The state the agreement's source (a rank) sent failed its checks: nothing was adopted.
    #[error("the state rank {rank} sent is unusable: {detail}")]
    BadState { rank: usize, detail: String },
    /// Waiting for the coordinator's plan ended (the attempt was cancelled or the link closed).
    #[error("no plan: {0}")]
    NoPlan(String),
}

/// What a member commits to about its contribution to the sync at `step`, before it enters the
/// ring: its statistics (the L2 norm on each ring segment, and in all), its inputs (the state it
/// trained from, the data it read) and a digest of the contribution itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Commitment {
    pub step: u64,
    pub segment_norms: Vec<f32>,
    pub start_hash: ParamHash,
    pub spans: Vec<data::Span>,
    pub samples: u64,
    /// SHA-256 of the contribution as little-endian f32 values.
    pub digest: [u8; 32],
    pub norm: f32,
    /// The member spent this sync on that audit (its contribution is zeros).
    pub audit: Option<u64>,
    /// diloco with audits: SHA-256 of its inner optimizer state at the round's start and now,
    /// and its length in bytes.
    pub inner: Option<([u8; 32], [u8; 32])>,
    pub inner_bytes: u64,
}

impl Commitment {
    /// The commitment to `contribution`, cut into `world` ring segments.
    pub fn of(
        step: u64,
        contribution: &[f32],
        world: usize,
        start_hash: ParamHash,
        mut spans: Vec<data::Span>,
        mut samples: u64,
    ) -> Self {
        if spans.len() > proto::MAX_COMMIT_SPANS {
            spans.truncate(proto::MAX_COMMIT_SPANS);
            samples = spans.iter().map(|s| s.to - s.from).sum();
        }
        let segment_norms: Vec<f32> = collectives::segments(world, contribution.len())
            .into_iter()
            .map(|r| {
                let n = contribution[r]
                    .iter()
                    .map(|v| f64::from(*v) * f64::from(*v))
                    .sum::<f64>()
                    .sqrt();
                // Rounded up, so that the f32 declaration never understates the contribution.
                let f = n as f32;
                if f64::from(f) < n { f.next_up() } else { f }
            })
            .collect();
        let norm =
            segment_norms.iter().map(|n| f64::from(*n) * f64::from(*n)).sum::<f64>().sqrt() as f32;
        Self {
            step,
            segment_norms,
            start_hash,
            spans,
            samples,
            digest: digest(contribution),
            norm,
            audit: None,
            inner: None,
            inner_bytes: 0,
        }
    }
}

/// The SHA-256 of a contribution as little-endian f32 values: what a commitment names, and
/// what an auditor's recomputation must equal.
pub fn digest(contribution: &[f32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    // In blocks, so that the hash runs over whole buffers (SHA-NI where the CPU has it).
    let mut bytes = Vec::with_capacity(4 * 16_384);
    for block in contribution.chunks(16_384) {
        bytes.clear();
        bytes.extend(block.iter().flat_map(|v| v.to_le_bytes()));
        h.update(&bytes);
    }
    h.finalize().into()
}

/// SHA-256 of bytes (an inner optimizer state).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Inner optimizer states by SHA-256, oldest first.
type KeptStates = VecDeque<([u8; 32], std::sync::Arc<Vec<u8>>)>;

/// diloco with audits: the inner optimizer states this member held at the start of its last
/// rounds, by SHA-256 (newest last), shared with the side that uploads one when an audit of
/// that round asks for it (`UploadRequest.inner_sha256`).
#[derive(Clone, Debug, Default)]
pub struct InnerStates(std::sync::Arc<std::sync::Mutex<KeptStates>>);

impl InnerStates {
    /// Keeps `blob` under `digest`, and at most `window` states.
    fn keep(&self, digest: [u8; 32], blob: std::sync::Arc<Vec<u8>>, window: usize) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !q.iter().any(|(d, _)| *d == digest) {
            q.push_back((digest, blob));
        }
        while q.len() > window {
            q.pop_front();
        }
    }

    /// The state with SHA-256 `digest`, if still kept.
    pub fn get(&self, digest: &[u8; 32]) -> Option<std::sync::Arc<Vec<u8>>> {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().find(|(d, _)| d == digest).map(|(_, b)| b.clone())
    }
}

/// Zeroes the gradients of `params` (those that have one).
fn zero_grads(params: &[Tensor]) {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// The coordinator's plan of one sync, the same for every member: per member the coefficient it
/// scales its contribution by, and every member's declared segment norms (member-major).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub step: u64,
    pub coefficients: Vec<f32>,
    pub declared: Vec<f32>,
}

impl Plan {
    /// The plan as hop-check bounds for a ring of `world`; an error if it is malformed.
    fn bounds(&self, world: usize) -> Result<collectives::Bounds, String> {
        if self.coefficients.len() != world || self.declared.len() != world * world {
            return Err(format!(
                "{} coefficients and {} norms for a ring of {world}",
                self.coefficients.len(),
                self.declared.len()
            ));
        }
        let ok = |v: &f32| v.is_finite() && *v >= 0.0;
        if !self.coefficients.iter().all(ok) || !self.declared.iter().all(ok) {
            return Err("non-finite or negative values".into());
        }
        let norms = (0..world)
            .map(|r| {
                let c = f64::from(self.coefficients[r]);
                (0..world).map(|s| c * f64::from(self.declared[r * world + s])).collect()
            })
            .collect();
        Ok(collectives::Bounds { norms })
    }
}

/// What the trainer asks of the coordinator during a sync.
pub trait Coordinate {
    /// Commits this member's statistics and returns the plan, once every member committed.
    fn plan(&mut self, commitment: &Commitment) -> Result<Plan, TrainError>;
}

/// The coordinator's decision for the start of an epoch (ranks are positions in the ring).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreement {
    pub step: u64,
    /// `None` with step 0: the seeded initial state, which receivers rebuild themselves.
    pub hash: Option<ParamHash>,
    pub source: usize,
    pub receivers: Vec<usize>,
    /// diloco: the ranks whose progress in the round under way counts.
    pub contributors: Vec<usize>,
}

/// What one forward/backward pass measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    pub loss: f64,
    pub correct: i64,
    pub counted: i64,
    pub samples: i64,
    pub tokens: i64,
}

/// DiLoCo's global state.
#[derive(Debug)]
struct OuterState {
    /// Parameters at the last synchronisation, flat f32 on the CPU.
    global: Tensor,
    /// Nesterov momentum, flat f32 on the CPU.
    momentum: Tensor,
}

/// One replica.
#[derive(Debug)]
pub struct Trainer {
    spec: TrainSpec,
    _vs: nn::VarStore,
    net: Box<dyn Net>,
    names: Vec<String>,
    params: Vec<Tensor>,
    opt: Optimizer,
    /// Optimizer steps taken (inner steps in diloco).
    step: u64,
    /// The step of the last synchronisation; the state at it is what replicas agree on.
    sync_step: u64,
    /// diloco: the step from which this replica's local progress counts toward the next sync.
    inner_start: u64,
    outer: Option<OuterState>,
    hash: ParamHash,
    /// ddp: flat local gradients computed but not yet synchronised.
    pending: Option<Vec<f32>>,
    /// Time spent computing (forward, backward, optimizer).
    compute: Duration,
    /// Samples trained on since the last synchronisation.
    samples_since_sync: u64,
    /// The data read since the last sync, for the next commitment.
    round_spans: Vec<data::Span>,
    last_grad_norm: f64,
    /// The coefficient the last sync's plan gave this member (0: it was left out).
    last_coefficient: f32,
    /// Fault injection for tests: from this step on, what this member sends is corrupted.
    poison: Option<Poison>,
    /// `PoisonKind::Replay`: the contribution it replays, and the sync it was made for.
    replayed: Option<(u64, Vec<f32>)>,
    /// With audits: the states (parameters; in diloco the global ones) of the last syncs, by
    /// hash, with their sync step, so that this member can recompute another's contribution to
    /// one of them (newest last).
    snapshots: VecDeque<(ParamHash, u64, Vec<Tensor>)>,
    audit_window: usize,
    /// This member's rank in its ring (the dropout seed of its ddp steps).
    rank: usize,
    /// This member's worker id (the dropout seed of its diloco inner steps, which must not
    /// depend on a rank that can change within a round).
    member: u64,
    /// diloco with audits: the inner optimizer state at the start of the round that began at
    /// this step, and the states kept for audits of this member's rounds.
    inner_round: Option<(u64, std::sync::Arc<Vec<u8>>)>,
    inner_states: InnerStates,
    /// The audit this member spends its pending sync on.
    auditing: Option<u64>,
}

/// libtorch's generator is process-global: it is seeded and used for initialisation under this
/// lock, so trainers built on several threads at once still get the seeded bits.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The seed of the random numbers (dropout) of the ddp step toward sync `step` of the member of
/// `rank`: a function of public values, so that an auditor draws the same.
fn step_seed(run_seed: u64, step: u64, rank: usize) -> i64 {
    let mut x = run_seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank as u64).rotate_left(32);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 1) as i64
}

/// A corruption of what a member sends (fault injection, for the chaos and adversary tests).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Poison {
    pub after_step: u64,
    pub kind: PoisonKind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PoisonKind {
    /// NaN in every value, declared as such (its own commitment is evidence against it).
    Nan,
    /// Every value times 1e30, declared truthfully (the plan clips or leaves it out).
    Huge,
    /// The contribution scaled by this factor after committing the honest norms (a ×−999
    /// sign flip with an honest-looking norm; a 1e30 diloco delta declared as normal): the
    /// member's successor catches the partial sum that exceeds what was declared.
    Lie(f32),
    /// Zeros, declared as zeros (a lazy worker): left out of every sync.
    Zero,
    /// Its contribution to an earlier sync again, committed as it is (credit without training):
    /// its commitment's digest is the one it committed before.
    Replay,
    /// ddp: the gradient of the first half of its batch, committed as the whole batch's (half
    /// the work for full credit; its commitment is honest about everything else), at every
    /// `every`-th step (1: always; 5: a fifth of its syncs): audits catch it.
    Half { every: u64 },
}

impl PoisonKind {
    /// Reads `nan`, `huge`, `zero`, `replay`, `half`, `half/<every>` (for example `half/5`) or
    /// `lie:<factor>` (for example `lie:-999`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "nan" => Ok(Self::Nan),
            "huge" => Ok(Self::Huge),
            "zero" => Ok(Self::Zero),
            "replay" => Ok(Self::Replay),
            "half" => Ok(Self::Half { every: 1 }),
            other => {
                if let Some(Ok(f)) = other.strip_prefix("lie:").map(str::parse::<f32>)
                    && f.is_finite()
                {
                    return Ok(Self::Lie(f));
                }
                if let Some(Ok(every)) = other.strip_prefix("half/").map(str::parse::<u64>)
                    && every > 0
                {
                    return Ok(Self::Half { every });
                }
                Err(format!(
                    "unknown poison {other:?}: nan, huge, zero, replay, half, half/<every> or \
                     lie:<factor>"
                ))
            }
        }
    }
}

impl Trainer {
    /// Builds the replica: every trainer built from the same spec holds the same bits.
    pub fn new(spec: TrainSpec) -> Result<Self, TrainError> {
        let _init = RNG.lock().unwrap_or_else(|p| p.into_inner());
        tch::manual_seed(spec.seed as i64);
        let vs = nn::VarStore::new(spec.device);
        let net: Box<dyn Net> = match &spec.model {
            ModelSource::Builtin(cfg) => {
                model::build(&vs.root(), cfg).map_err(TrainError::Model)?
            }
            ModelSource::TorchScript(path) => {
                Box::new(model::Scripted::load(&vs.root(), path).map_err(TrainError::Model)?)
            }
        };
        let mut named: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        if named.is_empty() {
            return Err(TrainError::Model("the model has no trainable parameters".into()));
        }
        let (names, params): (Vec<String>, Vec<Tensor>) = named.into_iter().unzip();
        // Give every parameter a gradient tensor (zeros), so parameters that take no part in
        // a loss still receive the others' gradients in a sync.
        let zero: Tensor = params.iter().map(|p| p.sum(Kind::Float) * 0.0).sum();
        zero.f_backward()?;
        let opt = Optimizer::new(spec.optim, &params);
        let mut t = Self {
            spec,
            _vs: vs,
            net,
            names,
            params,
            opt,
            step: 0,
            sync_step: 0,
            inner_start: 0,
            outer: None,
            hash: ParamHash(0),
            pending: None,
            compute: Duration::ZERO,
            samples_since_sync: 0,
            round_spans: Vec::new(),
            last_grad_norm: 0.0,
            last_coefficient: 0.0,
            poison: None,
            replayed: None,
            snapshots: VecDeque::new(),
            audit_window: 0,
            rank: 0,
            member: 0,
            inner_round: None,
            inner_states: InnerStates::default(),
            auditing: None,
        };
        if matches!(t.spec.sync, SyncMode::Diloco { .. }) {
            let global = state::flatten(&t.params);
            t.outer = Some(OuterState { momentum: global.zeros_like(), global });
        }
        t.hash = t.compute_hash();
        Ok(t)
    }

    /// Parameter names in their fixed order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The parameters in their fixed order.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The number of trainable scalars.
    pub fn numel(&self) -> usize {
        self.params.iter().map(|p| p.numel()).sum()
    }

    /// The hash of the synchronised, replicated state: what every member of a ring holds
    /// bitwise after a sync.
    pub fn hash(&self) -> ParamHash {
        self.hash
    }

    /// What this replica trains.
    pub fn spec(&self) -> &TrainSpec {
        &self.spec
    }

    /// Optimizer steps taken (inner steps in diloco).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The step of the last synchronisation: the state at it is what replicas agree on.
    pub fn sync_step(&self) -> u64 {
        self.sync_step
    }

    /// Time spent computing (forward, backward, optimizer) so far.
    pub fn compute(&self) -> Duration {
        self.compute
    }

    /// The gradient norm of the last step.
    pub fn last_grad_norm(&self) -> f64 {
        self.last_grad_norm
    }

    /// The coefficient the last sync's plan gave this member (0: it was left out).
    pub fn last_coefficient(&self) -> f32 {
        self.last_coefficient
    }

    /// Fault injection for tests: from `poison.after_step` on, what this member sends is
    /// corrupted.
    pub fn set_poison(&mut self, poison: Option<Poison>) {
        self.poison = poison;
    }

    /// ddp: the parameters, the optimizer state and its step count; diloco: the global
    /// parameters and the outer momentum (the inner optimizer state is each member's own).
    fn compute_hash(&self) -> ParamHash {
        ParamHash(match &self.outer {
            Some(o) => {
                state::hash_tensors(&[o.global.shallow_clone(), o.momentum.shallow_clone()], &[])
            }
            None => {
                let mut ts: Vec<Tensor> = self.params.iter().map(|p| p.shallow_clone()).collect();
                ts.extend(self.opt.tensors());
                state::hash_tensors(&ts, &[self.opt.steps as u64])
            }
        })
    }

    /// Runs the model and back-propagates the batch's mean loss. Gradients replace any earlier
    /// ones; a ddp step computed but not synchronised is discarded.
    pub fn forward_backward(&mut self, batch: &Batch) -> Result<StepStats, TrainError> {
        let t = Instant::now();
        self.pending = None;
        self.auditing = None;
        zero_grads(&self.params);
        {
            let _rng = RNG.lock().unwrap_or_else(|p| p.into_inner());
            tch::manual_seed(self.seed_of_next_step());
        }
        let half;
        let trained = match self.poison {
            Some(Poison { after_step, kind: PoisonKind::Half { every } })
                if self.step >= after_step
                    && batch.samples > 1
                    && (self.step + 1).is_multiple_of(every) =>
            {
                half = batch.head(batch.samples / 2);
                &half
            }
            _ => batch,
        };
        let inputs = trained.inputs.to_device(self.spec.device);
        let logits = self.net.forward_t(&inputs, true)?;
        let (loss, (correct, counted)) = data::loss_and_accuracy(&logits, trained);
        loss.f_backward()?;
        let loss = loss.double_value(&[]);
        self.compute += t.elapsed();
        if !loss.is_finite() {
            return Err(TrainError::NonFinite { what: "loss", step: self.step });
        }
        self.samples_since_sync += batch.samples as u64;
        data::extend_spans(&mut self.round_spans, &batch.spans);
        Ok(StepStats { loss, correct, counted, samples: batch.samples, tokens: batch.tokens })
    }

    /// The dropout seed of the next step: in ddp a function of the member's rank in the sync, in
    /// diloco of its worker id (a round can span epochs, and ranks with them).
    fn seed_of_next_step(&self) -> i64 {
        match self.spec.sync {
            SyncMode::Ddp => step_seed(self.spec.seed, self.step + 1, self.rank),
            SyncMode::Diloco { .. } => {
                step_seed(self.spec.seed, self.step + 1, self.member as usize)
            }
        }
    }

    /// This member's worker id (its diloco dropout seeds) and where the inner optimizer states
    /// of its rounds are kept for audits (diloco).
    pub fn set_member(&mut self, member: u64, inner_states: InnerStates) {
        self.member = member;
        self.inner_states = inner_states;
    }

    /// Evaluates without gradients: loss and (correct, counted).
    pub fn evaluate(&self, batch: &Batch) -> Result<StepStats, TrainError> {
        let _guard = tch::no_grad_guard();
        let logits = self.net.forward_t(&batch.inputs.to_device(self.spec.device), false)?;
        let (loss, (correct, counted)) = data::loss_and_accuracy(&logits, batch);
        Ok(StepStats {
            loss: loss.double_value(&[]),
            correct,
            counted,
            samples: batch.samples,
            tokens: batch.tokens,
        })
    }

    /// Clips and applies the current gradients locally (diloco's inner step; a single process).
    pub fn apply_local(&mut self) -> Result<(), TrainError> {
        let t = Instant::now();
        if self.audit_window > 0
            && self.outer.is_some()
            && self.step == self.inner_start
            && self.inner_round.as_ref().is_none_or(|(s, _)| *s != self.inner_start)
        {
            self.inner_round = Some((self.inner_start, std::sync::Arc::new(self.inner_blob())));
        }
        let norm = optim::clip_grad_norm(&self.params, self.spec.grad_clip);
        if !norm.is_finite() {
            return Err(TrainError::NonFinite { what: "gradient norm", step: self.step });
        }
        self.last_grad_norm = norm;
        self.opt.step(&self.params, self.spec.schedule.at(self.step));
        self.step += 1;
        if matches!(self.spec.sync, SyncMode::Ddp) {
            self.sync_step = self.step;
            self.hash = self.compute_hash();
        }
        self.compute += t.elapsed();
        Ok(())
    }

    /// ddp: sums the gradients over `comm` by the coordinator's plan, then clips and applies
    /// them. On error nothing changed and the local gradients are kept for a retry.
    pub fn ddp_sync(
        &mut self,
        comm: &mut dyn Comm,
        coord: &mut dyn Coordinate,
    ) -> Result<(), TrainError> {
        let t = Instant::now();
        let local = match self.pending.take() {
            Some(g) => g,
            None => state::to_vec(&state::flatten_grads(&self.params)),
        };
        if local.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::NonFinite { what: "gradient", step: self.step });
        }
        self.compute += t.elapsed();
        // On failure the local gradients are kept for the retry.
        let buf = match self.planned_sum(comm, coord, &local, self.step + 1, None) {
            Ok(b) => b,
            Err(e) => {
                self.pending = Some(local);
                return Err(e);
            }
        };
        let t = Instant::now();
        if self.audit_window > 0 {
            // The state this sync started from, for audits of the members' contributions.
            let copy: Vec<Tensor> = self.params.iter().map(|p| p.detach().copy()).collect();
            self.keep_snapshot(copy);
        }
        state::unflatten_into_grads(&buf, &self.params);
        self.compute += t.elapsed();
        self.apply_local()?;
        self.samples_since_sync = 0;
        self.round_spans.clear();
        self.auditing = None;
        Ok(())
    }

    /// Keeps `params` as the state of hash `self.hash` (at sync `self.sync_step`) for audits.
    fn keep_snapshot(&mut self, params: Vec<Tensor>) {
        self.snapshots.retain(|(h, _, _)| *h != self.hash);
        self.snapshots.push_back((self.hash, self.sync_step, params));
        while self.snapshots.len() > self.audit_window {
            self.snapshots.pop_front();
        }
    }

    /// Keeps the states of the last `syncs` syncs, so that this member can audit the
    /// contributions to them (0: none kept, no audits).
    pub fn set_audit_window(&mut self, syncs: usize) {
        self.audit_window = syncs;
        while self.snapshots.len() > syncs {
            self.snapshots.pop_front();
        }
    }

    /// ddp: recomputes the contribution a member of `rank` made to sync `step` from the state
    /// `start` (one this member held) and `batch` (that member's data, as it committed it):
    /// the same computation as [`Trainer::forward_backward`] on the same inputs. This member's
    /// own state and gradients are as before afterwards.
    pub fn audit(
        &mut self,
        start: ParamHash,
        batch: &Batch,
        step: u64,
        rank: usize,
    ) -> Result<Vec<f32>, TrainError> {
        let t = Instant::now();
        let Some((_, _, snapshot)) = self.snapshots.iter().find(|(h, _, _)| *h == start) else {
            return Err(TrainError::State(format!("no longer holds state {start}")));
        };
        let own: Vec<Tensor> = self.params.iter().map(|p| p.detach().copy()).collect();
        let load = |params: &[Tensor], from: &[Tensor]| {
            let _guard = tch::no_grad_guard();
            for (p, s) in params.iter().zip(from) {
                p.shallow_clone().copy_(s);
            }
        };
        load(&self.params, snapshot);
        zero_grads(&self.params);
        let result = (|| {
            {
                let _rng = RNG.lock().unwrap_or_else(|p| p.into_inner());
                tch::manual_seed(step_seed(self.spec.seed, step, rank));
            }
            let logits = self.net.forward_t(&batch.inputs.to_device(self.spec.device), true)?;
            let (loss, _) = data::loss_and_accuracy(&logits, batch);
            loss.f_backward()?;
            Ok(state::to_vec(&state::flatten_grads(&self.params)))
        })();
        load(&self.params, &own);
        zero_grads(&self.params);
        self.compute += t.elapsed();
        result
    }

    /// ddp: this member spends its next sync on audit `id`: it contributes zeros (and names
    /// the audit in its commitment).
    pub fn spend_on_audit(&mut self, id: u64) {
        self.pending = Some(vec![0.0; self.numel()]);
        self.auditing = Some(id);
        self.round_spans.clear();
        self.samples_since_sync = 0;
    }

    /// Sums every member's contribution to the sync at `step` over `comm`, by plan (see the
    /// module documentation): commits this member's segment norms, gets the plan, scales its
    /// own contribution by its coefficient, and runs the bounded all-reduce. The sum is checked
    /// (finite, and no larger than the plan allows) before it is returned: nothing
    /// inconsistent is applied.
    fn planned_sum(
        &mut self,
        comm: &mut dyn Comm,
        coord: &mut dyn Coordinate,
        contribution: &[f32],
        step: u64,
        inner: Option<([u8; 32], [u8; 32])>,
    ) -> Result<Vec<f32>, TrainError> {
        let (rank, world) = (comm.rank(), comm.world());
        let mut buf = contribution.to_vec();
        self.corrupt_declared(&mut buf, step);
        let mut commitment = Commitment::of(
            step,
            &buf,
            world,
            self.hash,
            self.round_spans.clone(),
            self.samples_since_sync,
        );
        commitment.audit = self.auditing;
        commitment.inner = inner;
        commitment.inner_bytes = if inner.is_some() { self.inner_len() as u64 } else { 0 };
        let plan = coord.plan(&commitment)?;
        let bounds = plan.bounds(world).map_err(|e| TrainError::State(format!("plan: {e}")))?;
        let coefficient = plan.coefficients[rank];
        self.last_coefficient = coefficient;
        if coefficient == 0.0 {
            // Left out: exact zeros (0 × NaN would not be zero).
            buf.iter_mut().for_each(|v| *v = 0.0);
        } else {
            buf.iter_mut().for_each(|v| *v *= coefficient);
        }
        self.corrupt_sent(&mut buf);
        comm.all_reduce_bounded(&mut buf, self.spec.compression, &bounds)?;
        // The same bits and the same plan on every member: every member reaches this verdict.
        let norm = buf.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt();
        let allowed: f64 = bounds
            .norms
            .iter()
            .map(|segs| segs.iter().map(|n| n * n).sum::<f64>().sqrt())
            .sum::<f64>()
            * codec_growth(self.spec.compression).powi(world as i32 + 1)
            + 1e-30;
        // A NaN norm is incomparable, so it fails this check too.
        if !matches!(norm.partial_cmp(&allowed), Some(Ordering::Less | Ordering::Equal)) {
            return Err(TrainError::Inconsistent {
                step,
                detail: format!("norm {norm:.6e}, the plan allows {allowed:.6e}"),
            });
        }
        Ok(buf)
    }

    /// Fault injection before the norms are computed: what the member declares is corrupt too.
    fn corrupt_declared(&mut self, buf: &mut [f32], step: u64) {
        match self.poison {
            Some(Poison { after_step, kind: PoisonKind::Replay }) => match &self.replayed {
                Some((at, old))
                    if *at < step && self.step >= after_step && old.len() == buf.len() =>
                {
                    buf.copy_from_slice(old);
                }
                _ => self.replayed = Some((step, buf.to_vec())),
            },
            Some(p) if self.step >= p.after_step => match p.kind {
                PoisonKind::Nan => buf.iter_mut().for_each(|v| *v = f32::NAN),
                PoisonKind::Huge => buf.iter_mut().for_each(|v| *v *= 1e30),
                PoisonKind::Zero => buf.iter_mut().for_each(|v| *v = 0.0),
                PoisonKind::Lie(_) | PoisonKind::Replay | PoisonKind::Half { .. } => {}
            },
            _ => {}
        }
    }

    /// Fault injection after the plan: what the member sends is not what it declared.
    fn corrupt_sent(&self, buf: &mut [f32]) {
        if let Some(Poison { after_step, kind: PoisonKind::Lie(f) }) = self.poison
            && self.step >= after_step
        {
            buf.iter_mut().for_each(|v| *v *= f);
        }
    }

    /// diloco: whether the replica has done its inner steps and must synchronise.
    pub fn diloco_due(&self) -> bool {
        match self.spec.sync {
            SyncMode::Diloco { inner_steps, .. } => self.step >= self.next_sync_point(inner_steps),
            SyncMode::Ddp => false,
        }
    }

    /// The next multiple of `h` after the last sync, or the run's last step if that is
    /// sooner (so the run ends on a synchronised state).
    fn next_sync_point(&self, h: u64) -> u64 {
        let next = (self.sync_step / h.max(1) + 1) * h.max(1);
        let total = self.spec.schedule.total;
        if self.sync_step < total { next.min(total) } else { next }
    }

    /// ddp: whether gradients were computed but not yet synchronised (a failed sync keeps
    /// them for the retry in the next epoch).
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// diloco: the sync point this replica trains toward.
    pub fn sync_point(&self) -> u64 {
        match self.spec.sync {
            SyncMode::Diloco { inner_steps, .. } => self.next_sync_point(inner_steps),
            SyncMode::Ddp => self.step + 1,
        }
    }

    /// diloco: sums the pseudo-gradients by the coordinator's plan and applies the outer
    /// Nesterov step. On error nothing changed; the inner progress is kept.
    pub fn diloco_sync(
        &mut self,
        comm: &mut dyn Comm,
        coord: &mut dyn Coordinate,
    ) -> Result<(), TrainError> {
        let SyncMode::Diloco { outer_lr, outer_momentum, .. } = self.spec.sync else {
            return Err(TrainError::State("diloco_sync in a ddp run".into()));
        };
        let t = Instant::now();
        let o = self.outer.as_ref().ok_or_else(|| TrainError::State("no outer state".into()))?;
        let delta = state::to_vec(&(&o.global - state::flatten(&self.params)));
        if delta.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::NonFinite { what: "pseudo-gradient", step: self.step });
        }
        let inner = self.keep_round_for_audits();
        self.compute += t.elapsed();
        let buf = self.planned_sum(comm, coord, &delta, self.step, inner)?;
        let t = Instant::now();
        let delta = Tensor::from_slice(&buf);
        let outer = Outer { lr: outer_lr, momentum: outer_momentum };
        let o = self.outer.as_mut().ok_or_else(|| TrainError::State("no outer state".into()))?;
        // Applied to copies first: a result that is not finite changes nothing.
        let (mut global, mut momentum) = (o.global.copy(), o.momentum.copy());
        outer.step(&mut global, &mut momentum, &delta);
        if !state::finite_within(
            &[global.shallow_clone(), momentum.shallow_clone()],
            f64::from(f32::MAX),
        ) {
            return Err(TrainError::NonFinite { what: "outer update", step: self.step });
        }
        o.global = global;
        o.momentum = momentum;
        state::unflatten_into(&o.global, &self.params);
        self.sync_step = self.step;
        self.inner_start = self.step;
        self.samples_since_sync = 0;
        self.round_spans.clear();
        self.auditing = None;
        self.hash = self.compute_hash();
        self.compute += t.elapsed();
        Ok(())
    }

    /// diloco with audits, before a commitment: keeps the state this round started from (the
    /// global parameters, for audits of the other members' rounds) and this member's inner
    /// optimizer state at the round's start (for audits of its own), and returns the digests
    /// of its inner state at the start and now.
    fn keep_round_for_audits(&mut self) -> Option<([u8; 32], [u8; 32])> {
        if self.audit_window == 0 {
            return None;
        }
        let o = self.outer.as_ref()?;
        let global: Vec<Tensor> = self.params.iter().map(|p| p.detach().zeros_like()).collect();
        state::unflatten_into(&o.global, &global);
        self.keep_snapshot(global);
        let end = std::sync::Arc::new(self.inner_blob());
        let start = match &self.inner_round {
            Some((s, b)) if *s == self.inner_start => b.clone(),
            _ => end.clone(), // no inner step this round
        };
        let (ds, de) = (sha256(&start), sha256(&end));
        self.inner_states.keep(ds, start, self.audit_window);
        Some((ds, de))
    }

    /// The length of [`optimizer_blob`]'s bytes for this model.
    pub fn inner_len(&self) -> usize {
        optimizer_blob_len(&self.opt.tensors())
    }

    /// The inner optimizer state as bytes: its step count (little-endian u64), then its
    /// moments (little-endian f32), what `SyncCommit.inner_start_sha256` hashes.
    fn inner_blob(&self) -> Vec<u8> {
        optimizer_blob(&self.opt)
    }

    /// diloco: recomputes the round a member (worker `member`) contributed to sync `step`:
    /// from the global state `start` (one this member held), with that member's inner optimizer
    /// state at the round's start (`inner`, as it committed it) and its data (`batch`, the
    /// round's samples in order, one batch of the run's batch size per inner step). Returns
    /// the pseudo-gradient and the inner state the round ended with. This member's own state is
    /// as before afterwards.
    pub fn audit_round(
        &mut self,
        start: ParamHash,
        inner: &[u8],
        batch: &Batch,
        step: u64,
        member: u64,
    ) -> Result<(Vec<f32>, Vec<u8>), TrainError> {
        let t = Instant::now();
        let Some((_, from, snapshot)) = self.snapshots.iter().find(|(h, _, _)| *h == start) else {
            return Err(TrainError::State(format!("no longer holds state {start}")));
        };
        let from = *from;
        let steps = step
            .checked_sub(from)
            .filter(|n| *n > 0)
            .ok_or_else(|| TrainError::State(format!("a round from step {from} to step {step}")))?;
        let per = self.spec.batch_size as i64;
        if batch.samples != per * steps as i64 {
            return Err(TrainError::State(format!(
                "{} samples for {steps} inner steps of {per}",
                batch.samples
            )));
        }
        let mut opt = Optimizer::new(self.spec.optim, &self.params);
        load_optimizer(&mut opt, inner, self.spec.schedule.total)?;
        let own: Vec<Tensor> = self.params.iter().map(|p| p.detach().copy()).collect();
        let load = |params: &[Tensor], from: &[Tensor]| {
            let _guard = tch::no_grad_guard();
            for (p, s) in params.iter().zip(from) {
                p.shallow_clone().copy_(s);
            }
        };
        let global: Vec<Tensor> = snapshot.iter().map(|t| t.shallow_clone()).collect();
        load(&self.params, &global);
        let result = (|| {
            for (i, at) in (from..step).enumerate() {
                zero_grads(&self.params);
                {
                    let _rng = RNG.lock().unwrap_or_else(|p| p.into_inner());
                    tch::manual_seed(step_seed(self.spec.seed, at + 1, member as usize));
                }
                let b = batch.rows(i as i64 * per, per);
                let logits = self.net.forward_t(&b.inputs.to_device(self.spec.device), true)?;
                let (loss, _) = data::loss_and_accuracy(&logits, &b);
                loss.f_backward()?;
                let norm = optim::clip_grad_norm(&self.params, self.spec.grad_clip);
                if !norm.is_finite() {
                    return Err(TrainError::NonFinite { what: "gradient norm", step: at });
                }
                opt.step(&self.params, self.spec.schedule.at(at));
            }
            let delta = state::to_vec(&(state::flatten(&global) - state::flatten(&self.params)));
            Ok((delta, optimizer_blob(&opt)))
        })();
        load(&self.params, &own);
        zero_grads(&self.params);
        self.compute += t.elapsed();
        result
    }

    /// diloco: this member spends the round under way on audit `id`: it trains nothing, goes
    /// to the round's sync point, and contributes zeros (naming the audit in its commitment).
    pub fn spend_round_on_audit(&mut self, id: u64) {
        if let SyncMode::Diloco { inner_steps, .. } = self.spec.sync
            && let Some(o) = &self.outer
        {
            state::unflatten_into(&o.global, &self.params);
            self.step = self.next_sync_point(inner_steps);
            self.auditing = Some(id);
            self.round_spans.clear();
            self.samples_since_sync = 0;
        }
    }

    /// diloco: whether the round under way has not started (no inner step taken).
    pub fn round_unstarted(&self) -> bool {
        self.step == self.inner_start && self.auditing.is_none()
    }

    /// Starts an epoch as the coordinator decided: the source sends the recorded state to the
    /// receivers, which check it (its size, every value finite and bounded, its hash) before
    /// adopting it. With no recorded state yet (step 0), receivers rebuild the seeded initial
    /// state themselves. In diloco a receiver that is not a contributor joined the round late:
    /// it skips to the round's sync point and contributes nothing to it.
    pub fn agree(&mut self, comm: &mut dyn Comm, a: &Agreement) -> Result<(), TrainError> {
        let (rank, world) = (comm.rank(), comm.world());
        if a.source >= world || a.receivers.iter().chain(&a.contributors).any(|r| *r >= world) {
            return Err(TrainError::State(format!("an agreement naming ranks beyond {world}")));
        }
        self.rank = rank;
        let receiving = a.receivers.contains(&rank);
        match a.hash {
            None => {
                if receiving {
                    self.reinit()?;
                }
            }
            Some(hash) if !a.receivers.is_empty() => {
                if rank == a.source && self.hash != hash {
                    return Err(TrainError::State(format!(
                        "named the source of state {hash}, but holds {}",
                        self.hash
                    )));
                }
                let mut blob =
                    if rank == a.source { self.state_blob() } else { vec![0u8; self.blob_len()] };
                comm.broadcast(&mut blob, a.source)?;
                if receiving {
                    let bad = |detail: String| TrainError::BadState { rank: a.source, detail };
                    let (before, before_step) = (self.state_blob(), self.sync_step);
                    self.load_blob(&blob, a.step).map_err(|e| bad(e.to_string()))?;
                    if self.hash != hash {
                        let got = self.hash;
                        // Back to what it held: nothing of the bad state stays.
                        let _ = self.load_blob(&before, before_step);
                        return Err(bad(format!("hashes to {got}, the recorded state is {hash}")));
                    }
                }
            }
            Some(_) => {}
        }
        if receiving
            && let SyncMode::Diloco { inner_steps, .. } = self.spec.sync
            && !a.contributors.contains(&rank)
        {
            self.step = self.next_sync_point(inner_steps);
            self.inner_start = self.step;
        }
        Ok(())
    }

    /// Rebuilds the seeded initial state (a fresh run's receiver).
    fn reinit(&mut self) -> Result<(), TrainError> {
        let fresh = Trainer::new(self.spec.clone())?;
        let old = std::mem::replace(self, fresh);
        self.poison = old.poison;
        self.member = old.member;
        self.inner_states = old.inner_states;
        self.audit_window = old.audit_window;
        self.snapshots = old.snapshots;
        Ok(())
    }

    fn state_tensors(&self) -> Vec<Tensor> {
        let mut ts = Vec::new();
        match &self.outer {
            Some(o) => {
                ts.push(o.global.shallow_clone());
                ts.push(o.momentum.shallow_clone());
            }
            None => ts.extend(self.params.iter().map(|p| p.shallow_clone())),
        }
        ts.extend(self.opt.tensors());
        ts
    }

    fn blob_len(&self) -> usize {
        16 + 4 * self.state_tensors().iter().map(|t| t.numel()).sum::<usize>()
    }

    /// The synchronised state as bytes: sync step, optimizer step count, then f32 values.
    pub fn state_blob(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.blob_len());
        out.extend_from_slice(&self.sync_step.to_le_bytes());
        out.extend_from_slice(&(self.opt.steps as u64).to_le_bytes());
        for v in state::to_vec(&state::flatten(&self.state_tensors())) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Adopts a state blob; `cur_step` is the step it is for (checked values only: see
    /// [`Trainer::agree`]).
    pub fn load_blob(&mut self, blob: &[u8], cur_step: u64) -> Result<(), TrainError> {
        if blob.len() != self.blob_len() {
            return Err(TrainError::State(format!(
                "state of {} bytes, expected {}",
                blob.len(),
                self.blob_len()
            )));
        }
        let sync_step = u64::from_le_bytes(blob[0..8].try_into().unwrap_or_default());
        let opt_steps = u64::from_le_bytes(blob[8..16].try_into().unwrap_or_default());
        let values: Vec<f32> = blob[16..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // A state is adopted only if every value is finite and of a plausible size.
        if let Some(bad) = values.iter().find(|v| !v.is_finite() || v.abs() > MAX_STATE_VALUE) {
            return Err(TrainError::State(format!(
                "a received state holds {bad}: not finite or beyond {MAX_STATE_VALUE:e}"
            )));
        }
        let most = self.spec.schedule.total.saturating_add(1);
        if opt_steps > most || opt_steps > i64::MAX as u64 {
            return Err(TrainError::State(format!(
                "a received state claims {opt_steps} optimizer steps in a run of {most}"
            )));
        }
        if sync_step != cur_step {
            return Err(TrainError::State(format!(
                "a received state is of step {sync_step}, the recorded one is {cur_step}"
            )));
        }
        let flat = Tensor::from_slice(&values);
        state::unflatten_into(&flat, &self.state_tensors());
        if let Some(o) = &self.outer {
            state::unflatten_into(&o.global, &self.params);
        }
        self.opt.steps = opt_steps as i64;
        self.sync_step = sync_step;
        self.step = sync_step;
        self.inner_start = self.step;
        self.pending = None;
        self.auditing = None;
        self.samples_since_sync = 0;
        self.round_spans.clear();
        self.hash = self.compute_hash();
        Ok(())
    }

    /// The parameters' names as PyTorch's `state_dict()` gives them, in `names` order.
    pub fn state_dict_names(&self) -> Vec<String> {
        self.names.iter().map(|n| self.net.state_dict_name(n)).collect()
    }

    /// Named tensors for a checkpoint: `model` (the synchronised parameters, under their
    /// PyTorch `state_dict()` names), `optimizer`, `outer` (diloco).
    pub fn checkpoint_tensors(&self) -> checkpoint::Tensors {
        let params: Vec<Tensor> = match &self.outer {
            Some(o) => {
                let global: Vec<Tensor> =
                    self.params.iter().map(|p| p.to_device(Device::Cpu).zeros_like()).collect();
                state::unflatten_into(&o.global, &global);
                global
            }
            None => {
                self.params.iter().map(|p| p.to_device(Device::Cpu).to_kind(Kind::Float)).collect()
            }
        };
        let model = self.state_dict_names().into_iter().zip(params).collect();
        let optimizer = self
            .opt
            .state(&self.names)
            .into_iter()
            .map(|(n, t)| (n, t.to_device(Device::Cpu)))
            .collect();
        let outer = self.outer.as_ref().map(|o| {
            vec![
                ("global".to_owned(), o.global.shallow_clone()),
                ("momentum".to_owned(), o.momentum.shallow_clone()),
            ]
        });
        checkpoint::Tensors { model, optimizer, outer }
    }

    /// Restores from checkpoint tensors (names and shapes must match this model).
    pub fn restore(
        &mut self,
        t: &checkpoint::Tensors,
        meta: &checkpoint::Meta,
    ) -> Result<(), TrainError> {
        let _guard = tch::no_grad_guard();
        let find = |set: &[(String, Tensor)], name: &str| -> Result<Tensor, TrainError> {
            set.iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.shallow_clone())
                .ok_or_else(|| TrainError::State(format!("checkpoint has no tensor `{name}`")))
        };
        for ((n, exported), p) in self.names.iter().zip(self.state_dict_names()).zip(&self.params) {
            // Checkpoints name parameters as PyTorch does; earlier ones as the `VarStore` did.
            let v = find(&t.model, &exported).or_else(|e| find(&t.model, n).map_err(|_| e))?;
            if v.size() != p.size() {
                return Err(TrainError::State(format!(
                    "checkpoint tensor `{n}` is {:?}, the model's is {:?}",
                    v.size(),
                    p.size()
                )));
            }
            p.shallow_clone().copy_(&v);
        }
        for (n, s) in self.opt.state(&self.names) {
            let v = find(&t.optimizer, &n)?;
            if v.size() != s.size() {
                return Err(TrainError::State(format!(
                    "checkpoint tensor `{n}` has the wrong shape"
                )));
            }
            s.shallow_clone().copy_(&v);
        }
        if let Some(o) = &mut self.outer {
            let outer = t.outer.as_ref().ok_or_else(|| {
                TrainError::State("checkpoint of a ddp run cannot resume a diloco run".into())
            })?;
            o.global.copy_(&find(outer, "global")?);
            o.momentum.copy_(&find(outer, "momentum")?);
        }
        self.opt.steps = meta.optimizer_steps as i64;
        self.step = meta.step;
        self.sync_step = meta.step;
        self.inner_start = meta.step;
        self.pending = None;
        self.auditing = None;
        self.hash = self.compute_hash();
        if self.hash != meta.param_hash {
            return Err(TrainError::State(format!(
                "checkpoint parameters hash to {}, its metadata says {}",
                self.hash, meta.param_hash
            )));
        }
        Ok(())
    }

    /// The metadata of a checkpoint of this replica at its last synchronisation.
    pub fn checkpoint_meta(
        &self,
        run: u64,
        cursor: Option<checkpoint::Cursor>,
    ) -> checkpoint::Meta {
        checkpoint::Meta {
            format: checkpoint::FORMAT,
            run,
            step: self.sync_step,
            optimizer_steps: self.opt.steps as u64,
            param_hash: self.hash,
            sync: match self.spec.sync {
                SyncMode::Ddp => "ddp".into(),
                SyncMode::Diloco { .. } => "diloco".into(),
            },
            cursor,
            files: Default::default(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            model: Some(self.model_meta()),
        }
    }

    /// What model this is, for a checkpoint's `meta.json`.
    fn model_meta(&self) -> checkpoint::ModelMeta {
        match &self.spec.model {
            ModelSource::Builtin(c) => checkpoint::ModelMeta {
                arch: match c.arch {
                    model::Arch::Gpt => "gpt",
                    model::Arch::Mlp => "mlp",
                    model::Arch::Convnet => "convnet",
                }
                .into(),
                layers: c.layers,
                width: c.width,
                heads: c.heads,
                context: c.context,
                outputs: c.outputs,
                vocab: match c.input {
                    model::Input::Tokens { vocab } => Some(vocab),
                    model::Input::Features(_) => None,
                },
                features: match &c.input {
                    model::Input::Tokens { .. } => None,
                    model::Input::Features(shape) => Some(shape.clone()),
                },
            },
            ModelSource::TorchScript(_) => checkpoint::ModelMeta {
                arch: "torchscript".into(),
                layers: 0,
                width: 0,
                heads: 0,
                context: 0,
                outputs: 0,
                vocab: None,
                features: None,
            },
        }
    }

    /// Optimizer update count (AdamW's bias correction).
    pub fn optimizer_steps(&self) -> u64 {
        self.opt.steps as u64
    }
}

/// The largest magnitude a parameter or optimizer value of an adopted state may have.
pub const MAX_STATE_VALUE: f32 = 1e15;

/// How much one encoding in `c` may grow a norm (see `collectives::codec::norm_growth`).
/// The length of [`optimizer_blob`]'s bytes for an optimizer of these state tensors.
fn optimizer_blob_len(tensors: &[Tensor]) -> usize {
    8 + 4 * tensors.iter().map(|t| t.numel()).sum::<usize>()
}

/// An optimizer's state as bytes: its step count (little-endian u64), then its state tensors as
/// little-endian f32 values.
fn optimizer_blob(opt: &Optimizer) -> Vec<u8> {
    let tensors = opt.tensors();
    let mut out = Vec::with_capacity(optimizer_blob_len(&tensors));
    out.extend_from_slice(&(opt.steps as u64).to_le_bytes());
    if !tensors.is_empty() {
        for v in state::to_vec(&state::flatten(&tensors)) {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Loads an optimizer state from [`optimizer_blob`]'s bytes (of a run of `total` steps): the
/// same length, finite values, a plausible step count.
fn load_optimizer(opt: &mut Optimizer, blob: &[u8], total: u64) -> Result<(), TrainError> {
    let tensors = opt.tensors();
    let want = optimizer_blob_len(&tensors);
    if blob.len() != want {
        return Err(TrainError::State(format!(
            "an optimizer state of {} bytes, expected {want}",
            blob.len()
        )));
    }
    let steps = u64::from_le_bytes(blob[..8].try_into().unwrap_or_default());
    if steps > total.saturating_add(1) {
        return Err(TrainError::State(format!(
            "an optimizer state of {steps} steps in a run of {total}"
        )));
    }
    let values: Vec<f32> =
        blob[8..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(TrainError::State("an optimizer state that is not finite".into()));
    }
    if !tensors.is_empty() {
        state::unflatten_into(&Tensor::from_slice(&values), &tensors);
    }
    opt.steps = steps as i64;
    Ok(())
}

fn codec_growth(c: Compression) -> f64 {
    use collectives::codec::{DType, norm_growth, wire_codec};
    norm_growth(wire_codec(DType::F32, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisons_parse() {
        assert_eq!(PoisonKind::parse("nan"), Ok(PoisonKind::Nan));
        assert_eq!(PoisonKind::parse("lie:-999"), Ok(PoisonKind::Lie(-999.0)));
        assert!(PoisonKind::parse("lie:x").is_err());
        assert!(PoisonKind::parse("fast").is_err());
        assert_eq!(PoisonKind::parse("replay"), Ok(PoisonKind::Replay));
        assert_eq!(PoisonKind::parse("half"), Ok(PoisonKind::Half { every: 1 }));
        assert_eq!(PoisonKind::parse("half/5"), Ok(PoisonKind::Half { every: 5 }));
        assert!(PoisonKind::parse("half/0").is_err());
    }

    /// Audits depend on it: the same state and the same batch give the same gradient bits, in
    /// another trainer (another process in a run) too.
    #[test]
    fn a_gradient_is_recomputed_bit_for_bit() {
        let spec = crate::testing::gpt_spec(SyncMode::Ddp, Compression::None, 2, 10);
        let seq_len = spec.seq_len;
        let batch = || {
            let data = data::ShardData::Addition {
                task: data::Addition { digits: 2 },
                seed: 7,
                samples: 64,
            };
            let mut r = data::ShardReader::new(data, seq_len, 7);
            r.next = 8;
            r.next_batch(16).unwrap()
        };
        let grads = |t: &mut Trainer| {
            t.forward_backward(&batch()).unwrap();
            state::to_vec(&state::flatten_grads(&t.params))
        };
        let mut a = Trainer::new(spec.clone()).unwrap();
        let mut b = Trainer::new(spec).unwrap();
        let (ga, ga2, gb) = (grads(&mut a), grads(&mut a), grads(&mut b));
        let differ = |x: &[f32], y: &[f32]| {
            x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count()
        };
        assert_eq!(differ(&ga, &ga2), 0, "the same trainer twice");
        assert_eq!(differ(&ga, &gb), 0, "another trainer");
    }

    /// diloco audits depend on it: another trainer, given the round's global state, the
    /// member's inner optimizer state at the round's start and its data, recomputes the
    /// member's pseudo-gradient and its inner state at the round's end bit for bit; a member
    /// that trained on half of a batch is found out.
    #[test]
    fn a_diloco_round_is_recomputed_bit_for_bit() {
        let h = 3u64;
        let sync = SyncMode::Diloco { inner_steps: h, outer_lr: 0.7, outer_momentum: 0.9 };
        let spec = crate::testing::gpt_spec(sync, Compression::None, 2, 20);
        let (seq_len, per) = (spec.seq_len, spec.batch_size);
        let data = |from: u64, n: usize| {
            let data = data::ShardData::Addition {
                task: data::Addition { digits: 2 },
                seed: 7,
                samples: 512,
            };
            let mut r = data::ShardReader::new(data, seq_len, 7);
            r.next = from;
            r.next_batch(n).unwrap()
        };
        let member = 42u64;
        let new = |poison: Option<Poison>| {
            let mut t = Trainer::new(spec.clone()).unwrap();
            t.set_audit_window(6);
            t.set_member(member, InnerStates::default());
            t.set_poison(poison);
            t
        };
        // A round of `member`: h inner steps, then what it commits (without a ring: the
        // global state stays, as if the outer step were zero, so a second round starts from
        // a non-trivial inner state).
        let round = |t: &mut Trainer, from: u64| {
            for i in 0..h {
                t.forward_backward(&data(from + i * per as u64, per)).unwrap();
                t.apply_local().unwrap();
            }
            let inner = t.keep_round_for_audits().unwrap();
            let o = t.outer.as_ref().unwrap();
            let delta = state::to_vec(&(&o.global - state::flatten(&t.params)));
            let start = t.inner_states.get(&inner.0).unwrap();
            state::unflatten_into(&o.global.copy(), &t.params);
            t.sync_step = t.step;
            t.inner_start = t.step;
            (digest(&delta), inner, start)
        };
        let mut honest = new(None);
        let mut auditor = new(None);
        auditor.keep_round_for_audits();
        let start = honest.hash;
        assert_eq!(auditor.hash, start);
        let _ = round(&mut honest, 0);
        let second = h * per as u64;
        let (d, (s, e), blob) = round(&mut honest, second);
        assert_ne!(s, e, "the inner state moved");
        let batch = data(second, h as usize * per);
        let again = |t: &mut Trainer, blob: &[u8]| {
            let (delta, end) = t.audit_round(start, blob, &batch, 2 * h, member).unwrap();
            (digest(&delta), sha256(&end))
        };
        // The round ran from step h to 2h: the auditor's snapshot is of step 0, so tell it.
        auditor.snapshots.back_mut().unwrap().1 = h;
        assert_eq!(again(&mut auditor, &blob), (d, e), "another trainer recomputes it");
        let own = auditor.hash;
        assert_eq!(again(&mut auditor, &blob), (d, e), "and again");
        assert_eq!(auditor.hash, own, "the auditor's own state is untouched");
        // A member that trains on half of every batch commits another round.
        let mut cheat = new(Some(Poison { after_step: 0, kind: PoisonKind::Half { every: 1 } }));
        let _ = round(&mut cheat, 0);
        let (dc, (sc, ec), blob) = round(&mut cheat, second);
        assert_ne!(again(&mut auditor, &blob), (dc, ec), "the recomputation differs");
        assert_ne!(sc, s, "its inner state differs too");
        // A state of another length or with non-finite values is refused.
        assert!(auditor.audit_round(start, &blob[1..], &batch, 2 * h, member).is_err());
        let mut nan = blob.to_vec();
        nan[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(auditor.audit_round(start, &nan, &batch, 2 * h, member).is_err());
        assert!(auditor.audit_round(start, &blob, &batch.head(per as i64), 2 * h, member).is_err());
    }

    #[test]
    fn malformed_plans_are_refused() {
        let p = Plan { step: 1, coefficients: vec![0.5, 0.5], declared: vec![1.0; 4] };
        assert_eq!(p.bounds(2).unwrap().norms, vec![vec![0.5, 0.5], vec![0.5, 0.5]]);
        assert!(p.bounds(3).is_err());
        let nan = Plan { coefficients: vec![f32::NAN, 0.5], ..p };
        assert!(nan.bounds(2).is_err());
    }

    fn span(lease: u64, from: u64, to: u64) -> data::Span {
        data::Span { lease, shard: 1, data_epoch: 0, from, to, grant: "g".into(), shared: false }
    }

    #[test]
    fn a_commitment_states_what_the_coordinator_checks() {
        let c = Commitment::of(9, &[3.0, 4.0, 0.0], 2, ParamHash(5), vec![span(1, 0, 4)], 4);
        // Segments of 2 and 1 elements: norms 5 and 0; in all 5, as the coordinator computes it.
        assert_eq!(c.segment_norms, vec![5.0, 0.0]);
        assert_eq!(c.norm, 5.0);
        assert_eq!((c.step, c.start_hash, c.samples), (9, ParamHash(5), 4));
        // The digest is of the values: another contribution, another digest.
        assert_ne!(
            c.digest,
            Commitment::of(9, &[3.0, 4.0, 1.0], 2, ParamHash(5), vec![], 0).digest
        );
        // Too many pieces: the first ones, and only their samples.
        let many: Vec<data::Span> =
            (0..proto::MAX_COMMIT_SPANS as u64 + 5).map(|l| span(l, 0, 2)).collect();
        let n = many.len() as u64 * 2;
        let c = Commitment::of(9, &[1.0], 1, ParamHash(5), many, n);
        assert_eq!(c.spans.len(), proto::MAX_COMMIT_SPANS);
        assert_eq!(c.samples, 2 * proto::MAX_COMMIT_SPANS as u64);
    }

    #[test]
    fn spans_that_continue_each_other_merge() {
        let mut spans = vec![span(1, 0, 4)];
        data::extend_spans(&mut spans, &[span(1, 4, 8), span(2, 0, 3), span(1, 8, 9)]);
        assert_eq!(spans, vec![span(1, 0, 8), span(2, 0, 3), span(1, 8, 9)]);
    }
}
