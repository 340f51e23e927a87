//! Faults during a pod dump, against the real stack: the shim killed at each phase, a CRIU
//! that hangs, a client that gives up, a full disk, lifecycle calls racing the dump, four pods
//! at once, and `--stop` with writers that must show nothing after the snapshot. After each:
//! no frozen cgroup, no staging output, no journal left, and the pod running as it was (or,
//! when its shim died, reported exited); a checkpoint committed before the shim died is kept
//! whole, and its `--stop` finished.

mod pod_checkpoint_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use pod_checkpoint_support::*;
use podsnap_coordinator::dump::DumpRequest;
use podsnap_coordinator::progress::Lines;
use podsnap_tests::host::Tmpfs;
use podsnap_tests::kubelet::{
    ask, container_config, image_id, run_container, run_pod, run_three_container_pod, wait_answering,
    wait_count_above, ContainerSpec, KubePod, PodOptions, ThreeContainerPod, APP_PORT, DATA_MOUNT,
    DATA_VOLUME,
};
use podsnap_tests::node::{Node, NodeOptions};
use podsnap_tests::{host, HANDLER, PODSNAP_SHIM};

const HOLD_ENV: &str = "PODSNAP_FAILPOINT_HOLD";

fn workload_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload"))
}

/// A node whose shims hold at the dump phases armed in `holds`.
fn node_with_holds(holds: &Path) -> Node {
    let mut options = NodeOptions::new(workload_bin());
    options
        .extra_env
        .push((HOLD_ENV.to_owned(), holds.display().to_string()));
    Node::start(options)
}

/// The cgroups of pod `uid` whose freezer is not THAWED.
fn frozen_cgroups(uid: &str) -> Vec<PathBuf> {
    host::pod_cgroup_tree(uid)
        .into_iter()
        .filter(|d| std::fs::read_to_string(d.join("freezer.state")).is_ok_and(|s| s.trim() != "THAWED"))
        .collect()
}

/// Waits until containerd reports the pod's containers exited (after its shim died).
fn wait_exited_in_cri(node: &Node, pod: &ThreeContainerPod, what: &str) {
    wait_for(
        &format!("{what}: containerd to see the containers exited"),
        Duration::from_secs(30),
        || {
            [&pod.sidecar_id, &pod.app_id].iter().all(|id| {
                node.cri()
                    .container(id)
                    .is_ok_and(|s| s.state == cri::ContainerState::ContainerExited as i32)
            })
        },
    );
}

/// Processes left in pod `uid`'s cgroups (counted in the freezer hierarchy).
fn pod_processes(uid: &str) -> usize {
    host::pod_cgroup_tree(uid)
        .into_iter()
        .filter(|d| d.starts_with("/sys/fs/cgroup/freezer"))
        .map(|d| {
            std::fs::read_to_string(d.join("cgroup.procs"))
                .map(|t| t.lines().count())
                .unwrap_or(0)
        })
        .sum()
}

/// Entries of the checkpoint root other than finished checkpoints (staging directories).
fn staging_left(node: &Node) -> Vec<String> {
    std::fs::read_dir(node.files().checkpoints())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

fn journal_of(sandbox: &str) -> PathBuf {
    podsnap_tests::paths::journal(sandbox)
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Dumps `pod` in the background (the library, as `podsnap dump` does); the handle answers
/// the outcome.
fn dump_in_background(
    node: &Node,
    pod: &KubePod,
    dir: PathBuf,
    edit: impl FnOnce(&mut DumpRequest),
) -> std::thread::JoinHandle<Result<(), String>> {
    let mut request = dump_request(node, &pod.name, &pod.namespace, Some(dir));
    edit(&mut request);
    std::thread::spawn(move || {
        block_on(podsnap_coordinator::dump::dump(&request, &Lines))
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    })
}

/// A container created in the background: its id and how its start went.
type Started = (String, Result<(), String>);

/// CreateContainer + StartContainer of `spec` in `pod` from another thread (as kubelet would,
/// while the test does something else): answers the container id and how its start went.
fn run_container_in_background(
    node: &Node,
    pod: &KubePod,
    spec: &ContainerSpec,
) -> std::thread::JoinHandle<Result<Started, String>> {
    let image = image_id(node, &spec.image).expect("image id");
    let config = container_config(pod, spec, &image).expect("config");
    let (endpoint, sandbox) = (node.endpoint(), pod.clone());
    std::thread::spawn(move || {
        let cri = podsnap_tests::cri::CriClient::connect(&endpoint).expect("CRI");
        let id = cri
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox.config.clone()),
            })
            .map_err(|s| s.message().to_owned())?
            .container_id;
        let started = cri.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        });
        Ok((id, started.map(drop).map_err(|s| s.message().to_owned())))
    })
}

