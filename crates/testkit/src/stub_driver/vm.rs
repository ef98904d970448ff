//! What runs "on" a stub VM: the remote command contract of Appendix D (boot probe, instance
//! secret, runner check and install, `crunch-run --list/--detach/--kill`), with the VM-side
//! fault knobs (boot delay, broken, crunch-run missing, crashes, stale locks, broken reports).

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arvados::{Client, ClientConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

use super::StubConfig;
use crate::fake_crunch_run::{self, Mode};
use crate::ssh_vm::{Outcome, OutcomeFuture};

/// After it ends, how long a crunch-run's lock lingers.
#[derive(Debug, Clone, Copy)]
enum Linger {
    Until(Instant),
    Forever,
}

/// A crunch-run process on a stub VM.
struct Process {
    stop: watch::Sender<bool>,
    done: watch::Receiver<bool>,
    task: tokio::task::AbortHandle,
    /// Set when the process has ended.
    ended: Option<Linger>,
    /// Its entry in the cloud's [`LifeLog`].
    life: usize,
}

type Processes = Arc<Mutex<HashMap<String, Process>>>;

/// The state of one stub VM's "operating system".
pub(super) struct VmOs {
    cfg: StubConfig,
    created: Instant,
    /// The instance secret file, written by the init command (user data) at first boot.
    secret: Option<String>,
    files: Mutex<HashMap<String, Vec<u8>>>,
    processes: Processes,
    rng: Arc<Mutex<StdRng>>,
    /// `crunch-run --detach` calls accepted.
    pub(super) detaches: std::sync::atomic::AtomicUsize,
    detach_log: DetachLog,
    lives: LifeLog,
    vm_id: String,
}

/// Every `crunch-run --detach` command line the set's VMs received, with its stdin.
pub(super) type DetachLog = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// One crunch-run process as the stub cloud saw it live: which container, on which VM, from
/// when until when (`end` is `None` while it runs). Times are `tokio::time::Instant`s.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessLife {
    pub uuid: String,
    pub vm: String,
    pub start: Instant,
    pub end: Option<Instant>,
    /// `start` on the wall clock, to compare with the fake API's state-change times.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// It ended because its VM went away (destroyed or taken back by the cloud) while it
    /// ran: its work was lost.
    pub cut: bool,
}

/// The cloud-wide record of process lives, in start order.
pub type LifeLog = Arc<Mutex<Vec<ProcessLife>>>;

/// Mark the life at `index` ended now (if it had not ended yet).
fn end_life(lives: &LifeLog, index: usize) {
    if let Some(l) = lives.lock().get_mut(index)
        && l.end.is_none()
    {
        l.end = Some(Instant::now());
    }
}

/// An API client for these credentials, shared by every stub crunch-run in the process:
/// building one parses the system's CA bundle, which would dominate a big simulation.
fn api_client(host: &str, token: &str, insecure: &str) -> Result<Client, String> {
    type Key = (String, String, String);
    static CLIENTS: std::sync::OnceLock<Mutex<HashMap<Key, Client>>> = std::sync::OnceLock::new();
    let key = (host.to_string(), token.to_string(), insecure.to_string());
    let cache = CLIENTS.get_or_init(Default::default);
    if let Some(c) = cache.lock().get(&key) {
        return Ok(c.clone());
    }
    let c = ClientConfig::from_vars(|k| match k {
        "ARVADOS_API_HOST" => Some(host.to_string()),
        "ARVADOS_API_TOKEN" => Some(token.to_string()),
        "ARVADOS_API_HOST_INSECURE" => Some(insecure.to_string()),
        _ => None,
    })
    .and_then(Client::new)
    .map_err(|e| e.to_string())?;
    cache.lock().insert(key, c.clone());
    Ok(c)
}

/// The secret an Arvados init command writes (`echo -n "<secret>" >/var/run/arvados-instance-secret`).
fn secret_from_init(init: &str) -> Option<String> {
    let line = init
        .lines()
        .find(|l| l.contains(cloud::tags::INSTANCE_SECRET_PATH))?;
    let rest = &line[line.find("echo -n \"")? + 9..];
    Some(rest[..rest.find('"')?].to_string())
}

/// The value of `dstfile="…"` in the runner install script.
fn install_target(command: &str) -> Option<String> {
    let rest = &command[command.find("dstfile=\"")? + 9..];
    Some(rest[..rest.find('"')?].to_string())
}

fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(data))
}

fn ready(o: Outcome) -> OutcomeFuture {
    Box::pin(async move { o })
}

