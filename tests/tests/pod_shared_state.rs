//! What a pod's containers share comes back with the pod (issue 9): its `/dev/shm` and the SysV
//! objects of its IPC namespace, its PID namespace when it shares one, TCP connections between
//! its containers over loopback, a listening unix socket in a volume, its address when asked
//! (`--keep-ip`); what cannot come back is refused at the dump with the processes or containers
//! named, and the pod runs on.

mod pod_checkpoint_support;

use std::os::unix::fs::FileTypeExt;
use std::time::{Duration, Instant};

use pod_checkpoint_support::*;
use podsnap_tests::kubelet::{
    ask, run_container, run_pod, wait_answering, ContainerSpec, KubePod, PodOptions, APP_PORT, SIDECAR_PORT,
};
use podsnap_tests::node::Node;
use podsnap_tests::{start_node, HANDLER};

/// `serve --name NAME --port PORT` with `extra` flags, in the workload image.
fn server(name: &str, port: u16, extra: &[&str]) -> ContainerSpec {
    let port = port.to_string();
    let mut args = vec!["serve", "--name", name, "--port", &port];
    args.extend_from_slice(extra);
    ContainerSpec::workload(name, &args)
}

/// Runs a pod of `options` with `containers`, each answering on its port.
fn pod_of(node: &Node, options: &PodOptions, containers: &[(ContainerSpec, u16)]) -> KubePod {
    let pod = run_pod(node, options).expect("sandbox");
    for (spec, _) in containers {
        run_container(node, &pod, spec).unwrap_or_else(|e| panic!("{} runs: {e:#}", spec.name));
    }
    for (spec, port) in containers {
        wait_answering(&pod.ip, *port, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{} answers: {e:#}", spec.name));
    }
    pod
}

/// A pod named `name` of the podsnap handler, its containers in one PID namespace when
/// `share_pids` (`shareProcessNamespace`), else each in its own (kubelet's default).
fn pod_options(name: &str, share_pids: bool) -> PodOptions {
    let mut options = PodOptions::new(name, HANDLER);
    options.share_process_namespace = share_pids;
    options
}

/// `podsnap dump` of pod `name` (namespace default) into `dir`, the request changed by `edit`.
fn dump_pod(
    node: &Node,
    name: &str,
    dir: &std::path::Path,
    edit: impl FnOnce(&mut podsnap_coordinator::dump::DumpRequest),
) -> podsnap_coordinator::Result<podsnap_coordinator::dump::DumpOutcome> {
    let mut request = dump_request(node, name, "default", Some(dir.to_path_buf()));
    edit(&mut request);
    block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Lines,
    ))
}

/// `pos N` of the workload's `held` answer.
fn held_pos(answer: &str) -> u64 {
    answer
        .split_whitespace()
        .skip_while(|w| *w != "pos")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no position in {answer:?}"))
}

#[test]
fn dev_shm_files_written_and_held_open_come_back() {
    dev_shm_files_written_and_held_open_come_back_in(false);
}

/// The same in a pod sharing one PID namespace.
#[test]
fn dev_shm_files_written_and_held_open_come_back_in_a_pod_sharing_pids() {
    dev_shm_files_written_and_held_open_come_back_in(true);
}

