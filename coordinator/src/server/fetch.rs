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
use crate::cluster::checkpoints::Source;

/// How long a holder has to start sending once asked, and between two parts.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const PART_TIMEOUT: Duration = Duration::from_secs(30);
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
        Self { slots: Mutex::new(HashMap::new()), fetches: Arc::new(Semaphore::new(max_fetches)) }
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
#[derive(Clone, Debug)]
pub(crate) struct Expect {
    pub run: u64,
    pub step: u64,
    /// SHA-256 of the holder's `meta.json` as it reported it ("" from earlier workers: then
    /// only the model's digest binds).
    pub meta_sha256: String,
    /// The majority's SHA-256 of `model.safetensors`.
    pub model_sha256: String,
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
}

/// Checks a copy's parts as they come (sans-IO): files in order (`meta.json`, then the files
/// it lists, in its order), each file's SHA-256 against what binds it, a bound on bytes.
#[derive(Debug)]
pub(crate) struct Verifier {
    expect: Expect,
    /// After `meta.json`: the files still to come, in order, with the digests they must have.
    pending: Option<Vec<(String, String)>>,
    /// The file coming now, the digest it must have ("": unchecked), and its digest so far.
    current: Option<(String, String, Sha256)>,
    meta: Vec<u8>,
    bytes: u64,
    done: BTreeMap<String, String>,
}

impl Verifier {
    pub(crate) fn new(expect: Expect) -> Self {
        Self {
            expect,
            pending: None,
            current: None,
            meta: Vec::new(),
            bytes: 0,
            done: BTreeMap::new(),
        }
    }

    /// One part: `data` of `file`.
    pub(crate) fn part(&mut self, file: &str, data: &[u8]) -> Result<(), String> {
        self.bytes += data.len() as u64;
        if self.bytes > self.expect.max_bytes {
            return Err(format!("more than {} bytes", self.expect.max_bytes));
        }
        match &self.current {
            None if self.pending.is_none() && file == "meta.json" => {
                let want = self.expect.meta_sha256.clone();
                self.current = Some((file.to_owned(), want, Sha256::new()));
            }
            None if self.pending.is_none() => {
                return Err(format!(
                    "the first file must be meta.json, not {:?}",
                    limits::sanitize(file, 64)
                ));
            }
            Some((name, ..)) if name == file => {}
            _ => {
                self.close()?;
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
                self.current = Some((name, want, Sha256::new()));
            }
        }
        let (name, _, hasher) = self.current.as_mut().expect("set above");
        hasher.update(data);
        if name == "meta.json" {
            if self.meta.len() + data.len() > MAX_META {
                return Err(format!("meta.json is longer than {MAX_META} bytes"));
            }
            self.meta.extend_from_slice(data);
        }
        Ok(())
    }

    /// Ends the current file: its digest must match; after `meta.json`, reads it.
    fn close(&mut self) -> Result<(), String> {
        let Some((name, want, hasher)) = self.current.take() else { return Ok(()) };
        let got = client::pki::hex(&hasher.finalize());
        if !want.is_empty() && got != want {
            let whose = match name.as_str() {
                "meta.json" => "the worker reported",
                "model.safetensors" => "a majority of the members reported",
                _ => "meta.json lists",
            };
            return Err(format!("{name} has SHA-256 {got}; {whose} {want}"));
        }
        if name == "meta.json" {
            self.pending = Some(self.read_meta()?);
        }
        self.done.insert(name, got);
        Ok(())
    }

