//! The generic dispatcher library: the Rust counterpart of Arvados' Go `sdk/go/dispatch`
//! (spec §12).
//!
//! It owns the poll → lock → track loop that any container dispatcher (local, SLURM, LSF, …)
//! needs: polling the Arvados API for Queued containers and for containers locked by its own
//! token, locking them, running one tracker per container and feeding it updated records.
//! It talks to Arvados only through the `arvados` crate's API client and knows nothing about
//! clouds or VMs.
//!
//! | Go | here |
//! |---|---|
//! | `Dispatcher{Arv, Logger, BatchSize, PollPeriod, MinRetryPeriod, RunContainer}` | [`Dispatcher::new`] + builder methods |
//! | `Logger` (`Printf`, `Warnf`, `Debugf`) | [`Logger`]; [`TracingLogger`] by default |
//! | `DispatchFunc(*Dispatcher, Container, <-chan Container) error` | [`RunFn`]: `(Dispatcher, Container, Updates) -> Result<(), RunError>` |
//! | `Run(ctx)` | [`Dispatcher::run`]`(shutdown)` |
//! | `TrackContainer(uuid)` | [`Dispatcher::track_container`] |
//! | `Unlock(uuid)` | [`Dispatcher::unlock`] |
//! | `UpdateState(uuid, state)` | [`Dispatcher::update_state`] |
//!
//! A dispatcher is a run function plus this loop. The run function gets each container the
//! dispatcher locked (or found already locked by it after a restart) and a stream of newer
//! records; it starts the work, follows the updates (priority 0 means "stop"), and returns
//! when the work is over:
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use arvados::{Client, ClientConfig, ContainerState};
//! use dispatch::{Dispatcher, RunError, RunFn};
//!
//! # async fn example() -> anyhow::Result<()> {
//! let run: RunFn = Arc::new(|d, container, mut updates| {
//!     Box::pin(async move {
//!         // Start the work for `container` here (submit a batch job, spawn a process…).
//!         while let Some(newer) = updates.recv().await {
//!             if newer.priority == 0 {
//!                 // Cancelled by the user: stop the work, then tell Arvados.
//!                 d.update_state(&newer.uuid, ContainerState::Cancelled)
//!                     .await
//!                     .map_err(|e| RunError::Other(e.to_string()))?;
//!             }
//!         }
//!         // `None`: the container is no longer ours (finished, cancelled, or shutdown).
//!         Ok(())
//!     })
//! });
//! let client = Client::new(ClientConfig::from_env()?)?;
//! let dispatcher = Dispatcher::new(client, run).poll_period(Duration::from_secs(10));
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! dispatcher.run(shutdown).await?;
//! # Ok(())
//! # }
//! ```
//!
//! `crates/dispatch/README.md` walks through a whole dispatcher; `crunch-dispatch-local` and
//! `crunch-dispatch-slurm` in this repository are two real ones.
//!
//! Better than Go where spec §13.7 names its flaws: pages are fetched by uuid (stable while
//! records change) without a separate count query; a tracker leaves the map once it is done;
//! `max_trackers` can bound how many containers run at once.

#![warn(missing_docs)]

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arvados::types::{Container, ContainerState};
use arvados::{ApiError, Client, Count, Filter, ListOptions, Method};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
pub use tokio_util::sync::CancellationToken;

/// Where the library's messages go (Go's `Printf`, `Warnf`, `Debugf`).
pub trait Logger: Send + Sync {
    /// An informational message (a container locked, a tracker started or stopped).
    fn printf(&self, msg: &str);
    /// Something failed and will be retried (a list or lock call).
    fn warnf(&self, msg: &str);
    /// Detail for debugging (containers skipped because another dispatcher holds them).
    fn debugf(&self, msg: &str);
}

/// The default [`Logger`]: `tracing` at info, warn and debug level.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingLogger;

impl Logger for TracingLogger {
    fn printf(&self, msg: &str) {
        tracing::info!("{msg}");
    }
    fn warnf(&self, msg: &str) {
        tracing::warn!("{msg}");
    }
    fn debugf(&self, msg: &str) {
        tracing::debug!("{msg}");
    }
}

/// Why a run function gave up on a container.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunError {
    /// The container can never run here; the tracker cancels it (instead of requeueing).
    #[error("{message}")]
    ConstraintsNotSatisfiable {
        /// Why, e.g. "constraints not satisfiable by any configured instance type".
        message: String,
        /// What is available, one line each, e.g.
        /// `Type "m4": 4 VCPUs, 16 GiB RAM, 100 GiB Scratch, 0.2 Price`.
        available: Vec<String>,
    },
    /// Anything else: the tracker puts the container back in the queue (to be tried again
    /// after `min_retry_period`).
    #[error("{0}")]
    Other(String),
}

