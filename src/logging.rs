//! Logs to stderr shaped like Arvados' own (Go logrus with its JSON formatter), so log
//! pipelines built for the Go dispatcher keep working: one JSON object per line with `time`
//! (RFC 3339, UTC, nanoseconds), `level` (`trace`, `debug`, `info`, `warning`, `error`), `msg`,
//! `PID`, `ClusterID`, and each event's own fields under Arvados' names (`ContainerUUID`,
//! `Instance`, `InstanceType`, `State`, `IdleBehavior`, `Address`, `error`, …).
//!
//! The format is `--log-format` if given, else text on a terminal, else `SystemLogs.Format`
//! (`json` or `text`); the level is `RUST_LOG` if set, else `SystemLogs.LogLevel`. Both config
//! keys are applied once the config is loaded ([`apply_config`]); until then the process logs
//! JSON (or text on a terminal) at `info`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, reload};

/// Log format on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Crates whose chatter is not the dispatcher's.
const QUIET: &str =
    ",russh=warn,hyper=warn,h2=warn,rustls=warn,aws_config=warn,aws_smithy_runtime=warn";

struct Settings {
    json: AtomicBool,
    /// Whether the format came from the command line or the terminal (the config may not
    /// change it).
    format_fixed: bool,
    cluster_id: OnceLock<String>,
    filter: OnceLock<reload::Handle<EnvFilter, tracing_subscriber::Registry>>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Install the logger (once per process).
pub fn init(format: Option<LogFormat>) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (json, fixed) = match format {
        Some(f) => (f == LogFormat::Json, true),
        None if std::io::stderr().is_terminal() => (false, true),
        None => (true, false),
    };
    let settings = SETTINGS.get_or_init(|| Settings {
        json: AtomicBool::new(json),
        format_fixed: fixed,
        cluster_id: OnceLock::new(),
        filter: OnceLock::new(),
    });
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("info{QUIET}")));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = settings.filter.set(handle);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .event_format(Arvados {
            text: Format::default(),
        });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
}

/// Apply the loaded cluster's `ClusterID`, `SystemLogs.Format` and `SystemLogs.LogLevel`.
/// A bad value is an error naming the key.
pub fn apply_config(cluster: &arvados::Cluster) -> anyhow::Result<()> {
    let key = |k: &str| format!("Clusters.{}.SystemLogs.{k}", cluster.cluster_id);
    let logs = &cluster.system_logs;
    let json = match logs.format.to_ascii_lowercase().as_str() {
        "json" | "" => true,
        "text" => false,
        other => anyhow::bail!("{}: unknown format {other:?} (json or text)", key("Format")),
    };
    let level = level_directive(&logs.log_level).ok_or_else(|| {
        anyhow::anyhow!("{}: unknown level {:?}", key("LogLevel"), logs.log_level)
    })?;
    let Some(s) = SETTINGS.get() else {
        return Ok(());
    };
    let _ = s.cluster_id.set(cluster.cluster_id.clone());
    if !s.format_fixed {
        s.json.store(json, Ordering::Relaxed);
    }
    if std::env::var_os("RUST_LOG").is_none()
        && let Some(h) = s.filter.get()
    {
        let _ = h.reload(EnvFilter::new(format!("{level}{QUIET}")));
    }
    Ok(())
}

/// `SystemLogs.LogLevel` (logrus' names) as a filter directive.
fn level_directive(level: &str) -> Option<&'static str> {
    Some(match level.to_ascii_lowercase().as_str() {
        "" | "info" => "info",
        "trace" => "trace",
        "debug" => "debug",
        "warn" | "warning" => "warn",
        "error" | "fatal" | "panic" => "error",
        _ => return None,
    })
}

/// logrus' level names.
fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warning",
        Level::ERROR => "error",
    }
}

/// Collects an event's fields; `message` becomes `msg`.
struct Fields(Map<String, Value>);

