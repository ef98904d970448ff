//! Shared setup for tests against the fake Arvados API.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arvados::config::Cluster;
use arvados::{Client, ClientConfig, InstanceType};
use dispatchcloud::node_size::TypeChooser;
use dispatchcloud::queue::ContainerQueue;
use testkit::fake_api::{FakeArvados, FakeConfig};

pub const GIB: i64 = 1 << 30;

pub async fn fake() -> FakeArvados {
    FakeArvados::start(FakeConfig::default())
        .await
        .expect("fake API starts")
}

pub fn client(fake: &FakeArvados) -> Client {
    Client::new(ClientConfig {
        base_url: url::Url::parse(fake.base_url()).unwrap(),
        token: fake.root_token().to_string(),
        insecure: false,
        timeout: Some(Duration::from_secs(30)),
        retry: Default::default(),
    })
    .unwrap()
}

pub fn instance_type(name: &str, vcpus: i64, ram: i64, scratch: i64, price: f64) -> InstanceType {
    InstanceType {
        name: name.into(),
        provider_type: name.into(),
        vcpus,
        ram,
        scratch,
        included_scratch: scratch,
        price,
        ..Default::default()
    }
}

pub fn cluster(types: Vec<InstanceType>) -> Cluster {
    Cluster {
        instance_types: types
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect::<BTreeMap<_, _>>(),
        ..Cluster::default()
    }
}

pub fn queue(fake: &FakeArvados, cluster: &Cluster) -> (Arc<ContainerQueue>, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let q = ContainerQueue::new(client(fake), TypeChooser::new(cluster), &registry).unwrap();
    (q, registry)
}

/// Poll `f` every 20 ms until it is true or `secs` pass.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Appendix B.1's `InstanceType(i)`: `type<i>`, `providertype<i>`, i VCPUs, i × 1.1 GiB RAM,
/// i GiB scratch, price i × 0.123.
pub fn fixture_type(i: i64) -> InstanceType {
    InstanceType {
        name: format!("type{i}"),
        provider_type: format!("providertype{i}"),
        vcpus: i,
        ram: i * GIB * 11 / 10,
        scratch: i * GIB,
        included_scratch: i * GIB,
        price: i as f64 * 0.123,
        ..Default::default()
    }
}

/// Poll `cond` every 20 ms until it holds; panic naming `what` after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A driver that always hands out the same stub cloud (two services can share it).
#[allow(unused_imports)]
pub use testkit::stub_driver::SharedStubDriver as SharedStub;

/// A whole dispatcher's config for the stub cloud against the fake API `f`, with short
/// intervals: management token `token`, a fresh dispatch key, Appendix B.1 types 1–16.
pub fn stub_service_cluster(f: &FakeArvados, token: &str) -> Cluster {
    let mut c = Cluster {
        cluster_id: "zzzzz".into(),
        management_token: token.into(),
        system_root_token: f.root_token().into(),
        ..Default::default()
    };
    c.services.controller.external_url = f.base_url().into();
    c.containers.dispatch_private_key = cloud::sshd::new_ed25519_key()
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .unwrap()
        .to_string();
    c.containers.cloud_vms.driver = "stub".into();
    c.containers.cloud_vms.deploy_runner_binary = String::new();
    c.containers.cloud_vms.poll_interval = Duration::from_millis(100);
    c.containers.cloud_vms.probe_interval = Duration::from_millis(50);
    c.containers.cloud_vms.sync_interval = Duration::from_millis(200);
    c.containers.cloud_vms.timeout_idle = Duration::from_secs(2);
    c.containers.cloud_vms.max_concurrent_instance_create_ops = 0;
    c.containers.cloud_vms.resource_tags =
        [("testtag".to_string(), "test value".to_string())].into();
    for i in [1, 2, 3, 4, 6, 8, 16] {
        let t = fixture_type(i);
        c.instance_types.insert(t.name.clone(), t);
    }
    c
}

/// The container's `state` as the fake API has it.
pub fn container_state(f: &FakeArvados, uuid: &str) -> String {
    f.container(uuid).expect("container exists")["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
