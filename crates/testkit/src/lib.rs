//! Wire-level test doubles shared by tests, benchmarks and `simulate`.
//!
//! Owns: the fake Arvados API server (`fake_api`, also the `fake-arvados` binary) and the fake
//! crunch-run (`fake_crunch_run`, also the `fake-crunch-run` binary), and in-process SSH VMs
//! (`ssh_vm`). Later additions belong here too: the stub cloud driver built on those VMs,
//! fault-injecting proxies. Test doubles speak the real protocols; nothing
//! here mocks one of our own traits where a wire-level fake can stand in.

pub mod fake_api;
pub mod fake_crunch_run;
pub mod moto;
pub mod oracle;
/// The SSH VM server now lives in `cloud::sshd` (the loopback driver needs it too).
pub use cloud::sshd as ssh_vm;
pub mod stub_driver;

pub use fake_api::{ContainerSpec, FakeArvados, FakeConfig, Fault, FaultKind, StateChange};
