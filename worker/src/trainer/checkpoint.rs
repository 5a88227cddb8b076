//! Checkpoints: safetensors for the tensors, JSON for the rest, written atomically.
//!
//! Layout under a worker's checkpoint directory:
//!
//! ```text
//! run-<id>/
//!   latest                  the name of the newest complete checkpoint ("step-00000500")
//!   step-00000500/
//!     model.safetensors     the synchronised parameters, by name (f32)
//!     optimizer.safetensors exp_avg.<name>, exp_avg_sq.<name> (AdamW) or momentum.<name> (SGD)
//!     outer.safetensors     diloco only: `global` (flat parameters), `momentum` (flat)
//!     meta.json             see [`Meta`]; lists every file with its SHA-256 and names the model
//! ```
//!
//! `model.safetensors` names each parameter as PyTorch's `state_dict()` does (TorchScript
//! modules: the module's own names; built-in models: their reference modules in
//! `examples/pytorch/longhaul_models.py`), so PyTorch loads it as it is:
//!
//! ```text
//! model.load_state_dict(safetensors.torch.load_file("step-00000500/model.safetensors"))
//! ```
//!
//! A checkpoint is written into `step-N.tmp-<pid>/`, every file fsynced, the directory renamed
//! to `step-N` and fsynced, and only then `latest` replaced (write `latest.tmp`, fsync, rename).
//! A worker killed at any point leaves `latest` naming a complete, verified checkpoint; stale
//! temporary directories are removed on the next write.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use client::pki::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

/// The checkpoint format version written by this worker.
pub const FORMAT: u32 = 1;

/// The named tensors of a checkpoint.
#[derive(Debug)]
pub struct Tensors {
    pub model: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
    pub outer: Option<Vec<(String, Tensor)>>,
}

/// Where in its data a worker was.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub shard: u32,
    pub data_epoch: u64,
    /// Samples of the shard already trained on.
    pub next: u64,
}

/// `meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub run: u64,
    pub step: u64,
    pub optimizer_steps: u64,
    /// 16 hex digits: the hash of the synchronised parameters (`Trainer::hash`).
    pub param_hash: proto::ParamHash,
    /// `ddp` or `diloco`.
    pub sync: String,
    pub cursor: Option<Cursor>,
    /// File name → lower-case hex SHA-256.
    pub files: BTreeMap<String, String>,
    pub created_unix_ms: u64,
    /// What model the parameters belong to (`examples/pytorch/longhaul_models.py` builds it
    /// from this); absent in checkpoints of earlier workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelMeta>,
}

/// The model of a checkpoint, for loading it elsewhere (PyTorch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// `gpt`, `mlp`, `convnet`, or `torchscript` (then the run's module file defines it).
    pub arch: String,
    pub layers: i64,
    pub width: i64,
    pub heads: i64,
    pub context: i64,
    /// Output classes (the vocabulary for token tasks).
    pub outputs: i64,
    /// Token tasks: the vocabulary the inputs come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<i64>,
    /// Tensor tasks: one sample's feature shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<i64>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("checkpoint {path}: {reason}")]
    Invalid { path: String, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.display().to_string(), source }
}

fn invalid(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid { path: path.display().to_string(), reason: reason.into() }
}

fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    let bytes = fs::read(path).map_err(io(path))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn fsync(path: &Path) -> Result<(), CheckpointError> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

/// Where a worker keeps the checkpoints of one coordinator's runs: `state_dir/checkpoints/`
/// and the first 16 digits of the coordinator's CA pin, so run ids of another coordinator
/// never mix.
pub fn root(state_dir: &Path, ca_pin: &str) -> PathBuf {
    let pin = ca_pin.trim_start_matches("sha256:");
    state_dir.join("checkpoints").join(&pin[..pin.len().min(16)])
}

/// The directory of the checkpoint of `step` of `run` under `root`.
pub fn step_dir(root: &Path, run: u64, step: u64) -> PathBuf {
    root.join(format!("run-{run}")).join(format!("step-{step:08}"))
}

/// A checkpoint written: its directory and the digests a worker reports of it.
#[derive(Clone, Debug)]
pub struct Written {
    pub dir: PathBuf,
    /// SHA-256 of its `meta.json`.
    pub meta_sha256: String,
    /// SHA-256 of every file `meta.json` lists (`model.safetensors` among them).
    pub files: BTreeMap<String, String>,
    /// [`client::checkpoint::description_sha256`] of the model description ("" without one).
    pub description_sha256: String,
}

