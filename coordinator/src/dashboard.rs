//! The web dashboard: a page served by the coordinator on a listener of its own (off unless
//! `--dashboard-listen` is given), reading the same state the `Control` service does.
//!
//! - `GET /` (and `/app.js`, `/app.css`): the page, embedded in the binary; it holds no data and
//!   fetches nothing from anywhere but this listener.
//! - `POST /api/login` (the credential as the body) sets an `HttpOnly`, `SameSite=Strict`
//!   session cookie; `POST /api/logout` clears it.
//! - `GET /api/runs`, `/api/runs/{id}` (the run, its ring, its workers with their time split,
//!   ledger and audit record), `/api/runs/{id}/metrics?max=N` (the persisted metric points,
//!   downsampled to at most N), `/api/runs/{id}/events` (server-sent events: the log so far,
//!   then every status change and log line, until the run ends), `/api/workers`.
//!
//! Security: every `/api/` read needs the admin credential or a viewer token
//! (`longhaul token create --viewer`; see [`crate::ca::Pki::viewer_token`]), as a bearer
//! header or the session cookie; without one the answer is 401 and nothing else. A listener
//! bound to anything but loopback speaks TLS 1.3 with the coordinator's server certificate.
//! Connections are bounded ([`MAX_CONNECTIONS`]), a request's head must arrive within
//! [`HEADER_TIMEOUT`], bodies are capped at [`MAX_BODY`], and every response carries a strict
//! content security policy (scripts and styles from this origin only; nothing from a network).
//! What the page shows is what members reported (loss, throughput): the coordinator checks
//! those values are finite and in range, not that they are true.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use proto::pb;
use proto::pb::control_server::Control;
use proto::{RunId, WorkerId};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::server::accept::{AcceptLimits, Accepted, tls_incoming};
use crate::server::{ClientCerts, ServeError, Shared, tls_config};
use crate::store::MetricPoint;
use crate::views;

/// Open dashboard connections, at most (each server-sent event stream holds one).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request body (a login's credential).
pub const MAX_BODY: usize = 1024;
/// How long a client may take to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Event streams open at once, at most: fewer than the connections, so that streams held open
/// never lock the page's other requests out.
pub const MAX_STREAMS: usize = 32;
/// How long an answer of `/api/runs/{id}/metrics` is reused for the same run and size (each
/// open page polls it; one read of the store serves them all).
const METRICS_CACHE: Duration = Duration::from_secs(2);
/// How long a session cookie made from the admin credential lasts (the credential itself is
/// never put in a cookie).
const ADMIN_SESSION: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "lh_session";
/// Metric points a response carries by default, and at most.
pub const DEFAULT_POINTS: usize = 1500;
pub const MAX_POINTS: usize = 10_000;
/// Workers a response lists, at most.
const MAX_WORKERS: usize = 1000;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");

/// Nothing but this origin: no inline script, no frame, no network elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Recent metrics answers by (run, max): when each was made, and its body.
type MetricsCache = std::collections::HashMap<(u64, usize), (std::time::Instant, Bytes)>;

#[derive(Clone)]
struct Dash {
    shared: Arc<Shared>,
    /// Whether the listener speaks TLS (the cookie is then `Secure`).
    tls: bool,
    streams: Arc<Semaphore>,
    /// Recent metrics answers by (run, max): when made, and the body.
    metrics: Arc<std::sync::Mutex<MetricsCache>>,
}

/// Serves the dashboard on `listener` until `cancel`: plain HTTP when it is bound to a
/// loopback address, TLS with the coordinator's certificate otherwise.
pub(crate) fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(|e| ServeError::Other(e.to_string()))?;
    let tls = !addr.ip().is_loopback();
    let handshake_timeout = shared.config().accept_limits().handshake_timeout;
    let app = router(Dash {
        shared: shared.clone(),
        tls,
        streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        metrics: Arc::default(),
    });
    if tls {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(
            shared.pki(),
            ClientCerts::None,
            b"http/1.1",
        )?);
        let limits = AcceptLimits { max_connections: MAX_CONNECTIONS, handshake_timeout };
        let mut incoming = tls_incoming(listener, acceptor, limits, cancel.clone(), "dashboard");
        info!(%addr, "dashboard on https://{addr}/");
        tokio::spawn(async move {
            loop {
                let Accepted { stream, peer, permit } = tokio::select! {
                    _ = cancel.cancelled() => return,
                    a = incoming.recv() => match a { Some(a) => a, None => return },
                };
                let app = app.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    connection(stream, app, cancel, peer).await;
                });
            }
        });
    } else {
        info!(%addr, "dashboard on http://{addr}/ (loopback: plain HTTP)");
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = cancel.cancelled() => return,
                    p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                };
                let (tcp, peer) = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            warn!(error = %e, "dashboard accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let app = app.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    connection(tcp, app, cancel, peer).await;
                });
            }
        });
    }
    Ok(())
}

