//! The run function and the dispatch library against the fake Arvados API (over HTTP) and a
//! fake Slurm that answers the real command lines: spec AC-SLURM-1…5, S7, S10, and the fix
//! for Arvados' known bug 7 (a job Slurm can never start).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arvados::config::Cluster;
use arvados::types::{Container, ContainerState};
use arvados::{Client, ClientConfig};
use crunch_dispatch_slurm::runner::{Context, job_gone, run_container};
use crunch_dispatch_slurm::slurm::{BoxFuture, CmdResult, Commands, Slurm};
use crunch_dispatch_slurm::squeue::Checker;
use dispatch::{Dispatcher, Logger, RunError, RunFn};
use serde_json::{Value, json};
use testkit::{ContainerSpec, FakeArvados, FakeConfig, Fault, FaultKind};
use tokio::sync::mpsc;

const POLL: Duration = Duration::from_millis(200);
const SQUEUE: Duration = Duration::from_millis(100);

/// Slurm as the dispatcher sees it: `squeue` prints `queue`; `sbatch` records its argv and
/// fails if `batch_error` is set (it never adds a job: tests set the queue themselves);
/// `scancel` fails on its first call and afterwards empties the queue if `cancel_empties`;
/// `scontrol` renices are recorded.
#[derive(Default)]
struct FakeSlurm {
    queue: Mutex<String>,
    batches: Mutex<Vec<Vec<String>>>,
    batch_error: Option<String>,
    cancels: Mutex<Vec<Vec<String>>>,
    cancel_empties: bool,
}

impl Commands for FakeSlurm {
    fn run<'a>(
        &'a self,
        prog: &'a str,
        args: &'a [String],
        _stdin: Option<&'a str>,
    ) -> BoxFuture<'a, CmdResult> {
        let out = match prog {
            "squeue" => Ok(self.queue.lock().unwrap().clone()),
            "sbatch" => {
                self.batches.lock().unwrap().push(args.to_vec());
                match &self.batch_error {
                    Some(e) => Err(e.clone()),
                    None => Ok("Submitted batch job 1".into()),
                }
            }
            "scancel" => {
                let mut c = self.cancels.lock().unwrap();
                c.push(args.to_vec());
                if c.len() == 1 {
                    Err("something terrible happened".into())
                } else {
                    if self.cancel_empties {
                        self.queue.lock().unwrap().clear();
                    }
                    Ok(String::new())
                }
            }
            "scontrol" => Ok(String::new()),
            other => Err(format!("unexpected command {other}")),
        };
        Box::pin(async move { out })
    }
}

fn client(f: &FakeArvados) -> Client {
    Client::new(ClientConfig {
        base_url: url::Url::parse(f.base_url()).unwrap(),
        token: f.root_token().into(),
        insecure: false,
        timeout: Some(Duration::from_secs(30)),
        retry: Default::default(),
    })
    .unwrap()
}

/// Upstream's fixture container: 12 000 000 000 bytes, 4 VCPUs, two 24 GB tmp mounts.
fn fixture_container(f: &FakeArvados) -> String {
    f.add_container_fields(json!({
        "priority": 1,
        "container_image": "test",
        "runtime_constraints": {"ram": 12_000_000_000i64, "vcpus": 4, "keep_cache_ram": 0},
        "mounts": {
            "/tmp": {"kind": "tmp", "capacity": 24_000_000_000i64},
            "/var/spool/cwl": {"kind": "tmp", "capacity": 24_000_000_000i64},
        },
    }))
}

fn cluster() -> Cluster {
    let mut c = Cluster {
        cluster_id: "zzzzz".into(),
        system_root_token: "xyzzy".into(),
        ..Default::default()
    };
    c.containers.crunch_run_command = "echo".into();
    c
}

async fn set_state(cl: &Client, uuid: &str, state: &str) {
    cl.update_container(uuid, &json!({"state": state}), Some(&["uuid"]))
        .await
        .unwrap_or_else(|e| panic!("{uuid} → {state}: {e}"));
}

