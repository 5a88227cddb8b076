//! A run's ledger as a document a run owner can pay from and anyone can check offline: per
//! worker, what it committed, what was applied, what was left out and why, the samples the
//! coordinator verified against its own lease grants, its audits; per sync, every commitment
//! with its verdict and its audit; signed by the coordinator's CA key.
//!
//! The file is the body (one JSON line, or CSV) followed by one signature line:
//!
//! ```text
//! # longhaul-ledger-signature v1 ca=<hex of the CA certificate, DER> sig=<hex of an ECDSA P-256 SHA-256 signature>
//! ```
//!
//! The signature covers every byte before that line. `verify` checks it with the key of the
//! certificate in the line, and that certificate against the CA pin the checker trusts (the
//! same pin workers and the CLI use), so a ledger cannot be edited, nor re-signed by another
//! coordinator, without the check failing.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use client::pki::{ca_hash, hex, unhex};
use proto::WorkerId;
use serde::{Deserialize, Serialize};

use crate::cluster::audits::AuditRecord;
use crate::cluster::commitments::{CommitmentRecord, Verdict};

/// The longest certificate and signature a signature line may carry (hex digits).
const MAX_CERT_HEX: usize = 64 << 10;
const MAX_SIG_HEX: usize = 512;

/// The first word of the signature line.
const SIGNATURE_TAG: &str = "# longhaul-ledger-signature v1 ";

/// The DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, a 66-byte BIT
/// STRING): the uncompressed point follows it.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
}

/// What the ledger says about the run itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    pub id: u64,
    pub name: String,
    pub state: String,
    pub committed_step: u64,
    pub total_steps: u64,
    /// The escrow window in steps (`verification.escrow_syncs` syncs): a sync's credit is
    /// final once the run is this many steps past it plus the 4 syncs an audit's verdict can
    /// take, or has ended, with no strike of the member in the window.
    #[serde(default)]
    pub escrow_steps: u64,
    /// Steps per sync (1 in ddp, `inner_steps` in diloco): an audit's verdict takes up to 4
    /// syncs.
    #[serde(default = "one")]
    pub steps_per_sync: u64,
    /// Whether the run has ended (no audit can come any more: what is in escrow is final).
    #[serde(default)]
    pub finished: bool,
}

fn one() -> u64 {
    1
}

/// Per worker, from the run's commitments and audits.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkerTotals {
    pub worker: u64,
    pub syncs_committed: u64,
    pub syncs_applied: u64,
    /// Left out, by reason (auditing, refused commitments, late, zero, outlier).
    pub syncs_excluded: BTreeMap<String, u64>,
    pub samples_claimed: u64,
    /// Samples in its applied commitments' spans (data the coordinator leased to it).
    pub samples_verified: u64,
    /// The sum of its applied coefficients.
    pub effective_weight: f64,
    pub audits_passed: u64,
    pub strikes: u64,
    pub audits_performed: u64,
    pub audits_wrong: u64,
    pub evicted: bool,
    /// The reproducibility profile its applied commitments named first ("" if none did: no
    /// auditor could recompute its contributions).
    #[serde(default)]
    pub profile: String,
    /// Verified samples of applied syncs past their escrow window (a basis to pay from),
    /// still in escrow, and forfeited (a strike came during their escrow window, or the member
    /// was evicted while they were in escrow).
    #[serde(default)]
    pub credit_final: u64,
    #[serde(default)]
    pub credit_provisional: u64,
    #[serde(default)]
    pub credit_forfeited: u64,
}

/// One commitment and what became of it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SyncRow {
    pub step: u64,
    pub epoch: u64,
    pub worker: u64,
    /// "applied" or "excluded".
    pub verdict: String,
    pub coefficient: f32,
    pub reason: String,
    pub samples: u64,
    /// The committed digest (hex), "" if none.
    pub digest: String,
    /// `[shard, data_epoch, from, to]`: which samples it trained on.
    pub spans: Vec<[u64; 4]>,
    /// "passed", "struck", "inconclusive", "dropped" or "" (not audited).
    pub audit: String,
    /// For an applied sync, its credit: "final", "provisional" (in escrow) or "forfeited";
    /// "" for an excluded one.
    #[serde(default)]
    pub credit: String,
}

