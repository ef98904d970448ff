//! The InstanceSet wrapper stack (spec §1.5), innermost first around a driver's set:
//! [`Instrumented`] (the `driver_operations` counter), [`RateLimited`]
//! (`MaxCloudOpsPerSecond`, fair), [`DefaultTags`] (`CloudVMs.ResourceTags`), [`Filtering`]
//! (drop foreign instances), and the pool's reactive hold-offs, [`Throttled`] (§2.7): after a
//! rate-limit error, calls of that category fail fast without reaching the driver until the
//! earliest retry. [`Deadline`] sits innermost: every cloud call (create, list, set tags,
//! destroy, host-key check) ends within its deadline, with an `outcome_unknown` error if the
//! driver did not answer.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arvados::InstanceType;
use prometheus::IntCounterVec;

use crate::{
    BoxFuture, CloudError, CreateRequest, Instance, InstanceId, InstancePrice, InstanceSet,
    InstanceTags,
};

// ---------------------------------------------------------------------------------------------
// Instrumented

/// Counts every Create, List, Destroy and SetTags call in
/// `arvados_dispatchcloud_driver_operations{operation,error}` (Arvados' metric) and each
/// failed one in `arvados_dispatchcloud_driver_errors_total{operation,kind}` (ours: which
/// [`CloudError::metric_kind`]).
pub struct Instrumented {
    inner: Arc<dyn InstanceSet>,
    counters: Counters,
}

const OPERATIONS: [&str; 4] = ["Create", "List", "Destroy", "SetTags"];

#[derive(Debug, Clone)]
struct Counters {
    ops: IntCounterVec,
    errors: IntCounterVec,
}

impl Counters {
    fn count<T>(&self, op: &str, r: &Result<T, CloudError>) {
        let e = if r.is_ok() { "0" } else { "1" };
        self.ops.with_label_values(&[op, e]).inc();
        if let Err(err) = r {
            self.errors
                .with_label_values(&[op, err.metric_kind()])
                .inc();
        }
    }
}

impl Instrumented {
    pub fn new(
        inner: Arc<dyn InstanceSet>,
        registry: &prometheus::Registry,
    ) -> Result<Instrumented, prometheus::Error> {
        let ops = crate::metrics::registered(
            registry,
            IntCounterVec::new(
                crate::metrics::dispatchcloud_opts(
                    "driver_operations",
                    "Number of instance-create/list/destroy/settags operations performed",
                ),
                &["operation", "error"],
            )?,
        )?;
        let errors = crate::metrics::registered(
            registry,
            IntCounterVec::new(
                crate::metrics::dispatchcloud_opts(
                    "driver_errors_total",
                    "Number of failed instance-create/list/destroy/settags operations, by kind of error.",
                ),
                &["operation", "kind"],
            )?,
        )?;
        for op in OPERATIONS {
            for e in ["0", "1"] {
                ops.with_label_values(&[op, e]);
            }
            for k in CloudError::METRIC_KINDS {
                errors.with_label_values(&[op, k]);
            }
        }
        Ok(Instrumented {
            inner,
            counters: Counters { ops, errors },
        })
    }
}

/// What a wrapper does around an instance's own cloud calls (SetTags, Destroy).
trait Hook: Send + Sync + std::fmt::Debug + 'static {
    fn around<'a>(
        &'a self,
        op: &'static str,
        call: BoxFuture<'a, Result<(), CloudError>>,
    ) -> BoxFuture<'a, Result<(), CloudError>>;
    /// Around `verify_host_key` (passed through unless a hook says otherwise).
    fn around_verify<'a>(
        &'a self,
        call: BoxFuture<'a, Result<(), CloudError>>,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        call
    }
}

/// An instance whose SetTags and Destroy go through a [`Hook`]; everything else passes through.
#[derive(Debug)]
struct Hooked<H: Hook> {
    inner: Arc<dyn Instance>,
    hook: H,
}

fn hooked<H: Hook + Clone>(inner: Arc<dyn Instance>, hook: &H) -> Arc<dyn Instance> {
    Arc::new(Hooked {
        inner,
        hook: hook.clone(),
    })
}

