//! Real peer: Debian's OpenSSH `sshd`, started by this test on a 127.0.0.x address and a high
//! port with `fake-crunch-run` as `crunch-run` on its PATH, acts as a worker VM. The pool
//! adopts it, boot-probes and verifies it, starts a container that runs on the fake Arvados
//! API, sees it in `--list`, and kills it; a VM presenting the wrong host key is refused.
//!
//! sshd runs unprivileged: as the current user, or — when the tests run as root — as the
//! `adc-test` user that `scripts/test` creates (a `sudo` stand-in on the PATH runs the
//! `sudo crunch-run …` commands the pool sends to a non-root user). The test command installs
//! `openssh-server`; where sshd is missing outside CI the test says so loudly and passes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use arvados::InstanceType;
use cloud::{
    BoxFuture, CloudError, CreateRequest, Instance, InstancePrice, InstanceSet, InstanceTags,
};
use dispatchcloud::scheduler::pool::WorkerPool;
use dispatchcloud::worker::{Pool, PoolConfig};
use dispatchcloud::worker_state::WorkerState;
use testkit::{ContainerSpec, FakeArvados, FakeConfig};

use common::wait_for;

const SSHD: &str = "/usr/sbin/sshd";

fn fake_crunch_run() -> PathBuf {
    testkit::fake_crunch_run_binary()
}

/// Who sshd runs as: the user name, and its uid/gid when we must switch to it (as root).
fn sshd_user() -> (String, Option<(u32, u32)>) {
    let out = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let uid = out(Command::new("id").arg("-u")).unwrap_or_default();
    if uid != "0" {
        return (out(Command::new("id").arg("-un")).unwrap_or_default(), None);
    }
    let test_uid = out(Command::new("id").args(["-u", "adc-test"]));
    let test_gid = out(Command::new("id").args(["-g", "adc-test"]));
    match (test_uid, test_gid) {
        (Some(u), Some(g)) => (
            "adc-test".into(),
            Some((u.parse().unwrap(), g.parse().unwrap())),
        ),
        _ => panic!(
            "running as root but user adc-test does not exist: run scripts/test (it creates it)"
        ),
    }
}

