//! `arvados-dispatch-cloud cloudtest` (spec §10.5): prove that a cloud configuration works
//! before the dispatcher depends on it. Create one VM exactly as the dispatcher would (tags,
//! init command, image, public key), see it listed with its tags, wait for the boot probe
//! over SSH (host verified like the pool does), run an optional command, destroy it and wait
//! until it is gone. One line per step with timings; the VM is destroyed whatever happens,
//! also when cancelled (Ctrl-C).
//!
//! Not done (EC2-specific): one run per subnet when `SubnetID` lists several.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use arvados::InstanceType;
use cloud::tags::TagKeys;
use cloud::{CreateRequest, Instance, InstanceSet, InstanceTags};
use russh::keys::PrivateKey;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ssh_executor::{Executor, Target, Timeouts};

/// The default InstanceSetID of test VMs (not the dispatcher's own, so it never adopts them).
pub const DEFAULT_INSTANCE_SET_ID: &str = "zzzzz-zzzzz-zzzzzzcloudtest";

/// Everything one run needs.
pub struct CloudTest {
    pub set: Arc<dyn InstanceSet>,
    pub instance_set_id: String,
    pub tag_keys: TagKeys,
    /// `CloudVMs.ResourceTags`: must be on the VM.
    pub resource_tags: InstanceTags,
    pub instance_type: InstanceType,
    pub image_id: String,
    /// `CloudVMs.InstanceInitCommand`.
    pub instance_init_command: String,
    /// Installed on the VM when `CloudVMs.DeployPublicKey`.
    pub public_key: Option<String>,
    pub private_key: Arc<PrivateKey>,
    pub ssh_port: String,
    pub boot_probe_command: String,
    pub probe_interval: Duration,
    pub timeout_booting: Duration,
    pub sync_interval: Duration,
    pub destroy_existing: bool,
    /// Shell command to run once booted.
    pub command: Option<String>,
}

/// Prints timed step lines.
struct Log<'a> {
    start: Instant,
    out: &'a mut (dyn Write + Send),
}

impl Log<'_> {
    fn line(&mut self, text: impl AsRef<str>) {
        let t = self.start.elapsed().as_secs_f64();
        let _ = writeln!(self.out, "[{t:>9.3}s] {}", text.as_ref());
        let _ = self.out.flush();
    }
}

/// Why a run stopped early.
enum Stop {
    Failed,
    Cancelled,
}

/// Sleep, unless cancelled first.
async fn pause(d: Duration, cancel: &CancellationToken) -> Result<(), Stop> {
    if cancel.is_cancelled() {
        return Err(Stop::Cancelled);
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = cancel.cancelled() => Err(Stop::Cancelled),
    }
}

impl CloudTest {
    fn filter(&self) -> InstanceTags {
        [(
            self.tag_keys.instance_set_id(),
            self.instance_set_id.clone(),
        )]
        .into()
    }

    async fn listed(&self) -> Result<Vec<Arc<dyn Instance>>, cloud::CloudError> {
        self.set.instances(&self.filter()).await
    }

    /// Run every step; `true` only if all passed. Writes one line per step to `out`.
    /// Cancelling `cancel` skips to the destroy step.
    pub async fn run(&self, out: &mut (dyn Write + Send), cancel: CancellationToken) -> bool {
        let mut log = Log {
            start: Instant::now(),
            out,
        };
        let mut created: Option<Arc<dyn Instance>> = None;
        let result = self.steps(&mut log, &cancel, &mut created).await;
        if let Err(Stop::Cancelled) = result {
            log.line("cancelled");
        }
        let destroyed = match &created {
            Some(vm) => self.destroy(&mut log, vm.clone()).await,
            None => true,
        };
        let ok = result.is_ok() && destroyed;
        log.line(if ok {
            "PASS: all steps succeeded"
        } else {
            "FAIL"
        });
        ok
    }

