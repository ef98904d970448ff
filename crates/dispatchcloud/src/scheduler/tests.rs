//! Spec acceptance cases AC-SCH-1…21 and AC-SYNC-1…2 (`run_queue_test.go`, `sync_test.go`),
//! plus the scale scenario's expected decisions. The plan is pure, so each case builds a queue
//! and a stub pool, runs passes, and applies each plan the way the async shell would: locks
//! and unlocks change the container's state here, creates/starts/shutdowns go to the stub.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use arvados::InstanceType;
use arvados::config::Cluster;
use arvados::types::{Container, ContainerState};
use chrono::{DateTime, Duration, TimeZone, Utc};

use super::plan::{Limits, PoolSnapshot, QueuePlan, SchedConfig, plan_queue};
use super::pool::WorkerPool;
use super::reference;
use super::scale::{self, Variant};
use super::status::Status;
use super::stub::StubPool;
use super::sync::{SyncAction, plan_interruptions, plan_sync, wanted_types};
use crate::node_size::TypeChooser;
use crate::queue::QueueEnt;
use crate::worker_state::{IdleBehavior, InstanceView, WorkerState};

const GIB: i64 = 1 << 30;
const MIB: i64 = 1 << 20;

/// `typeN`: N VCPUs, 1.1×N GiB RAM, N GiB scratch, price N × 0.123.
fn type_n(n: i64) -> InstanceType {
    InstanceType {
        name: format!("type{n}"),
        provider_type: format!("providertype{n}"),
        vcpus: n,
        ram: n * GIB * 11 / 10,
        scratch: n * GIB,
        included_scratch: n * GIB,
        price: n as f64 * 0.123,
        ..Default::default()
    }
}

fn uuid(n: usize) -> String {
    format!("zzzzz-dz642-{n:015}")
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap()
}

struct Harness {
    cfg: SchedConfig,
    limits: Limits,
    chooser: TypeChooser,
    queue: BTreeMap<String, QueueEnt>,
    pool: StubPool,
    /// (uuid, from, to) for every state change a plan caused.
    changes: Vec<(String, ContainerState, ContainerState)>,
    threshold: DateTime<Utc>,
    last_plan: QueuePlan,
    last_entries: Vec<Arc<QueueEnt>>,
    /// Put into every pass's snapshot (the stub pool keeps no cost).
    spent_today: f64,
}

impl Harness {
    /// Types `typeN` for every N in `types`; MaxInstances 10; SupervisorFraction 0.2;
    /// MaximumPriceFactor 1; no RAM reserve or keep buffers.
    fn new(types: &[i64], tweak: impl FnOnce(&mut Cluster)) -> Harness {
        let mut cluster = Cluster {
            instance_types: types
                .iter()
                .map(|&n| (format!("type{n}"), type_n(n)))
                .collect(),
            ..Cluster::default()
        };
        let c = &mut cluster.containers;
        c.reserve_extra_ram = 0;
        c.local_keep_blob_buffers_per_vcpu = 0;
        c.maximum_price_factor = 1.0;
        c.cloud_vms.max_instances = 10;
        c.cloud_vms.supervisor_fraction = 0.2;
        tweak(&mut cluster);
        let cfg = SchedConfig::from_cluster(&cluster);
        Harness {
            chooser: TypeChooser::new(&cluster),
            limits: Limits::new(&cfg),
            cfg,
            queue: BTreeMap::new(),
            pool: StubPool::new(999, 999),
            changes: Vec::new(),
            threshold: t0(),
            last_plan: QueuePlan::default(),
            last_entries: Vec::new(),
            spent_today: 0.0,
        }
    }

    fn it(&self, n: i64) -> Arc<InstanceType> {
        self.cfg.types[&format!("type{n}")].clone()
    }

    /// Add container `n` with its resources; returns its uuid.
    fn add(
        &mut self,
        n: usize,
        state: ContainerState,
        priority: i64,
        vcpus: i64,
        ram: i64,
        tweak: impl FnOnce(&mut Container),
    ) -> String {
        let mut c = Container {
            uuid: uuid(n),
            state,
            priority,
            created_at: Some(t0()),
            ..Default::default()
        };
        c.runtime_constraints.vcpus = vcpus;
        c.runtime_constraints.ram = ram;
        tweak(&mut c);
        let need = self.chooser.resources_needed(&c);
        let types = self
            .chooser
            .choose_for(&c, &need)
            .expect("test container must fit a type");
        self.queue.insert(
            c.uuid.clone(),
            QueueEnt::new(c, need, types, t0() + Duration::milliseconds(n as i64)),
        );
        uuid(n)
    }

    /// A worker made through a create call (so it is in `creates`), then put in `state`.
    fn worker(&self, n: i64, state: WorkerState) -> String {
        let id = self
            .pool
            .create(&self.it(n))
            .expect("setup create accepted")
            .instance;
        self.pool.set_state(&id, state);
        id
    }

    fn entries(&self) -> Vec<Arc<QueueEnt>> {
        self.queue.values().cloned().map(Arc::new).collect()
    }

    fn set_state(&mut self, uuid: &str, to: ContainerState) {
        let e = self.queue.get_mut(uuid).expect("known container");
        let from = e.container().state;
        e.modify(|c| c.state = to);
        self.changes.push((uuid.to_string(), from, to));
    }

    /// One `runQueue`, applied like the shell applies it.
    fn run_queue(&mut self) -> QueuePlan {
        self.run_queue_with_503(None)
    }

    fn run_queue_with_503(&mut self, last_503: Option<SystemTime>) -> QueuePlan {
        let mut snapshot = PoolSnapshot::take(&self.pool, &self.cfg);
        snapshot.spent_today = self.spent_today;
        let entries = self.entries();
        let plan = plan_queue(
            &self.cfg,
            &mut self.limits,
            &entries,
            &snapshot,
            last_503,
            SystemTime::now(),
        );
        for uuid in &plan.locks {
            if self.queue[uuid].container().state == ContainerState::Queued {
                self.set_state(uuid, ContainerState::Locked);
            }
        }
        for (it, _) in &plan.creates {
            self.pool.create(it);
        }
        for (id, ent) in &plan.starts {
            self.pool.start_container(id, ent.container());
        }
        for uuid in &plan.unlocks {
            self.set_state(uuid, ContainerState::Queued);
        }
        for id in &plan.shutdowns {
            self.pool.shutdown(id);
        }
        self.last_plan = plan.clone();
        self.last_entries = entries;
        plan
    }

    /// One `sync`, applied.
    fn sync(&mut self) -> Vec<SyncAction> {
        let unknown = self
            .pool
            .count_workers()
            .get(&WorkerState::Unknown)
            .is_some_and(|&n| n > 0);
        let actions = plan_sync(
            &self.entries(),
            &self.pool.running(),
            Some(self.threshold),
            unknown,
        );
        for a in &actions {
            match a {
                SyncAction::Forget { uuid, .. } => {
                    let c = &self.queue[uuid].container();
                    if c.state.is_final() || (c.state == ContainerState::Queued && c.priority == 0)
                    {
                        self.queue.remove(uuid);
                    }
                }
                SyncAction::Cancel { uuid, .. } => self.set_state(uuid, ContainerState::Cancelled),
                SyncAction::Requeue { uuid, .. } => self.set_state(uuid, ContainerState::Queued),
                SyncAction::Kill { uuid, reason } => {
                    self.pool.kill_container(uuid, reason);
                    self.pool.forget_container(uuid);
                }
            }
        }
        actions
    }

