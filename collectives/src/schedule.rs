//! The ring schedule, sans-IO.
//!
//! A [`RingPlan`] says which part of the buffer every rank owns and which chunk travels where at
//! every step; a [`RingSchedule`] is the state machine of one all-reduce on one rank: it takes
//! "this chunk arrived" events and answers with the [`Action`]s the driver must perform (reduce,
//! finalize, store, send). It performs no IO, so the whole ring can be simulated in a test by
//! passing messages between N schedules in any order (see the tests at the bottom).
//!
//! # The algorithm
//!
//! The buffer of `len` elements is split into `N` contiguous *segments* whose lengths differ by at
//! most one. Each segment is split into *chunks* of at most `chunk_elems` elements; chunks are
//! the unit of pipelining, so several are in flight on every hop at once.
//!
//! * Reduce-scatter, steps `0..N-1`: at step `s`, rank `r` sends segment `(r - s) mod N` to rank
//!   `r + 1` and receives segment `(r - s - 1) mod N` from rank `r - 1`, which it adds into its
//!   own copy. After the last step rank `r` holds the full reduction of segment `(r + 1) mod N`:
//!   it *owns* that segment, finalizes it (average, quantization) and keeps the finalized values.
//! * All-gather, steps `0..N-1`: at step `s`, rank `r` sends segment `(r + 1 - s) mod N` and
//!   receives segment `(r - s) mod N`, which it stores as received.
//!
//! Dependencies are per chunk: chunk `c` of a step can be sent as soon as chunk `c` of the
//! previous step has arrived, so the steps overlap and a long link stays full.
//!
//! Every rank sends `2(N-1)/N · len` elements and the operation takes `2(N-1)` latency steps.

use std::ops::Range;

use thiserror::Error;

/// Which half of the ring all-reduce a transfer belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Partial sums travel the ring and are accumulated.
    ReduceScatter,
    /// Finalized segments travel the ring and are stored.
    AllGather,
}

/// How a buffer is cut into segments and chunks for a ring of `world` ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingPlan {
    world: usize,
    rank: usize,
    len: usize,
    chunk_elems: usize,
}

impl RingPlan {
    /// Plans an operation over `len` elements for `rank` in a ring of `world` ranks.
    ///
    /// `chunk_elems` is the largest chunk, in elements; it is clamped to at least 1.
    pub fn new(
        world: usize,
        rank: usize,
        len: usize,
        chunk_elems: usize,
    ) -> Result<Self, PlanError> {
        if world == 0 {
            return Err(PlanError::EmptyRing);
        }
        if rank >= world {
            return Err(PlanError::RankOutOfRange { rank, world });
        }
        Ok(Self { world, rank, len, chunk_elems: chunk_elems.max(1) })
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn chunk_elems(&self) -> usize {
        self.chunk_elems
    }

    /// Steps per phase: `N - 1`.
    pub fn steps(&self) -> usize {
        self.world - 1
    }

    /// The element range of segment `segment`. The first `len % N` segments are one longer.
    pub fn segment_range(&self, segment: usize) -> Range<usize> {
        debug_assert!(segment < self.world);
        let base = self.len / self.world;
        let extra = self.len % self.world;
        let start = segment * base + segment.min(extra);
        let end = start + base + usize::from(segment < extra);
        start..end
    }

    /// Number of non-empty chunks in `segment` (0 for an empty segment).
    pub fn chunk_count(&self, segment: usize) -> usize {
        self.segment_range(segment).len().div_ceil(self.chunk_elems)
    }

    /// The element range (in the whole buffer) of chunk `chunk` of segment `segment`.
    pub fn chunk_range(&self, segment: usize, chunk: usize) -> Range<usize> {
        let seg = self.segment_range(segment);
        let start = seg.start + chunk * self.chunk_elems;
        debug_assert!(start < seg.end, "chunk {chunk} of segment {segment} is out of range");
        start..(start + self.chunk_elems).min(seg.end)
    }

    /// The segment this rank sends at `step` of `phase`.
    pub fn send_segment(&self, phase: Phase, step: usize) -> usize {
        let n = self.world;
        match phase {
            Phase::ReduceScatter => (self.rank + n - step % n) % n,
            Phase::AllGather => (self.rank + 1 + n - step % n) % n,
        }
    }

    /// The segment this rank receives at `step` of `phase`.
    pub fn recv_segment(&self, phase: Phase, step: usize) -> usize {
        let n = self.world;
        match phase {
            Phase::ReduceScatter => (self.rank + 2 * n - 1 - step % n) % n,
            Phase::AllGather => (self.rank + n - step % n) % n,
        }
    }

    /// The segment this rank holds fully reduced after reduce-scatter.
    pub fn owned_segment(&self) -> usize {
        (self.rank + 1) % self.world
    }

    /// The rank that owns `segment` after reduce-scatter.
    pub fn owner_of(&self, segment: usize) -> usize {
        (segment + self.world - 1) % self.world
    }

    /// Elements this rank sends in one all-reduce (both phases).
    pub fn elements_sent(&self) -> usize {
        (0..self.steps())
            .map(|s| {
                self.segment_range(self.send_segment(Phase::ReduceScatter, s)).len()
                    + self.segment_range(self.send_segment(Phase::AllGather, s)).len()
            })
            .sum()
    }
}

/// Why a plan could not be made.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("a ring needs at least one rank")]
    EmptyRing,
    #[error("rank {rank} is outside a ring of {world} ranks")]
    RankOutOfRange { rank: usize, world: usize },
}