/// Newer records of a tracked container, for the run function. Only the latest unread record
/// is kept (a slow reader skips intermediate ones, as in Go).
pub struct Updates {
    rx: watch::Receiver<Option<Container>>,
}

impl Updates {
    /// The next record, or `None` once the container is no longer ours to run (it left
    /// Locked/Running, disappeared, or the dispatcher is stopping).
    pub async fn recv(&mut self) -> Option<Container> {
        match self.rx.changed().await {
            Ok(()) => self.rx.borrow_and_update().clone(),
            Err(_) => None,
        }
    }
}

impl Updates {
    /// A stand-alone channel whose first record, `initial`, counts as already read (as the
    /// run function gets it as an argument): for driving a run function without a
    /// [`Dispatcher`], e.g. in its tests. Dropping the sender ends the updates.
    ///
    /// ```
    /// use arvados::Container;
    /// use dispatch::Updates;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let first = Container { uuid: "zzzzz-dz642-000000000000001".into(), priority: 5, ..Default::default() };
    /// let (tx, mut updates) = Updates::channel(first.clone());
    /// tx.send(Container { priority: 0, ..first });
    /// assert_eq!(updates.recv().await.unwrap().priority, 0);
    /// drop(tx);
    /// assert!(updates.recv().await.is_none());
    /// # }
    /// ```
    pub fn channel(initial: Container) -> (UpdateSender, Updates) {
        let (tx, mut rx) = watch::channel(Some(initial));
        rx.borrow_and_update();
        (UpdateSender { tx }, Updates { rx })
    }
}

/// The sending side of [`Updates::channel`].
pub struct UpdateSender {
    tx: watch::Sender<Option<Container>>,
}

impl UpdateSender {
    /// Deliver a newer record (replacing one not yet read).
    pub fn send(&self, c: Container) {
        self.tx.send_replace(Some(c));
    }
}

/// The boxed future a run function returns.
pub type RunFuture = Pin<Box<dyn Future<Output = Result<(), RunError>> + Send>>;

/// Runs one container: start it if the record is Locked (or resume watching it if Running),
/// follow `Updates` while it runs, stop it once they end, and return only when it is over.
pub type RunFn = Arc<dyn Fn(Dispatcher, Container, Updates) -> RunFuture + Send + Sync>;

/// Failure of [`Dispatcher::run`].
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// `GET api_client_authorizations/current` failed, so the dispatcher cannot tell its
    /// own locks from others'.
    #[error("error getting my token UUID: {0}")]
    Token(ApiError),
}

struct Tracker {
    tx: Option<UpdateSender>,
    task: Option<JoinHandle<()>>,
}

impl Tracker {
    /// Deliver a newer record (replacing an unread one: the reader only wants the latest).
    fn update(&self, c: Container) {
        if let Some(tx) = &self.tx {
            tx.send(c);
        }
    }

    /// End the updates; the run function sees `None`.
    fn close(&mut self) {
        self.tx = None;
    }
}

#[derive(Default)]
struct State {
    auth_uuid: String,
    trackers: HashMap<String, Tracker>,
    /// Last start attempt per container, for `min_retry_period`.
    attempts: HashMap<String, Instant>,
}

struct Shared {
    client: Client,
    logger: Arc<dyn Logger>,
    batch_size: i64,
    poll_period: Duration,
    min_retry_period: Duration,
    max_trackers: Option<usize>,
    run: RunFn,
    state: Mutex<State>,
}

/// A container dispatcher: cheap to clone (every clone is the same dispatcher).
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
}

impl Dispatcher {
    /// A dispatcher using `client` (its token identifies our locks) and `run` for each
    /// container. Defaults: batch size 100, poll period 10 s, no retry throttling, no bound on
    /// trackers, [`TracingLogger`].
    pub fn new(client: Client, run: RunFn) -> Dispatcher {
        Dispatcher {
            shared: Arc::new(Shared {
                client,
                logger: Arc::new(TracingLogger),
                batch_size: 100,
                poll_period: Duration::from_secs(10),
                min_retry_period: Duration::ZERO,
                max_trackers: None,
                run,
                state: Mutex::new(State::default()),
            }),
        }
    }

