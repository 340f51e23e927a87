//! Benchmark (issue 11): compressing a pod checkpoint for a registry push, podsnap's layers
//! (tar with fixed metadata, zstd from the `zstd` crate with its multi-threaded compressor)
//! against the `zstd` command at the same level and thread count (`tar -c FILES | zstd -T<cores>
//! -<level>`), on the same checkpoint: a pod of three containers with 256 MiB of dirtied memory
//! each (the workload's ballast: one byte value per page, so far more compressible than most
//! memory; both contenders see the same bytes). Each part (container, volume, the rest) is
//! compressed by both, alternating who goes first, several rounds; throughput is input bytes per
//! second; ratio is input / output.
//!
//! Two checkpoints: the workload's `mixed` ballast (a quarter each of one-byte pages, random
//! bytes, text and pointer-like words: closer to a real heap) is the one that says something;
//! the `uniform` ballast (every page one byte value) is degenerate, a few hundred KiB out of
//! 768 MiB, where per-frame overheads decide the ratio.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{print_table, ratio, seconds, Samples};
use podsnap_tests::kubelet::{self, ContainerSpec, PodOptions};
use podsnap_tests::node::{Node, NodeOptions};

/// podsnap's default level (`PODSNAP_BENCH_ZSTD_LEVEL` to change it), the command at the same.
fn level() -> i32 {
    std::env::var("PODSNAP_BENCH_ZSTD_LEVEL")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(podsnap_coordinator::oci::DEFAULT_ZSTD_LEVEL)
}

fn main() {
    let rounds = common::rounds(5);
    let mut options = NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    options.podsnap_shim = true;
    let node = Node::start(options);
    for content in ["mixed", "uniform"] {
        measure(&node, content, rounds);
    }
}

fn measure(node: &Node, content: &str, rounds: usize) {
    let name = node.unique(&format!("zstd-{content}"));
    let pod = kubelet::run_pod(node, &PodOptions::new(&name, "podsnap")).expect("RunPodSandbox");
    for (cname, port) in [("one", 8081u16), ("two", 8082), ("three", 8083)] {
        let port_s = port.to_string();
        let spec = ContainerSpec::workload(
            cname,
            &[
                "serve",
                "--name",
                cname,
                "--port",
                &port_s,
                "--ballast-mib",
                "256",
                "--ballast-content",
                content,
            ],
        );
        kubelet::run_container(node, &pod, &spec).expect("a container");
        kubelet::wait_answering(&pod.ip, port, Duration::from_secs(60)).expect("answers");
    }
    let dir = node.files().checkpoints().join(&name);
    let mut request = podsnap_coordinator::dump::DumpRequest::new("default", &name);
    request.runtime_endpoint = node.endpoint();
    request.address = node.address();
    request.checkpoint_root = node.files().checkpoints();
    request.dir = Some(dir.clone());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(podsnap_coordinator::dump::dump(
            &request,
            &podsnap_coordinator::progress::Quiet,
        ))
        .expect("the pod checkpoint");
    kubelet::remove_pod(node, &pod).expect("the pod removed once dumped");
    let parts = podsnap_coordinator::oci::parts_in(&dir).expect("a valid checkpoint");
    let manifest = podsnap_tests::checkpoint::read_manifest(&dir).expect("its manifest");
    let input: u64 = manifest.files.values().map(|f| f.size).sum();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let (mut ours, mut cli) = (Samples::default(), Samples::default());
    let (mut ours_out, mut cli_out) = (0u64, 0u64);
    for round in 0..=rounds {
        for first in [round % 2 == 0, round % 2 != 0] {
            let clock = Instant::now();
            let out: u64 = if first {
                parts
                    .iter()
                    .map(|(part, files)| {
                        podsnap_coordinator::oci::compressed_part_size(&dir, part, files, level())
                            .expect("podsnap layer")
                    })
                    .sum()
            } else {
                parts
                    .values()
                    .map(|files| zstd_command(&dir, files, threads))
                    .sum()
            };
            let took = seconds(clock.elapsed());
            eprintln!(
                "round {round} {}: {:.2} s, {} -> {} bytes",
                if first { "podsnap" } else { "zstd command" },
                took,
                input,
                out
            );
            if round > 0 {
                let mibs = input as f64 / (1024.0 * 1024.0) / took;
                if first {
                    ours.push(mibs);
                    ours_out = out;
                } else {
                    cli.push(mibs);
                    cli_out = out;
                }
            }
        }
    }
    println!();
    println!(
        "### Compressing a 3 x 256 MiB pod checkpoint, {content} ballast ({:.0} MiB in {} parts), \
         zstd level {}, {threads} threads (median of {rounds}, min-max)",
        input as f64 / (1024.0 * 1024.0),
        parts.len(),
        level()
    );
    println!();
    let row = |label: &str, s: &Samples, out: u64| {
        vec![
            label.to_owned(),
            s.cell(0),
            format!("{:.1}", input as f64 / out.max(1) as f64),
            format!("{:.1}", out as f64 / (1024.0 * 1024.0)),
        ]
    };
    print_table(
        &["contender", "throughput MiB/s (input)", "ratio", "compressed MiB"],
        &[
            row("podsnap layers (zstd crate, multi-threaded)", &ours, ours_out),
            row("tar, then the zstd command", &cli, cli_out),
            vec![
                "podsnap / zstd command".to_owned(),
                ratio(&ours, &cli),
                format!("{:.2}x", cli_out as f64 / ours_out.max(1) as f64),
                String::new(),
            ],
        ],
    );
    std::fs::remove_dir_all(&dir).expect("the checkpoint removed");
}

/// `tar -c FILES | zstd -T<threads> -<level> -c`, counting the compressed bytes.
fn zstd_command(dir: &Path, files: &[String], threads: usize) -> u64 {
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg("-")
        .args(files)
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let tar_out = tar.stdout.take().expect("tar stdout");
    let zstd = Command::new("zstd")
        .arg(format!("-T{threads}"))
        .arg(format!("-{}", level()))
        .arg("-c")
        .stdin(tar_out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("zstd");
    let output = zstd.wait_with_output().expect("zstd output");
    assert!(tar.wait().expect("tar").success(), "tar failed");
    assert!(output.status.success(), "zstd failed");
    output.stdout.len() as u64
}
