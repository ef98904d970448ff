//! The pool's settings, resolved once from the cluster config (spec §8.1), and the pieces of
//! the remote command contract that depend only on them: the runner command, the start
//! command line and its ConfigData stdin (§8.11, Appendix D).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arvados::{Cluster, InstanceType};
use cloud::tags::TagKeys;
use russh::keys::PrivateKey;

/// The runner binary to install on workers (`DeployRunnerBinary`).
#[derive(Clone)]
pub struct RunnerBinary {
    pub data: Arc<Vec<u8>>,
    pub md5: String,
}

impl RunnerBinary {
    pub fn new(data: Vec<u8>) -> RunnerBinary {
        use md5::{Digest, Md5};
        let md5 = hex::encode(Md5::digest(&data));
        RunnerBinary {
            data: Arc::new(data),
            md5,
        }
    }
}

/// Everything the pool needs to know, fixed at construction.
#[derive(Clone)]
pub struct PoolConfig {
    pub cluster_id: String,
    pub instance_set_id: String,
    pub tag_keys: TagKeys,
    pub instance_types: BTreeMap<String, InstanceType>,
    pub image_id: String,
    pub instance_init_command: String,
    pub boot_probe_command: String,
    /// `Containers.CrunchRunCommand`, used when nothing is deployed.
    pub crunch_run_command: String,
    /// `--runtime-engine=…` then `CrunchRunArgumentsList`.
    pub runner_args: Vec<String>,
    /// Deployed runner, if `DeployRunnerBinary` is set (and loaded).
    pub runner_binary: Option<RunnerBinary>,
    /// Set when `DeployRunnerBinary` could not be read: every create declines.
    pub runner_error: Option<String>,
    pub deploy_directory: String,
    pub private_key: Arc<PrivateKey>,
    /// Installed on new VMs (`DeployPublicKey`).
    pub install_public_key: Option<String>,
    pub ssh_port: String,
    pub max_probes_per_second: f64,
    /// 0 = unlimited.
    pub max_concurrent_creates: usize,
    /// 0 = unlimited.
    pub max_instances: usize,
    pub probe_interval: Duration,
    pub sync_interval: Duration,
    pub timeout_idle: Duration,
    pub timeout_booting: Duration,
    pub timeout_probe: Duration,
    pub timeout_shutdown: Duration,
    pub timeout_term: Duration,
    pub timeout_signal: Duration,
    pub timeout_stale_run_lock: Duration,
    /// Deadline of every SSH command (Go has none; §13.3 item 17).
    pub command_timeout: Duration,
    /// How long a quota error stops creates (Go: 1 minute).
    pub quota_error_ttl: Duration,
    /// How long a capacity error stops creates of that type/group (Go: 1 minute), unless
    /// `capacity` turns on back-off.
    pub capacity_error_ttl: Duration,
    /// Capacity back-off from the settings file (off by default).
    pub capacity: crate::settings::CapacitySettings,
    /// `IdleTime` from the settings file (default: `timeout_idle` for every instance).
    pub idle_time: crate::settings::IdleTimeSettings,
    /// `Interruptions` from the settings file: with `drain`, the pool also drains instances
    /// the cloud itself announces it will take back (default: off, as Arvados).
    pub interruptions: crate::settings::InterruptionSettings,
    /// How long reaching `MaxConcurrentInstanceCreateOps` stops creates (Go: 5 s), unless a
    /// create finishes sooner.
    pub create_ops_hold_off: Duration,
    /// A create that failed with an unknown outcome keeps its place until a cloud list that
    /// started this long after the failure does not show its VM (lists may lag a create).
    pub unknown_create_grace: Duration,
    // ConfigData for crunch-run (§8.11).
    pub api_host: String,
    pub api_insecure: bool,
    pub system_root_token: String,
    pub keep_buffers_per_vcpu: i64,
    pub driver: String,
    /// The cluster config crunch-run gets when local keepstore is on: the operator's whole
    /// tree minus secrets it does not need ([`arvados::config::CRUNCH_RUN_STRIPPED_KEYS`]).
    pub cluster_json: serde_json::Value,
}

