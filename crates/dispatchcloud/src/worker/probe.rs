//! Probing (spec §8.7–8.10): the probe loop, and one worker's probe — boot probe (host
//! verification happens in the executor on connect), runner deployment, run probe
//! (`crunch-run --list`), then the state update under the lock.

use std::collections::BTreeSet;
use std::sync::Arc;

use arvados::InstanceType;
use cloud::Instance;
use tokio::time::{Duration, Instant};

use super::runner::Runner;
use super::runner::close_runner;
use super::{Pool, State, config};
use crate::ssh_executor::{ExecError, Executor};
use crate::worker_state::{Action, Event, IdleBehavior, WorkerState};

/// What a run probe found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListReport {
    /// Containers with a live crunch-run.
    pub uuids: Vec<String>,
    /// Containers whose crunch-run exited but whose lock is still held.
    pub stale: Vec<String>,
    pub broken: bool,
}

/// Whether `s` is exactly a container uuid (`<cluster>-dz642-<15 characters>`, lowercase
/// letters and digits) of `cluster_id` (any cluster if `cluster_id` is empty).
pub fn is_container_uuid(s: &str, cluster_id: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |x: &[u8]| {
        x.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    b.len() == 27
        && alnum(&b[..5])
        && &b[5..12] == b"-dz642-"
        && alnum(&b[12..])
        && (cluster_id.is_empty() || &s[..5] == cluster_id)
}

/// Parse `crunch-run --list` output: this cluster's lines only (`cluster_id` empty: all).
/// Better than Go, which takes any line starting with the cluster id: a line is accepted only
/// if it is exactly a container uuid, optionally followed by ` stale`. Whatever a worker prints
/// ends up in later commands (`--kill`) and API calls, so nothing else gets through.
pub fn parse_list(stdout: &str, cluster_id: &str) -> ListReport {
    let mut r = ListReport::default();
    for line in stdout.lines().map(str::trim) {
        if line.is_empty() {
            continue;
        }
        if line == "broken" {
            r.broken = true;
            continue;
        }
        if !line.starts_with(cluster_id) {
            continue;
        }
        let (uuid, stale) = match line.split_once(' ') {
            Some((u, "stale")) => (u, true),
            Some(_) => ("", false),
            None => (line, false),
        };
        if !is_container_uuid(uuid, cluster_id) {
            tracing::warn!(
                line,
                "ignoring line in crunch-run --list output that is not a container uuid"
            );
            continue;
        }
        if stale {
            r.stale.push(uuid.to_string());
        } else {
            r.uuids.push(uuid.to_string());
        }
    }
    r
}

/// A snapshot taken at the start of a probe.
struct Snapshot {
    exec: Arc<Executor>,
    instance: Arc<dyn Instance>,
    it: Arc<InstanceType>,
    state: WorkerState,
    updated: Instant,
    proc_gen: u64,
}

impl Pool {
    pub(super) async fn probe_loop(self: Arc<Self>) {
        loop {
            let ids: Vec<String> = {
                let now = Instant::now();
                let mut st = self.lock();
                let mut ids = Vec::new();
                for w in st.workers.values_mut() {
                    if w.state != WorkerState::Shutdown && !self.shutdown_if_idle(w, now) {
                        ids.push(w.id.clone());
                    }
                }
                ids
            };
            let tick = Duration::from_secs_f64(1.0 / self.cfg.max_probes_per_second.max(0.001));
            for id in ids {
                if self.is_stopped() {
                    return;
                }
                let me = self.clone();
                self.spawn(async move { me.probe_and_update(&id).await });
                if !self.pause(tick).await {
                    return;
                }
            }
            if !self.pause(self.cfg.probe_interval).await {
                return;
            }
        }
    }

    /// Probe one worker and update its state (Go `ProbeAndUpdate`). At most one probe per
    /// worker is in flight.
    pub async fn probe_and_update(&self, id: &str) {
        let snap = {
            let mut st = self.lock();
            let Some(w) = st.workers.get_mut(id) else {
                return;
            };
            if w.probing {
                tracing::debug!(Instance = %id, "still waiting for last probe to finish");
                return;
            }
            if w.state == WorkerState::Shutdown {
                return;
            }
            w.probing = true;
            Snapshot {
                exec: w.executor.clone(),
                instance: w.instance.clone(),
                it: w.it.clone(),
                state: w.state,
                updated: w.updated,
                proc_gen: w.proc_gen,
            }
        };
        self.probe(id, snap).await;
        if let Some(w) = self.lock().workers.get_mut(id) {
            w.probing = false;
        }
    }

    async fn probe(&self, id: &str, snap: Snapshot) {
        let probe_start = Instant::now();
        let user = snap.instance.remote_user();
        // Better than Go: an adopted worker (a previous dispatcher's) is asked what it runs
        // before anything is uploaded to it. A runner upload can take longer than
        // StaleLockTimeout, and until the worker reports, its containers look stale.
        let mut early_report = None;
        if snap.state == WorkerState::Unknown {
            early_report = self.run_probe(id, &snap).await;
        }
        let mut booted = snap.state.is_ready();
        let mut boot_stderr = String::new();
        if !booted {
            let (ok, stderr) = self.boot_probe(id, &snap.exec).await;
            booted = ok;
            boot_stderr = stderr;
            let mut should_copy = booted || snap.state == WorkerState::Unknown;
            if !booted {
                let now_ready = self
                    .lock()
                    .workers
                    .get(id)
                    .is_some_and(|w| w.state.is_ready());
                if now_ready {
                    // Another probe succeeded meanwhile.
                    booted = true;
                    should_copy = false;
                }
            }
            if should_copy && let Err(e) = self.deploy_runner(id, &snap.exec, &user).await {
                tracing::warn!(Instance = %id, error = %e, "error copying runner binary");
                booted = false;
            }
            if booted {
                tracing::info!(Instance = %id, "instance booted; will try probeRunning");
            }
        }
        let mut report = early_report;
        if report.is_none() && (booted || snap.state == WorkerState::Unknown) {
            report = self.run_probe(id, &snap).await;
        }
        let now = Instant::now();
        let mut st = self.lock();
        let State {
            workers, exited, ..
        } = &mut *st;
        let Some(w) = workers.get_mut(id) else {
            return;
        };
        let mut changed_listing = false;
        if let Some(r) = &report
            && r.broken
            && w.idle_behavior == IdleBehavior::Run
        {
            tracing::warn!(Instance = %id, "probe reported broken instance");
            self.events
                .push("broken", id, "crunch-run reported it broken; draining");
            self.metrics.broken.inc();
            self.report_boot_outcome(w, "failure");
            w.idle_behavior = IdleBehavior::Drain;
            self.save_tags(w);
            self.shutdown_if_idle(w, now);
        }
        let uuids: Vec<String> = report.as_ref().map(|r| r.uuids.clone()).unwrap_or_default();
        if report.is_none() || (!booted && uuids.is_empty() && w.running.is_empty()) {
            if report.is_some() {
                // Nothing runs there, and nothing was thought to: that is a report too
                // (subscribers are told below).
                w.listed = true;
            }
            if w.state == WorkerState::Shutdown && w.updated > snap.updated {
                // Shut down meanwhile: nothing to add.
                return;
            }
            let since_success = probe_start.saturating_duration_since(w.probed);
            if self.shutdown_if_broken(w, since_success, now) && !booted {
                self.report_boot_outcome(w, "failure");
                tracing::warn!(
                    Instance = %id,
                    Duration = ?since_success,
                    stderr = %boot_stderr,
                    "boot failed"
                );
            }
            drop(st);
            self.notify();
            return;
        }
        w.probed = now;
        // Better than Go, which compares `updated` and so discards every probe slower than
        // SyncInterval (each sync touches it): only a change to the worker's processes made
        // while the probe ran (a start finishing, an exit, a kill) makes its report stale.
        if w.proc_gen != snap.proc_gen {
            // The next probe will catch up.
            return;
        }
        if !w.listed {
            w.listed = true;
            changed_listing = true;
        }
        if !uuids.is_empty() {
            w.busy = now;
            if w.last_uuid.is_empty() {
                w.last_uuid = uuids[0].clone();
            }
        } else if !w.running.is_empty() {
            w.busy = now;
        }
        let mut changed = false;
        let reported: BTreeSet<&String> = uuids.iter().collect();
        for uuid in &uuids {
            if w.running.contains_key(uuid) {
                continue;
            }
            changed = true;
            if let Some(r) = w.starting.remove(uuid) {
                w.running.insert(uuid.clone(), r);
                continue;
            }
            tracing::info!(Instance = %id, ContainerUUID = %uuid, "crunch-run process detected");
            let Some(pool) = self.arc() else {
                return;
            };
            let r = Runner::new(
                &pool,
                id,
                w.executor.clone(),
                uuid,
                self.runner_command(&user),
            );
            w.running.insert(uuid.clone(), r);
        }
        let ended: Vec<String> = w
            .running
            .keys()
            .filter(|u| !reported.contains(u))
            .cloned()
            .collect();
        for uuid in ended {
            close_runner(w, exited, &uuid, now);
            changed = true;
        }
        let event = if !booted {
            Event::ListedNotBooted
        } else if w.processes() > 0 {
            Event::ProbedBusy
        } else {
            Event::ProbedIdle
        };
        let was = w.state;
        let action = w.apply(event);
        if w.state != was {
            changed = true;
        }
        if !changed {
            if changed_listing {
                // fix_stale_locks waits for adopted workers' first report.
                drop(st);
                self.notify();
            }
            return;
        }
        if w.state == WorkerState::Unknown {
            tracing::info!(Instance = %id, "crunch-run probe succeeded, but boot probe is still failing");
        }
        w.updated = now;
        w.proc_gen += 1;
        if action == Some(Action::InService) {
            if was == WorkerState::Booting && !w.time_to_ready_reported {
                w.time_to_ready_reported = true;
                let from = w.first_ssh.unwrap_or(w.appeared);
                self.metrics
                    .time_to_ready
                    .observe(&[], now.saturating_duration_since(from).as_secs_f64());
            }
            self.report_boot_outcome(w, "success");
            tracing::info!(Instance = %id, "probes succeeded, instance is in service");
        }
        drop(st);
        self.notify();
    }

    /// No successful probe for too long: shut down (never a held worker). True if it did.
    fn shutdown_if_broken(
        &self,
        w: &mut super::Worker,
        since_success: Duration,
        now: Instant,
    ) -> bool {
        if w.idle_behavior == IdleBehavior::Hold {
            return false;
        }
        let booting = matches!(w.state, WorkerState::Unknown | WorkerState::Booting);
        let threshold = if booting {
            self.cfg.timeout_booting
        } else {
            self.cfg.timeout_probe
        };
        if since_success < threshold {
            return false;
        }
        if booting {
            tracing::warn!(
                Instance = %w.id,
                Duration = ?since_success,
                "new instance unresponsive, shutting down (try arvados-dispatch-cloud cloudtest to diagnose)"
            );
        } else {
            tracing::warn!(Instance = %w.id, Duration = ?since_success, "instance unresponsive, shutting down");
        }
        self.shutdown_locked(w, now);
        true
    }

    /// The boot probe; returns success and the stderr of a failure.
    async fn boot_probe(&self, id: &str, exec: &Executor) -> (bool, String) {
        let cmd = if self.cfg.boot_probe_command.is_empty() {
            "true"
        } else {
            self.cfg.boot_probe_command.as_str()
        };
        match exec.execute(&[], cmd, b"").await {
            Ok(_) => {
                tracing::debug!(Instance = %id, "boot probe succeeded");
                (true, String::new())
            }
            Err(f) => {
                let stderr = String::from_utf8_lossy(&f.output.stderr).trim().to_string();
                match f.error {
                    // Normal while a VM boots.
                    ExecError::NoAddress
                    | ExecError::Dial(_)
                    | ExecError::Exit(_)
                    | ExecError::Timeout(_) => {
                        tracing::debug!(Instance = %id, error = %f.error, stderr, "boot probe failed")
                    }
                    _ => {
                        tracing::warn!(Instance = %id, error = %f.error, stderr, "boot probe failed")
                    }
                }
                (false, stderr)
            }
        }
    }

    /// Install the runner binary unless the right one is already there (§8.10).
    async fn deploy_runner(&self, id: &str, exec: &Executor, user: &str) -> Result<(), String> {
        let Some(bin) = &self.cfg.runner_binary else {
            return Ok(());
        };
        let path = self.cfg.runner_command();
        let want = format!("{}  {path}\n", bin.md5);
        if let Ok(out) = exec.execute(&[], &format!("md5sum {path}"), b"").await
            && out.stderr.is_empty()
            && out.stdout == want.as_bytes()
        {
            tracing::debug!(Instance = %id, "runner binary already exists on worker, with correct hash");
            return Ok(());
        }
        tracing::info!(Instance = %id, path, "installing runner binary on worker");
        let cmd = config::install_command(&self.cfg.deploy_directory, &path, user);
        // An upload of tens of MB may take longer than a probe.
        exec.execute_for(&[], &cmd, &bin.data, Duration::from_secs(600))
            .await
            .map(|_| ())
            .map_err(|f| format!("{f}: {}", String::from_utf8_lossy(&f.output.stderr).trim()))
    }

    /// `crunch-run --list`; `None` if it failed. Stale locks escalate to `broken` after
    /// `TimeoutStaleRunLock`.
    async fn run_probe(&self, id: &str, snap: &Snapshot) -> Option<ListReport> {
        let user = snap.instance.remote_user();
        let mut cmd = format!("{} --list", self.runner_command(&user));
        let prices = snap.instance.price_history(&snap.it);
        let mut stdin = Vec::new();
        if !prices.is_empty() {
            cmd.push_str(" --stdin-prices");
            stdin = serde_json::to_vec(&prices).unwrap_or_default();
        }
        let started = Instant::now();
        let result = snap.exec.execute(&[], &cmd, &stdin).await;
        let took = started.elapsed().as_secs_f64();
        let out = match result {
            Ok(o) => {
                self.metrics.run_probe_duration.observe(&["success"], took);
                o
            }
            Err(f) => {
                self.metrics.run_probe_duration.observe(&["fail"], took);
                tracing::warn!(
                    Instance = %id,
                    Command = %cmd,
                    error = %f.error,
                    stdout = %String::from_utf8_lossy(&f.output.stdout).trim(),
                    stderr = %String::from_utf8_lossy(&f.output.stderr).trim(),
                    "probe failed"
                );
                return None;
            }
        };
        let mut report = parse_list(&String::from_utf8_lossy(&out.stdout), &self.cfg.cluster_id);
        let now = Instant::now();
        let mut st = self.lock();
        if let Some(w) = st.workers.get_mut(id) {
            if report.stale.is_empty() {
                w.stale_run_lock_since = None;
            } else {
                tracing::info!(Instance = %id, stale = ?report.stale, "probe reported stale run lock");
                match w.stale_run_lock_since {
                    None => w.stale_run_lock_since = Some(now),
                    Some(t)
                        if now.saturating_duration_since(t) > self.cfg.timeout_stale_run_lock =>
                    {
                        tracing::warn!(Instance = %id, "reporting broken after reporting stale run lock for too long");
                        report.broken = true;
                    }
                    Some(_) => {}
                }
            }
        }
        Some(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_output_keeps_this_clusters_lines_and_reads_stale_and_broken() {
        let out = "zzzzz-dz642-000000000000001\n\nzzzzz-dz642-000000000000002 stale\nbroken\nxxxxx-dz642-000000000000003\nzzzzz-dz642-000000000000004\n";
        let r = parse_list(out, "zzzzz");
        assert_eq!(
            r.uuids,
            ["zzzzz-dz642-000000000000001", "zzzzz-dz642-000000000000004"]
        );
        assert_eq!(r.stale, ["zzzzz-dz642-000000000000002"]);
        assert!(r.broken);
        assert_eq!(parse_list("", "zzzzz"), ListReport::default());
    }

    #[test]
    fn list_lines_that_are_not_exactly_a_uuid_are_ignored() {
        let out = "zzzzz-dz642-x;touch pwned
                   zzzzz-dz642-000000000000001;reboot
                   zzzzz-dz642-000000000000002 $(reboot)
                   zzzzz-dz642-000000000000003 stale extra
                   zzzzz-dz642-00000000000000A
                   zzzzz-j7d0g-000000000000005
                   zzzzz-dz642-0000000000000006
                   zzzzz-dz642-000000000000007
                   zzzzz-dz642-000000000000008 stale
";
        let r = parse_list(out, "zzzzz");
        assert_eq!(r.uuids, ["zzzzz-dz642-000000000000007"]);
        assert_eq!(r.stale, ["zzzzz-dz642-000000000000008"]);
        assert!(is_container_uuid("zzzzz-dz642-000000000000007", ""));
        assert!(!is_container_uuid("zzzzz-dz642-000000000000007", "yyyyy"));
    }
}
