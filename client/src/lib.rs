//! Talking to a longhaul coordinator, for everything that is not the coordinator: the worker,
//! the admin CLI, tests and benchmarks.
//!
//! - [`connect`]: TLS 1.3 with the coordinator's CA pinned by hash, and the credentials every
//!   call carries (the admin token, the worker id beside the worker's certificate);
//! - [`pki`]: what a client needs of X.509 (a key and CSR, a certificate's validity, the CA
//!   pin, hex);
//! - [`ConnectArgs`]: the `--coordinator` and `--ca-hash` arguments, shared by both binaries;
//! - [`checkpoint`]: the digests a worker reports of its checkpoints and the coordinator checks.
//!
//! The coordinator's own side of the PKI (its CA, signing, tokens) stays in the coordinator.

pub mod checkpoint;
pub mod connect;
pub mod pki;

use std::time::Duration;

use proto::pb::agent_client::AgentClient;
use proto::pb::control_client::ControlClient;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

pub use connect::{
    AdminAuth, ClientIdentity, ConnectConfig, ConnectError, WORKER_HEADER, WorkerAuth, channel,
    parse_pin, tls_client_config,
};

/// An admin's client of the control service.
pub type Control = ControlClient<InterceptedService<Channel, AdminAuth>>;
/// A worker's client of the agent service, authenticated by its certificate.
pub type AgentRpc = AgentClient<InterceptedService<Channel, WorkerAuth>>;

/// An admin control client.
pub fn control(cfg: &ConnectConfig, admin_token: &str) -> Result<Control, ConnectError> {
    Ok(ControlClient::with_interceptor(channel(cfg, None)?, AdminAuth::new(admin_token)?))
}

/// A worker identity from its PEM certificate chain and key.
pub fn identity(cert_pem: &str, key_pem: &str) -> anyhow::Result<ClientIdentity> {
    let chain =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    Ok(ClientIdentity { chain, key })
}

/// An agent client authenticated by the worker's certificate.
pub fn agent_client(
    cfg: &ConnectConfig,
    id: u64,
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<AgentRpc> {
    let ch = channel(cfg, Some(identity(cert_pem, key_pem)?))?;
    Ok(AgentClient::with_interceptor(ch, WorkerAuth(id)))
}

/// Where the coordinator is and how to recognise it: the arguments every client binary takes.
#[derive(Clone, Debug, clap::Args)]
pub struct ConnectArgs {
    /// The coordinator's URL.
    #[arg(
        long,
        global = true,
        env = "LONGHAUL_COORDINATOR",
        default_value = "https://127.0.0.1:7070"
    )]
    pub coordinator: String,
    /// The coordinator's CA pin, `sha256:<hex>` (`longhaul ca-hash` prints it).
    #[arg(long, global = true, env = "LONGHAUL_CA_HASH")]
    pub ca_hash: Option<String>,
}

impl ConnectArgs {
    /// The pin given, if any (blank counts as none).
    pub fn pin(&self) -> Option<&str> {
        self.ca_hash.as_deref().map(str::trim).filter(|p| !p.is_empty())
    }

    /// A connection to the coordinator with `pin`, and the deadlines an interactive client or
    /// a worker uses.
    pub fn config(&self, pin: &str) -> ConnectConfig {
        ConnectConfig {
            url: self.coordinator.trim_end_matches('/').to_owned(),
            ca_pin: pin.trim().to_owned(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}
