//! `crunch-dispatch-slurm`: run Arvados containers as Slurm jobs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use arvados::config::units::parse_duration;
use arvados::config::{Cluster, ConfigSource, load_cluster_from_str};
use arvados::{Client, ClientConfig};
use clap::Parser;
use crunch_dispatch_slurm::runner::{Context, adopt_orphans, run_fn};
use crunch_dispatch_slurm::slurm::{CliCommands, DEFAULT_COMMAND_TIMEOUT, Slurm};
use crunch_dispatch_slurm::squeue::Checker;
use crunch_dispatch_slurm::{http, job_environment, legacy, template};
use dispatch::Dispatcher;
use dispatchcloud::service::dblock::DbLock;

#[derive(Parser, Debug)]
#[command(
    name = "crunch-dispatch-slurm",
    version,
    about = "Run Arvados containers as Slurm batch jobs"
)]
struct Cli {
    /// Cluster config file (default: $ARVADOS_CONFIG, else /etc/arvados/config.yml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Legacy per-component config file, laid over the cluster config if it exists.
    #[arg(long, default_value = legacy::DEFAULT_PATH)]
    legacy_crunch_dispatch_slurm_config: PathBuf,
    /// Do not read the legacy config file.
    #[arg(long)]
    skip_legacy: bool,
    /// Cancel a container whose job Slurm can never start (held, BadConstraints,
    /// PartitionConfig, …) after this long; 0 never cancels (Arvados' behaviour).
    #[arg(long, default_value = "10m", value_parser = duration_arg)]
    unrunnable_timeout: Duration,
    /// Deadline of each Slurm command (sbatch, squeue, scancel, scontrol).
    #[arg(long, default_value = "60s", value_parser = duration_arg)]
    slurm_timeout: Duration,
    /// Accepted for compatibility with Arvados' unit files (`EXTRA_OPTS=-pprof …`) and
    /// ignored: there is no Go profiler here.
    #[arg(long, value_name = "ADDR")]
    pprof: Option<String>,
}

fn duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse_from(dispatch::go_style_args(std::env::args()));
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crunch-dispatch-slurm: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // Runners may be waiting on Slurm or the API: do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The cluster config, with the legacy file laid over it.
fn load(cli: &Cli) -> anyhow::Result<Cluster> {
    let source = ConfigSource::resolve(cli.config.as_deref());
    let text = std::fs::read_to_string(&source.path)
        .with_context(|| format!("reading {}", source.path.display()))?;
    let origin = source.path.display().to_string();
    let mut cluster = if legacy::is_cluster_config(&text) {
        let mut c = load_cluster_from_str(&text, &origin, None)?;
        if !cli.skip_legacy {
            legacy::apply_file(&mut c, &cli.legacy_crunch_dispatch_slurm_config)
                .map_err(anyhow::Error::msg)?;
        }
        c
    } else {
        tracing::warn!(
            "{origin} is not a cluster config file -- interpreting -config as -legacy-crunch-dispatch-slurm-config (please migrate your config!)"
        );
        let mut c = Cluster::default();
        legacy::apply(&mut c, &text, &origin).map_err(anyhow::Error::msg)?;
        c
    };
    if cluster.cluster_id.is_empty() {
        cluster.cluster_id = "zzzzz".into();
    }
    let poll = cluster.containers.cloud_vms.poll_interval;
    if poll.is_zero() {
        bail!("Containers.CloudVMs.PollInterval must be greater than 0");
    }
    let slurm = &cluster.containers.slurm;
    for (key, list) in [
        ("SbatchArgumentsList", &slurm.sbatch_arguments_list),
        ("SbatchGPUArgumentsList", &slurm.sbatch_gpu_arguments_list),
    ] {
        template::validate(list).map_err(|e| anyhow::anyhow!("Containers.SLURM.{key}: {e}"))?;
    }
    Ok(cluster)
}

