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
}

#[test]
fn help_lists_subcommands() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("check-config"));
    // No subcommand: usage on stderr, exit 2.
    let out = bin().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("Usage:"));
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
