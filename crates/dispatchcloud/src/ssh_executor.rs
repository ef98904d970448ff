//! The SSH executor (spec §9): runs commands on one worker VM over one long-lived SSH
//! connection, a new session per command so probes, starts and kills run concurrently.
//!
//! * The connection is made to the instance's address (the configured port when the address
//!   has none), as its remote user, with the dispatcher's key only.
//! * Before any command runs on a new connection, the host is verified through the instance:
//!   the driver's `verify_host_key`, or — when the driver cannot — the instance secret file,
//!   which only the VM we created received in its user data. A host key that changes is
//!   verified again.
//! * A failed session open reconnects once; connection setup is serialised and a failed
//!   reconnect keeps the old connection.
//! * Better than Go (§13.3): every command has a deadline, so a hung VM cannot block its
//!   caller; a deadline also bounds connection setup and opening a session.
//! * A command's output is capped ([`MAX_OUTPUT`] per stream, also before the host is
//!   verified): a VM that streams without end gets an error, not the dispatcher's memory.
//! * SSH keepalives find a connection whose peer vanished (a half-open TCP connection); it is
//!   closed, and so is a connection on which a command ran out of time, so the next command
//!   reconnects instead of timing out on it again.
//!
//! It owns no pool state; the pool hands it a [`Target`] and reads [`Output`]/[`Failure`].

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

use cloud::{ErrorKind, Instance};

use crate::tasks::Tasks;
use russh::ChannelMsg;
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

/// Why a command did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error("instance has no address")]
    NoAddress,
    /// TCP connection or SSH handshake failure (e.g. connection refused).
    #[error("{0}")]
    Dial(String),
    #[error("unable to authenticate")]
    Auth,
    #[error("host key failed verification: {0}")]
    HostKey(String),
    /// The remote command exited non-zero (same text as Go's `ssh.ExitError`).
    #[error("Process exited with status {0}")]
    Exit(u32),
    #[error("command did not finish within {0:?}")]
    Timeout(Duration),
    #[error("command output exceeded {0} bytes")]
    OutputTooLarge(usize),
    /// Any other SSH-level failure (session refused, killed by a signal, connection lost).
    #[error("{0}")]
    Ssh(String),
}

/// What a command wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A command that failed, with whatever it wrote before failing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Failure {
    pub error: ExecError,
    pub output: Output,
}

impl From<ExecError> for Failure {
    fn from(error: ExecError) -> Failure {
        Failure {
            error,
            output: Output::default(),
        }
    }
}

/// Called when a connection's host has been verified (the pool records time-to-SSH).
pub type OnVerified = Arc<dyn Fn() + Send + Sync>;

/// The VM an executor talks to.
#[derive(Clone)]
pub struct Target {
    pub instance: Arc<dyn Instance>,
    /// The instance secret from the instance's tag, for the fallback host check.
    pub secret: Option<String>,
    pub on_verified: Option<OnVerified>,
}

/// Deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect + handshake + authentication + host verification.
    pub connect: Duration,
    /// One command, from session open to exit status.
    pub command: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(60),
            command: Duration::from_secs(300),
        }
    }
}

/// The most a command may write to stdout, and to stderr (`crunch-run --list` of a VM with
/// a thousand containers is about 30 KiB).
pub const MAX_OUTPUT: usize = 1 << 20;

/// Keepalive probes: one after this much silence from the server…
/// How long a goodbye on a connection being dropped may take.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// …and the connection is closed after this many go unanswered.
const KEEPALIVE_MAX: usize = 3;

/// Records the host key the server presents.
struct KeyCatcher(Arc<Mutex<Option<PublicKey>>>);

impl client::Handler for KeyCatcher {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let PublicKeyOrCertificate::PublicKey { key, .. } = key {
            *self.0.lock() = Some(key.clone());
            Ok(true)
        } else {
            // Certificates are not part of the contract.
            Ok(false)
        }
    }
}

type Conn = Arc<client::Handle<KeyCatcher>>;

