//! The worker pool against the stub cloud (every VM a real SSH server whose crunch-run drives
//! containers on the fake Arvados API): AC-POOL-1, AC-POOL-4, starting a container to
//! Complete, and adoption after a restart without starting anything twice.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arvados::InstanceType;
use dispatchcloud::scheduler::pool::WorkerPool;
use dispatchcloud::worker::{Pool, PoolConfig};
use dispatchcloud::worker_state::{IdleBehavior, WorkerState};
use serde_json::json;
use testkit::stub_driver::{StubConfig, StubSet};
use testkit::{ContainerSpec, FakeArvados, FakeConfig};

use common::{fixture_type, wait_for};

fn cluster(types: &[InstanceType], api: Option<&FakeArvados>) -> arvados::Cluster {
    let mut c = arvados::Cluster {
        cluster_id: "zzzzz".into(),
        ..Default::default()
    };
    let vms = &mut c.containers.cloud_vms;
    vms.deploy_runner_binary = String::new();
    vms.probe_interval = Duration::from_millis(10);
    vms.sync_interval = Duration::from_millis(10);
    vms.timeout_booting = Duration::from_secs(10);
    vms.timeout_idle = Duration::from_secs(600);
    for t in types {
        c.instance_types.insert(t.name.clone(), t.clone());
    }
    if let Some(f) = api {
        c.services.controller.external_url = f.base_url().to_string();
        c.system_root_token = f.root_token().to_string();
    }
    c
}

fn pool(
    cluster: &arvados::Cluster,
    set: Arc<StubSet>,
    key: &Arc<russh::keys::PrivateKey>,
    tweak: impl FnOnce(&mut PoolConfig),
) -> Arc<Pool> {
    pool_in(&prometheus::Registry::new(), cluster, set, key, tweak)
}

/// [`pool`], with its metrics in `registry`.
fn pool_in(
    registry: &prometheus::Registry,
    cluster: &arvados::Cluster,
    set: Arc<StubSet>,
    key: &Arc<russh::keys::PrivateKey>,
    tweak: impl FnOnce(&mut PoolConfig),
) -> Arc<Pool> {
    let mut cfg = PoolConfig::from_cluster(cluster, "zzzzz-test-pool", key.clone());
    tweak(&mut cfg);
    let p = Pool::new(cfg, set, registry).unwrap();
    p.start();
    p
}

/// `Capacity.Backoff` on or off, from 1 s up to a minute.
fn backoff(on: bool) -> dispatchcloud::settings::CapacitySettings {
    dispatchcloud::settings::CapacitySettings {
        backoff: on,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        ..Default::default()
    }
}

fn stub(params: serde_json::Value) -> Arc<StubSet> {
    Arc::new(StubSet::new(StubConfig::from_params(&params).unwrap()))
}

