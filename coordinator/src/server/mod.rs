//! The gRPC server: the thin async shell around [`Cluster`].
//!
//! [`run`] takes a bound listener and a shutdown future (tests bind 127.0.0.1:0). Every call
//! locks the core, feeds the state machine, and leaves with what it changed, serialized, for the
//! [`writer`]: the writer commits batches durably (group commit, on its own thread) and only then
//! delivers their outputs to the workers' sessions and publishes run updates to watchers. No
//! lock is held across disk IO. A ticker drives [`Cluster::tick`].
//!
//! - [`control`]: the `Control` service (the CLI; admin credential).
//! - [`agent`]: the `Agent` service (workers; their certificate), with each session's quotas.
//! - [`limits`]: rate limits and checks of what workers send.
//! - [`writer`]: the store's writer thread and the sessions it delivers to.
//!
//! Security: TLS 1.3 only (rustls, ring). Client certificates are optional at the TLS layer
//! (a joining worker has none yet) and required by every Agent call but `Join`; the Control
//! service requires the admin credential. Limits are explicit: message size, request deadline,
//! handshake deadline, connections, streams per connection, per-session message rates.

pub(crate) mod accept;
mod agent;
mod control;
mod fetch;
mod limits;
mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::convert;
use proto::domain::hash_text;
use proto::pb;
use proto::pb::agent_server::AgentServer;
use proto::pb::control_server::ControlServer;
use proto::{RunId, WorkerId};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::ca::{Pki, PkiError};
use crate::cluster::{self, Cluster, Command, Millis, Output};
use crate::metrics::Telemetry;
use crate::store::{Batch, Store, StoreError};
use client::WORKER_HEADER;
use writer::{Pending, Sessions, Writer};

/// Server settings. The defaults suit a coordinator on the public internet serving up to a few
/// thousand workers.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub state_dir: PathBuf,
    /// Names (DNS or IP) the server certificate is valid for.
    pub server_names: Vec<String>,
    pub cluster: cluster::Config,
    pub tick: Duration,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
    pub handshake_timeout: Duration,
    /// Deadline of every unary call.
    pub request_timeout: Duration,
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    pub max_token_ttl: Duration,
    /// The base URL (`https://host:port`) workers fetch shard bytes from, when the coordinator
    /// serves them; set by [`run`] from the shard listener unless given.
    pub shards_url: Option<String>,
    /// The most bytes one checkpoint copy may have when relayed (`FetchCheckpoint`).
    pub max_checkpoint_bytes: u64,
    /// Checkpoint fetches relayed at once.
    pub max_fetches: usize,
    pub clock: Clock,
}

impl ServerConfig {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            cluster: cluster::Config::default(),
            tick: Duration::from_millis(100),
            max_message_bytes: 4 << 20,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connections: 8192,
            max_streams_per_connection: 256,
            max_token_ttl: Duration::from_secs(30 * 24 * 3600),
            shards_url: None,
            max_checkpoint_bytes: 64 << 30,
            max_fetches: 4,
            clock: Clock::System,
        }
    }

    pub(crate) fn accept_limits(&self) -> accept::AcceptLimits {
        accept::AcceptLimits {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
        }
    }
}

#[derive(Debug, Error)]
pub enum ServeError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Other(String),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

/// Where the coordinator reads the time its state machine runs on: liveness, lease expiry,
/// token expiry, benching, every deadline the cluster keeps. The system clock in production; a
/// manual clock in tests, which then decide when time passes instead of the machine's load.
/// (Certificates are the exception: TLS checks them against the system clock.)
#[derive(Clone, Debug, Default)]
pub enum Clock {
    #[default]
    System,
    /// Milliseconds since the Unix epoch, moved only by [`Clock::advance`].
    Manual(Arc<std::sync::atomic::AtomicU64>),
}

impl Clock {
    /// A manual clock starting at the system time now.
    pub fn manual() -> Self {
        Clock::Manual(Arc::new(now_ms().into()))
    }

