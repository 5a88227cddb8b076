//! The cluster's state, as a sans-IO state machine.
//!
//! [`Cluster`] does no IO and reads no clock: the shell (the gRPC server, or the test harness)
//! calls it with the current time ([`Millis`], wall-clock milliseconds) and what happened (a
//! join, a heartbeat, a step committed, a lease request), calls [`Cluster::tick`] periodically,
//! and then:
//!
//! 1. persists the records named by [`Cluster::take_dirty`] (write-ahead: an epoch is stored
//!    before anyone hears of it, so no epoch id is ever reused), and only then
//! 2. delivers the [`Output`]s from [`Cluster::poll_output`] to the workers.
//!
//! What it decides:
//!
//! - **Liveness** from heartbeats: alive, then suspect after `suspect_after` without one, then
//!   dead after `dead_after`. Suspicion changes nothing; death removes the worker from its run.
//! - **Epochs**: any change of a run's membership makes epoch e+1, announced to every member as
//!   a ring ordered to minimise the round-trip times the workers report (deterministic for equal
//!   inputs). Changes are batched per tick, so simultaneous joins make one epoch. A death sends
//!   an abort to the old epoch's members in the same tick as it is noticed.
//! - **Progress**: a run's committed step only grows; reports from an old epoch are ignored.
//!   The first report of a step records its parameter hash, which travels with the next epoch;
//!   a member reporting another hash for the committed step has diverged, and the run's log
//!   says so ([`Output::Log`]).
//! - **Metrics**: the latest report of each worker (volatile); run-level loss and accuracy are
//!   the latest any member reported, utilisation and bytes are over the current members.
//! - **Lifecycle**: pending → running (min workers reached) → completed (step budget reached) |
//!   failed (restart budget spent) | stopped (by a user).
//! - **Shards** ([`crate::shards::ShardBook`]): leases with expiry, returned to the queue when
//!   their holder dies.

mod ring;

#[cfg(test)]
mod harness;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;

use proto::{Epoch, LeaseId, Liveness, RunId, RunState, WorkerId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::runfile::RunSpec;
use crate::shards::{Lease, LeaseError, Manifest, ShardBook};

pub use ring::order_ring;

/// Wall-clock time in milliseconds since the Unix epoch (virtual in tests).
pub type Millis = u64;

/// Deadlines of the state machine. The defaults suit workers that heartbeat every second over
/// links of up to 300 ms RTT: a worker is suspect after 3 missed beats and dead after 10.
#[derive(Clone, Debug)]
pub struct Config {
    pub suspect_after: Millis,
    pub dead_after: Millis,
    /// A worker that died must heartbeat this long without a gap before it is admitted to an
    /// epoch again, so a flapping worker does not churn epochs.
    pub readmit_after: Millis,
    pub lease_ttl: Millis,
}

impl Default for Config {
    fn default() -> Self {
        Self { suspect_after: 3_000, dead_after: 10_000, readmit_after: 30_000, lease_ttl: 300_000 }
    }
}

/// A durable record that changed and must be persisted before outputs are delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dirty {
    Run(RunId),
    Worker(WorkerId),
    Shard(RunId, u32),
    Counters,
}

/// What the cluster asks the shell to deliver.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    ToWorker(WorkerId, Command),
    /// A line for the run's log (watchers see it; the shell also logs it as a warning).
    Log {
        run: RunId,
        line: String,
    },
}

/// A command for one worker.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Join (or stay in) this epoch of this run; `members` in ring order.
    Epoch(EpochInfo),
    /// Abandon whatever the epoch was doing: it is over.
    Abort { run: RunId, epoch: Epoch, reason: String },
    /// Write a checkpoint at this step.
    Checkpoint { run: RunId, step: u64 },
    /// Leave the run: it ended.
    Stop { run: RunId, state: RunState, reason: String },
}

/// One epoch of a run, as announced to its members.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochInfo {
    pub run: RunId,
    pub epoch: Epoch,
    pub members: Vec<Member>,
    pub committed_step: u64,
    /// The parameter hash recorded with `committed_step` ("" if none yet).
    #[serde(default)]
    pub committed_hash: String,
    pub total_steps: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub worker: WorkerId,
    pub addr: SocketAddr,
}

