//! The EC2 instance set over `aws-sdk-ec2` (spec §3.2–3.7): RunInstances with subnet
//! fail-over, DescribeInstances with tag filters and paging, CreateTags, TerminateInstances,
//! key-pair lookup and import, spot price history, and the driver's two metrics. SDK retries
//! are off: the dispatcher does its own back-off, and a retried RunInstances would hide a
//! capacity error.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::SystemTime;

use arvados::InstanceType;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region, retry::RetryConfig};
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceLifecycleType, InstanceMarketOptionsRequest,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceStateName, MarketType, ResourceType,
    ShutdownBehavior, SpotMarketOptions, Tag, TagSpecification, VolumeType,
};
use cloud::metrics::ProviderMetrics;
use cloud::{
    BoxFuture, CloudError, CreateRequest, Driver, Instance, InstanceId, InstancePrice, InstanceSet,
    InstanceSetId, InstanceTags,
};
use serde_json::Value;
use tokio::sync::OnceCell;

use crate::errors::{ApiError, Backoff, capacity_kind, classify, is_subnet_specific};
use crate::params::Ec2Params;

/// The `ClientToken` of one RunInstances call: derived from the create request's init command,
/// which holds the new VM's unique instance secret, and the subnet's index (at most 64 ASCII
/// characters, as EC2 requires).
fn client_token(init_command: &str, subnet_index: usize) -> String {
    let h = cloud::tags::stable_hash(init_command, (0, 0));
    format!("arvados-{h:016x}-{subnet_index}")
}

/// The EC2 driver.
#[derive(Default)]
pub struct Ec2Driver;

impl Driver for Ec2Driver {
    fn instance_set(
        &self,
        params: &Value,
        id: &InstanceSetId,
        _shared_tags: &InstanceTags,
    ) -> Result<Arc<dyn InstanceSet>, CloudError> {
        Ok(Arc::new(Ec2Set::new(
            Ec2Params::from_params(params)?,
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
        Ok(Arc::new(Ec2Set::new(
            Ec2Params::from_params(params)?,
            id,
            Some(registry),
        )?))
    }
}

/// Spot price history cache key: (instance type, availability zone).
type SpotKey = (String, String);

/// The EC2 instance set.
pub struct Ec2Set {
    params: Ec2Params,
    client: OnceCell<Client>,
    create_backoff: Backoff,
    list_backoff: Backoff,
    subnet_index: AtomicUsize,
    key_names: Mutex<HashMap<String, String>>,
    metrics: ProviderMetrics,
    spot: Mutex<HashMap<SpotKey, (SystemTime, Vec<InstancePrice>)>>,
    /// Ask for the spot requests' status at each list ([`InstanceSet::watch_interruptions`]).
    watch_interruptions: AtomicBool,
}

/// Spot request status codes that announce the instance's interruption (AWS: "Spot request
/// status", the codes of an instance about to be taken back).
const INTERRUPTION_CODES: [&str; 3] = [
    "marked-for-termination",
    "marked-for-stop",
    "marked-for-hibernation",
];

fn api_error<E: ProvideErrorMetadata>(e: &E) -> Option<ApiError> {
    e.code().map(|c| ApiError {
        code: c.to_string(),
        message: e.message().unwrap_or_default().to_string(),
    })
}

fn text<E: std::error::Error>(e: &E) -> String {
    aws_sdk_ec2::error::DisplayErrorContext(e).to_string()
}

impl Ec2Set {
    pub fn new(
        params: Ec2Params,
        _id: &InstanceSetId,
        registry: Option<&prometheus::Registry>,
    ) -> Result<Ec2Set, CloudError> {
        // No subnet configured: one series for "AWS chooses".
        let places = if params.subnet_ids.is_empty() {
            vec![String::new()]
        } else {
            params.subnet_ids.clone()
        };
        let metrics = ProviderMetrics::new("ec2", "subnet_id", &places, registry)
            .map_err(|e| CloudError::other(format!("registering EC2 metrics: {e}")))?;
        Ok(Ec2Set {
            params,
            client: OnceCell::new(),
            create_backoff: Backoff::default(),
            list_backoff: Backoff::default(),
            subnet_index: AtomicUsize::new(0),
            key_names: Mutex::new(HashMap::new()),
            metrics,
            spot: Mutex::new(HashMap::new()),
            watch_interruptions: AtomicBool::new(false),
        })
    }

    /// The SDK client: static credentials if configured, else the default chain; the
    /// configured region and endpoint; no retries.
    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let p = &self.params;
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .retry_config(RetryConfig::disabled())
                    .region(Region::new(p.region.clone()));
                if !p.access_key_id.is_empty() || !p.secret_access_key.is_empty() {
                    loader = loader.credentials_provider(Credentials::new(
                        p.access_key_id.clone(),
                        p.secret_access_key.clone(),
                        None,
                        None,
                        "arvados-config",
                    ));
                }
                if let Some(e) = &p.endpoint {
                    loader = loader.endpoint_url(e.clone());
                }
                Client::new(&loader.load().await)
            })
            .await
    }

