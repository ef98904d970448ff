//! The stub cloud driver (driver name `stub`, spec Appendix B.3): every VM is an in-process
//! SSH server ([`crate::ssh_vm`]) with its own host key, whose "operating system"
//! (`vm`) answers the remote command contract and whose `crunch-run` drives containers
//! through the Arvados API like the real one ([`crate::fake_crunch_run::drive`]).
//!
//! Faults are knobs ([`StubConfig`], read from `DriverParameters`): cloud-side (error rates,
//! rate limits between calls, quota, capacity per type, zones tried as EC2's subnets with
//! `Zones`, a type short for a while (everywhere or in one zone) with `ShortOfCapacityUntil`,
//! held operations) here; VM-side (boot delay, broken, hung, crunch-run
//! missing, crashes, stale locks, broken reports, spot interruption notices before
//! `VanishAfter`) in `vm`, per VM by creation count with `VmProfiles`, broken types for a while
//! with `BrokenTypesUntil`. The set keeps its own records: every create's outcome
//! ([`StubSet::launch_log`]), every VM ([`StubSet::vm_history`]) and every crunch-run life
//! ([`StubSet::process_lives`], with lives cut by their VM's loss marked).
//! Randomness is seeded (`Seed`): each VM and the set have their own seeded generator.
//!
//! A VM learns its instance secret the way a real one does: from the init command (user data)
//! it was created with. Destroying a VM kills its crunch-run processes without an API update,
//! as a real power-off would.

mod knobs;
mod vm;

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arvados::InstanceType;
use cloud::{
    BoxFuture, CloudError, CreateRequest, Driver, ErrorKind, Instance, InstanceId, InstancePrice,
    InstanceSet, InstanceSetId, InstanceTags,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::ssh_vm::{CommandHandler, SshVm};
pub use knobs::StubConfig;
use vm::VmOs;

/// The stub driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct StubDriver;

/// The command handler of a stub VM (boot probe, instance secret from `init_command`, runner
/// install, crunch-run) with `cfg`'s VM-side knobs, for serving a VM some other cloud fake
/// created (moto's, say) with [`crate::ssh_vm::SshVm::start_on`].
pub fn vm_handler(cfg: StubConfig, init_command: &str) -> Arc<dyn CommandHandler> {
    vm_handler_recording(cfg, init_command, "vm0", Default::default())
}

/// [`vm_handler`] for the VM `vm_id`, recording every crunch-run life in `lives` (one log
/// shared by all of a harness's VMs is the cloud's record for [`crate::oracle::double_runs`]).
pub fn vm_handler_recording(
    cfg: StubConfig,
    init_command: &str,
    vm_id: &str,
    lives: LifeLog,
) -> Arc<dyn CommandHandler> {
    let os = Arc::new(VmOs::new(
        cfg,
        0,
        init_command,
        Default::default(),
        lives,
        vm_id.into(),
    ));
    Arc::new(move |_user: &str, cmd: &str, stdin: Vec<u8>| os.handle(cmd, stdin))
}

/// A driver that always hands out the same stub cloud, so a test, `simulate` or two services
/// can share it and judge what happened from the cloud's own record.
pub struct SharedStubDriver(pub Arc<StubSet>);

impl Driver for SharedStubDriver {
    fn instance_set(
        &self,
        _params: &Value,
        _id: &InstanceSetId,
        _shared_tags: &InstanceTags,
    ) -> Result<Arc<dyn InstanceSet>, CloudError> {
        Ok(self.0.clone())
    }
}

impl Driver for StubDriver {
    fn instance_set(
        &self,
        params: &Value,
        _id: &InstanceSetId,
        _shared_tags: &InstanceTags,
    ) -> Result<Arc<dyn InstanceSet>, CloudError> {
        Ok(Arc::new(StubSet::new(StubConfig::from_params(params)?)))
    }
}

type VmList = Arc<Mutex<Vec<Arc<StubVm>>>>;

/// One VM the stub cloud ever made: when, and when its boot delay ends (ready as the cloud
/// sees it).
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub id: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub ready_at: chrono::DateTime<chrono::Utc>,
}

/// One create call the stub cloud answered, and how (the cloud's own record of launches:
/// `simulate` counts the wasted ones from it).
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchRecord {
    pub at: chrono::DateTime<chrono::Utc>,
    pub provider_type: String,
    pub preemptible: bool,
    /// The zone tried (empty: the cloud has none).
    pub zone: String,
    /// `None`: a VM was made. Otherwise the error's kind: `capacity`, `quota`, `rate-limit`,
    /// `other`.
    pub failed: Option<&'static str>,
}

