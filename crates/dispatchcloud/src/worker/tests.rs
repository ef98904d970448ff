//! Pool tests that need to set a worker's state and ages directly: the AC-WRK-1 probe table,
//! AC-POOL-2 and AC-POOL-5, and the §13.3 fixes. Every VM is a real SSH server (`cloud::sshd`)
//! whose answers each test scripts.

use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arvados::InstanceType;
use cloud::sshd::{Outcome, OutcomeFuture, SshVm};
use cloud::{
    BoxFuture, CloudError, CreateRequest, ErrorKind, Instance, InstancePrice, InstanceSet,
    InstanceTags,
};
use tokio::time::{Duration, Instant};

use super::config::{PoolConfig, RunnerBinary};
use super::record::{Worker, ago};
use super::{Pool, runner::Runner};
use crate::scheduler::pool::WorkerPool;
use crate::worker_state::{IdleBehavior, WorkerState};

/// What a scripted VM answers.
#[derive(Default, Clone)]
struct Script {
    boot_ok: bool,
    /// `None`: the plain `crunch-run --list` fails.
    run: Option<Vec<String>>,
    /// `None`: the deployed runner's `--list` fails.
    deployed_run: Option<Vec<String>>,
    deploy_ok: bool,
    /// Never answer anything.
    hang: bool,
    /// `--kill 15` never succeeds.
    unkillable: bool,
}

#[derive(Default)]
struct Seen {
    commands: Vec<String>,
    install_stdin: Vec<u8>,
}

/// A VM: an SSH server running a script, and the cloud's record of it.
#[derive(Debug)]
struct Vm {
    id: String,
    addr: String,
    host_key: String,
    tags: Mutex<InstanceTags>,
    destroyed: Arc<AtomicUsize>,
    /// Destroy calls fail and leave the VM listed.
    fail_destroy: std::sync::atomic::AtomicBool,
    set: std::sync::Weak<Set>,
}

impl Instance for Vm {
    fn id(&self) -> String {
        self.id.clone()
    }
    fn provider_type(&self) -> String {
        "pt".into()
    }
    fn tags(&self) -> InstanceTags {
        self.tags.lock().clone()
    }
    fn address(&self) -> String {
        self.addr.clone()
    }
    fn remote_user(&self) -> String {
        "root".into()
    }
    fn set_tags(&self, tags: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>> {
        *self.tags.lock() = tags;
        Box::pin(async { Ok(()) })
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>> {
        self.destroyed.fetch_add(1, Ordering::SeqCst);
        if self.fail_destroy.load(Ordering::SeqCst) {
            return Box::pin(async { Err(CloudError::other("destroy failed")) });
        }
        if let Some(set) = self.set.upgrade() {
            set.vms.lock().retain(|v| v.id != self.id);
        }
        Box::pin(async { Ok(()) })
    }
    fn price_history(&self, _: &InstanceType) -> Vec<InstancePrice> {
        Vec::new()
    }
    fn verify_host_key(&self, key: &str) -> BoxFuture<'_, Result<(), CloudError>> {
        let r = cloud::sshd::check_host_key(&self.host_key, key);
        Box::pin(async move { r })
    }
}

/// A cloud of scripted VMs; creates can be made to fail with queued errors.
#[derive(Default)]
struct Set {
    vms: Mutex<Vec<Arc<Vm>>>,
    servers: Mutex<Vec<SshVm>>,
    create_errors: Mutex<VecDeque<CloudError>>,
    creates: AtomicUsize,
}

impl InstanceSet for Set {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        self.creates.fetch_add(1, Ordering::SeqCst);
        let e = self.create_errors.lock().pop_front();
        let _ = (it, req);
        Box::pin(async move {
            match e {
                Some(e) => Err(e),
                None => Err(CloudError::other("this test set does not create VMs")),
            }
        })
    }
    fn instances(
        &self,
        _: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let v: Vec<Arc<dyn Instance>> = self
            .vms
            .lock()
            .iter()
            .map(|v| v.clone() as Arc<dyn Instance>)
            .collect();
        Box::pin(async move { Ok(v) })
    }
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        let mut g: String = it.provider_type.chars().take(1).collect();
        if it.preemptible {
            g.push_str("-p");
        }
        g
    }
    fn stop(&self) {}
}

