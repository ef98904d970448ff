//! A literal, slow transcription of the spec's `runQueue` (§7.3): full sort, a linear scan of
//! every instance for every container, statuses for everyone. The fast pass in [`super::plan`]
//! must make exactly the same decisions; `same_decisions_as_literal_run_queue` checks that on
//! thousands of random queues and pools.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use arvados::InstanceType;
use arvados::types::ContainerState;

use super::plan::{Limits, PoolSnapshot, SchedConfig, update_limits};
use super::status::Status;
use crate::node_size::InstanceResources;
use crate::queue::QueueEnt;
use crate::worker_state::{IdleBehavior, WorkerState};

/// Everything a pass decides, in comparable form.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decisions {
    pub locks: Vec<String>,
    pub creates: Vec<(String, String)>,
    pub declined: Vec<(String, String)>,
    pub starts: Vec<(String, String)>,
    pub unlocks: Vec<String>,
    pub shutdowns: Vec<String>,
    pub allocated_not_started: usize,
    pub over_quota: usize,
    pub max_containers: usize,
    /// (uuid, status text) in scheduling order.
    pub statuses: Vec<(String, String)>,
}

struct Inst {
    id: String,
    ty: Option<Arc<InstanceType>>,
    ready: bool,
    state: WorkerState,
    behavior: IdleBehavior,
    count: usize,
    free: InstanceResources,
}

fn type_key(it: &InstanceType) -> (f64, i64, i64, i64) {
    (it.price, -it.vcpus, -it.ram, -it.scratch)
}

fn cmp_key(a: &(f64, i64, i64, i64), b: &(f64, i64, i64, i64)) -> Ordering {
    a.0.total_cmp(&b.0)
        .then(a.1.cmp(&b.1))
        .then(a.2.cmp(&b.2))
        .then(a.3.cmp(&b.3))
}