fn states(p: &Pool) -> Vec<(String, WorkerState, IdleBehavior)> {
    p.instances()
        .into_iter()
        .map(|v| (v.arvados_instance_type, v.worker_state, v.idle_behavior))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_pool_1_resume_after_restart() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let set = stub(json!({}));
    let types: Vec<InstanceType> = (1..=4).map(fixture_type).collect();
    let mut c = cluster(&types, None);
    c.containers.cloud_vms.tag_key_prefix = "testprefix:".into();
    c.containers.crunch_run_command = "crunch-run-custom".into();
    let p1 = pool(&c, set.clone(), &key, |cfg| cfg.max_concurrent_creates = 0);
    for i in [1, 1, 2, 4] {
        assert!(p1.create(&types[i - 1]).is_some());
    }
    wait_for("four idle workers", Duration::from_secs(5), || {
        let s = states(&p1);
        s.len() == 4 && s.iter().all(|(_, st, _)| *st == WorkerState::Idle)
    })
    .await;
    let type2 = p1
        .instances()
        .into_iter()
        .find(|v| v.arvados_instance_type == "type2")
        .unwrap()
        .instance;
    p1.set_idle_behavior(&type2, IdleBehavior::Hold).unwrap();
    wait_for("hold tag saved", Duration::from_secs(2), || {
        set.vms().iter().any(|v| {
            use cloud::Instance;
            v.id() == type2
                && v.tags().get("testprefix:IdleBehavior").map(String::as_str) == Some("hold")
        })
    })
    .await;
    p1.stop();

    c.instance_types.remove("type4");
    let p2 = pool(&c, set.clone(), &key, |_| {});
    // The type4 VM is adopted with `drain`, so it may be shut down (and gone) soon after: note
    // what was seen of it on the way.
    let mut type4_seen = None;
    wait_for("four workers recovered", Duration::from_secs(5), || {
        let s = states(&p2);
        if let Some((_, _, b)) = s.iter().find(|(t, _, _)| t == "type4") {
            type4_seen = Some(*b);
        }
        let others: Vec<_> = s.iter().filter(|(t, _, _)| t != "type4").collect();
        type4_seen.is_some()
            && others.len() == 3
            && others.iter().all(|(_, st, _)| *st == WorkerState::Idle)
    })
    .await;
    assert_eq!(type4_seen, Some(IdleBehavior::Drain));
    for v in p2.instances() {
        match v.arvados_instance_type.as_str() {
            "type2" => {
                assert_eq!(v.instance, type2, "same VM");
                assert_eq!(v.idle_behavior, IdleBehavior::Hold);
            }
            "type4" => assert_eq!(v.idle_behavior, IdleBehavior::Drain),
            _ => assert_eq!(v.idle_behavior, IdleBehavior::Run),
        }
    }
    p2.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_pool_4_create_unalloc_shutdown() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let set = stub(json!({"HoldCloudOps": true}));
    let t = |name: &str, vcpus: i64| InstanceType {
        name: name.into(),
        provider_type: name.into(),
        vcpus,
        ram: vcpus << 30,
        price: vcpus as f64,
        ..Default::default()
    };
    let (a1s, a2m, a2l) = (t("a1s", 1), t("a2m", 2), t("a2l", 2));
    let mut c = cluster(&[a1s.clone(), a2m.clone(), a2l.clone()], None);
    c.containers.cloud_vms.instance_init_command = "echo 'instance init command goes here'".into();
    c.containers.cloud_vms.timeout_idle = Duration::from_secs(600);
    let p = pool(&c, set.clone(), &key, |cfg| cfg.max_concurrent_creates = 0);
    let mut notes = p.subscribe();
    let mut notes2 = p.subscribe();
    for it in [&a2m, &a1s, &a2m, &a2l] {
        assert!(p.create(it).is_some());
    }
    let count = |name: &str| {
        p.instances()
            .iter()
            .filter(|v| v.arvados_instance_type == name)
            .count()
    };
    assert_eq!(
        (count("a1s"), count("a2m"), count("a2l")),
        (1, 2, 1),
        "pending creates are listed"
    );
    assert!(
        p.instances()
            .iter()
            .all(|v| v.instance.is_empty() && v.worker_state == WorkerState::Booting)
    );
    set.release_cloud_ops(4);
    wait_for("four workers", Duration::from_secs(5), || {
        p.worker_ids().len() == 4
    })
    .await;
    for vm in set.vms() {
        let init = vm.init_command();
        let (head, tail) = init.split_once('\n').unwrap();
        let secret = head
            .strip_prefix("umask 0177 && echo -n \"")
            .and_then(|s| s.strip_suffix("\" >/var/run/arvados-instance-secret"))
            .unwrap_or_else(|| panic!("init command {init:?}"));
        assert!(
            secret.len() == 40 && secret.chars().all(|c| c.is_ascii_hexdigit()),
            "{init:?}"
        );
        assert_eq!(tail, "echo 'instance init command goes here'");
    }
    let id_of = |name: &str| -> Vec<String> {
        p.instances()
            .into_iter()
            .filter(|v| v.arvados_instance_type == name)
            .map(|v| v.instance)
            .collect()
    };
    let l = id_of("a2l").pop().unwrap();
    p.set_idle_behavior(&l, IdleBehavior::Hold).unwrap();
    assert!(!p.shutdown(&l));
    assert_eq!(p.worker(&l).unwrap().idle_behavior, IdleBehavior::Hold);
    // Shutdown needs booting or idle: wait for them to settle.
    wait_for("workers idle", Duration::from_secs(5), || {
        p.instances()
            .iter()
            .all(|v| v.worker_state == WorkerState::Idle)
    })
    .await;
    let mut expect = 4;
    for m in id_of("a2m") {
        assert!(p.shutdown(&m));
        expect -= 1;
        set.release_cloud_ops(1);
        wait_for("a2m gone", Duration::from_secs(5), || {
            p.worker_ids().len() == expect
        })
        .await;
    }
    assert_eq!(id_of("a1s").len(), 1);
    let s = id_of("a1s").pop().unwrap();
    notes2.borrow_and_update();
    assert!(p.shutdown(&s));
    set.release_cloud_ops(1);
    wait_for("a1s gone", Duration::from_secs(5), || {
        p.worker_ids().len() == 1
    })
    .await;
    assert!(
        notes.has_changed().unwrap() && notes2.has_changed().unwrap(),
        "both subscribers notified"
    );
    notes.borrow_and_update();
    p.set_idle_behavior(&l, IdleBehavior::Run).unwrap();
    assert_eq!(p.worker(&l).unwrap().idle_behavior, IdleBehavior::Run);
    p.set_idle_behavior(&l, IdleBehavior::Drain).unwrap();
    assert_eq!(p.worker(&l).unwrap().worker_state, WorkerState::Shutdown);
    set.release_cloud_ops(1);
    wait_for("no instances", Duration::from_secs(5), || {
        p.instances().is_empty()
    })
    .await;
    p.stop();
}

