//! ARCHITECTURE.md's crate map is the dependency graph: the "may depend on" column must list
//! exactly each workspace crate's normal dependencies on other workspace crates, as `cargo
//! metadata` reports them, and the invariants under it hold in the source.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Workspace crate → (its normal dependencies on workspace crates, which of them are optional,
/// its dev-dependencies on workspace crates).
type Graph = BTreeMap<String, (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>)>;

fn graph() -> Graph {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(ROOT)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = m["packages"].as_array().unwrap();
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let mut g = Graph::new();
    for p in packages {
        let entry = g
            .entry(p["name"].as_str().unwrap().to_string())
            .or_default();
        for d in p["dependencies"].as_array().unwrap() {
            let name = d["name"].as_str().unwrap().to_string();
            if !names.contains(&name) {
                continue;
            }
            match d["kind"].as_str() {
                None => {
                    if d["optional"].as_bool() == Some(true) {
                        entry.1.insert(name.clone());
                    }
                    entry.0.insert(name);
                }
                Some("dev") => {
                    entry.2.insert(name);
                }
                Some(_) => {}
            }
        }
    }
    g
}

/// The map's rows: crate → (names in the last column, names marked optional there).
fn documented(doc: &str) -> BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> {
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Crates and their invariants"))
        .expect("ARCHITECTURE.md has a 'Crates and their invariants' section");
    let ticked = |cell: &str| -> Vec<String> {
        cell.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let mut rows = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
        let krate = ticked(cells[0]).remove(0);
        let last = cells.last().unwrap();
        let mut deps = BTreeSet::new();
        let mut optional = BTreeSet::new();
        for part in last.split(", ") {
            if let Some(name) = ticked(part).first() {
                if part.contains("(optional") {
                    optional.insert(name.clone());
                }
                deps.insert(name.clone());
            }
        }
        rows.insert(krate, (deps, optional));
    }
    rows
}

fn doc() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap()
}

/// Differences between the documented map and the real graph (empty when they agree).
fn drift(doc: &str, g: &Graph) -> Vec<String> {
    let rows = documented(doc);
    let mut problems = Vec::new();
    for (krate, (deps, optional, _)) in g {
        match rows.get(krate) {
            None => problems.push(format!("{krate}: not in the map")),
            Some((want, want_optional)) => {
                if want != deps {
                    problems.push(format!(
                        "{krate}: map says {want:?}, cargo metadata says {deps:?}"
                    ));
                }
                if want_optional != optional {
                    problems.push(format!(
                        "{krate}: optional per map {want_optional:?}, per cargo {optional:?}"
                    ));
                }
            }
        }
    }
    for krate in rows.keys().filter(|k| !g.contains_key(*k)) {
        problems.push(format!("{krate}: in the map but not in the workspace"));
    }
    problems
}

#[test]
fn the_crate_map_is_the_dependency_graph() {
    let g = graph();
    assert!(g.len() >= 10, "workspace read: {:?}", g.keys());
    let problems = drift(&doc(), &g);
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md drifted: {problems:#?}"
    );
}

#[test]
fn the_map_check_catches_an_undocumented_arrow() {
    let mut g = graph();
    g.get_mut("dispatchcloud")
        .unwrap()
        .0
        .insert("cloud-ec2".to_string());
    let problems = drift(&doc(), &g);
    assert!(
        problems.iter().any(|p| p.starts_with("dispatchcloud:")),
        "{problems:?}"
    );
}

#[test]
fn no_fake_in_production_and_no_driver_in_the_core() {
    let g = graph();
    for (krate, (deps, optional, _)) in &g {
        if deps.contains("testkit") {
            assert!(
                krate == "arvados-dispatch-cloud" && optional.contains("testkit"),
                "{krate} depends on testkit outside the optional simulator feature"
            );
        }
        let drivers = ["cloud-ec2", "cloud-gce", "cloud-loopback"];
        if krate != "arvados-dispatch-cloud" {
            for d in drivers {
                assert!(!deps.contains(d), "{krate} depends on the driver {d}");
            }
        }
        if krate.starts_with("cloud-") {
            assert!(
                !deps.contains("dispatchcloud"),
                "{krate} depends on dispatchcloud"
            );
        }
    }
    assert_eq!(
        g["arvados-dispatch"].0,
        BTreeSet::from(["arvados".to_string()]),
        "the dispatch library depends on arvados only"
    );
}

