//! Keeping Slurm's order equal to Arvados' order by adjusting nice values. Pure functions.

use arvados::types::Container;

/// The priority a container's job should have relative to the others: Arvados' own for a
/// modern API server (which already folds in the creation time), or, for a legacy server's
/// raw priority (≤ 1000), `p × 2^50` minus the creation time so older containers win ties.
pub fn desired_priority(c: &Container) -> i64 {
    let p = c.priority;
    if p > 1000 {
        return p;
    }
    let created_ns = c
        .created_at
        .and_then(|t| t.timestamp_nanos_opt())
        .unwrap_or(0);
    p.saturating_mul(1 << 50).saturating_sub(created_ns >> 14)
}

/// A job's current place in Slurm: its priority (nice penalty included) and nice value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlurmPriority {
    pub priority: i64,
    pub nice: i64,
}

/// Nice values that put `jobs` (most important first) in order, `spread` priority points
/// apart where anything must change. A job already in order and not more than ten spreads
/// below the one before keeps its nice value, which keeps `scontrol` calls few. `spread` < 1
/// means 10. The first job always gets nice 0.
pub fn want_nice(jobs: &[SlurmPriority], spread: i64) -> Vec<i64> {
    let spread = if spread < 1 { 10 } else { spread };
    let mut out = Vec::with_capacity(jobs.len());
    let mut target: i64 = 0;
    for (i, job) in jobs.iter().enumerate() {
        let possible = job.priority + job.nice;
        if i == 0 {
            out.push(0);
            target = possible;
        } else {
            let space = target - job.priority;
            if (0..(spread - 1) * 10).contains(&space) {
                out.push(job.nice);
                target = job.priority;
            } else {
                target -= spread - 1;
                if target > possible {
                    out.push(0);
                    target = possible;
                } else {
                    out.push(possible - target);
                }
            }
        }
        target -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(v: &[(i64, i64)]) -> Vec<SlurmPriority> {
        v.iter()
            .map(|&(priority, nice)| SlurmPriority { priority, nice })
            .collect()
    }

    /// (spread, (priority, nice) per job, expected nice values).
    type Case = (i64, Vec<(i64, i64)>, Vec<i64>);

    /// Every non-empty case, for the fixed-point check.
    fn cases() -> Vec<Case> {
        vec![
            (10, vec![(4294000111, 10000)], vec![0]),
            (10, vec![(4294000111, 10000); 4], vec![0, 10, 20, 30]),
            (
                10,
                vec![(4294000113, 0), (4294000112, 1), (4294000111, 99)],
                vec![0, 1, 99],
            ),
            (
                10,
                vec![(4294000144, 0), (4294000122, 20), (4294000111, 30)],
                vec![0, 20, 30],
            ),
            (
                10,
                vec![(4000, 0), (3000, 999), (2000, 1998)],
                vec![0, 9, 18],
            ),
            (
                10,
                vec![(4000, 0), (3000, 500), (2000, 2000)],
                vec![0, 0, 510],
            ),
            (
                0,
                vec![(4000, 0), (5000, 0), (6000, 0)],
                vec![0, 1010, 2020],
            ),
            (
                1,
                vec![(4000, 0), (5000, 0), (6000, 0), (3000, 0)],
                vec![0, 1001, 2002, 0],
            ),
        ]
    }

    fn check(i: usize) {
        let (spread, input, want) = &cases()[i];
        assert_eq!(&want_nice(&jobs(input), *spread), want, "case {i}");
    }

    #[test]
    fn ac_slurm_19_no_jobs() {
        assert!(want_nice(&[], 0).is_empty());
    }

    #[test]
    fn ac_slurm_20_empty_list() {
        assert_eq!(want_nice(&Vec::new(), 0), Vec::<i64>::new());
    }

    #[test]
    fn ac_slurm_21_one_job() {
        check(0);
    }

    #[test]
    fn ac_slurm_22_four_equal_jobs() {
        check(1);
    }

    #[test]
    fn ac_slurm_23_small_gaps_in_order_unchanged() {
        check(2);
    }

    #[test]
    fn ac_slurm_24_gaps_below_ten_spreads_unchanged() {
        check(3);
    }

    #[test]
    fn ac_slurm_25_large_gaps_closed() {
        check(4);
    }

    #[test]
    fn ac_slurm_26_no_negative_nice() {
        check(5);
    }

    #[test]
    fn ac_slurm_27_reordering() {
        check(6);
    }

    #[test]
    fn ac_slurm_28_spread_one() {
        check(7);
    }

    #[test]
    fn ac_slurm_29_fixed_point() {
        for (spread, input, _) in cases() {
            let first = want_nice(&jobs(&input), spread);
            let applied: Vec<(i64, i64)> = input
                .iter()
                .zip(&first)
                .map(|(&(p, n), &new)| (p + n - new, new))
                .collect();
            assert_eq!(want_nice(&jobs(&applied), spread), first, "{input:?}");
        }
    }

    #[test]
    fn ac_slurm_30_churn_bound() {
        let mut js: Vec<SlurmPriority> = (0..1000)
            .map(|i| SlurmPriority {
                priority: 4294000000 - i,
                nice: 10000,
            })
            .collect();
        let mut changes = 0;
        while !js.is_empty() {
            let want = want_nice(&js, 10);
            for (j, n) in js.iter_mut().zip(want) {
                if j.nice != n {
                    j.priority += j.nice - n;
                    j.nice = n;
                    changes += 1;
                }
            }
            js.remove(0);
        }
        assert!(changes < 1000 * 1000 / 10, "{changes} changes");
    }

    #[test]
    fn ac_slurm_s6_priority_mapping() {
        let mut c = Container {
            priority: 5000,
            ..Default::default()
        };
        assert_eq!(desired_priority(&c), 5000);
        c.priority = 1;
        c.created_at = Some("2016-01-11T11:11:11.111111111Z".parse().unwrap());
        assert_eq!(desired_priority(&c), 1_037_245_691_076_565);
    }
}