fn or_default(d: Duration, default: Duration) -> Duration {
    if d.is_zero() { default } else { d }
}

/// `ARVADOS_API_HOST` for crunch-run: `host:port` of the controller's https URL; a plain
/// `http://` URL (test and simulation setups) is passed whole.
pub fn api_host(external_url: &str) -> String {
    match url::Url::parse(external_url) {
        Ok(u) if u.scheme() == "https" => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => external_url.to_string(),
        },
        _ => external_url.trim_end_matches('/').to_string(),
    }
}

/// What goes to the VMs as crunch-run.
#[derive(Debug, PartialEq)]
pub enum RunnerSource {
    /// Nothing (why); VMs run `Containers.CrunchRunCommand` from their image.
    None(String),
    /// This file.
    File(std::path::PathBuf),
}

/// `DeployRunnerBinary` as this dispatcher reads it. Empty: deploy nothing. Arvados' default
/// `/proc/self/exe` means "the dispatcher's own binary", which for Go's multi-call
/// `arvados-server` is also crunch-run; this binary is not, so the crunch-run installed on
/// this host stands in for it: `crunch-run`, else `arvados-server` (Arvados' packages), first
/// on `path_env`. Any other value is that file.
pub fn runner_source(deploy: &str, path_env: Option<&std::ffi::OsStr>) -> RunnerSource {
    if deploy.is_empty() {
        return RunnerSource::None("DeployRunnerBinary is empty".into());
    }
    if deploy != "/proc/self/exe" {
        return RunnerSource::File(deploy.into());
    }
    let dirs: Vec<std::path::PathBuf> = path_env
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    for name in ["crunch-run", "arvados-server"] {
        for d in &dirs {
            let candidate = d.join(name);
            if candidate.is_file() {
                return RunnerSource::File(candidate);
            }
        }
    }
    RunnerSource::None(
        "DeployRunnerBinary is /proc/self/exe (Go's own crunch-run) and no crunch-run or \
         arvados-server is installed on this host ($PATH)"
            .into(),
    )
}

