//! Which checkpoint copies a user can take home.
//!
//! Every member writes a checkpoint of the same synchronised state, and replicas are bitwise
//! identical, so their `model.safetensors` files are the same bytes (and so are the replicated
//! state files, and the model's description). Each member reports the SHA-256 of each of its
//! files; a model is *verified* once a strict majority of the run's current members reported
//! the same digest for it, and a file or a description is vouched for when a majority of the
//! members (the count the model was verified against) reported the same digest for it. One
//! member's word is never enough where there are two or more: a liar can report any digest, but
//! not make the others report it, and a member's report stops counting when it leaves. The
//! relay (`server::fetch`) accepts a copy's bytes only against these digests and withholds files
//! no majority vouched for.
//!
//! Sans-IO: the book is fed reports and asked for sources; the cluster persists the records it
//! returns.

use std::collections::BTreeMap;

use proto::WorkerId;
use serde::{Deserialize, Serialize};

use super::Millis;

/// Steps kept in memory per run, verified and unverified each (workers keep a few
/// checkpoints; older records stay in the store). Reports of unverified steps never push a
/// verified one out.
pub const KEPT_STEPS: usize = 16;

/// Reports kept per step: one per member, and a run has at most this many members over a step.
pub const MAX_COPIES: usize = 256;

/// Every member's report of one step, and the verified model digest if there is one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    /// One per worker (its latest report), in the order they first reported.
    #[serde(default)]
    pub copies: Vec<CheckpointCopy>,
    /// The SHA-256 of `model.safetensors` a majority reported ("" until then), how many of the
    /// members then reported it, and of how many (the most at one of its reports).
    #[serde(default)]
    pub model_sha256: String,
    #[serde(default)]
    pub agreeing: u32,
    #[serde(default)]
    pub members: u32,
}

/// One member's report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointCopy {
    pub worker: u64,
    /// Where it is on the member's machine (informational).
    pub uri: String,
    /// SHA-256 of its `meta.json` (which lists every file's digest).
    pub sha256: String,
    /// SHA-256 of its `model.safetensors` ("" from earlier workers).
    #[serde(default)]
    pub model_sha256: String,
    /// SHA-256 of each file its `meta.json` lists.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// SHA-256 of its model description ([`client::checkpoint::description_sha256`]).
    #[serde(default)]
    pub description_sha256: String,
    pub at_ms: Millis,
    /// Its model was found to differ from the verified one (and the run was told).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flagged: bool,
}

/// What a report changed.
#[derive(Debug, PartialEq)]
pub enum Reported {
    /// Recorded; the step's model is not verified (yet), or was before.
    Recorded,
    /// This report made a majority: the step's model is verified.
    Verified,
    /// The step's verified model has another digest than this member's copy (said once per
    /// member and step).
    Differs { verified: String },
    /// Not recorded: the step already has [`MAX_COPIES`] reports, or is older than every step
    /// the book keeps while it is full.
    Full,
}

/// The checkpoints of one run.
#[derive(Clone, Debug, Default)]
pub struct Book {
    steps: BTreeMap<u64, CheckpointRecord>,
}

/// A verified checkpoint and the members holding a good copy, for a fetch.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub step: u64,
    pub model_sha256: String,
    pub agreeing: u32,
    pub members: u32,
    /// Members whose report carried the verified model: (worker, SHA-256 of its meta.json).
    pub copies: Vec<(WorkerId, String)>,
    /// The files besides the model a majority vouched for (name → digest); the rest are
    /// withheld.
    pub files: BTreeMap<String, String>,
    /// The model description a majority vouched for, if one did.
    pub description_sha256: Option<String>,
}

impl Book {
    /// From stored records (any order); keeps the newest.
    pub fn restore(records: impl IntoIterator<Item = CheckpointRecord>) -> Self {
        let mut book = Self::default();
        for r in records {
            book.steps.insert(r.step, r);
        }
        book.trim();
        book
    }

