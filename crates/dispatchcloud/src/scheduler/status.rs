//! Scheduling status of a queued container, as shown by the management API (spec §7.4). Kept
//! as a small value and rendered to Arvados' exact text only when someone asks, so a pass over
//! 100 000 containers formats no strings.

use std::fmt;
use std::sync::Arc;

use arvados::types::ContainerState;

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Not waiting (Running, Complete, Cancelled containers, or not looked at).
    None,
    Preparing,
    PriorityZero(ContainerState),
    /// Over the supervisor limit; position among such containers.
    SupervisorLimit(usize),
    PreviousAttempt,
    NewInstance(Arc<str>),
    /// Every eligible type is at capacity; the eligible type names joined by ", ".
    AllTypesAtCapacity(usize, Arc<str>),
    CloudLimits(usize),
    ClusterCapacity(usize),
    /// Not in Arvados: a new instance of this type would pass the configured spend cap.
    SpendCap(usize, Arc<str>),
}

impl Status {
    pub fn is_none(&self) -> bool {
        matches!(self, Status::None)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::None => Ok(()),
            Status::Preparing => {
                f.write_str("Container is allocated to an instance and preparing to run.")
            }
            Status::PriorityZero(state) => write!(
                f,
                "This container will not be scheduled to run because its priority is 0 and state is {state}."
            ),
            Status::SupervisorLimit(n) => write!(
                f,
                "Waiting in workflow queue at position {n}.  Cluster is at capacity and cannot start any new workflows right now."
            ),
            Status::PreviousAttempt => {
                f.write_str("Waiting for previous container attempt to exit.")
            }
            Status::NewInstance(t) => write!(
                f,
                "Waiting for a {t} instance to boot and be ready to accept work."
            ),
            Status::AllTypesAtCapacity(n, types) => write!(
                f,
                "Waiting in queue at position {n}.  Cluster is at capacity for all eligible instance types ({types}) and cannot start a new instance right now."
            ),
            Status::CloudLimits(n) => write!(
                f,
                "Waiting in queue at position {n}.  Cluster is at cloud account limits and cannot start any new instances right now."
            ),
            Status::ClusterCapacity(n) => write!(
                f,
                "Waiting in queue at position {n}.  Cluster is at capacity and cannot start any new instances right now."
            ),
            Status::SpendCap(n, t) => write!(
                f,
                "Waiting in queue at position {n}.  A new {t} instance would exceed the configured spend cap (SpendCaps in the dispatcher's settings file)."
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_texts_are_arvados_exact_with_two_spaces() {
        assert_eq!(
            Status::AllTypesAtCapacity(3, "type4, type8".into()).to_string(),
            "Waiting in queue at position 3.  Cluster is at capacity for all eligible instance types (type4, type8) and cannot start a new instance right now."
        );
        assert_eq!(
            Status::PriorityZero(ContainerState::Locked).to_string(),
            "This container will not be scheduled to run because its priority is 0 and state is Locked."
        );
        assert_eq!(
            Status::NewInstance("m4".into()).to_string(),
            "Waiting for a m4 instance to boot and be ready to accept work."
        );
        assert_eq!(
            Status::SupervisorLimit(2).to_string(),
            "Waiting in workflow queue at position 2.  Cluster is at capacity and cannot start any new workflows right now."
        );
        assert_eq!(
            Status::CloudLimits(1).to_string(),
            "Waiting in queue at position 1.  Cluster is at cloud account limits and cannot start any new instances right now."
        );
        assert_eq!(
            Status::ClusterCapacity(7).to_string(),
            "Waiting in queue at position 7.  Cluster is at capacity and cannot start any new instances right now."
        );
        assert_eq!(Status::None.to_string(), "");
    }
}
