//! The agent: the worker's async side. It joins the coordinator once (the identity is kept in
//! the state directory), keeps a session open through coordinator restarts and network blips
//! (exponential backoff with full jitter), heartbeats, relays the coordinator's commands to the
//! trainer thread ([`Down`]) and its reports upstream, and leases shards.
//!
//! Aborts are the agent's to fire: when an epoch is superseded, aborted or the run stopped, the
//! agent cancels the trainer's current [`Attempt`] at once, which aborts the collective in
//! flight (or the ring being formed), whatever the trainer thread is doing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use client::ConnectConfig;
use client::{AgentRpc, agent_client};
use collectives::group::Member;
use proto::pb;
use proto::pb::agent_client::AgentClient;
use proto::pb::agent_message::Msg as Up;
use proto::pb::coordinator_message::Msg as DownMsg;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::trainer::{Agreement, InnerStates, Plan};

/// How often the agent heartbeats (the coordinator suspects a worker after 3 s of silence).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Reports kept while the session is down (oldest dropped first).
const PENDING_CAP: usize = 512;

/// The worker's identity at one coordinator, as issued by `Join`.
#[derive(Clone, Serialize, Deserialize)]
pub struct Identity {
    pub coordinator: String,
    pub ca_pin: String,
    pub worker_id: u64,
    pub member_name: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("coordinator", &self.coordinator)
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("identity.json")
    }

    /// The identity saved in `state_dir` for the coordinator whose CA is `ca_pin`, if any.
    pub fn load(state_dir: &Path, ca_pin: &str) -> Result<Option<Self>> {
        let path = Self::path(state_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let id: Self = serde_json::from_slice(&bytes).with_context(|| {
            format!("{} is damaged; delete it to join again with a token", path.display())
        })?;
        Ok((id.ca_pin == ca_pin).then_some(id))
    }

    /// Saves the identity (owner-only permissions: it holds the private key), atomically.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = Self::path(state_dir);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(self)?;
        {
            use std::io::Write;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(&json)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The ring's TLS identity and trust anchor.
    pub fn ring_tls(&self) -> Result<(collectives::tls::Identity, collectives::tls::TrustAnchor)> {
        let id = collectives::tls::Identity::from_pem(
            self.cert_pem.as_bytes(),
            self.key_pem.as_bytes(),
        )?;
        let anchor = collectives::tls::TrustAnchor::from_pem(self.ca_pem.as_bytes())?;
        Ok((id, anchor))
    }

    /// An authenticated agent client.
    pub fn client(&self, cfg: &ConnectConfig) -> Result<AgentRpc> {
        agent_client(cfg, self.worker_id, &self.cert_pem, &self.key_pem)
    }
}

/// Joins the coordinator with `token`, returning the new identity.
pub async fn join(
    cfg: &ConnectConfig,
    token: &str,
    host: &str,
    ring_addr: &str,
) -> Result<Identity> {
    let (csr, key) = client::pki::new_csr().context("generating a key and CSR")?;
    let mut rpc = AgentClient::new(client::channel(cfg, None)?);
    let resp = rpc
        .join(pb::JoinRequest {
            token: token.trim().to_owned(),
            csr_pem: csr,
            host: host.to_owned(),
            ring_addr: ring_addr.to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("joining {}: {}", cfg.url, s.message()))?
        .into_inner();
    Ok(Identity {
        coordinator: cfg.url.clone(),
        ca_pin: cfg.ca_pin.clone(),
        worker_id: resp.worker_id,
        member_name: resp.member_name,
        cert_pem: resp.cert_pem,
        key_pem: key,
        ca_pem: resp.ca_pem,
    })
}

/// A command for the trainer thread, in its own terms: the wire's messages are read here, once,
/// and never reach the driver.
#[derive(Clone, Debug)]
pub enum Down {
    Epoch(EpochInfo),
    /// The coordinator's decision for an epoch's start.
    Agreement {
        run: u64,
        epoch: u64,
        agreement: Agreement,
    },
    /// The plan of one synchronisation.
    Plan {
        run: u64,
        epoch: u64,
        plan: Plan,
    },
    /// A message of this epoch that could not be read (a coordinator bug, never a peer's
    /// doing): the epoch fails here, and the driver says why.
    Unreadable {
        run: u64,
        epoch: u64,
        why: String,
    },
    Checkpoint {
        run: u64,
        step: u64,
    },
    Stop {
        run: u64,
        state: i32,
        reason: String,
    },
    /// Recompute another member's contribution (an audit).
    Audit(pb::AuditTask),
    /// The session is lost for good (the coordinator no longer knows this worker).
    Fatal(String),
}

/// An epoch as the coordinator announced it.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochInfo {
    pub run: u64,
    pub epoch: u64,
    /// Ring order.
    pub members: Vec<RingMember>,
    pub total_steps: u64,
    /// The run file; "" when the coordinator sent it with an earlier epoch of the run (the
    /// driver keeps it from there).
    pub run_toml: String,
}

/// A member of an epoch's ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingMember {
    pub worker_id: u64,
    pub member: Member,
}

