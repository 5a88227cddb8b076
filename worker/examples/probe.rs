use collectives::Compression;
use rand::SeedableRng;
use worker::comm::Solo;
use worker::testing::gpt_spec;
use worker::trainer::data::Addition;
use worker::trainer::{SyncMode, Trainer};
fn main() {
    tch::set_num_threads(1);
    let a: Vec<String> = std::env::args().collect();
    let steps: u64 = a[1].parse().unwrap();
    let lr: f64 = a[2].parse().unwrap();
    let mut spec = gpt_spec(SyncMode::Ddp, Compression::None, 2, steps);
    spec.schedule.peak = lr;
    spec.schedule.floor = lr / 10.0;
    let task = Addition { digits: 2 };
    let mut tr = Trainer::new(spec.clone()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let t0 = std::time::Instant::now();
    for s in 0..steps {
        let b = task.batch(&mut rng, spec.batch_size, spec.seq_len);
        tr.forward_backward(&b).unwrap();
        tr.ddp_sync(&mut Solo, 1.0).unwrap();
        if s % 100 == 99 {
            let e = tr.evaluate(&task.batch(&mut rng, 512, spec.seq_len)).unwrap();
            println!("{s} loss {:.3} acc {:.3} {:?}", e.loss, e.correct as f64 / e.counted as f64, t0.elapsed());
        }
    }
}