    async fn steps(
        &self,
        log: &mut Log<'_>,
        cancel: &CancellationToken,
        created: &mut Option<Arc<dyn Instance>>,
    ) -> Result<(), Stop> {
        // 1. Nothing of ours may exist already.
        loop {
            let existing = match self.listed().await {
                Ok(l) => l,
                Err(e) => {
                    log.line(format!("list existing instances: FAILED: {e}"));
                    return Err(Stop::Failed);
                }
            };
            if existing.is_empty() {
                log.line(format!(
                    "list existing instances with {}={}: ok, none",
                    self.tag_keys.instance_set_id(),
                    self.instance_set_id
                ));
                break;
            }
            let ids: Vec<String> = existing.iter().map(|i| i.id()).collect();
            if !self.destroy_existing {
                log.line(format!(
                    "list existing instances: FAILED: found {} (use --destroy-existing to destroy them)",
                    ids.join(", ")
                ));
                return Err(Stop::Failed);
            }
            for vm in &existing {
                match vm.destroy().await {
                    Ok(()) => log.line(format!("destroy existing instance {}: ok", vm.id())),
                    Err(e) => {
                        log.line(format!("destroy existing instance {}: error: {e}", vm.id()))
                    }
                }
            }
            pause(self.sync_interval, cancel).await?;
        }

        // 2. Create, as the dispatcher would.
        let secret = cloud::tags::new_instance_secret();
        let mut tags = self.resource_tags.clone();
        tags.insert(
            self.tag_keys.cloud_test_pid(),
            std::process::id().to_string(),
        );
        tags.insert(
            self.tag_keys.instance_set_id(),
            self.instance_set_id.clone(),
        );
        tags.insert(self.tag_keys.instance_secret(), secret.clone());
        tags.insert(
            self.tag_keys.instance_type(),
            self.instance_type.name.clone(),
        );
        let request = CreateRequest {
            image_id: self.image_id.clone(),
            tags: tags.clone(),
            init_command: cloud::tags::init_command(&secret, &self.instance_init_command),
            public_key: self.public_key.clone(),
            zone: None,
        };
        let t0 = Instant::now();
        let create_error = match self.set.create(&self.instance_type, request).await {
            Ok(vm) => {
                log.line(format!(
                    "create instance (type {}, provider type {}, image {:?}): ok, {} in {:.3}s",
                    self.instance_type.name,
                    self.instance_type.provider_type,
                    self.image_id,
                    vm.id(),
                    t0.elapsed().as_secs_f64()
                ));
                None
            }
            Err(e) => {
                log.line(format!(
                    "create instance (type {}): error: {e}; looking for it in the list anyway",
                    self.instance_type.name
                ));
                Some(e)
            }
        };

        // 3. Listed with its tags (after a create error, keep looking until TimeoutBooting,
        // since the VM may exist anyway).
        let deadline = Instant::now() + self.timeout_booting;
        let vm = loop {
            match self.listed().await {
                Ok(list) => {
                    if let Some(vm) = list
                        .into_iter()
                        .find(|i| i.tags().get(&self.tag_keys.instance_secret()) == Some(&secret))
                    {
                        break vm;
                    }
                }
                Err(e) => log.line(format!("list instances: error: {e}")),
            }
            if create_error.is_some() && Instant::now() < deadline {
                pause(self.sync_interval.min(self.timeout_booting), cancel).await?;
                continue;
            }
            log.line("find created instance in the list: FAILED: not listed");
            return Err(Stop::Failed);
        };
        *created = Some(vm.clone());
        log.line(format!(
            "find created instance in the list: ok, {}",
            vm.id()
        ));
        let have = vm.tags();
        let missing: Vec<&String> = self
            .resource_tags
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        if !missing.is_empty() {
            log.line(format!(
                "check ResourceTags on the instance: FAILED: missing {missing:?}"
            ));
            return Err(Stop::Failed);
        }
        log.line(format!(
            "check ResourceTags on the instance: ok ({} tags)",
            self.resource_tags.len()
        ));

        // 4. Boot probe until it succeeds or TimeoutBooting.
        let target = Target {
            instance: vm.clone(),
            secret: Some(secret),
            on_verified: None,
        };
        let timeouts = Timeouts {
            connect: self.timeout_booting.min(Duration::from_secs(60)),
            command: self.timeout_booting.min(Duration::from_secs(60)),
        };
        let exec = Executor::new(target, self.private_key.clone(), &self.ssh_port, timeouts);
        let probe = if self.boot_probe_command.is_empty() {
            "true"
        } else {
            &self.boot_probe_command
        };
        let (t0, deadline) = (Instant::now(), Instant::now() + self.timeout_booting);
        let mut attempts = 0;
        let mut last_error = String::from("no answer");
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let r = tokio::select! {
                r = tokio::time::timeout(left, exec.execute(&[], probe, b"")) => r,
                _ = cancel.cancelled() => return Err(Stop::Cancelled),
            };
            match r {
                Ok(Ok(_)) => break,
                Ok(Err(f)) => {
                    last_error =
                        format!("{f}: {}", String::from_utf8_lossy(&f.output.stderr).trim())
                }
                // Cut off by the deadline: the previous answer stays the last error.
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                log.line(format!(
                    "boot probe {probe:?}: FAILED after {attempts} attempts in {:.3}s (TimeoutBooting {:?}); last error: {last_error}",
                    t0.elapsed().as_secs_f64(),
                    self.timeout_booting
                ));
                return Err(Stop::Failed);
            }
            pause(self.probe_interval.min(left), cancel).await?;
        }
        log.line(format!(
            "boot probe {probe:?}: ok after {attempts} attempts in {:.3}s",
            t0.elapsed().as_secs_f64()
        ));
        let host_port = exec.target_host_port();
        let (host, port) = host_port
            .rsplit_once(':')
            .unwrap_or((host_port.as_str(), "22"));
        log.line(format!(
            "to log in: ssh -p{port} {}@{host}",
            vm.remote_user()
        ));

        // 5. The operator's command.
        if let Some(command) = &self.command {
            let t0 = Instant::now();
            let r = exec.execute(&[], command, b"").await;
            let took = t0.elapsed().as_secs_f64();
            match r {
                Ok(o) => log.line(format!(
                    "command {command:?}: ok in {took:.3}s; stdout: {:?}",
                    String::from_utf8_lossy(&o.stdout)
                )),
                Err(f) => {
                    log.line(format!(
                        "command {command:?}: FAILED in {took:.3}s: {f}; stderr: {:?}",
                        String::from_utf8_lossy(&f.output.stderr)
                    ));
                    exec.close();
                    return Err(Stop::Failed);
                }
            }
        }
        exec.close();
        Ok(())
    }

    /// Destroy and wait until gone; retries forever (sleeping `SyncInterval`), as a VM left
    /// running costs money.
    async fn destroy(&self, log: &mut Log<'_>, vm: Arc<dyn Instance>) -> bool {
        let t0 = Instant::now();
        loop {
            if let Err(e) = vm.destroy().await {
                log.line(format!("destroy {}: error: {e}; retrying", vm.id()));
                tokio::time::sleep(self.sync_interval).await;
                continue;
            }
            match self.listed().await {
                Ok(l) if !l.iter().any(|i| i.id() == vm.id()) => {
                    log.line(format!(
                        "destroy {} and wait until it is gone: ok in {:.3}s",
                        vm.id(),
                        t0.elapsed().as_secs_f64()
                    ));
                    return true;
                }
                Ok(_) => {}
                Err(e) => log.line(format!("list after destroy: error: {e}")),
            }
            tokio::time::sleep(self.sync_interval).await;
        }
    }
}
