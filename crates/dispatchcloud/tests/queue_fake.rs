//! The container queue against the fake Arvados API over HTTP: spec AC-Q-1…3 and the poll
//! algorithm's details (spec §5.3).

mod common;

use std::time::Duration;

use arvados::types::ContainerState;
use chrono::Utc;
use common::*;
use serde_json::json;
use testkit::fake_api::{ContainerSpec, Fault, FaultKind};

fn test_type() -> arvados::InstanceType {
    instance_type("testType", 8, 16 * GIB, 300 * GIB, 0.1)
}

fn err_text(e: arvados::ApiError) -> String {
    e.errors().join("; ")
}

#[tokio::test]
async fn ac_q_1_update_lock_unlock_cancel() {
    let f = fake().await;
    let uuids: Vec<String> = (0..3)
        .map(|_| f.add_container(&ContainerSpec::default()))
        .collect();
    let (q, _) = queue(&f, &cluster(vec![test_type()]));
    q.update().await.unwrap();

    let (entries, threshold) = q.entries();
    assert_eq!(entries.len(), 3);
    let threshold = threshold.expect("updated");
    assert!(threshold <= Utc::now());
    assert!(Utc::now() - threshold < chrono::Duration::minutes(1));
    for e in &entries {
        assert!(uuids.contains(&e.container().uuid));
        assert_eq!(e.container().state, ContainerState::Queued);
        assert!(e.container().priority > 0);
        let names: Vec<&str> = e.instance_types.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["testType"]);
        assert!(e.container().mounts.is_empty());
    }

    for u in &uuids {
        assert_eq!(q.get(u).unwrap().container().uuid, *u);
        let e = q.unlock(u).await.unwrap_err();
        assert!(err_text(e).contains("cannot unlock when Queued"));
        q.lock(u).await.unwrap();
        assert_eq!(q.get(u).unwrap().container().state, ContainerState::Locked);
        assert_eq!(
            q.get(u).unwrap().container().locked_by_uuid,
            f.root_token_uuid()
        );
        assert!(q.lock(u).await.is_err(), "second lock fails");
        q.unlock(u).await.unwrap();
        assert_eq!(q.get(u).unwrap().container().state, ContainerState::Queued);
        assert!(q.unlock(u).await.is_err(), "second unlock fails");
        q.cancel(u).await.unwrap();
        assert_eq!(
            q.get(u).unwrap().container().state,
            ContainerState::Cancelled
        );
        let e = q.lock(u).await.unwrap_err();
        assert!(err_text(e).contains("cannot lock when Cancelled"));
    }
}

#[tokio::test]
async fn ac_q_2_unsatisfiable_container_is_cancelled_with_reason() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let tiny = instance_type("testType", 8, 16 * GIB, 1 << 20, 0.1);
    let (q, _) = queue(&f, &cluster(vec![tiny]));
    q.update().await.unwrap();
    assert!(q.get(&u).is_none(), "never appears in the queue");
    let cancelled = eventually(1, || {
        f.container(&u).is_some_and(|c| c["state"] == "Cancelled")
    })
    .await;
    assert!(cancelled, "{:?}", f.container(&u));
    let c = f.container(&u).unwrap();
    assert_eq!(
        c["runtime_status"]["error"],
        "constraints not satisfiable by any configured instance type"
    );
    q.update().await.unwrap();
    assert!(q.get(&u).is_none());
}

#[tokio::test]
async fn ac_q_3_malformed_mounts_cancel_the_container() {
    let f = fake().await;
    let mut fields = ContainerSpec::default().to_fields();
    fields.insert("mounts".into(), json!({"stdin": ["bork"]}));
    let u = f.add_container_fields(serde_json::Value::Object(fields));
    let (q, _) = queue(&f, &cluster(vec![test_type()]));
    q.update().await.unwrap();
    assert!(q.get(&u).is_none());
    let cancelled = eventually(1, || {
        f.container(&u).is_some_and(|c| c["state"] == "Cancelled")
    })
    .await;
    assert!(cancelled, "{:?}", f.container(&u));
    let msg = f.container(&u).unwrap()["runtime_status"]["error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.starts_with("error getting mounts from container record: json: cannot unmarshal "),
        "{msg}"
    );
}

