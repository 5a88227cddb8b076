//! The `Agent` service: workers. Every call but `Join` is authenticated by the worker's
//! certificate; every value is checked here or in the state machine before it counts.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use proto::convert::{self, WireError};
use proto::pb;
use proto::pb::agent_server::Agent;
use proto::{Epoch, WorkerId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span};

use super::limits::{self, SessionLimits};
use super::writer::{SessionHandle, SessionTx};
use super::{Admit, Shared, worker_identity};
use crate::ca::{Grant, csr_key_id, secret_hash};
use crate::cluster::audits::Answer;
use crate::cluster::commitments::{self, Claim, Span};
use crate::cluster::{self, FaultKind, JoinError, ReportError};
use crate::shard_server::shard_url;
use crate::shards::LeaseError;

/// Segment norms one commitment may carry (one per ring member).
const MAX_RING: usize = 4096;
const MAX_SPANS: usize = proto::MAX_COMMIT_SPANS;
/// How long an upload's first part (which names its transfer) may take.
const UPLOAD_FIRST_PART: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone, Debug)]
pub(super) struct AgentSvc(pub(super) Arc<Shared>);

type SessionStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

fn status_of_lease(e: LeaseError) -> Status {
    match e {
        LeaseError::UnknownWorker => Status::not_found(e.to_string()),
        LeaseError::NotInRun | LeaseError::NotHeld(_) => Status::failed_precondition(e.to_string()),
    }
}