    fn read_meta(&mut self) -> Result<Vec<(String, String)>, String> {
        let m: MetaView = serde_json::from_slice(&self.meta)
            .map_err(|e| format!("meta.json does not parse: {e}"))?;
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
        for (name, digest) in &m.files {
            if !proto::CHECKPOINT_FILES[1..].contains(&name.as_str()) {
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
        match m.files.get("model.safetensors") {
            Some(d) if *d == e.model_sha256 => {}
            Some(d) => {
                return Err(format!(
                    "meta.json gives model.safetensors the SHA-256 {d}; a majority reported {}",
                    e.model_sha256
                ));
            }
            None => return Err("meta.json lists no model.safetensors".into()),
        }
        Ok(m.files.into_iter().collect())
    }

    /// The stream ended: every listed file must have come whole. Returns each file's SHA-256.
    pub(crate) fn finish(mut self) -> Result<BTreeMap<String, String>, String> {
        self.close()?;
        match self.pending.as_deref() {
            None => Err("the copy ended before meta.json was complete".into()),
            Some([]) => Ok(self.done),
            Some(rest) => Err(format!("the copy ended before {}", rest[0].0)),
        }
    }
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

/// Relays the checkpoint `source` names to the CLI at `tx`: each holder in turn until one's
/// copy verifies. Runs as its own task; `_permit` counts it among the fetches under way.
pub(super) async fn relay(
    shared: Arc<Shared>,
    run: RunId,
    source: Source,
    param_hash: Option<ParamHash>,
    tx: ToClient,
    _permit: OwnedSemaphorePermit,
) {
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
                warn!(%run, step = source.step, %worker, "checkpoint copy refused: {why}");
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
    let (transfer, answer, _slot) = shared.transfers.open(worker);
    let step = expect.step;
    shared
        .with(Admit::Always, |c, _| {
            c.request_upload(worker, run, step, transfer);
            Ok(())
        })
        .map_err(|s| s.message().to_owned())?;
    let upload = match tokio::time::timeout(START_TIMEOUT, answer).await {
        Ok(Ok(u)) => u,
        Ok(Err(_)) => return Err("the transfer was dropped".into()),
        Err(_) => return Err(format!("it did not start sending within {START_TIMEOUT:?}")),
    };
    let Upload { first, mut parts, verdict } = upload;
    let result = relay_parts(first, &mut parts, Verifier::new(expect), tx).await;
    let error = result.as_ref().err().cloned().unwrap_or_default();
    let _ = verdict.send(Ok(pb::UploadVerdict { error })).await;
    result
}

async fn relay_parts(
    first: pb::CheckpointPart,
    parts: &mut Parts,
    mut verifier: Verifier,
    tx: &ToClient,
) -> Result<Copied, String> {
    let mut next = Some(first);
    loop {
        let part = match next.take() {
            Some(p) => p,
            None => match tokio::time::timeout(PART_TIMEOUT, parts.next()).await {
                Err(_) => return Err(format!("it sent nothing for {PART_TIMEOUT:?}")),
                Ok(None) => break,
                Ok(Some(Err(s))) => {
                    return Err(format!(
                        "its stream failed: {}",
                        limits::sanitize(s.message(), 200)
                    ));
                }
                Ok(Some(Ok(p))) => p,
            },
        };
        if !part.error.is_empty() {
            return Err(format!("it cannot send it: {}", limits::sanitize(&part.error, 200)));
        }
        verifier.part(&part.file, &part.data)?;
        let data = pb::FileData { file: part.file, data: part.data };
        if tx.send(chunk(Part::Data(data))).await.is_err() {
            return Ok(Copied::ClientGone);
        }
    }
    let sha256 = verifier.finish()?;
    if tx
        .send(chunk(Part::Done(pb::FetchDone { sha256: sha256.into_iter().collect() })))
        .await
        .is_err()
    {
        return Ok(Copied::ClientGone);
    }
    Ok(Copied::Done)
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

    fn copy(step: u64, hash: &str) -> Copy {
        let model = b"model bytes".to_vec();
        let optimizer = b"optimizer bytes".to_vec();
        let meta = serde_json::json!({
            "format": 1, "run": 3, "step": step, "param_hash": hash, "sync": "ddp",
            "files": { "model.safetensors": sha(&model), "optimizer.safetensors": sha(&optimizer) },
            "created_unix_ms": 0,
        });
        Copy { meta: serde_json::to_vec(&meta).unwrap(), model, optimizer }
    }

    fn expect(c: &Copy) -> Expect {
        Expect {
            run: 3,
            step: 7,
            meta_sha256: sha(&c.meta),
            model_sha256: sha(&c.model),
            param_hash: Some(ParamHash(0xabc)),
            max_bytes: 1 << 20,
        }
    }

    fn feed(e: Expect, parts: &[(&str, &[u8])]) -> Result<BTreeMap<String, String>, String> {
        let mut v = Verifier::new(e);
        for (f, d) in parts {
            v.part(f, d)?;
        }
        v.finish()
    }

    const HASH: &str = "0000000000000abc";

    #[test]
    fn an_honest_copy_in_parts_verifies() {
        let c = copy(7, HASH);
        let (m1, m2) = c.model.split_at(4);
        let got = feed(
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
        assert_eq!(got["model.safetensors"], sha(&c.model));
        assert_eq!(got.len(), 3);
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
        assert!(lie(2, "optimizer.safetensors", b"x").contains("meta.json lists"));
        assert!(lie(0, "meta.json", b"{}").contains("the worker reported"));
        assert!(lie(2, "../../etc/passwd", b"x").contains("expected optimizer"));
        assert!(lie(0, "model.safetensors", &c.model).contains("first file"));
        // Truncated, reordered, repeated.
        assert!(feed(expect(&c), &honest[..2]).unwrap_err().contains("ended before"));
        assert!(feed(expect(&c), &[]).unwrap_err().contains("meta.json"));
        let mut p = honest.to_vec();
        p.push(("model.safetensors", &c.model));
        assert!(feed(expect(&c), &p).unwrap_err().contains("came twice"));
        // Too many bytes.
        let e = Expect { max_bytes: 20, ..expect(&c) };
        assert!(feed(e, &honest).unwrap_err().contains("more than"));
    }

    #[test]
    fn a_meta_json_of_another_state_or_list_is_refused_even_with_the_reported_digest() {
        // A holder that reported the digest of a lying meta.json: the meta's own content fails.
        let cases =
            [(copy(8, HASH), "not run 3 step 7"), (copy(7, "0000000000000bad"), "state hash")];
        for (c, why) in cases {
            let e = Expect { meta_sha256: sha(&c.meta), ..expect(&copy(7, HASH)) };
            let err = feed(e, &[("meta.json", &c.meta)]).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        let bad = br#"{"format":1,"run":3,"step":7,"param_hash":"0000000000000abc","files":{"model.safetensors":"x","/etc/shadow":"y"}}"#;
        let e = Expect { meta_sha256: sha(bad), ..expect(&copy(7, HASH)) };
        assert!(feed(e, &[("meta.json", bad)]).unwrap_err().contains("not a checkpoint file"));
        let big = vec![b' '; MAX_META + 1];
        let e = Expect { meta_sha256: String::new(), ..expect(&copy(7, HASH)) };
        assert!(feed(e, &[("meta.json", &big)]).unwrap_err().contains("longer than"));
    }
}
