//! Finding, reading and checking a cluster config file.
//!
//! The steps, each a plain function so tests can hit them one by one:
//! 1. `ConfigSource::resolve`: `--config`, else `$ARVADOS_CONFIG`, else `/etc/arvados/config.yml`.
//! 2. Parse YAML, pick `Clusters.<id>` (the only one, or the one named).
//! 3. Drop `SAMPLE` entries and null values (a null never overrides a default, as in Arvados).
//! 4. Merge `DriverParameters` over Arvados' defaults.
//! 5. Deserialize into `Cluster`, tracking the key path so an error names it in full.
//! 6. Fill derived fields (`ClusterID`, instance type names, scratch, preemptible variants).

use std::fmt;
use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

use super::{Cluster, GpuFeatures, default_driver_parameters};

/// The default location of the Arvados config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/arvados/config.yml";

/// Why a config could not be loaded. `Display` is one line that names the file or key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The I/O error is part of the message, not a separate `source`: an error chain printed
    /// in full (`{:#}`) would say it twice.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        error: std::io::Error,
    },
    /// The text is not YAML.
    #[error("{origin}: YAML syntax error: {message}")]
    Syntax {
        /// The file (or other origin) of the text.
        origin: String,
        /// The parser's message, on one line.
        message: String,
    },
    /// There is no `Clusters` map.
    #[error("{origin}: no Clusters section (expected `Clusters: <cluster id>: ...`)")]
    NoClusters {
        /// The file (or other origin) of the text.
        origin: String,
    },
    /// The cluster asked for is not in the file.
    #[error("{origin}: cluster {wanted:?} not found (clusters in file: {available})")]
    UnknownCluster {
        /// The file (or other origin) of the text.
        origin: String,
        /// The cluster ID asked for.
        wanted: String,
        /// The cluster IDs the file has, comma-separated.
        available: String,
    },
    /// Several clusters and none chosen.
    #[error("{origin}: {count} clusters defined ({available}); choose one with --cluster")]
    AmbiguousCluster {
        /// The file (or other origin) of the text.
        origin: String,
        /// How many clusters the file defines.
        count: usize,
        /// Their IDs, comma-separated.
        available: String,
    },
    /// A bad value: `key_path` is the full path, e.g. `Clusters.zzzzz.Containers.CloudVMs.TimeoutIdle`.
    #[error("{key_path}: {message}")]
    Invalid {
        /// Where the bad value is.
        key_path: String,
        /// What is wrong with it.
        message: String,
    },
}

/// Where a config file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    /// The config file.
    pub path: PathBuf,
}

impl ConfigSource {
    /// `--config FILE` if given, else `$ARVADOS_CONFIG` if set and non-empty, else the default.
    pub fn resolve(flag: Option<&Path>) -> Self {
        Self::resolve_with_env(flag, std::env::var_os("ARVADOS_CONFIG").map(PathBuf::from))
    }

    fn resolve_with_env(flag: Option<&Path>, env: Option<PathBuf>) -> Self {
        let path = flag
            .map(Path::to_path_buf)
            .or(env.filter(|p| !p.as_os_str().is_empty()))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        ConfigSource { path }
    }
}

/// Load one cluster from a config file.
pub fn load_cluster(source: &ConfigSource, cluster: Option<&str>) -> Result<Cluster, ConfigError> {
    let text = std::fs::read_to_string(&source.path).map_err(|e| ConfigError::Read {
        path: source.path.clone(),
        error: e,
    })?;
    load_cluster_from_str(&text, &source.path.display().to_string(), cluster)
}

