//! The GCE driver against `testkit::fake_gce` over HTTP: the conformance suite, every row of
//! the error table, exact tag round trips, paging, zone fail-over, the SPOT and GPU create
//! bodies, quota inside an operation, and an idempotent retry after a timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arvados::InstanceType;
use axum::http::Method;
use cloud::conformance::{ErrorCase, Want};
use cloud::{CreateRequest, InstanceSet, InstanceTags};
use cloud_gce::GceSet;
use cloud_gce::params::GceParams;
use serde_json::{Value, json};
use testkit::fake_gce::{FakeGce, FakeGceConfig, GceFault};

const ZONES: [&str; 3] = ["us-central1-a", "us-central1-b", "us-central1-c"];

async fn fake() -> Arc<FakeGce> {
    Arc::new(
        FakeGce::start(FakeGceConfig {
            project: "proj".into(),
            zones: ZONES.iter().map(|z| z.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap(),
    )
}

fn params(f: &FakeGce, extra: Value) -> GceParams {
    let mut p = json!({
        "Project": "proj",
        "Zones": ZONES,
        "Endpoint": f.endpoint(),
        "AnonymousCredentials": true,
        "ZoneCapacityHoldOff": "10m",
    });
    if let (Some(m), Value::Object(e)) = (p.as_object_mut(), extra) {
        m.extend(e);
    }
    GceParams::from_params(&p).unwrap()
}

fn set(f: &FakeGce, extra: Value) -> Arc<dyn InstanceSet> {
    Arc::new(GceSet::new(params(f, extra), &"isid".to_string(), None).unwrap())
}

fn it(provider: &str) -> InstanceType {
    InstanceType {
        name: format!("t-{provider}"),
        provider_type: provider.into(),
        vcpus: 2,
        ram: 8 << 30,
        price: 0.1,
        ..Default::default()
    }
}

fn request(tags: &[(&str, &str)]) -> CreateRequest {
    CreateRequest {
        image_id: "projects/proj/global/images/arvados-compute".into(),
        tags: tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        init_command: format!("#!/bin/sh\necho {}\n", cloud::tags::new_instance_secret()),
        public_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake dispatch".into()),
        zone: None,
    }
}

fn op_fault(code: &str, message: &str, times: usize) -> GceFault {
    GceFault::OperationError {
        zone: None,
        code: code.into(),
        message: message.into(),
        times,
    }
}

#[tokio::test]
async fn gce_passes_the_conformance_suite_against_the_fake() {
    let f = fake().await;
    let s = set(&f, json!({}));
    let case = |name: &'static str, want: Want, fault: GceFault| {
        let (s, f) = (s.clone(), f.clone());
        ErrorCase {
            name,
            want,
            provoke: Box::new(move || {
                let (s, f, fault) = (s.clone(), f.clone(), fault.clone());
                Box::pin(async move {
                    f.inject(fault);
                    s.create(&it("n2-standard-2"), request(&[]))
                        .await
                        .map(|_| ())
                })
            }),
        }
    };
    let http = |status, reason: &str| GceFault::Http {
        method: Method::POST,
        path: "/instances".into(),
        status,
        reason: reason.into(),
        message: "refused".into(),
        times: 1,
    };
    let error_cases = vec![
        case(
            "403 rateLimitExceeded",
            Want::RateLimit,
            http(403, "rateLimitExceeded"),
        ),
        case("429", Want::RateLimit, http(429, "rateLimitExceeded")),
        case(
            "QUOTA_EXCEEDED CPUS",
            Want::Quota,
            op_fault(
                "QUOTA_EXCEEDED",
                "Quota 'CPUS' exceeded.  Limit: 24.0 in region us-central1.",
                1,
            ),
        ),
        case(
            "QUOTA_EXCEEDED N2_CPUS",
            Want::CapacityQuotaGroup,
            op_fault(
                "QUOTA_EXCEEDED",
                "Quota 'N2_CPUS' exceeded.  Limit: 8.0 in region us-central1.",
                1,
            ),
        ),
        case("400", Want::Other, http(400, "invalid")),
        // Last: it holds the type off in every zone.
        case(
            "ZONE_RESOURCE_POOL_EXHAUSTED in every zone",
            Want::CapacityInstanceType,
            op_fault(
                "ZONE_RESOURCE_POOL_EXHAUSTED",
                "The zone does not have enough resources available to fulfill the request.",
                3,
            ),
        ),
    ];
    let suite = cloud::conformance::Suite {
        set: s.clone(),
        instance_type: it("e2-standard-2"),
        request: request(&[]),
        reach: None,
        patience: Duration::from_secs(10),
        error_cases,
    };
    cloud::conformance::run(suite).await.unwrap();
}

#[tokio::test]
async fn awkward_tags_round_trip_and_the_label_filter_runs_on_the_server() {
    let f = fake().await;
    let s = set(&f, json!({"Labels": {"team": "research"}}));
    let long = "v".repeat(200);
    let tags = [
        ("ArvadosInstanceSetID", "zzzzz-gj3su-0123456789abcde"),
        ("Owner Name", "Ada Lovelace"),
        ("k=v", "a = b"),
        ("Ünïcødé", "ß∂ƒ ☃"),
        ("Long", long.as_str()),
    ];
    let vm = s
        .create(&it("n2-standard-2"), request(&tags))
        .await
        .unwrap();
    let want: InstanceTags = request(&tags).tags;
    assert_eq!(vm.tags(), want);
    let mut filter = InstanceTags::new();
    filter.insert(
        "ArvadosInstanceSetID".into(),
        "zzzzz-gj3su-0123456789abcde".into(),
    );
    let listed = s.instances(&filter).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].tags(), want);
    // New tags, exactly, through setMetadata/setLabels with fingerprints.
    let mut newer = want.clone();
    newer.insert("ArvadosIdleBehavior".into(), "hold".into());
    newer.insert("Owner Name".into(), "Grace Hopper".into());
    listed[0].set_tags(newer.clone()).await.unwrap();
    assert_eq!(s.instances(&filter).await.unwrap()[0].tags(), newer);
    // The fake's own record: labels are GCE-legal and carry the operator's too.
    let rec = &f.instances()[0];
    assert_eq!(rec["labels"]["team"], "research");
    assert_eq!(rec["labels"]["arvadosidlebehavior"], "hold");
    for (k, v) in rec["labels"].as_object().unwrap() {
        assert!(cloud_gce::params::is_label_key(k), "{k}");
        assert!(v.as_str().unwrap().len() <= 63);
    }
    // The list asked the server to filter.
    assert!(
        f.log().iter().any(
            |l| l.starts_with("GET /compute/v1/projects/proj/aggregated/instances")
                && l.contains("filter=labels.arvadosinstancesetid")
        ),
        "{:?}",
        f.log()
    );
    let mut other = InstanceTags::new();
    other.insert("ArvadosInstanceSetID".into(), "someone-else".into());
    assert!(s.instances(&other).await.unwrap().is_empty());
}

