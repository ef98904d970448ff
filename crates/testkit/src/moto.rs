//! `moto_server` (the EC2 API, from PyPI, installed in `.venv` by `scripts/test`) as a test
//! peer on 127.0.0.1, and an EC2 fault proxy in front of it that answers chosen calls with
//! EC2 error responses (moto cannot produce capacity, quota or throttling errors) and counts
//! every call.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// Where `scripts/test` installs moto (or `$MOTO_SERVER`).
pub fn moto_server_path() -> PathBuf {
    std::env::var_os("MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/moto_server")
        })
}

/// A running moto server. Dropping it stops it.
pub struct Moto {
    child: Child,
    pub url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Start moto on a free 127.0.0.1 port; `None` if it is not installed.
    pub async fn start() -> Option<Moto> {
        let bin = moto_server_path();
        if !bin.exists() {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let url = format!("http://127.0.0.1:{port}");
        let moto = Moto { child, url };
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = http.get(format!("{}/moto-api/", moto.url)).send().await
                && r.status().is_success()
            {
                return Some(moto);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("moto_server did not become ready");
    }
}

/// One injected EC2 error.
#[derive(Debug, Clone)]
pub struct Ec2Fault {
    /// The `Action` it applies to, e.g. `RunInstances`.
    pub action: String,
    /// Request parameters that must all match (e.g. `InstanceType` = `m5.large`).
    pub when: Vec<(String, String)>,
    pub code: String,
    pub message: String,
    pub status: u16,
    /// How many requests it hits; `None`: all.
    pub remaining: Option<usize>,
    /// A canned successful answer instead of an error (EC2 XML).
    pub reply: Option<String>,
}

impl Ec2Fault {
    pub fn new(action: &str, code: &str, message: &str) -> Ec2Fault {
        Ec2Fault {
            action: action.into(),
            when: Vec::new(),
            code: code.into(),
            message: message.into(),
            status: 400,
            remaining: None,
            reply: None,
        }
    }

    /// Answer `action` with this XML body (status 200) instead of asking moto.
    pub fn reply(action: &str, xml: &str) -> Ec2Fault {
        Ec2Fault {
            status: 200,
            reply: Some(xml.to_string()),
            ..Ec2Fault::new(action, "", "")
        }
    }

    /// Hit only the next matching request.
    pub fn once(mut self) -> Ec2Fault {
        self.remaining = Some(1);
        self
    }

    pub fn when(mut self, param: &str, value: &str) -> Ec2Fault {
        self.when.push((param.into(), value.into()));
        self
    }
}

#[derive(Default)]
struct ProxyState {
    faults: Vec<Ec2Fault>,
    calls: Vec<BTreeMap<String, String>>,
}

/// The fault proxy: point the EC2 driver's endpoint at [`FaultProxy::url`].
pub struct FaultProxy {
    pub url: String,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct App {
    upstream: String,
    http: reqwest::Client,
    state: Arc<Mutex<ProxyState>>,
}

async fn forward(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut params: BTreeMap<String, String> =
        url::form_urlencoded::parse(&body).into_owned().collect();
    if let Some(q) = uri.query() {
        params.extend(url::form_urlencoded::parse(q.as_bytes()).into_owned());
    }
    let action = params.get("Action").cloned().unwrap_or_default();
    let fault = {
        let mut st = app.state.lock();
        st.calls.push(params.clone());
        let hit = st.faults.iter_mut().find(|f| {
            f.action == action
                && f.remaining != Some(0)
                && f.when.iter().all(|(k, v)| params.get(k) == Some(v))
        });
        hit.map(|f| {
            if let Some(n) = &mut f.remaining {
                *n -= 1;
            }
            f.clone()
        })
    };
    if let Some(Ec2Fault {
        reply: Some(xml), ..
    }) = &fault
    {
        return (StatusCode::OK, [("content-type", "text/xml")], xml.clone()).into_response();
    }
    if let Some(f) = fault {
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>",
            f.code, f.message
        );
        return (
            StatusCode::from_u16(f.status).unwrap_or(StatusCode::BAD_REQUEST),
            [("content-type", "text/xml")],
            xml,
        )
            .into_response();
    }
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.upstream))
        .body(body);
    for (k, v) in headers.iter() {
        if k != "host" && k != "content-length" {
            req = req.header(k, v);
        }
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status();
            let ct = r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("text/xml")
                .to_string();
            let body = r.bytes().await.unwrap_or_default();
            (status, [("content-type", ct)], body).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let app = App {
            upstream: upstream.trim_end_matches('/').to_string(),
            http: reqwest::Client::new(),
            state: state.clone(),
        };
        let router = axum::Router::new().fallback(forward).with_state(app);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FaultProxy { url, state, task }
    }

    /// A cloneable handle for injecting faults and reading calls.
    pub fn handle(&self) -> FaultHandle {
        FaultHandle(self.state.clone())
    }

    pub fn inject(&self, f: Ec2Fault) {
        self.handle().inject(f)
    }

    pub fn clear(&self) {
        self.handle().clear()
    }

    /// Parameters of every call with this `Action`, in order.
    pub fn calls(&self, action: &str) -> Vec<BTreeMap<String, String>> {
        self.handle().calls(action)
    }
}

/// See [`FaultProxy::handle`].
#[derive(Clone)]
pub struct FaultHandle(Arc<Mutex<ProxyState>>);

impl FaultHandle {
    pub fn inject(&self, f: Ec2Fault) {
        self.0.lock().faults.push(f);
    }

    pub fn clear(&self) {
        self.0.lock().faults.clear();
    }

    pub fn calls(&self, action: &str) -> Vec<BTreeMap<String, String>> {
        self.0
            .lock()
            .calls
            .iter()
            .filter(|c| c.get("Action").map(String::as_str) == Some(action))
            .cloned()
            .collect()
    }
}

/// EC2's answer to `DescribeSpotInstanceRequests` (moto makes no spot requests): `instance`'s
/// request has status `code` (`marked-for-termination`: an interruption notice), updated at
/// 2026-12-01T09:00:00Z. For [`Ec2Fault::reply`].
pub fn spot_request_xml(instance: &str, code: &str) -> String {
    format!(
        r#"<DescribeSpotInstanceRequestsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>7a62c49f-347e-4fc4-9331-6e8eEXAMPLE</requestId>
  <spotInstanceRequestSet>
    <item>
      <spotInstanceRequestId>sir-1a2b3c4d</spotInstanceRequestId>
      <state>active</state>
      <status>
        <code>{code}</code>
        <updateTime>2026-12-01T09:00:00.000Z</updateTime>
        <message>Spot status {code}</message>
      </status>
      <instanceId>{instance}</instanceId>
    </item>
  </spotInstanceRequestSet>
</DescribeSpotInstanceRequestsResponse>"#
    )
}
