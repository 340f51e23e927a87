//! cgroup statistics in containerd's metrics messages: `io.containerd.cgroups.v1.Metrics` on a
//! v1 (or hybrid) node, `io.containerd.cgroups.v2.Metrics` on a v2 node, as containerd's runc
//! shim answers. Parts the cgroup does not have (a controller not enabled) stay unset.

use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat, Throttle,
};
use containerd_shim::protos::cgroups_v2::metrics as v2m;
use podsnap_runtime::cgroup::stats::{V1Stats, V2Stats};

/// v1 statistics in containerd's v1 message.
pub fn v1(s: &V1Stats) -> Metrics {
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
        let g = |k: &str| mem.get(k);
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

/// v2 statistics in containerd's v2 message.
pub fn v2(s: &V2Stats) -> v2m::Metrics {
    let mut m = v2m::Metrics::new();
    if let Some(p) = &s.pids {
        m.pids = Some(v2m::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        })
        .into();
    }
    if let Some(c) = &s.cpu {
        let g = |k: &str| c.get(k).copied().unwrap_or(0);
        m.cpu = Some(v2m::CPUStat {
            usage_usec: g("usage_usec"),
            user_usec: g("user_usec"),
            system_usec: g("system_usec"),
            nr_periods: g("nr_periods"),
            nr_throttled: g("nr_throttled"),
            throttled_usec: g("throttled_usec"),
            nr_bursts: g("nr_bursts"),
            burst_usec: g("burst_usec"),
            ..Default::default()
        })
        .into();
    }
    if let Some(mem) = &s.memory {
        let g = |k: &str| mem.get(k);
        // Linux 5.9 split workingset_refault into _anon and _file.
        let either = |k: &str| {
            if mem.stat.contains_key(k) {
                g(k)
            } else {
                g(&format!("{k}_anon")) + g(&format!("{k}_file"))
            }
        };
        m.memory = Some(v2m::MemoryStat {
            anon: g("anon"),
            file: g("file"),
            kernel_stack: g("kernel_stack"),
            slab: g("slab"),
            sock: g("sock"),
            shmem: g("shmem"),
            file_mapped: g("file_mapped"),
            file_dirty: g("file_dirty"),
            file_writeback: g("file_writeback"),
            anon_thp: g("anon_thp"),
            inactive_anon: g("inactive_anon"),
            active_anon: g("active_anon"),
            inactive_file: g("inactive_file"),
            active_file: g("active_file"),
            unevictable: g("unevictable"),
            slab_reclaimable: g("slab_reclaimable"),
            slab_unreclaimable: g("slab_unreclaimable"),
            pgfault: g("pgfault"),
            pgmajfault: g("pgmajfault"),
            workingset_refault: either("workingset_refault"),
            workingset_activate: either("workingset_activate"),
            workingset_nodereclaim: g("workingset_nodereclaim"),
            pgrefill: g("pgrefill"),
            pgscan: g("pgscan"),
            pgsteal: g("pgsteal"),
            pgactivate: g("pgactivate"),
            pgdeactivate: g("pgdeactivate"),
            pglazyfree: g("pglazyfree"),
            pglazyfreed: g("pglazyfreed"),
            thp_fault_alloc: g("thp_fault_alloc"),
            thp_collapse_alloc: g("thp_collapse_alloc"),
            usage: mem.usage,
            usage_limit: mem.limit,
            swap_usage: mem.swap_usage,
            swap_limit: mem.swap_limit,
            max_usage: mem.max_usage,
            ..Default::default()
        })
        .into();
    }
    if let Some(e) = &s.memory_events {
        let g = |k: &str| e.get(k).copied().unwrap_or(0);
        m.memory_events = Some(v2m::MemoryEvents {
            low: g("low"),
            high: g("high"),
            max: g("max"),
            oom: g("oom"),
            oom_kill: g("oom_kill"),
            oom_group_kill: g("oom_group_kill"),
            ..Default::default()
        })
        .into();
    }
    if let Some(io) = &s.io {
        m.io = Some(v2m::IOStat {
            usage: io
                .iter()
                .map(|d| v2m::IOEntry {
                    major: d.major,
                    minor: d.minor,
                    rbytes: d.rbytes,
                    wbytes: d.wbytes,
                    rios: d.rios,
                    wios: d.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .into();
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::MessageFull;
    use podsnap_runtime::cgroup::stats::{IoEntry, MemoryStats, PidsStats};

    #[test]
    fn v1_memory_and_pids_carry_over() {
        let s = V1Stats {
            memory: Some(MemoryStats {
                usage: 100,
                limit: 200,
                stat: [("rss".to_string(), 50)].into_iter().collect(),
                ..Default::default()
            }),
            pids: Some(PidsStats { current: 3, limit: 0 }),
            cpu: None,
            missing: vec!["cpuacct.usage"],
        };
        let m = v1(&s);
        assert_eq!(m.memory.rss, 50);
        assert_eq!(m.memory.usage.usage, 100);
        assert_eq!(m.memory.usage.limit, 200);
        assert_eq!(m.pids.current, 3);
        assert!(m.cpu.is_none());
        assert_eq!(
            Metrics::descriptor().full_name(),
            "io.containerd.cgroups.v1.Metrics"
        );
    }

    #[test]
    fn v2_numbers_land_in_the_v2_message() {
        let s = V2Stats {
            memory: Some(MemoryStats {
                usage: 7340032,
                max_usage: 9437184,
                limit: u64::MAX,
                swap_usage: 4096,
                swap_limit: u64::MAX,
                stat: [
                    ("anon", 4194304),
                    ("file", 2097152),
                    ("workingset_refault_anon", 2),
                    ("workingset_refault_file", 5),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
                ..Default::default()
            }),
            memory_events: Some([("oom_kill".to_string(), 1), ("max".to_string(), 4)].into()),
            cpu: Some(
                [
                    ("usage_usec", 1500000),
                    ("user_usec", 1000000),
                    ("system_usec", 500000),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ),
            io: Some(vec![IoEntry {
                major: 8,
                minor: 0,
                rbytes: 4096,
                wbytes: 8192,
                rios: 1,
                wios: 2,
            }]),
            pids: Some(PidsStats { current: 3, limit: 0 }),
            missing: Vec::new(),
        };
        let m = v2(&s);
        assert_eq!((m.memory.usage, m.memory.usage_limit), (7340032, u64::MAX));
        assert_eq!(
            (m.memory.anon, m.memory.file, m.memory.max_usage),
            (4194304, 2097152, 9437184)
        );
        assert_eq!(m.memory.workingset_refault, 7, "the split counters are summed");
        assert_eq!(m.memory.swap_usage, 4096);
        assert_eq!((m.memory_events.oom_kill, m.memory_events.max), (1, 4));
        assert_eq!(
            (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec),
            (1500000, 1000000, 500000)
        );
        assert_eq!(m.io.usage.len(), 1);
        assert_eq!((m.io.usage[0].rbytes, m.io.usage[0].wios), (4096, 2));
        assert_eq!(m.pids.current, 3);
        assert_eq!(
            v2m::Metrics::descriptor().full_name(),
            "io.containerd.cgroups.v2.Metrics"
        );

        // A cgroup with no controller: cpu only, the rest unset (not zeros).
        let bare = V2Stats {
            cpu: s.cpu.clone(),
            missing: vec!["memory.current", "memory.events", "io.stat", "pids.current"],
            ..Default::default()
        };
        let m = v2(&bare);
        assert!(m.cpu.is_some());
        assert!(m.memory.is_none() && m.memory_events.is_none() && m.io.is_none() && m.pids.is_none());
    }
}
