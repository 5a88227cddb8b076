#![allow(clippy::unwrap_used)]
//! The trainer with real libtorch on the CPU and a real QUIC ring on loopback.

use collectives::Compression;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::Tensor;
use worker::comm::{Comm, Solo, SoloPlan};
use worker::testing::{LocalPlans, fresh_agreement, gpt_spec, local_plans, per_rank, ring};
use worker::trainer::data::{Addition, Batch};
use worker::trainer::state::flatten;
use worker::trainer::{SyncMode, Trainer};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn batch(task: Addition, rank: usize, step: u64, n: usize, seq_len: usize) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(1000 * step + rank as u64);
    task.batch(&mut rng, n, seq_len)
}

fn params(t: &Trainer) -> Vec<f32> {
    Vec::<f32>::try_from(flatten(t.params())).unwrap()
}

/// Three workers in ddp produce, step for step, the parameters of one process training on the
/// union of their batches, and bitwise-identical parameters among themselves.
#[test]
fn ddp_matches_one_process_on_the_union_of_batches() {
    tch::set_num_threads(1);
    let steps = 6;
    let spec = gpt_spec(SyncMode::Ddp, Compression::None, 2, steps);
    let task = Addition { digits: 2 };
    let (n, t) = (spec.batch_size, spec.seq_len);
    let rt = runtime();
    let comms = ring(&rt, 3, None).unwrap();
    let trainers: Vec<Trainer> = (0..3).map(|_| Trainer::new(spec.clone()).unwrap()).collect();
    let mut reference = Trainer::new(spec.clone()).unwrap();
    assert_eq!(params(&reference), params(&trainers[0]), "same seed, same initial bits");

    let per_step: Vec<Vec<(Vec<f32>, proto::ParamHash)>> = per_rank(
        trainers.into_iter().zip(comms).zip(local_plans(3)).collect(),
        |rank, ((mut tr, mut comm), mut plans)| {
            let mut out = Vec::new();
            for step in 0..steps {
                tr.forward_backward(&batch(task, rank, step, n, t)).unwrap();
                tr.ddp_sync(&mut comm, &mut plans).unwrap();
                out.push((params(&tr), tr.hash()));
            }
            assert!(comm.traffic().bytes_sent > 0);
            comm.close();
            out
        },
    );

    for step in 0..steps as usize {
        let union: Vec<Batch> = (0..3).map(|r| batch(task, r, step as u64, n, t)).collect();
        reference.forward_backward(&Batch::cat(&union)).unwrap();
        reference.apply_local().unwrap();
        let want = params(&reference);
        for rank in 0..3 {
            let (got, hash) = &per_step[rank][step];
            assert_eq!(got, &per_step[0][step].0, "rank {rank} differs from rank 0 at {step}");
            assert_eq!(*hash, per_step[0][step].1);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-5, "step {step} rank {rank}: max |diff| {worst}");
        }
        let moved = want.iter().zip(&per_step[0][0].0).any(|(a, b)| a != b) || step == 0;
        assert!(moved, "parameters must change step to step");
    }
}

/// diloco with int8 pseudo-gradients reaches the synthetic task's target accuracy.
#[test]
fn diloco_reaches_the_target_accuracy_on_addition() {
    tch::set_num_threads(1);
    let steps = 800;
    let sync = SyncMode::Diloco { inner_steps: 20, outer_lr: 0.7, outer_momentum: 0.9 };
    let spec = gpt_spec(sync, Compression::Int8, 2, steps);
    let task = Addition { digits: 2 };
    let (n, t) = (spec.batch_size, spec.seq_len);
    let rt = runtime();
    let comms = ring(&rt, 3, None).unwrap();
    let trainers: Vec<Trainer> = (0..3).map(|_| Trainer::new(spec.clone()).unwrap()).collect();
    let results = per_rank(
        trainers.into_iter().zip(comms).zip(local_plans(3)).collect(),
        |rank, ((mut tr, mut comm), mut plans)| {
            tr.agree(&mut comm, &fresh_agreement(3)).unwrap();
            for step in 0..steps {
                tr.forward_backward(&batch(task, rank, step, n, t)).unwrap();
                tr.apply_local().unwrap();
                if tr.diloco_due() {
                    tr.diloco_sync(&mut comm, &mut plans).unwrap();
                    assert!((tr.last_coefficient() - 1.0 / 3.0).abs() < 1e-6, "equal shares");
                }
            }
            comm.close();
            let held_out = batch(task, 99, 99_999, 512, t);
            let eval = tr.evaluate(&held_out).unwrap();
            (tr.hash(), eval.correct as f64 / eval.counted as f64, eval.loss, params(&tr))
        },
    );
    let (hash, acc, loss, p) = &results[0];
    println!("diloco: exact-match accuracy {acc:.3}, loss {loss:.4}, hash {hash}");
    for r in &results[1..] {
        assert_eq!(r.0, *hash, "replicas must agree after the last sync");
        assert_eq!(&r.3, p);
    }
    assert!(*acc >= 0.9, "accuracy {acc} below the 0.9 target");
}

