//! The trainer thread's loop: epochs in, training steps, reports out.
//!
//! For each epoch the coordinator announces, the driver reports the state it holds
//! (`StepCommitted`), forms the ring (a `collectives` group), waits for the coordinator's
//! agreement (who sends the recorded state to whom) and runs it, then trains: `ddp`
//! synchronises every step, `diloco` every `inner_steps`. Every synchronisation goes by plan:
//! the driver commits the trainer's statistics (`SyncCommit`) and hands it the coordinator's
//! `SyncPlan` ([`Planner`]); after it, it reports the state hash (`StepCommitted`). When the
//! agent cancels the attempt (a newer epoch, an abort, a stop), the collective in flight fails
//! on every member and the driver goes back to waiting for the next epoch; the failed step
//! (ddp) or outer sync (diloco) is retried there. A ring that fails is reported (`RingFault`,
//! naming the peer to blame where there is one); a failed epoch that no newer one replaces is
//! re-formed after [`DriverConfig::retry_after`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use client::AgentRpc;
use collectives::group::{Emulation, Group, GroupSpec, Member};
use collectives::{NetConfig, PortLease};
use proto::pb;
use proto::pb::agent_message::Msg as Up;
use runspec::RunSpec;
use tokio::runtime::Handle;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::agent::{self, Attempt, Down, EpochInfo, Identity, Lease, TrainerSide};
use crate::comm::{Comm, RingComm};
use crate::lifecycle::{Action, Ended, EpochRef, Event, Lifecycle, Next};
use crate::trainer::checkpoint::{self, Cursor};
use crate::trainer::data::{Batch, ShardData, ShardReader, Span, order_seed, shard_seed};
use crate::trainer::plan::{self, DeviceChoice, ShardFormat};
use crate::trainer::{Agreement, Commitment, Coordinate, Plan, SyncMode, TrainError, Trainer};
use collectives::group::{JoinError, OpError};
use proto::ParamHash;
use proto::pb::FaultKind;

/// How the driver runs.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Checkpoints and the shard cache live under here.
    pub state_dir: PathBuf,
    pub device: DeviceChoice,
    pub net: NetConfig,
    /// WAN emulation applied to what this worker sends on the ring.
    pub emulation: Option<Emulation>,
    /// The local address the ring endpoint binds.
    pub ring_bind: SocketAddr,
    /// How often metrics go to the coordinator.
    pub metrics_every: Duration,
    /// A failed epoch that no newer epoch replaces is re-formed after this long.
    pub retry_after: Duration,
    /// Fault injection (chaos tests): corrupt what this worker sends.
    pub poison: Option<crate::trainer::Poison>,
    /// Fault injection (adversary tests): lie to the coordinator.
    pub attack: Option<Attack>,
    /// How to reach the coordinator (for a client with a renewed certificate).
    pub connect: client::ConnectConfig,
}

/// A hostile worker's lies to the coordinator, for the adversary tests (hidden
/// `--fault-attack`). Each is something a stranger's machine could do; the tests check that it
/// gains nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    /// At every epoch, report the run's last step with a made-up hash (forged completion).
    ForgeComplete,
    /// After every sync, report a made-up hash instead of its own.
    ForgeHash,
    /// After every sync, accuse its ring successor of misbehaving.
    Accuse,
    /// At every epoch, claim to hold a state far ahead of the record.
    ClaimAhead,
    /// With every metrics report, a flood of hundreds more, some non-finite.
    MetricsFlood,
    /// With every metrics report, checkpoint reports for runs it is not in, and huge ones.
    CheckpointSpam,
    /// Heartbeat and report, but never join the ring.
    NoRing,
    /// Answer every audit with a digest other than the one it recomputed (to frame the audited
    /// member).
    AuditLie,
}

impl Attack {
    pub const NAMES: [&'static str; 8] = [
        "forge-complete",
        "forge-hash",
        "accuse",
        "claim-ahead",
        "metrics-flood",
        "checkpoint-spam",
        "no-ring",
        "audit-lie",
    ];

    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "forge-complete" => Self::ForgeComplete,
            "forge-hash" => Self::ForgeHash,
            "accuse" => Self::Accuse,
            "claim-ahead" => Self::ClaimAhead,
            "metrics-flood" => Self::MetricsFlood,
            "checkpoint-spam" => Self::CheckpointSpam,
            "no-ring" => Self::NoRing,
            "audit-lie" => Self::AuditLie,
            other => return Err(format!("unknown attack {other:?}: {}", Self::NAMES.join(", "))),
        })
    }
}

/// What the trainer thread needs.
#[derive(Debug)]
pub struct Driver {
    cfg: DriverConfig,
    rt: Handle,
    link: TrainerSide,
    identity: Identity,
    rpc: AgentRpc,
    latest: Option<EpochInfo>,
    /// The latest agreement and plan the coordinator sent (for the epoch in progress).
    agreement: Option<(u64, u64, Agreement)>,
    plan: Option<(u64, u64, Plan)>,
    /// A message of an epoch that could not be read: (run, epoch, why).
    unreadable: Option<(u64, u64, String)>,
    ctx: Option<RunCtx>,
    /// A stop that arrived while the run's state was out in an epoch.
    stop: Option<(u64, String)>,
    /// What to do next (the pure core).
    life: Lifecycle,
    /// The ring port of the last group this worker formed or tried to: released before the
    /// next one binds it (the old endpoint may still be draining its connections).
    port: Option<PortLease>,
    /// What determines the bits of this worker's computation (`SyncCommit.profile`).
    profile: String,
    /// Audits given to this member, done one per sync (ddp), oldest first.
    audits: std::collections::VecDeque<pb::AuditTask>,
}

/// Audits a member holds at most; more are answered "busy" at once.
const MAX_AUDITS: usize = 4;

/// States kept for audits (ddp): more than the syncs an audit lives at the coordinator
/// (`cluster::audits::AUDIT_SYNCS`, 4), so an auditor asked in time holds the state.
const AUDIT_WINDOW: usize = 6;

/// This machine's reproducibility profile: what the bits of a CPU computation depend on (the
/// CPU model, libtorch's thread count, this build). Empty on CUDA, where the GPU model also
/// matters and is not known here: a CUDA worker is not audited (see docs/verification.md).
fn profile(device: tch::Device) -> String {
    if device != tch::Device::Cpu {
        return String::new();
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned());
    let capability = std::env::var("ATEN_CPU_CAPABILITY").unwrap_or_default();
    let text = format!(
        "cpu|{cpu}|{capability}|threads={}|longhaul {}",
        tch::get_num_threads(),
        env!("CARGO_PKG_VERSION")
    );
    text.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(256).collect()
}

/// Why a run could not be started.
#[derive(Debug)]
struct StartError {
    err: anyhow::Error,
    /// Something that may pass (fetching the first shard), rather than the run's content or
    /// this machine (a run file, a model, a device it cannot use).
    passing: bool,
}

impl From<anyhow::Error> for StartError {
    fn from(err: anyhow::Error) -> Self {
        Self { err, passing: false }
    }
}

