//! `arvados-dispatch-cloud simulate` as the README runs it: the real dispatcher against the
//! fake API and the stub cloud, ending with a summary whose numbers add up.

use std::process::Command;

fn simulate(args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
        .arg("simulate")
        .args(args)
        .arg("--report")
        .arg(&report)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = std::fs::read_to_string(&report).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, serde_json::from_str(&text).unwrap())
}

fn assert_adds_up(r: &serde_json::Value) {
    let n = r["containers"].as_u64().unwrap();
    assert_eq!(
        r["complete"].as_u64().unwrap()
            + r["cancelled"].as_u64().unwrap()
            + r["unfinished"].as_u64().unwrap(),
        n
    );
    let t = &r["instance_seconds"];
    let (busy, idle, total) = (
        t["busy"].as_f64().unwrap(),
        t["idle"].as_f64().unwrap(),
        t["total"].as_f64().unwrap(),
    );
    assert!(
        (busy + idle - total).abs() < 1e-6,
        "busy + idle = total: {t}"
    );
    assert!(busy > 0.0 && idle >= 0.0);
    let cost = &r["cost"];
    assert!(
        cost["estimated"].as_f64().unwrap() >= cost["ideal"].as_f64().unwrap() * 0.5,
        "{cost}"
    );
    assert!(cost["ideal"].as_f64().unwrap() > 0.0);
    assert!(cost["ideal_with_boot"].as_f64().unwrap() >= cost["ideal"].as_f64().unwrap());
    let eff = cost["efficiency"].as_f64().unwrap();
    assert!(
        (eff - cost["ideal"].as_f64().unwrap() / cost["estimated"].as_f64().unwrap()).abs() < 1e-9,
        "{cost}"
    );
    // Queued → crunch-run splits into queue + boot + dispatcher overhead, per container.
    let split = &r["queue_to_crunch_run_split_seconds"];
    // Every completed container started once at least; a cancelled one may have too.
    let with_split = split["containers"].as_u64().unwrap();
    assert!(
        with_split >= r["complete"].as_u64().unwrap()
            && with_split <= r["complete"].as_u64().unwrap() + r["cancelled"].as_u64().unwrap(),
        "{split}"
    );
    let sum = &split["sum"];
    let part = |k: &str| sum[k].as_f64().unwrap();
    assert!(
        (part("queue") + part("boot") + part("dispatch_overhead") - part("total")).abs() < 1e-6,
        "{sum}"
    );
    for k in ["queue", "boot", "dispatch_overhead"] {
        let q = &split[k];
        assert!(
            q["p50"].as_f64().unwrap() <= q["p99"].as_f64().unwrap(),
            "{k}: {q}"
        );
        assert!(
            q["p99"].as_f64().unwrap() <= q["max"].as_f64().unwrap(),
            "{k}: {q}"
        );
    }
    let starts = &r["started_after_seconds"];
    let (first, all) = (
        starts["first"].as_f64().unwrap(),
        starts["all"].as_f64().unwrap(),
    );
    assert!(
        0.0 <= first && first <= all && all <= r["wall_seconds"].as_f64().unwrap(),
        "{starts}"
    );
    let api = &r["api"];
    assert!(
        api["list_requests_per_minute"].as_f64().unwrap() > 0.0,
        "{api}"
    );
    assert!(
        api["rows_listed_per_minute"].as_f64().unwrap() > 0.0,
        "{api}"
    );
    assert!(
        api["requests_per_minute"].as_f64().unwrap()
            >= api["list_requests_per_minute"].as_f64().unwrap(),
        "{api}"
    );
    // Launches, from the stub cloud's record: every call made a VM or failed, and the
    // per-type counts add up to the totals.
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    let launches = &r["launches"];
    assert_eq!(
        n(&launches["calls"]),
        n(&launches["made"]) + n(&launches["failed_for_capacity"]) + n(&launches["failed_other"]),
        "{launches}"
    );
    let by_type = launches["by_provider_type"].as_object().unwrap();
    assert_eq!(
        by_type.values().map(|t| n(&t["calls"])).sum::<u64>(),
        n(&launches["calls"])
    );
    assert_eq!(
        by_type
            .values()
            .map(|t| n(&t["failed_for_capacity"]))
            .sum::<u64>(),
        n(&launches["failed_for_capacity"])
    );
    let l = &r["queue_to_crunch_run_seconds"];
    assert!(
        l["p50"].as_f64().unwrap() <= l["p95"].as_f64().unwrap()
            && l["p95"].as_f64().unwrap() <= l["max"].as_f64().unwrap(),
        "{l}"
    );
}

