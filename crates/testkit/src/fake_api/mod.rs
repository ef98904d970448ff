//! A fake Arvados API server that speaks the real wire protocol (`arvados-api-contract.md`,
//! "Minimal fake API" checklist): token auth, container list/get/lock/unlock/update with Rails'
//! rules, the real discovery document, plus test hooks to create containers, change priority,
//! inject faults and read the log of state changes.
//!
//! Start it in-process with [`FakeArvados::start`], or as the `fake-arvados` binary.

mod filters;
mod params;
mod server;
mod store;
mod workload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Map, Value};

pub use store::{StateChange, format_time};
pub use workload::{ContainerSpec, generate_workload};

use server::App;

/// How to start a fake.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    pub cluster_id: String,
    /// The SystemRootToken: an admin token whose UUID is `<cluster>-gj3su-000000000000000`.
    pub root_token: String,
    /// `Containers.MaxDispatchAttempts`.
    pub max_dispatch_attempts: i64,
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Serve https with a freshly generated self-signed certificate.
    pub tls: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            cluster_id: "zzzzz".into(),
            root_token: "fake-system-root-token".into(),
            max_dispatch_attempts: 10,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: false,
        }
    }
}

/// What an injected fault does to a matching request.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// 503 with an empty body, before doing anything (overload).
    Unavailable,
    /// This status with a JSON error body, before doing anything.
    Status(u16),
    /// Wait, then handle the request normally.
    Delay(Duration),
    /// Handle the request (the change is applied), then answer this status with an empty body.
    StatusAfterApply(u16),
}

/// A fault rule: which requests it hits and how many times.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// Effective method (after `X-Http-Method-Override`), e.g. `POST`; `None` matches any.
    pub method: Option<String>,
    /// The request path must end with this (e.g. `/lock`); `None` matches any path.
    pub path_suffix: Option<String>,
    pub kind: FaultKind,
    /// How many requests it hits; `None` is unlimited.
    pub remaining: Option<usize>,
}

