//! `allreduce-perf`: nccl-tests-style all-reduce benchmark over the QUIC ring.
//!
//! Ranks run as threads of this process (`-g N`), as separate processes that this program
//! launches on loopback (`--launch N`), or as one process per rank started by you or by the
//! WAN lab (`--rank R --peers ADDR,ADDR,... --pki DIR`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use benches::perf::{self, DTypeArg, Row, Sweep};
use clap::{Args, Parser, Subcommand};
use collectives::testing::{LocalRing, rank_names};
use collectives::{
    Compression, Congestion, DevCa, Emulation, Group, GroupSpec, Identity, LinkCondition,
    LinkPreset, Member, NetConfig, TrustAnchor,
};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "allreduce-perf",
    version,
    about = "All-reduce benchmark over the longhaul QUIC ring (nccl-tests style)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a throwaway CA and one certificate per rank, for --rank/--pki runs.
    Pki {
        /// Number of ranks (certificates for rank-0 .. rank-N-1).
        #[arg(long, short = 'g')]
        ranks: usize,
        /// Output directory (ca.pem, rank-N/cert.pem, rank-N/key.pem).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct BenchArgs {
    /// Ranks, as threads of this process.
    #[arg(short = 'g', long, default_value_t = 4)]
    ranks: usize,
    /// Launch this many ranks as separate processes on loopback.
    #[arg(long, conflicts_with = "rank")]
    launch: Option<usize>,
    /// This process's rank (with --peers and --pki).
    #[arg(long, env = "LONGHAUL_RANK", requires_all = ["peers", "pki"])]
    rank: Option<usize>,
    /// Every rank's listen address, in rank order, comma separated.
    #[arg(long, env = "LONGHAUL_PEERS", value_delimiter = ',')]
    peers: Vec<SocketAddr>,
    /// Directory written by `allreduce-perf pki`.
    #[arg(long, env = "LONGHAUL_PKI")]
    pki: Option<PathBuf>,
    /// Smallest size, bytes (suffixes K, M, G).
    #[arg(short = 'b', long = "minbytes", default_value = "1M", value_parser = perf::parse_size)]
    min_bytes: usize,
    /// Largest size, bytes (suffixes K, M, G).
    #[arg(short = 'e', long = "maxbytes", default_value = "64M", value_parser = perf::parse_size)]
    max_bytes: usize,
    /// Multiplication factor between sizes.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 4)]
    factor: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 5)]
    iters: usize,
    /// Warm-up iterations per size (not timed).
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 1)]
    warmup: usize,
    /// Element type.
    #[arg(short = 'd', long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// Reduction: sum or avg.
    #[arg(short = 'o', long, default_value = "sum", value_parser = ["sum", "avg"])]
    op: String,
    /// Compression on the wire: none, bf16, int8.
    #[arg(short = 'c', long, default_value_t = Compression::None)]
    compression: Compression,
    /// Emulated link preset applied to every rank's egress (lan, metro, continental,
    /// transatlantic, intercontinental, lossy); none by default.
    #[arg(long, env = "LONGHAUL_LINK")]
    link: Option<LinkPreset>,
    /// Override the emulated link rate, e.g. 250mbit.
    #[arg(long, value_parser = perf::parse_rate)]
    rate: Option<u64>,
    /// QUIC connections per neighbour.
    #[arg(long, default_value_t = 2)]
    conns: usize,
    /// Congestion controller: cubic, bbr, newreno.
    #[arg(long, default_value_t = Congestion::Bbr)]
    cc: Congestion,
    /// Chunk size, bytes of f32 data (the unit of pipelining).
    #[arg(long, default_value = "1M", value_parser = perf::parse_size)]
    chunk: usize,
    /// RTT the windows are sized for, ms (default: the link preset's, or 1 ms).
    #[arg(long)]
    rtt_ms: Option<f64>,
    /// Rate the windows are sized for, e.g. 1gbit (default: the link's, or 10gbit).
    #[arg(long, value_parser = perf::parse_rate)]
    window_rate: Option<u64>,
    /// Largest UDP payload MTU discovery may use.
    #[arg(long, default_value_t = 1452)]
    max_udp_payload: u16,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Print nothing unless this is rank 0 (set for launched children).
    #[arg(long, hide = true)]
    quiet: bool,
}

impl BenchArgs {
    fn sweep(&self) -> Result<Sweep> {
        if self.min_bytes > self.max_bytes {
            bail!("--minbytes {} is larger than --maxbytes {}", self.min_bytes, self.max_bytes);
        }
        if self.iters == 0 {
            bail!("--iters must be at least 1");
        }
        Ok(Sweep {
            min_bytes: self.min_bytes,
            max_bytes: self.max_bytes,
            factor: self.factor,
            iters: self.iters,
            warmup: self.warmup,
            dtype: self.dtype,
            compression: self.compression,
            average: self.op == "avg",
        })
    }

