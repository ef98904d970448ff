//! The scheduler (spec §7): decides what runs where and what to pay for.
//!
//! * [`plan`]: one pass as a pure function, queue snapshot + pool snapshot → [`QueuePlan`]
//!   (locks, creates, starts, unlocks, shutdowns, statuses), using [`index`] so a pass is
//!   near O((N + M) log M).
//! * [`sync`]: reconciling queue and pool as a pure function → [`SyncAction`]s.
//! * [`pool`]: the narrow interface the worker pool implements; [`stub`] implements it in
//!   memory for tests and benchmarks.
//! * This module: the thin async shell ([`Scheduler`]) that polls the queue, runs
//!   `fixStaleLocks` at startup, carries plans out (never holding a lock across an API call),
//!   and publishes metrics and the last pass's queue for the management API.

#[cfg(test)]
mod choices;
pub mod index;
pub mod plan;
pub mod pool;
#[cfg(test)]
mod props;
#[cfg(test)]
mod reference;
pub mod scale;
pub mod status;
pub mod stub;
pub mod sync;
#[cfg(test)]
mod tests;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arvados::config::Cluster;
use arvados::types::ContainerState;
use chrono::{DateTime, Utc};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::tasks::Tasks;

use crate::worker_state::{IdleBehavior, WorkerState};
pub use plan::{Limits, PoolSnapshot, QueueOrder, QueuePlan, SchedConfig, plan_queue};
pub use pool::{RunningMap, WorkerPool};
pub use status::Status;
pub use sync::{SyncAction, plan_interruptions, plan_sync, wanted_types};

use crate::fasthash::FastSet;
use crate::queue::{ContainerQueue, QueueEnt, uuid_hash};

/// The wakeup delay after an operation on a container was skipped because another one was
/// still in progress (spec §7.9).
const OP_RETRY: Duration = Duration::from_millis(250);

/// The queue as the last pass saw it: its entries and the order it left.
#[derive(Debug, Default)]
pub struct QueueView {
    pub entries: Vec<Arc<QueueEnt>>,
    pub order: QueueOrder,
}

impl QueueView {
    /// Entries in scheduling order with their statuses.
    pub fn sorted(&self) -> Vec<(Arc<QueueEnt>, Status)> {
        self.order.sorted(&self.entries)
    }
}

pub type SortedQueue = Arc<QueueView>;

/// Scheduler gauges (spec §7.7).
struct Metrics {
    allocated_not_started: prometheus::IntGauge,
    over_quota: prometheus::IntGauge,
    longest_wait: prometheus::Gauge,
    last_503: prometheus::Gauge,
    max_concurrent: prometheus::IntGauge,
    /// Not in Arvados: how long each round (plan, carry out, sync) takes.
    pass_duration: prometheus::Histogram,
    /// Not in Arvados: the spend caps (0: none), the headroom under them at the last pass
    /// (+Inf without a cap), today's spend, and containers waiting because of a cap.
    spend_cap: prometheus::GaugeVec,
    spend_headroom: prometheus::Gauge,
    spent_today: prometheus::Gauge,
    waiting_spend_cap: prometheus::IntGauge,
    /// Not in Arvados: containers that fell back from spot to on demand (`SpotFallback`).
    spot_fallbacks: prometheus::IntCounter,
}

use cloud::metrics::registered as register;

use cloud::metrics::dispatchcloud_opts as opts;