/// Cloud-side state shared by a set and its VMs.
struct Cloud {
    cfg: StubConfig,
    vms: VmList,
    /// Every VM ever made, in creation order.
    history: Mutex<Vec<VmRecord>>,
    /// Every create call answered, in order.
    launches: Mutex<Vec<LaunchRecord>>,
    rng: Mutex<StdRng>,
    /// Held create/destroy calls wait for a permit (`HoldCloudOps`).
    held: Semaphore,
    /// VMs report the cloud's interruption notices ([`InstanceSet::watch_interruptions`]).
    watch_interruptions: std::sync::atomic::AtomicBool,
    started: Instant,
    detach_log: vm::DetachLog,
    lives: vm::LifeLog,
}

impl Cloud {
    /// A dead endpoint (`HangCloudOps`): never answer.
    async fn hang_if_dead(&self) {
        if self.cfg.hang_cloud_ops {
            std::future::pending::<()>().await;
        }
    }

    async fn hold(&self) {
        if self.cfg.hold_cloud_ops
            && let Ok(p) = self.held.acquire().await
        {
            p.forget();
        }
    }

    /// How long `it` is short of capacity (in `zone`) from the start, if it is at all
    /// (`ShortOfCapacityUntil`): the longest of the knobs that apply.
    fn short_until(&self, it: &InstanceType, zone: Option<&str>) -> Option<Duration> {
        let mut keys = vec![it.provider_type.clone()];
        if it.preemptible {
            keys.push(format!("{}-preemptible", it.provider_type));
        }
        if let Some(z) = zone {
            keys.extend(keys.clone().into_iter().map(|k| format!("{k}@{z}")));
        }
        keys.iter()
            .filter_map(|k| self.cfg.short_of_capacity_until.get(k))
            .max()
            .copied()
    }

    fn unlucky(&self, rate: f64) -> bool {
        rate > 0.0 && self.rng.lock().random::<f64>() < rate
    }
}

/// Rate limiting by minimum time between accepted calls; a refused call does not count.
struct MinInterval {
    min: Duration,
    next_allowed: Mutex<Option<Instant>>,
}

impl MinInterval {
    fn new(min: Duration) -> MinInterval {
        MinInterval {
            min,
            next_allowed: Mutex::new(None),
        }
    }

    fn check(&self) -> Result<(), CloudError> {
        if self.min.is_zero() {
            return Ok(());
        }
        let now = Instant::now();
        let mut next = self.next_allowed.lock();
        if let Some(t) = *next
            && now < t
        {
            let until = SystemTime::now() + (t - now);
            let at = chrono::DateTime::<chrono::Utc>::from(until);
            return Err(CloudError::new(
                ErrorKind::RateLimit {
                    earliest_retry: until,
                },
                format!("rate limited until {}", at.to_rfc3339()),
            ));
        }
        *next = Some(now + self.min);
        Ok(())
    }
}

