//! Which checkpoint copies a user can take home.
//!
//! Every member writes a checkpoint of the same synchronised state, and replicas are bitwise
//! identical, so their `model.safetensors` files are the same bytes. Each member reports the
//! SHA-256 of its own; a model is *verified* once a majority of the run's members (counted when
//! the report arrives) reported the same digest. One member's word is never enough where there
//! are two or more: a liar can report any digest, but not make the others report it. The
//! relay (`server::fetch`) then accepts a copy only if its bytes have the verified digest.
//!
//! Sans-IO: the book is fed reports and asked for sources; the cluster persists the records it
//! returns.

use std::collections::BTreeMap;

use proto::WorkerId;
use serde::{Deserialize, Serialize};

use super::Millis;

/// Steps kept in memory per run (workers keep a few checkpoints; older records stay in the
/// store, where `longhaul checkpoint fetch --step` no longer finds a copy anyway).
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
    /// The SHA-256 of `model.safetensors` a majority reported ("" until then), how many members
    /// reported it, and of how many (the most the run had at one of those reports).
    #[serde(default)]
    pub model_sha256: String,
    #[serde(default)]
    pub agreeing: u32,
    #[serde(default)]
    pub members: u32,
}

/// One member's report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointCopy {
    pub worker: u64,
    /// Where it is on the member's machine (informational).
    pub uri: String,
    /// SHA-256 of its `meta.json` (which lists every file's digest).
    pub sha256: String,
    /// SHA-256 of its `model.safetensors` ("" from earlier workers).
    #[serde(default)]
    pub model_sha256: String,
    pub at_ms: Millis,
}

/// What a report changed.
#[derive(Debug, PartialEq)]
pub enum Reported {
    /// Recorded; the step's model is not verified (yet), or was before.
    Recorded,
    /// This report made a majority: the step's model is verified.
    Verified,
    /// The step's verified model has another digest than this member's copy.
    Differs { verified: String },
    /// Not recorded: the step already has [`MAX_COPIES`] reports.
    Full,
}

/// The checkpoints of one run.
#[derive(Clone, Debug, Default)]
pub struct Book {
    steps: BTreeMap<u64, CheckpointRecord>,
}

/// A verified checkpoint and the live members holding a good copy, for a fetch.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub step: u64,
    pub model_sha256: String,
    pub agreeing: u32,
    pub members: u32,
    /// Members whose report carried the verified digest: (worker, SHA-256 of its meta.json).
    pub copies: Vec<(WorkerId, String)>,
}

impl Book {
    /// From stored records (any order); keeps the newest [`KEPT_STEPS`].
    pub fn restore(records: impl IntoIterator<Item = CheckpointRecord>) -> Self {
        let mut book = Self::default();
        for r in records {
            book.steps.insert(r.step, r);
        }
        book.trim();
        book
    }

    fn trim(&mut self) {
        while self.steps.len() > KEPT_STEPS {
            self.steps.pop_first();
        }
    }

    /// A member's report of its checkpoint of `step`; `members` is the run's member count now.
    /// Returns what changed and the step's record (to persist).
    pub fn report(
        &mut self,
        now: Millis,
        worker: WorkerId,
        step: u64,
        copy: (&str, &str, &str),
        members: usize,
    ) -> (Reported, CheckpointRecord) {
        let (uri, sha256, model_sha256) = copy;
        let r = self
            .steps
            .entry(step)
            .or_insert_with(|| CheckpointRecord { step, ..Default::default() });
        let new = CheckpointCopy {
            worker: worker.0,
            uri: uri.to_owned(),
            sha256: sha256.to_owned(),
            model_sha256: model_sha256.to_owned(),
            at_ms: now,
        };
        match r.copies.iter().position(|c| c.worker == worker.0) {
            Some(i) => r.copies[i] = new,
            None if r.copies.len() >= MAX_COPIES => return (Reported::Full, r.clone()),
            None => r.copies.push(new),
        }
        let outcome = if !r.model_sha256.is_empty() {
            if model_sha256 == r.model_sha256 {
                // One more copy of the verified model: the count shown grows with it.
                r.agreeing =
                    r.copies.iter().filter(|c| c.model_sha256 == model_sha256).count() as u32;
                r.members = r.members.max(members as u32).max(r.agreeing);
                Reported::Recorded
            } else {
                Reported::Differs { verified: r.model_sha256.clone() }
            }
        } else if model_sha256.is_empty() {
            Reported::Recorded
        } else {
            let agreeing = r.copies.iter().filter(|c| c.model_sha256 == model_sha256).count();
            if 2 * agreeing > members {
                r.model_sha256 = model_sha256.to_owned();
                r.agreeing = agreeing as u32;
                r.members = members as u32;
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
    /// copies carry the verified digest; `Err` says what there is instead.
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
        Ok(Source {
            step: record.step,
            model_sha256: record.model_sha256.clone(),
            agreeing: record.agreeing,
            members: record.members,
            copies: record
                .copies
                .iter()
                .filter(|c| c.model_sha256 == record.model_sha256)
                .map(|c| (WorkerId(c.worker), c.sha256.clone()))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(b: &mut Book, w: u64, step: u64, model: &str, members: usize) -> Reported {
        b.report(0, WorkerId(w), step, ("file:///x", &format!("meta{w}"), model), members).0
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
        // The liar repeating itself changes nothing; it is told its copy differs.
        assert_eq!(report(&mut b, 1, 10, "evil", 3), Reported::Differs { verified: "good".into() });
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
        for w in 0..MAX_COPIES as u64 {
            report(&mut b, w, 1, "z", 10_000);
        }
        assert_eq!(report(&mut b, 99_999, 1, "z", 10_000), Reported::Full);
        // A member already counted may still update its own report.
        assert_eq!(report(&mut b, 0, 1, "z", 10_000), Reported::Recorded);
    }
}
