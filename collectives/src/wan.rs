//! In-process WAN emulation underneath QUIC.
//!
//! The layout follows the house style: a sans-IO core ([`LinkModel`]) that takes `now` and
//! decides the fate of each datagram, and a thin async shell ([`WanSocket`]) that implements
//! [`quinn::AsyncUdpSocket`] around a real socket and releases datagrams at their arrival time.
//!
//! What a link models, in the order a datagram meets it:
//!
//! 1. **Bottleneck queue** (only with [`LinkCondition::rate_bps`]): a FIFO drained at the link
//!    rate. A datagram that does not fit in [`LinkCondition::queue_bytes`] is tail-dropped
//!    ([`DropReason::QueueFull`]).
//! 2. **Serialization** at the link rate.
//! 3. **Loss** ([`Loss`]) on the path after the queue: a lost datagram still used its slot at
//!    the bottleneck, as on a long-haul path with a lossy segment downstream of the access link.
//! 4. **Propagation delay** plus optional **jitter**, never reordering datagrams of one link.
//!
//! Impairment is applied on egress only: each endpoint impairs what it sends, so wrapping both
//! ends in a [`WanSocket`] with the same [`LinkCondition`] gives a symmetric path whose RTT is
//! [`LinkCondition::rtt`].
//!
//! # Wrapping a socket for quinn
//!
//! ```no_run
//! # async fn demo(config: quinn::EndpointConfig, server: Option<quinn::ServerConfig>)
//! # -> std::io::Result<quinn::Endpoint> {
//! use std::sync::Arc;
//! use collectives::wan::{LinkPreset, WanSocket};
//! use quinn::Runtime as _;
//!
//! let std_socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
//! let inner = quinn::TokioRuntime.wrap_udp_socket(std_socket)?;
//! let wan = WanSocket::new(inner, LinkPreset::Transatlantic.condition(), 7);
//! quinn::Endpoint::new_with_abstract_socket(config, server, wan, Arc::new(quinn::TokioRuntime))
//! # }
//! ```

use std::{
    cmp::{Ordering, Reverse},
    collections::{BinaryHeap, HashMap},
    fmt,
    io::{self, IoSliceMut},
    net::{IpAddr, SocketAddr},
    ops::AddAssign,
    pin::Pin,
    str::FromStr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering as AtomicOrdering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use quinn::{
    AsyncUdpSocket, UdpPoller,
    udp::{EcnCodepoint, RecvMeta, Transmit},
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Notify;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Impairment applied to the datagrams one side sends on a link.
///
/// [`LinkCondition::none()`] (also the [`Default`]) is a perfect link: no delay, no jitter,
/// unlimited rate, no loss.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkCondition {
    /// One-way propagation delay added to every datagram on egress. A path with an RTT of
    /// 100 ms needs 50 ms here on both ends. Zero means no added delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `[0, jitter]` per datagram. Jitter never reorders
    /// datagrams of one link: a datagram never arrives before the one sent ahead of it
    /// (arrival = max(computed arrival, previous arrival)). Zero means no jitter.
    pub jitter: Duration,
    /// Bottleneck rate in bits per second. `None` means unlimited (no serialization delay and
    /// no queue). `Some(0)` means the link carries nothing: every datagram is tail-dropped.
    pub rate_bps: Option<u64>,
    /// Bottleneck queue limit in bytes, counting the datagram being serialized. `None` means
    /// the default of max(64 KiB, one bandwidth-delay product = `rate_bps` × [`rtt`] / 8);
    /// see [`LinkCondition::effective_queue_bytes`]. Ignored when `rate_bps` is `None`.
    ///
    /// [`rtt`]: LinkCondition::rtt
    pub queue_bytes: Option<usize>,
    /// Random loss applied after the bottleneck queue.
    pub loss: Loss,
}

impl LinkCondition {
    /// Smallest default bottleneck queue, used when one bandwidth-delay product is smaller.
    pub const MIN_DEFAULT_QUEUE_BYTES: usize = 64 * 1024;

    /// A perfect link: no delay, no jitter, unlimited rate, no loss.
    pub const fn none() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bps: None,
            queue_bytes: None,
            loss: Loss::None,
        }
    }

    /// Round-trip time of a symmetric path with this condition on both ends: 2 × `delay`
    /// (jitter and serialization not included).
    pub fn rtt(&self) -> Duration {
        self.delay.saturating_mul(2)
    }

    /// Same condition with the bottleneck rate replaced (e.g. 250 Mbit/s on a small machine
    /// that cannot push a preset's 1 Gbit/s). `None` removes the rate limit.
    #[must_use]
    pub fn with_rate_bps(mut self, rate_bps: Option<u64>) -> Self {
        self.rate_bps = rate_bps;
        self
    }

    /// Same condition with the one-way delay replaced.
    #[must_use]
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Same condition with the jitter replaced.
    #[must_use]
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Same condition with the bottleneck queue limit replaced (`None` = default).
    #[must_use]
    pub fn with_queue_bytes(mut self, queue_bytes: Option<usize>) -> Self {
        self.queue_bytes = queue_bytes;
        self
    }

    /// Same condition with the loss model replaced.
    #[must_use]
    pub fn with_loss(mut self, loss: Loss) -> Self {
        self.loss = loss;
        self
    }

    /// The queue limit in force: `queue_bytes` if set, else max(64 KiB, `rate_bps` × rtt / 8).
    /// Without a rate limit there is no queue and this is just the 64 KiB floor.
    pub fn effective_queue_bytes(&self) -> usize {
        if let Some(limit) = self.queue_bytes {
            return limit;
        }
        let bdp = match self.rate_bps {
            Some(rate) => {
                let bytes = u128::from(rate) * self.rtt().as_nanos() / 8_000_000_000;
                usize::try_from(bytes).unwrap_or(usize::MAX)
            }
            None => 0,
        };
        bdp.max(Self::MIN_DEFAULT_QUEUE_BYTES)
    }
}

impl Default for LinkCondition {
    fn default() -> Self {
        Self::none()
    }
}

