//! The worker pool (spec §8): every VM of this dispatcher, from create to destroy.
//!
//! * [`config`]: settings resolved from the cluster config, and the command lines and stdin of
//!   the remote command contract.
//! * [`record`]: one worker's record and the pure rules over it.
//! * `probe.rs`: boot probe, host verification, runner deployment, run probe (§8.7–8.10).
//! * [`runner`]: a crunch-run process and its kill loop (§8.12).
//! * [`metrics`]: the pool's Prometheus metrics.
//! * this file: the shared state, creating (quota, capacity, concurrency; §8.5), syncing with
//!   the cloud list and adoption (§8.6), starting containers (§8.11), shutting down (§8.13),
//!   tags (§8.14), views (§8.15), and the [`WorkerPool`] interface the scheduler uses.
//!
//! One `parking_lot::Mutex` guards the state; it is never held across an `.await`. Cloud calls
//! and SSH commands run in spawned tasks, which take the lock again to record their result.
//!
//! Where Go has a known bug (spec §13.3) this pool does the right thing; each such case has a
//! test named `bug_13_3_<item>_…`.

pub mod config;
pub mod metrics;
mod probe;
pub mod record;
pub mod runner;
#[cfg(test)]
mod tests;

use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use arvados::InstanceType;
use arvados::types::Container;
use chrono::{DateTime, Utc};
use cloud::wrappers::Throttled;
use cloud::{CloudError, CreateRequest, Instance, InstanceSet, InstanceTags};
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

pub use config::PoolConfig;
use metrics::{PoolMetrics, Sample};
use record::Worker;
use runner::Runner;

use crate::scheduler::pool::{IdleBehavior, InstanceView, RunningMap, WorkerPool, WorkerState};
use crate::ssh_executor::{Executor, Target, Timeouts};

/// How often the pool's gauges and cumulative counters are refreshed when nothing changes.
const METRICS_REFRESH: Duration = Duration::from_secs(5);

/// Something the pool is holding off (an offering short of capacity, all creates at quota).
#[derive(Debug, Clone, PartialEq)]
pub struct HoldOff {
    pub what: String,
    pub reason: String,
    /// `None`: until a condition changes (see `reason`).
    pub until: Option<DateTime<Utc>>,
}

/// A create call in flight, keyed by the instance secret it carries.
struct Creating {
    it: Arc<InstanceType>,
    /// The create call failed without saying whether a VM was made (no answer in time, a
    /// server error): since when. The place is kept, so nothing creates a second VM for it,
    /// until the cloud list shows the VM (it is adopted) or a list started
    /// `unknown_create_grace` later does not (it never existed).
    unknown_since: Option<Instant>,
}

impl State {
    /// Create calls still waiting for the cloud's answer (what
    /// `MaxConcurrentInstanceCreateOps` limits).
    fn creates_in_flight(&self) -> usize {
        self.creating
            .values()
            .filter(|c| c.unknown_since.is_none())
            .count()
    }
}

#[derive(Default)]
struct State {
    workers: BTreeMap<String, Worker>,
    creating: HashMap<String, Creating>,
    /// Containers whose crunch-run ended, until the scheduler forgets them.
    exited: HashMap<String, DateTime<Utc>>,
    at_quota_until: Option<Instant>,
    /// At quota until there are fewer instances than this (0: not in effect).
    at_quota_until_fewer: usize,
    at_capacity_until: HashMap<String, Instant>,
    /// `MaxConcurrentInstanceCreateOps` was hit; cleared early when a create finishes.
    create_ops_hold_until: Option<Instant>,
    /// `MaxConcurrentInstanceCreateOps` (0: unlimited).
    max_concurrent_creates: usize,
    loaded: bool,
}

/// The worker pool.
pub struct Pool {
    pub(crate) cfg: PoolConfig,
    set: Arc<Throttled>,
    state: Mutex<State>,
    notify: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    pub metrics: PoolMetrics,
    /// What the pool did, for the status page.
    pub events: crate::events::EventLog,
    /// A standby's read-only pool: [`Pool::sync`] learns the cloud's instances but changes
    /// nothing in the cloud (no tag writes); nothing else runs until [`Pool::start`].
    passive: std::sync::atomic::AtomicBool,
    me: Weak<Pool>,
}

