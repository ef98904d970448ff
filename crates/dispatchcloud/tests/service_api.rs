//! The whole service (driver stack, pool, queue, scheduler, management API) over the stub
//! cloud and the fake Arvados API, through real HTTP: AC-DSP-2, AC-DSP-3, AC-DSP-5, the
//! routes' errors, health, metrics (checked by `promtool`), and a restart that adopts VMs and
//! running containers without starting anything twice.

mod common;

use std::sync::Arc;
use std::time::Duration;

use cloud::registry::Registry;

use dispatchcloud::scheduler::pool::WorkerPool;
use dispatchcloud::service::{Service, api, http_server};
use dispatchcloud::settings::Settings;
use serde_json::{Value, json};
use testkit::stub_driver::{StubConfig, StubSet};
use testkit::{ContainerSpec, FakeArvados, FakeConfig};

use common::{SharedStub, fixture_type, wait_for};

fn cluster(f: &FakeArvados, token: &str) -> arvados::Cluster {
    common::stub_service_cluster(f, token)
}

struct Running {
    svc: Arc<Service>,
    url: String,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn start(cluster: &arvados::Cluster, set: Arc<StubSet>) -> Running {
    start_with(cluster, set, http_server::ServeOptions::default()).await
}

async fn start_with(
    cluster: &arvados::Cluster,
    set: Arc<StubSet>,
    opts: http_server::ServeOptions,
) -> Running {
    start_full(cluster, &Settings::default(), set, opts).await
}

async fn start_full(
    cluster: &arvados::Cluster,
    settings: &Settings,
    set: Arc<StubSet>,
    opts: http_server::ServeOptions,
) -> Running {
    let mut drivers = Registry::new();
    drivers.register("stub", Arc::new(SharedStub(set)));
    let svc = Service::build_with(cluster, settings, &drivers).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let rx = tokio_util::sync::CancellationToken::new();
    let stop = rx.clone();
    let router = api::router(svc.clone());
    let http = tokio::spawn(http_server::serve(listener, router, opts, rx.clone()));
    let s = svc.clone();
    let run = tokio::spawn(async move {
        let _ = s.run(rx).await;
    });
    Running {
        svc,
        url,
        stop,
        tasks: vec![http, run],
    }
}

fn stub(params: Value) -> Arc<StubSet> {
    Arc::new(StubSet::new(StubConfig::from_params(&params).unwrap()))
}

async fn call(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest_client();
    let mut req = client.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn reqwest_client() -> reqwest::Client {
    static C: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    C.get_or_init(reqwest::Client::new).clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_dsp_2_permissions() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let r = start(&cluster(&f, "abcdefgh"), stub(json!({}))).await;
    let instances = format!("{}/arvados/v1/dispatch/instances", r.url);
    assert_eq!(
        call("GET", &instances, Some("abc")).await,
        (403, "Forbidden\n".into())
    );
    assert_eq!(
        call("GET", &instances, None).await,
        (401, "Unauthorized\n".into())
    );
    assert_eq!(call("GET", &instances, Some("abcdefgh")).await.0, 200);
    // Other token carriers: api_token query parameter, cookie, HTTP Basic password.
    assert_eq!(
        call("GET", &format!("{instances}?api_token=abcdefgh"), None)
            .await
            .0,
        200
    );
    let resp = reqwest_client()
        .get(&instances)
        .header("Cookie", "arvados_api_token=abcdefgh")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = reqwest_client()
        .get(&instances)
        .basic_auth("anyone", Some("abcdefgh"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_dsp_3_disabled_without_a_management_token() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let r = start(&cluster(&f, ""), stub(json!({}))).await;
    let instances = format!("{}/arvados/v1/dispatch/instances", r.url);
    let want = (
        403,
        "Management API authentication is not configured\n".to_string(),
    );
    assert_eq!(call("GET", &instances, Some("abc")).await, want);
    assert_eq!(call("GET", &instances, None).await, want);
    assert_eq!(
        call("GET", &format!("{}/_health/ping", r.url), Some("x")).await,
        (404, r#"{"errors":["disabled"]}"#.into())
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_dsp_5_instances_api() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let mut c = cluster(&f, "tok");
    c.containers.cloud_vms.timeout_booting = Duration::from_secs(1);
    let r = start(&c, stub(json!({"BootDelay": "1h"}))).await;
    let instances = format!("{}/arvados/v1/dispatch/instances", r.url);
    let (s, body) = call("GET", &instances, Some("tok")).await;
    assert_eq!(
        (s, serde_json::from_str::<Value>(&body).unwrap()),
        (200, json!({"items": []}))
    );
    assert!(r.svc.pool.create(&fixture_type(1)).is_some());
    wait_for("the VM to exist", Duration::from_secs(5), || {
        r.svc.pool.worker_ids().len() == 1
    })
    .await;
    let (_, body) = call("GET", &instances, Some("tok")).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    let i = &items[0];
    assert!(i["instance"].as_str().unwrap().starts_with("inst"), "{i}");
    assert_eq!(i["worker_state"], "booting");
    assert_eq!(i["price"], 0.123);
    assert_eq!(i["last_container_uuid"], "");
    assert_eq!(i["running_container_uuids"], json!([]));
    assert_eq!(i["provider_instance_type"], "providertype1");
    assert_eq!(i["arvados_instance_type"], "type1");
    assert_eq!(i["idle_behavior"], "run");
    assert!(i["last_busy"].as_str().unwrap().ends_with('Z'));
    r.stop().await;
}

/// A create still in flight has no instance id: the scheduler counts it, but the management
/// API (like Arvados') lists only VMs the cloud returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_creates_are_not_listed_as_instances() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let set = stub(json!({"HoldCloudOps": true}));
    let r = start(&cluster(&f, "tok"), set.clone()).await;
    let instances = format!("{}/arvados/v1/dispatch/instances", r.url);
    assert!(r.svc.pool.create(&fixture_type(1)).is_some());
    // The pool knows of the pending create…
    assert_eq!(r.svc.pool.instances().len(), 1);
    assert_eq!(r.svc.pool.instances()[0].instance, "");
    // …the API does not show it.
    let (s, body) = call("GET", &instances, Some("tok")).await;
    assert_eq!(
        (s, serde_json::from_str::<Value>(&body).unwrap()),
        (200, json!({"items": []}))
    );
    set.release_cloud_ops(1);
    wait_for("the VM to exist", Duration::from_secs(30), || {
        r.svc.pool.worker_ids().len() == 1
    })
    .await;
    let (_, body) = call("GET", &instances, Some("tok")).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
    assert!(
        v["items"][0]["instance"]
            .as_str()
            .unwrap()
            .starts_with("inst")
    );
    r.stop().await;
}

/// Every route's parameter and lookup errors, unknown routes, wrong methods, health.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_answer_bad_requests_with_arvados_errors() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let r = start(&cluster(&f, "tok"), stub(json!({}))).await;
    let u = |p: &str| format!("{}{p}", r.url);
    let t = Some("tok");
    let err = |m: &str| format!(r#"{{"errors":["{m}"]}}"#);
    assert_eq!(
        call("GET", &u("/arvados/v1/dispatch/containers"), t).await,
        (200, r#"{"items":[]}"#.into())
    );
    assert_eq!(
        call("GET", &u("/arvados/v1/dispatch/container"), t).await,
        (400, err("container_uuid parameter not provided"))
    );
    assert_eq!(
        call(
            "GET",
            &u("/arvados/v1/dispatch/container?container_uuid=zzzzz-dz642-000000000000404"),
            t
        )
        .await,
        (404, err("container not found"))
    );
    assert_eq!(
        call("POST", &u("/arvados/v1/dispatch/containers/kill"), t).await,
        (400, err("container_uuid parameter not provided"))
    );
    assert_eq!(
        call(
            "POST",
            &u("/arvados/v1/dispatch/containers/kill?container_uuid=zzzzz-dz642-000000000000404"),
            t
        )
        .await,
        (404, err("container not found"))
    );
    for action in ["hold", "drain", "run"] {
        let path = format!("/arvados/v1/dispatch/instances/{action}");
        assert_eq!(
            call("POST", &u(&path), t).await,
            (400, err("instance_id parameter not provided"))
        );
        assert_eq!(
            call("POST", &u(&format!("{path}?instance_id=nope")), t).await,
            (404, err("requested instance does not exist"))
        );
    }
    assert_eq!(
        call("POST", &u("/arvados/v1/dispatch/instances/kill"), t).await,
        (400, err("instance_id parameter not provided"))
    );
    assert_eq!(
        call(
            "POST",
            &u("/arvados/v1/dispatch/instances/kill?instance_id=nope"),
            t
        )
        .await,
        (404, err("instance not found"))
    );
    // A form body works like the query string.
    let resp = reqwest_client()
        .post(u("/arvados/v1/dispatch/instances/hold"))
        .bearer_auth("tok")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("instance_id=nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(
        call("GET", &u("/arvados/v1/dispatch/nothing"), t).await.0,
        404
    );
    assert_eq!(
        call("DELETE", &u("/arvados/v1/dispatch/instances"), t)
            .await
            .0,
        405
    );
    assert_eq!(
        call("GET", &u("/arvados/v1/dispatch/instances/hold"), t)
            .await
            .0,
        405
    );
    // Health: its own token rules.
    assert_eq!(
        call("GET", &u("/_health/ping"), t).await,
        (200, r#"{"health":"OK"}"#.into())
    );
    assert_eq!(
        call("GET", &u("/_health/ping"), None).await,
        (401, err("authorization required"))
    );
    assert_eq!(
        call("GET", &u("/_health/ping"), Some("bad")).await,
        (403, err("authorization error"))
    );
    // Still serving after all that.
    assert_eq!(
        call("GET", &u("/arvados/v1/dispatch/instances"), t).await.0,
        200
    );
    r.stop().await;
}

/// A container goes through the whole service to Complete; `/metrics` then passes
/// `promtool check metrics` and carries the catalogue's names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_runs_to_complete_and_metrics_pass_promtool() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let r = start(&cluster(&f, "tok"), stub(json!({}))).await;
    let u = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "300".into())],
        ..Default::default()
    });
    let state = |u: &str| common::container_state(&f, u);
    wait_for("container Running", Duration::from_secs(20), || {
        state(&u) == "Running"
    })
    .await;
    let (_, body) = call(
        "GET",
        &format!("{}/arvados/v1/dispatch/containers", r.url),
        Some("tok"),
    )
    .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    if let Some(item) = v["items"].as_array().unwrap().first() {
        for k in [
            "container",
            "instance_resources",
            "instance_types",
            "first_seen_at",
            "scheduling_status",
        ] {
            assert!(item.get(k).is_some(), "{k} missing in {item}");
        }
    }
    wait_for("container Complete", Duration::from_secs(20), || {
        state(&u) == "Complete"
    })
    .await;
    let (s, metrics) = call("GET", &format!("{}/metrics", r.url), Some("tok")).await;
    assert_eq!(s, 200);
    for want in [
        "arvados_dispatchcloud_driver_operations{error=\"0\",operation=\"Create\"} 1",
        "arvados_dispatchcloud_boot_outcomes{outcome=\"success\"} 1",
        "arvados_dispatchcloud_queue_entries",
        "arvados_dispatchcloud_containers_time_from_queue_to_crunch_run_seconds_count 1",
        "arvados_dispatchcloud_max_concurrent_containers",
        "arvados_dispatchcloud_at_quota 0",
        "arvados_dispatchcloud_active 1",
        "arvados_version_running{version=",
        "arvados_config_load_timestamp_seconds",
        "arvados_concurrent_requests 1",
        "arvados_max_concurrent_requests 64",
        "arvados_dispatchcloud_request_duration_seconds_count{code=\"200\",method=\"get\"}",
        "arvados_dispatchcloud_time_to_status_seconds",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in\n{metrics}");
    }
    let (_, json_path) = call("GET", &format!("{}/metrics.json", r.url), Some("tok")).await;
    assert!(json_path.contains("arvados_dispatchcloud_driver_operations"));
    promtool_check(&metrics);
    r.stop().await;
}

/// The metrics `promtool check metrics` finds fault with whose names Arvados' Go dispatcher
/// chose (counters without `_total`, gauges with it): kept for dashboards and alerts that
/// already use them. No other lint problem is allowed.
const ARVADOS_NAMES_PROMTOOL_LINTS: [&str; 6] = [
    "arvados_dispatchcloud_boot_outcomes",
    "arvados_dispatchcloud_driver_operations",
    "arvados_dispatchcloud_instances_disappeared",
    "arvados_dispatchcloud_instances_total",
    "arvados_dispatchcloud_memory_bytes_total",
    "arvados_dispatchcloud_vcpus_total",
];

/// `promtool check metrics` must find no parse error and lint only
/// [`ARVADOS_NAMES_PROMTOOL_LINTS`].
fn promtool_check(metrics: &str) {
    use std::io::Write;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool missing in CI: scripts/test installs prometheus"
        );
        eprintln!(
            "SKIPPED promtool check: promtool is not installed (scripts/test installs prometheus)"
        );
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let name = line.split_whitespace().next().unwrap_or("");
        assert!(
            ARVADOS_NAMES_PROMTOOL_LINTS.contains(&name),
            "promtool: {line}\n{report}"
        );
    }
    // Each exception is still needed (else it goes from the list).
    for name in ARVADOS_NAMES_PROMTOOL_LINTS {
        assert!(
            report.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} no longer draws a promtool lint: remove it from the exceptions\n{report}"
        );
    }
}