/// Per-datagram loss model. Probabilities outside `[0, 1]` act as clamped (NaN acts as 0).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Loss {
    /// No loss.
    #[default]
    None,
    /// Each datagram is lost independently with probability `p`.
    Random {
        /// Loss probability per datagram.
        p: f64,
    },
    /// Gilbert–Elliott two-state Markov chain, stepped once per datagram (the state moves
    /// first, then the datagram is lost with the new state's loss probability). It starts in
    /// the good state.
    ///
    /// With π_bad = p_good_to_bad / (p_good_to_bad + p_bad_to_good) and π_good = 1 − π_bad,
    /// the mean loss is π_bad·loss_bad + π_good·loss_good, and the bad state lasts
    /// 1 / p_bad_to_good datagrams on average, which is the mean loss-burst length when
    /// loss_bad = 1 and loss_good = 0 (see [`Loss::bursty`]).
    GilbertElliott {
        /// Probability of moving from the good to the bad state, per datagram.
        p_good_to_bad: f64,
        /// Probability of moving from the bad to the good state, per datagram.
        p_bad_to_good: f64,
        /// Loss probability while in the good state.
        loss_good: f64,
        /// Loss probability while in the bad state.
        loss_bad: f64,
    },
}

impl Loss {
    /// Bursty loss: a Gilbert–Elliott chain with loss_bad = 1 and loss_good = 0 whose mean loss
    /// is `mean_loss` and whose loss bursts last `mean_burst_packets` datagrams on average.
    ///
    /// p_bad_to_good = 1 / mean_burst and p_good_to_bad = mean_loss · p_bad_to_good /
    /// (1 − mean_loss). `mean_burst_packets` below 1 counts as 1; `mean_loss` ≤ 0 (or NaN)
    /// gives [`Loss::None`]. Mean losses above b / (b + 1) for burst length b are not reachable
    /// (p_good_to_bad would exceed 1); p_good_to_bad is then clamped to 1, giving less loss.
    pub fn bursty(mean_loss: f64, mean_burst_packets: f64) -> Self {
        if mean_loss.is_nan() || mean_loss <= 0.0 {
            return Self::None;
        }
        let burst = if mean_burst_packets >= 1.0 { mean_burst_packets } else { 1.0 };
        let p_bad_to_good = 1.0 / burst;
        let p_good_to_bad = if mean_loss >= 1.0 {
            1.0
        } else {
            (mean_loss * p_bad_to_good / (1.0 - mean_loss)).min(1.0)
        };
        let p_bad_to_good = if mean_loss >= 1.0 { 0.0 } else { p_bad_to_good };
        Self::GilbertElliott { p_good_to_bad, p_bad_to_good, loss_good: 0.0, loss_bad: 1.0 }
    }

    /// The long-run fraction of datagrams this model loses.
    pub fn mean_loss(&self) -> f64 {
        match *self {
            Self::None => 0.0,
            Self::Random { p } => clamp_probability(p),
            Self::GilbertElliott { p_good_to_bad, p_bad_to_good, loss_good, loss_bad } => {
                let (gb, bg) = (clamp_probability(p_good_to_bad), clamp_probability(p_bad_to_good));
                // With no transitions at all the chain stays in its initial (good) state.
                let pi_bad = if gb + bg > 0.0 { gb / (gb + bg) } else { 0.0 };
                pi_bad * clamp_probability(loss_bad) + (1.0 - pi_bad) * clamp_probability(loss_good)
            }
        }
    }
}

fn clamp_probability(p: f64) -> f64 {
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) }
}

/// Named link conditions, a ladder from a rack-local LAN to a lossy long-haul path.
///
/// Every preset's delay is half its RTT (applied on each end's egress). None has jitter.
/// Rates can be overridden with [`LinkCondition::with_rate_bps`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkPreset {
    /// `lan`: same rack or building; 0.2 ms RTT, 10 Gbit/s, no loss.
    Lan,
    /// `metro`: datacenters in one metro area; 5 ms RTT, 1 Gbit/s, no loss.
    Metro,
    /// `continental`: across a continent; 40 ms RTT, 1 Gbit/s, no loss.
    Continental,
    /// `transatlantic`: across an ocean; 100 ms RTT, 1 Gbit/s, 0.01 % random loss.
    Transatlantic,
    /// `intercontinental`: the far side of the planet; 200 ms RTT, 500 Mbit/s, 0.1 % random loss.
    Intercontinental,
    /// `lossy`: a bad long-haul path; 100 ms RTT, 1 Gbit/s, 1 % bursty loss (mean burst 3 packets).
    Lossy,
}

impl LinkPreset {
    /// Every preset, from best to worst.
    pub const ALL: [Self; 6] = [
        Self::Lan,
        Self::Metro,
        Self::Continental,
        Self::Transatlantic,
        Self::Intercontinental,
        Self::Lossy,
    ];

    /// The preset's name as accepted by [`FromStr`] and printed by [`fmt::Display`].
    pub const fn name(self) -> &'static str {
        match self {
            Self::Lan => "lan",
            Self::Metro => "metro",
            Self::Continental => "continental",
            Self::Transatlantic => "transatlantic",
            Self::Intercontinental => "intercontinental",
            Self::Lossy => "lossy",
        }
    }

    /// The link condition this preset stands for (see each variant's documentation).
    pub fn condition(self) -> LinkCondition {
        const GBIT: u64 = 1_000_000_000;
        const MBIT: u64 = 1_000_000;
        let (rtt_us, rate_bps, loss) = match self {
            Self::Lan => (200, 10 * GBIT, Loss::None),
            Self::Metro => (5_000, GBIT, Loss::None),
            Self::Continental => (40_000, GBIT, Loss::None),
            Self::Transatlantic => (100_000, GBIT, Loss::Random { p: 0.0001 }),
            Self::Intercontinental => (200_000, 500 * MBIT, Loss::Random { p: 0.001 }),
            Self::Lossy => (100_000, GBIT, Loss::bursty(0.01, 3.0)),
        };
        LinkCondition {
            delay: Duration::from_micros(rtt_us / 2),
            jitter: Duration::ZERO,
            rate_bps: Some(rate_bps),
            queue_bytes: None,
            loss,
        }
    }

    fn valid_names() -> String {
        Self::ALL.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for LinkPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no [`LinkPreset`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown link preset `{given}`; valid presets: {valid}", valid = LinkPreset::valid_names())]
pub struct UnknownPreset {
    /// The string that was given.
    pub given: String,
}

impl FromStr for LinkPreset {
    type Err = UnknownPreset;

    /// Case-insensitive; `_` is accepted in place of `-`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace('_', "-");
        Self::ALL
            .into_iter()
            .find(|p| p.name() == wanted)
            .ok_or_else(|| UnknownPreset { given: s.to_owned() })
    }
}

// ---------------------------------------------------------------------------------------------
// Sans-IO core
// ---------------------------------------------------------------------------------------------

/// Why a link dropped a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The loss model lost it.
    Loss,
    /// The bottleneck queue was full (tail drop).
    QueueFull,
}

