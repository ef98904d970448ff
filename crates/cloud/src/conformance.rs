//! The conformance suite every driver runs (against its own test backend): create → listed
//! with its tags → set tags visible → reachable over SSH where the driver gives addresses →
//! destroy → gone; tag filtering through the wrapper stack; quota groups. Each check failure
//! is returned as a message naming the step, so a driver's test just asserts `Ok`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arvados::InstanceType;

use crate::wrappers::Filtering;
use crate::{CreateRequest, InstanceSet, InstanceTags};

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
    Ok(())
}