/// A stub instance set: its VMs live in this process.
pub struct StubSet {
    cloud: Arc<Cloud>,
    next: Mutex<usize>,
    /// The zone an unpinned create tries first (the last that worked, as Arvados' EC2 driver
    /// keeps one subnet index for every type).
    zone_index: Mutex<usize>,
    create_interval: MinInterval,
    list_interval: MinInterval,
    /// Where the VMs' SSH servers (and the crunch-runs they start) run; by default the
    /// caller's runtime.
    vm_runtime: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl StubSet {
    pub fn new(cfg: StubConfig) -> StubSet {
        StubSet {
            create_interval: MinInterval::new(cfg.min_time_between_create_calls),
            list_interval: MinInterval::new(cfg.min_time_between_instances_calls),
            cloud: Arc::new(Cloud {
                rng: Mutex::new(StdRng::seed_from_u64(cfg.seed)),
                cfg,
                vms: Arc::new(Mutex::new(Vec::new())),
                history: Default::default(),
                launches: Default::default(),
                held: Semaphore::new(0),
                watch_interruptions: Default::default(),
                started: Instant::now(),
                detach_log: Default::default(),
                lives: Default::default(),
            }),
            next: Mutex::new(0),
            zone_index: Mutex::new(0),
            vm_runtime: Default::default(),
        }
    }

    /// Run every VM made from now on (its SSH server, and the fake crunch-runs it starts) on
    /// `rt` instead of the runtime that calls `create`: `simulate` keeps the cloud's work off
    /// the dispatcher's runtime, so the two can be measured apart.
    pub fn run_vms_on(&self, rt: tokio::runtime::Handle) {
        let _ = self.vm_runtime.set(rt);
    }

    /// Let `n` held create/destroy calls proceed (`HoldCloudOps`).
    pub fn release_cloud_ops(&self, n: usize) {
        self.cloud.held.add_permits(n);
    }

    /// Every `crunch-run --detach` command line (after any `sudo `) the set's VMs received,
    /// with its stdin, in order.
    pub fn detach_log(&self) -> Vec<(String, Vec<u8>)> {
        self.cloud.detach_log.lock().clone()
    }

    /// Every VM now in the set.
    pub fn vms(&self) -> Vec<Arc<StubVm>> {
        self.cloud.vms.lock().clone()
    }

    /// From now on every command on the VMs the set has now answers `d` later (a slow network
    /// or overloaded VMs); VMs created later are not slowed.
    pub fn set_command_delay(&self, d: Duration) {
        for vm in self.vms() {
            vm.set_command_delay(d);
        }
    }

    /// Every VM the set ever made, in creation order (the cloud's own record).
    pub fn vm_history(&self) -> Vec<VmRecord> {
        self.cloud.history.lock().clone()
    }

    /// Every create call the set answered, in order (the cloud's own record of launches).
    pub fn launch_log(&self) -> Vec<LaunchRecord> {
        self.cloud.launches.lock().clone()
    }

    /// Every crunch-run process that ever ran on the set's VMs, in start order: the cloud's
    /// own record, independent of the dispatcher's bookkeeping (see [`crate::oracle`]).
    pub fn process_lives(&self) -> Vec<ProcessLife> {
        self.cloud.lives.lock().clone()
    }
}

pub use vm::{LifeLog, ProcessLife};

/// One stub VM.
pub struct StubVm {
    id: String,
    provider_type: String,
    tags: Mutex<InstanceTags>,
    ssh: Mutex<Option<SshVm>>,
    os: Arc<VmOs>,
    host_key: String,
    addr: String,
    init_command: String,
    /// When the cloud takes it away (`VanishAfter`).
    vanish_at: Option<Instant>,
    /// When the cloud announces that (`InterruptionNotice` before `vanish_at`).
    notice_at: Option<Instant>,
    /// Its commands answer this much later (see [`StubSet::set_command_delay`]).
    command_delay_ms: Arc<std::sync::atomic::AtomicU64>,
    cloud: std::sync::Weak<Cloud>,
}

impl std::fmt::Debug for StubVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StubVm")
            .field("id", &self.id)
            .field("addr", &self.addr)
            .finish()
    }
}

impl StubVm {
    /// The init command it was created with.
    pub fn init_command(&self) -> &str {
        &self.init_command
    }

