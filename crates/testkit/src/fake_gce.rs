//! A stateful fake Compute Engine (v1 REST, JSON) on 127.0.0.1, for the GCE driver's tests
//! and for trying GCE clients by hand (the `fake-gce` binary). It keeps what the driver needs
//! of real GCE: instances insert/get/list/aggregatedList/delete/setLabels/setMetadata, zone
//! operations (get/wait) that move PENDING → RUNNING → DONE, `filter` on labels, status and
//! name, paging, fingerprints checked on every set (412 when stale), `requestId` idempotency,
//! `selfLink` on everything, and errors in GCE's shape. New instances get 127.0.0.x addresses
//! (from .2 up), so a test can answer SSH for them there.
//!
//! Faults ([`GceFault`]): an HTTP error on matching calls, an error inside the next insert
//! operations (quota, capacity…), a delay, a hang, and "created then failed" (the instance
//! appears, then the operation fails and it is gone).

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How the fake starts.
#[derive(Debug, Clone)]
pub struct FakeGceConfig {
    pub project: String,
    pub zones: Vec<String>,
    /// Where it listens (port 0: any free port).
    pub listen: std::net::SocketAddr,
}

impl Default for FakeGceConfig {
    fn default() -> Self {
        FakeGceConfig {
            project: "test-project".into(),
            zones: vec!["us-central1-a".into(), "us-central1-b".into()],
            listen: ([127, 0, 0, 1], 0).into(),
        }
    }
}

/// Something the fake does wrong on purpose.
#[derive(Debug, Clone)]
pub enum GceFault {
    /// Answer matching calls (method, and a path containing `path`) with `status` and the
    /// GCE error `reason`, `times` times.
    Http {
        method: Method,
        path: String,
        status: u16,
        reason: String,
        message: String,
        times: usize,
    },
    /// The next `times` inserts (in `zone`, or any) are accepted, and their operation ends
    /// `DONE` with this error `code` and `message` (e.g. `QUOTA_EXCEEDED`,
    /// `ZONE_RESOURCE_POOL_EXHAUSTED`); no instance is made.
    OperationError {
        zone: Option<String>,
        code: String,
        message: String,
        times: usize,
    },
    /// Like `OperationError`, but the instance exists (listed, PROVISIONING) until its
    /// operation is polled to the end.
    CreatedThenFailed { code: String, message: String },
    /// Matching calls wait this long before answering, `times` times.
    Delay {
        path: String,
        delay: Duration,
        times: usize,
    },
    /// Matching calls never answer, `times` times.
    Hang { path: String, times: usize },
}

struct Op {
    value: Value,
    /// Polls left before DONE.
    steps: u8,
    /// What happens at DONE: an instance to mark RUNNING, an error, an instance to remove.
    instance: Option<(String, String)>,
    error: Option<(String, String)>,
    remove_on_done: bool,
}

