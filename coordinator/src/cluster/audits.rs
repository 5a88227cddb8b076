//! Audits by recomputation: after a sync's commitments are fixed, the coordinator draws some
//! contributions to audit and gives each to another member of the same reproducibility profile,
//! which recomputes it from the committed inputs (the recorded state, the committed data spans)
//! and answers the digest it found. Pure: the cluster calls it, the harness and unit tests
//! drive it.
//!
//! An auditor is never told the digest it should find, so it cannot approve without computing
//! (no rubber stamp to catch with planted claims). The verdict needs two independent parties:
//!
//! | answers | verdict |
//! |---|---|
//! | the first auditor finds the committed digest | passed |
//! | it does not | a second auditor (neither the audited member nor the first) recomputes |
//! | the second finds the committed digest | passed; the first auditor was wrong: counted against it, and after two such it audits no more in the run (not struck: the audited member agreeing with the second auditor is an interested party, so this rests on one disinterested word) |
//! | the second finds what the first found | a strike for the audited member: two recomputations agree against it |
//! | the second finds a third digest | inconclusive: nobody is blamed, the audited member is audited at every sync for a while |
//! | an auditor cannot recompute (state or data gone), or answers too late | dropped: nobody is credited or blamed (asking others until one can would let a colluder wait until only colluders can) |
//! | diloco: the audited member does not send its committed inner optimizer state | withheld: nobody is struck (a restarted worker lost it honestly), but the round's credit is forfeited and its contributions are left out for the next 1, 2, 4, ... syncs (doubling with each withheld audit, at most [`HOT_SYNCS`]), then audited at every sync for a while |
//! | diloco: the audited member sends an inner state whose digest is not the one it committed | a strike: the coordinator checked the bytes against the commitment itself |
//!
//! Who could lie, and what it would gain:
//! - an audited member that did less work (half its batch, other data, a replayed or made-up
//!   digest): the recomputation differs, a second one confirms it: a strike; at the run's
//!   `strikes_to_evict`, evicted;
//! - an auditor answering a wrong digest to frame an honest member: the second auditor finds the
//!   committed digest; the framer is the one counted wrong, and loses the auditor's role;
//! - an auditor that does not compute: it cannot know the digest it should answer;
//! - two colluding members, one audited and one its auditor, answering the cheater's digest:
//!   passes that audit; each audit draws its auditor at random from the other members of the
//!   profile, so a coalition holding a fraction `c` of them escapes a given audit with
//!   probability `c` (the detection bound in `docs/verification.md` counts it);
//! - two colluding auditors framing an honest member: both must be drawn for the same audit
//!   (probability about `c²`), and `strikes_to_evict` such audits before it is evicted.
//!
//! Draws use a keyed hash of (run, sync, member) under a key derived from the CA key: members
//! cannot predict them, and a restarted coordinator draws the same.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use proto::{ParamHash, RunId, WorkerId};
use runspec::Verification;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::commitments::Span;

/// An audit is answered within this many syncs of the audited one, or dropped (its auditor
/// died or left, or waits on purpose): nobody is blamed. Members keep more states than this
/// (the worker's `AUDIT_WINDOW`), so an honest auditor asked in time always holds the state: a
/// late first answer cannot leave only colluders able to recompute.
pub const AUDIT_SYNCS: u64 = 4;

/// After a strike or an inconclusive audit, the member is audited at every sync for this many
/// syncs.
pub const HOT_SYNCS: u64 = 50;

/// An audit's id.
pub type AuditId = u64;

/// Wrong answers after which a member is no longer given audits in the run.
pub const WRONG_TO_RETIRE: u64 = 2;

/// A finished audit, as stored (for the ledger).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: AuditId,
    /// The audited sync and member.
    pub step: u64,
    pub target: WorkerId,
    /// The auditors whose answers decided it.
    pub auditors: Vec<WorkerId>,
    /// A first auditor whose answer the second auditor and the audited member contradicted.
    pub wrong: Option<WorkerId>,
    /// "passed", "struck", "inconclusive", "withheld" or "dropped".
    pub verdict: String,
}

impl AuditRecord {
    /// The record of an audit dropped with no verdict (nobody credited or blamed).
    pub fn dropped(info: &AuditInfo) -> Self {
        Self {
            id: info.id,
            step: info.step,
            target: info.target,
            auditors: Vec::new(),
            wrong: None,
            verdict: "dropped".into(),
        }
    }
}

