//! crunch-dispatch-local (spec §12.5): runs each container this host can take by starting
//! `crunch-run` as a local child process, built on the `dispatch` library.
//!
//! * [`resources`]: the host's CPUs, RAM and GPUs, shared first-in-first-out.
//! * [`run_container`]: the run function: wait for resources, start
//!   `<crunch-run-command> --runtime-engine=… <args…> <uuid>` with only the documented
//!   environment, SIGINT it when the container's priority drops to 0 or the dispatcher stops,
//!   and cancel a container its crunch-run left Locked or Running.
//!
//! Unlike Go's, shutdown works: on SIGTERM the binary stops taking work, signals its children
//! and waits for them (see `main.rs`).

pub mod resources;

use std::process::Stdio;
use std::sync::Arc;

use arvados::types::{Container, ContainerState};
use dispatch::{Dispatcher, RunError, RunFn, Updates};
use resources::{Request, ResourceManager};
use tokio::process::Command;

/// Everything the run function needs besides the container.
pub struct Context {
    /// The crunch-run program (`-crunch-run-command`, default `Containers.CrunchRunCommand`).
    pub crunch_run_command: String,
    pub runtime_engine: String,
    pub crunch_run_args: Vec<String>,
    /// `Containers.ReserveExtraRAM`, added to each container's RAM request.
    pub reserve_extra_ram: i64,
    /// The environment crunch-run gets: `ARVADOS_API_HOST`, `ARVADOS_API_TOKEN`,
    /// `ARVADOS_API_HOST_INSECURE` (plus `PATH`, `TMPDIR` from our own environment).
    pub api_env: Vec<(String, String)>,
    /// The SystemRootToken, for `GatewayAuthSecret`.
    pub root_token: String,
    pub resources: ResourceManager,
}

pub use arvados::gateway_auth_secret;

/// The run function for [`Dispatcher::new`].
pub fn run_fn(ctx: Arc<Context>) -> RunFn {
    Arc::new(move |d: Dispatcher, c: Container, updates: Updates| {
        let ctx = ctx.clone();
        Box::pin(async move {
            run_container(&ctx, &d, c, updates).await;
            Ok::<(), RunError>(())
        })
    })
}

async fn set_state(d: &Dispatcher, uuid: &str, state: ContainerState) {
    // Failures are logged by the library.
    let _ = d.update_state(uuid, state).await;
}

/// Send SIGINT to a child (std has no signal API).
async fn interrupt(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    tracing::info!("sending SIGINT to pid {pid}");
    let Ok(pid) = i32::try_from(pid) else { return };
    if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGINT) {
        tracing::warn!("SIGINT to pid {pid}: {e}");
    }
}

/// Run one container (spec §12.5 `RunContainer`).
pub async fn run_container(ctx: &Context, d: &Dispatcher, c: Container, mut updates: Updates) {
    let uuid = c.uuid.clone();
    let cmd_name = ctx.crunch_run_command.clone();
    if c.state == ContainerState::Locked {
        run_locked(ctx, d, &c, &mut updates).await;
    }
    // Finalisation, on every path.
    match d
        .client()
        .get_container(&uuid, Some(&["uuid", "state"]))
        .await
    {
        Ok(now) if matches!(now.state, ContainerState::Locked | ContainerState::Running) => {
            tracing::warn!(
                "after {cmd_name:?} process termination, container state for {uuid} is {:?}; updating it to \"Cancelled\"",
                now.state.as_str()
            );
            set_state(d, &uuid, ContainerState::Cancelled).await;
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("error getting final container state for {uuid}: {e}"),
    }
    tracing::info!("finalized container {uuid}");
}

async fn run_locked(ctx: &Context, d: &Dispatcher, c: &Container, updates: &mut Updates) {
    let uuid = &c.uuid;
    let rc = &c.runtime_constraints;
    let req = Request {
        vcpus: rc.vcpus,
        ram: rc.ram + rc.keep_cache_ram + ctx.reserve_extra_ram,
        gpu_stack: rc.gpu.stack.clone(),
        gpus: rc.gpu.device_count,
    };
    let Some(ticket) = ctx.resources.enqueue(req) else {
        tracing::warn!("Container resource request {uuid} cannot be fulfilled.");
        set_state(d, uuid, ContainerState::Cancelled).await;
        return;
    };
    // Wait for our turn, unless the container stops being wanted meanwhile.
    let grant = loop {
        tokio::select! {
            g = ctx.resources.wait(&ticket) => break g,
            u = updates.recv() => match u {
                Some(u) if u.priority > 0 && matches!(u.state, ContainerState::Locked | ContainerState::Running) => {}
                _ => {
                    ctx.resources.cancel(&ticket);
                    return;
                }
            },
        }
    };

    let mut cmd = Command::new(&ctx.crunch_run_command);
    cmd.arg(format!("--runtime-engine={}", ctx.runtime_engine))
        .args(&ctx.crunch_run_args)
        .arg(uuid)
        .env_clear()
        .envs(
            ["PATH", "TMPDIR"]
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v))),
        )
        .envs(ctx.api_env.iter().cloned())
        .env(
            "GatewayAuthSecret",
            gateway_auth_secret(&ctx.root_token, uuid),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(false);
    if !grant.gpus.is_empty() {
        let var = if req_stack(c) == "rocm" {
            "AMD_VISIBLE_DEVICES"
        } else {
            "CUDA_VISIBLE_DEVICES"
        };
        cmd.env(var, grant.gpus.join(","));
    }
    let mut child = match cmd.spawn() {
        Ok(ch) => ch,
        Err(e) => {
            tracing::warn!(
                "error starting {:?} for {uuid}: {e}",
                ctx.crunch_run_command
            );
            ctx.resources.release(grant);
            set_state(d, uuid, ContainerState::Cancelled).await;
            return;
        }
    };
    let pid = child.id().unwrap_or(0);
    let mut interrupted = false;
    loop {
        tokio::select! {
            status = child.wait() => {
                if let Ok(s) = status {
                    tracing::info!("{:?} for {uuid} exited: {s}", ctx.crunch_run_command);
                }
                break;
            }
            u = updates.recv(), if !interrupted => {
                let stop = match &u {
                    None => true,
                    Some(u) => u.priority == 0 && matches!(u.state, ContainerState::Locked | ContainerState::Running),
                };
                if stop {
                    interrupt(pid).await;
                    interrupted = true;
                }
            }
        }
    }
    ctx.resources.release(grant);
}

fn req_stack(c: &Container) -> &str {
    &c.runtime_constraints.gpu.stack
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_auth_secret_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            gateway_auth_secret("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
