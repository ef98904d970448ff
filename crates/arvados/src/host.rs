//! Facts about the host this process runs on, as Arvados' local dispatchers read them.

/// Number of CPUs available to this process (at least 1).
pub fn cpu_count() -> i64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as i64)
}

/// Total memory in bytes (`MemTotal` in `/proc/meminfo`); 0 if unknown.
pub fn total_memory() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Size in bytes of the filesystem holding the temp dir (as `df` reports it); 0 if unknown.
#[cfg(unix)]
pub fn temp_fs_size() -> i64 {
    nix::sys::statvfs::statvfs(&std::env::temp_dir())
        .ok()
        .and_then(|s| i64::try_from(u128::from(s.blocks()) * u128::from(s.fragment_size())).ok())
        .unwrap_or(0)
}

/// Size in bytes of the filesystem holding the temp dir; 0: unknown on this platform.
#[cfg(not(unix))]
pub fn temp_fs_size() -> i64 {
    0
}

/// The instance type the loopback driver synthesises when none is configured: this host's
/// CPUs and memory, the temp filesystem as scratch, price 1.
pub fn localhost_instance_type() -> crate::InstanceType {
    let scratch = temp_fs_size();
    crate::InstanceType {
        name: "localhost".into(),
        provider_type: "localhost".into(),
        vcpus: cpu_count(),
        ram: total_memory(),
        scratch,
        included_scratch: scratch,
        price: 1.0,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_host_has_cpus_and_memory() {
        assert!(super::cpu_count() >= 1);
        assert!(super::total_memory() > 0);
    }

    /// statvfs gives what `df` says (the dispatcher used to run `df`).
    #[cfg(unix)]
    #[test]
    fn temp_fs_size_is_what_df_reports() {
        let out = std::process::Command::new("df")
            .args(["-k", "--output=size"])
            .arg(std::env::temp_dir())
            .output()
            .unwrap();
        let df_kb: i64 = String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(super::temp_fs_size(), df_kb * 1024);
    }
}
