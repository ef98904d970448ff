//! End to end on EC2's API: the dispatcher with `Driver: ec2` against `moto_server` (behind
//! the project's fault proxy), where this harness answers SSH on each address moto assigns
//! (127.0.0.x, from the subnet 127.0.0.0/24) with a stub VM that learned its instance secret
//! from the user data.
//!
//! * A container goes from Queued to Complete and the idle VM is terminated.
//! * Issue 19 over EC2: a spot interruption notice drains the instance (its `IdleBehavior`
//!   tag as EC2 has it) and it is terminated when its container ends; a spot shortage (the
//!   fault proxy answers spot `RunInstances` with `InsufficientInstanceCapacity`) falls back
//!   to an on-demand launch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ec2::types::{InstanceAttributeName, InstanceStateName};
use cloud::registry::Registry;
use dispatchcloud::service::Service;
use dispatchcloud::settings::Settings;
use testkit::moto::Ec2Fault;
use testkit::ssh_vm::SshVm;
use testkit::stub_driver::{StubConfig, vm_handler};
use testkit::{ContainerSpec, FakeArvados, FakeConfig};
use tokio::sync::watch;

mod common;

use common::moto_vpc::{MotoVpc as Rig, moto_vpc as rig};

/// A running dispatcher with its VM harness.
struct Running {
    stop: tokio_util::sync::CancellationToken,
    run: tokio::task::JoinHandle<()>,
    harness_stop: watch::Sender<bool>,
    harness: tokio::task::JoinHandle<usize>,
}

impl Running {
    /// Stop the dispatcher and the harness; how many VMs the harness served.
    async fn stop(self) -> usize {
        let _ = self.harness_stop.send(true);
        let served = self.harness.await.unwrap();
        self.stop.cancel();
        let _ = self.run.await;
        served
    }
}

impl Rig {
    /// The cluster: `Driver: ec2` at the fault proxy, types `types`, the fake API `f`.
    fn cluster(
        &self,
        f: &FakeArvados,
        key: &russh::keys::PrivateKey,
        ssh_port: u16,
        types: &[arvados::InstanceType],
    ) -> arvados::Cluster {
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
        v.image_id = self.image.clone();
        v.ssh_port = ssh_port.to_string();
        v.deploy_runner_binary = String::new();
        v.boot_probe_command = "true".into();
        v.probe_interval = Duration::from_millis(100);
        v.poll_interval = Duration::from_millis(100);
        v.sync_interval = Duration::from_millis(300);
        v.timeout_idle = Duration::from_secs(2);
        v.driver_parameters = serde_norway::to_value(serde_json::json!({
            "AccessKeyID": "test", "SecretAccessKey": "test", "Region": "us-east-1",
            "SubnetID": self.subnet, "Endpoint": self.proxy.url, "AdminUsername": "crunch",
        }))
        .unwrap();
        for t in types {
            c.instance_types.insert(t.name.clone(), t.clone());
        }
        c
    }

