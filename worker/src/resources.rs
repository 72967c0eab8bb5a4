//! What this machine offers for shards: memory (the container's limit when
//! there is one) and CPU cores, as reported in the status and used by the
//! coordinator's placement.

use llama_cluster_shared::status::Resources;

/// Measures the machine; `memory_mb` (when not 0) is the budget offered for
/// shards, `threads` (when not 0) the cores llama.cpp may use.
pub fn detect(memory_mb: u64, threads: u32) -> Resources {
    // Unmeasurable (an unsupported OS): 0, and placement then relies on
    // `memory_mb`.
    let mut total = 0;
    if let Ok(mut sys) = sysinfo::System::new() {
        sys.refresh_memory();
        total = sys.total_memory();
        if let Some(limit) = sys.cgroup_limits()
            && limit.total_memory > 0
        {
            total = total.min(limit.total_memory);
        }
    }
    let cpus = if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    };
    Resources {
        memory_total_bytes: total,
        memory_budget_bytes: if memory_mb > 0 {
            memory_mb.saturating_mul(1 << 20)
        } else {
            total
        },
        cpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_and_honours_the_budget() {
        let r = detect(0, 0);
        assert!(r.memory_total_bytes > 64 << 20, "{r:?}");
        assert_eq!(r.memory_budget_bytes, r.memory_total_bytes);
        assert!(r.cpus >= 1);
        let r = detect(1500, 3);
        assert_eq!(r.memory_budget_bytes, 1500 << 20);
        assert_eq!(r.cpus, 3);
    }
}