fn dev_shm_files_written_and_held_open_come_back_in(share_pids: bool) {
    let node = start_node!();
    let name = node.unique("shm");
    let app = server("app", APP_PORT, &["--hold-file", "/dev/shm/held"]);
    let pod = pod_of(&node, &pod_options(&name, share_pids), &[(app, APP_PORT)]);
    assert_eq!(
        ask(&pod.ip, APP_PORT, "posix-shm-write note hello").expect("write"),
        "ok"
    );
    // The app appends to the held file as it counts: wait until it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let held = ask(&pod.ip, APP_PORT, "held").expect("held");
        if held_pos(&held) > 0 {
            break held;
        }
        assert!(
            Instant::now() < deadline,
            "the app never appended to its held file: {held}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(before.contains("path /dev/shm/held"), "{before}");

    let dir = node.files().checkpoints().join("shm");
    dump_pod(&node, &name, &dir, |_| {}).expect("podsnap dump");
    let m = verified(&node, &dir);
    assert_eq!(
        m.dev_shm.as_deref(),
        Some("pod/dev-shm.tar"),
        "the pod's /dev/shm is captured"
    );
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the original pod goes");

    let restored = restore(&node, &restore_request(&node, &dir)).expect("podsnap restore");
    wait_answering(&restored.ip, APP_PORT, Duration::from_secs(20)).expect("the restored app answers");
    assert_eq!(
        ask(&restored.ip, APP_PORT, "posix-shm-read note").expect("read"),
        "hello",
        "a file the app wrote in /dev/shm is back"
    );
    let after = ask(&restored.ip, APP_PORT, "held").expect("held");
    assert!(
        after.contains("path /dev/shm/held"),
        "the held descriptor is back: {after}"
    );
    assert!(
        held_pos(&after) >= held_pos(&before),
        "the held file goes on from where it was: {before} -> {after}"
    );
}

/// The SysV objects of the pod's IPC namespace (a segment the app keeps attached, a semaphore
/// set, a queue of messages) and a `/dev/shm` file it keeps mapped come back with the same ids,
/// contents and values, shared again by the pod's containers; a unix socket listening in an
/// emptyDir neither stops the dump nor stays behind: it listens again after the restore.
#[test]
fn sysv_ipc_and_unix_listeners_come_back() {
    sysv_ipc_and_unix_listeners_come_back_in(false);
}

/// The same in a pod sharing one PID namespace.
#[test]
fn sysv_ipc_and_unix_listeners_come_back_in_a_pod_sharing_pids() {
    sysv_ipc_and_unix_listeners_come_back_in(true);
}

fn sysv_ipc_and_unix_listeners_come_back_in(share_pids: bool) {
    let node = start_node!();
    let name = node.unique("ipc");
    let app = server(
        "app",
        APP_PORT,
        &["--ipc-probe", "7100", "--unix-listen", "/shared/app.sock"],
    )
    .with_empty_dir("shared", "/shared");
    let sidecar = server("sidecar", SIDECAR_PORT, &[]).with_empty_dir("shared", "/shared");
    let pod = pod_of(
        &node,
        &pod_options(&name, share_pids),
        &[(app, APP_PORT), (sidecar, SIDECAR_PORT)],
    );
    let before = ask(&pod.ip, APP_PORT, "ipc-check").expect("ipc-check");
    assert!(before.starts_with("ipc shm "), "{before}");
    assert!(before.contains("sem 3,7 msg 2 alpha"), "{before}");
    assert_eq!(
        ask(&pod.ip, SIDECAR_PORT, "shm-read 7100").expect("shm-read"),
        "probe-7100",
        "the sidecar sees the app's segment (one IPC namespace)"
    );
    let socket = pod.empty_dir("shared").expect("volume").join("app.sock");
    assert!(
        std::fs::symlink_metadata(&socket)
            .expect("the socket file")
            .file_type()
            .is_socket(),
        "the app listens at {}",
        socket.display()
    );

    let dir = node.files().checkpoints().join("ipc");
    dump_pod(&node, &name, &dir, |_| {})
        .expect("podsnap dump (a listening socket in a volume does not stop it)");
    let m = verified(&node, &dir);
    assert_eq!(m.sysv_ipc.as_deref(), Some("pod/sysv-ipc.json"));
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the original pod goes");

    let restored = restore(&node, &restore_request(&node, &dir)).expect("podsnap restore");
    wait_answering(&restored.ip, APP_PORT, Duration::from_secs(20)).expect("the app answers");
    assert_eq!(
        ask(&restored.ip, APP_PORT, "ipc-check").expect("ipc-check"),
        before,
        "the attached segment, the semaphores, the queue and the mapped /dev/shm file are back"
    );
    assert_eq!(
        ask(&restored.ip, SIDECAR_PORT, "shm-read 7100").expect("shm-read"),
        "probe-7100",
        "the containers share the segment again"
    );
    assert_eq!(
        ask(&restored.ip, SIDECAR_PORT, "peer-connect unix /shared/app.sock").expect("connect"),
        "ok",
        "the app listens on its unix socket again"
    );
    let reply = ask(&restored.ip, SIDECAR_PORT, "peer-check").expect("peer-check");
    assert!(reply.ends_with("reply pong app"), "{reply}");
}

/// A TCP connection between two containers of the pod over 127.0.0.1 moves with the pod: after
/// the restore the same connection (same local port) carries data again, without
/// `--tcp-established` (both ends move together). A connection from outside the pod, not kept
/// without `--tcp-established`, is closed in the restored pod.
#[test]
fn loopback_tcp_between_containers_survives() {
    loopback_tcp_between_containers_survives_in(false);
}

/// The same in a pod sharing one PID namespace.
#[test]
fn loopback_tcp_between_containers_survives_in_a_pod_sharing_pids() {
    loopback_tcp_between_containers_survives_in(true);
}

fn loopback_tcp_between_containers_survives_in(share_pids: bool) {
    let node = start_node!();
    let name = node.unique("loop");
    let (app, sidecar) = (server("app", APP_PORT, &[]), server("sidecar", SIDECAR_PORT, &[]));
    let pod = pod_of(
        &node,
        &pod_options(&name, share_pids),
        &[(app, APP_PORT), (sidecar, SIDECAR_PORT)],
    );
    let target = format!("peer-connect tcp 127.0.0.1:{SIDECAR_PORT}");
    assert_eq!(ask(&pod.ip, APP_PORT, &target).expect("connect"), "ok");
    let before = ask(&pod.ip, APP_PORT, "peer-check").expect("peer-check");
    assert!(before.ends_with("checks 1 reply pong sidecar"), "{before}");
    // A client outside the pod keeps a connection open across the dump.
    let outside = std::net::TcpStream::connect((pod.ip.as_str(), APP_PORT)).expect("connect");
    let local = |reply: &str| {
        reply
            .split_whitespace()
            .skip_while(|w| *w != "local")
            .nth(1)
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no local port in {reply:?}"))
    };

    let dir = node.files().checkpoints().join("loop");
    dump_pod(&node, &name, &dir, |_| {}).expect("podsnap dump");
    let m = verified(&node, &dir);
    assert_eq!(m.loopback_linked, ["app", "sidecar"], "the dump saw the link");
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the original pod goes");
    let restored = restore(&node, &restore_request(&node, &dir)).expect("podsnap restore");
    wait_answering(&restored.ip, APP_PORT, Duration::from_secs(20)).expect("the app answers");
    let after = ask(&restored.ip, APP_PORT, "peer-check").expect("peer-check");
    assert!(
        after.ends_with("checks 2 reply pong sidecar"),
        "the same connection carries data after the restore: {after}"
    );
    assert_eq!(
        local(&after),
        local(&before),
        "the same connection: {before} / {after}"
    );
    drop(outside);
    let netns = node
        .cri()
        .pod_netns(&restored.id)
        .expect("pod status")
        .expect("the restored pod's netns");
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["ss", "-t", "-n", "-H", "state", "established"])
        .output()
        .expect("ss");
    let established = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = established.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        2,
        "both ends of the loopback connection, nothing else: {established}"
    );
    assert!(
        lines.iter().all(|l| l.matches("127.0.0.1:").count() == 2),
        "only loopback connections are left: {established}"
    );
}

