//! The `fake-crunch-run` binary against the fake API, the way the dispatcher drives it:
//! `--detach --stdin-config`, `--list`, `--kill 15`, failure modes.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use arvados::{Client, ClientConfig};
use serde_json::json;
use testkit::{ContainerSpec, FakeArvados, FakeConfig};

const BIN: &str = env!("CARGO_BIN_EXE_fake-crunch-run");

struct Setup {
    f: FakeArvados,
    dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    Setup {
        f: FakeArvados::start(FakeConfig::default()).await.unwrap(),
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Setup {
    /// A new Queued container with this environment.
    fn queued(&self, env: &[(&str, &str)]) -> String {
        self.f.add_container(&ContainerSpec {
            environment: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
    }

    async fn lock(&self, u: &str) {
        Client::new(ClientConfig {
            base_url: url::Url::parse(self.f.base_url()).unwrap(),
            token: self.f.root_token().into(),
            insecure: false,
            timeout: None,
            retry: Default::default(),
        })
        .unwrap()
        .lock_container(u)
        .await
        .unwrap();
    }

    fn cmd(&self, args: &[&str], stdin: &str) -> (i32, String) {
        let mut child = Command::new(BIN)
            .arg("--lock-dir")
            .arg(self.dir.path())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn config(&self) -> String {
        json!({"Env": {
            "ARVADOS_API_HOST": self.f.base_url(),
            "ARVADOS_API_TOKEN": self.f.root_token(),
        }, "KeepBuffers": 0})
        .to_string()
    }

    fn state(&self, u: &str) -> String {
        self.f.container(u).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn wait_state(&self, u: &str, want: &str) -> bool {
        for _ in 0..250 {
            if self.state(u) == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_runs_to_complete_with_the_scripted_exit_code() {
    let s = setup().await;
    let u = s.queued(&[
        ("FAKE_CRUNCH_RUN_MS", "1500"),
        ("FAKE_CRUNCH_RUN_EXIT", "3"),
    ]);
    s.lock(&u).await;
    let (code, out) = s.cmd(&["--detach", "--stdin-config", &u], &s.config());
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["UUID"], u);
    assert!(v["PID"].as_u64().unwrap() > 0);
    assert!(s.wait_state(&u, "Running").await);
    let (code, listed) = s.cmd(&["--list"], "");
    assert_eq!(code, 0);
    assert_eq!(listed, format!("{u}\n"));
    // A second start while it runs is refused.
    let (code, _) = s.cmd(&["--detach", "--stdin-config", &u], &s.config());
    assert_eq!(code, 1);
    assert!(s.wait_state(&u, "Complete").await);
    assert_eq!(s.f.container(&u).unwrap()["exit_code"], 3);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.cmd(&["--list"], "").1, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_15_cancels_a_running_container() {
    let s = setup().await;
    let u = s.queued(&[("FAKE_CRUNCH_RUN_MS", "60000")]);
    s.lock(&u).await;
    assert_eq!(s.cmd(&["--detach", "--stdin-config", &u], &s.config()).0, 0);
    assert!(s.wait_state(&u, "Running").await);
    assert_eq!(s.cmd(&["--kill", "15", &u], "").0, 0);
    assert!(s.wait_state(&u, "Cancelled").await);
    assert_eq!(s.cmd(&["--list"], "").1, "");
    assert_eq!(s.cmd(&["--kill", "15", &u], "").0, 0, "no such process: 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_needs_api_host_and_token() {
    let s = setup().await;
    let u = s.queued(&[]);
    let (code, _) = s.cmd(
        &["--detach", "--stdin-config", &u],
        &json!({"Env": {"ARVADOS_API_HOST": s.f.base_url()}}).to_string(),
    );
    assert_eq!(code, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_modes_crash_and_broken() {
    let s = setup().await;
    let u = s.queued(&[
        ("FAKE_CRUNCH_RUN_MS", "50"),
        ("FAKE_CRUNCH_RUN_FAIL", "crash"),
    ]);
    s.lock(&u).await;
    assert_eq!(s.cmd(&["--detach", "--stdin-config", &u], &s.config()).0, 0);
    assert!(s.wait_state(&u, "Running").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.state(&u), "Running", "crashed without a final update");
    assert_eq!(s.cmd(&["--list"], "").1, "", "process gone");

    let b = s.queued(&[
        ("FAKE_CRUNCH_RUN_MS", "50"),
        ("FAKE_CRUNCH_RUN_FAIL", "broken"),
    ]);
    s.lock(&b).await;
    assert_eq!(s.cmd(&["--detach", "--stdin-config", &b], &s.config()).0, 0);
    assert!(s.wait_state(&b, "Complete").await);
    assert!(s.cmd(&["--list"], "").1.ends_with("broken\n"));
}

/// Foreground mode, as crunch-dispatch-local runs it, with the API from the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_run_with_runtime_engine_flag() {
    let s = setup().await;
    let u = s.queued(&[("FAKE_CRUNCH_RUN_MS", "100")]);
    s.lock(&u).await;
    let status = Command::new(BIN)
        .args(["--runtime-engine=docker", "--lock-dir"])
        .arg(s.dir.path())
        .arg(&u)
        .env("ARVADOS_API_HOST", s.f.base_url())
        .env("ARVADOS_API_TOKEN", s.f.root_token())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(s.state(&u), "Complete");
}

/// A TERM that arrives before the container is Running puts it back in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn term_before_running_requeues() {
    let s = setup().await;
    let u = s.queued(&[("FAKE_CRUNCH_RUN_MS", "60000")]);
    s.lock(&u).await;
    // Hold the worker's "Running" update for a while so the signal lands before it.
    s.f.inject_fault(
        testkit::Fault::new(testkit::FaultKind::Delay(Duration::from_millis(1500)))
            .on("PUT", &format!("/containers/{u}"))
            .times(1),
    );
    let (code, out) = s.cmd(&["--detach", "--stdin-config", &u], &s.config());
    assert_eq!(code, 0);
    let pid = serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["PID"]
        .as_u64()
        .unwrap();
    // Signal once the worker's "Running" update has reached the server (and is being held).
    let path = format!("/arvados/v1/containers/{u}");
    for _ in 0..250 {
        if s.f
            .requests()
            .iter()
            .any(|r| r.method == "PUT" && r.path == path)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.wait_state(&u, "Queued").await, "{}", s.state(&u));
}