/// One chunk on the wire: where in the schedule it belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId {
    pub phase: Phase,
    pub step: usize,
    pub chunk: usize,
}

/// What the driver must do next, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Encode the working values of `range` and send them to the next rank as `id`.
    Send { id: ChunkId, range: Range<usize> },
    /// Add the payload received as `id` into the working values of `range`.
    Reduce { id: ChunkId, range: Range<usize> },
    /// `range` of the owned segment is fully reduced: finalize it (average, quantize, keep the
    /// dequantized values) and send the encoded bytes to the next rank as `send`, if any.
    Finalize { range: Range<usize>, send: Option<ChunkId> },
    /// Store the payload received as `id` into `range` and forward the same bytes as `forward`,
    /// if any.
    Store { id: ChunkId, range: Range<usize>, forward: Option<ChunkId> },
}

/// A received chunk that the schedule did not expect.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("chunk {id:?} is outside the schedule (world {world}, len {len})")]
    Unexpected { id: ChunkId, world: usize, len: usize },
    #[error("chunk {id:?} arrived twice")]
    Duplicate { id: ChunkId },
}

/// The state of one all-reduce on one rank.
#[derive(Debug)]
pub struct RingSchedule {
    plan: RingPlan,
    /// Received flags, indexed by `(phase, step, chunk)` flattened.
    received: Vec<bool>,
    outstanding: usize,
    /// Largest chunk count over all segments: the stride of `received`.
    stride: usize,
}

impl RingSchedule {
    pub fn new(plan: RingPlan) -> Self {
        let stride = (0..plan.world).map(|s| plan.chunk_count(s)).max().unwrap_or(0);
        let steps = plan.steps();
        let outstanding = (0..steps)
            .map(|s| {
                plan.chunk_count(plan.recv_segment(Phase::ReduceScatter, s))
                    + plan.chunk_count(plan.recv_segment(Phase::AllGather, s))
            })
            .sum();
        Self { received: vec![false; 2 * steps * stride], outstanding, stride, plan }
    }

    pub fn plan(&self) -> &RingPlan {
        &self.plan
    }

    /// True once every expected chunk has arrived and been acted on.
    pub fn is_complete(&self) -> bool {
        self.outstanding == 0
    }

    /// The actions that start the operation: the first reduce-scatter sends, or, in a ring of
    /// one, finalizing the whole buffer.
    pub fn start(&self) -> Vec<Action> {
        let plan = &self.plan;
        if plan.world == 1 {
            return (0..plan.chunk_count(0))
                .map(|c| Action::Finalize { range: plan.chunk_range(0, c), send: None })
                .collect();
        }
        let seg = plan.send_segment(Phase::ReduceScatter, 0);
        (0..plan.chunk_count(seg))
            .map(|chunk| Action::Send {
                id: ChunkId { phase: Phase::ReduceScatter, step: 0, chunk },
                range: plan.chunk_range(seg, chunk),
            })
            .collect()
    }

