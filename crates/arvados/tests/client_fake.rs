//! The API client against the fake Arvados API server, over real HTTP on 127.0.0.1.

use arvados::client::{Client, ClientConfig, Count, Filter, ListOptions};
use arvados::types::ContainerState;
use reqwest::StatusCode;
use serde_json::json;
use testkit::fake_api::{ContainerSpec, FakeArvados, FakeConfig, Fault, FaultKind};
use url::Url;

const SELECT: &[&str] = &[
    "uuid",
    "state",
    "priority",
    "runtime_constraints",
    "container_image",
    "scheduling_parameters",
    "created_at",
];

async fn fake() -> FakeArvados {
    FakeArvados::start(FakeConfig {
        max_dispatch_attempts: 3,
        ..FakeConfig::default()
    })
    .await
    .expect("start fake")
}

fn client_for(fake: &FakeArvados, token: &str) -> Client {
    Client::new(ClientConfig {
        base_url: Url::parse(fake.base_url()).unwrap(),
        token: token.to_string(),
        insecure: false,
        timeout: Some(std::time::Duration::from_secs(30)),
        retry: Default::default(),
    })
    .unwrap()
}

/// How many container list requests the fake has served.
fn list_requests(f: &FakeArvados) -> usize {
    f.requests()
        .iter()
        .filter(|r| r.path == "/arvados/v1/containers")
        .count()
}

fn select() -> Option<Vec<String>> {
    Some(SELECT.iter().map(|s| s.to_string()).collect())
}

#[tokio::test]
async fn current_token_identifies_the_dispatcher() {
    let f = fake().await;
    let c = client_for(&f, f.root_token());
    let me = c.current_token().await.unwrap();
    assert_eq!(me.uuid, "zzzzz-gj3su-000000000000000");
    assert_eq!(me.owner_uuid, "zzzzz-tpzed-000000000000000");

    let bad = client_for(&f, "no-such-token");
    let err = bad.current_token().await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
    assert!(err.errors()[0].starts_with("Not logged in"), "{err}");
    assert!(
        !err.to_string().contains("no-such-token"),
        "token leaked: {err}"
    );
}

