//! The `longhaul` command line.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use proto::pb;
use proto::{RunId, RunState};

use client::pki::ca_hash;
use client::{ConnectArgs, Control, control};
use runspec::{self, RunSpec};

use crate::ca::read_ca_der;
use crate::server::{self, ServerConfig};
use crate::views::{self, liveness_name, run_json, state_name, uptime};

/// longhaul: train one model on GPUs scattered across the internet.
#[derive(Debug, Parser)]
#[command(name = "longhaul", version, about)]
pub struct Cli {
    /// State directory (CA, credentials, the state store). Default: ~/.longhaul.
    #[arg(long, global = true, env = "LONGHAUL_HOME")]
    home: Option<PathBuf>,
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Conn {
    /// Where the coordinator is; the CA pin defaults to the state directory's `ca.pem`.
    #[command(flatten)]
    at: ConnectArgs,
    /// The admin credential. Default: the state directory's admin.token.
    #[arg(long, global = true, env = "LONGHAUL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Output of read commands.
    #[arg(long, global = true, env = "LONGHAUL_OUTPUT", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
    /// For `ledger` (other commands print text).
    Csv,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve {
        /// gRPC (TLS) listen address.
        #[arg(long, env = "LONGHAUL_LISTEN", default_value = "0.0.0.0:7070")]
        listen: SocketAddr,
        /// Prometheus /metrics and /healthz listen address (plain HTTP).
        #[arg(long, env = "LONGHAUL_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
        metrics_listen: SocketAddr,
        /// Serve the web dashboard on this address (off unless given): plain HTTP on a loopback
        /// address, HTTPS with the coordinator's certificate on any other. It asks for the
        /// admin credential or a viewer token (`longhaul token create --viewer`).
        #[arg(long, env = "LONGHAUL_DASHBOARD_LISTEN")]
        dashboard_listen: Option<SocketAddr>,
        /// Serve shard bytes over HTTPS (mutual TLS) on this address, so workers need no shared
        /// filesystem; lease responses then carry each shard's URL. Off unless given.
        #[arg(long, env = "LONGHAUL_SHARDS_LISTEN")]
        shards_listen: Option<SocketAddr>,
        /// The base URL workers reach the shard listener at (default: https://<first --name, or
        /// localhost>:<port>); its host must be one of the certificate's names.
        #[arg(long, env = "LONGHAUL_SHARDS_URL")]
        shards_url: Option<String>,
        /// Extra names (DNS or IP) for the server certificate; localhost and loopback are always in.
        #[arg(long = "name", env = "LONGHAUL_SERVER_NAMES", value_delimiter = ',')]
        names: Vec<String>,
        /// A worker silent this long is suspect.
        #[arg(long, env = "LONGHAUL_SUSPECT_AFTER_MS", default_value_t = 3_000)]
        suspect_after_ms: u64,
        /// A worker silent this long is dead: its epoch is aborted and re-formed.
        #[arg(long, env = "LONGHAUL_DEAD_AFTER_MS", default_value_t = 10_000)]
        dead_after_ms: u64,
        /// A worker that died must be healthy this long before it rejoins an epoch.
        #[arg(long, env = "LONGHAUL_READMIT_AFTER_MS", default_value_t = 30_000)]
        readmit_after_ms: u64,
        /// Shard lease lifetime (at most a week).
        #[arg(long, env = "LONGHAUL_LEASE_TTL_MS", default_value_t = 300_000,
              value_parser = clap::value_parser!(u64).range(1_000..=604_800_000))]
        lease_ttl_ms: u64,
        /// How long a worker sits out after it was dropped from a ring it would not form or
        /// commit to (twice as long each time), or after it diverged twice.
        #[arg(long, env = "LONGHAUL_BENCH_FOR_MS", default_value_t = 60_000,
              value_parser = clap::value_parser!(u64).range(0..=86_400_000))]
        bench_for_ms: u64,
    },
    /// Write an annotated example run file.
    Init {
        #[arg(default_value = "run.toml")]
        path: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Submit a run file; with --follow, show progress and exit with the run's result.
    Submit {
        file: PathBuf,
        #[arg(long, short)]
        follow: bool,
        /// When stdout is not a terminal (CI logs, nohup): seconds between progress lines (a
        /// line is also printed at every change of the run's state).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        every: u64,
    },
    /// List runs.
    Runs,
    /// Show one run.
    Status { run: RunId },
    /// List workers and their contribution.
    Workers,
    /// A live terminal view of runs, the selected run's ring, workers and event log (q quits).
    Top {
        /// The run to select first (default: the newest).
        run: Option<RunId>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        every: u64,
    },
    /// Print a run's events; -f to follow until it ends.
    Logs {
        run: RunId,
        #[arg(long, short)]
        follow: bool,
        /// With -f and stdout not a terminal: seconds between status lines (and at every change
        /// of the run's state).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        every: u64,
    },
    /// Stop a run.
    Stop {
        run: RunId,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Join tokens for workers.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print the CA pin workers pass as --ca-hash.
    CaHash,
    /// Checkpoints: `checkpoint fetch RUN --to DIR` brings a run's model home.
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCommand,
    },
    /// Export a run's ledger, signed by the coordinator's CA key (`--output json`, the
    /// default, or `--output csv`); or `ledger verify FILE` to check one offline.
    #[command(args_conflicts_with_subcommands = true)]
    Ledger {
        #[command(subcommand)]
        check: Option<LedgerCommand>,
        /// The run.
        run: Option<RunId>,
        /// Write the ledger to this file instead of standard output.
        #[arg(long)]
        to: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum CheckpointCommand {
    /// Copy the run's newest verified checkpoint (its model as a majority of the members
    /// reported it) from a live worker that holds it, through the coordinator, into DIR:
    /// model.safetensors (loads into PyTorch as it is), meta.json, and the optimizer state.
    /// DIR must not exist or be empty; it appears only once every file verified.
    Fetch {
        run: RunId,
        /// This step's checkpoint instead of the newest.
        #[arg(long)]
        step: Option<u64>,
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Check a ledger file's signature, offline, against the CA pin (`--ca-hash`, or the CA in
    /// the state directory; with neither, it fails, naming the CA that signed it).
    Verify { file: PathBuf },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token for workers, or with --viewer a read-only token for the web
    /// dashboard.
    Create {
        /// A viewer token: it reads the dashboard (runs, workers, metrics, logs) and nothing
        /// else; it cannot be revoked before it expires.
        #[arg(long, conflicts_with = "uses")]
        viewer: bool,
        /// Lifetime: 90s, 30m, 12h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many distinct workers may join with it (a worker that joins again with the
        /// same key uses none).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        uses: u32,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .map(|n| Duration::from_secs(n * mult))
        .ok_or_else(|| format!("{s:?} is not a duration such as 90s, 30m, 12h or 7d"))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("LONGHAUL_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn home(cli_home: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(h) = cli_home {
        return Ok(h.clone());
    }
    let base = std::env::var_os("HOME").context("neither --home, LONGHAUL_HOME nor HOME is set")?;
    Ok(Path::new(&base).join(".longhaul"))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let home = home(&cli.home)?;
    match cli.command {
        Command::Init { path, force } => {
            if path.exists() && !force {
                bail!("{} exists (use --force to overwrite)", path.display());
            }
            std::fs::write(&path, runspec::EXAMPLE)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote {}; edit it, then `longhaul submit {}`",
                path.display(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger { check: Some(LedgerCommand::Verify { file }), .. } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let trusted = trusted_pin(&cli.conn, &home).ok();
            match crate::ledger::verify(&bytes, trusted.as_deref()) {
                Ok(v) if trusted.is_none() => {
                    // Anyone can sign with a CA of their own: without a pin to compare, this
                    // proves nothing.
                    eprintln!(
                        "{}: NOT VERIFIED: signed by {}, and no trusted CA to compare it with \
                         (pass --ca-hash with your coordinator's pin)",
                        file.display(),
                        v.ca
                    );
                    Ok(ExitCode::FAILURE)
                }
                Ok(v) => {
                    println!(
                        "{}: signature valid, {} bytes signed by {} (the trusted CA)",
                        file.display(),
                        v.body.len(),
                        v.ca
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{}: NOT VALID: {e}", file.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::CaHash => {
            let der = read_ca_der(&home)
                .context("reading the CA (start `longhaul serve` once to create it)")?;
            println!("{}", ca_hash(&der));
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            listen,
            metrics_listen,
            dashboard_listen,
            shards_listen,
            shards_url,
            names,
            suspect_after_ms,
            dead_after_ms,
            readmit_after_ms,
            lease_ttl_ms,
            bench_for_ms,
        } => {
            let mut config = ServerConfig::new(home);
            // The first name given is the one the shard URLs use.
            config.shards_url = shards_url.map(|u| u.trim_end_matches('/').to_owned());
            config.server_names.splice(0..0, names);
            config.server_names.dedup();
            config.cluster = crate::cluster::Config {
                suspect_after: suspect_after_ms,
                dead_after: dead_after_ms.max(suspect_after_ms),
                readmit_after: readmit_after_ms,
                lease_ttl: lease_ttl_ms,
                bench_for: bench_for_ms,
                ..Default::default()
            };
            runtime()?.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding {listen}"))?;
                let metrics = tokio::net::TcpListener::bind(metrics_listen)
                    .await
                    .with_context(|| format!("binding {metrics_listen}"))?;
                let shards = match shards_listen {
                    Some(a) => Some(
                        tokio::net::TcpListener::bind(a)
                            .await
                            .with_context(|| format!("binding {a}"))?,
                    ),
                    None => None,
                };
                let dashboard = match dashboard_listen {
                    Some(a) => Some(
                        tokio::net::TcpListener::bind(a)
                            .await
                            .with_context(|| format!("binding {a}"))?,
                    ),
                    None => None,
                };
                eprintln!(
                    "longhaul coordinator on {} (metrics on http://{}{}{})",
                    listener.local_addr()?,
                    metrics.local_addr()?,
                    match &shards {
                        Some(s) => format!(", shards over HTTPS on {}", s.local_addr()?),
                        None => String::new(),
                    },
                    match &dashboard {
                        Some(d) => {
                            let a = d.local_addr()?;
                            let scheme = if a.ip().is_loopback() { "http" } else { "https" };
                            format!(", dashboard on {scheme}://{a}/")
                        }
                        None => String::new(),
                    }
                );
                let listeners =
                    server::Listeners { api: listener, metrics: Some(metrics), shards, dashboard };
                server::run(listeners, config, shutdown_signal()).await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        command => {
            let conn = cli.conn;
            runtime()?.block_on(client_command(command, &conn, &home))
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The CA pin this CLI trusts: `--ca-hash`, or the hash of the state directory's CA.
fn trusted_pin(conn: &Conn, home: &Path) -> Result<String> {
    match conn.at.pin() {
        Some(p) => Ok(p.to_owned()),
        None => Ok(ca_hash(
            &read_ca_der(home).context("no --ca-hash given and no CA in the state directory")?,
        )),
    }
}

fn connect(conn: &Conn, home: &Path) -> Result<Control> {
    let pin = trusted_pin(conn, home)?;
    let token = match &conn.admin_token {
        Some(t) => t.clone(),
        None => std::fs::read_to_string(home.join("admin.token"))
            .with_context(|| format!("no --admin-token given and none in {}", home.display()))?
            .trim()
            .to_owned(),
    };
    Ok(control(&conn.at.config(&pin), &token)?)
}

pub(crate) fn rpc_err(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message()).context(format!("coordinator refused ({:?})", e.code()))
}

async fn client_command(command: Command, conn: &Conn, home: &Path) -> Result<ExitCode> {
    let json = conn.output == Output::Json;
    match command {
        Command::Submit { file, follow, every } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // Check here first: the same validation the coordinator does, without a round trip.
            RunSpec::parse(&text)
                .with_context(|| format!("{} is not a valid run file", file.display()))?;
            let mut c = connect(conn, home)?;
            let id = c
                .submit_run(pb::SubmitRunRequest { run_toml: text })
                .await
                .map_err(rpc_err)?
                .into_inner()
                .run_id;
            if json {
                println!("{}", serde_json::json!({ "run_id": id }));
            } else {
                eprintln!("submitted run {id}");
            }
            if follow {
                follow_run(&mut c, RunId(id), json, Duration::from_secs(every)).await
            } else {
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Runs => {
            let mut c = connect(conn, home)?;
            let mut runs = Vec::new();
            let mut after = 0;
            loop {
                let page = c
                    .list_runs(pb::ListRunsRequest { page_size: 1000, after })
                    .await
                    .map_err(rpc_err)?
                    .into_inner();
                runs.extend(page.runs);
                if page.next_after == 0 {
                    break;
                }
                after = page.next_after;
            }
            if json {
                println!("{}", serde_json::Value::Array(runs.iter().map(run_json).collect()));
            } else {
                println!(
                    "{:<5} {:<24} {:<10} {:>6} {:>14} {:>8} {:>10}",
                    "RUN", "NAME", "STATE", "EPOCH", "STEP", "WORKERS", "LOSS"
                );
                for r in &runs {
                    println!(
                        "{:<5} {:<24} {:<10} {:>6} {:>14} {:>8} {:>10}",
                        r.run_id,
                        r.name,
                        state_name(r.state),
                        r.epoch,
                        format!("{}/{}", r.committed_step, r.total_steps),
                        r.workers,
                        r.loss.map(fmt_loss).unwrap_or_else(|| "-".into())
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { run } => {
            let mut c = connect(conn, home)?;
            let r =
                c.get_run(pb::GetRunRequest { run_id: run.0 }).await.map_err(rpc_err)?.into_inner();
            if json {
                println!("{}", run_json(&r));
            } else {
                println!("run {} ({})", r.run_id, r.name);
                println!("  state      {}", state_name(r.state));
                println!("  message    {}", r.message);
                println!("  step       {}/{}", r.committed_step, r.total_steps);
                println!(
                    "  epoch      {} ({} workers, min {}, max {})",
                    r.epoch, r.workers, r.min_workers, r.max_workers
                );
                println!("  loss       {}", r.loss.map(fmt_loss).unwrap_or_else(|| "-".into()));
                println!("  accuracy   {}", percent(r.accuracy));
                println!("  tokens/s   {:.0}", r.tokens_per_sec);
                println!("  compute    {} of the time", percent(Some(r.compute_utilisation)));
                println!("  ring bytes {}", human_bytes(r.bytes_moved));
                println!(
                    "  params     {}",
                    if r.committed_hash.is_empty() { "-" } else { &r.committed_hash }
                );
                println!("  restarts   {}/{}", r.restarts, r.restart_budget);
                println!("  data epoch {}", r.data_epoch);
                if !r.latest_checkpoint.is_empty() {
                    println!("  checkpoint {}", r.latest_checkpoint);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Workers => {
            let mut c = connect(conn, home)?;
            let mut ws = Vec::new();
            let mut after = 0;
            loop {
                let page = c
                    .list_workers(pb::ListWorkersRequest { page_size: 1000, after })
                    .await
                    .map_err(rpc_err)?
                    .into_inner();
                ws.extend(page.workers);
                if page.next_after == 0 {
                    break;
                }
                after = page.next_after;
            }
            if json {
                let v: Vec<_> = ws.iter().map(views::worker_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(
                    "{:<12} {:<20} {:<22} {:<8} {:>5} {:>10} {:>10} {:>9} {:>8} {:>12} {:>10}",
                    "WORKER",
                    "HOST",
                    "RING ADDR",
                    "STATE",
                    "RUN",
                    "SAMPLES",
                    "VERIFIED",
                    "AUDITED",
                    "STEPS",
                    "BYTES",
                    "UPTIME"
                );
                for w in &ws {
                    println!(
                        "{:<12} {:<20} {:<22} {:<8} {:>5} {:>10} {:>10} {:>9} {:>8} {:>12} {:>10}",
                        w.name,
                        w.host,
                        w.ring_addr,
                        liveness_name(w.liveness),
                        w.run_id.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                        w.samples,
                        w.verified_samples,
                        // Audits its contributions passed / strikes.
                        format!("{}/{}", w.audits_passed, w.strikes),
                        w.steps,
                        w.bytes,
                        uptime(w.uptime_ms)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { run, follow, every } => {
            let mut c = connect(conn, home)?;
            if !follow {
                let r = c
                    .get_run(pb::GetRunRequest { run_id: run.0 })
                    .await
                    .map_err(rpc_err)?
                    .into_inner();
                print_event(&r, json);
                return Ok(ExitCode::SUCCESS);
            }
            let mut stream = c
                .watch_run(pb::WatchRunRequest { run_id: run.0 })
                .await
                .map_err(rpc_err)?
                .into_inner();
            let mut last = None;
            // On a terminal every event; in a log, one line per interval.
            let mut throttle = (!json && !std::io::stdout().is_terminal())
                .then(|| Throttle::new(Duration::from_secs(every)));
            while let Some(ev) = stream.message().await.map_err(rpc_err)? {
                if let Some(pb::run_event::Event::Status(r)) = ev.event {
                    if throttle.as_mut().is_none_or(|t| t.due(Instant::now(), r.state)) {
                        print_event(&r, json);
                    }
                    last = Some(r.state);
                }
            }
            Ok(exit_for(last))
        }
        Command::Top { run, every } => {
            let c = connect(conn, home)?;
            crate::top::run(
                c,
                conn.at.coordinator.clone(),
                Duration::from_secs(every),
                run.map(|r| r.0),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stop { run, reason } => {
            let mut c = connect(conn, home)?;
            let r = c
                .stop_run(pb::StopRunRequest { run_id: run.0, reason })
                .await
                .map_err(rpc_err)?
                .into_inner();
            eprintln!("run {} {}", r.run_id, state_name(r.state));
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { command: TokenCommand::Create { viewer, ttl, uses } } => {
            let mut c = connect(conn, home)?;
            let (token, expires_unix_ms, what) = if viewer {
                let t = c
                    .create_viewer_token(pb::CreateViewerTokenRequest {
                        ttl_seconds: ttl.as_secs(),
                    })
                    .await
                    .map_err(rpc_err)?
                    .into_inner();
                let what = format!(
                    "a read-only dashboard token; expires in {}s (open the dashboard at \
                     <its address>/#token=<this token>, or paste it there)",
                    ttl.as_secs()
                );
                (t.token, t.expires_unix_ms, what)
            } else {
                let t = c
                    .create_join_token(pb::CreateJoinTokenRequest {
                        ttl_seconds: ttl.as_secs(),
                        uses,
                    })
                    .await
                    .map_err(rpc_err)?
                    .into_inner();
                let what = format!(
                    "expires in {}s; {uses} worker{} may join with it",
                    ttl.as_secs(),
                    if uses == 1 { "" } else { "s" }
                );
                (t.token, t.expires_unix_ms, what)
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "token": token, "expires_unix_ms": expires_unix_ms })
                );
            } else {
                println!("{token}");
                eprintln!("{what}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger { check: None, run, to } => {
            let run = run.context("which run? `longhaul ledger RUN` (or `ledger verify FILE`)")?;
            let mut c = connect(conn, home)?;
            let format = if conn.output == Output::Csv { "csv" } else { "json" };
            let mut stream = c
                .export_ledger(pb::ExportLedgerRequest { run_id: run.0, format: format.into() })
                .await
                .map_err(rpc_err)?
                .into_inner();
            let mut doc = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(rpc_err)? {
                doc.extend_from_slice(&chunk.data);
            }
            // Signed by the coordinator this CLI trusts (the pin it connected with).
            let pin = trusted_pin(conn, home)?;
            let v = crate::ledger::verify(&doc, Some(&pin))
                .map_err(|e| anyhow::anyhow!("the coordinator's ledger does not verify: {e}"))?;
            let signer = v.ca.clone();
            match to {
                Some(path) => {
                    let tmp = path.with_extension("partial");
                    std::fs::write(&tmp, &doc)
                        .and_then(|()| std::fs::rename(&tmp, &path))
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "ledger of run {run} written to {} ({} bytes, signed by {signer})",
                        path.display(),
                        doc.len()
                    );
                }
                None => {
                    use std::io::Write;
                    std::io::stdout().write_all(&doc).context("writing the ledger")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Checkpoint { command: CheckpointCommand::Fetch { run, step, to } } => {
            let mut c = connect(conn, home)?;
            let got = crate::fetch::fetch(&mut c, run, step, &to).await?;
            let files: Vec<String> =
                got.files.iter().map(|(n, b)| format!("{n} ({})", human_bytes(*b))).collect();
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&got).context("encoding")?);
            } else {
                println!("{}", to.display());
            }
            eprintln!(
                "step {} of run {run} from worker-{} into {}: {}; the model is the one {} of {} \
                 members reported (SHA-256 {}), and so is every other file and the model's \
                 description",
                got.step,
                got.worker,
                to.display(),
                files.join(", "),
                got.agreeing,
                got.members,
                got.model_sha256
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger { check: Some(_), .. } => unreachable!("handled without a client"),
        Command::Serve { .. } | Command::Init { .. } | Command::CaHash => {
            unreachable!("handled without a client")
        }
    }
}

/// A loss with 4 decimals, or in scientific notation when that would show only zeros.
fn fmt_loss(l: f64) -> String {
    if l != 0.0 && l.abs() < 1e-3 { format!("{l:.2e}") } else { format!("{l:.4}") }
}

/// A fraction as a percentage, or "-".
fn percent(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite()).map(|v| format!("{:.1}%", v * 100.0)).unwrap_or_else(|| "-".into())
}

/// Bytes with a binary unit.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn print_event(r: &pb::RunInfo, json: bool) {
    if json {
        println!("{}", run_json(r));
    } else {
        println!(
            "{} run {} {} epoch {} step {}/{} workers {} loss {} | {}",
            r.updated_unix_ms,
            r.run_id,
            state_name(r.state),
            r.epoch,
            r.committed_step,
            r.total_steps,
            r.workers,
            r.loss.map(fmt_loss).unwrap_or_else(|| "-".into()),
            r.message
        );
    }
}

fn exit_for(state: Option<i32>) -> ExitCode {
    match state.and_then(|s| proto::convert::run_state(s).ok()) {
        Some(RunState::Completed) => ExitCode::SUCCESS,
        Some(RunState::Stopped) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// When progress goes to a log rather than a terminal: whether a line is due, one per
/// interval and one at every change of the run's state.
struct Throttle {
    every: Duration,
    last: Option<(Instant, i32)>,
}

impl Throttle {
    fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    fn due(&mut self, now: Instant, state: i32) -> bool {
        let due = self
            .last
            .is_none_or(|(at, s)| s != state || now.saturating_duration_since(at) >= self.every);
        if due {
            self.last = Some((now, state));
        }
        due
    }
}

/// One run's progress in a line: the bar's message, and the line a log gets.
fn progress(r: &pb::RunInfo) -> String {
    format!(
        "loss {} | acc {} | {:.0} tok/s | compute {} | ring {} | {} workers | epoch {} | params {} | {}",
        r.loss.map(fmt_loss).unwrap_or_else(|| "-".into()),
        percent(r.accuracy),
        r.tokens_per_sec,
        percent(Some(r.compute_utilisation)),
        human_bytes(r.bytes_moved),
        r.workers,
        r.epoch,
        if r.committed_hash.is_empty() { "-" } else { &r.committed_hash },
        state_name(r.state)
    )
}

/// Live progress until the run ends; the exit code is the run's result. On a terminal, a
/// progress bar; otherwise (CI logs, nohup) one plain line per `every` and at every change of
/// state, and the run's log lines as they come.
async fn follow_run(c: &mut Control, run: RunId, json: bool, every: Duration) -> Result<ExitCode> {
    let mut stream =
        c.watch_run(pb::WatchRunRequest { run_id: run.0 }).await.map_err(rpc_err)?.into_inner();
    let bar = indicatif::ProgressBar::new(0);
    let mut plain = (!json && !std::io::stdout().is_terminal()).then(|| Throttle::new(every));
    if json || plain.is_some() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} run {prefix} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(run.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last: Option<pb::RunInfo> = None;
    while let Some(ev) = stream.message().await.map_err(rpc_err)? {
        let r = match ev.event {
            Some(pb::run_event::Event::Status(r)) => r,
            Some(pb::run_event::Event::Log(line)) => {
                if json {
                    println!("{}", serde_json::json!({ "unix_ms": ev.unix_ms, "log": line }));
                } else if plain.is_some() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
                continue;
            }
            None => continue,
        };
        bar.set_length(r.total_steps);
        bar.set_position(r.committed_step);
        bar.set_message(progress(&r));
        if json {
            println!("{}", run_json(&r));
        } else if let Some(t) = plain.as_mut()
            && t.due(Instant::now(), r.state)
        {
            println!("run {run} step {}/{} | {}", r.committed_step, r.total_steps, progress(&r));
        }
        last = Some(r);
    }
    bar.finish();
    let state = last.as_ref().map(|r| r.state);
    if let Some(r) = &last {
        eprintln!("run {} {}: {}", r.run_id, state_name(r.state), r.message);
    }
    Ok(exit_for(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_gets_one_progress_line_per_interval_and_one_per_state_change() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let lines: Vec<u64> =
            (0..35).filter(|s| t.due(at(*s), if *s < 32 { 1 } else { 3 })).collect();
        assert_eq!(lines, vec![0, 10, 20, 30, 32], "every 10 s, and when the state changed");
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(percent(Some(0.655)), "65.5%");
        assert_eq!(percent(None), "-");
        assert_eq!(percent(Some(f64::NAN)), "-");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
