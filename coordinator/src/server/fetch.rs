//! `FetchCheckpoint`: a run's verified checkpoint, relayed from a worker that holds a copy.
//!
//! The CLI asks the coordinator; the coordinator picks the checkpoint whose model a majority of
//! the members reported alike ([`crate::cluster::checkpoints`]), asks a live holder for its copy
//! (`UploadRequest` on its session) and relays the parts the worker streams on
//! `UploadCheckpoint` as they come, while [`Verifier`] checks them: `meta.json` against the
//! digest that worker reported, its run, step and state hash against the run's record, the model
//! against the majority's digest, every file against `meta.json`. The CLI gets `done` only when
//! everything matched; a copy that fails (or a holder that does not answer) is reported to the
//! CLI and the next holder is asked. Nothing is stored on the coordinator: what it holds is a
//! few parts in channels, and the worker's sending waits on the CLI's reading.
//!
//! The same relay carries a diloco audit's inner optimizer state ([`relay_inner_state`]): from
//! the audited member to its auditor, checked ([`InnerCheck`]) against the digest the member
//! committed to; a member whose bytes do not match is struck (the coordinator checked them
//! itself), one that sends nothing usable is audited at every sync for a while.
//!
//! Who could lie: the holder, about any byte (caught: every byte is bound to the majority's
//! model digest or to the holder's own `meta.json`; it costs the user a retry with the next
//! holder); a non-holder answering a transfer (refused: a transfer is bound to the worker it
//! was asked of, and its id is random); a holder that never ends (bounded: bytes, and time
//! between parts).

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use proto::pb;
use proto::pb::checkpoint_chunk::Part;
use proto::{ParamHash, RunId, WorkerId};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::Status;
use tracing::{info, warn};

use super::{Admit, Shared, limits};
use crate::cluster::audits::StateFetch;
use crate::cluster::checkpoints::Source;

/// How long a holder has to start sending once asked, and between two parts.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const PART_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest a copy may come on average (bytes per second), after the first `RATE_GRACE`.
const MIN_RATE: u64 = 64 << 10;
const RATE_GRACE: Duration = Duration::from_secs(30);
/// Workers whose copies failed remembered (to ask them last).
const MAX_FAILURES_KEPT: usize = 4096;
/// The largest `meta.json` accepted.
const MAX_META: usize = 64 << 10;
/// The checkpoint format this coordinator reads.
const FORMAT: u32 = 1;

/// A worker's upload stream.
pub(super) type Parts = Pin<Box<dyn Stream<Item = Result<pb::CheckpointPart, Status>> + Send>>;
/// What the relay sends the CLI.
type ToClient = mpsc::Sender<Result<pb::CheckpointChunk, Status>>;

/// The transfers asked of workers and not yet answered, and the fetches under way.
#[derive(Debug)]
pub(crate) struct Transfers {
    slots: Mutex<HashMap<u64, Slot>>,
    fetches: Arc<Semaphore>,
    /// Per worker, how many of its copies failed (bounded; volatile).
    failures: Mutex<HashMap<WorkerId, u32>>,
}

#[derive(Debug)]
struct Slot {
    worker: WorkerId,
    hand: oneshot::Sender<Upload>,
}

/// A worker's answer to a transfer: its first part, the rest, and where its verdict goes.
pub(super) struct Upload {
    pub first: pb::CheckpointPart,
    pub parts: Parts,
    pub verdict: mpsc::Sender<Result<pb::UploadVerdict, Status>>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload").field("transfer", &self.first.transfer_id).finish_non_exhaustive()
    }
}

impl Transfers {
    pub(crate) fn new(max_fetches: usize) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            fetches: Arc::new(Semaphore::new(max_fetches)),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// How many copies of `worker` failed (holders are asked in this order).
    fn failures(&self, worker: WorkerId) -> u32 {
        let f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.get(&worker).copied().unwrap_or(0)
    }