impl PoolConfig {
    /// Settings from `cluster` with Go's fallbacks for unset values.
    pub fn from_cluster(
        cluster: &Cluster,
        instance_set_id: &str,
        private_key: Arc<PrivateKey>,
    ) -> PoolConfig {
        let vms = &cluster.containers.cloud_vms;
        let (runner_binary, runner_error) = match runner_source(
            &vms.deploy_runner_binary,
            std::env::var_os("PATH").as_deref(),
        ) {
            RunnerSource::None(why) => {
                tracing::warn!(
                    CrunchRunCommand = %cluster.containers.crunch_run_command,
                    "{why}: deploying no crunch-run; VMs run Containers.CrunchRunCommand from their image"
                );
                (None, None)
            }
            RunnerSource::File(path) => match std::fs::read(&path) {
                Ok(data) => {
                    let bin = RunnerBinary::new(data);
                    tracing::info!(
                        DeployRunnerBinary = %vms.deploy_runner_binary,
                        "deploying {} to VMs as {}/crunch-run~{}",
                        path.display(),
                        vms.deploy_runner_directory,
                        bin.md5
                    );
                    (Some(bin), None)
                }
                Err(e) => {
                    let msg = format!("{}: {e}", path.display());
                    tracing::error!(error = %msg, "failed to load runner program");
                    (None, Some(msg))
                }
            },
        };
        let mut runner_args = vec![format!(
            "--runtime-engine={}",
            cluster.containers.runtime_engine
        )];
        runner_args.extend(cluster.containers.crunch_run_arguments_list.iter().cloned());
        let install_public_key = vms
            .deploy_public_key
            .then(|| private_key.public_key().to_openssh().ok())
            .flatten();
        PoolConfig {
            cluster_id: cluster.cluster_id.clone(),
            instance_set_id: instance_set_id.to_string(),
            tag_keys: TagKeys::new(&vms.tag_key_prefix),
            instance_types: cluster.instance_types.clone(),
            image_id: vms.image_id.clone(),
            instance_init_command: vms.instance_init_command.clone(),
            boot_probe_command: vms.boot_probe_command.clone(),
            crunch_run_command: cluster.containers.crunch_run_command.clone(),
            runner_args,
            runner_binary,
            runner_error,
            deploy_directory: vms.deploy_runner_directory.clone(),
            private_key,
            install_public_key,
            ssh_port: vms.ssh_port.clone(),
            max_probes_per_second: if vms.max_probes_per_second > 0.0 {
                vms.max_probes_per_second
            } else {
                10.0
            },
            max_concurrent_creates: vms.max_concurrent_instance_create_ops.max(0) as usize,
            max_instances: vms.max_instances.max(0) as usize,
            probe_interval: or_default(vms.probe_interval, Duration::from_secs(10)),
            sync_interval: or_default(vms.sync_interval, Duration::from_secs(60)),
            timeout_idle: or_default(vms.timeout_idle, Duration::from_secs(60)),
            timeout_booting: or_default(vms.timeout_booting, Duration::from_secs(600)),
            timeout_probe: or_default(vms.timeout_probe, Duration::from_secs(600)),
            timeout_shutdown: or_default(vms.timeout_shutdown, Duration::from_secs(10)),
            timeout_term: or_default(vms.timeout_term, Duration::from_secs(120)),
            timeout_signal: or_default(vms.timeout_signal, Duration::from_secs(5)),
            timeout_stale_run_lock: or_default(vms.timeout_stale_run_lock, Duration::from_secs(5)),
            // A command that takes longer than a probe may is as good as failed; but allow
            // at least 1 s (slow links) and at most a minute (hung VMs get noticed).
            command_timeout: or_default(vms.timeout_probe, Duration::from_secs(600))
                .clamp(Duration::from_secs(1), Duration::from_secs(60)),
            quota_error_ttl: Duration::from_secs(60),
            capacity_error_ttl: Duration::from_secs(60),
            capacity: Default::default(),
            idle_time: Default::default(),
            interruptions: Default::default(),
            create_ops_hold_off: Duration::from_secs(5),
            unknown_create_grace: Duration::from_secs(30),
            api_host: api_host(&cluster.services.controller.external_url),
            api_insecure: cluster.tls.insecure,
            system_root_token: cluster.system_root_token.clone(),
            keep_buffers_per_vcpu: cluster.containers.local_keep_blob_buffers_per_vcpu,
            driver: vms.driver.clone(),
            cluster_json: arvados::config::crunch_run_cluster_config(cluster),
        }
    }

    /// The command that runs crunch-run on a worker: the deployed copy when deploying.
    pub fn runner_command(&self) -> String {
        match &self.runner_binary {
            Some(b) => format!(
                "{}/crunch-run~{}",
                self.deploy_directory.trim_end_matches('/'),
                b.md5
            ),
            None => self.crunch_run_command.clone(),
        }
    }
}

/// Quote for a POSIX shell: `'…'` with `'` as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `sudo ` for a remote user that is not root.
pub fn sudo(user: &str) -> &'static str {
    if user == "root" { "" } else { "sudo " }
}

/// `<runner> --detach --stdin-config '<arg>'… '<uuid>'` (sudo-prefixed for non-root).
pub fn start_command(runner: &str, args: &[String], uuid: &str, user: &str) -> String {
    let mut cmd = format!("{}{runner} --detach --stdin-config", sudo(user));
    for a in args.iter().map(String::as_str).chain([uuid]) {
        cmd.push(' ');
        cmd.push_str(&shell_quote(a));
    }
    cmd
}

/// `<runner> --kill 15 '<uuid>'`. Quoted, though Go does not quote it: whatever reaches a
/// remote command line is quoted.
pub fn kill_command(runner: &str, uuid: &str) -> String {
    format!("{runner} --kill 15 {}", shell_quote(uuid))
}

/// The instance type as crunch-run reads it: no `Name`, no `Scratch`, 4-space indented, with a
/// trailing newline.
pub fn instance_type_json(it: &InstanceType) -> String {
    use serde::Serialize;
    let mut v = serde_json::to_value(it).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("Name");
        m.remove("Scratch");
    }
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    let _ = v.serialize(&mut ser);
    buf.push(b'\n');
    String::from_utf8(buf).unwrap_or_default()
}

