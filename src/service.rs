//! `arvados-dispatch-cloud [run]`: the dispatcher service with its management API.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use dispatchcloud::service::{Service, api, http_server};
use dispatchcloud::tasks::Tasks;
use tokio_util::sync::CancellationToken;

/// Where to listen: `--listen`, else the `Services.DispatchCloud.InternalURLs` entry (its
/// `ListenURL` if set) that can be bound on this host.
pub fn listen_addr(cluster: &arvados::Cluster, flag: Option<&str>) -> anyhow::Result<SocketAddr> {
    if let Some(a) = flag {
        return a.parse().with_context(|| format!("--listen {a:?}"));
    }
    let urls = &cluster.services.dispatch_cloud.internal_urls;
    if urls.is_empty() {
        return Err(anyhow!(
            "Services.DispatchCloud.InternalURLs: none configured"
        ));
    }
    let mut tried = Vec::new();
    for (url, inst) in urls {
        let u = if inst.listen_url.is_empty() {
            url
        } else {
            &inst.listen_url
        };
        let Ok(parsed) = url::Url::parse(u) else {
            continue;
        };
        let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
            continue;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        use std::net::ToSocketAddrs;
        for addr in (host, port).to_socket_addrs().into_iter().flatten() {
            if std::net::TcpListener::bind(addr).is_ok() {
                return Ok(addr);
            }
            tried.push(addr.to_string());
        }
    }
    Err(anyhow!(
        "Services.DispatchCloud.InternalURLs: no entry can be bound on this host (tried {})",
        tried.join(", ")
    ))
}

/// A token cancelled on SIGTERM or SIGINT (the process's root token; its watcher task ends
/// with the first signal or the runtime).
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let tx = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        tx.cancel();
    });
    token
}

/// Serve `svc`'s management API on `addr` and run it until `shutdown`.
pub async fn serve(
    svc: Arc<Service>,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))?;
    tracing::info!(Listen = %listener.local_addr()?, "listening");
    // The HTTP server stops when asked, or when the dispatcher stops by itself (lost lock):
    // its tasks are cancelled with `shutdown` or when they are joined below.
    let http = Tasks::child_of(&shutdown);
    let stopping = http.token().clone();
    http.spawn(async move {
        stopping.cancelled().await;
        crate::sd_notify::notify("STOPPING=1");
    });
    http.spawn(http_server::serve(
        listener,
        api::router(svc.clone()),
        http_server::ServeOptions::default(),
        http.token().clone(),
    ));
    // Ready once the management API (health, metrics) is served: a standby waiting for the
    // PostgreSQL lock is up and healthy too.
    crate::sd_notify::notify("READY=1");
    let result = svc.run(shutdown).await;
    // The server drains open connections for a bounded time; a client that never ends its
    // request does not hold the process.
    http.join("management API", HTTP_DRAIN).await;
    result?;
    Ok(())
}

/// How long shutdown waits for open management API connections.
const HTTP_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

pub fn run(
    cluster: arvados::Cluster,
    settings: dispatchcloud::settings::Settings,
    listen: Option<String>,
    config_time: Option<std::time::SystemTime>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let svc = Service::build_with(&cluster, &settings, &crate::drivers::registry())?;
        if let Some(t) = config_time {
            svc.http_metrics.set_config_source_time(t);
        }
        svc.pool.check_health().map_err(|e| anyhow!(e))?;
        let addr = listen_addr(&cluster, listen.as_deref())?;
        tracing::info!(
            ClusterID = %cluster.cluster_id,
            InstanceSetID = %svc.instance_set_id,
            Driver = %cluster.containers.cloud_vms.driver,
            "starting dispatcher"
        );
        serve(svc, addr, shutdown_on_signals()).await
    })
}
