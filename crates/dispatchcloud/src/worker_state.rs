//! A worker's state and how it changes: the types the scheduler and the worker pool share,
//! and the pool's state machine as one pure function, [`transition`].
//!
//! `ARCHITECTURE.md` ("Worker state transitions") lists every transition as a table; a test
//! here reads that table and checks it against [`transition`] for every state and event, and
//! another checks that the pool changes `Worker::state` nowhere but through it, so neither the
//! table nor the code can drift from the other.

use std::fmt;

use arvados::InstanceType;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Worker states (spec §8.3), with Arvados' lower-case names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Unknown,
    Booting,
    Idle,
    Running,
    Shutdown,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Unknown => "unknown",
            WorkerState::Booting => "booting",
            WorkerState::Idle => "idle",
            WorkerState::Running => "running",
            WorkerState::Shutdown => "shutdown",
        }
    }

    /// Idle or running: a container can be started on it now.
    pub fn is_ready(self) -> bool {
        matches!(self, WorkerState::Idle | WorkerState::Running)
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Operator-set idle behaviour of a worker (spec §8.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdleBehavior {
    #[default]
    Run,
    Hold,
    Drain,
}

impl IdleBehavior {
    pub fn as_str(self) -> &'static str {
        match self {
            IdleBehavior::Run => "run",
            IdleBehavior::Hold => "hold",
            IdleBehavior::Drain => "drain",
        }
    }
}

/// One worker as the pool reports it (and as the management API lists it). A pending create
/// has an empty `instance`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub instance: String,
    pub address: String,
    pub price: f64,
    pub arvados_instance_type: String,
    pub provider_instance_type: String,
    pub last_container_uuid: String,
    pub last_busy: Option<DateTime<Utc>>,
    pub worker_state: WorkerState,
    pub idle_behavior: IdleBehavior,
    /// Containers starting or running on it.
    pub running_container_uuids: Vec<String>,
}

impl InstanceView {
    /// A view of a worker of type `it` in `state`, with nothing running.
    pub fn new(id: &str, it: &InstanceType, state: WorkerState) -> Self {
        InstanceView {
            instance: id.to_string(),
            address: String::new(),
            price: it.price,
            arvados_instance_type: it.name.clone(),
            provider_instance_type: it.provider_type.clone(),
            last_container_uuid: String::new(),
            last_busy: None,
            worker_state: state,
            idle_behavior: IdleBehavior::Run,
            running_container_uuids: Vec::new(),
        }
    }
}

impl WorkerState {
    /// Every state, in lifecycle order.
    pub const ALL: [WorkerState; 5] = [
        WorkerState::Unknown,
        WorkerState::Booting,
        WorkerState::Idle,
        WorkerState::Running,
        WorkerState::Shutdown,
    ];
}

/// Something that happens to a worker, as the pool sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// The cloud list shows an instance of this dispatcher that no create of this process
    /// made (a previous dispatcher's, or one found after a restart).
    Discovered,
    /// The cloud list (or the create call's answer) shows the instance of one of this
    /// process's creates.
    Created,
    /// Boot probe and run probe both succeeded, and no crunch-run runs there.
    ProbedIdle,
    /// Boot probe and run probe both succeeded, and crunch-run processes run there.
    ProbedBusy,
    /// The run probe succeeded but the boot probe still fails (only an adopted worker is run
    /// probed before it has booted).
    ListedNotBooted,
    /// The scheduler starts a container on it.
    ContainerStarted,
    /// Its last crunch-run process ended or was killed.
    LastProcessEnded,
    /// The pool decided to destroy it: idle or boot timeout, drain, probe failures, an
    /// operator's kill, the scheduler's shutdown, or a destroy to retry.
    ShutdownDecided,
    /// The cloud list no longer shows it.
    Vanished,
}

impl Event {
    /// Every event.
    pub const ALL: [Event; 9] = [
        Event::Discovered,
        Event::Created,
        Event::ProbedIdle,
        Event::ProbedBusy,
        Event::ListedNotBooted,
        Event::ContainerStarted,
        Event::LastProcessEnded,
        Event::ShutdownDecided,
        Event::Vanished,
    ];

