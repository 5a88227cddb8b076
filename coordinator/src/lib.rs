//! longhaul's control plane.
//!
//! The coordinator validates run files (with [`runspec`]), keeps the cluster's state as a sans-IO state
//! machine ([`cluster`]), hands out data shards ([`shards`]), persists everything that matters
//! ([`store`]), issues certificates ([`ca`]) and serves the gRPC API ([`server`]) and shard bytes over HTTPS ([`shard_server`]). The `longhaul`
//! binary ([`cli`]) is a thin shell around it.

pub mod ca;
pub mod cli;
pub mod cluster;
pub mod dashboard;
pub mod fetch;
pub mod floats;
pub mod ledger;
pub mod metrics;
pub mod server;
pub mod shard_server;
pub mod shards;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod top;
pub mod views;
