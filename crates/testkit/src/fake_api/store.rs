//! The fake API's state and rules, free of HTTP: containers, tokens, and the Rails container
//! model's lock/unlock/update rules (`arvados-api-contract.md` A.2). Every operation takes the
//! caller's identity and returns the JSON to send or a `Failure` (status + message).

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::filters::{self, CONTAINER_ATTRS, Column};

/// An error response: HTTP status and the message for `{"errors":[…]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub message: String,
}

impl Failure {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }
    fn unprocessable(message: impl Into<String>) -> Self {
        Failure::new(422, message)
    }
    pub fn not_found() -> Self {
        Failure::new(404, "Path not found")
    }
}

type Outcome = Result<Value, Failure>;

/// An API token known to the fake.
#[derive(Debug, Clone)]
pub struct Token {
    pub uuid: String,
    pub secret: String,
    pub user_uuid: String,
    pub admin: bool,
    /// For per-container tokens created on lock: the container they belong to.
    pub container_uuid: Option<String>,
    pub expired: bool,
}

/// Who is calling, after token lookup.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: Token,
}

/// One recorded state change, for test assertions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateChange {
    pub uuid: String,
    pub from: String,
    pub to: String,
    /// UUID of the token that made the change, or `test-hook`.
    pub by: String,
    pub at: DateTime<Utc>,
}

/// The state machine: allowed (from, to) pairs (A.2.1). Same-state is always allowed.
fn transition_allowed(from: &str, to: &str) -> bool {
    from == to
        || matches!(
            (from, to),
            ("Queued", "Locked")
                | ("Queued", "Cancelled")
                | ("Locked", "Queued")
                | ("Locked", "Running")
                | ("Locked", "Cancelled")
                | ("Running", "Complete")
                | ("Running", "Cancelled")
                | ("Complete", "Cancelled")
        )
}

const STATES: &[&str] = &["Queued", "Locked", "Running", "Complete", "Cancelled"];

/// Attributes crunch-run reports while running; only the lock holder may change them.
const PROGRESS_ATTRS: &[&str] = &[
    "progress",
    "runtime_status",
    "subrequests_cost",
    "cost",
    "log",
    "output",
    "output_properties",
    "exit_code",
];

const RUNTIME_STATUS_STRING_KEYS: &[&str] = &[
    "error",
    "errorDetail",
    "warning",
    "warningDetail",
    "activity",
    "preemptionNotice",
];

/// Timestamps as Arvados renders them: always 9 fraction digits, UTC.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string()
}

fn now() -> String {
    format_time(Utc::now())
}

/// The fake's whole state.
#[derive(Debug)]
pub struct Store {
    pub cluster_id: String,
    pub max_dispatch_attempts: i64,
    pub max_items_per_response: i64,
    containers: BTreeMap<String, Map<String, Value>>,
    tokens: HashMap<String, Token>,
    state_changes: Vec<StateChange>,
    logs: Vec<Value>,
    next_container: u64,
    /// Container records returned by list calls so far.
    rows_listed: std::sync::atomic::AtomicU64,
}

impl Store {
    pub fn new(cluster_id: &str, root_token: &str, max_dispatch_attempts: i64) -> Self {
        let mut s = Store {
            cluster_id: cluster_id.to_string(),
            max_dispatch_attempts,
            max_items_per_response: 1000,
            containers: BTreeMap::new(),
            tokens: HashMap::new(),
            state_changes: Vec::new(),
            logs: Vec::new(),
            next_container: 0,
            rows_listed: Default::default(),
        };
        let root = Token {
            uuid: format!("{cluster_id}-gj3su-000000000000000"),
            secret: root_token.to_string(),
            user_uuid: format!("{cluster_id}-tpzed-000000000000000"),
            admin: true,
            container_uuid: None,
            expired: false,
        };
        s.tokens.insert(root.secret.clone(), root);
        s
    }

    /// `n` random lowercase base-36 characters, as in Arvados UUIDs and token secrets.
    fn random_base36(n: usize) -> String {
        const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut rng = rand::rng();
        (0..n)
            .map(|_| char::from(DIGITS[rng.random_range(0..DIGITS.len())]))
            .collect()
    }

    fn random_suffix() -> String {
        Self::random_base36(15)
    }

