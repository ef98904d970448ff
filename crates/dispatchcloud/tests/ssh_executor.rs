//! The SSH executor against in-process SSH servers (real SSH on 127.0.0.1): AC-SSH-1,
//! AC-SSH-2, the instance-secret fallback, deadlines, and concurrent sessions.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados::InstanceType;
use cloud::sshd::{CommandHandler, Outcome, OutcomeFuture, SshVm, new_ed25519_key};
use cloud::{BoxFuture, CloudError, Instance, InstancePrice, InstanceTags};
use dispatchcloud::ssh_executor::{ExecError, Executor, Target, Timeouts};

/// A VM as the executor sees it: an address, a user and a host-key verdict.
#[derive(Debug)]
struct Vm {
    addr: Mutex<String>,
    user: String,
    /// `None`: the driver cannot verify host keys.
    verdict: Option<Result<(), String>>,
    /// When set, only this host key (OpenSSH text) is the VM's.
    pinned: Option<String>,
}

impl Instance for Vm {
    fn id(&self) -> String {
        "vm".into()
    }
    fn provider_type(&self) -> String {
        "t".into()
    }
    fn tags(&self) -> InstanceTags {
        InstanceTags::new()
    }
    fn address(&self) -> String {
        self.addr.lock().unwrap().clone()
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
        if let Some(p) = &self.pinned {
            let r = if p == key {
                Ok(())
            } else {
                Err(CloudError::other("host key mismatch"))
            };
            return Box::pin(async move { r });
        }
        let r = match &self.verdict {
            None => Err(CloudError::not_implemented()),
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(CloudError::other(e.clone())),
        };
        Box::pin(async move { r })
    }
}

/// The AC-SSH-2 command: checks command, env and stdin; answers with the configured code.
struct Ac2 {
    code: Arc<AtomicU32>,
    runs: Arc<AtomicUsize>,
}

impl CommandHandler for Ac2 {
    fn run(&self, user: &str, command: &str, stdin: Vec<u8>) -> OutcomeFuture {
        self.run_with_env(user, command, Vec::new(), stdin)
    }

    fn run_with_env(
        &self,
        _user: &str,
        command: &str,
        env: Vec<(String, String)>,
        stdin: Vec<u8>,
    ) -> OutcomeFuture {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let code = self.code.load(Ordering::SeqCst);
        let command = command.to_string();
        Box::pin(async move {
            if command == "sleep forever" {
                return std::future::pending().await;
            }
            if command == "cat /var/run/arvados-instance-secret" {
                return Outcome::ok("the-secret");
            }
            if command != r#"foo 'bar' "baz""# {
                return Outcome::fail(99, format!("unexpected command {command:?}"));
            }
            if !env.contains(&("TESTVAR".into(), "test value".into())) {
                return Outcome::fail(99, format!("env {env:?}"));
            }
            let mut stdout = b"stdout\n".to_vec();
            stdout.extend_from_slice(&stdin);
            Outcome {
                exit: code,
                stdout,
                stderr: b"stderr\n".to_vec(),
            }
        })
    }
}

struct Rig {
    server: SshVm,
    code: Arc<AtomicU32>,
    runs: Arc<AtomicUsize>,
    key: Arc<russh::keys::PrivateKey>,
}

async fn rig() -> Rig {
    let key = new_ed25519_key();
    let (code, runs) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicUsize::new(0)));
    let handler = Arc::new(Ac2 {
        code: code.clone(),
        runs: runs.clone(),
    });
    let server = SshVm::start(handler, vec![key.public_key().clone()])
        .await
        .unwrap();
    Rig {
        server,
        code,
        runs,
        key: Arc::new(key),
    }
}

fn target(
    addr: String,
    user: &str,
    verdict: Option<Result<(), String>>,
    secret: Option<&str>,
) -> Target {
    Target {
        instance: Arc::new(Vm {
            addr: Mutex::new(addr),
            user: user.into(),
            verdict,
            pinned: None,
        }),
        secret: secret.map(String::from),
        on_verified: None,
    }
}

