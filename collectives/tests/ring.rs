//! The ring over real QUIC on loopback: correctness of every operation and codec, bitwise
//! agreement across ranks, and the failure semantics.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use collectives::testing::{LocalRing, RankParts};
use collectives::{
    Bounds, Compression, Element, Emulation, Group, LinkPreset, NetConfig, OpError, ReduceOp,
    segments,
};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn net() -> NetConfig {
    NetConfig {
        rtt: Duration::from_millis(1),
        chunk_bytes: 64 << 10,
        keep_alive: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(20),
        op_deadline: Duration::from_secs(120),
        ..NetConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Joins every rank of a local ring, runs `body(rank, group)` on each concurrently, and returns
/// the results in rank order.
async fn on_ring<T, F, Fut>(parts: Vec<RankParts>, body: F) -> Vec<T>
where
    F: Fn(usize, Group) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = parts
        .into_iter()
        .enumerate()
        .map(|(rank, p)| {
            let fut = async move { p.join().await.expect("join") };
            (rank, tokio::spawn(fut))
        })
        .collect();
    let mut groups = Vec::new();
    for (rank, h) in handles {
        groups.push((rank, h.await.unwrap()));
    }
    let tasks: Vec<_> = groups.into_iter().map(|(rank, g)| tokio::spawn(body(rank, g))).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Rank `rank`'s input of case `seed`.
fn input(rank: usize, len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + rank as u64);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn inputs(world: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    (0..world).map(|r| input(r, len, seed)).collect()
}

fn reference(inputs: &[Vec<f32>], op: ReduceOp) -> Vec<f64> {
    let n = inputs.len() as f64;
    (0..inputs[0].len())
        .map(|i| {
            let s: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
            if op == ReduceOp::Average { s / n } else { s }
        })
        .collect()
}

/// Relative RMS error of `got` against `want`.
fn rel_rms(got: &[f32], want: &[f64]) -> f64 {
    let (mut err, mut norm) = (0.0, 0.0);
    for (g, w) in got.iter().zip(want) {
        err += (f64::from(*g) - w).powi(2);
        norm += w * w;
    }
    if norm == 0.0 { err.sqrt() } else { (err / norm).sqrt() }
}

/// RMS error of `got` against `want`, relative to the size of what was summed: the norm of all
/// contributions (divided by N for an average). Unlike the error relative to the result, it does
/// not blow up when a few values happen to cancel.
fn rel_to_inputs(got: &[f32], want: &[f64], inputs: &[Vec<f32>], op: ReduceOp) -> f64 {
    let err: f64 = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - w).powi(2)).sum();
    let mut scale: f64 = inputs.iter().flatten().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if op == ReduceOp::Average {
        scale /= inputs.len() as f64;
    }
    if scale == 0.0 { err.sqrt() } else { err.sqrt() / scale }
}

struct Case {
    len: usize,
    compression: Compression,
    op: ReduceOp,
}

/// Runs every case, in order, on one ring of `world` ranks and checks each against the
/// reference and across ranks.
fn check_cases(world: usize, cases: Vec<Case>) {
    let rt = runtime();
    let parts = LocalRing::build(world, 1, &net(), None).unwrap();
    let cases = std::sync::Arc::new(cases);
    let results = rt.block_on(on_ring(parts, |rank, mut g| {
        let cases = cases.clone();
        async move {
            let mut outs = Vec::new();
            for (i, c) in cases.iter().enumerate() {
                let mut buf = input(rank, c.len, i as u64);
                g.all_reduce(&mut buf, c.op, c.compression).await.unwrap_or_else(|e| {
                    panic!("rank {rank} case {i} (len {}, {}): {e}", c.len, c.compression)
                });
                outs.push(buf);
            }
            g.close().await;
            outs
        }
    }));
    for (i, c) in cases.iter().enumerate() {
        let ins = inputs(world, c.len, i as u64);
        let want = reference(&ins, c.op);
        let first = &results[0][i];
        for (rank, r) in results.iter().enumerate() {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(&r[i]) == bits(first), "rank {rank} differs from rank 0 in case {i}");
        }
        let tol = match c.compression {
            Compression::None => 1e-6,
            Compression::Bf16 => 1e-2,
            Compression::Int8 => 2e-2,
        };
        let err = rel_to_inputs(first, &want, &ins, c.op);
        assert!(
            err <= tol,
            "world {world} case {i} len {} {}: rel rms {err}",
            c.len,
            c.compression
        );
    }
}