#[test]
fn simulate_runs_every_container_once_and_reports() {
    let (out, r) = simulate(&["--containers", "40", "--seed", "3", "--boot-delay", "200ms"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "management API: http://127.0.0.1:",
        "containers:",
        "summary",
        "instance time:",
        "cost:",
        "queue → crunch-run:",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    assert_eq!(r["complete"], 40, "{r}");
    assert_eq!(r["ran_more_than_once"], serde_json::json!([]));
    assert_eq!(r["instances_left"], 0);
    assert_adds_up(&r);
}

#[test]
fn simulate_with_chaos_still_completes_every_container_exactly_once() {
    let (out, r) = simulate(&["--containers", "80", "--faults", "chaos", "--seed", "7"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["complete"], 80, "{r}");
    assert_eq!(r["ran_more_than_once"], serde_json::json!([]));
    assert_eq!(r["instances_left"], 0);
    assert_adds_up(&r);
}

/// Issue 19's capacity-shortage scenario, small: m5.xlarge (both markets) is short for the
/// first 3 s. Every container still completes once (on other types meanwhile), and the
/// report's wasted launches are the stub cloud's capacity errors, all on the short type.
#[test]
fn simulate_capacity_shortage_reports_the_wasted_launches() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("settings.yml");
    std::fs::write(
        &settings,
        "Capacity:\n  Backoff: true\n  BackoffBase: 1s\n  BackoffMax: 4s\n",
    )
    .unwrap();
    let (out, r) = simulate(&[
        "--containers",
        "60",
        "--seed",
        "5",
        "--boot-delay",
        "200ms",
        "--capacity-shortage",
        "m5.xlarge=3s",
        "--settings",
        settings.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("wasted on capacity errors"), "{stdout}");
    assert_eq!(r["complete"], 60, "{r}");
    assert_eq!(r["ran_more_than_once"], serde_json::json!([]));
    assert_eq!(r["instances_left"], 0);
    assert_adds_up(&r);
    let launches = &r["launches"];
    assert!(
        launches["failed_for_capacity"].as_u64().unwrap() >= 1,
        "{launches}"
    );
    for (ty, t) in launches["by_provider_type"].as_object().unwrap() {
        if t["failed_for_capacity"].as_u64().unwrap() > 0 {
            assert!(ty.starts_with("m5.xlarge"), "{launches}");
        }
    }
}

/// Issue 19's zone shortage, small: three zones; m5.xlarge is short in a and b, r5.xlarge in
/// c, for the whole run. Without back-off the stub cloud fails over as Arvados' EC2 driver
/// does, from the one zone that last worked for any type, so each type keeps failing in the
/// zones where the other succeeded; with `Capacity.Backoff` each offering learns its short
/// zones once and goes back to its good one. Wasted launches are the stub cloud's capacity
/// errors (its launch log, per zone).
#[test]
fn simulate_zone_shortage_wastes_fewer_launches_with_capacity_per_zone() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("settings.yml");
    std::fs::write(&settings, "Capacity:\n  Backoff: true\n").unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--containers",
            "200",
            "--seed",
            "3",
            "--arrival-interval",
            "100ms",
            "--zones",
            "a,b,c",
            "--capacity-shortage",
            "m5.xlarge@a=5m",
            "--capacity-shortage",
            "m5.xlarge@b=5m",
            "--capacity-shortage",
            "r5.xlarge@c=5m",
        ];
        args.extend_from_slice(extra);
        let (out, r) = simulate(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(r["complete"], 200, "{r}");
        assert_eq!(r["ran_more_than_once"], serde_json::json!([]));
        assert_eq!(r["instances_left"], 0);
        assert_adds_up(&r);
        r
    };
    let off = run(&[]);
    let on = run(&["--settings", settings.to_str().unwrap()]);
    let wasted = |r: &serde_json::Value| r["launches"]["failed_for_capacity"].as_u64().unwrap();
    let zones = |r: &serde_json::Value| r["launches"]["by_zone"].clone();
    assert!(
        wasted(&off) >= 6,
        "the shared fail-over index keeps failing: {}",
        zones(&off)
    );
    // At most each short zone once per offering (both markets of m5.xlarge in a and b, both
    // of r5.xlarge in c).
    assert!(
        wasted(&on) <= 6 && wasted(&on) < wasted(&off),
        "on {} vs off {}",
        zones(&on),
        zones(&off)
    );
}

/// Issue 19's spot interruption storm, small: the stub cloud takes every VM back 12 s after
/// creating it and announces it 6 s before; 200 containers run 1–3 s. Without
/// `Interruptions.Drain` (Arvados) containers keep starting on doomed VMs and are cut; with
/// it, fewer crunch-runs are cut and less work is lost, by the stub cloud's own record.
#[test]
fn simulate_spot_interruption_storm_loses_less_work_with_drain() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("settings.yml");
    std::fs::write(&settings, "Interruptions:\n  Drain: true\n").unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--containers",
            "200",
            "--seed",
            "2",
            "--arrival-interval",
            "100ms",
            "--run-time",
            "1s..3s",
            "--vanish-after",
            "12s",
            "--interruption-notice",
            "6s",
        ];
        args.extend_from_slice(extra);
        let (out, r) = simulate(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(r["ran_more_than_once"], serde_json::json!([]));
        assert_eq!(r["instances_left"], 0);
        assert_eq!(r["unfinished"], 0, "{r}");
        assert_adds_up(&r);
        r
    };
    let off = run(&[]);
    let drain = run(&["--settings", settings.to_str().unwrap()]);
    let cut = |r: &serde_json::Value| r["interruptions"]["crunch_runs_cut"].as_u64().unwrap();
    let lost = |r: &serde_json::Value| r["interruptions"]["work_lost_seconds"].as_f64().unwrap();
    assert!(
        cut(&off) >= 3,
        "the storm cuts work without drain: {}",
        off["interruptions"]
    );
    assert!(
        cut(&drain) < cut(&off) && lost(&drain) < lost(&off),
        "drain {} vs off {}",
        drain["interruptions"],
        off["interruptions"]
    );
    assert!(drain["complete"].as_u64() > off["complete"].as_u64());
}

