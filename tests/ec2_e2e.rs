//! End to end on EC2's API: the dispatcher with `Driver: ec2` against `moto_server`, where
//! this harness answers SSH on each address moto assigns (127.0.0.x, from the subnet
//! 127.0.0.0/24) with a stub VM that learned its instance secret from the user data. A
//! container goes from Queued to Complete and the idle VM is terminated.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{InstanceAttributeName, InstanceStateName};
use cloud::registry::Registry;
use dispatchcloud::service::Service;
use testkit::moto::Moto;
use testkit::ssh_vm::SshVm;
use testkit::stub_driver::{StubConfig, vm_handler};
use testkit::{ContainerSpec, FakeArvados, FakeConfig};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_runs_a_container_on_ec2_and_terminates_the_idle_vm() {
    let Some(moto) = Moto::start().await else {
        assert!(
            std::env::var_os("CI").is_none(),
            "moto_server missing in CI: scripts/test installs it"
        );
        eprintln!("SKIPPED: moto_server is not installed (scripts/test installs it into .venv)");
        return;
    };
    let ec2 = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .endpoint_url(&moto.url)
            .build(),
    );
    let vpc = ec2
        .create_vpc()
        .cidr_block("127.0.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_string();
    let subnet = ec2
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("127.0.0.0/24")
        .send()
        .await
        .unwrap()
        .subnet()
        .unwrap()
        .subnet_id()
        .unwrap()
        .to_string();
    let image = ec2.describe_images().send().await.unwrap().images()[0]
        .image_id()
        .unwrap()
        .to_string();

    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let key = cloud::sshd::new_ed25519_key();
    let ssh_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = arvados::Cluster {
        cluster_id: "zzzzz".into(),
        system_root_token: f.root_token().into(),
        management_token: "tok".into(),
        ..Default::default()
    };
    c.services.controller.external_url = f.base_url().into();
    c.containers.dispatch_private_key = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .unwrap()
        .to_string();
    let v = &mut c.containers.cloud_vms;
    v.driver = "ec2".into();
    v.image_id = image;
    v.ssh_port = ssh_port.to_string();
    v.deploy_runner_binary = String::new();
    v.boot_probe_command = "true".into();
    v.probe_interval = Duration::from_millis(100);
    v.poll_interval = Duration::from_millis(100);
    v.sync_interval = Duration::from_millis(300);
    v.timeout_idle = Duration::from_secs(2);
    v.driver_parameters = serde_norway::to_value(serde_json::json!({
        "AccessKeyID": "test", "SecretAccessKey": "test", "Region": "us-east-1",
        "SubnetID": subnet, "Endpoint": moto.url, "AdminUsername": "crunch",
    }))
    .unwrap();
    c.instance_types.insert(
        "small".into(),
        arvados::InstanceType {
            name: "small".into(),
            provider_type: "t3.large".into(),
            vcpus: 2,
            ram: 8 << 30,
            scratch: 100 << 30,
            included_scratch: 100 << 30,
            price: 0.08,
            ..Default::default()
        },
    );
    let u = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "300".into())],
        ..Default::default()
    });

    let mut drivers = Registry::new();
    drivers.register("ec2", Arc::new(cloud_ec2::Ec2Driver));
    let svc = Service::build(&c, &drivers).unwrap();
    let rx = tokio_util::sync::CancellationToken::new();
    let stop = rx.clone();
    let s = svc.clone();
    let run = tokio::spawn(async move { s.run(rx).await });

    // The "VMs": an SSH server on each address moto hands out, while the instance runs.
    let (harness_stop, mut harness_rx) = watch::channel(false);
    let pubkey = key.public_key().clone();
    let harness_ec2 = ec2.clone();
    let harness = tokio::spawn(async move {
        let mut vms: BTreeMap<String, SshVm> = BTreeMap::new();
        let mut served = 0;
        loop {
            if let Ok(out) = harness_ec2.describe_instances().send().await {
                for inst in out.reservations().iter().flat_map(|r| r.instances()) {
                    let id = inst.instance_id().unwrap_or_default().to_string();
                    let running =
                        inst.state().and_then(|s| s.name()) == Some(&InstanceStateName::Running);
                    if !running {
                        vms.remove(&id);
                        continue;
                    }
                    if vms.contains_key(&id) {
                        continue;
                    }
                    let Some(ip) = inst.private_ip_address() else {
                        continue;
                    };
                    let attr = harness_ec2
                        .describe_instance_attribute()
                        .instance_id(&id)
                        .attribute(InstanceAttributeName::UserData)
                        .send()
                        .await
                        .unwrap();
                    use base64::Engine;
                    let user_data = attr
                        .user_data()
                        .and_then(|d| d.value())
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    let addr: std::net::SocketAddr = format!("{ip}:{ssh_port}").parse().unwrap();
                    let handler = vm_handler(StubConfig::default(), &user_data);
                    let vm = SshVm::start_on(addr, handler, vec![pubkey.clone()])
                        .await
                        .unwrap();
                    vms.insert(id, vm);
                    served += 1;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = harness_rx.wait_for(|s| *s) => return served,
            }
        }
    });

    let state = |u: &str| {
        f.container(u).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while state(&u) != "Complete" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "container is {}",
            state(&u)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Idle for TimeoutIdle, then terminated.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = ec2.describe_instances().send().await.unwrap();
        let states: Vec<InstanceStateName> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.state().and_then(|s| s.name()).cloned())
            .collect();
        assert_eq!(states.len(), 1, "exactly one VM was created");
        if states[0] == InstanceStateName::Terminated {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "VM not terminated: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = harness_stop.send(true);
    assert_eq!(harness.await.unwrap(), 1);
    stop.cancel();
    let _ = run.await;
}