fn assert_running_and_counting(pod: &ThreeContainerPod, what: &str) {
    let a: u64 = ask(&pod.pod.ip, APP_PORT, "count")
        .unwrap_or_else(|e| panic!("{what}: the app answers: {e:#}"))
        .parse()
        .expect("a number");
    wait_count_above(&pod.pod.ip, APP_PORT, a, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{what}: the app's counter runs: {e:#}"));
    assert!(
        frozen_cgroups(&pod.pod.uid).is_empty(),
        "{what}: a cgroup stayed frozen"
    );
}

#[test]
fn a_shim_killed_at_any_phase_of_a_dump_leaves_nothing_frozen_or_half_written() {
    let holds = tempfile::tempdir().expect("tempdir");
    let mut options = NodeOptions::new(workload_bin());
    options
        .extra_env
        .push((HOLD_ENV.to_owned(), holds.path().display().to_string()));
    let node = Node::start(options);
    // Into a new directory, or into an existing empty one (the dump writes it in place).
    for (phase, in_place) in [
        ("before-freeze", false),
        ("frozen", true),
        ("dumped", false),
        ("thawed", true),
    ] {
        let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique(phase), HANDLER))
            .expect("the pod runs");
        std::fs::write(holds.path().join(phase), b"").expect("arm");
        let dir = node.files().checkpoints().join(format!("killed-{phase}"));
        if in_place {
            std::fs::create_dir(&dir).expect("an empty destination");
        }
        // A process of someone else whose command line names a path beside the dump's.
        let mut bystander = Bystander::naming(&dir.with_file_name(format!("killed-{phase}-bystander")));
        let dump = dump_in_background(&node, &pod.pod, dir.clone(), |_| {});
        let reached = holds.path().join(format!("{phase}.reached"));
        wait_for(
            &format!("the dump to reach {phase}"),
            Duration::from_secs(30),
            || reached.exists(),
        );
        assert!(
            journal_of(&pod.pod.id).exists(),
            "{phase}: the dump keeps a journal"
        );
        let shims = node.shim_pids(PODSNAP_SHIM);
        assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(shims[0], libc::SIGKILL);
        }
        std::fs::remove_file(holds.path().join(phase)).expect("disarm");
        std::fs::remove_file(&reached).expect("reset");
        let outcome = dump.join().expect("the dump thread");
        assert!(
            outcome.is_err(),
            "{phase}: a dump whose shim died fails: {outcome:?}"
        );
        // containerd cleans up after the dead shim (`containerd-shim-podsnap-v1 delete`).
        wait_exited_in_cri(&node, &pod, phase);
        // Exited as containerd says: no process of the pod is left behind.
        wait_for(
            &format!("{phase}: the pod's processes to be gone"),
            Duration::from_secs(30),
            || pod_processes(&pod.pod.uid) == 0,
        );
        assert!(
            frozen_cgroups(&pod.pod.uid).is_empty(),
            "{phase}: a cgroup stayed frozen"
        );
        assert!(
            staging_left(&node).is_empty(),
            "{phase}: staging output left: {:?}",
            staging_left(&node)
        );
        if in_place {
            assert_eq!(
                std::fs::read_dir(&dir).expect("the destination stays").count(),
                0,
                "{phase}: no checkpoint from a dump that died"
            );
        } else {
            assert!(!dir.exists(), "{phase}: no checkpoint from a dump that died");
        }
        assert!(
            !journal_of(&pod.pod.id).exists(),
            "{phase}: the journal was recovered"
        );
        assert!(
            bystander.runs(),
            "{phase}: the recovery killed a process that was not the dump's"
        );
        remove_original(&node, &pod);
    }
}

/// A process that is not podsnap's whose command line names `path` (`sh -c 'sleep 600' PATH`,
/// in a process group of its own); killed with its group when dropped.
struct Bystander(std::process::Child);

impl Bystander {
    fn naming(path: &Path) -> Self {
        use std::os::unix::process::CommandExt;
        Self(
            std::process::Command::new("sh")
                .args(["-c", "sleep 600"])
                .arg(path)
                .process_group(0)
                .spawn()
                .expect("sh"),
        )
    }

