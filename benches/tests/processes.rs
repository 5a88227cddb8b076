//! `allreduce-perf` as separate processes on loopback: the table of a healthy run, and a rank
//! killed with SIGKILL in the middle of an operation.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_allreduce-perf");

#[test]
fn launched_processes_print_the_table() {
    let out = Command::new(BIN)
        .args([
            "--launch", "3", "-b", "4K", "-e", "256K", "-f", "8", "-n", "2", "-w", "1", "-c",
            "int8",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let rows: Vec<&str> =
        stdout.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    assert_eq!(rows.len(), 3, "sizes 4K, 32K, 256K");
    for r in rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(cols[4], "int8");
        let busbw: f64 = cols[7].parse().unwrap();
        let rel_err: f64 = cols[11].parse().unwrap();
        assert!(busbw > 0.0, "{r}");
        assert!(rel_err < 0.02, "{r}");
        assert_eq!(cols[13], "yes", "{r}");
    }
}

#[test]
fn json_output_parses() {
    let out = Command::new(BIN)
        .args(["-g", "2", "-b", "1K", "-e", "1K", "-n", "1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"busbw_gbps\""), "{text}");
    assert!(text.contains("\"ranks\": 2"), "{text}");
}

#[test]
fn bad_arguments_are_named() {
    let out = Command::new(BIN).args(["-b", "8M", "-e", "1M"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--minbytes"), "{err}");
    let out = Command::new(BIN).args(["--link", "moon"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("transatlantic"));
}

/// SIGKILL one of three rank processes mid-operation: the survivors exit with an error that
/// names the dead rank, within the idle timeout plus a few hops, instead of hanging.
#[test]
fn sigkilled_rank_fails_the_survivors() {
    let dir = std::env::temp_dir().join(format!("lh-kill-{}", std::process::id()));
    let status = Command::new(BIN).args(["pki", "-g", "3", "--out"]).arg(&dir).output().unwrap();
    assert!(status.status.success());
    let peers: Vec<String> = (0..3)
        .map(|_| {
            std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
        })
        .collect();
    let spawn = |rank: usize| {
        Command::new(BIN)
            // 64 MiB at 100 Mbit/s per rank: each operation takes seconds.
            .args(["-b", "64M", "-e", "64M", "-n", "5", "-w", "0", "--rate", "100mbit"])
            .args(["--rank", &rank.to_string(), "--peers", &peers.join(","), "--pki"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut ranks: Vec<_> = (0..3).map(spawn).collect();
    std::thread::sleep(Duration::from_secs(3));
    let mut victim = ranks.remove(1);
    victim.kill().unwrap();
    victim.wait().unwrap();
    let killed_at = Instant::now();
    for mut r in ranks {
        let out = loop {
            if let Some(_status) = r.try_wait().unwrap() {
                break r.wait_with_output().unwrap();
            }
            assert!(killed_at.elapsed() < Duration::from_secs(30), "a survivor hung");
            std::thread::sleep(Duration::from_millis(50));
        };
        let err = String::from_utf8_lossy(&out.stderr);
        println!("survivor after {:?}: {err}", killed_at.elapsed());
        assert!(!out.status.success());
        assert!(err.contains("rank-1"), "{err}");
    }
    // The idle timeout is 10 s for this link; with a few hops of abort, well under 15 s.
    assert!(killed_at.elapsed() < Duration::from_secs(15), "{:?}", killed_at.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
}
