//! `podsnap-demo`: a three-container pod on a private containerd, through the podsnap shim,
//! checkpointed, removed and restored.
//!
//! Starts a throwaway node (its own containerd, CNI bridge and images; nothing of the host's
//! containerd is touched), runs the pod kubelet-style through CRI, prints what runs where,
//! shows the app reaching its sidecar over the pod's loopback, then dumps the pod with
//! `podsnap dump`, removes it, restores it with `podsnap restore` and prints each container's
//! in-memory counter before and after. Then it tears everything down.
//! `--keep` leaves the node running for a look around; `--teardown DIR` removes it later.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use k8s_cri::v1 as cri;
use podsnap_tests::kubelet::{
    ask, run_three_container_pod, wait_answering, PodOptions, ThreeContainerPod, APP_PORT, SIDECAR_PORT,
};
use podsnap_tests::node::{teardown_dir, Node, NodeOptions};
use podsnap_tests::{shim_binary, HANDLER};

#[derive(Debug, Parser)]
#[command(about = "Run a three-container pod through the podsnap shim on a private containerd")]
struct Args {
    /// The CRI runtime handler: podsnap (our shim) or runc (containerd's Go shim, to compare).
    #[arg(long, default_value = HANDLER)]
    handler: String,
    /// Leave the node and the pod running; remove them later with --teardown.
    #[arg(long)]
    keep: bool,
    /// Remove a node left by --keep (its directory) and exit.
    #[arg(long, value_name = "DIR")]
    teardown: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.teardown {
        Some(dir) => remove_kept(dir),
        None => demo(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podsnap-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn remove_kept(dir: &std::path::Path) -> Result<()> {
    let problems = teardown_dir(dir);
    if problems.is_empty() {
        println!("removed {}", dir.display());
        Ok(())
    } else {
        anyhow::bail!("teardown of {} left: {problems:#?}", dir.display())
    }
}

fn state_name(state: i32) -> &'static str {
    match cri::ContainerState::try_from(state) {
        Ok(cri::ContainerState::ContainerCreated) => "CREATED",
        Ok(cri::ContainerState::ContainerRunning) => "RUNNING",
        Ok(cri::ContainerState::ContainerExited) => "EXITED",
        _ => "UNKNOWN",
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(13)]
}

fn demo(args: &Args) -> Result<()> {
    let exe = std::env::current_exe().context("locating podsnap-demo")?;
    let bin_dir = exe.parent().context("podsnap-demo has no directory")?;
    let mut options = NodeOptions::new(bin_dir.join("podsnap-workload"));
    options.podsnap_shim = args.handler != "runc";
    options.keep = args.keep;
    options.log_level = "info".to_owned();

    println!("starting a private containerd (handler {}) ...", args.handler);
    let mut node = Node::start(options);
    let cri = node.cri().clone();
    println!("node       {}", node.dir().display());
    println!(
        "containerd pid {} socket {}",
        node.containerd_pid().map(|p| p.to_string()).unwrap_or_default(),
        node.address().display()
    );

    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("webapp"), &args.handler))?;
    let sandbox = &pod.pod;
    println!(
        "pod        {}/{} uid {} handler {}",
        sandbox.namespace, sandbox.name, sandbox.uid, sandbox.handler
    );
    println!("           id {} ip {}", sandbox.id, sandbox.ip);
    if let Some(netns) = &sandbox.netns {
        println!("           netns {netns} cgroup {}", sandbox.cgroup_parent());
    }
    let shim = shim_binary(&args.handler);
    let shims = node.shim_pids(shim);
    println!("shim       {shim} pid(s) {shims:?} (one process for the whole pod)");
    println!();
    println!(
        "{:<10} {:<14} {:<8} {:>7}  NOTE",
        "CONTAINER", "ID", "STATE", "PID"
    );
    let pause_pid = cri
        .sandbox_pid(&sandbox.id)?
        .map(|p| p.to_string())
        .unwrap_or_default();
    println!(
        "{:<10} {:<14} {:<8} {:>7}  holds the pod's network and IPC namespaces",
        "(pause)",
        short(&sandbox.id),
        "READY",
        pause_pid,
    );
    for (name, id) in pod.containers() {
        let status = cri.container(id)?;
        let pid = cri
            .container_pid(id)?
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".to_owned());
        let note = match name {
            "init" => format!("exit code {}, ran before the others", status.exit_code),
            "sidecar" => format!("serves :{SIDECAR_PORT}"),
            _ => format!("serves :{APP_PORT}"),
        };
        println!(
            "{:<10} {:<14} {:<8} {:>7}  {note}",
            name,
            short(id),
            state_name(status.state),
            pid
        );
    }
    println!();

    let through_app = ask(&sandbox.ip, APP_PORT, "get 127.0.0.1:9090 ping")?;
    println!("app -> sidecar over 127.0.0.1:9090: {through_app}");
    let exec = cri.exec(
        &pod.app_id,
        &["podsnap-workload", "client", "127.0.0.1:9090", "count"],
        20,
    )?;
    println!(
        "ExecSync in app: podsnap-workload client 127.0.0.1:9090 count -> {} (exit {})",
        String::from_utf8_lossy(&exec.stdout).trim(),
        exec.exit_code
    );
    println!("app counter: {}", ask(&sandbox.ip, APP_PORT, "count")?);
    println!("shared volume {}:", pod.volume.display());
    for entry in std::fs::read_dir(&pod.volume)?.flatten() {
        let lines = std::fs::read_to_string(entry.path())
            .map(|t| t.lines().count())
            .unwrap_or(0);
        println!("  {} ({lines} lines)", entry.file_name().to_string_lossy());
    }
    println!("logs       {}", sandbox.log_dir.display());