impl EpochInfo {
    fn from_wire(e: pb::EpochChange) -> Result<Self, String> {
        let members = e
            .members
            .into_iter()
            .map(|m| {
                let addr = m.addr.parse::<SocketAddr>().map_err(|_| {
                    format!("member {} has a bad ring address {:?}", m.name, m.addr)
                })?;
                Ok(RingMember { worker_id: m.worker_id, member: Member { name: m.name, addr } })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            run: e.run_id,
            epoch: e.epoch,
            members,
            total_steps: e.total_steps,
            run_toml: e.run_toml,
        })
    }
}

fn agreement_from_wire(a: &pb::Agreement) -> Result<Agreement, String> {
    let hash = proto::convert::param_hash("agreement.param_hash", &a.param_hash)
        .map_err(|e| e.to_string())?;
    let ranks = |v: &[u32]| v.iter().map(|r| *r as usize).collect::<Vec<_>>();
    Ok(Agreement {
        step: a.step,
        hash,
        source: a.source as usize,
        receivers: ranks(&a.receivers),
        contributors: ranks(&a.contributors),
    })
}

/// What the trainer is doing in the ring right now: cancelled by the agent when that ends.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub run: u64,
    pub epoch: u64,
    pub token: CancellationToken,
    pub reason: Arc<Mutex<String>>,
}

impl Attempt {
    pub fn new(run: u64, epoch: u64) -> Self {
        Self { run, epoch, token: CancellationToken::new(), reason: Arc::default() }
    }

    pub fn cancel(&self, reason: String) {
        if let Ok(mut r) = self.reason.lock()
            && r.is_empty()
        {
            *r = reason;
        }
        self.token.cancel();
    }

    pub fn reason(&self) -> String {
        self.reason.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// The agent's ends of the links to the trainer thread.
#[derive(Debug)]
pub struct AgentSide {
    pub down: mpsc::UnboundedSender<Down>,
    pub up: mpsc::UnboundedReceiver<Up>,
    pub attempt: Arc<Mutex<Option<Attempt>>>,
    pub rtts: LinkRtts,
    pub inner: InnerStates,
}

/// The trainer's ends.
#[derive(Debug)]
pub struct TrainerSide {
    pub down: mpsc::UnboundedReceiver<Down>,
    pub up: mpsc::UnboundedSender<Up>,
    pub attempt: Arc<Mutex<Option<Attempt>>>,
    pub rtts: LinkRtts,
    pub inner: InnerStates,
}

/// The newest round-trip time measured to each ring peer (worker id → µs): the trainer writes
/// what its ring's QUIC connections measured, every heartbeat carries it to the coordinator,
/// which orders rings by it. Kept across epochs; at most [`LinkRtts::MAX`] peers.
#[derive(Clone, Debug, Default)]
pub struct LinkRtts(Arc<Mutex<std::collections::BTreeMap<u64, u32>>>);

impl LinkRtts {
    pub const MAX: usize = 256;

    pub fn record(&self, measured: &[(u64, Duration)]) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for (peer, rtt) in measured {
            if m.len() >= Self::MAX && !m.contains_key(peer) {
                m.clear(); // a worker that met this many peers keeps the newest
            }
            m.insert(*peer, u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX).max(1));
        }
    }

    pub fn to_wire(&self) -> Vec<pb::PeerRtt> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(&worker_id, &rtt_us)| pb::PeerRtt { worker_id, rtt_us }).collect()
    }
}

/// A pair of linked ends.
pub fn link() -> (AgentSide, TrainerSide) {
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let attempt = Arc::new(Mutex::new(None));
    let rtts = LinkRtts::default();
    let inner = InnerStates::default();
    (
        AgentSide {
            down: down_tx,
            up: up_rx,
            attempt: attempt.clone(),
            rtts: rtts.clone(),
            inner: inner.clone(),
        },
        TrainerSide { down: down_rx, up: up_tx, attempt, rtts, inner },
    )
}

