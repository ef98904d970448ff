//! Instance-type choice (spec §6): what a container needs, and which configured instance types
//! can run it, cheapest first. Pure functions of the cluster config and the container record;
//! no I/O. The queue calls `choose_instance_types` once per newly seen container; the scheduler
//! packs containers onto instances with `InstanceResources`.

use std::cmp::Ordering;
use std::sync::Arc;

use arvados::InstanceType;
use arvados::config::{Cluster, Containers};
use arvados::types::{Container, GpuConstraints};

const MIB: i64 = 1 << 20;

/// Percentage of advertised RAM assumed unusable (`discountConfiguredRAMPercent`).
const DISCOUNT_RAM_PERCENT: i64 = 5;

/// Resources of an instance, or needed by a container (spec §6.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceResources {
    pub vcpus: i64,
    pub ram: i64,
    pub scratch: i64,
    pub gpus: i64,
    /// Per-GPU memory.
    pub gpu_vram: i64,
    /// A 0-VCPU container has been placed: together such containers hold one VCPU.
    pub shared_vcpu_used: bool,
}

impl InstanceResources {
    /// An empty instance of this type (RAM not discounted: the container side carries the 5%).
    pub fn of_type(it: &InstanceType) -> Self {
        InstanceResources {
            vcpus: it.vcpus,
            ram: it.ram,
            scratch: it.scratch,
            gpus: it.gpu.device_count,
            gpu_vram: it.gpu.vram,
            shared_vcpu_used: false,
        }
    }

    /// Whether a container needing `need` fits in what is left.
    pub fn accommodates(&self, need: &InstanceResources) -> bool {
        self.vcpus >= 1
            && self.vcpus >= need.vcpus
            && (!self.shared_vcpu_used || self.vcpus > need.vcpus)
            && self.ram >= need.ram
            && self.scratch >= need.scratch
            && self.gpus >= need.gpus
            && self.gpu_vram >= need.gpu_vram
    }

    /// Take a placed container's needs away.
    pub fn sub(&mut self, need: &InstanceResources) {
        self.vcpus -= need.vcpus;
        self.ram -= need.ram;
        self.scratch -= need.scratch;
        self.gpus -= need.gpus;
        self.gpu_vram -= need.gpu_vram;
        if need.vcpus == 0 {
            self.shared_vcpu_used = true;
        }
    }
}

/// Docker image size estimated from the image's portable data hash: each 42 bytes of manifest
/// past the first 80 is one 64 MiB block. Not a PDH, or too short: 0.
pub fn estimate_docker_image_size(pdh: &str) -> i64 {
    let Some((hash, size)) = pdh.split_once('+') else {
        return 0;
    };
    let is_hash = hash.len() == 32
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let is_size = !size.is_empty() && size.bytes().all(|b| b.is_ascii_digit());
    if !is_hash || !is_size {
        return 0;
    }
    match size.parse::<i64>() {
        Ok(n) if n >= 122 => ((n - 80) / 42) * 64 * MIB,
        _ => 0,
    }
}

/// Scratch space: `max(tmp mounts, image) + image + keep_cache_disk`.
pub fn estimate_scratch_space(ctr: &Container) -> i64 {
    // API numbers are arbitrary i64s: add in i128 and saturate, so a huge request means "no
    // type fits" instead of wrapping around to a small (or negative) need.
    let tmp: i128 = ctr
        .mounts
        .values()
        .filter(|m| m.kind == "tmp")
        .map(|m| i128::from(m.capacity))
        .sum();
    let img = i128::from(estimate_docker_image_size(&ctr.container_image));
    saturate(tmp.max(img) + img + i128::from(ctr.runtime_constraints.keep_cache_disk))
}

