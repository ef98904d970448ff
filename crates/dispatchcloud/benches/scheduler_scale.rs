//! The scheduler scale scenario (`scheduler-scale-scenario.md`): one scheduling pass at
//! N containers × M instances, Queued and Locked variants, and instance-type choice for N
//! containers. Run with `cargo bench -p dispatchcloud --bench scheduler_scale`; results and the
//! Go figures are in BENCHMARKS.md.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use arvados::types::Container;
use chrono::Utc;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use dispatchcloud::node_size::TypeChooser;
use dispatchcloud::scheduler::scale::{self, Variant};
use dispatchcloud::scheduler::{longest_wait, plan_queue, plan_sync};

const SIZES: [(usize, usize, &str); 3] = [
    (1_000, 100, "1k x 100"),
    (10_000, 1_000, "10k x 1k"),
    (100_000, 10_000, "100k x 10k"),
];

fn passes(c: &mut Criterion) {
    for (variant, vname) in [(Variant::Queued, "queued"), (Variant::Locked, "locked")] {
        let mut g = c.benchmark_group(format!("run_queue/{vname}"));
        g.sample_size(20).measurement_time(Duration::from_secs(4));
        for (n, m, label) in SIZES {
            let s = scale::build(n, m, variant);
            g.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| {
                    let mut limits = s.limits.clone();
                    black_box(plan_queue(
                        &s.cfg,
                        &mut limits,
                        &s.entries,
                        &s.pool,
                        None,
                        SystemTime::now(),
                    ))
                })
            });
        }
        g.finish();

        let mut g = c.benchmark_group(format!("full_tick/{vname}"));
        g.sample_size(20).measurement_time(Duration::from_secs(4));
        for (n, m, label) in SIZES {
            let s = scale::build(n, m, variant);
            g.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.iter(|| {
                    // What a tick does: copy the queue snapshot, plan, sync, metrics.
                    let entries: Vec<_> = s.entries.to_vec();
                    let mut limits = s.limits.clone();
                    let plan = plan_queue(
                        &s.cfg,
                        &mut limits,
                        &entries,
                        &s.pool,
                        None,
                        SystemTime::now(),
                    );
                    let sync = plan_sync(&entries, &s.pool.running, Some(Utc::now()), false);
                    let wait = longest_wait(&entries, &s.pool.running, Utc::now());
                    black_box((plan, sync, wait))
                })
            });
        }
        g.finish();
    }
}

fn choose_types(c: &mut Criterion) {
    let mut g = c.benchmark_group("choose_instance_types");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for (n, m, label) in SIZES {
        let cluster = scale::cluster(m);
        let chooser = TypeChooser::new(&cluster);
        let ctrs: Vec<Container> = scale::pending_containers(&chooser, n, Variant::Queued)
            .iter()
            .map(|e| e.container().clone())
            .collect();
        g.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter(|| {
                let chosen: Vec<_> = ctrs
                    .iter()
                    .map(|c| chooser.choose(c).map(|t| t.len()).unwrap_or(0))
                    .collect();
                black_box(chosen)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, passes, choose_types);
criterion_main!(benches);
