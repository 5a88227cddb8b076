//! The protocol of one rank's operations, sans-IO.
//!
//! An [`Engine`] is everything a rank knows about the operations of its group: which operation
//! comes next, whether the group is broken, and the state of the operation in flight (the ring
//! schedule, the working copy, the hop checks, the commit round). It takes [`Event`]s (a frame
//! from a neighbour, a neighbour's connection ending) and queues [`Transmit`]s (frames for the
//! next rank); it performs no IO and reads no clock. Deadlines and aborts belong to the shell
//! (`Group`), which turns them into [`Engine::fail`]; so does closing the connections once the
//! engine has failed. Because of that, the whole protocol runs in a test on N engines and a
//! simulated network (see `sim.rs`), in any delivery order, with crashes and aborts, on virtual
//! time.
//!
//! # Operation sequencing and early frames
//!
//! Every rank issues the same operations in the same order, numbered from 0. A neighbour may
//! finish operation k and start k + 1 before this rank has begun it: such a frame is *held*
//! unread until this rank begins k + 1 (its reader waits, and QUIC's flow control holds the peer
//! back), see [`admit`]. An honest peer is never two operations ahead, because it cannot finish
//! an operation without this rank's commit token; a frame further ahead is a protocol error.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{Bounds, OpError, ReduceOp};
use crate::codec;
use crate::schedule::{Action, ChunkId, Phase, RingPlan, RingSchedule};
use crate::wire::{Codec, Header, Kind, WirePhase};

/// Which neighbour a frame or a failure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    Prev,
    Next,
}

/// A frame read from a neighbour.
#[derive(Clone, Debug)]
pub(super) struct Frame {
    pub(super) side: Side,
    pub(super) header: Header,
    pub(super) payload: Bytes,
}

/// What the connections report to the engine.
#[derive(Clone, Debug)]
pub(super) enum Event {
    Frame(Frame),
    /// One connection to this neighbour ended, or one of its frames was unreadable.
    Failed {
        side: Side,
        error: PeerError,
    },
}

/// How a connection to a neighbour ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum PeerError {
    /// The peer ended the group normally (`Group::close` or drop).
    Closed(String),
    Lost(String),
    Aborted(String),
    Protocol(String),
}

/// A frame for the next rank, on connection `stripe` modulo the number of connections.
#[derive(Clone, Debug)]
pub(super) struct Transmit {
    pub(super) stripe: usize,
    pub(super) header: Header,
    pub(super) payload: Bytes,
}

/// What a completed operation leaves for its caller.
#[derive(Debug, PartialEq)]
pub(super) enum Output {
    Reduced(Vec<f32>),
    Broadcast(Vec<u8>),
    Barrier,
}

/// What the readers do with a frame of operation `op` when this rank has begun `begun`
/// operations (the frame's payload stays unread until the answer is [`Admit::Now`]).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admit {
    Now,
    /// The next operation: wait until this rank begins it.
    Hold,
    Refuse(String),
}

pub(super) fn admit(op: u64, begun: u64) -> Admit {
    if op < begun {
        Admit::Now
    } else if op == begun {
        Admit::Hold
    } else {
        Admit::Refuse(format!(
            "frame of operation {op} when this rank has begun only {begun} operations"
        ))
    }
}

/// The sizes an engine cuts its operations into.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sizes {
    /// Largest all-reduce chunk, in elements.
    pub(super) chunk_elems: usize,
    /// Largest broadcast chunk, in bytes.
    pub(super) chunk_bytes: usize,
    /// Connections to each neighbour: the previous rank has left only once all have closed.
    pub(super) connections_per_peer: usize,
}

/// The operations of one rank. See the module documentation.
#[derive(Debug)]
pub(super) struct Engine {
    epoch: u64,
    rank: usize,
    names: Vec<String>,
    sizes: Sizes,
    next_op: u64,
    /// Connections from the previous rank that it closed normally.
    prev_closed: usize,
    broken: Option<String>,
    op: Option<Operation>,
    outbox: VecDeque<Transmit>,
}

#[derive(Debug)]
struct Operation {
    id: u64,
    body: Body,
    done: DoneRound,
    commit_sent: bool,
}

#[derive(Debug)]
enum Body {
    AllReduce {
        sched: RingSchedule,
        work: Vec<f32>,
        reduce: ReduceOp,
        codec: Codec,
        checks: Option<HopChecks>,
    },
    Broadcast {
        work: Vec<u8>,
        root: usize,
        /// Which chunks have arrived (empty on the root).
        received: Vec<bool>,
        missing: usize,
    },
    Barrier,
}

