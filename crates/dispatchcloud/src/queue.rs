//! The container queue (spec §5): a cache of the containers this dispatcher may act on, kept
//! fresh by polling the Arvados API, each entry carrying its resource needs and its eligible
//! instance types, cheapest first. Lock, unlock and cancel go through here so their results
//! patch the cache at once and a poll that may predate them cannot undo them.
//!
//! The queue lock is never held across an API call (better than Go, §13.5 item 32): a poll
//! gathers everything, including the mounts of new containers, and only then takes the lock to
//! apply the result.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};

use arvados::types::{Container, ContainerState};
use arvados::{ApiError, Client, Count, Filter, InstanceType, ListOptions, Method};
use chrono::{DateTime, Utc};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use serde_json::json;
use tokio::sync::watch;

use crate::node_size::{ChooseError, InstanceResources, TypeChooser};

/// The fields a poll asks for (`mounts` are fetched once, separately, for new containers).
const SELECT: [&str; 7] = [
    "uuid",
    "state",
    "priority",
    "runtime_constraints",
    "container_image",
    "scheduling_parameters",
    "created_at",
];
/// What a poll returns: the containers by uuid, the uuids whose records could not be
/// decoded, our token's uuid, how many records were received, and the latest `modified_at`
/// among them (when selected).
type PollResult = (
    HashMap<String, Container>,
    HashSet<String>,
    String,
    usize,
    Option<DateTime<Utc>>,
);

/// Stop fetching Queued pages once this many non-supervisor containers were received.
const QUEUED_CONTAINERS_TARGET: usize = 100;
/// Missing containers are re-fetched by uuid in batches of this size.
const MISSING_BATCH: usize = 20;
/// New containers whose mounts are fetched at once.
const MOUNTS_CONCURRENCY: usize = 8;
/// The longest a mounts fetch (retries included) may hold up a queue update; one that fails
/// is tried again at the next update.
const MOUNTS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The fields a scheduling pass reads for every queued container, kept together at the start
/// of the entry so that a pass over 100 000 entries touches one cache line of each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedFields {
    /// Hash of the uuid, so a pass can test membership without reading the uuid string.
    pub uuid_hash: u64,
    /// `first_seen_at` in nanoseconds since the epoch (saturating).
    pub first_seen_ns: i64,
    pub priority: i64,
    pub state: ContainerState,
    pub supervisor: bool,
    /// `created_at` in milliseconds since the epoch, if known.
    pub created_ms: Option<i64>,
}

impl SchedFields {
    fn of(c: &Container, first_seen_at: &DateTime<Utc>) -> SchedFields {
        SchedFields {
            uuid_hash: uuid_hash(&c.uuid),
            first_seen_ns: first_seen_at
                .timestamp_nanos_opt()
                .unwrap_or(first_seen_at.timestamp().saturating_mul(1_000_000_000)),
            priority: c.priority,
            state: c.state,
            supervisor: c.scheduling_parameters.supervisor,
            created_ms: c.created_at.map(|t| t.timestamp_millis()),
        }
    }
}

/// One cached container with what the scheduler needs to know about it. The container and
/// first-seen time are reached through methods so the copy in [`SchedFields`] stays true.
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub struct QueueEnt {
    hot: SchedFields,
    pub instance_resources: InstanceResources,
    /// Eligible types, cheapest first. Empty only for a container past Locked whose type
    /// selection failed (Go would crash on such an entry, §13.5 item 31).
    pub instance_types: Vec<Arc<InstanceType>>,
    /// Partial record: the polled fields (plus `locked_by_uuid` after a lock/unlock/cancel).
    /// `mounts` is always empty.
    container: Container,
    /// When this process first saw the container.
    first_seen_at: DateTime<Utc>,
    /// The mounts fetch failed: needs and types are not known yet (`instance_types` is empty,
    /// so nothing is started for it), and the next update tries again. Such an entry exists
    /// only for a container past Queued, so that a container already running is kept.
    pub mounts_pending: bool,
}

impl QueueEnt {
    pub fn new(
        container: Container,
        instance_resources: InstanceResources,
        instance_types: Vec<Arc<InstanceType>>,
        first_seen_at: DateTime<Utc>,
    ) -> QueueEnt {
        QueueEnt {
            hot: SchedFields::of(&container, &first_seen_at),
            container,
            instance_resources,
            instance_types,
            first_seen_at,
            mounts_pending: false,
        }
    }

    pub fn container(&self) -> &Container {
        &self.container
    }

    /// Change the container record (the scheduling copy follows).
    pub fn modify(&mut self, f: impl FnOnce(&mut Container)) {
        f(&mut self.container);
        self.hot = SchedFields::of(&self.container, &self.first_seen_at);
    }

    pub fn first_seen_at(&self) -> DateTime<Utc> {
        self.first_seen_at
    }

    /// The fields a scheduling pass reads.
    pub fn sched(&self) -> &SchedFields {
        &self.hot
    }

    /// `first_seen_at` as nanoseconds since the epoch.
    pub fn first_seen_ns(&self) -> i64 {
        self.hot.first_seen_ns
    }

    /// [`uuid_hash`] of the container's uuid.
    pub fn uuid_hash(&self) -> u64 {
        self.hot.uuid_hash
    }
}

/// The hash [`QueueEnt::uuid_hash`] holds.
pub fn uuid_hash(uuid: &str) -> u64 {
    use std::hash::BuildHasher;
    crate::fasthash::FastBuild::default().hash_one(uuid)
}

