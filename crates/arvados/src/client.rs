//! The Arvados API client a dispatcher needs (reqwest + rustls).
//!
//! Owns request encoding exactly as the Go SDK sends it (`arvados-api-contract.md` A.3.1):
//! form-encoded parameters whose non-string values are compact JSON, `false` and null omitted,
//! GET turned into POST with `X-Http-Method-Override: GET` once the query reaches 1000
//! characters; success is 200 (or an empty 204) only; errors carry the status and the server's
//! `errors` array; the time of the last 503 is recorded for the scheduler.
//!
//! Every request has a deadline ([`ClientConfig::timeout`], from `API.RequestTimeout`), which
//! covers connecting, sending, waiting and reading the body, and every retry. Only reads (GET)
//! are retried, on connection errors, timeouts of one attempt, 429 and 5xx except 501, with
//! "nearly full jitter" exponential back-off as Arvados' Go SDK does (a 503 or 429 waits at
//! least a second, or what `Retry-After` says). Writes (lock, unlock, update) are never
//! retried here: a lock that was applied before a 5xx would come back as a 422, so the
//! dispatcher recovers those at the application level, as the Go one does.
//! The token is sent only in the `Authorization` header and never appears in errors or logs.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use reqwest::Method;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Serialize, Serializer};
use serde_json::Value;
use url::Url;

use crate::config::Cluster;
use crate::types::{ApiClientAuthorization, Container, ContainerList};

/// Queries at least this long go in a POST body with `X-Http-Method-Override: GET`.
pub const MAX_QUERY_LEN: usize = 1000;

/// How to reach the API.
#[derive(Clone)]
pub struct ClientConfig {
    /// Base URL of the controller, e.g. `https://zzzzz.example.com/`.
    pub base_url: Url,
    /// The API token sent with every request (never logged, never in an error).
    pub token: String,
    /// Skip TLS certificate verification.
    pub insecure: bool,
    /// Deadline of one call, retries included; `None` waits as long as the server takes.
    pub timeout: Option<Duration>,
    /// Retries of idempotent (GET) requests.
    pub retry: RetryPolicy,
}

/// How reads are retried (writes never are).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// The shortest wait between attempts, and the unit of the exponential back-off.
    pub min_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// No retries.
    pub const NONE: RetryPolicy = RetryPolicy {
        max_attempts: 1,
        min_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(1),
    };

    /// The dispatcher's policy: a few quick retries, since the queue is polled again soon.
    pub fn for_timeout(timeout: Duration) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            min_backoff: Duration::from_millis(500).min(timeout / 4),
            max_backoff: (timeout / 10).clamp(Duration::from_millis(500), Duration::from_secs(30)),
        }
    }

    /// The wait before attempt `attempt + 1` (`attempt` ≥ 1 attempts made): "nearly full
    /// jitter", `min + r × (2^attempt × min − min)` with `r` in [0, 1), clamped to
    /// [min, max]; `floor` (a 503/429's one second or its `Retry-After`) raises it.
    pub fn backoff(&self, attempt: u32, r: f64, floor: Option<Duration>) -> Duration {
        let min = self.min_backoff.as_secs_f64();
        let span = (2f64.powi(attempt.min(30) as i32) * min - min).max(0.0);
        let d = Duration::from_secs_f64((min + r.clamp(0.0, 1.0) * span).max(0.0));
        let d = d.max(floor.unwrap_or_default());
        d.clamp(self.min_backoff, self.max_backoff.max(self.min_backoff))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::NONE
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url.as_str())
            .field("token", &"[redacted]")
            .field("insecure", &self.insecure)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

impl ClientConfig {
    /// The dispatcher's client: `Services.Controller.ExternalURL`, `SystemRootToken`,
    /// `TLS.Insecure`; each call's deadline is `API.RequestTimeout` (but at most
    /// [`MAX_DISPATCHER_TIMEOUT`]: a scheduler must not wait five minutes on one call), reads
    /// retried within it.
    pub fn from_cluster(cluster: &Cluster) -> Result<Self, ApiError> {
        let ext = &cluster.services.controller.external_url;
        if ext.is_empty() {
            return Err(ApiError::Config(
                "Services.Controller.ExternalURL is not set".into(),
            ));
        }
        let timeout = dispatcher_timeout(cluster.api.request_timeout);
        let base_url = Url::parse(ext).map_err(|e| {
            ApiError::Config(format!("Services.Controller.ExternalURL {ext:?}: {e}"))
        })?;
        Ok(ClientConfig {
            base_url,
            token: cluster.system_root_token.clone(),
            insecure: cluster.tls.insecure,
            timeout: Some(timeout),
            retry: RetryPolicy::for_timeout(timeout),
        })
    }