    fn failed(&self, worker: WorkerId) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.len() >= MAX_FAILURES_KEPT && !f.contains_key(&worker) {
            f.clear();
        }
        *f.entry(worker).or_default() += 1;
    }

    /// A permit for one more fetch, if fewer than the maximum are under way.
    pub(super) fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.fetches.clone().try_acquire_owned().ok()
    }

    /// Hands `worker`'s answer to the transfer it was asked; `Err` gives it back when there is
    /// no such transfer for this worker (a worker cannot answer another's).
    pub(super) fn answer(
        &self,
        transfer: u64,
        worker: WorkerId,
        upload: Upload,
    ) -> Result<(), Status> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(&transfer) {
                Some(s) if s.worker == worker => slots.remove(&transfer),
                _ => None,
            }
        };
        let slot = slot.ok_or_else(|| {
            Status::not_found(format!(
                "no transfer {transfer} asked of {worker} (it was given up, or is another's)"
            ))
        })?;
        slot.hand.send(upload).map_err(|_| Status::cancelled("the fetch was given up"))
    }

    fn open(&self, worker: WorkerId) -> (u64, oneshot::Receiver<Upload>, SlotGuard<'_>) {
        let (tx, rx) = oneshot::channel();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let id = loop {
            let id = rand::random::<u64>();
            if id != 0 && !slots.contains_key(&id) {
                break id;
            }
        };
        slots.insert(id, Slot { worker, hand: tx });
        (id, rx, SlotGuard { transfers: self, id })
    }
}

/// Removes a transfer's slot when its relay is done with it, answered or not.
struct SlotGuard<'a> {
    transfers: &'a Transfers,
    id: u64,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.transfers.slots.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// What a copy must match.
#[derive(Clone, Debug, Default)]
pub(crate) struct Expect {
    pub run: u64,
    pub step: u64,
    /// SHA-256 of the holder's `meta.json` as it reported it ("" from earlier workers).
    pub meta_sha256: String,
    /// The majority's SHA-256 of `model.safetensors`.
    pub model_sha256: String,
    /// The other files a majority vouched for (name → digest): the only others sent.
    pub files: BTreeMap<String, String>,
    /// The model description a majority vouched for.
    pub description_sha256: Option<String>,
    /// The state hash the run recorded with the step, if it still knows it.
    pub param_hash: Option<ParamHash>,
    pub max_bytes: u64,
}

/// The fields of `meta.json` the coordinator checks (the worker writes more).
#[derive(Deserialize)]
struct MetaView {
    format: u32,
    run: u64,
    step: u64,
    param_hash: String,
    files: BTreeMap<String, String>,
    #[serde(default)]
    model: Option<serde_json::Value>,
}

/// The file coming now: its name, the digest it must have (`None`: withheld, not sent), and
/// its digest so far.
#[derive(Debug)]
struct Current {
    name: String,
    want: Option<String>,
    hasher: Sha256,
}

/// Checks a copy's parts as they come (sans-IO) and says what to send on: `meta.json` first
/// (held until it is whole and checked, then sent whole), then the files it lists in name
/// order, each against the digest that binds it (the majority's, or what the majority vouched
/// for); files no majority vouched for are withheld. Parts are non-empty, at most
/// [`MAX_PART`] bytes, and the copy at most `max_bytes`.
#[derive(Debug)]
pub(crate) struct Verifier {
    expect: Expect,
    /// After `meta.json`: the files still to come, in order, with the digest each must have
    /// (`None`: withheld).
    pending: Option<Vec<(String, Option<String>)>>,
    current: Option<Current>,
    meta: Vec<u8>,
    bytes: u64,
    sent: BTreeMap<String, String>,
    withheld: Vec<String>,
}

/// The largest part a holder may send (the proto's 1 MiB).
pub(crate) const MAX_PART: usize = 1 << 20;

impl Verifier {
    pub(crate) fn new(expect: Expect) -> Self {
        Self {
            expect,
            pending: None,
            current: None,
            meta: Vec::new(),
            bytes: 0,
            sent: BTreeMap::new(),
            withheld: Vec::new(),
        }
    }