    /// The name used in `ARCHITECTURE.md`'s table.
    pub fn name(self) -> &'static str {
        match self {
            Event::Discovered => "Discovered",
            Event::Created => "Created",
            Event::ProbedIdle => "ProbedIdle",
            Event::ProbedBusy => "ProbedBusy",
            Event::ListedNotBooted => "ListedNotBooted",
            Event::ContainerStarted => "ContainerStarted",
            Event::LastProcessEnded => "LastProcessEnded",
            Event::ShutdownDecided => "ShutdownDecided",
            Event::Vanished => "Vanished",
        }
    }
}

/// What the pool does when a transition happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Start probing it: boot probe, install the runner, run probe.
    Probe,
    /// Ask it what it runs (run probe) before installing anything: until an adopted worker
    /// reports, its containers look stale to `fix_stale_locks`.
    ListFirst,
    /// It is in service: report the boot outcome and time to ready; the scheduler may place
    /// containers on it.
    InService,
    /// Track the crunch-run processes the probe found (they keep it busy).
    Track,
    /// Run `crunch-run --detach` for the container over SSH.
    StartCrunchRun,
    /// Nothing runs there any more: it may take a container, and `TimeoutIdle` counts from
    /// when it was last seen busy.
    Release,
    /// Call the driver's destroy (again, if it was already shutting down).
    Destroy,
    /// Drop the record, close its runners and report their containers as exited.
    Forget,
}

impl Action {
    /// The name used in `ARCHITECTURE.md`'s table.
    pub fn name(self) -> &'static str {
        match self {
            Action::Probe => "Probe",
            Action::ListFirst => "ListFirst",
            Action::InService => "InService",
            Action::Track => "Track",
            Action::StartCrunchRun => "StartCrunchRun",
            Action::Release => "Release",
            Action::Destroy => "Destroy",
            Action::Forget => "Forget",
        }
    }
}

/// The outcome of an event that changes something: the next state (`None`: the worker is
/// gone) and what the pool does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The state after the event; `None` once the worker no longer exists.
    pub to: Option<WorkerState>,
    /// What the pool does about it.
    pub action: Action,
}

