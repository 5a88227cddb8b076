//! What a commitment costs: `Commitment::of` (segment norms, the norm and the SHA-256 digest of
//! the contribution) per sync, for contributions of several sizes, on this machine.
//!
//! `cargo bench -p worker --bench commitment`

use std::time::Instant;

use proto::ParamHash;
use worker::trainer::Commitment;

fn main() {
    for params in [100_000usize, 3_300_000, 25_000_000] {
        let contribution: Vec<f32> = (0..params).map(|i| (i as f32).sin()).collect();
        let reps = (200_000_000 / params).clamp(3, 200);
        let started = Instant::now();
        let mut digest = [0u8; 32];
        for _ in 0..reps {
            let c = Commitment::of(1, &contribution, 4, ParamHash(1), Vec::new(), 0);
            digest[0] ^= c.digest[0];
        }
        let per = started.elapsed() / reps as u32;
        let mb = (params * 4) as f64 / 1e6;
        println!(
            "commitment of {params:>10} f32 ({mb:7.1} MB): {:8.2} ms per sync, {:6.0} MB/s (digest byte {})",
            per.as_secs_f64() * 1e3,
            mb / per.as_secs_f64(),
            digest[0]
        );
    }
}