    /// The key pair to launch with, imported if AWS does not have it yet (§3.4).
    async fn key_name(&self, public_key: &str) -> Result<String, CloudError> {
        let key = russh::keys::PublicKey::from_openssh(public_key.trim())
            .map_err(|e| CloudError::other(format!("Could not make key fingerprint: {e}")))?;
        let fps = crate::fingerprint::fingerprints(&key)
            .map_err(|e| CloudError::other(format!("Could not make key fingerprint: {e}")))?;
        if let Some(name) = self.key_names.lock().get(&fps[0]) {
            return Ok(name.clone());
        }
        let client = self.client().await;
        let found = client
            .describe_key_pairs()
            .filters(
                Filter::builder()
                    .name("fingerprint")
                    .set_values(Some(fps.clone()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| {
                CloudError::other(format!("Could not search for keypair: {}", text(&e)))
            })?;
        let name = match found.key_pairs().iter().find_map(|k| k.key_name()) {
            Some(n) => n.to_string(),
            None => {
                let name = format!("arvados-dispatch-keypair-{}", fps[0]);
                client
                    .import_key_pair()
                    .key_name(&name)
                    .public_key_material(aws_sdk_ec2::primitives::Blob::new(
                        public_key.trim().as_bytes(),
                    ))
                    .send()
                    .await
                    .map_err(|e| {
                        CloudError::other(format!("Could not import keypair: {}", text(&e)))
                    })?;
                name
            }
        };
        // Better than Go (§13.4): a pre-existing key pair is cached too.
        self.key_names.lock().insert(fps[0].clone(), name.clone());
        Ok(name)
    }

    async fn run_instance(
        &self,
        it: &InstanceType,
        req: &CreateRequest,
    ) -> Result<Arc<dyn Instance>, CloudError> {
        use base64::Engine;
        let p = &self.params;
        let key_name = match &req.public_key {
            Some(k) => Some(self.key_name(k).await?),
            None => None,
        };
        let tags: Vec<Tag> = req
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let user_data = base64::engine::general_purpose::STANDARD
            .encode(format!("#!/bin/sh\n{}\n", req.init_command));
        let subnets: Vec<Option<&String>> = if p.subnet_ids.is_empty() {
            vec![None]
        } else {
            p.subnet_ids.iter().map(Some).collect()
        };
        // The subnets to try, in order: the pinned one only (the pool keeps capacity per
        // subnet and chose it), or every one from the last that worked (Arvados).
        let pinned = req.zone.is_some();
        let tries: Vec<usize> = match &req.zone {
            Some(z) => match p.subnet_ids.iter().position(|s| s == z) {
                Some(i) => vec![i],
                None => {
                    return Err(CloudError::other(format!(
                        "create pinned to {z}, which is not one of the configured SubnetIDs"
                    )));
                }
            },
            None => {
                let start = self.subnet_index.load(Ordering::SeqCst) % subnets.len();
                (0..subnets.len())
                    .map(|o| (start + o) % subnets.len())
                    .collect()
            }
        };
        let n = tries.len();
        let client = self.client().await;
        let mut remembered: Option<(Option<ApiError>, String, bool)> = None;
        for (offset, idx) in tries.into_iter().enumerate() {
            let subnet = subnets[idx];
            let mut nic = InstanceNetworkInterfaceSpecification::builder()
                .device_index(0)
                .associate_public_ip_address(false)
                .delete_on_termination(true)
                .set_groups(Some(p.security_group_ids.clone()));
            if let Some(s) = subnet {
                nic = nic.subnet_id(s);
            }
            let mut call = client
                .run_instances()
                .image_id(&req.image_id)
                .instance_type(it.provider_type.as_str().into())
                .min_count(1)
                .max_count(1)
                .network_interfaces(nic.build())
                .disable_api_termination(false)
                .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
                .tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::Instance)
                        .set_tags(Some(tags.clone()))
                        .build(),
                )
                .metadata_options(
                    InstanceMetadataOptionsRequest::builder()
                        .http_endpoint(InstanceMetadataEndpointState::Enabled)
                        .http_tokens(HttpTokensState::Required)
                        .build(),
                )
                .user_data(&user_data)
                .set_key_name(key_name.clone())
                // Idempotency: a RunInstances retried after an unknown outcome (by the SDK
                // or a proxy) makes no second VM. One token per create request and subnet
                // (another subnet is another request to EC2).
                .client_token(client_token(&req.init_command, idx));
            if it.added_scratch > 0 {
                let gib = (it.added_scratch + (1 << 30) - 1) >> 30;
                call = call.block_device_mappings(
                    BlockDeviceMapping::builder()
                        .device_name("/dev/xvdt")
                        .ebs(
                            EbsBlockDevice::builder()
                                .delete_on_termination(true)
                                .volume_size(gib as i32)
                                .volume_type(VolumeType::from(p.ebs_volume_type.as_str()))
                                .build(),
                        )
                        .build(),
                );
            }
            if it.preemptible {
                call = call.instance_market_options(
                    InstanceMarketOptionsRequest::builder()
                        .market_type(MarketType::Spot)
                        .spot_options(
                            SpotMarketOptions::builder()
                                .instance_interruption_behavior(
                                    InstanceInterruptionBehavior::Terminate,
                                )
                                .max_price(format!("{}", it.price))
                                .build(),
                        )
                        .build(),
                );
            }
            if !p.iam_instance_profile.is_empty() {
                call = call.iam_instance_profile(
                    IamInstanceProfileSpecification::builder()
                        .name(&p.iam_instance_profile)
                        .build(),
                );
            }
            let result = call.send().await;
            let label = subnet.map(String::as_str).unwrap_or("");
            self.metrics.count_start(label, result.is_ok());
            match result {
                Ok(out) => {
                    if !pinned {
                        self.subnet_index.store(idx, Ordering::SeqCst);
                    }
                    self.create_backoff.reset();
                    let Some(inst) = out.instances().first() else {
                        return Err(CloudError::other("RunInstances returned no instance"));
                    };
                    return Ok(Arc::new(Ec2Instance::new(self, inst, client.clone())));
                }
                Err(e) => {
                    let api = api_error(&e);
                    let msg = text(&e);
                    let capacity = api.as_ref().and_then(capacity_kind).is_some();
                    if capacity || !remembered.as_ref().is_some_and(|r| r.2) {
                        remembered = Some((api.clone(), msg, capacity));
                    }
                    if is_subnet_specific(api.as_ref()) && offset + 1 < n {
                        tracing::warn!(SubnetID = %label, error = %text(&e), "RunInstances failed, trying next subnet");
                        continue;
                    }
                    if !pinned {
                        self.subnet_index.store(idx, Ordering::SeqCst);
                    }
                    break;
                }
            }
        }
        let (api, msg, _) = remembered.unwrap_or((None, "RunInstances: no attempt".into(), false));
        let mut err = classify(api.as_ref(), &msg, &self.create_backoff);
        // No answer, or EC2's own failure: the instance may exist (the pool waits for the
        // instance list to say).
        err.outcome_unknown = crate::errors::outcome_unknown(api.as_ref());
        err.zone_specific = is_subnet_specific(api.as_ref());
        Err(err)
    }