    /// Chunk `id` arrived from the previous rank: what to do with it.
    pub fn on_receive(&mut self, id: ChunkId) -> Result<Vec<Action>, ScheduleError> {
        let plan = &self.plan;
        let steps = plan.steps();
        let unexpected = || ScheduleError::Unexpected { id, world: plan.world, len: plan.len };
        if id.step >= steps {
            return Err(unexpected());
        }
        let seg = plan.recv_segment(id.phase, id.step);
        if id.chunk >= plan.chunk_count(seg) {
            return Err(unexpected());
        }
        let phase_index = match id.phase {
            Phase::ReduceScatter => 0,
            Phase::AllGather => 1,
        };
        let slot = (phase_index * steps + id.step) * self.stride + id.chunk;
        if std::mem::replace(&mut self.received[slot], true) {
            return Err(ScheduleError::Duplicate { id });
        }
        self.outstanding -= 1;
        let range = plan.chunk_range(seg, id.chunk);
        let last = id.step + 1 == steps;
        let next = |phase, step| Some(ChunkId { phase, step, chunk: id.chunk });
        let actions = match (id.phase, last) {
            (Phase::ReduceScatter, false) => vec![
                Action::Reduce { id, range: range.clone() },
                Action::Send { id: ChunkId { step: id.step + 1, ..id }, range },
            ],
            (Phase::ReduceScatter, true) => vec![
                Action::Reduce { id, range: range.clone() },
                Action::Finalize { range, send: next(Phase::AllGather, 0) },
            ],
            (Phase::AllGather, false) => {
                vec![Action::Store { id, range, forward: next(Phase::AllGather, id.step + 1) }]
            }
            (Phase::AllGather, true) => vec![Action::Store { id, range, forward: None }],
        };
        Ok(actions)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, seq::SliceRandom};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn segments_tile_the_buffer() {
        for world in 1..=16 {
            for len in [0, 1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 97, 1000, 1009] {
                let plan = RingPlan::new(world, 0, len, 3).unwrap();
                let mut next = 0;
                for s in 0..world {
                    let r = plan.segment_range(s);
                    assert_eq!(r.start, next, "world {world} len {len} segment {s}");
                    assert!(r.len() == len / world || r.len() == len / world + 1);
                    let mut chunk_next = r.start;
                    for c in 0..plan.chunk_count(s) {
                        let cr = plan.chunk_range(s, c);
                        assert_eq!(cr.start, chunk_next);
                        assert!(!cr.is_empty() && cr.len() <= 3);
                        chunk_next = cr.end;
                    }
                    assert_eq!(chunk_next, r.end);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn neighbours_agree_on_what_travels() {
        for world in 1..=16 {
            for rank in 0..world {
                let me = RingPlan::new(world, rank, 100, 7).unwrap();
                let prev = RingPlan::new(world, (rank + world - 1) % world, 100, 7).unwrap();
                for step in 0..me.steps() {
                    for phase in [Phase::ReduceScatter, Phase::AllGather] {
                        assert_eq!(me.recv_segment(phase, step), prev.send_segment(phase, step));
                    }
                }
                // The segment reduced last is the one owned; it is the first all-gathered.
                if world > 1 {
                    let last = me.steps() - 1;
                    assert_eq!(me.recv_segment(Phase::ReduceScatter, last), me.owned_segment());
                    assert_eq!(me.send_segment(Phase::AllGather, 0), me.owned_segment());
                }
                assert_eq!(me.owner_of(me.owned_segment()), rank);
            }
        }
    }

    #[test]
    fn bad_plans_are_refused() {
        assert_eq!(RingPlan::new(0, 0, 10, 1), Err(PlanError::EmptyRing));
        assert_eq!(
            RingPlan::new(3, 3, 10, 1),
            Err(PlanError::RankOutOfRange { rank: 3, world: 3 })
        );
    }

    #[test]
    fn elements_sent_match_the_ring_formula() {
        for world in 1..=16usize {
            let len = world * 1000;
            let plan = RingPlan::new(world, 0, len, 64).unwrap();
            assert_eq!(plan.elements_sent(), 2 * (world - 1) * len / world);
        }
    }

    #[test]
    fn unexpected_and_duplicate_chunks_are_errors() {
        let plan = RingPlan::new(3, 0, 9, 2).unwrap();
        let mut s = RingSchedule::new(plan);
        let id = ChunkId { phase: Phase::ReduceScatter, step: 0, chunk: 0 };
        s.on_receive(id).unwrap();
        assert_eq!(s.on_receive(id), Err(ScheduleError::Duplicate { id }));
        let far = ChunkId { phase: Phase::AllGather, step: 2, chunk: 0 };
        assert!(matches!(s.on_receive(far), Err(ScheduleError::Unexpected { .. })));
        let big = ChunkId { phase: Phase::AllGather, step: 0, chunk: 99 };
        assert!(matches!(s.on_receive(big), Err(ScheduleError::Unexpected { .. })));
    }

    /// Runs a whole ring of schedules over integer data, delivering messages in a random order
    /// (FIFO per link is not assumed), and returns each rank's final buffer.
    fn simulate(world: usize, len: usize, chunk: usize, seed: u64) -> Vec<Vec<i64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let inputs: Vec<Vec<i64>> =
            (0..world).map(|_| (0..len).map(|_| rng.random_range(-1000..1000)).collect()).collect();
        let mut work = inputs.clone();
        let mut scheds: Vec<RingSchedule> = (0..world)
            .map(|r| RingSchedule::new(RingPlan::new(world, r, len, chunk).unwrap()))
            .collect();
        // In flight: (destination, id, payload).
        let mut wire: Vec<(usize, ChunkId, Vec<i64>)> = Vec::new();
        let mut pending: VecDeque<(usize, Action, Option<Vec<i64>>)> = VecDeque::new();
        for (r, s) in scheds.iter().enumerate() {
            pending.extend(s.start().into_iter().map(|a| (r, a, None)));
        }
        loop {
            while let Some((r, action, payload)) = pending.pop_front() {
                let next = (r + 1) % world;
                match action {
                    Action::Send { id, range } => wire.push((next, id, work[r][range].to_vec())),
                    Action::Reduce { range, .. } => {
                        for (w, p) in work[r][range].iter_mut().zip(payload.as_ref().unwrap()) {
                            *w += p;
                        }
                    }
                    Action::Finalize { range, send } => {
                        if let Some(id) = send {
                            wire.push((next, id, work[r][range].to_vec()));
                        }
                    }
                    Action::Store { range, forward, .. } => {
                        let p = payload.unwrap();
                        work[r][range].copy_from_slice(&p);
                        if let Some(id) = forward {
                            wire.push((next, id, p));
                        }
                    }
                }
            }
            if wire.is_empty() {
                break;
            }
            wire.shuffle(&mut rng);
            let (dst, id, payload) = wire.pop().unwrap();
            for a in scheds[dst].on_receive(id).unwrap() {
                pending.push_back((dst, a, Some(payload.clone())));
            }
        }
        for s in &scheds {
            assert!(s.is_complete());
        }
        let expected: Vec<i64> = (0..len).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
        for w in &work {
            assert_eq!(w, &expected);
        }
        work
    }

    #[test]
    fn simulated_ring_sums_for_all_small_worlds_and_awkward_lengths() {
        for world in 1..=16 {
            for len in [0, 1, 2, 3, 7, 13, 16, 17, 31, 101] {
                for chunk in [1, 2, 5, 64] {
                    simulate(world, len, chunk, (world * 1000 + len) as u64);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn simulated_ring_sums_for_any_shape(world in 1usize..=16, len in 0usize..300,
                                             chunk in 1usize..40, seed: u64) {
            simulate(world, len, chunk, seed);
        }
    }
}
