//! A small in-process SSH server: real SSH (russh) on 127.0.0.1 with its own host key and
//! public-key authentication, where every `exec` request is answered by a [`CommandHandler`]
//! once the client has sent all of its stdin (EOF), as the dispatcher's remote command contract
//! expects (Appendix D). The loopback driver serves the local host through it; the stub driver's
//! VMs (in `testkit`) are made of it. [`run_command`] is a matching one-shot client.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Server as _, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId};
use tokio::net::TcpListener;

/// What a command produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub exit: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Outcome {
    pub fn ok(stdout: impl Into<Vec<u8>>) -> Outcome {
        Outcome {
            exit: 0,
            stdout: stdout.into(),
            stderr: Vec::new(),
        }
    }

    pub fn fail(exit: u32, stderr: impl Into<Vec<u8>>) -> Outcome {
        Outcome {
            exit,
            stdout: Vec::new(),
            stderr: stderr.into(),
        }
    }
}

/// The boxed future a handler returns.
pub type OutcomeFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Answers the commands run on a VM.
pub trait CommandHandler: Send + Sync + 'static {
    /// Run `command` for `user` with all of `stdin`.
    fn run(&self, user: &str, command: &str, stdin: Vec<u8>) -> OutcomeFuture;

    /// Like [`CommandHandler::run`], with the variables the client sent by `env` requests.
    /// By default they are ignored.
    fn run_with_env(
        &self,
        user: &str,
        command: &str,
        env: Vec<(String, String)>,
        stdin: Vec<u8>,
    ) -> OutcomeFuture {
        let _ = env;
        self.run(user, command, stdin)
    }
}

impl<F> CommandHandler for F
where
    F: Fn(&str, &str, Vec<u8>) -> OutcomeFuture + Send + Sync + 'static,
{
    fn run(&self, user: &str, command: &str, stdin: Vec<u8>) -> OutcomeFuture {
        self(user, command, stdin)
    }
}

/// A fresh Ed25519 key (host keys, client keys in tests).
pub fn new_ed25519_key() -> PrivateKey {
    use rand::RngCore;
    use russh::keys::ssh_key::private::Ed25519Keypair;
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

/// A running SSH VM. Dropping it stops the server.
pub struct SshVm {
    addr: SocketAddr,
    host_key: PublicKey,
    shutdown: server::RunningServerHandle,
    task: tokio::task::JoinHandle<()>,
}

impl SshVm {
    /// Listen on 127.0.0.1 (a free port) with a fresh Ed25519 host key, accepting any user
    /// who authenticates with one of `authorized_keys`.
    pub async fn start(
        handler: Arc<dyn CommandHandler>,
        authorized_keys: Vec<PublicKey>,
    ) -> std::io::Result<SshVm> {
        Self::start_on(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            handler,
            authorized_keys,
        )
        .await
    }

    /// Like [`SshVm::start`], listening on `addr` (a loopback address a cloud fake assigned,
    /// for instance).
    pub async fn start_on(
        addr: SocketAddr,
        handler: Arc<dyn CommandHandler>,
        authorized_keys: Vec<PublicKey>,
    ) -> std::io::Result<SshVm> {
        let key = new_ed25519_key();
        let host_key = key.public_key().clone();
        let config = Arc::new(server::Config {
            keys: vec![key],
            auth_rejection_time: std::time::Duration::from_millis(10),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            inactivity_timeout: None,
            // Small request/response exchanges: Nagle + delayed ACK would add ~40 ms each.
            nodelay: true,
            ..Default::default()
        });
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mut vm = VmServer {
            handler,
            authorized: Arc::new(authorized_keys),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let running = vm.run_on_socket(config, &listener);
            let _ = tx.send(running.handle());
            let _ = running.await;
        });
        let shutdown = rx
            .await
            .map_err(|_| std::io::Error::other("SSH server task ended at start"))?;
        Ok(SshVm {
            addr,
            host_key,
            shutdown,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The host key clients should see.
    pub fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    /// Stop accepting connections and close the existing ones.
    pub fn stop(&self) {
        self.shutdown.shutdown("VM stopped".into());
    }
}

impl std::fmt::Debug for SshVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SshVm({})", self.addr)
    }
}

impl Drop for SshVm {
    fn drop(&mut self) {
        self.stop();
        self.task.abort();
    }
}

#[derive(Clone)]
struct VmServer {
    handler: Arc<dyn CommandHandler>,
    authorized: Arc<Vec<PublicKey>>,
}

impl server::Server for VmServer {
    type Handler = Conn;

    fn new_client(&mut self, _peer: Option<SocketAddr>) -> Conn {
        Conn {
            handler: self.handler.clone(),
            authorized: self.authorized.clone(),
            user: String::new(),
            channels: HashMap::new(),
        }
    }
}

#[derive(Default)]
struct ChannelState {
    command: Option<String>,
    env: Vec<(String, String)>,
    stdin: Vec<u8>,
}

/// One client connection.
struct Conn {
    handler: Arc<dyn CommandHandler>,
    authorized: Arc<Vec<PublicKey>>,
    user: String,
    channels: HashMap<ChannelId, ChannelState>,
}

impl server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self
            .authorized
            .iter()
            .any(|k| k.key_data() == key.public_key.key_data())
        {
            self.user = user.to_string();
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), ChannelState::default());
        reply.accept().await;
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels
            .entry(channel)
            .or_default()
            .env
            .push((name.to_string(), value.to_string()));
        session.channel_success(channel)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.entry(channel).or_default().command =
            Some(String::from_utf8_lossy(data).into_owned());
        session.channel_success(channel)?;
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels
            .entry(channel)
            .or_default()
            .stdin
            .extend_from_slice(data);
        Ok(())
    }

    /// All stdin is in: run the command and report, from a task so a slow command does not
    /// hold up the connection's other channels.
    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(state) = self.channels.remove(&channel) else {
            return Ok(());
        };
        let Some(command) = state.command else {
            return Ok(());
        };
        let handle = session.handle();
        let handler = self.handler.clone();
        let user = self.user.clone();
        tokio::spawn(async move {
            let out = handler
                .run_with_env(&user, &command, state.env, state.stdin)
                .await;
            if !out.stdout.is_empty() {
                let _ = handle.data(channel, out.stdout).await;
            }
            if !out.stderr.is_empty() {
                let _ = handle.extended_data(channel, 1, out.stderr).await;
            }
            let _ = handle.exit_status_request(channel, out.exit).await;
            let _ = handle.eof(channel).await;
            let _ = handle.close(channel).await;
        });
        Ok(())
    }
}

