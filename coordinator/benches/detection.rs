//! How fast audits catch a cheating worker: seeded runs of the coordinator's own audit code
//! (`cluster::audits::Book`: its keyed draws, probation, its auditor picks and its verdicts),
//! against the bound `1 - (1 - f·p)^n` the docs predict. A benchmark, not a test: it prints.
//!
//! Each run is one cheating member in a ring of 8 of one profile, under a fresh key (the seed).
//! It cheats on each sync with probability `f`; an audit of a cheated sync asks an auditor,
//! which finds another digest, then a second, which agrees: a strike. An auditor that colludes
//! with the cheater (a fraction `c` of the others) answers the cheater's digest instead.
//!
//! `cargo bench -p coordinator --bench detection`

use coordinator::cluster::audits::{Answer, AuditInfo, Book, Decision};
use proto::{ParamHash, RunId, WorkerId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use runspec::Verification;
use sha2::{Digest, Sha256};

const RUN: RunId = RunId(1);
const CHEATER: WorkerId = WorkerId(1);
const MEMBERS: u64 = 8;
const RUNS: u64 = 1000;

struct Case {
    what: &'static str,
    /// Honest syncs before it starts cheating (20: past probation).
    honest_first: u64,
    /// The fraction of its syncs it cheats on.
    f: f64,
    /// The fraction of the other members that collude with it.
    colluding: f64,
    /// Caught within this many syncs of starting to cheat...
    within: u64,
    /// ...at this audit probability (the bound's `p`).
    p: f64,
}

/// The sync (counted from its first cheating sync) of its first strike, if any within `limit`.
fn first_strike(seed: u64, case: &Case, policy: &Verification, limit: u64) -> Option<u64> {
    let key: [u8; 32] = Sha256::digest(seed.to_le_bytes()).into();
    let mut book = Book::new(key);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let others: Vec<WorkerId> = (2..=MEMBERS).map(WorkerId).collect();
    let colluders = (case.colluding * others.len() as f64).round() as usize;
    let colludes = |w: WorkerId| (w.0 as usize) < 2 + colluders;
    for step in 1..=case.honest_first + limit {
        let cheating = step > case.honest_first && rng.random_bool(case.f);
        if !book.draw(policy, RUN, CHEATER, step) {
            continue;
        }
        let committed = [1u8; 32];
        let honest = if cheating { [2u8; 32] } else { committed };
        let info = AuditInfo {
            run: RUN,
            id: 0,
            step,
            start_hash: ParamHash(step),
            spans: Vec::new(),
            target: CHEATER,
            rank: 0,
            inner: None,
            inner_bytes: 0,
        };
        let answer = |w: WorkerId| if colludes(w) { committed } else { honest };
        let available: Vec<WorkerId> =
            others.iter().filter(|w| book.available(RUN, **w, step)).copied().collect();
        let a1 = book.pick(RUN, step, CHEATER, 0, &available)?;
        let id = book.open(info, committed, a1, others.clone(), step).id;
        // Each auditor spends its next sync on the audit, as workers do.
        book.spend(RUN, a1, id);
        let mut decision = book.answer(id, a1, Answer::Digest(answer(a1)), step + 1);
        if let Some(Decision::Ask { .. }) = &decision {
            let a2 = book.pick(RUN, step, CHEATER, 1, &book.candidates(id, step + 1))?;
            book.ask(id, a2, step + 1);
            book.spend(RUN, a2, id);
            decision = book.answer(id, a2, Answer::Digest(answer(a2)), step + 2);
        }
        if matches!(decision, Some(Decision::Struck { .. })) {
            return Some(step - case.honest_first);
        }
    }
    None
}

fn main() {
    let policy = Verification {
        audit_probability: 0.05,
        probation_probability: 0.5,
        probation_syncs: 20,
        strikes_to_evict: 2,
        ..Verification::OFF
    };
    let cases = [
        Case {
            what: "new worker, cheats on half its syncs",
            honest_first: 0,
            f: 0.5,
            colluding: 0.0,
            within: 20,
            p: 0.5,
        },
        Case {
            what: "established worker, always cheats",
            honest_first: 20,
            f: 1.0,
            colluding: 0.0,
            within: 100,
            p: 0.05,
        },
        Case {
            what: "established worker, cheats on a fifth of its syncs",
            honest_first: 20,
            f: 0.2,
            colluding: 0.0,
            within: 100,
            p: 0.05,
        },
        Case {
            what: "established worker, always cheats, 2 of 7 others collude",
            honest_first: 20,
            f: 1.0,
            colluding: 2.0 / 7.0,
            within: 100,
            p: 0.05,
        },
    ];
    println!(
        "detection over {RUNS} seeded runs per case (ring of {MEMBERS}, audit probability {}, \
         probation {} for {} syncs)",
        policy.audit_probability, policy.probation_probability, policy.probation_syncs
    );
    for case in &cases {
        let limit = case.within * 10;
        let strikes: Vec<Option<u64>> =
            (0..RUNS).map(|seed| first_strike(seed, case, &policy, limit)).collect();
        let caught = strikes.iter().filter(|s| s.is_some_and(|s| s <= case.within)).count();
        let mut found: Vec<u64> = strikes.iter().flatten().copied().collect();
        found.sort_unstable();
        let median = found.get(found.len() / 2).copied().unwrap_or(0);
        // The first strike needs an audited cheated sync whose two auditors are honest: the
        // first drawn from the 7 others, the second from the 6 left.
        let others = (MEMBERS - 1) as f64;
        let honest = others - (case.colluding * others).round();
        let honest_pair = honest / others * (honest - 1.0) / (others - 1.0);
        let per_sync = case.f * case.p * honest_pair;
        let predicted = 1.0 - (1.0 - per_sync).powi(case.within as i32);
        println!(
            "  {}: caught within {} syncs in {:.1} % of runs (predicted {:.1} %); median {} \
             syncs to the first strike; the second follows at its next cheated sync (audited \
             at every sync after a strike)",
            case.what,
            case.within,
            100.0 * caught as f64 / RUNS as f64,
            100.0 * predicted,
            median
        );
    }
}