struct Rig {
    pool: Arc<Pool>,
    set: Arc<Set>,
    key: Arc<russh::keys::PrivateKey>,
}

fn config(key: Arc<russh::keys::PrivateKey>, deploy: bool) -> PoolConfig {
    let mut cluster = arvados::Cluster {
        cluster_id: "zzzzz".into(),
        ..Default::default()
    };
    cluster.containers.cloud_vms.deploy_runner_binary = String::new();
    cluster.containers.cloud_vms.boot_probe_command = "bootprobe".into();
    cluster.containers.cloud_vms.timeout_booting = Duration::from_secs(60);
    cluster.containers.cloud_vms.timeout_probe = Duration::from_secs(1);
    let mut cfg = PoolConfig::from_cluster(&cluster, "test", key);
    cfg.crunch_run_command = "crunch-run".into();
    if deploy {
        cfg.runner_binary = Some(RunnerBinary::new(b"ELF".to_vec()));
    }
    cfg.command_timeout = Duration::from_millis(500);
    cfg
}

fn rig_with(cfg: impl FnOnce(Arc<russh::keys::PrivateKey>) -> PoolConfig) -> Rig {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let set = Arc::new(Set::default());
    let pool = Pool::new(cfg(key.clone()), set.clone(), &prometheus::Registry::new()).unwrap();
    Rig { pool, set, key }
}

fn uuid(i: usize) -> String {
    format!("zzzzz-dz642-{i:015}")
}

impl Rig {
    /// A VM answering `script`, registered in the set; returns it and what it sees.
    async fn vm(&self, script: Script) -> (Arc<Vm>, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        let handler = Arc::new(
            move |_u: &str, cmd: &str, stdin: Vec<u8>| -> OutcomeFuture {
                let script = script.clone();
                let cmd = cmd.to_string();
                s.lock().commands.push(cmd.clone());
                if cmd.contains("cat >\"$dstfile\"") {
                    s.lock().install_stdin = stdin;
                }
                Box::pin(async move {
                    if script.hang {
                        return std::future::pending().await;
                    }
                    let list = |l: &Option<Vec<String>>| match l {
                        Some(u) => {
                            Outcome::ok(u.iter().map(|u| format!("{u}\n")).collect::<String>())
                        }
                        None => Outcome::fail(1, "list failed"),
                    };
                    if cmd == "bootprobe" {
                        return if script.boot_ok {
                            Outcome::ok("")
                        } else {
                            Outcome::fail(1, "not booted")
                        };
                    }
                    if cmd == "crunch-run --list" {
                        return list(&script.run);
                    }
                    if cmd.contains("crunch-run~") && cmd.ends_with("--list") {
                        return list(&script.deployed_run);
                    }
                    if cmd.starts_with("md5sum ") {
                        return Outcome::fail(1, "no such file");
                    }
                    if cmd.contains("cat >\"$dstfile\"") {
                        return if script.deploy_ok {
                            Outcome::ok("")
                        } else {
                            Outcome::fail(1, "deploy failed")
                        };
                    }
                    if cmd.contains("--kill 15") && script.unkillable {
                        return Outcome::fail(1, "container is running");
                    }
                    if cmd.contains("--kill 15") || cmd.contains("--detach") {
                        return Outcome::ok("");
                    }
                    Outcome::fail(127, format!("{cmd}: not found"))
                })
            },
        );
        let server = SshVm::start(handler, vec![self.key.public_key().clone()])
            .await
            .unwrap();
        let n = self.set.vms.lock().len() + self.set.servers.lock().len();
        let vm = Arc::new(Vm {
            id: format!("vm{n}"),
            addr: server.addr().to_string(),
            host_key: server.host_key().to_openssh().unwrap(),
            tags: Mutex::new(
                [
                    ("ArvadosInstanceSetID".to_string(), "test".to_string()),
                    ("ArvadosInstanceType".to_string(), "type1".to_string()),
                ]
                .into(),
            ),
            destroyed: Arc::new(AtomicUsize::new(0)),
            fail_destroy: std::sync::atomic::AtomicBool::new(false),
            set: Arc::downgrade(&self.set),
        });
        self.set.servers.lock().push(server);
        self.set.vms.lock().push(vm.clone());
        (vm, seen)
    }