#[tokio::test]
async fn set_tags_retries_once_on_a_stale_fingerprint() {
    let f = fake().await;
    let s = set(&f, json!({}));
    let vm = s
        .create(&it("e2-small"), request(&[("A", "1")]))
        .await
        .unwrap();
    f.inject(GceFault::Http {
        method: Method::POST,
        path: "/setMetadata".into(),
        status: 412,
        reason: "conditionNotMet".into(),
        message: "Supplied fingerprint does not match current metadata fingerprint.".into(),
        times: 1,
    });
    vm.set_tags(request(&[("A", "2")]).tags).await.unwrap();
    assert_eq!(
        s.instances(&InstanceTags::new()).await.unwrap()[0].tags()["A"],
        "2"
    );
    f.inject(GceFault::Http {
        method: Method::POST,
        path: "/setMetadata".into(),
        status: 412,
        reason: "conditionNotMet".into(),
        message: "stale".into(),
        times: 2,
    });
    assert!(
        vm.set_tags(request(&[("A", "3")]).tags).await.is_err(),
        "only one retry"
    );
}

#[tokio::test]
async fn lists_page_through_six_hundred_instances_in_every_zone() {
    let f = fake().await;
    let s = set(&f, json!({"Zones": ["us-central1-a"]}));
    let s2 = set(&f, json!({"Zones": ["us-central1-c"]}));
    let mut n = 0;
    for i in 0..600 {
        let set = if i % 2 == 0 { &s } else { &s2 };
        set.create(&it("e2-micro"), request(&[("ArvadosInstanceSetID", "big")]))
            .await
            .unwrap();
        n += 1;
    }
    let mut filter = InstanceTags::new();
    filter.insert("ArvadosInstanceSetID".into(), "big".into());
    let listed = s.instances(&filter).await.unwrap();
    assert_eq!(listed.len(), n);
    let ids: std::collections::BTreeSet<String> = listed.iter().map(|i| i.id()).collect();
    assert_eq!(ids.len(), n, "no instance twice");
    assert!(ids.iter().any(|i| i.starts_with("us-central1-c/")));
    let pages = f
        .log()
        .iter()
        .filter(|l| l.contains("/aggregated/instances") && l.contains("pageToken"))
        .count();
    assert!(pages >= 1, "paged");
}