/// How an epoch ended.
#[derive(Debug)]
enum Outcome {
    /// The run's last step is synchronised (and checkpointed): wait for the coordinator's stop.
    Finished,
    /// A newer epoch, an abort or a stop ended it.
    Interrupted(String),
    /// Something local failed; the same epoch may be retried.
    Failed(String),
    /// The ring could not be formed.
    Ring(JoinError),
    /// A sync or the agreement failed in the ring.
    Train(TrainError),
}

/// Totals of one run on this worker.
#[derive(Debug, Default)]
struct Totals {
    comm: Duration,
    bytes_sent: u64,
    bytes_received: u64,
}

/// What is reported since the last metrics report.
#[derive(Debug, Default)]
struct Window {
    loss_sum: f64,
    steps: u64,
    correct: i64,
    counted: i64,
    samples: u64,
    tokens: u64,
}

/// The state of the run this worker trains.
#[derive(Debug)]
struct RunCtx {
    run: u64,
    spec: RunSpec,
    total: u64,
    trainer: Trainer,
    feeder: Feeder,
    /// When this worker first trained in a ring of the run: compute, communication and idle
    /// time are counted from here (model building and waiting for the first epoch are not).
    started: Option<Instant>,
    totals: Totals,
    window: Window,
    /// Tokens trained on since `started`, for the run's average rate in the final report.
    tokens: u64,
    /// Ring bytes (sent + received) already counted in a report.
    bytes_reported: u64,
    last_report: Instant,
    checkpoint_wanted: bool,
    last_checkpoint: Option<u64>,
    epoch: u64,
}

impl RunCtx {
    fn comm_in(&self, comm: Option<&RingComm>) -> (Duration, u64, u64) {
        let t = comm.map(|c| c.traffic()).unwrap_or_default();
        (
            self.totals.comm + t.busy,
            self.totals.bytes_sent + t.bytes_sent,
            self.totals.bytes_received + t.bytes_received,
        )
    }
}

impl Driver {
    pub fn new(
        cfg: DriverConfig,
        rt: Handle,
        link: TrainerSide,
        identity: Identity,
        rpc: AgentRpc,
    ) -> Self {
        let life = Lifecycle::new(cfg.retry_after);
        Self {
            cfg,
            rt,
            link,
            identity,
            rpc,
            latest: None,
            agreement: None,
            plan: None,
            unreadable: None,
            ctx: None,
            stop: None,
            life,
            port: None,
            profile: String::new(),
            audits: Default::default(),
        }
    }

    fn checkpoint_dir(&self) -> PathBuf {
        checkpoint::root(&self.cfg.state_dir, &self.identity.ca_pin)
    }

    /// Runs until the link closes or something fatal happens. What to do next is the
    /// [`Lifecycle`]'s decision; this loop does it and tells the core how it went.
    pub fn run(mut self) -> Result<()> {
        loop {
            // Commands first: they may change what to do.
            loop {
                match self.link.down.try_recv() {
                    Ok(cmd) => self.on_command(cmd)?,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Ok(()), // shutting down
                }
            }
            match self.life.next(Instant::now()) {
                Next::Wait => {
                    if !self.wait_for_command(None)? {
                        return Ok(());
                    }
                }
                Next::WaitUntil(t) => {
                    if !self.wait_for_command(Some(t))? {
                        return Ok(());
                    }
                }
                Next::Start(at) => {
                    let Some(e) = self.latest_epoch().cloned() else { continue };
                    let event = match self.start_run(&e) {
                        Ok(ctx) => {
                            self.ctx = Some(ctx);
                            Event::Started { run: at.run }
                        }
                        Err(StartError { err, passing }) => {
                            // A run this worker cannot train ends nothing but its part in it:
                            // it declines it (the coordinator takes it out of the run and gives
                            // it another); the process never exits for a run's content.
                            let why: String = format!("{err:#}").chars().take(300).collect();
                            if passing {
                                warn!(run = at.run, "cannot start run {} yet: {why}", at.run);
                                let detail = format!("cannot start the run yet: {why}");
                                self.fault(at.run, at.epoch, 0, FaultKind::Failed, &detail);
                            } else {
                                error!(
                                    run = at.run,
                                    "this worker cannot train run {}: {why}", at.run
                                );
                            }
                            Event::CannotStart { at, why, passing }
                        }
                    };
                    if let Some(action) = self.life.on(Instant::now(), event) {
                        self.act(action);
                    }
                }
                Next::Join(at) => {
                    let Some(e) = self.latest_epoch().cloned() else { continue };
                    let how = match self.run_epoch(&e) {
                        Outcome::Finished => Ended::Finished,
                        Outcome::Interrupted(why) => {
                            info!(run = at.run, epoch = at.epoch, "epoch ended: {why}");
                            Ended::Interrupted
                        }
                        failed => {
                            warn!(
                                run = at.run,
                                epoch = at.epoch,
                                "epoch failed: {}",
                                outcome_text(&failed)
                            );
                            self.report_fault(&e, &failed);
                            Ended::Failed
                        }
                    };
                    self.life.on(Instant::now(), Event::Ended { at, how });
                    self.end_attempt();
                    self.apply_stop();
                }
            }
        }
    }

    /// Blocks until the next command (handled here) or `until`; false once the agent is gone.
    /// Nothing polls: with nothing to retry, the thread sleeps until the coordinator speaks.
    fn wait_for_command(&mut self, until: Option<Instant>) -> Result<bool> {
        let down = &mut self.link.down;
        let got = self.rt.block_on(async {
            match until {
                Some(t) => {
                    tokio::time::timeout_at(tokio::time::Instant::from_std(t), down.recv()).await
                }
                None => Ok(down.recv().await),
            }
        });
        match got {
            Ok(Some(cmd)) => self.on_command(cmd).map(|()| true),
            Ok(None) => Ok(false), // the agent is gone: shutting down
            Err(_) => Ok(true),    // the retry is due
        }
    }

    /// The newest epoch announced, if its run was not stopped since (the core decides which).
    fn latest_epoch(&self) -> Option<&EpochInfo> {
        let l = self.life.latest()?;
        self.latest.as_ref().filter(|e| e.run == l.run && e.epoch == l.epoch)
    }

    fn act(&self, action: Action) {
        match action {
            Action::Decline { at, why } => {
                self.fault(at.run, at.epoch, 0, FaultKind::Declined, &why);
            }
        }
    }

