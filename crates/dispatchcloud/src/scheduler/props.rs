//! Property tests (proptest) of the two pure planners over random queues and pool snapshots:
//! whatever the input, a plan never starts a container that already runs, never places one
//! twice, never exceeds the quota headroom, the create budget or the container limit, and
//! sync never cancels, requeues or kills a container a live worker is running for it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use arvados::InstanceType;
use arvados::config::Cluster;
use arvados::types::{Container, ContainerState};
use chrono::{TimeZone, Utc};
use proptest::prelude::*;

use super::plan::{Limits, PoolSnapshot, SchedConfig, plan_queue};
use super::sync::{SyncAction, plan_sync};
use crate::node_size::TypeChooser;
use crate::queue::QueueEnt;
use crate::worker_state::{IdleBehavior, InstanceView, WorkerState};

const GIB: i64 = 1 << 30;

fn uuid(n: usize) -> String {
    format!("zzzzz-dz642-{n:015}")
}

const STATES: [ContainerState; 5] = [
    ContainerState::Queued,
    ContainerState::Locked,
    ContainerState::Running,
    ContainerState::Complete,
    ContainerState::Cancelled,
];
const WORKER_STATES: [WorkerState; 5] = [
    WorkerState::Unknown,
    WorkerState::Booting,
    WorkerState::Idle,
    WorkerState::Running,
    WorkerState::Shutdown,
];
const BEHAVIORS: [IdleBehavior; 3] = [IdleBehavior::Run, IdleBehavior::Hold, IdleBehavior::Drain];

/// One generated case, before it is turned into planner inputs.
#[derive(Debug, Clone)]
struct Case {
    /// VCPUs of each instance type (RAM 2 GiB per VCPU, price 0.1 per VCPU).
    types: Vec<i64>,
    max_instances: usize,
    per_instance: usize,
    max_containers: Option<usize>,
    /// (state, priority, vcpus, ram in GiB, supervisor)
    containers: Vec<(usize, i64, i64, i64, bool)>,
    /// (type, worker state, behavior, containers it runs (indices), has an id)
    instances: Vec<(usize, usize, usize, Vec<usize>, bool)>,
    /// Containers whose crunch-run exited (indices).
    exited: Vec<usize>,
    extra_instances: usize,
    at_quota: bool,
    headroom: Option<usize>,
    budget: Option<usize>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(prop::sample::select(vec![1i64, 2, 4, 8]), 1..4),
        0usize..12,
        prop::sample::select(vec![0usize, 0, 1, 2]),
        prop::option::of(0usize..8),
        prop::collection::vec(
            (
                0usize..5,
                0i64..4,
                0i64..6,
                1i64..6,
                prop::bool::weighted(0.1),
            ),
            0..40,
        ),
        prop::collection::vec(
            (
                0usize..4,
                0usize..5,
                0usize..3,
                prop::collection::vec(0usize..40, 0..3),
                prop::bool::weighted(0.9),
            ),
            0..15,
        ),
        prop::collection::vec(0usize..40, 0..4),
        (0usize..3, prop::bool::weighted(0.1)),
        (prop::option::of(0usize..6), prop::option::of(0usize..6)),
    )
        .prop_map(
            |(
                types,
                max_instances,
                per_instance,
                max_containers,
                containers,
                instances,
                exited,
                (extra_instances, at_quota),
                (headroom, budget),
            )| Case {
                types,
                max_instances,
                per_instance,
                max_containers,
                containers,
                instances,
                exited,
                extra_instances,
                at_quota,
                headroom,
                budget,
            },
        )
}

struct Inputs {
    cfg: SchedConfig,
    limits: Limits,
    entries: Vec<Arc<QueueEnt>>,
    pool: PoolSnapshot,
}