/// A run's durable record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: RunId,
    pub name: String,
    /// The run file as submitted (re-parsed on load).
    pub spec_toml: String,
    pub state: RunState,
    pub epoch: Epoch,
    pub members: Vec<Member>,
    pub committed_step: u64,
    /// The parameter hash the first report of `committed_step` carried ("" if unknown), and
    /// who reported it.
    #[serde(default)]
    pub committed_hash: String,
    #[serde(default)]
    pub committed_by: Option<WorkerId>,
    pub total_steps: u64,
    pub min_workers: u32,
    pub max_workers: u32,
    pub restart_budget: u32,
    pub restarts: u32,
    pub checkpoint_interval: u64,
    pub last_checkpoint: u64,
    pub message: String,
    pub created_ms: Millis,
    pub updated_ms: Millis,
    pub loss: Option<f64>,
    /// The latest accuracy any member reported.
    #[serde(default)]
    pub accuracy: Option<f64>,
    pub tokens_per_sec: f64,
    /// Compute utilisation and ring bytes of the last members, kept when the run ends (the
    /// live figures are over the current members).
    #[serde(default)]
    pub final_utilisation: Option<f64>,
    #[serde(default)]
    pub final_bytes: Option<u64>,
    /// The newest checkpoint a member reported: "worker-N step S uri".
    #[serde(default)]
    pub latest_checkpoint: String,
    #[serde(default)]
    pub latest_checkpoint_step: u64,
}

/// A worker's durable record, with its contribution ledger.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: WorkerId,
    pub host: String,
    pub addr: SocketAddr,
    pub run: Option<RunId>,
    pub joined_ms: Millis,
    pub ledger: Ledger,
    /// Runs this worker was evicted from for a bad contribution; it is not assigned to them
    /// again.
    #[serde(default)]
    pub banned: Vec<RunId>,
}

/// What a worker has contributed, summed over its life.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    pub samples: u64,
    pub steps: u64,
    pub bytes: u64,
    pub uptime_ms: u64,
}

/// Counters that must never repeat.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub next_run: u64,
    pub next_worker: u64,
    pub next_lease: u64,
}

/// A worker's volatile state (rebuilt from heartbeats after a restart).
#[derive(Clone, Debug)]
struct Live {
    last_heartbeat: Millis,
    /// Since when heartbeats have come without a gap longer than `suspect_after`.
    alive_since: Millis,
    /// Set when the worker died; it must be alive `readmit_after` before rejoining an epoch.
    died_at: Option<Millis>,
    liveness: Liveness,
    rtts: BTreeMap<WorkerId, u32>,
    /// The last heartbeat that counts toward uptime: `None` until the first one after a join
    /// or a restart, so time the coordinator was down is never counted.
    uptime_mark: Option<Millis>,
    /// Uptime accrued but not yet moved to the ledger (see [`UPTIME_FLUSH_MS`]).
    uptime_pending: Millis,
}

/// Accrued uptime moves to the persisted ledger in batches of at least this much (or when the
/// worker falls silent), so heartbeats cost no store write; a crash loses less than this.
pub const UPTIME_FLUSH_MS: Millis = 10_000;

/// A metrics report from a worker about `run`. `samples` and `bytes` are increments (for the
/// ledger); the times and ring bytes are cumulative since the worker started on the run.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    pub run: RunId,
    pub epoch: Epoch,
    pub step: u64,
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub grad_norm: f64,
    pub tokens_per_sec: f64,
    pub samples: u64,
    pub bytes: u64,
    pub compute_ms: f64,
    pub comm_ms: f64,
    pub idle_ms: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The worker's parameter hash (16 hex digits, or "").
    pub param_hash: String,
}