/// Load one cluster from YAML text; `origin` names the text in errors (usually the file path).
/// Keys not given take Arvados' defaults; a bad value names its full key path.
///
/// ```
/// use arvados::config::load_cluster_from_str;
///
/// let yaml = "
/// Clusters:
///   zzzzz:
///     SystemRootToken: secret
///     Services:
///       Controller:
///         ExternalURL: https://zzzzz.example.com/
///     Containers:
///       CloudVMs:
///         PollInterval: 5s
/// ";
/// let cluster = load_cluster_from_str(yaml, "config.yml", None).unwrap();
/// assert_eq!(cluster.cluster_id, "zzzzz");
/// assert_eq!(cluster.containers.cloud_vms.poll_interval.as_secs(), 5);
/// assert_eq!(cluster.containers.cloud_vms.timeout_idle.as_secs(), 60); // the default
///
/// let bad = yaml.replace("5s", "soon");
/// let err = load_cluster_from_str(&bad, "config.yml", None).unwrap_err();
/// assert!(err.to_string().starts_with("Clusters.zzzzz.Containers.CloudVMs.PollInterval: "));
/// ```
pub fn load_cluster_from_str(
    text: &str,
    origin: &str,
    cluster: Option<&str>,
) -> Result<Cluster, ConfigError> {
    let doc: Value = serde_norway::from_str(text).map_err(|e| ConfigError::Syntax {
        origin: origin.to_string(),
        message: one_line(&e.to_string()),
    })?;
    let clusters = match doc.get("Clusters") {
        Some(Value::Mapping(m)) if !m.is_empty() => m,
        _ => {
            return Err(ConfigError::NoClusters {
                origin: origin.to_string(),
            });
        }
    };
    let ids: Vec<String> = clusters.keys().map(key_text).collect();
    let available = ids.join(", ");
    let id = match cluster {
        Some(want) => {
            if !ids.iter().any(|i| i == want) {
                return Err(ConfigError::UnknownCluster {
                    origin: origin.to_string(),
                    wanted: want.to_string(),
                    available,
                });
            }
            want.to_string()
        }
        None if ids.len() == 1 => ids[0].clone(),
        None => {
            return Err(ConfigError::AmbiguousCluster {
                origin: origin.to_string(),
                count: ids.len(),
                available,
            });
        }
    };
    let prefix = format!("Clusters.{id}");
    if !is_valid_cluster_id(&id) {
        return Err(ConfigError::Invalid {
            key_path: prefix,
            message: format!("invalid cluster ID {id:?}: must be 5 lowercase letters or digits"),
        });
    }
    let mut value = clusters
        .iter()
        .find(|(k, _)| key_text(k) == id)
        .map(|(_, v)| v.clone())
        .unwrap_or(Value::Null);
    if value.is_null() {
        value = Value::Mapping(Mapping::new());
    }
    strip_samples_and_nulls(&mut value);
    merge_driver_parameters(&mut value);

    let raw = value.clone();
    let mut cluster: Cluster = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key_path = if path == "." || path.is_empty() {
            prefix.clone()
        } else {
            format!("{prefix}.{path}")
        };
        ConfigError::Invalid {
            key_path,
            message: one_line(&e.into_inner().to_string()),
        }
    })?;
    cluster.cluster_id = id;
    cluster.raw = super::RawTree(raw);
    finish(&mut cluster, &prefix)?;
    Ok(cluster)
}

/// YAML to JSON; mapping keys that are not strings (numbers, booleans) become their text.
pub(super) fn yaml_to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Number(n) => serde_json::to_value(n).unwrap_or(serde_json::Value::Null),
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Sequence(items) => {
            serde_json::Value::Array(items.iter().map(yaml_to_json).collect())
        }
        Value::Mapping(m) => serde_json::Value::Object(
            m.iter()
                .map(|(k, v)| (key_text(k), yaml_to_json(v)))
                .collect(),
        ),
        Value::Tagged(t) => yaml_to_json(&t.value),
    }
}

