//! N ranks' engines on a simulated network, on virtual time.
//!
//! Every rank runs the same script of operations through its own [`Engine`]; a seeded network
//! delivers each frame after its link's latency plus a random delay (QUIC carries every frame on
//! its own stream, so frames overtake each other; a lost packet is a retransmission, that is, a
//! longer delay). Faults are injected at chosen virtual times: a rank crashes (its neighbours
//! hear nothing and time out), a rank is aborted (it closes its connections with the reason), a
//! rank lies about its contribution to a bounded all-reduce, or a rank sends a frame twice. The
//! shell's rules are modelled as `Group` applies them: frames of the next operation are held
//! until it begins, a failed rank closes its connections, a finished rank closes gracefully
//! after its frames are delivered.
//!
//! After every event the simulation checks the guarantees:
//! - all or nothing: a rank completes an operation only once every rank holds its full result;
//! - every rank that completes an operation has the same result, bit for bit, and it is right;
//! - at the end nobody hangs: every rank finished its script, crashed, or failed with a typed
//!   error, and without faults every rank finished.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::engine::{self, Admit, Engine, Event, Frame, Output, PeerError, Side, Sizes};
use super::{Bounds, OpError, ReduceOp, segments};
use crate::wire::Codec;

/// Virtual time, in microseconds.
type Time = u64;

/// How long a crashed rank's neighbours wait before they declare it dead (QUIC's idle timeout).
const IDLE_TIMEOUT: Time = 10_000_000;

#[derive(Clone, Debug)]
enum Op {
    AllReduce { inputs: Vec<Vec<f32>>, reduce: ReduceOp, codec: Codec, bounds: Option<Bounds> },
    Broadcast { root: usize, data: Vec<u8> },
    Barrier,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The rank stops at this time: no more frames, no close.
    Crash { rank: usize, at: Time },
    /// The rank's abort handle fires at this time.
    Abort { rank: usize, at: Time },
    /// In the first bounded all-reduce the rank contributes four times what it declared.
    Liar { rank: usize },
    /// The rank sends its `nth` frame twice.
    Duplicate { rank: usize, nth: usize },
}

#[derive(Debug)]
enum State {
    Running,
    Finished,
    Failed(OpError),
    Crashed,
}

struct Rank {
    engine: Engine,
    state: State,
    /// Index of the next operation of the script to begin.
    next: usize,
    /// Events that arrived while no operation was in flight (the shell's inbox).
    inbox: VecDeque<Event>,
    /// Frames of an operation not begun yet (held unread by the shell's readers).
    held: Vec<Frame>,
    aborted: bool,
    sent: usize,
    outputs: Vec<Output>,
    /// Operations whose full result this rank has held.
    ready: BTreeSet<u64>,
}

#[derive(Debug)]
enum Due {
    Deliver { to: usize, event: Event },
    Begin { rank: usize },
    Fault(Fault),
}

struct Sim {
    rng: ChaCha8Rng,
    now: Time,
    seq: u64,
    queue: BTreeMap<(Time, u64), Due>,
    ranks: Vec<Rank>,
    script: Vec<Op>,
    /// One-way latency of the link from each rank to the next.
    latency: Vec<Time>,
    /// When the link from each rank to the next was closed (frames due later are lost).
    closed: Vec<Option<Time>>,
    connections: usize,
    drop_rate: f64,
    faults: Vec<Fault>,
    /// Who completed each operation, and with what.
    completions: BTreeMap<u64, Vec<(usize, Vec<u8>)>>,
    trace: Vec<String>,
}