    /// One part: `data` of `file`. Returns what to send on now.
    pub(crate) fn part(&mut self, file: &str, data: Vec<u8>) -> Result<Vec<pb::FileData>, String> {
        if data.is_empty() || data.len() > MAX_PART {
            return Err(format!("a part of {} bytes (1 to {MAX_PART} allowed)", data.len()));
        }
        self.bytes += data.len() as u64;
        if self.bytes > self.expect.max_bytes {
            return Err(format!("more than {} bytes", self.expect.max_bytes));
        }
        let mut out = Vec::new();
        match &self.current {
            None if self.pending.is_none() && file == "meta.json" => {
                let want = Some(self.expect.meta_sha256.clone());
                self.current = Some(Current { name: file.to_owned(), want, hasher: Sha256::new() });
            }
            None if self.pending.is_none() => {
                return Err(format!(
                    "the first file must be meta.json, not {:?}",
                    limits::sanitize(file, 64)
                ));
            }
            Some(c) if c.name == file => {}
            _ => {
                out.extend(self.close()?);
                let pending = self.pending.as_mut().expect("meta.json was read by close");
                if pending.is_empty() {
                    return Err(format!(
                        "{:?} is not in meta.json's list, or came twice",
                        limits::sanitize(file, 64)
                    ));
                }
                let (name, want) = pending.remove(0);
                if name != file {
                    return Err(format!("expected {name}, got {:?}", limits::sanitize(file, 64)));
                }
                self.current = Some(Current { name, want, hasher: Sha256::new() });
            }
        }
        let c = self.current.as_mut().expect("set above");
        if c.name == "meta.json" {
            if self.meta.len() + data.len() > MAX_META {
                return Err(format!("meta.json is longer than {MAX_META} bytes"));
            }
            c.hasher.update(&data);
            self.meta.extend_from_slice(&data);
        } else if c.want.is_some() {
            c.hasher.update(&data);
            out.push(pb::FileData { file: c.name.clone(), data });
        }
        Ok(out)
    }

    /// Ends the current file: its digest must match; `meta.json` is read, then sent on.
    fn close(&mut self) -> Result<Vec<pb::FileData>, String> {
        let Some(Current { name, want, hasher }) = self.current.take() else { return Ok(vec![]) };
        let Some(want) = want else {
            self.withheld.push(name);
            return Ok(vec![]);
        };
        let got = client::pki::hex(&hasher.finalize());
        if !want.is_empty() && got != want {
            let whose = match name.as_str() {
                "meta.json" => "the worker reported",
                _ => "a majority of the members reported",
            };
            return Err(format!("{name} has SHA-256 {got}; {whose} {want}"));
        }
        self.sent.insert(name.clone(), got);
        if name == "meta.json" {
            self.pending = Some(self.read_meta()?);
            return Ok(vec![pb::FileData { file: name, data: std::mem::take(&mut self.meta) }]);
        }
        Ok(vec![])
    }

    fn read_meta(&mut self) -> Result<Vec<(String, Option<String>)>, String> {
        let m: MetaView = serde_json::from_slice(&self.meta).map_err(|e| {
            format!("meta.json does not parse: {}", limits::sanitize(&e.to_string(), 200))
        })?;
        let e = &self.expect;
        if m.format != FORMAT {
            return Err(format!(
                "meta.json is format {} (this coordinator reads {FORMAT})",
                m.format
            ));
        }
        if (m.run, m.step) != (e.run, e.step) {
            return Err(format!(
                "meta.json is of run {} step {}, not run {} step {}",
                m.run, m.step, e.run, e.step
            ));
        }
        if let Some(h) = e.param_hash
            && m.param_hash != h.to_string()
        {
            return Err(format!(
                "meta.json's state hash {} is not the one the run recorded with step {} ({h})",
                limits::sanitize(&m.param_hash, 32),
                e.step
            ));
        }
        if let Some(want) = &e.description_sha256 {
            let got = m.model.as_ref().map(client::checkpoint::description_sha256);
            if got.as_ref() != Some(want) {
                return Err(
                    "meta.json describes another model than a majority of the members did".into()
                );
            }
        }
        for (name, digest) in &m.files {
            if !proto::is_checkpoint_data_file(name) {
                return Err(format!(
                    "meta.json lists {:?}, not a checkpoint file",
                    limits::sanitize(name, 64)
                ));
            }
            if digest.len() != 64 || !digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(format!(
                    "meta.json's digest of {name} is not 64 lower-case hex digits"
                ));
            }
        }
        let mut vouched = e.files.clone();
        vouched.insert("model.safetensors".into(), e.model_sha256.clone());
        for (name, want) in &vouched {
            match m.files.get(name) {
                Some(d) if d == want => {}
                Some(d) => {
                    return Err(format!(
                        "meta.json gives {name} the SHA-256 {d}; a majority reported {want}"
                    ));
                }
                None => return Err(format!("meta.json lists no {name}, which a majority has")),
            }
        }
        Ok(m.files
            .into_keys()
            .map(|n| {
                let want = vouched.get(&n).cloned();
                (n, want)
            })
            .collect())
    }

    /// The stream ended: every listed file must have come whole. Returns what to send on and
    /// the `done` message.
    pub(crate) fn finish(mut self) -> Result<(Vec<pb::FileData>, pb::FetchDone), String> {
        let out = self.close()?;
        match self.pending.as_deref() {
            None => Err("the copy ended before meta.json was complete".into()),
            Some([]) => Ok((
                out,
                pb::FetchDone { sha256: self.sent.into_iter().collect(), withheld: self.withheld },
            )),
            Some(rest) => Err(format!("the copy ended before {}", rest[0].0)),
        }
    }
}

