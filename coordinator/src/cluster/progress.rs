//! Progress by quorum: the epoch's agreement, the plan of every synchronisation, the record of
//! every step, and what the members report about each other.
//!
//! Within one epoch:
//!
//! 1. Every member reports the state it holds (`StepCommitted`, first of the epoch). Once all
//!    have (or `agree_wait` passed), [`AgreementInfo`]: the source is a member holding the
//!    recorded (step, hash); the others receive it. A state ahead of the record counts only if
//!    a majority of the epoch that planned it reports it (step 4).
//! 2. Before each synchronisation every member commits its contribution's segment norms
//!    (`SyncCommit`), for the next sync point after the recorded step and no other. Once all
//!    have, every member gets the same [`PlanInfo`] ([`super::aggregate::plan`]), and the sync
//!    is pending ([`PendingSync`], persisted with the run).
//! 3. The members run the bounded all-reduce and report the hash they hold after it.
//! 4. When a majority of the members of the epoch that planned the step report the same hash,
//!    the step is recorded with that hash; the ledger credits that majority; the minority is
//!    named in the log. A member reporting two hashes for one step is banned (its own reports
//!    contradict each other). The run completes only when its last step is recorded.
//!
//! Faults: a member that cannot form the ring or lost a peer says so (`RingFault`). Two members
//! blaming the same peer drop it (it sits out); an accusation of misbehaviour, which the
//! coordinator cannot check, or a pair that cannot form a ring twice in one epoch, is a dispute
//! ([`super::disputes`]): the two are never in one ring of the run again, and the fewest members
//! that account for all the run's disputes sit out of it. A failure two members report
//! re-forms the epoch. A member that never commits while the others have is dropped after a
//! grace period. Every one of these leaves a line in the run's log.

use std::collections::{BTreeMap, BTreeSet};

use proto::{Epoch, Liveness, ParamHash, RunId, RunState, WorkerId};
use serde::{Deserialize, Serialize};

use super::aggregate::{self, Commitment, Exclusion};
use super::audits::{Answer, AuditId, AuditInfo, AuditRecord, Decision};
use super::commitments::{self, Claim, ClaimBook, CommitmentRecord, Known, Verdict};
use super::{Cluster, Command, Dirty, Millis, ReportError};
use runspec::SyncMode;

/// What the coordinator decided for an epoch's start (ranks are positions in the ring).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgreementInfo {
    pub run: RunId,
    pub epoch: Epoch,
    pub step: u64,
    /// None with step 0: the seeded initial state, which receivers rebuild themselves.
    pub hash: Option<ParamHash>,
    pub source: usize,
    pub receivers: Vec<usize>,
    /// diloco: the ranks whose progress in the round under way counts (the others joined it
    /// late); ddp: everyone.
    pub contributors: Vec<usize>,
}

/// The plan of one synchronisation, the same for every member.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanInfo {
    pub run: RunId,
    pub epoch: Epoch,
    pub step: u64,
    pub coefficients: Vec<f32>,
    /// Member-major: member r's segment norms at `[r * n, (r + 1) * n)`.
    pub declared: Vec<f32>,
    /// Per member, why it is left out ("" if it is not).
    pub excluded: Vec<String>,
}

/// A synchronisation planned and not yet recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingSync {
    pub step: u64,
    /// The epoch that planned it, and its members: a majority of them records the step.
    pub epoch: Epoch,
    pub members: Vec<WorkerId>,
    /// Those with a non-zero coefficient, credited when the step is recorded.
    pub contributors: Vec<WorkerId>,
    /// Contributors left out of it (zero or outlying contribution).
    #[serde(default)]
    pub excluded: Vec<WorkerId>,
    /// The samples each contributor's accepted commitment named (its data spans).
    #[serde(default)]
    pub claimed: BTreeMap<WorkerId, u64>,
    /// What each member reported holding after it (volatile: re-reported at the next epoch).
    #[serde(skip)]
    pub reports: BTreeMap<WorkerId, ParamHash>,
}

/// Recorded states kept per run, for a rewind when no member holds the newest one.
pub(super) const HISTORY: usize = 32;

/// What a member says went wrong in its ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// The peer never connected or could not be reached while forming the ring.
    Unreachable,
    /// The peer went silent or left during an operation.
    Lost,
    /// The peer broke the protocol or sent more than declared: an accusation.
    Misbehaved,
    /// The agreement's source sent a state that failed its checks: an accusation.
    BadState,
    /// An operation failed without naming a peer.
    Failed,
    /// The reporter cannot train the run at all: it leaves it (its word harms only itself).
    Declined,
}

/// A member's report that its ring failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault<'a> {
    /// The peer it blames, if any.
    pub peer: Option<WorkerId>,
    pub kind: FaultKind,
    /// What happened, for the run's log (printable, bounded).
    pub detail: &'a str,
}

impl FaultKind {
    fn is_accusation(self) -> bool {
        matches!(self, Self::Misbehaved | Self::BadState)
    }
}

/// What the current epoch of a run is doing (volatile; a restarted coordinator forms a new
/// epoch).
#[derive(Debug)]
pub(super) struct EpochSync {
    epoch: Epoch,
    /// Ring order.
    members: Vec<WorkerId>,
    started: Millis,
    /// The state each member reported at the start.
    held: BTreeMap<WorkerId, (u64, ParamHash)>,
    agreement: Option<AgreementInfo>,
    /// When the current round began (the agreement, or the last plan).
    round_start: Millis,
    /// Commitments for `commit_step`.
    commit_step: u64,
    commits: BTreeMap<WorkerId, Claim>,
    /// When the commitment that left only stragglers arrived.
    stragglers_since: Option<Millis>,
    /// The last plan issued in this epoch.
    plan: Option<PlanInfo>,
    /// Plans issued in this epoch (the agreement's contributors matter for the first only:
    /// after it every member holds the synced state and trains whole rounds).
    rounds: u32,
    /// Blames for unreachable or lost peers: (reporter, peer) → reports.
    blames: BTreeMap<(WorkerId, WorkerId), u32>,
    /// Members that reported a failure of this epoch.
    failed: BTreeSet<WorkerId>,
    /// Log lines already written for this epoch (each is written once).
    logged: BTreeSet<String>,
}

impl EpochSync {
    pub(super) fn new(epoch: Epoch, members: Vec<WorkerId>, now: Millis) -> Self {
        Self {
            epoch,
            members,
            started: now,
            held: BTreeMap::new(),
            agreement: None,
            round_start: now,
            commit_step: 0,
            commits: BTreeMap::new(),
            stragglers_since: None,
            plan: None,
            rounds: 0,
            blames: BTreeMap::new(),
            failed: BTreeSet::new(),
            logged: BTreeSet::new(),
        }
    }

    fn rank(&self, w: WorkerId) -> Option<usize> {
        self.members.iter().position(|m| *m == w)
    }

    /// The commands a member that reconnects must hear again.
    pub(super) fn decided(&self) -> Vec<Command> {
        let mut out = Vec::new();
        if let Some(a) = &self.agreement {
            out.push(Command::Agreement(a.clone()));
        }
        if let Some(p) = &self.plan {
            out.push(Command::Plan(p.clone()));
        }
        out
    }
}

