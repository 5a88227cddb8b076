//! Domain newtypes shared by the coordinator and the worker. They carry meaning that the wire's
//! bare integers and strings do not; conversions from wire types check it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A run, numbered by the coordinator from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub u64);

/// A worker, numbered by the coordinator from 1 when it first joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub u64);

/// A membership epoch of one run; every membership change makes a new, larger one.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

/// A shard lease, numbered by the coordinator; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub u64);

/// The hash of a replica's state (its parameters): 64 bits, written as 16 lower-case hex
/// digits on the wire, in records and in logs. Members agree on progress by comparing these.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParamHash(pub u64);

impl fmt::Display for ParamHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for ParamHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for ParamHash {
    type Err = IdError;

    /// Exactly 16 lower-case hex digits: one spelling per hash, so that equal strings are equal
    /// hashes.
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = || IdError {
            what: "parameter hash",
            value: s.chars().take(40).collect(),
            expected: "16 lower-case hex digits",
        };
        if s.len() != 16 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err());
        }
        u64::from_str_radix(s, 16).map(Self).map_err(|_| err())
    }
}

impl Serialize for ParamHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ParamHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `Option<ParamHash>` as a string, "" for none: the spelling of the wire and of records
/// written before the newtype (`#[serde(with = "proto::domain::opt_hash")]`).
pub mod opt_hash {
    use super::ParamHash;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &Option<ParamHash>, s: S) -> Result<S::Ok, S::Error> {
        match h {
            Some(h) => s.collect_str(h),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ParamHash>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() { Ok(None) } else { s.parse().map(Some).map_err(serde::de::Error::custom) }
    }
}

/// How an optional hash is shown: the hash, or "" when there is none (as on the wire).
pub fn hash_text(h: Option<ParamHash>) -> String {
    h.map(|h| h.to_string()).unwrap_or_default()
}

/// An identifier that could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {what} {value:?}: expected {expected}")]
pub struct IdError {
    pub what: &'static str,
    pub value: String,
    pub expected: &'static str,
}

impl WorkerId {
    /// The worker's member name: its DNS-label SAN in certificates and its name in ring epochs.
    pub fn member_name(self) -> String {
        format!("worker-{}", self.0)
    }

    /// Reads a member name (`worker-<id>`) back.
    pub fn from_member_name(name: &str) -> Option<Self> {
        name.strip_prefix("worker-")?.parse().ok().filter(|&n| n > 0).map(Self)
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "worker-{}", self.0)
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for RunId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let digits = s.strip_prefix("run-").unwrap_or(s);
        digits.parse().ok().filter(|&n| n > 0).map(Self).ok_or_else(|| IdError {
            what: "run id",
            value: s.into(),
            expected: "a positive integer such as 3 (or run-3)",
        })
    }
}

impl FromStr for WorkerId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Self::from_member_name(s)
            .or_else(|| s.parse().ok().filter(|&n| n > 0).map(Self))
            .ok_or_else(|| IdError {
                what: "worker id",
                value: s.into(),
                expected: "a positive integer or worker-<n>",
            })
    }
}

/// A run's lifecycle: pending → running → completed | failed | stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Pending,
    Running,
    Completed,
    Failed,
    Stopped,
}

impl RunState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Stopped)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker's liveness as the coordinator sees it from heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Alive,
    Suspect,
    Dead,
}

impl Liveness {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Suspect => "suspect",
            Self::Dead => "dead",
        }
    }
}

impl fmt::Display for Liveness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        assert_eq!(WorkerId(7).member_name(), "worker-7");
        assert_eq!(WorkerId::from_member_name("worker-7"), Some(WorkerId(7)));
        assert_eq!(WorkerId::from_member_name("worker-0"), None);
        assert_eq!(WorkerId::from_member_name("rank-1"), None);
        assert_eq!("run-3".parse(), Ok(RunId(3)));
        assert_eq!("3".parse(), Ok(RunId(3)));
        assert!("x".parse::<RunId>().unwrap_err().to_string().contains("positive integer"));
        assert_eq!("worker-9".parse(), Ok(WorkerId(9)));
    }
}
