//! The stub driver's knobs, read from `DriverParameters` so `simulate` and tests can set them
//! from a config file. Every bad value is an error naming `DriverParameters.<Key>`.

use std::collections::BTreeMap;
use std::time::Duration;

use cloud::CloudError;
use serde_json::Value;

/// Knobs of one stub instance set. Defaults: a perfect cloud.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StubConfig {
    /// How long after create a VM's commands answer "stub is booting" (`BootDelay`).
    pub boot_delay: Duration,
    /// Creates beyond this many live VMs are quota errors (`QuotaMaxInstances`).
    pub quota_max_instances: Option<usize>,
    /// Creates beyond this many live VMs of one provider type are type-specific capacity
    /// errors (`CapacityPerType: {providertype: N}`).
    pub capacity_per_type: BTreeMap<String, usize>,
    /// crunch-run commands fail with "not found" (`CrunchRunMissing`).
    pub crunch_run_missing: bool,
    /// Probability that a create / destroy call fails (`ErrorRateCreate`, `ErrorRateDestroy`).
    pub error_rate_create: f64,
    /// Probability that a create makes the VM and then fails with an unknown outcome, as a
    /// cloud's 5xx or lost answer does (`ErrorRateCreateAfterVm`).
    pub error_rate_create_after_vm: f64,
    /// Probability that a create makes the VM and then never answers (`HangRateCreateAfterVm`).
    pub hang_rate_create_after_vm: f64,
    /// Every cloud call (create, list, destroy) accepts and never answers, as a dead endpoint
    /// does (`HangCloudOps`).
    pub hang_cloud_ops: bool,
    pub error_rate_destroy: f64,
    /// Calls sooner than this after the previous accepted one are rate-limit errors
    /// (`MinTimeBetweenCreateCalls`, `MinTimeBetweenInstancesCalls`).
    pub min_time_between_create_calls: Duration,
    pub min_time_between_instances_calls: Duration,
    /// Create and destroy block until released (`HoldCloudOps`; see `StubSet::release_cloud_ops`).
    pub hold_cloud_ops: bool,
    /// After this long from create, every command exits 2 "cannot fork" (`BrokenAfter`).
    pub broken_after: Option<Duration>,
    /// After this long from create, `crunch-run --list` reports `broken` (`ReportBrokenAfter`).
    pub report_broken_after: Option<Duration>,
    /// Probability that a detached crunch-run dies mid-run without a final update (`CrashRate`).
    pub crash_rate: f64,
    /// After crunch-run exits, its lock lingers (`<uuid> stale` in `--list`) for a random time
    /// up to this (`StaleLockMaxLinger`)…
    pub stale_lock_max_linger: Duration,
    /// …or forever, with this probability (`StaleLockDeadlockRate`).
    pub stale_lock_deadlock_rate: f64,
    /// `--detach` answers only after this delay (`CrunchRunDetachDelay`).
    pub detach_delay: Duration,
    /// Seed of every random choice (`Seed`, default 0).
    pub seed: u64,
    /// VMs of these provider types created within this long of the instance set's start
    /// never boot (`BrokenTypesUntil: {providertype: 2s}`).
    pub broken_types_until: BTreeMap<String, Duration>,
    /// Creates of these provider types within this long of the instance set's start are
    /// type-specific capacity errors, as a cloud short of that type for a while
    /// (`ShortOfCapacityUntil: {providertype: 10m}`; `providertype-preemptible`: spot only;
    /// `providertype@zone`, `providertype-preemptible@zone`: in that zone only).
    pub short_of_capacity_until: BTreeMap<String, Duration>,
    /// The cloud's zones, as EC2's subnets (`Zones: [a, b, c]`; default none). A create not
    /// pinned to one tries them as Arvados' EC2 driver tries subnets: from the last zone that
    /// worked, on to the next after a capacity error, each try a launch of its own.
    pub zones: Vec<String>,
    /// After this long from create, commands never answer (`HangAfter`).
    pub hang_after: Option<Duration>,
    /// After this long from create, the cloud takes the VM away (a spot interruption): it
    /// leaves the instance list and its processes die (`VanishAfter`).
    pub vanish_after: Option<Duration>,
    /// With `VanishAfter`: this long before the VM vanishes, each crunch-run on it (and each
    /// started later) records a spot interruption notice in its container's `runtime_status`
    /// (`preemptionNotice`), as crunch-run does when EC2 announces a spot interruption
    /// (`InterruptionNotice`); from then on the VM also reports the notice itself to a set
    /// that watches (`Instance::interruption_notice`), as EC2's spot request status does.
    pub interruption_notice: Option<Duration>,
    /// VM-side knobs by creation count: VM number n gets `VmProfiles[n % len]` over the
    /// set's own knobs (`VmProfiles: [{CrunchRunMissing: true}, {HangAfter: 50ms}, …]`).
    pub vm_profiles: Vec<StubConfig>,
}

