use super::*;
use crate::fs::proc::this_process;

fn entry(staging: &Path, frozen: Vec<PathBuf>) -> Entry {
    Entry {
        owner_pid: u32::MAX - 1,
        owner_start: 12345,
        frozen,
        staging: staging.to_path_buf(),
        in_place: false,
        dest: staging.with_extension("final"),
        netns: None,
        phase: Phase::Dumping,
        workers: Vec::new(),
        mark: String::new(),
    }
}

const NO_PROGRAMS: podsnap_runtime::launcher::TokioLauncher = podsnap_runtime::launcher::TokioLauncher;

#[tokio::test]
async fn a_dead_owners_staging_is_removed_and_the_journal_with_it() {
    let t = tempfile::tempdir().expect("tempdir");
    let staging = t.path().join(".ckpt.tmp-1");
    std::fs::create_dir_all(staging.join("containers/app")).expect("mkdir");
    let path = t.path().join("journal/pod.json");
    let j = Journal::begin(&path, entry(&staging, vec![])).expect("begin");
    std::mem::forget(j); // the owner "dies": its Drop never runs
    let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
    assert_eq!(done.removed.as_deref(), Some(staging.as_path()));
    assert!(!staging.exists() && !path.exists());
    assert_eq!(
        recover(&NO_PROGRAMS, &path).await.expect("again"),
        Recovered::default()
    );
}

#[tokio::test]
async fn a_live_owner_is_left_alone() {
    let t = tempfile::tempdir().expect("tempdir");
    let staging = t.path().join("staging");
    std::fs::create_dir(&staging).expect("mkdir");
    let (pid, start) = this_process();
    let mut e = entry(&staging, vec![]);
    e.owner_pid = pid;
    e.owner_start = start;
    let path = t.path().join("pod.json");
    let j = Journal::begin(&path, e).expect("begin");
    assert!(recover(&NO_PROGRAMS, &path).await.expect("recover").owner_alive);
    assert!(staging.exists() && path.exists());
    drop(j);
    assert!(!path.exists(), "the journal goes with its guard");
}

#[tokio::test]
async fn in_place_staging_keeps_the_directory_and_torn_journals_are_dropped() {
    let t = tempfile::tempdir().expect("tempdir");
    let dest = t.path().join("dest");
    std::fs::create_dir_all(dest.join("containers")).expect("mkdir");
    std::fs::write(dest.join("manifest.tmp"), b"x").expect("write");
    let mut e = entry(&dest, vec![t.path().join("no-such-cgroup")]);
    e.in_place = true;
    let path = t.path().join("pod.json");
    std::mem::forget(Journal::begin(&path, e).expect("begin"));
    let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
    assert!(done.thawed.is_empty(), "a gone cgroup is skipped");
    assert!(dest.is_dir());
    assert_eq!(std::fs::read_dir(&dest).expect("list").count(), 0);
    std::fs::write(&path, b"{\"owner_pid\": 1").expect("torn");
    assert_eq!(
        recover(&NO_PROGRAMS, &path).await.expect("torn"),
        Recovered::default()
    );
    assert!(!path.exists());
}

#[tokio::test]
async fn a_dead_dump_thaws_exactly_the_listed_cgroups_that_still_exist() {
    use podsnap_runtime::host::fake::{Call, FakeHost, Script};
    let t = tempfile::tempdir().expect("tempdir");
    let staging = t.path().join("staging");
    std::fs::create_dir(&staging).expect("mkdir");
    let (a, gone, b) = (t.path().join("a"), t.path().join("gone"), t.path().join("b"));
    let host = FakeHost::new(Script {
        freezable: [a.clone(), b.clone(), t.path().join("not-listed")].into(),
        ..Default::default()
    });
    let path = t.path().join("pod.json");
    let listed = vec![a.clone(), gone, b.clone()];
    std::mem::forget(Journal::begin(&path, entry(&staging, listed)).expect("begin"));
    let done = recover_on(&host, &NO_PROGRAMS, &path).await.expect("recover");
    assert_eq!(done.thawed, [a.clone(), b.clone()]);
    assert_eq!(
        host.calls(),
        [Call::SetFreezer(a, false), Call::SetFreezer(b, false)],
        "nothing killed while dumping; a gone cgroup is skipped"
    );
    assert!(!staging.exists() && !path.exists());
}