    fn with_shared(self, f: impl FnOnce(&mut Shared)) -> Dispatcher {
        let mut shared = Arc::try_unwrap(self.shared)
            .unwrap_or_else(|_| panic!("configure a Dispatcher before cloning or running it"));
        f(&mut shared);
        Dispatcher {
            shared: Arc::new(shared),
        }
    }

    /// Send the library's messages to `logger` instead of `tracing`.
    pub fn logger(self, logger: Arc<dyn Logger>) -> Dispatcher {
        self.with_shared(|s| s.logger = logger)
    }

    /// Page size of container lists (values below 1 mean 100).
    pub fn batch_size(self, n: i64) -> Dispatcher {
        self.with_shared(|s| s.batch_size = if n < 1 { 100 } else { n })
    }

    /// Time between two polls of the API.
    pub fn poll_period(self, d: Duration) -> Dispatcher {
        self.with_shared(|s| s.poll_period = d)
    }

    /// Do not try the same container again sooner than this.
    pub fn min_retry_period(self, d: Duration) -> Dispatcher {
        self.with_shared(|s| s.min_retry_period = d)
    }

    /// Run at most this many containers at once (lock no more Queued ones until one ends).
    pub fn max_trackers(self, n: usize) -> Dispatcher {
        self.with_shared(|s| s.max_trackers = Some(n))
    }