fn status_of_report(e: ReportError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The address a call comes from.
fn remote_ip<T>(req: &Request<T>) -> Option<IpAddr> {
    req.remote_addr().map(|a| a.ip())
}

#[tonic::async_trait]
impl Agent for AgentSvc {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let _t = self.0.telemetry.time("Join");
        let from = remote_ip(&req);
        let req = req.into_inner();
        let hash = secret_hash(req.token.trim());
        let addr = limits::ring_addr("ring_addr", &req.ring_addr, from)?;
        limits::printable("host", &req.host, 253)?;
        let key = csr_key_id(&req.csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = self
            .0
            .durable(|c, now| {
                c.join(now, &hash, &key, &req.host, addr).map_err(|e| match e {
                    JoinError::UnknownToken | JoinError::Expired(_) | JoinError::UsedUp => {
                        Status::unauthenticated(e.to_string())
                    }
                })
            })
            .await?;
        let cert_pem = self
            .0
            .pki
            .sign_worker(&req.csr_pem, &id.member_name())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(worker_id = %id, host = %req.host, "worker joined");
        Ok(Response::new(pb::JoinResponse {
            worker_id: id.0,
            member_name: id.member_name(),
            cert_pem,
            ca_pem: self.0.pki.ca_pem().to_owned(),
        }))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let id = worker_identity(&req)?;
        let csr = req.into_inner().csr_pem;
        let key = csr_key_id(&csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let known = self.0.lock().worker(id).map(|w| w.key.clone());
        match known {
            None => return Err(Status::not_found(format!("unknown worker {id}; join again"))),
            Some(k) if k != key => {
                return Err(Status::permission_denied(format!(
                    "the CSR's key is not {id}'s; a new key joins as a new worker"
                )));
            }
            Some(_) => {}
        }
        let cert_pem = self
            .0
            .pki
            .sign_worker(&csr, &id.member_name())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(worker_id = %id, "certificate renewed");
        Ok(Response::new(pb::RenewResponse { cert_pem, ca_pem: self.0.pki.ca_pem().to_owned() }))
    }

    type UploadCheckpointStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::UploadVerdict, Status>> + Send>>;

    async fn upload_checkpoint(
        &self,
        req: Request<Streaming<pb::CheckpointPart>>,
    ) -> Result<Response<Self::UploadCheckpointStream>, Status> {
        let id = worker_identity(&req)?;
        let mut parts = req.into_inner();
        let first = match tokio::time::timeout(UPLOAD_FIRST_PART, parts.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no first part")),
            Ok(r) => r?.ok_or_else(|| Status::invalid_argument("an upload with no parts"))?,
        };
        let (verdict, rx) = mpsc::channel(1);
        let upload = super::fetch::Upload { first, parts: Box::pin(parts), verdict };
        let transfer = upload.first.transfer_id;
        self.0.transfers.answer(transfer, id, upload)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchAuditStateStream =
        Pin<Box<dyn futures::Stream<Item = Result<pb::CheckpointChunk, Status>> + Send>>;

    async fn fetch_audit_state(
        &self,
        req: Request<pb::FetchAuditStateRequest>,
    ) -> Result<Response<Self::FetchAuditStateStream>, Status> {
        let id = worker_identity(&req)?;
        let r = req.into_inner();
        let run = convert::run_id(r.run_id)?;
        let fetch = self.0.with(Admit::Always, |c, _| {
            c.audit_state(run, r.audit_id, id).map_err(Status::failed_precondition)
        })?;
        let (tx, rx) = mpsc::channel(4);
        let relay = super::fetch::relay_inner_state(self.0.clone(), run, r.audit_id, fetch, tx);
        tokio::spawn(relay);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let id = worker_identity(&req)?;
        let from = remote_ip(&req);
        if self.0.lock().worker(id).is_none() {
            return Err(Status::not_found(format!("unknown worker {id}; join again")));
        }
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let shared = self.0.clone();
        let cancel = CancellationToken::new();
        let generation = {
            use std::sync::atomic::{AtomicU64, Ordering};
            static NEXT: AtomicU64 = AtomicU64::new(1);
            NEXT.fetch_add(1, Ordering::Relaxed)
        };
        // One session per worker: a newer one ends the older.
        shared
            .sessions
            .open(id, SessionHandle { generation, tx: tx.clone(), cancel: cancel.clone() });
        let span = info_span!("session", worker_id = %id);
        tokio::spawn(
            async move {
                debug!("session opened");
                let mut session = Session { id, from, hello: false, limits: SessionLimits::default() };
                loop {
                    let msg = tokio::select! {
                        _ = shared.shutdown.cancelled() => {
                            let _ = tx.try_send(Err(Status::unavailable("the coordinator is shutting down; reconnect")));
                            break;
                        }
                        _ = cancel.cancelled() => {
                            let _ = tx.try_send(Err(Status::aborted("session replaced or too slow; reconnect")));
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
                    match session.handle(&shared, &tx, msg) {
                        Ok(()) => {}
                        Err(Closing::Refused(e)) => {
                            debug!(error = %e, "closing the session");
                            let _ = tx.try_send(Err(e));
                            break;
                        }
                        Err(Closing::Malformed(e)) => {
                            debug!(error = %e, "closing the session: a malformed message");
                            let why = limits::sanitize(e.message(), 200);
                            let _ = shared.with(Admit::Always, |c, now| {
                                c.misbehaved(now, id, &why);
                                Ok(())
                            });
                            let _ = tx.try_send(Err(e));
                            break;
                        }
                    }
                }
                shared.sessions.close(id, generation);
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
        let lease = self.0.durable(|c, now| c.lease(now, id).map_err(status_of_lease)).await?;
        use pb::lease_shard_response::Result as R;
        let result = match lease {
            Some(l) => R::Lease(pb::ShardLease {
                url: shard_url(self.0.config.shards_url.as_deref(), l.run, l.shard, &l.info),
                lease_id: l.id.0,
                run_id: l.run.0,
                shard: l.shard,
                uri: l.info.uri,
                size: l.info.size,
                sha256: l.info.sha256,
                data_epoch: l.data_epoch,
                shared: l.shared,
                expires_unix_ms: l.expires,
                grant: self.0.pki().lease_grant(&Grant {
                    run: l.run.0,
                    worker: id.0,
                    lease: l.id.0,
                    shard: l.shard,
                    data_epoch: l.data_epoch,
                }),
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
            .durable(|c, now| c.complete(now, id, lease, req.samples).map_err(status_of_lease))
            .await?;
        Ok(Response::new(pb::CompleteShardResponse {}))
    }
}

/// Why a session is closed.
#[derive(Debug)]
enum Closing {
    /// The worker's own message was malformed or over its quota: nothing an honest worker
    /// sends, so its own evidence (it sits out, see [`cluster::Cluster::misbehaved`]).
    Malformed(Status),
    /// Refused in the cluster's current state (a report it could not know was stale, or a
    /// store that is behind): no fault of its own is proven.
    Refused(Status),
}

impl From<Status> for Closing {
    fn from(s: Status) -> Self {
        Self::Malformed(s)
    }
}

impl From<WireError> for Closing {
    fn from(e: WireError) -> Self {
        Self::Malformed(e.into())
    }
}

fn refused<T>(r: Result<T, Status>) -> Result<T, Closing> {
    r.map_err(Closing::Refused)
}

/// One worker's session: its identity, where it connects from, and its quotas.
struct Session {
    id: WorkerId,
    from: Option<IpAddr>,
    hello: bool,
    limits: SessionLimits,
}

fn exhausted(what: &str) -> Status {
    Status::resource_exhausted(format!("rate limit: too many {what} messages; reconnect later"))
}

impl Session {
    fn handle(
        &mut self,
        shared: &Shared,
        tx: &SessionTx,
        msg: pb::AgentMessage,
    ) -> Result<(), Closing> {
        use pb::agent_message::Msg;
        let id = self.id;
        let now = Instant::now();
        if !self.limits.all.take(now) {
            return Err(exhausted("session").into());
        }
        let Some(msg) = msg.msg else {
            return Err(Status::invalid_argument("empty agent message").into());
        };
        match msg {
            Msg::Hello(h) => {
                if std::mem::replace(&mut self.hello, true) {
                    return Err(Status::invalid_argument(
                        "Hello is the first message of a session, and only the first",
                    )
                    .into());
                }
                let addr: Option<SocketAddr> = if h.ring_addr.is_empty() {
                    None
                } else {
                    Some(limits::ring_addr("ring_addr", &h.ring_addr, self.from)?)
                };
                let from = self.from;
                refused(shared.with(Admit::Always, |c, now| {
                    c.session_opened(now, id, from, addr).map_err(|e| match e {
                        cluster::WorkerError::AddressFlapping(..) => {
                            Status::resource_exhausted(e.to_string())
                        }
                        _ => Status::not_found(e.to_string()),
                    })
                }))
            }
            Msg::Heartbeat(hb) => {
                let _t = shared.telemetry.time("Heartbeat");
                if hb.rtts.len() > MAX_RING {
                    return Err(Status::invalid_argument("too many rtts").into());
                }
                let rtts = hb
                    .rtts
                    .iter()
                    .filter(|r| r.worker_id > 0 && r.worker_id != id.0)
                    .map(|r| (WorkerId(r.worker_id), r.rtt_us))
                    .collect();
                refused(shared.with(Admit::Always, |c, now| {
                    c.heartbeat(now, id, Some(rtts)).map_err(|e| Status::not_found(e.to_string()))
                }))?;
                let ack = pb::CoordinatorMessage {
                    msg: Some(pb::coordinator_message::Msg::HeartbeatAck(pb::HeartbeatAck {
                        seq: hb.seq,
                    })),
                };
                let _ = tx.try_send(Ok(ack));
                Ok(())
            }
            Msg::Metrics(m) => {
                if !self.limits.metrics.take(now) {
                    return Err(exhausted("Metrics").into());
                }
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
                // A value no honest worker reports (non-finite, negative, absurd) is the
                // sender's own evidence, like any malformed message: it sits out. Checked here,
                // before admission, so that a store running behind never turns it into a mere
                // refusal; `Cluster::metrics` checks again, for callers other than this shell.
                metrics.check().map_err(Status::invalid_argument)?;
                refused(shared.with(Admit::IfStoreKeepsUp, |c, now| {
                    c.metrics(now, id, &metrics).map_err(status_of_report)
                }))
            }
            Msg::StepCommitted(s) => {
                let run = convert::run_id(s.run_id)?;
                // A member that does not know its state's hash has nothing to report.
                let Some(hash) = convert::param_hash("step_committed.param_hash", &s.param_hash)?
                else {
                    return Ok(());
                };
                refused(shared.with(Admit::Always, |c, now| {
                    c.step_committed(now, id, run, convert::epoch(s.epoch), s.step, hash);
                    Ok(())
                }))
            }
            Msg::SyncCommit(s) => {
                let run = convert::run_id(s.run_id)?;
                let (epoch, step) = (convert::epoch(s.epoch), s.step);
                let claim = claim(shared, id, s)?;
                refused(shared.with(Admit::Always, |c, now| {
                    c.sync_commit(now, id, run, epoch, step, claim).map_err(status_of_report)
                }))
            }
            Msg::AuditResult(a) => {
                let run = convert::run_id(a.run_id)?;
                limits::printable("audit_result.error", &a.error, 1024)?;
                let answer = match (a.contribution_sha256.as_str(), a.error.as_str()) {
                    ("", "") => {
                        return Err(WireError::new(
                            "audit_result",
                            "neither a digest nor an error",
                        )
                        .into());
                    }
                    ("", why) => Answer::Unable(why.to_owned()),
                    (d, "") => {
                        let hex = |field, d: &str| {
                            client::pki::unhex32(d).ok_or_else(|| {
                                WireError::new(field, "must be 64 lower-case hex digits")
                            })
                        };
                        let d = hex("audit_result.contribution_sha256", d)?;
                        Answer::Digest(match a.inner_end_sha256.as_str() {
                            "" => d,
                            e => commitments::round_digest(
                                &d,
                                &hex("audit_result.inner_end_sha256", e)?,
                            ),
                        })
                    }
                    _ => {
                        return Err(
                            WireError::new("audit_result", "both a digest and an error").into()
                        );
                    }
                };
                refused(shared.with(Admit::Always, |c, now| {
                    c.audit_result(now, id, run, a.audit_id, answer);
                    Ok(())
                }))
            }
            Msg::RingFault(f) => {
                if !self.limits.faults.take(now) {
                    return Err(exhausted("RingFault").into());
                }
                let run = convert::run_id(f.run_id)?;
                let peer = (f.peer_worker_id != 0).then_some(WorkerId(f.peer_worker_id));
                let kind = match pb::FaultKind::try_from(f.kind) {
                    Ok(pb::FaultKind::Unreachable) => FaultKind::Unreachable,
                    Ok(pb::FaultKind::Lost) => FaultKind::Lost,
                    Ok(pb::FaultKind::Misbehaved) => FaultKind::Misbehaved,
                    Ok(pb::FaultKind::BadState) => FaultKind::BadState,
                    Ok(pb::FaultKind::Failed) => FaultKind::Failed,
                    Ok(pb::FaultKind::Declined) => FaultKind::Declined,
                    _ => {
                        return Err(WireError::new(
                            "ring_fault.kind",
                            format!("unknown value {}", f.kind),
                        )
                        .into());
                    }
                };
                refused(self.fault(shared, run, f.epoch, peer, kind, &f.detail))
            }
            Msg::MemberFault(f) => {
                if !self.limits.faults.take(now) {
                    return Err(exhausted("MemberFault").into());
                }
                let run = convert::run_id(f.run_id)?;
                let accused = convert::worker_id(f.worker_id)?;
                refused(self.fault(
                    shared,
                    run,
                    f.epoch,
                    Some(accused),
                    FaultKind::Misbehaved,
                    &f.reason,
                ))
            }
            Msg::CheckpointDone(cp) => {
                if !self.limits.checkpoints.take(now) {
                    return Err(exhausted("CheckpointDone").into());
                }
                let run = convert::run_id(cp.run_id)?;
                limits::printable("checkpoint_done.uri", &cp.uri, 1024)?;
                // Names are unique and must be among the three data files: that bounds the map.
                let mut files = std::collections::BTreeMap::new();
                for (name, digest) in &cp.files {
                    if !proto::is_checkpoint_data_file(name) {
                        return Err(WireError::new(
                            "checkpoint_done.files",
                            "not a checkpoint file",
                        )
                        .into());
                    }
                    files.insert(name.clone(), limits::digest("checkpoint_done.files", digest)?);
                }
                let copy = crate::cluster::checkpoints::CheckpointCopy {
                    uri: cp.uri,
                    sha256: limits::digest("checkpoint_done.sha256", &cp.sha256)?,
                    model_sha256: limits::digest("checkpoint_done.model_sha256", &cp.model_sha256)?,
                    files,
                    description_sha256: limits::digest(
                        "checkpoint_done.description_sha256",
                        &cp.description_sha256,
                    )?,
                    ..Default::default()
                };
                refused(shared.with(Admit::IfStoreKeepsUp, |c, now| {
                    c.checkpoint_done(now, id, run, cp.step, copy).map_err(status_of_report)
                }))
            }
        }
    }

    fn fault(
        &self,
        shared: &Shared,
        run: proto::RunId,
        epoch: u64,
        peer: Option<WorkerId>,
        kind: FaultKind,
        detail: &str,
    ) -> Result<(), Status> {
        let detail = limits::sanitize(detail, 300);
        let id = self.id;
        shared.with(Admit::Always, |c, now| {
            c.ring_fault(
                now,
                id,
                run,
                Epoch(epoch),
                cluster::Fault { peer, kind, detail: &detail },
            );
            Ok(())
        })
    }
}

/// Reads a commitment off the wire: bounded, well-formed, and with every span's lease grant
/// checked (the core decides what a span without a valid grant means).
fn claim(shared: &Shared, worker: WorkerId, s: pb::SyncCommit) -> Result<Claim, WireError> {
    if s.segment_norms.len() > MAX_RING {
        return Err(WireError::new("sync_commit.segment_norms", "more than one per ring member"));
    }
    if s.spans.len() > MAX_SPANS {
        return Err(WireError::new("sync_commit.spans", format!("more than {MAX_SPANS}")));
    }
    limits::printable("sync_commit.profile", &s.profile, 256)?;
    let start_hash = convert::param_hash("sync_commit.start_hash", &s.start_hash)?;
    let digest = match s.contribution_sha256.as_str() {
        "" => None,
        d => Some(client::pki::unhex32(d).ok_or_else(|| {
            WireError::new("sync_commit.contribution_sha256", "must be 64 lower-case hex digits")
        })?),
    };
    let spans = s
        .spans
        .into_iter()
        .map(|d| {
            let lease = convert::lease_id(d.lease_id)?;
            let grant = Grant {
                run: s.run_id,
                worker: worker.0,
                lease: lease.0,
                shard: d.shard,
                data_epoch: d.data_epoch,
            };
            Ok(Span {
                lease,
                shard: d.shard,
                data_epoch: d.data_epoch,
                from: d.from,
                to: d.to,
                granted: shared.pki().check_grant(&grant, &d.grant),
                shared: d.shared,
            })
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let inner = |field: &'static str, d: &str| match d {
        "" => Ok(None),
        d => client::pki::unhex32(d)
            .map(Some)
            .ok_or_else(|| WireError::new(field, "must be 64 lower-case hex digits")),
    };
    let inner_start = inner("sync_commit.inner_start_sha256", &s.inner_start_sha256)?;
    let inner_end = inner("sync_commit.inner_end_sha256", &s.inner_end_sha256)?;
    Ok(Claim {
        inner_start,
        inner_end,
        inner_bytes: s.inner_state_bytes,
        segment_norms: s.segment_norms,
        start_hash,
        spans,
        samples: s.samples,
        digest,
        norm: s.contribution_norm,
        profile: s.profile,
        audit: (s.audit_id != 0).then_some(s.audit_id),
    })
}
