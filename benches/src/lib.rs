//! Benchmarks of longhaul's collectives: the measurement loop of `allreduce-perf` ([`perf`]) and
//! the WAN lab ([`wanlab`]).
pub mod cli;
pub mod perf;
pub mod wanlab;