    fn on_command(&mut self, cmd: Down) -> Result<()> {
        match cmd {
            Down::Epoch(mut e) => {
                // The run file comes with a member's first epoch of a run; later ones omit it.
                if e.run_toml.is_empty()
                    && let Some(l) = self.latest.as_ref().filter(|l| l.run == e.run)
                {
                    e.run_toml = l.run_toml.clone();
                }
                let at = EpochRef { run: e.run, epoch: e.epoch };
                if let Some(action) = self.life.on(Instant::now(), Event::Epoch(at)) {
                    self.act(action);
                }
                if self.life.latest() == Some(at) {
                    self.latest = Some(e);
                }
            }
            Down::Checkpoint { run, .. } => {
                if let Some(c) = self.ctx.as_mut().filter(|c| c.run == run) {
                    c.checkpoint_wanted = true;
                }
            }
            Down::Agreement { run, epoch, agreement } => {
                self.agreement = Some((run, epoch, agreement));
            }
            Down::Plan { run, epoch, plan } => self.plan = Some((run, epoch, plan)),
            Down::Audit(task) => {
                if self.latest.as_ref().is_none_or(|e| e.run != task.run_id) {
                    // Not training that run here (any more): nothing to recompute from.
                    self.answer_audit(&task, Err("not training that run".into()));
                } else if self.audits.len() >= MAX_AUDITS {
                    self.answer_audit(&task, Err("too many audits in hand".into()));
                } else {
                    self.audits.push_back(task);
                }
            }
            Down::Unreadable { run, epoch, why } => {
                warn!(run, epoch, "an unreadable message from the coordinator: {why}");
                let detail = format!("an unreadable message from the coordinator: {why}");
                self.fault(run, epoch, 0, FaultKind::Failed, &detail);
                self.unreadable = Some((run, epoch, why));
            }
            Down::Stop { run, reason, .. } => {
                self.life.on(Instant::now(), Event::Stopped { run });
                self.stop = Some((run, reason));
                self.apply_stop();
            }
            Down::Fatal(msg) => return Err(anyhow!(msg)),
        }
        Ok(())
    }

    /// Ends the run a stop named, once its state is back from the epoch: a checkpoint of the
    /// last synchronised state if there is none, and the run's state dropped.
    fn apply_stop(&mut self) {
        let Some((run, _)) = &self.stop else { return };
        let run = *run;
        if self.ctx.as_ref().is_some_and(|c| c.run != run) {
            self.stop = None; // another run's
            return;
        }
        let Some(mut c) = self.ctx.take() else { return }; // out in an epoch: later
        self.life.on(Instant::now(), Event::Dropped { run });
        let (_, reason) = self.stop.take().unwrap_or_default();
        if c.last_checkpoint != Some(c.trainer.sync_step()) && c.trainer.sync_step() > 0 {
            self.checkpoint(&mut c);
        }
        info!(run, step = c.trainer.sync_step(), hash = %c.trainer.hash(),
            "run stopped: {reason}");
    }