/// Stop the service mid-run and start a new one over the same API and stub cloud: it adopts
/// the VMs and the running containers, starts nothing twice, and everything finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_adopts_vms_and_containers_and_starts_nothing_twice() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let set = stub(json!({}));
    let c = cluster(&f, "tok");
    let uuids: Vec<String> = (0..4)
        .map(|_| {
            f.add_container(&ContainerSpec {
                environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "2500".into())],
                ..Default::default()
            })
        })
        .collect();
    let state = |u: &str| common::container_state(&f, u);
    let r1 = start(&c, set.clone()).await;
    wait_for("all Running", Duration::from_secs(20), || {
        uuids.iter().all(|u| state(u) == "Running")
    })
    .await;
    r1.stop().await;
    let vms_before: Vec<String> = set
        .vms()
        .iter()
        .map(|v| cloud::Instance::id(&**v))
        .collect();
    let r2 = start(&c, set.clone()).await;
    wait_for("all Complete", Duration::from_secs(30), || {
        uuids.iter().all(|u| state(u) == "Complete")
    })
    .await;
    let runs = f
        .state_changes()
        .iter()
        .filter(|s| s.to == "Running")
        .count();
    assert_eq!(runs, uuids.len(), "each container ran exactly once");
    let detaches: usize = set.vms().iter().map(|v| v.detach_count()).sum();
    assert_eq!(detaches, uuids.len(), "no crunch-run started twice");
    for id in &vms_before {
        assert!(
            set.vms().iter().any(|v| cloud::Instance::id(&**v) == *id)
                || r2.svc.pool.worker(id).is_none(),
            "VM {id} was adopted or cleanly retired"
        );
    }
    wait_for("idle VMs shut down", Duration::from_secs(20), || {
        set.vms().is_empty()
    })
    .await;
    r2.stop().await;
}

