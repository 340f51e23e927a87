//! Benchmark (issue 22): two pods of two containers each (64 MiB of dirtied memory per
//! container; the second pod's first container holds a TCP connection to the first pod's pod
//! IP), checkpointed at one instant by one group dump (`podsnap dump --selector`, the
//! coordinator's library) against the two pods dumped one after the other with today's
//! command (`podsnap dump --pod`, twice), alternating round by round on one private
//! containerd, every dump leaving the pods running. Measured from outside (freezer state and
//! ptrace, every millisecond: `common::observer`): the wall time of the whole, and the spread
//! between the two pods' snapshot instants (each pod's first container seen stopped).
//!
//! `cargo build --release -p containerd-shim-podsnap-v1 && cargo bench -p podsnap-tests --bench
//! group_dump` (rounds: `PODSNAP_BENCH_N`, default 7).

mod common;

use std::time::{Duration, Instant};

use common::observer::{Observer, Watched};
use common::{print_table, ratio, seconds, Samples};
use podsnap_coordinator::dump::DumpRequest;
use podsnap_coordinator::group::Members;
use podsnap_tests::kubelet::{self, ContainerSpec, KubePod, PodOptions};
use podsnap_tests::node::Node;

const CONTAINERS: [(&str, u16); 2] = [("one", 8081), ("two", 8082)];

#[derive(Default)]
struct Measures {
    wall: Samples,
    spread: Samples,
    frozen: Samples,
}

fn main() {
    let rounds = common::rounds(7);
    let node = Node::start(common::podsnap_node_options());
    let set = node.unique("web");
    let pods: Vec<(KubePod, Vec<String>)> = (0..2).map(|i| member(&node, &set, i)).collect();
    let peer = format!("peer-connect tcp {}:{}", pods[0].0.ip, CONTAINERS[0].1);
    let connected = kubelet::ask(&pods[1].0.ip, CONTAINERS[0].1, &peer).expect("peer-connect");
    assert_eq!(connected.trim(), "ok", "{connected}");
    let runtime = common::runtime();
    let mut group = Measures::default();
    let mut one_by_one = Measures::default();
    let started = Instant::now();
    for round in 0..=rounds {
        for first in [round % 2 == 0, round % 2 != 0] {
            let (label, measures) = if first {
                ("group", &mut group)
            } else {
                ("one after the other", &mut one_by_one)
            };
            let dir = node
                .files()
                .checkpoints()
                .join(format!("{}-{round}", if first { "g" } else { "s" }));
            let watched: Vec<Watched> = pods
                .iter()
                .flat_map(|(pod, ids)| {
                    ids.iter()
                        .zip(CONTAINERS)
                        .map(|(id, (c, _))| Watched::container(&pod.uid, id, &format!("{}/{c}", pod.name)))
                })
                .collect();
            common::sync_disks();
            let observer = Observer::start(watched);
            let clock = Instant::now();
            let mut request = DumpRequest::new("default", &pods[0].0.name);
            request.runtime_endpoint = node.endpoint();
            request.address = node.address();
            request.checkpoint_root = node.files().checkpoints();
            if first {
                request.dir = Some(dir.clone());
                runtime
                    .block_on(podsnap_coordinator::group::dump_group(
                        &request,
                        &Members::Selector {
                            key: "group".into(),
                            value: set.clone(),
                        },
                        &podsnap_coordinator::progress::Quiet,
                    ))
                    .expect("the group dump");
            } else {
                for (i, (pod, _)) in pods.iter().enumerate() {
                    request.pod = pod.name.clone();
                    request.dir = Some(dir.join(i.to_string()));
                    runtime
                        .block_on(podsnap_coordinator::dump::dump(
                            &request,
                            &podsnap_coordinator::progress::Quiet,
                        ))
                        .expect("a pod dump");
                }
            }
            let wall = seconds(clock.elapsed());
            let windows = observer.stop();
            // Each pod's snapshot: its first container seen stopped.
            let snapshot = |pod: &str| {
                windows
                    .containers
                    .iter()
                    .filter(|s| s.name.starts_with(&format!("{pod}/")))
                    .filter_map(|s| s.first)
                    .fold(f64::MAX, f64::min)
            };
            let spread = (snapshot(&pods[0].0.name) - snapshot(&pods[1].0.name)).abs();
            eprintln!(
                "round {round} {label}: wall {wall:.3} s, snapshot spread {spread:.4} s, frozen (first stop to last resume) {:.3} s",
                windows.pod()
            );
            if round > 0 {
                measures.wall.push(wall);
                measures.spread.push(spread);
                measures.frozen.push(windows.pod());
            }
            std::fs::remove_dir_all(&dir).expect("remove the round's checkpoints");
        }
    }
    // The connection between the pods still carries data after every dump.
    let check = kubelet::ask(&pods[1].0.ip, CONTAINERS[0].1, "peer-check").expect("peer-check");
    assert!(check.contains("peer ok"), "{check}");
    println!();
    println!(
        "### Two pods x two containers (64 MiB each, a TCP connection between the pods): one \
         group dump against the two pods dumped one after the other (median of {rounds}, \
         min-max; {:.0} s in all)",
        seconds(started.elapsed())
    );
    println!();
    let row = |label: &str, m: &Measures| {
        vec![
            label.to_owned(),
            m.wall.cell(3),
            m.spread.cell(4),
            m.frozen.cell(3),
        ]
    };
    print_table(
        &[
            "",
            "wall s",
            "spread between the pods' snapshots s",
            "first freeze to last resume s",
        ],
        &[
            row("group dump (--selector)", &group),
            row("podsnap dump --pod, one after the other", &one_by_one),
            vec![
                "group / one after the other".to_owned(),
                ratio(&group.wall, &one_by_one.wall),
                ratio(&group.spread, &one_by_one.spread),
                ratio(&group.frozen, &one_by_one.frozen),
            ],
        ],
    );
}

/// Pod `<set>-<i>`, labelled `group=<set>`, two containers with 64 MiB of dirtied memory each.
fn member(node: &Node, set: &str, i: usize) -> (KubePod, Vec<String>) {
    let name = format!("{set}-{i}");
    let mut options = PodOptions::new(&name, "podsnap");
    options.labels.insert("group".to_owned(), set.to_owned());
    let pod = kubelet::run_pod(node, &options).expect("RunPodSandbox");
    let mut ids = Vec::new();
    for (cname, port) in CONTAINERS {
        let port = port.to_string();
        let spec = ContainerSpec::workload(
            cname,
            &["serve", "--name", cname, "--port", &port, "--ballast-mib", "64"],
        );
        ids.push(kubelet::run_container(node, &pod, &spec).expect("a container"));
    }
    for (_, port) in CONTAINERS {
        kubelet::wait_answering(&pod.ip, port, Duration::from_secs(60)).expect("answers");
    }
    (pod, ids)
}