#[derive(Default)]
struct Inner {
    project: String,
    zones: Vec<String>,
    base: String,
    /// (zone, name) → instance.
    instances: BTreeMap<(String, String), Value>,
    ops: HashMap<String, Op>,
    request_ids: HashMap<String, String>,
    faults: Vec<GceFault>,
    next_id: u64,
    next_ip: u32,
    /// Every call: "METHOD path?query".
    log: Vec<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// A running fake Compute Engine.
pub struct FakeGce {
    inner: Shared,
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGce {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGce {
    pub async fn start(cfg: FakeGceConfig) -> std::io::Result<FakeGce> {
        let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let inner = Arc::new(Mutex::new(Inner {
            project: cfg.project,
            zones: cfg.zones,
            base: format!("{base}/compute/v1"),
            next_id: 1_000_000_000_000_000_001,
            next_ip: 2,
            ..Default::default()
        }));
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeGce { inner, base, task })
    }

    /// `http://127.0.0.1:PORT`: the `Endpoint` for the Rust client.
    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// `http://127.0.0.1:PORT/compute/v1/`: gcloud's `api_endpoint_overrides/compute`.
    pub fn api_root(&self) -> String {
        format!("{}/compute/v1/", self.base)
    }

    pub fn inject(&self, f: GceFault) {
        self.inner.lock().faults.push(f);
    }

    /// Every instance as the fake holds it (its own record: an oracle for tests).
    pub fn instances(&self) -> Vec<Value> {
        self.inner.lock().instances.values().cloned().collect()
    }

    /// Calls received so far, `METHOD path?query` each.
    pub fn log(&self) -> Vec<String> {
        self.inner.lock().log.clone()
    }

    /// Make an instance disappear as a spot preemption with action DELETE does.
    pub fn preempt(&self, zone: &str, name: &str) -> bool {
        self.inner
            .lock()
            .instances
            .remove(&(zone.to_string(), name.to_string()))
            .is_some()
    }

    /// Set an instance's status (e.g. `TERMINATED`).
    pub fn set_status(&self, zone: &str, name: &str, status: &str) -> bool {
        let mut g = self.inner.lock();
        match g.instances.get_mut(&(zone.to_string(), name.to_string())) {
            Some(i) => {
                i["status"] = status.into();
                true
            }
            None => false,
        }
    }
}

/// GCE's error body.
fn error(status: u16, reason: &str, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({"error": {
        "code": status,
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}],
    }});
    (code, axum::Json(body)).into_response()
}

