//! `dashboards/`: the Grafana dashboards and the Prometheus rules, checked against the real
//! tools. The JSON is what `dashboards/build.py` writes and type-checks against Grafana's
//! published schema; the rules pass `promtool`'s checks and unit tests; and every query of
//! every panel and rule is run on a real Prometheus that scraped `simulate --faults chaos`: a
//! query that returns nothing, a metric that does not exist or a label that no series has
//! fails with the panel's title or the rule's name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

mod common;
use common::run;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboards() -> Vec<(String, Value)> {
    ["overview.json", "cost-capacity.json"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(repo().join("dashboards").join(name)).unwrap();
            (name.to_string(), serde_json::from_str(&text).unwrap())
        })
        .collect()
}

/// Whether `tool` runs; if not, fail under CI (scripts/test installs it) and skip loudly
/// elsewhere.
fn have(tool: &str, version_arg: &str) -> bool {
    common::tool_with(tool, &[version_arg]).is_some()
}

// ---------------------------------------------------------------------------------------------
// The dashboard JSON

#[test]
fn dashboard_json_is_what_build_py_writes() {
    let (ok, out) = run(Command::new("python3")
        .arg(repo().join("dashboards/build.py"))
        .arg("--check"));
    assert!(ok, "{out}");
}

/// Every panel of every dashboard, rows included.
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

#[test]
fn dashboards_are_well_formed() {
    for (name, d) in dashboards() {
        let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap(), v))
            .collect();
        assert_eq!(vars["datasource"]["type"], "datasource", "{name}");
        assert_eq!(vars["datasource"]["query"], "prometheus", "{name}");
        assert_eq!(vars["instance"]["type"], "query", "{name}");
        let mut ids = BTreeSet::new();
        let mut cells: BTreeSet<(u64, u64)> = BTreeSet::new();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap();
            let where_ = format!("{name}: panel {title:?}");
            assert!(
                ids.insert(p["id"].as_u64().unwrap()),
                "{where_}: duplicate id"
            );
            let g = &p["gridPos"];
            let (x, y, w, h) = (
                g["x"].as_u64().unwrap(),
                g["y"].as_u64().unwrap(),
                g["w"].as_u64().unwrap(),
                g["h"].as_u64().unwrap(),
            );
            assert!(w > 0 && h > 0 && x + w <= 24, "{where_}: grid {g}");
            for cx in x..x + w {
                for cy in y..y + h {
                    assert!(cells.insert((cx, cy)), "{where_}: overlaps another panel");
                }
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{where_}");
            if p["type"] == "row" {
                continue;
            }
            assert!(
                !p["description"].as_str().unwrap_or("").is_empty(),
                "{where_}: no description"
            );
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{where_}: no query");
            let mut refs = BTreeSet::new();
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{where_}");
                assert!(refs.insert(t["refId"].as_str().unwrap()), "{where_}: refId");
                // Every selector of a dispatcher metric is filtered on the chosen dispatcher.
                let (sels, _) = promql::selectors(t["expr"].as_str().unwrap());
                for s in sels {
                    assert!(
                        s.contains("instance=~\"$instance\""),
                        "{where_}: {s} is not filtered on $instance"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Grafana's schema

fn schema_check_dir() -> PathBuf {
    repo().join("dashboards/schema-check")
}

/// Write `dashboards` as `const d = … satisfies Dashboard` modules into `out/` and run `tsc
/// --strict` over them.
fn tsc(dashboards: &[(String, String)]) -> (bool, String) {
    let dir = schema_check_dir();
    let out = dir.join("out");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    for (name, json) in dashboards {
        std::fs::write(
            out.join(name.replace(".json", ".ts")),
            format!(
                "import type {{ Dashboard }} from \"@grafana/schema\";\n\nexport const dashboard = {json} satisfies Dashboard;\n"
            ),
        )
        .unwrap();
    }
    run(Command::new("node")
        .arg(dir.join("node_modules/typescript/bin/tsc"))
        .arg("-p")
        .arg(&dir))
}

#[test]
fn dashboards_type_check_against_grafanas_schema() {
    if !have("node", "--version") {
        return;
    }
    let installed = schema_check_dir().join("node_modules/@grafana/schema/package.json");
    if !installed.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "dashboards/schema-check has no node_modules in CI: scripts/test runs npm ci there"
        );
        eprintln!("SKIPPED: run `npm ci` in dashboards/schema-check (scripts/test does)");
        return;
    }
    let boards: Vec<(String, String)> = dashboards()
        .into_iter()
        .map(|(n, d)| (n, serde_json::to_string_pretty(&d).unwrap()))
        .collect();
    // The check can fail: a misspelt field and a wrongly typed one are refused.
    let mut bad = boards[0].1.clone();
    bad = bad.replacen("\"gridPos\": {", "\"gridPos\": {\"wide\": 1,", 1);
    let (ok, out) = tsc(&[("bad-field.json".into(), bad)]);
    assert!(!ok && out.contains("'\"wide\"' does not exist"), "{out}");
    let bad = boards[0]
        .1
        .replacen("\"schemaVersion\": 41", "\"schemaVersion\": \"41\"", 1);
    let (ok, out) = tsc(&[("bad-type.json".into(), bad)]);
    assert!(!ok && out.contains("error TS2322"), "{out}");

    let (ok, out) = tsc(&boards);
    assert!(ok, "tsc --strict refused the dashboards:\n{out}");
}

// ---------------------------------------------------------------------------------------------
// The rules

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !have("promtool", "--version") {
        return;
    }
    let dir = repo().join("dashboards");
    let (ok, out) = run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(dir.join("alerts.yml")));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(dir.join("alerts.test.yml")));
    assert!(ok && out.contains("SUCCESS"), "{out}");
}