/// A pod sharing one PID namespace (`shareProcessNamespace`) comes back with every container's
/// processes at their PIDs, in the new pod's namespace.
#[test]
fn a_pod_sharing_one_pid_namespace_comes_back_with_its_pids() {
    let node = start_node!();
    let name = node.unique("spid");
    let mut options = PodOptions::new(&name, HANDLER);
    options.share_process_namespace = true;
    let (app, sidecar) = (server("app", APP_PORT, &[]), server("sidecar", SIDECAR_PORT, &[]));
    let pod = pod_of(&node, &options, &[(app, APP_PORT), (sidecar, SIDECAR_PORT)]);
    let pids = |ip: &str| {
        [APP_PORT, SIDECAR_PORT].map(|p| ask(ip, p, "pid").expect("pid").parse::<u32>().expect("a pid"))
    };
    let before = pids(&pod.ip);
    assert!(
        before.iter().all(|p| *p > 1),
        "one namespace, pause is 1: {before:?}"
    );
    assert_ne!(before[0], before[1], "one PID namespace for both: {before:?}");
    // The sidecar's child has a high id: after 300 processes came and went in the namespace.
    let child = ask(&pod.ip, SIDECAR_PORT, "spawn-child 300").expect("spawn-child");
    let child: u32 = child
        .strip_prefix("child pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{child}"));
    assert!(child > 300, "{child}");

    let dir = node.files().checkpoints().join("spid");
    dump_pod(&node, &name, &dir, |_| {}).expect("podsnap dump");
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the original pod goes");
    let restored = restore(&node, &restore_request(&node, &dir)).expect("podsnap restore");
    wait_answering(&restored.ip, APP_PORT, Duration::from_secs(20)).expect("the app answers");
    wait_answering(&restored.ip, SIDECAR_PORT, Duration::from_secs(20)).expect("sidecar answers");
    assert_eq!(pids(&restored.ip), before, "every process at its PID");
    // The namespace hands out ids above the checkpoint's (restores run side by side: a new
    // process of one container must not take an id another's restore needs).
    let spawned = ask(&restored.ip, APP_PORT, "spawn-daemon 7070").expect("spawn-daemon");
    let new_pid: u32 = spawned
        .strip_prefix("daemon pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{spawned}"));
    assert!(
        new_pid > child,
        "a new process after the restore gets an id above the recorded ones: {new_pid} / {child}"
    );
}