/// Which worker trained which samples of one shard in one data epoch, in applied syncs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ShardCoverage {
    pub shard: u32,
    pub data_epoch: u64,
    /// Samples of it trained in applied syncs (overlaps of shared leases counted once).
    pub samples_trained: u64,
    /// Ordered by `from`.
    pub spans: Vec<CoveredSpan>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CoveredSpan {
    pub from: u64,
    pub to: u64,
    pub worker: u64,
    pub step: u64,
    /// The sync's audit ("passed", "struck", ...; "" if it was not audited) and credit.
    pub audit: String,
    pub credit: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Ledger {
    pub format: String,
    pub run: RunSummary,
    pub generated_unix_ms: u64,
    pub workers: Vec<WorkerTotals>,
    pub syncs: Vec<SyncRow>,
    /// For every shard and data epoch trained in an applied sync: by whom, over which samples,
    /// and whether that work was verified.
    #[serde(default)]
    pub shards: Vec<ShardCoverage>,
}

/// Builds the ledger of a run from its durable records. `evicted`: the workers banned from it.
pub fn build(
    run: RunSummary,
    now_ms: u64,
    commitments: &[CommitmentRecord],
    audits: &[AuditRecord],
    evicted: &[WorkerId],
) -> Ledger {
    let mut totals: BTreeMap<WorkerId, WorkerTotals> = BTreeMap::new();
    let mut audit_of: BTreeMap<(u64, WorkerId), &str> = BTreeMap::new();
    let mut struck: BTreeMap<WorkerId, Vec<u64>> = BTreeMap::new();
    for a in audits {
        audit_of.insert((a.step, a.target), a.verdict.as_str());
        let t = totals.entry(a.target).or_default();
        match a.verdict.as_str() {
            "passed" => t.audits_passed += 1,
            "struck" => {
                t.strikes += 1;
                struck.entry(a.target).or_default().push(a.step);
            }
            _ => {}
        }
        for w in &a.auditors {
            totals.entry(*w).or_default().audits_performed += 1;
        }
        if let Some(w) = a.wrong {
            totals.entry(w).or_default().audits_wrong += 1;
        }
    }
    // A sync abandoned after its plan (a ring fault, an eviction) is committed to again: the
    // last record of a (step, worker) is its verdict, and a sync the run did not record credits
    // nothing.
    let mut last: BTreeMap<(u64, WorkerId), &CommitmentRecord> = BTreeMap::new();
    for c in commitments {
        last.insert((c.step, c.worker), c);
    }
    last.retain(|(step, _), _| *step <= run.committed_step);
    // A step is recorded by its last attempt (an abandoned one is retried in a later epoch, and
    // a recorded step is never attempted again): commitments to earlier attempts of a step,
    // by members the retry went on without, were never applied.
    let mut last_epoch: BTreeMap<u64, u64> = BTreeMap::new();
    for c in last.values() {
        let e = last_epoch.entry(c.step).or_default();
        *e = (*e).max(c.epoch.0);
    }
    last.retain(|(step, _), c| last_epoch.get(step) == Some(&c.epoch.0));
    // The last sync each worker committed to: an evicted one's eviction came right after it.
    let mut last_step: BTreeMap<WorkerId, u64> = BTreeMap::new();
    for (step, w) in last.keys() {
        last_step.insert(*w, *step);
    }
    let credit = |w: WorkerId, step: u64| -> &'static str {
        let escrow_ends = step.saturating_add(run.escrow_steps);
        // A strike of a sync in the window is decided up to AUDIT_SYNCS later: only then is
        // the credit final (it never goes from final to forfeited).
        let settled = escrow_ends.saturating_add(
            crate::cluster::audits::AUDIT_SYNCS.saturating_mul(run.steps_per_sync.max(1)),
        );
        let strikes = struck.get(&w).map_or(&[][..], Vec::as_slice);
        // A round whose audit evidence (diloco's inner state) was withheld earns nothing.
        if audit_of.get(&(step, w)) == Some(&"withheld")
            || strikes.iter().any(|t| (step..=escrow_ends).contains(t))
            || (evicted.contains(&w) && last_step.get(&w).is_some_and(|l| *l <= escrow_ends))
        {
            "forfeited"
        } else if run.finished || settled <= run.committed_step {
            "final"
        } else {
            "provisional"
        }
    };
    let mut syncs = Vec::with_capacity(last.len());
    let mut coverage: BTreeMap<(u32, u64), Vec<CoveredSpan>> = BTreeMap::new();
    for c in last.into_values() {
        let t = totals.entry(c.worker).or_default();
        t.syncs_committed += 1;
        t.samples_claimed += c.claim.samples;
        let named: u64 = c.claim.spans.iter().map(|s| s.to.saturating_sub(s.from)).sum();
        let audit: &str = audit_of.get(&(c.step, c.worker)).copied().unwrap_or_default();
        let (verdict, coefficient, reason, credit) = match &c.verdict {
            Verdict::Accepted { coefficient } => {
                t.syncs_applied += 1;
                t.samples_verified += named;
                t.effective_weight += f64::from(*coefficient);
                if t.profile.is_empty() {
                    t.profile.clone_from(&c.claim.profile);
                }
                let credit = credit(c.worker, c.step);
                match credit {
                    "final" => t.credit_final += named,
                    "provisional" => t.credit_provisional += named,
                    _ => t.credit_forfeited += named,
                }
                for s in &c.claim.spans {
                    coverage.entry((s.shard, s.data_epoch)).or_default().push(CoveredSpan {
                        from: s.from,
                        to: s.to,
                        worker: c.worker.0,
                        step: c.step,
                        audit: audit.into(),
                        credit: credit.into(),
                    });
                }
                ("applied", *coefficient, String::new(), credit)
            }
            Verdict::Excluded(why) => {
                *t.syncs_excluded.entry(reason_class(why)).or_default() += 1;
                ("excluded", 0.0, why.clone(), "")
            }
        };
        syncs.push(SyncRow {
            step: c.step,
            epoch: c.epoch.0,
            worker: c.worker.0,
            verdict: verdict.into(),
            coefficient,
            reason,
            samples: c.claim.samples,
            digest: c.claim.digest.map(|d| hex(&d)).unwrap_or_default(),
            spans: c
                .claim
                .spans
                .iter()
                .map(|s| [u64::from(s.shard), s.data_epoch, s.from, s.to])
                .collect(),
            audit: audit.into(),
            credit: credit.into(),
        });
    }
    let shards = coverage
        .into_iter()
        .map(|((shard, data_epoch), mut spans)| {
            spans.sort_by_key(|s| (s.from, s.to, s.step, s.worker));
            // Samples covered, overlaps (shared leases) once.
            let (mut samples_trained, mut upto) = (0, 0);
            for s in &spans {
                let from = s.from.max(upto);
                if s.to > from {
                    samples_trained += s.to - from;
                }
                upto = upto.max(s.to);
            }
            ShardCoverage { shard, data_epoch, samples_trained, spans }
        })
        .collect();
    let workers = totals
        .into_iter()
        .map(|(w, mut t)| {
            t.worker = w.0;
            t.evicted = evicted.contains(&w);
            t
        })
        .collect();
    Ledger {
        format: "longhaul-ledger/1".into(),
        run,
        generated_unix_ms: now_ms,
        workers,
        syncs,
        shards,
    }
}

