//! The binary's start and stop: flags, config errors, the HTTP endpoints, and Arvados' known
//! bugs 1 (a failed token lookup exits 0 without a word) and 8 (a template typo is found only
//! per container, at submit time).

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::{FakeArvados, FakeConfig};

const BIN: &str = env!("CARGO_BIN_EXE_crunch-dispatch-slurm");

fn config(f: &FakeArvados, token: &str, port: u16, extra: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!(
            "Clusters:\n  {id}:\n    SystemRootToken: {token}\n    ManagementToken: mgmt\n    Services:\n      Controller:\n        ExternalURL: {url}\n      DispatchSLURM:\n        InternalURLs:\n          \"http://127.0.0.1:{port}\": {{}}\n    Containers:\n      CloudVMs:\n        PollInterval: 0.2s\n{extra}",
            id = f.cluster_id(),
            url = f.base_url(),
        ),
    )
    .unwrap();
    file
}

/// Run the binary to its end (at most 30 s).
fn run_to_end(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn an_unknown_flag_prints_usage_and_exits_2() {
    let out = run_to_end(&["-no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
    // Arvados' units pass `-pprof ADDR` through EXTRA_OPTS: accepted (then the missing
    // config is the error, exit 1, so systemd keeps restarting instead of giving up).
    let out = run_to_end(&["-pprof", ":6060", "-config", "/nonexistent/config.yml"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_to_end(&["-version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("crunch-dispatch-slurm "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_1_a_failed_token_lookup_is_logged_and_exits_non_zero() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let cfg = config(&f, "not-a-valid-token", testkit::free_port(), "");
    let path = cfg.path().to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || run_to_end(&["-config", &path, "-skip-legacy"]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("error getting my token UUID"), "{log}");
    assert!(
        !log.contains("not-a-valid-token"),
        "the token is never logged: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_8_a_template_typo_is_refused_at_startup() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let extra = "      SLURM:\n        SbatchArgumentsList: [\"--job-name=%U\", \"--x=%Z\"]\n";
    let cfg = config(&f, f.root_token(), testkit::free_port(), extra);
    let path = cfg.path().to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || run_to_end(&["-config", &path, "-skip-legacy"]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("Containers.SLURM.SbatchArgumentsList: Unknown substitution parameter %Z"),
        "{log}"
    );
    // Nothing was locked.
    assert!(f.requests().iter().all(|r| !r.path.ends_with("/lock")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_need_the_management_token() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let port = testkit::free_port();
    let cfg = config(&f, f.root_token(), port, "");
    let mut child = Command::new(BIN)
        .arg("-config")
        .arg(cfg.path())
        .arg("-skip-legacy")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if http.get(format!("{url}/_health/ping")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the endpoint never answered");
    let no_token = http
        .get(format!("{url}/_health/ping"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);
    let wrong = http
        .get(format!("{url}/metrics"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ping = http
        .get(format!("{url}/_health/ping"))
        .bearer_auth("mgmt")
        .send()
        .await
        .unwrap();
    assert_eq!(ping.text().await.unwrap(), r#"{"health":"OK"}"#);
    let metrics = http
        .get(format!("{url}/metrics"))
        .bearer_auth("mgmt")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("arvados_version_running{version=\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("arvados_dispatchslurm_containers_tracked 0"),
        "{metrics}"
    );
    // SIGTERM: a quick, clean exit (jobs stay in Slurm).
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no exit 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}