impl<H: Hook> Instance for Hooked<H> {
    fn id(&self) -> InstanceId {
        self.inner.id()
    }
    fn provider_type(&self) -> String {
        self.inner.provider_type()
    }
    fn tags(&self) -> InstanceTags {
        self.inner.tags()
    }
    fn address(&self) -> String {
        self.inner.address()
    }
    fn remote_user(&self) -> String {
        self.inner.remote_user()
    }
    fn set_tags(&self, tags: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>> {
        self.hook.around("SetTags", self.inner.set_tags(tags))
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>> {
        self.hook.around("Destroy", self.inner.destroy())
    }
    fn price_history(&self, it: &InstanceType) -> Vec<InstancePrice> {
        self.inner.price_history(it)
    }
    fn verify_host_key(&self, key: &str) -> BoxFuture<'_, Result<(), CloudError>> {
        self.hook.around_verify(self.inner.verify_host_key(key))
    }
    fn interruption_notice(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.inner.interruption_notice()
    }
}

/// Counts each call in `driver_operations` and `driver_errors_total`.
#[derive(Debug, Clone)]
struct Counting(Counters);

impl Hook for Counting {
    fn around<'a>(
        &'a self,
        op: &'static str,
        call: BoxFuture<'a, Result<(), CloudError>>,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async move {
            let r = call.await;
            self.0.count(op, &r);
            r
        })
    }
}

impl InstanceSet for Instrumented {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        let it = it.clone();
        Box::pin(async move {
            let r = self.inner.create(&it, req).await;
            self.counters.count("Create", &r);
            r.map(|i| hooked(i, &Counting(self.counters.clone())))
        })
    }
    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let filter = filter.clone();
        Box::pin(async move {
            let r = self.inner.instances(&filter).await;
            self.counters.count("List", &r);
            let hook = Counting(self.counters.clone());
            r.map(|v| v.into_iter().map(|i| hooked(i, &hook)).collect())
        })
    }
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        self.inner.instance_quota_group(it)
    }
    fn zones(&self) -> Vec<String> {
        self.inner.zones()
    }
    fn watch_interruptions(&self) {
        self.inner.watch_interruptions()
    }
    fn stop(&self) {
        self.inner.stop()
    }
}

// ---------------------------------------------------------------------------------------------
// Deadline

/// Every call ends within its deadline: a driver (or cloud endpoint) that accepts a request
/// and never answers cannot hold a create slot, the sync loop or a shutdown forever. A call
/// that runs out of time fails with [`CloudError::deadline_exceeded`] (outcome unknown: the
/// pool keeps a timed-out create's place until the cloud list says whether the VM exists).
pub struct Deadline {
    inner: Arc<dyn InstanceSet>,
    /// For create (which waits for the VM to be accepted, so it may take longer).
    create: Duration,
    /// For everything else.
    other: Duration,
}

impl Deadline {
    pub fn new(inner: Arc<dyn InstanceSet>, create: Duration, other: Duration) -> Deadline {
        Deadline {
            inner,
            create,
            other,
        }
    }
}

async fn within<T>(
    op: &'static str,
    d: Duration,
    call: impl std::future::Future<Output = Result<T, CloudError>>,
) -> Result<T, CloudError> {
    match tokio::time::timeout(d, call).await {
        Ok(r) => r,
        Err(_) => Err(CloudError::deadline_exceeded(op, d)),
    }
}

/// Puts the deadline on an instance's own calls.
#[derive(Debug, Clone)]
struct Timed(Duration);

impl Hook for Timed {
    fn around<'a>(
        &'a self,
        op: &'static str,
        call: BoxFuture<'a, Result<(), CloudError>>,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(within(op, self.0, call))
    }
    fn around_verify<'a>(
        &'a self,
        call: BoxFuture<'a, Result<(), CloudError>>,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(within("VerifyHostKey", self.0, call))
    }
}

