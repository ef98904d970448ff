//! The in-process SSH VM through a real SSH client (russh): public-key authentication, host
//! key checking, stdin, stdout, stderr and exit status, several commands on one connection.

use std::sync::Arc;

use russh::ChannelMsg;
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

use testkit::ssh_vm::{CommandHandler, Outcome, OutcomeFuture, SshVm, new_ed25519_key};

/// Echoes the user, command and stdin; `fail` exits 3 with text on stderr.
fn echo_handler() -> Arc<dyn CommandHandler> {
    Arc::new(|user: &str, cmd: &str, stdin: Vec<u8>| -> OutcomeFuture {
        let (user, cmd) = (user.to_string(), cmd.to_string());
        Box::pin(async move {
            if cmd == "fail" {
                return Outcome::fail(3, "it failed");
            }
            Outcome::ok(format!(
                "{user} ran {cmd:?} with {:?}",
                String::from_utf8_lossy(&stdin)
            ))
        })
    })
}

struct Checker {
    expect: PublicKey,
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(
            matches!(key, PublicKeyOrCertificate::PublicKey { key, .. } if key.key_data() == self.expect.key_data()),
        )
    }
}

async fn connect(
    vm: &SshVm,
    expect: &PublicKey,
    key: &PrivateKey,
) -> Result<client::Handle<Checker>, String> {
    let config = Arc::new(client::Config::default());
    let mut h = client::connect(
        config,
        vm.addr(),
        Checker {
            expect: expect.clone(),
        },
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let auth = h
        .authenticate_publickey(
            "crunch",
            PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None),
        )
        .await
        .map_err(|e| format!("auth: {e}"))?;
    if !auth.success() {
        return Err("unable to authenticate".into());
    }
    Ok(h)
}

async fn exec(
    h: &client::Handle<Checker>,
    cmd: &str,
    stdin: &[u8],
) -> (Option<u32>, String, String) {
    let mut ch = h.channel_open_session().await.unwrap();
    ch.exec(true, cmd).await.unwrap();
    if !stdin.is_empty() {
        ch.data(stdin).await.unwrap();
    }
    ch.eof().await.unwrap();
    let (mut code, mut out, mut err) = (None, Vec::new(), Vec::new());
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::Data { data } => out.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, ext: 1 } => err.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
            _ => {}
        }
    }
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[tokio::test]
async fn commands_get_stdin_and_report_output_and_exit_status() {
    let client_key = new_ed25519_key();
    let vm = SshVm::start(echo_handler(), vec![client_key.public_key().clone()])
        .await
        .unwrap();
    let h = connect(&vm, vm.host_key(), &client_key).await.unwrap();
    assert_eq!(
        exec(&h, "crunch-run --list", b"[{\"Price\":1}]").await,
        (
            Some(0),
            "crunch ran \"crunch-run --list\" with \"[{\\\"Price\\\":1}]\"".into(),
            String::new()
        )
    );
    assert_eq!(
        exec(&h, "fail", b"").await,
        (Some(3), String::new(), "it failed".into())
    );
    // Five commands at once on one connection.
    let h = Arc::new(h);
    let mut tasks = Vec::new();
    for i in 0..5 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            exec(&h, &format!("cmd{i}"), b"").await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (code, out, _) = t.await.unwrap();
        assert_eq!(code, Some(0));
        assert!(out.contains(&format!("cmd{i}")), "{out}");
    }
}

#[tokio::test]
async fn unknown_client_keys_are_refused() {
    let allowed = new_ed25519_key();
    let vm = SshVm::start(echo_handler(), vec![allowed.public_key().clone()])
        .await
        .unwrap();
    let other = new_ed25519_key();
    let e = connect(&vm, vm.host_key(), &other).await.err().unwrap();
    assert_eq!(e, "unable to authenticate");
}

#[tokio::test]
async fn a_wrong_host_key_is_detected() {
    let key = new_ed25519_key();
    let vm = SshVm::start(echo_handler(), vec![key.public_key().clone()])
        .await
        .unwrap();
    let impostor = new_ed25519_key();
    let e = connect(&vm, impostor.public_key(), &key)
        .await
        .err()
        .unwrap();
    assert!(e.starts_with("connect:"), "{e}");
}

#[tokio::test]
async fn stopped_vm_refuses_connections() {
    let key = new_ed25519_key();
    let vm = SshVm::start(echo_handler(), vec![key.public_key().clone()])
        .await
        .unwrap();
    let addr = vm.addr();
    drop(vm);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
