//! Hot standby with two real `arvados-dispatch-cloud run` processes, a real PostgreSQL holding
//! the dispatcher lock, the fake Arvados API, and a cloud outside both processes (the fake
//! Compute Engine, whose VMs this harness serves over SSH and whose crunch-run lives it
//! records).
//!
//! 1. A standby is read-only: while the lock is held elsewhere it shows the queue and the
//!    instances on its status page and management API, and locks, creates and starts nothing.
//! 2. When the active dispatcher is killed with SIGKILL mid-run, the standby takes over within
//!    5 s of the lock becoming free, adopts the VMs and running containers, and finishes the
//!    work: the cloud's record shows no container run twice and no VM left.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use testkit::fake_gce::FakeGce;
use testkit::postgres::{admin_session, lock_holder, pg_bin_or_skip, start_postgres};
use testkit::stub_driver::LifeLog;
use testkit::{ContainerSpec, FakeArvados, FakeConfig};

const TOKEN: &str = "standby-management-token";

struct Dispatcher {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dispatcher {
    fn start(config: &Path, dir: &Path, name: &str) -> Dispatcher {
        let port = testkit::free_port();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
            .args(["--log-format", "json", "run", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--config")
            .arg(config)
            .env_remove("ARVADOS_CONFIG")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Dispatcher {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// The status page's live view (empty while the process is not answering).
    async fn live(&self) -> String {
        let r = reqwest::Client::new()
            .get(format!("{}/status/live", self.url))
            .header("Cookie", format!("arvados_api_token={TOKEN}"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
            _ => String::new(),
        }
    }

    async fn api(&self, path: &str) -> serde_json::Value {
        reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Poll `cond` every 20 ms until it holds.
async fn until<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct World {
    f: FakeArvados,
    gce: Arc<FakeGce>,
    lives: LifeLog,
    config: PathBuf,
    dir: tempfile::TempDir,
    _harness: (tokio_util::sync::DropGuard, tokio::task::JoinHandle<usize>),
}

async fn world(pg_port: u16) -> World {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let gce = common::gce_vms::one_zone_gce().await;
    let key = cloud::sshd::new_ed25519_key();
    let ssh_port = testkit::free_port();
    let lives = LifeLog::default();
    let rx = tokio_util::sync::CancellationToken::new();
    let stop = rx.clone();
    let harness = tokio::spawn(common::gce_vms::serve_vms(
        gce.clone(),
        ssh_port,
        key.public_key().clone(),
        lives.clone(),
        rx,
    ));
    let dir = tempfile::tempdir().unwrap();
    let key_path = common::write_private_key(dir.path(), &key);
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "Clusters:
  zzzzz:
    SystemRootToken: {root}
    ManagementToken: {TOKEN}
    Services:
      Controller: {{ExternalURL: \"{api}\"}}
    PostgreSQL:
      Connection: {{host: 127.0.0.1, port: \"{pg_port}\", user: postgres, dbname: postgres, sslmode: disable}}
    Containers:
      DispatchPrivateKey: file://{key}
      StaleLockTimeout: 10s
      CloudVMs:
        Enable: true
        Driver: gce
        ImageID: projects/proj/global/images/arvados-compute
        SSHPort: \"{ssh_port}\"
        DeployRunnerBinary: \"\"
        BootProbeCommand: \"true\"
        PollInterval: 200ms
        ProbeInterval: 200ms
        SyncInterval: 500ms
        TimeoutIdle: 3s
        DriverParameters:
          Project: proj
          Zones: [us-central1-a]
          Endpoint: \"{endpoint}\"
          AnonymousCredentials: true
    InstanceTypes:
      small: {{ProviderType: e2-standard-2, VCPUs: 2, RAM: 8GiB, IncludedScratch: 100GB, Price: 0.07}}
",
            root = f.root_token(),
            api = f.base_url(),
            key = key_path.display(),
            endpoint = gce.endpoint(),
        ),
    )
    .unwrap();
    World {
        f,
        gce,
        lives,
        config,
        dir,
        _harness: (stop.drop_guard(), harness),
    }
}

fn add(f: &FakeArvados, n: usize, run_ms: u64) -> Vec<String> {
    (0..n)
        .map(|_| {
            f.add_container(&ContainerSpec {
                environment: vec![("FAKE_CRUNCH_RUN_MS".into(), run_ms.to_string())],
                ..Default::default()
            })
        })
        .collect()
}

/// The cloud's and the API's own records: nothing ran twice or after its end, and every
/// container went Running exactly once.
fn judge(w: &World, uuids: &[String]) {
    let lives = w.lives.lock().clone();
    let changes = w.f.state_changes();
    let mut bad = testkit::oracle::double_runs(&lives);
    bad.extend(testkit::oracle::runs_after_final(&lives, &changes));
    assert!(bad.is_empty(), "{bad:?}");
    for u in uuids {
        let running = changes
            .iter()
            .filter(|c| &c.uuid == u && c.to == "Running")
            .count();
        assert_eq!(running, 1, "{u} went Running {running} times");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_is_read_only_then_takes_over_from_a_killed_dispatcher_within_5s() {
    let Some(bin) = pg_bin_or_skip() else {
        return;
    };
    let pg = start_postgres(&bin);
    let admin = admin_session(pg.port).await;
    let w = world(pg.port).await;
    let state = |u: &str| common_state(&w.f, u);

    // 1. The test itself holds the lock: dispatcher B can only stand by.
    admin
        .execute("SELECT pg_advisory_lock(10005)", &[])
        .await
        .unwrap();
    let first = add(&w.f, 2, 1500);
    let b = Dispatcher::start(&w.config, w.dir.path(), "b");
    until(
        "B's standby view of the queue",
        Duration::from_secs(60),
        || async {
            let live = b.live().await;
            live.contains("data-role=\"standby\"")
                && first.iter().all(|u| {
                    live.contains(&format!("data-container=\"{u}\" data-state=\"Queued\""))
                })
        },
    )
    .await;
    // Several more polls: still nothing locked, created or started.
    let polls = || {
        w.f.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/arvados/v1/containers")
            .count()
    };
    let seen = polls();
    until(
        "B to poll five more times",
        Duration::from_secs(30),
        || async { polls() >= seen + 5 },
    )
    .await;
    assert!(w.f.state_changes().is_empty(), "a standby locked something");
    assert!(w.gce.instances().is_empty(), "a standby created a VM");
    assert!(w.lives.lock().is_empty());
    assert_eq!(
        b.api("/arvados/v1/dispatch/containers").await["items"],
        serde_json::json!([])
    );
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", b.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("arvados_dispatchcloud_active 0"),
        "{metrics}"
    );

    // Let go: B takes over and runs them.
    let freed = Instant::now();
    admin
        .execute("SELECT pg_advisory_unlock(10005)", &[])
        .await
        .unwrap();
    until("B active", Duration::from_secs(10), || async {
        b.live().await.contains(">active<")
    })
    .await;
    let b_takeover = freed.elapsed();
    let b_pid = lock_holder(&admin).await.expect("B holds the lock");
    until(
        "the first containers Complete",
        Duration::from_secs(60),
        || async { first.iter().all(|u| state(u) == "Complete") },
    )
    .await;

    // 2. A starts as the standby, under load B dies with SIGKILL.
    let a = Dispatcher::start(&w.config, w.dir.path(), "a");
    until("A standing by", Duration::from_secs(60), || async {
        a.live().await.contains("data-role=\"standby\"")
    })
    .await;
    let load = add(&w.f, 12, 6000);
    until(
        "several containers Running",
        Duration::from_secs(60),
        || async { load.iter().filter(|u| state(u) == "Running").count() >= 4 },
    )
    .await;
    // A's warm view has the cloud's instances before it holds the lock.
    let listed = a.api("/arvados/v1/dispatch/instances").await["items"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(listed > 0, "A's standby view lists the cloud's VMs");
    let mut b = b;
    let killed = Instant::now();
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    // When PostgreSQL lets go of B's lock, and when A holds it.
    let mut free_at = None;
    let mut taken_at = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while taken_at.is_none() {
        assert!(Instant::now() < deadline, "nobody took the lock over");
        match lock_holder(&admin).await {
            Some(pid) if pid != b_pid => {
                free_at.get_or_insert_with(Instant::now);
                taken_at = Some(Instant::now());
            }
            Some(_) => {}
            None => {
                free_at.get_or_insert_with(Instant::now);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (free_at, taken_at) = (free_at.unwrap(), taken_at.unwrap());
    let takeover = taken_at - free_at;
    // The first crunch-run A starts after the kill.
    until("A starting work", Duration::from_secs(60), || async {
        w.lives.lock().iter().any(|l| l.start > taken_at)
            || load.iter().all(|u| state(u) == "Complete")
    })
    .await;
    let first_start = w
        .lives
        .lock()
        .iter()
        .filter(|l| l.start > taken_at)
        .map(|l| l.start)
        .min();
    eprintln!(
        "takeover: standby B active {:.2?} after the lock was released; after SIGKILL: lock free \
         {:.2?} after the kill, A held it {:.2?} later, first new crunch-run {:?} after the kill",
        b_takeover,
        free_at - killed,
        takeover,
        first_start.map(|t| t - killed)
    );
    assert!(
        takeover <= Duration::from_secs(5),
        "A took {takeover:?} to take the lock after it was free"
    );
    until(
        "every container Complete",
        Duration::from_secs(120),
        || async { load.iter().all(|u| state(u) == "Complete") },
    )
    .await;
    judge(&w, &[first.clone(), load.clone()].concat());
    until("the idle VMs deleted", Duration::from_secs(60), || async {
        w.gce.instances().is_empty()
    })
    .await;
    assert!(
        a.logs().contains("acquired dispatcher lock"),
        "A says it took over: {}",
        a.logs()
    );
    // A stops cleanly on SIGTERM.
    let mut a = a;
    let _ = Command::new("kill").arg(a.child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            assert!(s.success(), "A exits 0 on SIGTERM: {s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "A did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn common_state(f: &FakeArvados, u: &str) -> String {
    f.container(u).unwrap()["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