struct Sshd {
    child: Child,
    addr: String,
    user: String,
    host_key: String,
    _dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sshd(client_key: &russh::keys::PrivateKey) -> Sshd {
    start_sshd_with(client_key, None)
}

/// An sshd VM whose `crunch-run` is `script` (a shell script; `@DIR@` is the VM's directory)
/// instead of the fake crunch-run.
fn start_sshd_with(client_key: &russh::keys::PrivateKey, script: Option<&str>) -> Sshd {
    let (user, owner) = sshd_user();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |name: &str, body: &str, mode: u32| {
        let p = d.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let host = cloud::sshd::new_ed25519_key();
    let host_key = write(
        "host_key",
        &host
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .unwrap(),
        0o600,
    );
    write(
        "authorized_keys",
        &format!("{}\n", client_key.public_key().to_openssh().unwrap()),
        0o644,
    );
    let bin = d.join("bin");
    let locks = d.join("lock");
    std::fs::create_dir(&bin).unwrap();
    std::fs::create_dir(&locks).unwrap();
    match script {
        Some(body) => {
            std::fs::write(
                bin.join("crunch-run"),
                body.replace("@DIR@", &d.display().to_string()),
            )
            .unwrap();
        }
        // A copy, not a link: sshd's user may not be able to reach the build directory (it
        // can be under root's home).
        None => {
            std::fs::copy(fake_crunch_run(), bin.join("crunch-run")).unwrap();
        }
    }
    std::fs::set_permissions(
        bin.join("crunch-run"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    write("bin/sudo", "#!/bin/sh\nexec \"$@\"\n", 0o755);
    // A free port on a 127.0.0.x address of our own.
    let ip = format!("127.0.0.{}", 2 + std::process::id() % 200);
    let port = std::net::TcpListener::bind((ip.as_str(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write(
        "sshd_config",
        &format!(
            "ListenAddress {ip}:{port}\nHostKey {hk}\nPidFile none\nAuthorizedKeysFile {d}/authorized_keys\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nLogLevel ERROR\n\
             SetEnv PATH={d}/bin:/usr/bin:/bin FAKE_CRUNCH_RUN_LOCK_DIR={d}/lock\n",
            hk = host_key.display(),
            d = d.display(),
        ),
        0o644,
    );
    let mut cmd = if let Some((uid, gid)) = owner {
        let _ = write("sshd.log", "", 0o644);
        for p in [
            d.to_path_buf(),
            bin.clone(),
            host_key.clone(),
            locks.clone(),
            config.clone(),
            d.join("sshd.log"),
        ] {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
        }
        // setpriv execs sshd itself, so killing the child kills sshd.
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .args(["--clear-groups", SSHD]);
        c
    } else {
        Command::new(SSHD)
    };
    cmd.arg("-D")
        .arg("-E")
        .arg(d.join("sshd.log"))
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().unwrap();
    let addr = format!("{ip}:{port}");
    for _ in 0..200 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Sshd {
        child,
        addr,
        user,
        host_key: host.public_key().to_openssh().unwrap(),
        _dir: dir,
    }
}

/// The sshd as a cloud instance; `host_key` is what the "cloud" says the VM's key is.
#[derive(Debug)]
struct SshdVm {
    id: String,
    addr: String,
    user: String,
    host_key: String,
}

impl Instance for SshdVm {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn provider_type(&self) -> String {
        "sshd".into()
    }
    fn tags(&self) -> InstanceTags {
        [
            (
                "ArvadosInstanceSetID".to_string(),
                "openssh-test".to_string(),
            ),
            ("ArvadosInstanceType".to_string(), "sshd".to_string()),
        ]
        .into()
    }
    fn address(&self) -> String {
        self.addr.clone()
    }
    fn remote_user(&self) -> String {
        self.user.clone()
    }
    fn set_tags(&self, _: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(async { Ok(()) })
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(async { Ok(()) })
    }
    fn price_history(&self, _: &InstanceType) -> Vec<InstancePrice> {
        Vec::new()
    }
    fn verify_host_key(&self, key: &str) -> BoxFuture<'_, Result<(), CloudError>> {
        let r = cloud::sshd::check_host_key(&self.host_key, key);
        Box::pin(async move { r })
    }
}

/// A cluster whose one instance type is the sshd VM, with quick probes and syncs.
fn sshd_cluster() -> arvados::Cluster {
    let mut cluster = arvados::Cluster {
        cluster_id: "zzzzz".into(),
        ..Default::default()
    };
    let vms = &mut cluster.containers.cloud_vms;
    vms.deploy_runner_binary = String::new();
    vms.boot_probe_command = "true".into();
    vms.probe_interval = Duration::from_millis(50);
    vms.sync_interval = Duration::from_millis(200);
    cluster.instance_types.insert(
        "sshd".into(),
        InstanceType {
            name: "sshd".into(),
            provider_type: "sshd".into(),
            vcpus: 1,
            ram: 1 << 30,
            ..Default::default()
        },
    );
    cluster
}

struct Cloud(Vec<Arc<SshdVm>>);

impl InstanceSet for Cloud {
    fn create(
        &self,
        _: &InstanceType,
        _: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        Box::pin(async { Err(CloudError::other("no creates in this test")) })
    }
    fn instances(
        &self,
        _: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let v = self
            .0
            .iter()
            .map(|v| v.clone() as Arc<dyn Instance>)
            .collect();
        Box::pin(async move { Ok(v) })
    }
    fn instance_quota_group(&self, _: &InstanceType) -> String {
        String::new()
    }
    fn stop(&self) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_sshd_acts_as_a_worker_vm() {
    if !Path::new(SSHD).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{SSHD} missing in CI: scripts/test installs openssh-server"
        );
        eprintln!("SKIPPED: {SSHD} is not installed (scripts/test installs openssh-server)");
        return;
    }
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let sshd = start_sshd(&key);
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let good = Arc::new(SshdVm {
        id: "good".into(),
        addr: sshd.addr.clone(),
        user: sshd.user.clone(),
        host_key: sshd.host_key.clone(),
    });
    let impostor = Arc::new(SshdVm {
        id: "impostor".into(),
        addr: sshd.addr.clone(),
        user: sshd.user.clone(),
        host_key: cloud::sshd::new_ed25519_key()
            .public_key()
            .to_openssh()
            .unwrap(),
    });
    let mut cluster = sshd_cluster();
    cluster.system_root_token = f.root_token().into();
    cluster.services.controller.external_url = f.base_url().into();
    let cfg = PoolConfig::from_cluster(&cluster, "openssh-test", key.clone());
    let pool = Pool::new(
        cfg,
        Arc::new(Cloud(vec![good, impostor])),
        &prometheus::Registry::new(),
    )
    .unwrap();
    pool.start();
    wait_for("the sshd VM in service", Duration::from_secs(20), || {
        pool.worker("good")
            .is_some_and(|v| v.worker_state == WorkerState::Idle)
    })
    .await;

    let api = arvados::Client::new(arvados::ClientConfig {
        base_url: url::Url::parse(f.base_url()).unwrap(),
        token: f.root_token().into(),
        insecure: false,
        timeout: None,
        retry: Default::default(),
    })
    .unwrap();
    let u = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "600000".into())],
        ..Default::default()
    });
    let ctr = api.lock_container(&u).await.unwrap();
    assert!(pool.start_container("good", &ctr));
    let state = |u: &str| {
        f.container(u).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    wait_for("container Running", Duration::from_secs(20), || {
        state(&u) == "Running"
    })
    .await;
    // The run probe (`crunch-run --list` through sshd) confirms it.
    wait_for("container seen by --list", Duration::from_secs(20), || {
        pool.worker("good").is_some_and(|v| {
            v.running_container_uuids == [u.clone()] && v.worker_state == WorkerState::Running
        })
    })
    .await;
    assert!(pool.kill_container(&u, "test"));
    wait_for(
        "container cancelled by --kill 15",
        Duration::from_secs(20),
        || state(&u) == "Cancelled",
    )
    .await;
    wait_for(
        "worker idle after the kill",
        Duration::from_secs(20),
        || {
            pool.worker("good").is_some_and(|v| {
                v.worker_state == WorkerState::Idle && v.running_container_uuids.is_empty()
            })
        },
    )
    .await;
    // Same address, but not the host key the cloud vouches for: never in service.
    let impostor = pool.worker("impostor").unwrap();
    assert_eq!(impostor.worker_state, WorkerState::Unknown);
    assert!(!pool.start_container("impostor", &ctr));
    pool.stop();
}

/// A worker whose `crunch-run --list` prints lines that are not container uuids but shell
/// commands: none of them is taken for a container, so none ends up in a later command line
/// (`--kill`), and no file appears on the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_lines_that_are_shell_commands_run_nothing() {
    if !Path::new(SSHD).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "sshd missing in CI: scripts/test installs openssh-server"
        );
        eprintln!("SKIPPED: {SSHD} is not installed");
        return;
    }
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let script = r#"#!/bin/sh
case "$*" in
*--list*)
  echo 'zzzzz-dz642-x;touch @DIR@/pwned1'
  echo 'zzzzz-dz642-000000000000001 $(touch @DIR@/pwned2)'
  echo 'zzzzz-dz642-00000000000000`touch @DIR@/pwned3`'
  echo 'zzzzz-dz642-x;touch${IFS}@DIR@/pwned4'
  exit 0;;