impl Metrics {
    /// compute / (compute + comm + idle), if the times are known.
    pub fn compute_utilisation(&self) -> Option<f64> {
        let (c, m, i) = (self.compute_ms, self.comm_ms, self.idle_ms);
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        let total = c + m + i;
        (ok(c) && ok(m) && ok(i) && total > 0.0).then(|| c / total)
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum SubmitError {
    #[error("run file: {0}")]
    RunFile(#[from] crate::runfile::RunFileError),
    #[error("dataset manifest has no shards")]
    EmptyManifest,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RunError {
    #[error("no run {0}")]
    NoSuchRun(RunId),
    #[error("run {0} already ended ({1})")]
    Ended(RunId, RunState),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WorkerError {
    #[error("unknown worker {0}")]
    Unknown(WorkerId),
    #[error("{0} is not in a run")]
    NoRun(WorkerId),
}

/// The whole cluster.
#[derive(Debug)]
pub struct Cluster {
    config: Config,
    counters: Counters,
    runs: BTreeMap<RunId, RunRecord>,
    shards: BTreeMap<RunId, ShardBook>,
    workers: BTreeMap<WorkerId, WorkerRecord>,
    live: BTreeMap<WorkerId, Live>,
    /// Runs whose membership changed since the last epoch was formed.
    changed: BTreeSet<RunId>,
    /// The latest metrics report of each worker in its current run (volatile).
    latest: BTreeMap<WorkerId, Metrics>,
    dirty: BTreeSet<Dirty>,
    outbox: VecDeque<Output>,
}

impl Cluster {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            counters: Counters { next_run: 1, next_worker: 1, next_lease: 1 },
            runs: BTreeMap::new(),
            shards: BTreeMap::new(),
            workers: BTreeMap::new(),
            live: BTreeMap::new(),
            changed: BTreeSet::new(),
            latest: BTreeMap::new(),
            dirty: BTreeSet::new(),
            outbox: VecDeque::new(),
        }
    }

    /// Rebuilds the cluster from its persisted records after a restart at `now`. Every known
    /// worker starts suspect with a full `dead_after` to reconnect; epochs and steps continue.
    pub fn restore(
        config: Config,
        now: Millis,
        counters: Counters,
        runs: Vec<RunRecord>,
        workers: Vec<WorkerRecord>,
        shards: BTreeMap<RunId, ShardBook>,
    ) -> Self {
        let mut c = Self::new(config);
        c.counters = counters;
        for w in workers {
            c.live.insert(
                w.id,
                Live {
                    last_heartbeat: now,
                    alive_since: now,
                    died_at: None,
                    liveness: Liveness::Suspect,
                    rtts: BTreeMap::new(),
                    uptime_mark: None,
                    uptime_pending: 0,
                },
            );
            c.workers.insert(w.id, w);
        }
        for r in runs {
            c.runs.insert(r.id, r);
        }
        c.shards = shards;
        c
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    // ---- inputs ----

    /// Submits a validated run with its dataset manifest.
    pub fn submit(
        &mut self,
        now: Millis,
        spec: &RunSpec,
        spec_toml: &str,
        manifest: Manifest,
    ) -> Result<RunId, SubmitError> {
        if manifest.shards.is_empty() {
            return Err(SubmitError::EmptyManifest);
        }
        let id = RunId(self.counters.next_run);
        self.counters.next_run += 1;
        self.dirty.insert(Dirty::Counters);
        let run = RunRecord {
            id,
            name: spec.name.clone(),
            spec_toml: spec_toml.to_owned(),
            state: RunState::Pending,
            epoch: Epoch(0),
            members: Vec::new(),
            committed_step: 0,
            committed_hash: String::new(),
            committed_by: None,
            total_steps: spec.total_steps(spec.min_workers),
            min_workers: spec.min_workers,
            max_workers: spec.max_workers,
            restart_budget: spec.restart_budget,
            restarts: 0,
            checkpoint_interval: spec.checkpoint_interval,
            last_checkpoint: 0,
            message: format!("waiting for {} workers", spec.min_workers),
            created_ms: now,
            updated_ms: now,
            loss: None,
            accuracy: None,
            tokens_per_sec: 0.0,
            final_utilisation: None,
            final_bytes: None,
            latest_checkpoint: String::new(),
            latest_checkpoint_step: 0,
        };
        let book = ShardBook::new(manifest);
        for i in 0..book.len() {
            self.dirty.insert(Dirty::Shard(id, i));
        }
        self.shards.insert(id, book);
        self.runs.insert(id, run);
        self.dirty.insert(Dirty::Run(id));
        self.changed.insert(id);
        Ok(id)
    }

    /// Stops a run at a user's request.
    pub fn stop(&mut self, now: Millis, run: RunId, reason: &str) -> Result<(), RunError> {
        let r = self.runs.get(&run).ok_or(RunError::NoSuchRun(run))?;
        if r.state.is_terminal() {
            return Err(RunError::Ended(run, r.state));
        }
        self.finish(now, run, RunState::Stopped, reason.to_owned());
        Ok(())
    }

    /// Admits a new worker (its join token already checked) and returns its id.
    pub fn join(&mut self, now: Millis, host: &str, addr: SocketAddr) -> WorkerId {
        let id = WorkerId(self.counters.next_worker);
        self.counters.next_worker += 1;
        self.dirty.insert(Dirty::Counters);
        self.workers.insert(
            id,
            WorkerRecord {
                id,
                host: host.to_owned(),
                addr,
                run: None,
                joined_ms: now,
                ledger: Ledger::default(),
                banned: Vec::new(),
            },
        );
        self.live.insert(
            id,
            Live {
                last_heartbeat: now,
                alive_since: now,
                died_at: None,
                liveness: Liveness::Alive,
                rtts: BTreeMap::new(),
                uptime_mark: Some(now),
                uptime_pending: 0,
            },
        );
        self.dirty.insert(Dirty::Worker(id));
        id
    }

    /// A worker (re)opened its session: it hears its run's current epoch again.
    pub fn session_opened(
        &mut self,
        now: Millis,
        worker: WorkerId,
        addr: Option<SocketAddr>,
    ) -> Result<(), WorkerError> {
        self.heartbeat(now, worker, None)?;
        if let Some(addr) = addr {
            let w = self.workers.get_mut(&worker).ok_or(WorkerError::Unknown(worker))?;
            if w.addr != addr {
                // Its ring address changed: the ring must be re-formed.
                w.addr = addr;
                self.dirty.insert(Dirty::Worker(worker));
                if let Some(run) = w.run {
                    self.changed.insert(run);
                }
            }
        }
        let run = self.workers.get(&worker).and_then(|w| w.run);
        if let Some(r) = run.and_then(|run| self.runs.get(&run))
            && r.state == RunState::Running
            && r.members.iter().any(|m| m.worker == worker)
        {
            let info = epoch_info(r);
            self.outbox.push_back(Output::ToWorker(worker, Command::Epoch(info)));
        }
        Ok(())
    }

    /// A heartbeat, with the round-trip times the worker measured to its peers (µs).
    pub fn heartbeat(
        &mut self,
        now: Millis,
        worker: WorkerId,
        rtts: Option<BTreeMap<WorkerId, u32>>,
    ) -> Result<(), WorkerError> {
        let live = self.live.get_mut(&worker).ok_or(WorkerError::Unknown(worker))?;
        // Uptime: the time between heartbeats, unless the gap made the worker suspect.
        if let Some(mark) = live.uptime_mark
            && now > mark
            && now - mark <= self.config.suspect_after
        {
            live.uptime_pending += now - mark;
        }
        live.uptime_mark = Some(live.uptime_mark.map_or(now, |m| m.max(now)));
        if now.saturating_sub(live.last_heartbeat) > self.config.suspect_after {
            live.alive_since = now;
        }
        live.last_heartbeat = live.last_heartbeat.max(now);
        if live.liveness == Liveness::Dead {
            live.alive_since = now;
        }
        live.liveness = Liveness::Alive;
        if let Some(rtts) = rtts {
            live.rtts = rtts;
        }
        Ok(())
    }

    /// A member reports that its epoch committed `step`, with its parameter hash after that
    /// step's synchronisation (`hash`, 16 hex digits, or "" if unknown).
    ///
    /// A new step is recorded with its hash. A report of the committed step itself (every
    /// member sends one; a member that joined sends one after taking over the state) is
    /// compared: a different hash means the replicas diverged, which goes to the run's log and
    /// message naming both workers and hashes.
    pub fn step_committed(
        &mut self,
        now: Millis,
        worker: WorkerId,
        run: RunId,
        epoch: Epoch,
        step: u64,
        hash: &str,
    ) {
        let Some(r) = self.runs.get_mut(&run) else { return };
        if r.state != RunState::Running
            || r.epoch != epoch
            || !r.members.iter().any(|m| m.worker == worker)
            || step < r.committed_step
        {
            return; // stale, foreign or old news
        }
        if step == r.committed_step {
            if hash.is_empty() || hash == r.committed_hash {
                return;
            }
            if r.committed_hash.is_empty() {
                // The first report of this step did not know its hash; this one does.
                r.committed_hash = hash.to_owned();
                r.committed_by = Some(worker);
                self.dirty.insert(Dirty::Run(run));
                return;
            }
            let first = r.committed_by.map_or_else(|| "a member".to_owned(), |w| w.to_string());
            let line = format!(
                "parameters diverged at step {step}: {first} reported hash {}, {worker} {hash}",
                r.committed_hash
            );
            r.message = line.clone();
            r.updated_ms = now;
            self.dirty.insert(Dirty::Run(run));
            self.outbox.push_back(Output::Log { run, line });
            return;
        }
        let steps = step - r.committed_step;
        r.committed_step = step;
        r.committed_hash = hash.to_owned();
        r.committed_by = Some(worker);
        r.updated_ms = now;
        self.dirty.insert(Dirty::Run(run));
        if let Some(w) = self.workers.get_mut(&worker) {
            w.ledger.steps += steps;
            self.dirty.insert(Dirty::Worker(worker));
        }
        if r.committed_step >= r.total_steps {
            let msg = format!("completed {} steps", r.committed_step);
            self.finish(now, run, RunState::Completed, msg);
        } else if step >= r.last_checkpoint + r.checkpoint_interval {
            r.last_checkpoint = step - step % r.checkpoint_interval;
            let cmds: Vec<_> = r.members.iter().map(|m| m.worker).collect();
            for w in cmds {
                self.outbox.push_back(Output::ToWorker(w, Command::Checkpoint { run, step }));
            }
        }
    }

    /// A metrics report: the worker's ledger, its latest metrics, and the run's summary.
    /// Run-level values change only for a report about the worker's current run.
    pub fn metrics(&mut self, now: Millis, worker: WorkerId, m: &Metrics) {
        let Some(w) = self.workers.get_mut(&worker) else { return };
        w.ledger.samples += m.samples;
        w.ledger.bytes += m.bytes;
        self.dirty.insert(Dirty::Worker(worker));
        if w.run != Some(m.run) {
            return;
        }
        let run = m.run;
        self.latest.insert(worker, m.clone());
        if let Some(r) = self.runs.get_mut(&run) {
            if m.loss.is_some_and(f64::is_finite) {
                r.loss = m.loss;
            }
            if m.accuracy.is_some_and(|a| a.is_finite() && (0.0..=1.0).contains(&a)) {
                r.accuracy = m.accuracy;
            }
            if m.tokens_per_sec.is_finite() && m.tokens_per_sec >= 0.0 {
                r.tokens_per_sec = m.tokens_per_sec * r.members.len().max(1) as f64;
            }
            r.updated_ms = now;
            self.dirty.insert(Dirty::Run(run));
        }
    }

    /// A member reports that another member of the same epoch sent a contribution the ring
    /// rejected (non-finite or absurdly large). The accused is evicted from the run for good
    /// (it is not assigned to it again), the epoch is aborted and a new one formed without it.
    /// Reports from outside the current epoch, or about oneself, are ignored.
    pub fn member_fault(
        &mut self,
        now: Millis,
        reporter: WorkerId,
        run: RunId,
        epoch: Epoch,
        accused: WorkerId,
        reason: &str,
    ) {
        let Some(r) = self.runs.get(&run) else { return };
        let member = |w: WorkerId| r.members.iter().any(|m| m.worker == w);
        if r.state != RunState::Running
            || r.epoch != epoch
            || reporter == accused
            || !member(reporter)
            || !member(accused)
        {
            return;
        }
        if let Some(w) = self.workers.get_mut(&accused) {
            if !w.banned.contains(&run) {
                w.banned.push(run);
            }
            self.dirty.insert(Dirty::Worker(accused));
        }
        self.release_and_leave(run, accused);
        let line = format!("{accused} evicted: {reason} (reported by {reporter})");
        self.outbox.push_back(Output::Log { run, line: line.clone() });
        self.restart_epoch(now, run, line);
    }

    /// Aborts the run's epoch on every member at once, counts a restart (failing the run when
    /// its budget is spent), and has the next tick form a new epoch.
    fn restart_epoch(&mut self, now: Millis, run: RunId, reason: String) {
        let Some(r) = self.runs.get_mut(&run) else { return };
        for m in &r.members {
            self.outbox.push_back(Output::ToWorker(
                m.worker,
                Command::Abort { run, epoch: r.epoch, reason: reason.clone() },
            ));
        }
        r.restarts += 1;
        r.updated_ms = now;
        r.message = reason.clone();
        self.dirty.insert(Dirty::Run(run));
        self.changed.insert(run);
        if r.restarts > r.restart_budget {
            let msg = format!("restart budget ({}) spent; last: {reason}", r.restart_budget);
            self.finish(now, run, RunState::Failed, msg);
        }
    }

    /// A member wrote a checkpoint of `run` at `step` (at `uri`, on its own machine).
    pub fn checkpoint_done(&mut self, worker: WorkerId, run: RunId, step: u64, uri: &str) {
        let Some(r) = self.runs.get_mut(&run) else { return };
        if step >= r.latest_checkpoint_step {
            r.latest_checkpoint = format!("{worker} step {step} {uri}");
            r.latest_checkpoint_step = step;
            self.dirty.insert(Dirty::Run(run));
        }
    }

    /// Leases the next shard of the worker's run.
    pub fn lease(&mut self, now: Millis, worker: WorkerId) -> Result<Option<Lease>, LeaseError> {
        let w = self.workers.get(&worker).ok_or(LeaseError::UnknownWorker)?;
        let run = w.run.ok_or(LeaseError::NotInRun)?;
        let r = self.runs.get(&run).ok_or(LeaseError::NotInRun)?;
        if r.state != RunState::Running || !r.members.iter().any(|m| m.worker == worker) {
            return Err(LeaseError::NotInRun);
        }
        let book = self.shards.get_mut(&run).ok_or(LeaseError::NotInRun)?;
        let id = LeaseId(self.counters.next_lease);
        let lease = book.lease(now, worker, id, self.config.lease_ttl);
        if let Some(l) = &lease {
            // Shared leases are not tracked, but their ids are never reused either.
            self.counters.next_lease += 1;
            self.dirty.insert(Dirty::Counters);
            self.dirty.insert(Dirty::Shard(run, l.shard));
        }
        Ok(lease.map(|mut l| {
            l.run = run;
            l
        }))
    }

    /// Records a finished shard. `samples` (what the worker read from it) is informational:
    /// the ledger counts samples from the metrics reports, which arrive as training goes.
    pub fn complete(
        &mut self,
        now: Millis,
        worker: WorkerId,
        lease: LeaseId,
        samples: u64,
    ) -> Result<(), LeaseError> {
        let run = self.workers.get(&worker).and_then(|w| w.run).ok_or(LeaseError::NotInRun)?;
        let book = self.shards.get_mut(&run).ok_or(LeaseError::NotInRun)?;
        let shard = book.complete(now, worker, lease)?;
        self.dirty.insert(Dirty::Shard(run, shard));
        tracing::debug!(%worker, shard, samples, "shard completed");
        Ok(())
    }

    /// Advances time: liveness, lease expiry, run assignment and epoch formation.
    pub fn tick(&mut self, now: Millis) {
        // Liveness.
        let mut died = Vec::new();
        for (&id, live) in &mut self.live {
            let silent = now.saturating_sub(live.last_heartbeat);
            let before = live.liveness;
            live.liveness = if silent > self.config.dead_after {
                Liveness::Dead
            } else if silent > self.config.suspect_after {
                Liveness::Suspect
            } else {
                before.max_alive()
            };
            if live.liveness == Liveness::Dead && before != Liveness::Dead {
                live.died_at = Some(now);
                died.push(id);
            }
        }
        for id in died {
            self.on_death(now, id);
        }
        // Uptime to the ledger, in batches.
        for (&id, live) in &mut self.live {
            let silent = now.saturating_sub(live.last_heartbeat) > self.config.suspect_after;
            if live.uptime_pending >= UPTIME_FLUSH_MS || (silent && live.uptime_pending > 0) {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.ledger.uptime_ms += live.uptime_pending;
                    self.dirty.insert(Dirty::Worker(id));
                }
                live.uptime_pending = 0;
            }
        }
        // Lease expiry.
        for (&run, book) in &mut self.shards {
            for shard in book.expire(now) {
                self.dirty.insert(Dirty::Shard(run, shard));
            }
        }
        self.assign(now);
        self.form_epochs(now);
    }

    fn on_death(&mut self, now: Millis, id: WorkerId) {
        let Some(w) = self.workers.get(&id) else { return };
        let Some(run) = w.run else { return };
        self.release_and_leave(run, id);
        let Some(r) = self.runs.get(&run) else { return };
        if r.state != RunState::Running || !r.members.iter().any(|m| m.worker == id) {
            return;
        }
        // Abort the old epoch at once, on every member.
        let reason = format!("{id} died (no heartbeat for {} ms)", self.config.dead_after);
        self.restart_epoch(now, run, reason);
    }

    /// A worker leaves `run`: its leases go back to the queue.
    fn release_and_leave(&mut self, run: RunId, id: WorkerId) {
        if let Some(book) = self.shards.get_mut(&run) {
            for shard in book.release_worker(id) {
                self.dirty.insert(Dirty::Shard(run, shard));
            }
        }
        self.leave_run(id);
    }

    fn leave_run(&mut self, id: WorkerId) {
        self.latest.remove(&id);
        if let Some(w) = self.workers.get_mut(&id)
            && w.run.take().is_some()
        {
            self.dirty.insert(Dirty::Worker(id));
        }
    }

    /// Gives free, admissible workers to runs that want more, oldest run first.
    fn assign(&mut self, now: Millis) {
        let mut free: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.run.is_none() && self.admissible(now, w.id))
            .map(|w| w.id)
            .collect();
        free.reverse(); // pop() yields the smallest id first
        for r in self.runs.values() {
            if r.state.is_terminal() {
                continue;
            }
            let have = self.workers.values().filter(|w| w.run == Some(r.id)).count() as u32;
            for _ in have..r.max_workers {
                // The smallest free id not banned from this run.
                let banned =
                    |id: &WorkerId| self.workers.get(id).is_some_and(|w| w.banned.contains(&r.id));
                let Some(pos) = free.iter().rposition(|id| !banned(id)) else { break };
                let id = free.remove(pos);
                if let Some(w) = self.workers.get_mut(&id) {
                    w.run = Some(r.id);
                }
                self.dirty.insert(Dirty::Worker(id));
                self.changed.insert(r.id);
            }
        }
    }

    fn admissible(&self, now: Millis, id: WorkerId) -> bool {
        let Some(l) = self.live.get(&id) else { return false };
        l.liveness == Liveness::Alive
            && (l.died_at.is_none()
                || now.saturating_sub(l.alive_since) >= self.config.readmit_after)
    }

    /// Forms a new epoch for every run whose membership changed.
    fn form_epochs(&mut self, now: Millis) {
        let changed = std::mem::take(&mut self.changed);
        for run in changed {
            let Some(r) = self.runs.get(&run) else { continue };
            if r.state.is_terminal() {
                continue;
            }
            let ids: Vec<WorkerId> =
                self.workers.values().filter(|w| w.run == Some(run)).map(|w| w.id).collect();
            let current: Vec<WorkerId> = r.members.iter().map(|m| m.worker).collect();
            let mut sorted_current = current.clone();
            sorted_current.sort();
            if ids == sorted_current && !ids.is_empty() && r.state == RunState::Running {
                // Same members; only addresses may have changed.
                let same_addrs = r
                    .members
                    .iter()
                    .all(|m| self.workers.get(&m.worker).map(|w| w.addr) == Some(m.addr));
                if same_addrs {
                    continue;
                }
            }
            if (ids.len() as u32) < r.min_workers {
                let r = self.runs.get_mut(&run).expect("run looked up above");
                if !r.members.is_empty() {
                    r.members.clear();
                    r.message =
                        format!("waiting for workers ({} of {} live)", ids.len(), r.min_workers);
                    self.dirty.insert(Dirty::Run(run));
                }
                continue;
            }
            let order = order_ring(&ids, |a, b| self.rtt(a, b));
            let members: Vec<Member> = order
                .iter()
                .filter_map(|id| self.workers.get(id).map(|w| Member { worker: *id, addr: w.addr }))
                .collect();
            let r = self.runs.get_mut(&run).expect("run looked up above");
            r.epoch = Epoch(r.epoch.0 + 1);
            r.members = members;
            r.state = RunState::Running;
            r.updated_ms = now;
            r.message = format!("epoch {} with {} workers", r.epoch, r.members.len());
            self.dirty.insert(Dirty::Run(run));
            let info = epoch_info(r);
            for m in &r.members {
                self.outbox.push_back(Output::ToWorker(m.worker, Command::Epoch(info.clone())));
            }
        }
    }

    /// The symmetric RTT estimate between two workers (µs); unknown pairs count as 1 s.
    fn rtt(&self, a: WorkerId, b: WorkerId) -> u64 {
        let ab = self.live.get(&a).and_then(|l| l.rtts.get(&b)).copied();
        let ba = self.live.get(&b).and_then(|l| l.rtts.get(&a)).copied();
        match (ab, ba) {
            (Some(x), Some(y)) => (u64::from(x) + u64::from(y)) / 2,
            (Some(x), None) | (None, Some(x)) => u64::from(x),
            (None, None) => 1_000_000,
        }
    }

    fn finish(&mut self, now: Millis, run: RunId, state: RunState, reason: String) {
        let (utilisation, bytes) = (self.compute_utilisation(run), self.bytes_moved(run));
        let Some(r) = self.runs.get_mut(&run) else { return };
        if !r.members.is_empty() {
            r.final_utilisation = Some(utilisation);
            r.final_bytes = Some(bytes);
        }
        r.state = state;
        r.message = reason.clone();
        r.updated_ms = now;
        let members = std::mem::take(&mut r.members);
        self.dirty.insert(Dirty::Run(run));
        for m in members {
            self.outbox.push_back(Output::ToWorker(
                m.worker,
                Command::Stop { run, state, reason: reason.clone() },
            ));
        }
        let ids: Vec<WorkerId> =
            self.workers.values().filter(|w| w.run == Some(run)).map(|w| w.id).collect();
        for id in ids {
            self.leave_run(id);
        }
        if let Some(book) = self.shards.get_mut(&run) {
            for shard in book.release_all() {
                self.dirty.insert(Dirty::Shard(run, shard));
            }
        }
        // Freed workers may serve another run at the next tick.
        let others: Vec<RunId> =
            self.runs.values().filter(|r| !r.state.is_terminal()).map(|r| r.id).collect();
        self.changed.extend(others);
    }

    // ---- outputs and queries ----

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outbox.pop_front()
    }

    pub fn take_dirty(&mut self) -> BTreeSet<Dirty> {
        std::mem::take(&mut self.dirty)
    }

    pub fn run(&self, id: RunId) -> Option<&RunRecord> {
        self.runs.get(&id)
    }

    pub fn runs(&self) -> impl Iterator<Item = &RunRecord> {
        self.runs.values()
    }

    pub fn worker(&self, id: WorkerId) -> Option<&WorkerRecord> {
        self.workers.get(&id)
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.values()
    }

    pub fn liveness(&self, id: WorkerId) -> Option<Liveness> {
        self.live.get(&id).map(|l| l.liveness)
    }

    /// Time the worker has been connected (heartbeating), persisted part and pending part.
    pub fn uptime(&self, id: WorkerId) -> Option<Millis> {
        let w = self.workers.get(&id)?;
        Some(w.ledger.uptime_ms + self.live.get(&id).map_or(0, |l| l.uptime_pending))
    }

    pub fn last_heartbeat(&self, id: WorkerId) -> Option<Millis> {
        self.live.get(&id).map(|l| l.last_heartbeat)
    }

    /// The worker's latest metrics report in its current run.
    pub fn latest_metrics(&self, id: WorkerId) -> Option<&Metrics> {
        self.latest.get(&id)
    }

    /// The mean compute utilisation of the run's current members (those that reported times);
    /// 0 if none did.
    pub fn compute_utilisation(&self, run: RunId) -> f64 {
        let Some(r) = self.runs.get(&run) else { return 0.0 };
        if r.members.is_empty()
            && let Some(u) = r.final_utilisation
        {
            return u;
        }
        let us: Vec<f64> = r
            .members
            .iter()
            .filter_map(|m| self.latest.get(&m.worker)?.compute_utilisation())
            .collect();
        if us.is_empty() { 0.0 } else { us.iter().sum::<f64>() / us.len() as f64 }
    }

    /// The bytes the run's current members sent on the ring, summed (their latest reports).
    pub fn bytes_moved(&self, run: RunId) -> u64 {
        let Some(r) = self.runs.get(&run) else { return 0 };
        if r.members.is_empty()
            && let Some(b) = r.final_bytes
        {
            return b;
        }
        r.members
            .iter()
            .filter_map(|m| self.latest.get(&m.worker))
            .fold(0u64, |sum, m| sum.saturating_add(m.bytes_sent))
    }

    pub fn shards(&self, run: RunId) -> Option<&ShardBook> {
        self.shards.get(&run)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Checks the invariants that hold after every input; `Err` names the broken one.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (run, book) in &self.shards {
            for (shard, holder) in book.holders() {
                let live = self.live.get(&holder).map(|l| l.liveness);
                if live == Some(Liveness::Dead) {
                    return Err(format!("run {run} shard {shard} leased to dead {holder}"));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for r in self.runs.values() {
            for m in &r.members {
                if !seen.insert(m.worker) {
                    return Err(format!("{} is a member of two epochs", m.worker));
                }
            }
            if r.state.is_terminal() && !r.members.is_empty() {
                return Err(format!("run {} ended but has members", r.id));
            }
        }
        Ok(())
    }
}

fn epoch_info(r: &RunRecord) -> EpochInfo {
    EpochInfo {
        run: r.id,
        epoch: r.epoch,
        members: r.members.clone(),
        committed_step: r.committed_step,
        committed_hash: r.committed_hash.clone(),
        total_steps: r.total_steps,
    }
}

trait MaxAlive {
    fn max_alive(self) -> Liveness;
}

impl MaxAlive for Liveness {
    /// Within the deadline: a dead worker stays dead until it heartbeats again (which sets it
    /// alive in [`Cluster::heartbeat`]); anyone else is alive.
    fn max_alive(self) -> Liveness {
        if self == Liveness::Dead { Liveness::Dead } else { Liveness::Alive }
    }
}
