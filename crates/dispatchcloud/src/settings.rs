//! Settings Arvados does not have, in their own optional YAML file, so the operator's shared
//! `config.yml` stays valid for Arvados' own services (which reject unknown keys).
//!
//! The file is found at `--settings PATH`, else `$ARVADOS_DISPATCH_CLOUD_SETTINGS`, else
//! [`DEFAULT_PATH`] if it exists; no file means every feature here is off, which is Arvados'
//! behaviour. Unknown keys and bad values are errors naming the key path. The format is
//! documented in `docs/settings.md`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the settings file is looked for when none is named.
pub const DEFAULT_PATH: &str = "/etc/arvados/dispatch-cloud-rs.yml";
/// The environment variable naming the settings file.
pub const ENV_VAR: &str = "ARVADOS_DISPATCH_CLOUD_SETTINGS";

/// Everything in the settings file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct Settings {
    #[serde(default)]
    pub spend_caps: SpendCaps,
    #[serde(default)]
    pub queue: QueueSettings,
    #[serde(default)]
    pub capacity: CapacitySettings,
    #[serde(default)]
    pub scheduler: SchedulerSettings,
    #[serde(default)]
    pub interruptions: InterruptionSettings,
    #[serde(default)]
    pub spot_fallback: SpotFallbackSettings,
    #[serde(default)]
    pub idle_time: IdleTimeSettings,
}

/// How long an idle instance is kept. Default: `CloudVMs.TimeoutIdle` for every instance, as
/// Arvados.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct IdleTimeSettings {
    /// Keep each idle instance for as long as its type's demand suggests, from `Min` to
    /// `Max`, instead of `TimeoutIdle` (see [`IdleTimeSettings::timeout`]).
    #[serde(default)]
    pub adaptive: bool,
    #[serde(
        default = "IdleTimeSettings::default_min",
        with = "arvados::config::units::duration"
    )]
    pub min: std::time::Duration,
    #[serde(
        default = "IdleTimeSettings::default_max",
        with = "arvados::config::units::duration"
    )]
    pub max: std::time::Duration,
}

impl Default for IdleTimeSettings {
    fn default() -> Self {
        IdleTimeSettings {
            adaptive: false,
            min: Self::default_min(),
            max: Self::default_max(),
        }
    }
}

impl IdleTimeSettings {
    fn default_min() -> std::time::Duration {
        std::time::Duration::from_secs(10)
    }
    fn default_max() -> std::time::Duration {
        std::time::Duration::from_secs(600)
    }

    /// How long an idle instance of a type is kept, given `timeout_idle` (`TimeoutIdle`),
    /// whether a waiting container could use the type (`wanted`), and the times of the
    /// latest container starts on instances of the type, oldest first, all within `Max`
    /// of `now`:
    /// * off: `timeout_idle`;
    /// * wanted: `Max` (it is about to be used; the scheduler only has not placed it yet);
    /// * at least three recent starts: twice their mean gap, within `Min`..`Max` (the next
    ///   container of the type is likely to come within that);
    /// * otherwise: `Min` (nothing suggests one will come soon).
    pub fn timeout(
        &self,
        timeout_idle: std::time::Duration,
        wanted: bool,
        recent_starts: &[std::time::Instant],
    ) -> std::time::Duration {
        if !self.adaptive {
            return timeout_idle;
        }
        let (min, max) = (self.min, self.max.max(self.min));
        if wanted {
            return max;
        }
        match recent_starts {
            [first, .., last] if recent_starts.len() >= 3 => {
                let gap = last.saturating_duration_since(*first) / (recent_starts.len() as u32 - 1);
                (gap * 2).clamp(min, max)
            }
            _ => min,
        }
    }
}

