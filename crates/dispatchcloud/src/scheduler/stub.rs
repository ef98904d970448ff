//! An in-memory worker pool with the behaviour of Arvados' scheduler test stub (spec §7.10):
//! at quota once it has `quota` workers; at capacity for a provider type once its `capacity`
//! is used up; creates succeed while `can_create` lasts and every call is recorded; starts
//! succeed on idle or running `run` workers; kills succeed for live processes. Tests drive it
//! directly (make a booting worker idle, end a process) and read what the scheduler did.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arvados::InstanceType;
use arvados::types::Container;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::pool::{RunningMap, WorkerPool};
use crate::worker_state::{IdleBehavior, InstanceView, WorkerState};

#[derive(Debug, Clone)]
pub struct StubWorker {
    pub id: String,
    pub it: Arc<InstanceType>,
    pub state: WorkerState,
    pub idle_behavior: IdleBehavior,
    pub running: Vec<String>,
}

/// Everything the stub holds; public so tests can set it up and inspect it.
#[derive(Debug, Default)]
pub struct StubState {
    pub workers: Vec<StubWorker>,
    pub running: RunningMap,
    pub quota: usize,
    pub can_create: usize,
    /// Per provider type: how many workers of that type the cloud has room for.
    pub capacity: HashMap<String, usize>,
    /// Type names of every create call, accepted or not.
    pub creates: Vec<String>,
    /// Container uuids of every start call, accepted or not.
    pub starts: Vec<String>,
    pub shutdowns: Vec<String>,
    pub kills: Vec<(String, String)>,
    pub loaded: bool,
    next_id: usize,
}

pub struct StubPool {
    state: Mutex<StubState>,
    notify: watch::Sender<u64>,
}

impl Default for StubPool {
    fn default() -> Self {
        StubPool::new(0, 0)
    }
}

impl StubPool {
    pub fn new(quota: usize, can_create: usize) -> StubPool {
        StubPool {
            state: Mutex::new(StubState {
                quota,
                can_create,
                loaded: true,
                ..Default::default()
            }),
            notify: watch::channel(0).0,
        }
    }

    /// Look at or change the stub's state; subscribers are notified afterwards.
    pub fn with<R>(&self, f: impl FnOnce(&mut StubState) -> R) -> R {
        let r = f(&mut self.state.lock());
        self.notify.send_modify(|n| *n = n.wrapping_add(1));
        r
    }

    fn read<R>(&self, f: impl FnOnce(&StubState) -> R) -> R {
        f(&self.state.lock())
    }

    /// Add a worker directly, without a create call.
    pub fn add_worker(&self, it: &Arc<InstanceType>, state: WorkerState) -> String {
        self.with(|s| add(s, it, state))
    }

    /// Set a worker's state.
    pub fn set_state(&self, id: &str, state: WorkerState) {
        self.with(|s| {
            if let Some(w) = s.workers.iter_mut().find(|w| w.id == id) {
                w.state = state;
            }
        })
    }

    /// Mark a container's process as exited at `at`.
    pub fn exit(&self, uuid: &str, at: DateTime<Utc>) {
        self.with(|s| {
            if let Some(e) = s.running.get_mut(uuid) {
                *e = Some(at);
            }
            for w in &mut s.workers {
                w.running.retain(|u| u != uuid);
            }
        })
    }

    /// Remove a worker (its cloud VM disappeared).
    pub fn remove_worker(&self, id: &str) {
        self.with(|s| s.workers.retain(|w| w.id != id))
    }

    pub fn creates(&self) -> Vec<String> {
        self.read(|s| s.creates.clone())
    }

    pub fn starts(&self) -> Vec<String> {
        self.read(|s| s.starts.clone())
    }

    pub fn shutdowns(&self) -> Vec<String> {
        self.read(|s| s.shutdowns.clone())
    }

    /// Containers on a worker.
    pub fn running_on(&self, id: &str) -> Vec<String> {
        self.read(|s| {
            s.workers
                .iter()
                .find(|w| w.id == id)
                .map(|w| w.running.clone())
                .unwrap_or_default()
        })
    }

