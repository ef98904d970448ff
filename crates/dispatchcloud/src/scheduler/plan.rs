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

use super::index::InstanceIndex;
use super::pool::{RunningMap, WorkerPool};
use super::status::Status;
use crate::fasthash::{FastMap, FastSet};
use crate::node_size::InstanceResources;
use crate::queue::{QueueEnt, uuid_hash};
use crate::settings::ShutdownAtQuota;
use crate::worker_state::{InstanceView, WorkerState};

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
    /// Fleet cost limits from the settings file (default: none).
    pub spend_caps: crate::settings::SpendCaps,
    /// What to shut down at quota (settings file; default Arvados' `All`).
    pub shutdown_at_quota: crate::settings::ShutdownAtQuota,
    /// What to do on a spot interruption notice (settings file; default nothing, as Arvados).
    pub interruptions: crate::settings::InterruptionSettings,
    /// Spot → on-demand fallback (settings file; default off, as Arvados).
    pub spot_fallback: crate::settings::SpotFallbackSettings,
    /// `Containers.MaximumPriceFactor` (the fallback's price limit unless it has its own).
    pub maximum_price_factor: f64,
    /// `IdleTime.Adaptive`: tell the pool after each pass which types waiting containers
    /// could use.
    pub idle_adaptive: bool,
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
            spend_caps: Default::default(),
            shutdown_at_quota: Default::default(),
            interruptions: Default::default(),
            spot_fallback: Default::default(),
            maximum_price_factor: c.maximum_price_factor,
            idle_adaptive: false,
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
    /// Containers (by uuid hash) that fell back from spot to on demand (`SpotFallback`):
    /// they keep the on-demand types until they start or leave the queue.
    pub fallen_back: HashSet<u64>,
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
            fallen_back: HashSet::new(),
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
    /// What the fleet has cost since 00:00 UTC (for the daily spend cap).
    pub spent_today: f64,
}

impl PoolSnapshot {
    /// Everything a pass needs from the pool, in one consistent view where the pool offers
    /// one ([`WorkerPool::snapshot`]).
    pub fn take<P: WorkerPool + ?Sized>(pool: &P, cfg: &SchedConfig) -> PoolSnapshot {
        pool.snapshot(cfg)
    }

    /// The snapshot read one question at a time (the default of [`WorkerPool::snapshot`]).
    pub fn read<P: WorkerPool + ?Sized>(pool: &P, cfg: &SchedConfig) -> PoolSnapshot {
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
            spent_today: pool.spent_today(),
        }
    }
}

/// Everything one pass decided.
#[derive(Debug, Clone, Default)]
pub struct QueuePlan {
    /// The queue order and statuses (finished lazily, see [`QueueOrder::sorted`]).
    pub queue: QueueOrder,
    /// Queued containers to lock (asynchronously).
    pub locks: Vec<String>,
    /// Instances to create: the type, and the container that asked for it.
    pub creates: Vec<(Arc<InstanceType>, String)>,
    /// Hourly price that could still be added under the spend caps at the start of the pass
    /// (`None`: no cap).
    pub spend_headroom: Option<f64>,
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
    /// Containers that fell back from spot to on demand in this pass (`SpotFallback`).
    pub spot_fallbacks: Vec<String>,
}

/// The queue as a pass left it: indices into the entries the pass was given, first the
/// prefix the pass sorted (every container it had to decide about), then the rest unsorted,
/// with statuses for the prefix. [`QueueOrder::sorted`] finishes order and statuses when
/// someone asks (the management API), so a pass never sorts or formats what nobody reads.
#[derive(Debug, Clone, Default)]
pub struct QueueOrder {
    pub order: Vec<usize>,
    /// Statuses of the sorted prefix of `order`.
    pub statuses: Vec<Status>,
    tail: TailState,
}

/// What finishing the statuses of the unsorted tail needs from the pass.
#[derive(Debug, Clone, Default)]
struct TailState {
    packable: bool,
    /// The pass stopped early (over quota): the tail only gets queue positions.
    stopped: bool,
    qpos: usize,
    over_super: usize,
    supervisors: usize,
    max_supervisors: usize,
    at_quota: bool,
}