/// A container started on a stub VM runs to Complete on the fake API; a restarted pool adopts
/// a VM with a running container from its tags and `--list`, and starts nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_container_to_complete_and_adopt_after_restart() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let set = stub(json!({"BootDelay": "100ms"}));
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), Some(&f));
    let p1 = pool(&c, set.clone(), &key, |_| {});
    let api = arvados::Client::new(arvados::ClientConfig {
        base_url: url::Url::parse(f.base_url()).unwrap(),
        token: f.root_token().into(),
        insecure: false,
        timeout: None,
        retry: Default::default(),
    })
    .unwrap();
    let state = |u: &str| {
        f.container(u).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(p1.create(&t1).is_some());
    wait_for("idle worker", Duration::from_secs(5), || {
        p1.instances()
            .first()
            .is_some_and(|v| v.worker_state == WorkerState::Idle)
    })
    .await;
    let id = p1.worker_ids().pop().unwrap();

    let quick = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "100".into())],
        ..Default::default()
    });
    let ctr = api.lock_container(&quick).await.unwrap();
    assert!(p1.start_container(&id, &ctr));
    assert!(p1.running().contains_key(&quick));
    wait_for("quick container Complete", Duration::from_secs(5), || {
        state(&quick) == "Complete"
    })
    .await;
    wait_for("exited placeholder", Duration::from_secs(5), || {
        p1.running().get(&quick).is_some_and(|t| t.is_some())
    })
    .await;
    p1.forget_container(&quick);

    let long = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "1500".into())],
        ..Default::default()
    });
    let ctr = api.lock_container(&long).await.unwrap();
    assert!(p1.start_container(&id, &ctr));
    wait_for("long container Running", Duration::from_secs(5), || {
        state(&long) == "Running"
    })
    .await;
    assert!(
        p1.tasks_running() >= 3,
        "sync, probe and metrics loops are tracked"
    );
    p1.stop();
    // Every task the pool spawned ends: loops on cancellation, calls within their deadlines.
    assert!(p1.join(Duration::from_secs(10)).await, "pool tasks joined");
    assert_eq!(p1.tasks_running(), 0);
    drop(p1);

    let p2 = pool(&c, set.clone(), &key, |_| {});
    wait_for(
        "adopted the running container",
        Duration::from_secs(5),
        || {
            p2.worker(&id).is_some_and(|v| {
                v.worker_state == WorkerState::Running
                    && v.running_container_uuids == [long.clone()]
            })
        },
    )
    .await;
    assert!(p2.running().contains_key(&long));
    wait_for("long container Complete", Duration::from_secs(5), || {
        state(&long) == "Complete"
    })
    .await;
    wait_for("worker idle again", Duration::from_secs(5), || {
        p2.worker(&id)
            .is_some_and(|v| v.worker_state == WorkerState::Idle)
    })
    .await;
    let vm = set.vms().pop().unwrap();
    assert_eq!(vm.detach_count(), 2, "each container started exactly once");
    p2.stop();
}

/// The pool's metrics reflect its workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_workers() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let set = stub(json!({}));
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), None);
    let registry = prometheus::Registry::new();
    let cfg = PoolConfig::from_cluster(&c, "zzzzz-test-pool", key.clone());
    let p = Pool::new(cfg, set, &registry).unwrap();
    p.start();
    assert!(p.create(&t1).is_some());
    wait_for("idle worker", Duration::from_secs(5), || {
        p.instances()
            .first()
            .is_some_and(|v| v.worker_state == WorkerState::Idle)
    })
    .await;
    p.update_metrics();
    assert_eq!(
        p.metrics
            .instances_total
            .with_label_values(&["idle", "type1"])
            .get(),
        1.0
    );
    assert_eq!(
        p.metrics
            .boot_outcomes
            .with_label_values(&["success"])
            .get(),
        1.0
    );
    assert_eq!(p.metrics.time_to_ssh.count(&[]), 1);
    assert_eq!(p.metrics.time_to_ready.count(&[]), 1);
    let names: Vec<String> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    for want in [
        "arvados_dispatchcloud_containers_running",
        "arvados_dispatchcloud_instances_total",
        "arvados_dispatchcloud_instances_price",
        "arvados_dispatchcloud_vcpus_total",
        "arvados_dispatchcloud_memory_bytes_total",
        "arvados_dispatchcloud_probe_age_seconds_max",
        "arvados_dispatchcloud_probe_age_seconds_median",
        "arvados_dispatchcloud_boot_outcomes",
        "arvados_dispatchcloud_instances_disappeared",
        "arvados_dispatchcloud_instances_time_to_ssh_seconds",
        "arvados_dispatchcloud_instances_time_to_ready_for_container_seconds",
        "arvados_dispatchcloud_instances_time_from_shutdown_request_to_disappearance_seconds",
        "arvados_dispatchcloud_containers_time_from_queue_to_crunch_run_seconds",
        "arvados_dispatchcloud_instances_run_probe_duration_seconds",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not registered: {names:?}"
        );
    }
    p.stop();
}

/// A deployed runner, stale locks and broken reports over the stub cloud: the pool installs
/// its runner binary (md5sum, then the install script), finds a lock that stays stale past
/// `TimeoutStaleRunLock`, takes it as `broken`, drains the worker and destroys it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_runner_and_stale_lock_turn_into_broken_and_drain() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let set = stub(json!({"StaleLockDeadlockRate": 1.0}));
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), Some(&f));
    let p = pool(&c, set.clone(), &key, |cfg| {
        cfg.runner_binary = Some(dispatchcloud::worker::config::RunnerBinary::new(
            b"ELF".to_vec(),
        ));
        cfg.timeout_stale_run_lock = Duration::from_millis(200);
    });
    assert!(p.create(&t1).is_some());
    wait_for(
        "idle worker with the deployed runner",
        Duration::from_secs(5),
        || {
            p.instances()
                .first()
                .is_some_and(|v| v.worker_state == WorkerState::Idle)
        },
    )
    .await;
    let id = p.worker_ids().pop().unwrap();
    let api = arvados::Client::new(arvados::ClientConfig {
        base_url: url::Url::parse(f.base_url()).unwrap(),
        token: f.root_token().into(),
        insecure: false,
        timeout: None,
        retry: Default::default(),
    })
    .unwrap();
    let u = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "50".into())],
        ..Default::default()
    });
    let ctr = api.lock_container(&u).await.unwrap();
    assert!(p.start_container(&id, &ctr));
    wait_for("container Complete", Duration::from_secs(5), || {
        f.container(&u).unwrap()["state"] == "Complete"
    })
    .await;
    wait_for(
        "stale lock escalated: worker drained and destroyed",
        Duration::from_secs(5),
        || set.vms().is_empty(),
    )
    .await;
    assert_eq!(
        p.metrics
            .boot_outcomes
            .with_label_values(&["failure"])
            .get(),
        0.0,
        "it had booted fine"
    );
    p.stop();
}