    /// How many `crunch-run --detach` calls it accepted.
    pub fn detach_count(&self) -> usize {
        self.os.detaches.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From now on its commands answer `d` later (a slow network or an overloaded VM).
    pub fn set_command_delay(&self, d: Duration) {
        self.command_delay_ms
            .store(d.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    /// Power the VM off at once (no cloud call, no error rate): as if it crashed. It stays
    /// listed, unreachable.
    pub fn crash(&self) {
        self.os.power_off();
        self.ssh.lock().take();
    }
}

impl Instance for StubVm {
    fn id(&self) -> InstanceId {
        self.id.clone()
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
        "root".into()
    }
    fn set_tags(&self, tags: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>> {
        *self.tags.lock() = tags;
        Box::pin(async { Ok(()) })
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(async move {
            let Some(cloud) = self.cloud.upgrade() else {
                return Ok(());
            };
            cloud.hold().await;
            if cloud.unlucky(cloud.cfg.error_rate_destroy) {
                return Err(CloudError::other(format!(
                    "stub: destroy {} failed (ErrorRateDestroy)",
                    self.id
                )));
            }
            cloud.vms.lock().retain(|v| v.id != self.id);
            self.crash();
            Ok(())
        })
    }
    fn price_history(&self, _it: &InstanceType) -> Vec<InstancePrice> {
        Vec::new()
    }
    fn verify_host_key(&self, key: &str) -> BoxFuture<'_, Result<(), CloudError>> {
        let r = cloud::sshd::check_host_key(&self.host_key, key);
        Box::pin(async move { r })
    }
    /// Once the cloud has announced its end (`InterruptionNotice` before `VanishAfter`), to
    /// a set that watches.
    fn interruption_notice(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let cloud = self.cloud.upgrade()?;
        if !cloud
            .watch_interruptions
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return None;
        }
        let at = self.notice_at?;
        let ago = Instant::now().checked_duration_since(at)?;
        Some(chrono::Utc::now() - chrono::Duration::from_std(ago).unwrap_or_default())
    }
}

impl StubSet {
    /// What one launch in `zone` answers, before the launch log records it.
    async fn create_vm(
        &self,
        it: &InstanceType,
        req: CreateRequest,
        zone: Option<&str>,
    ) -> Result<Arc<dyn Instance>, CloudError> {
        let cloud = &self.cloud;
        cloud.hang_if_dead().await;
        cloud.hold().await;
        self.create_interval.check()?;
        if let Some(until) = cloud.short_until(it, zone)
            && cloud.started.elapsed() < until
        {
            let place = zone.map(|z| format!(" in zone {z}")).unwrap_or_default();
            return Err(CloudError::new(
                ErrorKind::Capacity {
                    instance_type_specific: true,
                    quota_group_specific: false,
                },
                format!(
                    "stub: {} is short of capacity{place} (ShortOfCapacityUntil)",
                    it.provider_type
                ),
            ));
        }
        if cloud.unlucky(cloud.cfg.error_rate_create) {
            return Err(CloudError::other("stub: create failed (ErrorRateCreate)"));
        }
        {
            let vms = cloud.vms.lock();
            if let Some(max) = cloud.cfg.quota_max_instances
                && vms.len() >= max
            {
                return Err(CloudError::new(ErrorKind::Quota, "stub quota exceeded"));
            }
            if let Some(&cap) = cloud.cfg.capacity_per_type.get(&it.provider_type)
                && vms
                    .iter()
                    .filter(|v| v.provider_type == it.provider_type)
                    .count()
                    >= cap
            {
                return Err(CloudError::new(
                    ErrorKind::Capacity {
                        instance_type_specific: true,
                        quota_group_specific: false,
                    },
                    format!("stub: no capacity for {}", it.provider_type),
                ));
            }
        }
        let n = {
            let mut n = self.next.lock();
            *n += 1;
            *n
        };
        let authorized = cloud::sshd::authorized_keys(req.public_key.as_deref());
        // This VM's knobs: its profile (by creation count); a type still broken never boots.
        let mut vm_cfg = match cloud.cfg.vm_profiles.len() {
            0 => cloud.cfg.clone(),
            len => cloud.cfg.vm_profiles[(n - 1) % len].clone(),
        };
        if let Some(until) = cloud.cfg.broken_types_until.get(&it.provider_type)
            && cloud.started.elapsed() < *until
        {
            vm_cfg.boot_delay = Duration::from_secs(365 * 24 * 3600);
        }
        let vanish_at = vm_cfg.vanish_after.map(|d| Instant::now() + d);
        let notice_at = vanish_at
            .zip(vm_cfg.interruption_notice)
            .map(|(t, d)| t.checked_sub(d).unwrap_or(t));
        let now = chrono::Utc::now();
        cloud.history.lock().push(VmRecord {
            id: format!("inst{n},{}", it.provider_type),
            created_at: now,
            ready_at: now + chrono::Duration::from_std(vm_cfg.boot_delay).unwrap_or_default(),
        });
        let os = Arc::new(VmOs::new(
            vm_cfg,
            n,
            &req.init_command,
            cloud.detach_log.clone(),
            cloud.lives.clone(),
            format!("inst{n},{}", it.provider_type),
        ));
        let handler_os = os.clone();
        let command_delay_ms: Arc<std::sync::atomic::AtomicU64> = Default::default();
        let delay = command_delay_ms.clone();
        let handler: Arc<dyn CommandHandler> =
            Arc::new(move |_user: &str, cmd: &str, stdin: Vec<u8>| {
                let ms = delay.load(std::sync::atomic::Ordering::SeqCst);
                let out = handler_os.handle(cmd, stdin);
                if ms == 0 {
                    return out;
                }
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    out.await
                })
            });
        let ssh = match self.vm_runtime.get() {
            Some(rt) => rt
                .spawn(SshVm::start(handler, authorized))
                .await
                .map_err(|e| CloudError::other(format!("starting stub VM: {e}")))?,
            None => SshVm::start(handler, authorized).await,
        }
        .map_err(|e| CloudError::other(format!("starting stub VM: {e}")))?;
        let vm = Arc::new(StubVm {
            id: format!("inst{n},{}", it.provider_type),
            provider_type: it.provider_type.clone(),
            tags: Mutex::new(req.tags),
            host_key: ssh.host_key().to_openssh().unwrap_or_default(),
            addr: ssh.addr().to_string(),
            ssh: Mutex::new(Some(ssh)),
            init_command: req.init_command.clone(),
            vanish_at,
            notice_at,
            command_delay_ms,
            os,
            cloud: Arc::downgrade(cloud),
        });
        cloud.vms.lock().push(vm.clone());
        // The VM exists now; the answer may still go wrong.
        if cloud.unlucky(cloud.cfg.hang_rate_create_after_vm) {
            std::future::pending::<()>().await;
        }
        if cloud.unlucky(cloud.cfg.error_rate_create_after_vm) {
            return Err(CloudError {
                outcome_unknown: true,
                ..CloudError::other(
                    "stub: create failed after making the VM (ErrorRateCreateAfterVm)",
                )
            });
        }
        Ok(vm as Arc<dyn Instance>)
    }
}