impl QueuePlan {
    /// See [`QueueOrder::sorted`].
    pub fn sorted(&self, entries: &[Arc<QueueEnt>]) -> Vec<(Arc<QueueEnt>, Status)> {
        self.queue.sorted(entries)
    }
}

impl QueueOrder {
    /// The whole queue in scheduling order with statuses, given the entries the pass saw.
    /// The tail the pass did not need to order (containers past the container limit) is
    /// sorted here, and its statuses (queue positions) filled in as the pass would have.
    pub fn sorted(&self, entries: &[Arc<QueueEnt>]) -> Vec<(Arc<QueueEnt>, Status)> {
        let n = self.statuses.len();
        let mut out: Vec<(Arc<QueueEnt>, Status)> = self.order[..n]
            .iter()
            .zip(&self.statuses)
            .map(|(&i, s)| (entries[i].clone(), s.clone()))
            .collect();
        let mut tail: Vec<Row> = self.order[n..]
            .iter()
            .map(|&i| row_for(&entries[i], i, false))
            .collect();
        sort_rows(&mut tail, entries, self.tail.packable);
        let t = &self.tail;
        let (mut qpos, mut over_super, mut supervisors) = (t.qpos, t.over_super, t.supervisors);
        for row in tail {
            if row.supervisor {
                supervisors += 1;
            }
            let status = if row.priority < 1 && !t.stopped {
                Status::PriorityZero(row.state)
            } else if row.supervisor && t.max_supervisors > 0 && supervisors > t.max_supervisors {
                over_super += 1;
                Status::SupervisorLimit(over_super)
            } else if matches!(row.state, ContainerState::Queued | ContainerState::Locked) {
                qpos += 1;
                if t.at_quota {
                    Status::CloudLimits(qpos)
                } else {
                    Status::ClusterCapacity(qpos)
                }
            } else {
                Status::None
            };
            out.push((entries[row.idx as usize].clone(), status));
        }
        out
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

/// What the pass needs of one queue entry, packed so the 100 000-entry loops read a compact
/// array instead of chasing each entry's pointer.
#[derive(Debug, Clone, Copy)]
struct Row {
    /// Sort key: class (0: on a worker; 1: Locked; 2: anything else), then priority
    /// descending, then first seen; packed into one integer when priorities allow.
    key: u128,
    priority: i64,
    idx: u32,
    state: ContainerState,
    supervisor: bool,
    running: bool,
}

/// Priorities below this pack into [`Row::key`] (Arvados' are far smaller).
const PACKED_PRIORITY_LIMIT: i64 = 1 << 62;

fn row_for(e: &QueueEnt, idx: usize, running: bool) -> Row {
    let h = e.sched();
    let class: u8 = if running {
        0
    } else if h.state == ContainerState::Locked {
        1
    } else {
        2
    };
    let prio = (PACKED_PRIORITY_LIMIT - 1 - h.priority.clamp(0, PACKED_PRIORITY_LIMIT - 1)) as u128;
    let seen = (h.first_seen_ns as u64 ^ (1 << 63)) as u128;
    Row {
        key: (u128::from(class) << 126) | (prio << 64) | seen,
        priority: h.priority,
        idx: idx as u32,
        state: h.state,
        supervisor: h.supervisor,
        running,
    }
}

/// Scheduling order of two rows: the packed key (or, if some priority does not pack, class,
/// priority and first-seen compared separately), then uuid.
fn row_order(entries: &[Arc<QueueEnt>], packable: bool) -> impl Fn(&Row, &Row) -> Ordering + '_ {
    move |a: &Row, b: &Row| {
        let by_key = if packable {
            a.key.cmp(&b.key)
        } else {
            let class = |r: &Row| (r.key >> 126) as u8;
            let seen = |r: &Row| r.key as u64;
            (class(a), b.priority, seen(a)).cmp(&(class(b), a.priority, seen(b)))
        };
        by_key.then_with(|| {
            entries[a.idx as usize]
                .container()
                .uuid
                .cmp(&entries[b.idx as usize].container().uuid)
        })
    }
}

fn sort_rows(rows: &mut [Row], entries: &[Arc<QueueEnt>], packable: bool) {
    rows.sort_unstable_by(row_order(entries, packable));
}

/// Rows for every entry, in entry order, and whether all priorities pack. Also collects the
/// needs of containers that sit on instances.
fn build_rows<'a>(
    entries: &'a [Arc<QueueEnt>],
    pool: &PoolSnapshot,
    needs: &mut FastMap<&'a str, InstanceResources>,
) -> (Vec<Row>, bool) {
    // Uuids the pool knows (running, or on an instance), by hash: most entries are neither,
    // and a hash probe saves reading their uuid strings.
    const RUNNING: u8 = 1;
    const ON_INSTANCE: u8 = 2;
    let mut known: FastMap<u64, u8> = FastMap::default();
    for u in pool.running.keys() {
        *known.entry(uuid_hash(u)).or_default() |= RUNNING;
    }
    let mut on_instances: FastSet<&str> = FastSet::default();
    for v in &pool.instances {
        for u in &v.running_container_uuids {
            *known.entry(uuid_hash(u)).or_default() |= ON_INSTANCE;
            on_instances.insert(u.as_str());
        }
    }
    let mut packable = true;
    let rows = entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if let Some(ahead) = entries.get(i + PREFETCH_AHEAD) {
                prefetch_row_fields(ahead);
            }
            let flags = if known.is_empty() {
                0
            } else {
                known.get(&e.uuid_hash()).copied().unwrap_or(0)
            };
            let uuid = || e.container().uuid.as_str();
            let is_running = flags & RUNNING != 0 && pool.running.contains_key(uuid());
            if flags & ON_INSTANCE != 0 && on_instances.contains(uuid()) {
                needs.insert(uuid(), e.instance_resources);
            }
            packable &= (0..PACKED_PRIORITY_LIMIT).contains(&e.sched().priority);
            row_for(e, i, is_running)
        })
        .collect();
    (rows, packable)
}

