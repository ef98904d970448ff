//! `deploy/`: the systemd units, the Debian packages and the usage text they ship, checked
//! with the real tools (`systemd-analyze`, `cargo-deb`, `lintian`, `dpkg-deb`). Under `CI`
//! a missing tool fails the test (scripts/test installs them); elsewhere it is skipped
//! loudly.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod common;
use common::{run, tool, tool_with};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dispatcher() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
}

/// Another binary of the workspace (`crunch-dispatch-local`, `crunch-dispatch-slurm`), built
/// beside this package's binary by `cargo test --workspace`.
fn sibling(name: &str) -> Option<PathBuf> {
    let p = dispatcher().with_file_name(name);
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} missing: scripts/test runs cargo test --workspace",
        p.display()
    );
    eprintln!("SKIPPED: {name} is not built (cargo test --workspace builds it)");
    None
}

/// The workspace's other dispatchers that ship as packages.
const SIBLINGS: [&str; 2] = ["crunch-dispatch-local", "crunch-dispatch-slurm"];

/// A copy of `unit` whose ExecStart runs `binary` (the one just built) instead of
/// /usr/bin/…, in a directory of its own.
fn unit_with_binary(unit: &str, binary: &Path) -> (tempfile::TempDir, PathBuf) {
    let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit)).unwrap();
    let name = binary.file_name().unwrap().to_str().unwrap();
    let installed = format!("ExecStart=/usr/bin/{name}");
    assert!(text.contains(&installed), "{unit}: {installed} expected");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(unit);
    std::fs::write(
        &path,
        text.replace(&installed, &format!("ExecStart={}", binary.display())),
    )
    .unwrap();
    (dir, path)
}

#[test]
fn systemd_units_verify_clean_with_the_built_binaries() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let mut units = vec![("arvados-dispatch-cloud.service".to_string(), dispatcher())];
    for name in SIBLINGS {
        if let Some(b) = sibling(name) {
            units.push((format!("{name}.service"), b));
        }
    }
    for (unit, binary) in units {
        let (_dir, path) = unit_with_binary(&unit, &binary);
        let (ok, out) = run(Command::new(&analyze).arg("verify").arg(&path));
        assert!(ok && out.trim().is_empty(), "{unit}: {out}");
    }
    let text =
        std::fs::read_to_string(repo().join("deploy/systemd/arvados-dispatch-cloud.service"))
            .unwrap();
    assert!(text.contains("\nType=notify\n"));
}

/// The exposure deploy/README.md states is what `systemd-analyze security` computes.
#[test]
fn systemd_security_exposure_is_as_documented() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo().join("deploy/systemd/arvados-dispatch-cloud.service"),
        dir.path().join("arvados-dispatch-cloud.service"),
    )
    .unwrap();
    let (_, out) = run(Command::new(&analyze)
        .args([
            "security",
            "--offline=yes",
            "--no-pager",
            "arvados-dispatch-cloud.service",
        ])
        .current_dir(dir.path()));
    let level = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for arvados-dispatch-cloud.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no exposure level in\n{out}"));
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    assert!(
        readme.contains(&format!("exposure level {level} ")),
        "deploy/README.md should state exposure level {level}"
    );
}

/// The man-page-like text the packages ship: every `--help`, as the binaries print it.
fn usage_text(binary: &Path, subcommands: &[&str]) -> String {
    let mut out = String::new();
    let name = binary.file_name().unwrap().to_str().unwrap();
    for sub in std::iter::once(&"").chain(subcommands) {
        let mut cmd = Command::new(binary);
        if !sub.is_empty() {
            cmd.arg(sub);
        }
        let o = cmd.arg("--help").output().unwrap();
        assert!(o.status.success());
        let title = format!("{name} {sub} --help").replace("  ", " ");
        out.push_str(&format!(
            "$ {title}\n\n{}\n",
            String::from_utf8_lossy(&o.stdout)
        ));
    }
    out
}