fn matrix(world: usize) -> Vec<Case> {
    let mut cases = Vec::new();
    let lens = [0, 1, 2, world - 1, world, world + 1, 97, 16_411, 100_003];
    for len in lens {
        for compression in Compression::ALL {
            for op in [ReduceOp::Sum, ReduceOp::Average] {
                cases.push(Case { len, compression, op });
            }
        }
    }
    cases
}

#[test]
fn all_reduce_two_ranks() {
    check_cases(2, matrix(2));
}

#[test]
fn all_reduce_three_ranks() {
    check_cases(3, matrix(3));
}

#[test]
fn all_reduce_four_ranks() {
    check_cases(4, matrix(4));
}

#[test]
fn all_reduce_eight_ranks() {
    check_cases(8, matrix(8));
}

/// 64 MiB of f32 (16 Mi elements) in every compression mode.
fn sixty_four_mib(world: usize) {
    let len = 16 << 20;
    check_cases(
        world,
        Compression::ALL
            .into_iter()
            .map(|compression| Case { len, compression, op: ReduceOp::Sum })
            .collect(),
    );
}

#[test]
fn all_reduce_64_mib_two_ranks() {
    sixty_four_mib(2);
}

#[test]
fn all_reduce_64_mib_three_ranks() {
    sixty_four_mib(3);
}

#[test]
fn all_reduce_64_mib_four_ranks() {
    sixty_four_mib(4);
}

#[test]
fn all_reduce_64_mib_eight_ranks() {
    sixty_four_mib(8);
}

/// int8 on 8 ranks: the relative RMS error stays within 1 % on Gaussian-like data.
#[test]
fn int8_error_on_eight_ranks() {
    check_cases(
        8,
        vec![Case { len: 1 << 20, compression: Compression::Int8, op: ReduceOp::Average }],
    );
}

