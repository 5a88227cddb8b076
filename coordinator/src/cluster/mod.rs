//! The cluster's state, as a sans-IO state machine.
//!
//! [`Cluster`] does no IO and reads no clock: the shell (the gRPC server, or the test harness)
//! calls it with the current time ([`Millis`], wall-clock milliseconds) and what happened (a
//! join, a heartbeat, a report, a lease request), calls [`Cluster::tick`] periodically, and then:
//!
//! 1. persists the records named by [`Cluster::take_dirty`] and the appends among the outputs
//!    (write-ahead: an epoch is stored before anyone hears of it, so no epoch id is ever
//!    reused), and only then
//! 2. delivers the [`Output`]s from [`Cluster::poll_output`] to the workers.
//!
//! # Trust
//!
//! Every worker may lie, and nothing one member says is taken on its word (see `ARCHITECTURE.md`,
//! threat model). What it decides, and on what evidence:
//!
//! - **Liveness** from heartbeats: alive, then suspect after `suspect_after` without one, then
//!   dead after `dead_after`. Death removes the worker from its run and counts a restart. A
//!   worker is assignable only once it opened a session.
//! - **Epochs**: any change of a run's membership makes epoch e+1, announced to every member as
//!   a ring ordered to minimise the round-trip times the workers report. Changes are batched per
//!   tick. A restarted coordinator forms a new epoch for every running run.
//! - **Agreement** ([`progress`]): every member reports the state it holds at the start of an
//!   epoch; the coordinator names the source (a member holding the recorded state) and the
//!   receivers. A state ahead of the record counts only once a majority of the members of the
//!   epoch that planned it hold it.
//! - **Synchronisations** ([`progress`]): every member commits statistics of its own
//!   contribution; once all have, every member gets the same plan ([`aggregate`]). A step is
//!   recorded when a majority of the epoch that planned it report the same hash, and it may
//!   advance only to the next sync point; a run completes only through that record; the ledger
//!   credits the members of that majority.
//! - **Disputes** ([`disputes`]): the two sides of an accusation the coordinator cannot verify
//!   are never in one ring again, and the fewest members that account for every dispute sit
//!   out; a peer that two members cannot reach is dropped from the ring (it sits out
//!   `bench_for`, twice as long each time); a member whose own commitments contradict
//!   themselves is banned from the run (its id, its key, and its public address).
//! - **Quotas**: one ring-address change per session, a bounded number per window; tokens with a
//!   use count; bounded leases per worker.
//! - **Lifecycle**: pending → running (min workers reached) → completed (step budget recorded) |
//!   failed (restart budget spent by deaths) | stopped (by a user).

pub mod aggregate;
pub mod audits;
pub mod checkpoints;
pub mod commitments;
mod disputes;
mod progress;
mod ring;

#[cfg(test)]
mod harness;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use proto::{Epoch, LeaseId, Liveness, ParamHash, RunId, RunState, WorkerId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::shards::{Lease, LeaseError, Manifest, ShardBook};
use crate::store::MetricPoint;
use checkpoints::CheckpointRecord;
use runspec::{RunSpec, SyncMode};

pub use progress::{AgreementInfo, Fault, FaultKind, PendingSync, PlanInfo};
pub use ring::order_ring;

/// Wall-clock time in milliseconds since the Unix epoch (virtual in tests).
pub type Millis = u64;

/// Deadlines and quotas of the state machine. The defaults suit workers that heartbeat every
/// second over links of up to 300 ms RTT: a worker is suspect after 3 missed beats and dead
/// after 10.
#[derive(Clone, Debug)]
pub struct Config {
    pub suspect_after: Millis,
    pub dead_after: Millis,
    /// A worker that died must heartbeat this long without a gap before it is admitted to an
    /// epoch again, so a flapping worker does not churn epochs.
    pub readmit_after: Millis,
    pub lease_ttl: Millis,
    /// How long a worker sits out after being dropped from a ring it would not form or commit
    /// to (twice as long each time), or after diverging twice.
    pub bench_for: Millis,
    /// How long an epoch's agreement waits for every member's report before it is decided with
    /// the reports at hand (a member that sent none receives the state).
    pub agree_wait: Millis,
    /// The least time a sync waits for its last commitments once every other member committed;
    /// it grows with the rounds' length (four times the time the others took).
    pub commit_grace: Millis,
    /// Tracked leases one worker may hold at once (one shard read, one prefetched).
    pub max_leases_per_worker: usize,
    /// Ring-address changes a worker may make within `addr_change_window`.
    pub max_addr_changes: usize,
    pub addr_change_window: Millis,
    /// Log lines kept per run; the rest are dropped (with one line saying so).
    pub max_log_lines: u64,
    /// A running ring that only grows (joins) is re-formed at most this often.
    pub grow_every: Millis,
    /// The key of audit draws (derived from the CA key by the shell; see `audits`).
    pub audit_key: [u8; 32],
}

impl Default for Config {
    fn default() -> Self {
        Self {
            suspect_after: 3_000,
            dead_after: 10_000,
            readmit_after: 30_000,
            lease_ttl: 300_000,
            bench_for: 60_000,
            agree_wait: 30_000,
            commit_grace: 60_000,
            max_leases_per_worker: 2,
            max_addr_changes: 3,
            addr_change_window: 600_000,
            max_log_lines: 10_000,
            grow_every: 2_000,
            audit_key: [0; 32],
        }
    }
}

/// A durable record that changed and must be persisted before outputs are delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dirty {
    Run(RunId),
    Worker(WorkerId),
    Shard(RunId, u32),
    Counters,
    /// A join token (removed when the cluster no longer holds it).
    Token([u8; 32]),
}

/// One batch of work for the shell (see [`Cluster::ready`]).
#[derive(Debug, Default)]
pub struct Ready {
    /// Records whose state changed: to persist.
    pub dirty: BTreeSet<Dirty>,
    /// In order: appends to persist with the records, commands to deliver once durable.
    pub outputs: Vec<Output>,
}

/// What the cluster asks the shell to persist and deliver.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    ToWorker(WorkerId, Command),
    /// A line for the run's log (persisted; watchers see it; the shell also logs it).
    Log {
        run: RunId,
        line: String,
    },
    /// A metric point of the run (persisted, one per step).
    Metric {
        run: RunId,
        point: MetricPoint,
    },
    /// A checkpoint a member reported (persisted in the run's checkpoint index).
    Checkpoint {
        run: RunId,
        record: CheckpointRecord,
    },
    /// A member's commitment to a sync and its verdict (persisted before the plan goes out).
    Commitment {
        run: RunId,
        record: commitments::CommitmentRecord,
    },
    /// A finished audit (persisted, for the ledger).
    Audit {
        run: RunId,
        record: audits::AuditRecord,
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
    /// The epoch's starting state: who sends it, who receives it.
    Agreement(AgreementInfo),
    /// The plan of one synchronisation.
    Plan(PlanInfo),
    /// Recompute another member's contribution (an audit).
    Audit(audits::AuditInfo),
    /// Send the checkpoint of `step` to the coordinator as transfer `transfer`.
    /// Send a checkpoint copy, or (`inner`) the inner optimizer state with that digest.
    Upload { run: RunId, step: u64, transfer: u64, inner: Option<[u8; 32]> },
}