fn fingerprint() -> String {
    use rand::RngCore;
    // GCE fingerprints are base64 of 8 bytes; the Rust client decodes them with the URL-safe
    // alphabet, so draw until neither `+` nor `/` appears (both alphabets then agree).
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    loop {
        let mut b = [0u8; 8];
        rand::rng().fill_bytes(&mut b);
        let n = u64::from_be_bytes(b);
        let mut s: String = (0..10)
            .map(|i| A[((n >> (58 - 6 * i)) & 63) as usize] as char)
            .collect();
        s.push(A[((n & 0xf) << 2) as usize] as char);
        s.push('=');
        if !s.contains(['+', '/']) {
            return s;
        }
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

/// One term of a filter: `field op value`.
fn term_matches(inst: &Value, term: &str) -> bool {
    let term = term
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .trim();
    if term.is_empty() {
        return true;
    }
    let (field, negate, value) = if let Some((f, v)) = term.split_once("!=") {
        (f, true, v)
    } else if let Some((f, v)) = term.split_once('=') {
        (f, false, v)
    } else if let Some((f, v)) = term.split_once(" eq ") {
        (f, false, v)
    } else if let Some((f, v)) = term.split_once(" ne ") {
        (f, true, v)
    } else {
        return true;
    };
    let field = field.trim();
    let want = value.trim().trim_matches('"').trim_matches('\'');
    let got = if let Some(k) = field.strip_prefix("labels.") {
        inst["labels"][k].as_str().map(String::from)
    } else {
        inst[field].as_str().map(String::from)
    };
    (got.as_deref() == Some(want)) != negate
}

fn matches_filter(inst: &Value, filter: Option<&String>) -> bool {
    let Some(f) = filter else { return true };
    // `a = "x" AND b = y`, or gcloud's `(a = "x") (b = "y")`.
    let normalized = f.replace(") (", ") AND (").replace(")(", ") AND (");
    let mut terms = Vec::new();
    let mut rest = normalized.as_str();
    loop {
        let upper = rest.to_ascii_uppercase();
        match upper.find(" AND ") {
            Some(i) => {
                terms.push(&rest[..i]);
                rest = &rest[i + 5..];
            }
            None => {
                terms.push(rest);
                break;
            }
        }
    }
    terms.iter().all(|t| term_matches(inst, t))
}

/// A page of `items` by `maxResults` and `pageToken` (an offset).
fn page<T: Clone>(items: &[T], q: &HashMap<String, String>) -> (Vec<T>, Option<String>) {
    let max = q
        .get("maxResults")
        .and_then(|m| m.parse::<usize>().ok())
        .filter(|m| *m > 0)
        .unwrap_or(500)
        .min(500);
    let start = q
        .get("pageToken")
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(0)
        .min(items.len());
    let end = (start + max).min(items.len());
    let next = (end < items.len()).then(|| end.to_string());
    (items[start..end].to_vec(), next)
}

impl Inner {
    fn zone_url(&self, z: &str) -> String {
        format!("{}/projects/{}/zones/{z}", self.base, self.project)
    }

    fn new_op(&mut self, zone: &str, kind: &str, target: &str, target_id: &str) -> String {
        let name = format!("operation-{}-{}", self.next_id, kind);
        self.next_id += 1;
        let value = json!({
            "kind": "compute#operation",
            "id": self.next_id.to_string(),
            "name": name,
            "zone": self.zone_url(zone),
            "operationType": kind,
            "targetLink": target,
            "targetId": target_id,
            "status": "PENDING",
            "progress": 0,
            "insertTime": now(),
            "selfLink": format!("{}/operations/{name}", self.zone_url(zone)),
        });
        self.ops.insert(
            name.clone(),
            Op {
                value,
                steps: 2,
                instance: None,
                error: None,
                remove_on_done: false,
            },
        );
        name
    }

    /// Advance an operation one step (or to the end) and return it.
    fn poll_op(&mut self, name: &str, to_end: bool) -> Option<Value> {
        let mut op = self.ops.remove(name)?;
        if op.steps > 0 {
            op.steps = if to_end { 0 } else { op.steps - 1 };
            if op.steps == 1 {
                op.value["status"] = "RUNNING".into();
                op.value["progress"] = 50.into();
            }
            if op.steps == 0 {
                op.value["status"] = "DONE".into();
                op.value["progress"] = 100.into();
                op.value["endTime"] = now().into();
                if let Some((code, message)) = &op.error {
                    op.value["error"] = json!({"errors": [{"code": code, "message": message}]});
                    op.value["httpErrorStatusCode"] = 403.into();
                    if let Some(key) = &op.instance
                        && op.remove_on_done
                    {
                        self.instances.remove(key);
                    }
                } else if let Some(key) = &op.instance
                    && let Some(i) = self.instances.get_mut(key)
                {
                    i["status"] = "RUNNING".into();
                }
            }
        }
        let v = op.value.clone();
        self.ops.insert(name.to_string(), op);
        Some(v)
    }

    /// The first fault matching this call, used up by one.
    fn take_fault(&mut self, method: &Method, path: &str) -> Option<GceFault> {
        let i = self.faults.iter().position(|f| match f {
            GceFault::Http {
                method: m, path: p, ..
            } => m == method && path.contains(p.as_str()),
            GceFault::Delay { path: p, .. } | GceFault::Hang { path: p, .. } => {
                path.contains(p.as_str())
            }
            _ => false,
        })?;
        let f = self.faults[i].clone();
        let left = match &mut self.faults[i] {
            GceFault::Http { times, .. }
            | GceFault::Delay { times, .. }
            | GceFault::Hang { times, .. } => {
                *times = times.saturating_sub(1);
                *times
            }
            _ => 1,
        };
        if left == 0 {
            self.faults.remove(i);
        }
        Some(f)
    }

    /// An insert's injected failure, if any.
    fn take_insert_fault(&mut self, zone: &str) -> Option<(String, String, bool)> {
        let i = self.faults.iter().position(|f| match f {
            GceFault::OperationError { zone: z, .. } => z.as_deref().is_none_or(|z| z == zone),
            GceFault::CreatedThenFailed { .. } => true,
            _ => false,
        })?;
        match self.faults[i].clone() {
            GceFault::OperationError { code, message, .. } => {
                if let GceFault::OperationError { times, .. } = &mut self.faults[i] {
                    *times = times.saturating_sub(1);
                    if *times == 0 {
                        self.faults.remove(i);
                    }
                }
                Some((code, message, false))
            }
            GceFault::CreatedThenFailed { code, message } => {
                self.faults.remove(i);
                Some((code, message, true))
            }
            _ => None,
        }
    }

    fn insert(&mut self, zone: &str, q: &HashMap<String, String>, body: Value) -> Response {
        if let Some(rid) = q.get("requestId")
            && let Some(op) = self.request_ids.get(rid).cloned()
        {
            // The same request again: the same operation, no second instance.
            return axum::Json(self.ops[&op].value.clone()).into_response();
        }
        let Some(name) = body["name"].as_str().map(String::from) else {
            return error(
                400,
                "required",
                "Required field 'resource.name' not specified",
            );
        };
        let key = (zone.to_string(), name.clone());
        if self.instances.contains_key(&key) {
            return error(
                409,
                "alreadyExists",
                &format!(
                    "The resource 'projects/{}/zones/{zone}/instances/{name}' already exists",
                    self.project
                ),
            );
        }
        let fault = self.take_insert_fault(zone);
        let id = self.next_id.to_string();
        self.next_id += 1;
        let self_link = format!("{}/instances/{name}", self.zone_url(zone));
        let op = self.new_op(zone, "insert", &self_link, &id);
        if let Some(rid) = q.get("requestId") {
            self.request_ids.insert(rid.clone(), op.clone());
        }
        let make = !matches!(&fault, Some((_, _, false)));
        if make {
            let ip = format!("127.0.0.{}", self.next_ip);
            self.next_ip = if self.next_ip >= 254 {
                2
            } else {
                self.next_ip + 1
            };
            let mut inst = body.clone();
            let machine_type = body["machineType"].as_str().unwrap_or("");
            let machine_type = if machine_type.starts_with("http") {
                machine_type.to_string()
            } else {
                format!(
                    "{}/machineTypes/{}",
                    self.zone_url(zone),
                    machine_type.rsplit('/').next().unwrap_or("")
                )
            };
            inst["kind"] = "compute#instance".into();
            inst["id"] = id.clone().into();
            inst["zone"] = self.zone_url(zone).into();
            inst["machineType"] = machine_type.into();
            inst["status"] = "PROVISIONING".into();
            inst["selfLink"] = self_link.into();
            inst["creationTimestamp"] = now().into();
            inst["labelFingerprint"] = fingerprint().into();
            if !inst["labels"].is_object() {
                inst["labels"] = json!({});
            }
            let mut md = inst["metadata"].clone();
            if !md.is_object() {
                md = json!({});
            }
            md["kind"] = "compute#metadata".into();
            md["fingerprint"] = fingerprint().into();
            if !md["items"].is_array() {
                md["items"] = json!([]);
            }
            inst["metadata"] = md;
            let mut nics = inst["networkInterfaces"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if nics.is_empty() {
                nics.push(json!({}));
            }
            for (n, nic) in nics.iter_mut().enumerate() {
                nic["name"] = format!("nic{n}").into();
                nic["networkIP"] = ip.clone().into();
                if !nic["network"].is_string() {
                    nic["network"] = format!(
                        "{}/projects/{}/global/networks/default",
                        self.base, self.project
                    )
                    .into();
                }
                if let Some(acs) = nic["accessConfigs"].as_array_mut() {
                    for ac in acs {
                        ac["natIP"] = ip.clone().into();
                        ac["kind"] = "compute#accessConfig".into();
                    }
                }
            }
            inst["networkInterfaces"] = Value::Array(nics);
            self.instances.insert(key.clone(), inst);
        }
        let o = self.ops.get_mut(&op).expect("just made");
        o.instance = Some(key);
        if let Some((code, message, remove)) = fault {
            o.error = Some((code, message));
            o.remove_on_done = remove;
        }
        axum::Json(o.value.clone()).into_response()
    }

    fn set(&mut self, zone: &str, name: &str, what: &str, body: Value) -> Response {
        let key = (zone.to_string(), name.to_string());
        let Some(inst) = self.instances.get_mut(&key) else {
            return self.not_found(zone, name);
        };
        let (fp_field, current) = match what {
            "setLabels" => ("labelFingerprint", inst["labelFingerprint"].clone()),
            _ => ("fingerprint", inst["metadata"]["fingerprint"].clone()),
        };
        if body[fp_field] != current {
            return error(
                412,
                "conditionNotMet",
                &format!(
                    "Supplied fingerprint does not match current {}fingerprint.",
                    if what == "setLabels" {
                        "label "
                    } else {
                        "metadata "
                    }
                ),
            );
        }
        match what {
            "setLabels" => {
                inst["labels"] = body["labels"].clone();
                if !inst["labels"].is_object() {
                    inst["labels"] = json!({});
                }
                inst["labelFingerprint"] = fingerprint().into();
            }
            _ => {
                inst["metadata"]["items"] = body["items"].clone();
                if !inst["metadata"]["items"].is_array() {
                    inst["metadata"]["items"] = json!([]);
                }
                inst["metadata"]["fingerprint"] = fingerprint().into();
            }
        }
        let link = inst["selfLink"].as_str().unwrap_or("").to_string();
        let id = inst["id"].as_str().unwrap_or("").to_string();
        let op = self.new_op(zone, what, &link, &id);
        axum::Json(self.ops[&op].value.clone()).into_response()
    }

    fn not_found(&self, zone: &str, name: &str) -> Response {
        error(
            404,
            "notFound",
            &format!(
                "The resource 'projects/{}/zones/{zone}/instances/{name}' was not found",
                self.project
            ),
        )
    }

    fn route(
        &mut self,
        method: &Method,
        parts: &[&str],
        q: &HashMap<String, String>,
        body: Value,
    ) -> Response {
        let project = self.project.clone();
        let zone_known = |z: &str, zones: &[String]| zones.iter().any(|x| x == z);
        match (method.as_str(), parts) {
            ("GET", [p]) if *p == project => axum::Json(json!({
                "kind": "compute#project",
                "id": "1",
                "name": project,
                "selfLink": format!("{}/projects/{project}", self.base),
                "commonInstanceMetadata": {"kind": "compute#metadata", "items": []},
            }))
            .into_response(),
            ("GET", [p, "zones", z]) if *p == project => {
                if !zone_known(z, &self.zones) {
                    return error(
                        404,
                        "notFound",
                        &format!("The resource 'projects/{project}/zones/{z}' was not found"),
                    );
                }
                axum::Json(json!({
                    "kind": "compute#zone",
                    "id": "2",
                    "name": z,
                    "status": "UP",
                    "region": format!("{}/projects/{project}/regions/{}", self.base, z.rsplit_once('-').map_or(*z, |(r, _)| r)),
                    "selfLink": self.zone_url(z),
                }))
                .into_response()
            }
            ("GET", [p, "zones"]) if *p == project => {
                let items: Vec<Value> = self
                    .zones
                    .iter()
                    .map(|z| json!({"kind": "compute#zone", "name": z, "status": "UP", "selfLink": self.zone_url(z)}))
                    .collect();
                axum::Json(json!({"kind": "compute#zoneList", "items": items, "selfLink": format!("{}/projects/{project}/zones", self.base)})).into_response()
            }
            (_, [p, "zones", z, ..]) if *p == project && !zone_known(z, &self.zones) => error(
                404,
                "notFound",
                &format!("The resource 'projects/{project}/zones/{z}' was not found"),
            ),
            ("POST", [_, "zones", z, "instances"]) => self.insert(z, q, body),
            ("GET", [_, "zones", z, "instances"]) => {
                let all: Vec<Value> = self
                    .instances
                    .iter()
                    .filter(|((iz, _), i)| iz == z && matches_filter(i, q.get("filter")))
                    .map(|(_, i)| i.clone())
                    .collect();
                let (items, next) = page(&all, q);
                let mut v = json!({
                    "kind": "compute#instanceList",
                    "id": format!("projects/{project}/zones/{z}/instances"),
                    "items": items,
                    "selfLink": format!("{}/instances", self.zone_url(z)),
                });
                if let Some(n) = next {
                    v["nextPageToken"] = n.into();
                }
                axum::Json(v).into_response()
            }
            ("GET", [_, "aggregated", "instances"]) => {
                let all: Vec<(String, Value)> = self
                    .instances
                    .iter()
                    .filter(|(_, i)| matches_filter(i, q.get("filter")))
                    .map(|((z, _), i)| (z.clone(), i.clone()))
                    .collect();
                let (items, next) = page(&all, q);
                let mut scoped: BTreeMap<String, Value> = self
                    .zones
                    .iter()
                    .map(|z| {
                        (
                            format!("zones/{z}"),
                            json!({"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "There are no results for scope 'zones/' on this page.", "data": [{"key": "scope", "value": format!("zones/{z}")}]}}),
                        )
                    })
                    .collect();
                for (z, i) in items {
                    let e = scoped
                        .entry(format!("zones/{z}"))
                        .or_insert_with(|| json!({}));
                    if e.get("instances").is_none() {
                        *e = json!({"instances": []});
                    }
                    e["instances"].as_array_mut().expect("array").push(i);
                }
                let mut v = json!({
                    "kind": "compute#instanceAggregatedList",
                    "id": format!("projects/{project}/aggregated/instances"),
                    "items": scoped,
                    "selfLink": format!("{}/projects/{project}/aggregated/instances", self.base),
                });
                if let Some(n) = next {
                    v["nextPageToken"] = n.into();
                }
                axum::Json(v).into_response()
            }
            ("GET", [_, "zones", z, "instances", name]) => {
                match self.instances.get(&(z.to_string(), name.to_string())) {
                    Some(i) => axum::Json(i.clone()).into_response(),
                    None => self.not_found(z, name),
                }
            }
            ("DELETE", [_, "zones", z, "instances", name]) => {
                if let Some(rid) = q.get("requestId")
                    && let Some(op) = self.request_ids.get(rid).cloned()
                {
                    return axum::Json(self.ops[&op].value.clone()).into_response();
                }
                let Some(inst) = self.instances.remove(&(z.to_string(), name.to_string())) else {
                    return self.not_found(z, name);
                };
                let op = self.new_op(
                    z,
                    "delete",
                    inst["selfLink"].as_str().unwrap_or(""),
                    inst["id"].as_str().unwrap_or(""),
                );
                if let Some(rid) = q.get("requestId") {
                    self.request_ids.insert(rid.clone(), op.clone());
                }
                axum::Json(self.ops[&op].value.clone()).into_response()
            }
            (
                "POST",
                [
                    _,
                    "zones",
                    z,
                    "instances",
                    name,
                    what @ ("setLabels" | "setMetadata"),
                ],
            ) => self.set(z, name, what, body),
            ("GET", [_, "zones", _, "operations", op]) => match self.poll_op(op, false) {
                Some(v) => axum::Json(v).into_response(),
                None => error(
                    404,
                    "notFound",
                    &format!("The resource 'operations/{op}' was not found"),
                ),
            },
            ("POST", [_, "zones", _, "operations", op, "wait"]) => match self.poll_op(op, true) {
                Some(v) => axum::Json(v).into_response(),
                None => error(
                    404,
                    "notFound",
                    &format!("The resource 'operations/{op}' was not found"),
                ),
            },
            _ => error(
                404,
                "notFound",
                "The requested URL was not found on this server.",
            ),
        }
    }
}

async fn handle(
    State(s): State<Shared>,
    method: Method,
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Response {
    let path = uri.path().to_string();
    let fault = {
        let mut g = s.lock();
        g.log.push(format!(
            "{method} {}",
            uri.path_and_query().map_or(path.as_str(), |p| p.as_str())
        ));
        g.take_fault(&method, &path)
    };
    match fault {
        Some(GceFault::Http {
            status,
            reason,
            message,
            ..
        }) => return error(status, &reason, &message),
        Some(GceFault::Delay { delay, .. }) => tokio::time::sleep(delay).await,
        Some(GceFault::Hang { .. }) => std::future::pending::<()>().await,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/compute/v1/projects/") else {
        return error(
            404,
            "notFound",
            "The requested URL was not found on this server.",
        );
    };
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    400,
                    "parseError",
                    &format!("Invalid JSON payload received. {e}"),
                );
            }
        }
    };
    s.lock().route(&method, &parts, &q, body)
}