    async fn list(&self, filter: &InstanceTags) -> Result<Vec<Arc<dyn Instance>>, CloudError> {
        let client = self.client().await;
        let mut raw: Vec<aws_sdk_ec2::types::Instance> = Vec::new();
        let mut per_subnet: BTreeMap<String, f64> = BTreeMap::new();
        for s in &self.params.subnet_ids {
            per_subnet.insert(s.clone(), 0.0);
        }
        per_subnet.insert(String::new(), 0.0);
        let mut spot_seen: Vec<(String, String)> = Vec::new();
        let mut call = client.describe_instances();
        for (k, v) in filter {
            call = call.filters(Filter::builder().name(format!("tag:{k}")).values(v).build());
        }
        // The SDK's paginator follows NextToken (and stops if a token repeats).
        let mut pages = call.into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    return Err(classify(
                        api_error(&e).as_ref(),
                        &text(&e),
                        &self.list_backoff,
                    ));
                }
            };
            for r in page.reservations() {
                for inst in r.instances() {
                    let state = inst.state().and_then(|s| s.name());
                    if matches!(
                        state,
                        Some(InstanceStateName::ShuttingDown) | Some(InstanceStateName::Terminated)
                    ) {
                        continue;
                    }
                    *per_subnet
                        .entry(inst.subnet_id().unwrap_or("").to_string())
                        .or_default() += 1.0;
                    if inst.instance_lifecycle() == Some(&InstanceLifecycleType::Spot) {
                        spot_seen.push((
                            inst.instance_type()
                                .map(|t| t.as_str().to_string())
                                .unwrap_or_default(),
                            inst.placement()
                                .and_then(|p| p.availability_zone())
                                .unwrap_or("")
                                .to_string(),
                        ));
                    }
                    raw.push(inst.clone());
                }
            }
        }
        self.list_backoff.reset();
        for (subnet, n) in per_subnet {
            self.metrics.instances.with_label_values(&[&subnet]).set(n);
        }
        if !spot_seen.is_empty() && !self.params.spot_price_update_interval.is_zero() {
            self.refresh_spot_prices(client, &spot_seen).await;
        }
        let notices = if self.watch_interruptions.load(Ordering::Relaxed) {
            let spot: Vec<String> = raw
                .iter()
                .filter(|i| i.instance_lifecycle() == Some(&InstanceLifecycleType::Spot))
                .filter_map(|i| i.instance_id().map(str::to_string))
                .collect();
            self.interruption_notices(client, spot).await
        } else {
            HashMap::new()
        };
        Ok(raw
            .iter()
            .map(|inst| {
                let mut i = Ec2Instance::new(self, inst, client.clone());
                i.interruption = notices.get(&i.id).copied();
                Arc::new(i) as Arc<dyn Instance>
            })
            .collect())
    }

    /// Instance id → when EC2 announced its interruption, for these spot instances (their
    /// spot requests, by the `instance-id` filter). A failed call (say the IAM policy lacks
    /// `ec2:DescribeSpotInstanceRequests`) is logged and reads as no notices: the list
    /// itself stands.
    async fn interruption_notices(
        &self,
        client: &Client,
        instances: Vec<String>,
    ) -> HashMap<String, chrono::DateTime<chrono::Utc>> {
        let mut out = HashMap::new();
        for chunk in instances.chunks(100) {
            let answer = client
                .describe_spot_instance_requests()
                .filters(
                    Filter::builder()
                        .name("instance-id")
                        .set_values(Some(chunk.to_vec()))
                        .build(),
                )
                .send()
                .await;
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %text(&e), "DescribeSpotInstanceRequests failed; no spot interruption notices from EC2 this time");
                    return out;
                }
            };
            for r in answer.spot_instance_requests() {
                let (Some(id), Some(status)) = (r.instance_id(), r.status()) else {
                    continue;
                };
                if !INTERRUPTION_CODES.contains(&status.code().unwrap_or_default()) {
                    continue;
                }
                let at = status
                    .update_time()
                    .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), t.subsec_nanos()))
                    .unwrap_or_else(chrono::Utc::now);
                out.insert(id.to_string(), at);
            }
        }
        out
    }

    /// Refresh the spot price cache for the (type, zone) pairs in use (§3.7).
    async fn refresh_spot_prices(&self, client: &Client, seen: &[(String, String)]) {
        let interval = self.params.spot_price_update_interval;
        let now = SystemTime::now();
        let stale = {
            let cache = self.spot.lock();
            seen.iter().any(|k| {
                cache
                    .get(k)
                    .is_none_or(|(t, _)| now.duration_since(*t).unwrap_or_default() >= interval)
            })
        };
        if !stale {
            return;
        }
        let mut types: Vec<String> = seen.iter().map(|(t, _)| t.clone()).collect();
        types.sort();
        types.dedup();
        let since = now - interval * 3;
        let mut fresh: HashMap<SpotKey, Vec<InstancePrice>> = HashMap::new();
        let mut pages = client
            .describe_spot_price_history()
            .start_time(aws_sdk_ec2::primitives::DateTime::from(since))
            .filters(
                Filter::builder()
                    .name("instance-type")
                    .set_values(Some(types.clone()))
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("product-description")
                    .values("Linux/UNIX")
                    .build(),
            )
            .into_paginator()
            .send();
        while let Some(r) = pages.next().await {
            let page = match r {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %text(&e), "error retrieving spot instance prices");
                    break;
                }
            };
            for sp in page.spot_price_history() {
                let (Some(t), Some(price), Some(ts)) =
                    (sp.instance_type(), sp.spot_price(), sp.timestamp())
                else {
                    continue;
                };
                let Ok(price) = price.parse::<f64>() else {
                    continue;
                };
                let Ok(st) = SystemTime::try_from(*ts) else {
                    continue;
                };
                let key = (
                    t.as_str().to_string(),
                    sp.availability_zone().unwrap_or("").to_string(),
                );
                fresh.entry(key).or_default().push(InstancePrice {
                    start_time: st.into(),
                    price,
                });
            }
        }
        let mut cache = self.spot.lock();
        for (k, mut prices) in fresh {
            let entry = cache.entry(k).or_insert((now, Vec::new()));
            entry.1.append(&mut prices);
            entry.1 = cloud::price::normalize_price_history(&entry.1);
            entry.0 = now;
        }
        for k in seen {
            cache.entry(k.clone()).or_insert((now, Vec::new())).0 = now;
        }
        cache.retain(|_, (t, _)| now.duration_since(*t).unwrap_or_default() < interval * 64);
    }
}

