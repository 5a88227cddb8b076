//! `wanlab calibrate`: what the emulator delivers against what was asked, between two hosts.
//!
//! RTT from a UDP ping-pong; throughput of one TCP flow (kernel TCP, buffers raised inside the
//! hosts so the window is not the limit) and of one UDP flow offered above the link rate; loss
//! from a UDP flow offered below it; and the emulator's own CPU time per Gbit forwarded.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use collectives::wan::LinkCondition;
use serde::Serialize;

use super::lab::Lab;

/// TCP buffer sysctls applied in calibration hosts: 64 MiB, well above any preset's BDP.
pub const TUNED_TCP: [&str; 4] = [
    "net.ipv4.tcp_rmem=4096 131072 67108864",
    "net.ipv4.tcp_wmem=4096 65536 67108864",
    "net.core.rmem_max=67108864",
    "net.core.wmem_max=67108864",
];

#[derive(Debug, Serialize)]
pub struct Check {
    pub metric: String,
    pub asked: String,
    pub measured: String,
    pub within: bool,
    pub note: String,
}

fn tool(lab: &Lab, host: usize, args: &[String]) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| "wanlab".into());
    let mut c = Command::new("ip");
    c.args(["netns", "exec", lab.namespace(host)]).arg(exe).arg("tool").args(args);
    c
}

fn spawn(mut c: Command) -> Result<Child> {
    c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("starting a lab tool")
}