    /// A client from `ARVADOS_API_HOST`, `ARVADOS_API_TOKEN` and `ARVADOS_API_HOST_INSECURE`.
    pub fn from_env() -> Result<Self, ApiError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// `from_env` with the variables supplied by `get` (testable without touching the process
    /// environment).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self, ApiError> {
        let var = |k: &str| get(k).filter(|v| !v.is_empty());
        let host = var("ARVADOS_API_HOST")
            .ok_or_else(|| ApiError::Config("ARVADOS_API_HOST is not set".into()))?;
        let token = var("ARVADOS_API_TOKEN")
            .ok_or_else(|| ApiError::Config("ARVADOS_API_TOKEN is not set".into()))?;
        Ok(ClientConfig {
            base_url: api_host_url(&host)?,
            token,
            insecure: var("ARVADOS_API_HOST_INSECURE").is_some_and(|v| is_truthy(&v)),
            // Arvados' SDK default for clients built from the environment.
            timeout: Some(Duration::from_secs(300)),
            retry: RetryPolicy::for_timeout(Duration::from_secs(300)),
        })
    }
}

/// The longest deadline the dispatcher gives one API call, whatever `API.RequestTimeout` says.
pub const MAX_DISPATCHER_TIMEOUT: Duration = Duration::from_secs(60);

/// `API.RequestTimeout` as the dispatcher uses it: 0 means Arvados' default (5 min), and it
/// is capped at [`MAX_DISPATCHER_TIMEOUT`].
pub fn dispatcher_timeout(request_timeout: Duration) -> Duration {
    let t = if request_timeout.is_zero() {
        Duration::from_secs(300)
    } else {
        request_timeout
    };
    t.min(MAX_DISPATCHER_TIMEOUT)
}

/// `ARVADOS_API_HOST` → base URL: `host:port` means https; an explicit `http://` or
/// `https://` URL is used as given (local fakes use plain http).
pub fn api_host_url(host: &str) -> Result<Url, ApiError> {
    let text = if host.starts_with("http://") || host.starts_with("https://") {
        host.to_string()
    } else {
        format!("https://{host}/")
    };
    Url::parse(&text).map_err(|e| ApiError::Config(format!("ARVADOS_API_HOST {host:?}: {e}")))
}

fn is_truthy(v: &str) -> bool {
    matches!(
        v.to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on" | "t" | "y"
    )
}

/// What went wrong with a request. `Display` never contains the token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The client cannot be built (bad URL, missing variable, TLS setup).
    #[error("API client configuration: {0}")]
    Config(String),
    /// No HTTP response: connection refused or reset, DNS, TLS, or the deadline passed.
    #[error("request failed: {method} {url}: {message}")]
    Transport {
        /// The HTTP method.
        method: String,
        /// The request URL (without the token).
        url: String,
        /// What went wrong.
        message: String,
    },
    /// Any non-success HTTP status; `errors` is the server's `errors` array (may be empty, as
    /// for overload 503s).
    #[error("request failed: {method} {url}: {status}{}", errors_suffix(.errors))]
    Http {
        /// The HTTP method.
        method: String,
        /// The request URL (without the token).
        url: String,
        /// The response status.
        status: StatusCode,
        /// The `errors` array of the response body.
        errors: Vec<String>,
        /// The response's `Retry-After` (integer seconds), if any.
        retry_after: Option<Duration>,
    },
    /// A success status whose body is not the expected JSON.
    #[error("request failed: {method} {url}: cannot decode response: {message}")]
    Decode {
        /// The HTTP method.
        method: String,
        /// The request URL (without the token).
        url: String,
        /// The decoder's complaint.
        message: String,
        /// The body was JSON but a value had the wrong type (as opposed to a body that is not
        /// JSON at all, such as a proxy's HTML page): only this says the record is bad.
        type_error: bool,
    },
}

