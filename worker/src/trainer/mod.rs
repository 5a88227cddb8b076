//! The trainer: model, optimizer and synchronisation, on its own OS thread. The only module of
//! longhaul that names `tch`.
//!
//! One [`Trainer`] holds the replica. The driver (`crate::run`) feeds it batches and a
//! [`Comm`](crate::comm::Comm) per epoch:
//!
//! - **ddp**: [`Trainer::forward_backward`], then [`Trainer::ddp_sync`]: gradients flattened
//!   into contiguous buckets, weighted by each member's share of the samples, summed over the
//!   ring, clipped, and the optimizer applied. A failed sync leaves the parameters as they were
//!   and keeps the local gradients, so the step is retried in the next epoch.
//! - **diloco**: `inner_steps` local steps ([`Trainer::apply_local`]), then
//!   [`Trainer::diloco_sync`]: the pseudo-gradient `global − local`, weighted by each member's
//!   share of the samples since the last sync, summed over the ring (optionally bf16 or int8),
//!   and an outer Nesterov step on the global parameters, which every member then adopts.
//!
//! After every sync the parameters are hashed ([`Trainer::hash`]); every replica must report
//! the same hash for the same step. At the start of each epoch [`Trainer::agree`] exchanges
//! what every member holds and sends the freshest state to the members that lack it.

pub mod checkpoint;
pub mod data;
pub mod model;
pub mod optim;
pub mod plan;
pub mod state;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use collectives::Compression;
use collectives::group::OpError;
use tch::{Device, Kind, Tensor, nn};

use crate::comm::Comm;
use crate::schedule::LrSchedule;
use data::Batch;
use model::{ModelConfig, Net};
use optim::{OptimConfig, Optimizer, Outer};
use state::Slot;

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
    pub spec: TrainSpec,
    _vs: nn::VarStore,
    net: Box<dyn Net>,
    names: Vec<String>,
    params: Vec<Tensor>,
    opt: Optimizer,
    /// Optimizer steps taken (inner steps in diloco).
    pub step: u64,
    /// The step of the last synchronisation; the state at it is what replicas agree on.
    pub sync_step: u64,
    /// diloco: the step from which this replica's local progress counts toward the next sync.
    pub inner_start: u64,
    outer: Option<OuterState>,
    hash: u64,
    /// ddp: flat local gradients computed but not yet synchronised.
    pending: Option<Vec<f32>>,
    /// Time spent computing (forward, backward, optimizer).
    pub compute: Duration,
    /// Samples trained on since the last synchronisation.
    pub samples_since_sync: u64,
    pub last_grad_norm: f64,
    /// Ranks whose contribution the last sync rejected (see [`screen`]).
    pub rejected: Vec<usize>,
    /// Fault injection for tests: from this step on, what this member sends is corrupted.
    pub poison: Option<Poison>,
}

/// A corruption of what a member sends (fault injection, for the chaos tests).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Poison {
    pub after_step: u64,
    pub kind: PoisonKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoisonKind {
    /// NaN in every value.
    Nan,
    /// Every value times 1e30.
    Huge,
}

/// How much larger than the reference (the median of the members' norms, or the smaller with
/// two members) a contribution's norm may be before it is rejected.
pub const REJECT_FACTOR: f64 = 1e3;

/// The ranks whose contribution must be rejected, from every member's (norm, weight): a
/// non-finite norm, or one more than [`REJECT_FACTOR`] times the reference.
pub fn screen(norms: &[f32]) -> Vec<usize> {
    let mut finite: Vec<f64> =
        norms.iter().map(|n| f64::from(*n)).filter(|n| n.is_finite()).collect();
    finite.sort_by(f64::total_cmp);
    let reference = match finite.len() {
        0 => 0.0,
        1 | 2 => finite[0],
        n => finite[n / 2],
    };
    norms
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            let n = f64::from(**n);
            !n.is_finite() || (reference > 0.0 && n > REJECT_FACTOR * reference)
        })
        .map(|(r, _)| r)
        .collect()
}

