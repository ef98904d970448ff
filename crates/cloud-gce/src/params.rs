//! `DriverParameters` of the GCE driver (names ours; annotated in `config/gce.yml`). Every bad
//! value is an error naming `DriverParameters.<Key>`.

use std::collections::BTreeMap;
use std::time::Duration;

use cloud::CloudError;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct GceParams {
    pub project: String,
    /// Zones to create in, tried in order; a capacity error in one moves to the next.
    pub zones: Vec<String>,
    /// Base URL override (tests, private endpoints), e.g. `http://127.0.0.1:PORT`.
    pub endpoint: Option<String>,
    /// No credentials at all (fakes and tests).
    pub anonymous_credentials: bool,
    /// Service-account key JSON file; empty: Application Default Credentials.
    pub credentials_file: String,
    pub network: String,
    pub subnetwork: String,
    pub service_account: String,
    pub scopes: Vec<String>,
    /// Boot disk type (`pd-balanced`, `pd-ssd`, …).
    pub disk_type: String,
    /// Boot disk size; 0: the image's size plus the type's scratch.
    pub boot_disk_size_gb: i64,
    /// Local SSDs (375 GB each) on every VM, for scratch.
    pub local_ssds: u32,
    pub use_public_ip: bool,
    pub network_tags: Vec<String>,
    /// Extra labels on every VM.
    pub labels: BTreeMap<String, String>,
    /// `ProviderType` → GPU accelerator type (e.g. `n1-standard-8` → `nvidia-tesla-t4`), for
    /// types whose GPUs are not built into the machine type.
    pub accelerator_types: BTreeMap<String, String>,
    /// The SSH user the dispatcher logs in as.
    pub admin_username: String,
    /// VM names are this prefix and a random suffix.
    pub instance_name_prefix: String,
    /// How long a (type, zone) is skipped after a capacity error there.
    pub zone_capacity_hold_off: Duration,
}

fn bad(key: &str, why: impl std::fmt::Display) -> CloudError {
    CloudError::other(format!("DriverParameters.{key}: {why}"))
}

fn string(p: &Value, key: &str, default: &str) -> Result<String, CloudError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(key, "not a string")),
    }
}

fn strings(p: &Value, key: &str) -> Result<Vec<String>, CloudError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| bad(key, "list entries must be strings"))
            })
            .collect(),
        Some(Value::Object(m)) => Ok(m.keys().cloned().collect()),
        Some(_) => Err(bad(key, "must be a string or a list of strings")),
    }
}

fn map(p: &Value, key: &str) -> Result<BTreeMap<String, String>, CloudError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                v.as_str()
                    .map(|s| (k.clone(), s.to_string()))
                    .ok_or_else(|| bad(&format!("{key}.{k}"), "not a string"))
            })
            .collect(),
        Some(_) => Err(bad(key, "not a map")),
    }
}

fn boolean(p: &Value, key: &str) -> Result<bool, CloudError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(key, "not true or false")),
    }
}

fn integer(p: &Value, key: &str) -> Result<i64, CloudError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_i64()
            .filter(|n| *n >= 0)
            .ok_or_else(|| bad(key, "not a whole number ≥ 0")),
    }
}

