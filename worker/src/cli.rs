//! `longhaul-worker`: join a coordinator and train, or check this machine first.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use client::{ConnectArgs, ConnectConfig};
use collectives::NetConfig;
use collectives::group::Emulation;
use collectives::wan::LinkPreset;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::agent::{self, Backoff, Identity};
use crate::driver::{Driver, DriverConfig};
use crate::trainer::plan::{self, DeviceChoice};

/// The libtorch this binary was built against (from the torch wheel's `version.py`).
pub const LIBTORCH_VERSION: &str = match option_env!("LONGHAUL_LIBTORCH_VERSION") {
    Some(v) => v,
    None => "unknown",
};

#[derive(Debug, Parser)]
#[command(
    name = "longhaul-worker",
    version,
    about = "Lends this machine's GPU (or CPU) to a longhaul training run",
    long_about = "Joins a longhaul coordinator and trains whatever run it is given, \
        synchronising with the other workers over a QUIC ring. The first start needs a join \
        token; the identity it earns is kept in the state directory and reused."
)]
pub struct Cli {
    #[command(flatten)]
    opts: Opts,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join and train (the default).
    Run,
    /// Preflight: libtorch, CUDA devices, the state directory, the coordinator, the ring port.
    Check,
}

#[derive(Debug, Clone, Args)]
struct Opts {
    /// Where the coordinator is; the CA pin is required.
    #[command(flatten)]
    at: ConnectArgs,
    /// A join token (`longhaul token create`); needed only until this worker has joined.
    #[arg(long, global = true, env = "LONGHAUL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the join token (for container secrets).
    #[arg(long, global = true, env = "LONGHAUL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where the identity, checkpoints and the shard cache live.
    #[arg(long, global = true, env = "LONGHAUL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The UDP address the ring endpoint listens on (port 0: a free port, kept for the
    /// process's lifetime).
    #[arg(long, global = true, env = "LONGHAUL_RING_LISTEN", default_value = "0.0.0.0:7071")]
    ring_listen: SocketAddr,
    /// The address peers reach the ring endpoint at (default: the address this host uses to
    /// reach the coordinator, with the listen port).
    #[arg(long, global = true, env = "LONGHAUL_RING_ADVERTISE")]
    ring_advertise: Option<SocketAddr>,
    /// auto (CUDA if present), cpu, cuda or cuda:N.
    #[arg(long, global = true, env = "LONGHAUL_DEVICE", default_value = "auto")]
    device: DeviceChoice,
    /// libtorch intra-op threads (0: one per core).
    #[arg(long, global = true, env = "LONGHAUL_THREADS", default_value_t = 0)]
    threads: usize,
    /// Emulate a WAN link preset on what this worker sends on the ring (lan, metro,
    /// continental, transatlantic, intercontinental, lossy), for tests and demos.
    #[arg(long, global = true, env = "LONGHAUL_EMULATE")]
    emulate: Option<LinkPreset>,
    /// The name this worker reports (default: the host name).
    #[arg(long, global = true, env = "LONGHAUL_HOST")]
    host: Option<String>,
    /// Fault injection for chaos and adversary tests: corrupt what this worker sends on the
    /// ring (nan, huge, zero, replay: an earlier contribution again, half or half/<every>: the
    /// gradient of half its batch as the whole's, always or at every `every`-th step, or
    /// lie:<factor>: scaled after declaring the honest norms) from step `--fault-poison-after`
    /// on.
    #[arg(long, global = true, env = "LONGHAUL_FAULT_POISON", hide = true,
          value_parser = crate::trainer::PoisonKind::parse)]
    fault_poison: Option<crate::trainer::PoisonKind>,
    /// Fault injection for adversary tests: lie to the coordinator (see `driver::Attack`).
    #[arg(long, global = true, env = "LONGHAUL_FAULT_ATTACK", hide = true,
          value_parser = crate::driver::Attack::parse)]
    fault_attack: Option<crate::driver::Attack>,
    #[arg(
        long,
        global = true,
        env = "LONGHAUL_FAULT_POISON_AFTER",
        hide = true,
        default_value_t = 0
    )]
    fault_poison_after: u64,
    /// Seconds between metrics reports.
    #[arg(long, global = true, env = "LONGHAUL_METRICS_EVERY", default_value_t = 2.0)]
    metrics_every: f64,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("LONGHAUL_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.opts),
        Command::Check => check(cli.opts),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("longhaul-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Opts {
    fn connect(&self) -> Result<ConnectConfig> {
        let Some(pin) = self.at.pin() else {
            bail!(
                "--ca-hash (LONGHAUL_CA_HASH) is required: the coordinator's CA pin, printed by \
                 `longhaul ca-hash` on the coordinator"
            );
        };
        Ok(self.at.config(pin))
    }

    fn state_dir(&self) -> PathBuf {
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("longhaul").join("worker")
    }

    fn token(&self) -> Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.trim().to_owned()));
        }
        match &self.token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .with_context(|| format!("reading the token file {}", p.display()))?;
                Ok(Some(t.trim().to_owned()))
            }
            None => Ok(None),
        }
    }

    fn host(&self) -> String {
        self.host.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "unknown".into())
        })
    }

    fn net(&self) -> NetConfig {
        match self.emulate {
            Some(p) => {
                let c = p.condition();
                NetConfig {
                    link_rate_bps: c.rate_bps.unwrap_or(1_000_000_000),
                    rtt: c.rtt().max(Duration::from_millis(1)),
                    ..NetConfig::default()
                }
            }
            None => NetConfig::default(),
        }
    }

    /// The ring address to advertise.
    async fn advertise(&self, cfg: &ConnectConfig) -> Result<SocketAddr> {
        if let Some(a) = self.ring_advertise {
            return Ok(a);
        }
        if !self.ring_listen.ip().is_unspecified() {
            return Ok(self.ring_listen);
        }
        // The local address of a route to the coordinator (a connected UDP socket sends
        // nothing).
        let authority = cfg.url.trim_start_matches("https://");
        let target = tokio::net::lookup_host(authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .with_context(|| format!("{authority} resolves to nothing"))?;
        let probe = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        probe.connect(target)?;
        Ok(SocketAddr::new(probe.local_addr()?.ip(), self.ring_listen.port()))
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("agent").build()?)
}

