//! The legacy per-component config file (`/etc/arvados/crunch-dispatch-slurm/
//! crunch-dispatch-slurm.yml`), still honoured by Arvados: its keys are laid over the cluster
//! config, and a warning asks the operator to migrate.
//!
//! Better than Arvados, which derives the legacy flag from the full program path and so
//! never reads the file when started as `/usr/bin/crunch-dispatch-slurm` (its known bug 20):
//! here the file is read whatever argv\[0\] is, unless `-skip-legacy` is given.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use arvados::config::Cluster;
use arvados::config::units::parse_duration;
use serde::Deserialize;

/// The default legacy file.
pub const DEFAULT_PATH: &str = "/etc/arvados/crunch-dispatch-slurm/crunch-dispatch-slurm.yml";

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Client {
    #[serde(rename = "APIHost")]
    api_host: String,
    #[serde(rename = "AuthToken")]
    auth_token: String,
    #[serde(rename = "Insecure")]
    insecure: bool,
    #[serde(rename = "Scheme")]
    scheme: String,
    #[serde(rename = "KeepServiceURIs")]
    keep_service_uris: Vec<String>,
}

/// The file's keys.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Legacy {
    #[serde(rename = "Client")]
    client: Option<Client>,
    #[serde(rename = "SbatchArguments")]
    sbatch_arguments: Option<Vec<String>>,
    #[serde(rename = "PollPeriod")]
    poll_period: Option<String>,
    #[serde(rename = "PrioritySpread")]
    priority_spread: Option<i64>,
    #[serde(rename = "CrunchRunCommand")]
    crunch_run_command: Option<Vec<String>>,
    #[serde(rename = "ReserveExtraRAM")]
    reserve_extra_ram: Option<i64>,
    #[serde(rename = "MinRetryPeriod")]
    min_retry_period: Option<String>,
    #[serde(rename = "BatchSize")]
    batch_size: Option<i64>,
}

fn duration(key: &str, v: &str) -> Result<Duration, String> {
    parse_duration(v).map_err(|e| format!("{key}: {e}"))
}

/// Lay the legacy file's `text` over `cluster`. Errors name the file and key.
pub fn apply(cluster: &mut Cluster, text: &str, origin: &str) -> Result<(), String> {
    let l: Legacy = serde_norway::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
    let err = |e: String| format!("{origin}: {e}");
    if let Some(c) = l.client {
        if !c.api_host.is_empty() {
            let scheme = if c.scheme.is_empty() {
                "https"
            } else {
                &c.scheme
            };
            cluster.services.controller.external_url = format!("{scheme}://{}/", c.api_host);
        }
        if !c.auth_token.is_empty() {
            cluster.system_root_token = c.auth_token;
        }
        if c.insecure {
            cluster.tls.insecure = true;
        }
        if !c.keep_service_uris.is_empty() {
            cluster.containers.slurm.sbatch_environment_variables = BTreeMap::from([(
                "ARVADOS_KEEP_SERVICES".to_string(),
                c.keep_service_uris.join(" "),
            )]);
        }
    }
    if let Some(a) = l.sbatch_arguments {
        cluster.containers.slurm.sbatch_arguments_list = a;
    }
    if let Some(p) = l.poll_period {
        cluster.containers.cloud_vms.poll_interval = duration("PollPeriod", &p).map_err(err)?;
    }
    if let Some(s) = l.priority_spread {
        cluster.containers.slurm.priority_spread = s;
    }
    if let Some(cmd) = l.crunch_run_command
        && let Some((first, rest)) = cmd.split_first()
    {
        cluster.containers.crunch_run_command = first.clone();
        cluster.containers.crunch_run_arguments_list = rest.to_vec();
    }
    if let Some(r) = l.reserve_extra_ram {
        cluster.containers.reserve_extra_ram = r;
    }
    if let Some(p) = l.min_retry_period {
        cluster.containers.min_retry_period = duration("MinRetryPeriod", &p).map_err(err)?;
    }
    if let Some(b) = l.batch_size {
        cluster.api.max_items_per_response = b;
    }
    Ok(())
}

/// Read the legacy file at `path` if it exists and lay it over `cluster`; whether it did.
pub fn apply_file(cluster: &mut Cluster, path: &Path) -> Result<bool, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            apply(cluster, &text, &path.display().to_string())?;
            tracing::warn!(
                "loaded legacy config file {}; please move its settings into the cluster config and remove it",
                path.display()
            );
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Whether YAML text is a cluster config (has a top-level `Clusters` key); a `-config` file
/// that is not is read as a legacy file, with a warning, as Arvados does.
pub fn is_cluster_config(text: &str) -> bool {
    serde_norway::from_str::<serde_norway::Value>(text)
        .ok()
        .and_then(|v| v.get("Clusters").cloned())
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEGACY: &str = "
Client:
  APIHost: example.com
  AuthToken: abcdefg
  KeepServiceURIs:
    - https://example.com/keep1
    - https://example.com/keep2
SbatchArguments: [\"--foo\", \"bar\"]
PollPeriod: 12s
PrioritySpread: 42
CrunchRunCommand: [\"x-crunch-run\", \"--cgroup-parent-subsystem=memory\"]
ReserveExtraRAM: 12345
MinRetryPeriod: 13s
BatchSize: 99
";

    #[test]
    fn ac_slurm_13_legacy_config() {
        assert!(!is_cluster_config(LEGACY));
        let mut c = Cluster::default();
        apply(&mut c, LEGACY, "legacy.yml").unwrap();
        assert_eq!(c.services.controller.external_url, "https://example.com/");
        assert_eq!(c.system_root_token, "abcdefg");
        assert_eq!(c.containers.slurm.sbatch_arguments_list, ["--foo", "bar"]);
        assert_eq!(
            c.containers.cloud_vms.poll_interval,
            Duration::from_secs(12)
        );
        assert_eq!(c.containers.slurm.priority_spread, 42);
        assert_eq!(c.containers.crunch_run_command, "x-crunch-run");
        assert_eq!(
            c.containers.crunch_run_arguments_list,
            ["--cgroup-parent-subsystem=memory"]
        );
        assert_eq!(c.containers.reserve_extra_ram, 12345);
        assert_eq!(c.containers.min_retry_period, Duration::from_secs(13));
        assert_eq!(c.api.max_items_per_response, 99);
        assert_eq!(
            c.containers.slurm.sbatch_environment_variables,
            BTreeMap::from([(
                "ARVADOS_KEEP_SERVICES".to_string(),
                "https://example.com/keep1 https://example.com/keep2".to_string()
            )])
        );
    }

    #[test]
    fn legacy_errors_name_the_file_and_key() {
        let mut c = Cluster::default();
        let e = apply(&mut c, "PollPeriod: soon\n", "l.yml").unwrap_err();
        assert!(e.starts_with("l.yml: PollPeriod: "), "{e}");
        let e = apply(&mut c, "Bogus: 1\n", "l.yml").unwrap_err();
        assert!(e.contains("Bogus"), "{e}");
    }
}