    pub fn now_ms(&self) -> Millis {
        match self {
            Clock::System => now_ms(),
            Clock::Manual(t) => t.load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// Moves a manual clock forward; the system clock moves by itself.
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(t) = self {
            t.fetch_add(by.as_millis() as Millis, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// How long shutdown waits for open calls before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// State shared by the services, the ticker, the writer and the metrics endpoint.
#[derive(Debug)]
pub(crate) struct Shared {
    cluster: Mutex<Cluster>,
    /// For reads outside the lock (log history, checkpoints); written by the writer only.
    store: Arc<Store>,
    writer: Writer,
    sessions: Arc<Sessions>,
    pki: Pki,
    events: broadcast::Sender<(RunId, pb::RunEvent)>,
    config: ServerConfig,
    pub(crate) telemetry: Telemetry,
    /// Checkpoint transfers asked of workers, and the fetches under way.
    transfers: fetch::Transfers,
    shutdown: tokio_util::sync::CancellationToken,
}

/// Whether a call may add to the writer's backlog when it is long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admit {
    /// Liveness and time (heartbeats, ticks): always.
    Always,
    /// Anything that adds writes: refused while the store is behind.
    IfStoreKeepsUp,
}

impl Shared {
    /// The store, for reads outside the state lock.
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn pki(&self) -> &Pki {
        &self.pki
    }

    pub(crate) fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The time the state machine runs on (see [`Clock`]).
    pub(crate) fn now_ms(&self) -> Millis {
        self.config.clock.now_ms()
    }

    /// The state machine. A panic while holding the lock is a bug; what the store holds is
    /// the last consistent state, and the next restart reloads it.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state machine and queues what it changed for the writer; returns `f`'s
    /// result and a receiver that resolves once the changes are durable (and announced).
    fn apply<T>(
        &self,
        admit: Admit,
        f: impl FnOnce(&mut Cluster, Millis) -> Result<T, Status>,
    ) -> Result<(T, oneshot::Receiver<Result<(), String>>), Status> {
        if admit == Admit::IfStoreKeepsUp && self.writer.backlog() > writer::MAX_BACKLOG {
            return Err(Status::unavailable(
                "the coordinator's state store is behind (a slow or full disk); retry later",
            ));
        }
        let now = self.now_ms();
        let mut cluster = self.lock();
        let out = f(&mut cluster, now);
        let pending = collect(&mut cluster, now, self.config.shards_url.as_deref());
        let wait = self.writer.submit(pending);
        drop(cluster);
        Ok((out?, wait))
    }

    /// [`Shared::apply`] without waiting: outputs go out once durable, the call returns now.
    fn with<T>(
        &self,
        admit: Admit,
        f: impl FnOnce(&mut Cluster, Millis) -> Result<T, Status>,
    ) -> Result<T, Status> {
        self.apply(admit, f).map(|(t, _)| t)
    }

    /// Reads the state machine, answering only once everything the answer shows is durable
    /// (changes are submitted under the lock, so the barrier queued under it comes after
    /// every change the read sees): what a user reads never falls back after a crash.
    async fn settled<T>(&self, f: impl FnOnce(&Cluster) -> Result<T, Status>) -> Result<T, Status> {
        let (t, wait) = {
            let c = self.lock();
            (f(&c), self.writer.barrier())
        };
        let t = t?;
        durably(wait).await.map(|()| t)
    }

    /// [`Shared::apply`], returning only once the changes are durable (for answers that name
    /// something stored: a worker id, a lease, a run).
    async fn durable<T>(
        &self,
        f: impl FnOnce(&mut Cluster, Millis) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let (t, wait) = self.apply(Admit::IfStoreKeepsUp, f)?;
        durably(wait).await.map(|()| t)
    }
}

/// Waits for the writer's answer: durable, or the status that says why not.
async fn durably(wait: oneshot::Receiver<Result<(), String>>) -> Result<(), Status> {
    match wait.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Status::unavailable(e)),
        Err(_) => Err(Status::unavailable("the coordinator is shutting down")),
    }
}

/// Everything the state machine changed and produced since the last call, serialized.
fn collect(c: &mut Cluster, now: Millis, shards_url: Option<&str>) -> Pending {
    let cluster::Ready { dirty, outputs } = c.ready();
    let mut batch = match Batch::collect(c, &dirty) {
        Ok(b) => b,
        Err(e) => {
            // Serializing our own records cannot fail short of a bug; keep serving.
            warn!(error = %e, "cannot serialize state records");
            Batch::default()
        }
    };
    batch.append_outputs(now, outputs.iter());
    let mut p = Pending { batch, ..Pending::default() };
    for d in &dirty {
        if let cluster::Dirty::Run(id) = d
            && let Some(r) = c.run(*id)
        {
            let info = run_info(c, r);
            let event =
                pb::RunEvent { unix_ms: now, event: Some(pb::run_event::Event::Status(info)) };
            p.events.push((*id, event));
        }
    }
    for out in outputs {
        match out {
            Output::ToWorker(to, cmd) => p.commands.push((to, command_to_wire(c, cmd, shards_url))),
            Output::Log { run, line } => {
                let event =
                    pb::RunEvent { unix_ms: now, event: Some(pb::run_event::Event::Log(line)) };
                p.events.push((run, event));
            }
            Output::Metric { .. }
            | Output::Checkpoint { .. }
            | Output::Commitment { .. }
            | Output::Audit { .. } => {}
        }
    }
    p
}

pub(crate) fn run_info(c: &Cluster, r: &cluster::RunRecord) -> pb::RunInfo {
    pb::RunInfo {
        run_id: r.id.0,
        name: r.name.clone(),
        state: pb::RunState::from(r.state) as i32,
        epoch: r.epoch.0,
        committed_step: r.committed_step,
        total_steps: r.total_steps,
        workers: r.members.len() as u32,
        min_workers: r.min_workers,
        max_workers: r.max_workers,
        loss: r.loss.filter(|l| l.is_finite()),
        tokens_per_sec: if r.tokens_per_sec.is_finite() { r.tokens_per_sec } else { 0.0 },
        restarts: r.restarts,
        restart_budget: r.restart_budget,
        message: r.message.clone(),
        created_unix_ms: r.created_ms,
        updated_unix_ms: r.updated_ms,
        data_epoch: c.shards(r.id).map(|b| b.data_epoch()).unwrap_or(0),
        accuracy: r.accuracy.filter(|a| a.is_finite()),
        compute_utilisation: c.compute_utilisation(r.id),
        bytes_moved: c.bytes_moved(r.id),
        committed_hash: hash_text(r.committed_hash),
        latest_checkpoint: r.latest_checkpoint.clone(),
        ring: r.members.iter().map(|m| m.worker.0).collect(),
        ring_rtt_us: c.ring_rtts(r.id).into_iter().map(|us| us.unwrap_or(0)).collect(),
    }
}

fn command_to_wire(c: &Cluster, cmd: Command, shards_url: Option<&str>) -> pb::CoordinatorMessage {
    use pb::coordinator_message::Msg;
    let ranks = |v: &[usize]| v.iter().map(|r| *r as u32).collect::<Vec<u32>>();
    let msg = match cmd {
        Command::Epoch(e) => Msg::Epoch(pb::EpochChange {
            run_id: e.run.0,
            epoch: e.epoch.0,
            members: e
                .members
                .iter()
                .map(|m| pb::RingMember {
                    worker_id: m.worker.0,
                    name: m.worker.member_name(),
                    addr: m.addr.to_string(),
                })
                .collect(),
            committed_step: e.committed_step,
            total_steps: e.total_steps,
            run_toml: if e.with_spec {
                c.run(e.run).map(|r| r.spec_toml.clone()).unwrap_or_default()
            } else {
                String::new()
            },
            committed_hash: hash_text(e.committed_hash),
        }),
        Command::Abort { run, epoch, reason } => {
            Msg::Abort(pb::Abort { run_id: run.0, epoch: epoch.0, reason })
        }
        Command::Checkpoint { run, step } => {
            Msg::Checkpoint(pb::Checkpoint { run_id: run.0, step })
        }
        Command::Upload { run, step, transfer, inner } => Msg::Upload(pb::UploadRequest {
            transfer_id: transfer,
            run_id: run.0,
            step,
            inner_sha256: inner.map(|d| client::pki::hex(&d)).unwrap_or_default(),
        }),
        Command::Stop { run, state, reason } => {
            Msg::Stop(pb::Stop { run_id: run.0, state: pb::RunState::from(state) as i32, reason })
        }
        Command::Agreement(a) => Msg::Agreement(pb::Agreement {
            run_id: a.run.0,
            epoch: a.epoch.0,
            step: a.step,
            param_hash: hash_text(a.hash),
            source: a.source as u32,
            receivers: ranks(&a.receivers),
            contributors: ranks(&a.contributors),
        }),
        Command::Plan(p) => Msg::SyncPlan(pb::SyncPlan {
            run_id: p.run.0,
            epoch: p.epoch.0,
            step: p.step,
            coefficients: p.coefficients,
            declared: p.declared,
            excluded: p.excluded,
        }),
        Command::Audit(a) => Msg::Audit(audit_to_wire(c, a, shards_url)),
    };
    pb::CoordinatorMessage { msg: Some(msg) }
}

/// An audit task: the spans to recompute and where each shard they name is read from.
fn audit_to_wire(
    c: &Cluster,
    a: cluster::audits::AuditInfo,
    shards_url: Option<&str>,
) -> pb::AuditTask {
    let mut shards: Vec<pb::ShardLease> = Vec::new();
    let book = c.shards(a.run);
    for s in &a.spans {
        if shards.iter().any(|l| l.shard == s.shard && l.data_epoch == s.data_epoch) {
            continue;
        }
        let Some(rec) = book.and_then(|b| b.record(s.shard)) else { continue };
        shards.push(pb::ShardLease {
            url: crate::shard_server::shard_url(shards_url, a.run, s.shard, &rec.info),
            lease_id: s.lease.0,
            run_id: a.run.0,
            shard: s.shard,
            uri: rec.info.uri.clone(),
            size: rec.info.size,
            sha256: rec.info.sha256.clone(),
            data_epoch: s.data_epoch,
            shared: s.shared,
            ..Default::default()
        });
    }
    pb::AuditTask {
        run_id: a.run.0,
        audit_id: a.id,
        step: a.step,
        start_hash: a.start_hash.to_string(),
        spans: a
            .spans
            .iter()
            .map(|s| pb::DataSpan {
                lease_id: s.lease.0,
                shard: s.shard,
                data_epoch: s.data_epoch,
                from: s.from,
                to: s.to,
                grant: String::new(),
                shared: s.shared,
            })
            .collect(),
        rank: a.rank as u32,
        worker_id: a.target.0,
        shards,
        inner_start_sha256: a.inner.map(|d| client::pki::hex(&d)).unwrap_or_default(),
        inner_state_bytes: a.inner_bytes,
    }
}

pub(crate) fn worker_info(c: &Cluster, w: &cluster::WorkerRecord, now: Millis) -> pb::WorkerInfo {
    let live = c.liveness(w.id).unwrap_or(proto::Liveness::Dead);
    let latest = c.latest_metrics(w.id);
    pb::WorkerInfo {
        worker_id: w.id.0,
        name: w.id.member_name(),
        host: w.host.clone(),
        ring_addr: w.addr.to_string(),
        liveness: pb::Liveness::from(live) as i32,
        run_id: w.run.map(|r| r.0),
        last_heartbeat_unix_ms: c.last_heartbeat(w.id).unwrap_or(0),
        samples: w.ledger.samples,
        steps: w.ledger.steps,
        bytes: w.ledger.bytes,
        uptime_ms: c.uptime(w.id).unwrap_or(w.ledger.uptime_ms),
        joined_unix_ms: w.joined_ms,
        loss: latest.and_then(|m| m.loss),
        param_hash: hash_text(latest.and_then(|m| m.param_hash)),
        compute_utilisation: latest.and_then(cluster::Metrics::compute_utilisation).unwrap_or(0.0),
        syncs: w.ledger.syncs,
        excluded: w.ledger.excluded,
        verified_samples: w.ledger.verified_samples,
        audits_passed: w.ledger.audits_passed,
        strikes: w.ledger.strikes,
        audits_performed: w.ledger.audits_performed,
        audits_wrong: w.ledger.audits_wrong,
        benched_until_unix_ms: c.benched_until(w.id, now),
        banned_from: w.banned.iter().map(|r| r.0).collect(),
        sitting_out_of: c.sits_out_of_runs(w.id).map(|r| r.0).collect(),
    }
}

/// The worker an Agent call comes from: the id it names, proven by its client certificate.
fn worker_identity<T>(req: &Request<T>) -> Result<WorkerId, Status> {
    let id = req
        .metadata()
        .get(WORKER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .and_then(|v| convert::worker_id(v).ok())
        .ok_or_else(|| {
            Status::unauthenticated(format!("missing or invalid {WORKER_HEADER} header"))
        })?;
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required (join first)"))?;
    let cert = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required (join first)"))?;
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
    let name = rustls::pki_types::ServerName::try_from(id.member_name())
        .map_err(|_| Status::unauthenticated("bad worker name"))?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|_| Status::permission_denied(format!("the client certificate is not {id}'s")))?;
    Ok(id)
}

/// Clamps a page size: 0 means 100, at most 1000.
fn page_size(v: u32) -> usize {
    match v {
        0 => 100,
        n => n.min(1000) as usize,
    }
}

// ---- serving ----

/// Whether a TLS listener demands a client certificate from the run's CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientCerts {
    /// Not asked for (the web dashboard: a browser would prompt for one).
    None,
    /// Verified when presented (the control service uses the admin credential instead).
    Optional,
    /// Required: the handshake fails without one.
    Required,
}

/// TLS 1.3 server configuration with the coordinator's certificate; client certificates are
/// verified against the run's CA.
pub(crate) fn tls_config(
    pki: &Pki,
    client_certs: ClientCerts,
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der().clone())?;
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let versions = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_certs {
        ClientCerts::None => {
            let mut cfg = versions
                .with_no_client_auth()
                .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())?;
            cfg.alpn_protocols = vec![alpn.to_vec()];
            return Ok(Arc::new(cfg));
        }
        ClientCerts::Optional => builder.allow_unauthenticated(),
        ClientCerts::Required => builder,
    };
    let verifier = builder.build().map_err(|e| ServeError::Other(e.to_string()))?;
    let mut cfg = versions
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain.clone(), pki.server_key.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(cfg))
}

