//! What the scheduler needs from a worker pool (spec §7.1), and nothing more: the narrow
//! interface the worker pool implements, plus the value types it hands over. Every method is
//! in-memory and non-blocking (creates, starts and kills proceed in the background), so the
//! scheduler can call them from its loop. [`super::stub::StubPool`] implements it for tests.

use std::collections::BTreeMap;

use arvados::InstanceType;
use arvados::types::Container;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::fasthash::FastMap;
use crate::worker_state::{InstanceView, WorkerState};

/// uuid → when the pool noticed its crunch-run exit (`None`: starting or running).
pub type RunningMap = FastMap<String, Option<DateTime<Utc>>>;

/// The worker pool as the scheduler sees it.
pub trait WorkerPool: Send + Sync + 'static {
    /// Containers being started or run on any worker, plus exited ones not yet forgotten.
    fn running(&self) -> RunningMap;
    /// All workers, including pending creates (empty instance id).
    fn instances(&self) -> Vec<InstanceView>;
    /// Workers per state. Only meaningful once [`loaded`](Self::loaded) is true.
    fn count_workers(&self) -> BTreeMap<WorkerState, usize>;
    /// Whether the first instance list from the cloud has been loaded.
    fn loaded(&self) -> bool;
    /// A recent capacity error applies to this type.
    fn at_capacity(&self, it: &InstanceType) -> bool;
    /// Cloud quota or `MaxInstances` reached.
    fn at_quota(&self) -> bool;
    /// How many more instances can exist before [`at_quota`](Self::at_quota) turns true
    /// (`None`: no known limit).
    fn quota_headroom(&self) -> Option<usize>;
    /// How many creates the pool would accept right now (`None`: no limit).
    fn create_budget(&self) -> Option<usize>;
    /// Start creating an instance; `None` if the pool declined.
    fn create(&self, it: &InstanceType) -> Option<InstanceView>;
    /// Destroy a booting or idle, non-hold worker.
    fn shutdown(&self, instance_id: &str) -> bool;
    /// Start a container on an idle or running worker with idle behaviour `run`.
    fn start_container(&self, instance_id: &str, ctr: &Container) -> bool;
    /// Start killing the container's crunch-run; false if none is known.
    fn kill_container(&self, uuid: &str, reason: &str) -> bool;
    /// Clear an exited placeholder.
    fn forget_container(&self, uuid: &str);
    /// A spot interruption notice for the instance running `uuid` (settings `Interruptions`):
    /// drain it, mark its spot offering at risk and, with `pre_boot`, create a replacement.
    /// True if this changed anything (the first notice for that instance).
    fn interruption_notice(&self, uuid: &str, pre_boot: bool) -> bool {
        let _ = (uuid, pre_boot);
        false
    }
    /// The instance types waiting containers could use (`IdleTime.Adaptive`: idle instances
    /// of these are kept).
    fn set_wanted_types(&self, names: std::collections::HashSet<String>) {
        let _ = names;
    }
    /// A channel that changes whenever the pool does.
    fn subscribe(&self) -> watch::Receiver<u64>;
    /// Everything a pass needs. Pools with shared state override this to read it under one
    /// consistent view; the default asks one question after another.
    fn snapshot(&self, cfg: &super::SchedConfig) -> super::PoolSnapshot {
        super::PoolSnapshot::read(self, cfg)
    }
    /// Workers found at startup that answer SSH but have not yet reported their crunch-run
    /// processes (and are not shutting down): until they have, a container this dispatcher
    /// locked may be running on one of them, so `fix_stale_locks` waits for them past
    /// `StaleLockTimeout`. Default 0: only the timeout counts, as in Go.
    fn unreported_workers(&self) -> usize {
        0
    }
    /// What the fleet has cost since 00:00 UTC, as far as this pool has seen (for the daily
    /// spend cap). Default 0.
    fn spent_today(&self) -> f64 {
        0.0
    }
}