/// After a restart, adopted VMs that report their processes only after `StaleLockTimeout`
/// (slow network) still keep their containers: nothing Locked there is unlocked and started a
/// second time on another, quicker VM (Go unlocks at the timeout). Judged by the stub cloud's
/// record of crunch-run lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopted_workers_slower_than_stale_lock_timeout_start_nothing_twice() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let set = stub(json!({}));
    let mut c = cluster(&f, "tok");
    c.containers.stale_lock_timeout = Duration::from_millis(200);
    c.containers.cloud_vms.timeout_idle = Duration::from_secs(60);
    // Locked for a while before Running, as a real crunch-run loading its image is.
    let uuids: Vec<String> = (0..3)
        .map(|_| {
            f.add_container(&ContainerSpec {
                environment: vec![
                    ("FAKE_CRUNCH_RUN_START_MS".into(), "5000".into()),
                    ("FAKE_CRUNCH_RUN_MS".into(), "300".into()),
                ],
                ..Default::default()
            })
        })
        .collect();
    // One quick container leaves an idle VM that could take any of them.
    let quick = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "50".into())],
        ..Default::default()
    });
    let state = |u: &str| common::container_state(&f, u);
    let r1 = start(&c, set.clone()).await;
    wait_for("every crunch-run started", Duration::from_secs(30), || {
        set.process_lives().len() == uuids.len() + 1 && state(&quick) == "Complete"
    })
    .await;
    r1.stop().await;
    assert!(uuids.iter().all(|u| state(u) == "Locked"));
    // The VMs still starting crunch-run answer slowly after the restart: their first report
    // comes well after StaleLockTimeout. The idle one answers at once.
    let busy: Vec<String> = set
        .process_lives()
        .iter()
        .filter(|l| uuids.contains(&l.uuid))
        .map(|l| l.vm.clone())
        .collect();
    for vm in set.vms() {
        if busy.contains(&cloud::Instance::id(&*vm)) {
            vm.set_command_delay(Duration::from_millis(2000));
        }
    }
    let r2 = start(&c, set.clone()).await;
    wait_for("all Complete", Duration::from_secs(60), || {
        uuids.iter().all(|u| state(u) == "Complete")
    })
    .await;
    let v = testkit::oracle::violations(&set, &f.state_changes());
    assert!(v.is_empty(), "{v:#?}");
    assert_eq!(
        set.process_lives().len(),
        uuids.len() + 1,
        "each crunch-run started once"
    );
    set.set_command_delay(Duration::ZERO);
    r2.stop().await;
}