#[tokio::test]
async fn a_dead_dump_stopping_the_pod_kills_it_before_the_thaw_and_keeps_the_checkpoint() {
    use podsnap_runtime::host::fake::{Call, FakeHost, Script};
    let t = tempfile::tempdir().expect("tempdir");
    let dest = t.path().join("ckpt");
    crate::node::store::tests::write_checkpoint(&dest, "default", "web", 1, 10);
    let a = t.path().join("a");
    let host = FakeHost::new(Script {
        freezable: [a.clone()].into(),
        members: [(a.clone(), vec![4_100_001, 4_100_002])].into(),
        ..Default::default()
    });
    let mut e = entry(&dest, vec![a.clone()]);
    (e.in_place, e.dest, e.phase) = (true, dest.clone(), Phase::Stopping);
    let path = t.path().join("pod.json");
    std::mem::forget(Journal::begin(&path, e).expect("begin"));
    let done = recover_on(&host, &NO_PROGRAMS, &path).await.expect("recover");
    assert_eq!((done.stopped, done.kept.as_deref()), (2, Some(dest.as_path())));
    assert_eq!(host.calls(), [Call::Kill(a.clone()), Call::SetFreezer(a, false)]);
    assert!(dest.join(crate::format::manifest::MANIFEST).exists());
}

#[tokio::test]
async fn a_dead_dumps_v1_and_v2_cgroups_are_thawed() {
    // Fixture cgroups in the kernel's formats: a v1 freezer that reports THAWED once
    // written, and a v2 cgroup whose cgroup.events already says frozen 0.
    let t = tempfile::tempdir().expect("tempdir");
    let v1 = t.path().join("freezer/kubepods/pod/c1");
    let v2 = t.path().join("unified/kubepods/pod/c2");
    std::fs::create_dir_all(&v1).expect("mkdir");
    std::fs::create_dir_all(&v2).expect("mkdir");
    std::fs::write(v1.join("freezer.state"), "FROZEN\n").expect("write");
    std::fs::write(v2.join("cgroup.freeze"), "1\n").expect("write");
    std::fs::write(v2.join("cgroup.events"), "populated 1\nfrozen 0\n").expect("write");
    let staging = t.path().join("staging");
    std::fs::create_dir(&staging).expect("mkdir");
    let path = t.path().join("pod.json");
    std::mem::forget(Journal::begin(&path, entry(&staging, vec![v1.clone(), v2.clone()])).expect("begin"));
    let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
    assert_eq!(done.thawed, [v1.clone(), v2.clone()]);
    assert_eq!(
        std::fs::read_to_string(v1.join("freezer.state")).expect("read"),
        "THAWED"
    );
    assert_eq!(
        std::fs::read_to_string(v2.join("cgroup.freeze")).expect("read"),
        "0"
    );
}

/// A process in a process group of its own, killed with its group when dropped.
struct Spawned(std::process::Child);

impl Spawned {
    fn new(cmd: &mut std::process::Command) -> Self {
        use std::os::unix::process::CommandExt;
        Self(cmd.process_group(0).spawn().expect("spawn"))
    }