    /// Start the dispatcher, and the "VMs": an SSH server (a stub VM with `vm` knobs) on
    /// each address moto hands out, while the instance runs.
    fn start(
        &self,
        c: &arvados::Cluster,
        settings: &Settings,
        key: &russh::keys::PrivateKey,
        ssh_port: u16,
        vm: StubConfig,
    ) -> Running {
        let mut drivers = Registry::new();
        drivers.register("ec2", Arc::new(cloud_ec2::Ec2Driver));
        let svc = Service::build_with(c, settings, &drivers).unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let rx = stop.clone();
        let run = tokio::spawn(async move {
            let _ = svc.run(rx).await;
        });
        let (harness_stop, mut harness_rx) = watch::channel(false);
        let pubkey = key.public_key().clone();
        let ec2 = self.ec2.clone();
        let harness = tokio::spawn(async move {
            let mut vms: BTreeMap<String, SshVm> = BTreeMap::new();
            let mut served = 0;
            loop {
                if let Ok(out) = ec2.describe_instances().send().await {
                    for inst in out.reservations().iter().flat_map(|r| r.instances()) {
                        let id = inst.instance_id().unwrap_or_default().to_string();
                        let running = inst.state().and_then(|s| s.name())
                            == Some(&InstanceStateName::Running);
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
                        let attr = ec2
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
                        let addr: std::net::SocketAddr =
                            format!("{ip}:{ssh_port}").parse().unwrap();
                        let handler = vm_handler(vm.clone(), &user_data);
                        let ssh = SshVm::start_on(addr, handler, vec![pubkey.clone()])
                            .await
                            .unwrap();
                        vms.insert(id, ssh);
                        served += 1;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = harness_rx.wait_for(|s| *s) => return served,
                }
            }
        });
        Running {
            stop,
            run,
            harness_stop,
            harness,
        }
    }

    /// Every instance moto has: (id, state, tags).
    async fn instances(&self) -> Vec<(String, InstanceStateName, BTreeMap<String, String>)> {
        let out = self.ec2.describe_instances().send().await.unwrap();
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap_or_default().to_string(),
                    i.state().and_then(|s| s.name()).cloned().unwrap(),
                    i.tags()
                        .iter()
                        .map(|t| {
                            (
                                t.key().unwrap_or_default().to_string(),
                                t.value().unwrap_or_default().to_string(),
                            )
                        })
                        .collect(),
                )
            })
            .collect()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Rig {
    /// A dispatcher with `settings` (settings-file YAML) and one 8 s container that asked for
    /// spot, whose VM's crunch-run records the spot interruption notice a second after the
    /// VM comes up (`TimeoutIdle` 10 minutes, so only the notice ends the VM early).
    async fn doomed_spot_container(&self, settings: &str) -> (FakeArvados, String, Running) {
        let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
        let key = cloud::sshd::new_ed25519_key();
        let port = free_port();
        let mut c = self.cluster(&f, &key, port, &[types().1]);
        c.containers.cloud_vms.timeout_idle = Duration::from_secs(600);
        let settings = Settings::from_str(settings, "test").unwrap();
        let u = f.add_container(&container(8000, true));
        let vm = StubConfig {
            vanish_after: Some(Duration::from_secs(600)),
            interruption_notice: Some(Duration::from_secs(599)),
            ..Default::default()
        };
        let run = self.start(&c, &settings, &key, port, vm);
        (f, u, run)
    }
}

/// `t3.large` on demand, and its spot variant.
fn types() -> (arvados::InstanceType, arvados::InstanceType) {
    let ondemand = arvados::InstanceType {
        name: "small".into(),
        provider_type: "t3.large".into(),
        vcpus: 2,
        ram: 8 << 30,
        scratch: 100 << 30,
        included_scratch: 100 << 30,
        price: 0.08,
        ..Default::default()
    };
    let spot = arvados::InstanceType {
        name: "small.spot".into(),
        preemptible: true,
        price: 0.03,
        ..ondemand.clone()
    };
    (ondemand, spot)
}

fn container(ms: u64, preemptible: bool) -> ContainerSpec {
    ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), ms.to_string())],
        preemptible,
        ..Default::default()
    }
}

