//! The one TLS accept loop: every TLS listener of the coordinator (the gRPC API, the shard
//! server) takes connections through it, with the same limits.
//!
//! Each accepted TCP connection takes a permit of a semaphore sized `max_connections` before it
//! is accepted (so a flood waits in the kernel's backlog, not in memory), and its TLS handshake
//! must finish within `handshake_timeout` on a task of its own (so a slow client holds up only
//! itself). The permit travels with the stream and is released when the connection ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Handshaken connections waiting to be served, at most.
const QUEUE: usize = 128;

/// How a listener limits what clients can hold.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AcceptLimits {
    pub(crate) max_connections: usize,
    pub(crate) handshake_timeout: Duration,
}

/// A connection that completed its TLS handshake, with its connection permit.
pub(crate) struct Accepted {
    pub(crate) stream: TlsStream<TcpStream>,
    pub(crate) peer: SocketAddr,
    pub(crate) permit: OwnedSemaphorePermit,
}

/// Accepts TLS connections on `listener` until `cancel`, and hands them over in order of
/// completed handshakes. `what` names the listener in the logs.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: AcceptLimits,
    cancel: CancellationToken,
    what: &'static str,
) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
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
                        // Out of file descriptors, typically: wait rather than spin.
                        warn!(listener = what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Accepted { stream, peer, permit }).await;
                    }
                    Ok(Err(e)) => {
                        debug!(listener = what, %peer, error = %e, "TLS handshake refused")
                    }
                    Err(_) => debug!(listener = what, %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}