/// What a link does with one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The datagram arrives at the far end at `at`.
    Deliver {
        /// Arrival time.
        at: Instant,
    },
    /// The datagram never arrives.
    Drop(DropReason),
}

/// Counters of one link (or, from [`WanSocket::stats`], summed over links).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams scheduled for delivery.
    pub delivered_packets: u64,
    /// Bytes of datagrams scheduled for delivery.
    pub delivered_bytes: u64,
    /// Datagrams lost by the loss model.
    pub lost_packets: u64,
    /// Bytes of datagrams lost by the loss model.
    pub lost_bytes: u64,
    /// Datagrams tail-dropped at the bottleneck queue.
    pub queue_dropped_packets: u64,
    /// Bytes of datagrams tail-dropped at the bottleneck queue.
    pub queue_dropped_bytes: u64,
}

impl LinkStats {
    /// Every datagram offered to the link.
    pub fn offered_packets(&self) -> u64 {
        self.delivered_packets + self.lost_packets + self.queue_dropped_packets
    }

    /// Datagrams dropped for any reason.
    pub fn dropped_packets(&self) -> u64 {
        self.lost_packets + self.queue_dropped_packets
    }
}

impl AddAssign for LinkStats {
    fn add_assign(&mut self, rhs: Self) {
        self.delivered_packets += rhs.delivered_packets;
        self.delivered_bytes += rhs.delivered_bytes;
        self.lost_packets += rhs.lost_packets;
        self.lost_bytes += rhs.lost_bytes;
        self.queue_dropped_packets += rhs.queue_dropped_packets;
        self.queue_dropped_bytes += rhs.queue_dropped_bytes;
    }
}

impl std::iter::Sum for LinkStats {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |mut acc, s| {
            acc += s;
            acc
        })
    }
}

/// One direction of one link, sans IO: feed it datagrams with the current time and it says
/// when (or whether) each arrives.
///
/// Deterministic: the same condition, seed and sequence of `(now, len)` calls always give the
/// same verdicts (loss and jitter come from a ChaCha8 RNG seeded with `seed`).
#[derive(Clone, Debug)]
pub struct LinkModel {
    cond: LinkCondition,
    queue_limit: usize,
    rng: ChaCha8Rng,
    /// When the bottleneck finishes serializing everything admitted so far.
    next_free: Option<Instant>,
    /// Arrival time of the last delivered datagram, to forbid reordering.
    last_arrival: Option<Instant>,
    /// Gilbert–Elliott state.
    bad: bool,
    stats: LinkStats,
}

impl LinkModel {
    /// A fresh, idle link.
    pub fn new(cond: LinkCondition, seed: u64) -> Self {
        let queue_limit = cond.effective_queue_bytes();
        Self {
            cond,
            queue_limit,
            rng: ChaCha8Rng::seed_from_u64(seed),
            next_free: None,
            last_arrival: None,
            bad: false,
            stats: LinkStats::default(),
        }
    }

