//! The sbatch command line: `--nice=10000 --no-requeue` and then the operator's
//! `SbatchArgumentsList` template (plus `SbatchGPUArgumentsList` for GPU containers), each
//! element expanded with the container's numbers. Pure functions; no I/O.

use arvados::config::Cluster;
use arvados::types::Container;
use dispatch::RunError;
use dispatchcloud::node_size::{ChooseError, TypeChooser, estimate_scratch_space};

const MIB: i128 = 1 << 20;

/// The arguments every job gets first: a nice value that leaves room to raise the job's
/// priority later without negative nice, and no requeue by Slurm (Arvados decides reruns).
pub const FIXED_ARGS: [&str; 2] = ["--nice=10000", "--no-requeue"];

/// The values the `%` codes stand for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Values {
    /// `%U`
    pub uuid: String,
    /// `%C`
    pub vcpus: i64,
    /// `%M`, MiB
    pub mem_mib: i64,
    /// `%T`, MiB
    pub tmp_mib: i64,
    /// `%G`
    pub gpus: i64,
    /// `%W`, minutes (0: no limit, the element is omitted)
    pub max_run_minutes: i64,
    /// `%P` (empty: the element is omitted)
    pub partitions: String,
    /// `%I` (empty when no instance types are configured)
    pub instance_type: String,
}

fn ceil_mib(bytes: i128) -> i64 {
    let mib = (bytes.max(0) + MIB - 1) / MIB;
    i64::try_from(mib).unwrap_or(i64::MAX)
}

/// A `Type "name": …` line of a ConstraintsNotSatisfiable report.
fn type_line(it: &arvados::InstanceType) -> String {
    format!(
        "Type {:?}: {} VCPUs, {} RAM, {} Scratch, {:.6} Price",
        it.name,
        it.vcpus,
        byte_size(it.ram),
        byte_size(it.scratch),
        it.price
    )
}

/// Bytes as Arvados prints a size: the largest binary unit that divides it exactly.
pub fn byte_size(n: i64) -> String {
    const UNITS: [(&str, i64); 5] = [
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    if n != 0 {
        for (name, size) in UNITS {
            if n % size == 0 {
                return format!("{}{name}", n / size);
            }
        }
    }
    n.to_string()
}

/// The `%` values for a container. Instance-type choice runs whenever types are configured
/// (as Arvados does), and its ConstraintsNotSatisfiable error ends the submission.
pub fn values(cluster: &Cluster, chooser: &TypeChooser, c: &Container) -> Result<Values, RunError> {
    let rc = &c.runtime_constraints;
    let ram = i128::from(rc.ram)
        + i128::from(rc.keep_cache_ram)
        + i128::from(cluster.containers.reserve_extra_ram);
    let instance_type = if cluster.instance_types.is_empty() {
        String::new()
    } else {
        match chooser.choose(c) {
            Ok(types) => types.first().map(|t| t.name.clone()).unwrap_or_default(),
            Err(ChooseError::NoInstanceTypes) => String::new(),
            Err(ChooseError::ConstraintsNotSatisfiable {
                message,
                available_types,
            }) => {
                return Err(RunError::ConstraintsNotSatisfiable {
                    message,
                    available: available_types.iter().map(type_line).collect(),
                });
            }
        }
    };
    let max_run = c.scheduling_parameters.max_run_time.max(0);
    Ok(Values {
        uuid: c.uuid.clone(),
        vcpus: rc.vcpus,
        mem_mib: ceil_mib(ram),
        tmp_mib: ceil_mib(i128::from(estimate_scratch_space(c))),
        gpus: rc.gpu.device_count,
        max_run_minutes: (max_run + 59) / 60,
        partitions: c.scheduling_parameters.partitions.join(","),
        instance_type,
    })
}

/// Why a template cannot be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Unknown substitution parameter %{0} in SbatchArgumentsList or SbatchGPUArgumentsList")]
pub struct UnknownCode(pub char);

/// One template element expanded; `None` when it must be left out (`%W` of 0 or an empty
/// `%P`). Every unknown code is an error; Arvados names the last one in the element, and so
/// does this.
pub fn expand(element: &str, v: &Values) -> Result<Option<String>, UnknownCode> {
    let mut out = String::with_capacity(element.len());
    let mut omit = false;
    let mut unknown = None;
    let mut chars = element.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        match chars.peek().copied() {
            None | Some('\n') => out.push('%'),
            Some(code) => {
                chars.next();
                match code {
                    '%' => out.push('%'),
                    'U' => out.push_str(&v.uuid),
                    'C' => out.push_str(&v.vcpus.to_string()),
                    'M' => out.push_str(&v.mem_mib.to_string()),
                    'T' => out.push_str(&v.tmp_mib.to_string()),
                    'G' => out.push_str(&v.gpus.to_string()),
                    'W' => {
                        omit |= v.max_run_minutes == 0;
                        out.push_str(&v.max_run_minutes.to_string());
                    }
                    'P' => {
                        omit |= v.partitions.is_empty();
                        out.push_str(&v.partitions);
                    }
                    'I' => out.push_str(&v.instance_type),
                    other => unknown = Some(other),
                }
            }
        }
    }
    match unknown {
        Some(c) => Err(UnknownCode(c)),
        None => Ok((!omit).then_some(out)),
    }
}

