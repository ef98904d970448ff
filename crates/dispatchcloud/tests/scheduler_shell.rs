//! The scheduler's async shell against the fake Arvados API (over HTTP) and the stub pool:
//! the run loop locks, creates and starts; sync cancels and forgets through the API;
//! fixStaleLocks waits for adopted workers; metrics are registered under Arvados' names.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arvados::types::ContainerState;
use common::*;
use dispatchcloud::scheduler::stub::StubPool;
use dispatchcloud::scheduler::{SchedConfig, Scheduler, ShellConfig};
use dispatchcloud::worker_state::WorkerState;
use serde_json::json;
use testkit::fake_api::{ContainerSpec, FakeArvados};

fn shell(stale: Duration) -> ShellConfig {
    ShellConfig {
        poll_interval: Duration::from_millis(100),
        stale_lock_timeout: stale,
        adopted_report_timeout: Duration::from_secs(600),
    }
}

fn setup(
    f: &FakeArvados,
    pool: Arc<StubPool>,
    stale: Duration,
) -> (
    Arc<Scheduler<StubPool>>,
    Arc<dispatchcloud::queue::ContainerQueue>,
    prometheus::Registry,
) {
    let c = cluster(vec![instance_type("big", 4, 16 * GIB, 100 * GIB, 0.4)]);
    let (q, registry) = queue(f, &c);
    let s = Scheduler::new(
        q.clone(),
        pool,
        SchedConfig::from_cluster(&c),
        shell(stale),
        &registry,
    )
    .unwrap();
    (s, q, registry)
}

