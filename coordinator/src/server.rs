//! The gRPC server: the thin async shell around [`Cluster`].
//!
//! [`run`] takes a bound listener and a shutdown future (tests bind 127.0.0.1:0). Every RPC
//! locks the core, feeds the state machine, persists what it marked dirty (one redb transaction),
//! and only then delivers its outputs to the workers' sessions and publishes run updates to
//! watchers. A ticker drives [`Cluster::tick`].
//!
//! Security: TLS 1.3 only (rustls, ring). Client certificates are optional at the TLS layer
//! (a joining worker has none yet) and required by every Agent call but `Join`; the Control
//! service requires the admin credential. Limits are explicit: message size, request deadline,
//! handshake deadline, connections, streams per connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use proto::convert::{self, WireError};
use proto::pb;
use proto::pb::agent_server::{Agent, AgentServer};
use proto::pb::control_server::{Control, ControlServer};
use proto::{RunId, RunState, WorkerId};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::ca::{Pki, PkiError, new_secret, secret_hash};
use crate::client::WORKER_HEADER;
use crate::cluster::{self, Cluster, Command, Millis, Output};
use crate::metrics::Telemetry;
use crate::runfile::RunSpec;
use crate::shard_server::shard_path;
use crate::shards::{LeaseError, Manifest};
use crate::store::{CheckpointRecord, MetricPoint, Store, StoreError};

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
    /// serves them; set by [`run_all`] from the shard listener unless given.
    pub shards_url: Option<String>,
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

/// How long shutdown waits for open calls before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

type SessionTx = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// What the lock guards.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) cluster: Cluster,
    pub(crate) store: Store,
    sessions: HashMap<WorkerId, (u64, SessionTx)>,
    next_session: u64,
}

/// State shared by the services, the ticker and the metrics endpoint.
#[derive(Debug)]
pub(crate) struct Shared {
    core: Mutex<Core>,
    pki: Pki,
    events: broadcast::Sender<(RunId, pb::RunEvent)>,
    config: ServerConfig,
    pub(crate) telemetry: Telemetry,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Shared {
    pub(crate) fn pki(&self) -> &Pki {
        &self.pki
    }

    pub(crate) fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock is a bug; the state is still the last consistent one
        // the store holds, so continue with it rather than take the server down.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state machine, then persists and delivers what it produced.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Cluster, Millis, &Store) -> Result<T, Status>,
    ) -> Result<T, Status> {
        let now = now_ms();
        let mut core = self.lock();
        let core = &mut *core;
        let out = f(&mut core.cluster, now, &core.store);
        self.flush(core, now)?;
        out
    }

    fn flush(&self, core: &mut Core, now: Millis) -> Result<(), Status> {
        let dirty = core.cluster.take_dirty();
        if let Err(e) = core.store.persist(&core.cluster, &dirty) {
            // Deliver nothing that is not durable; the outputs are regenerated (sessions
            // re-hear their epoch on reconnect).
            warn!(error = %e, "persisting state failed");
            while core.cluster.poll_output().is_some() {}
            return Err(Status::unavailable(format!("state store: {e}")));
        }
        for d in &dirty {
            if let cluster::Dirty::Run(id) = d
                && let Some(r) = core.cluster.run(*id)
            {
                let info = run_info(&core.cluster, r);
                let _ = self.events.send((
                    *id,
                    pb::RunEvent { unix_ms: now, event: Some(pb::run_event::Event::Status(info)) },
                ));
            }
        }
        while let Some(out) = core.cluster.poll_output() {
            let (to, cmd) = match out {
                Output::ToWorker(to, cmd) => (to, cmd),
                Output::Log { run, line } => {
                    warn!(run_id = %run, "{line}");
                    let rec = crate::store::LogLine { at_ms: now, line: line.clone() };
                    if let Err(e) = core.store.append_log(run, &rec) {
                        warn!(run_id = %run, error = %e, "cannot persist a run log line");
                    }
                    let event = pb::run_event::Event::Log(line);
                    let _ =
                        self.events.send((run, pb::RunEvent { unix_ms: now, event: Some(event) }));
                    continue;
                }
            };
            let Some((_, tx)) = core.sessions.get(&to) else { continue };
            let msg = command_to_wire(&core.cluster, cmd);
            if tx.try_send(Ok(msg)).is_err() {
                // A session that cannot keep up is closed; the worker reconnects and hears
                // its epoch again.
                warn!(worker = %to, "session queue full or closed; dropping the session");
                core.sessions.remove(&to);
            }
        }
        Ok(())
    }
}