/// One epoch of a run, as announced to its members.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochInfo {
    pub run: RunId,
    pub epoch: Epoch,
    pub members: Vec<Member>,
    pub committed_step: u64,
    /// The state hash recorded with `committed_step` (none yet: the seeded initial state).
    #[serde(default, with = "proto::domain::opt_hash")]
    pub committed_hash: Option<ParamHash>,
    pub total_steps: u64,
    /// Whether the run file goes with it (to a member new to the run, or re-sent).
    #[serde(default)]
    pub with_spec: bool,
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
    /// The state hash a majority of the epoch that planned `committed_step` reported (none if
    /// unknown).
    #[serde(default, with = "proto::domain::opt_hash")]
    pub committed_hash: Option<ParamHash>,
    /// The synchronisation planned and not yet recorded (persisted with the plan, so that the
    /// members' reports still count after a coordinator restart).
    #[serde(default)]
    pub pending: Option<PendingSync>,
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
    #[serde(with = "crate::floats::opt_f64", default)]
    pub loss: Option<f64>,
    /// The latest accuracy any member reported.
    #[serde(with = "crate::floats::opt_f64", default)]
    pub accuracy: Option<f64>,
    #[serde(with = "crate::floats::f64")]
    pub tokens_per_sec: f64,
    /// Compute utilisation and ring bytes of the last members, kept when the run ends (the
    /// live figures are over the current members).
    #[serde(with = "crate::floats::opt_f64", default)]
    pub final_utilisation: Option<f64>,
    #[serde(default)]
    pub final_bytes: Option<u64>,
    /// The newest checkpoint a member reported: "worker-N step S uri".
    #[serde(default)]
    pub latest_checkpoint: String,
    #[serde(default)]
    pub latest_checkpoint_step: u64,
    /// Keys (SHA-256 of the public key, hex) and public addresses banned from this run.
    #[serde(default)]
    pub banned_keys: Vec<String>,
    #[serde(default)]
    pub banned_ips: Vec<IpAddr>,
    /// Lines in the run's log so far (bounded by `Config::max_log_lines`).
    #[serde(default)]
    pub log_lines: u64,
    /// The states recorded before `committed_step`, newest last (at most 32): where the run
    /// rewinds to if no member holds the recorded state any more.
    #[serde(default)]
    pub history: Vec<(u64, ParamHash)>,
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
    /// Runs this worker was banned from on evidence; it is not assigned to them again.
    #[serde(default)]
    pub banned: Vec<RunId>,
    /// SHA-256 of its public key, hex: `Join` with the same key is the same worker.
    #[serde(default)]
    pub key: String,
    /// The first 8 hex digits of the hash of the join token it joined with (its operator).
    #[serde(default)]
    pub token: String,
    /// The address its latest session came from.
    #[serde(default)]
    pub ip: Option<IpAddr>,
}

/// What a worker has contributed, summed over its life. Everything but `bytes` is what the
/// coordinator verified: steps and syncs a quorum recorded with this worker among it, samples
/// from the run file's batch size for those steps, uptime from heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    pub samples: u64,
    pub steps: u64,
    /// Ring bytes, as the worker reported them (not verified).
    pub bytes: u64,
    pub uptime_ms: u64,
    /// Recorded synchronisations it contributed to.
    #[serde(default)]
    pub syncs: u64,
    /// Recorded synchronisations it was left out of (zero or outlying contribution).
    #[serde(default)]
    pub excluded: u64,
    /// Samples named in its accepted commitments to recorded syncs: data spans under the
    /// coordinator's own lease grants (see `commitments`).
    #[serde(default)]
    pub verified_samples: u64,
    /// Audits of its contributions that found the digest it committed, and those two auditors
    /// confirmed wrong (see `audits`).
    #[serde(default)]
    pub audits_passed: u64,
    #[serde(default)]
    pub strikes: u64,
    /// Audits it performed that the verdict agreed with, and those it got wrong.
    #[serde(default)]
    pub audits_performed: u64,
    #[serde(default)]
    pub audits_wrong: u64,
}

/// Counters that must never repeat.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub next_run: u64,
    pub next_worker: u64,
    pub next_lease: u64,
}

/// A join token: its expiry and how many new workers may still join with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub expires_ms: Millis,
    pub uses_left: u32,
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
    /// Whether it opened a session since it joined or the coordinator started: only then is
    /// it assigned to a run (a worker that joined and never connected is a ghost).
    session_seen: bool,
    /// It sits out (is not assigned) until then.
    benched_until: Millis,
    /// How often it was dropped from a ring it would not form or commit to (each drop doubles
    /// the next one's bench, up to 64 times `bench_for`).
    drops: u32,
    /// How often it died (each death doubles the time it must be healthy to be readmitted).
    deaths: u32,
    /// When its ring address changed, within the window.
    addr_changes: VecDeque<Millis>,
}

impl Live {
    fn new(now: Millis, liveness: Liveness, uptime_mark: Option<Millis>) -> Self {
        Self {
            last_heartbeat: now,
            alive_since: now,
            died_at: None,
            liveness,
            rtts: BTreeMap::new(),
            uptime_mark,
            uptime_pending: 0,
            session_seen: false,
            benched_until: 0,
            drops: 0,
            deaths: 0,
            addr_changes: VecDeque::new(),
        }
    }
}

/// How long an expired join token is kept (to say "expired" rather than "not recognised").
pub const TOKEN_KEPT_MS: Millis = 86_400_000;

/// Accrued uptime moves to the persisted ledger in batches of at least this much (or when the
/// worker falls silent), so heartbeats cost no store write; a crash loses less than this.
pub const UPTIME_FLUSH_MS: Millis = 10_000;

/// A metrics report from a worker about `run`, validated ([`Metrics::check`]). `bytes` is an
/// increment (for the ledger); the times and ring bytes are cumulative since the worker started
/// on the run.
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
    /// The worker's state hash, if it knows it.
    pub param_hash: Option<ParamHash>,
}

/// The largest rate, time or byte count a metrics report may carry: beyond anything real, and
/// small enough that sums over thousands of workers stay finite and exact.
pub const METRIC_MAX: f64 = 1e15;

impl Metrics {
    /// Checks every value: finite, not negative, within [`METRIC_MAX`]; accuracy a fraction.
    pub fn check(&self) -> Result<(), String> {
        let field = |name: &str, v: f64| {
            if v.is_finite() && (0.0..=METRIC_MAX).contains(&v) {
                Ok(())
            } else {
                Err(format!("metrics.{name} = {v}: expected a finite value in [0, {METRIC_MAX:e}]"))
            }
        };
        if let Some(l) = self.loss {
            field("loss", l)?;
        }
        if let Some(a) = self.accuracy
            && !(0.0..=1.0).contains(&a)
        {
            return Err(format!("metrics.accuracy = {a}: expected a fraction in [0, 1]"));
        }
        field("grad_norm", self.grad_norm)?;
        field("tokens_per_sec", self.tokens_per_sec)?;
        field("compute_ms", self.compute_ms)?;
        field("comm_ms", self.comm_ms)?;
        field("idle_ms", self.idle_ms)?;
        for (name, v) in [
            ("samples", self.samples),
            ("bytes", self.bytes),
            ("bytes_sent", self.bytes_sent),
            ("bytes_received", self.bytes_received),
        ] {
            field(name, v as f64)?;
        }
        Ok(())
    }

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
    RunFile(#[from] runspec::RunFileError),
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
    #[error(
        "{0} changed its ring address {1} times within {2} s; keep --ring-advertise stable \
         (the change was refused)"
    )]
    AddressFlapping(WorkerId, usize, u64),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum JoinError {
    #[error("join token not recognised")]
    UnknownToken,
    #[error("join token expired {0} s ago; create a new one with `longhaul token create`")]
    Expired(u64),
    #[error("join token used up; create a new one with `longhaul token create --uses N`")]
    UsedUp,
}

