//! The WAN lab for real: namespaces, TUN devices and the emulator, driven through the `wanlab`
//! binary as a user would. Needs root (CI runs as root). The tests share the machine's network
//! namespaces, so they run one at a time.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_wanlab");
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn lab_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("lhlab-"))
        .map(str::to_owned)
        .collect()
}

fn lab_devices() -> usize {
    let out = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(": lh")).count()
}

/// A 3-host lab: every host sees its own address, reaches the others, and nothing is left
/// behind afterwards.
#[test]
fn three_hosts_come_up_and_leave_nothing_behind() {
    let _s = serial();
    let before = lab_namespaces();
    let out = Command::new(BIN)
        .args(["run", "--hosts", "3", "--link", "metro", "--"])
        .args(["sh", "-c", "ip -4 -o addr show | grep -c {addr} && ping_host={addr0} && echo host {rank} of {world} peers {peers}"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    for r in 0..3 {
        assert!(stdout.contains(&format!("[h{r}] host {r} of 3 peers 198.18.")), "{stdout}");
    }
    assert_eq!(lab_namespaces(), before, "namespaces left behind");
    assert_eq!(lab_devices(), 0, "TUN devices left behind");
}

/// Ctrl-C (SIGINT) tears the lab down: namespaces, devices and the hosts' processes.
#[test]
fn ctrl_c_tears_the_lab_down() {
    let _s = serial();
    let before = lab_namespaces();
    let lab = Command::new(BIN)
        .args(["run", "--hosts", "2", "--", "sleep", "601"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab_namespaces().len() < before.len() + 2 {
        assert!(Instant::now() < deadline, "lab did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill").args(["-INT", &lab.id().to_string()]).status().unwrap();
    let out = lab.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lab_namespaces(), before);
    assert_eq!(lab_devices(), 0);
    let sleepers = Command::new("pgrep").args(["-f", "sleep 601"]).output().unwrap();
    assert!(sleepers.stdout.is_empty(), "host processes survived");
}

/// A lab whose wanlab process is SIGKILLed leaves namespaces; `wanlab clean` removes them and
/// the processes in them.
#[test]
fn clean_removes_a_killed_lab() {
    let _s = serial();
    let mut lab = Command::new(BIN)
        .args(["run", "--hosts", "3", "--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab_namespaces().len() < 3 {
        assert!(Instant::now() < deadline, "lab did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    lab.kill().unwrap();
    lab.wait().unwrap();
    assert_eq!(lab_namespaces().len(), 3, "a killed lab cannot clean up after itself");
    let out = Command::new(BIN).arg("clean").output().unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success());
    assert!(lab_namespaces().is_empty(), "left: {:?}", lab_namespaces());
    let sleepers = Command::new("pgrep").args(["-x", "sleep"]).output().unwrap();
    let pids = String::from_utf8_lossy(&sleepers.stdout);
    for pid in pids.split_whitespace() {
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(!cmd.contains("600"), "a lab process survived: {pid} {cmd:?}");
    }
    assert_eq!(lab_devices(), 0);
}

/// The continental preset at 100 Mbit/s: RTT (the fastest of 40 pings: the median adds the
/// machine's load) within ±2 % or 1 ms of 40 ms, and one TCP and one UDP flow within ±3 % of
/// the rate.
#[test]
fn delay_and_rate_are_calibrated() {
    let _s = serial();
    let out = Command::new(BIN)
        .args(["calibrate", "--link", "continental", "--rate", "100mbit", "--secs", "4", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let checks = v[0]["checks"].as_array().unwrap();
    for metric in
        ["RTT", "TCP throughput (1 flow)", "UDP throughput (1 flow, offered 120 %)", "loss"]
    {
        let c = checks
            .iter()
            .find(|c| c["metric"] == metric)
            .unwrap_or_else(|| panic!("{metric} missing"));
        assert_eq!(c["within"], true, "{metric}: asked {} measured {}", c["asked"], c["measured"]);
    }
}

/// A partition between two hosts makes new connections fail; healing restores them.
#[test]
fn partition_cuts_and_heals() {
    let _s = serial();
    let script = "if [ {rank} = 1 ]; then exec WANLAB tool tcp-accept --port 7000 --secs 9; \
                  else sleep 0.5; exec WANLAB tool reach --to {addr1}:7000 --every-ms 200 --secs 7.5; fi"
        .replace("WANLAB", BIN);
    let out = Command::new(BIN)
        .args([
            "run",
            "--hosts",
            "2",
            "--link",
            "metro",
            "--fault",
            "3s:cut:0-1:2s",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    // Probe times are from the prober's start, 0.5 s after the lab's.
    let probes: Vec<(f64, bool)> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[h0] t="))
        .filter_map(|l| l.split_once(' '))
        .map(|(t, r)| (t.parse::<f64>().unwrap() + 0.5, r == "ok"))
        .collect();
    assert!(probes.len() > 20, "{probes:?}");
    let at =
        |from: f64, to: f64| probes.iter().filter(move |(t, _)| *t >= from && *t < to).map(|p| p.1);
    assert!(at(0.5, 2.7).all(|ok| ok), "before the cut: {probes:?}");
    assert!(at(3.2, 4.7).all(|ok| !ok), "during the cut: {probes:?}");
    assert!(at(3.2, 4.7).count() >= 3, "{probes:?}");
    assert!(at(5.7, 8.0).all(|ok| ok), "after healing: {probes:?}");
    assert!(at(5.7, 8.0).count() >= 3, "{probes:?}");
}
