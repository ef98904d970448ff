//! Judges of a dispatcher run that do not trust the dispatcher: they read the stub cloud's own
//! record of crunch-run processes and VMs, and the fake API's record of state changes.
//!
//! * [`double_runs`]: two lives of one container's crunch-run that overlap in time (the
//!   dispatcher started it twice).
//! * [`runs_after_final`]: a crunch-run started after its container reached Complete or
//!   Cancelled.
//! * [`leaked_vms`]: VMs the cloud still has at the end of a run.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::StateChange;
use crate::stub_driver::{ProcessLife, StubSet};

/// One message per pair of overlapping lives of the same container (a life still running
/// overlaps everything that starts after it).
pub fn double_runs(lives: &[ProcessLife]) -> Vec<String> {
    let mut by_uuid: HashMap<&str, Vec<&ProcessLife>> = HashMap::new();
    for l in lives {
        by_uuid.entry(l.uuid.as_str()).or_default().push(l);
    }
    let mut out = Vec::new();
    for (uuid, mut ls) in by_uuid {
        ls.sort_by_key(|l| l.start);
        for (i, a) in ls.iter().enumerate() {
            for b in &ls[i + 1..] {
                let overlaps = a.end.is_none_or(|end| b.start < end);
                if overlaps {
                    out.push(format!(
                        "{uuid} ran twice at once: on {} and on {}",
                        a.vm, b.vm
                    ));
                }
            }
        }
    }
    out.sort();
    out
}

/// One message per crunch-run started after its container reached a final state.
pub fn runs_after_final(lives: &[ProcessLife], changes: &[StateChange]) -> Vec<String> {
    let mut final_at: HashMap<&str, DateTime<Utc>> = HashMap::new();
    for c in changes {
        if c.to == "Complete" || c.to == "Cancelled" {
            final_at.entry(c.uuid.as_str()).or_insert(c.at);
        }
    }
    let mut out: Vec<String> = lives
        .iter()
        .filter_map(|l| {
            let done = final_at.get(l.uuid.as_str())?;
            (l.started_at > *done).then(|| {
                format!(
                    "{} started on {} at {} after it was final at {done}",
                    l.uuid, l.vm, l.started_at
                )
            })
        })
        .collect();
    out.sort();
    out
}

/// The ids of every VM the stub cloud still has.
pub fn leaked_vms(set: &StubSet) -> Vec<String> {
    use cloud::Instance;
    let mut v: Vec<String> = set.vms().iter().map(|vm| vm.id()).collect();
    v.sort();
    v
}

/// Every violation the oracles find in a finished run (empty = good).
pub fn violations(set: &StubSet, changes: &[StateChange]) -> Vec<String> {
    let lives = set.process_lives();
    let mut v = double_runs(&lives);
    v.extend(runs_after_final(&lives, changes));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

    fn life(uuid: &str, vm: &str, start: Instant, secs: Option<u64>) -> ProcessLife {
        ProcessLife {
            uuid: uuid.into(),
            vm: vm.into(),
            start,
            end: secs.map(|s| start + Duration::from_secs(s)),
            started_at: Utc::now(),
            cut: false,
        }
    }

    #[test]
    fn overlapping_lives_of_one_container_are_reported_and_sequential_ones_are_not() {
        let t = Instant::now();
        let s = |n| t + Duration::from_secs(n);
        let lives = vec![
            life("a", "vm1", s(0), Some(10)),
            life("a", "vm2", s(10), Some(5)), // after the first ended: a retry, fine
            life("b", "vm1", s(0), None),
            life("b", "vm3", s(100), Some(1)), // the first still runs
            life("c", "vm1", s(0), Some(10)),
            life("c", "vm1", s(9), Some(10)),
        ];
        assert_eq!(
            double_runs(&lives),
            [
                "b ran twice at once: on vm1 and on vm3",
                "c ran twice at once: on vm1 and on vm1"
            ]
        );
    }

    #[test]
    fn a_start_after_complete_is_reported() {
        let t = Instant::now();
        let mut late = life("a", "vm2", t, Some(1));
        let done = Utc::now();
        late.started_at = done + chrono::Duration::seconds(1);
        let mut early = life("a", "vm1", t, Some(1));
        early.started_at = done - chrono::Duration::seconds(5);
        let changes = vec![StateChange {
            uuid: "a".into(),
            from: "Running".into(),
            to: "Complete".into(),
            by: "x".into(),
            at: done,
        }];
        let v = runs_after_final(&[early, late], &changes);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("a started on vm2"), "{v:?}");
    }
}