/// Parse `Containers.DispatchPrivateKey`: OpenSSH or PEM text, or `file:///absolute/path`.
pub fn load_private_key(text: &str) -> Result<PrivateKey, String> {
    let owned;
    let pem = if let Some(path) = text.strip_prefix("file://") {
        owned = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
        owned.as_str()
    } else {
        text
    };
    if pem.trim().is_empty() {
        return Err("no key".into());
    }
    russh::keys::decode_secret_key(pem, None).map_err(|e| format!("cannot parse private key: {e}"))
}

/// `address` with `port` added when it has none (IPv6 literals in brackets).
pub fn host_port(address: &str, port: &str) -> String {
    let port = if port.is_empty() { "22" } else { port };
    if address.parse::<std::net::SocketAddr>().is_ok() {
        return address.to_string();
    }
    if let Ok(ip) = address.parse::<std::net::IpAddr>() {
        return match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            std::net::IpAddr::V4(v4) => format!("{v4}:{port}"),
        };
    }
    if address.starts_with('[') || address.matches(':').count() == 1 {
        return address.to_string();
    }
    format!("{address}:{port}")
}

/// Runs commands on one VM.
pub struct Executor {
    key: Arc<PrivateKey>,
    port: String,
    timeouts: Timeouts,
    target: Mutex<Target>,
    /// The connection in use (fast path; cloned out, never held across awaits).
    conn: Mutex<Option<Conn>>,
    /// Serialises connection setup.
    setup: tokio::sync::Mutex<()>,
    /// The host key last verified (OpenSSH text).
    verified: Mutex<Option<String>>,
    /// Where background disconnects run (the pool's, so its shutdown joins them).
    tasks: Tasks,
}

impl Executor {
    pub fn new(target: Target, key: Arc<PrivateKey>, port: &str, timeouts: Timeouts) -> Executor {
        Executor {
            key,
            port: port.to_string(),
            timeouts,
            target: Mutex::new(target),
            conn: Mutex::new(None),
            setup: tokio::sync::Mutex::new(()),
            verified: Mutex::new(None),
            tasks: Tasks::new(),
        }
    }

    /// Spawn the executor's background work (closing replaced connections) in `tasks`, so
    /// the owner's shutdown joins it.
    pub fn with_tasks(mut self, tasks: Tasks) -> Executor {
        self.tasks = tasks;
        self
    }