fn type_tag_behavior(tag: Option<&String>) -> Option<IdleBehavior> {
    match tag.map(String::as_str) {
        Some("run") => Some(IdleBehavior::Run),
        Some("hold") => Some(IdleBehavior::Hold),
        Some("drain") => Some(IdleBehavior::Drain),
        _ => None,
    }
}

impl Pool {
    /// A pool over `set` (the driver's instance set, already rate-limited/instrumented as the
    /// service wants); registers its metrics in `registry`. Call [`Pool::start`] to run it.
    pub fn new(
        cfg: PoolConfig,
        set: Arc<dyn InstanceSet>,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Pool>, prometheus::Error> {
        let metrics = PoolMetrics::new(registry)?;
        Ok(Arc::new_cyclic(|me| Pool {
            set: Arc::new(Throttled::new(set)),
            state: Mutex::new(State {
                max_concurrent_creates: cfg.max_concurrent_creates,
                ..State::default()
            }),
            notify: watch::channel(0).0,
            stop: watch::channel(false).0,
            metrics,
            events: crate::events::EventLog::default(),
            passive: Default::default(),
            me: me.clone(),
            cfg,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn arc(&self) -> Option<Arc<Pool>> {
        self.me.upgrade()
    }

    pub(crate) fn notify(&self) {
        self.notify.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Start the sync, probe and metrics loops.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move { me.sync_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.probe_loop().await });
        let me = self.clone();
        tokio::spawn(async move { me.metrics_loop().await });
    }

    /// Stop the loops. Instances are left as they are, for the next dispatcher to adopt.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    fn stopped(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Stopped: creates and starts are refused (another dispatcher may own the cluster now).
    fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleep `d`; false if the pool was stopped meanwhile.
    async fn pause(&self, d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        if *stop.borrow() {
            return false;
        }
        let stopped = tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        !stopped && !*stop.borrow()
    }

    async fn sync_loop(self: Arc<Self>) {
        let mut stop = self.stopped();
        loop {
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %e, "sync failed");
                self.events
                    .push("error", "cloud", format!("listing instances failed: {e}"));
            }
            if !self.pause(self.cfg.sync_interval, &mut stop).await {
                return;
            }
        }
    }

    async fn metrics_loop(self: Arc<Self>) {
        let mut stop = self.stopped();
        let mut changes = self.notify.subscribe();
        loop {
            self.update_metrics();
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
                // The cumulative instance-seconds and cost counters advance while nothing
                // changes, too.
                _ = tokio::time::sleep(METRICS_REFRESH) => {}
            }
            // Coalesce bursts of notifications.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Recompute the gauges (also done after every change by the metrics loop).
    pub fn update_metrics(&self) {
        let now = Instant::now();
        let st = self.lock();
        let samples: Vec<Sample<'_>> = st
            .workers
            .values()
            .map(|w| Sample {
                category: w.category(),
                instance_type: &w.it.name,
                preemptible: w.it.preemptible,
                state_age: match w.state {
                    WorkerState::Unknown | WorkerState::Booting => {
                        Some((w.state.as_str(), now.saturating_duration_since(w.appeared)))
                    }
                    WorkerState::Shutdown => Some((
                        "shutdown",
                        now.saturating_duration_since(w.destroyed.unwrap_or(w.updated)),
                    )),
                    WorkerState::Idle | WorkerState::Running => None,
                },
                price: w.it.price,
                vcpus: w.it.vcpus,
                ram: w.it.ram,
                processes: w.processes(),
                probe_age: now.saturating_duration_since(w.probed),
            })
            .collect();
        self.metrics
            .set_gauges(now.into_std(), self.cfg.instance_types.values(), &samples);
    }

    /// Whether the pool can work: the runner binary, if one is to be deployed, was loaded.
    pub fn check_health(&self) -> Result<(), String> {
        match &self.cfg.runner_error {
            Some(e) => Err(format!("error loading runner binary: {e}")),
            None => Ok(()),
        }
    }

    // -----------------------------------------------------------------------------------
    // Quota and capacity (§8.5)

    fn capacity_keys(&self, it: &InstanceType) -> [String; 3] {
        let mut provider = it.provider_type.clone();
        if it.preemptible {
            provider.push_str("-preemptible");
        }
        [String::new(), self.set.instance_quota_group(it), provider]
    }

    fn at_capacity_locked(&self, st: &State, it: &InstanceType, now: Instant) -> bool {
        self.capacity_keys(it)
            .iter()
            .any(|k| st.at_capacity_until.get(k).is_some_and(|t| now < *t))
    }

    /// Make the pool read-only (a standby's warm view) or normal again.
    pub fn set_passive(&self, passive: bool) {
        self.passive
            .store(passive, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_passive(&self) -> bool {
        self.passive.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// What the pool holds off now and why, for the status page.
    pub fn holdoffs(&self) -> Vec<HoldOff> {
        let now = Instant::now();
        let until =
            |t: Instant| Utc::now() + chrono::Duration::from_std(t - now).unwrap_or_default();
        let st = self.lock();
        let mut out = Vec::new();
        let mut caps: Vec<(&String, &Instant)> = st
            .at_capacity_until
            .iter()
            .filter(|(_, t)| now < **t)
            .collect();
        caps.sort();
        for (key, t) in caps {
            out.push(HoldOff {
                what: if key.is_empty() {
                    "every instance type".into()
                } else {
                    key.clone()
                },
                reason: "the cloud reported insufficient capacity".into(),
                until: Some(until(*t)),
            });
        }
        if let Some(t) = st.at_quota_until.filter(|t| now < *t) {
            out.push(HoldOff {
                what: "new instances".into(),
                reason: "the cloud reported a quota error".into(),
                until: Some(until(t)),
            });
        }
        if st.at_quota_until_fewer > 0 {
            out.push(HoldOff {
                what: "new instances".into(),
                reason: format!(
                    "cloud quota: held until fewer than {} instances exist",
                    st.at_quota_until_fewer
                ),
                until: None,
            });
        }
        let n = st.workers.len() + st.creating.len();
        if self.cfg.max_instances > 0 && n >= self.cfg.max_instances {
            out.push(HoldOff {
                what: "new instances".into(),
                reason: format!("MaxInstances ({}) reached", self.cfg.max_instances),
                until: None,
            });
        }
        if let Some(t) = st.create_ops_hold_until.filter(|t| now < *t) {
            out.push(HoldOff {
                what: "create calls".into(),
                reason: "MaxConcurrentInstanceCreateOps reached".into(),
                until: Some(until(t)),
            });
        }
        out
    }

    /// How long each worker has existed (since this process first saw it), by instance id.
    pub fn instance_ages(&self) -> HashMap<String, Duration> {
        let now = Instant::now();
        self.lock()
            .workers
            .iter()
            .map(|(id, w)| (id.clone(), now.saturating_duration_since(w.appeared)))
            .collect()
    }

    fn at_quota_locked(&self, st: &State, now: Instant) -> bool {
        let n = st.workers.len() + st.creating.len();
        st.at_quota_until_fewer > 0
            || st.at_quota_until.is_some_and(|t| now < t)
            || (self.cfg.max_instances > 0 && n >= self.cfg.max_instances)
    }

    fn create_throttled(&self, st: &State, now: Instant) -> bool {
        st.create_ops_hold_until.is_some_and(|t| now < t) || self.set.create.error().is_some()
    }

    // -----------------------------------------------------------------------------------
    // Creating (§8.5)

    fn do_create(&self, it: &InstanceType) -> Option<InstanceView> {
        if self.is_stopped() {
            return None;
        }
        if let Some(e) = &self.cfg.runner_error {
            tracing::debug!(error = %e, "not creating: runner binary not loaded");
            return None;
        }
        let pool = self.arc()?;
        let now = Instant::now();
        let mut st = self.lock();
        if self.at_capacity_locked(&st, it, now)
            || self.at_quota_locked(&st, now)
            || self.create_throttled(&st, now)
        {
            return None;
        }
        let max = st.max_concurrent_creates;
        if max > 0 && st.creates_in_flight() >= max {
            tracing::info!(
                limit = max,
                "reached MaxConcurrentInstanceCreateOps; waiting for a create to finish"
            );
            st.create_ops_hold_until = Some(now + self.cfg.create_ops_hold_off);
            return None;
        }
        let it = Arc::new(it.clone());
        let secret = cloud::tags::new_instance_secret();
        st.creating.insert(
            secret.clone(),
            Creating {
                it: it.clone(),
                unknown_since: None,
            },
        );
        let total = st.workers.len() + st.creating.len();
        if self.cfg.max_instances > 0 && total == self.cfg.max_instances {
            tracing::info!(
                "now at MaxInstances limit of {} instances",
                self.cfg.max_instances
            );
        }
        drop(st);
        self.notify();
        let view = InstanceView::new("", &it, WorkerState::Booting);
        tokio::spawn(async move { pool.create_in_background(secret, it).await });
        Some(view)
    }

    async fn create_in_background(self: Arc<Self>, secret: String, it: Arc<InstanceType>) {
        let keys = &self.cfg.tag_keys;
        let tags: InstanceTags = [
            (keys.instance_set_id(), self.cfg.instance_set_id.clone()),
            (keys.instance_type(), it.name.clone()),
            (keys.idle_behavior(), "run".to_string()),
            (keys.instance_secret(), secret.clone()),
        ]
        .into();
        let req = CreateRequest {
            image_id: self.cfg.image_id.clone(),
            tags,
            init_command: cloud::tags::init_command(&secret, &self.cfg.instance_init_command),
            public_key: self.cfg.install_public_key.clone(),
        };
        let result = self.set.create(&it, req).await;
        let now = Instant::now();
        {
            let mut st = self.lock();
            match result {
                Ok(inst) => {
                    self.events.push("created", inst.id(), it.name.clone());
                    self.update_worker(&mut st, inst, now);
                }
                Err(e) if e.outcome_unknown => {
                    tracing::warn!(
                        InstanceType = %it.name,
                        error = %e,
                        "create outcome unknown; keeping its place until the cloud's instance list shows whether the VM exists"
                    );
                    self.events.push(
                        "create-failed",
                        it.name.clone(),
                        format!("outcome unknown, waiting for the list: {e}"),
                    );
                    let listed_already = st
                        .workers
                        .values()
                        .any(|w| w.secret.as_deref() == Some(secret.as_str()));
                    if listed_already {
                        // A list that ran meanwhile showed its VM: that is the answer.
                        st.creating.remove(&secret);
                    } else if let Some(c) = st.creating.get_mut(&secret) {
                        c.unknown_since = Some(now);
                    }
                    st.create_ops_hold_until = None;
                    drop(st);
                    self.notify();
                    return;
                }
                Err(e) => {
                    if e.is_quota() {
                        let n = (st.workers.len() + st.creating.len()).saturating_sub(1);
                        if n < 1 {
                            st.at_quota_until_fewer = 0;
                            st.at_quota_until = Some(now + self.cfg.quota_error_ttl);
                            self.notify_at(now + self.cfg.quota_error_ttl);
                        } else if n < st.at_quota_until_fewer || st.at_quota_until_fewer == 0 {
                            st.at_quota_until_fewer = n;
                            st.at_quota_until = None;
                        }
                    }
                    if e.is_capacity() {
                        let [all, group, provider] = self.capacity_keys(&it);
                        let key = if e.is_quota_group_specific() {
                            group
                        } else if e.is_instance_type_specific() {
                            provider
                        } else {
                            all
                        };
                        st.at_capacity_until
                            .insert(key, now + self.cfg.capacity_error_ttl);
                        self.notify_at(now + self.cfg.capacity_error_ttl);
                    }
                    if let Some(t) = e.earliest_retry() {
                        // The throttle wrapper holds creates until then; wake the scheduler
                        // when it may try again.
                        let wait = t
                            .duration_since(std::time::SystemTime::now())
                            .unwrap_or_default();
                        self.notify_at(now + wait);
                    }
                    tracing::error!(
                        InstanceType = %it.name,
                        isCapacityError = e.is_capacity(),
                        isQuotaError = e.is_quota(),
                        error = %e,
                        "create failed"
                    );
                    self.events
                        .push("create-failed", it.name.clone(), e.to_string());
                }
            }
            st.creating.remove(&secret);
            // Better than Go (§13.3 item 26): a finished create lifts the concurrency hold.
            st.create_ops_hold_until = None;
        }
        self.notify();
    }

    /// Notify subscribers at `t` (when a hold-off ends).
    fn notify_at(&self, t: Instant) {
        let me = self.me.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(t).await;
            if let Some(p) = me.upgrade() {
                p.notify();
            }
        });
    }

    // -----------------------------------------------------------------------------------
    // Sync with the cloud list (§8.6)

    /// List the cloud's instances of this dispatcher and reconcile the workers with it.
    pub async fn sync(&self) -> Result<(), CloudError> {
        let threshold = Instant::now();
        let filter: InstanceTags = [(
            self.cfg.tag_keys.instance_set_id(),
            self.cfg.instance_set_id.clone(),
        )]
        .into();
        let list = self.set.instances(&filter).await?;
        let now = Instant::now();
        let mut st = self.lock();
        let mut listed = std::collections::HashSet::new();
        for inst in list {
            listed.insert(inst.id());
            self.update_worker(&mut st, inst, now);
        }
        // Creates with unknown outcome that a list started well after they failed does not
        // show never made a VM: free their places.
        let grace = self.cfg.unknown_create_grace;
        st.creating.retain(|_, c| {
            let expired = c
                .unknown_since
                .is_some_and(|t| threshold.saturating_duration_since(t) >= grace);
            if expired {
                tracing::info!(InstanceType = %c.it.name, "create with unknown outcome made no VM");
            }
            !expired
        });
        let gone: Vec<String> = st
            .workers
            .iter()
            .filter(|(id, w)| !listed.contains(*id) && w.updated <= threshold)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            let Some(w) = st.workers.remove(&id) else {
                continue;
            };
            tracing::info!(
                Instance = %id,
                WorkerState = %w.state,
                "instance disappeared in cloud"
            );
            self.events
                .push("gone", id.clone(), format!("disappeared while {}", w.state));
            if !w.boot_outcome_reported {
                self.metrics
                    .boot_outcomes
                    .with_label_values(&["disappeared"])
                    .inc();
            }
            self.metrics
                .disappeared
                .with_label_values(&[w.state.as_str()])
                .inc();
            if let Some(d) = w.destroyed {
                self.metrics
                    .time_to_disappear
                    .observe(&[], now.saturating_duration_since(d).as_secs_f64());
            }
            // Better than Go (§13.3 item 22): its processes are gone too; say so, so the
            // scheduler can act without waiting for unknown workers to clear.
            let at = Utc::now();
            for (uuid, r) in w.running.iter().chain(w.starting.iter()) {
                r.close();
                st.exited.insert(uuid.clone(), at);
            }
            w.executor.close();
        }
        let total = st.workers.len() + st.creating.len();
        if st.at_quota_until_fewer > total {
            st.at_quota_until_fewer = 0;
        }
        if !st.loaded {
            st.loaded = true;
            tracing::info!(N = st.workers.len(), "loaded initial instance list");
        }
        drop(st);
        self.notify();
        Ok(())
    }

    fn new_executor(&self, inst: &Arc<dyn Instance>, secret: Option<String>) -> Arc<Executor> {
        Arc::new(Executor::new(
            self.target(inst, secret),
            self.cfg.private_key.clone(),
            &self.cfg.ssh_port,
            Timeouts {
                connect: self.cfg.command_timeout,
                command: self.cfg.command_timeout,
            },
        ))
    }

    fn target(&self, inst: &Arc<dyn Instance>, secret: Option<String>) -> Target {
        let me = self.me.clone();
        let id = inst.id();
        Target {
            instance: inst.clone(),
            secret,
            on_verified: Some(Arc::new(move || {
                if let Some(p) = me.upgrade() {
                    p.ssh_connected(&id);
                }
            })),
        }
    }

    /// First verified SSH connection to a booting worker: time-to-SSH.
    fn ssh_connected(&self, id: &str) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(id) else {
            return;
        };
        let reached_first_time = !w.reachable && w.adopted;
        w.reachable = true;
        if w.state == WorkerState::Booting && w.first_ssh.is_none() {
            w.first_ssh = Some(now);
            self.metrics
                .time_to_ssh
                .observe(&[], now.saturating_duration_since(w.appeared).as_secs_f64());
        }
        drop(st);
        if reached_first_time {
            // fix_stale_locks now waits for this worker's report.
            self.notify();
        }
    }

    /// Add or refresh the worker for a listed (or just created) instance.
    fn update_worker(&self, st: &mut State, inst: Arc<dyn Instance>, now: Instant) {
        let keys = &self.cfg.tag_keys;
        let tags = inst.tags();
        let id = inst.id();
        let secret = tags.get(&keys.instance_secret()).cloned();
        // Made by one of our creates: Some(true) if that create's call failed with an unknown
        // outcome. This VM is the answer: it settles the create (as a new worker, it is
        // booting in the create's place).
        let from_create = secret
            .as_ref()
            .and_then(|s| st.creating.get(s))
            .map(|c| c.unknown_since.is_some());
        if from_create == Some(true)
            && let Some(s) = &secret
        {
            tracing::info!(Instance = %id, "instance from a create with unknown outcome listed; it settles that create");
            st.creating.remove(s);
        }
        if let Some(w) = st.workers.get_mut(&id) {
            w.executor.set_target(self.target(&inst, secret.clone()));
            w.instance = inst;
            w.tags = tags;
            w.secret = secret;
            w.updated = now;
            self.save_tags(w);
            if w.state == WorkerState::Shutdown
                && w.destroyed
                    .is_some_and(|d| now.saturating_duration_since(d) > self.cfg.timeout_shutdown)
            {
                tracing::info!(Instance = %id, "worker still listed after shutdown; retrying");
                self.shutdown_locked(w, now);
            }
            return;
        }
        let type_name = tags.get(&keys.instance_type()).cloned().unwrap_or_default();
        let configured = self.cfg.instance_types.get(&type_name);
        let tagged = type_tag_behavior(tags.get(&keys.idle_behavior()));
        let (it, behavior) = match configured {
            Some(it) => (it.clone(), tagged.unwrap_or_default()),
            None => {
                let b = if tagged == Some(IdleBehavior::Hold) {
                    IdleBehavior::Hold
                } else {
                    IdleBehavior::Drain
                };
                tracing::warn!(
                    Instance = %id,
                    InstanceType = %type_name,
                    "{}ing instance that was tagged with an unrecognized InstanceType and IdleBehavior = {}",
                    b.as_str(),
                    tags.get(&keys.idle_behavior()).map(String::as_str).unwrap_or("")
                );
                (
                    InstanceType {
                        name: type_name,
                        ..Default::default()
                    },
                    b,
                )
            }
        };
        let state = if from_create.is_some() {
            WorkerState::Booting
        } else {
            WorkerState::Unknown
        };
        let appeared = now;
        let executor = self.new_executor(&inst, secret.clone());
        tracing::info!(
            Instance = %id,
            InstanceType = %it.name,
            WorkerState = %state,
            IdleBehavior = %behavior.as_str(),
            "instance appeared in cloud"
        );
        let mut w = Worker {
            id: id.clone(),
            instance: inst,
            known_type: configured.is_some(),
            it: Arc::new(it),
            state,
            idle_behavior: behavior,
            executor,
            secret,
            appeared,
            probed: appeared,
            updated: now,
            busy: now,
            destroyed: None,
            first_ssh: None,
            reachable: false,
            last_uuid: String::new(),
            running: BTreeMap::new(),
            starting: BTreeMap::new(),
            probing: false,
            adopted: state == WorkerState::Unknown,
            listed: false,
            proc_gen: 0,
            boot_outcome_reported: false,
            time_to_ready_reported: false,
            stale_run_lock_since: None,
            tags,
        };
        self.save_tags(&mut w);
        st.workers.insert(id, w);
        self.notify();
    }

    /// Persist the type and idle behaviour in the instance's tags (§8.14). Unlike Go (§13.3
    /// item 21), the `drain` forced on an unrecognised type is not written to the tag, so
    /// configuring the type again restores the VM's own behaviour after a restart.
    fn save_tags(&self, w: &mut Worker) {
        if !w.known_type || self.is_passive() {
            // A passive pool writes nothing; the first sync after it turns active does.
            return;
        }
        let keys = &self.cfg.tag_keys;
        let want = [
            (keys.instance_type(), w.it.name.clone()),
            (keys.idle_behavior(), w.idle_behavior.as_str().to_string()),
        ];
        if want.iter().all(|(k, v)| w.tags.get(k) == Some(v)) {
            return;
        }
        let mut tags = w.tags.clone();
        tags.extend(want);
        w.tags = tags.clone();
        let (inst, id) = (w.instance.clone(), w.id.clone());
        tokio::spawn(async move {
            if let Err(e) = inst.set_tags(tags).await {
                tracing::warn!(Instance = %id, error = %e, "error updating tags");
            }
        });
    }

    // -----------------------------------------------------------------------------------
    // Shutting down (§8.13)

    fn report_boot_outcome(&self, w: &mut Worker, outcome: &str) {
        if !w.boot_outcome_reported {
            w.boot_outcome_reported = true;
            self.metrics
                .boot_outcomes
                .with_label_values(&[outcome])
                .inc();
        }
    }

    fn shutdown_locked(&self, w: &mut Worker, now: Instant) {
        w.updated = now;
        w.proc_gen += 1;
        w.destroyed = Some(now);
        self.events.push(
            "shutdown",
            w.id.clone(),
            format!("{} was {}", w.it.name, w.state),
        );
        w.state = WorkerState::Shutdown;
        self.notify();
        let (inst, id, me) = (w.instance.clone(), w.id.clone(), self.me.clone());
        tokio::spawn(async move {
            if let Err(e) = inst.destroy().await {
                tracing::warn!(Instance = %id, error = %e, "shutdown failed");
                if let Some(p) = me.upgrade() {
                    p.events.push("error", id, format!("shutdown failed: {e}"));
                }
            }
        });
    }

    /// Shut down if the idle rules say so (§8.7); true if it did.
    fn shutdown_if_idle(&self, w: &mut Worker, now: Instant) -> bool {
        if !w.eligible_for_shutdown(now, self.cfg.timeout_idle, self.cfg.timeout_booting) {
            return false;
        }
        tracing::info!(
            Instance = %w.id,
            WorkerState = %w.state,
            IdleDuration = ?now.saturating_duration_since(w.busy),
            IdleBehavior = %w.idle_behavior.as_str(),
            "shutdown worker"
        );
        self.report_boot_outcome(w, "aborted");
        self.shutdown_locked(w, now);
        true
    }

    /// Management API: change a worker's idle behaviour.
    pub fn set_idle_behavior(&self, id: &str, b: IdleBehavior) -> Result<(), String> {
        let now = Instant::now();
        let mut st = self.lock();
        let w = st
            .workers
            .get_mut(id)
            .ok_or_else(|| "requested instance does not exist".to_string())?;
        tracing::info!(Instance = %id, IdleBehavior = %b.as_str(), "set idle behavior");
        self.events.push(b.as_str(), id, "idle behavior set");
        w.idle_behavior = b;
        self.save_tags(w);
        self.shutdown_if_idle(w, now);
        drop(st);
        self.notify();
        Ok(())
    }

    /// Management API: destroy a worker whatever its state and behaviour.
    pub fn kill_instance(&self, id: &str, reason: &str) -> Result<(), String> {
        let now = Instant::now();
        let mut st = self.lock();
        let w = st
            .workers
            .get_mut(id)
            .ok_or_else(|| "instance not found".to_string())?;
        tracing::info!(Instance = %id, Reason = %reason, "shutting down");
        self.events.push("kill", id, reason);
        self.report_boot_outcome(w, "aborted");
        self.shutdown_locked(w, now);
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Runners (§8.12)

    /// `--kill` succeeded: the process is gone.
    fn on_killed(&self, worker_id: &str, uuid: &str) {
        let now = Instant::now();
        let mut st = self.lock();
        let State {
            workers, exited, ..
        } = &mut *st;
        if let Some(w) = workers.get_mut(worker_id) {
            // Better than Go (§13.3 item 20): a runner still starting is closed too.
            if w.running.contains_key(uuid) || w.starting.contains_key(uuid) {
                close_runner(w, exited, uuid, now);
            }
        }
        drop(st);
        self.notify();
    }

    /// `TimeoutTERM` passed: drain the worker (unless on hold).
    fn on_unkillable(&self, worker_id: &str, uuid: &str) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(worker_id) else {
            return;
        };
        if w.idle_behavior == IdleBehavior::Hold {
            tracing::warn!(Instance = %worker_id, ContainerUUID = %uuid, "unkillable container, but worker is on hold");
            return;
        }
        tracing::warn!(Instance = %worker_id, ContainerUUID = %uuid, "unkillable container, draining worker");
        w.idle_behavior = IdleBehavior::Drain;
        self.save_tags(w);
        self.shutdown_if_idle(w, now);
        drop(st);
        self.notify();
    }

    fn runner_command(&self, user: &str) -> String {
        format!("{}{}", config::sudo(user), self.cfg.runner_command())
    }

    /// How many workers are in each state, and the ids of all (tests, reports).
    pub fn worker_ids(&self) -> Vec<String> {
        self.lock().workers.keys().cloned().collect()
    }

    /// One worker's view, if it exists.
    pub fn worker(&self, id: &str) -> Option<InstanceView> {
        self.lock().workers.get(id).map(Worker::view)
    }
}

/// The process ended (or was killed): stop tracking it, leave an exited placeholder.
fn close_runner(
    w: &mut Worker,
    exited: &mut HashMap<String, DateTime<Utc>>,
    uuid: &str,
    now: Instant,
) {
    let r = w.running.remove(uuid).or_else(|| w.starting.remove(uuid));
    if let Some(r) = r {
        tracing::info!(Instance = %w.id, ContainerUUID = %uuid, "crunch-run process ended");
        r.close();
    }
    w.updated = now;
    w.proc_gen += 1;
    exited.insert(uuid.to_string(), Utc::now());
    if w.state == WorkerState::Running && w.processes() == 0 {
        w.state = WorkerState::Idle;
    }
}

impl Pool {
    /// Test-only fault: forget `uuid`'s crunch-run on every worker without stopping it, as a
    /// pool with a bookkeeping bug would. Tests use it to show that the stub cloud's record
    /// ([`testkit::oracle`](../../testkit/oracle/index.html)) catches the double start that
    /// follows. Never called by the dispatcher.
    #[doc(hidden)]
    pub fn test_forget_process(&self, uuid: &str) {
        let mut st = self.lock();
        for w in st.workers.values_mut() {
            if let Some(r) = w.running.remove(uuid).or_else(|| w.starting.remove(uuid)) {
                r.close();
            }
        }
    }
}

/// The pool's answers to the scheduler, computed from one locked view of the state.
impl Pool {
    fn running_locked(st: &State) -> RunningMap {
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

    fn instances_locked(st: &State) -> Vec<InstanceView> {
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

    fn count_workers_locked(st: &State) -> BTreeMap<WorkerState, usize> {
        let mut m = BTreeMap::new();
        for w in st.workers.values() {
            *m.entry(w.state).or_insert(0) += 1;
        }
        m
    }

    fn quota_headroom_locked(&self, st: &State, now: Instant) -> Option<usize> {
        if self.at_quota_locked(st, now) {
            return Some(0);
        }
        (self.cfg.max_instances > 0).then(|| {
            self.cfg
                .max_instances
                .saturating_sub(st.workers.len() + st.creating.len())
        })
    }

    fn create_budget_locked(&self, st: &State, now: Instant) -> Option<usize> {
        if self.cfg.runner_error.is_some() || self.create_throttled(st, now) {
            return Some(0);
        }
        let max = st.max_concurrent_creates;
        (max > 0).then(|| max.saturating_sub(st.creates_in_flight()))
    }

    /// Is `uuid` running or starting on any worker?
    fn placed_anywhere(st: &State, uuid: &str) -> Option<String> {
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
        if w.idle_behavior != IdleBehavior::Run || !w.state.is_ready() {
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
        if w.state != WorkerState::Running {
            w.state = WorkerState::Running;
        }
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
        tokio::spawn(async move {
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