/// AC-DSP-4: the containers API shows each container's state and scheduling status in
/// scheduling order, with Arvados' exact texts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_dsp_4_containers_api() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let mut c = cluster(&f, "tok");
    c.containers.cloud_vms.initial_quota_estimate = 4;
    c.containers.reserve_extra_ram = 0;
    c.containers.local_keep_blob_buffers_per_vcpu = 0;
    c.containers.maximum_price_factor = 1.5;
    let set = stub(json!({
        "QuotaMaxInstances": 4,
        "CapacityPerType": {"providertype4": 0, "providertype6": 0, "providertype8": 0, "providertype16": 0},
    }));
    let r = start(&c, set).await;
    let list = format!("{}/arvados/v1/dispatch/containers", r.url);
    assert_eq!(
        call("GET", &list, Some("tok")).await,
        (200, r#"{"items":[]}"#.into())
    );
    let uuids: Vec<String> = (0..20i64)
        .map(|i| {
            f.add_container(&ContainerSpec {
                priority: 100 - i,
                ram: (i % 3 + 1) << 30,
                vcpus: i % 8 + 1,
                keep_cache_disk: Some(0),
                environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "120000".into())],
                ..Default::default()
            })
        })
        .collect();
    let mut want: Vec<(String, &str, String)> = Vec::new();
    for (i, u) in uuids.iter().enumerate() {
        let (state, status) = match i {
            0..=2 => ("Running", String::new()),
            3 => (
                "Locked",
                "Waiting in queue at position 1.  Cluster is at capacity for all eligible instance types (type4, type6) and cannot start a new instance right now.".to_string(),
            ),
            _ => (
                "Queued",
                format!(
                    "Waiting in queue at position {}.  Cluster is at capacity and cannot start any new instances right now.",
                    i - 2
                ),
            ),
        };
        want.push((u.clone(), state, status));
    }
    let mut got = Vec::new();
    for _ in 0..400 {
        let (_, body) = call("GET", &list, Some("tok")).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        got = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["container"]["uuid"].as_str().unwrap().to_string(),
                    i["container"]["state"].as_str().unwrap().to_string(),
                    i["scheduling_status"].as_str().unwrap().to_string(),
                )
            })
            .collect::<Vec<_>>();
        let matches = got.len() == want.len()
            && got
                .iter()
                .zip(&want)
                .all(|(g, w)| g.0 == w.0 && g.1 == w.1 && g.2 == w.2);
        if matches {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got: Vec<(String, &str, String)> = got
        .iter()
        .map(|(u, s, t)| (u.clone(), s.as_str(), t.clone()))
        .collect();
    assert_eq!(got, want);
    // One container by uuid.
    let (s, body) = call(
        "GET",
        &format!(
            "{}/arvados/v1/dispatch/container?container_uuid={}",
            r.url, uuids[3]
        ),
        Some("tok"),
    )
    .await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["scheduling_status"], want[3].2.as_str());
    r.stop().await;
}

/// A client that sends half a request and nothing more is disconnected after the header-read
/// timeout, and does not hold up shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_off_and_do_not_hold_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let opts = http_server::ServeOptions {
        header_read_timeout: Duration::from_millis(500),
        drain: Duration::from_millis(500),
    };
    let r = start_with(&cluster(&f, "tok"), stub(json!({})), opts).await;
    let addr = r.url.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /arvados/v1/dispatch/instances HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The server hangs up (EOF or reset) instead of waiting for the rest forever.
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf))
        .await
        .expect("the server closes a connection whose headers never end");
    match read {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        }
    }
    // Meanwhile others are served.
    let (status, _) = call(
        "GET",
        &format!("{}/arvados/v1/dispatch/instances", r.url),
        Some("tok"),
    )
    .await;
    assert_eq!(status, 200);
    // Another half request open during shutdown: shutdown still ends promptly.
    let mut slow2 = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow2
        .write_all(b"POST /arvados/v1/dispatch/instances/kill HTTP/1.1\r\n")
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    r.stop().await;
    // Within the 10 s a SIGTERM may take (here drain is 0.5 s; the bound is for slow CI).
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