impl Sim {
    fn new(seed: u64, world: usize, script: Vec<Op>, faults: Vec<Fault>) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let sizes = Sizes {
            chunk_elems: rng.random_range(1..=24),
            chunk_bytes: rng.random_range(1..=48),
            connections_per_peer: rng.random_range(1..=3),
        };
        let names: Vec<String> = (0..world).map(|r| format!("rank-{r}")).collect();
        let ranks = (0..world)
            .map(|r| Rank {
                engine: Engine::new(7, r, names.clone(), sizes),
                state: State::Running,
                next: 0,
                inbox: VecDeque::new(),
                held: Vec::new(),
                aborted: false,
                sent: 0,
                outputs: Vec::new(),
                ready: BTreeSet::new(),
            })
            .collect();
        let latency = (0..world).map(|_| rng.random_range(1_000..50_000)).collect();
        let drop_rate = if rng.random_bool(0.5) { 0.0 } else { 0.1 };
        let mut sim = Self {
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            ranks,
            script,
            latency,
            closed: vec![None; world],
            connections: sizes.connections_per_peer,
            drop_rate,
            faults: faults.clone(),
            completions: BTreeMap::new(),
            trace: Vec::new(),
        };
        for rank in 0..world {
            let start = sim.rng.random_range(0..20_000);
            sim.at(start, Due::Begin { rank });
        }
        for f in faults {
            match f {
                Fault::Crash { at, .. } | Fault::Abort { at, .. } => sim.at(at, Due::Fault(f)),
                Fault::Liar { .. } | Fault::Duplicate { .. } => {}
            }
        }
        sim
    }

    fn world(&self) -> usize {
        self.ranks.len()
    }

    fn at(&mut self, time: Time, due: Due) {
        self.seq += 1;
        self.queue.insert((time, self.seq), due);
    }

    /// Runs to quiescence, checking the guarantees after every event.
    fn run(mut self) -> Self {
        let mut steps = 0;
        while let Some(((time, _), due)) = self.queue.pop_first() {
            self.now = time;
            steps += 1;
            assert!(steps < 1_000_000, "the simulation does not settle");
            match due {
                Due::Begin { rank } => self.begin(rank),
                Due::Deliver { to, event } => self.deliver(to, event),
                Due::Fault(f) => self.fault(f),
            }
            self.check();
        }
        self.check_settled();
        self
    }

    fn live(&self, rank: usize) -> bool {
        matches!(self.ranks[rank].state, State::Running)
    }

    fn begin(&mut self, rank: usize) {
        if !self.live(rank) {
            return;
        }
        let r = &mut self.ranks[rank];
        let Some(op) = self.script.get(r.next).cloned() else {
            r.state = State::Finished;
            self.trace.push(format!("{}: rank {rank} finished and closes", self.now));
            self.close(rank, PeerError::Closed("group closed".into()), true);
            return;
        };
        r.next += 1;
        let liar = self.faults.contains(&Fault::Liar { rank });
        let before = r.engine.begun();
        let begun = match op {
            Op::AllReduce { inputs, reduce, codec, bounds } => {
                let mut work = inputs[rank].clone();
                if liar && bounds.is_some() {
                    work.iter_mut().for_each(|v| *v *= 4.0);
                }
                r.engine.begin_all_reduce(work, reduce, codec, bounds.as_ref())
            }
            Op::Broadcast { root, data } => {
                let work = if rank == root { data } else { vec![0; data.len()] };
                r.engine.begin_broadcast(work, root)
            }
            Op::Barrier => r.engine.begin_barrier(),
        };
        self.trace.push(format!("{}: rank {rank} begins op {before}: {begun:?}", self.now));
        if let Err(e) = begun {
            return self.fail(rank, e);
        }
        if self.ranks[rank].aborted {
            return self.fail(rank, OpError::Aborted { reason: "abort requested".into() });
        }
        // What waited for this operation: first the inbox, then the held frames.
        let r = &mut self.ranks[rank];
        let mut pending: Vec<Event> = r.inbox.drain(..).collect();
        let held = std::mem::take(&mut r.held);
        pending.extend(held.into_iter().map(Event::Frame));
        self.after(rank);
        for event in pending {
            self.deliver(rank, event);
        }
    }

    fn deliver(&mut self, to: usize, event: Event) {
        if !self.live(to) {
            return;
        }
        let r = &mut self.ranks[to];
        if let Event::Frame(f) = &event {
            match engine::admit(f.header.op, r.engine.begun()) {
                Admit::Now => {}
                Admit::Hold => return r.held.push(f.clone()),
                Admit::Refuse(cause) => {
                    let side = f.side;
                    return self
                        .deliver(to, Event::Failed { side, error: PeerError::Protocol(cause) });
                }
            }
        }
        if !r.engine.in_flight() {
            return r.inbox.push_back(event);
        }
        if let Err(e) = r.engine.handle(event) {
            return self.fail(to, e);
        }
        self.after(to);
    }

    /// Sends what the engine queued; records a completion and schedules the next operation.
    fn after(&mut self, rank: usize) {
        while let Some(t) = self.ranks[rank].engine.poll_transmit() {
            let copies = {
                let r = &mut self.ranks[rank];
                r.sent += 1;
                if self.faults.contains(&Fault::Duplicate { rank, nth: r.sent }) { 2 } else { 1 }
            };
            for _ in 0..copies {
                let frame =
                    Frame { side: Side::Prev, header: t.header, payload: t.payload.clone() };
                self.send(rank, Event::Frame(frame));
            }
        }
        let r = &mut self.ranks[rank];
        if let Some(op) = r.engine.holds_result() {
            r.ready.insert(op);
        }
        if let Some(output) = r.engine.poll_complete() {
            let op = r.engine.begun() - 1;
            self.trace.push(format!("{}: rank {rank} completed op {op}", self.now));
            let bytes = match &output {
                Output::Reduced(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                Output::Broadcast(b) => b.clone(),
                Output::Barrier => Vec::new(),
            };
            r.outputs.push(output);
            self.completions.entry(op).or_default().push((rank, bytes));
            let think = self.rng.random_range(0..5_000);
            self.at(self.now + think, Due::Begin { rank });
        }
    }

    /// Queues `event` from `rank` to its successor, after the link's latency and a random delay.
    fn send(&mut self, rank: usize, event: Event) {
        let world = self.world();
        let lat = self.latency[rank];
        let mut delay = lat + self.rng.random_range(0..=lat);
        if self.drop_rate > 0.0 && self.rng.random_bool(self.drop_rate) {
            delay += 3 * lat;
        }
        let due = self.now + delay;
        if self.closed[rank].is_some_and(|c| c <= due) {
            return;
        }
        self.at(due, Due::Deliver { to: (rank + 1) % world, event });
    }

    fn fail(&mut self, rank: usize, error: OpError) {
        self.trace.push(format!("{}: rank {rank} failed: {error}", self.now));
        let reason = self.ranks[rank].engine.fail(&error);
        self.ranks[rank].state = State::Failed(error);
        self.close(rank, PeerError::Aborted(reason), false);
    }

    fn fault(&mut self, fault: Fault) {
        self.trace.push(format!("{}: {fault:?}", self.now));
        match fault {
            Fault::Crash { rank, .. } if self.live(rank) => {
                self.ranks[rank].state = State::Crashed;
                self.close(
                    rank,
                    PeerError::Lost("no packets within the idle timeout".into()),
                    false,
                );
            }
            Fault::Abort { rank, .. } if self.live(rank) => {
                self.ranks[rank].aborted = true;
                if self.ranks[rank].engine.in_flight() {
                    self.fail(rank, OpError::Aborted { reason: "abort requested".into() });
                }
            }
            _ => {}
        }
    }

    /// Ends `rank`'s connections: each neighbour hears `error` once per connection. A graceful
    /// close comes after every frame already sent; an abort may overtake them (those it
    /// overtakes are lost); a crash is noticed only after the idle timeout.
    fn close(&mut self, rank: usize, error: PeerError, graceful: bool) {
        let world = self.world();
        if world == 1 {
            return;
        }
        let (prev, next) = ((rank + world - 1) % world, (rank + 1) % world);
        let last_frame = self
            .queue
            .iter()
            .filter(
                |(_, d)| matches!(d, Due::Deliver { to, event: Event::Frame(_) } if *to == next),
            )
            .map(|((t, _), _)| *t)
            .max()
            .unwrap_or(self.now);
        let (to_next, to_prev) = match &error {
            PeerError::Lost(_) => (self.now + IDLE_TIMEOUT, self.now + IDLE_TIMEOUT),
            _ if graceful => (last_frame + self.latency[rank], self.now + self.latency[prev]),
            _ => (self.now + self.latency[rank], self.now + self.latency[prev]),
        };
        if !graceful {
            self.closed[rank] = Some(to_next);
        }
        for _ in 0..self.connections {
            let e = error.clone();
            self.at(
                to_next,
                Due::Deliver { to: next, event: Event::Failed { side: Side::Prev, error: e } },
            );
            let e = error.clone();
            self.at(
                to_prev,
                Due::Deliver { to: prev, event: Event::Failed { side: Side::Next, error: e } },
            );
        }
    }

    fn check(&self) {
        for (op, done) in &self.completions {
            for (rank, r) in self.ranks.iter().enumerate() {
                assert!(
                    r.ready.contains(op),
                    "op {op} completed on rank {} before rank {rank} held its result",
                    done[0].0
                );
            }
            for (rank, bytes) in done {
                assert_eq!(
                    bytes, &done[0].1,
                    "ranks {rank} and {} completed op {op} with different results",
                    done[0].0
                );
            }
        }
    }

    fn check_settled(&self) {
        for (rank, r) in self.ranks.iter().enumerate() {
            assert!(
                !matches!(r.state, State::Running),
                "rank {rank} hangs (op {} in flight: {})",
                r.engine.begun(),
                r.engine.in_flight()
            );
        }
        if self.faults.is_empty() {
            for (rank, r) in self.ranks.iter().enumerate() {
                assert!(
                    matches!(r.state, State::Finished),
                    "rank {rank} failed without a fault: {:?}",
                    r.state
                );
            }
        }
        // Every result is the right one.
        for (rank, r) in self.ranks.iter().enumerate() {
            for (op, output) in r.outputs.iter().enumerate() {
                let expected = expected(&self.script[op], self.world());
                match (output, expected) {
                    (Output::Reduced(got), Some(Output::Reduced(want))) => {
                        let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                        let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "rank {rank} op {op}: wrong sum");
                    }
                    (got, Some(want)) => assert_eq!(got, &want, "rank {rank} op {op}"),
                    (_, None) => {}
                }
            }
        }
    }

    fn errors(&self) -> Vec<(usize, &OpError)> {
        let mut errors = Vec::new();
        for (i, r) in self.ranks.iter().enumerate() {
            if let State::Failed(e) = &r.state {
                errors.push((i, e));
            }
        }
        errors
    }
}

