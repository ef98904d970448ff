//! One worker's record (spec §8.2) and the pure rules over it: metric category, whether it
//! may be shut down for idleness (§8.7 `eligibleForShutdown`), the probe-failure threshold,
//! and its management-API view (§8.15).

use std::collections::BTreeMap;
use std::sync::Arc;

use arvados::InstanceType;
use chrono::{DateTime, Utc};
use cloud::{Instance, InstanceTags};
use tokio::time::{Duration, Instant};

use super::runner::Runner;
use crate::ssh_executor::Executor;
use crate::worker_state::{Action, Event, IdleBehavior, InstanceView, WorkerState, transition};

pub struct Worker {
    pub id: String,
    pub instance: Arc<dyn Instance>,
    pub it: Arc<InstanceType>,
    /// The type named by the tag is configured.
    pub known_type: bool,
    pub state: WorkerState,
    pub idle_behavior: IdleBehavior,
    pub executor: Arc<Executor>,
    pub secret: Option<String>,
    pub appeared: Instant,
    pub probed: Instant,
    pub updated: Instant,
    pub busy: Instant,
    pub destroyed: Option<Instant>,
    pub first_ssh: Option<Instant>,
    /// An SSH connection to it has been made (in any state).
    pub reachable: bool,
    pub last_uuid: String,
    pub running: BTreeMap<String, Arc<Runner>>,
    pub starting: BTreeMap<String, Arc<Runner>>,
    pub probing: bool,
    /// Found in the cloud rather than created by this process (a previous dispatcher's).
    pub adopted: bool,
    /// A run probe (`crunch-run --list`) has succeeded: its processes are known.
    pub listed: bool,
    /// Bumped whenever this process's view of the worker's crunch-run processes changes
    /// (start done, exit, kill, probe applied): a probe that began before a bump is stale.
    pub proc_gen: u64,
    pub boot_outcome_reported: bool,
    pub time_to_ready_reported: bool,
    pub stale_run_lock_since: Option<Instant>,
    /// The tags as last listed or saved.
    pub tags: InstanceTags,
}

/// A wall-clock time for a monotonic instant in the past.
pub fn wall(t: Instant) -> DateTime<Utc> {
    let ago = Instant::now().saturating_duration_since(t);
    Utc::now() - chrono::Duration::from_std(ago).unwrap_or_default()
}

/// `now - d`, or the earliest representable instant.
pub fn ago(now: Instant, d: Duration) -> Instant {
    now.checked_sub(d).unwrap_or(now)
}

impl Worker {
    /// A worker for `instance` of type `it`, first seen at `now`, in `state`, with idle
    /// behaviour `run`, its listed tags, no secret and nothing running. Callers override
    /// fields with struct update syntax.
    pub fn new(
        instance: Arc<dyn Instance>,
        it: Arc<InstanceType>,
        state: WorkerState,
        executor: Arc<Executor>,
        now: Instant,
    ) -> Worker {
        Worker {
            id: instance.id(),
            tags: instance.tags(),
            instance,
            it,
            known_type: true,
            state,
            idle_behavior: IdleBehavior::Run,
            executor,
            secret: None,
            appeared: now,
            probed: now,
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
        }
    }

    /// Apply `event` through the state machine ([`transition`]); the action to carry out, or
    /// `None` if the event changes nothing in this state.
    pub fn apply(&mut self, event: Event) -> Option<Action> {
        let step = transition(Some(self.state), event)?;
        if let Some(to) = step.to {
            self.state = to; // the one assignment: apply()
        }
        Some(step.action)
    }

    pub fn processes(&self) -> usize {
        self.running.len() + self.starting.len()
    }

    /// Metric category (§8.16).
    pub fn category(&self) -> &'static str {
        if self.processes() > 0 {
            "inuse"
        } else if self.idle_behavior == IdleBehavior::Hold {
            "hold"
        } else if self.state == WorkerState::Booting {
            "booting"
        } else if self.state == WorkerState::Unknown {
            "unknown"
        } else {
            "idle"
        }
    }

    /// Whether the idle rules say shut it down now (§8.7). Unlike Go (§13.3 item 18), an
    /// unknown worker whose run probe shows containers is not shut down for idleness.
    pub fn eligible_for_shutdown(
        &self,
        now: Instant,
        timeout_idle: Duration,
        timeout_booting: Duration,
    ) -> bool {
        if self.idle_behavior == IdleBehavior::Hold {
            return false;
        }
        let drain = self.idle_behavior == IdleBehavior::Drain;
        match self.state {
            WorkerState::Booting => drain,
            WorkerState::Idle => drain || now.saturating_duration_since(self.busy) >= timeout_idle,
            WorkerState::Running => {
                drain
                    && self
                        .running
                        .values()
                        .chain(self.starting.values())
                        .all(|r| r.given_up())
            }
            WorkerState::Unknown => {
                self.processes() == 0
                    && now.saturating_duration_since(self.appeared) >= timeout_booting
            }
            WorkerState::Shutdown => false,
        }
    }

    pub fn view(&self) -> InstanceView {
        let mut running: Vec<String> = self
            .running
            .keys()
            .chain(self.starting.keys())
            .cloned()
            .collect();
        running.sort();
        running.dedup();
        InstanceView {
            instance: self.id.clone(),
            address: self.instance.address(),
            price: self.it.price,
            arvados_instance_type: self.it.name.clone(),
            provider_instance_type: self.it.provider_type.clone(),
            last_container_uuid: self.last_uuid.clone(),
            last_busy: Some(wall(self.busy)),
            worker_state: self.state,
            idle_behavior: self.idle_behavior,
            running_container_uuids: running,
        }
    }
}