/// Exponential backoff with full jitter: a uniformly random wait up to `min(cap, base·2^n)`.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, attempt: 0 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1 << self.attempt.min(16)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

/// Keeps the session with the coordinator until `shutdown`: reconnects with backoff, replays
/// unsent reports, relays commands and fires aborts.
pub async fn run_session(
    cfg: ConnectConfig,
    identity: Identity,
    state_dir: Option<PathBuf>,
    ring_addr: String,
    mut side: AgentSide,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(15));
    let mut pending: VecDeque<Up> = VecDeque::new();
    let mut seq = 0u64;
    let mut identity = identity;
    let mut last = Resend::default();
    let uploads = crate::upload::Uploads::default();
    let checkpoints =
        state_dir.as_deref().map(|d| crate::trainer::checkpoint::root(d, &identity.ca_pin));
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        // A certificate past two thirds of its life is renewed (same key) before the session.
        if let Some(dir) = &state_dir
            && let Err(e) = renew_if_due(&cfg, &mut identity, dir).await
        {
            warn!("renewing the certificate: {e:#}");
        }
        let started = tokio::time::Instant::now();
        match session_once(
            &cfg,
            &identity,
            &ring_addr,
            &mut side,
            (&mut pending, &mut last, &mut seq),
            &shutdown,
            (&checkpoints, &uploads),
        )
        .await
        {
            Ok(()) => return,
            Err(SessionEnd::Fatal(msg)) => {
                warn!("{msg}");
                let _ = side.down.send(Down::Fatal(msg));
                return;
            }
            Err(SessionEnd::Lost(msg)) => {
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
                let wait = backoff.next_delay();
                warn!("coordinator session lost ({msg}); reconnecting in {wait:.1?}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

enum SessionEnd {
    Lost(String),
    Fatal(String),
}

/// Renews the certificate over the authenticated channel when less than a third of its
/// validity is left, and saves the identity (the driver reads it at the next epoch).
async fn renew_if_due(
    cfg: &ConnectConfig,
    identity: &mut Identity,
    state_dir: &Path,
) -> Result<()> {
    let (left, total) = client::pki::cert_validity(&identity.cert_pem)?;
    if left > total / 3 {
        return Ok(());
    }
    let csr = client::pki::csr_for_key(&identity.key_pem)?;
    let mut rpc = identity.client(cfg)?;
    let resp = rpc
        .renew(pb::RenewRequest { csr_pem: csr })
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    identity.cert_pem = resp.cert_pem;
    identity.save(state_dir)?;
    info!(worker = identity.worker_id, "certificate renewed");
    Ok(())
}

/// The last commitment and the last state report sent: sent again on every new session, so a
/// message lost with a broken session (sent, never processed) does not leave the ring waiting
/// for it. The coordinator takes a repeat of either as the same message.
#[derive(Debug, Default)]
struct Resend {
    commit: Option<Up>,
    report: Option<Up>,
}

impl Resend {
    fn note(&mut self, m: &Up) {
        match m {
            Up::SyncCommit(_) => self.commit = Some(m.clone()),
            Up::StepCommitted(_) => self.report = Some(m.clone()),
            _ => {}
        }
    }
}

async fn session_once(
    cfg: &ConnectConfig,
    identity: &Identity,
    ring_addr: &str,
    side: &mut AgentSide,
    (pending, last, seq): (&mut VecDeque<Up>, &mut Resend, &mut u64),
    shutdown: &CancellationToken,
    (checkpoints, uploads): (&Option<PathBuf>, &crate::upload::Uploads),
) -> Result<(), SessionEnd> {
    let mut rpc = identity.client(cfg).map_err(|e| SessionEnd::Fatal(format!("{e:#}")))?;
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(256);
    let hello = Up::Hello(pb::Hello { ring_addr: ring_addr.to_owned() });
    tx.send(pb::AgentMessage { msg: Some(hello) }).await.map_err(|_| lost("closed"))?;
    let mut down = match rpc.session(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(classify(&s)),
    };
    info!(worker = identity.worker_id, coordinator = %cfg.url, "session open");
    // The last report and commitment again (harmless repeats if they arrived), then what
    // could not be sent at all.
    for m in [last.report.clone(), last.commit.clone()].into_iter().flatten() {
        if !pending.iter().any(|p| p == &m)
            && tx.send(pb::AgentMessage { msg: Some(m) }).await.is_err()
        {
            return Err(lost("session closed while replaying"));
        }
    }
    while let Some(m) = pending.pop_front() {
        if tx.send(pb::AgentMessage { msg: Some(m.clone()) }).await.is_err() {
            pending.push_front(m);
            return Err(lost("session closed while replaying"));
        }
    }
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = beat.tick() => {
                *seq += 1;
                let hb = Up::Heartbeat(pb::Heartbeat { seq: *seq, rtts: side.rtts.to_wire() });
                if tx.send(pb::AgentMessage { msg: Some(hb) }).await.is_err() {
                    return Err(lost("session closed"));
                }
            }
            m = side.up.recv() => {
                let Some(m) = m else { return Ok(()) }; // the trainer is gone
                last.note(&m);
                if let Err(e) = tx.send(pb::AgentMessage { msg: Some(m) }).await {
                    if let Some(m) = e.0.msg {
                        push_pending(pending, m);
                    }
                    return Err(lost("session closed"));
                }
            }
            m = down.message() => match m {
                Ok(Some(m)) => match m.msg {
                    // Uploads are this side's business (a file read and an RPC), not the
                    // trainer's.
                    Some(DownMsg::Upload(req)) => {
                        tokio::spawn(crate::upload::serve(
                            cfg.clone(),
                            identity.clone(),
                            (checkpoints.clone(), side.inner.clone()),
                            uploads.clone(),
                            req,
                        ));
                    }
                    Some(msg) => on_command(side, msg),
                    None => {}
                },
                Ok(None) => return Err(lost("the coordinator ended the session")),
                Err(s) => return Err(classify(&s)),
            },
        }
    }
}

fn lost(msg: &str) -> SessionEnd {
    SessionEnd::Lost(msg.to_owned())
}

/// An error status that no retry can fix is fatal; the rest are blips.
fn classify(s: &tonic::Status) -> SessionEnd {
    match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied | tonic::Code::NotFound => {
            SessionEnd::Fatal(format!(
                "the coordinator refused this worker's identity ({}: {}); delete identity.json \
                 in the state directory and join again with a token",
                s.code(),
                s.message()
            ))
        }
        _ => SessionEnd::Lost(format!("{}: {}", s.code(), s.message())),
    }
}