/// `ReportBrokenAfter`: `--list` says `broken`; the worker is drained and destroyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_reporting_broken_is_drained_and_destroyed() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let set = stub(json!({"ReportBrokenAfter": "1s"}));
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), None);
    let p = pool(&c, set.clone(), &key, |_| {});
    assert!(p.create(&t1).is_some());
    wait_for("worker idle", Duration::from_secs(5), || {
        p.instances()
            .first()
            .is_some_and(|v| v.worker_state == WorkerState::Idle)
    })
    .await;
    wait_for("broken worker destroyed", Duration::from_secs(5), || {
        set.vms().is_empty()
    })
    .await;
    p.stop();
}

/// Two idle stub VMs and one Locked container on the fake API.
async fn two_vms_and_a_locked_container(
    f: &FakeArvados,
) -> (Arc<Pool>, Arc<StubSet>, Vec<String>, arvados::Container) {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let set = stub(json!({}));
    let types = vec![fixture_type(1)];
    let c = cluster(&types, Some(f));
    let p = pool(&c, set.clone(), &key, |cfg| cfg.max_concurrent_creates = 0);
    assert!(p.create(&types[0]).is_some());
    assert!(p.create(&types[0]).is_some());
    wait_for("two idle workers", Duration::from_secs(20), || {
        let s = states(&p);
        s.len() == 2 && s.iter().all(|(_, st, _)| *st == WorkerState::Idle)
    })
    .await;
    let ids: Vec<String> = p.instances().into_iter().map(|v| v.instance).collect();
    let u = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "2000".into())],
        ..Default::default()
    });
    let api = common::client(f);
    let ctr = api.lock_container(&u).await.unwrap();
    (p, set, ids, ctr)
}

/// The pool refuses to start a container that runs or is starting on another worker, and the
/// stub cloud's record shows one life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_container_refuses_a_uuid_already_placed_elsewhere() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let (p, set, ids, ctr) = two_vms_and_a_locked_container(&f).await;
    assert!(p.start_container(&ids[0], &ctr));
    // Starting (not yet reported by a probe), then running: refused either way.
    assert!(!p.start_container(&ids[1], &ctr));
    wait_for("crunch-run reported", Duration::from_secs(20), || {
        p.worker(&ids[0])
            .is_some_and(|v| v.running_container_uuids.contains(&ctr.uuid))
    })
    .await;
    assert!(!p.start_container(&ids[1], &ctr));
    wait_for("container Complete", Duration::from_secs(30), || {
        f.container(&ctr.uuid).unwrap()["state"] == "Complete"
    })
    .await;
    let lives = set.process_lives();
    assert_eq!(lives.len(), 1, "{lives:?}");
    assert!(testkit::oracle::violations(&set, &f.state_changes()).is_empty());
    p.stop();
}

/// The oracle can fail: a pool that forgets a running crunch-run starts the container again
/// elsewhere, and the stub cloud's record of process lives reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_reports_the_double_start_of_a_pool_that_forgets() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let (p, set, ids, ctr) = two_vms_and_a_locked_container(&f).await;
    assert!(p.start_container(&ids[0], &ctr));
    wait_for("crunch-run started", Duration::from_secs(20), || {
        !set.process_lives().is_empty()
    })
    .await;
    p.test_forget_process(&ctr.uuid); // the planted bug
    assert!(p.start_container(&ids[1], &ctr));
    wait_for(
        "the second crunch-run started",
        Duration::from_secs(20),
        || set.process_lives().len() == 2,
    )
    .await;
    let v = testkit::oracle::violations(&set, &f.state_changes());
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].starts_with(&format!("{} ran twice at once", ctr.uuid)),
        "{v:?}"
    );
    p.stop();
}

/// A pool over the stub cloud behind the service's call deadlines (short ones).
fn pool_with_deadlines(
    set: Arc<StubSet>,
    tweak: impl FnOnce(&mut PoolConfig),
) -> (Arc<Pool>, InstanceType) {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let types = vec![fixture_type(1)];
    let c = cluster(&types, None);
    let mut cfg = PoolConfig::from_cluster(&c, "zzzzz-test-pool", key);
    cfg.max_concurrent_creates = 1;
    tweak(&mut cfg);
    let deadline =
        cloud::wrappers::Deadline::new(set, Duration::from_millis(500), Duration::from_millis(500));
    let p = Pool::new(cfg, Arc::new(deadline), &prometheus::Registry::new()).unwrap();
    p.start();
    (p, types[0].clone())
}

/// A create whose call makes the VM and then never answers (or fails with a server error):
/// the deadline ends it, its place is kept so nothing creates a second VM, and the VM is
/// adopted when the cloud lists it. Judged by the stub cloud's own VM list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_unknown_outcome_adopts_its_vm_and_makes_no_second() {
    for knob in ["HangRateCreateAfterVm", "ErrorRateCreateAfterVm"] {
        let set = stub(json!({ knob: 1.0 }));
        let (p, it) = pool_with_deadlines(set.clone(), |_| {});
        assert!(p.create(&it).is_some());
        wait_for(
            &format!("{knob}: the VM in service"),
            Duration::from_secs(20),
            || {
                let v = p.instances();
                v.len() == 1 && !v[0].instance.is_empty() && v[0].worker_state == WorkerState::Idle
            },
        )
        .await;
        assert_eq!(set.vms().len(), 1, "{knob}: exactly one VM in the cloud");
        // No create slot is stuck: another create is possible at once.
        assert_eq!(p.create_budget(), Some(1), "{knob}");
        p.stop();
    }
}

