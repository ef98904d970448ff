//! The cloud driver layer: the `InstanceSet`/`Instance` traits every provider driver implements,
//! the error kinds the worker pool reacts to (rate limit, quota, capacity), the dispatcher's tag
//! keys and instance-secret user data, and the wrapper stack (instrumentation, rate limiting,
//! default tags, tag filtering). It never imports a driver and never imports the scheduler.
//!
//! Status: not yet implemented (see the cloud driver layer issue).