    /// Drops the oldest unverified records beyond [`KEPT_STEPS`], then the oldest verified.
    fn trim(&mut self) {
        for verified in [false, true] {
            let of_kind: Vec<u64> = self
                .steps
                .values()
                .filter(|r| r.model_sha256.is_empty() != verified)
                .map(|r| r.step)
                .collect();
            for step in of_kind.iter().take(of_kind.len().saturating_sub(KEPT_STEPS)) {
                self.steps.remove(step);
            }
        }
    }

    /// A member's report of its checkpoint of `step`; `members` are the run's members now.
    /// Returns what changed and the step's record (to persist).
    pub fn report(
        &mut self,
        now: Millis,
        worker: WorkerId,
        step: u64,
        mut copy: CheckpointCopy,
        members: &[WorkerId],
    ) -> (Reported, CheckpointRecord) {
        let full = self.steps.len() >= 2 * KEPT_STEPS;
        if !self.steps.contains_key(&step)
            && full
            && self.steps.keys().next().is_some_and(|&o| step < o)
        {
            return (Reported::Full, CheckpointRecord { step, ..Default::default() });
        }
        copy.worker = worker.0;
        copy.at_ms = now;
        let model = copy.model_sha256.clone();
        let r = self
            .steps
            .entry(step)
            .or_insert_with(|| CheckpointRecord { step, ..Default::default() });
        let i = match r.copies.iter().position(|c| c.worker == worker.0) {
            Some(i) => {
                copy.flagged = r.copies[i].flagged && r.copies[i].model_sha256 == model;
                r.copies[i] = copy;
                i
            }
            None if r.copies.len() >= MAX_COPIES => return (Reported::Full, r.clone()),
            None => {
                r.copies.push(copy);
                r.copies.len() - 1
            }
        };
        let member = |c: &CheckpointCopy| members.contains(&WorkerId(c.worker));
        let agreeing = || {
            r.copies
                .iter()
                .filter(|c| member(c) && !model.is_empty() && c.model_sha256 == model)
                .count()
        };
        let outcome = if !r.model_sha256.is_empty() {
            if model == r.model_sha256 {
                // One more copy of the verified model: the count shown grows with it.
                r.agreeing = r.agreeing.max(agreeing() as u32);
                r.members = r.members.max(members.len() as u32).max(r.agreeing);
                Reported::Recorded
            } else if r.copies[i].flagged {
                Reported::Recorded // said already
            } else {
                r.copies[i].flagged = true;
                Reported::Differs { verified: r.model_sha256.clone() }
            }
        } else {
            let n = agreeing();
            if n > 0 && 2 * n > members.len() {
                r.model_sha256 = model;
                r.agreeing = n as u32;
                r.members = members.len() as u32;
                Reported::Verified
            } else {
                Reported::Recorded
            }
        };
        let record = r.clone();
        self.trim();
        (outcome, record)
    }

