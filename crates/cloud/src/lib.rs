//! The cloud driver layer: the `InstanceSet`/`Instance` traits every provider driver implements,
//! the error kinds the worker pool reacts to (rate limit, quota, capacity), the dispatcher's tag
//! keys and instance-secret user data, and the wrapper stack (instrumentation, rate limiting,
//! default tags, tag filtering, reactive hold-offs). It never imports a driver and never
//! imports the scheduler.
//!
//! * [`error`]: [`CloudError`] and its kinds (spec §2.5).
//! * [`tags`]: tag keys, InstanceSetID derivation (§11.3), instance secrets and user data
//!   (Appendix D).
//! * [`metrics`]: the per-place instance and start counters every driver exports.
//! * [`price`]: price history normalisation (§2.8).
//! * [`wrappers`]: the stack of §1.5 and the hold-offs of §2.7.
//! * [`registry`]: driver names → factories.
//! * [`conformance`]: the suite every driver runs.
//! * [`sshd`]: an in-process SSH server (and a one-shot client) for local and stub VMs.
//!
//! `cloudtest`, which uses this layer end to end, lives in `dispatchcloud::cloudtest` (it needs
//! the SSH executor).

pub mod conformance;
pub mod error;
pub mod metrics;
pub mod price;
pub mod registry;
pub mod sshd;
pub mod tags;
pub mod wrappers;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arvados::InstanceType;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use error::{CloudError, ErrorKind};

/// A boxed future, so the traits below can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Identifier of this dispatcher's set of cloud resources (a tag value).
pub type InstanceSetId = String;
/// The provider's stable id of a VM.
pub type InstanceId = String;
/// Tags on a VM.
pub type InstanceTags = BTreeMap<String, String>;

/// One point of price history. JSON names are Arvados' (`StartTime`, `Price`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstancePrice {
    #[serde(rename = "StartTime")]
    pub start_time: DateTime<Utc>,
    #[serde(rename = "Price")]
    pub price: f64,
}

/// What `InstanceSet::create` needs besides the type.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub image_id: String,
    pub tags: InstanceTags,
    /// Shell script to run at first boot.
    pub init_command: String,
    /// OpenSSH-format public key to authorise for the remote user, if any.
    pub public_key: Option<String>,
    /// Create in this zone only (one of [`InstanceSet::zones`]), with no fail-over to
    /// another. `None`: the driver chooses, as Arvados' drivers do.
    pub zone: Option<String>,
}

/// One VM: a possibly stale snapshot plus control operations.
pub trait Instance: Send + Sync + std::fmt::Debug {
    fn id(&self) -> InstanceId;
    fn provider_type(&self) -> String;
    fn tags(&self) -> InstanceTags;
    /// `host` or `host:port` for SSH; empty while unknown.
    fn address(&self) -> String;
    fn remote_user(&self) -> String;
    fn set_tags(&self, tags: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>>;
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>>;
    /// Recent prices, newest first; may be empty.
    fn price_history(&self, it: &InstanceType) -> Vec<InstancePrice>;
    /// Whether `key` (OpenSSH format) is this VM's host key. `ErrorKind::NotImplemented`
    /// makes the pool fall back to the instance-secret check.
    fn verify_host_key(&self, key: &str) -> BoxFuture<'_, Result<(), CloudError>>;
    /// When the cloud announced, as of the list this snapshot came from, that it will take
    /// this VM back (a spot interruption; EC2: its spot request marked for termination).
    /// `None` when it has not, or when its set does not watch
    /// ([`InstanceSet::watch_interruptions`]).
    fn interruption_notice(&self) -> Option<DateTime<Utc>> {
        None
    }
}

/// The VMs of one dispatcher in one cloud account. All methods are safe to call concurrently.
pub trait InstanceSet: Send + Sync {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>>;
    /// All instances (booting and shutting-down ones too), optionally filtered by tags.
    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>>;
    /// Bucket of provider quota shared by several instance types.
    fn instance_quota_group(&self, it: &InstanceType) -> String;
    /// The places a create may be pinned to with [`CreateRequest::zone`] (EC2: the configured
    /// subnets), in the operator's order of preference. Empty (the default): the driver has
    /// one place, or cannot be told which.
    fn zones(&self) -> Vec<String> {
        Vec::new()
    }
    /// From now on, have each listed instance say whether the cloud announced its
    /// interruption ([`Instance::interruption_notice`]). It may cost the driver a call per
    /// list (EC2: `DescribeSpotInstanceRequests`). Default: the driver cannot tell.
    fn watch_interruptions(&self) {}
    fn stop(&self);
}

/// A driver: makes an [`InstanceSet`] from `DriverParameters`.
pub trait Driver: Send + Sync {
    fn instance_set(
        &self,
        params: &serde_json::Value,
        id: &InstanceSetId,
        shared_tags: &InstanceTags,
    ) -> Result<Arc<dyn InstanceSet>, CloudError>;

    /// Like [`Driver::instance_set`], registering the driver's own metrics (if it has any)
    /// in `registry`.
    fn instance_set_with_metrics(
        &self,
        params: &serde_json::Value,
        id: &InstanceSetId,
        shared_tags: &InstanceTags,
        registry: &prometheus::Registry,
    ) -> Result<Arc<dyn InstanceSet>, CloudError> {
        let _ = registry;
        self.instance_set(params, id, shared_tags)
    }
}
