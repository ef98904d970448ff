//! The loopback driver through real SSH: spec AC-LOOP-1 and the conformance suite.

use std::sync::Arc;
use std::time::Duration;

use cloud::sshd::{new_ed25519_key, run_command};
use cloud::{CreateRequest, Driver, InstanceTags};
use cloud_loopback::{LoopbackDriver, localhost_instance_type};

fn whoami() -> String {
    String::from_utf8(
        std::process::Command::new("whoami")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_loop_1_one_instance_that_runs_commands_here() {
    let key = new_ed25519_key();
    let set = LoopbackDriver
        .instance_set(
            &serde_json::json!({}),
            &"x".to_string(),
            &InstanceTags::new(),
        )
        .unwrap();
    let it = localhost_instance_type();
    assert_eq!(it.name, "localhost");
    assert!(it.vcpus >= 1 && it.ram > 0);
    let req = || CreateRequest {
        public_key: Some(key.public_key().to_openssh().unwrap()),
        ..Default::default()
    };
    let vm = set.create(&it, req()).await.unwrap();
    assert!(!vm.address().is_empty());
    let e = set.create(&it, req()).await.err().unwrap();
    assert!(e.is_quota());
    assert_eq!(e.to_string(), "loopback driver is always at quota");
    let listed = set.instances(&InstanceTags::new()).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id(), "localhost");

    let user = vm.remote_user();
    assert_eq!(user, whoami());
    let run = |cmd: &'static str| {
        let (addr, key, user) = (vm.address(), key.clone(), user.clone());
        async move {
            run_command(&addr, None, &key, &user, cmd, b"")
                .await
                .unwrap()
        }
    };
    let ok = run("echo ok").await;
    assert_eq!((ok.exit, ok.stdout.as_slice()), (0, &b"ok\n"[..]));
    let fail = run("echo fail && echo -n fail2 >&2 && false").await;
    assert_eq!(fail.stdout, b"fail\n");
    assert_eq!(fail.stderr, b"fail2");
    assert_ne!(fail.exit, 0);
    assert_eq!(run("sudo whoami").await.stdout, run("whoami").await.stdout);

    let other = new_ed25519_key();
    let e = run_command(&vm.address(), None, &other, &user, "true", b"")
        .await
        .unwrap_err();
    assert_eq!(e, "unable to authenticate");

    vm.destroy().await.unwrap();
    assert!(
        set.instances(&InstanceTags::new())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(set.create(&it, req()).await.is_ok());
    assert!(set.create(&it, req()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_passes_the_conformance_suite() {
    let key = new_ed25519_key();
    let set = LoopbackDriver
        .instance_set(
            &serde_json::json!({}),
            &"x".to_string(),
            &InstanceTags::new(),
        )
        .unwrap();
    let (k, user) = (key.clone(), whoami());
    let reach: cloud::conformance::Reach = Arc::new(move |addr: String| {
        let (k, user) = (k.clone(), user.clone());
        Box::pin(async move {
            run_command(&addr, None, &k, &user, "true", b"")
                .await
                .is_ok_and(|o| o.exit == 0)
        })
    });
    // The one error this backend can be made to give: a second create is over quota.
    let (quota_set, quota_key) = (set.clone(), key.public_key().to_openssh().unwrap());
    let at_quota = cloud::conformance::ErrorCase {
        name: "second instance",
        want: cloud::conformance::Want::Quota,
        provoke: Box::new(move || {
            let (set, key) = (quota_set.clone(), quota_key.clone());
            Box::pin(async move {
                let req = CreateRequest {
                    public_key: Some(key),
                    ..Default::default()
                };
                let first = set.create(&localhost_instance_type(), req.clone()).await?;
                let second = set.create(&localhost_instance_type(), req).await;
                first.destroy().await?;
                second.map(|_| ())
            })
        }),
    };
    cloud::conformance::run(cloud::conformance::Suite {
        set,
        instance_type: localhost_instance_type(),
        request: CreateRequest {
            public_key: Some(key.public_key().to_openssh().unwrap()),
            ..Default::default()
        },
        reach: Some(reach),
        patience: Duration::from_secs(5),
        error_cases: vec![at_quota],
    })
    .await
    .unwrap();
}
