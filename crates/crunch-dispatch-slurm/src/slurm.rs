//! Talking to Slurm through its commands (`sbatch`, `squeue`, `scancel`, `scontrol`).
//!
//! [`Commands`] runs one program; [`CliCommands`] is the real one: every command has a
//! deadline (a dead controller makes Slurm's clients hang for up to 18 s; Arvados waits
//! forever) and at most three run at once, except `squeue`, which never waits behind them.
//! [`Slurm`] builds the exact command lines Arvados uses on top of it, so a test double
//! of [`Commands`] sees the real argv.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

/// A boxed future, for the object-safe [`Commands`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a command printed (stdout and stderr together, trimmed), or why it failed.
pub type CmdResult = Result<String, String>;

/// Runs Slurm's client programs.
pub trait Commands: Send + Sync {
    /// Run `prog args…` with `stdin`; `Ok(output)` on exit status 0, else
    /// `Err("<path>: <error> (\"<output>\")")`. `squeue`'s `Ok` is its stdout only.
    fn run<'a>(
        &'a self,
        prog: &'a str,
        args: &'a [String],
        stdin: Option<&'a str>,
    ) -> BoxFuture<'a, CmdResult>;
}

/// How long one Slurm command may take before it is killed.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The real Slurm commands, found on `PATH`.
pub struct CliCommands {
    slots: Semaphore,
    timeout: Duration,
    /// Added to every command's environment (and so to every job's, through sbatch).
    env: Vec<(String, String)>,
}

impl CliCommands {
    pub fn new(timeout: Duration) -> CliCommands {
        CliCommands {
            slots: Semaphore::new(3),
            timeout,
            env: Vec::new(),
        }
    }

    /// Commands (and jobs) get these variables on top of the dispatcher's environment.
    pub fn with_env(mut self, env: Vec<(String, String)>) -> CliCommands {
        self.env = env;
        self
    }
}

/// Where `prog` is on `PATH` (for log lines), or `prog` itself.
pub fn resolve(prog: &str) -> String {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    });
    found
        .unwrap_or_else(|| PathBuf::from(prog))
        .display()
        .to_string()
}

/// `["prog" "arg" …]`, as Arvados prints an argv.
pub fn quote_argv(prog: &str, args: &[String]) -> String {
    let words: Vec<String> = std::iter::once(prog.to_string())
        .chain(args.iter().cloned())
        .map(|w| format!("{w:?}"))
        .collect();
    format!("[{}]", words.join(" "))
}

impl Commands for CliCommands {
    fn run<'a>(
        &'a self,
        prog: &'a str,
        args: &'a [String],
        stdin: Option<&'a str>,
    ) -> BoxFuture<'a, CmdResult> {
        Box::pin(async move {
            let squeue = prog == "squeue";
            let _slot = if squeue {
                None
            } else {
                Some(self.slots.acquire().await.map_err(|e| e.to_string())?)
            };
            let path = resolve(prog);
            let mut cmd = tokio::process::Command::new(prog);
            cmd.args(args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let run = async {
                let mut child = cmd.spawn().map_err(|e| format!("{path}: {e}"))?;
                if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                    pipe.write_all(text.as_bytes())
                        .await
                        .map_err(|e| format!("{path}: writing stdin: {e}"))?;
                }
                child
                    .wait_with_output()
                    .await
                    .map_err(|e| format!("{path}: {e}"))
            };
            let out = match tokio::time::timeout(self.timeout, run).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(format!(
                        "{path}: no answer within {:?} (killed)",
                        self.timeout
                    ));
                }
            };
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if squeue && out.status.success() {
                return Ok(stdout.into_owned());
            }
            let combined = format!("{stdout}{stderr}").trim().to_string();
            if !combined.is_empty() || !out.status.success() {
                tracing::info!("{path:?} {}: {combined:?}", quote_argv(prog, args));
            }
            if out.status.success() {
                Ok(combined)
            } else {
                Err(format!("{path}: {} ({combined:?})", out.status))
            }
        })
    }
}

/// The Slurm operations the dispatcher needs, as Arvados spells them.
#[derive(Clone)]
pub struct Slurm {
    cmds: Arc<dyn Commands>,
}

/// squeue's format: job name, nice, priority, state, reason (the reason last, as free text).
pub const SQUEUE_FORMAT: &str = "--format=%j %y %Q %T %r";

impl Slurm {
    pub fn new(cmds: Arc<dyn Commands>) -> Slurm {
        Slurm { cmds }
    }