fn is_valid_cluster_id(id: &str) -> bool {
    id.len() == 5
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_norway::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Arvados documents map-valued settings with `SAMPLE` entries that are not real entries, and a
/// null value never overrides a default. Remove both, at every depth.
fn strip_samples_and_nulls(v: &mut Value) {
    match v {
        Value::Mapping(m) => {
            m.retain(|k, v| !(k.as_str() == Some("SAMPLE") || v.is_null()));
            for (_, child) in m.iter_mut() {
                strip_samples_and_nulls(child);
            }
        }
        Value::Sequence(s) => s.iter_mut().for_each(strip_samples_and_nulls),
        Value::Tagged(t) => strip_samples_and_nulls(&mut t.value),
        _ => {}
    }
}

/// Deep-merge `over` into `base`: maps merge key by key, anything else replaces.
pub(super) fn deep_merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => deep_merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn merge_driver_parameters(cluster: &mut Value) {
    let Some(cloud_vms) = cluster
        .get_mut("Containers")
        .and_then(|c| c.get_mut("CloudVMs"))
        .filter(|c| c.is_mapping())
    else {
        return;
    };
    let mut merged = default_driver_parameters();
    if let Some(own) = cloud_vms.get("DriverParameters").cloned() {
        if !own.is_mapping() {
            // Not ours to judge beyond "not a map": leave it for serde to report the type.
            return;
        }
        deep_merge(&mut merged, own);
    }
    if let Value::Mapping(m) = cloud_vms {
        m.insert(Value::String("DriverParameters".into()), merged);
    }
}

/// Values that parse but cannot work: a zero poll interval (a busy loop), negative counts,
/// rates and factors that are negative or not numbers. (Byte sizes cannot be negative: their
/// parser refuses that.)
fn check_ranges(cluster: &Cluster, prefix: &str) -> Result<(), ConfigError> {
    let bad = |key: &str, message: String| ConfigError::Invalid {
        key_path: format!("{prefix}.{key}"),
        message,
    };
    let k = &cluster.containers;
    let vms = &k.cloud_vms;
    if vms.enable && vms.poll_interval.is_zero() {
        return Err(bad(
            "Containers.CloudVMs.PollInterval",
            "must be greater than zero".into(),
        ));
    }
    for (key, v) in [
        (
            "Containers.LocalKeepBlobBuffersPerVCPU",
            k.local_keep_blob_buffers_per_vcpu,
        ),
        ("Containers.MaxDispatchAttempts", k.max_dispatch_attempts),
        (
            "Containers.CloudVMs.MaxConcurrentInstanceCreateOps",
            vms.max_concurrent_instance_create_ops,
        ),
        ("Containers.CloudVMs.MaxInstances", vms.max_instances),
        (
            "Containers.CloudVMs.MaxRunningContainersPerInstance",
            vms.max_running_containers_per_instance,
        ),
        (
            "Containers.CloudVMs.InitialQuotaEstimate",
            vms.initial_quota_estimate,
        ),
        (
            "API.MaxConcurrentRequests",
            cluster.api.max_concurrent_requests,
        ),
    ] {
        if v < 0 {
            return Err(bad(key, format!("invalid value {v}: must not be negative")));
        }
    }
    for (key, v) in [
        ("Containers.MaximumPriceFactor", k.maximum_price_factor),
        (
            "Containers.PreemptiblePriceFactor",
            k.preemptible_price_factor,
        ),
        (
            "Containers.CloudVMs.MaxProbesPerSecond",
            vms.max_probes_per_second,
        ),
        (
            "Containers.CloudVMs.MaxCloudOpsPerSecond",
            vms.max_cloud_ops_per_second,
        ),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(bad(
                key,
                format!("invalid value {v}: must be a non-negative number"),
            ));
        }
    }
    Ok(())
}