impl Decision {
    /// The stored record of a final decision (`None` for `Ask`).
    pub fn record(&self, id: AuditId, step: u64) -> Option<AuditRecord> {
        let (target, auditors, wrong, verdict) = match self {
            Self::Ask { .. } => return None,
            Self::Passed { target, auditors, wrong } => (target, auditors, *wrong, "passed"),
            Self::Struck { target, auditors } => (target, auditors, None, "struck"),
            Self::Inconclusive { target, auditors } => (target, auditors, None, "inconclusive"),
            Self::Withheld { target } => (target, &Vec::new(), None, "withheld"),
            Self::Dropped { target } => (target, &Vec::new(), None, "dropped"),
        };
        Some(AuditRecord {
            id,
            step,
            target: *target,
            auditors: auditors.clone(),
            wrong,
            verdict: verdict.into(),
        })
    }
}

/// What an auditor is asked to recompute.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditInfo {
    pub run: RunId,
    pub id: AuditId,
    /// The audited sync.
    pub step: u64,
    pub start_hash: ParamHash,
    pub spans: Vec<Span>,
    /// The audited member and its rank in the sync (its dropout seed).
    pub target: WorkerId,
    pub rank: usize,
    /// diloco: the audited member's inner optimizer state at the round's start (its digest)
    /// and its length in bytes.
    pub inner: Option<[u8; 32]>,
    pub inner_bytes: u64,
}

/// An auditor's answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Digest([u8; 32]),
    /// It could not recompute (it says why).
    Unable(String),
}

/// What an answer decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Not decided yet: ask `auditor` (if any is eligible; else the audit is dropped).
    Ask {
        exclude: Vec<WorkerId>,
    },
    Passed {
        target: WorkerId,
        auditors: Vec<WorkerId>,
        wrong: Option<WorkerId>,
    },
    Struck {
        target: WorkerId,
        auditors: Vec<WorkerId>,
    },
    Inconclusive {
        target: WorkerId,
        auditors: Vec<WorkerId>,
    },
    /// diloco: the audited member did not send the inner state it committed to: nobody is
    /// struck, and it is audited at every sync for a while.
    Withheld {
        target: WorkerId,
    },
    /// An auditor could not recompute it, or answered too late: nobody is credited or blamed.
    Dropped {
        target: WorkerId,
    },
}

/// What an auditor fetches for a diloco audit: the audited member's inner state (SHA-256
/// `digest`, `bytes` long) at the start of its round to sync `step`, and which opening of the
/// audit asked.
#[derive(Clone, Debug, PartialEq)]
pub struct StateFetch {
    pub target: WorkerId,
    pub step: u64,
    pub digest: [u8; 32],
    pub bytes: u64,
    pub nonce: u64,
}

/// A member's audit record in one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Standing {
    /// Contributions accepted (probation counts these).
    pub contributions: u64,
    pub passed: u64,
    pub strikes: u64,
    /// Audits it performed that the verdict agreed with, and that it got wrong.
    pub performed: u64,
    pub wrong: u64,
    /// Audited at every sync up to this one.
    pub hot_until: u64,
    /// The audit it was last given, whether it already spent a sync on it, and the sync at
    /// which it was given.
    pub assigned: Option<(AuditId, bool, u64)>,
    /// diloco: audits of its rounds whose inner state it did not send, and the sync up to which
    /// its contributions are left out for it.
    pub withheld: u64,
    pub left_out_until: u64,
}

#[derive(Clone, Debug)]
struct Open {
    info: AuditInfo,
    committed: [u8; 32],
    /// Auditors asked, in order, with their answers.
    asked: Vec<(WorkerId, Option<[u8; 32]>)>,
    /// The members of the audited sync that share its profile (the audited one aside): the
    /// only ones who hold its state and can recompute it bit for bit.
    members: Vec<WorkerId>,
    /// The sync at which it was opened.
    opened: u64,
    /// diloco: the auditors that were sent the audited member's inner state (once each).
    fetched: Vec<WorkerId>,
    /// Which opening of the audit this is (a retried sync reopens an audit under the same id:
    /// what a relay of the earlier opening reports must not close the new one).
    nonce: u64,
}

/// The audits of every run.
#[derive(Debug, Default)]
pub struct Book {
    key: [u8; 32],
    open: BTreeMap<AuditId, Open>,
    standing: BTreeMap<(RunId, WorkerId), Standing>,
    openings: u64,
}

