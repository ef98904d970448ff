//! What the pool knows about the cloud's capacity, per offering (issue 19): hold-offs after
//! capacity errors, errors in a row, the cloud's last word, the file that keeps them across
//! restarts (settings `Capacity.StateFile`), and spot interruption notices (settings
//! `Interruptions`), which drain the instance and mark its spot offering at risk (in doubt).
//!
//! An offering is a capacity key (see `Pool::capacity_keys`): a provider type in one market
//! (`m5.large`, `m5.large-preemptible`), the same in one zone with zones on
//! (`m5.large-preemptible@subnet-1`), a quota group, or `""` for every type.
//!
//! The file is JSON, written whole to `PATH.tmp` and renamed over `PATH` after each change, so
//! a crash never leaves half a file. A missing file is a first start; an unreadable one is
//! logged and ignored (the dispatcher then knows no more than Arvados would).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::{Duration, Instant};

use super::{Pool, State};
use crate::worker_state::{IdleBehavior, WorkerState};

/// The file's format version.
const VERSION: u32 = 1;
/// The longest cloud error kept per offering.
const MAX_ERROR_LEN: usize = 500;
/// How long one write of the file may take before it is given up (a hung disk must not hold
/// the writer, or shutdown, forever).
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// One offering's capacity state, as saved and as the management API shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferingState {
    /// Held off until then (absent: not held off, perhaps in doubt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_until: Option<DateTime<Utc>>,
    /// Capacity errors in a row since the last successful create (above 0: in doubt).
    #[serde(default)]
    pub errors_in_a_row: u32,
    /// The cloud's last capacity error for it.
    #[serde(default)]
    pub error: String,
}

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityFile {
    pub version: u32,
    /// By capacity key (`""`: every instance type).
    pub offerings: BTreeMap<String, OfferingState>,
}

/// `e` shortened to at most [`MAX_ERROR_LEN`] bytes, on a character boundary.
pub(super) fn short_error(e: &str) -> String {
    let mut end = e.len().min(MAX_ERROR_LEN);
    while !e.is_char_boundary(end) {
        end -= 1;
    }
    e[..end].to_string()
}

/// The capacity part of `st` at `now` (`utc` the same moment on the wall clock): offerings
/// held off or in doubt.
pub(super) fn snapshot(st: &State, now: Instant, utc: DateTime<Utc>) -> CapacityFile {
    let mut offerings: BTreeMap<String, OfferingState> = BTreeMap::new();
    for (key, t) in st.at_capacity_until.iter().filter(|(_, t)| now < **t) {
        offerings.entry(key.clone()).or_default().held_until =
            Some(utc + chrono::Duration::from_std(*t - now).unwrap_or_default());
    }
    for (key, n) in st.capacity_failures.iter().filter(|(_, n)| **n > 0) {
        offerings.entry(key.clone()).or_default().errors_in_a_row = *n;
    }
    for (key, o) in offerings.iter_mut() {
        o.error = st.capacity_error.get(key).cloned().unwrap_or_default();
    }
    CapacityFile {
        version: VERSION,
        offerings,
    }
}

/// Put `saved` into `st` at `now` (`utc` the same moment on the wall clock). A hold-off that
/// has ended is dropped (its errors in a row are kept: the offering is in doubt); one longer
/// than `longest` from now (a clock that jumped, a hand-edited file) is cut to `longest`.
pub(super) fn restore(
    st: &mut State,
    saved: CapacityFile,
    now: Instant,
    utc: DateTime<Utc>,
    longest: Duration,
) {
    for (key, o) in saved.offerings {
        if let Some(until) = o.held_until.filter(|t| *t > utc) {
            let left = (until - utc).to_std().unwrap_or_default().min(longest);
            st.at_capacity_until.insert(key.clone(), now + left);
        }
        if o.errors_in_a_row > 0 {
            st.capacity_failures.insert(key.clone(), o.errors_in_a_row);
        }
        if !o.error.is_empty() {
            st.capacity_error.insert(key, short_error(&o.error));
        }
    }
}

/// Parse a saved file; the error says what is wrong, with its path in the document.
pub fn parse(text: &str) -> Result<CapacityFile, String> {
    let de = &mut serde_json::Deserializer::from_str(text);
    let f: CapacityFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })?;
    if f.version != VERSION {
        return Err(format!(
            "version {} (this dispatcher reads {VERSION})",
            f.version
        ));
    }
    Ok(f)
}

