//! The stub cloud driver: VMs reachable over real SSH whose crunch-run drives containers on
//! the fake Arvados API.

use std::time::Duration;

use arvados::InstanceType;
use cloud::{CreateRequest, Driver, InstanceTags};
use serde_json::json;
use testkit::ssh_vm::{new_ed25519_key, run_command};
use testkit::stub_driver::StubDriver;
use testkit::{ContainerSpec, FakeArvados, FakeConfig};

fn it(name: &str, preemptible: bool) -> InstanceType {
    InstanceType {
        name: name.into(),
        provider_type: name.into(),
        vcpus: 2,
        ram: 4 << 30,
        preemptible,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_vm_answers_the_remote_command_contract() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let key = new_ed25519_key();
    let set = StubDriver
        .instance_set(
            &json!({"BootDelay": "300ms", "QuotaMaxInstances": 1}),
            &"zzzzz-gj3su-000000000000000".to_string(),
            &InstanceTags::new(),
        )
        .unwrap();
    let mut tags = InstanceTags::new();
    tags.insert("ArvadosInstanceSecret".into(), "s3cr3t".into());
    tags.insert("ArvadosInstanceType".into(), "m4".into());
    let vm = set
        .create(
            &it("m4", false),
            CreateRequest {
                tags: tags.clone(),
                public_key: Some(key.public_key().to_openssh().unwrap()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(vm.id(), "inst1,m4");
    assert_eq!(vm.tags(), tags);
    assert_eq!(set.instance_quota_group(&it("m4", false)), "m");
    assert_eq!(set.instance_quota_group(&it("m4", true)), "m-p");
    let e = set
        .create(&it("m4", false), CreateRequest::default())
        .await
        .err()
        .unwrap();
    assert!(e.is_quota(), "{e}");

    let addr = vm.address();
    let run = |cmd: &'static str, stdin: Vec<u8>| {
        let (addr, key) = (addr.clone(), key.clone());
        async move {
            run_command(&addr, None, &key, "root", cmd, &stdin)
                .await
                .unwrap()
        }
    };
    let booting = run("systemctl is-system-running", vec![]).await;
    assert_eq!(
        (booting.exit, booting.stderr.as_slice()),
        (1, &b"stub is booting"[..])
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(run("systemctl is-system-running", vec![]).await.exit, 0);
    assert_eq!(
        run("cat /var/run/arvados-instance-secret", vec![])
            .await
            .stdout,
        b"s3cr3t"
    );
    assert_eq!(run("frobnicate", vec![]).await.exit, 1);

    // crunch-run --detach drives a container to Complete on the fake API.
    let u = f.add_container(&ContainerSpec {
        environment: vec![
            ("FAKE_CRUNCH_RUN_MS".into(), "800".into()),
            ("FAKE_CRUNCH_RUN_EXIT".into(), "4".into()),
        ],
        ..Default::default()
    });
    let api = arvados::Client::new(arvados::ClientConfig {
        base_url: url::Url::parse(f.base_url()).unwrap(),
        token: f.root_token().into(),
        insecure: false,
        timeout: None,
    })
    .unwrap();
    api.lock_container(&u).await.unwrap();
    let config =
        json!({"Env": {"ARVADOS_API_HOST": f.base_url(), "ARVADOS_API_TOKEN": f.root_token()}})
            .to_string()
            .into_bytes();
    let cmd = format!("sudo /tmp/arvados-crunch-run/crunch-run~abc --detach --stdin-config '{u}'");
    let started = run_command(&addr, None, &key, "root", &cmd, &config)
        .await
        .unwrap();
    assert_eq!(
        started.exit,
        0,
        "{:?}",
        String::from_utf8_lossy(&started.stderr)
    );
    let state = |u: &str| {
        f.container(u).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for _ in 0..100 {
        if state(&u) == "Running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = run("crunch-run --list", vec![]).await;
    assert_eq!(String::from_utf8(listed.stdout).unwrap(), format!("{u}\n"));
    for _ in 0..200 {
        if state(&u) == "Complete" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&u), "Complete");
    assert_eq!(f.container(&u).unwrap()["exit_code"], 4);
    assert!(run("crunch-run --list", vec![]).await.stdout.is_empty());

    // --kill 15 cancels a running one.
    let long = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "600000".into())],
        ..Default::default()
    });
    api.lock_container(&long).await.unwrap();
    let cmd = format!("crunch-run --detach --stdin-config {long}");
    assert_eq!(
        run_command(&addr, None, &key, "root", &cmd, &config)
            .await
            .unwrap()
            .exit,
        0
    );
    for _ in 0..100 {
        if state(&long) == "Running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cmd = format!("crunch-run --kill 15 {long}");
    assert_eq!(
        run_command(&addr, None, &key, "root", &cmd, &[])
            .await
            .unwrap()
            .exit,
        0
    );
    assert_eq!(state(&long), "Cancelled");

    // Host key verification, then destroy.
    let host_key = run_command(&addr, None, &key, "root", "true", &[])
        .await
        .unwrap();
    assert_eq!(host_key.exit, 0);
    assert!(vm.verify_host_key("ssh-ed25519 AAAAwrong").await.is_err());
    vm.destroy().await.unwrap();
    assert!(
        set.instances(&InstanceTags::new())
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        run_command(&addr, None, &key, "root", "true", &[])
            .await
            .is_err()
    );
}

/// The stub driver passes the cloud layer's conformance suite, reached over real SSH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_passes_the_conformance_suite() {
    let key = new_ed25519_key();
    let set = StubDriver
        .instance_set(&json!({}), &"conformance".to_string(), &InstanceTags::new())
        .unwrap();
    let k = key.clone();
    let reach: cloud::conformance::Reach = std::sync::Arc::new(move |addr: String| {
        let k = k.clone();
        Box::pin(async move {
            run_command(&addr, None, &k, "root", "true", &[])
                .await
                .is_ok_and(|o| o.exit == 0)
        })
    });
    cloud::conformance::run(cloud::conformance::Suite {
        set,
        instance_type: it("c2", false),
        request: CreateRequest {
            public_key: Some(key.public_key().to_openssh().unwrap()),
            ..Default::default()
        },
        reach: Some(reach),
        patience: Duration::from_secs(5),
    })
    .await
    .unwrap();
}
