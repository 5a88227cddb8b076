//! Forming the ring: dial the next rank, accept the previous one, and refuse everyone else.

use std::time::{Duration, Instant};

use quinn::{Connection, ConnectionError, Endpoint, VarInt};
use tracing::warn;

use super::{CLOSE_NOT_NEIGHBOUR, JoinError, Member};
use crate::tls;

/// Dials `peer` `count` times, retrying while it is not up yet, until `deadline`.
pub(super) async fn dial(
    endpoint: &Endpoint,
    peer: &Member,
    epoch: u64,
    count: usize,
    deadline: Instant,
) -> Result<Vec<Connection>, JoinError> {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(count);
    while conns.len() < count {
        let connecting = endpoint.connect(peer.addr, &peer.name).map_err(|e| {
            JoinError::Config(format!("cannot dial {} at {}: {e}", peer.name, peer.addr))
        })?;
        let timeout =
            |waited| JoinError::Timeout { peer: peer.name.clone(), waited, refusals: Vec::new() };
        match tokio::time::timeout_at(deadline.into(), connecting).await {
            Ok(Ok(conn)) => {
                match tokio::time::timeout_at(deadline.into(), admitted(&conn, epoch)).await {
                    Ok(Ok(())) => conns.push(conn),
                    Ok(Err(reason)) => {
                        return Err(JoinError::Refused { peer: peer.name.clone(), reason });
                    }
                    Err(_) => return Err(timeout(started.elapsed())),
                }
            }
            Ok(Err(ConnectionError::TimedOut)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) if Instant::now() < deadline && is_transient(&e) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => {
                return Err(JoinError::Refused { peer: peer.name.clone(), reason: e.to_string() });
            }
            Err(_) => return Err(timeout(started.elapsed())),
        }
    }
    Ok(conns)
}

async fn admit(conn: &Connection, epoch: u64) {
    // A failure here shows up on the dialer's side, which waits for this message.
    if let Ok(mut s) = conn.open_uni().await {
        let _ = s.write_all(&crate::wire::admission(epoch)).await;
        let _ = s.finish();
    }
}

/// Waits for the peer's admission message on a freshly dialed connection.
async fn admitted(conn: &Connection, epoch: u64) -> Result<(), String> {
    let mut stream =
        conn.accept_uni().await.map_err(|e| format!("refused after the handshake: {e}"))?;
    let mut m = [0u8; crate::wire::ADMISSION_LEN];
    stream.read_exact(&mut m).await.map_err(|e| format!("no admission message: {e}"))?;
    crate::wire::check_admission(&m, epoch)
}

/// Failures worth retrying until the join deadline: no answer yet, or the peer's endpoint of an
/// earlier epoch (closing, so refusing new connections) still holds its address.
fn is_transient(e: &ConnectionError) -> bool {
    match e {
        ConnectionError::TimedOut | ConnectionError::Reset => true,
        ConnectionError::ConnectionClosed(c) => {
            c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        }
        _ => false,
    }
}

/// Accepts `count` connections from member `prev`, refusing (and remembering) everything else,
/// until `deadline`.
pub(super) async fn accept(
    endpoint: &Endpoint,
    epoch: u64,
    names: &[String],
    prev: usize,
    count: usize,
    deadline: Instant,
) -> Result<Vec<Connection>, JoinError> {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(count);
    let mut refusals = Vec::new();
    while conns.len() < count {
        let timeout = |refusals: Vec<String>| JoinError::Timeout {
            peer: names[prev].clone(),
            waited: started.elapsed(),
            refusals,
        };
        let incoming = match tokio::time::timeout_at(deadline.into(), endpoint.accept()).await {
            Ok(Some(i)) => i,
            Ok(None) => {
                return Err(JoinError::Config("endpoint closed while forming the group".into()));
            }
            Err(_) => return Err(timeout(refusals)),
        };
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout_at(deadline.into(), incoming.into_future()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                warn!(%remote, error = %e, "refused a ring connection");
                refusals.push(format!("{remote}: {e}"));
                continue;
            }
            Err(_) => return Err(timeout(refusals)),
        };
        let who = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().and_then(|c| tls::member_named_by(c, names)));
        match who {
            Some(r) if r == prev => {
                admit(&conn, epoch).await;
                conns.push(conn);
            }
            other => {
                let name = other.map_or("an unknown member", |r| names[r].as_str());
                let reason = format!("{remote}: {name} is not the previous rank {}", names[prev]);
                warn!("{reason}");
                conn.close(
                    VarInt::from_u32(CLOSE_NOT_NEIGHBOUR),
                    b"not my previous ring neighbour",
                );
                refusals.push(reason);
            }
        }
    }
    Ok(conns)
}