async fn write_atomically(path: &Path, text: String) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    tokio::fs::write(&tmp, text).await?;
    tokio::fs::rename(&tmp, path).await
}

impl Pool {
    /// Capacity changed (an error, a success after errors): the state file is due a write.
    pub(super) fn capacity_changed(&self) {
        self.capacity_changes
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A spot interruption notice for the worker running `uuid` (from its container's
    /// `runtime_status`): see [`Pool::drain_for_interruption`]; then, if `pre_boot`, create
    /// a replacement of its type. False if no worker runs `uuid` or it was not in `run`.
    pub(super) fn on_interruption_notice(&self, uuid: &str, pre_boot: bool) -> bool {
        let drained = {
            let mut st = self.lock();
            let Some(id) = st
                .workers
                .values()
                .find(|w| w.running.contains_key(uuid) || w.starting.contains_key(uuid))
                .map(|w| w.id.clone())
            else {
                return false;
            };
            self.drain_for_interruption(&mut st, &id, &format!("container {uuid}"))
        };
        let Some(it) = drained else {
            return false;
        };
        let replace = if pre_boot {
            vec![it.clone()]
        } else {
            Vec::new()
        };
        self.after_interruptions(&[it], &replace);
        true
    }

    /// Drain worker `id` for a spot interruption notice (`source` says who gave it), unless
    /// the operator already set a behaviour other than `run`; for a preemptible type, mark
    /// its offering at risk (in doubt, as after a capacity error, until a create of it
    /// succeeds: with `Capacity.Backoff`, one create of it at a time). Its type, if drained.
    ///
    /// The offering is not held off: a container that asked for spot may have no other
    /// type, and with Arvados' fixed minute per hold a storm of notices stalled such
    /// containers for a minute each time (seen in `simulate`).
    pub(super) fn drain_for_interruption(
        &self,
        st: &mut State,
        id: &str,
        source: &str,
    ) -> Option<Arc<arvados::InstanceType>> {
        let w = st.workers.get_mut(id)?;
        // An instance being shut down is no news (GCE lists a VM it is deleting as STOPPING,
        // as it does one being preempted).
        if w.idle_behavior != IdleBehavior::Run || w.state == WorkerState::Shutdown {
            return None;
        }
        w.idle_behavior = IdleBehavior::Drain;
        self.save_tags(w);
        tracing::warn!(Instance = %w.id, source, "spot interruption notice: draining the instance");
        self.events.push(
            "drain",
            w.id.clone(),
            format!("spot interruption notice ({source})"),
        );
        let it = w.it.clone();
        if it.preemptible {
            let key = super::create::offering_key(&it);
            let n = st.capacity_failures.entry(key.clone()).or_default();
            *n = (*n).max(1);
            st.capacity_error
                .insert(key, format!("spot interruption notice on {id}"));
        }
        Some(it)
    }

    /// After draining instances of these types for interruption notices (the state
    /// unlocked): save the capacity state, create one replacement of each type in
    /// `pre_boot`, wake the scheduler.
    pub(super) fn after_interruptions(
        &self,
        drained: &[Arc<arvados::InstanceType>],
        pre_boot: &[Arc<arvados::InstanceType>],
    ) {
        if drained.iter().any(|it| it.preemptible) {
            self.capacity_changed();
        }
        for it in pre_boot {
            if self.do_create(it).is_some() {
                self.events.push(
                    "pre-boot",
                    it.name.clone(),
                    "replacement for a drained instance",
                );
            }
        }
        self.notify();
    }

    /// Load `Capacity.StateFile`, if set and present, into the pool.
    pub(super) fn load_capacity_state(&self) {
        let Some(path) = self.cfg.capacity.state_file.as_deref() else {
            return;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                self.capacity_file_error(path, &e.to_string());
                return;
            }
        };
        match parse(&text) {
            Ok(saved) => {
                let n = saved.offerings.len();
                let longest = self.cfg.capacity.longest_hold(self.cfg.capacity_error_ttl);
                restore(&mut self.lock(), saved, Instant::now(), Utc::now(), longest);
                tracing::info!(path = %path.display(), offerings = n, "loaded capacity state");
            }
            Err(e) => self.capacity_file_error(path, &e),
        }
    }

    fn capacity_file_error(&self, path: &Path, e: &str) {
        tracing::warn!(path = %path.display(), error = %e, "capacity state file not used");
        self.events.push(
            "error",
            "capacity state",
            format!("{}: {e}", path.display()),
        );
    }

    /// Write `Capacity.StateFile` after each capacity change, until the pool stops.
    pub(super) async fn capacity_state_loop(self: Arc<Self>, path: PathBuf) {
        let mut changes = self.capacity_changes.subscribe();
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = self.tasks.cancelled() => return,
            }
            let text = {
                let st = self.lock();
                let file = snapshot(&st, Instant::now(), Utc::now());
                serde_json::to_string_pretty(&file).unwrap_or_default()
            };
            let e = match tokio::time::timeout(WRITE_DEADLINE, write_atomically(&path, text)).await
            {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("write took longer than {WRITE_DEADLINE:?}"),
            };
            tracing::warn!(path = %path.display(), error = %e, "writing capacity state failed");
            self.events.push(
                "error",
                "capacity state",
                format!("writing {}: {e}", path.display()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_snapshot_restored_later_keeps_what_is_left_of_each_hold_and_the_doubt() {
        let now = Instant::now();
        let utc = at("2026-12-01T10:00:00Z");
        let mut st = State::default();
        st.at_capacity_until.insert(
            "m5.large-preemptible".into(),
            now + Duration::from_secs(120),
        );
        st.at_capacity_until
            .insert("ended".into(), now - Duration::from_secs(1));
        st.capacity_failures
            .insert("m5.large-preemptible".into(), 3);
        st.capacity_failures.insert("in-doubt".into(), 1);
        st.capacity_failures.insert("recovered".into(), 0);
        st.capacity_error.insert(
            "m5.large-preemptible".into(),
            "InsufficientInstanceCapacity".into(),
        );
        let saved = snapshot(&st, now, utc);
        assert_eq!(
            saved.offerings.keys().collect::<Vec<_>>(),
            ["in-doubt", "m5.large-preemptible"]
        );
        let text = serde_json::to_string(&saved).unwrap();
        let back = parse(&text).unwrap();
        assert_eq!(back, saved);

        // Restored 30 s later (a restart): 90 s of the hold left; the doubt stays.
        let later = Instant::now();
        let mut st2 = State::default();
        restore(
            &mut st2,
            back.clone(),
            later,
            utc + chrono::Duration::seconds(30),
            Duration::from_secs(600),
        );
        let left = st2.at_capacity_until["m5.large-preemptible"] - later;
        assert_eq!(left, Duration::from_secs(90));
        assert_eq!(st2.capacity_failures["m5.large-preemptible"], 3);
        assert_eq!(st2.capacity_failures["in-doubt"], 1);
        assert!(!st2.at_capacity_until.contains_key("in-doubt"));
        assert_eq!(
            st2.capacity_error["m5.large-preemptible"],
            "InsufficientInstanceCapacity"
        );

        // Restored after the hold ended: only the doubt; a hold far in the future is cut.
        let mut st3 = State::default();
        restore(
            &mut st3,
            back.clone(),
            later,
            utc + chrono::Duration::seconds(121),
            Duration::from_secs(600),
        );
        assert!(st3.at_capacity_until.is_empty());
        assert_eq!(st3.capacity_failures["m5.large-preemptible"], 3);
        let mut st4 = State::default();
        restore(
            &mut st4,
            back,
            later,
            utc - chrono::Duration::days(1),
            Duration::from_secs(600),
        );
        assert_eq!(
            st4.at_capacity_until["m5.large-preemptible"] - later,
            Duration::from_secs(600)
        );
    }

    #[test]
    fn bad_files_say_what_is_wrong_and_where() {
        assert!(parse("").is_err());
        let e = parse(r#"{"version": 2, "offerings": {}}"#).unwrap_err();
        assert!(e.contains("version 2"), "{e}");
        let e =
            parse(r#"{"version": 1, "offerings": {"a": {"errors_in_a_row": "x"}}}"#).unwrap_err();
        assert!(e.starts_with("offerings.a.errors_in_a_row"), "{e}");
        let e = parse(r#"{"version": 1, "offerings": {}, "extra": 1}"#).unwrap_err();
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn errors_are_cut_on_a_character_boundary() {
        let long = "é".repeat(400);
        let s = short_error(&long);
        assert!(s.len() <= MAX_ERROR_LEN && s.chars().all(|c| c == 'é'));
        assert_eq!(short_error("short"), "short");
    }
}