    fn status_of(&self, uuid: &str) -> String {
        self.last_plan
            .sorted(&self.last_entries)
            .into_iter()
            .find(|(e, _)| e.container().uuid == uuid)
            .map(|(_, s)| s.to_string())
            .unwrap_or_default()
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn all_types() -> Vec<i64> {
    (1..=16).collect()
}

#[test]
fn ac_sch_1_use_idle_workers() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(999, 6);
    for p in 1..=4 {
        h.add(p, ContainerState::Locked, p as i64, 1, GIB, |_| {});
    }
    let idle1 = h.worker(1, WorkerState::Idle);
    h.worker(2, WorkerState::Idle);
    h.worker(2, WorkerState::Idle);
    h.run_queue();
    assert_eq!(
        h.pool.creates(),
        names(&["type1", "type2", "type2", "type1", "type1", "type1"])
    );
    assert_eq!(h.pool.starts(), vec![uuid(4)]);
    assert_eq!(
        h.pool.running().keys().cloned().collect::<Vec<_>>(),
        vec![uuid(4)]
    );
    assert_eq!(h.pool.running_on(&idle1), vec![uuid(4)]);
}

/// The "pack" setup: type1 removed, price factor 1.5, four Locked 1-VCPU 1-GiB containers
/// whose eligible types are type2 and type3.
fn pack_harness(tweak: impl FnOnce(&mut Cluster)) -> Harness {
    let types: Vec<i64> = (2..=16).collect();
    let mut h = Harness::new(&types, |c| {
        c.containers.maximum_price_factor = 1.5;
        tweak(c);
    });
    for p in 1..=4 {
        h.add(p, ContainerState::Locked, p as i64, 1, GIB, |_| {});
    }
    h
}

#[test]
fn ac_sch_2_pack_containers_new_instance() {
    let mut h = pack_harness(|_| {});
    let e = &h.queue[&uuid(1)];
    let eligible: Vec<&str> = e.instance_types.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(eligible, ["type2", "type3"]);
    let plan = h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type2", "type2"]));
    assert!(h.pool.starts().is_empty());
    assert_eq!(plan.allocated_not_started, 4);
    for p in 1..=4 {
        assert_eq!(
            h.status_of(&uuid(p)),
            "Waiting for a type2 instance to boot and be ready to accept work."
        );
    }
}

#[test]
fn ac_sch_3_pack_containers_idle_instance() {
    let mut h = pack_harness(|_| {});
    let vm = h.worker(3, WorkerState::Idle);
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type3", "type2"]));
    assert_eq!(h.pool.starts(), vec![uuid(4), uuid(3), uuid(2)]);
    assert_eq!(h.pool.running_on(&vm), vec![uuid(4), uuid(3), uuid(2)]);
    assert_eq!(
        h.status_of(&uuid(4)),
        "Container is allocated to an instance and preparing to run."
    );
}

#[test]
fn ac_sch_4_pack_containers_idle_instance_too_big() {
    let mut h = pack_harness(|_| {});
    h.worker(4, WorkerState::Idle);
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type4", "type2", "type2"]));
    assert!(h.pool.starts().is_empty());
}

#[test]
fn ac_sch_5_pack_containers_spare_resources() {
    let mut h = pack_harness(|_| {});
    let vm = h.worker(3, WorkerState::Idle);
    let c4 = h.queue[&uuid(4)].container().clone();
    assert!(h.pool.start_container(&vm, &c4));
    h.queue
        .get_mut(&uuid(4))
        .unwrap()
        .modify(|c| c.state = ContainerState::Running);
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type3", "type2"]));
    assert_eq!(h.pool.starts(), vec![uuid(4), uuid(3), uuid(2)]);
}

#[test]
fn ac_sch_6_pack_containers_idle_behavior_hold() {
    let mut h = pack_harness(|_| {});
    let vm = h.worker(3, WorkerState::Idle);
    h.pool
        .with(|s| s.workers[0].idle_behavior = IdleBehavior::Hold);
    let c4 = h.queue[&uuid(4)].container().clone();
    assert!(
        !h.pool.start_container(&vm, &c4),
        "hold refuses the setup start"
    );
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type3", "type2", "type2"]));
    assert_eq!(h.pool.starts(), vec![uuid(4)]);
}

#[test]
fn ac_sch_7_pack_containers_disabled_in_config() {
    let mut h = pack_harness(|c| c.containers.cloud_vms.max_running_containers_per_instance = 1);
    h.worker(2, WorkerState::Idle);
    h.run_queue();
    assert_eq!(
        h.pool.creates(),
        names(&["type2", "type2", "type2", "type2"])
    );
    assert_eq!(h.pool.starts(), vec![uuid(4)]);
}

#[test]
fn ac_sch_8_pack_containers_limited_in_config() {
    let types: Vec<i64> = (8..=16).collect();
    let mut h = Harness::new(&types, |c| {
        c.containers.maximum_price_factor = 1.5;
        c.containers.cloud_vms.max_running_containers_per_instance = 2;
    });
    for p in 1..=4 {
        h.add(p, ContainerState::Locked, p as i64, 1, GIB, |_| {});
    }
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type8", "type8"]));
    assert!(h.pool.starts().is_empty());
}

#[test]
fn ac_sch_9_pack_containers_instance_state_unknown() {
    let mut h = pack_harness(|_| {});
    let unknown = h.worker(2, WorkerState::Unknown);
    // Pass 1: c4, c3 on the unknown VM (not started), c2 creates, c1 packs with it.
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type2", "type2"]));
    assert!(h.pool.starts().is_empty());
    let new = h.pool.worker_ids()[1].clone();
    // Pass 2: the new VM is booting: nothing new.
    h.run_queue();
    assert_eq!(h.pool.creates().len(), 2);
    assert!(h.pool.starts().is_empty());
    // Pass 3: the new VM is idle: c4 and c3 start there; c2, c1 wait on the unknown VM.
    h.pool.set_state(&new, WorkerState::Idle);
    h.run_queue();
    assert_eq!(h.pool.starts(), vec![uuid(4), uuid(3)]);
    assert_eq!(h.pool.running_on(&new), vec![uuid(4), uuid(3)]);
    assert!(h.pool.running_on(&unknown).is_empty());
    assert_eq!(h.pool.creates().len(), 2);
    assert_eq!(
        h.status_of(&uuid(2)),
        "Waiting for a type2 instance to boot and be ready to accept work."
    );
}

#[test]
fn ac_sch_10_pack_containers_resources() {
    let mut h = Harness::new(&[1, 2, 4, 8, 16], |_| {});
    h.add(1, ContainerState::Locked, 1, 1, 5 * GIB, |_| {});
    h.add(2, ContainerState::Locked, 2, 5, GIB, |_| {});
    h.add(3, ContainerState::Locked, 3, 1, GIB, |c| {
        c.runtime_constraints.keep_cache_disk = 5 * GIB
    });
    h.add(4, ContainerState::Locked, 4, 9, GIB, |_| {});
    for p in 5..=8 {
        h.add(p, ContainerState::Locked, p as i64, 0, 128 * MIB, |c| {
            c.runtime_constraints.keep_cache_disk = 128 * MIB
        });
    }
    for p in 1..=3 {
        assert_eq!(h.queue[&uuid(p)].instance_types[0].name, "type8");
    }
    assert_eq!(h.queue[&uuid(4)].instance_types[0].name, "type16");
    assert_eq!(h.queue[&uuid(5)].instance_types[0].name, "type1");
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type1", "type16", "type8"]));
    assert!(h.pool.starts().is_empty());
    let ids = h.pool.worker_ids();
    for id in &ids {
        h.pool.set_state(id, WorkerState::Idle);
    }
    h.run_queue();
    assert_eq!(
        h.pool.running_on(&ids[0]),
        vec![uuid(8), uuid(7), uuid(6), uuid(5)]
    );
    assert_eq!(h.pool.running_on(&ids[1]), vec![uuid(4)]);
    assert_eq!(h.pool.running_on(&ids[2]), vec![uuid(3), uuid(2), uuid(1)]);
}

#[test]
fn ac_sch_11_pack_containers_0_vcpus() {
    let types: Vec<i64> = (2..=16).collect();
    let mut h = Harness::new(&types, |_| {});
    h.add(1, ContainerState::Locked, 1, 1, 128 * MIB, |_| {});
    for p in 2..=5 {
        h.add(p, ContainerState::Locked, p as i64, 0, 128 * MIB, |_| {});
    }
    h.add(6, ContainerState::Locked, 6, 2, 128 * MIB, |_| {});
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type2", "type2"]));
    let ids = h.pool.worker_ids();
    for id in &ids {
        h.pool.set_state(id, WorkerState::Idle);
    }
    h.run_queue();
    assert_eq!(h.pool.running_on(&ids[0]), vec![uuid(6)]);
    assert_eq!(
        h.pool.running_on(&ids[1]),
        vec![uuid(5), uuid(4), uuid(3), uuid(2), uuid(1)]
    );
}

#[test]
fn ac_sch_12_shutdown_at_quota() {
    for quota in 1..=3 {
        let mut h = Harness::new(&all_types(), |_| {});
        h.pool = StubPool::new(quota, 3);
        h.add(2, ContainerState::Locked, 2, 2, 2 * GIB, |_| {});
        h.add(3, ContainerState::Locked, 3, 3, 3 * GIB, |_| {});
        h.worker(2, WorkerState::Idle);
        h.worker(2, WorkerState::Idle);
        h.sync();
        let plan = h.run_queue();
        h.sync();
        if quota < 3 {
            assert_eq!(plan.not_allocated_over_quota, 2, "quota {quota}");
            assert!(h.pool.starts().is_empty());
            assert_eq!(h.pool.shutdowns().len(), 2);
            assert_eq!(h.pool.creates().len(), 2);
            assert_eq!(
                h.changes,
                vec![(uuid(2), ContainerState::Locked, ContainerState::Queued)]
            );
            assert_eq!(
                h.status_of(&uuid(3)),
                "Waiting in queue at position 1.  Cluster is at cloud account limits and cannot start any new instances right now."
            );
        } else {
            assert_eq!(h.pool.starts(), vec![uuid(2)]);
            assert!(h.pool.shutdowns().is_empty());
            assert_eq!(h.pool.creates(), names(&["type2", "type2", "type3"]));
            assert!(h.changes.is_empty());
        }
    }
}

#[test]
fn ac_sch_13_instance_capacity() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(99, 2);
    h.pool
        .with(|s| s.capacity.insert("providertype4".into(), 1));
    h.add(1, ContainerState::Locked, 1, 1, GIB, |_| {});
    h.add(2, ContainerState::Queued, 2, 4, 4 * GIB, |_| {});
    h.add(3, ContainerState::Locked, 3, 4, 4 * GIB, |_| {});
    h.add(4, ContainerState::Locked, 4, 4, 4 * GIB, |_| {});
    h.worker(4, WorkerState::Idle);
    h.run_queue();
    assert_eq!(h.pool.starts(), vec![uuid(4)]);
    assert_eq!(h.pool.creates(), names(&["type4", "type1"]));
    assert!(h.pool.shutdowns().is_empty());
    assert!(h.changes.is_empty(), "c2 is not locked: {:?}", h.changes);
    assert_eq!(
        h.status_of(&uuid(3)),
        "Waiting in queue at position 1.  Cluster is at capacity for all eligible instance types (type4) and cannot start a new instance right now."
    );
}