/// Issue 19's restart delay: a storm that cuts long containers (5–15 s runs, VMs taken back
/// 20 s after create, so a container placed on a VM that already ran one is likely cut) with
/// `--retries 3`, which retries a Cancelled container as Arvados'
/// container requests do. Each cut container is retried with the same spec, retries rescue
/// originals (more complete in the end than at first), the restart delay is measured from the
/// stub cloud's record of crunch-run lives, and nothing runs twice at once.
#[test]
fn simulate_retries_cut_containers_and_reports_the_restart_delay() {
    let (out, r) = simulate(&[
        "--containers",
        "60",
        "--seed",
        "2",
        "--arrival-interval",
        "300ms",
        "--run-time",
        "5s..15s",
        "--boot-delay",
        "2s",
        "--vanish-after",
        "20s",
        "--interruption-notice",
        "10s",
        "--retries",
        "3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(r["ran_more_than_once"], serde_json::json!([]));
    assert_eq!(r["instances_left"], 0);
    assert_adds_up(&r);
    let retries = &r["retries"];
    let made = retries["containers"].as_u64().unwrap();
    let cancelled = r["cancelled"].as_u64().unwrap();
    assert!(cancelled >= 1, "the storm cuts some containers: {r}");
    // Every Cancelled original is retried; retries of retries come on top.
    assert!(made >= cancelled, "{retries}");
    let rescued = retries["originals_complete_in_the_end"].as_u64().unwrap();
    assert!(rescued > r["complete"].as_u64().unwrap(), "{retries}");
    let delay = &retries["restart_delay_seconds"];
    assert!(delay["count"].as_u64().unwrap() >= 1, "{retries}");
    assert!(delay["p50"].as_f64().unwrap() >= 0.0, "{retries}");
    assert!(stdout.contains("restart delay p50"), "{stdout}");
}

/// Issue 19's spot → on-demand fallback, small: every spot market is short for the first
/// 20 s, and a capacity error holds a type off for Arvados' fixed minute, so without the
/// fallback a spot container queued at the start waits about a minute. With
/// `SpotFallback.After: 2s` each runs on demand after about 2 s.
#[test]
fn simulate_spot_shortage_with_fallback_starts_spot_containers_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("settings.yml");
    std::fs::write(&settings, "SpotFallback:\n  After: 2s\n").unwrap();
    let mut args: Vec<String> = [
        "--containers",
        "120",
        "--seed",
        "4",
        "--arrival-interval",
        "50ms",
        "--settings",
        settings.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    for t in [
        "c5.large",
        "m5.large",
        "m5.xlarge",
        "r5.xlarge",
        "m5.2xlarge",
        "r5.2xlarge",
        "m5.4xlarge",
        "r5.4xlarge",
        "m5.8xlarge",
    ] {
        args.push("--capacity-shortage".into());
        args.push(format!("{t}-preemptible=20s"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, r) = simulate(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(r["complete"], 120, "{r}");
    assert_eq!(r["ran_more_than_once"], serde_json::json!([]));
    assert_adds_up(&r);
    let spot = &r["spot_queue_to_crunch_run_seconds"];
    assert!(spot["containers"].as_u64().unwrap() >= 3, "{spot}");
    assert!(
        r["launches"]["failed_for_capacity"].as_u64().unwrap() >= 1,
        "the spot markets were short: {}",
        r["launches"]
    );
    // Well under the minute a held-off spot type would take.
    assert!(spot["max"].as_f64().unwrap() < 30.0, "{spot}");
}

#[test]
fn simulate_bad_arguments_print_usage() {
    let out = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
        .args(["simulate", "--faults", "meteor"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value 'meteor'") && err.contains("possible values: none, chaos"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
        .args(["simulate", "--boot-delay", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--boot-delay"));
    for bad in ["m5.xlarge", "=10m", "m5.xlarge=soon"] {
        let out = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
            .args(["simulate", "--capacity-shortage", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--capacity-shortage"), "{bad}: {err}");
    }
}

/// The acceptance run, exactly: 2000 containers, chaos, seed 7.
#[test]
fn simulate_2000_containers_with_chaos_seed_7_completes_each_exactly_once() {
    let (out, r) = simulate(&["--containers", "2000", "--faults", "chaos", "--seed", "7"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r["complete"], 2000, "{r}");
    assert_eq!(r["ran_more_than_once"], serde_json::json!([]));
    assert_eq!(r["instances_left"], 0);
    assert_adds_up(&r);
}

/// The dispatcher's JSON logs have Arvados' shape (what log pipelines built for the Go
/// dispatcher key on), and `SystemLogs.LogLevel` sets the level.
#[test]
fn logs_are_arvados_shaped_json_lines_at_the_configured_level() {
    let run = |config: Option<&std::path::Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"));
        c.args(["--log-format", "json", "simulate", "--containers", "10"])
            .env_remove("RUST_LOG");
        if let Some(p) = config {
            c.arg("--config").arg(p);
        }
        let child = c
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        (pid, lines)
    };
    let (pid, lines) = run(None);
    assert!(lines.len() > 10, "{lines:?}");
    for l in &lines {
        let time = l["time"].as_str().unwrap();
        // 2026-11-30T12:00:00.123456789Z: RFC 3339, UTC, nanoseconds.
        assert!(
            time.len() == 30
                && time.ends_with('Z')
                && &time[19..20] == "."
                && time[20..29].bytes().all(|b| b.is_ascii_digit())
                && chrono::DateTime::parse_from_rfc3339(time).is_ok(),
            "{l}"
        );
        assert!(
            ["trace", "debug", "info", "warning", "error"].contains(&l["level"].as_str().unwrap()),
            "{l}"
        );
        assert!(l["msg"].is_string(), "{l}");
        assert_eq!(l["PID"], pid, "{l}");
        assert_eq!(l["ClusterID"], "zzzzz", "{l}");
        for k in ["message", "fields", "target", "timestamp"] {
            assert!(l.get(k).is_none(), "{k} in {l}");
        }
    }
    for field in ["ContainerUUID", "Instance", "InstanceType"] {
        assert!(
            lines.iter().any(|l| l[field].is_string()),
            "no line has {field}"
        );
    }
    assert!(lines.iter().any(|l| l["level"] == "info"));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("simulate.yml");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/simulate.yml"),
    )
    .unwrap()
    .replace(
        "    ManagementToken:",
        "    SystemLogs: {LogLevel: warning}\n    ManagementToken:",
    );
    std::fs::write(&config, text).unwrap();
    let (_, lines) = run(Some(&config));
    assert!(
        lines
            .iter()
            .all(|l| l["level"] == "warning" || l["level"] == "error"),
        "{lines:?}"
    );
}

/// The spend cap judged by the stub cloud's own record: with `SpendCaps.MaxCostPerHour: 2`
/// the VMs the cloud holds at once never cost more than 2/h and every container still runs
/// once; the same workload without the cap goes well past it (so the check can fail).
#[test]
fn simulate_with_a_spend_cap_keeps_the_cloud_under_it() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("settings.yml");
    std::fs::write(&settings, "SpendCaps:\n  MaxCostPerHour: 2.0\n").unwrap();
    let base = ["--containers", "40", "--seed", "3", "--boot-delay", "200ms"];
    let mut capped: Vec<&str> = base.to_vec();
    capped.extend(["--settings", settings.to_str().unwrap()]);
    let (out, r) = simulate(&capped);
    assert!(out.status.success(), "{r}");
    assert_adds_up(&r);
    assert_eq!(r["complete"], 40, "{r}");
    assert_eq!(r["ran_more_than_once"], serde_json::json!([]), "{r}");
    let peak = r["fleet_price_per_hour_peak"].as_f64().unwrap();
    assert!(
        peak > 0.0 && peak <= 2.0 + 1e-9,
        "peak {peak}/h over the cap: {r}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spend cap:"));
    let (_, free) = simulate(&base);
    let peak = free["fleet_price_per_hour_peak"].as_f64().unwrap();
    assert!(
        peak > 2.0,
        "without the cap the fleet peaks at {peak}/h: {free}"
    );
}