    /// Drains commands without blocking; true if the current attempt must end.
    fn poll(&mut self, attempt: &Attempt) -> Result<bool> {
        loop {
            match self.link.down.try_recv() {
                Ok(cmd) => self.on_command(cmd)?,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    return Err(anyhow!("the worker is shutting down"));
                }
            }
        }
        let superseded = match self.life.latest() {
            Some(l) => l.run != attempt.run || l.epoch > attempt.epoch,
            None => true,
        };
        Ok(superseded || attempt.token.is_cancelled())
    }

    fn start_run(&mut self, e: &EpochInfo) -> Result<RunCtx, StartError> {
        let spec = RunSpec::parse(&e.run_toml).map_err(|err| anyhow!("run file: {err}"))?;
        let device = plan::device(self.cfg.device).map_err(|m| anyhow!(m))?;
        if spec.verification.require_profile && device != tch::Device::Cpu {
            return Err(anyhow!(
                "the run takes only contributions an auditor can recompute \
                 (verification.require_profile), and a CUDA worker's cannot be audited yet"
            )
            .into());
        }
        let format = ShardFormat::of(&spec);
        let mut feeder =
            Feeder::new(format, spec.seed, spec.seq_len as usize, &self.cfg, &self.identity);
        // Tensor data: the model's input shape comes from the first shard.
        let features = if matches!(format, ShardFormat::Tensors { .. }) {
            // Waiting for the first shard is an attempt the agent cancels like any other (a
            // newer epoch, an abort, a stop); a shard that cannot be fetched now may be later.
            let loaded = match self.begin_attempt(e.run, e.epoch) {
                Ok(attempt) => feeder.ensure(&self.rt, &self.rpc, &attempt.token),
                Err(why) => Err(anyhow!(why)),
            };
            self.end_attempt();
            loaded.map_err(|err| StartError {
                err: err.context("waiting for the first shard"),
                passing: true,
            })?;
            feeder.current.as_ref().and_then(|(_, r)| plan::feature_shape(r.data()))
        } else {
            None
        };
        let ts =
            plan::train_spec(&spec, e.total_steps, device, features).map_err(|m| anyhow!(m))?;
        let audited = spec.verification.enabled();
        let (poison, member, inner) =
            (self.cfg.poison, self.identity.worker_id, self.link.inner.clone());
        let configure = move |trainer: &mut Trainer| {
            trainer.set_poison(poison);
            trainer.set_audit_window(if audited { AUDIT_WINDOW } else { 0 });
            trainer.set_member(member, inner.clone());
        };
        let mut trainer = Trainer::new(ts).map_err(|err| anyhow!("{err}"))?;
        configure(&mut trainer);
        self.profile = profile(device);
        // A certificate renewed by the agent since this worker started: leases use it.
        if let Ok(Some(id)) = Identity::load(&self.cfg.state_dir, &self.identity.ca_pin)
            && id.worker_id == self.identity.worker_id
            && id.cert_pem != self.identity.cert_pem
        {
            if let Ok(rpc) = id.client(&self.cfg.connect) {
                self.rpc = rpc;
            }
            self.identity = Identity { coordinator: self.identity.coordinator.clone(), ..id };
        }
        info!(run = e.run, params = trainer.numel(), ?device, "model built");
        let dir = self.checkpoint_dir();
        if let Some((path, tensors, meta)) = checkpoint::latest(&dir, e.run) {
            match trainer.restore(&tensors, &meta) {
                Ok(()) => info!(run = e.run, step = meta.step, path = %path.display(),
                    "resumed from checkpoint"),
                Err(err) => {
                    warn!(path = %path.display(), "checkpoint does not fit this run ({err}); starting fresh");
                    trainer =
                        Trainer::new(trainer.spec().clone()).map_err(|err| anyhow!("{err}"))?;
                    configure(&mut trainer);
                }
            }
        }
        let last_checkpoint = (trainer.sync_step() > 0).then_some(trainer.sync_step());
        Ok(RunCtx {
            run: e.run,
            spec,
            total: e.total_steps,
            trainer,
            feeder,
            started: None,
            totals: Totals::default(),
            window: Window::default(),
            tokens: 0,
            bytes_reported: 0,
            last_report: Instant::now(),
            checkpoint_wanted: false,
            last_checkpoint,
            epoch: e.epoch,
        })
    }

    fn send(&self, m: Up) {
        let _ = self.link.up.send(m);
    }

    /// Makes (`run`, `epoch`) the attempt the agent cancels when a newer epoch, an abort or a
    /// stop arrives; an error if a command that came before it was visible already ended it.
    fn begin_attempt(&mut self, run: u64, epoch: u64) -> Result<Attempt, String> {
        let attempt = Attempt::new(run, epoch);
        if let Ok(mut a) = self.link.attempt.lock() {
            *a = Some(attempt.clone());
        }
        match self.poll(&attempt) {
            Ok(false) => Ok(attempt),
            Ok(true) => Err("superseded before it began".into()),
            Err(err) => Err(format!("{err:#}")),
        }
    }

    fn end_attempt(&self) {
        if let Ok(mut a) = self.link.attempt.lock() {
            *a = None;
        }
    }

    /// Tells the coordinator this member's epoch failed, blaming `peer` (0: nobody); the
    /// detail is bounded as the coordinator keeps it.
    fn fault(&self, run: u64, epoch: u64, peer: u64, kind: FaultKind, detail: &str) {
        self.send(Up::RingFault(pb::RingFault {
            run_id: run,
            epoch,
            peer_worker_id: peer,
            kind: kind as i32,
            detail: detail.chars().take(300).collect(),
        }));
    }

    fn run_epoch(&mut self, e: &EpochInfo) -> Outcome {
        let attempt = match self.begin_attempt(e.run, e.epoch) {
            Ok(a) => a,
            Err(why) => return Outcome::Interrupted(why),
        };
        let Some(mut ctx) = self.ctx.take() else {
            return Outcome::Failed("no run".into());
        };
        ctx.epoch = e.epoch;
        let out = self.train_epoch(&mut ctx, e, &attempt);
        self.ctx = Some(ctx);
        out
    }

    fn form_ring(&mut self, e: &EpochInfo, attempt: &Attempt) -> Result<Group, Outcome> {
        // The certificate may have been renewed since this worker started.
        let identity = Identity::load(&self.cfg.state_dir, &self.identity.ca_pin)
            .ok()
            .flatten()
            .filter(|id| id.worker_id == self.identity.worker_id)
            .unwrap_or_else(|| self.identity.clone());
        let me = &self.identity.member_name;
        let rank =
            e.members.iter().position(|m| &m.member.name == me).ok_or_else(|| {
                Outcome::Failed(format!("{me} is not a member of epoch {}", e.epoch))
            })?;
        let members: Vec<Member> = e.members.iter().map(|m| m.member.clone()).collect();
        let (identity, anchor) =
            identity.ring_tls().map_err(|err| Outcome::Failed(format!("{err:#}")))?;
        let port = PortLease::default();
        let spec = GroupSpec {
            epoch: e.epoch,
            members,
            rank,
            net: self.cfg.net.clone(),
            emulation: self.cfg.emulation.clone(),
            port: Some(port.clone()),
        };
        // The last epoch's endpoint, closed when its group was dropped, may still be draining
        // its connections (for a minute after a stall): its port is taken from it first.
        if let Some(old) = self.port.replace(port) {
            old.release();
        }
        let bind = self.cfg.ring_bind;
        let buffer = self.cfg.net.socket_buffer;
        let token = attempt.token.clone();
        self.rt.block_on(async move {
            // Another process (or a hostile neighbour on this host) may hold the port a while.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let socket = loop {
                match collectives::transport::bind(bind, buffer) {
                    Ok(s) => break s,
                    Err(err) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!("binding {bind}: {err}; retrying");
                        tokio::select! {
                            _ = token.cancelled() => return Err(Outcome::Interrupted("cancelled".into())),
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                    Err(err) => {
                        return Err(Outcome::Failed(format!("cannot bind the ring port {bind}: {err}")));
                    }
                }
            };
            tokio::select! {
                _ = token.cancelled() => Err(Outcome::Interrupted("cancelled while forming the ring".into())),
                r = Group::join_with_socket(spec, &anchor, &identity, Some(socket)) => {
                    r.map_err(Outcome::Ring)
                }
            }
        })
    }

    fn train_epoch(&mut self, ctx: &mut RunCtx, e: &EpochInfo, attempt: &Attempt) -> Outcome {
        // The state this member brings: the coordinator names the epoch's source from these.
        self.report_held(ctx, e);
        if self.cfg.attack == Some(Attack::NoRing) {
            // Hostile: answers, never joins. Waits until the coordinator gives up on it.
            let token = attempt.token.clone();
            self.rt.block_on(token.cancelled());
            return Outcome::Interrupted("cancelled".into());
        }
        let group = match self.form_ring(e, attempt) {
            Ok(g) => g,
            Err(o) => return o,
        };
        // The agent's cancel aborts the group's operation in flight.
        let abort = group.abort_handle();
        let done = CancellationToken::new();
        let watcher = {
            let (token, done, attempt) = (attempt.token.clone(), done.clone(), attempt.clone());
            self.rt.spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => abort.abort(attempt.reason()),
                    _ = done.cancelled() => {}
                }
            })
        };
        let mut comm = RingComm::new(group, self.rt.clone());
        let out = self.train_in_ring(ctx, e, attempt, &mut comm);
        done.cancel();
        let _ = self.rt.block_on(watcher);
        let t = comm.traffic();
        ctx.totals.comm += t.busy;
        ctx.totals.bytes_sent += t.bytes_sent;
        ctx.totals.bytes_received += t.bytes_received;
        if matches!(out, Outcome::Finished) {
            comm.close();
        }
        out
    }

    fn train_in_ring(
        &mut self,
        ctx: &mut RunCtx,
        e: &EpochInfo,
        attempt: &Attempt,
        comm: &mut RingComm,
    ) -> Outcome {
        let agreement = match self.wait_agreement(e, attempt) {
            Ok(a) => a,
            Err(o) => return o,
        };
        if let Err(err) = ctx.trainer.agree(comm, &agreement) {
            return interrupted_or_failed(attempt, err);
        }
        if agreement.receivers.contains(&comm.rank()) {
            info!(run = ctx.run, step = ctx.trainer.sync_step(), source = agreement.source,
                hash = %ctx.trainer.hash(), "took over the ring's state (hash verified)");
        }
        ctx.started.get_or_insert_with(Instant::now);
        info!(
            run = ctx.run,
            epoch = e.epoch,
            rank = comm.rank(),
            world = comm.world(),
            step = ctx.trainer.sync_step(),
            "training in the ring"
        );

        loop {
            // The ring already holds the last step (this member joined after it).
            if ctx.trainer.sync_step() >= ctx.total {
                self.finish(ctx, Some(comm));
                return Outcome::Finished;
            }
            match self.poll(attempt) {
                Ok(false) => {}
                Ok(true) => return Outcome::Interrupted(reason(attempt, "superseded")),
                Err(err) => return Outcome::Interrupted(format!("{err:#}")),
            }
            let synced = match self.step(ctx, comm, e, attempt) {
                Ok(s) => s,
                Err(o) => return o,
            };
            if synced {
                if ctx.trainer.last_coefficient() == 0.0 {
                    debug!(
                        run = ctx.run,
                        step = ctx.trainer.sync_step(),
                        "left out of this sync by the plan"
                    );
                }
                if ctx.trainer.sync_step() >= ctx.total {
                    // The last step: checkpoint, evaluation and final report go out before the
                    // commit, which ends the run at the coordinator.
                    self.finish(ctx, Some(comm));
                    self.commit(ctx, e.epoch);
                    return Outcome::Finished;
                }
                self.commit(ctx, e.epoch);
                if ctx.checkpoint_wanted {
                    self.checkpoint(ctx);
                }
            }
            if ctx.last_report.elapsed() >= self.cfg.metrics_every {
                self.report(ctx, Some(comm), None, false);
            }
        }
    }

    /// One local step, and the synchronisation if it is due. Returns whether it synchronised.
    fn step(
        &mut self,
        ctx: &mut RunCtx,
        comm: &mut RingComm,
        e: &EpochInfo,
        attempt: &Attempt,
    ) -> Result<bool, Outcome> {
        let fail = |err: TrainError| interrupted_or_failed(attempt, err);
        match ctx.trainer.spec().sync {
            SyncMode::Ddp => {
                if !ctx.trainer.has_pending() {
                    self.audits.retain(|t| t.run_id == ctx.run);
                    match self.audits.pop_front() {
                        Some(task) => self.audit(ctx, &task, attempt)?,
                        None => self.forward_backward(ctx, attempt)?,
                    }
                }
                let mut planner = Planner { driver: self, attempt, run: e.run, epoch: e.epoch };
                ctx.trainer.ddp_sync(comm, &mut planner).map_err(fail)?;
                Ok(true)
            }
            SyncMode::Diloco { .. } => {
                if ctx.trainer.round_unstarted() && !ctx.trainer.diloco_due() {
                    self.audits.retain(|t| t.run_id == ctx.run);
                    if let Some(task) = self.audits.pop_front() {
                        self.audit(ctx, &task, attempt)?;
                    }
                }
                if ctx.trainer.diloco_due() {
                    let mut planner = Planner { driver: self, attempt, run: e.run, epoch: e.epoch };
                    ctx.trainer.diloco_sync(comm, &mut planner).map_err(fail)?;
                    Ok(true)
                } else {
                    self.forward_backward(ctx, attempt)?;
                    ctx.trainer.apply_local().map_err(fail)?;
                    Ok(false)
                }
            }
        }
    }

    fn forward_backward(&mut self, ctx: &mut RunCtx, attempt: &Attempt) -> Result<(), Outcome> {
        let n = ctx.trainer.spec().batch_size;
        let batch = ctx
            .feeder
            .next_batch(n, &self.rt, &self.rpc, &attempt.token)
            .map_err(|err| Outcome::Interrupted(format!("waiting for data: {err:#}")))?;
        let s = ctx
            .trainer
            .forward_backward(&batch)
            .map_err(|err| interrupted_or_failed(attempt, err))?;
        let w = &mut ctx.window;
        w.loss_sum += s.loss;
        w.steps += 1;
        w.correct += s.correct;
        w.counted += s.counted;
        w.samples += s.samples as u64;
        let tokens = if ctx.feeder.format.has_tokens() {
            s.samples as u64 * ctx.trainer.spec().seq_len as u64
        } else {
            s.samples as u64
        };
        w.tokens += tokens;
        ctx.tokens += tokens;
        Ok(())
    }

    /// Spends this sync on an audit: recomputes the audited member's contribution from the
    /// state and the data it committed, answers its digest, and contributes nothing itself.
    fn audit(
        &mut self,
        ctx: &mut RunCtx,
        task: &pb::AuditTask,
        attempt: &Attempt,
    ) -> Result<(), Outcome> {
        let result = self.recompute(ctx, task, attempt);
        if let Err(why) = &result {
            if attempt.token.is_cancelled() {
                return Err(Outcome::Interrupted(reason(attempt, "cancelled")));
            }
            warn!(run = ctx.run, audit = task.audit_id, step = task.step, "cannot audit: {why}");
        }
        self.answer_audit(task, result);
        match ctx.trainer.spec().sync {
            SyncMode::Ddp => ctx.trainer.spend_on_audit(task.audit_id),
            SyncMode::Diloco { .. } => ctx.trainer.spend_round_on_audit(task.audit_id),
        }
        Ok(())
    }

    /// The digest of the contribution `task` names, recomputed here.
    fn recompute(
        &mut self,
        ctx: &mut RunCtx,
        task: &pb::AuditTask,
        attempt: &Attempt,
    ) -> Result<([u8; 32], Option<[u8; 32]>), String> {
        let start = ParamHash::from_str(&task.start_hash).map_err(|e| e.to_string())?;
        let diloco = matches!(ctx.trainer.spec().sync, SyncMode::Diloco { .. });
        if diloco && task.inner_start_sha256.is_empty() {
            return Err("a diloco audit that names no inner optimizer state".into());
        }
        let total: u64 = task.spans.iter().map(|s| s.to.saturating_sub(s.from)).sum();
        if task.spans.is_empty() || total > 1 << 24 {
            return Err(format!(
                "{} spans of {total} samples: not a step's data",
                task.spans.len()
            ));
        }
        let mut parts = Vec::with_capacity(task.spans.len());
        for s in &task.spans {
            let l = task
                .shards
                .iter()
                .find(|l| l.shard == s.shard && l.data_epoch == s.data_epoch)
                .ok_or_else(|| format!("no source for shard {}", s.shard))?;
            let lease = Lease { id: s.lease_id, shared: s.shared, ..Lease::from(l.clone()) };
            let format = ctx.feeder.format;
            let path = if format.has_bytes() {
                let fetch = crate::fetch::shard(&lease, &self.identity, &ctx.feeder.cache);
                let got = self.rt.block_on(async {
                    tokio::select! {
                        _ = attempt.token.cancelled() => None,
                        r = fetch => Some(r),
                    }
                });
                Some(got.ok_or("cancelled")?.map_err(|e| format!("{e:#}"))?)
            } else {
                None
            };
            let seed = shard_seed(ctx.feeder.seed, s.shard, s.data_epoch);
            let data = format.load(path.as_deref(), seed).map_err(|e| e.to_string())?;
            let shared_by = s.shared.then_some((task.worker_id, s.lease_id));
            let order = order_seed(ctx.feeder.seed, s.shard, s.data_epoch, shared_by);
            let mut reader = ShardReader::new(data, ctx.feeder.seq_len, order);
            let want = s.to.checked_sub(s.from).filter(|n| *n > 0).ok_or("an empty span")?;
            if s.to > reader.remaining() {
                return Err(format!("span {}..{} beyond shard {}", s.from, s.to, s.shard));
            }
            reader.next = s.from;
            let b = reader.next_batch(want as usize).ok_or("an empty span")?;
            parts.push(b);
        }
        let batch =
            if parts.len() == 1 { parts.pop().expect("one part") } else { Batch::cat(&parts) };
        if diloco {
            let inner = self.fetch_inner_state(ctx, task, attempt)?;
            let (delta, end) = ctx
                .trainer
                .audit_round(start, &inner, &batch, task.step, task.worker_id)
                .map_err(|e| e.to_string())?;
            return Ok((crate::trainer::digest(&delta), Some(crate::trainer::sha256(&end))));
        }
        let contribution = ctx
            .trainer
            .audit(start, &batch, task.step, task.rank as usize)
            .map_err(|e| e.to_string())?;
        Ok((crate::trainer::digest(&contribution), None))
    }

    /// diloco: the audited member's inner optimizer state at the start of the audited round,
    /// relayed by the coordinator (`FetchAuditState`), checked against the digest the task names
    /// and the size this model's state has.
    fn fetch_inner_state(
        &self,
        ctx: &RunCtx,
        task: &pb::AuditTask,
        attempt: &Attempt,
    ) -> Result<Vec<u8>, String> {
        let want = ctx.trainer.inner_len();
        if task.inner_state_bytes != want as u64 {
            return Err(format!(
                "the audited member committed to an inner state of {} bytes; this model's is {want}",
                task.inner_state_bytes
            ));
        }
        let mut rpc = self.rpc.clone();
        let req = pb::FetchAuditStateRequest { run_id: task.run_id, audit_id: task.audit_id };
        let fetch = async move {
            let mut stream = rpc
                .fetch_audit_state(req)
                .await
                .map_err(|s| format!("fetching the inner state: {}", s.message()))?
                .into_inner();
            let mut blob = Vec::new();
            loop {
                let chunk = stream
                    .message()
                    .await
                    .map_err(|s| format!("fetching the inner state: {}", s.message()))?
                    .ok_or("the inner state ended before `done`")?;
                match chunk.part {
                    Some(pb::checkpoint_chunk::Part::Data(d)) => {
                        if blob.len() + d.data.len() > want {
                            return Err(format!("an inner state of more than {want} bytes"));
                        }
                        blob.extend_from_slice(&d.data);
                    }
                    Some(pb::checkpoint_chunk::Part::Done(_)) => return Ok(blob),
                    _ => return Err("an unexpected part of an inner state".to_owned()),
                }
            }
        };
        let blob = self
            .rt
            .block_on(async {
                tokio::select! {
                    _ = attempt.token.cancelled() => None,
                    r = fetch => Some(r),
                }
            })
            .ok_or("cancelled")??;
        if client::pki::hex(&crate::trainer::sha256(&blob)) != task.inner_start_sha256 {
            return Err("the inner state relayed is not the one the audit names".into());
        }
        Ok(blob)
    }

    fn answer_audit(
        &self,
        task: &pb::AuditTask,
        result: Result<([u8; 32], Option<[u8; 32]>), String>,
    ) {
        let (contribution_sha256, inner_end_sha256, error) = match result {
            Ok((mut d, end)) => {
                if self.cfg.attack == Some(Attack::AuditLie) {
                    d[0] ^= 1;
                }
                let end = end.map(|e| client::pki::hex(&e)).unwrap_or_default();
                (client::pki::hex(&d), end, String::new())
            }
            Err(why) => (String::new(), String::new(), why.chars().take(1000).collect()),
        };
        self.send(Up::AuditResult(pb::AuditResult {
            run_id: task.run_id,
            audit_id: task.audit_id,
            contribution_sha256,
            error,
            inner_end_sha256,
        }));
    }

    /// Reports the state held after a sync (the coordinator records a step once a majority of
    /// the epoch reports the same hash).
    fn commit(&self, ctx: &RunCtx, epoch: u64) {
        let mut hash = ctx.trainer.hash().to_string();
        if self.cfg.attack == Some(Attack::ForgeHash) {
            hash = ParamHash(ctx.trainer.hash().0 ^ 0x5a5a_5a5a).to_string();
        }
        self.send(Up::StepCommitted(pb::StepCommitted {
            run_id: ctx.run,
            epoch,
            step: ctx.trainer.sync_step(),
            param_hash: hash,
        }));
        if self.cfg.attack == Some(Attack::Accuse)
            && let Some(next) = self.successor(epoch)
        {
            let lie = "sent more than it declared (a lie)";
            self.fault(ctx.run, epoch, next, FaultKind::Misbehaved, lie);
        }
    }

    /// The worker id of this member's ring successor in the latest epoch.
    fn successor(&self, epoch: u64) -> Option<u64> {
        let e = self.latest.as_ref().filter(|e| e.epoch == epoch)?;
        let me = e.members.iter().position(|m| m.member.name == self.identity.member_name)?;
        e.members
            .get((me + 1) % e.members.len())
            .map(|m| m.worker_id)
            .filter(|w| *w != self.identity.worker_id)
    }

    /// Reports the state this member brings to an epoch.
    fn report_held(&self, ctx: &RunCtx, e: &EpochInfo) {
        let (mut step, mut hash) = (ctx.trainer.sync_step(), ctx.trainer.hash().to_string());
        match self.cfg.attack {
            Some(Attack::ClaimAhead) => {
                step += 1_000_000;
                hash = "feedfacefeedface".into();
            }
            Some(Attack::ForgeComplete) => {
                self.send(Up::StepCommitted(pb::StepCommitted {
                    run_id: ctx.run,
                    epoch: e.epoch,
                    step: e.total_steps,
                    param_hash: "deadbeefdeadbeef".into(),
                }));
            }
            _ => {}
        }
        self.send(Up::StepCommitted(pb::StepCommitted {
            run_id: ctx.run,
            epoch: e.epoch,
            step,
            param_hash: hash,
        }));
    }

    /// Waits for the coordinator's agreement of epoch `e` (it may have come already).
    fn wait_agreement(&mut self, e: &EpochInfo, attempt: &Attempt) -> Result<Agreement, Outcome> {
        let (run, epoch) = (e.run, e.epoch);
        self.wait_for(attempt, |d| {
            if let Some((_, _, why)) = d.unreadable.as_ref().filter(|u| (u.0, u.1) == (run, epoch))
            {
                return Some(Err(Outcome::Failed(why.clone())));
            }
            let a = d.agreement.as_ref().filter(|a| (a.0, a.1) == (run, epoch))?;
            Some(Ok(a.2.clone()))
        })
        .map_err(Outcome::Interrupted)?
    }

    /// Handles commands until `take` finds what it waits for; cancelled with the attempt.
    fn wait_for<T>(
        &mut self,
        attempt: &Attempt,
        mut take: impl FnMut(&mut Self) -> Option<T>,
    ) -> Result<T, String> {
        loop {
            if let Some(t) = take(self) {
                return Ok(t);
            }
            if attempt.token.is_cancelled() {
                return Err(reason(attempt, "cancelled"));
            }
            let token = attempt.token.clone();
            let down = &mut self.link.down;
            let cmd = self.rt.block_on(async {
                tokio::select! {
                    _ = token.cancelled() => None,
                    c = down.recv() => Some(c),
                }
            });
            match cmd {
                None => return Err(reason(attempt, "cancelled")),
                Some(None) => return Err("the worker is shutting down".into()),
                Some(Some(cmd)) => self.on_command(cmd).map_err(|e| format!("{e:#}"))?,
            }
        }
    }

    /// Reports why this member's ring failed, naming the peer to blame where there is one.
    fn report_fault(&self, e: &EpochInfo, outcome: &Outcome) {
        let peer_of = |name: &str| proto::WorkerId::from_member_name(name).map_or(0, |w| w.0);
        let (peer, kind, detail) = match outcome {
            Outcome::Ring(JoinError::Timeout { peer, .. } | JoinError::Refused { peer, .. }) => {
                (peer_of(peer), FaultKind::Unreachable, outcome_text(outcome))
            }
            Outcome::Ring(_) | Outcome::Failed(_) => (0, FaultKind::Failed, outcome_text(outcome)),
            Outcome::Train(TrainError::Comm(err)) => match err {
                OpError::PeerLost { peer, .. } => (peer_of(peer), FaultKind::Lost, err.to_string()),
                OpError::Protocol { peer, .. } | OpError::Exceeded { peer, .. } => {
                    (peer_of(peer), FaultKind::Misbehaved, err.to_string())
                }
                OpError::Aborted { .. } => return,
                _ => (0, FaultKind::Failed, err.to_string()),
            },
            Outcome::Train(TrainError::BadState { rank, detail }) => {
                let peer = e.members.get(*rank).map_or(0, |m| m.worker_id);
                (peer, FaultKind::BadState, detail.clone())
            }
            Outcome::Train(err) => (0, FaultKind::Failed, err.to_string()),
            Outcome::Finished | Outcome::Interrupted(_) => return,
        };
        self.fault(e.run, e.epoch, peer, kind, &detail);
    }

    /// The run's last step is synchronised: a final checkpoint, the held-out accuracy and the
    /// last report.
    fn finish(&self, ctx: &mut RunCtx, comm: Option<&RingComm>) {
        if ctx.last_checkpoint != Some(ctx.trainer.sync_step()) {
            self.checkpoint(ctx);
        }
        let eval = plan::holdout(ctx.feeder.format, ctx.trainer.spec().seq_len, 512)
            .and_then(|b| ctx.trainer.evaluate(&b).ok());
        if let Some(s) = &eval {
            info!(
                run = ctx.run,
                loss = s.loss,
                accuracy = s.correct as f64 / s.counted.max(1) as f64,
                "held-out evaluation"
            );
        }
        self.report(ctx, comm, eval.map(|s| s.correct as f64 / s.counted.max(1) as f64), true);
        let wall = ctx.started.map(|t| t.elapsed()).unwrap_or_default();
        let (comm_time, sent, received) = ctx.comm_in(comm);
        let compute = ctx.trainer.compute();
        info!(
            run = ctx.run,
            step = ctx.trainer.sync_step(),
            wall_s = wall.as_secs_f64(),
            compute_s = compute.as_secs_f64(),
            comm_s = comm_time.as_secs_f64(),
            idle_s = wall.saturating_sub(compute + comm_time).as_secs_f64(),
            bytes_sent = sent,
            bytes_received = received,
            hash = %ctx.trainer.hash(),
            "finished the run's steps"
        );
    }

    fn checkpoint(&self, ctx: &mut RunCtx) {
        let keep = ctx.spec.checkpoint_keep as usize;
        let meta = ctx.trainer.checkpoint_meta(ctx.run, ctx.feeder.cursor());
        let t = Instant::now();
        match checkpoint::write(
            &self.checkpoint_dir(),
            &ctx.trainer.checkpoint_tensors(),
            meta,
            keep,
        ) {
            Ok(w) => {
                ctx.checkpoint_wanted = false;
                ctx.last_checkpoint = Some(ctx.trainer.sync_step());
                info!(run = ctx.run, step = ctx.trainer.sync_step(), path = %w.dir.display(),
                    took = ?t.elapsed(), "checkpoint written");
                self.send(Up::CheckpointDone(pb::CheckpointDone {
                    run_id: ctx.run,
                    step: ctx.trainer.sync_step(),
                    uri: format!("file://{}", w.dir.display()),
                    sha256: w.meta_sha256,
                    model_sha256: w.files.get("model.safetensors").cloned().unwrap_or_default(),
                    files: w.files.into_iter().collect(),
                    description_sha256: w.description_sha256,
                }));
            }
            Err(err) => error!(run = ctx.run, "checkpoint failed: {err}"),
        }
    }

    fn report(
        &self,
        ctx: &mut RunCtx,
        comm: Option<&RingComm>,
        eval_accuracy: Option<f64>,
        last: bool,
    ) {
        if let Some(comm) = comm {
            self.link.rtts.record(&comm.neighbour_rtts());
        }
        let elapsed = ctx.last_report.elapsed().as_secs_f64().max(1e-9);
        let wall = ctx.started.map(|t| t.elapsed()).unwrap_or_default();
        let compute = ctx.trainer.compute();
        let (comm_time, sent, received) = ctx.comm_in(comm);
        let idle = wall.saturating_sub(compute + comm_time);
        let w = std::mem::take(&mut ctx.window);
        let bytes = (sent + received).saturating_sub(ctx.bytes_reported);
        ctx.bytes_reported = sent + received;
        let accuracy =
            eval_accuracy.or((w.counted > 0).then(|| w.correct as f64 / w.counted as f64));
        // The final report gives the run's average rate, not the last window's.
        let tokens_per_sec = if last {
            ctx.tokens as f64 / wall.as_secs_f64().max(1e-9)
        } else {
            w.tokens as f64 / elapsed
        };
        self.send(Up::Metrics(pb::Metrics {
            run_id: ctx.run,
            step: ctx.trainer.sync_step(),
            // A diverged loss or norm, or a rate over a vanishing interval, is not reported: the
            // coordinator takes figures that are not finite or beyond 1e15 for a malformed
            // message, closes the session and keeps the sender out of its ring a while.
            loss: (w.steps > 0).then(|| w.loss_sum / w.steps as f64).filter(|l| reportable(*l)),
            tokens_per_sec: if reportable(tokens_per_sec) { tokens_per_sec } else { 0.0 },
            samples: w.samples,
            bytes,
            accuracy,
            grad_norm: Some(ctx.trainer.last_grad_norm()).filter(|g| reportable(*g)).unwrap_or(0.0),
            compute_ms: compute.as_secs_f64() * 1e3,
            comm_ms: comm_time.as_secs_f64() * 1e3,
            idle_ms: idle.as_secs_f64() * 1e3,
            bytes_sent: sent,
            bytes_received: received,
            param_hash: ctx.trainer.hash().to_string(),
            epoch: ctx.epoch,
        }));
        ctx.last_report = Instant::now();
        match self.cfg.attack {
            Some(Attack::MetricsFlood) => {
                for i in 0..300u64 {
                    self.send(Up::Metrics(pb::Metrics {
                        run_id: ctx.run,
                        step: u64::MAX - i,
                        loss: Some(if i % 2 == 0 { f64::NAN } else { 1e308 }),
                        tokens_per_sec: f64::MAX,
                        samples: u64::MAX,
                        epoch: ctx.epoch,
                        ..Default::default()
                    }));
                }
            }
            Some(Attack::CheckpointSpam) => {
                for run in 1..=30u64 {
                    self.send(Up::CheckpointDone(pb::CheckpointDone {
                        run_id: run,
                        step: u64::MAX,
                        uri: format!("\u{1b}]0;pwned\u{7}{}", "A".repeat(2_000)),
                        sha256: "zz".into(),
                        model_sha256: "zz".into(),
                        ..Default::default()
                    }));
                }
            }
            _ => {}
        }
    }
}

