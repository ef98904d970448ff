//! A minimal dispatcher: locks every queued container, "runs" it by marking it Running and
//! then Complete, and stops on Ctrl-C. Reads `ARVADOS_API_HOST` and `ARVADOS_API_TOKEN`.
//!
//! ```sh
//! cargo run -p testkit --bin fake-arvados -- --token secret --listen 127.0.0.1:8000 --containers 5 &
//! ARVADOS_API_HOST=http://127.0.0.1:8000 ARVADOS_API_TOKEN=secret \
//!     cargo run -p arvados-dispatch --example minimal
//! ```

use std::sync::Arc;
use std::time::Duration;

use arvados::types::ContainerState;
use arvados::{Client, ClientConfig};
use dispatch::{Dispatcher, RunError, RunFn};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let client = Client::new(ClientConfig::from_env()?)?;
    let run: RunFn = Arc::new(|d, c, mut updates| {
        Box::pin(async move {
            let err = |e: arvados::ApiError| RunError::Other(e.to_string());
            d.update_state(&c.uuid, ContainerState::Running)
                .await
                .map_err(err)?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            d.client()
                .update_container(
                    &c.uuid,
                    &json!({"state": "Complete", "exit_code": 0}),
                    Some(&["uuid"]),
                )
                .await
                .map_err(err)?;
            // Follow updates until the dispatcher says the container is no longer ours.
            while updates.recv().await.is_some() {}
            Ok(())
        })
    });
    let dispatcher = Dispatcher::new(client, run).poll_period(Duration::from_secs(1));
    let shutdown = dispatch::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    dispatcher.run(shutdown).await?;
    Ok(())
}