    /// Say goodbye on `conn` in the background, within [`DISCONNECT_TIMEOUT`].
    fn disconnect_later(&self, conn: Conn) {
        self.tasks.spawn(async move {
            let bye = conn.disconnect(russh::Disconnect::ByApplication, "", "");
            let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, bye).await;
        });
    }

    /// Use `target` for future connections (cheap; the current connection stays in use).
    pub fn set_target(&self, target: Target) {
        *self.target.lock() = target;
    }

    /// The address future connections dial.
    pub fn target_host_port(&self) -> String {
        host_port(&self.target.lock().instance.address(), &self.port)
    }

    /// Drop the connection. A later `execute` would reconnect.
    pub fn close(&self) {
        if let Some(c) = self.conn.lock().take() {
            self.disconnect_later(c);
        }
    }

    /// Run `command` with `env` (SSH `env` requests) and `stdin`; stdout and stderr are
    /// captured whole. A non-zero exit is [`ExecError::Exit`].
    pub async fn execute(
        &self,
        env: &[(String, String)],
        command: &str,
        stdin: &[u8],
    ) -> Result<Output, Failure> {
        self.execute_for(env, command, stdin, self.timeouts.command)
            .await
    }

    /// [`Executor::execute`] with its own command deadline (e.g. a long upload).
    pub async fn execute_for(
        &self,
        env: &[(String, String)],
        command: &str,
        stdin: &[u8],
        deadline: Duration,
    ) -> Result<Output, Failure> {
        let limit = deadline + self.timeouts.connect;
        match tokio::time::timeout(limit, self.execute_inner(env, command, stdin, deadline)).await {
            Ok(r) => r,
            Err(_) => Err(ExecError::Timeout(limit).into()),
        }
    }

    async fn execute_inner(
        &self,
        env: &[(String, String)],
        command: &str,
        stdin: &[u8],
        deadline: Duration,
    ) -> Result<Output, Failure> {
        let current = self.conn.lock().clone();
        let mut channel = None;
        if let Some(c) = &current {
            // A connection whose peer vanished may never answer the open: bounded too.
            channel = tokio::time::timeout(self.timeouts.connect, c.channel_open_session())
                .await
                .ok()
                .and_then(Result::ok);
        }
        let channel = match channel {
            Some(ch) => ch,
            None => {
                let c = self.reconnect(current).await?;
                c.channel_open_session()
                    .await
                    .map_err(|e| ExecError::Ssh(format!("opening session: {e}")))?
            }
        };
        match tokio::time::timeout(deadline, run(channel, env, command, stdin)).await {
            Ok(r) => r,
            Err(_) => {
                // The VM or the connection is stuck; the next command starts afresh.
                self.drop_connection();
                Err(ExecError::Timeout(deadline).into())
            }
        }
    }

    /// Close the connection in use, if any, so the next command reconnects.
    fn drop_connection(&self) {
        self.close();
    }

    /// A new connection, unless another caller made one since `seen` was current.
    async fn reconnect(&self, seen: Option<Conn>) -> Result<Conn, ExecError> {
        let _setup = self.setup.lock().await;
        let now = self.conn.lock().clone();
        if let Some(c) = &now
            && !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, c))
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        let fresh = match tokio::time::timeout(self.timeouts.connect, self.connect()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ExecError::Dial(format!(
                    "connecting: no answer within {:?}",
                    self.timeouts.connect
                )));
            }
        };
        let old = self.conn.lock().replace(fresh.clone());
        if let Some(old) = old {
            self.disconnect_later(old);
        }
        Ok(fresh)
    }

    async fn connect(&self) -> Result<Conn, ExecError> {
        let target = self.target.lock().clone();
        let address = target.instance.address();
        if address.is_empty() {
            return Err(ExecError::NoAddress);
        }
        let addr = host_port(&address, &self.port);
        let seen = Arc::new(Mutex::new(None));
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_max: KEEPALIVE_MAX,
            nodelay: true,
            ..Default::default()
        });
        let mut handle = client::connect(config, addr.as_str(), KeyCatcher(seen.clone()))
            .await
            .map_err(|e| ExecError::Dial(format!("dial {addr}: {e}")))?;
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .ok()
            .flatten()
            .flatten();
        let auth = handle
            .authenticate_publickey(
                target.instance.remote_user(),
                PrivateKeyWithHashAlg::new(self.key.clone(), hash),
            )
            .await
            .map_err(|e| ExecError::Dial(format!("ssh authentication with {addr}: {e}")))?;
        if !auth.success() {
            return Err(ExecError::Auth);
        }
        let conn = Arc::new(handle);
        let key = seen
            .lock()
            .take()
            .and_then(|k| k.to_openssh().ok())
            .ok_or_else(|| ExecError::HostKey("no host key presented".into()))?;
        if self.verified.lock().as_deref() != Some(key.as_str()) {
            if let Err(e) = verify(&target, &conn, &key).await {
                self.disconnect_later(conn.clone());
                return Err(ExecError::HostKey(e));
            }
            *self.verified.lock() = Some(key);
        }
        Ok(conn)
    }
}

/// Is the server behind `conn`, presenting `key`, the instance we created?
async fn verify(target: &Target, conn: &Conn, key: &str) -> Result<(), String> {
    if let Some(f) = &target.on_verified {
        // Go reports "SSH connected" before verification; so do we.
        f();
    }
    match target.instance.verify_host_key(key).await {
        Ok(()) => return Ok(()),
        Err(e) if e.kind != ErrorKind::NotImplemented => return Err(e.to_string()),
        Err(e) if target.secret.is_none() => return Err(e.to_string()),
        Err(_) => {}
    }
    let mut command = format!("cat {}", cloud::tags::INSTANCE_SECRET_PATH);
    if target.instance.remote_user() != "root" {
        command = format!("sudo {command}");
    }
    let ch = conn
        .channel_open_session()
        .await
        .map_err(|e| format!("opening session: {e}"))?;
    let out = run(ch, &[], &command, &[])
        .await
        .map_err(|f| f.to_string())?;
    if Some(out.stdout.as_slice()) != target.secret.as_deref().map(str::as_bytes) {
        return Err("bad instance secret".into());
    }
    Ok(())
}