    /// The checkpoint of `step` (or the newest) whose model is verified, with the members whose
    /// copies carry the verified model and what else a majority vouched for; `Err` says what
    /// there is instead.
    pub fn source(&self, step: Option<u64>) -> Result<Source, String> {
        let record = match step {
            Some(s) => self.steps.get(&s).ok_or_else(|| match self.steps.keys().next_back() {
                Some(newest) => {
                    format!("no member reported a checkpoint of step {s} (newest: {newest})")
                }
                None => "no member reported a checkpoint yet".to_owned(),
            })?,
            None => {
                self.steps.values().rev().find(|r| !r.model_sha256.is_empty()).ok_or_else(|| {
                    match self.steps.values().next_back() {
                        Some(r) => format!(
                            "no checkpoint has a model a majority of the members reported alike \
                         (newest: step {}, {} report(s))",
                            r.step,
                            r.copies.len()
                        ),
                        None => "no member reported a checkpoint yet".to_owned(),
                    }
                })?
            }
        };
        if record.model_sha256.is_empty() {
            return Err(format!(
                "the model of step {} is not verified: no majority of the members reported one \
                 digest ({} report(s))",
                record.step,
                record.copies.len()
            ));
        }
        let good: Vec<&CheckpointCopy> =
            record.copies.iter().filter(|c| c.model_sha256 == record.model_sha256).collect();
        let majority = |digests: Vec<&str>| -> Option<String> {
            let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
            for d in digests.into_iter().filter(|d| !d.is_empty()) {
                *counts.entry(d).or_default() += 1;
            }
            counts.into_iter().find(|(_, n)| 2 * n > record.members).map(|(d, _)| d.to_owned())
        };
        let names: std::collections::BTreeSet<&String> =
            good.iter().flat_map(|c| c.files.keys()).collect();
        let files = names
            .into_iter()
            .filter(|n| n.as_str() != "model.safetensors")
            .filter_map(|n| {
                let d = majority(
                    good.iter().filter_map(|c| c.files.get(n).map(String::as_str)).collect(),
                )?;
                Some((n.clone(), d))
            })
            .collect();
        Ok(Source {
            step: record.step,
            model_sha256: record.model_sha256.clone(),
            agreeing: record.agreeing,
            members: record.members,
            copies: good.iter().map(|c| (WorkerId(c.worker), c.sha256.clone())).collect(),
            files,
            description_sha256: majority(
                good.iter().map(|c| c.description_sha256.as_str()).collect(),
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(w: u64, model: &str) -> CheckpointCopy {
        CheckpointCopy {
            uri: "file:///x".into(),
            sha256: format!("meta{w}"),
            model_sha256: model.into(),
            ..Default::default()
        }
    }

    fn ids(n: u64) -> Vec<WorkerId> {
        (1..=n).map(WorkerId).collect()
    }

    /// Worker `w` reports `model` for `step` in a run whose members are workers 1..=members.
    fn report(b: &mut Book, w: u64, step: u64, model: &str, members: u64) -> Reported {
        b.report(0, WorkerId(w), step, copy(w, model), &ids(members)).0
    }

    #[test]
    fn a_majority_of_members_verifies_a_model_and_one_liar_does_not() {
        let mut b = Book::default();
        // A lone liar in a three-member run: not verified, whatever it claims.
        assert_eq!(report(&mut b, 1, 10, "evil", 3), Reported::Recorded);
        assert!(b.source(None).is_err());
        assert_eq!(report(&mut b, 2, 10, "good", 3), Reported::Recorded);
        assert_eq!(report(&mut b, 3, 10, "good", 3), Reported::Verified);
        let s = b.source(None).unwrap();
        assert_eq!((s.step, s.model_sha256.as_str(), s.agreeing, s.members), (10, "good", 2, 3));
        // Only the copies with the verified digest are sources.
        assert_eq!(s.copies, vec![(WorkerId(2), "meta2".into()), (WorkerId(3), "meta3".into())]);
        // A fourth member (the run grew) confirming it counts.
        assert_eq!(report(&mut b, 4, 10, "good", 4), Reported::Recorded);
        let s = b.source(None).unwrap();
        assert_eq!((s.agreeing, s.members, s.copies.len()), (3, 4, 3));
        // The liar repeating itself changes nothing; the run is told its copy differs, once.
        assert_eq!(report(&mut b, 1, 10, "evil", 3), Reported::Differs { verified: "good".into() });
        assert_eq!(report(&mut b, 1, 10, "evil", 3), Reported::Recorded);
        assert_eq!(b.source(Some(10)).unwrap().model_sha256, "good");
    }

    #[test]
    fn one_member_cannot_vote_twice_and_half_is_not_a_majority() {
        let mut b = Book::default();
        assert_eq!(report(&mut b, 1, 5, "x", 2), Reported::Recorded);
        assert_eq!(report(&mut b, 1, 5, "x", 2), Reported::Recorded);
        assert!(b.source(Some(5)).is_err());
        assert_eq!(report(&mut b, 2, 5, "y", 2), Reported::Recorded);
        assert!(b.source(None).unwrap_err().contains("majority"));
        // An empty digest (an earlier worker) never counts.
        let mut b = Book::default();
        assert_eq!(report(&mut b, 1, 5, "", 1), Reported::Recorded);
        assert!(b.source(None).is_err());
    }

    #[test]
    fn the_newest_verified_step_is_the_default_and_old_steps_are_dropped() {
        let mut b = Book::default();
        report(&mut b, 1, 10, "a", 1);
        report(&mut b, 1, 20, "b", 3); // one of three: unverified
        assert_eq!(b.source(None).unwrap().step, 10);
        assert!(b.source(Some(20)).unwrap_err().contains("not verified"));
        assert!(b.source(Some(15)).unwrap_err().contains("newest: 20"));
        for s in 0..KEPT_STEPS as u64 {
            report(&mut b, 1, 100 + s, "c", 1);
        }
        assert!(b.source(Some(10)).is_err());
        assert_eq!(b.source(None).unwrap().step, 100 + KEPT_STEPS as u64 - 1);
        let restored = Book::restore(b.steps.values().cloned());
        assert_eq!(restored.source(None), b.source(None));
    }

    #[test]
    fn copies_per_step_are_bounded() {
        let mut b = Book::default();
        for w in 1..=MAX_COPIES as u64 {
            report(&mut b, w, 1, "z", 1_000);
        }
        assert_eq!(report(&mut b, 999, 1, "z", 1_000), Reported::Full);
        // A member already counted may still update its own report.
        assert_eq!(report(&mut b, 1, 1, "z", 1_000), Reported::Recorded);
    }

    #[test]
    fn a_report_counts_only_while_its_member_is_in_the_run() {
        let mut b = Book::default();
        assert_eq!(report(&mut b, 1, 10, "m", 3), Reported::Recorded);
        // Worker 1 left; 4 joined: one vote of the members {2, 3, 4} is no majority.
        let now = [WorkerId(2), WorkerId(3), WorkerId(4)];
        assert_eq!(b.report(0, WorkerId(4), 10, copy(4, "m"), &now).0, Reported::Recorded);
        assert!(b.source(Some(10)).is_err());
        assert_eq!(b.report(0, WorkerId(2), 10, copy(2, "m"), &now).0, Reported::Verified);
    }

    #[test]
    fn unverified_reports_never_push_a_verified_checkpoint_out() {
        let mut b = Book::default();
        report(&mut b, 1, 10, "a", 1);
        // A liar in a 3-member run reports 40 later steps nobody else confirms.
        for s in 11..51 {
            assert_eq!(report(&mut b, 3, s, "x", 3), Reported::Recorded);
        }
        assert_eq!(b.source(None).unwrap().step, 10);
        // Full of both kinds: a step older than all kept is refused (not recorded blank over
        // the stored one).
        for s in 0..KEPT_STEPS as u64 {
            report(&mut b, 1, 100 + s, "a", 1);
        }
        assert_eq!(report(&mut b, 1, 5, "a", 1), Reported::Full);
    }

    #[test]
    fn files_and_descriptions_count_only_where_a_majority_reported_them() {
        let mut b = Book::default();
        let with = |w: u64, opt: &str, desc: &str| CheckpointCopy {
            files: [
                ("model.safetensors".to_owned(), "m".to_owned()),
                ("optimizer.safetensors".to_owned(), opt.to_owned()),
            ]
            .into(),
            description_sha256: desc.into(),
            ..copy(w, "m")
        };
        let members = ids(3);
        b.report(0, WorkerId(1), 7, with(1, "o1", "d"), &members);
        b.report(0, WorkerId(2), 7, with(2, "o2", "d"), &members);
        let s = b.source(None).unwrap();
        // Each member's own optimizer state (diloco): withheld; the description: vouched for.
        assert!(s.files.is_empty(), "{s:?}");
        assert_eq!(s.description_sha256.as_deref(), Some("d"));
        b.report(0, WorkerId(3), 7, with(3, "o2", "e"), &members);
        let s = b.source(None).unwrap();
        assert_eq!(s.files.get("optimizer.safetensors").map(String::as_str), Some("o2"));
        assert_eq!(s.description_sha256.as_deref(), Some("d"));
    }
}