/// Serves one HTTP/1.1 connection until it ends or the server shuts down.
async fn connection<S>(
    stream: S,
    app: Router,
    cancel: CancellationToken,
    peer: std::net::SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let builder = builder.http1_only();
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    tokio::select! {
        r = conn => if let Err(e) = r { debug!(%peer, error = %e, "dashboard connection ended") },
        _ = cancel.cancelled() => {}
    }
}

fn router(d: Dash) -> Router {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/runs", get(runs))
        .route("/api/runs/{id}", get(run))
        .route("/api/runs/{id}/metrics", get(metrics))
        .route("/api/runs/{id}/events", get(events))
        .route("/api/workers", get(workers))
        .fallback(|| async { plain(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(d)
}

async fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    r
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn plain(status: StatusCode, msg: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{msg}\n"))
        .into_response()
}

fn json_response(v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The credential a request carries: its bearer header, else its session cookie.
fn credential(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// A POST from another origin (a page on another port or site submitting to this one) is
/// refused: a browser always names the origin of a script's or form's POST. Clients that are not
/// browsers send no `Origin` and are let through (they need a credential to learn anything).
fn cross_origin(headers: &HeaderMap) -> Option<Response> {
    let origin = headers.get(header::ORIGIN)?.to_str().unwrap_or("");
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
    (host.is_empty() || origin_host != host)
        .then(|| plain(StatusCode::FORBIDDEN, "a request from another origin"))
}

/// What a credential allows until when: `Some(expiry_ms)` for a valid viewer token, `Some(0)`
/// for the admin credential (no expiry of its own), `None` for anything else.
fn check(d: &Dash, token: &str) -> Option<u64> {
    let pki = d.shared.pki();
    if pki.is_admin(token) {
        return Some(0);
    }
    pki.viewer_expiry(token, d.shared.now_ms())
}

/// The 401 answer to a request without a valid credential; `None` when it has one.
fn refusal(d: &Dash, headers: &HeaderMap) -> Option<Response> {
    match credential(headers) {
        Some(t) if check(d, t).is_some() => None,
        Some(_) => Some(unauthorized("the credential is wrong or expired")),
        None => Some(unauthorized(
            "the dashboard needs the admin credential or a viewer token \
             (`longhaul token create --viewer`)",
        )),
    }
}

fn unauthorized(msg: &str) -> Response {
    let mut r = plain(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn login(State(d): State<Dash>, headers: HeaderMap, body: axum::body::Body) -> Response {
    if let Some(r) = cross_origin(&headers) {
        return r;
    }
    // The body within its time and size: a client that announces one and never sends it
    // holds nothing for long.
    let body = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await
    {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "the credential is too long"),
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "the credential did not arrive"),
    };
    let Ok(token) = std::str::from_utf8(&body) else {
        return unauthorized("the credential is not text");
    };
    let Some(expires) = check(&d, token.trim()) else {
        return unauthorized("the credential is wrong or expired");
    };
    let now = d.shared.now_ms();
    // The session is always a viewer token: the admin credential (which also drives the
    // control API) never goes into a cookie, which a browser would send to every port of this
    // host. A viewer token is `[a-z0-9_]` only, so it is a cookie value as it is.
    let (session, expires) = if expires == 0 {
        let until = now + ADMIN_SESSION.as_millis() as u64;
        (d.shared.pki().viewer_token(until), until)
    } else {
        (token.trim().to_owned(), expires)
    };
    let max_age = expires.saturating_sub(now) / 1000;
    let secure = if d.tls { "; Secure" } else { "" };
    let cookie =
        format!("{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    let Ok(cookie) = HeaderValue::from_str(&cookie) else {
        return plain(StatusCode::BAD_REQUEST, "the credential is not a valid cookie value");
    };
    let mut r = json_response(&json!({ "ok": true, "expires_unix_ms": expires }));
    r.headers_mut().insert(header::SET_COOKIE, cookie);
    r
}

async fn logout(State(d): State<Dash>, headers: HeaderMap) -> Response {
    if let Some(r) = cross_origin(&headers) {
        return r;
    }
    let secure = if d.tls { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    let mut r = json_response(&json!({ "ok": true }));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn runs(State(d): State<Dash>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&d, &headers) {
        return r;
    }
    let runs: Vec<Value> = {
        let c = d.shared.lock();
        // Newest first, bounded.
        let all: Vec<_> = c.runs_after(RunId(0)).collect();
        all.iter()
            .rev()
            .take(MAX_WORKERS)
            .map(|r| run_view(&crate::server::run_info(&c, r)))
            .collect()
    };
    json_response(&json!({ "runs": runs }))
}

/// What a viewer is not shown of the CLI's JSON: workers' network addresses (a viewer token
/// shared widely would otherwise map every ring member for a flood) and the checkpoint URI a
/// worker reported (a path on its machine).
const HIDDEN: [&str; 2] = ["ring_addr", "latest_checkpoint"];

fn hide(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        for k in HIDDEN {
            o.remove(k);
        }
    }
    v
}

/// A run as the dashboard shows it: the CLI's JSON without [`HIDDEN`] fields.
fn run_view(info: &pb::RunInfo) -> Value {
    hide(views::run_json(info))
}

/// A worker as the dashboard shows it: the CLI's JSON without [`HIDDEN`] fields, plus the time
/// split of its latest metrics report.
fn worker_view(c: &crate::cluster::Cluster, w: &crate::cluster::WorkerRecord, now: u64) -> Value {
    let mut v = hide(views::worker_json(&crate::server::worker_info(c, w, now)));
    if let (Some(m), Some(o)) = (c.latest_metrics(w.id), v.as_object_mut()) {
        o.insert("compute_ms".into(), json!(m.compute_ms));
        o.insert("comm_ms".into(), json!(m.comm_ms));
        o.insert("idle_ms".into(), json!(m.idle_ms));
        o.insert("bytes_sent".into(), json!(m.bytes_sent));
        o.insert("bytes_received".into(), json!(m.bytes_received));
    }
    v
}

async fn run(State(d): State<Dash>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(r) = refusal(&d, &headers) {
        return r;
    }
    let now = d.shared.now_ms();
    let c = d.shared.lock();
    let Some(r) = c.run(RunId(id)) else {
        return plain(StatusCode::NOT_FOUND, &format!("no run {id}"));
    };
    let info = run_view(&crate::server::run_info(&c, r));
    // The ring in its order; each link's round-trip time where its members measured it (QUIC's
    // estimate on the ring's connections, reported with heartbeats; null before any).
    let rtts = c.ring_rtts(r.id);
    let ring: Vec<Value> = r
        .members
        .iter()
        .zip(rtts)
        .map(|(m, rtt)| {
            let w = c.worker(m.worker);
            json!({
                "worker_id": m.worker.0,
                "name": m.worker.member_name(),
                "host": w.map(|w| w.host.clone()).unwrap_or_default(),
                "liveness": views::liveness_name(
                    pb::Liveness::from(c.liveness(m.worker).unwrap_or(proto::Liveness::Dead)) as i32,
                ),
                "rtt_ms_to_next": rtt.map(|us| us as f64 / 1000.0),
            })
        })
        .collect();
    let member = |w: WorkerId| r.members.iter().any(|m| m.worker == w);
    let workers: Vec<Value> = c
        .workers()
        .filter(|w| w.run == Some(r.id) || member(w.id) || w.banned.contains(&r.id))
        .take(MAX_WORKERS)
        .map(|w| worker_view(&c, w, now))
        .collect();
    json_response(&json!({ "run": info, "ring": ring, "workers": workers }))
}

async fn workers(State(d): State<Dash>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&d, &headers) {
        return r;
    }
    let now = d.shared.now_ms();
    let c = d.shared.lock();
    let ws: Vec<Value> =
        c.workers_after(WorkerId(0)).take(MAX_WORKERS).map(|w| worker_view(&c, w, now)).collect();
    json_response(&json!({ "workers": ws }))
}

/// `max=N` from a query string (default [`DEFAULT_POINTS`], within 2..=[`MAX_POINTS`]).
fn max_points(query: Option<&str>) -> Result<usize, String> {
    let Some(v) =
        query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| kv.strip_prefix("max="))
    else {
        return Ok(DEFAULT_POINTS);
    };
    match v.parse::<usize>() {
        Ok(n) if (2..=MAX_POINTS).contains(&n) => Ok(n),
        _ => Err(format!("max={v:.20}: expected a number of points in 2..={MAX_POINTS}")),
    }
}

/// At most `max` points, evenly spread over `points` (sorted by step): the first, then the
/// last of each bucket, carrying the newest loss and accuracy the bucket saw, so that a rare
/// evaluation is never dropped by the thinning.
pub fn downsample(points: &[MetricPoint], max: usize) -> Vec<MetricPoint> {
    let max = max.max(2);
    if points.len() <= max {
        return points.to_vec();
    }
    // `max - 1` buckets of the points after the first, as even as integers allow.
    let rest = &points[1..];
    let buckets = max - 1;
    let mut out = Vec::with_capacity(max);
    out.push(points[0].clone());
    for b in 0..buckets {
        let bucket = &rest[b * rest.len() / buckets..(b + 1) * rest.len() / buckets];
        let Some(last) = bucket.last() else { continue };
        let mut p = last.clone();
        p.loss = bucket.iter().rev().find_map(|q| q.loss);
        p.accuracy = bucket.iter().rev().find_map(|q| q.accuracy);
        out.push(p);
    }
    out
}

async fn metrics(
    State(d): State<Dash>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(r) = refusal(&d, &headers) {
        return r;
    }
    let max = match max_points(query.as_deref()) {
        Ok(n) => n,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
    };
    if d.shared.lock().run(RunId(id)).is_none() {
        return plain(StatusCode::NOT_FOUND, &format!("no run {id}"));
    }
    let fresh = {
        let cache = d.metrics.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(&(id, max)).filter(|(at, _)| at.elapsed() < METRICS_CACHE).map(|(_, b)| b.clone())
    };
    let body = match fresh {
        Some(b) => b,
        None => {
            let store = d.shared.store().clone();
            let points = match tokio::task::spawn_blocking(move || store.metrics(RunId(id))).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    warn!(run = id, error = %e, "dashboard: reading metric points");
                    return plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the metric points cannot be read now",
                    );
                }
                Err(e) => {
                    warn!(run = id, error = %e, "dashboard: reading metric points");
                    return plain(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the metric points cannot be read now",
                    );
                }
            };
            let body = Bytes::from(
                serde_json::to_vec(&metrics_json(id, &points, max)).unwrap_or_default(),
            );
            let mut cache = d.metrics.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (at, _)| at.elapsed() < METRICS_CACHE);
            cache.insert((id, max), (std::time::Instant::now(), body.clone()));
            body
        }
    };
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The JSON of a run's metric points, thinned to `max`.
fn metrics_json(id: u64, points: &[MetricPoint], max: usize) -> Value {
    let shown: Vec<Value> = downsample(points, max)
        .iter()
        .map(|p| {
            // A point carries one member's rate; the run's is that times its members.
            let tps = p.tokens_per_sec * f64::from(p.workers.max(1));
            json!({
                "step": p.step, "unix_ms": p.at_ms, "loss": p.loss, "accuracy": p.accuracy,
                "tokens_per_sec": tps, "compute_utilisation": p.compute_utilisation,
                "bytes_moved": p.bytes_moved, "workers": p.workers,
            })
        })
        .collect();
    json!({ "run_id": id, "total": points.len(), "points": shown })
}

