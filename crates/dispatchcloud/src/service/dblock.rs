//! The single-dispatcher guard (spec §11.2): a PostgreSQL session advisory lock on key 10005,
//! the key every Arvados dispatcher (cloud, Slurm, LSF) takes, held on one connection for the
//! dispatcher's lifetime. Until it is free, try again every few seconds and say who holds it.
//!
//! Better than Go: the holder's connection is watched, and losing it (database restart,
//! network) is logged as an error instead of silently dropping the guarantee.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

/// The advisory lock key shared by Arvados dispatchers.
pub const LOCK_KEY: i64 = 10005;

/// A held lock; dropping it unlocks (by closing the session).
pub struct DbLock {
    client: Client,
    conn_task: tokio::task::JoinHandle<()>,
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
    /// Take the lock, retrying every `retry` until it is ours or `shutdown` turns true
    /// (then `None`).
    pub async fn acquire(
        params: &BTreeMap<String, String>,
        retry: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> Option<DbLock> {
        let conninfo = connection_string(params);
        let mut last_holder = String::new();
        loop {
            match Self::try_once(&conninfo).await {
                Ok(Ok(lock)) => {
                    tracing::info!("acquired dispatcher lock (PostgreSQL advisory lock 10005)");
                    return Some(lock);
                }
                Ok(Err(who)) => {
                    if who != last_holder {
                        tracing::info!(holder = %who, "waiting for other process to release lock");
                        last_holder = who;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "error connecting to database for dispatcher lock")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown.wait_for(|s| *s) => return None,
            }
        }
    }

    /// One attempt: the lock, or who holds it.
    async fn try_once(conninfo: &str) -> Result<Result<DbLock, String>, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(conninfo, NoTls).await?;
        let conn_task = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::error!(error = %e, "database connection holding the dispatcher lock was lost");
            }
        });
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK_KEY])
            .await?
            .get(0);
        if got {
            Ok(Ok(DbLock { client, conn_task }))
        } else {
            let who = holder(&client).await;
            drop(client);
            conn_task.abort();
            Ok(Err(who))
        }
    }

    /// Unlock and close the session.
    pub async fn release(self) {
        let _ = self
            .client
            .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
            .await;
        drop(self.client);
        let _ = self.conn_task.await;
        tracing::info!("released dispatcher lock");
    }
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