    /// Put a worker for `vm` in the pool with this state, age and processes.
    fn add_worker(
        &self,
        vm: &Arc<Vm>,
        state: WorkerState,
        age: Duration,
        running: &[usize],
        starting: &[usize],
    ) {
        let now = Instant::now();
        let t = ago(now, age);
        let inst: Arc<dyn Instance> = vm.clone();
        let executor = self.pool.new_executor(&inst, None);
        let runner = |i: &usize| {
            let r = Runner::new(
                &self.pool,
                &vm.id,
                executor.clone(),
                &uuid(*i),
                "crunch-run".into(),
            );
            (uuid(*i), r)
        };
        let it = Arc::new(InstanceType {
            name: "type1".into(),
            provider_type: "pt".into(),
            ..Default::default()
        });
        let w = Worker {
            running: running.iter().map(runner).collect(),
            starting: starting.iter().map(runner).collect::<BTreeMap<_, _>>(),
            ..Worker::new(inst, it, state, executor.clone(), t)
        };
        self.pool.lock().workers.insert(vm.id.clone(), w);
    }

    fn state(&self, id: &str) -> (WorkerState, usize) {
        let st = self.pool.lock();
        let w = &st.workers[id];
        (w.state, w.running.len())
    }
}

/// One row of the AC-WRK-1 table.
struct Row {
    initial: WorkerState,
    age: Duration,
    running: &'static [usize],
    starting: &'static [usize],
    script: Script,
    deploy: bool,
    want: WorkerState,
    want_running: usize,
    want_stdin: &'static [u8],
}

const BOOT: Duration = Duration::from_secs(60);
const PROBE: Duration = Duration::from_secs(1);

fn row(initial: WorkerState, script: Script, want: WorkerState, want_running: usize) -> Row {
    Row {
        initial,
        age: Duration::ZERO,
        running: &[],
        starting: &[],
        script,
        deploy: false,
        want,
        want_running,
        want_stdin: b"",
    }
}

fn lists(n: usize) -> Option<Vec<String>> {
    Some((1..=n).map(uuid).collect())
}

async fn check(n: usize, r: Row) {
    let rig = rig_with(|k| config(k, r.deploy));
    let (vm, seen) = rig.vm(r.script.clone()).await;
    rig.add_worker(&vm, r.initial, r.age, r.running, r.starting);
    rig.pool.probe_and_update(&vm.id).await;
    let (state, running) = rig.state(&vm.id);
    {
        let seen = seen.lock();
        assert_eq!(
            (state, running),
            (r.want, r.want_running),
            "row {n}: commands {:?}",
            seen.commands
        );
        assert_eq!(seen.install_stdin, r.want_stdin, "row {n}: stdin written");
    }
    if r.want == WorkerState::Shutdown {
        // The destroy call runs in the background.
        for _ in 0..100 {
            if vm.destroyed.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(vm.destroyed.load(Ordering::SeqCst), 1, "row {n}: destroyed");
    }
}

fn boot(ok: bool) -> Script {
    Script {
        boot_ok: ok,
        ..Default::default()
    }
}

fn run(boot_ok: bool, run: Option<Vec<String>>) -> Script {
    Script {
        boot_ok,
        run,
        ..Default::default()
    }
}

use WorkerState::{Booting, Idle, Running, Shutdown, Unknown};

macro_rules! wrk_rows {
    ($($name:ident => $row:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let n: usize = stringify!($name).split('_').nth(4).unwrap().parse().unwrap();
                check(n, $row).await;
            }
        )*
    };
}

