//! EC2 error classification (spec §3.6) on an API error's code and message, so it can be
//! tested without the SDK: throttling → rate limit with a growing back-off, quota codes,
//! capacity codes (per type, or per quota group for `VcpuLimitExceeded`), and the
//! subnet-specific predicate that drives subnet fail-over.

use cloud::{CloudError, ErrorKind};

/// The AWS SDKs' default list of throttling error codes.
const THROTTLE: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "TransactionInProgressException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "LimitExceededException",
    "RequestThrottled",
    "SlowDown",
    "PriorRequestNotComplete",
    "EC2ThrottledException",
];

const QUOTA: &[&str] = &[
    "InstanceLimitExceeded",
    "InsufficientAddressCapacity",
    "InsufficientFreeAddressesInSubnet",
    "InsufficientVolumeCapacity",
    "MaxSpotInstanceCountExceeded",
];

/// An EC2 API error: code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

pub use cloud::error::Backoff;

/// Classify an API error (or a transport error: `None`, kept as "other" with `text`).
pub fn classify(err: Option<&ApiError>, text: &str, backoff: &Backoff) -> CloudError {
    let Some(e) = err else {
        backoff.reset();
        return CloudError::other(text);
    };
    let code = e.code.as_str();
    if THROTTLE.contains(&code) {
        return backoff.rate_limited(text);
    }
    backoff.reset();
    if QUOTA.contains(&code) {
        return CloudError::new(ErrorKind::Quota, text);
    }
    if let Some(kind) = capacity_kind(e) {
        return CloudError::new(kind, text);
    }
    CloudError::other(text)
}

/// Whether a failed RunInstances may still have made an instance: no API answer at all
/// (timeout, connection lost), or EC2's internal errors.
pub fn outcome_unknown(err: Option<&ApiError>) -> bool {
    match err {
        None => true,
        Some(e) => matches!(
            e.code.as_str(),
            "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable"
        ),
    }
}

/// The capacity error kind of an API error, if it is one: per quota group for
/// `VcpuLimitExceeded`, per instance type for `InsufficientInstanceCapacity` and for
/// `Unsupported` instance types.
pub fn capacity_kind(e: &ApiError) -> Option<ErrorKind> {
    let code = e.code.as_str();
    if code == "VcpuLimitExceeded" {
        return Some(ErrorKind::Capacity {
            instance_type_specific: false,
            quota_group_specific: true,
        });
    }
    (code == "InsufficientInstanceCapacity"
        || (code == "Unsupported" && e.message.contains("requested instance type")))
    .then_some(ErrorKind::Capacity {
        instance_type_specific: true,
        quota_group_specific: false,
    })
}

/// Whether another subnet might succeed where this one failed.
pub fn is_subnet_specific(err: Option<&ApiError>) -> bool {
    let Some(e) = err else {
        return false;
    };
    let code = e.code.as_str();
    if code.contains("Subnet")
        || matches!(
            code,
            "InsufficientInstanceCapacity" | "InsufficientVolumeCapacity" | "Unsupported"
        )
    {
        return true;
    }
    code.contains("InvalidParameter") && {
        let m = &e.message;
        m.contains(" subnet ")
            || m.contains("sufficient free Ipv4 addresses")
            || m.contains("sufficient free ipv4 addresses")
            || m.contains("sufficient free Ipv6 addresses")
            || m.contains("sufficient free ipv6 addresses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn unanswered_and_internal_errors_leave_the_create_outcome_unknown() {
        let e = |code: &str| ApiError {
            code: code.into(),
            message: "m".into(),
        };
        assert!(outcome_unknown(None));
        assert!(outcome_unknown(Some(&e("InternalError"))));
        assert!(outcome_unknown(Some(&e("ServiceUnavailable"))));
        assert!(!outcome_unknown(Some(&e("InsufficientInstanceCapacity"))));
        assert!(!outcome_unknown(Some(&e("InvalidParameterValue"))));
    }

    fn api(code: &str, message: &str) -> ApiError {
        ApiError {
            code: code.into(),
            message: message.into(),
        }
    }

    #[test]
    fn ac_ec2_6_subnet_specific_errors() {
        assert!(!is_subnet_specific(None));
        assert!(!is_subnet_specific(Some(&api(
            "SomethingElse",
            "plain error"
        ))));
        for code in [
            "InsufficientInstanceCapacity",
            "InsufficientVolumeCapacity",
            "InsufficientFreeAddressesInSubnet",
        ] {
            assert!(is_subnet_specific(Some(&api(code, "x"))), "{code}");
        }
        assert!(is_subnet_specific(Some(&api(
            "InvalidParameterValue",
            "Not enough free addresses in subnet subnet-x"
        ))));
        for code in [
            "Client.InvalidParameterValue",
            "InvalidParameterValue",
            "ClientInvalidParameterValue",
        ] {
            assert!(
                is_subnet_specific(Some(&api(
                    code,
                    "There aren't sufficient free Ipv4 addresses or prefixes"
                ))),
                "{code}"
            );
        }
        assert!(!is_subnet_specific(Some(&api(
            "InvalidParameterValue",
            "Some other invalid parameter error"
        ))));
    }

    #[test]
    fn ac_ec2_9_error_kinds() {
        let b = Backoff::default();
        let e = classify(Some(&api("Throttling", "slow down")), "slow down", &b);
        let retry = e.earliest_retry().expect("rate limit");
        assert!(retry > SystemTime::now());
        assert!(classify(Some(&api("InstanceLimitExceeded", "q")), "q", &b).is_quota());
        let cap = classify(Some(&api("InsufficientInstanceCapacity", "c")), "c", &b);
        assert!(cap.is_instance_type_specific());
        let unsupported = classify(
            Some(&api(
                "Unsupported",
                "Your requested instance type (t3.micro) is not supported in your requested Availability Zone (us-east-1e).",
            )),
            "u",
            &b,
        );
        assert!(unsupported.is_instance_type_specific());
        assert!(classify(Some(&api("VcpuLimitExceeded", "v")), "v", &b).is_quota_group_specific());
        assert_eq!(
            classify(Some(&api("AuthFailure", "a")), "a", &b).kind,
            ErrorKind::Other
        );
        assert_eq!(
            classify(None, "connection refused", &b).kind,
            ErrorKind::Other
        );
    }

    #[test]
    fn throttle_backoff_grows_to_a_minute_and_resets() {
        let b = Backoff::default();
        let mut seen = Vec::new();
        for _ in 0..12 {
            classify(Some(&api("RequestLimitExceeded", "r")), "r", &b);
            seen.push(b.current());
        }
        assert_eq!(seen[0], Duration::from_secs(1));
        assert_eq!(seen[1], Duration::from_millis(2500));
        assert_eq!(seen[2], Duration::from_millis(4750));
        assert_eq!(*seen.last().unwrap(), Duration::from_secs(60));
        classify(Some(&api("AuthFailure", "a")), "a", &b);
        assert_eq!(b.current(), Duration::ZERO);
    }
}
