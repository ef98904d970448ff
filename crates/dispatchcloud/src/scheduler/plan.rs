//! One scheduling pass as a pure function (spec §7.3): from a snapshot of the queue and of the
//! pool to a plan (what to lock, create, start, unlock and shut down) plus every container's
//! status. Same decisions as Arvados' `runQueue`; the instance scan goes through
//! [`super::index`], so a pass costs about O((N + M) log M) instead of O(N × M).
//!
//! Nothing here blocks or talks to anything. Pool answers that change during a pass in Go
//! (creates accepted, quota reached, capacity) are modelled from the snapshot: a create uses
//! up `create_budget` and `quota_headroom`.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arvados::InstanceType;
use arvados::config::Cluster;
use arvados::types::ContainerState;

use super::index::{Offer, OfferTree, Want};
use super::pool::{IdleBehavior, InstanceView, RunningMap, WorkerPool, WorkerState};
use super::status::Status;
use crate::node_size::InstanceResources;
use crate::queue::QueueEnt;

/// After a 503, the container limit starts growing again once this long has passed quietly.
pub const QUIET_AFTER_503: Duration = Duration::from_secs(60);

/// The settings a pass reads from the cluster config.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Configured instance types, by name.
    pub types: HashMap<String, Arc<InstanceType>>,
    pub max_instances: usize,
    pub initial_quota_estimate: usize,
    pub supervisor_fraction: f64,
    /// 0: no limit.
    pub max_running_containers_per_instance: usize,
}

impl SchedConfig {
    pub fn from_cluster(cluster: &Cluster) -> SchedConfig {
        let c = &cluster.containers;
        SchedConfig {
            types: cluster
                .instance_types
                .iter()
                .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
                .collect(),
            max_instances: usize::try_from(c.cloud_vms.max_instances).unwrap_or(0),
            initial_quota_estimate: usize::try_from(c.cloud_vms.initial_quota_estimate)
                .unwrap_or(0),
            supervisor_fraction: c.cloud_vms.supervisor_fraction,
            max_running_containers_per_instance: usize::try_from(
                c.cloud_vms.max_running_containers_per_instance,
            )
            .unwrap_or(0),
        }
    }
}

/// Scheduler state carried from pass to pass: the dynamic container limit and what feeds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// 0: unlimited.
    pub max_containers: usize,
    pub last_503: Option<SystemTime>,
    /// Instances we had when the cloud last said "quota" (0: never).
    pub instances_within_quota: usize,
}

impl Limits {
    pub fn new(cfg: &SchedConfig) -> Limits {
        Limits {
            max_containers: if cfg.initial_quota_estimate > 0 {
                cfg.initial_quota_estimate
            } else {
                cfg.max_instances
            },
            last_503: None,
            instances_within_quota: 0,
        }
    }
}

/// What the pool looked like at the start of a pass.
#[derive(Debug, Clone, Default)]
pub struct PoolSnapshot {
    pub running: RunningMap,
    pub instances: Vec<InstanceView>,
    /// Sum of workers over all states.
    pub total_instances: usize,
    pub unknown_workers: usize,
    pub at_quota: bool,
    /// Instances that may still be added before the pool is at quota (`None`: no limit).
    pub quota_headroom: Option<usize>,
    /// Creates the pool would accept now (`None`: no limit).
    pub create_budget: Option<usize>,
    /// Names of configured types whose provider type is at capacity.
    pub at_capacity: HashSet<String>,
}

impl PoolSnapshot {
    /// Read everything a pass needs from the pool.
    pub fn take<P: WorkerPool + ?Sized>(pool: &P, cfg: &SchedConfig) -> PoolSnapshot {
        let counts = pool.count_workers();
        PoolSnapshot {
            running: pool.running(),
            instances: pool.instances(),
            total_instances: counts.values().sum(),
            unknown_workers: counts.get(&WorkerState::Unknown).copied().unwrap_or(0),
            at_quota: pool.at_quota(),
            quota_headroom: pool.quota_headroom(),
            create_budget: pool.create_budget(),
            at_capacity: cfg
                .types
                .values()
                .filter(|it| pool.at_capacity(it))
                .map(|it| it.name.clone())
                .collect(),
        }
    }
}

