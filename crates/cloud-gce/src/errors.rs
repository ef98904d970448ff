//! GCE error classification, on what GCE sends (so it is tested without a client): errors on
//! the call itself (HTTP status and the `reason` of `error.errors[]`), and errors GCE reports
//! inside a finished operation (`error.errors[].code`, e.g. `QUOTA_EXCEEDED` with the quota's
//! metric in the message).
//!
//! | GCE says | kind |
//! |---|---|
//! | 403 `rateLimitExceeded` / `userRateLimitExceeded`, 429 | rate limit, growing back-off |
//! | 403 `quotaExceeded`; operation `QUOTA_EXCEEDED` for `CPUS`, `INSTANCES`, addresses, disks | quota (every type) |
//! | operation `QUOTA_EXCEEDED` for a family or class quota (`N2_CPUS`, `PREEMPTIBLE_CPUS`, `GPUS_ALL_REGIONS`, `NVIDIA_T4_GPUS`, …) | capacity of one quota group |
//! | operation `ZONE_RESOURCE_POOL_EXHAUSTED[_WITH_DETAILS]`, `RESOURCE_POOL_EXHAUSTED` | capacity of this type in this zone ([`is_zone_capacity`]: try the next zone) |
//! | 5xx, no answer | other, outcome unknown |
//! | anything else | other |

use std::time::SystemTime;

use cloud::error::Backoff;
use cloud::{CloudError, ErrorKind};

/// Quotas that bound every instance type: hitting one is "at quota".
const GLOBAL_QUOTAS: &[&str] = &[
    "CPUS",
    "CPUS_ALL_REGIONS",
    "INSTANCES",
    "IN_USE_ADDRESSES",
    "DISKS_TOTAL_GB",
    "SSD_TOTAL_GB",
    "LOCAL_SSD_TOTAL_GB",
];

/// An error on a call: HTTP status and the reasons GCE gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub reasons: Vec<String>,
    pub message: String,
}