impl InstanceSet for StubSet {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        let it = it.clone();
        Box::pin(async move {
            let zones = &self.cloud.cfg.zones;
            // The zones to try, in order: the pinned one, or all from the last that worked.
            let tries: Vec<Option<usize>> = match &req.zone {
                Some(z) => vec![zones.iter().position(|k| k == z)],
                None if zones.is_empty() => vec![None],
                None => {
                    let start = *self.zone_index.lock();
                    (0..zones.len())
                        .map(|i| Some((start + i) % zones.len()))
                        .collect()
                }
            };
            let n = tries.len();
            let mut result = Err(CloudError::other("stub: no zone to try"));
            for (i, zone) in tries.into_iter().enumerate() {
                let name = zone.map(|z| zones[z].as_str());
                result = match (&req.zone, zone) {
                    (Some(z), None) => Err(CloudError::other(format!("stub: no zone {z}"))),
                    _ => self.create_vm(&it, req.clone(), name).await,
                };
                self.cloud.launches.lock().push(LaunchRecord {
                    at: chrono::Utc::now(),
                    provider_type: it.provider_type.clone(),
                    preemptible: it.preemptible,
                    zone: name.unwrap_or_default().to_string(),
                    failed: result.as_ref().err().map(|e| match e.kind {
                        ErrorKind::Capacity { .. } => "capacity",
                        ErrorKind::Quota => "quota",
                        ErrorKind::RateLimit { .. } => "rate-limit",
                        _ => "other",
                    }),
                });
                if req.zone.is_none()
                    && let Some(z) = zone
                {
                    *self.zone_index.lock() = z;
                }
                match &result {
                    Err(e) if e.is_capacity() && i + 1 < n => continue,
                    _ => break,
                }
            }
            result
        })
    }

    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        if self.cloud.cfg.hang_cloud_ops {
            return Box::pin(std::future::pending());
        }
        let now = Instant::now();
        let vanished: Vec<Arc<StubVm>> = {
            let mut vms = self.cloud.vms.lock();
            let (gone, kept): (Vec<_>, Vec<_>) = vms
                .drain(..)
                .partition(|v| v.vanish_at.is_some_and(|t| now >= t));
            *vms = kept;
            gone
        };
        for v in vanished {
            v.crash();
        }
        let r = self.list_interval.check().map(|()| {
            self.cloud
                .vms
                .lock()
                .iter()
                .filter(|v| {
                    let tags = v.tags();
                    filter.iter().all(|(k, want)| tags.get(k) == Some(want))
                })
                .map(|v| v.clone() as Arc<dyn Instance>)
                .collect()
        });
        Box::pin(async move { r })
    }

    /// First character of the provider type, `-p` for preemptible types.
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        let mut g: String = it.provider_type.chars().take(1).collect();
        if it.preemptible {
            g.push_str("-p");
        }
        g
    }

    fn zones(&self) -> Vec<String> {
        self.cloud.cfg.zones.clone()
    }

    fn watch_interruptions(&self) {
        self.cloud
            .watch_interruptions
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn stop(&self) {}
}