impl Cluster {
    /// A member reports the state it holds: at the start of an epoch, and after every sync
    /// (a member that does not know its hash reports nothing). See the module documentation.
    pub fn step_committed(
        &mut self,
        now: Millis,
        worker: WorkerId,
        run: RunId,
        epoch: Epoch,
        step: u64,
        hash: ParamHash,
    ) {
        let Some(r) = self.runs.get(&run) else { return };
        if r.state != RunState::Running || epoch > r.epoch {
            return;
        }
        // Its own earlier report of the last recorded step says otherwise: evidence.
        if let Some((p, _)) = self.recorded.get(&run)
            && p.step == step
            && let Some(h) = p.reports.get(&worker)
            && *h != hash
        {
            let evidence = format!("it reported two states for step {step}: {h} and {hash}");
            self.ban(now, run, worker, &evidence);
            return;
        }
        // A report for the pending sync, from a member of the epoch that planned it.
        if let Some(p) = &r.pending
            && p.step == step
            && p.members.contains(&worker)
        {
            match p.reports.get(&worker) {
                Some(h) if *h != hash => {
                    let evidence =
                        format!("it reported two states for step {step}: {h} and {hash}");
                    self.ban(now, run, worker, &evidence);
                    return;
                }
                Some(_) => {}
                None => {
                    let p = self.runs.get_mut(&run).and_then(|r| r.pending.as_mut());
                    if let Some(p) = p {
                        p.reports.insert(worker, hash);
                    }
                    self.maybe_record(now, run);
                }
            }
        }
        // The state a member brings to the current epoch (if it holds another, it receives
        // the recorded one).
        let current = self.runs.get(&run).is_some_and(|r| r.epoch == epoch);
        if let Some(sync) = self.syncs.get_mut(&run)
            && current
            && sync.epoch == epoch
            && sync.agreement.is_none()
            && sync.rank(worker).is_some()
            && !sync.held.contains_key(&worker)
        {
            sync.held.insert(worker, (step, hash));
            self.maybe_agree(now, run);
            return;
        }
        // A report after a sync, of the recorded step, that came after the majority's: kept
        // (a later report that contradicts it is evidence), credited if it holds the recorded
        // state, and a divergence if not.
        let Some(r) = self.runs.get(&run) else { return };
        let late = match self.recorded.get_mut(&run) {
            Some((p, advanced)) if p.step == step && p.members.contains(&worker) => {
                p.reports.insert(worker, hash).is_none().then(|| (p.clone(), *advanced))
            }
            _ => None,
        };
        if step == r.committed_step && Some(hash) == r.committed_hash {
            if let Some((p, advanced)) = late {
                self.credit(run, &p, worker, advanced);
            }
            return;
        }
        if step == r.committed_step
            && let Some(recorded) = r.committed_hash
            && hash != recorded
            && current
            && r.members.iter().any(|m| m.worker == worker)
        {
            let line = format!(
                "{worker} diverged: it holds {hash} after step {step}, the recorded state is \
                 {recorded}"
            );
            self.log_once(run, line.clone());
            self.diverged(now, run, &[worker], line);
        }
    }

    /// Credits `w` for a recorded sync it holds: the steps, and if it contributed, the sync and
    /// its samples (the run file's batch size per step), else if it was left out, that.
    fn credit(&mut self, run: RunId, p: &PendingSync, w: WorkerId, advanced: u64) {
        let batch = self.specs.get(&run).map_or(0, |s| u64::from(s.batch_size));
        let Some(rec) = self.workers.get_mut(&w) else { return };
        rec.ledger.steps = rec.ledger.steps.saturating_add(advanced);
        if p.contributors.contains(&w) {
            rec.ledger.syncs += 1;
            rec.ledger.samples = rec.ledger.samples.saturating_add(batch.saturating_mul(advanced));
            let claimed = p.claimed.get(&w).copied().unwrap_or(0);
            rec.ledger.verified_samples = rec.ledger.verified_samples.saturating_add(claimed);
        } else if p.excluded.contains(&w) {
            rec.ledger.excluded += 1;
        }
        self.dirty.insert(Dirty::Worker(w));
    }

    /// Members hold another state than the recorded one after a sync: the next epoch gives it to
    /// them. A member that diverges a second time in the run (a faulty machine, or a liar) sits
    /// out instead.
    fn diverged(&mut self, now: Millis, run: RunId, who: &[WorkerId], reason: String) {
        for w in who {
            let n = self.divergences.entry((run, *w)).or_default();
            *n += 1;
            if *n >= 2 {
                let line = format!(
                    "{w} diverged from the majority twice in this run; it sits out for {} s",
                    self.config.bench_for / 1000
                );
                self.log(run, line);
                self.bench(now, *w);
            }
        }
        self.restart_epoch(now, run, reason, false);
    }

    /// Records the pending sync once a majority of the epoch that planned it agrees.
    fn maybe_record(&mut self, now: Millis, run: RunId) {
        let Some(r) = self.runs.get(&run) else { return };
        let Some(p) = &r.pending else { return };
        let mut counts: BTreeMap<ParamHash, usize> = BTreeMap::new();
        for h in p.reports.values() {
            *counts.entry(*h).or_default() += 1;
        }
        let Some((hash, n)) = counts.into_iter().max_by_key(|(_, n)| *n) else { return };
        if 2 * n <= p.members.len() {
            // No majority yet; if every member reported and none has one, they diverged.
            if p.reports.len() == p.members.len() {
                let line = format!(
                    "the members of epoch {} hold different states after step {} and no \
                     majority agrees: {}; re-forming the ring",
                    p.epoch,
                    p.step,
                    describe(&p.reports)
                );
                self.runs.get_mut(&run).expect("run looked up above").pending = None;
                self.dirty.insert(Dirty::Run(run));
                self.log(run, line.clone());
                self.restart_epoch(now, run, line, false);
            }
            return;
        }
        let r = self.runs.get_mut(&run).expect("run looked up above");
        let p = r.pending.take().expect("pending looked up above");
        let advanced = p.step - r.committed_step;
        if let Some(h) = r.committed_hash {
            r.history.push((r.committed_step, h));
            let excess = r.history.len().saturating_sub(HISTORY);
            r.history.drain(..excess);
        }
        r.committed_step = p.step;
        r.committed_hash = Some(hash);
        r.updated_ms = now;
        self.dirty.insert(Dirty::Run(run));
        // The ledger: the members that hold the recorded state (those whose report comes later
        // are credited when it does).
        let holders: Vec<WorkerId> =
            p.reports.iter().filter(|(_, h)| **h == hash).map(|(w, _)| *w).collect();
        for w in holders {
            self.credit(run, &p, w, advanced);
        }
        let minority: BTreeMap<WorkerId, ParamHash> =
            p.reports.iter().filter(|(_, h)| **h != hash).map(|(w, h)| (*w, *h)).collect();
        let (step, epoch) = (p.step, p.epoch);
        // Members that recorded a sync together reached each other.
        self.unreachable
            .retain(|(r, a, b), _| *r != run || !(p.members.contains(a) && p.members.contains(b)));
        self.recorded.insert(run, (p, advanced));
        let r = self.runs.get_mut(&run).expect("run looked up above");
        if r.committed_step < r.total_steps && !minority.is_empty() {
            let line = format!(
                "step {step} recorded with {hash} by a majority of epoch {epoch}; diverged: {}",
                describe(&minority)
            );
            self.log(run, line.clone());
            let who: Vec<WorkerId> = minority.keys().copied().collect();
            self.diverged(now, run, &who, line);
            return;
        }
        if r.committed_step >= r.total_steps {
            let msg = format!("completed {} steps", r.committed_step);
            self.finish(now, run, RunState::Completed, msg);
            return;
        }
        if r.checkpoint_interval > 0
            && r.committed_step >= r.last_checkpoint + r.checkpoint_interval
        {
            let step = r.committed_step;
            r.last_checkpoint = step - step % r.checkpoint_interval;
            let cmds: Vec<_> = r.members.iter().map(|m| m.worker).collect();
            for w in cmds {
                self.outbox
                    .push_back(super::Output::ToWorker(w, Command::Checkpoint { run, step }));
            }
        }
        // Commitments to the next sync that came early can now be planned.
        self.maybe_issue_plan(now, run);
    }

