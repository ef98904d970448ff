//! The pool's metrics (spec §8.16, Appendix C), with Arvados' names, types and labels, and a
//! small Prometheus *summary* (the `prometheus` crate has none): count and sum since start,
//! quantiles {0.5, 0.9, 0.95, 0.99} over the samples of the last 10 minutes, as Go's default.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use arvados::InstanceType;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary as PSummary,
};
use prometheus::{CounterVec, Gauge, GaugeVec, IntCounter, IntGauge, Registry};

const QUANTILES: [f64; 4] = [0.5, 0.9, 0.95, 0.99];
const MAX_AGE: Duration = Duration::from_secs(600);
const MAX_SAMPLES: usize = 10_000;

#[derive(Default)]
struct SummaryData {
    count: u64,
    sum: f64,
    recent: VecDeque<(Instant, f64)>,
}

/// A summary metric, optionally with labels.
pub struct Summary {
    desc: Desc,
    name: String,
    help: String,
    label_names: Vec<String>,
    data: Mutex<BTreeMap<Vec<String>, SummaryData>>,
}

impl Summary {
    pub fn new(name: &str, help: &str, label_names: &[&str]) -> Result<Summary, prometheus::Error> {
        // Without labels it is exposed from the start (count 0), as Prometheus clients do.
        let mut data = BTreeMap::new();
        if label_names.is_empty() {
            data.insert(Vec::new(), SummaryData::default());
        }
        Ok(Summary {
            desc: Desc::new(
                name.into(),
                help.into(),
                label_names.iter().map(|s| s.to_string()).collect(),
                HashMap::new(),
            )?,
            name: name.into(),
            help: help.into(),
            label_names: label_names.iter().map(|s| s.to_string()).collect(),
            data: Mutex::new(data),
        })
    }

    pub fn observe(&self, label_values: &[&str], v: f64) {
        let now = Instant::now();
        let mut data = self.data.lock();
        let d = data
            .entry(label_values.iter().map(|s| s.to_string()).collect())
            .or_default();
        d.count += 1;
        d.sum += v;
        d.recent.push_back((now, v));
        while d.recent.len() > MAX_SAMPLES
            || d.recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > MAX_AGE)
        {
            d.recent.pop_front();
        }
    }

    /// Expose the series for `label_values` (count 0) before its first observation.
    pub fn init(&self, label_values: &[&str]) {
        let mut data = self.data.lock();
        data.entry(label_values.iter().map(|s| s.to_string()).collect())
            .or_default();
    }

    /// Samples observed so far (for tests and reports).
    pub fn count(&self, label_values: &[&str]) -> u64 {
        let key: Vec<String> = label_values.iter().map(|s| s.to_string()).collect();
        let data = self.data.lock();
        data.get(&key).map_or(0, |d| d.count)
    }
}

impl Collector for Summary {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let now = Instant::now();
        let data = self.data.lock();
        let mut metrics = Vec::new();
        for (values, d) in data.iter() {
            let mut recent: Vec<f64> = d
                .recent
                .iter()
                .filter(|(t, _)| now.duration_since(*t) <= MAX_AGE)
                .map(|(_, v)| *v)
                .collect();
            recent.sort_by(f64::total_cmp);
            let quantiles = QUANTILES
                .iter()
                .map(|q| {
                    let mut qu = Quantile::default();
                    qu.set_quantile(*q);
                    let v = if recent.is_empty() {
                        f64::NAN
                    } else {
                        let i = ((recent.len() as f64 * q).ceil() as usize).clamp(1, recent.len());
                        recent[i - 1]
                    };
                    qu.set_value(v);
                    qu
                })
                .collect();
            let mut s = PSummary::default();
            s.set_sample_count(d.count);
            s.set_sample_sum(d.sum);
            s.set_quantile(quantiles);
            let mut m = Metric::default();
            m.set_label(
                self.label_names
                    .iter()
                    .zip(values)
                    .map(|(n, v)| {
                        let mut l = LabelPair::default();
                        l.set_name(n.clone());
                        l.set_value(v.clone());
                        l
                    })
                    .collect(),
            );
            m.set_summary(s);
            metrics.push(m);
        }
        let mut f = MetricFamily::default();
        f.set_name(self.name.clone());
        f.set_help(self.help.clone());
        f.set_field_type(MetricType::SUMMARY);
        f.set_metric(metrics);
        vec![f]
    }
}