/// A create the cloud never answers and that made no VM: the place is freed once a list that
/// started after the grace period does not show it; nothing leaks, nothing stays `creating`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_that_never_answers_and_made_nothing_frees_its_place() {
    let set = stub(json!({"HoldCloudOps": true}));
    let (p, it) = pool_with_deadlines(set.clone(), |cfg| {
        cfg.unknown_create_grace = Duration::from_millis(300);
    });
    assert!(p.create(&it).is_some());
    assert_eq!(p.instances().len(), 1);
    assert_eq!(p.create_budget(), Some(0), "the create is in flight");
    // The deadline ends the call; the place is kept a while, then freed.
    wait_for(
        "the unknown create's place freed",
        Duration::from_secs(20),
        || p.instances().is_empty(),
    )
    .await;
    assert!(set.vms().is_empty(), "no VM was made");
    assert_eq!(p.create_budget(), Some(1));
    p.stop();
}

/// Issue 19, capacity back-off (settings `Capacity.Backoff`): each capacity error in a row
/// for a type doubles its hold-off (with at most 25 % jitter), where Arvados holds a fixed
/// minute every time. Judged from the pool's own hold-off report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_errors_in_a_row_hold_a_type_off_for_longer_each_time() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), None);
    let set = stub(json!({"CapacityPerType": {"providertype1": 0}}));
    let p = pool(&c, set.clone(), &key, |cfg| cfg.capacity = backoff(true));
    wait_for("first cloud list", Duration::from_secs(5), || p.loaded()).await;
    let mut holds = Vec::new();
    for _ in 0..3 {
        wait_for("type no longer held off", Duration::from_secs(10), || {
            !p.at_capacity(&t1)
        })
        .await;
        assert!(p.create(&t1).is_some(), "the pool accepts the create");
        // Not `at_capacity`: with back-off the type also counts as at capacity while this
        // create (its probe launch) is in flight, before the error comes back.
        wait_for("capacity error recorded", Duration::from_secs(5), || {
            p.holdoffs()
                .iter()
                .any(|h| h.what.contains("providertype1") && h.until.is_some())
        })
        .await;
        let until = p
            .holdoffs()
            .into_iter()
            .find_map(|h| h.until.filter(|_| h.what.contains("providertype1")))
            .expect("a hold-off for the type");
        holds.push((until - chrono::Utc::now()).num_milliseconds() as f64 / 1000.0);
    }
    // 1 s, 2 s, 4 s, each up to 25 % more, less the moment it took to look.
    for (i, want) in [1.0, 2.0, 4.0].into_iter().enumerate() {
        assert!(
            holds[i] > want - 0.5 && holds[i] <= want * 1.25 + 0.01,
            "hold {i}: {holds:?}"
        );
    }
    assert!(set.vms().is_empty(), "no VM was made");
    p.stop();
}

/// Issue 19, launch budget (with `Capacity.Backoff`): once a type's hold-off after a capacity
/// error ends, the type is in doubt, and one create probes it. Until that create is answered
/// the type counts as at capacity, so a scheduling pass sends no burst of creates that would
/// all fail. Without back-off (Arvados), a second create goes out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_in_doubt_after_a_capacity_error_gets_one_probe_launch() {
    for on in [true, false] {
        let key = Arc::new(cloud::sshd::new_ed25519_key());
        let t1 = fixture_type(1);
        let c = cluster(std::slice::from_ref(&t1), None);
        let set = stub(json!({"HoldCloudOps": true, "CapacityPerType": {"providertype1": 0}}));
        let p = pool(&c, set.clone(), &key, |cfg| {
            cfg.sync_interval = Duration::from_secs(3600);
            cfg.max_concurrent_creates = 0;
            cfg.capacity_error_ttl = Duration::from_secs(1);
            cfg.capacity = backoff(on);
        });
        // The first create fails for capacity. (Only creates are held; one permit each.)
        assert!(p.create(&t1).is_some());
        set.release_cloud_ops(1);
        wait_for("capacity error recorded", Duration::from_secs(5), || {
            p.at_capacity(&t1)
        })
        .await;
        wait_for("hold-off over", Duration::from_secs(10), || {
            !p.at_capacity(&t1)
        })
        .await;
        // The probe launch: accepted, and held by the cloud (no permit left).
        assert!(p.create(&t1).is_some(), "backoff {on}: one create probes");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            p.instances().len(),
            1,
            "backoff {on}: the probe launch is still in flight"
        );
        assert_eq!(
            p.at_capacity(&t1),
            on,
            "backoff {on}: in doubt while the probe launch is in flight"
        );
        assert_eq!(
            p.create(&t1).is_none(),
            on,
            "backoff {on}: a second create waits for the probe's answer"
        );
        set.release_cloud_ops(10);
        p.stop();
    }
}

