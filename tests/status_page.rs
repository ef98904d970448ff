//! The status page in a real browser: Debian's Chromium, driven by `playwright-core`
//! (`tests/browser/status-page.mjs`), against a running `simulate`. It logs in, sees
//! containers go from queued to running to done, holds, releases and drains instances with the
//! buttons and checks the management API, sees nothing with a wrong token, fits a phone-width
//! screen, and saves screenshots in this test's output directory. Then `simulate` must still
//! finish with every container run once and no VM left.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Chromium and playwright-core, or `None` (skipped loudly; CI must have them).
fn browser_or_skip() -> Option<()> {
    common::tool("chromium")?;
    let installed = browser_dir().join("node_modules/playwright-core/package.json");
    if !installed.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "tests/browser has no node_modules in CI: scripts/test runs npm ci there"
        );
        eprintln!("SKIPPED: run `npm ci` in tests/browser (scripts/test does)");
        return None;
    }
    Some(())
}

#[test]
fn status_page_in_chromium_logs_in_watches_containers_and_presses_buttons() {
    let Some(()) = browser_or_skip() else {
        return;
    };
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    let _ = std::fs::remove_dir_all(&shots);
    let report = tempfile::NamedTempFile::new().unwrap();
    // Long enough runs that the page sees containers in every state while the buttons are
    // pressed; `simulate` ends by itself once every container is done and every VM gone.
    let mut sim = Command::new(env!("CARGO_BIN_EXE_arvados-dispatch-cloud"))
        .args([
            "simulate",
            "--containers",
            "120",
            "--run-time",
            "5s..60s",
            "--boot-delay",
            "6s",
            "--timeout",
            "5m",
            "--report",
        ])
        .arg(report.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(sim.stdout.take().unwrap()).lines();
    // "management API: http://127.0.0.1:PORT  (Authorization: Bearer TOKEN)"
    let (url, token) = loop {
        let line = lines
            .next()
            .expect("simulate printed its management API address")
            .unwrap();
        if let Some(rest) = line.strip_prefix("management API: ") {
            let url = rest.split_whitespace().next().unwrap().to_string();
            let token = rest
                .rsplit("Bearer ")
                .next()
                .unwrap()
                .trim_end_matches(')')
                .to_string();
            break (url, token);
        }
    };
    // Keep draining simulate's output so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let (ok, out) = common::run(
        Command::new("node")
            .arg(browser_dir().join("status-page.mjs"))
            .current_dir(browser_dir())
            .env("STATUS_URL", &url)
            .env("STATUS_TOKEN", &token)
            .env("SCREENSHOT_DIR", &shots),
    );
    if !ok {
        let _ = sim.kill();
    }
    assert!(ok, "browser test failed:\n{out}");
    let seen: serde_json::Value = out
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no summary line in:\n{out}"));
    assert_eq!(seen["wrongToken"], true, "{seen}");
    assert!(
        seen["journey"].as_str().unwrap().contains("-dz642-"),
        "{seen}"
    );
    assert!(
        seen["held"].is_string() && seen["drained"].is_string(),
        "{seen}"
    );
    for shot in ["status.png", "status-phone.png", "status-full.png"] {
        let bytes = std::fs::read(shots.join(shot)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "{shot} is not a screenshot"
        );
    }
    eprintln!("screenshots in {}", shots.display());

    // The buttons broke nothing: simulate still finishes cleanly by itself.
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(s) = sim.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = sim.kill();
            panic!("simulate did not finish");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let printed = drain.join().unwrap().join("\n");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.path()).unwrap()).unwrap();
    assert!(status.success(), "simulate failed: {r}\n{printed}");
    assert_eq!(r["complete"], 120, "{r}");
    assert_eq!(r["ran_more_than_once"], serde_json::json!([]), "{r}");
    assert_eq!(r["instances_left"], 0, "{r}");
}
