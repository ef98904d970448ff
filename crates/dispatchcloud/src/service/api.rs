//! The management API (spec §10.1–10.3): routes, token check, error texts, JSON shapes,
//! `/metrics`, `/_health/ping`. Parameters come from the query string or a form body.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::Service;
use crate::scheduler::pool::WorkerPool;
use crate::worker_state::{IdleBehavior, InstanceView};

type Shared = Arc<Service>;

/// The largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 64 * 1024;

fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{body}\n"),
    )
        .into_response()
}

/// Arvados' error body: `{"errors":["…"]}`.
pub(super) fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"errors": [message]}))).into_response()
}

/// Whether two tokens are equal, compared in constant time (for equal lengths).
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Every token a request carries: `Authorization: Bearer|OAuth2`, HTTP Basic password,
/// `api_token` query parameters, the `arvados_api_token` cookie.
fn request_tokens(headers: &HeaderMap, uri: &axum::http::Uri) -> Vec<String> {
    let mut tokens = Vec::new();
    for v in headers.get_all(header::AUTHORIZATION) {
        let Ok(v) = v.to_str() else { continue };
        if let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("OAuth2 "))
        {
            tokens.push(t.trim().to_string());
        } else if let Some(b) = v.strip_prefix("Basic ")
            && let Some(pass) =
                base64_decode(b.trim()).and_then(|s| s.split_once(':').map(|(_, p)| p.to_string()))
        {
            tokens.push(pass);
        }
    }
    if let Some(q) = uri.query() {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            if k == "api_token" {
                tokens.push(v.into_owned());
            }
        }
    }
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for c in v.split(';') {
            if let Some(t) = c.trim().strip_prefix("arvados_api_token=") {
                tokens.push(t.to_string());
            }
        }
    }
    tokens
}

/// Standard base64 (HTTP Basic credentials) to text; padding optional, as clients differ.
fn base64_decode(s: &str) -> Option<String> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    String::from_utf8(LENIENT.decode(s).ok()?).ok()
}

/// Why a request may not see the management API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Denied {
    /// No `ManagementToken` is configured: nobody may.
    NotConfigured,
    /// The request carries no token.
    NoToken,
    /// None of its tokens is the `ManagementToken`.
    WrongToken,
}

/// Whether the request carries the `ManagementToken` (in any of the places Arvados accepts).
pub(super) fn check_token(
    svc: &Service,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> Result<(), Denied> {
    let want = &svc.cluster.management_token;
    if want.is_empty() {
        return Err(Denied::NotConfigured);
    }
    let tokens = request_tokens(headers, uri);
    if tokens.is_empty() {
        return Err(Denied::NoToken);
    }
    // Compare every token, so timing does not tell which one (or where) matched.
    if tokens.iter().fold(false, |ok, t| ok | same(t, want)) {
        Ok(())
    } else {
        Err(Denied::WrongToken)
    }
}

/// Whether `token` is the `ManagementToken` (constant time).
pub(super) fn is_management_token(svc: &Service, token: &str) -> bool {
    let want = &svc.cluster.management_token;
    !want.is_empty() && same(token, want)
}

async fn auth(State(svc): State<Shared>, req: Request, next: Next) -> Response {
    match check_token(&svc, req.headers(), req.uri()) {
        Ok(()) => next.run(req).await,
        Err(Denied::NotConfigured) => text(
            StatusCode::FORBIDDEN,
            "Management API authentication is not configured",
        ),
        Err(Denied::NoToken) => text(StatusCode::UNAUTHORIZED, "Unauthorized"),
        Err(Denied::WrongToken) => text(StatusCode::FORBIDDEN, "Forbidden"),
    }
}

/// Query-string and form-body parameters (body values win).
fn params(uri: &axum::http::Uri, headers: &HeaderMap, body: &Bytes) -> HashMap<String, String> {
    let mut p: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form || (!body.is_empty() && !headers.contains_key(header::CONTENT_TYPE)) {
        p.extend(url::form_urlencoded::parse(body).into_owned());
    }
    p
}

/// `InstanceView` with Arvados' JSON: a pending create has a zero `last_busy` and a null
/// container list.
pub fn instance_json(v: &InstanceView) -> Value {
    let pending = v.instance.is_empty();
    json!({
        "instance": v.instance,
        "address": v.address,
        "price": v.price,
        "arvados_instance_type": v.arvados_instance_type,
        "provider_instance_type": v.provider_instance_type,
        "last_container_uuid": v.last_container_uuid,
        "last_busy": match v.last_busy {
            Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            None => "0001-01-01T00:00:00Z".to_string(),
        },
        "running_container_uuids": if pending { Value::Null } else { json!(v.running_container_uuids) },
        "worker_state": v.worker_state.as_str(),
        "idle_behavior": v.idle_behavior.as_str(),
    })
}

fn queue_items(svc: &Service) -> Vec<Value> {
    svc.scheduler
        .queue_view()
        .sorted()
        .into_iter()
        .map(|(ent, status)| {
            let mut v = serde_json::to_value(&*ent).unwrap_or_default();
            v["scheduling_status"] = json!(status.to_string());
            v
        })
        .collect()
}

async fn list_containers(State(svc): State<Shared>) -> Response {
    axum::Json(json!({"items": queue_items(&svc)})).into_response()
}

async fn get_container(
    State(svc): State<Shared>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(&uri, &headers, &body);
    let uuid = p.get("container_uuid").cloned().unwrap_or_default();
    if uuid.is_empty() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "container_uuid parameter not provided",
        );
    }
    match queue_items(&svc)
        .into_iter()
        .find(|v| v["container"]["uuid"] == uuid.as_str())
    {
        Some(v) => axum::Json(v).into_response(),
        None => json_error(StatusCode::NOT_FOUND, "container not found"),
    }
}

