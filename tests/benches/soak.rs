//! Soak (issue 8): dump/restore cycles of a three-container pod, checking every restored pod's
//! memory (a checksum of each container's ballast) and counting what a leak would grow: the
//! shim's descriptors and resident memory (the pod that is dumped again and again keeps its
//! shim), mounts, pod cgroups, network namespaces, iptables rules in the host and in the pod,
//! staging directories and dump journals. Prints the count before the first cycle and after
//! the last one.
//!
//! `cargo build --release -p containerd-shim-podsnap-v1 && cargo bench -p podsnap-tests --bench
//! soak` (cycles: `PODSNAP_SOAK_N`, default 50).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podsnap_coordinator::dump::DumpRequest;
use podsnap_coordinator::progress::Lines;
use podsnap_coordinator::restore::RestoreRequest;
use podsnap_tests::kubelet::{self, ask, ContainerSpec, KubePod, PodOptions};
use podsnap_tests::node::{Node, NodeOptions};
use podsnap_tests::{host, HANDLER, PODSNAP_SHIM};

const CONTAINERS: [(&str, u16); 3] = [("one", 8081), ("two", 8082), ("three", 8083)];
const BALLAST_MIB: &str = "32";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn count_entries(dir: impl AsRef<Path>) -> usize {
    std::fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0)
}

fn cgroup_dirs(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
                n += 1;
                stack.push(e.path());
            }
        }
    }
    n
}

/// Rules and chains of one's own (the built-in chains of a table appear once it is first used).
fn iptables_rules(netns: Option<&str>) -> usize {
    let mut cmd = std::process::Command::new("nsenter");
    match netns {
        Some(ns) => cmd.arg(format!("--net={ns}")),
        None => cmd.arg("--net=/proc/1/ns/net"),
    };
    cmd.args(["--", "iptables-save"]);
    cmd.output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| {
                    l.starts_with("-A")
                        || (l.starts_with(':')
                            && !["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"]
                                .iter()
                                .any(|b| l[1..].starts_with(&format!("{b} "))))
                })
                .count()
        })
        .unwrap_or(0)
}

fn vm_rss_kib(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// What a leak would grow.
fn census(node: &Node, shim: i32, netns: Option<&str>) -> Vec<(&'static str, usize)> {
    vec![
        ("shim open descriptors", count_entries(format!("/proc/{shim}/fd"))),
        ("shim resident memory (KiB)", vm_rss_kib(shim)),
        (
            "mounts (host)",
            podsnap_tests::host::mount_points().map_or(0, |m| m.len()),
        ),
        (
            "pod cgroups (freezer)",
            cgroup_dirs(Path::new("/sys/fs/cgroup/freezer/kubepods")),
        ),
        ("network namespaces", count_entries("/var/run/netns")),
        ("iptables rules (host)", iptables_rules(None)),
        ("iptables rules (the dumped pod)", iptables_rules(netns)),
        (
            "staging directories",
            std::fs::read_dir(node.files().checkpoints())
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
                        .count()
                })
                .unwrap_or(0),
        ),
        ("dump journals", count_entries(podsnap_tests::paths::JOURNAL_DIR)),
    ]
}

fn run_pod(node: &Node, name: &str) -> KubePod {
    let pod = kubelet::run_pod(node, &PodOptions::new(name, HANDLER)).expect("sandbox");
    for (c, port) in CONTAINERS {
        let port = port.to_string();
        let spec = ContainerSpec::workload(
            c,
            &[
                "serve",
                "--name",
                c,
                "--port",
                &port,
                "--ballast-mib",
                BALLAST_MIB,
            ],
        );
        kubelet::run_container(node, &pod, &spec).expect("container");
        kubelet::wait_answering(&pod.ip, CONTAINERS[0].1, Duration::from_secs(30)).expect("answers");
    }
    pod
}

