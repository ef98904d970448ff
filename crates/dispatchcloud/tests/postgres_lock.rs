//! The single-dispatcher lock against a real PostgreSQL server (Debian's), started by this
//! test on 127.0.0.1 as an unprivileged user: a second dispatcher waits until the first lets go;
//! a dispatcher whose lock session is killed stops dispatching and the waiting one takes over.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dispatchcloud::scheduler::pool::WorkerPool;
use dispatchcloud::service::dblock::DbLock;
use dispatchcloud::service::{RunError, Service};
use testkit::stub_driver::{StubConfig, StubSet};
use testkit::{ContainerSpec, FakeArvados, FakeConfig};

use common::{SharedStub, wait_for};
use testkit::postgres::{
    admin_session, lock_holder, pg_bin_or_skip, pg_params, start_postgres, start_postgres_tls,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_dispatcher_waits_for_the_first_to_release_lock_10005() {
    let Some(bin) = pg_bin_or_skip() else {
        return;
    };
    let pg = start_postgres(&bin);
    let params: std::collections::BTreeMap<String, String> = [
        ("host", "127.0.0.1".to_string()),
        ("port", pg.port.to_string()),
        ("user", "postgres".to_string()),
        ("dbname", "postgres".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let never = tokio_util::sync::CancellationToken::new();
    let _keep = never.clone();
    // Wait for the server to accept sessions (it listens a moment before it is ready).
    let mut first = None;
    for _ in 0..50 {
        let r = tokio::time::timeout(
            Duration::from_millis(500),
            DbLock::acquire(&params, Duration::from_millis(100), &never),
        )
        .await;
        if let Ok(Some(l)) = r {
            first = Some(l);
            break;
        }
    }
    let first = first.expect("the first dispatcher gets the lock");
    let p = params.clone();
    let n = never.clone();
    let second =
        tokio::spawn(async move { DbLock::acquire(&p, Duration::from_millis(100), &n).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!second.is_finished(), "the second dispatcher must wait");
    first.release().await;
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the second gets the lock once the first lets go")
        .unwrap()
        .unwrap();
    // A third gives up cleanly on shutdown while waiting.
    let rx = tokio_util::sync::CancellationToken::new();
    let stop = rx.clone();
    let p = params.clone();
    let third =
        tokio::spawn(async move { DbLock::acquire(&p, Duration::from_millis(100), &rx).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), third)
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
    second.release().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_lost_stops_dispatch_and_the_waiting_dispatcher_takes_over() {
    let Some(bin) = pg_bin_or_skip() else {
        return;
    };
    let pg = start_postgres(&bin);
    let admin = admin_session(pg.port).await;
    let f = FakeArvados::start(FakeConfig::default()).await.unwrap();
    let mut cluster = common::stub_service_cluster(&f, "tok");
    cluster.postgresql.connection = pg_params(pg.port);
    cluster.containers.cloud_vms.timeout_idle = Duration::from_secs(30);
    cluster.containers.stale_lock_timeout = Duration::from_secs(1);
    // One cloud, seen by both dispatchers (the second adopts the first's VMs).
    let set = Arc::new(StubSet::new(
        StubConfig::from_params(&serde_json::json!({})).unwrap(),
    ));
    let mut drivers = cloud::registry::Registry::new();
    drivers.register("stub", Arc::new(SharedStub(set.clone())));
    let a = Service::build(&cluster, &drivers).unwrap();
    let b = Service::build(&cluster, &drivers).unwrap();
    let rx = tokio_util::sync::CancellationToken::new();
    let stop = rx.clone();
    let (s, r) = (a.clone(), rx.clone());
    let run_a = tokio::spawn(async move { s.run(r).await });
    let mut holder = None;
    for _ in 0..200 {
        holder = lock_holder(&admin).await;
        if holder.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_pid = holder.expect("the first dispatcher takes the lock");
    let (s, r) = (b.clone(), rx.clone());
    let run_b = tokio::spawn(async move { s.run(r).await });

    // Long-running containers, so some are running when the lock goes.
    let uuids: Vec<String> = (0..6)
        .map(|_| {
            f.add_container(&ContainerSpec {
                environment: vec![("FAKE_CRUNCH_RUN_MS".into(), "3000".into())],
                ..Default::default()
            })
        })
        .collect();
    let state = |u: &str| common::container_state(&f, u);
    wait_for("a container running", Duration::from_secs(60), || {
        uuids.iter().any(|u| state(u) == "Running")
    })
    .await;
    assert!(
        !run_b.is_finished(),
        "the second dispatcher waits for the lock"
    );

    // Kill the first dispatcher's lock session.
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&first_pid])
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), run_a)
        .await
        .expect("the first dispatcher stops at once")
        .unwrap();
    assert!(matches!(result, Err(RunError::LockLost)), "{result:?}");
    // It dispatches nothing more.
    assert!(a.pool.create(&common::fixture_type(1)).is_none());
    let creates_before = set.vms().len();

    // The second takes over and finishes everything, starting nothing twice.
    wait_for(
        "the second dispatcher to hold the lock",
        Duration::from_secs(30),
        || !run_b.is_finished(),
    )
    .await;
    let mut second_pid = None;
    for _ in 0..300 {
        second_pid = lock_holder(&admin).await.filter(|p| *p != first_pid);
        if second_pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(second_pid.is_some(), "the second dispatcher takes the lock");
    wait_for("every container Complete", Duration::from_secs(120), || {
        uuids.iter().all(|u| state(u) == "Complete")
    })
    .await;
    let violations = testkit::oracle::violations(&set, &f.state_changes());
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(set.vms().len() >= creates_before.min(1));
    stop.cancel();
    let r = tokio::time::timeout(Duration::from_secs(10), run_b)
        .await
        .expect("the second stops on shutdown")
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    drop(pg);
}

/// `sslmode` as libpq means it, against a server with a self-signed certificate: `require`
/// encrypts without checking it, `verify-full` accepts it only with that certificate as
/// `sslrootcert`, and refuses the server otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_connections_honour_sslmode() {
    use dispatchcloud::service::pgtls;
    let Some(bin) = pg_bin_or_skip() else {
        return;
    };
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (ck.cert.pem(), ck.signing_key.serialize_pem());
    let pg = start_postgres_tls(&bin, Some((&cert, &key)));
    let _ = admin_session(pg.port).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let other = dir.path().join("other.pem");
    let other_ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(&other, other_ck.cert.pem()).unwrap();
    let params = |mode: &str, root: Option<&Path>| {
        let mut p = pg_params(pg.port);
        p.insert("sslmode".into(), mode.into());
        if let Some(r) = root {
            p.insert("sslrootcert".into(), r.display().to_string());
        }
        p
    };
    let encrypted = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, bool>(0)
    };
    for (mode, root, want_tls) in [
        ("disable", None, false),
        ("prefer", None, true),
        ("require", None, true),
        ("verify-full", Some(ca.as_path()), true),
        ("verify-ca", Some(ca.as_path()), true),
    ] {
        let (client, task, _, _) = pgtls::connect(&params(mode, root), Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(encrypted(client).await, want_tls, "{mode}");
        task.abort();
    }
    let refused = pgtls::connect(
        &params("verify-full", Some(&other)),
        Duration::from_secs(10),
    )
    .await;
    let Err(e) = refused else {
        panic!("a server whose certificate the root does not sign is refused");
    };
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}