#[tokio::test]
async fn no_instance_types_gives_the_site_configuration_reason() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let (q, _) = queue(&f, &cluster(vec![]));
    q.update().await.unwrap();
    assert!(
        eventually(1, || f
            .container(&u)
            .is_some_and(|c| c["state"] == "Cancelled"))
        .await
    );
    assert_eq!(
        f.container(&u).unwrap()["runtime_status"]["error"],
        "site configuration does not list any instance types"
    );
}

/// A container someone else locked stays cached (fetched by uuid as "missing") with its new
/// state; a priority-0 Queued one is followed the same way; a failed poll changes nothing.
#[tokio::test]
async fn missing_containers_are_followed_by_uuid_and_errors_keep_the_cache() {
    let f = fake().await;
    let a = f.add_container(&ContainerSpec::default());
    let b = f.add_container(&ContainerSpec::default());
    let (q, _) = queue(&f, &cluster(vec![test_type()]));
    q.update().await.unwrap();
    assert_eq!(q.entries().0.len(), 2);

    // Another dispatcher locks a; b's priority drops to 0.
    let other = client_with(&f, &f.add_token(true));
    other.lock_container(&a).await.unwrap();
    f.set_priority(&b, 0);
    q.update().await.unwrap();
    assert_eq!(q.get(&a).unwrap().container().state, ContainerState::Locked);
    assert_ne!(
        q.get(&a).unwrap().container().locked_by_uuid,
        f.root_token_uuid()
    );
    assert_eq!(q.get(&b).unwrap().container().priority, 0);
    let by_uuid = f
        .requests()
        .iter()
        .filter(|r| {
            r.path.ends_with("/containers")
                && r.params
                    .get("filters")
                    .is_some_and(|f| f.to_string().contains("\"in\""))
        })
        .count();
    assert!(by_uuid >= 1, "missing containers fetched by uuid");

    // A failing poll leaves the cache as it was.
    f.inject_fault(
        Fault::new(FaultKind::Unavailable)
            .on("GET", "/containers")
            .times(1),
    );
    let before: Vec<_> = {
        let mut v: Vec<_> = q
            .entries()
            .0
            .iter()
            .map(|e| e.container().clone())
            .collect();
        v.sort_by(|x, y| x.uuid.cmp(&y.uuid));
        v
    };
    assert!(q.update().await.is_err());
    let mut after: Vec<_> = q
        .entries()
        .0
        .iter()
        .map(|e| e.container().clone())
        .collect();
    after.sort_by(|x, y| x.uuid.cmp(&y.uuid));
    assert_eq!(before, after);
    assert!(q.client().last_503().is_some());
}

/// Forget drops only finished or on-hold entries.
#[tokio::test]
async fn forget_only_drops_finished_or_on_hold_entries() {
    let f = fake().await;
    let a = f.add_container(&ContainerSpec::default());
    let b = f.add_container(&ContainerSpec::default());
    let (q, _) = queue(&f, &cluster(vec![test_type()]));
    q.update().await.unwrap();
    q.forget(&a);
    assert!(
        q.get(&a).is_some(),
        "a Queued container with priority is kept"
    );
    q.cancel(&a).await.unwrap();
    q.forget(&a);
    assert!(q.get(&a).is_none());
    f.set_priority(&b, 0);
    q.update().await.unwrap();
    q.forget(&b);
    assert!(q.get(&b).is_none());
}

/// The Queued poll pages by offset and stops once 100 non-supervisor containers arrived.
#[tokio::test]
async fn queued_poll_stops_after_the_target() {
    let f = fake().await;
    for _ in 0..120 {
        f.add_container(&ContainerSpec::default());
    }
    let (q, registry) = queue(&f, &cluster(vec![test_type()]));
    q.update().await.unwrap();
    assert_eq!(q.entries().0.len(), 120);
    let queued_pages = f
        .requests()
        .iter()
        .filter(|r| {
            r.path.ends_with("/containers")
                && r.params.get("order").is_some_and(|o| o == "priority desc")
        })
        .count();
    assert_eq!(queued_pages, 1, "one page of 120 ≥ 100: no further page");
    q.update_metrics();
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains(
            "arvados_dispatchcloud_queue_entries{instance_type=\"testType\",state=\"Queued\"} 120"
        ),
        "{text}"
    );
}

