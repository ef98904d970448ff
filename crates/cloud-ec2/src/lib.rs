//! The EC2 driver (`Driver: ec2`): creates, tags, lists and destroys VMs through `aws-sdk-ec2`
//! exactly as the Go driver does, and classifies EC2 errors into the `cloud` crate's kinds.
//! Depends only on `cloud` and the AWS SDK.
//!
//! Status: the parts that need no SDK are done and tested — `DriverParameters` (`params`),
//! error classification and the subnet fail-over predicate (`errors`), quota groups
//! (`quota_group`) and key-pair fingerprints (`fingerprint`). The SDK calls (RunInstances with
//! subnet fail-over, DescribeInstances, CreateTags, TerminateInstances, key pairs, spot price
//! history), the metrics, and the moto-based conformance tests are still to come.

pub mod errors;
pub mod fingerprint;
pub mod params;
pub mod quota_group;