    fn condition(&self) -> Option<LinkCondition> {
        match (self.link, self.rate) {
            (Some(p), rate) => Some(p.condition().with_rate_bps(rate.or(p.condition().rate_bps))),
            (None, Some(rate)) => Some(LinkCondition::none().with_rate_bps(Some(rate))),
            (None, None) => None,
        }
    }

    fn net(&self) -> NetConfig {
        let cond = self.condition();
        let rtt = match (self.rtt_ms, &cond) {
            (Some(ms), _) => Duration::from_secs_f64(ms / 1000.0),
            (None, Some(c)) => c.rtt().max(Duration::from_millis(1)),
            (None, None) => Duration::from_millis(1),
        };
        let rate = self.window_rate.or(cond.and_then(|c| c.rate_bps)).unwrap_or(10_000_000_000);
        NetConfig {
            link_rate_bps: rate,
            rtt,
            connections_per_peer: self.conns,
            congestion: self.cc,
            chunk_bytes: self.chunk,
            max_udp_payload: self.max_udp_payload,
            idle_timeout: Duration::from_secs(10).max(rtt * 20),
            ..NetConfig::default()
        }
    }

    fn emulation(&self, seed: u64) -> Option<Emulation> {
        self.condition().map(|condition| Emulation { condition, seed })
    }

    fn describe(&self, world: usize) -> String {
        let link = match (self.link, self.condition()) {
            (Some(p), Some(c)) => format!(
                "{p} ({:?} RTT, {}, loss {:.3} %)",
                c.rtt(),
                rate_text(c.rate_bps),
                c.loss.mean_loss() * 100.0
            ),
            (None, Some(c)) => format!("rate limit {}", rate_text(c.rate_bps)),
            _ => "none (raw loopback)".into(),
        };
        let net = self.net();
        format!(
            "# longhaul allreduce-perf: {world} ranks, link {link}\n#   {} conns/peer, {} congestion control, chunk {} B, windows sized for {} x {:?}",
            net.connections_per_peer,
            net.congestion,
            net.chunk_bytes,
            rate_text(Some(net.link_rate_bps)),
            net.rtt
        )
    }
}

fn rate_text(rate: Option<u64>) -> String {
    match rate {
        None => "unlimited".into(),
        Some(r) if r >= 1_000_000_000 => format!("{} Gbit/s", r as f64 / 1e9),
        Some(r) => format!("{} Mbit/s", r as f64 / 1e6),
    }
}

#[derive(Serialize)]
struct Report<'a> {
    ranks: usize,
    link: Option<String>,
    rate_bps: Option<u64>,
    connections_per_peer: usize,
    congestion: String,
    sweep: &'a Sweep,
    results: &'a [Row],
}

fn main() -> ExitCode {
    benches::cli::init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Pki { ranks, out }) => write_pki(ranks, &out),
        None => bench(cli.bench),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("allreduce-perf: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn write_pki(ranks: usize, out: &std::path::Path) -> Result<()> {
    if ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let ca = DevCa::new("allreduce-perf")?;
    ca.write_dir(out, &rank_names(ranks))?;
    println!("wrote a CA and {ranks} certificates to {}", out.display());
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    let sweep = args.sweep()?;
    args.net().check().map_err(anyhow::Error::msg)?;
    if let Some(n) = args.launch {
        return launch(&args, n);
    }
    let (world, rows) = match args.rank {
        Some(rank) => (args.peers.len(), run_process(&args, &sweep, rank)?),
        None => (args.ranks, run_threads(&args, &sweep)?),
    };
    if args.quiet {
        return Ok(());
    }
    print_report(&args, &sweep, world, &rows)
}

