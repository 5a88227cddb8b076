//! The WAN lab: N hosts in network namespaces whose packets pass through a userspace emulator
//! (TUN devices + [`fabric::Fabric`], built on the same [`collectives::wan::LinkModel`] as the
//! in-process QUIC emulation), so TCP baselines and QUIC see exactly the same path.
pub mod calibrate;
pub mod fabric;
pub mod lab;
pub mod plot;
pub mod run;
pub mod tools;
pub mod topology;
