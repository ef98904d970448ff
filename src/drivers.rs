//! The cloud drivers this binary knows, by their `CloudVMs.Driver` names.

use std::sync::Arc;

use cloud::registry::Registry;

pub fn registry() -> Registry {
    let mut r = Registry::new();
    #[cfg(feature = "simulator")]
    r.register("stub", Arc::new(testkit::stub_driver::StubDriver));
    r.register("loopback", Arc::new(cloud_loopback::LoopbackDriver));
    r.register("ec2", Arc::new(cloud_ec2::Ec2Driver));
    r.register("gce", Arc::new(cloud_gce::GceDriver));
    r
}

/// Refuse a `CloudVMs.Driver` this build does not have, naming the key and the choices; the
/// stub driver gets its own reason (it is the simulator's fake cloud, left out of the
/// packaged build).
pub fn check(cluster: &arvados::Cluster) -> anyhow::Result<()> {
    let name = cluster.containers.cloud_vms.driver.as_str();
    let r = registry();
    if r.get(name).is_ok() {
        return Ok(());
    }
    if name == "stub" {
        anyhow::bail!(
            "Containers.CloudVMs.Driver: \"stub\" is the simulator's fake cloud, which this production build leaves out (a build with the default \"simulator\" feature has it)"
        );
    }
    anyhow::bail!(
        "Containers.CloudVMs.Driver: unsupported cloud driver {name:?} (this build has: {})",
        r.names().join(", ")
    )
}
