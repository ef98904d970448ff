//! The Arvados cluster configuration as the dispatcher reads it.
//!
//! Owns: the typed structs for every key the dispatcher uses (spec Appendix A), their defaults
//! (equal to Arvados' `config.default.yml`, checked by a test against the real file), and the
//! loader (`load`) that finds the file, picks the cluster, and reports bad values with their
//! full key path. Keys the dispatcher does not use are accepted and ignored.
//! `DriverParameters` stays raw YAML: each cloud driver parses its own.

mod load;
pub mod units;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

pub use load::{ConfigError, ConfigSource, load_cluster, load_cluster_from_str};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// One cluster's configuration (`Clusters.<id>`). `Debug` shows it with secrets redacted.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Cluster {
    /// The cluster map key (5 characters); set by the loader, not read from the file.
    #[serde(rename = "ClusterID", skip_deserializing)]
    pub cluster_id: String,
    /// The cluster config key `SystemRootToken`.
    #[serde(rename = "SystemRootToken")]
    pub system_root_token: String,
    /// The cluster config key `ManagementToken`.
    #[serde(rename = "ManagementToken")]
    pub management_token: String,
    /// The cluster config key `Services`.
    #[serde(rename = "Services")]
    pub services: Services,
    /// The cluster config key `PostgreSQL`.
    #[serde(rename = "PostgreSQL")]
    pub postgresql: PostgreSql,
    /// The cluster config key `API`.
    #[serde(rename = "API")]
    pub api: Api,
    /// The cluster config key `TLS`.
    #[serde(rename = "TLS")]
    pub tls: Tls,
    /// The cluster config key `SystemLogs`.
    #[serde(rename = "SystemLogs")]
    pub system_logs: SystemLogs,
    /// The cluster config key `Containers`.
    #[serde(rename = "Containers")]
    pub containers: Containers,
    /// Keyed by the Arvados instance type name.
    #[serde(rename = "InstanceTypes", deserialize_with = "instance_type_map")]
    pub instance_types: BTreeMap<String, InstanceType>,
    /// The operator's whole `Clusters.<id>` tree as loaded (SAMPLE entries and nulls dropped,
    /// DriverParameters merged over defaults), including keys this struct does not model
    /// (`Volumes`, `Collections`, …). Set by the loader; empty for a built config.
    #[serde(skip)]
    pub raw: RawTree,
}

/// The operator's config tree. Not part of a config's identity (two configs compare equal
/// whatever their raw trees), and its `Debug` shows only its size: it holds secrets.
#[derive(Clone, Default)]
pub struct RawTree(pub serde_norway::Value);

impl PartialEq for RawTree {
    fn eq(&self, _: &RawTree) -> bool {
        true
    }
}

impl std::fmt::Debug for RawTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.0.as_mapping().map_or(0, |m| m.len());
        write!(f, "RawTree({keys} top-level keys)")
    }
}

/// `Services`: only the entries the dispatcher uses are typed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Services {
    /// The cluster config key `Services.Controller`.
    #[serde(rename = "Controller")]
    pub controller: Service,
    /// The cluster config key `Services.DispatchCloud`.
    #[serde(rename = "DispatchCloud")]
    pub dispatch_cloud: Service,
    /// The cluster config key `Services.DispatchSLURM`.
    #[serde(rename = "DispatchSLURM")]
    pub dispatch_slurm: Service,
}

/// One service's entry in `Services` (`InternalURLs`, `ExternalURL`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Service {
    /// Keyed by internal URL.
    #[serde(rename = "InternalURLs", deserialize_with = "url_keyed_map")]
    pub internal_urls: BTreeMap<String, ServiceInstance>,
    /// The cluster config key `Services.<service>.ExternalURL`.
    #[serde(rename = "ExternalURL", deserialize_with = "optional_url")]
    pub external_url: String,
}

/// One `InternalURLs` entry of a service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceInstance {
    /// The cluster config key `Services.<service>.InternalURLs.<url>.ListenURL`.
    #[serde(rename = "ListenURL", deserialize_with = "optional_url")]
    pub listen_url: String,
}

/// `PostgreSQL`. `Debug` redacts the password.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostgreSql {
    /// libpq-style connection parameters (`host`, `port`, `user`, `password`, `dbname`, …).
    #[serde(rename = "Connection", deserialize_with = "string_map")]
    pub connection: BTreeMap<String, String>,
    /// The cluster config key `PostgreSQL.ConnectionPool`.
    #[serde(rename = "ConnectionPool")]
    pub connection_pool: i64,
}