/// Issue 19, spot → on-demand fallback (`SpotFallback`): a container that asked for spot,
/// with its spot type short, falls back to the on-demand variant once it has waited
/// `After`, within the price factor; it keeps the on-demand type while its instance boots
/// (no second create); off (the default), it waits as in Arvados.
#[test]
fn spot_fallback_runs_a_spot_container_on_demand_after_the_wait() {
    let spot_types = |c: &mut Cluster| {
        let spot = InstanceType {
            name: "type2.spot".into(),
            preemptible: true,
            price: type_n(2).price * 0.4,
            ..type_n(2)
        };
        c.instance_types.insert(spot.name.clone(), spot);
    };
    let run = |after: u64, factor: f64| {
        let mut h = Harness::new(&[2], spot_types);
        h.cfg.spot_fallback = crate::settings::SpotFallbackSettings {
            after: std::time::Duration::from_secs(after),
            price_factor: factor,
        };
        h.pool
            .with(|s| s.capacity.insert("providertype2-preemptible".into(), 0));
        let u = h.add(1, ContainerState::Queued, 1, 2, 2 * GIB, |c| {
            c.scheduling_parameters.preemptible = true;
        });
        assert_eq!(
            h.queue[&u]
                .instance_types
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["type2.spot"],
            "spot containers get spot types only"
        );
        let first = h.run_queue();
        let second = h.run_queue();
        // Spot capacity comes back while the on-demand instance boots.
        h.pool.with(|s| s.capacity.clear());
        let third = h.run_queue();
        (h, first, second, third)
    };
    let nothing = |p: &QueuePlan| p.creates.is_empty() && p.locks.is_empty();
    // Off (Arvados): it waits for spot.
    let (h, first, second, _) = run(0, 3.0);
    assert!(nothing(&first) && nothing(&second) && first.spot_fallbacks.is_empty());
    assert!(h.limits.fallen_back.is_empty());
    // Not waited long enough yet (queued 2026-01-01, `After` a century).
    let (_, first, second, _) = run(100 * 365 * 24 * 3600, 3.0);
    assert!(nothing(&first) && nothing(&second));
    // On demand costs 2.5× spot: over a price factor of 2.
    let (_, first, second, _) = run(60, 2.0);
    assert!(nothing(&first) && nothing(&second));
    // No factor: the band the container accepted (here MaximumPriceFactor 1), at on-demand
    // prices, holds the cheapest variant.
    let (h, ..) = run(60, 0.0);
    assert_eq!(h.pool.creates(), names(&["type2"]));
    // Waited, within the factor: locked, then one on-demand instance, kept while it boots
    // even once spot is back (no spot instance made beside it).
    let (h, first, second, third) = run(60, 3.0);
    assert_eq!(first.spot_fallbacks, vec![uuid(1)]);
    assert_eq!(first.locks, vec![uuid(1)]);
    assert_eq!(second.creates.len(), 1, "{:?}", second.creates);
    assert!(second.spot_fallbacks.is_empty(), "counted once");
    assert!(
        third.creates.is_empty(),
        "a second instance: {:?}",
        third.creates
    );
    assert_eq!(h.pool.creates(), names(&["type2"]));
    assert!(
        h.limits
            .fallen_back
            .contains(&crate::queue::uuid_hash(&uuid(1)))
    );
}

#[test]
fn ac_sch_14_idle_in_503_quiet_period() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(16, 4);
    h.limits.last_503 = Some(SystemTime::now());
    h.limits.max_containers = 3;
    let c1 = h.add(1, ContainerState::Running, 1, 2, 2 * GIB, |_| {});
    let c3 = h.add(3, ContainerState::Running, 3, 3, 3 * GIB, |_| {});
    // c2 outranks c4, so c2 takes the third (last) slot.
    h.add(2, ContainerState::Locked, 4, 2, 2 * GIB, |_| {});
    h.add(4, ContainerState::Locked, 2, 3, 3 * GIB, |_| {});
    h.add(5, ContainerState::Queued, 1, 1, GIB, |_| {});
    let a2 = h.worker(2, WorkerState::Idle);
    h.worker(2, WorkerState::Idle);
    let a3 = h.worker(3, WorkerState::Idle);
    h.worker(3, WorkerState::Idle);
    let c = h.queue[&c1].container().clone();
    assert!(h.pool.start_container(&a2, &c));
    let c = h.queue[&c3].container().clone();
    assert!(h.pool.start_container(&a3, &c));
    let plan = h.run_queue();
    assert_eq!(plan.max_containers, 3);
    assert_eq!(h.pool.starts(), vec![uuid(1), uuid(3), uuid(2)]);
    assert!(h.pool.shutdowns().is_empty());
    assert_eq!(h.pool.creates().len(), 4);
    assert!(h.changes.is_empty());
}

