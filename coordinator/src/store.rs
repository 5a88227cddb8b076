//! Persistence in redb, an embedded transactional store (one file, `state.redb`).
//!
//! Records are JSON values under typed keys: runs, workers (with their contribution ledger),
//! shards (leases included), counters, join tokens (by hash), the checkpoint index, metric
//! points and each run's log. The state machine marks what changed; the server turns that into a
//! [`Batch`] of serialized records and appends (cheap, under its lock) and the writer commits
//! batches, several at a time, in one durable transaction ([`Store::write`]) before anything in
//! them is announced.
//!
//! Loading never fails on one bad record: a record that does not parse is moved to the
//! `quarantine` table, reported, and the rest loads ([`Store::load`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proto::RunId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cluster::audits::AuditRecord;
use crate::cluster::checkpoints::CheckpointRecord;
use crate::cluster::commitments::CommitmentRecord;
use crate::cluster::{Cluster, Counters, Dirty, Millis, Output, Restored, TokenRecord};
use crate::shards::{ShardBook, ShardRecord};

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const RUNS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("runs");
const WORKERS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("workers");
const SHARDS: TableDefinition<'_, (u64, u32), &[u8]> = TableDefinition::new("shards");
/// Join tokens of the first version: hash → expiry, any number of uses. Read once and moved.
const TOKENS_V1: TableDefinition<'_, &[u8; 32], u64> = TableDefinition::new("join_tokens");
/// Join tokens: hash → [`TokenRecord`].
const TOKENS: TableDefinition<'_, &[u8; 32], &[u8]> = TableDefinition::new("join_tokens_v2");
const CHECKPOINTS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("checkpoints");
/// Every member's commitment to every sync, with its verdict, appended in order: (run, n) → JSON.
const COMMITMENTS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("commitments");
/// Each run's finished audits, by (run, sequence).
const AUDITS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("audits");
/// Each run's log lines (epochs' failures, deaths, divergences, disputes), by (run, sequence).
const RUN_LOG: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("run_log");
/// Metric points by (run, step): one per step, the latest report.
const METRICS: TableDefinition<'_, (u64, u64), &[u8]> = TableDefinition::new("metrics");
/// Records that could not be read: "table/key" → the bytes as they were.
const QUARANTINE: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("quarantine");

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

/// A metric point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub step: u64,
    #[serde(with = "crate::floats::opt_f64", default)]
    pub loss: Option<f64>,
    #[serde(with = "crate::floats::f64")]
    pub tokens_per_sec: f64,
    pub at_ms: Millis,
    /// The accuracy the member reported with it, if the task has one.
    #[serde(with = "crate::floats::opt_f64", default)]
    pub accuracy: Option<f64>,
    /// The run's compute utilisation then (mean over its members; 0 if unknown).
    #[serde(with = "crate::floats::f64", default)]
    pub compute_utilisation: f64,
    /// The run's ring bytes then: the sum of what its members had sent (see
    /// `Cluster::bytes_moved`); per step between two points of one membership.
    #[serde(default)]
    pub bytes_moved: u64,
    /// How many members the run had then.
    #[serde(default)]
    pub workers: u32,
}

/// One line of a run's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub at_ms: Millis,
    pub line: String,
}

/// A record moved aside at load: where it was and why it could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    pub key: String,
    pub reason: String,
}

#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(dberr)
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, Quarantined> {
    serde_json::from_slice(bytes)
        .map_err(|e| Quarantined { key: key.to_owned(), reason: e.to_string() })
}

/// Serialized records and appends, ready to be committed.
#[derive(Debug, Default)]
pub struct Batch {
    runs: BTreeMap<u64, Vec<u8>>,
    workers: BTreeMap<u64, Vec<u8>>,
    shards: BTreeMap<(u64, u32), Vec<u8>>,
    counters: Option<Vec<u8>>,
    /// `None`: the token is gone.
    tokens: BTreeMap<[u8; 32], Option<Vec<u8>>>,
    logs: Vec<(u64, LogLine)>,
    metrics: Vec<(u64, MetricPoint)>,
    checkpoints: Vec<(u64, CheckpointRecord)>,
    commitments: Vec<(u64, CommitmentRecord)>,
    audits: Vec<(u64, AuditRecord)>,
}

