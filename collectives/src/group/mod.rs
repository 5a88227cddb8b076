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
//!
//! # The pieces
//!
//! - `engine`: the protocol of one rank's operations (sequencing, the all-reduce, broadcast and
//!   barrier, the commit round, the hop checks), sans-IO: events in, frames out.
//! - `formation`: dialing the next rank and accepting the previous one.
//! - `conn`: a reader per connection and a writer per connection to the next rank.
//! - this module: [`Group`], the shell that joins them, with the deadline and abort handle.
//! - `sim` (tests): N engines on a simulated network with seeded delivery order, crashes and
//!   aborts, checked for all-or-nothing after every event.

mod conn;
mod engine;
mod formation;
#[cfg(test)]
mod sim;

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{AsyncUdpSocket, Connection, Endpoint, Runtime, VarInt};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::conn::{Counters, Limits, Out, Reader, send_loop};
use self::engine::{Engine, Event, Output, Side, Sizes};
use self::formation::{accept, dial};
use crate::codec::{self, Compression, Element};
use crate::io::{self, NetRuntime};
use crate::schedule::RingPlan;
use crate::tls::{self, Identity, TlsError, TrustAnchor};
use crate::transport::{self, NetConfig, PortLease};
use crate::wan::{LinkCondition, WanSocket};

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

/// The ring of one epoch. See the module documentation.
pub struct Group {
    epoch: u64,
    rank: usize,
    names: Vec<String>,
    net: NetConfig,
    endpoint: Endpoint,
    /// The connections to the next rank, then those from the previous one (`dialed` of them
    /// first).
    connections: Vec<Connection>,
    dialed: usize,
    /// One writer per connection to the next rank. Unbounded, because only this rank's engine
    /// fills them, with at most what one operation sends (a peer cannot add to them); a
    /// bounded queue here could close a cycle of waits around the ring.
    senders: Vec<mpsc::UnboundedSender<Out>>,
    inbox: mpsc::Receiver<Event>,
    engine: Engine,
    /// How many operations the engine has begun, for the readers: a frame of an operation not
    /// begun yet waits unread, and one further ahead is a protocol error.
    begun: watch::Sender<u64>,
    /// Where the network side runs (see [`crate::io`]).
    net_runtime: tokio::runtime::Handle,
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
            .field("engine", &self.engine)
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
        let sizes = Sizes {
            chunk_elems: net.chunk_elems(),
            chunk_bytes: net.chunk_bytes,
            connections_per_peer: net.connections_per_peer,
        };
        let engine = Engine::new(epoch, rank, names.clone(), sizes);
        let mut group = Group {
            epoch,
            rank,
            names,
            endpoint,
            connections: Vec::new(),
            dialed: 0,
            senders: Vec::new(),
            inbox,
            engine,
            begun: watch::Sender::new(0),
            net_runtime,
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
                    (rank + world - 1) % world,
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
        use std::sync::atomic::Ordering::Relaxed;
        (self.counters.sent.load(Relaxed), self.counters.received.load(Relaxed))
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
        self.dialed = dialed.len();
        self.connections = dialed.into_iter().chain(accepted).collect();
    }

    /// QUIC's smoothed round-trip time to each neighbour, the lowest over the connections to
    /// it: `(rank, rtt)` for the next rank and the previous one (one entry when they are the
    /// same rank, none for a group of one).
    pub fn neighbour_rtts(&self) -> Vec<(usize, Duration)> {
        let n = self.names.len();
        if n < 2 {
            return Vec::new();
        }
        let best = |cs: &[Connection]| cs.iter().map(Connection::rtt).min();
        let (to_next, from_prev) =
            self.connections.split_at(self.dialed.min(self.connections.len()));
        let (next, prev) = ((self.rank + 1) % n, (self.rank + n - 1) % n);
        let mut out: Vec<(usize, Duration)> = Vec::new();
        for (rank, rtt) in [(next, best(to_next)), (prev, best(from_prev))] {
            let Some(rtt) = rtt else { continue };
            match out.iter_mut().find(|(r, _)| *r == rank) {
                Some(e) => e.1 = e.1.min(rtt),
                None => out.push((rank, rtt)),
            }
        }
        out
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
        let work: Vec<f32> = buf.iter().map(|v| v.to_f32()).collect();
        let (output, stats) =
            self.run(|engine| engine.begin_all_reduce(work, op, codec, bounds)).await?;
        let Output::Reduced(work) = output else { unreachable!("an all-reduce reduces") };
        for (b, w) in buf.iter_mut().zip(&work) {
            *b = T::from_f32(*w);
        }
        Ok(stats)
    }