/// deploy/debian/*usage.txt are current; `UPDATE_USAGE=1 cargo test --test deploy` rewrites
/// them.
#[test]
fn packaged_usage_texts_are_current() {
    // The package holds the build without the simulator (ARCHITECTURE.md): its help is this
    // build's without the `simulate` line.
    let packaged = usage_text(
        &dispatcher(),
        &[
            "run",
            "check-config",
            "cloudtest",
            "instances",
            "containers",
            "health",
        ],
    )
    .lines()
    .filter(|l| !l.starts_with("  simulate  "))
    .map(|l| format!("{l}\n"))
    .collect::<String>();
    let mut want = vec![("usage.txt".to_string(), packaged)];
    for name in SIBLINGS {
        if let Some(b) = sibling(name) {
            want.push((format!("{name}.usage.txt"), usage_text(&b, &[])));
        }
    }
    for (file, text) in want {
        let path = repo().join("deploy/debian").join(&file);
        if std::env::var_os("UPDATE_USAGE").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap_or_default(),
            text,
            "{file} is out of date: UPDATE_USAGE=1 cargo test --test deploy"
        );
    }
}

#[test]
fn debian_packages_build_lint_clean_and_their_units_verify_in_the_unpacked_root() {
    let (Some(cargo_deb), Some(lintian), Some(analyze)) =
        (tool("cargo-deb"), tool("lintian"), tool("systemd-analyze"))
    else {
        return;
    };
    let mut packages = vec![(
        "arvados-dispatch-cloud".to_string(),
        "arvados-dispatch-cloud-rs".to_string(),
        "arvados-dispatch-cloud.service".to_string(),
    )];
    for name in SIBLINGS {
        if sibling(name).is_some() {
            packages.push((
                name.to_string(),
                format!("{name}-rs"),
                format!("{name}.service"),
            ));
        }
    }
    for (crate_name, package, unit) in packages {
        let (crate_name, package, unit) = (crate_name.as_str(), package.as_str(), unit.as_str());
        let out_dir = tempfile::tempdir().unwrap();
        // The binaries `cargo test` just built (dev profile), so no second build: what is
        // checked here is the packaging, which is the same for `cargo deb`'s release build.
        let (ok, out) = run(Command::new(&cargo_deb)
            .args(["-p", crate_name, "--profile", "dev", "--no-build", "-o"])
            .arg(out_dir.path())
            .current_dir(repo()));
        assert!(ok, "cargo-deb -p {crate_name}: {out}");
        let deb = std::fs::read_dir(out_dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .unwrap_or_else(|| panic!("no .deb: {out}"));
        assert!(
            deb.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&format!("{package}_")),
            "{}",
            deb.display()
        );

        // It takes the Go package's place.
        for field in ["Provides", "Conflicts", "Replaces"] {
            let (ok, value) = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(field));
            assert!(ok && value.trim() == crate_name, "{field}: {value}");
        }

        // Lint: errors and warnings fail; overrides are in deploy/debian with reasons.
        let (ok, out) = run(Command::new(&lintian)
            .args(["--fail-on", "error,warning"])
            .arg(&deb));
        let findings: Vec<&str> = out
            .lines()
            .filter(|l| !l.contains("running with root privileges"))
            .collect();
        assert!(ok && findings.is_empty(), "lintian {package}:\n{out}");

        // Unpacked into a root with systemd's own units, the unit verifies there.
        let root = tempfile::tempdir().unwrap();
        let (ok, out) = run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(root.path()));
        assert!(ok, "{out}");
        let binary = root.path().join("usr/bin").join(crate_name);
        assert!(binary.is_file(), "{} not in the package", binary.display());
        let (ok, out) = run(Command::new(&binary).arg("--help"));
        assert!(ok, "the packaged binary runs: {out}");
        for dir in ["lib/systemd/system", "usr/lib/systemd/system"] {
            let host = Path::new("/").join(dir);
            if !host.is_dir() {
                continue;
            }
            let target = root.path().join(dir);
            std::fs::create_dir_all(&target).unwrap();
            for e in std::fs::read_dir(&host).unwrap() {
                let e = e.unwrap();
                let to = target.join(e.file_name());
                if e.file_type().unwrap().is_file() && !to.exists() {
                    std::fs::copy(e.path(), to).unwrap();
                }
            }
        }
        assert!(root.path().join("lib/systemd/system").join(unit).is_file());
        let (ok, out) = run(Command::new(&analyze)
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(unit));
        assert!(ok && out.trim().is_empty(), "{package}: {unit}: {out}");
    }
}

// ---------------------------------------------------------------------------------------------
// The container image

/// podman with the options this machine needs (no systemd, no overlay, no cgroup manager).
fn podman(podman: &Path) -> Command {
    let mut c = Command::new(podman);
    c.args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"]);
    c
}

/// Removes the test's container and image however the test ends.
struct Cleanup {
    podman: PathBuf,
    container: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&self.podman)
            .args(["rm", "-f", &self.container])
            .output();
        let _ = podman(&self.podman)
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