/// The exact result of an operation, where the codec makes it exact (small integers in f32
/// and bf16 sums; f32 averages); `None` where only agreement between ranks is checked.
fn expected(op: &Op, world: usize) -> Option<Output> {
    match op {
        Op::AllReduce { inputs, reduce, codec, .. } => {
            let exact = *codec == Codec::F32 || (*codec == Codec::Bf16 && *reduce == ReduceOp::Sum);
            if !exact {
                return None;
            }
            let len = inputs[0].len();
            let mut sum: Vec<f32> =
                (0..len).map(|i| inputs.iter().map(|v| v[i]).sum::<f32>()).collect();
            if *reduce == ReduceOp::Average {
                sum.iter_mut().for_each(|v| *v /= world as f32);
            }
            Some(Output::Reduced(sum))
        }
        Op::Broadcast { data, .. } => Some(Output::Broadcast(data.clone())),
        Op::Barrier => Some(Output::Barrier),
    }
}

/// A random script of one to four operations for `world` ranks.
fn script(rng: &mut ChaCha8Rng, world: usize) -> Vec<Op> {
    let count = rng.random_range(1..=4);
    (0..count)
        .map(|_| match rng.random_range(0..5) {
            0..=2 => {
                let len = rng.random_range(0..120);
                let inputs: Vec<Vec<f32>> = (0..world)
                    .map(|_| (0..len).map(|_| rng.random_range(-8i8..=8) as f32).collect())
                    .collect();
                let codec =
                    [Codec::F32, Codec::Bf16, Codec::F16, Codec::Int8Block][rng.random_range(0..4)];
                let reduce = if rng.random_bool(0.5) { ReduceOp::Sum } else { ReduceOp::Average };
                let bounds = rng.random_bool(0.5).then(|| honest_bounds(&inputs));
                Op::AllReduce { inputs, reduce, codec, bounds }
            }
            3 => {
                let len = rng.random_range(0..100);
                let data = (0..len).map(|_| rng.random()).collect();
                Op::Broadcast { root: rng.random_range(0..world), data }
            }
            _ => Op::Barrier,
        })
        .collect()
}

