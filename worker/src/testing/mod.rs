//! Small specs and loopback rings for tests, benches and examples, and a whole cluster of
//! processes ([`cluster`]).

pub mod browser;
pub mod cluster;

use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use collectives::group::Emulation;
use collectives::testing::LocalRing;
use collectives::{Compression, NetConfig};
use tch::Device;

use crate::comm::RingComm;
use crate::schedule::{Decay, LrSchedule};
use crate::trainer::model::{Arch, Input, ModelConfig};
use crate::trainer::optim::{OptimConfig, OptimKind};
use crate::trainer::{
    Agreement, Commitment, Coordinate, ModelSource, Plan, SyncMode, TrainError, TrainSpec,
};

/// The pinned torch environment's python (`LONGHAUL_PYTHON`, which `scripts/test` sets, or
/// where `scripts/setup-python.sh` creates it).
pub fn python() -> std::path::PathBuf {
    std::env::var_os("LONGHAUL_PYTHON").map(std::path::PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_default();
        std::path::PathBuf::from(home).join(".cache/longhaul/venv-torch-2.11.0/bin/python")
    })
}

/// A small gpt on the synthetic addition task with `digits` digits.
pub fn gpt_spec(sync: SyncMode, compression: Compression, digits: u32, steps: u64) -> TrainSpec {
    let seq_len = 3 * digits as usize + 3;
    TrainSpec {
        model: ModelSource::Builtin(ModelConfig {
            arch: Arch::Gpt,
            layers: 2,
            width: 64,
            heads: 4,
            context: seq_len as i64,
            outputs: crate::trainer::data::ADDITION_VOCAB,
            input: Input::Tokens { vocab: crate::trainer::data::ADDITION_VOCAB },
        }),
        optim: OptimConfig {
            kind: OptimKind::AdamW,
            weight_decay: 0.01,
            betas: (0.9, 0.98),
            eps: 1e-8,
            momentum: 0.9,
        },
        schedule: LrSchedule {
            decay: Decay::Cosine,
            peak: 3e-3,
            floor: 3e-4,
            warmup: 20,
            total: steps,
        },
        grad_clip: 1.0,
        seed: 7,
        batch_size: 32,
        seq_len,
        sync,
        compression,
        device: Device::Cpu,
        bucket_elems: 1 << 20,
    }
}

/// A ring of `world` members on loopback, formed on `rt`.
pub fn ring(
    rt: &tokio::runtime::Runtime,
    world: usize,
    emulation: Option<Emulation>,
) -> anyhow::Result<Vec<RingComm>> {
    let parts = LocalRing::build(world, 1, &NetConfig::default(), emulation)?;
    let joins: Vec<_> = parts.into_iter().map(|p| rt.spawn(p.join())).collect();
    let mut out = Vec::new();
    for j in joins {
        out.push(RingComm::new(rt.block_on(j)??, rt.handle().clone()));
    }
    Ok(out)
}

/// Runs `f(rank, item)` on one OS thread per item and collects the results in rank order.
pub fn per_rank<T: Send, R: Send>(items: Vec<T>, f: impl Fn(usize, T) -> R + Sync) -> Vec<R> {
    let f = &f;
    thread::scope(|s| {
        let handles: Vec<_> =
            items.into_iter().enumerate().map(|(r, t)| s.spawn(move || f(r, t))).collect();
        handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
    })
}

/// What the ranks of an in-process ring share to plan their syncs.
#[derive(Debug, Default)]
struct Round {
    generation: u64,
    commits: Vec<Option<Commitment>>,
    last: Option<Plan>,
}

/// The coordinator's planning, in-process, for a ring of threads (tests and benches without a
/// coordinator): each rank's [`Coordinate::plan`] waits until every rank committed, and every
/// rank gets the plan the coordinator would compute (`coordinator::cluster::aggregate`).
#[derive(Debug, Clone)]
pub struct LocalPlans {
    shared: Arc<(Mutex<Round>, Condvar)>,
    rank: usize,
    world: usize,
    /// Ranks whose contribution counts (all, unless a test says otherwise).
    pub contributors: Vec<usize>,
}

/// One planner per rank of a ring of `world`.
pub fn local_plans(world: usize) -> Vec<LocalPlans> {
    let shared = Arc::new((
        Mutex::new(Round { commits: vec![None; world], ..Round::default() }),
        Condvar::new(),
    ));
    (0..world)
        .map(|rank| LocalPlans {
            shared: shared.clone(),
            rank,
            world,
            contributors: (0..world).collect(),
        })
        .collect()
}

/// The agreement of a fresh ring: everyone starts from the seed.
pub fn fresh_agreement(world: usize) -> Agreement {
    Agreement {
        step: 0,
        hash: None,
        source: 0,
        receivers: Vec::new(),
        contributors: (0..world).collect(),
    }
}

impl Coordinate for LocalPlans {
    fn plan(&mut self, c: &Commitment) -> Result<Plan, TrainError> {
        let (lock, cv) = &*self.shared;
        let mut round = lock.lock().unwrap_or_else(|p| p.into_inner());
        let generation = round.generation;
        round.commits[self.rank] = Some(c.clone());
        if round.commits.iter().all(Option::is_some) {
            let commits: Vec<Commitment> = round
                .commits
                .iter_mut()
                .map(|c| {
                    c.take().unwrap_or_else(|| {
                        Commitment::of(0, &[], 1, proto::ParamHash(0), Vec::new(), 0)
                    })
                })
                .collect();
            let for_plan: Vec<coordinator::cluster::aggregate::Commitment> = commits
                .iter()
                .enumerate()
                .map(|(r, c)| coordinator::cluster::aggregate::Commitment {
                    contributes: self.contributors.contains(&r),
                    segment_norms: c.segment_norms.clone(),
                })
                .collect();
            let p = coordinator::cluster::aggregate::plan(self.world, &for_plan);
            // A member whose own commitment is evidence is banned by the coordinator; here it is
            // left out (its declared norms count as zero).
            let guilty: Vec<usize> = p.evidence().map(|(r, _)| r).collect();
            let declared = commits
                .iter()
                .enumerate()
                .flat_map(|(r, c)| {
                    let zero = guilty.contains(&r);
                    c.segment_norms.iter().map(move |n| if zero { 0.0 } else { *n })
                })
                .collect();
            let plan = Plan { step: c.step, coefficients: p.coefficients, declared };
            round.last = Some(plan.clone());
            round.generation += 1;
            cv.notify_all();
            return Ok(plan);
        }
        let (round, timeout) = cv
            .wait_timeout_while(round, Duration::from_secs(300), |r| r.generation == generation)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() {
            return Err(TrainError::NoPlan("the other ranks did not commit".into()));
        }
        round.last.clone().ok_or_else(|| TrainError::NoPlan("no plan".into()))
    }
}