/// Whatever methods clients invent, `/metrics` grows by one `other` label at most; bodies over
/// the limit are refused; more concurrent requests than `API.MaxConcurrentRequests` get 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_stay_bounded_bodies_are_limited_and_concurrency_is_enforced() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let mut c = cluster(&f, "tok");
    c.api.max_concurrent_requests = 2;
    let r = start(&c, stub(json!({}))).await;
    let u = |p: &str| format!("{}{p}", r.url);
    for i in 0..50 {
        let (status, _) = call(
            &format!("FOO{i}"),
            &u("/arvados/v1/dispatch/instances"),
            Some("tok"),
        )
        .await;
        assert!(status >= 400, "{status}");
    }
    let (_, metrics) = call("GET", &u("/metrics"), Some("tok")).await;
    assert!(
        !metrics.to_lowercase().contains("foo"),
        "raw methods leaked into /metrics"
    );
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    let labels: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("arvados_dispatchcloud_request_duration_seconds"))
        .filter_map(|l| l.split("method=\"").nth(1))
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(labels.len() <= 8, "{labels:?}");

    // A body over the limit.
    let big = "instance_id=".to_string() + &"x".repeat(api::MAX_BODY + 1);
    let resp = reqwest_client()
        .post(u("/arvados/v1/dispatch/instances/hold"))
        .bearer_auth("tok")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);

    // Hold both slots with requests whose bodies never finish; the third gets 503.
    use tokio::io::AsyncWriteExt;
    let addr = r.url.trim_start_matches("http://").to_string();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(
            b"POST /arvados/v1/dispatch/instances/hold HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ninst",
        )
        .await
        .unwrap();
        held.push(s);
    }
    // Wait until the server has both of them in hand (a loaded machine may take a while to
    // get to them), then a third request is refused at once.
    let in_flight = |svc: &Service| {
        svc.registry
            .gather()
            .iter()
            .find(|m| m.name() == "arvados_concurrent_requests")
            .and_then(|m| m.get_metric().first().map(|g| g.get_gauge().get_value()))
            .unwrap_or(0.0)
    };
    wait_for("two requests in flight", Duration::from_secs(30), || {
        in_flight(&r.svc) == 2.0
    })
    .await;
    let (status, body) = call("GET", &u("/arvados/v1/dispatch/instances"), Some("tok")).await;
    assert_eq!(
        (status, body.as_str()),
        (503, r#"{"errors":["too many concurrent requests"]}"#),
        "a third concurrent request is refused"
    );
    drop(held);
    wait_for("the slots back", Duration::from_secs(30), || {
        in_flight(&r.svc) == 0.0
    })
    .await;
    let (status, _) = call("GET", &u("/arvados/v1/dispatch/instances"), Some("tok")).await;
    assert_eq!(status, 200, "slots come back when the clients go");
    r.stop().await;
}

/// An API that accepts some requests and never answers them (one container's lock, another's
/// mounts fetch, a third's unlock): the call deadline ends them, the other containers
/// dispatch, and shutdown with every list request hanging still ends promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_api_calls_do_not_stop_other_containers_or_shutdown() {
    use testkit::{Fault, FaultKind};
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let mut c = cluster(&f, "tok");
    c.api.request_timeout = Duration::from_secs(2);
    let spec = || ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "100".into())],
        ..Default::default()
    };
    let hung_lock = f.add_container(&spec());
    let hung_mounts = f.add_container(&spec());
    let others: Vec<String> = (0..3).map(|_| f.add_container(&spec())).collect();
    // Locked by this dispatcher's token and then put on hold: sync unlocks it.
    let hung_unlock = f.add_container(&spec());
    common::client(&f)
        .lock_container(&hung_unlock)
        .await
        .unwrap();
    assert!(f.set_priority(&hung_unlock, 0));
    let forever = FaultKind::Delay(Duration::from_secs(3600));
    f.inject_fault(
        Fault::new(forever.clone())
            .on("POST", &format!("{hung_lock}/lock"))
            .always(),
    );
    f.inject_fault(Fault::new(forever.clone()).on("GET", &hung_mounts).always());
    f.inject_fault(
        Fault::new(forever.clone())
            .on("POST", &format!("{hung_unlock}/unlock"))
            .always(),
    );
    let state = |u: &str| common::container_state(&f, u);
    let r = start(&c, stub(json!({}))).await;
    wait_for(
        "the other containers Complete",
        Duration::from_secs(60),
        || others.iter().all(|u| state(u) == "Complete"),
    )
    .await;
    assert_eq!(state(&hung_lock), "Queued");
    assert_eq!(state(&hung_mounts), "Queued");
    wait_for("the unlock tried", Duration::from_secs(30), || {
        f.requests()
            .iter()
            .any(|r| r.path.ends_with(&format!("{hung_unlock}/unlock")))
    })
    .await;
    // Still dispatching while it hangs: one more container goes through.
    let late = f.add_container(&spec());
    wait_for(
        "a container added later Complete",
        Duration::from_secs(60),
        || state(&late) == "Complete",
    )
    .await;
    assert_eq!(state(&hung_unlock), "Locked");
    // Now every list hangs too: the scheduler and the poller are stuck in API calls.
    f.inject_fault(
        Fault::new(forever)
            .on("GET", "/arvados/v1/containers")
            .always(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), r.stop())
        .await
        .expect("shutdown ends within 10 s");
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// A dispatcher stopped while its creates are still in flight: the VMs they make later are
/// adopted by the next dispatcher (or retired when idle), nothing leaks, nothing runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_while_creates_are_in_flight_leaks_nothing() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let set = stub(json!({"HoldCloudOps": true}));
    let mut c = cluster(&f, "tok");
    c.containers.cloud_vms.timeout_idle = Duration::from_secs(1);
    let uuids: Vec<String> = (0..3)
        .map(|_| {
            f.add_container(&ContainerSpec {
                environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "200".into())],
                ..Default::default()
            })
        })
        .collect();
    let state = |u: &str| common::container_state(&f, u);
    let r1 = start(&c, set.clone()).await;
    wait_for("creates in flight", Duration::from_secs(20), || {
        r1.svc.pool.instances().len() == uuids.len()
    })
    .await;
    r1.stop().await;
    // The cloud gets round to those creates (and to every destroy from now on).
    set.release_cloud_ops(1000);
    wait_for(
        "the held creates made their VMs",
        Duration::from_secs(20),
        || set.vms().len() == uuids.len(),
    )
    .await;
    let r2 = start(&c, set.clone()).await;
    wait_for("all Complete", Duration::from_secs(60), || {
        uuids.iter().all(|u| state(u) == "Complete")
    })
    .await;
    wait_for("every VM retired", Duration::from_secs(30), || {
        testkit::oracle::leaked_vms(&set).is_empty()
    })
    .await;
    let v = testkit::oracle::violations(&set, &f.state_changes());
    assert!(v.is_empty(), "{v:#?}");
    assert_eq!(set.process_lives().len(), uuids.len());
    r2.stop().await;
}