/// An i128 sum clamped into i64.
fn saturate(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// What a container needs from an instance (spec §6.1).
pub fn resources_needed(cfg: &Containers, ctr: &Container) -> InstanceResources {
    let rc = &ctr.runtime_constraints;
    // In i128 with saturating products: see `estimate_scratch_space`.
    let mut ram =
        i128::from(rc.ram) + i128::from(rc.keep_cache_ram) + i128::from(cfg.reserve_extra_ram);
    if cfg.local_keep_blob_buffers_per_vcpu > 0 {
        // A dedicated keepstore process, its GC slack, and its buffers.
        ram += i128::from(220 * MIB);
        ram = ram.saturating_add(
            i128::from(cfg.local_keep_blob_buffers_per_vcpu)
                .saturating_mul(i128::from(rc.vcpus))
                .saturating_mul(i128::from(64 * MIB * 11))
                / 10,
        );
    }
    ram = ram.saturating_mul(100) / i128::from(100 - DISCOUNT_RAM_PERCENT);
    InstanceResources {
        vcpus: rc.vcpus,
        ram: saturate(ram),
        scratch: estimate_scratch_space(ctr),
        gpus: rc.gpu.device_count,
        gpu_vram: rc.gpu.vram,
        shared_vcpu_used: false,
    }
}

/// Why no instance type was chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChooseError {
    #[error("site configuration does not list any instance types")]
    NoInstanceTypes,
    /// The container cannot run on any configured type; the queue cancels it with `message`.
    #[error("{message}")]
    ConstraintsNotSatisfiable {
        message: String,
        /// Every configured type, cheapest first (empty for a bad GPU stack).
        available_types: Vec<InstanceType>,
    },
}

/// Dotted numeric version comparison: `a < b`. Components compare as integers, missing ones
/// count as 0. Better than Go (§13.2 item 14), which parses versions as floats, so that
/// `"9.10" < "9.9"` and `"12.0.12"` fails there.
pub fn version_less(a: &str, b: &str) -> Result<bool, String> {
    fn parse(v: &str) -> Result<Vec<u64>, String> {
        if v.trim().is_empty() {
            return Err("empty version".into());
        }
        v.trim()
            .split('.')
            .map(|c| {
                c.parse::<u64>()
                    .map_err(|_| format!("invalid version {v:?}"))
            })
            .collect()
    }
    let (x, y) = (parse(a)?, parse(b)?);
    let n = x.len().max(y.len());
    let get = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
    for i in 0..n {
        match get(&x, i).cmp(&get(&y, i)) {
            Ordering::Less => return Ok(true),
            Ordering::Greater => return Ok(false),
            Ordering::Equal => {}
        }
    }
    Ok(false)
}

/// The eligible instance types for a container, cheapest first (among equal prices, the
/// roomiest), keeping only those costing at most `MaximumPriceFactor` × the cheapest (spec §6.2).
/// Convenience form of [`TypeChooser::choose`] for one-off calls.
pub fn choose_instance_types(
    cluster: &Cluster,
    ctr: &Container,
) -> Result<Vec<InstanceType>, ChooseError> {
    TypeChooser::new(cluster)
        .choose(ctr)
        .map(|v| v.into_iter().map(|it| (*it).clone()).collect())
}

/// Instance-type choice prepared once per config: the types are sorted in preference order up
/// front, so choosing for one container is a filter over that list with no sorting and no
/// cloning beyond reference counts. The queue keeps one and calls it for every new container.
#[derive(Debug, Clone)]
pub struct TypeChooser {
    containers: Containers,
    /// Cheapest first; equal prices: more RAM, more VCPUs, more scratch, then name.
    preferred: Vec<Arc<InstanceType>>,
    factor: f64,
}

impl TypeChooser {
    pub fn new(cluster: &Cluster) -> Self {
        let mut preferred: Vec<Arc<InstanceType>> = cluster
            .instance_types
            .values()
            .map(|it| Arc::new(it.clone()))
            .collect();
        preferred.sort_by(|a, b| {
            a.price
                .total_cmp(&b.price)
                .then(b.ram.cmp(&a.ram))
                .then(b.vcpus.cmp(&a.vcpus))
                .then(b.scratch.cmp(&a.scratch))
                .then_with(|| a.name.cmp(&b.name))
        });
        TypeChooser {
            containers: cluster.containers.clone(),
            preferred,
            factor: cluster.containers.maximum_price_factor.max(1.0),
        }
    }

    /// What the container needs (spec §6.1) under this chooser's config.
    pub fn resources_needed(&self, ctr: &Container) -> InstanceResources {
        resources_needed(&self.containers, ctr)
    }