impl Book {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key, ..Default::default() }
    }

    pub fn standing(&self, run: RunId, w: WorkerId) -> Option<&Standing> {
        self.standing.get(&(run, w))
    }

    fn standing_mut(&mut self, run: RunId, w: WorkerId) -> &mut Standing {
        self.standing.entry((run, w)).or_default()
    }

    /// A number only the coordinator can compute, for (run, sync, member, purpose).
    fn keyed(&self, purpose: &[u8], run: RunId, step: u64, w: WorkerId) -> u64 {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"longhaul audit draw v1\0");
        mac.update(purpose);
        for v in [run.0, step, w.0] {
            mac.update(&v.to_le_bytes());
        }
        let out = mac.finalize().into_bytes();
        u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
    }

    /// A uniform number in [0, 1) that only the coordinator can compute.
    fn uniform(&self, purpose: &[u8], run: RunId, step: u64, w: WorkerId) -> f64 {
        (self.keyed(purpose, run, step, w) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The id of the audit of `w`'s contribution to sync `step`: the same question always has
    /// the same id (also after a restart), so an answer that arrives late answers the question
    /// it was asked.
    pub fn id_of(&self, run: RunId, step: u64, w: WorkerId) -> AuditId {
        self.keyed(b"id", run, step, w) | 1
    }

    /// The chance that `w`'s contribution to sync `step` is audited.
    pub fn chance(&self, policy: &Verification, run: RunId, w: WorkerId, step: u64) -> f64 {
        let s = self.standing.get(&(run, w));
        if s.is_some_and(|s| step <= s.hot_until) {
            return 1.0;
        }
        let contributions = s.map_or(0, |s| s.contributions);
        if contributions < u64::from(policy.probation_syncs) {
            policy.probation_probability.max(policy.audit_probability)
        } else {
            policy.audit_probability
        }
    }

    /// Raises `w`'s audit chance to 1 up to sync `until` (a strike, a wrong or inconclusive
    /// answer, an anomaly); true if it was not already that high.
    pub fn flag(&mut self, run: RunId, w: WorkerId, until: u64) -> bool {
        let s = self.standing_mut(run, w);
        let newly = s.hot_until < until;
        s.hot_until = s.hot_until.max(until);
        newly
    }

    /// Counts an accepted contribution and draws whether it is audited.
    pub fn draw(&mut self, policy: &Verification, run: RunId, w: WorkerId, step: u64) -> bool {
        let p = self.chance(policy, run, w, step);
        self.standing_mut(run, w).contributions += 1;
        self.uniform(b"draw", run, step, w) < p
    }

    /// Picks an auditor among `candidates` (in a fixed order) at random.
    pub fn pick(
        &self,
        run: RunId,
        step: u64,
        target: WorkerId,
        round: usize,
        candidates: &[WorkerId],
    ) -> Option<WorkerId> {
        if candidates.is_empty() {
            return None;
        }
        let u = self.uniform(format!("pick{round}").as_bytes(), run, step, target);
        let i = ((u * candidates.len() as f64) as usize).min(candidates.len() - 1);
        Some(candidates[i])
    }

    /// Whether `w` has an audit in hand at sync `now`: given within the last [`AUDIT_SYNCS`]
    /// syncs, and no sync spent on it yet (an audit lost with a session or a restart frees it
    /// again after that).
    pub fn in_hand(&self, run: RunId, w: WorkerId, now: u64) -> bool {
        self.standing.get(&(run, w)).is_some_and(|s| {
            s.assigned.is_some_and(|(_, used, at)| !used && at + AUDIT_SYNCS >= now)
        })
    }

    /// Whether `w` answered wrong [`WRONG_TO_RETIRE`] times in the run: it is given no audits.
    pub fn retired(&self, run: RunId, w: WorkerId) -> bool {
        self.standing.get(&(run, w)).is_some_and(|s| s.wrong >= WRONG_TO_RETIRE)
    }

    /// Whether `w` may be given an audit at sync `now`.
    pub fn available(&self, run: RunId, w: WorkerId, now: u64) -> bool {
        !self.in_hand(run, w, now) && !self.retired(run, w)
    }

    /// Opens an audit of `info` (a contribution committed with digest `committed`), asking
    /// `auditor`, at sync `now_step`. `members`: the sync's members of the audited member's
    /// profile, other than it (who may be asked).
    pub fn open(
        &mut self,
        mut info: AuditInfo,
        committed: [u8; 32],
        auditor: WorkerId,
        members: Vec<WorkerId>,
        now_step: u64,
    ) -> AuditInfo {
        info.id = self.id_of(info.run, info.step, info.target);
        self.standing_mut(info.run, auditor).assigned = Some((info.id, false, now_step));
        self.openings += 1;
        self.open.insert(
            info.id,
            Open {
                info: info.clone(),
                committed,
                asked: vec![(auditor, None)],
                members,
                opened: now_step,
                fetched: Vec::new(),
                nonce: self.openings,
            },
        );
        info
    }

    /// Who may be asked next for audit `id`: members of the audited sync with its profile, not
    /// asked before, available at sync `now`.
    pub fn candidates(&self, id: AuditId, now: u64) -> Vec<WorkerId> {
        let Some(o) = self.open.get(&id) else { return Vec::new() };
        let asked = exclude(o);
        o.members
            .iter()
            .filter(|w| !asked.contains(w) && self.available(o.info.run, **w, now))
            .copied()
            .collect()
    }

    /// What the open audit `id` asks.
    pub fn get(&self, id: AuditId) -> Option<&AuditInfo> {
        self.open.get(&id).map(|o| &o.info)
    }

    /// Asks one more auditor for audit `id` at sync `now`.
    pub fn ask(&mut self, id: AuditId, auditor: WorkerId, now: u64) -> Option<AuditInfo> {
        let o = self.open.get_mut(&id)?;
        o.asked.push((auditor, None));
        let info = o.info.clone();
        self.standing_mut(info.run, auditor).assigned = Some((id, false, now));
        Some(info)
    }

    /// diloco: `auditor` asks for the audited member's inner state of audit `id`: what to
    /// fetch if the audit is open, names one, and `auditor` was asked, has not answered and has
    /// not had it before (a member is asked for its state once per auditor).
    pub fn fetch_state(&mut self, id: AuditId, auditor: WorkerId) -> Result<StateFetch, String> {
        let o = self.open.get_mut(&id).ok_or("no such audit is open")?;
        let inner = o.info.inner.ok_or("the audit names no inner state (not a diloco round)")?;
        if !o.asked.iter().any(|(a, d)| *a == auditor && d.is_none()) {
            return Err("the audit is not this worker's to answer".into());
        }
        if o.fetched.contains(&auditor) {
            return Err("this auditor was sent the inner state already".into());
        }
        o.fetched.push(auditor);
        Ok(StateFetch {
            target: o.info.target,
            step: o.info.step,
            digest: inner,
            bytes: o.info.inner_bytes,
            nonce: o.nonce,
        })
    }

    /// diloco: the audited member of `id` (opening `nonce`) did not send the inner state it
    /// committed to (`mismatch`: it sent other bytes, a strike; otherwise it sent nothing in
    /// time). Closes the audit, at sync `now_step`.
    pub fn withheld(
        &mut self,
        id: AuditId,
        nonce: u64,
        mismatch: bool,
        now_step: u64,
    ) -> Option<Decision> {
        if self.open.get(&id)?.nonce != nonce {
            return None;
        }
        let o = self.open.remove(&id)?;
        let target = o.info.target;
        let d = if mismatch {
            Decision::Struck { target, auditors: Vec::new() }
        } else {
            Decision::Withheld { target }
        };
        self.settle(o.info.run, &d, now_step);
        Some(d)
    }

    /// Whether `w`'s contributions to `run` are left out at sync `now` (it withheld the inner
    /// state an audit asked for).
    pub fn left_out(&self, run: RunId, w: WorkerId, now: u64) -> Option<u64> {
        self.standing.get(&(run, w)).map(|s| s.left_out_until).filter(|u| now <= *u)
    }

    /// Drops audit `id` (no eligible auditor left): nobody is credited or blamed.
    pub fn drop_audit(&mut self, id: AuditId) -> Option<AuditInfo> {
        self.open.remove(&id).map(|o| o.info)
    }

    /// A member says it spent a sync auditing `id`: true if that audit was the last given to it
    /// (again for a sync that was abandoned and is committed to anew: it earns nothing either
    /// way).
    pub fn spend(&mut self, run: RunId, w: WorkerId, id: AuditId) -> bool {
        match self.standing.get_mut(&(run, w)) {
            Some(Standing { assigned: Some((a, used, _)), .. }) if *a == id => {
                *used = true;
                true
            }
            _ => false,
        }
    }

    /// Audits of `run` opened before sync `step - AUDIT_SYNCS`: dropped.
    pub fn expire(&mut self, run: RunId, step: u64) -> Vec<AuditInfo> {
        let old: Vec<AuditId> = self
            .open
            .iter()
            .filter(|(_, o)| o.info.run == run && o.opened + AUDIT_SYNCS < step)
            .map(|(id, _)| *id)
            .collect();
        old.into_iter().filter_map(|id| self.drop_audit(id)).collect()
    }

    /// Forgets a finished run.
    pub fn forget(&mut self, run: RunId) {
        self.open.retain(|_, o| o.info.run != run);
        self.standing.retain(|(r, _), _| *r != run);
    }

    /// `auditor`'s answer to audit `id` (ignored unless it was asked and has not answered), at
    /// sync `now_step`. Returns what it decided; a final decision closes the audit and updates
    /// the standings.
    pub fn answer(
        &mut self,
        id: AuditId,
        auditor: WorkerId,
        answer: Answer,
        now_step: u64,
    ) -> Option<Decision> {
        let o = self.open.get_mut(&id)?;
        let i = o.asked.iter().position(|(a, d)| *a == auditor && d.is_none())?;
        let late = now_step > o.opened + AUDIT_SYNCS;
        let decision = match answer {
            _ if late => Decision::Dropped { target: o.info.target },
            Answer::Unable(_) => Decision::Dropped { target: o.info.target },
            Answer::Digest(d) => {
                o.asked[i].1 = Some(d);
                judge(o)
            }
        };
        if !matches!(decision, Decision::Ask { .. }) {
            let o = self.open.remove(&id).expect("looked up above");
            self.settle(o.info.run, &decision, now_step);
        }
        Some(decision)
    }

    /// Rebuilds the standings of `run` after a restart from what was stored: `contributions`,
    /// each member's accepted commitments in order, and `records`, its finished audits. A
    /// restart forgives nothing: a first strike still counts towards eviction, a wrong
    /// auditor stays retired, probation resumes where it was, and a member audited at every
    /// sync still is (from the audited sync plus [`AUDIT_SYNCS`], the latest its verdict can
    /// have come). Audits open at the restart are lost: nobody is blamed, their auditors are
    /// free again after [`AUDIT_SYNCS`] syncs.
    pub fn replay(
        &mut self,
        run: RunId,
        contributions: impl IntoIterator<Item = WorkerId>,
        records: &[AuditRecord],
        clock: impl Fn(u64) -> u64,
    ) {
        for w in contributions {
            self.standing_mut(run, w).contributions += 1;
        }
        for r in records {
            let target = r.target;
            let auditors = r.auditors.clone();
            let d = match r.verdict.as_str() {
                "passed" => Decision::Passed { target, auditors, wrong: r.wrong },
                "struck" => Decision::Struck { target, auditors },
                "inconclusive" => Decision::Inconclusive { target, auditors },
                "withheld" => Decision::Withheld { target },
                _ => continue,
            };
            self.settle(run, &d, clock(r.step) + AUDIT_SYNCS);
        }
    }

    fn settle(&mut self, run: RunId, d: &Decision, now_step: u64) {
        match d {
            Decision::Ask { .. } => {}
            Decision::Passed { target, auditors, wrong } => {
                self.standing_mut(run, *target).passed += 1;
                for a in auditors {
                    self.standing_mut(run, *a).performed += 1;
                }
                if let Some(w) = wrong {
                    self.standing_mut(run, *w).wrong += 1;
                    self.flag(run, *w, now_step + HOT_SYNCS);
                }
            }
            Decision::Struck { target, auditors } => {
                self.standing_mut(run, *target).strikes += 1;
                self.flag(run, *target, now_step + HOT_SYNCS);
                for a in auditors {
                    self.standing_mut(run, *a).performed += 1;
                }
            }
            Decision::Inconclusive { target, .. } => {
                self.flag(run, *target, now_step + HOT_SYNCS);
            }
            Decision::Withheld { target } => {
                let s = self.standing_mut(run, *target);
                s.withheld += 1;
                let out = (1u64 << s.withheld.saturating_sub(1).min(16)).min(HOT_SYNCS);
                s.left_out_until = s.left_out_until.max(now_step + out);
                let until = s.left_out_until;
                self.flag(run, *target, until + HOT_SYNCS);
            }
            Decision::Dropped { .. } => {}
        }
    }
}

/// Who may not audit `o` any more: its target and everyone asked already.
fn exclude(o: &Open) -> Vec<WorkerId> {
    let mut v = vec![o.info.target];
    v.extend(o.asked.iter().map(|(a, _)| *a));
    v
}

/// The verdict of the answers so far (see the module documentation).
fn judge(o: &Open) -> Decision {
    let answered: Vec<(WorkerId, [u8; 32])> =
        o.asked.iter().filter_map(|(a, d)| d.map(|d| (*a, d))).collect();
    let target = o.info.target;
    match answered.as_slice() {
        [] => Decision::Ask { exclude: exclude(o) },
        [(a, d)] if *d == o.committed => {
            Decision::Passed { target, auditors: vec![*a], wrong: None }
        }
        [_] => Decision::Ask { exclude: exclude(o) },
        [(a, da), (b, db), ..] => {
            if *db == o.committed {
                Decision::Passed { target, auditors: vec![*b], wrong: Some(*a) }
            } else if db == da {
                Decision::Struck { target, auditors: vec![*a, *b] }
            } else {
                Decision::Inconclusive { target, auditors: vec![*a, *b] }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: RunId = RunId(1);
    const T: WorkerId = WorkerId(1);
    const A: WorkerId = WorkerId(2);
    const B: WorkerId = WorkerId(3);

    fn policy() -> Verification {
        Verification {
            audit_probability: 0.05,
            probation_probability: 0.5,
            probation_syncs: 20,
            strikes_to_evict: 2,
            ..Verification::OFF
        }
    }

    fn info() -> AuditInfo {
        AuditInfo {
            run: RUN,
            id: 0,
            step: 7,
            start_hash: ParamHash(9),
            spans: Vec::new(),
            target: T,
            rank: 0,
            inner: None,
            inner_bytes: 0,
        }
    }

    fn opened(book: &mut Book, committed: u8) -> AuditId {
        book.open(info(), [committed; 32], A, vec![A, B], 7).id
    }

    #[test]
    fn a_first_auditor_that_finds_the_committed_digest_passes_the_member() {
        let mut book = Book::new([0; 32]);
        let id = opened(&mut book, 1);
        assert!(book.in_hand(RUN, A, 7) && !book.in_hand(RUN, B, 7));
        assert!(!book.in_hand(RUN, A, 8 + AUDIT_SYNCS), "an audit lost on the way frees it");
        assert_eq!(book.answer(id, B, Answer::Digest([1; 32]), 8), None, "B was not asked");
        let d = book.answer(id, A, Answer::Digest([1; 32]), 8);
        assert_eq!(d, Some(Decision::Passed { target: T, auditors: vec![A], wrong: None }));
        assert_eq!(book.standing(RUN, T).unwrap().passed, 1);
        assert_eq!(book.standing(RUN, A).unwrap().performed, 1);
        assert_eq!(book.answer(id, A, Answer::Digest([1; 32]), 8), None, "closed");
    }

    /// diloco: only the auditor asked gets the member's inner state, once; a member that sends
    /// other bytes than it committed to is struck on the coordinator's own evidence, one that
    /// sends nothing is audited at every sync for a while and struck by nobody.
    #[test]
    fn an_inner_state_goes_to_its_auditor_once_and_a_withheld_one_strikes_nobody() {
        let mut book = Book::new([0; 32]);
        let ddp = opened(&mut book, 1);
        assert!(book.fetch_state(ddp, A).unwrap_err().contains("no inner state"));
        let mut i = info();
        i.step = 8;
        i.inner = Some([5; 32]);
        let id = book.open(i.clone(), [1; 32], A, vec![A, B], 8).id;
        assert!(book.fetch_state(id, B).unwrap_err().contains("not this worker's"));
        assert!(book.fetch_state(id, T).unwrap_err().contains("not this worker's"));
        let f = book.fetch_state(id, A).unwrap();
        assert_eq!((f.target, f.step, f.digest), (T, 8, [5; 32]));
        assert!(book.fetch_state(id, A).unwrap_err().contains("already"));
        assert!(book.fetch_state(0, A).is_err());
        // A relay of an earlier opening of the same audit closes nothing.
        assert_eq!(book.withheld(id, f.nonce + 1, false, 9), None);
        // Withheld: nobody struck; left out for a sync (then 2, 4, ...), then audited at every
        // sync for a while.
        let d = book.withheld(id, f.nonce, false, 9).unwrap();
        assert_eq!(d, Decision::Withheld { target: T });
        assert_eq!(d.record(id, 8).unwrap().verdict, "withheld");
        assert_eq!(book.standing(RUN, T).unwrap().strikes, 0);
        assert_eq!(book.left_out(RUN, T, 10), Some(10));
        assert_eq!(book.left_out(RUN, T, 11), None);
        assert_eq!(book.chance(&policy(), RUN, T, 10 + HOT_SYNCS), 1.0);
        assert_eq!(book.withheld(id, f.nonce, false, 9), None, "closed");
        // Other bytes than committed: a strike, with no auditor's word needed.
        i.step = 10;
        let id = book.open(i.clone(), [1; 32], B, vec![A, B], 10).id;
        let nonce = book.fetch_state(id, B).unwrap().nonce;
        let d = book.withheld(id, nonce, true, 11).unwrap();
        assert_eq!(d, Decision::Struck { target: T, auditors: vec![] });
        assert_eq!(book.standing(RUN, T).unwrap().strikes, 1);
        // A second withheld audit: left out for two syncs.
        i.step = 12;
        let id = book.open(i, [1; 32], A, vec![A, B], 12).id;
        let nonce = book.fetch_state(id, A).unwrap().nonce;
        book.withheld(id, nonce, false, 13).unwrap();
        assert_eq!(book.left_out(RUN, T, 15), Some(15));
        assert_eq!(book.left_out(RUN, T, 16), None);
        // A restart remembers both.
        let mut again = Book::new([0; 32]);
        let records = [
            Decision::Withheld { target: T }.record(1, 8).unwrap(),
            Decision::Struck { target: T, auditors: vec![] }.record(2, 10).unwrap(),
        ];
        again.replay(RUN, [], &records, |s| s);
        assert_eq!(again.standing(RUN, T).unwrap().strikes, 1);
        assert_eq!(again.chance(&policy(), RUN, T, 10 + AUDIT_SYNCS + HOT_SYNCS), 1.0);
    }

    #[test]
    fn one_auditor_alone_never_strikes_a_member() {
        let mut book = Book::new([0; 32]);
        let id = opened(&mut book, 1);
        let d = book.answer(id, A, Answer::Digest([2; 32]), 8).unwrap();
        assert_eq!(d, Decision::Ask { exclude: vec![T, A] });
        assert_eq!(book.standing(RUN, T).map_or(0, |s| s.strikes), 0);
        // The second auditor finds the committed digest: the first was wrong (a framer).
        assert_eq!(book.candidates(id, 8), vec![B]);
        book.ask(id, B, 8).unwrap();
        let d = book.answer(id, B, Answer::Digest([1; 32]), 9).unwrap();
        assert_eq!(d, Decision::Passed { target: T, auditors: vec![B], wrong: Some(A) });
        let (t, a) = (book.standing(RUN, T).unwrap(), book.standing(RUN, A).unwrap());
        assert_eq!((t.passed, t.strikes), (1, 0));
        // Not struck: the audited member is an interested party, so this rests on B alone.
        assert_eq!((a.wrong, a.strikes, a.performed), (1, 0, 0));
        assert_eq!(book.chance(&policy(), RUN, A, 10), 1.0, "a wrong auditor is watched");
        assert!(book.spend(RUN, A, id));
        assert!(book.available(RUN, A, 10), "one wrong answer keeps the role");
        let id = book.open(AuditInfo { step: 8, ..info() }, [1; 32], A, vec![A, B], 8).id;
        book.answer(id, A, Answer::Digest([2; 32]), 9).unwrap();
        book.ask(id, B, 9).unwrap();
        book.answer(id, B, Answer::Digest([1; 32]), 10).unwrap();
        assert!(book.spend(RUN, A, id));
        assert!(book.retired(RUN, A) && !book.available(RUN, A, 11), "a second one retires it");
    }

    #[test]
    fn two_auditors_that_agree_against_the_commitment_strike_it() {
        let mut book = Book::new([0; 32]);
        let id = opened(&mut book, 1);
        book.answer(id, A, Answer::Digest([2; 32]), 8).unwrap();
        book.ask(id, B, 8).unwrap();
        let d = book.answer(id, B, Answer::Digest([2; 32]), 9).unwrap();
        assert_eq!(d, Decision::Struck { target: T, auditors: vec![A, B] });
        assert_eq!(book.standing(RUN, T).unwrap().strikes, 1);
        assert_eq!(book.chance(&policy(), RUN, T, 9 + HOT_SYNCS), 1.0);
        assert!(book.chance(&policy(), RUN, T, 10 + HOT_SYNCS) < 1.0);
    }

    /// A restart rebuilds the standings from the stored records: what the live book decided,
    /// the replayed one knows (a first strike, a wrong auditor, probation, the hot window).
    #[test]
    fn standings_replayed_from_the_records_are_the_live_ones() {
        let mut live = Book::new([0; 32]);
        let mut records = Vec::new();
        let mut contributions = Vec::new();
        for step in 0..5 {
            live.draw(&policy(), RUN, T, step);
            contributions.push(T);
        }
        // A strike for T (A and B agree), then a framing answer by A (B finds the digest).
        let mut decide = |live: &mut Book, step: u64, first: u8, second: u8| {
            let id = live.open(AuditInfo { step, ..info() }, [1; 32], A, vec![A, B], step).id;
            live.answer(id, A, Answer::Digest([first; 32]), step + 1).unwrap();
            live.ask(id, B, step + 1).unwrap();
            let d = live.answer(id, B, Answer::Digest([second; 32]), step + 2).unwrap();
            records.push(d.record(id, step).unwrap());
        };
        decide(&mut live, 3, 2, 2);
        decide(&mut live, 4, 2, 1);
        records.push(AuditRecord::dropped(&AuditInfo { step: 4, ..info() }));
        let mut replayed = Book::new([0; 32]);
        replayed.replay(RUN, contributions, &records, |s| s);
        for w in [T, A, B] {
            let (l, r) = (live.standing(RUN, w).unwrap(), replayed.standing(RUN, w).unwrap());
            assert_eq!(
                (l.contributions, l.passed, l.strikes, l.performed, l.wrong),
                (r.contributions, r.passed, r.strikes, r.performed, r.wrong),
                "{w}"
            );
            // Never shorter than the live window: a restart does not cool a member down.
            assert!(r.hot_until >= l.hot_until, "{w}: {} < {}", r.hot_until, l.hot_until);
        }
        assert_eq!(replayed.standing(RUN, T).unwrap().strikes, 1);
        assert_eq!(replayed.chance(&policy(), RUN, T, 6 + HOT_SYNCS), 1.0);
        assert_eq!(replayed.standing(RUN, A).unwrap().wrong, 1);
    }

    #[test]
    fn three_different_digests_blame_nobody() {
        let mut book = Book::new([0; 32]);
        let id = opened(&mut book, 1);
        book.answer(id, A, Answer::Digest([2; 32]), 8).unwrap();
        book.ask(id, B, 8).unwrap();
        let d = book.answer(id, B, Answer::Digest([3; 32]), 9).unwrap();
        assert_eq!(d, Decision::Inconclusive { target: T, auditors: vec![A, B] });
        for w in [T, A, B] {
            assert_eq!(book.standing(RUN, w).map_or(0, |s| s.strikes), 0, "{w}");
        }
    }

    #[test]
    fn an_audit_that_cannot_be_recomputed_or_is_answered_late_is_dropped_blaming_nobody() {
        let mut book = Book::new([0; 32]);
        let id = opened(&mut book, 1);
        let d = book.answer(id, A, Answer::Unable("no such state".into()), 8).unwrap();
        assert_eq!(d, Decision::Dropped { target: T });
        assert_eq!(book.standing(RUN, A).map_or(0, |s| s.wrong + s.strikes), 0);
        assert!(book.get(id).is_none());
        // A first answer held back until honest members no longer hold the state: dropped,
        // so a colluder cannot wait until only colluders are left to ask.
        let id = opened(&mut book, 1);
        let d = book.answer(id, A, Answer::Digest([2; 32]), 8 + AUDIT_SYNCS).unwrap();
        assert_eq!(d, Decision::Dropped { target: T });
        assert_eq!(book.standing(RUN, T).map_or(0, |s| s.strikes), 0);
        let id = opened(&mut book, 1);
        assert!(book.expire(RUN, 7 + AUDIT_SYNCS).is_empty());
        assert_eq!(book.expire(RUN, 8 + AUDIT_SYNCS).len(), 1);
        assert!(book.get(id).is_none());
    }

    #[test]
    fn a_sync_is_spent_on_an_audit_only_by_its_auditor() {
        let mut book = Book::new([0; 32]);
        let id = opened(&mut book, 1);
        assert!(!book.spend(RUN, B, id));
        assert!(!book.spend(RUN, A, id + 1));
        assert!(book.spend(RUN, A, id));
        assert!(!book.in_hand(RUN, A, 7));
        assert!(book.spend(RUN, A, id), "again, for an abandoned sync committed to anew");
    }

    #[test]
    fn draws_follow_the_policy_and_only_the_key_predicts_them() {
        let p = policy();
        let count = |key: u8, from: u64, to: u64| {
            let mut book = Book::new([key; 32]);
            // Past probation.
            book.standing_mut(RUN, T).contributions = u64::from(p.probation_syncs);
            (from..to).filter(|s| book.draw(&p, RUN, T, *s)).count()
        };
        let n = count(0, 0, 20_000);
        assert!((800..1200).contains(&n), "{n} of 20000 at 5 %");
        assert_ne!(count(0, 0, 2_000), count(1, 0, 2_000), "another key, other draws");
        let mut book = Book::new([0; 32]);
        let probation = (0..20).filter(|s| book.draw(&p, RUN, A, *s)).count();
        assert!((4..=16).contains(&probation), "{probation} of 20 at 50 %");
        assert_eq!(book.chance(&p, RUN, A, 20), 0.05, "probation over");
    }
}