/// Everything one pass decided.
#[derive(Debug, Clone, Default)]
pub struct QueuePlan {
    /// The queue in scheduling order, with each container's status.
    pub sorted: Vec<(Arc<QueueEnt>, Status)>,
    /// Queued containers to lock (asynchronously).
    pub locks: Vec<String>,
    /// Instances to create: the type, and the container that asked for it.
    pub creates: Vec<(Arc<InstanceType>, String)>,
    /// Creates the pool would decline right now (no call is made).
    pub declined_creates: Vec<(Arc<InstanceType>, String)>,
    /// Containers to start: instance id, container.
    pub starts: Vec<(String, Arc<QueueEnt>)>,
    /// Locked containers to unlock (pool capacity is used by higher priority containers).
    pub unlocks: Vec<String>,
    /// Idle or booting instances to shut down (nothing was placed on them while at quota).
    pub shutdowns: Vec<String>,
    pub allocated_not_started: usize,
    pub not_allocated_over_quota: usize,
    /// The limit after this pass (`arvados_dispatchcloud_max_concurrent_containers`).
    pub max_containers: usize,
}

/// One instance during a pass.
struct Inst {
    id: Option<Arc<str>>,
    ty: usize,
    /// Position in scan order: (type rank, pending 0 / real 1, sequence).
    pos: u64,
    pending: bool,
    slot: usize,
    ready: bool,
    usable: bool,
    count: i64,
    free: InstanceResources,
}

/// The instances of one type, in scan order: pending creates first, then real instances.
struct TypeSlots {
    it: Arc<InstanceType>,
    name: Arc<str>,
    rank: u64,
    pending: OfferTree,
    pending_insts: Vec<usize>,
    real: OfferTree,
    real_insts: Vec<usize>,
}

fn pos(rank: u64, pending: bool, seq: u64) -> u64 {
    (rank << 40) | (u64::from(!pending) << 39) | seq
}

struct Index {
    insts: Vec<Inst>,
    types: Vec<TypeSlots>,
    by_name: HashMap<String, usize>,
    /// Type lookups by the `Arc` the queue entry holds (cheap), filled from `by_name`.
    by_ptr: HashMap<usize, Option<usize>>,
    limit_per_instance: i64,
    next_pending_seq: u64,
}

impl Index {
    fn offer(&self, i: usize) -> Offer {
        let inst = &self.insts[i];
        if inst.usable {
            Offer::usable(&inst.free, inst.count, inst.ready)
        } else {
            Offer::NONE
        }
    }

    fn refresh(&mut self, i: usize) {
        let o = self.offer(i);
        let inst = &self.insts[i];
        let t = &mut self.types[inst.ty];
        if inst.pending {
            t.pending.set(inst.slot, o);
        } else {
            t.real.set(inst.slot, o);
        }
    }

    fn type_of(&mut self, it: &Arc<InstanceType>) -> Option<usize> {
        let key = Arc::as_ptr(it) as usize;
        if let Some(t) = self.by_ptr.get(&key) {
            return *t;
        }
        let t = self.by_name.get(&it.name).copied();
        self.by_ptr.insert(key, t);
        t
    }

    /// First instance of type `t` strictly after position `after` (or from the start) that
    /// satisfies `want`.
    fn first_in_type(&self, t: usize, after: Option<u64>, want: &Want) -> Option<usize> {
        let ts = &self.types[t];
        let (pending_from, real_from) = match after {
            None => (0, 0),
            Some(p) => {
                let rank = p >> 40;
                if rank > ts.rank {
                    return None;
                } else if rank < ts.rank {
                    (0, 0)
                } else {
                    let pp = ts
                        .pending_insts
                        .partition_point(|&i| self.insts[i].pos <= p);
                    let rp = ts.real_insts.partition_point(|&i| self.insts[i].pos <= p);
                    (pp, rp)
                }
            }
        };
        if let Some(s) = ts.pending.find_first(pending_from, want) {
            return Some(ts.pending_insts[s]);
        }
        ts.real
            .find_first(real_from, want)
            .map(|s| ts.real_insts[s])
    }

