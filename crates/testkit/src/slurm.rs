//! A real Slurm (Debian's `slurm-wlm` and `munge`) on 127.0.0.1 for tests: munged, slurmctld
//! and one slurmd node in a temporary directory, with free ports, no systemd and nothing
//! outside the directory. Client commands find it through `SLURM_CONF` in their environment
//! ([`SlurmCluster::env`]). Dropping the cluster cancels every job, waits for the queue to
//! empty, then stops the daemons (job processes would outlive slurmd otherwise).
//!
//! The node advertises a fixed size (`CPUs=4 RealMemory=8000 TmpDisk=100000` by default)
//! whatever the host has (`SlurmdParameters=config_overrides`). Slurm's daemons run as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The node's advertised size.
#[derive(Debug, Clone, Copy)]
pub struct NodeSize {
    pub cpus: u32,
    pub memory_mib: u64,
    pub tmp_mib: u64,
}

impl Default for NodeSize {
    fn default() -> Self {
        NodeSize {
            cpus: 4,
            memory_mib: 8000,
            tmp_mib: 100_000,
        }
    }
}

pub struct SlurmCluster {
    dir: tempfile::TempDir,
    daemons: Vec<(&'static str, Child)>,
}

/// Whether the Slurm and munge programs are installed; in CI (`CI` set) they must be
/// (`scripts/test` installs them), elsewhere a test may skip loudly.
pub fn available_or_skip() -> bool {
    let have = ["slurmctld", "slurmd", "munged", "mungekey", "sbatch"]
        .iter()
        .all(|p| which(p).is_some());
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !(have && root) {
        assert!(
            std::env::var_os("CI").is_none(),
            "Slurm tests need slurm-wlm and munge installed (scripts/test does) and root"
        );
        eprintln!(
            "SKIPPED: Slurm tests need slurm-wlm and munge (scripts/test installs them) and root"
        );
    }
    have && root
}

fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn program(prog: &str) -> PathBuf {
    which(prog).unwrap_or_else(|| PathBuf::from(prog))
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join("log").join(format!("{name}.out")))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

impl SlurmCluster {
    /// Start munged, slurmctld and slurmd; return once the node is idle.
    pub fn start(node: NodeSize) -> anyhow::Result<SlurmCluster> {
        let dir = tempfile::Builder::new().prefix("slurm-test-").tempdir()?;
        let d = dir.path();
        for sub in ["etc", "run/munge", "log", "state", "spool/node0"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("etc"), std::fs::Permissions::from_mode(0o700))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(d.join("run"), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(d.join("run/munge"), std::fs::Permissions::from_mode(0o755))?;
        let key = d.join("etc/munge.key");
        let st = Command::new(program("mungekey"))
            .arg("-c")
            .arg("-k")
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "mungekey failed: {st}");
        let socket = d.join("run/munge/munge.socket");
        let mut cluster = SlurmCluster {
            daemons: Vec::new(),
            dir,
        };
        let d = cluster.dir.path().to_path_buf();
        let munged = Command::new(program("munged"))
            .arg("-F")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--pid-file={}", d.join("run/munged.pid").display()))
            .arg(format!(
                "--seed-file={}",
                d.join("run/munge.seed").display()
            ))
            .arg(format!("--log-file={}", d.join("log/munged.log").display()))
            .stdout(log_file(&d, "munged"))
            .stderr(log_file(&d, "munged.err"))
            .spawn()?;
        cluster.daemons.push(("munged", munged));
        wait_until(Duration::from_secs(10), || socket.exists())
            .map_err(|_| anyhow::anyhow!("munged did not create its socket"))?;

        let (ctld_port, d_port) = (crate::free_port(), crate::free_port());
        let conf = d.join("slurm.conf");
        let p = |s: &str| d.join(s).display().to_string();
        std::fs::write(
            &conf,
            format!(
                "ClusterName=adctest\n\
                 SlurmctldHost=localhost(127.0.0.1)\n\
                 SlurmctldPort={ctld_port}\n\
                 SlurmdPort={d_port}\n\
                 SlurmUser=root\n\
                 AuthType=auth/munge\n\
                 CredType=cred/munge\n\
                 AuthInfo=socket={socket}\n\
                 CommunicationParameters=NoCtldInAddrAny,NoInAddrAny\n\
                 StateSaveLocation={state}\n\
                 SlurmdSpoolDir={spool}/%n\n\
                 SlurmctldPidFile={run}/slurmctld.pid\n\
                 SlurmdPidFile={run}/slurmd.pid\n\
                 SlurmctldLogFile={log}/slurmctld.log\n\
                 SlurmdLogFile={log}/slurmd.log\n\
                 ProctrackType=proctrack/pgid\n\
                 TaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\n\
                 SelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_Core_Memory\n\
                 SlurmdParameters=config_overrides\n\
                 SchedulerParameters=batch_sched_delay=0\n\
                 ReturnToService=2\n\
                 MinJobAge=60\n\
                 NodeName=node0 NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={cpus} RealMemory={mem} TmpDisk={tmp} State=UNKNOWN\n\
                 PartitionName=debug Nodes=node0 Default=YES MaxTime=INFINITE State=UP\n",
                socket = socket.display(),
                state = p("state"),
                spool = p("spool"),
                run = p("run"),
                log = p("log"),
                cpus = node.cpus,
                mem = node.memory_mib,
                tmp = node.tmp_mib,
            ),
        )?;
        let ctld = Command::new(program("slurmctld"))
            .arg("-D")
            .arg("-f")
            .arg(&conf)
            .stdout(log_file(&d, "slurmctld"))
            .stderr(log_file(&d, "slurmctld.err"))
            .spawn()?;
        cluster.daemons.push(("slurmctld", ctld));
        let slurmd = Command::new(program("slurmd"))
            .arg("-D")
            .arg("-N")
            .arg("node0")
            .arg("-f")
            .arg(&conf)
            .stdout(log_file(&d, "slurmd"))
            .stderr(log_file(&d, "slurmd.err"))
            .spawn()?;
        cluster.daemons.push(("slurmd", slurmd));
        let idle = wait_until(Duration::from_secs(60), || {
            cluster
                .command("sinfo", &["-h", "-N", "-n", "node0", "-o", "%T"])
                .is_ok_and(|s| s.trim() == "idle")
        });
        if idle.is_err() {
            anyhow::bail!(
                "the Slurm node did not become idle within 60 s; logs in {}:\n{}",
                d.display(),
                cluster.logs()
            );
        }
        Ok(cluster)
    }