async fn wait_until(what: &str, limit: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn state(f: &FakeArvados, u: &str) -> String {
    f.container(u).unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_runs_a_container_on_ec2_and_terminates_the_idle_vm() {
    let Some(r) = rig().await else { return };
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let key = cloud::sshd::new_ed25519_key();
    let port = free_port();
    let c = r.cluster(&f, &key, port, &[types().0]);
    let u = f.add_container(&container(300, false));
    let run = r.start(&c, &Settings::default(), &key, port, StubConfig::default());
    wait_until(
        "the container to complete",
        Duration::from_secs(60),
        async || state(&f, &u) == "Complete",
    )
    .await;
    // Idle for TimeoutIdle, then terminated.
    wait_until(
        "the VM to be terminated",
        Duration::from_secs(30),
        async || {
            let states: Vec<InstanceStateName> =
                r.instances().await.into_iter().map(|(_, s, _)| s).collect();
            assert_eq!(states.len(), 1, "exactly one VM was created");
            states[0] == InstanceStateName::Terminated
        },
    )
    .await;
    assert_eq!(run.stop().await, 1);
}

/// Issue 19 over EC2, `IdleTime.Adaptive`: after its one container, nothing asks for the
/// VM's type, so it is terminated after `Min` (1 s) although `TimeoutIdle` is 10 minutes;
/// off (Arvados), it is still running well after that. Moto's instance states are the
/// oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_idle_time_terminates_an_unwanted_ec2_instance_early() {
    for adaptive in [false, true] {
        // A cloud each: the second dispatcher would adopt the first one's idle VM.
        let Some(r) = rig().await else { return };
        let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
        let key = cloud::sshd::new_ed25519_key();
        let port = free_port();
        let mut c = r.cluster(&f, &key, port, &[types().0]);
        c.containers.cloud_vms.timeout_idle = Duration::from_secs(600);
        let settings = if adaptive {
            Settings::from_str(
                "IdleTime:\n  Adaptive: true\n  Min: 1s\n  Max: 10m\n",
                "test",
            )
            .unwrap()
        } else {
            Settings::default()
        };
        let u = f.add_container(&container(300, false));
        let run = r.start(&c, &settings, &key, port, StubConfig::default());
        wait_until(
            "the container to complete",
            Duration::from_secs(60),
            async || state(&f, &u) == "Complete",
        )
        .await;
        let ours = async || -> Vec<InstanceStateName> {
            r.instances().await.into_iter().map(|(_, s, _)| s).collect()
        };
        if adaptive {
            wait_until(
                "the idle VM to be terminated",
                Duration::from_secs(30),
                async || ours().await == [InstanceStateName::Terminated],
            )
            .await;
        } else {
            tokio::time::sleep(Duration::from_secs(4)).await;
            assert_eq!(ours().await, [InstanceStateName::Running]);
        }
        run.stop().await;
    }
}

/// Issue 19 over EC2, `Interruptions.Drain`: the stub VM's crunch-run records the spot
/// interruption notice a second after the VM comes up; the dispatcher drains the instance
/// (EC2 has its `ArvadosIdleBehavior` tag at `drain`), and terminates it as soon as its
/// container ends, long before `TimeoutIdle` (10 minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_notice_drains_the_ec2_instance() {
    let Some(r) = rig().await else { return };
    let (f, u, run) = r
        .doomed_spot_container("Interruptions:\n  Drain: true\n")
        .await;
    wait_until("the notice", Duration::from_secs(60), async || {
        f.container(&u).unwrap()["runtime_status"]["preemptionNotice"].is_string()
    })
    .await;
    wait_until(
        "the drain tag on EC2",
        Duration::from_secs(20),
        async || {
            let all = r.instances().await;
            all.iter().any(|(_, _, tags)| {
                tags.get("ArvadosIdleBehavior").map(String::as_str) == Some("drain")
            })
        },
    )
    .await;
    assert_eq!(state(&f, &u), "Running", "drained while its container runs");
    wait_until(
        "the container to complete",
        Duration::from_secs(30),
        async || state(&f, &u) == "Complete",
    )
    .await;
    wait_until(
        "the drained VM to be terminated",
        Duration::from_secs(30),
        async || {
            let all = r.instances().await;
            assert_eq!(all.len(), 1, "one VM: {all:?}");
            all[0].1 == InstanceStateName::Terminated
        },
    )
    .await;
    let spot = r.proxy.calls("RunInstances");
    assert_eq!(spot.len(), 1);
    assert_eq!(spot[0]["InstanceMarketOptions.MarketType"], "spot");
    run.stop().await;
}

