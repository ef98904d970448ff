//! The EC2 driver (`Driver: ec2`): creates, tags, lists and destroys VMs through `aws-sdk-ec2`
//! exactly as the Go driver does, and classifies EC2 errors into the `cloud` crate's kinds.
//! Depends only on `cloud` and the AWS SDK.
//!
//! * [`params`]: `DriverParameters` (§3.1).
//! * [`errors`]: error classification and the subnet fail-over predicate (§3.6), on an API
//!   error's code and message.
//! * [`quota_group`]: `InstanceQuotaGroup` (§3.8).
//! * [`fingerprint`]: key-pair fingerprints (§3.4).
//! * [`driver`]: the SDK calls — RunInstances with subnet fail-over, DescribeInstances,
//!   CreateTags, TerminateInstances, key pairs, spot price history — and the metrics.
//!
//! Tests: unit tests beside each module; `tests/moto.rs` against `moto_server` behind the
//! project's fault proxy (`testkit::moto`), including the conformance suite.

pub mod driver;
pub mod errors;
pub mod fingerprint;
pub mod params;
pub mod quota_group;

pub use driver::{Ec2Driver, Ec2Set};
