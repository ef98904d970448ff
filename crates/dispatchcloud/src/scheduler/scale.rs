//! The scheduler scale scenario (`scheduler-scale-scenario.md`): N pending containers and M
//! instances, built deterministically, for the `scale_scenario_*` tests and the
//! `scheduler_scale` benchmark. Same parameters as the run that produced the Go figures.

use std::collections::BTreeMap;
use std::sync::Arc;

use arvados::InstanceType;
use arvados::config::Cluster;
use arvados::types::{Container, ContainerState};
use chrono::{DateTime, TimeZone, Utc};

use super::plan::{Limits, PoolSnapshot, SchedConfig};
use crate::node_size::TypeChooser;
use crate::queue::QueueEnt;
use crate::worker_state::{InstanceView, WorkerState};

const GIB: i64 = 1 << 30;

/// Every pending container Queued, or every one Locked by us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Queued,
    Locked,
}

/// The ten instance types, in table order (c2…c32, m2…m32).
pub fn instance_types() -> Vec<InstanceType> {
    let mut v = Vec::new();
    for (family, gib_per_vcpu, price_per_vcpu) in [("c", 2, 0.0425), ("m", 8, 0.063)] {
        for vcpus in [2i64, 4, 8, 16, 32] {
            let name = format!("{family}{vcpus}");
            v.push(InstanceType {
                name: name.clone(),
                provider_type: name,
                vcpus,
                ram: gib_per_vcpu * GIB * vcpus,
                scratch: 25 * GIB * vcpus,
                price: price_per_vcpu * vcpus as f64,
                ..Default::default()
            });
        }
    }
    v
}

/// The scenario's cluster settings.
pub fn cluster(m: usize) -> Cluster {
    let mut c = Cluster {
        instance_types: instance_types()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect::<BTreeMap<_, _>>(),
        ..Cluster::default()
    };
    c.containers.maximum_price_factor = 1.5;
    c.containers.reserve_extra_ram = 0;
    c.containers.local_keep_blob_buffers_per_vcpu = 0;
    c.containers.cloud_vms.max_instances = 2 * m as i64;
    c.containers.cloud_vms.supervisor_fraction = 0.0;
    c.containers.cloud_vms.max_running_containers_per_instance = 0;
    c.containers.cloud_vms.initial_quota_estimate = 0;
    c
}

/// (VCPUs, RAM GiB) of pending container shape k = i mod 10.
const SHAPES: [(i64, i64); 10] = [
    (1, 1),
    (1, 3),
    (2, 2),
    (2, 12),
    (4, 6),
    (4, 24),
    (8, 12),
    (8, 48),
    (16, 30),
    (30, 200),
];

fn epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

/// One scenario instance: config, initial limits, queue entries and pool snapshot.
pub struct Scenario {
    pub cluster: Cluster,
    pub cfg: SchedConfig,
    pub limits: Limits,
    pub entries: Vec<Arc<QueueEnt>>,
    pub pool: PoolSnapshot,
    /// Pending containers.
    pub n: usize,
    /// Existing instances.
    pub m: usize,
}

/// The uuid of pending (or running, for numbers ≥ N) container `i`.
pub fn uuid(i: usize) -> String {
    format!("zzzzz-dz642-{i:015}")
}

/// Build the pending containers as the queue would hold them (needs and types computed by the
/// real [`TypeChooser`]).
pub fn pending_containers(chooser: &TypeChooser, n: usize, variant: Variant) -> Vec<Arc<QueueEnt>> {
    (0..n)
        .map(|i| {
            let (vcpus, ram_gib) = SHAPES[i % 10];
            let mut c = Container {
                uuid: uuid(i),
                state: match variant {
                    Variant::Queued => ContainerState::Queued,
                    Variant::Locked => ContainerState::Locked,
                },
                priority: 1 + ((i * 7919) % n) as i64,
                created_at: Some(epoch() + chrono::Duration::seconds(i as i64)),
                ..Default::default()
            };
            c.runtime_constraints.vcpus = vcpus;
            c.runtime_constraints.ram = ram_gib * GIB;
            entry(chooser, c)
        })
        .collect()
}

fn entry(chooser: &TypeChooser, c: Container) -> Arc<QueueEnt> {
    let need = chooser.resources_needed(&c);
    let types = chooser.choose_for(&c, &need).unwrap_or_default();
    let first_seen_at = c.created_at.unwrap_or_default();
    Arc::new(QueueEnt::new(c, need, types, first_seen_at))
}

/// Build the whole scenario.
pub fn build(n: usize, m: usize, variant: Variant) -> Scenario {
    let cluster = cluster(m);
    let chooser = TypeChooser::new(&cluster);
    let cfg = SchedConfig::from_cluster(&cluster);
    let types = instance_types();
    let mut entries = pending_containers(&chooser, n, variant);
    let mut pool = PoolSnapshot {
        total_instances: m,
        quota_headroom: Some(3 * m),
        create_budget: Some(m),
        ..Default::default()
    };
    for j in 0..m {
        let it = &types[j % 10];
        let id = format!("e-{j:07}");
        let busy = (j / 10) % 2 == 1;
        let mut view = InstanceView::new(
            &id,
            it,
            if busy {
                WorkerState::Running
            } else {
                WorkerState::Idle
            },
        );
        if busy {
            let u = uuid(n + j);
            let mut c = Container {
                uuid: u.clone(),
                state: ContainerState::Running,
                priority: 1,
                created_at: Some(epoch()),
                ..Default::default()
            };
            c.runtime_constraints.vcpus = it.vcpus / 2;
            c.runtime_constraints.ram = it.ram / 4;
            entries.push(entry(&chooser, c));
            view.running_container_uuids.push(u.clone());
            pool.running.insert(u, None);
        }
        pool.instances.push(view);
    }
    Scenario {
        limits: Limits::new(&cfg),
        cluster,
        cfg,
        entries,
        pool,
        n,
        m,
    }
}
