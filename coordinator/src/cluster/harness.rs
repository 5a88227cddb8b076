//! A simulated network for the cluster state machine (raft-rs style): simulated agents on a
//! virtual clock, links that can be cut per worker, crashes, hostile agents, and invariants
//! checked after every single input.
//!
//! Agents speak the protocol as workers do: at every epoch they report the state they hold,
//! wait for the agreement (receivers adopt the recorded step), then for every sync commit their
//! segment norms, wait for the plan, "sync" for a tick and report the hash of the new state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use proto::{Epoch, LeaseId, Liveness, ParamHash, RunId, RunState, WorkerId};

use super::commitments::{Claim, Span};
use super::{Cluster, Command, Config, EpochInfo, Millis, Output};
use crate::shards::{Lease, Manifest, ShardInfo};
use runspec::RunSpec;

const TICK: Millis = 100;

/// Where an agent is in its epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not in an epoch.
    Idle,
    /// Told of an epoch: reports what it holds at its next step.
    Joined,
    /// Reported; waits for the agreement.
    Agreeing,
    /// Trains toward the next sync (done at `next_step`).
    Training,
    /// Committed to the sync at this step; waits for the plan.
    Committed(u64),
    /// Got the plan; the sync completes at `sync_done`.
    Syncing(u64),
}

/// How an agent misbehaves (on top of the protocol, which it otherwise follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Behaviour {
    Honest,
    /// Reports another hash than the others after every sync.
    Diverged,
    /// Never reports anything (heartbeats only): never agrees, never commits.
    Silent,
    /// Reports what it holds, then never commits to a sync.
    NeverCommits,
    /// Commits zero norms (a lazy worker).
    Lazy,
    /// Commits to a contribution trained from a state of its own (not the recorded one).
    ForeignStart,
    /// Commits to data read under a lease the coordinator never granted it.
    UngrantedData,
}

/// A simulated worker agent.
#[derive(Debug)]
struct Agent {
    crashed: bool,
    /// Heartbeats are sent only while this is true (for flapping).
    beating: bool,
    next_heartbeat: Millis,
    epoch: Option<EpochInfo>,
    phase: Phase,
    /// The step of its synchronised state.
    state: u64,
    next_step: Millis,
    sync_done: Millis,
    lease: Option<(Lease, Millis)>,
    commands: Vec<(Millis, Command)>,
    behaviour: Behaviour,
    /// Its state is not the others' (it synced as `Diverged`), until it receives theirs.
    tainted: bool,
}

/// The cluster, its agents and the virtual network between them.
#[derive(Debug)]
pub(super) struct Net {
    pub(super) cluster: Cluster,
    pub(super) now: Millis,
    agents: BTreeMap<WorkerId, Agent>,
    /// Workers whose link to the coordinator is cut (both directions).
    pub(super) cut: BTreeSet<WorkerId>,
    pub(super) heartbeat_every: Millis,
    pub(super) step_every: Millis,
    pub(super) shard_work: Millis,
    /// (run, data epoch, shard) of every accepted completion.
    completions: BTreeSet<(RunId, u64, u32)>,
    /// The highest epoch and committed step seen per run.
    high: BTreeMap<RunId, (Epoch, u64)>,
    /// Every epoch announced: (time, run, epoch, members).
    pub(super) epochs: Vec<(Millis, RunId, Epoch, Vec<WorkerId>)>,
    /// Every abort delivered or dropped: (time, worker, epoch).
    pub(super) aborts: Vec<(Millis, WorkerId, Epoch)>,
    /// Every run log line: (time, run, line).
    pub(super) logs: Vec<(Millis, RunId, String)>,
    /// The commitments and audits the cluster asked the store to append, in order.
    pub(super) appended: Vec<Output>,
    /// Every plan delivered: (worker, plan).
    pub(super) plans: Vec<(WorkerId, super::PlanInfo)>,
    /// A token every simulated join uses.
    token: [u8; 32],
    next_key: u64,
}

