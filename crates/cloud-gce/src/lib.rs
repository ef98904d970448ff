//! The Google Compute Engine driver (`Driver: gce`), built on `google-cloud-compute-v1`.
//! Depends only on `cloud` and the Google client libraries.
//!
//! Status: not yet implemented.