/// Each member's true norm on each segment.
fn honest_bounds(inputs: &[Vec<f32>]) -> Bounds {
    let world = inputs.len();
    let len = inputs[0].len();
    let segs = segments(world, len);
    let norms = inputs
        .iter()
        .map(|v| {
            segs.iter()
                .map(|s| v[s.clone()].iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt())
                .collect()
        })
        .collect();
    Bounds { norms }
}

fn run(seed: u64, world: usize, faults: impl FnOnce(&mut ChaCha8Rng, &[Op]) -> Vec<Fault>) -> Sim {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let script = script(&mut rng, world);
    let faults = faults(&mut rng, &script);
    let sim = Sim::new(seed, world, script, faults);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    match result {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("seed {seed}, world {world}");
            std::panic::resume_unwind(e)
        }
    }
}

#[test]
fn without_faults_every_rank_completes_every_operation_whatever_the_delivery_order() {
    for seed in 0..400 {
        let world = 1 + (seed as usize % 8);
        let sim = run(seed, world, |_, _| Vec::new());
        for r in &sim.ranks {
            assert_eq!(r.outputs.len(), sim.script.len(), "seed {seed}");
        }
    }
}

#[test]
fn a_crash_anywhere_fails_every_survivor_with_a_typed_error_and_nothing_half_done() {
    let mut failures = 0;
    for seed in 0..400 {
        let world = 2 + (seed as usize % 7);
        let sim = run(seed, world, |rng, _| {
            vec![Fault::Crash {
                rank: rng.random_range(0..world),
                at: rng.random_range(0..400_000),
            }]
        });
        for (rank, e) in sim.errors() {
            failures += 1;
            assert!(
                matches!(
                    e,
                    OpError::PeerLost { .. } | OpError::RemoteAbort { .. } | OpError::Broken { .. }
                ),
                "seed {seed}: rank {rank} failed with {e}"
            );
        }
    }
    assert!(failures > 0, "no crash ever struck an operation: the test tests nothing");
}

