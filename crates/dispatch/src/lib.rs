//! The generic dispatcher library: the Rust counterpart of Arvados' Go `sdk/go/dispatch`.
//!
//! It owns the poll → lock → track loop that any container dispatcher (local, SLURM, LSF, …)
//! needs: polling the Arvados API for Queued containers and for containers locked by its own
//! token, locking them, running one tracker per container and feeding it updated records.
//! It talks to Arvados only through the `arvados` crate's API client and knows nothing about
//! clouds or VMs.
//!
//! Status: not yet implemented (see the generic dispatcher issue).