    /// Add a token; returns it (its v2 form is `v2/<uuid>/<secret>`).
    pub fn add_token(&mut self, admin: bool, container_uuid: Option<String>) -> Token {
        let uuid = format!("{}-gj3su-{}", self.cluster_id, Self::random_suffix());
        let secret = Self::random_base36(40);
        let user_uuid = if admin {
            format!("{}-tpzed-000000000000000", self.cluster_id)
        } else {
            format!("{}-tpzed-{}", self.cluster_id, Self::random_suffix())
        };
        let t = Token {
            uuid,
            secret,
            user_uuid,
            admin,
            container_uuid,
            expired: false,
        };
        self.tokens.insert(t.secret.clone(), t.clone());
        t
    }

    /// Resolve a presented token (v1 secret, `v2/uuid/secret`, or container-bound
    /// `v2/uuid/secret/container_uuid`).
    pub fn authenticate(&self, presented: &str) -> Option<Caller> {
        let parts: Vec<&str> = presented.split('/').collect();
        let (secret, want_uuid, bound) = match parts.as_slice() {
            ["v2", uuid, secret] => (*secret, Some(*uuid), None),
            ["v2", uuid, secret, ctr] => (*secret, Some(*uuid), Some(*ctr)),
            _ => (presented, None, None),
        };
        // A keyed lookup: every lock adds a token, so a scan would grow with the workload.
        // (This is a test double; timing side channels are not a concern here.)
        let t = self.tokens.get(secret)?;
        if t.expired || want_uuid.is_some_and(|u| u != t.uuid) {
            return None;
        }
        if let Some(ctr) = bound {
            // Valid only for the container's own token while it is Locked or Running.
            let rec = self.containers.get(ctr)?;
            let live = matches!(rec["state"].as_str(), Some("Locked" | "Running"));
            if !live || t.container_uuid.as_deref() != Some(ctr) {
                return None;
            }
        }
        Some(Caller { token: t.clone() })
    }

    /// Create a container from a full or partial record (test hook). Missing fields get
    /// Rails' defaults; `uuid` is assigned unless given.
    pub fn create_container(&mut self, mut fields: Map<String, Value>) -> String {
        let uuid = match fields
            .remove("uuid")
            .and_then(|u| u.as_str().map(str::to_string))
        {
            Some(u) => u,
            None => {
                self.next_container += 1;
                format!("{}-dz642-{:015}", self.cluster_id, self.next_container)
            }
        };
        let t = now();
        let system_user = format!("{}-tpzed-000000000000000", self.cluster_id);
        let mut rec = json!({
            "uuid": uuid,
            "etag": "",
            "owner_uuid": system_user,
            "created_at": t,
            "modified_at": t,
            "modified_by_user_uuid": system_user,
            "state": "Queued",
            "priority": 1,
            "locked_by_uuid": null,
            "lock_count": 0,
            "auth_uuid": null,
            "runtime_user_uuid": system_user,
            "runtime_auth_scopes": ["all"],
            "command": ["echo", "hello"],
            "container_image": "d41d8cd98f00b204e9800998ecf8427e+0",
            "cwd": ".",
            "environment": {},
            "mounts": {},
            "output_path": "/out",
            "output_glob": [],
            "output": null,
            "output_storage_classes": ["default"],
            "output_properties": {},
            "log": null,
            "runtime_constraints": {"API": false, "ram": 1 << 30, "vcpus": 1, "keep_cache_ram": 0, "keep_cache_disk": 0,
                "gpu": {"device_count": 0, "driver_version": "", "hardware_target": [], "stack": "", "vram": 0}},
            "scheduling_parameters": {"max_run_time": 0, "partitions": [], "preemptible": false, "supervisor": false},
            "runtime_status": {},
            "progress": 0.0,
            "exit_code": null,
            "started_at": null,
            "finished_at": null,
            "gateway_address": null,
            "interactive_session_started": false,
            "cost": 0.0,
            "subrequests_cost": 0.0,
            "service": false,
            "published_ports": {},
        });
        let obj = rec.as_object_mut().expect("object literal");
        for (k, v) in fields {
            match (obj.get_mut(&k), v) {
                // Nested objects with defaults merge one level deep.
                (Some(Value::Object(base)), Value::Object(over))
                    if k == "runtime_constraints" || k == "scheduling_parameters" =>
                {
                    base.extend(over);
                }
                (_, v) => {
                    obj.insert(k, v);
                }
            }
        }
        let rec = rec.as_object().expect("object").clone();
        self.containers.insert(uuid.clone(), rec);
        uuid
    }

