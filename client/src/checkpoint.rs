//! The digests of a checkpoint, as a worker reports them (`CheckpointDone`) and the coordinator
//! checks a copy against them: one definition for both sides.

use sha2::{Digest, Sha256};

/// SHA-256 (lower-case hex) of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    crate::pki::hex(&Sha256::digest(bytes))
}

/// The digest of a model description (`meta.json`'s `model`): SHA-256 of its canonical JSON
/// (keys sorted, no spaces, as `serde_json` writes a `Value`), so that replicas describing one
/// model report one digest however their writers order fields.
pub fn description_sha256(model: &serde_json::Value) -> String {
    sha256(&serde_json::to_vec(model).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_has_one_digest_whatever_the_order_of_its_fields() {
        let a: serde_json::Value = serde_json::from_str(r#"{"arch":"gpt","heads":4}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{ "heads": 4, "arch": "gpt" }"#).unwrap();
        assert_eq!(description_sha256(&a), description_sha256(&b));
        let c: serde_json::Value = serde_json::from_str(r#"{"arch":"gpt","heads":2}"#).unwrap();
        assert_ne!(description_sha256(&a), description_sha256(&c));
    }
}
