//! `wanlab`: N hosts behind emulated WAN links, for any program (as root).
//!
//! ```text
//! wanlab run --hosts 4 --link transatlantic -- CMD ARGS...   # {rank} {world} {addr} {peers} {master} {port}
//! wanlab up --topology lab.toml                               # keep a lab up until Ctrl-C
//! wanlab calibrate --link transatlantic                        # asked vs measured
//! wanlab clean                                                 # remove labs left by a crash
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use benches::wanlab::{calibrate, lab, plot, run, tools, topology::Topology};
use clap::{Args, Parser, Subcommand};
use collectives::LinkPreset;
use collectives::wan::LinkCondition;

#[derive(Parser, Debug)]
#[command(
    name = "wanlab",
    version,
    about = "Hosts behind emulated WAN links (network namespaces + TUN + a userspace emulator)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug, Clone)]
struct LabArgs {
    /// Number of hosts (ignored with --topology).
    #[arg(long, default_value_t = 2)]
    hosts: usize,
    /// Link preset for every pair (lan, metro, continental, transatlantic, intercontinental, lossy).
    #[arg(long)]
    link: Option<LinkPreset>,
    /// Override the rate of every link, e.g. 250mbit.
    #[arg(long, value_parser = benches::perf::parse_rate)]
    rate: Option<u64>,
    /// A TOML topology file (see `benches/src/wanlab/topology.rs` or docs/wanlab.md).
    #[arg(long, conflicts_with_all = ["link", "hosts"])]
    topology: Option<PathBuf>,
    /// A fault: AT:cut:A-B:DURATION, AT:isolate:H:DURATION, AT:kill:H, AT:set:A-B:PRESET.
    #[arg(long = "fault")]
    faults: Vec<String>,
    /// Link MTU.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
}

impl LabArgs {
    fn topology(&self) -> Result<Topology> {
        let mut t = match &self.topology {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Topology::parse_toml(&text).with_context(|| format!("in {}", path.display()))?
            }
            None => {
                let cond = self.link.map_or_else(LinkCondition::none, LinkPreset::condition);
                let cond = if self.rate.is_some() { cond.with_rate_bps(self.rate) } else { cond };
                let mut t = Topology::uniform(self.hosts, cond)?;
                t.mtu = self.mtu;
                t
            }
        };
        for f in &self.faults {
            t.add_fault_spec(f)?;
        }
        Ok(t)
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run CMD in every host; exits with the worst exit code.
    Run {
        #[command(flatten)]
        lab: LabArgs,
        /// Base port of the `{peers}` addresses.
        #[arg(long, default_value_t = 7000)]
        port: u16,
        /// Keep a copy of each host's output in DIR/h<i>.log.
        #[arg(long)]
        logs: Option<PathBuf>,
        /// A sysctl applied in every host first, e.g. net.ipv4.tcp_wmem='4096 65536 67108864'.
        #[arg(long = "sysctl")]
        sysctls: Vec<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Create the lab and keep it until Ctrl-C.
    Up {
        #[command(flatten)]
        lab: LabArgs,
    },
    /// Measure what the emulator delivers between two hosts, for each preset given.
    Calibrate {
        /// Presets to calibrate (default: lan, continental, transatlantic, lossy).
        #[arg(long = "link")]
        links: Vec<LinkPreset>,
        /// Override the rate, e.g. 250mbit.
        #[arg(long, value_parser = benches::perf::parse_rate)]
        rate: Option<u64>,
        /// Seconds per throughput and loss measurement.
        #[arg(long, default_value_t = 8.0)]
        secs: f64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the namespaces (and their processes) of labs whose wanlab process is gone.
    Clean {
        /// Remove every lab, even those still running.
        #[arg(long)]
        all: bool,
    },
    /// Draw busbw against size from allreduce-perf and gloo JSON results.
    Plot {
        /// SVG file to write.
        #[arg(long)]
        out: PathBuf,
        /// Markdown table to write beside it.
        #[arg(long)]
        table: Option<PathBuf>,
        /// JSON result files, each named SYSTEM-PRESET.json.
        files: Vec<PathBuf>,
    },
    /// Measuring tools run inside the hosts.
    #[command(hide = true)]
    Tool {
        #[command(subcommand)]
        tool: ToolCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ToolCmd {
    UdpEcho {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        secs: f64,
    },
    UdpPing {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 20)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
    },
    TcpSink {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 0.0)]
        warmup: f64,
    },
    TcpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    UdpSink {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 30.0)]
        limit_secs: f64,
    },
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        /// Bits per second.
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 1472)]
        size: usize,
    },
    Reach {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 200)]
        every_ms: u64,
        #[arg(long)]
        secs: f64,
    },
    TcpAccept {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        secs: f64,
    },
}