/// The state hash agents in agreement report after `step`.
pub(super) fn hash_of(step: u64) -> ParamHash {
    ParamHash(step.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A ddp run file (every step a sync) with the given bounds and budget.
pub(super) fn spec(min: u32, max: u32, steps: u64) -> (RunSpec, String) {
    let text = crate::testing::synthetic_run_file(min, max, steps)
        .replacen("interval_steps = 100", "interval_steps = 50", 1)
        .replacen("# restart_budget = 5", "restart_budget = 5", 1)
        .replacen("mode = \"diloco\"", "mode = \"ddp\"", 1)
        // The harness's agents neither audit nor commit digests and spans.
        .replacen("# audit_probability = 0.05", "audit_probability = 0.0", 1)
        .replacen("# probation_probability = 0.5", "probation_probability = 0.0", 1)
        .lines()
        .filter(|l| !l.starts_with("inner_steps") && !l.starts_with("outer_"))
        .collect::<Vec<_>>()
        .join("\n");
    (RunSpec::parse(&text).expect("the harness's run file parses"), text)
}

pub(super) fn manifest(n: usize) -> Manifest {
    Manifest {
        shards: (0..n)
            .map(|i| ShardInfo { uri: format!("file:///s/{i}"), size: 1, sha256: "0".repeat(64) })
            .collect(),
    }
}

fn addr(id: WorkerId) -> SocketAddr {
    SocketAddr::from(([10, 0, (id.0 >> 8) as u8, id.0 as u8], 7000))
}

impl Net {
    pub(super) fn new(config: Config) -> Self {
        let mut cluster = Cluster::new(config);
        let token = [7u8; 32];
        cluster.add_token(token, u64::MAX / 2, 100_000);
        Self {
            cluster,
            now: 1_000_000,
            agents: BTreeMap::new(),
            cut: BTreeSet::new(),
            heartbeat_every: 1_000,
            step_every: 500,
            shard_work: 700,
            completions: BTreeSet::new(),
            high: BTreeMap::new(),
            epochs: Vec::new(),
            aborts: Vec::new(),
            logs: Vec::new(),
            appended: Vec::new(),
            plans: Vec::new(),
            token,
            next_key: 1,
        }
    }

    pub(super) fn submit(&mut self, min: u32, max: u32, steps: u64, shards: usize) -> RunId {
        let (spec, text) = spec(min, max, steps);
        let id = self.cluster.submit(self.now, &spec, &text, manifest(shards)).expect("submit");
        self.check();
        id
    }

    /// A new worker joins (its agent starts heartbeating).
    pub(super) fn join(&mut self) -> WorkerId {
        self.join_as(Behaviour::Honest)
    }

    pub(super) fn join_as(&mut self, behaviour: Behaviour) -> WorkerId {
        let key = format!("key-{}", self.next_key);
        self.next_key += 1;
        let next = WorkerId(self.cluster.counters().next_worker);
        let id = self
            .cluster
            .join(self.now, &self.token, &key, "sim", addr(next))
            .expect("the harness token is valid");
        self.cluster.session_opened(self.now, id, None, Some(addr(id))).expect("just joined");
        self.agents.insert(
            id,
            Agent {
                crashed: false,
                beating: true,
                next_heartbeat: self.now + self.heartbeat_every,
                epoch: None,
                phase: Phase::Idle,
                state: 0,
                next_step: 0,
                sync_done: 0,
                lease: None,
                commands: Vec::new(),
                behaviour,
                tainted: false,
            },
        );
        self.check();
        id
    }

    pub(super) fn crash(&mut self, id: WorkerId) {
        if let Some(a) = self.agents.get_mut(&id) {
            a.crashed = true;
        }
    }

    pub(super) fn set_beating(&mut self, id: WorkerId, on: bool) {
        if let Some(a) = self.agents.get_mut(&id) {
            a.beating = on;
        }
    }

    pub(super) fn set_behaviour(&mut self, id: WorkerId, b: Behaviour) {
        if let Some(a) = self.agents.get_mut(&id) {
            a.behaviour = b;
        }
    }

    /// The step of an agent's synchronised state.
    pub(super) fn state_of(&self, id: WorkerId) -> u64 {
        self.agents[&id].state
    }

    /// Runs the simulation for `ms` of virtual time, in ticks.
    pub(super) fn run_for(&mut self, ms: Millis) {
        let end = self.now + ms;
        while self.now < end {
            self.now += TICK;
            self.step_agents();
            self.cluster.tick(self.now);
            self.check();
            self.deliver();
        }
    }

    fn step_agents(&mut self) {
        let now = self.now;
        let ids: Vec<WorkerId> = self.agents.keys().copied().collect();
        for id in ids {
            let reachable = !self.cut.contains(&id);
            let a = self.agents.get_mut(&id).expect("id from keys");
            if a.crashed {
                continue;
            }
            if now >= a.next_heartbeat {
                a.next_heartbeat = now + self.heartbeat_every;
                if a.beating && reachable {
                    // Everyone measures 10 ms to everyone: RTTs do not decide these tests.
                    let rtts = self.agents_rtts(id);
                    self.cluster.heartbeat(now, id, Some(rtts)).expect("known worker");
                    self.check();
                }
            }
            if reachable {
                self.step_protocol(id);
            }
            self.step_leases(id, reachable);
        }
    }

    /// One agent's move in the epoch protocol.
    fn step_protocol(&mut self, id: WorkerId) {
        let now = self.now;
        let step_every = self.step_every;
        let a = self.agents.get_mut(&id).expect("known agent");
        let Some(ep) = a.epoch.clone() else { return };
        let behaviour = a.behaviour;
        let hash = |step: u64| {
            if behaviour == Behaviour::Diverged { hash_of(step ^ 1) } else { hash_of(step) }
        };
        match a.phase {
            Phase::Idle | Phase::Agreeing | Phase::Committed(_) => {}
            Phase::Joined => {
                if behaviour == Behaviour::Silent {
                    return;
                }
                a.phase = Phase::Agreeing;
                let (state, h) =
                    (a.state, if a.tainted { hash_of(a.state ^ 1) } else { hash_of(a.state) });
                self.cluster.step_committed(now, id, ep.run, ep.epoch, state, h);
                self.check();
            }
            Phase::Training if now >= a.next_step => {
                if behaviour == Behaviour::NeverCommits || behaviour == Behaviour::Silent {
                    return;
                }
                let t = a.state + 1;
                a.phase = Phase::Committed(t);
                let n = ep.members.len();
                let norm = if behaviour == Behaviour::Lazy { 0.0 } else { 1.0 };
                // It trained from the state it holds (a diverged one's differs from the
                // recorded state, and its commitment is refused for it).
                let start = match behaviour {
                    Behaviour::ForeignStart => hash_of(a.state ^ 7),
                    _ if a.tainted => hash_of(a.state ^ 1),
                    _ => hash_of(a.state),
                };
                let mut claim = claim(vec![norm; n], Some(start));
                if behaviour == Behaviour::UngrantedData {
                    claim.spans = vec![Span {
                        lease: LeaseId(1),
                        shard: 0,
                        data_epoch: 0,
                        from: 0,
                        to: 8,
                        granted: false,
                        shared: false,
                    }];
                    claim.samples = 8;
                }
                // A refusal (a stale commitment) is fine: the agent waits for the next epoch.
                let _ = self.cluster.sync_commit(now, id, ep.run, ep.epoch, t, claim);
                self.check();
            }
            Phase::Training => {}
            Phase::Syncing(t) if now >= a.sync_done => {
                a.state = t;
                a.tainted = behaviour == Behaviour::Diverged;
                a.phase = Phase::Training;
                a.next_step = now + step_every;
                self.cluster.step_committed(now, id, ep.run, ep.epoch, t, hash(t));
                self.check();
            }
            Phase::Syncing(_) => {}
        }
    }

    fn step_leases(&mut self, id: WorkerId, reachable: bool) {
        let now = self.now;
        let a = self.agents.get_mut(&id).expect("known agent");
        if a.crashed || a.epoch.is_none() {
            return;
        }
        match a.lease.clone() {
            Some((lease, done)) if now >= done => {
                a.lease = None;
                if reachable {
                    if self.cluster.complete(now, id, lease.id, 1).is_ok() {
                        let fresh =
                            self.completions.insert((lease.run, lease.data_epoch, lease.shard));
                        assert!(
                            fresh,
                            "shard {} completed twice in data epoch {}",
                            lease.shard, lease.data_epoch
                        );
                    }
                    self.check();
                }
            }
            Some(_) => {}
            None if reachable => {
                if let Ok(Some(lease)) = self.cluster.lease(now, id)
                    && !lease.shared
                {
                    let done = now + self.shard_work;
                    self.agents.get_mut(&id).expect("id from keys").lease = Some((lease, done));
                }
                self.check();
            }
            None => {}
        }
    }

    fn agents_rtts(&self, me: WorkerId) -> BTreeMap<WorkerId, u32> {
        self.agents.keys().filter(|&&w| w != me).map(|&w| (w, 10_000)).collect()
    }

    fn deliver(&mut self) {
        while let Some(out) = self.cluster.poll_output() {
            let (to, cmd) = match out {
                Output::ToWorker(to, cmd) => (to, cmd),
                Output::Log { run, line } => {
                    self.logs.push((self.now, run, line));
                    continue;
                }
                Output::Commitment { .. } | Output::Audit { .. } => {
                    self.appended.push(out);
                    continue;
                }
                Output::Metric { .. } | Output::Checkpoint { .. } => continue,
            };
            match &cmd {
                Command::Epoch(info) => {
                    let members = info.members.iter().map(|m| m.worker).collect();
                    if !self.epochs.iter().any(|(_, r, e, _)| *r == info.run && *e == info.epoch) {
                        self.epochs.push((self.now, info.run, info.epoch, members));
                    }
                }
                Command::Abort { epoch, .. } => self.aborts.push((self.now, to, *epoch)),
                Command::Plan(p) => self.plans.push((to, p.clone())),
                _ => {}
            }
            let cut = self.cut.contains(&to);
            let Some(a) = self.agents.get_mut(&to) else { continue };
            if a.crashed || cut {
                continue;
            }
            a.commands.push((self.now, cmd.clone()));
            match cmd {
                Command::Epoch(info) => {
                    let newer =
                        a.epoch.as_ref().is_none_or(|e| e.epoch < info.epoch || e.run != info.run);
                    if newer {
                        a.epoch = Some(info);
                        a.phase = Phase::Joined;
                    }
                }
                Command::Agreement(ag) => {
                    let Some(ep) = &a.epoch else { continue };
                    if ep.epoch != ag.epoch || a.phase != Phase::Agreeing {
                        continue;
                    }
                    let rank = ep.members.iter().position(|m| m.worker == to);
                    if rank.is_some_and(|r| ag.receivers.contains(&r)) {
                        a.state = ag.step;
                        a.tainted = false;
                    }
                    a.phase = Phase::Training;
                    a.next_step = self.now + self.step_every;
                }
                Command::Plan(p) => {
                    if a.phase == Phase::Committed(p.step)
                        && a.epoch.as_ref().is_some_and(|e| e.epoch == p.epoch)
                    {
                        a.phase = Phase::Syncing(p.step);
                        a.sync_done = self.now + TICK;
                    }
                }
                Command::Abort { .. } | Command::Stop { .. } => {
                    a.epoch = None;
                    a.phase = Phase::Idle;
                    a.lease = None;
                }
                // The harness's agents do not audit: an audit they are given expires unanswered,
                // blaming nobody (the audit book has its own tests; real workers audit in the
                // adversary suite).
                Command::Checkpoint { .. } | Command::Audit(_) | Command::Upload { .. } => {}
            }
        }
    }

    /// The invariants, after every input: the state machine's own, epochs only grow, committed
    /// steps never fall, and a recorded step is one a majority of agents actually holds.
    fn check(&mut self) {
        if let Err(e) = self.cluster.check_invariants() {
            panic!("invariant broken at t={}: {e}", self.now);
        }
        for r in self.cluster.runs() {
            let (e, s) = self.high.entry(r.id).or_insert((r.epoch, r.committed_step));
            assert!(r.epoch >= *e, "run {} epoch went back from {e} to {}", r.id, r.epoch);
            // The recorded step falls only in a rewind, which the log says.
            let rewound = r.message.contains("rewinding to step");
            assert!(
                r.committed_step >= *s || rewound,
                "run {} step fell from {s} to {}",
                r.id,
                r.committed_step
            );
            *e = r.epoch;
            *s = r.committed_step;
            if r.committed_step > 0 {
                assert_eq!(
                    r.committed_hash,
                    Some(hash_of(r.committed_step)),
                    "run {}: a forged record",
                    r.id
                );
            }
        }
    }

    pub(super) fn epoch_of(&self, run: RunId) -> (Epoch, Vec<WorkerId>) {
        let r = self.cluster.run(run).expect("run exists");
        (r.epoch, r.members.iter().map(|m| m.worker).collect())
    }

    pub(super) fn state(&self, run: RunId) -> RunState {
        self.cluster.run(run).expect("run exists").state
    }

    pub(super) fn step(&self, run: RunId) -> u64 {
        self.cluster.run(run).expect("run exists").committed_step
    }

    /// Every agent forgets its state back to `step` (the state a departed majority held is
    /// gone from the ring).
    pub(super) fn forget_back_to(&mut self, step: u64) {
        for a in self.agents.values_mut() {
            a.state = a.state.min(step);
        }
    }

    /// Log lines of `run` containing `needle`.
    pub(super) fn logged(&self, run: RunId, needle: &str) -> Vec<String> {
        self.logs
            .iter()
            .filter(|(_, r, l)| *r == run && l.contains(needle))
            .map(|(_, _, l)| l.clone())
            .collect()
    }
}

fn config() -> Config {
    Config {
        suspect_after: 3_000,
        dead_after: 10_000,
        readmit_after: 30_000,
        lease_ttl: 60_000,
        bench_for: 20_000,
        agree_wait: 5_000,
        commit_grace: 5_000,
        ..Config::default()
    }
}

fn ids(v: &[u64]) -> Vec<WorkerId> {
    let mut w: Vec<WorkerId> = v.iter().map(|&i| WorkerId(i)).collect();
    w.sort();
    w
}

fn sorted(mut v: Vec<WorkerId>) -> Vec<WorkerId> {
    v.sort();
    v
}

#[test]
fn simultaneous_joins_make_one_epoch() {
    let mut net = Net::new(config());
    let run = net.submit(3, 8, 1_000_000, 20);
    for _ in 0..4 {
        net.join();
    }
    net.run_for(TICK);
    let (epoch, members) = net.epoch_of(run);
    assert_eq!(epoch, Epoch(1));
    assert_eq!(sorted(members), ids(&[1, 2, 3, 4]));
    assert_eq!(net.state(run), RunState::Running);
    net.run_for(5_000);
    assert_eq!(net.epoch_of(run).0, Epoch(1), "no churn without membership change");
    assert!(net.step(run) > 0);
}

#[test]
fn a_death_aborts_the_old_epoch_within_one_tick_and_forms_the_next() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..4).map(|_| net.join()).collect();
    net.run_for(5_000);
    let step_before = net.step(run);
    net.crash(w[2]);
    let crashed_at = net.now;
    net.run_for(15_000);
    // Suspect, then dead: the abort to every old member and the new epoch in the same tick.
    assert_eq!(net.cluster.liveness(w[2]), Some(Liveness::Dead));
    let last_hb = net.cluster.last_heartbeat(w[2]).unwrap();
    let death_noticed = last_hb + config().dead_after + TICK;
    let aborts: Vec<_> = net.aborts.iter().filter(|(_, _, e)| *e == Epoch(1)).collect();
    assert_eq!(aborts.len(), 4, "every member of epoch 1 is told: {aborts:?}");
    for (t, _, _) in &aborts {
        assert!(*t <= death_noticed, "abort at {t}, death noticeable at {death_noticed}");
        assert!(*t > crashed_at);
    }
    let (epoch, members) = net.epoch_of(run);
    assert_eq!(epoch, Epoch(2));
    assert_eq!(sorted(members), vec![w[0], w[1], w[3]]);
    let e2 = net.epochs.iter().find(|(_, _, e, _)| *e == Epoch(2)).unwrap();
    assert_eq!(e2.0, aborts[0].0, "new epoch announced in the tick of the abort");
    assert!(net.step(run) > step_before);
    assert_eq!(net.cluster.run(run).unwrap().restarts, 1);
}