    /// Decides the epoch's agreement once every member reported (or `agree_wait` passed).
    fn maybe_agree(&mut self, now: Millis, run: RunId) {
        let Some(sync) = self.syncs.get(&run) else { return };
        if sync.agreement.is_some() {
            return;
        }
        let all = sync.members.iter().all(|m| sync.held.contains_key(m));
        if !all && now < sync.started + self.config.agree_wait {
            return;
        }
        let Some(r) = self.runs.get(&run) else { return };
        let Some(diloco) = self.specs.get(&run).map(|s| matches!(s.sync, SyncMode::Diloco { .. }))
        else {
            return;
        };
        // A fresh run records the initial state once a majority of the first epoch reports it.
        if r.committed_step == 0 && r.committed_hash.is_none() {
            let mut counts: BTreeMap<ParamHash, usize> = BTreeMap::new();
            for (s, h) in sync.held.values() {
                if *s == 0 {
                    *counts.entry(*h).or_default() += 1;
                }
            }
            if let Some((h, n)) = counts.into_iter().max_by_key(|(_, n)| *n)
                && 2 * n > sync.members.len()
            {
                let r = self.runs.get_mut(&run).expect("run looked up above");
                r.committed_hash = Some(h);
                self.dirty.insert(Dirty::Run(run));
            }
        }
        // A sync planned before and not recorded by now failed (or its majority is gone): it is
        // abandoned, and the members retry it from the recorded state.
        if let Some(p) = self.runs.get_mut(&run).and_then(|r| r.pending.take()) {
            self.dirty.insert(Dirty::Run(run));
            let line = format!(
                "the sync of step {} (epoch {}) was not recorded: no majority of its members \
                 reported the same state ({}); it is retried",
                p.step,
                p.epoch,
                if p.reports.is_empty() {
                    "none reported".to_owned()
                } else {
                    describe(&p.reports)
                }
            );
            self.log_once(run, line);
        }
        let r = &self.runs[&run];
        let sync = &self.syncs[&run];
        let target = (r.committed_step, r.committed_hash);
        let holds = |w: &WorkerId| {
            sync.held.get(w).is_some_and(|&(s, h)| s == target.0 && Some(h) == target.1)
        };
        let holders: Vec<usize> =
            (0..sync.members.len()).filter(|&i| holds(&sync.members[i])).collect();
        let (source, receivers, contributors) = if target.1.is_none() {
            // No recorded state yet: everyone starts from the seed; a member holding anything
            // else rebuilds it.
            let at_zero = |w: &WorkerId| sync.held.get(w).is_some_and(|(s, _)| *s == 0);
            let receivers: Vec<usize> =
                (0..sync.members.len()).filter(|&i| !at_zero(&sync.members[i])).collect();
            (0, receivers, (0..sync.members.len()).collect())
        } else if let Some(&source) = holders.first() {
            let receivers: Vec<usize> =
                (0..sync.members.len()).filter(|i| !holders.contains(i)).collect();
            let contributors =
                if diloco { holders.clone() } else { (0..sync.members.len()).collect() };
            (source, receivers, contributors)
        } else if let Some((step, hash)) = r
            .history
            .iter()
            .rev()
            .find(|h| sync.members.iter().any(|w| sync.held.get(w) == Some(h)))
            .cloned()
        {
            // Every member that held the recorded state is gone (died, left, or a hostile
            // majority of a small epoch that recorded a state and withheld it). The newest
            // state a quorum recorded before, that a member holds, is where the run goes on.
            let line = format!(
                "no member of epoch {} holds the recorded state (step {}, {}); rewinding to \
                 step {step} ({hash}), recorded earlier, which a member holds",
                sync.epoch,
                target.0,
                proto::domain::hash_text(target.1)
            );
            let r = self.runs.get_mut(&run).expect("run looked up above");
            while r.history.last().is_some_and(|h| h.0 >= step) {
                r.history.pop();
            }
            r.committed_step = step;
            r.committed_hash = Some(hash);
            r.message = line.clone();
            self.dirty.insert(Dirty::Run(run));
            self.log(run, line);
            self.maybe_agree(now, run);
            return;
        } else {
            let line = format!(
                "no member of epoch {} holds the recorded state (step {}, {}): they hold {}; \
                 waiting for a member that does",
                sync.epoch,
                target.0,
                proto::domain::hash_text(target.1),
                describe(&sync.held.iter().map(|(w, (s, h))| (*w, format!("{s}:{h}"))).collect())
            );
            let r = self.runs.get_mut(&run).expect("run looked up above");
            if r.message != line {
                r.message = line.clone();
                self.dirty.insert(Dirty::Run(run));
            }
            self.log_once(run, line);
            return;
        };
        let info = AgreementInfo {
            run,
            epoch: sync.epoch,
            step: target.0,
            hash: target.1,
            source,
            receivers,
            contributors,
        };
        let members = sync.members.clone();
        let sync = self.syncs.get_mut(&run).expect("sync looked up above");
        sync.agreement = Some(info.clone());
        sync.round_start = now;
        for w in members {
            self.outbox.push_back(super::Output::ToWorker(w, Command::Agreement(info.clone())));
        }
    }

