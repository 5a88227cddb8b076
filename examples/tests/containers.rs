#![allow(clippy::unwrap_used)]
//! The container files: both Dockerfiles parse (known instructions, stages defined before they
//! are copied from, build arguments declared before use), and `docker-compose config` accepts
//! the compose file with a coordinator, three CPU workers and three GPU workers that reserve an
//! NVIDIA device each. No Docker engine is needed (none runs in CI).
//!
//! The Kubernetes manifests in `deploy/kubernetes/`: every one validates against the
//! Kubernetes API's JSON schemas (`kubernetes-validate --strict`, which ships them: no cluster,
//! no network), the kustomization lists every one, and they agree with the binaries (the
//! variables they set are ones `longhaul` and `longhaul-worker` read, the workers dial a name
//! the coordinator's certificate covers, the token travels as a file, a GPU per worker).

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

/// The Kubernetes version the manifests are validated against: the oldest they are meant for.
const KUBERNETES_VERSION: &str = "1.30.0";

fn kube_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

/// The Python with kubernetes-validate: `LONGHAUL_PYTHON` (scripts/test sets it), else where
/// `scripts/setup-python.sh` creates it (as the worker's `testing::python()` looks).
fn python() -> PathBuf {
    std::env::var_os("LONGHAUL_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").unwrap_or_default();
        PathBuf::from(home).join(".cache/longhaul/venv-torch-2.11.0/bin/python")
    })
}

/// Fails the test, never skips it, when the validator is not there.
fn require_validator() -> PathBuf {
    let py = python();
    let out = Command::new(&py)
        .args(["-c", "import kubernetes_validate, yaml"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (run scripts/setup-python.sh, or set LONGHAUL_PYTHON)",
                py.display()
            )
        });
    assert!(
        out.status.success(),
        "kubernetes-validate is missing from {}: run scripts/setup-python.sh --test-tools (scripts/test does), which installs it\n{}",
        py.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    py
}

/// `kubernetes-validate --strict` on `files`: its output, Ok if it exited 0.
fn kubernetes_validate(files: &[PathBuf]) -> Result<String, String> {
    let out = Command::new(require_validator())
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .args(files)
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(text) } else { Err(text) }
}

/// The YAML documents of a file, as JSON (PyYAML comes with kubernetes-validate).
fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(require_validator())
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The manifests: every YAML file in deploy/kubernetes/ but the kustomization.
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kube_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .filter(|p| p.file_name().unwrap() != "kustomization.yaml")
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", kube_dir().display());
    files
}

#[test]
fn the_kubernetes_manifests_validate_against_the_schemas() {
    let files = manifests();
    let out = kubernetes_validate(&files).unwrap_or_else(|e| panic!("rejected:\n{e}"));
    // Anything it has no schema for is only a warning (exit 0): none is allowed.
    for line in out.lines() {
        assert!(line.starts_with("INFO "), "not a pass: {line}\n{out}");
    }
    for f in &files {
        let docs = yaml_documents(f).len();
        let passed = out.lines().filter(|l| l.contains(&format!("{} passed", f.display()))).count();
        assert_eq!(passed, docs, "{}: {docs} resources, {passed} passed\n{out}", f.display());
    }
}

#[test]
fn the_schema_validation_catches_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let deployment = |replicas: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: broken\nspec:\n  \
             {replicas}\n  selector:\n    matchLabels: {{app: x}}\n  template:\n    metadata:\n      \
             labels: {{app: x}}\n    spec:\n      containers:\n        - name: x\n          image: x\n"
        )
    };
    let check = |name: &str, replicas: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, deployment(replicas)).unwrap();
        kubernetes_validate(&[p])
    };
    check("good.yaml", "replicas: 3").unwrap_or_else(|e| panic!("a valid Deployment: {e}"));
    let e = check("string.yaml", "replicas: \"three\"").unwrap_err();
    assert!(e.contains("'three' is not of type 'integer'"), "{e}");
    let e = check("unknown.yaml", "replica: 3").unwrap_err();
    assert!(e.contains("'replica' was unexpected"), "--strict lets unknown fields by: {e}");
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let k = &yaml_documents(&kube_dir().join("kustomization.yaml"))[0];
    assert_eq!(k["kind"], "Kustomization", "{k}");
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap_or_else(|| panic!("no resources: {k}"))
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> =
        manifests().iter().map(|p| p.file_name().unwrap().to_str().unwrap().to_owned()).collect();
    assert_eq!(listed, present, "kustomization.yaml's resources against the directory");
}