    fn first(&self, types: &[usize], after: Option<u64>, want: &Want) -> Option<usize> {
        types
            .iter()
            .filter_map(|&t| self.first_in_type(t, after, want))
            .min_by_key(|&i| self.insts[i].pos)
    }

    /// Go's choice among acceptable instances in scan order: the first; replaced by a later
    /// one with more containers, or else by a later ready one while the best is not ready.
    fn best(&self, types: &[usize], need: &InstanceResources) -> Option<usize> {
        let any = Want {
            need: *need,
            more_than: None,
            ready: false,
        };
        let mut best = self.first(types, None, &any)?;
        loop {
            let b = &self.insts[best];
            let busier = self.first(
                types,
                Some(b.pos),
                &Want {
                    more_than: Some(b.count),
                    ..any
                },
            );
            let readier = if b.ready {
                None
            } else {
                self.first(types, Some(b.pos), &Want { ready: true, ..any })
            };
            let next = match (busier, readier) {
                (Some(x), Some(y)) => Some(if self.insts[x].pos <= self.insts[y].pos {
                    x
                } else {
                    y
                }),
                (x, y) => x.or(y),
            };
            match next {
                Some(n) => best = n,
                None => return Some(best),
            }
        }
    }

    /// Put a container on instance `i`.
    fn place(&mut self, i: usize, need: &InstanceResources) {
        let limit = self.limit_per_instance;
        let inst = &mut self.insts[i];
        inst.free.sub(need);
        inst.count += 1;
        if limit > 0 && inst.count >= limit {
            inst.usable = false;
        }
        self.refresh(i);
    }

    /// A new pending instance of type `t` with one container on it.
    fn add_pending(&mut self, t: usize, need: &InstanceResources) -> usize {
        let seq = self.next_pending_seq;
        self.next_pending_seq += 1;
        let i = self.insts.len();
        let ts = &self.types[t];
        self.insts.push(Inst {
            id: None,
            ty: t,
            pos: pos(ts.rank, true, seq),
            pending: true,
            slot: ts.pending.len(),
            ready: false,
            usable: true,
            count: 0,
            free: InstanceResources::of_type(&ts.it),
        });
        let slot = self.types[t].pending.push(Offer::NONE);
        self.types[t].pending_insts.push(i);
        debug_assert_eq!(slot, self.insts[i].slot);
        self.place(i, need);
        i
    }
}

/// Scan-order key of a type: cheapest first, then roomiest.
fn type_key_cmp(a: &InstanceType, b: &InstanceType) -> Ordering {
    a.price
        .total_cmp(&b.price)
        .then(b.vcpus.cmp(&a.vcpus))
        .then(b.ram.cmp(&a.ram))
        .then(b.scratch.cmp(&a.scratch))
}