/// In a pod sharing one PID namespace, a server that daemonizes is adopted by the pause
/// process: outside every container's process tree. The dump takes it on its own (the manifest
/// names it with its container), and the restore brings it back beside its container: at its
/// PID, in its container's cgroup, its counter going on, serving on its port.
#[test]
fn a_process_adopted_by_pause_comes_back_and_serves() {
    adopted_process_comes_back(Driver::Cli);
}

/// The same on the kubelet path (the pod annotated with the checkpoint).
#[test]
fn a_process_adopted_by_pause_comes_back_on_the_kubelet_path() {
    adopted_process_comes_back(Driver::Kubelet);
}

fn adopted_process_comes_back(driver: Driver) {
    let node = start_node!();
    let name = node.unique("orphan");
    let mut options = PodOptions::new(&name, HANDLER);
    options.share_process_namespace = true;
    let sidecar = server("sidecar", SIDECAR_PORT, &[]);
    let pod = pod_of(&node, &options, &[(sidecar.clone(), SIDECAR_PORT)]);
    let spawned = ask(&pod.ip, SIDECAR_PORT, "spawn-daemon 7070").expect("spawn-daemon");
    let daemon_pid: u32 = spawned
        .strip_prefix("daemon pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{spawned}"));
    wait_answering(&pod.ip, 7070, Duration::from_secs(20)).expect("the daemon answers");
    let count = |ip: &str, port| ask(ip, port, "count").expect("count").parse::<u64>().expect("n");
    let daemon_before = podsnap_tests::kubelet::wait_count_above(&pod.ip, 7070, 0, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the daemon counts: {e:#}"));

    let dir = node.files().checkpoints().join("orphan");
    dump_pod(&node, &name, &dir, |_| {}).expect("podsnap dump");
    let m = verified(&node, &dir);
    assert_eq!(
        m.adopted,
        vec![podsnap_tests::checkpoint::Adopted {
            container: "sidecar".into(),
            pid: daemon_pid
        }]
    );
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the original pod goes");

    let (ip, sidecar_id) = match driver {
        Driver::Cli => {
            let restored = restore(&node, &restore_request(&node, &dir)).expect("podsnap restore");
            let id = container_named(&node, &restored.id, "sidecar").id;
            (restored.ip, id)
        }
        Driver::Kubelet => {
            let mut annotated = options.clone();
            annotated
                .annotations
                .insert("podsnap.io/restore-from".to_owned(), "orphan".to_owned());
            let new_pod = run_pod(&node, &annotated).expect("the annotated sandbox");
            let id = run_container(&node, &new_pod, &sidecar).expect("the sidecar restored");
            (new_pod.ip.clone(), id)
        }
    };
    wait_answering(&ip, SIDECAR_PORT, Duration::from_secs(20)).expect("the sidecar answers");
    wait_answering(&ip, 7070, Duration::from_secs(20)).expect("the daemon answers again");
    assert_eq!(ask(&ip, 7070, "ping").expect("ping"), "pong daemon");
    assert_eq!(
        ask(&ip, 7070, "pid").expect("pid"),
        daemon_pid.to_string(),
        "at its PID in the new pod's namespace"
    );
    let after = count(&ip, 7070);
    assert!(
        after >= daemon_before,
        "its counter goes on: {after} < {daemon_before}"
    );
    let moved = node.log_grep("adopted by the pod's pause process) restored as pid");
    assert!(
        moved.len() == 1 && moved[0].contains("1 processes, 1 moved into the container's cgroup"),
        "{moved:?}"
    );
    // In every hierarchy, the cgroup2 one of a hybrid node included (runc 1.2+ kills a
    // container through its cgroup.kill: a daemon left elsewhere survived the pod's stop).
    let sidecar_pid = node
        .cri()
        .container_pid(&sidecar_id)
        .expect("ContainerStatus")
        .expect("the sidecar's pid");
    let pid_namespace = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let daemon: Vec<i32> = podsnap_tests::host::processes()
        .into_iter()
        .filter(|(p, argv)| {
            argv.join(" ").contains("--name daemon") && pid_namespace(*p) == pid_namespace(sidecar_pid)
        })
        .map(|(p, _)| p)
        .collect();
    assert_eq!(daemon.len(), 1, "the daemon in the pod: {daemon:?}");
    let cgroups = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroups");
    assert_eq!(
        cgroups(daemon[0]),
        cgroups(sidecar_pid),
        "the restored daemon shares the sidecar's cgroups"
    );

    // Its parent is now the shim that restored it, not pause: the restored pod dumps again,
    // the daemon still taken as adopted.
    let again = node.files().checkpoints().join("orphan-again");
    dump_pod(&node, &name, &again, |_| {}).expect("the restored pod dumps again");
    let m = verified(&node, &again);
    assert_eq!(m.adopted.len(), 1, "{:?}", m.adopted);
    assert_eq!(m.adopted[0].pid, daemon_pid);
    assert!(count(&ip, 7070) >= after, "the daemon runs on after that dump");
}

/// A process the pause process adopted is dumped by a CRIU run of its own: a unix connection
/// from it to its container's main process cannot be taken. The dump is refused saying so,
/// and the pod runs on.
#[test]
fn an_adopted_process_connected_to_its_container_is_refused() {
    let node = start_node!();
    let name = node.unique("orphan-unix");
    let sidecar = server("sidecar", SIDECAR_PORT, &["--unix-listen", "@podsnap-sidecar"]);
    let pod = pod_of(&node, &pod_options(&name, true), &[(sidecar, SIDECAR_PORT)]);
    let spawned = ask(&pod.ip, SIDECAR_PORT, "spawn-daemon 7070").expect("spawn-daemon");
    assert!(spawned.starts_with("daemon pid "), "{spawned}");
    wait_answering(&pod.ip, 7070, Duration::from_secs(20)).expect("the daemon answers");
    assert_eq!(
        ask(&pod.ip, 7070, "peer-connect unix @podsnap-sidecar").expect("connect"),
        "ok"
    );
    let dir = node.files().checkpoints().join("orphan-unix");
    let err = dump_pod(&node, &name, &dir, |_| {})
        .expect_err("refused")
        .to_string();
    assert!(err.contains("adopted by the pod's pause process"), "{err}");
    assert!(err.contains("the pod was left running"), "{err}");
    assert!(!dir.exists(), "no checkpoint is left");
    let check = ask(&pod.ip, 7070, "peer-check").expect("peer-check");
    assert!(
        check.ends_with("checks 1 reply pong sidecar"),
        "the pod runs on: {check}"
    );
}

/// A unix socket connection from one container to another's listener in a shared emptyDir
/// comes back: each container's CRIU dumps its end as external, the restore hands both ends of
/// one new connection in, with what sat in each end's queue at the dump. The sidecar's end holds
/// an unread reply; the app, paused by its owner, has not read a request the sidecar sent.
/// After the restore (and the app's resume) the sidecar reads the old reply, then the app's
/// answer to the old request, then goes on over the same connection (its check counter
/// continues).
#[test]
fn a_unix_connection_between_containers_comes_back_with_what_was_queued() {
    unix_connection_comes_back("/shared/app.sock", false, Driver::Cli);
}

/// The same on the kubelet path (the pod annotated with the checkpoint, its containers created
/// one after another as kubelet does): the first restore makes the pair, the second takes its
/// end later.
#[test]
fn a_unix_connection_comes_back_on_the_kubelet_path() {
    unix_connection_comes_back("/shared/app.sock", false, Driver::Kubelet);
}

/// How a restore is driven.
#[derive(Clone, Copy)]
enum Driver {
    /// `podsnap restore`.
    Cli,
    /// A pod annotated `podsnap.io/restore-from`, created the way kubelet creates it.
    Kubelet,
}

/// The same over an abstract socket of the pod's network namespace, in a pod sharing one PID
/// namespace (`shareProcessNamespace`).
#[test]
fn an_abstract_unix_connection_comes_back_in_a_pod_sharing_pids() {
    unix_connection_comes_back("@podsnap-app", true, Driver::Cli);
}

fn unix_connection_comes_back(address: &str, share_pids: bool, driver: Driver) {
    let node = start_node!();
    let name = node.unique("unix");
    let app = server("app", APP_PORT, &["--unix-listen", address]).with_empty_dir("shared", "/shared");
    let sidecar = server("sidecar", SIDECAR_PORT, &[]).with_empty_dir("shared", "/shared");
    let pod = pod_of(
        &node,
        &pod_options(&name, share_pids),
        &[(app.clone(), APP_PORT), (sidecar.clone(), SIDECAR_PORT)],
    );
    assert_eq!(
        ask(&pod.ip, SIDECAR_PORT, &format!("peer-connect unix {address}")).expect("connect"),
        "ok"
    );
    let first = ask(&pod.ip, SIDECAR_PORT, "peer-check").expect("peer-check");
    assert!(first.ends_with("checks 1 reply pong app"), "{first}");
    // The app answers at once; its answer waits, unread, in the sidecar's socket.
    assert_eq!(
        ask(&pod.ip, SIDECAR_PORT, "peer-send count").expect("send"),
        "sent"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while ask(&pod.ip, SIDECAR_PORT, "peer-pending").expect("peer-pending") == "pending 0" {
        assert!(
            Instant::now() < deadline,
            "the app's answer never reached the sidecar"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let app_id = container_named(&node, &pod.id, "app").id;
    node.ctr()
        .run(podsnap_tests::ctr::CRI_NAMESPACE, &["task", "pause", &app_id])
        .expect("ctr task pause");
    // The paused app cannot read: the request waits in the app's socket.
    assert_eq!(
        ask(&pod.ip, SIDECAR_PORT, "peer-send ping").expect("send"),
        "sent"
    );

    let dir = node.files().checkpoints().join("unix");
    dump_pod(&node, &name, &dir, |_| {}).expect("podsnap dump");
    let m = verified(&node, &dir);
    assert_eq!(m.unix_links.len(), 1, "{:?}", m.unix_links);
    let mut ends: Vec<&str> = m.unix_links[0]
        .ends
        .iter()
        .map(|e| e.container.as_str())
        .collect();
    ends.sort();
    assert_eq!(ends, ["app", "sidecar"]);
    assert_eq!(m.unix_links[0].kind, "stream");
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the original pod goes");

    let (ip, new_app) = match driver {
        Driver::Cli => {
            let restored = restore(&node, &restore_request(&node, &dir)).expect("podsnap restore");
            let app = container_named(&node, &restored.id, "app").id;
            (restored.ip, app)
        }
        Driver::Kubelet => {
            let mut options = pod_options(&name, share_pids);
            options
                .annotations
                .insert("podsnap.io/restore-from".to_owned(), "unix".to_owned());
            let new_pod = run_pod(&node, &options).expect("the annotated sandbox");
            let app = run_container(&node, &new_pod, &app).expect("the app restored");
            run_container(&node, &new_pod, &sidecar).expect("the sidecar restored");
            (new_pod.ip.clone(), app)
        }
    };
    wait_answering(&ip, SIDECAR_PORT, Duration::from_secs(20)).expect("the sidecar answers");
    assert_eq!(
        node.ctr()
            .task_status(podsnap_tests::ctr::CRI_NAMESPACE, &new_app)
            .expect("ctr task ls")
            .as_deref(),
        Some("PAUSED"),
        "the app was paused at the checkpoint"
    );
    node.ctr()
        .run(podsnap_tests::ctr::CRI_NAMESPACE, &["task", "resume", &new_app])
        .expect("ctr task resume");
    let queued = ask(&ip, SIDECAR_PORT, "peer-read").expect("peer-read");
    assert!(
        queued
            .strip_prefix("peer read ")
            .is_some_and(|n| n.parse::<u64>().is_ok()),
        "the app's answer to count, unread at the dump, comes first: {queued}"
    );
    assert_eq!(
        ask(&ip, SIDECAR_PORT, "peer-read").expect("peer-read"),
        "peer read pong app",
        "the app read the request that waited in its socket and answered it"
    );
    let again = ask(&ip, SIDECAR_PORT, "peer-check").expect("peer-check");
    assert!(
        again.contains("kind unix") && again.ends_with("checks 2 reply pong app"),
        "the same connection carries data on: {again}"
    );
    assert!(
        node.log_grep("unix connection 0 of the checkpoint").len() == 1,
        "one pair was made for the two containers"
    );
}

/// `podsnap restore --keep-ip`: restored on its node after a dump that kept connections and
/// stopped the pod, the pod gets its address back (podsnap-cni-ipam asks host-local for it), and
/// a client outside the pod goes on over the connection it had. While that pod holds the
/// address, another restore asking for it is refused with the reason, and creates nothing.
#[test]
fn keep_ip_brings_the_address_back_and_an_outside_connection_goes_on() {
    use std::io::{BufRead, BufReader, Write};
    let node = start_node!();
    let name = node.unique("keep");
    let app = server("app", APP_PORT, &[]);
    let pod = pod_of(&node, &PodOptions::new(&name, HANDLER), &[(app, APP_PORT)]);
    let stream = std::net::TcpStream::connect((pod.ip.as_str(), APP_PORT)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut call = |command: &str| {
        writer.write_all(format!("{command}\n").as_bytes()).expect("send");
        let mut line = String::new();
        reader.read_line(&mut line).expect("the same connection answers");
        line.trim().to_owned()
    };
    assert_eq!(call("ping"), "pong app");

    let dir = node.files().checkpoints().join("keep");
    dump_pod(&node, &name, &dir, |r| {
        r.tcp_established = true;
        r.stop = true;
    })
    .expect("podsnap dump --tcp-established --stop");
    let m = verified(&node, &dir);
    assert_eq!(
        m.pod.ips,
        vec![pod.ip.parse::<std::net::IpAddr>().expect("ip")],
        "the dump records the pod's address"
    );
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the stopped pod goes");

    let mut restore_keep = restore_request(&node, &dir);
    restore_keep.keep_ip = true;
    let restored = restore(&node, &restore_keep).expect("podsnap restore --keep-ip");
    assert_eq!(restored.ip, pod.ip, "the pod's address is back");
    assert_eq!(
        call("ping"),
        "pong app",
        "the outside client's connection goes on after the restore"
    );

    let before = sandbox_ids(&node).len();
    let mut again = restore_request(&node, &dir);
    again.keep_ip = true;
    again.name = Some(format!("{name}-again"));
    let err = restore(&node, &again)
        .expect_err("the address is taken")
        .to_string();
    assert!(err.contains("cannot be had"), "{err}");
    assert_eq!(sandbox_ids(&node).len(), before, "nothing was created");
}
