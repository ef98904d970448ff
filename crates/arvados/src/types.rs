//! Arvados API records as a dispatcher reads them: containers, container lists and API tokens.
//!
//! Every field has a default, so partial (`select=…`) responses decode; unknown fields are
//! ignored; `null` decodes as the field's empty value (Rails sends null where the Go controller
//! sends `""` or `0`, and clients must not care).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

/// Container states (`arvados-api-contract.md` A.2.1).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub enum ContainerState {
    /// Waiting for a dispatcher.
    #[default]
    Queued,
    /// Taken by a dispatcher (`locked_by_uuid`), not started yet.
    Locked,
    /// crunch-run has started it.
    Running,
    /// Finished (successfully or not: see `exit_code`).
    Complete,
    /// Will not run (any more).
    Cancelled,
}

impl ContainerState {
    /// The state as the API spells it.
    ///
    /// ```
    /// use arvados::ContainerState;
    ///
    /// assert_eq!(ContainerState::Running.as_str(), "Running");
    /// let s: ContainerState = serde_json::from_str("\"Locked\"").unwrap();
    /// assert_eq!(s, ContainerState::Locked);
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerState::Queued => "Queued",
            ContainerState::Locked => "Locked",
            ContainerState::Running => "Running",
            ContainerState::Complete => "Complete",
            ContainerState::Cancelled => "Cancelled",
        }
    }

    /// Complete and Cancelled never change again (except Complete→Cancelled by an admin).
    pub fn is_final(self) -> bool {
        matches!(self, ContainerState::Complete | ContainerState::Cancelled)
    }
}

impl std::fmt::Display for ContainerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container record. Fields not selected in a request keep their defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Container {
    /// The API record's `uuid` field.
    #[serde(deserialize_with = "nullable")]
    pub uuid: String,
    /// The API record's `owner_uuid` field.
    #[serde(deserialize_with = "nullable")]
    pub owner_uuid: String,
    /// The API record's `state` field.
    #[serde(deserialize_with = "nullable")]
    pub state: ContainerState,
    /// The API record's `priority` field.
    #[serde(deserialize_with = "nullable")]
    pub priority: i64,
    /// The API record's `locked_by_uuid` field.
    #[serde(deserialize_with = "nullable")]
    pub locked_by_uuid: String,
    /// The API record's `lock_count` field.
    #[serde(deserialize_with = "nullable")]
    pub lock_count: i64,
    /// The API record's `auth_uuid` field.
    #[serde(deserialize_with = "nullable")]
    pub auth_uuid: String,
    /// The API record's `container_image` field.
    #[serde(deserialize_with = "nullable")]
    pub container_image: String,
    /// The API record's `command` field.
    #[serde(deserialize_with = "nullable")]
    pub command: Vec<String>,
    /// The API record's `cwd` field.
    #[serde(deserialize_with = "nullable")]
    pub cwd: String,
    /// The API record's `environment` field.
    #[serde(deserialize_with = "nullable")]
    pub environment: BTreeMap<String, String>,
    /// The API record's `output_path` field.
    #[serde(deserialize_with = "nullable")]
    pub output_path: String,
    /// The API record's `mounts` field.
    #[serde(deserialize_with = "nullable")]
    pub mounts: BTreeMap<String, Mount>,
    /// The API record's `runtime_constraints` field.
    #[serde(deserialize_with = "nullable")]
    pub runtime_constraints: RuntimeConstraints,
    /// The API record's `scheduling_parameters` field.
    #[serde(deserialize_with = "nullable")]
    pub scheduling_parameters: SchedulingParameters,
    /// The API record's `runtime_status` field.
    #[serde(deserialize_with = "nullable")]
    pub runtime_status: serde_json::Map<String, serde_json::Value>,
    /// The API record's `runtime_user_uuid` field.
    #[serde(deserialize_with = "nullable")]
    pub runtime_user_uuid: String,
    /// The API record's `exit_code` field.
    pub exit_code: Option<i64>,
    /// The API record's `log` field.
    #[serde(deserialize_with = "nullable")]
    pub log: String,
    /// The API record's `output` field.
    #[serde(deserialize_with = "nullable")]
    pub output: String,
    /// The API record's `progress` field.
    #[serde(deserialize_with = "nullable")]
    pub progress: f64,
    /// The API record's `cost` field.
    #[serde(deserialize_with = "nullable")]
    pub cost: f64,
    /// The API record's `gateway_address` field.
    #[serde(deserialize_with = "nullable")]
    pub gateway_address: String,
    /// The API record's `created_at` field.
    pub created_at: Option<DateTime<Utc>>,
    /// The API record's `modified_at` field.
    pub modified_at: Option<DateTime<Utc>>,
    /// The API record's `started_at` field.
    pub started_at: Option<DateTime<Utc>>,
    /// The API record's `finished_at` field.
    pub finished_at: Option<DateTime<Utc>>,
}

