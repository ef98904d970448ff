//! `arvados-dispatch-cloud cloudtest`: config and flags → [`dispatchcloud::cloudtest`].

use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::Args;
use cloud::tags::TagKeys;
use dispatchcloud::cloudtest::{CloudTest, DEFAULT_INSTANCE_SET_ID};

/// Flags of `cloudtest`.
#[derive(Args, Debug)]
pub struct CloudTestArgs {
    /// InstanceSetID tag of the test VM (never the dispatcher's own)
    #[arg(long, default_value = DEFAULT_INSTANCE_SET_ID)]
    instance_set_id: String,
    /// Image to boot [default: CloudVMs.ImageID]
    #[arg(long)]
    image_id: Option<String>,
    /// Instance type name from InstanceTypes [default: the cheapest]
    #[arg(long)]
    instance_type: Option<String>,
    /// Destroy VMs left by an earlier cloudtest instead of refusing to run
    #[arg(long)]
    destroy_existing: bool,
    /// Shell command to run on the VM once it has booted
    #[arg(long)]
    command: Option<String>,
}

/// Run the test; `Ok(false)` when a step failed.
pub fn run(cluster: arvados::Cluster, args: CloudTestArgs) -> anyhow::Result<bool> {
    let vms = &cluster.containers.cloud_vms;
    let it = match &args.instance_type {
        Some(name) => cluster
            .instance_types
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("--instance-type {name:?}: not in InstanceTypes"))?,
        None => cluster
            .instance_types
            .values()
            .min_by(|a, b| a.price.total_cmp(&b.price))
            .cloned()
            .ok_or_else(|| anyhow!("InstanceTypes: none configured"))?,
    };
    let key =
        dispatchcloud::ssh_executor::load_private_key(&cluster.containers.dispatch_private_key)
            .map_err(|e| anyhow!("Containers.DispatchPrivateKey: {e}"))?;
    let public_key = if vms.deploy_public_key {
        Some(
            key.public_key()
                .to_openssh()
                .context("encoding public key")?,
        )
    } else {
        None
    };
    let params = serde_json::to_value(&vms.driver_parameters)
        .context("Containers.CloudVMs.DriverParameters")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let driver = crate::drivers::registry()
            .get(&vms.driver)
            .map_err(|e| anyhow!("Containers.CloudVMs.Driver: {e}"))?;
        let set = driver
            .instance_set(&params, &args.instance_set_id, &vms.resource_tags)
            .map_err(|e| anyhow!("{e}"))?;
        let test = CloudTest {
            set,
            instance_set_id: args.instance_set_id,
            tag_keys: TagKeys::new(&vms.tag_key_prefix),
            resource_tags: vms.resource_tags.clone(),
            instance_type: it,
            image_id: args.image_id.unwrap_or_else(|| vms.image_id.clone()),
            instance_init_command: vms.instance_init_command.clone(),
            public_key,
            private_key: Arc::new(key),
            ssh_port: vms.ssh_port.clone(),
            boot_probe_command: vms.boot_probe_command.clone(),
            probe_interval: vms.probe_interval,
            timeout_booting: vms.timeout_booting,
            sync_interval: vms.sync_interval,
            destroy_existing: args.destroy_existing,
            command: args.command,
        };
        let cancel = crate::service::shutdown_on_signals();
        let mut out = std::io::stdout();
        Ok(test.run(&mut out, cancel).await)
    })
}
