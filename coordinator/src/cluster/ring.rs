//! Ring order: a short tour through the members by measured round-trip time.
//!
//! Ring all-reduce takes 2(N−1) latency steps around the ring, so the ring should be a short
//! tour. Nearest-neighbour construction from the smallest id, then 2-opt improvement (bounded
//! passes): deterministic for equal inputs, and within a few per cent of optimal for the sizes
//! a WAN run has.

use proto::WorkerId;

/// Orders `ids` (sorted or not) into a ring minimising the sum of `rtt` over neighbours.
pub fn order_ring(ids: &[WorkerId], rtt: impl Fn(WorkerId, WorkerId) -> u64) -> Vec<WorkerId> {
    let mut left: Vec<WorkerId> = ids.to_vec();
    left.sort();
    left.dedup();
    if left.len() <= 3 {
        return left; // every order of three or fewer is the same ring
    }
    let n = left.len();
    let d: Vec<Vec<u64>> = left
        .iter()
        .map(|&a| left.iter().map(|&b| if a == b { 0 } else { rtt(a, b) }).collect())
        .collect();
    // Nearest neighbour from index 0 (the smallest id); ties go to the smaller id.
    let mut tour = vec![0usize];
    let mut used = vec![false; n];
    used[0] = true;
    for _ in 1..n {
        let last = tour[tour.len() - 1];
        let next = (0..n)
            .filter(|&j| !used[j])
            .min_by_key(|&j| (d[last][j], j))
            .expect("an unused index remains while the tour is short");
        used[next] = true;
        tour.push(next);
    }
    // 2-opt: reverse tour[i+1..=j] when that shortens the ring.
    if n <= 512 {
        for _pass in 0..20 {
            let mut improved = false;
            for i in 0..n - 1 {
                for j in i + 2..n {
                    let (a, b) = (tour[i], tour[i + 1]);
                    let (c, e) = (tour[j], tour[(j + 1) % n]);
                    if a == e {
                        continue;
                    }
                    if d[a][c] + d[b][e] < d[a][b] + d[c][e] {
                        tour[i + 1..=j].reverse();
                        improved = true;
                    }
                }
            }
            if !improved {
                break;
            }
        }
    }
    tour.into_iter().map(|i| left[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_len(order: &[WorkerId], rtt: &impl Fn(WorkerId, WorkerId) -> u64) -> u64 {
        (0..order.len()).map(|i| rtt(order[i], order[(i + 1) % order.len()])).sum()
    }

    #[test]
    fn two_continents_are_crossed_twice_only() {
        // Workers 1..=8; odd ones in Europe, even ones in America: 5 ms within, 100 ms across.
        let rtt = |a: WorkerId, b: WorkerId| if a.0 % 2 == b.0 % 2 { 5_000 } else { 100_000 };
        let ids: Vec<WorkerId> = (1..=8).map(WorkerId).collect();
        let order = order_ring(&ids, rtt);
        assert_eq!(order.len(), 8);
        assert_eq!(ring_len(&order, &rtt), 6 * 5_000 + 2 * 100_000);
        // Deterministic, and independent of the input order.
        let mut shuffled = ids.clone();
        shuffled.reverse();
        assert_eq!(order_ring(&shuffled, rtt), order);
    }

    #[test]
    fn points_on_a_line_form_the_optimal_ring() {
        // Positions scrambled by id; the best ring visits them in position order.
        let pos = |w: WorkerId| (w.0 * 7919) % 101;
        let rtt = |a: WorkerId, b: WorkerId| pos(a).abs_diff(pos(b));
        let ids: Vec<WorkerId> = (1..=30).map(WorkerId).collect();
        let order = order_ring(&ids, rtt);
        let min = ids.iter().map(|&w| pos(w)).min().unwrap();
        let max = ids.iter().map(|&w| pos(w)).max().unwrap();
        assert_eq!(ring_len(&order, &rtt), 2 * (max - min));
    }
}