fn reason(attempt: &Attempt, default: &str) -> String {
    let r = attempt.reason();
    if r.is_empty() { default.to_owned() } else { r }
}

fn interrupted_or_failed(attempt: &Attempt, err: TrainError) -> Outcome {
    if attempt.token.is_cancelled() {
        Outcome::Interrupted(format!("{}: {err}", reason(attempt, "cancelled")))
    } else {
        Outcome::Train(err)
    }
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Finished => "finished".into(),
        Outcome::Interrupted(why) | Outcome::Failed(why) => why.clone(),
        Outcome::Ring(err) => format!("forming the ring: {err}"),
        Outcome::Train(err) => err.to_string(),
    }
}

/// The trainer's way to the coordinator's plans: commits go up the session, the plan comes back
/// down; waiting ends with the attempt.
struct Planner<'a> {
    driver: &'a mut Driver,
    attempt: &'a Attempt,
    run: u64,
    epoch: u64,
}

impl Coordinate for Planner<'_> {
    fn plan(&mut self, c: &Commitment) -> Result<Plan, TrainError> {
        let (run, epoch, step) = (self.run, self.epoch, c.step);
        self.driver.send(Up::SyncCommit(pb::SyncCommit {
            run_id: run,
            epoch,
            step,
            segment_norms: c.segment_norms.clone(),
            start_hash: c.start_hash.to_string(),
            spans: c
                .spans
                .iter()
                .map(|s| pb::DataSpan {
                    lease_id: s.lease,
                    shard: s.shard,
                    data_epoch: s.data_epoch,
                    from: s.from,
                    to: s.to,
                    grant: s.grant.clone(),
                    shared: s.shared,
                })
                .collect(),
            samples: c.samples,
            contribution_sha256: client::pki::hex(&c.digest),
            contribution_norm: c.norm,
            profile: self.driver.profile.clone(),
            audit_id: c.audit.unwrap_or(0),
            inner_start_sha256: c.inner.map(|(s, _)| client::pki::hex(&s)).unwrap_or_default(),
            inner_end_sha256: c.inner.map(|(_, e)| client::pki::hex(&e)).unwrap_or_default(),
            inner_state_bytes: c.inner_bytes,
        }));
        let p = self
            .driver
            .wait_for(self.attempt, |d| {
                let p = d.plan.as_ref().filter(|p| (p.0, p.1, p.2.step) == (run, epoch, step))?;
                Some(p.2.clone())
            })
            .map_err(TrainError::NoPlan)?;
        Ok(p)
    }
}

