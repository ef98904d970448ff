//! `fake-gce`: the fake Compute Engine as a standalone process, for trying GCE clients by
//! hand (gcloud, the driver's `cloudtest`). Prints its base URL and serves until SIGTERM.

use std::net::SocketAddr;

use clap::Parser;
use testkit::fake_gce::{FakeGce, FakeGceConfig};

/// A fake Google Compute Engine (instances and zone operations) on loopback.
#[derive(Parser, Debug)]
#[command(name = "fake-gce", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The project clients must name.
    #[arg(long, default_value = "test-project")]
    project: String,
    /// Its zones, comma-separated.
    #[arg(
        long,
        default_value = "us-central1-a,us-central1-b",
        value_delimiter = ','
    )]
    zones: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.zones.iter().any(|z| z.is_empty()) || args.project.is_empty() {
        anyhow::bail!("--project and every --zones entry must be non-empty");
    }
    let fake = FakeGce::start(FakeGceConfig {
        project: args.project,
        zones: args.zones,
        listen: args.listen,
    })
    .await?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "fake-gce listening on {}", fake.endpoint());
        let _ = writeln!(
            out,
            "gcloud: api_endpoint_overrides/compute {}",
            fake.api_root()
        );
        let _ = out.flush();
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