/// Spot → on-demand fallback. Default: off, as Arvados, where a container that asked for a
/// preemptible instance waits for spot capacity however long that takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct SpotFallbackSettings {
    /// A container that asked for a preemptible instance, has waited this long, and finds
    /// every spot type it could use held off for lack of capacity, runs on the on-demand
    /// variant of one of them (same provider type, `Preemptible: false`) instead. It stays
    /// fallen back until it starts. 0 (the default): never.
    #[serde(default, with = "arvados::config::units::duration")]
    pub after: std::time::Duration,
    /// The on-demand type may cost at most this many times the cheapest spot type the
    /// container could use. 0 (the default): at most `Containers.MaximumPriceFactor` times
    /// the cheapest on-demand variant (the band of types the container accepted, at
    /// on-demand prices).
    #[serde(default)]
    pub price_factor: f64,
}

/// What the dispatcher does when a spot instance is about to be taken back. Default: nothing,
/// as Arvados (crunch-run only records `runtime_status.preemptionNotice`; the container then
/// fails with its instance, and new containers may still be started there meanwhile).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct InterruptionSettings {
    /// When a running container's `runtime_status` has `preemptionNotice`: drain its instance
    /// (no new container starts there; it shuts down when the running ones end) and, for a
    /// spot type, mark its offering (provider type and market) at risk: in doubt, as after a
    /// capacity error, until a create of it succeeds.
    #[serde(default)]
    pub drain: bool,
    /// With `Drain`: also create one instance of the same type at once, so the container's
    /// retry finds a booted instance instead of waiting for a boot.
    #[serde(default)]
    pub pre_boot: bool,
}

/// Scheduling choices where Arvados' own is blunt (spec §13). Default: Arvados'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct SchedulerSettings {
    #[serde(default)]
    pub shutdown_at_quota: ShutdownAtQuota,
}

/// What a pass shuts down when the fleet is at quota and the highest-priority container that
/// needs a new instance cannot get one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ShutdownAtQuota {
    /// Arvados: every idle or booting instance nothing was placed on, at once.
    #[default]
    All,
    /// Only as many as the waiting containers need new instances for (counting instances
    /// already shutting down), and none that a waiting container fits, unless there are not
    /// enough others. Arvados' rule shuts down instances that lower-priority containers
    /// would have used a moment later (spec §13.1 item 7), and with short containers it keeps
    /// shutting down most of the fleet.
    Needed,
}

/// How long a capacity error holds an offering (an instance type, its quota group, or every
/// type) off. Default: a fixed minute after each error, as Arvados. With `Backoff`, the hold
/// doubles with each capacity error in a row for that offering, from `BackoffBase` up to
/// `BackoffMax`, plus up to 25 % jitter (so dispatchers and types do not retry in step), and a
/// successful create of the type resets it. With `Backoff` there is also a launch budget: an
/// offering whose hold ended but that has not had a create succeed since is in doubt, and
/// only one create of it is in flight at a time; and when the driver has zones (EC2: several
/// subnets), each create is pinned to one and capacity is kept per zone (`Pool::zones`).
/// `StateFile` (with or without `Backoff`) keeps
/// hold-offs and errors in a row across restarts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct CapacitySettings {
    #[serde(default)]
    pub backoff: bool,
    #[serde(
        default = "CapacitySettings::default_base",
        with = "arvados::config::units::duration"
    )]
    pub backoff_base: std::time::Duration,
    #[serde(
        default = "CapacitySettings::default_max",
        with = "arvados::config::units::duration"
    )]
    pub backoff_max: std::time::Duration,
    /// Where the capacity state is kept across restarts (none: not kept, as Arvados).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

impl CapacitySettings {
    fn default_base() -> std::time::Duration {
        std::time::Duration::from_secs(30)
    }
    fn default_max() -> std::time::Duration {
        std::time::Duration::from_secs(600)
    }

    /// The longest hold a capacity error can cause (`fixed` when back-off is off).
    pub fn longest_hold(&self, fixed: std::time::Duration) -> std::time::Duration {
        if self.backoff {
            self.backoff_max
                .max(self.backoff_base)
                .max(std::time::Duration::from_secs(1))
        } else {
            fixed
        }
    }

