//! `gcloud` as a second client of `testkit::fake_gce`: Google's own CLI creates, lists
//! (zonal and aggregated, with a label filter), describes, labels and deletes instances on the
//! fake, and sees exactly what the GCE driver made, and the driver sees what gcloud made. If
//! gcloud and the fake disagree, the fake is wrong. gcloud is part of this machine image: a
//! missing gcloud fails under `CI`, and is skipped loudly elsewhere.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use arvados::InstanceType;
use cloud::{CreateRequest, InstanceSet, InstanceTags};
use cloud_gce::GceSet;
use cloud_gce::params::GceParams;
use serde_json::{Value, json};
use testkit::fake_gce::{FakeGce, FakeGceConfig};

struct Gcloud {
    config: tempfile::TempDir,
}

impl Gcloud {
    fn new(api_root: &str) -> Option<Gcloud> {
        let ok = Command::new("gcloud")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                std::env::var_os("CI").is_none(),
                "gcloud is missing in CI: this machine image is known to have it"
            );
            eprintln!(
                "SKIPPED: gcloud is not installed (it cannot be installed from the registries)"
            );
            return None;
        }
        let g = Gcloud {
            config: tempfile::tempdir().unwrap(),
        };
        for (k, v) in [
            ("api_endpoint_overrides/compute", api_root),
            ("auth/disable_credentials", "true"),
            ("core/project", "proj"),
            ("core/disable_usage_reporting", "true"),
            ("component_manager/disable_update_check", "true"),
        ] {
            g.run(&["config", "set", k, v]);
        }
        Some(g)
    }

    /// Run gcloud; its stdout (it must succeed).
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("gcloud")
            .args(args)
            .env("CLOUDSDK_CONFIG", self.config.path())
            .env("CLOUDSDK_CORE_DISABLE_PROMPTS", "1")
            // Never the metadata server: a closed loopback port.
            .env("GCE_METADATA_HOST", "127.0.0.1:9")
            .env("GCE_METADATA_IP", "127.0.0.1:9")
            .env("NO_GCE_CHECK", "True")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gcloud {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--format=json");
        serde_json::from_str(&self.run(&a)).unwrap()
    }
}