fn main() -> ExitCode {
    benches::cli::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Tool { tool } => run_tool(tool).map(|()| 0),
        Cmd::Clean { all } => lab::clean(all).map(|removed| {
            for ns in &removed {
                println!("removed {ns}");
            }
            if removed.is_empty() {
                println!("nothing to clean");
            }
            0
        }),
        Cmd::Plot { out, table, files } => plot::plot(&files, &out, table.as_deref()).map(|()| 0),
        other => benches::cli::runtime()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(async_main(other))),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1)),
        Err(e) => {
            eprintln!("wanlab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main(cmd: Cmd) -> Result<i32> {
    match cmd {
        Cmd::Run { lab: args, port, logs, sysctls, command } => {
            let topology = args.topology()?;
            let lab = lab::Lab::create(topology).await?;
            describe(&lab);
            let spec = run::RunSpec { command, port, logs, sysctls };
            tokio::select! {
                codes = run::run(&lab, &spec) => {
                    let codes = codes?;
                    eprintln!("wanlab: exit codes by host: {codes:?}");
                    Ok(codes.into_iter().max().unwrap_or(0))
                }
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("wanlab: interrupted; tearing down");
                    Ok(130)
                }
            }
        }
        Cmd::Up { lab: args } => {
            let lab = lab::Lab::create(args.topology()?).await?;
            describe(&lab);
            println!("lab {} is up; Ctrl-C to tear it down", lab.id);
            tokio::signal::ctrl_c().await?;
            Ok(0)
        }
        Cmd::Calibrate { links, rate, secs, json } => {
            let presets = if links.is_empty() {
                vec![
                    LinkPreset::Lan,
                    LinkPreset::Continental,
                    LinkPreset::Transatlantic,
                    LinkPreset::Lossy,
                ]
            } else {
                links
            };
            let mut all = Vec::new();
            let mut ok = true;
            for p in presets {
                let cond = p.condition();
                let cond = if rate.is_some() { cond.with_rate_bps(rate) } else { cond };
                let lab = lab::Lab::create(Topology::uniform(2, cond)?).await?;
                let checks = calibrate::calibrate(&lab, secs)
                    .await
                    .with_context(|| format!("calibrating {p}"))?;
                ok &= checks.iter().all(|c| c.within);
                if !json {
                    calibrate::print(&p.to_string(), &checks);
                }
                all.push(serde_json::json!({ "preset": p.to_string(), "checks": checks }));
                drop(lab);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            }
            Ok(if ok { 0 } else { 1 })
        }
        Cmd::Tool { .. } | Cmd::Clean { .. } | Cmd::Plot { .. } => bail!("not an async command"),
    }
}

fn describe(lab: &lab::Lab) {
    eprintln!("wanlab: lab {} with {} hosts", lab.id, lab.topology.hosts);
    for h in 0..lab.topology.hosts {
        eprintln!("wanlab:   host {h}: namespace {} address {}", lab.namespace(h), lab.addr(h));
    }
}

fn run_tool(tool: ToolCmd) -> Result<()> {
    let print = |v: &dyn erased::Json| println!("{}", v.json());
    match tool {
        ToolCmd::UdpEcho { port, secs } => tools::udp_echo(port, secs)?,
        ToolCmd::UdpPing { to, count, interval_ms } => {
            print(&tools::udp_ping(to, count, Duration::from_millis(interval_ms))?)
        }
        ToolCmd::TcpSink { port, warmup } => print(&tools::tcp_sink(port, warmup)?),
        ToolCmd::TcpSend { to, secs, warmup } => print(&tools::tcp_send(to, secs, warmup)?),
        ToolCmd::UdpSink { port, limit_secs } => print(&tools::udp_sink(
            port,
            Duration::from_secs(2),
            Duration::from_secs_f64(limit_secs),
        )?),
        ToolCmd::UdpSend { to, rate, secs, size } => print(&tools::udp_send(to, rate, secs, size)?),
        ToolCmd::Reach { to, every_ms, secs } => {
            tools::reach(to, Duration::from_millis(every_ms), Duration::from_secs_f64(secs))?
        }
        ToolCmd::TcpAccept { port, secs } => tools::tcp_accept(port, secs)?,
    }
    Ok(())
}

mod erased {
    pub(crate) trait Json {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        }
    }
}
