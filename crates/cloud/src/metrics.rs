//! The two metrics every cloud driver exports, in the shape of Arvados' EC2 driver:
//! `arvados_dispatchcloud_<provider>_instances{<place>}` (instances listed per place) and
//! `arvados_dispatchcloud_<provider>_instance_starts_total{<place>,success}` (create attempts),
//! where the place is EC2's subnet or GCE's zone.

/// Register `collector` in `registry` and hand it back: the one way every crate here
/// registers a metric (`let g = registered(registry, GaugeVec::new(…)?)?;`).
pub fn registered<C: prometheus::core::Collector + Clone + 'static>(
    registry: &prometheus::Registry,
    collector: C,
) -> Result<C, prometheus::Error> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// Options for a metric named `arvados_dispatchcloud_<name>`.
pub fn dispatchcloud_opts(name: &str, help: &str) -> prometheus::Opts {
    prometheus::Opts::new(name, help)
        .namespace("arvados")
        .subsystem("dispatchcloud")
}

/// A driver's instance and start counters.
pub struct ProviderMetrics {
    pub instances: prometheus::GaugeVec,
    pub starts: prometheus::CounterVec,
}

impl ProviderMetrics {
    /// The metrics of `provider` (`ec2`, `gce`) per `place_label` (`subnet_id`, `zone`), with
    /// a series for each of `places` from the start; registered in `registry` if given.
    pub fn new(
        provider: &str,
        place_label: &str,
        places: &[String],
        registry: Option<&prometheus::Registry>,
    ) -> Result<ProviderMetrics, prometheus::Error> {
        let opts = |n: String, h: &str| {
            prometheus::Opts::new(n, h)
                .namespace("arvados")
                .subsystem("dispatchcloud")
        };
        let instances = prometheus::GaugeVec::new(
            opts(
                format!("{provider}_instances"),
                "Number of instances running",
            ),
            &[place_label],
        )?;
        let starts = prometheus::CounterVec::new(
            opts(
                format!("{provider}_instance_starts_total"),
                "Number of attempts to start a new instance",
            ),
            &[place_label, "success"],
        )?;
        for p in places {
            for ok in ["0", "1"] {
                starts.with_label_values(&[p.as_str(), ok]);
            }
        }
        if let Some(r) = registry {
            r.register(Box::new(instances.clone()))?;
            r.register(Box::new(starts.clone()))?;
        }
        Ok(ProviderMetrics { instances, starts })
    }

    /// Count one create attempt in `place`.
    pub fn count_start(&self, place: &str, ok: bool) {
        self.starts
            .with_label_values(&[place, if ok { "1" } else { "0" }])
            .inc();
    }
}