fn names(list: &Value) -> Vec<String> {
    let mut n: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcloud_and_the_driver_see_the_same_instances_on_the_fake() {
    let fake = FakeGce::start(FakeGceConfig {
        project: "proj".into(),
        zones: vec!["us-central1-a".into(), "us-central1-b".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let Some(g) = Gcloud::new(&fake.api_root()) else {
        return;
    };
    let set: Arc<dyn InstanceSet> = Arc::new(
        GceSet::new(
            GceParams::from_params(&json!({
                "Project": "proj", "Zones": ["us-central1-a", "us-central1-b"],
                "Endpoint": fake.endpoint(), "AnonymousCredentials": true,
            }))
            .unwrap(),
            &"isid".to_string(),
            None,
        )
        .unwrap(),
    );
    let mine = |pairs: &[(&str, &str)]| -> InstanceTags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let tags = mine(&[
        ("ArvadosInstanceSetID", "isid"),
        ("ArvadosInstanceType", "Small One"),
        ("Owner", "Ada Lovelace"),
    ]);
    let it = InstanceType {
        name: "Small One".into(),
        provider_type: "e2-small".into(),
        ..Default::default()
    };
    let ours = set
        .create(
            &it,
            CreateRequest {
                image_id: "projects/proj/global/images/arvados".into(),
                tags: tags.clone(),
                init_command: "#!/bin/sh\ntrue\n".into(),
                public_key: None,
                zone: None,
            },
        )
        .await
        .unwrap();
    let ours_name = ours.id().split('/').nth(1).unwrap().to_string();

    // gcloud creates one with the same InstanceSetID, as a label and the tag metadata.
    let dir = tempfile::tempdir().unwrap();
    let tag_file = dir.path().join("tags.json");
    let theirs_tags = mine(&[("ArvadosInstanceSetID", "isid"), ("Made By", "gcloud")]);
    std::fs::write(&tag_file, serde_json::to_string(&theirs_tags).unwrap()).unwrap();
    g.run(&[
        "compute",
        "instances",
        "create",
        "from-gcloud",
        "--zone",
        "us-central1-b",
        "--machine-type",
        "e2-medium",
        "--image",
        "projects/proj/global/images/arvados",
        "--labels",
        "arvadosinstancesetid=isid,made_by=gcloud",
        "--metadata",
        "startup-script=true",
        &format!("--metadata-from-file=arvados-tags={}", path(&tag_file)),
    ]);

    // gcloud lists both, zonal and aggregated, with a label filter.
    let all = g.json(&[
        "compute",
        "instances",
        "list",
        "--filter=labels.arvadosinstancesetid=isid",
    ]);
    assert_eq!(names(&all), {
        let mut v = vec!["from-gcloud".to_string(), ours_name.clone()];
        v.sort();
        v
    });
    let zonal = g.json(&["compute", "instances", "list", "--zones", "us-central1-a"]);
    assert_eq!(names(&zonal), vec![ours_name.clone()]);
    // …and describes ours exactly as the driver made it: the tags in metadata, the labels.
    let d = g.json(&[
        "compute",
        "instances",
        "describe",
        &ours_name,
        "--zone",
        "us-central1-a",
    ]);
    let md: Vec<&Value> = d["metadata"]["items"].as_array().unwrap().iter().collect();
    let tag_item = md.iter().find(|i| i["key"] == "arvados-tags").unwrap();
    let seen: InstanceTags = serde_json::from_str(tag_item["value"].as_str().unwrap()).unwrap();
    assert_eq!(seen, tags);
    assert_eq!(d["labels"]["arvadosinstancesetid"], "isid");
    assert!(
        d["machineType"]
            .as_str()
            .unwrap()
            .ends_with("/machineTypes/e2-small")
    );

    // The driver sees gcloud's, with its exact tags.
    let mut filter = InstanceTags::new();
    filter.insert("ArvadosInstanceSetID".into(), "isid".into());
    let listed = set.instances(&filter).await.unwrap();
    let theirs = listed
        .iter()
        .find(|i| i.id() == "us-central1-b/from-gcloud")
        .expect("the driver lists gcloud's instance");
    assert_eq!(theirs.tags(), theirs_tags);
    assert_eq!(theirs.provider_type(), "e2-medium");

    // gcloud labels ours (new fingerprint); the driver still sets tags, gcloud sees both.
    g.run(&[
        "compute",
        "instances",
        "add-labels",
        &ours_name,
        "--zone",
        "us-central1-a",
        "--labels",
        "cost_center=42",
    ]);
    let mut newer = tags.clone();
    newer.insert("ArvadosIdleBehavior".into(), "drain".into());
    ours.set_tags(newer.clone()).await.unwrap();
    let d = g.json(&[
        "compute",
        "instances",
        "describe",
        &ours_name,
        "--zone",
        "us-central1-a",
    ]);
    assert_eq!(d["labels"]["arvadosidlebehavior"], "drain");
    // The driver's labels are its tags' (plus the operator's); gcloud's extra label is replaced.
    assert!(d["labels"].get("cost_center").is_none(), "{}", d["labels"]);

    // Each deletes the other's.
    g.run(&[
        "compute",
        "instances",
        "delete",
        &ours_name,
        "--zone",
        "us-central1-a",
        "--quiet",
    ]);
    theirs.destroy().await.unwrap();
    assert!(set.instances(&filter).await.unwrap().is_empty());
    assert_eq!(
        names(&g.json(&["compute", "instances", "list"])),
        Vec::<String>::new()
    );
    assert!(fake.instances().is_empty());
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