impl VmOs {
    pub(super) fn new(
        cfg: StubConfig,
        vm_number: usize,
        init_command: &str,
        detach_log: DetachLog,
        lives: LifeLog,
        vm_id: String,
    ) -> VmOs {
        let seed = cfg.seed ^ (vm_number as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        VmOs {
            detach_log,
            lives,
            vm_id,
            cfg,
            created: Instant::now(),
            secret: secret_from_init(init_command),
            files: Mutex::new(HashMap::new()),
            processes: Arc::new(Mutex::new(HashMap::new())),
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
            detaches: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn since_boot(&self) -> Duration {
        self.created.elapsed()
    }

    /// The VM is gone: every process dies with it, without a word to the API.
    pub(super) fn power_off(&self) {
        for p in self.processes.lock().values() {
            p.task.abort();
            if let Some(l) = self.lives.lock().get_mut(p.life)
                && l.end.is_none()
            {
                l.cut = true;
            }
            end_life(&self.lives, p.life);
        }
        self.processes.lock().clear();
    }

    pub(super) fn handle(&self, command: &str, stdin: Vec<u8>) -> OutcomeFuture {
        let command = command.strip_prefix("sudo ").unwrap_or(command).to_string();
        let up = self.since_boot();
        if self.cfg.hang_after.is_some_and(|h| up >= h) {
            return Box::pin(std::future::pending());
        }
        if up < self.cfg.boot_delay {
            return ready(Outcome::fail(1, "stub is booting"));
        }
        if self.cfg.broken_after.is_some_and(|b| up >= b) {
            return ready(Outcome::fail(2, "cannot fork"));
        }
        if command == format!("cat {}", cloud::tags::INSTANCE_SECRET_PATH) {
            return ready(match &self.secret {
                Some(s) => Outcome::ok(s.clone()),
                None => Outcome::fail(
                    1,
                    format!(
                        "cat: {}: No such file or directory",
                        cloud::tags::INSTANCE_SECRET_PATH
                    ),
                ),
            });
        }
        if command == "true" || command.starts_with("systemctl is-system-running") {
            return ready(Outcome::ok(""));
        }
        if let Some(path) = command.strip_prefix("md5sum ") {
            let path = path.trim();
            return ready(match self.files.lock().get(path) {
                Some(data) => Outcome::ok(format!("{}  {path}\n", md5_hex(data))),
                None => Outcome::fail(1, format!("md5sum: {path}: No such file or directory")),
            });
        }
        if command.contains("cat >\"$dstfile\"") {
            return ready(match install_target(&command) {
                Some(path) => {
                    self.files.lock().insert(path, stdin);
                    Outcome::ok("")
                }
                None => Outcome::fail(2, "sh: dstfile: parameter not set"),
            });
        }
        let argv: Vec<String> = command.split_whitespace().map(String::from).collect();
        let program = argv.first().cloned().unwrap_or_default();
        if !program.contains("crunch-run") {
            return ready(Outcome::fail(127, format!("{command}: command not found")));
        }
        if self.cfg.crunch_run_missing {
            return ready(Outcome::fail(1, "crunch-run: not found"));
        }
        // A deployed runner path must have been installed first.
        if program.contains('/') && !self.files.lock().contains_key(&program) {
            return ready(Outcome::fail(127, format!("sh: {program}: not found")));
        }
        let args = match fake_crunch_run::parse_args(&argv) {
            Ok(a) => a,
            Err(e) => return ready(Outcome::fail(2, e)),
        };
        match args.mode {
            Mode::List => ready(self.list()),
            Mode::Detach { uuid } => {
                self.detach_log
                    .lock()
                    .push((command.clone(), stdin.clone()));
                let out = self.detach(uuid, stdin);
                let delay = self.cfg.detach_delay;
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    out
                })
            }
            Mode::Kill { uuid, .. } => self.kill(uuid),
            Mode::Run { .. } => ready(Outcome::fail(2, "usage: crunch-run --detach")),
        }
    }

    fn list(&self) -> Outcome {
        let now = Instant::now();
        let mut procs = self.processes.lock();
        procs.retain(|_, p| match p.ended {
            Some(Linger::Until(t)) => now < t,
            _ => true,
        });
        let mut lines: Vec<String> = procs
            .iter()
            .map(|(u, p)| match p.ended {
                None => u.clone(),
                Some(_) => format!("{u} stale"),
            })
            .collect();
        lines.sort();
        if self
            .cfg
            .report_broken_after
            .is_some_and(|b| self.since_boot() >= b)
        {
            lines.push("broken".into());
        }
        Outcome::ok(lines.iter().map(|l| format!("{l}\n")).collect::<String>())
    }

    fn kill(&self, uuid: String) -> OutcomeFuture {
        let done = {
            let procs = self.processes.lock();
            procs.get(&uuid).filter(|p| p.ended.is_none()).map(|p| {
                let _ = p.stop.send(true);
                p.done.clone()
            })
        };
        Box::pin(async move {
            let Some(mut done) = done else {
                return Outcome::ok("");
            };
            match tokio::time::timeout(Duration::from_secs(1), done.wait_for(|d| *d)).await {
                Ok(_) => Outcome::ok(""),
                Err(_) => Outcome::fail(1, "container is running"),
            }
        })
    }

    /// `crunch-run --detach --stdin-config`: start driving the container in the background.
    fn detach(&self, uuid: String, stdin: Vec<u8>) -> Outcome {
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
        let insecure = env("ARVADOS_API_HOST_INSECURE");
        let client = match api_client(&host, &token, &insecure) {
            Ok(c) => c,
            Err(e) => return Outcome::fail(1, e),
        };
        let (crash_at, linger) = {
            let mut rng = self.rng.lock();
            let crash_at = (rng.random::<f64>() < self.cfg.crash_rate)
                .then(|| Duration::from_millis(rng.random_range(0..=500)));
            let max = self.cfg.stale_lock_max_linger;
            let linger = if rng.random::<f64>() < self.cfg.stale_lock_deadlock_rate {
                None
            } else if max.is_zero() {
                Some(Duration::ZERO)
            } else {
                Some(max.mul_f64(rng.random::<f64>()))
            };
            (crash_at, linger)
        };
        let mut procs = self.processes.lock();
        if procs.get(&uuid).is_some_and(|p| p.ended.is_none()) {
            return Outcome::fail(1, format!("container {uuid} is already running"));
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (done_tx, done_rx) = watch::channel(false);
        let (u, processes) = (uuid.clone(), self.processes.clone());
        let life = {
            let mut lives = self.lives.lock();
            lives.push(ProcessLife {
                uuid: uuid.clone(),
                vm: self.vm_id.clone(),
                start: Instant::now(),
                end: None,
                started_at: chrono::Utc::now(),
                cut: false,
            });
            lives.len() - 1
        };
        let lives = self.lives.clone();
        // When the cloud announces this VM's end (`InterruptionNotice` before `VanishAfter`).
        let notice_at = self
            .cfg
            .vanish_after
            .zip(self.cfg.interruption_notice)
            .map(|(vanish, notice)| self.created + vanish.saturating_sub(notice));
        let notice = notice_at.map(|t| {
            let (client, u) = (client.clone(), uuid.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(t).await;
                let attrs = serde_json::json!({"runtime_status": {
                    "warning": "preemption notice",
                    "warningDetail": "the cloud will take this spot instance back soon",
                    "preemptionNotice": chrono::Utc::now().to_rfc3339(),
                }});
                if let Err(e) = client.update_container(&u, &attrs, Some(&["uuid"])).await {
                    tracing::debug!("stub crunch-run {u}: recording the preemption notice: {e}");
                }
            })
        });
        let task = tokio::spawn(async move {
            let crash = async {
                match crash_at {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let linger = tokio::select! {
                r = fake_crunch_run::drive(&client, &u, stop_rx) => {
                    if let Err(e) = r {
                        tracing::warn!("stub crunch-run {u}: {e}");
                    }
                    match linger {
                        Some(d) => Linger::Until(Instant::now() + d),
                        None => Linger::Forever,
                    }
                }
                // A crash releases the lock at once: nothing lingers.
                _ = crash => Linger::Until(Instant::now()),
            };
            if let Some(n) = notice {
                n.abort();
            }
            end_life(&lives, life);
            if let Some(p) = processes.lock().get_mut(&u) {
                p.ended = Some(linger);
            }
            let _ = done_tx.send(true);
        });
        self.detaches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        procs.insert(
            uuid.clone(),
            Process {
                stop: stop_tx,
                done: done_rx,
                task: task.abort_handle(),
                ended: None,
                life,
            },
        );
        Outcome::ok(format!("{{\"UUID\":\"{uuid}\",\"PID\":1}}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_and_install_target_are_read_from_the_dispatchers_scripts() {
        let init = cloud::tags::user_data("abc123", "echo hi");
        assert_eq!(secret_from_init(&init).as_deref(), Some("abc123"));
        assert_eq!(secret_from_init("echo hi"), None);
        let script = "sh -c 'set -e; dstdir=\"/tmp/x/\"; dstfile=\"/tmp/x/crunch-run~ab\"; mkdir -p \"$dstdir\"; cat >\"$dstfile\"'";
        assert_eq!(
            install_target(script).as_deref(),
            Some("/tmp/x/crunch-run~ab")
        );
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