/// Opens the state (creating the CA and credentials on first start) and restores the cluster.
pub(crate) fn open(config: ServerConfig) -> Result<Arc<Shared>, ServeError> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| ServeError::Other(format!("{}: {e}", config.state_dir.display())))?;
    let pki = Pki::open_or_create(&config.state_dir, &config.server_names)?;
    let store = Arc::new(Store::open(&config.state_dir.join("state.redb"))?);
    let (loaded, quarantined) = store.load()?;
    for q in &quarantined {
        warn!(key = %q.key, reason = %q.reason, "state record unreadable: moved to the quarantine table");
    }
    let now = config.clock.now_ms();
    let mut cluster_config = config.cluster.clone();
    cluster_config.audit_key = pki.audit_key();
    let mut cluster = Cluster::restore(cluster_config, now, loaded);
    let (events, _) = broadcast::channel(1024);
    let sessions = Arc::new(Sessions::default());
    let writer = Writer::start(store.clone(), sessions.clone(), events.clone());
    // What restoring changed (runs failed for a damaged record) is first in the writer's queue,
    // so it is durable before anything a request changes; no caller waits on it.
    drop(writer.submit(collect(&mut cluster, now, config.shards_url.as_deref())));
    let transfers = fetch::Transfers::new(config.max_fetches.max(1));
    Ok(Arc::new(Shared {
        cluster: Mutex::new(cluster),
        store,
        writer,
        sessions,
        pki,
        events,
        config,
        telemetry: Telemetry::default(),
        transfers,
        shutdown: tokio_util::sync::CancellationToken::new(),
    }))
}