    /// The hold after the `failures`-th capacity error in a row (1 for the first), with
    /// `jitter` in `[0, 1)`; `fixed` when back-off is off.
    pub fn hold(
        &self,
        failures: u32,
        jitter: f64,
        fixed: std::time::Duration,
    ) -> std::time::Duration {
        if !self.backoff {
            return fixed;
        }
        let base = self.backoff_base.max(std::time::Duration::from_secs(1));
        let max = self.backoff_max.max(base);
        let doubled = base.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        let hold = doubled.min(max);
        hold.mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0)).min(max)
    }
}

impl Default for CapacitySettings {
    fn default() -> Self {
        CapacitySettings {
            backoff: false,
            backoff_base: Self::default_base(),
            backoff_max: Self::default_max(),
            state_file: None,
        }
    }
}

/// How the container queue polls the API. The default is Arvados' way: every poll reloads
/// the containers this dispatcher has locked and the top 100 queued ones.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct QueueSettings {
    /// After a full poll, ask only for containers modified since the last poll (minus
    /// `Overlap`), and reload everything every `FullPollEvery` polls to repair anything an
    /// incremental poll missed.
    #[serde(default)]
    pub incremental: bool,
    #[serde(default = "QueueSettings::default_full_poll_every")]
    pub full_poll_every: u32,
    /// How far back each incremental poll reaches before the last change it saw (covers
    /// transactions that commit late and clock differences between API servers).
    #[serde(
        default = "QueueSettings::default_overlap",
        with = "arvados::config::units::duration"
    )]
    pub overlap: std::time::Duration,
    /// With `Incremental`, queued containers beyond the top 100 are fetched (up to this many)
    /// while the scheduler has capacity to start them.
    #[serde(default = "QueueSettings::default_max_queued")]
    pub max_queued: usize,
}

impl QueueSettings {
    /// These settings for a queue polled every `poll_interval`: the overlap is at most one
    /// poll interval. A wider window only fetches the same changes again on every poll (at
    /// 250 ms polls, 5 s is twenty polls' worth); a change that commits later than the window
    /// is repaired by the next full poll, at most `FullPollEvery` intervals later either way.
    pub fn for_poll_interval(self, poll_interval: std::time::Duration) -> Self {
        QueueSettings {
            overlap: self.overlap.min(poll_interval),
            ..self
        }
    }

    fn default_full_poll_every() -> u32 {
        10
    }
    fn default_overlap() -> std::time::Duration {
        std::time::Duration::from_secs(5)
    }
    fn default_max_queued() -> usize {
        10_000
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            incremental: false,
            full_poll_every: Self::default_full_poll_every(),
            overlap: Self::default_overlap(),
            max_queued: Self::default_max_queued(),
        }
    }
}

/// Limits on what the fleet may cost, in the unit of `InstanceTypes.*.Price` (per hour).
/// Absent or 0: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct SpendCaps {
    /// No instance is created while the fleet's hourly price (every VM, booting and shutting
    /// down ones and pending creates included) plus the new one's would pass this.
    #[serde(default)]
    pub max_cost_per_hour: f64,
    /// No instance is created while the day's spend so far (since 00:00 UTC, as this process
    /// has seen it) plus one more hour of the fleet with the new instance would pass this.
    #[serde(default)]
    pub max_cost_per_day: f64,
}

impl SpendCaps {
    pub fn is_set(&self) -> bool {
        self.max_cost_per_hour > 0.0 || self.max_cost_per_day > 0.0
    }

    /// How much more hourly price may be added now (`None`: no cap), given the fleet's
    /// current hourly price and what was spent today.
    pub fn headroom(&self, fleet_per_hour: f64, spent_today: f64) -> Option<f64> {
        let mut room: Option<f64> = None;
        if self.max_cost_per_hour > 0.0 {
            room = Some(self.max_cost_per_hour - fleet_per_hour);
        }
        if self.max_cost_per_day > 0.0 {
            let day = self.max_cost_per_day - spent_today - fleet_per_hour;
            room = Some(room.map_or(day, |r| r.min(day)));
        }
        room.map(|r| r.max(0.0))
    }
}

