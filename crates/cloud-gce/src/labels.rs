//! Arvados tags on GCE VMs. Tag keys have capitals and values may be anything, which GCE labels
//! cannot hold, so every tag goes, exactly, into one metadata item ([`TAGS_ITEM`], a JSON
//! object); each tag is also a label in an encoded form, for the server-side filter on the
//! InstanceSetID and for people looking at the console. Lists are filtered on labels and then
//! checked against the exact tags.

use std::collections::BTreeMap;

use cloud::InstanceTags;

/// The metadata item holding the exact tags.
pub const TAGS_ITEM: &str = "arvados-tags";

/// A label key for a tag key: lower case, other characters as `_`, starting with a letter,
/// at most 63 characters.
pub fn label_key(tag_key: &str) -> String {
    let mut k: String = tag_key
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !k.starts_with(|c: char| c.is_ascii_lowercase()) {
        k.insert(0, 'k');
    }
    k.truncate(63);
    k
}

/// A label value for a tag value: itself if GCE allows it (lower-case letters, digits, `_`,
/// `-`, at most 63), else `h` and a 16-hex-digit hash (equal tags give equal labels; a hash
/// collision only costs the exact check a candidate).
pub fn label_value(v: &str) -> String {
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        return v.to_string();
    }
    format!("h{:016x}", cloud::tags::stable_hash(v, (0, 0)))
}

/// Labels for `tags`, plus `extra` (operator's labels; tags win on a clash).
pub fn labels(tags: &InstanceTags, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = extra.clone();
    for (k, v) in tags {
        out.insert(label_key(k), label_value(v));
    }
    out
}

/// The server-side filter for `filter` tags: `labels.K = "V" AND …`.
pub fn filter(filter: &InstanceTags) -> Option<String> {
    (!filter.is_empty()).then(|| {
        filter
            .iter()
            .map(|(k, v)| format!("labels.{} = \"{}\"", label_key(k), label_value(v)))
            .collect::<Vec<_>>()
            .join(" AND ")
    })
}

/// The exact tags from an instance's metadata items (JSON `[{key, value}]`).
pub fn tags_from_metadata(items: &serde_json::Value) -> InstanceTags {
    items
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["key"] == TAGS_ITEM)
        .and_then(|i| i["value"].as_str())
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn awkward_tags_round_trip_exactly_through_metadata() {
        let mut tags = InstanceTags::new();
        tags.insert(
            "ArvadosInstanceSetID".into(),
            "zzzzz-gj3su-0123456789abcde".into(),
        );
        tags.insert("Owner Name".into(), "Ada Lovelace".into());
        tags.insert("k=v".into(), "a=b=c".into());
        tags.insert("Ünïcødé".into(), "ß∂ƒ ☃".into());
        tags.insert("long".into(), "x".repeat(200));
        let item = serde_json::json!([
            {"key": "startup-script", "value": "#!/bin/sh"},
            {"key": TAGS_ITEM, "value": serde_json::to_string(&tags).unwrap()},
        ]);
        assert_eq!(tags_from_metadata(&item), tags);
        let l = labels(&tags, &BTreeMap::new());
        for (k, v) in &l {
            assert!(crate::params::is_label_key(k), "{k}");
            assert!(v.len() <= 63, "{v}");
        }
        assert_eq!(l["arvadosinstancesetid"], "zzzzz-gj3su-0123456789abcde");
        assert_eq!(label_value("Ada Lovelace"), label_value("Ada Lovelace"));
        assert_ne!(label_value("Ada Lovelace"), label_value("Ada Lovelac"));
        assert_eq!(label_key("9lives"), "k9lives");
        assert_eq!(
            filter(&[("ArvadosInstanceSetID".to_string(), "abc".to_string())].into()).unwrap(),
            "labels.arvadosinstancesetid = \"abc\""
        );
    }
}