/// What a relay checks of a copy as its parts come (sans-IO): what to send on, and at the end
/// the `done` message.
pub(crate) trait Check {
    fn part(&mut self, file: &str, data: Vec<u8>) -> Result<Vec<pb::FileData>, String>;
    fn finish(self) -> Result<(Vec<pb::FileData>, pb::FetchDone), String>;
}

impl Check for Verifier {
    fn part(&mut self, file: &str, data: Vec<u8>) -> Result<Vec<pb::FileData>, String> {
        Verifier::part(self, file, data)
    }

    fn finish(self) -> Result<(Vec<pb::FileData>, pb::FetchDone), String> {
        Verifier::finish(self)
    }
}

/// diloco audits: a member's inner optimizer state, the one file [`proto::INNER_STATE_FILE`],
/// in non-empty parts of at most [`MAX_PART`] bytes, exactly the `len` bytes it committed to,
/// whose SHA-256 must be the one it committed to.
#[derive(Debug)]
pub(crate) struct InnerCheck {
    want: [u8; 32],
    hasher: Sha256,
    bytes: u64,
    len: u64,
}

impl InnerCheck {
    pub(crate) fn new(want: [u8; 32], len: u64) -> Self {
        Self { want, hasher: Sha256::new(), bytes: 0, len }
    }
}

impl Check for InnerCheck {
    fn part(&mut self, file: &str, data: Vec<u8>) -> Result<Vec<pb::FileData>, String> {
        if file != proto::INNER_STATE_FILE {
            return Err(format!(
                "a part of {:?}, not of {}",
                limits::sanitize(file, 64),
                proto::INNER_STATE_FILE
            ));
        }
        if data.is_empty() || data.len() > MAX_PART {
            return Err(format!("a part of {} bytes (1 to {MAX_PART} allowed)", data.len()));
        }
        self.bytes += data.len() as u64;
        if self.bytes > self.len {
            return Err(format!("more than the {} bytes it committed to", self.len));
        }
        self.hasher.update(&data);
        Ok(vec![pb::FileData { file: file.to_owned(), data }])
    }

    fn finish(self) -> Result<(Vec<pb::FileData>, pb::FetchDone), String> {
        if self.bytes != self.len {
            return Err(format!("{} bytes, it committed to {}", self.bytes, self.len));
        }
        let got: [u8; 32] = self.hasher.finalize().into();
        if got != self.want {
            return Err(format!(
                "its {} bytes have SHA-256 {}, it committed to {}",
                self.bytes,
                client::pki::hex(&got),
                client::pki::hex(&self.want)
            ));
        }
        let sha256 = [(proto::INNER_STATE_FILE.to_owned(), client::pki::hex(&got))].into();
        Ok((Vec::new(), pb::FetchDone { sha256, withheld: Vec::new() }))
    }
}

/// Why a copy was refused: what came was wrong (the sender's own evidence against it), or
/// nothing usable came (a link or a machine may have failed).
#[derive(Debug)]
enum Failure {
    Content(String),
    Transport(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Content(s) | Self::Transport(s) => f.write_str(s),
        }
    }
}

/// diloco audits: relays the inner optimizer state `fetch` names (the one its audited member
/// committed to for its round) to the auditor of audit `audit` at `tx`. A copy that fails is
/// reported to the cluster (`Cluster::audit_state_failed`) before the auditor hears of it.
pub(super) async fn relay_inner_state(
    shared: Arc<Shared>,
    run: RunId,
    audit: u64,
    fetch: StateFetch,
    tx: ToClient,
) {
    let StateFetch { target, step, digest, bytes, nonce } = fetch;
    let check = InnerCheck::new(digest, bytes.min(shared.config.max_checkpoint_bytes));
    let result = copy_with(&shared, run, target, step, Some(digest), check, &tx).await;
    let failure = match result {
        Ok(_) => return,
        Err(f) => f,
    };
    let (mismatch, why) = match &failure {
        Failure::Content(why) => (true, limits::sanitize(why, 300)),
        Failure::Transport(why) => (false, limits::sanitize(why, 300)),
    };
    warn!(%run, audit = format!("{audit:016x}"), %target, "inner state refused: {why}");
    let _ = shared.with(Admit::Always, |c, now| {
        c.audit_state_failed(now, run, (audit, nonce), mismatch, &why);
        Ok(())
    });
    let _ = tx
        .send(Err(Status::unavailable(format!(
            "{target} did not send the inner state it committed to: {why}"
        ))))
        .await;
}