async fn events(State(d): State<Dash>, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    if let Some(r) = refusal(&d, &headers) {
        return r;
    }
    let Ok(permit) = d.streams.clone().try_acquire_owned() else {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("{MAX_STREAMS} event streams are open: try again later"),
        );
    };
    // A stream ends when the credential that opened it expires (the admin credential has no
    // expiry of its own).
    let expires = credential(&headers).and_then(|t| check(&d, t)).unwrap_or(0);
    let left = Duration::from_millis(expires.saturating_sub(d.shared.now_ms()));
    let until = if expires == 0 { Duration::from_secs(u64::from(u32::MAX)) } else { left };
    // The same stream `longhaul logs -f` reads: the log so far, the state now, every change.
    let svc = crate::server::control_service(d.shared.clone());
    let stream = match svc.watch_run(tonic::Request::new(pb::WatchRunRequest { run_id: id })).await
    {
        Ok(s) => s.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => {
            return plain(StatusCode::NOT_FOUND, s.message());
        }
        Err(s) => {
            warn!(run = id, error = %s, "dashboard: opening the event stream");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the run's events cannot be read now");
        }
    };
    let stream = stream.take_until(tokio::time::sleep(until));
    let events = stream.filter_map(move |e| {
        // The permit lives as long as the stream.
        let _held = &permit;
        async move {
            let e = e.ok()?;
            let ev = match e.event? {
                pb::run_event::Event::Log(line) => Event::default()
                    .event("log")
                    .data(json!({ "unix_ms": e.unix_ms, "line": line }).to_string()),
                pb::run_event::Event::Status(info) => Event::default()
                    .event("status")
                    .data(json!({ "unix_ms": e.unix_ms, "run": run_view(&info) }).to_string()),
            };
            Some(Ok::<_, Infallible>(ev))
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: u64, loss: Option<f64>, accuracy: Option<f64>) -> MetricPoint {
        MetricPoint {
            step,
            loss,
            tokens_per_sec: 1.0,
            at_ms: step,
            accuracy,
            compute_utilisation: 0.5,
            bytes_moved: step * 10,
            workers: 2,
        }
    }

    #[test]
    fn downsampling_keeps_the_ends_and_every_rare_value() {
        let mut points: Vec<MetricPoint> =
            (1..=10_000).map(|s| point(s, Some(s as f64), None)).collect();
        // One evaluation in the middle of a bucket, and the last point without a loss.
        points[4_321].accuracy = Some(0.9);
        points[9_999].loss = None;
        let out = downsample(&points, 100);
        assert!(out.len() <= 100, "{} points", out.len());
        assert_eq!(out.first().map(|p| p.step), Some(1));
        assert_eq!(out.last().map(|p| p.step), Some(10_000));
        assert_eq!(out.iter().filter(|p| p.accuracy == Some(0.9)).count(), 1);
        // The last bucket's newest loss is carried to its point.
        assert_eq!(out.last().and_then(|p| p.loss), Some(9_999.0));
        assert!(out.windows(2).all(|w| w[0].step < w[1].step));
        // Few points: all of them; one too many: exactly the maximum.
        assert_eq!(downsample(&points[..50], 100).len(), 50);
        assert_eq!(downsample(&points[..1001], 1000).len(), 1000);
        assert_eq!(downsample(&points, 0).len(), 2);
    }

    #[test]
    fn the_point_count_is_bounded_and_named_when_wrong() {
        assert_eq!(max_points(None), Ok(DEFAULT_POINTS));
        assert_eq!(max_points(Some("max=300")), Ok(300));
        assert!(max_points(Some("max=0")).is_err());
        assert!(max_points(Some("max=99999999999999999999999")).is_err());
        assert!(max_points(Some("max=-1")).unwrap_err().contains("max=-1"));
    }

    #[test]
    fn a_post_from_another_origin_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(cross_origin(&h).is_none(), "no Origin: not a browser");
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert!(cross_origin(&h).is_none());
        for other in ["http://127.0.0.1:3000", "https://evil.example", "null"] {
            h.insert(header::ORIGIN, HeaderValue::from_static(other));
            assert!(cross_origin(&h).is_some(), "{other}");
        }
    }

    #[test]
    fn a_credential_comes_from_the_bearer_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h), None);
        h.insert(header::COOKIE, HeaderValue::from_static("a=b; lh_session=lh_view_1_ab; c=d"));
        assert_eq!(credential(&h), Some("lh_view_1_ab"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer xyz"));
        assert_eq!(credential(&h), Some("xyz"));
    }
}