#[tokio::test]
async fn capacity_in_one_zone_moves_to_the_next_and_is_remembered() {
    let f = fake().await;
    let s = set(&f, json!({}));
    f.inject(GceFault::OperationError {
        zone: Some("us-central1-a".into()),
        code: "ZONE_RESOURCE_POOL_EXHAUSTED".into(),
        message: "The zone 'projects/proj/zones/us-central1-a' does not have enough resources"
            .into(),
        times: 1,
    });
    let vm = s.create(&it("n2-standard-8"), request(&[])).await.unwrap();
    assert!(vm.id().starts_with("us-central1-b/"), "{}", vm.id());
    // Held off: the next create of that type goes straight to b, without asking a.
    let before = f
        .log()
        .iter()
        .filter(|l| l.starts_with("POST /compute/v1/projects/proj/zones/us-central1-a/instances"))
        .count();
    let vm2 = s.create(&it("n2-standard-8"), request(&[])).await.unwrap();
    assert!(vm2.id().starts_with("us-central1-b/"));
    let after = f
        .log()
        .iter()
        .filter(|l| l.starts_with("POST /compute/v1/projects/proj/zones/us-central1-a/instances"))
        .count();
    assert_eq!(before, after, "zone a skipped during the hold-off");
    // Another type still tries zone a first.
    let vm3 = s.create(&it("e2-standard-2"), request(&[])).await.unwrap();
    assert!(vm3.id().starts_with("us-central1-a/"));
}

/// Issue 19, zones: with more than one zone the set offers them; a create pinned to one
/// (the pool's capacity model chose it) tries that zone only, even when the driver's own
/// hold-off would skip it, and its capacity error is the zone's. The fake's request log is
/// the oracle.
#[tokio::test]
async fn a_create_pinned_to_a_zone_tries_only_that_zone() {
    let f = fake().await;
    let s = set(&f, json!({}));
    assert_eq!(s.zones(), ZONES);
    let one = Arc::new(
        GceSet::new(
            params(&f, json!({"Zones": [ZONES[0]]})),
            &"isid".to_string(),
            None,
        )
        .unwrap(),
    );
    assert!(one.zones().is_empty(), "one zone: no choice");
    let posts = |zone: &str| {
        let path = format!("POST /compute/v1/projects/proj/zones/{zone}/instances");
        f.log().iter().filter(|l| l.starts_with(&path)).count()
    };
    f.inject(GceFault::OperationError {
        zone: Some(ZONES[0].into()),
        code: "ZONE_RESOURCE_POOL_EXHAUSTED".into(),
        message: "The zone does not have enough resources".into(),
        times: 2,
    });
    let pinned = |z: &str| CreateRequest {
        zone: Some(z.to_string()),
        ..request(&[])
    };
    let e = s
        .create(&it("n2-standard-8"), pinned(ZONES[0]))
        .await
        .err()
        .unwrap();
    assert!(e.is_capacity() && e.zone_specific, "{e:?}");
    assert_eq!(
        (posts(ZONES[0]), posts(ZONES[1])),
        (1, 0),
        "no fail-over when pinned"
    );
    // Unpinned, the driver fails over (and holds zone a off itself)…
    let vm = s.create(&it("n2-standard-8"), request(&[])).await.unwrap();
    assert!(
        vm.id().starts_with(&format!("{}/", ZONES[1])),
        "{}",
        vm.id()
    );
    // …but a create pinned to zone a asks zone a: the pool decides.
    let vm = s
        .create(&it("n2-standard-8"), pinned(ZONES[0]))
        .await
        .unwrap();
    assert!(
        vm.id().starts_with(&format!("{}/", ZONES[0])),
        "{}",
        vm.id()
    );
    let e = s
        .create(&it("n2-standard-8"), pinned("mars-1"))
        .await
        .err()
        .unwrap();
    assert!(!e.is_capacity() && e.to_string().contains("mars-1"), "{e}");
}

