//! Creating instances (spec §8.5): quota and capacity hold-offs, the concurrency limit,
//! the create call in the background, and creates whose outcome is unknown.

use std::sync::Arc;

use arvados::InstanceType;
use chrono::{DateTime, Utc};
use cloud::{CreateRequest, InstanceSet, InstanceTags};
use tokio::time::Instant;

use super::capacity::OfferingState;
use super::{Pool, State};
use crate::worker_state::{InstanceView, WorkerState};

/// Something the pool is holding off (an offering short of capacity, all creates at quota),
/// for the status page and the management API.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct HoldOff {
    pub what: String,
    pub reason: String,
    /// `None`: until a condition changes (see `reason`).
    pub until: Option<DateTime<Utc>>,
    /// For a capacity hold-off, its capacity key (`""`: every instance type); `None` for
    /// the others.
    pub offering: Option<String>,
    /// Capacity errors in a row for `offering` (0 for the others).
    pub errors_in_a_row: u32,
    /// The cloud's last capacity error for `offering` (empty for the others).
    pub error: String,
}

/// A create call in flight, keyed by the instance secret it carries.
pub(super) struct Creating {
    pub(super) it: Arc<InstanceType>,
    /// The zone it is pinned to (see `Pool::zones`).
    pub(super) zone: Option<String>,
    /// The create call failed without saying whether a VM was made (no answer in time, a
    /// server error): since when. The place is kept, so nothing creates a second VM for it,
    /// until the cloud list shows the VM (it is adopted) or a list started
    /// `unknown_create_grace` later does not (it never existed).
    pub(super) unknown_since: Option<Instant>,
}

impl State {
    /// Create calls still waiting for the cloud's answer (what
    /// `MaxConcurrentInstanceCreateOps` limits).
    pub(super) fn creates_in_flight(&self) -> usize {
        self.creating
            .values()
            .filter(|c| c.unknown_since.is_none())
            .count()
    }
}

/// `it`'s offering: its provider type in its market (`m5.large`, `m5.large-preemptible`).
pub(super) fn offering_key(it: &InstanceType) -> String {
    let mut key = it.provider_type.clone();
    if it.preemptible {
        key.push_str("-preemptible");
    }
    key
}

/// `it`'s offering in `zone` (with zones on): `m5.large-preemptible@subnet-1`.
fn zone_key(it: &InstanceType, zone: &str) -> String {
    format!("{}@{zone}", offering_key(it))
}

/// `it`'s provider type in `zone`, either market (`State::zone_trouble`).
fn trouble_key(it: &InstanceType, zone: &str) -> String {
    format!("{}@{zone}", it.provider_type)
}

impl Pool {
    // -----------------------------------------------------------------------------------
    // Quota and capacity (§8.5)

    /// Every type (`""`), `it`'s quota group, and its offering ([`offering_key`]).
    pub(super) fn capacity_keys(&self, it: &InstanceType) -> [String; 3] {
        [
            String::new(),
            self.set.instance_quota_group(it),
            offering_key(it),
        ]
    }

    /// With zones: where the next create of `it` goes. The zone of the offering's last
    /// successful create first; then, in the operator's order, the zones with no trouble for
    /// its provider type; then the rest (in doubt for the offering after a hold-off, or short
    /// for the type's other market: spot and on demand draw on the same hardware). A zone
    /// held off is skipped, and so is one in doubt while a create probes it (the launch
    /// budget). `None`: every zone is out for now (or there are no zones).
    fn pick_zone(&self, st: &State, it: &InstanceType, now: Instant) -> Option<String> {
        let provider = offering_key(it);
        let last = st.last_good_zone.get(&provider);
        let mut order: Vec<(u8, &String, String)> = self
            .zones
            .iter()
            .map(|z| {
                let key = zone_key(it, z);
                let rank = if Some(z) == last {
                    0
                } else if st.capacity_failures.get(&key).is_some_and(|n| *n > 0)
                    || st.zone_trouble.contains(&trouble_key(it, z))
                {
                    2
                } else {
                    1
                };
                (rank, z, key)
            })
            .collect();
        order.sort_by_key(|(rank, _, _)| *rank);
        order
            .into_iter()
            .find(|(_, z, key)| {
                let held = st.at_capacity_until.get(key).is_some_and(|t| now < *t);
                let probing = st.capacity_failures.get(key).is_some_and(|n| *n > 0)
                    && st
                        .creating
                        .values()
                        .any(|c| c.zone.as_ref() == Some(*z) && offering_key(&c.it) == provider);
                !held && !probing
            })
            .map(|(_, z, _)| z.clone())
    }