    /// A member commits to its contribution to the sync at `step` (see `commitments`).
    /// Refused (an error for the session) when malformed; ignored when stale; evidence when it
    /// contradicts an earlier commitment of the same member. Its inputs are checked when the
    /// plan is made.
    pub fn sync_commit(
        &mut self,
        now: Millis,
        worker: WorkerId,
        run: RunId,
        epoch: Epoch,
        step: u64,
        claim: Claim,
    ) -> Result<(), ReportError> {
        let norms = &claim.segment_norms;
        let Some(r) = self.runs.get(&run) else { return Ok(()) };
        let Some(sync) = self.syncs.get(&run) else { return Ok(()) };
        if r.state != RunState::Running || sync.epoch != epoch || sync.rank(worker).is_none() {
            return Ok(()); // stale or foreign
        }
        if sync.agreement.is_none() {
            return Err(ReportError::Invalid(format!(
                "commitment for step {step} before epoch {epoch}'s agreement"
            )));
        }
        if norms.len() != sync.members.len() {
            let evidence = format!(
                "it committed {} segment norms in a ring of {}",
                norms.len(),
                sync.members.len()
            );
            self.ban(now, run, worker, &evidence);
            return Ok(());
        }
        // The same sync planned already (a member that reconnected): hear the plan again.
        if let Some(p) = &sync.plan
            && p.step == step
        {
            let p = p.clone();
            self.outbox.push_back(super::Output::ToWorker(worker, Command::Plan(p)));
            return Ok(());
        }
        // The next sync after the recorded one, or after the pending one: a member may commit to
        // it before the majority's reports of the pending sync arrived; the plan waits until
        // that sync is recorded.
        let after = r.pending.as_ref().map_or(r.committed_step, |p| p.step);
        let expected = self
            .specs
            .get(&run)
            .map_or(after + 1, |spec| super::next_sync_point(&spec.sync, after, r.total_steps));
        if step != expected {
            return Ok(()); // stale (an older sync), or one this member cannot have reached yet
        }
        let sync = self.syncs.get_mut(&run).expect("sync looked up above");
        if sync.commit_step != step {
            sync.commit_step = step;
            sync.commits.clear();
            sync.stragglers_since = None;
        }
        match sync.commits.get(&worker) {
            Some(earlier) if *earlier != claim => {
                let evidence = format!("it committed two different contributions to step {step}");
                self.ban(now, run, worker, &evidence);
                return Ok(());
            }
            Some(_) => return Ok(()),
            None => {
                sync.commits.insert(worker, claim);
            }
        }
        if sync.commits.len() + 1 == sync.members.len() {
            sync.stragglers_since = Some(now);
        }
        self.maybe_issue_plan(now, run);
        Ok(())
    }

    /// Issues the plan once every member committed and the previous sync is recorded.
    fn maybe_issue_plan(&mut self, now: Millis, run: RunId) {
        let Some(r) = self.runs.get(&run) else { return };
        let Some(sync) = self.syncs.get(&run) else { return };
        let next = self.next_sync_point(run);
        if r.pending.is_none()
            && sync.commits.len() == sync.members.len()
            && next == Some(sync.commit_step)
        {
            self.issue_plan(now, run);
        }
    }

    fn issue_plan(&mut self, now: Millis, run: RunId) {
        let policy = self.audit_policy(run);
        let per_sync = self.steps_per_sync(run);
        let diloco =
            self.specs.get(&run).is_some_and(|s| matches!(s.sync, SyncMode::Diloco { .. }));
        let sync = self.syncs.get_mut(&run).expect("issue_plan for a run with a sync");
        let agreement = sync.agreement.clone().expect("commitments come after the agreement");
        let world = sync.members.len();
        let step = sync.commit_step;
        // The inputs of every contributing member's claim, checked on the coordinator's own
        // evidence; a claim that fails contributes nothing (and says why).
        let r = self.runs.get(&run).expect("run of a sync");
        let known = Known {
            recorded: r.committed_hash,
            recorded_step: r.committed_step,
            max_samples: self.specs.get(&run).map_or(u64::MAX, |spec| {
                u64::from(spec.batch_size).saturating_mul(step.saturating_sub(r.committed_step))
            }),
        };
        let book = self.shards.get(&run);
        let shard_samples = |i: u32| {
            book.and_then(|b| b.record(i)).filter(|s| s.info.is_synthetic()).map(|s| s.info.size)
        };
        // After the epoch's first round every member trained whole rounds; in the first, only
        // the agreement's contributors did.
        // A member that spent the sync on an audit it was given contributes nothing; one that
        // claims an audit it was not given is refused.
        let auditing: Vec<Option<Result<u64, String>>> = sync
            .members
            .iter()
            .map(|w| {
                let id = sync.commits.get(w)?.audit?;
                Some(if self.audits.spend(run, *w, id) {
                    Ok(id)
                } else {
                    Err(format!("it claims audit {id:016x}, which it was not given"))
                })
            })
            .collect();
        let contributes: Vec<bool> = (0..world)
            .map(|rank| {
                (sync.rounds > 0 || agreement.contributors.contains(&rank))
                    && auditing[rank].is_none()
            })
            .collect();
        let empty = ClaimBook::default();
        // diloco: every member's inner state has the same length (one model); a claim naming
        // another length than the majority's could not be relayed to an auditor.
        let inner_bytes = majority(
            sync.members
                .iter()
                .zip(&contributes)
                .filter(|(_, c)| **c)
                .filter_map(|(w, _)| sync.commits.get(w).map(|c| c.inner_bytes)),
        );
        let clock = step.div_ceil(per_sync);
        let refused: Vec<Option<String>> = sync
            .members
            .iter()
            .zip(&contributes)
            .map(|(w, contributes)| {
                let claim = sync.commits.get(w).filter(|_| *contributes)?;
                let book = self.claims.get(&(run, *w)).unwrap_or(&empty);
                if let Some(until) = self.audits.left_out(run, *w, clock) {
                    return Some(format!(
                        "it withheld the inner optimizer state an audit of its rounds asked \
                         for; its contributions are left out up to step {}",
                        until.saturating_mul(per_sync)
                    ));
                }
                if diloco
                    && policy.is_some()
                    && let Some(want) = inner_bytes
                    && claim.inner_bytes != want
                {
                    return Some(format!(
                        "its inner optimizer state is {} bytes long; the majority's is {want}",
                        claim.inner_bytes
                    ));
                }
                commitments::check(step, claim, &known, book, shard_samples)
                    .err()
                    .or_else(|| auditable(policy.as_ref(), claim, book.profile(), diloco))
            })
            .collect();
        // Contributions that are another's (same digest): left out too. Members that contribute
        // nothing (late joiners, auditors) commit zeros alike and are not compared.
        let passed: Vec<(WorkerId, &Claim)> = sync
            .members
            .iter()
            .zip(&refused)
            .zip(&contributes)
            .filter(|((_, why), contributes)| why.is_none() && **contributes)
            .filter_map(|((w, _), _)| sync.commits.get(w).map(|c| (*w, c)))
            .collect();
        let recent = self.digests.get(&run);
        let copied = commitments::copies(step, &passed, recent.unwrap_or(&Default::default()));
        let refused: Vec<Option<String>> = sync
            .members
            .iter()
            .zip(refused)
            .map(|(w, why)| why.or_else(|| copied.get(w).cloned()))
            .collect();
        let commits: Vec<Commitment> = sync
            .members
            .iter()
            .enumerate()
            .map(|(rank, w)| Commitment {
                contributes: contributes[rank] && refused[rank].is_none(),
                segment_norms: sync
                    .commits
                    .get(w)
                    .map(|c| c.segment_norms.clone())
                    .unwrap_or_default(),
            })
            .collect();
        let mut plan = aggregate::plan(world, &commits);
        for (rank, a) in auditing.iter().enumerate() {
            if matches!(plan.excluded[rank], Some(Exclusion::Invalid(_))) {
                continue;
            }
            match a {
                Some(Ok(id)) => plan.excluded[rank] = Some(Exclusion::Auditing(*id)),
                Some(Err(why)) => plan.excluded[rank] = Some(Exclusion::Refused(why.clone())),
                None => {}
            }
        }
        for (rank, why) in refused.iter().enumerate() {
            if let Some(why) = why
                && !matches!(plan.excluded[rank], Some(Exclusion::Invalid(_)))
            {
                plan.excluded[rank] = Some(Exclusion::Refused(why.clone()));
            }
        }
        let evidence: Vec<(WorkerId, String)> =
            plan.evidence().map(|(r, why)| (sync.members[r], why.to_owned())).collect();
        if !evidence.is_empty() {
            for (w, why) in evidence {
                self.ban(now, run, w, &format!("its commitment to step {step}: {why}"));
            }
            return;
        }
        let info = PlanInfo {
            run,
            epoch: sync.epoch,
            step,
            coefficients: plan.coefficients.clone(),
            declared: commits.iter().flat_map(|c| c.segment_norms.iter().copied()).collect(),
            excluded: plan
                .excluded
                .iter()
                .map(|e| e.as_ref().map(ToString::to_string).unwrap_or_default())
                .collect(),
        };
        let members = sync.members.clone();
        let contributors: Vec<WorkerId> = members
            .iter()
            .zip(&plan.coefficients)
            .filter(|(_, c)| **c > 0.0)
            .map(|(w, _)| *w)
            .collect();
        let left_out: Vec<(WorkerId, String)> = members
            .iter()
            .zip(&plan.excluded)
            .filter_map(|(w, e)| match e {
                Some(e @ (Exclusion::Zero | Exclusion::Outlier { .. } | Exclusion::Refused(_))) => {
                    Some((*w, e.to_string()))
                }
                _ => None,
            })
            .collect();
        // Every claim is stored, with its verdict, durably before the plan goes out (the writer
        // commits this batch's appends before it delivers its commands); accepted ones go into
        // the member's book, and their samples are credited once the sync is recorded.
        let mut claimed = BTreeMap::new();
        let mut unauditable = Vec::new();
        for (rank, w) in members.iter().enumerate() {
            let Some(claim) = sync.commits.get(w) else { continue };
            let verdict = match &plan.excluded[rank] {
                None => Verdict::Accepted { coefficient: plan.coefficients[rank] },
                Some(e) => Verdict::Excluded(e.to_string()),
            };
            if matches!(verdict, Verdict::Accepted { .. }) {
                if policy.is_some()
                    && claim.profile.is_empty()
                    && !self.claims.contains_key(&(run, *w))
                {
                    unauditable.push(*w);
                }
                self.claims.entry((run, *w)).or_default().accept(step, claim);
                self.digests.entry(run).or_default().accept(*w, step, claim);
                let named: u64 = claim.spans.iter().map(|s| s.to - s.from).sum();
                claimed.insert(*w, named);
            }
            let record = CommitmentRecord {
                step,
                epoch: sync.epoch,
                worker: *w,
                claim: claim.clone(),
                verdict,
            };
            self.outbox.push_back(super::Output::Commitment { run, record });
        }
        for w in unauditable {
            self.log(
                run,
                format!(
                    "{w} names no reproducibility profile (a CUDA worker): no auditor can \
                     recompute its contributions yet, and the ledger shows them unaudited (set \
                     verification.require_profile = true to take only auditable ones)"
                ),
            );
        }
        let included: Vec<(usize, WorkerId)> = members
            .iter()
            .enumerate()
            .filter(|(rank, _)| plan.excluded[*rank].is_none())
            .map(|(rank, w)| (rank, *w))
            .collect();
        let audits = self.draw_audits(run, step, &included);
        let sync = self.syncs.get_mut(&run).expect("issue_plan for a run with a sync");
        sync.plan = Some(info.clone());
        sync.rounds += 1;
        sync.commits.clear();
        sync.stragglers_since = None;
        sync.round_start = now;
        let epoch = sync.epoch;
        let r = self.runs.get_mut(&run).expect("run of a sync");
        r.pending = Some(PendingSync {
            step,
            epoch,
            members: members.clone(),
            contributors,
            excluded: left_out.iter().map(|(w, _)| *w).collect(),
            claimed,
            reports: BTreeMap::new(),
        });
        self.dirty.insert(Dirty::Run(run));
        for (w, why) in left_out {
            self.log_once(run, format!("{w} left out of the sync of step {step}: {why}"));
        }
        for w in members {
            self.outbox.push_back(super::Output::ToWorker(w, Command::Plan(info.clone())));
        }
        for (auditor, task) in audits {
            self.outbox.push_back(super::Output::ToWorker(auditor, Command::Audit(task)));
        }
    }