fn push_pending(pending: &mut VecDeque<Up>, m: Up) {
    // Metrics are superseded by later ones: only the newest waits (the coordinator bounds how
    // many a session may send at once).
    if matches!(m, Up::Metrics(_)) {
        pending.retain(|p| !matches!(p, Up::Metrics(_)));
    }
    if pending.len() >= PENDING_CAP {
        pending.pop_front();
    }
    pending.push_back(m);
}

/// Relays one command, cancelling the trainer's attempt when the command ends it.
fn on_command(side: &AgentSide, msg: DownMsg) {
    let cancel = |run: u64, pred: &dyn Fn(&Attempt) -> bool, reason: String| {
        if let Ok(a) = side.attempt.lock()
            && let Some(a) = a.as_ref()
            && a.run == run
            && pred(a)
        {
            debug!(run, epoch = a.epoch, %reason, "aborting the ring");
            a.cancel(reason);
        }
    };
    match msg {
        DownMsg::HeartbeatAck(_) | DownMsg::Upload(_) => {}
        DownMsg::Epoch(e) => {
            let (run, epoch) = (e.run_id, e.epoch);
            cancel(run, &|a| a.epoch < epoch, format!("epoch {epoch} announced"));
            let _ = side.down.send(match EpochInfo::from_wire(e) {
                Ok(e) => Down::Epoch(e),
                Err(why) => Down::Unreadable { run, epoch, why },
            });
        }
        DownMsg::Abort(a) => {
            let epoch = a.epoch;
            cancel(a.run_id, &|x| x.epoch <= epoch, format!("coordinator: {}", a.reason));
        }
        DownMsg::Checkpoint(c) => {
            let _ = side.down.send(Down::Checkpoint { run: c.run_id, step: c.step });
        }
        DownMsg::Agreement(a) => {
            let (run, epoch) = (a.run_id, a.epoch);
            let _ = side.down.send(match agreement_from_wire(&a) {
                Ok(agreement) => Down::Agreement { run, epoch, agreement },
                Err(why) => Down::Unreadable { run, epoch, why },
            });
        }
        DownMsg::Audit(task) => {
            let _ = side.down.send(Down::Audit(task));
        }
        DownMsg::SyncPlan(p) => {
            let plan = Plan { step: p.step, coefficients: p.coefficients, declared: p.declared };
            let _ = side.down.send(Down::Plan { run: p.run_id, epoch: p.epoch, plan });
        }
        DownMsg::Stop(s) => {
            // A completed run's last synchronisation has committed: members still finishing
            // it must not be aborted. Any other stop ends the ring at once.
            if s.state != pb::RunState::Completed as i32 {
                cancel(s.run_id, &|_| true, format!("run stopped: {}", s.reason));
            }
            let _ = side.down.send(Down::Stop { run: s.run_id, state: s.state, reason: s.reason });
        }
    }
}