/// Issue 19, capacity in the metrics: after a capacity error the pool exports when the
/// offering's hold-off ends (Unix time) and its capacity errors in a row; once the hold-off
/// ends only the count stays (the offering is in doubt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_hold_offs_and_errors_in_a_row_are_in_the_metrics() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), None);
    let set = stub(json!({"CapacityPerType": {"providertype1": 0}}));
    let registry = prometheus::Registry::new();
    let p = pool_in(&registry, &c, set.clone(), &key, |cfg| {
        cfg.capacity_error_ttl = Duration::from_secs(1);
    });
    let gauge = |name: &str| -> Option<f64> {
        registry
            .gather()
            .into_iter()
            .find(|f| f.name() == name)?
            .get_metric()
            .iter()
            .find(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "offering" && l.value() == "providertype1")
            })
            .map(|m| m.get_gauge().get_value())
    };
    let before = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    assert!(p.create(&t1).is_some());
    wait_for("hold-off in the metrics", Duration::from_secs(5), || {
        gauge("arvados_dispatchcloud_capacity_holdoff_until_seconds").is_some()
    })
    .await;
    let until = gauge("arvados_dispatchcloud_capacity_holdoff_until_seconds").unwrap();
    assert!(
        until > before + 0.5 && until < before + 3.0,
        "ends about 1 s after the error: {until} vs {before}"
    );
    assert_eq!(
        gauge("arvados_dispatchcloud_capacity_errors_in_a_row"),
        Some(1.0)
    );
    wait_for("hold-off over", Duration::from_secs(10), || {
        gauge("arvados_dispatchcloud_capacity_holdoff_until_seconds").is_none()
    })
    .await;
    assert_eq!(
        gauge("arvados_dispatchcloud_capacity_errors_in_a_row"),
        Some(1.0),
        "still in doubt"
    );
    p.stop();
}

/// Issue 19, capacity state across restarts (settings `Capacity.StateFile`): a dispatcher
/// that restarts during a hold-off still holds the offering off (no create goes out), and its
/// next capacity error continues the back-off (2 s, not 1 s again). Without the file the new
/// pool knows nothing and launches at once, as Arvados does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_state_survives_a_restart_when_a_state_file_is_set() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), None);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("capacity.json");
    for keep in [true, false] {
        let _ = std::fs::remove_file(&file);
        let settings = || dispatchcloud::settings::CapacitySettings {
            backoff_base: Duration::from_secs(5),
            state_file: keep.then(|| file.clone()),
            ..backoff(true)
        };
        let set = stub(json!({"CapacityPerType": {"providertype1": 0}}));
        let first = pool(&c, set.clone(), &key, |cfg| cfg.capacity = settings());
        wait_for("first cloud list", Duration::from_secs(5), || {
            first.loaded()
        })
        .await;
        assert!(first.create(&t1).is_some());
        wait_for("capacity error recorded", Duration::from_secs(5), || {
            first.holdoffs().iter().any(|h| h.until.is_some())
        })
        .await;
        if keep {
            wait_for("the state file", Duration::from_secs(5), || {
                std::fs::read_to_string(&file).is_ok_and(|t| t.contains("providertype1"))
            })
            .await;
        }
        first.stop();
        assert!(first.join(Duration::from_secs(10)).await);

        // The next dispatcher, on the same cloud.
        let p = pool(&c, set.clone(), &key, |cfg| cfg.capacity = settings());
        if !keep {
            assert!(!p.at_capacity(&t1), "nothing kept without a state file");
            assert!(p.holdoffs().is_empty());
            p.stop();
            continue;
        }
        assert!(p.at_capacity(&t1), "the hold-off survived the restart");
        assert!(p.create(&t1).is_none());
        let h = p.holdoffs();
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[0].offering.as_deref(), Some("providertype1"));
        assert_eq!(h[0].errors_in_a_row, 1);
        assert!(h[0].error.contains("no capacity"), "{h:?}");
        let left = (h[0].until.unwrap() - chrono::Utc::now()).num_milliseconds();
        assert!(left > 1000 && left <= 6250, "{left} ms left");
        // When it ends, the probe launch fails again: the second error in a row (10 s).
        wait_for(
            "the restored hold-off to end",
            Duration::from_secs(10),
            || !p.at_capacity(&t1),
        )
        .await;
        assert!(p.create(&t1).is_some());
        wait_for("second capacity error", Duration::from_secs(5), || {
            p.holdoffs().iter().any(|h| h.errors_in_a_row == 2)
        })
        .await;
        let until = p.holdoffs()[0].until.unwrap();
        let hold = (until - chrono::Utc::now()).num_milliseconds();
        assert!(hold > 9000 && hold <= 12_500, "second hold {hold} ms");
        p.stop();
        assert!(set.vms().is_empty(), "no VM was made");
    }
}

/// A state file that cannot be read is reported and ignored: the pool starts and creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_capacity_state_file_is_reported_and_ignored() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), None);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("capacity.json");
    std::fs::write(
        &file,
        r#"{"version": 1, "offerings": {"providertype1": 7}}"#,
    )
    .unwrap();
    let p = pool(&c, stub(json!({})), &key, |cfg| {
        cfg.capacity = dispatchcloud::settings::CapacitySettings {
            state_file: Some(file.clone()),
            ..backoff(true)
        }
    });
    let errors: Vec<String> = p
        .events
        .all()
        .into_iter()
        .filter(|e| e.is_error())
        .map(|e| e.detail)
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("offerings.providertype1"), "{errors:?}");
    assert!(!p.at_capacity(&t1));
    assert!(p.create(&t1).is_some());
    wait_for("the VM", Duration::from_secs(10), || {
        p.worker_ids().len() == 1
    })
    .await;
    p.stop();
}