impl Default for PostgreSql {
    fn default() -> Self {
        let connection = ["host", "port", "user", "password", "dbname"]
            .into_iter()
            .map(|k| (k.to_string(), String::new()))
            .collect();
        PostgreSql {
            connection,
            connection_pool: 32,
        }
    }
}

impl PostgreSql {
    /// True when a database is configured, so the single-dispatcher lock must be taken.
    pub fn is_configured(&self) -> bool {
        self.connection.values().any(|v| !v.is_empty())
    }
}

/// `API`: limits of the API server that clients adapt to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Api {
    /// The cluster config key `API.MaxConcurrentRequests`.
    #[serde(rename = "MaxConcurrentRequests")]
    pub max_concurrent_requests: i64,
    /// The cluster config key `API.MaxItemsPerResponse`.
    #[serde(rename = "MaxItemsPerResponse")]
    pub max_items_per_response: i64,
    /// The cluster config key `API.RequestTimeout`.
    #[serde(rename = "RequestTimeout", with = "units::duration")]
    pub request_timeout: Duration,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            max_concurrent_requests: 64,
            max_items_per_response: 1000,
            request_timeout: secs(300),
        }
    }
}

/// `TLS`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tls {
    /// The cluster config key `TLS.Insecure`.
    #[serde(rename = "Insecure")]
    pub insecure: bool,
}

/// `SystemLogs`: how services log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SystemLogs {
    /// The cluster config key `SystemLogs.Format`.
    #[serde(rename = "Format")]
    pub format: String,
    /// The cluster config key `SystemLogs.LogLevel`.
    #[serde(rename = "LogLevel")]
    pub log_level: String,
}

impl Default for SystemLogs {
    fn default() -> Self {
        SystemLogs {
            format: "json".into(),
            log_level: "info".into(),
        }
    }
}

/// `Containers` (spec Appendix A.2). `Debug` redacts the dispatch key and driver secrets.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Containers {
    /// The cluster config key `Containers.CrunchRunCommand`.
    #[serde(rename = "CrunchRunCommand")]
    pub crunch_run_command: String,
    /// The cluster config key `Containers.CrunchRunArgumentsList`.
    #[serde(rename = "CrunchRunArgumentsList")]
    pub crunch_run_arguments_list: Vec<String>,
    /// The cluster config key `Containers.RuntimeEngine`.
    #[serde(rename = "RuntimeEngine")]
    pub runtime_engine: String,
    /// PEM text, or `file:///abs/path`. Secret: never logged.
    #[serde(rename = "DispatchPrivateKey")]
    pub dispatch_private_key: String,
    /// The cluster config key `Containers.StaleLockTimeout`.
    #[serde(rename = "StaleLockTimeout", with = "units::duration")]
    pub stale_lock_timeout: Duration,
    /// The cluster config key `Containers.ReserveExtraRAM`.
    #[serde(rename = "ReserveExtraRAM", with = "units::byte_size")]
    pub reserve_extra_ram: i64,
    /// The cluster config key `Containers.LocalKeepBlobBuffersPerVCPU`.
    #[serde(rename = "LocalKeepBlobBuffersPerVCPU")]
    pub local_keep_blob_buffers_per_vcpu: i64,
    /// The cluster config key `Containers.MaximumPriceFactor`.
    #[serde(rename = "MaximumPriceFactor")]
    pub maximum_price_factor: f64,
    /// The cluster config key `Containers.PreemptiblePriceFactor`.
    #[serde(rename = "PreemptiblePriceFactor")]
    pub preemptible_price_factor: f64,
    /// The cluster config key `Containers.AlwaysUsePreemptibleInstances`.
    #[serde(rename = "AlwaysUsePreemptibleInstances")]
    pub always_use_preemptible_instances: bool,
    /// The cluster config key `Containers.MaxDispatchAttempts`.
    #[serde(rename = "MaxDispatchAttempts")]
    pub max_dispatch_attempts: i64,
    /// The cluster config key `Containers.DefaultKeepCacheRAM`.
    #[serde(rename = "DefaultKeepCacheRAM", with = "units::byte_size")]
    pub default_keep_cache_ram: i64,
    /// The cluster config key `Containers.MinRetryPeriod`.
    #[serde(rename = "MinRetryPeriod", with = "units::duration")]
    pub min_retry_period: Duration,
    /// The cluster config key `Containers.CloudVMs`.
    #[serde(rename = "CloudVMs")]
    pub cloud_vms: CloudVms,
    /// The cluster config key `Containers.SLURM`.
    #[serde(rename = "SLURM")]
    pub slurm: Slurm,
}