#[test]
fn an_abort_anywhere_ends_the_operation_on_every_rank() {
    let mut aborted = 0;
    for seed in 0..400 {
        let world = 2 + (seed as usize % 7);
        let sim = run(seed, world, |rng, _| {
            vec![Fault::Abort {
                rank: rng.random_range(0..world),
                at: rng.random_range(0..400_000),
            }]
        });
        let errors = sim.errors();
        if errors.iter().any(|(_, e)| matches!(e, OpError::Aborted { .. })) {
            aborted += 1;
            // The abort reached every rank that had not finished: none is left waiting.
            for (rank, r) in sim.ranks.iter().enumerate() {
                assert!(
                    matches!(r.state, State::Failed(_) | State::Finished),
                    "seed {seed}: rank {rank} is {:?}",
                    r.state
                );
            }
        }
    }
    assert!(aborted > 50, "only {aborted} aborts struck an operation");
}

#[test]
fn a_member_that_sends_more_than_it_declared_is_named_by_its_successor_and_nobody_completes() {
    let mut caught = 0;
    for seed in 0..300 {
        let world = 2 + (seed as usize % 7);
        let liar = seed as usize % world;
        // A script whose first operation is a bounded all-reduce with data on every segment.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let len = rng.random_range(world..120);
        let inputs: Vec<Vec<f32>> = (0..world)
            .map(|_| (0..len).map(|_| rng.random_range(1i8..=8) as f32).collect())
            .collect();
        let bounds = Some(honest_bounds(&inputs));
        let codec = [Codec::F32, Codec::Bf16, Codec::Int8Block][seed as usize % 3];
        let script =
            vec![Op::AllReduce { inputs, reduce: ReduceOp::Sum, codec, bounds }, Op::Barrier];
        let sim = Sim::new(seed, world, script, vec![Fault::Liar { rank: liar }]).run();
        assert!(sim.completions.is_empty(), "seed {seed}: an operation with a liar completed");
        let successor = (liar + 1) % world;
        match &sim.ranks[successor].state {
            State::Failed(OpError::Exceeded { rank, .. }) if *rank == liar => caught += 1,
            other => panic!("seed {seed}: the liar's successor ended {other:?}"),
        }
    }
    assert_eq!(caught, 300);
}

