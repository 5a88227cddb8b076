//! A group: the ring of one epoch, its QUIC connections, and the collective operations over it.
//!
//! # Life of a group
//!
//! [`Group::join`] binds this rank's UDP socket, dials the next rank (`connections_per_peer`
//! connections) and accepts the same number from the previous rank, all under mutual TLS
//! restricted to the epoch's members. Operations then run one at a time (`&mut self`); every
//! rank must issue the same operations in the same order. [`Group::close`] ends the group
//! gracefully; dropping it closes the connections at once.
//!
//! # All or nothing
//!
//! Operations work on a private copy and write the caller's buffer only on success. After the
//! data phase, a commit round passes a `Done` token from every rank around the ring; a rank
//! completes only once it holds the tokens of all others, that is, once every member holds the
//! full result. On any failure (deadline, lost peer, malformed frame, abort) the rank closes its
//! connections with the reason, so its neighbours fail at once and close theirs: the failure
//! runs around the ring in a few hops instead of waiting for timeouts. A failed group is
//! unusable; the control plane forms a new epoch. The window the commit round cannot close is a
//! rank dying between forwarding the last token and its neighbour receiving it (the two
//! generals' problem); the worker's parameter hash, checked at every epoch change, catches it.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{AsyncUdpSocket, Connection, ConnectionError, Endpoint, Runtime, VarInt};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::codec::{self, Compression, Element};
use crate::io::{self, NetRuntime};
use crate::schedule::{Action, ChunkId, Phase, RingPlan, RingSchedule};
use crate::tls::{self, Identity, TlsError, TrustAnchor};
use crate::transport::{self, NetConfig, PortLease};
use crate::wan::{LinkCondition, WanSocket};
use crate::wire::{Codec, FrameError, HEADER_LEN, Header, Kind, WirePhase};

/// Application close code: the group ended normally.
const CLOSE_DONE: u32 = 0;
/// Application close code: this rank failed an operation; the reason follows.
const CLOSE_ABORT: u32 = 1;
/// Application close code: the connecting member is not this rank's ring neighbour.
const CLOSE_NOT_NEIGHBOUR: u32 = 2;

/// Frames (and peer failures) read but not yet taken by the operation: the readers wait when it
/// is full, and QUIC's flow control then holds the peer back.
const INBOX: usize = 1024;

/// One member of an epoch: its name (as in its certificate) and where it listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub addr: SocketAddr,
}

/// Link emulation applied to everything this rank sends (see [`crate::wan`]).
#[derive(Clone, Debug)]
pub struct Emulation {
    pub condition: LinkCondition,
    pub seed: u64,
}

/// Everything a rank needs to form the ring of one epoch.
#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub epoch: u64,
    /// Members in ring order.
    pub members: Vec<Member>,
    pub rank: usize,
    pub net: NetConfig,
    pub emulation: Option<Emulation>,
    /// A hold on the endpoint's port that outlives the group, so that its owner can free the
    /// port for the next group while this one's connections still drain (see [`PortLease`]).
    pub port: Option<PortLease>,
}

/// Why a group could not be formed.
#[derive(Debug, Error)]
pub enum JoinError {
    #[error("invalid group: {0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("peer {peer} refused the connection or was refused: {reason}")]
    Refused { peer: String, reason: String },
    #[error("peer {peer} did not connect within {waited:?}{}", fmt_refusals(.refusals))]
    Timeout { peer: String, waited: Duration, refusals: Vec<String> },
}

fn fmt_refusals(refusals: &[String]) -> String {
    if refusals.is_empty() {
        String::new()
    } else {
        format!("; refused meanwhile: {}", refusals.join("; "))
    }
}

/// Why an operation failed. In every case the caller's buffer is unchanged.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OpError {
    #[error("lost peer {peer} (rank {rank}): {cause}")]
    PeerLost { rank: usize, peer: String, cause: String },
    #[error("peer {peer} (rank {rank}) aborted: {reason}")]
    RemoteAbort { rank: usize, peer: String, reason: String },
    #[error("peer {peer} (rank {rank}) broke the protocol: {cause}")]
    Protocol { rank: usize, peer: String, cause: String },
    /// What the peer sent is larger than its contributors declared they would send (see
    /// [`Bounds`]): the peer, or someone before it that it failed to check, lied.
    #[error("peer {peer} (rank {rank}) sent more than declared: {detail}")]
    Exceeded { rank: usize, peer: String, detail: String },
    #[error("aborted: {reason}")]
    Aborted { reason: String },
    #[error("operation {op} missed its deadline of {deadline:?}")]
    Timeout { op: u64, deadline: Duration },
    #[error("group unusable after an earlier failure ({reason})")]
    Broken { reason: String },
    #[error("invalid operation: {0}")]
    Invalid(String),
}

/// What one operation moved and how long it took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub elapsed: Duration,
}

/// Reduction applied by [`Group::all_reduce`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReduceOp {
    #[default]
    Sum,
    /// Sum divided by the world size (by the owner of each segment, once).
    Average,
}

/// Cancels the operation in flight, and every later one, of a group. Cheap to clone and to
/// call from any thread; the first reason given wins.
#[derive(Clone, Debug, Default)]
pub struct AbortHandle {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl AbortHandle {
    pub fn abort(&self, reason: impl Into<String>) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert_with(|| reason.into());
        }
        self.token.cancel();
    }

    pub fn is_aborted(&self) -> bool {
        self.token.is_cancelled()
    }

    fn reason(&self) -> String {
        self.reason.lock().ok().and_then(|r| r.clone()).unwrap_or_else(|| "abort requested".into())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Prev,
    Next,
}