fn client_with(f: &testkit::fake_api::FakeArvados, token: &str) -> arvados::Client {
    arvados::Client::new(arvados::ClientConfig {
        base_url: url::Url::parse(f.base_url()).unwrap(),
        token: token.to_string(),
        insecure: false,
        timeout: Some(Duration::from_secs(30)),
        retry: Default::default(),
    })
    .unwrap()
}

/// A lock that completes while a poll is in flight wins over the poll's older view of the
/// container (spec §5.3 "dontupdate").
#[tokio::test]
async fn lock_during_poll_is_not_undone_by_the_poll() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let (q, _) = queue(&f, &cluster(vec![test_type()]));
    q.update().await.unwrap();
    // A new container whose mounts fetch is slow keeps the next poll open after it listed u.
    let v = f.add_container(&ContainerSpec::default());
    f.inject_fault(
        Fault::new(FaultKind::Delay(Duration::from_millis(500)))
            .on("GET", &format!("/containers/{v}")),
    );
    let poll = tokio::spawn({
        let q = q.clone();
        async move { q.update().await }
    });
    assert!(
        eventually(5, || f
            .requests()
            .iter()
            .any(|r| r.path.ends_with(&format!("/containers/{v}"))))
        .await
    );
    q.lock(&u).await.unwrap();
    poll.await.unwrap().unwrap();
    assert_eq!(q.get(&u).unwrap().container().state, ContainerState::Locked);
    assert!(q.get(&v).is_some());
    // The next poll brings the lock holder's view anyway.
    q.update().await.unwrap();
    assert_eq!(q.get(&u).unwrap().container().state, ContainerState::Locked);
}

// ---- Incremental polling (settings file `Queue.Incremental`)

/// Incremental polling with no overlap window: these tests poll many times a second, where
/// the default 5 s window would make every poll fetch everything.
fn incremental(full_poll_every: u32) -> dispatchcloud::settings::QueueSettings {
    dispatchcloud::settings::QueueSettings {
        incremental: true,
        full_poll_every,
        overlap: Duration::ZERO,
        ..Default::default()
    }
}

/// uuid → (state, priority) of every entry: what a scheduling pass decides from.
fn view(
    q: &dispatchcloud::queue::ContainerQueue,
) -> std::collections::BTreeMap<String, (String, i64)> {
    q.entries()
        .0
        .iter()
        .map(|e| {
            let c = e.container();
            (c.uuid.clone(), (c.state.as_str().to_string(), c.priority))
        })
        .collect()
}

/// One scheduling pass over the queue's entries with an empty pool: what it locks and what
/// it creates instances for.
fn decide(
    cl: &arvados::Cluster,
    q: &dispatchcloud::queue::ContainerQueue,
) -> (Vec<String>, Vec<String>) {
    use dispatchcloud::scheduler::{Limits, PoolSnapshot, SchedConfig, plan_queue};
    let cfg = SchedConfig::from_cluster(cl);
    let mut limits = Limits::new(&cfg);
    let (entries, _) = q.entries();
    let plan = plan_queue(
        &cfg,
        &mut limits,
        &entries,
        &PoolSnapshot::default(),
        None,
        std::time::SystemTime::now(),
    );
    let mut locks = plan.locks.clone();
    locks.sort();
    let mut creates: Vec<String> = plan.creates.iter().map(|(_, u)| u.clone()).collect();
    creates.sort();
    (locks, creates)
}

fn counter(registry: &prometheus::Registry, name: &str, kind: &str) -> u64 {
    registry
        .gather()
        .iter()
        .find(|m| m.name() == name)
        .and_then(|m| {
            m.get_metric()
                .iter()
                .find(|x| x.get_label().iter().any(|l| l.value() == kind))
                .map(|x| x.get_counter().get_value() as u64)
        })
        .unwrap_or(0)
}