impl Batch {
    /// Serializes every dirty record of `cluster` (the state as it is now).
    pub fn collect(cluster: &Cluster, dirty: &BTreeSet<Dirty>) -> Result<Self, StoreError> {
        let mut b = Batch::default();
        for d in dirty {
            match *d {
                Dirty::Run(id) => {
                    if let Some(r) = cluster.run(id) {
                        b.runs.insert(id.0, json(r)?);
                    }
                }
                Dirty::Worker(id) => {
                    if let Some(w) = cluster.worker(id) {
                        b.workers.insert(id.0, json(w)?);
                    }
                }
                Dirty::Shard(run, i) => {
                    if let Some(s) = cluster.shards(run).and_then(|b| b.record(i)) {
                        b.shards.insert((run.0, i), json(s)?);
                    }
                }
                Dirty::Counters => b.counters = Some(json(cluster.counters())?),
                Dirty::Token(h) => {
                    let t = cluster.token(&h).map(|t| json(&t)).transpose()?;
                    b.tokens.insert(h, t);
                }
            }
        }
        Ok(b)
    }

    /// Takes the appends (log lines, metric points, checkpoints) among `outputs` at `now`.
    pub fn append_outputs<'a>(&mut self, now: Millis, outputs: impl Iterator<Item = &'a Output>) {
        for o in outputs {
            match o {
                Output::Log { run, line } => {
                    self.logs.push((run.0, LogLine { at_ms: now, line: line.clone() }));
                }
                Output::Metric { run, point } => self.metrics.push((run.0, point.clone())),
                Output::Checkpoint { run, record } => {
                    self.checkpoints.push((run.0, record.clone()))
                }
                Output::Commitment { run, record } => {
                    self.commitments.push((run.0, record.clone()))
                }
                Output::Audit { run, record } => self.audits.push((run.0, record.clone())),
                Output::ToWorker(..) => {}
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
            && self.workers.is_empty()
            && self.shards.is_empty()
            && self.counters.is_none()
            && self.tokens.is_empty()
            && self.logs.is_empty()
            && self.metrics.is_empty()
            && self.checkpoints.is_empty()
            && self.commitments.is_empty()
            && self.audits.is_empty()
    }

    /// Folds a later batch into this one (later records win; appends keep their order).
    pub fn absorb(&mut self, later: Batch) {
        self.runs.extend(later.runs);
        self.workers.extend(later.workers);
        self.shards.extend(later.shards);
        if later.counters.is_some() {
            self.counters = later.counters;
        }
        self.tokens.extend(later.tokens);
        self.logs.extend(later.logs);
        self.metrics.extend(later.metrics);
        self.checkpoints.extend(later.checkpoints);
        self.commitments.extend(later.commitments);
        self.audits.extend(later.audits);
    }
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
        tx.open_table(COMMITMENTS).map_err(dberr)?;
        tx.open_table(AUDITS).map_err(dberr)?;
        tx.open_table(METRICS).map_err(dberr)?;
        tx.open_table(RUN_LOG).map_err(dberr)?;
        tx.open_table(QUARANTINE).map_err(dberr)?;
        tx.commit().map_err(dberr)?;
        Ok(Self { db })
    }

    /// Loads the cluster's records. A record that cannot be read is moved to the quarantine
    /// table and listed in the result; the rest loads. (A run whose shard records are damaged
    /// loads without its book, and the cluster fails it with the reason.)
    pub fn load(&self) -> Result<(Restored, Vec<Quarantined>), StoreError> {
        self.migrate_tokens()?;
        let tx = self.db.begin_read().map_err(dberr)?;
        let mut bad: Vec<(Quarantined, Vec<u8>)> = Vec::new();
        fn keep<T>(
            bad: &mut Vec<(Quarantined, Vec<u8>)>,
            r: Result<T, Quarantined>,
            bytes: &[u8],
        ) -> Option<T> {
            match r {
                Ok(v) => Some(v),
                Err(q) => {
                    bad.push((q, bytes.to_vec()));
                    None
                }
            }
        }
        let mut out = Restored::default();
        let mut counters_ok = false;
        if let Some(v) = tx.open_table(META).map_err(dberr)?.get("counters").map_err(dberr)?
            && let Some(c) =
                keep(&mut bad, parse::<Counters>("meta/counters", v.value()), v.value())
        {
            out.counters = c;
            counters_ok = true;
        }
        for row in tx.open_table(RUNS).map_err(dberr)?.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let key = format!("runs/{}", k.value());
            out.runs.extend(keep(&mut bad, parse(&key, v.value()), v.value()));
        }
        for row in tx.open_table(WORKERS).map_err(dberr)?.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let key = format!("workers/{}", k.value());
            out.workers.extend(keep(&mut bad, parse(&key, v.value()), v.value()));
        }
        let mut shards: BTreeMap<RunId, Vec<ShardRecord>> = BTreeMap::new();
        let mut broken: BTreeSet<RunId> = BTreeSet::new();
        let mut max_lease = 0u64;
        for row in tx.open_table(SHARDS).map_err(dberr)?.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let (run, shard) = k.value();
            let key = format!("shards/{run}/{shard}");
            let list = shards.entry(RunId(run)).or_default();
            match keep(&mut bad, parse::<ShardRecord>(&key, v.value()), v.value()) {
                Some(rec) if list.len() == shard as usize => {
                    if let crate::shards::ShardState::Leased { lease, .. } = rec.state {
                        max_lease = max_lease.max(lease.0);
                    }
                    list.push(rec);
                }
                _ => {
                    broken.insert(RunId(run));
                }
            }
        }
        out.shards = shards
            .into_iter()
            .filter(|(r, _)| !broken.contains(r))
            .map(|(r, s)| (r, ShardBook::restore(s)))
            .collect();
        for row in tx.open_table(TOKENS).map_err(dberr)?.iter().map_err(dberr)? {
            let (k, v) = row.map_err(dberr)?;
            let key = format!("join_tokens_v2/{}", client::pki::hex(k.value()));
            if let Some(t) = keep(&mut bad, parse::<TokenRecord>(&key, v.value()), v.value()) {
                out.tokens.insert(*k.value(), t);
            }
        }
        drop(tx);
        if !counters_ok {
            // Rebuilt above everything in use, so no id is ever reused.
            out.counters = Counters {
                next_run: out.runs.iter().map(|r| r.id.0).max().unwrap_or(0) + 1,
                next_worker: out.workers.iter().map(|w| w.id.0).max().unwrap_or(0) + 1,
                next_lease: max_lease + 1,
            };
            if out.counters.next_lease > 1 || !out.runs.is_empty() {
                out.counters.next_lease += 1 << 20;
            }
        }
        // What an unfinished run's verification remembered is rebuilt from these (a record
        // that cannot be read is skipped and logged, like the ledger does).
        let unfinished: Vec<RunId> =
            out.runs.iter().filter(|r| !r.state.is_terminal()).map(|r| r.id).collect();
        for run in unfinished {
            out.verification.insert(run, (self.commitments(run)?, self.audits(run)?));
        }
        // Checkpoints of every run, finished ones too: their models can still be fetched.
        let ids: Vec<RunId> = out.runs.iter().map(|r| r.id).collect();
        for run in ids {
            let records = self.checkpoints(run, 2 * crate::cluster::checkpoints::KEPT_STEPS)?;
            if !records.is_empty() {
                out.checkpoints.insert(run, records);
            }
        }
        let quarantined = self.quarantine(bad)?;
        Ok((out, quarantined))
    }

    /// Moves unreadable records aside (same transaction for all).
    fn quarantine(&self, bad: Vec<(Quarantined, Vec<u8>)>) -> Result<Vec<Quarantined>, StoreError> {
        if bad.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut q = tx.open_table(QUARANTINE).map_err(dberr)?;
            let mut runs = tx.open_table(RUNS).map_err(dberr)?;
            let mut workers = tx.open_table(WORKERS).map_err(dberr)?;
            let mut shards = tx.open_table(SHARDS).map_err(dberr)?;
            let mut meta = tx.open_table(META).map_err(dberr)?;
            let mut tokens = tx.open_table(TOKENS).map_err(dberr)?;
            for (item, bytes) in &bad {
                q.insert(item.key.as_str(), bytes.as_slice()).map_err(dberr)?;
                let mut parts = item.key.split('/');
                let table = parts.next().unwrap_or_default();
                let ids: Vec<u64> = parts.filter_map(|p| p.parse().ok()).collect();
                match (table, ids.as_slice()) {
                    ("runs", [id]) => {
                        runs.remove(*id).map_err(dberr)?;
                    }
                    ("workers", [id]) => {
                        workers.remove(*id).map_err(dberr)?;
                    }
                    ("shards", [run, shard]) => {
                        shards.remove((*run, *shard as u32)).map_err(dberr)?;
                    }
                    ("meta", _) => {
                        meta.remove("counters").map_err(dberr)?;
                    }
                    ("join_tokens_v2", _) => {
                        let hex = item.key.rsplit('/').next().unwrap_or_default();
                        if let Some(h) = client::pki::unhex32(hex) {
                            tokens.remove(&h).map_err(dberr)?;
                        }
                    }
                    _ => {}
                }
            }
        }
        tx.commit().map_err(dberr)?;
        Ok(bad.into_iter().map(|(q, _)| q).collect())
    }

    /// Moves first-version tokens (any number of uses) to the current table, with one use each.
    fn migrate_tokens(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let Ok(mut old) = tx.open_table(TOKENS_V1) else { return Ok(()) };
            let mut new = tx.open_table(TOKENS).map_err(dberr)?;
            let rows: Vec<([u8; 32], u64)> = old
                .iter()
                .map_err(dberr)?
                .filter_map(|r| r.ok().map(|(k, v)| (*k.value(), v.value())))
                .collect();
            for (hash, expires_ms) in rows {
                let t = TokenRecord { expires_ms, uses_left: 1 };
                new.insert(&hash, json(&t)?.as_slice()).map_err(dberr)?;
                old.remove(&hash).map_err(dberr)?;
            }
        }
        tx.commit().map_err(dberr)
    }

    /// Commits `batches` (in order) in one durable transaction.
    pub fn write(&self, batches: &[Batch]) -> Result<(), StoreError> {
        if batches.iter().all(Batch::is_empty) {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(dberr)?;
        {
            let mut runs = tx.open_table(RUNS).map_err(dberr)?;
            let mut workers = tx.open_table(WORKERS).map_err(dberr)?;
            let mut shards = tx.open_table(SHARDS).map_err(dberr)?;
            let mut meta = tx.open_table(META).map_err(dberr)?;
            let mut tokens = tx.open_table(TOKENS).map_err(dberr)?;
            let mut log = tx.open_table(RUN_LOG).map_err(dberr)?;
            let mut metrics = tx.open_table(METRICS).map_err(dberr)?;
            let mut checkpoints = tx.open_table(CHECKPOINTS).map_err(dberr)?;
            let mut commitments = tx.open_table(COMMITMENTS).map_err(dberr)?;
            let mut audits = tx.open_table(AUDITS).map_err(dberr)?;
            let mut next_line: BTreeMap<u64, u64> = BTreeMap::new();
            let mut next_commitment: BTreeMap<u64, u64> = BTreeMap::new();
            let mut next_audit: BTreeMap<u64, u64> = BTreeMap::new();
            for b in batches {
                for (id, v) in &b.runs {
                    runs.insert(*id, v.as_slice()).map_err(dberr)?;
                }
                for (id, v) in &b.workers {
                    workers.insert(*id, v.as_slice()).map_err(dberr)?;
                }
                for (k, v) in &b.shards {
                    shards.insert(*k, v.as_slice()).map_err(dberr)?;
                }
                if let Some(c) = &b.counters {
                    meta.insert("counters", c.as_slice()).map_err(dberr)?;
                }
                for (h, t) in &b.tokens {
                    match t {
                        Some(t) => tokens.insert(h, t.as_slice()).map(drop),
                        None => tokens.remove(h).map(drop),
                    }
                    .map_err(dberr)?;
                }
                for (run, line) in &b.logs {
                    let next = next_index(&log, &mut next_line, *run)?;
                    log.insert((*run, next), json(line)?.as_slice()).map_err(dberr)?;
                }
                for (run, c) in &b.commitments {
                    let next = next_index(&commitments, &mut next_commitment, *run)?;
                    commitments.insert((*run, next), json(c)?.as_slice()).map_err(dberr)?;
                }
                for (run, a) in &b.audits {
                    let next = next_index(&audits, &mut next_audit, *run)?;
                    audits.insert((*run, next), json(a)?.as_slice()).map_err(dberr)?;
                }
                for (run, p) in &b.metrics {
                    metrics.insert((*run, p.step), json(p)?.as_slice()).map_err(dberr)?;
                }
                for (run, c) in &b.checkpoints {
                    checkpoints.insert((*run, c.step), json(c)?.as_slice()).map_err(dberr)?;
                }
            }
        }
        tx.commit().map_err(dberr)
    }

    /// Every commitment to a sync of `run` and its verdict, oldest first.
    pub fn commitments(&self, run: RunId) -> Result<Vec<CommitmentRecord>, StoreError> {
        self.range(COMMITMENTS, run, "commitments")
    }

    /// Every finished audit of `run`, oldest first.
    pub fn audits(&self, run: RunId) -> Result<Vec<AuditRecord>, StoreError> {
        self.range(AUDITS, run, "audits")
    }

    /// The newest `n` checkpoint records of `run`, oldest first (a run's index can be long; a
    /// restart reads only its end).
    pub fn checkpoints(&self, run: RunId, n: usize) -> Result<Vec<CheckpointRecord>, StoreError> {
        self.records(CHECKPOINTS, run, "checkpoints", Some(n))
    }

    /// The run's log, oldest first.
    pub fn log(&self, run: RunId) -> Result<Vec<LogLine>, StoreError> {
        self.range(RUN_LOG, run, "run_log")
    }

    pub fn metrics(&self, run: RunId) -> Result<Vec<MetricPoint>, StoreError> {
        self.range(METRICS, run, "metrics")
    }

    /// The records of `run` in a (run, n)-keyed table, in key order; unreadable ones skipped.
    fn range<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<'_, (u64, u64), &[u8]>,
        run: RunId,
        name: &str,
    ) -> Result<Vec<T>, StoreError> {
        self.records(table, run, name, None)
    }

    /// [`Store::range`], or only its newest `newest` records (still in key order).
    fn records<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<'_, (u64, u64), &[u8]>,
        run: RunId,
        name: &str,
        newest: Option<usize>,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(table).map_err(dberr)?;
        let rows = t.range((run.0, 0)..=(run.0, u64::MAX)).map_err(dberr)?;
        let rows: Box<dyn Iterator<Item = _>> = match newest {
            Some(n) => Box::new(rows.rev().take(n)),
            None => Box::new(rows),
        };
        let mut out = Vec::new();
        for row in rows {
            let (k, v) = row.map_err(dberr)?;
            match parse(&format!("{name}/{:?}", k.value()), v.value()) {
                Ok(x) => out.push(x),
                Err(q) => {
                    tracing::warn!(key = %q.key, reason = %q.reason, "skipping an unreadable record")
                }
            }
        }
        if newest.is_some() {
            out.reverse();
        }
        Ok(out)
    }

    /// Records in quarantine: their keys.
    pub fn quarantined(&self) -> Result<Vec<String>, StoreError> {
        let tx = self.db.begin_read().map_err(dberr)?;
        let t = tx.open_table(QUARANTINE).map_err(dberr)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(dberr)? {
            out.push(row.map_err(dberr)?.0.value().to_owned());
        }
        Ok(out)
    }

    /// Writes raw bytes under a run key (tests of quarantine: a record as a bug or a disk
    /// might leave it).
    pub fn put_raw_run(&self, id: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(dberr)?;
        tx.open_table(RUNS).map_err(dberr)?.insert(id, bytes).map_err(dberr)?;
        tx.commit().map_err(dberr)
    }
}

