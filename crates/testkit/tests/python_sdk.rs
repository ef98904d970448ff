//! The real `arvados-python-client` talks to the fake through its discovery document: a
//! second opinion on the fake's wire format that our own client cannot give.
//!
//! Needs the project venv (`.venv`, made by `scripts/test`). Without it the test skips loudly,
//! except under `CI=true`, where a missing peer is a failure.

use std::path::PathBuf;
use std::process::Command;

use testkit::fake_api::{ContainerSpec, FakeArvados, FakeConfig};

fn venv_python() -> Option<PathBuf> {
    let p = match std::env::var_os("ARVADOS_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
    };
    let ok = p.exists()
        && Command::new(&p)
            .args(["-c", "import arvados"])
            .output()
            .is_ok_and(|o| o.status.success());
    ok.then_some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_lists_and_locks_through_discovery() {
    let Some(python) = venv_python() else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "arvados-python-client is missing in CI: scripts/test must install it into .venv"
            );
        }
        eprintln!(
            "\n*** SKIPPED python_sdk test: no .venv with arvados-python-client; run scripts/test ***\n"
        );
        return;
    };
    let fake = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let low = fake.add_container(&ContainerSpec {
        priority: 10,
        ..Default::default()
    });
    let high = fake.add_container(&ContainerSpec {
        priority: 1_125_899_906_842_624_000,
        ..Default::default()
    });
    fake.add_container(&ContainerSpec {
        priority: 0,
        ..Default::default()
    });

    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/sdk_against_fake.py");
    let base = fake.base_url().to_string();
    let token = fake.root_token().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([&base, &token])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["me"], "zzzzz-gj3su-000000000000000");
    assert_eq!(
        v["listed"],
        serde_json::json!([high, low]),
        "priority desc, priority-0 excluded"
    );
    assert_eq!(
        v["priorities"][0], 1_125_899_906_842_624_000i64,
        "int64 priority survives"
    );
    assert_eq!(v["locked_state"], "Locked");
    assert_eq!(v["locked_by"], "zzzzz-gj3su-000000000000000");
    assert!(
        v["relock"].as_str().unwrap().starts_with("422"),
        "{}",
        v["relock"]
    );
    // And the fake agrees.
    assert_eq!(fake.container(&high).unwrap()["state"], "Locked");
}
