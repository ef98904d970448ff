//! The conformance suite every driver runs (against its own test backend): create → listed
//! with its tags → set tags visible → reachable over SSH where the driver gives addresses →
//! destroy → gone; tag filtering through the wrapper stack; quota groups; and every error kind
//! the driver's test backend can provoke surfaces typed ([`ErrorCase`]). Each check failure
//! is returned as a message naming the step, so a driver's test just asserts `Ok`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arvados::InstanceType;

use crate::wrappers::Filtering;
use crate::{BoxFuture, CloudError, CreateRequest, ErrorKind, InstanceSet, InstanceTags};

/// The error kind a provoked failure must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// A rate-limit error with an earliest retry in the future.
    RateLimit,
    Quota,
    /// A capacity error for one instance type.
    CapacityInstanceType,
    /// A capacity error for one quota group.
    CapacityQuotaGroup,
    /// A capacity error for every type.
    CapacityAll,
    Other,
}

impl Want {
    fn matches(self, e: &CloudError) -> bool {
        match self {
            Want::RateLimit => e
                .earliest_retry()
                .is_some_and(|t| t > std::time::SystemTime::now()),
            Want::Quota => e.is_quota(),
            Want::CapacityInstanceType => e.is_instance_type_specific(),
            Want::CapacityQuotaGroup => e.is_quota_group_specific(),
            Want::CapacityAll => matches!(
                e.kind,
                ErrorKind::Capacity {
                    instance_type_specific: false,
                    quota_group_specific: false
                }
            ),
            Want::Other => e.kind == ErrorKind::Other,
        }
    }
}

/// One way the backend can be made to fail, and the kind the driver must report.
pub struct ErrorCase {
    pub name: &'static str,
    pub want: Want,
    /// Make the backend fail one call and return that call's result.
    pub provoke: Box<dyn Fn() -> BoxFuture<'static, Result<(), CloudError>> + Send + Sync>,
}

/// How the suite reaches a VM over SSH: given an address, whether a command ran there.
pub type Reach = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// What the suite needs from the caller.
pub struct Suite {
    pub set: Arc<dyn InstanceSet>,
    /// An instance type the backend can create.
    pub instance_type: InstanceType,
    /// Extra fields for create (image, public key…).
    pub request: CreateRequest,
    /// `None` if the driver's VMs are not reachable in this test.
    pub reach: Option<Reach>,
    /// How long to wait for a VM to become reachable or to disappear.
    pub patience: Duration,
    /// Failures the backend can provoke; each must surface with its kind.
    pub error_cases: Vec<ErrorCase>,
}

fn tags(pairs: &[(&str, &str)]) -> InstanceTags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Run every check; the first failure ends the run.
pub async fn run(s: Suite) -> Result<(), String> {
    let set = &s.set;
    let mine = tags(&[("ArvadosInstanceSetID", "conformance"), ("purpose", "test")]);
    let mut req = s.request.clone();
    req.tags.extend(mine.clone());
    let vm = set
        .create(&s.instance_type, req)
        .await
        .map_err(|e| format!("create: {e}"))?;
    let id = vm.id();

    // Listed, with its tags.
    let listed = set
        .instances(&InstanceTags::new())
        .await
        .map_err(|e| format!("list: {e}"))?;
    let found = listed
        .iter()
        .find(|i| i.id() == id)
        .ok_or_else(|| format!("list: created instance {id} not listed"))?;
    for (k, v) in &mine {
        if found.tags().get(k) != Some(v) {
            return Err(format!(
                "list: tag {k}={v} missing on {id}: {:?}",
                found.tags()
            ));
        }
    }
    if found.provider_type() != s.instance_type.provider_type {
        return Err(format!(
            "list: provider type {:?}, want {:?}",
            found.provider_type(),
            s.instance_type.provider_type
        ));
    }

    // Set tags: visible on a fresh list.
    let mut newer = found.tags();
    newer.insert("ArvadosIdleBehavior".into(), "hold".into());
    found
        .set_tags(newer)
        .await
        .map_err(|e| format!("set tags: {e}"))?;
    let relisted = set
        .instances(&InstanceTags::new())
        .await
        .map_err(|e| format!("list after set tags: {e}"))?;
    let again = relisted
        .iter()
        .find(|i| i.id() == id)
        .ok_or("list after set tags: instance gone")?;
    if again.tags().get("ArvadosIdleBehavior").map(String::as_str) != Some("hold") {
        return Err(format!("set tags: not visible: {:?}", again.tags()));
    }

    // Filtering drops foreign instances.
    let filtered = Filtering::new(set.clone())
        .instances(&tags(&[("ArvadosInstanceSetID", "someone-else")]))
        .await
        .map_err(|e| format!("filtered list: {e}"))?;
    if filtered.iter().any(|i| i.id() == id) {
        return Err("filtering: a foreign filter still returned our instance".into());
    }

    // Reachable over SSH where the driver gives an address.
    if let Some(reach) = &s.reach {
        let deadline = tokio::time::Instant::now() + s.patience;
        loop {
            let addr = again.address();
            if !addr.is_empty() && reach(addr).await {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("ssh: {id} not reachable within {:?}", s.patience));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Quota groups: stable per type, preemptible variants apart.
    let g1 = set.instance_quota_group(&s.instance_type);
    if g1 != set.instance_quota_group(&s.instance_type) {
        return Err("quota group: not stable".into());
    }

    // Destroy: gone.
    again.destroy().await.map_err(|e| format!("destroy: {e}"))?;
    let deadline = tokio::time::Instant::now() + s.patience;
    loop {
        let left = set
            .instances(&InstanceTags::new())
            .await
            .map_err(|e| format!("list after destroy: {e}"))?;
        if !left.iter().any(|i| i.id() == id) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("destroy: {id} still listed after {:?}", s.patience));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each provoked failure surfaces with its kind.
    for case in &s.error_cases {
        match (case.provoke)().await {
            Ok(()) => return Err(format!("error kinds: {}: the call succeeded", case.name)),
            Err(e) if case.want.matches(&e) => {}
            Err(e) => {
                return Err(format!(
                    "error kinds: {}: want {:?}, got {:?} ({e})",
                    case.name, case.want, e.kind
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn wanted_kinds_match_only_their_errors() {
        let soon = SystemTime::now() + Duration::from_secs(60);
        let cap = |t, g| {
            CloudError::new(
                ErrorKind::Capacity {
                    instance_type_specific: t,
                    quota_group_specific: g,
                },
                "no capacity",
            )
        };
        let errors = [
            (
                Want::RateLimit,
                CloudError::new(
                    ErrorKind::RateLimit {
                        earliest_retry: soon,
                    },
                    "slow",
                ),
            ),
            (Want::Quota, CloudError::new(ErrorKind::Quota, "quota")),
            (Want::CapacityInstanceType, cap(true, false)),
            (Want::CapacityQuotaGroup, cap(false, true)),
            (Want::CapacityAll, cap(false, false)),
            (Want::Other, CloudError::other("boom")),
        ];
        for (want, _) in &errors {
            for (kind, e) in &errors {
                assert_eq!(want.matches(e), want == kind, "{want:?} vs {kind:?}");
            }
        }
        let past = CloudError::new(
            ErrorKind::RateLimit {
                earliest_retry: SystemTime::now() - Duration::from_secs(1),
            },
            "stale",
        );
        assert!(
            !Want::RateLimit.matches(&past),
            "a retry time in the past is no rate limit"
        );
    }
}