fn chunk(part: Part) -> Result<pb::CheckpointChunk, Status> {
    Ok(pb::CheckpointChunk { part: Some(part) })
}

/// How a copy ended when it did not fail.
enum Copied {
    Done,
    /// The CLI went away: nothing more to do.
    ClientGone,
}

/// Relays the checkpoint `source` names to the CLI at `tx`: each holder in turn (those whose
/// copies failed before last) until one's copy verifies. Runs as its own task; `_permit` counts
/// it among the fetches under way.
pub(super) async fn relay(
    shared: Arc<Shared>,
    run: RunId,
    mut source: Source,
    param_hash: Option<ParamHash>,
    tx: ToClient,
    _permit: OwnedSemaphorePermit,
) {
    source.copies.sort_by_key(|(w, _)| shared.transfers.failures(*w));
    let mut previous = String::new();
    for (worker, meta_sha256) in &source.copies {
        let head = pb::FetchSource {
            worker_id: worker.0,
            step: source.step,
            model_sha256: source.model_sha256.clone(),
            agreeing: source.agreeing,
            members: source.members,
            previous_error: previous.clone(),
        };
        if tx.send(chunk(Part::Source(head))).await.is_err() {
            return;
        }
        let expect = Expect {
            run: run.0,
            step: source.step,
            meta_sha256: meta_sha256.clone(),
            model_sha256: source.model_sha256.clone(),
            files: source.files.clone(),
            description_sha256: source.description_sha256.clone(),
            param_hash,
            max_bytes: shared.config.max_checkpoint_bytes,
        };
        match copy_from(&shared, run, *worker, expect, &tx).await {
            Ok(Copied::Done) => {
                info!(%run, step = source.step, %worker, "checkpoint fetched");
                return;
            }
            Ok(Copied::ClientGone) => return,
            Err(why) => {
                let why = limits::sanitize(&why, 300);
                warn!(%run, step = source.step, %worker, "checkpoint copy refused: {why}");
                shared.transfers.failed(*worker);
                previous = format!("{worker}: {why}");
            }
        }
    }
    let _ = tx
        .send(Err(Status::unavailable(format!(
            "no holder sent a good copy of step {} (last: {previous})",
            source.step
        ))))
        .await;
}

/// Asks `worker` for its copy and relays it through a [`Verifier`].
async fn copy_from(
    shared: &Shared,
    run: RunId,
    worker: WorkerId,
    expect: Expect,
    tx: &ToClient,
) -> Result<Copied, String> {
    let step = expect.step;
    copy_with(shared, run, worker, step, None, Verifier::new(expect), tx)
        .await
        .map_err(|f| f.to_string())
}

/// Asks `worker` for its copy of `step` (or its inner state `inner`) and relays it through
/// `check`; the worker hears the verdict.
async fn copy_with(
    shared: &Shared,
    run: RunId,
    worker: WorkerId,
    step: u64,
    inner: Option<[u8; 32]>,
    check: impl Check,
    tx: &ToClient,
) -> Result<Copied, Failure> {
    let (transfer, answer, _slot) = shared.transfers.open(worker);
    shared
        .with(Admit::Always, |c, _| {
            c.request_upload(worker, run, step, transfer, inner);
            Ok(())
        })
        .map_err(|s| Failure::Transport(s.message().to_owned()))?;
    let upload = match tokio::time::timeout(START_TIMEOUT, answer).await {
        Ok(Ok(u)) => u,
        Ok(Err(_)) => return Err(Failure::Transport("the transfer was dropped".into())),
        Err(_) => {
            return Err(Failure::Transport(format!(
                "it did not start sending within {START_TIMEOUT:?}"
            )));
        }
    };
    let Upload { first, mut parts, verdict } = upload;
    let result = relay_parts(transfer, first, &mut parts, check, tx).await;
    let error = match &result {
        Ok(Copied::Done) => String::new(),
        Ok(Copied::ClientGone) => "the fetch ended first".into(),
        Err(e) => limits::sanitize(&e.to_string(), 300),
    };
    let _ = verdict.send(Ok(pb::UploadVerdict { error })).await;
    result
}