#[test]
fn a_frame_sent_twice_is_a_protocol_error_naming_the_sender() {
    let mut named = 0;
    for seed in 0..300 {
        let world = 2 + (seed as usize % 7);
        let dup = seed as usize % world;
        let sim = run(seed, world, |rng, _| {
            vec![Fault::Duplicate { rank: dup, nth: rng.random_range(1..4) }]
        });
        let successor = (dup + 1) % world;
        if let State::Failed(OpError::Protocol { rank, .. }) = &sim.ranks[successor].state {
            assert_eq!(*rank, dup, "seed {seed}");
            named += 1;
        }
        // Nobody else is blamed for a protocol error.
        for (r, e) in sim.errors() {
            if let OpError::Protocol { rank, .. } = e {
                assert_eq!(*rank, dup, "seed {seed}: rank {r} blamed rank {rank}");
            }
        }
    }
    assert!(named > 100, "only {named} duplicates were caught");
}

#[test]
fn frames_a_peer_sends_ahead_wait_for_their_operation_and_further_ahead_is_refused() {
    assert_eq!(engine::admit(2, 3), Admit::Now);
    assert_eq!(engine::admit(3, 3), Admit::Hold);
    assert!(matches!(engine::admit(4, 3), Admit::Refuse(_)));
}

#[test]
fn a_broken_engine_refuses_every_later_operation() {
    let sizes = Sizes { chunk_elems: 4, chunk_bytes: 4, connections_per_peer: 1 };
    let mut e = Engine::new(1, 0, vec!["a".into(), "b".into()], sizes);
    e.begin_barrier().unwrap();
    let reason = e.fail(&OpError::Aborted { reason: "test".into() });
    assert!(reason.contains("rank 0 (a)"), "{reason}");
    assert!(matches!(e.begin_barrier(), Err(OpError::Broken { .. })));
    assert!(e.poll_transmit().is_none(), "a failed engine sends nothing more");
    let frame = Frame {
        side: Side::Next,
        header: crate::wire::Header {
            kind: crate::wire::Kind::Done,
            epoch: 1,
            op: 0,
            phase: crate::wire::WirePhase::Control,
            codec: Codec::Bytes,
            step: 0,
            chunk: 1,
            len: 0,
        },
        payload: Bytes::new(),
    };
    let mut e = Engine::new(1, 0, vec!["a".into(), "b".into()], sizes);
    e.begin_barrier().unwrap();
    let err = e.handle(Event::Frame(frame)).unwrap_err();
    assert!(matches!(err, OpError::Protocol { rank: 1, .. }), "{err}");
}
