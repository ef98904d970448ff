//! The dispatcher service (spec §11): from a loaded cluster config and a driver registry to
//! running parts — InstanceSetID, dispatch key, the driver's instance set in the wrapper stack
//! (§1.5), the worker pool, the container queue, the scheduler — and the management API
//! ([`api`]). Shutting down stops the loops and leaves VMs and containers for the next
//! dispatcher to adopt.

pub mod api;
pub mod dblock;
pub mod http_metrics;
pub mod http_server;
pub mod pgtls;
pub mod status_page;

use std::sync::Arc;
use std::time::Duration;

use arvados::{Client, ClientConfig, Cluster};
use cloud::registry::Registry;
use cloud::wrappers::{Deadline, DefaultTags, Filtering, Instrumented, RateLimited};
use cloud::{InstanceSet, InstanceTags};
use tokio_util::sync::CancellationToken;

use crate::node_size::TypeChooser;
use crate::queue::ContainerQueue;
use crate::scheduler::{SchedConfig, Scheduler, ShellConfig};
use crate::settings::Settings;
use crate::worker::{Pool, PoolConfig};

/// A startup failure, with Arvados' wording.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("error parsing configured Containers.DispatchPrivateKey: {0}")]
    PrivateKey(String),
    #[error("error initializing driver: {0}")]
    Driver(String),
    #[error("{0}")]
    Api(String),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// How often a standby tries the dispatcher lock: it takes over within about this long of
/// the lock becoming free.
pub const LOCK_RETRY: Duration = Duration::from_secs(1);

/// How long shutdown waits for each component's tasks (calls already under way) to end.
pub const JOIN_LIMIT: Duration = Duration::from_secs(10);

/// Why [`Service::run`] ended other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The PostgreSQL session holding the single-dispatcher lock was lost: another dispatcher
    /// may hold the lock now. Dispatching stopped at once; the process should exit non-zero
    /// (systemd restarts it, and it waits for the lock again).
    #[error("lost the dispatcher lock (PostgreSQL advisory lock 10005): stopped dispatching")]
    LockLost,
}

/// What this dispatcher is doing now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Role {
    /// Built, not yet running.
    #[default]
    Starting,
    /// Waiting for the dispatcher lock another process holds (`holder`: who, if known),
    /// keeping a read-only view of the queue and the cloud.
    Standby { holder: String },
    /// Holding the lock (or running without a database): dispatching.
    Active,
    /// Stopped (shutdown or lost lock).
    Stopped,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Standby { .. } => "standby",
            Role::Active => "active",
            Role::Stopped => "stopped",
        }
    }
}

/// The running parts of one dispatcher.
pub struct Service {
    pub cluster: Cluster,
    pub instance_set_id: String,
    pub pool: Arc<Pool>,
    pub queue: Arc<ContainerQueue>,
    pub scheduler: Arc<Scheduler<Pool>>,
    pub registry: prometheus::Registry,
    pub http_metrics: Arc<http_metrics::ServiceMetrics>,
    role: parking_lot::Mutex<Role>,
    /// `arvados_dispatchcloud_active`: 1 while this process dispatches, 0 as a standby.
    active: prometheus::IntGauge,
}

/// Deadlines of cloud calls: `DriverParameters.CreateTimeout` (default 5 min) for a create,
/// `DriverParameters.CallTimeout` (default 1 min) for every other call. Arvados has no such
/// keys; its drivers ignore unknown `DriverParameters`, so the shared config stays valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudDeadlines {
    pub create: Duration,
    pub other: Duration,
}

impl CloudDeadlines {
    pub const DEFAULT: CloudDeadlines = CloudDeadlines {
        create: Duration::from_secs(300),
        other: Duration::from_secs(60),
    };

    /// From `DriverParameters`; a bad value is an error naming its key.
    pub fn from_params(params: &serde_json::Value) -> Result<CloudDeadlines, String> {
        let get = |key: &str, default: Duration| -> Result<Duration, String> {
            let Some(v) = params.get(key) else {
                return Ok(default);
            };
            let text = v
                .as_str()
                .ok_or_else(|| format!("DriverParameters.{key}: not a duration string"))?;
            let d = arvados::config::units::parse_duration(text)
                .map_err(|e| format!("DriverParameters.{key}: {e}"))?;
            if d < Duration::from_millis(100) || d > Duration::from_secs(24 * 3600) {
                return Err(format!(
                    "DriverParameters.{key}: {text:?} is out of range (100ms to 24h)"
                ));
            }
            Ok(d)
        };
        Ok(CloudDeadlines {
            create: get("CreateTimeout", Self::DEFAULT.create)?,
            other: get("CallTimeout", Self::DEFAULT.other)?,
        })
    }
}