/// Loads the saved identity, or joins with the token (retrying while the coordinator is not
/// up yet, for up to two minutes).
async fn identity(
    opts: &Opts,
    cfg: &ConnectConfig,
    state_dir: &Path,
    ring: &str,
) -> Result<Identity> {
    if let Some(id) = Identity::load(state_dir, &cfg.ca_pin)? {
        info!(worker = id.worker_id, "using the identity in {}", state_dir.display());
        return Ok(Identity { coordinator: cfg.url.clone(), ..id });
    }
    let Some(token) = opts.token()? else {
        bail!(
            "no identity for this coordinator in {} and no join token: pass --token (or \
             LONGHAUL_TOKEN / --token-file); `longhaul token create` makes one",
            state_dir.display()
        );
    };
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let give_up = tokio::time::Instant::now() + Duration::from_secs(120);
    let id = loop {
        match agent::join(cfg, &token, &opts.host(), ring).await {
            Ok(id) => break id,
            Err(e) => {
                let msg = format!("{e:#}");
                let permanent = ["token", "pin", "CSR", "invalid"].iter().any(|w| msg.contains(w));
                if permanent || tokio::time::Instant::now() > give_up {
                    return Err(e);
                }
                let wait = backoff.next_delay();
                warn!("join failed ({msg}); retrying in {wait:.1?}");
                tokio::time::sleep(wait).await;
            }
        }
    };
    id.save(state_dir)?;
    info!(worker = id.worker_id, name = %id.member_name, "joined");
    Ok(id)
}

