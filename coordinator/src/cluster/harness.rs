//! A simulated network for the cluster state machine (raft-rs style): simulated agents on a
//! virtual clock, links that can be cut per worker, crashes, and invariants checked after every
//! single input.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use proto::{Epoch, LeaseId, Liveness, RunId, RunState, WorkerId};

use super::{Cluster, Command, Config, EpochInfo, Millis, Output};
use crate::runfile::RunSpec;
use crate::shards::{Lease, Manifest, ShardInfo};

const TICK: Millis = 100;

/// A simulated worker agent.
#[derive(Debug)]
struct Agent {
    crashed: bool,
    /// Heartbeats are sent only while this is true (for flapping).
    beating: bool,
    next_heartbeat: Millis,
    epoch: Option<EpochInfo>,
    step: u64,
    next_step: Millis,
    lease: Option<(Lease, Millis)>,
    commands: Vec<(Millis, Command)>,
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
    /// Agents whose parameters differ from everyone else's (they report another hash).
    pub(super) diverged: BTreeSet<WorkerId>,
    /// Every run log line: (time, run, line).
    pub(super) logs: Vec<(Millis, RunId, String)>,
}

/// The parameter hash agents in agreement report after `step`.
pub(super) fn hash_of(step: u64) -> String {
    format!("{:016x}", step.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

pub(super) fn spec(min: u32, max: u32, steps: u64) -> (RunSpec, String) {
    let text = crate::testing::synthetic_run_file(min, max, steps)
        .replacen("interval_steps = 100", "interval_steps = 50", 1)
        .replacen("# restart_budget = 5", "restart_budget = 5", 1);
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
        Self {
            cluster: Cluster::new(config),
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
            diverged: BTreeSet::new(),
            logs: Vec::new(),
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
        let id = self.cluster.join(self.now, "sim", SocketAddr::from(([0, 0, 0, 0], 0)));
        self.cluster.session_opened(self.now, id, Some(addr(id))).expect("just joined");
        self.agents.insert(
            id,
            Agent {
                crashed: false,
                beating: true,
                next_heartbeat: self.now + self.heartbeat_every,
                epoch: None,
                step: 0,
                next_step: 0,
                lease: None,
                commands: Vec::new(),
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
            let a = self.agents.get_mut(&id).expect("id from keys");
            let Some(ep) = a.epoch.clone() else { continue };
            if now >= a.next_step {
                a.next_step = now + self.step_every;
                a.step += 1;
                let step = a.step;
                if reachable {
                    let mut hash = hash_of(step);
                    if self.diverged.contains(&id) {
                        hash = hash_of(step ^ 1);
                    }
                    self.cluster.step_committed(now, id, ep.run, ep.epoch, step, &hash);
                    self.check();
                }
            }
            let a = self.agents.get_mut(&id).expect("id from keys");
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
                    if let Ok(Some(lease)) = self.cluster.lease(now, id) {
                        let done = now + self.shard_work;
                        self.agents.get_mut(&id).expect("id from keys").lease = Some((lease, done));
                    }
                    self.check();
                }
                None => {}
            }
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
            };
            match &cmd {
                Command::Epoch(info) => {
                    // The committed step travels with its hash (every agent reports hash_of
                    // unless diverged, and the first report of a step is recorded).
                    if info.committed_step > 0 && self.diverged.is_empty() {
                        assert_eq!(
                            info.committed_hash,
                            hash_of(info.committed_step),
                            "epoch {} of run {}",
                            info.epoch,
                            info.run
                        );
                    }
                    let members = info.members.iter().map(|m| m.worker).collect();
                    if !self.epochs.iter().any(|(_, r, e, _)| *r == info.run && *e == info.epoch) {
                        self.epochs.push((self.now, info.run, info.epoch, members));
                    }
                }
                Command::Abort { epoch, .. } => self.aborts.push((self.now, to, *epoch)),
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
                    a.step = info.committed_step;
                    a.epoch = Some(info);
                }
                Command::Abort { .. } | Command::Stop { .. } => {
                    a.epoch = None;
                    a.lease = None;
                }
                Command::Checkpoint { .. } => {}
            }
        }
    }

    /// The invariants, after every input: the state machine's own, epochs only grow, committed
    /// steps never fall.
    fn check(&mut self) {
        if let Err(e) = self.cluster.check_invariants() {
            panic!("invariant broken at t={}: {e}", self.now);
        }
        for r in self.cluster.runs() {
            let (e, s) = self.high.entry(r.id).or_insert((r.epoch, r.committed_step));
            assert!(r.epoch >= *e, "run {} epoch went back from {e} to {}", r.id, r.epoch);
            assert!(
                r.committed_step >= *s,
                "run {} step fell from {s} to {}",
                r.id,
                r.committed_step
            );
            *e = r.epoch;
            *s = r.committed_step;
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
}

fn config() -> Config {
    Config { suspect_after: 3_000, dead_after: 10_000, readmit_after: 30_000, lease_ttl: 60_000 }
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
fn a_join_makes_a_new_epoch_with_the_newcomer() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    for _ in 0..3 {
        net.join();
    }
    net.run_for(3_000);
    let step = net.step(run);
    let new = net.join();
    net.run_for(TICK);
    let (epoch, members) = net.epoch_of(run);
    assert_eq!(epoch, Epoch(2));
    assert!(members.contains(&new));
    // The newcomer starts from the committed step.
    net.run_for(2_000);
    assert!(net.step(run) >= step);
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
    // Once stable it is readmitted.
    net.run_for(35_000);
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
    // The minority kept stepping in epoch 1 behind the cut; when it heals their reports are
    // stale and ignored (the harness checks the step never falls).
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
    net.run_for(20_000);
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
fn stale_leases_and_completions_are_refused() {
    let mut net = Net::new(config());
    let run = net.submit(1, 1, 1_000_000, 3);
    let w = net.join();
    net.run_for(TICK);
    assert!(net.cluster.run(run).is_some());
    let err = net.cluster.complete(net.now, w, LeaseId(999), 1).unwrap_err();
    assert!(err.to_string().contains("not held"), "{err}");
    let stranger = WorkerId(77);
    assert!(net.cluster.lease(net.now, stranger).is_err());
}

#[test]
fn uptime_counts_connected_time_is_persisted_and_survives_restart() {
    use super::{Dirty, UPTIME_FLUSH_MS};
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
    let dir = tempfile::tempdir().expect("tempdir");
    let store = crate::store::Store::open(&dir.path().join("state.redb")).expect("open");
    let all: BTreeSet<Dirty> = net.cluster.workers().map(|w| Dirty::Worker(w.id)).collect();
    store.persist(&net.cluster, &all).expect("persist");
    drop(store);
    let store = crate::store::Store::open(&dir.path().join("state.redb")).expect("reopen");
    let loaded = store.load().expect("load");
    let later = net.now + 3_600_000;
    let mut c = Cluster::restore(
        config(),
        later,
        loaded.counters,
        loaded.runs,
        loaded.workers,
        loaded.shards,
    );
    assert_eq!(c.uptime(a), Some(ledger_a));
    assert_eq!(c.uptime(b), Some(up(&net, b)));
    c.heartbeat(later + 500, a, None).expect("known");
    assert_eq!(c.uptime(a), Some(ledger_a), "the first heartbeat after a restart only marks");
    c.heartbeat(later + 1_000, a, None).expect("known");
    assert_eq!(c.uptime(a), Some(ledger_a + 500));
}

#[test]
fn the_committed_hash_travels_with_epochs_and_survives_restart() {
    use super::Dirty;
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 20);
    let (a, _b) = (net.join(), net.join());
    net.run_for(5_000);
    let step = net.step(run);
    assert!(step > 0);
    assert_eq!(net.cluster.run(run).unwrap().committed_hash, hash_of(step));
    // A newcomer makes an epoch that carries the hash (deliver() checks every announcement).
    let c = net.join();
    net.run_for(2_000);
    let (epoch, members) = net.epoch_of(run);
    assert!(members.contains(&c));
    let announced = net.agents[&c].epoch.clone().expect("c is in the epoch");
    assert_eq!(announced.epoch, epoch);
    assert_eq!(announced.committed_hash, hash_of(announced.committed_step));
    assert!(announced.committed_step > 0);

    // Through redb and a restart: the hash is back, in the record and in the next announcement.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = crate::store::Store::open(&dir.path().join("state.redb")).expect("open");
    let all: BTreeSet<Dirty> = [Dirty::Run(run), Dirty::Counters]
        .into_iter()
        .chain(net.cluster.workers().map(|w| Dirty::Worker(w.id)))
        .collect();
    store.persist(&net.cluster, &all).expect("persist");
    drop(store);
    let store = crate::store::Store::open(&dir.path().join("state.redb")).expect("reopen");
    let loaded = store.load().expect("load");
    let r = net.cluster.run(run).unwrap();
    let (step, hash) = (r.committed_step, r.committed_hash.clone());
    let mut c2 = Cluster::restore(
        config(),
        net.now,
        loaded.counters,
        loaded.runs,
        loaded.workers,
        loaded.shards,
    );
    assert_eq!(c2.run(run).unwrap().committed_hash, hash);
    c2.session_opened(net.now, a, None).expect("known");
    match c2.poll_output() {
        Some(Output::ToWorker(to, Command::Epoch(info))) => {
            assert_eq!(to, a);
            assert_eq!((info.committed_step, info.committed_hash), (step, hash));
        }
        other => panic!("expected the epoch again, got {other:?}"),
    }
}

#[test]
fn a_member_with_another_hash_for_the_committed_step_is_reported_not_fatal() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 20);
    let (a, b) = (net.join(), net.join());
    net.run_for(3_000);
    assert!(net.logs.is_empty(), "agreeing members log nothing: {:?}", net.logs);
    // b's parameters drift: every step it reports after a has, it reports another hash.
    net.diverged.insert(b);
    net.run_for(3_000);
    let r = net.cluster.run(run).unwrap();
    assert_eq!(r.state, RunState::Running);
    let (_, _, line) = net.logs.iter().find(|(_, r, _)| *r == run).expect("a divergence line");
    assert!(line.contains("diverged at step"), "{line}");
    assert!(line.contains(&a.to_string()) || line.contains(&b.to_string()), "{line}");
    // Both hashes of that step are named.
    let step: u64 = line
        .split("diverged at step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .expect("the line names the step");
    assert!(line.contains(&hash_of(step)) && line.contains(&hash_of(step ^ 1)), "{line}");
    assert!(net.cluster.run(run).unwrap().message.contains("diverged"));
    // The committed step still only grows, and recorded hashes are first reports.
    assert!(net.step(run) > 0);
}