    /// An auditor's answer to audit `id` (see `audits`). Answers to audits that are not open
    /// or not asked of this worker are ignored.
    pub fn audit_result(
        &mut self,
        now: Millis,
        worker: WorkerId,
        run: RunId,
        id: AuditId,
        answer: Answer,
    ) {
        let Some(r) = self.runs.get(&run) else { return };
        if r.state != RunState::Running {
            return;
        }
        let step = self.audit_clock(run, r.committed_step);
        let unable = match &answer {
            Answer::Unable(why) => Some(why.clone()),
            Answer::Digest(_) => None,
        };
        // The audit's own run: an answer naming another is ignored.
        let Some(audited) = self.audits.get(id).filter(|i| i.run == run).map(|i| i.step) else {
            return;
        };
        let Some(decision) = self.audits.answer(id, worker, answer, step) else { return };
        if let Some(record) = decision.record(id, audited) {
            self.outbox.push_back(super::Output::Audit { run, record });
        }
        let ledger = |c: &mut Self, w: WorkerId, f: &dyn Fn(&mut super::Ledger)| {
            if let Some(rec) = c.workers.get_mut(&w) {
                f(&mut rec.ledger);
                c.dirty.insert(Dirty::Worker(w));
            }
        };
        let short = format!("{id:016x}");
        match decision {
            Decision::Ask { .. } => {
                let Some(info) = self.audits.get(id).cloned() else { return };
                // Members of the audited sync with its profile, still in the run.
                let members: Vec<WorkerId> = self
                    .runs
                    .get(&run)
                    .map(|r| r.members.iter().map(|m| m.worker).collect())
                    .unwrap_or_default();
                let candidates: Vec<WorkerId> = self
                    .audits
                    .candidates(id, step)
                    .into_iter()
                    .filter(|m| members.contains(m))
                    .collect();
                match self.audits.pick(run, info.step, info.target, 1, &candidates) {
                    Some(next) => {
                        if let Some(task) = self.audits.ask(id, next, step) {
                            self.log(
                                run,
                                format!(
                                    "audit {short} of {}'s contribution to step {}: {worker}'s \
                                     answer is not what it committed; {next} recomputes it too",
                                    info.target, info.step
                                ),
                            );
                            self.outbox
                                .push_back(super::Output::ToWorker(next, Command::Audit(task)));
                        }
                    }
                    None => {
                        self.audits.drop_audit(id);
                        let record = AuditRecord::dropped(&info);
                        self.outbox.push_back(super::Output::Audit { run, record });
                        self.log(
                            run,
                            format!(
                                "audit {short} of {}'s contribution to step {} dropped: no other \
                                 member of its profile can recompute it (nobody is blamed)",
                                info.target, info.step
                            ),
                        );
                    }
                }
            }
            Decision::Dropped { target } => {
                let why = match &unable {
                    Some(why) => format!("{worker} could not recompute it ({why})"),
                    None => format!(
                        "{worker} answered after the audit's {} syncs",
                        super::audits::AUDIT_SYNCS
                    ),
                };
                self.log_once(
                    run,
                    format!("audit {short} of {target}'s contribution to step {audited} dropped: {why} (nobody is blamed)"),
                );
            }
            Decision::Passed { target, auditors, wrong } => {
                ledger(self, target, &|l| l.audits_passed += 1);
                for a in &auditors {
                    ledger(self, *a, &|l| l.audits_performed += 1);
                }
                if let Some(w) = wrong {
                    ledger(self, w, &|l| l.audits_wrong += 1);
                    let line = format!(
                        "audit {short}: {w} answered a digest that neither {target} (the audited \
                         member) nor {} (a second auditor) found; counted against {w} (after \
                         {} such answers it is given no more audits)",
                        auditors.first().map(ToString::to_string).unwrap_or_default(),
                        super::audits::WRONG_TO_RETIRE
                    );
                    self.log(run, line);
                }
            }
            Decision::Struck { target, auditors } => {
                ledger(self, target, &|l| l.strikes += 1);
                for a in &auditors {
                    ledger(self, *a, &|l| l.audits_performed += 1);
                }
                let named: Vec<String> = auditors.iter().map(ToString::to_string).collect();
                let line = format!(
                    "audit {short}: {} recomputed {target}'s contribution and agree it is not \
                     what {target} committed: a strike for {target}",
                    named.join(" and ")
                );
                self.log(run, line.clone());
                self.strike(now, run, target, &line);
            }
            Decision::Withheld { target } => {
                self.log(run, format!("audit {short} of {target}: withheld"));
            }
            Decision::Inconclusive { target, auditors } => {
                let named: Vec<String> = auditors.iter().map(ToString::to_string).collect();
                self.log(
                    run,
                    format!(
                        "audit {short} of {target}: {} found two other digests; nobody is \
                         blamed, and {target} is audited at every sync for a while",
                        named.join(" and ")
                    ),
                );
            }
        }
    }