impl Default for Containers {
    fn default() -> Self {
        Containers {
            crunch_run_command: "crunch-run".into(),
            crunch_run_arguments_list: Vec::new(),
            runtime_engine: "docker".into(),
            dispatch_private_key: String::new(),
            stale_lock_timeout: secs(60),
            reserve_extra_ram: 550 << 20,
            local_keep_blob_buffers_per_vcpu: 1,
            maximum_price_factor: 1.5,
            preemptible_price_factor: 0.0,
            always_use_preemptible_instances: false,
            max_dispatch_attempts: 10,
            default_keep_cache_ram: 0,
            min_retry_period: Duration::ZERO,
            cloud_vms: CloudVms::default(),
            slurm: Slurm::default(),
        }
    }
}

/// `Containers.SLURM`: crunch-dispatch-slurm's settings.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Slurm {
    /// Nice spacing between adjacent jobs; values below 1 mean 10.
    #[serde(rename = "PrioritySpread")]
    pub priority_spread: i64,
    /// The sbatch argument template (`%U`, `%C`, `%M`, `%T`, `%G`, `%W`, `%P`, `%I`, `%%`).
    /// A YAML null is an empty list (just the fixed arguments), as in Arvados.
    #[serde(
        rename = "SbatchArgumentsList",
        deserialize_with = "null_as_empty_list"
    )]
    pub sbatch_arguments_list: Vec<String>,
    /// Appended to the template for containers that want GPUs.
    #[serde(
        rename = "SbatchGPUArgumentsList",
        deserialize_with = "null_as_empty_list"
    )]
    pub sbatch_gpu_arguments_list: Vec<String>,
    /// Put into every job's environment. May hold secrets: `Debug` shows only the names.
    #[serde(rename = "SbatchEnvironmentVariables", deserialize_with = "string_map")]
    pub sbatch_environment_variables: BTreeMap<String, String>,
}

impl Default for Slurm {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect();
        Slurm {
            priority_spread: 0,
            sbatch_arguments_list: s(&[
                "--job-name=%U",
                "--mem=%M",
                "--cpus-per-task=%C",
                "--tmp=%T",
                "--partition=%P",
            ]),
            sbatch_gpu_arguments_list: s(&["--gpus=%G"]),
            sbatch_environment_variables: BTreeMap::new(),
        }
    }
}

impl Slurm {
    /// A copy with the environment values redacted.
    pub fn redacted(&self) -> Slurm {
        let mut s = self.clone();
        s.sbatch_environment_variables.values_mut().for_each(redact);
        s
    }
}

impl std::fmt::Debug for Slurm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_as_json(f, "Slurm", &self.redacted())
    }
}