#[test]
fn a_join_makes_a_new_epoch_and_the_newcomer_receives_the_recorded_state() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    for _ in 0..3 {
        net.join();
    }
    net.run_for(3_000);
    let step = net.step(run);
    assert!(step > 0);
    let new = net.join();
    net.run_for(TICK);
    let (epoch, members) = net.epoch_of(run);
    assert_eq!(epoch, Epoch(2));
    assert!(members.contains(&new));
    net.run_for(3_000);
    assert!(net.step(run) > step);
    assert_eq!(net.state_of(new), net.step(run), "the newcomer holds the recorded state");
    assert_eq!(net.cluster.run(run).unwrap().restarts, 0, "a join is not a failure");
}

#[test]
fn a_flapping_worker_does_not_churn_epochs() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    net.run_for(2_000);
    // Short gaps (suspect, never dead) change nothing.
    for _ in 0..5 {
        net.set_beating(w[1], false);
        net.run_for(5_000);
        net.set_beating(w[1], true);
        net.run_for(3_000);
    }
    assert_eq!(net.epoch_of(run).0, Epoch(1), "suspicion alone never changes the epoch");
    // Long gaps (dead, then back for a while, then dead again) for two minutes.
    for _ in 0..6 {
        net.set_beating(w[1], false);
        net.run_for(12_000);
        net.set_beating(w[1], true);
        net.run_for(8_000);
    }
    let (epoch, members) = net.epoch_of(run);
    // It died once (epoch 2) and never stayed up for `readmit_after`, so it was never
    // readmitted: one change only, not one per flap.
    assert_eq!(epoch, Epoch(2), "epochs: {:?}", net.epochs);
    assert!(!members.contains(&w[1]));
    // Once stable it is readmitted, after `readmit_after` doubled for each death after the
    // first (6 deaths: 32 × 30 s): a worker that keeps dying churns epochs less and less.
    net.run_for(30 * 30_000);
    assert_eq!(net.epoch_of(run).0, Epoch(2), "not yet");
    net.run_for(5 * 30_000);
    let (epoch, members) = net.epoch_of(run);
    assert_eq!(epoch, Epoch(3));
    assert!(members.contains(&w[1]));
}

