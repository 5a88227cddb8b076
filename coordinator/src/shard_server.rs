//! Shard bytes over HTTPS, so workers need no shared filesystem.
//!
//! `GET /runs/{run}/shards/{index}` streams one shard of a run's manifest from the file its
//! `file://` (or absolute path) URI names, with `Content-Length` and the manifest's SHA-256 in
//! [`SHA256_HEADER`] for the worker to verify. Only manifest entries are served: the path names a
//! run and an index, never a file, so no request can reach another file.
//! Synthetic shards (`synthetic:…`) have no bytes: the worker generates them, and a request for
//! one gets 404.
//!
//! Security: TLS 1.3 with the coordinator's server certificate (the chain workers pin by
//! `sha256:`), and mutual TLS: a client without a certificate issued by the coordinator's CA is
//! refused in the handshake. Each request names its worker in the `x-longhaul-worker` header (as
//! on gRPC); a certificate not issued for that `worker-<id>`, or an unknown worker, gets 403.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use proto::{RunId, WorkerId};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::server::accept::{Accepted, tls_incoming};
use crate::server::{ClientCerts, ServeError, Shared, tls_config};
use crate::shards::ShardInfo;
use client::WORKER_HEADER;

/// The response header carrying the shard's lower-case hex SHA-256 from the manifest.
pub const SHA256_HEADER: &str = "x-longhaul-sha256";

/// The URL path of a shard.
pub fn shard_path(run: RunId, index: u32) -> String {
    format!("/runs/{}/shards/{index}", run.0)
}

/// Where a worker fetches a shard's bytes, under the shard listener's `base` URL: "" when the
/// coordinator serves no shards, and for synthetic shards (the worker generates them: there is
/// nothing to fetch).
pub fn shard_url(base: Option<&str>, run: RunId, index: u32, info: &ShardInfo) -> String {
    match base {
        Some(base) if !info.is_synthetic() => format!("{base}{}", shard_path(run, index)),
        _ => String::new(),
    }
}

/// The client certificate of a connection (verified against the CA in the handshake).
#[derive(Clone, Debug)]
struct Peer(Option<CertificateDer<'static>>);

/// Whether a (CA-verified) client certificate was issued for `worker`.
fn cert_is_for(cert: &CertificateDer<'_>, worker: WorkerId) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else { return false };
    let Ok(name) = rustls::pki_types::ServerName::try_from(worker.member_name()) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Serves shards on `listener` until `cancel`; the connections are taken by the server's one
/// accept loop (`server::accept`), with its limits.
pub(crate) fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let tls = tokio_rustls::TlsAcceptor::from(tls_config(
        shared.pki(),
        ClientCerts::Required,
        b"http/1.1",
    )?);
    let limits = shared.config().accept_limits();
    info!(addr = ?listener.local_addr().ok(), "serving shards over HTTPS");
    let mut incoming = tls_incoming(listener, tls, limits, cancel.clone(), "shards");
    let app = Router::new().route("/runs/{run}/shards/{index}", get(shard)).with_state(shared);
    tokio::spawn(async move {
        loop {
            let Accepted { stream, peer, permit } = tokio::select! {
                _ = cancel.cancelled() => return,
                a = incoming.recv() => match a { Some(a) => a, None => return },
            };
            let app = app.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
                let svc = TowerToHyperService::new(app.layer(Extension(Peer(cert))));
                let builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "shard connection ended");
                }
            });
        }
    });
    Ok(())
}

fn refuse(status: StatusCode, msg: String) -> Response {
    (status, format!("{msg}\n")).into_response()
}

async fn shard(
    State(shared): State<Arc<Shared>>,
    Extension(Peer(cert)): Extension<Peer>,
    Path((run, index)): Path<(u64, u32)>,
    headers: HeaderMap,
) -> Response {
    let worker = headers
        .get(WORKER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v > 0)
        .map(WorkerId);
    let (Some(worker), Some(cert)) = (worker, cert) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            format!("name the worker in the {WORKER_HEADER} header and present its certificate"),
        );
    };
    if !cert_is_for(&cert, worker) {
        return refuse(StatusCode::FORBIDDEN, format!("the client certificate is not {worker}'s"));
    }
    let info = {
        let c = shared.lock();
        if c.worker(worker).is_none() {
            return refuse(StatusCode::FORBIDDEN, format!("{worker} is not a known worker"));
        }
        // Shard bytes go to the members of that run's current epoch, nobody else (not a banned
        // or benched worker, not a member of another run).
        if c.shards(RunId(run)).is_some() && !c.is_member(RunId(run), worker) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("{worker} is not a member of run {run}'s current epoch"),
            );
        }
        c.shards(RunId(run)).and_then(|b| b.record(index)).map(|r| r.info.clone())
    };
    let Some(info) = info else {
        return refuse(StatusCode::NOT_FOUND, format!("run {run} has no shard {index}"));
    };
    if info.is_synthetic() {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("shard {index} ({}) is synthetic: the worker generates it", info.uri),
        );
    }
    let path = match info.uri.strip_prefix("file://") {
        Some(p) => p,
        None if info.uri.starts_with('/') => info.uri.as_str(),
        None => {
            return refuse(
                StatusCode::NOT_FOUND,
                format!(
                    "shard {index} ({}) is not a local file the coordinator can serve",
                    info.uri
                ),
            );
        }
    };
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) => {
            warn!(run_id = run, shard = index, %path, error = %e, "cannot open shard");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read shard {index}"));
        }
    };
    match file.metadata().await {
        Ok(m) if m.len() == info.size => {}
        Ok(m) => {
            warn!(run_id = run, shard = index, %path, on_disk = m.len(), manifest = info.size,
                "shard size differs from the manifest");
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("shard {index} on disk does not match the manifest"),
            );
        }
        Err(e) => {
            warn!(run_id = run, shard = index, %path, error = %e, "cannot stat shard");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read shard {index}"));
        }
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = HeaderValue::from_str(&info.sha256) {
        h.insert(SHA256_HEADER, v);
    }
    resp
}