    fn runs(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the group is the one made above.
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// A `criu` that passes everything through but hangs in the dump (`swrk`, runc's RPC mode).
fn hanging_criu(dir: &Path) {
    let real = which("criu");
    let script = format!(
        "#!/bin/sh\ncase \"$1\" in\n  swrk) sleep 600 ;;\n  *) exec {} \"$@\" ;;\nesac\n",
        real.display()
    );
    let path = dir.join("criu");
    std::fs::write(&path, script).expect("write the stand-in criu");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Kills, when dropped, every process running the stand-in CRIU of `stand_in` and every runc
/// working for the node at `node`.
struct KillLeftovers {
    stand_in: String,
    node: String,
}

impl Drop for KillLeftovers {
    fn drop(&mut self) {
        for (pid, argv) in host::processes() {
            let names = |p: &str| argv.iter().any(|a| a.contains(p));
            let runc = argv.first().is_some_and(|a| a.ends_with("runc"));
            if names(&self.stand_in) || (runc && names(&self.node)) {
                // The stand-in's `sleep` first (it names nothing), then the process itself.
                for child in std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok())
                {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe {
                        libc::kill(child, libc::SIGKILL);
                    }
                }
                // SAFETY: kill has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

fn which(binary: &str) -> PathBuf {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/local/sbin", "/usr/local/bin", "/usr/sbin"].map(PathBuf::from))
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{binary} is not installed"))
}

#[test]
fn a_hung_criu_meets_the_deadline_and_a_client_that_gives_up_stops_the_dump() {
    let bin = tempfile::tempdir().expect("tempdir");
    hanging_criu(bin.path());
    let holds = tempfile::tempdir().expect("tempdir");
    let mut options = NodeOptions::new(workload_bin());
    options.path_prefix.push(bin.path().to_path_buf());
    options
        .extra_env
        .push((HOLD_ENV.to_owned(), holds.path().display().to_string()));
    let node = Node::start(options);
    // Whatever this test's dumps leave if it fails (the point of it: an orphaned runc, a hung
    // stand-in CRIU) goes with it; dropped before the node.
    let _leftovers = KillLeftovers {
        stand_in: bin.path().display().to_string(),
        node: node.dir().display().to_string(),
    };
    node.set_podsnap_config("[dump]\ndeadline_seconds = 3\n")
        .expect("config");
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("hung"), HANDLER))
        .expect("the pod runs");

    // The node's deadline.
    let dir = node.files().checkpoints().join("hung");
    let started = Instant::now();
    let err = dump_in_background(&node, &pod.pod, dir.clone(), |_| {})
        .join()
        .expect("thread")
        .expect_err("a hung CRIU cannot finish");
    assert!(err.contains("deadline of 3 s passed"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stopped at the deadline"
    );
    assert!(!dir.exists() && staging_left(&node).is_empty(), "output removed");
    assert!(!journal_of(&pod.pod.id).exists());
    assert_running_and_counting(&pod, "after the deadline");
    // Only this test's stand-in counts: other tests run CRIU at the same time.
    let stand_in = bin.path().join("criu").to_string_lossy().into_owned();
    let in_criu = || {
        host::processes()
            .iter()
            .any(|(_, argv)| argv.contains(&stand_in) && argv.iter().any(|a| a == "swrk"))
    };
    assert!(!in_criu(), "the hung CRIU was killed");

    // A client that gives up after a second: its deadline reaches the shim through containerd.
    node.set_podsnap_config("").expect("config");
    let started = Instant::now();
    let err = dump_in_background(&node, &pod.pod, dir.clone(), |r| {
        r.timeout = Some(Duration::from_secs(1));
    })
    .join()
    .expect("thread")
    .expect_err("the client gives up");
    // tonic's own timeout, or containerd's answer to the deadline it was handed.
    assert!(
        err.contains("Timeout expired") || err.to_lowercase().contains("deadline"),
        "the client's deadline: {err}"
    );
    // The shim stops the dump at the client's deadline, not the node's (120 s).
    wait_for("the dump to stop", Duration::from_secs(20), || {
        !journal_of(&pod.pod.id).exists()
    });
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!dir.exists() && staging_left(&node).is_empty(), "output removed");
    assert_running_and_counting(&pod, "after the client gave up");

    // The shim killed while CRIU works: the cleanup of the dead shim also ends runc and CRIU.
    node.set_podsnap_config("").expect("config");
    let dumping = dump_in_background(&node, &pod.pod, dir.clone(), |_| {});
    wait_for("CRIU to run", Duration::from_secs(30), in_criu);
    kill_the_shim(&node);
    assert!(
        dumping.join().expect("thread").is_err(),
        "the dump died with its shim"
    );
    assert_dead_dump_undone(&node, &pod, &dir, &in_criu, "shim killed during CRIU");

    // The shim killed after it started a runc and before it recorded it in the journal (held
    // there): that runc, and the CRIU it started, carry the dump's mark and die all the same.
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("unrecorded"), HANDLER))
        .expect("the pod runs");
    let dir = node.files().checkpoints().join("unrecorded");
    std::fs::write(holds.path().join("worker-started"), b"").expect("arm");
    let dumping = dump_in_background(&node, &pod.pod, dir.clone(), |_| {});
    let reached = holds.path().join("worker-started.reached");
    wait_for("a runc started, not recorded", Duration::from_secs(30), || {
        reached.exists()
    });
    wait_for("its CRIU to run", Duration::from_secs(30), in_criu);
    let recorded = std::fs::read_to_string(journal_of(&pod.pod.id)).expect("the journal");
    assert!(
        recorded.contains("\"workers\": []"),
        "nothing recorded yet: {recorded}"
    );
    kill_the_shim(&node);
    std::fs::remove_file(holds.path().join("worker-started")).expect("disarm");
    assert!(
        dumping.join().expect("thread").is_err(),
        "the dump died with its shim"
    );
    assert_dead_dump_undone(
        &node,
        &pod,
        &dir,
        &in_criu,
        "shim killed before it recorded its runc",
    );
}

/// SIGKILLs the node's one podsnap shim.
fn kill_the_shim(node: &Node) {
    let shims = node.shim_pids(PODSNAP_SHIM);
    assert_eq!(shims.len(), 1, "one shim: {shims:?}");
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(shims[0], libc::SIGKILL);
    }
}

/// After the shim running a dump of `pod` into `dir` died (`what`): the dump's runc and CRIU
/// are gone (`in_criu` false), so are the pod's processes, nothing stays frozen, no output or
/// journal is left, CRI says the containers exited; then the pod is removed.
fn assert_dead_dump_undone(
    node: &Node,
    pod: &ThreeContainerPod,
    dir: &Path,
    in_criu: &dyn Fn() -> bool,
    what: &str,
) {
    wait_for(
        &format!("{what}: the dead dump's runc and CRIU to be gone"),
        Duration::from_secs(30),
        || !in_criu(),
    );
    wait_for(
        &format!("{what}: the pod's processes to be gone"),
        Duration::from_secs(30),
        || pod_processes(&pod.pod.uid) == 0,
    );
    assert!(
        frozen_cgroups(&pod.pod.uid).is_empty(),
        "{what}: nothing stays frozen"
    );
    assert!(
        !dir.exists() && staging_left(node).is_empty(),
        "{what}: output removed"
    );
    assert!(!journal_of(&pod.pod.id).exists(), "{what}: the journal removed");
    wait_exited_in_cri(node, pod, what);
    remove_original(node, pod);
}

#[test]
fn a_full_disk_fails_the_dump_cleanly() {
    let node = podsnap_tests::start_node!();
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("full"), HANDLER))
        .expect("the pod runs");
    // Too small for what the pod holds: refused up front, with the numbers.
    let tiny = Tmpfs::mount(&node.dir().join("tiny"), "size=64k");
    let err = dump(&node, &pod, Some(tiny.0.join("ckpt"))).expect_err("64 KiB cannot hold the pod");
    let err = format!("{err:#}");
    assert!(
        err.contains("not enough space") && err.contains("MiB free"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&tiny.0).expect("list").count(),
        0,
        "nothing written"
    );
    // Room for the bytes but not for the files: ENOSPC in the middle of the dump.
    let few_inodes = Tmpfs::mount(&node.dir().join("inodes"), "size=512m,nr_inodes=12");
    let err = dump(&node, &pod, Some(few_inodes.0.join("ckpt"))).expect_err("out of inodes");
    let err = format!("{err:#}");
    // Said by CRIU's log, by runc (Go: lower case) or by the dump itself.
    assert!(err.to_lowercase().contains("no space left on device"), "{err}");
    assert_eq!(
        std::fs::read_dir(&few_inodes.0).expect("list").count(),
        0,
        "the partial output was removed"
    );
    assert!(!journal_of(&pod.pod.id).exists());
    assert_running_and_counting(&pod, "after ENOSPC");
    drop(few_inodes);
    drop(tiny);
    // And the pod still dumps fine.
    dump(&node, &pod, None).expect("a dump with room");
}