/// After a restart, the mounts of a Running container cannot be fetched (the API answers 500
/// for it): the container is kept in the queue and keeps running; Go dropped it, and sync then
/// killed it as "not in queue".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_failing_mounts_fetch_keeps_a_running_container() {
    use testkit::{Fault, FaultKind};
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let set = stub(json!({}));
    let c = cluster(&f, "tok");
    let u = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "15000".into())],
        ..Default::default()
    });
    let state = |u: &str| common::container_state(&f, u);
    let r1 = start(&c, set.clone()).await;
    wait_for("Running", Duration::from_secs(20), || {
        state(&u) == "Running"
    })
    .await;
    r1.stop().await;
    f.inject_fault(Fault::new(FaultKind::Status(500)).on("GET", &u).always());
    let r2 = start(&c, set.clone()).await;
    wait_for(
        "the restarted dispatcher to queue it without mounts, and see it running",
        Duration::from_secs(30),
        || {
            r2.svc.queue.get(&u).is_some_and(|e| e.mounts_pending)
                && r2.svc.pool.running().contains_key(&u)
        },
    )
    .await;
    // Polls and syncs go on; it still runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(state(&u), "Running");
    assert!(r2.svc.pool.running().contains_key(&u));
    f.clear_faults();
    wait_for("Complete", Duration::from_secs(30), || {
        state(&u) == "Complete"
    })
    .await;
    assert_eq!(set.process_lives().len(), 1);
    r2.stop().await;
}

/// After a restart, an adopted VM that does not answer at all (it crashed) holds up
/// scheduling only for `StaleLockTimeout`, as in Go: the longer wait for adopted workers'
/// reports is only for those that answer SSH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_a_dead_adopted_vm_still_schedules() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let set = stub(json!({}));
    let mut c = cluster(&f, "tok");
    c.containers.stale_lock_timeout = Duration::from_millis(500);
    c.containers.cloud_vms.timeout_booting = Duration::from_secs(600);
    let state = |u: &str| common::container_state(&f, u);
    // Its crunch-run is still starting (Locked) when the dispatcher restarts.
    let long = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_START_MS".into(), "60000".into())],
        ..Default::default()
    });
    let r1 = start(&c, set.clone()).await;
    wait_for("crunch-run started", Duration::from_secs(20), || {
        !set.process_lives().is_empty()
    })
    .await;
    r1.stop().await;
    let vm = set.process_lives()[0].vm.clone();
    for v in set.vms() {
        if cloud::Instance::id(&*v) == vm {
            v.crash();
        }
    }
    let r2 = start(&c, set.clone()).await;
    let quick = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "100".into())],
        ..Default::default()
    });
    // The scheduler locks only once fix_stale_locks is done: it is, long before the dead VM's
    // TimeoutBooting (10 min). (The new container then waits for the dead VM's capacity, as
    // in Go, until that VM is shut down.)
    wait_for(
        "scheduling to start despite the dead VM",
        Duration::from_secs(15),
        || state(&quick) == "Locked",
    )
    .await;
    // The container whose crunch-run died with the VM was unlocked after StaleLockTimeout.
    assert!(
        f.state_changes()
            .iter()
            .any(|ch| ch.uuid == long && ch.from == "Locked" && ch.to == "Queued"),
        "the stale lock was released"
    );
    r2.stop().await;
}

