//! Wrapper tests against an in-memory instance set that records what reached it.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arvados::InstanceType;

use super::*;
use crate::registry::Registry;
use crate::{Driver, ErrorKind, InstanceSetId};

#[derive(Debug)]
struct MemInstance {
    id: String,
    tags: Mutex<InstanceTags>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Instance for MemInstance {
    fn id(&self) -> InstanceId {
        self.id.clone()
    }
    fn provider_type(&self) -> String {
        "mem".into()
    }
    fn tags(&self) -> InstanceTags {
        self.tags.lock().clone()
    }
    fn address(&self) -> String {
        String::new()
    }
    fn remote_user(&self) -> String {
        "root".into()
    }
    fn set_tags(&self, tags: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>> {
        self.log.lock().push(format!("settags {}", self.id));
        *self.tags.lock() = tags;
        Box::pin(async { Ok(()) })
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>> {
        self.log.lock().push(format!("destroy {}", self.id));
        Box::pin(async { Ok(()) })
    }
    fn price_history(&self, _: &InstanceType) -> Vec<InstancePrice> {
        Vec::new()
    }
    fn verify_host_key(&self, _: &str) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(async { Err(CloudError::not_implemented()) })
    }
    /// Instances whose id starts with `noticed` have a notice (at the Unix epoch).
    fn interruption_notice(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.id
            .starts_with("noticed")
            .then_some(chrono::DateTime::UNIX_EPOCH)
    }
}

/// Records calls; fails the next create/list with `fail_next` if set.
#[derive(Default)]
struct MemSet {
    log: Arc<Mutex<Vec<String>>>,
    instances: Mutex<Vec<Arc<MemInstance>>>,
    fail_next: Mutex<Option<CloudError>>,
}

impl MemSet {
    fn calls(&self) -> Vec<String> {
        self.log.lock().clone()
    }
    fn add(&self, id: &str, tags: &[(&str, &str)]) {
        self.instances.lock().push(Arc::new(MemInstance {
            id: id.into(),
            tags: Mutex::new(
                tags.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            log: self.log.clone(),
        }));
    }
}

impl InstanceSet for MemSet {
    fn create(
        &self,
        _it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        self.log.lock().push("create".into());
        let r = match self.fail_next.lock().take() {
            Some(e) => Err(e),
            None => {
                let n = self.instances.lock().len();
                let i = Arc::new(MemInstance {
                    id: format!("i-{n}"),
                    tags: Mutex::new(req.tags),
                    log: self.log.clone(),
                });
                self.instances.lock().push(i.clone());
                Ok(i as Arc<dyn Instance>)
            }
        };
        Box::pin(async move { r })
    }
    fn instances(
        &self,
        _filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        self.log.lock().push("list".into());
        let r = match self.fail_next.lock().take() {
            Some(e) => Err(e),
            None => Ok(self
                .instances
                .lock()
                .iter()
                .map(|i| i.clone() as Arc<dyn Instance>)
                .collect()),
        };
        Box::pin(async move { r })
    }
    fn instance_quota_group(&self, _: &InstanceType) -> String {
        String::new()
    }
    fn zones(&self) -> Vec<String> {
        vec!["z1".into(), "z2".into()]
    }
    fn watch_interruptions(&self) {
        self.log.lock().push("watch".into());
    }
    fn stop(&self) {}
}

fn tags(pairs: &[(&str, &str)]) -> InstanceTags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn throttled_fails_fast_until_the_earliest_retry() {
    let mem = Arc::new(MemSet::default());
    let set = Throttled::new(mem.clone());
    let retry = SystemTime::now() + Duration::from_millis(300);
    *mem.fail_next.lock() = Some(CloudError::new(
        ErrorKind::RateLimit {
            earliest_retry: retry,
        },
        "RequestLimitExceeded",
    ));
    let it = InstanceType::default();
    assert!(set.create(&it, CreateRequest::default()).await.is_err());
    // Held off: these never reach the driver.
    for _ in 0..3 {
        let e = set.create(&it, CreateRequest::default()).await.unwrap_err();
        assert!(
            e.message.starts_with("remote calls are suspended for"),
            "{e}"
        );
        assert_eq!(e.earliest_retry(), Some(retry));
    }
    assert_eq!(mem.calls(), vec!["create"]);
    // Lists are a separate category.
    assert!(set.instances(&InstanceTags::new()).await.is_ok());
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(set.create(&it, CreateRequest::default()).await.is_ok());
    assert_eq!(mem.calls(), vec!["create", "list", "create"]);
}

#[tokio::test]
async fn rate_limited_paces_and_is_fair_under_a_mixed_burst() {
    let mem = Arc::new(MemSet::default());
    for i in 0..6 {
        mem.add(&format!("d{i}"), &[]);
    }
    let set = Arc::new(RateLimited::new(mem.clone(), 20.0)); // 50 ms apart
    let all = set.instances(&InstanceTags::new()).await.unwrap();
    let t0 = tokio::time::Instant::now();
    // Six destroys, then a list asked for after them: the list waits its turn only.
    let mut tasks = Vec::new();
    for i in all {
        tasks.push(tokio::spawn(async move { i.destroy().await }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let s2 = set.clone();
    let list =
        tokio::spawn(async move { s2.instances(&InstanceTags::new()).await.map(|v| v.len()) });
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(list.await.unwrap().unwrap(), 6);
    let elapsed = t0.elapsed();
    // 1 list + 6 destroys + 1 list = 8 slots, 50 ms apart: the last at ≥ 350 ms.
    assert!(elapsed >= Duration::from_millis(340), "{elapsed:?}");
    let calls = mem.calls();
    assert_eq!(calls.len(), 8);
    assert_eq!(
        calls.last().unwrap(),
        "list",
        "the list is served after the earlier destroys, not starved"
    );
}

#[tokio::test]
async fn pacer_does_not_save_up_idle_time_into_a_burst() {
    let p = Pacer::new(10.0); // 100 ms
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = tokio::time::Instant::now();
    for _ in 0..3 {
        p.wait().await;
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(190),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test]
async fn default_tags_merge_with_explicit_tags_winning() {
    let mem = Arc::new(MemSet::default());
    let set = DefaultTags::new(mem.clone(), tags(&[("team", "bio"), ("Name", "default")]));
    let i = set
        .create(
            &InstanceType::default(),
            CreateRequest {
                tags: tags(&[("Name", "explicit"), ("ArvadosInstanceType", "m4")]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        i.tags(),
        tags(&[
            ("team", "bio"),
            ("Name", "explicit"),
            ("ArvadosInstanceType", "m4")
        ])
    );
}

#[tokio::test]
async fn filtering_drops_foreign_instances() {
    let mem = Arc::new(MemSet::default());
    mem.add("mine", &[("ArvadosInstanceSetID", "me"), ("x", "1")]);
    mem.add("theirs", &[("ArvadosInstanceSetID", "other")]);
    mem.add("untagged", &[]);
    let set = Filtering::new(mem.clone());
    let got: Vec<String> = set
        .instances(&tags(&[("ArvadosInstanceSetID", "me")]))
        .await
        .unwrap()
        .iter()
        .map(|i| i.id())
        .collect();
    assert_eq!(got, vec!["mine"]);
    assert_eq!(set.instances(&InstanceTags::new()).await.unwrap().len(), 3);
}

#[tokio::test]
async fn instrumented_counts_operations_with_error_label() {
    let mem = Arc::new(MemSet::default());
    let registry = prometheus::Registry::new();
    let set = Instrumented::new(mem.clone(), &registry).unwrap();
    let it = InstanceType::default();
    let i = set.create(&it, CreateRequest::default()).await.unwrap();
    i.set_tags(tags(&[("a", "b")])).await.unwrap();
    i.destroy().await.unwrap();
    *mem.fail_next.lock() = Some(CloudError::other("boom"));
    assert!(set.instances(&InstanceTags::new()).await.is_err());
    *mem.fail_next.lock() = Some(CloudError::deadline_exceeded(
        "List",
        std::time::Duration::from_secs(1),
    ));
    assert!(set.instances(&InstanceTags::new()).await.is_err());
    *mem.fail_next.lock() = Some(CloudError::new(ErrorKind::Quota, "full"));
    assert!(set.create(&it, CreateRequest::default()).await.is_err());
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    for line in [
        r#"arvados_dispatchcloud_driver_operations{error="0",operation="Create"} 1"#,
        r#"arvados_dispatchcloud_driver_operations{error="0",operation="SetTags"} 1"#,
        r#"arvados_dispatchcloud_driver_operations{error="0",operation="Destroy"} 1"#,
        r#"arvados_dispatchcloud_driver_operations{error="1",operation="List"} 2"#,
        r#"arvados_dispatchcloud_driver_operations{error="1",operation="Create"} 1"#,
        r#"arvados_dispatchcloud_driver_operations{error="1",operation="Destroy"} 0"#,
        r#"arvados_dispatchcloud_driver_errors_total{kind="other",operation="List"} 1"#,
        r#"arvados_dispatchcloud_driver_errors_total{kind="outcome_unknown",operation="List"} 1"#,
        r#"arvados_dispatchcloud_driver_errors_total{kind="quota",operation="Create"} 1"#,
        r#"arvados_dispatchcloud_driver_errors_total{kind="capacity",operation="Create"} 0"#,
        r#"arvados_dispatchcloud_driver_errors_total{kind="rate_limit",operation="SetTags"} 0"#,
    ] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
}

struct MemDriver;

impl Driver for MemDriver {
    fn instance_set(
        &self,
        _params: &serde_json::Value,
        _id: &InstanceSetId,
        _shared: &InstanceTags,
    ) -> Result<Arc<dyn InstanceSet>, CloudError> {
        Ok(Arc::new(MemSet::default()))
    }
}

#[test]
fn registry_names_drivers_and_rejects_unknown_ones() {
    let mut r = Registry::new();
    r.register("mem", Arc::new(MemDriver));
    assert!(r.get("mem").is_ok());
    let e = r.get("azure").err().unwrap();
    assert_eq!(e.to_string(), "unsupported cloud driver \"azure\"");
    assert_eq!(r.names(), vec!["mem"]);
}

/// The conformance suite notices a driver whose destroy leaves the instance listed.
#[tokio::test]
async fn conformance_suite_catches_a_destroy_that_does_nothing() {
    let mem = Arc::new(MemSet::default());
    let r = crate::conformance::run(crate::conformance::Suite {
        set: mem,
        instance_type: InstanceType {
            provider_type: "mem".into(),
            ..Default::default()
        },
        request: CreateRequest::default(),
        reach: None,
        patience: Duration::from_millis(200),
        error_cases: Vec::new(),
    })
    .await;
    let e = r.unwrap_err();
    assert!(e.starts_with("destroy: "), "{e}");
}

#[tokio::test]
async fn ac_thr_1_throttle_errors_until_then_clears() {
    let t = HoldOff::default();
    assert!(t.error().is_none(), "a new throttle has no error");
    t.error_until(SystemTime::now() + Duration::from_secs(1), "wait".into());
    assert!(t.error().is_some());
    t.clear();
    assert!(t.error().is_none());
    // The wake-up when a hold-off ends is the pool's (`notify_at`, a tracked task).
    t.error_until(
        SystemTime::now() + Duration::from_millis(1),
        "briefly".into(),
    );
    assert!(t.error().is_some());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(t.error().is_none());
}

/// A cloud that accepts every call and never answers.
struct Hanging;

impl InstanceSet for Hanging {
    fn create(
        &self,
        _: &InstanceType,
        _: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        Box::pin(std::future::pending())
    }
    fn instances(
        &self,
        _: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        Box::pin(std::future::pending())
    }
    fn instance_quota_group(&self, _: &InstanceType) -> String {
        String::new()
    }
    fn stop(&self) {}
}

#[tokio::test]
async fn deadline_ends_calls_a_hanging_cloud_never_answers() {
    let set = Deadline::new(
        Arc::new(Hanging),
        Duration::from_millis(400),
        Duration::from_millis(200),
    );
    let t0 = tokio::time::Instant::now();
    let err = set.instances(&InstanceTags::new()).await.unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert!(err.outcome_unknown, "{err:?}");
    assert!(err.to_string().starts_with("List: no answer"), "{err}");
    let t0 = tokio::time::Instant::now();
    let err = set
        .create(&InstanceType::default(), CreateRequest::default())
        .await
        .unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(400));
    assert!(err.outcome_unknown && err.to_string().starts_with("Create: "));
    // A plain error is not "outcome unknown".
    assert!(!CloudError::other("x").outcome_unknown);
}

/// Issue 19: zones, watching for interruptions and an instance's notice reach through the
/// whole wrapper stack (a wrapper that forgot one would answer with the trait's default).
#[tokio::test]
async fn zones_and_interruption_notices_pass_through_every_wrapper() {
    let mem = Arc::new(MemSet::default());
    mem.add("noticed-1", &[]);
    mem.add("calm-2", &[]);
    let registry = prometheus::Registry::new();
    let inner: Arc<dyn InstanceSet> = mem.clone();
    let set: Arc<dyn InstanceSet> = Arc::new(Instrumented::new(inner, &registry).unwrap());
    let set: Arc<dyn InstanceSet> = Arc::new(Deadline::new(
        set,
        Duration::from_secs(5),
        Duration::from_secs(5),
    ));
    let set: Arc<dyn InstanceSet> = Arc::new(RateLimited::new(set, 1000.0));
    let set: Arc<dyn InstanceSet> = Arc::new(DefaultTags::new(set, InstanceTags::new()));
    let set: Arc<dyn InstanceSet> = Arc::new(Filtering::new(set));
    let set = Throttled::new(set);
    assert_eq!(set.zones(), ["z1", "z2"]);
    set.watch_interruptions();
    assert_eq!(mem.calls().iter().filter(|c| *c == "watch").count(), 1);
    let mut noticed: Vec<(String, bool)> = set
        .instances(&InstanceTags::new())
        .await
        .unwrap()
        .iter()
        .map(|i| (i.id(), i.interruption_notice().is_some()))
        .collect();
    noticed.sort();
    assert_eq!(
        noticed,
        [
            ("calm-2".to_string(), false),
            ("noticed-1".to_string(), true)
        ]
    );
}