    /// The eligible types for `ctr`, cheapest first, within the price band.
    pub fn choose(&self, ctr: &Container) -> Result<Vec<Arc<InstanceType>>, ChooseError> {
        self.choose_for(ctr, &self.resources_needed(ctr))
    }

    /// As [`choose`](Self::choose), with the needs already computed.
    pub fn choose_for(
        &self,
        ctr: &Container,
        need: &InstanceResources,
    ) -> Result<Vec<Arc<InstanceType>>, ChooseError> {
        if self.preferred.is_empty() {
            return Err(ChooseError::NoInstanceTypes);
        }
        let gpu = &ctr.runtime_constraints.gpu;
        if let Some(why) = out_of_range(ctr, need) {
            return Err(ChooseError::ConstraintsNotSatisfiable {
                message: format!("runtime constraints out of range: {why}"),
                available_types: Vec::new(),
            });
        }
        if !matches!(gpu.stack.as_str(), "" | "cuda" | "rocm") {
            return Err(ChooseError::ConstraintsNotSatisfiable {
                message: format!(
                    "Invalid GPU stack {:?}, expected to be blank or one of 'cuda' or 'rocm'",
                    gpu.stack
                ),
                available_types: Vec::new(),
            });
        }
        let preemptible = ctr.scheduling_parameters.preemptible;
        let mut out: Vec<Arc<InstanceType>> = Vec::new();
        let mut max_price = f64::INFINITY;
        for it in &self.preferred {
            if it.price > max_price {
                break;
            }
            let fits = it.scratch >= need.scratch
                && it.ram >= need.ram
                && it.vcpus >= need.vcpus
                && it.preemptible == preemptible
                && it.gpu.stack == gpu.stack
                && it.gpu.device_count >= gpu.device_count
                && it.gpu.vram >= gpu.vram
                && gpu_ok(it, gpu);
            if fits {
                if out.is_empty() {
                    max_price = it.price * self.factor;
                }
                out.push(it.clone());
            }
        }
        if out.is_empty() {
            let mut all: Vec<InstanceType> =
                self.preferred.iter().map(|it| (**it).clone()).collect();
            all.sort_by(|a, b| {
                a.price
                    .total_cmp(&b.price)
                    .then_with(|| a.name.cmp(&b.name))
            });
            return Err(ChooseError::ConstraintsNotSatisfiable {
                message: "constraints not satisfiable by any configured instance type".into(),
                available_types: all,
            });
        }
        Ok(out)
    }
}

/// Why a container's numbers cannot describe a real need: a negative value, or a total that
/// does not fit in 64 bits.
fn out_of_range(ctr: &Container, need: &InstanceResources) -> Option<String> {
    let rc = &ctr.runtime_constraints;
    for (name, v) in [
        ("vcpus", rc.vcpus),
        ("ram", rc.ram),
        ("keep_cache_ram", rc.keep_cache_ram),
        ("keep_cache_disk", rc.keep_cache_disk),
        ("gpu.device_count", rc.gpu.device_count),
        ("gpu.vram", rc.gpu.vram),
    ] {
        if v < 0 {
            return Some(format!("{name} is negative ({v})"));
        }
    }
    if let Some(m) = ctr
        .mounts
        .values()
        .find(|m| m.kind == "tmp" && m.capacity < 0)
    {
        return Some(format!(
            "a tmp mount has a negative capacity ({})",
            m.capacity
        ));
    }
    if need.ram == i64::MAX {
        return Some("the RAM needed does not fit in 64 bits".into());
    }
    if need.scratch == i64::MAX {
        return Some("the scratch space needed does not fit in 64 bits".into());
    }
    None
}

