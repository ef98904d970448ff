//! `instances …` and `containers …`: the management API from the command line (spec §10.4),
//! against every `Services.DispatchCloud.InternalURLs` entry (or `--url`) with the
//! management token: `--token`, else the file `--token-file`, else `$ARVADOS_MANAGEMENT_TOKEN`,
//! else `ManagementToken` from the config (a token on the command line is visible to every
//! user of the host in `ps`; the file and the variable are not).

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use serde_json::Value;

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Management API base URL [default: every Services.DispatchCloud.InternalURLs entry]
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// Management token [default: --token-file, $ARVADOS_MANAGEMENT_TOKEN, or ManagementToken
    /// from the config]
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Read the management token from this file (surrounding white space is ignored)
    #[arg(long, global = true, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
}

impl Target {
    /// Whether `--url` and a token (flag, file or `$ARVADOS_MANAGEMENT_TOKEN`) are given, so
    /// no config file is needed.
    pub fn needs_no_config(&self) -> bool {
        self.url.is_some()
            && (self.token.is_some()
                || self.token_file.is_some()
                || std::env::var("ARVADOS_MANAGEMENT_TOKEN").is_ok_and(|t| !t.is_empty()))
    }

    /// The token to send: `--token`, `--token-file`, `$ARVADOS_MANAGEMENT_TOKEN`, the config.
    fn token(&self, env: Option<String>, from_config: &str) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--token-file {}", path.display()))?;
            let t = text.trim();
            if t.is_empty() {
                return Err(anyhow!(
                    "--token-file {}: the file is empty",
                    path.display()
                ));
            }
            return Ok(t.to_string());
        }
        if let Some(t) = env.filter(|t| !t.is_empty()) {
            return Ok(t);
        }
        Ok(from_config.to_string())
    }
}

#[derive(Subcommand, Debug)]
pub enum Instances {
    /// One line per instance: instance, address, state, idle-behavior, config-type,
    /// provider-type, price, running-containers (tab-separated)
    List {
        /// Print a header line first
        #[arg(long)]
        header: bool,
        /// Print the API's JSON instead
        #[arg(long)]
        json: bool,
    },
    /// Never start containers on these instances, never shut them down automatically
    Hold { ids: Vec<String> },
    /// Start no new containers on these instances; shut them down when idle
    Drain { ids: Vec<String> },
    /// Return these instances to normal service
    Run { ids: Vec<String> },
    /// Destroy these instances now
    Kill {
        #[arg(long, default_value = "")]
        reason: String,
        ids: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum Containers {
    /// One line per queued/running container in scheduling order: uuid, state, priority,
    /// instance type, scheduling status (tab-separated)
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop a container's crunch-run (SIGTERM until it is gone)
    Kill {
        #[arg(long, default_value = "")]
        reason: String,
        uuid: String,
    },
}

struct Api {
    urls: Vec<String>,
    token: String,
    http: reqwest::Client,
}

impl Api {
    /// The management API at `--url` or the config's URLs; `cluster` is `None` when
    /// [`Target::needs_no_config`].
    fn new(cluster: Option<&arvados::Cluster>, t: &Target) -> anyhow::Result<Api> {
        let urls: Vec<String> = match (&t.url, cluster) {
            (Some(u), _) => vec![u.clone()],
            (None, Some(c)) => c
                .services
                .dispatch_cloud
                .internal_urls
                .keys()
                .cloned()
                .collect(),
            (None, None) => Vec::new(),
        };
        if urls.is_empty() {
            return Err(anyhow!(
                "no Services.DispatchCloud.InternalURLs configured (or give --url)"
            ));
        }
        let token = t.token(
            std::env::var("ARVADOS_MANAGEMENT_TOKEN").ok(),
            cluster.map_or("", |c| c.management_token.as_str()),
        )?;
        if token.is_empty() {
            return Err(anyhow!(
                "no management token: give --token, --token-file or $ARVADOS_MANAGEMENT_TOKEN, or set ManagementToken in the config"
            ));
        }
        Ok(Api {
            urls: urls
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_string())
                .collect(),
            token,
            http: reqwest::Client::builder()
                .danger_accept_invalid_certs(cluster.is_some_and(|c| c.tls.insecure))
                // A dispatcher that accepts and never answers must not hang the command.
                .connect_timeout(std::time::Duration::from_secs(10))
                .timeout(std::time::Duration::from_secs(60))
                .build()?,
        })
    }

    async fn get(&self, url: &str, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{url}{path}"))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}{path}"))?;
        let status = resp.status();
        let body = resp.text().await?;
        if !status.is_success() {
            return Err(anyhow!("GET {url}{path}: {status}: {}", body.trim()));
        }
        serde_json::from_str(&body).with_context(|| format!("GET {url}{path}: decoding response"))
    }

    /// POST an action for each id to each URL until one says 200; returns how many ids never
    /// got a 200.
    async fn post_each(&self, action: &str, key: &str, ids: &[String], reason: &str) -> usize {
        let mut failed = 0;
        for id in ids {
            let mut done = false;
            for url in &self.urls {
                let host = url::Url::parse(url)
                    .ok()
                    .and_then(|u| {
                        u.host_str()
                            .map(|h| format!("{h}:{}", u.port_or_known_default().unwrap_or(0)))
                    })
                    .unwrap_or_else(|| url.clone());
                let query = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair(key, id)
                    .append_pair("reason", reason)
                    .finish();
                let r = self
                    .http
                    .post(format!("{url}/arvados/v1/dispatch/{action}?{query}"))
                    .bearer_auth(&self.token)
                    .send()
                    .await;
                match r {
                    Ok(resp) => {
                        let s = resp.status();
                        eprintln!(
                            "{id}: {} {} ({host})",
                            s.as_u16(),
                            s.canonical_reason().unwrap_or("")
                        );
                        if s.is_success() {
                            done = true;
                            break;
                        }
                    }
                    Err(e) => eprintln!("{id}: {e} ({host})"),
                }
            }
            if !done {
                failed += 1;
            }
        }
        failed
    }
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// `instances …`; returns the exit code.
pub fn instances(
    cluster: Option<&arvados::Cluster>,
    t: &Target,
    cmd: Instances,
) -> anyhow::Result<u8> {
    let api = Api::new(cluster, t)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (action, ids, reason) = match cmd {
            Instances::List { header, json } => {
                if header && !json {
                    println!("instance\taddress\tstate\tidle-behavior\tconfig-type\tprovider-type\tprice\trunning-containers");
                }
                for url in &api.urls {
                    let v = api.get(url, "/arvados/v1/dispatch/instances").await?;
                    let items = v["items"].as_array().cloned().unwrap_or_default();
                    if json {
                        println!("{}", serde_json::to_string_pretty(&items)?);
                        continue;
                    }
                    for i in items {
                        let s = |k: &str| i[k].as_str().unwrap_or("").to_string();
                        let running: Vec<&str> = i["running_container_uuids"]
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        println!(
                            "{}\t{}\t{}\t{}\t{}\t{}\t{:.6}\t{}",
                            dash(&s("instance")),
                            dash(&s("address")),
                            s("worker_state"),
                            s("idle_behavior"),
                            s("arvados_instance_type"),
                            s("provider_instance_type"),
                            i["price"].as_f64().unwrap_or(0.0),
                            dash(&running.join(","))
                        );
                    }
                }
                return Ok(0);
            }
            Instances::Hold { ids } => ("instances/hold", ids, String::new()),
            Instances::Drain { ids } => ("instances/drain", ids, String::new()),
            Instances::Run { ids } => ("instances/run", ids, String::new()),
            Instances::Kill { ids, reason } => ("instances/kill", ids, reason),
        };
        if ids.is_empty() {
            eprintln!("usage error: no instance IDs provided");
            return Ok(2);
        }
        let failed = api.post_each(action, "instance_id", &ids, &reason).await;
        Ok(u8::from(failed > 0))
    })
}

