//! Wire details of the fake API that other clients rely on, checked with raw HTTP requests.

use serde_json::{Value, json};
use testkit::fake_api::{ContainerSpec, FakeArvados, FakeConfig};

async fn fake() -> (FakeArvados, reqwest::Client) {
    (
        FakeArvados::start(FakeConfig::default()).await.unwrap(),
        reqwest::Client::new(),
    )
}

async fn body(r: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    if status == 200 {
        assert_eq!(ct.as_deref(), Some("application/json"));
    }
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn patch_json_body_and_underscore_method() {
    let (f, http) = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let url = format!("{}/arvados/v1/containers/{u}", f.base_url());
    // PATCH with a JSON body, as the Python SDK sends.
    let (s, v) = body(
        http.patch(&url)
            .bearer_auth(f.root_token())
            .json(&json!({"container": {"priority": 9}})),
    )
    .await;
    assert_eq!((s, &v["priority"]), (200, &json!(9)));
    // POST with a `_method=GET` form field reads instead of writing.
    let (s, v) = body(
        http.post(&url)
            .bearer_auth(f.root_token())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("_method=GET&select=%5B%22uuid%22%2C%22priority%22%5D"),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        v,
        json!({"kind": "arvados#container", "etag": "", "uuid": u, "priority": 9})
    );
}

#[tokio::test]
async fn limits_offsets_and_empty_pages() {
    let (f, http) = fake().await;
    for _ in 0..1005 {
        f.add_container(&ContainerSpec::default());
    }
    let list = |q: &str| {
        http.get(format!("{}/arvados/v1/containers?{q}", f.base_url()))
            .bearer_auth(f.root_token())
    };
    let (_, v) = body(list("")).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 100, "default limit");
    let (_, v) = body(list("limit=5000&count=none")).await;
    assert_eq!(
        v["items"].as_array().unwrap().len(),
        1000,
        "clamped to MaxItemsPerResponse"
    );
    assert_eq!(v["limit"], 1000);
    assert!(v.get("items_available").is_none());
    let (_, v) = body(list("offset=1005")).await;
    assert_eq!(
        v["items"],
        json!([]),
        "paging past the end gives an empty page"
    );
    assert_eq!(v["items_available"], 1005);
    let (s, v) = body(list("limit=ten")).await;
    assert_eq!(s, 422);
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("Invalid value for limit parameter")
    );
    let (s, _) = body(list("count=maybe")).await;
    assert_eq!(s, 422);
}

#[tokio::test]
async fn timestamps_errors_and_auth_forms() {
    let (f, http) = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let get = |tok: Option<&str>| {
        let r = http.get(format!("{}/arvados/v1/containers/{u}", f.base_url()));
        match tok {
            Some(t) => r.header("Authorization", t),
            None => r,
        }
    };
    let (s, v) = body(get(Some(&format!("Bearer {}", f.root_token())))).await;
    assert_eq!(s, 200);
    let ts = v["created_at"].as_str().unwrap();
    // YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ
    assert_eq!(ts.len(), 30, "{ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");
    assert_eq!(v["started_at"], Value::Null);
    assert_eq!(v["kind"], "arvados#container");

    let (s, v) = body(get(None)).await;
    assert_eq!(s, 401);
    assert_eq!(v["errors"][0], "Not logged in");
    assert!(v["error_token"].is_string());
    // The request id is appended to error messages, as Rails does.
    let (_, v) = body(get(Some("Bearer wrong")).header("X-Request-Id", "req-abc")).await;
    assert_eq!(v["errors"][0], "Not logged in (req-abc)");
    let v2 = f.add_token(true);
    let (s, _) = body(get(Some(&format!("OAuth2 {v2}")))).await;
    assert_eq!(s, 200, "v2 token via OAuth2 scheme");

    let (s, v) = body(
        http.get(format!("{}/arvados/v1/nothing", f.base_url()))
            .bearer_auth(f.root_token()),
    )
    .await;
    assert_eq!(
        (s, v["errors"][0].as_str()),
        (404, Some("API endpoint not found"))
    );
    let (s, v) = body(http.get(format!(
        "{}/discovery/v1/apis/arvados/v1/rest",
        f.base_url()
    )))
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["rootUrl"], format!("{}/", f.base_url()));
    assert_eq!(v["servicePath"], "arvados/v1/");
}

#[tokio::test]
async fn logs_endpoint_records_dispatch_events() {
    let (f, http) = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let log = json!({"object_uuid": u, "event_type": "dispatch", "properties": {"text": "failed to start"}});
    let (s, v) = body(
        http.post(format!("{}/arvados/v1/logs", f.base_url()))
            .bearer_auth(f.root_token())
            .form(&[("log", log.to_string())]),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["kind"], "arvados#log");
    assert_eq!(f.logs()[0]["properties"]["text"], "failed to start");
}
