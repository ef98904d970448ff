//! The `arvados-dispatch-cloud` binary as an operator runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"));
    c.env_remove("ARVADOS_CONFIG");
    c
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn real_default_config() -> PathBuf {
    root().join("crates/arvados/tests/fixtures/arvados-config.default.yml")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn check_config(args: &[&str]) -> Output {
    bin().arg("check-config").args(args).output().unwrap()
}

fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// A failure is one line on stderr, exit status 1, nothing on stdout.
fn assert_one_line_failure(out: &Output, wanted: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(wanted), "{err:?} should mention {wanted:?}");
    assert!(out.stdout.is_empty());
    // Each cause is stated once (an error chain printed in full must not repeat a cause
    // its message already includes).
    let parts: Vec<&str> = err.trim_end().split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "{p:?} repeated in {err:?}");
    }
}

#[test]
fn help_lists_subcommands() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    for sub in [
        "check-config",
        "cloudtest",
        "run",
        "simulate",
        "instances",
        "containers",
    ] {
        assert!(text(&out.stdout).contains(sub), "{sub} missing from --help");
    }
    // No subcommand runs the service, as the Go binary does: here, with a config file that
    // does not exist, that is a one-line error naming the file.
    let out = bin()
        .args(["--config", "/nonexistent/arvados-config.yml"])
        .output()
        .unwrap();
    assert_one_line_failure(&out, "/nonexistent/arvados-config.yml");
}

