#![allow(clippy::unwrap_used)]
//! The container files: both Dockerfiles parse (known instructions, stages defined before they
//! are copied from, build arguments declared before use), and `docker-compose config` accepts
//! the compose file with a coordinator, three CPU workers and three GPU workers that reserve an
//! NVIDIA device each. No Docker engine is needed (none runs in CI).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The instructions of a Dockerfile: (line number, keyword, arguments), continuations joined.
fn instructions(text: &str) -> Result<Vec<(usize, String, String)>, String> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_none() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if pending.is_some() && line.starts_with('#') {
            continue; // comments inside a continued instruction
        }
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        if let Some(body) = line.strip_suffix('\\') {
            acc.push_str(body);
            acc.push(' ');
            pending = Some((start, acc));
            continue;
        }
        acc.push_str(line);
        let (kw, args) = acc.split_once(char::is_whitespace).unwrap_or((&acc, ""));
        if !INSTRUCTIONS.contains(&kw.to_ascii_uppercase().as_str()) {
            return Err(format!("line {start}: unknown instruction {kw:?}"));
        }
        if args.trim().is_empty() {
            return Err(format!("line {start}: {kw} without arguments"));
        }
        out.push((start, kw.to_ascii_uppercase(), args.trim().to_owned()));
    }
    if let Some((start, _)) = pending {
        return Err(format!("line {start}: the file ends inside a continued instruction"));
    }
    Ok(out)
}

/// Checks the structure: FROM first (after global ARGs), stages named once and copied from
/// only after they are defined, `${ARG}`s in FROM declared globally, JSON-form CMD/ENTRYPOINT
/// well formed, COPY sources (other than `.`) present in the build context.
fn check_dockerfile(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let ins = instructions(&text)?;
    let mut global_args = BTreeSet::new();
    let mut stages: Vec<String> = Vec::new();
    let mut seen_from = false;
    for (line, kw, args) in &ins {
        let arg_name = |a: &str| a.split('=').next().unwrap().to_owned();
        match kw.as_str() {
            "ARG" if !seen_from => {
                global_args.insert(arg_name(args));
            }
            "FROM" => {
                seen_from = true;
                let words: Vec<&str> = args.split_whitespace().collect();
                let image = words[0];
                for var in image.split("${").skip(1) {
                    let name = var.split('}').next().unwrap();
                    if !global_args.contains(name) {
                        return Err(format!("line {line}: FROM uses ${{{name}}}, not declared"));
                    }
                }
                match words.as_slice() {
                    [_] => stages.push(String::new()),
                    [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                        if stages.contains(&name.to_string()) {
                            return Err(format!("line {line}: stage {name} defined twice"));
                        }
                        stages.push(name.to_string());
                    }
                    _ => return Err(format!("line {line}: FROM {args}: expected IMAGE [AS NAME]")),
                }
            }
            _ if !seen_from => return Err(format!("line {line}: {kw} before the first FROM")),
            "COPY" => {
                let from = args.split_whitespace().find_map(|w| w.strip_prefix("--from="));
                match from {
                    Some(stage) => {
                        if !stages[..stages.len() - 1].iter().any(|s| s == stage) {
                            return Err(format!("line {line}: COPY --from={stage}: no such stage"));
                        }
                    }
                    None => {
                        let words: Vec<&str> =
                            args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                        for src in &words[..words.len() - 1] {
                            if *src != "." && !root().join(src).exists() {
                                return Err(format!("line {line}: COPY source {src} is missing"));
                            }
                        }
                    }
                }
            }
            "CMD" | "ENTRYPOINT" if args.starts_with('[') => {
                serde_json::from_str::<Vec<String>>(args)
                    .map_err(|e| format!("line {line}: {kw} is not a JSON array: {e}"))?;
            }
            _ => {}
        }
    }
    if stages.is_empty() {
        return Err("no FROM".into());
    }
    Ok(())
}

#[test]
fn the_dockerfiles_parse() {
    for f in ["worker/Dockerfile", "coordinator/Dockerfile"] {
        check_dockerfile(&root().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}

#[test]
fn the_dockerfile_checker_catches_mistakes() {
    let bad = |text: &str, needle: &str| {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("Dockerfile");
        std::fs::write(&p, text).unwrap();
        let e = check_dockerfile(&p).unwrap_err();
        assert!(e.contains(needle), "{e:?} lacks {needle:?}");
    };
    bad("FROM x\nRUNN true\n", "unknown instruction");
    bad("FROM x\nRUN a \\\n", "ends inside");
    bad("FROM x AS a\nFROM y\nCOPY --from=b /a /b\n", "no such stage");
    bad("FROM ${BASE}\n", "not declared");
    bad("RUN true\nFROM x\n", "before the first FROM");
    bad("FROM x\nCMD [\"a\",]\n", "JSON");
}

#[test]
fn compose_has_a_coordinator_and_cpu_and_gpu_workers() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("join.token");
    std::fs::write(&token, "lh_join_test\n").unwrap();
    let out = Command::new("docker-compose")
        .current_dir(root())
        .args(["--profile", "cpu", "--profile", "gpu", "config"])
        .env("LONGHAUL_JOIN_TOKEN_FILE", &token)
        .env("LONGHAUL_CA_HASH", format!("sha256:{}", "0".repeat(64)))
        .output()
        .expect(
            "docker-compose (Debian package `docker-compose`; scripts/setup-system.sh installs it)",
        );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    for s in ["coordinator:", "worker-cpu-1:", "worker-cpu-3:", "worker-gpu-1:", "worker-gpu-3:"] {
        assert!(stdout.contains(&format!("  {s}\n")), "no service {s}\n{stdout}");
    }
    assert_eq!(stdout.matches("driver: nvidia").count(), 3, "{stdout}");
    assert!(stdout.contains("LONGHAUL_TOKEN_FILE: /run/secrets/join_token"), "{stdout}");
    assert!(!stdout.contains("LONGHAUL_TOKEN:"), "the token must not travel as a variable");
}
