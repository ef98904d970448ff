//! The `crunch-dispatch-slurm` binary end to end against a real Slurm (Debian's slurm-wlm on
//! 127.0.0.1, one 4-CPU node) and the fake Arvados API, with `fake-crunch-run` as crunch-run
//! inside the Slurm jobs.
//!
//! The judge of "nothing submitted twice" is Slurm's own job list (`squeue --states=all`
//! keeps finished jobs for `MinJobAge` = 60 s), not the dispatcher's logs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::slurm::{NodeSize, SlurmCluster};
use testkit::{ContainerSpec, FakeArvados, FakeConfig};

const BIN: &str = env!("CARGO_BIN_EXE_crunch-dispatch-slurm");

struct Setup {
    f: FakeArvados,
    slurm: SlurmCluster,
    dir: tempfile::TempDir,
    dispatcher: Option<Child>,
    starts: usize,
}

impl Setup {
    async fn new() -> Option<Setup> {
        if !testkit::slurm::available_or_skip() {
            return None;
        }
        let slurm = tokio::task::spawn_blocking(|| SlurmCluster::start(NodeSize::default()))
            .await
            .unwrap()
            .expect("Slurm starts");
        Some(Setup {
            f: FakeArvados::start(FakeConfig::default()).await.unwrap(),
            slurm,
            dir: tempfile::tempdir().unwrap(),
            dispatcher: None,
            starts: 0,
        })
    }

    fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("dispatcher-{}.log", self.starts))
    }

    /// Start the dispatcher (again).
    fn start(&mut self, extra: &[&str]) {
        self.starts += 1;
        let config = self.dir.path().join("config.yml");
        let port = testkit::free_port();
        std::fs::write(
            &config,
            format!(
                "Clusters:\n  {id}:\n    SystemRootToken: {token}\n    ManagementToken: mgmt\n    Services:\n      Controller:\n        ExternalURL: {url}\n      DispatchSLURM:\n        InternalURLs:\n          \"http://127.0.0.1:{port}\": {{}}\n    Containers:\n      CrunchRunCommand: {cmd}\n      CrunchRunArgumentsList: [\"--lock-dir={locks}\"]\n      ReserveExtraRAM: 0\n      CloudVMs:\n        PollInterval: 0.3s\n",
                id = self.f.cluster_id(),
                token = self.f.root_token(),
                url = self.f.base_url(),
                cmd = testkit::fake_crunch_run_binary().display(),
                locks = self.dir.path().join("locks").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(BIN)
            .arg("-config")
            .arg(&config)
            .arg("-skip-legacy")
            .args(extra)
            .envs(self.slurm.env())
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.dispatcher = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.dispatcher.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(self.dir.path().join(format!("dispatcher-{i}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn container(&self, uuid: &str) -> Value {
        self.f.container(uuid).unwrap()
    }

    fn state(&self, uuid: &str) -> String {
        self.container(uuid)["state"].as_str().unwrap().to_string()
    }

    /// Wait (up to `secs`) until `f` holds; panic with the logs if it never does.
    async fn wait(&self, secs: u64, what: &str, mut f: impl FnMut(&Setup) -> bool) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(secs) {
            if f(self) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "not within {secs} s: {what}\njobs: {:?}\ncontainers: {:?}\ndispatcher log:\n{}\nslurm logs:\n{}",
            self.slurm.jobs(),
            self.f.count_by_state(),
            tail(&self.log(), 40),
            self.slurm.logs()
        );
    }

    /// Every job Slurm has seen recently (finished ones included), per name: how many.
    fn submissions(&self) -> BTreeMap<String, usize> {
        let out = self
            .slurm
            .command(
                "squeue",
                &["--all", "--noheader", "--states=all", "--format=%j"],
            )
            .unwrap();
        let mut n = BTreeMap::new();
        for name in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
            *n.entry(name.to_string()).or_insert(0) += 1;
        }
        n
    }

    fn job(&self, name: &str) -> Option<testkit::slurm::SlurmJob> {
        self.slurm.jobs().into_iter().find(|j| j.name == name)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn spec(vcpus: i64, priority: i64, run_ms: u64) -> ContainerSpec {
    ContainerSpec {
        priority,
        vcpus,
        ram: 256 << 20,
        keep_cache_disk: Some(0),
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), run_ms.to_string())],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_slurm_containers_run_to_complete_reniced_and_cancelled() {
    let Some(mut s) = Setup::new().await else {
        return;
    };
    // Four quick containers fit the 4-CPU node together.
    let quick: Vec<String> = (0..4)
        .map(|_| s.f.add_container(&spec(1, 500, 300)))
        .collect();
    s.start(&[]);
    s.wait(60, "the quick containers complete", |s| {
        quick.iter().all(|u| s.state(u) == "Complete")
    })
    .await;
    for u in &quick {
        assert_eq!(s.container(u)["exit_code"], 0);
    }

    // A long container fills the node; two more wait behind it in Slurm.
    let blocker = s.f.add_container(&spec(4, 900, 120_000));
    s.wait(30, "the blocker runs", |s| s.state(&blocker) == "Running")
        .await;
    let low = s.f.add_container(&spec(4, 500, 300));
    let high = s.f.add_container(&spec(4, 600, 300));
    s.wait(
        30,
        "both waiting jobs are queued in Slurm and reniced",
        |s| match (s.job(&low), s.job(&high)) {
            (Some(l), Some(h)) => l.state == "PENDING" && h.state == "PENDING" && l.nice > h.nice,
            _ => false,
        },
    )
    .await;
    // Raise the low one above the other: the dispatcher renices, visible in squeue.
    assert!(s.f.set_priority(&low, 700));
    s.wait(30, "the raised job is reniced ahead", |s| {
        match (s.job(&low), s.job(&high)) {
            (Some(l), Some(h)) => l.nice < h.nice && l.priority > h.priority,
            _ => false,
        }
    })
    .await;
    // Cancel a waiting container: its job is scancelled, the container unlocked.
    assert!(s.f.set_priority(&high, 0));
    s.wait(30, "the cancelled container's job is gone", |s| {
        s.job(&high).is_none() && s.state(&high) == "Queued"
    })
    .await;
    // Cancel the running one: crunch-run gets TERM through scancel and cancels it.
    assert!(s.f.set_priority(&blocker, 0));
    s.wait(30, "the running container is cancelled", |s| {
        s.state(&blocker) == "Cancelled" && s.job(&blocker).is_none()
    })
    .await;
    s.wait(60, "the raised container completes", |s| {
        s.state(&low) == "Complete"
    })
    .await;
    // Slurm saw exactly one job per container that ran.
    let subs = s.submissions();
    for u in quick.iter().chain([&blocker, &low, &high]) {
        assert_eq!(subs.get(u.as_str()), Some(&1), "{u}: {subs:?}");
    }
    let log = s.log();
    assert!(
        log.contains("running sbatch [\\\"--nice=10000\\\""),
        "{}",
        tail(&log, 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_slurm_bug_7_a_job_too_big_for_the_node_is_cancelled_with_the_reason() {
    let Some(mut s) = Setup::new().await else {
        return;
    };
    // 16 CPUs on a 4-CPU node: Slurm accepts the job and keeps it pending forever.
    let big = s.f.add_container(&spec(16, 500, 300));
    s.start(&["-unrunnable-timeout", "3s"]);
    s.wait(30, "the reason reaches runtime_status", |s| {
        s.container(&big)["runtime_status"]["warning"]
            .as_str()
            .is_some_and(|w| w.contains("PartitionConfig"))
    })
    .await;
    assert_eq!(s.state(&big), "Locked");
    s.wait(30, "the container is cancelled and its job removed", |s| {
        s.state(&big) == "Cancelled" && s.job(&big).is_none()
    })
    .await;
    let c = s.container(&big);
    let error = c["runtime_status"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("PartitionConfig"), "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_slurm_dispatcher_restart_with_jobs_in_flight_submits_nothing_twice() {
    let Some(mut s) = Setup::new().await else {
        return;
    };
    // Two run for a few seconds and fill the node; two more wait in Slurm behind them. The
    // two are queued only once the first two run: submitted together, Slurm may start a
    // short one first (all four have the same nice until the dispatcher renices them), and
    // it finishes before the moment this test waits for ("two running, all four in Slurm").
    let running: Vec<String> = (0..2)
        .map(|_| s.f.add_container(&spec(2, 600, 5000)))
        .collect();
    s.start(&[]);
    s.wait(30, "the first two run", |s| {
        running.iter().all(|u| s.state(u) == "Running")
    })
    .await;
    let waiting: Vec<String> = (0..2)
        .map(|_| s.f.add_container(&spec(2, 500, 300)))
        .collect();
    s.wait(30, "all four are submitted, two running", |s| {
        let jobs = s.slurm.jobs();
        running
            .iter()
            .chain(&waiting)
            .all(|u| jobs.iter().any(|j| &j.name == u))
            && running.iter().all(|u| s.state(u) == "Running")
    })
    .await;
    // The dispatcher dies hard with jobs running and pending in Slurm.
    s.kill9();
    s.start(&[]);
    s.wait(60, "every container completes", |s| {
        running
            .iter()
            .chain(&waiting)
            .all(|u| s.state(u) == "Complete")
    })
    .await;
    let subs = s.submissions();
    for u in running.iter().chain(&waiting) {
        assert_eq!(
            subs.get(u.as_str()),
            Some(&1),
            "{u} submitted twice? {subs:?}"
        );
        // Locked once: the restarted dispatcher adopted the lock instead of re-queueing.
        assert_eq!(s.container(u)["lock_count"], 1, "{u}");
    }
    let log = s.log();
    assert!(
        log.contains("Start monitoring container"),
        "{}",
        tail(&log, 20)
    );
}