impl Metrics {
    fn new(registry: &prometheus::Registry) -> Result<Metrics, prometheus::Error> {
        Ok(Metrics {
            allocated_not_started: register(
                registry,
                prometheus::IntGauge::with_opts(opts(
                    "containers_allocated_not_started",
                    "Number of containers allocated to a worker but not started yet (worker is booting).",
                ))?,
            )?,
            over_quota: register(
                registry,
                prometheus::IntGauge::with_opts(opts(
                    "containers_not_allocated_over_quota",
                    "Number of containers not allocated to a worker because the system has hit a quota.",
                ))?,
            )?,
            longest_wait: register(
                registry,
                prometheus::Gauge::with_opts(opts(
                    "containers_longest_wait_time_seconds",
                    "Current longest wait time of any container since queuing, and before the start of crunch-run.",
                ))?,
            )?,
            last_503: register(
                registry,
                prometheus::Gauge::with_opts(opts(
                    "last_503_time",
                    "Time of most recent 503 error received from API.",
                ))?,
            )?,
            max_concurrent: register(
                registry,
                prometheus::IntGauge::with_opts(opts(
                    "max_concurrent_containers",
                    "Dynamically assigned limit on number of containers scheduled concurrency, set after receiving 503 errors from API.",
                ))?,
            )?,
            pass_duration: register(
                registry,
                prometheus::Histogram::with_opts(
                    prometheus::HistogramOpts::from(opts(
                        "scheduling_pass_duration_seconds",
                        "Seconds per scheduling pass: plan, lock/start/unlock, sync.",
                    ))
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0,
                    ]),
                )?,
            )?,
            spend_cap: register(
                registry,
                prometheus::GaugeVec::new(
                    opts(
                        "spend_cap",
                        "Configured fleet spend cap (SpendCaps in the settings file) in the unit of InstanceTypes Price, by period (hour, day); 0 means no cap.",
                    ),
                    &["period"],
                )?,
            )?,
            spend_headroom: register(
                registry,
                prometheus::Gauge::with_opts(opts(
                    "spend_headroom_per_hour",
                    "Hourly price that new instances could still add under the spend caps at the last scheduling pass (+Inf without a cap).",
                ))?,
            )?,
            spent_today: register(
                registry,
                prometheus::Gauge::with_opts(opts(
                    "spent_today",
                    "Cost of the fleet since 00:00 UTC as seen by this process (for SpendCaps.MaxCostPerDay).",
                ))?,
            )?,
            waiting_spend_cap: register(
                registry,
                prometheus::IntGauge::with_opts(opts(
                    "containers_waiting_spend_cap",
                    "Containers waiting at the last scheduling pass because a new instance would exceed a spend cap.",
                ))?,
            )?,
            spot_fallbacks: register(
                registry,
                prometheus::IntCounter::with_opts(opts(
                    "spot_fallbacks_total",
                    "Containers that asked for a preemptible instance and fell back to an on-demand one after waiting SpotFallback.After with every spot type held off.",
                ))?,
            )?,
        })
    }
}

/// `arvados_dispatchcloud_at_quota`, read from the pool when scraped.
struct AtQuotaGauge<P: WorkerPool> {
    pool: Arc<P>,
    desc: Desc,
}

impl<P: WorkerPool> Collector for AtQuotaGauge<P> {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let g = prometheus::Gauge::with_opts(opts(
            "at_quota",
            "Flag indicating the cloud driver is reporting an at-quota condition.",
        ))
        .expect("valid gauge options");
        g.set(if self.pool.at_quota() { 1.0 } else { 0.0 });
        g.collect()
    }
}

/// The shortest time from the start of one pass to the start of the next.
pub const MIN_PASS_GAP: Duration = Duration::from_millis(25);

/// When the next pass may start: [`MIN_PASS_GAP`] after the last one started, and never
/// before as long again as the last one took has passed after it ended, so that passes use at
/// most half a core however busy the cluster is. Measured: without this, under load, passes
/// ran back to back and the pool's snapshot alone took a third of the process's CPU.
pub fn next_pass_at(started: tokio::time::Instant, took: Duration) -> tokio::time::Instant {
    started + MIN_PASS_GAP.max(took * 2)
}

/// Settings of the async shell.
#[derive(Debug, Clone)]
pub struct ShellConfig {
    pub poll_interval: Duration,
    pub stale_lock_timeout: Duration,
    /// The longest `fix_stale_locks` waits for reachable adopted workers to report
    /// (`TimeoutBooting`): past it, a worker that answers SSH but never lists its processes
    /// is as good as broken, and scheduling must start.
    pub adopted_report_timeout: Duration,
}