impl Body {
    /// True once this rank holds the operation's full result.
    fn complete(&self) -> bool {
        match self {
            Body::AllReduce { sched, .. } => sched.is_complete(),
            Body::Broadcast { missing, .. } => *missing == 0,
            Body::Barrier => true,
        }
    }
}

impl Engine {
    pub(super) fn new(epoch: u64, rank: usize, names: Vec<String>, sizes: Sizes) -> Self {
        debug_assert!(rank < names.len());
        Self {
            epoch,
            rank,
            names,
            sizes,
            next_op: 0,
            prev_closed: 0,
            broken: None,
            op: None,
            outbox: VecDeque::new(),
        }
    }

    pub(super) fn world(&self) -> usize {
        self.names.len()
    }

    fn prev(&self) -> usize {
        (self.rank + self.world() - 1) % self.world()
    }

    fn next(&self) -> usize {
        (self.rank + 1) % self.world()
    }

    /// How many operations this rank has begun: what [`admit`] compares frames against.
    pub(super) fn begun(&self) -> u64 {
        self.next_op
    }

    /// The operation in flight, once this rank holds its full result (it may still wait for
    /// the commit round).
    #[cfg(test)]
    pub(super) fn holds_result(&self) -> Option<u64> {
        self.op.as_ref().filter(|o| o.body.complete()).map(|o| o.id)
    }

    /// Whether an operation is in flight.
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> bool {
        self.op.is_some()
    }

    /// Begins an all-reduce of `work`. `bounds`, if given, are checked at every hop (see
    /// [`Bounds`]). An invalid request fails without taking an operation id.
    pub(super) fn begin_all_reduce(
        &mut self,
        work: Vec<f32>,
        reduce: ReduceOp,
        codec: Codec,
        bounds: Option<&Bounds>,
    ) -> Result<u64, OpError> {
        let world = self.world();
        let plan = RingPlan::new(world, self.rank, work.len(), self.sizes.chunk_elems)
            .map_err(|e| OpError::Invalid(e.to_string()))?;
        if (0..world).any(|s| plan.chunk_count(s) > u32::MAX as usize) {
            return Err(OpError::Invalid(format!("{} elements are too many", work.len())));
        }
        let checks = match bounds {
            Some(b) => Some(HopChecks::new(b, &plan, reduce, codec)?),
            None => None,
        };
        let sched = RingSchedule::new(plan);
        let start = sched.start();
        let id = self.begin(Body::AllReduce { sched, work, reduce, codec, checks })?;
        for action in start {
            self.perform(action, None)?;
        }
        self.progress();
        Ok(id)
    }

    /// Begins a broadcast of `work` from `root` (every rank passes a buffer of the same length).
    pub(super) fn begin_broadcast(&mut self, work: Vec<u8>, root: usize) -> Result<u64, OpError> {
        let world = self.world();
        if root >= world {
            return Err(OpError::Invalid(format!(
                "broadcast root {root} is outside a group of {world}"
            )));
        }
        let count = work.len().div_ceil(self.sizes.chunk_bytes);
        if count > u32::MAX as usize {
            return Err(OpError::Invalid(format!("{} bytes are too many", work.len())));
        }
        let received = vec![false; if self.rank == root { 0 } else { count }];
        let missing = received.len();
        let sends: Vec<Bytes> = if self.rank == root {
            work.chunks(self.sizes.chunk_bytes).map(Bytes::copy_from_slice).collect()
        } else {
            Vec::new()
        };
        let id = self.begin(Body::Broadcast { work, root, received, missing })?;
        for (c, part) in sends.into_iter().enumerate() {
            self.send_broadcast(id, c, part);
        }
        self.progress();
        Ok(id)
    }

    /// Begins a barrier: the commit round alone.
    pub(super) fn begin_barrier(&mut self) -> Result<u64, OpError> {
        let id = self.begin(Body::Barrier)?;
        self.progress();
        Ok(id)
    }

    fn begin(&mut self, body: Body) -> Result<u64, OpError> {
        if let Some(reason) = &self.broken {
            return Err(OpError::Broken { reason: reason.clone() });
        }
        debug_assert!(self.op.is_none(), "an operation is already in flight");
        let id = self.next_op;
        self.next_op += 1;
        self.op = Some(Operation {
            id,
            body,
            done: DoneRound::new(self.world(), self.rank),
            commit_sent: false,
        });
        Ok(id)
    }