#[tokio::test]
async fn offset_paging_by_priority_over_several_pages() {
    let f = fake().await;
    for p in 1..=25 {
        f.add_container(&ContainerSpec {
            priority: p,
            ..Default::default()
        });
    }
    // Not eligible: priority 0, or not Queued.
    f.add_container(&ContainerSpec {
        priority: 0,
        ..Default::default()
    });
    let c = client_for(&f, f.root_token());
    let opts = ListOptions {
        filters: vec![
            Filter::new("state", "=", "Queued"),
            Filter::new("priority", ">", "0"),
        ],
        order: Some("priority desc".into()),
        limit: Some(10),
        count: Some(Count::None),
        select: select(),
        ..Default::default()
    };
    let all = c.list_containers_by_offset(&opts, |_| false).await.unwrap();
    let prios: Vec<i64> = all.iter().map(|c| c.priority).collect();
    assert_eq!(prios, (1..=25).rev().collect::<Vec<_>>());
    // 3 full-or-partial pages and the empty page that ends paging.
    assert_eq!(list_requests(&f), 4);

    // The stop callback ends paging early.
    let some = c
        .list_containers_by_offset(&opts, |items| items.len() >= 10)
        .await
        .unwrap();
    assert_eq!(some.len(), 10);

    // count=exact gives items_available; count=none leaves it out.
    let page = c
        .list_containers(&ListOptions {
            limit: Some(0),
            count: Some(Count::Exact),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((page.items.len(), page.items_available), (0, Some(26)));
    let page = c
        .list_containers(&ListOptions {
            count: Some(Count::None),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.items_available, None);
}

#[tokio::test]
async fn uuid_keyset_paging_over_several_pages() {
    let f = fake().await;
    let mut uuids: Vec<String> = (0..23)
        .map(|_| f.add_container(&ContainerSpec::default()))
        .collect();
    uuids.sort();
    let c = client_for(&f, f.root_token());
    for u in &uuids[..12] {
        c.lock_container(u).await.unwrap();
    }
    let mine = c
        .list_all_containers_by_uuid(&ListOptions {
            filters: vec![Filter::new(
                "locked_by_uuid",
                "=",
                "zzzzz-gj3su-000000000000000",
            )],
            limit: Some(5),
            count: Some(Count::None),
            select: select(),
            ..Default::default()
        })
        .await
        .unwrap();
    let got: Vec<String> = mine.iter().map(|c| c.uuid.clone()).collect();
    assert_eq!(got, uuids[..12]);
    assert!(mine.iter().all(|c| c.state == ContainerState::Locked));
    // 5 + 5 + 2 + the empty page.
    assert_eq!(list_requests(&f), 4);
}

#[tokio::test]
async fn long_queries_use_post_with_method_override() {
    let f = fake().await;
    let uuids: Vec<String> = (0..20)
        .map(|_| f.add_container(&ContainerSpec::default()))
        .collect();
    let c = client_for(&f, f.root_token());
    // The dispatcher's "missing containers" batch: 20 UUIDs in an `in` filter, keyset paged.
    let got = c
        .list_all_containers_by_uuid(&ListOptions {
            filters: vec![Filter::new("uuid", "in", uuids.clone())],
            count: Some(Count::None),
            select: select(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(got.len(), 20);
    let reqs = f.requests();
    let overridden: Vec<_> = reqs
        .iter()
        .filter(|r| r.method_override.as_deref() == Some("GET"))
        .collect();
    assert!(
        !overridden.is_empty(),
        "no request used the override: {reqs:?}"
    );
    assert!(
        overridden
            .iter()
            .all(|r| r.wire_method == "POST" && r.query_len == 0)
    );
    // A short query stays a plain GET with its parameters in the URL.
    let before = f.requests().len();
    c.list_containers(&ListOptions {
        filters: vec![Filter::new("uuid", "in", uuids[..1].to_vec())],
        ..Default::default()
    })
    .await
    .unwrap();
    let short = &f.requests()[before];
    assert_eq!(short.wire_method, "GET");
    assert!(short.query_len > 0 && short.method_override.is_none());
}

#[tokio::test]
async fn get_lock_update_unlock_and_their_errors() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec {
        priority: 7,
        tmp_capacity: Some(1 << 30),
        ..Default::default()
    });
    let c = client_for(&f, f.root_token());

    let got = c.get_container(&u, Some(&["mounts"])).await.unwrap();
    assert_eq!(got.mounts["/tmp"].kind, "tmp");
    assert_eq!(got.mounts["/tmp"].capacity, 1 << 30);
    assert_eq!(got.uuid, "", "select limits the response");

    let err = c
        .get_container("zzzzz-dz642-nosuchcontainer", None)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND));
    assert!(err.errors()[0].starts_with("Path not found"));

    let locked = c.lock_container(&u).await.unwrap();
    assert_eq!(locked.state, ContainerState::Locked);
    assert_eq!(locked.locked_by_uuid, "zzzzz-gj3su-000000000000000");

    let err = c.lock_container(&u).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    assert!(
        err.errors()[0].starts_with("cannot lock when Locked"),
        "{err}"
    );

    // Another admin token may not unlock.
    let other = client_for(&f, &f.add_token(true));
    let err = other.unlock_container(&u).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::FORBIDDEN));
    assert!(err.errors()[0].starts_with("locked by a different token"));

    // A non-admin token may not update.
    let user = client_for(&f, &f.add_token(false));
    let err = user
        .update_container(&u, &json!({"state": "Cancelled"}), None)
        .await
        .unwrap_err();
    assert!(matches!(
        err.status(),
        Some(StatusCode::FORBIDDEN | StatusCode::NOT_FOUND)
    ));

    // The dispatcher's cancel-with-reason: runtime_status, then state.
    let r = c
        .update_container(
            &u,
            &json!({"runtime_status": {"error": "constraints not satisfiable by any configured instance type"}}),
            Some(&["uuid"]),
        )
        .await
        .unwrap();
    assert_eq!(r.uuid, u);
    let r = c
        .update_container(&u, &json!({"state": "Cancelled"}), None)
        .await
        .unwrap();
    assert_eq!(r.state, ContainerState::Cancelled);
    assert_eq!(
        r.runtime_status["error"],
        "constraints not satisfiable by any configured instance type"
    );
    assert!(r.finished_at.is_some());
    assert_eq!(r.locked_by_uuid, "");

    let err = c
        .update_container(&u, &json!({"state": "Running"}), None)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    assert!(err.errors()[0].starts_with("State cannot change from Cancelled to Running"));

    let err = c.unlock_container(&u).await.unwrap_err();
    assert!(err.errors()[0].starts_with("cannot unlock when Cancelled"));
}

#[tokio::test]
async fn unlock_at_max_dispatch_attempts_cancels() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let c = client_for(&f, f.root_token());
    for _ in 0..2 {
        c.lock_container(&u).await.unwrap();
        assert_eq!(
            c.unlock_container(&u).await.unwrap().state,
            ContainerState::Queued
        );
    }
    c.lock_container(&u).await.unwrap();
    let r = c.unlock_container(&u).await.unwrap();
    assert_eq!(r.state, ContainerState::Cancelled);
    assert_eq!(
        r.runtime_status["error"],
        "Failed to start container.  Cancelled after exceeding 'Containers.MaxDispatchAttempts' (lock_count=3)"
    );
}