/// A shard lease, in the agent's terms.
#[derive(Clone, Debug)]
pub struct Lease {
    pub id: u64,
    pub run: u64,
    pub shard: u32,
    pub uri: String,
    pub url: String,
    pub size: u64,
    pub sha256: String,
    pub data_epoch: u64,
    /// A held shard shared with its holder (nothing to complete).
    pub shared: bool,
    /// The coordinator's proof of the lease, echoed in commitments.
    pub grant: String,
}

impl From<pb::ShardLease> for Lease {
    fn from(l: pb::ShardLease) -> Self {
        Self {
            id: l.lease_id,
            run: l.run_id,
            shard: l.shard,
            uri: l.uri,
            url: l.url,
            size: l.size,
            sha256: l.sha256,
            data_epoch: l.data_epoch,
            shared: l.shared,
            grant: l.grant,
        }
    }
}

/// Leases the next shard: `Ok(None)` with a wait when nothing is available now.
pub async fn lease(rpc: &mut AgentRpc) -> Result<Result<Lease, Duration>> {
    let resp = rpc
        .lease_shard(pb::LeaseShardRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("leasing a shard: {}: {}", s.code(), s.message()))?
        .into_inner();
    match resp.result {
        Some(pb::lease_shard_response::Result::Lease(l)) => Ok(Ok(Lease::from(l))),
        Some(pb::lease_shard_response::Result::RetryAfterMs(ms)) => {
            Ok(Err(Duration::from_millis(u64::from(ms).clamp(50, 30_000))))
        }
        None => bail!("the coordinator answered a lease request with nothing"),
    }
}

/// Reports a finished shard.
pub async fn complete(rpc: &mut AgentRpc, lease: u64, samples: u64) -> Result<()> {
    rpc.complete_shard(pb::CompleteShardRequest { lease_id: lease, samples })
        .await
        .map_err(|s| anyhow::anyhow!("completing lease {lease}: {}: {}", s.code(), s.message()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_jitters_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<Duration> = (0..40).map(|_| b.next_delay()).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(2)));
        // Full jitter: not all the same, and later waits can exceed the first ceiling.
        assert!(waits[10..].iter().any(|w| *w > Duration::from_millis(100)));
        assert!(waits.windows(2).any(|w| w[0] != w[1]));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn commands_cancel_only_the_attempts_they_end() {
        let (agent, _trainer) = link();
        let set = |run, epoch| {
            let a = Attempt::new(run, epoch);
            *agent.attempt.lock().unwrap() = Some(a.clone());
            a
        };
        let epoch = |run, epoch| {
            DownMsg::Epoch(pb::EpochChange { run_id: run, epoch, ..Default::default() })
        };
        // The same epoch again (a reconnect) or another run's: nothing happens.
        let a = set(1, 5);
        on_command(&agent, epoch(1, 5));
        on_command(&agent, epoch(2, 9));
        assert!(!a.token.is_cancelled());
        // A newer epoch ends it.
        on_command(&agent, epoch(1, 6));
        assert!(a.token.is_cancelled());
        assert_eq!(a.reason(), "epoch 6 announced");
        // An abort of an older epoch does not end the current one; of this one, it does.
        let a = set(1, 6);
        on_command(&agent, DownMsg::Abort(pb::Abort { run_id: 1, epoch: 5, reason: "x".into() }));
        assert!(!a.token.is_cancelled());
        on_command(&agent, DownMsg::Abort(pb::Abort { run_id: 1, epoch: 6, reason: "y".into() }));
        assert!(a.token.is_cancelled());
        // A stop ends whatever epoch of its run, unless the run completed (its last sync has
        // committed, and members still finishing it must not be aborted).
        let a = set(1, 7);
        let stop = |state: pb::RunState| {
            DownMsg::Stop(pb::Stop { run_id: 1, state: state as i32, reason: "x".into() })
        };
        on_command(&agent, stop(pb::RunState::Completed));
        assert!(!a.token.is_cancelled());
        on_command(&agent, stop(pb::RunState::Stopped));
        assert!(a.token.is_cancelled());
    }
}
