#![allow(clippy::unwrap_used)]
//! Datasets with bytes: the coordinator serves the shards over HTTPS (mutual TLS), workers
//! fetch them, check their SHA-256, cache them by content, and train on them. Real processes
//! on loopback.

use std::path::Path;
use std::time::Duration;

use proto::pb::RunState;
use sha2::Digest;
use tch::{Kind, Tensor};
use worker::testing::cluster::{Coordinator, Worker, run_file};

fn sha256(bytes: &[u8]) -> String {
    client::pki::hex(&sha2::Sha256::digest(bytes))
}

/// Trains `toml` on 2 workers to completion; returns the run's final info and the workers.
async fn train(dir: &Path, toml: String) -> (proto::pb::RunInfo, Vec<Worker>) {
    let mut c = Coordinator::start(&dir.join("coordinator")).await;
    let token = c.token().await;
    let run = c.submit(&toml).await;
    let bin = Path::new(env!("CARGO_BIN_EXE_longhaul-worker"));
    let w: Vec<Worker> =
        (1..=2).map(|i| Worker::spawn(bin, dir, &format!("w{i}"), &c, &token, &[])).collect();
    let r = c
        .wait_run(run, Duration::from_secs(180), "the run to end", |r| {
            r.state != RunState::Running as i32 && r.state != RunState::Pending as i32
        })
        .await;
    if r.state != RunState::Completed as i32 {
        worker::testing::cluster::dump(&w.iter().collect::<Vec<_>>());
        panic!("run ended {}: {}", r.state, r.message);
    }
    for x in &w {
        assert_eq!(x.wait_final_hash(Duration::from_secs(20)).as_deref(), Some(&*r.committed_hash));
    }
    c.stop().await;
    (r, w)
}

fn dataset(toml: &str, table: &str) -> String {
    let (head, rest) = toml.split_once("[dataset]\n").unwrap();
    let (_, tail) = rest.split_once("[optimizer]").unwrap();
    format!("{head}[dataset]\n{table}\n[optimizer]{tail}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_file_is_fetched_verified_cached_and_learned() {
    let dir = tempfile::tempdir().unwrap();
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(400);
    let path = dir.path().join("book.txt");
    std::fs::write(&path, &text).unwrap();
    let toml = run_file(2, 2, 150, "mode = \"ddp\"\ncompression = \"none\"")
        .replace("seq_len = 10", "seq_len = 32")
        .replace("batch_size = 32", "batch_size = 8");
    let toml = dataset(&toml, &format!("format = \"text\"\nuri = \"{}\"", path.display()));
    let (r, w) = train(dir.path(), toml).await;
    // A byte-level model starts near ln(256) = 5.5 and learns the repeated sentence.
    let loss = r.loss.unwrap();
    assert!(loss < 2.5, "final loss {loss}");
    for x in &w {
        let cached = x.state.join("shards").join(sha256(text.as_bytes()));
        assert_eq!(std::fs::read(&cached).unwrap(), text.as_bytes(), "{}", x.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safetensors_shards_train_an_mlp_to_high_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let mut shards = Vec::new();
    for i in 0..2 {
        // 8 features; the class is whether their sum is positive.
        tch::manual_seed(100 + i);
        let inputs = Tensor::randn([512, 8], (Kind::Float, tch::Device::Cpu));
        let targets = inputs.sum_dim_intlist(1, false, Kind::Float).gt(0.0).to_kind(Kind::Int64);
        let path = dir.path().join(format!("shard-{i}.safetensors"));
        Tensor::write_safetensors(&[("inputs", &inputs), ("targets", &targets)], &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        shards.push(serde_json::json!({
            "uri": format!("file://{}", path.display()),
            "size": bytes.len(),
            "sha256": sha256(&bytes),
        }));
    }
    let manifest = dir.path().join("manifest.json");
    std::fs::write(&manifest, serde_json::json!({ "shards": shards }).to_string()).unwrap();
    let toml = run_file(2, 2, 200, "mode = \"ddp\"\ncompression = \"none\"")
        .replace(
            "builtin = \"gpt\"\nlayers = 2\nwidth = 64\nheads = 4",
            "builtin = \"mlp\"\nlayers = 2\nwidth = 32",
        )
        .replace("lr = 3e-3", "lr = 1e-2");
    let table =
        format!("format = \"safetensors\"\nuri = \"file://{}\"\nclasses = 2", manifest.display());
    let (r, _) = train(dir.path(), dataset(&toml, &table)).await;
    let accuracy = r.accuracy.unwrap();
    assert!(accuracy > 0.8, "accuracy {accuracy} (chance: 0.5)");
}