#[test]
fn reports_of_the_committed_step_fill_in_an_unknown_hash_and_ignore_outsiders() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 20);
    let (a, b) = (net.join(), net.join());
    net.run_for(TICK);
    let (epoch, _) = net.epoch_of(run);
    let now = net.now;
    let c = &mut net.cluster;
    let step = c.run(run).unwrap().committed_step + 10;
    c.step_committed(now, a, run, epoch, step, "");
    assert_eq!(c.run(run).unwrap().committed_hash, "");
    c.step_committed(now, b, run, epoch, step, &hash_of(step));
    assert_eq!(c.run(run).unwrap().committed_hash, hash_of(step), "the unknown hash is filled in");
    // A stranger, or an old epoch, changes nothing and logs nothing.
    c.step_committed(now, WorkerId(99), run, epoch, step, &hash_of(1));
    c.step_committed(now, a, run, Epoch(epoch.0 + 5), step, &hash_of(1));
    assert_eq!(c.run(run).unwrap().committed_hash, hash_of(step));
    while let Some(out) = c.poll_output() {
        assert!(!matches!(out, Output::Log { .. }), "{out:?}");
    }
}

#[test]
fn a_member_reported_for_a_bad_contribution_is_evicted_for_good() {
    let mut net = Net::new(config());
    let run = net.submit(2, 8, 1_000_000, 50);
    let ids: Vec<WorkerId> = (0..3).map(|_| net.join()).collect();
    net.run_for(3_000);
    let (epoch, members) = net.epoch_of(run);
    assert_eq!(sorted(members), sorted(ids.clone()));
    // Reports from a non-member, about oneself, or of another epoch change nothing.
    let outsider = net.join();
    net.cluster.member_fault(net.now, outsider, run, epoch, ids[2], "x");
    net.cluster.member_fault(net.now, ids[2], run, epoch, ids[2], "x");
    net.cluster.member_fault(net.now, ids[0], run, Epoch(epoch.0 + 7), ids[2], "x");
    assert!(net.cluster.worker(ids[2]).unwrap().banned.is_empty());
    let (epoch, _) = net.epoch_of(run);
    net.cluster.member_fault(net.now, ids[0], run, epoch, ids[2], "non-finite contribution");
    net.run_for(TICK);
    let (after, members) = net.epoch_of(run);
    assert!(after > epoch);
    assert!(!members.contains(&ids[2]), "{members:?}");
    let (_, _, line) = net.logs.iter().find(|(_, r, _)| *r == run).expect("an eviction line");
    let want = format!("{} evicted: non-finite contribution (reported by {})", ids[2], ids[0]);
    assert_eq!(line, &want);
    assert_eq!(net.cluster.run(run).unwrap().restarts, 1);
    // It heartbeats on, but is never assigned to this run again.
    net.run_for(5_000);
    assert!(!net.epoch_of(run).1.contains(&ids[2]));
    assert_eq!(net.cluster.worker(ids[2]).unwrap().banned, vec![run]);
}
