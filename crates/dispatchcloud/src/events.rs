//! A short in-memory log of what the dispatcher did (creates, shutdowns, errors, containers
//! starting and finishing), newest last, for the status page. Bounded: the oldest entries are
//! dropped. The structured logs remain the record; this is the operator's glance.

use parking_lot::Mutex;
use std::collections::VecDeque;

use chrono::{DateTime, Utc};

/// How many events each log keeps.
pub const KEEP: usize = 200;

/// One thing that happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub at: DateTime<Utc>,
    /// A short word: `created`, `create-failed`, `shutdown`, `gone`, `started`, `ended`,
    /// `complete`, `cancelled`, `hold`, `drain`, `run`, `error`, …
    pub kind: &'static str,
    /// What it happened to: an instance id, a container uuid, an instance type.
    pub subject: String,
    pub detail: String,
}

impl Event {
    /// Whether the status page should show it as a problem.
    pub fn is_error(&self) -> bool {
        matches!(self.kind, "create-failed" | "error" | "broken" | "gone")
    }
}

/// A bounded event log, safe to share.
#[derive(Debug)]
pub struct EventLog {
    keep: usize,
    events: Mutex<VecDeque<Event>>,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new(KEEP)
    }
}

impl EventLog {
    pub fn new(keep: usize) -> EventLog {
        EventLog {
            keep: keep.max(1),
            events: Mutex::new(VecDeque::new()),
        }
    }

    /// Record an event now.
    pub fn push(&self, kind: &'static str, subject: impl Into<String>, detail: impl Into<String>) {
        let mut ev = self.events.lock();
        if ev.len() == self.keep {
            ev.pop_front();
        }
        ev.push_back(Event {
            at: Utc::now(),
            kind,
            subject: subject.into(),
            detail: detail.into(),
        });
    }

    /// Every kept event, oldest first.
    pub fn all(&self) -> Vec<Event> {
        self.events.lock().iter().cloned().collect()
    }
}

/// The newest `n` events of several logs together, newest first.
pub fn newest(logs: &[&EventLog], n: usize) -> Vec<Event> {
    let mut all: Vec<Event> = logs.iter().flat_map(|l| l.all()).collect();
    all.sort_by_key(|e| std::cmp::Reverse(e.at));
    all.truncate(n);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_merges_newest_first() {
        let a = EventLog::new(3);
        for i in 0..5 {
            a.push("created", format!("i-{i}"), "");
        }
        let subjects: Vec<String> = a.all().into_iter().map(|e| e.subject).collect();
        assert_eq!(subjects, ["i-2", "i-3", "i-4"]);
        let b = EventLog::new(3);
        b.push("complete", "c-1", "");
        let merged = newest(&[&a, &b], 2);
        assert_eq!(merged[0].subject, "c-1");
        assert_eq!(merged[1].subject, "i-4");
        assert!(merged[0].at >= merged[1].at);
    }
}
