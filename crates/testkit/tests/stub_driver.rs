//! The stub cloud driver: VMs reachable over real SSH whose crunch-run drives containers on
//! the fake Arvados API.

use std::time::Duration;

use arvados::InstanceType;
use cloud::{CreateRequest, Driver, Instance, InstanceSet, InstanceTags};
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
                init_command: cloud::tags::user_data("s3cr3t", "echo booted"),
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
    assert_eq!(run("frobnicate", vec![]).await.exit, 127);

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
        retry: Default::default(),
    })
    .unwrap();
    api.lock_container(&u).await.unwrap();
    let config =
        json!({"Env": {"ARVADOS_API_HOST": f.base_url(), "ARVADOS_API_TOKEN": f.root_token()}})
            .to_string()
            .into_bytes();
    let cmd = format!("sudo crunch-run --detach --stdin-config '{u}'");
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
    use cloud::conformance::{ErrorCase, Want};
    // Each case gets a fresh stub set with the knob that provokes it.
    let case = |name: &'static str, want: Want, params: serde_json::Value, calls: usize| {
        let key = key.public_key().to_openssh().unwrap();
        ErrorCase {
            name,
            want,
            provoke: Box::new(move || {
                let (params, key) = (params.clone(), key.clone());
                Box::pin(async move {
                    let set = StubDriver
                        .instance_set(&params, &"c".to_string(), &InstanceTags::new())
                        .unwrap();
                    let req = CreateRequest {
                        public_key: Some(key),
                        ..Default::default()
                    };
                    for _ in 1..calls {
                        set.create(&it("c2", false), req.clone()).await?;
                    }
                    set.create(&it("c2", false), req).await.map(|_| ())
                })
            }),
        }
    };
    let error_cases = vec![
        case(
            "MinTimeBetweenCreateCalls",
            Want::RateLimit,
            json!({"MinTimeBetweenCreateCalls": "1h"}),
            2,
        ),
        case(
            "QuotaMaxInstances",
            Want::Quota,
            json!({"QuotaMaxInstances": 1}),
            2,
        ),
        case(
            "CapacityPerType",
            Want::CapacityInstanceType,
            json!({"CapacityPerType": {"c2": 0}}),
            1,
        ),
        case(
            "ErrorRateCreate",
            Want::Other,
            json!({"ErrorRateCreate": 1.0}),
            1,
        ),
    ];
    cloud::conformance::run(cloud::conformance::Suite {
        set,
        error_cases,
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

/// A stub set with `params`, plus a client key it authorises.
fn stub(
    params: serde_json::Value,
) -> (
    std::sync::Arc<dyn cloud::InstanceSet>,
    russh::keys::PrivateKey,
) {
    let set = StubDriver
        .instance_set(&params, &"zzzzz-test".to_string(), &InstanceTags::new())
        .unwrap();
    (set, new_ed25519_key())
}

fn request(key: &russh::keys::PrivateKey) -> CreateRequest {
    CreateRequest {
        init_command: cloud::tags::user_data("sekrit", ""),
        public_key: Some(key.public_key().to_openssh().unwrap()),
        ..Default::default()
    }
}

async fn sh(
    vm: &dyn cloud::Instance,
    key: &russh::keys::PrivateKey,
    cmd: &str,
    stdin: &[u8],
) -> testkit::ssh_vm::Outcome {
    run_command(&vm.address(), None, key, "root", cmd, stdin)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_cloud_faults_surface_as_typed_errors() {
    let (set, key) = stub(json!({"CapacityPerType": {"m4": 1}}));
    set.create(&it("m4", false), request(&key)).await.unwrap();
    let e = set
        .create(&it("m4", false), request(&key))
        .await
        .err()
        .unwrap();
    assert!(e.is_instance_type_specific(), "{e}");
    set.create(&it("c4", false), request(&key)).await.unwrap();

    let (set, key) = stub(json!({"MinTimeBetweenCreateCalls": "1h"}));
    set.create(&it("c4", false), request(&key)).await.unwrap();
    let e = set
        .create(&it("c4", false), request(&key))
        .await
        .err()
        .unwrap();
    let retry = e.earliest_retry().expect("rate-limit error");
    assert!(
        retry > std::time::SystemTime::now() + Duration::from_secs(3000),
        "{e}"
    );
    assert!(e.to_string().starts_with("rate limited until "), "{e}");

    let (set, key) = stub(json!({"MinTimeBetweenInstancesCalls": "1h"}));
    set.instances(&InstanceTags::new()).await.unwrap();
    let e = set.instances(&InstanceTags::new()).await.err().unwrap();
    assert!(e.earliest_retry().is_some(), "{e}");

    let (set, _) = stub(json!({"ErrorRateCreate": 1.0}));
    let e = set
        .create(&it("c4", false), request(&key))
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind, cloud::ErrorKind::Other);

    let (set, key) = stub(json!({"ErrorRateDestroy": 1.0}));
    let vm = set.create(&it("c4", false), request(&key)).await.unwrap();
    assert!(vm.destroy().await.is_err());
    assert_eq!(
        set.instances(&InstanceTags::new()).await.unwrap().len(),
        1,
        "failed destroy keeps the VM"
    );

    // Error rates are seeded: the same seed fails the same calls.
    let pattern = |seed: u64| async move {
        let (set, key) = stub(json!({"ErrorRateCreate": 0.5, "Seed": seed}));
        let mut out = Vec::new();
        for _ in 0..12 {
            out.push(set.create(&it("c4", false), request(&key)).await.is_ok());
        }
        out
    };
    let a = pattern(7).await;
    assert_eq!(a, pattern(7).await);
    assert!(a.contains(&true) && a.contains(&false), "{a:?}");
}

/// `ShortOfCapacityUntil`: a provider type (or only its spot market) is short for a while
/// from the set's start; the launch log records every create's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_capacity_shortage_ends_and_the_launch_log_records_every_create() {
    let set = testkit::stub_driver::StubSet::new(
        testkit::stub_driver::StubConfig::from_params(
            &json!({"ShortOfCapacityUntil": {"m4": "1s", "c4-preemptible": "1h"}}),
        )
        .unwrap(),
    );
    let key = new_ed25519_key();
    let e = set
        .create(&it("m4", false), request(&key))
        .await
        .err()
        .unwrap();
    assert!(e.is_capacity() && e.is_instance_type_specific(), "{e}");
    assert!(set.create(&it("m4", true), request(&key)).await.is_err());
    assert!(set.create(&it("c4", true), request(&key)).await.is_err());
    set.create(&it("c4", false), request(&key)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    set.create(&it("m4", false), request(&key)).await.unwrap();
    let log: Vec<(String, bool, Option<&str>)> = set
        .launch_log()
        .into_iter()
        .map(|l| (l.provider_type, l.preemptible, l.failed))
        .collect();
    assert_eq!(
        log,
        [
            ("m4".to_string(), false, Some("capacity")),
            ("m4".to_string(), true, Some("capacity")),
            ("c4".to_string(), true, Some("capacity")),
            ("c4".to_string(), false, None),
            ("m4".to_string(), false, None),
        ]
    );
}

/// `Zones` with `ShortOfCapacityUntil` per zone: an unpinned create tries the zones as
/// Arvados' EC2 driver tries subnets (from the last that worked, one launch each, on after a
/// capacity error); a pinned create tries its zone only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_zones_fail_over_like_ec2_subnets_unless_pinned() {
    let set = testkit::stub_driver::StubSet::new(
        testkit::stub_driver::StubConfig::from_params(&json!({
            "Zones": ["a", "b", "c"],
            "ShortOfCapacityUntil": {"m4@a": "1h", "m4@b": "1h", "c4@c": "1h"},
        }))
        .unwrap(),
    );
    assert_eq!(set.zones(), ["a", "b", "c"]);
    let key = new_ed25519_key();
    let pinned = |z: &str| CreateRequest {
        zone: Some(z.to_string()),
        ..request(&key)
    };
    set.create(&it("m4", false), request(&key)).await.unwrap();
    // The last zone that worked (c) is tried first, for every type.
    set.create(&it("c4", false), request(&key)).await.unwrap();
    set.create(&it("m4", false), request(&key)).await.unwrap();
    let e = set
        .create(&it("m4", false), pinned("b"))
        .await
        .err()
        .unwrap();
    assert!(e.is_capacity() && e.to_string().contains("zone b"), "{e}");
    set.create(&it("m4", false), pinned("c")).await.unwrap();
    let e = set
        .create(&it("m4", false), pinned("x"))
        .await
        .err()
        .unwrap();
    assert!(!e.is_capacity(), "{e}");
    let log: Vec<(String, String, bool)> = set
        .launch_log()
        .into_iter()
        .map(|l| (l.provider_type, l.zone, l.failed.is_none()))
        .collect();
    let t = |ty: &str, z: &str, ok: bool| (ty.to_string(), z.to_string(), ok);
    assert_eq!(
        log,
        [
            t("m4", "a", false),
            t("m4", "b", false),
            t("m4", "c", true),
            t("c4", "c", false),
            t("c4", "a", true),
            t("m4", "a", false),
            t("m4", "b", false),
            t("m4", "c", true),
            t("m4", "b", false),
            t("m4", "c", true),
            t("m4", "", false),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_held_cloud_ops_wait_for_release() {
    let set = std::sync::Arc::new(testkit::stub_driver::StubSet::new(
        testkit::stub_driver::StubConfig::from_params(&json!({"HoldCloudOps": true})).unwrap(),
    ));
    let key = new_ed25519_key();
    let s = set.clone();
    let req = request(&key);
    let create = tokio::spawn(async move { s.create(&it("c4", false), req).await.map(|v| v.id()) });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        !create.is_finished(),
        "create must wait while cloud ops are held"
    );
    assert!(set.vms().is_empty());
    set.release_cloud_ops(1);
    assert_eq!(create.await.unwrap().unwrap(), "inst1,c4");
    let vm = set.vms().pop().unwrap();
    let destroy = tokio::spawn(async move { vm.destroy().await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!destroy.is_finished());
    set.release_cloud_ops(1);
    destroy.await.unwrap().unwrap();
    assert!(set.vms().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_vm_side_faults_broken_and_missing_runner() {
    let (set, key) = stub(json!({"ReportBrokenAfter": "0s", "BrokenAfter": "400ms"}));
    let vm = set.create(&it("c4", false), request(&key)).await.unwrap();
    let listed = sh(&*vm, &key, "crunch-run --list", b"").await;
    assert_eq!(
        (listed.exit, listed.stdout.as_slice()),
        (0, &b"broken\n"[..])
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let o = sh(&*vm, &key, "true", b"").await;
    assert_eq!((o.exit, o.stderr.as_slice()), (2, &b"cannot fork"[..]));

    let (set, key) = stub(json!({"CrunchRunMissing": true}));
    let vm = set.create(&it("c4", false), request(&key)).await.unwrap();
    assert_eq!(sh(&*vm, &key, "crunch-run --list", b"").await.exit, 1);
    assert_eq!(sh(&*vm, &key, "true", b"").await.exit, 0);
}

/// Appendix D's runner check and install: `md5sum` fails until the install script has written
/// the binary from stdin; then the deployed path answers `--list`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_vm_runner_check_and_install() {
    let (set, key) = stub(json!({}));
    let vm = set.create(&it("c4", false), request(&key)).await.unwrap();
    let path = "/tmp/arvados-crunch-run/crunch-run~5eb63bbbe01eeed093cb22bb8f5acdc3";
    let missing = sh(&*vm, &key, &format!("md5sum {path}"), b"").await;
    assert_eq!(missing.exit, 1);
    assert_eq!(
        sh(&*vm, &key, &format!("{path} --list"), b"").await.exit,
        127
    );
    let install = format!(
        "sudo sh -c 'set -e; dstdir=\"/tmp/arvados-crunch-run/\"; dstfile=\"{path}\"; mkdir -p \"$dstdir\"; touch \"$dstfile\"; chmod 0755 \"$dstdir\" \"$dstfile\"; cat >\"$dstfile\"'"
    );
    assert_eq!(sh(&*vm, &key, &install, b"hello world").await.exit, 0);
    let sum = sh(&*vm, &key, &format!("md5sum {path}"), b"").await;
    assert_eq!(
        String::from_utf8(sum.stdout).unwrap(),
        format!("5eb63bbbe01eeed093cb22bb8f5acdc3  {path}\n")
    );
    assert!(sum.stderr.is_empty());
    assert_eq!(sh(&*vm, &key, &format!("{path} --list"), b"").await.exit, 0);
    assert_eq!(
        sh(&*vm, &key, "cat /var/run/arvados-instance-secret", b"")
            .await
            .stdout,
        b"sekrit"
    );
}

/// Crashes leave the container Running with no process; deadlocked locks linger as `stale`;
/// destroying a VM kills its processes without a word to the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stub_crunch_run_crash_stale_lock_and_power_off() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let api = arvados::Client::new(arvados::ClientConfig {
        base_url: url::Url::parse(f.base_url()).unwrap(),
        token: f.root_token().into(),
        insecure: false,
        timeout: None,
        retry: Default::default(),
    })
    .unwrap();
    let config =
        json!({"Env": {"ARVADOS_API_HOST": f.base_url(), "ARVADOS_API_TOKEN": f.root_token()}})
            .to_string()
            .into_bytes();
    let state = |u: &str| {
        f.container(u).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let start = |vm: std::sync::Arc<dyn cloud::Instance>, key: russh::keys::PrivateKey, ms: u64| {
        let (f, api, config) = (&f, &api, config.clone());
        async move {
            let u = f.add_container(&ContainerSpec {
                environment: vec![("FAKE_CRUNCH_RUN_MS".into(), ms.to_string())],
                ..Default::default()
            });
            api.lock_container(&u).await.unwrap();
            let o = sh(
                &*vm,
                &key,
                &format!("crunch-run --detach --stdin-config {u}"),
                &config,
            )
            .await;
            assert_eq!(o.exit, 0);
            u
        }
    };
    let wait = |cond: &dyn Fn() -> bool| {
        for _ in 0..200 {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };

    let (set, key) = stub(json!({"CrashRate": 1.0}));
    let vm = set.create(&it("c4", false), request(&key)).await.unwrap();
    let u = start(vm.clone(), key.clone(), 600_000).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        sh(&*vm, &key, "crunch-run --list", b"")
            .await
            .stdout
            .is_empty(),
        "crashed process is gone"
    );
    assert!(
        ["Locked", "Running"].contains(&state(&u).as_str()),
        "no final update after a crash"
    );

    let (set, key) = stub(json!({"StaleLockDeadlockRate": 1.0}));
    let vm = set.create(&it("c4", false), request(&key)).await.unwrap();
    let u = start(vm.clone(), key.clone(), 50).await;
    assert!(wait(&|| state(&u) == "Complete"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listed = sh(&*vm, &key, "crunch-run --list", b"").await;
    assert_eq!(
        String::from_utf8(listed.stdout).unwrap(),
        format!("{u} stale\n")
    );

    let (set, key) = stub(json!({}));
    let vm = set.create(&it("c4", false), request(&key)).await.unwrap();
    let u = start(vm.clone(), key.clone(), 1_000).await;
    assert!(wait(&|| state(&u) == "Running"));
    vm.destroy().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(
        state(&u),
        "Running",
        "a destroyed VM's crunch-run must not finish the container"
    );
}
