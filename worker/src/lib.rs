//! The worker: `longhaul-worker`'s agent ([`agent`]: the coordinator session, shard leases),
//! the trainer thread's loop ([`driver`]), the trainer (libtorch, [`trainer`]) and its view of
//! the QUIC ring ([`comm`]), and checkpoint copies sent for a user's fetch ([`upload`]).
//!
//! Only [`trainer`] names `tch`.

pub mod agent;
pub mod cli;
pub mod comm;
pub mod driver;
pub mod fetch;
pub mod lifecycle;
pub mod schedule;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trainer;
pub mod upload;
