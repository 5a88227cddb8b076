//! Floats in persisted JSON records: every value round-trips, the non-finite ones included.
//!
//! serde_json writes `inf` and `NaN` as `null`, which a plain `f64` field cannot read back: one
//! such value once made a stored run unloadable and the coordinator unable to start. Inputs are
//! validated before they reach a record, and this is the second line: a number is written as a
//! number, a non-finite one as the string `"inf"`, `"-inf"` or `"nan"`, and both read back.

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serializer};

/// `#[serde(with = "crate::floats::f64")]`
pub mod f64 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("nan")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(FloatVisitor)
    }
}

/// `#[serde(with = "crate::floats::opt_f64")]`
pub mod opt_f64 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::f64::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::f64")] f64);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

struct FloatVisitor;

impl Visitor<'_> for FloatVisitor {
    type Value = f64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a number, or \"inf\", \"-inf\" or \"nan\"")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        match v {
            "inf" => Ok(f64::INFINITY),
            "-inf" => Ok(f64::NEG_INFINITY),
            "nan" => Ok(f64::NAN),
            other => Err(E::invalid_value(de::Unexpected::Str(other), &self)),
        }
    }

    /// Records written before this module stored non-finite values as `null`: read them as NaN
    /// rather than refusing the record.
    fn visit_unit<E: de::Error>(self) -> Result<f64, E> {
        Ok(f64::NAN)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    struct R {
        #[serde(with = "super::f64")]
        x: f64,
        #[serde(with = "super::opt_f64", default)]
        y: Option<f64>,
    }

    #[test]
    fn every_value_round_trips() {
        for x in
            [0.0, -1.5, f64::MAX, f64::MIN_POSITIVE, f64::INFINITY, f64::NEG_INFINITY, f64::NAN]
        {
            for y in [None, Some(x)] {
                let text = serde_json::to_string(&R { x, y }).unwrap();
                let back: R = serde_json::from_str(&text).unwrap();
                assert_eq!(back.x.to_bits(), x.to_bits(), "{text}");
                assert_eq!(back.y.map(f64::to_bits), y.map(f64::to_bits), "{text}");
            }
        }
    }

    #[test]
    fn old_nulls_load() {
        let back: R = serde_json::from_str(r#"{"x": null}"#).unwrap();
        assert!(back.x.is_nan() && back.y.is_none());
    }
}