/// bf16 and f16 buffers: reduced in f32, delivered identically to every rank.
#[test]
fn half_precision_buffers() {
    let world = 3;
    let len = 10_007;
    let rt = runtime();
    let parts = LocalRing::build(world, 1, &net(), None).unwrap();
    let results = rt.block_on(on_ring(parts, move |rank, mut g| async move {
        let src = input(rank, len, 9);
        let mut b: Vec<bf16> = src.iter().map(|v| bf16::from_f32(*v)).collect();
        let mut h: Vec<f16> = src.iter().map(|v| f16::from_f32(*v)).collect();
        g.all_reduce(&mut b, ReduceOp::Sum, Compression::None).await.unwrap();
        g.all_reduce(&mut h, ReduceOp::Average, Compression::Int8).await.unwrap();
        g.close().await;
        (b, h)
    }));
    let src = inputs(world, len, 9);
    // Reference over the values as the ranks held them (rounded to each type).
    let want_b = reference(
        &src.iter()
            .map(|v| v.iter().map(|x| bf16::from_f32(*x).to_f32()).collect())
            .collect::<Vec<_>>(),
        ReduceOp::Sum,
    );
    let want_h = reference(
        &src.iter()
            .map(|v| v.iter().map(|x| f16::from_f32(*x).to_f32()).collect())
            .collect::<Vec<_>>(),
        ReduceOp::Average,
    );
    let as_f32 = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    let as_f32h = |v: &[f16]| v.iter().map(|x| Element::to_f32(*x)).collect::<Vec<_>>();
    for (b, h) in &results {
        assert_eq!(
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            results[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(
            h.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            results[0].1.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    assert!(rel_rms(&as_f32(&results[0].0), &want_b) < 1e-2);
    assert!(rel_rms(&as_f32h(&results[0].1), &want_h) < 2e-2);
}

#[test]
fn broadcast_and_barrier() {
    let world = 4;
    let rt = runtime();
    let parts = LocalRing::build(world, 3, &net(), None).unwrap();
    let results = rt.block_on(on_ring(parts, move |rank, mut g| async move {
        let mut outs = Vec::new();
        for (root, len) in [(0usize, 0usize), (1, 1), (2, 65_536 * 3 + 17), (3, 1_000_000)] {
            let mut buf = if rank == root {
                (0..len).map(|i| (i * 31 + root) as u8).collect()
            } else {
                vec![0xAA; len]
            };
            g.broadcast(&mut buf, root).await.unwrap();
            outs.push(buf);
        }
        g.barrier().await.unwrap();
        let bad = g.broadcast(&mut [0u8; 4], 9).await.unwrap_err();
        assert!(matches!(bad, OpError::Invalid(_)), "{bad}");
        g.barrier().await.unwrap();
        g.close().await;
        outs
    }));
    for outs in &results {
        for (i, (root, len)) in
            [(0usize, 0usize), (1, 1), (2, 65_536 * 3 + 17), (3, 1_000_000)].iter().enumerate()
        {
            let want: Vec<u8> = (0..*len).map(|j| (j * 31 + root) as u8).collect();
            assert_eq!(outs[i], want);
        }
    }
}

/// The same operations through the WAN decorator with the `transatlantic` preset (100 ms RTT,
/// 1 Gbit/s, 0.01 % loss).
#[test]
fn transatlantic_emulation() {
    let world = 4;
    let rt = runtime();
    let emulation = Emulation { condition: LinkPreset::Transatlantic.condition(), seed: 7 };
    let net = NetConfig { rtt: Duration::from_millis(100), ..net() };
    let parts = LocalRing::build(world, 1, &net, Some(emulation)).unwrap();
    let len = 1 << 20;
    let results = rt.block_on(on_ring(parts, move |rank, mut g| async move {
        let mut a = input(rank, len, 1);
        let mut b = input(rank, len, 2);
        let started = Instant::now();
        g.all_reduce(&mut a, ReduceOp::Sum, Compression::None).await.unwrap();
        let elapsed = started.elapsed();
        g.all_reduce(&mut b, ReduceOp::Average, Compression::Int8).await.unwrap();
        g.barrier().await.unwrap();
        let rtts = g.neighbour_rtts();
        g.close().await;
        (a, b, elapsed, rank, rtts)
    }));
    let want_a = reference(&inputs(world, len, 1), ReduceOp::Sum);
    let want_b = reference(&inputs(world, len, 2), ReduceOp::Average);
    for (a, b, elapsed, rank, rtts) in &results {
        assert_eq!(a, &results[0].0);
        assert_eq!(b, &results[0].1);
        // 2(N-1) = 6 one-way hops of 50 ms at the very least: the emulation is in the path.
        assert!(*elapsed >= Duration::from_millis(300), "{elapsed:?}");
        // QUIC measured the links to both neighbours, and no faster than the emulated 100 ms.
        let ranks: Vec<usize> = rtts.iter().map(|(r, _)| *r).collect();
        assert_eq!(ranks, [(rank + 1) % world, (rank + world - 1) % world], "{rtts:?}");
        for (_, rtt) in rtts {
            assert!(*rtt >= Duration::from_millis(95), "rank {rank}: {rtts:?}");
        }
        println!("rank {rank}: neighbour RTTs {rtts:?}");
    }
    assert!(rel_rms(&results[0].0, &want_a) < 1e-6);
    assert!(rel_rms(&results[0].1, &want_b) < 2e-2);
}

/// Every member's declared per-segment norms of `inputs` (times `scale[rank]`).
fn declared(inputs: &[Vec<f32>], scale: &[f64]) -> Bounds {
    let world = inputs.len();
    let segs = segments(world, inputs[0].len());
    let norms = inputs
        .iter()
        .zip(scale)
        .map(|(v, k)| {
            segs.iter()
                .map(|r| k * v[r.clone()].iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt())
                .collect()
        })
        .collect();
    Bounds { norms }
}

/// An honest ring never trips the hop checks, whatever the codec, length or world: every
/// partial sum is within what its contributors declared.
#[test]
fn bounded_all_reduce_passes_honest_rings() {
    let rt = runtime();
    for world in [2, 3, 5] {
        let parts = LocalRing::build(world, 1, &net(), None).unwrap();
        let results = rt.block_on(on_ring(parts, move |rank, mut g| async move {
            let mut outs = Vec::new();
            for (i, len) in [0usize, 1, world + 1, 16_411, 100_003].into_iter().enumerate() {
                for compression in Compression::ALL {
                    for op in [ReduceOp::Sum, ReduceOp::Average] {
                        let ins = inputs(world, len, i as u64);
                        let bounds = declared(&ins, &vec![1.0; world]);
                        let mut buf = ins[rank].clone();
                        g.all_reduce_bounded(&mut buf, op, compression, &bounds)
                            .await
                            .unwrap_or_else(|e| {
                                panic!("world {world} len {len} {compression}: {e}")
                            });
                        outs.push(buf);
                    }
                }
            }
            g.close().await;
            outs
        }));
        for r in &results[1..] {
            assert_eq!(r, &results[0], "world {world}: ranks disagree");
        }
    }
}

/// A member that sends ten times what it declared is caught by its successor, which names it;
/// every member fails and no buffer changes.
#[test]
fn a_member_sending_more_than_it_declared_is_named_by_its_successor() {
    let rt = runtime();
    let world = 4;
    let liar = 2;
    for compression in Compression::ALL {
        let parts = LocalRing::build(world, 1, &net(), None).unwrap();
        let len = 50_000;
        let ins = inputs(world, len, 7);
        let bounds = declared(&ins, &vec![1.0; world]);
        let results = rt.block_on(on_ring(parts, {
            let (ins, bounds) = (ins.clone(), bounds.clone());
            move |rank, mut g| {
                let (ins, bounds) = (ins.clone(), bounds.clone());
                async move {
                    let mut buf = ins[rank].clone();
                    if rank == liar {
                        // A sign flip ×10, declared as the honest contribution.
                        buf.iter_mut().for_each(|v| *v *= -10.0);
                    }
                    let before = buf.clone();
                    let r =
                        g.all_reduce_bounded(&mut buf, ReduceOp::Sum, compression, &bounds).await;
                    assert_eq!(buf, before, "rank {rank}: the buffer changed on failure");
                    r
                }
            }
        }));
        for (rank, r) in results.iter().enumerate() {
            let err = r.as_ref().expect_err("every rank fails");
            if rank == (liar + 1) % world {
                match err {
                    OpError::Exceeded { rank: named, peer, detail } => {
                        assert_eq!((*named, peer.as_str()), (liar, "rank-2"), "{detail}");
                        println!("{compression}: {err}");
                    }
                    other => panic!("{compression}: the liar's successor reported {other}"),
                }
            } else {
                assert!(
                    !matches!(err, OpError::Exceeded { .. }),
                    "{compression}: rank {rank} accused someone: {err}"
                );
            }
        }
    }
}

/// Bounds of the wrong shape are refused before anything is sent.
#[test]
fn malformed_bounds_are_refused() {
    let rt = runtime();
    let parts = LocalRing::build(2, 1, &net(), None).unwrap();
    let results = rt.block_on(on_ring(parts, |_, mut g| async move {
        let mut buf = vec![1.0f32; 10];
        let wrong = Bounds { norms: vec![vec![1.0; 2]] };
        let e1 = g.all_reduce_bounded(&mut buf, ReduceOp::Sum, Compression::None, &wrong).await;
        let nan = Bounds { norms: vec![vec![f64::NAN; 2]; 2] };
        let e2 = g.all_reduce_bounded(&mut buf, ReduceOp::Sum, Compression::None, &nan).await;
        (e1.unwrap_err(), e2.unwrap_err())
    }));
    for (e1, e2) in results {
        assert!(matches!(e1, OpError::Invalid(_)), "{e1}");
        assert!(matches!(e2, OpError::Invalid(_)), "{e2}");
    }
}
