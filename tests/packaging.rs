//! The Dockerfile and the Kubernetes manifests are kept honest here: no
//! machine that runs the tests runs Docker or Kubernetes, so each file is
//! parsed and the binary is run with exactly the arguments a container would
//! get (`WALSTREAM_DRY_RUN=1`: command line and config are checked, the plan
//! is printed, nothing is touched). Paths inside ConfigMap mounts and files
//! the image COPYs are mapped to their sources in this repository.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs walstream with `args` in dry-run mode; returns stdout, asserting
/// success.
fn dry_run(what: &str, args: &[String], env: &[(String, String)]) -> String {
    let mut c = Command::new(common::bin());
    c.args(args).env("WALSTREAM_DRY_RUN", "1");
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"] {
        c.env_remove(k);
    }
    c.envs(env.iter().map(|(k, v)| (k, v)));
    let o = c.output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{what}: walstream {args:?} failed: {}{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("string argument").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The Dockerfile, as the few facts the tests need.
struct Dockerfile {
    stages: Vec<String>,
    build_runs: Vec<String>,
    copies: Vec<(Option<String>, String, String)>,
    user: Option<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    final_image: String,
}

fn dockerfile() -> Dockerfile {
    let text = std::fs::read_to_string(repo().join("docker/Dockerfile")).unwrap();
    let mut lines = Vec::new();
    let mut cur = String::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(s) = t.strip_suffix('\\') {
            cur.push_str(s);
            cur.push(' ');
        } else {
            cur.push_str(t);
            lines.push(std::mem::take(&mut cur));
        }
    }
    let mut d = Dockerfile {
        stages: Vec::new(),
        build_runs: Vec::new(),
        copies: Vec::new(),
        user: None,
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        final_image: String::new(),
    };
    let json = |rest: &str| -> Vec<String> {
        serde_json::from_str(rest).unwrap_or_else(|_| panic!("use the JSON form: {rest}"))
    };
    for l in lines {
        let (instr, rest) = l.split_once(' ').unwrap_or((&l, ""));
        match instr.to_ascii_uppercase().as_str() {
            "FROM" => {
                d.stages.push(rest.to_string());
                d.final_image = rest.split_whitespace().next().unwrap().to_string();
                d.user = None;
            }
            "RUN" => d.build_runs.push(rest.to_string()),
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let from = words
                    .iter()
                    .find_map(|w| w.strip_prefix("--from="))
                    .map(str::to_string);
                let plain: Vec<&str> = words
                    .iter()
                    .copied()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let dst = plain.last().unwrap().to_string();
                for src in &plain[..plain.len() - 1] {
                    d.copies.push((from.clone(), src.to_string(), dst.clone()));
                }
            }
            "USER" => d.user = Some(rest.to_string()),
            "ENTRYPOINT" => d.entrypoint = json(rest),
            "CMD" => d.cmd = json(rest),
            _ => {}
        }
    }
    d
}