type Loaded = Result<(Lease, ShardData)>;

/// Leases, fetches and reads shards, one ahead of the trainer.
#[derive(Debug)]
struct Feeder {
    format: ShardFormat,
    seed: u64,
    seq_len: usize,
    identity: Identity,
    cache: PathBuf,
    current: Option<(Lease, ShardReader)>,
    next: Option<JoinHandle<Loaded>>,
}

/// The prefetch in flight is the feeder's: it ends with it.
impl Drop for Feeder {
    fn drop(&mut self) {
        if let Some(next) = self.next.take() {
            next.abort();
        }
    }
}

impl Feeder {
    fn new(
        format: ShardFormat,
        seed: u64,
        seq_len: usize,
        cfg: &DriverConfig,
        identity: &Identity,
    ) -> Self {
        Self {
            format,
            seed,
            seq_len,
            identity: identity.clone(),
            cache: cfg.state_dir.join("shards"),
            current: None,
            next: None,
        }
    }

    fn cursor(&self) -> Option<Cursor> {
        self.current.as_ref().map(|(l, r)| Cursor {
            shard: l.shard,
            data_epoch: l.data_epoch,
            next: r.next,
        })
    }

    /// Starts loading the next shard in the background if it is not already.
    fn prefetch(&mut self, rt: &Handle, rpc: &AgentRpc) {
        if self.next.is_some() {
            return;
        }
        let (format, seed, identity, cache) =
            (self.format, self.seed, self.identity.clone(), self.cache.clone());
        let mut rpc = rpc.clone();
        self.next = Some(rt.spawn(async move {
            let mut backoff =
                agent::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
            let lease = loop {
                match agent::lease(&mut rpc).await {
                    Ok(Ok(l)) => break l,
                    Ok(Err(wait)) => tokio::time::sleep(wait).await,
                    Err(err) => {
                        tracing::debug!("{err:#}");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            };
            let path = if format.has_bytes() {
                Some(crate::fetch::shard(&lease, &identity, &cache).await?)
            } else {
                None
            };
            let s = shard_seed(seed, lease.shard, lease.data_epoch);
            let data =
                tokio::task::spawn_blocking(move || format.load(path.as_deref(), s)).await??;
            if lease.shared {
                debug!(shard = lease.shard, "sharing a shard another worker holds");
            }
            Ok((lease, data))
        }));
    }

    /// Makes sure a shard with samples left is current, waiting for one if needed.
    fn ensure(&mut self, rt: &Handle, rpc: &AgentRpc, cancel: &CancellationToken) -> Result<()> {
        loop {
            if self.current.as_ref().is_some_and(|(_, r)| r.remaining() > 0) {
                return Ok(());
            }
            if let Some((lease, reader)) = self.current.take().filter(|(l, _)| !l.shared) {
                let mut rpc = rpc.clone();
                let samples = reader.next;
                rt.spawn(async move {
                    if let Err(err) = agent::complete(&mut rpc, lease.id, samples).await {
                        warn!("{err:#}");
                    }
                });
            }
            self.prefetch(rt, rpc);
            let Some(handle) = self.next.as_mut() else { continue };
            let loaded = rt.block_on(async {
                tokio::select! {
                    _ = cancel.cancelled() => None,
                    r = handle => Some(r),
                }
            });
            let Some(loaded) = loaded else { return Err(anyhow!("cancelled")) };
            self.next = None;
            match loaded.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok((lease, data)) => {
                    // A sharer reads in its own order, not the holder's: their batches differ.
                    let shared_by = lease.shared.then_some((self.identity.worker_id, lease.id));
                    let seed = order_seed(self.seed, lease.shard, lease.data_epoch, shared_by);
                    self.current = Some((lease, ShardReader::new(data, self.seq_len, seed)));
                }
                Err(err) => {
                    warn!("shard unavailable: {err:#}; leasing another");
                    let cancelled = rt.block_on(async {
                        tokio::select! {
                            _ = cancel.cancelled() => true,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => false,
                        }
                    });
                    if cancelled {
                        return Err(anyhow!("cancelled"));
                    }
                }
            }
        }
    }

    /// A full batch of `n` samples (across shards if one runs out), prefetching ahead.
    fn next_batch(
        &mut self,
        n: usize,
        rt: &Handle,
        rpc: &AgentRpc,
        cancel: &CancellationToken,
    ) -> Result<Batch> {
        let mut parts = Vec::new();
        let mut have = 0usize;
        while have < n {
            self.ensure(rt, rpc, cancel)?;
            let Some((lease, reader)) = self.current.as_mut() else { continue };
            let from = reader.next;
            if let Some(mut b) = reader.next_batch(n - have) {
                have += b.samples as usize;
                b.spans = vec![Span {
                    lease: lease.id,
                    shard: lease.shard,
                    data_epoch: lease.data_epoch,
                    from,
                    to: reader.next,
                    grant: lease.grant.clone(),
                    shared: lease.shared,
                }];
                parts.push(b);
            }
            if reader.remaining() < 2 * n as u64 {
                self.prefetch(rt, rpc);
            }
        }
        Ok(if parts.len() == 1 { parts.pop().expect("one part") } else { Batch::cat(&parts) })
    }
}

/// A figure the coordinator accepts in `Metrics` (finite, in [0, 1e15]).
fn reportable(v: f64) -> bool {
    v.is_finite() && (0.0..=1e15).contains(&v)
}
