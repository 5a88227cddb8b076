//! The writer: the only place the state store is written, on a thread of its own.
//!
//! The services change the state machine under its lock and leave with a [`Pending`]: the
//! serialized records it changed, the appends (log lines, metric points, checkpoints), and what
//! to deliver once they are durable. The writer takes every pending batch queued at that moment,
//! commits them in one transaction (group commit: one fsync for many changes), and only then
//! delivers their outputs, in order, and tells whoever waits for durability. So no lock is ever
//! held across an fsync, heartbeats and acks never wait on the disk, and "durable before
//! announced" holds as before.
//!
//! A commit that fails (a full disk) is retried with backoff; nothing of it or after it is
//! announced meanwhile, and once the backlog passes [`MAX_BACKLOG`] the services refuse calls
//! that would add to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::pb;
use proto::{RunId, WorkerId};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{Batch, Store};

/// Batches queued beyond this make the services refuse calls that write (heartbeats and ticks
/// still go through).
pub(crate) const MAX_BACKLOG: usize = 10_000;

/// Batches committed together at most.
const GROUP: usize = 512;

pub(crate) type SessionTx = mpsc::Sender<Result<pb::CoordinatorMessage, tonic::Status>>;

/// A worker's open session: where its commands go, and how to end it.
#[derive(Debug)]
pub(crate) struct SessionHandle {
    pub(crate) generation: u64,
    pub(crate) tx: SessionTx,
    pub(crate) cancel: CancellationToken,
}

/// The open sessions, by worker (at most one each).
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<WorkerId, SessionHandle>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, SessionHandle>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a worker's new session, ending the one it had (a worker has one session).
    pub(crate) fn open(&self, worker: WorkerId, handle: SessionHandle) {
        if let Some(old) = self.lock().insert(worker, handle) {
            old.cancel.cancel();
        }
    }

    /// Forgets the session of `worker` if it is still generation `generation`.
    pub(crate) fn close(&self, worker: WorkerId, generation: u64) {
        let mut map = self.lock();
        if map.get(&worker).is_some_and(|h| h.generation == generation) {
            map.remove(&worker);
        }
    }

    /// Queues `msg` for the worker's session. A session that cannot keep up is ended (the
    /// worker reconnects and hears its run's state again): never a zombie that stays alive by
    /// its heartbeats but hears no command.
    fn send(&self, worker: WorkerId, msg: pb::CoordinatorMessage) {
        let mut map = self.lock();
        let Some(h) = map.get(&worker) else { return };
        if h.tx.try_send(Ok(msg)).is_err() {
            warn!(%worker, "session queue full or closed; ending the session");
            h.cancel.cancel();
            map.remove(&worker);
        }
    }
}

/// One service call's changes, waiting to be made durable and announced.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) batch: Batch,
    /// Commands for workers, already in wire form.
    pub(crate) commands: Vec<(WorkerId, pb::CoordinatorMessage)>,
    /// Run events (status snapshots, log lines) for watchers.
    pub(crate) events: Vec<(RunId, pb::RunEvent)>,
    pub(crate) done: Option<oneshot::Sender<Result<(), String>>>,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.commands.is_empty() && self.events.is_empty()
    }
}

/// The services' end of the writer.
#[derive(Debug)]
pub(crate) struct Writer {
    tx: Mutex<Option<mpsc::UnboundedSender<Pending>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    backlog: Arc<AtomicUsize>,
}

impl Writer {
    /// Starts the writer thread.
    pub(crate) fn start(
        store: Arc<Store>,
        sessions: Arc<Sessions>,
        events: broadcast::Sender<(RunId, pb::RunEvent)>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        let b = backlog.clone();
        let spawned = std::thread::Builder::new()
            .name("longhaul-store".into())
            .spawn(move || run(rx, store, sessions, events, b));
        let thread = match spawned {
            Ok(t) => t,
            // Without its writer the coordinator cannot persist anything: refuse to go on.
            Err(e) => panic!("cannot start the store writer thread: {e}"),
        };
        Self { tx: Mutex::new(Some(tx)), thread: Mutex::new(Some(thread)), backlog }
    }

    /// Commits what is queued, then stops the writer (it releases the store).
    pub(crate) fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// Queues a call's changes; returns a receiver that resolves once they are durable.
    pub(crate) fn submit(&self, p: Pending) -> oneshot::Receiver<Result<(), String>> {
        if p.is_empty() {
            let (done, wait) = oneshot::channel();
            let _ = done.send(Ok(()));
            return wait;
        }
        self.enqueue(p)
    }

    /// Resolves once everything submitted before it is durable: a read barrier.
    pub(crate) fn barrier(&self) -> oneshot::Receiver<Result<(), String>> {
        self.enqueue(Pending::default())
    }

    fn enqueue(&self, mut p: Pending) -> oneshot::Receiver<Result<(), String>> {
        let (done, wait) = oneshot::channel();
        p.done = Some(done);
        self.backlog.fetch_add(1, Ordering::Relaxed);
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent = match tx {
            Some(tx) => tx.send(p).map_err(|mpsc::error::SendError(p)| p),
            None => Err(p),
        };
        if let Err(p) = sent {
            self.backlog.fetch_sub(1, Ordering::Relaxed);
            if let Some(done) = p.done {
                let _ = done.send(Err("the coordinator is shutting down".into()));
            }
        }
        wait
    }

    /// Batches queued and not yet durable.
    pub(crate) fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }
}

fn run(
    mut rx: mpsc::UnboundedReceiver<Pending>,
    store: Arc<Store>,
    sessions: Arc<Sessions>,
    events: broadcast::Sender<(RunId, pb::RunEvent)>,
    backlog: Arc<AtomicUsize>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(_) => break,
            }
        }
        let batches: Vec<Batch> = group.iter_mut().map(|p| std::mem::take(&mut p.batch)).collect();
        let mut delay = Duration::from_millis(100);
        let mut failed = false;
        while let Err(e) = store.write(&batches) {
            warn!(error = %e, pending = group.len(), "persisting state failed; retrying (nothing is announced until it succeeds)");
            failed = true;
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
            if rx.is_closed() {
                return;
            }
        }
        if failed {
            info!("persisting state works again");
        }
        for p in group {
            for (run, e) in p.events {
                if let Some(pb::run_event::Event::Log(line)) = &e.event {
                    warn!(run_id = %run, "{line}");
                }
                let _ = events.send((run, e));
            }
            for (worker, msg) in p.commands {
                sessions.send(worker, msg);
            }
            if let Some(done) = p.done {
                let _ = done.send(Ok(()));
            }
            backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
