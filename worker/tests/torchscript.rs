#![allow(clippy::unwrap_used)]
//! A TorchScript module exported by `examples/torchscript/export.py` trains in the worker and
//! its loss falls. Needs the pinned torch environment (`scripts/setup-python.sh`, which
//! `scripts/test` runs and names in `LONGHAUL_PYTHON`).

use std::path::PathBuf;
use std::process::Command;

use collectives::Compression;
use rand::SeedableRng;
use worker::comm::{Solo, SoloPlan};
use worker::testing::{gpt_spec, python};
use worker::trainer::data::Addition;
use worker::trainer::{ModelSource, SyncMode, Trainer};

#[test]
fn an_exported_torchscript_module_trains_and_its_loss_falls() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.pt");
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/torchscript/export.py");
    let py = python();
    let status = Command::new(&py)
        .arg(&script)
        .arg(&out)
        .args(["--vocab", "14", "--context", "9"])
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run {}: {e} (run scripts/setup-python.sh)", py.display())
        });
    assert!(status.success(), "export.py failed: {status}");

    let mut spec = gpt_spec(SyncMode::Ddp, Compression::None, 2, 200);
    spec.model = ModelSource::TorchScript(out);
    let task = Addition { digits: 2 };
    let mut tr = Trainer::new(spec.clone()).unwrap();
    assert!(tr.numel() > 1000, "the module's parameters are trainable: {}", tr.numel());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut losses = Vec::new();
    for _ in 0..200 {
        let b = task.batch(&mut rng, spec.batch_size, spec.seq_len);
        losses.push(tr.forward_backward(&b).unwrap().loss);
        tr.ddp_sync(&mut Solo, &mut SoloPlan).unwrap();
    }
    let first: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = losses[190..].iter().sum::<f64>() / 10.0;
    println!("torchscript: loss {first:.3} -> {last:.3}");
    assert!(last < 0.6 * first, "loss must fall: {first:.3} -> {last:.3}");

    // A module file that is not TorchScript is a clear error, not a crash.
    let bad = dir.path().join("bad.pt");
    std::fs::write(&bad, b"not a module").unwrap();
    spec.model = ModelSource::TorchScript(bad);
    let err = Trainer::new(spec).unwrap_err().to_string();
    assert!(err.contains("cannot load TorchScript module"), "{err}");
}
