//! `DriverParameters` of the EC2 driver (spec §3.1), with Arvados' defaults. Every bad value
//! is an error naming `DriverParameters.<Key>`.

use std::collections::BTreeMap;
use std::time::Duration;

use cloud::CloudError;
use serde_json::Value;

/// `Debug` shows no credentials.
#[derive(Clone, PartialEq)]
pub struct Ec2Params {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
    pub security_group_ids: Vec<String>,
    /// Subnets to try in turn; empty: AWS chooses.
    pub subnet_ids: Vec<String>,
    pub admin_username: String,
    pub ebs_volume_type: String,
    pub ebs_price: f64,
    pub iam_instance_profile: String,
    /// 0 disables spot price lookups.
    pub spot_price_update_interval: Duration,
    /// Provider-type prefix (lower case) → quota group.
    pub instance_type_quota_groups: BTreeMap<String, String>,
    /// Endpoint override (tests: moto on 127.0.0.1).
    pub endpoint: Option<String>,
}

impl std::fmt::Debug for Ec2Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |s: &str| if s.is_empty() { "" } else { "[redacted]" };
        f.debug_struct("Ec2Params")
            .field("access_key_id", &redacted(&self.access_key_id))
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("region", &self.region)
            .field("security_group_ids", &self.security_group_ids)
            .field("subnet_ids", &self.subnet_ids)
            .field("admin_username", &self.admin_username)
            .field("ebs_volume_type", &self.ebs_volume_type)
            .field("ebs_price", &self.ebs_price)
            .field("iam_instance_profile", &self.iam_instance_profile)
            .field(
                "spot_price_update_interval",
                &self.spot_price_update_interval,
            )
            .field(
                "instance_type_quota_groups",
                &self.instance_type_quota_groups,
            )
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

fn bad(key: &str, why: impl std::fmt::Display) -> CloudError {
    CloudError::other(format!("DriverParameters.{key}: {why}"))
}

fn string(p: &Value, key: &str, default: &str) -> Result<String, CloudError> {
    match p.get(key) {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(key, "not a string")),
    }
}

/// `SubnetID`: a string or a list of strings; `""` and `[]` mean none (AC-EC2-1).
pub fn subnet_ids(v: Option<&Value>) -> Result<Vec<String>, CloudError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .ok_or_else(|| bad("SubnetID", "list entries must be strings"))
            })
            .collect(),
        Some(_) => Err(bad("SubnetID", "must be a string or a list of strings")),
    }
}

