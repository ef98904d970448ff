//! The management API's HTTP server: HTTP/1.1 (as Go's server speaks without TLS), hardened
//! against clients that do not play along.
//!
//! * A request's headers must arrive within [`ServeOptions::header_read_timeout`] (a slowloris
//!   client is disconnected); the same timer closes a keep-alive connection left idle.
//! * Shutdown stops accepting at once, asks open connections to finish, and drops whatever is
//!   still open after [`ServeOptions::drain`]: it never waits on a client forever.
//!
//! Request body size and concurrency limits are layers on the router ([`super::api::router`]).

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Timeouts of the server.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// From the start of a connection (or the end of the previous response) to the end of a
    /// request's headers.
    pub header_read_timeout: Duration,
    /// How long shutdown waits for open connections.
    pub drain: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(3),
        }
    }
}

/// Serve `router` on `listener` until `shutdown` is cancelled, then drain (bounded).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    shutdown: CancellationToken,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment, keep serving.
                    tracing::warn!(error = %e, "accepting a management API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Finished connection tasks are reaped as we go.
        while conns.try_join_next().is_some() {}
        let svc = TowerToHyperService::new(router.clone());
        let stop = shutdown.clone();
        conns.spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(opts.header_read_timeout);
            let conn = http.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(opts.drain, conn).await;
                }
            }
        });
    }
    drop(listener);
    let all = async { while conns.join_next().await.is_some() {} };
    // Each connection is bounded by `drain` already; this is a second guard.
    if tokio::time::timeout(opts.drain + Duration::from_secs(1), all)
        .await
        .is_err()
    {
        tracing::warn!("management API connections still open after shutdown; dropping them");
        conns.abort_all();
    }
}
