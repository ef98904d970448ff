//! The `fake-arvados` binary: starts, prints its URL, serves a generated workload, and stops on
//! SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The child and its stdout (kept open so the child never writes to a closed pipe).
struct Running(
    Child,
    #[allow(dead_code)] BufReader<std::process::ChildStdout>,
);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(extra: &[&str]) -> (Running, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-arvados"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cluster-id",
            "abcde",
            "--token",
            "tok",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    reader.read_line(&mut line).unwrap();
    let url = line
        .trim()
        .strip_prefix("fake-arvados listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Running(child, reader), url)
}

#[tokio::test]
async fn serves_generated_containers() {
    let (_p, url) = start(&["--containers", "7"]);
    assert!(url.starts_with("http://127.0.0.1:"));
    let body: serde_json::Value = reqwest::Client::new()
        .get(format!("{url}/arvados/v1/containers?count=exact&limit=0"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["items_available"], 7);
    let me: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "{url}/arvados/v1/api_client_authorizations/current"
        ))
        .header("Authorization", "OAuth2 tok")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["uuid"], "abcde-gj3su-000000000000000");
}

#[tokio::test]
async fn tls_mode_serves_https() {
    let (_p, url) = start(&["--tls"]);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let resp = client
        .get(format!(
            "{url}/arvados/v1/api_client_authorizations/current?api_token=tok"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[test]
fn sigterm_stops_it_cleanly() {
    let (mut p, _url) = start(&[]);
    let pid = p.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = p.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_arguments_print_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_fake-arvados"))
        .args(["--cluster-id", "TOOLONG", "--token", "t"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cluster-id") && err.contains("5 lowercase"),
        "{err}"
    );
}
