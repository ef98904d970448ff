//! Error kinds a driver reports and the pool reacts to (spec §2.5).

use std::time::SystemTime;

/// What kind of failure a cloud call met.
#[derive(Debug, Clone, PartialEq)]
pub enum ErrorKind {
    /// Slow down: do not retry this category of call before `earliest_retry`.
    RateLimit {
        earliest_retry: SystemTime,
    },
    /// The account's quota is reached.
    Quota,
    /// The provider has no capacity: for this instance type, for its quota group, or (neither)
    /// for all types.
    Capacity {
        instance_type_specific: bool,
        quota_group_specific: bool,
    },
    /// The driver has no mechanism for this (e.g. host key verification).
    NotImplemented,
    Other,
}

/// A failed cloud call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct CloudError {
    pub kind: ErrorKind,
    pub message: String,
    /// Also a rate-limit error (an error may be, say, a capacity error and ask to slow down).
    pub also_retry_after: Option<SystemTime>,
    /// The call may have taken effect although it failed (no answer within its deadline, a
    /// server error after the request was sent): a create may have made a VM.
    pub outcome_unknown: bool,
    /// The failure is the zone's (EC2: a subnet-specific error, such as no free addresses):
    /// another zone might succeed. Capacity errors of a create pinned to a zone count as
    /// the zone's without it.
    pub zone_specific: bool,
}

impl CloudError {
    /// The `kind` label values of `driver_errors_total`.
    pub const METRIC_KINDS: [&'static str; 6] = [
        "rate_limit",
        "quota",
        "capacity",
        "not_implemented",
        "outcome_unknown",
        "other",
    ];

    /// This error's `kind` label in `driver_errors_total`: its [`ErrorKind`], except that an
    /// unclassified error whose outcome is unknown (a timeout, a server error) is
    /// `outcome_unknown`.
    pub fn metric_kind(&self) -> &'static str {
        match self.kind {
            ErrorKind::RateLimit { .. } => "rate_limit",
            ErrorKind::Quota => "quota",
            ErrorKind::Capacity { .. } => "capacity",
            ErrorKind::NotImplemented => "not_implemented",
            ErrorKind::Other if self.outcome_unknown => "outcome_unknown",
            ErrorKind::Other => "other",
        }
    }

    pub fn new(kind: ErrorKind, message: impl Into<String>) -> CloudError {
        CloudError {
            kind,
            message: message.into(),
            also_retry_after: None,
            outcome_unknown: false,
            zone_specific: false,
        }
    }

    /// `op` got no answer within `deadline`; what it did is unknown.
    pub fn deadline_exceeded(op: &str, deadline: std::time::Duration) -> CloudError {
        CloudError {
            outcome_unknown: true,
            ..CloudError::other(format!(
                "{op}: no answer from the cloud within {deadline:?}"
            ))
        }
    }

    pub fn other(message: impl Into<String>) -> CloudError {
        CloudError::new(ErrorKind::Other, message)
    }

    pub fn not_implemented() -> CloudError {
        CloudError::new(ErrorKind::NotImplemented, "not implemented")
    }

    /// When a call of this category may be tried again, if this is a rate-limit error.
    pub fn earliest_retry(&self) -> Option<SystemTime> {
        match self.kind {
            ErrorKind::RateLimit { earliest_retry } => Some(earliest_retry),
            _ => self.also_retry_after,
        }
    }

    pub fn is_quota(&self) -> bool {
        self.kind == ErrorKind::Quota
    }

    pub fn is_capacity(&self) -> bool {
        matches!(self.kind, ErrorKind::Capacity { .. })
    }

    /// Capacity error for one instance type only.
    pub fn is_instance_type_specific(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Capacity {
                instance_type_specific: true,
                quota_group_specific: false
            }
        )
    }

    /// Capacity error for one quota group (implies not type-specific).
    pub fn is_quota_group_specific(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Capacity {
                quota_group_specific: true,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn kinds_answer_the_pools_questions() {
        let t = SystemTime::now() + Duration::from_secs(5);
        let rl = CloudError::new(ErrorKind::RateLimit { earliest_retry: t }, "slow down");
        assert_eq!(rl.earliest_retry(), Some(t));
        assert!(!rl.is_quota() && !rl.is_capacity());
        let q = CloudError::new(ErrorKind::Quota, "quota");
        assert!(q.is_quota() && q.earliest_retry().is_none());
        let group = CloudError::new(
            ErrorKind::Capacity {
                instance_type_specific: true,
                quota_group_specific: true,
            },
            "no capacity in group",
        );
        assert!(group.is_capacity() && group.is_quota_group_specific());
        assert!(
            !group.is_instance_type_specific(),
            "group-specific implies not type-specific"
        );
        let mut both = CloudError::new(
            ErrorKind::Capacity {
                instance_type_specific: true,
                quota_group_specific: false,
            },
            "no m5.large",
        );
        both.also_retry_after = Some(t);
        assert!(both.is_instance_type_specific() && both.earliest_retry() == Some(t));
        assert_eq!(CloudError::not_implemented().to_string(), "not implemented");
    }
}

/// The growing back-off after throttling errors of one category of call (create, list): a
/// driver asks it for the earliest retry of each rate-limit error it reports, and resets it
/// after any other answer.
#[derive(Debug, Default)]
pub struct Backoff(parking_lot::Mutex<std::time::Duration>);

impl Backoff {
    /// `d = previous × 3/2 + 1 s`, within [1 s, 60 s].
    pub fn grow(&self) -> std::time::Duration {
        use std::time::Duration;
        let mut d = self.0.lock();
        *d = (*d * 3 / 2 + Duration::from_secs(1))
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        *d
    }

    pub fn reset(&self) {
        *self.0.lock() = std::time::Duration::ZERO;
    }

    /// A rate-limit error saying `text`, retry allowed after the grown back-off.
    pub fn rate_limited(&self, text: impl Into<String>) -> CloudError {
        CloudError::new(
            ErrorKind::RateLimit {
                earliest_retry: SystemTime::now() + self.grow(),
            },
            text,
        )
    }

    /// The back-off the last rate-limit error got (zero after a reset).
    pub fn current(&self) -> std::time::Duration {
        *self.0.lock()
    }
}
