//! A crunch-run process on a worker, as the pool knows it (spec §8.11–8.12): started with
//! `--detach`, or adopted from a run probe; stopped with `--kill 15` every `TimeoutSignal`
//! until it is gone or `TimeoutTERM` has passed (then it is "given up" and the worker drains).
//! SIGKILL is never sent: it would orphan the container's own processes.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use tokio::time::{Duration, Instant};

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::record::Worker;
use super::{Pool, State};
use crate::ssh_executor::Executor;
use crate::worker_state::{Event, IdleBehavior};

pub struct Runner {
    pub uuid: String,
    worker_id: String,
    executor: Arc<Executor>,
    /// The crunch-run command (sudo-prefixed when needed).
    command: String,
    timeout_signal: Duration,
    timeout_term: Duration,
    pool: Weak<Pool>,
    kill_started: Mutex<Option<Instant>>,
    closed: AtomicBool,
    given_up: AtomicBool,
}

impl Runner {
    pub(super) fn new(
        pool: &Arc<Pool>,
        worker_id: &str,
        executor: Arc<Executor>,
        uuid: &str,
        command: String,
    ) -> Arc<Runner> {
        Arc::new(Runner {
            uuid: uuid.to_string(),
            worker_id: worker_id.to_string(),
            executor,
            command,
            timeout_signal: pool.cfg.timeout_signal,
            timeout_term: pool.cfg.timeout_term,
            pool: Arc::downgrade(pool),
            kill_started: Mutex::new(None),
            closed: AtomicBool::new(false),
            given_up: AtomicBool::new(false),
        })
    }

    /// `TimeoutTERM` passed without the process going away.
    pub fn given_up(&self) -> bool {
        self.given_up.load(Ordering::SeqCst)
    }

    /// No longer tracked: stop any kill loop.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Start the kill loop (once; later calls do nothing).
    pub fn kill(self: &Arc<Self>, reason: &str) {
        {
            let mut started = self.kill_started.lock();
            if started.is_some() {
                return;
            }
            *started = Some(Instant::now());
        }
        tracing::info!(
            ContainerUUID = %self.uuid,
            Instance = %self.worker_id,
            Reason = %reason,
            "killing crunch-run process"
        );
        // A stopped pool leaves crunch-run processes to the next dispatcher, which kills them
        // again if their containers are still cancelled.
        if let Some(pool) = self.pool.upgrade() {
            pool.tasks.spawn_until_cancelled(self.clone().kill_loop());
        }
    }

    async fn kill_loop(self: Arc<Self>) {
        let started = Instant::now();
        let command = super::config::kill_command(&self.command, &self.uuid);
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            if started.elapsed() >= self.timeout_term {
                self.given_up.store(true, Ordering::SeqCst);
                if let Some(pool) = self.pool.upgrade() {
                    pool.on_unkillable(&self.worker_id, &self.uuid);
                }
                return;
            }
            match self.executor.execute(&[], &command, b"").await {
                Ok(_) => {
                    if let Some(pool) = self.pool.upgrade() {
                        pool.on_killed(&self.worker_id, &self.uuid);
                    }
                    return;
                }
                Err(f) => tracing::info!(
                    ContainerUUID = %self.uuid,
                    Instance = %self.worker_id,
                    error = %f,
                    stderr = %String::from_utf8_lossy(&f.output.stderr).trim(),
                    "kill attempt unsuccessful"
                ),
            }
            tokio::time::sleep(self.timeout_signal).await;
        }
    }
}

/// The pool's side of a runner's life (spec §8.12).
impl Pool {
    // -----------------------------------------------------------------------------------
    // Runners (§8.12)

    /// `--kill` succeeded: the process is gone.
    pub(super) fn on_killed(&self, worker_id: &str, uuid: &str) {
        let now = Instant::now();
        let mut st = self.lock();
        let State {
            workers, exited, ..
        } = &mut *st;
        if let Some(w) = workers.get_mut(worker_id) {
            // Better than Go (§13.3 item 20): a runner still starting is closed too.
            if w.running.contains_key(uuid) || w.starting.contains_key(uuid) {
                close_runner(w, exited, uuid, now);
            }
        }
        drop(st);
        self.notify();
    }

    /// `TimeoutTERM` passed: drain the worker (unless on hold).
    pub(super) fn on_unkillable(&self, worker_id: &str, uuid: &str) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(worker_id) else {
            return;
        };
        if w.idle_behavior == IdleBehavior::Hold {
            tracing::warn!(Instance = %worker_id, ContainerUUID = %uuid, "unkillable container, but worker is on hold");
            return;
        }
        tracing::warn!(Instance = %worker_id, ContainerUUID = %uuid, "unkillable container, draining worker");
        w.idle_behavior = IdleBehavior::Drain;
        self.save_tags(w);
        self.shutdown_if_idle(w, now);
        drop(st);
        self.notify();
    }
}

/// The process ended (or was killed): stop tracking it, leave an exited placeholder.
pub(super) fn close_runner(
    w: &mut Worker,
    exited: &mut HashMap<String, DateTime<Utc>>,
    uuid: &str,
    now: Instant,
) {
    let r = w.running.remove(uuid).or_else(|| w.starting.remove(uuid));
    if let Some(r) = r {
        tracing::info!(Instance = %w.id, ContainerUUID = %uuid, "crunch-run process ended");
        r.close();
    }
    w.updated = now;
    w.proc_gen += 1;
    exited.insert(uuid.to_string(), Utc::now());
    if w.processes() == 0 {
        w.apply(Event::LastProcessEnded);
    }
}
