//! QUIC transport settings: windows sized from the bandwidth-delay product, connections per
//! neighbour, congestion control, liveness timers.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{
    AsyncUdpSocket, EndpointConfig, MtuDiscoveryConfig, TransportConfig, UdpPoller, VarInt,
};

/// Congestion controller used by every connection of a group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438): the loss-based default of Linux TCP. Halves its window on every loss,
    /// so on a long path with random loss it runs far below the link rate (measured: 65 Mbit/s
    /// of a 250 Mbit/s, 100 ms, 0.01 % loss link).
    Cubic,
    /// BBR (quinn's experimental version): paces at the measured bottleneck rate and ignores
    /// random loss; the default, since long lossy paths are what longhaul is for (measured: 233
    /// Mbit/s of the same link).
    #[default]
    Bbr,
    /// NewReno (RFC 9002): the QUIC reference controller.
    NewReno,
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::NewReno => "newreno",
        })
    }
}

impl FromStr for Congestion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "newreno" => Ok(Congestion::NewReno),
            other => Err(format!(
                "unknown congestion controller {other:?}; expected cubic, bbr or newreno"
            )),
        }
    }
}

/// Network settings of a group. Every member of a group must use the same `chunk_bytes`.
///
/// The defaults are tuned for a 1 Gbit/s path with a 100 ms round trip (a transatlantic link):
/// each connection may have 2 × BDP = 25 MB unacknowledged, so one connection can fill the
/// path once its congestion window has grown; two connections per neighbour halve the time to
/// grow it and the damage of one loss event; BBR keeps the rate through random loss.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The bottleneck rate the windows are sized for, bits per second.
    pub link_rate_bps: u64,
    /// The round trip the windows are sized for; also QUIC's initial RTT estimate.
    pub rtt: Duration,
    /// QUIC connections opened to the next rank; chunks are striped across them.
    pub connections_per_peer: usize,
    pub congestion: Congestion,
    /// Largest chunk of an operation, bytes of f32 working data. The unit of pipelining.
    pub chunk_bytes: usize,
    /// Keep-alive interval on idle connections.
    pub keep_alive: Duration,
    /// A peer silent this long is declared lost (QUIC idle timeout).
    pub idle_timeout: Duration,
    /// How long forming the group may take (peers starting late are retried until then).
    pub connect_timeout: Duration,
    /// Default deadline of one operation.
    pub op_deadline: Duration,
    /// Largest UDP payload that path MTU discovery may probe for (1452 fits a 1500-byte
    /// Ethernet MTU behind IPv6; loopback and jumbo-frame LANs can go higher).
    pub max_udp_payload: u16,
    /// Requested kernel socket buffer, bytes (the kernel caps it at `net.core.{r,w}mem_max`).
    pub socket_buffer: usize,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            link_rate_bps: 1_000_000_000,
            rtt: Duration::from_millis(100),
            connections_per_peer: 2,
            congestion: Congestion::Bbr,
            chunk_bytes: 1 << 20,
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            op_deadline: Duration::from_secs(600),
            max_udp_payload: 1452,
            socket_buffer: 16 << 20,
        }
    }
}

impl NetConfig {
    /// Bandwidth-delay product of the configured path, bytes.
    pub fn bdp_bytes(&self) -> u64 {
        let bytes_per_sec = self.link_rate_bps / 8;
        (bytes_per_sec as f64 * self.rtt.as_secs_f64()) as u64
    }

    /// Elements of f32 working data per chunk: `chunk_bytes / 4`, a multiple of the int8
    /// block so that blocks never straddle chunks.
    pub fn chunk_elems(&self) -> usize {
        let block = crate::codec::INT8_BLOCK;
        ((self.chunk_bytes / 4) / block).max(1) * block
    }

    /// Largest payload a data frame may carry under this configuration.
    pub fn max_payload(&self) -> u32 {
        let elems = self.chunk_elems();
        u32::try_from(elems * 4).unwrap_or(u32::MAX)
    }

    /// Connection receive window: two BDPs (headroom for the controller's overshoot and for
    /// retransmissions), and at least 8 MiB so a fast LAN is not window-bound.
    pub fn connection_window(&self) -> u64 {
        (2 * self.bdp_bytes()).max(8 << 20)
    }