pub fn run_queue(
    cfg: &SchedConfig,
    limits: &mut Limits,
    entries: &[Arc<QueueEnt>],
    pool: &PoolSnapshot,
    last_503: Option<SystemTime>,
    now: SystemTime,
) -> Decisions {
    let running = &pool.running;
    let mut sorted: Vec<&Arc<QueueEnt>> = entries.iter().collect();
    sorted.sort_by(|a, b| {
        let (ca, cb) = (&a.container(), &b.container());
        let class = |e: &QueueEnt| {
            if running.contains_key(&e.container().uuid) {
                0
            } else if e.container().state == ContainerState::Locked {
                1
            } else {
                2
            }
        };
        class(a)
            .cmp(&class(b))
            .then(cb.priority.cmp(&ca.priority))
            .then(a.first_seen_at().cmp(&b.first_seen_at()))
            .then(ca.uuid.cmp(&cb.uuid))
    });
    let by_uuid: HashMap<&str, &QueueEnt> = entries
        .iter()
        .map(|e| (e.container().uuid.as_str(), &**e))
        .collect();

    // Instances in scan order, with what is left on each.
    let mut insts: Vec<Inst> = pool
        .instances
        .iter()
        .filter_map(|v| {
            let ty = cfg.types.get(&v.arvados_instance_type).cloned()?;
            let mut free = InstanceResources::of_type(&ty);
            for u in &v.running_container_uuids {
                match by_uuid.get(u.as_str()) {
                    Some(e) => free.sub(&e.instance_resources),
                    None => {
                        free = InstanceResources::default();
                        break;
                    }
                }
            }
            Some(Inst {
                id: v.instance.clone(),
                ready: v.worker_state.is_ready(),
                state: v.worker_state,
                behavior: v.idle_behavior,
                count: v.running_container_uuids.len(),
                free,
                ty: Some(ty),
            })
        })
        .collect();
    let key_of = |i: &Inst| type_key(i.ty.as_ref().expect("configured"));
    insts.sort_by(|a, b| cmp_key(&key_of(a), &key_of(b)).then(a.id.cmp(&b.id)));

    let mut at_quota = pool.at_quota || pool.quota_headroom == Some(0);
    let max_supervisors = update_limits(
        cfg,
        limits,
        last_503,
        running.len(),
        pool.total_instances,
        at_quota,
        now,
    );
    let max_containers = limits.max_containers;
    let limit = cfg.max_running_containers_per_instance;
    let mut headroom = pool.quota_headroom;
    let mut budget = pool.create_budget;
    let mut d = Decisions {
        max_containers,
        ..Default::default()
    };
    let mut statuses: Vec<Status> = vec![Status::None; sorted.len()];
    let mut overquota: Option<usize> = None;
    let mut overmaxsuper: Vec<usize> = Vec::new();
    let mut trying = running.len();
    let mut qpos = 0;
    let mut supervisors = 0;

    for (i, ent) in sorted.iter().enumerate() {
        let ctr = &ent.container();
        if ctr.scheduling_parameters.supervisor {
            supervisors += 1;
        }
        if running.contains_key(&ctr.uuid) {
            if matches!(ctr.state, ContainerState::Queued | ContainerState::Locked) {
                statuses[i] = Status::Preparing;
            }
            continue;
        }
        if ctr.priority < 1 {
            statuses[i] = Status::PriorityZero(ctr.state);
            continue;
        }
        if ctr.scheduling_parameters.supervisor
            && max_supervisors > 0
            && supervisors > max_supervisors
        {
            overmaxsuper.push(i);
            statuses[i] = Status::SupervisorLimit(overmaxsuper.len());
            continue;
        }
        let types: Vec<&str> = ent.instance_types.iter().map(|t| t.name.as_str()).collect();
        let need = &ent.instance_resources;
        let mut best: Option<usize> = None;
        for (j, inst) in insts.iter().enumerate() {
            let usable = inst.state != WorkerState::Shutdown
                && inst.behavior == IdleBehavior::Run
                && (limit == 0 || inst.count < limit);
            let ty = inst.ty.as_ref().expect("configured");
            if !usable || !types.contains(&ty.name.as_str()) || !inst.free.accommodates(need) {
                continue;
            }
            best = match best {
                None => Some(j),
                Some(b) if inst.count > insts[b].count => Some(j),
                Some(b) if !insts[b].ready && inst.ready => Some(j),
                keep => keep,
            };
        }
        let available = ent
            .instance_types
            .iter()
            .find(|it| !pool.at_capacity.contains(&it.name));
        match ctr.state {
            ContainerState::Queued => {
                if max_containers > 0 && trying >= max_containers {
                    continue;
                }
                trying += 1;
                if best.is_none() && at_quota {
                    overquota = Some(i);
                    break;
                }
                if best.is_none() && available.is_none() {
                    continue;
                }
                d.locks.push(ctr.uuid.clone());
                if let Some(b) = best {
                    insts[b].free.sub(need);
                    insts[b].count += 1;
                }
            }
            ContainerState::Locked => {
                if max_containers > 0 && trying >= max_containers {
                    continue;
                }
                trying += 1;
                if let Some(b) = best {
                    insts[b].free.sub(need);
                    insts[b].count += 1;
                    let inst = &insts[b];
                    if !inst.id.is_empty() && inst.ready {
                        d.starts.push((inst.id.clone(), ctr.uuid.clone()));
                        statuses[i] = Status::Preparing;
                    } else {
                        statuses[i] = Status::NewInstance(Arc::from(
                            inst.ty.as_ref().expect("configured").name.as_str(),
                        ));
                        d.allocated_not_started += 1;
                    }
                    continue;
                }
                if at_quota {
                    overquota = Some(i);
                    break;
                }
                let Some(it) = available else {
                    qpos += 1;
                    statuses[i] = Status::AllTypesAtCapacity(qpos, Arc::from(types.join(", ")));
                    continue;
                };
                if budget == Some(0) {
                    d.declined.push((it.name.clone(), ctr.uuid.clone()));
                    continue;
                }
                budget = budget.map(|n| n - 1);
                headroom = headroom.map(|n| n.saturating_sub(1));
                if headroom == Some(0) {
                    at_quota = true;
                }
                d.creates.push((it.name.clone(), ctr.uuid.clone()));
                statuses[i] = Status::NewInstance(Arc::from(it.name.as_str()));
                d.allocated_not_started += 1;
                if let Some(ty) = cfg.types.get(&it.name) {
                    let mut free = InstanceResources::of_type(ty);
                    free.sub(need);
                    let new = Inst {
                        id: String::new(),
                        ty: Some(ty.clone()),
                        ready: false,
                        state: WorkerState::Booting,
                        behavior: IdleBehavior::Run,
                        count: 1,
                        free,
                    };
                    // After every instance that sorts before or level with a pending create.
                    let k = type_key(ty);
                    let at = insts.partition_point(|x| {
                        let o = cmp_key(&key_of(x), &k);
                        o == Ordering::Less || (o == Ordering::Equal && x.id.is_empty())
                    });
                    insts.insert(at, new);
                }
            }
            _ => {}
        }
    }
    let overquota: Vec<usize> = overquota.map_or(Vec::new(), |k| (k..sorted.len()).collect());
    d.over_quota = overquota.len() + overmaxsuper.len();
    for (i, ent) in sorted.iter().enumerate() {
        if statuses[i].is_none()
            && matches!(
                ent.container().state,
                ContainerState::Queued | ContainerState::Locked
            )
        {
            qpos += 1;
            statuses[i] = if at_quota {
                Status::CloudLimits(qpos)
            } else {
                Status::ClusterCapacity(qpos)
            };
        }
    }
    if !overquota.is_empty() || !overmaxsuper.is_empty() {
        let mut unlock = overmaxsuper.clone();
        if pool.total_instances > 0 && overquota.len() > 1 {
            unlock.extend_from_slice(&overquota[1..]);
        } else {
            unlock.extend_from_slice(&overquota);
        }
        for i in unlock {
            let c = &sorted[i].container();
            if c.state == ContainerState::Locked && !running.contains_key(&c.uuid) {
                d.unlocks.push(c.uuid.clone());
            }
        }
    }
    if !overquota.is_empty() {
        let busy: Vec<&str> = insts
            .iter()
            .filter(|i| i.count > 0)
            .map(|i| i.id.as_str())
            .collect();
        for v in &pool.instances {
            if !v.instance.is_empty()
                && v.running_container_uuids.is_empty()
                && !busy.contains(&v.instance.as_str())
            {
                d.shutdowns.push(v.instance.clone());
            }
        }
    }
    d.statuses = sorted
        .iter()
        .zip(statuses)
        .map(|(e, s)| (e.container().uuid.clone(), s.to_string()))
        .collect();
    d
}
