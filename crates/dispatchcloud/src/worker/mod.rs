//! The worker pool (spec §8): every VM of this dispatcher, from create to destroy. The
//! states and their transitions are [`crate::worker_state`]; this module carries them out.
//!
//! * this file: the shared state behind one lock, start/stop, the loops, gauges, views.
//! * `create.rs`: creating (quota, capacity, concurrency, unknown outcomes; §8.5).
//! * `capacity.rs`: capacity state per offering (the hold-off list's capacity entries, the
//!   `Capacity.StateFile` kept across restarts) and spot interruption notices.
//! * `cloud_sync.rs`: syncing with the cloud list, adoption, tags (§8.6, §8.14).
//! * `probe.rs`: boot probe, host verification, runner deployment, run probe (§8.7–8.10).
//! * `scheduler_api.rs`: the [`WorkerPool`](crate::scheduler::pool::WorkerPool) interface the
//!   scheduler uses, and starting containers (§8.11).
//! * `shutdown.rs`: idle rules, operator kills, destroying (§8.13).
//! * [`runner`]: a crunch-run process, its kill loop and the pool's side of its end (§8.12).
//! * [`record`]: one worker's record and the pure rules over it.
//! * [`config`]: settings resolved from the cluster config, and the command lines and stdin of
//!   the remote command contract.
//! * [`metrics`]: the pool's Prometheus metrics.
//!
//! One `parking_lot::Mutex` guards the state; it is never held across an `.await`. Cloud calls
//! and SSH commands run in spawned tasks, which take the lock again to record their result.
//!
//! Where Go has a known bug (spec §13.3) this pool does the right thing; each such case has a
//! test named `bug_13_3_<item>_…`.

mod capacity;
mod cloud_sync;
pub mod config;
mod create;
pub mod metrics;
mod probe;
pub mod record;
pub mod runner;
mod scheduler_api;
mod shutdown;
#[cfg(test)]
mod tests;

use parking_lot::{Mutex, MutexGuard};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use chrono::{DateTime, Utc};
use cloud::InstanceSet;
use cloud::wrappers::Throttled;
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

pub use capacity::{CapacityFile, OfferingState, parse as capacity_file};
pub use config::PoolConfig;
use create::Creating;
pub use create::HoldOff;
use metrics::{PoolMetrics, Sample};
use record::Worker;

use crate::tasks::Tasks;
use crate::worker_state::{InstanceView, WorkerState};