wrk_rows! {
    ac_wrk_1_row_1_unknown_boot_and_run_fail => row(Unknown, run(false, None), Unknown, 0);
    ac_wrk_1_row_2_unknown_run_lists_one => row(Unknown, run(false, lists(1)), Unknown, 1);
    ac_wrk_1_row_3_unknown_running_one_run_lists_none => Row { running: &[1], ..row(Unknown, run(false, lists(0)), Unknown, 0) };
    ac_wrk_1_row_4_unknown_past_boot_timeout_fails => Row { age: BOOT + PROBE, ..row(Unknown, run(false, None), Shutdown, 0) };
    ac_wrk_1_row_5_unknown_old_boot_ok_run_fails => Row { age: 2 * BOOT, ..row(Unknown, run(true, None), Shutdown, 0) };
    ac_wrk_1_row_6_unknown_old_run_empty => Row { age: 2 * BOOT, ..row(Unknown, run(false, lists(0)), Shutdown, 0) };
    ac_wrk_1_row_7_unknown_old_run_lists_one => Row { age: 2 * BOOT, ..row(Unknown, run(false, lists(1)), Unknown, 1) };
    ac_wrk_1_row_8_unknown_deploys_and_lists_one => Row {
        deploy: true, want_stdin: b"ELF",
        ..row(Unknown, Script { deploy_ok: true, deployed_run: lists(1), ..boot(false) }, Unknown, 1)
    };
    ac_wrk_1_row_9_unknown_old_deploys_and_lists_one => Row {
        deploy: true, want_stdin: b"ELF", age: 2 * BOOT,
        ..row(Unknown, Script { deploy_ok: true, deployed_run: lists(1), ..boot(false) }, Unknown, 1)
    };
    ac_wrk_1_row_10_unknown_old_deploys_run_empty => Row {
        deploy: true, want_stdin: b"ELF", age: 2 * BOOT,
        ..row(Unknown, Script { deploy_ok: true, deployed_run: lists(0), ..boot(false) }, Shutdown, 0)
    };
    ac_wrk_1_row_11_booting_boot_and_run_fail => row(Booting, run(false, None), Booting, 0);
    ac_wrk_1_row_12_booting_boot_fails_run_not_called => row(Booting, run(false, lists(0)), Booting, 0);
    ac_wrk_1_row_13_booting_boot_ok_run_fails => row(Booting, run(true, None), Booting, 0);
    ac_wrk_1_row_14_booting_becomes_idle => row(Booting, run(true, lists(0)), Idle, 0);
    ac_wrk_1_row_15_booting_run_lists_one => row(Booting, run(true, lists(1)), Running, 1);
    ac_wrk_1_row_16_booting_old_run_fails => Row { age: 2 * BOOT, ..row(Booting, run(true, None), Shutdown, 0) };
    ac_wrk_1_row_17_idle_old_run_lists_one => Row { age: 2 * PROBE, ..row(Idle, run(true, lists(1)), Running, 1) };
    ac_wrk_1_row_18_idle_old_running_run_fails => Row { age: 2 * PROBE, running: &[1], ..row(Idle, run(true, None), Shutdown, 1) };
    ac_wrk_1_row_19_idle_old_run_fails => Row { age: 2 * PROBE, ..row(Idle, run(true, None), Shutdown, 0) };
    ac_wrk_1_row_20_running_run_lists_it => Row { running: &[1], ..row(Running, run(true, lists(1)), Running, 1) };
    ac_wrk_1_row_21_running_run_empty => Row { running: &[1], ..row(Running, run(true, lists(0)), Idle, 0) };
    ac_wrk_1_row_22_running_old_starting_run_empty => Row { age: 2 * PROBE, starting: &[1], ..row(Running, run(true, lists(0)), Running, 0) };
    ac_wrk_1_row_23_booting_deploys_deployed_run_lists_one => Row {
        deploy: true, want_stdin: b"ELF",
        ..row(Booting, Script { deploy_ok: true, deployed_run: lists(1), ..boot(true) }, Running, 1)
    };
    ac_wrk_1_row_24_booting_deploy_fails => Row {
        deploy: true, want_stdin: b"ELF",
        ..row(Booting, Script { deploy_ok: false, run: lists(0), ..boot(true) }, Booting, 0)
    };
    ac_wrk_1_row_25_booting_no_deploy_configured => row(Booting, Script { deploy_ok: false, run: lists(0), ..boot(true) }, Idle, 0);
}

