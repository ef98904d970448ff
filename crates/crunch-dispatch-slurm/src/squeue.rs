//! The squeue checker: one `squeue` per poll interval gives the set of jobs (by name), and
//! after each poll the renice pass puts Slurm's order right.
//!
//! Every question about a job waits for a snapshot taken by an `squeue` that *started*
//! after the question was asked ([`Checker::fresh`]), so a job submitted just before cannot
//! look missing (Arvados compares against any later-finished poll, which can have started
//! before the submission, and then unlocks a container whose job exists). Waits have a
//! deadline, so a failing squeue does not stall the dispatcher forever.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::priority::{SlurmPriority, want_nice};
use crate::slurm::Slurm;

/// One job as squeue lists it, plus what the dispatcher wants for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub name: String,
    pub nice: i64,
    pub priority: i64,
    /// `PENDING`, `RUNNING`, …
    pub state: String,
    /// Free text, e.g. `Resources`, `BadConstraints`, `launch failed requeued held`.
    pub reason: String,
    /// The desired priority registered by the runner; 0 = none (not reniced).
    pub wanted: i64,
}

/// One line of `squeue --format=%j %y %Q %T %r`: name, nice, priority, state, and the
/// reason as the rest of the line (it can contain spaces). `None` if it does not parse.
pub fn parse_line(line: &str) -> Option<Job> {
    let mut rest = line.trim_start();
    let mut next = || {
        let t = rest.split_whitespace().next()?;
        let at = rest.find(t)? + t.len();
        rest = rest[at..].trim_start();
        Some(t)
    };
    let name = next()?.to_string();
    let nice = next()?.parse().ok()?;
    let priority = next()?.parse().ok()?;
    let state = next()?.to_string();
    let reason = rest.trim_end().to_string();
    if reason.is_empty() {
        return None;
    }
    Some(Job {
        name,
        nice,
        priority,
        state,
        reason,
        wanted: 0,
    })
}

/// Priorities at or below this, on a job that is not running, are worth a warning.
pub const LOW_PRIORITY: i64 = 20000;

/// Whether a listed job deserves the low-priority warning: it waits, its priority is at or
/// below [`LOW_PRIORITY`], and the dispatcher cares about its order.
pub fn low_priority(job: &Job) -> bool {
    job.state != "RUNNING" && job.priority <= LOW_PRIORITY && job.wanted != 0
}

/// The pending reasons after which Slurm will never start a job by itself: the job is held,
/// or asks for more than its partition or any node offers.
pub fn reason_is_unrunnable(reason: &str) -> bool {
    const NEVER: [&str; 9] = [
        "BadConstraints",
        "PartitionConfig",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "JobHeldAdmin",
        "JobHeldUser",
        "InvalidAccount",
        "InvalidQOS",
        "DependencyNeverSatisfied",
    ];
    NEVER.contains(&reason) || reason.starts_with("launch failed requeued held")
}

/// A published squeue result.
#[derive(Debug, Default)]
struct Snapshot {
    jobs: HashMap<String, Job>,
    /// The sequence number of the squeue run that produced it (runs are numbered from 1 in
    /// the order they start).
    run: u64,
}

struct Inner {
    snapshot: Snapshot,
    /// squeue runs started so far.
    started: u64,
}

/// The squeue checker (see the module doc). Cheap to clone.
#[derive(Clone)]
pub struct Checker {
    inner: Arc<Mutex<Inner>>,
    /// The `run` number of the latest snapshot.
    published: watch::Sender<u64>,
    slurm: Slurm,
    spread: i64,
    /// How long a question may wait for a fresh snapshot.
    wait_limit: Duration,
}

/// No fresh squeue result arrived in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no squeue result within {0:?}")]
pub struct Stale(pub Duration);

impl Checker {
    pub fn new(slurm: Slurm, spread: i64, wait_limit: Duration) -> Checker {
        Checker {
            inner: Arc::new(Mutex::new(Inner {
                snapshot: Snapshot::default(),
                started: 0,
            })),
            published: watch::channel(0).0,
            slurm,
            spread,
            wait_limit,
        }
    }

