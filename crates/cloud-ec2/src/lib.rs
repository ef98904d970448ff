//! The EC2 driver (`Driver: ec2`): creates, tags, lists and destroys VMs through `aws-sdk-ec2`
//! exactly as the Go driver does, and classifies EC2 errors into the `cloud` crate's kinds.
//! Depends only on `cloud` and the AWS SDK.
//!
//! Status: not yet implemented (see the EC2 driver issue).
