//! A real PostgreSQL server (Debian's) for tests, started on 127.0.0.1 as an unprivileged
//! user (`adc-test` when running as root, as `scripts/test` sets up), plus the sessions and
//! queries the dispatcher-lock tests need.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub fn pg_bin() -> Option<std::path::PathBuf> {
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
pub fn pg_bin_or_skip() -> Option<std::path::PathBuf> {
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
pub fn unprivileged(program: &Path) -> (Command, Option<(u32, u32)>) {
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

pub struct Postgres {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_postgres(bin: &Path) -> Postgres {
    start_postgres_tls(bin, None)
}

/// A server that also speaks TLS with this certificate and key (PEM) when given.
pub fn start_postgres_tls(bin: &Path, tls: Option<(&str, &str)>) -> Postgres {
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
pub fn pg_params(port: u16) -> std::collections::BTreeMap<String, String> {
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
pub async fn admin_session(port: u16) -> tokio_postgres::Client {
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
pub async fn lock_holder(admin: &tokio_postgres::Client) -> Option<i32> {
    admin
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = 10005",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}
