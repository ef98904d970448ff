//! The EC2 driver against `moto_server` on 127.0.0.1 (VPC 127.0.0.0/16, subnet 127.0.0.0/24, so
//! every instance address is on loopback), with the project's fault proxy in front of it for
//! the errors moto cannot make. Explicit credentials, region and endpoint: the SDK never
//! looks for a metadata service.

use std::sync::Arc;
use std::time::Duration;

use arvados::InstanceType;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use cloud::conformance::{ErrorCase, Want};
use cloud::{CreateRequest, InstanceSet, InstanceTags};
use cloud_ec2::Ec2Set;
use cloud_ec2::params::Ec2Params;
use serde_json::json;
use testkit::moto::{Ec2Fault, FaultProxy, Moto};

struct Rig {
    _moto: Moto,
    proxy: FaultProxy,
    subnets: Vec<String>,
    image: String,
}

async fn rig(subnet_cidrs: &[&str]) -> Option<Rig> {
    let Some(moto) = Moto::start().await else {
        assert!(
            std::env::var_os("CI").is_none(),
            "moto_server missing in CI: scripts/test installs it"
        );
        eprintln!("SKIPPED: moto_server is not installed (scripts/test installs it into .venv)");
        return None;
    };
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(&moto.url)
        .build();
    let ec2 = aws_sdk_ec2::Client::from_conf(conf);
    let vpc = ec2
        .create_vpc()
        .cidr_block("127.0.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_string();
    let mut subnets = Vec::new();
    for cidr in subnet_cidrs {
        let s = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(*cidr)
            .send()
            .await
            .unwrap();
        subnets.push(s.subnet().unwrap().subnet_id().unwrap().to_string());
    }
    let images = ec2.describe_images().send().await.unwrap();
    let image = images
        .images()
        .first()
        .unwrap()
        .image_id()
        .unwrap()
        .to_string();
    let proxy = FaultProxy::start(&moto.url).await;
    Some(Rig {
        _moto: moto,
        proxy,
        subnets,
        image,
    })
}

impl Rig {
    fn set(&self, subnets: &[String], registry: Option<&prometheus::Registry>) -> Arc<Ec2Set> {
        let params = Ec2Params::from_params(&json!({
            "AccessKeyID": "test", "SecretAccessKey": "test", "Region": "us-east-1",
            "SubnetID": subnets, "Endpoint": self.proxy.url, "AdminUsername": "crunch",
        }))
        .unwrap();
        Arc::new(Ec2Set::new(params, &"zzzzz-test".to_string(), registry).unwrap())
    }

    fn request(&self) -> CreateRequest {
        CreateRequest {
            image_id: self.image.clone(),
            tags: [("ArvadosInstanceSetID".to_string(), "zzzzz-test".to_string())].into(),
            init_command: "echo hi".into(),
            public_key: None,
            zone: None,
        }
    }
}

fn it(provider_type: &str) -> InstanceType {
    InstanceType {
        name: provider_type.into(),
        provider_type: provider_type.into(),
        vcpus: 2,
        ram: 4 << 30,
        price: 0.1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_passes_the_conformance_suite_against_moto() {
    let Some(r) = rig(&["127.0.0.0/24"]).await else {
        return;
    };
    let set = r.set(&r.subnets, None);
    let case = |name: &'static str, want: Want, code: &'static str, msg: &'static str| {
        let (set, proxy_faults, req) = (set.clone(), r.proxy.handle(), r.request());
        ErrorCase {
            name,
            want,
            provoke: Box::new(move || {
                let (set, faults, req) = (set.clone(), proxy_faults.clone(), req.clone());
                Box::pin(async move {
                    faults.inject(Ec2Fault::new("RunInstances", code, msg).once());
                    set.create(&it("t3.micro"), req).await.map(|_| ())
                })
            }),
        }
    };
    let error_cases = vec![
        case(
            "InsufficientInstanceCapacity",
            Want::CapacityInstanceType,
            "InsufficientInstanceCapacity",
            "none left",
        ),
        case(
            "VcpuLimitExceeded",
            Want::CapacityQuotaGroup,
            "VcpuLimitExceeded",
            "too many vcpus",
        ),
        case(
            "InstanceLimitExceeded",
            Want::Quota,
            "InstanceLimitExceeded",
            "quota",
        ),
        case(
            "RequestLimitExceeded",
            Want::RateLimit,
            "RequestLimitExceeded",
            "slow down",
        ),
    ];
    cloud::conformance::run(cloud::conformance::Suite {
        set: set.clone(),
        instance_type: it("t3.micro"),
        request: r.request(),
        reach: None,
        patience: Duration::from_secs(10),
        error_cases,
    })
    .await
    .unwrap();
}

/// Each injected RunInstances error surfaces as its kind, and is sent exactly once (no SDK
/// retries hiding it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors_surface_typed_and_are_sent_once() {
    let Some(r) = rig(&["127.0.0.0/24"]).await else {
        return;
    };
    let set = r.set(&r.subnets, None);
    type Check = fn(&cloud::CloudError) -> bool;
    let cases: [(&str, Check); 4] = [
        ("InsufficientInstanceCapacity", |e| {
            e.is_instance_type_specific()
        }),
        ("VcpuLimitExceeded", |e| e.is_quota_group_specific()),
        ("InstanceLimitExceeded", |e| e.is_quota()),
        ("RequestLimitExceeded", |e| e.earliest_retry().is_some()),
    ];
    for (code, check) in cases {
        let before = r.proxy.calls("RunInstances").len();
        let mut f = Ec2Fault::new("RunInstances", code, "injected").once();
        f.status = if code == "InsufficientInstanceCapacity" {
            500
        } else {
            400
        };
        r.proxy.inject(f);
        let Err(e) = set.create(&it("t3.micro"), r.request()).await else {
            panic!("{code}: the create succeeded");
        };
        assert!(check(&e), "{code}: {e:?}");
        assert!(e.to_string().contains(code), "{e}");
        assert_eq!(
            r.proxy.calls("RunInstances").len(),
            before + 1,
            "{code} sent exactly once"
        );
    }
}

/// AC-EC2-2: with a public key, one DescribeKeyPairs and one ImportKeyPair, then RunInstances
/// with IMDSv2 required; the instance carries the tag. A second create reuses the key name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_ec2_2_create_with_public_key_imports_it_once() {
    let Some(r) = rig(&["127.0.0.0/24"]).await else {
        return;
    };
    let set = r.set(&r.subnets, None);
    let key = cloud::sshd::new_ed25519_key()
        .public_key()
        .to_openssh()
        .unwrap();
    let mut req = r.request();
    req.public_key = Some(key);
    let vm = set.create(&it("t3.micro"), req.clone()).await.unwrap();
    assert_eq!(r.proxy.calls("DescribeKeyPairs").len(), 1);
    assert_eq!(r.proxy.calls("ImportKeyPair").len(), 1);
    let run = r.proxy.calls("RunInstances");
    assert_eq!(run.len(), 1);
    assert_eq!(run[0]["MetadataOptions.HttpTokens"], "required");
    assert_eq!(run[0]["MetadataOptions.HttpEndpoint"], "enabled");
    assert!(
        run[0]["KeyName"].starts_with("arvados-dispatch-keypair-SHA256:"),
        "{:?}",
        run[0]
    );
    assert_eq!(
        vm.tags().get("ArvadosInstanceSetID").map(String::as_str),
        Some("zzzzz-test")
    );
    assert!(vm.address().starts_with("127.0.0."), "{}", vm.address());
    assert_eq!(vm.remote_user(), "crunch");
    set.create(&it("t3.micro"), req).await.unwrap();
    assert_eq!(r.proxy.calls("ImportKeyPair").len(), 1, "cached");
}

