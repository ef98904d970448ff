//! `arvados-dispatch-cloud simulate`: the real dispatcher (scheduler, pool, SSH executor,
//! management API) against the fake Arvados API with a generated workload and the stub cloud,
//! with live progress and a cost/latency report. No cloud, no Arvados.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::{Args, ValueEnum};
use dispatchcloud::node_size::TypeChooser;
use dispatchcloud::scheduler::pool::WorkerPool;
use dispatchcloud::service::Service;
use serde_json::{Value, json};
use testkit::stub_driver::{SharedStubDriver, StubConfig, StubSet};
use testkit::{FakeArvados, FakeConfig, Fault, FaultKind};

use crate::heap_tally::{self, Side};

/// The default config (also in `config/simulate.yml`).
pub const DEFAULT_CONFIG: &str = include_str!("../config/simulate.yml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Faults {
    /// A perfect cloud and API.
    None,
    /// Create/destroy errors, rate limits, capacity shortages, stale locks, broken-node
    /// reports, slow starts and API 503s — everything the dispatcher must ride out without
    /// losing or repeating a container.
    Chaos,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// How many containers to queue
    #[arg(long, default_value_t = 200)]
    containers: usize,
    /// Seed of the workload and of the stub cloud's faults
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Faults::None)]
    faults: Faults,
    /// How long stub VMs take to boot (overrides DriverParameters.BootDelay), e.g. 2s
    #[arg(long, value_name = "DURATION")]
    boot_delay: Option<String>,
    /// How long each container runs: one duration (e.g. 2s) or a range drawn from uniformly
    /// (e.g. 1s..5s) [default: the workload's own, 0.1s..5s]
    #[arg(long, value_name = "D|MIN..MAX", value_parser = parse_run_time)]
    run_time: Option<(Duration, Duration)>,
    /// Queue the containers one at a time, this long apart (e.g. 50ms), instead of all at
    /// once: after the first boots, later containers meet a warm pool
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    arrival_interval: Option<Duration>,
    /// At most this many instances at once (overrides CloudVMs.MaxInstances)
    #[arg(long, value_name = "N")]
    max_instances: Option<i64>,
    /// Make the stub cloud short of a provider type from the start for this long (e.g.
    /// m5.xlarge=10m; m5.xlarge-preemptible=10m for its spot market only; m5.xlarge@a=10m in
    /// zone a only, with --zones); repeatable. The report counts the launches wasted on it
    /// (stub knob ShortOfCapacityUntil)
    #[arg(long, value_name = "TYPE=DURATION", value_parser = parse_shortage)]
    capacity_shortage: Vec<(String, String)>,
    /// Give the stub cloud these zones, tried as EC2's subnets (e.g. a,b,c; stub knob
    /// Zones). The report counts launches per zone
    #[arg(long, value_name = "ZONE,ZONE,...", value_delimiter = ',')]
    zones: Vec<String>,
    /// A spot interruption storm: the stub cloud takes every VM back this long after
    /// creating it (e.g. 30s; stub knob VanishAfter). The report counts the crunch-runs cut
    /// and the work lost
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    vanish_after: Option<Duration>,
    /// With --vanish-after: announce each VM's end this long before (crunch-run records
    /// runtime_status.preemptionNotice, as on EC2, which gives 2 minutes; stub knob
    /// InterruptionNotice)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg, requires = "vanish_after")]
    interruption_notice: Option<Duration>,
    /// Retry a container that ends Cancelled, up to this many times, as Arvados' container
    /// requests do (container_count_max): a new container with the same spec. The report
    /// gives the retries and the restart delay (a cut crunch-run's end to its retry's start)
    #[arg(long, value_name = "N", default_value_t = 0)]
    retries: usize,
    /// Also write the summary as JSON here
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Where the management API (and /metrics) listens, e.g. 127.0.0.1:9006 to point a
    /// Prometheus at it; by default a free loopback port
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Give up (exit 1) after this long
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    timeout: String,
}

/// `--run-time`: `D` or `MIN..MAX` (Go durations), MIN ≤ MAX.
fn parse_run_time(s: &str) -> Result<(Duration, Duration), String> {
    let d = |t: &str| arvados::config::units::parse_duration(t.trim()).map_err(|e| e.to_string());
    let (lo, hi) = match s.split_once("..") {
        Some((a, b)) => (d(a)?, d(b)?),
        None => (d(s)?, d(s)?),
    };
    if lo > hi {
        return Err(format!("{s:?}: the minimum is larger than the maximum"));
    }
    Ok((lo, hi))
}

/// `--capacity-shortage`: `PROVIDERTYPE=DURATION`.
fn parse_shortage(s: &str) -> Result<(String, String), String> {
    let (ty, d) = s
        .split_once('=')
        .filter(|(ty, _)| !ty.trim().is_empty())
        .ok_or_else(|| format!("{s:?}: expected PROVIDERTYPE=DURATION, e.g. m5.xlarge=10m"))?;
    parse_duration_arg(d)?;
    Ok((ty.trim().to_string(), d.trim().to_string()))
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    arvados::config::units::parse_duration(s.trim()).map_err(|e| e.to_string())
}

fn set_param(cluster: &mut arvados::Cluster, key: &str, v: serde_norway::Value) {
    let params = &mut cluster.containers.cloud_vms.driver_parameters;
    if !params.is_mapping() {
        *params = serde_norway::Value::Mapping(Default::default());
    }
    if let serde_norway::Value::Mapping(m) = params {
        m.insert(serde_norway::Value::String(key.into()), v);
    }
}

/// The crunch-runs cut by their VM's loss: how many, on how many VMs, and their run time.
fn lost_work(lives: &[testkit::stub_driver::ProcessLife]) -> Value {
    let cut: Vec<&testkit::stub_driver::ProcessLife> = lives.iter().filter(|l| l.cut).collect();
    let vms: std::collections::HashSet<&str> = cut.iter().map(|l| l.vm.as_str()).collect();
    json!({
        "crunch_runs_cut": cut.len(),
        "vms": vms.len(),
        "work_lost_seconds": cut
            .iter()
            .filter_map(|l| l.end.map(|e| (e - l.start).as_secs_f64()))
            .fold(0.0, |a, b| a + b),
    })
}

