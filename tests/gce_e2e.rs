//! End to end on Compute Engine's API: the dispatcher with `Driver: gce` against
//! `testkit::fake_gce`, where this harness answers SSH on each address the fake assigns
//! (127.0.0.x) with a stub VM that learned its instance secret from the startup script. A
//! container goes from Queued to Complete and the idle VM is deleted.

mod common;

use std::time::Duration;

use dispatchcloud::service::Service;
use testkit::{ContainerSpec, FakeArvados, FakeConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_runs_a_container_on_gce_and_deletes_the_idle_vm() {
    let gce = common::gce_vms::one_zone_gce().await;
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let key = cloud::sshd::new_ed25519_key();
    let ssh_port = testkit::free_port();
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
    v.driver = "gce".into();
    v.image_id = "projects/proj/global/images/arvados-compute".into();
    v.ssh_port = ssh_port.to_string();
    v.deploy_runner_binary = String::new();
    v.boot_probe_command = "true".into();
    v.probe_interval = Duration::from_millis(100);
    v.poll_interval = Duration::from_millis(100);
    v.sync_interval = Duration::from_millis(300);
    v.timeout_idle = Duration::from_secs(2);
    v.driver_parameters = serde_norway::to_value(serde_json::json!({
        "Project": "proj", "Zones": ["us-central1-a"], "Endpoint": gce.endpoint(),
        "AnonymousCredentials": true,
    }))
    .unwrap();
    c.instance_types.insert(
        "small".into(),
        arvados::InstanceType {
            name: "small".into(),
            provider_type: "e2-standard-2".into(),
            vcpus: 2,
            ram: 8 << 30,
            scratch: 100 << 30,
            included_scratch: 100 << 30,
            price: 0.07,
            ..Default::default()
        },
    );
    let u = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "300".into())],
        ..Default::default()
    });

    // The binary's own driver registry: `Driver: gce` is one of its names.
    let svc = Service::build(&c, &arvados_dispatch_cloud_drivers()).unwrap();
    let rx = tokio_util::sync::CancellationToken::new();
    let stop = rx.clone();
    let s = svc.clone();
    let run = tokio::spawn(async move { s.run(rx).await });

    // The "VMs": an SSH server on each address the fake hands out, while the instance exists.
    let harness_rx = tokio_util::sync::CancellationToken::new();
    let harness_stop = harness_rx.clone();
    let harness = tokio::spawn(common::gce_vms::serve_vms(
        gce.clone(),
        ssh_port,
        key.public_key().clone(),
        Default::default(),
        harness_rx,
    ));

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
    // Idle for TimeoutIdle, then deleted: judged by the fake's own record.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !gce.instances().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "VM not deleted: {:?}",
            gce.instances()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let inserts = gce
        .log()
        .iter()
        .filter(|l| l.starts_with("POST ") && l.contains("/instances?"))
        .count();
    assert_eq!(inserts, 1, "exactly one VM was created: {:?}", gce.log());
    harness_stop.cancel();
    assert_eq!(harness.await.unwrap(), 1);
    stop.cancel();
    let _ = run.await;
}

/// The drivers `arvados-dispatch-cloud` registers (its `drivers.rs`, compiled here too since a
/// binary crate cannot be imported); its `check` is the binary's business.
#[path = "../src/drivers.rs"]
#[allow(dead_code)]
mod drivers;

fn arvados_dispatch_cloud_drivers() -> cloud::registry::Registry {
    drivers::registry()
}

/// `arvados-dispatch-cloud cloudtest` with `Driver: gce`: every step passes against the fake,
/// and the VM it made is gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudtest_passes_on_gce() {
    let gce = common::gce_vms::one_zone_gce().await;
    let key = cloud::sshd::new_ed25519_key();
    let ssh_port = testkit::free_port();
    let dir = tempfile::tempdir().unwrap();
    let key_path = common::write_private_key(dir.path(), &key);
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "Clusters:
  zzzzz:
    Containers:
      DispatchPrivateKey: file://{key}
      CloudVMs:
        Enable: true
        Driver: gce
        ImageID: projects/proj/global/images/arvados-compute
        SSHPort: \"{ssh_port}\"
        BootProbeCommand: \"true\"
        ProbeInterval: 100ms
        TimeoutBooting: 20s
        SyncInterval: 100ms
        ResourceTags: {{Owner: research}}
        DriverParameters:
          Project: proj
          Zones: [us-central1-a]
          Endpoint: \"{endpoint}\"
          AnonymousCredentials: true
    InstanceTypes:
      small: {{ProviderType: e2-small, VCPUs: 2, RAM: 2GiB, Price: 0.02}}
",
            key = key_path.display(),
            endpoint = gce.endpoint(),
        ),
    )
    .unwrap();
    let harness_rx = tokio_util::sync::CancellationToken::new();
    let harness_stop = harness_rx.clone();
    let harness = tokio::spawn(common::gce_vms::serve_vms(
        gce.clone(),
        ssh_port,
        key.public_key().clone(),
        Default::default(),
        harness_rx,
    ));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
        .args(["cloudtest", "--config"])
        .arg(&config)
        .args(["--command", "crunch-run --list"])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "create instance (type small, provider type e2-small",
        "find created instance in the list: ok, us-central1-a/",
        "check ResourceTags on the instance: ok",
        "boot probe \"true\": ok",
        "command \"crunch-run --list\": ok",
        "and wait until it is gone: ok",
        "PASS",
    ] {
        assert!(stdout.contains(step), "missing {step:?}:\n{stdout}");
    }
    assert!(gce.instances().is_empty(), "{:?}", gce.instances());
    harness_stop.cancel();
    assert_eq!(harness.await.unwrap(), 1);
}
