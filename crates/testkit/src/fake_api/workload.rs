//! Container specs for tests and demos, and a deterministic generator of mixed workloads.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};

/// A container to create in the fake. Defaults: Queued, priority 1, 1 VCPU, 1 GiB RAM.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub priority: i64,
    pub vcpus: i64,
    pub ram: i64,
    pub keep_cache_ram: i64,
    /// `None` applies Rails' rule: with no cache sizes, `ram` clamped to [2 GiB, 32 GiB].
    pub keep_cache_disk: Option<i64>,
    pub preemptible: bool,
    pub supervisor: bool,
    /// Capacity of a `tmp` mount at `/tmp`, if any.
    pub tmp_capacity: Option<i64>,
    /// A portable data hash; its `+size` drives the dispatcher's image-size estimate.
    pub container_image: String,
    /// `runtime_constraints.gpu`, if any.
    pub gpu: Option<Value>,
    pub max_run_time: i64,
    /// Environment; the fake crunch-run reads its scripted run time and exit code here.
    pub environment: Vec<(String, String)>,
}

impl Default for ContainerSpec {
    fn default() -> Self {
        ContainerSpec {
            priority: 1,
            vcpus: 1,
            ram: 1 << 30,
            keep_cache_ram: 0,
            keep_cache_disk: None,
            preemptible: false,
            supervisor: false,
            tmp_capacity: None,
            container_image: "d41d8cd98f00b204e9800998ecf8427e+0".into(),
            gpu: None,
            max_run_time: 0,
            environment: Vec::new(),
        }
    }
}

impl ContainerSpec {
    /// The record fields this spec sets.
    pub fn to_fields(&self) -> Map<String, Value> {
        let keep_cache_disk = self.keep_cache_disk.unwrap_or(if self.keep_cache_ram == 0 {
            self.ram.clamp(2 << 30, 32 << 30)
        } else {
            0
        });
        let mut rc = json!({
            "ram": self.ram,
            "vcpus": self.vcpus,
            "keep_cache_ram": self.keep_cache_ram,
            "keep_cache_disk": keep_cache_disk,
        });
        if let Some(g) = &self.gpu {
            rc["gpu"] = g.clone();
        }
        let mounts = match self.tmp_capacity {
            Some(c) => json!({"/tmp": {"kind": "tmp", "capacity": c}}),
            None => json!({}),
        };
        let env: Map<String, Value> = self
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        let v = json!({
            "priority": self.priority,
            "runtime_constraints": rc,
            "scheduling_parameters": {
                "preemptible": self.preemptible,
                "supervisor": self.supervisor,
                "max_run_time": self.max_run_time,
            },
            "mounts": mounts,
            "container_image": self.container_image,
            "environment": env,
        });
        v.as_object().cloned().unwrap_or_default()
    }
}

/// `n` containers of mixed sizes, priorities and scripted run times, the same for the same
/// seed. Sizes range from 1 VCPU / 1 GiB to 16 VCPUs / 64 GiB; about one in ten is a
/// supervisor (workflow runner) and one in ten asks for a preemptible instance.
pub fn generate_workload(n: usize, seed: u64) -> Vec<ContainerSpec> {
    const SHAPES: &[(i64, i64)] = &[
        (1, 1),
        (1, 2),
        (2, 4),
        (2, 8),
        (4, 8),
        (4, 16),
        (8, 32),
        (16, 64),
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (vcpus, gib) = SHAPES[rng.random_range(0..SHAPES.len())];
            let run_ms = rng.random_range(100..5_000u64);
            let exit_code = if rng.random_ratio(1, 20) { 1 } else { 0 };
            ContainerSpec {
                priority: rng.random_range(1..=1000),
                vcpus,
                ram: gib << 30,
                supervisor: rng.random_ratio(1, 10),
                preemptible: rng.random_ratio(1, 10),
                tmp_capacity: rng
                    .random_ratio(1, 4)
                    .then(|| rng.random_range(1..=100i64) << 30),
                environment: vec![
                    ("FAKE_CRUNCH_RUN_MS".into(), run_ms.to_string()),
                    ("FAKE_CRUNCH_RUN_EXIT".into(), exit_code.to_string()),
                ],
                ..ContainerSpec::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_is_deterministic_and_mixed() {
        let a = generate_workload(200, 7);
        assert_eq!(a, generate_workload(200, 7));
        assert_ne!(a, generate_workload(200, 8));
        let distinct: std::collections::BTreeSet<_> = a.iter().map(|c| (c.vcpus, c.ram)).collect();
        assert!(distinct.len() >= 6);
        assert!(a.iter().any(|c| c.supervisor) && a.iter().any(|c| !c.supervisor));
    }

    #[test]
    fn keep_cache_default_follows_rails() {
        let f = ContainerSpec {
            ram: 1 << 30,
            ..Default::default()
        }
        .to_fields();
        assert_eq!(f["runtime_constraints"]["keep_cache_disk"], 2i64 << 30);
        let f = ContainerSpec {
            ram: 100 << 30,
            ..Default::default()
        }
        .to_fields();
        assert_eq!(f["runtime_constraints"]["keep_cache_disk"], 32i64 << 30);
        let f = ContainerSpec {
            keep_cache_disk: Some(0),
            ..Default::default()
        }
        .to_fields();
        assert_eq!(f["runtime_constraints"]["keep_cache_disk"], 0);
    }
}