/// Issue 19, the cloud's own interruption notices on GCE: a set that watches reports a spot
/// VM that is `STOPPING` (being preempted) as interrupted; an on-demand VM that is stopping,
/// or any VM when the set does not watch, is not.
#[tokio::test]
async fn a_watching_set_reports_a_stopping_spot_vm_as_preempted() {
    let f = fake().await;
    let s = set(&f, json!({}));
    let mut spot = it("e2-standard-2");
    spot.preemptible = true;
    let vm = s.create(&spot, request(&[])).await.unwrap().id();
    let plain = s
        .create(&it("e2-standard-2"), request(&[]))
        .await
        .unwrap()
        .id();
    for id in [&vm, &plain] {
        let (zone, name) = id.split_once('/').unwrap();
        assert!(f.set_status(zone, name, "STOPPING"));
    }
    let noticed = || async {
        let mut v: Vec<String> = s
            .instances(&InstanceTags::new())
            .await
            .unwrap()
            .iter()
            .filter(|i| i.interruption_notice().is_some())
            .map(|i| i.id())
            .collect();
        v.sort();
        v
    };
    assert!(noticed().await.is_empty(), "not watching");
    s.watch_interruptions();
    assert_eq!(noticed().await, std::slice::from_ref(&vm));
}

#[tokio::test]
async fn spot_and_gpu_create_bodies() {
    let f = fake().await;
    let s = set(
        &f,
        json!({"AcceleratorTypes": {"n1-standard-8": "nvidia-tesla-t4"}, "LocalSSDs": 2, "UsePublicIP": true}),
    );
    let mut spot = it("n2-standard-4");
    spot.preemptible = true;
    s.create(&spot, request(&[("K", "spot")])).await.unwrap();
    let mut gpu = it("n1-standard-8");
    gpu.gpu.device_count = 2;
    gpu.gpu.stack = "cuda".into();
    s.create(&gpu, request(&[("K", "gpu")])).await.unwrap();
    let find = |k: &str| {
        f.instances()
            .into_iter()
            .find(|i| i["labels"]["k"] == k)
            .unwrap()
    };
    let sp = find("spot");
    assert_eq!(sp["scheduling"]["provisioningModel"], "SPOT");
    assert_eq!(sp["scheduling"]["instanceTerminationAction"], "DELETE");
    assert_eq!(sp["scheduling"]["automaticRestart"], false);
    assert_eq!(
        sp["disks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["type"] == "SCRATCH")
            .count(),
        2
    );
    assert_eq!(
        sp["disks"][0]["initializeParams"]["sourceImage"],
        "projects/proj/global/images/arvados-compute"
    );
    assert!(sp["networkInterfaces"][0]["accessConfigs"][0]["natIP"].is_string());
    let g = find("gpu");
    assert_eq!(g["guestAccelerators"][0]["acceleratorCount"], 2);
    assert!(
        g["guestAccelerators"][0]["acceleratorType"]
            .as_str()
            .unwrap()
            .ends_with("/acceleratorTypes/nvidia-tesla-t4")
    );
    assert_eq!(g["scheduling"]["onHostMaintenance"], "TERMINATE");
    let md: BTreeMap<String, String> = g["metadata"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap().to_string(),
                i["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(md["startup-script"].starts_with("#!/bin/sh"));
    assert!(md["ssh-keys"].starts_with("crunch:ssh-ed25519 "));
    // A GPU type without an accelerator mapping is refused with the key to set.
    let mut unmapped = it("n1-standard-4");
    unmapped.gpu.device_count = 1;
    let e = s.create(&unmapped, request(&[])).await.unwrap_err();
    assert!(
        e.message
            .contains("DriverParameters.AcceleratorTypes.n1-standard-4"),
        "{e}"
    );
}

#[tokio::test]
async fn quota_inside_an_operation_is_typed_and_makes_no_vm() {
    let f = fake().await;
    let s = set(&f, json!({}));
    f.inject(op_fault(
        "QUOTA_EXCEEDED",
        "Quota 'INSTANCES' exceeded.  Limit: 10.0 in region us-central1.",
        1,
    ));
    let e = s.create(&it("e2-small"), request(&[])).await.unwrap_err();
    assert!(e.is_quota(), "{e:?}");
    assert!(f.instances().is_empty());
    // Created, then failed: listed while provisioning, gone once the operation ends.
    f.inject(GceFault::CreatedThenFailed {
        code: "RESOURCE_NOT_FOUND".into(),
        message: "The resource 'projects/proj/global/images/x' was not found".into(),
    });
    let e = s.create(&it("e2-small"), request(&[])).await.unwrap_err();
    assert_eq!(e.kind, cloud::ErrorKind::Other, "{e:?}");
    assert!(f.instances().is_empty());
}

#[tokio::test]
async fn a_create_retried_after_a_timeout_makes_one_vm() {
    let f = fake().await;
    let s = set(&f, json!({}));
    let req = request(&[("A", "1")]);
    // The insert is accepted, but its answer comes too late for the caller's deadline.
    f.inject(GceFault::Delay {
        path: "/zones/us-central1-a/instances".into(),
        delay: Duration::from_secs(2),
        times: 1,
    });
    let first = tokio::time::timeout(
        Duration::from_millis(300),
        s.create(&it("e2-small"), req.clone()),
    )
    .await;
    assert!(first.is_err(), "timed out");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let vm = s.create(&it("e2-small"), req).await.unwrap();
    assert_eq!(f.instances().len(), 1, "{:?}", f.instances());
    assert_eq!(
        s.instances(&InstanceTags::new()).await.unwrap()[0].id(),
        vm.id()
    );
}

#[tokio::test]
async fn destroy_is_idempotent_and_a_preempted_spot_vm_is_gone() {
    let f = fake().await;
    let s = set(&f, json!({}));
    let vm = s.create(&it("e2-small"), request(&[])).await.unwrap();
    vm.destroy().await.unwrap();
    vm.destroy().await.unwrap();
    assert!(s.instances(&InstanceTags::new()).await.unwrap().is_empty());
    let mut spot = it("e2-small");
    spot.preemptible = true;
    let vm = s.create(&spot, request(&[])).await.unwrap();
    let (zone, name) = vm
        .id()
        .split_once('/')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    assert!(f.set_status(&zone, &name, "TERMINATED"));
    assert!(s.instances(&InstanceTags::new()).await.unwrap().is_empty());
}

#[tokio::test]
async fn driver_metrics_have_ec2s_shape_per_zone() {
    use cloud::Driver;
    let f = fake().await;
    let registry = prometheus::Registry::new();
    let p = json!({
        "Project": "proj", "Zones": ["us-central1-a"], "Endpoint": f.endpoint(),
        "AnonymousCredentials": true,
    });
    let s = cloud_gce::GceDriver
        .instance_set_with_metrics(&p, &"isid".to_string(), &InstanceTags::new(), &registry)
        .unwrap();
    s.create(&it("e2-small"), request(&[])).await.unwrap();
    f.inject(op_fault("QUOTA_EXCEEDED", "Quota 'CPUS' exceeded.", 1));
    assert!(s.create(&it("e2-small"), request(&[])).await.is_err());
    s.instances(&InstanceTags::new()).await.unwrap();
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    for line in [
        r#"arvados_dispatchcloud_gce_instance_starts_total{success="1",zone="us-central1-a"} 1"#,
        r#"arvados_dispatchcloud_gce_instance_starts_total{success="0",zone="us-central1-a"} 1"#,
        r#"arvados_dispatchcloud_gce_instances{zone="us-central1-a"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
}

/// A GCE endpoint that accepts a list and never answers cannot hold the caller: the
/// dispatcher's `Deadline` wrapper ends the call, with an unknown outcome.
#[tokio::test]
async fn a_hung_call_is_ended_by_the_deadline_wrapper() {
    let f = fake().await;
    let s = cloud::wrappers::Deadline::new(
        set(&f, json!({})),
        Duration::from_secs(5),
        Duration::from_millis(300),
    );
    f.inject(GceFault::Hang {
        path: "/aggregated/instances".into(),
        times: 1,
    });
    let t0 = std::time::Instant::now();
    let e = s.instances(&InstanceTags::new()).await.unwrap_err();
    assert!(e.outcome_unknown, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The next call is answered.
    assert!(s.instances(&InstanceTags::new()).await.unwrap().is_empty());
}

/// `fake-gce` as a process: prints its URL, serves the project, stops on SIGTERM.
#[test]
fn fake_gce_binary_serves_until_sigterm() {
    use std::io::BufRead;
    // Beside this test binary's directory (target/<profile>/deps/..), where cargo puts the
    // workspace's binaries.
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("fake-gce");
    if !bin.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} missing: cargo test --workspace builds it",
            bin.display()
        );
        eprintln!(
            "SKIPPED: {} is not built (cargo test --workspace builds it)",
            bin.display()
        );
        return;
    }
    let mut child = std::process::Command::new(&bin)
        .args(["--project", "p1", "--zones", "z1,z2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("fake-gce listening on ")
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let zone: Value = rt.block_on(async {
        reqwest::get(format!("{url}/compute/v1/projects/p1/zones/z2"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(zone["name"], "z2");
    assert!(
        zone["selfLink"]
            .as_str()
            .unwrap()
            .ends_with("/projects/p1/zones/z2")
    );
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "{s}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}