/// The spend cap end to end: the stub cloud (its own record) never holds more than the cap
/// allows, the waiting containers say why through the management API, the metrics show the
/// cap, the headroom and the waiting count, and every container still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_cap_holds_the_fleet_under_it_and_says_why_containers_wait() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let set = stub(json!({}));
    // The containers need type2 (1 GiB plus the RAM reserve): one at a time fits the cap.
    let cap = common::fixture_type(2).price * 1.5;
    let settings =
        Settings::from_str(&format!("SpendCaps:\n  MaxCostPerHour: {cap}\n"), "test").unwrap();
    let r = start_full(
        &cluster(&f, "tok"),
        &settings,
        set.clone(),
        http_server::ServeOptions::default(),
    )
    .await;
    let uuids: Vec<String> = (0..3)
        .map(|_| {
            f.add_container(&ContainerSpec {
                environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "1500".into())],
                ..Default::default()
            })
        })
        .collect();
    let state = |u: &str| common::container_state(&f, u);
    let mut most_vms = 0;
    let mut saw_status = false;
    let mut saw_metrics = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !uuids.iter().all(|u| state(u) == "Complete") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "containers did not complete"
        );
        most_vms = most_vms.max(set.vms().len());
        if !saw_status {
            let (_, body) = call(
                "GET",
                &format!("{}/arvados/v1/dispatch/containers", r.url),
                Some("tok"),
            )
            .await;
            saw_status = body.contains("would exceed the configured spend cap");
        }
        if !saw_metrics {
            let (_, m) = call("GET", &format!("{}/metrics", r.url), Some("tok")).await;
            assert!(
                m.contains(&format!(
                    "arvados_dispatchcloud_spend_cap{{period=\"hour\"}} {cap}"
                )),
                "{m}"
            );
            assert!(m.contains("arvados_dispatchcloud_spend_cap{period=\"day\"} 0"));
            let value = |name: &str| {
                m.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
                    .unwrap_or(-1.0)
            };
            let headroom = value("arvados_dispatchcloud_spend_headroom_per_hour");
            saw_metrics = value("arvados_dispatchcloud_containers_waiting_spend_cap") == 2.0
                && (headroom - (cap - common::fixture_type(2).price)).abs() < 1e-9;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(most_vms, 1, "the cap allows one type2 VM at a time");
    assert!(saw_status, "no container said it waits for the spend cap");
    assert!(
        saw_metrics,
        "the metrics never showed two containers waiting"
    );
    r.stop().await;
}