/// Why a report was refused (the session is told, and closed for the malformed ones).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReportError {
    #[error("{0}")]
    Invalid(String),
}

/// The whole cluster.
#[derive(Debug)]
pub struct Cluster {
    config: Config,
    counters: Counters,
    runs: BTreeMap<RunId, RunRecord>,
    /// Each run's parsed run file.
    specs: BTreeMap<RunId, RunSpec>,
    shards: BTreeMap<RunId, ShardBook>,
    /// Audits drawn and their answers, and every member's audit standing per run (standings
    /// are rebuilt from the stored audits after a restart; open audits are lost).
    audits: audits::Book,
    /// What each worker claimed and was accepted per run, and under which profile (rebuilt
    /// from the stored commitments after a restart).
    claims: BTreeMap<(RunId, WorkerId), commitments::ClaimBook>,
    /// Each run's recently accepted contributions by digest, to name copies (rebuilt like
    /// `claims`).
    digests: BTreeMap<RunId, commitments::RecentDigests>,
    workers: BTreeMap<WorkerId, WorkerRecord>,
    /// Workers by key.
    keys: BTreeMap<String, WorkerId>,
    live: BTreeMap<WorkerId, Live>,
    tokens: BTreeMap<[u8; 32], TokenRecord>,
    /// Runs whose membership changed since the last epoch was formed.
    changed: BTreeSet<RunId>,
    /// Runs that get a new epoch at the next tick even with the same members (after a restart,
    /// or a corroborated ring failure).
    force_epoch: BTreeSet<RunId>,
    /// What each run's current epoch is doing (volatile).
    syncs: BTreeMap<RunId, progress::EpochSync>,
    /// How often each member of a run held another state than the majority (volatile).
    divergences: BTreeMap<(RunId, WorkerId), u32>,
    /// Each run's last recorded sync and the steps it advanced, for crediting members whose
    /// report arrives after the majority's (volatile).
    recorded: BTreeMap<RunId, (PendingSync, u64)>,
    /// Per run and member, the members it had unverifiable disputes with (volatile).
    disputes: BTreeMap<(RunId, WorkerId), BTreeSet<WorkerId>>,
    /// Per run, the workers its disputes keep out of its ring ([`disputes`]; volatile).
    sit_out: BTreeMap<RunId, BTreeSet<WorkerId>>,
    /// Per run, the workers that said they cannot train it, and why (volatile: a worker
    /// assigned again after a restart says so again).
    declined: BTreeMap<(RunId, WorkerId), String>,
    /// Per run and pair of members (smaller id first), the epochs in which one could not form a
    /// ring with the other since a sync both were members of was recorded (volatile).
    /// How many, and the last one counted.
    unreachable: BTreeMap<(RunId, WorkerId, WorkerId), (u32, Epoch)>,
    /// Members whose death was counted against a run's restart budget (volatile).
    died_in: BTreeSet<(RunId, WorkerId)>,
    /// When each run's current epoch was formed (volatile).
    formed: BTreeMap<RunId, Millis>,
    /// The latest metrics report of each worker in its current run (volatile).
    latest: BTreeMap<WorkerId, Metrics>,
    /// Each run's recent checkpoints and their verified models (rebuilt from the store).
    checkpoints: BTreeMap<RunId, checkpoints::Book>,
    dirty: BTreeSet<Dirty>,
    outbox: VecDeque<Output>,
}

impl Cluster {
    pub fn new(config: Config) -> Self {
        Self {
            audits: audits::Book::new(config.audit_key),
            config,
            counters: Counters { next_run: 1, next_worker: 1, next_lease: 1 },
            runs: BTreeMap::new(),
            specs: BTreeMap::new(),
            shards: BTreeMap::new(),
            claims: BTreeMap::new(),
            digests: BTreeMap::new(),
            workers: BTreeMap::new(),
            keys: BTreeMap::new(),
            live: BTreeMap::new(),
            tokens: BTreeMap::new(),
            changed: BTreeSet::new(),
            force_epoch: BTreeSet::new(),
            syncs: BTreeMap::new(),
            divergences: BTreeMap::new(),
            recorded: BTreeMap::new(),
            disputes: BTreeMap::new(),
            sit_out: BTreeMap::new(),
            declined: BTreeMap::new(),
            unreachable: BTreeMap::new(),
            died_in: BTreeSet::new(),
            formed: BTreeMap::new(),
            latest: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            dirty: BTreeSet::new(),
            outbox: VecDeque::new(),
        }
    }

    /// Rebuilds the cluster from its persisted records after a restart at `now`. Every known
    /// worker starts suspect with a full `dead_after` to reconnect; every running run gets a new
    /// epoch (what the old one was doing in memory is gone). A run whose file no longer parses
    /// is failed with the reason, not a reason not to start.
    pub fn restore(config: Config, now: Millis, state: Restored) -> Self {
        let mut c = Self::new(config);
        c.counters = state.counters;
        for w in state.workers {
            c.live.insert(w.id, Live::new(now, Liveness::Suspect, None));
            if !w.key.is_empty() {
                c.keys.insert(w.key.clone(), w.id);
            }
            c.workers.insert(w.id, w);
        }
        c.tokens = state.tokens;
        c.shards = state.shards;
        c.checkpoints = state
            .checkpoints
            .into_iter()
            .map(|(run, rs)| (run, checkpoints::Book::restore(rs)))
            .collect();
        for mut r in state.runs {
            match RunSpec::parse(&r.spec_toml) {
                Ok(spec) => {
                    c.specs.insert(r.id, spec);
                }
                Err(e) if !r.state.is_terminal() => {
                    r.state = RunState::Failed;
                    r.members.clear();
                    r.message = format!("its run file no longer parses: {e}");
                    c.dirty.insert(Dirty::Run(r.id));
                }
                Err(_) => {}
            }
            if !r.state.is_terminal() && !c.shards.contains_key(&r.id) {
                r.state = RunState::Failed;
                r.members.clear();
                r.message = "its shard records could not be read (quarantined)".into();
                c.dirty.insert(Dirty::Run(r.id));
            }
            if r.state == RunState::Running {
                c.changed.insert(r.id);
                c.force_epoch.insert(r.id);
            }
            c.runs.insert(r.id, r);
        }
        for (run, (commitments, audits)) in &state.verification {
            if c.runs.get(run).is_some_and(|r| !r.state.is_terminal()) {
                c.replay_verification(*run, commitments, audits);
            }
        }
        // Workers assigned to a run that ended (or vanished) are free.
        let stale: Vec<WorkerId> = c
            .workers
            .values()
            .filter(|w| w.run.is_some_and(|r| c.runs.get(&r).is_none_or(|r| r.state.is_terminal())))
            .map(|w| w.id)
            .collect();
        for id in stale {
            c.leave_run(id);
        }
        c
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    // ---- inputs: runs and tokens ----

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
            committed_hash: None,
            pending: None,
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
            banned_keys: Vec::new(),
            banned_ips: Vec::new(),
            log_lines: 0,
            history: Vec::new(),
        };
        let book = ShardBook::new(manifest);
        for i in 0..book.len() {
            self.dirty.insert(Dirty::Shard(id, i));
        }
        self.shards.insert(id, book);
        self.specs.insert(id, spec.clone());
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

