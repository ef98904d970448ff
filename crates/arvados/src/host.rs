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

#[cfg(test)]
mod tests {
    #[test]
    fn this_host_has_cpus_and_memory() {
        assert!(super::cpu_count() >= 1);
        assert!(super::total_memory() > 0);
    }
}