impl Serialize for QueueEnt {
    /// Arvados' JSON: `instance_resources` with Go field names, instance types without `Name`
    /// and `Scratch`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = &self.instance_resources;
        let types: Vec<_> = self
            .instance_types
            .iter()
            .map(|it| {
                json!({
                    "ProviderType": it.provider_type,
                    "VCPUs": it.vcpus,
                    "RAM": it.ram,
                    "IncludedScratch": it.included_scratch,
                    "AddedScratch": it.added_scratch,
                    "Price": it.price,
                    "Preemptible": it.preemptible,
                    "GPU": {
                        "Stack": it.gpu.stack,
                        "DriverVersion": it.gpu.driver_version,
                        "HardwareTarget": it.gpu.hardware_target,
                        "DeviceCount": it.gpu.device_count,
                        "VRAM": it.gpu.vram,
                    },
                })
            })
            .collect();
        let mut st = s.serialize_struct("QueueEnt", 4)?;
        st.serialize_field("container", &self.container)?;
        st.serialize_field(
            "instance_resources",
            &json!({"VCPUs": r.vcpus, "RAM": r.ram, "Scratch": r.scratch, "GPUs": r.gpus, "GPUVRAM": r.gpu_vram}),
        )?;
        st.serialize_field("instance_types", &types)?;
        st.serialize_field("first_seen_at", &self.first_seen_at)?;
        st.end()
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Arc<QueueEnt>>,
    /// Start of the last successful update.
    updated: Option<DateTime<Utc>>,
    /// Uuids patched from a lock/unlock/cancel response while an update is in flight.
    dont_update: Option<HashSet<String>>,
    /// The uuid of our token: containers locked by it are ours.
    auth_uuid: Option<String>,
    /// Incremental mode: the latest `modified_at` seen (the next incremental poll asks for
    /// changes since it, minus the overlap), polls since the last full one, and how many
    /// queued containers a full poll fetches.
    watermark: Option<DateTime<Utc>>,
    polls_since_full: u32,
    queued_target: usize,
    /// The scheduler's last word: how many more queued containers than the queue held it
    /// could have started (0: none).
    room: usize,
}

/// Rows asked for per page of an incremental poll.
const CHANGES_PAGE: i64 = 1000;

/// Where the next page of an incremental poll starts: the key (`modified_at`, `uuid`) of the
/// last row received, in the poll's order `modified_at asc, uuid asc`. Arvados' filters are
/// ANDed, so "after (t, u)" is asked in two steps: `modified_at >= t`, with the rows already
/// received at exactly `t` dropped here; and, when a full page brings nothing new (rows with
/// the same time `t` fill it), the rest of `t`'s rows by uuid (`modified_at = t`, `uuid > u`),
/// then `modified_at > t`. The poll ends with the first page that is not full: usually its
/// first.
///
/// Before, each page asked for `modified_at >= t` leaving out, by uuid, the rows received at
/// `t`. When such a row changed before the next page, its new version was left out too, and
/// once the page moved `t` past its new time it was lost until the next full poll (the queue
/// then kept a Complete container as Running, and the scheduler cancelled it).
#[derive(Debug)]
pub struct ChangePager {
    floor: DateTime<Utc>,
    /// Uuids received with `modified_at` exactly `floor`.
    at_floor: HashSet<String>,
    /// The greatest of them.
    last: Option<String>,
    step: PagerStep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PagerStep {
    /// `modified_at >= floor` (`>` once `floor`'s rows are all received).
    From {
        strict: bool,
    },
    /// `modified_at = floor` and `uuid > last`.
    Group,
    Done,
}

impl ChangePager {
    pub fn new(since: DateTime<Utc>) -> ChangePager {
        ChangePager {
            floor: since,
            at_floor: HashSet::new(),
            last: None,
            step: PagerStep::From { strict: false },
        }
    }

    /// The next page's filters, or `None` when the poll is complete.
    pub fn filters(&self, stamp: &dyn Fn(DateTime<Utc>) -> String) -> Option<Vec<Filter>> {
        match self.step {
            PagerStep::From { strict } => Some(vec![Filter::new(
                "modified_at",
                if strict { ">" } else { ">=" },
                stamp(self.floor),
            )]),
            PagerStep::Group => {
                let mut f = vec![Filter::new("modified_at", "=", stamp(self.floor))];
                if let Some(u) = &self.last {
                    f.push(Filter::new("uuid", ">", u.as_str()));
                }
                Some(f)
            }
            PagerStep::Done => None,
        }
    }

    /// A row of the page: whether to take it (false: the same row at `floor`, already
    /// received) and whether it moves the poll on (a row at or after the key not received
    /// before; a row without a time or before `floor` is taken but moves nothing, so a server
    /// that ignores the filters cannot make the poll loop for ever).
    pub fn receive(&mut self, uuid: &str, modified_at: Option<DateTime<Utc>>) -> (bool, bool) {
        let Some(t) = modified_at else {
            return (true, false);
        };
        if t < self.floor {
            return (true, false);
        }
        if t == self.floor && self.at_floor.contains(uuid) {
            return (false, false);
        }
        if self.step == PagerStep::Group && self.last.as_deref().is_some_and(|l| uuid <= l) {
            // Not asked for either.
            return (true, false);
        }
        if t > self.floor {
            self.floor = t;
            self.at_floor.clear();
            self.last = None;
        }
        self.at_floor.insert(uuid.to_string());
        if self.last.as_deref().is_none_or(|l| uuid > l) {
            self.last = Some(uuid.to_string());
        }
        (true, true)
    }