impl Fields {
    fn put(&mut self, field: &Field, v: Value) {
        let name = match field.name() {
            "message" => "msg",
            n => n,
        };
        self.0.insert(name.to_string(), v);
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

/// The JSON line of one event (without the newline).
fn json_line(
    event: &Event<'_>,
    cluster_id: Option<&str>,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut fields = Fields(Map::new());
    event.record(&mut fields);
    let mut line = fields.0;
    line.insert(
        "time".into(),
        now.format("%Y-%m-%dT%H:%M:%S%.9fZ").to_string().into(),
    );
    line.insert("level".into(), level_name(event.metadata().level()).into());
    line.entry("msg").or_insert_with(|| "".into());
    line.insert("PID".into(), std::process::id().into());
    if let Some(id) = cluster_id {
        line.insert("ClusterID".into(), id.into());
    }
    Value::Object(line).to_string()
}

/// Text (tracing's own) or Arvados JSON, as [`Settings::json`] says.
struct Arvados {
    text: Format,
}

impl<S, N> FormatEvent<S, N> for Arvados
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let settings = SETTINGS.get();
        if settings.is_some_and(|s| s.json.load(Ordering::Relaxed)) {
            let id = settings
                .and_then(|s| s.cluster_id.get())
                .map(String::as_str);
            let line = json_line(event, id, chrono::Utc::now());
            return writeln!(writer, "{line}");
        }
        self.text.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    /// Captures the JSON lines of events logged inside `f`.
    fn capture(f: impl FnOnce()) -> Vec<Value> {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<String>>>);
        struct Capture(Lines);
        impl<S: Subscriber> tracing_subscriber::Layer<S> for Capture {
            fn on_event(&self, e: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
                let t = chrono::DateTime::parse_from_rfc3339("2026-11-30T12:00:00.000000042Z")
                    .unwrap()
                    .with_timezone(&chrono::Utc);
                self.0.0.lock().push(json_line(e, Some("zzzzz"), t));
            }
        }
        let lines = Lines::default();
        let sub = tracing_subscriber::registry().with(Capture(lines.clone()));
        tracing::subscriber::with_default(sub, f);
        let out = lines.0.lock();
        out.iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn json_lines_have_arvados_names_and_shapes() {
        let err = std::io::Error::other("boom");
        let lines = capture(|| {
            tracing::info!(ContainerUUID = "zzzzz-dz642-000000000000001", Instance = %"i-1", Priority = 3_u64, "starting container");
            tracing::warn!(error = %err, InstanceType = "m4", "create failed");
        });
        assert_eq!(lines.len(), 2);
        let a = &lines[0];
        assert_eq!(a["time"], "2026-11-30T12:00:00.000000042Z");
        assert_eq!(a["level"], "info");
        assert_eq!(a["msg"], "starting container");
        assert_eq!(a["PID"], std::process::id());
        assert_eq!(a["ClusterID"], "zzzzz");
        assert_eq!(a["ContainerUUID"], "zzzzz-dz642-000000000000001");
        assert_eq!(a["Instance"], "i-1");
        assert_eq!(a["Priority"], 3);
        assert!(a.get("message").is_none() && a.get("fields").is_none());
        let b = &lines[1];
        assert_eq!(b["level"], "warning");
        assert_eq!(b["error"], "boom");
        assert_eq!(b["InstanceType"], "m4");
    }

    #[test]
    fn system_logs_levels_follow_logrus_names() {
        assert_eq!(level_directive("Warning"), Some("warn"));
        assert_eq!(level_directive("debug"), Some("debug"));
        assert_eq!(level_directive(""), Some("info"));
        assert_eq!(level_directive("loud"), None);
        let mut c = arvados::Cluster {
            cluster_id: "zzzzz".into(),
            ..Default::default()
        };
        c.system_logs.log_level = "loud".into();
        let e = apply_config(&c).unwrap_err().to_string();
        assert!(e.starts_with("Clusters.zzzzz.SystemLogs.LogLevel: "), "{e}");
        c.system_logs.log_level = "info".into();
        c.system_logs.format = "xml".into();
        let e = apply_config(&c).unwrap_err().to_string();
        assert!(e.starts_with("Clusters.zzzzz.SystemLogs.Format: "), "{e}");
    }
}
