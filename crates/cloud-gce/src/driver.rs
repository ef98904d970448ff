//! The GCE instance set over `google-cloud-compute-v1`: insert with zone fail-over and an
//! idempotent `requestId`, waiting for the operation so that quota and capacity errors GCE
//! reports inside it surface typed; aggregatedList with a label filter and paging; tags as
//! metadata + labels with fingerprints (one retry on 412); delete. Request bodies are built as
//! GCE's JSON and read back through the client's serde models, so what goes over the wire is
//! plain to see here and in the fake. Client retries are off: the dispatcher does its own
//! back-off, and a retried insert would hide a capacity error.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arvados::InstanceType;
use cloud::error::Backoff;
use cloud::metrics::ProviderMetrics;
use cloud::{
    BoxFuture, CloudError, CreateRequest, Driver, ErrorKind, Instance, InstanceId, InstancePrice,
    InstanceSet, InstanceSetId, InstanceTags,
};
use google_cloud_compute_v1::client::{Instances, ZoneOperations};
use google_cloud_compute_v1::model;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::errors::{HttpError, classify_http, classify_operation, quota_group};
use crate::labels::{TAGS_ITEM, filter, labels, tags_from_metadata};
use crate::params::GceParams;

/// The GCE driver (`Driver: gce`).
#[derive(Default)]
pub struct GceDriver;

impl Driver for GceDriver {
    fn instance_set(
        &self,
        params: &Value,
        id: &InstanceSetId,
        _shared_tags: &InstanceTags,
    ) -> Result<Arc<dyn InstanceSet>, CloudError> {
        Ok(Arc::new(GceSet::new(
            GceParams::from_params(params)?,
            id,
            None,
        )?))
    }

    fn instance_set_with_metrics(
        &self,
        params: &Value,
        id: &InstanceSetId,
        _shared_tags: &InstanceTags,
        registry: &prometheus::Registry,
    ) -> Result<Arc<dyn InstanceSet>, CloudError> {
        Ok(Arc::new(GceSet::new(
            GceParams::from_params(params)?,
            id,
            Some(registry),
        )?))
    }
}

struct Clients {
    instances: Instances,
    operations: ZoneOperations,
}

/// The GCE instance set.
pub struct GceSet(Arc<Inner>);

impl GceSet {
    pub fn new(
        params: GceParams,
        id: &InstanceSetId,
        registry: Option<&prometheus::Registry>,
    ) -> Result<GceSet, CloudError> {
        Ok(GceSet(Arc::new(Inner::new(params, id, registry)?)))
    }
}

/// The set's state, shared with its instances.
pub struct Inner {
    params: GceParams,
    clients: OnceCell<Clients>,
    create_backoff: Backoff,
    call_backoff: Backoff,
    /// (provider type + market, zone) → no creates there until.
    zone_hold: Mutex<HashMap<(String, String), Instant>>,
    metrics: ProviderMetrics,
    /// Report preemptions ([`InstanceSet::watch_interruptions`]).
    watch_interruptions: std::sync::atomic::AtomicBool,
}

fn model_to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn json_to_model<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T, CloudError> {
    serde_json::from_value(v).map_err(|e| CloudError::other(format!("{what}: {e}")))
}

/// A call's error as the dispatcher sees it: GCE's HTTP error classified, or (no answer) an
/// unknown outcome.
fn call_error(e: &google_cloud_gax::error::Error, op: &str, backoff: &Backoff) -> CloudError {
    if let Some(code) = e.http_status_code() {
        let body = e.http_payload().map(|b| b.to_vec()).unwrap_or_default();
        let mut he = HttpError::parse(code, &body);
        if he.message.is_empty() {
            he.message = e.to_string();
        }
        if he.reasons.is_empty()
            && let Some(s) = e.status()
        {
            he.message = s.message.clone();
            for d in &s.details {
                if let google_cloud_gax::error::rpc::StatusDetails::ErrorInfo(info) = d {
                    he.reasons.push(info.reason.clone());
                }
            }
        }
        return classify_http(&he, op, backoff);
    }
    CloudError {
        outcome_unknown: true,
        ..CloudError::other(format!("{op}: {e}"))
    }
}