/// The next free index of `run` in an append-only (run, n)-keyed table, counting what this
/// transaction already appended.
fn next_index(
    table: &redb::Table<'_, (u64, u64), &[u8]>,
    next: &mut BTreeMap<u64, u64>,
    run: u64,
) -> Result<u64, StoreError> {
    let n = match next.get(&run) {
        Some(n) => *n,
        None => table
            .range((run, 0)..=(run, u64::MAX))
            .map_err(dberr)?
            .next_back()
            .transpose()
            .map_err(dberr)?
            .map_or(0, |(k, _)| k.value().1 + 1),
    };
    next.insert(run, n + 1);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_record_is_quarantined_and_the_rest_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = Store::open(&path).unwrap();
        store.put_raw_run(7, br#"{"id": 7, "tokens_per_sec": null, "garbage": true"#).unwrap();
        let (loaded, quarantined) = store.load().unwrap();
        assert!(loaded.runs.is_empty());
        assert_eq!(quarantined.len(), 1);
        assert_eq!(quarantined[0].key, "runs/7");
        // Moved aside: a second load is clean, and the bytes are kept for inspection.
        drop(store);
        let store = Store::open(&path).unwrap();
        let (_, again) = store.load().unwrap();
        assert!(again.is_empty());
        assert_eq!(store.quarantined().unwrap(), vec!["runs/7".to_owned()]);
    }

    #[test]
    fn the_newest_checkpoints_of_a_run_read_in_step_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let outputs: Vec<Output> = [(1, 10), (1, 20), (1, 30), (2, 5)]
            .into_iter()
            .map(|(run, step)| Output::Checkpoint {
                run: RunId(run),
                record: CheckpointRecord { step, ..Default::default() },
            })
            .collect();
        let mut batch = Batch::default();
        batch.append_outputs(0, outputs.iter());
        store.write(&[batch]).unwrap();
        let steps = |n| -> Vec<u64> {
            store.checkpoints(RunId(1), n).unwrap().into_iter().map(|r| r.step).collect()
        };
        assert_eq!(steps(2), [20, 30]);
        assert_eq!(steps(10), [10, 20, 30]);
        assert_eq!(store.range::<CheckpointRecord>(CHECKPOINTS, RunId(1), "c").unwrap().len(), 3);
    }
}
