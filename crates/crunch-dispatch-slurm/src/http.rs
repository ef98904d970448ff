//! The HTTP endpoints Arvados' service framework gives crunch-dispatch-slurm:
//! `/_health/ping` and `/metrics`, both behind the `ManagementToken`; everything else 404.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

struct Shared {
    token: String,
    tracked: Box<dyn Fn() -> usize + Send + Sync>,
}

/// The router; `tracked` counts the containers being followed (a gauge).
pub fn router(
    management_token: &str,
    tracked: impl Fn() -> usize + Send + Sync + 'static,
) -> Router {
    let shared = Arc::new(Shared {
        token: management_token.to_string(),
        tracked: Box::new(tracked),
    });
    Router::new()
        .route("/_health/ping", get(ping))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

/// `None` if the request carries the `ManagementToken`, else the refusal.
fn refusal(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    if s.token.is_empty() {
        return Some(
            (StatusCode::NOT_FOUND, "ManagementToken is not configured\n").into_response(),
        );
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    (!dispatchcloud::service::api::same(given, &s.token))
        .then(|| (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response())
}

async fn ping(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    axum::Json(serde_json::json!({"health": "OK"})).into_response()
}

async fn metrics(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = refusal(&s, &headers) {
        return r;
    }
    let body = format!(
        "# HELP arvados_version_running Indicated version is running.\n\
         # TYPE arvados_version_running gauge\n\
         arvados_version_running{{version=\"{}\"}} 1\n\
         # HELP arvados_dispatchslurm_containers_tracked Containers whose Slurm jobs are being followed.\n\
         # TYPE arvados_dispatchslurm_containers_tracked gauge\n\
         arvados_dispatchslurm_containers_tracked {}\n",
        env!("CARGO_PKG_VERSION"),
        (s.tracked)()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