    /// The stored record, all fields (test hook).
    pub fn container(&self, uuid: &str) -> Option<&Map<String, Value>> {
        self.containers.get(uuid)
    }

    pub fn container_uuids(&self) -> Vec<String> {
        self.containers.keys().cloned().collect()
    }

    pub fn state_changes(&self) -> &[StateChange] {
        &self.state_changes
    }

    pub fn logs(&self) -> &[Value] {
        &self.logs
    }

    /// Set a container's priority without touching its state (test hook, like cancelling
    /// every request for it when `priority` is 0).
    pub fn set_priority(&mut self, uuid: &str, priority: i64) -> bool {
        match self.containers.get_mut(uuid) {
            Some(rec) => {
                rec.insert("priority".into(), Value::from(priority));
                rec.insert("modified_at".into(), Value::from(now()));
                true
            }
            None => false,
        }
    }

    /// Force a container's fields without any rule check (test hook for odd situations).
    pub fn force_update(&mut self, uuid: &str, fields: Map<String, Value>) -> bool {
        let Some(rec) = self.containers.get_mut(uuid) else {
            return false;
        };
        let from = rec["state"].as_str().unwrap_or("").to_string();
        rec.extend(fields);
        let to = rec["state"].as_str().unwrap_or("").to_string();
        if from != to {
            self.state_changes.push(StateChange {
                uuid: uuid.to_string(),
                from,
                to,
                by: "test-hook".into(),
                at: Utc::now(),
            });
        }
        true
    }

    fn can_see(&self, caller: &Caller, uuid: &str) -> bool {
        caller.token.admin || caller.token.container_uuid.as_deref() == Some(uuid)
    }

    /// Every container's state, in uuid order.
    pub fn container_states(&self) -> impl Iterator<Item = &str> {
        self.containers
            .values()
            .map(|r| r.get("state").and_then(Value::as_str).unwrap_or(""))
    }