impl ShellConfig {
    pub fn from_cluster(cluster: &Cluster) -> ShellConfig {
        ShellConfig {
            poll_interval: cluster.containers.cloud_vms.poll_interval,
            stale_lock_timeout: cluster.containers.stale_lock_timeout,
            adopted_report_timeout: if cluster.containers.cloud_vms.timeout_booting.is_zero() {
                Duration::from_secs(600)
            } else {
                cluster.containers.cloud_vms.timeout_booting
            },
        }
    }
}

/// The scheduler: a loop of plan, carry out, sync, metrics.
pub struct Scheduler<P: WorkerPool> {
    queue: Arc<ContainerQueue>,
    pool: Arc<P>,
    cfg: SchedConfig,
    shell: ShellConfig,
    limits: Mutex<Limits>,
    /// Per-container operation in progress (spec §7.9).
    ops: Mutex<HashMap<String, &'static str>>,
    wakeup: Notify,
    last_queue: Mutex<SortedQueue>,
    metrics: Metrics,
    /// Every task the scheduler spawns (the poller, locks, unlocks, cancels, retries).
    /// Cancelled by [`Scheduler::stop`]: no further API changes (lock, unlock, cancel) or pool
    /// actions, even from tasks already spawned; [`Scheduler::join`] waits for them.
    tasks: Tasks,
}

/// How long a pass waits for its unlocks before going on (they finish in the background).
const UNLOCK_WAIT: Duration = Duration::from_secs(2);

impl<P: WorkerPool> Scheduler<P> {
    pub fn new(
        queue: Arc<ContainerQueue>,
        pool: Arc<P>,
        cfg: SchedConfig,
        shell: ShellConfig,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let metrics = Metrics::new(registry)?;
        metrics
            .spend_cap
            .with_label_values(&["hour"])
            .set(cfg.spend_caps.max_cost_per_hour);
        metrics
            .spend_cap
            .with_label_values(&["day"])
            .set(cfg.spend_caps.max_cost_per_day);
        metrics.spend_headroom.set(f64::INFINITY);
        let desc = Desc::new(
            "arvados_dispatchcloud_at_quota".into(),
            "Flag indicating the cloud driver is reporting an at-quota condition.".into(),
            vec![],
            HashMap::new(),
        )?;
        registry.register(Box::new(AtQuotaGauge {
            pool: pool.clone(),
            desc,
        }))?;
        Ok(Arc::new(Scheduler {
            limits: Mutex::new(Limits::new(&cfg)),
            queue,
            pool,
            cfg,
            shell,
            ops: Mutex::new(HashMap::new()),
            wakeup: Notify::new(),
            last_queue: Mutex::new(Arc::new(QueueView::default())),
            metrics,
            tasks: Tasks::new(),
        }))
    }

    /// Stop acting: from now on nothing is locked, unlocked, cancelled, created, started or
    /// killed by this scheduler (used when the dispatcher lock is lost, and on shutdown).
    pub fn stop(&self) {
        self.tasks.cancel();
    }

    /// After [`Scheduler::stop`]: wait up to `limit` for the scheduler's tasks (API calls
    /// already under way finish within their deadlines). False if some were still running.
    pub async fn join(&self, limit: Duration) -> bool {
        self.tasks.join("scheduler", limit).await
    }

    fn is_stopped(&self) -> bool {
        self.tasks.is_cancelled()
    }

    /// The configured spend caps.
    pub fn spend_caps(&self) -> crate::settings::SpendCaps {
        self.cfg.spend_caps
    }

    /// The queue as of the last pass, in scheduling order, with statuses.
    pub fn queue_view(&self) -> SortedQueue {
        self.last_queue.lock().clone()
    }

    /// The dynamic limits as of the last pass.
    pub fn limits(&self) -> Limits {
        self.limits.lock().clone()
    }