async fn relay_parts(
    transfer: u64,
    first: pb::CheckpointPart,
    parts: &mut Parts,
    mut verifier: impl Check,
    tx: &ToClient,
) -> Result<Copied, Failure> {
    use Failure::{Content, Transport};
    // The sender's rate counts only the time spent waiting on it (a slow reader at the other
    // end is not the sender's fault), and a reader that takes no part for PART_TIMEOUT is gone.
    let mut waited = Duration::ZERO;
    let mut bytes = 0u64;
    let mut next = Some(first);
    loop {
        let part = match next.take() {
            Some(p) => p,
            None => {
                match timed(&mut waited, tokio::time::timeout(PART_TIMEOUT, parts.next())).await {
                    Err(_) => {
                        return Err(Transport(format!("it sent nothing for {PART_TIMEOUT:?}")));
                    }
                    Ok(None) => break,
                    Ok(Some(Err(s))) => {
                        return Err(Transport(format!(
                            "its stream failed: {}",
                            limits::sanitize(s.message(), 200)
                        )));
                    }
                    Ok(Some(Ok(p))) => p,
                }
            }
        };
        if !part.error.is_empty() {
            let why = limits::sanitize(&part.error, 200);
            return Err(Transport(format!("it cannot send it: {why}")));
        }
        if part.transfer_id != transfer {
            return Err(Content("a part of another transfer".into()));
        }
        bytes += part.data.len() as u64;
        if waited > RATE_GRACE && bytes < MIN_RATE * waited.as_secs() {
            return Err(Transport(format!(
                "it sent {bytes} bytes in {:.0?} of waiting on it, under {} KiB/s",
                waited,
                MIN_RATE >> 10
            )));
        }
        for data in verifier.part(&part.file, part.data).map_err(Content)? {
            if !pass_on(tx, chunk(Part::Data(data))).await {
                return Ok(Copied::ClientGone);
            }
        }
    }
    let (last, done) = verifier.finish().map_err(Content)?;
    for data in last {
        if !pass_on(tx, chunk(Part::Data(data))).await {
            return Ok(Copied::ClientGone);
        }
    }
    if !pass_on(tx, chunk(Part::Done(done))).await {
        return Ok(Copied::ClientGone);
    }
    Ok(Copied::Done)
}

/// Awaits `f`, adding the time it took to `waited`.
async fn timed<T>(waited: &mut Duration, f: impl std::future::Future<Output = T>) -> T {
    let t = tokio::time::Instant::now();
    let out = f.await;
    *waited += t.elapsed();
    out
}

