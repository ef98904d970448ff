//! `InstanceQuotaGroup` for EC2 (spec §3.8): the provider type's alphabetic prefix, replaced by
//! the longest configured prefix at least that long; `-spot` for preemptible types.

use std::collections::BTreeMap;

pub fn quota_group(
    provider_type: &str,
    preemptible: bool,
    groups: &BTreeMap<String, String>,
) -> String {
    let pt = provider_type.to_lowercase();
    let mut group = String::new();
    let mut prefix_known = false;
    for (i, c) in pt.char_indices() {
        if !prefix_known && !c.is_ascii_lowercase() {
            group = pt[..i].to_string();
            prefix_known = true;
        }
        if prefix_known && let Some(g) = groups.get(&pt[..i]).filter(|g| !g.is_empty()) {
            group = g.clone();
        }
    }
    if preemptible {
        group.push_str("-spot");
    }
    group
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ac_ec2_10_quota_groups() {
        let groups: BTreeMap<String, String> = [
            ("a", "standard"),
            ("m", "standard"),
            ("t", "standard"),
            ("p5", "p5"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let cases = [
            ("g1.large", false, "g"),
            ("x1.large", false, "x"),
            ("inf1.2xlarge", false, "inf"),
            ("a1.small", false, "standard"),
            ("m1.xlarge", false, "standard"),
            ("m1.xlarge", true, "standard-spot"),
            ("p4.xlarge", true, "p-spot"),
            ("p5.xlarge", true, "p5-spot"),
            ("t3.2xlarge", false, "standard"),
            ("trn1.2xlarge", false, "trn"),
            ("trn1.2xlarge", true, "trn-spot"),
            ("imaginary9.5xlarge", false, "imaginary"),
            ("", false, ""),
        ];
        for (pt, spot, want) in cases {
            assert_eq!(quota_group(pt, spot, &groups), want, "{pt} spot={spot}");
        }
    }
}
