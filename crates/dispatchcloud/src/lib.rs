//! The cloud dispatcher proper: container queue, instance-type choice, scheduler, worker pool,
//! SSH executor, management API and metrics, and the service wiring that joins them. It reaches
//! Arvados through the `arvados` crate and clouds only through the `cloud` traits; it never
//! imports a concrete driver.
//!
//! Modules: instance-type choice (`node_size`), the container queue (`queue`), the scheduler
//! (`scheduler`, against the narrow `scheduler::pool::WorkerPool` interface), the SSH executor
//! (`ssh_executor`), the worker pool (`worker`), worker states and their transitions
//! (`worker_state`, shared by the scheduler and the pool), the service wiring and management API
//! (`service`), and `cloudtest`.

pub mod cloudtest;
pub mod events;
pub mod fasthash;
pub mod node_size;
pub mod queue;
pub mod scheduler;
pub mod service;
pub mod settings;
pub mod ssh_executor;
pub mod tasks;
pub mod worker;
pub mod worker_state;