/// A settings file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings file {path}: {message}")]
    Read { path: String, message: String },
    #[error("settings file {path}: {key}: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

impl Settings {
    /// Which file to read: the flag, else the environment, else the default path if present.
    pub fn resolve(flag: Option<&Path>) -> Option<PathBuf> {
        if let Some(p) = flag {
            return Some(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os(ENV_VAR).filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
        let d = Path::new(DEFAULT_PATH);
        d.exists().then(|| d.to_path_buf())
    }

    /// Load the resolved file, or the defaults when there is none.
    pub fn load(flag: Option<&Path>) -> Result<Settings, SettingsError> {
        let Some(path) = Self::resolve(flag) else {
            return Ok(Settings::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| SettingsError::Read {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        Self::from_str(&text, &shown)
    }

    /// Parse and check settings text (`path` is only for messages).
    pub fn from_str(text: &str, path: &str) -> Result<Settings, SettingsError> {
        if text.trim().is_empty() {
            return Ok(Settings::default());
        }
        let de = serde_norway::Deserializer::from_str(text);
        let s: Settings = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(top level)".into()
            } else {
                key
            };
            // The YAML library may already name the key; say it once.
            let message = e.into_inner().to_string();
            let message = match message.split_once(": ") {
                Some((named, rest)) if key.starts_with(named) => rest.to_string(),
                _ => message,
            };
            SettingsError::Invalid {
                path: path.into(),
                key,
                message,
            }
        })?;
        s.check(path)?;
        Ok(s)
    }

    fn check(&self, path: &str) -> Result<(), SettingsError> {
        for (key, v) in [
            (
                "SpendCaps.MaxCostPerHour",
                self.spend_caps.max_cost_per_hour,
            ),
            ("SpendCaps.MaxCostPerDay", self.spend_caps.max_cost_per_day),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(SettingsError::Invalid {
                    path: path.into(),
                    key: key.into(),
                    message: format!("{v} is not a cost (a number ≥ 0; 0 means no cap)"),
                });
            }
        }
        if !self.spot_fallback.price_factor.is_finite()
            || (self.spot_fallback.price_factor != 0.0 && self.spot_fallback.price_factor < 1.0)
        {
            return Err(SettingsError::Invalid {
                path: path.into(),
                key: "SpotFallback.PriceFactor".into(),
                message: format!(
                    "{} is not a price factor (0, or a number ≥ 1)",
                    self.spot_fallback.price_factor
                ),
            });
        }
        if self.idle_time.min > self.idle_time.max {
            return Err(SettingsError::Invalid {
                path: path.into(),
                key: "IdleTime.Min".into(),
                message: "is longer than IdleTime.Max".into(),
            });
        }
        if self.interruptions.pre_boot && !self.interruptions.drain {
            return Err(SettingsError::Invalid {
                path: path.into(),
                key: "Interruptions.PreBoot".into(),
                message: "needs Interruptions.Drain: true (a replacement is booted for a drained instance)".into(),
            });
        }
        if self.queue.full_poll_every == 0 {
            return Err(SettingsError::Invalid {
                path: path.into(),
                key: "Queue.FullPollEvery".into(),
                message: "0 is not a number of polls (1 means every poll is full)".into(),
            });
        }
        if self.queue.max_queued < 100 {
            return Err(SettingsError::Invalid {
                path: path.into(),
                key: "Queue.MaxQueued".into(),
                message: format!("{} is below Arvados' 100", self.queue.max_queued),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn adaptive_idle_time_follows_demand_within_its_bounds() {
        use std::time::{Duration, Instant};
        let s = Settings::from_str(
            "IdleTime:\n  Adaptive: true\n  Min: 5s\n  Max: 2m\n",
            "s.yml",
        )
        .unwrap()
        .idle_time;
        let d = Duration::from_secs;
        let t = Instant::now();
        let every = |gap: u64, n: u64| (0..n).map(|i| t + d(gap * i)).collect::<Vec<_>>();
        let idle = d(60);
        // Off: TimeoutIdle, whatever the demand.
        assert_eq!(
            IdleTimeSettings::default().timeout(idle, true, &every(1, 5)),
            idle
        );
        assert_eq!(s.timeout(idle, true, &[]), d(120), "wanted: Max");
        assert_eq!(s.timeout(idle, false, &[]), d(5), "no demand: Min");
        assert_eq!(
            s.timeout(idle, false, &every(10, 2)),
            d(5),
            "two starts say little"
        );
        assert_eq!(
            s.timeout(idle, false, &every(10, 4)),
            d(20),
            "twice the gap"
        );
        assert_eq!(s.timeout(idle, false, &every(1, 4)), d(5), "at least Min");
        assert_eq!(
            s.timeout(idle, false, &every(100, 3)),
            d(120),
            "at most Max"
        );
        let bad = Settings::from_str("IdleTime:\n  Min: 5m\n  Max: 1m\n", "s.yml").unwrap_err();
        assert!(bad.to_string().contains("IdleTime.Min"), "{bad}");
    }

    #[test]
    fn interruptions_are_off_by_default_and_pre_boot_needs_drain() {
        assert_eq!(
            Settings::default().interruptions,
            InterruptionSettings::default()
        );
        let s = Settings::from_str("Interruptions:\n  Drain: true\n  PreBoot: true\n", "s.yml")
            .unwrap();
        assert!(s.interruptions.drain && s.interruptions.pre_boot);
        let bad = Settings::from_str("Interruptions:\n  PreBoot: true\n", "s.yml").unwrap_err();
        assert!(bad.to_string().contains("Interruptions.PreBoot"), "{bad}");
        let bad = Settings::from_str("Interruptions:\n  Drian: true\n", "s.yml").unwrap_err();
        assert!(bad.to_string().contains("Drian"), "{bad}");
    }

    #[test]
    fn shutdown_at_quota_is_arvados_all_by_default_and_reads_needed() {
        assert_eq!(
            Settings::default().scheduler.shutdown_at_quota,
            ShutdownAtQuota::All
        );
        let s = Settings::from_str("Scheduler:\n  ShutdownAtQuota: Needed\n", "s.yml").unwrap();
        assert_eq!(s.scheduler.shutdown_at_quota, ShutdownAtQuota::Needed);
        let e = Settings::from_str("Scheduler:\n  ShutdownAtQuota: Some\n", "s.yml").unwrap_err();
        assert!(e.to_string().contains("Scheduler.ShutdownAtQuota"), "{e}");
    }

    #[test]
    fn capacity_backoff_doubles_to_its_cap_with_bounded_jitter_and_is_off_by_default() {
        let fixed = Duration::from_secs(60);
        let off = CapacitySettings::default();
        assert_eq!(off.hold(1, 0.5, fixed), fixed);
        assert_eq!(off.hold(9, 0.5, fixed), fixed);
        let on = Settings::from_str(
            "Capacity:\n  Backoff: true\n  BackoffBase: 10s\n  BackoffMax: 1m\n",
            "s.yml",
        )
        .unwrap()
        .capacity;
        let secs = |n, j| on.hold(n, j, fixed).as_secs_f64();
        assert_eq!(
            [secs(1, 0.0), secs(2, 0.0), secs(3, 0.0)],
            [10.0, 20.0, 40.0]
        );
        assert_eq!([secs(4, 0.0), secs(40, 0.0)], [60.0, 60.0], "capped");
        assert_eq!(secs(1, 0.999_999).round(), 12.0, "at most 25 % jitter");
        assert_eq!(secs(4, 0.9), 60.0, "jitter never passes the cap");
        let bad = Settings::from_str("Capacity:\n  BackoffBase: soon\n", "s.yml").unwrap_err();
        assert!(bad.to_string().contains("Capacity.BackoffBase"), "{bad}");
    }

    #[test]
    fn empty_or_absent_settings_turn_everything_off() {
        assert_eq!(
            Settings::from_str("", "s.yml").unwrap(),
            Settings::default()
        );
        assert_eq!(
            Settings::from_str("{}\n", "s.yml").unwrap(),
            Settings::default()
        );
        assert!(!Settings::default().spend_caps.is_set());
    }

    #[test]
    fn spend_caps_parse() {
        let s = Settings::from_str(
            "SpendCaps:\n  MaxCostPerHour: 12.5\n  MaxCostPerDay: 200\n",
            "s.yml",
        )
        .unwrap();
        assert_eq!(
            s.spend_caps,
            SpendCaps {
                max_cost_per_hour: 12.5,
                max_cost_per_day: 200.0
            }
        );
    }

    #[test]
    fn bad_settings_name_the_file_and_key() {
        for (text, want) in [
            (
                "SpendCaps:\n  MaxCostPerHour: -1\n",
                "settings file s.yml: SpendCaps.MaxCostPerHour: -1 is not a cost",
            ),
            (
                "SpendCaps:\n  MaxCostPerDay: .nan\n",
                "settings file s.yml: SpendCaps.MaxCostPerDay: NaN is not a cost",
            ),
            (
                "SpendCaps:\n  MaxCostPerHour: lots\n",
                "settings file s.yml: SpendCaps.MaxCostPerHour: invalid type",
            ),
            (
                "SpendCaps:\n  MaxCostPerHr: 3\n",
                "settings file s.yml: SpendCaps.MaxCostPerHr: unknown field `MaxCostPerHr`",
            ),
            (
                "Spend: {}\n",
                "settings file s.yml: Spend: unknown field `Spend`",
            ),
        ] {
            let err = Settings::from_str(text, "s.yml").unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_named_file_that_is_missing_is_an_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/s.yml")))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("settings file /nonexistent/s.yml: "),
            "{err}"
        );
    }

    #[test]
    fn queue_settings_parse_with_defaults_and_checks() {
        let s =
            Settings::from_str("Queue:\n  Incremental: true\n  Overlap: 10s\n", "s.yml").unwrap();
        assert!(s.queue.incremental);
        assert_eq!(s.queue.overlap, std::time::Duration::from_secs(10));
        assert_eq!(s.queue.full_poll_every, 10);
        assert_eq!(s.queue.max_queued, 10_000);
        assert!(!Settings::default().queue.incremental);
        // The window never reaches back more than one poll interval.
        let secs = std::time::Duration::from_secs;
        assert_eq!(s.queue.for_poll_interval(secs(1)).overlap, secs(1));
        assert_eq!(s.queue.for_poll_interval(secs(60)).overlap, secs(10));
        assert!(s.queue.for_poll_interval(secs(1)).incremental);
        for (text, want) in [
            (
                "Queue:\n  FullPollEvery: 0\n",
                "settings file s.yml: Queue.FullPollEvery: 0 is not a number of polls",
            ),
            (
                "Queue:\n  MaxQueued: 5\n",
                "settings file s.yml: Queue.MaxQueued: 5 is below",
            ),
            (
                "Queue:\n  Overlap: soon\n",
                "settings file s.yml: Queue.Overlap: ",
            ),
        ] {
            let err = Settings::from_str(text, "s.yml").unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn headroom_is_the_tighter_of_the_hourly_and_daily_caps() {
        let none = SpendCaps::default();
        assert_eq!(none.headroom(100.0, 1e6), None);
        let hour = SpendCaps {
            max_cost_per_hour: 10.0,
            max_cost_per_day: 0.0,
        };
        assert_eq!(hour.headroom(4.0, 1e6), Some(6.0));
        assert_eq!(hour.headroom(12.0, 0.0), Some(0.0));
        let day = SpendCaps {
            max_cost_per_hour: 0.0,
            max_cost_per_day: 100.0,
        };
        assert_eq!(day.headroom(4.0, 90.0), Some(6.0));
        let both = SpendCaps {
            max_cost_per_hour: 10.0,
            max_cost_per_day: 100.0,
        };
        assert_eq!(both.headroom(4.0, 93.0), Some(3.0));
        assert_eq!(both.headroom(4.0, 0.0), Some(6.0));
    }
}