/// Issue 19 over EC2, `Interruptions.PreBoot`: as above, and at the notice the dispatcher
/// also launches a replacement spot `t3.large` while the container still runs on the doomed
/// VM (the drain test above, without `PreBoot`, sees one launch only). The proxy's record of
/// `RunInstances` calls is the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_notice_pre_boots_a_replacement_on_ec2() {
    let Some(r) = rig().await else { return };
    let (f, u, run) = r
        .doomed_spot_container("Interruptions:\n  Drain: true\n  PreBoot: true\n")
        .await;
    wait_until(
        "the replacement launch",
        Duration::from_secs(60),
        async || r.proxy.calls("RunInstances").len() == 2,
    )
    .await;
    assert_eq!(
        state(&f, &u),
        "Running",
        "pre-booted while its container runs"
    );
    let launches = r.proxy.calls("RunInstances");
    assert!(
        launches
            .iter()
            .all(|l| l["InstanceMarketOptions.MarketType"] == "spot"),
        "the same shape: {launches:?}"
    );
    wait_until(
        "the container to complete",
        Duration::from_secs(30),
        async || state(&f, &u) == "Complete",
    )
    .await;
    // The drained VM goes; the replacement stays (idle, TimeoutIdle 10 minutes).
    wait_until(
        "the drained VM to be terminated",
        Duration::from_secs(30),
        async || {
            let all = r.instances().await;
            all.iter()
                .filter(|(_, st, _)| *st == InstanceStateName::Terminated)
                .count()
                == 1
        },
    )
    .await;
    let all = r.instances().await;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(
        r.proxy.calls("RunInstances").len(),
        2,
        "one replacement only"
    );
    run.stop().await;
}

/// Issue 19 over EC2, `SpotFallback`: spot `t3.large` is short (the fault proxy answers spot
/// `RunInstances` with `InsufficientInstanceCapacity`); after `After` (1 s) the container
/// that asked for spot runs on an on-demand `t3.large`, launched without spot market options.
/// Without the fallback (Arvados) it keeps waiting and no on-demand launch goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_container_falls_back_to_an_on_demand_ec2_instance() {
    let Some(r) = rig().await else { return };
    r.proxy.inject(
        Ec2Fault::new(
            "RunInstances",
            "InsufficientInstanceCapacity",
            "We currently do not have sufficient t3.large capacity in the Availability Zone you requested.",
        )
        .when("InstanceMarketOptions.MarketType", "spot"),
    );
    let (ondemand, spot) = types();
    let on_demand_launches = || {
        r.proxy
            .calls("RunInstances")
            .iter()
            .filter(|c| !c.contains_key("InstanceMarketOptions.MarketType"))
            .count()
    };
    for fallback in [false, true] {
        let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
        let key = cloud::sshd::new_ed25519_key();
        let port = free_port();
        let c = r.cluster(&f, &key, port, &[ondemand.clone(), spot.clone()]);
        let settings = if fallback {
            Settings::from_str("SpotFallback:\n  After: 1s\n", "test").unwrap()
        } else {
            Settings::default()
        };
        let before = r.proxy.calls("RunInstances").len();
        let u = f.add_container(&container(300, true));
        let run = r.start(&c, &settings, &key, port, StubConfig::default());
        if fallback {
            wait_until(
                "the container to complete",
                Duration::from_secs(60),
                async || state(&f, &u) == "Complete",
            )
            .await;
            assert_eq!(on_demand_launches(), 1);
        } else {
            wait_until(
                "a spot launch to fail",
                Duration::from_secs(30),
                async || r.proxy.calls("RunInstances").len() > before,
            )
            .await;
            // Well past `After`: it still waits for spot.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let st = state(&f, &u);
            assert!(st == "Queued" || st == "Locked", "{st}");
            assert_eq!(on_demand_launches(), 0);
        }
        run.stop().await;
    }
}