fn errors_suffix(errors: &[String]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!(": {}", errors.join("; "))
    }
}

impl ApiError {
    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Worth another try for a read: no answer (connection error or deadline), 429, or a 5xx
    /// other than 501 (as Arvados' SDK decides).
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Transport { .. } => true,
            ApiError::Http { status, .. } => {
                *status == StatusCode::TOO_MANY_REQUESTS
                    || (status.is_server_error() && *status != StatusCode::NOT_IMPLEMENTED)
            }
            ApiError::Config(_) | ApiError::Decode { .. } => false,
        }
    }

    /// The least wait before retrying: a second after a 503 or 429 (the server is shedding
    /// load), or its `Retry-After`.
    fn backoff_floor(&self) -> Option<Duration> {
        match self {
            ApiError::Http {
                status,
                retry_after,
                ..
            } if *status == StatusCode::SERVICE_UNAVAILABLE
                || *status == StatusCode::TOO_MANY_REQUESTS =>
            {
                Some(retry_after.unwrap_or_default().max(Duration::from_secs(1)))
            }
            _ => None,
        }
    }

    /// The server's error messages (empty unless the server answered with some).
    pub fn errors(&self) -> &[String] {
        match self {
            ApiError::Http { errors, .. } => errors,
            _ => &[],
        }
    }
}

/// One filter triple `[attribute, operator, operand]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// The attribute, e.g. `state`.
    pub attr: String,
    /// The operator, e.g. `=`, `>`, `in`.
    pub op: String,
    /// The operand: a string, number, list…
    pub operand: Value,
}

impl Filter {
    /// A filter; it serialises as the API's `[attribute, operator, operand]` triple.
    ///
    /// ```
    /// use arvados::Filter;
    ///
    /// let f = Filter::new("state", "in", vec!["Locked", "Running"]);
    /// assert_eq!(
    ///     serde_json::to_string(&f).unwrap(),
    ///     r#"["state","in",["Locked","Running"]]"#
    /// );
    /// ```
    pub fn new(attr: &str, op: &str, operand: impl Into<Value>) -> Self {
        Filter {
            attr: attr.into(),
            op: op.into(),
            operand: operand.into(),
        }
    }
}

impl Serialize for Filter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (&self.attr, &self.op, &self.operand).serialize(s)
    }
}

/// `count` parameter of list calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// `count=exact`: the response says how many records match (`items_available`).
    Exact,
    /// `count=none`: no count (cheaper for the server).
    None,
}

/// Parameters of one list call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListOptions {
    /// Conditions every returned record meets (all of them).
    pub filters: Vec<Filter>,
    /// e.g. `"priority desc"` or `"uuid"`.
    pub order: Option<String>,
    /// Records per page (the server caps it at `API.MaxItemsPerResponse`).
    pub limit: Option<i64>,
    /// Records to skip.
    pub offset: Option<i64>,
    /// Attributes to return (all when `None`).
    pub select: Option<Vec<String>>,
    /// Whether to count matching records.
    pub count: Option<Count>,
}

impl ListOptions {
    fn to_params(&self) -> Vec<(&'static str, Value)> {
        let mut p = Vec::new();
        if self.count == Some(Count::None) {
            p.push(("count", Value::from("none")));
        } else if self.count == Some(Count::Exact) {
            p.push(("count", Value::from("exact")));
        }
        if !self.filters.is_empty() {
            p.push((
                "filters",
                serde_json::to_value(&self.filters).unwrap_or_default(),
            ));
        }
        if let Some(l) = self.limit {
            p.push(("limit", Value::from(l)));
        }
        if let Some(o) = self.offset {
            p.push(("offset", Value::from(o)));
        }
        if let Some(o) = &self.order {
            p.push(("order", Value::from(o.as_str())));
        }
        if let Some(s) = &self.select {
            p.push(("select", Value::from(s.clone())));
        }
        p
    }
}

