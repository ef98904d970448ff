//! `arvados-dispatch-cloud`: the thin binary edge. Parses the command line, calls into the
//! library crates, and turns errors into one-line messages and exit codes (0 ok, 1 failure,
//! 2 usage). All behaviour lives in the crates under `crates/`.

mod cloudtest;
mod drivers;
#[cfg(feature = "simulator")]
mod heap_tally;
mod logging;
mod mgmt_cli;
mod sd_notify;
mod service;
#[cfg(feature = "simulator")]
mod simulate;

/// `simulate`'s dispatcher/harness memory split (`scripts/bench-e2e` builds with it).
#[cfg(feature = "heap-tally")]
#[global_allocator]
static ALLOCATOR: heap_tally::Tally = heap_tally::Tally;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Cloud dispatcher for Arvados containers: a drop-in replacement for the Go
/// arvados-dispatch-cloud.
#[derive(Parser, Debug)]
#[command(name = "arvados-dispatch-cloud", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log format [default: text on a terminal, else SystemLogs.Format from the config (json)]
    #[arg(long, global = true, value_enum)]
    log_format: Option<logging::LogFormat>,
    #[command(flatten)]
    target: mgmt_cli::Target,
    /// Without a subcommand: run the dispatcher service (same as `run`)
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// Arvados cluster config file [default: $ARVADOS_CONFIG, else /etc/arvados/config.yml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Cluster ID to use when the file defines more than one cluster
    #[arg(long, global = true, value_name = "ID")]
    cluster: Option<String>,
    /// Settings Arvados does not have (spend caps; see docs/settings.md) [default:
    /// $ARVADOS_DISPATCH_CLOUD_SETTINGS, else /etc/arvados/dispatch-cloud-rs.yml if it exists]
    #[arg(long, global = true, value_name = "FILE")]
    settings: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the cluster config, print the effective dispatcher settings (YAML, secrets
    /// redacted) and exit 0; or print what is wrong and exit 1.
    CheckConfig,
    /// Create one VM as the dispatcher would, wait for it to boot, run an optional command,
    /// and destroy it; one line per step. Exit 0 only if every step passed.
    Cloudtest(cloudtest::CloudTestArgs),
    /// Run the dispatcher service: schedule containers, manage VMs, serve the management API
    Run {
        /// Listen on this address instead of the Services.DispatchCloud.InternalURLs entry
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
    },
    /// Run the real dispatcher against a fake Arvados and the stub cloud with a generated
    /// workload; print progress and a cost/latency summary (default config: config/simulate.yml)
    #[cfg(feature = "simulator")]
    Simulate(simulate::SimulateArgs),
    /// List and manage the dispatcher's VMs through its management API
    #[command(subcommand)]
    Instances(mgmt_cli::Instances),
    /// List and stop containers through the dispatcher's management API
    #[command(subcommand)]
    Containers(mgmt_cli::Containers),
    /// Ask each dispatcher's /_health/ping; exit 0 only if all say OK (for container and
    /// load balancer health checks)
    Health,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let exit = |ok: bool| if ok { Ok(0) } else { Ok(1) };
    let result: anyhow::Result<u8> = match cli.command {
        Some(Command::CheckConfig) => check_config(&cli.config).map(|()| 0),
        Some(Command::Cloudtest(args)) => load_dispatcher(&cli.config)
            .and_then(|c| cloudtest::run(c, args))
            .and_then(exit),
        None => load_dispatcher(&cli.config)
            .and_then(|c| Ok((c, settings(&cli.config)?)))
            .and_then(|(c, s)| service::run(c, s, None, config_time(&cli.config)))
            .map(|()| 0),
        Some(Command::Run { listen }) => load_dispatcher(&cli.config)
            .and_then(|c| Ok((c, settings(&cli.config)?)))
            .and_then(|(c, s)| service::run(c, s, listen, config_time(&cli.config)))
            .map(|()| 0),
        #[cfg(feature = "simulator")]
        Some(Command::Simulate(args)) => {
            // Its own default config unless one is given.
            let cluster = match &cli.config.config {
                Some(_) => load(&cli.config).map(Some),
                None => Ok(None),
            };
            // Only a settings file named on the command line: a host's own file is for its
            // real dispatcher.
            let settings = match &cli.config.settings {
                Some(p) => {
                    dispatchcloud::settings::Settings::load(Some(p)).map_err(anyhow::Error::from)
                }
                None => Ok(Default::default()),
            };
            cluster
                .and_then(|c| Ok((c, settings?)))
                .and_then(|(c, s)| simulate::run(c, s, args))
                .and_then(exit)
        }
        Some(Command::Instances(cmd)) => mgmt_config(&cli.config, &cli.target)
            .and_then(|c| mgmt_cli::instances(c.as_ref(), &cli.target, cmd)),
        Some(Command::Containers(cmd)) => mgmt_config(&cli.config, &cli.target)
            .and_then(|c| mgmt_cli::containers(c.as_ref(), &cli.target, cmd)),
        Some(Command::Health) => mgmt_config(&cli.config, &cli.target)
            .and_then(|c| mgmt_cli::health(c.as_ref(), &cli.target)),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("arvados-dispatch-cloud: {}", msg.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The settings file (`--settings`, `$ARVADOS_DISPATCH_CLOUD_SETTINGS`, the default path).
fn settings(args: &ConfigArgs) -> anyhow::Result<dispatchcloud::settings::Settings> {
    let s = dispatchcloud::settings::Settings::load(args.settings.as_deref())?;
    if let Some(p) = dispatchcloud::settings::Settings::resolve(args.settings.as_deref()) {
        tracing::info!(path = %p.display(), "loaded settings file");
    }
    Ok(s)
}

/// The config file's modification time (for `arvados_config_source_timestamp_seconds`).
fn config_time(args: &ConfigArgs) -> Option<std::time::SystemTime> {
    let source = arvados::ConfigSource::resolve(args.config.as_deref());
    std::fs::metadata(&source.path)
        .and_then(|m| m.modified())
        .ok()
}

fn load(args: &ConfigArgs) -> anyhow::Result<arvados::Cluster> {
    let source = arvados::ConfigSource::resolve(args.config.as_deref());
    let cluster = arvados::config::load_cluster(&source, args.cluster.as_deref())?;
    logging::apply_config(&cluster)?;
    Ok(cluster)
}

/// The config for running the dispatcher (`run`, `cloudtest`, `check-config`): loaded, with a
/// driver this build has.
fn load_dispatcher(args: &ConfigArgs) -> anyhow::Result<arvados::Cluster> {
    let cluster = load(args)?;
    drivers::check(&cluster)?;
    Ok(cluster)
}

/// The config for `instances`/`containers`: none when `--url` and a token say everything
/// (unless `--config` is given), else the loaded one.
fn mgmt_config(
    args: &ConfigArgs,
    target: &mgmt_cli::Target,
) -> anyhow::Result<Option<arvados::Cluster>> {
    if args.config.is_none() && target.needs_no_config() {
        return Ok(None);
    }
    load(args).map(Some)
}

fn check_config(args: &ConfigArgs) -> anyhow::Result<()> {
    let cluster = load_dispatcher(args)?;
    // A bad settings file fails the check too (it is printed only to stderr's log).
    settings(args)?;
    // Wrapped as `Clusters: <id>: …`, so the output is itself a loadable config file.
    let mut clusters = std::collections::BTreeMap::new();
    clusters.insert(cluster.cluster_id.clone(), cluster.redacted());
    let mut doc = std::collections::BTreeMap::new();
    doc.insert("Clusters", clusters);
    print!("{}", serde_norway::to_string(&doc)?);
    Ok(())
}
