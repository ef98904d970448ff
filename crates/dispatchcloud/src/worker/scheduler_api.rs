//! The pool as the scheduler sees it: [`WorkerPool`] answered from one locked view of the
//! state, and starting containers (spec §8.11).

use std::collections::BTreeMap;

use arvados::InstanceType;
use arvados::types::Container;
use chrono::Utc;
use tokio::sync::watch;
use tokio::time::Instant;

use super::record::Worker;
use super::runner::Runner;
use super::{Pool, State, config};
use crate::scheduler::pool::{RunningMap, WorkerPool};
use crate::worker_state::{Event, IdleBehavior, InstanceView, WorkerState};

/// The pool's answers to the scheduler, computed from one locked view of the state.
impl Pool {
    pub(super) fn running_locked(st: &State) -> RunningMap {
        let mut m = RunningMap::default();
        for w in st.workers.values() {
            for uuid in w.running.keys().chain(w.starting.keys()) {
                m.insert(uuid.clone(), None);
            }
        }
        for (uuid, t) in &st.exited {
            m.entry(uuid.clone()).or_insert(Some(*t));
        }
        m
    }

    /// Each worker's state, price and whether it runs anything, without copying its record
    /// (cheap enough to sample many times a second; pending creates are not included).
    pub fn usage_sample(&self) -> Vec<(WorkerState, f64, bool)> {
        self.lock()
            .workers
            .values()
            .map(|w| (w.state, w.it.price, w.processes() > 0))
            .collect()
    }

    pub(super) fn instances_locked(st: &State) -> Vec<InstanceView> {
        let mut v: Vec<InstanceView> = st.workers.values().map(Worker::view).collect();
        for c in st.creating.values() {
            v.push(InstanceView::new("", &c.it, WorkerState::Booting));
        }
        v.sort_by(|a, b| {
            (a.instance.as_str(), a.arvados_instance_type.as_str())
                .cmp(&(b.instance.as_str(), b.arvados_instance_type.as_str()))
        });
        v
    }

    pub(super) fn count_workers_locked(st: &State) -> BTreeMap<WorkerState, usize> {
        let mut m = BTreeMap::new();
        for w in st.workers.values() {
            *m.entry(w.state).or_insert(0) += 1;
        }
        m
    }

    pub(super) fn quota_headroom_locked(&self, st: &State, now: Instant) -> Option<usize> {
        if self.at_quota_locked(st, now) {
            return Some(0);
        }
        (self.cfg.max_instances > 0).then(|| {
            self.cfg
                .max_instances
                .saturating_sub(st.workers.len() + st.creating.len())
        })
    }

    pub(super) fn create_budget_locked(&self, st: &State, now: Instant) -> Option<usize> {
        if self.cfg.runner_error.is_some() || self.create_throttled(st, now) {
            return Some(0);
        }
        let max = st.max_concurrent_creates;
        (max > 0).then(|| max.saturating_sub(st.creates_in_flight()))
    }

    /// Is `uuid` running or starting on any worker?
    pub(super) fn placed_anywhere(st: &State, uuid: &str) -> Option<String> {
        st.workers
            .values()
            .find(|w| w.running.contains_key(uuid) || w.starting.contains_key(uuid))
            .map(|w| w.id.clone())
    }
}

impl WorkerPool for Pool {
    fn running(&self) -> RunningMap {
        Self::running_locked(&self.lock())
    }

    fn instances(&self) -> Vec<InstanceView> {
        Self::instances_locked(&self.lock())
    }

    fn count_workers(&self) -> BTreeMap<WorkerState, usize> {
        Self::count_workers_locked(&self.lock())
    }

    /// One lock for the whole snapshot, so a pass never sees, say, a container both starting
    /// (in `running`) and not yet placed (in `instances`).
    fn snapshot(&self, cfg: &crate::scheduler::SchedConfig) -> crate::scheduler::PoolSnapshot {
        let now = Instant::now();
        let st = self.lock();
        let counts = Self::count_workers_locked(&st);
        crate::scheduler::PoolSnapshot {
            running: Self::running_locked(&st),
            instances: Self::instances_locked(&st),
            total_instances: counts.values().sum(),
            unknown_workers: counts.get(&WorkerState::Unknown).copied().unwrap_or(0),
            at_quota: self.at_quota_locked(&st, now),
            quota_headroom: self.quota_headroom_locked(&st, now),
            create_budget: self.create_budget_locked(&st, now),
            at_capacity: cfg
                .types
                .values()
                .filter(|it| self.at_capacity_locked(&st, it, now))
                .map(|it| it.name.clone())
                .collect(),
            spent_today: self.metrics.spent_today(),
        }
    }

    fn spent_today(&self) -> f64 {
        self.metrics.spent_today()
    }

    fn unreported_workers(&self) -> usize {
        self.lock()
            .workers
            .values()
            .filter(|w| w.adopted && w.reachable && !w.listed && w.state != WorkerState::Shutdown)
            .count()
    }

    fn loaded(&self) -> bool {
        self.lock().loaded
    }