    pub(super) fn at_capacity_locked(&self, st: &State, it: &InstanceType, now: Instant) -> bool {
        if !self.zones.is_empty() && self.pick_zone(st, it, now).is_none() {
            return true;
        }
        let keys = self.capacity_keys(it);
        if keys
            .iter()
            .any(|k| st.at_capacity_until.get(k).is_some_and(|t| now < *t))
        {
            return true;
        }
        // Launch budget (with `Capacity.Backoff`): an offering whose last create failed for
        // capacity, and has not had one succeed since, is in doubt once its hold-off ends.
        // One create probes it; until that create is answered, the offering counts as at
        // capacity, so a pass does not send a burst of creates that would all fail.
        self.cfg.capacity.backoff
            && keys.iter().any(|k| {
                st.capacity_failures.get(k).is_some_and(|n| *n > 0)
                    && st
                        .creating
                        .values()
                        .any(|c| k.is_empty() || self.capacity_keys(&c.it).contains(k))
            })
    }

    /// What the pool holds off now and why, for the status page.
    pub fn holdoffs(&self) -> Vec<HoldOff> {
        let now = Instant::now();
        let utc = Utc::now();
        let until = |t: Instant| utc + chrono::Duration::from_std(t - now).unwrap_or_default();
        let st = self.lock();
        let mut out = Vec::new();
        // Offerings held off, then (with back-off) those in doubt, each by key.
        let capacity = super::capacity::snapshot(&st, now, utc);
        let offering = |key: &str, o: &OfferingState, reason: String| HoldOff {
            what: if key.is_empty() {
                "every instance type".to_string()
            } else {
                key.to_string()
            },
            reason,
            until: o.held_until,
            offering: Some(key.to_string()),
            errors_in_a_row: o.errors_in_a_row,
            error: o.error.clone(),
        };
        for (key, o) in capacity
            .offerings
            .iter()
            .filter(|(_, o)| o.held_until.is_some())
        {
            out.push(offering(
                key,
                o,
                "the cloud reported insufficient capacity".into(),
            ));
        }
        if self.cfg.capacity.backoff {
            for (key, o) in capacity
                .offerings
                .iter()
                .filter(|(_, o)| o.held_until.is_none())
            {
                let reason = format!(
                    "in doubt after {} capacity error(s) in a row: one create at a time until one succeeds",
                    o.errors_in_a_row
                );
                out.push(offering(key, o, reason));
            }
        }
        if let Some(t) = st.at_quota_until.filter(|t| now < *t) {
            out.push(HoldOff {
                what: "new instances".into(),
                reason: "the cloud reported a quota error".into(),
                until: Some(until(t)),
                ..HoldOff::default()
            });
        }
        if st.at_quota_until_fewer > 0 {
            out.push(HoldOff {
                what: "new instances".into(),
                reason: format!(
                    "cloud quota: held until fewer than {} instances exist",
                    st.at_quota_until_fewer
                ),
                until: None,
                ..HoldOff::default()
            });
        }
        let n = st.workers.len() + st.creating.len();
        if self.cfg.max_instances > 0 && n >= self.cfg.max_instances {
            out.push(HoldOff {
                what: "new instances".into(),
                reason: format!("MaxInstances ({}) reached", self.cfg.max_instances),
                until: None,
                ..HoldOff::default()
            });
        }
        if let Some(t) = st.create_ops_hold_until.filter(|t| now < *t) {
            out.push(HoldOff {
                what: "create calls".into(),
                reason: "MaxConcurrentInstanceCreateOps reached".into(),
                until: Some(until(t)),
                ..HoldOff::default()
            });
        }
        out
    }