    /// Run until `shutdown` is cancelled (spec §7.2).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        // First queue update, retried until it works.
        let retry = (self.shell.poll_interval / 10).max(Duration::from_secs(1));
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let update = tokio::select! {
                r = self.queue.update() => r,
                _ = shutdown.cancelled() => return,
            };
            match update {
                Ok(()) => break,
                Err(err) => {
                    tracing::error!(error = %err, "error updating queue");
                    tracing::info!("waiting {retry:?} before retry");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
        // The poller ends with this function, whichever way it returns.
        let poller = shutdown.child_token();
        let _poller_guard = poller.clone().drop_guard();
        self.tasks.spawn(poll_queue(
            self.queue.clone(),
            self.shell.poll_interval,
            poller,
        ));
        tracing::info!("FixStaleLocks starting.");
        let t0 = std::time::Instant::now();
        tokio::select! {
            _ = self.fix_stale_locks() => {}
            _ = shutdown.cancelled() => return,
        }
        tracing::info!(
            "FixStaleLocks finished ({:?}), starting scheduling.",
            t0.elapsed()
        );
        let mut pool_rx = self.pool.subscribe();
        let mut queue_rx = self.queue.subscribe();
        loop {
            let started = tokio::time::Instant::now();
            // A pass waits on the API (unlocks) and the pool; shutdown does not wait for it.
            tokio::select! {
                _ = self.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = pool_rx.changed() => if r.is_err() { break },
                r = queue_rx.changed() => if r.is_err() { break },
                _ = self.wakeup.notified() => {}
            }
            // Under load the pool changes all the time; changes that come while the next
            // pass may not start yet are handled together by it (see `next_pass_at`).
            tokio::select! {
                _ = tokio::time::sleep_until(next_pass_at(started, started.elapsed())) => {}
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// One round: plan and carry out a pass, sync, metrics.
    pub async fn tick(self: &Arc<Self>) {
        if self.is_stopped() {
            return;
        }
        let _timer = self.metrics.pass_duration.start_timer();
        self.run_queue().await;
        if self.is_stopped() {
            return;
        }
        // One snapshot serves both sync and the wait metric.
        let running = self.pool.running();
        let (entries, threshold) = self.queue.entries();
        self.sync_snapshot(&entries, &running, threshold);
        if self.cfg.idle_adaptive {
            self.pool
                .set_wanted_types(wanted_types(&entries, &running, 10_000));
        }
        self.metrics
            .longest_wait
            .set(longest_wait(&entries, &running, Utc::now()));
    }

    /// Plan one pass and carry it out.
    pub async fn run_queue(self: &Arc<Self>) -> QueuePlan {
        let (entries, _) = self.queue.entries();
        let snapshot = PoolSnapshot::take(&*self.pool, &self.cfg);
        let plan = {
            let mut limits = self.limits.lock();
            plan_queue(
                &self.cfg,
                &mut limits,
                &entries,
                &snapshot,
                self.queue.client().last_503(),
                SystemTime::now(),
            )
        };
        let last_503 = self
            .limits()
            .last_503
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.last_503.set(last_503);
        self.metrics.max_concurrent.set(plan.max_containers as i64);
        self.metrics
            .allocated_not_started
            .set(plan.allocated_not_started as i64);
        self.metrics
            .over_quota
            .set(plan.not_allocated_over_quota as i64);
        // Room for more queued containers than the queue holds? (Incremental polling then
        // fetches beyond the top 100; otherwise nobody asks, and a pass over a big queue need
        // not count it.)
        if self.queue.is_incremental() {
            let queued = entries
                .iter()
                .filter(|e| {
                    let c = e.container();
                    c.state == ContainerState::Queued && c.priority > 0
                })
                .count();
            self.queue
                .set_room(room_after_pass(&snapshot, &plan, queued));
        }
        self.metrics
            .spend_headroom
            .set(plan.spend_headroom.unwrap_or(f64::INFINITY));
        self.metrics.spent_today.set(snapshot.spent_today);
        if self.cfg.spend_caps.is_set() {
            self.metrics.waiting_spend_cap.set(
                plan.queue
                    .statuses
                    .iter()
                    .filter(|s| matches!(s, Status::SpendCap(..)))
                    .count() as i64,
            );
        }

        for uuid in &plan.spot_fallbacks {
            tracing::info!(ContainerUUID = %uuid, "every spot type it can use is short of capacity: falling back to on demand");
            self.metrics.spot_fallbacks.inc();
        }
        for uuid in &plan.locks {
            let s = self.clone();
            let uuid = uuid.clone();
            self.tasks
                .spawn(async move { s.lock_container(&uuid).await });
        }
        for (it, uuid) in &plan.creates {
            tracing::info!(ContainerUUID = %uuid, InstanceType = %it.name, "creating new instance");
            if self.pool.create(it).is_none() {
                tracing::debug!(ContainerUUID = %uuid, InstanceType = %it.name, "pool declined to create instance");
            }
        }
        for (id, ent) in &plan.starts {
            if !self.pool.start_container(id, ent.container()) {
                tracing::debug!(ContainerUUID = %ent.container().uuid, Instance = %id, "pool declined to start container");
            }
        }
        *self.last_queue.lock() = Arc::new(QueueView {
            entries,
            order: plan.queue.clone(),
        });
        // Unlocks run concurrently under their op locks; the pass waits a moment for them
        // (so the next pass usually sees them done) but never for a hung API.
        let mut unlocks = tokio::task::JoinSet::new();
        for uuid in &plan.unlocks {
            if !self.op_lock(uuid, "unlock") {
                continue;
            }
            tracing::info!(ContainerUUID = %uuid, "unlock because pool capacity is used by higher priority containers");
            let (s, uuid) = (self.clone(), uuid.clone());
            unlocks.spawn(async move {
                if !s.is_stopped()
                    && let Err(err) = s.queue.unlock(&uuid).await
                {
                    tracing::warn!(ContainerUUID = %uuid, error = %err, "error unlocking");
                }
                s.op_unlock(&uuid);
            });
        }
        if !unlocks.is_empty() {
            let all = async { while unlocks.join_next().await.is_some() {} };
            if tokio::time::timeout(UNLOCK_WAIT, all).await.is_err() {
                unlocks.detach_all();
            }
        }
        for id in &plan.shutdowns {
            self.pool.shutdown(id);
        }
        plan
    }

    /// Take the per-container operation lock; if busy, schedule a retry soon.
    fn op_lock(self: &Arc<Self>, uuid: &str, op: &'static str) -> bool {
        let mut ops = self.ops.lock();
        if let Some(cur) = ops.get(uuid) {
            tracing::debug!(ContainerUUID = %uuid, Op = cur, "uuidLock not available");
            let s = self.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(OP_RETRY) => s.wakeup.notify_one(),
                    _ = s.tasks.cancelled() => {}
                }
            });
            return false;
        }
        ops.insert(uuid.to_string(), op);
        true
    }

    fn op_unlock(&self, uuid: &str) {
        self.ops.lock().remove(uuid);
    }

    async fn lock_container(self: &Arc<Self>, uuid: &str) {
        if self.is_stopped() || !self.op_lock(uuid, "lock") {
            return;
        }
        match self.queue.get(uuid) {
            Some(e) if e.container().state == ContainerState::Queued => {
                match self.queue.lock(uuid).await {
                    Err(err) => {
                        tracing::warn!(ContainerUUID = %uuid, error = %err, "error locking container")
                    }
                    Ok(()) => match self.queue.get(uuid) {
                        None => {
                            tracing::error!(ContainerUUID = %uuid, "(BUG?) container disappeared from queue after Lock succeeded")
                        }
                        Some(e) if e.container().state != ContainerState::Locked => tracing::warn!(
                            ContainerUUID = %uuid,
                            "(race?) container has state={} after Lock succeeded",
                            e.container().state
                        ),
                        Some(_) => {}
                    },
                }
            }
            _ => {
                tracing::debug!(ContainerUUID = %uuid, "container no longer queued by the time we decided to lock it, doing nothing")
            }
        }
        self.op_unlock(uuid);
    }

    /// Reconcile queue and pool (spec §7.6); actions run in the background.
    pub fn sync(self: &Arc<Self>) -> Vec<SyncAction> {
        let running = self.pool.running();
        let (entries, threshold) = self.queue.entries();
        self.sync_snapshot(&entries, &running, threshold)
    }

    fn sync_snapshot(
        self: &Arc<Self>,
        entries: &[Arc<QueueEnt>],
        running: &RunningMap,
        threshold: Option<DateTime<Utc>>,
    ) -> Vec<SyncAction> {
        let any_unknown = self
            .pool
            .count_workers()
            .get(&WorkerState::Unknown)
            .is_some_and(|&n| n > 0);
        let actions = plan_sync(entries, running, threshold, any_unknown);
        if self.is_stopped() {
            return actions;
        }
        if self.cfg.interruptions.drain {
            for uuid in plan_interruptions(entries, running) {
                if self
                    .pool
                    .interruption_notice(&uuid, self.cfg.interruptions.pre_boot)
                {
                    tracing::info!(ContainerUUID = %uuid, "spot interruption notice: draining its instance");
                }
            }
        }
        for a in &actions {
            match a.clone() {
                SyncAction::Forget { uuid, reason } => {
                    tracing::info!(ContainerUUID = %uuid, "{reason}");
                    self.queue.forget(&uuid);
                }
                SyncAction::Cancel { uuid, reason } => {
                    if !self.op_lock(&uuid, "cancel") {
                        continue;
                    }
                    let s = self.clone();
                    self.tasks.spawn(async move {
                        tracing::info!(ContainerUUID = %uuid, "cancelling container because {reason}");
                        if s.is_stopped() {
                            s.op_unlock(&uuid);
                            return;
                        }
                        // Every sync cancel is of a container the cache has as Running.
                        if let Err(err) = s
                            .queue
                            .cancel_if_still(&uuid, ContainerState::Running)
                            .await
                        {
                            tracing::warn!(ContainerUUID = %uuid, error = %err, "error cancelling container");
                        }
                        s.op_unlock(&uuid);
                    });
                }
                SyncAction::Requeue { uuid, reason } => {
                    if !self.op_lock(&uuid, "requeue") {
                        continue;
                    }
                    let s = self.clone();
                    self.tasks.spawn(async move {
                        tracing::info!(ContainerUUID = %uuid, "requeueing locked container because {reason}");
                        if s.is_stopped() {
                            s.op_unlock(&uuid);
                            return;
                        }
                        if let Err(err) = s.queue.unlock(&uuid).await {
                            tracing::warn!(ContainerUUID = %uuid, error = %err, "error requeueing container");
                        }
                        s.op_unlock(&uuid);
                    });
                }
                SyncAction::Kill { uuid, reason } => {
                    if !self.op_lock(&uuid, "kill") {
                        continue;
                    }
                    self.pool.kill_container(&uuid, &reason);
                    self.pool.forget_container(&uuid);
                    self.op_unlock(&uuid);
                }
            }
        }
        actions
    }

    /// `containers_longest_wait_time_seconds`: the oldest Queued or Locked container with
    /// priority > 0 that is not on a worker.
    pub fn update_metrics(&self) {
        let running = self.pool.running();
        let (entries, _) = self.queue.entries();
        self.metrics
            .longest_wait
            .set(longest_wait(&entries, &running, Utc::now()));
    }

    /// Requeue containers a previous dispatcher process locked that turn out not to be running
    /// anywhere, once the adopted VMs have reported their processes (spec §7.8). Better than
    /// Go (§13.3 item 19): the stale list is computed after the last wait, so a container a
    /// worker reported in that last probe is not unlocked. And better than Go's
    /// `StaleLockTimeout` alone: while an adopted worker that answers SSH has not reported
    /// (slow network, slow VM) its containers are not unlocked even after the timeout, since
    /// unlocking one that runs there would start it a second time elsewhere. That wait ends
    /// after `TimeoutBooting` whatever happens, so one odd VM cannot stop scheduling; VMs that
    /// do not answer SSH at all count only for `StaleLockTimeout`, as in Go.
    pub async fn fix_stale_locks(&self) {
        let mut rx = self.pool.subscribe();
        let started = tokio::time::Instant::now();
        let deadline = started + self.shell.stale_lock_timeout;
        let last_resort = started
            + self
                .shell
                .adopted_report_timeout
                .max(self.shell.stale_lock_timeout);
        while !self.pool.loaded() {
            if rx.changed().await.is_err() {
                return;
            }
        }
        let stale = || -> Vec<String> {
            let running = self.pool.running();
            let (entries, _) = self.queue.entries();
            let mut v: Vec<String> = entries
                .iter()
                .filter(|e| {
                    e.container().state == ContainerState::Locked
                        && !running.contains_key(&e.container().uuid)
                })
                .map(|e| e.container().uuid.clone())
                .collect();
            v.sort();
            v
        };
        let mut waited = false;
        let mut said_past_deadline = false;
        loop {
            let unreported = self.pool.unreported_workers();
            let unknown = self
                .pool
                .count_workers()
                .get(&WorkerState::Unknown)
                .copied()
                .unwrap_or(0);
            let now = tokio::time::Instant::now();
            let past_deadline = now >= deadline;
            if (unreported == 0 || now >= last_resort) && (unknown == 0 || past_deadline) {
                if unreported > 0 {
                    tracing::warn!(
                        N = unreported,
                        "adopted instances still have not reported their containers; unlocking stale containers anyway"
                    );
                }
                break;
            }
            if stale().is_empty() {
                return;
            }
            waited = true;
            if past_deadline && !said_past_deadline {
                said_past_deadline = true;
                tracing::warn!(
                    N = unreported,
                    "StaleLockTimeout passed, but adopted instances have not reported their containers yet; not unlocking until they do (or are shut down)"
                );
            }
            let wake = if past_deadline { last_resort } else { deadline };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        if !waited {
            return;
        }
        for uuid in stale() {
            if self.is_stopped() {
                return;
            }
            if let Err(err) = self.queue.unlock(&uuid).await {
                tracing::warn!(ContainerUUID = %uuid, error = %err, "error unlocking stale container");
            }
        }
    }
}

/// How many more containers the fleet could start now, after this pass (at most 1 000): the
/// empty idle or booting instances and the instances the pool may still add, less what the
/// pass locked, started, or allocated to an instance still to boot or be created. 0 unless
/// every queued container the queue holds (`queued`) got a lock: then fetching more of the
/// queue would help. Incremental polling reaches that far past Arvados' top 100
/// ([`crate::queue::ContainerQueue::set_room`]).
pub fn room_after_pass(snapshot: &PoolSnapshot, plan: &QueuePlan, queued: usize) -> usize {
    if plan.locks.len() < queued {
        return 0;
    }
    let empty = snapshot
        .instances
        .iter()
        .filter(|i| {
            matches!(i.worker_state, WorkerState::Idle | WorkerState::Booting)
                && i.idle_behavior == IdleBehavior::Run
                && i.running_container_uuids.is_empty()
        })
        .count();
    let headroom = if snapshot.at_quota {
        0
    } else {
        snapshot.quota_headroom.unwrap_or(1000)
    };
    // Locked containers waiting for a booting instance (counted as empty above) or for a
    // create (counted in the headroom) are spoken for too.
    (empty + headroom)
        .saturating_sub(plan.locks.len() + plan.starts.len() + plan.allocated_not_started)
        .min(1000)
}

/// Seconds the oldest waiting container (Queued or Locked, priority > 0, not on a worker) has
/// waited since it was created; 0 if none waits.
pub fn longest_wait(entries: &[Arc<QueueEnt>], running: &RunningMap, now: DateTime<Utc>) -> f64 {
    let known: FastSet<u64> = running.keys().map(|u| uuid_hash(u)).collect();
    let oldest = entries
        .iter()
        .filter(|e| {
            let h = e.sched();
            matches!(h.state, ContainerState::Queued | ContainerState::Locked)
                && h.priority > 0
                && !(known.contains(&h.uuid_hash) && running.contains_key(&e.container().uuid))
        })
        .filter_map(|e| e.sched().created_ms)
        .min();
    oldest.map_or(0.0, |t| (now.timestamp_millis() - t).max(0) as f64 / 1000.0)
}

/// The background queue poller: update, then sleep the poll interval (or as long as the
/// update took, if longer).
async fn poll_queue(queue: Arc<ContainerQueue>, interval: Duration, shutdown: CancellationToken) {
    loop {
        let t0 = std::time::Instant::now();
        let update = tokio::select! {
            r = queue.update() => r,
            _ = shutdown.cancelled() => return,
        };
        if let Err(err) = update {
            tracing::error!(error = %err, "error updating queue");
        }
        let wait = interval.max(t0.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
