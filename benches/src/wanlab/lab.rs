//! The lab's IO shell: network namespaces, one TUN device per host, and the forwarding loop
//! that runs every packet through the [`Fabric`].
//!
//! Host `i` is the network namespace `lhlab-<id>-h<i>`, with loopback and one TUN interface
//! `lh<id>h<i>` holding `198.18.X.(i+1)/24` (198.18.0.0/15 is reserved for network benchmarks,
//! RFC 2544; `X` is chosen so it collides with no address of the machine). The TUN device is created
//! here, in the root namespace, then moved into the host's namespace: this process keeps its file
//! descriptor and so sees every packet the host sends to the lab subnet. Nothing is routed
//! anywhere else: the hosts have no other interface.
//!
//! Teardown removes the namespaces (the TUN devices go with their file descriptors) and the state
//! file under `/run/longhaul-wanlab/`, on drop, on Ctrl-C, and — after a crash — through
//! [`clean`].

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::fabric::{Addressing, Decision, Fabric};
use super::topology::{FaultAction, Topology};

const STATE_DIR: &str = "/run/longhaul-wanlab";
const NS_PREFIX: &str = "lhlab-";

/// Runs `ip` with `args`; an error carries ip's own message.
pub fn ip(args: &[&str]) -> Result<String> {
    let out =
        Command::new("ip").args(args).output().context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when this process runs as root (namespaces and TUN devices need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A running lab.
pub struct Lab {
    pub id: String,
    pub topology: Topology,
    pub addressing: Addressing,
    namespaces: Vec<String>,
    fabric: Arc<Mutex<Fabric>>,
    started: Instant,
    tasks: JoinSet<()>,
    state_file: PathBuf,
    forwarded: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("id", &self.id)
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Creates the hosts and starts forwarding. Must run inside a tokio runtime, as root.
    pub async fn create(topology: Topology) -> Result<Self> {
        if !is_root() {
            bail!("wanlab needs root: it creates network namespaces and TUN devices");
        }
        let id = format!("{:04x}", (std::process::id() ^ (now_nanos() as u32)) & 0xffff);
        let addressing = free_subnet()?;
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let state_file = Path::new(STATE_DIR).join(format!("{id}.pid"));
        std::fs::write(&state_file, std::process::id().to_string())?;
        let mut lab = Lab {
            namespaces: Vec::new(),
            fabric: Arc::new(Mutex::new(Fabric::new(&topology, addressing))),
            started: Instant::now(),
            tasks: JoinSet::new(),
            state_file,
            forwarded: Arc::default(),
            id,
            topology,
            addressing,
        };
        // On any error below, dropping `lab` removes what was made.
        let mut devices = Vec::new();
        for i in 0..lab.topology.hosts {
            let ns = format!("{NS_PREFIX}{}-h{i}", lab.id);
            ip(&["netns", "add", &ns])?;
            lab.namespaces.push(ns.clone());
            let dev_name = lab.interface(i);
            let mut cfg = tun::Configuration::default();
            cfg.tun_name(&dev_name).mtu(lab.topology.mtu);
            let dev = tun::create_as_async(&cfg)
                .with_context(|| format!("creating TUN device {dev_name}"))?;
            ip(&["link", "set", "dev", &dev_name, "netns", &ns])?;
            let addr = format!("{}/24", addressing.host(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &dev_name])?;
            // A long transmit queue: the emulator, not the kernel, decides what is dropped.
            ip(&[
                "-n",
                &ns,
                "link",
                "set",
                "dev",
                &dev_name,
                "mtu",
                &lab.topology.mtu.to_string(),
                "txqueuelen",
                "10000",
                "up",
            ])?;
            ip(&["-n", &ns, "link", "set", "dev", "lo", "up"])?;
            // IPv6 would only add router solicitations and the like to the lab's traffic.
            let _ = Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
                .output();
            devices.push(Arc::new(dev));
        }
        lab.start_forwarding(devices);
        lab.schedule_faults();
        Ok(lab)
    }

    pub fn namespace(&self, host: usize) -> &str {
        &self.namespaces[host]
    }

    /// The name of host `host`'s lab interface (inside its namespace).
    pub fn interface(&self, host: usize) -> String {
        format!("lh{}h{host}", self.id)
    }

    pub fn addr(&self, host: usize) -> Ipv4Addr {
        self.addressing.host(host)
    }

    /// Bytes the emulator has delivered so far, all links.
    pub fn forwarded_bytes(&self) -> u64 {
        self.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn fabric(&self) -> Arc<Mutex<Fabric>> {
        self.fabric.clone()
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn start_forwarding(&mut self, devices: Vec<Arc<tun::AsyncDevice>>) {
        let mut inboxes = Vec::new();
        for dev in &devices {
            let (tx, rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
            inboxes.push(tx);
            self.tasks.spawn(deliver_loop(dev.clone(), rx, self.forwarded.clone()));
        }
        for (from, dev) in devices.into_iter().enumerate() {
            let (fabric, inboxes) = (self.fabric.clone(), inboxes.clone());
            let mtu = usize::from(self.topology.mtu);
            self.tasks.spawn(async move {
                let mut buf = vec![0u8; mtu + 64];
                loop {
                    let n = match dev.recv(&mut buf).await {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::warn!(host = from, error = %e, "TUN read failed; host detached");
                            return;
                        }
                    };
                    let decision = match fabric.lock() {
                        Ok(mut f) => f.route(Instant::now(), from, &buf[..n]),
                        Err(_) => return,
                    };
                    if let Decision::Deliver { to, at } = decision {
                        let _ = inboxes[to].send((at, buf[..n].to_vec()));
                    }
                }
            });
        }
    }

    fn schedule_faults(&mut self) {
        for fault in self.topology.faults.clone() {
            let fabric = self.fabric.clone();
            let start = self.started;
            let seed = self.topology.seed;
            self.tasks.spawn(async move {
                tokio::time::sleep_until((start + fault.at).into()).await;
                let now = Instant::now();
                let Ok(mut f) = fabric.lock() else { return };
                match fault.action {
                    FaultAction::Cut { a, b, duration } => {
                        eprintln!("wanlab: t={:?} cut {a} <-> {b} for {duration:?}", fault.at);
                        f.cut(a, b, now + duration);
                    }
                    FaultAction::Isolate { host, duration } => {
                        eprintln!("wanlab: t={:?} isolate host {host} for {duration:?}", fault.at);
                        f.isolate(host, now + duration);
                    }
                    FaultAction::Set { from, to, condition, symmetric } => {
                        eprintln!("wanlab: t={:?} link {from} -> {to} now {condition:?}", fault.at);
                        f.set(from, to, condition.clone(), seed ^ 0x5e7);
                        if symmetric {
                            f.set(to, from, condition, seed ^ 0x7e5);
                        }
                    }
                    // Killing processes is the runner's business (see `run`).
                    FaultAction::Kill { .. } => {}
                }
            });
        }
    }

    /// Stops forwarding and removes every namespace of the lab.
    pub fn teardown(&mut self) {
        self.tasks.abort_all();
        for ns in self.namespaces.drain(..) {
            kill_namespace_processes(&ns);
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("wanlab: {e}");
            }
        }
        let _ = std::fs::remove_file(&self.state_file);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Writes packets into a host's interface at their arrival times.
async fn deliver_loop(
    dev: Arc<tun::AsyncDevice>,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
    forwarded: Arc<std::sync::atomic::AtomicU64>,
) {
    // Packets of different links may arrive here out of time order: keep them ordered by time.
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    loop {
        // Timers tick in whole milliseconds and fire late; release packets up to half a tick
        // early and wake a tick before the next one is due, so the added delay is right to
        // within ±0.5 ms instead of always late.
        let now = Instant::now() + Duration::from_micros(500);
        while let Some(Reverse((at, _, _))) = queue.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, _, p))) = queue.pop() else { break };
            if dev.send(&p).await.is_ok() {
                forwarded.fetch_add(p.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let next = queue.peek().map(|Reverse((at, _, _))| *at);
        tokio::select! {
            item = rx.recv() => match item {
                Some((at, p)) => {
                    queue.push(Reverse((at, seq, p)));
                    seq += 1;
                }
                None => return,
            },
            _ = async {
                match next {
                    Some(at) => {
                        let wake = at.checked_sub(Duration::from_millis(1)).unwrap_or(at);
                        tokio::time::sleep_until(wake.into()).await
                    }
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A /24 in 198.18.0.0/15 that no interface of this machine (root namespace) uses.
fn free_subnet() -> Result<Addressing> {
    let used = ip(&["-4", "-o", "addr", "show"])?;
    let mut routes = ip(&["-4", "route", "show", "table", "all"]).unwrap_or_default();
    routes.push_str(&used);
    let start = (std::process::id() % 250) as u8;
    for k in 0..250u8 {
        let third = (start.wrapping_add(k) % 250) + 1;
        let prefix = format!("198.18.{third}.");
        if !routes.contains(&prefix) && !routes.contains("198.18.0.0/15") {
            return Ok(Addressing { subnet: [198, 18, third] });
        }
    }
    bail!("no free /24 in 198.18.0.0/15 on this machine")
}

fn kill_namespace_processes(ns: &str) {
    let Ok(pids) = ip(&["netns", "pids", ns]) else { return };
    let pids: Vec<&str> = pids.split_whitespace().collect();
    for pid in &pids {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    // A SIGKILL takes effect when the process next runs: wait (at most 5 s) until every one is
    // gone or a zombie, so that nothing of the lab still runs when `clean` returns.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pids.iter().any(|p| still_running(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether process `pid` exists and is not a zombie.
fn still_running(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Namespaces of labs whose wanlab process is gone (or of every lab, with `all`): their
/// processes are killed and the namespaces deleted. Returns what was removed.
pub fn clean(all: bool) -> Result<Vec<String>> {
    let listing = ip(&["netns", "list"])?;
    let mut removed = Vec::new();
    for line in listing.lines() {
        let Some(ns) = line.split_whitespace().next() else { continue };
        let Some(rest) = ns.strip_prefix(NS_PREFIX) else { continue };
        let lab_id = rest.split('-').next().unwrap_or("");
        let state = Path::new(STATE_DIR).join(format!("{lab_id}.pid"));
        let alive = std::fs::read_to_string(&state)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if alive && !all {
            continue;
        }
        kill_namespace_processes(ns);
        ip(&["netns", "del", ns])?;
        let _ = std::fs::remove_file(&state);
        removed.push(ns.to_owned());
    }
    Ok(removed)
}

/// Names of every lab namespace on this machine.
pub fn lab_namespaces() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
        .map(str::to_owned)
        .collect())
}