impl InstanceSet for Deadline {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        let it = it.clone();
        Box::pin(async move {
            let i = within("Create", self.create, self.inner.create(&it, req)).await?;
            Ok(hooked(i, &Timed(self.other)))
        })
    }
    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let filter = filter.clone();
        Box::pin(async move {
            let v = within("List", self.other, self.inner.instances(&filter)).await?;
            let hook = Timed(self.other);
            Ok(v.into_iter().map(|i| hooked(i, &hook)).collect())
        })
    }
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        self.inner.instance_quota_group(it)
    }
    fn zones(&self) -> Vec<String> {
        self.inner.zones()
    }
    fn watch_interruptions(&self) {
        self.inner.watch_interruptions()
    }
    fn stop(&self) {
        self.inner.stop()
    }
}

// ---------------------------------------------------------------------------------------------
// RateLimited

/// Hands out call slots `1/N` seconds apart, first come first served (a burst of destroys
/// queues behind a list that asked earlier, never ahead of it). Idle time does not
/// accumulate into a burst.
#[derive(Debug)]
pub struct Pacer {
    period: Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl Pacer {
    pub fn new(ops_per_second: f64) -> Pacer {
        Pacer {
            period: Duration::from_secs_f64(1.0 / ops_per_second.max(1e-9)),
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Wait for this call's slot.
    pub async fn wait(&self) {
        let slot = {
            // tokio's Mutex is fair: waiters get it in the order they asked.
            let mut next = self.next.lock().await;
            let slot = (*next).max(tokio::time::Instant::now());
            *next = slot + self.period;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// Paces List, Create, Destroy and SetTags calls (`CloudVMs.MaxCloudOpsPerSecond`).
pub struct RateLimited {
    inner: Arc<dyn InstanceSet>,
    pacer: Arc<Pacer>,
}

impl RateLimited {
    pub fn new(inner: Arc<dyn InstanceSet>, ops_per_second: f64) -> RateLimited {
        RateLimited {
            inner,
            pacer: Arc::new(Pacer::new(ops_per_second)),
        }
    }
}

/// Waits for a pacing slot before each call.
#[derive(Debug, Clone)]
struct Paced(Arc<Pacer>);

impl Hook for Paced {
    fn around<'a>(
        &'a self,
        _op: &'static str,
        call: BoxFuture<'a, Result<(), CloudError>>,
    ) -> BoxFuture<'a, Result<(), CloudError>> {
        Box::pin(async move {
            self.0.wait().await;
            call.await
        })
    }
}

impl InstanceSet for RateLimited {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        let it = it.clone();
        Box::pin(async move {
            self.pacer.wait().await;
            let i = self.inner.create(&it, req).await?;
            Ok(hooked(i, &Paced(self.pacer.clone())))
        })
    }
    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let filter = filter.clone();
        Box::pin(async move {
            self.pacer.wait().await;
            let v = self.inner.instances(&filter).await?;
            let hook = Paced(self.pacer.clone());
            Ok(v.into_iter().map(|i| hooked(i, &hook)).collect())
        })
    }
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        self.inner.instance_quota_group(it)
    }
    fn zones(&self) -> Vec<String> {
        self.inner.zones()
    }
    fn watch_interruptions(&self) {
        self.inner.watch_interruptions()
    }
    fn stop(&self) {
        self.inner.stop()
    }
}

// ---------------------------------------------------------------------------------------------
// DefaultTags and Filtering

/// Adds `CloudVMs.ResourceTags` to every create; explicit tags win on a key collision.
pub struct DefaultTags {
    inner: Arc<dyn InstanceSet>,
    defaults: InstanceTags,
}

impl DefaultTags {
    pub fn new(inner: Arc<dyn InstanceSet>, defaults: InstanceTags) -> DefaultTags {
        DefaultTags { inner, defaults }
    }
}

impl InstanceSet for DefaultTags {
    fn create(
        &self,
        it: &InstanceType,
        mut req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        let mut tags = self.defaults.clone();
        tags.append(&mut req.tags);
        req.tags = tags;
        self.inner.create(it, req)
    }
    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        self.inner.instances(filter)
    }
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        self.inner.instance_quota_group(it)
    }
    fn zones(&self) -> Vec<String> {
        self.inner.zones()
    }
    fn watch_interruptions(&self) {
        self.inner.watch_interruptions()
    }
    fn stop(&self) {
        self.inner.stop()
    }
}