/// Encode parameters the way the Go SDK does: strings raw, numbers as text, `true` as `true`,
/// `false` and null omitted, arrays and objects as compact JSON.
pub fn encode_params(params: &[(&str, Value)]) -> String {
    let mut ser = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        let text = match v {
            Value::Null | Value::Bool(false) => continue,
            Value::Bool(true) => "true".to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        ser.append_pair(k, &text);
    }
    ser.finish()
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    token: String,
    last_503: Mutex<Option<SystemTime>>,
    retry: RetryPolicy,
}

/// A cheap-to-clone handle on one API endpoint and token.
///
/// ```no_run
/// use arvados::{Client, ClientConfig, Count, Filter, ListOptions};
///
/// # async fn example() -> Result<(), arvados::ApiError> {
/// // ARVADOS_API_HOST and ARVADOS_API_TOKEN, as the Arvados SDKs read them.
/// let client = Client::new(ClientConfig::from_env()?)?;
/// let queued = client
///     .list_all_containers_by_uuid(&ListOptions {
///         filters: vec![
///             Filter::new("state", "=", "Queued"),
///             Filter::new("priority", ">", 0),
///         ],
///         count: Some(Count::None),
///         ..Default::default()
///     })
///     .await?;
/// for c in queued {
///     println!("{} wants {} VCPUs", c.uuid, c.runtime_constraints.vcpus);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Deadline of each call (clones made by [`Client::with_timeout`] differ only here).
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base.as_str())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `cfg`; it only fails on a bad TLS setup.
    pub fn new(cfg: ClientConfig) -> Result<Self, ApiError> {
        let connect = cfg
            .timeout
            .map_or(Duration::from_secs(30), |t| t.min(Duration::from_secs(30)));
        let http = reqwest::Client::builder()
            .connect_timeout(connect)
            // A peer that vanishes without closing is noticed by TCP keepalives.
            .tcp_keepalive(Duration::from_secs(30))
            .danger_accept_invalid_certs(cfg.insecure)
            .build()
            .map_err(|e| ApiError::Config(format!("building HTTP client: {e}")))?;
        let mut base = cfg.base_url;
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                token: cfg.token,
                last_503: Mutex::new(None),
                retry: cfg.retry,
            }),
            timeout: cfg.timeout,
        })
    }

    /// The same client (connection pool, token, 503 record) with another per-call deadline,
    /// for callers that must not wait as long as others.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            inner: self.inner.clone(),
            timeout: Some(timeout),
        }
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    /// When the last 503 response was received, if ever.
    pub fn last_503(&self) -> Option<SystemTime> {
        *self.inner.last_503.lock()
    }

    /// Send one request to `/arvados/v1/<path>` and decode a 200 response, within the
    /// client's deadline; a GET is retried as the module doc says.
    pub async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, Value)],
    ) -> Result<T, ApiError> {
        let started = tokio::time::Instant::now();
        let deadline = self.timeout.map(|t| started + t);
        let retry = if method == Method::GET {
            self.inner.retry
        } else {
            RetryPolicy::NONE
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let one = self.attempt::<T>(method.clone(), path, params);
            let result = match deadline {
                None => one.await,
                Some(d) => match tokio::time::timeout_at(d, one).await {
                    Ok(r) => r,
                    Err(_) => Err(ApiError::Transport {
                        method: method.to_string(),
                        url: self.shown_url(path),
                        message: format!(
                            "no answer within the {:?} deadline",
                            self.timeout.unwrap_or_default()
                        ),
                    }),
                },
            };
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if attempt >= retry.max_attempts || !err.is_retryable() {
                return Err(err);
            }
            let floor = err.backoff_floor();
            let wait = retry.backoff(attempt, jitter(), floor);
            if let Some(d) = deadline
                && tokio::time::Instant::now() + wait >= d
            {
                // No time for another attempt: the caller gets the last error.
                return Err(err);
            }
            tracing::debug!(error = %err, attempt, "retrying API request in {wait:?}");
            tokio::time::sleep(wait).await;
        }
    }

    fn shown_url(&self, path: &str) -> String {
        self.inner
            .base
            .join(&format!("arvados/v1/{path}"))
            .map(|u| u.to_string())
            .unwrap_or_else(|_| path.to_string())
    }

    /// One attempt, no deadline of its own.
    async fn attempt<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, Value)],
    ) -> Result<T, ApiError> {
        let url = self
            .inner
            .base
            .join(&format!("arvados/v1/{path}"))
            .map_err(|e| ApiError::Config(format!("bad request path {path:?}: {e}")))?;
        let encoded = encode_params(params);
        let method_name = method.to_string();
        let mut req_url = url.clone();
        let (wire_method, body, override_get) = if method == Method::GET {
            if encoded.len() < MAX_QUERY_LEN {
                if !encoded.is_empty() {
                    req_url.set_query(Some(&encoded));
                }
                (Method::GET, None, false)
            } else {
                (Method::POST, Some(encoded), true)
            }
        } else {
            (method, Some(encoded), false)
        };
        let mut rb = self
            .inner
            .http
            .request(wire_method, req_url)
            .bearer_auth(&self.inner.token)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("X-Request-Id", new_request_id());
        if override_get {
            rb = rb.header("X-Http-Method-Override", "GET");
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let shown_url = url.to_string();
        let transport = |e: reqwest::Error| ApiError::Transport {
            method: method_name.clone(),
            url: shown_url.clone(),
            message: error_chain(&e),
        };
        let resp = rb.send().await.map_err(transport)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = resp.bytes().await.map_err(transport)?;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            *self.inner.last_503.lock() = Some(SystemTime::now());
        }
        let success =
            status == StatusCode::OK || (status == StatusCode::NO_CONTENT && bytes.is_empty());
        if !success {
            return Err(ApiError::Http {
                method: method_name,
                url: shown_url,
                status,
                errors: error_messages(&bytes),
                retry_after,
            });
        }
        let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| ApiError::Decode {
            method: method_name,
            url: shown_url,
            message: e.to_string(),
            type_error: e.classify() == serde_json::error::Category::Data,
        })
    }

    /// `GET /arvados/v1/api_client_authorizations/current`: who this token is.
    pub async fn current_token(&self) -> Result<ApiClientAuthorization, ApiError> {
        self.request(Method::GET, "api_client_authorizations/current", &[])
            .await
    }

    /// One page of `GET /arvados/v1/containers`.
    pub async fn list_containers(&self, opts: &ListOptions) -> Result<ContainerList, ApiError> {
        self.request(Method::GET, "containers", &opts.to_params())
            .await
    }

    /// Every matching container, paging by `uuid` (`order=uuid`, each further page adds
    /// `["uuid",">",<last uuid>]`) until an empty page, as the dispatcher's "mine" and
    /// "missing" polls do. `opts.order` and `opts.offset` are overridden.
    pub async fn list_all_containers_by_uuid(
        &self,
        opts: &ListOptions,
    ) -> Result<Vec<Container>, ApiError> {
        Ok(self.list_all_containers_by_uuid_with_skipped(opts).await?.0)
    }

    /// [`Client::list_all_containers_by_uuid`], also returning the uuids of records that
    /// could not be decoded ([`ContainerList::skipped`]).
    pub async fn list_all_containers_by_uuid_with_skipped(
        &self,
        opts: &ListOptions,
    ) -> Result<(Vec<Container>, Vec<String>), ApiError> {
        let mut all = Vec::new();
        let mut skipped = Vec::new();
        let mut page_opts = opts.clone();
        page_opts.order = Some("uuid".into());
        page_opts.offset = None;
        loop {
            let page = self.list_containers(&page_opts).await?;
            // Page on the last record received, decoded or not.
            let last = page.last_uuid.filter(|u| !u.is_empty());
            all.extend(page.items);
            skipped.extend(page.skipped);
            let Some(last) = last else {
                return Ok((all, skipped));
            };
            page_opts.filters = opts.filters.clone();
            page_opts.filters.push(Filter::new("uuid", ">", last));
        }
    }

    /// Matching containers paged by `offset` in `opts.order` (e.g. `priority desc`), until an
    /// empty page or until `done` returns true for the items gathered so far.
    pub async fn list_containers_by_offset(
        &self,
        opts: &ListOptions,
        done: impl FnMut(&[Container]) -> bool,
    ) -> Result<Vec<Container>, ApiError> {
        Ok(self
            .list_containers_by_offset_with_skipped(opts, done)
            .await?
            .0)
    }

    /// [`Client::list_containers_by_offset`], also returning the uuids of records that could
    /// not be decoded.
    pub async fn list_containers_by_offset_with_skipped(
        &self,
        opts: &ListOptions,
        mut done: impl FnMut(&[Container]) -> bool,
    ) -> Result<(Vec<Container>, Vec<String>), ApiError> {
        let mut all: Vec<Container> = Vec::new();
        let mut skipped = Vec::new();
        let mut page_opts = opts.clone();
        let mut offset = opts.offset.unwrap_or(0);
        loop {
            page_opts.offset = Some(offset);
            let page = self.list_containers(&page_opts).await?;
            if page.raw_len == 0 {
                return Ok((all, skipped));
            }
            offset += page.raw_len as i64;
            all.extend(page.items);
            skipped.extend(page.skipped);
            if done(&all) {
                return Ok((all, skipped));
            }
        }
    }

    /// `GET /arvados/v1/containers/{uuid}`, optionally with `select`.
    pub async fn get_container(
        &self,
        uuid: &str,
        select: Option<&[&str]>,
    ) -> Result<Container, ApiError> {
        let mut p = Vec::new();
        if let Some(s) = select {
            p.push(("select", Value::from(s.to_vec())));
        }
        self.request(Method::GET, &format!("containers/{uuid}"), &p)
            .await
    }

    /// `POST /arvados/v1/containers/{uuid}/lock`.
    pub async fn lock_container(&self, uuid: &str) -> Result<Container, ApiError> {
        self.request(Method::POST, &format!("containers/{uuid}/lock"), &[])
            .await
    }

    /// `POST /arvados/v1/containers/{uuid}/unlock`.
    pub async fn unlock_container(&self, uuid: &str) -> Result<Container, ApiError> {
        self.request(Method::POST, &format!("containers/{uuid}/unlock"), &[])
            .await
    }

    /// `PUT /arvados/v1/containers/{uuid}` with `container=<attrs>` (e.g.
    /// `{"state":"Cancelled"}` or `{"runtime_status":{"error":"…"}}`); `select` limits the
    /// response (the Go SDK sends `["uuid"]` when it does not read the response).
    pub async fn update_container(
        &self,
        uuid: &str,
        attrs: &Value,
        select: Option<&[&str]>,
    ) -> Result<Container, ApiError> {
        let mut p = vec![("container", attrs.clone())];
        if let Some(s) = select {
            p.push(("select", Value::from(s.to_vec())));
        }
        self.request(Method::PUT, &format!("containers/{uuid}"), &p)
            .await
    }
}

