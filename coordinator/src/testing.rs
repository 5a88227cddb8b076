//! Scripted agents and a coordinator on loopback, for tests, the benchmark and examples.

use std::path::{Path, PathBuf};
use std::time::Duration;

use client::pki::{ca_hash, hex, new_csr};
use client::{AgentRpc, ConnectConfig, agent_client, channel};
use proto::pb;
use proto::pb::agent_client::AgentClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::read_ca_der;

/// Connection settings for a coordinator whose state directory is `dir`.
pub fn connect_config(url: &str, dir: &Path) -> anyhow::Result<ConnectConfig> {
    let ca = read_ca_der(dir)?;
    Ok(ConnectConfig {
        url: url.to_owned(),
        ca_pin: ca_hash(&ca),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
    })
}

/// Reads the admin token from a state directory.
pub fn admin_token(dir: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(dir.join("admin.token"))?.trim().to_owned())
}

/// A coordinator serving its API on 127.0.0.1 in this process (benchmarks), with an admin
/// client; `config.state_dir` is its state directory.
#[derive(Debug)]
pub struct InProcess {
    pub cfg: ConnectConfig,
    pub control: client::Control,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), crate::server::ServeError>>,
}

impl InProcess {
    /// Starts it and waits until it has written its credentials.
    pub async fn start(config: crate::server::ServerConfig) -> anyhow::Result<Self> {
        let dir = config.state_dir.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listeners = crate::server::Listeners::api(listener);
        let task = tokio::spawn(crate::server::run(listeners, config, async move {
            let _ = stopped.await;
        }));
        while !dir.join("admin.token").exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cfg = connect_config(&url, &dir)?;
        let control = client::control(&cfg, &admin_token(&dir)?)?;
        Ok(Self { cfg, control, stop, task })
    }

    /// Stops it, waiting up to 10 s for open calls.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Writes a dataset manifest of `n` shards (and the shards) under `dir`, returning its path.
pub fn write_dataset(dir: &Path, n: usize) -> anyhow::Result<PathBuf> {
    use sha2::Digest;
    std::fs::create_dir_all(dir)?;
    let mut shards = Vec::new();
    for i in 0..n {
        let data = format!("shard {i}\n").repeat(100);
        let path = dir.join(format!("shard-{i:05}.bin"));
        std::fs::write(&path, &data)?;
        shards.push(serde_json::json!({
            "uri": format!("file://{}", path.display()),
            "size": data.len(),
            "sha256": hex(&sha2::Sha256::digest(data.as_bytes())),
        }));
    }
    let manifest = dir.join("manifest.json");
    std::fs::write(&manifest, serde_json::json!({ "shards": shards }).to_string())?;
    Ok(manifest)
}

/// A run file for tests: the example with a `tokens-u16` dataset (vocabulary 256) read from
/// `manifest`, worker bounds and a step budget.
pub fn run_file(manifest: &Path, min: u32, max: u32, steps: u64) -> String {
    let dataset =
        format!("format = \"tokens-u16\"\nuri = \"file://{}\"\nvocab = 256\n", manifest.display());
    with_dataset(&dataset, min, max, steps)
}

/// A run file for tests: the example (synthetic addition, which needs no files) with worker
/// bounds and a step budget.
pub fn synthetic_run_file(min: u32, max: u32, steps: u64) -> String {
    with_dataset("format = \"synthetic-addition\"\ndigits = 3\n", min, max, steps)
}

/// The example with its `[dataset]` table's body replaced by `dataset`, and the given worker
/// bounds and step budget.
fn with_dataset(dataset: &str, min: u32, max: u32, steps: u64) -> String {
    let ex = runspec::EXAMPLE;
    let (head, rest) = ex.split_once("[dataset]\n").expect("the example has a [dataset] table");
    let (_, tail) = rest.split_once("[optimizer]").expect("the example has an [optimizer] table");
    let replace = |text: String, from: &str, to: String| {
        assert!(text.contains(from), "the example lacks {from:?}");
        text.replacen(from, &to, 1)
    };
    let text = format!("{head}[dataset]\n{dataset}\n[optimizer]{tail}");
    let text = replace(text, "\nmin = 3 ", format!("\nmin = {min} "));
    let text = replace(text, "\nmax = 8 ", format!("\nmax = {max} "));
    replace(text, "\nsteps = 600 ", format!("\nsteps = {steps} "))
}

/// A worker agent driven by a test: joined, with a session whose downstream messages arrive on
/// `inbox`.
#[derive(Debug)]
pub struct ScriptedAgent {
    pub id: u64,
    pub rpc: AgentRpc,
    pub inbox: mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>,
    pub up: mpsc::Sender<pb::AgentMessage>,
    pub cert_pem: String,
    pub key_pem: String,
    /// The state it last reported holding: what it commits to having trained from.
    held: std::sync::Mutex<String>,
}

/// Joins with `token`, returning the worker id, certificate and key.
pub async fn join(
    cfg: &ConnectConfig,
    token: &str,
    ring_addr: &str,
) -> anyhow::Result<(u64, String, String)> {
    let (csr, key) = new_csr()?;
    let mut rpc = AgentClient::new(channel(cfg, None)?);
    let resp = rpc
        .join(pb::JoinRequest {
            token: token.to_owned(),
            csr_pem: csr,
            host: "test".into(),
            ring_addr: ring_addr.to_owned(),
        })
        .await?
        .into_inner();
    Ok((resp.worker_id, resp.cert_pem, key))
}

impl ScriptedAgent {
    /// Joins and opens a session (sending `Hello`).
    pub async fn join(cfg: &ConnectConfig, token: &str, ring_addr: &str) -> anyhow::Result<Self> {
        let (id, cert_pem, key_pem) = join(cfg, token, ring_addr).await?;
        Self::connect(cfg, id, cert_pem, key_pem, ring_addr).await
    }