#[test]
fn dockerfile_builds_a_small_nonroot_image_whose_default_command_works() {
    let d = dockerfile();
    assert!(d.stages.len() >= 2, "multi-stage build expected");
    assert!(
        !d.final_image.starts_with("rust"),
        "the runtime image must not be the toolchain: {}",
        d.final_image
    );
    assert!(
        d.final_image.contains("distroless") || d.final_image.contains("slim"),
        "{}",
        d.final_image
    );
    let user = d.user.as_deref().expect("USER in the final stage");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "runs as root: {user}");
    assert!(
        d.build_runs.iter().any(|r| r.contains("cargo build")
            && r.contains("--release")
            && r.contains("--locked")),
        "{:?}",
        d.build_runs
    );
    // The toolchain is at least the crate's rust-version.
    let toolchain = d.stages[0]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches("rust:")
        .split('-')
        .next()
        .unwrap()
        .to_string();
    let cargo = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let msrv = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .unwrap()
        .trim_matches('"');
    let v = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(v(&toolchain) >= v(msrv), "rust:{toolchain} < {msrv}");
    // Every COPY source from the context exists; the binary copied from the
    // build stage is the entrypoint.
    let mut context_files = HashMap::new();
    for (from, src, dst) in &d.copies {
        match from {
            None => {
                assert!(
                    repo().join(src).exists(),
                    "COPY {src}: not in the repository"
                );
                context_files.insert(dst.clone(), repo().join(src));
            }
            Some(_) => {
                assert!(src.ends_with("target/release/walstream"), "{src}");
                assert_eq!(&d.entrypoint[0], dst, "ENTRYPOINT is not the copied binary");
            }
        }
    }
    assert!(d.entrypoint[0].ends_with("/walstream"));
    // Run the default command with the copied config in place.
    let args: Vec<String> = d
        .entrypoint
        .iter()
        .skip(1)
        .chain(&d.cmd)
        .map(|a| {
            context_files
                .get(a)
                .map_or(a.clone(), |p| p.display().to_string())
        })
        .collect();
    let out = dry_run("Dockerfile CMD", &args, &[]);
    assert!(
        out.contains("would replicate /data/app.db to file:///backup/app"),
        "{out}"
    );
    assert!(out.contains("would serve metrics on :9090"), "{out}");
}