    /// Container records returned by list calls so far.
    pub fn rows_listed(&self) -> u64 {
        self.rows_listed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `GET /arvados/v1/containers`.
    pub fn list(&self, caller: &Caller, params: &Map<String, Value>) -> Outcome {
        let null = Value::Null;
        let filters = filters::parse_filters(params.get("filters").unwrap_or(&null))
            .map_err(Failure::unprocessable)?;
        let order = filters::parse_order(params.get("order").unwrap_or(&null))
            .map_err(Failure::unprocessable)?;
        let select = parse_select(params.get("select"))?;
        let limit = match params.get("limit") {
            None | Some(Value::Null) => 100,
            Some(Value::Number(n)) if n.as_i64().is_some_and(|l| l >= 0) => n.as_i64().unwrap_or(0),
            Some(_) => return Err(Failure::unprocessable("Invalid value for limit parameter")),
        }
        .min(self.max_items_per_response);
        let offset = match params.get("offset") {
            None | Some(Value::Null) => 0,
            Some(Value::Number(n)) if n.as_i64().is_some_and(|o| o >= 0) => n.as_i64().unwrap_or(0),
            Some(_) => return Err(Failure::unprocessable("Invalid value for offset parameter")),
        };
        let count = match params.get("count") {
            None | Some(Value::Null) => "exact",
            Some(Value::String(s)) if s == "exact" || s == "none" => s.as_str(),
            Some(_) => {
                return Err(Failure::unprocessable(
                    "count parameter must be 'exact' or 'none'",
                ));
            }
        };
        let mut matching: Vec<&Map<String, Value>> = self
            .containers
            .values()
            .filter(|r| self.can_see(caller, r["uuid"].as_str().unwrap_or("")))
            .filter(|r| filters.iter().all(|f| f.matches(r)))
            .collect();
        let shown = (offset as usize).saturating_add(limit as usize);
        filters::sort_first(&mut matching, &order, select.as_deref(), shown);
        let total = matching.len();
        let items: Vec<Value> = matching
            .into_iter()
            .skip(offset as usize)
            .take(limit as usize)
            .map(|r| render(r, select.as_deref(), false))
            .collect();
        self.rows_listed
            .fetch_add(items.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut out = json!({
            "kind": "arvados#containerList",
            "etag": "",
            "self_link": "",
            "offset": offset,
            "limit": limit,
            "items": items,
        });
        if count == "exact" {
            out["items_available"] = Value::from(total);
        }
        Ok(out)
    }

    /// `GET /arvados/v1/containers/{uuid}`.
    pub fn get(&self, caller: &Caller, uuid: &str, params: &Map<String, Value>) -> Outcome {
        let select = parse_select(params.get("select"))?;
        let rec = self.visible(caller, uuid)?;
        Ok(render(rec, select.as_deref(), true))
    }

    fn visible(&self, caller: &Caller, uuid: &str) -> Result<&Map<String, Value>, Failure> {
        match self.containers.get(uuid) {
            Some(r) if self.can_see(caller, uuid) => Ok(r),
            _ => Err(Failure::not_found()),
        }
    }

    fn record_change(&mut self, uuid: &str, from: &str, to: &str, by: &str) {
        if from != to {
            self.state_changes.push(StateChange {
                uuid: uuid.to_string(),
                from: from.to_string(),
                to: to.to_string(),
                by: by.to_string(),
                at: Utc::now(),
            });
        }
    }

    fn expire_auth_token(&mut self, rec: &Map<String, Value>) {
        if let Some(auth) = rec.get("auth_uuid").and_then(Value::as_str) {
            for t in self.tokens.values_mut() {
                if t.uuid == auth {
                    t.expired = true;
                }
            }
        }
    }

    /// Queued → Locked, shared by `/lock` and `PUT state=Locked`.
    fn apply_lock(
        &mut self,
        caller: &Caller,
        uuid: &str,
        rec: &mut Map<String, Value>,
    ) -> Result<(), Failure> {
        let state = rec["state"].as_str().unwrap_or("").to_string();
        if state != "Queued" {
            return Err(Failure::unprocessable(format!("cannot lock when {state}")));
        }
        if rec["priority"].as_i64().unwrap_or(0) <= 0 {
            return Err(Failure::unprocessable("cannot lock when priority<=0"));
        }
        let auth = self.add_token(false, Some(uuid.to_string()));
        let count = rec["lock_count"].as_i64().unwrap_or(0) + 1;
        rec.insert("state".into(), "Locked".into());
        rec.insert("lock_count".into(), count.into());
        rec.insert("locked_by_uuid".into(), caller.token.uuid.clone().into());
        rec.insert("auth_uuid".into(), auth.uuid.into());
        Ok(())
    }

    /// Locked → Queued (or Cancelled at MaxDispatchAttempts), shared by `/unlock` and
    /// `PUT state=Queued`.
    fn apply_unlock(
        &mut self,
        caller: &Caller,
        rec: &mut Map<String, Value>,
    ) -> Result<(), Failure> {
        let state = rec["state"].as_str().unwrap_or("").to_string();
        if state != "Locked" {
            return Err(Failure::unprocessable(format!(
                "cannot unlock when {state}"
            )));
        }
        if rec["locked_by_uuid"].as_str() != Some(caller.token.uuid.as_str()) {
            return Err(Failure::new(403, "locked by a different token"));
        }
        self.expire_auth_token(rec);
        rec.insert("locked_by_uuid".into(), Value::Null);
        rec.insert("auth_uuid".into(), Value::Null);
        let count = rec["lock_count"].as_i64().unwrap_or(0);
        if count >= self.max_dispatch_attempts {
            rec.insert("state".into(), "Cancelled".into());
            rec.insert(
                "runtime_status".into(),
                json!({"error": format!("Failed to start container.  Cancelled after exceeding 'Containers.MaxDispatchAttempts' (lock_count={count})")}),
            );
            // As in Rails, finished_at is not filled on this path.
        } else {
            rec.insert("state".into(), "Queued".into());
            rec.insert("runtime_status".into(), json!({}));
        }
        Ok(())
    }

    /// `POST /arvados/v1/containers/{uuid}/lock`.
    pub fn lock(&mut self, caller: &Caller, uuid: &str) -> Outcome {
        let mut rec = self.visible(caller, uuid)?.clone();
        if !caller.token.admin {
            return Err(Failure::new(
                403,
                "PermissionDeniedError: cannot lock container",
            ));
        }
        let from = rec["state"].as_str().unwrap_or("").to_string();
        self.apply_lock(caller, uuid, &mut rec)?;
        self.commit(uuid, rec, &from, caller)
    }

    /// `POST /arvados/v1/containers/{uuid}/unlock`.
    pub fn unlock(&mut self, caller: &Caller, uuid: &str) -> Outcome {
        let mut rec = self.visible(caller, uuid)?.clone();
        if !caller.token.admin {
            return Err(Failure::new(
                403,
                "PermissionDeniedError: cannot unlock container",
            ));
        }
        let from = rec["state"].as_str().unwrap_or("").to_string();
        self.apply_unlock(caller, &mut rec)?;
        self.commit(uuid, rec, &from, caller)
    }

    fn commit(
        &mut self,
        uuid: &str,
        mut rec: Map<String, Value>,
        from: &str,
        caller: &Caller,
    ) -> Outcome {
        let to = rec["state"].as_str().unwrap_or("").to_string();
        rec.insert("modified_at".into(), now().into());
        rec.insert(
            "modified_by_user_uuid".into(),
            caller.token.user_uuid.clone().into(),
        );
        let out = render(&rec, None, true);
        self.containers.insert(uuid.to_string(), rec);
        self.record_change(uuid, from, &to, &caller.token.uuid);
        Ok(out)
    }

    /// `PUT/PATCH /arvados/v1/containers/{uuid}` with `container={…}`.
    pub fn update(&mut self, caller: &Caller, uuid: &str, params: &Map<String, Value>) -> Outcome {
        let select = parse_select(params.get("select"))?;
        let old = self.visible(caller, uuid)?.clone();
        let attrs = match params.get("container") {
            Some(Value::Object(m)) => m.clone(),
            None | Some(Value::Null) => Map::new(),
            Some(other) => {
                return Err(Failure::unprocessable(format!(
                    "Invalid value for container parameter: {other}"
                )));
            }
        };
        let old_state = old["state"].as_str().unwrap_or("").to_string();
        let own_token =
            old_state == "Running" && old["auth_uuid"].as_str() == Some(caller.token.uuid.as_str());
        if !caller.token.admin && !own_token {
            return Err(Failure::new(
                403,
                "PermissionDeniedError: cannot update container",
            ));
        }
        for k in attrs.keys() {
            if filters::column(k).is_none() || k == "etag" {
                return Err(Failure::unprocessable(format!(
                    "unknown attribute '{k}' for Container."
                )));
            }
        }
        check_types(&attrs)?;
        let new_state = match attrs.get("state") {
            None => old_state.clone(),
            Some(Value::String(s)) if STATES.contains(&s.as_str()) => s.clone(),
            Some(other) => {
                return Err(Failure::unprocessable(format!(
                    "State is not included in the list ({other})"
                )));
            }
        };
        if !transition_allowed(&old_state, &new_state) {
            return Err(Failure::unprocessable(format!(
                "State cannot change from {old_state} to {new_state}"
            )));
        }

        // Which attributes may change for this target state (A.2.3).
        let mut allowed: Vec<&str> = match (old_state.as_str(), new_state.as_str()) {
            (_, "Queued") => vec!["priority"],
            (_, "Locked") => vec!["priority", "runtime_status", "log", "lock_count"],
            (from, "Running") => {
                let mut a = vec!["priority", "output_properties", "gateway_address"];
                a.extend(PROGRESS_ATTRS);
                if from != "Running" {
                    a.push("started_at");
                }
                if old["interactive_session_started"] != Value::Bool(true) {
                    a.push("interactive_session_started");
                }
                a
            }
            ("Running", "Complete") | ("Running", "Cancelled") => {
                let mut a = vec!["finished_at"];
                a.extend(PROGRESS_ATTRS);
                a
            }
            ("Queued" | "Locked", "Cancelled") => {
                vec!["finished_at", "log", "runtime_status", "cost"]
            }
            _ => vec![],
        };
        if own_token {
            allowed.retain(|a| *a != "log" && *a != "priority");
        }
        let holder = old["locked_by_uuid"].as_str().unwrap_or("");
        if !holder.is_empty() && holder != caller.token.uuid {
            allowed.retain(|a| !PROGRESS_ATTRS.contains(a));
        }

        // locked_by_uuid may only be sent as the value the server computes anyway.
        let computed_locked_by = match new_state.as_str() {
            "Locked" if old_state == "Queued" => Value::from(caller.token.uuid.clone()),
            "Locked" | "Running" => old["locked_by_uuid"].clone(),
            _ => Value::Null,
        };
        for (k, v) in &attrs {
            match k.as_str() {
                "state" => continue,
                "locked_by_uuid" => {
                    if !same(v, &computed_locked_by) {
                        return Err(Failure::unprocessable(format!(
                            "Locked by uuid can only change to {}",
                            computed_locked_by.as_str().unwrap_or("nil")
                        )));
                    }
                }
                "auth_uuid" => {
                    if !same(v, &old["auth_uuid"]) {
                        return Err(Failure::unprocessable("Auth uuid is readonly"));
                    }
                }
                _ => {
                    if !same(v, old.get(k).unwrap_or(&Value::Null))
                        && !allowed.contains(&k.as_str())
                    {
                        return Err(Failure::unprocessable(format!(
                            "{} cannot be modified in state '{}' ({}, {})",
                            humanize(k),
                            new_state,
                            ruby_inspect(old.get(k).unwrap_or(&Value::Null)),
                            ruby_inspect(v)
                        )));
                    }
                }
            }
        }

        let mut rec = old.clone();
        if old_state == "Queued" && new_state == "Locked" {
            self.apply_lock(caller, uuid, &mut rec)?;
        } else if old_state == "Locked" && new_state == "Queued" {
            self.apply_unlock(caller, &mut rec)?;
        } else {
            rec.insert("state".into(), new_state.clone().into());
        }
        let final_state = rec["state"].as_str().unwrap_or("").to_string();
        for (k, v) in attrs {
            if k == "state" || k == "locked_by_uuid" || k == "auth_uuid" {
                continue;
            }
            // runtime_status is replaced wholesale, never merged.
            rec.insert(k, v);
        }
        if final_state == "Running" && old_state != "Running" && rec["started_at"].is_null() {
            rec.insert("started_at".into(), now().into());
        }
        let became_final =
            matches!(final_state.as_str(), "Complete" | "Cancelled") && old_state != final_state;
        // Unlock-turned-cancel keeps finished_at empty, as Rails does.
        let via_unlock = old_state == "Locked" && new_state == "Queued";
        if became_final && !via_unlock && rec["finished_at"].is_null() {
            rec.insert("finished_at".into(), now().into());
        }
        if !matches!(final_state.as_str(), "Locked" | "Running") {
            if !old["auth_uuid"].is_null() {
                self.expire_auth_token(&old);
            }
            rec.insert("locked_by_uuid".into(), Value::Null);
            rec.insert("auth_uuid".into(), Value::Null);
        }
        let full = self.commit(uuid, rec, &old_state, caller)?;
        Ok(match select {
            Some(sel) => render(full.as_object().expect("object"), Some(&sel), true),
            None => full,
        })
    }

    /// `GET /arvados/v1/containers/{uuid}/auth`: the per-container token, lock holder only.
    pub fn container_auth(&self, caller: &Caller, uuid: &str) -> Outcome {
        let rec = self.visible(caller, uuid)?;
        if rec["locked_by_uuid"].as_str() != Some(caller.token.uuid.as_str()) {
            return Err(Failure::new(403, "Not locked by your token"));
        }
        let auth_uuid = rec["auth_uuid"].as_str().unwrap_or("");
        let t = self
            .tokens
            .values()
            .find(|t| t.uuid == auth_uuid && !t.expired)
            .ok_or_else(Failure::not_found)?;
        Ok(token_json(t))
    }

    /// `GET /arvados/v1/containers/{uuid}/secret_mounts`, container token only.
    pub fn secret_mounts(&self, caller: &Caller, uuid: &str) -> Outcome {
        if caller.token.container_uuid.as_deref() != Some(uuid) {
            return Err(Failure::new(
                403,
                "Token is not associated with this container",
            ));
        }
        Ok(json!({"secret_mounts": {}}))
    }

    /// `POST /arvados/v1/logs`.
    pub fn create_log(&mut self, caller: &Caller, params: &Map<String, Value>) -> Outcome {
        let Some(Value::Object(log)) = params.get("log") else {
            return Err(Failure::unprocessable("log parameter must be an object"));
        };
        let mut rec = json!({
            "kind": "arvados#log",
            "uuid": format!("{}-57u5n-{}", self.cluster_id, Self::random_suffix()),
            "owner_uuid": caller.token.user_uuid,
            "object_uuid": log.get("object_uuid").cloned().unwrap_or(Value::Null),
            "event_type": log.get("event_type").cloned().unwrap_or(Value::Null),
            "properties": log.get("properties").cloned().unwrap_or(json!({})),
            "created_at": now(),
        });
        rec["summary"] = log.get("summary").cloned().unwrap_or(Value::Null);
        self.logs.push(rec.clone());
        Ok(rec)
    }
}

pub fn token_json(t: &Token) -> Value {
    json!({
        "kind": "arvados#apiClientAuthorization",
        "etag": "",
        "uuid": t.uuid,
        "owner_uuid": t.user_uuid,
        "api_token": t.secret,
        "created_by_ip_address": null,
        "expires_at": null,
        "last_used_at": null,
        "last_used_by_ip_address": null,
        "scopes": ["all"],
        "created_at": null,
        "modified_at": null,
        "modified_by_user_uuid": null,
    })
}

fn parse_select(v: Option<&Value>) -> Result<Option<Vec<String>>, Failure> {
    let list = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(Failure::unprocessable(format!(
                "Invalid value for select parameter: {other}"
            )));
        }
    };
    let mut out = Vec::new();
    for item in list {
        let name = item.as_str().unwrap_or_default();
        if name != "kind" && filters::column(name).is_none() {
            return Err(Failure::unprocessable(format!(
                "Invalid attribute '{}' of Container in select parameter",
                item.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| item.to_string())
            )));
        }
        out.push(name.to_string());
    }
    Ok(Some(out))
}