    /// Adds a join token (by hash) for `uses` new workers until `expires_ms`.
    pub fn add_token(&mut self, hash: [u8; 32], expires_ms: Millis, uses: u32) {
        self.tokens.insert(hash, TokenRecord { expires_ms, uses_left: uses.max(1) });
        self.dirty.insert(Dirty::Token(hash));
    }

    pub fn token(&self, hash: &[u8; 32]) -> Option<TokenRecord> {
        self.tokens.get(hash).copied()
    }

    // ---- inputs: workers ----

    /// Admits a worker with the join token `token` (by hash) and its key (`key`, the SHA-256 of
    /// its public key), and returns its id. Idempotent: a key that joined before gets its
    /// worker back (the token must still be valid, but no use is spent), so a retried or
    /// duplicated `Join` never makes a ghost.
    pub fn join(
        &mut self,
        now: Millis,
        token: &[u8; 32],
        key: &str,
        host: &str,
        addr: SocketAddr,
    ) -> Result<WorkerId, JoinError> {
        let t = self.tokens.get(token).copied().ok_or(JoinError::UnknownToken)?;
        if t.expires_ms <= now {
            return Err(JoinError::Expired((now - t.expires_ms) / 1000));
        }
        if let Some(&id) = self.keys.get(key) {
            return Ok(id);
        }
        if t.uses_left == 0 {
            return Err(JoinError::UsedUp);
        }
        self.tokens.insert(*token, TokenRecord { uses_left: t.uses_left - 1, ..t });
        self.dirty.insert(Dirty::Token(*token));
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
                key: key.to_owned(),
                token: client::pki::hex(&token[..4]),
                ip: None,
            },
        );
        if !key.is_empty() {
            self.keys.insert(key.to_owned(), id);
        }
        self.live.insert(id, Live::new(now, Liveness::Alive, Some(now)));
        self.dirty.insert(Dirty::Worker(id));
        Ok(id)
    }

    /// The worker that joined with `key`, if any.
    pub fn worker_by_key(&self, key: &str) -> Option<WorkerId> {
        self.keys.get(key).copied()
    }

    /// A worker opened a session (from `ip`), announcing its ring address: it hears its run's
    /// current epoch, agreement and plan again. A changed address re-forms its ring, within the
    /// quota of changes.
    pub fn session_opened(
        &mut self,
        now: Millis,
        worker: WorkerId,
        ip: Option<IpAddr>,
        addr: Option<SocketAddr>,
    ) -> Result<(), WorkerError> {
        self.heartbeat(now, worker, None)?;
        let window = self.config.addr_change_window;
        let max = self.config.max_addr_changes;
        let live = self.live.get_mut(&worker).ok_or(WorkerError::Unknown(worker))?;
        live.session_seen = true;
        let w = self.workers.get_mut(&worker).ok_or(WorkerError::Unknown(worker))?;
        if ip.is_some() && w.ip != ip {
            w.ip = ip;
            self.dirty.insert(Dirty::Worker(worker));
        }
        if let Some(addr) = addr
            && w.addr != addr
        {
            while live.addr_changes.front().is_some_and(|t| now.saturating_sub(*t) > window) {
                live.addr_changes.pop_front();
            }
            if live.addr_changes.len() >= max {
                return Err(WorkerError::AddressFlapping(worker, max, window / 1000));
            }
            live.addr_changes.push_back(now);
            // Its ring address changed: the ring must be re-formed.
            w.addr = addr;
            self.dirty.insert(Dirty::Worker(worker));
            if let Some(run) = w.run {
                self.changed.insert(run);
            }
        }
        self.resend(worker);
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

    /// A metrics report: the worker's latest metrics, the run's summary, and a metric point.
    /// Only a member of the run's current epoch reports; values were checked
    /// ([`Metrics::check`]), and a step must be one the run could have reached.
    pub fn metrics(
        &mut self,
        now: Millis,
        worker: WorkerId,
        m: &Metrics,
    ) -> Result<(), ReportError> {
        m.check().map_err(ReportError::Invalid)?;
        let Some(r) = self.runs.get(&m.run) else { return Ok(()) };
        if r.state != RunState::Running || !r.members.iter().any(|x| x.worker == worker) {
            return Ok(()); // stale or foreign: ignored
        }
        let limit = self.next_sync_point(m.run).unwrap_or(r.committed_step);
        if m.step > limit {
            return Err(ReportError::Invalid(format!(
                "metrics.step {} is beyond the run's next synchronisation ({limit})",
                m.step
            )));
        }
        let run = m.run;
        if let Some(w) = self.workers.get_mut(&worker) {
            w.ledger.bytes = w.ledger.bytes.saturating_add(m.bytes);
            self.dirty.insert(Dirty::Worker(worker));
        }
        self.latest.insert(worker, m.clone());
        let members = r.members.len().max(1) as f64;
        let r = self.runs.get_mut(&run).expect("run looked up above");
        if m.loss.is_some() {
            r.loss = m.loss;
        }
        if m.accuracy.is_some() {
            r.accuracy = m.accuracy;
        }
        r.tokens_per_sec = (m.tokens_per_sec * members).min(METRIC_MAX);
        r.updated_ms = now;
        self.dirty.insert(Dirty::Run(run));
        let point = MetricPoint {
            step: m.step,
            loss: m.loss,
            tokens_per_sec: m.tokens_per_sec,
            at_ms: now,
            accuracy: m.accuracy,
            compute_utilisation: self.compute_utilisation(run),
            bytes_moved: self.bytes_moved(run),
            workers: members as u32,
        };
        self.outbox.push_back(Output::Metric { run, point });
        Ok(())
    }

    /// A member wrote a checkpoint of `run` at `step` (`copy`: where, on its own machine, and
    /// the digests of its files). Only a current member of that running run, for a step the run
    /// reached; the strings were checked by the shell (bounded, printable, digests). The step's
    /// model is verified once a majority of the members reported one digest (see
    /// [`checkpoints`]).
    pub fn checkpoint_done(
        &mut self,
        now: Millis,
        worker: WorkerId,
        run: RunId,
        step: u64,
        copy: checkpoints::CheckpointCopy,
    ) -> Result<(), ReportError> {
        let Some(r) = self.runs.get(&run) else { return Ok(()) };
        if r.state != RunState::Running || !r.members.iter().any(|m| m.worker == worker) {
            return Ok(());
        }
        let limit = self.next_sync_point(run).unwrap_or(r.committed_step);
        if step == 0 || step > limit {
            return Err(ReportError::Invalid(format!(
                "checkpoint step {step} is not one the run reached (recorded {}, next {limit})",
                r.committed_step
            )));
        }
        let members: Vec<WorkerId> = r.members.iter().map(|m| m.worker).collect();
        let (outcome, record) =
            self.checkpoints.entry(run).or_default().report(now, worker, step, copy, &members);
        match outcome {
            checkpoints::Reported::Full => return Ok(()),
            checkpoints::Reported::Differs { verified } => {
                let line = format!(
                    "{worker}'s checkpoint of step {step} has another model than the one the \
                     majority reported ({}); it is not a source for fetches",
                    &verified[..verified.len().min(16)]
                );
                self.log(run, line);
            }
            checkpoints::Reported::Verified | checkpoints::Reported::Recorded => {}
        }
        let r = self.runs.get_mut(&run).expect("run looked up above");
        if !record.model_sha256.is_empty() && step >= r.latest_checkpoint_step {
            let text = format!(
                "step {step} model {} ({} of {} members)",
                &record.model_sha256[..record.model_sha256.len().min(16)],
                record.agreeing,
                record.members
            );
            if text != r.latest_checkpoint {
                r.latest_checkpoint = text;
                r.latest_checkpoint_step = step;
                self.dirty.insert(Dirty::Run(run));
            }
        }
        self.outbox.push_back(Output::Checkpoint { run, record });
        Ok(())
    }

    /// The checkpoint of `run` a fetch can take (of `step`, or the newest verified one), with
    /// the workers not dead holding a copy of its verified model and the hash the run recorded
    /// with that step (if it still knows it). `Err` says why there is none.
    pub fn checkpoint_source(
        &self,
        run: RunId,
        step: Option<u64>,
    ) -> Result<(checkpoints::Source, Option<ParamHash>), String> {
        let r = self.runs.get(&run).ok_or_else(|| format!("no run {run}"))?;
        let book = self.checkpoints.get(&run).ok_or("no member reported a checkpoint yet")?;
        let mut source = book.source(step)?;
        let holders: Vec<String> = source.copies.iter().map(|(w, _)| w.to_string()).collect();
        // Alive holders first, then suspect ones (a heartbeat late is no reason to skip a copy).
        source.copies.retain(|(w, _)| self.liveness(*w).is_some_and(|l| l != Liveness::Dead));
        source.copies.sort_by_key(|(w, _)| self.liveness(*w) != Some(Liveness::Alive));
        if source.copies.is_empty() {
            return Err(format!(
                "no live worker holds a copy of step {} (held by {})",
                source.step,
                holders.join(", ")
            ));
        }
        let hash = if source.step == r.committed_step {
            r.committed_hash
        } else {
            r.history.iter().find(|(s, _)| *s == source.step).map(|(_, h)| *h)
        };
        Ok((source, hash))
    }

    /// Asks `worker` to send its checkpoint of `step` of `run` as transfer `transfer`.
    pub fn request_upload(
        &mut self,
        worker: WorkerId,
        run: RunId,
        step: u64,
        transfer: u64,
        inner: Option<[u8; 32]>,
    ) {
        let upload = Command::Upload { run, step, transfer, inner };
        self.outbox.push_back(Output::ToWorker(worker, upload));
    }

    /// Leases the next shard of the worker's run (at most `max_leases_per_worker` tracked at
    /// once; past that, a shared lease, so a worker holding its quota still has data).
    pub fn lease(&mut self, now: Millis, worker: WorkerId) -> Result<Option<Lease>, LeaseError> {
        let w = self.workers.get(&worker).ok_or(LeaseError::UnknownWorker)?;
        let run = w.run.ok_or(LeaseError::NotInRun)?;
        let r = self.runs.get(&run).ok_or(LeaseError::NotInRun)?;
        if r.state != RunState::Running || !r.members.iter().any(|m| m.worker == worker) {
            return Err(LeaseError::NotInRun);
        }
        let book = self.shards.get_mut(&run).ok_or(LeaseError::NotInRun)?;
        let held = book.holders().filter(|(_, w)| *w == worker).count();
        let id = LeaseId(self.counters.next_lease);
        let lease = if held >= self.config.max_leases_per_worker {
            book.share(worker, id, now + self.config.lease_ttl)
        } else {
            book.lease(now, worker, id, self.config.lease_ttl)
        };
        if let Some(l) = &lease {
            // Shared leases are not tracked, but their ids are never reused either.
            self.counters.next_lease += 1;
            self.dirty.insert(Dirty::Counters);
            if !l.shared {
                self.dirty.insert(Dirty::Shard(run, l.shard));
            }
        }
        Ok(lease.map(|mut l| {
            l.run = run;
            l
        }))
    }

    /// Records a finished shard. `samples` (what the worker read from it) is informational:
    /// the ledger counts samples of recorded steps.
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

    /// Advances time: liveness, lease expiry, token expiry, the deadlines of agreements and
    /// syncs, run assignment and epoch formation.
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
                live.deaths += 1;
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
                    w.ledger.uptime_ms = w.ledger.uptime_ms.saturating_add(live.uptime_pending);
                    self.dirty.insert(Dirty::Worker(id));
                }
                live.uptime_pending = 0;
            }
        }
        // Lease expiry, only for runs that are going on.
        for (&run, book) in &mut self.shards {
            if self.runs.get(&run).is_none_or(|r| r.state.is_terminal()) {
                continue;
            }
            for shard in book.expire(now) {
                self.dirty.insert(Dirty::Shard(run, shard));
            }
        }
        // Tokens are forgotten a day after they expired (until then `Join` says "expired").
        let expired: Vec<[u8; 32]> = self
            .tokens
            .iter()
            .filter(|(_, t)| t.expires_ms.saturating_add(TOKEN_KEPT_MS) <= now)
            .map(|(h, _)| *h)
            .collect();
        for h in expired {
            self.tokens.remove(&h);
            self.dirty.insert(Dirty::Token(h));
        }
        self.progress_deadlines(now);
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
        // Abort the old epoch at once, on every member. Each member's death counts against
        // the run's restart budget once: a worker that keeps dying (a flapping link, or a
        // member that means harm) cannot spend the budget alone, and waits longer each time
        // before it is readmitted.
        let first = self.died_in.insert((run, id));
        let reason = format!("{id} died (no heartbeat for {} ms)", self.config.dead_after);
        self.restart_epoch(now, run, reason, first);
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
            && let Some(run) = w.run.take()
        {
            self.dirty.insert(Dirty::Worker(id));
            self.changed.insert(run);
        }
    }

    /// The worker sits out for `bench_for`: it leaves its run, and is not assigned until then.
    fn bench(&mut self, now: Millis, id: WorkerId) {
        self.bench_for(now, id, self.config.bench_for);
    }

    /// The worker is dropped from its ring for failing it (never formed it, never committed):
    /// it sits out, twice as long each time it happens again.
    /// The worker's session was closed for a message no honest worker sends (malformed, or
    /// over its quota): its own evidence. It sits out as a dropped member does (twice as long
    /// each time), so a worker that keeps reconnecting to misbehave cannot re-form its run's
    /// ring at every return; its run's epoch is re-formed without it at once, and the run's log
    /// says why.
    pub fn misbehaved(&mut self, now: Millis, id: WorkerId, why: &str) {
        if !self.workers.contains_key(&id) {
            return;
        }
        let run = self.workers.get(&id).and_then(|w| w.run);
        let d = self.drop_member(now, id);
        let Some(run) = run else { return };
        let member = self.runs.get(&run).is_some_and(|r| {
            r.state == RunState::Running && r.members.iter().any(|m| m.worker == id)
        });
        if member {
            let line = format!(
                "{id}'s session was closed for a message no honest worker sends ({why}); it sits \
                 out for {} s",
                d / 1000
            );
            self.log(run, line.clone());
            self.restart_epoch(now, run, line, false);
        }
    }

    fn drop_member(&mut self, now: Millis, id: WorkerId) -> Millis {
        let drops = self.live.get_mut(&id).map_or(0, |l| {
            l.drops += 1;
            l.drops
        });
        let d = self.config.bench_for.saturating_mul(1 << drops.saturating_sub(1).min(6));
        self.bench_for(now, id, d);
        d
    }

    fn bench_for(&mut self, now: Millis, id: WorkerId, d: Millis) {
        if let Some(l) = self.live.get_mut(&id) {
            l.benched_until = now.saturating_add(d);
        }
        if let Some(run) = self.workers.get(&id).and_then(|w| w.run) {
            self.release_and_leave(run, id);
        }
    }

    /// `id` says it cannot train `run` (it cannot build the model or read the data): it leaves
    /// the run and is not assigned to it again while the run lasts. Its word is enough: it
    /// harms nobody but itself (no ledger credit, no other member named). A run every worker
    /// declines waits for one that can, and its message says why the others cannot.
    pub(super) fn decline(&mut self, now: Millis, run: RunId, id: WorkerId, detail: &str) {
        let why: String = detail.chars().take(200).collect();
        self.declined.insert((run, id), why.clone());
        self.release_and_leave(run, id);
        let line = format!("{id} cannot train this run and leaves it: {why}");
        self.log(run, line.clone());
        self.restart_epoch(now, run, line, false);
    }

    /// ", N declined (first reason)" for a run's waiting message, or "" if none declined.
    fn declined_note(&self, run: RunId) -> String {
        let mut reasons = self.declined.range((run, WorkerId(0))..=(run, WorkerId(u64::MAX)));
        let Some(((_, first), why)) = reasons.next() else { return String::new() };
        let n = 1 + reasons.count();
        format!("; {n} declined it ({first}: {why})")
    }

    /// Bans `id` from `run` on evidence: its id, its key and its public address are never
    /// assigned to the run again, and the epoch is re-formed without it.
    fn ban(&mut self, now: Millis, run: RunId, id: WorkerId, evidence: &str) {
        self.evict(
            now,
            run,
            id,
            &format!("{id} banned from the run on its own evidence: {evidence}"),
        );
    }

    /// Bans `id` from `run` (its id, key and public address), saying `line` in the run's log.
    fn evict(&mut self, now: Millis, run: RunId, id: WorkerId, line: &str) {
        let Some(w) = self.workers.get_mut(&id) else { return };
        if !w.banned.contains(&run) {
            w.banned.push(run);
        }
        self.dirty.insert(Dirty::Worker(id));
        let (key, ip) = (w.key.clone(), w.ip.filter(|ip| is_public(*ip)));
        if let Some(r) = self.runs.get_mut(&run) {
            if !key.is_empty() && !r.banned_keys.contains(&key) {
                r.banned_keys.push(key);
            }
            if let Some(ip) = ip
                && !r.banned_ips.contains(&ip)
            {
                r.banned_ips.push(ip);
            }
            self.dirty.insert(Dirty::Run(run));
        }
        self.release_and_leave(run, id);
        self.log(run, line.to_owned());
        self.restart_epoch(now, run, line.to_owned(), false);
    }

    /// Whether `id` may be assigned to `run`.
    fn banned_from(&self, id: WorkerId, run: &RunRecord) -> bool {
        let Some(w) = self.workers.get(&id) else { return true };
        w.banned.contains(&run.id)
            || (!w.key.is_empty() && run.banned_keys.contains(&w.key))
            || w.ip.is_some_and(|ip| run.banned_ips.contains(&ip))
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
        let runs: Vec<RunId> =
            self.runs.values().filter(|r| !r.state.is_terminal()).map(|r| r.id).collect();
        for run in runs {
            let r = &self.runs[&run];
            let assigned: Vec<WorkerId> =
                self.workers.values().filter(|w| w.run == Some(run)).map(|w| w.id).collect();
            let have = assigned.len() as u32;
            let probation = self.specs.get(&run).map(|s| s.verification).filter(|v| v.enabled());
            let on_probation: BTreeSet<WorkerId> = assigned
                .iter()
                .chain(free.iter())
                .filter(|w| {
                    probation.is_some_and(|v| {
                        let done = self.claims.get(&(run, **w)).map_or(0, |b| b.accepted());
                        done < u64::from(v.probation_syncs)
                    })
                })
                .copied()
                .collect();
            let on_probation = |w: WorkerId| on_probation.contains(&w);
            let new = assigned.iter().filter(|w| on_probation(**w)).count();
            let mut room = probation_room(new, assigned.len() - new, r.min_workers as usize);
            for _ in have..r.max_workers {
                // The smallest free id not banned from this run nor kept out by its disputes
                // (nor on probation once the run has as many on probation as it takes).
                let Some(pos) = free.iter().rposition(|id| {
                    !self.banned_from(*id, r)
                        && !self.sits_out_of(run, *id)
                        && !self.declined.contains_key(&(run, *id))
                        && (room != Some(0) || !on_probation(*id))
                }) else {
                    break;
                };
                let id = free.remove(pos);
                if let Some(n) = room.as_mut()
                    && on_probation(id)
                {
                    *n = n.saturating_sub(1);
                }
                if let Some(w) = self.workers.get_mut(&id) {
                    w.run = Some(run);
                }
                self.dirty.insert(Dirty::Worker(id));
                self.changed.insert(run);
            }
        }
        // Whoever its disputes keep out may change with who is available.
        let disputed: Vec<RunId> =
            self.sit_out.iter().filter(|(_, s)| !s.is_empty()).map(|(r, _)| *r).collect();
        for run in disputed {
            self.settle_disputes(now, run);
        }
    }

    /// Alive, connected, not sitting out, and (if it died) healthy for `readmit_after` times
    /// 2^(deaths − 1), up to 64 times: a worker that keeps dying churns epochs less and less.
    fn admissible(&self, now: Millis, id: WorkerId) -> bool {
        let Some(l) = self.live.get(&id) else { return false };
        let readmit =
            self.config.readmit_after.saturating_mul(1 << l.deaths.saturating_sub(1).min(6));
        l.liveness == Liveness::Alive
            && l.session_seen
            && now >= l.benched_until
            && (l.died_at.is_none() || now.saturating_sub(l.alive_since) >= readmit)
    }

    /// Forms a new epoch for every run whose membership changed (or that must re-form).
    fn form_epochs(&mut self, now: Millis) {
        let changed = std::mem::take(&mut self.changed);
        for run in changed {
            let forced = self.force_epoch.remove(&run);
            let Some(r) = self.runs.get(&run) else { continue };
            if r.state.is_terminal() {
                continue;
            }
            let ids: Vec<WorkerId> =
                self.workers.values().filter(|w| w.run == Some(run)).map(|w| w.id).collect();
            let mut current: Vec<WorkerId> = r.members.iter().map(|m| m.worker).collect();
            current.sort();
            if !forced && ids == current && !ids.is_empty() && r.state == RunState::Running {
                // Same members; only addresses may have changed.
                let same_addrs = r
                    .members
                    .iter()
                    .all(|m| self.workers.get(&m.worker).map(|w| w.addr) == Some(m.addr));
                if same_addrs {
                    continue;
                }
            }
            // Growth alone (members joining a running ring, nobody leaving) re-forms the ring
            // at most every `grow_every`: a thousand workers joining make a few epochs, not a
            // thousand, and the ring keeps training meanwhile.
            let grows_only = !forced
                && r.state == RunState::Running
                && !current.is_empty()
                && current.iter().all(|w| ids.binary_search(w).is_ok())
                && r.members
                    .iter()
                    .all(|m| self.workers.get(&m.worker).map(|w| w.addr) == Some(m.addr));
            if grows_only
                && self
                    .formed
                    .get(&run)
                    .is_some_and(|t| now < t.saturating_add(self.config.grow_every))
            {
                self.changed.insert(run);
                continue;
            }
            if (ids.len() as u32) < r.min_workers {
                self.syncs.remove(&run);
                let declined = self.declined_note(run);
                let r = self.runs.get_mut(&run).expect("run looked up above");
                if !r.members.is_empty() || forced {
                    r.members.clear();
                    r.message = format!(
                        "waiting for workers ({} of {} live){declined}",
                        ids.len(),
                        r.min_workers
                    );
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
            let ring: Vec<WorkerId> = r.members.iter().map(|m| m.worker).collect();
            self.syncs.insert(run, progress::EpochSync::new(r.epoch, ring.clone(), now));
            self.formed.insert(run, now);
            for w in ring {
                // The run file goes to the members new to the run (and with every re-sent
                // epoch); the others already run it.
                let info = EpochInfo { with_spec: !current.contains(&w), ..info.clone() };
                self.outbox.push_back(Output::ToWorker(w, Command::Epoch(info)));
            }
        }
    }

    /// The symmetric RTT estimate between two workers (µs); unknown pairs count as 1 s.
    fn rtt(&self, a: WorkerId, b: WorkerId) -> u64 {
        self.link_rtt(a, b).unwrap_or(1_000_000)
    }

    /// Per member of the run's ring, in order, the measured RTT of its link to the next (µs).
    pub fn ring_rtts(&self, run: RunId) -> Vec<Option<u64>> {
        let Some(r) = self.runs.get(&run) else { return Vec::new() };
        let n = r.members.len();
        (0..n)
            .map(|i| {
                let (a, b) = (r.members[i].worker, r.members[(i + 1) % n].worker);
                if a == b { None } else { self.link_rtt(a, b) }
            })
            .collect()
    }

    /// The round-trip time between two workers as they measured it (µs, the mean of both
    /// sides' figures where both reported one), if either did.
    pub fn link_rtt(&self, a: WorkerId, b: WorkerId) -> Option<u64> {
        let ab = self.live.get(&a).and_then(|l| l.rtts.get(&b)).copied();
        let ba = self.live.get(&b).and_then(|l| l.rtts.get(&a)).copied();
        match (ab, ba) {
            (Some(x), Some(y)) => Some((u64::from(x) + u64::from(y)) / 2),
            (Some(x), None) | (None, Some(x)) => Some(u64::from(x)),
            (None, None) => None,
        }
    }

    /// Aborts the run's epoch on every member at once and has the next tick form a new one
    /// (with the same members if nothing else changed). A restart caused by a death counts
    /// against the run's budget, failing the run when it is spent; disputes and bans do not
    /// (each costs the disputing members their seats instead).
    fn restart_epoch(&mut self, now: Millis, run: RunId, reason: String, counted: bool) {
        let Some(r) = self.runs.get_mut(&run) else { return };
        if r.state != RunState::Running {
            return;
        }
        for m in &r.members {
            self.outbox.push_back(Output::ToWorker(
                m.worker,
                Command::Abort { run, epoch: r.epoch, reason: reason.clone() },
            ));
        }
        if counted {
            r.restarts += 1;
        }
        r.updated_ms = now;
        r.message = reason.clone();
        self.dirty.insert(Dirty::Run(run));
        self.changed.insert(run);
        self.force_epoch.insert(run);
        self.syncs.remove(&run);
        if r.restarts > r.restart_budget {
            let msg = format!("restart budget ({}) spent; last: {reason}", r.restart_budget);
            self.finish(now, run, RunState::Failed, msg);
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
        self.syncs.remove(&run);
        // What was kept in memory about the run's contributions.
        self.audits.forget(run);
        self.claims.retain(|(r, _), _| *r != run);
        self.digests.remove(&run);
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
        self.disputes.retain(|(r, _), _| *r != run);
        self.sit_out.remove(&run);
        self.declined.retain(|(r, _), _| *r != run);
        self.unreachable.retain(|(r, _, _), _| *r != run);
        // Freed workers may serve another run at the next tick.
        let others: Vec<RunId> =
            self.runs.values().filter(|r| !r.state.is_terminal()).map(|r| r.id).collect();
        self.changed.extend(others);
    }

    /// A line for the run's log, within the run's quota of lines.
    fn log(&mut self, run: RunId, line: String) {
        let max = self.config.max_log_lines;
        let Some(r) = self.runs.get_mut(&run) else { return };
        r.log_lines += 1;
        self.dirty.insert(Dirty::Run(run));
        match r.log_lines.cmp(&max) {
            std::cmp::Ordering::Less => self.outbox.push_back(Output::Log { run, line }),
            std::cmp::Ordering::Equal => self.outbox.push_back(Output::Log {
                run,
                line: format!("(log full at {max} lines; later lines are dropped)"),
            }),
            std::cmp::Ordering::Greater => {}
        }
    }

    /// The step of the run's next synchronisation after the recorded one (`None` for an
    /// unknown run).
    pub fn next_sync_point(&self, run: RunId) -> Option<u64> {
        let r = self.runs.get(&run)?;
        let spec = self.specs.get(&run)?;
        Some(next_sync_point(&spec.sync, r.committed_step, r.total_steps))
    }

    // ---- outputs and queries ----

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outbox.pop_front()
    }

    pub fn take_dirty(&mut self) -> BTreeSet<Dirty> {
        std::mem::take(&mut self.dirty)
    }

    /// Everything changed and produced since the last call, raft-style: the shell persists the
    /// records `dirty` names and the appends among `outputs` (log lines, metric points,
    /// checkpoints) in one durable batch, and only then delivers the rest of `outputs`.
    pub fn ready(&mut self) -> Ready {
        Ready { dirty: self.take_dirty(), outputs: self.outbox.drain(..).collect() }
    }

    pub fn run(&self, id: RunId) -> Option<&RunRecord> {
        self.runs.get(&id)
    }

    pub fn runs(&self) -> impl Iterator<Item = &RunRecord> {
        self.runs.values()
    }

    /// Runs with ids above `after`, in order.
    pub fn runs_after(&self, after: RunId) -> impl Iterator<Item = &RunRecord> {
        self.runs.range(RunId(after.0.saturating_add(1))..).map(|(_, r)| r)
    }

    pub fn spec(&self, id: RunId) -> Option<&RunSpec> {
        self.specs.get(&id)
    }

    pub fn worker(&self, id: WorkerId) -> Option<&WorkerRecord> {
        self.workers.get(&id)
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.values()
    }

    /// Workers with ids above `after`, in order.
    pub fn workers_after(&self, after: WorkerId) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.range(WorkerId(after.0.saturating_add(1))..).map(|(_, w)| w)
    }

    pub fn liveness(&self, id: WorkerId) -> Option<Liveness> {
        self.live.get(&id).map(|l| l.liveness)
    }

    /// Until when the worker sits out (0 if it does not).
    pub fn benched_until(&self, id: WorkerId, now: Millis) -> Millis {
        self.live.get(&id).map(|l| l.benched_until).filter(|t| *t > now).unwrap_or(0)
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

    /// Whether `worker` is a member of `run`'s current epoch.
    pub fn is_member(&self, run: RunId, worker: WorkerId) -> bool {
        self.runs.get(&run).is_some_and(|r| {
            r.state == RunState::Running && r.members.iter().any(|m| m.worker == worker)
        })
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
                let held = book.holders().filter(|(_, w)| *w == holder).count();
                if held > self.config.max_leases_per_worker {
                    return Err(format!("{holder} holds {held} leases of run {run}"));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for r in self.runs.values() {
            for m in &r.members {
                if !seen.insert(m.worker) {
                    return Err(format!("{} is a member of two epochs", m.worker));
                }
                // A ban re-forms the epoch at the next tick; until then the old ring stands.
                if self.banned_from(m.worker, r) && !self.changed.contains(&r.id) {
                    return Err(format!(
                        "{} is a member of run {} it is banned from",
                        m.worker, r.id
                    ));
                }
            }
            // Members that disputed are never in one ring (until the next tick re-forms it).
            if !self.changed.contains(&r.id) {
                for (i, a) in r.members.iter().enumerate() {
                    for b in &r.members[i + 1..] {
                        if self.disputed(r.id, a.worker, b.worker) {
                            return Err(format!(
                                "{} and {} disputed but share a ring of run {}",
                                a.worker, b.worker, r.id
                            ));
                        }
                    }
                }
            }
            if r.state.is_terminal() && !r.members.is_empty() {
                return Err(format!("run {} ended but has members", r.id));
            }
            if r.committed_step > r.total_steps {
                return Err(format!(
                    "run {} recorded step {} of {}",
                    r.id, r.committed_step, r.total_steps
                ));
            }
            if r.state == RunState::Completed && r.committed_step < r.total_steps {
                return Err(format!("run {} completed at step {}", r.id, r.committed_step));
            }
        }
        Ok(())
    }

    /// Sends a worker that (re)connected what its run's epoch has decided so far.
    fn resend(&mut self, worker: WorkerId) {
        let Some(run) = self.workers.get(&worker).and_then(|w| w.run) else { return };
        let Some(r) = self.runs.get(&run) else { return };
        if r.state != RunState::Running || !r.members.iter().any(|m| m.worker == worker) {
            return;
        }
        self.outbox.push_back(Output::ToWorker(worker, Command::Epoch(epoch_info(r))));
        if let Some(sync) = self.syncs.get(&run) {
            for cmd in sync.decided() {
                self.outbox.push_back(Output::ToWorker(worker, cmd));
            }
        }
    }
}

/// What the store hands back at start.
#[derive(Debug, Default)]
pub struct Restored {
    pub counters: Counters,
    pub runs: Vec<RunRecord>,
    pub workers: Vec<WorkerRecord>,
    pub shards: BTreeMap<RunId, ShardBook>,
    pub tokens: BTreeMap<[u8; 32], TokenRecord>,
    /// Per unfinished run, its stored commitments and finished audits, oldest first (what its
    /// verification remembered is rebuilt from them).
    pub verification:
        BTreeMap<RunId, (Vec<commitments::CommitmentRecord>, Vec<audits::AuditRecord>)>,
    /// Per run, its checkpoint records (the newest are kept).
    pub checkpoints: BTreeMap<RunId, Vec<CheckpointRecord>>,
}

/// How many more members on probation (fewer contributions in the run than its
/// `verification.probation_syncs`) a run with audits admits, given `new` such members and
/// `established` others assigned to it: newcomers never outnumber established members (a
/// flood of fresh identities cannot become the majority of a ring, whose members are each
/// other's auditors and the quorum of its records), except as many as the run needs to reach
/// `min_workers`. `None`: no bound (a run whose members are all new, as every run starts).
fn probation_room(new: usize, established: usize, min_workers: usize) -> Option<usize> {
    if established == 0 {
        return None;
    }
    let cap = established.max(min_workers.saturating_sub(established));
    Some(cap.saturating_sub(new))
}

/// The step of the next synchronisation after `committed`: every step in ddp; the next multiple
/// of `inner_steps` in diloco, or the run's last step if that is sooner.
pub fn next_sync_point(sync: &SyncMode, committed: u64, total: u64) -> u64 {
    match *sync {
        SyncMode::Ddp => committed + 1,
        SyncMode::Diloco { inner_steps, .. } => {
            let h = u64::from(inner_steps.max(1));
            let next = (committed / h + 1) * h;
            if committed < total { next.min(total) } else { next }
        }
    }
}

/// Whether an address identifies a host on the internet (bans by address skip private,
/// loopback and link-local ones: they name a network, or this machine, not a host).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

fn epoch_info(r: &RunRecord) -> EpochInfo {
    EpochInfo {
        run: r.id,
        epoch: r.epoch,
        members: r.members.clone(),
        committed_step: r.committed_step,
        committed_hash: r.committed_hash,
        total_steps: r.total_steps,
        with_spec: true,
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

#[cfg(test)]
mod tests {
    use super::probation_room;

    /// Newcomers never outnumber the established members of a run with audits, except as many
    /// as it needs to reach its minimum; a run whose members are all new is not bounded.
    #[test]
    fn members_on_probation_never_outnumber_established_ones() {
        assert_eq!(probation_room(0, 0, 3), None, "a fresh run");
        assert_eq!(probation_room(5, 0, 3), None);
        assert_eq!(probation_room(0, 3, 2), Some(3));
        assert_eq!(probation_room(2, 3, 2), Some(1));
        assert_eq!(probation_room(3, 3, 2), Some(0));
        assert_eq!(probation_room(9, 3, 2), Some(0), "more than the bound already");
        // One established member left of a run of at least 5: enough newcomers to train.
        assert_eq!(probation_room(0, 1, 5), Some(4));
        assert_eq!(probation_room(4, 1, 5), Some(0));
    }
}