#[test]
fn ac_sch_15_unlock_excess_supervisors() {
    let mut h = Harness::new(&all_types(), |_| {});
    for k in 1..=6usize {
        h.add(k, ContainerState::Locked, 1000 - k as i64, 2, GIB, |c| {
            c.scheduling_parameters.supervisor = true
        });
    }
    let vms: Vec<String> = (0..6).map(|_| h.worker(2, WorkerState::Idle)).collect();
    for k in 1..=4 {
        let c = h.queue[&uuid(k)].container().clone();
        assert!(h.pool.start_container(&vms[k - 1], &c));
    }
    let plan = h.run_queue();
    assert_eq!(h.pool.starts(), vec![uuid(1), uuid(2), uuid(3), uuid(4)]);
    assert!(h.pool.shutdowns().is_empty());
    assert_eq!(h.pool.creates().len(), 6);
    assert_eq!(
        h.changes,
        vec![
            (uuid(5), ContainerState::Locked, ContainerState::Queued),
            (uuid(6), ContainerState::Locked, ContainerState::Queued),
        ]
    );
    assert_eq!(plan.not_allocated_over_quota, 2);
    assert_eq!(
        h.status_of(&uuid(6)),
        "Waiting in workflow queue at position 2.  Cluster is at capacity and cannot start any new workflows right now."
    );
}

#[test]
fn ac_sch_16_excess_supervisors() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(999, 3);
    for k in 1..=8usize {
        let state = if k == 3 || k == 4 {
            ContainerState::Locked
        } else {
            ContainerState::Queued
        };
        h.add(k, state, 1000 + k as i64, 2, GIB, |c| {
            c.scheduling_parameters.supervisor = true
        });
    }
    for _ in 0..3 {
        h.worker(2, WorkerState::Idle);
    }
    h.run_queue();
    assert_eq!(h.pool.starts(), vec![uuid(4), uuid(3)]);
    assert!(h.pool.shutdowns().is_empty());
    assert_eq!(h.pool.creates().len(), 3);
    assert!(h.changes.is_empty());
}

#[test]
fn ac_sch_17_equal_priority_containers() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(2, 2);
    for k in 1..=8usize {
        h.add(k, ContainerState::Queued, 333, 3, 3 * GIB, |_| {});
    }
    h.worker(3, WorkerState::Idle);
    h.worker(3, WorkerState::Idle);
    for _ in 0..30 {
        h.run_queue();
        h.sync();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(h.pool.shutdowns().is_empty());
    assert_eq!(h.pool.starts().len(), 2);
    let mut unlocks: HashMap<String, usize> = HashMap::new();
    for (u, from, to) in &h.changes {
        if *from == ContainerState::Locked && *to == ContainerState::Queued {
            *unlocks.entry(u.clone()).or_default() += 1;
        }
    }
    assert!(unlocks.values().all(|&n| n <= 1), "{unlocks:?}");
}

#[test]
fn ac_sch_18_start_while_creating() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(999, 4);
    for (k, vcpus) in [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)] {
        h.add(k, ContainerState::Locked, k as i64, vcpus, GIB, |_| {});
    }
    let boot1 = h.worker(1, WorkerState::Booting);
    let idle1 = h.worker(1, WorkerState::Idle);
    let boot2 = h.worker(2, WorkerState::Booting);
    let idle2 = h.worker(2, WorkerState::Idle);
    let plan = h.run_queue();
    assert_eq!(h.pool.starts(), vec![uuid(6), uuid(3)]);
    assert_eq!(h.pool.running_on(&idle2), vec![uuid(6)]);
    assert_eq!(h.pool.running_on(&idle1), vec![uuid(3)]);
    assert!(h.pool.running_on(&boot1).is_empty() && h.pool.running_on(&boot2).is_empty());
    // Four setup creates; c4's and c1's creates are declined (the budget is used up).
    assert_eq!(h.pool.creates().len(), 4);
    let declined: Vec<(&str, String)> = plan
        .declined_creates
        .iter()
        .map(|(it, u)| (it.name.as_str(), u.clone()))
        .collect();
    assert_eq!(declined, vec![("type2", uuid(4)), ("type1", uuid(1))]);
    let running = h.pool.running();
    assert_eq!(running.len(), 2);
    assert!(running[&uuid(3)].is_none() && running[&uuid(6)].is_none());
    assert_eq!(
        h.status_of(&uuid(5)),
        "Waiting for a type2 instance to boot and be ready to accept work."
    );
}

#[test]
fn ac_sch_19_kill_nonexistent_container() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.add(1, ContainerState::Locked, 1, 1, GIB, |_| {});
    let vm = h.worker(2, WorkerState::Idle);
    let stray = Container {
        uuid: uuid(2),
        ..Default::default()
    };
    assert!(h.pool.start_container(&vm, &stray));
    let actions = h.sync();
    assert!(actions.contains(&SyncAction::Kill {
        uuid: uuid(2),
        reason: "not in queue".into()
    }));
    assert!(h.pool.running().is_empty());
}

#[test]
fn ac_sch_20_containers_metrics() {
    let now = Utc::now();
    let setup = |h: &mut Harness| {
        h.add(1, ContainerState::Locked, 1, 1, GIB, |c| {
            c.created_at = Some(now - Duration::seconds(10))
        });
    };
    // (a) One booting type1 VM, at quota.
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(0, 1);
    setup(&mut h);
    h.worker(1, WorkerState::Booting);
    let plan = h.run_queue();
    assert_eq!(plan.allocated_not_started, 1);
    assert_eq!(plan.not_allocated_over_quota, 0);
    let wait = super::longest_wait(&h.entries(), &h.pool.running(), now);
    assert!((wait - 10.0).abs() < 0.01, "{wait}");
    // (b) Empty pool, at quota.
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(0, 0);
    setup(&mut h);
    let plan = h.run_queue();
    assert_eq!(plan.allocated_not_started, 0);
    assert_eq!(plan.not_allocated_over_quota, 1);
    let wait = super::longest_wait(&h.entries(), &h.pool.running(), now);
    assert!((wait - 10.0).abs() < 0.01, "{wait}");
    // (c) One idle type1 VM: c1 starts, nothing waits.
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(999, 1);
    setup(&mut h);
    h.worker(1, WorkerState::Idle);
    h.run_queue();
    assert_eq!(h.pool.starts(), vec![uuid(1)]);
    assert_eq!(
        super::longest_wait(&h.entries(), &h.pool.running(), now),
        0.0
    );
}

#[test]
fn ac_sch_21_skip_supervisors() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.add(1, ContainerState::Locked, 1, 1, GIB, |_| {});
    for k in 2..=4usize {
        h.add(k, ContainerState::Locked, k as i64, 1, GIB, |c| {
            c.scheduling_parameters.supervisor = true
        });
    }
    for _ in 0..4 {
        h.worker(1, WorkerState::Idle);
    }
    for _ in 0..4 {
        h.worker(2, WorkerState::Idle);
    }
    h.run_queue();
    assert_eq!(h.pool.starts(), vec![uuid(4), uuid(3), uuid(1)]);
    assert_eq!(h.pool.creates().len(), 8);
    assert!(matches!(
        h.last_plan
            .sorted(&h.last_entries)
            .into_iter()
            .find(|(e, _)| e.container().uuid == uuid(2))
            .map(|(_, s)| s),
        Some(Status::SupervisorLimit(1))
    ));
}

#[test]
fn ac_sync_1_forget_irrelevant_containers() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.add(1, ContainerState::Queued, 0, 1, GIB, |_| {});
    h.add(2, ContainerState::Complete, 1, 1, GIB, |_| {});
    h.sync();
    assert!(h.queue.is_empty());
}