async fn kill_container(
    State(svc): State<Shared>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(&uri, &headers, &body);
    let uuid = p.get("container_uuid").cloned().unwrap_or_default();
    if uuid.is_empty() {
        return json_error(
            StatusCode::BAD_REQUEST,
            "container_uuid parameter not provided",
        );
    }
    let reason = format!(
        "via management API: {}",
        p.get("reason").map(String::as_str).unwrap_or("")
    );
    if svc.pool.kill_container(&uuid, &reason) {
        StatusCode::OK.into_response()
    } else {
        json_error(StatusCode::NOT_FOUND, "container not found")
    }
}

/// Only VMs the cloud has returned, as Arvados lists them: a create still in flight has no
/// instance id yet, so it is counted by the scheduler but not shown here.
async fn list_instances(State(svc): State<Shared>) -> Response {
    let items: Vec<Value> = svc
        .pool
        .instances()
        .iter()
        .filter(|v| !v.instance.is_empty())
        .map(instance_json)
        .collect();
    axum::Json(json!({"items": items})).into_response()
}

/// What the pool holds off and why (not in Arvados; issue 19): capacity hold-offs and
/// offerings in doubt, with their errors in a row and the cloud's last error, and the quota,
/// `MaxInstances` and create-concurrency holds. The status page shows the same list.
async fn list_holdoffs(State(svc): State<Shared>) -> Response {
    axum::Json(json!({"items": svc.pool.holdoffs()})).into_response()
}

fn instance_id(p: &HashMap<String, String>) -> Result<String, Box<Response>> {
    match p.get("instance_id") {
        Some(id) if !id.is_empty() => Ok(id.clone()),
        _ => Err(Box::new(json_error(
            StatusCode::BAD_REQUEST,
            "instance_id parameter not provided",
        ))),
    }
}

async fn set_behavior(
    svc: Shared,
    b: IdleBehavior,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(&uri, &headers, &body);
    let id = match instance_id(&p) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    match svc.pool.set_idle_behavior(&id, b) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => json_error(StatusCode::NOT_FOUND, &e),
    }
}

async fn kill_instance(
    State(svc): State<Shared>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let p = params(&uri, &headers, &body);
    let id = match instance_id(&p) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    let reason = format!(
        "via management API: {}",
        p.get("reason").map(String::as_str).unwrap_or("")
    );
    match svc.pool.kill_instance(&id, &reason) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => json_error(StatusCode::NOT_FOUND, &e),
    }
}

async fn metrics(State(svc): State<Shared>) -> Response {
    use prometheus::Encoder;
    svc.pool.update_metrics();
    let enc = prometheus::TextEncoder::new();
    let mut buf = Vec::new();
    if let Err(e) = enc.encode(&svc.registry.gather(), &mut buf) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    ([(header::CONTENT_TYPE, enc.format_type().to_string())], buf).into_response()
}

/// `GET /_health/ping`: its own token rule (header exactly `Bearer <ManagementToken>`).
async fn health(
    State(svc): State<Shared>,
    axum::extract::Path(check): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let want = &svc.cluster.management_token;
    if want.is_empty() {
        return json_error(StatusCode::NOT_FOUND, "disabled");
    }
    let Some(got) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return json_error(StatusCode::UNAUTHORIZED, "authorization required");
    };
    if !same(got, &format!("Bearer {want}")) {
        return json_error(StatusCode::FORBIDDEN, "authorization error");
    }
    if check != "ping" {
        return json_error(StatusCode::NOT_FOUND, "unknown health check");
    }
    match svc.pool.check_health() {
        Ok(()) => axum::Json(json!({"health": "OK"})).into_response(),
        Err(e) => axum::Json(json!({"health": "ERROR", "error": e})).into_response(),
    }
}

async fn not_found() -> Response {
    json_error(StatusCode::NOT_FOUND, "not found")
}

/// The whole HTTP handler.
pub fn router(svc: Shared) -> Router {
    let behavior = |b: IdleBehavior| {
        move |State(svc): State<Shared>, uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
            set_behavior(svc, b, uri, headers, body)
        }
    };
    let api = Router::new()
        .route("/arvados/v1/dispatch/containers", get(list_containers))
        .route("/arvados/v1/dispatch/container", get(get_container))
        .route("/arvados/v1/dispatch/containers/kill", post(kill_container))
        .route("/arvados/v1/dispatch/instances", get(list_instances))
        .route(
            "/arvados/v1/dispatch/instances/hold",
            post(behavior(IdleBehavior::Hold)),
        )
        .route(
            "/arvados/v1/dispatch/instances/drain",
            post(behavior(IdleBehavior::Drain)),
        )
        .route(
            "/arvados/v1/dispatch/instances/run",
            post(behavior(IdleBehavior::Run)),
        )
        .route("/arvados/v1/dispatch/instances/kill", post(kill_instance))
        .route("/arvados/v1/dispatch/holdoffs", get(list_holdoffs))
        .route("/metrics", get(metrics))
        .route("/metrics.json", get(metrics))
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(svc.clone(), auth));
    Router::new()
        .route("/_health/{check}", get(health))
        .merge(super::status_page::routes())
        .merge(api)
        .method_not_allowed_fallback(|m: Method| async move {
            json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("method {m} not allowed"),
            )
        })
        // Every parameter fits in a few KiB; nobody gets to upload more.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(
            svc.http_metrics.clone(),
            super::http_metrics::track,
        ))
        .with_state(svc)
}