fn run(opts: Opts) -> Result<ExitCode> {
    let cfg = opts.connect()?;
    let state_dir = opts.state_dir();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
    plan::set_threads(opts.threads);
    let rt = runtime()?;
    // tonic's lazy channels spawn their workers on the runtime they are made in.
    let _enter = rt.enter();
    let mut opts = opts;
    if opts.ring_listen.port() == 0 {
        // Port 0: pick a free port now and keep it for every epoch.
        let s = collectives::transport::bind(opts.ring_listen, 1 << 16)
            .with_context(|| format!("binding {}", opts.ring_listen))?;
        opts.ring_listen = s.local_addr()?;
    }
    let advertise = rt.block_on(opts.advertise(&cfg))?;
    let ring = advertise.to_string();
    let identity = rt.block_on(identity(&opts, &cfg, &state_dir, &ring))?;
    let rpc = identity.client(&cfg)?;
    let (agent_side, trainer_side) = agent::link();
    let attempt = agent_side.attempt.clone();
    let shutdown = CancellationToken::new();
    let session = rt.spawn(agent::run_session(
        cfg.clone(),
        identity.clone(),
        Some(state_dir.clone()),
        ring.clone(),
        agent_side,
        shutdown.clone(),
    ));
    let driver_cfg = DriverConfig {
        state_dir: state_dir.clone(),
        device: opts.device,
        net: opts.net(),
        emulation: opts
            .emulate
            .map(|p| Emulation { condition: p.condition(), seed: identity.worker_id }),
        ring_bind: opts.ring_listen,
        metrics_every: Duration::from_secs_f64(opts.metrics_every.clamp(0.1, 3600.0)),
        retry_after: Duration::from_secs(2),
        poison: opts
            .fault_poison
            .map(|kind| crate::trainer::Poison { after_step: opts.fault_poison_after, kind }),
        attack: opts.fault_attack,
        connect: cfg.clone(),
    };
    info!(worker = identity.worker_id, %ring, coordinator = %cfg.url, emulate = ?opts.emulate,
        "longhaul-worker {} (libtorch {LIBTORCH_VERSION}) starting", env!("CARGO_PKG_VERSION"));
    let driver = Driver::new(driver_cfg, rt.handle().clone(), trainer_side, identity, rpc);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let trainer = std::thread::Builder::new().name("trainer".into()).spawn(move || {
        let r = driver.run();
        let _ = done_tx.send(());
        r
    })?;
    rt.block_on(async {
        tokio::select! {
            _ = done_rx => {}
            _ = shutdown_signal() => info!("shutting down"),
        }
    });
    shutdown.cancel();
    if let Ok(a) = attempt.lock()
        && let Some(a) = a.as_ref()
    {
        a.cancel("the worker is shutting down".into());
    }
    let _ = rt.block_on(session);
    let result = trainer.join().map_err(|_| anyhow::anyhow!("the trainer thread panicked"))?;
    rt.shutdown_timeout(Duration::from_secs(2));
    result.map(|()| ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// One preflight finding.
struct Finding {
    ok: bool,
    what: String,
    detail: String,
    fix: Option<String>,
}

fn check(opts: Opts) -> Result<ExitCode> {
    let rt = runtime()?;
    let mut out = Vec::new();
    let mut push = |ok: bool, what: &str, detail: String, fix: Option<String>| {
        out.push(Finding { ok, what: what.into(), detail, fix });
    };

    push(true, "libtorch", format!("{LIBTORCH_VERSION} (built against it; loaded)"), None);
    let n = plan::cuda_devices();
    let gpus = if n == 0 {
        "none; training runs on the CPU".to_owned()
    } else {
        format!("{n} device(s){}", nvidia_smi().map(|s| format!(": {s}")).unwrap_or_default())
    };
    let want_cuda = matches!(opts.device, DeviceChoice::Cuda(_));
    match plan::device(opts.device) {
        Ok(d) => push(true, "device", format!("{d:?}; CUDA {gpus}"), None),
        Err(e) => push(
            false,
            "device",
            e,
            Some(if want_cuda {
                "install the NVIDIA driver and run the container with --gpus all, or use --device cpu".into()
            } else {
                "use --device auto".into()
            }),
        ),
    }

    let state_dir = opts.state_dir();
    let probe = state_dir.join(".check");
    match std::fs::create_dir_all(&state_dir).and_then(|_| std::fs::write(&probe, b"ok")) {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            push(true, "state dir", format!("{} is writable", state_dir.display()), None);
        }
        Err(e) => push(
            false,
            "state dir",
            format!("{}: {e}", state_dir.display()),
            Some("pass --state-dir (LONGHAUL_STATE_DIR) pointing at a writable directory".into()),
        ),
    }

    let cfg = opts.connect();
    let mut advertise = None;
    match &cfg {
        Err(e) => push(false, "coordinator", format!("{e:#}"), None),
        Ok(cfg) => {
            let saved = Identity::load(&state_dir, &cfg.ca_pin).ok().flatten();
            let (ok, detail, fix) =
                rt.block_on(probe_coordinator(cfg, saved.as_ref(), opts.token()?.is_some()));
            push(ok, "coordinator", detail, fix);
            advertise = rt.block_on(opts.advertise(cfg)).ok();
        }
    }

    let (ok, detail, fix) = probe_udp(opts.ring_listen, advertise.or(opts.ring_advertise));
    push(ok, "ring port", detail, fix);

    let mut failed = false;
    for f in &out {
        println!("{} {:<12} {}", if f.ok { "ok  " } else { "FAIL" }, f.what, f.detail);
        if let Some(fix) = &f.fix {
            println!("     {:<12} fix: {fix}", "");
        }
        failed |= !f.ok;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn nvidia_smi() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total,memory.used", "--format=csv,noheader"])
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout).lines().map(str::trim).collect::<Vec<_>>().join("; ")
    })
}

