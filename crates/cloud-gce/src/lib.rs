//! The Google Compute Engine driver (`Driver: gce`), built on `google-cloud-compute-v1` and
//! `google-cloud-auth`. Depends only on `cloud` and the Google client libraries.
//!
//! * [`params`]: `DriverParameters` (annotated in `config/gce.yml`).
//! * [`errors`]: error classification (rate limit, quota, capacity per type or quota group),
//!   pure and tested row by row.
//! * [`labels`]: Arvados tags as metadata (exact) and labels (filterable).
//! * [`driver`]: the instance set: create with zone fail-over and idempotent `requestId`,
//!   waiting for the operation; list; set tags with fingerprints; destroy.
//!
//! Its test backend is `testkit::fake_gce`, a fake Compute Engine that `gcloud` also accepts.

pub mod driver;
pub mod errors;
pub mod labels;
pub mod params;

pub use driver::{GceDriver, GceSet};