fn json(out: Output) -> Result<serde_json::Value> {
    if !out.status.success() {
        bail!("tool failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("tool output {:?}", String::from_utf8_lossy(&out.stdout)))
}

fn cpu_seconds() -> f64 {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn sysctl_all(lab: &Lab, hosts: &[usize], settings: &[&str]) -> Result<()> {
    for &h in hosts {
        for s in settings {
            let out = Command::new("ip")
                .args(["netns", "exec", lab.namespace(h), "sysctl", "-qw", s])
                .output()?;
            if !out.status.success() {
                bail!("sysctl {s}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }
    Ok(())
}

/// Runs the calibration between hosts 0 and 1 of `lab` (whose link 0 -> 1 is `cond`).
pub async fn calibrate(lab: &Lab, secs: f64) -> Result<Vec<Check>> {
    let cond: LinkCondition =
        lab.topology.condition(0, 1).cloned().context("lab needs two hosts")?;
    let back = lab.topology.condition(1, 0).cloned().context("lab needs two hosts")?;
    let a1 = lab.addr(1);
    sysctl_all(lab, &[0, 1], &TUNED_TCP)?;
    let mut checks = Vec::new();

    // RTT.
    let echo = spawn(tool(
        lab,
        1,
        &["udp-echo".into(), "--port".into(), "9000".into(), "--secs".into(), "60".into()],
    ))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ping = tool(
        lab,
        0,
        &[
            "udp-ping".into(),
            "--to".into(),
            format!("{a1}:9000"),
            "--count".into(),
            "40".into(),
            "--interval-ms".into(),
            "25".into(),
        ],
    )
    .output()?;
    let mut echo = echo;
    let _ = echo.kill();
    let ping = json(ping)?;
    let asked = (cond.delay + back.delay).as_secs_f64() * 1e3;
    let got = ping["rtt_ms_median"].as_f64().unwrap_or(f64::NAN);
    checks.push(Check {
        metric: "RTT".into(),
        asked: format!("{asked:.2} ms"),
        measured: format!(
            "{got:.2} ms (min {:.2}, max {:.2})",
            ping["rtt_ms_min"].as_f64().unwrap_or(f64::NAN),
            ping["rtt_ms_max"].as_f64().unwrap_or(f64::NAN)
        ),
        // The emulator's own delay is what the fastest of the 40 samples shows; the median
        // adds the host's scheduling (a loaded 2-core machine adds a millisecond or more).
        within: (ping["rtt_ms_min"].as_f64().unwrap_or(f64::NAN) - asked).abs()
            <= (asked * 0.02).max(1.0),
        note: "fastest sample within ±2 % or 1 ms (the median shows the host's load)".into(),
    });

    let rate = cond.rate_bps;
    // One TCP flow.
    let warm = (secs / 3.0).max(1.0);
    let sink = spawn(tool(
        lab,
        1,
        &["tcp-sink".into(), "--port".into(), "9001".into(), "--warmup".into(), format!("{warm}")],
    ))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fabric = lab.fabric();
    let before_stats = fabric.lock().map(|f| f.stats(0, 1).0).ok();
    let cpu0 = cpu_seconds();
    let fwd0 = lab.forwarded_bytes();
    let t0 = std::time::Instant::now();
    let send = tool(
        lab,
        0,
        &[
            "tcp-send".into(),
            "--to".into(),
            format!("{a1}:9001"),
            "--secs".into(),
            format!("{secs}"),
            "--warmup".into(),
            format!("{warm}"),
        ],
    )
    .output()?;
    let cpu = cpu_seconds() - cpu0;
    let fwd_bits = (lab.forwarded_bytes() - fwd0) as f64 * 8.0;
    let wall = t0.elapsed().as_secs_f64();
    json(send)?;
    // The receiver's count: what the path delivered, not what the sender buffered.
    let received = json(sink.wait_with_output()?)?;
    let goodput = received["bits_per_second"].as_f64().unwrap_or(0.0);
    let after_stats = fabric.lock().map(|f| f.stats(0, 1).0).ok();
    let link_rate = match (before_stats, after_stats) {
        (Some(b), Some(a)) => (a.delivered_bytes - b.delivered_bytes) as f64 * 8.0 / wall,
        _ => f64::NAN,
    };
    // TCP goodput carries 1448 of every 1500 bytes (IP + TCP headers with timestamps).
    let ip_rate = goodput * f64::from(lab.topology.mtu) / (f64::from(lab.topology.mtu) - 52.0);
    // Under real loss one TCP flow stays below the link rate by its own design; the rate check
    // applies to (nearly) loss-free links, and the UDP flow below checks the rate of all.
    let loss_free = cond.loss.mean_loss() <= 1e-4;
    let (asked_txt, within, note) = match rate {
        Some(r) if loss_free => (
            format!("{:.1} Mbit/s", r as f64 / 1e6),
            (ip_rate / r as f64 - 1.0).abs() <= 0.03,
            "IP rate (goodput × 1500/1448) within ±3 %",
        ),
        Some(r) => (
            format!("{:.1} Mbit/s", r as f64 / 1e6),
            true,
            "informative: TCP backs off under this loss",
        ),
        None => ("unlimited".into(), true, "informative"),
    };
    checks.push(Check {
        metric: "TCP throughput (1 flow)".into(),
        asked: asked_txt,
        measured: format!(
            "{:.1} Mbit/s goodput = {:.1} Mbit/s IP ({:.1} Mbit/s on the link over the whole run)",
            goodput / 1e6,
            ip_rate / 1e6,
            link_rate / 1e6
        ),
        within,
        note: note.into(),
    });
    checks.push(Check {
        metric: "emulator CPU".into(),
        asked: "-".into(),
        measured: format!(
            "{:.2} CPU-s per Gbit forwarded ({cpu:.2} CPU-s for {:.2} Gbit)",
            cpu / (fwd_bits / 1e9).max(1e-9),
            fwd_bits / 1e9
        ),
        within: true,
        note: "user + system time of wanlab".into(),
    });

    // One UDP flow offered at 120 % of the link rate: what comes out is the link rate.
    if let Some(r) = rate {
        let usink = spawn(tool(
            lab,
            1,
            &[
                "udp-sink".into(),
                "--port".into(),
                "9002".into(),
                "--limit-secs".into(),
                format!("{}", secs + 10.0),
            ],
        ))?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let offered = (r as f64 * 1.2) as u64;
        let sent = json(
            tool(
                lab,
                0,
                &[
                    "udp-send".into(),
                    "--to".into(),
                    format!("{a1}:9002"),
                    "--rate".into(),
                    offered.to_string(),
                    "--secs".into(),
                    format!("{}", secs.min(5.0)),
                ],
            )
            .output()?,
        )?;
        let rep = json(usink.wait_with_output()?)?;
        let got = rep["bits_per_second"].as_f64().unwrap_or(0.0);
        let sent_rate = sent["bits_per_second"].as_f64().unwrap_or(0.0);
        // 1472-byte payloads ride in 1500-byte IP packets.
        let ip = |v: f64| v * 1500.0 / 1472.0;
        let expect = (r as f64).min(ip(sent_rate));
        checks.push(Check {
            metric: "UDP throughput (1 flow, offered 120 %)".into(),
            asked: format!("{:.1} Mbit/s", r as f64 / 1e6),
            measured: format!(
                "{:.1} Mbit/s IP (sender reached {:.1} Mbit/s)",
                ip(got) / 1e6,
                ip(sent_rate) / 1e6
            ),
            within: (ip(got) / expect - 1.0).abs() <= 0.03,
            note: "IP rate within ±3 % of min(link, what the sender offered)".into(),
        });
    }

    // Loss: a UDP flow at half the link rate (no queueing), counted by sequence number.
    let asked_loss = cond.loss.mean_loss();
    let loss_rate = rate.map_or(200_000_000, |r| r / 2);
    let usink = spawn(tool(
        lab,
        1,
        &[
            "udp-sink".into(),
            "--port".into(),
            "9003".into(),
            "--limit-secs".into(),
            format!("{}", secs + 10.0),
        ],
    ))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queue_drops_before =
        fabric.lock().map(|f| f.stats(0, 1).0.queue_dropped_packets).unwrap_or(0);
    let sent_out = json(
        tool(
            lab,
            0,
            &[
                "udp-send".into(),
                "--to".into(),
                format!("{a1}:9003"),
                "--rate".into(),
                loss_rate.to_string(),
                "--secs".into(),
                format!("{secs}"),
            ],
        )
        .output()?,
    )?;
    let sent = sent_out["sent"].as_f64().unwrap_or(0.0);
    let rep = json(usink.wait_with_output()?)?;
    let received = rep["received"].as_f64().unwrap_or(0.0);
    let measured_loss = if sent > 0.0 { 1.0 - received / sent } else { f64::NAN };
    // Binomial 95 % interval of the count, for presets whose loss is too rare to pin to 10 %.
    let expected = asked_loss * sent;
    let sd = (sent * asked_loss * (1.0 - asked_loss)).sqrt();
    // The sender's bursts can overflow a shallow bottleneck queue (a `lan` link's is 64 KiB):
    // those tail drops are the rate limiter's doing, checked by the throughput rows, not loss.
    let queue_drops = fabric.lock().map(|f| f.stats(0, 1).0.queue_dropped_packets).unwrap_or(0)
        - queue_drops_before;
    let lost_all = sent - received;
    let lost = lost_all - queue_drops as f64;
    let measured_loss = if sent > 0.0 { lost / sent } else { measured_loss };
    let within = if asked_loss == 0.0 {
        lost == 0.0
    } else {
        (measured_loss / asked_loss - 1.0).abs() <= 0.10 || (lost - expected).abs() <= 1.96 * sd
    };
    checks.push(Check {
        metric: "loss".into(),
        asked: format!("{:.4} %", asked_loss * 100.0),
        measured: format!(
            "{:.4} % ({lost:.0} of {sent:.0} packets; {queue_drops} more tail-dropped at the queue)",
            measured_loss * 100.0
        ),
        within,
        note: format!(
            "±10 % relative, or within the 95 % binomial interval (expected {expected:.0} ± {:.0})",
            1.96 * sd
        ),
    });
    Ok(checks)
}

/// Prints the checks as a table.
pub fn print(preset: &str, checks: &[Check]) {
    println!("# wanlab calibrate: {preset}");
    println!("{:<40} {:>14}  {:<70} ok", "metric", "asked", "measured");
    for c in checks {
        println!(
            "{:<40} {:>14}  {:<70} {}  ({})",
            c.metric,
            c.asked,
            c.measured,
            if c.within { "yes" } else { "NO" },
            c.note
        );
    }
}
