//! The CLI's side of `FetchCheckpoint` (`longhaul checkpoint fetch RUN --to DIR`).
//!
//! Parts are written into a hidden sibling of DIR as they come, each file hashed on the way;
//! a new `source` (the coordinator moved on to another holder) empties it. Only on `done`,
//! and only if every file written has the digest the coordinator verified, are the files
//! fsynced and the directory renamed to DIR: DIR is complete or absent, never partial. File
//! names come from a fixed list, never from the wire as paths.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use proto::RunId;
use proto::pb;
use proto::pb::checkpoint_chunk::Part;
use serde::Serialize;
use sha2::{Digest, Sha256};

use client::Control;

/// What was fetched.
#[derive(Debug, Serialize)]
pub struct Fetched {
    pub run: u64,
    pub step: u64,
    pub worker: u64,
    pub dir: PathBuf,
    pub model_sha256: String,
    pub agreeing: u32,
    pub members: u32,
    /// File name → bytes.
    pub files: BTreeMap<String, u64>,
}

/// The files of one copy being written.
struct Partial {
    dir: PathBuf,
    files: BTreeMap<&'static str, (fs::File, Sha256, u64)>,
}

impl Partial {
    fn reset(&mut self) -> Result<()> {
        for name in std::mem::take(&mut self.files).into_keys() {
            fs::remove_file(self.dir.join(name))
                .with_context(|| format!("removing {}", self.dir.join(name).display()))?;
        }
        Ok(())
    }

    fn write(&mut self, file: &str, data: &[u8]) -> Result<()> {
        let Some(name) = proto::CHECKPOINT_FILES.iter().copied().find(|n| *n == file) else {
            bail!("the coordinator sent a file named {file:?}, which no checkpoint has");
        };
        if !self.files.contains_key(name) {
            let path = self.dir.join(name);
            let f =
                fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            self.files.insert(name, (f, Sha256::new(), 0));
        }
        let (f, h, n) = self.files.get_mut(name).expect("inserted above");
        f.write_all(data).with_context(|| format!("writing {name}"))?;
        h.update(data);
        *n += data.len() as u64;
        Ok(())
    }

    /// Checks every file against the verified digests and makes it durable.
    fn seal(
        &mut self,
        verified: &std::collections::HashMap<String, String>,
    ) -> Result<BTreeMap<String, u64>> {
        let got: Vec<&str> = self.files.keys().copied().collect();
        let mut want: Vec<&str> = verified.keys().map(String::as_str).collect();
        want.sort_unstable();
        if got != want {
            bail!("the coordinator verified {want:?} but sent {got:?}");
        }
        let mut sizes = BTreeMap::new();
        for (name, (f, h, n)) in std::mem::take(&mut self.files) {
            let digest = client::pki::hex(&h.finalize());
            if verified.get(name) != Some(&digest) {
                bail!("{name} as written has SHA-256 {digest}, not the verified one");
            }
            f.sync_all().with_context(|| format!("syncing {name}"))?;
            sizes.insert(name.to_owned(), n);
        }
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).context("syncing the directory")?;
        Ok(sizes)
    }
}

/// Fetches the checkpoint of `run` (of `step`, or the newest verified) into `to`.
pub async fn fetch(c: &mut Control, run: RunId, step: Option<u64>, to: &Path) -> Result<Fetched> {
    if to.exists() {
        let empty = fs::read_dir(to).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty {
            bail!("{} exists and is not an empty directory", to.display());
        }
    }
    let name = to.file_name().context("--to needs a directory name")?.to_string_lossy();
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut partial = Partial { dir: tmp.clone(), files: BTreeMap::new() };
    let result = receive(c, run, step, &mut partial).await;
    let mut fetched = match result {
        Ok(f) => f,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let placed = (|| {
        if to.exists() {
            fs::remove_dir(to).with_context(|| format!("replacing the empty {}", to.display()))?;
        }
        fs::rename(&tmp, to).with_context(|| format!("moving the copy to {}", to.display()))
    })();
    if let Err(e) = placed {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let _ = fs::File::open(&parent).and_then(|d| d.sync_all());
    fetched.dir = to.to_owned();
    Ok(fetched)
}

async fn receive(
    c: &mut Control,
    run: RunId,
    step: Option<u64>,
    partial: &mut Partial,
) -> Result<Fetched> {
    let req = pb::FetchCheckpointRequest { run_id: run.0, step: step.unwrap_or(0) };
    let mut stream = c.fetch_checkpoint(req).await.map_err(crate::cli::rpc_err)?.into_inner();
    let mut source: Option<pb::FetchSource> = None;
    while let Some(chunk) = stream.message().await.map_err(crate::cli::rpc_err)? {
        match chunk.part {
            Some(Part::Source(s)) => {
                if !s.previous_error.is_empty() {
                    eprintln!(
                        "a copy was refused ({}); trying worker-{}",
                        s.previous_error, s.worker_id
                    );
                }
                partial.reset()?;
                source = Some(s);
            }
            Some(Part::Data(d)) => {
                if source.is_none() {
                    bail!("the coordinator sent data before naming its source");
                }
                partial.write(&d.file, &d.data)?;
            }
            Some(Part::Done(done)) => {
                let s = source.context("the coordinator said done before naming its source")?;
                let files = partial.seal(&done.sha256)?;
                if !done.withheld.is_empty() {
                    eprintln!(
                        "not copied (no majority of the members holds the same bytes: each \
                         member's own state): {}",
                        done.withheld.join(", ")
                    );
                }
                return Ok(Fetched {
                    run: run.0,
                    step: s.step,
                    worker: s.worker_id,
                    dir: partial.dir.clone(),
                    model_sha256: s.model_sha256,
                    agreeing: s.agreeing,
                    members: s.members,
                    files,
                });
            }
            None => {}
        }
    }
    bail!("the coordinator ended the transfer before the copy was verified")
}
