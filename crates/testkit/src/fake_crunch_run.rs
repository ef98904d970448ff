//! A stand-in for `crunch-run` (the "Minimal fake crunch-run" checklist of
//! `arvados-api-contract.md`). It drives a container through the API the way crunch-run does
//! (Locked → Running → Complete) without running anything, with a scripted run time and exit
//! code taken from the container's environment:
//!
//! * `FAKE_CRUNCH_RUN_MS`: how long "running" takes (default 200);
//! * `FAKE_CRUNCH_RUN_EXIT`: the exit code recorded (default 0);
//! * `FAKE_CRUNCH_RUN_FAIL`: `crash` (exit after Running, no final update), `stale` (finish
//!   but leave the lock looking stale to `--list`), `broken` (mark the node broken).
//!
//! Modes: `--list`, `--detach --stdin-config UUID`, `--kill N UUID`, and the foreground
//! `[--runtime-engine=X] [args…] UUID` that crunch-dispatch-local uses. Lock files live in
//! `--lock-dir` / `$FAKE_CRUNCH_RUN_LOCK_DIR` (default `/var/lock`), one per container, holding
//! `{"UUID":…,"PID":…}` and an exclusive file lock while the worker lives.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use arvados::types::ContainerState;
use arvados::{Client, ClientConfig};
use serde_json::{Value, json};

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    List,
    Detach {
        uuid: String,
    },
    Kill {
        signal: i32,
        uuid: String,
    },
    /// Run in the foreground (crunch-dispatch-local), or as the detached worker.
    Run {
        uuid: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub mode: Mode,
    pub lock_dir: PathBuf,
    pub stdin_config: bool,
    pub stdin_prices: bool,
}

/// Parse arguments the tolerant way crunch-run is called: `-flag` or `--flag`,
/// `--flag=value` or `--flag value`, a leading `sudo`, unknown tuning flags ignored.
pub fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut it = argv.iter().skip(1).peekable();
    if it.peek().is_some_and(|a| *a == "sudo") {
        it.next();
        // sudo's own argument is the program path.
        it.next();
    }
    let mut lock_dir = std::env::var_os("FAKE_CRUNCH_RUN_LOCK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lock"));
    let (mut list, mut detach, mut stdin_config, mut stdin_prices) = (false, false, false, false);
    let mut kill: Option<i32> = None;
    let mut positional: Vec<String> = Vec::new();
    while let Some(a) = it.next() {
        let a = a.trim_matches('\'');
        if !a.starts_with('-') {
            positional.push(a.to_string());
            continue;
        }
        let flag = a.trim_start_matches('-');
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        match name {
            "list" => list = true,
            "detach" => detach = true,
            "stdin-config" => stdin_config = true,
            "stdin-prices" => stdin_prices = true,
            "kill" => {
                let v = inline
                    .or_else(|| it.next().cloned())
                    .ok_or("--kill needs a signal number")?;
                kill = Some(v.parse().map_err(|_| format!("bad signal {v:?}"))?);
            }
            "lock-dir" => {
                lock_dir = PathBuf::from(
                    inline
                        .or_else(|| it.next().cloned())
                        .ok_or("--lock-dir needs a directory")?,
                );
            }
            // Flags with a separate value that crunch-run knows; the value is not a uuid.
            "runtime-engine" | "cgroup-parent-subsystem" | "arv-mount-timeout" | "brokenfile"
                if inline.is_none() =>
            {
                it.next();
            }
            _ => {}
        }
    }
    let uuid = positional.last().cloned();
    let mode = if list {
        Mode::List
    } else if let Some(signal) = kill {
        Mode::Kill {
            signal,
            uuid: uuid.ok_or("--kill needs a container uuid")?,
        }
    } else if detach {
        Mode::Detach {
            uuid: uuid.ok_or("--detach needs a container uuid")?,
        }
    } else {
        Mode::Run {
            uuid: uuid.ok_or("usage: fake-crunch-run [flags] UUID | --list | --kill N UUID")?,
        }
    };
    Ok(Args {
        mode,
        lock_dir,
        stdin_config,
        stdin_prices,
    })
}