/// Sends `item` to the reader; false if it is gone or took no part for [`PART_TIMEOUT`].
async fn pass_on(tx: &ToClient, item: Result<pb::CheckpointChunk, Status>) -> bool {
    matches!(tokio::time::timeout(PART_TIMEOUT, tx.send(item)).await, Ok(Ok(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        client::pki::hex(&Sha256::digest(b))
    }

    struct Copy {
        meta: Vec<u8>,
        model: Vec<u8>,
        optimizer: Vec<u8>,
    }

    fn description() -> serde_json::Value {
        serde_json::json!({ "arch": "gpt", "layers": 2, "width": 64, "heads": 4 })
    }

    fn copy_with(step: u64, hash: &str, optimizer: &[u8], model_desc: serde_json::Value) -> Copy {
        let model = b"model bytes".to_vec();
        let meta = serde_json::json!({
            "format": 1, "run": 3, "step": step, "param_hash": hash, "sync": "ddp",
            "files": { "model.safetensors": sha(&model), "optimizer.safetensors": sha(optimizer) },
            "created_unix_ms": 0, "model": model_desc,
        });
        Copy { meta: serde_json::to_vec(&meta).unwrap(), model, optimizer: optimizer.to_vec() }
    }

    fn copy(step: u64, hash: &str) -> Copy {
        copy_with(step, hash, b"optimizer bytes", description())
    }

    /// What the majority vouched for: the model, the optimizer state, the description.
    fn expect(c: &Copy) -> Expect {
        Expect {
            run: 3,
            step: 7,
            meta_sha256: sha(&c.meta),
            model_sha256: sha(&c.model),
            files: [("optimizer.safetensors".to_owned(), sha(&c.optimizer))].into(),
            description_sha256: Some(client::checkpoint::description_sha256(&description())),
            param_hash: Some(ParamHash(0xabc)),
            max_bytes: 1 << 20,
        }
    }

    type Sent = (Vec<pb::FileData>, pb::FetchDone);

    fn feed(e: Expect, parts: &[(&str, &[u8])]) -> Result<Sent, String> {
        let mut v = Verifier::new(e);
        let mut sent = Vec::new();
        for (f, d) in parts {
            sent.extend(v.part(f, d.to_vec())?);
        }
        let (last, done) = v.finish()?;
        sent.extend(last);
        Ok((sent, done))
    }

    const HASH: &str = "0000000000000abc";

    #[test]
    fn an_honest_copy_in_parts_verifies_and_goes_on_whole() {
        let c = copy(7, HASH);
        let (m1, m2) = c.model.split_at(4);
        let (sent, done) = feed(
            expect(&c),
            &[
                ("meta.json", &c.meta[..10]),
                ("meta.json", &c.meta[10..]),
                ("model.safetensors", m1),
                ("model.safetensors", m2),
                ("optimizer.safetensors", &c.optimizer),
            ],
        )
        .unwrap();
        assert_eq!(done.sha256["model.safetensors"], sha(&c.model));
        assert_eq!(done.sha256.len(), 3);
        assert!(done.withheld.is_empty());
        // meta.json went on once, whole, before anything else.
        assert_eq!((sent[0].file.as_str(), &sent[0].data), ("meta.json", &c.meta));
        let model: Vec<u8> = sent
            .iter()
            .filter(|d| d.file == "model.safetensors")
            .flat_map(|d| d.data.clone())
            .collect();
        assert_eq!(model, c.model);
    }

    #[test]
    fn every_lie_of_a_holder_is_caught() {
        let c = copy(7, HASH);
        let honest = [
            ("meta.json", &c.meta[..]),
            ("model.safetensors", &c.model[..]),
            ("optimizer.safetensors", &c.optimizer[..]),
        ];
        let lie = |i: usize, f: &'static str, d: &[u8]| {
            let mut p: Vec<(&str, &[u8])> = honest.to_vec();
            p[i] = (f, d);
            feed(expect(&c), &p).unwrap_err()
        };
        assert!(lie(1, "model.safetensors", b"poisoned").contains("majority"));
        assert!(lie(2, "optimizer.safetensors", b"x").contains("majority"));
        assert!(lie(0, "meta.json", b"{}").contains("the worker reported"));
        assert!(lie(2, "../../etc/passwd", b"x").contains("expected optimizer"));
        assert!(lie(0, "model.safetensors", &c.model).contains("first file"));
        assert!(lie(1, "model.safetensors", b"").contains("a part of 0 bytes"));
        // Truncated, reordered, repeated.
        assert!(feed(expect(&c), &honest[..2]).unwrap_err().contains("ended before"));
        assert!(feed(expect(&c), &[]).unwrap_err().contains("meta.json"));
        let mut p = honest.to_vec();
        p.push(("model.safetensors", &c.model));
        assert!(feed(expect(&c), &p).unwrap_err().contains("came twice"));
        // Too many bytes; a part over 1 MiB.
        let e = Expect { max_bytes: 20, ..expect(&c) };
        assert!(feed(e, &honest).unwrap_err().contains("more than"));
        let big = vec![0u8; MAX_PART + 1];
        let e = Expect { max_bytes: 1 << 30, ..expect(&c) };
        assert!(feed(e, &[("meta.json", &c.meta), ("model.safetensors", &big)]).is_err());
    }

    #[test]
    fn a_meta_json_that_lies_consistently_with_its_own_report_is_refused() {
        // The holder reported the digest of the meta.json it sends: the meta's content decides.
        let ours = copy(7, HASH);
        let cases = [
            (copy(8, HASH), "not run 3 step 7"),
            (copy(7, "0000000000000bad"), "state hash"),
            // Poisoned optimizer state listed under its own digest.
            (copy_with(7, HASH, b"poisoned optimizer", description()), "a majority reported"),
            // Another model description (a different head count that loads the same shapes).
            (
                copy_with(
                    7,
                    HASH,
                    b"optimizer bytes",
                    serde_json::json!({ "arch": "gpt", "layers": 2, "width": 64, "heads": 2 }),
                ),
                "another model",
            ),
        ];
        for (c, why) in cases {
            let e = Expect { meta_sha256: sha(&c.meta), ..expect(&ours) };
            let err = feed(e, &[("meta.json", &c.meta)]).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        let bad = br#"{"format":1,"run":3,"step":7,"param_hash":"0000000000000abc","files":{"model.safetensors":"x","/etc/shadow":"y"}}"#;
        let e = Expect { meta_sha256: sha(bad), description_sha256: None, ..expect(&ours) };
        assert!(feed(e, &[("meta.json", bad)]).unwrap_err().contains("not a checkpoint file"));
        let big = vec![b' '; MAX_META + 1];
        let e = Expect { meta_sha256: String::new(), ..expect(&ours) };
        let parts: Vec<(&str, &[u8])> = big.chunks(MAX_PART).map(|p| ("meta.json", p)).collect();
        assert!(feed(e, &parts).unwrap_err().contains("longer than"));
    }

    /// diloco audits: exactly the committed bytes, in parts of the allowed size, of the one
    /// file, with the committed digest; anything else is the sender's own evidence against it.
    #[test]
    fn an_inner_state_is_exactly_what_its_member_committed_to() {
        let state = vec![7u8; 3000];
        let digest: [u8; 32] = Sha256::digest(&state).into();
        let mut ok = InnerCheck::new(digest, 3000);
        assert_eq!(ok.part(proto::INNER_STATE_FILE, state[..1000].to_vec()).unwrap().len(), 1);
        ok.part(proto::INNER_STATE_FILE, state[1000..].to_vec()).unwrap();
        let (_, done) = ok.finish().unwrap();
        assert_eq!(done.sha256[proto::INNER_STATE_FILE], client::pki::hex(&digest));
        let mut long = InnerCheck::new(digest, 3000);
        long.part(proto::INNER_STATE_FILE, state.clone()).unwrap();
        assert!(long.part(proto::INNER_STATE_FILE, vec![1]).unwrap_err().contains("more than"));
        let mut short = InnerCheck::new(digest, 3000);
        short.part(proto::INNER_STATE_FILE, state[..2999].to_vec()).unwrap();
        assert!(short.finish().unwrap_err().contains("committed to 3000"));
        let mut other = InnerCheck::new(digest, 3000);
        other.part(proto::INNER_STATE_FILE, vec![8u8; 3000]).unwrap();
        assert!(other.finish().unwrap_err().contains("SHA-256"));
        let mut named = InnerCheck::new(digest, 3000);
        assert!(named.part("model.safetensors", state.clone()).is_err());
        assert!(named.part(proto::INNER_STATE_FILE, Vec::new()).is_err());
        assert!(named.part(proto::INNER_STATE_FILE, vec![0; MAX_PART + 1]).is_err());
    }

    #[test]
    fn a_file_no_majority_vouched_for_is_withheld() {
        // diloco: each member's inner optimizer state is its own.
        let c = copy(7, HASH);
        let e = Expect { files: BTreeMap::new(), ..expect(&c) };
        let (sent, done) = feed(
            e,
            &[
                ("meta.json", &c.meta[..]),
                ("model.safetensors", &c.model[..]),
                ("optimizer.safetensors", &c.optimizer[..]),
            ],
        )
        .unwrap();
        assert_eq!(done.withheld, ["optimizer.safetensors"]);
        assert!(sent.iter().all(|d| d.file != "optimizer.safetensors"));
        assert!(!done.sha256.contains_key("optimizer.safetensors"));
        // A holder leaving out a file the majority has is refused.
        let e = expect(&c);
        let no_opt = copy_with(7, HASH, b"optimizer bytes", description());
        let meta: serde_json::Value = serde_json::from_slice(&no_opt.meta).unwrap();
        let mut meta = meta;
        meta["files"].as_object_mut().unwrap().remove("optimizer.safetensors");
        let meta = serde_json::to_vec(&meta).unwrap();
        let e = Expect { meta_sha256: sha(&meta), ..e };
        assert!(feed(e, &[("meta.json", &meta)]).unwrap_err().contains("lists no optimizer"));
    }
}