#[test]
fn lifecycle_calls_wait_for_a_dump_and_four_pods_dump_at_once() {
    let holds = tempfile::tempdir().expect("tempdir");
    let node = node_with_holds(holds.path());
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("race"), HANDLER))
        .expect("the pod runs");
    std::fs::write(holds.path().join("frozen"), b"").expect("arm");
    let dir = node.files().checkpoints().join("raced");
    let dumping = dump_in_background(&node, &pod.pod, dir.clone(), |_| {});
    let reached = holds.path().join("frozen.reached");
    wait_for("the dump to freeze the pod", Duration::from_secs(30), || {
        reached.exists()
    });

    // While the pod is frozen: an Exec, a Resume and a new container all wait for the dump.
    let exec = {
        let (endpoint, app) = (node.endpoint(), pod.app_id.clone());
        std::thread::spawn(move || {
            let cri = podsnap_tests::cri::CriClient::connect(&endpoint).expect("CRI");
            let out = cri.exec(&app, &["sh", "-c", "echo hi"], 60).map(|o| o.exit_code);
            (out.map_err(|s| s.message().to_owned()), Instant::now())
        })
    };
    let resume = {
        let node_ctr = node.ctr().clone();
        let app = pod.app_id.clone();
        std::thread::spawn(move || {
            node_ctr
                .run(podsnap_tests::ctr::CRI_NAMESPACE, &["task", "resume", &app])
                .map(drop)
                .map_err(|e| format!("{e:#}"))
        })
    };
    let late_spec = ContainerSpec::workload("late", &["serve", "--name", "late", "--port", "7171"]);
    let late = run_container_in_background(&node, &pod.pod, &late_spec);
    // Each call reached the shim, which holds it (and says so).
    for call in ["Exec", "Resume", "Create"] {
        let said = format!("{call} of container ");
        wait_for(
            &format!("the shim to hold the {call}"),
            Duration::from_secs(30),
            || {
                node.log_grep(&said)
                    .iter()
                    .any(|l| l.contains("waits until the pod's checkpoint is over"))
            },
        );
    }
    assert!(!exec.is_finished(), "an Exec waits while the pod is being dumped");
    assert!(
        !resume.is_finished(),
        "a Resume waits while the pod is being dumped"
    );
    assert!(
        !late.is_finished(),
        "a new container's task waits while the pod is being dumped"
    );
    let app_freezer = frozen_cgroups(&pod.pod.uid);
    assert!(
        !app_freezer.is_empty(),
        "the pod stays frozen: nothing thawed it mid-dump"
    );
    let released = Instant::now();
    std::fs::remove_file(holds.path().join("frozen")).expect("release");
    dumping.join().expect("thread").expect("the dump finishes");
    let (out, answered) = exec.join().expect("thread");
    assert_eq!(out, Ok(0), "the Exec ran after the dump");
    assert!(
        answered > released,
        "the Exec was answered only after the dump went on"
    );
    let resumed = resume.join().expect("thread");
    assert!(
        resumed.is_err(),
        "nothing to resume once the dump thawed it: {resumed:?}"
    );
    // The container started during the dump runs once the dump is over; the checkpoint is of
    // the pod as it was when frozen (without it), nothing half-included.
    let (_, late_started) = late.join().expect("thread").expect("CreateContainer late");
    late_started.expect("the late container starts after the dump");
    wait_answering(&pod.pod.ip, 7171, Duration::from_secs(20)).expect("the late container answers");
    let m = verified(&node, &dir);
    assert!(m.container("late").is_none());
    assert_running_and_counting(&pod, "after the raced dump");
    remove_original(&node, &pod);

    // Four pods dumped at once: each its own shim, all succeed, none left frozen.
    let pods: Vec<ThreeContainerPod> = (0..4)
        .map(|i| {
            run_three_container_pod(
                &node,
                &PodOptions::new(&node.unique(&format!("four{i}")), HANDLER),
            )
            .expect("a pod runs")
        })
        .collect();
    let dumps: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            dump_in_background(
                &node,
                &p.pod,
                node.files().checkpoints().join(format!("four-{i}")),
                |_| {},
            )
        })
        .collect();
    for (i, d) in dumps.into_iter().enumerate() {
        d.join()
            .expect("thread")
            .unwrap_or_else(|e| panic!("pod {i}: {e}"));
        verified(&node, &node.files().checkpoints().join(format!("four-{i}")));
    }
    for p in &pods {
        assert_running_and_counting(p, "after four dumps at once");
    }
}