/// Each alert has a test case, a summary and description, and a runbook section.
#[test]
fn every_alert_is_tested_and_has_a_runbook() {
    let rules: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("dashboards/alerts.yml")).unwrap(),
    )
    .unwrap();
    let tests = std::fs::read_to_string(repo().join("dashboards/alerts.test.yml")).unwrap();
    let readme = std::fs::read_to_string(repo().join("dashboards/README.md")).unwrap();
    let mut n = 0;
    for (_, alert, rule) in rules_of(&rules) {
        let Some(alert) = alert else { continue };
        n += 1;
        for k in ["summary", "description"] {
            assert!(
                rule["annotations"][k]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{alert}: no {k}"
            );
        }
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no case in alerts.test.yml"
        );
        assert!(
            readme.contains(&format!("### {alert}\n")),
            "{alert} has no runbook section in dashboards/README.md"
        );
    }
    assert!(n >= 10, "only {n} alerts");
}

/// (expr, alert name or None for a recording rule, the rule) for every rule.
fn rules_of(rules: &serde_norway::Value) -> Vec<(String, Option<String>, &serde_norway::Value)> {
    let mut out = Vec::new();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let expr = r["expr"].as_str().unwrap().to_string();
            out.push((expr, r["alert"].as_str().map(String::from), r));
        }
    }
    out
}

