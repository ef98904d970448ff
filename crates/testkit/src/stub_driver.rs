//! The stub cloud driver (driver name `stub`, spec Appendix B.3): every VM is an in-process
//! SSH server ([`crate::ssh_vm`]) whose `crunch-run` drives containers through the Arvados API
//! like the real one ([`crate::fake_crunch_run::drive`]).
//!
//! Knobs, from `DriverParameters` (all optional): `BootDelay` (`"0s"`: how long commands
//! answer "stub is booting"), `QuotaMaxInstances` (creates beyond it are quota errors),
//! `CrunchRunMissing` (crunch-run commands fail).
//!
//! Status: create/list/tags/destroy, quota, boot delay, host key verification, the instance
//! secret, and `crunch-run --list/--detach/--kill` are in place. Not yet: error rates, rate
//! limits between calls, held cloud ops, capacity errors, crash/stale/broken timing knobs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados::{Client, ClientConfig, InstanceType};
use cloud::{
    BoxFuture, CloudError, CreateRequest, Driver, ErrorKind, Instance, InstanceId, InstancePrice,
    InstanceSet, InstanceSetId, InstanceTags,
};
use serde_json::Value;
use tokio::sync::watch;

use crate::fake_crunch_run::{self, Mode};
use crate::ssh_vm::{CommandHandler, Outcome, OutcomeFuture, SshVm};

/// The stub driver.
#[derive(Debug, Default, Clone, Copy)]
pub struct StubDriver;

/// Knobs of one stub instance set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StubConfig {
    pub boot_delay: Duration,
    pub quota_max_instances: Option<usize>,
    pub crunch_run_missing: bool,
}

