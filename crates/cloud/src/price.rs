//! Price history normalisation (spec §2.8).

use crate::InstancePrice;

/// Newest first, one point per price change: sort by start time (newest first), then drop a
/// point when the next (older) one has the same start time or the same price, so a run of
/// equal prices keeps only its oldest point.
pub fn normalize_price_history(prices: &[InstancePrice]) -> Vec<InstancePrice> {
    let mut v = prices.to_vec();
    v.sort_by_key(|p| std::cmp::Reverse(p.start_time));
    let mut out = Vec::with_capacity(v.len());
    for (i, p) in v.iter().enumerate() {
        if let Some(next) = v.get(i + 1)
            && (next.start_time == p.start_time || next.price == p.price)
        {
            continue;
        }
        out.push(p.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone, Utc};

    #[test]
    fn ac_price_1_normalise() {
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let p = |m: i64, price: f64| InstancePrice {
            start_time: t + Duration::minutes(m),
            price,
        };
        let input = [
            p(1, 1.0),
            p(4, 1.2),
            p(5, 1.1),
            p(3, 1.2),
            p(5, 1.1),
            p(2, 1.0),
        ];
        assert_eq!(
            normalize_price_history(&input),
            vec![p(5, 1.1), p(3, 1.2), p(1, 1.0)]
        );
        assert!(normalize_price_history(&[]).is_empty());
        let json = serde_json::to_string(&p(0, 0.5)).unwrap();
        assert_eq!(json, r#"{"StartTime":"2026-01-01T00:00:00Z","Price":0.5}"#);
    }
}