#[test]
fn bad_argument_prints_usage() {
    let out = bin().args(["check-config", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("--bogus") && err.contains("Usage:"), "{err}");
}

#[test]
fn check_config_loads_real_default_config() {
    let out = check_config(&["--config", real_default_config().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(yaml.contains("ClusterID: xxxxx"));
    assert!(yaml.contains("TimeoutIdle: 1m0s"));
    assert!(yaml.contains("ReserveExtraRAM: 576716800"));
}

#[test]
fn check_config_output_is_a_loadable_config_without_secrets() {
    let example = root().join("config/example.yml");
    let out = check_config(&["--config", example.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(!yaml.contains("example-system-root-token"), "token printed");
    assert!(!yaml.contains("example-management-token"), "token printed");
    assert!(yaml.contains("m5.large"));
    // Reload what was printed: same settings, apart from the redacted secrets.
    let original =
        arvados::config::load_cluster(&arvados::ConfigSource { path: example }, None).unwrap();
    let reloaded = arvados::config::load_cluster_from_str(&yaml, "stdout", None).unwrap();
    assert_eq!(reloaded, original.redacted());
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        &dir,
        "c.yml",
        "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        TimeoutIdle: 1x\n",
    );
    let out = check_config(&["--config", p.to_str().unwrap()]);
    assert_one_line_failure(
        &out,
        "Clusters.zzzzz.Containers.CloudVMs.TimeoutIdle: invalid duration \"1x\"",
    );
}

#[test]
fn check_config_missing_file_syntax_error_and_unknown_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yml");
    let out = check_config(&["--config", missing.to_str().unwrap()]);
    assert_one_line_failure(&out, "cannot read config file");
    assert_one_line_failure(&out, "nope.yml");

    let p = write(&dir, "bad.yml", "Clusters:\n  zzzzz: {\n    x: [\n");
    let out = check_config(&["--config", p.to_str().unwrap()]);
    assert_one_line_failure(&out, "YAML syntax error");

    let p = write(&dir, "ok.yml", "Clusters:\n  zzzzz: {}\n");
    let out = check_config(&["--config", p.to_str().unwrap(), "--cluster", "qqqqq"]);
    assert_one_line_failure(
        &out,
        "cluster \"qqqqq\" not found (clusters in file: zzzzz)",
    );
}

#[test]
fn check_config_uses_arvados_config_env() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "env.yml", "Clusters:\n  abcde: {}\n");
    let out = bin()
        .arg("check-config")
        .env("ARVADOS_CONFIG", &p)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ClusterID: abcde"));
}

/// A cluster config for `cloudtest` with `driver`, a fresh dispatcher key, and `extra` YAML
/// lines under `CloudVMs`.
fn cloudtest_config(
    dir: &tempfile::TempDir,
    driver: &str,
    cloud_vms_extra: &str,
    types: &str,
) -> PathBuf {
    let key = cloud::sshd::new_ed25519_key()
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .unwrap();
    let key_path = write(dir, "id_ed25519", &key);
    write(
        dir,
        "config.yml",
        &format!(
            "Clusters:
  zzzzz:
    Containers:
      DispatchPrivateKey: file://{}
      CloudVMs:
        Enable: true
        Driver: {driver}
        ProbeInterval: 100ms
        TimeoutBooting: 2s
        SyncInterval: 100ms
        ResourceTags: {{Owner: research}}
{cloud_vms_extra}
{types}",
            key_path.display()
        ),
    )
}

#[test]
fn cloudtest_against_the_stub_prints_every_step_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cloudtest_config(
        &dir,
        "stub",
        "        DriverParameters: {BootDelay: 300ms}",
        "    InstanceTypes:\n      small: {VCPUs: 1, RAM: 1GiB, Price: 0.1}\n      big: {VCPUs: 8, RAM: 8GiB, Price: 0.8}",
    );
    let out = bin()
        .args(["cloudtest", "--config"])
        .arg(&cfg)
        .args(["--command", "crunch-run --list"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for step in [
        "list existing instances",
        "create instance (type small,",
        "find created instance in the list: ok",
        "check ResourceTags on the instance: ok",
        "boot probe \"systemctl is-system-running\": ok",
        "command \"crunch-run --list\": ok",
        "and wait until it is gone: ok",
        "PASS",
    ] {
        assert!(stdout.contains(step), "missing {step:?}:\n{stdout}");
    }
}

#[test]
fn cloudtest_with_a_stub_that_never_boots_fails_after_timeout_booting_and_destroys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cloudtest_config(
        &dir,
        "stub",
        "        DriverParameters: {BootDelay: 1h}",
        "    InstanceTypes:\n      small: {VCPUs: 1, RAM: 1GiB, Price: 0.1}",
    );
    let started = std::time::Instant::now();
    let out = bin()
        .args(["cloudtest", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    assert!(
        stdout.contains("FAILED after") && stdout.contains("TimeoutBooting 2s"),
        "{stdout}"
    );
    assert!(
        stdout.contains("destroy inst1,small and wait until it is gone: ok"),
        "{stdout}"
    );
}

#[test]
fn cloudtest_against_loopback_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cloudtest_config(&dir, "loopback", "        BootProbeCommand: \"true\"", "");
    let out = bin()
        .args(["cloudtest", "--config"])
        .arg(&cfg)
        .args(["--command", "echo loopback-ok"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("create instance (type localhost,"),
        "{stdout}"
    );
    assert!(stdout.contains("loopback-ok"), "{stdout}");
    assert!(
        stdout.contains("destroy localhost and wait until it is gone: ok"),
        "{stdout}"
    );
}

#[test]
fn cloudtest_bad_setup_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cloudtest_config(
        &dir,
        "azure",
        "",
        "    InstanceTypes:\n      small: {VCPUs: 1, RAM: 1GiB}",
    );
    let out = bin()
        .args(["cloudtest", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_one_line_failure(
        &out,
        "Containers.CloudVMs.Driver: unsupported cloud driver \"azure\"",
    );
    // The driver is checked first (as `run` and `check-config` do); with a known one, a bad
    // instance type is the error.
    let known = write(
        &dir,
        "known.yml",
        &std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("azure", "stub"),
    );
    let out = bin()
        .args(["cloudtest", "--instance-type", "huge", "--config"])
        .arg(&known)
        .output()
        .unwrap();
    assert_one_line_failure(&out, "--instance-type \"huge\": not in InstanceTypes");
    let body = std::fs::read_to_string(&cfg).unwrap();
    let no_key = body.replace(
        &format!("file://{}", dir.path().join("id_ed25519").display()),
        "\"\"",
    );
    let cfg = write(&dir, "nokey.yml", &no_key.replace("azure", "stub"));
    let out = bin()
        .args(["cloudtest", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_one_line_failure(&out, "Containers.DispatchPrivateKey: no key");
}
