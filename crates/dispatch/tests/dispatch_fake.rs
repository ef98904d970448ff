//! The dispatcher library against the fake Arvados API over HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados::types::{Container, ContainerState};
use arvados::{Client, ClientConfig};
use dispatch::{Dispatcher, RunError, RunFn, Updates};
use serde_json::json;
use testkit::{ContainerSpec, FakeArvados, FakeConfig};
use tokio::sync::watch;

async fn fake() -> FakeArvados {
    FakeArvados::start(FakeConfig::default()).await.unwrap()
}

fn client(f: &FakeArvados, token: &str) -> Client {
    Client::new(ClientConfig {
        base_url: url::Url::parse(f.base_url()).unwrap(),
        token: token.into(),
        insecure: false,
        timeout: Some(Duration::from_secs(30)),
        retry: Default::default(),
    })
    .unwrap()
}

fn state(f: &FakeArvados, uuid: &str) -> String {
    f.container(uuid).unwrap()["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// Runs a container the way crunch-run would: Running, then Complete; records every
/// state it is shown, in order.
fn completing_run(seen: Arc<Mutex<HashMap<String, Vec<String>>>>, who: &'static str) -> RunFn {
    Arc::new(move |d: Dispatcher, c: Container, mut updates: Updates| {
        let seen = seen.clone();
        Box::pin(async move {
            let log = |state: &str| {
                seen.lock()
                    .unwrap()
                    .entry(c.uuid.clone())
                    .or_default()
                    .push(format!("{who}:{state}"));
            };
            log(&format!("start {}", c.state));
            d.update_state(&c.uuid, ContainerState::Running)
                .await
                .map_err(|e| RunError::Other(e.to_string()))?;
            while let Some(u) = updates.recv().await {
                log(u.state.as_str());
                if u.state == ContainerState::Running {
                    d.client()
                        .update_container(
                            &c.uuid,
                            &json!({"state": "Complete", "exit_code": 0}),
                            Some(&["uuid"]),
                        )
                        .await
                        .map_err(|e| RunError::Other(e.to_string()))?;
                }
            }
            Ok(())
        })
    })
}

fn start(d: &Dispatcher) -> (dispatch::CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = dispatch::CancellationToken::new();
    let d = d.clone();
    let rx = stop.clone();
    let task = tokio::spawn(async move { d.run(rx).await.unwrap() });
    (stop, task)
}

#[tokio::test]
async fn queued_container_is_locked_run_and_sees_running_and_complete() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let d = Dispatcher::new(
        client(&f, f.root_token()),
        completing_run(seen.clone(), "d"),
    )
    .poll_period(Duration::from_millis(50));
    let (stop, task) = start(&d);
    assert!(eventually(10, || state(&f, &u) == "Complete").await);
    assert!(
        eventually(5, || d.tracked().is_empty()).await,
        "tracker removed"
    );
    stop.cancel();
    task.await.unwrap();
    let seen = seen.lock().unwrap()[&u].clone();
    assert_eq!(seen.first().map(String::as_str), Some("d:start Locked"));
    assert!(seen.contains(&"d:Running".to_string()), "{seen:?}");
    assert_eq!(
        seen.last().map(String::as_str),
        Some("d:Complete"),
        "{seen:?}"
    );
}

/// A run function that ends when the container's priority drops to 0; the tracker then puts
/// the still-Locked container back in the queue.
#[tokio::test]
async fn priority_zero_while_locked_gets_it_unlocked() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let run: RunFn = Arc::new(|_d, _c, mut updates: Updates| {
        Box::pin(async move {
            while let Some(c) = updates.recv().await {
                if c.priority == 0 {
                    return Ok(());
                }
            }
            Ok(())
        })
    });
    let d = Dispatcher::new(client(&f, f.root_token()), run).poll_period(Duration::from_millis(50));
    let (stop, task) = start(&d);
    assert!(eventually(10, || state(&f, &u) == "Locked").await);
    f.set_priority(&u, 0);
    assert!(eventually(10, || state(&f, &u) == "Queued").await);
    assert!(eventually(5, || d.tracked().is_empty()).await);
    stop.cancel();
    task.await.unwrap();
    assert_eq!(f.container(&u).unwrap()["lock_count"], 1);
}