    /// Opens a session with an existing identity.
    pub async fn connect(
        cfg: &ConnectConfig,
        id: u64,
        cert_pem: String,
        key_pem: String,
        ring_addr: &str,
    ) -> anyhow::Result<Self> {
        let mut rpc = agent_client(cfg, id, &cert_pem, &key_pem)?;
        let (up, up_rx) = mpsc::channel(64);
        up.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello { ring_addr: ring_addr.to_owned() })),
        })
        .await?;
        let mut down = rpc.session(ReceiverStream::new(up_rx)).await?.into_inner();
        let (tx, inbox) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                match down.message().await {
                    Ok(Some(m)) => {
                        if tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(Self { id, rpc, inbox, up, cert_pem, key_pem, held: Default::default() })
    }

    pub async fn heartbeat(&self, seq: u64) -> anyhow::Result<()> {
        self.send(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { seq, rtts: vec![] })).await
    }

    pub async fn send(&self, msg: pb::agent_message::Msg) -> anyhow::Result<()> {
        self.up.send(pb::AgentMessage { msg: Some(msg) }).await?;
        Ok(())
    }

    /// Heartbeats every `every` in the background until the returned handle is aborted.
    pub fn keep_beating(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let up = self.up.clone();
        tokio::spawn(async move {
            let mut seq = 0;
            loop {
                seq += 1;
                let msg = pb::agent_message::Msg::Heartbeat(pb::Heartbeat { seq, rtts: vec![] });
                if up.send(pb::AgentMessage { msg: Some(msg) }).await.is_err() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        })
    }

    /// Waits (up to `within`) for a downstream message matching `f`, skipping others.
    pub async fn expect<T>(
        &mut self,
        within: Duration,
        mut f: impl FnMut(&pb::coordinator_message::Msg) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let m = tokio::time::timeout_at(deadline, self.inbox.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("worker {}: nothing matching within {within:?}", self.id)
                })?
                .ok_or_else(|| anyhow::anyhow!("worker {}: session ended", self.id))??;
            if let Some(msg) = &m.msg
                && let Some(t) = f(msg)
            {
                return Ok(t);
            }
        }
    }

    /// Reports the state it holds (`StepCommitted`): at the start of an epoch, after a sync.
    pub async fn report(&self, run: u64, epoch: u64, step: u64, hash: &str) -> anyhow::Result<()> {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = hash.to_owned();
        self.send(pb::agent_message::Msg::StepCommitted(pb::StepCommitted {
            run_id: run,
            epoch,
            step,
            param_hash: hash.to_owned(),
        }))
        .await
    }

    /// Commits to a contribution with these segment norms to the sync at `step`, trained from
    /// the state it last reported, on no leased data.
    pub async fn commit(
        &self,
        run: u64,
        epoch: u64,
        step: u64,
        norms: Vec<f32>,
    ) -> anyhow::Result<()> {
        let start = self.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.send_commit(pb::SyncCommit {
            run_id: run,
            epoch,
            step,
            contribution_norm: crate::cluster::aggregate::total_norm(&norms) as f32,
            segment_norms: norms,
            start_hash: start,
            ..Default::default()
        })
        .await
    }

    /// Sends a commitment as it is.
    pub async fn send_commit(&self, c: pb::SyncCommit) -> anyhow::Result<()> {
        self.send(pb::agent_message::Msg::SyncCommit(c)).await
    }

    /// Waits for the agreement of `epoch`.
    pub async fn expect_agreement(
        &mut self,
        epoch: u64,
        within: Duration,
    ) -> anyhow::Result<pb::Agreement> {
        self.expect(within, |m| match m {
            pb::coordinator_message::Msg::Agreement(a) if a.epoch == epoch => Some(a.clone()),
            _ => None,
        })
        .await
    }

    /// Waits for the plan of the sync at `step` in `epoch`.
    pub async fn expect_plan(
        &mut self,
        epoch: u64,
        step: u64,
        within: Duration,
    ) -> anyhow::Result<pb::SyncPlan> {
        self.expect(within, |m| match m {
            pb::coordinator_message::Msg::SyncPlan(p) if p.epoch == epoch && p.step == step => {
                Some(p.clone())
            }
            _ => None,
        })
        .await
    }

    /// Waits for an epoch announcement at least `min_epoch`.
    pub async fn expect_epoch(
        &mut self,
        min_epoch: u64,
        within: Duration,
    ) -> anyhow::Result<pb::EpochChange> {
        self.expect(within, |m| match m {
            pb::coordinator_message::Msg::Epoch(e) if e.epoch >= min_epoch => Some(e.clone()),
            _ => None,
        })
        .await
    }
}