/// `runtime_constraints`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeConstraints {
    /// The API record's `API` field.
    #[serde(rename = "API", deserialize_with = "nullable")]
    pub api: bool,
    /// The API record's `ram` field.
    #[serde(deserialize_with = "nullable")]
    pub ram: i64,
    /// The API record's `vcpus` field.
    #[serde(deserialize_with = "nullable")]
    pub vcpus: i64,
    /// The API record's `keep_cache_ram` field.
    #[serde(deserialize_with = "nullable")]
    pub keep_cache_ram: i64,
    /// The API record's `keep_cache_disk` field.
    #[serde(deserialize_with = "nullable")]
    pub keep_cache_disk: i64,
    /// The API record's `gpu` field.
    #[serde(deserialize_with = "nullable")]
    pub gpu: GpuConstraints,
}

/// `runtime_constraints.gpu`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuConstraints {
    /// The API record's `device_count` field.
    #[serde(deserialize_with = "nullable")]
    pub device_count: i64,
    /// The API record's `driver_version` field.
    #[serde(deserialize_with = "nullable")]
    pub driver_version: String,
    /// The API record's `hardware_target` field.
    #[serde(deserialize_with = "nullable")]
    pub hardware_target: Vec<String>,
    /// The API record's `stack` field.
    #[serde(deserialize_with = "nullable")]
    pub stack: String,
    /// Per-GPU memory in bytes.
    #[serde(deserialize_with = "nullable")]
    pub vram: i64,
}

/// `scheduling_parameters`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulingParameters {
    /// The API record's `partitions` field.
    #[serde(deserialize_with = "nullable")]
    pub partitions: Vec<String>,
    /// The API record's `preemptible` field.
    #[serde(deserialize_with = "nullable")]
    pub preemptible: bool,
    /// The API record's `max_run_time` field.
    #[serde(deserialize_with = "nullable")]
    pub max_run_time: i64,
    /// The API record's `supervisor` field.
    #[serde(deserialize_with = "nullable")]
    pub supervisor: bool,
}

/// One entry of `mounts`. The dispatcher only needs `kind` and `capacity` (tmp mounts).
/// Only a JSON object (or null) decodes: serde would otherwise take an array field by field,
/// and a malformed mount must be reported (the dispatcher cancels such containers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, try_from = "MountObject")]
pub struct Mount {
    /// The API record's `kind` field.
    #[serde(deserialize_with = "nullable")]
    pub kind: String,
    /// The API record's `writable` field.
    #[serde(deserialize_with = "nullable")]
    pub writable: bool,
    /// The API record's `portable_data_hash` field.
    #[serde(deserialize_with = "nullable")]
    pub portable_data_hash: String,
    /// The API record's `uuid` field.
    #[serde(deserialize_with = "nullable")]
    pub uuid: String,
    /// The API record's `device_type` field.
    #[serde(deserialize_with = "nullable")]
    pub device_type: String,
    /// The API record's `path` field.
    #[serde(deserialize_with = "nullable")]
    pub path: String,
    /// The API record's `content` field.
    pub content: Option<serde_json::Value>,
    /// The API record's `exclude_from_output` field.
    #[serde(deserialize_with = "nullable")]
    pub exclude_from_output: bool,
    /// The API record's `capacity` field.
    #[serde(deserialize_with = "nullable")]
    pub capacity: i64,
}