/// Writes a checkpoint of `step` under `dir/run-<run>/`, keeping the newest `keep`.
pub fn write(
    dir: &Path,
    tensors: &Tensors,
    mut meta: Meta,
    keep: usize,
) -> Result<Written, CheckpointError> {
    let dst = step_dir(dir, meta.run, meta.step);
    let run_dir = dst.parent().expect("a step directory is in a run directory").to_owned();
    fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
    let name = format!("step-{:08}", meta.step);
    let tmp = run_dir.join(format!("{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(io(&tmp))?;

    let mut sets =
        vec![("model.safetensors", &tensors.model), ("optimizer.safetensors", &tensors.optimizer)];
    if let Some(o) = &tensors.outer {
        sets.push(("outer.safetensors", o));
    }
    meta.files.clear();
    for (file, set) in sets {
        let path = tmp.join(file);
        let refs: Vec<(&str, &Tensor)> = set.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, &path).map_err(|e| invalid(&path, e.to_string()))?;
        fsync(&path)?;
        meta.files.insert(file.to_owned(), sha256_file(&path)?);
    }
    let meta_path = tmp.join("meta.json");
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| invalid(&meta_path, e.to_string()))?;
    write_synced(&meta_path, &json)?;
    fsync(&tmp)?;

    if dst.exists() {
        fs::remove_dir_all(&dst).map_err(io(&dst))?;
    }
    fs::rename(&tmp, &dst).map_err(io(&dst))?;
    fsync(&run_dir)?;
    let latest_tmp = run_dir.join("latest.tmp");
    write_synced(&latest_tmp, name.as_bytes())?;
    fs::rename(&latest_tmp, run_dir.join("latest")).map_err(io(&run_dir))?;
    fsync(&run_dir)?;
    prune(&run_dir, keep.max(1));
    let description = meta.model.as_ref().and_then(|m| serde_json::to_value(m).ok());
    Ok(Written {
        meta_sha256: hex(&Sha256::digest(&json)),
        description_sha256: description
            .map(|d| client::checkpoint::description_sha256(&d))
            .unwrap_or_default(),
        files: meta.files,
        dir: dst,
    })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io(path))
}

/// Removes temporary directories and all but the newest `keep` checkpoints.
fn prune(run_dir: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(run_dir) else { return };
    let mut steps = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp-") {
            let _ = fs::remove_dir_all(e.path());
        } else if name.starts_with("step-") {
            steps.push(name);
        }
    }
    steps.sort();
    let n = steps.len();
    for name in steps.into_iter().take(n.saturating_sub(keep)) {
        let _ = fs::remove_dir_all(run_dir.join(name));
    }
}

/// Reads and verifies the checkpoint in `path` (a `step-N` directory).
pub fn read(path: &Path) -> Result<(Tensors, Meta), CheckpointError> {
    let meta_path = path.join("meta.json");
    let bytes = fs::read(&meta_path).map_err(io(&meta_path))?;
    let meta: Meta =
        serde_json::from_slice(&bytes).map_err(|e| invalid(&meta_path, e.to_string()))?;
    if meta.format != FORMAT {
        return Err(invalid(
            &meta_path,
            format!("format {} (this worker reads {FORMAT})", meta.format),
        ));
    }
    let load = |file: &str| -> Result<Option<Vec<(String, Tensor)>>, CheckpointError> {
        let Some(want) = meta.files.get(file) else { return Ok(None) };
        let p = path.join(file);
        let got = sha256_file(&p)?;
        if &got != want {
            return Err(invalid(&p, format!("SHA-256 {got}, meta.json says {want}")));
        }
        Tensor::read_safetensors(&p).map(Some).map_err(|e| invalid(&p, e.to_string()))
    };
    let model = load("model.safetensors")?.ok_or_else(|| invalid(path, "no model.safetensors"))?;
    let optimizer =
        load("optimizer.safetensors")?.ok_or_else(|| invalid(path, "no optimizer.safetensors"))?;
    let outer = load("outer.safetensors")?;
    Ok((Tensors { model, optimizer, outer }, meta))
}

/// The newest complete checkpoint of `run` under `dir`: the one `latest` names, or (if that is
/// missing or damaged) the newest `step-N` that verifies.
pub fn latest(dir: &Path, run: u64) -> Option<(PathBuf, Tensors, Meta)> {
    let run_dir = dir.join(format!("run-{run}"));
    let mut candidates = Vec::new();
    if let Ok(name) = fs::read_to_string(run_dir.join("latest")) {
        candidates.push(run_dir.join(name.trim()));
    }
    let mut steps: Vec<PathBuf> = fs::read_dir(&run_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-") && !n.contains(".tmp-"))
        })
        .collect();
    steps.sort();
    candidates.extend(steps.into_iter().rev());
    for c in candidates {
        match read(&c) {
            Ok((t, m)) => return Some((c, t, m)),
            Err(e) => tracing::warn!("skipping checkpoint: {e}"),
        }
    }
    None
}
