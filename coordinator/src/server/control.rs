//! The `Control` service: the `longhaul` CLI (admin credential, checked by the interceptor).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::convert;
use proto::pb;
use proto::pb::control_server::Control;
use proto::{RunId, RunState, WorkerId};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::info;

use super::{Shared, page_size, run_info, worker_info};
use crate::ca::{new_secret, secret_hash};
use crate::cluster::{self, Millis};
use crate::ledger;
use crate::shards::Manifest;
use runspec::RunSpec;

/// Uses a join token may be created with at most.
const MAX_TOKEN_USES: u32 = 100_000;

#[derive(Clone, Debug)]
pub(crate) struct ControlSvc(pub(super) Arc<Shared>);

type EventStream = Pin<Box<dyn futures::Stream<Item = Result<pb::RunEvent, Status>> + Send>>;
type LedgerStream = Pin<Box<dyn futures::Stream<Item = Result<pb::LedgerChunk, Status>> + Send>>;
type CheckpointStream =
    Pin<Box<dyn futures::Stream<Item = Result<pb::CheckpointChunk, Status>> + Send>>;

/// The largest chunk of a ledger on the wire.
const LEDGER_CHUNK: usize = 1 << 20;

impl ControlSvc {
    /// A token's lifetime: `secs` (0: `default`), at most the configured maximum.
    fn ttl(&self, secs: u64, default: Duration) -> Result<Duration, Status> {
        let ttl = if secs == 0 { default } else { Duration::from_secs(secs) };
        let max = self.0.config.max_token_ttl;
        if ttl > max {
            return Err(Status::invalid_argument(format!(
                "ttl {}s is longer than the maximum {}s",
                ttl.as_secs(),
                max.as_secs()
            )));
        }
        Ok(ttl)
    }
}

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
        let id = self
            .0
            .durable(|c, now| {
                c.submit(now, &spec, &text, manifest)
                    .map_err(|e| Status::invalid_argument(e.to_string()))
            })
            .await?;
        info!(run_id = %id, name = %spec.name, "run submitted");
        Ok(Response::new(pb::SubmitRunResponse { run_id: id.0 }))
    }

    async fn get_run(
        &self,
        req: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        let id = convert::run_id(req.into_inner().run_id)?;
        // A read barrier: the answer waits until every change it shows is durable, so what a
        // user reads never falls back after a crash (a run's step read just before a SIGKILL
        // was once not on disk yet).
        let info = self
            .0
            .settled(|c| {
                let r = c.run(id).ok_or_else(|| Status::not_found(format!("no run {id}")))?;
                Ok(run_info(c, r))
            })
            .await?;
        Ok(Response::new(info))
    }

    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let req = req.into_inner();
        let n = page_size(req.page_size);
        let c = self.0.lock();
        let mut page: Vec<&cluster::RunRecord> =
            c.runs_after(RunId(req.after)).take(n + 1).collect();
        let more = page.len() > n;
        page.truncate(n);
        let next_after = if more { page.last().map_or(0, |r| r.id.0) } else { 0 };
        let runs = page.into_iter().map(|r| run_info(&c, r)).collect();
        Ok(Response::new(pb::ListRunsResponse { runs, next_after }))
    }

    async fn stop_run(
        &self,
        req: Request<pb::StopRunRequest>,
    ) -> Result<Response<pb::RunInfo>, Status> {
        let req = req.into_inner();
        let id = convert::run_id(req.run_id)?;
        let reason =
            if req.reason.is_empty() { "stopped by a user".to_owned() } else { req.reason };
        super::limits::printable("reason", &reason, 1024)?;
        self.0
            .durable(|c, now| {
                c.stop(now, id, &reason).map_err(|e| match e {
                    cluster::RunError::NoSuchRun(_) => Status::not_found(e.to_string()),
                    cluster::RunError::Ended(..) => Status::failed_precondition(e.to_string()),
                })?;
                let r = c.run(id).ok_or_else(|| Status::not_found(format!("no run {id}")))?;
                Ok(run_info(c, r))
            })
            .await
            .map(Response::new)
    }

    type WatchRunStream = EventStream;

    async fn watch_run(
        &self,
        req: Request<pb::WatchRunRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let id = convert::run_id(req.into_inner().run_id)?;
        let mut rx = self.0.events.subscribe();
        let first = {
            let c = self.0.lock();
            let r = c.run(id).ok_or_else(|| Status::not_found(format!("no run {id}")))?;
            run_info(&c, r)
        };
        // The history is read outside the state lock (the writer keeps writing meanwhile).
        let store = self.0.store.clone();
        let history = tokio::task::spawn_blocking(move || store.log(id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let shared = self.0.clone();
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut last = first;
            let terminal = |i: &pb::RunInfo| {
                convert::run_state(i.state).map(RunState::is_terminal).unwrap_or(true)
            };
            let clock = shared.config.clock.clone();
            let ev = |i: pb::RunInfo| {
                let unix_ms = clock.now_ms();
                Ok(pb::RunEvent { unix_ms, event: Some(pb::run_event::Event::Status(i)) })
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
                let next = tokio::select! {
                    // A watcher that went away is noticed without waiting for its run's next
                    // event.
                    _ = tx.closed() => return,
                    _ = shared.shutdown.cancelled() => return,
                    r = rx.recv() => r,
                };
                match next {
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
                            let c = shared.lock();
                            c.run(id).map(|r| run_info(&c, r))
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

    type FetchCheckpointStream = CheckpointStream;

    async fn fetch_checkpoint(
        &self,
        req: Request<pb::FetchCheckpointRequest>,
    ) -> Result<Response<Self::FetchCheckpointStream>, Status> {
        let _t = self.0.telemetry.time("FetchCheckpoint");
        let req = req.into_inner();
        let run = convert::run_id(req.run_id)?;
        let step = (req.step != 0).then_some(req.step);
        let permit = self.0.transfers.admit().ok_or_else(|| {
            Status::resource_exhausted(format!(
                "{} checkpoint fetches are under way; retry when one ended",
                self.0.config.max_fetches
            ))
        })?;
        let (source, hash) = {
            let c = self.0.lock();
            if c.run(run).is_none() {
                return Err(Status::not_found(format!("no run {run}")));
            }
            c.checkpoint_source(run, step).map_err(Status::failed_precondition)?
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(super::fetch::relay(self.0.clone(), run, source, hash, tx, permit));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExportLedgerStream = LedgerStream;

    async fn export_ledger(
        &self,
        req: Request<pb::ExportLedgerRequest>,
    ) -> Result<Response<Self::ExportLedgerStream>, Status> {
        let _t = self.0.telemetry.time("ExportLedger");
        let req = req.into_inner();
        let id = convert::run_id(req.run_id)?;
        let format = match req.format.as_str() {
            "" | "json" => ledger::Format::Json,
            "csv" => ledger::Format::Csv,
            other => {
                return Err(Status::invalid_argument(format!(
                    "format {other:?}: expected \"json\" or \"csv\""
                )));
            }
        };
        // A read barrier: the records read below hold everything the run shows.
        let (run, evicted) = self
            .0
            .settled(|c| {
                let r = c.run(id).ok_or_else(|| Status::not_found(format!("no run {id}")))?;
                let per_sync = c.spec(id).map_or(1, |s| s.sync.steps_per_sync());
                let run = ledger::RunSummary {
                    id: id.0,
                    name: r.name.clone(),
                    state: r.state.as_str().into(),
                    committed_step: r.committed_step,
                    total_steps: r.total_steps,
                    escrow_steps: u64::from(c.spec(id).map_or(0, |s| s.verification.escrow_syncs))
                        * per_sync,
                    steps_per_sync: per_sync,
                    finished: r.state.is_terminal(),
                };
                let evicted: Vec<WorkerId> =
                    c.workers().filter(|w| w.banned.contains(&id)).map(|w| w.id).collect();
                Ok((run, evicted))
            })
            .await?;
        let now = self.0.now_ms();
        let store = self.0.store.clone();
        let doc = tokio::task::spawn_blocking(move || {
            let commitments = store.commitments(id)?;
            let audits = store.audits(id)?;
            Ok::<_, crate::store::StoreError>(ledger::build(
                run,
                now,
                &commitments,
                &audits,
                &evicted,
            ))
        })
        .await
        .map_err(|e| Status::internal(format!("reading the ledger: {e}")))?
        .map_err(|e| Status::internal(format!("reading the ledger: {e}")))?;
        let mut bytes = ledger::render(&doc, format);
        let signature = self.0.pki().sign_ledger(&bytes).map_err(Status::internal)?;
        bytes.extend_from_slice(signature.as_bytes());
        let chunks: Vec<Result<pb::LedgerChunk, Status>> =
            bytes.chunks(LEDGER_CHUNK).map(|c| Ok(pb::LedgerChunk { data: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn list_workers(
        &self,
        req: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let req = req.into_inner();
        let n = page_size(req.page_size);
        let now = self.0.now_ms();
        let c = self.0.lock();
        let mut page: Vec<&cluster::WorkerRecord> =
            c.workers_after(WorkerId(req.after)).take(n + 1).collect();
        let more = page.len() > n;
        page.truncate(n);
        let next_after = if more { page.last().map_or(0, |w| w.id.0) } else { 0 };
        let workers = page.into_iter().map(|w| worker_info(&c, w, now)).collect();
        Ok(Response::new(pb::ListWorkersResponse { workers, next_after }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let req = req.into_inner();
        let ttl = self.ttl(req.ttl_seconds, Duration::from_secs(3600))?;
        let uses = req.uses.max(1);
        if uses > MAX_TOKEN_USES {
            return Err(Status::invalid_argument(format!(
                "uses {uses} is more than the maximum {MAX_TOKEN_USES}"
            )));
        }
        let token = new_secret("lh_join_");
        let expires = self.0.now_ms() + ttl.as_millis() as Millis;
        let hash = secret_hash(&token);
        self.0
            .durable(|c, _| {
                c.add_token(hash, expires, uses);
                Ok(())
            })
            .await?;
        Ok(Response::new(pb::CreateJoinTokenResponse { token, expires_unix_ms: expires }))
    }

    async fn create_viewer_token(
        &self,
        req: Request<pb::CreateViewerTokenRequest>,
    ) -> Result<Response<pb::CreateViewerTokenResponse>, Status> {
        let ttl = self.ttl(req.into_inner().ttl_seconds, Duration::from_secs(24 * 3600))?;
        let expires = self.0.now_ms() + ttl.as_millis() as Millis;
        let token = self.0.pki().viewer_token(expires);
        info!(expires_unix_ms = expires, "viewer token created");
        Ok(Response::new(pb::CreateViewerTokenResponse { token, expires_unix_ms: expires }))
    }
}