    /// The next frame to send, if any.
    pub(super) fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    /// The operation in flight, if it has completed on this rank: every member holds its full
    /// result.
    pub(super) fn poll_complete(&mut self) -> Option<Output> {
        let op = self.op.as_ref()?;
        if !(op.body.complete() && op.done.complete()) {
            return None;
        }
        Some(match self.op.take()?.body {
            Body::AllReduce { work, .. } => Output::Reduced(work),
            Body::Broadcast { work, .. } => Output::Broadcast(work),
            Body::Barrier => Output::Barrier,
        })
    }

    /// Marks the group broken by `error` (of the operation in flight, or of one that could not
    /// begin) and returns the reason to close every connection with: the neighbours fail at
    /// once instead of waiting for a timeout. Every later operation fails with
    /// [`OpError::Broken`].
    pub(super) fn fail(&mut self, error: &OpError) -> String {
        self.op = None;
        self.outbox.clear();
        self.broken.get_or_insert_with(|| error.to_string());
        format!("rank {} ({}): {error}", self.rank, self.names[self.rank])
    }

    /// Takes one event of the operation in flight. An error fails the operation (the caller
    /// then calls [`Engine::fail`]).
    pub(super) fn handle(&mut self, event: Event) -> Result<(), OpError> {
        let f = match event {
            Event::Failed { side, error } => return self.on_peer_failed(side, error),
            Event::Frame(f) => f,
        };
        if f.side == Side::Next {
            return Err(self.protocol(
                Side::Next,
                "sent a frame to its ring predecessor (frames travel forward only)".into(),
            ));
        }
        let Some(op) = self.op.as_ref() else {
            return Err(self.protocol(f.side, "frame outside an operation".into()));
        };
        if f.header.op != op.id {
            let (got, id) = (f.header.op, op.id);
            return Err(
                self.protocol(f.side, format!("frame of operation {got} during operation {id}"))
            );
        }
        match f.header.kind {
            Kind::Done => self.on_done(&f)?,
            Kind::Data => self.on_data(f)?,
        }
        self.progress();
        Ok(())
    }

    fn on_peer_failed(&mut self, side: Side, error: PeerError) -> Result<(), OpError> {
        let rank = self.side_rank(side);
        let peer = self.names[rank].clone();
        Err(match error {
            // Nothing is ever received from the next rank, and a next rank that closed normally
            // has everything it needed from this one; a later send to it fails on its own.
            PeerError::Closed(_) if side == Side::Next => return Ok(()),
            PeerError::Closed(reason) => {
                self.prev_closed += 1;
                if self.prev_closed < self.sizes.connections_per_peer {
                    return Ok(());
                }
                OpError::PeerLost {
                    rank,
                    peer,
                    cause: format!("left the group ({reason}) before this operation completed"),
                }
            }
            PeerError::Lost(cause) => OpError::PeerLost { rank, peer, cause },
            PeerError::Aborted(reason) => OpError::RemoteAbort { rank, peer, reason },
            PeerError::Protocol(cause) => OpError::Protocol { rank, peer, cause },
        })
    }

    fn on_data(&mut self, f: Frame) -> Result<(), OpError> {
        let op = self.op.as_mut().expect("checked by the caller");
        let (id, world, rank) = (op.id, self.names.len(), self.rank);
        match &mut op.body {
            Body::Barrier => Err(self.protocol(f.side, "data frame during a barrier".into())),
            Body::AllReduce { sched, codec, .. } => {
                let phase = match f.header.phase {
                    WirePhase::ReduceScatter => Phase::ReduceScatter,
                    WirePhase::AllGather => Phase::AllGather,
                    p => return Err(self.protocol(f.side, format!("{p:?} frame in an all-reduce"))),
                };
                if f.header.codec != *codec {
                    let (got, ours) = (f.header.codec, *codec);
                    return Err(self.protocol(
                        f.side,
                        format!("sent {got:?} but this all-reduce uses {ours:?}: members disagree on dtype or compression"),
                    ));
                }
                let chunk = ChunkId {
                    phase,
                    step: usize::from(f.header.step),
                    chunk: f.header.chunk as usize,
                };
                let actions = match sched.on_receive(chunk) {
                    Ok(a) => a,
                    Err(e) => return Err(self.protocol(f.side, e.to_string())),
                };
                for action in actions {
                    self.perform(action, Some(&f.payload))?;
                }
                Ok(())
            }
            Body::Broadcast { work, root, received, missing } => {
                let chunk = self.sizes.chunk_bytes;
                let count = work.len().div_ceil(chunk);
                let c = f.header.chunk as usize;
                let range = (c * chunk).min(work.len())..((c + 1) * chunk).min(work.len());
                let valid = f.header.phase == WirePhase::Broadcast
                    && f.header.codec == Codec::Bytes
                    && c < received.len()
                    && f.payload.len() == range.len();
                if !valid {
                    let n = f.payload.len();
                    return Err(self.protocol(
                        f.side,
                        format!("unexpected broadcast frame (chunk {c} of {count}, {n} bytes): members disagree on the buffer length or root"),
                    ));
                }
                if std::mem::replace(&mut received[c], true) {
                    return Err(self.protocol(f.side, format!("broadcast chunk {c} arrived twice")));
                }
                *missing -= 1;
                work[range].copy_from_slice(&f.payload);
                let forward = (rank + 1) % world != *root;
                if forward {
                    self.send_broadcast(id, c, f.payload);
                }
                Ok(())
            }
        }
    }