struct Params<'a>(&'a Value);

fn bad(key: &str, why: impl std::fmt::Display) -> CloudError {
    CloudError::other(format!("DriverParameters.{key}: {why}"))
}

impl Params<'_> {
    fn duration(&self, key: &str) -> Result<Option<Duration>, CloudError> {
        let Some(v) = self.0.get(key) else {
            return Ok(None);
        };
        let s = v
            .as_str()
            .ok_or_else(|| bad(key, "not a duration string"))?;
        arvados::config::units::parse_duration(s)
            .map(Some)
            .map_err(|e| bad(key, e))
    }

    fn rate(&self, key: &str) -> Result<f64, CloudError> {
        let Some(v) = self.0.get(key) else {
            return Ok(0.0);
        };
        match v.as_f64() {
            Some(r) if (0.0..=1.0).contains(&r) => Ok(r),
            _ => Err(bad(key, "not a number between 0 and 1")),
        }
    }

    fn count(&self, key: &str, v: Option<&Value>) -> Result<Option<usize>, CloudError> {
        v.map(|v| {
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| bad(key, "not a non-negative integer"))
        })
        .transpose()
    }

    fn flag(&self, key: &str) -> Result<bool, CloudError> {
        self.0.get(key).map_or(Ok(false), |v| {
            v.as_bool().ok_or_else(|| bad(key, "not a boolean"))
        })
    }
}