/// How many rows ahead the pass asks the CPU to fetch queue entries.
const PREFETCH_AHEAD: usize = 8;

/// Hint the CPU to load the parts of a queue entry the pass reads (its eligible types and
/// needs): entries are scattered over the heap and visited in priority order, so without this
/// the pass mostly waits for memory. A hint only; no effect on results.
#[inline]
fn prefetch_entry(e: &Arc<QueueEnt>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let fields = [
            std::ptr::from_ref(&e.instance_types).cast::<i8>(),
            std::ptr::from_ref(&e.instance_resources).cast::<i8>(),
            std::ptr::from_ref(&e.container().uuid).cast::<i8>(),
            // The reference count, just before the data.
            std::ptr::from_ref::<QueueEnt>(e)
                .cast::<i8>()
                .wrapping_sub(16),
        ];
        for p in fields {
            // SAFETY: prefetching never dereferences or faults.
            #[allow(unused_unsafe)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(p);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = e;
}

/// The second stage of [`prefetch_entry`]: the heap data the entry points to (uuid text,
/// eligible type list).
#[inline]
fn prefetch_entry_heap(e: &Arc<QueueEnt>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let uuid = e.container().uuid.as_ptr().cast::<i8>();
        let types = e.instance_types.as_ptr().cast::<i8>();
        // SAFETY: prefetching never dereferences or faults.
        #[allow(unused_unsafe)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(uuid);
            _mm_prefetch::<_MM_HINT_T0>(types);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = e;
}

/// As [`prefetch_entry`], for the fields a row is built from (at the start of the entry).
#[inline]
fn prefetch_row_fields(e: &Arc<QueueEnt>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let p = std::ptr::from_ref(e.sched()).cast::<i8>();
        // SAFETY: prefetching never dereferences or faults.
        #[allow(unused_unsafe)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = e;
}

/// Grow the sorted prefix `rows[..*sorted]` to the `want` smallest rows (all, if `want` is
/// past the end): partition, then sort only the new part.
fn extend_sorted(
    rows: &mut [Row],
    sorted: &mut usize,
    want: usize,
    order: &impl Fn(&Row, &Row) -> Ordering,
) {
    let want = want.min(rows.len());
    if want <= *sorted {
        return;
    }
    if want < rows.len() {
        rows[*sorted..].select_nth_unstable_by(want - *sorted - 1, order);
    }
    rows[*sorted..want].sort_unstable_by(order);
    *sorted = want;
}

/// Each spot type's on-demand variant: the cheapest configured type with the same provider
/// type that is not preemptible.
fn on_demand_variants(cfg: &SchedConfig) -> HashMap<&str, Arc<InstanceType>> {
    let mut cheapest: HashMap<&str, &Arc<InstanceType>> = HashMap::new();
    for it in cfg.types.values().filter(|it| !it.preemptible) {
        let e = cheapest.entry(it.provider_type.as_str()).or_insert(it);
        if (it.price, &it.name) < (e.price, &e.name) {
            *e = it;
        }
    }
    cfg.types
        .values()
        .filter(|it| it.preemptible)
        .filter_map(|it| {
            cheapest
                .get(it.provider_type.as_str())
                .map(|v| (it.name.as_str(), (*v).clone()))
        })
        .collect()
}

/// `SpotFallback` for one waiting container. If it asked for spot and has fallen back, or falls
/// back now (it waited `After` and every spot type it could use is at capacity), `out` gets
/// the types it may use ([`spot_fallback_types`]); true if it falls back in this pass (it is
/// then remembered in `fallen_back`). `variants` is [`on_demand_variants`], made when first
/// needed.
fn spot_fallback<'c>(
    cfg: &'c SchedConfig,
    fallen_back: &mut HashSet<u64>,
    at_capacity: &HashSet<String>,
    ent: &QueueEnt,
    now: chrono::DateTime<chrono::Utc>,
    variants: &mut Option<HashMap<&'c str, Arc<InstanceType>>>,
    out: &mut Vec<Arc<InstanceType>>,
) -> bool {
    if !ent.container().scheduling_parameters.preemptible {
        return false;
    }
    let fallen = fallen_back.contains(&ent.uuid_hash());
    if !fallen {
        let all_short = !at_capacity.is_empty()
            && ent
                .instance_types
                .iter()
                .all(|it| at_capacity.contains(&it.name));
        let waited = (now - ent.first_seen_at())
            .to_std()
            .is_ok_and(|w| w >= cfg.spot_fallback.after);
        if !(all_short && waited) {
            return false;
        }
    }
    let variants = variants.get_or_insert_with(|| on_demand_variants(cfg));
    spot_fallback_types(cfg, &ent.instance_types, variants, out);
    if fallen
        || !out
            .iter()
            .any(|it| !it.preemptible && !at_capacity.contains(&it.name))
    {
        return false;
    }
    fallen_back.insert(ent.uuid_hash());
    true
}