/// `Containers.CloudVMs` (spec Appendix A.3). `Debug` redacts driver secrets.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CloudVms {
    /// The cluster config key `Containers.CloudVMs.Enable`.
    #[serde(rename = "Enable")]
    pub enable: bool,
    /// A port number or service name; YAML integers are accepted too.
    #[serde(rename = "SSHPort", deserialize_with = "string_or_number")]
    pub ssh_port: String,
    /// The cluster config key `Containers.CloudVMs.PollInterval`.
    #[serde(rename = "PollInterval", with = "units::duration")]
    pub poll_interval: Duration,
    /// The cluster config key `Containers.CloudVMs.BootProbeCommand`.
    #[serde(rename = "BootProbeCommand")]
    pub boot_probe_command: String,
    /// The cluster config key `Containers.CloudVMs.ProbeInterval`.
    #[serde(rename = "ProbeInterval", with = "units::duration")]
    pub probe_interval: Duration,
    /// The cluster config key `Containers.CloudVMs.MaxProbesPerSecond`.
    #[serde(rename = "MaxProbesPerSecond")]
    pub max_probes_per_second: f64,
    /// The cluster config key `Containers.CloudVMs.TimeoutSignal`.
    #[serde(rename = "TimeoutSignal", with = "units::duration")]
    pub timeout_signal: Duration,
    /// The cluster config key `Containers.CloudVMs.TimeoutStaleRunLock`.
    #[serde(rename = "TimeoutStaleRunLock", with = "units::duration")]
    pub timeout_stale_run_lock: Duration,
    /// The cluster config key `Containers.CloudVMs.TimeoutTERM`.
    #[serde(rename = "TimeoutTERM", with = "units::duration")]
    pub timeout_term: Duration,
    /// The cluster config key `Containers.CloudVMs.MaxCloudOpsPerSecond`.
    #[serde(rename = "MaxCloudOpsPerSecond")]
    pub max_cloud_ops_per_second: f64,
    /// The cluster config key `Containers.CloudVMs.MaxConcurrentInstanceCreateOps`.
    #[serde(rename = "MaxConcurrentInstanceCreateOps")]
    pub max_concurrent_instance_create_ops: i64,
    /// The cluster config key `Containers.CloudVMs.MaxInstances`.
    #[serde(rename = "MaxInstances")]
    pub max_instances: i64,
    /// The cluster config key `Containers.CloudVMs.MaxRunningContainersPerInstance`.
    #[serde(rename = "MaxRunningContainersPerInstance")]
    pub max_running_containers_per_instance: i64,
    /// The cluster config key `Containers.CloudVMs.InitialQuotaEstimate`.
    #[serde(rename = "InitialQuotaEstimate")]
    pub initial_quota_estimate: i64,
    /// The cluster config key `Containers.CloudVMs.SupervisorFraction`.
    #[serde(rename = "SupervisorFraction")]
    pub supervisor_fraction: f64,
    /// The cluster config key `Containers.CloudVMs.SyncInterval`.
    #[serde(rename = "SyncInterval", with = "units::duration")]
    pub sync_interval: Duration,
    /// The cluster config key `Containers.CloudVMs.TimeoutIdle`.
    #[serde(rename = "TimeoutIdle", with = "units::duration")]
    pub timeout_idle: Duration,
    /// The cluster config key `Containers.CloudVMs.TimeoutBooting`.
    #[serde(rename = "TimeoutBooting", with = "units::duration")]
    pub timeout_booting: Duration,
    /// The cluster config key `Containers.CloudVMs.TimeoutProbe`.
    #[serde(rename = "TimeoutProbe", with = "units::duration")]
    pub timeout_probe: Duration,
    /// The cluster config key `Containers.CloudVMs.TimeoutShutdown`.
    #[serde(rename = "TimeoutShutdown", with = "units::duration")]
    pub timeout_shutdown: Duration,
    /// The cluster config key `Containers.CloudVMs.ImageID`.
    #[serde(rename = "ImageID")]
    pub image_id: String,
    /// The cluster config key `Containers.CloudVMs.InstanceInitCommand`.
    #[serde(rename = "InstanceInitCommand")]
    pub instance_init_command: String,
    /// The cluster config key `Containers.CloudVMs.DeployRunnerBinary`.
    #[serde(rename = "DeployRunnerBinary")]
    pub deploy_runner_binary: String,
    /// The cluster config key `Containers.CloudVMs.DeployRunnerDirectory`.
    #[serde(rename = "DeployRunnerDirectory")]
    pub deploy_runner_directory: String,
    /// The cluster config key `Containers.CloudVMs.DeployPublicKey`.
    #[serde(rename = "DeployPublicKey")]
    pub deploy_public_key: bool,
    /// The cluster config key `Containers.CloudVMs.ResourceTags`.
    #[serde(rename = "ResourceTags", deserialize_with = "string_map")]
    pub resource_tags: BTreeMap<String, String>,
    /// The cluster config key `Containers.CloudVMs.TagKeyPrefix`.
    #[serde(rename = "TagKeyPrefix")]
    pub tag_key_prefix: String,
    /// The cluster config key `Containers.CloudVMs.Driver`.
    #[serde(rename = "Driver")]
    pub driver: String,
    /// Driver-specific settings, merged over Arvados' defaults; each driver parses its own.
    #[serde(rename = "DriverParameters")]
    pub driver_parameters: serde_norway::Value,
}

