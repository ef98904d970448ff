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
