#![allow(clippy::unwrap_used)]
//! A model trained by the worker goes home to PyTorch: a checkpoint written by the worker's own
//! code loads into PyTorch as it is (every parameter name and shape as `state_dict()` has it),
//! for the built-in models through their reference definitions in `examples/pytorch/`, for a
//! TorchScript run into the module it trained; and PyTorch computes the worker's loss on a
//! held-out batch. Needs the pinned torch environment (`scripts/setup-python.sh`, which
//! `scripts/test` runs and names in `LONGHAUL_PYTHON`).

use std::path::{Path, PathBuf};
use std::process::Command;

use collectives::Compression;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};
use worker::comm::{Solo, SoloPlan};
use worker::testing::{gpt_spec, python};
use worker::trainer::data::{Addition, Batch, Scoring};
use worker::trainer::model::{Arch, Input, ModelConfig};
use worker::trainer::{ModelSource, SyncMode, Trainer, checkpoint};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// A batch of `n` random feature samples of `shape` in `classes` classes.
fn features(rng_seed: i64, n: i64, shape: &[i64], classes: i64) -> Batch {
    tch::manual_seed(rng_seed);
    let mut dims = vec![n];
    dims.extend_from_slice(shape);
    Batch {
        inputs: Tensor::randn(dims.as_slice(), (Kind::Float, tch::Device::Cpu)),
        targets: Tensor::randint(classes, [n], (Kind::Int64, tch::Device::Cpu)),
        scoring: Scoring::ExactMatch,
        samples: n,
        tokens: n,
        spans: Vec::new(),
    }
}