    /// `SLURM_CONF`, for client commands and for a dispatcher that runs them.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![(
            "SLURM_CONF".to_string(),
            self.dir.path().join("slurm.conf").display().to_string(),
        )]
    }

    /// The cluster's temporary directory (job output lands wherever the submitter runs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Run a Slurm client command against this cluster; its stdout, or an error with
    /// stderr. Each has a 30 s deadline (a dead controller makes clients hang ~18 s).
    pub fn command(&self, prog: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut child = Command::new(program(prog))
            .args(args)
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let start = Instant::now();
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{prog} {args:?}: no answer within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output()?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            anyhow::bail!(
                "{prog} {args:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        }
    }

    /// The queue: (name, nice, priority, state, reason) per job.
    pub fn jobs(&self) -> Vec<SlurmJob> {
        self.command(
            "squeue",
            &["--all", "--noheader", "--format=%j|%y|%Q|%T|%r|%i"],
        )
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() == 6).then(|| SlurmJob {
                name: f[0].to_string(),
                nice: f[1].parse().unwrap_or(0),
                priority: f[2].parse().unwrap_or(0),
                state: f[3].to_string(),
                reason: f[4].to_string(),
                id: f[5].to_string(),
            })
        })
        .collect()
    }

    /// Every daemon's log so far, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                out.push_str(&format!("== {}\n", e.path().display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// One job in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmJob {
    pub name: String,
    pub nice: i64,
    pub priority: i64,
    pub state: String,
    pub reason: String,
    pub id: String,
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Result<(), ()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(())
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        // Jobs first: their processes would outlive slurmd.
        let _ = self.command("scancel", &["--full", "--user=root"]);
        let _ = wait_until(Duration::from_secs(20), || {
            self.command(
                "squeue",
                &[
                    "--noheader",
                    "--states=PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING",
                ],
            )
            .is_ok_and(|s| s.trim().is_empty())
        });
        for (_, child) in self.daemons.iter_mut().rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (name, child) in self.daemons.iter_mut().rev() {
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(15) {
                    eprintln!("{name} did not stop within 15 s of SIGTERM: killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