/// The launch log in numbers: calls, VMs made, failures by kind, and per provider type (with
/// `-preemptible` for spot).
fn launch_summary(log: &[testkit::stub_driver::LaunchRecord]) -> Value {
    let mut by_type: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut by_zone: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut failed: BTreeMap<&str, usize> = BTreeMap::new();
    for l in log {
        if !l.zone.is_empty() {
            let z = by_zone.entry(&l.zone).or_default();
            z.0 += 1;
            z.1 += usize::from(l.failed == Some("capacity"));
        }
        let key = if l.preemptible {
            format!("{}-preemptible", l.provider_type)
        } else {
            l.provider_type.clone()
        };
        let e = by_type.entry(key).or_default();
        e.0 += 1;
        if let Some(kind) = l.failed {
            *failed.entry(kind).or_default() += 1;
            if kind == "capacity" {
                e.1 += 1;
            }
        }
    }
    json!({
        "calls": log.len(),
        "made": log.iter().filter(|l| l.failed.is_none()).count(),
        "failed_for_capacity": failed.get("capacity").copied().unwrap_or(0),
        "failed_other": failed.iter().filter(|(k, _)| **k != "capacity").map(|(_, n)| n).sum::<usize>(),
        "by_provider_type": by_type
            .into_iter()
            .map(|(k, (calls, capacity))| (k, json!({"calls": calls, "failed_for_capacity": capacity})))
            .collect::<serde_json::Map<String, Value>>(),
        "by_zone": by_zone
            .into_iter()
            .map(|(k, (calls, capacity))| (k.to_string(), json!({"calls": calls, "failed_for_capacity": capacity})))
            .collect::<serde_json::Map<String, Value>>(),
    })
}

/// One retry (`--retries`): a new container with the spec of a Cancelled one.
struct Retry {
    uuid: String,
    /// Its spec: the workload's entry.
    spec: usize,
    /// The container it retries.
    of: String,
    /// 1 for the retry of an original container, 2 for the retry of a retry, …
    attempt: usize,
}

/// The harness's container requests: it retries Cancelled containers as Arvados does.
#[derive(Default)]
struct Retries {
    made: Vec<Retry>,
    /// Containers final and looked at (retried, or Complete).
    settled: std::collections::HashSet<String>,
}

impl Retries {
    /// Retry each container (original or retry) that is Cancelled and has attempts left.
    fn scan(
        &mut self,
        fake: &FakeArvados,
        queued: &[String],
        workload: &[testkit::fake_api::ContainerSpec],
        max: usize,
    ) {
        let candidates: Vec<(String, usize, usize)> = queued
            .iter()
            .enumerate()
            .map(|(i, u)| (u.clone(), i, 0))
            .chain(
                self.made
                    .iter()
                    .map(|r| (r.uuid.clone(), r.spec, r.attempt)),
            )
            .filter(|(u, _, _)| !self.settled.contains(u))
            .collect();
        for (u, spec, attempt) in candidates {
            let state = fake
                .container(&u)
                .and_then(|c| c["state"].as_str().map(str::to_string));
            match state.as_deref() {
                Some("Complete") => {
                    self.settled.insert(u);
                }
                Some("Cancelled") => {
                    self.settled.insert(u.clone());
                    if attempt < max {
                        let uuid = fake.add_container(&workload[spec]);
                        self.made.push(Retry {
                            uuid,
                            spec,
                            of: u,
                            attempt: attempt + 1,
                        });
                    }
                }
                _ => {}
            }
        }
    }