#[test]
fn the_coordinator_cut_off_from_a_minority() {
    let mut net = Net::new(config());
    let run = net.submit(3, 8, 1_000_000, 100);
    let w: Vec<WorkerId> = (0..5).map(|_| net.join()).collect();
    net.run_for(3_000);
    net.cut.insert(w[3]);
    net.cut.insert(w[4]);
    net.run_for(20_000);
    let (epoch, members) = net.epoch_of(run);
    assert_eq!(epoch, Epoch(2), "both deaths noticed in the same tick make one epoch");
    assert_eq!(sorted(members), vec![w[0], w[1], w[2]]);
    let step = net.step(run);
    net.cut.clear();
    net.run_for(5_000);
    assert!(net.step(run) >= step);
    assert_eq!(net.epoch_of(run).0, Epoch(2), "not readmitted before readmit_after");
    net.run_for(40_000);
    let (epoch, members) = net.epoch_of(run);
    assert_eq!(epoch, Epoch(3));
    assert_eq!(members.len(), 5);
}

#[test]
fn losing_min_workers_waits_then_resumes_and_the_restart_budget_fails_the_run() {
    let mut net = Net::new(config());
    let run = net.submit(2, 2, 1_000_000, 10);
    let a = net.join();
    let b = net.join();
    net.run_for(2_000);
    assert_eq!(net.state(run), RunState::Running);
    net.crash(b);
    net.run_for(12_000);
    let r = net.cluster.run(run).unwrap();
    assert!(r.members.is_empty(), "below min_workers: no epoch");
    assert!(r.message.contains("waiting"), "{}", r.message);
    // Kill replacements until the budget (5) is spent.
    for _ in 0..5 {
        let c = net.join();
        net.run_for(2_000);
        assert!(net.epoch_of(run).1.contains(&c));
        net.crash(c);
        net.run_for(12_000);
    }
    assert_eq!(net.state(run), RunState::Failed);
    let r = net.cluster.run(run).unwrap();
    assert!(r.message.contains("restart budget"), "{}", r.message);
    assert!(net.agents[&a].commands.iter().any(|(_, c)| matches!(c, Command::Stop { .. })));
}

#[test]
fn runs_complete_and_free_their_workers_for_the_next() {
    let mut net = Net::new(config());
    let first = net.submit(2, 2, 20, 5);
    let second = net.submit(2, 2, 1_000_000, 5);
    let _w: Vec<WorkerId> = (0..2).map(|_| net.join()).collect();
    net.run_for(30_000);
    assert_eq!(net.state(first), RunState::Completed);
    assert_eq!(net.step(first), 20);
    assert_eq!(net.state(second), RunState::Running);
    net.cluster.stop(net.now, second, "user asked").unwrap();
    assert_eq!(net.state(second), RunState::Stopped);
    assert!(net.cluster.stop(net.now, second, "again").is_err());
    net.run_for(1_000);
    assert!(net.cluster.workers().all(|w| w.run.is_none()));
}

#[test]
fn every_shard_once_per_data_epoch_across_failures() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 40);
    let w: Vec<WorkerId> = (0..4).map(|_| net.join()).collect();
    net.run_for(4_000);
    net.crash(w[0]);
    net.run_for(30_000);
    net.crash(w[1]);
    net.run_for(60_000);
    let book = net.cluster.shards(run).unwrap();
    assert!(book.data_epoch() >= 2, "data epoch {}", book.data_epoch());
    // Every data epoch finished covers every shard exactly once (asserted as they arrive).
    for e in 0..book.data_epoch() {
        let n = net.completions.iter().filter(|(r, de, _)| *r == run && *de == e).count();
        assert_eq!(n, 40, "data epoch {e}");
    }
}

#[test]
fn equal_inputs_give_equal_rings() {
    let run = |seed: u64| {
        let mut net = Net::new(config());
        let run = net.submit(2, 8, 1_000_000, 10);
        for _ in 0..6 {
            net.join();
        }
        net.run_for(3_000);
        net.crash(WorkerId(seed));
        net.run_for(15_000);
        net.cluster.run(run).unwrap().members.clone()
    };
    assert_eq!(run(3), run(3));
}

#[test]
fn stale_leases_and_completions_are_refused_and_leases_are_capped() {
    let mut net = Net::new(config());
    let run = net.submit(1, 1, 1_000_000, 10);
    let w = net.join();
    net.run_for(TICK);
    assert!(net.cluster.run(run).is_some());
    let err = net.cluster.complete(net.now, w, LeaseId(999), 1).unwrap_err();
    assert!(err.to_string().contains("not held"), "{err}");
    let stranger = WorkerId(77);
    assert!(net.cluster.lease(net.now, stranger).is_err());
    // Hoarding: past its quota a worker holds no more shards (its asks are shared leases or
    // nothing), so the others always find data.
    for _ in 0..20 {
        let _ = net.cluster.lease(net.now, w);
    }
    let held = net.cluster.shards(run).unwrap().holders().filter(|(_, h)| *h == w).count();
    assert!(held <= config().max_leases_per_worker, "{held} leases held");
}

fn restore(net: &Net, at: Millis) -> Cluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = crate::store::Store::open(&dir.path().join("state.redb")).expect("open");
    let mut all: BTreeSet<super::Dirty> =
        net.cluster.workers().map(|w| super::Dirty::Worker(w.id)).collect();
    all.extend(net.cluster.runs().map(|r| super::Dirty::Run(r.id)));
    all.insert(super::Dirty::Counters);
    for r in net.cluster.runs() {
        for i in 0..net.cluster.shards(r.id).map_or(0, |b| b.len()) {
            all.insert(super::Dirty::Shard(r.id, i));
        }
    }
    let mut batch = crate::store::Batch::collect(&net.cluster, &all).expect("serialize");
    batch.append_outputs(at, net.appended.iter());
    store.write(&[batch]).expect("write");
    drop(store);
    let store = crate::store::Store::open(&dir.path().join("state.redb")).expect("reopen");
    let (loaded, quarantined) = store.load().expect("load");
    assert!(quarantined.is_empty(), "{quarantined:?}");
    Cluster::restore(config(), at, loaded)
}

#[test]
fn uptime_counts_connected_time_is_persisted_and_survives_restart() {
    use super::UPTIME_FLUSH_MS;
    let mut net = Net::new(config());
    let (a, b) = (net.join(), net.join());
    net.run_for(30_000);
    net.crash(b);
    net.run_for(30_000);
    let up = |net: &Net, w| net.cluster.uptime(w).unwrap();
    // Connected time, to a heartbeat interval; b's silence does not count.
    let hb = net.heartbeat_every;
    assert!(up(&net, a).abs_diff(60_000) <= 2 * hb, "a: {}", up(&net, a));
    assert!(up(&net, b).abs_diff(30_000) <= 2 * hb, "b: {}", up(&net, b));
    // The silent worker's uptime is all in the ledger; the live one's is within a batch.
    assert_eq!(net.cluster.worker(b).unwrap().ledger.uptime_ms, up(&net, b));
    let ledger_a = net.cluster.worker(a).unwrap().ledger.uptime_ms;
    assert!(up(&net, a) - ledger_a < UPTIME_FLUSH_MS + 2 * hb, "ledger {ledger_a}");

    // Through redb and a restart: the ledger is back, and downtime is not counted.
    let later = net.now + 3_600_000;
    let mut c = restore(&net, later);
    assert_eq!(c.uptime(a), Some(ledger_a));
    assert_eq!(c.uptime(b), Some(up(&net, b)));
    c.heartbeat(later + 500, a, None).expect("known");
    assert_eq!(c.uptime(a), Some(ledger_a), "the first heartbeat after a restart only marks");
    c.heartbeat(later + 1_000, a, None).expect("known");
    assert_eq!(c.uptime(a), Some(ledger_a + 500));
}