/// Issue 19, adaptive idle time (settings `IdleTime.Adaptive`, here `Min` 1 s): an idle
/// instance whose type no waiting container could use, with no recent demand, is shut down
/// after `Min`, long before `TimeoutIdle` (10 minutes in these tests); one whose type a
/// waiting container could use is kept until that changes. With the setting off (Arvados)
/// both wait for `TimeoutIdle`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_idle_time_keeps_wanted_instances_and_shuts_down_the_rest_early() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let (t1, t2) = (fixture_type(1), fixture_type(2));
    let c = cluster(&[t1.clone(), t2.clone()], None);
    let provider_types = |set: &StubSet| -> Vec<String> {
        let mut v: Vec<String> = set
            .vms()
            .iter()
            .map(|vm| cloud::Instance::provider_type(vm.as_ref()))
            .collect();
        v.sort();
        v
    };
    for adaptive in [false, true] {
        let set = stub(json!({}));
        let p = pool(&c, set.clone(), &key, |cfg| {
            // Both creates at once (Arvados' default allows one in flight).
            cfg.max_concurrent_creates = 0;
            cfg.idle_time = dispatchcloud::settings::IdleTimeSettings {
                adaptive,
                min: Duration::from_secs(1),
                max: Duration::from_secs(60),
            }
        });
        wait_for("first cloud list", Duration::from_secs(5), || p.loaded()).await;
        p.set_wanted_types([t2.name.clone()].into());
        assert!(p.create(&t1).is_some() && p.create(&t2).is_some());
        wait_for("both instances idle", Duration::from_secs(20), || {
            let v = p.instances();
            v.len() == 2 && v.iter().all(|i| i.worker_state == WorkerState::Idle)
        })
        .await;
        if adaptive {
            wait_for(
                "the unwanted instance to shut down",
                Duration::from_secs(20),
                || provider_types(&set) == ["providertype2"],
            )
            .await;
        }
        // Well past `Min`: the wanted one (and, off, both) still there.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let want: &[&str] = if adaptive {
            &["providertype2"]
        } else {
            &["providertype1", "providertype2"]
        };
        assert_eq!(provider_types(&set), want, "adaptive {adaptive}");
        if adaptive {
            p.set_wanted_types(Default::default());
            wait_for(
                "the no longer wanted instance to shut down",
                Duration::from_secs(20),
                || set.vms().is_empty(),
            )
            .await;
        }
        p.stop();
    }
}

/// Issue 19, capacity per zone (with `Capacity.Backoff` and a cloud of several zones): each
/// create is pinned to one zone, a capacity error holds off only that zone for that offering,
/// and an offering's next create goes to the zone that last worked for it. Without back-off
/// the driver fails over as Arvados' EC2 driver does, from the one zone that last worked for
/// any type, so two types short in different zones keep failing where the other succeeded.
/// The stub cloud's launch log is the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_kept_per_zone_and_each_offering_returns_to_its_good_zone() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let (t1, t2) = (fixture_type(1), fixture_type(2));
    let c = cluster(&[t1.clone(), t2.clone()], None);
    let mut failed = Vec::new();
    for on in [false, true] {
        let set = stub(json!({
            "Zones": ["a", "b", "c"],
            "ShortOfCapacityUntil": {
                "providertype1@a": "1h", "providertype1@b": "1h", "providertype2@c": "1h",
            },
        }));
        let p = pool(&c, set.clone(), &key, |cfg| cfg.capacity = backoff(on));
        wait_for("first cloud list", Duration::from_secs(5), || p.loaded()).await;
        for (i, t) in [&t1, &t2, &t1, &t2, &t1, &t2].into_iter().enumerate() {
            if i == 4 {
                // Past the zones' hold-offs: they are in doubt, but each offering still goes
                // to the zone that worked for it, not back to a probe of a short one.
                wait_for("zone hold-offs over", Duration::from_secs(10), || {
                    p.holdoffs().iter().all(|h| h.until.is_none())
                })
                .await;
            }
            let made = set.vms().len();
            while set.vms().len() == made {
                wait_for("a zone to try", Duration::from_secs(10), || {
                    !p.at_capacity(t)
                })
                .await;
                assert!(p.create(t).is_some(), "backoff {on}: create accepted");
                wait_for("the create answered", Duration::from_secs(10), || {
                    p.instances().len() == set.vms().len()
                })
                .await;
            }
        }
        let log = set.launch_log();
        let zones_made = |ty: &str| -> Vec<String> {
            log.iter()
                .filter(|l| l.provider_type == ty && l.failed.is_none())
                .map(|l| l.zone.clone())
                .collect()
        };
        assert_eq!(zones_made("providertype1"), ["c", "c", "c"], "backoff {on}");
        assert_eq!(zones_made("providertype2"), ["a", "a", "a"], "backoff {on}");
        failed.push(log.iter().filter(|l| l.failed.is_some()).count());
        if on {
            let in_doubt: Vec<String> = p
                .holdoffs()
                .into_iter()
                .filter_map(|h| h.offering)
                .collect();
            assert_eq!(
                in_doubt,
                ["providertype1@a", "providertype1@b"],
                "only the zones that failed are in doubt, each for its type"
            );
            assert!(!p.at_capacity(&t1) && !p.at_capacity(&t2));
        }
        p.stop();
    }
    // Off: t1 fails in a and b each time (the shared index is back at a after t2), t2 in c.
    // On: each zone that is short fails once, and is not probed while another zone works.
    assert_eq!(
        failed,
        [2 + 1 + 2 + 1 + 2 + 1, 2],
        "failed launches, off and on"
    );
}