/// How often the pool's gauges and cumulative counters are refreshed when nothing changes.
const METRICS_REFRESH: Duration = Duration::from_secs(5);

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
    /// Capacity errors in a row per capacity key (reset by a successful create of the type).
    capacity_failures: HashMap<String, u32>,
    /// The cloud's last capacity error per capacity key.
    capacity_error: HashMap<String, String>,
    /// With zones: the zone of each offering's last successful create (tried first).
    last_good_zone: HashMap<String, String>,
    /// With zones: `providertype@zone` where a create of either market met a capacity error
    /// and none of the type has succeeded since (tried after the zones without trouble).
    zone_trouble: std::collections::HashSet<String>,
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
    /// Bumped when the capacity state changes (the state file's writer waits on it).
    capacity_changes: watch::Sender<u64>,
    /// Demand per instance type, for `IdleTime.Adaptive` (its own lock, taken after the
    /// state's when both are held).
    demand: Mutex<shutdown::Demand>,
    /// The zones creates are pinned to, each its own offering (with `Capacity.Backoff` and a
    /// driver with more than one zone; empty otherwise: the driver chooses, as in Arvados).
    zones: Vec<String>,
    /// Every task the pool spawns. Cancelled by [`Pool::stop`]: loops and waits end, creates
    /// and starts are refused; [`Pool::join`] waits for the tasks.
    tasks: Tasks,
    pub metrics: PoolMetrics,
    /// What the pool did, for the status page.
    pub events: crate::events::EventLog,
    /// A standby's read-only pool: [`Pool::sync`] learns the cloud's instances but changes
    /// nothing in the cloud (no tag writes); nothing else runs until [`Pool::start`].
    passive: std::sync::atomic::AtomicBool,
    me: Weak<Pool>,
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
        if cfg.interruptions.drain {
            set.watch_interruptions();
        }
        let zones = match set.zones() {
            z if cfg.capacity.backoff && z.len() > 1 => z,
            _ => Vec::new(),
        };
        Ok(Arc::new_cyclic(|me| Pool {
            zones,
            set: Arc::new(Throttled::new(set)),
            state: Mutex::new(State {
                max_concurrent_creates: cfg.max_concurrent_creates,
                ..State::default()
            }),
            notify: watch::channel(0).0,
            capacity_changes: watch::channel(0).0,
            demand: Default::default(),
            tasks: Tasks::new(),
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

    /// Start the sync, probe and metrics loops (and load and keep `Capacity.StateFile`, if
    /// set: at start, so a standby that takes over reads what the last dispatcher wrote).
    pub fn start(self: &Arc<Self>) {
        self.load_capacity_state();
        if let Some(path) = self.cfg.capacity.state_file.clone() {
            self.spawn(self.clone().capacity_state_loop(path));
        }
        self.spawn(self.clone().sync_loop());
        self.spawn(self.clone().probe_loop());
        self.spawn(self.clone().metrics_loop());
    }

    /// Stop the loops. Instances are left as they are, for the next dispatcher to adopt.
    pub fn stop(&self) {
        self.tasks.cancel();
    }

    /// After [`Pool::stop`]: wait up to `limit` for the pool's tasks to end. Loops and waits end
    /// at once; cloud calls and SSH commands already under way finish within their own
    /// deadlines, so a bounded wait suffices. False if some were still running at `limit`.
    pub async fn join(&self, limit: Duration) -> bool {
        self.tasks.join("worker pool", limit).await
    }

    /// Background tasks still running (loops, probes, cloud calls, SSH commands).
    pub fn tasks_running(&self) -> usize {
        self.tasks.len()
    }

    /// Run `task` on the runtime, tracked so that [`Pool::join`] waits for it.
    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Stopped: creates and starts are refused (another dispatcher may own the cluster now).
    fn is_stopped(&self) -> bool {
        self.tasks.is_cancelled()
    }

    /// Sleep `d`; false if the pool was stopped meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        self.tasks.pause(d).await
    }

    async fn sync_loop(self: Arc<Self>) {
        loop {
            if let Err(e) = self.sync().await {
                tracing::warn!(error = %e, "sync failed");
                self.events
                    .push("error", "cloud", format!("listing instances failed: {e}"));
            }
            if !self.pause(self.cfg.sync_interval).await {
                return;
            }
        }
    }

    async fn metrics_loop(self: Arc<Self>) {
        let mut changes = self.notify.subscribe();
        loop {
            self.update_metrics();
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = self.tasks.cancelled() => return,
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
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.metrics.set_capacity(
            st.at_capacity_until
                .iter()
                .filter(|(_, t)| now < **t)
                .map(|(k, t)| (k.as_str(), unix_now + (*t - now).as_secs_f64())),
            st.capacity_failures
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (k.as_str(), *n)),
        );
    }

    /// Whether the pool can work: the runner binary, if one is to be deployed, was loaded.
    pub fn check_health(&self) -> Result<(), String> {
        match &self.cfg.runner_error {
            Some(e) => Err(format!("error loading runner binary: {e}")),
            None => Ok(()),
        }
    }

    /// Make the pool read-only (a standby's warm view) or normal again.
    pub fn set_passive(&self, passive: bool) {
        self.passive
            .store(passive, std::sync::atomic::Ordering::SeqCst);
    }

    fn is_passive(&self) -> bool {
        self.passive.load(std::sync::atomic::Ordering::SeqCst)
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