impl Trainer {
    /// Builds the replica: every trainer built from the same spec holds the same bits.
    pub fn new(spec: TrainSpec) -> Result<Self, TrainError> {
        // libtorch's generator is process-global: seed and build under one lock, so trainers
        // built on several threads at once still get the seeded bits.
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _init = INIT.lock().unwrap_or_else(|p| p.into_inner());
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
            hash: 0,
            pending: None,
            compute: Duration::ZERO,
            samples_since_sync: 0,
            last_grad_norm: 0.0,
            rejected: Vec::new(),
            poison: None,
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

    /// The hash of the synchronised parameters (16 hex digits when formatted with `{:016x}`).
    pub fn hash(&self) -> u64 {
        self.hash
    }

    fn compute_hash(&self) -> u64 {
        match &self.outer {
            Some(o) => state::hash_flat(&o.global),
            None => state::hash_flat(&state::flatten(&self.params)),
        }
    }

    /// Runs the model and back-propagates the batch's mean loss. Gradients replace any earlier
    /// ones; a ddp step computed but not synchronised is discarded.
    pub fn forward_backward(&mut self, batch: &Batch) -> Result<StepStats, TrainError> {
        let t = Instant::now();
        self.pending = None;
        for p in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let inputs = batch.inputs.to_device(self.spec.device);
        let logits = self.net.forward_t(&inputs, true)?;
        let (loss, (correct, counted)) = data::loss_and_accuracy(&logits, batch);
        loss.f_backward()?;
        let loss = loss.double_value(&[]);
        self.compute += t.elapsed();
        if !loss.is_finite() {
            return Err(TrainError::NonFinite { what: "loss", step: self.step });
        }
        self.samples_since_sync += batch.samples as u64;
        Ok(StepStats { loss, correct, counted, samples: batch.samples, tokens: batch.tokens })
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

    /// ddp: averages the gradients over `comm` (this member's share is `weight`), then clips
    /// and applies them. On error nothing changed and the local gradients are kept for a retry.
    pub fn ddp_sync(&mut self, comm: &mut dyn Comm, weight: f64) -> Result<(), TrainError> {
        let t = Instant::now();
        let local = match self.pending.take() {
            Some(g) => g,
            None => state::to_vec(&state::flatten_grads(&self.params)),
        };
        if local.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::NonFinite { what: "gradient", step: self.step });
        }
        self.compute += t.elapsed();
        let weighted = |scale: f64| -> Vec<f32> {
            local.iter().map(|g| (f64::from(*g) * weight * scale) as f32).collect()
        };
        // On failure the unweighted local gradients are kept for the retry.
        let buf = match self.screened_sum(comm, weight, &weighted, self.spec.bucket_elems) {
            Ok(b) => b,
            Err(e) => {
                self.pending = Some(local);
                return Err(e);
            }
        };
        let t = Instant::now();
        state::unflatten_into_grads(&buf, &self.params);
        self.compute += t.elapsed();
        self.apply_local()?;
        self.samples_since_sync = 0;
        Ok(())
    }

