//! longhaul's gRPC API.
//!
//! The wire types (generated from `proto/longhaul.proto` by prost/tonic) live in [`pb`]; they stop
//! at the service layer. The rest of the code speaks the domain types of [`domain`].

pub mod domain;

pub use domain::{Epoch, IdError, LeaseId, Liveness, ParamHash, RunId, RunState, WorkerId};

/// Wire types and services generated from `proto/longhaul.proto`.
#[allow(clippy::all, missing_debug_implementations, unreachable_pub, rust_2018_idioms)]
pub mod pb {
    tonic::include_proto!("longhaul.v1");
}

pub mod convert;

/// Data spans one commitment (`SyncCommit.spans`) carries at most: about 1.2 MB, well inside a
/// message. A worker that read more pieces in one round (many tiny shards) commits the first
/// ones and counts only their samples.
pub const MAX_COMMIT_SPANS: usize = 16_384;

/// The files a checkpoint may have, in the order a copy travels (`FetchCheckpoint`,
/// `UploadCheckpoint`): `meta.json` first, then the files it lists, which are among the rest.
pub const CHECKPOINT_FILES: [&str; 4] =
    ["meta.json", "model.safetensors", "optimizer.safetensors", "outer.safetensors"];

/// The one file of an upload answering a diloco audit (`UploadRequest.inner_sha256`,
/// `Agent.FetchAuditState`): a member's inner optimizer state.
pub const INNER_STATE_FILE: &str = "inner_state";

/// Whether `name` is one of the files `meta.json` may list (every checkpoint file but itself).
pub fn is_checkpoint_data_file(name: &str) -> bool {
    CHECKPOINT_FILES[1..].contains(&name)
}
