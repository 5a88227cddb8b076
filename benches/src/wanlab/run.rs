//! Runs one command in every host of a lab, with the host's identity in its environment and in
//! `{placeholders}` of its arguments, keeping each host's output apart.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use super::lab::Lab;
use super::topology::FaultAction;

/// How to run the command.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub command: Vec<String>,
    /// Base port: host `i`'s ring address is `addr_i:port`.
    pub port: u16,
    /// Directory for `h<i>.log` copies of each host's output.
    pub logs: Option<PathBuf>,
    /// `key=value` sysctls applied in every host before the command starts.
    pub sysctls: Vec<String>,
}

/// The environment and placeholders of host `rank`.
pub fn host_vars(lab: &Lab, rank: usize, port: u16) -> Vec<(String, String)> {
    let world = lab.topology.hosts;
    let peers: Vec<String> = (0..world).map(|i| format!("{}:{port}", lab.addr(i))).collect();
    let mut vars: Vec<(String, String)> = vec![
        ("rank".into(), rank.to_string()),
        ("world".into(), world.to_string()),
        ("addr".into(), lab.addr(rank).to_string()),
        ("peers".into(), peers.join(",")),
        ("master".into(), lab.addr(0).to_string()),
        ("port".into(), port.to_string()),
    ];
    vars.extend((0..world).map(|i| (format!("addr{i}"), lab.addr(i).to_string())));
    vars
}

/// Replaces `{rank}`, `{world}`, `{addr}`, `{peers}`, `{master}`, `{port}` and `{addr0}`,
/// `{addr1}`, ... (every host's address).
pub fn substitute(arg: &str, vars: &[(String, String)]) -> String {
    let mut s = arg.to_owned();
    for (k, v) in vars {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

/// Runs the command on every host; returns each host's exit code (a signal `s` counts as
/// `128 + s`).
pub async fn run(lab: &Lab, spec: &RunSpec) -> Result<Vec<i32>> {
    let world = lab.topology.hosts;
    if let Some(dir) = &spec.logs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for ns in (0..world).map(|i| lab.namespace(i)) {
        for s in &spec.sysctls {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", ns, "sysctl", "-qw", s])
                .output()?;
            if !out.status.success() {
                anyhow::bail!(
                    "sysctl {s} in {ns}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }
    let mut children = Vec::new();
    for rank in 0..world {
        let vars = host_vars(lab, rank, spec.port);
        let args: Vec<String> = spec.command.iter().map(|a| substitute(a, &vars)).collect();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", lab.namespace(rank)])
            .args(&args)
            .env("LONGHAUL_RANK", rank.to_string())
            .env("LONGHAUL_WORLD", world.to_string())
            .env("LONGHAUL_ADDR", lab.addr(rank).to_string())
            .env("LONGHAUL_PEERS", &vars[3].1)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", lab.addr(0).to_string())
            .env("MASTER_PORT", (spec.port + 1000).to_string())
            .env("LONGHAUL_IFNAME", lab.interface(rank))
            // gloo otherwise resolves the machine's hostname, which no lab host can reach.
            .env("GLOO_SOCKET_IFNAME", lab.interface(rank))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child =
            cmd.spawn().with_context(|| format!("starting {:?} in host {rank}", args))?;
        let log = match &spec.logs {
            Some(dir) => Some(tokio::fs::File::create(dir.join(format!("h{rank}.log"))).await?),
            None => None,
        };
        let out = child.stdout.take();
        let err = child.stderr.take();
        let printer = tokio::spawn(copy_lines(rank, out, err, log));
        children.push((child, printer));
    }
    // Scheduled kills.
    let mut kills = Vec::new();
    for f in &lab.topology.faults {
        if let FaultAction::Kill { host } = f.action {
            kills.push((f.at, host));
        }
    }
    let pids: Vec<Option<u32>> = children.iter().map(|(c, _)| c.id()).collect();
    let start = tokio::time::Instant::now();
    let killer = tokio::spawn(async move {
        for (at, host) in kills {
            tokio::time::sleep_until(start + at).await;
            eprintln!("wanlab: t={at:?} kill host {host}");
            if let Some(Some(pid)) = pids.get(host) {
                // `ip netns exec` execs the command, so this pid is the command itself.
                let _ =
                    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
    });
    let mut codes = Vec::new();
    for (mut child, printer) in children {
        let status = child.wait().await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), printer).await;
        codes.push(exit_code(status));
    }
    killer.abort();
    Ok(codes)
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

async fn copy_lines(
    rank: usize,
    out: Option<tokio::process::ChildStdout>,
    err: Option<tokio::process::ChildStderr>,
    mut log: Option<tokio::fs::File>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    if let Some(out) = out {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
    }
    if let Some(err) = err {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l);
            }
        });
    }
    drop(tx);
    while let Some(line) = rx.recv().await {
        println!("[h{rank}] {line}");
        if let Some(f) = log.as_mut() {
            let _ = f.write_all(format!("{line}\n").as_bytes()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced() {
        let vars = vec![
            ("rank".to_string(), "2".to_string()),
            ("peers".to_string(), "a:1,b:1".to_string()),
        ];
        assert_eq!(
            substitute("--rank={rank} --peers {peers} {other}", &vars),
            "--rank=2 --peers a:1,b:1 {other}"
        );
    }
}