/// AC-EC2-3 and AC-EC2-4: AddedScratch adds an EBS volume and no key-pair calls without a key;
/// a preemptible type asks for spot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_ec2_3_and_4_scratch_volume_and_spot() {
    let Some(r) = rig(&["127.0.0.0/24"]).await else {
        return;
    };
    let set = r.set(&r.subnets, None);
    let mut scratch = it("t3.micro");
    scratch.added_scratch = 20 << 30;
    set.create(&scratch, r.request()).await.unwrap();
    assert!(
        r.proxy.calls("DescribeKeyPairs").is_empty() && r.proxy.calls("ImportKeyPair").is_empty()
    );
    let run = r.proxy.calls("RunInstances");
    assert_eq!(run[0]["BlockDeviceMapping.1.DeviceName"], "/dev/xvdt");
    assert_eq!(run[0]["BlockDeviceMapping.1.Ebs.VolumeSize"], "20");
    assert_eq!(run[0]["BlockDeviceMapping.1.Ebs.VolumeType"], "gp2");
    let mut spot = it("t3.micro");
    spot.preemptible = true;
    set.create(&spot, r.request()).await.unwrap();
    let run = r.proxy.calls("RunInstances");
    assert_eq!(run[1]["InstanceMarketOptions.MarketType"], "spot");
    assert_eq!(run[1]["InstanceMarketOptions.SpotOptions.MaxPrice"], "0.1");
    assert_eq!(
        run[1]["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"],
        "terminate"
    );
}