    /// Worker ids in the order they were added.
    pub fn worker_ids(&self) -> Vec<String> {
        self.read(|s| s.workers.iter().map(|w| w.id.clone()).collect())
    }
}

fn add(s: &mut StubState, it: &Arc<InstanceType>, state: WorkerState) -> String {
    s.next_id += 1;
    let id = format!("stub-{:04}", s.next_id);
    s.workers.push(StubWorker {
        id: id.clone(),
        it: it.clone(),
        state,
        idle_behavior: IdleBehavior::Run,
        running: Vec::new(),
    });
    id
}

fn view(w: &StubWorker) -> InstanceView {
    let mut v = InstanceView::new(&w.id, &w.it, w.state);
    v.idle_behavior = w.idle_behavior;
    v.running_container_uuids = w.running.clone();
    v
}

impl WorkerPool for StubPool {
    fn running(&self) -> RunningMap {
        self.read(|s| s.running.clone())
    }

    fn instances(&self) -> Vec<InstanceView> {
        self.read(|s| s.workers.iter().map(view).collect())
    }

    fn count_workers(&self) -> BTreeMap<WorkerState, usize> {
        self.read(|s| {
            let mut m = BTreeMap::new();
            for w in &s.workers {
                *m.entry(w.state).or_default() += 1;
            }
            m
        })
    }

    fn loaded(&self) -> bool {
        self.read(|s| s.loaded)
    }

    /// A `capacity` entry `providertype-preemptible` limits only that type's spot market, as
    /// the real pool keys it; `providertype` limits both markets together.
    fn at_capacity(&self, it: &InstanceType) -> bool {
        self.read(|s| {
            let spot_key = format!("{}-preemptible", it.provider_type);
            let (supply, spot_only) = match s.capacity.get(&spot_key) {
                Some(&n) if it.preemptible => (n, true),
                _ => match s.capacity.get(&it.provider_type) {
                    None => return false,
                    Some(&n) => (n, false),
                },
            };
            let used = s
                .workers
                .iter()
                .filter(|w| w.it.provider_type == it.provider_type)
                .filter(|w| !spot_only || w.it.preemptible)
                .count();
            supply <= used
        })
    }

    fn at_quota(&self) -> bool {
        self.read(|s| s.workers.len() >= s.quota)
    }

    fn quota_headroom(&self) -> Option<usize> {
        self.read(|s| Some(s.quota.saturating_sub(s.workers.len())))
    }

    fn create_budget(&self) -> Option<usize> {
        self.read(|s| Some(s.can_create))
    }

    fn create(&self, it: &InstanceType) -> Option<InstanceView> {
        self.with(|s| {
            s.creates.push(it.name.clone());
            if s.can_create == 0 {
                return None;
            }
            s.can_create -= 1;
            let id = add(s, &Arc::new(it.clone()), WorkerState::Booting);
            s.workers.iter().find(|w| w.id == id).map(view)
        })
    }

    fn shutdown(&self, instance_id: &str) -> bool {
        self.with(|s| {
            s.shutdowns.push(instance_id.to_string());
            false
        })
    }

    fn start_container(&self, instance_id: &str, ctr: &Container) -> bool {
        self.with(|s| {
            s.starts.push(ctr.uuid.clone());
            let Some(w) = s.workers.iter_mut().find(|w| w.id == instance_id) else {
                return false;
            };
            if !w.state.is_ready() || w.idle_behavior != IdleBehavior::Run {
                return false;
            }
            w.state = WorkerState::Running;
            w.running.push(ctr.uuid.clone());
            s.running.insert(ctr.uuid.clone(), None);
            true
        })
    }

    fn kill_container(&self, uuid: &str, reason: &str) -> bool {
        self.with(|s| {
            s.kills.push((uuid.to_string(), reason.to_string()));
            if s.running.get(uuid) != Some(&None) {
                return false;
            }
            s.running.remove(uuid);
            for w in &mut s.workers {
                w.running.retain(|u| u != uuid);
            }
            true
        })
    }

    fn forget_container(&self, uuid: &str) {
        self.with(|s| {
            if matches!(s.running.get(uuid), Some(Some(_))) {
                s.running.remove(uuid);
            }
        })
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }
}