#[test]
fn the_scheduler_sees_the_pool_only_through_its_trait() {
    let dir = Path::new(ROOT).join("crates/dispatchcloud/src/scheduler");
    let mut offenders = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.contains("crate::worker::") || line.contains("crate::worker;") {
                offenders.push(format!("{}:{}: {line}", path.display(), i + 1));
            }
        }
    }
    assert!(offenders.is_empty(), "{offenders:#?}");
}

/// Every `§N.M` (and `§N.M item K`) cited in the code and docs is a heading (and an item) of
/// `docs/behaviour.md`, so a maintainer can follow it without the team's private spec.
fn dangling_references(behaviour: &str, sources: &[(String, String)]) -> Vec<String> {
    let headings: BTreeSet<String> = behaviour
        .lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('§')))
        .map(str::to_string)
        .collect();
    let items: BTreeSet<String> = behaviour
        .lines()
        .filter_map(|l| l.strip_prefix("- **"))
        .filter_map(|l| l.split('.').next())
        .map(str::to_string)
        .collect();
    let mut dangling = Vec::new();
    for (path, text) in sources {
        for (i, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find('§') {
                rest = &rest[at + '§'.len_utf8()..];
                let number: String = rest
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect();
                let number = number.trim_end_matches('.');
                if number.is_empty() {
                    continue;
                }
                let cite = format!("§{number}");
                if !headings.contains(&cite) {
                    dangling.push(format!("{path}:{}: {cite}", i + 1));
                }
                let after = rest.trim_start()[number.len()..].trim_start();
                if let Some(item) = after.strip_prefix("item ") {
                    let n: String = item.chars().take_while(char::is_ascii_digit).collect();
                    if !items.contains(&n) {
                        dangling.push(format!("{path}:{}: {cite} item {n}", i + 1));
                    }
                }
            }
        }
    }
    dangling
}

fn cited_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                if !["target", "node_modules", ".git", ".venv"].contains(&name.as_str()) {
                    walk(&path, out);
                }
            } else if (name.ends_with(".rs") || name.ends_with(".md"))
                // The target itself, and this file's planted examples.
                && name != "behaviour.md"
                && name != "architecture.rs"
            {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                out.push((path.display().to_string(), text));
            }
        }
    }
    let mut out = Vec::new();
    for d in ["crates", "src", "tests", "docs", "deploy", "dashboards"] {
        let dir = Path::new(ROOT).join(d);
        if dir.exists() {
            walk(&dir, &mut out);
        }
    }
    for f in ["ARCHITECTURE.md", "README.md", "BENCHMARKS.md"] {
        let path = Path::new(ROOT).join(f);
        out.push((
            f.to_string(),
            std::fs::read_to_string(path).unwrap_or_default(),
        ));
    }
    out
}

#[test]
fn every_section_the_code_cites_is_in_behaviour_md() {
    let behaviour = std::fs::read_to_string(Path::new(ROOT).join("docs/behaviour.md")).unwrap();
    let sources = cited_sources();
    let cites = sources
        .iter()
        .map(|(_, t)| t.matches('§').count())
        .sum::<usize>();
    assert!(cites > 50, "found the citations ({cites})");
    let dangling = dangling_references(&behaviour, &sources);
    assert!(
        dangling.is_empty(),
        "cited but not in docs/behaviour.md: {dangling:#?}"
    );
}

#[test]
fn a_citation_of_a_missing_section_or_item_is_caught() {
    let behaviour = "### §8.7 Probing\n\n- **18.** text\n";
    let sources = vec![(
        "x.rs".to_string(),
        "// spec §8.7, §8.99 and §13.3 item 18, §13.3 item 77".to_string(),
    )];
    let dangling = dangling_references(behaviour, &sources);
    assert_eq!(
        dangling,
        [
            "x.rs:1: §8.99",
            "x.rs:1: §13.3",
            "x.rs:1: §13.3",
            "x.rs:1: §13.3 item 77"
        ]
    );
}