fn starts(reg: &prometheus::Registry, subnet: &str, success: &str) -> f64 {
    reg.gather()
        .iter()
        .find(|f| f.name() == "arvados_dispatchcloud_ec2_instance_starts_total")
        .and_then(|f| {
            f.get_metric().iter().find(|m| {
                let l = m.get_label();
                l.iter()
                    .any(|p| p.name() == "subnet_id" && p.value() == subnet)
                    && l.iter()
                        .any(|p| p.name() == "success" && p.value() == success)
            })
        })
        .map(|m| m.get_counter().get_value())
        .unwrap_or(-1.0)
}

/// AC-EC2-5: a full subnet fails over to the next; the next create starts with the good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_ec2_5_subnet_failover() {
    let Some(r) = rig(&["127.0.0.0/25", "127.0.0.128/25"]).await else {
        return;
    };
    let (full, good) = (r.subnets[0].clone(), r.subnets[1].clone());
    let reg = prometheus::Registry::new();
    let set = r.set(&r.subnets, Some(&reg));
    r.proxy.inject(
        Ec2Fault::new(
            "RunInstances",
            "InsufficientFreeAddressesInSubnet",
            "subnet full",
        )
        .when("NetworkInterface.1.SubnetId", &full),
    );
    set.create(&it("t3.micro"), r.request()).await.unwrap();
    assert_eq!(r.proxy.calls("RunInstances").len(), 2);
    assert_eq!(
        (starts(&reg, &full, "0"), starts(&reg, &full, "1")),
        (1.0, 0.0)
    );
    assert_eq!(
        (starts(&reg, &good, "0"), starts(&reg, &good, "1")),
        (0.0, 1.0)
    );
    set.create(&it("t3.micro"), r.request()).await.unwrap();
    assert_eq!(r.proxy.calls("RunInstances").len(), 3);
    assert_eq!(starts(&reg, &good, "1"), 2.0);
}

