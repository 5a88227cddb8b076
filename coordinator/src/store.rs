//! Persistence in redb, an embedded transactional store (one file, `state.redb`).
//!
//! Records are JSON values under typed keys: runs, workers (with their contribution ledger),
//! shards (leases included), counters, join-token hashes, the checkpoint index and metric
//! summaries. [`Store::persist`] writes every record the state machine marked dirty in one
//! transaction, committed durably before the shell tells anyone about the change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proto::RunId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cluster::{Cluster, Counters, Dirty, Millis, RunRecord, WorkerRecord};
use crate::shards::{ShardBook, ShardRecord};

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const RUNS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("runs");
const WORKERS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("workers");
const SHARDS: TableDefinition<'_, (u64, u32), &[u8]> = TableDefinition::new("shards");
const TOKENS: TableDefinition<'_, &[u8; 32], u64> = TableDefinition::new("join_tokens");
const CHECKPOINTS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("checkpoints");
/// Each run's log lines (epochs' failures, deaths, divergences, evictions), by (run, sequence).
const RUN_LOG: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("run_log");
const METRICS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("metrics");

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Db(String),
    #[error("state store record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
}

fn dberr<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// A checkpoint a worker reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub uri: String,
    pub sha256: String,
    pub worker: u64,
    pub at_ms: Millis,
}

/// A metric summary point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub step: u64,
    pub loss: Option<f64>,
    pub tokens_per_sec: f64,
    pub at_ms: Millis,
}

/// One line of a run's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub at_ms: Millis,
    pub line: String,
}

/// Everything loaded at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub counters: Counters,
    pub runs: Vec<RunRecord>,
    pub workers: Vec<WorkerRecord>,
    pub shards: BTreeMap<RunId, ShardBook>,
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(dberr)
}

