//! `fake-arvados`: the fake Arvados API server as a standalone process, for manual testing,
//! demos and non-Rust clients.

use std::net::SocketAddr;

use clap::Parser;
use testkit::fake_api::{FakeArvados, FakeConfig, generate_workload};

/// A fake Arvados API server (containers, locks, tokens) for testing dispatchers.
#[derive(Parser, Debug)]
#[command(name = "fake-arvados", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Cluster ID (5 lowercase letters or digits).
    #[arg(long, default_value = "zzzzz", value_parser = parse_cluster_id)]
    cluster_id: String,
    /// The SystemRootToken clients must present.
    #[arg(long, env = "ARVADOS_API_TOKEN", hide_env_values = true)]
    token: String,
    /// Create this many Queued containers with a generated mixed workload.
    #[arg(long, default_value_t = 0)]
    containers: usize,
    /// Seed for the generated workload.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Containers.MaxDispatchAttempts.
    #[arg(long, default_value_t = 10)]
    max_dispatch_attempts: i64,
    /// Serve https with a generated self-signed certificate (clients need
    /// ARVADOS_API_HOST_INSECURE=true).
    #[arg(long)]
    tls: bool,
}

fn parse_cluster_id(s: &str) -> Result<String, String> {
    if s.len() == 5
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Ok(s.to_string())
    } else {
        Err("must be 5 lowercase letters or digits".into())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.token.is_empty() {
        anyhow::bail!("--token must not be empty");
    }
    let fake = FakeArvados::start(FakeConfig {
        cluster_id: args.cluster_id,
        root_token: args.token,
        max_dispatch_attempts: args.max_dispatch_attempts,
        listen: args.listen,
        tls: args.tls,
    })
    .await?;
    for spec in generate_workload(args.containers, args.seed) {
        fake.add_container(&spec);
    }
    // Handlers first, so a SIGTERM sent as soon as the URL is read is handled.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Whoever started us may close our stdout after reading the URL: never die of EPIPE.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "fake-arvados listening on {}", fake.base_url());
        let _ = out.flush();
    }
    tracing::info!(
        "ARVADOS_API_HOST={} ({} containers)",
        fake.api_host(),
        args.containers
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    fake.shutdown().await;
    Ok(())
}
