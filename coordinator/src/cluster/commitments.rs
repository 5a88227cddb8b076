//! What a member commits to before its contribution enters the ring, and what the coordinator
//! checks of it on its own evidence.
//!
//! A [`Claim`] binds a contribution to its inputs (the state it was trained from, the data read
//! for it, as lease spans) and its output (a SHA-256 digest and statistics). The coordinator
//! cannot recompute the contribution here (that is what audits are for), but it can check every
//! input against what it knows itself, and does so before the plan is issued:
//!
//! | who could lie | what it would gain | caught by |
//! |---|---|---|
//! | a member training from another state (stale, or its own fork) | a contribution that is not about the run's model | `start_hash` against the recorded state |
//! | a member claiming data it never leased | credit for samples it did not train on, or cover for training on other data | the lease grant, a MAC only the coordinator can make |
//! | a member claiming the same samples again (a replay of its data) | credit twice for one read | the spans it claimed in earlier syncs |
//! | a member claiming samples a shard does not have | credit for nothing | the shard's size, where the coordinator knows it |
//! | a member claiming more samples than a round reads | credit | the run's batch size and the round's length |
//! | a member resending its previous contribution | credit without training | the digest of its previous accepted commitment |
//! | a member sending another's contribution | credit without training | the digests of the sync's and recent syncs' accepted contributions ([`copies`]) |
//! | a member whose statistics contradict each other | a norm the plan does not clip | its norm against its segment norms |
//!
//! A claim that fails is left out of the sync with the reason (coefficient 0, named in the
//! plan and the run's log); nothing here bans, because the remedy for a bad claim is that it
//! earns nothing. Every claim is stored durably, accepted or not, before the plan goes out.

use std::collections::BTreeMap;

use proto::{Epoch, LeaseId, ParamHash, WorkerId};
use serde::{Deserialize, Serialize};

use super::aggregate::total_norm;

/// Leases remembered per worker and run (oldest forgotten first): enough for the spans of many
/// rounds; a replay of a lease forgotten here is left to audits.
const REMEMBERED_LEASES: usize = 256;

/// A member's commitment to its contribution to one sync.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// The L2 norm of the contribution on each ring segment.
    pub segment_norms: Vec<f32>,
    /// The state it trained from.
    pub start_hash: Option<ParamHash>,
    /// The data it read for it, in reading order.
    pub spans: Vec<Span>,
    pub samples: u64,
    /// SHA-256 of the contribution (little-endian f32).
    #[serde(with = "digest_hex")]
    pub digest: Option<[u8; 32]>,
    /// The contribution's L2 norm.
    pub norm: f32,
    /// What determines the bits of its computation (audits match auditors to it).
    #[serde(default)]
    pub profile: String,
    /// It spent this sync on that audit and contributes nothing.
    #[serde(default)]
    pub audit: Option<u64>,
    /// diloco: SHA-256 of its inner optimizer state at the round's start and at its end.
    #[serde(default, with = "digest_hex")]
    pub inner_start: Option<[u8; 32]>,
    #[serde(default, with = "digest_hex")]
    pub inner_end: Option<[u8; 32]>,
    /// diloco: the length of that inner state in bytes (0: none named).
    #[serde(default)]
    pub inner_bytes: u64,
}

impl Claim {
    /// Whether an auditor could recompute it: it names its start state, its digest and a
    /// reproducibility profile (the draw counts and audits only these).
    pub fn recomputable(&self) -> bool {
        self.start_hash.is_some() && self.digest.is_some() && !self.profile.is_empty()
    }

    /// A claim of segment norms alone (what members committed before commitments had inputs).
    pub fn norms(segment_norms: Vec<f32>) -> Self {
        Self {
            segment_norms,
            start_hash: None,
            spans: Vec::new(),
            samples: 0,
            digest: None,
            norm: 0.0,
            profile: String::new(),
            audit: None,
            inner_start: None,
            inner_end: None,
            inner_bytes: 0,
        }
    }

    /// What an auditor's answer must equal: the contribution's digest, and in diloco with it the
    /// inner state the round ended with (`None` without a digest).
    pub fn audited_digest(&self) -> Option<[u8; 32]> {
        let d = self.digest?;
        Some(match self.inner_end {
            None => d,
            Some(e) => round_digest(&d, &e),
        })
    }
}