/// The class of an exclusion reason (its words before any detail), for the totals.
fn reason_class(why: &str) -> String {
    why.split([':', '(']).next().unwrap_or(why).trim().to_owned()
}

/// The body of the document in `format`.
pub fn render(l: &Ledger, format: Format) -> Vec<u8> {
    match format {
        Format::Json => {
            let mut v = serde_json::to_vec(l).expect("a ledger serialises");
            v.push(b'\n');
            v
        }
        Format::Csv => {
            let mut s = String::new();
            let _ = writeln!(
                s,
                "# longhaul ledger of run {} ({}), {} at step {} of {}",
                l.run.id, l.run.name, l.run.state, l.run.committed_step, l.run.total_steps
            );
            s.push_str(
                "step,epoch,worker,verdict,coefficient,reason,samples,digest,spans,audit,credit\n",
            );
            for r in &l.syncs {
                let spans: Vec<String> =
                    r.spans.iter().map(|[a, b, c, d]| format!("{a}:{b}:{c}-{d}")).collect();
                let _ = writeln!(
                    s,
                    "{},{},{},{},{},{},{},{},{},{},{}",
                    r.step,
                    r.epoch,
                    r.worker,
                    r.verdict,
                    r.coefficient,
                    csv_field(&r.reason),
                    r.samples,
                    r.digest,
                    spans.join(" "),
                    r.audit,
                    r.credit
                );
            }
            s.into_bytes()
        }
    }
}

