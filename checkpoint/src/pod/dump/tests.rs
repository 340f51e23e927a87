//! The dump's decisions against a scripted host (what is refused, what is frozen and thawed on
//! which error), with temporary directories for files. Each test asserts the error an operator
//! reads and the host calls made, in order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podsnap_runtime::cgroup::CgroupPaths;
use podsnap_runtime::host::fake::{Call, FakeHost, FakeProcess, Script};
use podsnap_runtime::host::Host;
use podsnap_runtime::launcher::{Capture, Launcher, Limit, Outcome};
use podsnap_runtime::runc::Runc;
use std::process::Command;

use super::beside::Beside;
use super::checks::{adopted_processes, pod_ipc, unix_links, AdoptedRoot};
use super::criu_configs::{CriuConfigs, ToldEnds};
use super::criu_runs::CriuRuns;
use super::freeze::{freeze, FreezeGuard};
use super::hold::Held;
use super::journal::{self, Journal};
use super::plan::{plan, Planned};
use super::staging::Staging;
use super::Phases;
use super::{DumpReport, PodDump};
use crate::format::manifest::{ContainerEntry, PodInfo, UnixKind};
use crate::format::record::{ContainerState, Role};
use crate::pod::shared::links::UnixConnection;
use crate::pod::shared::netlock::NetLock;
use crate::pod::target::Target;

/// A launcher that runs nothing: every program asked for is recorded and fails.
#[derive(Default)]
struct NoPrograms(Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Launcher for NoPrograms {
    async fn run(&self, cmd: Command, _capture: Capture) -> std::io::Result<Outcome> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        self.0.lock().expect("lock").push(program);
        Err(std::io::Error::other("no programs in unit tests"))
    }
}

/// Pids far above any this test machine hands out, so /proc knows none of them.
const PID: i32 = 4_100_000;

fn cgroup(name: &str) -> PathBuf {
    PathBuf::from(format!("/fake/kubepods/pod1/{name}"))
}

fn target(name: &str, role: Role, state: ContainerState) -> Target {
    let entry = ContainerEntry {
        name: name.into(),
        id: format!("{name}-id"),
        role,
        image: None,
        image_id: None,
        image_digest: None,
        rootfs_layers: Vec::new(),
        created_order: 0,
        started_order: None,
        state,
        exit_code: None,
        dumped: false,
        cri_config: None,
    };
    Target {
        entry,
        runc: Runc::new("runc", "/run/fake-runc", Arc::new(NoPrograms::default())),
        bundle: PathBuf::from(format!("/fake/bundles/{name}")),
        cgroups: Some(CgroupPaths::V2 { dir: cgroup(name) }),
        pid: None,
        spec: None,
        adopted: Vec::new(),
        created: None,
    }
}

fn running(name: &str) -> Target {
    target(name, Role::Container, ContainerState::Running)
}

fn process(ppid: i32, comm: &str, cgroup: &str, start: u64) -> FakeProcess {
    FakeProcess {
        ppid,
        comm: comm.into(),
        cgroup: format!("0::/{cgroup}\n"),
        start,
        ns_pid: 1,
        sysv: Vec::new(),
    }
}

struct Pod {
    _dir: tempfile::TempDir,
    dest: PathBuf,
    journal: PathBuf,
    launcher: Arc<NoPrograms>,
}

impl Pod {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self {
            dest: dir.path().join("ckpt"),
            journal: dir.path().join("journal/pod.json"),
            _dir: dir,
            launcher: Arc::new(NoPrograms::default()),
        }
    }

    fn request(&self, targets: Vec<Target>) -> PodDump {
        PodDump {
            dest: self.dest.clone(),
            pod: PodInfo {
                sandbox_id: "sandbox1".into(),
                ..Default::default()
            },
            targets,
            tcp_established: false,
            launcher: self.launcher.clone(),
            stop: false,
            deadline: Duration::from_secs(60),
            cancel: None,
            journal: Some(self.journal.clone()),
            netns: None,
            lock_network: false,
            hold_network: false,
            early_digests: false,
            reserve_bytes: 0,
            carry: Default::default(),
            carry_max_bytes: 0,
            group: None,
            serve: None,
        }
    }

    /// The state of a dump held before its freeze (phase 2 done), without runc: no container
    /// has podsnap's CRIU configuration, so no CRIU is started before the freeze.
    async fn held(&self, req: PodDump, host: Arc<dyn Host>) -> Held {
        let limit = Limit::after(req.deadline, req.cancel.clone());
        let running: Vec<Target> = crate::pod::target::running(&req.targets)
            .into_iter()
            .cloned()
            .collect();
        let journal = Arc::new(Journal::begin(&self.journal, journal::Entry::default()).expect("journal"));
        let staging = Staging::new(&req.dest, journal.clone()).expect("staging");
        let runs = CriuRuns::start_held(
            &staging.dir,
            &running,
            &limit,
            running.iter().map(|_| None).collect(),
            None,
            ToldEnds::default(),
            None,
        );
        let netlock = NetLock::take_cleared(req.launcher.clone(), None, &limit)
            .await
            .expect("no lock");
        Held {
            runs,
            configs: CriuConfigs::none(),
            beside: Beside::idle(),
            netlock,
            staging,
            journal,
            planned: Planned {
                req,
                host,
                running,
                limit,
                report: DumpReport::default(),
                carry: Vec::new(),
                started: Instant::now(),
            },
        }
    }

    /// Whether the dump left nothing: no staging output, no destination, no journal.
    fn left_nothing(&self) -> bool {
        let parent = self.dest.parent().expect("parent");
        let staged = std::fs::read_dir(parent)
            .expect("list")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".ckpt.tmp"));
        !staged && !self.dest.exists() && !self.journal.exists()
    }
}

