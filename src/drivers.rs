//! The cloud drivers this binary knows, by their `CloudVMs.Driver` names.

use std::sync::Arc;

use cloud::registry::Registry;

pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.register("stub", Arc::new(testkit::stub_driver::StubDriver));
    r.register("loopback", Arc::new(cloud_loopback::LoopbackDriver));
    r.register("ec2", Arc::new(cloud_ec2::Ec2Driver));
    r.register("gce", Arc::new(cloud_gce::GceDriver));
    r
}