/// The same API, polled fully by one queue and incrementally by another, through locks,
/// priority changes, new and finished containers: both queues hold the same entries after
/// every round, so every scheduling pass decides the same; the incremental one fetches far
/// fewer records.
#[tokio::test]
async fn incremental_polls_see_the_same_queue_as_full_polls_for_fewer_rows() {
    let f = fake().await;
    let cl = cluster(vec![test_type()]);
    let mut uuids: Vec<String> = (0..60)
        .map(|i| {
            f.add_container(&ContainerSpec {
                priority: 1 + i % 7,
                ..Default::default()
            })
        })
        .collect();
    let (full, full_reg) = queue(&f, &cl);
    let (inc, inc_reg) = queue(&f, &cl);
    inc.set_incremental(incremental(1000));
    full.update().await.unwrap();
    inc.update().await.unwrap();
    assert_eq!(view(&full), view(&inc));
    for round in 0..12usize {
        // Changes through the API as a dispatcher and crunch-run would make them.
        let u = uuids[round].clone();
        full.lock(&u).await.unwrap();
        f.force_update(
            &u,
            json!({"state": "Running", "modified_at": testkit::fake_api::format_time(Utc::now())}),
        );
        if round >= 2 {
            let done = uuids[round - 2].clone();
            f.force_update(
                &done,
                json!({"state": "Complete", "modified_at": testkit::fake_api::format_time(Utc::now())}),
            );
        }
        f.set_priority(&uuids[30 + round], 0);
        uuids.push(f.add_container(&ContainerSpec::default()));
        // Both queues see it after their next poll (mine = the lock holder's, the same token).
        full.update().await.unwrap();
        inc.update().await.unwrap();
        // The queue drops finished and priority-0 containers once the scheduler forgets them.
        for (uuid, (state, prio)) in view(&full) {
            if state == "Complete" || (state == "Queued" && prio == 0) {
                full.forget(&uuid);
                inc.forget(&uuid);
            }
        }
        assert_eq!(view(&full), view(&inc), "round {round}");
        assert_eq!(decide(&cl, &full), decide(&cl, &inc), "round {round}");
    }
    let full_rows = counter(
        &full_reg,
        "arvados_dispatchcloud_queue_rows_fetched_total",
        "full",
    );
    let inc_rows = counter(
        &inc_reg,
        "arvados_dispatchcloud_queue_rows_fetched_total",
        "incremental",
    ) + counter(
        &inc_reg,
        "arvados_dispatchcloud_queue_rows_fetched_total",
        "full",
    );
    assert_eq!(
        counter(
            &inc_reg,
            "arvados_dispatchcloud_queue_polls_total",
            "incremental"
        ),
        12
    );
    eprintln!("records fetched in 13 polls: full {full_rows}, incremental {inc_rows}");
    assert!(
        inc_rows * 3 < full_rows,
        "incremental fetched {inc_rows} records, full {full_rows}"
    );
}

/// A change the incremental poll cannot see (its `modified_at` is not moved, as when a
/// transaction commits after the overlap window) is repaired by the periodic full poll.
#[tokio::test]
async fn the_periodic_full_poll_repairs_a_missed_update() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec {
        priority: 5,
        ..Default::default()
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    // A later change: the incremental polls start from its time, after `u`'s.
    f.add_container(&ContainerSpec::default());
    let (q, reg) = queue(&f, &cluster(vec![test_type()]));
    q.set_incremental(incremental(4));
    q.update().await.unwrap();
    assert_eq!(q.get(&u).unwrap().container().priority, 5);
    // Silently changed: same modified_at.
    f.force_update(&u, json!({"priority": 9}));
    for poll in 2..=4 {
        q.update().await.unwrap();
        assert_eq!(
            q.get(&u).unwrap().container().priority,
            5,
            "incremental poll {poll} cannot see it"
        );
    }
    q.update().await.unwrap();
    assert_eq!(
        q.get(&u).unwrap().container().priority,
        9,
        "the 4th poll is full"
    );
    assert_eq!(
        counter(&reg, "arvados_dispatchcloud_queue_polls_total", "full"),
        2
    );
    assert_eq!(
        counter(
            &reg,
            "arvados_dispatchcloud_queue_polls_total",
            "incremental"
        ),
        3
    );
}

