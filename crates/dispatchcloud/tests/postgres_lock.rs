//! The single-dispatcher lock against a real PostgreSQL server (Debian's), started by this
//! test on 127.0.0.1 as an unprivileged user: a second dispatcher waits until the first lets go.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dispatchcloud::service::dblock::DbLock;
use tokio::sync::watch;

fn pg_bin() -> Option<std::path::PathBuf> {
    let mut versions: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|v| v.join("bin"))
        .filter(|b| b.join("postgres").exists())
}

/// Run `cmd` as an unprivileged user: ourselves, or `adc-test` when we are root.
fn unprivileged(program: &Path) -> (Command, Option<(u32, u32)>) {
    let id = |args: &[&str]| {
        let o = Command::new("id").args(args).output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    if id(&["-u"]) != "0" {
        return (Command::new(program), None);
    }
    let (uid, gid) = (id(&["-u", "adc-test"]), id(&["-g", "adc-test"]));
    assert!(
        !uid.is_empty(),
        "running as root but user adc-test does not exist: run scripts/test"
    );
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(program);
    (c, Some((uid.parse().unwrap(), gid.parse().unwrap())))
}

struct Postgres {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_postgres(bin: &Path) -> Postgres {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let (_, owner) = unprivileged(&bin.join("initdb"));
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
    }
    let (mut initdb, _) = unprivileged(&bin.join("initdb"));
    let out = initdb
        .args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--no-sync"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut pg, _) = unprivileged(&bin.join("postgres"));
    let child = pg
        .arg("-D")
        .arg(&data)
        .arg("-k")
        .arg(dir.path())
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Postgres {
        child,
        port,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_dispatcher_waits_for_the_first_to_release_lock_10005() {
    let Some(bin) = pg_bin() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL missing in CI: scripts/test installs postgresql"
        );
        eprintln!("SKIPPED: PostgreSQL is not installed (scripts/test installs postgresql)");
        return;
    };
    let pg = start_postgres(&bin);
    let params: std::collections::BTreeMap<String, String> = [
        ("host", "127.0.0.1".to_string()),
        ("port", pg.port.to_string()),
        ("user", "postgres".to_string()),
        ("dbname", "postgres".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let (_keep, never) = watch::channel(false);
    // Wait for the server to accept sessions (it listens a moment before it is ready).
    let mut first = None;
    for _ in 0..50 {
        let r = tokio::time::timeout(
            Duration::from_millis(500),
            DbLock::acquire(&params, Duration::from_millis(100), never.clone()),
        )
        .await;
        if let Ok(Some(l)) = r {
            first = Some(l);
            break;
        }
    }
    let first = first.expect("the first dispatcher gets the lock");
    let p = params.clone();
    let n = never.clone();
    let second =
        tokio::spawn(async move { DbLock::acquire(&p, Duration::from_millis(100), n).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!second.is_finished(), "the second dispatcher must wait");
    first.release().await;
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the second gets the lock once the first lets go")
        .unwrap()
        .unwrap();
    // A third gives up cleanly on shutdown while waiting.
    let (stop, rx) = watch::channel(false);
    let p = params.clone();
    let third =
        tokio::spawn(async move { DbLock::acquire(&p, Duration::from_millis(100), rx).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), third)
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    second.release().await;
}
