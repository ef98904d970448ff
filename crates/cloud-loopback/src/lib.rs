//! The loopback driver (`Driver: loopback`): one "instance" that is the dispatcher's own host,
//! reached through a local SSH server, with a synthesized `localhost` instance type.
//! Depends only on `cloud`.
//!
//! Status: not yet implemented (see the cloud driver layer issue).