/// The single-member path: a trainer with `Solo` comm behaves like a local trainer.
#[test]
fn solo_sync_is_a_local_step() {
    tch::set_num_threads(1);
    let spec = gpt_spec(SyncMode::Ddp, Compression::None, 2, 10);
    let task = Addition { digits: 2 };
    let mut a = Trainer::new(spec.clone()).unwrap();
    let mut b = Trainer::new(spec.clone()).unwrap();
    let x = batch(task, 0, 0, spec.batch_size, spec.seq_len);
    a.forward_backward(&x).unwrap();
    a.ddp_sync(&mut Solo, &mut SoloPlan).unwrap();
    b.forward_backward(&x).unwrap();
    b.apply_local().unwrap();
    assert_eq!(params(&a), params(&b));
    let _ = Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
}

/// A checkpoint restores the replica bit for bit, and training resumed from it continues the
/// same loss curve; a damaged newest checkpoint or a half-written one is skipped.
#[test]
fn checkpoints_round_trip_bitwise_and_resume_continues_the_loss_curve() {
    use worker::trainer::checkpoint;
    tch::set_num_threads(1);
    for sync in
        [SyncMode::Ddp, SyncMode::Diloco { inner_steps: 5, outer_lr: 0.7, outer_momentum: 0.9 }]
    {
        let dir = tempfile::tempdir().unwrap();
        let spec = gpt_spec(sync, Compression::None, 2, 20);
        let task = Addition { digits: 2 };
        let (n, t) = (spec.batch_size, spec.seq_len);
        let train = |tr: &mut Trainer, step: u64| {
            let loss = tr.forward_backward(&batch(task, 0, step, n, t)).unwrap().loss;
            match sync {
                SyncMode::Ddp => tr.ddp_sync(&mut Solo, &mut SoloPlan).unwrap(),
                SyncMode::Diloco { .. } => {
                    tr.apply_local().unwrap();
                    if tr.diloco_due() {
                        tr.diloco_sync(&mut Solo, &mut SoloPlan).unwrap();
                    }
                }
            }
            loss
        };
        let mut a = Trainer::new(spec.clone()).unwrap();
        for step in 0..10 {
            train(&mut a, step);
        }
        assert_eq!(a.sync_step(), 10);
        let cursor = checkpoint::Cursor { shard: 3, data_epoch: 1, next: 320 };
        let meta = a.checkpoint_meta(42, Some(cursor.clone()));
        checkpoint::write(dir.path(), &a.checkpoint_tensors(), meta, 2).unwrap();
        let saved_blob = a.state_blob();
        let saved_params = params(&a);
        let curve_a: Vec<f64> = (10..20).map(|s| train(&mut a, s)).collect();

        let (_, tensors, meta) = checkpoint::latest(dir.path(), 42).unwrap();
        assert_eq!(meta.cursor, Some(cursor));
        let mut b = Trainer::new(spec.clone()).unwrap();
        b.restore(&tensors, &meta).unwrap();
        assert_eq!(params(&b), saved_params, "{sync:?}: parameters restored bit for bit");
        assert_eq!(b.state_blob(), saved_blob, "{sync:?}: optimizer and outer state too");
        let curve_b: Vec<f64> = (10..20).map(|s| train(&mut b, s)).collect();
        assert_eq!(curve_a, curve_b, "{sync:?}: the resumed run continues the same loss curve");

        // A newer checkpoint whose file is damaged, and a half-written one, are both skipped.
        let meta = a.checkpoint_meta(42, None);
        let newest = checkpoint::write(dir.path(), &a.checkpoint_tensors(), meta, 5).unwrap().dir;
        std::fs::write(newest.join("model.safetensors"), b"torn").unwrap();
        let run_dir = dir.path().join("run-42");
        std::fs::create_dir(run_dir.join("step-00000099.tmp-1")).unwrap();
        let (path, _, meta) = checkpoint::latest(dir.path(), 42).unwrap();
        assert_eq!(meta.step, 10, "fell back past the damaged one to {}", path.display());
    }
}