use cloud::metrics::dispatchcloud_opts as opts;

fn full(name: &str) -> String {
    format!("arvados_dispatchcloud_{name}")
}

pub const CATEGORIES: [&str; 5] = ["inuse", "hold", "booting", "unknown", "idle"];
pub const BOOT_OUTCOMES: [&str; 4] = ["failure", "success", "aborted", "disappeared"];
pub const STATES: [&str; 5] = ["unknown", "booting", "idle", "running", "shutdown"];
/// The states whose age `instances_state_age_seconds_max` reports: where a VM gets stuck.
pub const AGED_STATES: [&str; 3] = ["unknown", "booting", "shutdown"];

/// Every pool metric of Appendix C.
pub struct PoolMetrics {
    pub containers_running: IntGauge,
    pub instances_total: GaugeVec,
    pub instances_price: GaugeVec,
    pub vcpus_total: GaugeVec,
    pub memory_bytes_total: GaugeVec,
    pub probe_age_max: Gauge,
    pub probe_age_median: Gauge,
    pub boot_outcomes: CounterVec,
    pub disappeared: CounterVec,
    pub time_to_ssh: std::sync::Arc<Summary>,
    pub time_to_ready: std::sync::Arc<Summary>,
    pub time_to_disappear: std::sync::Arc<Summary>,
    pub queue_to_crunch_run: std::sync::Arc<Summary>,
    pub run_probe_duration: std::sync::Arc<Summary>,
    // Not in Arvados: what the dashboards need for cost, capacity and stuck VMs.
    /// Cumulative instance-seconds by category, type and spot-ness.
    pub instances_seconds: CounterVec,
    /// Cumulative cost (price × hours) by category, type and spot-ness.
    pub instances_cost: CounterVec,
    /// VMs whose crunch-run reported them broken (then drained and shut down).
    pub broken: IntCounter,
    /// The age of the oldest VM in each of [`AGED_STATES`].
    pub state_age_max: GaugeVec,
    /// Not in Arvados: when each capacity hold-off ends (Unix time), by offering.
    pub capacity_holdoff_until: GaugeVec,
    /// Not in Arvados: capacity errors in a row by offering since its last successful create
    /// (above 0: the offering is in doubt, see `Capacity.Backoff`).
    pub capacity_errors_in_a_row: GaugeVec,
    /// Counts and prices at the last [`PoolMetrics::set_gauges`], integrated into the two
    /// counters above at the next one.
    integrated: Mutex<Integrated>,
}

/// Instance counts and summed prices per (category, type, preemptible) since `at`.
struct Integrated {
    at: Instant,
    current: BTreeMap<(&'static str, String, &'static str), (f64, f64)>,
    /// The UTC day (days since 1970-01-01) `spent_today` counts, and the cost in it.
    day: u64,
    spent_today: f64,
}

/// Today's number in days since 1970-01-01, UTC.
fn utc_day(now: std::time::SystemTime) -> u64 {
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400)
}

/// Lets an `Arc<Summary>` be registered while its owner keeps observing through it.
struct Shared(std::sync::Arc<Summary>);

