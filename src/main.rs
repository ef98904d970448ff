//! `arvados-dispatch-cloud`: the thin binary edge. Parses the command line, calls into the
//! library crates, and turns errors into one-line messages and exit codes (0 ok, 1 failure,
//! 2 usage). All behaviour lives in the crates under `crates/`.

mod cloudtest;
mod drivers;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Cloud dispatcher for Arvados containers: a drop-in replacement for the Go
/// arvados-dispatch-cloud.
#[derive(Parser, Debug)]
#[command(
    name = "arvados-dispatch-cloud",
    version,
    arg_required_else_help = true
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// Arvados cluster config file [default: $ARVADOS_CONFIG, else /etc/arvados/config.yml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Cluster ID to use when the file defines more than one cluster
    #[arg(long, global = true, value_name = "ID")]
    cluster: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the cluster config, print the effective dispatcher settings (YAML, secrets
    /// redacted) and exit 0; or print what is wrong and exit 1.
    CheckConfig,
    /// Create one VM as the dispatcher would, wait for it to boot, run an optional command,
    /// and destroy it; one line per step. Exit 0 only if every step passed.
    Cloudtest(cloudtest::CloudTestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::CheckConfig => check_config(&cli.config),
        Command::Cloudtest(args) => match load(&cli.config).and_then(|c| cloudtest::run(c, args)) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("arvados-dispatch-cloud: {}", msg.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn load(args: &ConfigArgs) -> anyhow::Result<arvados::Cluster> {
    let source = arvados::ConfigSource::resolve(args.config.as_deref());
    Ok(arvados::config::load_cluster(
        &source,
        args.cluster.as_deref(),
    )?)
}

fn check_config(args: &ConfigArgs) -> anyhow::Result<()> {
    let cluster = load(args)?;
    // Wrapped as `Clusters: <id>: …`, so the output is itself a loadable config file.
    let mut clusters = std::collections::BTreeMap::new();
    clusters.insert(cluster.cluster_id.clone(), cluster.redacted());
    let mut doc = std::collections::BTreeMap::new();
    doc.insert("Clusters", clusters);
    print!("{}", serde_norway::to_string(&doc)?);
    Ok(())
}
