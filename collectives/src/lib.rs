//! QUIC ring collectives for training over long, lossy links.
//!
//! A [`Group`] is the ring of one epoch: N ranks, each connected to its successor by one or more
//! QUIC connections under mutual TLS 1.3. Over it run [`Group::all_reduce`] (sum or average of
//! f32, bf16 or f16 buffers, optionally compressed to bf16 or int8 on the wire),
//! [`Group::broadcast`] and [`Group::barrier`]. Every operation is all-or-nothing: it completes on
//! every rank with bitwise-identical results, or fails on every rank with an [`OpError`] that
//! names the peer and the cause, leaving the caller's buffer as it was.
//!
//! The pieces, bottom up:
//! - [`schedule`]: the ring algorithm as a sans-IO state machine (which chunk goes where).
//! - [`wire`]: the frame header and its defensive decoder.
//! - [`codec`]: element types and wire encodings (f32, bf16, f16, blockwise int8).
//! - [`tls`]: certificates and the member-restricted verifiers.
//! - [`transport`]: QUIC settings sized from the bandwidth-delay product.
//! - [`wan`]: link emulation under QUIC (an `AsyncUdpSocket` decorator) and the named presets.
//! - [`group`]: the ring of one epoch: a sans-IO engine for the protocol, and the shell that
//!   runs it over real connections.
//! - [`io`]: the network runtime every group's QUIC endpoint runs on, apart from the caller's
//!   threads, so liveness never waits on the caller's computation.
pub mod codec;
pub mod group;
pub mod io;
pub mod schedule;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;
pub mod transport;
pub mod wan;
pub mod wire;

pub use codec::{Compression, DType, Element};
pub use group::{
    AbortHandle, Bounds, Emulation, Group, GroupSpec, JoinError, Member, OpError, OpStats,
    ReduceOp, segments,
};
pub use tls::{DevCa, Identity, TrustAnchor};
pub use transport::{Congestion, NetConfig, PortLease};
pub use wan::{LinkCondition, LinkPreset};
