//! The "VMs" of `testkit::fake_gce` for tests that run a dispatcher (in process or as a
//! binary) with `Driver: gce`: an SSH server on each address the fake hands out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use testkit::fake_gce::{FakeGce, FakeGceConfig};
use testkit::ssh_vm::SshVm;
use testkit::stub_driver::{LifeLog, StubConfig, vm_handler_recording};
use tokio_util::sync::CancellationToken;

fn startup_script(inst: &serde_json::Value) -> String {
    inst["metadata"]["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["key"] == "startup-script")
        .and_then(|i| i["value"].as_str())
        .unwrap_or("")
        .to_string()
}

/// A fake Compute Engine with project `proj` and the one zone `us-central1-a`.
pub async fn one_zone_gce() -> Arc<FakeGce> {
    Arc::new(
        FakeGce::start(FakeGceConfig {
            project: "proj".into(),
            zones: vec!["us-central1-a".into()],
            ..Default::default()
        })
        .await
        .unwrap(),
    )
}

/// Answer SSH on each address the fake hands out, while its instance exists, with a stub VM
/// that learned its instance secret from the startup script and records every crunch-run life
/// in `lives` (the cloud's own record, for `testkit::oracle`); returns how many VMs it served.
pub async fn serve_vms(
    gce: Arc<FakeGce>,
    ssh_port: u16,
    pubkey: russh::keys::ssh_key::PublicKey,
    lives: LifeLog,
    stop: CancellationToken,
) -> usize {
    let mut vms: BTreeMap<String, SshVm> = BTreeMap::new();
    let mut served = 0;
    loop {
        let now = gce.instances();
        let ids: Vec<String> = now
            .iter()
            .filter_map(|i| i["id"].as_str().map(String::from))
            .collect();
        vms.retain(|id, _| ids.contains(id));
        for inst in now {
            let id = inst["id"].as_str().unwrap_or("").to_string();
            if vms.contains_key(&id) {
                continue;
            }
            let Some(ip) = inst["networkInterfaces"][0]["networkIP"].as_str() else {
                continue;
            };
            let addr: std::net::SocketAddr = format!("{ip}:{ssh_port}").parse().unwrap();
            let handler = vm_handler_recording(
                StubConfig::default(),
                &startup_script(&inst),
                &id,
                lives.clone(),
            );
            let vm = SshVm::start_on(addr, handler, vec![pubkey.clone()])
                .await
                .unwrap();
            vms.insert(id, vm);
            served += 1;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.cancelled() => return served,
        }
    }
}