#[tokio::test]
async fn already_held_container_is_picked_up_at_start() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    client(&f, f.root_token()).lock_container(&u).await.unwrap();
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let d = Dispatcher::new(
        client(&f, f.root_token()),
        completing_run(seen.clone(), "d"),
    )
    .poll_period(Duration::from_secs(3600));
    // No poll happens within the test: track_container alone picks it up.
    let (stop, task) = start(&d);
    d.track_container(&u).await.unwrap();
    assert!(eventually(10, || state(&f, &u) == "Running").await);
    assert_eq!(seen.lock().unwrap()[&u][0], "d:start Locked");
    stop.cancel();
    task.await.unwrap();
    assert_eq!(
        f.container(&u).unwrap()["lock_count"],
        1,
        "not locked again"
    );
}

#[tokio::test]
async fn ac_dl_2_track_queued_container_closes_updates() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Container>();
    let done_tx = Arc::new(Mutex::new(Some(done_tx)));
    let run: RunFn = Arc::new(move |_d, c, mut updates: Updates| {
        let done_tx = done_tx.clone();
        Box::pin(async move {
            while updates.recv().await.is_some() {}
            if let Some(tx) = done_tx.lock().unwrap().take() {
                let _ = tx.send(c);
            }
            Ok(())
        })
    });
    let d = Dispatcher::new(client(&f, f.root_token()), run);
    d.track_container(&u).await.unwrap();
    let c = tokio::time::timeout(Duration::from_secs(10), done_rx)
        .await
        .expect("run function returns within 10 s")
        .unwrap();
    assert_eq!(c.uuid, u);
    assert_eq!(c.state, ContainerState::Queued);
}

/// A run function that gives up at once: the container goes back to the queue and, with
/// `min_retry_period`, is not locked again before the period ends.
#[tokio::test]
async fn min_retry_period_holds_between_attempts() {
    for (hold, max_locks) in [(Duration::from_secs(3600), 1), (Duration::ZERO, 99)] {
        let f = fake().await;
        let u = f.add_container(&ContainerSpec::default());
        let run: RunFn = Arc::new(|d: Dispatcher, c: Container, _u| {
            Box::pin(async move {
                d.unlock(&c.uuid).await.ok();
                Ok(())
            })
        });
        let d = Dispatcher::new(client(&f, f.root_token()), run)
            .poll_period(Duration::from_millis(30))
            .min_retry_period(hold);
        let (stop, task) = start(&d);
        tokio::time::sleep(Duration::from_millis(600)).await;
        stop.cancel();
        task.await.unwrap();
        let locks = f.container(&u).unwrap()["lock_count"].as_i64().unwrap();
        if max_locks == 1 {
            assert_eq!(locks, 1, "throttled");
        } else {
            assert!(locks >= 2, "retried without a hold: {locks}");
        }
    }
}

#[tokio::test]
async fn batch_size_2_over_7_containers() {
    let f = fake().await;
    let uuids: Vec<String> = (0..7)
        .map(|_| f.add_container(&ContainerSpec::default()))
        .collect();
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let d = Dispatcher::new(
        client(&f, f.root_token()),
        completing_run(seen.clone(), "d"),
    )
    .poll_period(Duration::from_millis(50))
    .batch_size(2);
    let (stop, task) = start(&d);
    assert!(eventually(20, || uuids.iter().all(|u| state(&f, u) == "Complete")).await);
    stop.cancel();
    task.await.unwrap();
    let pages: Vec<i64> = f
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/containers"))
        .filter_map(|r| r.params.get("limit").and_then(|l| l.as_i64()))
        .collect();
    assert!(
        !pages.is_empty() && pages.iter().all(|&l| l == 2),
        "{pages:?}"
    );
    assert_eq!(seen.lock().unwrap().len(), 7);
}

#[tokio::test]
async fn unlock_and_update_state_make_the_api_calls() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let run: RunFn = Arc::new(|_, _, _| Box::pin(async { Ok(()) }));
    let d = Dispatcher::new(client(&f, f.root_token()), run);
    client(&f, f.root_token()).lock_container(&u).await.unwrap();
    d.unlock(&u).await.unwrap();
    assert_eq!(state(&f, &u), "Queued");
    client(&f, f.root_token()).lock_container(&u).await.unwrap();
    d.update_state(&u, ContainerState::Running).await.unwrap();
    assert_eq!(state(&f, &u), "Running");
    let e = d
        .update_state(&u, ContainerState::Queued)
        .await
        .unwrap_err();
    assert_eq!(e.status().map(|s| s.as_u16()), Some(422));
    let methods: Vec<(String, String)> = f
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    assert!(methods.contains(&("POST".into(), format!("/arvados/v1/containers/{u}/unlock"))));
    assert!(methods.contains(&("PUT".into(), format!("/arvados/v1/containers/{u}"))));
}

