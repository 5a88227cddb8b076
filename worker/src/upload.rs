//! Sends a checkpoint to the coordinator when it asks (`UploadRequest`), for a user's
//! `longhaul checkpoint fetch`: `meta.json`, then each file it lists, in name order, in parts of
//! at most [`PART`] bytes, on `Agent.UploadCheckpoint`. A request naming an inner optimizer
//! state (`inner_sha256`, a diloco audit of this member's round) is answered with that state,
//! kept in memory ([`InnerStates`]), as the one file `inner_state`. The coordinator checks every byte; this
//! side only reads its own files. The request's numbers name the directory (no path from the
//! wire is ever used), every file is opened before the first byte goes (a checkpoint pruned
//! meanwhile stays readable), and at most [`MAX_UPLOADS`] run at once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use client::ConnectConfig;
use proto::pb;
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::agent::Identity;
use crate::trainer::{InnerStates, checkpoint};

/// What an upload reads from.
enum Source {
    Files(Vec<(String, tokio::fs::File)>),
    Inner(Arc<Vec<u8>>),
}

/// The inner optimizer state with SHA-256 `hex`, if this worker still keeps it.
fn inner_state(states: &InnerStates, hex: &str) -> Result<Arc<Vec<u8>>> {
    let digest = client::pki::unhex32(hex)
        .context("an inner state digest that is not 64 lower-case hex digits")?;
    states.get(&digest).with_context(|| format!("no longer keeps the inner state {hex}"))
}

/// The largest part on the wire.
pub const PART: usize = 1 << 20;
/// Uploads at once.
pub const MAX_UPLOADS: usize = 2;
/// The largest `meta.json` read.
const MAX_META: u64 = 64 << 10;
/// How long the coordinator has to give its verdict once everything was sent.
const VERDICT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Uploads under way in this process.
#[derive(Clone, Debug)]
pub struct Uploads(Arc<Semaphore>);

impl Default for Uploads {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(MAX_UPLOADS)))
    }
}

/// The files of the checkpoint of `step` of `run` under `root`, open, in the order they go.
async fn open(root: &Path, run: u64, step: u64) -> Result<Vec<(String, tokio::fs::File)>> {
    let dir = checkpoint::step_dir(root, run, step);
    let meta_path = dir.join("meta.json");
    let mut meta_file = tokio::fs::File::open(&meta_path)
        .await
        .with_context(|| format!("no checkpoint of run {run} step {step} here"))?;
    let mut bytes = Vec::new();
    (&mut meta_file).take(MAX_META + 1).read_to_end(&mut bytes).await?;
    anyhow::ensure!(bytes.len() as u64 <= MAX_META, "{} is too long", meta_path.display());
    let meta: checkpoint::Meta = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} does not parse", meta_path.display()))?;
    let mut files = vec![("meta.json".to_owned(), tokio::fs::File::open(&meta_path).await?)];
    for name in meta.files.keys() {
        anyhow::ensure!(proto::is_checkpoint_data_file(name), "meta.json lists {name:?}");
        let f = tokio::fs::File::open(dir.join(name))
            .await
            .with_context(|| format!("opening {name} of run {run} step {step}"))?;
        files.push((name.clone(), f));
    }
    Ok(files)
}

/// Answers one `UploadRequest`: streams the copy (or, on the first part, why it cannot) and
/// logs the coordinator's verdict.
pub async fn serve(
    cfg: ConnectConfig,
    identity: Identity,
    (root, inner): (Option<PathBuf>, InnerStates),
    uploads: Uploads,
    req: pb::UploadRequest,
) {
    let (run, step, transfer) = (req.run_id, req.step, req.transfer_id);
    let (tx, rx) = mpsc::channel::<pb::CheckpointPart>(2);
    let permit = uploads.0.try_acquire_owned();
    let files = match (&root, &permit) {
        // An audit's inner state is held in memory and owed: it waits for no checkpoint copy.
        _ if !req.inner_sha256.is_empty() => {
            inner_state(&inner, &req.inner_sha256).map(Source::Inner)
        }
        (_, Err(_)) => Err(anyhow::anyhow!("{MAX_UPLOADS} uploads are under way")),
        (None, _) => Err(anyhow::anyhow!("this worker keeps no checkpoints")),
        (Some(root), Ok(_)) => open(root, run, step).await.map(Source::Files),
    };
    let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<()>();
    let producer = tokio::spawn(async move {
        let _sent = sent_tx; // dropped when this ends, however it ends
        let files = match files {
            Ok(f) => f,
            Err(e) => {
                let error = format!("{e:#}");
                let _ = tx
                    .send(pb::CheckpointPart { transfer_id: transfer, error, ..Default::default() })
                    .await;
                return;
            }
        };
        let files = match files {
            Source::Files(f) => f,
            Source::Inner(blob) => {
                for piece in blob.chunks(PART) {
                    let part = pb::CheckpointPart {
                        transfer_id: transfer,
                        file: proto::INNER_STATE_FILE.into(),
                        data: piece.to_vec(),
                        error: String::new(),
                    };
                    if tx.send(part).await.is_err() {
                        return;
                    }
                }
                return;
            }
        };
        let mut buf = vec![0u8; PART];
        for (name, mut f) in files {
            loop {
                let n = match f.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        warn!(run, step, "reading {name} to upload: {e}");
                        return; // the copy ends short: the coordinator refuses it
                    }
                };
                let part = pb::CheckpointPart {
                    transfer_id: transfer,
                    file: name.clone(),
                    data: buf[..n].to_vec(),
                    error: String::new(),
                };
                if tx.send(part).await.is_err() {
                    return; // the coordinator ended the upload
                }
            }
        }
    });
    let verdict = async {
        let mut rpc = identity.client(&cfg)?;
        let mut verdicts = rpc
            .upload_checkpoint(ReceiverStream::new(rx))
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .into_inner();
        let deadline = async {
            let _ = sent_rx.await;
            tokio::time::sleep(VERDICT_TIMEOUT).await;
        };
        let v = tokio::select! {
            v = verdicts.message() => v,
            () = deadline => anyhow::bail!("no verdict {VERDICT_TIMEOUT:?} after the last part"),
        };
        let v = v
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
            .context("the coordinator ended the upload without a verdict")?;
        anyhow::Ok(v.error)
    };
    let what = if req.inner_sha256.is_empty() {
        "the checkpoint"
    } else {
        "the inner optimizer state of its round (an audit)"
    };
    match verdict.await {
        Ok(e) if e.is_empty() => info!(run, step, "{what} sent to the coordinator"),
        Ok(e) => warn!(run, step, "the coordinator refused {what}: {e}"),
        Err(e) => warn!(run, step, "sending {what}: {e:#}"),
    }
    producer.abort();
    drop(permit);
}