    /// The retries in numbers: how many, how they ended, how many originals completed in
    /// the end, and the restart delay: from the end of the retried container's last
    /// crunch-run (cut with its VM, or ended otherwise) to its retry's first crunch-run.
    fn summary(
        &self,
        fake: &FakeArvados,
        originals: &[String],
        lives: &[testkit::stub_driver::ProcessLife],
    ) -> Value {
        let state = |u: &str| {
            fake.container(u)
                .and_then(|c| c["state"].as_str().map(str::to_string))
                .unwrap_or_default()
        };
        let mut last_end: std::collections::HashMap<&str, chrono::DateTime<chrono::Utc>> =
            Default::default();
        let mut first_start: std::collections::HashMap<&str, chrono::DateTime<chrono::Utc>> =
            Default::default();
        for l in lives {
            first_start.entry(l.uuid.as_str()).or_insert(l.started_at);
            if let Some(e) = l.end {
                let end =
                    l.started_at + chrono::Duration::from_std(e - l.start).unwrap_or_default();
                let t = last_end.entry(l.uuid.as_str()).or_insert(end);
                *t = (*t).max(end);
            }
        }
        let mut delays: Vec<f64> = self
            .made
            .iter()
            .filter_map(|r| {
                let gap = *first_start.get(r.uuid.as_str())? - *last_end.get(r.of.as_str())?;
                Some(gap.num_milliseconds() as f64 / 1000.0)
            })
            .collect();
        delays.sort_by(f64::total_cmp);
        // Each retry's original container.
        let mut root: std::collections::HashMap<&str, &str> = Default::default();
        for r in &self.made {
            let of = root.get(r.of.as_str()).copied().unwrap_or(r.of.as_str());
            root.insert(r.uuid.as_str(), of);
        }
        let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
        let mut completed: std::collections::HashSet<&str> = originals
            .iter()
            .map(String::as_str)
            .filter(|u| state(u) == "Complete")
            .collect();
        for r in &self.made {
            let s = state(&r.uuid);
            if s == "Complete" {
                completed.insert(root[r.uuid.as_str()]);
            }
            *by_state.entry(s).or_default() += 1;
        }
        json!({
            "containers": self.made.len(),
            "by_state": by_state,
            "originals_complete_in_the_end": completed.len(),
            "restart_delay_seconds": {
                "count": delays.len(),
                "p50": percentile(&delays, 0.5),
                "p95": percentile(&delays, 0.95),
                "max": delays.last().copied().unwrap_or(0.0),
            },
        })
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[i - 1]
}

/// Instance time and cost, sampled.
#[derive(Default)]
struct Usage {
    busy_seconds: f64,
    idle_seconds: f64,
    cost: f64,
    peak_instances: usize,
    /// The highest hourly price of every VM the stub cloud had at once (its own record).
    peak_price_per_hour: f64,
}

pub fn run(
    cluster: Option<arvados::Cluster>,
    settings: dispatchcloud::settings::Settings,
    args: SimulateArgs,
) -> anyhow::Result<bool> {
    let mut cluster = match cluster {
        Some(c) => c,
        None => {
            let c = arvados::config::load_cluster_from_str(
                DEFAULT_CONFIG,
                "config/simulate.yml",
                None,
            )?;
            crate::logging::apply_config(&c)?;
            c
        }
    };
    let timeout = arvados::config::units::parse_duration(&args.timeout)
        .map_err(|e| anyhow!("--timeout: {e}"))?;
    if let Some(d) = &args.boot_delay {
        arvados::config::units::parse_duration(d).map_err(|e| anyhow!("--boot-delay: {e}"))?;
        set_param(&mut cluster, "BootDelay", d.clone().into());
    }
    set_param(&mut cluster, "Seed", args.seed.into());
    if let Some(n) = args.max_instances {
        if n < 1 {
            return Err(anyhow!("--max-instances: {n} is not a positive count"));
        }
        cluster.containers.cloud_vms.max_instances = n;
    }
    if args.faults == Faults::Chaos {
        for (k, v) in [
            ("ErrorRateCreate", serde_norway::Value::from(0.1)),
            ("ErrorRateDestroy", 0.1.into()),
            ("MinTimeBetweenCreateCalls", "2ms".into()),
            ("StaleLockMaxLinger", "1s".into()),
            ("ReportBrokenAfter", "20s".into()),
            ("CrunchRunDetachDelay", "20ms".into()),
        ] {
            set_param(&mut cluster, k, v);
        }
        // One popular type is short of capacity.
        let mut cap = serde_norway::Mapping::new();
        cap.insert("m5.xlarge".into(), 3.into());
        set_param(
            &mut cluster,
            "CapacityPerType",
            serde_norway::Value::Mapping(cap),
        );
    }
    let go_duration = |d: Duration| format!("{}ms", d.as_millis());
    if let Some(d) = args.vanish_after {
        set_param(&mut cluster, "VanishAfter", go_duration(d).into());
    }
    if let Some(d) = args.interruption_notice {
        set_param(&mut cluster, "InterruptionNotice", go_duration(d).into());
    }
    if !args.zones.is_empty() {
        let zones = args.zones.iter().map(|z| z.clone().into()).collect();
        set_param(&mut cluster, "Zones", serde_norway::Value::Sequence(zones));
    }
    if !args.capacity_shortage.is_empty() {
        let mut short = serde_norway::Mapping::new();
        for (ty, d) in &args.capacity_shortage {
            short.insert(ty.clone().into(), d.clone().into());
        }
        set_param(
            &mut cluster,
            "ShortOfCapacityUntil",
            serde_norway::Value::Mapping(short),
        );
    }
    cluster.containers.cloud_vms.driver = "stub".into();
    // The harness (fake API, stub VMs, fake crunch-runs, this report) runs on one runtime and
    // the dispatcher on its own, whose threads the heap tally counts apart.
    let rt = tokio::runtime::Runtime::new()?;
    let dispatcher = tokio::runtime::Builder::new_multi_thread()
        .thread_name("dispatcher")
        .on_thread_start(|| heap_tally::mark_thread(Side::Dispatcher))
        .enable_all()
        .build()?;
    let ok = rt.block_on(simulate(
        cluster,
        settings,
        args,
        timeout,
        dispatcher.handle().clone(),
    ));
    dispatcher.shutdown_timeout(Duration::from_secs(5));
    ok
}

async fn simulate(
    mut cluster: arvados::Cluster,
    settings: dispatchcloud::settings::Settings,
    args: SimulateArgs,
    timeout: Duration,
    dispatcher: tokio::runtime::Handle,
) -> anyhow::Result<bool> {
    let fake = FakeArvados::start(FakeConfig {
        cluster_id: cluster.cluster_id.clone(),
        ..FakeConfig::default()
    })
    .await?;
    let mut workload = testkit::fake_api::generate_workload(args.containers, args.seed);
    if let Some((lo, hi)) = args.run_time {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0x5eed_0f2a_11ce);
        for spec in &mut workload {
            let ms = rng.random_range(lo.as_millis()..=hi.as_millis());
            for (k, v) in &mut spec.environment {
                if k == "FAKE_CRUNCH_RUN_MS" {
                    *v = ms.to_string();
                }
            }
        }
    }
    let fake = Arc::new(fake);
    let total = workload.len();
    // Queued containers' uuids, in workload order (all at once, or one per arrival interval).
    let queued: Arc<parking_lot::Mutex<Vec<String>>> = Default::default();
    let arrivals = match args.arrival_interval {
        None => {
            *queued.lock() = workload.iter().map(|c| fake.add_container(c)).collect();
            None
        }
        Some(every) => {
            let (fake, queued, workload) = (fake.clone(), queued.clone(), workload.clone());
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for spec in &workload {
                    tick.tick().await;
                    let u = fake.add_container(spec);
                    queued.lock().push(u);
                }
            }))
        }
    };
    cluster.services.controller.external_url = fake.base_url().to_string();
    cluster.system_root_token = fake.root_token().to_string();
    if cluster.containers.dispatch_private_key.is_empty() {
        cluster.containers.dispatch_private_key = cloud::sshd::new_ed25519_key()
            .to_openssh(russh_line_ending())
            .map(|k| k.to_string())
            .map_err(|e| anyhow!("generating a dispatch key: {e}"))?;
    }
    if cluster.management_token.is_empty() {
        cluster.management_token = cloud::tags::new_instance_secret();
    }
    // The stub cloud is built here so the run can be judged from its own record of VMs and
    // crunch-run processes, not from the dispatcher's bookkeeping.
    let params = serde_json::to_value(&cluster.containers.cloud_vms.driver_parameters)?;
    let stub_cfg = StubConfig::from_params(&params).map_err(|e| anyhow!("{e}"))?;
    let boot_delay = stub_cfg.boot_delay;
    let cloud = Arc::new(StubSet::new(stub_cfg));
    cloud.run_vms_on(tokio::runtime::Handle::current());
    let mut drivers = crate::drivers::registry();
    drivers.register("stub", Arc::new(SharedStubDriver(cloud.clone())));
    // Everything the dispatcher builds and spawns belongs to its runtime (and its side of the
    // heap tally), including the management API's listener.
    let (svc, listener) = {
        let _rt = dispatcher.enter();
        heap_tally::mark_thread(Side::Dispatcher);
        let built = Service::build_with(&cluster, &settings, &drivers);
        heap_tally::mark_thread(Side::Harness);
        let listener = std::net::TcpListener::bind(args.listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .with_context(|| format!("--listen {}", args.listen))?;
        (built?, listener)
    };
    let dispatcher_heap_at_start = heap_tally::live(Side::Dispatcher);
    let api_url = format!("http://{}", listener.local_addr()?);
    println!(
        "simulate: {} containers (seed {}, faults {:?}) on a fake Arvados at {} with the stub cloud",
        args.containers,
        args.seed,
        args.faults,
        fake.base_url()
    );
    println!(
        "management API: {api_url}  (Authorization: Bearer {})",
        cluster.management_token
    );
    // Ctrl-C ends the run early (VMs are then left for the report to count).
    let interrupted = crate::service::shutdown_on_signals();
    let tasks = dispatchcloud::tasks::Tasks::new();
    let router = dispatchcloud::service::api::router(svc.clone());
    let on_dispatcher = dispatcher.enter();
    tasks.spawn(dispatchcloud::service::http_server::serve(
        listener,
        router,
        dispatchcloud::service::http_server::ServeOptions::default(),
        tasks.token().clone(),
    ));
    {
        let svc = svc.clone();
        let stop = tasks.token().clone();
        tasks.spawn(async move {
            if let Err(e) = svc.run(stop).await {
                tracing::error!(error = %e, "dispatcher stopped");
            }
        });
    }
    drop(on_dispatcher);

    let type_tag =
        cloud::tags::TagKeys::new(&cluster.containers.cloud_vms.tag_key_prefix).instance_type();
    let started = Instant::now();
    let started_wall = chrono::Utc::now();
    let mut vm_prices: std::collections::HashMap<String, f64> = Default::default();
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_count = Instant::now() - Duration::from_secs(1);
    let mut usage = Usage::default();
    let mut last_sample = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let mut injected_503 = args.faults != Faults::Chaos;
    let mut retries = Retries::default();
    let finished = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let dt = last_sample.elapsed().as_secs_f64();
        last_sample = Instant::now();
        // Sampling must stay cheap next to what it measures: no record copies here.
        let instances = svc.pool.usage_sample();
        usage.peak_instances = usage.peak_instances.max(instances.len());
        let vms = cloud.vms();
        let mut fleet_price = 0.0;
        for vm in &vms {
            use cloud::Instance;
            let id = vm.id();
            let price = match vm_prices.get(&id) {
                Some(p) => *p,
                None => {
                    let p = vm
                        .tags()
                        .get(&type_tag)
                        .and_then(|ty| cluster.instance_types.get(ty))
                        .map_or(0.0, |it| it.price);
                    vm_prices.insert(id, p);
                    p
                }
            };
            fleet_price += price;
        }
        usage.peak_price_per_hour = usage.peak_price_per_hour.max(fleet_price);
        for (_, price, busy) in &instances {
            if *busy {
                usage.busy_seconds += dt;
            } else {
                usage.idle_seconds += dt;
            }
            usage.cost += price * dt / 3600.0;
        }
        // Counting every container's state is the harness's own cost: a few times a second
        // is enough.
        if last_count.elapsed() >= Duration::from_millis(300) {
            last_count = Instant::now();
            if args.retries > 0 {
                retries.scan(&fake, &queued.lock(), &workload, args.retries);
            }
            by_state = fake.count_by_state();
        }
        let done = by_state.get("Complete").copied().unwrap_or(0)
            + by_state.get("Cancelled").copied().unwrap_or(0);
        if !injected_503 && done * 2 >= total {
            // Halfway: the API is overloaded for a moment.
            fake.inject_fault(
                Fault::new(FaultKind::Unavailable)
                    .on("GET", "/arvados/v1/containers")
                    .times(3),
            );
            injected_503 = true;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let mut workers: BTreeMap<&str, usize> = BTreeMap::new();
            for (state, _, _) in &instances {
                *workers.entry(state.as_str()).or_default() += 1;
            }
            let n = |k: &str| by_state.get(k).copied().unwrap_or(0);
            println!(
                "[{:>6.1}s] containers: {} queued, {} locked, {} running, {} done | instances: {}",
                started.elapsed().as_secs_f64(),
                n("Queued"),
                n("Locked"),
                n("Running"),
                done,
                if workers.is_empty() {
                    "none".to_string()
                } else {
                    workers
                        .iter()
                        .map(|(s, n)| format!("{n} {s}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
        if done == total + retries.made.len()
            && queued.lock().len() == total
            && instances.is_empty()
            && cloud.vms().is_empty()
            && svc.pool.instances().is_empty()
        {
            break true;
        }
        if started.elapsed() > timeout || interrupted.is_cancelled() {
            break false;
        }
    };
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_by_side();
    if let Some(a) = arrivals {
        a.abort();
    }
    let uuids: Vec<String> = queued.lock().clone();
    let requests = fake.requests();
    let minutes = (wall / 60.0).max(1e-9);
    let api = json!({
        "requests_per_minute": requests.len() as f64 / minutes,
        "list_requests_per_minute": requests
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/arvados/v1/containers")
            .count() as f64
            / minutes,
        "rows_listed_per_minute": fake.rows_listed() as f64 / minutes,
        // Every request by method and path, ids replaced by `{uuid}`.
        "requests_by_kind": requests_by_kind(&requests),
    });
    // The service joins its own tasks (bounded); this bound covers it and the HTTP drain.
    tasks.join("simulate", Duration::from_secs(60)).await;
    // Leaks as the cloud sees them.
    let vms_left = testkit::oracle::leaked_vms(&cloud).len();
    let launches = launch_summary(&cloud.launch_log());
    let lost = lost_work(&cloud.process_lives());

    // Outcomes from the fake API's record of state changes.
    let changes = fake.state_changes();
    let mut runs: BTreeMap<&str, usize> = BTreeMap::new();
    let mut first_running: BTreeMap<&str, chrono::DateTime<chrono::Utc>> = BTreeMap::new();
    let lives = cloud.process_lives();
    let vms: BTreeMap<String, testkit::stub_driver::VmRecord> = cloud
        .vm_history()
        .into_iter()
        .map(|v| (v.id.clone(), v))
        .collect();
    let mut splits: Vec<WaitSplit> = Vec::new();
    // Each container's first crunch-run (lives are in start order), and the lives on each VM:
    // looked up per container below, so a report over many containers stays linear.
    let mut first_life: std::collections::HashMap<&str, &testkit::stub_driver::ProcessLife> =
        Default::default();
    let mut lives_on: std::collections::HashMap<&str, Vec<&testkit::stub_driver::ProcessLife>> =
        Default::default();
    for l in &lives {
        first_life.entry(l.uuid.as_str()).or_insert(l);
        lives_on.entry(l.vm.as_str()).or_default().push(l);
    }
    // When the first crunch-run of each container started, from the run's start (s).
    let mut first_starts: Vec<f64> = first_life
        .values()
        .map(|l| {
            (l.started_at - started_wall)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1e6
        })
        .collect();
    first_starts.sort_by(f64::total_cmp);
    let nth_start = |n: usize| -> Value {
        if n >= 1 && n <= first_starts.len() {
            json!(first_starts[n - 1])
        } else {
            Value::Null
        }
    };
    for c in &changes {
        if c.to == "Running" {
            *runs.entry(c.uuid.as_str()).or_default() += 1;
            first_running.entry(c.uuid.as_str()).or_insert(c.at);
        }
    }
    // Never twice at once, never after the end: from the cloud's record of crunch-run lives.
    let mut ran_twice: Vec<String> = runs
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(u, _)| format!("{u} went Running twice"))
        .collect();
    ran_twice.extend(testkit::oracle::violations(&cloud, &changes));
    let chooser = TypeChooser::new(&cluster);
    let (mut complete, mut cancelled, mut unfinished) = (0, 0, 0);
    let mut latencies = Vec::new();
    // The same for the containers that asked for a preemptible (spot) instance.
    let mut spot_latencies = Vec::new();
    let mut ideal = 0.0;
    let mut ideal_with_boot = 0.0;
    for (u, spec) in uuids.iter().zip(&workload) {
        let rec = fake.container(u).unwrap_or(Value::Null);
        match rec["state"].as_str() {
            Some("Complete") => complete += 1,
            Some("Cancelled") => cancelled += 1,
            _ => unfinished += 1,
        }
        let created_at = rec["created_at"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc));
        if let (Some(created), Some(life)) = (created_at, first_life.get(u.as_str()))
            && let Some(vm) = vms.get(&life.vm)
        {
            // The VM was last freed by a crunch-run on it that ended before this one began.
            let wall_end = |l: &testkit::stub_driver::ProcessLife| {
                l.end.map(|e| {
                    l.started_at + chrono::Duration::from_std(e - l.start).unwrap_or_default()
                })
            };
            let freed = lives_on
                .get(life.vm.as_str())
                .into_iter()
                .flatten()
                .copied()
                .filter(|l| l.start < life.start)
                .filter_map(wall_end)
                .filter(|e| *e <= life.started_at)
                .max();
            splits.push(WaitSplit::of(
                created,
                vm.created_at,
                vm.ready_at,
                freed,
                life.started_at,
            ));
        }
        if let (Some(run_at), Some(created)) = (
            first_running.get(u.as_str()),
            rec["created_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
        ) {
            let wait =
                (*run_at - created.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0;
            latencies.push(wait);
            if spec.preemptible {
                spot_latencies.push(wait);
            }
        }
        let run_ms: f64 = spec
            .environment
            .iter()
            .find(|(k, _)| k == "FAKE_CRUNCH_RUN_MS")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0);
        if let Ok(ctr) = serde_json::from_value::<arvados::Container>(rec.clone())
            && let Ok(types) = chooser.choose(&ctr)
            && let Some(cheapest) = types.first()
        {
            ideal += cheapest.price * run_ms / 1000.0 / 3600.0;
            ideal_with_boot +=
                cheapest.price * (run_ms / 1000.0 + boot_delay.as_secs_f64()) / 3600.0;
        }
    }
    let retried = retries.summary(&fake, &uuids, &lives);
    latencies.sort_by(f64::total_cmp);
    spot_latencies.sort_by(f64::total_cmp);
    let quantiles = |pick: fn(&WaitSplit) -> f64| {
        let mut v: Vec<f64> = splits.iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        json!({"p50": percentile(&v, 0.5), "p99": percentile(&v, 0.99), "max": v.last().copied().unwrap_or(0.0)})
    };
    let mut warm: Vec<f64> = splits.iter().filter(|s| s.warm).map(|s| s.total).collect();
    warm.sort_by(f64::total_cmp);
    let split = json!({
        "containers": splits.len(),
        "queue": quantiles(|s| s.queue),
        "boot": quantiles(|s| s.boot),
        "dispatch_overhead": quantiles(|s| s.overhead),
        "sum": {
            "queue": splits.iter().map(|s| s.queue).sum::<f64>(),
            "boot": splits.iter().map(|s| s.boot).sum::<f64>(),
            "dispatch_overhead": splits.iter().map(|s| s.overhead).sum::<f64>(),
            "total": splits.iter().map(|s| s.total).sum::<f64>(),
        },
    });
    let efficiency = |ideal: f64| {
        if usage.cost > 0.0 {
            ideal / usage.cost
        } else {
            0.0
        }
    };
    let total_seconds = usage.busy_seconds + usage.idle_seconds;
    let end_to_end = seconds_to_last_final(started_wall, &changes);
    let report = json!({
        "containers": uuids.len(),
        "complete": complete,
        "cancelled": cancelled,
        "unfinished": unfinished,
        "ran_more_than_once": ran_twice,
        // With --retries: the retry containers (not in the counts above).
        "retries": retried,
        "wall_seconds": wall,
        "containers_per_second": if wall > 0.0 { (complete + cancelled) as f64 / wall } else { 0.0 },
        // Issue 18's throughput: from the start of the run (the first Queued) to the last
        // Complete or Cancelled, without the idle instances' shutdown afterwards.
        "end_to_end_seconds": end_to_end,
        "end_to_end_containers_per_second": end_to_end.filter(|t| *t > 0.0).map(|t| (complete + cancelled) as f64 / t),
        // Create calls as the stub cloud answered them; `failed_for_capacity` are the wasted
        // launches.
        "launches": launches,
        // crunch-runs whose VM went away under them (taken back by the cloud, or destroyed),
        // from the stub cloud's record: their run time until then is lost work.
        "interruptions": lost,
        "instances_peak": usage.peak_instances,
        "instances_left": vms_left,
        "instance_seconds": {"busy": usage.busy_seconds, "idle": usage.idle_seconds, "total": total_seconds},
        "cost": {
            "estimated": usage.cost,
            "ideal": ideal,
            "ideal_with_boot": ideal_with_boot,
            "efficiency": efficiency(ideal),
            "efficiency_with_boot": efficiency(ideal_with_boot),
        },
        "queue_to_crunch_run_split_seconds": split,
        // Queued → crunch-run for the containers queued while their VM was up and idle.
        "warm_queue_to_crunch_run_seconds": {
            "containers": warm.len(),
            "p50": percentile(&warm, 0.5),
            "p99": percentile(&warm, 0.99),
            "max": warm.last().copied().unwrap_or(0.0),
        },
        // Seconds from the start of the run until the 1st, 1 000th, 10 000th and last
        // crunch-run started (null when fewer ran).
        "started_after_seconds": {
            "first": nth_start(1),
            "1000": nth_start(1000),
            "10000": nth_start(10000),
            "all": nth_start(first_starts.len()),
        },
        "api": api,
        // CPU seconds of the dispatcher's runtime threads and of every other thread (the
        // harness), from the kernel's per-thread accounting; threads that already ended are
        // not counted. Null where /proc has no schedstat.
        "cpu_seconds": cpu.map(|(d, h)| json!({"dispatcher": d, "harness": h})),
        // Live heap bytes by who allocated them (counted only in a `heap-tally` build).
        "heap_bytes": {
            "counted": cfg!(feature = "heap-tally"),
            "dispatcher_at_start": dispatcher_heap_at_start,
            "dispatcher_peak": heap_tally::peak(Side::Dispatcher),
            "harness_peak": heap_tally::peak(Side::Harness),
        },
        "fleet_price_per_hour_peak": usage.peak_price_per_hour,
        "spend_cap_per_hour": settings.spend_caps.max_cost_per_hour,
        "queue_to_crunch_run_seconds": {
            "p50": percentile(&latencies, 0.5),
            "p95": percentile(&latencies, 0.95),
            "max": latencies.last().copied().unwrap_or(0.0),
        },
        // Queued → Running for the containers that asked for a preemptible instance.
        "spot_queue_to_crunch_run_seconds": {
            "containers": spot_latencies.len(),
            "p50": percentile(&spot_latencies, 0.5),
            "p95": percentile(&spot_latencies, 0.95),
            "max": spot_latencies.last().copied().unwrap_or(0.0),
        },
        "seed": args.seed,
        "faults": format!("{:?}", args.faults).to_lowercase(),
    });
    println!("\nsummary");
    println!(
        "  containers:       {complete} complete, {cancelled} cancelled, {unfinished} unfinished (of {})",
        uuids.len()
    );
    println!(
        "  ran more than once: {}",
        if ran_twice.is_empty() {
            "none".to_string()
        } else {
            ran_twice.join(", ")
        }
    );
    println!(
        "  wall time:        {wall:.1} s ({:.1} containers/s)",
        report["containers_per_second"].as_f64().unwrap_or(0.0)
    );
    if let Some(t) = end_to_end {
        println!(
            "  end to end:       {t:.1} s from the first queued to the last finished ({:.1} containers/s)",
            report["end_to_end_containers_per_second"]
                .as_f64()
                .unwrap_or(0.0)
        );
    }
    println!(
        "  launches:         {} create calls, {} made a VM, {} wasted on capacity errors",
        report["launches"]["calls"],
        report["launches"]["made"],
        report["launches"]["failed_for_capacity"],
    );
    if report["interruptions"]["crunch_runs_cut"].as_u64() != Some(0) {
        println!(
            "  interruptions:    {} crunch-runs cut on {} VMs, {:.1} s of work lost",
            report["interruptions"]["crunch_runs_cut"],
            report["interruptions"]["vms"],
            report["interruptions"]["work_lost_seconds"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    let r = &report["retries"];
    if r["containers"].as_u64().unwrap_or(0) > 0 {
        let d = &r["restart_delay_seconds"];
        println!(
            "  retries:          {} containers ({} originals complete in the end); restart delay p50 {:.2} s, p95 {:.2} s, max {:.2} s",
            r["containers"],
            r["originals_complete_in_the_end"],
            d["p50"].as_f64().unwrap_or(0.0),
            d["p95"].as_f64().unwrap_or(0.0),
            d["max"].as_f64().unwrap_or(0.0),
        );
    }
    println!(
        "  instance time:    {:.1} s busy + {:.1} s idle = {:.1} s (peak {} instances, {} left)",
        usage.busy_seconds, usage.idle_seconds, total_seconds, usage.peak_instances, vms_left
    );
    println!(
        "  cost:             ${:.4} estimated vs ${:.4} ideal (each container's run time on its cheapest type)",
        usage.cost, ideal
    );
    println!(
        "  cost efficiency:  {:.0}% of the ideal, {:.0}% counting each container's boot ({}s)",
        100.0 * efficiency(ideal),
        100.0 * efficiency(ideal_with_boot),
        boot_delay.as_secs_f64()
    );
    let q = |k: &str, p: &str| {
        report["queue_to_crunch_run_split_seconds"][k][p]
            .as_f64()
            .unwrap_or(0.0)
    };
    println!(
        "  of which:         queued p50 {:.2} s / p99 {:.2} s, booting p50 {:.2} s / p99 {:.2} s, dispatcher overhead (instance ready → crunch-run) p50 {:.3} s / p99 {:.3} s",
        q("queue", "p50"),
        q("queue", "p99"),
        q("boot", "p50"),
        q("boot", "p99"),
        q("dispatch_overhead", "p50"),
        q("dispatch_overhead", "p99"),
    );
    if !warm.is_empty() {
        println!(
            "  warm starts:      {} containers queued onto an idle VM: queue → crunch-run p50 {:.3} s / p99 {:.3} s",
            warm.len(),
            percentile(&warm, 0.5),
            percentile(&warm, 0.99),
        );
    }
    println!(
        "  API:              {:.0} requests/min ({:.0} queue polls/min, {:.0} rows listed/min)",
        report["api"]["requests_per_minute"].as_f64().unwrap_or(0.0),
        report["api"]["list_requests_per_minute"]
            .as_f64()
            .unwrap_or(0.0),
        report["api"]["rows_listed_per_minute"]
            .as_f64()
            .unwrap_or(0.0),
    );
    if let Some((d, h)) = cpu {
        println!(
            "  CPU:              dispatcher {d:.1} s ({:.2} ms per container), harness {h:.1} s",
            d * 1000.0 / (complete + cancelled).max(1) as f64
        );
    }
    if cfg!(feature = "heap-tally") {
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        println!(
            "  heap:             dispatcher peak {:.1} MiB ({:.1} MiB at start), harness peak {:.1} MiB",
            mib(heap_tally::peak(Side::Dispatcher)),
            mib(dispatcher_heap_at_start),
            mib(heap_tally::peak(Side::Harness)),
        );
    }
    if settings.spend_caps.is_set() {
        println!(
            "  spend cap:        peak fleet price ${:.4}/h (cap ${:.4}/h, ${:.4}/day)",
            usage.peak_price_per_hour,
            settings.spend_caps.max_cost_per_hour,
            settings.spend_caps.max_cost_per_day
        );
    }
    println!(
        "  queue → crunch-run: p50 {:.2} s, p95 {:.2} s, max {:.2} s",
        report["queue_to_crunch_run_seconds"]["p50"]
            .as_f64()
            .unwrap_or(0.0),
        report["queue_to_crunch_run_seconds"]["p95"]
            .as_f64()
            .unwrap_or(0.0),
        report["queue_to_crunch_run_seconds"]["max"]
            .as_f64()
            .unwrap_or(0.0),
    );
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("--report {}", path.display()))?;
    }
    let ok = finished && ran_twice.is_empty() && unfinished == 0 && vms_left == 0;
    if !finished {
        println!("  DID NOT FINISH (timeout or interrupted)");
    }
    Ok(ok)
}

/// How many requests the fake API answered, by `METHOD path` with Arvados uuids replaced by
/// `{uuid}` (e.g. `POST /arvados/v1/containers/{uuid}/lock`).
fn requests_by_kind(requests: &[testkit::fake_api::RequestRecord]) -> BTreeMap<String, usize> {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for r in requests {
        let path: Vec<&str> = r
            .path
            .split('/')
            .map(|seg| {
                let parts: Vec<&str> = seg.split('-').collect();
                if parts.len() == 3 && parts[0].len() == 5 && parts[1].len() == 5 {
                    "{uuid}"
                } else {
                    seg
                }
            })
            .collect();
        *by.entry(format!("{} {}", r.method, path.join("/")))
            .or_default() += 1;
    }
    by
}

/// CPU seconds used so far by this process's live threads: those of the dispatcher's runtime
/// (named `dispatcher`) and all others. From `/proc/self/task/*/schedstat` (nanoseconds on
/// the CPU); `None` where that does not exist.
fn cpu_by_side() -> Option<(f64, f64)> {
    let (mut dispatcher, mut harness, mut any) = (0u64, 0u64, false);
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = task.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("schedstat")),
        ) else {
            continue;
        };
        let Some(ns) = stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            continue;
        };
        any = true;
        if comm.trim_end() == "dispatcher" {
            dispatcher += ns;
        } else {
            harness += ns;
        }
    }
    any.then(|| (dispatcher as f64 / 1e9, harness as f64 / 1e9))
}

