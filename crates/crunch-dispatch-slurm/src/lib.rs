//! crunch-dispatch-slurm: runs Arvados containers as Slurm batch jobs, built on the
//! `dispatch` library. A drop-in replacement for Arvados' Go `crunch-dispatch-slurm`: the same
//! config keys, sbatch command line and batch script, job names, nice-based ordering,
//! cancellation and adoption of jobs left by a previous dispatcher.
//!
//! * [`template`]: the sbatch argv from `SbatchArgumentsList` (pure).
//! * [`script`]: the batch script that execs crunch-run (pure).
//! * [`priority`]: Arvados priority → desired order → nice values (pure).
//! * [`slurm`]: the Slurm commands, each with a deadline.
//! * [`squeue`]: the squeue checker (job snapshots, renicing).
//! * [`runner`]: the per-container run function and the orphan sweep.
//! * [`legacy`]: the pre-2019 per-component config file.
//!
//! Where Arvados' behaviour is a known bug (the specification's "known bugs" list) this
//! does better, and each fix has a test named after it: a job Slurm can never start is
//! reported and eventually cancelled; only an squeue started after a submission decides
//! whether the job exists; Slurm commands and squeue waits have deadlines; a template typo
//! is refused at startup; the pending reason is kept whole; a failed token lookup is logged
//! and exits non-zero.

pub mod http;
pub mod legacy;
pub mod priority;
pub mod runner;
pub mod script;
pub mod slurm;
pub mod squeue;
pub mod template;

use arvados::config::Cluster;

/// The environment every job inherits from sbatch (Slurm's default `--export=ALL`), on top
/// of the dispatcher's own: the API host (host part; a non-https scheme is kept, for test
/// clusters), the system root token, `ARVADOS_API_HOST_INSECURE` (`1` or empty), and every
/// `Containers.SLURM.SbatchEnvironmentVariables` entry. Arvados writes these into its own
/// process environment; passing them to the commands has the same effect on jobs.
pub fn job_environment(cluster: &Cluster) -> Vec<(String, String)> {
    let mut env = Vec::new();
    if let Ok(u) = url::Url::parse(&cluster.services.controller.external_url) {
        let mut host = u.host_str().unwrap_or_default().to_string();
        if let Some(p) = u.port() {
            host = format!("{host}:{p}");
        }
        if u.scheme() != "https" {
            host = format!("{}://{host}", u.scheme());
        }
        env.push(("ARVADOS_API_HOST".to_string(), host));
    }
    env.push((
        "ARVADOS_API_TOKEN".to_string(),
        cluster.system_root_token.clone(),
    ));
    env.push((
        "ARVADOS_API_HOST_INSECURE".to_string(),
        if cluster.tls.insecure { "1" } else { "" }.to_string(),
    ));
    for (k, v) in &cluster.containers.slurm.sbatch_environment_variables {
        env.push((k.clone(), v.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ac_slurm_13_legacy_keep_services_reach_the_jobs() {
        let mut c = Cluster::default();
        legacy::apply(
            &mut c,
            "Client:\n  APIHost: example.com\n  AuthToken: abcdefg\n  KeepServiceURIs: [\"https://example.com/keep1\", \"https://example.com/keep2\"]\n",
            "legacy.yml",
        )
        .unwrap();
        let env = job_environment(&c);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("ARVADOS_KEEP_SERVICES"),
            Some("https://example.com/keep1 https://example.com/keep2")
        );
        assert_eq!(get("ARVADOS_API_HOST"), Some("example.com"));
        assert_eq!(get("ARVADOS_API_TOKEN"), Some("abcdefg"));
        assert_eq!(get("ARVADOS_API_HOST_INSECURE"), Some(""));
    }
}