fn build_index(
    cfg: &SchedConfig,
    pool: &PoolSnapshot,
    needs_by_uuid: &HashMap<&str, InstanceResources>,
) -> Index {
    let mut names: Vec<&Arc<InstanceType>> = cfg.types.values().collect();
    names.sort_by(|a, b| type_key_cmp(a, b).then_with(|| a.name.cmp(&b.name)));
    let mut types = Vec::with_capacity(names.len());
    let mut by_name = HashMap::new();
    let mut rank = 0u64;
    for (k, it) in names.iter().enumerate() {
        if k > 0 && type_key_cmp(names[k - 1], it) != Ordering::Equal {
            rank += 1;
        }
        by_name.insert(it.name.clone(), k);
        types.push(TypeSlots {
            it: (*it).clone(),
            name: Arc::from(it.name.as_str()),
            rank,
            pending: OfferTree::with_leaves(&[]),
            pending_insts: Vec::new(),
            real: OfferTree::with_leaves(&[]),
            real_insts: Vec::new(),
        });
    }
    let limit = cfg.max_running_containers_per_instance as i64;

    // Real instances (and pending creates from earlier passes) in scan order.
    let mut order: Vec<(usize, usize)> = pool
        .instances
        .iter()
        .enumerate()
        .filter_map(|(v, view)| by_name.get(&view.arvados_instance_type).map(|&t| (v, t)))
        .collect();
    order.sort_by(|&(va, ta), &(vb, tb)| {
        types[ta].rank.cmp(&types[tb].rank).then_with(|| {
            pool.instances[va]
                .instance
                .cmp(&pool.instances[vb].instance)
        })
    });
    let mut insts = Vec::with_capacity(order.len());
    let mut real_leaves: Vec<Vec<Offer>> = vec![Vec::new(); types.len()];
    let mut pending_leaves: Vec<Vec<Offer>> = vec![Vec::new(); types.len()];
    let mut seq = 0u64;
    for (v, t) in order {
        let view = &pool.instances[v];
        let mut free = InstanceResources::of_type(&types[t].it);
        for uuid in &view.running_container_uuids {
            match needs_by_uuid.get(uuid.as_str()) {
                Some(need) => free.sub(need),
                None => {
                    // Size unknown: take the instance as full.
                    free = InstanceResources {
                        shared_vcpu_used: free.shared_vcpu_used,
                        ..Default::default()
                    };
                    break;
                }
            }
        }
        let count = view.running_container_uuids.len() as i64;
        let pending = view.instance.is_empty();
        let usable = view.worker_state != WorkerState::Shutdown
            && view.idle_behavior == IdleBehavior::Run
            && (limit == 0 || count < limit);
        let i = insts.len();
        let ts = &mut types[t];
        let (leaves, list) = if pending {
            (&mut pending_leaves[t], &mut ts.pending_insts)
        } else {
            (&mut real_leaves[t], &mut ts.real_insts)
        };
        let inst = Inst {
            id: (!pending).then(|| Arc::from(view.instance.as_str())),
            ty: t,
            pos: pos(ts.rank, pending, seq),
            pending,
            slot: list.len(),
            ready: view.worker_state.is_ready(),
            usable,
            count,
            free,
        };
        seq += 1;
        leaves.push(if usable {
            Offer::usable(&free, count, inst.ready)
        } else {
            Offer::NONE
        });
        list.push(i);
        insts.push(inst);
    }
    for (t, ts) in types.iter_mut().enumerate() {
        ts.real = OfferTree::with_leaves(&real_leaves[t]);
        ts.pending = OfferTree::with_leaves(&pending_leaves[t]);
    }
    Index {
        insts,
        types,
        by_name,
        by_ptr: HashMap::new(),
        limit_per_instance: limit,
        next_pending_seq: seq,
    }
}

/// Update the dynamic container limit for this pass (spec §7.3 "Dynamic concurrency limit");
/// returns the supervisor limit (0: none).
pub fn update_limits(
    cfg: &SchedConfig,
    limits: &mut Limits,
    last_503: Option<SystemTime>,
    running: usize,
    total_instances: usize,
    at_quota: bool,
    now: SystemTime,
) -> usize {
    match last_503 {
        Some(t) if limits.last_503.is_none_or(|l| t > l) => {
            limits.last_503 = Some(t);
            limits.max_containers = running.saturating_sub(1).max(1);
        }
        _ => {
            let quiet = limits
                .last_503
                .is_none_or(|l| now.duration_since(l).unwrap_or_default() > QUIET_AFTER_503);
            if limits.max_containers > 0 && quiet {
                limits.max_containers = limits.max_containers.max(running * 11 / 10 + 1);
            }
        }
    }
    if limits.instances_within_quota > 0 && limits.instances_within_quota < total_instances {
        limits.instances_within_quota = total_instances;
    }
    if at_quota {
        if limits.max_containers == 0 || limits.max_containers > total_instances {
            limits.max_containers = total_instances.max(1);
        }
        limits.instances_within_quota = total_instances;
    } else if limits.instances_within_quota > 0
        && limits.max_containers > limits.instances_within_quota + 1
    {
        limits.max_containers = limits.instances_within_quota + 1;
    }
    if limits.max_containers == 0 {
        return 0;
    }
    let max_super = (limits.max_containers as f64 * cfg.supervisor_fraction).floor() as usize;
    if max_super < 1 && cfg.supervisor_fraction > 0.0 {
        1
    } else {
        max_super
    }
}

