//! The gloo peer baseline (`benches/peers/gloo_allreduce.py`) runs under the pinned torch and
//! reports the same quantities as `allreduce-perf`.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python of the project's torch environment: `LONGHAUL_PYTHON`, or the environment that
/// `scripts/setup-python.sh` creates (and caches) on first use.
fn python(root: &Path) -> PathBuf {
    if let Ok(p) = std::env::var("LONGHAUL_PYTHON") {
        return PathBuf::from(p);
    }
    let out = Command::new("bash").arg(root.join("scripts/setup-python.sh")).output().unwrap();
    assert!(
        out.status.success(),
        "setup-python.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("bin/python")
}

#[test]
fn gloo_peer_script_reports_the_same_columns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(python(root))
        .arg(root.join("benches/peers/gloo_allreduce.py"))
        .args([
            "--launch", "2", "-b", "4K", "-e", "256K", "-f", "8", "-n", "2", "-w", "1", "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["system"], "gloo");
    assert_eq!(report["ranks"], 2);
    assert!(report["tcp"]["tcp_wmem"].is_string());
    let rows = report["results"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        for key in
            ["bytes", "count", "time_us", "algbw_gbps", "busbw_gbps", "p50_us", "p99_us", "max_err"]
        {
            assert!(r[key].is_number(), "{key} missing in {r}");
        }
        assert!(r["busbw_gbps"].as_f64().unwrap() > 0.0);
        assert!(r["max_err"].as_f64().unwrap() < 1e-5);
    }
}