/// Issue 19, zones: with more than one subnet the set offers them as zones; a create pinned
/// to one (the pool's capacity model chose it) tries that subnet only, leaves the fail-over
/// index alone, and says whether its error is the subnet's. The proxy's record of calls is
/// the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_pinned_to_a_subnet_tries_only_that_subnet() {
    let Some(r) = rig(&["127.0.0.0/25", "127.0.0.128/25"]).await else {
        return;
    };
    let (short, good) = (r.subnets[0].clone(), r.subnets[1].clone());
    let set = r.set(&r.subnets, None);
    assert_eq!(set.zones(), r.subnets);
    assert!(
        r.set(&r.subnets[..1], None).zones().is_empty(),
        "one subnet: no choice"
    );
    r.proxy.inject(
        Ec2Fault::new("RunInstances", "InsufficientInstanceCapacity", "none left")
            .when("NetworkInterface.1.SubnetId", &short),
    );
    let pinned = |z: &str| CreateRequest {
        zone: Some(z.to_string()),
        ..r.request()
    };
    let subnets_called = || -> Vec<String> {
        r.proxy
            .calls("RunInstances")
            .iter()
            .map(|c| c["NetworkInterface.1.SubnetId"].clone())
            .collect()
    };
    let e = set
        .create(&it("t3.micro"), pinned(&short))
        .await
        .err()
        .unwrap();
    assert!(e.is_capacity() && e.zone_specific, "{e:?}");
    assert_eq!(
        subnets_called(),
        std::slice::from_ref(&short),
        "no fail-over when pinned"
    );
    set.create(&it("t3.micro"), pinned(&good)).await.unwrap();
    // Unpinned (Arvados): from the fail-over index, which pinned creates did not move.
    set.create(&it("t3.micro"), r.request()).await.unwrap();
    assert_eq!(
        subnets_called(),
        [short.clone(), good.clone(), short.clone(), good.clone()]
    );
    let e = set
        .create(&it("t3.micro"), pinned("subnet-nope"))
        .await
        .err()
        .unwrap();
    assert!(
        !e.is_capacity() && e.to_string().contains("subnet-nope"),
        "{e}"
    );
    assert_eq!(
        subnets_called().len(),
        4,
        "an unknown subnet is not asked for"
    );
    // A create that is not a subnet's failure says so.
    r.proxy.clear();
    r.proxy
        .inject(Ec2Fault::new("RunInstances", "InvalidAMIID.NotFound", "no such image").once());
    let e = set
        .create(&it("t3.micro"), pinned(&good))
        .await
        .err()
        .unwrap();
    assert!(!e.zone_specific, "{e:?}");
}

/// AC-EC2-7 and AC-EC2-8: which error a create reports after trying every subnet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_ec2_7_and_8_error_preference_across_subnets() {
    let Some(r) = rig(&["127.0.0.0/25", "127.0.0.128/25"]).await else {
        return;
    };
    let (full, broken) = (r.subnets[0].clone(), r.subnets[1].clone());
    let set = r.set(&r.subnets, None);
    r.proxy.inject(
        Ec2Fault::new(
            "RunInstances",
            "InsufficientFreeAddressesInSubnet",
            "subnet full",
        )
        .when("NetworkInterface.1.SubnetId", &full),
    );
    r.proxy.inject(
        Ec2Fault::new("RunInstances", "InvalidSubnetId.NotFound", "no such subnet")
            .when("NetworkInterface.1.SubnetId", &broken),
    );
    let e = set
        .create(&it("t3.micro"), r.request())
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("InvalidSubnetId.NotFound"), "{e}");
    let e = set
        .create(&it("t3.micro"), r.request())
        .await
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("InsufficientFreeAddressesInSubnet"),
        "{e}"
    );
    assert_eq!(r.proxy.calls("RunInstances").len(), 4);

    // AC-EC2-8: a capacity error is preferred over the other subnet's error.
    r.proxy.clear();
    let set = r.set(&r.subnets, None);
    r.proxy.inject(
        Ec2Fault::new(
            "RunInstances",
            "InsufficientFreeAddressesInSubnet",
            "subnet full",
        )
        .when("NetworkInterface.1.SubnetId", &full),
    );
    r.proxy.inject(
        Ec2Fault::new(
            "RunInstances",
            "InsufficientInstanceCapacity",
            "no capacity",
        )
        .when("NetworkInterface.1.SubnetId", &broken),
    );
    let before = r.proxy.calls("RunInstances").len();
    for _ in 0..3 {
        let e = set
            .create(&it("t3.micro"), r.request())
            .await
            .err()
            .unwrap();
        assert!(e.is_instance_type_specific(), "{e}");
    }
    assert_eq!(r.proxy.calls("RunInstances").len() - before, 6);
}

