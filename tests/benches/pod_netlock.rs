//! Benchmark (issue 9): the pod's network held still during a pod dump by one lock for the pod
//! (`[dump] network_lock = "pod"`, the default) against no lock of podsnap's, each container's
//! CRIU run locking only its own TCP connections while it dumps them (`"container"`, podsnap
//! before the pod lock). A pod of three containers, each with 64 MiB of dirtied memory and four
//! TCP connections to itself over loopback (so CRIU has connections to lock), dumped through one
//! Tasks.Checkpoint of the sandbox task (image_path, leave running); the two settings alternate
//! round by round on one private containerd (the shim reads the node configuration at every
//! dump). Frozen window: first freeze to last thaw, as the shim records it in the manifest
//! (`stats.frozen_us`), the same clock for both; total: the Checkpoint call.

mod common;

use std::time::{Duration, Instant};

use common::{print_table, ratio, seconds, Samples};
use podsnap_tests::containerd_api::ContainerdApi;
use podsnap_tests::ctr::CRI_NAMESPACE as NS;
use podsnap_tests::kubelet::{self, ContainerSpec, PodOptions};
use podsnap_tests::node::Node;

const CONTAINERS: [(&str, u16); 3] = [("one", 8081), ("two", 8082), ("three", 8083)];

#[derive(Default)]
struct Measures {
    total: Samples,
    frozen: Samples,
    slowest: Samples,
    /// Rounds after which a loopback connection of the pod no longer carried data.
    broken: usize,
}

fn main() {
    let rounds = common::rounds(7);
    let node = Node::start(common::podsnap_node_options());
    let mut pod_lock = Measures::default();
    let mut per_container = Measures::default();
    let started = Instant::now();
    for round in 0..=rounds {
        // Alternate who goes first; round 0 warms both up and is not counted.
        for first in [round % 2 == 0, round % 2 != 0] {
            let (setting, measures) = if first {
                ("pod", &mut pod_lock)
            } else {
                ("container", &mut per_container)
            };
            let (total, frozen, slowest, broken) = dump_round(&node, setting, round);
            eprintln!(
                "round {round} network_lock={setting}: total {total:.3} s frozen {frozen:.3} s{}",
                if broken {
                    " (a loopback connection broke)"
                } else {
                    ""
                }
            );
            if round > 0 {
                measures.total.push(total);
                measures.frozen.push(frozen);
                measures.slowest.push(slowest);
                measures.broken += usize::from(broken);
            }
        }
    }
    println!();
    println!(
        "### Pod dump, 3 containers x 64 MiB with 4 loopback TCP connections each: one network lock \
         for the pod against each CRIU run's own (median of {rounds}, min-max; {:.0} s in all)",
        seconds(started.elapsed())
    );
    println!();
    let row = |label: &str, m: &Measures| {
        vec![
            label.to_owned(),
            m.total.cell(3),
            m.frozen.cell(3),
            m.slowest.cell(3),
            format!("{} of {rounds}", m.broken),
        ]
    };
    print_table(
        &[
            "network lock",
            "dump total s",
            "pod frozen s",
            "slowest container dump s",
            "rounds with a broken loopback connection",
        ],
        &[
            row("pod (one lock, default)", &pod_lock),
            row("container (CRIU's own, before)", &per_container),
            vec![
                "pod / container".to_owned(),
                ratio(&pod_lock.total, &per_container.total),
                ratio(&pod_lock.frozen, &per_container.frozen),
                ratio(&pod_lock.slowest, &per_container.slowest),
                String::new(),
            ],
        ],
    );
}

/// One dump of a fresh pod with `[dump] network_lock = setting`: (total, frozen, slowest) s, and
/// whether a loopback connection of the pod stopped carrying data after it.
fn dump_round(node: &Node, setting: &str, round: usize) -> (f64, f64, f64, bool) {
    node.set_podsnap_config(&format!("[dump]\nnetwork_lock = \"{setting}\"\n"))
        .expect("node configuration");
    let name = node.unique(&format!("nl-{setting}-{round}"));
    let pod = kubelet::run_pod(node, &PodOptions::new(&name, "podsnap")).expect("RunPodSandbox");
    for (cname, port) in CONTAINERS {
        let port = port.to_string();
        let spec = ContainerSpec::workload(
            cname,
            &[
                "serve",
                "--name",
                cname,
                "--port",
                &port,
                "--ballast-mib",
                "64",
                "--loopback-pairs",
                "4",
            ],
        );
        kubelet::run_container(node, &pod, &spec).expect("a container");
    }
    for (_, port) in CONTAINERS {
        kubelet::wait_answering(&pod.ip, port, Duration::from_secs(60)).expect("answers");
    }
    let dir = node
        .files()
        .checkpoints()
        .join(format!("netlock-{setting}-{round}"));
    let api = ContainerdApi::connect(&node.address(), NS).expect("containerd API");
    common::sync_disks();
    let total = common::timed_pod_checkpoint(&api, &pod.id, &dir);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest.json"))
            .expect("manifest JSON");
    let frozen = manifest["stats"]["frozen_us"].as_f64().expect("frozen_us") / 1e6;
    let slowest = manifest["stats"]["slowest_dump_us"]
        .as_f64()
        .expect("slowest_dump_us")
        / 1e6;
    let mut broken = false;
    for (cname, port) in CONTAINERS {
        let check = kubelet::ask(&pod.ip, port, "loop-check").expect("loop-check");
        if !check.starts_with("loop ok") {
            eprintln!("round {round} network_lock={setting}: {cname}: {check}");
            broken = true;
        }
    }
    kubelet::remove_pod(node, &pod).expect("remove the pod");
    std::fs::remove_dir_all(&dir).expect("remove the checkpoint");
    (total, frozen, slowest, broken)
}
