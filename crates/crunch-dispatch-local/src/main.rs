//! `crunch-dispatch-local`: run Arvados containers on this host (spec §12.5).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arvados::config::{ConfigSource, load_cluster};
use arvados::{Client, ClientConfig};
use clap::Parser;
use crunch_dispatch_local::resources::{Capacity, ResourceManager};
use crunch_dispatch_local::{Context, run_fn};
use dispatch::Dispatcher;

#[derive(Parser, Debug)]
#[command(
    name = "crunch-dispatch-local",
    version,
    about = "Run Arvados containers on this host"
)]
struct Cli {
    /// Cluster config file (default: $ARVADOS_CONFIG, else /etc/arvados/config.yml).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Cluster ID, when the file has several.
    #[arg(long)]
    cluster: Option<String>,
    /// Seconds between queue polls.
    #[arg(long, default_value_t = 10.0)]
    poll_interval: f64,
    /// The crunch-run program (default: Containers.CrunchRunCommand).
    #[arg(long)]
    crunch_run_command: Option<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_from(dispatch::go_style_args(std::env::args()));
    let level = if std::env::var_os("DEBUG").is_some() {
        "debug"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crunch-dispatch-local: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let source = ConfigSource::resolve(cli.config.as_deref());
    let (client_cfg, containers, root_token) = match load_cluster(&source, cli.cluster.as_deref()) {
        Ok(cluster) => {
            let cfg = ClientConfig::from_cluster(&cluster)?;
            (
                cfg,
                cluster.containers.clone(),
                cluster.system_root_token.clone(),
            )
        }
        Err(e) => {
            // Fall back to the environment, as the Go dispatcher does (deprecated).
            let cfg = ClientConfig::from_env().with_context(|| format!("{e}"))?;
            tracing::warn!(
                "could not load the cluster config ({e}); using ARVADOS_API_* from the environment (deprecated)"
            );
            let token = cfg.token.clone();
            (cfg, Default::default(), token)
        }
    };
    let host = {
        let u = &client_cfg.base_url;
        let hostport = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
            None => u.host_str().unwrap_or_default().to_string(),
        };
        // crunch-run assumes https; keep the scheme when it is not.
        if u.scheme() == "https" {
            hostport
        } else {
            format!("{}://{hostport}", u.scheme())
        }
    };
    let api_env = vec![
        ("ARVADOS_API_HOST".to_string(), host),
        ("ARVADOS_API_TOKEN".to_string(), client_cfg.token.clone()),
        (
            "ARVADOS_API_HOST_INSECURE".to_string(),
            if client_cfg.insecure { "1" } else { "0" }.to_string(),
        ),
    ];
    let client = Client::new(client_cfg)?;
    let ctx = Arc::new(Context {
        crunch_run_command: cli
            .crunch_run_command
            .unwrap_or_else(|| containers.crunch_run_command.clone()),
        runtime_engine: containers.runtime_engine.clone(),
        crunch_run_args: containers.crunch_run_arguments_list.clone(),
        reserve_extra_ram: containers.reserve_extra_ram,
        api_env,
        root_token,
        resources: ResourceManager::new(Capacity::of_host()),
    });
    let poll = Duration::from_secs_f64(cli.poll_interval.max(0.01));
    let dispatcher = Dispatcher::new(client, run_fn(ctx))
        .poll_period(poll)
        .batch_size(100);

    // SIGTERM or SIGINT: stop taking work, signal the children, wait for them.
    let stopped = dispatch::CancellationToken::new();
    let stop = stopped.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: stopping containers and waiting for them");
        stop.cancel();
    });
    tracing::info!("crunch-dispatch-local started");
    dispatcher.run(stopped).await?;
    tracing::info!("crunch-dispatch-local stopped");
    Ok(())
}