/// Check a template once at startup (Arvados finds a typo only per container, at submit time,
/// and then fails every container until each is cancelled).
pub fn validate(template: &[String]) -> Result<(), UnknownCode> {
    let v = Values::default();
    template.iter().try_for_each(|e| expand(e, &v).map(|_| ()))
}

/// The whole sbatch argv after the program name.
pub fn sbatch_args(
    template: &[String],
    gpu_template: &[String],
    v: &Values,
) -> Result<Vec<String>, UnknownCode> {
    let mut args: Vec<String> = FIXED_ARGS.iter().map(|a| a.to_string()).collect();
    let gpu: &[String] = if v.gpus > 0 { gpu_template } else { &[] };
    for element in template.iter().chain(gpu) {
        if let Some(a) = expand(element, v)? {
            args.push(a);
        }
    }
    Ok(args)
}

/// `values` and `sbatch_args` together, as the runner needs them.
pub fn sbatch_args_for(
    cluster: &Cluster,
    chooser: &TypeChooser,
    c: &Container,
) -> Result<Vec<String>, RunError> {
    let v = values(cluster, chooser, c)?;
    let slurm = &cluster.containers.slurm;
    sbatch_args(
        &slurm.sbatch_arguments_list,
        &slurm.sbatch_gpu_arguments_list,
        &v,
    )
    .map_err(|e| RunError::Other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arvados::InstanceType;
    use arvados::types::Mount;

    fn cluster(template: Option<&[&str]>) -> Cluster {
        let mut c = Cluster::default();
        c.containers.reserve_extra_ram = 550 << 20;
        if let Some(t) = template {
            c.containers.slurm.sbatch_arguments_list = t.iter().map(|s| s.to_string()).collect();
        }
        c
    }

    /// Upstream's small container: uuid `123`, 250 000 000 bytes, 2 VCPUs, priority 1.
    fn small() -> Container {
        let mut c = Container {
            uuid: "123".into(),
            priority: 1,
            ..Default::default()
        };
        c.runtime_constraints.ram = 250_000_000;
        c.runtime_constraints.vcpus = 2;
        c
    }

    fn args(cluster: &Cluster, c: &Container) -> Result<Vec<String>, RunError> {
        sbatch_args_for(cluster, &TypeChooser::new(cluster), c)
    }

    fn words(s: &str) -> Vec<String> {
        s.split(' ').map(String::from).collect()
    }

    #[test]
    fn ac_slurm_3_default_template_for_the_fixture_container() {
        let cl = cluster(None);
        let mut c = Container {
            uuid: "zzzzz-dz642-queuedcontainer".into(),
            container_image: "test".into(),
            ..Default::default()
        };
        c.runtime_constraints.ram = 12_000_000_000;
        c.runtime_constraints.vcpus = 4;
        for name in ["/tmp", "/var/spool/cwl"] {
            c.mounts.insert(
                name.into(),
                Mount {
                    kind: "tmp".into(),
                    capacity: 24_000_000_000,
                    ..Default::default()
                },
            );
        }
        assert_eq!(
            args(&cl, &c).unwrap(),
            words(
                "--nice=10000 --no-requeue --job-name=zzzzz-dz642-queuedcontainer --mem=11995 --cpus-per-task=4 --tmp=45777"
            )
        );
    }

    #[test]
    fn ac_slurm_6_template_passthrough() {
        let fixed = words("--nice=10000 --no-requeue");
        let mut cl = cluster(None);
        cl.containers.slurm.sbatch_arguments_list = Vec::new();
        assert_eq!(args(&cl, &small()).unwrap(), fixed);
        // A YAML null is an empty list too.
        let null: arvados::config::Slurm =
            serde_norway::from_str("SbatchArgumentsList: null\n").unwrap();
        cl.containers.slurm = null;
        assert_eq!(args(&cl, &small()).unwrap(), fixed);
        let cl = cluster(Some(&["--arg1=v1", "--arg2"]));
        assert_eq!(
            args(&cl, &small()).unwrap(),
            words("--nice=10000 --no-requeue --arg1=v1 --arg2")
        );
    }

    #[test]
    fn ac_slurm_7_gpu_arguments_follow_the_template() {
        let mut cl = cluster(None);
        let mut t = vec!["--account=accountname".to_string()];
        t.extend(cl.containers.slurm.sbatch_arguments_list.clone());
        cl.containers.slurm.sbatch_arguments_list = t;
        cl.containers.slurm.sbatch_gpu_arguments_list =
            vec!["--gpus=%G".into(), "--partition=gpupartition".into()];
        let mut c = small();
        c.runtime_constraints.gpu.device_count = 3;
        assert_eq!(
            args(&cl, &c).unwrap(),
            words(
                "--nice=10000 --no-requeue --account=accountname --job-name=123 --mem=789 --cpus-per-task=2 --tmp=0 --gpus=3 --partition=gpupartition"
            )
        );
        // No GPUs wanted: no GPU arguments.
        assert!(
            !args(&cl, &small())
                .unwrap()
                .iter()
                .any(|a| a.starts_with("--gpus"))
        );
    }

    fn types(names: &[&str]) -> Cluster {
        let mut cl = cluster(Some(&["--constraint=instancetype=%I"]));
        let all = [
            ("a1.tiny", 0.02, 128_000_000, 1),
            ("a1.small", 0.04, 256_000_000, 2),
            ("a1.medium", 0.08, 512_000_000, 4),
            ("a1.large", 0.16, 1_024_000_000, 8),
        ];
        for (name, price, ram, vcpus) in all {
            if names.contains(&name) {
                cl.instance_types.insert(
                    name.into(),
                    InstanceType {
                        name: name.into(),
                        provider_type: name.into(),
                        price,
                        ram,
                        vcpus,
                        ..Default::default()
                    },
                );
            }
        }
        // Upstream's fixture config has no reserve and no local keepstore.
        cl.containers.reserve_extra_ram = 0;
        cl.containers.local_keep_blob_buffers_per_vcpu = 0;
        cl
    }

    #[test]
    fn ac_slurm_8_cheapest_suitable_instance_type() {
        let cl = types(&["a1.tiny", "a1.small", "a1.medium", "a1.large"]);
        assert_eq!(
            args(&cl, &small()).unwrap(),
            words("--nice=10000 --no-requeue --constraint=instancetype=a1.medium")
        );
    }

    #[test]
    fn ac_slurm_9_no_instance_types_leaves_i_empty() {
        let cl = types(&[]);
        assert_eq!(
            args(&cl, &small()).unwrap(),
            words("--nice=10000 --no-requeue --constraint=instancetype=")
        );
    }

    #[test]
    fn ac_slurm_10_no_type_big_enough() {
        let cl = types(&["a1.tiny"]);
        match args(&cl, &small()) {
            Err(RunError::ConstraintsNotSatisfiable { available, .. }) => {
                assert_eq!(available.len(), 1);
                assert!(
                    available[0].starts_with("Type \"a1.tiny\": 1 VCPUs,"),
                    "{available:?}"
                );
                assert!(available[0].ends_with("0.020000 Price"), "{available:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ac_slurm_11_partitions() {
        let cl = cluster(None);
        let mut c = small();
        c.runtime_constraints.vcpus = 1;
        c.scheduling_parameters.partitions = vec!["blurb".into(), "b2".into()];
        assert_eq!(
            args(&cl, &c).unwrap(),
            words(
                "--nice=10000 --no-requeue --job-name=123 --mem=789 --cpus-per-task=1 --tmp=0 --partition=blurb,b2"
            )
        );
    }

    #[test]
    fn ac_slurm_12_bad_template() {
        let cl = cluster(Some(&["--bad% template"]));
        let err = args(&cl, &Container::default()).unwrap_err().to_string();
        assert!(
            err.starts_with("Unknown substitution parameter %  in "),
            "{err}"
        );
        assert!(validate(&["--bad% template".into()]).is_err());
        assert!(validate(&Cluster::default().containers.slurm.sbatch_arguments_list).is_ok());
    }

    #[test]
    fn ac_slurm_s1_template_corners() {
        let mut v = Values {
            uuid: "zzzzz-dz642-000000000000001".into(),
            ..Default::default()
        };
        assert_eq!(expand("%%U", &v).unwrap().unwrap(), "%U");
        assert_eq!(expand("100%", &v).unwrap().unwrap(), "100%");
        assert_eq!(expand("--time=%W", &v).unwrap(), None);
        v.max_run_minutes = 2;
        assert_eq!(expand("--time=%W", &v).unwrap().unwrap(), "--time=2");
        assert_eq!(expand("--comment=%P-%U", &v).unwrap(), None);
        assert_eq!(expand("--x=%Z", &v).unwrap_err(), UnknownCode('Z'));
        // Several unknown codes: the last is named, as in Arvados.
        assert_eq!(expand("%Y%Z", &v).unwrap_err(), UnknownCode('Z'));
        // One element stays one word, spaces and all.
        assert_eq!(
            expand("--comment=a b", &v).unwrap().unwrap(),
            "--comment=a b"
        );
        // 61 s of run time is 2 minutes.
        let mut c = small();
        c.scheduling_parameters.max_run_time = 61;
        let cl = cluster(None);
        assert_eq!(
            values(&cl, &TypeChooser::new(&cl), &c)
                .unwrap()
                .max_run_minutes,
            2
        );
    }

    #[test]
    fn byte_sizes_print_in_the_largest_exact_unit() {
        assert_eq!(byte_size(0), "0");
        assert_eq!(byte_size(16 << 30), "16GiB");
        assert_eq!(byte_size(128_000_000), "125000KiB");
        assert_eq!(byte_size(1001), "1001");
    }
}