/// The status page over HTTP: the login form without a token, nothing with a wrong one, a
/// session cookie that scripts and other sites cannot use, the live view with it, and
/// headers that forbid framing and inline scripts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_needs_the_management_token_and_sets_a_strict_cookie() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let r = start(&cluster(&f, "s3cret"), stub(json!({}))).await;
    let u = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "60000".into())],
        ..Default::default()
    });
    wait_for("container Running", Duration::from_secs(30), || {
        common::container_state(&f, &u) == "Running"
    })
    .await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let root = client.get(format!("{}/", r.url)).send().await.unwrap();
    assert_eq!(root.status().as_u16(), 303);
    assert_eq!(root.headers()["location"], "/status");

    let page = client
        .get(format!("{}/status", r.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let h = page.headers().clone();
    assert_eq!(h["x-frame-options"], "DENY");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let body = page.text().await.unwrap();
    assert!(body.contains("name=\"token\""), "{body}");
    assert!(!body.contains(&u), "no data without a token");
    let live = client
        .get(format!("{}/status/live", r.url))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status().as_u16(), 401);

    let wrong = client
        .post(format!("{}/status/login", r.url))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("token=guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 403);
    assert!(wrong.headers().get("set-cookie").is_none());
    assert!(!wrong.text().await.unwrap().contains(&u));

    let ok = client
        .post(format!("{}/status/login", r.url))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("token=s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 303);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in [
        "arvados_api_token=s3cret",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(cookie.contains(part), "{cookie}");
    }
    let with_cookie = |path: &str| {
        client
            .get(format!("{}{path}", r.url))
            .header("Cookie", "arvados_api_token=s3cret")
            .send()
    };
    let live = with_cookie("/status/live").await.unwrap();
    assert_eq!(live.status().as_u16(), 200);
    let live = live.text().await.unwrap();
    assert!(live.contains(&format!("data-container=\"{u}\"")), "{live}");
    assert!(
        !live.contains("data-role") && live.contains(">active<"),
        "{live}"
    );
    // The buttons' calls work with the cookie alone.
    let id = r.svc.pool.instances()[0].instance.clone();
    let hold = client
        .post(format!("{}/arvados/v1/dispatch/instances/hold", r.url))
        .header("Cookie", "arvados_api_token=s3cret")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!(
            "instance_id={}",
            url::form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(hold.status().as_u16(), 200);
    let live = with_cookie("/status/live")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(live.contains("data-idle-behavior=\"hold\""), "{live}");
    assert!(
        live.contains("data-kind=\"hold\""),
        "the event log shows the hold: {live}"
    );
    r.stop().await;
}

/// Issue 19, the management API's view of capacity: `GET /arvados/v1/dispatch/holdoffs` lists
/// the offering held off, until when, its errors in a row and the cloud's error; with
/// `Capacity.StateFile` the same state is in the file. It needs the management token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holdoffs_api_shows_which_offerings_are_held_off_until_when_and_why() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("capacity.json");
    let settings = Settings::from_str(
        &format!(
            "Capacity:\n  Backoff: true\n  BackoffBase: 30s\n  StateFile: {}\n",
            file.display()
        ),
        "test",
    )
    .unwrap();
    let r = start_full(
        &cluster(&f, "tok"),
        &settings,
        stub(json!({"CapacityPerType": {"providertype1": 0}})),
        http_server::ServeOptions::default(),
    )
    .await;
    let url = format!("{}/arvados/v1/dispatch/holdoffs", r.url);
    let (s, body) = call("GET", &url, Some("tok")).await;
    assert_eq!((s, body.as_str()), (200, r#"{"items":[]}"#));
    assert_eq!(call("GET", &url, None).await.0, 401);
    assert_eq!(call("GET", &url, Some("wrong")).await.0, 403);
    wait_for("first cloud list", Duration::from_secs(10), || {
        r.svc.pool.loaded()
    })
    .await;
    assert!(r.svc.pool.create(&fixture_type(1)).is_some());
    wait_for("the capacity error", Duration::from_secs(10), || {
        !r.svc.pool.holdoffs().is_empty()
    })
    .await;
    let (s, body) = call("GET", &url, Some("tok")).await;
    assert_eq!(s, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{v}");
    let h = &items[0];
    assert_eq!(h["offering"], "providertype1");
    assert_eq!(h["what"], "providertype1");
    assert_eq!(h["errors_in_a_row"], 1);
    assert_eq!(h["reason"], "the cloud reported insufficient capacity");
    assert!(h["error"].as_str().unwrap().contains("no capacity"), "{h}");
    let until: chrono::DateTime<chrono::Utc> = h["until"].as_str().unwrap().parse().unwrap();
    let left = (until - chrono::Utc::now()).num_seconds();
    assert!((20..=38).contains(&left), "{left} s left");
    wait_for("the state file", Duration::from_secs(10), || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains("providertype1"))
    })
    .await;
    let saved =
        dispatchcloud::worker::capacity_file(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let o = &saved.offerings["providertype1"];
    assert_eq!(o.errors_in_a_row, 1);
    assert_eq!(o.held_until.map(|t| t.timestamp()), Some(until.timestamp()));
    r.stop().await;
}

/// Issue 19, spot interruption notices (settings `Interruptions`). The stub cloud announces
/// VM 1's end a second after creating it (crunch-run records `preemptionNotice` in the
/// container's `runtime_status`, as on EC2, and the VM reports it to the pool). Container A runs on VM 1 through the notice;
/// B is queued after A completes. Judged from the stub cloud's record of crunch-run lives:
/// * off (Arvados): B starts on the doomed VM 1, where its work would be lost;
/// * `Drain`: VM 1 takes nothing new and is shut down when A ends; B runs on a new VM, and
///   the hold-offs show the offering at risk;
/// * `Drain` + `PreBoot`: the replacement VM is created at the notice, before A ends, and B
///   runs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spot_interruption_notices_drain_the_instance_and_can_pre_boot_a_replacement() {
    for (drain, pre_boot) in [(false, false), (true, false), (true, true)] {
        let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
        let mut c = cluster(&f, "tok");
        c.containers.cloud_vms.timeout_idle = Duration::from_secs(30);
        // One spot type, and containers that ask for spot.
        let t2 = arvados::InstanceType {
            preemptible: true,
            ..fixture_type(2)
        };
        c.instance_types = [(t2.name.clone(), t2)].into();
        let settings = Settings::from_str(
            &format!(
                "Capacity:\n  Backoff: true\n  BackoffBase: 1s\nInterruptions:\n  Drain: {drain}\n  PreBoot: {pre_boot}\n"
            ),
            "test",
        )
        .unwrap();
        // VM 1 (and every odd one) is doomed; the others are not. (With `Drain` the pool
        // also reads the cloud's own notices, so a doomed replacement would be drained too.)
        let set = stub(json!({"VmProfiles": [
            {"VanishAfter": "60s", "InterruptionNotice": "59s"},
            {},
        ]}));
        let r = start_full(
            &c,
            &settings,
            set.clone(),
            http_server::ServeOptions::default(),
        )
        .await;
        let mode = format!("drain {drain}, pre-boot {pre_boot}");
        let spec = |ms: u64| ContainerSpec {
            environment: vec![("FAKE_CRUNCH_RUN_MS".into(), ms.to_string())],
            preemptible: true,
            ..Default::default()
        };
        let a = f.add_container(&spec(5000));
        wait_for("A to get its notice", Duration::from_secs(30), || {
            f.container(&a).unwrap()["runtime_status"]["preemptionNotice"].is_string()
        })
        .await;
        let vm1 = cloud::Instance::id(set.vms()[0].as_ref());
        if drain {
            wait_for("VM 1 to drain", Duration::from_secs(10), || {
                r.svc.pool.worker(&vm1).is_some_and(|w| {
                    w.idle_behavior == dispatchcloud::worker_state::IdleBehavior::Drain
                })
            })
            .await;
        }
        if drain && !pre_boot {
            // The spot offering is at risk (in doubt) until a create of it succeeds (B's).
            wait_for("the offering at risk", Duration::from_secs(10), || {
                r.svc.pool.holdoffs().iter().any(|h| {
                    h.offering.as_deref() == Some("providertype2-preemptible")
                        && h.error.contains("spot interruption notice")
                })
            })
            .await;
        }
        if pre_boot {
            wait_for("the replacement VM", Duration::from_secs(10), || {
                set.vm_history().len() == 2
            })
            .await;
            assert_eq!(common::container_state(&f, &a), "Running", "{mode}");
        }
        wait_for("A to complete", Duration::from_secs(30), || {
            common::container_state(&f, &a) == "Complete"
        })
        .await;
        let b = f.add_container(&spec(300));
        wait_for("B to start", Duration::from_secs(30), || {
            set.process_lives().iter().any(|l| l.uuid == b)
        })
        .await;
        let lives = set.process_lives();
        let b_vm = &lives.iter().find(|l| l.uuid == b).unwrap().vm;
        let a_vm = &lives.iter().find(|l| l.uuid == a).unwrap().vm;
        assert_eq!(a_vm, &vm1, "{mode}");
        if drain {
            assert_ne!(
                b_vm, &vm1,
                "{mode}: B started on the instance being taken back"
            );
            let history = set.vm_history();
            assert_eq!(history.len(), 2, "{mode}: one replacement: {history:?}");
            wait_for("VM 1 to be shut down", Duration::from_secs(10), || {
                set.vms()
                    .iter()
                    .all(|v| cloud::Instance::id(v.as_ref()) != vm1)
            })
            .await;
        } else {
            assert_eq!(b_vm, &vm1, "{mode}: Arvados reuses the instance");
        }
        r.stop().await;
    }
}