    /// Sends this rank's commit token once it holds the full result.
    fn progress(&mut self) {
        let Some(op) = self.op.as_mut() else { return };
        if op.body.complete() && !op.commit_sent {
            op.commit_sent = true;
            let id = op.id;
            self.send_done(id, self.rank);
        }
    }

    fn on_done(&mut self, f: &Frame) -> Result<(), OpError> {
        let origin = f.header.chunk as usize;
        let op = self.op.as_mut().expect("checked by the caller");
        let id = op.id;
        if !op.done.record(origin) {
            return Err(
                self.protocol(f.side, format!("unexpected commit token from rank {origin}"))
            );
        }
        if self.next() != origin {
            self.send_done(id, origin);
        }
        Ok(())
    }

    /// Performs one action of the ring schedule, on the payload received for it if any.
    fn perform(&mut self, action: Action, payload: Option<&Bytes>) -> Result<(), OpError> {
        let world = self.world() as f32;
        let op = self.op.as_mut().expect("an all-reduce is in flight");
        let id = op.id;
        let Body::AllReduce { work, reduce, codec, checks, .. } = &mut op.body else {
            unreachable!("schedule actions belong to an all-reduce");
        };
        let codec = *codec;
        let payload = payload.cloned().unwrap_or_default();
        let mut received = None;
        let mut send = None;
        let decoded = match action {
            Action::Send { id: chunk, range } => {
                send = Some((chunk, Bytes::from(codec::encode(codec, &work[range]))));
                Ok(())
            }
            Action::Reduce { id: chunk, range } => {
                codec::decode_add_sumsq(codec, &payload, &mut work[range])
                    .map(|sumsq| received = Some((chunk, sumsq)))
            }
            Action::Finalize { range, send: next } => {
                let values = &mut work[range];
                if *reduce == ReduceOp::Average {
                    values.iter_mut().for_each(|v| *v /= world);
                }
                match next {
                    // Encode once; keep exactly what the others will decode.
                    Some(chunk) => {
                        let bytes = codec::encode(codec, values);
                        let r = codec::decode_into(codec, &bytes, values);
                        send = Some((chunk, Bytes::from(bytes)));
                        r
                    }
                    None => Ok(()),
                }
            }
            Action::Store { id: chunk, range, forward } => {
                let r = codec::decode_into_sumsq(codec, &payload, &mut work[range])
                    .map(|sumsq| received = Some((chunk, sumsq)));
                if let Some(next) = forward {
                    send = Some((next, payload));
                }
                r
            }
        };
        if let Err(e) = decoded {
            return Err(self.protocol(Side::Prev, e.to_string()));
        }
        if let (Some(checks), Some((chunk, sumsq))) = (checks.as_mut(), received)
            && let Err(detail) = checks.record(chunk, sumsq)
        {
            let rank = self.prev();
            return Err(OpError::Exceeded { rank, peer: self.names[rank].clone(), detail });
        }
        if let Some((chunk, payload)) = send {
            self.send_data(id, chunk, codec, payload);
        }
        Ok(())
    }

    fn send_done(&mut self, op: u64, origin: usize) {
        if self.world() == 1 {
            return;
        }
        let header = Header {
            kind: Kind::Done,
            epoch: self.epoch,
            op,
            phase: WirePhase::Control,
            codec: Codec::Bytes,
            step: 0,
            chunk: origin as u32,
            len: 0,
        };
        self.outbox.push_back(Transmit { stripe: 0, header, payload: Bytes::new() });
    }

    fn send_data(&mut self, op: u64, id: ChunkId, codec: Codec, payload: Bytes) {
        let header = Header {
            kind: Kind::Data,
            epoch: self.epoch,
            op,
            phase: id.phase.into(),
            codec,
            step: id.step as u16,
            chunk: id.chunk as u32,
            len: payload.len() as u32,
        };
        self.outbox.push_back(Transmit { stripe: id.chunk + id.step, header, payload });
    }