impl Default for CloudVms {
    fn default() -> Self {
        CloudVms {
            enable: false,
            ssh_port: "22".into(),
            poll_interval: secs(10),
            boot_probe_command: "systemctl is-system-running".into(),
            probe_interval: secs(10),
            max_probes_per_second: 10.0,
            timeout_signal: secs(5),
            timeout_stale_run_lock: secs(5),
            timeout_term: secs(120),
            max_cloud_ops_per_second: 10.0,
            max_concurrent_instance_create_ops: 1,
            max_instances: 64,
            max_running_containers_per_instance: 0,
            initial_quota_estimate: 0,
            supervisor_fraction: 0.5,
            sync_interval: secs(60),
            timeout_idle: secs(60),
            timeout_booting: secs(600),
            timeout_probe: secs(600),
            timeout_shutdown: secs(10),
            image_id: String::new(),
            instance_init_command: String::new(),
            deploy_runner_binary: "/proc/self/exe".into(),
            deploy_runner_directory: "/tmp/arvados-crunch-run".into(),
            deploy_public_key: true,
            resource_tags: BTreeMap::new(),
            tag_key_prefix: "Arvados".into(),
            driver: "ec2".into(),
            driver_parameters: default_driver_parameters(),
        }
    }
}

/// Arvados' default `DriverParameters` (EC2 and Azure keys), which a cluster's own
/// `DriverParameters` is merged over, key by key, as Arvados does.
pub fn default_driver_parameters() -> serde_norway::Value {
    const DEFAULTS: &str = r#"
AccessKeyID: ""
SecretAccessKey: ""
Region: ""
SecurityGroupIDs: {}
SubnetID: ""
EBSVolumeType: gp2
IAMInstanceProfile: ""
SpotPriceUpdateInterval: 24h
EBSPrice: 0.10
InstanceTypeQuotaGroups:
  a: standard
  c: standard
  d: standard
  h: standard
  i: standard
  m: standard
  r: standard
  t: standard
  z: standard
  vt: g
  p5: p5
SubscriptionID: ""
ClientID: ""
ClientSecret: ""
TenantID: ""
CloudEnvironment: AzurePublicCloud
Location: centralus
ResourceGroup: ""
NetworkResourceGroup: ""
Network: ""
Subnet: ""
ImageResourceGroup: ""
SharedImageGalleryName: ""
SharedImageGalleryImageVersion: ""
StorageAccount: ""
BlobContainer: ""
DeleteDanglingResourcesAfter: 20s
AdminUsername: crunch
"#;
    serde_norway::from_str(DEFAULTS).expect("built-in DriverParameters defaults are valid YAML")
}

/// One entry of `InstanceTypes` (spec Appendix A.4), with the derived fields filled in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InstanceType {
    /// The map key; a `Name` given in the file must equal it.
    #[serde(rename = "Name")]
    pub name: String,
    /// The cloud's own type name; defaults to `name`.
    #[serde(rename = "ProviderType")]
    pub provider_type: String,
    /// The cluster config key `InstanceTypes.<name>.VCPUs`.
    #[serde(rename = "VCPUs")]
    pub vcpus: i64,
    /// The cluster config key `InstanceTypes.<name>.RAM`.
    #[serde(rename = "RAM", with = "units::byte_size")]
    pub ram: i64,
    /// Derived: `included_scratch + added_scratch` (a configured value is ignored).
    #[serde(rename = "Scratch", with = "units::byte_size")]
    pub scratch: i64,
    /// The cluster config key `InstanceTypes.<name>.IncludedScratch`.
    #[serde(rename = "IncludedScratch", with = "units::byte_size")]
    pub included_scratch: i64,
    /// The cluster config key `InstanceTypes.<name>.AddedScratch`.
    #[serde(rename = "AddedScratch", with = "units::byte_size")]
    pub added_scratch: i64,
    /// Hourly price in dollars (also the EC2 spot bid).
    #[serde(rename = "Price")]
    pub price: f64,
    /// The cluster config key `InstanceTypes.<name>.Preemptible`.
    #[serde(rename = "Preemptible")]
    pub preemptible: bool,
    /// The cluster config key `InstanceTypes.<name>.GPU`.
    #[serde(rename = "GPU")]
    pub gpu: GpuFeatures,
    /// Legacy pre-`GPU` form; converted into `gpu` by the loader.
    #[serde(rename = "CUDA", skip_serializing)]
    pub cuda: Option<LegacyCuda>,
}