#[test]
fn the_recorded_state_and_the_pending_sync_survive_a_restart_which_forms_a_new_epoch() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 20);
    let (a, _b) = (net.join(), net.join());
    net.run_for(5_000);
    let r = net.cluster.run(run).unwrap();
    let (step, hash, epoch) = (r.committed_step, r.committed_hash, r.epoch);
    assert!(step > 0);
    assert_eq!(hash, Some(hash_of(step)));
    let mut c = restore(&net, net.now);
    let r2 = c.run(run).unwrap();
    assert_eq!((r2.committed_step, r2.committed_hash), (step, hash));
    assert_eq!(r2.pending.as_ref().map(|p| p.step), r.pending.as_ref().map(|p| p.step));
    // What the old epoch was doing in memory is gone: the next tick forms a new one.
    c.session_opened(net.now, a, None, None).expect("known");
    c.tick(net.now + 1);
    assert!(c.run(run).unwrap().epoch > epoch);
}

#[test]
fn an_agent_that_diverges_is_resynced_then_benched() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 20);
    let (_a, b, _c) = (net.join(), net.join(), net.join());
    net.run_for(3_000);
    assert!(net.logs.is_empty(), "agreeing members log nothing: {:?}", net.logs);
    // b's state drifts at every sync: the majority records the true state and names b; b gets
    // the recorded state in the next epoch, drifts again, and sits out.
    net.set_behaviour(b, Behaviour::Diverged);
    net.run_for(6_000);
    assert!(!net.logged(run, "diverged").is_empty(), "{:?}", net.logs);
    assert!(net.logged(run, &b.to_string()).iter().any(|l| l.contains("twice")), "{:?}", net.logs);
    assert!(!net.epoch_of(run).1.contains(&b));
    assert!(net.cluster.worker(b).unwrap().banned.is_empty(), "benched, not banned");
    let step = net.step(run);
    net.run_for(3_000);
    assert!(net.step(run) > step, "the others go on");
}

// ---- hostile members ----

#[test]
fn a_report_that_contradicts_an_earlier_one_bans_whichever_came_first() {
    let mut net = Net::new(config());
    let run = net.submit(3, 8, 1_000_000, 20);
    let w: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    net.run_for(3_000);
    // w[0] reports a state of its own after a sync: before or after the majority's reports
    // arrive (whichever the schedule gives), the record names it as diverged.
    let (epoch, _) = net.epoch_of(run);
    net.set_behaviour(w[0], Behaviour::Diverged);
    let mut ticks = 0;
    while net.logged(run, "diverged").is_empty() {
        net.run_for(TICK);
        ticks += 1;
        assert!(ticks < 1_000, "no divergence logged: {:?}", net.logs);
    }
    let t = net.step(run);
    assert!(net.cluster.worker(w[0]).unwrap().banned.is_empty(), "one odd report is no proof");
    // Then it claims the recorded state for that same step: two states for one step.
    net.cluster.step_committed(net.now, w[0], run, epoch, t, hash_of(t));
    assert_eq!(net.cluster.worker(w[0]).unwrap().banned, vec![run], "{:?}", net.logs);
    net.run_for(TICK);
    assert!(!net.logged(run, "two states").is_empty(), "{:?}", net.logs);
}

#[test]
fn a_forged_report_never_records_a_step_nor_completes_the_run() {
    let mut net = Net::new(config());
    let run = net.submit(3, 8, 600, 20);
    let w: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    net.run_for(2_000);
    let (epoch, _) = net.epoch_of(run);
    let before = net.step(run);
    // Completion, a far step, u64::MAX, the next step with a wrong hash, first: none counts.
    for (step, hash) in [
        (600, ParamHash(0xdead_beef_dead_beef)),
        (u64::MAX, ParamHash(0)),
        (before + 1, ParamHash(0x1111_1111_1111_1111)),
    ] {
        net.cluster.step_committed(net.now, w[0], run, epoch, step, hash);
    }
    assert_eq!(net.state(run), RunState::Running);
    assert!(net.step(run) <= before + 1);
    // The forger reported two states for one step (the wrong hash first, then the true one at
    // the next sync): its own reports contradict each other.
    net.run_for(3_000);
    assert!(net.cluster.worker(w[0]).unwrap().banned.contains(&run) || net.step(run) > before);
    assert_eq!(net.state(run), RunState::Running, "{}", net.cluster.run(run).unwrap().message);
    // check() asserts after every input that every recorded hash is the true one.
}

#[test]
fn a_lone_claim_of_a_newer_state_at_an_epoch_change_is_not_the_source() {
    let mut net = Net::new(config());
    let run = net.submit(3, 8, 1_000_000, 20);
    let w: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    net.run_for(3_000);
    // A newcomer triggers an epoch; the liar answers first with a state far ahead.
    let liar = w[1];
    net.set_behaviour(liar, Behaviour::Silent);
    let newcomer = net.join();
    net.run_for(TICK);
    let (epoch, _) = net.epoch_of(run);
    let recorded = net.step(run);
    net.cluster.step_committed(
        net.now,
        liar,
        run,
        epoch,
        recorded + 1000,
        hash_of(recorded + 1000),
    );
    net.run_for(6_000);
    let agreement = net.agents[&newcomer]
        .commands
        .iter()
        .rev()
        .find_map(|(_, c)| match c {
            Command::Agreement(a) => Some(a.clone()),
            _ => None,
        })
        .expect("an agreement");
    assert_eq!(agreement.step, recorded, "the source holds the recorded state");
    let members =
        net.epochs.iter().find(|(_, _, e, _)| *e == agreement.epoch).map(|x| x.3.clone()).unwrap();
    assert_ne!(members[agreement.source], liar);
}

#[test]
fn an_accusation_keeps_one_side_out_never_bans_and_never_stalls_the_run() {
    use super::{Fault, FaultKind};
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..4).map(|_| net.join()).collect();
    net.run_for(3_000);
    let (epoch, _) = net.epoch_of(run);
    // A non-member, a self-accusation or another epoch change nothing.
    let outsider = WorkerId(99);
    let f = Fault { peer: Some(w[2]), kind: FaultKind::Misbehaved, detail: "x" };
    net.cluster.ring_fault(net.now, outsider, run, epoch, f);
    net.cluster.ring_fault(net.now, w[2], run, epoch, f);
    net.cluster.ring_fault(net.now, w[0], run, Epoch(epoch.0 + 7), f);
    assert_eq!(net.epoch_of(run).0, epoch);
    // w0 accuses w2: one of the two sits out (the later joiner, on a tie), the others go on.
    net.cluster.ring_fault(net.now, w[0], run, epoch, f);
    net.run_for(TICK);
    let (after, members) = net.epoch_of(run);
    assert!(after > epoch);
    assert_eq!(sorted(members), sorted(vec![w[0], w[1], w[3]]));
    assert!(!net.logged(run, "never in one ring again").is_empty());
    assert_eq!(net.cluster.sitting_out(run).collect::<Vec<_>>(), vec![w[2]]);
    // The colluder w1 accuses w3: w3 sits out too; the run goes on with two (its minimum).
    let (epoch, _) = net.epoch_of(run);
    let f = Fault { peer: Some(w[3]), kind: FaultKind::Misbehaved, detail: "y" };
    net.cluster.ring_fault(net.now, w[1], run, epoch, f);
    let step = net.step(run);
    net.run_for(config().bench_for + 35_000);
    assert_eq!(sorted(net.epoch_of(run).1), sorted(vec![w[0], w[1]]));
    assert!(net.step(run) > step, "the run went on");
    assert!(net.cluster.workers().all(|x| x.banned.is_empty()));
    assert_eq!(net.cluster.run(run).unwrap().restarts, 0, "disputes spend no restart budget");
}

