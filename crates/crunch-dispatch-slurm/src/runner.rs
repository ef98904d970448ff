//! The run function: one per tracked container, living as long as its Slurm job.
//!
//! Submit the job if the container is Locked and no job of that name exists; follow the
//! container's updates (priority → renice, priority 0 or no longer ours → scancel); and when
//! the job leaves squeue, repair the container (Running → Cancelled, Locked → unlock).
//!
//! Better than Arvados: a job Slurm can never start (held, `BadConstraints`,
//! `PartitionConfig`, …) is reported in the container's `runtime_status` at once and, after
//! `unrunnable_timeout`, the container is cancelled with the reason, where Arvados leaves it
//! Locked forever with nothing shown to the user.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arvados::config::Cluster;
use arvados::types::{Container, ContainerState};
use dispatch::{Dispatcher, RunError, RunFn, Updates};
use dispatchcloud::node_size::TypeChooser;
use serde_json::json;

use crate::priority::desired_priority;
use crate::slurm::Slurm;
use crate::squeue::{Checker, Job, reason_is_unrunnable};
use crate::{script, template};

/// Everything the run function needs besides the container.
pub struct Context {
    pub cluster: Cluster,
    pub chooser: TypeChooser,
    pub slurm: Slurm,
    pub checker: Checker,
    /// Cancel a container whose job Slurm can never start after this long; `None`: never
    /// (Arvados' behaviour), though the reason is still reported.
    pub unrunnable_timeout: Option<Duration>,
}

impl Context {
    pub fn new(cluster: Cluster, slurm: Slurm, checker: Checker) -> Context {
        Context {
            chooser: TypeChooser::new(&cluster),
            cluster,
            slurm,
            checker,
            unrunnable_timeout: Some(DEFAULT_UNRUNNABLE_TIMEOUT),
        }
    }
}

/// How long a job may stay pending for a reason Slurm never resolves by itself.
pub const DEFAULT_UNRUNNABLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The run function for [`Dispatcher::new`].
pub fn run_fn(ctx: Arc<Context>) -> RunFn {
    Arc::new(move |d: Dispatcher, c: Container, updates: Updates| {
        let ctx = ctx.clone();
        Box::pin(async move { run_container(&ctx, &d, c, updates).await })
    })
}

/// Submit the container's job; the sbatch error, if any.
async fn submit(ctx: &Context, c: &Container) -> Result<(), RunError> {
    let uuid = &c.uuid;
    tracing::info!("Submitting container {uuid} to slurm");
    let args = template::sbatch_args_for(&ctx.cluster, &ctx.chooser, c)?;
    let script = script::container_script(&ctx.cluster, uuid);
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    tracing::info!("running sbatch [{}]", quoted.join(" "));
    ctx.slurm
        .batch(&script, &args)
        .await
        .map(|_| ())
        .map_err(RunError::Other)
}