/// `{"errors":["…"]}` → the messages; anything else → none (overload 503s have empty bodies).
fn error_messages(body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct E {
        #[serde(default)]
        errors: Vec<String>,
    }
    serde_json::from_slice::<E>(body)
        .map(|e| e.errors)
        .unwrap_or_default()
}

/// An error and its sources on one line, each source once (`a: b: c`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

/// A number in [0, 1) for back-off jitter (no need for a good generator).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// `req-` + 20 base-36 characters, as Arvados clients send.
fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut n = nanos
        ^ (u128::from(std::process::id()) << 64)
        ^ (u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) << 96);
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = String::from("req-");
    for _ in 0..20 {
        out.push(DIGITS[(n % 36) as usize] as char);
        n /= 36;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_go_sdk() {
        let p = [
            ("count", Value::from("none")),
            (
                "filters",
                serde_json::json!([["state", "=", "Queued"], ["priority", ">", "0"]]),
            ),
            ("limit", Value::from(1000)),
            ("order", Value::from("priority desc")),
            ("flag", Value::from(false)),
            ("other", Value::Null),
            ("yes", Value::from(true)),
        ];
        assert_eq!(
            encode_params(&p),
            "count=none&filters=%5B%5B%22state%22%2C%22%3D%22%2C%22Queued%22%5D%2C%5B%22priority%22%2C%22%3E%22%2C%220%22%5D%5D&limit=1000&order=priority+desc&yes=true"
        );
    }

    #[test]
    fn api_host_without_scheme_means_https() {
        assert_eq!(
            api_host_url("ctrl.example:443").unwrap().as_str(),
            "https://ctrl.example/"
        );
        assert_eq!(
            api_host_url("http://127.0.0.1:8000").unwrap().as_str(),
            "http://127.0.0.1:8000/"
        );
    }

    #[test]
    fn config_from_environment_variables() {
        let vars = |host: &'static str, insecure: Option<&'static str>| {
            move |k: &str| match k {
                "ARVADOS_API_HOST" => Some(host.to_string()),
                "ARVADOS_API_TOKEN" => Some("tok".to_string()),
                "ARVADOS_API_HOST_INSECURE" => insecure.map(str::to_string),
                _ => None,
            }
        };
        let c = ClientConfig::from_vars(vars("ctrl.example:8443", Some("true"))).unwrap();
        assert_eq!(c.base_url.as_str(), "https://ctrl.example:8443/");
        assert!(c.insecure);
        let c = ClientConfig::from_vars(vars("http://127.0.0.1:9", Some("0"))).unwrap();
        assert_eq!(c.base_url.as_str(), "http://127.0.0.1:9/");
        assert!(!c.insecure);
        assert!(!ClientConfig::from_vars(vars("h", None)).unwrap().insecure);
        let err = ClientConfig::from_vars(|_| None).unwrap_err().to_string();
        assert!(err.contains("ARVADOS_API_HOST is not set"), "{err}");
    }

    #[test]
    fn backoff_grows_with_jitter_and_respects_floor_and_bounds() {
        let p = RetryPolicy {
            max_attempts: 10,
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        };
        assert_eq!(p.backoff(1, 0.0, None), Duration::from_secs(1));
        assert_eq!(p.backoff(1, 0.999_999, None).as_secs(), 1);
        assert_eq!(p.backoff(3, 0.5, None), Duration::from_millis(4500));
        assert_eq!(p.backoff(30, 1.0, None), Duration::from_secs(30));
        assert_eq!(
            p.backoff(1, 0.0, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.backoff(1, 0.0, Some(Duration::from_secs(3600))),
            Duration::from_secs(30)
        );
        let r = jitter();
        assert!((0.0..1.0).contains(&r));
    }

    #[test]
    fn only_unanswered_429_and_5xx_but_501_are_retryable() {
        let http = |code: u16| ApiError::Http {
            method: "GET".into(),
            url: "u".into(),
            status: StatusCode::from_u16(code).unwrap(),
            errors: vec![],
            retry_after: None,
        };
        for c in [429, 500, 502, 503, 504] {
            assert!(http(c).is_retryable(), "{c}");
        }
        for c in [400, 401, 403, 404, 422, 501] {
            assert!(!http(c).is_retryable(), "{c}");
        }
        let t = ApiError::Transport {
            method: "GET".into(),
            url: "u".into(),
            message: "reset".into(),
        };
        assert!(t.is_retryable());
        assert_eq!(http(503).backoff_floor(), Some(Duration::from_secs(1)));
        assert_eq!(http(500).backoff_floor(), None);
    }

    #[test]
    fn dispatcher_deadline_comes_from_request_timeout_capped() {
        assert_eq!(dispatcher_timeout(Duration::ZERO), MAX_DISPATCHER_TIMEOUT);
        assert_eq!(
            dispatcher_timeout(Duration::from_secs(300)),
            MAX_DISPATCHER_TIMEOUT
        );
        assert_eq!(
            dispatcher_timeout(Duration::from_secs(2)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn request_ids_look_like_arvados_ones() {
        let a = new_request_id();
        assert_eq!(a.len(), 24);
        assert!(a.starts_with("req-"));
        assert_ne!(a, new_request_id());
    }

    #[test]
    fn error_display_has_status_and_messages_but_no_token() {
        let e = ApiError::Http {
            method: "POST".into(),
            url: "http://x/arvados/v1/containers/u/lock".into(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            errors: vec!["cannot lock when Locked".into()],
            retry_after: None,
        };
        assert_eq!(
            e.to_string(),
            "request failed: POST http://x/arvados/v1/containers/u/lock: 422 Unprocessable Entity: cannot lock when Locked"
        );
        let dbg = format!(
            "{:?}",
            ClientConfig {
                base_url: Url::parse("http://x/").unwrap(),
                token: "sekrit".into(),
                insecure: false,
                timeout: None,
                retry: RetryPolicy::NONE,
            }
        );
        assert!(!dbg.contains("sekrit"));
    }
}