    /// After a restart, rebuilds what `run`'s verification remembered from its stored
    /// commitments and finished audits (oldest first), so that a restart forgives nothing: a
    /// replay or a re-read span is still refused, a member keeps its first profile, and its
    /// audit standing (probation, strikes, a wrong auditor's record) is what it was.
    pub(super) fn replay_verification(
        &mut self,
        run: RunId,
        commitments: &[CommitmentRecord],
        audits: &[AuditRecord],
    ) {
        let mut contributed = Vec::new();
        for c in commitments {
            if matches!(c.verdict, Verdict::Accepted { .. }) {
                self.claims.entry((run, c.worker)).or_default().accept(c.step, &c.claim);
                self.digests.entry(run).or_default().accept(c.worker, c.step, &c.claim);
                // The draw counts accepted contributions it could audit (see `draw_audits`).
                if c.claim.recomputable() {
                    contributed.push(c.worker);
                }
            }
        }
        let per_sync = self.steps_per_sync(run);
        self.audits.replay(run, contributed, audits, |step| step.div_ceil(per_sync));
    }

    /// Steps per sync in `run`: 1 in ddp, `inner_steps` in diloco.
    fn steps_per_sync(&self, run: RunId) -> u64 {
        self.specs.get(&run).map_or(1, |s| s.sync.steps_per_sync())
    }

    /// The audits' clock at the sync of `step`: it counts syncs (a diloco sync is
    /// `inner_steps` steps), so that an audit's deadline, a member's window of certain audits
    /// and an auditor's hand are measured in syncs in either mode.
    fn audit_clock(&self, run: RunId, step: u64) -> u64 {
        step.div_ceil(self.steps_per_sync(run))
    }

    /// diloco: `auditor` asks for the inner optimizer state of audit `id` of `run` (see
    /// `audits::Book::fetch_state`): who holds it, the audited sync, its digest and length.
    pub fn audit_state(
        &mut self,
        run: RunId,
        id: AuditId,
        auditor: WorkerId,
    ) -> Result<super::audits::StateFetch, String> {
        let running = self.runs.get(&run).is_some_and(|r| r.state == RunState::Running);
        if !running || self.audits.get(id).is_none_or(|i| i.run != run) {
            return Err(format!("no audit {id:016x} is open in run {run}"));
        }
        self.audits.fetch_state(id, auditor)
    }

    /// diloco: the audited member of audit `id` (opening `nonce`) did not send the inner state
    /// it committed to: it sent other bytes (`mismatch`: the coordinator's own evidence, a
    /// strike), or nothing usable in time (withheld: nobody is struck; the round's credit is
    /// forfeited and its contributions are left out for a while, see `audits`). `why` says what
    /// happened.
    pub fn audit_state_failed(
        &mut self,
        now: Millis,
        run: RunId,
        (id, nonce): (AuditId, u64),
        mismatch: bool,
        why: &str,
    ) {
        let Some(r) = self.runs.get(&run).filter(|r| r.state == RunState::Running) else {
            return;
        };
        let step = self.audit_clock(run, r.committed_step);
        let Some(info) = self.audits.get(id).filter(|i| i.run == run).cloned() else { return };
        let Some(decision) = self.audits.withheld(id, nonce, mismatch, step) else { return };
        if let Some(record) = decision.record(id, info.step) {
            self.outbox.push_back(super::Output::Audit { run, record });
        }
        let (target, audited) = (info.target, info.step);
        if mismatch {
            if let Some(rec) = self.workers.get_mut(&target) {
                rec.ledger.strikes += 1;
                self.dirty.insert(Dirty::Worker(target));
            }
            let line = format!(
                "audit {id:016x}: the inner optimizer state {target} sent for its round to step \
                 {audited} is not the one it committed to ({why}): a strike for {target}"
            );
            self.log(run, line.clone());
            self.strike(now, run, target, &line);
        } else {
            let until = self.audits.left_out(run, target, step).unwrap_or(step);
            let per_sync = self.steps_per_sync(run);
            self.log(
                run,
                format!(
                    "audit {id:016x} of {target}'s round to step {audited}: it did not send the \
                     inner optimizer state it committed to ({why}); nobody is struck, the \
                     round earns it nothing, and its contributions are left out up to step {} \
                     (then audited at every sync for a while)",
                    until.saturating_mul(per_sync)
                ),
            );
        }
    }

    /// A confirmed strike: at the run's `strikes_to_evict`, the member is evicted.
    fn strike(&mut self, now: Millis, run: RunId, w: WorkerId, evidence: &str) {
        let limit = self.specs.get(&run).map_or(2, |s| s.verification.strikes_to_evict);
        let strikes = self.audits.standing(run, w).map_or(0, |s| s.strikes);
        if strikes >= u64::from(limit) {
            let line = format!(
                "{w} evicted from the run: audits confirmed {strikes} of its contributions wrong \
                 (the last: {evidence})"
            );
            self.evict(now, run, w, &line);
        }
    }