fn host(script: Script) -> Arc<FakeHost> {
    Arc::new(FakeHost::new(script))
}

fn members(pairs: &[(&str, &[i32])]) -> std::collections::BTreeMap<PathBuf, Vec<i32>> {
    pairs.iter().map(|(n, p)| (cgroup(n), p.to_vec())).collect()
}

#[tokio::test]
async fn a_bad_container_name_is_refused_before_anything_runs() {
    let pod = Pod::new();
    let fake = host(Script::default());
    let mut bad = running("app");
    bad.entry.name = "../etc".into();
    let err = plan(pod.request(vec![bad]), fake.clone(), Phases::default())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("../etc"), "{err}");
    assert!(fake.calls().is_empty(), "no host call");
    assert!(pod.launcher.0.lock().expect("lock").is_empty(), "no program");
    assert!(pod.left_nothing());
}

#[tokio::test]
async fn a_dump_that_does_not_fit_is_refused_in_the_plan_with_the_numbers() {
    let pod = Pod::new();
    let fake = host(Script {
        free_bytes: 1 << 20,
        ..Default::default()
    });
    let mut req = pod.request(vec![running("app")]);
    req.targets[0].cgroups = None; // nothing to estimate: the reserve alone does not fit
    req.reserve_bytes = 2 << 20;
    let err = plan(req, fake.clone(), Phases::default())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("the node keeps 2.0 MiB free there") && err.contains("has 1.0 MiB free"),
        "{err}"
    );
    assert!(fake.calls().is_empty(), "nothing frozen");
    assert!(pod.left_nothing());
}

#[tokio::test]
async fn a_container_with_unknown_cgroups_is_refused_before_any_freeze() {
    let pod = Pod::new();
    let fake = host(Script::default());
    let mut lost = running("b");
    lost.cgroups = None;
    let held = pod
        .held(pod.request(vec![running("a"), lost]), fake.clone())
        .await;
    let err = freeze(held).await.err().expect("refused").to_string();
    assert!(err.contains("container b: its cgroups are unknown"), "{err}");
    assert!(fake.calls().is_empty(), "nothing frozen, nothing thawed");
    assert!(pod.left_nothing());
}

#[tokio::test]
async fn one_failed_freeze_thaws_every_container_listed_and_removes_the_output() {
    let pod = Pod::new();
    let fake = host(Script {
        failing_freezes: [cgroup("b")].into(),
        members: members(&[("a", &[]), ("b", &[])]),
        ..Default::default()
    });
    let held = pod
        .held(pod.request(vec![running("a"), running("b")]), fake.clone())
        .await;
    assert!(pod.journal.exists() && pod.dest.parent().expect("p").exists());
    let err = freeze(held).await.err().expect("failed").to_string();
    assert!(err.contains("freeze container b"), "{err}");
    let calls = fake.calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(
        calls[..2].contains(&Call::Freeze(cgroup("a"))) && calls[..2].contains(&Call::Freeze(cgroup("b")))
    );
    assert_eq!(
        calls[2..],
        [Call::Thaw(cgroup("a")), Call::Thaw(cgroup("b"))],
        "the failed one is thawed too"
    );
    assert!(pod.left_nothing(), "staging output and journal removed");
}