/// One digest of a diloco round's two outputs: its contribution and the inner optimizer state
/// it ended with (an audit's answer names both; the audit book compares one value).
pub fn round_digest(contribution: &[u8; 32], inner_end: &[u8; 32]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"longhaul diloco round v1\0");
    h.update(contribution);
    h.update(inner_end);
    h.finalize().into()
}

/// Samples `[from, to)` of a shard, in the reading order of a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub lease: LeaseId,
    pub shard: u32,
    pub data_epoch: u64,
    pub from: u64,
    pub to: u64,
    /// Whether the lease's grant checked out: the coordinator leased this shard, in this data
    /// epoch, to this worker (the shell checks the MAC; the core decides).
    pub granted: bool,
    /// A shared lease (its reading order is the reader's own).
    #[serde(default)]
    pub shared: bool,
}

#[cfg(test)]
impl Span {
    /// Samples `[from, to)` of `shard` under lease `lease`, granted (for tests).
    pub(crate) fn granted(lease: u64, shard: u32, from: u64, to: u64) -> Self {
        Self { lease: LeaseId(lease), shard, data_epoch: 0, from, to, granted: true, shared: false }
    }
}

/// What the coordinator knows when it checks a claim to the sync at some step.
#[derive(Clone, Debug)]
pub struct Known {
    /// The recorded state the sync starts from (`None` before any was recorded), and its step.
    pub recorded: Option<ParamHash>,
    pub recorded_step: u64,
    /// The most samples a member can read for this sync (batch size times the round's steps).
    pub max_samples: u64,
}

/// A member's claim to one sync and what the coordinator decided about it: what the store keeps
/// (before the plan goes out), for audits and the ledger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommitmentRecord {
    pub step: u64,
    pub epoch: Epoch,
    pub worker: WorkerId,
    pub claim: Claim,
    pub verdict: Verdict,
}

/// Whether a claim's contribution went into the sync.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Verdict {
    /// Summed with this coefficient.
    Accepted { coefficient: f32 },
    /// Left out, and why (a refused claim, or the plan's own reasons: late, zero, outlier).
    Excluded(String),
}

/// What the coordinator remembers of one worker's accepted claims in one run.
#[derive(Clone, Debug, Default)]
pub struct ClaimBook {
    /// Per lease: how far its reading order was claimed, and for which sync.
    read: BTreeMap<LeaseId, (u64, u64)>,
    /// The digest of the last accepted non-zero contribution and its sync.
    last: Option<(u64, [u8; 32])>,
    /// The first reproducibility profile it committed under, empty for none yet (who can
    /// audit whom; a later change makes its claims unauditable).
    profile: Option<String>,
    /// diloco: the inner optimizer state its last accepted claim ended with, and that sync.
    inner_end: Option<(u64, [u8; 32])>,
    /// Its accepted claims in the run, of any kind (admission counts them).
    accepted: u64,
}

impl ClaimBook {
    /// Its accepted claims in the run.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// The first profile its accepted claims named (`None` before any was accepted).
    pub fn profile(&self) -> Option<&String> {
        self.profile.as_ref()
    }

    /// Records an accepted claim to the sync at `step`.
    pub fn accept(&mut self, step: u64, claim: &Claim) {
        self.accepted += 1;
        if self.profile.as_deref().is_none_or(str::is_empty) {
            self.profile = Some(claim.profile.clone());
        }
        for s in &claim.spans {
            let e = self.read.entry(s.lease).or_insert((0, step));
            *e = (e.0.max(s.to), step);
        }
        while self.read.len() > REMEMBERED_LEASES {
            let oldest =
                self.read.iter().min_by_key(|(l, (_, step))| (*step, **l)).map(|(l, _)| *l);
            match oldest {
                Some(l) => self.read.remove(&l),
                None => break,
            };
        }
        if let Some(d) = claim.digest
            && claim.norm > 0.0
        {
            self.last = Some((step, d));
        }
        self.inner_end = claim.inner_end.map(|e| (step, e));
    }
}

