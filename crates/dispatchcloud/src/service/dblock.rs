//! The single-dispatcher guard (spec §11.2): a PostgreSQL session advisory lock on key 10005,
//! the key every Arvados dispatcher (cloud, Slurm, LSF) takes, held on one connection for the
//! dispatcher's lifetime. Until it is free, try again every few seconds and say who holds it.
//!
//! Better than Go: the holder's connection is watched (its end, TCP keepalives, and a
//! `SELECT 1` every few seconds with a deadline), and losing it (database restart,
//! `pg_terminate_backend`, network) is reported through [`DbLock::until_lost`]: the service then
//! stops dispatching at once and exits non-zero, so systemd restarts it and it waits for the
//! lock again, while a standby that was waiting takes over. Connections have a connect timeout
//! and keepalives, and honour `sslmode` ([`super::pgtls`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The advisory lock key shared by Arvados dispatchers.
pub const LOCK_KEY: i64 = 10005;

/// How often the held connection is asked whether it is alive, and how long it may take.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting (TCP, TLS, authentication) must not take longer than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A held lock; dropping it unlocks (by closing the session).
pub struct DbLock {
    client: Client,
    conn_task: tokio::task::JoinHandle<()>,
    /// Cancelled when the connection ends.
    lost: CancellationToken,
    /// Set while releasing on purpose (the connection's end is then not an error).
    releasing: Arc<AtomicBool>,
}

/// libpq-style `key=value` text from `PostgreSQL.Connection` (values quoted).
pub fn connection_string(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Who holds the lock, as `client_addr:client_port` (or `local`).
async fn holder(client: &Client) -> String {
    let q = "SELECT coalesce(host(a.client_addr), 'local') || ':' || coalesce(a.client_port, -1)::text \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objid = $1::bigint::oid LIMIT 1";
    match client.query_opt(q, &[&LOCK_KEY]).await {
        Ok(Some(row)) => row.get::<_, String>(0),
        Ok(None) => "unknown".into(),
        Err(e) => format!("unknown ({e})"),
    }
}

impl DbLock {
    /// Take the lock, retrying every `retry` until it is ours or `shutdown` is cancelled
    /// (then `None`).
    pub async fn acquire(
        params: &BTreeMap<String, String>,
        retry: Duration,
        shutdown: &CancellationToken,
    ) -> Option<DbLock> {
        Self::acquire_reporting(params, retry, shutdown, |_| {}).await
    }

    /// [`DbLock::acquire`], telling `on_holder` who holds the lock whenever that changes.
    pub async fn acquire_reporting(
        params: &BTreeMap<String, String>,
        retry: Duration,
        shutdown: &CancellationToken,
        on_holder: impl Fn(&str),
    ) -> Option<DbLock> {
        let mut last_holder = String::new();
        loop {
            match Self::try_once(params).await {
                Ok(Ok(lock)) => {
                    tracing::info!("acquired dispatcher lock (PostgreSQL advisory lock 10005)");
                    return Some(lock);
                }
                Ok(Err(who)) => {
                    if who != last_holder {
                        tracing::info!(holder = %who, "waiting for other process to release lock");
                        on_holder(&who);
                        last_holder = who;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "error connecting to database for dispatcher lock")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown.cancelled() => return None,
            }
        }
    }

    /// One attempt: the lock, or who holds it.
    async fn try_once(params: &BTreeMap<String, String>) -> Result<Result<DbLock, String>, String> {
        let (client, conn_task, lost, releasing) = match tokio::time::timeout(
            2 * CONNECT_TIMEOUT,
            super::pgtls::connect(params, CONNECT_TIMEOUT),
        )
        .await
        {
            Ok(r) => r?,
            Err(_) => return Err(format!("no answer within {:?}", 2 * CONNECT_TIMEOUT)),
        };
        let query = client.query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY]);
        let got: bool = match tokio::time::timeout(HEALTH_TIMEOUT, query).await {
            Ok(Ok(row)) => row.get(0),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no answer within {HEALTH_TIMEOUT:?}")),
        };
        if got {
            Ok(Ok(DbLock {
                client,
                conn_task,
                lost,
                releasing,
            }))
        } else {
            let who = tokio::time::timeout(HEALTH_TIMEOUT, holder(&client))
                .await
                .unwrap_or_else(|_| "unknown".into());
            releasing.store(true, Ordering::SeqCst);
            drop(client);
            conn_task.abort();
            Ok(Err(who))
        }
    }

    /// Resolves when the lock can no longer be trusted: the connection ended, or it did not
    /// answer a health query in time. The lock is then the server's to give to someone else.
    pub async fn until_lost(&self) {
        loop {
            tokio::select! {
                _ = self.lost.cancelled() => return,
                _ = tokio::time::sleep(HEALTH_INTERVAL) => {
                    match tokio::time::timeout(HEALTH_TIMEOUT, self.client.simple_query("SELECT 1")).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "database connection holding the dispatcher lock failed");
                            return;
                        }
                        Err(_) => {
                            tracing::error!("database connection holding the dispatcher lock stopped answering");
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Unlock and close the session (within a few seconds, whatever the database does).
    pub async fn release(self) {
        self.releasing.store(true, Ordering::SeqCst);
        let unlock = self
            .client
            .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]);
        let _ = tokio::time::timeout(Duration::from_secs(5), unlock).await;
        drop(self.client);
        if tokio::time::timeout(Duration::from_secs(5), self.conn_task)
            .await
            .is_err()
        {
            tracing::warn!("database connection did not close in time");
        }
        tracing::info!("released dispatcher lock");
    }
}

/// The connection task's side: run the connection, then say it ended.
pub(super) fn watch_connection<F>(
    conn: F,
) -> (
    tokio::task::JoinHandle<()>,
    CancellationToken,
    Arc<AtomicBool>,
)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    let lost = CancellationToken::new();
    let tx = lost.clone();
    let releasing = Arc::new(AtomicBool::new(false));
    let r = releasing.clone();
    let task = tokio::spawn(async move {
        let result = conn.await;
        if !r.load(Ordering::SeqCst) {
            match result {
                Err(e) => {
                    tracing::error!(error = %e, "database connection holding the dispatcher lock was lost")
                }
                Ok(()) => {
                    tracing::error!("database connection holding the dispatcher lock was closed")
                }
            }
        }
        tx.cancel();
    });
    (task, lost, releasing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_string_quotes_values_and_skips_empty_ones() {
        let p: BTreeMap<String, String> = [
            ("host", "127.0.0.1"),
            ("password", "it's\\x"),
            ("user", ""),
            ("dbname", "arvados"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            connection_string(&p),
            r"dbname='arvados' host='127.0.0.1' password='it\'s\\x'"
        );
    }
}
