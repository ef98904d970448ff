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

/// Size in bytes of the filesystem holding the temp dir; 0 if unknown.
pub fn temp_fs_size() -> i64 {
    std::process::Command::new("df")
        .args(["-k", "--output=size"])
        .arg(std::env::temp_dir())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .and_then(|l| l.trim().parse::<i64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
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
}