#[tokio::test]
async fn a_container_its_owner_paused_is_neither_frozen_nor_thawed() {
    let pod = Pod::new();
    let fake = host(Script {
        members: members(&[("a", &[]), ("paused", &[])]),
        ..Default::default()
    });
    let paused = target("paused", Role::Container, ContainerState::Paused);
    let held = pod
        .held(pod.request(vec![running("a"), paused]), fake.clone())
        .await;
    let frozen = freeze(held).await.expect("frozen");
    assert_eq!(fake.calls(), [Call::Freeze(cgroup("a"))]);
    frozen.unwind().await;
    assert_eq!(fake.calls(), [Call::Freeze(cgroup("a")), Call::Thaw(cgroup("a"))]);
    assert!(pod.left_nothing());
}

#[tokio::test]
async fn a_deadline_that_passes_while_freezing_stops_the_dump_and_thaws_the_pod() {
    let pod = Pod::new();
    let fake = host(Script {
        members: members(&[("a", &[])]),
        ..Default::default()
    });
    let mut req = pod.request(vec![running("a")]);
    req.deadline = Duration::ZERO;
    let held = pod.held(req, fake.clone()).await;
    let err = freeze(held).await.err().expect("stopped").to_string();
    assert!(
        err.contains("the dump deadline of 0 s passed while freezing the pod"),
        "{err}"
    );
    assert_eq!(fake.calls(), [Call::Freeze(cgroup("a")), Call::Thaw(cgroup("a"))]);
    assert!(pod.left_nothing());
}

#[tokio::test]
async fn a_caller_that_gives_up_stops_the_dump_and_thaws_the_pod() {
    let pod = Pod::new();
    let fake = host(Script {
        members: members(&[("a", &[])]),
        ..Default::default()
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut req = pod.request(vec![running("a")]);
    req.cancel = Some(rx);
    let held = pod.held(req, fake.clone()).await;
    tx.send(true).expect("give up");
    let err = freeze(held).await.err().expect("stopped").to_string();
    assert!(err.contains("the caller gave up while freezing the pod"), "{err}");
    assert_eq!(fake.calls(), [Call::Freeze(cgroup("a")), Call::Thaw(cgroup("a"))]);
    assert!(pod.left_nothing());
}

#[tokio::test]
async fn a_process_outside_its_tree_is_refused_as_lost_and_the_pod_thawed() {
    let pod = Pod::new();
    let (init, exec, outsider) = (PID + 1, PID + 2, PID + 50);
    let fake = host(Script {
        members: members(&[("a", &[init, exec])]),
        processes: [
            (init, process(PID + 40, "app", "a", 10)),
            (exec, process(outsider, "sh", "a", 11)),
            (outsider, process(1, "runc:[2:INIT]", "elsewhere", 12)),
        ]
        .into(),
        ..Default::default()
    });
    let mut a = running("a");
    a.pid = Some(init);
    let held = pod.held(pod.request(vec![a]), fake.clone()).await;
    let err = freeze(held).await.err().expect("refused").to_string();
    assert!(err.contains("would be lost"), "{err}");
    assert!(
        err.contains(&format!(
            "pid {exec} (sh) of container \"a\", a child of pid {outsider} (runc:[2:INIT])"
        )),
        "{err}"
    );
    assert!(err.ends_with("the pod was left running"), "{err}");
    assert_eq!(fake.calls(), [Call::Freeze(cgroup("a")), Call::Thaw(cgroup("a"))]);
    assert!(pod.left_nothing());
}

#[test]
fn a_process_the_pause_process_adopted_is_one_root_with_its_descendants() {
    let (pause, init, orphan, child, own) = (PID + 100, PID + 1, PID + 3, PID + 4, PID + 5);
    let fake = FakeHost::new(Script {
        processes: [
            (init, process(PID + 99, "app", "a", 1)),
            (own, process(init, "worker", "a", 2)),
            (orphan, process(pause, "daemon", "a", 3)),
            (child, process(orphan, "helper", "a", 4)),
            (pause, process(PID + 98, "pause", "sandbox", 5)),
        ]
        .into(),
        ..Default::default()
    });
    let mut sandbox = target("sandbox", Role::Sandbox, ContainerState::Running);
    sandbox.pid = Some(pause);
    let mut a = running("a");
    a.pid = Some(init);
    let procs = vec![("a".to_owned(), vec![init, own, orphan, child])];
    let adopted = adopted_processes(&fake, &[sandbox, a.clone()], &[a], &procs).expect("adopted");
    assert_eq!(
        adopted,
        [AdoptedRoot {
            container: 0,
            root: orphan,
            members: vec![orphan, child],
        }]
    );
}

#[test]
fn a_process_restored_as_adopted_is_taken_only_with_its_start_time() {
    let (init, restored, shim) = (PID + 1, PID + 6, PID + 200);
    let script = |start: u64| Script {
        processes: [
            (init, process(PID + 99, "app", "a", 1)),
            (restored, process(shim, "daemon", "a", start)),
            (shim, process(1, "containerd-shim", "system", 2)),
        ]
        .into(),
        ..Default::default()
    };
    let mut a = running("a");
    a.pid = Some(init);
    a.adopted = vec![(restored, 77)];
    let procs = vec![("a".to_owned(), vec![init, restored])];
    let same = FakeHost::new(script(77));
    let adopted = adopted_processes(&same, &[a.clone()], std::slice::from_ref(&a), &procs).expect("taken");
    assert_eq!(adopted.len(), 1);
    assert_eq!(adopted[0].root, restored);
    let reused = FakeHost::new(script(78));
    let err = adopted_processes(&reused, &[a.clone()], &[a], &procs)
        .expect_err("a reused pid is not the restored process")
        .to_string();
    assert!(err.contains(&format!("pid {restored} (daemon)")), "{err}");
}

#[test]
fn a_sysv_segment_attached_in_two_containers_is_refused_naming_both() {
    let t = tempfile::tempdir().expect("tempdir");
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"cwd": "/", "args": ["app"], "user": {"uid": 0, "gid": 0}},
        "linux": {"namespaces": [{"type": "ipc", "path": "/proc/4100100/ns/ipc"}]}
    });
    let mut targets = Vec::new();
    for name in ["a", "b"] {
        let mut t0 = running(name);
        t0.bundle = t.path().join(name);
        std::fs::create_dir_all(&t0.bundle).expect("mkdir");
        std::fs::write(t0.bundle.join("config.json"), spec.to_string()).expect("spec");
        targets.push(t0);
    }
    let shared = |sysv: Vec<i32>| FakeProcess {
        sysv,
        ..Default::default()
    };
    let fake = FakeHost::new(Script {
        processes: [(PID + 1, shared(vec![7, 9])), (PID + 2, shared(vec![9]))].into(),
        ..Default::default()
    });
    let procs = vec![("a".to_owned(), vec![PID + 1]), ("b".to_owned(), vec![PID + 2])];
    let err = pod_ipc(&fake, &targets, &procs).expect_err("shared").to_string();
    assert!(
        err.contains("segment 9 is attached by processes of containers \"a\" and \"b\""),
        "{err}"
    );
    let alone = FakeHost::new(Script {
        processes: [(PID + 1, shared(vec![7])), (PID + 2, shared(vec![9]))].into(),
        ..Default::default()
    });
    let ipc = pod_ipc(&alone, &targets, &procs)
        .expect("ok")
        .expect("the pod's namespace");
    assert_eq!(ipc.ns, Path::new("/proc/4100100/ns/ipc"));
    assert_eq!(ipc.members["a-id"], [7].into());
    assert_eq!(ipc.attached[&9], "b");
}