/// GPU driver and hardware-target rules (spec §6.2) for a container that wants GPUs.
fn gpu_ok(it: &InstanceType, gpu: &GpuConstraints) -> bool {
    if gpu.device_count <= 0 {
        return true;
    }
    let driver_ok = matches!(
        version_less(&it.gpu.driver_version, &gpu.driver_version),
        Ok(false)
    );
    let targets = &gpu.hardware_target;
    let capability_ok = match gpu.stack.as_str() {
        "cuda" => match targets.len() {
            0 => false,
            1 => matches!(
                version_less(&it.gpu.hardware_target, &targets[0]),
                Ok(false)
            ),
            _ => targets.contains(&it.gpu.hardware_target),
        },
        "rocm" => targets.contains(&it.gpu.hardware_target),
        _ => true,
    };
    driver_ok && capability_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_or_negative_api_numbers_are_unsatisfiable_not_a_panic() {
        use arvados::types::Mount;
        let mut cluster = arvados::Cluster::default();
        cluster.instance_types.insert(
            "small".into(),
            InstanceType {
                name: "small".into(),
                provider_type: "small".into(),
                vcpus: 2,
                ram: 4 << 30,
                scratch: 100 << 30,
                price: 0.1,
                ..Default::default()
            },
        );
        let chooser = TypeChooser::new(&cluster);
        let reason = |ctr: &Container| match chooser.choose(ctr) {
            Err(ChooseError::ConstraintsNotSatisfiable { message, .. }) => message,
            other => panic!("expected unsatisfiable, got {other:?}"),
        };
        let mut c = Container::default();
        c.runtime_constraints.vcpus = 1;
        c.runtime_constraints.ram = 1 << 62;
        c.runtime_constraints.keep_cache_ram = 1 << 62;
        assert_eq!(
            reason(&c),
            "runtime constraints out of range: the RAM needed does not fit in 64 bits"
        );
        c.runtime_constraints.ram = i64::MAX;
        c.runtime_constraints.keep_cache_ram = 0;
        assert!(reason(&c).contains("RAM needed does not fit"));
        let mut c = Container::default();
        c.runtime_constraints.vcpus = 1;
        c.runtime_constraints.ram = -(1 << 30);
        assert_eq!(
            reason(&c),
            "runtime constraints out of range: ram is negative (-1073741824)"
        );
        let mut c = Container::default();
        c.runtime_constraints.vcpus = 1;
        c.runtime_constraints.ram = 1 << 20;
        for i in 0..3 {
            c.mounts.insert(
                format!("/tmp{i}"),
                Mount {
                    kind: "tmp".into(),
                    capacity: i64::MAX,
                    ..Default::default()
                },
            );
        }
        assert!(reason(&c).contains("scratch space needed does not fit"));
        // A buffers-per-VCPU product that overflows is saturated too.
        cluster.containers.local_keep_blob_buffers_per_vcpu = i64::MAX;
        let mut c = Container::default();
        c.runtime_constraints.vcpus = i64::MAX;
        assert!(resources_needed(&cluster.containers, &c).ram == i64::MAX);
    }
    use arvados::config::GpuFeatures;
    use arvados::types::Mount;
    use std::collections::BTreeMap;

    const GIB: i64 = 1 << 30;

    fn it(name: &str, price: f64, ram: i64, vcpus: i64, scratch: i64) -> InstanceType {
        InstanceType {
            name: name.into(),
            provider_type: name.into(),
            price,
            ram,
            vcpus,
            scratch,
            included_scratch: scratch,
            ..Default::default()
        }
    }

    fn cluster(types: Vec<InstanceType>, tweak: impl FnOnce(&mut Containers)) -> Cluster {
        let mut c = Cluster {
            instance_types: types
                .into_iter()
                .map(|t| (t.name.clone(), t))
                .collect::<BTreeMap<_, _>>(),
            ..Cluster::default()
        };
        tweak(&mut c.containers);
        c
    }

    fn ctr(vcpus: i64, ram: i64, keep_cache_ram: i64, tmp: i64) -> Container {
        let mut c = Container::default();
        c.runtime_constraints.vcpus = vcpus;
        c.runtime_constraints.ram = ram;
        c.runtime_constraints.keep_cache_ram = keep_cache_ram;
        if tmp > 0 {
            c.mounts.insert(
                "/tmp".into(),
                Mount {
                    kind: "tmp".into(),
                    capacity: tmp,
                    ..Default::default()
                },
            );
        }
        c
    }

    fn names(r: &[InstanceType]) -> Vec<&str> {
        r.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn resources_needed_with_defaults_1gib_1vcpu() {
        // (1 GiB + 550 MiB + 220 MiB + 64 MiB × 11 / 10) × 100 / 95, all integer arithmetic.
        // The spec's §6.1 prose says 2 057 858 004; that is an arithmetic slip (the formula,
        // which Arvados implements, gives 2 057 857 993).
        let need = resources_needed(&Containers::default(), &ctr(1, GIB, 0, 0));
        assert_eq!(need.ram, 2_057_857_993);
        assert_eq!((need.vcpus, need.scratch, need.gpus), (1, 0, 0));
    }

    #[test]
    fn ac_ns_1_docker_image_size_estimate() {
        let mut c = Container {
            container_image: "d5025c0f29f6eef304a7358afa82a822+342".into(),
            ..Default::default()
        };
        assert_eq!(estimate_scratch_space(&c), 805_306_368);
        c.container_image = "d5025c0f29f6eef304a7358afa82a822+-342".into();
        assert_eq!(estimate_scratch_space(&c), 0);
        c.container_image = "d5025c0f29f6eef304a7358afa82a822+34".into();
        assert_eq!(estimate_scratch_space(&c), 0);
    }

    #[test]
    fn ac_ns_2_no_instance_types() {
        let err = choose_instance_types(&cluster(vec![], |_| {}), &ctr(1, GIB, 0, 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "site configuration does not list any instance types"
        );
    }

    #[test]
    fn ac_ns_3_unsatisfiable_constraints() {
        let menu = || {
            vec![
                it("small1", 1.1, 1_000_000_000, 2, 0),
                it("small2", 2.2, 2_000_000_000, 4, 0),
                it("small4", 4.4, 4_000_000_000, 8, GIB),
            ]
        };
        for c in [
            ctr(2, 9_876_543_210, 0, 0),
            ctr(20, 1_234_567_890, 0, 0),
            ctr(2, 1_234_567_890, 9_876_543_210, 0),
            ctr(1, 12345, 0, 2 * GIB),
        ] {
            let err = choose_instance_types(&cluster(menu(), |_| {}), &c).unwrap_err();
            let ChooseError::ConstraintsNotSatisfiable {
                message,
                available_types,
            } = err
            else {
                panic!("wrong error kind");
            };
            assert_eq!(
                message,
                "constraints not satisfiable by any configured instance type"
            );
            assert_eq!(names(&available_types), ["small1", "small2", "small4"]);
        }
    }

    #[test]
    fn ac_ns_4_cheapest_then_roomiest() {
        let c = ctr(2, 987_654_321, 123_456_789, 2 * GIB);
        let tweak = |k: &mut Containers| {
            k.local_keep_blob_buffers_per_vcpu = 1;
            k.reserve_extra_ram = 268_435_456;
            k.maximum_price_factor = 1.0;
        };
        let costly = it("costly", 4.4, 4_000_000_000, 8, 2 * GIB);
        let small = it("small", 1.1, 1_000_000_000, 2, 2 * GIB);
        let menus = vec![
            vec![
                costly.clone(),
                it("best", 2.2, 2_000_000_000, 4, 2 * GIB),
                small.clone(),
            ],
            vec![
                costly.clone(),
                it("goodenough", 2.2, 2_000_000_000, 4, 2 * GIB),
                it("best", 2.2, 4_000_000_000, 4, 2 * GIB),
                small.clone(),
            ],
            vec![
                it("best", 2.2, 4_000_000_000, 4, 2 * GIB),
                small.clone(),
                it("goodenough", 2.2, 2_000_000_000, 4, 2 * GIB),
                costly.clone(),
            ],
            vec![
                it("small", 1.1, 1_000_000_000, 2, GIB),
                it("nearly", 2.2, 2_000_000_000, 4, GIB),
                it("best", 3.3, 4_000_000_000, 4, 2 * GIB),
                costly.clone(),
            ],
            vec![
                small.clone(),
                it("nearly", 2.2, 1_200_000_000, 4, 2 * GIB),
                it("best", 3.3, 4_000_000_000, 4, 2 * GIB),
                costly.clone(),
            ],
        ];
        for menu in menus {
            let got = choose_instance_types(&cluster(menu, tweak), &c).unwrap();
            assert_eq!(got[0].name, "best");
            assert!(
                got.iter().all(|t| t.price == got[0].price),
                "{:?}",
                names(&got)
            );
        }
    }

    #[test]
    fn ac_ns_5_maximum_price_factor_band() {
        let mut menu: Vec<InstanceType> = [
            ("best+7", 3.4),
            ("best+5", 3.0),
            ("best+3", 2.6),
            ("best+2", 2.4),
            ("best+1", 2.2),
            ("best", 2.0),
        ]
        .into_iter()
        .map(|(n, p)| it(n, p, 4_000_000_000, 4, 2 * GIB))
        .collect();
        menu.push(it("small+1", 1.1, 1_000_000_000, 4, 2 * GIB));
        menu.push(it("small", 1.0, 4_000_000_000, 4, GIB));
        let no_overheads = |k: &mut Containers| {
            k.local_keep_blob_buffers_per_vcpu = 0;
            k.reserve_extra_ram = 0;
            k.maximum_price_factor = 1.5;
        };
        let got = choose_instance_types(
            &cluster(menu, no_overheads),
            &ctr(2, 987_654_321, 123_456_789, 2 * GIB),
        )
        .unwrap();
        assert_eq!(
            names(&got),
            ["best", "best+1", "best+2", "best+3", "best+5"]
        );
    }

    #[test]
    fn ac_ns_6_keepstore_buffers_count_against_ram() {
        let menu = vec![
            it("nearly", 2.2, 4_000_000_000, 4, 2 * GIB),
            it("best", 3.3, 8_000_000_000, 4, 2 * GIB),
            it("costly", 4.4, 12_000_000_000, 4, 2 * GIB),
        ];
        let tweak = |k: &mut Containers| {
            k.local_keep_blob_buffers_per_vcpu = 16;
            k.reserve_extra_ram = 256 << 20;
            k.maximum_price_factor = 1.0;
        };
        let got = choose_instance_types(
            &cluster(menu, tweak),
            &ctr(2, 987_654_321, 123_456_789, 2 * GIB),
        )
        .unwrap();
        assert_eq!(names(&got), ["best"]);
    }

    #[test]
    fn ac_ns_7_preemptible_must_match() {
        let mut best = it("best", 2.2, 4_000_000_000, 4, 2 * GIB);
        best.preemptible = true;
        let menu = vec![
            it("almost best", 2.2, 4_000_000_000, 4, 2 * GIB),
            best,
            it("costly", 4.4, 8_000_000_000, 8, 2 * GIB),
        ];
        let mut c = ctr(2, GIB, 0, 0);
        c.scheduling_parameters.preemptible = true;
        let got =
            choose_instance_types(&cluster(menu, |k| k.maximum_price_factor = 1.0), &c).unwrap();
        assert_eq!(names(&got), ["best"]);
    }

    fn gpu_type(
        name: &str,
        price: f64,
        stack: &str,
        driver: &str,
        target: &str,
        count: i64,
        vram: i64,
    ) -> InstanceType {
        let mut t = it(name, price, 8_000_000_000, 4, 2 * GIB);
        t.gpu = GpuFeatures {
            stack: stack.into(),
            driver_version: driver.into(),
            hardware_target: target.into(),
            device_count: count,
            vram,
        };
        t
    }

    #[test]
    fn ac_ns_8_gpu_matching() {
        let menu = vec![
            it("non_gpu", 1.0, 8_000_000_000, 4, 2 * GIB),
            gpu_type(
                "low_capability",
                1.2,
                "cuda",
                "11.0",
                "8.0",
                1,
                2_000_000_000,
            ),
            gpu_type("low_driver", 1.5, "cuda", "10.0", "9.0", 1, 2_000_000_000),
            gpu_type("best", 2.0, "cuda", "11.0", "9.0", 1, 2_000_000_000),
            gpu_type(
                "cheap_gpu_rocm",
                2.2,
                "rocm",
                "6.0",
                "gfx1103",
                1,
                2_000_000_000,
            ),
            gpu_type("unlikely_rocm", 2.3, "rocm", "6.0", "gfx1104", 1, 0),
            gpu_type("gpu_rocm", 2.5, "rocm", "6.0", "gfx1100", 1, 2_000_000_000),
            gpu_type("more_vram", 3.0, "cuda", "10.0", "9.0", 1, 8_000_000_000),
            gpu_type("costly", 4.0, "cuda", "11.0", "9.0", 2, 2_000_000_000),
        ];
        let cl = cluster(menu, |k| k.maximum_price_factor = 1.0);
        let choose = |stack: &str, count: i64, targets: &[&str], driver: &str, vram: i64| {
            let mut c = ctr(1, GIB, 0, 0);
            c.runtime_constraints.gpu = GpuConstraints {
                stack: stack.into(),
                device_count: count,
                hardware_target: targets.iter().map(|s| s.to_string()).collect(),
                driver_version: driver.into(),
                vram,
            };
            choose_instance_types(&cl, &c).map(|r| r[0].name.clone())
        };
        assert_eq!(
            choose("cuda", 1, &["9.0"], "11.0", 2_000_000_000).unwrap(),
            "best"
        );
        assert_eq!(
            choose("cuda", 2, &["9.0"], "11.0", 2_000_000_000).unwrap(),
            "costly"
        );
        assert_eq!(
            choose("cuda", 1, &["8.0"], "11.0", 2_000_000_000).unwrap(),
            "low_capability"
        );
        assert_eq!(
            choose("cuda", 1, &["9.0"], "10.0", 2_000_000_000).unwrap(),
            "low_driver"
        );
        assert!(choose("cuda", 1, &["9.0"], "11.0", 8_000_000_000).is_err());
        assert!(choose("cuda", 1, &[], "11.0", 2_000_000_000).is_err());
        assert_eq!(
            choose("rocm", 1, &["gfx1100"], "6.0", 2_000_000_000).unwrap(),
            "gpu_rocm"
        );
        assert_eq!(
            choose("rocm", 1, &["gfx1100", "gfx1103"], "6.0", 2_000_000_000).unwrap(),
            "cheap_gpu_rocm"
        );
        assert!(choose("rocm", 1, &["gfx1104"], "6.0", 2_000_000_000).is_err());
        assert_eq!(choose("", 0, &[], "", 0).unwrap(), "non_gpu");
        let err = choose("opencl", 1, &[], "", 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid GPU stack \"opencl\", expected to be blank or one of 'cuda' or 'rocm'"
        );
    }

    #[test]
    fn ac_ns_9_shared_vcpu_arithmetic() {
        let r = |vcpus| InstanceResources {
            vcpus,
            ..Default::default()
        };
        let mut a = r(2);
        a.sub(&r(0));
        assert!(a.shared_vcpu_used);
        let mut b = r(2);
        b.sub(&r(1));
        assert!(!b.shared_vcpu_used);
        b.sub(&r(0));
        b.sub(&r(0));
        assert!(b.shared_vcpu_used, "sticky");
        assert!(r(2).accommodates(&r(2)));
        let flagged = |vcpus| InstanceResources {
            vcpus,
            shared_vcpu_used: true,
            ..Default::default()
        };
        assert!(
            flagged(2).accommodates(&r(1))
                && flagged(2).accommodates(&r(0))
                && !flagged(2).accommodates(&r(2))
        );
        assert!(flagged(1).accommodates(&r(0)) && !flagged(1).accommodates(&r(1)));
        assert!(!flagged(0).accommodates(&r(0)) && !r(0).accommodates(&r(0)));
    }

    #[test]
    fn version_comparison_is_dotted_numeric_fixing_go_float_parse() {
        // §13.2 item 14: Go compares these as floats and gets them wrong.
        assert_eq!(version_less("9.9", "9.10"), Ok(true));
        assert_eq!(version_less("535.54", "535.104"), Ok(true));
        assert_eq!(version_less("12.0.12", "12.0"), Ok(false));
        assert_eq!(version_less("12.0", "12.0.1"), Ok(true));
        assert_eq!(version_less("11.0", "11"), Ok(false));
        assert!(version_less("", "1").is_err());
        assert!(version_less("gfx1100", "1").is_err());
    }
}
