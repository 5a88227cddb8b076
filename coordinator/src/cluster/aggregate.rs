//! The aggregation plan of one synchronisation: from what every member committed about its own
//! contribution, one coefficient per member that every member applies to itself, the same for
//! all. Pure; the coordinator computes it, and tests of the trainer use it in-process.
//!
//! Who could lie here, and what it would gain:
//! - a member declaring a norm smaller than what it sends: its successor in the ring catches the
//!   partial sum that exceeds the declared norms (`collectives::Group::all_reduce_bounded`);
//! - a member declaring a huge norm (a ×999 update declared truthfully): its coefficient clips it
//!   to [`CLIP_FACTOR`] times the median contributor's norm, so it weighs no more than two
//!   honest members (a sign-flipped one cannot reverse the step while honest members are more
//!   than twice as many); honest members are rarely clipped at all, so with none an outlier a
//!   ddp sync is exactly the large-batch gradient;
//! - a member declaring a zero or tiny norm (a lazy worker, or one trying to drag the median
//!   down): a zero contribution is left out; a tiny one only lowers the median when the liars
//!   are at least half of the contributors, and robust aggregation needs an honest majority;
//! - a member declaring non-finite or negative norms: that is its own word that its contribution
//!   is broken, evidence enough to ban it;
//! - a member declaring an outlier (over [`OUTLIER_FACTOR`] times the median): left out of this
//!   sync. Relative statistics are never grounds for a ban: with two members the median is the
//!   smaller, so a liar declaring a tiny norm would otherwise frame the honest one.

/// A contribution more than this many times the median contributor's is left out of the sync.
pub const OUTLIER_FACTOR: f64 = 1e3;

/// Contributions are clipped to this many times the median contributor's norm.
pub const CLIP_FACTOR: f64 = 2.0;

/// What one member committed.
#[derive(Clone, Debug, PartialEq)]
pub struct Commitment {
    /// Whether the member's contribution counts in this sync (diloco: it trained the whole
    /// round; ddp: always).
    pub contributes: bool,
    /// The L2 norm of its contribution on each segment of the ring.
    pub segment_norms: Vec<f32>,
}

/// Why a member is left out of a sync.
#[derive(Clone, Debug, PartialEq)]
pub enum Exclusion {
    /// It joined the round late (diloco): it contributes nothing this round.
    NotContributing,
    /// It declared a zero contribution.
    Zero,
    /// It declared more than [`OUTLIER_FACTOR`] times the median.
    Outlier { norm: f64, median: f64 },
    /// It declared non-finite or negative norms, or the wrong number of them: evidence.
    Invalid(String),
    /// Its commitment failed the coordinator's checks (see `commitments`).
    Refused(String),
    /// It spent the sync recomputing another member's contribution (an audit).
    Auditing(u64),
}

impl std::fmt::Display for Exclusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotContributing => f.write_str("joined the round late"),
            Self::Zero => f.write_str("zero contribution"),
            Self::Outlier { norm, median } => write!(
                f,
                "declared norm {norm:.3e} is over {OUTLIER_FACTOR}x the median {median:.3e}"
            ),
            Self::Invalid(why) => write!(f, "invalid commitment: {why}"),
            Self::Refused(why) => write!(f, "commitment refused: {why}"),
            Self::Auditing(id) => write!(f, "auditing ({id:016x})"),
        }
    }
}

/// The plan: per member, the coefficient it scales its contribution by (0 for the excluded) and,
/// for those left out, why.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub coefficients: Vec<f32>,
    pub excluded: Vec<Option<Exclusion>>,
}

impl Plan {
    /// The members whose own commitments are evidence against them (see the module doc).
    pub fn evidence(&self) -> impl Iterator<Item = (usize, &str)> {
        self.excluded.iter().enumerate().filter_map(|(r, e)| match e {
            Some(Exclusion::Invalid(why)) => Some((r, why.as_str())),
            _ => None,
        })
    }
}

/// The L2 norm of a member's whole contribution from its segment norms.
pub fn total_norm(segment_norms: &[f32]) -> f64 {
    segment_norms.iter().map(|n| f64::from(*n) * f64::from(*n)).sum::<f64>().sqrt()
}

/// The median of `values` (the lower one for an even count, the smaller of two).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => None,
        n => Some(values[(n - 1) / 2]),
    }
}

/// Computes the plan of one sync of `world` members.
///
/// The contributing members that are not excluded share the sync equally (weights come from the
/// run file: every member trains the same batch), each clipped to [`CLIP_FACTOR`] times the
/// median contributor's norm: `a_i = min(1, CLIP_FACTOR · median / norm_i) / k` for the `k`
/// included members.
pub fn plan(world: usize, commits: &[Commitment]) -> Plan {
    let mut excluded: Vec<Option<Exclusion>> = commits
        .iter()
        .map(|c| {
            if c.segment_norms.len() != world {
                return Some(Exclusion::Invalid(format!(
                    "{} segment norms for a ring of {world}",
                    c.segment_norms.len()
                )));
            }
            if let Some(bad) = c.segment_norms.iter().find(|n| !n.is_finite() || **n < 0.0) {
                return Some(Exclusion::Invalid(format!("segment norm {bad}")));
            }
            if !c.contributes {
                return Some(Exclusion::NotContributing);
            }
            (total_norm(&c.segment_norms) == 0.0).then_some(Exclusion::Zero)
        })
        .collect();
    let norms: Vec<f64> = commits.iter().map(|c| total_norm(&c.segment_norms)).collect();
    let included = |excluded: &[Option<Exclusion>]| -> Vec<usize> {
        (0..commits.len()).filter(|&r| excluded[r].is_none()).collect()
    };
    let reference = median(included(&excluded).iter().map(|&r| norms[r]).collect());
    if let Some(m) = reference {
        for r in included(&excluded) {
            if norms[r] > OUTLIER_FACTOR * m {
                excluded[r] = Some(Exclusion::Outlier { norm: norms[r], median: m });
            }
        }
    }
    let members = included(&excluded);
    let k = members.len() as f64;
    let mut coefficients = vec![0f32; commits.len()];
    if let Some(m) = reference {
        for r in members {
            let clip = (CLIP_FACTOR * m / norms[r]).min(1.0);
            coefficients[r] = (clip / k) as f32;
        }
    }
    Plan { coefficients, excluded }
}