/// A fallen-back container's types: its own spot types (cheapest first), then the on-demand
/// variants of them within the price limit, cheapest first, each once. The limit is
/// `SpotFallback.PriceFactor` times its cheapest spot type's price if set, else
/// `MaximumPriceFactor` times the cheapest variant's price: the band of types the container
/// accepted, at on-demand prices (spot's discount alone would put every on-demand type
/// outside a spot-priced band of 1.5).
fn spot_fallback_types(
    cfg: &SchedConfig,
    spot: &[Arc<InstanceType>],
    variants: &HashMap<&str, Arc<InstanceType>>,
    out: &mut Vec<Arc<InstanceType>>,
) {
    let Some(cheapest) = spot.first() else {
        return;
    };
    let mut extra: Vec<Arc<InstanceType>> = Vec::new();
    for it in spot {
        if let Some(v) = variants.get(it.name.as_str())
            && !extra.iter().any(|e| e.name == v.name)
        {
            extra.push(v.clone());
        }
    }
    extra.sort_by(|a, b| {
        a.price
            .total_cmp(&b.price)
            .then_with(|| a.name.cmp(&b.name))
    });
    let limit = if cfg.spot_fallback.price_factor > 0.0 {
        cheapest.price * cfg.spot_fallback.price_factor
    } else {
        let Some(first) = extra.first() else {
            return;
        };
        first.price * cfg.maximum_price_factor.max(1.0)
    };
    extra.retain(|v| v.price <= limit);
    if extra.is_empty() {
        return;
    }
    out.extend(spot.iter().cloned());
    out.extend(extra);
}