#[test]
fn ac_sync_2_cancel_orphaned_containers() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.add(1, ContainerState::Running, 0, 1, GIB, |_| {});
    let unknown = h.worker(1, WorkerState::Unknown);
    for _ in 0..10 {
        h.sync();
        assert_eq!(h.queue[&uuid(1)].container().state, ContainerState::Running);
    }
    h.pool.remove_worker(&unknown);
    for _ in 0..3 {
        h.sync();
    }
    assert!(h.queue.is_empty());
    assert_eq!(
        h.changes,
        vec![(uuid(1), ContainerState::Running, ContainerState::Cancelled)]
    );
}

/// The rest of the §7.6 table: exited processes, priority 0, stale Queued processes.
/// Issue 19: only a Running container on a worker whose `runtime_status` has a non-empty
/// `preemptionNotice` is an interruption notice.
#[test]
fn interruption_notices_are_running_containers_with_a_preemption_notice() {
    let mut h = Harness::new(&all_types(), |_| {});
    let vm = h.worker(4, WorkerState::Idle);
    let notice = |c: &mut Container| {
        c.runtime_status
            .insert("preemptionNotice".into(), "2026-12-01T05:00:00Z".into());
    };
    let start = |h: &mut Harness, k: usize, state, f: &dyn Fn(&mut Container)| {
        h.add(k, state, 1, 1, GIB, f);
        let c = h.queue[&uuid(k)].container().clone();
        assert!(h.pool.start_container(&vm, &c));
    };
    start(&mut h, 1, ContainerState::Running, &notice);
    start(&mut h, 2, ContainerState::Running, &|_| {});
    start(&mut h, 3, ContainerState::Locked, &notice);
    start(&mut h, 4, ContainerState::Running, &|c| {
        c.runtime_status
            .insert("preemptionNotice".into(), "".into());
    });
    start(&mut h, 5, ContainerState::Running, &notice);
    h.pool.exit(&uuid(5), h.threshold);
    // Running with a notice, but on no worker.
    h.add(6, ContainerState::Running, 1, 1, GIB, notice);
    assert_eq!(
        plan_interruptions(&h.entries(), &h.pool.running()),
        vec![uuid(1)]
    );
}

/// Issue 19, adaptive idle time: the types waiting containers could use are those of the
/// Queued and Locked ones with priority on no worker, up to the limit.
#[test]
fn wanted_types_are_those_of_waiting_containers_on_no_worker() {
    let mut h = Harness::new(&all_types(), |c| c.containers.maximum_price_factor = 1.2);
    let vm = h.worker(16, WorkerState::Idle);
    h.add(1, ContainerState::Queued, 1, 4, 4 * GIB, |_| {});
    h.add(2, ContainerState::Locked, 1, 8, 8 * GIB, |_| {});
    h.add(3, ContainerState::Queued, 0, 2, 2 * GIB, |_| {});
    h.add(4, ContainerState::Running, 1, 3, 3 * GIB, |_| {});
    h.add(5, ContainerState::Locked, 1, 1, GIB, |_| {});
    let c = h.queue[&uuid(5)].container().clone();
    assert!(h.pool.start_container(&vm, &c));
    let mut got: Vec<String> = wanted_types(&h.entries(), &h.pool.running(), 100)
        .into_iter()
        .collect();
    got.sort();
    // Every eligible type: type9 is within 1.2 times type8's price, type5 not of type4's.
    assert_eq!(got, names(&["type4", "type8", "type9"]));
    assert_eq!(wanted_types(&h.entries(), &h.pool.running(), 1).len(), 1);
}

#[test]
fn sync_table_rows() {
    let mut h = Harness::new(&all_types(), |_| {});
    let exited_long_ago = h.threshold - Duration::seconds(5);
    let exited_after_poll = h.threshold + Duration::seconds(5);
    let vm = h.worker(4, WorkerState::Idle);
    let start = |h: &mut Harness, k: usize, state, prio| {
        h.add(k, state, prio, 1, GIB, |_| {});
        let c = h.queue[&uuid(k)].container().clone();
        assert!(h.pool.start_container(&vm, &c));
    };
    start(&mut h, 1, ContainerState::Running, 1);
    start(&mut h, 2, ContainerState::Running, 1);
    start(&mut h, 3, ContainerState::Running, 0);
    start(&mut h, 4, ContainerState::Locked, 1);
    start(&mut h, 5, ContainerState::Locked, 0);
    start(&mut h, 6, ContainerState::Queued, 1);
    start(&mut h, 7, ContainerState::Complete, 1);
    h.add(8, ContainerState::Locked, 0, 1, GIB, |_| {});
    h.pool.exit(&uuid(1), exited_long_ago);
    h.pool.exit(&uuid(2), exited_after_poll);
    h.pool.exit(&uuid(4), exited_long_ago);
    let entries = h.entries();
    let actions = plan_sync(&entries, &h.pool.running(), Some(h.threshold), false);
    let expect = vec![
        SyncAction::Cancel {
            uuid: uuid(1),
            reason: "state=Running after crunch-run exited",
        },
        SyncAction::Kill {
            uuid: uuid(3),
            reason: "priority=0".into(),
        },
        SyncAction::Requeue {
            uuid: uuid(4),
            reason: "crunch-run exited",
        },
        SyncAction::Kill {
            uuid: uuid(5),
            reason: "priority=0".into(),
        },
        SyncAction::Kill {
            uuid: uuid(6),
            reason: "pool says running, but queue says state=Queued".into(),
        },
        SyncAction::Kill {
            uuid: uuid(7),
            reason: "state=Complete".into(),
        },
        SyncAction::Requeue {
            uuid: uuid(8),
            reason: "priority=0",
        },
    ];
    assert_eq!(actions, expect);
}

#[test]
fn dynamic_limit_drops_after_503_and_grows_after_quiet_period() {
    let mut h = Harness::new(&all_types(), |_| {});
    h.pool = StubPool::new(999, 999);
    for k in 1..=6usize {
        h.add(k, ContainerState::Locked, k as i64, 1, GIB, |_| {});
    }
    for _ in 0..6 {
        h.worker(1, WorkerState::Idle);
    }
    let plan = h.run_queue();
    assert_eq!(plan.max_containers, 10);
    assert_eq!(h.pool.running().len(), 6);
    // A 503: the limit drops to running − 1.
    let t503 = SystemTime::now();
    let plan = h.run_queue_with_503(Some(t503));
    assert_eq!(plan.max_containers, 5);
    // Same 503 again, still inside the quiet minute: no change.
    let plan = h.run_queue_with_503(Some(t503));
    assert_eq!(plan.max_containers, 5);
    // After the quiet minute, it grows to running × 1.1 + 1.
    h.limits.last_503 = Some(t503 - std::time::Duration::from_secs(61));
    let plan = h.run_queue_with_503(h.limits.last_503);
    assert_eq!(plan.max_containers, 7);
}

fn count_by<T: AsRef<str>>(v: impl Iterator<Item = T>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for x in v {
        *m.entry(x.as_ref().to_string()).or_default() += 1;
    }
    m
}