/// The last `<name> count N` line of a log, as N.
fn last_count(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// A pod whose one container, `app`, appends a counted line to its emptyDir volume every
/// `interval_ms` (`app.log`).
fn writer_pod(node: &Node, name: &str, interval_ms: u32) -> KubePod {
    let pod = run_pod(node, &PodOptions::new(name, HANDLER)).expect("sandbox");
    let port = APP_PORT.to_string();
    let interval = interval_ms.to_string();
    let writer = ContainerSpec::workload(
        "app",
        &[
            "serve",
            "--name",
            "app",
            "--port",
            &port,
            "--volume",
            DATA_MOUNT,
            "--interval-ms",
            &interval,
            "--log-every",
            "1",
        ],
    )
    .with_empty_dir(DATA_VOLUME, DATA_MOUNT);
    run_container(node, &pod, &writer).expect("the writer runs");
    wait_answering(&pod.ip, APP_PORT, Duration::from_secs(20)).expect("answers");
    pod
}

/// The writer's `app.log` as the checkpoint at `dir` holds it (its volume archive).
fn log_in_checkpoint(dir: &Path) -> String {
    let archive = std::fs::File::open(dir.join(format!("volumes/{DATA_VOLUME}.tar"))).expect("archive");
    let mut log = String::new();
    for entry in tar::Archive::new(archive).entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").ends_with("app.log") {
            use std::io::Read;
            entry.read_to_string(&mut log).expect("read");
        }
    }
    log
}

#[test]
fn stop_means_nothing_runs_after_the_snapshot() {
    let node = podsnap_tests::start_node!();
    // Logs a line to the volume every tick (20 ms).
    let pod = writer_pod(&node, &node.unique("stop"), 20);
    // An observer outside the pod asks for the counter as fast as it can until the pod stops.
    let observer = {
        let ip = pod.ip.clone();
        std::thread::spawn(move || {
            let mut last = 0u64;
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                match ask(&ip, APP_PORT, "count") {
                    Ok(v) => last = v.parse().unwrap_or(last),
                    Err(_) => break,
                }
            }
            last
        })
    };
    // The writer has written a while (50 ticks) before the dump.
    wait_count_above(&pod.ip, APP_PORT, 50, Duration::from_secs(20)).expect("the writer counts");
    let dir = node.files().checkpoints().join("stopped");
    let mut request = dump_request(&node, &pod.name, &pod.namespace, Some(dir.clone()));
    request.stop = true;
    block_on(podsnap_coordinator::dump::dump(&request, &Lines)).expect("dump --stop");
    let seen_outside = observer.join().expect("observer");
    // Once no process of the writer is left, nothing more can be written: the volume is final.
    let writer_id = container_named(&node, &pod.id, "app").id;
    wait_for(
        "the writer's processes to be gone",
        Duration::from_secs(30),
        || {
            host::pod_cgroup_tree(&pod.uid)
                .into_iter()
                .filter(|d| d.starts_with("/sys/fs/cgroup/freezer") && d.ends_with(&writer_id))
                .all(|d| {
                    std::fs::read_to_string(d.join("cgroup.procs")).map_or(true, |t| t.trim().is_empty())
                })
        },
    );
    let volume = pod.empty_dir(DATA_VOLUME).expect("volume");
    let on_host = std::fs::read_to_string(volume.join("app.log")).expect("the volume's log");
    // What the checkpoint holds of the volume.
    let in_checkpoint = log_in_checkpoint(&dir);
    assert_eq!(
        on_host,
        in_checkpoint,
        "the volume was written after the snapshot (log grew from {} to {})",
        last_count(&in_checkpoint),
        last_count(&on_host)
    );
    let snapshot = last_count(&in_checkpoint);
    assert!(snapshot > 10, "the writer ran: {snapshot}");
    assert!(
        seen_outside <= snapshot + 1,
        "a client outside saw count {seen_outside}, after the snapshot's {snapshot}"
    );
    assert!(frozen_cgroups(&pod.uid).is_empty(), "nothing left frozen");
}