fn state(f: &FakeArvados, uuid: &str) -> String {
    f.container(uuid).unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// What a test does around the real run function.
type Helper = Arc<dyn Fn(Client, Arc<FakeSlurm>, String) -> BoxFuture<'static, ()> + Send + Sync>;

struct Outcome {
    result: Result<(), RunError>,
    slurm: Arc<FakeSlurm>,
}

/// Upstream's harness: dispatch the one queued container; `before` runs (awaited) before
/// the run function, `during` runs beside it; the first run function's result is returned.
async fn dispatch_one(
    f: &FakeArvados,
    slurm: FakeSlurm,
    before: Option<Helper>,
    during: Option<Helper>,
) -> Outcome {
    let slurm = Arc::new(slurm);
    let s = Slurm::new(slurm.clone());
    let checker = Checker::new(s.clone(), 10, Duration::from_secs(10));
    let ctx = Arc::new(Context::new(cluster(), s, checker.clone()));
    let checker_stopped = dispatch::CancellationToken::new();
    let stop_checker = checker_stopped.clone();
    {
        let checker = checker.clone();
        tokio::spawn(async move { checker.run(SQUEUE, checker_stopped).await });
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let run: RunFn = {
        let (ctx, slurm, api) = (ctx.clone(), slurm.clone(), client(f));
        Arc::new(move |d: Dispatcher, c: Container, updates| {
            let (ctx, slurm, api, done) =
                (ctx.clone(), slurm.clone(), api.clone(), done_tx.clone());
            let (before, during) = (before.clone(), during.clone());
            Box::pin(async move {
                let uuid = c.uuid.clone();
                if let Some(h) = before {
                    h(api.clone(), slurm.clone(), uuid.clone()).await;
                }
                if let Some(h) = during {
                    tokio::spawn(h(api, slurm, uuid));
                }
                let r = run_container(&ctx, &d, c, updates).await;
                let _ = done.send(r.clone());
                r
            })
        })
    };
    let d = Dispatcher::new(client(f), run).poll_period(POLL);
    let stopped = dispatch::CancellationToken::new();
    let stop = stopped.clone();
    let task = {
        let d = d.clone();
        tokio::spawn(async move { d.run(stopped).await })
    };
    let result = tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
        .await
        .expect("the run function returned within 30 s")
        .unwrap();
    // Let the library finish with the container (its fallback, if any) before stopping.
    tokio::time::sleep(3 * POLL).await;
    stop.cancel();
    stop_checker.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    Outcome { result, slurm }
}

fn words(s: &str) -> Vec<String> {
    s.split(' ').map(String::from).collect()
}

const AC3_ARGS: &str =
    "--nice=10000 --no-requeue --job-name=UUID --mem=11995 --cpus-per-task=4 --tmp=45777";

fn helper<F, Fut>(f: F) -> Option<Helper>
where
    F: Fn(Client, Arc<FakeSlurm>, String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    Some(Arc::new(move |c, s, u| Box::pin(f(c, s, u))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_slurm_1_normal() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let uuid = fixture_container(&f);
    let slurm = FakeSlurm::default();
    *slurm.queue.lock().unwrap() = format!("{uuid} 10000 100 PENDING Resources\n");
    let during = helper(|api, slurm: Arc<FakeSlurm>, uuid: String| async move {
        set_state(&api, &uuid, "Running").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        set_state(&api, &uuid, "Complete").await;
        slurm.queue.lock().unwrap().clear();
    });
    let out = dispatch_one(&f, slurm, None, during).await;
    assert!(out.result.is_ok());
    assert!(
        out.slurm.batches.lock().unwrap().is_empty(),
        "the job existed: no sbatch"
    );
    assert_eq!(state(&f, &uuid), "Complete");
    assert_eq!(f.count_by_state().get("Queued"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_slurm_2_cancel() {
    let f = Arc::new(FakeArvados::start(FakeConfig::default()).await.unwrap());
    let uuid = fixture_container(&f);
    let slurm = FakeSlurm {
        cancel_empties: true,
        ..Default::default()
    };
    *slurm.queue.lock().unwrap() = format!("{uuid} 10000 100 PENDING Resources\n");
    let fake = f.clone();
    let during = helper(move |api, _slurm, uuid: String| {
        let fake = fake.clone();
        async move {
            set_state(&api, &uuid, "Running").await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            fake.set_priority(&uuid, 0);
        }
    });
    let out = dispatch_one(&f, slurm, None, during).await;
    assert!(out.result.is_ok());
    let cancels = out.slurm.cancels.lock().unwrap().clone();
    assert!(
        cancels.len() >= 2,
        "the failed scancel was retried: {cancels:?}"
    );
    for c in &cancels[..2] {
        assert_eq!(c[0], format!("--name={uuid}"));
    }
    assert!(out.slurm.batches.lock().unwrap().is_empty());
    // The job vanished while Running: the dispatcher cancelled the container.
    assert_eq!(state(&f, &uuid), "Cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_slurm_3_missing_from_squeue() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let uuid = fixture_container(&f);
    let before = helper(|api, _s, uuid: String| async move {
        set_state(&api, &uuid, "Running").await;
    });
    let out = dispatch_one(&f, FakeSlurm::default(), before, None).await;
    assert!(out.result.is_ok());
    assert_eq!(
        *out.slurm.batches.lock().unwrap(),
        [words(&AC3_ARGS.replace("UUID", &uuid))]
    );
    assert_eq!(state(&f, &uuid), "Cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_slurm_4_sbatch_failure() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let uuid = fixture_container(&f);
    let slurm = FakeSlurm {
        batch_error: Some("something terrible happened".into()),
        ..Default::default()
    };
    let during = helper(|api, _s, uuid: String| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        set_state(&api, &uuid, "Running").await;
        set_state(&api, &uuid, "Complete").await;
    });
    let out = dispatch_one(&f, slurm, None, during).await;
    let err = out.result.unwrap_err().to_string();
    assert!(err.contains("something terrible happened"), "{err}");
    // The library logged the failure on the container.
    let logs = f.logs();
    assert!(
        logs.iter().any(|l| l["object_uuid"] == uuid.as_str()
            && l["event_type"] == "dispatch"
            && l["properties"]["text"]
                .as_str()
                .is_some_and(|t| t.contains("something terrible happened"))),
        "{logs:?}"
    );
    assert_eq!(
        *out.slurm.batches.lock().unwrap(),
        [words(&AC3_ARGS.replace("UUID", &uuid))]
    );
    assert_eq!(state(&f, &uuid), "Complete");
}

/// Collects the library's messages.
#[derive(Default)]
struct Collect(Mutex<Vec<String>>);

impl Logger for Collect {
    fn printf(&self, m: &str) {
        self.0.lock().unwrap().push(m.into());
    }
    fn warnf(&self, m: &str) {
        self.0.lock().unwrap().push(m.into());
    }
    fn debugf(&self, _: &str) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_slurm_5_api_error_listing_containers() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    f.inject_fault(
        Fault::new(FaultKind::Status(500))
            .on("GET", "/containers")
            .always(),
    );
    let log = Arc::new(Collect::default());
    let run: RunFn = Arc::new(|_, _, _| Box::pin(async { Ok(()) }));
    let d = Dispatcher::new(client(&f), run)
        .poll_period(POLL)
        .logger(log.clone());
    let stopped = dispatch::CancellationToken::new();
    let stop = stopped.clone();
    let task = tokio::spawn({
        let d = d.clone();
        async move { d.run(stopped).await }
    });
    let mut seen = false;
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if log
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("error getting list of containers"))
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "{:?}", log.0.lock().unwrap());
    stop.cancel();
    assert!(task.await.unwrap().is_ok());
}

/// The writes the fake API received for `uuid` (method and path).
fn writes(f: &FakeArvados, uuid: &str) -> Vec<String> {
    f.requests()
        .into_iter()
        .filter(|r| r.method != "GET" && r.path.contains(uuid))
        .map(|r| format!("{} {}", r.method, r.path.rsplit(uuid).next().unwrap_or("")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_slurm_s7_disappearance_actions() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let api = client(&f);
    let d = Dispatcher::new(client(&f), Arc::new(|_, _, _| Box::pin(async { Ok(()) })));
    let lock = |u: &str| {
        let api = api.clone();
        let u = u.to_string();
        async move {
            let _: Value = api
                .request(arvados::Method::POST, &format!("containers/{u}/lock"), &[])
                .await
                .unwrap();
        }
    };
    // Running → one update to Cancelled.
    let running = f.add_container(&ContainerSpec::default());
    lock(&running).await;
    set_state(&api, &running, "Running").await;
    let before = writes(&f, &running).len();
    job_gone(&d, &running, ContainerState::Running).await;
    assert_eq!(writes(&f, &running)[before..], ["PUT "]);
    assert_eq!(state(&f, &running), "Cancelled");
    // Locked → one unlock.
    let locked = f.add_container(&ContainerSpec::default());
    lock(&locked).await;
    let before = writes(&f, &locked).len();
    job_gone(&d, &locked, ContainerState::Locked).await;
    assert_eq!(writes(&f, &locked)[before..], ["POST /unlock"]);
    assert_eq!(state(&f, &locked), "Queued");
    // Queued, Complete, Cancelled → nothing.
    let complete = f.add_container(&ContainerSpec::default());
    lock(&complete).await;
    set_state(&api, &complete, "Running").await;
    set_state(&api, &complete, "Complete").await;
    for u in [&locked, &running, &complete] {
        let before = writes(&f, u).len();
        job_gone(&d, u, ContainerState::Running).await;
        assert_eq!(writes(&f, u).len(), before, "{u} was written to");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_slurm_s10_a_running_container_is_never_submitted() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let uuid = fixture_container(&f);
    let slurm = Arc::new(FakeSlurm::default());
    let s = Slurm::new(slurm.clone());
    let checker = Checker::new(s.clone(), 10, Duration::from_secs(10));
    let ctx = Context::new(cluster(), s, checker.clone());
    let stopped = dispatch::CancellationToken::new();
    let _stop = stopped.clone();
    tokio::spawn({
        let checker = checker.clone();
        async move { checker.run(SQUEUE, stopped).await }
    });
    let api = client(&f);
    let _: Value = api
        .request(
            arvados::Method::POST,
            &format!("containers/{uuid}/lock"),
            &[],
        )
        .await
        .unwrap();
    set_state(&api, &uuid, "Running").await;
    let c = api.get_container(&uuid, None).await.unwrap();
    let d = Dispatcher::new(client(&f), Arc::new(|_, _, _| Box::pin(async { Ok(()) })));
    // No updates will come: the run function must still return once the job is seen gone.
    let (_tx, updates) = dispatch::Updates::channel(c.clone());
    tokio::time::timeout(Duration::from_secs(10), run_container(&ctx, &d, c, updates))
        .await
        .unwrap()
        .unwrap();
    assert!(slurm.batches.lock().unwrap().is_empty());
    assert_eq!(state(&f, &uuid), "Cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_7_a_job_slurm_can_never_start_is_reported_then_cancelled() {
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let uuid = fixture_container(&f);
    let slurm = Arc::new(FakeSlurm {
        cancel_empties: true,
        ..Default::default()
    });
    *slurm.queue.lock().unwrap() = format!("{uuid} 10000 0 PENDING BadConstraints\n");
    let s = Slurm::new(slurm.clone());
    let checker = Checker::new(s.clone(), 10, Duration::from_secs(10));
    let mut ctx = Context::new(cluster(), s, checker.clone());
    ctx.unrunnable_timeout = Some(Duration::from_millis(1500));
    let ctx = Arc::new(ctx);
    let stopped = dispatch::CancellationToken::new();
    let stop = stopped.clone();
    tokio::spawn({
        let checker = checker.clone();
        let stopped = stopped.clone();
        async move { checker.run(SQUEUE, stopped).await }
    });
    let run: RunFn = {
        let ctx = ctx.clone();
        Arc::new(move |d, c, u| {
            let ctx = ctx.clone();
            Box::pin(async move { run_container(&ctx, &d, c, u).await })
        })
    };
    let d = Dispatcher::new(client(&f), run).poll_period(POLL);
    tokio::spawn({
        let d = d.clone();
        async move { d.run(stopped).await }
    });
    // First the reason shows in runtime_status while the container waits…
    let mut warned = false;
    for _ in 0..100 {
        let c = f.container(&uuid).unwrap();
        if let Some(w) = c["runtime_status"]["warning"].as_str() {
            assert!(w.contains("BadConstraints"), "{w}");
            assert_eq!(c["state"], "Locked");
            warned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(warned, "{}", f.container(&uuid).unwrap());
    // …then it is cancelled with the reason, and the job scancelled.
    let mut cancelled = false;
    for _ in 0..200 {
        if state(&f, &uuid) == "Cancelled" && slurm.queue.lock().unwrap().is_empty() {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = f.container(&uuid).unwrap();
    assert!(cancelled, "{c}");
    let error = c["runtime_status"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("BadConstraints"), "{c}");
    assert!(!slurm.cancels.lock().unwrap().is_empty());
    stop.cancel();
}
