#![allow(clippy::unwrap_used)]
//! The quickstart as a new user runs it (`scripts/quickstart`), on the binaries this build made
//! (`LONGHAUL_BIN_DIR` skips its setup and build): a coordinator and three worker processes,
//! their ring links emulated, train its run to completion, and every worker ends on one hash.
//! It once started three workers on a join token good for one: the run waited for workers
//! forever while the script showed nothing.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_quickstart_trains_its_run_to_completion() {
    let bin = Path::new(env!("CARGO_BIN_EXE_longhaul-worker")).parent().unwrap();
    assert!(
        bin.join("longhaul").exists(),
        "{} is missing: build it with `cargo build --release -p coordinator`",
        bin.join("longhaul").display()
    );
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/quickstart");
    let out_path = dir.path().join("quickstart.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("lan")
        .env("LONGHAUL_BIN_DIR", bin)
        .env("LONGHAUL_QUICKSTART_DIR", dir.path().join("work"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        // Its own process group, so that a hung quickstart is stopped with its children.
        .process_group(0)
        .spawn()
        .unwrap();
    // Bounded: the run takes a minute or two here; a quickstart that waits forever fails.
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill").args(["-KILL", &format!("-{}", child.id())]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut text = String::new();
    std::fs::File::open(&out_path).unwrap().read_to_string(&mut text).unwrap();
    let work = dir.path().join("work");
    let logs: String = (1..=3)
        .map(|i| {
            let log =
                std::fs::read_to_string(work.join(format!("node-{i}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            format!("--- node-{i} (last lines, newest first)\n{}\n", tail.join("\n"))
        })
        .collect();
    let Some(status) = status else {
        panic!("the quickstart did not end within 10 minutes:\n{text}\n{logs}");
    };
    assert!(status.success(), "the quickstart failed ({status}):\n{text}\n{logs}");
    // Every worker finished the run's steps, on one hash.
    let hashes: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("node-"))
        .filter_map(|l| l.split("hash ").nth(1))
        .filter_map(|h| h.split_whitespace().next())
        .collect();
    assert_eq!(hashes.len(), 3, "three workers finished:\n{text}");
    assert!(hashes.iter().all(|h| *h == hashes[0] && h.len() == 16), "{hashes:?}\n{text}");
    // The run's ledger was exported, signed, and checks out offline against the CA pin.
    assert!(
        text.lines().any(|l| l.contains("ledger:") && l.contains("signature valid")),
        "no verified ledger:\n{text}"
    );
    // The model came home: fetched through the coordinator, verified by the members' majority.
    assert!(
        text.lines().any(|l| l.contains("model:") && l.contains("of 3 members reported")),
        "no fetched model:\n{text}"
    );
    println!("{text}");
}