/// A CSV field: quoted when it holds a separator, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"").replace(['\n', '\r'], " "))
    } else {
        s.to_owned()
    }
}

/// The signature line for `body`, given the CA certificate (DER) and a signature over `body`.
pub fn signature_line(ca_der: &[u8], signature: &[u8]) -> String {
    format!("{SIGNATURE_TAG}ca={} sig={}\n", hex(ca_der), hex(signature))
}

/// Why a ledger file did not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("no signature line: the file does not end with a `{}` line", SIGNATURE_TAG.trim())]
    Unsigned,
    #[error("the signature line is malformed: {0}")]
    Malformed(&'static str),
    #[error("signed by the CA {found}, not the trusted {trusted}")]
    OtherCa { found: String, trusted: String },
    #[error("the CA certificate's key is not an ECDSA P-256 key")]
    UnsupportedKey,
    #[error("the signature does not match the contents: the file was changed after signing")]
    BadSignature,
}

/// What a verified file says.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified<'a> {
    /// The signed bytes.
    pub body: &'a [u8],
    /// `sha256:<hex>` of the signing CA.
    pub ca: String,
}

/// Checks a ledger file: its signature line, the signing certificate against `trusted` (a CA
/// pin, `sha256:<hex>`; `None` trusts the certificate in the file and says which it was), and
/// the signature over everything before the line.
pub fn verify<'a>(file: &'a [u8], trusted: Option<&str>) -> Result<Verified<'a>, VerifyError> {
    let trimmed = file.strip_suffix(b"\n").ok_or(VerifyError::Unsigned)?;
    let start = trimmed.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let (body, line) = file.split_at(start);
    let line = std::str::from_utf8(line).map_err(|_| VerifyError::Unsigned)?.trim_end();
    let rest = line.strip_prefix(SIGNATURE_TAG.trim_end()).ok_or(VerifyError::Unsigned)?;
    let mut ca = None;
    let mut sig = None;
    for word in rest.split_whitespace() {
        match word.split_once('=') {
            Some(("ca", v)) if v.len() <= MAX_CERT_HEX => ca = unhex(v),
            Some(("sig", v)) if v.len() <= MAX_SIG_HEX => sig = unhex(v),
            _ => return Err(VerifyError::Malformed("an unknown field")),
        }
    }
    let ca = ca.ok_or(VerifyError::Malformed("no CA certificate"))?;
    let sig = sig.ok_or(VerifyError::Malformed("no signature"))?;
    let found = ca_hash(&ca);
    if let Some(t) = trusted {
        let t = format!("sha256:{}", t.trim().trim_start_matches("sha256:").to_ascii_lowercase());
        if t != found {
            return Err(VerifyError::OtherCa { found, trusted: t });
        }
    }
    let key = p256_key(&ca).ok_or(VerifyError::UnsupportedKey)?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, key)
        .verify(body, &sig)
        .map_err(|_| VerifyError::BadSignature)?;
    Ok(Verified { body, ca: found })
}