/// The example scrape job is a valid Prometheus config that loads alerts.yml, and the Grafana
/// provisioning files name what the README says.
#[test]
fn example_prometheus_config_and_grafana_provisioning_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(repo().join("dashboards/prometheus.yml")).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let config = example
        .replace(
            "/etc/prometheus/rules/arvados-dispatch-cloud.yml",
            &repo().join("dashboards/alerts.yml").display().to_string(),
        )
        .replace(
            "/etc/prometheus/arvados-management-token",
            &token.display().to_string(),
        );
    assert_ne!(config, example);
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    if have("promtool", "--version") {
        let (ok, out) = run(Command::new("promtool")
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml")));
        let rules = std::fs::read_to_string(repo().join("dashboards/alerts.yml"))
            .unwrap()
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                l.starts_with("- alert:") || l.starts_with("- record:")
            })
            .count();
        assert!(
            ok && out.contains(&format!("SUCCESS: {rules} rules found")),
            "{out}"
        );
    }
    let read = |p: &str| -> serde_norway::Value {
        serde_norway::from_str(
            &std::fs::read_to_string(repo().join("dashboards/provisioning").join(p)).unwrap(),
        )
        .unwrap()
    };
    let d = read("dashboards/arvados-dispatch-cloud.yml");
    assert_eq!(d["apiVersion"].as_u64(), Some(1));
    assert_eq!(d["providers"][0]["type"].as_str(), Some("file"));
    assert!(d["providers"][0]["options"]["path"].as_str().is_some());
    let ds = read("datasources/prometheus.yml");
    assert_eq!(ds["datasources"][0]["type"].as_str(), Some("prometheus"));
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus scraping the dispatcher

struct Prometheus {
    child: std::process::Child,
    url: String,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Start Prometheus on loopback, scraping `target` every second (job
    /// `arvados-dispatch-cloud`, as alerts.yml expects) and evaluating alerts.yml.
    fn start(target: &str, token: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            r#"global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: arvados-dispatch-cloud
    authorization:
      credentials: {token}
    static_configs:
      - targets: ["{target}"]
"#,
            rules = repo().join("dashboards/alerts.yml").display(),
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = testkit::free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .no_proxy()
                .build()
                .unwrap(),
            _dir: dir,
        }
    }

    fn get(&self, path: &str, params: &[(&str, String)]) -> Value {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), params).unwrap();
        self.rt.block_on(async {
            let resp = self
                .http
                .get(url)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            let text = resp.text().await.unwrap();
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
        })
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = self.rt.block_on(async {
                self.http
                    .get(format!("{}/-/ready", self.url))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            });
            if ready {
                return;
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("prometheus exited: {s}");
            }
            assert!(Instant::now() < deadline, "prometheus not ready in 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The window the dispatcher was scraped in, and what it is asked over it.
struct Window<'a> {
    prom: &'a Prometheus,
    start: f64,
    end: f64,
}

impl Window<'_> {
    /// `query_range` over the window, step 1 s: the result, or Prometheus' error.
    fn range(&self, expr: &str) -> Result<Vec<Value>, String> {
        let v = self.prom.get(
            "/api/v1/query_range",
            &[
                ("query", expr.to_string()),
                ("start", format!("{:.3}", self.start)),
                ("end", format!("{:.3}", self.end)),
                ("step", "1".into()),
            ],
        );
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().unwrap().clone())
    }

    /// The series matching `selector` in the window.
    fn series(&self, selector: &str) -> Result<Vec<Value>, String> {
        let v = self.prom.get(
            "/api/v1/series",
            &[
                ("match[]", selector.to_string()),
                ("start", format!("{:.3}", self.start)),
                ("end", format!("{:.3}", self.end)),
            ],
        );
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"].as_array().unwrap().clone())
    }

    /// What is wrong with `expr` (a panel's with its legend, or a rule's): a selector no
    /// series matches, a grouping or legend label no series has, an error, or (if
    /// `must_return`) an empty result.
    fn problems(&self, expr: &str, legend: &str, must_return: bool) -> Vec<String> {
        let expr = substitute(expr);
        let mut out = Vec::new();
        let (selectors, grouping) = promql::selectors(&expr);
        let mut labels: BTreeSet<String> = BTreeSet::new();
        for s in &selectors {
            match self.series(s) {
                Ok(series) if series.is_empty() => out.push(format!("no series match {s}")),
                Ok(series) => {
                    for one in series {
                        labels.extend(one.as_object().unwrap().keys().cloned());
                    }
                }
                Err(e) => out.push(format!("{s}: {e}")),
            }
        }
        for l in grouping {
            if !labels.contains(&l) && !selectors.is_empty() {
                out.push(format!("no series of {selectors:?} has the label {l:?}"));
            }
        }
        match self.range(&expr) {
            Err(e) => out.push(format!("error: {e}")),
            Ok(result) => {
                if must_return && result.is_empty() {
                    out.push("returned no data".into());
                }
                for l in promql::legend_labels(legend) {
                    if !result.is_empty() && !result.iter().any(|r| r["metric"].get(&l).is_some()) {
                        out.push(format!("legend names {{{{{l}}}}}, which no result has"));
                    }
                }
            }
        }
        out
    }
}