    /// Sums every member's contribution (`contribution(scale)`: this member's, weighted and
    /// times `scale`) over `comm`, in buckets of `bucket` elements, screened: every member
    /// publishes the norm of what it sends, and a contribution that is non-finite or absurdly
    /// large ([`screen`]) is left out by every member alike, the others' shares scaled up to
    /// make up for it. The rejected ranks are kept in [`Trainer::rejected`] for the driver to
    /// report. The sum is checked finite before it is returned: nothing non-finite is applied.
    ///
    /// Uncompressed, the table of norms rides at the end of the data (no extra round trip); a
    /// rejection then costs a second sum without the rejected. Compressed, the table goes first
    /// in its own exact all-reduce (quantizing it could hide an outlier).
    fn screened_sum(
        &mut self,
        comm: &mut dyn Comm,
        weight: f64,
        contribution: &dyn Fn(f64) -> Vec<f32>,
        bucket: usize,
    ) -> Result<Vec<f32>, TrainError> {
        let (rank, world) = (comm.rank(), comm.world());
        let mut buf = contribution(1.0);
        self.corrupt(&mut buf);
        let n = buf.len();
        let norm = buf.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt();
        let mut table = vec![0f32; world * 2];
        table[2 * rank] = norm as f32;
        table[2 * rank + 1] = weight as f32;
        let compression = self.spec.compression;
        let inline = compression == Compression::None;
        if inline {
            buf.extend_from_slice(&table);
            for chunk in buf.chunks_mut(bucket.max(1)) {
                comm.all_reduce(chunk, compression)?;
            }
            table = buf.split_off(n);
        } else {
            comm.all_reduce(&mut table, Compression::None)?;
        }
        let norms: Vec<f32> = table.chunks(2).map(|c| c[0]).collect();
        self.rejected = screen(&norms);
        if !self.rejected.is_empty() {
            let kept: f64 = (0..world)
                .filter(|r| !self.rejected.contains(r))
                .map(|r| f64::from(table[2 * r + 1]))
                .sum();
            buf = if self.rejected.contains(&rank) || kept <= 0.0 {
                vec![0.0; n]
            } else {
                contribution(1.0 / kept)
            };
        }
        if !inline || !self.rejected.is_empty() {
            for chunk in buf.chunks_mut(bucket.max(1)) {
                comm.all_reduce(chunk, compression)?;
            }
        }
        if buf.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::NonFinite {
                what: "sum of the contributions",
                step: self.step,
            });
        }
        Ok(buf)
    }

    /// Fault injection: corrupts what this member sends, once past the poison's step.
    fn corrupt(&self, buf: &mut [f32]) {
        match self.poison {
            Some(p) if self.step >= p.after_step => match p.kind {
                PoisonKind::Nan => buf.iter_mut().for_each(|v| *v = f32::NAN),
                PoisonKind::Huge => buf.iter_mut().for_each(|v| *v *= 1e30),
            },
            _ => {}
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

    /// diloco: all-reduces the pseudo-gradient (this member's share is `weight`) and applies
    /// the outer Nesterov step. On error nothing changed; the inner progress is kept.
    pub fn diloco_sync(&mut self, comm: &mut dyn Comm, weight: f64) -> Result<(), TrainError> {
        let SyncMode::Diloco { outer_lr, outer_momentum, .. } = self.spec.sync else {
            return Err(TrainError::State("diloco_sync in a ddp run".into()));
        };
        let t = Instant::now();
        let o = self.outer.as_ref().ok_or_else(|| TrainError::State("no outer state".into()))?;
        let delta = state::to_vec(&(&o.global - state::flatten(&self.params)));
        if delta.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::NonFinite { what: "pseudo-gradient", step: self.step });
        }
        self.compute += t.elapsed();
        let weighted = |scale: f64| -> Vec<f32> {
            delta.iter().map(|d| (f64::from(*d) * weight * scale) as f32).collect()
        };
        let buf = self.screened_sum(comm, weight, &weighted, usize::MAX)?;
        let t = Instant::now();
        let delta = Tensor::from_slice(&buf);
        let outer = Outer { lr: outer_lr, momentum: outer_momentum };
        let o = self.outer.as_mut().ok_or_else(|| TrainError::State("no outer state".into()))?;
        outer.step(&mut o.global, &mut o.momentum, &delta);
        state::unflatten_into(&o.global, &self.params);
        self.sync_step = self.step;
        self.inner_start = self.step;
        self.samples_since_sync = 0;
        self.hash = self.compute_hash();
        self.compute += t.elapsed();
        Ok(())
    }

    /// This replica's entry for the epoch's agreement.
    pub fn slot(&self) -> Slot {
        Slot {
            sync_step: self.sync_step,
            hash: self.hash,
            cur_step: self.step,
            inner_start: self.inner_start,
            batch: self.spec.batch_size as u64,
        }
    }

    /// This member's weight in a sync, from every member's slot.
    pub fn weight(&self, slots: &[Slot], rank: usize) -> f64 {
        let contrib = |s: &Slot| match self.spec.sync {
            SyncMode::Ddp => s.batch as f64,
            SyncMode::Diloco { .. } => {
                s.batch as f64 * self.sync_point().saturating_sub(s.inner_start) as f64
            }
        };
        let total: f64 = slots.iter().map(contrib).sum();
        if total <= 0.0 { 1.0 / slots.len() as f64 } else { contrib(&slots[rank]) / total }
    }

    /// Starts an epoch: exchanges every member's slot, checks the freshest state against the
    /// coordinator's record (`committed`: step and hash), and copies it to the members that
    /// lack it. Returns the slots (after the copy) for the weights of this epoch's syncs.
    pub fn agree(
        &mut self,
        comm: &mut dyn Comm,
        committed: Option<(u64, u64)>,
    ) -> Result<state::Agreement, TrainError> {
        let (rank, world) = (comm.rank(), comm.world());
        let mut table = vec![0f32; world * Slot::FLOATS];
        self.slot().encode(&mut table[rank * Slot::FLOATS..(rank + 1) * Slot::FLOATS]);
        comm.all_reduce(&mut table, Compression::None)?;
        let slots: Vec<Slot> = table.chunks(Slot::FLOATS).map(Slot::decode).collect();
        let mut agreement = state::agree(&slots, committed).map_err(TrainError::State)?;
        if agreement.receivers.iter().any(|r| *r) {
            let src = agreement.source;
            let mut blob = if rank == src { self.state_blob() } else { vec![0u8; self.blob_len()] };
            comm.broadcast(&mut blob, src)?;
            if agreement.receivers[rank] {
                self.load_blob(&blob, agreement.cur_step_max)?;
                if self.hash != slots[src].hash {
                    return Err(TrainError::State(format!(
                        "state received from rank {src} hashes to {:016x}, it announced {:016x}",
                        self.hash, slots[src].hash
                    )));
                }
            }
            for (r, recv) in agreement.receivers.iter().enumerate() {
                if *recv {
                    agreement.slots[r] = Slot {
                        sync_step: slots[src].sync_step,
                        hash: slots[src].hash,
                        cur_step: agreement.cur_step_max,
                        inner_start: agreement.cur_step_max,
                        batch: slots[r].batch,
                    };
                }
            }
        }
        Ok(agreement)
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

    /// Adopts a state blob; `cur_step` is where the members are (diloco joins mid-round).
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
        let flat = Tensor::from_slice(&values);
        state::unflatten_into(&flat, &self.state_tensors());
        if let Some(o) = &self.outer {
            state::unflatten_into(&o.global, &self.params);
        }
        self.opt.steps = opt_steps as i64;
        self.sync_step = sync_step;
        self.step = match self.spec.sync {
            SyncMode::Ddp => sync_step,
            SyncMode::Diloco { .. } => cur_step.max(sync_step),
        };
        self.inner_start = self.step;
        self.pending = None;
        self.samples_since_sync = 0;
        self.hash = self.compute_hash();
        Ok(())
    }

    /// Named tensors for a checkpoint: `model` (the synchronised parameters), `optimizer`,
    /// `outer` (diloco).
    pub fn checkpoint_tensors(&self) -> checkpoint::Tensors {
        let model: Vec<(String, Tensor)> = match &self.outer {
            Some(o) => {
                let global: Vec<Tensor> =
                    self.params.iter().map(|p| p.to_device(Device::Cpu).zeros_like()).collect();
                state::unflatten_into(&o.global, &global);
                self.names.iter().cloned().zip(global).collect()
            }
            None => self
                .names
                .iter()
                .cloned()
                .zip(self.params.iter().map(|p| p.to_device(Device::Cpu).to_kind(Kind::Float)))
                .collect(),
        };
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
        for (n, p) in self.names.iter().zip(&self.params) {
            let v = find(&t.model, n)?;
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
        self.hash = self.compute_hash();
        if format!("{:016x}", self.hash) != meta.param_hash {
            return Err(TrainError::State(format!(
                "checkpoint parameters hash to {:016x}, its metadata says {}",
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
            param_hash: format!("{:016x}", self.hash),
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
        }
    }

    /// Optimizer update count (AdamW's bias correction).
    pub fn optimizer_steps(&self) -> u64 {
        self.opt.steps as u64
    }
}

#[cfg(test)]
mod tests {
    use super::screen;

    #[test]
    fn screening_rejects_non_finite_and_absurd_contributions_only() {
        assert_eq!(screen(&[1.0, 2.0, 1.5]), Vec::<usize>::new());
        assert_eq!(screen(&[1.0, f32::NAN, 1.5]), vec![1]);
        assert_eq!(screen(&[f32::INFINITY, 1.0, 1.5]), vec![0]);
        assert_eq!(screen(&[1.0, 1.2, 5e3]), vec![2]);
        // Honest spread (a member with ten times the others' norm) is kept.
        assert_eq!(screen(&[1.0, 10.0, 2.0, 3.0]), Vec::<usize>::new());
        // Two members: the smaller is the reference.
        assert_eq!(screen(&[1.0, 2e3]), vec![1]);
        assert_eq!(screen(&[3.0, 2.0]), Vec::<usize>::new());
        // All zero (nothing trained yet) rejects nothing; all broken rejects all.
        assert_eq!(screen(&[0.0, 0.0, 0.0]), Vec::<usize>::new());
        assert_eq!(screen(&[f32::NAN, f32::NAN]), vec![0, 1]);
    }
}