/// Fill the derived fields and check what serde cannot.
fn finish(cluster: &mut Cluster, prefix: &str) -> Result<(), ConfigError> {
    check_ranges(cluster, prefix)?;
    let vms = &cluster.containers.cloud_vms;
    if !vms.driver_parameters.is_mapping() {
        return Err(ConfigError::Invalid {
            key_path: format!("{prefix}.Containers.CloudVMs.DriverParameters"),
            message: "must be a map".into(),
        });
    }
    let fraction = vms.supervisor_fraction;
    if !(0.0..=1.0).contains(&fraction) {
        return Err(ConfigError::Invalid {
            key_path: format!("{prefix}.Containers.CloudVMs.SupervisorFraction"),
            message: format!("invalid value {fraction}: must be between 0 and 1"),
        });
    }
    for (name, it) in cluster.instance_types.iter_mut() {
        let path = format!("{prefix}.InstanceTypes.{name}");
        if !it.name.is_empty() && it.name != *name {
            return Err(ConfigError::Invalid {
                key_path: format!("{path}.Name"),
                message: format!("Name {:?} does not match its key {name:?}", it.name),
            });
        }
        it.name = name.clone();
        if it.provider_type.is_empty() {
            it.provider_type = name.clone();
        }
        it.scratch = it
            .included_scratch
            .checked_add(it.added_scratch)
            .ok_or_else(|| ConfigError::Invalid {
                key_path: format!("{path}.AddedScratch"),
                message: "IncludedScratch + AddedScratch is too large".into(),
            })?;
        if let Some(cuda) = it.cuda.take()
            && cuda.device_count > 0
            && it.gpu.device_count == 0
        {
            it.gpu = GpuFeatures {
                stack: "cuda".into(),
                driver_version: cuda.driver_version,
                hardware_target: cuda.hardware_capability,
                device_count: cuda.device_count,
                vram: it.gpu.vram,
            };
        }
        for (key, value) in [
            ("VCPUs", it.vcpus),
            ("GPU.DeviceCount", it.gpu.device_count),
        ] {
            if value < 0 {
                return Err(ConfigError::Invalid {
                    key_path: format!("{path}.{key}"),
                    message: format!("invalid value {value}: must not be negative"),
                });
            }
        }
        if !it.price.is_finite() || it.price < 0.0 {
            return Err(ConfigError::Invalid {
                key_path: format!("{path}.Price"),
                message: format!("invalid price {}: must be a non-negative number", it.price),
            });
        }
    }
    let vms = &cluster.containers.cloud_vms;
    if vms.enable && vms.driver == "loopback" {
        // One host, one type: the one configured, else this host's own.
        if cluster.instance_types.len() > 1 {
            return Err(ConfigError::Invalid {
                key_path: format!("{prefix}.InstanceTypes"),
                message: "cannot use multiple InstanceTypes with loopback driver".into(),
            });
        }
        if cluster.instance_types.is_empty() {
            let it = crate::host::localhost_instance_type();
            cluster.instance_types.insert(it.name.clone(), it);
        }
        return Ok(());
    }
    add_preemptible_variants(cluster);
    Ok(())
}