/// The one resource of `kind` among the manifests.
fn resource(docs: &[serde_json::Value], kind: &str, name: &str) -> serde_json::Value {
    let found: Vec<_> =
        docs.iter().filter(|d| d["kind"] == kind && d["metadata"]["name"] == name).collect();
    assert_eq!(found.len(), 1, "{kind}/{name}: {} found", found.len());
    found[0].clone()
}

/// A container's literal environment variable.
fn env<'a>(container: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)
}

fn env_value<'a>(container: &'a serde_json::Value, name: &str) -> &'a str {
    env(container, name)
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{} sets no {name}", container["name"]))
}

/// The port of a `host:port` or `scheme://host:port` address.
fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn the_kubernetes_manifests_agree_with_the_binaries() {
    let docs: Vec<serde_json::Value> = manifests().iter().flat_map(|f| yaml_documents(f)).collect();
    let namespace = yaml_documents(&kube_dir().join("kustomization.yaml"))[0]["namespace"]
        .as_str()
        .unwrap()
        .to_owned();
    resource(&docs, "Namespace", &namespace);
    let sources: String = ["coordinator/src/cli.rs", "worker/src/cli.rs", "client/src/lib.rs"]
        .iter()
        .map(|f| std::fs::read_to_string(root().join(f)).unwrap())
        .collect();

    // Every workload: limits, no privilege escalation, a read-only root, variables that a
    // binary reads, and non-root unless it is a container that says otherwise (the worker's
    // chown of its host directory).
    let coordinator = resource(&docs, "StatefulSet", "longhaul-coordinator");
    let worker = resource(&docs, "DaemonSet", "longhaul-worker");
    for w in [&coordinator, &worker] {
        let pod = &w["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{}", w["metadata"]["name"]);
        let inits = pod["initContainers"].as_array().cloned().unwrap_or_default();
        for c in pod["containers"].as_array().unwrap().iter().chain(&inits) {
            let name = &c["name"];
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]), "{name}");
            for r in ["cpu", "memory"] {
                assert!(!c["resources"]["requests"][r].is_null(), "{name}: no {r} request");
                assert!(!c["resources"]["limits"][r].is_null(), "{name}: no {r} limit");
            }
            for e in c["env"].as_array().into_iter().flatten() {
                let var = e["name"].as_str().unwrap();
                if var.starts_with("LONGHAUL_") {
                    assert!(
                        sources.contains(&format!("\"{var}\"")),
                        "{name}: {var} is read by nothing"
                    );
                }
            }
        }
    }
    let coord = &coordinator["spec"]["template"]["spec"]["containers"][0];
    let work = &worker["spec"]["template"]["spec"]["containers"][0];
    assert!(!coord["securityContext"]["runAsUser"].is_number());
    assert!(!work["securityContext"]["runAsUser"].is_number());

    // The coordinator: one replica, its state directory on the claim template's volume.
    assert_eq!(coordinator["spec"]["replicas"], 1);
    let claim = &coordinator["spec"]["volumeClaimTemplates"][0]["metadata"]["name"];
    let home = env_value(coord, "LONGHAUL_HOME");
    assert!(
        coord["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == *claim && m["mountPath"] == home),
        "{home} is not on the volume {claim}"
    );
    // Probes: /healthz on the metrics port, which listens beyond loopback.
    let ports = coord["ports"].as_array().unwrap();
    let port = |name: &str| {
        ports.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no port {name}"))
            ["containerPort"]
            .as_u64()
            .unwrap()
    };
    let metrics = env_value(coord, "LONGHAUL_METRICS_LISTEN");
    assert!(metrics.starts_with("0.0.0.0:"), "{metrics}");
    assert_eq!(port("metrics"), port_of(metrics));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(coord[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(coord[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(port("grpc"), port_of(env_value(coord, "LONGHAUL_LISTEN")));
    assert_eq!(port("shards"), port_of(env_value(coord, "LONGHAUL_SHARDS_LISTEN")));
    assert_eq!(port("dashboard"), port_of(env_value(coord, "LONGHAUL_DASHBOARD_LISTEN")));

    // Services: what workers dial, and the metrics kept inside the cluster.
    let svc = resource(&docs, "Service", "longhaul-coordinator");
    let metrics_svc = resource(&docs, "Service", "longhaul-coordinator-metrics");
    assert_eq!(metrics_svc["spec"]["type"], "ClusterIP", "metrics are plain HTTP");
    let svc_port = |s: &serde_json::Value, name: &str| {
        let p = s["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == name);
        let p = p.unwrap_or_else(|| panic!("{}: no port {name}", s["metadata"]["name"]));
        assert_eq!(p["targetPort"], name);
        p["port"].as_u64().unwrap()
    };
    assert_eq!(svc_port(&metrics_svc, "metrics"), port("metrics"));
    for s in [&svc, &metrics_svc] {
        for (k, v) in s["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&coordinator["spec"]["template"]["metadata"]["labels"][k], v);
        }
    }
    assert!(svc["spec"]["ports"].as_array().unwrap().iter().all(|p| p["name"] != "metrics"));

    // The names workers dial are in the certificate, and are the Service's.
    let names: Vec<&str> = env_value(coord, "LONGHAUL_SERVER_NAMES").split(',').collect();
    let service_host = format!("longhaul-coordinator.{namespace}.svc");
    for (url, port_name) in [
        (env_value(work, "LONGHAUL_COORDINATOR"), "grpc"),
        (env_value(coord, "LONGHAUL_SHARDS_URL"), "shards"),
    ] {
        let host = url.strip_prefix("https://").unwrap().rsplit_once(':').unwrap().0;
        assert!(names.contains(&host), "{url}: {host} is not among the certificate's {names:?}");
        assert_eq!(host, service_host, "{url}");
        assert_eq!(port_of(url), svc_port(&svc, port_name), "{url}");
    }

    // Workers: a GPU each, the pin from a ConfigMap, the token as a file from a Secret.
    for r in ["requests", "limits"] {
        assert_eq!(work["resources"][r]["nvidia.com/gpu"], 1, "{r}");
    }
    assert_eq!(env_value(work, "LONGHAUL_DEVICE"), "cuda");
    assert!(env(work, "LONGHAUL_CA_HASH").unwrap()["valueFrom"]["configMapKeyRef"].is_object());
    assert!(env(work, "LONGHAUL_TOKEN").is_none(), "the token must not travel as a variable");
    let token_file = env_value(work, "LONGHAUL_TOKEN_FILE");
    let volumes = worker["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    let token_mount = work["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| token_file.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("nothing mounted at {token_file}"));
    let token_volume = volumes.iter().find(|v| v["name"] == token_mount["name"]).unwrap();
    assert!(token_volume["secret"]["secretName"].is_string(), "{token_volume}");
    // The state directory (the worker's identity) outlives the pod.
    let state = env_value(work, "LONGHAUL_STATE_DIR");
    let state_mount =
        work["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == state);
    let state_volume = volumes.iter().find(|v| v["name"] == state_mount.unwrap()["name"]).unwrap();
    assert!(state_volume["hostPath"].is_object(), "{state_volume}");
    // The ring: UDP, the listen port forwarded from the node, the node's address advertised.
    let listen = port_of(env_value(work, "LONGHAUL_RING_LISTEN"));
    let ring = &work["ports"].as_array().unwrap().iter().find(|p| p["name"] == "ring").unwrap();
    assert_eq!(ring["protocol"], "UDP");
    assert_eq!(ring["containerPort"], listen);
    assert_eq!(ring["hostPort"], listen);
    let advertise = env_value(work, "LONGHAUL_RING_ADVERTISE");
    let (ip_var, adv_port) = advertise.rsplit_once(':').unwrap();
    assert_eq!(adv_port.parse::<u64>().unwrap(), listen);
    let ip_var = ip_var.strip_prefix("$(").and_then(|v| v.strip_suffix(')')).unwrap();
    assert_eq!(
        env(work, ip_var).unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP",
        "{advertise}"
    );
}
