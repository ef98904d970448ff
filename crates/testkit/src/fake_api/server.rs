//! The HTTP shell of the fake API: authentication, method override, routing, fault injection and
//! the response format. All rules live in `store`.

use parking_lot::Mutex;
use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::store::{Caller, Failure, Store, token_json};
use super::{Fault, FaultKind, RequestRecord};

/// The discovery document served at `/discovery/v1/apis/arvados/v1/rest`: Arvados' real one,
/// with `rootUrl` pointing at this server (clients build request URLs from it).
const DISCOVERY: &str = include_str!("../../fixtures/arvados-v1-discovery.json");

pub(crate) struct App {
    pub store: Mutex<Store>,
    pub faults: Mutex<Vec<Fault>>,
    pub requests: Mutex<Vec<RequestRecord>>,
    pub discovery: Value,
}

impl App {
    pub fn new(store: Store, base_url: &str) -> Self {
        let mut discovery: Value =
            serde_json::from_str(DISCOVERY).expect("discovery fixture is valid JSON");
        discovery["rootUrl"] = Value::from(format!("{}/", base_url.trim_end_matches('/')));
        discovery["baseUrl"] =
            Value::from(format!("{}/arvados/v1/", base_url.trim_end_matches('/')));
        App {
            store: Mutex::new(store),
            faults: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            discovery,
        }
    }
}

fn json_response(status: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(f: &Failure, request_id: Option<&str>) -> Response {
    let msg = match request_id {
        Some(id) => format!("{} ({id})", f.message),
        None => f.message.clone(),
    };
    let token = format!(
        "{}+{:08x}",
        chrono::Utc::now().timestamp(),
        rand::random::<u32>()
    );
    json_response(f.status, &json!({"errors": [msg], "error_token": token}))
}

fn empty_response(status: u16) -> Response {
    StatusCode::from_u16(status)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response()
}

/// Find the token: `Authorization: Bearer|OAuth2 <token>`, else an `api_token` parameter.
fn presented_token(headers: &HeaderMap, params: &Map<String, Value>) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = v.splitn(2, ' ');
        let scheme = parts.next().unwrap_or_default();
        let rest = parts.next().unwrap_or_default().trim();
        if (scheme.eq_ignore_ascii_case("Bearer") || scheme.eq_ignore_ascii_case("OAuth2"))
            && !rest.is_empty()
        {
            return Some(rest.to_string());
        }
    }
    params
        .get("api_token")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Take the first live fault matching this request, counting it down.
fn take_fault(app: &App, method: &Method, path: &str) -> Option<FaultKind> {
    let mut faults = app.faults.lock();
    let idx = faults
        .iter()
        .position(|f| f.matches(method.as_str(), path))?;
    let kind = faults[idx].kind.clone();
    if let Some(n) = faults[idx].remaining.as_mut() {
        *n -= 1;
        if *n == 0 {
            faults.remove(idx);
        }
    }
    Some(kind)
}

pub(crate) async fn handle(State(app): State<Arc<App>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match to_bytes(Body::new(body), 64 << 20).await {
        Ok(b) => b,
        Err(_) => return error_response(&Failure::new(413, "request body too large"), None),
    };
    let headers = parts.headers;
    let path = parts.uri.path().to_string();
    let query = parts.uri.query();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut params = match super::params::parse(query, content_type, &body) {
        Ok(p) => p,
        Err(e) => return error_response(&Failure::new(422, e), request_id.as_deref()),
    };
    let override_header = headers
        .get("x-http-method-override")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_uppercase);
    let override_field = params
        .remove("_method")
        .and_then(|v| v.as_str().map(str::to_ascii_uppercase));
    let method = match (&parts.method, override_header.clone().or(override_field)) {
        (&Method::POST, Some(m)) => Method::from_bytes(m.as_bytes()).unwrap_or(Method::POST),
        (m, _) => m.clone(),
    };
    app.requests.lock().push(RequestRecord {
        wire_method: parts.method.to_string(),
        method: method.to_string(),
        path: path.clone(),
        query_len: query.map_or(0, str::len),
        method_override: override_header,
        params: params.clone(),
    });

    let mut after_apply = None;
    match take_fault(&app, &method, &path) {
        Some(FaultKind::Unavailable) => return empty_response(503),
        Some(FaultKind::Status(code)) => {
            return error_response(
                &Failure::new(code, "injected failure"),
                request_id.as_deref(),
            );
        }
        Some(FaultKind::Delay(d)) => tokio::time::sleep(d).await,
        Some(FaultKind::StatusAfterApply(code)) => after_apply = Some(code),
        None => {}
    }

    let out = route(&app, &method, &path, &headers, &params);
    if let Some(code) = after_apply {
        return empty_response(code);
    }
    match out {
        Ok(v) => json_response(200, &v),
        Err(f) => error_response(&f, request_id.as_deref()),
    }
}

fn route(
    app: &App,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    params: &Map<String, Value>,
) -> Result<Value, Failure> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Unauthenticated documents.
    match (method, segs.as_slice()) {
        (&Method::GET, ["discovery", "v1", "apis", "arvados", "v1", "rest"]) => {
            return Ok(app.discovery.clone());
        }
        (&Method::GET, ["arvados", "v1", "config"]) => {
            let s = app.store.lock();
            return Ok(json!({
                "ClusterID": s.cluster_id,
                "API": {"MaxItemsPerResponse": s.max_items_per_response},
                "Containers": {"MaxDispatchAttempts": s.max_dispatch_attempts},
            }));
        }
        _ => {}
    }
    let Some(rest) = segs.strip_prefix(&["arvados", "v1"]) else {
        return Err(Failure::new(404, "API endpoint not found"));
    };
    let mut store = app.store.lock();
    let caller: Caller = presented_token(headers, params)
        .and_then(|t| store.authenticate(&t))
        .ok_or_else(|| Failure::new(401, "Not logged in"))?;
    let get = method == Method::GET || method == Method::HEAD;
    match rest {
        ["api_client_authorizations", "current"] if get => Ok(token_json(&caller.token)),
        ["users", "current"] if get => Ok(json!({
            "kind": "arvados#user",
            "etag": "",
            "uuid": caller.token.user_uuid,
            "owner_uuid": caller.token.user_uuid,
            "is_admin": caller.token.admin,
            "is_active": true,
            "username": if caller.token.admin { "root" } else { "user" },
        })),
        ["containers"] if get => store.list(&caller, params),
        ["containers", uuid] if get => store.get(&caller, uuid, params),
        ["containers", uuid] if method == Method::PUT || method == Method::PATCH => {
            store.update(&caller, uuid, params)
        }
        ["containers", uuid, "lock"] if method == Method::POST => store.lock(&caller, uuid),
        ["containers", uuid, "unlock"] if method == Method::POST => store.unlock(&caller, uuid),
        ["containers", uuid, "auth"] if get => store.container_auth(&caller, uuid),
        ["containers", uuid, "secret_mounts"] if get => store.secret_mounts(&caller, uuid),
        ["logs"] if method == Method::POST => store.create_log(&caller, params),
        _ => Err(Failure::new(404, "API endpoint not found")),
    }
}