#[test]
fn a_worker_that_cannot_train_a_run_leaves_it_alone_and_serves_the_next() {
    use super::{Fault, FaultKind};
    let mut net = Net::new(config());
    let first = net.submit(2, 8, 1_000_000, 50);
    let second = net.submit(1, 1, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..4).map(|_| net.join()).collect();
    net.run_for(3_000);
    let (epoch, members) = net.epoch_of(first);
    assert_eq!(members.len(), 4);
    let declined = Fault { peer: None, kind: FaultKind::Declined, detail: "no such model file" };
    // A non-member's or a stale epoch's word changes nothing.
    net.cluster.ring_fault(net.now, WorkerId(99), first, epoch, declined);
    net.cluster.ring_fault(net.now, w[1], first, Epoch(epoch.0 + 7), declined);
    assert_eq!(net.epoch_of(first).0, epoch);
    // w1 declines: it leaves at once, blames nobody, and is never assigned the run again; the
    // run goes on with the others, and w1 serves the run that wants a worker.
    net.cluster.ring_fault(net.now, w[1], first, epoch, declined);
    let step = net.step(first);
    net.run_for(config().bench_for + 35_000);
    let (_, members) = net.epoch_of(first);
    assert_eq!(sorted(members), sorted(vec![w[0], w[2], w[3]]));
    assert_eq!(net.epoch_of(second).1, vec![w[1]]);
    assert!(net.step(first) > step, "the run went on");
    assert!(!net.logged(first, "cannot train this run").is_empty(), "{:?}", net.logs);
    assert!(net.cluster.workers().all(|x| x.banned.is_empty()));
    assert!(net.cluster.sitting_out(first).next().is_none());
    assert_eq!(net.cluster.run(first).unwrap().restarts, 0);
    // Too few can train it: the run waits, and says why.
    for x in [w[0], w[2]] {
        let (epoch, _) = net.epoch_of(first);
        net.cluster.ring_fault(net.now, x, first, epoch, declined);
        net.run_for(TICK);
    }
    net.run_for(5_000);
    assert_eq!(net.state(first), RunState::Running);
    assert!(net.epoch_of(first).1.is_empty());
    let r = net.cluster.run(first).unwrap();
    assert!(
        r.message.contains("3 declined it") && r.message.contains("no such model file"),
        "{}",
        r.message
    );
}

#[test]
fn a_peer_two_members_cannot_reach_is_dropped_with_a_reason() {
    use super::{Fault, FaultKind};
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    net.run_for(2_000);
    let (epoch, _) = net.epoch_of(run);
    let f =
        Fault { peer: Some(w[1]), kind: FaultKind::Unreachable, detail: "no connection in 30 s" };
    net.cluster.ring_fault(net.now, w[0], run, epoch, f);
    assert_eq!(net.epoch_of(run).0, epoch, "one member's word drops nobody");
    net.cluster.ring_fault(net.now, w[2], run, epoch, f);
    net.run_for(TICK);
    assert!(!net.epoch_of(run).1.contains(&w[1]));
    let lines = net.logged(run, "dropped from the ring");
    assert!(lines.iter().any(|l| l.contains(&w[1].to_string())), "{:?}", net.logs);
}

#[test]
fn a_pair_that_cannot_form_a_ring_in_two_epochs_is_a_dispute_unless_a_sync_came_between() {
    use super::{Fault, FaultKind};
    let mut net = Net::new(config());
    let run = net.submit(3, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..4).map(|_| net.join()).collect();
    net.run_for(2_000);
    let f = Fault { peer: Some(w[3]), kind: FaultKind::Unreachable, detail: "did not connect" };
    let aborted = Fault { peer: None, kind: FaultKind::Failed, detail: "a neighbour aborted" };
    // One epoch: w[0] cannot reach w[3] (once or twice), a neighbour aborts: the ring re-forms
    // with the same members.
    let (e1, _) = net.epoch_of(run);
    net.cluster.ring_fault(net.now, w[0], run, e1, f);
    net.cluster.ring_fault(net.now, w[0], run, e1, f);
    net.cluster.ring_fault(net.now, w[1], run, e1, aborted);
    net.run_for(TICK);
    let (e2, members) = net.epoch_of(run);
    assert!(e2 > e1 && members.len() == 4, "re-formed with everyone: {members:?}");
    assert!(net.logged(run, "could not form").is_empty(), "one epoch is no dispute");
    // A sync recorded by both clears it: the next failure counts as the first.
    net.run_for(2_000);
    assert!(net.step(run) > 0);
    let (e3, _) = net.epoch_of(run);
    net.cluster.ring_fault(net.now, w[3], run, e3, Fault { peer: Some(w[0]), ..f });
    net.cluster.ring_fault(net.now, w[1], run, e3, aborted);
    net.run_for(TICK);
    assert!(net.logged(run, "could not form").is_empty(), "{:?}", net.logs);
    // The same pair again in the very next epoch, nothing recorded between: a dispute, and
    // one of the two (only) sits out; the run goes on with three.
    let (e4, members) = net.epoch_of(run);
    assert_eq!(members.len(), 4);
    net.cluster.ring_fault(net.now, w[0], run, e4, f);
    net.run_for(TICK);
    let lines = net.logged(run, "could not form a ring in 2 epochs");
    assert_eq!(lines.len(), 1, "{:?}", net.logs);
    let out: Vec<WorkerId> =
        w.iter().copied().filter(|x| net.cluster.sits_out_of(run, *x)).collect();
    assert!(out == [w[0]] || out == [w[3]], "one side sits out: {out:?}");
    let step = net.step(run);
    net.run_for(3_000);
    assert!(net.step(run) > step, "the others go on");
    assert!(!net.epoch_of(run).1.contains(&out[0]));
    assert!(net.cluster.workers().all(|x| x.banned.is_empty()));
}

#[test]
fn a_session_closed_for_a_malformed_message_sits_out_longer_each_time() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    net.run_for(2_000);
    let (e1, members) = net.epoch_of(run);
    assert!(members.contains(&w[1]));
    net.cluster.misbehaved(net.now, w[1], "invalid checkpoint_done.uri");
    net.run_for(TICK);
    let (e2, members) = net.epoch_of(run);
    assert!(e2 > e1 && !members.contains(&w[1]), "re-formed without it: {members:?}");
    let first = net.cluster.benched_until(w[1], net.now).saturating_sub(net.now);
    assert!(first > 0);
    assert!(!net.logged(run, "no honest worker sends").is_empty(), "{:?}", net.logs);
    let step = net.step(run);
    net.run_for(2_000);
    assert!(net.step(run) > step, "the others go on");
    // The second time it sits out twice as long; it is never banned on this.
    net.run_for(first + 3_000);
    assert!(net.epoch_of(run).1.contains(&w[1]), "it came back");
    net.cluster.misbehaved(net.now, w[1], "rate limit");
    let second = net.cluster.benched_until(w[1], net.now).saturating_sub(net.now);
    assert!(second >= 2 * first - TICK, "{second} after {first}");
    assert!(net.cluster.workers().all(|x| x.banned.is_empty()));
}