    /// The condition this link applies.
    pub fn condition(&self) -> &LinkCondition {
        &self.cond
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Bytes waiting at (or being serialized by) the bottleneck at `now`; 0 without a rate.
    pub fn queued_bytes(&self, now: Instant) -> usize {
        match (self.cond.rate_bps, self.next_free) {
            (Some(rate), Some(next_free)) => {
                let backlog = next_free.saturating_duration_since(now);
                let bytes = backlog.as_nanos() * u128::from(rate) / 8_000_000_000;
                usize::try_from(bytes).unwrap_or(usize::MAX)
            }
            _ => 0,
        }
    }

    /// Decide the fate of a datagram of `len` bytes sent at `now`.
    ///
    /// A queue-full drop leaves the link's state (queue, RNG, loss state) untouched; a lost
    /// datagram still occupied the bottleneck.
    pub fn on_packet(&mut self, now: Instant, len: usize) -> Verdict {
        let departure = match self.cond.rate_bps {
            None => now,
            Some(rate) => {
                let fits =
                    rate > 0 && self.queued_bytes(now).saturating_add(len) <= self.queue_limit;
                if !fits {
                    self.stats.queue_dropped_packets += 1;
                    self.stats.queue_dropped_bytes += len as u64;
                    return Verdict::Drop(DropReason::QueueFull);
                }
                let start = self.next_free.map_or(now, |free| free.max(now));
                let departure = start + serialization_time(len, rate);
                self.next_free = Some(departure);
                departure
            }
        };

        if self.lose() {
            self.stats.lost_packets += 1;
            self.stats.lost_bytes += len as u64;
            return Verdict::Drop(DropReason::Loss);
        }

        let mut at = departure + self.cond.delay;
        if !self.cond.jitter.is_zero() {
            let max = u64::try_from(self.cond.jitter.as_nanos()).unwrap_or(u64::MAX);
            at += Duration::from_nanos(self.rng.random_range(0..=max));
        }
        if let Some(last) = self.last_arrival {
            at = at.max(last);
        }
        self.last_arrival = Some(at);
        self.stats.delivered_packets += 1;
        self.stats.delivered_bytes += len as u64;
        Verdict::Deliver { at }
    }

    fn lose(&mut self) -> bool {
        match self.cond.loss {
            Loss::None => false,
            Loss::Random { p } => self.rng.random::<f64>() < p,
            Loss::GilbertElliott { p_good_to_bad, p_bad_to_good, loss_good, loss_bad } => {
                let flip = if self.bad { p_bad_to_good } else { p_good_to_bad };
                if self.rng.random::<f64>() < flip {
                    self.bad = !self.bad;
                }
                let loss = if self.bad { loss_bad } else { loss_good };
                self.rng.random::<f64>() < loss
            }
        }
    }
}

/// Time to put `len` bytes on a wire of `rate` bits/s (`rate` > 0), truncated to nanoseconds.
fn serialization_time(len: usize, rate: u64) -> Duration {
    let nanos = (len as u128) * 8_000_000_000 / u128::from(rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------------
// Async shell
// ---------------------------------------------------------------------------------------------

/// A [`quinn::AsyncUdpSocket`] that impairs everything it sends according to a
/// [`LinkCondition`], then hands it to an inner socket. Receiving is passed straight through.
///
/// There is one [`LinkModel`] per destination address (its seed derived deterministically from
/// the socket's seed and the address), so all QUIC connections to one peer share one
/// bottleneck. [`AsyncUdpSocket::try_send`] never fails and never blocks: GSO batches are split
/// into datagrams, each is judged by the model, and those that survive wait in a time-ordered
/// queue. Memory for that queue is bounded per destination by the bottleneck queue when the
/// link has a rate; without a rate it holds whatever is sent within one delay.
///
/// A background tokio task (the pump) sends each datagram through the inner socket once it is
/// due, awaiting the inner socket's writability on `WouldBlock` instead of dropping. Tokio
/// timers have about 1 ms granularity, so datagrams go out up to ~1 ms late; on each wake the
/// pump releases every datagram whose time has come, in order. Times come from tokio's clock,
/// so a paused tokio clock drives the emulation too.
///
/// When the `WanSocket` is dropped the pump sends what is already scheduled (at its due time,
/// as a real network would still deliver it) and then ends, releasing the inner socket.
pub struct WanSocket {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Arc<dyn AsyncUdpSocket>,
    cond: LinkCondition,
    seed: u64,
    state: Mutex<State>,
    /// Wakes the pump when a datagram becomes the earliest due, or when the socket closes.
    wake: Notify,
    closed: AtomicBool,
}

#[derive(Default)]
struct State {
    links: HashMap<SocketAddr, LinkModel>,
    pending: BinaryHeap<Reverse<Pending>>,
    next_seq: u64,
}

/// A datagram waiting for its arrival time. Ordered by `(at, seq)`, so datagrams due at the
/// same instant keep their send order.
struct Pending {
    at: Instant,
    seq: u64,
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    data: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is a single
        // insert/push, so recovering from poisoning is sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WanSocket {
    /// Wrap `inner`, impairing what it sends with `cond`. Must be called inside a tokio runtime:
    /// it spawns the pump task.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, cond: LinkCondition, seed: u64) -> Arc<Self> {
        let shared = Arc::new(Shared {
            inner,
            cond,
            seed,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(pump(Arc::clone(&shared)));
        Arc::new(Self { shared })
    }

    /// The condition applied to every destination.
    pub fn condition(&self) -> &LinkCondition {
        &self.shared.cond
    }

    /// Counters summed over all destinations.
    pub fn stats(&self) -> LinkStats {
        self.shared.lock().links.values().map(LinkModel::stats).sum()
    }

    /// Counters per destination, sorted by address.
    pub fn stats_by_destination(&self) -> Vec<(SocketAddr, LinkStats)> {
        let mut all: Vec<_> =
            self.shared.lock().links.iter().map(|(addr, link)| (*addr, link.stats())).collect();
        all.sort_by_key(|(addr, _)| *addr);
        all
    }
}

impl fmt::Debug for WanSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WanSocket")
            .field("inner", &self.shared.inner)
            .field("cond", &self.shared.cond)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Drop for WanSocket {
    fn drop(&mut self) {
        self.shared.closed.store(true, AtomicOrdering::Release);
        self.shared.wake.notify_one();
    }
}

impl AsyncUdpSocket for WanSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let now = tokio_now();
        let shared = &*self.shared;
        let segment = match transmit.segment_size {
            Some(size) if size > 0 => size,
            _ => transmit.contents.len().max(1),
        };
        let mut guard = shared.lock();
        let State { links, pending, next_seq } = &mut *guard;
        let earliest = pending.peek().map(|Reverse(p)| p.at);
        let link = links.entry(transmit.destination).or_insert_with(|| {
            LinkModel::new(shared.cond.clone(), derive_seed(shared.seed, transmit.destination))
        });
        let mut wake = false;
        // `chunks` yields nothing for an empty buffer; an empty datagram is still a datagram.
        let empty: &[u8] = &[];
        let datagrams = transmit.contents.chunks(segment);
        let datagrams =
            (transmit.contents.is_empty()).then_some(empty).into_iter().chain(datagrams);
        for datagram in datagrams {
            match link.on_packet(now, datagram.len()) {
                Verdict::Deliver { at } => {
                    wake |= earliest.is_none_or(|e| at < e);
                    pending.push(Reverse(Pending {
                        at,
                        seq: *next_seq,
                        destination: transmit.destination,
                        ecn: transmit.ecn,
                        src_ip: transmit.src_ip,
                        data: datagram.to_vec(),
                    }));
                    *next_seq += 1;
                }
                Verdict::Drop(reason) => {
                    tracing::trace!(dest = %transmit.destination, len = datagram.len(), ?reason, "wan: datagram dropped");
                }
            }
        }
        drop(guard);
        if wake {
            shared.wake.notify_one();
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.shared.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.shared.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.shared.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.shared.inner.may_fragment()
    }
}

/// [`WanSocket::try_send`] never returns `WouldBlock`, so its poller is always ready.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn tokio_now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// SplitMix64 finalizer: a fixed, well-mixed 64-bit permutation.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Per-destination seed: stable across runs, platforms and Rust versions.
fn derive_seed(seed: u64, addr: SocketAddr) -> u64 {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let mut h = mix64(seed);
    h = mix64(h ^ (ip >> 64) as u64);
    h = mix64(h ^ ip as u64);
    mix64(h ^ u64::from(addr.port()))
}

/// Most bytes the pump puts in one GSO batch: the largest UDP payload one IPv4 datagram can
/// carry (65535 − 20 − 8), which also fits IPv6. The kernel refuses larger batches.
const MAX_BATCH_BYTES: usize = 65_507;

/// Sends scheduled datagrams at their arrival times until the socket is closed and drained.
///
/// Due datagrams go out in due order. Runs of consecutive ones that the inner socket could
/// have been handed as one GSO batch (see [`batch_len`]) are sent as one [`Transmit`], one
/// syscall instead of one per datagram.
async fn pump(shared: Arc<Shared>) {
    let mut poller = Arc::clone(&shared.inner).create_io_poller();
    let mut due = Vec::new();
    // Reused for every batch's concatenated contents.
    let mut batch = Vec::with_capacity(MAX_BATCH_BYTES);
    loop {
        let next_at = {
            let mut state = shared.lock();
            let now = tokio_now();
            while state.pending.peek().is_some_and(|Reverse(p)| p.at <= now) {
                if let Some(Reverse(p)) = state.pending.pop() {
                    due.push(p);
                }
            }
            state.pending.peek().map(|Reverse(p)| p.at)
        };
        if !due.is_empty() {
            // Read on every round: quinn-udp drops it to 1 when the kernel refuses GSO.
            let max_segments = shared.inner.max_transmit_segments();
            let mut rest = &due[..];
            while !rest.is_empty() {
                let (run, tail) = rest.split_at(batch_len(rest, max_segments));
                send_batch(&*shared.inner, &mut poller, run, &mut batch).await;
                rest = tail;
            }
            due.clear();
            // Sending took time; look again before sleeping.
            continue;
        }
        match next_at {
            Some(at) => {
                // Either the deadline passes or an earlier datagram arrived: both mean look again.
                let _ = tokio::time::timeout_at(at.into(), shared.wake.notified()).await;
            }
            None if shared.closed.load(AtomicOrdering::Acquire) => return,
            // `notify_one` stores a permit, so a wake between the check above and here is kept.
            None => shared.wake.notified().await,
        }
    }
}

/// How many datagrams from the front of `due` (at least 1 if it is not empty) can go out as one
/// GSO batch: same destination, source address and ECN, every one but the last exactly as long
/// as the first and the last no longer, none empty, at most `max_segments` of them and at most
/// [`MAX_BATCH_BYTES`] in all.
fn batch_len(due: &[Pending], max_segments: usize) -> usize {
    let Some((first, rest)) = due.split_first() else {
        return 0;
    };
    let segment = first.data.len();
    let mut total = segment;
    let mut n = 1;
    if segment == 0 {
        return n;
    }
    for next in rest {
        let len = next.data.len();
        let fits = n < max_segments
            && next.destination == first.destination
            && next.src_ip == first.src_ip
            && next.ecn == first.ecn
            && len > 0
            && len <= segment
            && total + len <= MAX_BATCH_BYTES;
        if !fits {
            break;
        }
        total += len;
        n += 1;
        if len < segment {
            // A short segment can only be the last.
            break;
        }
    }
    n
}

/// Sends `run` (a non-empty result of [`batch_len`]) through `inner`: as one GSO transmit
/// built in `buf` when it holds several datagrams. If the inner socket refuses the batch with
/// anything but `WouldBlock`, its datagrams are retried one by one rather than lost together.
async fn send_batch(
    inner: &dyn AsyncUdpSocket,
    poller: &mut Pin<Box<dyn UdpPoller>>,
    run: &[Pending],
    buf: &mut Vec<u8>,
) {
    let [first, more @ ..] = run else {
        return;
    };
    if more.is_empty() {
        send_one(inner, poller, first).await;
        return;
    }
    buf.clear();
    for datagram in run {
        buf.extend_from_slice(&datagram.data);
    }
    let transmit = Transmit {
        destination: first.destination,
        ecn: first.ecn,
        contents: buf,
        segment_size: Some(first.data.len()),
        src_ip: first.src_ip,
    };
    if let Err(e) = send_transmit(inner, poller, &transmit).await {
        tracing::debug!(
            dest = %first.destination,
            segments = run.len(),
            error = %e,
            "wan: inner GSO send failed; sending the batch one datagram at a time"
        );
        for datagram in run {
            send_one(inner, poller, datagram).await;
        }
    }
}

async fn send_one(
    inner: &dyn AsyncUdpSocket,
    poller: &mut Pin<Box<dyn UdpPoller>>,
    datagram: &Pending,
) {
    let transmit = Transmit {
        destination: datagram.destination,
        ecn: datagram.ecn,
        contents: &datagram.data,
        segment_size: None,
        src_ip: datagram.src_ip,
    };
    if let Err(e) = send_transmit(inner, poller, &transmit).await {
        // Like quinn itself: a failed send is a lost datagram, not a fatal error.
        tracing::debug!(dest = %datagram.destination, error = %e, "wan: inner send failed; datagram dropped");
    }
}

/// Hands `transmit` to `inner`, awaiting writability and retrying on `WouldBlock`. Returns the
/// inner socket's error if it refused the transmit; if the socket cannot even be polled for
/// writability the transmit is dropped (logged) and `Ok` returned, as retrying cannot help.
async fn send_transmit(
    inner: &dyn AsyncUdpSocket,
    poller: &mut Pin<Box<dyn UdpPoller>>,
    transmit: &Transmit<'_>,
) -> io::Result<()> {
    loop {
        match inner.try_send(transmit) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await {
                    tracing::debug!(dest = %transmit.destination, error = %e, "wan: inner socket not writable; datagrams dropped");
                    return Ok(());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use quinn::Runtime as _;

    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn model_is_deterministic_per_seed() {
        let cond = LinkCondition {
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(3),
            rate_bps: Some(50_000_000),
            queue_bytes: Some(30_000),
            loss: Loss::bursty(0.05, 2.0),
        };
        let start = t0();
        let run = |seed| {
            let mut m = LinkModel::new(cond.clone(), seed);
            (0..20_000u64)
                .map(|i| {
                    let now = start + Duration::from_micros(i * 100);
                    m.on_packet(now, 200 + (i as usize * 37) % 1300)
                })
                .collect::<Vec<_>>()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        assert!(a.contains(&Verdict::Drop(DropReason::Loss)));
        assert!(a.contains(&Verdict::Drop(DropReason::QueueFull)));
        assert!(a.iter().any(|v| matches!(v, Verdict::Deliver { .. })));
    }

    #[test]
    fn rate_spaces_departures_and_tail_drops() {
        let cond = LinkCondition::none()
            .with_rate_bps(Some(100_000_000))
            .with_queue_bytes(Some(15_000))
            .with_delay(Duration::from_millis(5));
        let mut m = LinkModel::new(cond, 1);
        let now = t0();
        let spacing = Duration::from_micros(120);
        for i in 1..=10u32 {
            assert_eq!(
                m.on_packet(now, 1500),
                Verdict::Deliver { at: now + spacing * i + Duration::from_millis(5) },
                "packet {i}"
            );
        }
        assert_eq!(m.queued_bytes(now), 15_000);
        for _ in 0..5 {
            assert_eq!(m.on_packet(now, 1500), Verdict::Drop(DropReason::QueueFull));
        }
        // Half drained: room for exactly 5 more, each behind the backlog.
        let mid = now + spacing * 5;
        assert_eq!(m.queued_bytes(mid), 7_500);
        for i in 11..=15u32 {
            assert_eq!(
                m.on_packet(mid, 1500),
                Verdict::Deliver { at: now + spacing * i + Duration::from_millis(5) }
            );
        }
        assert_eq!(m.on_packet(mid, 1500), Verdict::Drop(DropReason::QueueFull));
        // A tail drop does not advance the queue: once it drains, the next packet goes at once.
        let later = now + spacing * 15;
        assert_eq!(m.queued_bytes(later), 0);
        assert_eq!(
            m.on_packet(later, 1500),
            Verdict::Deliver { at: later + spacing + Duration::from_millis(5) }
        );
        let s = m.stats();
        assert_eq!((s.delivered_packets, s.queue_dropped_packets), (16, 6));
        assert_eq!((s.delivered_bytes, s.queue_dropped_bytes), (24_000, 9_000));
        assert_eq!(s.offered_packets(), 22);
    }

    #[test]
    fn default_queue_is_bdp_with_floor() {
        let lossy = LinkPreset::Transatlantic.condition();
        // 1 Gbit/s × 100 ms / 8 = 12.5 MB.
        assert_eq!(lossy.effective_queue_bytes(), 12_500_000);
        let tiny = LinkCondition::none().with_rate_bps(Some(1_000_000));
        assert_eq!(tiny.effective_queue_bytes(), 64 * 1024);
        assert_eq!(tiny.clone().with_queue_bytes(Some(10)).effective_queue_bytes(), 10);
        let mut m = LinkModel::new(tiny.with_queue_bytes(Some(10)), 0);
        assert_eq!(m.on_packet(t0(), 11), Verdict::Drop(DropReason::QueueFull));
        let mut dead = LinkModel::new(LinkCondition::none().with_rate_bps(Some(0)), 0);
        assert_eq!(dead.on_packet(t0(), 1), Verdict::Drop(DropReason::QueueFull));
    }

    #[test]
    fn unloaded_link_adds_exactly_the_delay() {
        let delay = Duration::from_millis(20);
        let mut m = LinkModel::new(LinkCondition::none().with_delay(delay), 9);
        let start = t0();
        for i in 0..100u32 {
            let now = start + Duration::from_millis(1) * i;
            assert_eq!(m.on_packet(now, 1200), Verdict::Deliver { at: now + delay });
        }
        // With a rate, an idle link adds only delay + one serialization time.
        let mut m = LinkModel::new(LinkPreset::Continental.condition(), 9);
        for i in 0..100u32 {
            let now = start + Duration::from_millis(1) * i;
            let ser = Duration::from_nanos(1200 * 8); // 1200 B at 1 Gbit/s
            assert_eq!(
                m.on_packet(now, 1200),
                Verdict::Deliver { at: now + Duration::from_millis(20) + ser }
            );
        }
    }

    #[test]
    fn jitter_never_reorders() {
        let delay = Duration::from_millis(10);
        let jitter = Duration::from_millis(5);
        let mut m = LinkModel::new(LinkCondition::none().with_delay(delay).with_jitter(jitter), 3);
        let start = t0();
        let mut last = start;
        let mut jittered = 0;
        for i in 0..10_000u32 {
            let now = start + Duration::from_micros(100) * i;
            let Verdict::Deliver { at } = m.on_packet(now, 1000) else {
                panic!("no loss configured")
            };
            assert!(at >= last, "reordered at packet {i}");
            assert!(at >= now + delay);
            // The clamp can hold a packet back to its predecessor's arrival, never beyond.
            assert!(at <= (now + delay + jitter).max(last));
            if at > now + delay {
                jittered += 1;
            }
            last = at;
        }
        assert!(jittered > 5_000, "jitter barely applied: {jittered}");
    }

    #[test]
    fn random_loss_rate_matches_p() {
        let p = 0.05;
        let mut m = LinkModel::new(LinkCondition::none().with_loss(Loss::Random { p }), 11);
        let now = t0();
        let n = 200_000;
        let lost =
            (0..n).filter(|_| m.on_packet(now, 100) == Verdict::Drop(DropReason::Loss)).count();
        let rate = lost as f64 / n as f64;
        assert!((rate - p).abs() <= 0.1 * p, "loss rate {rate}");
        assert_eq!(m.stats().lost_packets, lost as u64);
    }

    #[test]
    fn bursty_loss_matches_mean_and_burst_length() {
        let loss = Loss::bursty(0.01, 3.0);
        assert!((loss.mean_loss() - 0.01).abs() < 1e-12);
        let mut m = LinkModel::new(LinkCondition::none().with_loss(loss), 5);
        let now = t0();
        let n = 1_000_000;
        let (mut lost, mut bursts, mut in_burst) = (0u64, 0u64, false);
        for _ in 0..n {
            let dropped = m.on_packet(now, 100) == Verdict::Drop(DropReason::Loss);
            if dropped {
                lost += 1;
                if !in_burst {
                    bursts += 1;
                }
            }
            in_burst = dropped;
        }
        let mean_loss = lost as f64 / n as f64;
        let mean_burst = lost as f64 / bursts as f64;
        assert!((mean_loss - 0.01).abs() <= 0.15 * 0.01, "mean loss {mean_loss}");
        assert!((mean_burst - 3.0).abs() <= 0.2 * 3.0, "mean burst {mean_burst}");
    }

    #[test]
    fn bursty_edge_cases() {
        assert_eq!(Loss::bursty(0.0, 3.0), Loss::None);
        assert_eq!(Loss::bursty(f64::NAN, 3.0), Loss::None);
        assert!((Loss::bursty(1.0, 3.0).mean_loss() - 1.0).abs() < 1e-12);
        // Burst below one packet counts as one: independent-looking loss at the asked rate.
        assert!((Loss::bursty(0.2, 0.1).mean_loss() - 0.2).abs() < 1e-12);
        assert!((Loss::Random { p: 2.0 }.mean_loss() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn presets_parse_display_and_conditions() {
        for preset in LinkPreset::ALL {
            let name = preset.to_string();
            assert_eq!(name.parse::<LinkPreset>(), Ok(preset));
            assert_eq!(name.to_uppercase().parse::<LinkPreset>(), Ok(preset));
        }
        let err = "mars".parse::<LinkPreset>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mars"), "{msg}");
        for preset in LinkPreset::ALL {
            assert!(msg.contains(preset.name()), "{msg}");
        }
        assert_eq!(LinkPreset::Transatlantic.condition().rtt(), Duration::from_millis(100));
        assert_eq!(LinkPreset::Lan.condition().rtt(), Duration::from_micros(200));
        assert_eq!(LinkPreset::Intercontinental.condition().rate_bps, Some(500_000_000));
        assert_eq!(LinkPreset::Lossy.condition().loss, Loss::bursty(0.01, 3.0));
        let slow = LinkPreset::Metro.condition().with_rate_bps(Some(250_000_000));
        assert_eq!(slow.rate_bps, Some(250_000_000));
        assert_eq!(slow.delay, LinkPreset::Metro.condition().delay);
        assert_eq!(LinkCondition::default(), LinkCondition::none());
    }

    #[test]
    fn per_destination_seeds_are_stable_and_distinct() {
        let a: SocketAddr = "10.0.0.1:4433".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:4433".parse().unwrap();
        assert_eq!(derive_seed(1, a), derive_seed(1, a));
        assert_ne!(derive_seed(1, a), derive_seed(1, b));
        assert_ne!(derive_seed(1, a), derive_seed(2, a));
    }

    fn udp_pair() -> (Arc<dyn AsyncUdpSocket>, Arc<dyn AsyncUdpSocket>) {
        let wrap = |s| quinn::TokioRuntime.wrap_udp_socket(s).unwrap();
        (
            wrap(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()),
            wrap(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()),
        )
    }

    /// Receives one batch and splits it into datagrams (GRO may coalesce several).
    async fn recv_datagrams(sock: &dyn AsyncUdpSocket) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        let mut meta = [RecvMeta::default()];
        let n = poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            sock.poll_recv(cx, &mut bufs, &mut meta)
        })
        .await
        .unwrap();
        assert_eq!(n, 1);
        let stride = meta[0].stride.max(1);
        buf[..meta[0].len].chunks(stride).map(<[u8]>::to_vec).collect()
    }

    #[tokio::test]
    async fn shell_delays_splits_and_releases_inner_socket() {
        let (a, b) = udp_pair();
        let delay = Duration::from_millis(20);
        let wan = WanSocket::new(Arc::clone(&a), LinkCondition::none().with_delay(delay), 1);
        let dest = b.local_addr().unwrap();
        assert_eq!(wan.local_addr().unwrap(), a.local_addr().unwrap());

        let sent = std::time::Instant::now();
        let transmit = Transmit {
            destination: dest,
            ecn: None,
            contents: b"hello",
            segment_size: None,
            src_ip: None,
        };
        wan.try_send(&transmit).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), recv_datagrams(&*b)).await.unwrap();
        let elapsed = sent.elapsed();
        assert_eq!(got, vec![b"hello".to_vec()]);
        assert!(elapsed >= delay, "arrived after {elapsed:?}");
        assert!(elapsed < Duration::from_millis(500), "arrived after {elapsed:?}");

        // A GSO batch of three 100-byte segments plus a 40-byte tail arrives as four datagrams.
        let mut batch = Vec::new();
        for i in 0..4u8 {
            batch.extend(std::iter::repeat_n(i, if i == 3 { 40 } else { 100 }));
        }
        let transmit = Transmit {
            destination: dest,
            ecn: None,
            contents: &batch,
            segment_size: Some(100),
            src_ip: None,
        };
        wan.try_send(&transmit).unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            let more = tokio::time::timeout(Duration::from_secs(2), recv_datagrams(&*b)).await;
            got.extend(more.unwrap());
        }
        let expected: Vec<Vec<u8>> = batch.chunks(100).map(<[u8]>::to_vec).collect();
        assert_eq!(got, expected);
        let stats = wan.stats();
        assert_eq!((stats.delivered_packets, stats.delivered_bytes), (5, 345));
        assert_eq!(wan.stats_by_destination(), vec![(dest, stats)]);

        // Dropping the WanSocket ends the pump, which gives back its handles on the inner socket.
        drop(wan);
        let released = tokio::time::timeout(Duration::from_secs(1), async {
            while Arc::strong_count(&a) > 1 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        assert!(released.is_ok(), "pump still holds the inner socket");
    }

    #[tokio::test]
    async fn shell_drops_per_model_and_never_fails() {
        let (a, b) = udp_pair();
        let cond = LinkCondition::none().with_loss(Loss::Random { p: 1.0 });
        let wan = WanSocket::new(a, cond, 1);
        let transmit = Transmit {
            destination: b.local_addr().unwrap(),
            ecn: None,
            contents: &[7u8; 300],
            segment_size: Some(100),
            src_ip: None,
        };
        wan.try_send(&transmit).unwrap();
        assert_eq!(wan.stats().lost_packets, 3);
        assert_eq!(wan.stats().delivered_packets, 0);
        let nothing = tokio::time::timeout(Duration::from_millis(30), recv_datagrams(&*b)).await;
        assert!(nothing.is_err(), "a lost datagram arrived");
    }

    fn pending(destination: SocketAddr, len: usize) -> Pending {
        Pending { at: t0(), seq: 0, destination, ecn: None, src_ip: None, data: vec![0; len] }
    }

    #[test]
    fn batch_len_follows_the_gso_contract() {
        let a: SocketAddr = "10.0.0.1:4433".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:4433".parse().unwrap();
        let run = |lens: &[usize]| lens.iter().map(|&len| pending(a, len)).collect::<Vec<_>>();
        assert_eq!(batch_len(&[], 64), 0);
        // Equal segments, then a shorter one that must end the batch.
        assert_eq!(batch_len(&run(&[1200, 1200, 1200, 500, 500]), 64), 4);
        // A longer datagram cannot follow.
        assert_eq!(batch_len(&run(&[1200, 1200, 1300]), 64), 2);
        // Capped by the inner socket's segment limit (1 = no GSO at all).
        assert_eq!(batch_len(&run(&[100; 10]), 4), 4);
        assert_eq!(batch_len(&run(&[100; 10]), 1), 1);
        assert_eq!(batch_len(&run(&[100; 10]), 0), 1);
        // Capped by the largest UDP payload.
        assert_eq!(batch_len(&run(&[1452; 64]), 64), MAX_BATCH_BYTES / 1452);
        assert_eq!(batch_len(&run(&[30_000, 30_000, 30_000]), 64), 2);
        // Empty datagrams are never batched.
        assert_eq!(batch_len(&run(&[0, 0]), 64), 1);
        assert_eq!(batch_len(&run(&[100, 0]), 64), 1);
        // Another destination, ECN or source address ends the batch.
        let mut mixed = run(&[100, 100, 100, 100]);
        mixed[2].destination = b;
        assert_eq!(batch_len(&mixed, 64), 2);
        let mut mixed = run(&[100, 100, 100]);
        mixed[1].ecn = Some(EcnCodepoint::Ect0);
        assert_eq!(batch_len(&mixed, 64), 1);
        let mut mixed = run(&[100, 100, 100]);
        mixed[2].src_ip = Some("127.0.0.1".parse().unwrap());
        assert_eq!(batch_len(&mixed, 64), 2);
    }

    /// Forwards to a real socket, recording every transmit it passes on as (length, segment
    /// size). It can refuse the first few sends with `WouldBlock`, and every GSO send with an
    /// error as a NIC without segmentation offload would.
    #[derive(Debug)]
    struct Recording {
        inner: Arc<dyn AsyncUdpSocket>,
        would_block: std::sync::atomic::AtomicUsize,
        refuse_gso: bool,
        sent: Mutex<Vec<(usize, Option<usize>)>>,
    }

    impl Recording {
        fn new(inner: Arc<dyn AsyncUdpSocket>, would_block: usize, refuse_gso: bool) -> Arc<Self> {
            Arc::new(Self {
                inner,
                would_block: would_block.into(),
                refuse_gso,
                sent: Mutex::new(Vec::new()),
            })
        }

        fn sent(&self) -> Vec<(usize, Option<usize>)> {
            self.sent.lock().unwrap().clone()
        }
    }

    impl AsyncUdpSocket for Recording {
        fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
            Arc::clone(&self.inner).create_io_poller()
        }

        fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
            let blocked = self.would_block.fetch_update(
                AtomicOrdering::Relaxed,
                AtomicOrdering::Relaxed,
                |n| n.checked_sub(1),
            );
            if blocked.is_ok() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if self.refuse_gso && transmit.segment_size.is_some() {
                return Err(io::Error::other("GSO refused"));
            }
            self.inner.try_send(transmit)?;
            self.sent.lock().unwrap().push((transmit.contents.len(), transmit.segment_size));
            Ok(())
        }

        fn poll_recv(
            &self,
            cx: &mut Context<'_>,
            bufs: &mut [IoSliceMut<'_>],
            meta: &mut [RecvMeta],
        ) -> Poll<io::Result<usize>> {
            self.inner.poll_recv(cx, bufs, meta)
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            self.inner.local_addr()
        }

        fn max_transmit_segments(&self) -> usize {
            if self.refuse_gso { 64 } else { self.inner.max_transmit_segments() }
        }
    }

    /// 50 datagrams of 1200 bytes and a 500-byte tail, each tagged with its index, sent as one
    /// GSO transmit through a WanSocket so that all fall due at the same instant.
    async fn send_burst_and_receive(inner: Arc<dyn AsyncUdpSocket>, receiver: &dyn AsyncUdpSocket) {
        let wan =
            WanSocket::new(inner, LinkCondition::none().with_delay(Duration::from_millis(5)), 1);
        let expected: Vec<Vec<u8>> = (0..51u8)
            .map(|i| {
                let mut datagram = vec![i; if i == 50 { 500 } else { 1200 }];
                datagram[0] = 0xA5;
                datagram
            })
            .collect();
        let contents = expected.concat();
        let transmit = Transmit {
            destination: receiver.local_addr().unwrap(),
            ecn: None,
            contents: &contents,
            segment_size: Some(1200),
            src_ip: None,
        };
        wan.try_send(&transmit).unwrap();
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let more = tokio::time::timeout(Duration::from_secs(2), recv_datagrams(receiver)).await;
            got.extend(more.expect("burst incomplete"));
        }
        assert_eq!(got.len(), expected.len());
        for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
            assert!(got == want, "datagram {i}: {} bytes, tag {}", got.len(), got[1]);
        }
        assert_eq!(wan.stats().delivered_packets, 51);
    }

    #[tokio::test]
    async fn burst_is_coalesced_and_arrives_complete_in_order() {
        let (a, b) = udp_pair();
        let max_segments = a.max_transmit_segments();
        // Two WouldBlocks first: the pump must wait and retry the same batch, not drop it.
        let recording = Recording::new(a, 2, false);
        send_burst_and_receive(Arc::clone(&recording) as _, &*b).await;
        let sent = recording.sent();
        assert_eq!(sent.iter().map(|(len, _)| len).sum::<usize>(), 50 * 1200 + 500);
        if max_segments >= 51 {
            assert_eq!(sent, vec![(50 * 1200 + 500, Some(1200))]);
        } else {
            // No (or little) GSO on this host: batches no larger than the socket allows.
            assert_eq!(sent.len(), 51usize.div_ceil(max_segments.max(1)));
        }
    }

    #[tokio::test]
    async fn refused_gso_batch_falls_back_to_single_datagrams() {
        let (a, b) = udp_pair();
        let recording = Recording::new(a, 0, true);
        send_burst_and_receive(Arc::clone(&recording) as _, &*b).await;
        let sent = recording.sent();
        assert_eq!(sent.len(), 51);
        assert!(sent.iter().all(|&(_, segment_size)| segment_size.is_none()), "{sent:?}");
    }
}