    /// Checks the settings; the error names the bad field.
    pub fn check(&self) -> Result<(), String> {
        if self.connections_per_peer == 0 || self.connections_per_peer > 64 {
            return Err(format!(
                "connections_per_peer is {}; expected 1 to 64",
                self.connections_per_peer
            ));
        }
        if self.chunk_bytes < 4 * crate::codec::INT8_BLOCK || self.chunk_bytes > 64 << 20 {
            return Err(format!("chunk_bytes is {}; expected 128 B to 64 MiB", self.chunk_bytes));
        }
        if self.link_rate_bps == 0 {
            return Err("link_rate_bps is 0".into());
        }
        if self.idle_timeout <= self.keep_alive {
            return Err(format!(
                "idle_timeout ({:?}) must exceed keep_alive ({:?})",
                self.idle_timeout, self.keep_alive
            ));
        }
        if self.max_udp_payload < 1200 {
            return Err(format!(
                "max_udp_payload is {}; QUIC needs at least 1200",
                self.max_udp_payload
            ));
        }
        Ok(())
    }

    /// The QUIC transport configuration these settings describe.
    pub fn transport(&self) -> TransportConfig {
        let mut t = TransportConfig::default();
        let window = self.connection_window();
        let var = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
        t.receive_window(var(window));
        t.send_window(window);
        // One chunk per stream: a whole chunk fits the stream's window, so a writer never waits
        // on one stream's credit while others could proceed.
        t.stream_receive_window(var((2 * self.chunk_bytes as u64 + 4096).min(window)));
        // Each frame is one stream. A window holds at most `window / chunk` data frames, and
        // commit tokens are tiny; streams beyond this wait for credit (a bound on what a
        // misbehaving neighbour can make this rank track).
        t.max_concurrent_uni_streams(VarInt::from_u32(1024));
        t.max_concurrent_bidi_streams(VarInt::from_u32(0));
        t.keep_alive_interval(Some(self.keep_alive));
        t.max_idle_timeout(Some(
            self.idle_timeout.try_into().unwrap_or(quinn::IdleTimeout::from(VarInt::MAX)),
        ));
        t.initial_rtt(self.rtt.max(Duration::from_millis(1)));
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.mtu_discovery_config(Some(mtu));
        t.datagram_receive_buffer_size(None);
        let initial = (window / 4).clamp(64 << 10, 4 << 20);
        match self.congestion {
            Congestion::Cubic => {
                let mut c = quinn::congestion::CubicConfig::default();
                c.initial_window(initial);
                t.congestion_controller_factory(Arc::new(c));
            }
            Congestion::Bbr => {
                let mut c = quinn::congestion::BbrConfig::default();
                c.initial_window(initial);
                t.congestion_controller_factory(Arc::new(c));
            }
            Congestion::NewReno => {
                let mut c = quinn::congestion::NewRenoConfig::default();
                c.initial_window(initial);
                t.congestion_controller_factory(Arc::new(c));
            }
        }
        t
    }

    /// The QUIC endpoint configuration these settings describe.
    pub fn endpoint_config(&self) -> EndpointConfig {
        let mut e = EndpointConfig::default();
        // Best effort: a value below 1200 is refused, and `check` has ruled that out.
        let _ = e.max_udp_payload_size(self.max_udp_payload.max(1200));
        e
    }
}

/// Binds a UDP socket for a ring endpoint and asks for large kernel buffers.
pub fn bind(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).ok();
    }
    // Buffers are an optimisation: the kernel clamps them, and a failure here is not fatal.
    sock.set_recv_buffer_size(buffer).ok();
    sock.set_send_buffer_size(buffer).ok();
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// The owner's hold on the UDP port of a group's QUIC endpoint.
///
/// A closed QUIC endpoint keeps its socket until every connection has drained, for three probe
/// timeouts. After a stall (a process stopped for 20 s, a machine swapping) the round-trip
/// estimate, and so the drain, can grow to a minute, while the next epoch needs the same port
/// at once. [`PortLease::release`] takes the socket away from the old endpoint: the port is
/// free at once; the endpoint's draining connections go on without a socket (what they send
/// is dropped, and nothing arrives). The worker releases the last epoch's port before it binds
/// the next one, when the old group's close frames are long sent.
#[derive(Clone, Default)]
pub struct PortLease {
    slot: Arc<Slot>,
}

#[derive(Default)]
struct Slot {
    socket: Mutex<Option<Arc<dyn AsyncUdpSocket>>>,
}

