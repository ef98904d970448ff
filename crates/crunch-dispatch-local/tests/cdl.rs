//! The `crunch-dispatch-local` binary against the fake Arvados API, with `fake-crunch-run`
//! (or `echo`, or a missing program) as its crunch-run: spec AC-CDL-1…5 and the end-to-end
//! run of 20 containers.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use testkit::{ContainerSpec, FakeArvados, FakeConfig, Fault, FaultKind};

const BIN: &str = env!("CARGO_BIN_EXE_crunch-dispatch-local");

/// `fake-crunch-run`, built with the workspace.
fn fake_crunch_run() -> PathBuf {
    testkit::fake_crunch_run_binary()
}

struct Run {
    f: FakeArvados,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Run {
    async fn new() -> Run {
        Run {
            f: FakeArvados::start(FakeConfig::default()).await.unwrap(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        }
    }

    fn lock_dir(&self) -> PathBuf {
        self.dir.path().join("locks")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("dispatcher.log")
    }

    fn start(&mut self, crunch_run: &str) {
        let config = self.dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "Clusters:\n  zzzzz:\n    SystemRootToken: {token}\n    Services:\n      Controller:\n        ExternalURL: {url}\n    Containers:\n      CrunchRunCommand: {cmd}\n      CrunchRunArgumentsList: [\"--lock-dir={locks}\"]\n      ReserveExtraRAM: 0\n",
                token = self.f.root_token(),
                url = self.f.base_url(),
                cmd = crunch_run,
                locks = self.lock_dir().display(),
            ),
        )
        .unwrap();
        let log = File::create(self.log_path()).unwrap();
        self.child = Some(
            Command::new(BIN)
                .arg("--config")
                .arg(&config)
                .args(["-poll-interval", "0.1"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    /// Log messages so far.
    fn messages(&self) -> Vec<String> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["fields"]["message"].as_str().map(String::from))
            .collect()
    }

    /// Whether `text` appears in the log within 30 s. An error message can come only after
    /// the API client has spent its GET retries (up to ~7 s of back-off under the
    /// dispatcher's policy, longer on a loaded machine), so the window is generous; it
    /// returns as soon as the message appears.
    async fn logged(&self, text: &str) -> bool {
        eventually(30, || self.messages().iter().any(|m| m.contains(text))).await
    }

    fn state(&self, u: &str) -> String {
        self.f.container(u).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// SIGTERM the dispatcher; its exit status.
    async fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        for _ in 0..500 {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        panic!("dispatcher did not exit within 10 s of SIGTERM");
    }

    /// Processes whose command line mentions this run's lock directory (our crunch-runs).
    fn crunch_runs(&self) -> Vec<String> {
        let needle = self.lock_dir().display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
                let zombie = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next())
                    == Some("Z");
                let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                (!zombie && text.contains(&needle)).then_some(text)
            })
            .collect()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 50 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

fn spec(run_ms: u64, exit: i64) -> ContainerSpec {
    ContainerSpec {
        environment: vec![
            ("FAKE_CRUNCH_RUN_MS".into(), run_ms.to_string()),
            ("FAKE_CRUNCH_RUN_EXIT".into(), exit.to_string()),
        ],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_cdl_1_runs_a_container_to_complete_and_stops_on_sigterm() {
    let mut r = Run::new().await;
    let u = r.f.add_container(&spec(100, 0));
    r.start(fake_crunch_run().to_str().unwrap());
    assert!(
        eventually(20, || r.state(&u) == "Complete").await,
        "{}",
        r.state(&u)
    );
    assert!(r.logged(&format!("finalized container {u}")).await);
    let queued =
        r.f.container_uuids()
            .iter()
            .filter(|u| r.state(u) == "Queued")
            .count();
    assert_eq!(queued, 0);
    assert!(r.stop().await.success());
}

/// Go logs "error getting count of containers"; this dispatcher pages without a count
/// query, so the message names the list call instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_cdl_2_list_error_is_logged() {
    let mut r = Run::new().await;
    r.f.add_container(&spec(100, 0));
    r.f.inject_fault(
        Fault::new(FaultKind::Status(500))
            .on("GET", "/containers")
            .always(),
    );
    r.start("echo");
    assert!(
        r.logged("error getting list of containers").await,
        "{:?}",
        r.messages()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_cdl_3_lock_error_is_logged() {
    let mut r = Run::new().await;
    let u = r.f.add_container(&spec(100, 0));
    r.f.inject_fault(
        Fault::new(FaultKind::Status(500))
            .on("POST", "/lock")
            .always(),
    );
    r.start("echo");
    assert!(
        r.logged(&format!("error locking container {u}")).await,
        "{:?}",
        r.messages()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_cdl_4_container_left_locked_is_cancelled() {
    let mut r = Run::new().await;
    let u = r.f.add_container(&spec(100, 0));
    r.start("echo");
    let want = format!(
        "after \"echo\" process termination, container state for {u} is \"Locked\"; updating it to \"Cancelled\""
    );
    assert!(r.logged(&want).await, "{:?}", r.messages());
    assert!(eventually(5, || r.state(&u) == "Cancelled").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_cdl_5_nonexistent_command_is_logged_and_cancelled() {
    let mut r = Run::new().await;
    let u = r.f.add_container(&spec(100, 0));
    r.start("nosuchcommand");
    assert!(
        r.logged(&format!("error starting \"nosuchcommand\" for {u}"))
            .await,
        "{:?}",
        r.messages()
    );
    assert!(eventually(5, || r.state(&u) == "Cancelled").await);
}

/// 20 containers run to Complete with their scripted exit codes; one whose priority drops to
/// 0 mid-run ends Cancelled with its process gone; SIGTERM leaves no orphan crunch-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_twenty_containers_priority_zero_and_sigterm() {
    let mut r = Run::new().await;
    let uuids: Vec<(String, i64)> = (0..20)
        .map(|i| {
            let exit = (i % 3) as i64;
            (
                r.f.add_container(&spec(100 + (i * 37 % 200) as u64, exit)),
                exit,
            )
        })
        .collect();
    r.start(fake_crunch_run().to_str().unwrap());
    assert!(
        eventually(60, || uuids.iter().all(|(u, _)| r.state(u) == "Complete")).await,
        "{:?}",
        uuids.iter().map(|(u, _)| r.state(u)).collect::<Vec<_>>()
    );
    for (u, exit) in &uuids {
        assert_eq!(r.f.container(u).unwrap()["exit_code"], *exit, "{u}");
    }

    // Priority 0 mid-run: SIGINT to its crunch-run, which cancels it and exits.
    let long = r.f.add_container(&spec(600_000, 0));
    assert!(eventually(20, || r.state(&long) == "Running").await);
    // (Finished crunch-runs may take a moment to exit after their last update.)
    assert!(
        eventually(10, || r.crunch_runs().len() == 1).await,
        "{:?}",
        r.crunch_runs()
    );
    r.f.set_priority(&long, 0);
    assert!(
        eventually(20, || r.state(&long) == "Cancelled").await,
        "{}",
        r.state(&long)
    );
    assert!(
        eventually(10, || r.crunch_runs().is_empty()).await,
        "{:?}",
        r.crunch_runs()
    );

    // SIGTERM while a container runs: the dispatcher stops it and waits for it.
    let last = r.f.add_container(&spec(600_000, 0));
    assert!(eventually(20, || r.state(&last) == "Running").await);
    assert!(r.stop().await.success());
    assert!(r.crunch_runs().is_empty(), "orphans: {:?}", r.crunch_runs());
    assert_eq!(r.state(&last), "Cancelled");
}