impl Collector for Shared {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

impl Summary {
    /// Register this summary in `registry`, keeping the handle for observations.
    pub fn register(
        self: &std::sync::Arc<Self>,
        registry: &Registry,
    ) -> Result<(), prometheus::Error> {
        registry.register(Box::new(Shared(self.clone())))
    }
}

impl PoolMetrics {
    pub fn new(registry: &Registry) -> Result<PoolMetrics, prometheus::Error> {
        let gauge_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, prometheus::Error> {
                let g =
                    cloud::metrics::registered(registry, GaugeVec::new(opts(name, help), labels)?)?;
                Ok(g)
            };
        let summary = |name: &str,
                       help: &str,
                       labels: &[&str]|
         -> Result<std::sync::Arc<Summary>, prometheus::Error> {
            let s = std::sync::Arc::new(Summary::new(&full(name), help, labels)?);
            s.register(registry)?;
            Ok(s)
        };
        let containers_running = cloud::metrics::registered(
            registry,
            IntGauge::with_opts(opts(
                "containers_running",
                "Number of containers reported running by cloud VMs.",
            ))?,
        )?;
        let probe_age_max = cloud::metrics::registered(
            registry,
            Gauge::with_opts(opts(
                "probe_age_seconds_max",
                "Maximum number of seconds since an instance's most recent successful probe.",
            ))?,
        )?;
        let probe_age_median = cloud::metrics::registered(
            registry,
            Gauge::with_opts(opts(
                "probe_age_seconds_median",
                "Median number of seconds since an instance's most recent successful probe.",
            ))?,
        )?;
        let boot_outcomes = cloud::metrics::registered(
            registry,
            CounterVec::new(
                opts("boot_outcomes", "Boot outcomes by type."),
                &["outcome"],
            )?,
        )?;
        for o in BOOT_OUTCOMES {
            boot_outcomes.with_label_values(&[o]);
        }
        let disappeared = cloud::metrics::registered(
            registry,
            CounterVec::new(
                opts(
                    "instances_disappeared",
                    "Number of occurrences of an instance disappearing from the cloud provider's list of instances.",
                ),
                &["state"],
            )?,
        )?;
        for s in STATES {
            disappeared.with_label_values(&[s]);
        }
        let instances_seconds = cloud::metrics::registered(
            registry,
            CounterVec::new(
                opts(
                    "instances_seconds_total",
                    "Cumulative seconds cloud VMs have spent in each category, by instance type.",
                ),
                &["category", "instance_type", "preemptible"],
            )?,
        )?;
        let instances_cost = cloud::metrics::registered(
            registry,
            CounterVec::new(
                opts(
                    "instances_cost_total",
                    "Cumulative cost of cloud VMs (InstanceTypes Price times hours) in each category, by instance type.",
                ),
                &["category", "instance_type", "preemptible"],
            )?,
        )?;
        let broken = cloud::metrics::registered(
            registry,
            IntCounter::with_opts(opts(
                "instances_broken_total",
                "Number of cloud VMs whose crunch-run reported them broken.",
            ))?,
        )?;
        let state_age_max = gauge_vec(
            "instances_state_age_seconds_max",
            "Seconds the oldest cloud VM in each state has been in it (unknown, booting: since it appeared; shutdown: since the first shutdown attempt).",
            &["state"],
        )?;
        for s in AGED_STATES {
            state_age_max.with_label_values(&[s]);
        }
        let capacity_holdoff_until = gauge_vec(
            "capacity_holdoff_until_seconds",
            "When the hold-off after a capacity error ends, as Unix time, by offering (provider type, quota group, or all).",
            &["offering"],
        )?;
        let capacity_errors_in_a_row = gauge_vec(
            "capacity_errors_in_a_row",
            "Capacity errors in a row by offering since its last successful create.",
            &["offering"],
        )?;
        Ok(PoolMetrics {
            containers_running,
            instances_seconds,
            instances_cost,
            broken,
            state_age_max,
            capacity_holdoff_until,
            capacity_errors_in_a_row,
            integrated: Mutex::new(Integrated {
                at: Instant::now(),
                current: BTreeMap::new(),
                day: utc_day(std::time::SystemTime::now()),
                spent_today: 0.0,
            }),
            instances_total: gauge_vec(
                "instances_total",
                "Number of cloud VMs.",
                &["category", "instance_type"],
            )?,
            instances_price: gauge_vec("instances_price", "Price of cloud VMs.", &["category"])?,
            vcpus_total: gauge_vec(
                "vcpus_total",
                "Total VCPUs on all cloud VMs.",
                &["category"],
            )?,
            memory_bytes_total: gauge_vec(
                "memory_bytes_total",
                "Total memory on all cloud VMs.",
                &["category"],
            )?,
            probe_age_max,
            probe_age_median,
            boot_outcomes,
            disappeared,
            time_to_ssh: summary(
                "instances_time_to_ssh_seconds",
                "Number of seconds between instance creation and the first successful SSH connection.",
                &[],
            )?,
            time_to_ready: summary(
                "instances_time_to_ready_for_container_seconds",
                "Number of seconds between the first successful SSH connection and ready to run a container.",
                &[],
            )?,
            time_to_disappear: summary(
                "instances_time_from_shutdown_request_to_disappearance_seconds",
                "Number of seconds between the first shutdown attempt and the disappearance of the worker.",
                &[],
            )?,
            queue_to_crunch_run: summary(
                "containers_time_from_queue_to_crunch_run_seconds",
                "Number of seconds between the queuing of a container and the start of crunch-run.",
                &[],
            )?,
            run_probe_duration: {
                let s = summary(
                    "instances_run_probe_duration_seconds",
                    "Number of seconds per runProbe call.",
                    &["outcome"],
                )?;
                // Both outcomes from the start, so a dashboard's failure rate reads 0, not
                // "No data", until a probe fails.
                s.init(&["success"]);
                s.init(&["fail"]);
                s
            },
        })
    }
}

/// One worker's contribution to the category gauges.
pub struct Sample<'a> {
    pub category: &'static str,
    pub instance_type: &'a str,
    pub preemptible: bool,
    /// One of [`AGED_STATES`] and how long the VM has been in it, or `None`.
    pub state_age: Option<(&'static str, Duration)>,
    pub price: f64,
    pub vcpus: i64,
    pub ram: i64,
    pub processes: usize,
    pub probe_age: Duration,
}

impl PoolMetrics {
    /// The capacity gauges: each offering held off (capacity key, when its hold ends as Unix
    /// time) and each offering's capacity errors in a row. Offerings not given are removed.
    pub fn set_capacity<'a>(
        &self,
        holds: impl Iterator<Item = (&'a str, f64)>,
        errors: impl Iterator<Item = (&'a str, u32)>,
    ) {
        let offering = |k: &'a str| if k.is_empty() { "all" } else { k };
        self.capacity_holdoff_until.reset();
        for (k, until) in holds {
            self.capacity_holdoff_until
                .with_label_values(&[offering(k)])
                .set(until);
        }
        self.capacity_errors_in_a_row.reset();
        for (k, n) in errors {
            self.capacity_errors_in_a_row
                .with_label_values(&[offering(k)])
                .set(f64::from(n));
        }
    }

    /// Recompute every gauge from the workers at `now`, and add the time since the last call,
    /// at the last call's counts and prices, to the cumulative counters (`configured`: every
    /// configured type, so absent (category, type) pairs read 0).
    pub fn set_gauges<'a>(
        &self,
        now: Instant,
        configured: impl Iterator<Item = &'a InstanceType>,
        samples: &[Sample<'_>],
    ) {
        // (category, type, preemptible) → (count, summed price): the source of the per-type
        // and per-category gauges and of the cumulative counters.
        let mut current: BTreeMap<(&'static str, String, &'static str), (f64, f64)> =
            BTreeMap::new();
        for t in configured {
            for c in CATEGORIES {
                current.insert((c, t.name.clone(), bool_label(t.preemptible)), (0.0, 0.0));
            }
        }
        let mut ages: BTreeMap<&str, Duration> =
            AGED_STATES.iter().map(|s| (*s, Duration::ZERO)).collect();
        let zeros: BTreeMap<&str, f64> = CATEGORIES.iter().map(|c| (*c, 0.0)).collect();
        let mut vcpus = zeros.clone();
        let mut ram = zeros.clone();
        let mut processes = 0;
        let mut probe_ages: Vec<Duration> = Vec::with_capacity(samples.len());
        for s in samples {
            let cur = current
                .entry((
                    s.category,
                    s.instance_type.to_string(),
                    bool_label(s.preemptible),
                ))
                .or_default();
            cur.0 += 1.0;
            cur.1 += s.price;
            if let Some((state, age)) = s.state_age {
                let max = ages.entry(state).or_default();
                *max = (*max).max(age);
            }
            *vcpus.entry(s.category).or_default() += s.vcpus as f64;
            *ram.entry(s.category).or_default() += s.ram as f64;
            processes += s.processes;
            probe_ages.push(s.probe_age);
        }
        for (state, age) in ages {
            self.state_age_max
                .with_label_values(&[state])
                .set(age.as_secs_f64());
        }
        self.instances_total.reset();
        let mut price = zeros;
        for ((c, t, _), (n, p)) in &current {
            self.instances_total
                .with_label_values(&[*c, t.as_str()])
                .add(*n);
            *price.entry(c).or_default() += p;
        }
        self.integrate(now, current);
        for (c, v) in price {
            self.instances_price.with_label_values(&[c]).set(v);
            self.vcpus_total.with_label_values(&[c]).set(vcpus[c]);
            self.memory_bytes_total.with_label_values(&[c]).set(ram[c]);
        }
        self.containers_running.set(processes as i64);
        probe_ages.sort();
        let (max, median) = match probe_ages.len() {
            0 => (0.0, 0.0),
            n => (
                probe_ages[n - 1].as_secs_f64(),
                probe_ages[n / 2].as_secs_f64(),
            ),
        };
        self.probe_age_max.set(max);
        self.probe_age_median.set(median);
    }

    /// What the fleet cost since 00:00 UTC (as of the last [`PoolMetrics::set_gauges`]; this
    /// process's view, so it restarts at 0 with the process).
    pub fn spent_today(&self) -> f64 {
        let last = self.integrated.lock();
        if last.day == utc_day(std::time::SystemTime::now()) {
            last.spent_today
        } else {
            0.0
        }
    }

    /// Credit the time since the last call to the counts and prices of the last call, then
    /// remember `current` for the next.
    fn integrate(
        &self,
        now: Instant,
        current: BTreeMap<(&'static str, String, &'static str), (f64, f64)>,
    ) {
        let mut last = self.integrated.lock();
        let dt = now.saturating_duration_since(last.at).as_secs_f64();
        let day = utc_day(std::time::SystemTime::now());
        if day != last.day {
            last.day = day;
            last.spent_today = 0.0;
        }
        let mut spent = 0.0;
        for ((c, t, p), (n, price)) in &last.current {
            let labels = [*c, t.as_str(), *p];
            // Touch every series, so counters read 0 rather than being absent.
            let seconds = self.instances_seconds.with_label_values(&labels);
            let cost = self.instances_cost.with_label_values(&labels);
            if *n > 0.0 {
                seconds.inc_by(n * dt);
                cost.inc_by(price * dt / 3600.0);
                spent += price * dt / 3600.0;
            }
        }
        last.spent_today += spent;
        for (c, t, p) in current.keys() {
            let labels = [*c, t.as_str(), *p];
            self.instances_seconds.with_label_values(&labels);
            self.instances_cost.with_label_values(&labels);
        }
        last.at = now.max(last.at);
        last.current = current;
    }
}

fn bool_label(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn summary_exposes_count_sum_and_quantiles_in_text_format() {
        let r = Registry::new();
        let m = PoolMetrics::new(&r).unwrap();
        for v in 1..=100 {
            m.run_probe_duration.observe(&["success"], v as f64 / 100.0);
        }
        m.time_to_ssh.observe(&[], 3.0);
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut buf)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        for line in [
            "# TYPE arvados_dispatchcloud_instances_run_probe_duration_seconds summary",
            "arvados_dispatchcloud_instances_run_probe_duration_seconds{outcome=\"success\",quantile=\"0.5\"} 0.5",
            "arvados_dispatchcloud_instances_run_probe_duration_seconds{outcome=\"success\",quantile=\"0.99\"} 0.99",
            "arvados_dispatchcloud_instances_run_probe_duration_seconds_count{outcome=\"success\"} 100",
            "arvados_dispatchcloud_instances_time_to_ssh_seconds_sum 3",
            "arvados_dispatchcloud_boot_outcomes{outcome=\"disappeared\"} 0",
            "arvados_dispatchcloud_instances_disappeared{state=\"shutdown\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn gauges_cover_every_configured_type_and_category() {
        let r = Registry::new();
        let m = PoolMetrics::new(&r).unwrap();
        let types: Vec<InstanceType> = ["a", "b"]
            .iter()
            .map(|n| InstanceType {
                name: n.to_string(),
                ..Default::default()
            })
            .collect();
        let s = |category, age| Sample {
            category,
            instance_type: "a",
            preemptible: false,
            state_age: None,
            price: 0.5,
            vcpus: 2,
            ram: 100,
            processes: usize::from(category == "inuse"),
            probe_age: Duration::from_secs(age),
        };
        m.set_gauges(
            Instant::now(),
            types.iter(),
            &[s("inuse", 1), s("idle", 5), s("idle", 9)],
        );
        assert_eq!(
            m.instances_total.with_label_values(&["idle", "a"]).get(),
            2.0
        );
        assert_eq!(
            m.instances_total.with_label_values(&["hold", "b"]).get(),
            0.0
        );
        assert_eq!(m.instances_price.with_label_values(&["idle"]).get(), 1.0);
        assert_eq!(m.vcpus_total.with_label_values(&["inuse"]).get(), 2.0);
        assert_eq!(m.containers_running.get(), 1);
        assert_eq!(
            (m.probe_age_max.get(), m.probe_age_median.get()),
            (9.0, 5.0)
        );
        let families = r.gather();
        let total = families
            .iter()
            .find(|f| f.name() == "arvados_dispatchcloud_instances_total")
            .unwrap();
        assert_eq!(total.get_metric().len(), 10, "5 categories × 2 types");
    }

    #[test]
    fn instance_seconds_and_cost_accumulate_at_the_previous_counts_and_prices() {
        let r = Registry::new();
        let m = PoolMetrics::new(&r).unwrap();
        let spot = InstanceType {
            name: "s".into(),
            preemptible: true,
            ..Default::default()
        };
        let vm = |category, state_age| Sample {
            category,
            instance_type: "s",
            preemptible: true,
            state_age,
            price: 0.36,
            vcpus: 2,
            ram: 100,
            processes: usize::from(category == "inuse"),
            probe_age: Duration::ZERO,
        };
        let t0 = Instant::now();
        let booting = Some(("booting", Duration::from_secs(7)));
        m.set_gauges(
            t0,
            [&spot].into_iter(),
            &[vm("booting", booting), vm("inuse", None)],
        );
        // 10 s later one VM is busy, the other idle: the 10 s are credited to the first
        // call's categories.
        m.set_gauges(
            t0 + Duration::from_secs(10),
            [&spot].into_iter(),
            &[vm("inuse", None), vm("idle", None)],
        );
        let secs = |c| {
            m.instances_seconds
                .with_label_values(&[c, "s", "true"])
                .get()
        };
        let cost = |c| m.instances_cost.with_label_values(&[c, "s", "true"]).get();
        assert_eq!(
            (secs("booting"), secs("inuse"), secs("idle")),
            (10.0, 10.0, 0.0)
        );
        assert!((cost("inuse") - 0.001).abs() < 1e-12, "{}", cost("inuse"));
        assert_eq!(cost("idle"), 0.0);
        assert_eq!(
            m.state_age_max.with_label_values(&["booting"]).get(),
            0.0,
            "no VM is booting any more"
        );
        m.set_gauges(
            t0 + Duration::from_secs(20),
            [&spot].into_iter(),
            &[vm("idle", None), vm("idle", None)],
        );
        assert_eq!((secs("inuse"), secs("idle")), (20.0, 10.0));
        // Every configured (category, type) pair is exposed, at 0 when never seen.
        assert_eq!(
            m.instances_seconds
                .with_label_values(&["hold", "s", "true"])
                .get(),
            0.0
        );
        let families = r.gather();
        let seconds = families
            .iter()
            .find(|f| f.name() == "arvados_dispatchcloud_instances_seconds_total")
            .unwrap();
        assert_eq!(seconds.get_metric().len(), 5, "5 categories × 1 type");
    }

    #[test]
    fn state_age_reports_the_oldest_vm_per_state() {
        let r = Registry::new();
        let m = PoolMetrics::new(&r).unwrap();
        let vm = |state_age| Sample {
            category: "booting",
            instance_type: "a",
            preemptible: false,
            state_age,
            price: 0.0,
            vcpus: 1,
            ram: 1,
            processes: 0,
            probe_age: Duration::ZERO,
        };
        let d = Duration::from_secs;
        m.set_gauges(
            Instant::now(),
            std::iter::empty(),
            &[
                vm(Some(("booting", d(30)))),
                vm(Some(("booting", d(90)))),
                vm(Some(("shutdown", d(4)))),
            ],
        );
        let age = |s| m.state_age_max.with_label_values(&[s]).get();
        assert_eq!(
            (age("booting"), age("shutdown"), age("unknown")),
            (90.0, 4.0, 0.0)
        );
    }
}