/// One EC2 instance, as last listed.
pub struct Ec2Instance {
    id: String,
    provider_type: String,
    tags: InstanceTags,
    address: String,
    user: String,
    client: Client,
    /// Spot prices of its type in its zone as of the list (empty for on-demand instances).
    spot_prices: Vec<InstancePrice>,
    ebs_price: f64,
    /// When EC2 announced its interruption, as of the list (with `watch_interruptions`).
    interruption: Option<chrono::DateTime<chrono::Utc>>,
}

impl std::fmt::Debug for Ec2Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2Instance").field("id", &self.id).finish()
    }
}

impl Ec2Instance {
    fn new(set: &Ec2Set, inst: &aws_sdk_ec2::types::Instance, client: Client) -> Ec2Instance {
        let provider_type = inst
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default();
        let zone = inst
            .placement()
            .and_then(|p| p.availability_zone())
            .unwrap_or("")
            .to_string();
        let spot = inst.instance_lifecycle() == Some(&InstanceLifecycleType::Spot);
        let spot_prices = if spot {
            set.spot
                .lock()
                .get(&(provider_type.clone(), zone))
                .map(|(_, p)| p.clone())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Ec2Instance {
            id: inst.instance_id().unwrap_or("").to_string(),
            provider_type,
            tags: inst
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
                .collect(),
            address: inst.private_ip_address().unwrap_or("").to_string(),
            user: set.params.admin_username.clone(),
            client,
            spot_prices,
            ebs_price: set.params.ebs_price,
            interruption: None,
        }
    }
}

impl Instance for Ec2Instance {
    fn id(&self) -> InstanceId {
        self.id.clone()
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
        self.user.clone()
    }
    fn set_tags(&self, tags: InstanceTags) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(async move {
            let tags: Vec<Tag> = tags
                .iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect();
            self.client
                .create_tags()
                .resources(&self.id)
                .set_tags(Some(tags))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| CloudError::other(text(&e)))
        })
    }
    fn destroy(&self) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(async move {
            self.client
                .terminate_instances()
                .instance_ids(&self.id)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| CloudError::other(text(&e)))
        })
    }
    /// Spot prices plus the hourly cost of the added EBS scratch volume (§3.7).
    fn price_history(&self, it: &InstanceType) -> Vec<InstancePrice> {
        let gib = ((it.added_scratch + (1 << 30) - 1) >> 30) as f64;
        let ebs = self.ebs_price * gib / 30.0 / 24.0;
        self.spot_prices
            .iter()
            .map(|p| InstancePrice {
                start_time: p.start_time,
                price: p.price + ebs,
            })
            .collect()
    }
    /// EC2 cannot tell us a VM's host key: the instance secret proves identity instead.
    fn verify_host_key(&self, _key: &str) -> BoxFuture<'_, Result<(), CloudError>> {
        Box::pin(async { Err(CloudError::not_implemented()) })
    }
    fn interruption_notice(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.interruption
    }
}

impl InstanceSet for Ec2Set {
    fn create(
        &self,
        it: &InstanceType,
        req: CreateRequest,
    ) -> BoxFuture<'_, Result<Arc<dyn Instance>, CloudError>> {
        let it = it.clone();
        Box::pin(async move { self.run_instance(&it, &req).await })
    }
    fn instances(
        &self,
        filter: &InstanceTags,
    ) -> BoxFuture<'_, Result<Vec<Arc<dyn Instance>>, CloudError>> {
        let filter = filter.clone();
        Box::pin(async move { self.list(&filter).await })
    }
    fn instance_quota_group(&self, it: &InstanceType) -> String {
        crate::quota_group::quota_group(
            &it.provider_type,
            it.preemptible,
            &self.params.instance_type_quota_groups,
        )
    }
    fn watch_interruptions(&self) {
        self.watch_interruptions.store(true, Ordering::Relaxed);
    }
    /// The subnets, when there is a choice (`SubnetID` a list of more than one).
    fn zones(&self) -> Vec<String> {
        match &self.params.subnet_ids {
            ids if ids.len() > 1 => ids.clone(),
            _ => Vec::new(),
        }
    }
    fn stop(&self) {}
}