/// deploy/container: the image builds FROM scratch from the built binary, runs `simulate`
/// as a non-root user with a mounted config, serves the management API to the host on
/// 127.0.0.1, and its health check passes.
#[test]
fn container_image_runs_simulate_and_serves_the_management_api_to_the_host() {
    let (Some(_buildah), Some(podman_bin)) = (tool("buildah"), tool("podman")) else {
        return;
    };
    let id = std::process::id();
    let image = format!("localhost/arvados-dispatch-cloud-test:{id}");
    let container = format!("adc-test-{id}");
    let _cleanup = Cleanup {
        podman: podman_bin.clone(),
        container: container.clone(),
        image: image.clone(),
    };
    let (ok, out) = run(Command::new(repo().join("deploy/container/build.sh"))
        .arg(dispatcher())
        .arg(&image)
        .env("BUILDAH_OPTS", "--storage-driver vfs")
        .env("BUILDAH_BUD_OPTS", "--isolation chroot"));
    assert!(ok, "build.sh: {out}");

    // The simulator's cluster, with the InternalURLs the health check reads.
    let port = testkit::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yml");
    let text = std::fs::read_to_string(repo().join("config/simulate.yml"))
        .unwrap()
        .replace(
            "    ManagementToken: simulate-management-token\n",
            &format!(
                "    ManagementToken: simulate-management-token\n    Services:\n      DispatchCloud:\n        InternalURLs: {{\"{url}\": {{}}}}\n"
            ),
        );
    std::fs::write(&config, text).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (ok, out) = run(podman(&podman_bin)
        .args(["run", "-d", "--name", &container, "--network", "host"])
        .args(["--runtime", "runc", "--health-interval", "disable"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .arg("-v")
        .arg(format!("{}:/etc/arvados/config.yml:ro", config.display()))
        .arg(&image)
        .args(["simulate", "--config", "/etc/arvados/config.yml"])
        .args([
            "--containers",
            "2000",
            "--boot-delay",
            "5s",
            "--timeout",
            "10m",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")]));
    assert!(ok, "podman run: {out}");

    // The management API answers the host, with the simulated cluster's VMs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let instances = loop {
        let (ok, out) = run(Command::new("curl")
            .args(["-sf", "--max-time", "5", "-H"])
            .arg("Authorization: Bearer simulate-management-token")
            .arg(format!("{url}/arvados/v1/dispatch/instances")));
        if ok {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            if v["items"].as_array().is_some_and(|a| !a.is_empty()) {
                break v;
            }
        }
        if std::time::Instant::now() > deadline {
            let (_, logs) = run(podman(&podman_bin).args(["logs", &container]));
            panic!("no VMs listed at {url} within 90 s; container log:\n{logs}");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(instances["items"][0]["instance"].is_string());

    // The image's health check (/_health/ping with the config's token) passes.
    let (ok, out) = run(podman(&podman_bin).args(["healthcheck", "run", &container]));
    assert!(ok, "healthcheck: {out}");
    // It runs as the image's non-root user.
    let (ok, out) = run(podman(&podman_bin).args(["top", &container, "user"]));
    assert!(
        ok && out.lines().nth(1).map(str::trim) == Some("arvados"),
        "{out}"
    );
    // JSON logs from the container, Arvados-shaped.
    let (_, logs) = run(podman(&podman_bin).args(["logs", &container]));
    assert!(
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|l| l["ClusterID"] == "zzzzz" && l["msg"].is_string()),
        "{logs}"
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

type Yaml = serde_norway::Value;

fn yaml_file(path: &Path) -> Yaml {
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// deploy/kubernetes/prometheusrule.yaml carries dashboards/alerts.yml's groups unchanged;
/// `UPDATE_K8S=1 cargo test --test deploy` rewrites it.
#[test]
fn prometheus_rule_carries_the_alert_rules() {
    let alerts = yaml_file(&repo().join("dashboards/alerts.yml"));
    let path = repo().join("deploy/kubernetes/prometheusrule.yaml");
    if std::env::var_os("UPDATE_K8S").is_some() {
        let mut doc = serde_norway::Mapping::new();
        doc.insert("apiVersion".into(), "monitoring.coreos.com/v1".into());
        doc.insert("kind".into(), "PrometheusRule".into());
        let mut meta = serde_norway::Mapping::new();
        meta.insert("name".into(), "arvados-dispatch-cloud".into());
        doc.insert("metadata".into(), meta.into());
        let mut spec = serde_norway::Mapping::new();
        spec.insert("groups".into(), alerts["groups"].clone());
        doc.insert("spec".into(), spec.into());
        std::fs::write(
            &path,
            format!(
                "# Generated from dashboards/alerts.yml: UPDATE_K8S=1 cargo test --test deploy\n{}",
                serde_norway::to_string(&doc).unwrap()
            ),
        )
        .unwrap();
    }
    let rule = yaml_file(&path);
    assert_eq!(
        rule["spec"]["groups"], alerts["groups"],
        "prometheusrule.yaml is out of date: UPDATE_K8S=1 cargo test --test deploy"
    );
}

#[test]
fn kubernetes_manifests_render_and_validate() {
    let (Some(kubectl), Some(validate)) = (
        tool_with("kubectl", &["version", "--client"]),
        tool_at(
            &repo().join(".venv/bin/kubernetes-validate"),
            "kubernetes-validate",
        ),
    ) else {
        return;
    };
    let (ok, rendered) = run(Command::new(&kubectl)
        .arg("kustomize")
        .arg(repo().join("deploy/kubernetes")));
    assert!(ok, "kubectl kustomize: {rendered}");
    let docs: Vec<Yaml> = rendered
        .split("\n---\n")
        .map(|d| serde_norway::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect();
    let kind = |k: &str| -> Vec<&Yaml> { docs.iter().filter(|d| d["kind"] == k).collect() };

    // Built-in kinds: the schema of a current Kubernetes, strictly (no unknown fields).
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    for d in &docs {
        if d["apiVersion"]
            .as_str()
            .unwrap()
            .contains("monitoring.coreos.com")
        {
            continue;
        }
        n += 1;
        let f = dir.path().join(format!("{n}.yaml"));
        std::fs::write(&f, serde_norway::to_string(d).unwrap()).unwrap();
    }
    assert!(n >= 4, "{rendered}");
    let (ok, out) = run(Command::new(&validate)
        .args(["--strict", "--no-warn"])
        .args((1..=n).map(|i| dir.path().join(format!("{i}.yaml")))));
    assert!(ok, "kubernetes-validate --strict:\n{out}");

    // What the dispatcher needs from them.
    let dep = kind("Deployment")[0];
    let spec = &dep["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(1));
    assert_eq!(spec["strategy"]["type"], "Recreate");
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    assert_eq!(c["image"], "localhost/arvados-dispatch-cloud:latest");
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert_eq!(
        c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        let cmd = &c[probe]["exec"]["command"];
        assert_eq!(cmd[1], "health", "{probe}");
    }
    assert!(c["resources"]["requests"]["memory"].is_string());
    let secret = kind("Secret")[0];
    let secret_name = secret["metadata"]["name"].as_str().unwrap();
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], secret_name);
    for key in ["config.yml", "dispatch-key", "management-token"] {
        assert!(secret["data"][key].is_string(), "secret lacks {key}");
    }
    let svc = kind("Service")[0];
    let port_name = svc["spec"]["ports"][0]["name"].as_str().unwrap();
    assert_eq!(c["ports"][0]["name"], port_name);
    assert!(!kind("NetworkPolicy").is_empty());

    // Custom resources (no schema here): the fields the Prometheus Operator requires, and
    // the references that must match the other objects.
    let sm = kind("ServiceMonitor")[0];
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(sm["metadata"]["name"].is_string());
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["port"], port_name);
    assert_eq!(ep["path"], "/metrics");
    assert_eq!(ep["authorization"]["credentials"]["name"], secret_name);
    assert_eq!(
        ep["authorization"]["credentials"]["key"],
        "management-token"
    );
    let selector = sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
    for (k, v) in selector {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "ServiceMonitor selects the Service"
        );
    }
    let pr = kind("PrometheusRule")[0];
    assert_eq!(pr["apiVersion"], "monitoring.coreos.com/v1");
    let groups = pr["spec"]["groups"].as_sequence().unwrap();
    assert!(!groups.is_empty());
    for g in groups {
        assert!(g["name"].is_string());
        for r in g["rules"].as_sequence().unwrap() {
            assert!(r["expr"].is_string(), "{r:?}");
            assert!(r["alert"].is_string() ^ r["record"].is_string(), "{r:?}");
        }
    }
}

/// `path` if it runs, else `tool(name)` (which fails under CI).
fn tool_at(path: &Path, name: &str) -> Option<PathBuf> {
    if Command::new(path)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return Some(path.to_path_buf());
    }
    tool(name)
}