/// Append `data` unless that would take `buf` past [`MAX_OUTPUT`] (then false).
fn append_capped(buf: &mut Vec<u8>, data: &[u8]) -> bool {
    if buf.len() + data.len() > MAX_OUTPUT {
        return false;
    }
    buf.extend_from_slice(data);
    true
}

/// The failure of a command that wrote too much; dropping the channel closes it.
fn too_large(output: Output) -> Failure {
    Failure {
        error: ExecError::OutputTooLarge(MAX_OUTPUT),
        output,
    }
}

/// One command on an open session.
async fn run(
    mut ch: russh::Channel<client::Msg>,
    env: &[(String, String)],
    command: &str,
    stdin: &[u8],
) -> Result<Output, Failure> {
    let ssh = |what: &str, e: russh::Error| Failure::from(ExecError::Ssh(format!("{what}: {e}")));
    for (k, v) in env {
        ch.set_env(false, k.as_str(), v.as_str())
            .await
            .map_err(|e| ssh("setenv", e))?;
    }
    ch.exec(true, command).await.map_err(|e| ssh("exec", e))?;
    if !stdin.is_empty() {
        ch.data(stdin).await.map_err(|e| ssh("stdin", e))?;
    }
    ch.eof().await.map_err(|e| ssh("stdin", e))?;
    let mut output = Output::default();
    let mut exit = None;
    let mut signal = None;
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::Data { data } if !append_capped(&mut output.stdout, &data) => {
                return Err(too_large(output));
            }
            ChannelMsg::ExtendedData { data, ext: 1 }
                if !append_capped(&mut output.stderr, &data) =>
            {
                return Err(too_large(output));
            }
            ChannelMsg::ExitStatus { exit_status } => exit = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => signal = Some(format!("{signal_name:?}")),
            _ => {}
        }
    }
    let error = match (exit, signal) {
        (Some(0), _) => return Ok(output),
        (Some(n), _) => ExecError::Exit(n),
        (None, Some(s)) => ExecError::Ssh(format!("remote command killed by signal {s}")),
        (None, None) => ExecError::Ssh("remote command ended without an exit status".into()),
    };
    Err(Failure { error, output })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_get_the_configured_port_when_they_have_none() {
        assert_eq!(host_port("10.0.0.1", "2222"), "10.0.0.1:2222");
        assert_eq!(host_port("10.0.0.1:22", "2222"), "10.0.0.1:22");
        assert_eq!(host_port("10.0.0.1", ""), "10.0.0.1:22");
        assert_eq!(host_port("::1", "2222"), "[::1]:2222");
        assert_eq!(host_port("[::1]:23", "2222"), "[::1]:23");
        assert_eq!(host_port("vm.example", "2222"), "vm.example:2222");
        assert_eq!(host_port("vm.example:23", "2222"), "vm.example:23");
    }

    #[test]
    fn private_keys_load_from_text_or_file_and_bad_ones_say_so() {
        let key = cloud::sshd::new_ed25519_key();
        let text = key
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .unwrap();
        assert_eq!(
            load_private_key(&text).unwrap().public_key(),
            key.public_key()
        );
        let dir = std::env::temp_dir().join(format!("adc-key-{}", std::process::id()));
        std::fs::write(&dir, text.as_bytes()).unwrap();
        let from_file = load_private_key(&format!("file://{}", dir.display())).unwrap();
        assert_eq!(from_file.public_key(), key.public_key());
        let _ = std::fs::remove_file(&dir);
        assert!(load_private_key("").unwrap_err().contains("no key"));
        assert!(
            load_private_key("-----BEGIN NONSENSE-----\nxx\n")
                .unwrap_err()
                .starts_with("cannot parse private key")
        );
        assert!(
            load_private_key("file:///nonexistent/key")
                .unwrap_err()
                .starts_with("reading /nonexistent/key")
        );
    }
}