/// A member whose contribution is broken or a lie never changes anyone's parameters:
/// - NaN, declared as such: its commitment is evidence (the coordinator bans it; here the plan
///   leaves it out), it sends zeros, the others' sum is applied;
/// - ×1e30, declared truthfully: left out as an outlier;
/// - zeros (a lazy worker): left out;
/// - ×−999 (ddp) or ×1e30 (diloco) after declaring the honest norms: its successor catches the
///   partial sum that exceeds the declaration, names it, and the sync fails on every member with
///   nothing applied.
///
/// In every case the replicas stay finite and bitwise identical.
#[test]
fn broken_or_lying_contributions_never_reach_the_parameters() {
    use worker::trainer::{Poison, PoisonKind, TrainError};
    tch::set_num_threads(1);
    let diloco = SyncMode::Diloco { inner_steps: 2, outer_lr: 0.7, outer_momentum: 0.9 };
    let cases = [
        (PoisonKind::Nan, SyncMode::Ddp, Compression::None),
        (PoisonKind::Huge, diloco, Compression::Int8),
        (PoisonKind::Zero, SyncMode::Ddp, Compression::Bf16),
        (PoisonKind::Lie(-999.0), SyncMode::Ddp, Compression::None),
        (PoisonKind::Lie(-999.0), SyncMode::Ddp, Compression::Int8),
        (PoisonKind::Lie(1e30), diloco, Compression::Int8),
        (PoisonKind::Lie(1e30), diloco, Compression::None),
    ];
    for (kind, sync, compression) in cases {
        let spec = gpt_spec(sync, compression, 2, 10);
        let task = Addition { digits: 2 };
        let rt = runtime();
        let comms = ring(&rt, 3, None).unwrap();
        let liar = 2;
        let trainers: Vec<Trainer> = (0..3)
            .map(|r| {
                let mut t = Trainer::new(spec.clone()).unwrap();
                if r == liar {
                    t.set_poison(Some(Poison { after_step: 0, kind }));
                }
                t
            })
            .collect();
        let results = per_rank(
            trainers.into_iter().zip(comms).zip(local_plans(3)).collect(),
            |rank, ((mut tr, mut comm), mut plans): ((Trainer, _), LocalPlans)| {
                tr.agree(&mut comm, &fresh_agreement(3)).unwrap();
                let before = tr.hash();
                let mut outcome = Ok(());
                let mut coefficients = Vec::new();
                for step in 0..4 {
                    tr.forward_backward(&batch(task, rank, step, 8, spec.seq_len)).unwrap();
                    let r = match sync {
                        SyncMode::Ddp => tr.ddp_sync(&mut comm, &mut plans),
                        SyncMode::Diloco { .. } => {
                            tr.apply_local().unwrap();
                            if !tr.diloco_due() {
                                continue;
                            }
                            tr.diloco_sync(&mut comm, &mut plans)
                        }
                    };
                    coefficients.push(tr.last_coefficient());
                    if r.is_err() {
                        outcome = r;
                        break;
                    }
                }
                comm.close();
                (tr.hash(), params(&tr), outcome, before, coefficients)
            },
        );
        let label = format!("{kind:?} {sync:?} {compression:?}");
        for (rank, (hash, p, outcome, before, coefficients)) in results.iter().enumerate() {
            assert_eq!(*hash, results[0].0, "{label}: replicas differ");
            assert!(p.iter().all(|v| v.is_finite()), "{label}: non-finite parameters");
            match kind {
                PoisonKind::Lie(_) => {
                    // The first sync fails everywhere, nothing applied.
                    assert_eq!(hash, before, "{label}: rank {rank} applied a lie");
                    let err = outcome.as_ref().expect_err("the lie fails the sync");
                    if rank == (liar + 1) % 3 {
                        let named = matches!(err, TrainError::Comm(collectives::OpError::Exceeded { rank: r, .. }) if *r == liar);
                        assert!(named, "{label}: the liar's successor said {err}");
                    }
                }
                _ => {
                    assert!(outcome.is_ok(), "{label}: {outcome:?}");
                    assert_ne!(hash, before, "{label}: the honest sum is applied");
                    if rank == liar {
                        assert!(
                            coefficients.iter().all(|c| *c == 0.0),
                            "{label}: {coefficients:?}"
                        );
                    } else {
                        assert!(
                            coefficients.iter().all(|c| (*c - 0.5).abs() < 1e-6),
                            "{label}: {coefficients:?}"
                        );
                    }
                }
            }
        }
        println!("{label}: held");
    }
}
