//! Disputes the coordinator cannot settle on evidence.
//!
//! A member that says its predecessor sent more than it declared, or sent a state that failed
//! its checks, or that it cannot form a ring with it, may be telling the truth or lying; the
//! coordinator saw neither the frames nor the link. What it does know: in every such dispute
//! at least one side is lying or faulty (an honest member accuses only on evidence it measured,
//! and only its predecessor). So the two are never in one ring again, and of every set of
//! disputing members the coordinator keeps out the fewest that account for every dispute
//! (a vertex cover of the dispute graph, greedily: the member in the most disputes among the
//! candidates first; then the one in the most disputes in the run; then the one with fewer
//! recorded syncs to its credit; then the later joiner).
//!
//! What a liar gains: with k identities it keeps at most about k honest members out of the
//! ring, and only by keeping quiet afterwards; each further accusation it makes puts itself in
//! more disputes than anyone, and out. The ring never stalls on a dispute, and nobody is
//! banned on one (a ban needs the member's own contradicting words: see `progress`).
//! Before this, both sides sat out for a while: a colluding pair accusing the same two honest
//! members whenever they returned held a three-honest-member run below its minimum most of
//! the time (the adversary suite measured 368 s for a 12 s run).

use std::collections::{BTreeMap, BTreeSet};

use proto::{RunId, WorkerId};

use super::{Cluster, Dirty, Millis};

/// The members of `candidates` to keep out so that no two disputing members remain.
/// `disputed(a, b)` is symmetric; `rank(w)` orders the tie-breaks (the greater sits out first).
pub(super) fn cover<R: Ord>(
    candidates: &BTreeSet<WorkerId>,
    disputed: impl Fn(WorkerId, WorkerId) -> bool,
    rank: impl Fn(WorkerId) -> R,
) -> BTreeSet<WorkerId> {
    let mut edges: Vec<(WorkerId, WorkerId)> = Vec::new();
    for &a in candidates {
        for &b in candidates.range(a..).skip(1) {
            if disputed(a, b) {
                edges.push((a, b));
            }
        }
    }
    let mut out = BTreeSet::new();
    while !edges.is_empty() {
        let mut degree: BTreeMap<WorkerId, usize> = BTreeMap::new();
        for &(a, b) in &edges {
            *degree.entry(a).or_default() += 1;
            *degree.entry(b).or_default() += 1;
        }
        let Some((&v, _)) = degree.iter().max_by(|(a, da), (b, db)| {
            da.cmp(db).then_with(|| rank(**a).cmp(&rank(**b))).then_with(|| a.cmp(b))
        }) else {
            break;
        };
        out.insert(v);
        edges.retain(|&(a, b)| a != v && b != v);
    }
    out
}

impl Cluster {
    /// `a` and `b` disputed in `run`: they are never in one ring of it again.
    pub(super) fn record_dispute(&mut self, run: RunId, a: WorkerId, b: WorkerId) {
        self.disputes.entry((run, a)).or_default().insert(b);
        self.disputes.entry((run, b)).or_default().insert(a);
    }

    /// Whether `a` and `b` disputed in `run`.
    pub(super) fn disputed(&self, run: RunId, a: WorkerId, b: WorkerId) -> bool {
        self.disputes.get(&(run, a)).is_some_and(|s| s.contains(&b))
    }