    pub(super) fn at_quota_locked(&self, st: &State, now: Instant) -> bool {
        let n = st.workers.len() + st.creating.len();
        st.at_quota_until_fewer > 0
            || st.at_quota_until.is_some_and(|t| now < t)
            || (self.cfg.max_instances > 0 && n >= self.cfg.max_instances)
    }

    pub(super) fn create_throttled(&self, st: &State, now: Instant) -> bool {
        st.create_ops_hold_until.is_some_and(|t| now < t) || self.set.create.error().is_some()
    }

    // -----------------------------------------------------------------------------------
    // Creating (§8.5)

    pub(super) fn do_create(&self, it: &InstanceType) -> Option<InstanceView> {
        if self.is_stopped() {
            return None;
        }
        if let Some(e) = &self.cfg.runner_error {
            tracing::debug!(error = %e, "not creating: runner binary not loaded");
            return None;
        }
        let pool = self.arc()?;
        let now = Instant::now();
        let mut st = self.lock();
        if self.at_capacity_locked(&st, it, now)
            || self.at_quota_locked(&st, now)
            || self.create_throttled(&st, now)
        {
            return None;
        }
        let max = st.max_concurrent_creates;
        if max > 0 && st.creates_in_flight() >= max {
            tracing::info!(
                limit = max,
                "reached MaxConcurrentInstanceCreateOps; waiting for a create to finish"
            );
            st.create_ops_hold_until = Some(now + self.cfg.create_ops_hold_off);
            return None;
        }
        let zone = self.pick_zone(&st, it, now);
        let it = Arc::new(it.clone());
        let secret = cloud::tags::new_instance_secret();
        st.creating.insert(
            secret.clone(),
            Creating {
                it: it.clone(),
                zone: zone.clone(),
                unknown_since: None,
            },
        );
        let total = st.workers.len() + st.creating.len();
        if self.cfg.max_instances > 0 && total == self.cfg.max_instances {
            tracing::info!(
                "now at MaxInstances limit of {} instances",
                self.cfg.max_instances
            );
        }
        drop(st);
        self.notify();
        let view = InstanceView::new("", &it, WorkerState::Booting);
        self.spawn(async move { pool.create_in_background(secret, it, zone).await });
        Some(view)
    }