    /// After a page of `rows` records, `progress` of which moved the poll on; `cut` if the
    /// page was full (as many rows as the server's `limit`), so more may follow.
    pub fn page_done(&mut self, rows: usize, progress: usize, cut: bool) {
        self.step = match self.step {
            // Not full: every row at or after the key came. Later changes have later times,
            // and the next poll starts from the newest received.
            PagerStep::From { .. } if !cut || rows == 0 => PagerStep::Done,
            PagerStep::From { .. } if progress > 0 => PagerStep::From { strict: false },
            // A full page of rows already received at `floor` (a group of rows with the same
            // time can fill a page): the rest of the group by uuid, then past it.
            PagerStep::From { strict: false } => PagerStep::Group,
            // A full page after `floor` with nothing new: a server ignoring the filters.
            PagerStep::From { strict: true } => PagerStep::Done,
            PagerStep::Group if cut && progress > 0 => PagerStep::Group,
            PagerStep::Group => PagerStep::From { strict: true },
            PagerStep::Done => PagerStep::Done,
        };
    }
}

/// Queued containers with a priority, highest first, `limit` a page: what Arvados' poll
/// fetches after the dispatcher's own, and what an incremental poll tops up with.
fn queued_by_priority(select: Vec<String>, limit: usize) -> ListOptions {
    ListOptions {
        filters: vec![
            Filter::new("state", "=", "Queued"),
            Filter::new("priority", ">", 0),
        ],
        order: Some("priority desc".into()),
        limit: Some(limit as i64),
        count: Some(Count::None),
        select: Some(select),
        ..Default::default()
    }
}

/// Which kind of poll [`ContainerQueue::update`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollKind {
    /// Arvados' poll: every container locked by us, the top queued ones, and the known ones
    /// neither of those returned (by uuid).
    Full,
    /// Only the containers modified since the given time.
    Changes(DateTime<Utc>),
}

impl PollKind {
    fn label(self) -> &'static str {
        match self {
            PollKind::Full => "full",
            PollKind::Changes(_) => "incremental",
        }
    }
}

/// The next poll's kind: full without incremental mode, for the first poll, every
/// `full_poll_every` polls, and whenever no change time is known yet.
pub fn next_poll_kind(
    settings: Option<&crate::settings::QueueSettings>,
    watermark: Option<DateTime<Utc>>,
    polls_since_full: u32,
) -> PollKind {
    let Some(s) = settings.filter(|s| s.incremental) else {
        return PollKind::Full;
    };
    match watermark {
        Some(w) if polls_since_full + 1 < s.full_poll_every => {
            PollKind::Changes(w - chrono::Duration::from_std(s.overlap).unwrap_or_default())
        }
        _ => PollKind::Full,
    }
}

/// Queue metrics (spec §5.5).
struct Metrics {
    entries: prometheus::IntGaugeVec,
    /// Not in Arvados: containers this dispatcher saw reach a final state, by that state.
    finished: prometheus::IntCounterVec,
    seen: Mutex<HashSet<(String, String)>>,
    /// Not in Arvados: polls and the records they fetched, by kind.
    polls: prometheus::IntCounterVec,
    rows: prometheus::IntCounterVec,
}

/// The cached container queue.
pub struct ContainerQueue {
    client: Client,
    chooser: TypeChooser,
    inner: Mutex<Inner>,
    notify: watch::Sender<u64>,
    metrics: Metrics,
    /// Containers seen finishing (for the status page).
    pub events: crate::events::EventLog,
    /// Incremental polling, when the settings file turns it on.
    incremental: std::sync::OnceLock<crate::settings::QueueSettings>,
    /// Polls also ask for `runtime_status` (settings `Interruptions.Drain`: the scheduler
    /// looks for spot interruption notices in it).
    runtime_status: std::sync::atomic::AtomicBool,
    /// A standby's queue: polls, but cancels nothing (see [`ContainerQueue::set_read_only`]).
    read_only: std::sync::atomic::AtomicBool,
    /// The metrics updater and background cancels; [`ContainerQueue::join`] ends them.
    tasks: crate::tasks::Tasks,
}

impl ContainerQueue {
    /// Count (and log for the status page) an entry's change into a final state.
    fn count_finish(&self, uuid: &str, was: ContainerState, now: ContainerState) {
        if !now.is_final() || was.is_final() {
            return;
        }
        self.metrics
            .finished
            .with_label_values(&[now.as_str()])
            .inc();
        let kind = if now == ContainerState::Complete {
            "complete"
        } else {
            "cancelled"
        };
        self.events.push(kind, uuid, format!("{was} → {now}"));
    }

