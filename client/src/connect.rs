//! Connecting to a coordinator: TLS 1.3 with the CA pinned by hash, optional client identity.
//!
//! The server presents its certificate and the CA's. The client accepts the connection only if
//! one certificate of the chain hashes to the pin (`sha256:<hex>`) and the server's certificate
//! verifies against it for the host dialed. Nothing else is trusted: no system roots.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pki::ca_hash;

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ConnectConfig {
    /// `https://host:port`.
    pub url: String,
    /// `sha256:<hex>` of the coordinator's CA certificate.
    pub ca_pin: String,
    pub connect_timeout: Duration,
    /// Deadline for every unary call.
    pub request_timeout: Duration,
}

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("invalid coordinator URL {0:?}: expected https://host:port")]
    BadUrl(String),
    #[error("invalid CA pin {0:?}: expected sha256:<64 hex digits> (see `longhaul ca-hash`)")]
    BadPin(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
}

/// A client identity (a worker's certificate chain and key).
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").finish_non_exhaustive()
    }
}

/// Checks the server chain against the pinned CA.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

#[derive(Error)]
#[error("the coordinator's CA does not match the pin {expected} (its chain has {found})")]
struct PinMismatch {
    expected: String,
    found: String,
}

// rustls shows the `Debug` form of custom errors: make it the readable one.
impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| ca_hash(c) == self.pin) else {
            let found: Vec<String> = intermediates.iter().map(|c| ca_hash(c)).collect();
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(PinMismatch {
                    expected: self.pin.clone(),
                    found: if found.is_empty() { "no CA".into() } else { found.join(", ") },
                })),
            )));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, &[], now)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Checks a pin's form.
pub fn parse_pin(pin: &str) -> Result<String, ConnectError> {
    let hex = pin.strip_prefix("sha256:").ok_or_else(|| ConnectError::BadPin(pin.into()))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ConnectError::BadPin(pin.into()));
    }
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

/// A TLS 1.3 client configuration that accepts only servers whose chain carries the CA with
/// `pin` (`sha256:<hex>`), presenting `identity` if given, offering `alpn`.
pub fn tls_client_config(
    pin: &str,
    identity: Option<ClientIdentity>,
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
    let pin = parse_pin(pin)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin, provider }));
    let mut tls = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(tls))
}

/// Opens a channel to the coordinator (lazily: the first call connects, and reconnects after
/// failures).
pub fn channel(
    cfg: &ConnectConfig,
    identity: Option<ClientIdentity>,
) -> Result<Channel, ConnectError> {
    let pin = parse_pin(&cfg.ca_pin)?;
    let rest =
        cfg.url.strip_prefix("https://").ok_or_else(|| ConnectError::BadUrl(cfg.url.clone()))?;
    let authority: Uri = format!("http://{}", rest.trim_end_matches('/'))
        .parse()
        .map_err(|_| ConnectError::BadUrl(cfg.url.clone()))?;
    let host = authority.host().ok_or_else(|| ConnectError::BadUrl(cfg.url.clone()))?.to_owned();
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = authority.port_u16().unwrap_or(443);
    let server_name =
        ServerName::try_from(host.clone()).map_err(|_| ConnectError::BadUrl(cfg.url.clone()))?;

    let connector = tokio_rustls::TlsConnector::from(tls_client_config(&pin, identity, b"h2")?);

    let endpoint = Endpoint::from(authority)
        .connect_timeout(cfg.connect_timeout)
        .timeout(cfg.request_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let connect_timeout = cfg.connect_timeout;
    let channel = endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let addr = format!("{host}:{port}");
        async move {
            let tcp = tokio::time::timeout(connect_timeout, tokio::net::TcpStream::connect(&addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
            tcp.set_nodelay(true)?;
            let tls = tokio::time::timeout(connect_timeout, connector.connect(server_name, tcp))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    }));
    Ok(channel)
}

/// Adds the admin credential to every request.
#[derive(Clone, Debug)]
pub struct AdminAuth(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl AdminAuth {
    pub fn new(token: &str) -> Result<Self, ConnectError> {
        format!("Bearer {}", token.trim()).parse().map(Self).map_err(|_| ConnectError::Connect {
            url: String::new(),
            reason: "admin token is not ASCII".into(),
        })
    }
}

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Metadata key naming the worker on agent calls (checked against its certificate).
pub const WORKER_HEADER: &str = "x-longhaul-worker";

/// Adds the worker id header to every request.
#[derive(Clone, Debug)]
pub struct WorkerAuth(pub u64);

impl tonic::service::Interceptor for WorkerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert(WORKER_HEADER, self.0.into());
        Ok(req)
    }
}
