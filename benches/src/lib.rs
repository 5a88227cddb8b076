//! Benchmarks of longhaul's collectives: the measurement loop of `allreduce-perf` ([`perf`]).
pub mod perf;