#[test]
fn a_member_that_never_commits_or_never_reports_is_dropped_and_the_run_goes_on() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    net.run_for(2_000);
    let step = net.step(run);
    net.set_behaviour(w[2], Behaviour::NeverCommits);
    net.run_for(15_000);
    assert!(!net.epoch_of(run).1.contains(&w[2]));
    assert!(!net.logged(run, "did not commit").is_empty(), "{:?}", net.logs);
    assert!(net.step(run) > step);
    // A member that reports nothing at all: the agreement goes ahead without it after
    // `agree_wait` (it would receive the state), and it never commits, so it is dropped too.
    let silent = net.join_as(Behaviour::Silent);
    net.run_for(40_000);
    assert!(!net.epoch_of(run).1.contains(&silent) || net.step(run) > step + 10);
    assert!(net.cluster.workers().all(|x| x.banned.is_empty()));
}

/// A commitment to a contribution with these segment norms, trained from `start`, on no data the
/// harness tracks.
fn claim(segment_norms: Vec<f32>, start: Option<ParamHash>) -> Claim {
    let norm = super::aggregate::total_norm(&segment_norms) as f32;
    Claim { start_hash: start, norm, ..Claim::norms(segment_norms) }
}

#[test]
fn commitments_that_fail_the_coordinators_checks_are_left_out_saying_why_and_ban_nobody() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let honest: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    let foreign = net.join_as(Behaviour::ForeignStart);
    let ungranted = net.join_as(Behaviour::UngrantedData);
    net.run_for(10_000);
    for (w, why) in [(foreign, "not the recorded state"), (ungranted, "not granted to it")] {
        let l = &net.cluster.worker(w).unwrap().ledger;
        assert_eq!(l.syncs, 0, "{w}: {l:?}");
        assert!(l.excluded > 0, "{w}: {l:?}");
        assert!(net.cluster.worker(w).unwrap().banned.is_empty(), "{w} banned on a claim");
        let rank_of = |p: &super::PlanInfo| {
            let members = net.epochs.iter().find(|(_, r, e, _)| *r == run && *e == p.epoch);
            members.and_then(|(.., m)| m.iter().position(|x| *x == w))
        };
        let said = net.plans.iter().any(|(_, p)| {
            rank_of(p).is_some_and(|r| {
                p.excluded[r].contains("commitment refused") && p.excluded[r].contains(why)
            })
        });
        assert!(said, "no plan says why {w} was left out");
    }
    for w in honest {
        let l = &net.cluster.worker(w).unwrap().ledger;
        assert!(l.syncs > 0 && l.excluded == 0, "{w}: {l:?}");
    }
}

#[test]
fn commitments_that_contradict_themselves_ban_and_lazy_ones_are_left_out() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    let lazy = net.join_as(Behaviour::Lazy);
    net.run_for(5_000);
    // The lazy worker is left out of every sync, and its ledger says so.
    let l = &net.cluster.worker(lazy).unwrap().ledger;
    assert_eq!(l.syncs, 0);
    assert!(l.excluded > 0, "{l:?}");
    assert_eq!(l.samples, 0);
    let h = &net.cluster.worker(w[0]).unwrap().ledger;
    assert!(h.syncs > 0 && h.samples == h.steps * 32, "{h:?}");
    assert!(net.plans.iter().all(|(_, p)| {
        p.coefficients.iter().zip(&p.excluded).all(|(c, e)| (*c == 0.0) != e.is_empty())
    }));
    // Non-finite norms are the member's own evidence: banned, by id and key.
    let (epoch, _) = net.epoch_of(run);
    let t = net.cluster.next_sync_point(run).unwrap();
    let start = net.cluster.run(run).unwrap().committed_hash;
    let r = net.cluster.sync_commit(net.now, w[1], run, epoch, t, claim(vec![f32::NAN; 4], start));
    assert!(r.is_ok());
    for x in [w[0], w[2], lazy] {
        let _ = net.cluster.sync_commit(net.now, x, run, epoch, t, claim(vec![1.0; 4], start));
    }
    net.run_for(TICK);
    assert_eq!(net.cluster.worker(w[1]).unwrap().banned, vec![run]);
    assert!(
        net.cluster.run(run).unwrap().banned_keys.contains(&net.cluster.worker(w[1]).unwrap().key)
    );
    net.run_for(60_000);
    assert!(!net.epoch_of(run).1.contains(&w[1]), "never assigned again");
}

#[test]
fn tokens_have_uses_joins_are_idempotent_and_ghosts_are_never_assigned() {
    let mut c = Cluster::new(config());
    let (spec, text) = spec(1, 8, 100);
    let run = c.submit(0, &spec, &text, manifest(4)).unwrap();
    let tok = [1u8; 32];
    c.add_token(tok, 10_000, 2);
    let addr = SocketAddr::from(([10, 0, 0, 1], 7000));
    let a = c.join(1, &tok, "ka", "h", addr).unwrap();
    assert_eq!(c.join(2, &tok, "ka", "h", addr).unwrap(), a, "same key, same worker");
    let b = c.join(3, &tok, "kb", "h", addr).unwrap();
    assert_ne!(a, b);
    assert_eq!(c.join(4, &tok, "kc", "h", addr), Err(super::JoinError::UsedUp));
    assert_eq!(c.join(5, &[2u8; 32], "kd", "h", addr), Err(super::JoinError::UnknownToken));
    assert!(matches!(c.join(20_000, &tok, "ka", "h", addr), Err(super::JoinError::Expired(_))));
    // Joined but never connected: never assigned; once it opens a session, it is.
    for t in 0..20 {
        c.heartbeat(100 + t * 100, a, None).unwrap();
        c.tick(100 + t * 100);
    }
    assert!(c.worker(a).unwrap().run.is_none(), "a ghost is not assigned");
    c.session_opened(2_100, a, None, None).unwrap();
    c.tick(2_200);
    assert_eq!(c.worker(a).unwrap().run, Some(run));
}

#[test]
fn ring_address_changes_are_rate_limited() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..2).map(|_| net.join()).collect();
    net.run_for(2_000);
    let epoch = net.epoch_of(run).0;
    let mut refused = 0;
    for i in 0..20u8 {
        let addr = SocketAddr::from(([198, 51, 100, i], 7071));
        if net.cluster.session_opened(net.now, w[0], None, Some(addr)).is_err() {
            refused += 1;
        }
        net.run_for(TICK);
    }
    assert_eq!(refused, 20 - config().max_addr_changes);
    assert!(net.epoch_of(run).0.0 <= epoch.0 + config().max_addr_changes as u64);
}

#[test]
fn metrics_are_validated_and_sums_stay_finite() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..2).map(|_| net.join()).collect();
    net.run_for(2_000);
    let (epoch, _) = net.epoch_of(run);
    let m = |tps: f64, loss: Option<f64>, step: u64| super::Metrics {
        run,
        epoch,
        step,
        loss,
        accuracy: None,
        grad_norm: 0.0,
        tokens_per_sec: tps,
        samples: 0,
        bytes: 0,
        compute_ms: 0.0,
        comm_ms: 0.0,
        idle_ms: 0.0,
        bytes_sent: 0,
        bytes_received: 0,
        param_hash: None,
    };
    let step = net.step(run);
    assert!(net.cluster.metrics(net.now, w[0], &m(f64::MAX, None, step)).is_err());
    assert!(net.cluster.metrics(net.now, w[0], &m(1.0, Some(f64::NAN), step)).is_err());
    assert!(net.cluster.metrics(net.now, w[0], &m(1.0, None, u64::MAX)).is_err());
    net.cluster.metrics(net.now, w[0], &m(super::METRIC_MAX, Some(1.0), step)).unwrap();
    let r = net.cluster.run(run).unwrap();
    assert!(r.tokens_per_sec.is_finite() && r.tokens_per_sec <= super::METRIC_MAX);
}

