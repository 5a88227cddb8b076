//! The trainer's view of the ring: blocking calls on its own thread, run on the agent's tokio
//! runtime.

use std::time::{Duration, Instant};

use collectives::group::{Group, OpError, OpStats, ReduceOp};
use collectives::{Bounds, Compression};
use tokio::runtime::Handle;

/// What the trainer needs from a collective group. Every call is all-or-nothing (see
/// `collectives`): on error the buffer is unchanged.
pub trait Comm {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums `buf` over the group.
    fn all_reduce(&mut self, buf: &mut [f32], compression: Compression) -> Result<(), OpError>;
    /// Sums `buf` over the group with every partial sum checked against `bounds` (see
    /// `collectives::Group::all_reduce_bounded`).
    fn all_reduce_bounded(
        &mut self,
        buf: &mut [f32],
        compression: Compression,
        bounds: &Bounds,
    ) -> Result<(), OpError>;
    /// Copies `buf` of `root` to every member.
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), OpError>;
    /// Bytes sent and received, and time spent, so far.
    fn traffic(&self) -> Traffic;
}

/// Cumulative traffic of a communicator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub busy: Duration,
}

impl Traffic {
    fn add(&mut self, s: &OpStats, busy: Duration) {
        self.bytes_sent += s.bytes_sent;
        self.bytes_received += s.bytes_received;
        self.busy += busy;
    }
}

/// A [`Comm`] over a `collectives` group, blocking the calling (non-runtime) thread.
#[derive(Debug)]
pub struct RingComm {
    group: Group,
    rt: Handle,
    traffic: Traffic,
}

impl RingComm {
    pub fn new(group: Group, rt: Handle) -> Self {
        Self { group, rt, traffic: Traffic::default() }
    }

    /// QUIC's measured round-trip time to each ring neighbour, by worker id (members whose
    /// name is not a worker's are left out).
    pub fn neighbour_rtts(&self) -> Vec<(u64, std::time::Duration)> {
        let names = self.group.members();
        self.group
            .neighbour_rtts()
            .into_iter()
            .filter_map(|(rank, rtt)| {
                let id = proto::WorkerId::from_member_name(names.get(rank)?)?;
                Some((id.0, rtt))
            })
            .collect()
    }

    /// Closes the group gracefully (flushes what was sent).
    pub fn close(self) {
        let Self { group, rt, .. } = self;
        rt.block_on(group.close());
    }
}

impl Comm for RingComm {
    fn rank(&self) -> usize {
        self.group.rank()
    }

    fn world(&self) -> usize {
        self.group.world()
    }

    fn all_reduce(&mut self, buf: &mut [f32], compression: Compression) -> Result<(), OpError> {
        let t = Instant::now();
        let s = self.rt.block_on(self.group.all_reduce(buf, ReduceOp::Sum, compression))?;
        self.traffic.add(&s, t.elapsed());
        Ok(())
    }

    fn all_reduce_bounded(
        &mut self,
        buf: &mut [f32],
        compression: Compression,
        bounds: &Bounds,
    ) -> Result<(), OpError> {
        let t = Instant::now();
        let s = self.rt.block_on(self.group.all_reduce_bounded(
            buf,
            ReduceOp::Sum,
            compression,
            bounds,
        ))?;
        self.traffic.add(&s, t.elapsed());
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<(), OpError> {
        let t = Instant::now();
        let s = self.rt.block_on(self.group.broadcast(buf, root))?;
        self.traffic.add(&s, t.elapsed());
        Ok(())
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}

/// A group of one: every collective is the identity (and plans itself, see [`SoloPlan`]).
#[derive(Debug, Default)]
pub struct Solo;

impl Comm for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _: &mut [f32], _: Compression) -> Result<(), OpError> {
        Ok(())
    }
    fn all_reduce_bounded(
        &mut self,
        _: &mut [f32],
        _: Compression,
        _: &Bounds,
    ) -> Result<(), OpError> {
        Ok(())
    }
    fn broadcast(&mut self, _: &mut [u8], _: usize) -> Result<(), OpError> {
        Ok(())
    }
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
}

/// The plan of a group of one: the member takes its whole contribution (for tests and runs
/// without a coordinator).
#[derive(Debug, Default)]
pub struct SoloPlan;

impl crate::trainer::Coordinate for SoloPlan {
    fn plan(
        &mut self,
        c: &crate::trainer::Commitment,
    ) -> Result<crate::trainer::Plan, crate::trainer::TrainError> {
        Ok(crate::trainer::Plan {
            step: c.step,
            coefficients: vec![1.0],
            declared: c.segment_norms.clone(),
        })
    }
}
