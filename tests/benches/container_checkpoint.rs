//! Benchmark (issue 3): checkpoint and restore of one container holding 256 MiB of dirtied
//! memory, podsnap's shim against containerd's Go runc shim (`containerd-shim-runc-v2`), side
//! by side on one private containerd, alternating round by round.
//!
//! Both go through the same containerd calls, the directory form: Tasks.Checkpoint with runc
//! `CheckpointOptions{image_path, exit}` (a checkpoint that stops the container, as for a
//! move), then a new container whose task is created with runc `Options{criu_image_path}` and
//! started (Tasks.Create + Tasks.Start: the restore). Timed: each call until it returned;
//! checked after (untimed): the restored counter went on and the 256 MiB are intact.
//!
//! `cargo build --release -p containerd-shim-podsnap-v1 && cargo bench -p podsnap-tests --bench
//! container_checkpoint` (rounds: `PODSNAP_BENCH_N`, default 9).

mod common;

use std::path::Path;
use std::time::Instant;

use common::{mib, print_table, ratio, seconds, Samples};
use podsnap_tests::containerd_api::{CheckpointOptions, ContainerdApi};
use podsnap_tests::ctr::{Ctr, DEFAULT_NAMESPACE as NS};
use podsnap_tests::host::Netns;
use podsnap_tests::node::Node;
use podsnap_tests::WORKLOAD_IMAGE;

/// The dirtied memory the container holds.
const BALLAST_MIB: &str = "256";
const PORT: u16 = 7070;

struct Contender {
    label: &'static str,
    runtime: &'static str,
    checkpoint: Samples,
    restore: Samples,
    image_mib: Samples,
}

fn main() {
    let rounds = common::rounds(9);
    let mut node = Node::start(common::podsnap_node_options());
    let ctr = node.ctr().clone();
    let api = ContainerdApi::connect(&node.address(), NS).expect("containerd API");
    let mut contenders = [
        Contender::new("podsnap (containerd-shim-podsnap-v1)", "io.containerd.podsnap.v1"),
        Contender::new("containerd-shim-runc-v2 (Go)", "io.containerd.runc.v2"),
    ];
    let started = Instant::now();
    for round in 0..=rounds {
        // Alternate who goes first; round 0 warms both up and is not counted.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for index in order {
            let contender = &mut contenders[index];
            let (checkpoint, restore, image) = one_round(&node, &ctr, &api, contender.runtime, round);
            if round > 0 {
                contender.checkpoint.push(checkpoint);
                contender.restore.push(restore);
                contender.image_mib.push(image);
            }
            eprintln!(
                "round {round} {}: checkpoint {checkpoint:.2} s, restore {restore:.2} s, image {image:.0} MiB",
                contender.label
            );
        }
    }

    println!();
    println!(
        "### One container with {BALLAST_MIB} MiB dirtied memory: checkpoint and restore \
         (median of {rounds}, min-max; {:.0} s in all)",
        seconds(started.elapsed())
    );
    println!();
    println!(
        "Form: Tasks.Checkpoint with runc CheckpointOptions{{image_path, exit}} into a directory; \
         restore = Tasks.Create with runc Options{{criu_image_path}} + Tasks.Start."
    );
    println!();
    let rows: Vec<Vec<String>> = contenders
        .iter()
        .map(|c| {
            vec![
                c.label.to_owned(),
                c.checkpoint.cell(2),
                c.restore.cell(2),
                c.image_mib.cell(1),
            ]
        })
        .collect::<Vec<_>>()
        .into_iter()
        .chain(std::iter::once(vec![
            "ratio podsnap / Go shim".to_owned(),
            ratio(&contenders[0].checkpoint, &contenders[1].checkpoint),
            ratio(&contenders[0].restore, &contenders[1].restore),
            ratio(&contenders[0].image_mib, &contenders[1].image_mib),
        ]))
        .collect();
    print_table(
        &["shim", "checkpoint (s)", "restore to running (s)", "image (MiB)"],
        &rows,
    );
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

