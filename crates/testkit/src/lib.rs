//! Wire-level test doubles shared by tests, benchmarks and `simulate`.
//!
//! Owns: the fake Arvados API server (`fake_api`, also the `fake-arvados` binary) and the fake
//! crunch-run (`fake_crunch_run`, also the `fake-crunch-run` binary), and in-process SSH VMs
//! (`ssh_vm`). Later additions belong here too: the stub cloud driver built on those VMs,
//! fault-injecting proxies. Test doubles speak the real protocols; nothing
//! here mocks one of our own traits where a wire-level fake can stand in.

pub mod fake_api;
pub mod fake_crunch_run;
pub mod fake_gce;
pub mod moto;
pub mod oracle;
pub mod postgres;
pub mod slurm;
/// The SSH VM server now lives in `cloud::sshd` (the loopback driver needs it too).
pub use cloud::sshd as ssh_vm;
pub mod stub_driver;

pub use fake_api::{ContainerSpec, FakeArvados, FakeConfig, Fault, FaultKind, StateChange};

/// `fake-crunch-run` as the workspace built it, for an integration test of another package:
/// beside that test's own binary (`target/debug/deps/…`), wherever the target dir is
/// (`cargo test --workspace` builds every package's binaries first).
pub fn fake_crunch_run_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let p = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test binary is in target/<profile>/deps")
        .join("fake-crunch-run");
    if !p.exists() {
        // `cargo test -p <one crate>` does not build a dev-dependency's binaries: build it
        // (cargo tells the tests where it is, and the target directory comes from the
        // environment as for the test itself).
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let _ = std::process::Command::new(cargo)
            .args(["build", "-p", "testkit", "--bin", "fake-crunch-run"])
            .status();
    }
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p testkit --bins` (or the whole workspace's tests)",
        p.display()
    );
    p
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a server the test starts next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}