/// Sort the queue: containers the pool is running first, then Locked, then priority
/// (highest first), then first seen (oldest first), then uuid.
pub fn sort_queue(entries: &[Arc<QueueEnt>], running: &RunningMap) -> Vec<usize> {
    let keys: Vec<(u8, i64, i64)> = entries
        .iter()
        .map(|e| {
            let c = &e.container;
            let class = if running.contains_key(&c.uuid) {
                0
            } else if c.state == ContainerState::Locked {
                1
            } else {
                2
            };
            let seen = e
                .first_seen_at
                .timestamp_nanos_opt()
                .unwrap_or(e.first_seen_at.timestamp().saturating_mul(1_000_000_000));
            (class, -c.priority, seen)
        })
        .collect();
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_unstable_by(|&a, &b| {
        keys[a]
            .cmp(&keys[b])
            .then_with(|| entries[a].container.uuid.cmp(&entries[b].container.uuid))
    });
    order
}

/// One scheduling pass (spec §7.3). `last_503` is when the API client last saw a 503.
pub fn plan_queue(
    cfg: &SchedConfig,
    limits: &mut Limits,
    entries: &[Arc<QueueEnt>],
    pool: &PoolSnapshot,
    last_503: Option<SystemTime>,
    now: SystemTime,
) -> QueuePlan {
    let order = sort_queue(entries, &pool.running);

    // Needs of the containers on instances, to see what is left on each.
    let mut on_instances: HashSet<&str> = HashSet::new();
    for v in &pool.instances {
        for u in &v.running_container_uuids {
            on_instances.insert(u.as_str());
        }
    }
    let mut needs_by_uuid: HashMap<&str, InstanceResources> = HashMap::new();
    if !on_instances.is_empty() {
        for e in entries {
            if on_instances.contains(e.container.uuid.as_str()) {
                needs_by_uuid.insert(e.container.uuid.as_str(), e.instance_resources);
            }
        }
    }
    let mut index = build_index(cfg, pool, &needs_by_uuid);

    let mut at_quota = pool.at_quota || pool.quota_headroom == Some(0);
    let max_supervisors = update_limits(
        cfg,
        limits,
        last_503,
        pool.running.len(),
        pool.total_instances,
        at_quota,
        now,
    );
    let max_containers = limits.max_containers;
    let mut quota_headroom = pool.quota_headroom;
    let mut create_budget = pool.create_budget;

    let mut plan = QueuePlan {
        max_containers,
        ..Default::default()
    };
    let mut statuses: Vec<Status> = vec![Status::None; order.len()];
    let mut overquota_from: Option<usize> = None;
    let mut overmaxsuper: Vec<usize> = Vec::new();
    let mut trying = pool.running.len();
    let mut qpos = 0usize;
    let mut supervisors = 0usize;
    let mut eligible: Vec<usize> = Vec::new();

    for (k, &ei) in order.iter().enumerate() {
        let ent = &entries[ei];
        let ctr = &ent.container;
        let supervisor = ctr.scheduling_parameters.supervisor;
        if supervisor {
            supervisors += 1;
        }
        if pool.running.contains_key(&ctr.uuid) {
            if matches!(ctr.state, ContainerState::Queued | ContainerState::Locked) {
                statuses[k] = Status::Preparing;
            }
            continue;
        }
        if ctr.priority < 1 {
            statuses[k] = Status::PriorityZero(ctr.state);
            continue;
        }
        if supervisor && max_supervisors > 0 && supervisors > max_supervisors {
            overmaxsuper.push(k);
            statuses[k] = Status::SupervisorLimit(overmaxsuper.len());
            continue;
        }
        if !matches!(ctr.state, ContainerState::Queued | ContainerState::Locked) {
            continue;
        }
        if max_containers > 0 && trying >= max_containers {
            continue;
        }
        trying += 1;

        // Best existing instance, and the cheapest type not at capacity.
        eligible.clear();
        for it in &ent.instance_types {
            if let Some(t) = index.type_of(it) {
                eligible.push(t);
            }
        }
        let need = &ent.instance_resources;
        let best = index.best(&eligible, need);
        let available = ent
            .instance_types
            .iter()
            .find(|it| !pool.at_capacity.contains(&it.name));

        match ctr.state {
            ContainerState::Queued => {
                if best.is_none() && at_quota {
                    overquota_from = Some(k);
                    break;
                }
                if best.is_none() && available.is_none() {
                    continue;
                }
                plan.locks.push(ctr.uuid.clone());
                if let Some(b) = best {
                    index.place(b, need);
                }
            }
            ContainerState::Locked => {
                // (Go also asks the pool to kill a leftover crunch-run "about to start"; a
                // container with one is in `running` and was skipped above.)
                if let Some(b) = best {
                    index.place(b, need);
                    let inst = &index.insts[b];
                    match &inst.id {
                        Some(id) if inst.ready => {
                            plan.starts.push((id.to_string(), ent.clone()));
                            statuses[k] = Status::Preparing;
                        }
                        _ => {
                            statuses[k] = Status::NewInstance(index.types[inst.ty].name.clone());
                            plan.allocated_not_started += 1;
                        }
                    }
                    continue;
                }
                if at_quota {
                    overquota_from = Some(k);
                    break;
                }
                let Some(it) = available else {
                    qpos += 1;
                    let names: Vec<&str> =
                        ent.instance_types.iter().map(|t| t.name.as_str()).collect();
                    statuses[k] = Status::AllTypesAtCapacity(qpos, Arc::from(names.join(", ")));
                    continue;
                };
                if create_budget == Some(0) {
                    plan.declined_creates.push((it.clone(), ctr.uuid.clone()));
                    continue;
                }
                create_budget = create_budget.map(|n| n - 1);
                quota_headroom = quota_headroom.map(|n| n.saturating_sub(1));
                if quota_headroom == Some(0) {
                    at_quota = true;
                }
                plan.creates.push((it.clone(), ctr.uuid.clone()));
                statuses[k] = Status::NewInstance(Arc::from(it.name.as_str()));
                plan.allocated_not_started += 1;
                if let Some(t) = index.type_of(it) {
                    index.add_pending(t, need);
                }
            }
            _ => {}
        }
    }

    let overquota: Vec<usize> = match overquota_from {
        Some(k) => (k..order.len()).collect(),
        None => Vec::new(),
    };
    plan.not_allocated_over_quota = overquota.len() + overmaxsuper.len();

    for (k, &ei) in order.iter().enumerate() {
        let state = entries[ei].container.state;
        if statuses[k].is_none() && matches!(state, ContainerState::Queued | ContainerState::Locked)
        {
            qpos += 1;
            statuses[k] = if at_quota {
                Status::CloudLimits(qpos)
            } else {
                Status::ClusterCapacity(qpos)
            };
        }
    }

    if !overquota.is_empty() || !overmaxsuper.is_empty() {
        let mut unlock: Vec<usize> = overmaxsuper.clone();
        if pool.total_instances > 0 && overquota.len() > 1 {
            unlock.extend_from_slice(&overquota[1..]);
        } else {
            unlock.extend_from_slice(&overquota);
        }
        for k in unlock {
            let c = &entries[order[k]].container;
            if c.state == ContainerState::Locked && !pool.running.contains_key(&c.uuid) {
                plan.unlocks.push(c.uuid.clone());
            }
        }
    }
    if !overquota.is_empty() {
        let placed: HashSet<&str> = index
            .insts
            .iter()
            .filter(|i| i.count > 0)
            .filter_map(|i| i.id.as_deref())
            .collect();
        for v in &pool.instances {
            if !v.instance.is_empty()
                && v.running_container_uuids.is_empty()
                && !placed.contains(v.instance.as_str())
            {
                plan.shutdowns.push(v.instance.clone());
            }
        }
    }

    plan.sorted = order
        .iter()
        .zip(statuses)
        .map(|(&ei, s)| (entries[ei].clone(), s))
        .collect();
    plan
}
