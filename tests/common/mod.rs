//! Helpers shared by the root package's tests that drive outside tools.

#![allow(dead_code)]

pub mod gce_vms;
pub mod moto_vpc;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Run `cmd`: whether it succeeded, and its stdout and stderr together.
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `name` if `name version_args` succeeds (on $PATH, or in scripts/test's tool directory);
/// if not, fail under CI (scripts/test installs it) and skip loudly elsewhere.
pub fn tool_with(name: &str, version_args: &[&str]) -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("arvados-dispatch-cloud/tools/bin").join(name));
    for c in [Some(PathBuf::from(name)), cache].into_iter().flatten() {
        let ok = Command::new(&c)
            .args(version_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(c);
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{name} is missing in CI: scripts/test installs it"
    );
    eprintln!("SKIPPED: {name} is not installed (scripts/test installs it)");
    None
}

/// [`tool_with`] `--version`.
pub fn tool(name: &str) -> Option<PathBuf> {
    tool_with(name, &["--version"])
}

/// Write `key` as an OpenSSH private key file `dir/id_ed25519` (the dispatch key, given to
/// the binary as `DispatchPrivateKey: file://…`, as operators configure it).
pub fn write_private_key(dir: &Path, key: &russh::keys::PrivateKey) -> PathBuf {
    let path = dir.join("id_ed25519");
    std::fs::write(
        &path,
        key.to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    path
}
