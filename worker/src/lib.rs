//! The worker: the trainer (libtorch, driven from its own OS thread) and its view of the QUIC
//! ring ([`comm`]). The `longhaul-worker` binary (the async agent: coordinator session, shard
//! leases, preflight) is not written yet.
//!
//! Only [`trainer`] names `tch`.

pub mod comm;
pub mod schedule;
pub mod testing;
pub mod trainer;