#[tokio::test]
async fn lock_rules_priority_zero_and_state_log() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let c = client_for(&f, f.root_token());
    f.set_priority(&u, 0);
    let err = c.lock_container(&u).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    assert!(err.errors()[0].starts_with("cannot lock when priority<=0"));
    assert_eq!(
        c.get_container(&u, None).await.unwrap().state,
        ContainerState::Queued
    );

    f.set_priority(&u, 5);
    c.lock_container(&u).await.unwrap();
    let err = c
        .update_container(&u, &json!({"state": "Complete"}), None)
        .await
        .unwrap_err();
    assert!(err.errors()[0].starts_with("State cannot change from Locked to Complete"));
    c.update_container(&u, &json!({"state": "Running"}), None)
        .await
        .unwrap();
    c.update_container(&u, &json!({"state": "Complete", "exit_code": 0}), None)
        .await
        .unwrap();

    let v = f.add_container(&ContainerSpec::default());
    let err = c
        .update_container(&v, &json!({"state": "Running"}), None)
        .await
        .unwrap_err();
    assert!(err.errors()[0].starts_with("State cannot change from Queued to Running"));

    let changes: Vec<(String, String)> = f
        .state_changes()
        .into_iter()
        .map(|s| (s.from, s.to))
        .collect();
    let want = [
        ("Queued", "Locked"),
        ("Locked", "Running"),
        ("Running", "Complete"),
    ];
    assert_eq!(changes, want.map(|(a, b)| (a.to_string(), b.to_string())));
}

#[tokio::test]
async fn overload_503_is_recorded_as_last_503() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let c = client_for(&f, f.root_token());
    assert_eq!(c.last_503(), None);
    f.inject_fault(Fault::new(FaultKind::Unavailable).on("POST", "/lock"));
    let before = std::time::SystemTime::now();
    let err = c.lock_container(&u).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert!(err.errors().is_empty(), "overload 503s have empty bodies");
    let seen = c.last_503().expect("503 recorded");
    assert!(seen >= before);
    // The fault was one-shot: the retry works, and a later success does not clear last_503.
    c.lock_container(&u).await.unwrap();
    assert_eq!(c.last_503(), Some(seen));
}

#[tokio::test]
async fn error_after_apply_then_retry_sees_422() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let c = client_for(&f, f.root_token());
    f.inject_fault(Fault::new(FaultKind::StatusAfterApply(502)).on("POST", "/lock"));
    let err = c.lock_container(&u).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::BAD_GATEWAY));
    let err = c.lock_container(&u).await.unwrap_err();
    assert!(err.errors()[0].starts_with("cannot lock when Locked"));
}

#[tokio::test]
async fn filters_bad_requests_get_422() {
    let f = fake().await;
    let c = client_for(&f, f.root_token());
    let err = c
        .list_containers(&ListOptions {
            filters: vec![Filter::new("priority", "=", 1.5)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    let err = c
        .list_containers(&ListOptions {
            select: Some(vec!["nonsense".into()]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.errors()[0]
            .starts_with("Invalid attribute 'nonsense' of Container in select parameter")
    );
}

#[tokio::test]
async fn tls_fake_with_insecure_client_from_env_style_host() {
    let f = FakeArvados::start(FakeConfig {
        tls: true,
        ..FakeConfig::default()
    })
    .await
    .unwrap();
    assert!(f.base_url().starts_with("https://127.0.0.1:"));
    // ARVADOS_API_HOST without a scheme means https.
    let base = arvados::client::api_host_url(f.api_host()).unwrap();
    let insecure = Client::new(ClientConfig {
        base_url: base.clone(),
        token: f.root_token().into(),
        insecure: true,
        timeout: Some(std::time::Duration::from_secs(30)),
        retry: Default::default(),
    })
    .unwrap();
    assert_eq!(
        insecure.current_token().await.unwrap().uuid,
        "zzzzz-gj3su-000000000000000"
    );
    // Without ARVADOS_API_HOST_INSECURE the self-signed certificate is refused.
    let strict = Client::new(ClientConfig {
        base_url: base,
        token: f.root_token().into(),
        insecure: false,
        timeout: Some(std::time::Duration::from_secs(30)),
        retry: Default::default(),
    })
    .unwrap();
    let err = strict.current_token().await.unwrap_err();
    assert!(err.status().is_none(), "expected a TLS failure, got {err}");
}

#[tokio::test]
async fn client_from_cluster_config() {
    let f = fake().await;
    let yaml = format!(
        "Clusters:\n  zzzzz:\n    SystemRootToken: {}\n    Services:\n      Controller:\n        ExternalURL: {}\n",
        f.root_token(),
        f.base_url()
    );
    let cluster = arvados::config::load_cluster_from_str(&yaml, "t.yml", None).unwrap();
    let c = Client::new(ClientConfig::from_cluster(&cluster).unwrap()).unwrap();
    assert_eq!(
        c.current_token().await.unwrap().uuid,
        "zzzzz-gj3su-000000000000000"
    );
    let empty =
        arvados::config::load_cluster_from_str("Clusters: {zzzzz: {}}", "t.yml", None).unwrap();
    let err = ClientConfig::from_cluster(&empty).unwrap_err().to_string();
    assert!(err.contains("Services.Controller.ExternalURL"), "{err}");
}