fn state(f: &FakeArvados, uuid: &str) -> String {
    f.container(uuid).unwrap()["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn run_loop_locks_creates_and_starts() {
    let f = fake().await;
    let uuids: Vec<String> = (0..3)
        .map(|i| {
            f.add_container(&ContainerSpec {
                priority: 10 + i,
                ..Default::default()
            })
        })
        .collect();
    let pool = Arc::new(StubPool::new(10, 10));
    let (s, _q, registry) = setup(&f, pool.clone(), Duration::from_secs(1));
    let stopped = tokio_util::sync::CancellationToken::new();
    let stop = stopped.clone();
    let task = tokio::spawn(s.clone().run(stopped));

    assert!(
        eventually(10, || uuids.iter().all(|u| state(&f, u) == "Locked")).await,
        "all locked"
    );
    for u in &uuids {
        assert_eq!(
            f.container(u).unwrap()["locked_by_uuid"],
            f.root_token_uuid()
        );
    }
    // The three pack onto one 4-VCPU instance.
    assert!(
        eventually(10, || pool.creates() == ["big"]).await,
        "{:?}",
        pool.creates()
    );
    assert!(
        eventually(5, || s.queue_view().sorted().iter().all(|(_, st)| {
            st.to_string() == "Waiting for a big instance to boot and be ready to accept work."
        }))
        .await
    );
    let id = pool.worker_ids()[0].clone();
    pool.set_state(&id, WorkerState::Idle);
    assert!(eventually(10, || pool.starts().len() == 3).await);
    let mut started = pool.running_on(&id);
    started.sort();
    let mut want = uuids.clone();
    want.sort();
    assert_eq!(started, want);
    // Highest priority first.
    assert_eq!(pool.starts()[0], uuids[2]);
    assert!(
        eventually(5, || {
            s.queue_view().sorted().iter().all(|(_, st)| {
                st.to_string() == "Container is allocated to an instance and preparing to run."
            })
        })
        .await
    );

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    for name in [
        "arvados_dispatchcloud_containers_allocated_not_started",
        "arvados_dispatchcloud_containers_not_allocated_over_quota",
        "arvados_dispatchcloud_containers_longest_wait_time_seconds",
        "arvados_dispatchcloud_last_503_time",
        "arvados_dispatchcloud_max_concurrent_containers 64",
        "arvados_dispatchcloud_at_quota 0",
        "arvados_dispatchcloud_queue_entries",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("run stops on shutdown")
        .unwrap();
}

/// A container locked by the test's token and set Running through the API.
async fn running_container(f: &FakeArvados) -> String {
    let u = f.add_container(&ContainerSpec::default());
    let api = client(f);
    api.lock_container(&u).await.unwrap();
    api.update_container(&u, &json!({"state": "Running"}), None)
        .await
        .unwrap();
    u
}

/// AC-SYNC-2 through the API: a Running container that no worker reports is cancelled only
/// once no worker is in state unknown, then dropped from the queue.
#[tokio::test]
async fn ac_sync_2_cancel_orphaned_container_through_the_api() {
    let f = fake().await;
    let u = running_container(&f).await;
    f.set_priority(&u, 0);
    let pool = Arc::new(StubPool::new(10, 10));
    let unknown = pool.add_worker(
        &Arc::new(instance_type("big", 4, 16 * GIB, 100 * GIB, 0.4)),
        WorkerState::Unknown,
    );
    let (s, q, _) = setup(&f, pool.clone(), Duration::from_secs(1));
    q.update().await.unwrap();
    assert_eq!(
        q.get(&u).unwrap().container().state,
        ContainerState::Running
    );
    for _ in 0..10 {
        s.sync();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        state(&f, &u),
        "Running",
        "not cancelled while a worker is unknown"
    );
    pool.remove_worker(&unknown);
    s.sync();
    assert!(eventually(2, || state(&f, &u) == "Cancelled").await);
    assert!(
        eventually(2, || {
            s.sync();
            q.entries().0.is_empty()
        })
        .await,
        "forgotten after the cancel"
    );
}

/// Sync's cancels ask the API first: a container the queue's cache still has as Running, but
/// which completed since (a poll missed the change), is not cancelled (Arvados would, and
/// the API allows Complete → Cancelled); the cache takes the API's state and forgets it.
#[tokio::test]
async fn sync_does_not_cancel_a_container_that_completed_since_the_cache_saw_it() {
    let f = fake().await;
    let u = running_container(&f).await;
    let pool = Arc::new(StubPool::new(10, 10));
    let (s, q, _) = setup(&f, pool, Duration::from_secs(1));
    q.update().await.unwrap();
    assert_eq!(
        q.get(&u).unwrap().container().state,
        ContainerState::Running
    );
    // It completes; the cache has not seen it. No worker runs it: sync would cancel it.
    f.force_update(&u, json!({"state": "Complete", "exit_code": 0}));
    s.sync();
    assert!(
        eventually(2, || {
            s.sync();
            q.get(&u).is_none()
        })
        .await,
        "the cache took the API's Complete and forgot the container"
    );
    assert_eq!(state(&f, &u), "Complete", "not cancelled");
}

/// A container locked by a previous dispatcher process, not running anywhere, is requeued
/// once the adopted (unknown) worker has reported.
#[tokio::test]
async fn fix_stale_locks_waits_for_unknown_workers() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    client(&f).lock_container(&u).await.unwrap();
    let pool = Arc::new(StubPool::new(10, 10));
    let w = pool.add_worker(
        &Arc::new(instance_type("big", 4, 16 * GIB, 100 * GIB, 0.4)),
        WorkerState::Unknown,
    );
    let (s, q, _) = setup(&f, pool.clone(), Duration::from_secs(30));
    q.update().await.unwrap();
    let fixer = tokio::spawn({
        let s = s.clone();
        async move { s.fix_stale_locks().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(state(&f, &u), "Locked", "waits while a worker is unknown");
    assert!(!fixer.is_finished());
    pool.set_state(&w, WorkerState::Idle);
    tokio::time::timeout(Duration::from_secs(5), fixer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state(&f, &u), "Queued");
}

#[tokio::test]
async fn fix_stale_locks_gives_up_waiting_after_the_timeout() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    client(&f).lock_container(&u).await.unwrap();
    let pool = Arc::new(StubPool::new(10, 10));
    pool.add_worker(
        &Arc::new(instance_type("big", 4, 16 * GIB, 100 * GIB, 0.4)),
        WorkerState::Unknown,
    );
    let (s, q, _) = setup(&f, pool, Duration::from_millis(300));
    q.update().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), s.fix_stale_locks())
        .await
        .unwrap();
    assert_eq!(state(&f, &u), "Queued");
}

/// With no unknown workers at startup nothing is unlocked: the lock is ours and the
/// container is simply scheduled.
#[tokio::test]
async fn fix_stale_locks_leaves_locks_alone_without_unknown_workers() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    client(&f).lock_container(&u).await.unwrap();
    let pool = Arc::new(StubPool::new(10, 10));
    let (s, q, _) = setup(&f, pool, Duration::from_secs(30));
    q.update().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), s.fix_stale_locks())
        .await
        .unwrap();
    assert_eq!(state(&f, &u), "Locked");
}

/// Over quota with no instances at all, the head container is unlocked (spec §7.3 step 11),
/// through the API.
#[tokio::test]
async fn over_quota_unlocks_through_the_api() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    client(&f).lock_container(&u).await.unwrap();
    let pool = Arc::new(StubPool::new(0, 10));
    let (s, q, _) = setup(&f, pool.clone(), Duration::from_secs(1));
    q.update().await.unwrap();
    let plan = s.run_queue().await;
    assert_eq!(plan.unlocks, vec![u.clone()]);
    assert_eq!(state(&f, &u), "Queued");
    assert!(pool.creates().is_empty());
}