/// Row 12's extra condition: the run probe is not even called while the boot probe fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_wrk_1_row_12_run_probe_is_not_called_while_booting() {
    let rig = rig_with(|k| config(k, false));
    let (vm, seen) = rig.vm(run(false, lists(0))).await;
    rig.add_worker(&vm, Booting, Duration::ZERO, &[], &[]);
    rig.pool.probe_and_update(&vm.id).await;
    let seen = seen.lock();
    assert!(
        !seen.commands.iter().any(|c| c.contains("--list")),
        "{:?}",
        seen.commands
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_pool_2_start_container_obeys_idle_behavior() {
    let rig = rig_with(|k| config(k, false));
    let (vm, _) = rig.vm(run(true, lists(0))).await;
    rig.add_worker(&vm, Idle, Duration::ZERO, &[], &[]);
    let ctr = arvados::Container {
        uuid: uuid(1),
        ..Default::default()
    };
    rig.pool
        .set_idle_behavior(&vm.id, IdleBehavior::Hold)
        .unwrap();
    assert!(!rig.pool.start_container(&vm.id, &ctr));
    rig.pool
        .lock()
        .workers
        .get_mut(&vm.id)
        .unwrap()
        .idle_behavior = IdleBehavior::Drain;
    assert!(!rig.pool.start_container(&vm.id, &ctr));
    rig.pool
        .lock()
        .workers
        .get_mut(&vm.id)
        .unwrap()
        .idle_behavior = IdleBehavior::Run;
    assert!(rig.pool.start_container(&vm.id, &ctr));
    assert_eq!(rig.pool.running().len(), 1);
    assert_eq!(
        rig.pool
            .set_idle_behavior("nope", IdleBehavior::Run)
            .unwrap_err(),
        "requested instance does not exist"
    );
}

fn typ(name: &str, preemptible: bool) -> InstanceType {
    InstanceType {
        name: name.into(),
        provider_type: name.into(),
        preemptible,
        ..Default::default()
    }
}

async fn settle(rig: &Rig, creates: usize) {
    for _ in 0..200 {
        if rig.set.creates.load(Ordering::SeqCst) >= creates && rig.pool.lock().creating.is_empty()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("creates did not finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_pool_5_capacity_errors_by_quota_group_and_type() {
    let rig = rig_with(|k| {
        let mut c = config(k, false);
        c.max_concurrent_creates = 0;
        c
    });
    let cap = |t, g| {
        CloudError::new(
            ErrorKind::Capacity {
                instance_type_specific: t,
                quota_group_specific: g,
            },
            "no capacity",
        )
    };
    rig.set
        .create_errors
        .lock()
        .extend([cap(false, true), cap(true, false)]);
    let (a1, a1p, a2, b3, b3p, b4, b4p) = (
        typ("A1", false),
        typ("A1", true),
        typ("A2", false),
        typ("B3", false),
        typ("B3", true),
        typ("B4", false),
        typ("B4", true),
    );
    assert!(rig.pool.create(&a1).is_some());
    settle(&rig, 1).await;
    assert!(rig.pool.at_capacity(&a1) && rig.pool.at_capacity(&a2));
    assert!(!rig.pool.at_capacity(&b3) && !rig.pool.at_capacity(&a1p));
    assert!(rig.pool.create(&b4p).is_some());
    settle(&rig, 2).await;
    let want = [
        (&a1, true),
        (&a1p, false),
        (&a2, true),
        (&b3, false),
        (&b3p, false),
        (&b4, false),
        (&b4p, true),
    ];
    for (it, at) in want {
        assert_eq!(
            rig.pool.at_capacity(it),
            at,
            "{} preemptible={}",
            it.name,
            it.preemptible
        );
    }
    let creates = [
        (&a2, false),
        (&b3, true),
        (&b3p, true),
        (&b4, true),
        (&b4p, false),
        (&a2, false),
        (&a1, false),
        (&a1p, true),
    ];
    for (it, ok) in creates {
        assert_eq!(
            rig.pool.create(it).is_some(),
            ok,
            "create {} preemptible={}",
            it.name,
            it.preemptible
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_error_holds_creates_until_fewer_instances() {
    let rig = rig_with(|k| {
        let mut c = config(k, false);
        c.max_concurrent_creates = 0;
        c
    });
    // Two workers exist; a create fails with a quota error: at quota until fewer than 2.
    let (v1, _) = rig.vm(run(true, lists(0))).await;
    let (v2, _) = rig.vm(run(true, lists(0))).await;
    rig.add_worker(&v1, Idle, Duration::ZERO, &[], &[]);
    rig.add_worker(&v2, Idle, Duration::ZERO, &[], &[]);
    rig.set
        .create_errors
        .lock()
        .push_back(CloudError::new(ErrorKind::Quota, "quota"));
    assert!(rig.pool.create(&typ("A1", false)).is_some());
    settle(&rig, 1).await;
    assert!(rig.pool.at_quota());
    assert_eq!(rig.pool.quota_headroom(), Some(0));
    assert!(rig.pool.create(&typ("A1", false)).is_none());
    // One goes away: below the count seen at the error, so creates may resume.
    v2.destroy().await.unwrap();
    rig.pool.sync().await.unwrap();
    assert!(!rig.pool.at_quota());
}

/// §13.3 item 20: a runner still starting when `--kill` succeeds is closed, not signalled
/// until `TimeoutTERM` and then blamed for draining the worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_13_3_20_kill_closes_a_runner_that_is_still_starting() {
    let rig = rig_with(|k| config(k, false));
    let (vm, _) = rig.vm(run(true, lists(0))).await;
    rig.add_worker(&vm, Running, Duration::ZERO, &[], &[1]);
    assert!(rig.pool.kill_container(&uuid(1), "test"));
    for _ in 0..100 {
        if rig.pool.lock().workers[&vm.id].starting.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = rig.pool.lock();
    let w = &st.workers[&vm.id];
    assert!(w.starting.is_empty() && w.running.is_empty());
    assert_eq!(w.state, Idle);
    assert_eq!(w.idle_behavior, IdleBehavior::Run);
    assert!(st.exited.contains_key(&uuid(1)));
}

/// §13.3 item 18: an unknown worker whose run probe shows live containers is kept past
/// `TimeoutBooting` (Go destroys it, killing the containers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_13_3_18_unknown_worker_with_containers_is_not_shut_down_for_idleness() {
    let rig = rig_with(|k| config(k, false));
    let (vm, _) = rig.vm(run(false, lists(1))).await;
    rig.add_worker(&vm, Unknown, 2 * BOOT, &[1], &[]);
    let now = Instant::now();
    let mut st = rig.pool.lock();
    let w = st.workers.get_mut(&vm.id).unwrap();
    assert!(!rig.pool.shutdown_if_idle(w, now));
    w.running.clear();
    assert!(
        rig.pool.shutdown_if_idle(w, now),
        "without containers the idle rule applies"
    );
}

/// §13.3 item 22: when a VM vanishes, its containers get exited placeholders, so the
/// scheduler can cancel them without waiting for unknown workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_13_3_22_processes_of_a_vanished_vm_are_reported_exited() {
    let rig = rig_with(|k| config(k, false));
    let (vm, _) = rig.vm(run(true, lists(1))).await;
    rig.add_worker(&vm, Running, Duration::ZERO, &[1], &[]);
    rig.set.vms.lock().clear();
    rig.pool.sync().await.unwrap();
    assert!(rig.pool.worker_ids().is_empty());
    let running = rig.pool.running();
    assert!(
        running[&uuid(1)].is_some(),
        "exited placeholder expected: {running:?}"
    );
    assert_eq!(
        rig.pool
            .metrics
            .disappeared
            .with_label_values(&["running"])
            .get(),
        1.0
    );
}

/// §13.3 item 17 and the hung-VM case: a VM whose commands never answer fails its
/// probe at the command deadline and is shut down after `TimeoutProbe`, while another VM is
/// probed normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_13_3_17_hung_vm_is_shut_down_and_others_keep_being_probed() {
    let rig = rig_with(|k| config(k, false));
    let (hung, _) = rig
        .vm(Script {
            hang: true,
            ..run(true, lists(0))
        })
        .await;
    let (fine, fine_seen) = rig.vm(run(true, lists(1))).await;
    rig.add_worker(&hung, Idle, 2 * PROBE, &[], &[]);
    rig.add_worker(&fine, Idle, Duration::ZERO, &[], &[]);
    let started = Instant::now();
    let (p1, p2) = (rig.pool.clone(), rig.pool.clone());
    let (h, f) = (hung.id.clone(), fine.id.clone());
    let hung_probe = tokio::spawn(async move { p1.probe_and_update(&h).await });
    p2.probe_and_update(&f).await;
    assert!(
        started.elapsed() < Duration::from_millis(450),
        "the fine VM did not wait for the hung one"
    );
    assert_eq!(rig.state(&fine.id), (Running, 1));
    hung_probe.await.unwrap();
    assert_eq!(rig.state(&hung.id).0, Shutdown);
    assert!(
        fine_seen
            .lock()
            .commands
            .iter()
            .any(|c| c.ends_with("--list"))
    );
}

/// §13.3 item 21: the drain forced on an unrecognised instance type is not written to its
/// tag, so restoring the type later restores the VM's own behaviour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_13_3_21_drain_for_unknown_type_is_not_persisted() {
    let rig = rig_with(|k| config(k, false));
    let (vm, _) = rig.vm(run(true, lists(0))).await;
    vm.tags
        .lock()
        .insert("ArvadosInstanceType".into(), "retired".into());
    vm.tags
        .lock()
        .insert("ArvadosIdleBehavior".into(), "run".into());
    rig.pool.sync().await.unwrap();
    let view = rig.pool.worker(&vm.id).unwrap();
    assert_eq!(view.idle_behavior, IdleBehavior::Drain);
    assert_eq!(view.provider_instance_type, "");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(vm.tags()["ArvadosIdleBehavior"], "run");
}

/// AC-POOL-3: with cloud ops held, `MaxConcurrentInstanceCreateOps` bounds the creates in
/// flight; raising it (or 0, unlimited) lets more through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ac_pool_3_node_create_throttle() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let stub = Arc::new(testkit::stub_driver::StubSet::new(
        testkit::stub_driver::StubConfig::from_params(&serde_json::json!({"HoldCloudOps": true}))
            .unwrap(),
    ));
    let mut cfg = config(key, false);
    cfg.max_concurrent_creates = 1;
    let pool = Pool::new(cfg, stub.clone(), &prometheus::Registry::new()).unwrap();
    let t1 = typ("type1", false);
    assert!(pool.create(&t1).is_some());
    assert_eq!(pool.instances().len(), 1);
    assert!(pool.create(&t1).is_none());
    assert_eq!(pool.instances().len(), 1);
    assert_eq!(pool.create_budget(), Some(0));
    {
        let mut st = pool.lock();
        st.create_ops_hold_until = None;
        st.max_concurrent_creates = 2;
    }
    assert!(pool.create(&t1).is_some());
    assert_eq!(pool.instances().len(), 2);
    {
        let mut st = pool.lock();
        st.create_ops_hold_until = None;
        st.max_concurrent_creates = 0;
    }
    assert_eq!(pool.create_budget(), None);
    assert!(pool.create(&t1).is_some());
    assert_eq!(pool.instances().len(), 3);
    stub.release_cloud_ops(3);
}