    /// The API client.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    fn log(&self) -> &dyn Logger {
        &*self.shared.logger
    }

    fn state(&self) -> parking_lot::MutexGuard<'_, State> {
        self.shared.state.lock()
    }

    /// Containers being tracked right now.
    pub fn tracked(&self) -> Vec<String> {
        let mut v: Vec<String> = self.state().trackers.keys().cloned().collect();
        v.sort();
        v
    }

    /// Poll every `poll_period` (the first poll one period after start) until `shutdown` is
    /// cancelled; then end every tracker's updates and wait for the run functions.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), DispatchError> {
        let me = self
            .shared
            .client
            .current_token()
            .await
            .map_err(DispatchError::Token)?
            .uuid;
        self.state().auth_uuid = me;
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.shared.poll_period,
            self.shared.poll_period,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = tick.tick() => self.poll().await,
                _ = shutdown.cancelled() => break,
            }
        }
        let tasks: Vec<JoinHandle<()>> = {
            let mut st = self.state();
            st.trackers
                .values_mut()
                .filter_map(|t| {
                    t.close();
                    t.task.take()
                })
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    }

    /// Every container matching `filters`, paged by uuid, `batch_size` at a time.
    async fn list(&self, filters: Vec<Filter>) -> Result<Vec<Container>, ApiError> {
        let opts = ListOptions {
            filters,
            limit: Some(self.shared.batch_size),
            count: Some(Count::None),
            ..Default::default()
        };
        self.shared.client.list_all_containers_by_uuid(&opts).await
    }

    /// One poll cycle (spec §12.2 step 3).
    pub async fn poll(&self) {
        let (me, mut todo) = {
            let st = self.state();
            let todo: HashSet<String> = st.trackers.keys().cloned().collect();
            (st.auth_uuid.clone(), todo)
        };
        let mine = self
            .list(vec![Filter::new("locked_by_uuid", "=", me.as_str())])
            .await;
        let queued = self
            .list(vec![
                Filter::new("state", "=", "Queued"),
                Filter::new("priority", ">", 0),
            ])
            .await;
        let (mine, mut queued) = match (mine, queued) {
            (Ok(m), Ok(q)) => (m, q),
            (Err(e), _) | (_, Err(e)) => {
                self.log()
                    .warnf(&format!("error getting list of containers: {e}"));
                return;
            }
        };
        // Lock the most important first.
        queued.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.uuid.cmp(&b.uuid)));
        for c in mine.iter().chain(queued.iter()) {
            todo.remove(&c.uuid);
        }
        self.handle_list(mine).await;
        self.handle_list(queued).await;

        let mut rest: Vec<String> = todo.into_iter().collect();
        rest.sort();
        for batch in rest.chunks(20) {
            match self
                .list(vec![Filter::new("uuid", "in", batch.to_vec())])
                .await
            {
                Ok(found) => {
                    let found_uuids: HashSet<String> =
                        found.iter().map(|c| c.uuid.clone()).collect();
                    self.handle_list(found).await;
                    for u in batch.iter().filter(|u| !found_uuids.contains(*u)) {
                        self.log().printf(&format!(
                            "Container {u:?} not returned by any query, stopping tracking."
                        ));
                        if let Some(t) = self.state().trackers.get_mut(u) {
                            t.close();
                        }
                    }
                }
                Err(e) => {
                    self.log()
                        .warnf(&format!("error getting list of containers: {e}"));
                    return;
                }
            }
        }
        self.state()
            .attempts
            .retain(|_, t| t.elapsed() < self.shared.min_retry_period);
    }

    /// Whether a start attempt for `uuid` is allowed now (spec §12.4 throttle).
    fn throttle_allows(&self, uuid: &str) -> bool {
        let hold = self.shared.min_retry_period;
        if hold.is_zero() {
            return true;
        }
        let mut st = self.state();
        match st.attempts.get(uuid) {
            Some(t) if t.elapsed() < hold => false,
            _ => {
                st.attempts.insert(uuid.to_string(), Instant::now());
                true
            }
        }
    }

    async fn handle_list(&self, containers: Vec<Container>) {
        for mut c in containers {
            let (me, tracked, room) = {
                let st = self.state();
                let running = st.trackers.values().filter(|t| t.tx.is_some()).count();
                (
                    st.auth_uuid.clone(),
                    st.trackers.contains_key(&c.uuid),
                    self.shared.max_trackers.is_none_or(|m| running < m),
                )
            };
            if !c.locked_by_uuid.is_empty() && c.locked_by_uuid != me {
                self.log().debugf(&format!(
                    "ignoring {} locked by {}",
                    c.uuid, c.locked_by_uuid
                ));
                continue;
            }
            if tracked {
                let mut st = self.state();
                let Some(t) = st.trackers.get_mut(&c.uuid) else {
                    continue;
                };
                match c.state {
                    ContainerState::Locked | ContainerState::Running => t.update(c),
                    // The run function sees the final record, then the end of updates.
                    _ => {
                        t.update(c);
                        t.close();
                    }
                }
                continue;
            }
            match c.state {
                ContainerState::Queued => {
                    if !room || !self.throttle_allows(&c.uuid) {
                        continue;
                    }
                    if let Err(e) = self.lock(&c.uuid).await {
                        self.log()
                            .warnf(&format!("error locking container {}: {e}", c.uuid));
                        continue;
                    }
                    c.state = ContainerState::Locked;
                    c.locked_by_uuid = me;
                    self.start_tracker(c, false);
                }
                ContainerState::Locked | ContainerState::Running
                    if self.throttle_allows(&c.uuid) =>
                {
                    self.start_tracker(c, false);
                }
                _ => {}
            }
        }
    }

    async fn lock(&self, uuid: &str) -> Result<(), ApiError> {
        let _: serde_json::Value = self
            .shared
            .client
            .request(Method::POST, &format!("containers/{uuid}/lock"), &[])
            .await?;
        Ok(())
    }

    /// Start a tracker running the run function; `closed` starts it with its updates
    /// already ended.
    fn start_tracker(&self, c: Container, closed: bool) {
        let uuid = c.uuid.clone();
        // The initial record counts as delivered (the run function gets it as an argument).
        let (tx, updates) = Updates::channel(c.clone());
        let d = self.clone();
        let mut st = self.state();
        if st.trackers.contains_key(&uuid) {
            return;
        }
        let mut tracker = Tracker {
            tx: Some(tx),
            task: None,
        };
        if closed {
            tracker.close();
        }
        let task = tokio::spawn(async move { d.track(c, updates).await });
        tracker.task = Some(task);
        st.trackers.insert(uuid, tracker);
    }

    /// The body of a tracker (spec §12.3).
    async fn track(self, c: Container, mut updates: Updates) {
        let uuid = c.uuid.clone();
        let result = (self.shared.run)(
            self.clone(),
            c,
            Updates {
                rx: updates.rx.clone(),
            },
        )
        .await;
        let mut fallback = ContainerState::Queued;
        if let Err(err) = result {
            let text = match &err {
                RunError::ConstraintsNotSatisfiable { message, available } => {
                    fallback = ContainerState::Cancelled;
                    let mut t = format!(
                        "Error running container {uuid}: cannot run container {uuid}: {message}\n"
                    );
                    if available.is_empty() {
                        t.push_str("No instance types are configured.\n");
                    } else {
                        t.push_str("Available instance types:\n");
                        for a in available {
                            t.push_str(a);
                            t.push('\n');
                        }
                    }
                    t
                }
                RunError::Other(e) => format!("Error running container {uuid}: {e}"),
            };
            self.log().printf(&text);
            let log = json!({
                "object_uuid": uuid,
                "event_type": "dispatch",
                "properties": {"text": text},
            });
            if let Err(e) = self
                .shared
                .client
                .request::<serde_json::Value>(Method::POST, "logs", &[("log", log)])
                .await
            {
                self.log()
                    .warnf(&format!("error creating log record for {uuid}: {e}"));
            }
        }
        // Drain until the poll (or shutdown) ends the updates; a container still ours after
        // its run function returned is put back (or cancelled if it can never run).
        let mut first = true;
        while let Some(c) = updates.recv().await {
            if !first && matches!(c.state, ContainerState::Locked | ContainerState::Running) {
                self.log().printf(&format!(
                    "container {uuid} state is still {}, changing to {fallback}",
                    c.state
                ));
                let _ = self.update_state(&uuid, fallback).await;
            }
            first = false;
        }
        self.state().trackers.remove(&uuid);
    }

    /// Start tracking a container we may already hold (e.g. after a restart). A Queued,
    /// Cancelled or Complete container is tracked with its updates already ended, so the run
    /// function can clean up and return.
    pub async fn track_container(&self, uuid: &str) -> Result<(), ApiError> {
        let c = self.shared.client.get_container(uuid, None).await?;
        let me = self.state().auth_uuid.clone();
        let me = if me.is_empty() {
            let me = self.shared.client.current_token().await?.uuid;
            self.state().auth_uuid = me.clone();
            me
        } else {
            me
        };
        if !c.locked_by_uuid.is_empty() && c.locked_by_uuid != me {
            return Ok(());
        }
        let closed = matches!(
            c.state,
            ContainerState::Queued | ContainerState::Cancelled | ContainerState::Complete
        );
        self.start_tracker(c, closed);
        Ok(())
    }

    /// `POST containers/{uuid}/unlock`.
    pub async fn unlock(&self, uuid: &str) -> Result<(), ApiError> {
        let _: serde_json::Value = self
            .shared
            .client
            .request(Method::POST, &format!("containers/{uuid}/unlock"), &[])
            .await?;
        Ok(())
    }

    /// `PUT containers/{uuid}` with the new state; failures are logged and returned.
    pub async fn update_state(&self, uuid: &str, state: ContainerState) -> Result<(), ApiError> {
        let r = self
            .shared
            .client
            .request::<serde_json::Value>(
                Method::PUT,
                &format!("containers/{uuid}"),
                &[
                    ("container", json!({"state": state.as_str()})),
                    ("select", json!(["uuid"])),
                ],
            )
            .await;
        if let Err(e) = &r {
            self.log().warnf(&format!(
                "error updating container {uuid} to state {:?}: {e}",
                state.as_str()
            ));
        }
        r.map(|_| ())
    }
}