#[test]
fn checkpoints_count_only_from_members_for_reached_steps() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let w: Vec<WorkerId> = (0..2).map(|_| net.join()).collect();
    net.run_for(2_000);
    let outsider = net.join();
    let step = net.step(run);
    let sha = |c: char| c.to_string().repeat(64);
    let (a, b) = (sha('a'), sha('b'));
    let copy = |uri: &str| super::checkpoints::CheckpointCopy {
        uri: uri.into(),
        sha256: a.clone(),
        model_sha256: b.clone(),
        ..Default::default()
    };
    net.cluster.checkpoint_done(net.now, outsider, run, step, copy("file:///x")).unwrap();
    assert_eq!(net.cluster.run(run).unwrap().latest_checkpoint_step, 0);
    let bad = net.cluster.checkpoint_done(net.now, w[0], run, u64::MAX, copy("file:///x"));
    assert!(bad.is_err());
    // One of two members is no majority: the model is not verified, nothing to fetch.
    net.cluster.checkpoint_done(net.now, w[0], run, step, copy("file:///ok")).unwrap();
    assert_eq!(net.cluster.run(run).unwrap().latest_checkpoint_step, 0);
    assert!(net.cluster.checkpoint_source(run, None).is_err());
    net.cluster.checkpoint_done(net.now, w[1], run, step, copy("file:///ok")).unwrap();
    assert_eq!(net.cluster.run(run).unwrap().latest_checkpoint_step, step);
    let (src, hash) = net.cluster.checkpoint_source(run, None).unwrap();
    assert_eq!((src.step, src.model_sha256.as_str(), src.copies.len()), (step, b.as_str(), 2));
    assert_eq!(hash, net.cluster.run(run).unwrap().committed_hash);
}

#[test]
fn when_nobody_holds_the_recorded_state_the_run_rewinds_to_an_earlier_recorded_one() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 20);
    let _w: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    net.run_for(3_000);
    let recorded = net.step(run);
    assert!(recorded > 3);
    // The members that held the newest state are gone; those left hold an older one.
    net.forget_back_to(recorded - 2);
    net.join();
    net.run_for(2_000);
    assert!(!net.logged(run, "rewinding to step").is_empty(), "{:?}", net.logs);
    let r = net.cluster.run(run).unwrap();
    assert!(r.committed_step >= recorded - 2, "it went on from the rewound state");
    net.run_for(3_000);
    assert!(net.step(run) > recorded, "and beyond");
}

#[test]
fn a_member_that_keeps_accusing_is_kept_out_and_its_first_victim_comes_back() {
    use super::{Fault, FaultKind};
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    // The liar joins first (the tie-break favours it) and accuses every predecessor it gets.
    let liar = net.join();
    let w: Vec<WorkerId> = (0..4).map(|_| net.join()).collect();
    net.run_for(2_000);
    let accuse = |net: &mut Net, victim: WorkerId| {
        let (epoch, members) = net.epoch_of(run);
        assert!(members.contains(&liar) && members.contains(&victim), "{members:?}");
        let f = Fault { peer: Some(victim), kind: FaultKind::Misbehaved, detail: "x" };
        net.cluster.ring_fault(net.now, liar, run, epoch, f);
        net.run_for(2_000);
    };
    accuse(&mut net, w[0]);
    // A tie: the later joiner, the victim, sits out; the liar stays.
    assert_eq!(net.cluster.sitting_out(run).collect::<Vec<_>>(), vec![w[0]]);
    let members = net.epoch_of(run).1;
    assert!(members.contains(&liar) && !members.contains(&w[0]));
    // Its second accusation puts it in more disputes than anyone: it is out, w0 is back.
    accuse(&mut net, w[1]);
    assert_eq!(net.cluster.sitting_out(run).collect::<Vec<_>>(), vec![liar]);
    assert_eq!(sorted(net.epoch_of(run).1), sorted(w.clone()));
    let step = net.step(run);
    net.run_for(10_000);
    assert!(net.step(run) > step, "the run went on");
    assert!(net.cluster.workers().all(|x| x.banned.is_empty()));
}

/// A coordinator restart forgives nothing its verification remembered, rebuilt from the stored
/// commitments and audits: a member's first strike still counts towards its eviction, the data
/// it claimed cannot be claimed again, its contribution cannot be replayed, and it keeps the
/// profile it first committed under.
#[test]
fn a_restart_forgives_no_strike_no_claimed_data_and_no_profile() {
    use super::audits::AuditRecord;
    use super::commitments::{self, CommitmentRecord, Known, Verdict};
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 20);
    let (a, b, c) = (net.join(), net.join(), net.join());
    net.run_for(3_000);
    // What the store holds beside the harness's own records: an accepted claim of `a` naming
    // data, a digest and a profile, and two auditors agreeing it was not what `a` committed.
    let step = net.step(run) + 100;
    let span = Span::granted(7, 0, 0, 8);
    let mut claimed = claim(vec![1.0], Some(hash_of(7)));
    claimed.spans = vec![span.clone()];
    claimed.samples = 8;
    claimed.digest = Some([5; 32]);
    claimed.profile = "cpu|test|threads=1".into();
    let verdict = Verdict::Accepted { coefficient: 1.0 };
    let record =
        CommitmentRecord { step, epoch: Epoch(1), worker: a, claim: claimed.clone(), verdict };
    net.appended.push(Output::Commitment { run, record });
    let audit = AuditRecord {
        id: 1,
        step,
        target: a,
        auditors: vec![b, c],
        wrong: None,
        verdict: "struck".into(),
    };
    net.appended.push(Output::Audit { run, record: audit });
    let restored = restore(&net, net.now);
    let s = restored.audits.standing(run, a).expect("a's standing is back");
    assert_eq!(s.strikes, 1, "{s:?}");
    assert_eq!(s.contributions, 1, "its one claim naming a profile: {s:?}");
    let hot = restored.audits.chance(&runspec::Verification::OFF, run, a, step + 1);
    assert_eq!(hot, 1.0, "still audited at every sync");
    for auditor in [b, c] {
        assert_eq!(restored.audits.standing(run, auditor).map(|s| s.performed), Some(1));
    }
    let book = &restored.claims[&(run, a)];
    assert_eq!(book.profile().map(String::as_str), Some("cpu|test|threads=1"));
    let known = Known { recorded: None, recorded_step: 0, max_samples: 64 };
    let mut reread = claimed.clone();
    reread.digest = Some([6; 32]);
    let err = commitments::check(step + 1, &reread, &known, book, |_| None).unwrap_err();
    assert!(err.contains("again"), "{err}");
    let mut replayed = claimed.clone();
    replayed.spans = vec![Span { from: 8, to: 16, ..span }];
    let err = commitments::check(step + 1, &replayed, &known, book, |_| None).unwrap_err();
    assert!(err.contains("replay"), "{err}");
    // Without the stored records, none of it (the test can fail).
    net.appended.clear();
    let forgetful = restore(&net, net.now);
    assert!(forgetful.audits.standing(run, a).is_none());
    assert!(!forgetful.claims.contains_key(&(run, a)));
}