/// Client side, for tests: connect to `addr` (checking the host key if `expect` is given),
/// authenticate as `user` with `key`, run `command` with `stdin`, and return what it produced.
pub async fn run_command(
    addr: &str,
    expect: Option<&PublicKey>,
    key: &PrivateKey,
    user: &str,
    command: &str,
    stdin: &[u8],
) -> Result<Outcome, String> {
    use russh::ChannelMsg;
    use russh::client;
    use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};

    struct Check(Option<PublicKey>);
    impl client::Handler for Check {
        type Error = russh::Error;
        async fn check_server_key(
            &mut self,
            key: &PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(match (&self.0, key) {
                (None, _) => true,
                (Some(want), PublicKeyOrCertificate::PublicKey { key, .. }) => {
                    key.key_data() == want.key_data()
                }
                _ => false,
            })
        }
    }

    let mut h = client::connect(
        Arc::new(client::Config::default()),
        addr,
        Check(expect.cloned()),
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let auth = h
        .authenticate_publickey(
            user,
            PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None),
        )
        .await
        .map_err(|e| format!("auth: {e}"))?;
    if !auth.success() {
        return Err("unable to authenticate".into());
    }
    let mut ch = h
        .channel_open_session()
        .await
        .map_err(|e| format!("session: {e}"))?;
    ch.exec(true, command)
        .await
        .map_err(|e| format!("exec: {e}"))?;
    if !stdin.is_empty() {
        ch.data(stdin).await.map_err(|e| format!("stdin: {e}"))?;
    }
    ch.eof().await.map_err(|e| format!("stdin: {e}"))?;
    let mut out = Outcome::default();
    let mut exit = None;
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => exit = Some(exit_status),
            _ => {}
        }
    }
    out.exit = exit.ok_or("no exit status")?;
    Ok(out)
}

/// Client side: the host key a server at `addr` presents (no authentication is attempted).
pub async fn fetch_host_key(addr: &str) -> Result<PublicKey, String> {
    use russh::client;
    use russh::keys::PublicKeyOrCertificate;

    struct Capture(Arc<parking_lot::Mutex<Option<PublicKey>>>);
    impl client::Handler for Capture {
        type Error = russh::Error;
        async fn check_server_key(
            &mut self,
            key: &PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            if let PublicKeyOrCertificate::PublicKey { key, .. } = key {
                *self.0.lock() = Some(key.clone());
            }
            Ok(true)
        }
    }
    let seen = Arc::new(parking_lot::Mutex::new(None));
    let _session = client::connect(
        Arc::new(client::Config::default()),
        addr,
        Capture(seen.clone()),
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let key = seen.lock().take();
    key.ok_or_else(|| "no host key seen".to_string())
}

/// The keys an instance's `CreateRequest::public_key` authorises (unparseable text: none).
pub fn authorized_keys(public_key: Option<&str>) -> Vec<PublicKey> {
    public_key
        .and_then(|k| PublicKey::from_openssh(k).ok())
        .into_iter()
        .collect()
}

/// `Instance::verify_host_key` for VMs served by [`SshVm`]: the offered key (OpenSSH text)
/// must have the same type and key data as the VM's (comments are ignored).
pub fn check_host_key(expected: &str, offered: &str) -> Result<(), crate::CloudError> {
    if offered
        .split_whitespace()
        .take(2)
        .eq(expected.split_whitespace().take(2))
    {
        Ok(())
    } else {
        Err(crate::CloudError::other("host key mismatch"))
    }
}