/// §13.3 item 26: when the in-flight create finishes, the concurrency hold-off ends at once
/// instead of after a fixed 5 seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bug_13_3_26_finished_create_lifts_the_concurrency_hold() {
    let key = Arc::new(cloud::sshd::new_ed25519_key());
    let stub = Arc::new(testkit::stub_driver::StubSet::new(
        testkit::stub_driver::StubConfig::from_params(&serde_json::json!({"HoldCloudOps": true}))
            .unwrap(),
    ));
    let mut cfg = config(key, false);
    cfg.max_concurrent_creates = 1;
    let pool = Pool::new(cfg, stub.clone(), &prometheus::Registry::new()).unwrap();
    let t1 = typ("type1", false);
    assert!(pool.create(&t1).is_some());
    assert!(
        pool.create(&t1).is_none(),
        "second create waits for the first"
    );
    stub.release_cloud_ops(1);
    for _ in 0..200 {
        if pool.lock().creating.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        pool.create(&t1).is_some(),
        "no 5-second wait once the first create finished"
    );
    stub.release_cloud_ops(1);
}

/// §8.12: `--kill 15` every `TimeoutSignal` until `TimeoutTERM`, then the runner is given up,
/// the worker drains, and — nothing else left on it — it is shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkillable_container_is_given_up_and_its_worker_drained() {
    let rig = rig_with(|k| {
        let mut c = config(k, false);
        c.timeout_signal = Duration::from_millis(50);
        c.timeout_term = Duration::from_millis(300);
        c
    });
    let (vm, seen) = rig
        .vm(Script {
            unkillable: true,
            ..run(true, lists(1))
        })
        .await;
    rig.add_worker(&vm, Running, Duration::ZERO, &[1], &[]);
    assert!(rig.pool.kill_container(&uuid(1), "priority 0"));
    assert!(
        rig.pool.kill_container(&uuid(1), "again"),
        "a second kill is accepted and ignored"
    );
    for _ in 0..100 {
        if rig.pool.lock().workers[&vm.id].idle_behavior == IdleBehavior::Drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kills = seen
        .lock()
        .commands
        .iter()
        .filter(|c| c.contains("--kill 15"))
        .count();
    assert!(
        (4..=8).contains(&kills),
        "one --kill every TimeoutSignal until TimeoutTERM: {kills}"
    );
    {
        let st = rig.pool.lock();
        let w = &st.workers[&vm.id];
        assert_eq!(w.idle_behavior, IdleBehavior::Drain);
        assert!(w.running[&uuid(1)].given_up());
        assert_eq!(
            w.state, Shutdown,
            "only given-up runners left: the drained worker goes"
        );
    }
    assert_eq!(vm.tags()["ArvadosIdleBehavior"], "drain");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(vm.destroyed.load(Ordering::SeqCst), 1);
}

/// §8.13: a VM still listed `TimeoutShutdown` after its destroy call gets another one at the
/// next sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_is_retried_while_the_vm_is_still_listed() {
    let rig = rig_with(|k| {
        let mut c = config(k, false);
        c.timeout_shutdown = Duration::from_millis(100);
        c
    });
    let (vm, _) = rig.vm(run(true, lists(0))).await;
    vm.fail_destroy.store(true, Ordering::SeqCst);
    rig.add_worker(&vm, Idle, Duration::ZERO, &[], &[]);
    assert!(rig.pool.shutdown(&vm.id));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(vm.destroyed.load(Ordering::SeqCst), 1);
    rig.pool.sync().await.unwrap();
    assert_eq!(vm.destroyed.load(Ordering::SeqCst), 1, "too soon to retry");
    tokio::time::sleep(Duration::from_millis(120)).await;
    vm.fail_destroy.store(false, Ordering::SeqCst);
    rig.pool.sync().await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        vm.destroyed.load(Ordering::SeqCst),
        2,
        "retried after TimeoutShutdown"
    );
    rig.pool.sync().await.unwrap();
    assert!(rig.pool.worker_ids().is_empty());
    assert_eq!(rig.pool.metrics.time_to_disappear.count(&[]), 1);
}