#[test]
fn kubernetes_manifests_run_with_the_cli_they_name() {
    let dir = repo().join("deploy");
    let mut docs = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            let text = std::fs::read_to_string(&p).unwrap();
            for d in serde_yaml::Deserializer::from_str(&text) {
                let v = Value::deserialize(d)
                    .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", p.display()));
                assert!(
                    v["apiVersion"].is_string() && v["kind"].is_string(),
                    "{}",
                    p.display()
                );
                docs.push((p.clone(), v));
            }
        }
    }
    let by_kind = |k: &str| -> Vec<&Value> {
        docs.iter()
            .filter(|(_, v)| v["kind"] == k)
            .map(|(_, v)| v)
            .collect()
    };
    let configmaps: HashMap<String, &Value> = by_kind("ConfigMap")
        .into_iter()
        .map(|v| {
            (
                v["metadata"]["name"].as_str().unwrap().to_string(),
                &v["data"],
            )
        })
        .collect();
    let secrets: HashMap<String, &Value> = by_kind("Secret")
        .into_iter()
        .map(|v| {
            (
                v["metadata"]["name"].as_str().unwrap().to_string(),
                &v["stringData"],
            )
        })
        .collect();
    let d = dockerfile();
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = HashMap::<&str, usize>::new();
    for kind in ["Deployment", "StatefulSet", "DaemonSet", "Job"] {
        for w in by_kind(kind) {
            let name = w["metadata"]["name"].as_str().unwrap();
            let pod = &w["spec"]["template"]["spec"];
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"],
                Value::Bool(true),
                "{name}: pods run as non-root"
            );
            let volumes: HashMap<&str, &Value> = pod["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|v| (v["name"].as_str().unwrap(), v))
                .collect();
            let containers = pod["initContainers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .chain(pod["containers"].as_sequence().into_iter().flatten());
            for c in containers {
                let cname = c["name"].as_str().unwrap();
                let what = format!("{kind} {name}, container {cname}");
                let image = c["image"].as_str().unwrap();
                let argv: Vec<String> = if !c["command"].is_null() {
                    strings(&c["command"])
                        .into_iter()
                        .chain(strings(&c["args"]))
                        .collect()
                } else if image.contains("walstream") {
                    let args = if c["args"].is_null() {
                        d.cmd.clone()
                    } else {
                        strings(&c["args"])
                    };
                    d.entrypoint.iter().cloned().chain(args).collect()
                } else {
                    continue;
                };
                if !argv[0].ends_with("walstream") {
                    continue;
                }
                // Emulate the mounts: ConfigMaps become files here.
                let mut mapped: Vec<(String, PathBuf)> = Vec::new();
                let mut config_text = None;
                for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
                    let mount = m["mountPath"].as_str().unwrap().to_string();
                    let vol = volumes.get(m["name"].as_str().unwrap());
                    if let Some(cm) = vol.and_then(|v| v["configMap"]["name"].as_str()) {
                        let data = configmaps
                            .get(cm)
                            .unwrap_or_else(|| panic!("{what}: ConfigMap {cm} not in deploy/"));
                        let local = tmp.path().join(format!("{name}-{cname}-{cm}"));
                        std::fs::create_dir_all(&local).unwrap();
                        for (k, v) in data.as_mapping().unwrap() {
                            std::fs::write(local.join(k.as_str().unwrap()), v.as_str().unwrap())
                                .unwrap();
                            config_text = Some(v.as_str().unwrap().to_string());
                        }
                        mapped.push((mount, local));
                    }
                }
                let args: Vec<String> = argv[1..]
                    .iter()
                    .map(|a| {
                        for (mount, local) in &mapped {
                            if let Some(rest) = a.strip_prefix(mount.as_str()) {
                                return format!("{}{rest}", local.display());
                            }
                        }
                        a.clone()
                    })
                    .collect();
                let mut env = Vec::new();
                for e in c["envFrom"].as_sequence().into_iter().flatten() {
                    if let Some(s) = e["secretRef"]["name"].as_str() {
                        let data = secrets
                            .get(s)
                            .unwrap_or_else(|| panic!("{what}: Secret {s} not in deploy/"));
                        for (k, v) in data.as_mapping().unwrap() {
                            env.push((k.as_str().unwrap().into(), v.as_str().unwrap().into()));
                        }
                    }
                }
                for e in c["env"].as_sequence().into_iter().flatten() {
                    if let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str()) {
                        env.push((k.into(), v.into()));
                    }
                }
                let out = dry_run(&what, &args, &env);
                match args[0].as_str() {
                    "restore" => {
                        for flag in ["--if-db-not-exists", "--if-replica-exists"] {
                            assert!(args.iter().any(|a| a == flag), "{what}: {flag} missing");
                        }
                        assert!(
                            out.contains(
                                "would restore /data/app.db from s3://my-backup-bucket/app"
                            ),
                            "{what}: {out}"
                        );
                        *seen.entry("restore").or_default() += 1;
                    }
                    "replicate" => {
                        assert!(
                            out.contains(
                                "would replicate /data/app.db to s3://my-backup-bucket/app"
                            ),
                            "{what}: {out}"
                        );
                        if args.iter().any(|a| a == "--exec") {
                            *seen.entry("exec").or_default() += 1;
                        } else {
                            *seen.entry("sidecar").or_default() += 1;
                        }
                        // Probes point at the endpoints on the configured port.
                        let cfg: Value =
                            serde_yaml::from_str(config_text.as_deref().unwrap()).unwrap();
                        let port: u64 = cfg["addr"]
                            .as_str()
                            .and_then(|a| a.rsplit(':').next())
                            .and_then(|p| p.parse().ok())
                            .unwrap_or_else(|| panic!("{what}: config has no addr"));
                        for (probe, path) in
                            [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
                        {
                            let p = &c[probe]["httpGet"];
                            assert_eq!(p["path"].as_str(), Some(path), "{what}: {probe}");
                            assert_eq!(p["port"].as_u64(), Some(port), "{what}: {probe} port");
                        }
                        assert!(
                            out.contains(&format!("would serve metrics on :{port}")),
                            "{out}"
                        );
                    }
                    other => panic!("{what}: unexpected subcommand {other}"),
                }
            }
        }
    }
    for k in ["restore", "sidecar", "exec"] {
        assert!(
            seen.contains_key(k),
            "no {k} container in deploy/: {seen:?}"
        );
    }
}

#[test]
fn dry_run_rejects_what_a_real_run_would() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.yml");
    std::fs::write(
        &cfg,
        "dbs:\n  - path: /data/app.db\n    replica:\n      url: s3://b/p\n      bogus: 1\n",
    )
    .unwrap();
    let o = Command::new(common::bin())
        .args(["replicate", "--config"])
        .arg(&cfg)
        .env("WALSTREAM_DRY_RUN", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bogus"));
}