/// One scheduling pass (spec §7.3). `last_503` is when the API client last saw a 503.
///
/// Only the head of the queue that can get decisions this pass is sorted (it grows until the
/// container limit is reached); the rest can only be told its queue position, which
/// [`QueuePlan::sorted`] works out when asked.
pub fn plan_queue(
    cfg: &SchedConfig,
    limits: &mut Limits,
    entries: &[Arc<QueueEnt>],
    pool: &PoolSnapshot,
    last_503: Option<SystemTime>,
    now: SystemTime,
) -> QueuePlan {
    // Needs of the containers on instances, to see what is left on each.
    let mut needs_by_uuid: FastMap<&str, InstanceResources> = FastMap::default();
    let (mut rows, packable) = build_rows(entries, pool, &mut needs_by_uuid);
    let mut index = InstanceIndex::build(cfg, pool, &needs_by_uuid);

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
    let fleet_per_hour: f64 = pool.instances.iter().map(|v| v.price).sum();
    let mut spend_headroom = cfg.spend_caps.headroom(fleet_per_hour, pool.spent_today);
    // A new instance of type `it` fits under the spend caps.
    let affordable = |room: Option<f64>, it: &InstanceType| room.is_none_or(|r| it.price <= r);

    let mut plan = QueuePlan {
        max_containers,
        spend_headroom,
        ..Default::default()
    };
    let mut statuses: Vec<Status> = Vec::new();
    let mut overquota_from: Option<usize> = None;
    let mut overmaxsuper: Vec<usize> = Vec::new();
    let mut trying = pool.running.len();
    let mut qpos = 0usize;
    let mut supervisors = 0usize;
    let mut eligible: Vec<usize> = Vec::new();
    // Spot → on-demand fallback: each spot type's on-demand variant, and the types a fallen
    // back container may use (its own, then the variants within the price limit).
    let fallback_after = cfg.spot_fallback.after;
    let mut variants: Option<HashMap<&str, Arc<InstanceType>>> = None;
    let mut with_variants: Vec<Arc<InstanceType>> = Vec::new();
    if fallback_after.is_zero() {
        limits.fallen_back.clear();
    } else if !limits.fallen_back.is_empty() {
        let present: FastSet<u64> = entries.iter().map(|e| e.uuid_hash()).collect();
        limits.fallen_back.retain(|h| present.contains(h));
    }
    let now_utc = chrono::DateTime::<chrono::Utc>::from(now);

    let order = row_order(entries, packable);
    let on_workers = rows.iter().filter(|r| r.running).count();
    let limited = max_containers > 0;
    let mut sorted = 0usize;
    let mut want = if limited {
        on_workers + max_containers.saturating_sub(trying) + 16
    } else {
        rows.len()
    };
    let mut k = 0usize;
    'pass: loop {
        extend_sorted(&mut rows, &mut sorted, want, &order);
        statuses.resize(sorted, Status::None);
        while k < sorted {
            let row = rows[k];
            // Two-stage prefetch: the entry itself far ahead, what it points to nearer.
            if let Some(ahead) = rows.get(k + 2 * PREFETCH_AHEAD)
                && ahead.priority > 0
            {
                prefetch_entry(&entries[ahead.idx as usize]);
            }
            if let Some(ahead) = rows.get(k + PREFETCH_AHEAD)
                && ahead.priority > 0
            {
                prefetch_entry_heap(&entries[ahead.idx as usize]);
            }
            k += 1;
            let k = k - 1;
            if row.supervisor {
                supervisors += 1;
            }
            let waiting = matches!(row.state, ContainerState::Queued | ContainerState::Locked);
            if row.running {
                if waiting {
                    statuses[k] = Status::Preparing;
                }
                continue;
            }
            if row.priority < 1 {
                statuses[k] = Status::PriorityZero(row.state);
                continue;
            }
            if row.supervisor && max_supervisors > 0 && supervisors > max_supervisors {
                overmaxsuper.push(k);
                statuses[k] = Status::SupervisorLimit(overmaxsuper.len());
                continue;
            }
            if !waiting || (limited && trying >= max_containers) {
                continue;
            }
            trying += 1;

            // Best existing instance, and the cheapest type not at capacity.
            let ent = &entries[row.idx as usize];
            with_variants.clear();
            if !fallback_after.is_zero()
                && spot_fallback(
                    cfg,
                    &mut limits.fallen_back,
                    &pool.at_capacity,
                    ent,
                    now_utc,
                    &mut variants,
                    &mut with_variants,
                )
            {
                plan.spot_fallbacks.push(ent.container().uuid.clone());
            }
            let types: &[Arc<InstanceType>] = if with_variants.is_empty() {
                &ent.instance_types
            } else {
                &with_variants
            };
            index.types_of(types, &mut eligible);
            let need = &ent.instance_resources;
            let best = index.best(&eligible, need);
            let available = if pool.at_capacity.is_empty() {
                types.first()
            } else {
                types.iter().find(|it| !pool.at_capacity.contains(&it.name))
            };

            if row.state == ContainerState::Queued {
                if best.is_none() && at_quota {
                    overquota_from = Some(k);
                    break 'pass;
                }
                if best.is_none() && available.is_none() {
                    continue;
                }
                if best.is_none()
                    && let Some(it) = available
                    && !affordable(spend_headroom, it)
                {
                    // Locking it would only hold it: no instance can be made for it now.
                    qpos += 1;
                    statuses[k] = Status::SpendCap(qpos, Arc::from(it.name.as_str()));
                    continue;
                }
                plan.locks.push(ent.container().uuid.clone());
                if let Some(b) = best {
                    index.place(b, need);
                }
                continue;
            }

            // Locked. (Go also asks the pool to kill a leftover crunch-run "about to start";
            // a container with one is in `running` and was skipped above.)
            if let Some(b) = best {
                index.place(b, need);
                let inst = &index.insts[b];
                match inst.view {
                    Some(v) if inst.ready => {
                        plan.starts
                            .push((pool.instances[v].instance.clone(), ent.clone()));
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
                break 'pass;
            }
            let Some(it) = available else {
                qpos += 1;
                let names: Vec<&str> = ent.instance_types.iter().map(|t| t.name.as_str()).collect();
                statuses[k] = Status::AllTypesAtCapacity(qpos, Arc::from(names.join(", ")));
                continue;
            };
            if !affordable(spend_headroom, it) {
                qpos += 1;
                statuses[k] = Status::SpendCap(qpos, Arc::from(it.name.as_str()));
                continue;
            }
            if create_budget == Some(0) {
                plan.declined_creates
                    .push((it.clone(), ent.container().uuid.clone()));
                continue;
            }
            create_budget = create_budget.map(|n| n - 1);
            spend_headroom = spend_headroom.map(|r| r - it.price);
            quota_headroom = quota_headroom.map(|n| n.saturating_sub(1));
            if quota_headroom == Some(0) {
                at_quota = true;
            }
            plan.creates
                .push((it.clone(), ent.container().uuid.clone()));
            plan.allocated_not_started += 1;
            match index.type_of(it) {
                Some(t) => {
                    statuses[k] = Status::NewInstance(index.types[t].name.clone());
                    index.add_pending(t, need);
                }
                None => statuses[k] = Status::NewInstance(Arc::from(it.name.as_str())),
            }
        }
        if sorted == rows.len() || (limited && trying >= max_containers) {
            break;
        }
        want = want.saturating_mul(2);
    }

    // Past the sorted head, only supervisors over their limit still need a decision (unlock
    // if Locked). Count them in order: sort just the tail's supervisors.
    let mut tail_over_super: Vec<usize> = Vec::new();
    if overquota_from.is_none() && max_supervisors > 0 && sorted < rows.len() {
        let mut sup: Vec<Row> = rows[sorted..]
            .iter()
            .filter(|r| r.supervisor)
            .copied()
            .collect();
        sup.sort_unstable_by(&order);
        let mut n = supervisors;
        for r in sup {
            n += 1;
            if r.priority >= 1 && n > max_supervisors {
                tail_over_super.push(r.idx as usize);
            }
        }
    }

    let overquota_len = overquota_from.map_or(0, |k| rows.len() - k);
    plan.not_allocated_over_quota = overquota_len + overmaxsuper.len() + tail_over_super.len();

    // Queue positions for the sorted head; the tail continues from here when asked.
    for (k, row) in rows[..sorted].iter().enumerate() {
        if statuses[k].is_none()
            && matches!(row.state, ContainerState::Queued | ContainerState::Locked)
        {
            qpos += 1;
            statuses[k] = if at_quota {
                Status::CloudLimits(qpos)
            } else {
                Status::ClusterCapacity(qpos)
            };
        }
    }

    let locked_idle = |row: &Row| row.state == ContainerState::Locked && !row.running;
    let mut unlock_rows: Vec<Row> = overmaxsuper.iter().map(|&k| rows[k]).collect();
    unlock_rows.extend(tail_over_super.iter().map(|&i| {
        let e = &entries[i];
        row_for(e, i, false)
    }));
    if let Some(k0) = overquota_from {
        // Keep the head-of-line container locked when there are instances at all.
        let skip_head = usize::from(pool.total_instances > 0 && overquota_len > 1);
        unlock_rows.extend(rows[k0 + skip_head..sorted].iter().copied());
        let mut rest: Vec<Row> = rows[sorted..].to_vec();
        rest.sort_unstable_by(&order);
        unlock_rows.extend(rest);
    }
    for row in unlock_rows.iter().filter(|r| locked_idle(r)) {
        plan.unlocks
            .push(entries[row.idx as usize].container().uuid.clone());
    }
    if let Some(k0) = overquota_from {
        // Needed: the waiting containers behind the head are matched (not started: the head
        // keeps its turn) to the instances they fit; those needing a new one count.
        let mut reserved: Vec<usize> = Vec::new();
        let mut needed = 0usize;
        if cfg.shutdown_at_quota == ShutdownAtQuota::Needed {
            for row in &rows[k0..sorted] {
                if row.running
                    || row.priority < 1
                    || !matches!(row.state, ContainerState::Queued | ContainerState::Locked)
                {
                    continue;
                }
                let ent = &entries[row.idx as usize];
                index.types_of(&ent.instance_types, &mut eligible);
                match index.best(&eligible, &ent.instance_resources) {
                    Some(b) => {
                        if index.insts[b].count == 0
                            && let Some(v) = index.insts[b].view
                        {
                            reserved.push(v);
                        }
                        index.place(b, &ent.instance_resources);
                    }
                    None => needed += 1,
                }
            }
        }
        let placed: FastSet<usize> = index
            .insts
            .iter()
            .filter(|i| i.count > 0)
            .filter_map(|i| i.view)
            .collect();
        let empty =
            |v: &InstanceView| !v.instance.is_empty() && v.running_container_uuids.is_empty();
        match cfg.shutdown_at_quota {
            ShutdownAtQuota::All => {
                for (vi, v) in pool.instances.iter().enumerate() {
                    if empty(v) && !placed.contains(&vi) {
                        plan.shutdowns.push(v.instance.clone());
                    }
                }
            }
            ShutdownAtQuota::Needed => {
                let freeing = pool
                    .instances
                    .iter()
                    .filter(|v| v.worker_state == WorkerState::Shutdown)
                    .count();
                let candidate = |vi: &usize| {
                    let v = &pool.instances[*vi];
                    empty(v) && v.worker_state != WorkerState::Shutdown
                };
                // Those nothing fits first, idle ones before booting ones; then, if still
                // short, the ones matched last (the lowest-priority matches), so the head of
                // the queue always gets its instance, as with Arvados' rule.
                let mut order: Vec<usize> = (0..pool.instances.len())
                    .filter(|vi| candidate(vi) && !placed.contains(vi))
                    .collect();
                order.sort_by_key(|vi| pool.instances[*vi].worker_state != WorkerState::Idle);
                order.extend(reserved.iter().rev().copied().filter(candidate));
                for vi in order.into_iter().take(needed.saturating_sub(freeing)) {
                    plan.shutdowns.push(pool.instances[vi].instance.clone());
                }
            }
        }
    }

    plan.queue.order = rows.iter().map(|r| r.idx as usize).collect();
    plan.queue.statuses = statuses;
    plan.queue.tail = TailState {
        packable,
        stopped: overquota_from.is_some(),
        qpos,
        over_super: overmaxsuper.len(),
        supervisors,
        // After an over-quota stop Go counts no further supervisors.
        max_supervisors: if overquota_from.is_some() {
            0
        } else {
            max_supervisors
        },
        at_quota,
    };
    plan
}