impl StubConfig {
    /// Read the knobs from `DriverParameters` (`null` or `{}` = defaults).
    pub fn from_params(params: &Value) -> Result<StubConfig, CloudError> {
        if !params.is_null() && !params.is_object() {
            return Err(CloudError::other("DriverParameters: not a map"));
        }
        let p = Params(params);
        let mut capacity_per_type = BTreeMap::new();
        if let Some(v) = params.get("CapacityPerType") {
            let m = v
                .as_object()
                .ok_or_else(|| bad("CapacityPerType", "not a map"))?;
            for (k, n) in m {
                let key = format!("CapacityPerType.{k}");
                capacity_per_type.insert(k.clone(), p.count(&key, Some(n))?.unwrap_or(0));
            }
        }
        let durations_by_type = |knob: &str| -> Result<BTreeMap<String, Duration>, CloudError> {
            let mut out = BTreeMap::new();
            if let Some(v) = params.get(knob) {
                let m = v.as_object().ok_or_else(|| bad(knob, "not a map"))?;
                for (k, d) in m {
                    let key = format!("{knob}.{k}");
                    let d = d
                        .as_str()
                        .ok_or_else(|| bad(&key, "not a duration string"))?;
                    let d = arvados::config::units::parse_duration(d).map_err(|e| bad(&key, e))?;
                    out.insert(k.clone(), d);
                }
            }
            Ok(out)
        };
        let broken_types_until = durations_by_type("BrokenTypesUntil")?;
        let short_of_capacity_until = durations_by_type("ShortOfCapacityUntil")?;
        let mut zones = Vec::new();
        if let Some(v) = params.get("Zones") {
            let list = v.as_array().ok_or_else(|| bad("Zones", "not a list"))?;
            for (i, z) in list.iter().enumerate() {
                match z.as_str() {
                    Some(z) if !z.is_empty() && !zones.iter().any(|k| k == z) => {
                        zones.push(z.to_string())
                    }
                    _ => return Err(bad(&format!("Zones.{i}"), "not a new, non-empty name")),
                }
            }
        }
        let mut vm_profiles = Vec::new();
        if let Some(v) = params.get("VmProfiles") {
            let list = v
                .as_array()
                .ok_or_else(|| bad("VmProfiles", "not a list"))?;
            for (i, profile) in list.iter().enumerate() {
                let Some(overrides) = profile.as_object() else {
                    return Err(bad(&format!("VmProfiles.{i}"), "not a map"));
                };
                let mut merged = params.as_object().cloned().unwrap_or_default();
                merged.remove("VmProfiles");
                merged.extend(overrides.clone());
                let c = StubConfig::from_params(&Value::Object(merged)).map_err(|e| {
                    CloudError::other(e.message.replacen(
                        "DriverParameters.",
                        &format!("DriverParameters.VmProfiles.{i}."),
                        1,
                    ))
                })?;
                vm_profiles.push(c);
            }
        }
        Ok(StubConfig {
            broken_types_until,
            short_of_capacity_until,
            zones,
            hang_after: p.duration("HangAfter")?,
            vanish_after: p.duration("VanishAfter")?,
            interruption_notice: p.duration("InterruptionNotice")?,
            vm_profiles,
            boot_delay: p.duration("BootDelay")?.unwrap_or_default(),
            quota_max_instances: p.count("QuotaMaxInstances", params.get("QuotaMaxInstances"))?,
            capacity_per_type,
            crunch_run_missing: p.flag("CrunchRunMissing")?,
            error_rate_create: p.rate("ErrorRateCreate")?,
            error_rate_create_after_vm: p.rate("ErrorRateCreateAfterVm")?,
            hang_rate_create_after_vm: p.rate("HangRateCreateAfterVm")?,
            hang_cloud_ops: p.flag("HangCloudOps")?,
            error_rate_destroy: p.rate("ErrorRateDestroy")?,
            min_time_between_create_calls: p
                .duration("MinTimeBetweenCreateCalls")?
                .unwrap_or_default(),
            min_time_between_instances_calls: p
                .duration("MinTimeBetweenInstancesCalls")?
                .unwrap_or_default(),
            hold_cloud_ops: p.flag("HoldCloudOps")?,
            broken_after: p.duration("BrokenAfter")?,
            report_broken_after: p.duration("ReportBrokenAfter")?,
            crash_rate: p.rate("CrashRate")?,
            stale_lock_max_linger: p.duration("StaleLockMaxLinger")?.unwrap_or_default(),
            stale_lock_deadlock_rate: p.rate("StaleLockDeadlockRate")?,
            detach_delay: p.duration("CrunchRunDetachDelay")?.unwrap_or_default(),
            seed: p.count("Seed", params.get("Seed"))?.unwrap_or(0) as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn knobs_parse_and_bad_values_name_their_key() {
        let c = StubConfig::from_params(&json!({
            "BootDelay": "2s", "QuotaMaxInstances": 3, "CapacityPerType": {"m5": 1},
            "ErrorRateCreate": 0.5, "MinTimeBetweenCreateCalls": "100ms", "HoldCloudOps": true,
            "BrokenAfter": "1m", "CrashRate": 0.1, "StaleLockDeadlockRate": 1, "Seed": 7,
            "ShortOfCapacityUntil": {"m5-preemptible": "10m"}, "Zones": ["a", "b"],
        }))
        .unwrap();
        assert_eq!(c.boot_delay, Duration::from_secs(2));
        assert_eq!(c.zones, ["a", "b"]);
        assert_eq!(c.quota_max_instances, Some(3));
        assert_eq!(c.capacity_per_type["m5"], 1);
        assert_eq!(c.error_rate_create, 0.5);
        assert_eq!(c.min_time_between_create_calls, Duration::from_millis(100));
        assert!(c.hold_cloud_ops);
        assert_eq!(c.broken_after, Some(Duration::from_secs(60)));
        assert_eq!(
            c.short_of_capacity_until["m5-preemptible"],
            Duration::from_secs(600)
        );
        assert_eq!(
            (c.crash_rate, c.stale_lock_deadlock_rate, c.seed),
            (0.1, 1.0, 7)
        );
        assert_eq!(
            StubConfig::from_params(&Value::Null).unwrap(),
            StubConfig::default()
        );
        for (params, key) in [
            (
                json!({"ErrorRateCreate": 2}),
                "DriverParameters.ErrorRateCreate",
            ),
            (json!({"BootDelay": "soon"}), "DriverParameters.BootDelay"),
            (
                json!({"CapacityPerType": {"m5": -1}}),
                "DriverParameters.CapacityPerType.m5",
            ),
            (
                json!({"HoldCloudOps": "yes"}),
                "DriverParameters.HoldCloudOps",
            ),
            (
                json!({"ShortOfCapacityUntil": {"m5": "later"}}),
                "DriverParameters.ShortOfCapacityUntil.m5",
            ),
            (
                json!({"ShortOfCapacityUntil": ["m5"]}),
                "DriverParameters.ShortOfCapacityUntil",
            ),
            (json!({"Zones": "a"}), "DriverParameters.Zones"),
            (json!({"Zones": ["a", "a"]}), "DriverParameters.Zones.1"),
            (json!({"Zones": ["a", 3]}), "DriverParameters.Zones.1"),
        ] {
            let e = StubConfig::from_params(&params).unwrap_err().to_string();
            assert!(e.starts_with(key), "{e}");
        }
    }
}