/// The ConfigData JSON crunch-run reads from stdin (§8.11).
pub fn config_data(cfg: &PoolConfig, it: &InstanceType, address: &str, uuid: &str) -> Vec<u8> {
    let host = match address.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => address,
    };
    let mut env = serde_json::Map::new();
    env.insert("ARVADOS_API_HOST".into(), cfg.api_host.clone().into());
    env.insert(
        "ARVADOS_API_TOKEN".into(),
        cfg.system_root_token.clone().into(),
    );
    if cfg.api_insecure {
        env.insert("ARVADOS_API_HOST_INSECURE".into(), "1".into());
    }
    env.insert("InstanceType".into(), instance_type_json(it).into());
    env.insert("GatewayAddress".into(), format!("{host}:0").into());
    env.insert(
        "GatewayAuthSecret".into(),
        arvados::gateway_auth_secret(&cfg.system_root_token, uuid).into(),
    );
    let keep_buffers = cfg.keep_buffers_per_vcpu.max(0) * it.vcpus;
    let doc = serde_json::json!({
        "Env": env,
        "KeepBuffers": keep_buffers,
        "EC2SpotCheck": cfg.driver == "ec2" && it.preemptible,
        "Cluster": if keep_buffers > 0 { cfg.cluster_json.clone() } else { serde_json::Value::Null },
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// The runner install script (Appendix D), wrapped for non-root users.
pub fn install_command(deploy_directory: &str, runner: &str, user: &str) -> String {
    let dir = format!("{}/", deploy_directory.trim_end_matches('/'));
    let script = format!(
        "set -e; dstdir=\"{dir}\"; dstfile=\"{runner}\"; mkdir -p \"$dstdir\"; touch \"$dstfile\"; chmod 0755 \"$dstdir\" \"$dstfile\"; cat >\"$dstfile\""
    );
    if user == "root" {
        script
    } else {
        format!("sudo sh -c {}", shell_quote(&script))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_source_follows_go_defaults_with_the_hosts_crunch_run() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        let src = |deploy: &str| runner_source(deploy, Some(&path));
        // Nothing installed: nothing deployed, and why.
        match src("/proc/self/exe") {
            RunnerSource::None(why) => assert!(why.contains("no crunch-run"), "{why}"),
            other => panic!("{other:?}"),
        }
        // arvados-server (Arvados' multi-call binary) stands in, but crunch-run comes first,
        // wherever each is on $PATH.
        std::fs::write(a.path().join("arvados-server"), b"x").unwrap();
        assert_eq!(
            src("/proc/self/exe"),
            RunnerSource::File(a.path().join("arvados-server"))
        );
        std::fs::write(b.path().join("crunch-run"), b"x").unwrap();
        assert_eq!(
            src("/proc/self/exe"),
            RunnerSource::File(b.path().join("crunch-run"))
        );
        // A configured path wins; empty deploys nothing.
        assert_eq!(
            src("/opt/crunch-run"),
            RunnerSource::File("/opt/crunch-run".into())
        );
        assert!(matches!(src(""), RunnerSource::None(_)));
        assert!(matches!(
            runner_source("/proc/self/exe", None),
            RunnerSource::None(_)
        ));
    }

    #[test]
    fn start_command_quotes_every_argument_like_the_spec_example() {
        let args = vec![
            "--runtime-engine=docker".to_string(),
            "--extra='args'".to_string(),
        ];
        assert_eq!(
            start_command("crunch-run", &args, "zzzzz-dz642-000000000000001", "root"),
            r#"crunch-run --detach --stdin-config '--runtime-engine=docker' '--extra='\''args'\''' 'zzzzz-dz642-000000000000001'"#
        );
        assert!(
            start_command("crunch-run", &[], "u", "admin").starts_with("sudo crunch-run --detach")
        );
    }

    #[test]
    fn kill_command_quotes_the_uuid() {
        assert_eq!(
            kill_command("crunch-run", "zzzzz-dz642-000000000000001"),
            "crunch-run --kill 15 'zzzzz-dz642-000000000000001'"
        );
        assert_eq!(
            kill_command("sudo crunch-run", "zzzzz-dz642-x;touch pwned'"),
            r"sudo crunch-run --kill 15 'zzzzz-dz642-x;touch pwned'\'''"
        );
    }

    #[test]
    fn api_host_is_host_port_for_https_and_whole_for_http() {
        assert_eq!(api_host("https://zzzzz.example.com/"), "zzzzz.example.com");
        assert_eq!(
            api_host("https://zzzzz.example.com:8443"),
            "zzzzz.example.com:8443"
        );
        assert_eq!(api_host("http://127.0.0.1:3001/"), "http://127.0.0.1:3001");
    }

    #[test]
    fn instance_type_json_drops_name_and_scratch_and_uses_four_spaces() {
        let it = InstanceType {
            name: "small".into(),
            provider_type: "t3.small".into(),
            vcpus: 2,
            ram: 2 << 30,
            scratch: 5,
            included_scratch: 5,
            ..Default::default()
        };
        let j = instance_type_json(&it);
        assert!(
            j.ends_with("}\n") && j.contains("\n    \"ProviderType\": \"t3.small\""),
            "{j}"
        );
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert!(v.get("Name").is_none() && v.get("Scratch").is_none());
        assert_eq!(v["VCPUs"], 2);
        assert_eq!(v["RAM"], 2i64 << 30);
    }

    #[test]
    fn config_data_gives_crunch_run_the_tree_without_secrets_when_keepstore_runs_locally() {
        let yaml = r#"
Clusters:
  zzzzz:
    SystemRootToken: root-token
    ManagementToken: mgmt-token
    PostgreSQL: {Connection: {password: pg-password}}
    Volumes: {zzzzz-nyw5e-000000000000000: {Driver: Directory, DriverParameters: {Root: /srv}}}
    Services: {Controller: {ExternalURL: "https://zzzzz.example.com"}}
    Containers:
      LocalKeepBlobBuffersPerVCPU: 1
      CloudVMs:
        Driver: ec2
        DriverParameters: {SecretAccessKey: aws-secret}
    InstanceTypes:
      small: {ProviderType: t3.small, VCPUs: 2, RAM: 2GiB, Price: 0.1}
"#;
        let cluster = arvados::config::load_cluster_from_str(yaml, "test", None).unwrap();
        let key = Arc::new(cloud::sshd::new_ed25519_key());
        let cfg = PoolConfig::from_cluster(&cluster, "set", key);
        let it = &cluster.instance_types["small"];
        let data = config_data(&cfg, it, "10.0.0.5:22", "zzzzz-dz642-000000000000001");
        let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
        assert_eq!(v["KeepBuffers"], 2);
        let text = v.to_string();
        for secret in ["mgmt-token", "pg-password", "aws-secret"] {
            assert!(!text.contains(secret), "{secret} sent to a worker");
        }
        assert_eq!(
            v["Cluster"]["Volumes"]["zzzzz-nyw5e-000000000000000"]["DriverParameters"]["Root"],
            "/srv"
        );
        assert_eq!(v["Env"]["ARVADOS_API_HOST"], "zzzzz.example.com");
        // Without local keepstore, no cluster config at all (as Arvados does).
        let mut cfg0 = cfg.clone();
        cfg0.keep_buffers_per_vcpu = 0;
        let v: serde_json::Value =
            serde_json::from_slice(&config_data(&cfg0, it, "h", "u")).unwrap();
        assert!(v["Cluster"].is_null());
    }

    #[test]
    fn install_command_is_wrapped_for_non_root() {
        let root = install_command(
            "/tmp/arvados-crunch-run",
            "/tmp/arvados-crunch-run/crunch-run~ab",
            "root",
        );
        assert_eq!(
            root,
            r#"set -e; dstdir="/tmp/arvados-crunch-run/"; dstfile="/tmp/arvados-crunch-run/crunch-run~ab"; mkdir -p "$dstdir"; touch "$dstfile"; chmod 0755 "$dstdir" "$dstfile"; cat >"$dstfile""#
        );
        let admin = install_command("/tmp/x", "/tmp/x/crunch-run~ab", "admin");
        assert!(
            admin.starts_with("sudo sh -c 'set -e; dstdir=\"/tmp/x/\""),
            "{admin}"
        );
    }
}