esac
exit 0
"#;
    let sshd = start_sshd_with(&key, Some(script));
    let dir = sshd._dir.path().to_path_buf();
    let vm = Arc::new(SshdVm {
        id: "evil".into(),
        addr: sshd.addr.clone(),
        user: sshd.user.clone(),
        host_key: sshd.host_key.clone(),
    });
    let cluster = sshd_cluster();
    let cfg = PoolConfig::from_cluster(&cluster, "openssh-test", key.clone());
    let pool = Pool::new(cfg, Arc::new(Cloud(vec![vm])), &prometheus::Registry::new()).unwrap();
    pool.start();
    wait_for("the VM in service", Duration::from_secs(20), || {
        pool.worker("evil")
            .is_some_and(|v| v.worker_state.is_ready())
    })
    .await;
    // Several more probes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(pool.running().is_empty(), "{:?}", pool.running());
    // Were the no-space line taken for a container, killing it (as sync does with a process
    // it does not know) would run it.
    let evil = format!("zzzzz-dz642-x;touch${{IFS}}{}/pwned4", dir.display());
    assert!(!pool.kill_container(&evil, "test"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    for f in ["pwned1", "pwned2", "pwned3", "pwned4"] {
        assert!(!dir.join(f).exists(), "{f} appeared on the VM");
    }
    pool.stop();
}