/// A page of `GET /arvados/v1/containers`.
///
/// One record that does not decode (an unknown `state`, a field of the wrong type) does not
/// fail the page: it is left out of `items`, logged, and its uuid (if it has one) is listed in
/// `skipped`, so a caller can keep what it knew of that container instead of taking it as gone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, from = "RawContainerList")]
pub struct ContainerList {
    /// The API record's `items` field.
    pub items: Vec<Container>,
    /// Present only with `count=exact`.
    pub items_available: Option<i64>,
    /// The API record's `offset` field.
    pub offset: i64,
    /// The API record's `limit` field.
    pub limit: i64,
    /// Uuids of records that could not be decoded (`""` for one without a readable uuid).
    #[serde(skip)]
    pub skipped: Vec<String>,
    /// The uuid of the page's last record, decoded or not (for paging by uuid).
    #[serde(skip)]
    pub last_uuid: Option<String>,
    /// How many records the page held, decoded or not.
    #[serde(skip)]
    pub raw_len: usize,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct RawContainerList {
    #[serde(deserialize_with = "nullable")]
    items: Vec<serde_json::Value>,
    items_available: Option<i64>,
    #[serde(deserialize_with = "nullable")]
    offset: i64,
    #[serde(deserialize_with = "nullable")]
    limit: i64,
}

impl From<RawContainerList> for ContainerList {
    fn from(raw: RawContainerList) -> Self {
        let uuid_of =
            |v: &serde_json::Value| v.get("uuid").and_then(|u| u.as_str()).map(str::to_string);
        let raw_len = raw.items.len();
        let last_uuid = raw.items.last().and_then(uuid_of);
        let mut items = Vec::with_capacity(raw_len);
        let mut skipped = Vec::new();
        for v in raw.items {
            let uuid = uuid_of(&v);
            match Container::deserialize(v) {
                Ok(c) => items.push(c),
                Err(e) => {
                    let uuid = uuid.unwrap_or_default();
                    tracing::warn!(ContainerUUID = %uuid, error = %e, "skipping container record that cannot be decoded");
                    skipped.push(uuid);
                }
            }
        }
        ContainerList {
            items,
            items_available: raw.items_available,
            offset: raw.offset,
            limit: raw.limit,
            skipped,
            last_uuid,
            raw_len,
        }
    }
}

/// `GET /arvados/v1/api_client_authorizations/current`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiClientAuthorization {
    /// The API record's `uuid` field.
    #[serde(deserialize_with = "nullable")]
    pub uuid: String,
    /// The secret part only. Never log it.
    #[serde(deserialize_with = "nullable", skip_serializing)]
    pub api_token: String,
    /// The API record's `owner_uuid` field.
    #[serde(deserialize_with = "nullable")]
    pub owner_uuid: String,
    /// The API record's `scopes` field.
    #[serde(deserialize_with = "nullable")]
    pub scopes: Vec<String>,
    /// The API record's `expires_at` field.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Decode `null` as the type's default.
/// The wire form of [`Mount`]: an object (or null), never an array.
#[derive(Deserialize)]
struct MountObject(Option<serde_json::Map<String, serde_json::Value>>);

impl TryFrom<MountObject> for Mount {
    type Error = String;