/// Start a poll whose first `pages` container list requests the fake holds 2 s each before
/// answering, and return once the last of them has arrived (and waits): the caller then
/// changes things the poll's remaining answers will show.
async fn poll_with_held_pages(
    f: &testkit::FakeArvados,
    q: &std::sync::Arc<dispatchcloud::queue::ContainerQueue>,
    pages: usize,
) -> tokio::task::JoinHandle<Result<(), arvados::ApiError>> {
    let lists = || {
        f.requests()
            .iter()
            .filter(|r| r.path == "/arvados/v1/containers")
            .count()
    };
    let before = lists();
    f.inject_fault(
        Fault::new(FaultKind::Delay(Duration::from_secs(2)))
            .on("GET", "/arvados/v1/containers")
            .times(pages),
    );
    let poll = tokio::spawn({
        let q = q.clone();
        async move { q.update().await }
    });
    while lists() < before + pages {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    poll
}

/// Ten containers, a full poll in incremental mode, then a change to each: container i gets
/// priority 100 + i at `t0` + `at_ms(i)` ms.
async fn ten_changes_after_a_full_poll(
    at_ms: impl Fn(usize) -> i64,
) -> (
    testkit::FakeArvados,
    std::sync::Arc<dispatchcloud::queue::ContainerQueue>,
    prometheus::Registry,
    Vec<String>,
    chrono::DateTime<Utc>,
) {
    let f = fake().await;
    let uuids: Vec<String> = (0..10)
        .map(|_| {
            f.add_container(&ContainerSpec {
                priority: 5,
                ..Default::default()
            })
        })
        .collect();
    let (q, reg) = queue(&f, &cluster(vec![test_type()]));
    q.set_incremental(incremental(100));
    q.update().await.unwrap();
    let t0 = Utc::now() + chrono::Duration::seconds(1);
    for (i, u) in uuids.iter().enumerate() {
        let at = t0 + chrono::Duration::milliseconds(at_ms(i));
        f.force_update(
            u,
            json!({"priority": 100 + i, "modified_at": testkit::fake_api::format_time(at)}),
        );
    }
    (f, q, reg, uuids, t0)
}

/// An incremental poll that takes several pages sees every change, even when a row it has
/// already received changes again between two pages (it moves to the end of the
/// `modified_at` order; with offset paging the row behind it would be skipped until the next
/// full poll).
#[tokio::test]
async fn an_incremental_poll_paging_through_changes_misses_none_when_rows_move() {
    // One millisecond apart.
    let (f, q, reg, uuids, t0) = ten_changes_after_a_full_poll(|i| i as i64).await;
    // Pages of 3. The first two list requests wait 2 s each before they are answered; while
    // the second waits, the first page's first row changes again.
    f.set_max_items_per_response(3);
    let poll = poll_with_held_pages(&f, &q, 2).await;
    f.force_update(
        &uuids[0],
        json!({"priority": 200, "modified_at": testkit::fake_api::format_time(t0 + chrono::Duration::milliseconds(50))}),
    );
    poll.await.unwrap().unwrap();
    assert_eq!(
        counter(
            &reg,
            "arvados_dispatchcloud_queue_polls_total",
            "incremental"
        ),
        1
    );
    for (i, u) in uuids.iter().enumerate() {
        let want = if i == 0 { 200 } else { 100 + i as i64 };
        assert_eq!(
            q.get(u).unwrap().container().priority,
            want,
            "container {i} after one incremental poll"
        );
    }
}

/// The last row of a page is where the next page starts. When that row changes before the
/// next page is fetched, its new version must still come in. The bug this pins: each next
/// page left out, by uuid, the rows received at the page boundary's time, so the new version
/// was left out too; once a page moved past its new time it was lost until the next full
/// poll. The queue then kept a Complete container as Running, and the scheduler cancelled
/// the finished container ("state=Running after crunch-run exited": 1 to 6 of 10 000 in
/// `simulate` runs with incremental polling).
#[tokio::test]
async fn an_incremental_poll_sees_a_change_to_the_row_its_next_page_starts_from() {
    let (f, q, _, uuids, t0) = ten_changes_after_a_full_poll(|i| i as i64).await;
    let at = |us: i64| testkit::fake_api::format_time(t0 + chrono::Duration::microseconds(us));
    // Pages of 3: the first ends with container 2 (at 2 ms). While the second is held,
    // container 2 changes to 4.5 ms: between containers 4 and 5, inside the next page's range.
    f.set_max_items_per_response(3);
    let poll = poll_with_held_pages(&f, &q, 2).await;
    f.force_update(&uuids[2], json!({"priority": 200, "modified_at": at(4500)}));
    poll.await.unwrap().unwrap();
    let prio = |i: usize| q.get(&uuids[i]).unwrap().container().priority;
    assert_eq!(prio(2), 200, "the page boundary's row, changed");
    for i in [0, 1, 3, 4, 5, 6, 7, 8, 9] {
        assert_eq!(prio(i), 100 + i as i64, "container {i}");
    }
}

/// Rows with exactly the same `modified_at` (one SQL statement can update many) may fill
/// more than a page; an incremental poll pages through them by uuid and then past them.
#[tokio::test]
async fn an_incremental_poll_pages_through_rows_with_the_same_time() {
    // Eight at t0, then two a millisecond later.
    let (f, q, _, uuids, _) = ten_changes_after_a_full_poll(|i| i.saturating_sub(7) as i64).await;
    f.set_max_items_per_response(3);
    q.update().await.unwrap();
    for (i, u) in uuids.iter().enumerate() {
        assert_eq!(
            q.get(u).unwrap().container().priority,
            100 + i as i64,
            "container {i}"
        );
    }
}

/// A change an incremental poll receives for a container locked while that poll was in
/// flight is not applied (the lock's answer wins, as in a full poll), so it must come again
/// in the next poll, even when later changes to other containers moved the watermark past it.
#[tokio::test]
async fn a_change_held_back_by_a_lock_during_an_incremental_poll_comes_again() {
    let f = fake().await;
    let x = f.add_container(&ContainerSpec::default());
    let z = f.add_container(&ContainerSpec::default());
    let (q, _) = queue(&f, &cluster(vec![test_type()]));
    q.set_incremental(incremental(100));
    q.update().await.unwrap();
    let poll = poll_with_held_pages(&f, &q, 1).await;
    // While the poll waits: we lock x, then x starts running and, later, z changes.
    q.lock(&x).await.unwrap();
    let t = Utc::now() + chrono::Duration::milliseconds(100);
    f.force_update(
        &x,
        json!({"state": "Running", "modified_at": testkit::fake_api::format_time(t)}),
    );
    f.force_update(
        &z,
        json!({"priority": 7, "modified_at": testkit::fake_api::format_time(t + chrono::Duration::seconds(1))}),
    );
    poll.await.unwrap().unwrap();
    assert_eq!(
        q.get(&x).unwrap().container().state,
        ContainerState::Locked,
        "the lock's answer wins over the poll that was in flight"
    );
    q.update().await.unwrap();
    assert_eq!(
        q.get(&x).unwrap().container().state,
        ContainerState::Running,
        "the next incremental poll brings the held-back change"
    );
}

/// The first incremental poll after a full one starts from the full poll's start: a batch
/// queued before it is not listed again (the full poll fetched only its top 100, but saw the
/// whole queue as of its start).
#[tokio::test]
async fn the_first_incremental_poll_does_not_list_a_batch_queued_before_the_full_poll() {
    let f = fake().await;
    for i in 0..300 {
        f.add_container(&ContainerSpec {
            // The oldest 100 rank highest: the full poll's newest row is not the batch's.
            priority: if i < 100 { 9 } else { 1 },
            ..Default::default()
        });
    }
    let (q, reg) = queue(&f, &cluster(vec![test_type()]));
    q.set_incremental(incremental(1000));
    q.update().await.unwrap();
    q.update().await.unwrap();
    assert_eq!(
        counter(
            &reg,
            "arvados_dispatchcloud_queue_polls_total",
            "incremental"
        ),
        1
    );
    assert_eq!(
        counter(
            &reg,
            "arvados_dispatchcloud_queue_rows_fetched_total",
            "incremental"
        ),
        0,
        "nothing changed since the full poll"
    );
}

/// A full poll is not a snapshot: its pages are fetched one after another. A container that
/// changes after its page came back, while a later page brings a row changed later still,
/// must be seen by the next incremental poll. The bug this pins: the watermark after a full
/// poll was the newest row it received, past the missed change, so the queue kept a Complete
/// container as Running until the next full poll, and the scheduler cancelled the finished
/// container ("state=Running after crunch-run exited"; 3 of 10 000 in a simulate run).
#[tokio::test]
async fn a_change_during_a_full_poll_after_its_page_comes_in_the_next_incremental_poll() {
    let f = fake().await;
    let x = f.add_container(&ContainerSpec::default());
    let y = f.add_container(&ContainerSpec::default());
    let (q, _) = queue(&f, &cluster(vec![test_type()]));
    // Full, incremental, full, incremental.
    q.set_incremental(incremental(2));
    q.update().await.unwrap();
    q.lock(&x).await.unwrap();
    f.force_update(&x, json!({"state": "Running"}));
    q.update().await.unwrap();
    assert_eq!(
        q.get(&x).unwrap().container().state,
        ContainerState::Running
    );
    // The full poll: its first list (ours: x, Running) comes back; while the second (the
    // queued: y) is held, x completes and then y changes.
    let poll = poll_with_held_pages(&f, &q, 2).await;
    let now = Utc::now();
    f.force_update(
        &x,
        json!({"state": "Complete", "modified_at": testkit::fake_api::format_time(now)}),
    );
    f.force_update(
        &y,
        json!({"priority": 7, "modified_at": testkit::fake_api::format_time(now + chrono::Duration::milliseconds(50))}),
    );
    poll.await.unwrap().unwrap();
    assert_eq!(q.get(&y).unwrap().container().priority, 7);
    assert_eq!(
        q.get(&x).unwrap().container().state,
        ContainerState::Running,
        "the full poll's page for x came before the change"
    );
    q.update().await.unwrap();
    assert_eq!(
        q.get(&x).map(|e| e.container().state),
        Some(ContainerState::Complete),
        "the next incremental poll sees x's change"
    );
}

/// New queued containers an incremental poll sees join the queue only up to what a full poll
/// would fetch now (Arvados' 100, plus the scheduler's room), highest priority first: a big
/// batch queued at once does not flood the queue (and the API with mounts fetches).
#[tokio::test]
async fn an_incremental_poll_admits_new_queued_containers_only_up_to_a_full_polls_reach() {
    let f = fake().await;
    f.set_max_items_per_response(50);
    for _ in 0..100 {
        f.add_container(&ContainerSpec {
            priority: 5,
            ..Default::default()
        });
    }
    let (q, _) = queue(&f, &cluster(vec![test_type()]));
    q.set_incremental(incremental(1000));
    q.update().await.unwrap();
    assert_eq!(q.entries().0.len(), 100);
    // A batch of 200 arrives; the queue already holds a full poll's 100 queued.
    let batch: Vec<String> = (0..200)
        .map(|i| {
            f.add_container(&ContainerSpec {
                priority: 1 + i % 20,
                ..Default::default()
            })
        })
        .collect();
    q.update().await.unwrap();
    assert_eq!(q.entries().0.len(), 100, "no room: none of the batch joins");
    // Room for 30 more: the next poll reaches 130 queued, and its top-up (and changes)
    // bring in the 30 highest-priority containers of the batch.
    q.set_room(30);
    q.update().await.unwrap();
    let mut joined: Vec<i64> = batch
        .iter()
        .filter_map(|u| q.get(u))
        .map(|e| e.container().priority)
        .collect();
    joined.sort();
    assert_eq!(joined.len(), 30, "{joined:?}");
    assert!(joined.iter().all(|p| *p >= 18), "{joined:?}");
}

/// Queued containers that have not changed since the last full poll reach an incremental
/// queue between full polls only while the scheduler has room: each incremental poll then
/// tops up with the top queued, as far as a full poll would reach (Arvados' 100 plus the
/// room). Without room, incremental polls fetch changes only.
#[tokio::test]
async fn incremental_polls_top_up_with_queued_containers_while_there_is_room() {
    let f = fake().await;
    f.set_max_items_per_response(50);
    for i in 0..300 {
        f.add_container(&ContainerSpec {
            priority: 1 + i % 5,
            ..Default::default()
        });
    }
    let (q, reg) = queue(&f, &cluster(vec![test_type()]));
    q.set_incremental(incremental(1000));
    q.update().await.unwrap();
    assert_eq!(
        q.entries().0.len(),
        100,
        "the first poll is full: the top 100"
    );
    // The scheduler locks all it holds and still has room.
    let held: Vec<String> = q
        .entries()
        .0
        .iter()
        .map(|e| e.container().uuid.clone())
        .collect();
    for u in &held {
        q.lock(u).await.unwrap();
    }
    q.update().await.unwrap();
    assert_eq!(q.entries().0.len(), 100, "no room reported: changes only");
    q.set_room(50);
    q.update().await.unwrap();
    let (entries, _) = q.entries();
    assert_eq!(
        entries.len(),
        250,
        "topped up with the next 100 + 50 queued"
    );
    let queued_prio: Vec<i64> = entries
        .iter()
        .filter(|e| e.container().state == ContainerState::Queued)
        .map(|e| e.container().priority)
        .collect();
    assert_eq!(queued_prio.len(), 150);
    let unfetched_max = f
        .container_uuids()
        .iter()
        .filter(|u| q.get(u).is_none())
        .filter_map(|u| f.container(u))
        .map(|r| r["priority"].as_i64().unwrap_or(0))
        .max()
        .unwrap();
    assert!(
        queued_prio.iter().all(|p| *p >= unfetched_max),
        "the top of the queue by priority"
    );
    assert_eq!(
        counter(&reg, "arvados_dispatchcloud_queue_polls_total", "full"),
        1
    );
}

/// With capacity to spare, incremental mode's full polls fetch queued containers beyond
/// Arvados' 100 (up to MaxQueued); without it, they keep to 100.
#[tokio::test]
async fn spare_capacity_fetches_queued_containers_beyond_the_top_100() {
    let f = fake().await;
    f.set_max_items_per_response(50);
    for _ in 0..300 {
        f.add_container(&ContainerSpec {
            priority: 5,
            ..Default::default()
        });
    }
    let (q, _) = queue(&f, &cluster(vec![test_type()]));
    q.set_incremental(incremental(1));
    q.update().await.unwrap();
    assert_eq!(
        q.entries().0.len(),
        100,
        "Arvados' top 100 (two pages of 50)"
    );
    q.set_room(1000);
    q.update().await.unwrap();
    assert_eq!(
        q.entries().0.len(),
        300,
        "room for more: every queued container"
    );
    // No room: new queued containers past the top 100 are not fetched (the known ones are
    // still followed, as Arvados follows every known container).
    q.set_room(0);
    for _ in 0..50 {
        f.add_container(&ContainerSpec {
            priority: 1,
            ..Default::default()
        });
    }
    q.update().await.unwrap();
    assert_eq!(
        q.entries().0.len(),
        300,
        "no room: nothing new past the top 100"
    );
    q.set_room(1000);
    q.update().await.unwrap();
    assert_eq!(q.entries().0.len(), 350, "room again: the new ones too");
    // Without incremental mode the hint changes nothing.
    let (plain, _) = queue(&f, &cluster(vec![test_type()]));
    plain.set_room(1000);
    plain.update().await.unwrap();
    assert_eq!(plain.entries().0.len(), 100);
}