fn russh_line_ending() -> russh::keys::ssh_key::LineEnding {
    russh::keys::ssh_key::LineEnding::LF
}

/// Seconds from `started` to the last change into Complete or Cancelled (`None` if none).
fn seconds_to_last_final(
    started: chrono::DateTime<chrono::Utc>,
    changes: &[testkit::fake_api::StateChange],
) -> Option<f64> {
    changes
        .iter()
        .filter(|c| c.to == "Complete" || c.to == "Cancelled")
        .map(|c| c.at)
        .max()
        .map(|t| (t - started).num_microseconds().unwrap_or(0) as f64 / 1e6)
}

/// Where one container's time from queued to crunch-run went. The three parts add up to the
/// whole: `boot` is the part spent waiting for its VM's boot, `overhead` the dispatcher's own
/// time from "a ready VM had room" to crunch-run started, `queue` the rest (waiting for
/// capacity, limits, a pass).
#[derive(Debug, Clone, Copy, PartialEq)]
struct WaitSplit {
    queue: f64,
    boot: f64,
    overhead: f64,
    /// Queued to crunch-run started, by the cloud's clock.
    total: f64,
    /// Its VM was up and idle when the container was queued (a warm pool's start).
    warm: bool,
}

impl WaitSplit {
    fn of(
        created: chrono::DateTime<chrono::Utc>,
        vm_created: chrono::DateTime<chrono::Utc>,
        vm_ready: chrono::DateTime<chrono::Utc>,
        vm_freed: Option<chrono::DateTime<chrono::Utc>>,
        started: chrono::DateTime<chrono::Utc>,
    ) -> WaitSplit {
        let secs = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0) as f64 / 1e6;
        let total = secs(started - created).max(0.0);
        let boot = secs(vm_ready - created.max(vm_created)).clamp(0.0, total);
        let available = [Some(created), Some(vm_ready), vm_freed]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(created);
        let overhead = secs(started - available).clamp(0.0, total - boot);
        WaitSplit {
            queue: total - boot - overhead,
            boot,
            overhead,
            total,
            warm: vm_ready <= created && vm_freed.is_none_or(|f| f <= created),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_to_end_runs_to_the_last_complete_or_cancelled_change() {
        let t = |ms: i64| {
            chrono::DateTime::<chrono::Utc>::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
        };
        let change = |to: &str, ms: i64| testkit::fake_api::StateChange {
            uuid: "zzzzz-dz642-000000000000001".into(),
            from: String::new(),
            to: to.into(),
            by: String::new(),
            at: t(ms),
        };
        assert_eq!(seconds_to_last_final(t(0), &[]), None);
        let changes = [
            change("Locked", 100),
            change("Complete", 1500),
            change("Cancelled", 2500),
            change("Running", 4000),
            change("Complete", 2000),
        ];
        assert_eq!(seconds_to_last_final(t(0), &changes), Some(2.5));
    }

    #[test]
    fn a_wait_splits_into_queue_boot_and_overhead_that_add_up() {
        let t = |ms: i64| {
            chrono::DateTime::<chrono::Utc>::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
        };
        let near = |s: WaitSplit, want: (f64, f64, f64)| {
            assert!(
                (s.queue - want.0).abs() < 1e-9
                    && (s.boot - want.1).abs() < 1e-9
                    && (s.overhead - want.2).abs() < 1e-9,
                "{s:?} != {want:?}"
            );
        };
        // Queued at 0, its VM made at once and ready at 2 s, crunch-run at 2.1 s: boot plus
        // 0.1 s overhead.
        near(
            WaitSplit::of(t(0), t(0), t(2000), None, t(2100)),
            (0.0, 2.0, 0.1),
        );
        assert!(!WaitSplit::of(t(0), t(0), t(2000), None, t(2100)).warm);
        // Queued onto a VM idle since 1 s before (freed then): warm, all of it overhead.
        let warm = WaitSplit::of(t(0), t(-90_000), t(-60_000), Some(t(-1000)), t(300));
        near(warm, (0.0, 0.0, 0.3));
        assert!(warm.warm);
        // Never used, ready before the container was queued: warm too.
        assert!(WaitSplit::of(t(0), t(-9000), t(-10), None, t(100)).warm);
        // A VM ready long before, freed by another container at 5 s, start at 5.05 s: 5 s of
        // queueing (no capacity), 0.05 s overhead.
        near(
            WaitSplit::of(t(0), t(-90_000), t(-60_000), Some(t(5000)), t(5050)),
            (5.0, 0.0, 0.05),
        );
        // Busy when it was queued (freed only later): not a warm start.
        assert!(!WaitSplit::of(t(0), t(-90_000), t(-60_000), Some(t(5000)), t(5050)).warm);
        // Waited 1 s for a create, then a 2 s boot: 1 s queue, 2 s boot.
        near(
            WaitSplit::of(t(0), t(1000), t(3000), None, t(3000)),
            (1.0, 2.0, 0.0),
        );
        // Whatever the clocks say, the parts are never negative and add up.
        for (c, r, f, st) in [
            (0, 5000, Some(9000), 4000),
            (100, 0, None, 50),
            (0, 0, Some(-5), 0),
        ] {
            let s = WaitSplit::of(t(c), t(c), t(r), f.map(t), t(st));
            let total = ((st - c) as f64 / 1000.0).max(0.0);
            assert!(
                s.queue >= 0.0 && s.boot >= 0.0 && s.overhead >= 0.0,
                "{s:?}"
            );
            assert!(
                (s.queue + s.boot + s.overhead - total).abs() < 1e-9,
                "{s:?}"
            );
        }
    }

    /// A thread named `dispatcher` (as the dispatcher runtime's are) is counted on the
    /// dispatcher's side: it spins until that side reaches 0.2 s of CPU, which it cannot if its
    /// time went to the harness side.
    #[test]
    fn cpu_of_dispatcher_threads_counts_on_the_dispatcher_side() {
        let reached = std::thread::Builder::new()
            .name("dispatcher".into())
            .spawn(|| {
                let until = Instant::now() + Duration::from_secs(30);
                let mut x = 0u64;
                while Instant::now() < until {
                    for i in 0..100_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                    if cpu_by_side().expect("schedstat").0 >= 0.2 {
                        return true;
                    }
                }
                false
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(reached, "the dispatcher side never reached 0.2 s of CPU");
    }

    #[test]
    fn requests_are_counted_by_method_and_path_without_uuids() {
        let req = |method: &str, path: &str| testkit::fake_api::RequestRecord {
            wire_method: method.into(),
            method: method.into(),
            path: path.into(),
            query_len: 0,
            method_override: None,
            params: Default::default(),
        };
        let by = requests_by_kind(&[
            req("GET", "/arvados/v1/containers"),
            req("GET", "/arvados/v1/containers"),
            req(
                "POST",
                "/arvados/v1/containers/zzzzz-dz642-000000000000001/lock",
            ),
            req(
                "POST",
                "/arvados/v1/containers/zzzzz-dz642-000000000000002/lock",
            ),
            req("GET", "/arvados/v1/containers/zzzzz-dz642-000000000000002"),
        ]);
        let want: BTreeMap<String, usize> = [
            ("GET /arvados/v1/containers", 2),
            ("GET /arvados/v1/containers/{uuid}", 1),
            ("POST /arvados/v1/containers/{uuid}/lock", 2),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(by, want);
    }

    #[test]
    fn run_time_is_one_duration_or_a_range() {
        let s = Duration::from_secs;
        assert_eq!(parse_run_time("2s"), Ok((s(2), s(2))));
        assert_eq!(parse_run_time("1s..5s"), Ok((s(1), s(5))));
        assert_eq!(parse_run_time("0s"), Ok((s(0), s(0))));
        assert!(
            parse_run_time("5s..1s")
                .unwrap_err()
                .contains("minimum is larger")
        );
        assert!(parse_run_time("soon").is_err());
        assert!(parse_run_time("1s..").is_err());
    }
}