impl Fault {
    pub fn new(kind: FaultKind) -> Self {
        Fault {
            method: None,
            path_suffix: None,
            kind,
            remaining: Some(1),
        }
    }
    pub fn on(mut self, method: &str, path_suffix: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self.path_suffix = Some(path_suffix.to_string());
        self
    }
    pub fn times(mut self, n: usize) -> Self {
        self.remaining = Some(n);
        self
    }
    pub fn always(mut self) -> Self {
        self.remaining = None;
        self
    }
    fn matches(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && self
                .path_suffix
                .as_deref()
                .is_none_or(|s| path.ends_with(s))
            && self.remaining != Some(0)
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The HTTP method on the wire.
    pub wire_method: String,
    /// The method after `X-Http-Method-Override` / `_method`.
    pub method: String,
    pub path: String,
    pub query_len: usize,
    pub method_override: Option<String>,
    /// The decoded parameters (query, form or JSON body), e.g. `filters`, `order`.
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// A running fake API server. Dropping it stops the server.
pub struct FakeArvados {
    base_url: String,
    cfg: FakeConfig,
    app: Arc<App>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeArvados {
    /// Bind, start serving in the background, and return a handle.
    pub async fn start(cfg: FakeConfig) -> anyhow::Result<Self> {
        let std_listener = std::net::TcpListener::bind(cfg.listen)
            .with_context(|| format!("binding {}", cfg.listen))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let scheme = if cfg.tls { "https" } else { "http" };
        let base_url = format!("{scheme}://{addr}");
        let store = store::Store::new(&cfg.cluster_id, &cfg.root_token, cfg.max_dispatch_attempts);
        let app = Arc::new(App::new(store, &base_url));
        let router = axum::Router::new()
            .fallback(server::handle)
            .with_state(app.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = if cfg.tls {
            let tls = self_signed_tls().await?;
            let handle = axum_server::Handle::new();
            let h2 = handle.clone();
            tokio::spawn(async move {
                let _ = rx.await;
                h2.shutdown();
            });
            let server = axum_server::from_tcp_rustls(std_listener, tls)?.handle(handle);
            tokio::spawn(async move {
                if let Err(e) = server.serve(router.into_make_service()).await {
                    tracing::error!("fake-arvados TLS server: {e}");
                }
            })
        } else {
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = rx.await;
                };
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::error!("fake-arvados server: {e}");
                }
            })
        };
        Ok(FakeArvados {
            base_url,
            cfg,
            app,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT` (or https with `tls`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `127.0.0.1:PORT`, the form crunch-run gets in `ARVADOS_API_HOST`.
    pub fn api_host(&self) -> &str {
        self.base_url.split("://").nth(1).unwrap_or(&self.base_url)
    }

    pub fn cluster_id(&self) -> &str {
        &self.cfg.cluster_id
    }

    pub fn root_token(&self) -> &str {
        &self.cfg.root_token
    }

    /// The root token's UUID, which becomes `locked_by_uuid` when the dispatcher locks.
    pub fn root_token_uuid(&self) -> String {
        format!("{}-gj3su-000000000000000", self.cfg.cluster_id)
    }

    /// Add a container from a spec; returns its UUID.
    pub fn add_container(&self, spec: &ContainerSpec) -> String {
        self.app.store.lock().create_container(spec.to_fields())
    }

    /// Add a container from raw fields (merged over defaults); returns its UUID.
    pub fn add_container_fields(&self, fields: Value) -> String {
        let m = match fields {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        self.app.store.lock().create_container(m)
    }

    /// The full stored record.
    /// How many containers are in each state (one pass, no copies: cheap to ask often).
    pub fn count_by_state(&self) -> std::collections::BTreeMap<String, usize> {
        const STATES: [&str; 5] = ["Queued", "Locked", "Running", "Complete", "Cancelled"];
        let mut n = [0usize; STATES.len() + 1];
        let store = self.app.store.lock();
        for state in store.container_states() {
            n[STATES
                .iter()
                .position(|s| *s == state)
                .unwrap_or(STATES.len())] += 1;
        }
        let mut counts: std::collections::BTreeMap<String, usize> = STATES
            .iter()
            .zip(n)
            .filter(|(_, k)| *k > 0)
            .map(|(s, k)| (s.to_string(), k))
            .collect();
        if n[STATES.len()] > 0 {
            counts.insert("other".into(), n[STATES.len()]);
        }
        counts
    }

    pub fn container(&self, uuid: &str) -> Option<Value> {
        self.app
            .store
            .lock()
            .container(uuid)
            .cloned()
            .map(Value::Object)
    }

    pub fn container_uuids(&self) -> Vec<String> {
        self.app.store.lock().container_uuids()
    }

    /// Change priority without touching state (0 emulates "every request was cancelled").
    pub fn set_priority(&self, uuid: &str, priority: i64) -> bool {
        self.app.store.lock().set_priority(uuid, priority)
    }

    /// Overwrite fields with no rule checks (for situations the rules forbid).
    pub fn force_update(&self, uuid: &str, fields: Value) -> bool {
        match fields {
            Value::Object(m) => self.app.store.lock().force_update(uuid, m),
            _ => false,
        }
    }

    /// Create another token; returns its full v2 form `v2/<uuid>/<secret>`.
    pub fn add_token(&self, admin: bool) -> String {
        let t = self.app.store.lock().add_token(admin, None);
        format!("v2/{}/{}", t.uuid, t.secret)
    }

    /// Every state change so far, in order.
    /// Answer list calls with at most `n` records per page (`API.MaxItemsPerResponse`,
    /// default 1000).
    pub fn set_max_items_per_response(&self, n: i64) {
        self.app.store.lock().max_items_per_response = n.max(1);
    }

    /// Container records returned by list calls so far (what a queue poll costs the API).
    pub fn rows_listed(&self) -> u64 {
        self.app.store.lock().rows_listed()
    }

    pub fn state_changes(&self) -> Vec<StateChange> {
        self.app.store.lock().state_changes().to_vec()
    }

    /// Logs created through `POST /arvados/v1/logs`.
    pub fn logs(&self) -> Vec<Value> {
        self.app.store.lock().logs().to_vec()
    }

    pub fn inject_fault(&self, fault: Fault) {
        self.app.faults.lock().push(fault);
    }

    pub fn clear_faults(&self) {
        self.app.faults.lock().clear();
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.app.requests.lock().clone()
    }

    /// Stop serving and wait for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

impl Drop for FakeArvados {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn self_signed_tls() -> anyhow::Result<axum_server::tls_rustls::RustlsConfig> {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .context("generating a self-signed certificate")?;
    let cert = ck.cert.pem().into_bytes();
    let key = ck.signing_key.serialize_pem().into_bytes();
    axum_server::tls_rustls::RustlsConfig::from_pem(cert, key)
        .await
        .context("loading the self-signed certificate")
}
