//! The single-dispatcher lock against a real PostgreSQL server (Debian's), started by this
//! test on 127.0.0.1 as an unprivileged user: a second dispatcher waits until the first lets go;
//! a dispatcher whose lock session is killed stops dispatching and the waiting one takes over.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dispatchcloud::scheduler::pool::WorkerPool;
use dispatchcloud::service::dblock::DbLock;
use dispatchcloud::service::{RunError, Service};
use testkit::stub_driver::{StubConfig, StubSet};
use testkit::{ContainerSpec, FakeArvados, FakeConfig};
use tokio::sync::watch;

use common::{SharedStub, wait_for};

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

/// The PostgreSQL binaries; `None` (the test is skipped, loudly) where they are not installed,
/// which CI does not allow.
fn pg_bin_or_skip() -> Option<std::path::PathBuf> {
    let bin = pg_bin();
    if bin.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL missing in CI: scripts/test installs postgresql"
        );
        eprintln!("SKIPPED: PostgreSQL is not installed (scripts/test installs postgresql)");
    }
    bin
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
    start_postgres_tls(bin, None)
}

/// A server that also speaks TLS with this certificate and key (PEM) when given.
fn start_postgres_tls(bin: &Path, tls: Option<(&str, &str)>) -> Postgres {
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
    let mut tls_args: Vec<String> = Vec::new();
    if let Some((cert, key)) = tls {
        let (c, k) = (dir.path().join("server.crt"), dir.path().join("server.key"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&c, Some(uid), Some(gid)).unwrap();
            std::os::unix::fs::chown(&k, Some(uid), Some(gid)).unwrap();
        }
        for setting in [
            "ssl=on".to_string(),
            format!("ssl_cert_file={}", c.display()),
            format!("ssl_key_file={}", k.display()),
        ] {
            tls_args.push("-c".into());
            tls_args.push(setting);
        }
    }
    let (mut pg, _) = unprivileged(&bin.join("postgres"));
    let child = pg
        .args(&tls_args)
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
    let Some(bin) = pg_bin_or_skip() else {
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

fn pg_params(port: u16) -> std::collections::BTreeMap<String, String> {
    [
        ("host", "127.0.0.1".to_string()),
        ("port", port.to_string()),
        ("user", "postgres".to_string()),
        ("dbname", "postgres".to_string()),
        ("sslmode", "disable".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A plain session for the test's own queries, once the server accepts them.
async fn admin_session(port: u16) -> tokio_postgres::Client {
    let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    for _ in 0..100 {
        if let Ok((client, conn)) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await
        {
            tokio::spawn(conn);
            if client.simple_query("SELECT 1").await.is_ok() {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("PostgreSQL did not accept sessions");
}

/// The backend pid holding advisory lock 10005, if any.
async fn lock_holder(admin: &tokio_postgres::Client) -> Option<i32> {
    admin
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = 10005",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_lost_stops_dispatch_and_the_waiting_dispatcher_takes_over() {
    let Some(bin) = pg_bin_or_skip() else {
        return;
    };
    let pg = start_postgres(&bin);
    let admin = admin_session(pg.port).await;
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let mut cluster = common::stub_service_cluster(&f, "tok");
    cluster.postgresql.connection = pg_params(pg.port);
    cluster.containers.cloud_vms.timeout_idle = Duration::from_secs(30);
    cluster.containers.stale_lock_timeout = Duration::from_secs(1);
    // One cloud, seen by both dispatchers (the second adopts the first's VMs).
    let set = Arc::new(StubSet::new(
        StubConfig::from_params(&serde_json::json!({})).unwrap(),
    ));
    let mut drivers = cloud::registry::Registry::new();
    drivers.register("stub", Arc::new(SharedStub(set.clone())));
    let a = Service::build(&cluster, &drivers).unwrap();
    let b = Service::build(&cluster, &drivers).unwrap();
    let (stop, rx) = watch::channel(false);
    let (s, r) = (a.clone(), rx.clone());
    let run_a = tokio::spawn(async move { s.run(r).await });
    let mut holder = None;
    for _ in 0..200 {
        holder = lock_holder(&admin).await;
        if holder.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_pid = holder.expect("the first dispatcher takes the lock");
    let (s, r) = (b.clone(), rx.clone());
    let run_b = tokio::spawn(async move { s.run(r).await });

    // Long-running containers, so some are running when the lock goes.
    let uuids: Vec<String> = (0..6)
        .map(|_| {
            f.add_container(&ContainerSpec {
                environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "3000".into())],
                ..Default::default()
            })
        })
        .collect();
    let state = |u: &str| common::container_state(&f, u);
    wait_for("a container running", Duration::from_secs(60), || {
        uuids.iter().any(|u| state(u) == "Running")
    })
    .await;
    assert!(
        !run_b.is_finished(),
        "the second dispatcher waits for the lock"
    );

    // Kill the first dispatcher's lock session.
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&first_pid])
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), run_a)
        .await
        .expect("the first dispatcher stops at once")
        .unwrap();
    assert!(matches!(result, Err(RunError::LockLost)), "{result:?}");
    // It dispatches nothing more.
    assert!(a.pool.create(&common::fixture_type(1)).is_none());
    let creates_before = set.vms().len();

    // The second takes over and finishes everything, starting nothing twice.
    wait_for(
        "the second dispatcher to hold the lock",
        Duration::from_secs(30),
        || !run_b.is_finished(),
    )
    .await;
    let mut second_pid = None;
    for _ in 0..300 {
        second_pid = lock_holder(&admin).await.filter(|p| *p != first_pid);
        if second_pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(second_pid.is_some(), "the second dispatcher takes the lock");
    wait_for("every container Complete", Duration::from_secs(120), || {
        uuids.iter().all(|u| state(u) == "Complete")
    })
    .await;
    let violations = testkit::oracle::violations(&set, &f.state_changes());
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(set.vms().len() >= creates_before.min(1));
    stop.send(true).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), run_b)
        .await
        .expect("the second stops on shutdown")
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    drop(pg);
}

/// `sslmode` as libpq means it, against a server with a self-signed certificate: `require`
/// encrypts without checking it, `verify-full` accepts it only with that certificate as
/// `sslrootcert`, and refuses the server otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_connections_honour_sslmode() {
    use dispatchcloud::service::pgtls;
    let Some(bin) = pg_bin_or_skip() else {
        return;
    };
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
    let pg = start_postgres_tls(&bin, Some((&cert, &key)));
    let _ = admin_session(pg.port).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let other = dir.path().join("other.pem");
    let other_ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(&other, other_ck.cert.pem()).unwrap();
    let params = |mode: &str, root: Option<&Path>| {
        let mut p = pg_params(pg.port);
        p.insert("sslmode".into(), mode.into());
        if let Some(r) = root {
            p.insert("sslrootcert".into(), r.display().to_string());
        }
        p
    };
    let encrypted = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, bool>(0)
    };
    for (mode, root, want_tls) in [
        ("disable", None, false),
        ("prefer", None, true),
        ("require", None, true),
        ("verify-full", Some(ca.as_path()), true),
        ("verify-ca", Some(ca.as_path()), true),
    ] {
        let (client, task, _, _) = pgtls::connect(&params(mode, root), Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(encrypted(client).await, want_tls, "{mode}");
        task.abort();
    }
    let refused = pgtls::connect(
        &params("verify-full", Some(&other)),
        Duration::from_secs(10),
    )
    .await;
    let Err(e) = refused else {
        panic!("a server whose certificate the root does not sign is refused");
    };
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}