impl HttpError {
    /// From a response body in GCE's error shape (anything else keeps only the status).
    pub fn parse(status: u16, body: &[u8]) -> HttpError {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let e = &v["error"];
        HttpError {
            status,
            reasons: e["errors"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x["reason"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            message: e["message"]
                .as_str()
                .map(String::from)
                .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect()),
        }
    }
}

/// Classify an error on a call.
pub fn classify_http(e: &HttpError, op: &str, backoff: &Backoff) -> CloudError {
    let text = format!("{op}: {} {}", e.status, e.message);
    let has = |r: &str| e.reasons.iter().any(|x| x == r);
    if e.status == 429
        || (e.status == 403 && (has("rateLimitExceeded") || has("userRateLimitExceeded")))
    {
        return backoff.rate_limited(text);
    }
    backoff.reset();
    if e.status == 403 && has("quotaExceeded") {
        return CloudError::new(ErrorKind::Quota, text);
    }
    if e.status >= 500 {
        return CloudError {
            outcome_unknown: true,
            ..CloudError::other(text)
        };
    }
    CloudError::other(text)
}

/// The quota metric named in a `QUOTA_EXCEEDED` message: `Quota 'N2_CPUS' exceeded. …`.
pub fn quota_metric(message: &str) -> Option<&str> {
    let rest = message.split("Quota '").nth(1)?;
    rest.split('\'').next()
}

/// A capacity shortage of this type in this zone: the next zone may have it.
pub fn is_zone_capacity(code: &str) -> bool {
    matches!(
        code,
        "ZONE_RESOURCE_POOL_EXHAUSTED"
            | "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"
            | "RESOURCE_POOL_EXHAUSTED"
    )
}

/// Classify an error GCE reported inside an operation (`code`, `message`).
pub fn classify_operation(code: &str, message: &str, op: &str) -> CloudError {
    let text = format!("{op}: {code}: {message}");
    if is_zone_capacity(code) {
        return CloudError::new(
            ErrorKind::Capacity {
                instance_type_specific: true,
                quota_group_specific: false,
            },
            text,
        );
    }
    if code == "QUOTA_EXCEEDED" {
        return match quota_metric(message) {
            Some(m) if !GLOBAL_QUOTAS.contains(&m) => CloudError::new(
                ErrorKind::Capacity {
                    instance_type_specific: false,
                    quota_group_specific: true,
                },
                text,
            ),
            _ => CloudError::new(ErrorKind::Quota, text),
        };
    }
    if code == "RATE_LIMIT_EXCEEDED" {
        return CloudError::new(
            ErrorKind::RateLimit {
                earliest_retry: SystemTime::now() + std::time::Duration::from_secs(1),
            },
            text,
        );
    }
    CloudError::other(text)
}

/// The quota group of a machine type: its family (`n2`, `c3d`, `e2`…), apart for spot VMs
/// (which GCE counts under `PREEMPTIBLE_*` quotas) and for GPUs.
pub fn quota_group(provider_type: &str, preemptible: bool, gpus: bool) -> String {
    let family = provider_type
        .split('-')
        .next()
        .unwrap_or(provider_type)
        .to_ascii_lowercase();
    let mut g = family;
    if gpus {
        g.push_str("-gpu");
    }
    if preemptible {
        g.push_str("-spot");
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, reason: &str) -> HttpError {
        HttpError::parse(
            status,
            format!(r#"{{"error":{{"code":{status},"message":"m","errors":[{{"reason":"{reason}","message":"m"}}]}}}}"#)
                .as_bytes(),
        )
    }

    fn kind(e: &CloudError) -> &'static str {
        match e.kind {
            ErrorKind::RateLimit { .. } => "rate",
            ErrorKind::Quota => "quota",
            ErrorKind::Capacity {
                instance_type_specific: true,
                ..
            } => "capacity-type",
            ErrorKind::Capacity {
                quota_group_specific: true,
                ..
            } => "capacity-group",
            ErrorKind::Capacity { .. } => "capacity-all",
            ErrorKind::NotImplemented => "n/a",
            ErrorKind::Other => "other",
        }
    }

    #[test]
    fn row_rate_limits_back_off_growing_and_reset() {
        let b = Backoff::default();
        for (status, reason) in [
            (403, "rateLimitExceeded"),
            (403, "userRateLimitExceeded"),
            (429, "RESOURCE_EXHAUSTED"),
        ] {
            let e = classify_http(&http(status, reason), "Create", &b);
            assert_eq!(kind(&e), "rate", "{status} {reason}");
            assert!(e.earliest_retry().unwrap() > SystemTime::now());
        }
        let third = b.grow();
        assert!(third > std::time::Duration::from_secs(3), "{third:?}");
        let _ = classify_http(&http(404, "notFound"), "Create", &b);
        assert_eq!(
            b.grow(),
            std::time::Duration::from_secs(1),
            "reset by another answer"
        );
    }

    #[test]
    fn row_quota_exceeded_on_the_call_is_quota() {
        let b = Backoff::default();
        assert_eq!(
            kind(&classify_http(&http(403, "quotaExceeded"), "Create", &b)),
            "quota"
        );
    }

    #[test]
    fn row_other_client_errors_are_other() {
        let b = Backoff::default();
        assert_eq!(
            kind(&classify_http(&http(403, "forbidden"), "Create", &b)),
            "other"
        );
        assert_eq!(
            kind(&classify_http(&http(400, "invalid"), "Create", &b)),
            "other"
        );
        let e = classify_http(&http(404, "notFound"), "Create", &b);
        assert_eq!(kind(&e), "other");
        assert!(!e.outcome_unknown);
        assert_eq!(
            kind(&classify_operation("RESOURCE_NOT_FOUND", "image", "Create")),
            "other"
        );
    }

    #[test]
    fn row_server_errors_leave_the_outcome_unknown() {
        let b = Backoff::default();
        for status in [500, 502, 503] {
            let e = classify_http(&http(status, "backendError"), "Create", &b);
            assert_eq!(kind(&e), "other");
            assert!(e.outcome_unknown, "{status}");
        }
    }

    fn quota(metric: &str) -> CloudError {
        classify_operation(
            "QUOTA_EXCEEDED",
            &format!("Quota '{metric}' exceeded.  Limit: 24.0 in region us-central1."),
            "Create",
        )
    }

    #[test]
    fn row_global_quotas_in_an_operation_are_quota() {
        for m in ["CPUS", "INSTANCES", "CPUS_ALL_REGIONS", "IN_USE_ADDRESSES"] {
            assert_eq!(kind(&quota(m)), "quota", "{m}");
        }
        assert_eq!(
            kind(&classify_operation("QUOTA_EXCEEDED", "no metric", "Create")),
            "quota"
        );
    }

    #[test]
    fn row_family_and_class_quotas_are_capacity_of_a_quota_group() {
        for m in [
            "N2_CPUS",
            "PREEMPTIBLE_CPUS",
            "GPUS_ALL_REGIONS",
            "NVIDIA_T4_GPUS",
            "C3D_CPUS",
        ] {
            assert_eq!(kind(&quota(m)), "capacity-group", "{m}");
        }
    }

    #[test]
    fn row_zone_resource_pool_exhausted_is_capacity_of_the_type_in_that_zone() {
        for c in [
            "ZONE_RESOURCE_POOL_EXHAUSTED",
            "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
        ] {
            assert_eq!(
                kind(&classify_operation(
                    c,
                    "The zone does not have enough resources",
                    "Create"
                )),
                "capacity-type"
            );
            assert!(is_zone_capacity(c));
        }
        assert!(!is_zone_capacity("QUOTA_EXCEEDED"));
    }

    #[test]
    fn quota_groups_by_family_spot_and_gpu() {
        assert_eq!(quota_group("n2-standard-8", false, false), "n2");
        assert_eq!(quota_group("n2-highmem-4", true, false), "n2-spot");
        assert_eq!(quota_group("n1-standard-8", false, true), "n1-gpu");
        assert_eq!(quota_group("c3d-standard-4", false, false), "c3d");
        assert_eq!(
            quota_metric("Quota 'N2_CPUS' exceeded. Limit"),
            Some("N2_CPUS")
        );
    }
}