/// The cancel step: scancel, logging a failure and pausing a second after it.
async fn cancel(ctx: &Context, uuid: &str) {
    if let Err(e) = ctx.slurm.cancel(uuid).await {
        tracing::warn!("scancel: {e}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Register the container's desired priority without holding up the runner (the checker
/// may wait one poll for a job that is not listed yet).
fn register_priority(ctx: &Context, c: &Container) {
    let checker = ctx.checker.clone();
    let (uuid, want) = (c.uuid.clone(), desired_priority(c));
    tokio::spawn(async move { checker.set_priority(&uuid, want).await });
}

/// Act on a record of the container: priority 0 cancels its job, any other priority is
/// registered for renicing. Whether the job is being cancelled.
async fn follow(ctx: &Context, c: &Container) -> bool {
    if c.priority == 0 {
        tracing::info!(
            "container {} has state {:?}, priority 0: cancel slurm job",
            c.uuid,
            c.state.as_str()
        );
        cancel(ctx, &c.uuid).await;
        true
    } else {
        register_priority(ctx, c);
        false
    }
}

/// What a pending job's reason means for the container.
struct Unrunnable {
    reason: String,
    since: Instant,
    cancelled: bool,
}

/// Run one container (see the module doc).
pub async fn run_container(
    ctx: &Context,
    d: &Dispatcher,
    c: Container,
    mut updates: Updates,
) -> Result<(), RunError> {
    let uuid = c.uuid.clone();
    if c.state == ContainerState::Locked {
        let present = ctx
            .checker
            .has_uuid(&uuid)
            .await
            .map_err(|e| RunError::Other(e.to_string()))?;
        if !present {
            submit(ctx, &c).await?;
        }
    }
    // From here on only an squeue that started after the submission says whether the job
    // exists.
    let mut mark = ctx.checker.mark();
    tracing::info!(
        "Start monitoring container {uuid} in state {:?}",
        c.state.as_str()
    );
    let mut last_state = c.state;
    let mut closed = false;
    let mut cancelling = follow(ctx, &c).await;
    let mut unrunnable: Option<Unrunnable> = None;
    loop {
        tokio::select! {
            u = updates.recv(), if !closed => match u {
                Some(u) => {
                    last_state = u.state;
                    cancelling = follow(ctx, &u).await;
                }
                None => {
                    tracing::info!("container {uuid} is done: cancel slurm job");
                    closed = true;
                    cancel(ctx, &uuid).await;
                }
            },
            r = ctx.checker.fresh(mark, &uuid) => match r {
                Err(e) => {
                    tracing::warn!("container {uuid}: {e}; still waiting for squeue");
                    mark = ctx.checker.mark();
                }
                Ok((_, None)) => break,
                Ok((run, Some(job))) => {
                    mark = run;
                    if closed || cancelling {
                        tracing::info!("container {uuid} is still in squeue after scancel");
                        cancel(ctx, &uuid).await;
                    } else {
                        watch_pending(ctx, d, &uuid, &job, &mut unrunnable).await;
                    }
                }
            },
        }
    }
    job_gone(d, &uuid, last_state).await;
    tracing::info!("Done monitoring container {uuid}");
    Ok(())
}

/// Report, and eventually cancel, a container whose job Slurm will never start.
async fn watch_pending(
    ctx: &Context,
    d: &Dispatcher,
    uuid: &str,
    job: &Job,
    unrunnable: &mut Option<Unrunnable>,
) {
    if job.state != "PENDING" || !reason_is_unrunnable(&job.reason) {
        if unrunnable.take().is_some() {
            tracing::info!(
                "container {uuid}: Slurm job is no longer blocked ({})",
                job.reason
            );
        }
        return;
    }
    let fresh = unrunnable.as_ref().is_none_or(|u| u.reason != job.reason);
    if fresh {
        let wait = match ctx.unrunnable_timeout {
            Some(t) => format!("; the container will be cancelled after {}s", t.as_secs()),
            None => String::new(),
        };
        let warning = format!(
            "Slurm cannot start this container's job: {}{wait}",
            job.reason
        );
        tracing::warn!("container {uuid}: {warning}");
        let attrs = json!({"runtime_status": {"warning": warning}});
        if let Err(e) = d
            .client()
            .update_container(uuid, &attrs, Some(&["uuid"]))
            .await
        {
            tracing::warn!("container {uuid}: error setting runtime_status: {e}");
        }
        *unrunnable = Some(Unrunnable {
            reason: job.reason.clone(),
            since: Instant::now(),
            cancelled: false,
        });
        return;
    }
    let Some(u) = unrunnable.as_mut() else { return };
    let Some(limit) = ctx.unrunnable_timeout else {
        return;
    };
    if u.cancelled || u.since.elapsed() < limit {
        return;
    }
    let error = format!(
        "Slurm could not start this container's job ({}) for {}s: cancelled",
        job.reason,
        u.since.elapsed().as_secs()
    );
    tracing::warn!("container {uuid}: {error}");
    let attrs = json!({"state": "Cancelled", "runtime_status": {"error": error}});
    match d
        .client()
        .update_container(uuid, &attrs, Some(&["uuid"]))
        .await
    {
        Ok(_) => u.cancelled = true,
        Err(e) => tracing::warn!("container {uuid}: error cancelling: {e}"),
    }
    // The update that follows ends the tracker's updates, and the job is scancelled then.
}

/// The job left squeue: put the container right (`last_known` is used if it cannot be
/// read).
pub async fn job_gone(d: &Dispatcher, uuid: &str, last_known: ContainerState) {
    let state = match d
        .client()
        .get_container(uuid, Some(&["uuid", "state"]))
        .await
    {
        Ok(c) => c.state,
        Err(e) => {
            tracing::warn!("error getting final container state for {uuid}: {e}");
            last_known
        }
    };
    match state {
        // crunch-run died without finalising (node failure, job killed, out of memory…).
        ContainerState::Running => {
            let _ = d.update_state(uuid, ContainerState::Cancelled).await;
        }
        // The job never started crunch-run: back to the queue, to be submitted again.
        ContainerState::Locked => {
            let _ = d.unlock(uuid).await;
        }
        _ => {}
    }
}

/// Job names that are containers of this cluster (`<cluster>-dz642-<15>`).
pub fn orphan_candidates<'a>(cluster_id: &str, names: &'a [String]) -> Vec<&'a str> {
    names
        .iter()
        .map(String::as_str)
        .filter(|n| {
            let parts: Vec<&str> = n.split('-').collect();
            let ok = |s: &str, len: usize| {
                s.len() == len
                    && s.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            };
            parts.len() == 3
                && ok(parts[0], 5)
                && parts[1] == "dz642"
                && ok(parts[2], 15)
                && parts[0] == cluster_id
        })
        .collect()
}

/// Once at startup: track every container whose job is already in Slurm, so a job left for a
/// finished or requeued container is cancelled and a live one is followed.
pub async fn adopt_orphans(ctx: &Context, d: &Dispatcher) {
    let names = match ctx.checker.all().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("checkSqueueForOrphans: {e}");
            return;
        }
    };
    for uuid in orphan_candidates(&ctx.cluster.cluster_id, &names) {
        if let Err(e) = d.track_container(uuid).await {
            tracing::warn!("checkSqueueForOrphans: TrackContainer({uuid}): {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ac_slurm_s8_orphan_filter() {
        let names: Vec<String> = [
            "zzzzz-dz642-aaaaaaaaaaaaaaa",
            "xxxxx-dz642-aaaaaaaaaaaaaaa",
            "zzzzz-xvhdp-aaaaaaaaaaaaaaa",
            "myjob",
            "zzzzz-dz642-aaaaaaaaaaaaaaaa",
            "zzzzz-dz642-AAAAAAAAAAAAAAA",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            orphan_candidates("zzzzz", &names),
            ["zzzzz-dz642-aaaaaaaaaaaaaaa"]
        );
    }
}