/// Grafana's variables as the test's Prometheus needs them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$__range", "5m")
        .replace("$__interval", "5s")
        .replace("$instance", ".*")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn every_panel_and_rule_query_returns_data_from_prometheus_scraping_simulate() {
    if !have("prometheus", "--version") {
        return;
    }
    let port = testkit::free_port();
    let target = format!("127.0.0.1:{port}");
    let token = "simulate-management-token";
    let mut prom = Prometheus::start(&target, token);
    prom.wait_ready();
    let start = unix_now();
    let sim = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
        .args(["simulate", "--faults", "chaos", "--containers", "300"])
        .arg("--listen")
        .arg(&target)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        sim.status.success(),
        "simulate failed:\n{}\n{}",
        String::from_utf8_lossy(&sim.stdout),
        String::from_utf8_lossy(&sim.stderr)
    );
    // Let the last scrape and rule evaluation land.
    std::thread::sleep(Duration::from_secs(3));
    let w = Window {
        prom: &prom,
        start,
        end: unix_now(),
    };
    let up = w.range("up{job=\"arvados-dispatch-cloud\"} == 1").unwrap();
    let scrapes = up
        .first()
        .and_then(|s| s["values"].as_array())
        .map_or(0, |v| v.len());
    assert!(
        scrapes >= 5,
        "Prometheus scraped simulate only {scrapes} times"
    );

    // The checker can fail: a metric and a label that do not exist, and a legend naming a
    // label the query drops.
    assert!(
        !w.problems("arvados_dispatchcloud_instance_total", "", true)
            .is_empty()
    );
    assert!(
        !w.problems(
            "sum by (instance_typ) (arvados_dispatchcloud_instances_total)",
            "",
            true
        )
        .is_empty()
    );
    assert!(
        !w.problems(
            "sum by (category) (arvados_dispatchcloud_instances_total)",
            "{{instance_type}}",
            true
        )
        .is_empty()
    );

    let mut failures = Vec::new();
    for (name, d) in dashboards() {
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap();
                let legend = t["legendFormat"].as_str().unwrap_or("");
                for problem in w.problems(expr, legend, true) {
                    failures.push(format!(
                        "{name}: panel {:?} query {}: {problem}\n    {expr}",
                        p["title"].as_str().unwrap(),
                        t["refId"]
                    ));
                }
            }
        }
    }
    let rules: serde_norway::Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("dashboards/alerts.yml")).unwrap(),
    )
    .unwrap();
    for (expr, alert, rule) in rules_of(&rules) {
        let name = alert
            .clone()
            .or_else(|| rule["record"].as_str().map(String::from))
            .unwrap();
        // A recording rule must produce data; an alert's expression returns data only while
        // it fires, so its selectors and labels are checked instead.
        for problem in w.problems(&expr, "", alert.is_none()) {
            failures.push(format!("rule {name}: {problem}\n    {expr}"));
        }
        if alert.is_none() && w.range(&name).map_or(true, |r| r.is_empty()) {
            failures.push(format!("recording rule {name} recorded nothing"));
        }
    }
    // Prometheus evaluated every rule without error.
    let loaded = prom.get("/api/v1/rules", &[]);
    for g in loaded["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            if r["health"] != "ok" {
                failures.push(format!(
                    "Prometheus evaluates rule {} with health {}: {}",
                    r["name"], r["health"], r["lastError"]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// The selectors and labels of a PromQL expression

mod promql {
    /// Words that are neither metric names nor functions.
    const KEYWORDS: [&str; 9] = [
        "bool", "and", "or", "unless", "offset", "atan2", "inf", "nan", "start",
    ];
    /// Keywords followed by a parenthesised list of label names.
    const LABEL_LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];

    /// Skip a quoted string starting at `i`; the index after it.
    fn skip_string(b: &[u8], i: usize) -> usize {
        let q = b[i];
        let mut j = i + 1;
        while j < b.len() && b[j] != q {
            if b[j] == b'\\' && q != b'`' {
                j += 1;
            }
            j += 1;
        }
        j + 1
    }

    /// From `i` at an opening bracket, the index after its closing one (strings skipped).
    fn skip_group(b: &[u8], i: usize, close: u8) -> usize {
        let mut j = i + 1;
        while j < b.len() && b[j] != close {
            if matches!(b[j], b'"' | b'\'' | b'`') {
                j = skip_string(b, j);
            } else {
                j += 1;
            }
        }
        j + 1
    }

    /// The vector selectors (`name{matchers}`) of `expr`, and the label names in its
    /// `by`/`without`/`on`/`ignoring`/`group_*` lists.
    pub fn selectors(expr: &str) -> (Vec<String>, Vec<String>) {
        let b = expr.as_bytes();
        let (mut sels, mut labels) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if matches!(c, b'"' | b'\'' | b'`') {
                i = skip_string(b, i);
            } else if c == b'[' {
                i = skip_group(b, i, b']');
            } else if c == b'{' {
                let end = skip_group(b, i, b'}').min(b.len());
                sels.push(expr[i..end].to_string());
                i = end;
            } else if c.is_ascii_digit() || c == b'.' {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                    i += 1;
                }
            } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let mut j = i;
                while j < b.len() && b[j].is_ascii_whitespace() {
                    j += 1;
                }
                let next = b.get(j).copied();
                let next_word: String = expr[j..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if LABEL_LISTS.contains(&word) {
                    if next == Some(b'(') {
                        let end = skip_group(b, j, b')').min(b.len());
                        labels.extend(
                            expr[j + 1..end - 1]
                                .split(',')
                                .map(str::trim)
                                .filter(|l| !l.is_empty())
                                .map(String::from),
                        );
                        i = end;
                    }
                } else if KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                    || next == Some(b'(')
                    || next_word == "by"
                    || next_word == "without"
                {
                    // An operator, a function or an aggregation.
                } else if next == Some(b'{') {
                    let end = skip_group(b, j, b'}').min(b.len());
                    sels.push(format!("{word}{}", &expr[j..end]));
                    i = end;
                } else {
                    sels.push(word.to_string());
                }
            } else {
                i += 1;
            }
        }
        (sels, labels)
    }

    /// The labels a Grafana legend format names (`{{label}}`).
    pub fn legend_labels(legend: &str) -> Vec<String> {
        legend
            .split("{{")
            .skip(1)
            .filter_map(|s| s.split_once("}}"))
            .map(|(l, _)| l.trim().to_string())
            .collect()
    }

    #[test]
    fn finds_selectors_and_grouping_labels() {
        let (s, l) = selectors(
            r#"sum by (job, instance) (increase(a_b_count{x="1,}",y=~"a|b"}[15m])) == 0 and on (instance) c:d:e > bool 0.5e3 or rate(f[5m] offset 1h) / sum(g) without (le)"#,
        );
        assert_eq!(s, [r#"a_b_count{x="1,}",y=~"a|b"}"#, "c:d:e", "f", "g"]);
        assert_eq!(l, ["job", "instance", "instance", "le"]);
        assert_eq!(
            legend_labels("{{operation}} {{ kind }} x"),
            ["operation", "kind"]
        );
        let (s, _) = selectors("vector(100)");
        assert!(s.is_empty());
    }
}
