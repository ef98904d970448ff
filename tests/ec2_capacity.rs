//! Issue 19's capacity model over the EC2 driver: the worker pool creating through `Ec2Set`
//! against `moto_server`, with the fault proxy answering `RunInstances` with
//! `InsufficientInstanceCapacity` (which moto cannot make). The proxy's record of calls is the
//! oracle: it counts the launches the cloud saw, outside the code under test.
//!
//! The VMs moto makes never answer SSH here; these tests only create.

use std::sync::Arc;
use std::time::Duration;

use arvados::InstanceType;
use cloud_ec2::Ec2Set;
use cloud_ec2::params::Ec2Params;
use dispatchcloud::scheduler::pool::WorkerPool;
use dispatchcloud::settings::CapacitySettings;
use dispatchcloud::worker::{Pool, PoolConfig};
use serde_json::json;
use testkit::moto::Ec2Fault;
use tokio::time::Instant;

mod common;

use common::moto_vpc::{MotoVpc as Rig, moto_vpc as rig};

/// `t3.large` on demand and as spot: one provider type, two markets (two offerings).
fn types() -> (InstanceType, InstanceType) {
    let ondemand = InstanceType {
        name: "large".into(),
        provider_type: "t3.large".into(),
        vcpus: 2,
        ram: 8 << 30,
        price: 0.08,
        ..Default::default()
    };
    let spot = InstanceType {
        name: "large.spot".into(),
        preemptible: true,
        price: 0.03,
        ..ondemand.clone()
    };
    (ondemand, spot)
}

impl Rig {
    /// A pool of its own instance set `id` (a pool adopts the VMs of its set that exist).
    fn pool(
        &self,
        id: &str,
        capacity: CapacitySettings,
        capacity_error_ttl: Duration,
    ) -> Arc<Pool> {
        let (ondemand, spot) = types();
        let subnet = std::slice::from_ref(&self.subnet);
        self.pool_of(
            id,
            capacity,
            capacity_error_ttl,
            &[ondemand, spot],
            subnet,
            |_| {},
        )
    }

    /// [`Rig::pool`] of these types, creating in these subnets.
    fn pool_of(
        &self,
        id: &str,
        capacity: CapacitySettings,
        capacity_error_ttl: Duration,
        types: &[InstanceType],
        subnets: &[String],
        tweak: impl FnOnce(&mut PoolConfig),
    ) -> Arc<Pool> {
        let mut c = arvados::Cluster {
            cluster_id: "zzzzz".into(),
            ..Default::default()
        };
        let v = &mut c.containers.cloud_vms;
        v.image_id = self.image.clone();
        v.deploy_runner_binary = String::new();
        v.sync_interval = Duration::from_millis(200);
        for t in types {
            c.instance_types.insert(t.name.clone(), t.clone());
        }
        let key = Arc::new(cloud::sshd::new_ed25519_key());
        let mut cfg = PoolConfig::from_cluster(&c, id, key);
        cfg.capacity = capacity;
        cfg.capacity_error_ttl = capacity_error_ttl;
        cfg.max_concurrent_creates = 0;
        tweak(&mut cfg);
        let params = Ec2Params::from_params(&json!({
            "AccessKeyID": "test", "SecretAccessKey": "test", "Region": "us-east-1",
            "SubnetID": subnets, "Endpoint": self.proxy.url, "AdminUsername": "crunch",
        }))
        .unwrap();
        let set = Arc::new(Ec2Set::new(params, &id.to_string(), None).unwrap());
        let p = Pool::new(cfg, set, &prometheus::Registry::new()).unwrap();
        p.start();
        p
    }

    /// `RunInstances` calls the cloud saw for the spot market.
    fn spot_launches(&self) -> usize {
        self.proxy
            .calls("RunInstances")
            .iter()
            .filter(|c| {
                c.get("InstanceMarketOptions.MarketType")
                    .map(String::as_str)
                    == Some("spot")
            })
            .count()
    }

    fn ondemand_launches(&self) -> usize {
        self.proxy.calls("RunInstances").len() - self.spot_launches()
    }

    fn spot_is_short(&self) {
        self.proxy.inject(
            Ec2Fault::new(
                "RunInstances",
                "InsufficientInstanceCapacity",
                "We currently do not have sufficient t3.large capacity in the Availability Zone you requested.",
            )
            .when("InstanceMarketOptions.MarketType", "spot"),
        );
    }
}