fn print_report(args: &BenchArgs, sweep: &Sweep, world: usize, rows: &[Row]) -> Result<()> {
    if args.json {
        let cond = args.condition();
        let report = Report {
            ranks: world,
            link: args.link.map(|l| l.to_string()),
            rate_bps: cond.and_then(|c| c.rate_bps),
            connections_per_peer: args.conns,
            congestion: args.cc.to_string(),
            sweep,
            results: rows,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", args.describe(world));
        println!("{}", perf::table_header());
        for r in rows {
            println!("{}", perf::table_row(sweep, r));
        }
        if let Some(r) = rows.iter().max_by_key(|r| r.bytes) {
            println!(
                "# busbw at {} B: {:.4} GB/s = {:.3} Gbit/s",
                r.bytes,
                r.busbw_gbps,
                r.busbw_gbps * 8.0
            );
        }
    }
    if rows.iter().any(|r| !r.agree) {
        bail!("ranks ended with different results");
    }
    Ok(())
}

fn run_threads(args: &BenchArgs, sweep: &Sweep) -> Result<Vec<Row>> {
    if args.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let net = args.net();
    let parts = LocalRing::build(args.ranks, 1, &net, args.emulation(1))?;
    let threads: Vec<_> = parts
        .into_iter()
        .map(|p| {
            let sweep = sweep.clone();
            std::thread::spawn(move || -> Result<Vec<Row>> {
                let rank = p.spec.rank;
                let rt = benches::cli::runtime()?;
                rt.block_on(async move {
                    let mut g =
                        p.join().await.with_context(|| format!("rank {rank}: forming the ring"))?;
                    let rows =
                        perf::run(&mut g, &sweep).await.with_context(|| format!("rank {rank}"))?;
                    g.close().await;
                    Ok(rows)
                })
            })
        })
        .collect();
    let mut rank0 = None;
    let mut first_err = None;
    for t in threads {
        match t.join() {
            Ok(Ok(rows)) => {
                rank0.get_or_insert(rows);
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow::anyhow!("a rank thread panicked"));
            }
        }
    }
    match (first_err, rank0) {
        (Some(e), _) => Err(e),
        (None, Some(rows)) => Ok(rows),
        (None, None) => bail!("no rank reported"),
    }
}

fn run_process(args: &BenchArgs, sweep: &Sweep, rank: usize) -> Result<Vec<Row>> {
    let world = args.peers.len();
    if rank >= world {
        bail!("--rank {rank} is outside the {world} addresses given by --peers");
    }
    let Some(dir) = &args.pki else { bail!("--pki is required with --rank") };
    let names = rank_names(world);
    let anchor =
        TrustAnchor::load(dir).with_context(|| format!("reading the CA from {}", dir.display()))?;
    let identity = Identity::load(dir, &names[rank])?;
    let members =
        names.iter().zip(&args.peers).map(|(n, a)| Member { name: n.clone(), addr: *a }).collect();
    let spec = GroupSpec {
        epoch: 1,
        members,
        rank,
        net: args.net(),
        emulation: args.emulation(1 + rank as u64),
        port: None,
    };
    benches::cli::runtime()?.block_on(async move {
        let mut g = Group::join(spec, &anchor, &identity).await.context("forming the ring")?;
        let rows = perf::run(&mut g, sweep).await?;
        g.close().await;
        Ok(rows)
    })
}

/// Starts `n` copies of this program as ranks on loopback and waits for them all.
fn launch(args: &BenchArgs, n: usize) -> Result<()> {
    if n == 0 {
        bail!("--launch must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("allreduce-perf-{}", std::process::id()));
    DevCa::new("allreduce-perf")?.write_dir(&dir, &rank_names(n))?;
    // Free ports: bind, note, release. Another program could take one in between; the rank
    // that cannot bind then fails with a clear error.
    let peers: Vec<SocketAddr> = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()))
        .collect::<Result<_, _>>()?;
    let peer_list = peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let exe = std::env::current_exe()?;
    let forwarded = forwarded_args(args);
    let mut children = Vec::new();
    for rank in 0..n {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(&forwarded)
            .arg("--rank")
            .arg(rank.to_string())
            .arg("--peers")
            .arg(&peer_list)
            .arg("--pki")
            .arg(&dir);
        if rank != 0 {
            cmd.arg("--quiet");
        }
        children.push((rank, cmd.spawn().with_context(|| format!("starting rank {rank}"))?));
    }
    let mut failed = Vec::new();
    for (rank, mut child) in children {
        let status = child.wait()?;
        if !status.success() {
            failed.push(format!("rank {rank} exited with {status}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

fn forwarded_args(a: &BenchArgs) -> Vec<String> {
    let mut v = vec![
        format!("--minbytes={}", a.min_bytes),
        format!("--maxbytes={}", a.max_bytes),
        format!("--stepfactor={}", a.factor),
        format!("--iters={}", a.iters),
        format!("--warmup_iters={}", a.warmup),
        format!(
            "--dtype={}",
            match a.dtype {
                DTypeArg::F32 => "f32",
                DTypeArg::Bf16 => "bf16",
                DTypeArg::F16 => "f16",
            }
        ),
        format!("--op={}", a.op),
        format!("--compression={}", a.compression),
        format!("--conns={}", a.conns),
        format!("--cc={}", a.cc),
        format!("--chunk={}", a.chunk),
        format!("--max-udp-payload={}", a.max_udp_payload),
    ];
    if let Some(l) = a.link {
        v.push(format!("--link={l}"));
    }
    if let Some(r) = a.rate {
        v.push(format!("--rate={r}"));
    }
    if let Some(r) = a.rtt_ms {
        v.push(format!("--rtt-ms={r}"));
    }
    if let Some(r) = a.window_rate {
        v.push(format!("--window-rate={r}"));
    }
    if a.json {
        v.push("--json".into());
    }
    v
}