    pub(super) async fn create_in_background(
        self: Arc<Self>,
        secret: String,
        it: Arc<InstanceType>,
        zone: Option<String>,
    ) {
        let keys = &self.cfg.tag_keys;
        let tags: InstanceTags = [
            (keys.instance_set_id(), self.cfg.instance_set_id.clone()),
            (keys.instance_type(), it.name.clone()),
            (keys.idle_behavior(), "run".to_string()),
            (keys.instance_secret(), secret.clone()),
        ]
        .into();
        let req = CreateRequest {
            image_id: self.cfg.image_id.clone(),
            tags,
            init_command: cloud::tags::init_command(&secret, &self.cfg.instance_init_command),
            public_key: self.cfg.install_public_key.clone(),
            zone: zone.clone(),
        };
        let result = self.set.create(&it, req).await;
        let zone_key = zone.as_ref().map(|z| zone_key(&it, z));
        let now = Instant::now();
        {
            let mut st = self.lock();
            match result {
                Ok(inst) => {
                    let mut recovered = false;
                    if let Some(z) = &zone {
                        st.last_good_zone.insert(offering_key(&it), z.clone());
                        st.zone_trouble.remove(&trouble_key(&it, z));
                    }
                    for key in self.capacity_keys(&it).into_iter().chain(zone_key) {
                        recovered |= st.capacity_failures.remove(&key).is_some();
                        st.capacity_error.remove(&key);
                    }
                    if recovered {
                        self.capacity_changed();
                    }
                    self.events.push("created", inst.id(), it.name.clone());
                    self.update_worker(&mut st, inst, now);
                }
                Err(e) if e.outcome_unknown => {
                    tracing::warn!(
                        InstanceType = %it.name,
                        error = %e,
                        "create outcome unknown; keeping its place until the cloud's instance list shows whether the VM exists"
                    );
                    self.events.push(
                        "create-failed",
                        it.name.clone(),
                        format!("outcome unknown, waiting for the list: {e}"),
                    );
                    let listed_already = st
                        .workers
                        .values()
                        .any(|w| w.secret.as_deref() == Some(secret.as_str()));
                    if listed_already {
                        // A list that ran meanwhile showed its VM: that is the answer.
                        st.creating.remove(&secret);
                    } else if let Some(c) = st.creating.get_mut(&secret) {
                        c.unknown_since = Some(now);
                    }
                    st.create_ops_hold_until = None;
                    drop(st);
                    self.notify();
                    return;
                }
                Err(e) => {
                    if e.is_quota() {
                        let n = (st.workers.len() + st.creating.len()).saturating_sub(1);
                        if n < 1 {
                            st.at_quota_until_fewer = 0;
                            st.at_quota_until = Some(now + self.cfg.quota_error_ttl);
                            self.notify_at(now + self.cfg.quota_error_ttl);
                        } else if n < st.at_quota_until_fewer || st.at_quota_until_fewer == 0 {
                            st.at_quota_until_fewer = n;
                            st.at_quota_until = None;
                        }
                    }
                    // Pinned to a zone: short there (or the zone's own failure, such as a
                    // subnet out of addresses); the next create tries another zone.
                    let in_zone =
                        zone_key.filter(|_| e.zone_specific || e.is_instance_type_specific());
                    if e.is_capacity() || in_zone.is_some() {
                        let [all, group, provider] = self.capacity_keys(&it);
                        let key = if let Some(k) = in_zone {
                            if let Some(z) = zone.as_ref().filter(|_| e.is_capacity()) {
                                st.zone_trouble.insert(trouble_key(&it, z));
                            }
                            k
                        } else if e.is_quota_group_specific() {
                            group
                        } else if e.is_instance_type_specific() {
                            provider
                        } else {
                            all
                        };
                        let failures = st.capacity_failures.entry(key.clone()).or_default();
                        *failures += 1;
                        let hold = self.cfg.capacity.hold(
                            *failures,
                            rand::random::<f64>(),
                            self.cfg.capacity_error_ttl,
                        );
                        st.at_capacity_until.insert(key.clone(), now + hold);
                        st.capacity_error
                            .insert(key, super::capacity::short_error(&e.to_string()));
                        self.capacity_changed();
                        self.notify_at(now + hold);
                    }
                    if let Some(t) = e.earliest_retry() {
                        // The throttle wrapper holds creates until then; wake the scheduler
                        // when it may try again.
                        let wait = t
                            .duration_since(std::time::SystemTime::now())
                            .unwrap_or_default();
                        self.notify_at(now + wait);
                    }
                    tracing::error!(
                        InstanceType = %it.name,
                        isCapacityError = e.is_capacity(),
                        isQuotaError = e.is_quota(),
                        error = %e,
                        "create failed"
                    );
                    self.events
                        .push("create-failed", it.name.clone(), e.to_string());
                }
            }
            st.creating.remove(&secret);
            // Better than Go (§13.3 item 26): a finished create lifts the concurrency hold.
            st.create_ops_hold_until = None;
        }
        self.notify();
    }

    /// Notify subscribers at `t` (when a hold-off ends).
    pub(super) fn notify_at(&self, t: Instant) {
        let me = self.me.clone();
        self.tasks.spawn_until_cancelled(async move {
            tokio::time::sleep_until(t).await;
            if let Some(p) = me.upgrade() {
                p.notify();
            }
        });
    }
}