#[tokio::test]
async fn two_dispatchers_run_every_container_exactly_once() {
    let f = fake().await;
    let uuids: Vec<String> = (0..12)
        .map(|_| f.add_container(&ContainerSpec::default()))
        .collect();
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let other = f.add_token(true);
    let a = Dispatcher::new(
        client(&f, f.root_token()),
        completing_run(seen.clone(), "a"),
    )
    .poll_period(Duration::from_millis(40));
    let b = Dispatcher::new(client(&f, &other), completing_run(seen.clone(), "b"))
        .poll_period(Duration::from_millis(40));
    let (stop_a, ta) = start(&a);
    let (stop_b, tb) = start(&b);
    assert!(eventually(20, || uuids.iter().all(|u| state(&f, u) == "Complete")).await);
    stop_a.cancel();
    stop_b.cancel();
    ta.await.unwrap();
    tb.await.unwrap();
    let seen = seen.lock().unwrap();
    for u in &uuids {
        let runs: Vec<&String> = seen[u].iter().filter(|s| s.contains(":start ")).collect();
        assert_eq!(runs.len(), 1, "{u}: {:?}", seen[u]);
        assert_eq!(f.container(u).unwrap()["lock_count"], 1);
    }
}

#[tokio::test]
async fn unsatisfiable_run_error_cancels_and_logs() {
    let f = fake().await;
    let u = f.add_container(&ContainerSpec::default());
    let run: RunFn = Arc::new(|_, _, _| {
        Box::pin(async {
            Err(RunError::ConstraintsNotSatisfiable {
                message: "needs 99 VCPUs".into(),
                available: vec![r#"Type "local": 2 VCPUs, 4 GiB RAM, 0 Scratch, 0 Price"#.into()],
            })
        })
    });
    let d = Dispatcher::new(client(&f, f.root_token()), run).poll_period(Duration::from_millis(40));
    let (stop, task) = start(&d);
    assert!(eventually(10, || state(&f, &u) == "Cancelled").await);
    stop.cancel();
    task.await.unwrap();
    let logs = f.logs();
    let text = logs
        .iter()
        .find(|l| l["object_uuid"] == u && l["event_type"] == "dispatch")
        .map(|l| {
            l["properties"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default();
    assert!(
        text.contains(&format!("cannot run container {u}: needs 99 VCPUs")),
        "{text}"
    );
    assert!(
        text.contains("Available instance types:\nType \"local\""),
        "{text}"
    );
}

/// With `max_trackers(1)`, a second container is not locked while the first one runs.
#[tokio::test]
async fn max_trackers_bounds_concurrent_containers() {
    let f = fake().await;
    let uuids: Vec<String> = (0..3)
        .map(|_| f.add_container(&ContainerSpec::default()))
        .collect();
    let (release_tx, release_rx) = watch::channel(false);
    let run: RunFn = Arc::new(move |d: Dispatcher, c: Container, mut updates: Updates| {
        let mut release = release_rx.clone();
        Box::pin(async move {
            let _ = release.wait_for(|r| *r).await;
            d.update_state(&c.uuid, ContainerState::Running).await.ok();
            d.client()
                .update_container(&c.uuid, &json!({"state": "Complete"}), Some(&["uuid"]))
                .await
                .ok();
            while updates.recv().await.is_some() {}
            Ok(())
        })
    });
    let d = Dispatcher::new(client(&f, f.root_token()), run)
        .poll_period(Duration::from_millis(30))
        .max_trackers(1);
    let (stop, task) = start(&d);
    assert!(eventually(10, || uuids.iter().any(|u| state(&f, u) == "Locked")).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let locked = uuids.iter().filter(|u| state(&f, u) == "Locked").count();
    assert_eq!(locked, 1, "only one at a time");
    release_tx.send(true).unwrap();
    assert!(eventually(20, || uuids.iter().all(|u| state(&f, u) == "Complete")).await);
    stop.cancel();
    task.await.unwrap();
}
