//! `crunch-dispatch-local`: a dispatcher that runs `crunch-run` on the local host, built on the
//! generic `dispatch` library. It owns the local process bookkeeping (start, signal, reap) and
//! the resource accounting of the one host it runs on.
//!
//! Status: not yet implemented (see the generic dispatcher issue).