impl Contender {
    fn new(label: &'static str, runtime: &'static str) -> Self {
        Self {
            label,
            runtime,
            checkpoint: Samples::default(),
            restore: Samples::default(),
            image_mib: Samples::default(),
        }
    }
}

/// `ctr <verb> --runtime R --with-ns network:NETNS IMAGE id podsnap-workload serve ...`.
fn container_args(verb: &[&str], runtime: &str, netns: &Netns, id: &str) -> Vec<String> {
    let mut args: Vec<String> = verb.iter().map(|s| (*s).to_owned()).collect();
    let netns = format!("network:{}", netns.path.display());
    let port = PORT.to_string();
    args.extend(
        [
            "--runtime",
            runtime,
            "--with-ns",
            &netns,
            WORKLOAD_IMAGE,
            id,
            "podsnap-workload",
            "serve",
            "--name",
            id,
            "--port",
            &port,
            "--ballast-mib",
            BALLAST_MIB,
        ]
        .map(str::to_owned),
    );
    args
}

fn run_ctr(ctr: &Ctr, args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctr.run(NS, &args)
        .unwrap_or_else(|e| panic!("ctr {}: {e}", args.join(" ")));
}

/// One checkpoint and restore: (checkpoint s, restore s, image MiB).
fn one_round(node: &Node, ctr: &Ctr, api: &ContainerdApi, runtime: &str, round: usize) -> (f64, f64, f64) {
    let short = if runtime.contains("podsnap") { "ps" } else { "go" };
    let first_netns = Netns::new(node, &format!("bc-{short}-{round}-a"));
    let second_netns = Netns::new(node, &format!("bc-{short}-{round}-b"));
    let id = node.unique(&format!("bench-{short}-{round}"));
    let restored = node.unique(&format!("bench-{short}-{round}-r"));
    let images = node.dir().join("bench-checkpoints").join(&id);
    std::fs::create_dir_all(images.parent().unwrap_or(Path::new("/tmp"))).expect("checkpoint parent");

    run_ctr(ctr, &container_args(&["run", "-d"], runtime, &first_netns, &id));
    common::wait_status(ctr, NS, &id, "RUNNING");
    common::wait_answering(ctr, NS, &id, PORT);
    let ballast = common::try_ask(ctr, NS, &id, PORT, "ballast-sum").expect("ballast-sum");
    assert!(
        ballast.starts_with(&format!("ballast {BALLAST_MIB} MiB")),
        "{ballast}"
    );
    let count: u64 = common::try_ask(ctr, NS, &id, PORT, "count")
        .expect("count")
        .parse()
        .expect("a number");

    common::sync_disks();
    let clock = Instant::now();
    api.checkpoint(
        &id,
        &CheckpointOptions {
            image_path: images.to_string_lossy().into_owned(),
            exit: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("checkpoint of {id} ({runtime}): {e:#}"));
    let checkpoint = seconds(clock.elapsed());
    let image = mib(common::dir_size(&images));
    common::wait_status(ctr, NS, &id, "STOPPED");
    common::remove_container(ctr, NS, &id);

    run_ctr(
        ctr,
        &container_args(&["container", "create"], runtime, &second_netns, &restored),
    );
    common::sync_disks();
    let clock = Instant::now();
    api.create_restored_task(&restored, &images)
        .and_then(|_| api.start(&restored))
        .unwrap_or_else(|e| panic!("restore of {restored} ({runtime}): {e:#}"));
    let restore = seconds(clock.elapsed());

    common::wait_answering(ctr, NS, &restored, PORT);
    let after = common::try_ask(ctr, NS, &restored, PORT, "ballast-sum").expect("ballast-sum");
    assert_eq!(after, ballast, "the restored memory of {restored}");
    let resumed: u64 = common::try_ask(ctr, NS, &restored, PORT, "count")
        .expect("count")
        .parse()
        .expect("a number");
    assert!(resumed >= count, "{restored} counts {resumed}, was {count}");
    common::remove_container(ctr, NS, &restored);
    let _ = std::fs::remove_dir_all(&images);
    (checkpoint, restore, image)
}