/// The worker state machine. `from` is `None` for an instance the pool has no record of yet.
/// `None` as the answer means the event changes nothing in that state (a probe that finished
/// after a shutdown, a container start on a worker that is not ready: the pool ignores it).
pub fn transition(from: Option<WorkerState>, event: Event) -> Option<Step> {
    use Action as A;
    use Event as E;
    use WorkerState as S;
    let step = |to: Option<WorkerState>, action| Some(Step { to, action });
    match (from, event) {
        (None, E::Discovered) => step(Some(S::Unknown), A::ListFirst),
        (None, E::Created) => step(Some(S::Booting), A::Probe),
        (None, _) => None,
        (Some(S::Unknown | S::Booting), E::ProbedIdle) => step(Some(S::Idle), A::InService),
        (Some(S::Unknown | S::Booting), E::ProbedBusy) => step(Some(S::Running), A::InService),
        (Some(S::Unknown), E::ListedNotBooted) => step(Some(S::Unknown), A::Track),
        (Some(S::Idle), E::ProbedBusy) => step(Some(S::Running), A::Track),
        (Some(S::Running), E::ProbedIdle) => step(Some(S::Idle), A::Release),
        (Some(S::Idle | S::Running), E::ContainerStarted) => {
            step(Some(S::Running), A::StartCrunchRun)
        }
        (Some(S::Running), E::LastProcessEnded) => step(Some(S::Idle), A::Release),
        (Some(_), E::ShutdownDecided) => step(Some(S::Shutdown), A::Destroy),
        (Some(_), E::Vanished) => step(None, A::Forget),
        (Some(_), _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row of ARCHITECTURE.md's table: from, event, to, action.
    type Row = (Option<WorkerState>, Event, Option<WorkerState>, Action);

    fn state_cell(s: &str) -> Option<Option<WorkerState>> {
        if s == "—" {
            return Some(None);
        }
        WorkerState::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .map(Some)
    }

    /// Rows of the table under the "Worker state transitions" heading: `| from | event | to |
    /// action: … |`, names in backquotes, `—` for "no record".
    fn table_rows(doc: &str) -> Vec<Row> {
        let section = doc
            .split("\n## ")
            .find(|s| s.starts_with("Worker state transitions"))
            .expect("ARCHITECTURE.md has a 'Worker state transitions' section");
        let cell = |c: &str| c.trim().trim_matches('`').to_string();
        let mut rows = Vec::new();
        for line in section.lines().filter(|l| l.starts_with("| ")) {
            let cells: Vec<String> = line.split('|').skip(1).map(cell).collect();
            if cells.len() < 4 || cells[0] == "from" || cells[0].starts_with("---") {
                continue;
            }
            let from = state_cell(&cells[0]).unwrap_or_else(|| panic!("bad state {line}"));
            let to = state_cell(&cells[2]).unwrap_or_else(|| panic!("bad state {line}"));
            let event = Event::ALL
                .into_iter()
                .find(|e| e.name() == cells[1])
                .unwrap_or_else(|| panic!("bad event in {line}"));
            let action_name = cells[3].split(':').next().unwrap_or("").trim_matches('`');
            let action = [
                Action::Probe,
                Action::ListFirst,
                Action::InService,
                Action::Track,
                Action::StartCrunchRun,
                Action::Release,
                Action::Destroy,
                Action::Forget,
            ]
            .into_iter()
            .find(|a| a.name() == action_name)
            .unwrap_or_else(|| panic!("bad action in {line}"));
            rows.push((from, event, to, action));
        }
        rows
    }

    fn doc() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../ARCHITECTURE.md"
        ))
        .expect("read ARCHITECTURE.md")
    }

    #[test]
    fn architecture_table_is_the_transition_function() {
        let rows = table_rows(&doc());
        assert!(rows.len() > 10, "table found but nearly empty: {rows:?}");
        let froms = std::iter::once(None).chain(WorkerState::ALL.map(Some));
        for from in froms {
            for event in Event::ALL {
                let code = transition(from, event);
                let table: Vec<&Row> = rows
                    .iter()
                    .filter(|r| r.0 == from && r.1 == event)
                    .collect();
                assert!(table.len() <= 1, "{from:?} {event:?} listed twice");
                let table = table.first().map(|r| Step {
                    to: r.2,
                    action: r.3,
                });
                assert_eq!(
                    table, code,
                    "ARCHITECTURE.md and worker_state::transition disagree for {from:?} + {event:?}"
                );
            }
        }
    }

    #[test]
    fn the_table_check_fails_on_a_drifted_row() {
        let drifted = doc().replace(
            "| `running` | `LastProcessEnded` | `idle` |",
            "| `running` | `LastProcessEnded` | `running` |",
        );
        let rows = table_rows(&drifted);
        let row = rows
            .iter()
            .find(|r| r.0 == Some(WorkerState::Running) && r.1 == Event::LastProcessEnded)
            .expect("row present");
        assert_ne!(
            Some(Step {
                to: row.2,
                action: row.3
            }),
            transition(row.0, row.1)
        );
    }

    /// The pool changes a worker's state only through `Worker::apply` (which calls
    /// [`transition`]): no other assignment to `.state` in the worker module.
    #[test]
    fn the_pool_changes_state_only_through_the_transition_function() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/worker");
        let mut offenders = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, line) in text.lines().enumerate() {
                let l = line.trim();
                let assigns = l.contains(".state = ") || l.starts_with("state: WorkerState::");
                if assigns && !l.ends_with("// the one assignment: apply()") {
                    offenders.push(format!("{}:{}: {l}", path.display(), i + 1));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "state changed outside apply(): {offenders:#?}"
        );
    }
}