/// Render a record as the API shows it: `kind` always; `etag` too for single records.
fn render(rec: &Map<String, Value>, select: Option<&[String]>, single: bool) -> Value {
    let mut out = Map::new();
    out.insert("kind".into(), "arvados#container".into());
    if single {
        out.insert(
            "etag".into(),
            rec.get("etag").cloned().unwrap_or_else(|| "".into()),
        );
    }
    for (attr, _) in CONTAINER_ATTRS {
        if select.is_none_or(|s| s.iter().any(|x| x == attr)) {
            out.insert(
                (*attr).into(),
                rec.get(*attr).cloned().unwrap_or(Value::Null),
            );
        }
    }
    Value::Object(out)
}

/// Rails counts null, `[]` and `{}` as the same "empty" value when deciding what changed.
fn same(a: &Value, b: &Value) -> bool {
    fn empty(v: &Value) -> bool {
        match v {
            Value::Null => true,
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b || (empty(a) && empty(b)),
    }
}

fn humanize(attr: &str) -> String {
    let s = attr.replace('_', " ");
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => s,
    }
}

fn ruby_inspect(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        other => other.to_string(),
    }
}

/// Type checks Rails would make on the attributes a dispatcher or crunch-run sends.
fn check_types(attrs: &Map<String, Value>) -> Result<(), Failure> {
    for (k, v) in attrs {
        let col = filters::column(k).unwrap_or(Column::Json);
        let ok = match col {
            _ if v.is_null() => true,
            Column::Integer => v.as_i64().is_some(),
            Column::Float => v.is_number(),
            Column::Bool => v.is_boolean(),
            Column::Text => v.is_string(),
            Column::Time => v
                .as_str()
                .is_some_and(|s| DateTime::parse_from_rfc3339(s).is_ok()),
            Column::Json => true,
        };
        if !ok {
            return Err(Failure::unprocessable(format!(
                "{} has an invalid value {v}",
                humanize(k)
            )));
        }
        if k == "priority" && v.as_i64().is_some_and(|p| p < 0) {
            return Err(Failure::unprocessable(
                "Priority must be greater than or equal to 0",
            ));
        }
        if k == "runtime_status" {
            match v {
                Value::Object(m) => {
                    for key in RUNTIME_STATUS_STRING_KEYS {
                        if m.get(*key).is_some_and(|x| !x.is_string()) {
                            return Err(Failure::unprocessable(format!(
                                "Runtime status '{key}' value must be a string"
                            )));
                        }
                    }
                }
                Value::Null => {}
                _ => return Err(Failure::unprocessable("Runtime status must be a hash")),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Store, Caller) {
        let s = Store::new("zzzzz", "root-token", 3);
        let c = s.authenticate("root-token").unwrap();
        (s, c)
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn lock_unlock_and_max_dispatch_attempts() {
        let (mut s, root) = setup();
        let u = s.create_container(Map::new());
        for attempt in 1..=3 {
            let r = s.lock(&root, &u).unwrap();
            assert_eq!(r["state"], "Locked");
            assert_eq!(r["locked_by_uuid"], "zzzzz-gj3su-000000000000000");
            assert_eq!(r["lock_count"], attempt);
            let r = s.unlock(&root, &u).unwrap();
            if attempt < 3 {
                assert_eq!(r["state"], "Queued");
                assert_eq!(r["locked_by_uuid"], Value::Null);
                assert_eq!(r["runtime_status"], json!({}));
            } else {
                assert_eq!(r["state"], "Cancelled");
                assert_eq!(
                    r["runtime_status"]["error"],
                    "Failed to start container.  Cancelled after exceeding 'Containers.MaxDispatchAttempts' (lock_count=3)"
                );
            }
        }
        let e = s.lock(&root, &u).unwrap_err();
        assert_eq!(e, Failure::new(422, "cannot lock when Cancelled"));
    }

    #[test]
    fn put_state_queued_follows_unlock_rules() {
        let (mut s, root) = setup();
        let u = s.create_container(Map::new());
        s.lock(&root, &u).unwrap();
        let other = s.add_token(true, None);
        let other = s.authenticate(&other.secret).unwrap();
        let e = s
            .update(&other, &u, &obj(json!({"container": {"state": "Queued"}})))
            .unwrap_err();
        assert_eq!(e.status, 403);
        // Another admin may not write progress attributes of a locked container…
        let e = s
            .update(
                &other,
                &u,
                &obj(json!({"container": {"runtime_status": {"error": "x"}}})),
            )
            .unwrap_err();
        assert_eq!(e.status, 422);
        assert!(
            e.message
                .starts_with("Runtime status cannot be modified in state 'Locked'"),
            "{}",
            e.message
        );
        // …but may cancel it.
        let r = s
            .update(
                &other,
                &u,
                &obj(json!({"container": {"state": "Cancelled"}})),
            )
            .unwrap();
        assert_eq!(r["state"], "Cancelled");
        assert_eq!(r["locked_by_uuid"], Value::Null);
        assert!(r["finished_at"].is_string());
    }

    #[test]
    fn runtime_status_is_replaced_and_type_checked() {
        let (mut s, root) = setup();
        let u = s.create_container(Map::new());
        let e = s
            .update(
                &root,
                &u,
                &obj(json!({"container": {"runtime_status": {"error": "x"}}})),
            )
            .unwrap_err();
        assert_eq!(e.status, 422, "runtime_status may not change while Queued");
        s.lock(&root, &u).unwrap();
        s.update(
            &root,
            &u,
            &obj(json!({"container": {"runtime_status": {"error": "x", "other": 1}}})),
        )
        .unwrap();
        let r = s
            .update(
                &root,
                &u,
                &obj(json!({"container": {"runtime_status": {"warning": "w"}}})),
            )
            .unwrap();
        assert_eq!(r["runtime_status"], json!({"warning": "w"}));
        let e = s
            .update(
                &root,
                &u,
                &obj(json!({"container": {"runtime_status": {"error": 5}}})),
            )
            .unwrap_err();
        assert_eq!(e.message, "Runtime status 'error' value must be a string");
    }

    #[test]
    fn running_and_complete_fill_timestamps() {
        let (mut s, root) = setup();
        let u = s.create_container(Map::new());
        s.lock(&root, &u).unwrap();
        let r = s
            .update(&root, &u, &obj(json!({"container": {"state": "Running"}})))
            .unwrap();
        assert!(r["started_at"].is_string());
        assert!(r["finished_at"].is_null());
        let r = s
            .update(
                &root,
                &u,
                &obj(json!({"container": {"state": "Complete", "exit_code": 3}})),
            )
            .unwrap();
        assert!(r["finished_at"].is_string());
        assert_eq!(r["exit_code"], 3);
        assert_eq!(r["locked_by_uuid"], Value::Null);
        let changes: Vec<_> = s
            .state_changes()
            .iter()
            .map(|c| (c.from.as_str(), c.to.as_str()))
            .collect();
        assert_eq!(
            changes,
            [
                ("Queued", "Locked"),
                ("Locked", "Running"),
                ("Running", "Complete")
            ]
        );
    }

    #[test]
    fn container_token_is_bound_to_its_container() {
        let (mut s, root) = setup();
        let u = s.create_container(Map::new());
        s.lock(&root, &u).unwrap();
        let auth = s.container_auth(&root, &u).unwrap();
        let full = format!(
            "v2/{}/{}/{}",
            auth["uuid"].as_str().unwrap(),
            auth["api_token"].as_str().unwrap(),
            u
        );
        let me = s.authenticate(&full).expect("valid while Locked");
        assert!(s.secret_mounts(&me, &u).is_ok());
        assert!(
            s.authenticate("v2/zzzzz-gj3su-000000000000000/wrong")
                .is_none()
        );
        s.unlock(&root, &u).unwrap();
        assert!(s.authenticate(&full).is_none(), "expired after unlock");
    }
}