    /// The workers kept out of `run`'s ring by its disputes.
    pub fn sitting_out(&self, run: RunId) -> impl Iterator<Item = WorkerId> + '_ {
        self.sit_out.get(&run).into_iter().flatten().copied()
    }

    /// Re-decides who of `run`'s disputing members sits out: the members assigned to it and
    /// those sitting out of it that are free to come back. A member of the new cover leaves the
    /// run (its leases go back); one no longer in it is assigned again if the run has room.
    pub(super) fn settle_disputes(&mut self, now: Millis, run: RunId) {
        let Some(r) = self.runs.get(&run) else { return };
        if r.state.is_terminal() {
            self.sit_out.remove(&run);
            return;
        }
        let max = r.max_workers as usize;
        let assigned: BTreeSet<WorkerId> =
            self.workers.values().filter(|w| w.run == Some(run)).map(|w| w.id).collect();
        let waiting: BTreeSet<WorkerId> = self
            .sitting_out(run)
            .filter(|id| {
                self.workers.get(id).is_some_and(|w| w.run.is_none() && !self.banned_from(*id, r))
                    && self.admissible(now, *id)
            })
            .collect();
        let candidates: BTreeSet<WorkerId> = assigned.union(&waiting).copied().collect();
        let out = cover(
            &candidates,
            |a, b| self.disputed(run, a, b),
            |w| {
                let in_run = self.disputes.get(&(run, w)).map_or(0, BTreeSet::len);
                let credit = self.workers.get(&w).map_or(0, |r| r.ledger.syncs);
                (in_run, std::cmp::Reverse(credit))
            },
        );
        let before: BTreeSet<WorkerId> = self.sitting_out(run).collect();
        for &w in assigned.intersection(&out) {
            self.release_and_leave(run, w);
        }
        let mut room = max.saturating_sub(assigned.difference(&out).count());
        let mut back = Vec::new();
        for &w in waiting.difference(&out) {
            if room == 0 {
                break;
            }
            room -= 1;
            if let Some(rec) = self.workers.get_mut(&w) {
                rec.run = Some(run);
            }
            self.dirty.insert(Dirty::Worker(w));
            self.changed.insert(run);
            back.push(w);
        }
        let set = self.sit_out.entry(run).or_default();
        for w in &back {
            set.remove(w);
        }
        set.extend(out.iter().copied());
        let after: BTreeSet<WorkerId> = set.clone();
        if after != before {
            let names = |s: &BTreeSet<WorkerId>| {
                if s.is_empty() {
                    "nobody".to_owned()
                } else {
                    s.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                }
            };
            self.log(
                run,
                format!(
                    "kept out of the ring for their disputes: {} (the fewest members that \
                     account for every dispute among those available)",
                    names(&after)
                ),
            );
        }
    }

    /// The runs whose disputes keep `id` out of their ring.
    pub fn sits_out_of_runs(&self, id: WorkerId) -> impl Iterator<Item = RunId> + '_ {
        self.sit_out.iter().filter(move |(_, s)| s.contains(&id)).map(|(r, _)| *r)
    }

    /// Whether `id` is kept out of `run` by its disputes (it is not assigned to it).
    pub(super) fn sits_out_of(&self, run: RunId, id: WorkerId) -> bool {
        self.sit_out.get(&run).is_some_and(|s| s.contains(&id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u64]) -> BTreeSet<WorkerId> {
        v.iter().map(|&i| WorkerId(i)).collect()
    }

    fn graph(edges: &[(u64, u64)]) -> impl Fn(WorkerId, WorkerId) -> bool + '_ {
        move |a, b| edges.iter().any(|&(x, y)| (x, y) == (a.0, b.0) || (y, x) == (a.0, b.0))
    }

    #[test]
    fn a_lone_dispute_keeps_out_one_side_by_the_tie_breaks() {
        let c = cover(&set(&[1, 2, 3]), graph(&[(1, 3)]), |_| 0);
        assert_eq!(c, set(&[3]), "the later joiner");
        let c = cover(&set(&[1, 2, 3]), graph(&[(1, 3)]), |w| u64::from(w.0 == 1));
        assert_eq!(c, set(&[1]), "the higher rank");
    }

    #[test]
    fn a_liar_that_accuses_twice_is_the_one_kept_out() {
        // 9 accused 1, then (after 1 sat out) 2: 9 alone accounts for both.
        let c = cover(&set(&[1, 2, 3, 9]), graph(&[(9, 1), (9, 2)]), |_| 0);
        assert_eq!(c, set(&[9]));
        // A colluding pair, each accusing two honest members: the pair.
        let c = cover(&set(&[1, 2, 3, 4, 8, 9]), graph(&[(8, 1), (8, 2), (9, 3), (9, 4)]), |_| 0);
        assert_eq!(c, set(&[8, 9]));
    }

    #[test]
    fn the_cover_leaves_no_dispute_and_ignores_non_candidates() {
        let edges = [(1, 2), (2, 3), (3, 4), (4, 1), (5, 6), (7, 1)];
        let cands = set(&[1, 2, 3, 4, 5, 6]);
        let c = cover(&cands, graph(&edges), |_| 0);
        let g = graph(&edges);
        for &a in &cands {
            for &b in &cands {
                assert!(c.contains(&a) || c.contains(&b) || !g(a, b), "{a} {b} left together");
            }
        }
        assert!(!c.contains(&WorkerId(7)));
        assert_eq!(c.len(), 3, "{c:?}: two for the square, one for the pair");
    }
}