/// The shim killed once the dump committed its checkpoint, at each hold after the commit, with
/// `--stop` and without, into a new directory and into an existing empty one: the recovery of
/// the dead dump keeps the checkpoint whole (`podsnap inspect` verifies it), finishes a
/// `--stop` (nothing of the pod ran after the snapshot: its volume holds exactly what the
/// checkpoint holds), leaves nothing frozen and removes the journal.
#[test]
fn a_shim_killed_after_the_commit_keeps_the_checkpoint_and_finishes_the_stop() {
    let holds = tempfile::tempdir().expect("tempdir");
    let node = node_with_holds(holds.path());
    let podsnap = podsnap_binary();
    // (--stop, the hold the shim is killed at, into an existing empty directory)
    let cases = [
        (true, "committed", true),
        (true, "committed", false),
        (true, "killed", false),
        (true, "stopped", true),
        (false, "committed", true),
        (false, "committed", false),
    ];
    for (i, (stop, phase, in_place)) in cases.into_iter().enumerate() {
        let what = format!(
            "{} killed at {phase}{}",
            if stop { "--stop" } else { "leave running" },
            if in_place { ", in place" } else { "" }
        );
        // A line every 5 ms: a pod thawed before it is killed writes more.
        let pod = writer_pod(&node, &node.unique(&format!("commit{i}")), 5);
        let dir = node.files().checkpoints().join(format!("commit-{i}"));
        if in_place {
            std::fs::create_dir(&dir).expect("an empty destination");
        }
        std::fs::write(holds.path().join(phase), b"").expect("arm");
        let dump = dump_in_background(&node, &pod, dir.clone(), |r| r.stop = stop);
        let reached = holds.path().join(format!("{phase}.reached"));
        wait_for(
            &format!("{what}: the dump to reach {phase}"),
            Duration::from_secs(60),
            || reached.exists(),
        );
        assert!(journal_of(&pod.id).exists(), "{what}: the dump keeps a journal");
        let shims = node.shim_pids(PODSNAP_SHIM);
        assert_eq!(shims.len(), 1, "one shim for the pod: {shims:?}");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe {
            libc::kill(shims[0], libc::SIGKILL);
        }
        std::fs::remove_file(holds.path().join(phase)).expect("disarm");
        std::fs::remove_file(&reached).expect("reset");
        let outcome = dump.join().expect("the dump thread");
        assert!(outcome.is_err(), "{what}: its shim died: {outcome:?}");
        // containerd cleans up after the dead shim (`containerd-shim-podsnap-v1 delete`, which
        // recovers the dump first).
        wait_for(
            &format!("{what}: the journal to be recovered"),
            Duration::from_secs(30),
            || !journal_of(&pod.id).exists(),
        );
        wait_for(
            &format!("{what}: the pod's processes to be gone"),
            Duration::from_secs(30),
            || pod_processes(&pod.uid) == 0,
        );
        wait_for(
            &format!("{what}: containerd to see the containers exited"),
            Duration::from_secs(30),
            || {
                node.cri().pod_containers(&pod.id).is_ok_and(|cs| {
                    cs.iter()
                        .all(|c| c.state == cri::ContainerState::ContainerExited as i32)
                })
            },
        );
        assert!(
            frozen_cgroups(&pod.uid).is_empty(),
            "{what}: a cgroup stayed frozen"
        );
        assert!(
            staging_left(&node).is_empty(),
            "{what}: staging output left: {:?}",
            staging_left(&node)
        );
        let out = std::process::Command::new(&podsnap)
            .arg("inspect")
            .arg(&dir)
            .env("PODSNAP_CHECKPOINT_ROOT", node.files().checkpoints())
            .env("PODSNAP_CONFIG", node.files().podsnap_config())
            .output()
            .expect("podsnap inspect");
        assert!(
            out.status.success(),
            "{what}: the committed checkpoint is whole: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if stop {
            let volume = pod.empty_dir(DATA_VOLUME).expect("volume");
            let on_host = std::fs::read_to_string(volume.join("app.log")).expect("the volume's log");
            let in_checkpoint = log_in_checkpoint(&dir);
            assert!(last_count(&in_checkpoint) > 0, "{what}: the writer ran");
            assert_eq!(
                on_host,
                in_checkpoint,
                "{what}: the pod ran after the snapshot (its log grew from {} to {})",
                last_count(&in_checkpoint),
                last_count(&on_host)
            );
        }
        podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the pod is removed");
    }
}