    fn inner(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// Poll every `period` until `shutdown` is cancelled.
    pub async fn run(&self, period: Duration, shutdown: dispatch::CancellationToken) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            self.poll().await;
            self.renice().await;
        }
    }

    /// One squeue run; on success its result replaces the snapshot and wakes every waiter.
    pub async fn poll(&self) {
        let run = {
            let mut st = self.inner();
            st.started += 1;
            st.started
        };
        let text = match self.slurm.queue().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("Error running squeue: {e}");
                return;
            }
        };
        self.publish(run, &text);
    }

    /// Replace the snapshot with squeue run `run`'s output `text`.
    pub fn publish(&self, run: u64, text: &str) {
        let mut st = self.inner();
        if run < st.snapshot.run {
            return;
        }
        let mut jobs: HashMap<String, Job> = HashMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Some(mut job) = parse_line(line) else {
                tracing::warn!("ignoring unparsed line in squeue output: {line:?}");
                continue;
            };
            job.wanted = st.snapshot.jobs.get(&job.name).map_or(0, |j| j.wanted);
            if low_priority(&job) {
                tracing::warn!(
                    "job {:?} has low priority {}, nice {}, state {:?}, reason {:?}",
                    job.name,
                    job.priority,
                    job.nice,
                    job.state,
                    job.reason
                );
            }
            jobs.insert(job.name.clone(), job);
        }
        st.snapshot = Snapshot { jobs, run };
        drop(st);
        self.published.send_replace(run);
    }

    /// The number of the latest squeue run started so far: a snapshot with a higher `run`
    /// started after this moment.
    pub fn mark(&self) -> u64 {
        self.inner().started
    }

    /// Wait (at most `wait_limit`) until a snapshot from an squeue run started after `mark`
    /// has been published.
    async fn wait_after(&self, mark: u64) -> Result<(), Stale> {
        let mut rx = self.published.subscribe();
        match tokio::time::timeout(self.wait_limit, rx.wait_for(|run| *run > mark)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Stale(self.wait_limit)),
        }
    }

    /// Wait for a snapshot from an squeue run started after `mark`; its run number (a mark
    /// for the next wait) and the job named `name` in it, if listed.
    pub async fn fresh(&self, mark: u64, name: &str) -> Result<(u64, Option<Job>), Stale> {
        self.wait_after(mark).await?;
        let st = self.inner();
        Ok((st.snapshot.run, st.snapshot.jobs.get(name).cloned()))
    }

    /// Whether a job named `name` exists, by an squeue started after this call.
    pub async fn has_uuid(&self, name: &str) -> Result<bool, Stale> {
        let mark = self.mark();
        Ok(self.fresh(mark, name).await?.1.is_some())
    }

    /// The job named `name` in the current snapshot.
    pub fn job(&self, name: &str) -> Option<Job> {
        self.inner().snapshot.jobs.get(name).cloned()
    }

    /// Every job name in a snapshot started after this call.
    pub async fn all(&self) -> Result<Vec<String>, Stale> {
        self.wait_after(self.mark()).await?;
        let mut names: Vec<String> = self.inner().snapshot.jobs.keys().cloned().collect();
        names.sort();
        Ok(names)
    }

    /// Register the priority the job named `name` should have. If it is not listed yet, wait
    /// for the next snapshot and look again; if still absent, the registration is dropped
    /// (the runner registers again with the container's next update).
    pub async fn set_priority(&self, name: &str, want: i64) {
        let mark = {
            let mut st = self.inner();
            if let Some(j) = st.snapshot.jobs.get_mut(name) {
                j.wanted = want;
                return;
            }
            st.started
        };
        // Stale or not, look once more; an absent job keeps no registration.
        let _ = self.wait_after(mark).await;
        if let Some(j) = self.inner().snapshot.jobs.get_mut(name) {
            j.wanted = want;
        }
    }

    /// The renice commands the current snapshot calls for: registered jobs in desired order
    /// (ties by name, descending), each whose nice value must change.
    pub fn renice_plan(&self) -> Vec<(String, i64)> {
        let st = self.inner();
        let mut jobs: Vec<&Job> = st
            .snapshot
            .jobs
            .values()
            .filter(|j| j.wanted != 0)
            .collect();
        jobs.sort_by(|a, b| b.wanted.cmp(&a.wanted).then(b.name.cmp(&a.name)));
        let current: Vec<SlurmPriority> = jobs
            .iter()
            .map(|j| SlurmPriority {
                priority: j.priority,
                nice: j.nice,
            })
            .collect();
        jobs.iter()
            .zip(want_nice(&current, self.spread))
            .filter(|(j, n)| j.nice != *n)
            .map(|(j, n)| (j.name.clone(), n))
            .collect()
    }

    /// Run the renice commands; failures are logged, and the next poll recomputes.
    pub async fn renice(&self) {
        for (name, nice) in self.renice_plan() {
            if let Err(e) = self.slurm.renice(&name, nice).await {
                tracing::warn!("renice {name} to {nice}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slurm::{BoxFuture, CmdResult, Commands};
    use std::time::Instant;

    /// A Slurm whose squeue prints `queue` and which records renices.
    #[derive(Default)]
    struct FakeSlurm {
        queue: Mutex<String>,
        renices: Mutex<Vec<(String, i64)>>,
    }

    impl Commands for FakeSlurm {
        fn run<'a>(
            &'a self,
            prog: &'a str,
            args: &'a [String],
            _stdin: Option<&'a str>,
        ) -> BoxFuture<'a, CmdResult> {
            let out = match prog {
                "squeue" => Ok(self.queue.lock().clone()),
                "scontrol" => {
                    let name = args[1].strip_prefix("JobName=").unwrap().to_string();
                    let nice = args[2].strip_prefix("Nice=").unwrap().parse().unwrap();
                    self.renices.lock().push((name, nice));
                    Ok(String::new())
                }
                other => Err(format!("unexpected {other}")),
            };
            Box::pin(async move { out })
        }
    }

    fn fake(n: usize) -> String {
        format!("zzzzz-dz642-fake{n}fake{n}fake{n}")
    }

    fn checker(queue: &str, spread: i64) -> (Checker, Arc<FakeSlurm>) {
        let f = Arc::new(FakeSlurm::default());
        *f.queue.lock() = queue.to_string();
        let c = Checker::new(Slurm::new(f.clone()), spread, Duration::from_secs(5));
        (c, f)
    }

    async fn renices(queue: &str, spread: i64, want: &[(usize, i64)]) -> Vec<(String, i64)> {
        let (c, f) = checker(queue, spread);
        c.poll().await;
        for (n, p) in want {
            c.set_priority(&fake(*n), *p).await;
        }
        c.renice().await;
        f.renices.lock().clone()
    }

    fn q(lines: &[(usize, i64, i64)]) -> String {
        lines
            .iter()
            .map(|(n, nice, prio)| format!("{} {nice} {prio} PENDING Resources\n", fake(*n)))
            .collect()
    }

    #[tokio::test]
    async fn ac_slurm_14_one_job() {
        let r = renices(&q(&[(0, 10000, 4294000000)]), 1, &[(0, 1)]).await;
        assert_eq!(r, [(fake(0), 0)]);
    }

    #[tokio::test]
    async fn ac_slurm_15_reorder_spread_1() {
        let queue = q(&[(0, 10000, 4294000777), (1, 10000, 4294000444)]);
        let r = renices(&queue, 1, &[(0, 1), (1, 999)]).await;
        assert_eq!(r, [(fake(1), 0), (fake(0), 334)]);
    }

    #[tokio::test]
    async fn ac_slurm_16_reorder_spread_100() {
        let queue = q(&[(0, 10000, 4294000777), (1, 10000, 4294000444)]);
        let r = renices(&queue, 100, &[(0, 1), (1, 999)]).await;
        assert_eq!(r, [(fake(1), 0), (fake(0), 433)]);
    }

    #[tokio::test]
    async fn ac_slurm_17_unregistered_jobs_are_ignored() {
        let queue = q(&[
            (0, 10000, 4294000000),
            (1, 10000, 4294000111),
            (2, 10000, 4294000222),
        ]);
        let r = renices(&queue, 1, &[(0, 999), (1, 1)]).await;
        assert_eq!(r, [(fake(0), 0), (fake(1), 112)]);
    }

    #[tokio::test]
    async fn ac_slurm_18_set_priority_before_the_job_is_queued() {
        let (c, f) = checker("", 10);
        c.poll().await;
        let bg = {
            let c = c.clone();
            tokio::spawn(async move {
                c.set_priority(&fake(0), 123).await;
                c.set_priority(&fake(1), 345).await;
            })
        };
        assert!(c.job(&fake(0)).is_none() && c.job(&fake(1)).is_none());
        *f.queue.lock() = format!("{} 0 12345 PENDING Resources\n", fake(0));
        let started = Instant::now();
        while !bg.is_finished() {
            c.poll().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(c.job(&fake(0)).unwrap().wanted, 123);
        assert!(c.job(&fake(1)).is_none());
    }

    #[test]
    fn ac_slurm_s4_squeue_parsing() {
        assert_eq!(parse_line("foo bar 1 PENDING None"), None);
        assert_eq!(parse_line("foo 1 2 PENDING"), None);
        let j = parse_line(
            "zzzzz-dz642-000000000000001 100 4294901659 PENDING launch failed requeued held",
        )
        .unwrap();
        assert_eq!(
            (j.name.as_str(), j.nice, j.priority, j.state.as_str()),
            ("zzzzz-dz642-000000000000001", 100, 4294901659, "PENDING")
        );
        // Better than Arvados, which keeps only "launch": the reason is free text.
        assert_eq!(j.reason, "launch failed requeued held");
        assert!(reason_is_unrunnable(&j.reason));
        assert!(!reason_is_unrunnable("Resources"));
        // An unparsable line is skipped, the rest kept.
        let (c, _) = checker("", 10);
        c.publish(1, "foo bar 1 PENDING None\nok 0 5 RUNNING None\n\n");
        assert!(c.job("ok").is_some() && c.job("foo").is_none());
    }

    #[test]
    fn ac_slurm_s5_low_priority_warning_applies_to_registered_waiting_jobs() {
        // The rule the warning follows, checked on parsed jobs (the warning is a log line).
        let warn = |line: &str, wanted: i64| {
            let mut j = parse_line(line).unwrap();
            j.wanted = wanted;
            low_priority(&j)
        };
        assert!(warn("a 0 20000 PENDING Resources", 1));
        assert!(!warn("a 0 20001 PENDING Resources", 1));
        assert!(!warn("a 0 5 RUNNING None", 1));
        assert!(!warn("a 0 5 PENDING Resources", 0));
    }

    #[tokio::test]
    async fn bug_5_a_snapshot_from_an_squeue_started_before_the_question_does_not_answer() {
        // §10.5: an squeue that started before a submission finishes after the question.
        let (c, _) = checker("", 10);
        let early = {
            let mut st = c.inner();
            st.started += 1;
            st.started
        };
        let mark = c.mark();
        let question = {
            let c = c.clone();
            tokio::spawn(async move { c.fresh(mark, "job").await })
        };
        c.publish(early, "");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!question.is_finished(), "an older run answered");
        c.publish(c.mark() + 1, "job 0 5 PENDING Resources\n");
        assert!(question.await.unwrap().unwrap().1.is_some());
    }

    #[tokio::test]
    async fn bug_3_questions_give_up_when_squeue_keeps_failing() {
        // §10.3: Arvados waits for a successful squeue forever.
        let limit = Duration::from_millis(50);
        let c = Checker::new(Slurm::new(Arc::new(FakeSlurm::default())), 10, limit);
        let err = c.has_uuid("x").await.unwrap_err();
        assert_eq!(err.0, limit);
    }
}