    fn try_from(m: MountObject) -> Result<Self, Self::Error> {
        #[derive(Deserialize)]
        #[serde(default)]
        struct Fields {
            #[serde(deserialize_with = "nullable")]
            kind: String,
            #[serde(deserialize_with = "nullable")]
            writable: bool,
            #[serde(deserialize_with = "nullable")]
            portable_data_hash: String,
            #[serde(deserialize_with = "nullable")]
            uuid: String,
            #[serde(deserialize_with = "nullable")]
            device_type: String,
            #[serde(deserialize_with = "nullable")]
            path: String,
            content: Option<serde_json::Value>,
            #[serde(deserialize_with = "nullable")]
            exclude_from_output: bool,
            #[serde(deserialize_with = "nullable")]
            capacity: i64,
        }
        impl Default for Fields {
            fn default() -> Self {
                let m = Mount::default();
                Fields {
                    kind: m.kind,
                    writable: m.writable,
                    portable_data_hash: m.portable_data_hash,
                    uuid: m.uuid,
                    device_type: m.device_type,
                    path: m.path,
                    content: m.content,
                    exclude_from_output: m.exclude_from_output,
                    capacity: m.capacity,
                }
            }
        }
        let f: Fields = serde_json::from_value(serde_json::Value::Object(m.0.unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        Ok(Mount {
            kind: f.kind,
            writable: f.writable,
            portable_data_hash: f.portable_data_hash,
            uuid: f.uuid,
            device_type: f.device_type,
            path: f.path,
            content: f.content,
            exclude_from_output: f.exclude_from_output,
            capacity: f.capacity,
        })
    }
}

fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_record_is_skipped_not_fatal_to_the_page() {
        let page: ContainerList = serde_json::from_str(
            r#"{"items":[
                {"uuid":"zzzzz-dz642-000000000000001","state":"Queued","priority":1},
                {"uuid":"zzzzz-dz642-000000000000002","state":"Paused"},
                {"uuid":"zzzzz-dz642-000000000000003","priority":"high"},
                {"state":"Running","priority":[]},
                {"uuid":"zzzzz-dz642-000000000000005","state":"Running"}
            ],"limit":5}"#,
        )
        .unwrap();
        let uuids: Vec<&str> = page.items.iter().map(|c| c.uuid.as_str()).collect();
        assert_eq!(
            uuids,
            ["zzzzz-dz642-000000000000001", "zzzzz-dz642-000000000000005"]
        );
        assert_eq!(
            page.skipped,
            [
                "zzzzz-dz642-000000000000002",
                "zzzzz-dz642-000000000000003",
                ""
            ]
        );
        assert_eq!(page.raw_len, 5);
        assert_eq!(
            page.last_uuid.as_deref(),
            Some("zzzzz-dz642-000000000000005")
        );
        assert_eq!(page.limit, 5);
    }

    #[test]
    fn decodes_contract_example_and_nulls() {
        let j = r#"{"kind":"arvados#container","uuid":"zzzzz-dz642-queuedcontainer","state":"Queued",
          "priority":1125898203478111744,"created_at":"2024-05-01T12:00:00.123456000Z",
          "container_image":"fa3c1a9cb6783f85f2ecda037e07b8c3+167","locked_by_uuid":null,
          "exit_code":null,"unknown_field":{"a":1},
          "runtime_constraints":{"API":false,"gpu":{"device_count":0,"driver_version":"","hardware_target":[],"stack":"","vram":0},
            "keep_cache_disk":2147483648,"keep_cache_ram":0,"ram":1073741824,"vcpus":1},
          "scheduling_parameters":{"max_run_time":0,"partitions":[],"preemptible":false,"supervisor":false}}"#;
        let c: Container = serde_json::from_str(j).unwrap();
        assert_eq!(c.priority, 1_125_898_203_478_111_744);
        assert_eq!(c.state, ContainerState::Queued);
        assert_eq!(c.locked_by_uuid, "");
        assert_eq!(c.exit_code, None);
        assert_eq!(c.runtime_constraints.keep_cache_disk, 2 << 30);
        assert_eq!(
            c.created_at.unwrap().timestamp_nanos_opt(),
            Some(1_714_564_800_123_456_000)
        );
    }

    #[test]
    fn wrong_types_fail_to_decode() {
        let err = serde_json::from_str::<Container>(r#"{"runtime_constraints":{"vcpus":1.5}}"#);
        assert!(err.is_err());
        let err = serde_json::from_str::<Container>(r#"{"state":"Exploded"}"#);
        assert!(err.is_err());
    }
}
