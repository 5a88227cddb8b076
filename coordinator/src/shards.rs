//! Data shards: the manifest and the lease book of one run.
//!
//! Leases are pull-based: a worker asks for the next shard when it is ready, so fast workers
//! take more. A lease expires after its TTL or when its holder dies, and the shard goes back to
//! the queue. A completion is accepted only from the lease's current holder, so within one data
//! epoch every shard is completed exactly once; when all are done the next data epoch begins.

use std::path::Path;

use proto::{LeaseId, RunId, WorkerId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cluster::Millis;

/// A dataset: its shards in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub shards: Vec<ShardInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub uri: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the shard's bytes.
    pub sha256: String,
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("manifest {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
    #[error("dataset.uri {0:?}: only file:// URIs and paths can be read by the coordinator")]
    Unsupported(String),
}

impl Manifest {
    /// Parses a JSON manifest and checks every entry.
    pub fn parse(json: &str, path: &str) -> Result<Self, ManifestError> {
        let bad = |reason: String| ManifestError::Invalid { path: path.to_owned(), reason };
        let m: Manifest = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        if m.shards.is_empty() {
            return Err(bad("no shards".into()));
        }
        if m.shards.len() > u32::MAX as usize {
            return Err(bad("too many shards".into()));
        }
        for (i, s) in m.shards.iter().enumerate() {
            if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("shards[{i}].sha256 {:?} is not 64 hex digits", s.sha256)));
            }
            if s.uri.is_empty() {
                return Err(bad(format!("shards[{i}].uri is empty")));
            }
        }
        Ok(m)
    }

    /// Reads the manifest a run file's `dataset.uri` names (`file://` or a path).
    pub fn load(uri: &str) -> Result<Self, ManifestError> {
        let path = if let Some(p) = uri.strip_prefix("file://") {
            p
        } else if uri.starts_with('/') || uri.starts_with("./") {
            uri
        } else {
            return Err(ManifestError::Unsupported(uri.to_owned()));
        };
        let text = std::fs::read_to_string(Path::new(path))
            .map_err(|source| ManifestError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }
}

/// A granted lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub run: RunId,
    pub shard: u32,
    pub info: ShardInfo,
    pub data_epoch: u64,
    pub expires: Millis,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("unknown worker")]
    UnknownWorker,
    #[error("the worker is not a member of a running epoch")]
    NotInRun,
    #[error("lease {0} is not held by this worker (expired, or completed already)")]
    NotHeld(LeaseId),
}

/// The state of one shard within the current data epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardState {
    Queued,
    Leased { lease: LeaseId, worker: WorkerId, expires: Millis },
    Done,
}

/// A persisted shard record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub info: ShardInfo,
    pub state: ShardState,
    pub data_epoch: u64,
    /// How many times this shard was completed, over all data epochs.
    pub completions: u64,
}

/// The lease book of one run.
#[derive(Clone, Debug)]
pub struct ShardBook {
    shards: Vec<ShardRecord>,
    data_epoch: u64,
    rolled: bool,
}

impl ShardBook {
    pub fn new(manifest: Manifest) -> Self {
        let shards = manifest
            .shards
            .into_iter()
            .map(|info| ShardRecord {
                info,
                state: ShardState::Queued,
                data_epoch: 0,
                completions: 0,
            })
            .collect();
        Self { shards, data_epoch: 0, rolled: false }
    }

    /// Rebuilds a book from persisted records (in shard order).
    pub fn restore(shards: Vec<ShardRecord>) -> Self {
        let data_epoch = shards.iter().map(|s| s.data_epoch).min().unwrap_or(0);
        Self { shards, data_epoch, rolled: false }
    }

    pub fn len(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    pub fn data_epoch(&self) -> u64 {
        self.data_epoch
    }

    pub fn record(&self, shard: u32) -> Option<&ShardRecord> {
        self.shards.get(shard as usize)
    }

    pub fn records(&self) -> &[ShardRecord] {
        &self.shards
    }

    /// (shard, holder) for every live lease.
    pub fn holders(&self) -> impl Iterator<Item = (u32, WorkerId)> + '_ {
        self.shards.iter().enumerate().filter_map(|(i, s)| match s.state {
            ShardState::Leased { worker, .. } => Some((i as u32, worker)),
            _ => None,
        })
    }

    /// Leases the first queued shard to `worker`, or `None` if all are leased or done.
    pub fn lease(
        &mut self,
        now: Millis,
        worker: WorkerId,
        id: LeaseId,
        ttl: Millis,
    ) -> Option<Lease> {
        let (i, s) =
            self.shards.iter_mut().enumerate().find(|(_, s)| s.state == ShardState::Queued)?;
        let expires = now + ttl;
        s.state = ShardState::Leased { lease: id, worker, expires };
        Some(Lease {
            id,
            run: RunId(0),
            shard: i as u32,
            info: s.info.clone(),
            data_epoch: self.data_epoch,
            expires,
        })
    }

