//! Conversions between wire types and domain types. Wire values are checked here, once.

use std::net::SocketAddr;

use thiserror::Error;

use crate::domain::{Epoch, LeaseId, Liveness, ParamHash, RunId, RunState, WorkerId};
use crate::pb;

/// A wire value that does not make sense.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {field}: {reason}")]
pub struct WireError {
    pub field: &'static str,
    pub reason: String,
}

impl WireError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

pub fn run_id(v: u64) -> Result<RunId, WireError> {
    if v == 0 { Err(WireError::new("run_id", "must be > 0")) } else { Ok(RunId(v)) }
}

pub fn worker_id(v: u64) -> Result<WorkerId, WireError> {
    if v == 0 { Err(WireError::new("worker_id", "must be > 0")) } else { Ok(WorkerId(v)) }
}

pub fn lease_id(v: u64) -> Result<LeaseId, WireError> {
    if v == 0 { Err(WireError::new("lease_id", "must be > 0")) } else { Ok(LeaseId(v)) }
}

pub fn epoch(v: u64) -> Epoch {
    Epoch(v)
}

pub fn socket_addr(field: &'static str, v: &str) -> Result<SocketAddr, WireError> {
    v.parse().map_err(|e| WireError::new(field, format!("{v:?} is not an ip:port address ({e})")))
}

/// A parameter hash as workers report it: 16 lower-case hex digits (a 64-bit hash), or "" when
/// the worker does not know it.
pub fn param_hash(field: &'static str, v: &str) -> Result<Option<ParamHash>, WireError> {
    if v.is_empty() {
        return Ok(None);
    }
    v.parse().map(Some).map_err(|e: crate::IdError| WireError::new(field, e.to_string()))
}

impl From<RunState> for pb::RunState {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Pending => Self::Pending,
            RunState::Running => Self::Running,
            RunState::Completed => Self::Completed,
            RunState::Failed => Self::Failed,
            RunState::Stopped => Self::Stopped,
        }
    }
}

impl TryFrom<pb::RunState> for RunState {
    type Error = WireError;
    fn try_from(s: pb::RunState) -> Result<Self, WireError> {
        Ok(match s {
            pb::RunState::Pending => Self::Pending,
            pb::RunState::Running => Self::Running,
            pb::RunState::Completed => Self::Completed,
            pb::RunState::Failed => Self::Failed,
            pb::RunState::Stopped => Self::Stopped,
            pb::RunState::Unspecified => return Err(WireError::new("state", "unspecified")),
        })
    }
}

/// Reads a wire run state (an `i32` in prost).
pub fn run_state(v: i32) -> Result<RunState, WireError> {
    pb::RunState::try_from(v)
        .map_err(|_| WireError::new("state", format!("unknown value {v}")))?
        .try_into()
}

impl From<Liveness> for pb::Liveness {
    fn from(s: Liveness) -> Self {
        match s {
            Liveness::Alive => Self::Alive,
            Liveness::Suspect => Self::Suspect,
            Liveness::Dead => Self::Dead,
        }
    }
}

/// Reads a wire liveness.
pub fn liveness(v: i32) -> Result<Liveness, WireError> {
    match pb::Liveness::try_from(v) {
        Ok(pb::Liveness::Alive) => Ok(Liveness::Alive),
        Ok(pb::Liveness::Suspect) => Ok(Liveness::Suspect),
        Ok(pb::Liveness::Dead) => Ok(Liveness::Dead),
        _ => Err(WireError::new("liveness", format!("unknown value {v}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_zero_ids_are_refused() {
        for s in [
            RunState::Pending,
            RunState::Running,
            RunState::Completed,
            RunState::Failed,
            RunState::Stopped,
        ] {
            assert_eq!(run_state(pb::RunState::from(s) as i32), Ok(s));
        }
        assert!(run_state(0).is_err());
        assert!(run_state(99).is_err());
        assert!(run_id(0).is_err());
        assert_eq!(worker_id(4), Ok(WorkerId(4)));
        assert!(socket_addr("ring_addr", "nope").unwrap_err().to_string().contains("ring_addr"));
    }

    #[test]
    fn param_hashes_are_16_lower_case_hex_digits_or_empty() {
        let h = param_hash("param_hash", "0123456789abcdef").unwrap();
        assert_eq!(h, Some(ParamHash(0x0123_4567_89ab_cdef)));
        assert_eq!(h.unwrap().to_string(), "0123456789abcdef");
        assert_eq!(param_hash("param_hash", ""), Ok(None));
        assert_eq!(ParamHash(7).to_string(), "0000000000000007");
        for bad in ["0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "0123456789abcdeg"]
        {
            let e = param_hash("step_committed.param_hash", bad).unwrap_err();
            assert_eq!(e.field, "step_committed.param_hash");
            assert!(e.reason.contains(bad), "{e}");
        }
    }

    #[test]
    fn an_optional_hash_is_stored_as_the_wire_spells_it() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct R {
            #[serde(with = "crate::domain::opt_hash")]
            h: Option<ParamHash>,
        }
        for (r, text) in [
            (R { h: None }, r#"{"h":""}"#),
            (R { h: Some(ParamHash(0xdead_beef)) }, r#"{"h":"00000000deadbeef"}"#),
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), text);
            assert_eq!(serde_json::from_str::<R>(text).unwrap(), r);
        }
        assert!(serde_json::from_str::<R>(r#"{"h":"DEADBEEF00000000"}"#).is_err());
    }
}
