//! AC-DSP-1: 200 containers through the whole dispatcher over a faulty stub cloud and an API
//! that answers 503 for a moment. Every container finishes at most once (completes, or is
//! cancelled after its crunch-run crashed), no container runs on two VMs at once, every VM is
//! destroyed at the end, and `/metrics` shows what happened.
//!
//! Timings are those of the Go test scaled up a few times: our debug builds do real SSH
//! handshakes to every VM.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cloud::registry::Registry;
use dispatchcloud::scheduler::pool::WorkerPool;
use dispatchcloud::service::{Service, api};
use serde_json::json;
use testkit::stub_driver::{StubConfig, StubSet};
use testkit::{ContainerSpec, FakeArvados, FakeConfig, Fault, FaultKind};
use tokio::sync::watch;

use common::SharedStub;

fn fixture_type(i: i64) -> arvados::InstanceType {
    arvados::InstanceType {
        name: format!("type{i}"),
        provider_type: format!("providertype{i}"),
        vcpus: i,
        ram: i * (1 << 30) * 11 / 10,
        scratch: (i << 30) * 10,
        included_scratch: (i << 30) * 10,
        price: i as f64 * 0.123,
        ..Default::default()
    }
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_dsp_1_dispatch_to_stub_driver() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let ms = Duration::from_millis;
    let mut c = arvados::Cluster {
        cluster_id: "zzzzz".into(),
        management_token: "test-management-token".into(),
        system_root_token: f.root_token().into(),
        ..Default::default()
    };
    c.services.controller.external_url = f.base_url().into();
    let k = &mut c.containers;
    k.crunch_run_command = "crunch-run".into();
    k.crunch_run_arguments_list = vec!["--foo".into(), "--extra='args'".into()];
    k.runtime_engine = "stub".into();
    k.stale_lock_timeout = ms(5);
    k.max_dispatch_attempts = 10;
    k.maximum_price_factor = 1.5;
    k.reserve_extra_ram = 0;
    k.dispatch_private_key = cloud::sshd::new_ed25519_key()
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .unwrap()
        .to_string();
    let v = &mut k.cloud_vms;
    v.driver = "stub".into();
    v.deploy_runner_binary = String::new();
    v.sync_interval = ms(40);
    v.timeout_idle = ms(600);
    v.timeout_booting = ms(1500);
    v.timeout_probe = ms(200);
    v.timeout_shutdown = ms(20);
    v.max_cloud_ops_per_second = 500.0;
    v.initial_quota_estimate = 8;
    v.poll_interval = ms(20);
    v.probe_interval = ms(20);
    v.max_probes_per_second = 1000.0;
    v.timeout_signal = ms(12);
    v.timeout_stale_run_lock = ms(12);
    v.timeout_term = ms(80);
    v.max_concurrent_instance_create_ops = 0;
    v.tag_key_prefix = "test:".into();
    v.resource_tags = [("testtag".to_string(), "test value".to_string())].into();
    let params = json!({
        "QuotaMaxInstances": 10,
        "MinTimeBetweenCreateCalls": "1ms",
        "ErrorRateCreate": 0.1,
        // Some creates make the VM and then fail with an unknown outcome: the VM must be
        // adopted, not leaked, and no second VM made in its place.
        "ErrorRateCreateAfterVm": 0.1,
        "ErrorRateDestroy": 0.1,
        "CapacityPerType": {"providertype6": 0},
        // type4 VMs are broken for the first 2 × TimeoutBooting.
        "BrokenTypesUntil": {"providertype4": "3s"},
        "BootDelay": "3ms",
        "CrunchRunDetachDelay": "5ms",
        "Seed": 7,
        // By creation count n: n%7==0 hangs, 1 has no crunch-run, 2 reports broken, the rest
        // crash crunch-run or leave stale locks now and then (one of them is also a spot VM
        // the cloud takes away).
        "VmProfiles": [
            {"HangAfter": "60ms"},
            {"CrunchRunMissing": true},
            {"ReportBrokenAfter": "150ms"},
            {"CrashRate": 0.1, "StaleLockDeadlockRate": 0.1},
            {"CrashRate": 0.1, "StaleLockDeadlockRate": 0.1},
            {"CrashRate": 0.1, "StaleLockDeadlockRate": 0.1, "VanishAfter": "700ms"},
            {"CrashRate": 0.1, "StaleLockDeadlockRate": 0.1},
        ],
    });
    v.driver_parameters = serde_norway::to_value(&params).unwrap();
    for i in [1, 2, 3, 4, 6, 8, 16] {
        let t = fixture_type(i);
        c.instance_types.insert(t.name.clone(), t);
    }
    let uuids: Vec<String> = (0..200i64)
        .map(|i| {
            f.add_container(&ContainerSpec {
                priority: i % 20 + 1,
                ram: (i % 3 + 1) << 30,
                vcpus: i % 8 + 1,
                keep_cache_disk: Some(0),
                environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "100".into())],
                ..Default::default()
            })
        })
        .collect();

    // The stub cloud, shared with the test so it can see what the VMs were asked to run.
    let set = Arc::new(StubSet::new(StubConfig::from_params(&params).unwrap()));
    let mut drivers = Registry::new();
    drivers.register("stub", Arc::new(SharedStub(set.clone())));
    let svc = Service::build(&c, &drivers).unwrap();
    assert!(svc.pool.check_health().is_ok());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let rx = tokio_util::sync::CancellationToken::new();
    let stop = rx.clone();
    let router = api::router(svc.clone());
    let http_stop = rx.clone();
    let http = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                http_stop.cancelled().await;
            })
            .await;
    });
    let s = svc.clone();
    let run = tokio::spawn(async move { s.run(rx).await });

    // Watch: no container may be on two VMs at once.
    let (watch_stop, mut watch_rx) = watch::channel(false);
    let pool = svc.pool.clone();
    let watcher = tokio::spawn(async move {
        let mut doubles = Vec::new();
        loop {
            let mut seen: BTreeMap<String, String> = BTreeMap::new();
            for v in pool.instances() {
                for u in &v.running_container_uuids {
                    if let Some(other) = seen.insert(u.clone(), v.instance.clone()) {
                        doubles.push(format!("{u} on {other} and {}", v.instance));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = watch_rx.wait_for(|s| *s) => return doubles,
            }
        }
    });

    let finished = |u: &str| {
        matches!(
            f.container(u).unwrap()["state"].as_str(),
            Some("Complete") | Some("Cancelled")
        )
    };
    let mut injected = false;
    let mut last_done = 0;
    let mut last_progress = tokio::time::Instant::now();
    loop {
        let done = uuids.iter().filter(|u| finished(u)).count();
        if done == uuids.len() {
            break;
        }
        if !injected && uuids.len() - done <= 100 {
            f.inject_fault(
                Fault::new(FaultKind::Unavailable)
                    .on("GET", "/arvados/v1/containers")
                    .times(2),
            );
            injected = true;
        }
        if done > last_done {
            last_done = done;
            last_progress = tokio::time::Instant::now();
        }
        if last_progress.elapsed() >= Duration::from_secs(20) {
            let views: Vec<String> = svc
                .pool
                .instances()
                .iter()
                .map(|v| {
                    format!(
                        "{} {} {} {:?}",
                        v.instance,
                        v.worker_state,
                        v.idle_behavior.as_str(),
                        v.running_container_uuids
                    )
                })
                .collect();
            let queue: Vec<String> = svc
                .scheduler
                .queue_view()
                .sorted()
                .iter()
                .take(5)
                .map(|(e, s)| format!("{} {:?} {s}", e.container().uuid, e.container().state))
                .collect();
            panic!(
                "no progress for 20 s at {done}/{} finished\ninstances: {views:#?}\nqueue: {queue:#?}\nlimits: {:?}",
                uuids.len(),
                svc.scheduler.limits()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then the VMs go (idle timeout) and nothing is left: judged by the stub cloud's own VM
    // list, not by the pool's bookkeeping.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !testkit::oracle::leaked_vms(&set).is_empty() || !svc.pool.instances().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "VMs left in the cloud: {:?}; in the pool: {:?}",
            testkit::oracle::leaked_vms(&set),
            svc.pool.instances()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Never twice, never after the end: from the cloud's record of crunch-run processes.
    let violations = testkit::oracle::violations(&set, &f.state_changes());
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(set.process_lives().len() >= uuids.len() / 2);
    let _ = watch_stop.send(true);
    let doubles = watcher.await.unwrap();
    assert!(
        doubles.is_empty(),
        "containers on two VMs at once: {doubles:?}"
    );

    // At most once each.
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    for ch in f.state_changes() {
        if ch.to == "Running" {
            *runs.entry(ch.uuid).or_default() += 1;
        }
    }
    let twice: BTreeSet<&String> = runs
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(u, _)| u)
        .collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    let complete = uuids
        .iter()
        .filter(|u| f.container(u).unwrap()["state"] == "Complete")
        .count();
    assert!(complete > 150, "only {complete} of 200 completed");

    // The exact crunch-run command line and its stdin, as the VMs saw them.
    let log = set.detach_log();
    assert!(!log.is_empty());
    for (cmd, stdin) in &log {
        let uuid = cmd.rsplit(' ').next().unwrap().trim_matches('\'');
        let want = r"crunch-run --detach --stdin-config '--runtime-engine=stub' '--foo' '--extra='\''args'\''' 'UUID'";
        assert_eq!(*cmd, want.replace("UUID", uuid));
        let cfg: serde_json::Value = serde_json::from_slice(stdin).unwrap();
        assert_eq!(
            cfg["Env"]["ARVADOS_API_HOST"],
            f.base_url().trim_end_matches('/')
        );
        assert_eq!(cfg["Env"]["ARVADOS_API_TOKEN"], f.root_token());
        // Secrets that control other machines never reach a worker.
        let text = String::from_utf8_lossy(stdin);
        assert!(!text.contains("PRIVATE KEY") && !text.contains("test-management-token"));
    }
    let cancelled = uuids
        .iter()
        .filter(|u| f.container(u).unwrap()["state"] == "Cancelled")
        .count();
    let scrape = || async {
        reqwest::Client::new()
            .get(format!("{url}/metrics"))
            .bearer_auth("test-management-token")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    // Every finished container is counted once, when the queue lets it go (wait for the
    // last ones to be polled).
    let finished = |m: &str| {
        let n = |s| {
            metric(
                m,
                &format!("arvados_dispatchcloud_containers_finished_total{{state=\"{s}\"}}"),
            )
        };
        (n("Complete"), n("Cancelled"))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut m = scrape().await;
    while finished(&m) != (Some(complete as f64), Some(cancelled as f64)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "containers_finished_total {:?}, the API has {complete} Complete and {cancelled} Cancelled",
            finished(&m)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        m = scrape().await;
    }
    let get = |k: &str| {
        metric(&m, &format!("arvados_dispatchcloud_{k}"))
            .unwrap_or_else(|| panic!("{k} missing in\n{m}"))
    };
    for op in ["Create", "List", "Destroy"] {
        assert!(
            get(&format!(
                "driver_operations{{error=\"0\",operation=\"{op}\"}}"
            )) > 0.0,
            "{op}"
        );
    }
    assert!(get("driver_operations{error=\"1\",operation=\"Create\"}") > 0.0);
    assert_eq!(
        get("driver_operations{error=\"1\",operation=\"List\"}"),
        0.0
    );
    get("boot_outcomes{outcome=\"aborted\"}");
    for o in ["disappeared", "failure", "success"] {
        assert!(
            get(&format!("boot_outcomes{{outcome=\"{o}\"}}")) > 0.0,
            "boot outcome {o}"
        );
    }
    assert!(get("instances_disappeared{state=\"shutdown\"}") > 0.0);
    assert_eq!(get("instances_disappeared{state=\"unknown\"}"), 0.0);
    for s in [
        "instances_time_to_ssh_seconds{quantile=\"0.95\"}",
        "instances_time_to_ssh_seconds_count",
        "instances_time_to_ssh_seconds_sum",
        "instances_time_to_ready_for_container_seconds_count",
        "instances_time_from_shutdown_request_to_disappearance_seconds_count",
        "containers_time_from_queue_to_crunch_run_seconds_count",
        "instances_run_probe_duration_seconds_count{outcome=\"success\"}",
        "instances_run_probe_duration_seconds_count{outcome=\"fail\"}",
    ] {
        assert!(get(s) > 0.0, "{s}");
    }
    assert!(get("last_503_time") > 0.0);
    assert!(get("max_concurrent_containers") > 0.0);
    // The metrics the dashboards add to Arvados' set.
    assert!(get("scheduling_pass_duration_seconds_count") > 0.0);
    assert!(get("instances_broken_total") > 0.0);
    assert!(get("driver_errors_total{kind=\"other\",operation=\"Create\"}") > 0.0);
    let sum = |prefix: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with(&format!("arvados_dispatchcloud_{prefix}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // VMs were busy and idle for a while, and cost something.
    assert!(sum("instances_seconds_total") > 1.0);
    assert!(sum("instances_cost_total") > 0.0);
    for c in ["inuse", "idle", "booting"] {
        assert!(
            m.lines().any(|l| l.starts_with(&format!(
                "arvados_dispatchcloud_instances_seconds_total{{category=\"{c}\""
            )) && !l.ends_with(" 0")),
            "no {c} instance-seconds"
        );
    }

    stop.cancel();
    let _ = run.await;
    let _ = http.await;
}