    /// Marks the shard of `lease` done; returns its index.
    pub fn complete(
        &mut self,
        _now: Millis,
        worker: WorkerId,
        lease: LeaseId,
    ) -> Result<u32, LeaseError> {
        self.rolled = false;
        let i = self
            .shards
            .iter()
            .position(|s| matches!(s.state, ShardState::Leased { lease: l, worker: w, .. } if l == lease && w == worker))
            .ok_or(LeaseError::NotHeld(lease))?;
        let s = &mut self.shards[i];
        s.state = ShardState::Done;
        s.completions += 1;
        if self.shards.iter().all(|s| s.state == ShardState::Done) {
            self.data_epoch += 1;
            for s in &mut self.shards {
                s.state = ShardState::Queued;
                s.data_epoch = self.data_epoch;
            }
            self.rolled = true;
        }
        Ok(i as u32)
    }

    /// Whether the last completion finished a data epoch (every shard was then re-queued).
    pub fn data_epoch_rolled(&self) -> bool {
        self.rolled
    }

    /// Returns expired leases to the queue.
    pub fn expire(&mut self, now: Millis) -> Vec<u32> {
        self.requeue(|s| matches!(s, ShardState::Leased { expires, .. } if *expires <= now))
    }

    /// Returns the leases of `worker` to the queue.
    pub fn release_worker(&mut self, worker: WorkerId) -> Vec<u32> {
        self.requeue(|s| matches!(s, ShardState::Leased { worker: w, .. } if *w == worker))
    }

    /// Returns every lease to the queue.
    pub fn release_all(&mut self) -> Vec<u32> {
        self.requeue(|s| matches!(s, ShardState::Leased { .. }))
    }

    fn requeue(&mut self, pred: impl Fn(&ShardState) -> bool) -> Vec<u32> {
        let mut out = Vec::new();
        for (i, s) in self.shards.iter_mut().enumerate() {
            if pred(&s.state) {
                s.state = ShardState::Queued;
                out.push(i as u32);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn manifest(n: usize) -> Manifest {
        Manifest {
            shards: (0..n)
                .map(|i| ShardInfo { uri: format!("s{i}"), size: 100, sha256: "ab".repeat(32) })
                .collect(),
        }
    }

    #[test]
    fn every_shard_once_per_data_epoch_across_expiry_and_death() {
        let mut b = ShardBook::new(manifest(3));
        let (w1, w2) = (WorkerId(1), WorkerId(2));
        let l0 = b.lease(0, w1, LeaseId(1), 100).unwrap();
        let l1 = b.lease(0, w2, LeaseId(2), 100).unwrap();
        let l2 = b.lease(0, w1, LeaseId(3), 100).unwrap();
        assert_eq!((l0.shard, l1.shard, l2.shard), (0, 1, 2));
        assert!(b.lease(0, w2, LeaseId(4), 100).is_none());
        // w2's lease expires; w1 dies.
        assert_eq!(b.expire(100), vec![0, 1, 2]);
        // A stale completion is refused.
        assert_eq!(b.complete(101, w2, LeaseId(2)), Err(LeaseError::NotHeld(LeaseId(2))));
        let l = b.lease(101, w2, LeaseId(5), 100).unwrap();
        assert_eq!(b.complete(102, w2, l.id), Ok(0));
        let l = b.lease(102, w1, LeaseId(6), 100).unwrap();
        assert_eq!(b.release_worker(w1), vec![l.shard]);
        let a = b.lease(103, w2, LeaseId(7), 100).unwrap();
        let c = b.lease(103, w2, LeaseId(8), 100).unwrap();
        b.complete(104, w2, a.id).unwrap();
        b.complete(104, w2, c.id).unwrap();
        assert!(b.data_epoch_rolled());
        assert_eq!(b.data_epoch(), 1);
        assert!(b.records().iter().all(|s| s.completions == 1 && s.state == ShardState::Queued));
    }

    #[test]
    fn manifests_are_checked() {
        let ok = r#"{"shards":[{"uri":"a","size":1,"sha256":"%"}]}"#.replace('%', &"0".repeat(64));
        assert!(Manifest::parse(&ok, "m").is_ok());
        let bad = ok.replace(&"0".repeat(64), "xyz");
        assert!(Manifest::parse(&bad, "m").unwrap_err().to_string().contains("sha256"));
        assert!(
            Manifest::parse(r#"{"shards":[]}"#, "m").unwrap_err().to_string().contains("no shards")
        );
        assert!(matches!(Manifest::load("s3://x"), Err(ManifestError::Unsupported(_))));
    }
}
