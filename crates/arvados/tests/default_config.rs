//! Arvados' real `config.default.yml` loads, and our built-in defaults equal its values.

use arvados::config::{Cluster, ConfigSource, load_cluster};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arvados-config.default.yml")
}

#[test]
fn real_default_config_loads_as_cluster_xxxxx() {
    let c = load_cluster(&ConfigSource { path: fixture() }, None).expect("default config loads");
    assert_eq!(c.cluster_id, "xxxxx");
    // SAMPLE entries are not real entries.
    assert!(c.instance_types.is_empty());
    assert!(c.containers.cloud_vms.resource_tags.is_empty());
    assert!(c.services.dispatch_cloud.internal_urls.is_empty());
}

#[test]
fn built_in_defaults_equal_config_default_yml() {
    let loaded = load_cluster(&ConfigSource { path: fixture() }, Some("xxxxx")).unwrap();
    let ours = Cluster {
        cluster_id: "xxxxx".into(),
        ..Cluster::default()
    };
    // Compare section by section first, for a readable failure.
    assert_eq!(loaded.containers.cloud_vms, ours.containers.cloud_vms);
    assert_eq!(loaded.containers, ours.containers);
    assert_eq!(loaded.api, ours.api);
    assert_eq!(loaded.postgresql, ours.postgresql);
    assert_eq!(loaded.system_logs, ours.system_logs);
    assert_eq!(loaded, ours);
}

#[test]
fn an_operator_config_overrides_only_what_it_sets() {
    let text = std::fs::read_to_string(fixture())
        .unwrap()
        .replace("        TimeoutIdle: 1m\n", "        TimeoutIdle: 1m30s\n");
    let c = arvados::config::load_cluster_from_str(&text, "edited.yml", None).unwrap();
    assert_eq!(c.containers.cloud_vms.timeout_idle.as_secs(), 90);
    assert_eq!(c.containers.cloud_vms.timeout_booting.as_secs(), 600);
    let bad = std::fs::read_to_string(fixture())
        .unwrap()
        .replace("        TimeoutIdle: 1m\n", "        TimeoutIdle: 1x\n");
    let err = arvados::config::load_cluster_from_str(&bad, "edited.yml", None).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("Clusters.xxxxx.Containers.CloudVMs.TimeoutIdle: invalid duration \"1x\""),
        "{err}"
    );
}