fn connection(kind: &str, a: (&str, u64, i32), b: (&str, u64, i32)) -> UnixConnection {
    UnixConnection {
        kind: kind.into(),
        ends: [(a.0.into(), a.1, a.2), (b.0.into(), b.1, b.2)],
    }
}

fn told(ends: &[(&str, u64)]) -> ToldEnds {
    ToldEnds {
        ends: ends.iter().map(|(n, i)| (n.to_string(), *i)).collect(),
        configured: ["a".to_owned(), "b".to_owned()].into(),
        masked: Default::default(),
        cgroup_tmpfs: Default::default(),
    }
}

#[test]
fn a_told_stream_link_between_containers_is_recorded() {
    let found = [
        connection("u_str", ("a", 11, PID + 1), ("b", 12, PID + 2)),
        connection("u_str", ("a", 13, PID + 1), ("a", 14, PID + 1)), // within a container
    ];
    let links = unix_links(&found, &told(&[("a", 11), ("b", 12)]), &[]).expect("links");
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].kind, UnixKind::Stream);
    assert_eq!((links[0].ends[0].ino, links[0].ends[1].ino), (11, 12));
}

#[test]
fn a_datagram_link_between_containers_is_refused() {
    let found = [connection("u_dgr", ("a", 11, PID + 1), ("b", 12, PID + 2))];
    let err = unix_links(&found, &told(&[("a", 11), ("b", 12)]), &[])
        .expect_err("datagram")
        .to_string();
    assert!(
        err.contains("a connected unix datagram socket links containers"),
        "{err}"
    );
    assert!(err.ends_with("the pod was left running"), "{err}");
}