/// The wrapper stack of §1.5 around a driver's instance set (the pool adds the throttle),
/// with [`Deadline`] innermost.
pub fn wrap_instance_set(
    set: Arc<dyn InstanceSet>,
    cluster: &Cluster,
    deadlines: CloudDeadlines,
    registry: &prometheus::Registry,
) -> Result<Arc<dyn InstanceSet>, prometheus::Error> {
    let vms = &cluster.containers.cloud_vms;
    let set: Arc<dyn InstanceSet> = Arc::new(Deadline::new(set, deadlines.create, deadlines.other));
    let mut set: Arc<dyn InstanceSet> = Arc::new(Instrumented::new(set, registry)?);
    if vms.max_cloud_ops_per_second > 0.0 {
        set = Arc::new(RateLimited::new(set, vms.max_cloud_ops_per_second));
    }
    let tags: InstanceTags = vms.resource_tags.clone();
    set = Arc::new(DefaultTags::new(set, tags));
    Ok(Arc::new(Filtering::new(set)))
}

impl Service {
    /// What this dispatcher is doing now.
    pub fn role(&self) -> Role {
        self.role.lock().clone()
    }

    fn set_role(&self, r: Role) {
        self.active.set(i64::from(r == Role::Active));
        *self.role.lock() = r;
    }

    /// Build every part with default [`Settings`] (nothing runs until [`Service::run`]).
    pub fn build(cluster: &Cluster, drivers: &Registry) -> Result<Arc<Service>, StartError> {
        Self::build_with(cluster, &Settings::default(), drivers)
    }

    /// Build every part, with the settings Arvados does not have.
    pub fn build_with(
        cluster: &Cluster,
        settings: &Settings,
        drivers: &Registry,
    ) -> Result<Arc<Service>, StartError> {
        let vms = &cluster.containers.cloud_vms;
        let instance_set_id = cloud::tags::instance_set_id(&cluster.system_root_token);
        let key = crate::ssh_executor::load_private_key(&cluster.containers.dispatch_private_key)
            .map_err(StartError::PrivateKey)?;
        let params = serde_json::to_value(&vms.driver_parameters)
            .map_err(|e| StartError::Driver(format!("DriverParameters: {e}")))?;
        let driver = drivers
            .get(&vms.driver)
            .map_err(|e| StartError::Driver(e.to_string()))?;
        let registry = prometheus::Registry::new();
        let set = driver
            .instance_set_with_metrics(&params, &instance_set_id, &vms.resource_tags, &registry)
            .map_err(|e| StartError::Driver(e.to_string()))?;
        let http_metrics = Arc::new(http_metrics::ServiceMetrics::new(&registry, cluster)?);
        let deadlines = CloudDeadlines::from_params(&params).map_err(StartError::Driver)?;
        let set = wrap_instance_set(set, cluster, deadlines, &registry)?;
        let mut pool_config = PoolConfig::from_cluster(cluster, &instance_set_id, Arc::new(key));
        pool_config.capacity = settings.capacity.clone();
        pool_config.idle_time = settings.idle_time;
        pool_config.interruptions = settings.interruptions;
        let pool = Pool::new(pool_config, set, &registry)?;
        let client = ClientConfig::from_cluster(cluster)
            .and_then(Client::new)
            .map_err(|e| StartError::Api(e.to_string()))?;
        let queue = ContainerQueue::new(client, TypeChooser::new(cluster), &registry)?;
        queue.set_incremental(
            settings
                .queue
                .for_poll_interval(cluster.containers.cloud_vms.poll_interval),
        );
        let active = cloud::metrics::registered(
            &registry,
            prometheus::IntGauge::with_opts(cloud::metrics::dispatchcloud_opts(
                "active",
                "1 while this dispatcher holds the dispatcher lock (or runs without a database) and dispatches; 0 while it starts, stands by or has stopped.",
            ))?,
        )?;
        queue.set_select_runtime_status(settings.interruptions.drain);
        let scheduler = Scheduler::new(
            queue.clone(),
            pool.clone(),
            SchedConfig {
                spend_caps: settings.spend_caps,
                shutdown_at_quota: settings.scheduler.shutdown_at_quota,
                interruptions: settings.interruptions,
                spot_fallback: settings.spot_fallback,
                idle_adaptive: settings.idle_time.adaptive,
                ..SchedConfig::from_cluster(cluster)
            },
            ShellConfig::from_cluster(cluster),
            &registry,
        )?;
        Ok(Arc::new(Service {
            cluster: cluster.clone(),
            instance_set_id,
            pool,
            queue,
            scheduler,
            registry,
            http_metrics,
            role: Default::default(),
            active,
        }))
    }