/// The address to listen on: `$ARVADOS_SERVICE_INTERNAL_URL`, else the only
/// `Services.DispatchSLURM.InternalURLs` entry (its `ListenURL` if set).
fn listen_addr(cluster: &Cluster) -> anyhow::Result<String> {
    let urls = &cluster.services.dispatch_slurm.internal_urls;
    let chosen = match std::env::var("ARVADOS_SERVICE_INTERNAL_URL") {
        Ok(u) if !u.is_empty() => urls
            .get(&u)
            .map(|i| {
                if i.listen_url.is_empty() {
                    u.clone()
                } else {
                    i.listen_url.clone()
                }
            })
            .unwrap_or(u),
        _ => match urls.iter().collect::<Vec<_>>().as_slice() {
            [(u, i)] => {
                if i.listen_url.is_empty() {
                    u.to_string()
                } else {
                    i.listen_url.clone()
                }
            }
            _ => bail!(
                "configuration does not enable the \"crunch-dispatch-slurm\" service on this host"
            ),
        },
    };
    let u = url::Url::parse(&chosen).with_context(|| format!("listen URL {chosen:?}"))?;
    let host = u.host_str().unwrap_or("0.0.0.0");
    let port = u.port_or_known_default().unwrap_or(80);
    Ok(format!("{host}:{port}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(addr) = &cli.pprof {
        tracing::warn!("-pprof {addr} ignored: this dispatcher has no Go profiler");
    }
    let cluster = load(&cli)?;
    tracing::info!(
        ClusterID = %cluster.cluster_id,
        "crunch-dispatch-slurm {} started",
        env!("CARGO_PKG_VERSION")
    );
    let addr = listen_addr(&cluster)?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let client = Client::new(ClientConfig::from_cluster(&cluster)?)?;
    let poll = cluster.containers.cloud_vms.poll_interval;

    let cmds = CliCommands::new(if cli.slurm_timeout.is_zero() {
        DEFAULT_COMMAND_TIMEOUT
    } else {
        cli.slurm_timeout
    })
    .with_env(job_environment(&cluster));
    let slurm = Slurm::new(Arc::new(cmds));
    // A question about a job waits at most this long for a fresh squeue.
    let wait_limit = (poll * 10).max(Duration::from_secs(60));
    let checker = Checker::new(
        slurm.clone(),
        cluster.containers.slurm.priority_spread,
        wait_limit,
    );
    let mut ctx = Context::new(cluster.clone(), slurm, checker.clone());
    ctx.unrunnable_timeout = (!cli.unrunnable_timeout.is_zero()).then_some(cli.unrunnable_timeout);
    match ctx.unrunnable_timeout {
        Some(t) => {
            tracing::info!("containers whose jobs Slurm can never start are cancelled after {t:?}")
        }
        None => tracing::info!(
            "containers whose jobs Slurm can never start are never cancelled (-unrunnable-timeout 0)"
        ),
    }
    let ctx = Arc::new(ctx);
    let dispatcher = Dispatcher::new(client, run_fn(ctx.clone()))
        .batch_size(cluster.api.max_items_per_response)
        .poll_period(poll)
        .min_retry_period(cluster.containers.min_retry_period);

    // Ends the HTTP server and the squeue checker when this function returns.
    let stopped = dispatch::CancellationToken::new();
    let _stop = stopped.clone().drop_guard();
    let router = {
        let d = dispatcher.clone();
        http::router(&cluster.management_token, move || d.tracked().len())
    };
    tokio::spawn(dispatchcloud::service::http_server::serve(
        listener,
        router,
        Default::default(),
        stopped.clone(),
    ));

    let signalled = async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    tokio::pin!(signalled);

    let lock = if cluster.postgresql.is_configured() {
        tokio::select! {
            l = DbLock::acquire(&cluster.postgresql.connection, Duration::from_secs(5), &stopped) => l,
            _ = &mut signalled => None,
        }
    } else {
        tracing::warn!("PostgreSQL is not configured: not taking the dispatcher lock");
        None
    };
    if cluster.postgresql.is_configured() && lock.is_none() {
        return Ok(());
    }

    // squeue runs whatever the dispatcher loop does; the orphan sweep waits for its first
    // result. Neither is stopped on SIGTERM by closing trackers: that would scancel every
    // job, and jobs are left for the next dispatcher to adopt, as in Arvados.
    {
        let checker = checker.clone();
        let stopped = stopped.clone();
        tokio::spawn(async move { checker.run(poll, stopped).await });
    }
    {
        let (ctx, d) = (ctx.clone(), dispatcher.clone());
        tokio::spawn(async move { adopt_orphans(&ctx, &d).await });
    }
    let never = dispatch::CancellationToken::new();
    let lost = async {
        match &lock {
            Some(l) => l.until_lost().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = dispatcher.run(never) => r.map_err(anyhow::Error::from),
        _ = lost => Err(anyhow::anyhow!("lost the dispatcher lock (PostgreSQL advisory lock 10005)")),
        _ = &mut signalled => {
            tracing::info!("stopping; jobs stay in Slurm for the next dispatcher to adopt");
            Ok(())
        }
    };
    result
}