/// `InstanceTypes.<name>.GPU`: the GPUs of an instance type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuFeatures {
    /// `cuda`, `rocm`, or empty for no GPU.
    #[serde(rename = "Stack")]
    pub stack: String,
    /// The cluster config key `InstanceTypes.<name>.GPU.DriverVersion`.
    #[serde(rename = "DriverVersion", deserialize_with = "string_or_number")]
    pub driver_version: String,
    /// The cluster config key `InstanceTypes.<name>.GPU.HardwareTarget`.
    #[serde(rename = "HardwareTarget", deserialize_with = "string_or_number")]
    pub hardware_target: String,
    /// The cluster config key `InstanceTypes.<name>.GPU.DeviceCount`.
    #[serde(rename = "DeviceCount")]
    pub device_count: i64,
    /// Per-GPU memory.
    #[serde(rename = "VRAM", with = "units::byte_size")]
    pub vram: i64,
}

/// `InstanceTypes.<name>.CUDA`, the form before `GPU` (converted by the loader).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LegacyCuda {
    /// The cluster config key `InstanceTypes.<name>.CUDA.DriverVersion`.
    #[serde(rename = "DriverVersion", deserialize_with = "string_or_number")]
    pub driver_version: String,
    /// The cluster config key `InstanceTypes.<name>.CUDA.HardwareCapability`.
    #[serde(rename = "HardwareCapability", deserialize_with = "string_or_number")]
    pub hardware_capability: String,
    /// The cluster config key `InstanceTypes.<name>.CUDA.DeviceCount`.
    #[serde(rename = "DeviceCount")]
    pub device_count: i64,
}

// ---- field deserializers -------------------------------------------------------------------

/// Go's config treats some strings loosely (`SSHPort: 22`, `DriverVersion: 11.0`); accept a
/// YAML number where a string is expected, keeping its text.
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum S {
        Str(String),
        Int(i64),
        Float(f64),
    }
    Ok(
        match S::deserialize(d)
            .map_err(|_| serde::de::Error::custom("invalid value: expected a string or a number"))?
        {
            S::Str(s) => s,
            S::Int(i) => i.to_string(),
            S::Float(f) => {
                let s = f.to_string();
                // YAML `11.0` must stay "11.0", not "11".
                if s.contains('.') { s } else { format!("{s}.0") }
            }
        },
    )
}

fn null_as_empty_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

fn string_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    struct W(#[serde(deserialize_with = "string_or_number")] String);
    let m: BTreeMap<String, W> = BTreeMap::deserialize(d)?;
    Ok(m.into_iter().map(|(k, W(v))| (k, v)).collect())
}

fn check_url<E: serde::de::Error>(s: &str) -> Result<(), E> {
    url::Url::parse(s)
        .map(|_| ())
        .map_err(|e| E::custom(format!("invalid URL {s:?}: {e}")))
}

fn optional_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if !s.is_empty() {
        check_url::<D::Error>(&s)?;
    }
    Ok(s)
}

fn url_keyed_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, ServiceInstance>, D::Error> {
    let m: BTreeMap<String, ServiceInstance> = BTreeMap::deserialize(d)?;
    for k in m.keys() {
        check_url::<D::Error>(k)?;
    }
    Ok(m)
}

fn instance_type_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, InstanceType>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = BTreeMap<String, InstanceType>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of instance types keyed by name")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut a: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = a.next_entry::<String, InstanceType>()? {
                out.insert(k, v);
            }
            Ok(out)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(serde::de::Error::custom(
                "must be a map keyed by instance type name, not a list",
            ))
        }
    }
    d.deserialize_any(V)
}

// ---- redaction -----------------------------------------------------------------------------

const REDACTED: &str = "[redacted]";

fn redact(s: &mut String) {
    if !s.is_empty() {
        *s = REDACTED.to_string();
    }
}

/// Driver parameter names that hold secrets (matched case-insensitively as substrings).
const SECRET_KEY_PARTS: &[&str] = &[
    "secret",
    "password",
    "token",
    "privatekey",
    "jsonkey",
    "credential",
];

fn redact_yaml(v: &mut serde_norway::Value) {
    match v {
        serde_norway::Value::Mapping(m) => {
            for (k, child) in m.iter_mut() {
                let secret = is_secret_key(k.as_str().unwrap_or_default());
                match child {
                    serde_norway::Value::String(s) if secret => redact(s),
                    _ if secret && !child.is_null() => {
                        *child = serde_norway::Value::String(REDACTED.into())
                    }
                    _ => redact_yaml(child),
                }
            }
        }
        serde_norway::Value::Sequence(s) => s.iter_mut().for_each(redact_yaml),
        _ => {}
    }
}

/// Is a parameter named `key` a secret (for redaction)?
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEY_PARTS.iter().any(|p| key.contains(p))
}