/// A UUID-shaped `requestId` derived from `seed`: the same create (or delete) asked again
/// is the same request to GCE, which makes no second VM.
fn request_id(seed: &str) -> String {
    let parts = [0, 1].map(|i| cloud::tags::stable_hash(seed, (i, 0x5eed)));
    let b: Vec<u8> = parts.iter().flat_map(|p| p.to_be_bytes()).collect();
    let hex = hex::encode(&b);
    // Version 4 / RFC 4122 variant bits, so GCE accepts it as a UUID.
    format!(
        "{}-{}-4{}-{:x}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        (u8::from_str_radix(&hex[16..17], 16).unwrap_or(0) & 0x3) | 0x8,
        &hex[17..20],
        &hex[20..32]
    )
}

/// A VM name for a create: the prefix and 16 hex digits from `seed` (so a retried create
/// asks for the same name).
fn vm_name(prefix: &str, seed: &str) -> String {
    let id = request_id(seed).replace('-', "");
    format!("{prefix}{}", &id[..16])
}

/// GPUs are part of these machine families; no accelerator to attach.
fn has_built_in_gpus(provider_type: &str) -> bool {
    let family = provider_type.split('-').next().unwrap_or("");
    matches!(family, "a2" | "a3" | "a4" | "g2" | "g4")
}

impl Inner {
    fn new(
        params: GceParams,
        _id: &InstanceSetId,
        registry: Option<&prometheus::Registry>,
    ) -> Result<Inner, CloudError> {
        let metrics = ProviderMetrics::new("gce", "zone", &params.zones, registry)
            .map_err(|e| CloudError::other(format!("registering GCE metrics: {e}")))?;
        Ok(Inner {
            params,
            clients: OnceCell::new(),
            create_backoff: Backoff::default(),
            call_backoff: Backoff::default(),
            zone_hold: Mutex::new(HashMap::new()),
            watch_interruptions: Default::default(),
            metrics,
        })
    }

    async fn clients(&self) -> Result<&Clients, CloudError> {
        self.clients
            .get_or_try_init(|| async {
                let p = &self.params;
                let creds = if p.anonymous_credentials {
                    google_cloud_auth::credentials::anonymous::Builder::new().build()
                } else if !p.credentials_file.is_empty() {
                    let bad = |e: &dyn std::fmt::Display| {
                        CloudError::other(format!(
                            "DriverParameters.CredentialsFile: {}: {e}",
                            p.credentials_file
                        ))
                    };
                    let text = std::fs::read_to_string(&p.credentials_file).map_err(|e| bad(&e))?;
                    let key: Value = serde_json::from_str(&text).map_err(|e| bad(&e))?;
                    google_cloud_auth::credentials::service_account::Builder::new(key)
                        .build()
                        .map_err(|e| CloudError::other(format!("GCE credentials: {e}")))?
                } else {
                    google_cloud_auth::credentials::Builder::default()
                        .build()
                        .map_err(|e| CloudError::other(format!("GCE credentials: {e}")))?
                };
                let mut ib = Instances::builder()
                    .with_credentials(creds.clone())
                    .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
                let mut ob = ZoneOperations::builder()
                    .with_credentials(creds)
                    .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
                if let Some(ep) = &p.endpoint {
                    ib = ib.with_endpoint(ep.clone());
                    ob = ob.with_endpoint(ep.clone());
                }
                let instances = ib
                    .build()
                    .await
                    .map_err(|e| CloudError::other(format!("GCE client: {e}")))?;
                let operations = ob
                    .build()
                    .await
                    .map_err(|e| CloudError::other(format!("GCE client: {e}")))?;
                Ok(Clients {
                    instances,
                    operations,
                })
            })
            .await
    }