    /// A standby's view while it waits for the lock: poll the queue and list the cloud's
    /// instances, changing nothing (no locks, cancels, creates, tag writes or SSH), so the
    /// status page and management API show the cluster, and taking over starts from a known
    /// queue and instance list.
    async fn warm_view(self: Arc<Self>, stop: CancellationToken) {
        let every = self
            .cluster
            .containers
            .cloud_vms
            .poll_interval
            .max(Duration::from_secs(1));
        loop {
            let (listed, polled) = tokio::join!(self.pool.sync(), self.queue.update());
            if let Err(e) = listed {
                tracing::warn!(error = %e, "standby: listing cloud instances failed");
            }
            if let Err(e) = polled {
                tracing::warn!(error = %e, "standby: polling the queue failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Run the pool and the scheduler until `shutdown` is cancelled; then stop them, leaving
    /// VMs, crunch-run processes and container locks for the next dispatcher, and join their
    /// tasks (for at most [`JOIN_LIMIT`] each). If the database lock is lost meanwhile, stop
    /// dispatching at once (no new locks, creates, starts, unlocks or cancels) and return
    /// [`RunError::LockLost`].
    pub async fn run(self: &Arc<Self>, shutdown: CancellationToken) -> Result<(), RunError> {
        // Only one dispatcher per cluster: wait for the database lock when there is one,
        // as a hot standby with a read-only view of the queue and the cloud.
        let lock = if self.cluster.postgresql.is_configured() {
            self.set_role(Role::Standby {
                holder: "unknown".into(),
            });
            self.pool.set_passive(true);
            self.queue.set_read_only(true);
            let warm = crate::tasks::Tasks::child_of(&shutdown);
            warm.spawn(self.clone().warm_view(warm.token().clone()));
            let me = self.clone();
            let lock = dblock::DbLock::acquire_reporting(
                &self.cluster.postgresql.connection,
                LOCK_RETRY,
                &shutdown,
                move |holder| {
                    me.set_role(Role::Standby {
                        holder: holder.to_string(),
                    })
                },
            )
            .await;
            // The warm view's calls have deadlines; do not wait for a slow one past a moment.
            if !warm.join("standby view", Duration::from_secs(2)).await {
                tracing::warn!("standby view still polling after 2s; taking over anyway");
            }
            self.pool.set_passive(false);
            self.queue.set_read_only(false);
            match lock {
                Some(l) => Some(l),
                None => {
                    self.set_role(Role::Stopped);
                    return Ok(());
                }
            }
        } else {
            tracing::warn!(
                "PostgreSQL is not configured: nothing stops a second dispatcher from running \
                 at the same time and starting the same containers twice"
            );
            None
        };
        self.set_role(Role::Active);
        self.pool.start();
        let result = match &lock {
            Some(l) => tokio::select! {
                _ = self.scheduler.clone().run(shutdown) => Ok(()),
                _ = l.until_lost() => {
                    tracing::error!("lost the dispatcher lock; stopping dispatch");
                    Err(RunError::LockLost)
                }
            },
            None => {
                self.scheduler.clone().run(shutdown).await;
                Ok(())
            }
        };
        self.scheduler.stop();
        self.pool.stop();
        self.set_role(Role::Stopped);
        // Nothing new starts now; let calls under way finish within their deadlines.
        tokio::join!(
            self.scheduler.join(JOIN_LIMIT),
            self.pool.join(JOIN_LIMIT),
            self.queue.join(JOIN_LIMIT),
        );
        if let Some(l) = lock {
            if result.is_ok() {
                l.release().await;
            } else {
                drop(l);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cloud_deadlines_come_from_driver_parameters_and_bad_ones_name_their_key() {
        assert_eq!(
            CloudDeadlines::from_params(&json!({})),
            Ok(CloudDeadlines::DEFAULT)
        );
        assert_eq!(
            CloudDeadlines::from_params(&json!({"CreateTimeout": "90s", "CallTimeout": "5s"})),
            Ok(CloudDeadlines {
                create: Duration::from_secs(90),
                other: Duration::from_secs(5),
            })
        );
        for (params, want) in [
            (
                json!({"CallTimeout": 5}),
                "DriverParameters.CallTimeout: not a duration string",
            ),
            (
                json!({"CreateTimeout": "5x"}),
                "DriverParameters.CreateTimeout: invalid duration",
            ),
            (
                json!({"CallTimeout": "1ms"}),
                "DriverParameters.CallTimeout: \"1ms\" is out of range",
            ),
            (
                json!({"CreateTimeout": "48h"}),
                "DriverParameters.CreateTimeout: \"48h\" is out of range",
            ),
        ] {
            let err = CloudDeadlines::from_params(&params).unwrap_err();
            assert!(err.starts_with(want), "{params}: {err}");
        }
    }
}