    /// Copies `buf` of rank `root` into `buf` of every rank. Every rank must pass a buffer of
    /// the same length. On failure `buf` is unchanged.
    pub async fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<OpStats, OpError> {
        let work = buf.to_vec();
        let (output, stats) = self.run(|engine| engine.begin_broadcast(work, root)).await?;
        let Output::Broadcast(work) = output else { unreachable!("a broadcast broadcasts") };
        buf.copy_from_slice(&work);
        Ok(stats)
    }

    /// Returns once every rank has called `barrier`.
    pub async fn barrier(&mut self) -> Result<(), OpError> {
        self.run(Engine::begin_barrier).await.map(|_| ())
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

    /// Runs one operation: `begin` starts it in the engine, then frames flow until it
    /// completes on this rank, fails, misses its deadline or is aborted. A failure breaks the
    /// group and, by closing every connection with the reason, tells the neighbours at once.
    async fn run(
        &mut self,
        begin: impl FnOnce(&mut Engine) -> Result<u64, OpError>,
    ) -> Result<(Output, OpStats), OpError> {
        let (started, before) = (Instant::now(), self.bytes());
        let op = self.engine.begun();
        let result = match begin(&mut self.engine) {
            Ok(_) => {
                self.begun.send_replace(self.engine.begun());
                let guard =
                    OpGuard { abort: self.abort.clone(), deadline: self.net.op_deadline, op };
                guard.run(self.drive()).await
            }
            // An invalid request, or a group already broken, ends here without taking an id.
            Err(e) if self.engine.begun() == op => return Err(e),
            Err(e) => Err(e),
        };
        match result {
            Ok(output) => {
                let after = self.bytes();
                let stats = OpStats {
                    bytes_sent: after.0 - before.0,
                    bytes_received: after.1 - before.1,
                    elapsed: started.elapsed(),
                };
                Ok((output, stats))
            }
            Err(e) => {
                warn!(epoch = self.epoch, rank = self.rank, op, error = %e, "collective failed");
                let reason = self.engine.fail(&e);
                self.close_all(CLOSE_ABORT, &truncate(&reason, 1000));
                Err(e)
            }
        }
    }

    /// Sends what the engine queued and feeds it what the connections report, until the
    /// operation in flight completes or fails.
    async fn drive(&mut self) -> Result<Output, OpError> {
        loop {
            while let Some(t) = self.engine.poll_transmit() {
                if !self.senders.is_empty() {
                    let tx = &self.senders[t.stripe % self.senders.len()];
                    // A closed channel means the writer has already reported its failure.
                    let _ = tx.send(Out::Frame { header: t.header, payload: t.payload });
                }
            }
            if let Some(output) = self.engine.poll_complete() {
                return Ok(output);
            }
            let Some(event) = self.inbox.recv().await else {
                return Err(OpError::Broken { reason: "every connection task has ended".into() });
            };
            self.engine.handle(event)?;
        }
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

/// Bounds one operation by its deadline and the group's abort handle.
struct OpGuard {
    abort: AbortHandle,
    deadline: Duration,
    op: u64,
}

impl OpGuard {
    async fn run<T>(self, body: impl Future<Output = Result<T, OpError>>) -> Result<T, OpError> {
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
    pub(super) fn check(&self, world: usize) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// On tokio's paused clock: the deadline is exact and costs no real time.
    #[tokio::test(start_paused = true)]
    async fn an_operation_that_hears_nothing_fails_at_its_deadline() {
        let deadline = Duration::from_secs(30);
        let guard = OpGuard { abort: AbortHandle::default(), deadline, op: 3 };
        let start = tokio::time::Instant::now();
        let r: Result<(), _> = guard.run(std::future::pending()).await;
        assert_eq!(r, Err(OpError::Timeout { op: 3, deadline }));
        assert_eq!(start.elapsed(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abort_ends_the_operation_at_once_with_the_first_reason() {
        let abort = AbortHandle::default();
        let guard = OpGuard { abort: abort.clone(), deadline: Duration::from_secs(30), op: 0 };
        let start = tokio::time::Instant::now();
        let aborter = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            abort.abort("the epoch changed");
            abort.abort("a later reason");
        });
        let r: Result<(), _> = guard.run(std::future::pending()).await;
        assert_eq!(r, Err(OpError::Aborted { reason: "the epoch changed".into() }));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        aborter.await.unwrap();
    }
}