/// AC-EC2-13: list, tag and destroy listed instances; `ec2_instances` after a list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_ec2_13_list_tag_destroy_and_instances_metric() {
    let Some(r) = rig(&["127.0.0.0/24"]).await else {
        return;
    };
    let reg = prometheus::Registry::new();
    let set = r.set(&r.subnets, Some(&reg));
    for _ in 0..2 {
        set.create(&it("t3.micro"), r.request()).await.unwrap();
    }
    let filter: InstanceTags =
        [("ArvadosInstanceSetID".to_string(), "zzzzz-test".to_string())].into();
    let listed = set.instances(&filter).await.unwrap();
    assert_eq!(listed.len(), 2);
    let gauge = reg
        .gather()
        .iter()
        .find(|f| f.name() == "arvados_dispatchcloud_ec2_instances")
        .and_then(|f| {
            f.get_metric()
                .iter()
                .find(|m| m.get_label().iter().any(|l| l.value() == r.subnets[0]))
                .map(|m| m.get_gauge().get_value())
        });
    assert_eq!(gauge, Some(2.0));
    let mut tags = listed[0].tags();
    tags.insert("ArvadosIdleBehavior".into(), "hold".into());
    listed[0].set_tags(tags).await.unwrap();
    for vm in &listed {
        vm.destroy().await.unwrap();
    }
    let left = set.instances(&filter).await.unwrap();
    assert!(left.is_empty(), "terminated instances are not listed");
    let other: InstanceTags = [(
        "ArvadosInstanceSetID".to_string(),
        "someone-else".to_string(),
    )]
    .into();
    assert!(set.instances(&other).await.unwrap().is_empty());
}

/// AC-EC2-11: spot instances get price history from paged DescribeSpotPriceHistory answers
/// (the second page ends with an empty NextToken), newest first, non-zero, and an instance
/// type with added EBS scratch costs more at every point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_ec2_11_spot_price_history() {
    let Some(r) = rig(&["127.0.0.0/24"]).await else {
        return;
    };
    let set = r.set(&r.subnets, None);
    let mut spot = it("t2.micro");
    spot.preemptible = true;
    for _ in 0..2 {
        set.create(&spot, r.request()).await.unwrap();
    }
    let filter: InstanceTags =
        [("ArvadosInstanceSetID".to_string(), "zzzzz-test".to_string())].into();
    // Learn the zone moto put them in, through the proxy's record of the list.
    let zone = {
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new("test", "test", None, None, "test"))
            .endpoint_url(&r.proxy.url)
            .build();
        let out = aws_sdk_ec2::Client::from_conf(conf)
            .describe_instances()
            .send()
            .await
            .unwrap();
        let inst = &out.reservations()[0].instances()[0];
        assert_eq!(
            inst.instance_lifecycle(),
            Some(&aws_sdk_ec2::types::InstanceLifecycleType::Spot),
            "moto marks spot launches"
        );
        inst.placement()
            .unwrap()
            .availability_zone()
            .unwrap()
            .to_string()
    };
    let at = |mins: i64| {
        (chrono::Utc::now() - chrono::Duration::minutes(mins))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let item = |price: &str, mins: i64| {
        format!(
            "<item><instanceType>t2.micro</instanceType><productDescription>Linux/UNIX</productDescription><spotPrice>{price}</spotPrice><timestamp>{}</timestamp><availabilityZone>{zone}</availabilityZone></item>",
            at(mins)
        )
    };
    let page = |items: String, token: &str| {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeSpotPriceHistoryResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>r</requestId><spotPriceHistorySet>{items}</spotPriceHistorySet><nextToken>{token}</nextToken></DescribeSpotPriceHistoryResponse>"
        )
    };
    r.proxy.inject(
        Ec2Fault::reply("DescribeSpotPriceHistory", &page(item("0.01", 2), ""))
            .when("NextToken", "page2"),
    );
    r.proxy.inject(Ec2Fault::reply(
        "DescribeSpotPriceHistory",
        &page(format!("{}{}", item("0.005", 9), item("0.015", 5)), "page2"),
    ));
    let listed = set.instances(&filter).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        r.proxy.calls("DescribeSpotPriceHistory").len(),
        2,
        "both pages, then stop at the empty token"
    );
    let mut big = spot.clone();
    big.added_scratch = 640 << 30;
    for vm in &listed {
        let h = vm.price_history(&spot);
        assert!(!h.is_empty(), "no history for {}", vm.id());
        assert!(
            h.windows(2).all(|w| w[0].start_time > w[1].start_time),
            "newest first: {h:?}"
        );
        assert!(h.iter().all(|p| p.price > 0.0));
        let hb = vm.price_history(&big);
        assert_eq!(hb.len(), h.len());
        assert!(
            h.iter().zip(&hb).all(|(a, b)| b.price > a.price),
            "EBS cost added"
        );
    }
    assert!(
        listed[0]
            .price_history(&it("t2.micro"))
            .iter()
            .any(|p| (p.price - 0.01).abs() < 1e-9)
    );
}