fn run_info(c: &Cluster, r: &cluster::RunRecord) -> pb::RunInfo {
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
        loss: r.loss,
        tokens_per_sec: r.tokens_per_sec,
        restarts: r.restarts,
        restart_budget: r.restart_budget,
        message: r.message.clone(),
        created_unix_ms: r.created_ms,
        updated_unix_ms: r.updated_ms,
        data_epoch: c.shards(r.id).map(|b| b.data_epoch()).unwrap_or(0),
        accuracy: r.accuracy,
        compute_utilisation: c.compute_utilisation(r.id),
        bytes_moved: c.bytes_moved(r.id),
        committed_hash: r.committed_hash.clone(),
        latest_checkpoint: r.latest_checkpoint.clone(),
    }
}

fn command_to_wire(c: &Cluster, cmd: Command) -> pb::CoordinatorMessage {
    use pb::coordinator_message::Msg;
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
            run_toml: c.run(e.run).map(|r| r.spec_toml.clone()).unwrap_or_default(),
            committed_hash: e.committed_hash,
        }),
        Command::Abort { run, epoch, reason } => {
            Msg::Abort(pb::Abort { run_id: run.0, epoch: epoch.0, reason })
        }
        Command::Checkpoint { run, step } => {
            Msg::Checkpoint(pb::Checkpoint { run_id: run.0, step })
        }
        Command::Stop { run, state, reason } => {
            Msg::Stop(pb::Stop { run_id: run.0, state: pb::RunState::from(state) as i32, reason })
        }
    };
    pb::CoordinatorMessage { msg: Some(msg) }
}