    /// Wait until an operation is DONE (`operations.wait`, which GCE answers when the
    /// operation is done or after about two minutes); its error, if any, classified.
    async fn wait(&self, zone: &str, op: model::Operation, what: &str) -> Result<(), CloudError> {
        let c = self.clients().await?;
        let mut op = model_to_json(&op);
        let mut pause = Duration::from_millis(10);
        loop {
            if op["status"] == "DONE" {
                if let Some(e) = op["error"]["errors"].as_array().and_then(|a| a.first()) {
                    return Err(classify_operation(
                        e["code"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or(""),
                        what,
                    ));
                }
                return Ok(());
            }
            let name = op["name"].as_str().unwrap_or("").to_string();
            let got = c
                .operations
                .wait()
                .set_project(&self.params.project)
                .set_zone(zone)
                .set_operation(name)
                .send()
                .await
                .map_err(|e| call_error(&e, what, &self.call_backoff))?;
            op = model_to_json(&got);
            if op["status"] != "DONE" {
                // Not done within GCE's wait: do not spin.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }

    fn market(it: &InstanceType) -> String {
        format!(
            "{}{}",
            it.provider_type,
            if it.preemptible { "-spot" } else { "" }
        )
    }

    /// The insert body for `it` in `zone` (GCE JSON).
    fn insert_body(
        &self,
        it: &InstanceType,
        req: &CreateRequest,
        zone: &str,
        name: &str,
    ) -> Result<Value, CloudError> {
        let p = &self.params;
        let mut items = vec![
            json!({"key": TAGS_ITEM, "value": serde_json::to_string(&req.tags).unwrap_or_default()}),
        ];
        if !req.init_command.is_empty() {
            items.push(json!({"key": "startup-script", "value": req.init_command}));
        }
        if let Some(k) = &req.public_key {
            items.push(
                json!({"key": "ssh-keys", "value": format!("{}:{}", p.admin_username, k.trim())}),
            );
            items.push(json!({"key": "block-project-ssh-keys", "value": "true"}));
        }
        let scratch_gb = (it.added_scratch + 999_999_999) / 1_000_000_000;
        let boot_gb = if p.boot_disk_size_gb > 0 {
            p.boot_disk_size_gb
        } else {
            20
        } + if p.local_ssds == 0 { scratch_gb } else { 0 };
        let mut disks = vec![json!({
            "boot": true,
            "autoDelete": true,
            "type": "PERSISTENT",
            "initializeParams": {
                "sourceImage": req.image_id,
                "diskSizeGb": boot_gb.to_string(),
                "diskType": format!("zones/{zone}/diskTypes/{}", p.disk_type),
            },
        })];
        for _ in 0..p.local_ssds {
            disks.push(json!({
                "type": "SCRATCH",
                "autoDelete": true,
                "interface": "NVME",
                "initializeParams": {"diskType": format!("zones/{zone}/diskTypes/local-ssd")},
            }));
        }
        let mut nic = json!({});
        if !p.network.is_empty() {
            nic["network"] = p.network.clone().into();
        }
        if !p.subnetwork.is_empty() {
            nic["subnetwork"] = p.subnetwork.clone().into();
        }
        if p.use_public_ip {
            nic["accessConfigs"] = json!([{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]);
        }
        let gpus = it.gpu.device_count > 0;
        let mut scheduling = if it.preemptible {
            json!({
                "provisioningModel": "SPOT",
                "instanceTerminationAction": "DELETE",
                "automaticRestart": false,
                "onHostMaintenance": "TERMINATE",
            })
        } else {
            json!({"provisioningModel": "STANDARD", "automaticRestart": true})
        };
        let mut body = json!({
            "name": name,
            "machineType": format!("zones/{zone}/machineTypes/{}", it.provider_type),
            "disks": disks,
            "networkInterfaces": [nic],
            "metadata": {"items": items},
            "labels": labels(&req.tags, &p.labels),
        });
        if gpus {
            // GPU VMs cannot live-migrate.
            scheduling["onHostMaintenance"] = "TERMINATE".into();
            if !has_built_in_gpus(&it.provider_type) {
                let Some(acc) = p.accelerator_types.get(&it.provider_type) else {
                    return Err(CloudError::other(format!(
                        "DriverParameters.AcceleratorTypes.{}: needed for instance type {} ({} GPUs)",
                        it.provider_type, it.name, it.gpu.device_count
                    )));
                };
                body["guestAccelerators"] = json!([{
                    "acceleratorType": format!("zones/{zone}/acceleratorTypes/{acc}"),
                    "acceleratorCount": it.gpu.device_count,
                }]);
            }
        }
        body["scheduling"] = scheduling;
        if !p.service_account.is_empty() {
            let scopes = if p.scopes.is_empty() {
                vec!["https://www.googleapis.com/auth/cloud-platform".to_string()]
            } else {
                p.scopes.clone()
            };
            body["serviceAccounts"] = json!([{"email": p.service_account, "scopes": scopes}]);
        }
        if !p.network_tags.is_empty() {
            body["tags"] = json!({"items": p.network_tags});
        }
        Ok(body)
    }

    async fn get(&self, zone: &str, name: &str) -> Result<Value, CloudError> {
        let c = self.clients().await?;
        let i = c
            .instances
            .get()
            .set_project(&self.params.project)
            .set_zone(zone)
            .set_instance(name)
            .send()
            .await
            .map_err(|e| call_error(&e, "Get", &self.call_backoff))?;
        Ok(model_to_json(&i))
    }

    fn wrap(self: &Arc<Self>, v: Value) -> Option<GceInstance> {
        let zone = v["zone"].as_str()?.rsplit('/').next()?.to_string();
        let name = v["name"].as_str()?.to_string();
        let nic = &v["networkInterfaces"][0];
        let address = if self.params.use_public_ip {
            nic["accessConfigs"][0]["natIP"].as_str()
        } else {
            nic["networkIP"].as_str()
        }
        .unwrap_or("")
        .to_string();
        Some(GceInstance {
            set: self.clone(),
            zone,
            name,
            provider_type: v["machineType"]
                .as_str()
                .and_then(|m| m.rsplit('/').next())
                .unwrap_or("")
                .to_string(),
            tags: tags_from_metadata(&v["metadata"]["items"]),
            address,
            interruption: self.preemption(&v),
        })
    }

    /// With `watch_interruptions`: a spot VM that is `STOPPING` is being preempted (GCE gives
    /// it 30 s; this driver only deletes, and the pool ignores notices for instances it is
    /// shutting down). When: its `lastStopTimestamp`, or now.
    fn preemption(&self, v: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
        let watching = self
            .watch_interruptions
            .load(std::sync::atomic::Ordering::Relaxed);
        let spot = v["scheduling"]["provisioningModel"] == "SPOT"
            || v["scheduling"]["preemptible"] == true;
        if !(watching && spot && v["status"] == "STOPPING") {
            return None;
        }
        Some(
            v["lastStopTimestamp"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map_or_else(chrono::Utc::now, |t| t.with_timezone(&chrono::Utc)),
        )
    }

    async fn create_in(
        self: &Arc<Self>,
        it: &InstanceType,
        req: &CreateRequest,
        zone: &str,
    ) -> Result<Arc<dyn Instance>, CloudError> {
        let c = self.clients().await?;
        let seed = format!("{}\n{zone}\n{}", req.init_command, it.name);
        let name = vm_name(&self.params.instance_name_prefix, &seed);
        let body: model::Instance =
            json_to_model(self.insert_body(it, req, zone, &name)?, "insert body")?;
        let op = c
            .instances
            .insert()
            .set_project(&self.params.project)
            .set_zone(zone)
            .set_request_id(request_id(&seed))
            .set_body(body)
            .send()
            .await
            .map_err(|e| call_error(&e, "Create", &self.create_backoff))?;
        self.create_backoff.reset();
        self.wait(zone, op, "Create").await?;
        let v = self.get(zone, &name).await?;
        match self.wrap(v) {
            Some(i) => Ok(Arc::new(i)),
            None => Err(CloudError::other(format!(
                "Create: instance {zone}/{name}: no zone or name"
            ))),
        }
    }

    async fn create_anywhere(
        self: Arc<Self>,
        it: InstanceType,
        req: CreateRequest,
    ) -> Result<Arc<dyn Instance>, CloudError> {
        let market = Self::market(&it);
        if let Some(zone) = &req.zone {
            // Pinned: the pool keeps capacity per zone (with back-off) and chose this one;
            // no fail-over, and the driver's own fixed hold-off is not consulted.
            if !self.params.zones.contains(zone) {
                return Err(CloudError::other(format!(
                    "Create: pinned to zone {zone}, which is not one of the configured Zones"
                )));
            }
            let r = self.create_in(&it, &req, zone).await;
            self.metrics.count_start(zone, r.is_ok());
            return r.map_err(|e| CloudError {
                zone_specific: e.is_instance_type_specific(),
                ..e
            });
        }
        let mut last: Option<CloudError> = None;
        for zone in self.params.zones.clone() {
            let held = {
                let h = self.zone_hold.lock();
                h.get(&(market.clone(), zone.clone()))
                    .is_some_and(|t| Instant::now() < *t)
            };
            if held {
                continue;
            }
            match self.create_in(&it, &req, &zone).await {
                Ok(i) => {
                    self.metrics.count_start(&zone, true);
                    return Ok(i);
                }
                Err(e) => {
                    self.metrics.count_start(&zone, false);
                    // Only a zone's shortage of this type (ZONE_RESOURCE_POOL_EXHAUSTED…) is
                    // classified type-specific: the next zone may have it.
                    if !e.is_instance_type_specific() {
                        return Err(e);
                    }
                    tracing::info!(InstanceType = %it.name, Zone = %zone, error = %e, "no capacity in zone; trying the next");
                    self.zone_hold.lock().insert(
                        (market.clone(), zone.clone()),
                        Instant::now() + self.params.zone_capacity_hold_off,
                    );
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            CloudError::new(
                ErrorKind::Capacity {
                    instance_type_specific: true,
                    quota_group_specific: false,
                },
                format!(
                    "Create: {} is short of capacity in every zone ({})",
                    it.provider_type,
                    self.params.zones.join(", ")
                ),
            )
        }))
    }

    async fn list(self: Arc<Self>, f: InstanceTags) -> Result<Vec<Arc<dyn Instance>>, CloudError> {
        let c = self.clients().await?;
        let mut out: Vec<Arc<dyn Instance>> = Vec::new();
        let mut per_zone: BTreeMap<String, f64> =
            self.params.zones.iter().map(|z| (z.clone(), 0.0)).collect();
        let mut token: Option<String> = None;
        loop {
            let mut call = c
                .instances
                .aggregated_list()
                .set_project(&self.params.project)
                .set_max_results(500_u32)
                .set_or_clear_filter(filter(&f));
            if let Some(t) = &token {
                call = call.set_page_token(t.clone());
            }
            let page = call
                .send()
                .await
                .map_err(|e| call_error(&e, "List", &self.call_backoff))?;
            for scoped in page.items.values() {
                for i in &scoped.instances {
                    let v = model_to_json(i);
                    let spot = v["scheduling"]["provisioningModel"] == "SPOT";
                    // A preempted spot VM set to STOP is TERMINATED: for the dispatcher it is
                    // gone (ours are set to DELETE).
                    if spot && v["status"] == "TERMINATED" {
                        continue;
                    }
                    let Some(inst) = self.wrap(v) else { continue };
                    if f.iter().any(|(k, want)| inst.tags.get(k) != Some(want)) {
                        continue;
                    }
                    if let Some(n) = per_zone.get_mut(&inst.zone) {
                        *n += 1.0;
                    }
                    out.push(Arc::new(inst));
                }
            }
            token = page.next_page_token.filter(|t| !t.is_empty());
            if token.is_none() {
                break;
            }
        }
        self.call_backoff.reset();
        for (z, n) in per_zone {
            self.metrics.instances.with_label_values(&[&z]).set(n);
        }
        Ok(out)
    }
}

impl InstanceSet for GceSet {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        Box::pin(self.0.clone().create_anywhere(it.clone(), req))
    }
    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        Box::pin(self.0.clone().list(filter.clone()))
    }
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        quota_group(&it.provider_type, it.preemptible, it.gpu.device_count > 0)
    }
    fn watch_interruptions(&self) {
        self.0
            .watch_interruptions
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    /// The configured zones, when there is a choice (more than one).
    fn zones(&self) -> Vec<String> {
        match &self.0.params.zones {
            z if z.len() > 1 => z.clone(),
            _ => Vec::new(),
        }
    }
    fn stop(&self) {}
}

/// One GCE VM: `zone/name`.
pub struct GceInstance {
    set: Arc<Inner>,
    zone: String,
    name: String,
    provider_type: String,
    tags: InstanceTags,
    address: String,
    /// Being preempted, as of the list (with `watch_interruptions`).
    interruption: Option<chrono::DateTime<chrono::Utc>>,
}

impl std::fmt::Debug for GceInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GceInstance({}/{})", self.zone, self.name)
    }
}

/// A set call's operation; `None` if the fingerprint was stale on the first attempt (fetch
/// it again and retry).
fn accepted(
    r: Result<model::Operation, google_cloud_gax::error::Error>,
    attempt: usize,
    backoff: &Backoff,
) -> Result<Option<model::Operation>, CloudError> {
    match r {
        Ok(op) => Ok(Some(op)),
        Err(e) if e.http_status_code() == Some(412) && attempt == 0 => Ok(None),
        Err(e) => Err(call_error(&e, "SetTags", backoff)),
    }
}

impl GceInstance {
    /// Replace the tag metadata item and the labels, each with the current fingerprint; a
    /// stale fingerprint (412) is fetched again once.
    async fn save_tags(&self, tags: InstanceTags) -> Result<(), CloudError> {
        let s = &self.set;
        let c = s.clients().await?;
        for attempt in 0..2_usize {
            let current = s.get(&self.zone, &self.name).await?;
            let mut items: Vec<Value> = current["metadata"]["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|i| i["key"] != TAGS_ITEM)
                .collect();
            items.push(json!({"key": TAGS_ITEM, "value": serde_json::to_string(&tags).unwrap_or_default()}));
            let md: model::Metadata = json_to_model(
                json!({"fingerprint": current["metadata"]["fingerprint"], "items": items}),
                "metadata",
            )?;
            let r = c
                .instances
                .set_metadata()
                .set_project(&s.params.project)
                .set_zone(&self.zone)
                .set_instance(&self.name)
                .set_body(md)
                .send()
                .await;
            let Some(op) = accepted(r, attempt, &s.call_backoff)? else {
                continue;
            };
            s.wait(&self.zone, op, "SetTags").await?;
            let lr: model::InstancesSetLabelsRequest = json_to_model(
                json!({
                    "labelFingerprint": current["labelFingerprint"],
                    "labels": labels(&tags, &s.params.labels),
                }),
                "labels",
            )?;
            let r = c
                .instances
                .set_labels()
                .set_project(&s.params.project)
                .set_zone(&self.zone)
                .set_instance(&self.name)
                .set_body(lr)
                .send()
                .await;
            let Some(op) = accepted(r, attempt, &s.call_backoff)? else {
                continue;
            };
            s.wait(&self.zone, op, "SetTags").await?;
            return Ok(());
        }
        Err(CloudError::other(
            "SetTags: fingerprint changed twice while setting tags",
        ))
    }

    async fn delete(&self) -> Result<(), CloudError> {
        let s = &self.set;
        let c = s.clients().await?;
        let r = c
            .instances
            .delete()
            .set_project(&s.params.project)
            .set_zone(&self.zone)
            .set_instance(&self.name)
            .set_request_id(request_id(&format!("delete {}/{}", self.zone, self.name)))
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            // Already gone.
            Err(e) if e.http_status_code() == Some(404) => Ok(()),
            Err(e) => Err(call_error(&e, "Destroy", &s.call_backoff)),
        }
    }
}

impl Instance for GceInstance {
    fn id(&self) -> InstanceId {
        format!("{}/{}", self.zone, self.name)
    }
    fn provider_type(&self) -> String {
        self.provider_type.clone()
    }
    fn tags(&self) -> InstanceTags {
        self.tags.clone()
    }
    fn address(&self) -> String {
        self.address.clone()
    }
    fn remote_user(&self) -> String {
        self.set.params.admin_username.clone()
    }
    fn set_tags(&self, tags: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(self.save_tags(tags))
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(self.delete())
    }
    fn price_history(&self, _it: &InstanceType) -> Vec<InstancePrice> {
        // GCE has no price call reachable without the billing APIs: the configured Price.
        Vec::new()
    }
    fn verify_host_key(&self, _key: &str) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(async {
            Err(CloudError::new(
                ErrorKind::NotImplemented,
                "GCE: host keys come from the guest attributes, which this driver does not read",
            ))
        })
    }
    fn interruption_notice(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.interruption
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuids_stable_per_seed() {
        let a = request_id("x");
        assert_eq!(a, request_id("x"));
        assert_ne!(a, request_id("y"));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{a}"
        );
        assert!(parts[2].starts_with('4'));
        assert!("89ab".contains(&parts[3][..1]), "{a}");
        let n = vm_name("arvados-", "x");
        assert!(crate::params::is_label_key(&n) && n.len() == 24, "{n}");
    }
}
