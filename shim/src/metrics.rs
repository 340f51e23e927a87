//! cgroup statistics in containerd's cgroups v1 `Metrics` message.

use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat, Throttle,
};
use podsnap_runtime::cgroup::Stats;

/// Converts our statistics into containerd's message.
pub fn to_metrics(s: &Stats) -> Metrics {
    let mut m = Metrics::new();
    if let Some(p) = &s.pids {
        m.pids = Some(PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        })
        .into();
    }
    if let Some(c) = &s.cpu {
        let get = |k: &str| c.throttling.get(k).copied().unwrap_or(0);
        m.cpu = Some(CPUStat {
            usage: Some(CPUUsage {
                total: c.usage_total_ns,
                kernel: c.usage_kernel_ns,
                user: c.usage_user_ns,
                per_cpu: c.per_cpu_ns.clone(),
                ..Default::default()
            })
            .into(),
            throttling: Some(Throttle {
                periods: get("nr_periods"),
                throttled_periods: get("nr_throttled"),
                throttled_time: get("throttled_time"),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into();
    }
    if let Some(mem) = &s.memory {
        let g = |k: &str| mem.stat.get(k).copied().unwrap_or(0);
        m.memory = Some(MemoryStat {
            cache: g("cache"),
            rss: g("rss"),
            rss_huge: g("rss_huge"),
            mapped_file: g("mapped_file"),
            dirty: g("dirty"),
            writeback: g("writeback"),
            pg_pg_in: g("pgpgin"),
            pg_pg_out: g("pgpgout"),
            pg_fault: g("pgfault"),
            pg_maj_fault: g("pgmajfault"),
            inactive_anon: g("inactive_anon"),
            active_anon: g("active_anon"),
            inactive_file: g("inactive_file"),
            active_file: g("active_file"),
            unevictable: g("unevictable"),
            hierarchical_memory_limit: g("hierarchical_memory_limit"),
            hierarchical_swap_limit: g("hierarchical_memsw_limit"),
            total_cache: g("total_cache"),
            total_rss: g("total_rss"),
            total_rss_huge: g("total_rss_huge"),
            total_mapped_file: g("total_mapped_file"),
            total_dirty: g("total_dirty"),
            total_writeback: g("total_writeback"),
            total_pg_pg_in: g("total_pgpgin"),
            total_pg_pg_out: g("total_pgpgout"),
            total_pg_fault: g("total_pgfault"),
            total_pg_maj_fault: g("total_pgmajfault"),
            total_inactive_anon: g("total_inactive_anon"),
            total_active_anon: g("total_active_anon"),
            total_inactive_file: g("total_inactive_file"),
            total_active_file: g("total_active_file"),
            total_unevictable: g("total_unevictable"),
            usage: Some(MemoryEntry {
                limit: mem.limit,
                usage: mem.usage,
                max: mem.max_usage,
                failcnt: mem.failcnt,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into();
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use podsnap_runtime::cgroup::{MemoryStats, PidsStats};

    #[test]
    fn memory_and_pids_carry_over() {
        let s = Stats {
            memory: Some(MemoryStats {
                usage: 100,
                limit: 200,
                stat: [("rss".to_string(), 50)].into_iter().collect(),
                ..Default::default()
            }),
            pids: Some(PidsStats { current: 3, limit: 0 }),
            cpu: None,
        };
        let m = to_metrics(&s);
        assert_eq!(m.memory.rss, 50);
        assert_eq!(m.memory.usage.usage, 100);
        assert_eq!(m.memory.usage.limit, 200);
        assert_eq!(m.pids.current, 3);
        assert!(m.cpu.is_none());
    }
}