    fn at_capacity(&self, it: &InstanceType) -> bool {
        let st = self.lock();
        self.at_capacity_locked(&st, it, Instant::now())
    }

    fn at_quota(&self) -> bool {
        let st = self.lock();
        self.at_quota_locked(&st, Instant::now())
    }

    fn quota_headroom(&self) -> Option<usize> {
        self.quota_headroom_locked(&self.lock(), Instant::now())
    }

    fn create_budget(&self) -> Option<usize> {
        self.create_budget_locked(&self.lock(), Instant::now())
    }

    fn create(&self, it: &InstanceType) -> Option<InstanceView> {
        self.do_create(it)
    }

    fn interruption_notice(&self, uuid: &str, pre_boot: bool) -> bool {
        self.on_interruption_notice(uuid, pre_boot)
    }

    fn set_wanted_types(&self, names: std::collections::HashSet<String>) {
        self.set_wanted(names);
    }

    fn shutdown(&self, instance_id: &str) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(instance_id) else {
            return false;
        };
        if w.idle_behavior == IdleBehavior::Hold
            || !matches!(w.state, WorkerState::Booting | WorkerState::Idle)
        {
            return false;
        }
        tracing::info!(Instance = %instance_id, "shutting down");
        self.report_boot_outcome(w, "aborted");
        self.shutdown_locked(w, now);
        true
    }

    fn start_container(&self, instance_id: &str, ctr: &Container) -> bool {
        if self.is_stopped() {
            return false;
        }
        let Some(pool) = self.arc() else {
            return false;
        };
        let mut st = self.lock();
        // Never twice: not if it runs or is starting anywhere (a restarted dispatcher's
        // adopted workers, a scheduler racing a probe, a test-only forget).
        if let Some(other) = Self::placed_anywhere(&st, &ctr.uuid) {
            tracing::warn!(ContainerUUID = %ctr.uuid, Instance = %instance_id, Other = %other, "not starting: already running or starting on another instance");
            return false;
        }
        let Some(w) = st.workers.get_mut(instance_id) else {
            return false;
        };
        if w.idle_behavior != IdleBehavior::Run || w.apply(Event::ContainerStarted).is_none() {
            return false;
        }
        let user = w.instance.remote_user();
        let runner = Runner::new(
            &pool,
            &w.id,
            w.executor.clone(),
            &ctr.uuid,
            self.runner_command(&user),
        );
        w.starting.insert(ctr.uuid.clone(), runner);
        self.record_start(&w.it.name, Instant::now());
        let command = config::start_command(
            &self.cfg.runner_command(),
            &self.cfg.runner_args,
            &ctr.uuid,
            &user,
        );
        let stdin = config::config_data(&self.cfg, &w.it, &w.instance.address(), &ctr.uuid);
        let (exec, id, uuid) = (w.executor.clone(), w.id.clone(), ctr.uuid.clone());
        let created_at = ctr.created_at;
        drop(st);
        self.notify();
        let me = self.me.clone();
        self.spawn(async move {
            let result = exec.execute(&[], &command, &stdin).await;
            match &result {
                Ok(_) => {
                    tracing::info!(Instance = %id, ContainerUUID = %uuid, "crunch-run process started")
                }
                Err(f) => tracing::warn!(
                    Instance = %id,
                    ContainerUUID = %uuid,
                    error = %f,
                    stdout = %String::from_utf8_lossy(&f.output.stdout).trim(),
                    stderr = %String::from_utf8_lossy(&f.output.stderr).trim(),
                    "error starting crunch-run process"
                ),
            }
            if let Some(p) = me.upgrade() {
                match &result {
                    Ok(_) => p.events.push("started", uuid.clone(), format!("on {id}")),
                    Err(f) => p.events.push(
                        "error",
                        uuid.clone(),
                        format!("starting crunch-run on {id} failed: {f}"),
                    ),
                }
            }
            if let Some(t) = created_at {
                let waited = (Utc::now() - t).to_std().unwrap_or_default();
                pool.metrics
                    .queue_to_crunch_run
                    .observe(&[], waited.as_secs_f64());
            }
            let now = Instant::now();
            let mut st = pool.lock();
            if let Some(w) = st.workers.get_mut(&id)
                && let Some(r) = w.starting.remove(&uuid)
            {
                w.running.insert(uuid.clone(), r);
                w.updated = now;
                w.proc_gen += 1;
                w.busy = now;
                w.last_uuid = uuid;
            }
            drop(st);
            pool.notify();
        });
        true
    }

    fn kill_container(&self, uuid: &str, reason: &str) -> bool {
        let st = self.lock();
        let runner = st
            .workers
            .values()
            .find_map(|w| w.running.get(uuid).or_else(|| w.starting.get(uuid)))
            .cloned();
        drop(st);
        match runner {
            Some(r) => {
                r.kill(reason);
                true
            }
            None => {
                tracing::debug!(ContainerUUID = %uuid, "cannot kill: already disappeared");
                false
            }
        }
    }

    fn forget_container(&self, uuid: &str) {
        self.lock().exited.remove(uuid);
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }
}