/// A contribution whose norm is more than this many times the contributors' median, or less
/// than the median divided by it, is anomalous. Honest ddp members of a small-batch task differ
/// by up to about 6x (measured in the adversary suite's honest runs: a fixed 2x flagged a
/// quarter of their syncs), so the bar is higher than the plan's clipping.
pub const ANOMALY_FACTOR: f64 = 10.0;

/// Which of the included contributors' norms are anomalous (see [`ANOMALY_FACTOR`]). An anomaly
/// raises the member's audit chance and nothing else: statistics never evict.
pub fn anomalous(norms: &[f64]) -> Vec<bool> {
    match median(norms.to_vec()) {
        Some(m) if m.is_finite() && m > 0.0 => {
            norms.iter().map(|n| *n > ANOMALY_FACTOR * m || *n < m / ANOMALY_FACTOR).collect()
        }
        _ => vec![false; norms.len()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(norms: &[f32]) -> Commitment {
        Commitment { contributes: true, segment_norms: norms.to_vec() }
    }

    #[test]
    fn honest_members_share_equally_and_outliers_are_clipped_to_twice_the_median() {
        let p = plan(2, &[c(&[3.0, 4.0]), c(&[0.0, 5.0]), c(&[6.0, 8.0])]);
        // Norms 5, 5, 10: the median is 5, nobody is beyond twice that.
        assert_eq!(p.excluded, vec![None, None, None]);
        assert_eq!(p.coefficients, vec![1.0 / 3.0; 3]);
        let p = plan(1, &[c(&[5.0]), c(&[5.0]), c(&[20.0])]);
        assert_eq!(p.coefficients, vec![1.0 / 3.0, 1.0 / 3.0, (0.5f64 / 3.0) as f32]);
    }

    #[test]
    fn a_sign_flipped_times_999_update_weighs_no_more_than_two_honest_members() {
        let p = plan(1, &[c(&[1.0]), c(&[1.2]), c(&[0.9]), c(&[999.0])]);
        let weight = |r: usize| f64::from(p.coefficients[r]) * [1.0, 1.2, 0.9, 999.0][r];
        assert!(weight(3) <= 2.0 * weight(0) + 1e-6, "{p:?}");
        assert!(p.excluded.iter().all(Option::is_none));
    }

    #[test]
    fn zero_late_and_outlying_contributions_are_left_out_without_evidence() {
        let late = Commitment { contributes: false, segment_norms: vec![1.0] };
        let p = plan(1, &[c(&[1.0]), c(&[0.0]), late, c(&[2.0]), c(&[5e3])]);
        assert_eq!(p.excluded[1], Some(Exclusion::Zero));
        assert_eq!(p.excluded[2], Some(Exclusion::NotContributing));
        assert!(matches!(p.excluded[4], Some(Exclusion::Outlier { .. })), "{p:?}");
        assert_eq!(p.coefficients[1], 0.0);
        assert_eq!(p.coefficients[4], 0.0);
        assert_eq!(p.evidence().count(), 0);
        // The included two share the sync.
        assert!((p.coefficients[0] - 0.5).abs() < 1e-6 && p.coefficients[3] > 0.0);
    }

    #[test]
    fn non_finite_negative_or_misshapen_commitments_are_evidence() {
        let p = plan(2, &[c(&[1.0, 1.0]), c(&[f32::NAN, 1.0]), c(&[-1.0, 0.0]), c(&[1.0])]);
        let guilty: Vec<usize> = p.evidence().map(|(r, _)| r).collect();
        assert_eq!(guilty, vec![1, 2, 3]);
        assert_eq!(p.coefficients, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn with_two_members_a_tiny_declaration_cannot_frame_the_other() {
        // The liar declares almost nothing; the honest member is clipped (bounded damage) but
        // never excluded as an outlier of the liar's making... unless it is 1000x over, and even
        // then it is left out of one sync, never banned.
        let p = plan(1, &[c(&[1.0]), c(&[1e-9])]);
        assert_eq!(p.evidence().count(), 0);
        let p = plan(1, &[c(&[1.0]), c(&[0.5])]);
        assert_eq!(p.excluded, vec![None, None]);
    }

    #[test]
    fn norms_far_from_the_median_are_anomalous() {
        assert_eq!(anomalous(&[1.0, 1.1, 0.9, 1.5, 6.0, 0.2]), vec![false; 6]);
        // A scaled-up update and a shrunken one.
        assert_eq!(anomalous(&[1.0, 1.1, 0.9, 12.0, 0.05]), vec![false, false, false, true, true]);
        assert!(anomalous(&[]).is_empty());
        // A median of zero (liars declaring nothing) flags nobody.
        assert_eq!(anomalous(&[0.0, 0.0, 1.0]), vec![false; 3]);
    }

    #[test]
    fn nobody_contributing_gives_a_plan_of_zeros() {
        let late = Commitment { contributes: false, segment_norms: vec![1.0] };
        let p = plan(1, &[late.clone(), late]);
        assert_eq!(p.coefficients, vec![0.0, 0.0]);
    }
}