/// The scenario file's expected decisions, scaled by `k` (1 for 1 000 / 100).
fn check_scale(n: usize, m: usize, variant: Variant) {
    let k = m / 100;
    let mut s = scale::build(n, m, variant);
    let plan = plan_queue(
        &s.cfg,
        &mut s.limits,
        &s.entries,
        &s.pool,
        None,
        SystemTime::now(),
    );
    // Decisions go to the highest priorities, in priority order.
    let top: Vec<String> = {
        let mut pending: Vec<&Arc<QueueEnt>> = s.entries[..n].iter().collect();
        pending.sort_by_key(|e| -e.container().priority);
        pending
            .iter()
            .take(150 * k)
            .map(|e| e.container().uuid.clone())
            .collect()
    };
    match variant {
        Variant::Queued => {
            assert_eq!(plan.locks, top, "locks");
            assert!(plan.starts.is_empty() && plan.creates.is_empty());
        }
        Variant::Locked => {
            assert!(plan.locks.is_empty());
            let type_of: HashMap<&str, &str> = s
                .pool
                .instances
                .iter()
                .map(|v| (v.instance.as_str(), v.arvados_instance_type.as_str()))
                .collect();
            let starts = count_by(plan.starts.iter().map(|(id, _)| type_of[id.as_str()]));
            // c2 10, m2 10, each other used type 5.
            for (t, c) in &starts {
                let want = if t == "c2" || t == "m2" {
                    10 * k
                } else {
                    5 * k
                };
                assert_eq!(*c, want, "starts on {t}: {starts:?}");
            }
            assert_eq!(plan.starts.len(), 55 * k, "{starts:?}");
            let creates = count_by(plan.creates.iter().map(|(it, _)| it.name.clone()));
            let mut want_creates = BTreeMap::new();
            for (t, c) in [
                ("c2", 25),
                ("c16", 5),
                ("c4", 10),
                ("c8", 10),
                ("m2", 10),
                ("m4", 10),
                ("m8", 10),
                ("m32", 10),
            ] {
                want_creates.insert(t.to_string(), c * k);
            }
            assert_eq!(creates, want_creates, "creates per type");
            let started: Vec<&str> = plan
                .starts
                .iter()
                .map(|(_, e)| e.container().uuid.as_str())
                .collect();
            let prio: HashMap<&str, i64> = s.entries[..n]
                .iter()
                .map(|e| (e.container().uuid.as_str(), e.container().priority))
                .collect();
            let mut by_prio = started.clone();
            by_prio.sort_by_key(|u| -prio[u]);
            assert_eq!(started, by_prio, "starts in priority order");
            // Decided: started, creating, or packed onto a new instance.
            let waiting = plan.allocated_not_started;
            assert_eq!(waiting, 95 * k, "90 creates + 5 packed per 100 instances");
            assert_eq!(plan.starts.len() + waiting, 150 * k);
            // The 5 packed ones wait for new c2 instances: 25 created + 5 = 30 per 100.
            let waiting_c2 = plan
                .sorted(&s.entries)
                .into_iter()
                .filter(|(_, st)| matches!(st, Status::NewInstance(t) if &**t == "c2"))
                .count();
            assert_eq!(waiting_c2, 30 * k);
            let decided: std::collections::HashSet<String> = plan
                .sorted(&s.entries)
                .into_iter()
                .filter(|(_, st)| matches!(st, Status::Preparing | Status::NewInstance(_)))
                .filter(|(e, _)| e.container().state == ContainerState::Locked)
                .map(|(e, _)| e.container().uuid.clone())
                .collect();
            assert_eq!(
                decided,
                top.iter().cloned().collect(),
                "the top 1.5 × M decided"
            );
        }
    }
}

#[test]
fn scale_scenario_queued_1k() {
    check_scale(1_000, 100, Variant::Queued);
}

#[test]
fn scale_scenario_locked_1k() {
    check_scale(1_000, 100, Variant::Locked);
}

#[test]
fn scale_scenario_queued_10k() {
    check_scale(10_000, 1_000, Variant::Queued);
}

#[test]
fn scale_scenario_locked_10k() {
    check_scale(10_000, 1_000, Variant::Locked);
}

use super::choices::Choices as Rng;

fn decisions(plan: &QueuePlan, entries: &[Arc<QueueEnt>]) -> reference::Decisions {
    reference::Decisions {
        locks: plan.locks.clone(),
        creates: plan
            .creates
            .iter()
            .map(|(it, u)| (it.name.clone(), u.clone()))
            .collect(),
        declined: plan
            .declined_creates
            .iter()
            .map(|(it, u)| (it.name.clone(), u.clone()))
            .collect(),
        starts: plan
            .starts
            .iter()
            .map(|(id, e)| (id.clone(), e.container().uuid.clone()))
            .collect(),
        unlocks: plan.unlocks.clone(),
        shutdowns: plan.shutdowns.clone(),
        allocated_not_started: plan.allocated_not_started,
        over_quota: plan.not_allocated_over_quota,
        max_containers: plan.max_containers,
        statuses: plan
            .sorted(entries)
            .into_iter()
            .map(|(e, s)| (e.container().uuid.clone(), s.to_string()))
            .collect(),
    }
}

/// A random cluster, queue and pool (small numbers, so ties and limits are common).
fn random_case(rng: &mut Rng) -> (SchedConfig, Limits, Vec<Arc<QueueEnt>>, PoolSnapshot) {
    let ntypes = 1 + rng.below(6) as usize;
    let mut types = Vec::new();
    for t in 0..ntypes {
        let vcpus = [1, 2, 2, 4, 8][rng.below(5) as usize];
        types.push(InstanceType {
            name: format!("t{t}"),
            provider_type: format!("p{}", rng.below(3)),
            vcpus,
            ram: vcpus * GIB * [1, 2, 4][rng.below(3) as usize],
            scratch: [10, 20][rng.below(2) as usize] * GIB,
            price: [0.1, 0.2, 0.2, 0.3, 0.5][rng.below(5) as usize] * vcpus as f64,
            ..Default::default()
        });
    }
    let mut cluster = Cluster {
        instance_types: types.iter().map(|t| (t.name.clone(), t.clone())).collect(),
        ..Cluster::default()
    };
    let c = &mut cluster.containers;
    c.reserve_extra_ram = 0;
    c.local_keep_blob_buffers_per_vcpu = 0;
    c.maximum_price_factor = [1.0, 1.5, 3.0][rng.below(3) as usize];
    c.cloud_vms.max_instances = rng.below(25) as i64;
    c.cloud_vms.supervisor_fraction = [0.0, 0.2, 0.5][rng.below(3) as usize];
    c.cloud_vms.max_running_containers_per_instance = [0, 0, 1, 2][rng.below(4) as usize];
    let cfg = SchedConfig::from_cluster(&cluster);
    let chooser = TypeChooser::new(&cluster);
    let mut limits = Limits::new(&cfg);
    if rng.chance(20) {
        limits.max_containers = rng.below(8) as usize;
    }

    // Sometimes more containers than the pass sorts (past the limit), to exercise the tail.
    let nctr = if rng.chance(30) { 200 } else { 60 };
    let nctr = rng.below(nctr) as usize;
    let mut entries = Vec::new();
    for n in 0..nctr {
        let mut ctr = Container {
            uuid: uuid(n),
            state: [
                ContainerState::Queued,
                ContainerState::Queued,
                ContainerState::Locked,
                ContainerState::Locked,
                ContainerState::Running,
                ContainerState::Complete,
            ][rng.below(6) as usize],
            priority: if rng.chance(3) {
                (1 << 62) + rng.below(5) as i64
            } else {
                rng.below(6) as i64
            },
            ..Default::default()
        };
        ctr.runtime_constraints.vcpus = rng.below(5) as i64;
        ctr.runtime_constraints.ram = (1 + rng.below(8) as i64) * GIB / 2;
        ctr.scheduling_parameters.supervisor = rng.chance(15);
        let need = chooser.resources_needed(&ctr);
        let Ok(types) = chooser.choose_for(&ctr, &need) else {
            continue;
        };
        let seen = t0() + Duration::seconds(rng.below(10) as i64);
        entries.push(Arc::new(QueueEnt::new(ctr, need, types, seen)));
    }

    let mut pool = PoolSnapshot::default();
    let ninst = rng.below(30) as usize;
    for j in 0..ninst {
        let it = if rng.chance(5) {
            InstanceType {
                name: "unconfigured".into(),
                ..Default::default()
            }
        } else {
            types[rng.below(ntypes as u64) as usize].clone()
        };
        let state = [
            WorkerState::Unknown,
            WorkerState::Booting,
            WorkerState::Idle,
            WorkerState::Idle,
            WorkerState::Running,
            WorkerState::Shutdown,
        ][rng.below(6) as usize];
        let id = if rng.chance(10) {
            String::new()
        } else {
            // Unique, in an order unrelated to j.
            format!("i-{:03}", (j * 37 + rng.below(2) as usize * 500) % 1000)
        };
        let mut v = crate::worker_state::InstanceView::new(&id, &it, state);
        v.idle_behavior = [
            IdleBehavior::Run,
            IdleBehavior::Run,
            IdleBehavior::Run,
            IdleBehavior::Hold,
            IdleBehavior::Drain,
        ][rng.below(5) as usize];
        for _ in 0..rng.below(3) {
            let u = if rng.chance(80) && !entries.is_empty() {
                entries[rng.below(entries.len() as u64) as usize]
                    .container()
                    .uuid
                    .clone()
            } else {
                format!("stray-{j}")
            };
            v.running_container_uuids.push(u.clone());
            pool.running.insert(u, None);
        }
        pool.instances.push(v);
    }
    for _ in 0..rng.below(4) {
        if !entries.is_empty() {
            let u = entries[rng.below(entries.len() as u64) as usize]
                .container()
                .uuid
                .clone();
            pool.running.insert(u, Some(t0()));
        }
    }
    pool.total_instances = ninst + rng.below(3) as usize;
    pool.at_quota = rng.chance(15);
    pool.quota_headroom = if rng.chance(50) {
        Some(rng.below(6) as usize)
    } else {
        None
    };
    pool.create_budget = if rng.chance(50) {
        Some(rng.below(6) as usize)
    } else {
        None
    };
    for t in &types {
        if rng.chance(15) {
            pool.at_capacity.insert(t.name.clone());
        }
    }
    (cfg, limits, entries, pool)
}