    /// Draws which of `contributors` (rank, member) of the sync at `step` are audited, and
    /// gives each drawn one to an auditor: another member of the sync (it holds the state the
    /// contribution was trained from) with the same profile and no audit in hand. At least one
    /// member of the ring keeps training. A contribution whose norm is anomalous (far from the
    /// contributors' median, `aggregate::anomalous`) is audited for certain: a scaled update is
    /// caught by the recomputation itself, and nothing lingers for a liar to aim at honest
    /// members' compute.
    fn draw_audits(
        &mut self,
        run: RunId,
        step: u64,
        contributors: &[(usize, WorkerId)],
    ) -> Vec<(WorkerId, AuditInfo)> {
        let Some(policy) = self.audit_policy(run) else { return vec![] };
        let now = self.audit_clock(run, step);
        for dropped in self.audits.expire(run, now) {
            self.outbox
                .push_back(super::Output::Audit { run, record: AuditRecord::dropped(&dropped) });
            self.log_once(
                run,
                format!(
                    "audit {:016x} of {}'s contribution to step {} dropped: no answer",
                    dropped.id, dropped.target, dropped.step
                ),
            );
        }
        let Some(sync) = self.syncs.get(&run) else { return vec![] };
        let norm_of = |w: &WorkerId| {
            sync.commits.get(w).map_or(0.0, |c| aggregate::total_norm(&c.segment_norms))
        };
        let norms: Vec<f64> = contributors.iter().map(|(_, w)| norm_of(w)).collect();
        let flagged =
            aggregate::anomalous(&norms).into_iter().zip(contributors).filter(|(a, _)| *a);
        let mut raised = Vec::new();
        for (_, (_, w)) in flagged {
            if self.audits.flag(run, *w, now) {
                raised.push((*w, norm_of(w)));
            }
        }
        let mut unauditable = Vec::new();
        let profile_of = |w: &WorkerId| sync.commits.get(w).map(|c| c.profile.as_str());
        let mut out = Vec::new();
        for (rank, w) in contributors {
            let Some(claim) = sync.commits.get(w).filter(|c| c.recomputable()) else { continue };
            if !self.audits.draw(&policy, run, *w, now) {
                continue;
            }
            let (Some(digest), Some(start_hash)) = (claim.audited_digest(), claim.start_hash)
            else {
                continue;
            };
            let members = &sync.members;
            let in_hand = members.iter().filter(|m| self.audits.in_hand(run, **m, now)).count();
            if in_hand + 1 >= members.len() {
                continue;
            }
            let same: Vec<WorkerId> = members
                .iter()
                .filter(|m| *m != w && profile_of(m) == Some(claim.profile.as_str()))
                .copied()
                .collect();
            let candidates: Vec<WorkerId> =
                same.iter().filter(|m| self.audits.available(run, **m, now)).copied().collect();
            if same.is_empty() {
                unauditable.push((*w, claim.profile.clone()));
            }
            let Some(auditor) = self.audits.pick(run, step, *w, 0, &candidates) else { continue };
            let info = AuditInfo {
                run,
                id: 0,
                step,
                start_hash,
                spans: claim.spans.clone(),
                target: *w,
                rank: *rank,
                inner: claim.inner_start,
                inner_bytes: claim.inner_bytes,
            };
            let info = self.audits.open(info, digest, auditor, same, now);
            out.push((auditor, info));
        }
        if !raised.is_empty() {
            let median = aggregate::median(norms).unwrap_or(0.0);
            for (w, norm) in raised {
                self.log(
                    run,
                    format!(
                        "{w}'s contribution to step {step} is anomalous (norm {norm:.3e}, the \
                         contributors' median {median:.3e}): it is audited (an anomaly alone \
                         blames nobody)"
                    ),
                );
            }
        }
        for (w, profile) in unauditable {
            self.log_once(
                run,
                format!(
                    "{w}'s contributions cannot be audited: no other member of the ring shares \
                     its reproducibility profile ({profile})"
                ),
            );
        }
        out
    }

    /// The run's audit policy if its contributions are audited (`[verification]` on).
    fn audit_policy(&self, run: RunId) -> Option<runspec::Verification> {
        self.specs.get(&run).filter(|s| s.verification.enabled()).map(|s| s.verification)
    }

    /// A member says its ring of `epoch` failed, blaming `fault.peer` (if any). See the
    /// module documentation.
    pub fn ring_fault(
        &mut self,
        now: Millis,
        reporter: WorkerId,
        run: RunId,
        epoch: Epoch,
        fault: Fault<'_>,
    ) {
        let Fault { peer, kind, detail } = fault;
        let Some(sync) = self.syncs.get_mut(&run) else { return };
        if sync.epoch != epoch || sync.rank(reporter).is_none() {
            return; // stale or foreign
        }
        if kind == FaultKind::Declined {
            self.decline(now, run, reporter, detail);
            return;
        }
        if peer.is_some_and(|p| p == reporter || sync.rank(p).is_none()) {
            return;
        }
        match (kind, peer) {
            (k, Some(accused)) if k.is_accusation() => {
                let what = match k {
                    FaultKind::BadState => "sending a state that failed its checks",
                    _ => "breaking the ring's protocol",
                };
                self.record_dispute(run, reporter, accused);
                let line = format!(
                    "{reporter} accuses {accused} of {what} ({detail}); the coordinator cannot \
                     verify it, so the two are never in one ring again"
                );
                self.log(run, line.clone());
                self.restart_epoch(now, run, line, false);
                self.settle_disputes(now, run);
            }
            (_, Some(p)) => {
                *sync.blames.entry((reporter, p)).or_default() += 1;
                sync.failed.insert(reporter);
                let blamers: BTreeSet<WorkerId> =
                    sync.blames.keys().filter(|(_, b)| *b == p).map(|(a, _)| *a).collect();
                let line = format!("{reporter} cannot keep a ring with {p}: {detail}");
                self.log_once(run, line);
                if blamers.len() >= 2 {
                    let names: Vec<String> = blamers.iter().map(ToString::to_string).collect();
                    let d = self.drop_member(now, p);
                    let line = format!(
                        "{p} dropped from the ring: {} could not reach it; it sits out for {} s",
                        names.join(" and "),
                        d / 1000
                    );
                    self.log(run, line.clone());
                    self.restart_epoch(now, run, line, false);
                    return;
                }
                // One member alone cannot reach another: in one epoch, a fault of the path or of
                // either machine; in two epochs with no sync recorded by both in between, a
                // dispute (no third member can say who is at fault).
                let pair = (run, reporter.min(p), reporter.max(p));
                let (n, last) = self.unreachable.entry(pair).or_insert((0, epoch));
                if *n == 0 || *last != epoch {
                    *n += 1;
                    *last = epoch;
                }
                let n = *n;
                if n >= 2 {
                    self.unreachable.remove(&pair);
                    self.record_dispute(run, reporter, p);
                    let line = format!(
                        "{reporter} and {p} could not form a ring in {n} epochs and no other \
                         member can say who is at fault; the two are never in one ring again"
                    );
                    self.log(run, line.clone());
                    self.restart_epoch(now, run, line, false);
                    self.settle_disputes(now, run);
                } else {
                    self.maybe_reform(now, run);
                }
            }
            _ => {
                sync.failed.insert(reporter);
                self.log_once(run, format!("{reporter}: ring of epoch {epoch} failed: {detail}"));
                self.maybe_reform(now, run);
            }
        }
    }