/// Drops instances whose tags lack any requested key/value (drivers may ignore the filter).
pub struct Filtering {
    inner: Arc<dyn InstanceSet>,
}

impl Filtering {
    pub fn new(inner: Arc<dyn InstanceSet>) -> Filtering {
        Filtering { inner }
    }
}

impl InstanceSet for Filtering {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        self.inner.create(it, req)
    }
    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let filter = filter.clone();
        Box::pin(async move {
            let v = self.inner.instances(&filter).await?;
            Ok(v.into_iter()
                .filter(|i| {
                    let tags = i.tags();
                    filter.iter().all(|(k, v)| tags.get(k) == Some(v))
                })
                .collect())
        })
    }
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        self.inner.instance_quota_group(it)
    }
    fn zones(&self) -> Vec<String> {
        self.inner.zones()
    }
    fn watch_interruptions(&self) {
        self.inner.watch_interruptions()
    }
    fn stop(&self) {
        self.inner.stop()
    }
}

// ---------------------------------------------------------------------------------------------
// Throttled

/// A reactive hold-off (spec §2.7 `throttle`): "suspended until T".
#[derive(Debug, Default)]
pub struct HoldOff {
    until: Mutex<Option<(SystemTime, String)>>,
}

impl HoldOff {
    /// Suspend until `t` with this message.
    pub fn error_until(&self, t: SystemTime, message: String) {
        *self.until.lock() = Some((t, message));
    }

    /// Lift any suspension now.
    pub fn clear(&self) {
        *self.until.lock() = None;
    }

    /// Record a rate-limit error whose earliest retry is in the future; returns whether it
    /// was one.
    pub fn check_rate_limit_error(&self, err: &CloudError) -> bool {
        let Some(t) = err.earliest_retry() else {
            return false;
        };
        let Ok(d) = t.duration_since(SystemTime::now()) else {
            return false;
        };
        let until = chrono::DateTime::<chrono::Utc>::from(t);
        let msg = format!(
            "remote calls are suspended for {:?}, until {}",
            Duration::from_millis(d.as_millis() as u64),
            until.to_rfc3339()
        );
        tracing::warn!("{msg}");
        self.error_until(t, msg);
        true
    }

    /// The hold-off error while it lasts; clears itself afterwards.
    pub fn error(&self) -> Option<CloudError> {
        let mut g = self.until.lock();
        match &*g {
            Some((t, msg)) if SystemTime::now() <= *t => Some(CloudError {
                kind: crate::ErrorKind::RateLimit { earliest_retry: *t },
                message: msg.clone(),
                also_retry_after: None,
                outcome_unknown: false,
                zone_specific: false,
            }),
            Some(_) => {
                *g = None;
                None
            }
            None => None,
        }
    }
}

/// Creates and lists fail fast, without reaching the driver, while a rate-limit error from
/// the same category of call says to wait.
pub struct Throttled {
    inner: Arc<dyn InstanceSet>,
    pub create: Arc<HoldOff>,
    pub list: Arc<HoldOff>,
}

impl Throttled {
    pub fn new(inner: Arc<dyn InstanceSet>) -> Throttled {
        Throttled {
            inner,
            create: Arc::new(HoldOff::default()),
            list: Arc::new(HoldOff::default()),
        }
    }
}

impl InstanceSet for Throttled {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        let it = it.clone();
        Box::pin(async move {
            if let Some(e) = self.create.error() {
                return Err(e);
            }
            let r = self.inner.create(&it, req).await;
            if let Err(e) = &r {
                self.create.check_rate_limit_error(e);
            }
            r
        })
    }
    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let filter = filter.clone();
        Box::pin(async move {
            if let Some(e) = self.list.error() {
                return Err(e);
            }
            let r = self.inner.instances(&filter).await;
            if let Err(e) = &r {
                self.list.check_rate_limit_error(e);
            }
            r
        })
    }
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        self.inner.instance_quota_group(it)
    }
    fn zones(&self) -> Vec<String> {
        self.inner.zones()
    }
    fn watch_interruptions(&self) {
        self.inner.watch_interruptions()
    }
    fn stop(&self) {
        self.inner.stop()
    }
}

#[cfg(test)]
mod tests;
