//! longhaul's gRPC API.
//!
//! The wire types (generated from `proto/longhaul.proto` by prost/tonic) live in [`pb`]; they stop
//! at the service layer. The rest of the code speaks the domain types of [`domain`].

pub mod domain;

pub use domain::{Epoch, IdError, LeaseId, Liveness, RunId, RunState, WorkerId};