struct Frame {
    side: Side,
    header: Header,
    payload: Bytes,
}

enum Event {
    Frame(Frame),
    Failed { side: Side, error: PeerError },
}

enum PeerError {
    /// The peer ended the group normally ([`Group::close`] or drop).
    Closed(String),
    Lost(String),
    Aborted(String),
    Protocol(String),
}

enum Out {
    Frame {
        header: Header,
        payload: Bytes,
    },
    /// Reply once every earlier frame is written and the control frames acknowledged.
    Flush(oneshot::Sender<()>),
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// The ring of one epoch. See the module documentation.
pub struct Group {
    epoch: u64,
    rank: usize,
    names: Vec<String>,
    net: NetConfig,
    endpoint: Endpoint,
    connections: Vec<Connection>,
    senders: Vec<mpsc::UnboundedSender<Out>>,
    inbox: mpsc::Receiver<Event>,
    next_op: u64,
    /// How many operations this rank has begun (`next_op`), for the readers: a frame of an
    /// operation not begun yet waits unread, and one further ahead is a protocol error.
    begun: watch::Sender<u64>,
    /// Where the network side runs (see [`crate::io`]).
    net_runtime: tokio::runtime::Handle,
    /// Connections from the previous rank that it closed normally.
    prev_closed: usize,
    broken: Option<String>,
    abort: AbortHandle,
    counters: Arc<Counters>,
    tasks: JoinSet<()>,
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Group")
            .field("epoch", &self.epoch)
            .field("rank", &self.rank)
            .field("world", &self.names.len())
            .field("next_op", &self.next_op)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Group {
    /// Forms the ring of one epoch, binding `members[rank].addr`. Must run inside a tokio
    /// runtime.
    pub async fn join(
        spec: GroupSpec,
        anchor: &TrustAnchor,
        identity: &Identity,
    ) -> Result<Self, JoinError> {
        Self::join_with_socket(spec, anchor, identity, None).await
    }

    /// Like [`Group::join`], on an already bound socket (tests bind port 0 first and hand the
    /// addresses around).
    pub async fn join_with_socket(
        spec: GroupSpec,
        anchor: &TrustAnchor,
        identity: &Identity,
        socket: Option<std::net::UdpSocket>,
    ) -> Result<Self, JoinError> {
        Self::join_on(spec, anchor, identity, socket, io::handle().clone()).await
    }

    /// Like [`Group::join_with_socket`], with the network side (QUIC endpoint, connections,
    /// frame readers and writers) on the runtime `net` instead of the process's network
    /// runtime. Tests use it to kill one rank's network abruptly, as a process death would, by
    /// shutting its runtime down.
    pub async fn join_on(
        spec: GroupSpec,
        anchor: &TrustAnchor,
        identity: &Identity,
        socket: Option<std::net::UdpSocket>,
        net_runtime: tokio::runtime::Handle,
    ) -> Result<Self, JoinError> {
        let GroupSpec { epoch, members, rank, net, emulation, port } = spec;
        net.check().map_err(JoinError::Config)?;
        let world = members.len();
        if rank >= world {
            return Err(JoinError::Config(format!("rank {rank} is outside a group of {world}")));
        }
        let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
        for (i, n) in names.iter().enumerate() {
            tls::check_member_name(n)?;
            if names[..i].contains(n) {
                return Err(JoinError::Config(format!("member name {n:?} appears twice")));
            }
        }
        if world > usize::from(u16::MAX) {
            return Err(JoinError::Config(format!(
                "{world} members; at most {} are supported",
                u16::MAX
            )));
        }

        let transport = Arc::new(net.transport());
        let server_tls = tls::server_config(anchor, identity, &names)?;
        let server_tls = QuicServerConfig::try_from(server_tls)
            .map_err(|e| JoinError::Config(format!("TLS server configuration: {e}")))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(transport.clone());
        server.migration(false);
        let client_tls = QuicClientConfig::try_from(tls::client_config(anchor, identity)?)
            .map_err(|e| JoinError::Config(format!("TLS client configuration: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
        client.transport_config(transport);

        let addr = members[rank].addr;
        let bind_err = |source| JoinError::Bind { addr, source };
        let socket = match socket {
            Some(s) => s,
            None => transport::bind(addr, net.socket_buffer).map_err(bind_err)?,
        };
        // Sockets, timers, drivers and the emulation's pump all live on the network runtime
        // (see `crate::io`), whatever runtime the caller is on.
        let runtime = NetRuntime::new(net_runtime.clone());
        let mut udp: Arc<dyn AsyncUdpSocket> = runtime.wrap_udp_socket(socket).map_err(bind_err)?;
        if let Some(port) = &port {
            udp = port.wrap(udp).map_err(bind_err)?;
        }
        if let Some(e) = &emulation {
            let _in = net_runtime.enter();
            udp = WanSocket::new(udp, e.condition.clone(), e.seed ^ rank as u64);
        }
        let mut endpoint =
            Endpoint::new_with_abstract_socket(net.endpoint_config(), Some(server), udp, runtime)
                .map_err(bind_err)?;
        endpoint.set_default_client_config(client);

        let (events, inbox) = mpsc::channel(INBOX);
        let mut group = Group {
            epoch,
            rank,
            names,
            endpoint,
            connections: Vec::new(),
            senders: Vec::new(),
            inbox,
            next_op: 0,
            begun: watch::Sender::new(0),
            net_runtime,
            prev_closed: 0,
            broken: None,
            abort: AbortHandle::default(),
            counters: Arc::default(),
            tasks: JoinSet::new(),
            net,
        };
        if world == 1 {
            return Ok(group);
        }
        let deadline = Instant::now() + group.net.connect_timeout;
        let next = &members[(rank + 1) % world];
        // On a failure, whatever was connected hears why (an abort, not a departure) before
        // the connections are dropped: a neighbour must not blame this member for a failure
        // that was another's.
        let endpoint = &group.endpoint;
        let abort = |e: JoinError| {
            let reason = truncate(&format!("forming the ring failed: {e}"), 1000);
            endpoint.close(VarInt::from_u32(CLOSE_ABORT), reason.as_bytes());
            e
        };
        let (dialed, accepted) = tokio::try_join!(
            async {
                dial(endpoint, next, epoch, group.net.connections_per_peer, deadline)
                    .await
                    .map_err(abort)
            },
            async {
                accept(
                    endpoint,
                    epoch,
                    &group.names,
                    group.prev(),
                    group.net.connections_per_peer,
                    deadline,
                )
                .await
                .map_err(abort)
            },
        )?;
        group.start_tasks(dialed, accepted, events);
        debug!(epoch, rank, world, "group formed");
        Ok(group)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.names.len()
    }

    pub fn members(&self) -> &[String] {
        &self.names
    }

    /// This endpoint's local address (useful when bound to port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// A handle that aborts the operation in flight and every later one.
    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    /// Bytes sent and received over the group's lifetime (payload and headers).
    pub fn bytes(&self) -> (u64, u64) {
        (self.counters.sent.load(Ordering::Relaxed), self.counters.received.load(Ordering::Relaxed))
    }

    fn prev(&self) -> usize {
        (self.rank + self.world() - 1) % self.world()
    }

    fn next(&self) -> usize {
        (self.rank + 1) % self.world()
    }

    fn side_rank(&self, side: Side) -> usize {
        match side {
            Side::Prev => self.prev(),
            Side::Next => self.next(),
        }
    }

    fn start_tasks(
        &mut self,
        dialed: Vec<Connection>,
        accepted: Vec<Connection>,
        events: mpsc::Sender<Event>,
    ) {
        let limits = Limits { max_payload: self.net.max_payload(), epoch: self.epoch };
        let net = &self.net_runtime.clone();
        for (side, conns) in [(Side::Next, &dialed), (Side::Prev, &accepted)] {
            for conn in conns {
                let reader = Reader {
                    conn: conn.clone(),
                    side,
                    limits,
                    events: events.clone(),
                    counters: self.counters.clone(),
                    begun: self.begun.subscribe(),
                };
                self.tasks.spawn_on(reader.run(), net);
            }
        }
        for conn in &dialed {
            let (tx, rx) = mpsc::unbounded_channel();
            self.senders.push(tx);
            let (conn, events, counters) = (conn.clone(), events.clone(), self.counters.clone());
            self.tasks.spawn_on(send_loop(conn, rx, events, counters), net);
        }
        // Every legitimate neighbour is connected: later arrivals are refused.
        let endpoint = self.endpoint.clone();
        self.tasks.spawn_on(
            async move {
                while let Some(incoming) = endpoint.accept().await {
                    debug!(remote = %incoming.remote_address(), "refusing connection to a formed group");
                    incoming.refuse();
                }
            },
            net,
        );
        self.connections = dialed.into_iter().chain(accepted).collect();
    }

    /// All-reduces `buf` across the group. On success every rank holds bitwise-identical
    /// values; on failure `buf` is unchanged.
    pub async fn all_reduce<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
        compression: Compression,
    ) -> Result<OpStats, OpError> {
        self.all_reduce_with(buf, op, compression, None).await
    }

    /// Like [`Group::all_reduce`], with every partial sum checked as it travels: each member
    /// declared (in `bounds`) the norm of its contribution on every segment, and a rank that
    /// receives a partial sum larger than its contributors declared (allowing for the codec's
    /// rounding at every hop) fails the operation with [`OpError::Exceeded`], naming its
    /// predecessor, who either lied or forwarded a lie without checking it. So a member that
    /// sends more than it declared is caught by its successor, and nothing reaches anyone's
    /// buffer. An honest ring never trips the check: the triangle inequality bounds every
    /// partial sum by its contributors' norms.
    pub async fn all_reduce_bounded<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
        compression: Compression,
        bounds: &Bounds,
    ) -> Result<OpStats, OpError> {
        self.all_reduce_with(buf, op, compression, Some(bounds)).await
    }

    async fn all_reduce_with<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
        compression: Compression,
        bounds: Option<&Bounds>,
    ) -> Result<OpStats, OpError> {
        let codec = codec::wire_codec(T::DTYPE, compression);
        let checks = match bounds {
            Some(b) => Some(self.hop_checks(b, buf.len(), op, codec)?),
            None => None,
        };
        let mut work: Vec<f32> = buf.iter().map(|v| v.to_f32()).collect();
        let start = self.begin()?;
        let guard = self.guard(start.id);
        let result = guard.run(self.all_reduce_inner(start.id, &mut work, op, codec, checks)).await;
        let stats = self.finish(start, result)?;
        for (b, w) in buf.iter_mut().zip(&work) {
            *b = T::from_f32(*w);
        }
        Ok(stats)
    }

    /// Copies `buf` of rank `root` into `buf` of every rank. Every rank must pass a buffer of
    /// the same length. On failure `buf` is unchanged.
    pub async fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<OpStats, OpError> {
        if root >= self.world() {
            return Err(OpError::Invalid(format!(
                "broadcast root {root} is outside a group of {}",
                self.world()
            )));
        }
        let mut work = buf.to_vec();
        let start = self.begin()?;
        let guard = self.guard(start.id);
        let result = guard.run(self.broadcast_inner(start.id, &mut work, root)).await;
        let stats = self.finish(start, result)?;
        buf.copy_from_slice(&work);
        Ok(stats)
    }

    /// Returns once every rank has called `barrier`.
    pub async fn barrier(&mut self) -> Result<(), OpError> {
        let start = self.begin()?;
        let guard = self.guard(start.id);
        let result = guard.run(self.commit_round(start.id)).await;
        self.finish(start, result).map(|_| ())
    }

    /// Ends the group gracefully: waits (briefly) until what this rank sent has been received,
    /// then closes the connections.
    pub async fn close(mut self) {
        let grace = self.net.rtt * 4 + Duration::from_secs(1);
        let flushes: Vec<_> = self
            .senders
            .iter()
            .filter_map(|tx| {
                let (done, wait) = oneshot::channel();
                tx.send(Out::Flush(done)).ok().map(|_| wait)
            })
            .collect();
        let _ = tokio::time::timeout(grace, futures::future::join_all(flushes)).await;
        self.close_all(CLOSE_DONE, "group closed");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    fn close_all(&mut self, code: u32, reason: &str) {
        for c in &self.connections {
            c.close(VarInt::from_u32(code), reason.as_bytes());
        }
        self.endpoint.close(VarInt::from_u32(code), reason.as_bytes());
    }

    /// Starts an operation: refuses if the group is broken, else takes the next operation id.
    fn begin(&mut self) -> Result<OpStart, OpError> {
        if let Some(reason) = &self.broken {
            return Err(OpError::Broken { reason: reason.clone() });
        }
        let id = self.next_op;
        self.next_op += 1;
        self.begun.send_replace(self.next_op);
        Ok(OpStart { id, started: Instant::now(), before: self.bytes() })
    }

    fn guard(&self, op: u64) -> OpGuard {
        OpGuard { abort: self.abort.clone(), deadline: self.net.op_deadline, op }
    }

    /// Ends an operation: a failure breaks the group and, by closing every connection with the
    /// reason, tells the neighbours at once.
    fn finish(&mut self, start: OpStart, result: Result<(), OpError>) -> Result<OpStats, OpError> {
        match result {
            Ok(()) => {
                let after = self.bytes();
                Ok(OpStats {
                    bytes_sent: after.0 - start.before.0,
                    bytes_received: after.1 - start.before.1,
                    elapsed: start.started.elapsed(),
                })
            }
            Err(e) => {
                warn!(epoch = self.epoch, rank = self.rank, op = start.id, error = %e, "collective failed");
                let reason = format!("rank {} ({}): {e}", self.rank, self.names[self.rank]);
                self.broken = Some(e.to_string());
                self.close_all(CLOSE_ABORT, &truncate(&reason, 1000));
                Err(e)
            }
        }
    }

    /// What every received segment of a bounded all-reduce may weigh (see [`Bounds`]).
    fn hop_checks(
        &self,
        bounds: &Bounds,
        len: usize,
        reduce: ReduceOp,
        codec: Codec,
    ) -> Result<HopChecks, OpError> {
        let world = self.world();
        bounds.check(world).map_err(OpError::Invalid)?;
        let plan = RingPlan::new(world, self.rank, len, self.net.chunk_elems())
            .map_err(|e| OpError::Invalid(e.to_string()))?;
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
                .map(|back| bounds.norms[(self.rank + world - back) % world][segment])
                .sum();
            let mut bound = declared * growth.powi(encodings as i32);
            if phase == Phase::AllGather && reduce == ReduceOp::Average {
                bound /= world as f64;
            }
            Hop { segment, bound, chunks: plan.chunk_count(segment), arrived: 0, sumsq: 0.0 }
        };
        let steps = plan.steps();
        Ok(HopChecks {
            reduce_scatter: (0..steps).map(|s| hop(Phase::ReduceScatter, s)).collect(),
            all_gather: (0..steps).map(|s| hop(Phase::AllGather, s)).collect(),
        })
    }

    async fn all_reduce_inner(
        &mut self,
        op: u64,
        work: &mut [f32],
        reduce: ReduceOp,
        codec: Codec,
        mut checks: Option<HopChecks>,
    ) -> Result<(), OpError> {
        let plan = RingPlan::new(self.world(), self.rank, work.len(), self.net.chunk_elems())
            .map_err(|e| OpError::Invalid(e.to_string()))?;
        if (0..self.world()).any(|s| plan.chunk_count(s) > u32::MAX as usize) {
            return Err(OpError::Invalid(format!("{} elements are too many", work.len())));
        }
        let mut sched = RingSchedule::new(plan);
        let world = self.world() as f32;
        let mut pending: VecDeque<(Action, Option<Bytes>)> =
            sched.start().into_iter().map(|a| (a, None)).collect();
        let mut done = DoneRound::new(self.world(), self.rank);
        let mut commit_sent = false;
        loop {
            while let Some((action, payload)) = pending.pop_front() {
                let received = self.perform(op, codec, work, action, payload, reduce, world)?;
                if let (Some(checks), Some((id, sumsq))) = (checks.as_mut(), received) {
                    checks.record(id, sumsq).map_err(|detail| self.exceeded(detail))?;
                }
            }
            if sched.is_complete() && !commit_sent {
                self.send_done(op, self.rank);
                commit_sent = true;
            }
            if sched.is_complete() && done.complete() {
                return Ok(());
            }
            let f = self.next_frame(op).await?;
            match f.header.kind {
                Kind::Done => self.on_done(op, &mut done, &f)?,
                Kind::Data => {
                    let phase = match f.header.phase {
                        WirePhase::ReduceScatter => Phase::ReduceScatter,
                        WirePhase::AllGather => Phase::AllGather,
                        p => {
                            return Err(
                                self.protocol(f.side, format!("{p:?} frame in an all-reduce"))
                            );
                        }
                    };
                    if f.header.codec != codec {
                        return Err(self.protocol(
                            f.side,
                            format!("sent {:?} but this all-reduce uses {codec:?}: members disagree on dtype or compression", f.header.codec),
                        ));
                    }
                    let id = ChunkId {
                        phase,
                        step: usize::from(f.header.step),
                        chunk: f.header.chunk as usize,
                    };
                    let actions =
                        sched.on_receive(id).map_err(|e| self.protocol(f.side, e.to_string()))?;
                    pending.extend(actions.into_iter().map(|a| (a, Some(f.payload.clone()))));
                }
            }
        }
    }

    /// Performs one action of the schedule; for a received chunk, returns its id and the sum of
    /// the squares of its decoded values (for the hop checks).
    #[allow(clippy::too_many_arguments)]
    fn perform(
        &mut self,
        op: u64,
        codec: Codec,
        work: &mut [f32],
        action: Action,
        payload: Option<Bytes>,
        reduce: ReduceOp,
        world: f32,
    ) -> Result<Option<(ChunkId, f64)>, OpError> {
        let bad_len = |g: &Self, e: codec::LengthMismatch| g.protocol(Side::Prev, e.to_string());
        match action {
            Action::Send { id, range } => {
                let bytes = Bytes::from(codec::encode(codec, &work[range]));
                self.send_data(op, id, codec, bytes);
            }
            Action::Reduce { id, range } => {
                let p = payload.unwrap_or_default();
                let sumsq = codec::decode_add_sumsq(codec, &p, &mut work[range])
                    .map_err(|e| bad_len(self, e))?;
                return Ok(Some((id, sumsq)));
            }
            Action::Finalize { range, send } => {
                let values = &mut work[range];
                if reduce == ReduceOp::Average {
                    values.iter_mut().for_each(|v| *v /= world);
                }
                if let Some(id) = send {
                    // Encode once; keep exactly what the others will decode.
                    let bytes = codec::encode(codec, values);
                    codec::decode_into(codec, &bytes, values).map_err(|e| bad_len(self, e))?;
                    self.send_data(op, id, codec, Bytes::from(bytes));
                }
            }
            Action::Store { id, range, forward } => {
                let p = payload.unwrap_or_default();
                let sumsq = codec::decode_into_sumsq(codec, &p, &mut work[range])
                    .map_err(|e| bad_len(self, e))?;
                if let Some(next) = forward {
                    self.send_data(op, next, codec, p);
                }
                return Ok(Some((id, sumsq)));
            }
        }
        Ok(None)
    }

    async fn broadcast_inner(
        &mut self,
        op: u64,
        work: &mut [u8],
        root: usize,
    ) -> Result<(), OpError> {
        let chunk = self.net.chunk_bytes;
        let count = work.len().div_ceil(chunk);
        if count > u32::MAX as usize {
            return Err(OpError::Invalid(format!("{} bytes are too many", work.len())));
        }
        let epoch = self.epoch;
        let header = |c: usize, len: usize| Header {
            kind: Kind::Data,
            epoch,
            op,
            phase: WirePhase::Broadcast,
            codec: Codec::Bytes,
            step: 0,
            chunk: c as u32,
            len: len as u32,
        };
        let forward = self.next() != root;
        let mut received = vec![false; if self.rank == root { 0 } else { count }];
        let mut missing = received.len();
        if self.rank == root {
            for (c, part) in work.chunks(chunk).enumerate() {
                self.send(c, header(c, part.len()), Bytes::copy_from_slice(part));
            }
        }
        let mut done = DoneRound::new(self.world(), self.rank);
        let mut commit_sent = false;
        loop {
            if missing == 0 && !commit_sent {
                self.send_done(op, self.rank);
                commit_sent = true;
            }
            if missing == 0 && done.complete() {
                return Ok(());
            }
            let f = self.next_frame(op).await?;
            if f.header.kind == Kind::Done {
                self.on_done(op, &mut done, &f)?;
                continue;
            }
            let c = f.header.chunk as usize;
            let range = c * chunk..((c + 1) * chunk).min(work.len());
            let valid = f.header.phase == WirePhase::Broadcast
                && f.header.codec == Codec::Bytes
                && c < received.len()
                && f.payload.len() == range.len();
            if !valid {
                return Err(self.protocol(
                    f.side,
                    format!(
                        "unexpected broadcast frame (chunk {c} of {count}, {} bytes): members disagree on the buffer length or root",
                        f.payload.len()
                    ),
                ));
            }
            if std::mem::replace(&mut received[c], true) {
                return Err(self.protocol(f.side, format!("broadcast chunk {c} arrived twice")));
            }
            missing -= 1;
            work[range].copy_from_slice(&f.payload);
            if forward {
                let h = header(c, f.payload.len());
                self.send(c, h, f.payload);
            }
        }
    }

    /// The commit round alone: a barrier.
    async fn commit_round(&mut self, op: u64) -> Result<(), OpError> {
        let mut done = DoneRound::new(self.world(), self.rank);
        self.send_done(op, self.rank);
        while !done.complete() {
            let f = self.next_frame(op).await?;
            if f.header.kind != Kind::Done {
                return Err(self.protocol(f.side, "data frame during a barrier".into()));
            }
            self.on_done(op, &mut done, &f)?;
        }
        Ok(())
    }

    fn on_done(&mut self, op: u64, done: &mut DoneRound, f: &Frame) -> Result<(), OpError> {
        let origin = f.header.chunk as usize;
        if f.side != Side::Prev || !done.record(origin) {
            return Err(
                self.protocol(f.side, format!("unexpected commit token from rank {origin}"))
            );
        }
        if self.next() != origin {
            self.send_done(op, origin);
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
        self.send(0, header, Bytes::new());
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
        self.send(id.chunk + id.step, header, payload);
    }

    /// Queues a frame for the next rank on connection `stripe % connections`. A send that fails
    /// surfaces as a `Failed` event.
    fn send(&mut self, stripe: usize, header: Header, payload: Bytes) {
        if self.senders.is_empty() {
            return;
        }
        let tx = &self.senders[stripe % self.senders.len()];
        // A closed channel means the sender task has already reported its failure.
        let _ = tx.send(Out::Frame { header, payload });
    }

    /// The next frame of operation `op` from the previous rank. The readers hold back frames of
    /// an operation not begun yet; a frame from the next rank, which never sends anything, or of
    /// another operation is a protocol error.
    async fn next_frame(&mut self, op: u64) -> Result<Frame, OpError> {
        loop {
            let Some(event) = self.inbox.recv().await else {
                return Err(OpError::Broken { reason: "every connection task has ended".into() });
            };
            match event {
                Event::Failed { side, error } => {
                    let rank = self.side_rank(side);
                    let peer = self.names[rank].clone();
                    return Err(match error {
                        // Nothing is ever received from the next rank, and a next rank that
                        // closed normally has everything it needed from this one; a later send
                        // to it fails on its own.
                        PeerError::Closed(_) if side == Side::Next => continue,
                        PeerError::Closed(reason) => {
                            self.prev_closed += 1;
                            if self.prev_closed < self.net.connections_per_peer {
                                continue;
                            }
                            OpError::PeerLost {
                                rank,
                                peer,
                                cause: format!(
                                    "left the group ({reason}) before this operation completed"
                                ),
                            }
                        }
                        PeerError::Lost(cause) => OpError::PeerLost { rank, peer, cause },
                        PeerError::Aborted(reason) => OpError::RemoteAbort { rank, peer, reason },
                        PeerError::Protocol(cause) => OpError::Protocol { rank, peer, cause },
                    });
                }
                Event::Frame(f) if f.side == Side::Next => {
                    return Err(self.protocol(
                        Side::Next,
                        "sent a frame to its ring predecessor (frames travel forward only)".into(),
                    ));
                }
                Event::Frame(f) if f.header.op == op => return Ok(f),
                Event::Frame(f) => {
                    let got = f.header.op;
                    return Err(self.protocol(
                        f.side,
                        format!("frame of operation {got} during operation {op}"),
                    ));
                }
            }
        }
    }

    fn protocol(&self, side: Side, cause: String) -> OpError {
        let rank = self.side_rank(side);
        OpError::Protocol { rank, peer: self.names[rank].clone(), cause }
    }

    fn exceeded(&self, detail: String) -> OpError {
        let rank = self.prev();
        OpError::Exceeded { rank, peer: self.names[rank].clone(), detail }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.close_all(CLOSE_DONE, "group dropped");
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

struct OpStart {
    id: u64,
    started: Instant,
    before: (u64, u64),
}

/// Bounds one operation by its deadline and the group's abort handle.
struct OpGuard {
    abort: AbortHandle,
    deadline: Duration,
    op: u64,
}

impl OpGuard {
    async fn run(self, body: impl Future<Output = Result<(), OpError>>) -> Result<(), OpError> {
        let Self { abort, deadline, op } = self;
        tokio::select! {
            biased;
            _ = abort.token.cancelled() => Err(OpError::Aborted { reason: abort.reason() }),
            r = tokio::time::timeout(deadline, body) => r.unwrap_or(Err(OpError::Timeout { op, deadline })),
        }
    }
}

/// What each member declared about its contribution to a bounded all-reduce: `norms[rank][s]` is
/// the L2 norm of `rank`'s contribution on segment `s`, segments as cut by [`segments`] for the
/// group's size and the buffer's length. Every member passes the same bounds (a plan that
/// someone every member trusts, in longhaul the coordinator, hands out).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bounds {
    pub norms: Vec<Vec<f64>>,
}

impl Bounds {
    fn check(&self, world: usize) -> Result<(), String> {
        if self.norms.len() != world || self.norms.iter().any(|r| r.len() != world) {
            return Err(format!(
                "bounds must be {world} × {world} (one norm per member and segment)"
            ));
        }
        if self.norms.iter().flatten().any(|n| !n.is_finite() || *n < 0.0) {
            return Err("bounds must be finite and not negative".into());
        }
        Ok(())
    }
}

/// The element ranges of the `world` segments an all-reduce of `len` elements is cut into (the
/// first `len % world` are one longer): what [`Bounds`] are declared over.
pub fn segments(world: usize, len: usize) -> Vec<std::ops::Range<usize>> {
    match RingPlan::new(world.max(1), 0, len, 1) {
        Ok(plan) => (0..world.max(1)).map(|s| plan.segment_range(s)).collect(),
        Err(_) => Vec::new(),
    }
}

/// The hop checks of one bounded all-reduce, per phase and step.
struct HopChecks {
    reduce_scatter: Vec<Hop>,
    all_gather: Vec<Hop>,
}

/// One received segment: its bound and what has arrived of it.
struct Hop {
    segment: usize,
    bound: f64,
    chunks: usize,
    arrived: usize,
    sumsq: f64,
}

impl HopChecks {
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

#[derive(Clone, Copy)]
struct Limits {
    max_payload: u32,
    epoch: u64,
}

/// Reads the frames of one connection (one per unidirectional stream) and hands them to the
/// group's inbox, until the connection ends.
struct Reader {
    conn: Connection,
    side: Side,
    limits: Limits,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    begun: watch::Receiver<u64>,
}

impl Reader {
    async fn run(self) {
        let Self { conn, side, limits, events, counters, begun } = self;
        let mut streams = JoinSet::new();
        let error = loop {
            tokio::select! {
                accepted = conn.accept_uni() => match accepted {
                    // Frames travel forward only; the next rank has nothing to send this one.
                    Ok(_) if side == Side::Next => {
                        break PeerError::Protocol(
                            "sent a frame to its ring predecessor (frames travel forward only)".into(),
                        );
                    }
                    Ok(stream) => {
                        let (events, counters, begun) = (events.clone(), counters.clone(), begun.clone());
                        streams.spawn(async move {
                            let event = match read_frame(stream, limits, begun).await {
                                Ok(f) => {
                                    counters.received.fetch_add((HEADER_LEN + f.1.len()) as u64, Ordering::Relaxed);
                                    Event::Frame(Frame { side, header: f.0, payload: f.1 })
                                }
                                Err(error) => Event::Failed { side, error },
                            };
                            let _ = events.send(event).await;
                        });
                    }
                    Err(e) => break peer_error(e),
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        };
        // Frames already on their way are delivered before the connection's end is reported,
        // so the driver sees a neighbour's last frames before its departure. (Streams held
        // back for an operation that will never begin end with the connection.)
        while streams.join_next().await.is_some() {}
        let _ = events.send(Event::Failed { side, error }).await;
    }
}

async fn read_frame(
    mut stream: quinn::RecvStream,
    limits: Limits,
    mut begun: watch::Receiver<u64>,
) -> Result<(Header, Bytes), PeerError> {
    let mut head = [0u8; HEADER_LEN];
    stream.read_exact(&mut head).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            PeerError::Protocol(FrameError::Truncated { got: n }.to_string())
        }
        quinn::ReadExactError::ReadError(e) => read_error(e),
    })?;
    let header = Header::decode(&head, limits.max_payload, limits.epoch)
        .map_err(|e| PeerError::Protocol(format!("rejected frame: {e}")))?;
    // A frame of the operation after the current one (a neighbour may finish an operation and
    // start the next before this rank has) waits here, its payload unread, so what a peer can
    // push ahead is bounded by QUIC's flow-control windows. An honest peer is never two
    // operations ahead: it cannot finish one without this rank's commit token.
    let ahead = *begun.borrow();
    if header.op > ahead {
        return Err(PeerError::Protocol(format!(
            "frame of operation {} when this rank has begun only {ahead} operations",
            header.op
        )));
    }
    if header.op == ahead && begun.wait_for(|b| *b > header.op).await.is_err() {
        return Err(PeerError::Closed("the group ended".into()));
    }
    // `len` is bounded by `max_payload`; the payload grows as it arrives, so a peer that
    // announces a large frame and stalls holds no more memory than it sent.
    let len = header.len as usize;
    let mut payload = Vec::new();
    while payload.len() < len {
        match stream.read_chunk(len - payload.len(), true).await.map_err(read_error)? {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => {
                return Err(PeerError::Protocol(format!(
                    "frame payload truncated: {} of {len} bytes",
                    payload.len()
                )));
            }
        }
    }
    Ok((header, Bytes::from(payload)))
}

fn read_error(e: quinn::ReadError) -> PeerError {
    match e {
        quinn::ReadError::ConnectionLost(e) => peer_error(e),
        other => PeerError::Protocol(format!("stream failed: {other}")),
    }
}

fn peer_error(e: ConnectionError) -> PeerError {
    match e {
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CLOSE_ABORT) => {
            PeerError::Aborted(String::from_utf8_lossy(&c.reason).into_owned())
        }
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CLOSE_DONE) => {
            PeerError::Closed(String::from_utf8_lossy(&c.reason).into_owned())
        }
        ConnectionError::ApplicationClosed(c) => PeerError::Lost(format!(
            "closed the connection ({})",
            String::from_utf8_lossy(&c.reason)
        )),
        ConnectionError::TimedOut => {
            PeerError::Lost("no packets within the idle timeout: presumed dead or cut off".into())
        }
        ConnectionError::LocallyClosed => PeerError::Lost("connection closed locally".into()),
        other => PeerError::Lost(other.to_string()),
    }
}

/// Writes queued frames to the next rank, one unidirectional stream each.
async fn send_loop(
    conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Out>,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
) {
    let mut control: Vec<quinn::SendStream> = Vec::new();
    while let Some(out) = rx.recv().await {
        match out {
            Out::Frame { header, payload } => {
                let len = (HEADER_LEN + payload.len()) as u64;
                match send_frame(&conn, &header, payload).await {
                    Ok(stream) => {
                        counters.sent.fetch_add(len, Ordering::Relaxed);
                        if header.kind == Kind::Done {
                            control.push(stream);
                        }
                    }
                    Err(e) => {
                        let _ = events.send(Event::Failed { side: Side::Next, error: e }).await;
                        return;
                    }
                }
            }
            Out::Flush(reply) => {
                for s in control.drain(..) {
                    let _ = s.stopped().await;
                }
                let _ = reply.send(());
            }
        }
    }
}

async fn send_frame(
    conn: &Connection,
    header: &Header,
    payload: Bytes,
) -> Result<quinn::SendStream, PeerError> {
    let mut s = conn.open_uni().await.map_err(peer_error)?;
    let write_err = |e: quinn::WriteError| match e {
        quinn::WriteError::ConnectionLost(e) => peer_error(e),
        other => PeerError::Lost(format!("stream write failed: {other}")),
    };
    s.write_all(&header.encode()).await.map_err(write_err)?;
    if !payload.is_empty() {
        s.write_chunk(payload).await.map_err(write_err)?;
    }
    s.finish().map_err(|e| PeerError::Lost(format!("stream finish failed: {e}")))?;
    Ok(s)
}

/// Dials `peer` `count` times, retrying while it is not up yet, until `deadline`.
async fn dial(
    endpoint: &Endpoint,
    peer: &Member,
    epoch: u64,
    count: usize,
    deadline: Instant,
) -> Result<Vec<Connection>, JoinError> {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(count);
    while conns.len() < count {
        let connecting = endpoint.connect(peer.addr, &peer.name).map_err(|e| {
            JoinError::Config(format!("cannot dial {} at {}: {e}", peer.name, peer.addr))
        })?;
        let timeout =
            |waited| JoinError::Timeout { peer: peer.name.clone(), waited, refusals: Vec::new() };
        match tokio::time::timeout_at(deadline.into(), connecting).await {
            Ok(Ok(conn)) => {
                match tokio::time::timeout_at(deadline.into(), admitted(&conn, epoch)).await {
                    Ok(Ok(())) => conns.push(conn),
                    Ok(Err(reason)) => {
                        return Err(JoinError::Refused { peer: peer.name.clone(), reason });
                    }
                    Err(_) => return Err(timeout(started.elapsed())),
                }
            }
            Ok(Err(ConnectionError::TimedOut)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) if Instant::now() < deadline && is_transient(&e) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => {
                return Err(JoinError::Refused { peer: peer.name.clone(), reason: e.to_string() });
            }
            Err(_) => return Err(timeout(started.elapsed())),
        }
    }
    Ok(conns)
}

async fn admit(conn: &Connection, epoch: u64) {
    // A failure here shows up on the dialer's side, which waits for this message.
    if let Ok(mut s) = conn.open_uni().await {
        let _ = s.write_all(&crate::wire::admission(epoch)).await;
        let _ = s.finish();
    }
}

/// Waits for the peer's admission message on a freshly dialed connection.
async fn admitted(conn: &Connection, epoch: u64) -> Result<(), String> {
    let mut stream =
        conn.accept_uni().await.map_err(|e| format!("refused after the handshake: {e}"))?;
    let mut m = [0u8; crate::wire::ADMISSION_LEN];
    stream.read_exact(&mut m).await.map_err(|e| format!("no admission message: {e}"))?;
    crate::wire::check_admission(&m, epoch)
}

/// Failures worth retrying until the join deadline: no answer yet, or the peer's endpoint of an
/// earlier epoch (closing, so refusing new connections) still holds its address.
fn is_transient(e: &ConnectionError) -> bool {
    match e {
        ConnectionError::TimedOut | ConnectionError::Reset => true,
        ConnectionError::ConnectionClosed(c) => {
            c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        }
        _ => false,
    }
}

/// Accepts `count` connections from member `prev`, refusing (and remembering) everything else,
/// until `deadline`.
async fn accept(
    endpoint: &Endpoint,
    epoch: u64,
    names: &[String],
    prev: usize,
    count: usize,
    deadline: Instant,
) -> Result<Vec<Connection>, JoinError> {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(count);
    let mut refusals = Vec::new();
    while conns.len() < count {
        let timeout = |refusals: Vec<String>| JoinError::Timeout {
            peer: names[prev].clone(),
            waited: started.elapsed(),
            refusals,
        };
        let incoming = match tokio::time::timeout_at(deadline.into(), endpoint.accept()).await {
            Ok(Some(i)) => i,
            Ok(None) => {
                return Err(JoinError::Config("endpoint closed while forming the group".into()));
            }
            Err(_) => return Err(timeout(refusals)),
        };
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout_at(deadline.into(), incoming.into_future()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(%remote, error = %e, "refused a ring connection");
                refusals.push(format!("{remote}: {e}"));
                continue;
            }
            Err(_) => return Err(timeout(refusals)),
        };
        let who = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().and_then(|c| tls::member_named_by(c, names)));
        match who {
            Some(r) if r == prev => {
                admit(&conn, epoch).await;
                conns.push(conn);
            }
            other => {
                let name = other.map_or("an unknown member", |r| names[r].as_str());
                let reason = format!("{remote}: {name} is not the previous rank {}", names[prev]);
                warn!("{reason}");
                conn.close(
                    VarInt::from_u32(CLOSE_NOT_NEIGHBOUR),
                    b"not my previous ring neighbour",
                );
                refusals.push(reason);
            }
        }
    }
    Ok(conns)
}