/// The uncompressed P-256 point of a certificate's SubjectPublicKeyInfo.
fn p256_key(cert_der: &[u8]) -> Option<&[u8]> {
    let at = cert_der.windows(P256_SPKI_PREFIX.len()).position(|w| w == P256_SPKI_PREFIX)?;
    let key = cert_der.get(at + P256_SPKI_PREFIX.len()..at + P256_SPKI_PREFIX.len() + 65)?;
    (key[0] == 0x04).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::commitments::{Claim, Span};
    use proto::{Epoch, LeaseId};

    fn record(step: u64, worker: u64, verdict: Verdict) -> CommitmentRecord {
        CommitmentRecord {
            step,
            epoch: Epoch(1),
            worker: WorkerId(worker),
            claim: Claim {
                spans: vec![Span {
                    lease: LeaseId(1),
                    shard: 2,
                    data_epoch: 0,
                    from: 10 * step,
                    to: 10 * step + 10,
                    granted: true,
                    shared: false,
                }],
                samples: 10,
                digest: Some([step as u8; 32]),
                ..Claim::norms(vec![1.0])
            },
            verdict,
        }
    }

    fn ledger() -> Ledger {
        let commitments = vec![
            // An attempt at step 1 abandoned (epoch 0) and retried without worker 3.
            CommitmentRecord {
                epoch: Epoch(0),
                ..record(1, 3, Verdict::Accepted { coefficient: 1.0 })
            },
            // An abandoned plan's verdict, superseded by the last one below.
            record(2, 2, Verdict::Accepted { coefficient: 0.5 }),
            record(1, 1, Verdict::Accepted { coefficient: 0.5 }),
            record(1, 2, Verdict::Accepted { coefficient: 0.5 }),
            record(2, 1, Verdict::Accepted { coefficient: 1.0 }),
            record(2, 2, Verdict::Excluded("auditing (00ff)".into())),
            // A sync the run never recorded.
            record(3, 1, Verdict::Accepted { coefficient: 1.0 }),
        ];
        let audits = vec![AuditRecord {
            id: 7,
            step: 1,
            target: WorkerId(1),
            auditors: vec![WorkerId(2)],
            wrong: None,
            verdict: "passed".into(),
        }];
        let run = RunSummary {
            id: 3,
            name: "r".into(),
            state: "completed".into(),
            committed_step: 2,
            total_steps: 2,
            escrow_steps: 0,
            steps_per_sync: 1,
            finished: true,
        };
        build(run, 99, &commitments, &audits, &[WorkerId(9)])
    }

    /// Credit is final once the escrow window passed (or the run ended) with no strike; a
    /// strike forfeits what was still in escrow when it came, and so does an eviction.
    #[test]
    fn a_strike_forfeits_the_credit_in_escrow_and_the_rest_becomes_final() {
        let accepted = || Verdict::Accepted { coefficient: 1.0 };
        let mut commitments = Vec::new();
        for step in 1..=30 {
            commitments.push(record(step, 1, accepted()));
            commitments.push(record(step, 2, accepted()));
        }
        let strike = AuditRecord {
            id: 1,
            step: 20,
            target: WorkerId(2),
            auditors: vec![WorkerId(1), WorkerId(3)],
            wrong: None,
            verdict: "struck".into(),
        };
        let run = |finished| RunSummary {
            id: 3,
            name: "r".into(),
            state: "running".into(),
            committed_step: 30,
            total_steps: 100,
            escrow_steps: 5,
            steps_per_sync: 1,
            finished,
        };
        let l = build(run(false), 0, &commitments, std::slice::from_ref(&strike), &[]);
        let (w1, w2) = (&l.workers[0], &l.workers[1]);
        // Steps 1..=21 are past the window and a verdict's delay (21 + 5 + 4 <= 30); 22..=30
        // are in it.
        assert_eq!((w1.credit_final, w1.credit_provisional, w1.credit_forfeited), (210, 90, 0));
        // The strike at 20 forfeits 15..=20; 1..=14 and 21 are final, 22..=30 in escrow.
        assert_eq!((w2.credit_final, w2.credit_provisional, w2.credit_forfeited), (150, 90, 60));
        let row = |step, w| l.syncs.iter().find(|r| r.step == step && r.worker == w).unwrap();
        assert_eq!(
            (row(14, 2).credit.as_str(), row(15, 2).credit.as_str()),
            ("final", "forfeited")
        );
        // Evicted: what was in escrow at its last sync is forfeited too; the run's end makes the
        // rest final.
        let l = build(run(true), 0, &commitments, &[strike], &[WorkerId(2)]);
        let (w1, w2) = (&l.workers[0], &l.workers[1]);
        assert_eq!((w1.credit_final, w1.credit_provisional), (300, 0));
        // Forfeited: 15..=20 (the strike) and 25..=30 (in escrow at its last sync, 30).
        assert_eq!((w2.credit_final, w2.credit_provisional, w2.credit_forfeited), (180, 0, 120));
        assert_eq!(w1.credit_final + w2.credit_final + w2.credit_forfeited, 600);
    }

    /// The ledger answers, per shard and data epoch, who trained which samples in which sync,
    /// and whether that was verified.
    #[test]
    fn every_trained_span_is_indexed_by_shard() {
        let l = ledger();
        // Applied and recorded: [10, 20) of shard 2 by w1 and w2 at step 1 (a shared lease), and
        // [20, 30) by w1 at step 2; the excluded and the unrecorded ones are not there.
        let all: Vec<(u32, u64, u64, u64, &str)> = l
            .shards
            .iter()
            .flat_map(|c| {
                c.spans.iter().map(move |s| (c.shard, s.from, s.worker, s.step, s.audit.as_str()))
            })
            .collect();
        assert_eq!(all, vec![(2, 10, 1, 1, "passed"), (2, 10, 2, 1, ""), (2, 20, 1, 2, "")]);
        assert_eq!(l.shards.len(), 1);
        assert_eq!(l.shards[0].samples_trained, 20, "the shared span once");
        assert!(l.shards[0].spans.iter().all(|s| s.credit == "final"), "the run ended");
    }

    #[test]
    fn totals_and_rows_come_from_the_records() {
        let l = ledger();
        let w1 = &l.workers[0];
        assert_eq!((w1.worker, w1.syncs_committed, w1.syncs_applied), (1, 2, 2));
        assert_eq!((w1.samples_claimed, w1.samples_verified, w1.audits_passed), (20, 20, 1));
        assert_eq!(w1.effective_weight, 1.5);
        assert!(l.workers.iter().all(|w| w.worker != 3), "an abandoned attempt applied nothing");
        let w2 = &l.workers[1];
        assert_eq!((w2.syncs_applied, w2.samples_verified, w2.audits_performed), (1, 10, 1));
        assert_eq!(w2.syncs_excluded.get("auditing"), Some(&1));
        assert_eq!(l.syncs[0].audit, "passed");
        assert_eq!(l.syncs[0].spans, vec![[2, 0, 10, 20]]);
        let csv = String::from_utf8(render(&l, Format::Csv)).unwrap();
        assert!(csv.contains("\n2,1,2,excluded,0,auditing (00ff),10,"), "{csv}");
        let json: Ledger = serde_json::from_slice(&render(&l, Format::Json)).unwrap();
        assert_eq!(json, l);
    }

    #[test]
    fn a_signed_ledger_verifies_and_any_change_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::ca::Pki::open_or_create(dir.path(), &[]).unwrap();
        let body = render(&ledger(), Format::Json);
        let mut file = body.clone();
        file.extend_from_slice(pki.sign_ledger(&body).unwrap().as_bytes());
        let pin = client::pki::ca_hash(pki.ca_der());
        let ok = verify(&file, Some(&pin)).unwrap();
        assert_eq!((ok.body, ok.ca.as_str()), (body.as_slice(), pin.as_str()));
        assert!(verify(&file, None).is_ok());
        // One changed byte of the body.
        let mut edited = file.clone();
        let at = edited.iter().position(|b| *b == b'3').unwrap();
        edited[at] = b'4';
        assert_eq!(verify(&edited, Some(&pin)), Err(VerifyError::BadSignature));
        // Another coordinator's CA (re-signed by it).
        let other_dir = tempfile::tempdir().unwrap();
        let other = crate::ca::Pki::open_or_create(other_dir.path(), &[]).unwrap();
        let mut resigned = body.clone();
        resigned.extend_from_slice(other.sign_ledger(&body).unwrap().as_bytes());
        assert!(matches!(verify(&resigned, Some(&pin)), Err(VerifyError::OtherCa { .. })));
        // No signature, a truncated one, garbage.
        assert_eq!(verify(&body, Some(&pin)), Err(VerifyError::Unsigned));
        let cut = &file[..file.len() - 10];
        assert!(verify(cut, Some(&pin)).is_err());
        assert!(verify(b"", None).is_err());
        assert!(verify(b"# longhaul-ledger-signature v1 ca=zz sig=00\n", None).is_err());
    }
}