/// `Containers.PreemptiblePriceFactor > 0`: for every non-preemptible type `X`, add
/// `X.preemptible` (same provider type, preemptible, price × factor), unless a type of that name
/// is already configured.
fn add_preemptible_variants(cluster: &mut Cluster) {
    let factor = cluster.containers.preemptible_price_factor;
    if factor <= 0.0 {
        return;
    }
    let variants: Vec<_> = cluster
        .instance_types
        .values()
        .filter(|it| !it.preemptible)
        .map(|it| {
            let mut v = it.clone();
            v.name = format!("{}.preemptible", it.name);
            v.preemptible = true;
            v.price = it.price * factor;
            v
        })
        .collect();
    for v in variants {
        match cluster.instance_types.get(&v.name) {
            Some(existing) if *existing != v => tracing::warn!(
                InstanceType = %v.name,
                "instance type already configured; not adding its PreemptiblePriceFactor variant"
            ),
            Some(_) => {}
            None => {
                cluster.instance_types.insert(v.name.clone(), v);
            }
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn load(yaml: &str) -> Result<Cluster, ConfigError> {
        load_cluster_from_str(yaml, "test.yml", None)
    }

    #[test]
    fn source_prefers_flag_then_env_then_default() {
        let flag = PathBuf::from("/a.yml");
        let env = Some(PathBuf::from("/b.yml"));
        assert_eq!(
            ConfigSource::resolve_with_env(Some(&flag), env.clone()).path,
            flag
        );
        assert_eq!(
            ConfigSource::resolve_with_env(None, env).path,
            PathBuf::from("/b.yml")
        );
        assert_eq!(
            ConfigSource::resolve_with_env(None, Some(PathBuf::new())).path,
            PathBuf::from(DEFAULT_CONFIG_PATH)
        );
        assert_eq!(
            ConfigSource::resolve_with_env(None, None).path,
            PathBuf::from(DEFAULT_CONFIG_PATH)
        );
    }

    #[test]
    fn minimal_cluster_gets_arvados_defaults() {
        let c = load("Clusters:\n  zzzzz: {}\n").unwrap();
        assert_eq!(c.cluster_id, "zzzzz");
        let want = Cluster {
            cluster_id: "zzzzz".into(),
            ..Cluster::default()
        };
        assert_eq!(c, want);
        assert_eq!(c.containers.cloud_vms.timeout_idle, Duration::from_secs(60));
        assert_eq!(c.containers.reserve_extra_ram, 550 << 20);
    }

    #[test]
    fn bad_duration_names_full_key_path() {
        let err = load(
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        TimeoutIdle: 1x\n",
        )
        .unwrap_err();
        let err = err.to_string();
        assert!(
            err.starts_with(
                r#"Clusters.zzzzz.Containers.CloudVMs.TimeoutIdle: invalid duration "1x""#
            ),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1);
    }

    #[test]
    fn wrong_type_names_full_key_path() {
        let err = load(
            "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        MaxInstances: lots\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("Clusters.zzzzz.Containers.CloudVMs.MaxInstances: invalid type"),
            "{err}"
        );
        let err = load("Clusters:\n  zzzzz:\n    InstanceTypes:\n      m5:\n        RAM: 4XB\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"Clusters.zzzzz.InstanceTypes.m5.RAM: invalid byte size "4XB": unknown unit "XB""#
        );
    }

    #[test]
    fn cluster_selection() {
        let two = "Clusters:\n  aaaaa: {}\n  bbbbb: {}\n";
        let err = load_cluster_from_str(two, "f.yml", None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "f.yml: 2 clusters defined (aaaaa, bbbbb); choose one with --cluster"
        );
        assert_eq!(
            load_cluster_from_str(two, "f.yml", Some("bbbbb"))
                .unwrap()
                .cluster_id,
            "bbbbb"
        );
        let err = load_cluster_from_str(two, "f.yml", Some("ccccc"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"f.yml: cluster "ccccc" not found (clusters in file: aaaaa, bbbbb)"#
        );
        let err = load("Foo: 1\n").unwrap_err().to_string();
        assert!(err.starts_with("test.yml: no Clusters section"), "{err}");
        let err = load("Clusters:\n  ZZ: {}\n").unwrap_err().to_string();
        assert!(err.starts_with("Clusters.ZZ: invalid cluster ID"), "{err}");
    }

    #[test]
    fn yaml_syntax_error_is_one_line() {
        let err = load("Clusters:\n  zzzzz: [\n").unwrap_err().to_string();
        assert!(err.starts_with("test.yml: YAML syntax error:"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn loopback_driver_allows_one_instance_type_and_synthesises_localhost() {
        let loopback = "Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs: {Enable: true, Driver: loopback}\n";
        let c = load(loopback).unwrap();
        let names: Vec<_> = c.instance_types.keys().cloned().collect();
        assert_eq!(names, ["localhost"]);
        let it = &c.instance_types["localhost"];
        assert_eq!((it.provider_type.as_str(), it.price), ("localhost", 1.0));
        assert_eq!(it.vcpus, crate::host::cpu_count());
        assert_eq!(it.ram, crate::host::total_memory());
        assert!(it.scratch > 0 && it.scratch == it.included_scratch);

        let one = format!("{loopback}    InstanceTypes:\n      big: {{VCPUs: 64, RAM: 1TiB}}\n");
        let c = load(&one).unwrap();
        assert_eq!(c.instance_types.keys().collect::<Vec<_>>(), ["big"]);

        let two = format!("{one}      small: {{VCPUs: 1, RAM: 1GiB}}\n");
        assert_eq!(
            load(&two).unwrap_err().to_string(),
            "Clusters.zzzzz.InstanceTypes: cannot use multiple InstanceTypes with loopback driver"
        );
        // Not enabled, or another driver: no such rule.
        let off = two.replace("Enable: true", "Enable: false");
        assert_eq!(load(&off).unwrap().instance_types.len(), 2);
    }

    #[test]
    fn instance_types_derive_name_provider_type_and_scratch() {
        let c = load(
            "Clusters:
  zzzzz:
    InstanceTypes:
      m5.large:
        VCPUs: 2
        RAM: 8GiB
        IncludedScratch: 16GB
        AddedScratch: 1GB
        Price: 0.096
      small:
        ProviderType: t3.small
        VCPUs: 1
        RAM: 2GiB
        Price: 1
        GPU: {Stack: cuda, DriverVersion: 11.0, HardwareTarget: '9.0', DeviceCount: 1, VRAM: 8GiB}
",
        )
        .unwrap();
        let m5 = &c.instance_types["m5.large"];
        assert_eq!(m5.name, "m5.large");
        assert_eq!(m5.provider_type, "m5.large");
        assert_eq!(m5.scratch, 17_000_000_000);
        assert_eq!(m5.ram, 8 << 30);
        let small = &c.instance_types["small"];
        assert_eq!(small.provider_type, "t3.small");
        assert_eq!(small.price, 1.0);
        assert_eq!(small.gpu.driver_version, "11.0");
        assert_eq!(small.gpu.vram, 8 << 30);
    }

    #[test]
    fn instance_type_name_must_match_key_and_map_form_is_required() {
        let err = load("Clusters:\n  zzzzz:\n    InstanceTypes:\n      a: {Name: b}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"Clusters.zzzzz.InstanceTypes.a.Name: Name "b" does not match its key "a""#
        );
        let err = load("Clusters:\n  zzzzz:\n    InstanceTypes:\n      - {Name: b}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("Clusters.zzzzz.InstanceTypes: must be a map"),
            "{err}"
        );
    }

    #[test]
    fn preemptible_price_factor_adds_variants() {
        let c = load(
            "Clusters:
  zzzzz:
    Containers: {PreemptiblePriceFactor: 0.5}
    InstanceTypes:
      a: {VCPUs: 1, RAM: 1GiB, Price: 0.2}
      b: {VCPUs: 1, RAM: 1GiB, Price: 0.1, Preemptible: true}
",
        )
        .unwrap();
        let names: Vec<_> = c.instance_types.keys().cloned().collect();
        assert_eq!(names, ["a", "a.preemptible", "b"]);
        let v = &c.instance_types["a.preemptible"];
        assert!(v.preemptible);
        assert_eq!(v.provider_type, "a");
        assert!((v.price - 0.1).abs() < 1e-12);
    }

    #[test]
    fn legacy_cuda_block_becomes_gpu() {
        let c = load(
            "Clusters:
  zzzzz:
    InstanceTypes:
      g: {CUDA: {DriverVersion: '11.4', HardwareCapability: '7.5', DeviceCount: 2}}
",
        )
        .unwrap();
        let g = &c.instance_types["g"].gpu;
        assert_eq!((g.stack.as_str(), g.device_count), ("cuda", 2));
        assert_eq!(
            (g.driver_version.as_str(), g.hardware_target.as_str()),
            ("11.4", "7.5")
        );
    }

    #[test]
    fn samples_and_nulls_are_ignored_and_driver_parameters_merge() {
        let c = load(
            "Clusters:
  zzzzz:
    ManagementToken: null
    InstanceTypes:
      SAMPLE: {VCPUs: 1}
    Containers:
      CloudVMs:
        ResourceTags: {SAMPLE: x, Owner: lab}
        SSHPort: 2222
        DriverParameters:
          Region: us-east-1
          InstanceTypeQuotaGroups: {g5: gpu}
",
        )
        .unwrap();
        assert!(c.instance_types.is_empty());
        assert_eq!(c.management_token, "");
        let vms = &c.containers.cloud_vms;
        assert_eq!(vms.ssh_port, "2222");
        assert_eq!(vms.resource_tags.len(), 1);
        let dp = &vms.driver_parameters;
        assert_eq!(dp["Region"].as_str(), Some("us-east-1"));
        assert_eq!(dp["EBSVolumeType"].as_str(), Some("gp2"));
        assert_eq!(dp["InstanceTypeQuotaGroups"]["g5"].as_str(), Some("gpu"));
        assert_eq!(
            dp["InstanceTypeQuotaGroups"]["m"].as_str(),
            Some("standard")
        );
    }

    #[test]
    fn values_that_cannot_work_name_their_key_and_never_panic() {
        let cases = [
            (
                "Containers: {CloudVMs: {Enable: true, PollInterval: 0s}}",
                "Clusters.zzzzz.Containers.CloudVMs.PollInterval: must be greater than zero",
            ),
            (
                "Containers: {CloudVMs: {TimeoutIdle: 2562048h}}",
                "Clusters.zzzzz.Containers.CloudVMs.TimeoutIdle: invalid duration \"2562048h\": longer than the maximum",
            ),
            (
                "Containers: {CloudVMs: {TimeoutIdle: 99999999999999999999h}}",
                "Clusters.zzzzz.Containers.CloudVMs.TimeoutIdle: invalid duration",
            ),
            (
                "Containers: {ReserveExtraRAM: -1073741824}",
                "Clusters.zzzzz.Containers.ReserveExtraRAM: invalid byte size -1073741824: must not be negative",
            ),
            (
                "Containers: {CloudVMs: {MaxInstances: -3}}",
                "Clusters.zzzzz.Containers.CloudVMs.MaxInstances: invalid value -3",
            ),
            (
                "Containers: {MaximumPriceFactor: .nan}",
                "Clusters.zzzzz.Containers.MaximumPriceFactor: invalid value NaN",
            ),
            (
                "Containers: {CloudVMs: {MaxCloudOpsPerSecond: -1}}",
                "Clusters.zzzzz.Containers.CloudVMs.MaxCloudOpsPerSecond: invalid value -1",
            ),
            (
                "InstanceTypes: {a: {VCPUs: 1, RAM: 1GiB, Price: 1, GPU: {VRAM: -1}}}",
                "Clusters.zzzzz.InstanceTypes.a.GPU.VRAM: invalid",
            ),
        ];
        for (yaml, want) in cases {
            let text = format!("Clusters:\n  zzzzz:\n    {yaml}\n");
            let err = load(&text).unwrap_err().to_string();
            assert!(err.starts_with(want), "{yaml}: {err}");
        }
        // The longest duration Go accepts still loads.
        let ok = "Clusters:\n  zzzzz:\n    Containers: {CloudVMs: {TimeoutIdle: 2562047h}}\n";
        assert!(load(ok).is_ok());
    }

    #[test]
    fn bad_urls_and_fractions_are_rejected() {
        let err = load("Clusters:\n  zzzzz:\n    Services:\n      Controller:\n        ExternalURL: 'not a url'\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                r#"Clusters.zzzzz.Services.Controller.ExternalURL: invalid URL "not a url""#
            ),
            "{err}"
        );
        let err = load("Clusters:\n  zzzzz:\n    Containers:\n      CloudVMs:\n        SupervisorFraction: 2\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("Clusters.zzzzz.Containers.CloudVMs.SupervisorFraction:"),
            "{err}"
        );
    }
}
