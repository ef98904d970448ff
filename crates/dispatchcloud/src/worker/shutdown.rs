//! Shutting workers down (spec §8.13): the idle rules, the operator's kill and idle
//! behaviour, the boot outcome metric, and the destroy call.

use tokio::time::{Duration, Instant};

use super::Pool;
use super::record::Worker;
use crate::worker_state::{Action, Event, IdleBehavior};

impl Pool {
    // -----------------------------------------------------------------------------------
    // Shutting down (§8.13)

    pub(super) fn report_boot_outcome(&self, w: &mut Worker, outcome: &str) {
        if !w.boot_outcome_reported {
            w.boot_outcome_reported = true;
            self.metrics
                .boot_outcomes
                .with_label_values(&[outcome])
                .inc();
        }
    }

    pub(super) fn shutdown_locked(&self, w: &mut Worker, now: Instant) {
        let was = w.state;
        if w.apply(Event::ShutdownDecided) != Some(Action::Destroy) {
            return;
        }
        w.updated = now;
        w.proc_gen += 1;
        w.destroyed = Some(now);
        self.events
            .push("shutdown", w.id.clone(), format!("{} was {was}", w.it.name));
        self.notify();
        let (inst, id, me) = (w.instance.clone(), w.id.clone(), self.me.clone());
        self.spawn(async move {
            if let Err(e) = inst.destroy().await {
                tracing::warn!(Instance = %id, error = %e, "shutdown failed");
                if let Some(p) = me.upgrade() {
                    p.events.push("error", id, format!("shutdown failed: {e}"));
                }
            }
        });
    }

    /// Shut down if the idle rules say so (§8.7); true if it did.
    pub(super) fn shutdown_if_idle(&self, w: &mut Worker, now: Instant) -> bool {
        let timeout_idle = self.idle_timeout(&w.it.name, now);
        if !w.eligible_for_shutdown(now, timeout_idle, self.cfg.timeout_booting) {
            return false;
        }
        tracing::info!(
            Instance = %w.id,
            WorkerState = %w.state,
            IdleDuration = ?now.saturating_duration_since(w.busy),
            IdleBehavior = %w.idle_behavior.as_str(),
            "shutdown worker"
        );
        self.report_boot_outcome(w, "aborted");
        self.shutdown_locked(w, now);
        true
    }

    /// Management API: change a worker's idle behaviour.
    pub fn set_idle_behavior(&self, id: &str, b: IdleBehavior) -> Result<(), String> {
        let now = Instant::now();
        let mut st = self.lock();
        let w = st
            .workers
            .get_mut(id)
            .ok_or_else(|| "requested instance does not exist".to_string())?;
        tracing::info!(Instance = %id, IdleBehavior = %b.as_str(), "set idle behavior");
        self.events.push(b.as_str(), id, "idle behavior set");
        w.idle_behavior = b;
        self.save_tags(w);
        self.shutdown_if_idle(w, now);
        drop(st);
        self.notify();
        Ok(())
    }

    /// Management API: destroy a worker whatever its state and behaviour.
    pub fn kill_instance(&self, id: &str, reason: &str) -> Result<(), String> {
        let now = Instant::now();
        let mut st = self.lock();
        let w = st
            .workers
            .get_mut(id)
            .ok_or_else(|| "instance not found".to_string())?;
        tracing::info!(Instance = %id, Reason = %reason, "shutting down");
        self.events.push("kill", id, reason);
        self.report_boot_outcome(w, "aborted");
        self.shutdown_locked(w, now);
        Ok(())
    }
}

/// How many recent container starts per instance type the adaptive idle time looks at.
const DEMAND_STARTS: usize = 8;

/// Demand per instance type (`IdleTime.Adaptive`): recent container starts on instances of
/// each type, and the types waiting containers could use (from the scheduler's last pass).
#[derive(Default)]
pub(super) struct Demand {
    starts: std::collections::HashMap<String, std::collections::VecDeque<std::time::Instant>>,
    wanted: std::collections::HashSet<String>,
}

impl Pool {
    /// How long an idle instance of type `ty` is kept now (`TimeoutIdle`, or what
    /// `IdleTime.Adaptive` makes of the type's demand).
    pub(super) fn idle_timeout(&self, ty: &str, now: Instant) -> Duration {
        let policy = &self.cfg.idle_time;
        if !policy.adaptive {
            return self.cfg.timeout_idle;
        }
        let now = now.into_std();
        let d = self.demand.lock();
        let starts: Vec<std::time::Instant> = d
            .starts
            .get(ty)
            .into_iter()
            .flatten()
            .copied()
            .filter(|t| now.saturating_duration_since(*t) <= policy.max)
            .collect();
        policy.timeout(self.cfg.timeout_idle, d.wanted.contains(ty), &starts)
    }

    /// A container started on an instance of type `ty` (`IdleTime.Adaptive`).
    pub(super) fn record_start(&self, ty: &str, now: Instant) {
        if !self.cfg.idle_time.adaptive {
            return;
        }
        let mut d = self.demand.lock();
        let q = d.starts.entry(ty.to_string()).or_default();
        q.push_back(now.into_std());
        while q.len() > DEMAND_STARTS {
            q.pop_front();
        }
    }

    /// The types waiting containers could use, from the scheduler (`IdleTime.Adaptive`).
    pub(super) fn set_wanted(&self, names: std::collections::HashSet<String>) {
        self.demand.lock().wanted = names;
    }
}
