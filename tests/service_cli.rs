//! The dispatcher binary as an operator runs it: `run` against a (fake) Arvados API with the
//! stub cloud, then the `instances` and `containers` commands against its management API
//! (AC-DSP-6), and a clean exit on SIGTERM.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::Duration;

use testkit::{ContainerSpec, FakeArvados, FakeConfig, Fault, FaultKind};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"));
    c.env_remove("ARVADOS_CONFIG").env("RUST_LOG", "warn");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Dispatcher {
    child: Child,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(f: &FakeArvados) -> Dispatcher {
    start_with_env(f, &[])
}

fn start_with_env(f: &FakeArvados, env: &[(&str, &std::ffi::OsStr)]) -> Dispatcher {
    let dir = tempfile::tempdir().unwrap();
    let port = testkit::free_port();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "Clusters:
  zzzzz:
    SystemRootToken: {token}
    ManagementToken: test-management-token
    Services:
      Controller: {{ExternalURL: \"{api}\"}}
      DispatchCloud:
        InternalURLs: {{\"http://127.0.0.1:{port}\": {{}}}}
    Containers:
      ReserveExtraRAM: 0
      CloudVMs:
        Enable: true
        Driver: stub
        DeployRunnerBinary: \"\"
        PollInterval: 100ms
        ProbeInterval: 100ms
        SyncInterval: 200ms
        TimeoutIdle: 1h
    InstanceTypes:
      type1: {{ProviderType: providertype1, VCPUs: 1, RAM: 4GiB, IncludedScratch: 10GB, Price: 0.123}}
      type2: {{ProviderType: providertype2, VCPUs: 2, RAM: 8GiB, IncludedScratch: 20GB, Price: 0.246}}
",
            token = f.root_token(),
            api = f.base_url(),
        ),
    )
    .unwrap();
    // The dispatch key comes from a file, as operators configure it.
    let key = common::write_private_key(dir.path(), &cloud::sshd::new_ed25519_key());
    let body = std::fs::read_to_string(&config).unwrap().replace(
        "      ReserveExtraRAM: 0\n",
        &format!(
            "      ReserveExtraRAM: 0\n      DispatchPrivateKey: file://{}\n",
            key.display()
        ),
    );
    std::fs::write(&config, body).unwrap();
    let child = bin()
        .args(["run", "--config"])
        .arg(&config)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A loaded CI machine may take a while to start the binary; wait for the listener.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Dispatcher {
        child,
        config,
        _dir: dir,
    }
}

fn cli(d: &Dispatcher, args: &[&str]) -> Output {
    bin()
        .args(args)
        .arg("--config")
        .arg(&d.config)
        .output()
        .unwrap()
}

/// Send SIGTERM to the dispatcher.
fn sigterm(d: &Dispatcher) {
    let pid = d.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Wait (up to a minute: CI machines are slow and loaded) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_dsp_6_instances_cli_against_a_running_dispatcher() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let d = start(&f);
    let u = f.add_container(&ContainerSpec {
        environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "100".into())],
        ..Default::default()
    });
    let list = || {
        let out = cli(&d, &["instances", "list", "--header"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    // The management API lists only VMs the cloud returned (never a pending create), so the
    // one line is the real VM with its id.
    wait_for("one VM", || list().lines().count() == 2);
    let out = list();
    let mut lines = out.lines();
    assert_eq!(
        lines.next().unwrap(),
        "instance\taddress\tstate\tidle-behavior\tconfig-type\tprovider-type\tprice\trunning-containers"
    );
    let vm = lines.next().unwrap().to_string();
    let fields: Vec<&str> = vm.split('\t').collect();
    assert_eq!(fields.len(), 8, "{vm}");
    assert_eq!(fields[0], "inst1,providertype1");
    assert!(
        fields[1] == "-" || fields[1].starts_with("127.0.0.1:"),
        "{vm}"
    );
    assert!(["booting", "idle", "running"].contains(&fields[2]), "{vm}");
    assert_eq!(&fields[3..7], ["run", "type1", "providertype1", "0.123000"]);

    // The container runs; the containers command sees the queue meanwhile or after.
    let state = |u: &str| {
        f.container(u).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    wait_for("container Complete", || state(&u) == "Complete");
    let out = cli(&d, &["containers", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = cli(&d, &["instances", "hold", "inst1,providertype1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).starts_with("inst1,providertype1: 200 OK ("),
        "{}",
        text(&out.stderr)
    );
    assert!(list().contains("\thold\ttype1\t"), "{}", list());

    let out = cli(&d, &["instances", "drain", "inst1,providertype1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_for("drained VM gone or shutting down", || {
        let l = list();
        l.lines().count() == 1 || l.contains("shutdown\tdrain")
    });

    let out = cli(&d, &["instances", "drain", "inst404,providertype404"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("inst404,providertype404: 404 Not Found ("),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&d, &["instances", "hold"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("usage error: no instance IDs provided"));
    // A wrong token is refused by the service and reported.
    let out = cli(&d, &["instances", "list", "--token", "wrong"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("403"), "{}", text(&out.stderr));

    // With --url and a token no config file is read (there is none here), for either
    // command and either way of giving the token.
    let url = std::fs::read_to_string(&d.config)
        .unwrap()
        .split("InternalURLs: {\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    let no_config = || {
        let mut c = bin();
        c.env("ARVADOS_CONFIG", "/nonexistent/arvados/config.yml")
            .env_remove("ARVADOS_MANAGEMENT_TOKEN");
        c
    };
    let out = no_config()
        .args([
            "instances",
            "list",
            "--url",
            &url,
            "--token",
            "test-management-token",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("inst1,providertype1"));
    let out = no_config()
        .args(["containers", "list", "--url", &url])
        .env("ARVADOS_MANAGEMENT_TOKEN", "test-management-token")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The health check, with the config and without.
    let out = cli(&d, &["health"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{url}: OK\n"));
    let out = no_config()
        .args(["health", "--url", &url, "--token", "wrong"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("401") || text(&out.stdout).contains("403"));
    // Without a token it still needs the config, and says so once.
    let out = no_config()
        .args(["instances", "list", "--url", &url])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause is stated once: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_dispatcher_cleanly() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let mut d = start(&f);
    let out = cli(&d, &["instances", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    sigterm(&d);
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = d.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(status.expect("exited within 5 s").success());
}

/// Whatever the API is doing (here: accepting every request and never answering, and a
/// management API client stuck halfway through its headers), SIGTERM ends the process within
/// 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_promptly_while_the_api_never_answers() {
    use std::io::Write;
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    f.add_container(&ContainerSpec::default());
    let mut d = start(&f);
    // The dispatcher is up (its management API answers), then the API goes silent.
    wait_for("management API", || {
        cli(&d, &["instances", "list"]).status.success()
    });
    f.inject_fault(Fault::new(FaultKind::Delay(Duration::from_secs(3600))).always());
    let port = std::fs::read_to_string(&d.config)
        .unwrap()
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let mut slow = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    slow.write_all(b"GET /arvados/v1/dispatch/instances HTTP/1.1\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let t0 = std::time::Instant::now();
    sigterm(&d);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    drop(slow);
}

#[test]
fn run_with_a_bad_dispatch_key_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        "Clusters:\n  zzzzz:\n    SystemRootToken: t\n    Services:\n      Controller: {ExternalURL: \"https://127.0.0.1:1\"}\n    Containers:\n      DispatchPrivateKey: \"-----BEGIN NONSENSE-----\"\n      CloudVMs: {Enable: true, Driver: stub}\n",
    )
    .unwrap();
    let out = bin()
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with(
            "arvados-dispatch-cloud: error parsing configured Containers.DispatchPrivateKey: "
        ),
        "{err}"
    );
}

/// Under systemd (`Type=notify`): READY=1 once the management API answers, STOPPING=1 when
/// SIGTERM arrives, then a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tells_systemd_when_ready_and_when_stopping() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify");
    let rx = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut d = start_with_env(&f, &[("NOTIFY_SOCKET", socket.as_os_str())]);
    let mut buf = [0u8; 256];
    let n = rx.recv(&mut buf).expect("READY=1 within 60 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means serving.
    let out = cli(&d, &["instances", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    sigterm(&d);
    let n = rx.recv(&mut buf).expect("STOPPING=1 within 60 s");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
}