/// `health`: `GET /_health/ping` on each URL; exit 0 only if every dispatcher says OK (a
/// container health check; the token comes as for the other commands).
pub fn health(cluster: Option<&arvados::Cluster>, t: &Target) -> anyhow::Result<u8> {
    let api = Api::new(cluster, t)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut bad = 0;
        for url in &api.urls {
            match api.get(url, "/_health/ping").await {
                Ok(v) if v["health"] == "OK" => println!("{url}: OK"),
                Ok(v) => {
                    println!("{url}: {v}");
                    bad += 1;
                }
                Err(e) => {
                    println!("{url}: {e:#}");
                    bad += 1;
                }
            }
        }
        Ok(u8::from(bad > 0))
    })
}

/// `containers …`; returns the exit code.
pub fn containers(
    cluster: Option<&arvados::Cluster>,
    t: &Target,
    cmd: Containers,
) -> anyhow::Result<u8> {
    let api = Api::new(cluster, t)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        match cmd {
            Containers::List { json } => {
                for url in &api.urls {
                    let v = api.get(url, "/arvados/v1/dispatch/containers").await?;
                    let items = v["items"].as_array().cloned().unwrap_or_default();
                    if json {
                        println!("{}", serde_json::to_string_pretty(&items)?);
                        continue;
                    }
                    for i in items {
                        let c = &i["container"];
                        println!(
                            "{}\t{}\t{}\t{}\t{}",
                            c["uuid"].as_str().unwrap_or(""),
                            c["state"].as_str().unwrap_or(""),
                            c["priority"],
                            i["instance_types"][0]["ProviderType"]
                                .as_str()
                                .unwrap_or("-"),
                            dash(i["scheduling_status"].as_str().unwrap_or(""))
                        );
                    }
                }
                Ok(0)
            }
            Containers::Kill { uuid, reason } => {
                let failed = api
                    .post_each("containers/kill", "container_uuid", &[uuid], &reason)
                    .await;
                Ok(u8::from(failed > 0))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comes_from_flag_then_file_then_environment_then_config() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  from-file\n").unwrap();
        let t = |token: Option<&str>, token_file: Option<&std::path::Path>| Target {
            url: None,
            token: token.map(str::to_string),
            token_file: token_file.map(|p| p.to_path_buf()),
        };
        let env = || Some("from-env".to_string());
        assert_eq!(
            t(Some("flag"), Some(&file)).token(env(), "cfg").unwrap(),
            "flag"
        );
        assert_eq!(
            t(None, Some(&file)).token(env(), "cfg").unwrap(),
            "from-file"
        );
        assert_eq!(t(None, None).token(env(), "cfg").unwrap(), "from-env");
        assert_eq!(
            t(None, None).token(Some(String::new()), "cfg").unwrap(),
            "cfg"
        );
        assert_eq!(t(None, None).token(None, "cfg").unwrap(), "cfg");
        let missing = dir.path().join("nope");
        let err = t(None, Some(&missing)).token(None, "cfg").unwrap_err();
        assert!(format!("{err:#}").contains("--token-file"), "{err:#}");
        std::fs::write(&file, "\n").unwrap();
        let err = t(None, Some(&file)).token(None, "cfg").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