    if args.handler != "runc" {
        checkpoint_and_restore(&node, &pod)?;
    }

    if args.keep {
        println!();
        println!("kept. Look around with:");
        println!("  ctr -a {} -n k8s.io tasks ls", node.address().display());
        println!("remove it with:");
        println!("  podsnap-demo --teardown {}", node.dir().display());
        return Ok(());
    }
    println!();
    println!("stopping and removing the pods, then the node ...");
    for id in cri.pod_ids()? {
        cri.stop_and_remove_pod(&id)
            .context("StopPodSandbox/RemovePodSandbox")?;
    }
    let problems = node.teardown();
    if !problems.is_empty() {
        anyhow::bail!("teardown left: {problems:#?}");
    }
    println!("done: nothing left behind");
    Ok(())
}

/// Dumps the pod, removes it, restores it, and shows that its state came back.
fn checkpoint_and_restore(node: &Node, pod: &ThreeContainerPod) -> Result<()> {
    use podsnap_coordinator::dump::{dump, DumpRequest};
    use podsnap_coordinator::progress::for_stderr;
    use podsnap_coordinator::restore::{restore, RestoreRequest};

    let sandbox = &pod.pod;
    let cri = node.cri();
    let runtime = tokio::runtime::Runtime::new().context("starting a tokio runtime")?;
    println!();
    println!("letting the counters advance for 3 s ...");
    std::thread::sleep(std::time::Duration::from_secs(3));
    println!(
        "== podsnap dump --namespace {} --pod {}",
        sandbox.namespace, sandbox.name
    );
    let before_sidecar = ask(&sandbox.ip, SIDECAR_PORT, "count")?;
    let before_app = ask(&sandbox.ip, APP_PORT, "count")?;
    let mut request = DumpRequest::new(&sandbox.namespace, &sandbox.name);
    request.runtime_endpoint = node.endpoint();
    request.address = node.address();
    request.checkpoint_root = node.files().checkpoints();
    let dumped = runtime.block_on(dump(&request, for_stderr().as_ref()))?;
    let after_dump_app = ask(&sandbox.ip, APP_PORT, "count")?;
    println!("counters just before the dump: sidecar {before_sidecar}, app {before_app}");
    println!(
        "checkpoint {} ({} bytes) in {:?}; the pod kept running (app counter now {after_dump_app})",
        dumped.summary.dir.display(),
        dumped.summary.bytes,
        dumped.took
    );

    println!();
    println!("== removing the pod {}", short(&sandbox.id));
    cri.stop_and_remove_pod(&sandbox.id)
        .context("StopPodSandbox/RemovePodSandbox")?;

    println!();
    println!(
        "== podsnap restore --checkpoint-dir {}",
        dumped.summary.dir.display()
    );
    let mut request = RestoreRequest::new(&dumped.summary.dir);
    request.runtime_endpoint = node.endpoint();
    request.checkpoint_root = node.files().checkpoints();
    request.pods_dir = node.files().kubelet().join("pods");
    request.logs_dir = node.files().kubelet().join("logs").join("pods");
    let restored = runtime.block_on(restore(&request, for_stderr().as_ref()))?;
    println!(
        "restored pod {}/{} id {} ip {} (was {}) in {:?}",
        restored.namespace,
        restored.name,
        short(&restored.id),
        restored.ip,
        sandbox.ip,
        restored.took
    );
    for (name, id) in &restored.containers {
        let pid = cri.container_pid(id)?.map(|p| p.to_string()).unwrap_or_default();
        println!("  {name:<10} {:<14} pid {pid}", short(id));
    }
    for name in &restored.not_rerun {
        println!("  {name:<10} completed before the checkpoint: not run again");
    }
    wait_answering(&restored.ip, APP_PORT, std::time::Duration::from_secs(20))?;
    let sidecar_after = ask(&restored.ip, SIDECAR_PORT, "count")?;
    let app_after = ask(&restored.ip, APP_PORT, "count")?;
    println!();
    println!("{:<10} {:>16} {:>16}", "COUNTER", "BEFORE DUMP", "AFTER RESTORE");
    println!("{:<10} {:>16} {:>16}", "sidecar", before_sidecar, sidecar_after);
    println!("{:<10} {:>16} {:>16}", "app", before_app, app_after);
    println!(
        "app -> sidecar over 127.0.0.1:9090 after restore: {}",
        ask(&restored.ip, APP_PORT, "get 127.0.0.1:9090 ping")?
    );
    let volume = restored.pod_dir.join("volumes/kubernetes.io~empty-dir/data");
    let init_runs = std::fs::read_to_string(volume.join("init.log"))
        .map(|t| t.lines().count())
        .unwrap_or(0);
    println!(
        "init container ran {init_runs} time(s) in all; emptyDir {}:",
        volume.display()
    );
    for entry in std::fs::read_dir(&volume)?.flatten() {
        let lines = std::fs::read_to_string(entry.path())
            .map(|t| t.lines().count())
            .unwrap_or(0);
        println!("  {} ({lines} lines)", entry.file_name().to_string_lossy());
    }
    Ok(())
}
