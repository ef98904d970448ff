//! Reconciling the queue with the pool (spec §7.6) as a pure function: which containers to
//! cancel, kill, requeue or forget, given the queue, what the pool is running, and the start
//! time of the last completed queue poll.

use std::sync::Arc;

use arvados::types::ContainerState;
use chrono::{DateTime, Utc};

use super::pool::RunningMap;
use crate::fasthash::FastSet;
use crate::queue::{QueueEnt, uuid_hash};

/// One reconciling step; the scheduler carries each out asynchronously.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncAction {
    /// Set the container Cancelled.
    Cancel { uuid: String, reason: &'static str },
    /// Kill its crunch-run and forget the pool's record of it.
    Kill { uuid: String, reason: String },
    /// Unlock it so it can be scheduled again.
    Requeue { uuid: String, reason: &'static str },
    /// Drop it from the queue cache.
    Forget { uuid: String, reason: &'static str },
}

/// What to do about each container (spec §7.6 table), then about processes for containers the
/// queue does not know.
pub fn plan_sync(
    entries: &[Arc<QueueEnt>],
    running: &RunningMap,
    threshold: Option<DateTime<Utc>>,
    any_unknown_workers: bool,
) -> Vec<SyncAction> {
    let mut out = Vec::new();
    let mut matched: std::collections::HashSet<&str> = std::collections::HashSet::new();
    // Exited at T and the last completed poll started after T.
    let exited_before_poll = |exit: &Option<DateTime<Utc>>| match (exit, threshold) {
        (Some(t), Some(th)) => th > *t,
        _ => false,
    };
    // Membership by precomputed hash first: most entries are not running, and this way their
    // uuid strings are never read.
    let known: FastSet<u64> = running.keys().map(|u| uuid_hash(u)).collect();
    for e in entries {
        let c = e.sched();
        let uuid = || e.container().uuid.clone();
        let run = if known.contains(&c.uuid_hash) {
            running.get(&e.container().uuid)
        } else {
            None
        };
        if run.is_some() {
            matched.insert(e.container().uuid.as_str());
        }
        match c.state {
            ContainerState::Running => match run {
                None => {
                    if !any_unknown_workers {
                        out.push(SyncAction::Cancel {
                            uuid: uuid(),
                            reason: "not running on any worker",
                        });
                    }
                }
                Some(exit) if exited_before_poll(exit) => out.push(SyncAction::Cancel {
                    uuid: uuid(),
                    reason: "state=Running after crunch-run exited",
                }),
                Some(_) if c.priority == 0 => out.push(SyncAction::Kill {
                    uuid: uuid(),
                    reason: "priority=0".into(),
                }),
                Some(_) => {}
            },
            ContainerState::Complete | ContainerState::Cancelled => match run {
                Some(_) => out.push(SyncAction::Kill {
                    uuid: uuid(),
                    reason: format!("state={}", c.state),
                }),
                None => out.push(SyncAction::Forget {
                    uuid: uuid(),
                    reason: "container finished -- dropping from queue",
                }),
            },
            ContainerState::Queued => match run {
                Some(_) => out.push(SyncAction::Kill {
                    uuid: uuid(),
                    reason: "pool says running, but queue says state=Queued".into(),
                }),
                None if c.priority == 0 => out.push(SyncAction::Forget {
                    uuid: uuid(),
                    reason: "container on hold -- dropping from queue",
                }),
                None => {}
            },
            ContainerState::Locked => match run {
                Some(exit) if exited_before_poll(exit) => out.push(SyncAction::Requeue {
                    uuid: uuid(),
                    reason: "crunch-run exited",
                }),
                Some(None) if c.priority == 0 => out.push(SyncAction::Kill {
                    uuid: uuid(),
                    reason: "priority=0".into(),
                }),
                None if c.priority == 0 => out.push(SyncAction::Requeue {
                    uuid: uuid(),
                    reason: "priority=0",
                }),
                _ => {}
            },
        }
    }
    if matched.len() < running.len() {
        let mut orphans: Vec<&String> = running
            .keys()
            .filter(|u| !matched.contains(u.as_str()))
            .collect();
        orphans.sort();
        for u in orphans {
            out.push(SyncAction::Kill {
                uuid: u.clone(),
                reason: "not in queue".into(),
            });
        }
    }
    out
}

/// Running containers, on a worker, whose `runtime_status` carries a spot interruption notice
/// (`preemptionNotice`, set by crunch-run when the cloud announces the instance's end).
pub fn plan_interruptions(entries: &[Arc<QueueEnt>], running: &RunningMap) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e.sched().state == ContainerState::Running)
        .map(|e| e.container())
        .filter(|c| {
            c.runtime_status
                .get("preemptionNotice")
                .is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        })
        .filter(|c| matches!(running.get(&c.uuid), Some(None)))
        .map(|c| c.uuid.clone())
        .collect()
}

/// The instance types some waiting container (Queued or Locked, priority > 0, on no worker)
/// could use, for the adaptive idle time (`IdleTime.Adaptive`); at most the first `limit`
/// waiting containers are looked at, so a huge queue costs a bounded pass.
pub fn wanted_types(
    entries: &[Arc<QueueEnt>],
    running: &RunningMap,
    limit: usize,
) -> std::collections::HashSet<String> {
    entries
        .iter()
        .filter(|e| {
            let c = e.sched();
            matches!(c.state, ContainerState::Queued | ContainerState::Locked) && c.priority > 0
        })
        .filter(|e| !running.contains_key(&e.container().uuid))
        .take(limit)
        .flat_map(|e| e.instance_types.iter().map(|t| t.name.clone()))
        .collect()
}
