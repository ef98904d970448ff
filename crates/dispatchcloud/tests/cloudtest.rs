//! `cloudtest` against stub clouds whose VMs are real SSH servers.

use std::sync::Arc;
use std::time::Duration;

use arvados::InstanceType;
use cloud::tags::TagKeys;
use cloud::{CreateRequest, InstanceSet};
use dispatchcloud::cloudtest::{CloudTest, DEFAULT_INSTANCE_SET_ID};
use serde_json::json;
use testkit::stub_driver::{StubConfig, StubSet};

fn test_for(set: Arc<StubSet>) -> CloudTest {
    let key = cloud::sshd::new_ed25519_key();
    CloudTest {
        set,
        instance_set_id: DEFAULT_INSTANCE_SET_ID.into(),
        tag_keys: TagKeys::new("Arvados"),
        resource_tags: [("team".to_string(), "genomics".to_string())].into(),
        instance_type: InstanceType {
            name: "small".into(),
            provider_type: "s1".into(),
            ..Default::default()
        },
        image_id: "img-1".into(),
        instance_init_command: "echo hello".into(),
        public_key: Some(key.public_key().to_openssh().unwrap()),
        private_key: Arc::new(key),
        ssh_port: "22".into(),
        boot_probe_command: "systemctl is-system-running".into(),
        probe_interval: Duration::from_millis(100),
        timeout_booting: Duration::from_secs(1),
        sync_interval: Duration::from_millis(50),
        destroy_existing: false,
        command: Some("crunch-run --list".into()),
    }
}

fn stub(params: serde_json::Value) -> Arc<StubSet> {
    Arc::new(StubSet::new(StubConfig::from_params(&params).unwrap()))
}

async fn run(t: &CloudTest) -> (bool, String) {
    let rx = tokio_util::sync::CancellationToken::new();
    let _tx = rx.clone();
    let mut out = Vec::new();
    let ok = t.run(&mut out, rx).await;
    (ok, String::from_utf8(out).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudtest_passes_every_step_on_a_working_stub_cloud() {
    let set = stub(json!({"BootDelay": "250ms"}));
    let t = test_for(set.clone());
    let (ok, out) = run(&t).await;
    assert!(ok, "{out}");
    for step in [
        "list existing instances with ArvadosInstanceSetID=zzzzz-zzzzz-zzzzzzcloudtest: ok",
        "create instance (type small, provider type s1, image \"img-1\"): ok, inst1,s1",
        "find created instance in the list: ok, inst1,s1",
        "check ResourceTags on the instance: ok (1 tags)",
        "boot probe \"systemctl is-system-running\": ok after ",
        "to log in: ssh -p",
        "command \"crunch-run --list\": ok",
        "destroy inst1,s1 and wait until it is gone: ok",
        "PASS: all steps succeeded",
    ] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
    assert!(
        out.lines().all(|l| l.starts_with('[') && l.contains("s] ")),
        "{out}"
    );
    assert!(set.vms().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudtest_fails_after_timeout_booting_and_still_destroys_the_vm() {
    let set = stub(json!({"BootDelay": "1h"}));
    let t = test_for(set.clone());
    let started = std::time::Instant::now();
    let (ok, out) = run(&t).await;
    assert!(!ok, "{out}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        out.contains("boot probe \"systemctl is-system-running\": FAILED after"),
        "{out}"
    );
    assert!(
        out.contains("stub is booting"),
        "the last error is shown:\n{out}"
    );
    assert!(
        out.contains("destroy inst1,s1 and wait until it is gone: ok"),
        "{out}"
    );
    assert!(out.trim_end().ends_with("FAIL"), "{out}");
    assert!(set.vms().is_empty(), "the VM must be destroyed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudtest_refuses_existing_test_vms_unless_told_to_destroy_them() {
    let set = stub(json!({}));
    let leftover = [(
        "ArvadosInstanceSetID".to_string(),
        DEFAULT_INSTANCE_SET_ID.to_string(),
    )]
    .into();
    set.create(
        &InstanceType {
            provider_type: "s1".into(),
            ..Default::default()
        },
        CreateRequest {
            tags: leftover,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut t = test_for(set.clone());
    let (ok, out) = run(&t).await;
    assert!(!ok);
    assert!(
        out.contains("FAILED: found inst1,s1 (use --destroy-existing"),
        "{out}"
    );
    assert_eq!(set.vms().len(), 1, "nothing created, nothing destroyed");

    t.destroy_existing = true;
    let (ok, out) = run(&t).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("destroy existing instance inst1,s1: ok"),
        "{out}"
    );
    assert!(set.vms().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudtest_cancelled_mid_boot_destroys_the_vm() {
    let set = stub(json!({"BootDelay": "1h"}));
    let mut t = test_for(set.clone());
    t.timeout_booting = Duration::from_secs(3600);
    let rx = tokio_util::sync::CancellationToken::new();
    let tx = rx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        tx.cancel();
    });
    let mut out = Vec::new();
    let ok = t.run(&mut out, rx).await;
    let out = String::from_utf8(out).unwrap();
    assert!(!ok);
    assert!(
        out.contains("cancelled") && out.contains("destroy inst1,s1"),
        "{out}"
    );
    assert!(set.vms().is_empty());
    // A failing command is a failed run too (and the VM still goes).
    let set = stub(json!({}));
    let mut t = test_for(set.clone());
    t.command = Some("frobnicate".into());
    let (ok, out) = run(&t).await;
    assert!(
        !ok && out.contains("command \"frobnicate\": FAILED"),
        "{out}"
    );
    assert!(set.vms().is_empty());
}