    /// A queue polling through `client`, choosing types with `chooser`, registering its gauge
    /// in `registry`. Inside a tokio runtime it also starts the metrics updater.
    pub fn new(
        client: Client,
        chooser: TypeChooser,
        registry: &prometheus::Registry,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let entries = cloud::metrics::registered(
            registry,
            prometheus::IntGaugeVec::new(
                cloud::metrics::dispatchcloud_opts(
                    "queue_entries",
                    "Number of active container entries",
                ),
                &["state", "instance_type"],
            )?,
        )?;
        let finished = cloud::metrics::registered(
            registry,
            prometheus::IntCounterVec::new(
                cloud::metrics::dispatchcloud_opts(
                    "containers_finished_total",
                    "Number of queued containers seen reaching a final state (Complete or Cancelled), by state.",
                ),
                &["state"],
            )?,
        )?;
        for s in [ContainerState::Complete, ContainerState::Cancelled] {
            finished.with_label_values(&[s.as_str()]);
        }
        let polls = cloud::metrics::registered(
            registry,
            prometheus::IntCounterVec::new(
                cloud::metrics::dispatchcloud_opts(
                    "queue_polls_total",
                    "Number of queue polls of the API, by kind (full, incremental).",
                ),
                &["kind"],
            )?,
        )?;
        let rows = cloud::metrics::registered(
            registry,
            prometheus::IntCounterVec::new(
                cloud::metrics::dispatchcloud_opts(
                    "queue_rows_fetched_total",
                    "Number of container records the queue's polls received from the API, by poll kind.",
                ),
                &["kind"],
            )?,
        )?;
        for k in ["full", "incremental"] {
            polls.with_label_values(&[k]);
            rows.with_label_values(&[k]);
        }
        let (notify, _) = watch::channel(0);
        let q = Arc::new(ContainerQueue {
            client,
            chooser,
            inner: Mutex::new(Inner {
                queued_target: QUEUED_CONTAINERS_TARGET,
                room: 0,
                ..Inner::default()
            }),
            notify,
            events: crate::events::EventLog::default(),
            incremental: Default::default(),
            runtime_status: Default::default(),
            read_only: Default::default(),
            tasks: Default::default(),
            metrics: Metrics {
                entries,
                finished,
                seen: Mutex::new(HashSet::new()),
                polls,
                rows,
            },
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            q.tasks
                .spawn_until_cancelled(metrics_updater(Arc::downgrade(&q), q.subscribe()));
        }
        Ok(q)
    }

    fn lock_inner(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    /// The API client (the scheduler reads its last-503 time).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A receiver that changes whenever the cache does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    fn notify_subscribers(&self) {
        self.notify.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Every entry, and the start time of the last completed update: a remote change made
    /// before it is visible here. `None` before the first update.
    pub fn entries(&self) -> (Vec<Arc<QueueEnt>>, Option<DateTime<Utc>>) {
        let inner = self.lock_inner();
        (inner.entries.values().cloned().collect(), inner.updated)
    }

    /// The cached entry.
    pub fn get(&self, uuid: &str) -> Option<Arc<QueueEnt>> {
        self.lock_inner().entries.get(uuid).cloned()
    }

    /// Drop an entry that needs nothing more from us: Complete, Cancelled, or Queued with
    /// priority 0. Other entries stay.
    pub fn forget(&self, uuid: &str) {
        let mut inner = self.lock_inner();
        let forgettable = inner.entries.get(uuid).is_some_and(|e| {
            let c = &e.container();
            c.state.is_final() || (c.state == ContainerState::Queued && c.priority == 0)
        });
        if forgettable {
            inner.entries.remove(uuid);
            drop(inner);
            self.notify_subscribers();
        }
    }

    /// Lock the container through the API and patch the cache.
    pub async fn lock(&self, uuid: &str) -> Result<(), ApiError> {
        let resp: StateFields = self
            .client
            .request(Method::POST, &format!("containers/{uuid}/lock"), &[])
            .await?;
        self.patch_from_response(uuid, &resp);
        Ok(())
    }

    /// Unlock the container through the API and patch the cache.
    pub async fn unlock(&self, uuid: &str) -> Result<(), ApiError> {
        let resp: StateFields = self
            .client
            .request(Method::POST, &format!("containers/{uuid}/unlock"), &[])
            .await?;
        self.patch_from_response(uuid, &resp);
        Ok(())
    }

    /// Set the container Cancelled through the API and patch the cache.
    pub async fn cancel(&self, uuid: &str) -> Result<(), ApiError> {
        let resp: StateFields = self
            .client
            .request(
                Method::PUT,
                &format!("containers/{uuid}"),
                &[("container", json!({"state": "Cancelled"}))],
            )
            .await?;
        self.patch_from_response(uuid, &resp);
        Ok(())
    }

    /// Cancel the container only if the API still has it in state `expect`; otherwise take
    /// the state the API has into the cache and return false. Not in Arvados, which cancels
    /// on what its cache says: a cache that missed a change (an API replica behind, a poll
    /// that raced the change) made it cancel a container that had already completed, and
    /// Arvados allows Complete → Cancelled. One GET, on a path that is rare by design.
    pub async fn cancel_if_still(
        &self,
        uuid: &str,
        expect: ContainerState,
    ) -> Result<bool, ApiError> {
        let now: StateFields = self
            .client
            .request(
                Method::GET,
                &format!("containers/{uuid}"),
                &[(
                    "select",
                    json!(["uuid", "state", "priority", "locked_by_uuid"]),
                )],
            )
            .await?;
        if now.state != expect {
            tracing::info!(ContainerUUID = %uuid, State = %now.state, "not cancelling: the container's state changed");
            self.patch_from_response(uuid, &now);
            return Ok(false);
        }
        self.cancel(uuid).await.map(|()| true)
    }

    fn patch_from_response(&self, uuid: &str, resp: &StateFields) {
        let mut inner = self.lock_inner();
        if let Some(d) = inner.dont_update.as_mut() {
            d.insert(uuid.to_string());
        }
        let Some(ent) = inner.entries.get_mut(uuid) else {
            return;
        };
        self.count_finish(uuid, ent.container().state, resp.state);
        Arc::make_mut(ent).modify(|c| {
            c.state = resp.state;
            c.priority = resp.priority;
            c.locked_by_uuid = resp.locked_by_uuid.clone();
        });
        drop(inner);
        self.notify_subscribers();
    }

    /// Poll the API and refresh the cache (spec §5.3). On error the cache is unchanged.
    pub async fn update(self: &Arc<Self>) -> Result<(), ApiError> {
        let started = Utc::now();
        let settings = self.incremental.get();
        let (known, mounts_pending, auth_uuid, kind, queued_target, room) = {
            let mut inner = self.lock_inner();
            // With room for more, a full poll reaches that much further down the queue (up
            // to MaxQueued); without, Arvados' 100.
            inner.queued_target = match settings {
                Some(s) => (QUEUED_CONTAINERS_TARGET + inner.room)
                    .min(s.max_queued.max(QUEUED_CONTAINERS_TARGET)),
                None => QUEUED_CONTAINERS_TARGET,
            };
            let kind = next_poll_kind(settings, inner.watermark, inner.polls_since_full);
            inner.dont_update = Some(HashSet::new());
            let mut known: HashMap<String, ContainerState> =
                HashMap::with_capacity(inner.entries.len());
            let mut pending: HashSet<String> = HashSet::new();
            for (k, e) in &inner.entries {
                known.insert(k.clone(), e.container().state);
                if e.mounts_pending {
                    pending.insert(k.clone());
                }
            }
            (
                known,
                pending,
                inner.auth_uuid.clone(),
                kind,
                inner.queued_target,
                inner.room,
            )
        };
        let polled = match kind {
            PollKind::Full => self.poll(&known, auth_uuid, queued_target).await,
            PollKind::Changes(since) => {
                let top_up = (room > 0).then_some(queued_target);
                self.poll_changes(since, auth_uuid, top_up).await
            }
        };
        let (mut next, skipped, auth_uuid, fetched, newest) = match polled {
            Ok(x) => x,
            Err(e) => {
                self.lock_inner().dont_update = None;
                return Err(e);
            }
        };
        self.metrics.polls.with_label_values(&[kind.label()]).inc();
        self.metrics
            .rows
            .with_label_values(&[kind.label()])
            .inc_by(fetched as u64);
        if let PollKind::Changes(_) = kind {
            // Changed known containers are updated and unchanged ones stay as they are (see
            // `retain` below); new ones join if they are ours, or if they are queued and the
            // queue holds fewer queued containers than a full poll would fetch now (Arvados'
            // 100, more with room), highest priority first. Without that bound, the first
            // incremental poll after a big batch was queued brought in every container of the
            // batch modified within the overlap window (thousands at 100 000 queued, each with
            // a mounts fetch), and the queue went stale while it fetched them.
            let reach = queued_target.min(settings.map_or(usize::MAX, |s| s.max_queued));
            let inner = self.lock_inner();
            let mut queued = inner
                .entries
                .values()
                .filter(|e| e.container().state == ContainerState::Queued)
                .count();
            let changed = std::mem::take(&mut next);
            for uuid in &mounts_pending {
                if let Some(e) = inner.entries.get(uuid) {
                    next.insert(uuid.clone(), e.container().clone());
                }
            }
            let mut candidates: Vec<(String, Container)> = Vec::new();
            for (uuid, c) in changed {
                if inner.entries.contains_key(&uuid) || c.locked_by_uuid == auth_uuid {
                    next.insert(uuid, c);
                } else if c.state == ContainerState::Queued && c.priority > 0 {
                    candidates.push((uuid, c));
                }
            }
            candidates.sort_by(|a, b| b.1.priority.cmp(&a.1.priority).then(a.0.cmp(&b.0)));
            for (uuid, c) in candidates {
                if queued >= reach {
                    break;
                }
                queued += 1;
                next.insert(uuid, c);
            }
        }
        // Mounts and type choice for containers seen for the first time, outside the lock.
        let new: Vec<Container> = next
            .values()
            .filter(|c| !known.contains_key(&c.uuid) || mounts_pending.contains(&c.uuid))
            .cloned()
            .collect();
        let added = self.prepare_new(new).await;

        let mut inner = self.lock_inner();
        inner.auth_uuid = Some(auth_uuid);
        let dont = inner.dont_update.take().unwrap_or_default();
        let mut added: HashMap<String, QueueEnt> = added
            .into_iter()
            .map(|e| (e.container().uuid.clone(), e))
            .collect();
        for (uuid, ctr) in next.iter() {
            if dont.contains(uuid) {
                continue;
            }
            if let Some(ent) = added.remove(uuid) {
                if inner.entries.contains_key(uuid) {
                    // A retried mounts fetch: the entry gets its needs and types (or stays
                    // pending).
                    inner.entries.insert(uuid.clone(), Arc::new(ent));
                    continue;
                }
                tracing::info!(
                    ContainerUUID = %uuid,
                    InstanceTypes = %ent.instance_types.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(","),
                    "adding container to queue"
                );
                inner.entries.insert(uuid.clone(), Arc::new(ent));
            } else if let Some(ent) = inner.entries.get_mut(uuid) {
                self.count_finish(uuid, ent.container().state, ctr.state);
                Arc::make_mut(ent).modify(|c| *c = ctr.clone());
            }
        }
        inner.entries.retain(|uuid, _| {
            // A record that came back but could not be decoded is not gone: keep what we knew.
            let keep = matches!(kind, PollKind::Changes(_))
                || dont.contains(uuid)
                || next.contains_key(uuid)
                || skipped.contains(uuid);
            if !keep {
                tracing::info!(ContainerUUID = %uuid, "dropping container from queue");
            }
            keep
        });
        inner.updated = Some(started);
        if settings.is_some_and(|s| s.incremental) {
            inner.watermark = match kind {
                // A full poll saw every container as of its start, and no later: its pages
                // come one after another, so a container can change after its page came back
                // while a later page brings rows changed later still. The next incremental
                // poll starts from the full poll's start (less the overlap). Not from the
                // newest row received: that skipped such a change until the next full poll,
                // and the scheduler then cancelled a Complete container it still held as
                // Running. Not from before the start either: a batch queued just before a
                // full poll was then listed again, every container of it.
                PollKind::Full => Some(started),
                // Changes are paged by key in time order until a page is not full, so a
                // change made before the newest one received was received too (a commit that
                // lands late is what the overlap is for).
                PollKind::Changes(_) => match (inner.watermark, newest) {
                    (Some(w), Some(n)) => Some(w.max(n)),
                    (w, n) => n.or(w),
                },
            };
            // A change this poll received but did not apply (a lock, unlock or cancel answered
            // while it was in flight, and the answer may predate the change) must come again:
            // the next incremental poll starts no later than the oldest such change. (A full
            // poll refetches every known container anyway.)
            let unapplied = next
                .iter()
                .filter(|(uuid, _)| dont.contains(*uuid))
                .filter_map(|(_, c)| c.modified_at)
                .min();
            if let (Some(w), Some(u)) = (inner.watermark, unapplied) {
                inner.watermark = Some(w.min(u));
            }
            inner.polls_since_full = match kind {
                PollKind::Full => 0,
                PollKind::Changes(_) => inner.polls_since_full + 1,
            };
        }
        drop(inner);
        self.notify_subscribers();
        Ok(())
    }

    /// Turn on incremental polling (from the settings file; once, before the first update).
    pub fn set_incremental(&self, s: crate::settings::QueueSettings) {
        if s.incremental {
            let _ = self.incremental.set(s);
        }
    }

    /// Ask for each container's `runtime_status` too (for spot interruption notices).
    pub fn set_select_runtime_status(&self, on: bool) {
        self.runtime_status
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The fields a poll selects: [`SELECT`], and `runtime_status` if asked for.
    fn select(&self) -> Vec<String> {
        let mut select: Vec<String> = SELECT.iter().map(|s| s.to_string()).collect();
        if self
            .runtime_status
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            select.push("runtime_status".into());
        }
        select
    }

    /// Whether incremental polling is on (only then does [`Self::set_room`] matter).
    pub fn is_incremental(&self) -> bool {
        self.incremental.get().is_some()
    }

    /// The scheduler's word after a pass: how many more queued containers than the queue
    /// held it could have started (0 when it could not start all it held). In incremental
    /// mode, full polls then fetch that many queued containers beyond Arvados' 100 (at most
    /// `MaxQueued`), and each incremental poll tops up with the top 100 queued.
    pub fn set_room(&self, room: usize) {
        if self.incremental.get().is_some() {
            self.lock_inner().room = room;
        }
    }

    /// The changes since `since`: every container modified then or later, by `modified_at`.
    ///
    /// Paged by key, not offset ([`ChangePager`]). A row that changes while the poll pages
    /// moves later in the order and is received again; with offsets, every row behind it
    /// would shift back one place and one would be skipped.
    ///
    /// With `top_up: Some(n)` (the scheduler had room to start more than the queue held), the
    /// poll also fetches the top `n` queued containers by priority, as far as a full poll
    /// would reach now (Arvados' 100 plus the room): queued containers that have not changed
    /// since the last full poll would otherwise reach the queue only on the next one. (With
    /// a top-up of only 100, a fleet with room for more started at most 100 containers per
    /// poll: 400 a second at 250 ms polls.)
    async fn poll_changes(
        &self,
        since: DateTime<Utc>,
        auth_uuid: Option<String>,
        top_up: Option<usize>,
    ) -> Result<PollResult, ApiError> {
        let auth_uuid = match auth_uuid {
            Some(u) => u,
            None => self.client.current_token().await?.uuid,
        };
        let mut select = self.select();
        select.extend(["modified_at".to_string(), "locked_by_uuid".to_string()]);
        let mut opts = ListOptions {
            order: Some("modified_at asc, uuid asc".into()),
            limit: Some(CHANGES_PAGE),
            count: Some(Count::None),
            select: Some(select),
            ..Default::default()
        };
        let stamp = |t: DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string();
        let mut next: HashMap<String, Container> = HashMap::new();
        let mut skipped: HashSet<String> = HashSet::new();
        let mut fetched = 0usize;
        let mut pager = ChangePager::new(since);
        while let Some(filters) = pager.filters(&stamp) {
            opts.filters = filters;
            if !skipped.is_empty() {
                // Undecodable records: their time is unknown, so leave them out of every
                // later page.
                opts.filters.push(Filter::new(
                    "uuid",
                    "not in",
                    skipped.iter().cloned().collect::<Vec<_>>(),
                ));
            }
            let page = self.client.list_containers(&opts).await?;
            fetched += page.raw_len;
            let mut progress = 0usize;
            for u in page.skipped {
                if !u.is_empty() && skipped.insert(u) {
                    progress += 1;
                }
            }
            for c in page.items {
                let (take, moved) = pager.receive(&c.uuid, c.modified_at);
                progress += usize::from(moved);
                if take {
                    next.insert(c.uuid.clone(), c);
                }
            }
            let page_size = match page.limit {
                l if l > 0 => l.min(CHANGES_PAGE),
                _ => CHANGES_PAGE,
            };
            let cut = page.raw_len as i64 >= page_size;
            pager.page_done(page.raw_len, progress, cut);
        }
        let newest = next.values().filter_map(|c| c.modified_at).max();
        if let Some(n) = top_up {
            let top = queued_by_priority(opts.select.clone().unwrap_or_default(), n.min(1000));
            let (items, bad) = self
                .client
                .list_containers_by_offset_with_skipped(&top, |all| all.len() >= n)
                .await?;
            fetched += items.len() + bad.len();
            skipped.extend(bad.into_iter().filter(|u| !u.is_empty()));
            for c in items {
                // A change seen above is at least as new.
                next.entry(c.uuid.clone()).or_insert(c);
            }
        }
        Ok((next, skipped, auth_uuid, fetched, newest))
    }

    /// The API side of an update: every container that belongs in the cache, by uuid.
    async fn poll(
        &self,
        known: &HashMap<String, ContainerState>,
        auth_uuid: Option<String>,
        queued_target: usize,
    ) -> Result<PollResult, ApiError> {
        let auth_uuid = match auth_uuid {
            Some(u) => u,
            None => self.client.current_token().await?.uuid,
        };
        let mut select = self.select();
        if self.incremental.get().is_some() {
            // The change time the next incremental poll starts from.
            select.push("modified_at".into());
        }
        let mut fetched = 0usize;
        let mut next: HashMap<String, Container> = HashMap::new();

        let mine = ListOptions {
            filters: vec![Filter::new("locked_by_uuid", "=", auth_uuid.as_str())],
            limit: Some(1000),
            count: Some(Count::None),
            select: Some(select.clone()),
            ..Default::default()
        };
        let mut skipped: HashSet<String> = HashSet::new();
        let (items, bad) = self
            .client
            .list_all_containers_by_uuid_with_skipped(&mine)
            .await?;
        fetched += items.len() + bad.len();
        skipped.extend(bad);
        for c in items {
            next.insert(c.uuid.clone(), c);
        }

        let available = queued_by_priority(select.clone(), 1000);
        let (queued, bad) = self
            .client
            .list_containers_by_offset_with_skipped(&available, |all| {
                all.iter()
                    .filter(|c| !c.scheduling_parameters.supervisor)
                    .count()
                    >= queued_target
            })
            .await?;
        fetched += queued.len() + bad.len();
        skipped.extend(bad);
        for c in queued {
            next.insert(c.uuid.clone(), c);
        }

        let mut missing: Vec<String> = known
            .iter()
            .filter(|(uuid, state)| {
                !state.is_final() && !next.contains_key(*uuid) && !skipped.contains(*uuid)
            })
            .map(|(uuid, _)| uuid.clone())
            .collect();
        missing.sort();
        while !missing.is_empty() {
            let batch: Vec<String> = missing.iter().take(MISSING_BATCH).cloned().collect();
            let opts = ListOptions {
                filters: vec![Filter::new("uuid", "in", batch.clone())],
                count: Some(Count::None),
                select: Some(select.clone()),
                ..Default::default()
            };
            let (found, bad) = self
                .client
                .list_all_containers_by_uuid_with_skipped(&opts)
                .await?;
            fetched += found.len() + bad.len();
            // Records that came back undecodable are not deleted: the caller keeps them.
            missing.retain(|u| !bad.contains(u));
            skipped.extend(bad);
            if missing.is_empty() {
                break;
            }
            if found.is_empty() {
                for uuid in &batch {
                    tracing::info!(ContainerUUID = %uuid, "container not found by controller (deleted?)");
                }
                missing.retain(|u| !batch.contains(u));
                continue;
            }
            for c in found {
                let Some(pos) = missing.iter().position(|u| *u == c.uuid) else {
                    tracing::error!(
                        ContainerUUID = %c.uuid,
                        "BUG? server response did not match requested filters, erroring out rather than risk deadlock"
                    );
                    return Err(ApiError::Decode {
                        method: "GET".into(),
                        url: "containers".into(),
                        message: format!(
                            "server returned container {} that was not requested",
                            c.uuid
                        ),
                        type_error: false,
                    });
                };
                missing.remove(pos);
                next.insert(c.uuid.clone(), c);
            }
        }
        skipped.remove("");
        let newest = next.values().filter_map(|c| c.modified_at).max();
        Ok((next, skipped, auth_uuid, fetched, newest))
    }

    /// Fetch mounts, compute needs and types for new containers. Containers that can never run
    /// (mounts of the wrong JSON type, no suitable type) are cancelled in the background and
    /// left out. When the mounts fetch fails otherwise, a Queued container is left out and a
    /// later one is kept as `mounts_pending`; both are retried on the next update.
    async fn prepare_new(self: &Arc<Self>, new: Vec<Container>) -> Vec<QueueEnt> {
        let mut out = Vec::with_capacity(new.len());
        let mut pending = new.into_iter();
        loop {
            let mut set = tokio::task::JoinSet::new();
            for ctr in pending.by_ref().take(MOUNTS_CONCURRENCY) {
                let timeout = self
                    .client
                    .timeout()
                    .map_or(MOUNTS_TIMEOUT, |t| t.min(MOUNTS_TIMEOUT));
                let client = self.client.with_timeout(timeout);
                set.spawn(async move {
                    let mounts = client.get_container(&ctr.uuid, Some(&["mounts"])).await;
                    (ctr, mounts)
                });
            }
            if set.is_empty() {
                return out;
            }
            while let Some(joined) = set.join_next().await {
                let Ok((mut ctr, mounts)) = joined else {
                    continue;
                };
                match mounts {
                    Ok(m) => ctr.mounts = m.mounts,
                    Err(err) => {
                        tracing::warn!(ContainerUUID = %ctr.uuid, error = %err, "error getting mounts");
                        // Only a record whose mounts have the wrong JSON type is bad; a body
                        // that is not JSON at all (a proxy's error page) is a passing fault.
                        if let ApiError::Decode {
                            message,
                            type_error: true,
                            ..
                        } = &err
                        {
                            self.spawn_cancel_unsatisfiable(
                                ctr,
                                format!(
                                    "error getting mounts from container record: json: cannot unmarshal mounts: {message}"
                                ),
                            );
                        } else if ctr.state != ContainerState::Queued {
                            // Ours already (Locked, perhaps Running on a worker after a
                            // restart): keep it, or sync would take it for gone and kill it.
                            let need = self.chooser.resources_needed(&ctr);
                            let mut ent = QueueEnt::new(ctr, need, Vec::new(), Utc::now());
                            ent.mounts_pending = true;
                            out.push(ent);
                        }
                        continue;
                    }
                }
                if let Some(ent) = self.entry_for(ctr) {
                    out.push(ent);
                }
            }
        }
    }

    /// Needs and types for a new container (mounts loaded); `None` if it gets cancelled.
    fn entry_for(self: &Arc<Self>, mut ctr: Container) -> Option<QueueEnt> {
        let need = self.chooser.resources_needed(&ctr);
        let chosen = self.chooser.choose_for(&ctr, &need);
        ctr.mounts.clear();
        let types = match chosen {
            Ok(t) => t,
            Err(err) => {
                if matches!(ctr.state, ContainerState::Queued | ContainerState::Locked) {
                    tracing::info!(ContainerUUID = %ctr.uuid, error = %err, "cancel container with no suitable instance type");
                    self.spawn_cancel_unsatisfiable(ctr, choose_error_message(&err));
                    return None;
                }
                Vec::new()
            }
        };
        Some(QueueEnt::new(ctr, need, types, Utc::now()))
    }

    /// A read-only queue (a standby's warm view) polls but never writes: containers it would
    /// cancel are left out of the queue, so the first poll after it turns writable again
    /// finds them new and cancels them then.
    pub fn set_read_only(&self, read_only: bool) {
        self.read_only
            .store(read_only, std::sync::atomic::Ordering::SeqCst);
    }

    fn spawn_cancel_unsatisfiable(self: &Arc<Self>, ctr: Container, message: String) {
        if self.read_only.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::debug!(ContainerUUID = %ctr.uuid, "read-only queue: not cancelling unrunnable container yet");
            return;
        }
        let q = self.clone();
        self.tasks
            .spawn(async move { q.cancel_unsatisfiable(&ctr, &message).await });
    }

    /// On shutdown: stop the metrics updater and wait up to `limit` for background cancels
    /// (API calls with deadlines). False if some were still running.
    pub async fn join(&self, limit: std::time::Duration) -> bool {
        self.tasks.join("queue", limit).await
    }

    /// Record why a container can never run and cancel it (locking it first if Queued, since
    /// only the lock holder may set `runtime_status`).
    async fn cancel_unsatisfiable(&self, ctr: &Container, message: &str) {
        let uuid = ctr.uuid.as_str();
        if ctr.state == ContainerState::Queued
            && let Err(err) = self.lock(uuid).await
        {
            tracing::warn!(ContainerUUID = %uuid, error = %err, "lock failed");
            return;
        }
        let mut failed = self
            .client
            .update_container(
                uuid,
                &json!({"runtime_status": {"error": message}}),
                Some(&["uuid"]),
            )
            .await
            .err();
        if let Err(err) = self.cancel(uuid).await {
            failed = Some(err);
        }
        if let Some(err) = failed {
            let state = self
                .client
                .get_container(uuid, Some(&["state"]))
                .await
                .map(|c| c.state);
            if state.ok() != Some(ContainerState::Cancelled) {
                tracing::warn!(ContainerUUID = %uuid, error = %err, "error while trying to cancel unsatisfiable container");
            }
        }
    }

    /// Recompute `arvados_dispatchcloud_queue_entries`: per state and cheapest type; label
    /// pairs seen before and now absent are set to 0.
    pub fn update_metrics(&self) {
        let mut counts: HashMap<(ContainerState, &str), i64> = HashMap::new();
        let (entries, _) = self.entries();
        for e in &entries {
            let it = e
                .instance_types
                .first()
                .map(|t| t.name.as_str())
                .unwrap_or("");
            *counts.entry((e.container().state, it)).or_default() += 1;
        }
        let mut seen = self.metrics.seen.lock();
        for (state, it) in seen.iter() {
            self.metrics
                .entries
                .with_label_values(&[state.as_str(), it.as_str()])
                .set(0);
        }
        for ((state, it), n) in counts {
            self.metrics
                .entries
                .with_label_values(&[state.as_str(), it])
                .set(n);
            seen.insert((state.as_str().to_string(), it.to_string()));
        }
    }
}

/// What the queue reads from a lock, unlock or cancel response. Decoding only these fields
/// means a record whose other fields are malformed (e.g. mounts) can still be locked and
/// cancelled.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct StateFields {
    state: ContainerState,
    priority: i64,
    #[serde(deserialize_with = "null_as_empty")]
    locked_by_uuid: String,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::Deserialize;
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// The `runtime_status.error` text for a type-selection failure.
fn choose_error_message(err: &ChooseError) -> String {
    err.to_string()
}

async fn metrics_updater(queue: Weak<ContainerQueue>, mut rx: watch::Receiver<u64>) {
    loop {
        match queue.upgrade() {
            Some(q) => q.update_metrics(),
            None => return,
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