impl PostgreSql {
    /// A copy with the password redacted.
    pub fn redacted(&self) -> PostgreSql {
        let mut p = self.clone();
        for (k, v) in p.connection.iter_mut() {
            if is_secret_key(k) {
                redact(v);
            }
        }
        p
    }
}

impl CloudVms {
    /// A copy with secret driver parameters redacted.
    pub fn redacted(&self) -> CloudVms {
        let mut v = self.clone();
        redact_yaml(&mut v.driver_parameters);
        v
    }
}

impl Containers {
    /// A copy with the dispatch key and secret driver parameters redacted.
    pub fn redacted(&self) -> Containers {
        let mut c = self.clone();
        redact(&mut c.dispatch_private_key);
        c.cloud_vms = c.cloud_vms.redacted();
        c.slurm = c.slurm.redacted();
        c
    }
}

impl Cluster {
    /// A copy safe to print or serve: tokens, keys and passwords replaced by `[redacted]`
    /// (empty ones stay empty, so an operator can still see what is unset). The raw tree is
    /// dropped.
    pub fn redacted(&self) -> Cluster {
        let mut c = self.clone();
        redact(&mut c.system_root_token);
        redact(&mut c.management_token);
        c.containers = c.containers.redacted();
        c.postgresql = c.postgresql.redacted();
        c.raw = RawTree::default();
        c
    }
}

/// `Name {…json…}` of a value already redacted.
fn debug_as_json<T: Serialize>(
    f: &mut std::fmt::Formatter<'_>,
    name: &str,
    v: &T,
) -> std::fmt::Result {
    match serde_json::to_string(v) {
        Ok(j) => write!(f, "{name} {j}"),
        Err(_) => write!(f, "{name} {{..}}"),
    }
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_as_json(f, "Cluster", &self.redacted())
    }
}

impl std::fmt::Debug for PostgreSql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_as_json(f, "PostgreSql", &self.redacted())
    }
}

impl std::fmt::Debug for Containers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_as_json(f, "Containers", &self.redacted())
    }
}

impl std::fmt::Debug for CloudVms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_as_json(f, "CloudVms", &self.redacted())
    }
}

// ---- what crunch-run gets -------------------------------------------------------------------

/// Keys removed from the cluster config given to crunch-run on worker VMs, as paths below
/// `Clusters.<id>`. Workers run users' containers; they get what crunch-run and its local
/// keepstore need (`Volumes`, `Collections.BlobSigningKey`, `SystemRootToken`, which crunch-run
/// already receives as `ARVADOS_API_TOKEN`), and nothing that controls other machines.
pub const CRUNCH_RUN_STRIPPED_KEYS: &[&str] = &[
    // The dispatcher's SSH key to every worker.
    "Containers.DispatchPrivateKey",
    // Cloud account credentials.
    "Containers.CloudVMs.DriverParameters",
    // Other dispatchers' settings (may hold credentials in environment variables).
    "Containers.SLURM",
    "Containers.LSF",
    // Every service's management API and metrics.
    "ManagementToken",
    // The database, with its password.
    "PostgreSQL",
    // Identity providers' client secrets, LDAP bind passwords, test users' passwords.
    "Login",
    // A token for anonymous access on behalf of every user.
    "Users.AnonymousUserToken",
    // The services' TLS private key.
    "TLS.Key",
];

/// The cluster config crunch-run receives: the typed config (Arvados' defaults for every key
/// it models) with the operator's whole tree merged over it, minus
/// [`CRUNCH_RUN_STRIPPED_KEYS`].
pub fn crunch_run_cluster_config(cluster: &Cluster) -> serde_json::Value {
    let mut tree = serde_norway::to_value(cluster).unwrap_or_default();
    load::deep_merge(&mut tree, cluster.raw.0.clone());
    let mut v = load::yaml_to_json(&tree);
    for path in CRUNCH_RUN_STRIPPED_KEYS {
        remove_path(&mut v, path);
    }
    v
}