/// Whether podsnap's network lock chain exists in the pod's network namespace.
#[test]
fn containerd_restarting_mid_dump_and_mid_restore_leaves_the_pod_managed() {
    let holds = tempfile::tempdir().expect("tempdir");
    let mut node = node_with_holds(holds.path());
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("ctrd"), HANDLER))
        .expect("the pod runs");
    let netns = pod.pod.netns.clone().expect("the pod's netns");
    let before = mark_and_count(&pod);

    // Mid-dump: containerd goes away while the pod is frozen (and its network locked).
    std::fs::write(holds.path().join("frozen"), b"").expect("arm");
    let dir = node.files().checkpoints().join("mid-dump");
    let dumping = dump_in_background(&node, &pod.pod, dir.clone(), |_| {});
    let reached = holds.path().join("frozen.reached");
    wait_for("the dump to freeze the pod", Duration::from_secs(30), || {
        reached.exists()
    });
    assert!(
        host::network_locked(&netns),
        "one network lock for the pod while it is frozen"
    );
    node.restart_containerd().expect("containerd restarts");
    std::fs::remove_file(holds.path().join("frozen")).expect("release");
    let outcome = dumping.join().expect("thread");
    wait_for("the dump to end", Duration::from_secs(30), || {
        !journal_of(&pod.pod.id).exists()
    });
    match &outcome {
        Ok(()) => {
            verified(&node, &dir);
        }
        Err(e) => assert!(!dir.exists(), "a failed dump leaves nothing: {e}"),
    }
    assert!(staging_left(&node).is_empty());
    assert!(
        !host::network_locked(&netns),
        "the network is unlocked after the dump"
    );
    assert_running_and_counting(&pod, "after containerd restarted mid-dump");
    for id in [&pod.sidecar_id, &pod.app_id] {
        let status = node.cri().container(id).expect("ContainerStatus");
        assert_eq!(status.state, cri::ContainerState::ContainerRunning as i32);
    }

    // Mid-restore: containerd goes away while the shim restores a container.
    let checkpoint = node.files().checkpoints().join("for-restore");
    dump(&node, &pod, Some(checkpoint)).expect("a dump");
    remove_original(&node, &pod);
    let mut options = PodOptions::new(&pod.pod.name, HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), "for-restore".to_owned());
    let restored = run_pod(&node, &options).expect("the restored sandbox");
    let port = APP_PORT.to_string();
    let app_spec = ContainerSpec::workload(
        "app",
        &["serve", "--name", "app", "--port", &port, "--volume", DATA_MOUNT],
    )
    .with_empty_dir(DATA_VOLUME, DATA_MOUNT);
    std::fs::write(holds.path().join("restore"), b"").expect("arm");
    let starting = run_container_in_background(&node, &restored, &app_spec);
    let reached = holds.path().join("restore.reached");
    wait_for("the restore to start", Duration::from_secs(30), || {
        reached.exists()
    });
    node.restart_containerd().expect("containerd restarts");
    std::fs::remove_file(holds.path().join("restore")).expect("release");
    let (app_id, started) = starting.join().expect("thread").expect("CreateContainer");
    // The shim carries on with the restore without containerd. containerd comes back with the
    // container as CRI last recorded it: RUNNING if the start's answer reached it, else CREATED
    // (containerd's own rule for a start its restart interrupted, whatever the runtime). Either
    // way the pod stays managed: a running app answers from its restored state, and removing
    // the pod ends every process of it and leaves nothing behind.
    // Read once the shim is done with the app's start (the restore): its task is no longer
    // CREATED (the shim's log lines after the restart do not reach the new containerd's log).
    let api = podsnap_tests::containerd_api::ContainerdApi::connect(
        &node.files().socket(),
        podsnap_tests::ctr::CRI_NAMESPACE,
    )
    .expect("containerd API");
    wait_for(
        "the shim to finish the app's restore",
        Duration::from_secs(60),
        || match api.task(&app_id) {
            Ok(Some(task)) => task.status != "CREATED",
            Ok(None) => true,
            Err(_) => false,
        },
    );
    let state = node
        .cri()
        .container(&app_id)
        .map(|s| s.state)
        .expect("ContainerStatus");
    eprintln!("after containerd restarted mid-restore: state {state}, first start {started:?}");
    if state == cri::ContainerState::ContainerRunning as i32 {
        wait_answering(&restored.ip, APP_PORT, Duration::from_secs(20)).expect("the restored app answers");
        let count: u64 = ask(&restored.ip, APP_PORT, "count")
            .expect("count")
            .parse()
            .expect("n");
        assert!(count >= before.app, "restored, not restarted: {count}");
    } else {
        assert_eq!(state, cri::ContainerState::ContainerCreated as i32, "{started:?}");
    }
    podsnap_tests::kubelet::remove_pod(&node, &restored).expect("the pod is removed cleanly");
    assert_eq!(
        pod_processes(&restored.uid),
        0,
        "nothing of the pod is left running"
    );
}

/// A unix connection between containers opened after the dump told each container's CRIU run
/// which sockets are external (the dump held before the freeze) cannot be taken: the dump is
/// refused saying to dump again, nothing is left, the connection carries on, and the next dump
/// takes it.
#[test]
fn a_unix_connection_opened_as_the_dump_began_is_refused_and_the_next_dump_takes_it() {
    let holds = tempfile::tempdir().expect("tempdir");
    let node = node_with_holds(holds.path());
    let pod = run_pod(&node, &PodOptions::new(&node.unique("late-unix"), HANDLER)).expect("sandbox");
    let app_port = APP_PORT.to_string();
    let app = ContainerSpec::workload(
        "app",
        &[
            "serve",
            "--name",
            "app",
            "--port",
            &app_port,
            "--unix-listen",
            "@podsnap-late",
        ],
    );
    let sidecar = ContainerSpec::workload("sidecar", &["serve", "--name", "sidecar", "--port", "9191"]);
    for spec in [&app, &sidecar] {
        run_container(&node, &pod, spec).expect("runs");
    }
    for port in [APP_PORT, 9191] {
        wait_answering(&pod.ip, port, Duration::from_secs(20)).expect("answers");
    }

    std::fs::write(holds.path().join("before-freeze"), b"").expect("arm");
    let dir = node.files().checkpoints().join("late-unix");
    let dump = dump_in_background(&node, &pod, dir.clone(), |_| {});
    let reached = holds.path().join("before-freeze.reached");
    wait_for(
        "the dump to hold before the freeze",
        Duration::from_secs(30),
        || reached.exists(),
    );
    assert_eq!(
        ask(&pod.ip, 9191, "peer-connect unix @podsnap-late").expect("connect"),
        "ok"
    );
    std::fs::remove_file(holds.path().join("before-freeze")).expect("disarm");
    let err = dump.join().expect("the dump thread").expect_err("refused");
    assert!(
        err.contains("was opened while the dump began") && err.contains("dump again"),
        "{err}"
    );
    assert!(!dir.exists(), "no checkpoint is left");
    assert!(staging_left(&node).is_empty(), "{:?}", staging_left(&node));
    let check = ask(&pod.ip, 9191, "peer-check").expect("peer-check");
    assert!(
        check.ends_with("checks 1 reply pong app"),
        "the connection carries on: {check}"
    );

    let again = node.files().checkpoints().join("late-unix-again");
    dump_in_background(&node, &pod, again.clone(), |_| {})
        .join()
        .expect("the dump thread")
        .expect("the next dump takes the connection");
    let m = verified(&node, &again);
    assert_eq!(m.unix_links.len(), 1, "{:?}", m.unix_links);
}