/// Accepted contributions of a run's recent syncs by digest: who committed each, to which sync.
#[derive(Clone, Debug, Default)]
pub struct RecentDigests {
    by_digest: BTreeMap<[u8; 32], (WorkerId, u64)>,
    order: std::collections::VecDeque<[u8; 32]>,
}

/// Digests remembered per run (oldest forgotten first).
const RECENT_DIGESTS: usize = 4096;

impl RecentDigests {
    /// Records `worker`'s accepted claim to the sync at `step`.
    pub fn accept(&mut self, worker: WorkerId, step: u64, claim: &Claim) {
        let Some(d) = claim.digest.filter(|_| claim.norm > 0.0) else { return };
        if self.by_digest.insert(d, (worker, step)).is_none() {
            self.order.push_back(d);
        }
        while self.order.len() > RECENT_DIGESTS {
            if let Some(old) = self.order.pop_front() {
                self.by_digest.remove(&old);
            }
        }
    }
}

/// Contributions that are someone else's, by digest: the same as another member's in this sync
/// (both are left out: contributions are revealed only after every commitment is in, so one had
/// it from the other, or they are one operator), or as another worker's accepted contribution
/// to an earlier sync (the copier). Zero contributions are not compared (the plan leaves them
/// out anyway). Two honest contributions are never equal: members read different data.
pub fn copies(
    step: u64,
    claims: &[(WorkerId, &Claim)],
    recent: &RecentDigests,
) -> BTreeMap<WorkerId, String> {
    let mut out = BTreeMap::new();
    let mut seen: BTreeMap<[u8; 32], WorkerId> = BTreeMap::new();
    for (w, c) in claims {
        let Some(d) = c.digest.filter(|_| c.norm > 0.0) else { continue };
        if let Some(other) = seen.insert(d, *w) {
            out.insert(*w, format!("its contribution is identical to {other}'s in this sync"));
            out.insert(other, format!("its contribution is identical to {w}'s in this sync"));
        }
        if let Some(&(other, at)) = recent.by_digest.get(&d)
            && other != *w
            && at < step
        {
            out.insert(*w, format!("its contribution is {other}'s to step {at} (a copy)"));
        }
    }
    out
}

/// Checks a contributing member's claim to the sync at `step`; the reason it fails, if it does.
/// `shard_samples` gives a shard's sample count where the coordinator knows it.
pub fn check(
    step: u64,
    claim: &Claim,
    known: &Known,
    book: &ClaimBook,
    shard_samples: impl Fn(u32) -> Option<u64>,
) -> Result<(), String> {
    if let Some(recorded) = known.recorded {
        match claim.start_hash {
            Some(h) if h == recorded => {}
            Some(h) => {
                return Err(format!(
                    "it trained from state {h}, not the recorded state {recorded}"
                ));
            }
            None => return Err("it did not say which state it trained from".into()),
        }
    }
    let declared = total_norm(&claim.segment_norms);
    let norm = f64::from(claim.norm);
    if !norm.is_finite()
        || norm < 0.0
        || (norm - declared).abs() > 1e-3 * declared.max(1e-30) + 1e-6
    {
        return Err(format!(
            "its norm {norm:.6e} contradicts its segment norms (together {declared:.6e})"
        ));
    }
    let mut total = 0u64;
    let mut seen: BTreeMap<LeaseId, Vec<(u64, u64)>> = BTreeMap::new();
    for s in &claim.spans {
        let what = format!("lease {} (shard {}, data epoch {})", s.lease, s.shard, s.data_epoch);
        if !s.granted {
            return Err(format!("it read {what}, which was not granted to it"));
        }
        if s.from >= s.to {
            return Err(format!(
                "it claims an empty or reversed span [{}, {}) of {what}",
                s.from, s.to
            ));
        }
        if let Some(n) = shard_samples(s.shard)
            && s.to > n
        {
            return Err(format!("it claims samples up to {} of {what}, which has {n}", s.to));
        }
        if let Some(&(upto, at)) = book.read.get(&s.lease)
            && at < step
            && s.from < upto
        {
            return Err(format!(
                "it claims samples [{}, {}) of {what} again (it claimed up to {upto} for step {at})",
                s.from, s.to
            ));
        }
        let ranges = seen.entry(s.lease).or_default();
        if ranges.iter().any(|&(a, b)| s.from < b && a < s.to) {
            return Err(format!("it claims samples of {what} twice in one commitment"));
        }
        ranges.push((s.from, s.to));
        total += s.to - s.from;
    }
    if !claim.spans.is_empty() && total != claim.samples {
        return Err(format!("it claims {} samples but its spans hold {total}", claim.samples));
    }
    if claim.samples > known.max_samples {
        return Err(format!(
            "it claims {} samples, more than a round reads ({})",
            claim.samples, known.max_samples
        ));
    }
    // diloco: a round that follows the member's own accepted round starts from the inner state
    // that round ended with (otherwise a member could start each round from a state of its
    // choosing, which no audit of the round would notice).
    if let (Some((at, end)), Some(start)) = (book.inner_end, claim.inner_start)
        && at == known.recorded_step
        && at < step
        && start != end
    {
        return Err(format!(
            "its inner optimizer state at the round's start is not the one its round to step \
             {at} ended with"
        ));
    }
    if let (Some((at, last)), Some(d)) = (book.last, claim.digest)
        && at < step
        && last == d
        && claim.norm > 0.0
    {
        return Err(format!("its contribution is the one it committed to step {at} (a replay)"));
    }
    Ok(())
}