/// The fast pass against the literal transcription of Go's `runQueue` (`reference.rs`), on
/// 3 000 random queues and pools: the same locks, creates, starts, unlocks, shutdowns,
/// counters and statuses, in the same order.
#[test]
fn same_decisions_as_literal_run_queue() {
    let now = SystemTime::now();
    let mut with_tail = 0;
    let mut case_no = 0;
    super::choices::check(3000, 4000, |rng| {
        case_no += 1;
        let (cfg, limits, entries, pool) = random_case(rng);
        let mut fast_limits = limits.clone();
        let fast = plan_queue(&cfg, &mut fast_limits, &entries, &pool, None, now);
        let mut ref_limits = limits.clone();
        let want = reference::run_queue(&cfg, &mut ref_limits, &entries, &pool, None, now);
        let got = decisions(&fast, &entries);
        assert_eq!(got, want, "case {case_no}");
        if fast.queue.statuses.len() < entries.len() {
            with_tail += 1;
        }
        assert_eq!(fast_limits, ref_limits, "case {case_no}");
    });
    assert!(
        with_tail > 300,
        "only {with_tail} cases left an unsorted tail"
    );
}

/// The scale scenario's tail is left unsorted by the pass; finishing it lazily gives the same
/// statuses as the literal transcription, which sorts and labels everything.
#[test]
fn lazy_tail_statuses_match_literal_run_queue() {
    for variant in [Variant::Queued, Variant::Locked] {
        let mut s = scale::build(2_000, 100, variant);
        let now = SystemTime::now();
        let mut l1 = s.limits.clone();
        let fast = plan_queue(&s.cfg, &mut l1, &s.entries, &s.pool, None, now);
        assert!(
            fast.queue.statuses.len() < s.entries.len(),
            "the pass left a tail"
        );
        let want = reference::run_queue(&s.cfg, &mut s.limits, &s.entries, &s.pool, None, now);
        assert_eq!(decisions(&fast, &s.entries), want);
    }
}

// Spend caps (not in Arvados; the settings file's `SpendCaps`).

fn spend_cap_text(qpos: usize, ty: &str) -> String {
    format!(
        "Waiting in queue at position {qpos}.  A new {ty} instance would exceed the configured spend cap (SpendCaps in the dispatcher's settings file)."
    )
}

#[test]
fn spend_cap_per_hour_creates_only_what_fits_and_says_why() {
    let mut h = Harness::new(&[1, 2, 4], |_| {});
    h.cfg.spend_caps.max_cost_per_hour = 0.5;
    for n in 1..=6 {
        h.add(n, ContainerState::Locked, 10 - n as i64, 1, GIB, |_| {});
    }
    let plan = h.run_queue();
    // type1 costs 0.123: four fit under 0.5, the fifth would make 0.615.
    assert_eq!(plan.spend_headroom, Some(0.5));
    assert_eq!(h.pool.creates(), names(&["type1"; 4]));
    assert_eq!(h.status_of(&uuid(5)), spend_cap_text(1, "type1"));
    assert_eq!(h.status_of(&uuid(6)), spend_cap_text(2, "type1"));
    assert_eq!(
        h.status_of(&uuid(1)),
        "Waiting for a type1 instance to boot and be ready to accept work."
    );
    // The pending creates count against the cap in the next pass: nothing more is created.
    let plan = h.run_queue();
    assert!((plan.spend_headroom.unwrap() - (0.5 - 4.0 * 0.123)).abs() < 1e-9);
    assert_eq!(h.pool.creates().len(), 4);
    assert_eq!(h.status_of(&uuid(5)), spend_cap_text(1, "type1"));
    // A raised cap lets the rest start.
    h.cfg.spend_caps.max_cost_per_hour = 1.0;
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type1"; 6]));
}

#[test]
fn spend_cap_leaves_queued_containers_unlocked_and_still_uses_idle_instances() {
    let mut h = Harness::new(&[1, 2], |_| {});
    h.cfg.spend_caps.max_cost_per_hour = 0.2;
    // An idle type1 (0.123/h) already uses most of the cap.
    h.worker(1, WorkerState::Idle);
    for n in 1..=3 {
        h.add(n, ContainerState::Queued, 10 - n as i64, 1, GIB, |_| {});
    }
    h.run_queue();
    // The first fits the idle instance, so it is locked; the others would need a new instance
    // the cap does not allow, so they are not locked (locking would only hold them).
    assert_eq!(h.queue[&uuid(1)].container().state, ContainerState::Locked);
    assert_eq!(h.queue[&uuid(2)].container().state, ContainerState::Queued);
    assert_eq!(h.queue[&uuid(3)].container().state, ContainerState::Queued);
    assert_eq!(h.status_of(&uuid(2)), spend_cap_text(1, "type1"));
    h.run_queue();
    assert_eq!(h.pool.starts(), vec![uuid(1)]);
    assert_eq!(h.pool.creates().len(), 1, "only the setup create");
}

#[test]
fn spend_cap_per_day_counts_todays_spend_plus_an_hour_of_the_fleet() {
    let mut h = Harness::new(&[1, 2], |_| {});
    h.cfg.spend_caps.max_cost_per_day = 10.0;
    h.spent_today = 9.7;
    for n in 1..=4 {
        h.add(n, ContainerState::Locked, 10 - n as i64, 1, GIB, |_| {});
    }
    // 0.3 left today: two type1 instances (0.246 for the next hour) fit, a third does not.
    h.run_queue();
    assert_eq!(h.pool.creates(), names(&["type1", "type1"]));
    assert_eq!(h.status_of(&uuid(3)), spend_cap_text(1, "type1"));
    // Past the cap already: nothing at all.
    let mut h2 = Harness::new(&[1], |_| {});
    h2.cfg.spend_caps.max_cost_per_day = 10.0;
    h2.spent_today = 10.5;
    h2.add(1, ContainerState::Locked, 1, 1, GIB, |_| {});
    let plan = h2.run_queue();
    assert_eq!(plan.spend_headroom, Some(0.0));
    assert!(h2.pool.creates().is_empty());
}

#[test]
fn without_spend_caps_nothing_changes() {
    let mut h = Harness::new(&[1, 2], |_| {});
    h.spent_today = 1e9;
    for n in 1..=6 {
        h.add(n, ContainerState::Locked, 10 - n as i64, 1, GIB, |_| {});
    }
    let plan = h.run_queue();
    assert_eq!(plan.spend_headroom, None);
    assert_eq!(h.pool.creates(), names(&["type1"; 6]));
}