fn backoff(on: bool) -> CapacitySettings {
    CapacitySettings {
        backoff: on,
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        ..Default::default()
    }
}

/// Wait until `cond`, polling; panics naming `what` after `limit`.
async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With `Capacity.Backoff`, each spot capacity error in a row holds the spot offering off for
/// twice as long (1 s, then 2 s), as a scheduler asking for one spot instance every 20 ms sees;
/// the on-demand offering of the same provider type is not held off meanwhile. The gaps are
/// measured between the launches the cloud saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_spot_capacity_errors_back_off_exponentially_and_leave_on_demand_alone() {
    let Some(r) = rig().await else { return };
    let (ondemand, spot) = types();
    r.spot_is_short();
    let p = r.pool("zzzzz-backoff", backoff(true), Duration::from_secs(60));
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 3 {
        assert!(Instant::now() < deadline, "launches seen: {seen:?}");
        // As a scheduler asks: for one container, so not while its create is in flight
        // (before the first error nothing is known, and a second create would go out).
        let in_flight = p
            .instances()
            .iter()
            .any(|v| v.arvados_instance_type == spot.name);
        if !in_flight {
            p.create(&spot);
        }
        let n = r.spot_launches();
        if n > seen.len() {
            assert_eq!(n, seen.len() + 1, "a burst of spot launches");
            seen.push(Instant::now());
        }
        if seen.len() == 1 && r.ondemand_launches() == 0 {
            // The other market of the same provider type is a separate offering.
            wait_for("the spot error", Duration::from_secs(10), || {
                p.at_capacity(&spot)
            })
            .await;
            assert!(!p.at_capacity(&ondemand));
            assert!(p.create(&ondemand).is_some());
            wait_for("the on-demand launch", Duration::from_secs(10), || {
                r.ondemand_launches() == 1
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (first, second) = (seen[1] - seen[0], seen[2] - seen[1]);
    assert!(first >= Duration::from_secs(1), "first hold {first:?}");
    // A fixed hold (Arvados' minute, here set to 60 s) would not have let the second launch
    // through at all; a hold that does not grow would be about 1 s again.
    assert!(second >= Duration::from_secs(2), "second hold {second:?}");
    assert!(second < Duration::from_secs(20), "second hold {second:?}");
    assert_eq!(r.ondemand_launches(), 1);
    p.stop();
}

/// The launch budget over EC2: once the spot offering's hold-off ends, a scheduling pass that
/// wants five spot instances sends one `RunInstances`, not five, until that one is answered.
/// Without `Capacity.Backoff` (Arvados' behaviour) the same pass sends five.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_an_offering_in_doubt_gets_one_probe_launch_per_pass() {
    let Some(r) = rig().await else { return };
    let (_, spot) = types();
    for (on, want) in [(true, 1), (false, 5)] {
        r.proxy.clear();
        r.spot_is_short();
        let before = r.spot_launches();
        let p = r.pool(
            &format!("zzzzz-budget-{on}"),
            backoff(on),
            Duration::from_secs(1),
        );
        assert!(p.create(&spot).is_some());
        wait_for("the spot error", Duration::from_secs(10), || {
            p.at_capacity(&spot) && p.instances().is_empty()
        })
        .await;
        assert_eq!(r.spot_launches() - before, 1);
        // Capacity is back; the hold-off ends.
        r.proxy.clear();
        wait_for("the hold-off to end", Duration::from_secs(10), || {
            !p.at_capacity(&spot)
        })
        .await;
        let created = (0..5).filter(|_| p.create(&spot).is_some()).count();
        assert_eq!(created, want, "backoff {on}");
        wait_for(
            "the launches to be answered",
            Duration::from_secs(10),
            || {
                let v = p.instances();
                v.len() == want && v.iter().all(|i| !i.instance.is_empty())
            },
        )
        .await;
        assert_eq!(r.spot_launches() - before, 1 + want, "backoff {on}");
        p.stop();
    }
}

/// Capacity per zone over EC2 (with `Capacity.Backoff` and three subnets): t3.large is short
/// in the first two subnets, t3.small in the third. The pool pins each create to one subnet
/// and keeps each type on the subnet that worked for it, so each short subnet fails once per
/// type. Without back-off (Arvados) every create fails over from the one subnet that last
/// worked for any type, and each type keeps failing where the other succeeded. The fault
/// proxy's record of `RunInstances` calls is the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_capacity_is_kept_per_subnet_and_each_type_returns_to_its_good_subnet() {
    let Some(r) = rig().await else { return };
    let (large, _) = types();
    let small = InstanceType {
        name: "small".into(),
        provider_type: "t3.small".into(),
        ..large.clone()
    };
    let s = r.subnets.clone();
    let mut failed = Vec::new();
    for on in [false, true] {
        r.proxy.clear();
        for (ty, subnet) in [
            ("t3.large", &s[0]),
            ("t3.large", &s[1]),
            ("t3.small", &s[2]),
        ] {
            r.proxy.inject(
                Ec2Fault::new(
                    "RunInstances",
                    "InsufficientInstanceCapacity",
                    "We currently do not have sufficient capacity in the Availability Zone you requested.",
                )
                .when("InstanceType", ty)
                .when("NetworkInterface.1.SubnetId", subnet),
            );
        }
        let before = r.proxy.calls("RunInstances").len();
        let id = format!("zzzzz-zones-{on}");
        let p = r.pool_of(
            &id,
            backoff(on),
            Duration::from_secs(60),
            &[large.clone(), small.clone()],
            &s,
            |_| {},
        );
        let mut made = 0;
        for t in [&large, &small, &large, &small] {
            made += 1;
            let deadline = Instant::now() + Duration::from_secs(30);
            while p.instances().len() < made {
                assert!(
                    Instant::now() < deadline,
                    "backoff {on}: {:?}",
                    p.holdoffs()
                );
                if !p.at_capacity(t) {
                    assert!(p.create(t).is_some(), "backoff {on}: create accepted");
                }
                // The create's answer: a VM, or no create left in flight.
                wait_for("the create answered", Duration::from_secs(10), || {
                    p.instances().iter().all(|v| !v.instance.is_empty())
                })
                .await;
            }
        }
        let calls = r.proxy.calls("RunInstances");
        let calls = &calls[before..];
        // Moto's own record: where this set's instances of each type are.
        let out = r.ec2.describe_instances().send().await.unwrap();
        let mut made_in: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for i in out.reservations().iter().flat_map(|r| r.instances()) {
            let ours = i
                .tags()
                .iter()
                .any(|t| t.key() == Some("ArvadosInstanceSetID") && t.value() == Some(id.as_str()));
            if ours {
                made_in
                    .entry(i.instance_type().unwrap().as_str().to_string())
                    .or_default()
                    .push(i.subnet_id().unwrap().to_string());
            }
        }
        let made_in = |ty: &str| made_in.get(ty).cloned().unwrap_or_default();
        assert_eq!(
            made_in("t3.large"),
            [s[2].clone(), s[2].clone()],
            "backoff {on}"
        );
        assert_eq!(
            made_in("t3.small"),
            [s[0].clone(), s[0].clone()],
            "backoff {on}"
        );
        failed.push(calls.len() - 4);
        p.stop();
    }
    // Off: t3.large fails in two subnets each time, t3.small in one. On: each once.
    assert_eq!(
        failed,
        [2 + 1 + 2 + 1, 2],
        "failed RunInstances calls, off and on"
    );
}

/// Issue 19, interruption notices from EC2 itself: with `Interruptions.Drain` the pool has
/// its set watch, and a spot instance whose spot request EC2 marks for termination is drained
/// (its `IdleBehavior` tag, as moto keeps it, becomes `drain`) without any container saying
/// so. Off (Arvados), the pool never asks EC2 and the instance stays `run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_a_spot_instance_marked_for_termination_is_drained() {
    let Some(r) = rig().await else { return };
    let (_, spot) = types();
    for drain in [false, true] {
        r.proxy.clear();
        let id = format!("zzzzz-notice-{drain}");
        let p = r.pool_of(
            &id,
            backoff(false),
            Duration::from_secs(60),
            std::slice::from_ref(&spot),
            std::slice::from_ref(&r.subnet),
            |cfg| cfg.interruptions.drain = drain,
        );
        wait_for("first cloud list", Duration::from_secs(10), || p.loaded()).await;
        assert!(p.create(&spot).is_some());
        wait_for("the spot VM", Duration::from_secs(10), || {
            p.instances().iter().any(|v| !v.instance.is_empty())
        })
        .await;
        let vm = p.instances()[0].instance.clone();
        r.proxy.inject(Ec2Fault::reply(
            "DescribeSpotInstanceRequests",
            &testkit::moto::spot_request_xml(&vm, "marked-for-termination"),
        ));
        // Moto's tags on the VM: the oracle.
        let idle_behavior = || async {
            let out = r
                .ec2
                .describe_instances()
                .instance_ids(&vm)
                .send()
                .await
                .unwrap();
            out.reservations()[0].instances()[0]
                .tags()
                .iter()
                .find(|t| t.key() == Some("ArvadosIdleBehavior"))
                .and_then(|t| t.value())
                .unwrap_or_default()
                .to_string()
        };
        if drain {
            let deadline = Instant::now() + Duration::from_secs(10);
            while idle_behavior().await != "drain" {
                assert!(Instant::now() < deadline, "{:?}", p.instances());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(!r.proxy.calls("DescribeSpotInstanceRequests").is_empty());
        } else {
            // Several syncs (every 200 ms) after the notice is there to be seen.
            let lists = r.proxy.calls("DescribeInstances").len();
            wait_for("three more syncs", Duration::from_secs(10), || {
                r.proxy.calls("DescribeInstances").len() >= lists + 3
            })
            .await;
            assert_eq!(idle_behavior().await, "run");
            assert!(r.proxy.calls("DescribeSpotInstanceRequests").is_empty());
        }
        p.stop();
    }
}

/// Issue 19, `Capacity.StateFile` over EC2, with capacity per subnet: spot t3.large is short
/// in the first subnet; the pool's first create there fails, and the hold-off (keyed by
/// offering and subnet, with EC2's own error text) is in the file. A new pool on the same
/// file, as after a restart, knows it at once: its spot create goes straight to the second
/// subnet, with no launch wasted on the first. The proxy's record of `RunInstances` calls is
/// the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_capacity_state_survives_a_restart_per_subnet() {
    let Some(r) = rig().await else { return };
    let (_, spot) = types();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("capacity.json");
    let s = r.subnets.clone();
    r.proxy.inject(
        Ec2Fault::new(
            "RunInstances",
            "InsufficientInstanceCapacity",
            "We currently do not have sufficient t3.large capacity in the Availability Zone you requested.",
        )
        .when("InstanceMarketOptions.MarketType", "spot")
        .when("NetworkInterface.1.SubnetId", &s[0]),
    );
    let settings = || CapacitySettings {
        backoff_base: Duration::from_secs(60),
        state_file: Some(file.clone()),
        ..backoff(true)
    };
    let offering = format!("t3.large-preemptible@{}", s[0]);
    let first = r.pool_of(
        "zzzzz-restart-1",
        settings(),
        Duration::from_secs(60),
        std::slice::from_ref(&spot),
        &s,
        |_| {},
    );
    wait_for("first cloud list", Duration::from_secs(10), || {
        first.loaded()
    })
    .await;
    assert!(first.create(&spot).is_some());
    wait_for("the state file", Duration::from_secs(10), || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(&offering))
    })
    .await;
    let saved =
        dispatchcloud::worker::capacity_file(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let o = &saved.offerings[&offering];
    assert_eq!(o.errors_in_a_row, 1);
    assert!(o.held_until.is_some());
    assert!(o.error.contains("InsufficientInstanceCapacity"), "{o:?}");
    first.stop();
    assert!(first.join(Duration::from_secs(10)).await);

    // The next dispatcher (another instance set, so nothing to adopt), same state file.
    let before = r.proxy.calls("RunInstances").len();
    let p = r.pool_of(
        "zzzzz-restart-2",
        settings(),
        Duration::from_secs(60),
        std::slice::from_ref(&spot),
        &s,
        |_| {},
    );
    let h = p.holdoffs();
    assert_eq!(
        h.iter()
            .filter_map(|h| h.offering.clone())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&offering),
        "{h:?}"
    );
    assert!(!p.at_capacity(&spot), "the other subnets are not held off");
    wait_for("first cloud list", Duration::from_secs(10), || p.loaded()).await;
    assert!(p.create(&spot).is_some());
    wait_for("the spot VM", Duration::from_secs(10), || {
        p.instances().iter().any(|v| !v.instance.is_empty())
    })
    .await;
    let calls = r.proxy.calls("RunInstances");
    let subnets: Vec<&str> = calls[before..]
        .iter()
        .map(|c| c["NetworkInterface.1.SubnetId"].as_str())
        .collect();
    assert_eq!(
        subnets,
        [s[1].as_str()],
        "no launch wasted on the first subnet"
    );
    p.stop();
}