/// A digest as 64 hex digits in records (`""` for none).
mod digest_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.map(|d| client::pki::hex(&d)).unwrap_or_default())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<[u8; 32]>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        client::pki::unhex32(&s)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("a digest is 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: ParamHash = ParamHash(0xabcd);

    fn span(lease: u64, from: u64, to: u64) -> Span {
        Span::granted(lease, 3, from, to)
    }

    fn honest() -> Claim {
        Claim {
            segment_norms: vec![3.0, 4.0],
            start_hash: Some(H),
            spans: vec![span(7, 0, 16), span(8, 0, 16)],
            samples: 32,
            digest: Some([1; 32]),
            norm: 5.0,
            ..Claim::norms(Vec::new())
        }
    }

    fn known() -> Known {
        Known { recorded: Some(H), recorded_step: 1, max_samples: 32 }
    }

    fn check_at(step: u64, c: &Claim, book: &ClaimBook) -> Result<(), String> {
        check(step, c, &known(), book, |_| Some(100))
    }

    #[test]
    fn an_honest_claim_passes_and_its_successor_too() {
        let mut book = ClaimBook::default();
        check_at(1, &honest(), &book).unwrap();
        book.accept(1, &honest());
        let next = Claim { spans: vec![span(8, 16, 48)], digest: Some([2; 32]), ..honest() };
        check_at(2, &next, &book).unwrap();
        // The same claim again for the same sync (a retry in a later epoch) passes too.
        check_at(1, &honest(), &book).unwrap();
    }

    /// diloco: a round that follows the member's own accepted round starts from the inner
    /// state that round ended with; after a gap (it sat a sync out, or was left out) the chain
    /// starts anew.
    #[test]
    fn a_diloco_round_starts_where_the_members_last_one_ended() {
        let mut book = ClaimBook::default();
        let first = Claim { inner_start: Some([7; 32]), inner_end: Some([8; 32]), ..honest() };
        book.accept(1, &first);
        let next = |start: u8| Claim {
            spans: vec![span(8, 16, 48)],
            digest: Some([2; 32]),
            inner_start: Some([start; 32]),
            inner_end: Some([9; 32]),
            ..honest()
        };
        check_at(2, &next(8), &book).unwrap();
        let why = check_at(2, &next(3), &book).unwrap_err();
        assert!(why.contains("inner optimizer state"), "{why}");
        let later = Known { recorded_step: 5, ..known() };
        check(6, &next(3), &later, &book, |_| Some(100)).unwrap();
        // A retry of the same sync is not a successor of itself.
        check_at(1, &first, &book).unwrap();
    }

    #[test]
    fn each_lie_is_named() {
        let mut book = ClaimBook::default();
        book.accept(1, &honest());
        let cases: Vec<(Claim, &str)> = vec![
            (Claim { start_hash: Some(ParamHash(1)), ..honest() }, "not the recorded state"),
            (Claim { start_hash: None, ..honest() }, "did not say which state"),
            (Claim { norm: 50.0, ..honest() }, "contradicts its segment norms"),
            (Claim { norm: f32::NAN, ..honest() }, "contradicts its segment norms"),
            (
                Claim { spans: vec![Span { granted: false, ..span(9, 0, 32) }], ..honest() },
                "not granted to it",
            ),
            (Claim { spans: vec![span(9, 5, 5), span(9, 5, 37)], ..honest() }, "empty or reversed"),
            (Claim { spans: vec![span(9, 90, 122)], ..honest() }, "which has 100"),
            (
                Claim { spans: vec![span(9, 0, 16), span(9, 8, 24)], samples: 32, ..honest() },
                "twice",
            ),
            (Claim { samples: 31, ..honest() }, "its spans hold 32"),
            (
                Claim { spans: vec![span(9, 0, 64)], samples: 64, ..honest() },
                "more than a round reads",
            ),
        ];
        for (c, why) in cases {
            let err = check_at(2, &c, &ClaimBook::default()).unwrap_err();
            assert!(err.contains(why), "{err} (wanted {why})");
        }
        // Against what it claimed before: the same data, or the same contribution, again.
        let again = Claim { digest: Some([2; 32]), ..honest() };
        assert!(check_at(2, &again, &book).unwrap_err().contains("again"));
        let replay = Claim { spans: vec![span(9, 0, 32)], ..honest() };
        assert!(check_at(2, &replay, &book).unwrap_err().contains("a replay"));
    }

    #[test]
    fn before_any_recorded_state_the_start_is_not_checked() {
        let k = Known { recorded: None, recorded_step: 0, max_samples: 32 };
        check(1, &Claim { start_hash: None, ..honest() }, &k, &ClaimBook::default(), |_| None)
            .unwrap();
    }

    #[test]
    fn copies_are_named_and_distinct_contributions_pass() {
        let (a, b, c) = (WorkerId(1), WorkerId(2), WorkerId(3));
        let with = |d: u8| Claim { digest: Some([d; 32]), ..honest() };
        let mut recent = RecentDigests::default();
        recent.accept(a, 1, &with(1));
        // c sends a's contribution to step 1; a and b send the same one in step 2.
        let (x, y, z) = (with(7), with(7), with(1));
        let found = copies(2, &[(a, &x), (b, &y), (c, &z)], &recent);
        assert!(found[&a].contains("identical to worker-2's"), "{found:?}");
        assert!(found[&b].contains("identical to worker-1's"), "{found:?}");
        assert!(found[&c].contains("worker-1's to step 1 (a copy)"), "{found:?}");
        // Distinct contributions, and a member's own earlier digest (a replay, checked
        // elsewhere), are not copies; nor are zero contributions.
        let zero = Claim { norm: 0.0, segment_norms: vec![0.0, 0.0], ..with(9) };
        let found =
            copies(2, &[(a, &with(1)), (b, &with(2)), (c, &zero), (WorkerId(4), &zero)], &recent);
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn the_book_forgets_the_oldest_leases_first() {
        let mut book = ClaimBook::default();
        for i in 0..(REMEMBERED_LEASES as u64 + 10) {
            book.accept(i + 1, &Claim { spans: vec![span(i + 1, 0, 1)], ..honest() });
        }
        assert_eq!(book.read.len(), REMEMBERED_LEASES);
        assert!(!book.read.contains_key(&LeaseId(1)));
        assert!(book.read.contains_key(&LeaseId(REMEMBERED_LEASES as u64 + 10)));
    }

    #[test]
    fn digests_round_trip_and_malformed_ones_are_refused() {
        let d = [0xa5u8; 32];
        assert_eq!(client::pki::unhex32(&client::pki::hex(&d)), Some(d));
        assert_eq!(client::pki::unhex32("ab"), None);
        assert_eq!(client::pki::unhex32(&"G".repeat(64)), None);
        assert_eq!(client::pki::unhex32(&"A".repeat(64)), None);
        let c = honest();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Claim>(&json).unwrap(), c);
    }
}
