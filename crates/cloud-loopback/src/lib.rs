//! The loopback driver (`Driver: loopback`, spec §4): one "instance" that is the dispatcher's
//! own host, reached through a local SSH server ([`cloud::sshd`]) that runs commands with
//! `sh -c` as the current user, with a synthesized `localhost` instance type.
//! Depends only on `cloud`.
//!
//! Status: driver and instance type done (AC-LOOP-1); the config loader does not yet enforce
//! "at most one instance type with loopback" nor synthesize the type itself.

use parking_lot::Mutex;
use std::process::Stdio;
use std::sync::Arc;

use arvados::InstanceType;
use cloud::sshd::{CommandHandler, Outcome, OutcomeFuture, SshVm};
use cloud::{
    BoxFuture, CloudError, CreateRequest, Driver, ErrorKind, Instance, InstanceId, InstancePrice,
    InstanceSet, InstanceSetId, InstanceTags,
};
use tokio::io::AsyncWriteExt;

/// Where crunch-run marks a node broken; a destroy/create cycle is the only chance to clear it.
const BROKEN_FLAG: &str = "/var/lock/crunch-run-broken";

/// The `localhost` instance type: this host's CPUs and memory, the temp filesystem's size as
/// scratch, price 1.
pub fn localhost_instance_type() -> InstanceType {
    arvados::host::localhost_instance_type()
}

/// The current OS user name.
fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| "root".into())
}

/// Runs a command on this host: `sh -c`, a leading `sudo ` dropped, in its own process group.
async fn run_local(command: String, stdin: Vec<u8>) -> Outcome {
    let command = command
        .strip_prefix("sudo ")
        .map(str::to_string)
        .unwrap_or(command);
    let mut child = match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Outcome::fail(1, e.to_string()),
    };
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(&stdin).await;
    }
    match child.wait_with_output().await {
        Ok(out) => Outcome {
            exit: out.status.code().map_or(1, |c| c as u32),
            stdout: out.stdout,
            stderr: out.stderr,
        },
        Err(e) => Outcome::fail(1, e.to_string()),
    }
}

/// The loopback driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoopbackDriver;

impl Driver for LoopbackDriver {
    fn instance_set(
        &self,
        _params: &serde_json::Value,
        _id: &InstanceSetId,
        _shared_tags: &InstanceTags,
    ) -> Result<Arc<dyn InstanceSet>, CloudError> {
        Ok(Arc::new(LoopbackSet::default()))
    }
}

type Slot = Arc<Mutex<Option<Arc<LoopbackVm>>>>;

/// At most one instance: this host.
#[derive(Default)]
pub struct LoopbackSet {
    vm: Slot,
}

/// This host as an instance.
#[derive(Debug)]
pub struct LoopbackVm {
    provider_type: String,
    tags: Mutex<InstanceTags>,
    ssh: Mutex<Option<SshVm>>,
    addr: String,
    host_key: String,
    user: String,
    slot: std::sync::Weak<Mutex<Option<Arc<LoopbackVm>>>>,
}

impl Instance for LoopbackVm {
    fn id(&self) -> InstanceId {
        self.provider_type.clone()
    }
    fn provider_type(&self) -> String {
        self.provider_type.clone()
    }
    fn tags(&self) -> InstanceTags {
        self.tags.lock().clone()
    }
    fn address(&self) -> String {
        self.addr.clone()
    }
    fn remote_user(&self) -> String {
        self.user.clone()
    }
    fn set_tags(&self, tags: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>> {
        *self.tags.lock() = tags;
        Box::pin(async { Ok(()) })
    }
    /// Leaves the list and stops the SSH server (Go left the server running).
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>> {
        if let Some(slot) = self.slot.upgrade() {
            slot.lock().take();
        }
        self.ssh.lock().take();
        Box::pin(async { Ok(()) })
    }
    fn price_history(&self, _it: &InstanceType) -> Vec<InstancePrice> {
        Vec::new()
    }
    fn verify_host_key(&self, key: &str) -> BoxFuture<'_, Result<(), CloudError>> {
        let r = cloud::sshd::check_host_key(&self.host_key, key);
        Box::pin(async move { r })
    }
}

impl InstanceSet for LoopbackSet {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        let it = it.clone();
        Box::pin(async move {
            if self.vm.lock().is_some() {
                return Err(CloudError::new(
                    ErrorKind::Quota,
                    "loopback driver is always at quota",
                ));
            }
            match std::fs::remove_file(BROKEN_FLAG) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CloudError::other(format!("removing {BROKEN_FLAG}: {e}"))),
            }
            let authorized = cloud::sshd::authorized_keys(req.public_key.as_deref());
            let user = current_user();
            let expected_user = user.clone();
            let handler: Arc<dyn CommandHandler> = Arc::new(
                move |login: &str, cmd: &str, stdin: Vec<u8>| -> OutcomeFuture {
                    if login != expected_user {
                        let msg = format!("only {expected_user} may log in");
                        return Box::pin(async move { Outcome::fail(1, msg) });
                    }
                    Box::pin(run_local(cmd.to_string(), stdin))
                },
            );
            let ssh = SshVm::start(handler, authorized)
                .await
                .map_err(|e| CloudError::other(format!("starting SSH server: {e}")))?;
            let vm = Arc::new(LoopbackVm {
                provider_type: it.provider_type.clone(),
                tags: Mutex::new(req.tags),
                addr: ssh.addr().to_string(),
                host_key: ssh.host_key().to_openssh().unwrap_or_default(),
                ssh: Mutex::new(Some(ssh)),
                user,
                slot: Arc::downgrade(&self.vm),
            });
            let mut slot = self.vm.lock();
            if slot.is_some() {
                return Err(CloudError::new(
                    ErrorKind::Quota,
                    "loopback driver is always at quota",
                ));
            }
            *slot = Some(vm.clone());
            Ok(vm as Arc<dyn Instance>)
        })
    }

    fn instances(
        &self,
        _filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let v: Vec<Arc<dyn Instance>> = self
            .vm
            .lock()
            .iter()
            .map(|v| v.clone() as Arc<dyn Instance>)
            .collect();
        Box::pin(async move { Ok(v) })
    }

    fn instance_quota_group(&self, _it: &InstanceType) -> String {
        String::new()
    }

    fn stop(&self) {
        if let Some(vm) = self.vm.lock().as_ref() {
            vm.ssh.lock().take();
        }
    }
}