fn env() -> Vec<(String, String)> {
    vec![("TESTVAR".into(), "test value".into())]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_ssh_1_bad_host_key_fails_and_runs_nothing() {
    let r = rig().await;
    let t = target(
        r.server.addr().to_string(),
        "root",
        Some(Err("bad key".into())),
        None,
    );
    let ex = Executor::new(t, r.key.clone(), "22", Timeouts::default());
    let f = ex.execute(&[], "true", b"").await.unwrap_err();
    assert!(matches!(f.error, ExecError::HostKey(_)), "{f}");
    assert!(
        f.to_string().starts_with("host key failed verification: "),
        "{f}"
    );
    assert_eq!(
        r.runs.load(Ordering::SeqCst),
        0,
        "no command may run on an unverified host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_ssh_2_execute_env_stdin_exit_codes_and_ports() {
    let r = rig().await;
    for code in [0, 1, 2] {
        r.code.store(code, Ordering::SeqCst);
        // Address without a port: the configured port is used. Port 0 (and, here, 22) refuse.
        for port in ["0", "22"] {
            let t = target("127.0.0.1".into(), "root", Some(Ok(())), None);
            let ex = Executor::new(t, r.key.clone(), port, Timeouts::default());
            let f = ex.execute(&env(), "true", b"").await.unwrap_err();
            assert!(
                matches!(f.error, ExecError::Dial(_) | ExecError::Auth),
                "port {port}: {f}"
            );
        }
        let port = r.server.addr().port().to_string();
        let t = target("127.0.0.1".into(), "root", Some(Ok(())), None);
        let ex = Executor::new(t, r.key.clone(), &port, Timeouts::default());
        let started = std::time::Instant::now();
        let result = ex
            .execute(&env(), r#"foo 'bar' "baz""#, b"foobar\nbaz\n")
            .await;
        let (output, error) = match result {
            Ok(o) => (o, None),
            Err(f) => (f.output, Some(f.error)),
        };
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "stdout\nfoobar\nbaz\n"
        );
        assert_eq!(String::from_utf8_lossy(&output.stderr), "stderr\n");
        match code {
            0 => assert_eq!(error, None),
            n => assert_eq!(error, Some(ExecError::Exit(n))),
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        if code == 1 {
            assert_eq!(error.unwrap().to_string(), "Process exited with status 1");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_key_is_unable_to_authenticate() {
    let r = rig().await;
    let t = target(r.server.addr().to_string(), "root", Some(Ok(())), None);
    let ex = Executor::new(t, Arc::new(new_ed25519_key()), "22", Timeouts::default());
    let f = ex.execute(&[], "true", b"").await.unwrap_err();
    assert_eq!(f.error, ExecError::Auth);
    assert_eq!(f.to_string(), "unable to authenticate");
    let ex = Executor::new(
        target(String::new(), "root", None, None),
        r.key.clone(),
        "22",
        Timeouts::default(),
    );
    assert_eq!(
        ex.execute(&[], "true", b"").await.unwrap_err().error,
        ExecError::NoAddress
    );
}

/// No driver host-key check: the instance secret decides, and the check happens once per
/// connection, before the first command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_secret_fallback_verifies_the_host_once() {
    let r = rig().await;
    let addr = r.server.addr().to_string();
    let verified = Arc::new(AtomicUsize::new(0));
    let v = verified.clone();
    let mut t = target(addr.clone(), "root", None, Some("the-secret"));
    t.on_verified = Some(Arc::new(move || {
        v.fetch_add(1, Ordering::SeqCst);
    }));
    let ex = Executor::new(t, r.key.clone(), "22", Timeouts::default());
    ex.execute(&env(), r#"foo 'bar' "baz""#, b"").await.unwrap();
    ex.execute(&env(), r#"foo 'bar' "baz""#, b"").await.unwrap();
    assert_eq!(verified.load(Ordering::SeqCst), 1);
    // 1 secret check + 2 commands.
    assert_eq!(r.runs.load(Ordering::SeqCst), 3);
    // After a reconnect the key is unchanged: no second check.
    ex.close();
    ex.execute(&env(), r#"foo 'bar' "baz""#, b"").await.unwrap();
    assert_eq!(r.runs.load(Ordering::SeqCst), 4);

    let wrong = target(addr.clone(), "root", None, Some("another-secret"));
    let ex = Executor::new(wrong, r.key.clone(), "22", Timeouts::default());
    let f = ex.execute(&[], "true", b"").await.unwrap_err();
    assert_eq!(
        f.to_string(),
        "host key failed verification: bad instance secret"
    );
    let no_secret = target(addr, "root", None, None);
    let ex = Executor::new(no_secret, r.key.clone(), "22", Timeouts::default());
    assert!(matches!(
        ex.execute(&[], "true", b"").await.unwrap_err().error,
        ExecError::HostKey(_)
    ));
}

/// Better than Go (§13.3 item 17): a command that never ends fails at its deadline, and other
/// commands on the same connection keep working meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_13_3_hung_command_times_out_without_blocking_others() {
    let r = rig().await;
    let t = target(r.server.addr().to_string(), "root", Some(Ok(())), None);
    let timeouts = Timeouts {
        connect: Duration::from_secs(5),
        command: Duration::from_millis(300),
    };
    let ex = Arc::new(Executor::new(t, r.key.clone(), "22", timeouts));
    let hung = {
        let ex = ex.clone();
        tokio::spawn(async move { ex.execute(&[], "sleep forever", b"").await })
    };
    let quick: Vec<_> = (0..5)
        .map(|_| {
            let ex = ex.clone();
            tokio::spawn(async move { ex.execute(&env(), r#"foo 'bar' "baz""#, b"x").await })
        })
        .collect();
    for q in quick {
        assert_eq!(q.await.unwrap().unwrap().stdout, b"stdout\nx");
    }
    let f = hung.await.unwrap().unwrap_err();
    assert!(matches!(f.error, ExecError::Timeout(_)), "{f}");
}

/// The server went away and came back elsewhere (new address via `set_target`): the next
/// command reconnects once and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_the_connection_is_lost() {
    let r = rig().await;
    let t = target(r.server.addr().to_string(), "root", Some(Ok(())), None);
    let ex = Executor::new(t, r.key.clone(), "22", Timeouts::default());
    ex.execute(&env(), r#"foo 'bar' "baz""#, b"").await.unwrap();
    r.server.stop();
    drop(r.server);
    let r2 = rig().await;
    // The old key is authorised on the new server too.
    let r2_key_ok = Executor::new(
        target(r2.server.addr().to_string(), "root", Some(Ok(())), None),
        r2.key.clone(),
        "22",
        Timeouts::default(),
    );
    r2_key_ok
        .execute(&env(), r#"foo 'bar' "baz""#, b"")
        .await
        .unwrap();
    ex.set_target(target(
        r2.server.addr().to_string(),
        "root",
        Some(Ok(())),
        None,
    ));
    assert_eq!(ex.target_host_port(), r2.server.addr().to_string());
    // Different client key: the reconnect happens and is refused — proving it reconnected.
    let f = ex
        .execute(&env(), r#"foo 'bar' "baz""#, b"")
        .await
        .unwrap_err();
    assert_eq!(f.error, ExecError::Auth);
}

/// `DispatchPrivateKey` in PEM (PKCS#1 RSA, as `ssh-keygen -m PEM` writes) and OpenSSH ECDSA
/// form both load and authenticate (RSA with rsa-sha2, which current servers require).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pem_rsa_and_ecdsa_dispatch_keys_authenticate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for file in ["test_rsa_pem.key", "test_ecdsa.key"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let key = dispatchcloud::ssh_executor::load_private_key(&text).unwrap();
        let (code, runs) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicUsize::new(0)));
        let server = SshVm::start(Arc::new(Ac2 { code, runs }), vec![key.public_key().clone()])
            .await
            .unwrap();
        let t = target(server.addr().to_string(), "root", Some(Ok(())), None);
        let ex = Executor::new(t, Arc::new(key), "22", Timeouts::default());
        let out = ex.execute(&env(), r#"foo 'bar' "baz""#, b"").await;
        assert!(out.is_ok(), "{file}: {:?}", out.err());
    }
}

/// Answers `flood` with more output than the executor keeps, anything else with "ok".
struct Flood;

impl CommandHandler for Flood {
    fn run(&self, _user: &str, command: &str, _stdin: Vec<u8>) -> OutcomeFuture {
        let command = command.to_string();
        Box::pin(async move {
            match command.as_str() {
                "flood" => Outcome::ok("zzzzz-dz642-000000000000001\n".repeat(80_000)),
                "flood-stderr" => Outcome {
                    exit: 0,
                    stdout: Vec::new(),
                    stderr: vec![b'x'; 2 << 20],
                },
                _ => Outcome::ok("ok"),
            }
        })
    }
}

/// A VM that answers with endless output (here: more than the cap, on either stream) gets
/// an error instead of the dispatcher's memory; the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_beyond_the_cap_is_an_error() {
    let key = new_ed25519_key();
    let server = SshVm::start(Arc::new(Flood), vec![key.public_key().clone()])
        .await
        .unwrap();
    let t = target(server.addr().to_string(), "root", Some(Ok(())), None);
    let ex = Executor::new(t, Arc::new(key), "22", Timeouts::default());
    for cmd in ["flood", "flood-stderr"] {
        let f = ex.execute(&[], cmd, b"").await.unwrap_err();
        assert_eq!(
            f.error,
            ExecError::OutputTooLarge(dispatchcloud::ssh_executor::MAX_OUTPUT),
            "{cmd}"
        );
        assert!(f.output.stdout.len() <= dispatchcloud::ssh_executor::MAX_OUTPUT);
        assert!(f.output.stderr.len() <= dispatchcloud::ssh_executor::MAX_OUTPUT);
    }
    assert_eq!(ex.execute(&[], "echo", b"").await.unwrap().stdout, b"ok");
}

/// A TCP relay to an SSH server whose existing connections can be made to swallow every
/// byte without closing (a half-open connection: the peer vanished, no FIN, no RST).
struct Blackhole {
    addr: std::net::SocketAddr,
    dead: Arc<Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
}

impl Blackhole {
    async fn start(to: std::net::SocketAddr) -> Blackhole {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dead: Arc<Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>> = Default::default();
        let d = dead.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
                d.lock().unwrap().push(flag.clone());
                let server = tokio::net::TcpStream::connect(to).await.unwrap();
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (f1, f2) = (flag.clone(), flag);
                // Relay until the flag is set; then read and drop everything.
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !f1.load(Ordering::SeqCst) && sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if !f2.load(Ordering::SeqCst) && cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Blackhole { addr, dead }
    }

    /// Every connection made so far goes silent.
    fn swallow_existing(&self) {
        for f in self.dead.lock().unwrap().iter() {
            f.store(true, Ordering::SeqCst);
        }
    }
}

/// The connection to a worker goes silent without closing: the next command does not wait
/// on it forever, the executor reconnects, and later commands work (the worker recovers
/// without being destroyed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_connection_is_replaced() {
    let r = rig().await;
    let relay = Blackhole::start(r.server.addr()).await;
    let t = target(relay.addr.to_string(), "root", Some(Ok(())), None);
    let timeouts = Timeouts {
        connect: Duration::from_secs(2),
        command: Duration::from_secs(2),
    };
    let ex = Executor::new(t, r.key.clone(), "22", timeouts);
    ex.execute(&env(), r#"foo 'bar' "baz""#, b"").await.unwrap();
    relay.swallow_existing();
    // The first command after the blackhole may fail (it ran on the dead connection), but it
    // ends within its deadline; then commands work again over a new connection.
    let t0 = tokio::time::Instant::now();
    let first = ex.execute(&env(), r#"foo 'bar' "baz""#, b"").await;
    // Bounded by the session-open and connect deadlines (2 s each), with room for slow CI.
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    if first.is_err() {
        let again = ex.execute(&env(), r#"foo 'bar' "baz""#, b"").await;
        assert!(again.is_ok(), "{again:?}");
    }
    assert!(relay.dead.lock().unwrap().len() >= 2, "it reconnected");
}

/// The VM's host key changes mid-life (another machine now answers at its address): the key
/// is verified again through the instance, the impostor is refused, nothing runs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_key_that_changes_mid_life_is_verified_again() {
    let r = rig().await;
    let good_key = r.server.host_key().to_openssh().unwrap();
    let vm = Arc::new(Vm {
        addr: Mutex::new(r.server.addr().to_string()),
        user: "root".into(),
        verdict: None,
        pinned: Some(good_key),
    });
    let t = Target {
        instance: vm.clone(),
        secret: None,
        on_verified: None,
    };
    let ex = Executor::new(t, r.key.clone(), "22", Timeouts::default());
    ex.execute(&env(), r#"foo 'bar' "baz""#, b"").await.unwrap();
    let runs_before = r.runs.load(Ordering::SeqCst);
    // Another machine (new host key) now answers where the VM is reached (its address was
    // given to someone else, say), and the old connection is gone.
    r.server.stop();
    let impostor_runs = Arc::new(AtomicUsize::new(0));
    let impostor = SshVm::start(
        Arc::new(Ac2 {
            code: Arc::new(AtomicU32::new(0)),
            runs: impostor_runs.clone(),
        }),
        vec![r.key.public_key().clone()],
    )
    .await
    .unwrap();
    *vm.addr.lock().unwrap() = impostor.addr().to_string();
    ex.close();
    let f = ex
        .execute(&env(), r#"foo 'bar' "baz""#, b"")
        .await
        .unwrap_err();
    assert!(matches!(f.error, ExecError::HostKey(_)), "{f}");
    assert_eq!(
        impostor_runs.load(Ordering::SeqCst),
        0,
        "nothing ran on the impostor"
    );
    assert_eq!(r.runs.load(Ordering::SeqCst), runs_before);
    impostor.stop();
}