fn worker_info(c: &Cluster, w: &cluster::WorkerRecord) -> pb::WorkerInfo {
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
        param_hash: latest.map(|m| m.param_hash.clone()).unwrap_or_default(),
        compute_utilisation: latest.and_then(cluster::Metrics::compute_utilisation).unwrap_or(0.0),
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

fn status_of_lease(e: LeaseError) -> Status {
    match e {
        LeaseError::UnknownWorker => Status::not_found(e.to_string()),
        LeaseError::NotInRun | LeaseError::NotHeld(_) => Status::failed_precondition(e.to_string()),
    }
}

// ---- the control service ----

#[derive(Clone, Debug)]
struct ControlSvc(Arc<Shared>);

type EventStream = Pin<Box<dyn futures::Stream<Item = Result<pb::RunEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlSvc {
    async fn submit_run(
        &self,
        req: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::SubmitRunResponse>, Status> {
        let _t = self.0.telemetry.time("SubmitRun");
        let text = req.into_inner().run_toml;
        let spec = RunSpec::parse(&text)
            .map_err(|e| Status::invalid_argument(format!("run file: {e}")))?;
        // Reading a manifest, or hashing a one-file dataset, may take a while: off the runtime.
        let dataset = spec.dataset.clone();
        let manifest = tokio::task::spawn_blocking(move || Manifest::for_dataset(&dataset))
            .await
            .map_err(|e| Status::internal(format!("reading the dataset: {e}")))?
            .map_err(|e| Status::failed_precondition(format!("dataset.uri: {e}")))?;
        let id = self.0.with(|c, now, _| {
            c.submit(now, &spec, &text, manifest)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        })?;
        info!(run_id = %id, name = %spec.name, "run submitted");
        Ok(Response::new(pb::SubmitRunResponse { run_id: id.0 }))
    }

    async fn get_run(
        &self,
        req: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        let id = convert::run_id(req.into_inner().run_id)?;
        let core = self.0.lock();
        let r = core.cluster.run(id).ok_or_else(|| Status::not_found(format!("no run {id}")))?;
        Ok(Response::new(run_info(&core.cluster, r)))
    }

    async fn list_runs(
        &self,
        _req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let core = self.0.lock();
        let runs = core.cluster.runs().map(|r| run_info(&core.cluster, r)).collect();
        Ok(Response::new(pb::ListRunsResponse { runs }))
    }

    async fn stop_run(
        &self,
        req: Request<pb::StopRunRequest>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        let req = req.into_inner();
        let id = convert::run_id(req.run_id)?;
        let reason =
            if req.reason.is_empty() { "stopped by a user".to_owned() } else { req.reason };
        self.0
            .with(|c, now, _| {
                c.stop(now, id, &reason).map_err(|e| match e {
                    cluster::RunError::NoSuchRun(_) => Status::not_found(e.to_string()),
                    cluster::RunError::Ended(..) => Status::failed_precondition(e.to_string()),
                })?;
                let r = c.run(id).ok_or_else(|| Status::not_found(format!("no run {id}")))?;
                Ok(run_info(c, r))
            })
            .map(Response::new)
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        req: Request<pb::WatchRunRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let id = convert::run_id(req.into_inner().run_id)?;
        let mut rx = self.0.events.subscribe();
        let (first, history) = {
            let core = self.0.lock();
            let r =
                core.cluster.run(id).ok_or_else(|| Status::not_found(format!("no run {id}")))?;
            let history = core.store.log(id).map_err(|e| Status::unavailable(e.to_string()))?;
            (run_info(&core.cluster, r), history)
        };
        let shared = self.0.clone();
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut last = first;
            let terminal = |i: &pb::RunInfo| {
                convert::run_state(i.state).map(RunState::is_terminal).unwrap_or(true)
            };
            let ev = |i: pb::RunInfo| {
                Ok(pb::RunEvent { unix_ms: now_ms(), event: Some(pb::run_event::Event::Status(i)) })
            };
            // The log so far, then the state now, then every change.
            for l in history {
                let e = pb::RunEvent {
                    unix_ms: l.at_ms,
                    event: Some(pb::run_event::Event::Log(l.line)),
                };
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if tx.send(ev(last.clone())).await.is_err() || terminal(&last) {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok((run, e)) if run == id => {
                        if let Some(pb::run_event::Event::Status(i)) = &e.event {
                            last = i.clone();
                        }
                        if tx.send(Ok(e)).await.is_err() || terminal(&last) {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let info = {
                            let core = shared.lock();
                            core.cluster.run(id).map(|r| run_info(&core.cluster, r))
                        };
                        let Some(info) = info else { return };
                        last = info.clone();
                        if tx.send(ev(info)).await.is_err() || terminal(&last) {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn list_workers(
        &self,
        _req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let core = self.0.lock();
        let workers = core.cluster.workers().map(|w| worker_info(&core.cluster, w)).collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let ttl = match req.into_inner().ttl_seconds {
            0 => Duration::from_secs(3600),
            s => Duration::from_secs(s),
        };
        if ttl > self.0.config.max_token_ttl {
            return Err(Status::invalid_argument(format!(
                "ttl {}s is longer than the maximum {}s",
                ttl.as_secs(),
                self.0.config.max_token_ttl.as_secs()
            )));
        }
        let token = new_secret("lh_join_");
        let expires = now_ms() + ttl.as_millis() as Millis;
        self.0
            .lock()
            .store
            .add_token(&secret_hash(&token), expires)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::CreateJoinTokenResponse { token, expires_unix_ms: expires }))
    }
}

// ---- the agent service ----

#[derive(Clone, Debug)]
struct AgentSvc(Arc<Shared>);

type SessionStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentSvc {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let _t = self.0.telemetry.time("Join");
        let req = req.into_inner();
        let hash = secret_hash(req.token.trim());
        let now = now_ms();
        let expiry = self
            .0
            .lock()
            .store
            .token_expiry(&hash)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        match expiry {
            None => return Err(Status::unauthenticated("join token not recognised")),
            Some(t) if t <= now => {
                return Err(Status::unauthenticated(format!(
                    "join token expired {} s ago; create a new one with `longhaul token create`",
                    (now - t) / 1000
                )));
            }
            Some(_) => {}
        }
        let addr = convert::socket_addr("ring_addr", &req.ring_addr)?;
        if req.host.len() > 253 {
            return Err(WireError::new("host", "longer than 253 bytes").into());
        }
        let (id, cert_pem) = self.0.with(|c, now, _| {
            let next = WorkerId(c.counters().next_worker);
            let cert = self
                .0
                .pki
                .sign_worker(&req.csr_pem, &next.member_name())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let id = c.join(now, &req.host, addr);
            debug_assert_eq!(id, next);
            Ok((id, cert))
        })?;
        info!(worker_id = %id, host = %req.host, "worker joined");
        Ok(Response::new(pb::JoinResponse {
            worker_id: id.0,
            member_name: id.member_name(),
            cert_pem,
            ca_pem: self.0.pki.ca_pem().to_owned(),
        }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let id = worker_identity(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let shared = self.0.clone();
        let span = info_span!("session", worker_id = %id);
        tokio::spawn(
            async move {
                let gen_ = {
                    let mut core = shared.lock();
                    if core.cluster.worker(id).is_none() {
                        let _ = tx.try_send(Err(Status::not_found(format!("unknown worker {id}; join again"))));
                        return;
                    }
                    core.next_session += 1;
                    let g = core.next_session;
                    core.sessions.insert(id, (g, tx.clone()));
                    g
                };
                debug!("session opened");
                loop {
                    let msg = tokio::select! {
                        _ = shared.shutdown.cancelled() => {
                            let _ = tx.try_send(Err(Status::unavailable("the coordinator is shutting down; reconnect")));
                            break;
                        }
                        msg = inbound.next() => msg,
                    };
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            debug!(error = %e, "session stream ended");
                            break;
                        }
                        None => break,
                    };
                    if let Err(e) = handle_agent_message(&shared, id, &tx, msg) {
                        let _ = tx.try_send(Err(e));
                        break;
                    }
                }
                let mut core = shared.lock();
                if core.sessions.get(&id).is_some_and(|(g, _)| *g == gen_) {
                    core.sessions.remove(&id);
                }
                debug!("session closed");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_shard(
        &self,
        req: Request<pb::LeaseShardRequest>,
    ) -> Result<Response<pb::LeaseShardResponse>, Status> {
        let _t = self.0.telemetry.time("LeaseShard");
        let id = worker_identity(&req)?;
        let lease = self.0.with(|c, now, _| c.lease(now, id).map_err(status_of_lease))?;
        use pb::lease_shard_response::Result as R;
        let result = match lease {
            Some(l) => R::Lease(pb::ShardLease {
                // Synthetic shards are generated by the worker: there is nothing to fetch.
                url: match &self.0.config.shards_url {
                    Some(base) if !l.info.is_synthetic() => {
                        format!("{base}{}", shard_path(l.run, l.shard))
                    }
                    _ => String::new(),
                },
                lease_id: l.id.0,
                run_id: l.run.0,
                shard: l.shard,
                uri: l.info.uri,
                size: l.info.size,
                sha256: l.info.sha256,
                data_epoch: l.data_epoch,
                shared: l.shared,
                expires_unix_ms: l.expires,
            }),
            None => R::RetryAfterMs(1000),
        };
        Ok(Response::new(pb::LeaseShardResponse { result: Some(result) }))
    }

    async fn complete_shard(
        &self,
        req: Request<pb::CompleteShardRequest>,
    ) -> Result<Response<pb::CompleteShardResponse>, Status> {
        let _t = self.0.telemetry.time("CompleteShard");
        let id = worker_identity(&req)?;
        let req = req.into_inner();
        let lease = convert::lease_id(req.lease_id)?;
        self.0
            .with(|c, now, _| c.complete(now, id, lease, req.samples).map_err(status_of_lease))?;
        Ok(Response::new(pb::CompleteShardResponse {}))
    }
}

fn handle_agent_message(
    shared: &Shared,
    id: WorkerId,
    tx: &SessionTx,
    msg: pb::AgentMessage,
) -> Result<(), Status> {
    use pb::agent_message::Msg;
    let Some(msg) = msg.msg else { return Err(Status::invalid_argument("empty agent message")) };
    match msg {
        Msg::Hello(h) => {
            let addr: Option<SocketAddr> = if h.ring_addr.is_empty() {
                None
            } else {
                Some(convert::socket_addr("ring_addr", &h.ring_addr)?)
            };
            shared.with(|c, now, _| {
                c.session_opened(now, id, addr).map_err(|e| Status::not_found(e.to_string()))
            })
        }
        Msg::Heartbeat(hb) => {
            let _t = shared.telemetry.time("Heartbeat");
            if hb.rtts.len() > 4096 {
                return Err(Status::invalid_argument("too many rtts"));
            }
            let rtts = hb
                .rtts
                .iter()
                .filter(|r| r.worker_id > 0)
                .map(|r| (WorkerId(r.worker_id), r.rtt_us))
                .collect();
            shared.with(|c, now, _| {
                c.heartbeat(now, id, Some(rtts)).map_err(|e| Status::not_found(e.to_string()))
            })?;
            let ack = pb::CoordinatorMessage {
                msg: Some(pb::coordinator_message::Msg::HeartbeatAck(pb::HeartbeatAck {
                    seq: hb.seq,
                })),
            };
            let _ = tx.try_send(Ok(ack));
            Ok(())
        }
        Msg::Metrics(m) => {
            let run = convert::run_id(m.run_id)?;
            let metrics = cluster::Metrics {
                run,
                epoch: convert::epoch(m.epoch),
                step: m.step,
                loss: m.loss,
                accuracy: m.accuracy,
                grad_norm: m.grad_norm,
                tokens_per_sec: m.tokens_per_sec,
                samples: m.samples,
                bytes: m.bytes,
                compute_ms: m.compute_ms,
                comm_ms: m.comm_ms,
                idle_ms: m.idle_ms,
                bytes_sent: m.bytes_sent,
                bytes_received: m.bytes_received,
                param_hash: convert::param_hash("metrics.param_hash", &m.param_hash)?,
            };
            shared.with(|c, now, store| {
                c.metrics(now, id, &metrics);
                let point = MetricPoint {
                    step: m.step,
                    loss: m.loss,
                    tokens_per_sec: m.tokens_per_sec,
                    at_ms: now,
                };
                if c.worker(id).and_then(|w| w.run) == Some(run) {
                    store
                        .add_metric(run, &point)
                        .map_err(|e| Status::unavailable(e.to_string()))?;
                }
                Ok(())
            })
        }
        Msg::StepCommitted(s) => {
            let run = convert::run_id(s.run_id)?;
            let hash = convert::param_hash("step_committed.param_hash", &s.param_hash)?;
            shared.with(|c, now, _| {
                c.step_committed(now, id, run, convert::epoch(s.epoch), s.step, &hash);
                Ok(())
            })
        }
        Msg::MemberFault(f) => {
            let run = convert::run_id(f.run_id)?;
            let accused = convert::worker_id(f.worker_id)?;
            let reason: String = f.reason.chars().take(200).collect();
            shared.with(|c, now, _| {
                c.member_fault(now, id, run, convert::epoch(f.epoch), accused, &reason);
                Ok(())
            })
        }
        Msg::CheckpointDone(cp) => {
            let run = convert::run_id(cp.run_id)?;
            shared.with(|c, _, _| {
                c.checkpoint_done(id, run, cp.step, &cp.uri);
                Ok(())
            })?;
            let rec = CheckpointRecord {
                step: cp.step,
                uri: cp.uri,
                sha256: cp.sha256,
                worker: id.0,
                at_ms: now_ms(),
            };
            shared
                .lock()
                .store
                .add_checkpoint(run, &rec)
                .map_err(|e| Status::unavailable(e.to_string()))
        }
    }
}

// ---- serving ----

/// Whether a TLS listener demands a client certificate from the run's CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientCerts {
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
    let builder = match client_certs {
        ClientCerts::Optional => builder.allow_unauthenticated(),
        ClientCerts::Required => builder,
    };
    let verifier = builder.build().map_err(|e| ServeError::Other(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
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
    let store = Store::open(&config.state_dir.join("state.redb"))?;
    let loaded = store.load()?;
    let cluster = Cluster::restore(
        config.cluster.clone(),
        now_ms(),
        loaded.counters,
        loaded.runs,
        loaded.workers,
        loaded.shards,
    );
    let (events, _) = broadcast::channel(1024);
    Ok(Arc::new(Shared {
        core: Mutex::new(Core { cluster, store, sessions: HashMap::new(), next_session: 0 }),
        pki,
        events,
        config,
        telemetry: Telemetry::default(),
        shutdown: tokio_util::sync::CancellationToken::new(),
    }))
}

/// Serves the coordinator on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with_metrics(listener, None, config, shutdown).await
}

/// Like [`run`], and also serves `/metrics` and `/healthz` over plain HTTP on `metrics`.
pub async fn run_with_metrics(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_all(listener, metrics, None, config, shutdown).await
}

/// Like [`run_with_metrics`], and also serves shard bytes over HTTPS on `shards`
/// ([`crate::shard_server`]); lease responses then carry each shard's URL.
pub async fn run_all(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shards: Option<TcpListener>,
    mut config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
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
                        let _ = shared.with(|c, now, _| { c.tick(now); Ok(()) });
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
        tokio::spawn(async move {
            if let Err(e) = crate::shard_server::serve(s, shared, cancel.cancelled_owned()).await {
                warn!(error = %e, "shard endpoint failed");
            }
        });
    }

    // Accept TCP, handshake TLS with a deadline, hand the streams to tonic.
    let (conn_tx, conn_rx) = mpsc::channel(128);
    {
        let cancel = cancel.clone();
        let limit = Arc::new(Semaphore::new(config.max_connections));
        let handshake_timeout = config.handshake_timeout;
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = cancel.cancelled() => return,
                    p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                };
                let (tcp, peer) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => { warn!(error = %e, "accept failed"); tokio::time::sleep(Duration::from_millis(50)).await; continue; }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let tls = tls.clone();
                let conn_tx = conn_tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = conn_tx
                                .send(Ok::<_, std::io::Error>(PermitStream {
                                    inner: stream,
                                    _permit: permit,
                                }))
                                .await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
    }

    let limit = config.max_message_bytes;
    let control = ControlServer::new(ControlSvc(shared.clone()))
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
    let agent = AgentServer::new(AgentSvc(shared.clone()))
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
        .serve_with_incoming_shutdown(
            ReceiverStream::new(conn_rx),
            cancel.clone().cancelled_owned(),
        );
    // Graceful shutdown waits for open calls; after a grace period the rest are cut.
    tokio::select! {
        r = serve => r?,
        _ = async { cancel.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            info!("grace period over; closing the remaining connections");
        }
    }
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