fn remove_path(v: &mut serde_json::Value, path: &str) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut cur = v;
    for p in parts {
        match cur.get_mut(p) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(last);
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn debug_output_shows_no_secret() {
        let mut c = Cluster {
            system_root_token: "root-secret-1".into(),
            management_token: "mgmt-secret-2".into(),
            ..Cluster::default()
        };
        c.containers.dispatch_private_key = "-----BEGIN OPENSSH PRIVATE KEY-----xyz".into();
        c.postgresql
            .connection
            .insert("password".into(), "pg-secret-3".into());
        c.containers.cloud_vms.driver_parameters["SecretAccessKey"] =
            serde_norway::Value::String("aws-secret-4".into());
        c.raw = RawTree(
            serde_norway::from_str(
                "Volumes: {v: {DriverParameters: {SecretAccessKey: vol-secret-5}}}",
            )
            .unwrap(),
        );
        for text in [
            format!("{c:?}"),
            format!("{:?}", c.containers),
            format!("{:?}", c.containers.cloud_vms),
            format!("{:?}", c.postgresql),
            format!("{:#?}", c),
        ] {
            for secret in [
                "root-secret-1",
                "mgmt-secret-2",
                "BEGIN OPENSSH",
                "pg-secret-3",
                "aws-secret-4",
                "vol-secret-5",
            ] {
                assert!(!text.contains(secret), "{secret} leaked in {text}");
            }
        }
        assert!(format!("{c:?}").contains("[redacted]"));
    }

    #[test]
    fn crunch_run_gets_the_whole_tree_minus_what_controls_other_machines() {
        let yaml = r#"
Clusters:
  zzzzz:
    SystemRootToken: root-token
    ManagementToken: mgmt-token
    PostgreSQL: {Connection: {host: db, password: pg-password}}
    Collections: {BlobSigningKey: signing-key}
    Volumes:
      zzzzz-nyw5e-000000000000000:
        Driver: S3
        DriverParameters: {Bucket: b, SecretAccessKey: volume-secret}
    Login:
      OpenIDConnect: {ClientSecret: oidc-secret}
      LDAP: {SearchBindPassword: ldap-password}
    Users: {AnonymousUserToken: anon-token}
    TLS: {Key: "file:///etc/key.pem", Insecure: true}
    Containers:
      DispatchPrivateKey: "-----BEGIN OPENSSH PRIVATE KEY-----"
      CloudVMs:
        Driver: ec2
        DriverParameters: {AccessKeyID: akid, SecretAccessKey: aws-secret}
"#;
        let c = load_cluster_from_str(yaml, "test", None).unwrap();
        let v = crunch_run_cluster_config(&c);
        let text = v.to_string();
        for gone in [
            "mgmt-token",
            "pg-password",
            "oidc-secret",
            "ldap-password",
            "anon-token",
            "BEGIN OPENSSH",
            "aws-secret",
            "akid",
            "/etc/key.pem",
        ] {
            assert!(!text.contains(gone), "{gone} was given to crunch-run");
        }
        // What crunch-run and its local keepstore need is there, keys not modelled included.
        assert_eq!(
            v["Volumes"]["zzzzz-nyw5e-000000000000000"]["DriverParameters"]["SecretAccessKey"],
            "volume-secret"
        );
        assert_eq!(v["Collections"]["BlobSigningKey"], "signing-key");
        assert_eq!(v["SystemRootToken"], "root-token");
        assert_eq!(v["TLS"]["Insecure"], true);
        assert_eq!(v["Containers"]["CloudVMs"]["Driver"], "ec2");
        // Defaults of modelled keys are filled in.
        assert_eq!(v["Containers"]["RuntimeEngine"], "docker");
        assert!(v.get("PostgreSQL").is_none() && v.get("Login").is_none());
    }

    #[test]
    fn secrets_are_redacted_and_empty_values_kept() {
        let mut c = Cluster {
            system_root_token: "root-secret".into(),
            ..Cluster::default()
        };
        c.containers.dispatch_private_key = "-----BEGIN OPENSSH PRIVATE KEY-----".into();
        c.postgresql
            .connection
            .insert("password".into(), "pw".into());
        c.containers.cloud_vms.driver_parameters["SecretAccessKey"] =
            serde_norway::Value::String("aws-secret".into());
        let r = c.redacted();
        let text = serde_norway::to_string(&r).unwrap();
        for secret in ["root-secret", "BEGIN OPENSSH", "aws-secret", "password: pw"] {
            assert!(!text.contains(secret), "{secret} leaked");
        }
        assert_eq!(r.system_root_token, "[redacted]");
        assert_eq!(r.management_token, "");
        assert_eq!(
            r.containers.cloud_vms.driver_parameters["Region"].as_str(),
            Some("")
        );
        assert_eq!(
            r.containers.cloud_vms.driver_parameters["ClientSecret"].as_str(),
            Some("")
        );
    }
}