/// Issue 19, interruption notices from the cloud itself (the stub announces each VM's end
/// 29 s before taking it back at 30 s): with `Interruptions.Drain` the pool has the set watch,
/// drains the noticed instance although no container says so, and, idle, it is shut down at
/// once, with no pre-booted replacement (nothing ran on it to retry); the stub cloud's VM
/// list (the VM gone long before the cloud would take it) is the oracle. Off (Arvados) the
/// instance stays, in `run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_the_cloud_announces_it_will_take_back_is_drained() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), None);
    for (drain, pre_boot) in [(false, false), (true, false), (true, true)] {
        let set = stub(json!({"VanishAfter": "30s", "InterruptionNotice": "29s"}));
        let p = pool(&c, set.clone(), &key, |cfg| {
            cfg.interruptions.drain = drain;
            cfg.interruptions.pre_boot = pre_boot;
        });
        wait_for("first cloud list", Duration::from_secs(5), || p.loaded()).await;
        assert!(p.create(&t1).is_some());
        wait_for("the VM", Duration::from_secs(10), || set.vms().len() == 1).await;
        let vm = cloud::Instance::id(set.vms()[0].as_ref());
        if drain {
            wait_for("the noticed VM destroyed", Duration::from_secs(10), || {
                set.vms().is_empty()
            })
            .await;
            assert!(
                p.events.all().iter().any(|e| e.kind == "drain"
                    && e.subject == vm
                    && e.detail.contains("the cloud's notice")),
                "{:?}",
                p.events.all()
            );
            // It ran nothing: no container to retry, so `PreBoot` makes no replacement
            // (which, noticed in its turn, would make another, and so on).
            assert_eq!(set.vm_history().len(), 1, "pre-boot {pre_boot}");
        } else {
            wait_for("the instance idle", Duration::from_secs(10), || {
                states(&p) == [(t1.name.clone(), WorkerState::Idle, IdleBehavior::Run)]
            })
            .await;
            // The notice is a second after create; the cloud takes the VM at 30 s.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(set.vms().len(), 1);
            assert_eq!(
                states(&p),
                [(t1.name.clone(), WorkerState::Idle, IdleBehavior::Run)]
            );
        }
        p.stop();
    }
}

/// Issue 19, capacity per zone across markets: once on-demand providertype1 has met capacity
/// errors in zones a and b, a first spot create of the same provider type goes to zone c,
/// which has no trouble, instead of finding a and b short again (spot draws on the same
/// hardware). The stub cloud's launch log is the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_other_market_of_a_type_tries_its_troubled_zones_last() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let ondemand = fixture_type(1);
    let spot = InstanceType {
        name: format!("{}.spot", ondemand.name),
        preemptible: true,
        ..ondemand.clone()
    };
    let c = cluster(&[ondemand.clone(), spot.clone()], None);
    let set = stub(json!({
        "Zones": ["a", "b", "c"],
        "ShortOfCapacityUntil": {"providertype1@a": "1h", "providertype1@b": "1h"},
    }));
    let p = pool(&c, set.clone(), &key, |cfg| cfg.capacity = backoff(true));
    wait_for("first cloud list", Duration::from_secs(5), || p.loaded()).await;
    for t in [&ondemand, &spot] {
        let made = set.vms().len();
        while set.vms().len() == made {
            wait_for("a zone to try", Duration::from_secs(10), || {
                !p.at_capacity(t)
            })
            .await;
            assert!(p.create(t).is_some());
            wait_for("the create answered", Duration::from_secs(10), || {
                p.instances().len() == set.vms().len()
            })
            .await;
        }
    }
    let launches: Vec<(bool, String, bool)> = set
        .launch_log()
        .into_iter()
        .map(|l| (l.preemptible, l.zone, l.failed.is_none()))
        .collect();
    let l = |spot: bool, z: &str, ok: bool| (spot, z.to_string(), ok);
    assert_eq!(
        launches,
        [
            l(false, "a", false),
            l(false, "b", false),
            l(false, "c", true),
            l(true, "c", true),
        ]
    );
    p.stop();
}

/// Issue 19: a standby's read-only pool (passive) acts on no interruption notice from the
/// cloud: it neither drains the noticed instance nor pre-boots a replacement. The stub
/// cloud's VM history is the oracle for creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_pool_acts_on_no_interruption_notice() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let t1 = fixture_type(1);
    let c = cluster(std::slice::from_ref(&t1), None);
    let set = stub(json!({"VanishAfter": "30s", "InterruptionNotice": "30s"}));
    // The active dispatcher made one VM, then went away.
    let first = pool(&c, set.clone(), &key, |_| {});
    wait_for("first cloud list", Duration::from_secs(5), || {
        first.loaded()
    })
    .await;
    assert!(first.create(&t1).is_some());
    wait_for("the VM", Duration::from_secs(10), || set.vms().len() == 1).await;
    first.stop();
    assert!(first.join(Duration::from_secs(10)).await);
    // The standby, with Drain and PreBoot, sees it (noticed from the start).
    let cfg = {
        let mut cfg = PoolConfig::from_cluster(&c, "zzzzz-test-pool", key.clone());
        cfg.interruptions.drain = true;
        cfg.interruptions.pre_boot = true;
        cfg
    };
    let standby = Pool::new(cfg, set.clone(), &prometheus::Registry::new()).unwrap();
    standby.set_passive(true);
    for _ in 0..3 {
        standby.sync().await.unwrap();
    }
    let vm = cloud::Instance::id(set.vms()[0].as_ref());
    assert!(
        cloud::Instance::interruption_notice(set.vms()[0].as_ref()).is_some(),
        "the set watches and the VM is noticed"
    );
    assert_eq!(
        standby.worker(&vm).map(|w| w.idle_behavior),
        Some(IdleBehavior::Run)
    );
    assert_eq!(set.vm_history().len(), 1, "no replacement from a standby");
    standby.stop();
}
