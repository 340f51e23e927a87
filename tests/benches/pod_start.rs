//! Benchmark (issue 2): a pod of three containers through CRI, the way kubelet starts it
//! (RunPodSandbox, then CreateContainer + StartContainer of three `podsnap-workload serve`
//! containers until CRI reports each running), under podsnap's shim and under containerd's Go
//! runc shim (`containerd-shim-runc-v2`), side by side on one private containerd, alternating
//! round by round; plus, when it is installed, the Rust runc shim of containerd's
//! rust-extensions (`containerd-shim-runc-v2-rs`, `cargo install containerd-runc-shim`; found on
//! `PATH`, in `$PODSNAP_RUNC_RS_DIR` or in `/tmp/runc-shim-rs/bin`).
//!
//! Measured per pod: the start time, and the memory of the shim process(es) serving it (all three
//! group a pod's containers in one process): RSS and PSS from `/proc/<pid>/smaps_rollup`, half a
//! second after the last container started.
//!
//! `cargo build --release -p containerd-shim-podsnap-v1 && cargo bench -p podsnap-tests --bench
//! pod_start` (rounds: `PODSNAP_BENCH_N`, default 11).

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{print_table, ratio, seconds, Samples};
use k8s_cri::v1 as cri;
use podsnap_tests::kubelet::{self, ContainerSpec, PodOptions};
use podsnap_tests::node::Node;

/// The Rust runc shim's binary.
const RUNC_RS_SHIM: &str = "containerd-shim-runc-v2-rs";

struct Contender {
    handler: &'static str,
    label: &'static str,
    shim: &'static str,
    start: Samples,
    rss_mib: Samples,
    pss_mib: Samples,
    processes: Samples,
}

impl Contender {
    fn new(handler: &'static str, label: &'static str, shim: &'static str) -> Self {
        Self {
            handler,
            label,
            shim,
            start: Samples::default(),
            rss_mib: Samples::default(),
            pss_mib: Samples::default(),
            processes: Samples::default(),
        }
    }
}

/// Where `cargo install containerd-runc-shim` put the Rust runc shim, if anywhere.
fn find_runc_rs() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PODSNAP_RUNC_RS_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push(PathBuf::from("/tmp/runc-shim-rs/bin"));
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    dirs.into_iter()
        .map(|d| d.join(RUNC_RS_SHIM))
        .find(|p| p.is_file())
}

fn main() {
    let rounds = common::rounds(11);
    let mut options = common::podsnap_node_options();
    let runc_rs = find_runc_rs();
    if let Some(path) = &runc_rs {
        options.extra_config = format!(
            "\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc-rs]\n  \
             runtime_type = 'io.containerd.runc.v2-rs'\n  runtime_path = '{}'\n",
            path.display()
        );
    }
    let mut node = Node::start(options);
    let mut contenders = vec![
        Contender::new(
            "podsnap",
            "podsnap (containerd-shim-podsnap-v1)",
            podsnap_tests::PODSNAP_SHIM,
        ),
        Contender::new("runc", "containerd-shim-runc-v2 (Go)", "containerd-shim-runc-v2"),
    ];
    if runc_rs.is_some() {
        contenders.push(Contender::new(
            "runc-rs",
            "containerd-shim-runc-v2-rs (Rust, rust-extensions)",
            RUNC_RS_SHIM,
        ));
    }
    let started = Instant::now();
    for round in 0..=rounds {
        // Rotate who goes first; round 0 warms every contender up and is not counted.
        let n = contenders.len();
        for k in 0..n {
            let contender = &mut contenders[(round + k) % n];
            let (start, processes, rss, pss) = one_pod(&node, contender, round);
            eprintln!(
                "round {round} {}: {start:.2} s, {processes} shim process(es), RSS {rss:.1} MiB, PSS \
                 {pss:.1} MiB",
                contender.label
            );
            if round > 0 {
                contender.start.push(start);
                contender.processes.push(processes as f64);
                contender.rss_mib.push(rss);
                contender.pss_mib.push(pss);
            }
        }
    }

    println!();
    println!(
        "### A pod of three containers: start time and shim memory per pod (median of {rounds}, \
         min-max; {:.0} s in all)",
        seconds(started.elapsed())
    );
    println!();
    if runc_rs.is_none() {
        println!(
            "(containerd-shim-runc-v2-rs not installed: `cargo install containerd-runc-shim` adds \
             it as a third column)"
        );
        println!();
    }
    let go = 1;
    let mut rows: Vec<Vec<String>> = contenders
        .iter()
        .map(|c| {
            vec![
                c.label.to_owned(),
                c.start.cell(2),
                format!("{:.0}", c.processes.median()),
                c.rss_mib.cell(1),
                c.pss_mib.cell(1),
            ]
        })
        .collect();
    for c in contenders
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != go)
        .map(|(_, c)| c)
    {
        rows.push(vec![
            format!("ratio {} / Go shim", c.handler),
            ratio(&c.start, &contenders[go].start),
            String::new(),
            ratio(&c.rss_mib, &contenders[go].rss_mib),
            ratio(&c.pss_mib, &contenders[go].pss_mib),
        ]);
    }
    print_table(
        &[
            "shim (CRI handler)",
            "pod start, 3 containers (s)",
            "shim processes",
            "shim RSS (MiB)",
            "shim PSS (MiB)",
        ],
        &rows,
    );
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// Runs one pod and removes it: (start s, shim processes, RSS MiB, PSS MiB).
fn one_pod(node: &Node, contender: &Contender, round: usize) -> (f64, usize, f64, f64) {
    let options = PodOptions::new(
        &node.unique(&format!("start-{}-{round}", contender.handler)),
        contender.handler,
    );
    let clock = Instant::now();
    let pod = kubelet::run_pod(node, &options).expect("RunPodSandbox");
    let mut ids = Vec::new();
    for (name, port) in [("one", "8081"), ("two", "8082"), ("three", "8083")] {
        let spec = ContainerSpec::workload(name, &["serve", "--name", name, "--port", port]);
        ids.push(kubelet::run_container(node, &pod, &spec).expect("a container"));
    }
    for id in &ids {
        node.cri()
            .wait_container_state(id, cri::ContainerState::ContainerRunning, Duration::from_secs(30))
            .expect("running");
    }
    let start = seconds(clock.elapsed());

    std::thread::sleep(Duration::from_millis(500));
    let pids = node.shim_pids(contender.shim);
    assert!(!pids.is_empty(), "no {} process serves the pod", contender.shim);
    let (mut rss, mut pss) = (0, 0);
    for &pid in &pids {
        let (r, p) = common::rss_pss_kib(pid).expect("smaps_rollup of the shim");
        rss += r;
        pss += p;
    }
    kubelet::remove_pod(node, &pod).expect("remove the pod");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.shim_pids(contender.shim).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    (start, pids.len(), rss as f64 / 1024.0, pss as f64 / 1024.0)
}