async fn probe_coordinator(
    cfg: &ConnectConfig,
    saved: Option<&Identity>,
    have_token: bool,
) -> (bool, String, Option<String>) {
    use proto::pb;
    let call = match saved {
        Some(id) => match id.client(cfg) {
            Ok(mut rpc) => rpc.lease_shard(pb::LeaseShardRequest {}).await.map(|_| ()),
            Err(e) => return (false, format!("{e:#}"), None),
        },
        None => match client::channel(cfg, None) {
            Ok(ch) => pb::agent_client::AgentClient::new(ch)
                .lease_shard(pb::LeaseShardRequest {})
                .await
                .map(|_| ()),
            Err(e) => {
                return (false, format!("{e:#}"), Some("fix --coordinator or --ca-hash".into()));
            }
        },
    };
    let reached = match &call {
        Ok(()) => true,
        Err(s) => s.code() != tonic::Code::Unavailable && s.code() != tonic::Code::Unknown,
    };
    if !reached {
        let msg = call.err().map(|s| s.message().to_owned()).unwrap_or_default();
        let fix = if msg.contains("pin") {
            "the CA pin differs: copy it again from `longhaul ca-hash` on the coordinator"
        } else {
            "check the URL, that the coordinator runs (`longhaul serve`), and that its TCP port is open"
        };
        return (false, format!("{} unreachable: {msg}", cfg.url), Some(fix.into()));
    }
    match (saved, &call) {
        (Some(id), Ok(())) | (Some(id), Err(_))
            if !matches!(&call, Err(s) if s.code() == tonic::Code::Unauthenticated
                || s.code() == tonic::Code::PermissionDenied) =>
        {
            (
                true,
                format!(
                    "{} reachable, CA pin verified, identity worker-{} accepted",
                    cfg.url, id.worker_id
                ),
                None,
            )
        }
        (Some(_), _) => (
            false,
            format!("{} reachable, but it refuses the saved identity", cfg.url),
            Some("delete identity.json in the state directory and join again with a token".into()),
        ),
        (None, _) if have_token => (
            true,
            format!("{} reachable, CA pin verified; will join with the token", cfg.url),
            None,
        ),
        (None, _) => (
            false,
            format!("{} reachable, CA pin verified, but there is no join token", cfg.url),
            Some("pass --token (`longhaul token create` on the coordinator)".into()),
        ),
    }
}

/// Binds the ring port and sends a datagram to the advertised address.
fn probe_udp(listen: SocketAddr, advertise: Option<SocketAddr>) -> (bool, String, Option<String>) {
    let sock = match collectives::transport::bind(listen, 1 << 20) {
        Ok(s) => s,
        Err(e) => {
            return (
                false,
                format!("cannot bind UDP {listen}: {e}"),
                Some("stop what holds the port, or pick another with --ring-listen".into()),
            );
        }
    };
    let Some(target) = advertise else {
        return (true, format!("UDP {listen} bound (advertised address unknown)"), None);
    };
    let target = if target.ip().is_unspecified() {
        SocketAddr::new([127, 0, 0, 1].into(), target.port())
    } else {
        target
    };
    let result = (|| -> std::io::Result<bool> {
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        let sender = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        sender.send_to(b"longhaul-check", target)?;
        let mut buf = [0u8; 32];
        let (n, _) = sock.recv_from(&mut buf)?;
        Ok(&buf[..n] == b"longhaul-check")
    })();
    match result {
        Ok(true) => (
            true,
            format!(
                "UDP {listen} bound; a datagram to {target} arrived. Peers elsewhere must reach \
                 {target} too: open or forward UDP {} in firewalls and NAT",
                target.port()
            ),
            None,
        ),
        _ => (
            false,
            format!("UDP {listen} bound, but a datagram sent to {target} did not arrive"),
            Some(format!(
                "set --ring-advertise to an address of this host that reaches port {}, and \
                 open UDP {} in the firewall",
                listen.port(),
                listen.port()
            )),
        ),
    }
}