impl Slot {
    fn get(&self) -> Option<Arc<dyn AsyncUdpSocket>> {
        self.socket.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl fmt::Debug for PortLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortLease").field("held", &self.slot.get().is_some()).finish()
    }
}

impl PortLease {
    /// Closes the socket. A send or receive in progress on the network runtime holds it for
    /// the length of that call: this waits for them (up to a second, which only a send
    /// blocked on a full socket buffer could take), so that the port is free on return.
    pub fn release(&self) {
        let Some(socket) = self.slot.socket.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        // Nothing takes a new reference once the slot is empty: the count only falls.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while Arc::strong_count(&socket) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Whether the socket is still held.
    pub fn is_held(&self) -> bool {
        self.slot.get().is_some()
    }

    /// `socket`, behind this lease: what the endpoint gets instead.
    pub(crate) fn wrap(
        &self,
        socket: Arc<dyn AsyncUdpSocket>,
    ) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let leased = Leased {
            addr: socket.local_addr()?,
            max_transmit_segments: socket.max_transmit_segments(),
            max_receive_segments: socket.max_receive_segments(),
            may_fragment: socket.may_fragment(),
            slot: self.slot.clone(),
        };
        *self.slot.socket.lock().unwrap_or_else(|p| p.into_inner()) = Some(socket);
        Ok(Arc::new(leased))
    }
}

/// A socket that its [`PortLease`] can take away. Nothing here keeps the inner socket alive
/// beyond one call, so a release closes it.
#[derive(Debug)]
struct Leased {
    addr: SocketAddr,
    max_transmit_segments: usize,
    max_receive_segments: usize,
    may_fragment: bool,
    slot: Arc<Slot>,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Slot")
    }
}

impl AsyncUdpSocket for Leased {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(LeasedPoller { slot: self.slot.clone(), inner: None })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        match self.slot.get() {
            Some(s) => s.try_send(transmit),
            // Released: what a draining connection still sends goes nowhere.
            None => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        match self.slot.get() {
            Some(s) => s.poll_recv(cx, bufs, meta),
            // Released: nothing arrives any more (the endpoint's timers still run).
            None => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn max_transmit_segments(&self) -> usize {
        self.max_transmit_segments
    }

    fn max_receive_segments(&self) -> usize {
        self.max_receive_segments
    }

    fn may_fragment(&self) -> bool {
        self.may_fragment
    }
}

/// Waits until the leased socket is writable. It holds the inner socket's poller (and so the
/// socket) only while a send waits, and lets go as soon as it is ready or released.
struct LeasedPoller {
    slot: Arc<Slot>,
    inner: Option<Pin<Box<dyn UdpPoller>>>,
}

impl fmt::Debug for LeasedPoller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeasedPoller")
    }
}

impl UdpPoller for LeasedPoller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(socket) = self.slot.get() else {
            self.inner = None;
            return Poll::Ready(Ok(()));
        };
        let inner = self.inner.get_or_insert_with(|| socket.create_io_poller());
        let ready = inner.as_mut().poll_writable(cx);
        if ready.is_ready() {
            self.inner = None;
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_bdp() {
        let c = NetConfig::default();
        assert_eq!(c.bdp_bytes(), 12_500_000);
        assert_eq!(c.connection_window(), 25_000_000);
        let lan = NetConfig { rtt: Duration::from_micros(200), ..NetConfig::default() };
        assert_eq!(lan.connection_window(), 8 << 20);
    }

    #[test]
    fn chunks_hold_whole_int8_blocks() {
        for bytes in [128, 1000, 1 << 20, (1 << 20) + 7] {
            let c = NetConfig { chunk_bytes: bytes, ..NetConfig::default() };
            assert_eq!(c.chunk_elems() % crate::codec::INT8_BLOCK, 0);
            assert!(c.chunk_elems() * 4 <= bytes.max(128));
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = NetConfig { connections_per_peer: 0, ..NetConfig::default() };
        assert!(bad.check().unwrap_err().contains("connections_per_peer"));
        let bad = NetConfig { idle_timeout: Duration::from_millis(10), ..NetConfig::default() };
        assert!(bad.check().unwrap_err().contains("idle_timeout"));
        assert_eq!("bbr".parse::<Congestion>(), Ok(Congestion::Bbr));
        assert!("reno2".parse::<Congestion>().unwrap_err().contains("reno2"));
    }
}