/// Trains `model` for a few steps, writes a checkpoint with the worker's code, and has PyTorch
/// evaluate it on a held-out batch: the loss must be the worker's.
fn goes_home(
    what: &str,
    model: ModelSource,
    batch: &mut dyn FnMut() -> Batch,
    module: Option<&Path>,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = gpt_spec(SyncMode::Ddp, Compression::None, 2, 50);
    spec.model = model;
    let mut tr = Trainer::new(spec).unwrap();
    for _ in 0..5 {
        tr.forward_backward(&batch()).unwrap();
        tr.ddp_sync(&mut Solo, &mut SoloPlan).unwrap();
    }
    let meta = tr.checkpoint_meta(1, None);
    let step_dir = checkpoint::write(dir.path(), &tr.checkpoint_tensors(), meta, 2).unwrap().dir;
    let held = batch();
    let want = tr.evaluate(&held).unwrap().loss;
    let batch_file = dir.path().join("batch.safetensors");
    Tensor::write_safetensors(&[("inputs", &held.inputs), ("targets", &held.targets)], &batch_file)
        .unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(examples().join("pytorch/evaluate.py")).arg(&step_dir).arg(&batch_file);
    if let Some(m) = module {
        cmd.arg("--module").arg(m);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run python: {e}"));
    assert!(
        out.status.success(),
        "{what}: PyTorch could not load the checkpoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = report["loss"].as_f64().unwrap();
    let mut names: Vec<String> = report["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    names.sort();
    let mut ours = tr.state_dict_names();
    ours.sort();
    assert_eq!(names, ours, "{what}: PyTorch's state_dict names are the checkpoint's");
    println!("{what}: worker loss {want:.6}, PyTorch {got:.6}, {} tensors", names.len());
    assert!(
        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
        "{what}: PyTorch computes loss {got}, the worker {want}"
    );
}

#[test]
fn checkpoints_load_into_pytorch_and_give_the_workers_loss() {
    tch::set_num_threads(1);
    let task = Addition { digits: 2 };
    let seq_len = 3 * 2 + 3;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut tokens = || task.batch(&mut rng, 16, seq_len);
    let vocab = worker::trainer::data::ADDITION_VOCAB;
    let builtin = |arch, input| {
        ModelSource::Builtin(ModelConfig {
            arch,
            layers: 2,
            width: 32,
            heads: 4,
            context: seq_len as i64,
            outputs: match &input {
                Input::Tokens { vocab } => *vocab,
                Input::Features(_) => 5,
            },
            input,
        })
    };
    let gpt = builtin(Arch::Gpt, Input::Tokens { vocab });
    goes_home("gpt", gpt, &mut tokens, None);
    goes_home("mlp on tokens", builtin(Arch::Mlp, Input::Tokens { vocab }), &mut tokens, None);
    let conv = builtin(Arch::Convnet, Input::Tokens { vocab });
    goes_home("convnet on tokens", conv, &mut tokens, None);
    let mut seed = 0;
    let mut flat = || {
        seed += 1;
        features(seed, 16, &[12], 5)
    };
    goes_home("mlp on features", builtin(Arch::Mlp, Input::Features(vec![12])), &mut flat, None);
    let mut images = || {
        seed += 1;
        features(seed, 8, &[3, 8, 8], 5)
    };
    let conv = builtin(Arch::Convnet, Input::Features(vec![3, 8, 8]));
    goes_home("convnet on images", conv, &mut images, None);

    // A TorchScript module with nested, dotted parameter names (`mlp.0.weight`): the checkpoint
    // names them as the module does, not as tch's VarStore stores them (`mlp_0_weight`).
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("tiny.pt");
    let status = Command::new(python())
        .arg(examples().join("torchscript/export.py"))
        .arg(&module)
        .args(["--vocab", "14", "--context", "9"])
        .status()
        .unwrap();
    assert!(status.success(), "export.py failed: {status}");
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut tokens = || task.batch(&mut rng, 16, seq_len);
    let scripted = ModelSource::TorchScript(module.clone());
    goes_home("torchscript", scripted, &mut tokens, Some(&module));
}

/// The end to end case: real `longhaul-worker` processes train a run against a coordinator,
/// `longhaul checkpoint fetch` brings the final checkpoint home through the coordinator (a
/// damaged copy is refused, the other taken), and it loads into PyTorch's reference model,
/// which computes on the held-out sums the loss the worker logged for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_real_workers_evaluates_in_pytorch_to_their_held_out_loss() {
    use worker::testing::cluster::{Coordinator, Worker, dump, run_file};
    let bin = Path::new(env!("CARGO_BIN_EXE_longhaul-worker"));
    let tmp = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(&tmp.path().join("coordinator")).await;
    let token = c.token().await;
    let ws: Vec<Worker> = (1..=2)
        .map(|i| Worker::spawn(bin, tmp.path(), &format!("w{i}"), &c, &token, &[]))
        .collect();
    c.wait_workers(2, std::time::Duration::from_secs(120)).await;
    let run = c.submit(&run_file(2, 2, 150, "mode = \"ddp\"\ncompression = \"none\"")).await;
    let done = c
        .wait_run(run, std::time::Duration::from_secs(300), "the run to end", |r| {
            r.state != proto::pb::RunState::Running as i32
                && r.state != proto::pb::RunState::Pending as i32
        })
        .await;
    let all: Vec<&Worker> = ws.iter().collect();
    if done.state != proto::pb::RunState::Completed as i32 {
        dump(&all);
        panic!("the run ended {}: {}", done.state, done.message);
    }
    let w = &ws[0];
    assert!(w.wait_final_hash(std::time::Duration::from_secs(30)).is_some(), "w1 did not finish");
    // `held-out evaluation run=1 loss=0.0123… accuracy=…` (the f64 as tracing prints it:
    // every digit needed to read it back exactly).
    let text = w.log_text();
    let line =
        text.lines().rev().find(|l| l.contains("held-out evaluation")).unwrap_or_else(|| {
            dump(&all);
            panic!("w1 logged no held-out evaluation")
        });
    let logged: f64 = line
        .split("loss=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no loss in {line:?}"));
    // The model goes home through the coordinator: `longhaul checkpoint fetch` copies the
    // newest checkpoint both members reported alike from one of them, checked byte by byte.
    let home = tmp.path().join("coordinator");
    // (The coordinator serves from this runtime: the CLI's wait must not hold a thread of it.)
    let fetch = |to: &Path| {
        tokio::task::block_in_place(|| {
            Command::new(bin.with_file_name("longhaul"))
                .args(["checkpoint", "fetch", &run.to_string(), "--output", "json", "--to"])
                .arg(to)
                .env("LONGHAUL_HOME", &home)
                .env("LONGHAUL_COORDINATOR", &c.url)
                .output()
                .unwrap()
        })
    };
    let step_dir = tmp.path().join("home/model");
    let out = fetch(&step_dir);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "checkpoint fetch: {stderr}");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["step"], 150, "{got}");
    assert_eq!((got["agreeing"].as_u64(), got["members"].as_u64()), (Some(2), Some(2)), "{got}");
    let model = std::fs::read(step_dir.join("model.safetensors")).unwrap();
    // What the workers hold: both replicas wrote the same bytes, and those came home.
    let copies: Vec<PathBuf> = ws
        .iter()
        .map(|w| checkpoint::step_dir(&checkpoint::root(&w.state, &c.cfg.ca_pin), run, 150))
        .collect();
    for dir in &copies {
        assert!(
            std::fs::read(dir.join("model.safetensors")).unwrap() == model,
            "{}",
            dir.display()
        );
    }
    for f in ["meta.json", "optimizer.safetensors"] {
        assert!(step_dir.join(f).is_file(), "{f} did not come home");
    }
    // A second fetch does not overwrite what is there.
    let again = fetch(&step_dir);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not an empty directory"));
    // A holder whose copy is damaged (or lies) is refused and the other's is taken; with every
    // copy damaged, the fetch fails and leaves nothing behind.
    let damage = |dir: &Path| {
        let p = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&p, bytes).unwrap();
    };
    damage(&copies[0]);
    let second = tmp.path().join("home/second");
    let out = fetch(&second);
    assert!(
        out.status.success(),
        "fetch with one damaged copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(second.join("model.safetensors")).unwrap() == model);
    damage(&copies[1]);
    let third = tmp.path().join("home/third");
    let out = fetch(&third);
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && why.contains("no holder sent a good copy"), "{why}");
    assert!(why.contains("majority"), "the reason names the digest that failed: {why}");
    assert!(!third.exists() && std::fs::read_dir(tmp.path().join("home")).unwrap().count() == 2);
    // The same held-out sums the worker evaluated (the run file's 2 digits, seq_len 10).
    let format =
        worker::trainer::plan::ShardFormat::Addition { digits: 2, samples_per_shard: 2048 };
    let held = worker::trainer::plan::holdout(format, 10, 512).unwrap();
    let batch_file = tmp.path().join("held-out.safetensors");
    Tensor::write_safetensors(&[("inputs", &held.inputs), ("targets", &held.targets)], &batch_file)
        .unwrap();
    let out = Command::new(python())
        .arg(examples().join("pytorch/evaluate.py"))
        .arg(&step_dir)
        .arg(&batch_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "evaluate.py: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = report["loss"].as_f64().unwrap();
    println!("held-out loss: worker {logged:.6}, PyTorch on its checkpoint {got:.6}");
    assert!(
        (got - logged).abs() <= 1e-4 * logged.abs().max(1.0),
        "PyTorch computes {got} on the checkpoint of step 150, the worker logged {logged}"
    );
    drop(ws);
    c.stop().await;
}