impl StubConfig {
    /// Read the knobs from `DriverParameters`; a bad value names its key.
    pub fn from_params(params: &Value) -> Result<StubConfig, CloudError> {
        let mut c = StubConfig::default();
        if let Some(v) = params.get("BootDelay") {
            let s = v
                .as_str()
                .ok_or_else(|| CloudError::other("DriverParameters.BootDelay: not a string"))?;
            c.boot_delay = arvados::config::units::parse_duration(s)
                .map_err(|e| CloudError::other(format!("DriverParameters.BootDelay: {e}")))?;
        }
        if let Some(v) = params.get("QuotaMaxInstances") {
            c.quota_max_instances = Some(v.as_u64().ok_or_else(|| {
                CloudError::other("DriverParameters.QuotaMaxInstances: not a number")
            })? as usize);
        }
        if let Some(v) = params.get("CrunchRunMissing") {
            c.crunch_run_missing = v.as_bool().ok_or_else(|| {
                CloudError::other("DriverParameters.CrunchRunMissing: not a boolean")
            })?;
        }
        Ok(c)
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

/// A stub instance set: its VMs live in this process.
pub struct StubSet {
    cfg: StubConfig,
    vms: VmList,
    next: Mutex<usize>,
}

impl StubSet {
    pub fn new(cfg: StubConfig) -> StubSet {
        StubSet {
            cfg,
            vms: Arc::new(Mutex::new(Vec::new())),
            next: Mutex::new(0),
        }
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, Vec<Arc<StubVm>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running crunch-run on a stub VM.
struct Process {
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

/// Answers the remote command contract on one stub VM.
struct VmCommands {
    booted_at: tokio::time::Instant,
    secret: String,
    crunch_run_missing: bool,
    processes: Arc<Mutex<HashMap<String, Process>>>,
}

impl VmCommands {
    fn handle(&self, command: &str, stdin: Vec<u8>) -> OutcomeFuture {
        let command = command.strip_prefix("sudo ").unwrap_or(command).to_string();
        if tokio::time::Instant::now() < self.booted_at {
            return Box::pin(async { Outcome::fail(1, "stub is booting") });
        }
        if command == format!("cat {}", cloud::tags::INSTANCE_SECRET_PATH) {
            let secret = self.secret.clone();
            return Box::pin(async move { Outcome::ok(secret) });
        }
        if command == "true" || command.starts_with("systemctl is-system-running") {
            return Box::pin(async { Outcome::ok("") });
        }
        let argv: Vec<String> = command.split_whitespace().map(String::from).collect();
        if !argv.first().is_some_and(|p| p.contains("crunch-run")) {
            return Box::pin(
                async move { Outcome::fail(1, format!("{command}: command not found")) },
            );
        }
        if self.crunch_run_missing {
            return Box::pin(async { Outcome::fail(1, "crunch-run: not found") });
        }
        let args = match fake_crunch_run::parse_args(&argv) {
            Ok(a) => a,
            Err(e) => return Box::pin(async move { Outcome::fail(2, e) }),
        };
        let processes = self.processes.clone();
        match args.mode {
            Mode::List => Box::pin(async move {
                let procs = processes.lock().unwrap_or_else(|e| e.into_inner());
                let mut live: Vec<&String> = procs
                    .iter()
                    .filter(|(_, p)| !*p.done.borrow())
                    .map(|(u, _)| u)
                    .collect();
                live.sort();
                Outcome::ok(live.iter().map(|u| format!("{u}\n")).collect::<String>())
            }),
            Mode::Detach { uuid } => Box::pin(async move { detach(processes, uuid, stdin) }),
            Mode::Kill { uuid, .. } => Box::pin(async move {
                let done = {
                    let procs = processes.lock().unwrap_or_else(|e| e.into_inner());
                    procs.get(&uuid).map(|p| {
                        let _ = p.stop.send(true);
                        p.done.clone()
                    })
                };
                let Some(mut done) = done else {
                    return Outcome::ok("");
                };
                match tokio::time::timeout(Duration::from_secs(1), done.wait_for(|d| *d)).await {
                    Ok(_) => Outcome::ok(""),
                    Err(_) => Outcome::fail(1, "container is running"),
                }
            }),
            Mode::Run { .. } => Box::pin(async { Outcome::fail(2, "usage: crunch-run --detach") }),
        }
    }
}

/// `crunch-run --detach --stdin-config`: start driving the container in the background.
fn detach(
    processes: Arc<Mutex<HashMap<String, Process>>>,
    uuid: String,
    stdin: Vec<u8>,
) -> Outcome {
    let config: Value = match serde_json::from_slice(&stdin) {
        Ok(v) => v,
        Err(e) => return Outcome::fail(1, format!("bad --stdin-config JSON: {e}")),
    };
    let env = |k: &str| config["Env"][k].as_str().unwrap_or_default().to_string();
    let (host, token) = (env("ARVADOS_API_HOST"), env("ARVADOS_API_TOKEN"));
    if host.is_empty() || token.is_empty() {
        return Outcome::fail(
            1,
            "missing ARVADOS_API_HOST or ARVADOS_API_TOKEN in config Env",
        );
    }
    let client = match ClientConfig::from_vars(|k| match k {
        "ARVADOS_API_HOST" => Some(host.clone()),
        "ARVADOS_API_TOKEN" => Some(token.clone()),
        "ARVADOS_API_HOST_INSECURE" => Some(env("ARVADOS_API_HOST_INSECURE")),
        _ => None,
    })
    .and_then(Client::new)
    {
        Ok(c) => c,
        Err(e) => return Outcome::fail(1, e.to_string()),
    };
    let mut procs = processes.lock().unwrap_or_else(|e| e.into_inner());
    if procs.get(&uuid).is_some_and(|p| !*p.done.borrow()) {
        return Outcome::fail(1, format!("container {uuid} is already running"));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, done_rx) = watch::channel(false);
    let u = uuid.clone();
    tokio::spawn(async move {
        if let Err(e) = fake_crunch_run::drive(&client, &u, stop_rx).await {
            tracing::warn!("stub crunch-run {u}: {e}");
        }
        let _ = done_tx.send(true);
    });
    procs.insert(
        uuid.clone(),
        Process {
            stop: stop_tx,
            done: done_rx,
        },
    );
    Outcome::ok(format!("{{\"UUID\":\"{uuid}\",\"PID\":1}}\n"))
}

type VmList = Arc<Mutex<Vec<Arc<StubVm>>>>;

/// One stub VM.
#[derive(Debug)]
pub struct StubVm {
    id: String,
    provider_type: String,
    tags: Mutex<InstanceTags>,
    ssh: Mutex<Option<SshVm>>,
    host_key: String,
    addr: String,
    list: std::sync::Weak<Mutex<Vec<Arc<StubVm>>>>,
}

impl Instance for StubVm {
    fn id(&self) -> InstanceId {
        self.id.clone()
    }
    fn provider_type(&self) -> String {
        self.provider_type.clone()
    }
    fn tags(&self) -> InstanceTags {
        self.tags.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn address(&self) -> String {
        self.addr.clone()
    }
    fn remote_user(&self) -> String {
        "root".into()
    }
    fn set_tags(&self, tags: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>> {
        *self.tags.lock().unwrap_or_else(|e| e.into_inner()) = tags;
        Box::pin(async { Ok(()) })
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>> {
        if let Some(list) = self.list.upgrade() {
            list.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|v| v.id != self.id);
        }
        // Dropping the server stops it.
        self.ssh.lock().unwrap_or_else(|e| e.into_inner()).take();
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

impl InstanceSet for StubSet {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        let it = it.clone();
        Box::pin(async move {
            if let Some(max) = self.cfg.quota_max_instances
                && self.vms().len() >= max
            {
                return Err(CloudError::new(ErrorKind::Quota, "stub quota exceeded"));
            }
            let authorized = cloud::sshd::authorized_keys(req.public_key.as_deref());
            let secret = req
                .tags
                .iter()
                .find(|(k, _)| k.ends_with("InstanceSecret"))
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let commands = Arc::new(VmCommands {
                booted_at: tokio::time::Instant::now() + self.cfg.boot_delay,
                secret,
                crunch_run_missing: self.cfg.crunch_run_missing,
                processes: Arc::new(Mutex::new(HashMap::new())),
            });
            let handler: Arc<dyn CommandHandler> =
                Arc::new(move |_user: &str, cmd: &str, stdin: Vec<u8>| commands.handle(cmd, stdin));
            let ssh = SshVm::start(handler, authorized)
                .await
                .map_err(|e| CloudError::other(format!("starting stub VM: {e}")))?;
            let n = {
                let mut n = self.next.lock().unwrap_or_else(|e| e.into_inner());
                *n += 1;
                *n
            };
            let vm = Arc::new(StubVm {
                id: format!("inst{n},{}", it.provider_type),
                provider_type: it.provider_type.clone(),
                tags: Mutex::new(req.tags),
                host_key: ssh.host_key().to_openssh().unwrap_or_default(),
                addr: ssh.addr().to_string(),
                ssh: Mutex::new(Some(ssh)),
                list: Arc::downgrade(&self.vms),
            });
            self.vms().push(vm.clone());
            Ok(vm as Arc<dyn Instance>)
        })
    }

    fn instances(
        &self,
        _filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let v: Vec<Arc<dyn Instance>> = self
            .vms()
            .iter()
            .map(|v| v.clone() as Arc<dyn Instance>)
            .collect();
        Box::pin(async move { Ok(v) })
    }

    /// First character of the provider type, `-p` for preemptible types.
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        let mut g: String = it.provider_type.chars().take(1).collect();
        if it.preemptible {
            g.push_str("-p");
        }
        g
    }

    fn stop(&self) {}
}