    /// A failure two members report is real (an operation fails on every member alike): the
    /// epoch is re-formed.
    fn maybe_reform(&mut self, now: Millis, run: RunId) {
        let Some(sync) = self.syncs.get(&run) else { return };
        if sync.failed.len() >= 2 {
            let reason = format!("the ring of epoch {} failed; re-forming it", sync.epoch);
            self.restart_epoch(now, run, reason, false);
        }
    }

    /// The deadlines of agreements and syncs.
    pub(super) fn progress_deadlines(&mut self, now: Millis) {
        let runs: Vec<RunId> = self.syncs.keys().copied().collect();
        for run in runs {
            self.maybe_agree(now, run);
            let Some(sync) = self.syncs.get(&run) else { continue };
            let Some(since) = sync.stragglers_since else { continue };
            let took = since.saturating_sub(sync.round_start);
            let grace = self.config.commit_grace.max(4 * took);
            if now < since + grace {
                continue;
            }
            // A member that went silent altogether is a death (counted as one), not this.
            let alive =
                |w: &WorkerId| self.live.get(w).is_some_and(|l| l.liveness == Liveness::Alive);
            let late: Vec<WorkerId> = sync
                .members
                .iter()
                .filter(|w| !sync.commits.contains_key(w) && alive(w))
                .copied()
                .collect();
            let step = sync.commit_step;
            for w in late {
                let d = self.drop_member(now, w);
                let line = format!(
                    "{w} dropped from the ring: it did not commit to the sync of step {step} \
                     within {} s of the others; it sits out for {} s",
                    grace / 1000,
                    d / 1000
                );
                self.log(run, line.clone());
                self.restart_epoch(now, run, line, false);
            }
        }
    }

    /// A log line written once per epoch (repeated reports do not flood the log).
    fn log_once(&mut self, run: RunId, line: String) {
        let Some(sync) = self.syncs.get_mut(&run) else {
            self.log(run, line);
            return;
        };
        if sync.logged.len() < 256 && sync.logged.insert(line.clone()) {
            self.log(run, line);
        }
    }
}

/// Why a contributing claim cannot be audited in a run with audits (`policy`), if it cannot:
/// an auditor needs its digest and its data, and its profile must stay the one the member first
/// committed under (`first`), or a member could leave its cheated syncs unauditable. With
/// `require_profile`, a claim naming no profile (which no auditor could recompute) is refused
/// too.
fn auditable(
    policy: Option<&runspec::Verification>,
    claim: &Claim,
    first: Option<&String>,
    diloco: bool,
) -> Option<String> {
    let policy = policy?;
    if claim.digest.is_none() || claim.spans.is_empty() {
        return Some("a run with audits needs its contribution's digest and its data spans".into());
    }
    if diloco
        && (claim.inner_start.is_none() || claim.inner_end.is_none() || claim.inner_bytes == 0)
    {
        return Some(
            "a diloco run with audits needs the digests of its inner optimizer state at the \
             round's start and end, and its length"
                .into(),
        );
    }
    if policy.require_profile && claim.profile.is_empty() {
        return Some(
            "it names no reproducibility profile, so no auditor could recompute it, and this run \
             takes only auditable contributions (verification.require_profile)"
                .into(),
        );
    }
    match first {
        Some(p) if !p.is_empty() && *p != claim.profile => Some(format!(
            "its reproducibility profile changed within the run (it first committed under {p:?})"
        )),
        _ => None,
    }
}

/// The value more than half of `values` have, if one does.
fn majority(values: impl Iterator<Item = u64>) -> Option<u64> {
    let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
    let mut n = 0;
    for v in values {
        *counts.entry(v).or_default() += 1;
        n += 1;
    }
    counts.into_iter().find(|(_, c)| 2 * c > n).map(|(v, _)| v)
}

fn describe(reports: &BTreeMap<WorkerId, impl std::fmt::Display>) -> String {
    let mut parts: Vec<String> = reports.iter().map(|(w, h)| format!("{w} {h}")).collect();
    if parts.len() > 16 {
        let more = parts.len() - 16;
        parts.truncate(16);
        parts.push(format!("and {more} more"));
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::commitments::Span;

    #[test]
    fn a_majority_is_more_than_half() {
        assert_eq!(majority([3, 3, 4].into_iter()), Some(3));
        assert_eq!(majority([3, 4].into_iter()), None);
        assert_eq!(majority(std::iter::empty()), None);
        assert_eq!(majority([5].into_iter()), Some(5));
    }

    /// In a run with audits, what would make a claim unauditable is refused: no digest, no data,
    /// or a profile other than the one the member first committed under (a cheater switching
    /// profiles, or going silent about its digest, in the syncs it cheats).
    #[test]
    fn an_unauditable_claim_is_refused_only_in_a_run_with_audits() {
        let span = Span::granted(1, 0, 0, 8);
        let honest = Claim {
            spans: vec![span],
            digest: Some([1; 32]),
            profile: "cpu|x|threads=1".into(),
            ..Claim::norms(vec![1.0])
        };
        let first = "cpu|x|threads=1".to_owned();
        let on = runspec::Verification { audit_probability: 0.05, ..runspec::Verification::OFF };
        let audited = Some(&on);
        assert_eq!(auditable(audited, &honest, Some(&first), false), None);
        assert_eq!(auditable(audited, &honest, None, false), None, "its first commitment");
        let no_digest = Claim { digest: None, ..honest.clone() };
        let no_spans = Claim { spans: Vec::new(), ..honest.clone() };
        let switched = Claim { profile: "cpu|y|threads=1".into(), ..honest.clone() };
        let silent = Claim { profile: String::new(), ..honest.clone() };
        for (claim, needle) in [
            (&no_digest, "digest"),
            (&no_spans, "spans"),
            (&switched, "profile changed"),
            (&silent, "profile changed"),
        ] {
            let why = auditable(audited, claim, Some(&first), false).expect("refused");
            assert!(why.contains(needle), "{why}");
            assert_eq!(auditable(None, claim, Some(&first), false), None, "no audits, no refusal");
        }
        // A member whose first commitments named no profile (a CUDA worker) is not audited,
        // and a later profile is not a change.
        assert_eq!(auditable(audited, &honest, Some(&String::new()), false), None);
        assert_eq!(auditable(audited, &silent, None, false), None, "a CUDA worker trains");
        // Unless the run takes only auditable contributions.
        let strict = runspec::Verification { require_profile: true, ..on };
        let why = auditable(Some(&strict), &silent, None, false).expect("refused");
        assert!(why.contains("require_profile"), "{why}");
        assert_eq!(auditable(Some(&strict), &honest, Some(&first), false), None);
        // diloco: the inner optimizer state's digests too (an auditor needs the start, and its
        // answer the end).
        let why = auditable(audited, &honest, Some(&first), true).expect("refused");
        assert!(why.contains("inner optimizer state"), "{why}");
        let inner = Claim {
            inner_start: Some([3; 32]),
            inner_end: Some([4; 32]),
            inner_bytes: 16,
            ..honest
        };
        assert_eq!(auditable(audited, &inner, Some(&first), true), None);
    }
}