fn sums(ip: &str) -> Vec<String> {
    CONTAINERS
        .iter()
        .map(|(c, port)| {
            kubelet::wait_answering(ip, *port, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{c}: {e:#}"));
            ask(ip, *port, "ballast-sum").unwrap_or_else(|e| panic!("{c}: {e:#}"))
        })
        .collect()
}

fn main() {
    let cycles: usize = std::env::var("PODSNAP_SOAK_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let node = Node::start(NodeOptions::new(PathBuf::from(env!(
        "CARGO_BIN_EXE_podsnap-workload"
    ))));
    let pod = run_pod(&node, &node.unique("soak"));
    let shims = node.shim_pids(PODSNAP_SHIM);
    assert_eq!(shims.len(), 1, "one shim: {shims:?}");
    let shim = shims[0];
    let expected = sums(&pod.ip);
    let before = census(&node, shim, pod.netns.as_deref());
    let started = Instant::now();
    let mut dump_s = common::Samples::default();
    let mut restore_s = common::Samples::default();
    let mut rss_along = Vec::new();
    for cycle in 0..cycles {
        if [1, cycles / 4, cycles / 2, 3 * cycles / 4].contains(&cycle) {
            rss_along.push((cycle, vm_rss_kib(shim)));
        }
        let dir = node.files().checkpoints().join(format!("soak-{cycle}"));
        let mut request = DumpRequest::new(&pod.namespace, &pod.name);
        request.runtime_endpoint = node.endpoint();
        request.address = node.address();
        request.checkpoint_root = node.files().checkpoints();
        request.dir = Some(dir.clone());
        let t = Instant::now();
        block_on(podsnap_coordinator::dump::dump(&request, &Lines)).expect("dump");
        dump_s.push(t.elapsed().as_secs_f64());
        let mut restore = RestoreRequest::new(&dir);
        restore.runtime_endpoint = node.endpoint();
        restore.checkpoint_root = node.files().checkpoints();
        restore.pods_dir = node.files().kubelet().join("pods");
        restore.logs_dir = node.files().kubelet().join("logs/pods");
        restore.name = Some(format!("{}-r{cycle}", pod.name));
        let t = Instant::now();
        let restored = block_on(podsnap_coordinator::restore::restore(&restore, &Lines)).expect("restore");
        restore_s.push(t.elapsed().as_secs_f64());
        let netns = node.cri().pod_netns(&restored.id).ok().flatten();
        node.record_pod(&restored.uid, netns.as_deref()).expect("record");
        assert_eq!(sums(&restored.ip), expected, "cycle {cycle}: memory checksums");
        node.cri()
            .stop_and_remove_pod(&restored.id)
            .expect("remove the restored pod");
        let left = host::remove_pod_cgroups(&restored.uid);
        assert!(left.is_empty(), "cycle {cycle}: cgroups left: {left:?}");
        std::fs::remove_dir_all(&dir).expect("remove the checkpoint");
    }
    let after = census(&node, shim, pod.netns.as_deref());
    println!(
        "### Soak: {cycles} dump/restore cycles of a three-container pod ({BALLAST_MIB} MiB each), memory \
         checksums verified every cycle; {:.0} s in all\n",
        started.elapsed().as_secs_f64()
    );
    println!("| resource | before | after | change |\n|---|---|---|---|");
    for ((what, b), (_, a)) in before.iter().zip(after.iter()) {
        println!("| {what} | {b} | {a} | {:+} |", *a as i64 - *b as i64);
    }
    rss_along.push((cycles, vm_rss_kib(shim)));
    let along: Vec<String> = rss_along
        .iter()
        .map(|(c, kib)| format!("{kib} KiB after {c}"))
        .collect();
    println!("\nshim resident memory along the way: {}", along.join(", "));
    println!(
        "\ndump {} s, restore to all running {} s (median, min-max)",
        dump_s.cell(2),
        restore_s.cell(2)
    );
}