    fn runs(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_none()
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the group is this child's own.
        unsafe {
            libc::kill(-self.pid(), libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn only_the_dumps_recorded_workers_are_killed_not_a_neighbour_naming_a_similar_path() {
    let t = tempfile::tempdir().expect("tempdir");
    let staging = t.path().join("ck2");
    let images = staging.join("containers/app/checkpoint");
    std::fs::create_dir_all(&images).expect("mkdir");
    let bystander_dir = t.path().join("ck2-bystander");
    std::fs::create_dir(&bystander_dir).expect("mkdir");
    // The dump's worker (a runc: its command line names the images), and the CRIU it
    // starts, found by `record_descendants`.
    let mut worker = Spawned::new(
        std::process::Command::new("sh")
            .args(["-c", "sleep 100 & wait"])
            .arg(&images)
            .current_dir(&images),
    );
    // Someone else's: one naming a path beside the dump's, one working in it.
    let mut neighbour = Spawned::new(
        std::process::Command::new("sh")
            .args(["-c", "sleep 100"])
            .arg(&bystander_dir),
    );
    let mut inside = Spawned::new(
        std::process::Command::new("sleep")
            .arg("100")
            .current_dir(&staging),
    );
    let mut e = entry(&staging, vec![]);
    e.in_place = true;
    let path = t.path().join("pod.json");
    let j = Journal::begin(&path, e).expect("begin");
    j.worker_started(worker.pid());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while podsnap_runtime::cgroup::process_tree(worker.pid()).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the worker's child starts");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    j.record_descendants();
    let child = podsnap_runtime::cgroup::process_tree(worker.pid())[1];
    std::mem::forget(j);
    let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
    assert_eq!(done.killed, 2, "the worker and its child, recorded");
    // SIGKILL is delivered, not yet acted on, when kill returns: wait for it, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while worker.runs() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dump's worker is killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    while start_time(child as u32).is_some() {
        assert!(std::time::Instant::now() < deadline, "its child too");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        neighbour.runs(),
        "a process naming ck2-bystander is not the dump's"
    );
    assert!(inside.runs(), "nor one working in the destination");
}

/// A shim killed in the instant between starting a runc and recording it: the runc (and the
/// CRIU it started) carry the dump's mark, and die with the recovery; processes with another
/// mark, or naming the mark otherwise, do not.
#[tokio::test]
async fn a_worker_never_recorded_is_found_by_the_dumps_mark_and_nothing_else_is() {
    use podsnap_runtime::launcher::MARK_ENV;
    let t = tempfile::tempdir().expect("tempdir");
    let staging = t.path().join("ck");
    std::fs::create_dir_all(&staging).expect("mkdir");
    let mark = podsnap_runtime::launcher::new_mark().expect("mark");
    assert_eq!(mark.len(), 32);
    assert_ne!(mark, podsnap_runtime::launcher::new_mark().expect("another"));
    // The unrecorded worker, as the launcher starts it (the mark in its environment), with a
    // child that inherits it.
    let mut worker = Spawned::new(
        std::process::Command::new("sh")
            .args(["-c", "sleep 100 & wait"])
            .env(MARK_ENV, &mark),
    );
    let mut other_dump = Spawned::new(
        std::process::Command::new("sleep")
            .arg("100")
            .env(MARK_ENV, format!("{mark}0")),
    );
    let mut naming_it = Spawned::new(
        std::process::Command::new("sh")
            .args(["-c", "sleep 100", &format!("{MARK_ENV}={mark}")])
            .env("OTHER", format!("{MARK_ENV}={mark}")),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while podsnap_runtime::cgroup::process_tree(worker.pid()).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "the worker's child starts");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let child = podsnap_runtime::cgroup::process_tree(worker.pid())[1];
    let mut e = entry(&staging, vec![]);
    e.mark = mark;
    let path = t.path().join("pod.json");
    std::mem::forget(Journal::begin(&path, e).expect("begin"));
    let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
    assert_eq!(done.killed, 2, "the worker and its child, by their mark");
    while worker.runs() || start_time(child as u32).is_some() {
        assert!(std::time::Instant::now() < deadline, "both are killed");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(other_dump.runs(), "another mark is another dump's");
    assert!(naming_it.runs(), "naming the mark is not carrying it");
}

#[tokio::test]
async fn a_committed_checkpoint_is_kept_and_moved_into_place_if_it_was_not() {
    let t = tempfile::tempdir().expect("tempdir");
    // Committed in place: kept as it is.
    let dest = t.path().join("in-place");
    crate::node::store::tests::write_checkpoint(&dest, "default", "web", 1, 10);
    let mut e = entry(&dest, vec![]);
    (e.in_place, e.dest, e.phase) = (true, dest.clone(), Phase::Committed);
    let path = t.path().join("pod.json");
    std::mem::forget(Journal::begin(&path, e).expect("begin"));
    let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
    assert_eq!(done.kept.as_deref(), Some(dest.as_path()));
    assert_eq!(done.removed, None);
    crate::format::manifest::Manifest::load_verified(&dest).expect("whole");

    // Complete in staging, the move not done yet: moved.
    let staging = t.path().join(".moved.tmp-1");
    crate::node::store::tests::write_checkpoint(&staging, "default", "web", 1, 10);
    let dest = t.path().join("moved");
    let mut e = entry(&staging, vec![]);
    (e.dest, e.phase) = (dest.clone(), Phase::Stopping);
    std::mem::forget(Journal::begin(&path, e).expect("begin"));
    let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
    assert_eq!(done.kept.as_deref(), Some(dest.as_path()));
    assert!(!staging.exists());
    crate::format::manifest::Manifest::load_verified(&dest).expect("whole");

    // Said committed but not whole (a listed file is missing): nothing is removed.
    let staging = t.path().join(".torn.tmp-1");
    crate::node::store::tests::write_checkpoint(&staging, "default", "web", 1, 10);
    std::fs::remove_file(staging.join("containers/app/config.json")).expect("rm");
    let mut e = entry(&staging, vec![]);
    e.phase = Phase::Stopping;
    std::mem::forget(Journal::begin(&path, e).expect("begin"));
    let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
    assert_eq!((done.kept, done.removed, done.stopped), (None, None, 0));
    assert!(staging.exists() && !path.exists());
}

/// A real cgroup of this node's layout (a v1 freezer, or v2) holding one `sleep`, frozen;
/// removed when dropped.
struct FrozenSleeper {
    dir: PathBuf,
    sleeper: Option<Spawned>,
}

impl FrozenSleeper {
    fn new(name: &str) -> Self {
        use podsnap_runtime::cgroup::{CgroupMode, CGROUP_ROOT};
        let base = match CgroupMode::of_node() {
            CgroupMode::Unified => PathBuf::from(CGROUP_ROOT),
            _ => Path::new(CGROUP_ROOT).join("freezer"),
        };
        let dir = base.join(format!("podsnap-journal-{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).expect("make a cgroup (root is needed)");
        let sleeper = Spawned::new(std::process::Command::new("sleep").arg("100"));
        std::fs::write(dir.join("cgroup.procs"), sleeper.pid().to_string()).expect("join it");
        podsnap_runtime::cgroup::set_freezer_state(&dir, true).expect("freeze");
        Self {
            dir,
            sleeper: Some(sleeper),
        }
    }

    fn sleeper(&mut self) -> &mut Spawned {
        self.sleeper.as_mut().expect("sleeper")
    }
}

impl Drop for FrozenSleeper {
    fn drop(&mut self) {
        let _ = podsnap_runtime::cgroup::set_freezer_state(&self.dir, false);
        drop(self.sleeper.take());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[tokio::test]
async fn a_committed_dump_is_thawed_and_a_stopping_one_killed_before_the_thaw() {
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("pod.json");
    for phase in [Phase::Committed, Phase::Stopping] {
        let mut cg = FrozenSleeper::new(&format!("{phase:?}"));
        let dest = t.path().join(format!("{phase:?}"));
        crate::node::store::tests::write_checkpoint(&dest, "default", "web", 1, 10);
        let mut e = entry(&dest, vec![cg.dir.clone()]);
        (e.in_place, e.dest, e.phase) = (true, dest.clone(), phase);
        std::mem::forget(Journal::begin(&path, e).expect("begin"));
        let done = recover(&NO_PROGRAMS, &path).await.expect("recover");
        assert_eq!(done.thawed, [cg.dir.clone()], "{phase:?}");
        assert_eq!(done.kept.as_deref(), Some(dest.as_path()), "{phase:?}");
        let state = std::fs::read_to_string(cg.dir.join("freezer.state"))
            .or_else(|_| std::fs::read_to_string(cg.dir.join("cgroup.freeze")))
            .expect("freezer state");
        assert!(matches!(state.trim(), "THAWED" | "0"), "{phase:?}: {state}");
        if phase == Phase::Stopping {
            assert_eq!(done.stopped, 1);
            let status = cg.sleeper().0.wait().expect("wait");
            assert!(!status.success(), "killed at the snapshot");
        } else {
            assert_eq!(done.stopped, 0);
            assert!(cg.sleeper().runs(), "the pod runs on, thawed");
        }
    }
}

#[test]
fn start_times_identify_this_process() {
    let (pid, start) = this_process();
    assert_eq!(pid, std::process::id());
    assert!(start > 0);
}