/// A GCE label: lower-case letters, digits, `_` and `-`, starting with a letter, ≤ 63.
pub fn is_label_key(k: &str) -> bool {
    k.len() <= 63
        && k.starts_with(|c: char| c.is_ascii_lowercase())
        && k.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl GceParams {
    pub fn from_params(p: &Value) -> Result<GceParams, CloudError> {
        if !p.is_null() && !p.is_object() {
            return Err(CloudError::other("DriverParameters: not a map"));
        }
        let project = string(p, "Project", "")?;
        if project.is_empty() {
            return Err(bad("Project", "required"));
        }
        let zones = strings(p, "Zones")?;
        if zones.is_empty() {
            return Err(bad("Zones", "required: the zones to create VMs in"));
        }
        let endpoint = string(p, "Endpoint", "")?;
        if !endpoint.is_empty() && url::Url::parse(&endpoint).is_err() {
            return Err(bad("Endpoint", format!("not a URL: {endpoint:?}")));
        }
        let labels = map(p, "Labels")?;
        for k in labels.keys() {
            if !is_label_key(k) {
                return Err(bad(
                    &format!("Labels.{k}"),
                    "GCE label keys are lower-case letters, digits, _ and -, starting with a letter",
                ));
            }
        }
        let hold = match p.get("ZoneCapacityHoldOff") {
            None | Some(Value::Null) => Duration::from_secs(60),
            Some(Value::String(s)) => arvados::config::units::parse_duration(s)
                .map_err(|e| bad("ZoneCapacityHoldOff", e))?,
            Some(_) => return Err(bad("ZoneCapacityHoldOff", "not a duration string")),
        };
        let prefix = string(p, "InstanceNamePrefix", "arvados-")?;
        if !prefix.is_empty() && (!is_label_key(&prefix) || prefix.len() > 40) {
            return Err(bad(
                "InstanceNamePrefix",
                "lower-case letters, digits and -, starting with a letter, at most 40",
            ));
        }
        let local_ssds = integer(p, "LocalSSDs")?;
        Ok(GceParams {
            project,
            zones,
            endpoint: (!endpoint.is_empty()).then(|| endpoint.trim_end_matches('/').to_string()),
            anonymous_credentials: boolean(p, "AnonymousCredentials")?,
            credentials_file: string(p, "CredentialsFile", "")?,
            network: string(p, "Network", "")?,
            subnetwork: string(p, "Subnetwork", "")?,
            service_account: string(p, "ServiceAccount", "")?,
            scopes: strings(p, "Scopes")?,
            disk_type: string(p, "DiskType", "pd-balanced")?,
            boot_disk_size_gb: integer(p, "BootDiskSizeGB")?,
            local_ssds: u32::try_from(local_ssds).map_err(|_| bad("LocalSSDs", "too many"))?,
            use_public_ip: boolean(p, "UsePublicIP")?,
            network_tags: strings(p, "NetworkTags")?,
            labels,
            accelerator_types: map(p, "AcceleratorTypes")?,
            admin_username: string(p, "AdminUsername", "crunch")?,
            instance_name_prefix: if prefix.is_empty() {
                "arvados-".into()
            } else {
                prefix
            },
            zone_capacity_hold_off: hold,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn required_keys_and_bad_values_name_the_key() {
        let err = |v: Value| GceParams::from_params(&v).unwrap_err().to_string();
        assert!(err(json!({"Zones": ["a"]})).starts_with("DriverParameters.Project: "));
        assert!(err(json!({"Project": "p"})).starts_with("DriverParameters.Zones: "));
        assert!(
            err(json!({"Project": "p", "Zones": "z", "Labels": {"Bad Key": "x"}}))
                .starts_with("DriverParameters.Labels.Bad Key: ")
        );
        assert!(
            err(json!({"Project": "p", "Zones": "z", "UsePublicIP": "yes"}))
                .starts_with("DriverParameters.UsePublicIP: ")
        );
        assert!(
            err(json!({"Project": "p", "Zones": "z", "Endpoint": "not a url"}))
                .starts_with("DriverParameters.Endpoint: ")
        );
    }

    #[test]
    fn defaults() {
        let p = GceParams::from_params(&json!({
            "Project": "p", "Zones": ["us-central1-a", "us-central1-b"],
            "Endpoint": "http://127.0.0.1:1234/", "AnonymousCredentials": true,
        }))
        .unwrap();
        assert_eq!(p.zones, ["us-central1-a", "us-central1-b"]);
        assert_eq!(p.endpoint.as_deref(), Some("http://127.0.0.1:1234"));
        assert!(p.anonymous_credentials);
        assert_eq!(p.disk_type, "pd-balanced");
        assert_eq!(p.instance_name_prefix, "arvados-");
        assert_eq!(p.zone_capacity_hold_off, Duration::from_secs(60));
        assert_eq!(p.admin_username, "crunch");
    }

    /// The annotated example operators start from loads, and its DriverParameters are valid.
    #[test]
    fn config_gce_yml_is_a_valid_example() {
        let cluster = arvados::config::load_cluster_from_str(
            include_str!("../../../config/gce.yml"),
            "config/gce.yml",
            None,
        )
        .unwrap();
        assert_eq!(cluster.containers.cloud_vms.driver, "gce");
        let params = serde_json::to_value(&cluster.containers.cloud_vms.driver_parameters).unwrap();
        let p = GceParams::from_params(&params).unwrap();
        assert_eq!(p.project, "my-project");
        assert_eq!(p.zones.len(), 3);
        assert_eq!(p.accelerator_types["n1-standard-8"], "nvidia-tesla-t4");
        assert_eq!(p.labels["cost-center"], "genomics");
        assert!(p.endpoint.is_none() && !p.anonymous_credentials);
        let gpu = &cluster.instance_types["n1-standard-8-t4"];
        assert_eq!(
            (gpu.provider_type.as_str(), gpu.gpu.device_count),
            ("n1-standard-8", 1)
        );
    }
}
