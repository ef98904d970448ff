//! The generic service metrics every Arvados service exposes next to its own (Appendix C):
//! version, config timestamps, and the HTTP server's request metrics.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{Gauge, GaugeVec, IntGauge, Opts, Registry};

use crate::worker::metrics::Summary;

pub struct ServiceMetrics {
    pub config_source_timestamp: Gauge,
    concurrent: IntGauge,
    /// `API.MaxConcurrentRequests` slots (`None`: unlimited).
    slots: Option<Arc<tokio::sync::Semaphore>>,
    request_duration: Arc<Summary>,
    time_to_status: Arc<Summary>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl ServiceMetrics {
    pub fn new(
        registry: &Registry,
        cluster: &arvados::Cluster,
    ) -> Result<ServiceMetrics, prometheus::Error> {
        let version = GaugeVec::new(
            Opts::new("arvados_version_running", "Indicated version is running."),
            &["version"],
        )?;
        version
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1.0);
        registry.register(Box::new(version))?;
        let source = cloud::metrics::registered(
            registry,
            Gauge::with_opts(Opts::new(
                "arvados_config_source_timestamp_seconds",
                "Timestamp of config file when it was loaded.",
            ))?,
        )?;
        let load = Gauge::with_opts(Opts::new(
            "arvados_config_load_timestamp_seconds",
            "Time when config file was loaded.",
        ))?;
        load.set(unix(SystemTime::now()));
        registry.register(Box::new(load))?;
        let concurrent = cloud::metrics::registered(
            registry,
            IntGauge::with_opts(Opts::new(
                "arvados_concurrent_requests",
                "Number of requests in progress",
            ))?,
        )?;
        let max = IntGauge::with_opts(Opts::new(
            "arvados_max_concurrent_requests",
            "Maximum number of concurrent requests",
        ))?;
        max.set(cluster.api.max_concurrent_requests);
        registry.register(Box::new(max))?;
        // Requests are never queued here; the gauges exist so dashboards find them.
        for (name, help) in [
            ("arvados_queued_requests", "Number of requests in queue"),
            (
                "arvados_max_queued_requests",
                "Maximum number of queued requests",
            ),
        ] {
            registry.register(Box::new(IntGauge::with_opts(Opts::new(name, help))?))?;
        }
        let delay = Arc::new(Summary::new(
            "arvados_queue_delay_seconds",
            "Time spent in the incoming request queue before start of processing",
            &[],
        )?);
        delay.register(registry)?;
        let request_duration = Arc::new(Summary::new(
            "arvados_dispatchcloud_request_duration_seconds",
            "Summary of request duration.",
            &["code", "method"],
        )?);
        request_duration.register(registry)?;
        let time_to_status = Arc::new(Summary::new(
            "arvados_dispatchcloud_time_to_status_seconds",
            "Summary of request TTFB.",
            &["code", "method"],
        )?);
        time_to_status.register(registry)?;
        let limit = cluster.api.max_concurrent_requests;
        Ok(ServiceMetrics {
            config_source_timestamp: source,
            concurrent,
            slots: (limit > 0).then(|| Arc::new(tokio::sync::Semaphore::new(limit as usize))),
            request_duration,
            time_to_status,
        })
    }

    /// The config file's modification time.
    pub fn set_config_source_time(&self, t: SystemTime) {
        self.config_source_timestamp.set(unix(t));
    }
}

/// The `method` label: one of the standard methods, or `other` (the raw method would let any
/// client grow `/metrics` without a token).
pub fn method_label(m: &axum::http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "get",
        "HEAD" => "head",
        "POST" => "post",
        "PUT" => "put",
        "PATCH" => "patch",
        "DELETE" => "delete",
        "OPTIONS" => "options",
        _ => "other",
    }
}

/// Middleware: enforce `API.MaxConcurrentRequests` (503 beyond it, as Arvados does), count
/// requests in flight, time them by status code and method.
pub async fn track(State(m): State<Arc<ServiceMetrics>>, req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    let _slot = match &m.slots {
        Some(s) => match s.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                return super::api::json_error(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "too many concurrent requests",
                );
            }
        },
        None => None,
    };
    m.concurrent.inc();
    let started = Instant::now();
    let resp = next.run(req).await;
    let took = started.elapsed().as_secs_f64();
    m.concurrent.dec();
    let code = resp.status().as_u16().to_string();
    m.time_to_status.observe(&[&code, method], took);
    m.request_duration.observe(&[&code, method], took);
    resp
}