/// The listeners a coordinator serves on.
#[derive(Debug)]
pub struct Listeners {
    /// The gRPC API: the `Control` and `Agent` services, over TLS.
    pub api: TcpListener,
    /// `/metrics` and `/healthz` over plain HTTP ([`crate::metrics`]).
    pub metrics: Option<TcpListener>,
    /// Shard bytes over HTTPS ([`crate::shard_server`]); lease responses then carry each
    /// shard's URL.
    pub shards: Option<TcpListener>,
    /// The web dashboard ([`crate::dashboard`]): plain HTTP on loopback, HTTPS elsewhere.
    pub dashboard: Option<TcpListener>,
}

impl Listeners {
    /// The gRPC API alone.
    pub fn api(api: TcpListener) -> Self {
        Self { api, metrics: None, shards: None, dashboard: None }
    }
}

/// Serves the coordinator on `listeners` until `shutdown` completes: the one entry point of the
/// server (the binary, the tests and the benchmarks all start it here).
pub async fn run(
    listeners: Listeners,
    mut config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let Listeners { api: listener, metrics, shards, dashboard } = listeners;
    if let Some(s) = &shards
        && config.shards_url.is_none()
    {
        let port = s.local_addr().map_err(|e| ServeError::Other(e.to_string()))?.port();
        let host = config.server_names.first().map(String::as_str).unwrap_or("localhost");
        let host = match host.parse::<std::net::Ipv6Addr>() {
            Ok(_) => format!("[{host}]"),
            Err(_) => host.to_owned(),
        };
        config.shards_url = Some(format!("https://{host}:{port}"));
    }
    if shards.is_none() {
        config.shards_url = None;
    }
    let shared = open(config.clone())?;
    let tls =
        tokio_rustls::TlsAcceptor::from(tls_config(&shared.pki, ClientCerts::Optional, b"h2")?);
    let local = listener.local_addr().map_err(|e| ServeError::Other(e.to_string()))?;
    info!(addr = %local, ca = %shared.pki.ca_hash(), "coordinator listening");

    let cancel = shared.shutdown.clone();
    let shutdown_all = {
        let cancel = cancel.clone();
        async move {
            shutdown.await;
            cancel.cancel();
        }
    };
    tokio::spawn(shutdown_all);

    // Ticker.
    {
        let shared = shared.clone();
        let cancel = cancel.clone();
        let tick = config.tick;
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(tick);
            iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return,
                    _ = iv.tick() => {
                        let _ = shared.with(Admit::Always, |c, now| { c.tick(now); Ok(()) });
                    }
                }
            }
        });
    }

    if let Some(m) = metrics {
        let shared = shared.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(m, shared, cancel.cancelled_owned()).await {
                warn!(error = %e, "metrics endpoint failed");
            }
        });
    }

    if let Some(s) = shards {
        let shared = shared.clone();
        let cancel = cancel.clone();
        if let Err(e) = crate::shard_server::serve(s, shared, cancel) {
            warn!(error = %e, "shard endpoint failed");
        }
    }

    if let Some(d) = dashboard
        && let Err(e) = crate::dashboard::serve(d, shared.clone(), cancel.clone())
    {
        warn!(error = %e, "dashboard failed");
    }

    // Accept TCP, handshake TLS with a deadline, hand the streams to tonic.
    let incoming =
        accept::tls_incoming(listener, tls, config.accept_limits(), cancel.clone(), "api");
    let incoming = ReceiverStream::new(incoming)
        .map(|a| Ok::<_, std::io::Error>(PermitStream { inner: a.stream, _permit: a.permit }));

    let limit = config.max_message_bytes;
    let control = ControlServer::new(control::ControlSvc(shared.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let auth = {
        let shared = shared.clone();
        move |req: Request<()>| -> Result<Request<()>, Status> {
            let token = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match token {
                Some(t) if shared.pki.is_admin(t) => Ok(req),
                Some(_) => Err(Status::permission_denied("the admin credential is wrong")),
                None => Err(Status::unauthenticated(
                    "the control API needs the admin credential: pass --admin-token or set LONGHAUL_ADMIN_TOKEN \
                     (the coordinator wrote it to admin.token in its state directory)",
                )),
            }
        }
    };
    let agent = AgentServer::new(agent::AgentSvc(shared.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let serve = tonic::transport::Server::builder()
        .timeout(config.request_timeout)
        .concurrency_limit_per_connection(config.max_streams_per_connection as usize)
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(tonic::service::interceptor::InterceptedService::new(control, auth))
        .add_service(agent)
        .serve_with_incoming_shutdown(incoming, cancel.clone().cancelled_owned());
    // Graceful shutdown waits for open calls; after a grace period the rest are cut.
    let served = tokio::select! {
        r = serve => r,
        _ = async { cancel.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            info!("grace period over; closing the remaining connections");
            Ok(())
        }
    };
    // The tasks that hold the state end with the cancellation; then the writer commits what
    // is queued and releases the store (a coordinator restarted in the same process can open it).
    cancel.cancel();
    for _ in 0..100 {
        if Arc::strong_count(&shared) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writer = shared.clone();
    let _ = tokio::task::spawn_blocking(move || writer.writer.close()).await;
    drop(shared);
    served?;
    info!("coordinator stopped");
    Ok(())
}

/// A TLS stream holding its connection permit.
struct PermitStream {
    inner: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for PermitStream {
    type ConnectInfo = <tokio_rustls::server::TlsStream<tokio::net::TcpStream> as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl tokio::io::AsyncRead for PermitStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PermitStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The `Control` service over `shared`, for callers in this process (the dashboard reads
/// through it, so that it shows what the CLI shows).
pub(crate) fn control_service(shared: Arc<Shared>) -> control::ControlSvc {
    control::ControlSvc(shared)
}