#[test]
fn a_link_opened_after_the_criu_runs_were_told_is_refused_with_dump_again() {
    let found = [connection("u_seq", ("a", 11, PID + 1), ("b", 12, PID + 2))];
    let err = unix_links(&found, &told(&[("a", 11)]), &[])
        .expect_err("not told")
        .to_string();
    assert!(err.contains("was opened while the dump began"), "{err}");
    assert!(err.contains("dump again"), "{err}");
}

#[test]
fn a_link_to_a_container_with_its_own_criu_configuration_is_refused() {
    let found = [connection("u_str", ("a", 11, PID + 1), ("c", 12, PID + 3))];
    let err = unix_links(&found, &told(&[("a", 11), ("c", 12)]), &[])
        .expect_err("own configuration")
        .to_string();
    assert!(
        err.contains("container \"c\" names a CRIU configuration file of its own"),
        "{err}"
    );
}

#[test]
fn more_links_than_a_restore_hands_runc_are_refused() {
    let n = podsnap_runtime::runc::MAX_INHERITED_FDS as u64 + 1;
    let found: Vec<UnixConnection> = (0..n)
        .map(|i| connection("u_str", ("a", 100 + i, PID + 1), ("b", 500 + i, PID + 2)))
        .collect();
    let ends: Vec<(&str, u64)> = (0..n).flat_map(|i| [("a", 100 + i), ("b", 500 + i)]).collect();
    let err = unix_links(&found, &told(&ends), &[])
        .expect_err("too many")
        .to_string();
    assert!(
        err.contains("container \"a\" holds more than") && err.contains("the most a restore hands runc"),
        "{err}"
    );
}

#[test]
fn an_adopted_tree_may_link_within_itself_but_not_outside() {
    let adopted = [AdoptedRoot {
        container: 0,
        root: PID + 3,
        members: vec![PID + 3, PID + 4],
    }];
    let within = [connection("u_str", ("a", 11, PID + 3), ("a", 12, PID + 4))];
    assert!(unix_links(&within, &told(&[]), &adopted)
        .expect("within")
        .is_empty());
    let outside = [connection("u_str", ("a", 11, PID + 3), ("a", 12, PID + 1))];
    let err = unix_links(&outside, &told(&[]), &adopted)
        .expect_err("outside its tree")
        .to_string();
    assert!(err.contains("adopted by the pod's pause process"), "{err}");
}

#[test]
fn a_failed_thaw_is_logged_and_the_others_are_still_thawed() {
    let fake = host(Script {
        failing_thaws: [cgroup("a")].into(),
        ..Default::default()
    });
    let mut guard = FreezeGuard::new(fake.clone());
    let a = running("a");
    let b = running("b");
    let list = [
        (&a, CgroupPaths::V2 { dir: cgroup("a") }),
        (&b, CgroupPaths::V2 { dir: cgroup("b") }),
    ];
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(guard.freeze_all(Path::new("/ckpt"), &list))
        .expect("frozen");
    guard.thaw_all();
    assert_eq!(
        fake.calls()[2..],
        [Call::Thaw(cgroup("a")), Call::Thaw(cgroup("b"))]
    );
    drop(guard);
    assert_eq!(fake.calls().len(), 4, "nothing left to thaw on drop");
}

#[test]
fn a_stop_kills_every_frozen_container_and_counts_the_processes() {
    let fake = host(Script {
        members: members(&[("a", &[PID + 1, PID + 2]), ("b", &[PID + 3])]),
        ..Default::default()
    });
    let mut guard = FreezeGuard::new(fake.clone());
    let (a, b) = (running("a"), running("b"));
    let list = [
        (&a, CgroupPaths::V2 { dir: cgroup("a") }),
        (&b, CgroupPaths::V2 { dir: cgroup("b") }),
    ];
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(guard.freeze_all(Path::new("/ckpt"), &list))
        .expect("frozen");
    assert_eq!(guard.kill_all(), 3);
    guard.thaw_all();
    assert_eq!(
        fake.calls()[2..],
        [
            Call::Kill(cgroup("a")),
            Call::Kill(cgroup("b")),
            Call::Thaw(cgroup("a")),
            Call::Thaw(cgroup("b")),
        ],
        "killed while frozen, then thawed"
    );
}

#[test]
fn a_guard_dropped_half_way_thaws_what_it_froze() {
    let fake = host(Script::default());
    let a = running("a");
    {
        let mut guard = FreezeGuard::new(fake.clone());
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(guard.freeze_all(Path::new("/ckpt"), &[(&a, CgroupPaths::V2 { dir: cgroup("a") })]))
            .expect("frozen");
    }
    assert_eq!(fake.calls(), [Call::Freeze(cgroup("a")), Call::Thaw(cgroup("a"))]);
}
