//! The per-connection tasks of a group: a reader per connection that hands frames and the
//! connection's end to the engine's inbox, and a writer per connection to the next rank that
//! sends the engine's frames, one unidirectional stream each.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use quinn::{Connection, ConnectionError, VarInt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::engine::{self, Admit, Event, Frame, PeerError, Side};
use super::{CLOSE_ABORT, CLOSE_DONE};
use crate::wire::{FrameError, HEADER_LEN, Header, Kind};

/// What the group asks of a connection's writer.
pub(super) enum Out {
    Frame {
        header: Header,
        payload: Bytes,
    },
    /// Reply once every earlier frame is written and the control frames acknowledged.
    Flush(oneshot::Sender<()>),
}

/// Bytes sent and received over a group's lifetime.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) sent: AtomicU64,
    pub(super) received: AtomicU64,
}

/// What a reader accepts: frames of this epoch no larger than `max_payload`.
#[derive(Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_payload: u32,
    pub(super) epoch: u64,
}

/// Reads the frames of one connection (one per unidirectional stream) and hands them to the
/// group's inbox, until the connection ends.
pub(super) struct Reader {
    pub(super) conn: Connection,
    pub(super) side: Side,
    pub(super) limits: Limits,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) counters: Arc<Counters>,
    /// How many operations the engine has begun (see [`engine::admit`]).
    pub(super) begun: watch::Receiver<u64>,
}

impl Reader {
    pub(super) async fn run(self) {
        let Self { conn, side, limits, events, counters, begun } = self;
        let mut streams = JoinSet::new();
        let error = loop {
            tokio::select! {
                accepted = conn.accept_uni() => match accepted {
                    // Frames travel forward only; the next rank has nothing to send this one.
                    Ok(_) if side == Side::Next => {
                        break PeerError::Protocol(
                            "sent a frame to its ring predecessor (frames travel forward only)".into(),
                        );
                    }
                    Ok(stream) => {
                        let (events, counters, begun) = (events.clone(), counters.clone(), begun.clone());
                        streams.spawn(async move {
                            let event = match read_frame(stream, limits, begun).await {
                                Ok(f) => {
                                    counters.received.fetch_add((HEADER_LEN + f.1.len()) as u64, Ordering::Relaxed);
                                    Event::Frame(Frame { side, header: f.0, payload: f.1 })
                                }
                                Err(error) => Event::Failed { side, error },
                            };
                            let _ = events.send(event).await;
                        });
                    }
                    Err(e) => break peer_error(e),
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        };
        // Frames already on their way are delivered before the connection's end is reported,
        // so the driver sees a neighbour's last frames before its departure. (Streams held
        // back for an operation that will never begin end with the connection.)
        while streams.join_next().await.is_some() {}
        let _ = events.send(Event::Failed { side, error }).await;
    }
}

async fn read_frame(
    mut stream: quinn::RecvStream,
    limits: Limits,
    mut begun: watch::Receiver<u64>,
) -> Result<(Header, Bytes), PeerError> {
    let mut head = [0u8; HEADER_LEN];
    stream.read_exact(&mut head).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => {
            PeerError::Protocol(FrameError::Truncated { got: n }.to_string())
        }
        quinn::ReadExactError::ReadError(e) => read_error(e),
    })?;
    let header = Header::decode(&head, limits.max_payload, limits.epoch)
        .map_err(|e| PeerError::Protocol(format!("rejected frame: {e}")))?;
    // A frame of the operation after the current one waits here, its payload unread, so what
    // a peer can push ahead is bounded by QUIC's flow-control windows (see `engine::admit`).
    let admitted = engine::admit(header.op, *begun.borrow());
    match admitted {
        Admit::Now => {}
        Admit::Hold => {
            if begun.wait_for(|b| *b > header.op).await.is_err() {
                return Err(PeerError::Closed("the group ended".into()));
            }
        }
        Admit::Refuse(cause) => return Err(PeerError::Protocol(cause)),
    }
    // `len` is bounded by `max_payload`; the payload grows as it arrives, so a peer that
    // announces a large frame and stalls holds no more memory than it sent.
    let len = header.len as usize;
    let mut payload = Vec::new();
    while payload.len() < len {
        match stream.read_chunk(len - payload.len(), true).await.map_err(read_error)? {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => {
                return Err(PeerError::Protocol(format!(
                    "frame payload truncated: {} of {len} bytes",
                    payload.len()
                )));
            }
        }
    }
    Ok((header, Bytes::from(payload)))
}

fn read_error(e: quinn::ReadError) -> PeerError {
    match e {
        quinn::ReadError::ConnectionLost(e) => peer_error(e),
        other => PeerError::Protocol(format!("stream failed: {other}")),
    }
}

pub(super) fn peer_error(e: ConnectionError) -> PeerError {
    match e {
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CLOSE_ABORT) => {
            PeerError::Aborted(String::from_utf8_lossy(&c.reason).into_owned())
        }
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CLOSE_DONE) => {
            PeerError::Closed(String::from_utf8_lossy(&c.reason).into_owned())
        }
        ConnectionError::ApplicationClosed(c) => PeerError::Lost(format!(
            "closed the connection ({})",
            String::from_utf8_lossy(&c.reason)
        )),
        ConnectionError::TimedOut => {
            PeerError::Lost("no packets within the idle timeout: presumed dead or cut off".into())
        }
        ConnectionError::LocallyClosed => PeerError::Lost("connection closed locally".into()),
        other => PeerError::Lost(other.to_string()),
    }
}

/// Writes queued frames to the next rank, one unidirectional stream each.
pub(super) async fn send_loop(
    conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Out>,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
) {
    let mut control: Vec<quinn::SendStream> = Vec::new();
    while let Some(out) = rx.recv().await {
        match out {
            Out::Frame { header, payload } => {
                let len = (HEADER_LEN + payload.len()) as u64;
                match send_frame(&conn, &header, payload).await {
                    Ok(stream) => {
                        counters.sent.fetch_add(len, Ordering::Relaxed);
                        if header.kind == Kind::Done {
                            control.push(stream);
                        }
                    }
                    Err(e) => {
                        let _ = events.send(Event::Failed { side: Side::Next, error: e }).await;
                        return;
                    }
                }
            }
            Out::Flush(reply) => {
                for s in control.drain(..) {
                    let _ = s.stopped().await;
                }
                let _ = reply.send(());
            }
        }
    }
}

async fn send_frame(
    conn: &Connection,
    header: &Header,
    payload: Bytes,
) -> Result<quinn::SendStream, PeerError> {
    let mut s = conn.open_uni().await.map_err(peer_error)?;
    let write_err = |e: quinn::WriteError| match e {
        quinn::WriteError::ConnectionLost(e) => peer_error(e),
        other => PeerError::Lost(format!("stream write failed: {other}")),
    };
    s.write_all(&header.encode()).await.map_err(write_err)?;
    if !payload.is_empty() {
        s.write_chunk(payload).await.map_err(write_err)?;
    }
    s.finish().map_err(|e| PeerError::Lost(format!("stream finish failed: {e}")))?;
    Ok(s)
}