fn inputs(c: &Case) -> Inputs {
    let types: Vec<InstanceType> = c
        .types
        .iter()
        .enumerate()
        .map(|(i, &v)| InstanceType {
            name: format!("t{i}"),
            provider_type: format!("p{i}"),
            vcpus: v,
            ram: v * 2 * GIB,
            scratch: 100 * GIB,
            included_scratch: 100 * GIB,
            price: 0.1 * v as f64 + 0.01 * i as f64,
            ..Default::default()
        })
        .collect();
    let mut cluster = Cluster {
        instance_types: types.iter().map(|t| (t.name.clone(), t.clone())).collect(),
        ..Cluster::default()
    };
    let k = &mut cluster.containers;
    k.reserve_extra_ram = 0;
    k.local_keep_blob_buffers_per_vcpu = 0;
    k.maximum_price_factor = 1.5;
    k.cloud_vms.max_instances = c.max_instances as i64;
    k.cloud_vms.supervisor_fraction = 0.3;
    k.cloud_vms.max_running_containers_per_instance = c.per_instance as i64;
    let cfg = SchedConfig::from_cluster(&cluster);
    let chooser = TypeChooser::new(&cluster);
    let mut limits = Limits::new(&cfg);
    if let Some(m) = c.max_containers {
        limits.max_containers = m;
    }
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap();
    let mut entries = Vec::new();
    for (n, &(state, priority, vcpus, ram, supervisor)) in c.containers.iter().enumerate() {
        let mut ctr = Container {
            uuid: uuid(n),
            state: STATES[state],
            priority,
            created_at: Some(t0),
            ..Default::default()
        };
        ctr.runtime_constraints.vcpus = vcpus;
        ctr.runtime_constraints.ram = ram * GIB / 2;
        ctr.scheduling_parameters.supervisor = supervisor;
        let need = chooser.resources_needed(&ctr);
        let Ok(types) = chooser.choose_for(&ctr, &need) else {
            continue;
        };
        entries.push(Arc::new(QueueEnt::new(ctr, need, types, t0)));
    }
    let mut pool = PoolSnapshot::default();
    // A container runs on one worker at most (the pool guarantees it).
    let mut placed = HashSet::new();
    for (j, (t, state, behavior, runs, has_id)) in c.instances.iter().enumerate() {
        let it = &types[t % types.len()];
        let id = if *has_id {
            format!("i-{j:03}")
        } else {
            String::new()
        };
        let mut v = InstanceView::new(&id, it, WORKER_STATES[*state]);
        v.idle_behavior = BEHAVIORS[*behavior];
        if *has_id {
            for &r in runs {
                let u = uuid(r);
                if placed.insert(u.clone()) {
                    v.running_container_uuids.push(u.clone());
                    pool.running.insert(u, None);
                }
            }
        }
        pool.instances.push(v);
    }
    for &e in &c.exited {
        pool.running.entry(uuid(e)).or_insert(Some(t0));
    }
    pool.total_instances = c.instances.len() + c.extra_instances;
    pool.at_quota = c.at_quota;
    // As the pool computes it: MaxInstances bounds the headroom.
    pool.quota_headroom = match (c.max_instances, c.headroom) {
        (0, h) => h,
        (m, h) => Some(
            m.saturating_sub(pool.total_instances)
                .min(h.unwrap_or(usize::MAX)),
        ),
    };
    pool.create_budget = c.budget;
    Inputs {
        cfg,
        limits,
        entries,
        pool,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn plan_queue_never_doubles_a_start_or_exceeds_a_limit(c in case()) {
        let mut input = inputs(&c);
        let plan = plan_queue(
            &input.cfg,
            &mut input.limits,
            &input.entries,
            &input.pool,
            None,
            SystemTime::now(),
        );
        let state_of = |u: &str| {
            input
                .entries
                .iter()
                .find(|e| e.container().uuid == u)
                .map(|e| e.container().state)
        };
        // Starts: each container once, none already running or exited-but-known, each on a
        // real instance that is ready and in service, and only Locked containers.
        let mut started = HashSet::new();
        for (id, ent) in &plan.starts {
            let u = &ent.container().uuid;
            prop_assert!(started.insert(u.clone()), "{u} started twice in one plan");
            prop_assert!(!input.pool.running.contains_key(u), "{u} already runs");
            prop_assert_eq!(state_of(u), Some(ContainerState::Locked));
            let inst = input.pool.instances.iter().find(|v| &v.instance == id);
            prop_assert!(inst.is_some(), "start on unknown instance {id}");
            let inst = inst.unwrap();
            prop_assert!(!id.is_empty());
            prop_assert!(inst.worker_state.is_ready(), "{id} is {:?}", inst.worker_state);
            prop_assert_eq!(inst.idle_behavior, IdleBehavior::Run);
        }
        // Locks: each once, only Queued, never one that is also started.
        let mut locked = HashSet::new();
        for u in &plan.locks {
            prop_assert!(locked.insert(u.clone()), "{u} locked twice");
            prop_assert_eq!(state_of(u), Some(ContainerState::Queued));
            prop_assert!(!started.contains(u));
            prop_assert!(!input.pool.running.contains_key(u), "{u} runs, but is locked");
        }
        // Creates: within the quota headroom (which MaxInstances bounds) and the budget;
        // none at all at quota.
        if let Some(h) = input.pool.quota_headroom {
            prop_assert!(plan.creates.len() <= h, "{} creates, headroom {h}", plan.creates.len());
        }
        if let Some(b) = input.pool.create_budget {
            prop_assert!(plan.creates.len() <= b);
        }
        if input.pool.at_quota {
            prop_assert!(plan.creates.is_empty());
        }
        if input.cfg.max_instances > 0 {
            prop_assert!(
                plan.creates.is_empty()
                    || input.pool.total_instances + plan.creates.len() <= input.cfg.max_instances
            );
        }
        // The container limit: new locks and starts fit in what the running ones leave.
        if plan.max_containers > 0 {
            let room = plan.max_containers.saturating_sub(input.pool.running.len());
            prop_assert!(
                plan.locks.len() + plan.starts.len() <= room,
                "{} locks + {} starts, limit {} with {} running",
                plan.locks.len(),
                plan.starts.len(),
                plan.max_containers,
                input.pool.running.len()
            );
        }
    }

    #[test]
    fn plan_sync_never_touches_a_container_a_live_worker_runs(
        c in case(),
        unknown in prop::bool::ANY,
        poll_later in prop::bool::ANY,
    ) {
        let input = inputs(&c);
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap();
        let threshold = if poll_later { t0 + chrono::Duration::seconds(1) } else { t0 };
        let actions = plan_sync(&input.entries, &input.pool.running, Some(threshold), unknown);
        let mut seen = HashSet::new();
        for a in &actions {
            let u = match a {
                SyncAction::Cancel { uuid, .. }
                | SyncAction::Kill { uuid, .. }
                | SyncAction::Requeue { uuid, .. }
                | SyncAction::Forget { uuid, .. } => uuid.clone(),
            };
            prop_assert!(seen.insert(u.clone()), "two actions for {u}: {actions:?}");
            let live = input.pool.running.get(&u) == Some(&None);
            let ent = input.entries.iter().find(|e| e.container().uuid == u);
            let (state, priority) = ent
                .map(|e| (Some(e.container().state), e.container().priority))
                .unwrap_or((None, 0));
            if live && priority > 0 && matches!(state, Some(ContainerState::Running | ContainerState::Locked)) {
                prop_assert!(false, "{a:?} for a container a live worker runs");
            }
            if let SyncAction::Cancel { .. } = a {
                // Cancel only what runs nowhere (after the workers are known), or whose
                // crunch-run exited before the last poll.
                prop_assert!(!live, "{a:?}");
                prop_assert_eq!(state, Some(ContainerState::Running));
            }
        }
    }
}