    /// `sbatch ARGS…` with the batch script on stdin; the job id sbatch printed, if any.
    pub async fn batch(&self, script: &str, args: &[String]) -> Result<Option<u64>, String> {
        let out = self.cmds.run("sbatch", args, Some(script)).await?;
        Ok(out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Submitted batch job "))
            .and_then(|id| id.trim().parse().ok()))
    }

    /// `squeue --all --noheader --format=…`: the raw listing.
    pub async fn queue(&self) -> CmdResult {
        let args = ["--all", "--noheader", SQUEUE_FORMAT].map(String::from);
        self.cmds.run("squeue", &args, None).await
    }

    /// Cancel the job named `name`: remove it if pending; TERM crunch-run (the batch shell
    /// exec'd it) if running or suspended, so it can stop the container and finalise it.
    /// Stops at the first failure (scancel succeeds when nothing matches).
    pub async fn cancel(&self, name: &str) -> Result<(), String> {
        let named = format!("--name={name}");
        let steps: [&[&str]; 3] = [
            &["--state=pending"],
            &["--batch", "--signal=TERM", "--state=running"],
            &["--batch", "--signal=TERM", "--state=suspended"],
        ];
        for extra in steps {
            let args: Vec<String> = std::iter::once(named.clone())
                .chain(extra.iter().map(|s| s.to_string()))
                .collect();
            self.cmds.run("scancel", &args, None).await?;
        }
        Ok(())
    }

    /// `scontrol update JobName=NAME Nice=N`.
    pub async fn renice(&self, name: &str, nice: i64) -> Result<(), String> {
        let args = [
            "update".to_string(),
            format!("JobName={name}"),
            format!("Nice={nice}"),
        ];
        self.cmds.run("scontrol", &args, None).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// Records every command; fails the commands `fail` names.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        fail: Vec<String>,
    }

    impl Commands for Recorder {
        fn run<'a>(
            &'a self,
            prog: &'a str,
            args: &'a [String],
            _stdin: Option<&'a str>,
        ) -> BoxFuture<'a, CmdResult> {
            let line = format!("{prog} {}", args.join(" "));
            let failed = self.fail.iter().any(|f| line.starts_with(f));
            self.calls.lock().push(line);
            Box::pin(async move {
                if failed {
                    Err("boom".into())
                } else {
                    Ok(String::new())
                }
            })
        }
    }

    #[tokio::test]
    async fn ac_slurm_s2_cancel_sequence() {
        let rec = Arc::new(Recorder::default());
        let s = Slurm::new(rec.clone());
        s.cancel("zzzzz-dz642-fake0fake0fake0").await.unwrap();
        assert_eq!(
            *rec.calls.lock(),
            [
                "scancel --name=zzzzz-dz642-fake0fake0fake0 --state=pending",
                "scancel --name=zzzzz-dz642-fake0fake0fake0 --batch --signal=TERM --state=running",
                "scancel --name=zzzzz-dz642-fake0fake0fake0 --batch --signal=TERM --state=suspended",
            ]
        );
        let rec = Arc::new(Recorder {
            fail: vec!["scancel".into()],
            ..Default::default()
        });
        let s = Slurm::new(rec.clone());
        assert!(s.cancel("x").await.is_err());
        assert_eq!(rec.calls.lock().len(), 1, "stops at the first failure");
    }

    #[tokio::test]
    async fn ac_slurm_s3_renice_command() {
        let rec = Arc::new(Recorder::default());
        Slurm::new(rec.clone())
            .renice("zzzzz-dz642-fake0fake0fake0", 334)
            .await
            .unwrap();
        assert_eq!(
            *rec.calls.lock(),
            ["scontrol update JobName=zzzzz-dz642-fake0fake0fake0 Nice=334"]
        );
    }

    #[tokio::test]
    async fn cli_commands_report_failures_and_time_out() {
        let cli = CliCommands::new(Duration::from_millis(300));
        let ok = cli
            .run("sh", &["-c".into(), "echo hi; echo there >&2".into()], None)
            .await;
        assert_eq!(ok.unwrap(), "hi\nthere");
        let err = cli
            .run("sh", &["-c".into(), "echo no; exit 3".into()], None)
            .await
            .unwrap_err();
        assert!(err.ends_with("exit status: 3 (\"no\")"), "{err}");
        let slow = cli.run("sleep", &["5".into()], None).await.unwrap_err();
        assert!(slow.contains("no answer within"), "{slow}");
        let fed = cli.run("cat", &[], Some("script\n")).await.unwrap();
        assert_eq!(fed, "script");
    }
}