impl Ec2Params {
    pub fn from_params(p: &Value) -> Result<Ec2Params, CloudError> {
        if !p.is_null() && !p.is_object() {
            return Err(CloudError::other("DriverParameters: not a map"));
        }
        let security_group_ids = match p.get("SecurityGroupIDs") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => m.keys().cloned().collect(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(String::from)
                        .ok_or_else(|| bad("SecurityGroupIDs", "entries must be strings"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("SecurityGroupIDs", "must be a map or a list")),
        };
        let ebs_price = match p.get("EBSPrice") {
            None | Some(Value::Null) => 0.10,
            Some(v) => v.as_f64().ok_or_else(|| bad("EBSPrice", "not a number"))?,
        };
        let spot_price_update_interval = match p.get("SpotPriceUpdateInterval") {
            None | Some(Value::Null) => Duration::from_secs(24 * 3600),
            Some(Value::String(s)) => arvados::config::units::parse_duration(s)
                .map_err(|e| bad("SpotPriceUpdateInterval", e))?,
            Some(_) => return Err(bad("SpotPriceUpdateInterval", "not a duration string")),
        };
        let mut instance_type_quota_groups = BTreeMap::new();
        match p.get("InstanceTypeQuotaGroups") {
            None | Some(Value::Null) => {
                for k in ["a", "c", "d", "h", "i", "m", "r", "t", "z"] {
                    instance_type_quota_groups.insert(k.to_string(), "standard".to_string());
                }
                instance_type_quota_groups.insert("vt".into(), "g".into());
                instance_type_quota_groups.insert("p5".into(), "p5".into());
            }
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let key = format!("InstanceTypeQuotaGroups.{k}");
                    if k.chars().any(|c| c.is_uppercase()) {
                        return Err(bad(&key, "keys must be lower case"));
                    }
                    let v = v.as_str().ok_or_else(|| bad(&key, "not a string"))?;
                    instance_type_quota_groups.insert(k.clone(), v.to_string());
                }
            }
            Some(_) => return Err(bad("InstanceTypeQuotaGroups", "not a map")),
        }
        let ebs_volume_type = string(p, "EBSVolumeType", "gp2")?;
        let endpoint = string(p, "Endpoint", "")?;
        Ok(Ec2Params {
            access_key_id: string(p, "AccessKeyID", "")?,
            secret_access_key: string(p, "SecretAccessKey", "")?,
            region: string(p, "Region", "")?,
            security_group_ids,
            subnet_ids: subnet_ids(p.get("SubnetID"))?,
            admin_username: string(p, "AdminUsername", "crunch")?,
            ebs_volume_type: if ebs_volume_type.is_empty() {
                "gp2".into()
            } else {
                ebs_volume_type
            },
            ebs_price,
            iam_instance_profile: string(p, "IAMInstanceProfile", "")?,
            spot_price_update_interval,
            instance_type_quota_groups,
            endpoint: (!endpoint.is_empty()).then_some(endpoint),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn debug_shows_no_credentials() {
        let p = Ec2Params::from_params(&json!({
            "AccessKeyID": "AKIDEXAMPLE", "SecretAccessKey": "wJalrXUtnFEMI-secret", "Region": "us-east-1"
        }))
        .unwrap();
        let text = format!("{p:?}");
        assert!(
            !text.contains("AKIDEXAMPLE") && !text.contains("wJalrXUtnFEMI"),
            "{text}"
        );
        assert!(text.contains("us-east-1"));
    }

    #[test]
    fn ac_ec2_1_subnet_id_is_a_string_or_a_list() {
        let cases = [
            (json!(null), vec![]),
            (json!(""), vec![]),
            (json!([]), vec![]),
            (json!("foo"), vec!["foo"]),
            (json!(["foo"]), vec!["foo"]),
            (json!(["foo", "bar"]), vec!["foo", "bar"]),
            (json!(["foo-bar", "baz"]), vec!["foo-bar", "baz"]),
        ];
        for (v, want) in cases {
            let got = subnet_ids(Some(&v)).unwrap();
            assert_eq!(got, want, "{v}");
        }
        // The YAML forms, through the config loader's YAML → JSON path.
        for (yaml, want) in [
            ("[foo]", vec!["foo"]),
            ("[foo-bar, baz]", vec!["foo-bar", "baz"]),
            ("\"\"", vec![]),
        ] {
            let v: serde_norway::Value = serde_norway::from_str(yaml).unwrap();
            let v = serde_json::to_value(v).unwrap();
            assert_eq!(subnet_ids(Some(&v)).unwrap(), want, "{yaml}");
        }
        assert!(
            subnet_ids(Some(&json!(7)))
                .unwrap_err()
                .to_string()
                .starts_with("DriverParameters.SubnetID")
        );
    }

    #[test]
    fn defaults_are_arvados_and_bad_values_name_their_key() {
        let p = Ec2Params::from_params(&json!({})).unwrap();
        assert_eq!(
            (
                p.admin_username.as_str(),
                p.ebs_volume_type.as_str(),
                p.ebs_price
            ),
            ("crunch", "gp2", 0.10)
        );
        assert_eq!(p.spot_price_update_interval, Duration::from_secs(86400));
        assert_eq!(p.instance_type_quota_groups["m"], "standard");
        assert_eq!(p.instance_type_quota_groups["p5"], "p5");
        let p = Ec2Params::from_params(&json!({"SecurityGroupIDs": {"sg-1": {}, "sg-2": {}}, "SubnetID": "s-1", "Region": "us-east-1"})).unwrap();
        assert_eq!(p.security_group_ids, ["sg-1", "sg-2"]);
        assert_eq!(p.subnet_ids, ["s-1"]);
        for (params, key) in [
            (json!({"EBSPrice": "cheap"}), "DriverParameters.EBSPrice"),
            (
                json!({"SpotPriceUpdateInterval": "often"}),
                "DriverParameters.SpotPriceUpdateInterval",
            ),
            (
                json!({"InstanceTypeQuotaGroups": {"M": "standard"}}),
                "DriverParameters.InstanceTypeQuotaGroups.M",
            ),
            (json!({"Region": 5}), "DriverParameters.Region"),
        ] {
            let e = Ec2Params::from_params(&params).unwrap_err().to_string();
            assert!(e.starts_with(key), "{e}");
        }
    }
}