fn parse<T: for<'de> Deserialize<'de>>(
    key: impl std::fmt::Display,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { key: key.to_string(), reason: e.to_string() })
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(dberr)?;
        // Create every table, so reads never meet a missing one.
        let tx = db.begin_write().map_err(dberr)?;
        tx.open_table(META).map_err(dberr)?;
        tx.open_table(RUNS).map_err(dberr)?;
        tx.open_table(WORKERS).map_err(dberr)?;
        tx.open_table(SHARDS).map_err(dberr)?;
        tx.open_table(TOKENS).map_err(dberr)?;
        tx.open_table(CHECKPOINTS).map_err(dberr)?;
        tx.open_table(METRICS).map_err(dberr)?;
        tx.open_table(RUN_LOG).map_err(dberr)?;
        tx.commit().map_err(dberr)?;
        Ok(Self { db })
    }

    /// Loads the cluster's records.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let mut out = Loaded {
            counters: Counters { next_run: 1, next_worker: 1, next_lease: 1 },
            ..Default::default()
        };
        if let Some(v) = tx.open_table(META).map_err(dberr)?.get("counters").map_err(dberr)? {
            out.counters = parse("counters", v.value())?;
        }
        for row in tx.open_table(RUNS).map_err(dberr)?.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            out.runs.push(parse(format!("runs/{}", k.value()), v.value())?);
        }
        for row in tx.open_table(WORKERS).map_err(dberr)?.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            out.workers.push(parse(format!("workers/{}", k.value()), v.value())?);
        }
        let mut shards: BTreeMap<RunId, Vec<ShardRecord>> = BTreeMap::new();
        for row in tx.open_table(SHARDS).map_err(dberr)?.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let (run, shard) = k.value();
            let list = shards.entry(RunId(run)).or_default();
            if list.len() != shard as usize {
                return Err(StoreError::Corrupt {
                    key: format!("shards/{run}/{shard}"),
                    reason: format!("expected shard {}", list.len()),
                });
            }
            list.push(parse(format!("shards/{run}/{shard}"), v.value())?);
        }
        out.shards = shards.into_iter().map(|(r, s)| (r, ShardBook::restore(s))).collect();
        Ok(out)
    }

    /// Writes every dirty record of `cluster` in one durable transaction.
    pub fn persist(&self, cluster: &Cluster, dirty: &BTreeSet<Dirty>) -> Result<(), StoreError> {
        if dirty.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut runs = tx.open_table(RUNS).map_err(dberr)?;
            let mut workers = tx.open_table(WORKERS).map_err(dberr)?;
            let mut shards = tx.open_table(SHARDS).map_err(dberr)?;
            let mut meta = tx.open_table(META).map_err(dberr)?;
            for d in dirty {
                match *d {
                    Dirty::Run(id) => {
                        if let Some(r) = cluster.run(id) {
                            runs.insert(id.0, json(r)?.as_slice()).map_err(dberr)?;
                        }
                    }
                    Dirty::Worker(id) => {
                        if let Some(w) = cluster.worker(id) {
                            workers.insert(id.0, json(w)?.as_slice()).map_err(dberr)?;
                        }
                    }
                    Dirty::Shard(run, i) => {
                        if let Some(s) = cluster.shards(run).and_then(|b| b.record(i)) {
                            shards.insert((run.0, i), json(s)?.as_slice()).map_err(dberr)?;
                        }
                    }
                    Dirty::Counters => {
                        meta.insert("counters", json(cluster.counters())?.as_slice())
                            .map_err(dberr)?;
                    }
                }
            }
        }
        tx.commit().map_err(dberr)
    }

    /// Stores a join token's hash with its expiry.
    pub fn add_token(&self, hash: &[u8; 32], expires_ms: Millis) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        tx.open_table(TOKENS).map_err(dberr)?.insert(hash, expires_ms).map_err(dberr)?;
        tx.commit().map_err(dberr)
    }

    /// The expiry of a join token, by hash.
    pub fn token_expiry(&self, hash: &[u8; 32]) -> Result<Option<Millis>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        Ok(tx.open_table(TOKENS).map_err(dberr)?.get(hash).map_err(dberr)?.map(|v| v.value()))
    }

    pub fn add_checkpoint(&self, run: RunId, c: &CheckpointRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        tx.open_table(CHECKPOINTS)
            .map_err(dberr)?
            .insert((run.0, c.step), json(c)?.as_slice())
            .map_err(dberr)?;
        tx.commit().map_err(dberr)
    }

    pub fn checkpoints(&self, run: RunId) -> Result<Vec<CheckpointRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(CHECKPOINTS).map_err(dberr)?;
        let mut out = Vec::new();
        for row in t.range((run.0, 0)..=(run.0, u64::MAX)).map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            out.push(parse(format!("checkpoints/{:?}", k.value()), v.value())?);
        }
        Ok(out)
    }

    /// Appends a line to the run's log.
    pub fn append_log(&self, run: RunId, l: &LogLine) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut t = tx.open_table(RUN_LOG).map_err(dberr)?;
            let next = t
                .range((run.0, 0)..=(run.0, u64::MAX))
                .map_err(dberr)?
                .next_back()
                .transpose()
                .map_err(dberr)?
                .map_or(0, |(k, _)| k.value().1 + 1);
            t.insert((run.0, next), json(l)?.as_slice()).map_err(dberr)?;
        }
        tx.commit().map_err(dberr)
    }

    /// The run's log, oldest first.
    pub fn log(&self, run: RunId) -> Result<Vec<LogLine>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(RUN_LOG).map_err(dberr)?;
        let mut out = Vec::new();
        for row in t.range((run.0, 0)..=(run.0, u64::MAX)).map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            out.push(parse(format!("run_log/{:?}", k.value()), v.value())?);
        }
        Ok(out)
    }

    pub fn add_metric(&self, run: RunId, m: &MetricPoint) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        tx.open_table(METRICS)
            .map_err(dberr)?
            .insert((run.0, m.step), json(m)?.as_slice())
            .map_err(dberr)?;
        tx.commit().map_err(dberr)
    }

    pub fn metrics(&self, run: RunId) -> Result<Vec<MetricPoint>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(METRICS).map_err(dberr)?;
        let mut out = Vec::new();
        for row in t.range((run.0, 0)..=(run.0, u64::MAX)).map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            out.push(parse(format!("metrics/{:?}", k.value()), v.value())?);
        }
        Ok(out)
    }
}
