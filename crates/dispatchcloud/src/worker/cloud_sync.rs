//! Reconciling with the cloud's instance list (spec §8.6): new workers (created or adopted),
//! vanished ones, tags (§8.14), and each worker's SSH executor.

use std::sync::Arc;

use arvados::InstanceType;
use chrono::Utc;
use cloud::{CloudError, Instance, InstanceSet, InstanceTags};
use tokio::time::Instant;

use super::record::Worker;
use super::{Pool, State};
use crate::ssh_executor::{Executor, Target, Timeouts};
use crate::worker_state::{Event, IdleBehavior, WorkerState, transition};

fn type_tag_behavior(tag: Option<&String>) -> Option<IdleBehavior> {
    match tag.map(String::as_str) {
        Some("run") => Some(IdleBehavior::Run),
        Some("hold") => Some(IdleBehavior::Hold),
        Some("drain") => Some(IdleBehavior::Drain),
        _ => None,
    }
}

impl Pool {
    // -----------------------------------------------------------------------------------
    // Sync with the cloud list (§8.6)

    /// List the cloud's instances of this dispatcher and reconcile the workers with it.
    pub async fn sync(&self) -> Result<(), CloudError> {
        let threshold = Instant::now();
        let filter: InstanceTags = [(
            self.cfg.tag_keys.instance_set_id(),
            self.cfg.instance_set_id.clone(),
        )]
        .into();
        let list = self.set.instances(&filter).await?;
        let now = Instant::now();
        let mut st = self.lock();
        let mut listed = std::collections::HashSet::new();
        // The cloud's own interruption notices (the set watches with `Interruptions.Drain`).
        // A standby's read-only view acts on none: it drains once it takes over.
        let noticed: Vec<String> = if self.cfg.interruptions.drain && !self.is_passive() {
            list.iter()
                .filter(|i| i.interruption_notice().is_some())
                .map(|i| i.id())
                .collect()
        } else {
            Vec::new()
        };
        for inst in list {
            listed.insert(inst.id());
            self.update_worker(&mut st, inst, now);
        }
        // Creates with unknown outcome that a list started well after they failed does not
        // show never made a VM: free their places.
        let grace = self.cfg.unknown_create_grace;
        st.creating.retain(|_, c| {
            let expired = c
                .unknown_since
                .is_some_and(|t| threshold.saturating_duration_since(t) >= grace);
            if expired {
                tracing::info!(InstanceType = %c.it.name, "create with unknown outcome made no VM");
            }
            !expired
        });
        let gone: Vec<String> = st
            .workers
            .iter()
            .filter(|(id, w)| !listed.contains(*id) && w.updated <= threshold)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            let Some(mut w) = st.workers.remove(&id) else {
                continue;
            };
            w.apply(Event::Vanished);
            tracing::info!(
                Instance = %id,
                WorkerState = %w.state,
                "instance disappeared in cloud"
            );
            self.events
                .push("gone", id.clone(), format!("disappeared while {}", w.state));
            if !w.boot_outcome_reported {
                self.metrics
                    .boot_outcomes
                    .with_label_values(&["disappeared"])
                    .inc();
            }
            self.metrics
                .disappeared
                .with_label_values(&[w.state.as_str()])
                .inc();
            if let Some(d) = w.destroyed {
                self.metrics
                    .time_to_disappear
                    .observe(&[], now.saturating_duration_since(d).as_secs_f64());
            }
            // Better than Go (§13.3 item 22): its processes are gone too; say so, so the
            // scheduler can act without waiting for unknown workers to clear.
            let at = Utc::now();
            for (uuid, r) in w.running.iter().chain(w.starting.iter()) {
                r.close();
                st.exited.insert(uuid.clone(), at);
            }
            w.executor.close();
        }
        let total = st.workers.len() + st.creating.len();
        if st.at_quota_until_fewer > total {
            st.at_quota_until_fewer = 0;
        }
        if !st.loaded {
            st.loaded = true;
            tracing::info!(N = st.workers.len(), "loaded initial instance list");
        }
        // A noticed instance that runs nothing has no container to retry: it is drained
        // (and, idle, shut down) but gets no pre-booted replacement, or a replacement noticed
        // in its turn would make another, and so on through a storm.
        let mut drained: Vec<Arc<InstanceType>> = Vec::new();
        let mut pre_boot: Vec<Arc<InstanceType>> = Vec::new();
        for id in &noticed {
            let busy = st
                .workers
                .get(id)
                .is_some_and(|w| !w.running.is_empty() || !w.starting.is_empty());
            if let Some(it) = self.drain_for_interruption(&mut st, id, "the cloud's notice") {
                if busy && self.cfg.interruptions.pre_boot {
                    pre_boot.push(it.clone());
                }
                drained.push(it);
            }
        }
        drop(st);
        if !drained.is_empty() {
            self.after_interruptions(&drained, &pre_boot);
        }
        self.notify();
        Ok(())
    }

    pub(super) fn new_executor(
        &self,
        inst: &Arc<dyn Instance>,
        secret: Option<String>,
    ) -> Arc<Executor> {
        Arc::new(
            Executor::new(
                self.target(inst, secret),
                self.cfg.private_key.clone(),
                &self.cfg.ssh_port,
                Timeouts {
                    connect: self.cfg.command_timeout,
                    command: self.cfg.command_timeout,
                },
            )
            .with_tasks(self.tasks.clone()),
        )
    }

    pub(super) fn target(&self, inst: &Arc<dyn Instance>, secret: Option<String>) -> Target {
        let me = self.me.clone();
        let id = inst.id();
        Target {
            instance: inst.clone(),
            secret,
            on_verified: Some(Arc::new(move || {
                if let Some(p) = me.upgrade() {
                    p.ssh_connected(&id);
                }
            })),
        }
    }

    /// First verified SSH connection to a booting worker: time-to-SSH.
    pub(super) fn ssh_connected(&self, id: &str) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(id) else {
            return;
        };
        let reached_first_time = !w.reachable && w.adopted;
        w.reachable = true;
        if w.state == WorkerState::Booting && w.first_ssh.is_none() {
            w.first_ssh = Some(now);
            self.metrics
                .time_to_ssh
                .observe(&[], now.saturating_duration_since(w.appeared).as_secs_f64());
        }
        drop(st);
        if reached_first_time {
            // fix_stale_locks now waits for this worker's report.
            self.notify();
        }
    }

    /// Add or refresh the worker for a listed (or just created) instance.
    pub(super) fn update_worker(&self, st: &mut State, inst: Arc<dyn Instance>, now: Instant) {
        let keys = &self.cfg.tag_keys;
        let tags = inst.tags();
        let id = inst.id();
        let secret = tags.get(&keys.instance_secret()).cloned();
        // Made by one of our creates: Some(true) if that create's call failed with an unknown
        // outcome. This VM is the answer: it settles the create (as a new worker, it is
        // booting in the create's place).
        let from_create = secret
            .as_ref()
            .and_then(|s| st.creating.get(s))
            .map(|c| c.unknown_since.is_some());
        if from_create == Some(true)
            && let Some(s) = &secret
        {
            tracing::info!(Instance = %id, "instance from a create with unknown outcome listed; it settles that create");
            st.creating.remove(s);
        }
        if let Some(w) = st.workers.get_mut(&id) {
            w.executor.set_target(self.target(&inst, secret.clone()));
            w.instance = inst;
            w.tags = tags;
            w.secret = secret;
            w.updated = now;
            self.save_tags(w);
            if w.state == WorkerState::Shutdown
                && w.destroyed
                    .is_some_and(|d| now.saturating_duration_since(d) > self.cfg.timeout_shutdown)
            {
                tracing::info!(Instance = %id, "worker still listed after shutdown; retrying");
                self.shutdown_locked(w, now);
            }
            return;
        }
        let type_name = tags.get(&keys.instance_type()).cloned().unwrap_or_default();
        let configured = self.cfg.instance_types.get(&type_name);
        let tagged = type_tag_behavior(tags.get(&keys.idle_behavior()));
        let (it, behavior) = match configured {
            Some(it) => (it.clone(), tagged.unwrap_or_default()),
            None => {
                let b = if tagged == Some(IdleBehavior::Hold) {
                    IdleBehavior::Hold
                } else {
                    IdleBehavior::Drain
                };
                tracing::warn!(
                    Instance = %id,
                    InstanceType = %type_name,
                    "{}ing instance that was tagged with an unrecognized InstanceType and IdleBehavior = {}",
                    b.as_str(),
                    tags.get(&keys.idle_behavior()).map(String::as_str).unwrap_or("")
                );
                (
                    InstanceType {
                        name: type_name,
                        ..Default::default()
                    },
                    b,
                )
            }
        };
        let event = if from_create.is_some() {
            Event::Created
        } else {
            Event::Discovered
        };
        let state = transition(None, event)
            .and_then(|s| s.to)
            .expect("a listed instance has a first state");
        let executor = self.new_executor(&inst, secret.clone());
        tracing::info!(
            Instance = %id,
            InstanceType = %it.name,
            WorkerState = %state,
            IdleBehavior = %behavior.as_str(),
            "instance appeared in cloud"
        );
        let mut w = Worker {
            known_type: configured.is_some(),
            idle_behavior: behavior,
            secret,
            tags,
            ..Worker::new(inst, Arc::new(it), state, executor, now)
        };
        self.save_tags(&mut w);
        st.workers.insert(id, w);
        self.notify();
    }

    /// Persist the type and idle behaviour in the instance's tags (§8.14). Unlike Go (§13.3
    /// item 21), the `drain` forced on an unrecognised type is not written to the tag, so
    /// configuring the type again restores the VM's own behaviour after a restart.
    pub(super) fn save_tags(&self, w: &mut Worker) {
        if !w.known_type || self.is_passive() {
            // A passive pool writes nothing; the first sync after it turns active does.
            return;
        }
        let keys = &self.cfg.tag_keys;
        let want = [
            (keys.instance_type(), w.it.name.clone()),
            (keys.idle_behavior(), w.idle_behavior.as_str().to_string()),
        ];
        if want.iter().all(|(k, v)| w.tags.get(k) == Some(v)) {
            return;
        }
        let mut tags = w.tags.clone();
        tags.extend(want);
        w.tags = tags.clone();
        let (inst, id) = (w.instance.clone(), w.id.clone());
        self.spawn(async move {
            if let Err(e) = inst.set_tags(tags).await {
                tracing::warn!(Instance = %id, error = %e, "error updating tags");
            }
        });
    }
}