fn lock_path(dir: &Path, uuid: &str) -> PathBuf {
    dir.join(format!("crunch-run-{uuid}.lock"))
}

fn broken_path(dir: &Path) -> PathBuf {
    dir.join("crunch-run-broken")
}

fn stale_path(dir: &Path, uuid: &str) -> PathBuf {
    dir.join(format!("crunch-run-{uuid}.stale"))
}

/// Whether a process exists and has not exited. A detached worker whose parent is gone may
/// linger as a zombie when nothing reaps orphans (as in some containers); that counts as
/// exited, so this reads the state from `/proc` rather than probing with signal 0.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

fn read_pid(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    v["PID"].as_u64().map(|p| p as u32)
}

/// `--list`: live containers (and stale ones), then `broken` if the node is marked broken.
pub fn list(lock_dir: &Path) -> String {
    let mut out = String::new();
    let mut names: Vec<String> = std::fs::read_dir(lock_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for name in names {
        if let Some(uuid) = name
            .strip_prefix("crunch-run-")
            .and_then(|n| n.strip_suffix(".lock"))
        {
            let path = lock_dir.join(&name);
            if read_pid(&path).is_some_and(alive) {
                out.push_str(uuid);
                out.push('\n');
            }
        } else if let Some(uuid) = name
            .strip_prefix("crunch-run-")
            .and_then(|n| n.strip_suffix(".stale"))
        {
            out.push_str(&format!("{uuid} stale\n"));
        }
    }
    if broken_path(lock_dir).exists() {
        out.push_str("broken\n");
    }
    out
}

/// `--kill N UUID`: 0 if there is no such process or it exited within 1 s after the signal.
pub fn kill(lock_dir: &Path, signal: i32, uuid: &str) -> i32 {
    let Some(pid) = read_pid(&lock_path(lock_dir, uuid)).filter(|&p| alive(p)) else {
        return 0;
    };
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status();
    for _ in 0..20 {
        if !alive(pid) {
            return 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("container {uuid}: process {pid} still running 1 s after signal {signal}");
    1
}

/// `--detach --stdin-config UUID`: start the worker in its own process group with the
/// config's environment and print `{"UUID":…,"PID":…}`.
pub fn detach(args: &Args, uuid: &str, stdin: &str) -> Result<String, String> {
    let config: Value = if args.stdin_config {
        serde_json::from_str(stdin).map_err(|e| format!("bad --stdin-config JSON: {e}"))?
    } else {
        json!({"Env": {}})
    };
    let env: HashMap<String, String> = config["Env"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    for k in ["ARVADOS_API_HOST", "ARVADOS_API_TOKEN"] {
        if env.get(k).is_none_or(|v| v.is_empty()) {
            return Err(format!("missing {k} in config Env"));
        }
    }
    std::fs::create_dir_all(&args.lock_dir).map_err(|e| e.to_string())?;
    let path = lock_path(&args.lock_dir, uuid);
    if read_pid(&path).is_some_and(alive) {
        return Err(format!("container {uuid} is already running"));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(exe)
        .arg("--lock-dir")
        .arg(&args.lock_dir)
        .arg(uuid)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting worker: {e}"))?;
    let line = json!({"UUID": uuid, "PID": child.id()}).to_string();
    // The worker writes the lock file itself; write it here too so --list/--kill see it at once.
    let _ = std::fs::write(&path, &line);
    Ok(line)
}

/// Hold the container's lock file for as long as this process lives.
fn take_lock(lock_dir: &Path, uuid: &str) -> Result<File, String> {
    std::fs::create_dir_all(lock_dir).map_err(|e| e.to_string())?;
    let path = lock_path(lock_dir, uuid);
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.try_lock()
        .map_err(|_| format!("container {uuid} is locked by another crunch-run"))?;
    f.set_len(0).map_err(|e| e.to_string())?;
    let line = json!({"UUID": uuid, "PID": std::process::id()}).to_string();
    f.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    Ok(f)
}

/// How a driven container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It was not Locked: nothing was done.
    NotLocked,
    /// Stopped before it was Running: put back in the queue.
    Requeued,
    /// Stopped while Running: cancelled.
    Cancelled,
    /// Ran to Complete with this exit code.
    Complete(i64),
    /// `FAKE_CRUNCH_RUN_FAIL=crash`: left Running with no final update.
    Crashed,
}

/// What the container's environment scripts: run time, exit code, failure mode.
fn script(c: &arvados::Container) -> (Duration, i64, String) {
    let env = |k: &str| c.environment.get(k).cloned();
    let run_ms: u64 = env("FAKE_CRUNCH_RUN_MS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let exit_code: i64 = env("FAKE_CRUNCH_RUN_EXIT")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let max = c.scheduling_parameters.max_run_time;
    let run_for = if max > 0 {
        Duration::from_millis(run_ms).min(Duration::from_secs(max as u64))
    } else {
        Duration::from_millis(run_ms)
    };
    (
        run_for,
        exit_code,
        env("FAKE_CRUNCH_RUN_FAIL").unwrap_or_default(),
    )
}

/// Drive one container through the API as crunch-run does: Locked → Running → (scripted run
/// time) → Complete. `stop` turning true requeues a container not yet Running and cancels a
/// Running one. Returns how it ended and the scripted failure mode.
pub async fn drive(
    client: &Client,
    uuid: &str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(Ending, String), String> {
    let c = client
        .get_container(uuid, None)
        .await
        .map_err(|e| format!("get container: {e}"))?;
    if c.state != ContainerState::Locked {
        return Ok((Ending::NotLocked, String::new()));
    }
    let (run_for, exit_code, fail) = script(&c);
    // Time spent Locked before Running (a real crunch-run loads the image first).
    let start_ms: u64 = c
        .environment
        .get("FAKE_CRUNCH_RUN_START_MS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let put = |attrs: Value| {
        let client = client.clone();
        async move {
            client
                .update_container(uuid, &attrs, Some(&["uuid"]))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let starting = tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(start_ms)) => false,
        _ = stopped(stop.clone()) => true,
    };
    if starting {
        put(json!({"state": "Queued"})).await?;
        return Ok((Ending::Requeued, fail));
    }
    tokio::select! {
        r = put(json!({"state": "Running"})) => r?,
        _ = stopped(stop.clone()) => {
            put(json!({"state": "Queued"})).await?;
            return Ok((Ending::Requeued, fail));
        }
    }
    let interrupted = tokio::select! {
        _ = tokio::time::sleep(run_for) => false,
        _ = stopped(stop.clone()) => true,
    };
    if interrupted {
        put(json!({"state": "Cancelled"})).await?;
        return Ok((Ending::Cancelled, fail));
    }
    if fail == "crash" {
        return Ok((Ending::Crashed, fail));
    }
    put(json!({"exit_code": exit_code})).await?;
    put(json!({
        "state": "Complete",
        "exit_code": exit_code,
        "log": "d41d8cd98f00b204e9800998ecf8427e+0",
        "output": "d41d8cd98f00b204e9800998ecf8427e+0",
    }))
    .await?;
    Ok((Ending::Complete(exit_code), fail))
}

/// The worker process: holds the container's lock file while it [`drive`]s the container;
/// TERM, INT or QUIT stop it.
pub async fn run(lock_dir: &Path, uuid: &str) -> Result<i32, String> {
    let _lock = take_lock(lock_dir, uuid)?;
    let client = Client::new(ClientConfig::from_env().map_err(|e| format!("API client: {e}"))?)
        .map_err(|e| e.to_string())?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut quit = signal(SignalKind::quit()).map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = quit.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    let (ending, fail) = drive(&client, uuid, stop_rx).await?;
    if fail == "broken" {
        let _ = std::fs::write(broken_path(lock_dir), "");
    }
    match ending {
        Ending::NotLocked => {
            eprintln!("container {uuid} is not Locked: nothing to do");
            Ok(0)
        }
        Ending::Requeued | Ending::Cancelled => Ok(1),
        Ending::Crashed => {
            eprintln!("container {uuid}: crashing without a final update (FAKE_CRUNCH_RUN_FAIL)");
            std::process::exit(3);
        }
        Ending::Complete(_) => {
            if fail == "stale" {
                let _ = std::fs::write(stale_path(lock_dir, uuid), "");
            }
            Ok(0)
        }
    }
}

/// The whole program; returns the exit code.
pub async fn main_with_args(argv: &[String]) -> i32 {
    let args = match parse_args(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fake-crunch-run: {e}");
            return 2;
        }
    };
    let mut stdin = String::new();
    if args.stdin_config || args.stdin_prices {
        let _ = std::io::stdin().read_to_string(&mut stdin);
    }
    match &args.mode {
        Mode::List => {
            print!("{}", list(&args.lock_dir));
            0
        }
        Mode::Kill { signal, uuid } => kill(&args.lock_dir, *signal, uuid),
        Mode::Detach { uuid } => match detach(&args, uuid, &stdin) {
            Ok(line) => {
                println!("{line}");
                0
            }
            Err(e) => {
                eprintln!("fake-crunch-run: {e}");
                1
            }
        },
        Mode::Run { uuid } => match run(&args.lock_dir, uuid).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("fake-crunch-run: {e}");
                1
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        std::iter::once("fake-crunch-run")
            .chain(s.split_whitespace())
            .map(String::from)
            .collect()
    }

    #[test]
    fn parses_the_ways_crunch_run_is_called() {
        let a = parse_args(&argv("--list --stdin-prices")).unwrap();
        assert_eq!(a.mode, Mode::List);
        assert!(a.stdin_prices);
        let a = parse_args(&argv("sudo /tmp/arvados-crunch-run/crunch-run~abc -detach -stdin-config 'zzzzz-dz642-000000000000001'")).unwrap();
        assert_eq!(
            a.mode,
            Mode::Detach {
                uuid: "zzzzz-dz642-000000000000001".into()
            }
        );
        let a = parse_args(&argv("--kill 15 zzzzz-dz642-000000000000001")).unwrap();
        assert_eq!(
            a.mode,
            Mode::Kill {
                signal: 15,
                uuid: "zzzzz-dz642-000000000000001".into()
            }
        );
        let a = parse_args(&argv(
            "--runtime-engine=docker --lock-dir /tmp/x -some-tuning zzzzz-dz642-000000000000002",
        ))
        .unwrap();
        assert_eq!(
            a.mode,
            Mode::Run {
                uuid: "zzzzz-dz642-000000000000002".into()
            }
        );
        assert_eq!(a.lock_dir, PathBuf::from("/tmp/x"));
        let a = parse_args(&argv("--runtime-engine docker zzzzz-dz642-000000000000003")).unwrap();
        assert_eq!(
            a.mode,
            Mode::Run {
                uuid: "zzzzz-dz642-000000000000003".into()
            }
        );
        assert!(parse_args(&argv("--kill x u")).is_err());
        assert!(parse_args(&argv("")).is_err());
    }

    #[test]
    fn list_shows_live_stale_and_broken() {
        let dir = tempfile::tempdir().unwrap();
        let live = lock_path(dir.path(), "zzzzz-dz642-000000000000001");
        std::fs::write(
            &live,
            json!({"UUID":"x","PID": std::process::id()}).to_string(),
        )
        .unwrap();
        let dead = lock_path(dir.path(), "zzzzz-dz642-000000000000002");
        std::fs::write(&dead, json!({"UUID":"y","PID": 999_999_999u32}).to_string()).unwrap();
        std::fs::write(stale_path(dir.path(), "zzzzz-dz642-000000000000003"), "").unwrap();
        assert_eq!(
            list(dir.path()),
            "zzzzz-dz642-000000000000001\nzzzzz-dz642-000000000000003 stale\n"
        );
        std::fs::write(broken_path(dir.path()), "").unwrap();
        assert!(list(dir.path()).ends_with("broken\n"));
        assert_eq!(
            kill(dir.path(), 15, "zzzzz-dz642-000000000000002"),
            0,
            "no such process"
        );
    }
}