#[test]
fn passes_are_spaced_by_the_gap_or_twice_their_own_length() {
    use super::{MIN_PASS_GAP, next_pass_at};
    let t = tokio::time::Instant::now();
    assert_eq!(
        next_pass_at(t, Duration::milliseconds(1).to_std().unwrap()),
        t + MIN_PASS_GAP
    );
    let long = std::time::Duration::from_millis(40);
    assert_eq!(next_pass_at(t, long), t + 2 * long);
}

// Room for more queued containers (incremental polling's reach past the top 100).

#[test]
fn room_counts_empty_idle_and_booting_instances_and_quota_headroom() {
    let it = type_n(1);
    let view = |id: &str, state: WorkerState, running: &[&str], behavior: IdleBehavior| {
        let mut v = InstanceView::new(id, &it, state);
        v.running_container_uuids = running.iter().map(|s| s.to_string()).collect();
        v.idle_behavior = behavior;
        v
    };
    let mut snapshot = PoolSnapshot {
        instances: vec![
            view("i1", WorkerState::Idle, &[], IdleBehavior::Run),
            view("i2", WorkerState::Booting, &[], IdleBehavior::Run),
            view("i3", WorkerState::Idle, &[], IdleBehavior::Run),
            // Not room: busy, held, draining, shutting down.
            view("i4", WorkerState::Running, &["c"], IdleBehavior::Run),
            view("i5", WorkerState::Idle, &[], IdleBehavior::Hold),
            view("i6", WorkerState::Idle, &[], IdleBehavior::Drain),
            view("i7", WorkerState::Shutdown, &[], IdleBehavior::Run),
        ],
        quota_headroom: Some(10),
        ..Default::default()
    };
    let mut plan = QueuePlan {
        locks: vec![uuid(1), uuid(2)],
        ..Default::default()
    };
    // Three empty instances and ten more allowed, less two locks.
    assert_eq!(super::room_after_pass(&snapshot, &plan, 2), 11);
    // A queued container the pass could not lock: fetching more would not help.
    assert_eq!(super::room_after_pass(&snapshot, &plan, 3), 0);
    // At quota, only the empty instances count; with no quota limit, 1 000 at most.
    snapshot.at_quota = true;
    assert_eq!(super::room_after_pass(&snapshot, &plan, 2), 1);
    snapshot.at_quota = false;
    snapshot.quota_headroom = None;
    assert_eq!(super::room_after_pass(&snapshot, &plan, 2), 1000);
    plan.locks.clear();
    snapshot.quota_headroom = Some(0);
    assert_eq!(super::room_after_pass(&snapshot, &plan, 0), 3);
    // Two locked containers wait for the booting instance and a create: one empty left.
    plan.allocated_not_started = 2;
    assert_eq!(super::room_after_pass(&snapshot, &plan, 0), 1);
}

// Shutdowns at quota with `Scheduler.ShutdownAtQuota: Needed` (spec §13.1 item 7).

fn needed_harness(quota: usize) -> Harness {
    let mut h = Harness::new(&all_types(), |_| {});
    h.cfg.shutdown_at_quota = crate::settings::ShutdownAtQuota::Needed;
    h.pool = StubPool::new(quota, quota + 1);
    h
}

/// AC-SCH-12's fleet with the `Needed` rule: c3 needs a new type3 and the fleet is at quota;
/// c2 fits one of the two idle type2 VMs, so only the other is shut down (Arvados shuts down
/// both). Everything else is Arvados' decision.
#[test]
fn needed_at_quota_shuts_down_only_what_the_head_needs_and_keeps_what_others_fit() {
    let mut h = needed_harness(2);
    h.add(2, ContainerState::Locked, 2, 2, 2 * GIB, |_| {});
    h.add(3, ContainerState::Locked, 3, 3, 3 * GIB, |_| {});
    let a = h.worker(2, WorkerState::Idle);
    let b = h.worker(2, WorkerState::Idle);
    h.sync();
    let plan = h.run_queue();
    assert_eq!(plan.not_allocated_over_quota, 2);
    assert!(h.pool.starts().is_empty());
    assert_eq!(h.pool.shutdowns().len(), 1, "{:?}", h.pool.shutdowns());
    assert!(h.pool.shutdowns()[0] == a || h.pool.shutdowns()[0] == b);
    assert_eq!(
        h.changes,
        vec![(uuid(2), ContainerState::Locked, ContainerState::Queued)]
    );
}

/// Three containers need new type4s at quota and one fits an idle type1: of four idle type1
/// VMs (and a booting one) three idle ones are shut down. Instances already shutting down
/// count: the next pass shuts down nothing more.
#[test]
fn needed_at_quota_counts_instances_already_shutting_down() {
    let mut h = needed_harness(5);
    for n in 1..=3 {
        h.add(n, ContainerState::Queued, 10 - n as i64, 4, 4 * GIB, |_| {});
    }
    h.add(4, ContainerState::Queued, 1, 1, GIB, |_| {});
    let booting = h.worker(1, WorkerState::Booting);
    let ids: Vec<String> = (0..4).map(|_| h.worker(1, WorkerState::Idle)).collect();
    h.sync();
    h.run_queue();
    let down = h.pool.shutdowns();
    assert_eq!(down.len(), 3, "{down:?}");
    assert!(
        !down.contains(&booting),
        "idle instances go before booting ones: {down:?}"
    );
    // They are now shutting down: the next pass needs no more.
    for id in &down {
        h.pool.set_state(id, WorkerState::Shutdown);
    }
    h.pool.with(|s| s.shutdowns.clear());
    h.run_queue();
    assert!(h.pool.shutdowns().is_empty(), "{:?}", h.pool.shutdowns());
    assert_eq!(ids.len(), 4);
}

/// When every empty instance is one a lower-priority container fits, the head of the queue
/// still gets its slot: the instance matched last is shut down.
#[test]
fn needed_at_quota_still_frees_a_slot_for_the_head_when_others_fit_everything() {
    let mut h = needed_harness(2);
    h.add(1, ContainerState::Queued, 9, 4, 4 * GIB, |_| {});
    h.add(2, ContainerState::Queued, 8, 1, GIB, |_| {});
    h.add(3, ContainerState::Queued, 7, 1, GIB, |_| {});
    h.worker(1, WorkerState::Idle);
    h.worker(1, WorkerState::Idle);
    h.sync();
    h.run_queue();
    assert_eq!(h.pool.shutdowns().len(), 1, "{:?}", h.pool.shutdowns());
    assert!(h.pool.starts().is_empty(), "the head keeps its turn");
}

/// A busy instance with room for a waiting container is never shut down, even when the head
/// of the queue is short of a slot.
#[test]
fn needed_at_quota_never_shuts_down_a_busy_instance() {
    let mut h = Harness::new(&all_types(), |c| c.containers.maximum_price_factor = 2.0);
    h.cfg.shutdown_at_quota = crate::settings::ShutdownAtQuota::Needed;
    h.pool = StubPool::new(2, 3);
    // A type2 running a 1-VCPU container (one VCPU left), and one instance already going.
    let busy = h.worker(2, WorkerState::Running);
    h.add(2, ContainerState::Running, 5, 1, GIB, |_| {});
    h.pool.with(|s| {
        if let Some(x) = s.workers.iter_mut().find(|x| x.id == busy) {
            x.running.push(uuid(2));
        }
        s.running.insert(uuid(2), None);
    });
    h.worker(1, WorkerState::Shutdown);
    // Two need new type4s (one slot is being freed); one fits the busy type2.
    h.add(1, ContainerState::Queued, 9, 4, 4 * GIB, |_| {});
    h.add(3, ContainerState::Queued, 8, 1, GIB, |_| {});
    h.add(4, ContainerState::Queued, 7, 4, 4 * GIB, |_| {});
    h.sync();
    let plan = h.run_queue();
    assert_eq!(plan.not_allocated_over_quota, 3);
    assert!(h.pool.shutdowns().is_empty(), "{:?}", h.pool.shutdowns());
}