    fn send_broadcast(&mut self, op: u64, chunk: usize, payload: Bytes) {
        let header = Header {
            kind: Kind::Data,
            epoch: self.epoch,
            op,
            phase: WirePhase::Broadcast,
            codec: Codec::Bytes,
            step: 0,
            chunk: chunk as u32,
            len: payload.len() as u32,
        };
        self.outbox.push_back(Transmit { stripe: chunk, header, payload });
    }

    fn side_rank(&self, side: Side) -> usize {
        match side {
            Side::Prev => self.prev(),
            Side::Next => self.next(),
        }
    }

    fn protocol(&self, side: Side, cause: String) -> OpError {
        let rank = self.side_rank(side);
        OpError::Protocol { rank, peer: self.names[rank].clone(), cause }
    }
}

/// The hop checks of one bounded all-reduce, per phase and step.
#[derive(Debug)]
struct HopChecks {
    reduce_scatter: Vec<Hop>,
    all_gather: Vec<Hop>,
}

/// One received segment: its bound and what has arrived of it.
#[derive(Debug)]
struct Hop {
    segment: usize,
    bound: f64,
    chunks: usize,
    arrived: usize,
    sumsq: f64,
}

impl HopChecks {
    /// What every received segment of a bounded all-reduce may weigh.
    fn new(
        bounds: &Bounds,
        plan: &RingPlan,
        reduce: ReduceOp,
        codec: Codec,
    ) -> Result<Self, OpError> {
        let (world, rank) = (plan.world(), plan.rank());
        bounds.check(world).map_err(OpError::Invalid)?;
        let growth = codec::norm_growth(codec);
        let hop = |phase: Phase, step: usize| {
            let segment = plan.recv_segment(phase, step);
            // Reduce-scatter step s carries the contributions of the s + 1 ranks before this
            // one, encoded s + 1 times; the all-gather carries the whole sum, encoded once per
            // rank on its way to the owner and once more by the owner.
            let (contributors, encodings) = match phase {
                Phase::ReduceScatter => (step + 1, step + 1),
                Phase::AllGather => (world, world),
            };
            let declared: f64 = (1..=contributors)
                .map(|back| bounds.norms[(rank + world - back) % world][segment])
                .sum();
            let mut bound = declared * growth.powi(encodings as i32);
            if phase == Phase::AllGather && reduce == ReduceOp::Average {
                bound /= world as f64;
            }
            Hop { segment, bound, chunks: plan.chunk_count(segment), arrived: 0, sumsq: 0.0 }
        };
        let steps = plan.steps();
        Ok(Self {
            reduce_scatter: (0..steps).map(|s| hop(Phase::ReduceScatter, s)).collect(),
            all_gather: (0..steps).map(|s| hop(Phase::AllGather, s)).collect(),
        })
    }

    /// A chunk arrived with these squared values; once its segment is complete, checks it.
    fn record(&mut self, id: ChunkId, sumsq: f64) -> Result<(), String> {
        let (phase, hops) = match id.phase {
            Phase::ReduceScatter => ("reduce-scatter", &mut self.reduce_scatter),
            Phase::AllGather => ("all-gather", &mut self.all_gather),
        };
        let Some(hop) = hops.get_mut(id.step) else { return Ok(()) };
        hop.arrived += 1;
        hop.sumsq += sumsq;
        if hop.arrived < hop.chunks {
            return Ok(());
        }
        let norm = hop.sumsq.sqrt();
        // Written so that NaN fails too; the tiny absolute slack covers all-zero segments.
        if norm <= hop.bound + 1e-30 {
            return Ok(());
        }
        Err(format!(
            "{phase} step {} of segment {}: norm {norm:.6e}, its contributors declared at most {:.6e}",
            id.step, hop.segment, hop.bound
        ))
    }
}

/// The commit round's bookkeeping: which ranks' tokens have arrived.
#[derive(Debug)]
struct DoneRound {
    seen: Vec<bool>,
    missing: usize,
}

impl DoneRound {
    fn new(world: usize, rank: usize) -> Self {
        let mut seen = vec![false; world];
        seen[rank] = true;
        Self { seen, missing: world - 1 }
    }

    /// Records `origin`'s token; false if it is out of range, this rank's own, or a repeat.
    fn record(&mut self, origin: usize) -> bool {
        match self.seen.get_mut(origin) {
            Some(s) if !*s => {
                *s = true;
                self.missing -= 1;
                true
            }
            _ => false,
        }
    }

    fn complete(&self) -> bool {
        self.missing == 0
    }
}
