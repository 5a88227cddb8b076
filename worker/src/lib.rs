//! `longhaul-worker`: the agent (async: the coordinator session, shard leases), the trainer
//! (libtorch, on its own OS thread) and the collectives (the QUIC ring) of one worker.
//!
//! Only [`trainer`] names `tch`.

pub mod comm;
pub mod schedule;
pub mod testing;
pub mod trainer;
