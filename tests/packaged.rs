//! The packaged build (`--no-default-features`: no `simulator`): what operators install has
//! no fake in it and refuses the stub driver. `scripts/test` runs this file with
//! `cargo test --no-default-features --test packaged` after the main suite; in the default
//! build it compiles to nothing.
#![cfg(not(feature = "simulator"))]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_arvados-dispatch-cloud");

fn config(driver: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        f.path(),
        format!(
            "Clusters:\n  zzzzz:\n    SystemRootToken: xyzzy\n    Services:\n      Controller:\n        ExternalURL: https://zzzzz.example.com/\n    Containers:\n      CloudVMs:\n        Driver: {driver}\n    InstanceTypes:\n      a1: {{ProviderType: a1, VCPUs: 1, RAM: 1GiB, Price: 0.1}}\n"
        ),
    )
    .unwrap();
    f
}

#[test]
fn the_stub_driver_is_refused() {
    let cfg = config("stub");
    for sub in [&["check-config"][..], &["run", "--listen", "127.0.0.1:0"]] {
        let out = Command::new(BIN)
            .args(sub)
            .arg("--config")
            .arg(cfg.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{sub:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Containers.CloudVMs.Driver: \"stub\" is the simulator's fake cloud"),
            "{sub:?}: {err}"
        );
    }
    // A real driver's config passes the same check.
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(config("ec2").path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn there_is_no_simulate_subcommand() {
    let out = Command::new(BIN).arg("simulate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("simulate"));
}

#[test]
fn the_packaged_build_links_no_fake() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--locked",
            "-e",
            "normal",
            "--no-default-features",
            "-p",
            "arvados-dispatch-cloud",
            "--prefix",
            "none",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.contains("cloud-ec2 "),
        "not a dependency tree?\n{tree}"
    );
    for forbidden in ["testkit ", "rcgen ", "axum-server "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "{forbidden} is in the packaged build"
        );
    }
}