/// Issue 19, the cloud's own interruption notices: a set that watches asks EC2 for its spot
/// instances' requests at each list, and an instance whose request is `marked-for-termination`
/// says so (with EC2's time); a set that does not watch never asks (Arvados makes no such
/// call, and the IAM policy may not allow it); on-demand instances are not asked about; a
/// refused call leaves the list standing, with no notices. The proxy's record is the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watching_set_reports_ec2_spot_interruption_notices() {
    let Some(r) = rig(&["127.0.0.0/24"]).await else {
        return;
    };
    let set = r.set(&r.subnets, None);
    let mut spot = it("t3.micro");
    spot.preemptible = true;
    let vm = set.create(&spot, r.request()).await.unwrap().id();
    set.create(&it("t3.micro"), r.request()).await.unwrap();
    r.proxy.inject(Ec2Fault::reply(
        "DescribeSpotInstanceRequests",
        &testkit::moto::spot_request_xml(&vm, "marked-for-termination"),
    ));
    let notices = |listed: &[Arc<dyn cloud::Instance>]| -> Vec<(String, Option<String>)> {
        let mut v: Vec<(String, Option<String>)> = listed
            .iter()
            .map(|i| (i.id(), i.interruption_notice().map(|t| t.to_rfc3339())))
            .collect();
        v.sort();
        v
    };
    let listed = set.instances(&InstanceTags::new()).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(notices(&listed).iter().all(|(_, n)| n.is_none()));
    assert!(
        r.proxy.calls("DescribeSpotInstanceRequests").is_empty(),
        "not watching: no call"
    );
    set.watch_interruptions();
    let listed = set.instances(&InstanceTags::new()).await.unwrap();
    let noticed: Vec<(String, Option<String>)> = notices(&listed)
        .into_iter()
        .filter(|(_, n)| n.is_some())
        .collect();
    assert_eq!(
        noticed,
        [(vm.clone(), Some("2026-12-01T09:00:00+00:00".to_string()))]
    );
    let calls = r.proxy.calls("DescribeSpotInstanceRequests");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["Filter.1.Name"], "instance-id");
    assert_eq!(
        calls[0]["Filter.1.Value.1"], vm,
        "only the spot instance is asked about"
    );
    assert!(!calls[0].contains_key("Filter.1.Value.2"));
    // A request that is fulfilled is no notice.
    r.proxy.clear();
    r.proxy.inject(Ec2Fault::reply(
        "DescribeSpotInstanceRequests",
        &testkit::moto::spot_request_xml(&vm, "fulfilled"),
    ));
    let listed = set.instances(&InstanceTags::new()).await.unwrap();
    assert!(notices(&listed).iter().all(|(_, n)| n.is_none()));
    // Refused: the list stands, without notices.
    r.proxy.clear();
    r.proxy.inject(Ec2Fault::new(
        "DescribeSpotInstanceRequests",
        "UnauthorizedOperation",
        "You are not authorized to perform this operation.",
    ));
    let listed = set.instances(&InstanceTags::new()).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(notices(&listed).iter().all(|(_, n)| n.is_none()));
}