/// A directory whose `iptables`, `iptables-restore` and `iptables-save` are the legacy
/// (xtables) ones: those take `/run/xtables.lock`, as on nodes where kube-proxy or a CNI
/// plugin runs legacy iptables (this machine's default nft ones take no lock).
fn legacy_iptables() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let multi = which("xtables-legacy-multi");
    for name in ["iptables", "iptables-restore", "iptables-save"] {
        std::os::unix::fs::symlink(&multi, dir.path().join(name)).expect("link legacy iptables");
    }
    dir
}

const XTABLES_LOCK: &str = "/run/xtables.lock";

/// Another process holding the xtables lock (`flock`) for a while; killed on drop.
struct XtablesHolder(std::process::Child);

impl XtablesHolder {
    /// Starts `flock -o XTABLES_LOCK sleep SECONDS` (flock alone holds the lock, in a process
    /// group of its own); returns once it holds the lock.
    fn hold(seconds: u64) -> Self {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("flock")
            .args(["-o", XTABLES_LOCK])
            .args(["sleep", &seconds.to_string()])
            .process_group(0)
            .spawn()
            .expect("flock (util-linux)");
        let holder = Self(child);
        wait_for("flock to hold the xtables lock", Duration::from_secs(10), || {
            !std::process::Command::new("flock")
                .args(["-n", XTABLES_LOCK, "true"])
                .status()
                .expect("flock -n")
                .success()
        });
        holder
    }

    /// Whether it has let go (exited).
    fn released(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_some()
    }
}

impl Drop for XtablesHolder {
    /// Kills flock and its sleep (the group), which lets go of the lock at once.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill has no memory-safety preconditions; the group is the holder's own.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.0.wait();
    }
}

/// `iptables -S PODSNAP-LOCK` (legacy) in the pod's namespace: whether podsnap's lock chain is
/// there.
fn lock_chain_present(netns: &str) -> bool {
    std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["--", "iptables-legacy", "-w", "-S", "PODSNAP-LOCK"])
        .output()
        .expect("nsenter iptables-legacy")
        .status
        .success()
}

/// With another process holding the xtables lock, the pod dump's network lock and unlock wait
/// for it (within the dump's deadline), and the dump succeeds; held past the deadline, the
/// dump gives up at the deadline saying why, and leaves the pod running and unlocked.
#[test]
fn the_pod_network_lock_waits_for_the_xtables_lock_within_the_dump_deadline() {
    let holds = tempfile::tempdir().expect("tempdir");
    let legacy = legacy_iptables();
    let mut options = NodeOptions::new(workload_bin());
    options
        .extra_env
        .push((HOLD_ENV.to_owned(), holds.path().display().to_string()));
    options.path_prefix.insert(0, legacy.path().to_path_buf());
    let node = Node::start(options);
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("xtables"), HANDLER))
        .expect("the pod runs");
    let netns = pod.pod.netns.clone().expect("the pod's netns");

    // Held when the dump locks the pod's network and again when it unlocks it.
    for phase in ["before-freeze", "frozen"] {
        std::fs::write(holds.path().join(phase), b"").expect("arm");
    }
    let dir = node.files().checkpoints().join("xtables-waited");
    let dump = dump_in_background(&node, &pod.pod, dir.clone(), |_| {});
    let reached = |phase: &str| holds.path().join(format!("{phase}.reached"));
    wait_for("the dump to reach before-freeze", Duration::from_secs(30), || {
        reached("before-freeze").exists()
    });
    let mut first = XtablesHolder::hold(3);
    std::fs::remove_file(holds.path().join("before-freeze")).expect("release");
    wait_for(
        "the dump to lock the pod and freeze it",
        Duration::from_secs(60),
        || reached("frozen").exists() || dump.is_finished(),
    );
    assert!(
        first.released(),
        "the pod's network was locked while another process held the xtables lock"
    );
    assert!(
        lock_chain_present(&netns),
        "the pod's network is locked while frozen"
    );
    let mut second = XtablesHolder::hold(3);
    std::fs::remove_file(holds.path().join("frozen")).expect("release");
    let outcome = dump.join().expect("the dump thread");
    assert!(
        outcome.is_ok(),
        "the dump waited for the xtables lock: {outcome:?}"
    );
    assert!(
        second.released(),
        "the dump unlocked the pod's network while another process held the xtables lock"
    );
    assert!(!lock_chain_present(&netns), "the unlock went through");
    assert!(dir.join("manifest.json").is_file(), "the checkpoint is there");
    assert_running_and_counting(&pod, "after the dump that waited");

    // Held past the dump's deadline: the dump stops at its deadline, the pod runs unlocked.
    let deadline = Duration::from_secs(8);
    node.set_podsnap_config(&format!("[dump]\ndeadline_seconds = {}\n", deadline.as_secs()))
        .expect("config");
    let third = XtablesHolder::hold(120);
    let started = Instant::now();
    let dir = node.files().checkpoints().join("xtables-deadline");
    let outcome = dump_in_background(&node, &pod.pod, dir.clone(), |_| {})
        .join()
        .expect("the dump thread");
    let took = started.elapsed();
    drop(third);
    let err = outcome.expect_err("a dump that cannot lock the pod's network fails");
    assert!(err.contains("xtables lock"), "the error says why: {err}");
    assert!(
        took < deadline + Duration::from_secs(10),
        "the dump ended {took:?} after it started, its deadline {deadline:?}"
    );
    assert!(!dir.exists() && staging_left(&node).is_empty(), "output removed");
    assert!(
        !lock_chain_present(&netns),
        "the pod's network is not left locked"
    );
    assert_running_and_counting(&pod, "after the dump that gave up");
}