/// An HTTP response read whole.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// `GET url` over HTTP/1.1 and TLS pinned to `ca_pin`, as worker `identity` (id, cert, key) or
/// with no client certificate. Errors are transport failures (a refused handshake included).
pub async fn https_get(
    url: &str,
    ca_pin: &str,
    identity: Option<(u64, &str, &str)>,
) -> anyhow::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("https://").ok_or_else(|| anyhow::anyhow!("not https: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, _) =
        authority.rsplit_once(':').ok_or_else(|| anyhow::anyhow!("no port in {url}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let client_identity = match identity {
        Some((_, cert, key)) => Some(client::identity(cert, key)?),
        None => None,
    };
    let tls = client::tls_client_config(ca_pin, client_identity, b"http/1.1")?;
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    let name = rustls_pki_types::ServerName::try_from(host)?;
    let mut s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
    let worker =
        identity.map(|(id, _, _)| format!("x-longhaul-worker: {id}\r\n")).unwrap_or_default();
    let req =
        format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\n{worker}connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP response ({} bytes)", raw.len()))?;
    let head = std::str::from_utf8(&raw[..split])?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(HttpResponse { status, headers, body: raw[split + 4..].to_vec() })
}

/// Every agent of `epoch` reports holding (`step`, `hash`) and waits for the agreement.
pub async fn agree(
    agents: &mut [&mut ScriptedAgent],
    run: u64,
    epoch: u64,
    step: u64,
    hash: &str,
    within: Duration,
) -> anyhow::Result<pb::Agreement> {
    for a in agents.iter() {
        a.report(run, epoch, step, hash).await?;
    }
    let mut last = None;
    for a in agents.iter_mut() {
        last = Some(a.expect_agreement(epoch, within).await?);
    }
    last.ok_or_else(|| anyhow::anyhow!("no agents"))
}

/// One synchronisation as honest members make it: every agent commits (one unit norm per
/// segment), waits for the plan, and reports `hash` after it.
pub async fn sync(
    agents: &mut [&mut ScriptedAgent],
    run: u64,
    epoch: u64,
    step: u64,
    hash: &str,
    within: Duration,
) -> anyhow::Result<pb::SyncPlan> {
    let n = agents.len();
    for a in agents.iter() {
        a.commit(run, epoch, step, vec![1.0; n]).await?;
    }
    let mut plan = None;
    for a in agents.iter_mut() {
        plan = Some(a.expect_plan(epoch, step, within).await?);
    }
    for a in agents.iter() {
        a.report(run, epoch, step, hash).await?;
    }
    plan.ok_or_else(|| anyhow::anyhow!("no agents"))
}