/// Command-line arguments with Go's single-dash long flags (`-config F`, `-poll-interval 10`)
/// turned into clap's double-dash form, so a dispatcher accepts the flags Arvados' Go
/// dispatchers take. The program name and short flags (`-h`) are left alone.
///
/// ```
/// let args = dispatch::go_style_args(["prog", "-config", "f.yml", "-h", "--x"].map(String::from));
/// assert_eq!(args, ["prog", "--config", "f.yml", "-h", "--x"]);
/// ```
pub fn go_style_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| {
            if i > 0 && a.starts_with('-') && !a.starts_with("--") && a.len() > 2 {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

/// The README's guide, compiled as a doctest so it cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    fn dispatcher(hold: Duration) -> Dispatcher {
        let client = Client::new(arvados::ClientConfig {
            base_url: "http://127.0.0.1:9/".parse().unwrap(),
            token: "t".into(),
            insecure: false,
            timeout: None,
            retry: Default::default(),
        })
        .unwrap();
        let run: RunFn = Arc::new(|_, _, _| Box::pin(async { Ok(()) }));
        Dispatcher::new(client, run).min_retry_period(hold)
    }

    #[test]
    fn ac_dl_1_throttle() {
        let d = dispatcher(Duration::ZERO);
        assert!(d.throttle_allows("a") && d.throttle_allows("a"));
        let d = dispatcher(Duration::from_nanos(1));
        assert!(d.throttle_allows("a"));
        std::thread::sleep(Duration::from_micros(1));
        assert!(d.throttle_allows("a"));
        let d = dispatcher(Duration::from_secs(60));
        assert!(d.throttle_allows("a"));
        assert!(!d.throttle_allows("a"));
        assert!(!d.throttle_allows("a"));
        let back = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .expect("clock allows back-dating");
        d.state().attempts.insert("a".into(), back);
        assert!(d.throttle_allows("a"));
        assert!(!d.throttle_allows("a"));
    }
}
