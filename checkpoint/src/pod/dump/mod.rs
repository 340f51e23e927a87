//! Pod dump: every container of a pod captured at one instant.
//!
//! 1. pre-flight: the memory in use, the rootfs changes and the volumes must fit in the free
//!    space of the destination's filesystem (leaving the node's reserve), or the dump is
//!    refused up front with the numbers;
//! 2. the crash journal ([`crate::pod::dump::journal`]) records what is about to be frozen and where the
//!    staging output goes;
//! 3. start each running container's `runc checkpoint` (leave running) while the pod still
//!    runs; its CRIU starts, probes the kernel and waits in a pre-dump script before it
//!    touches a process ([`crate::criu::hold`]). The container's CRIU configuration file says
//!    so, and `network-lock skip` under the pod's lock;
//! 4. quiesce: lock the pod's network namespace once ([`crate::pod::shared::netlock`]), then, once every
//!    CRIU waits, freeze each running container's own cgroup (CRIU cannot see a parent's
//!    freeze): v1 `freezer.state`, or v2 `cgroup.freeze` until `cgroup.events` says
//!    `frozen 1`; check the frozen pod (processes that would be lost, SysV segments and unix
//!    connections shared by two containers: the dump is refused and every CRIU gives up);
//! 5. while frozen, in parallel: let every CRIU dump its container, capture the rootfs
//!    changes (from the overlay upper directory mountinfo names; a container whose changes
//!    cannot be found fails the dump: see [`crate::archive::rootfs::upperdir_for_dump`]), archive the pod's
//!    emptyDir volumes, `/dev/shm` and SysV IPC;
//! 6. resume: thaw every container, then unlock the network. With `stop`, the checkpoint is
//!    first completed (specs, digests, manifest, renamed into place) while everything is
//!    still frozen, then every process of the pod is killed before the thaw: nothing runs
//!    after the snapshot, and the network stays locked (no FIN or reset of a dying socket
//!    reaches a peer whose connection a restore brings back);
//! 7. otherwise after the thaw: specs, digests, manifest last (temporary file, fsync, rename),
//!    and the staging directory renamed into place.
//!
//! Before the digests (in 6 or 7) each container's part is complete; when the caller made
//! `<dest>.parts` the dump announces each there ([`PartReady`]), so a push can start on them.
//!
//! Speed: the frozen window holds the freeze, the checks and CRIU's own dump, no more: runc's
//! and CRIU's start come before it, and CRIU's per-container iptables lock is skipped (the pod
//! lock holds the namespace). Nothing is fsynced while the pod is frozen; the digests (BLAKE3,
//! every core) are taken after the thaw, with `criu cpuinfo dump`, the node's runc and CRIU
//! versions and the pod's addresses read beside the dumps and the network unlocked beside
//! the digests. The data files are not synced one by one: a checkpoint torn by a crash fails
//! its digests and is refused, never half used; with `stop` the whole filesystem is synced
//! (one `syncfs`) before the pod is killed, since the checkpoint is then all that is left of
//! it.
//!
//! Guarantees, on every path (error, panic, a caller that gives up, the deadline): every
//! freeze attempted is undone (a guard thaws on drop), the staging output is removed unless
//! committed, and runc/CRIU still running are killed with every process they started. The
//! journal records each program the dump starts and, before the commit, that the checkpoint is
//! complete (`committed`, or `stopping` with `stop`): a recovery after the dump's process died
//! undoes the dump before that and finishes it after (see [`crate::pod::dump::journal`]). The
//! deadline and the caller giving up stop the dump at once, with an error that says so. A
//! failed dump leaves the pod running as it was and no output; its error names the container
//! with the tail of CRIU's log, or the cause (ENOSPC, EIO, ...). Containers that are not
//! running (completed init containers) are recorded only.

pub mod journal;
pub mod preflight;
pub mod prehash;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use podsnap_runtime::cgroup::CgroupPaths;
use podsnap_runtime::launcher::{Launcher, Limit};
use podsnap_runtime::runc::Runc;

use crate::archive::rootfs;
use crate::criu::container::{self, Dump, DumpOptions};
use crate::criu::hold::Hold;
use crate::error::{Error, Result};
use crate::failpoint::hold;
use crate::format::layout::{empty_dir_name, parts_dir, PartReady, DEV_SHM_ARCHIVE};
use crate::format::manifest::{
    validate_name, ContainerEntry, DigestAlgorithm, DumpStats, FileDigest, HostInfo, Manifest, PodInfo,
    VolumeEntry, VolumeMount, CPUINFO, FORMAT, MANIFEST, VERSION,
};
use crate::format::manifest::{
    AdoptedProcess, CONFIG_DUMP, DELETED_FILES, MAX_JSON_BYTES, PART_NAMES, ROOTFS_DELETED, ROOTFS_DIFF,
};
use crate::format::record::{ContainerState, Role};
use crate::fs::private::{
    create_private_dir, make_private, sync_dir, sync_filesystem, write_private, write_synced,
};
use crate::fs::remove::RemoveOnDrop;
use journal::Journal;

/// A container of the pod, as the shim knows it.
#[derive(Debug, Clone)]
pub struct Target {
    pub entry: ContainerEntry,
    pub runc: Runc,
    pub bundle: PathBuf,
    pub cgroups: Option<CgroupPaths>,
    /// The host pid of its init process, while it runs.
    pub pid: Option<i32>,
    /// The container's OCI spec when its bundle is gone (a completed container whose task was
    /// deleted); read from the bundle otherwise.
    pub spec: Option<Vec<u8>>,
    /// (host pid, start time) of its processes restored as adopted by the pod's pause process
    /// (a shim restoring them became their parent): dumped as adopted again.
    pub adopted: Vec<(i32, u64)>,
    /// When the runtime created it (its `config.dump`'s `createdTime`), when known.
    pub created: Option<std::time::SystemTime>,
}

/// What to dump and where.
#[derive(Clone)]
pub struct PodDump {
    pub dest: PathBuf,
    /// The pod; its addresses are read by the dump.
    pub pod: PodInfo,
    pub targets: Vec<Target>,
    /// Keep established TCP connections on restore (they are always captured).
    pub tcp_established: bool,
    /// Runs the programs of the dump that are not runc (`criu cpuinfo`).
    pub launcher: std::sync::Arc<dyn Launcher>,
    /// Stop the pod at the snapshot: its processes are killed while still frozen.
    pub stop: bool,
    /// How long the whole dump may take.
    pub deadline: Duration,
    /// Turns `true` when the caller gives up.
    pub cancel: Option<tokio::sync::watch::Receiver<bool>>,
    /// Where to keep the crash journal (none when `None`).
    pub journal: Option<PathBuf>,
    /// The pod's network namespace (`None`: the host's network).
    pub netns: Option<PathBuf>,
    /// Lock it for the whole dump (the node's `[dump] network_lock = "pod"`).
    pub lock_network: bool,
    /// Digest page images as CRIU closes them (the node's `[dump] digests = "early"`).
    pub early_digests: bool,
    /// Free space the dump must leave on the destination's filesystem (the node's
    /// `[dump] reserve_bytes`).
    pub reserve_bytes: u64,
}

impl std::fmt::Debug for PodDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodDump")
            .field("dest", &self.dest)
            .field("pod", &self.pod.sandbox_id)
            .field("targets", &self.targets.len())
            .field("stop", &self.stop)
            .field("deadline", &self.deadline)
            .finish()
    }
}

/// How a dump went.
#[derive(Debug, Clone, Default)]
pub struct DumpReport {
    /// First freeze to last thaw.
    pub frozen: Duration,
    /// The slowest single container's CRIU dump.
    pub slowest_dump: Duration,
    pub total: Duration,
    pub bytes: u64,
    pub dumped: Vec<String>,
    /// Processes killed at the snapshot (`stop`).
    pub killed: usize,
    /// When each phase of the dump ended.
    pub phases: Phases,
}

/// When each phase of a dump ended, from its start (for the log).
#[derive(Debug, Clone, Default)]
pub struct Phases {
    start: Option<Instant>,
    marks: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn begin() -> Self {
        Self {
            start: Some(Instant::now()),
            marks: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        if let Some(start) = self.start {
            self.marks.push((phase, start.elapsed()));
        }
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (phase, at)) in self.marks.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{phase} {} ms", at.as_millis())?;
        }
        Ok(())
    }
}

/// Dumps a pod; see the module documentation.
pub async fn dump_pod(d: PodDump) -> Result<DumpReport> {
    let started = Instant::now();
    let mut phases = Phases::begin();
    for t in &d.targets {
        validate_name(&t.entry.name).map_err(|reason| Error::InvalidCheckpoint {
            path: d.dest.clone(),
            reason,
        })?;
    }
    let limit = Limit::after(d.deadline, d.cancel.clone());
    let running = running(&d.targets);
    // Each container's CRIU finds the kernel's features in the cache, not by probing.
    crate::criu::kdat::ensure_logged(&*d.launcher).await;
    crate::pod::dump::preflight::check(&d.dest, &d.targets, &running, d.reserve_bytes).await?;
    phases.mark("preflight");
    // Drop order matters: the staging guard (removes uncommitted output) and the frozen guard
    // inside `dump_into` go before the journal that lists them.
    let (owner_pid, owner_start) = crate::fs::proc::this_process();
    let entry = journal::Entry {
        owner_pid,
        owner_start,
        // The containers the dump freezes (a paused one stays as it is).
        frozen: running
            .iter()
            .filter(|t| t.entry.state == ContainerState::Running)
            .filter_map(|t| {
                t.cgroups
                    .as_ref()
                    .and_then(|c| c.freezer())
                    .map(Path::to_path_buf)
            })
            .collect(),
        dest: d.dest.clone(),
        netns: d.netns.clone(),
        ..Default::default()
    };
    let journal = Arc::new(match &d.journal {
        Some(path) => Journal::begin(path, entry)?,
        None => Journal::none(),
    });
    // Every program the dump starts (runc, and the CRIU of an adopted process) is recorded as
    // it starts: a recovery kills those and nothing else.
    let mut limit = limit;
    let recording = Arc::downgrade(&journal);
    limit.spawned = Some(podsnap_runtime::launcher::Spawned::new(move |pid| {
        if let Some(journal) = recording.upgrade() {
            journal.worker_started(pid);
        }
    }));
    let mut staging = Staging::new(&d.dest, journal.clone())?;
    phases.mark("journal");
    let mut report = DumpReport {
        phases,
        ..Default::default()
    };
    dump_into(&d, &mut staging, &running, &limit, &mut report).await?;
    if !staging.committed {
        // Complete, and the pod thawed: from here on a recovery keeps the checkpoint.
        staging.commit(journal::Phase::Committed)?;
        hold("committed").await;
    }
    drop(staging);
    drop(journal);
    report.phases.mark("committed");
    // The digests were just computed from these files: a restore of them needs not read them
    // again while they stay as they are.
    let sealed = Manifest::load_listed(&d.dest)
        .and_then(|m| crate::trust::seal::record(Path::new(crate::trust::seal::SEAL_DIR), &d.dest, &m));
    if let Err(e) = sealed {
        log::warn!("{e}");
    }
    report.total = started.elapsed();
    Ok(report)
}

/// The containers whose processes are dumped (running or paused).
fn running(targets: &[Target]) -> Vec<&Target> {
    targets
        .iter()
        .filter(|t| {
            t.entry.role == Role::Container
                && matches!(t.entry.state, ContainerState::Running | ContainerState::Paused)
        })
        .collect()
}

/// Fails once the deadline passed or the caller gave up, saying during what.
fn check(limit: &Limit, deadline: Duration, during: &str) -> Result<()> {
    if limit.cancelled() {
        return Err(Error::Stopped {
            reason: format!("the caller gave up {during}"),
        });
    }
    if limit.expired() {
        return Err(Error::Stopped {
            reason: format!("the dump deadline of {} s passed {during}", deadline.as_secs()),
        });
    }
    Ok(())
}

async fn dump_into(
    d: &PodDump,
    staging: &mut Staging,
    running: &[&Target],
    limit: &Limit,
    report: &mut DumpReport,
) -> Result<()> {
    let dir = staging.dir.clone();
    for t in &d.targets {
        create_private_dir(&dir.join(t.entry.dir()))?;
    }
    // The CPU this pod runs on, so a restore elsewhere is checked before it starts (outside
    // the frozen window).
    let host_dir = dir
        .join(CPUINFO)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    create_private_dir(&host_dir)?;
    // One network lock for the whole pod, before the first freeze and until the last thaw,
    // whatever happens in between (the frozen phase thaws everything before it returns).
    // Under it each container's CRIU skips its own (iptables in the pod's namespace when it
    // starts, per connection, and when it ends: all of it while frozen).
    let lock = d.netns.as_deref().filter(|_| d.lock_network);
    // Unix connections between containers, read while the pod runs: the CRIU of each end must
    // be told before it starts that the socket is external (its peer is another CRIU's).
    let planned = planned_unix_ends(d, running).await?;
    let (criu_configs, holds, told) = CriuConfigs::write(running, lock.is_some(), &planned)?;
    // runc and CRIU start first, while the pod runs; each CRIU waits before it touches a
    // process, and no further than that until the pod is locked, frozen and checked.
    // Each container's page images are hashed as CRIU closes them (see crate::pod::dump::prehash).
    let image_dirs: Vec<PathBuf> = running
        .iter()
        .map(|t| dir.join(t.entry.dir()).join(PART_NAMES.images))
        .collect();
    for d in &image_dirs {
        create_private_dir(d)?;
    }
    let prehash = d
        .early_digests
        .then(|| crate::pod::dump::prehash::Prehash::start(&image_dirs))
        .flatten();
    let mut dumps = Dumps::start_held(&dir, running, limit, holds);
    dumps.journal = Some(staging.journal.clone());
    dumps.external_unix = told;
    dumps.prehash = prehash;
    // What the checkpoint records of the node and of the pod's addresses, and `criu cpuinfo
    // dump`, run beside the freeze and the dumps; only the digests and the manifest need them.
    let launcher = d.launcher.clone();
    let runc = running
        .first()
        .copied()
        .or(d.targets.first())
        .map(|t| t.runc.binary().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("runc"));
    let netns = d.netns.clone();
    let sandbox = d.pod.sandbox_id.clone();
    let mut recorded = Beside(Some(tokio::spawn(async move {
        let ips = async {
            match &netns {
                Some(ns) => crate::pod::shared::netlock::addresses(launcher.as_ref(), ns)
                    .await
                    .unwrap_or_else(|e| {
                        log::warn!("pod {sandbox}: its addresses are not recorded: {e}");
                        Vec::new()
                    }),
                None => Vec::new(),
            }
        };
        let (cpu, host, ips) = tokio::join!(
            crate::trust::identity::dump_cpuinfo(launcher.as_ref(), &host_dir),
            crate::trust::identity::this_node(launcher.as_ref(), &runc),
            ips
        );
        cpu.map(|()| Recorded { host, ips })
    })));
    let netlock = match locked(d, limit, lock).await {
        Ok(netlock) => netlock,
        Err(e) => {
            dumps.abort().await;
            return Err(e);
        }
    };
    report.phases.mark("network locked");
    let quiesced = quiesced(d, staging, running, limit, report, &mut recorded, &mut dumps).await;
    let captured = match quiesced {
        Err(e) => {
            netlock.release().await;
            return Err(e);
        }
        Ok(Quiesced::Stopped) => {
            netlock.leave_locked();
            return Ok(());
        }
        Ok(Quiesced::Thawed(captured)) => captured,
    };
    // Everything is thawed: the lock goes while the checkpoint is finished.
    let finishing = async {
        hold("thawed").await;
        check(limit, d.deadline, "after the thaw")?;
        let recorded = recorded.done().await?;
        finish(d, &dir, running, captured, recorded, report, report.frozen).await
    };
    drop(criu_configs);
    let ((), bytes) = tokio::join!(netlock.release(), finishing);
    report.bytes = bytes?;
    report.phases.mark("finished");
    Ok(())
}

/// The pod's network lock, taken when the dump may go on to the freeze.
async fn locked(
    d: &PodDump,
    limit: &Limit,
    lock: Option<&Path>,
) -> Result<crate::pod::shared::netlock::NetLock> {
    hold("before-freeze").await;
    check(limit, d.deadline, "before the freeze")?;
    crate::pod::shared::netlock::NetLock::take(d.launcher.clone(), lock, limit).await
}

/// What the checkpoint records of the node and of the pod's network, read beside the dump.
struct Recorded {
    host: HostInfo,
    ips: Vec<std::net::IpAddr>,
}

/// What the containers' CRIU runs were told of unix connections between containers.
#[derive(Default)]
struct ToldEnds {
    /// (container name, socket inode) ends they were told are external.
    ends: HashSet<(String, u64)>,
    /// Containers whose CRIU reads podsnap's configuration file (only those can be told).
    configured: HashSet<String>,
}

/// The CRIU configuration files of the dumped containers (see
/// [`container::CRIU_CONFIG_FILE`]) for the length of the dump: removed when dropped.
struct CriuConfigs(Vec<PathBuf>);

impl CriuConfigs {
    /// What CRIU is told for this dump, for each of `running` whose bundle has podsnap's file
    /// (the others get their CRIU started once the pod is frozen, with CRIU's own network
    /// lock): its hold ([`crate::criu::hold`]), `network-lock skip` when the pod's network is
    /// locked by podsnap, and `external unix[INO]` for each of its sockets in `unix_ends`
    /// (container name -> inodes: ends of connections to other containers). A file left by a
    /// restore (`tcp-close`) is replaced. Returns the holds, one place per container of
    /// `running`, and the (container, inode) ends its CRIU was told of.
    fn write(
        running: &[&Target],
        pod_locked: bool,
        unix_ends: &HashMap<String, BTreeSet<u64>>,
    ) -> Result<(Self, Vec<Option<Hold>>, ToldEnds)> {
        let mut files = CriuConfigs(Vec::new());
        let mut holds = Vec::new();
        let mut told = ToldEnds::default();
        for t in running {
            let bundle = podsnap_runtime::bundle::Bundle::new(&t.bundle);
            let Some(conf) = bundle
                .spec()
                .ok()
                .and_then(|spec| container::own_criu_config(&t.bundle, &spec))
            else {
                holds.push(None);
                continue;
            };
            files.0.push(conf.clone());
            told.configured.insert(t.entry.name.clone());
            // A bundle on a noexec mount cannot hold CRIU's script: dumped once frozen.
            let (hold, mut text) = match Hold::possible(&t.bundle) {
                true => Hold::prepare(&t.bundle).map(|(hold, line)| (Some(hold), line))?,
                false => (None, String::new()),
            };
            if pod_locked {
                text.push_str("network-lock skip\n");
            }
            for ino in unix_ends.get(&t.entry.name).into_iter().flatten() {
                text.push_str(&format!("external unix[{ino}]\n"));
                told.ends.insert((t.entry.name.clone(), *ino));
            }
            write_private(&conf, text.as_bytes())?;
            holds.push(hold);
        }
        Ok((files, holds, told))
    }
}

impl Drop for CriuConfigs {
    fn drop(&mut self) {
        for conf in &self.0 {
            if let Err(e) = remove_if_there(conf) {
                log::warn!("{e}");
            }
        }
    }
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("remove a CRIU configuration file", path, e))
        }
        _ => Ok(()),
    }
}

/// Work of the dump running beside it (`criu cpuinfo dump`, what the manifest records of the
/// node and the pod's addresses): awaited before the digests, aborted if the dump stops first.
struct Beside(Option<tokio::task::JoinHandle<Result<Recorded>>>);

impl Beside {
    async fn done(&mut self) -> Result<Recorded> {
        match self.0.take() {
            Some(task) => task
                .await
                .map_err(|e| Error::io("record the CPU features", "criu", std::io::Error::other(e)))?,
            None => Err(Error::io(
                "record the CPU features",
                "criu",
                std::io::Error::other("awaited twice"),
            )),
        }
    }
}

impl Drop for Beside {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// How the frozen phase ended.
enum Quiesced {
    /// Thawed; what the containers share captured, the checkpoint still to finish.
    Thawed(Captured),
    /// The checkpoint is complete and committed, the pod killed at the snapshot (`stop`).
    Stopped,
}

/// Freezes the pod, dumps it, and thaws it (or kills it at the snapshot), the thaw guaranteed
/// on every path by the [`Frozen`] guard.
async fn quiesced(
    d: &PodDump,
    staging: &mut Staging,
    running: &[&Target],
    limit: &Limit,
    report: &mut DumpReport,
    recorded: &mut Beside,
    dumps: &mut Dumps,
) -> Result<Quiesced> {
    let dir = staging.dir.clone();
    let mut frozen = Frozen::default();
    let frozen_capture = freeze_and_capture(d, &dir, running, limit, report, &mut frozen, dumps).await;
    let (freeze_start, slowest, captured) = match frozen_capture {
        Ok(done) => done,
        Err(e) => {
            // No runc may outlive the dump: the held ones give up, the others end.
            dumps.abort().await;
            return Err(e);
        }
    };
    report.slowest_dump = slowest;
    report.phases.mark("dumped");
    hold("dumped").await;
    check(limit, d.deadline, "after the containers were dumped")?;

    if d.stop {
        // Complete the checkpoint first, then nothing of the pod may run again.
        let recorded = recorded.done().await?;
        report.bytes = finish(
            d,
            &dir,
            running,
            captured,
            recorded,
            report,
            freeze_start.elapsed(),
        )
        .await?;
        // The pod is gone after this: its checkpoint must be on disk first.
        let synced = dir.clone();
        tokio::task::spawn_blocking(move || sync_filesystem(&synced))
            .await
            .map_err(|e| Error::io("sync the checkpoint", &dir, std::io::Error::other(e)))??;
        // From here on a recovery keeps the checkpoint and kills the pod before its thaw.
        staging.commit(journal::Phase::Stopping)?;
        hold("committed").await;
        report.killed = frozen.kill_all();
        hold("killed").await;
        frozen.thaw_all();
        report.frozen = freeze_start.elapsed();
        hold("stopped").await;
        return Ok(Quiesced::Stopped);
    }
    frozen.thaw_all();
    report.frozen = freeze_start.elapsed();
    report.phases.mark("thawed");
    Ok(Quiesced::Thawed(captured))
}

/// Freezes the pod once every held CRIU waits, checks it, and dumps it. Returns when the
/// freeze began, the slowest container dump (from the moment the dumps were let go) and what
/// was captured.
async fn freeze_and_capture(
    d: &PodDump,
    dir: &Path,
    running: &[&Target],
    limit: &Limit,
    report: &mut DumpReport,
    frozen: &mut Frozen,
    dumps: &mut Dumps,
) -> Result<(Instant, Duration, Captured)> {
    dumps.wait_ready(limit, d.deadline).await?;
    report.phases.mark("criu waiting");
    // Each container is listed before its freeze is tried, so one whose freeze fails or times
    // out is thawed too.
    let to_freeze: Vec<&&Target> = running
        .iter()
        .filter(|t| t.entry.state == ContainerState::Running)
        .collect();
    for t in &to_freeze {
        let cg = t.cgroups.clone().ok_or_else(|| Error::InvalidCheckpoint {
            path: d.dest.clone(),
            reason: format!("container {}: its cgroups are unknown", t.entry.name),
        })?;
        frozen.list.push((t.entry.id.clone(), cg));
    }
    // Every container's freeze at once: the window opens with the first and the dumps start
    // once the last is frozen.
    let freeze_start = Instant::now();
    let freezes: Vec<_> = frozen
        .list
        .iter()
        .map(|(_, cg)| {
            let cg = cg.clone();
            tokio::task::spawn_blocking(move || cg.set_frozen(true))
        })
        .collect();
    let mut failed = None;
    for (t, freeze) in to_freeze.iter().zip(freezes) {
        let result = freeze
            .await
            .map_err(|e| Error::io("freeze a container", &t.bundle, std::io::Error::other(e)))
            .and_then(|r| {
                r.map_err(|e| Error::InvalidCheckpoint {
                    path: d.dest.clone(),
                    reason: format!("freeze container {}: {e}", t.entry.name),
                })
            });
        if let Err(e) = result {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    report.phases.mark("frozen");
    check(limit, d.deadline, "while freezing the pod")?;
    hold("frozen").await;
    check(limit, d.deadline, "while the pod was frozen")?;

    // What would not come back, and what the containers share, read once from the frozen
    // pod's processes.
    let procs: Vec<(String, Vec<i32>)> = running
        .iter()
        .map(|t| (t.entry.name.clone(), cgroup_procs(t)))
        .collect();
    let adopted = adopted_processes(d, running, &procs)?;
    let ipc = pod_ipc(running, &procs)?;
    let owners = crate::pod::shared::links::SocketOwners::read(&procs);
    let unix_links = checked_unix_links(d, &procs, &owners, &dumps.external_unix, &adopted).await?;
    report.phases.mark("checked");
    // Which containers loopback connections link, read beside the dumps (the pod stays frozen
    // until they are done; the kernel's TCP tables take milliseconds to list).
    let linked =
        tokio::task::spawn_blocking(move || crate::pod::shared::links::loopback_linked(&procs, &owners));
    // Capture while frozen. runc and CRIU are killed at the deadline or when the caller gives
    // up: their failure is then that.
    let (slowest, captured) = capture_all(d, dir, running, limit, ipc.as_ref(), dumps)
        .await
        .map_err(
            |e| match check(limit, d.deadline, "while the containers were dumped") {
                Err(stopped) => {
                    log::warn!("pod dump stopped: {e}");
                    stopped
                }
                Ok(()) => e,
            },
        )?;
    // Each process the pause process adopted, by a CRIU run of its own, once its container's
    // run is over (both seize every task of the container's cgroup): the pod stays frozen.
    let adopted = dump_adopted(d, dir, &adopted, limit).await?;
    report.dumped = running.iter().map(|t| t.entry.name.clone()).collect();
    let loopback_linked = linked
        .await
        .map_err(|e| Error::io("list loopback connections", "pod", std::io::Error::other(e)))?;
    let captured = Captured {
        loopback_linked: loopback_linked.into_iter().collect(),
        unix_links,
        adopted,
        prehash: dumps.prehash.take(),
        ..captured
    };
    Ok((freeze_start, slowest, captured))
}

/// Specs, digests of every file, and the manifest last. Returns the checkpoint's size.
async fn finish(
    d: &PodDump,
    dir: &Path,
    running: &[&Target],
    captured: Captured,
    recorded: Recorded,
    report: &DumpReport,
    frozen: Duration,
) -> Result<u64> {
    let checkpointed = time::OffsetDateTime::now_utc();
    for t in &d.targets {
        let cdir = dir.join(t.entry.dir());
        let spec = match &t.spec {
            Some(spec) => spec.clone(),
            None => {
                let src = t.bundle.join("config.json");
                std::fs::read(&src).map_err(|e| Error::io("read a container spec", &src, e))?
            }
        };
        write_private(
            &cdir.join(PART_NAMES.spec),
            &without_own_criu_config(spec, &t.bundle),
        )?;
        write_kep_metadata(&cdir, &t.entry, t.created, checkpointed)?;
    }
    check_linked_queues(dir, &captured.unix_links)?;
    // Every container's part is complete: a caller pushing the checkpoint may start on them
    // while the rest (digests, manifest, and with `stop` the sync and the kill) goes on.
    announce_parts(d, dir);
    hold("parts-ready").await;
    let threads = captured
        .prehash
        .as_ref()
        .map_or(0, crate::pod::dump::prehash::Prehash::threads);
    let prehashed = match captured.prehash {
        Some(p) => tokio::task::spawn_blocking(move || p.finish())
            .await
            .unwrap_or_default(),
        None => HashMap::new(),
    };
    let files = digest_tree(dir, &prehashed).await?;
    let early: Vec<&FileDigest> = prehashed
        .iter()
        .filter_map(|(p, h)| {
            let rel = p.strip_prefix(dir).ok()?.to_string_lossy().into_owned();
            files.get(&rel).filter(|f| **f == h.digest)
        })
        .collect();
    log::info!(
        "pod {}: {} of {} files ({} of {} bytes) digested as CRIU closed them, on {threads} threads",
        d.pod.sandbox_id,
        early.len(),
        files.len(),
        early.iter().map(|f| f.size).sum::<u64>(),
        files.values().map(|f| f.size).sum::<u64>()
    );
    let bytes = files.values().map(|f| f.size).sum();
    let mut containers: Vec<ContainerEntry> = d
        .targets
        .iter()
        .map(|t| {
            let mut e = t.entry.clone();
            e.dumped = running.iter().any(|r| r.entry.id == t.entry.id);
            if e.role == Role::Container && e.rootfs_layers.is_empty() {
                e.rootfs_layers = rootfs::lowerdirs_of(&t.bundle.join("rootfs")).unwrap_or_default();
            }
            e
        })
        .collect();
    containers.sort_by_key(|c| c.created_order);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        pod: PodInfo {
            ips: recorded.ips,
            ..d.pod.clone()
        },
        host: recorded.host,
        tcp_established: d.tcp_established,
        containers,
        volumes: captured.volumes,
        digest_algorithm: DigestAlgorithm::WRITTEN,
        dev_shm: captured.dev_shm,
        sysv_ipc: captured.sysv_ipc,
        loopback_linked: captured.loopback_linked,
        unix_links: captured.unix_links,
        adopted: captured.adopted,
        files,
        stats: DumpStats {
            frozen_us: frozen.as_micros() as u64,
            slowest_dump_us: report.slowest_dump.as_micros() as u64,
        },
    };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| Error::io("encode the manifest", dir, e.into()))?;
    write_synced(&dir.join(MANIFEST), &json)?;
    Ok(bytes)
}

/// A container's spec as the checkpoint keeps it: without the annotation pointing runc at the
/// container's own CRIU configuration file (the shim's, in a bundle a restore does not have).
fn without_own_criu_config(spec: Vec<u8>, bundle: &Path) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&spec) else {
        return spec;
    };
    let own = bundle.join(container::CRIU_CONFIG_FILE).display().to_string();
    let Some(annotations) = value
        .get_mut("annotations")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return spec;
    };
    if annotations
        .get(container::CRIU_CONFIG_ANNOTATION)
        .and_then(|v| v.as_str())
        != Some(own.as_str())
    {
        return spec;
    }
    annotations.remove(container::CRIU_CONFIG_ANNOTATION);
    serde_json::to_vec(&value).unwrap_or(spec)
}

/// The runc checkpoints of the running containers, one place per container: started before
/// the freeze and held at CRIU's start when the container has podsnap's CRIU configuration
/// file ([`crate::criu::hold`]), otherwise started once the pod is frozen.
struct Dumps {
    slots: Vec<DumpSlot>,
    /// What the containers' CRIU runs were told of unix connections between containers.
    external_unix: ToldEnds,
    /// Their page images hashed as CRIU closes them.
    prehash: Option<crate::pod::dump::prehash::Prehash>,
    /// The dump's crash journal, told of each held CRIU once it waits.
    journal: Option<Arc<Journal>>,
}

struct DumpSlot {
    hold: Option<Hold>,
    /// Ends with the moment runc ended.
    task: Option<tokio::task::JoinHandle<Result<Instant>>>,
}

impl Dumps {
    /// Starts the runc checkpoint of every container of `running` with a hold.
    fn start_held(dir: &Path, running: &[&Target], limit: &Limit, holds: Vec<Option<Hold>>) -> Dumps {
        let slots = running
            .iter()
            .zip(holds)
            .map(|(t, hold)| {
                let task = hold
                    .as_ref()
                    .map(|h| spawn_dump(dir, t, limit, Some(h.keep_open())));
                DumpSlot { hold, task }
            })
            .collect();
        Dumps {
            slots,
            external_unix: ToldEnds::default(),
            prehash: None,
            journal: None,
        }
    }

    /// Waits until every held CRIU is waiting. A runc that ends before is a failed dump (its
    /// CRIU cannot have dumped anything): its error.
    async fn wait_ready(&mut self, limit: &Limit, deadline: Duration) -> Result<()> {
        loop {
            for slot in &mut self.slots {
                if let Some(ended) = slot.task.take_if(|t| t.is_finished()) {
                    return Err(joined_dump(ended.await).err().unwrap_or_else(|| Error::Stopped {
                        reason: "CRIU ended before the pod was frozen".into(),
                    }));
                }
            }
            if self.slots.iter().all(|s| s.hold.as_ref().is_none_or(Hold::ready)) {
                // Each held CRIU runs now (a child of its runc): recorded, so that a recovery
                // finds it even if its runc dies first.
                if let Some(journal) = &self.journal {
                    journal.record_descendants();
                }
                return Ok(());
            }
            check(limit, deadline, "while runc and CRIU started")?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Lets every held CRIU go on.
    fn release(&mut self) {
        for hold in self.slots.iter_mut().filter_map(|s| s.hold.as_mut()) {
            hold.release();
        }
    }

    /// Starts the runc checkpoints not started yet.
    fn start_rest(&mut self, dir: &Path, running: &[&Target], limit: &Limit) {
        for (slot, t) in self.slots.iter_mut().zip(running) {
            if slot.task.is_none() {
                slot.task = Some(spawn_dump(dir, t, limit, None));
            }
        }
    }

    /// Waits for every runc; when each ended, or why it failed (in `running`'s order).
    async fn wait(&mut self) -> Vec<Result<Instant>> {
        let mut out = Vec::new();
        for slot in &mut self.slots {
            out.push(match slot.task.take() {
                Some(task) => joined_dump(task.await),
                None => Err(Error::Stopped {
                    reason: "a container's dump was never started".into(),
                }),
            });
            if let Some(hold) = slot.hold.take() {
                hold.remove();
            }
        }
        out
    }

    /// Makes the held CRIUs give up and waits for every runc started.
    async fn abort(&mut self) {
        for hold in self.slots.iter_mut().filter_map(|s| s.hold.as_mut()) {
            hold.abort();
        }
        for (i, ended) in self.wait().await.into_iter().enumerate() {
            if let Err(e) = ended {
                log::debug!("pod dump stopped: dump {i}: {e}");
            }
        }
    }
}

fn joined_dump(joined: std::result::Result<Result<Instant>, tokio::task::JoinError>) -> Result<Instant> {
    joined.map_err(|e| Error::io("dump task", "pod", std::io::Error::other(e)))?
}

/// CRIU's cgroups mode for the dump of `t`, chosen before its CRIU starts: `ignore` when its
/// runc offers it (1.2 and later), every process of the container sits in the container's own
/// cgroup (no cgroup below it in any hierarchy) and the container has no cgroup namespace of
/// its own. CRIU then skips walking and recording the container's cgroups while the pod is
/// frozen, and its restore leaves the processes where runc puts them: in the container's new
/// cgroup, which runc makes from the spec (as it does in every mode). Otherwise runc's default
/// (soft), which records and restores cgroups below the container's, and the container's cgroup
/// namespace: CRIU restores that only when it manages cgroups (with `ignore` a container with
/// its own, as CRI makes them on cgroup v2, came back in the host's). A runc that cannot say its
/// release gets the default.
async fn cgroups_mode(t: &Target) -> String {
    let features = match t.runc.features().await {
        Ok(f) => f,
        Err(e) => {
            log::warn!(
                "container {}: runc's features are unknown ({e}): CRIU's default cgroups mode",
                t.entry.id
            );
            return String::new();
        }
    };
    if !features.cgroups_mode_ignore() {
        return String::new();
    }
    let Some(cgroups) = &t.cgroups else {
        return String::new();
    };
    let namespace = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).ok();
    let own_namespace = match t.pid {
        Some(pid) => namespace(&pid.to_string()) != namespace("self"),
        None => true,
    };
    if own_namespace {
        log::info!(
            "container {}: it has a cgroup namespace of its own: CRIU records it (default cgroups mode)",
            t.entry.id
        );
        return String::new();
    }
    let nested = cgroups
        .dirs()
        .into_iter()
        .find(|d| podsnap_runtime::cgroup::tree(d).len() > 1);
    match nested {
        Some(dir) => {
            log::info!(
                "container {}: {} holds cgroups of its own: CRIU records them (default cgroups mode)",
                t.entry.id,
                dir.display()
            );
            String::new()
        }
        None => "ignore".to_owned(),
    }
}

/// Starts `runc checkpoint` of `t` into its place under `dir`; `hold` is kept open until runc
/// ends (its CRIU waits on it).
fn spawn_dump(
    dir: &Path,
    t: &Target,
    limit: &Limit,
    hold: Option<std::sync::Arc<std::fs::File>>,
) -> tokio::task::JoinHandle<Result<Instant>> {
    let t = t.clone();
    let image_dir = dir.join(t.entry.dir()).join(PART_NAMES.images);
    let limit = limit.clone();
    tokio::spawn(async move {
        let began = Instant::now();
        let cgroups_mode = cgroups_mode(&t).await;
        let dump = Dump {
            id: t.entry.id.clone(),
            image_dir,
            work_dir: None,
            options: DumpOptions {
                tcp_established: true,
                file_locks: true,
                cgroups_mode,
                ..Default::default()
            },
            leave_running: true,
            cgroups: None,
            was_paused: true,
            limit,
        };
        let result = container::dump(&t.runc, &dump).await;
        drop(hold);
        log::info!(
            "container {} ({}): runc checkpoint took {} ms{}",
            t.entry.name,
            t.entry.id,
            began.elapsed().as_millis(),
            if result.is_ok() { "" } else { ", failed" }
        );
        result.map_err(|e| match e {
            Error::Dump { source, log_tail, .. } => Error::Dump {
                id: format!("{} ({})", t.entry.name, t.entry.id),
                source,
                log_tail,
            },
            other => other,
        })?;
        Ok(Instant::now())
    })
}

/// The containers a dump froze: thawed on drop whatever happened (error, panic, a dropped
/// future), or explicitly by [`Frozen::thaw_all`].
#[derive(Default)]
struct Frozen {
    list: Vec<(String, CgroupPaths)>,
}

impl Frozen {
    /// SIGKILLs every process of every frozen container (they die at the thaw, before running
    /// anything). Returns how many were signalled.
    fn kill_all(&self) -> usize {
        let mut n = 0;
        for (id, cg) in &self.list {
            match cg.kill_all() {
                Ok(k) => n += k,
                Err(e) => log::error!("container {id}: kill at the snapshot failed: {e}"),
            }
        }
        n
    }

    fn thaw_all(&mut self) {
        for (id, cg) in self.list.drain(..) {
            if let Err(e) = cg.set_frozen(false) {
                log::error!("container {id}: thaw after the dump failed: {e}");
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.list.is_empty() {
            log::warn!(
                "pod dump stopped half-way: thawing {} containers",
                self.list.len()
            );
            self.thaw_all();
        }
    }
}

/// Dumps every running container and archives volumes, in parallel, the pod frozen: the held
/// CRIU dumps are let go, the others started.
async fn capture_all(
    d: &PodDump,
    dir: &Path,
    running: &[&Target],
    limit: &Limit,
    ipc: Option<&PodIpc>,
    dumps: &mut Dumps,
) -> Result<(Duration, Captured)> {
    let released = Instant::now();
    dumps.release();
    dumps.start_rest(dir, running, limit);
    let mut tasks = tokio::task::JoinSet::new();
    for t in running {
        // The rootfs changes are archived beside the CRIU dump (both while frozen).
        let cdir = dir.join(t.entry.dir());
        let rootfs_dir = t.bundle.join("rootfs");
        let bundle = t.bundle.clone();
        let name = t.entry.name.clone();
        tasks.spawn(async move {
            let tar = cdir.join(ROOTFS_DIFF);
            let del = cdir.join(ROOTFS_DELETED);
            tokio::task::spawn_blocking(move || match rootfs::upperdir_for_dump(&name, &rootfs_dir)? {
                Some(upper) => rootfs::capture(&upper, &tar, &del).map(drop),
                None => {
                    log::info!(
                        "container {name}: its rootfs {} is a read-only overlay: no changes to capture",
                        rootfs_dir.display()
                    );
                    Ok(())
                }
            })
            .await
            .map_err(|e| Error::io("capture rootfs changes", &bundle, std::io::Error::other(e)))??;
            Ok::<Duration, Error>(Duration::ZERO)
        });
    }
    let volumes = empty_dirs(&d.targets);
    if !volumes.is_empty() {
        create_private_dir(&dir.join("volumes"))?;
    }
    // The pod's /dev/shm, once for the pod (every container of it shares it).
    let dev_shm = pod_dev_shm(&d.targets);
    if let Some(src) = dev_shm.clone() {
        create_private_dir(&dir.join("pod"))?;
        let tar = dir.join(DEV_SHM_ARCHIVE);
        tasks.spawn(async move {
            tokio::task::spawn_blocking(move || rootfs::archive_dir(&src, &tar))
                .await
                .map_err(|e| Error::io("archive /dev/shm", "pod", std::io::Error::other(e)))??;
            Ok(Duration::ZERO)
        });
    }
    for (name, (src, _)) in &volumes {
        let src = src.clone();
        let tar = dir.join("volumes").join(format!("{name}.tar"));
        tasks.spawn(async move {
            tokio::task::spawn_blocking(move || rootfs::archive_dir(&src, &tar))
                .await
                .map_err(|e| Error::io("archive a volume", "volumes", std::io::Error::other(e)))??;
            Ok(Duration::ZERO)
        });
    }
    // The SysV objects of the pod's IPC namespace, once for the pod.
    let sysv = match ipc {
        Some(ipc) => {
            create_private_dir(&dir.join("pod"))?;
            let (root, ns, attached) = (dir.to_path_buf(), ipc.ns.clone(), ipc.attached.clone());
            Some(tokio::task::spawn_blocking(move || {
                crate::pod::shared::sysv::capture(&ns, &root, &attached)
            }))
        }
        None => None,
    };
    let mut slowest = Duration::ZERO;
    let mut first_error = None;
    for (t, ended) in running.iter().zip(dumps.wait().await) {
        match ended {
            Ok(at) => {
                slowest = slowest.max(at.saturating_duration_since(released));
                // Its CRIU images recreate only the SysV segments its own processes attach.
                if let Some(keep) = ipc.and_then(|i| i.members.get(&t.entry.id)).cloned() {
                    let images = dir.join(t.entry.dir()).join(PART_NAMES.images);
                    let trimmed = tokio::task::spawn_blocking(move || {
                        crate::pod::shared::sysv::trim_criu_images(&images, &keep)
                    })
                    .await
                    .map_err(|e| Error::io("trim IPC images", &t.bundle, std::io::Error::other(e)))
                    .and_then(|r| r);
                    if let Err(e) = trimmed {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(took)) => slowest = slowest.max(took),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::io("dump task", dir, std::io::Error::other(e)));
            }
        }
    }
    let sysv_ipc = match sysv {
        Some(task) => match task.await {
            Ok(Ok(Some(state))) => Some(state),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
                None
            }
            Err(e) => {
                first_error.get_or_insert(Error::io("SysV IPC capture", dir, std::io::Error::other(e)));
                None
            }
        },
        None => None,
    };
    if let Some(e) = first_error {
        return Err(e);
    }
    if let Some(state) = &sysv_ipc {
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::io("encode the SysV IPC state", dir, e.into()))?;
        write_private(&dir.join(crate::format::layout::SYSV_STATE), &json)?;
    }
    let entries = volumes
        .into_iter()
        .map(|(name, (_, mounts))| VolumeEntry {
            archive: format!("volumes/{name}.tar"),
            name,
            mounts,
        })
        .collect();
    Ok((
        slowest,
        Captured {
            volumes: entries,
            dev_shm: dev_shm.map(|_| DEV_SHM_ARCHIVE.to_owned()),
            sysv_ipc: sysv_ipc.map(|_| crate::format::layout::SYSV_STATE.to_owned()),
            loopback_linked: Vec::new(),
            unix_links: Vec::new(),
            adopted: Vec::new(),
            prehash: None,
        },
    ))
}

/// What the pod's containers share, captured once for the pod.
struct Captured {
    volumes: Vec<VolumeEntry>,
    /// The `/dev/shm` archive, relative to the checkpoint.
    dev_shm: Option<String>,
    /// The SysV IPC state, relative to the checkpoint.
    sysv_ipc: Option<String>,
    /// Containers linked by TCP over loopback.
    loopback_linked: Vec<String>,
    /// Unix connections between containers.
    unix_links: Vec<crate::format::manifest::UnixLink>,
    /// Processes the pause process adopted, dumped.
    adopted: Vec<AdoptedProcess>,
    /// The page images hashed as CRIU closed them.
    prehash: Option<crate::pod::dump::prehash::Prehash>,
}

/// The ends of the unix connections between containers of the running pod, by container: what
/// each container's CRIU is told are external sockets.
async fn planned_unix_ends(d: &PodDump, running: &[&Target]) -> Result<HashMap<String, BTreeSet<u64>>> {
    let procs: Vec<(String, Vec<i32>)> = running
        .iter()
        .map(|t| (t.entry.name.clone(), cgroup_procs(t)))
        .collect();
    let owners = crate::pod::shared::links::SocketOwners::read(&procs);
    let found = crate::pod::shared::links::unix_connections(
        d.launcher.as_ref(),
        d.netns.as_deref(),
        &procs,
        &owners,
        false,
    )
    .await?;
    let mut ends: HashMap<String, BTreeSet<u64>> = HashMap::new();
    for c in found
        .iter()
        .filter(|c| c.between_containers() && c.link().is_some())
    {
        for (name, ino, _) in &c.ends {
            ends.entry(name.clone()).or_default().insert(*ino);
        }
    }
    Ok(ends)
}

/// The unix connections between containers of the frozen pod, as the manifest records them.
/// Refused, naming the containers or processes: a connected datagram socket (its peer is a
/// bound socket of the other container, not a pair); a connection whose ends' CRIU runs were
/// not told of it (opened after they started: a dump again finds it from the start; or a
/// container whose CRIU configuration is not podsnap's); a connection held by a process the
/// pause process adopted, to anything outside its own tree (its CRIU run is its own); more
/// ends in one container than a restore hands runc.
async fn checked_unix_links(
    d: &PodDump,
    procs: &[(String, Vec<i32>)],
    owners: &crate::pod::shared::links::SocketOwners,
    told: &ToldEnds,
    adopted: &[Adopted<'_>],
) -> Result<Vec<crate::format::manifest::UnixLink>> {
    let found = crate::pod::shared::links::unix_connections(
        d.launcher.as_ref(),
        d.netns.as_deref(),
        procs,
        owners,
        !adopted.is_empty(),
    )
    .await?;
    let refuse = |reason: String| Error::InvalidCheckpoint {
        path: "pod".into(),
        reason: format!("{reason}; the pod was left running"),
    };
    let tree_of = |pid: i32| adopted.iter().find(|a| a.members.contains(&pid)).map(|a| a.root);
    let mut links = Vec::new();
    let mut per_container: HashMap<&str, usize> = HashMap::new();
    for c in &found {
        let [(_, _, pa), (_, _, pb)] = &c.ends;
        let (ta, tb) = (tree_of(*pa), tree_of(*pb));
        if ta.is_some() || tb.is_some() {
            if ta != tb || c.between_containers() {
                return Err(refuse(format!(
                    "a unix socket connection links {} and one of them was adopted by the pod's \
                     pause process: such a process is dumped by a CRIU run of its own, which \
                     cannot take a connection to a process outside its tree",
                    c.shown()
                )));
            }
            continue;
        }
        if !c.between_containers() {
            continue;
        }
        let Some(link) = c.link() else {
            return Err(refuse(format!(
                "a connected unix datagram socket links containers {}: podsnap brings back \
                 stream and seqpacket connections between containers only",
                c.shown()
            )));
        };
        if let Some((name, _, _)) = c.ends.iter().find(|(name, _, _)| !told.configured.contains(name)) {
            return Err(refuse(format!(
                "a unix socket connection links containers {}, and container {name:?} names a \
                 CRIU configuration file of its own (org.criu.config), so its CRIU cannot be \
                 told that its end is external",
                c.shown()
            )));
        }
        if c.ends
            .iter()
            .any(|(name, ino, _)| !told.ends.contains(&(name.clone(), *ino)))
        {
            return Err(refuse(format!(
                "a unix socket connection between containers {} was opened while the dump \
                 began (after their CRIU runs were told of the pod's connections): dump again",
                c.shown()
            )));
        }
        for (name, _, _) in &c.ends {
            let n = per_container.entry(name.as_str()).or_default();
            *n += 1;
            if *n > podsnap_runtime::runc::MAX_INHERITED_FDS {
                return Err(refuse(format!(
                    "container {name:?} holds more than {} unix socket connections to other \
                     containers, the most a restore hands runc",
                    podsnap_runtime::runc::MAX_INHERITED_FDS
                )));
            }
        }
        links.push(link);
    }
    Ok(links)
}

/// Checks that CRIU dumped each end of `links` and that what sat in its queue can be handed
/// back (bytes, no descriptors): a checkpoint a restore would refuse is not written.
fn check_linked_queues(dir: &Path, links: &[crate::format::manifest::UnixLink]) -> Result<()> {
    for end in links.iter().flat_map(|l| &l.ends) {
        let images = dir.join(end.images(PART_NAMES));
        let socket =
            crate::criu::image::unix_socket(&images, end.ino)?.ok_or_else(|| Error::InvalidCheckpoint {
                path: images.clone(),
                reason: format!(
                    "CRIU's images of container {:?} hold no unix socket {}",
                    end.container, end.ino
                ),
            })?;
        crate::criu::image::queued_packets(&images, socket.id)?;
    }
    Ok(())
}

/// The host directory of a container's `/dev/shm`, when it is the pod's own (a bind mount, in
/// a container with an IPC namespace of the pod's; a pod on the host's IPC namespace shares the
/// host's `/dev/shm`, which is never captured).
pub fn dev_shm_source(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    let own_ipc = spec
        .linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Ipc);
    if !own_ipc {
        return None;
    }
    let m = spec
        .mounts()
        .iter()
        .flatten()
        .find(|m| m.destination() == Path::new("/dev/shm"))?;
    let bind = m.typ().as_deref() == Some("bind")
        || m.options().iter().flatten().any(|o| o == "bind" || o == "rbind");
    let src = m.source().clone()?;
    (bind && src != Path::new("/dev/shm")).then_some(src)
}

/// The pod's `/dev/shm` directory, from its containers' specs.
fn pod_dev_shm(targets: &[Target]) -> Option<PathBuf> {
    targets
        .iter()
        .filter(|t| t.entry.role == Role::Container)
        .filter_map(|t| podsnap_runtime::bundle::Bundle::new(&t.bundle).spec().ok())
        .find_map(|spec| dev_shm_source(&spec))
}

/// The IPC namespace a container joins by path (the pod's: the pause process's), when it has
/// one of its own (`None`: the host's, or a private one CRIU captures with the container).
pub fn joined_ipc_ns(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Ipc)?
        .path()
        .clone()
}

/// A process of a container that the pod's pause process adopted, with its descendants.
struct Adopted<'a> {
    target: &'a Target,
    /// Its host pid: the root of what is dumped.
    root: i32,
    /// It and its descendants (host pids).
    members: Vec<i32>,
}

/// The processes of `running`'s containers (`procs`) outside their container's process tree
/// that the pod's pause process adopted (in a pod sharing one PID namespace), or that this
/// shim restored as such (their parent is now the shim; see `Target::adopted`), grouped by the
/// root each is dumped from. Any other process outside its container's tree (one started by
/// exec) would be lost: refused, naming them.
fn adopted_processes<'a>(
    d: &PodDump,
    running: &[&'a Target],
    procs: &[(String, Vec<i32>)],
) -> Result<Vec<Adopted<'a>>> {
    let pause = d
        .targets
        .iter()
        .find(|t| t.entry.role == Role::Sandbox)
        .and_then(|t| t.pid);
    let mut adopted: Vec<Adopted<'a>> = Vec::new();
    let mut lost = Vec::new();
    for (t, (_, pids)) in running.iter().zip(procs) {
        let Some(init) = t.pid else { continue };
        for &pid in pids {
            let Some((top, parent)) = outside_tree(pid, init) else {
                continue;
            };
            let restored_as_adopted = || {
                t.adopted
                    .iter()
                    .any(|(p, start)| *p == top && crate::fs::proc::start_time(top as u32) == Some(*start))
            };
            if Some(parent) == pause || restored_as_adopted() {
                match adopted.iter_mut().find(|a| a.root == top) {
                    Some(a) => a.members.push(pid),
                    None => adopted.push(Adopted {
                        target: t,
                        root: top,
                        members: vec![pid],
                    }),
                }
            } else {
                lost.push(format!(
                    "pid {pid} ({}) of container {:?}, a child of pid {parent} ({})",
                    comm(pid),
                    t.entry.name,
                    comm(parent)
                ));
            }
        }
    }
    if lost.is_empty() {
        return Ok(adopted);
    }
    Err(Error::InvalidCheckpoint {
        path: PathBuf::from("pod"),
        reason: format!(
            "these processes are outside their container's process tree and would be lost \
             (each container is dumped from its init process, and a process the pod's pause \
             process adopted on its own; a process started by exec is neither): {}; the pod \
             was left running",
            lost.join("; ")
        ),
    })
}

/// Dumps each process of `adopted` (container, root pid) with its descendants into
/// `containers/<name>/adopted/<pid>/`, one at a time, while the pod is frozen. runc dumps only
/// a container's init, so each goes through a runc state of its own for the length of its
/// dump: its container's, naming the adopted process as init (runc then tells CRIU the
/// container's mounts, namespaces and cgroup, all of which the process shares). It was started
/// in a session whose leader is gone, which CRIU dumps only as a shell job; its images are
/// then made to lead a session of their own (see [`crate::criu::image::make_session_leader`]).
async fn dump_adopted(
    d: &PodDump,
    dir: &Path,
    adopted: &[Adopted<'_>],
    limit: &Limit,
) -> Result<Vec<AdoptedProcess>> {
    let mut out = Vec::new();
    for Adopted {
        target: t, root: pid, ..
    } in adopted
    {
        let record = AdoptedProcess {
            container: t.entry.name.clone(),
            pid: pid_in_namespace(*pid)?,
        };
        let images = dir.join(record.images(PART_NAMES));
        let fake = format!("{}-adopted-{}", t.entry.id, record.pid);
        let state = adopted_state(t, &fake, *pid, d.netns.is_some() && d.lock_network)?;
        let began = Instant::now();
        let dumped = container::dump(
            &t.runc,
            &Dump {
                id: fake,
                image_dir: images.clone(),
                work_dir: None,
                options: DumpOptions {
                    tcp_established: true,
                    file_locks: true,
                    shell_job: true,
                    ..Default::default()
                },
                leave_running: true,
                cgroups: None,
                was_paused: true,
                limit: limit.clone(),
            },
        )
        .await;
        drop(state);
        dumped.map_err(|e| match e {
            Error::Dump { source, log_tail, .. } => Error::Dump {
                id: format!(
                    "pid {pid} adopted by the pod's pause process, of container {:?}",
                    t.entry.name
                ),
                source,
                log_tail,
            },
            other => other,
        })?;
        crate::criu::image::make_session_leader(&images)?;
        log::info!(
            "container {}: pid {pid} (pid {} in the pod), adopted by the pause process, dumped in {} ms",
            t.entry.name,
            record.pid,
            began.elapsed().as_millis()
        );
        out.push(record);
    }
    Ok(out)
}

/// Writes the runc state of an adopted process's dump (see [`dump_adopted`]) and its CRIU
/// configuration file; both are removed when the answer is dropped. Never `runc delete`d: that
/// would kill the container's cgroup.
fn adopted_state(t: &Target, id: &str, pid: i32, pod_locked: bool) -> Result<RemoveOnDrop> {
    let source = t.runc.root().join(&t.entry.id).join("state.json");
    let bytes = crate::fs::read::read_capped(&source, MAX_JSON_BYTES)
        .map_err(|e| Error::io("read the container's runc state", &source, e))?;
    let mut state: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::io("read the container's runc state", &source, e.into()))?;
    let conf = t.bundle.join(format!("criu-adopted-{pid}.conf"));
    let dir = t.runc.root().join(id);
    let this = RemoveOnDrop(vec![dir.clone(), conf.clone()]);
    write_private(
        &conf,
        if pod_locked { "network-lock skip\n" } else { "" }.as_bytes(),
    )?;
    state["id"] = id.into();
    state["init_process_pid"] = pid.into();
    // As runc records its init's: `/proc/<pid>/stat`'s start time.
    let start = crate::fs::proc::start_time(pid as u32).ok_or_else(|| {
        Error::io(
            "read a process's start",
            format!("/proc/{pid}/stat"),
            std::io::Error::other("gone"),
        )
    })?;
    state["init_process_start"] = start.into();
    if let Some(labels) = state.pointer_mut("/config/labels").and_then(|l| l.as_array_mut()) {
        labels.retain(|l| !l.as_str().is_some_and(|l| l.starts_with("org.criu.config=")));
        labels.push(format!("org.criu.config={}", conf.display()).into());
    }
    create_private_dir(&dir)?;
    let json = serde_json::to_vec(&state).map_err(|e| Error::io("write a runc state", &dir, e.into()))?;
    write_private(&dir.join("state.json"), &json)?;
    Ok(this)
}

/// `pid` as its own PID namespace numbers it (the last of `NSpid` in its status).
fn pid_in_namespace(pid: i32) -> Result<u32> {
    let file = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&file).map_err(|e| Error::io("read a process's status", &file, e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|ids| ids.split_whitespace().last()?.parse().ok())
        .ok_or_else(|| {
            Error::io(
                "read a process's status",
                &file,
                std::io::Error::other("no NSpid"),
            )
        })
}

/// The processes of a container's cgroup (none when it is unknown).
fn cgroup_procs(t: &Target) -> Vec<i32> {
    t.cgroups
        .as_ref()
        .and_then(|c| c.processes().ok())
        .unwrap_or_default()
}

/// `None` if `pid` is `init` or descends from it; otherwise the topmost ancestor that does not
/// (in the container's cgroup) and its parent (the process that adopted or started it).
fn outside_tree(pid: i32, init: i32) -> Option<(i32, i32)> {
    let mut cursor = pid;
    for _ in 0..4096 {
        if cursor == init {
            return None;
        }
        let parent = parent_of(cursor)?; // gone meanwhile: nothing to lose
        if parent <= 1 {
            return Some((cursor, parent));
        }
        if parent == init {
            return None;
        }
        // Leaving the container's cgroup: the process that adopted or started this branch.
        if !same_cgroup(parent, pid) {
            return Some((cursor, parent));
        }
        cursor = parent;
    }
    None
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name's closing parenthesis: state, ppid, ...
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn same_cgroup(a: i32, b: i32) -> bool {
    let read = |p: i32| std::fs::read_to_string(format!("/proc/{p}/cgroup")).ok();
    matches!((read(a), read(b)), (Some(x), Some(y)) if x == y)
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// The pod's IPC namespace and which SysV segments its containers' processes attach.
struct PodIpc {
    ns: PathBuf,
    /// Segment id -> the container (name) whose processes attach it.
    attached: BTreeMap<i32, String>,
    /// Container id -> the segments its processes attach, for each container of the namespace.
    members: BTreeMap<String, BTreeSet<i32>>,
}

/// Reads, while the pod is frozen, which SysV segments each container of the pod's IPC
/// namespace attaches. A segment attached in two containers cannot come back (each container's
/// CRIU run would create it), so such a dump is refused, naming both.
fn pod_ipc(running: &[&Target], procs: &[(String, Vec<i32>)]) -> Result<Option<PodIpc>> {
    let mut ipc: Option<PodIpc> = None;
    for (t, (_, pids)) in running.iter().zip(procs) {
        let Some(ns) = podsnap_runtime::bundle::Bundle::new(&t.bundle)
            .spec()
            .ok()
            .and_then(|spec| joined_ipc_ns(&spec))
        else {
            continue;
        };
        let pod = ipc.get_or_insert_with(|| PodIpc {
            ns: ns.clone(),
            attached: BTreeMap::new(),
            members: BTreeMap::new(),
        });
        if pod.ns != ns {
            continue; // not the pod's (never made by kubelet)
        }
        let segments = crate::pod::shared::sysv::attached_segments(pids.iter().copied());
        for id in &segments {
            if let Some(other) = pod.attached.insert(*id, t.entry.name.clone()) {
                return Err(Error::InvalidCheckpoint {
                    path: t.bundle.clone(),
                    reason: format!(
                        "SysV shared memory segment {id} is attached by processes of containers \
                         {other:?} and {:?}; podsnap restores each container with its own CRIU \
                         run and cannot attach one segment in two of them",
                        t.entry.name
                    ),
                });
            }
        }
        pod.members.insert(t.entry.id.clone(), segments);
    }
    Ok(ipc)
}

/// The pod's emptyDir volumes: name -> (host directory, mounts), from the containers' specs.
pub fn empty_dirs(targets: &[Target]) -> BTreeMap<String, (PathBuf, Vec<VolumeMount>)> {
    let mut out: BTreeMap<String, (PathBuf, Vec<VolumeMount>)> = BTreeMap::new();
    for t in targets.iter().filter(|t| t.entry.role == Role::Container) {
        let Ok(spec) = podsnap_runtime::bundle::Bundle::new(&t.bundle).spec() else {
            continue;
        };
        for m in spec.mounts().iter().flatten() {
            let Some(src) = m.source().as_ref().and_then(|s| s.to_str()) else {
                continue;
            };
            let Some(name) = empty_dir_name(src) else { continue };
            let entry = out
                .entry(name.to_string())
                .or_insert_with(|| (PathBuf::from(src), Vec::new()));
            entry.1.push(VolumeMount {
                container: t.entry.name.clone(),
                path: m.destination().display().to_string(),
            });
        }
    }
    out
}

/// Size and digest of every regular file under `dir` (but the manifest), in parallel. Every
/// directory under `dir` is made 0700 and every file 0600 on the way: they are this dump's
/// output, and CRIU writes its images 0644.
async fn digest_tree(
    dir: &Path,
    prehashed: &HashMap<PathBuf, crate::pod::dump::prehash::Prehashed>,
) -> Result<BTreeMap<String, FileDigest>> {
    let mut paths = Vec::new();
    let mut early = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .map_err(|e| Error::io("list the checkpoint", &d, e))?
            .flatten()
        {
            let p = e.path();
            let ft = e
                .file_type()
                .map_err(|err| Error::io("stat a checkpoint file", &p, err))?;
            if ft.is_dir() {
                make_private(&p, 0o700)?;
                stack.push(p);
            } else if ft.is_file() && p != dir.join(MANIFEST) {
                make_private(&p, 0o600)?;
                match prehashed.get(&p).filter(|h| h.holds_for(&p)) {
                    Some(h) => {
                        let rel = p.strip_prefix(dir).unwrap_or(&p).to_string_lossy().into_owned();
                        early.push((rel, h.digest.clone()));
                    }
                    None => paths.push(p),
                }
            }
        }
    }
    // Largest first, over as many workers as there are cores.
    paths.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let paths = std::sync::Arc::new(paths);
    let next = std::sync::Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (paths, next, root) = (paths.clone(), next.clone(), dir.to_path_buf());
        tasks.spawn_blocking(move || {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(p) = paths.get(i) else { break };
                let size = std::fs::metadata(p)
                    .map_err(|e| Error::io("stat a checkpoint file", p, e))?
                    .len();
                let digest = DigestAlgorithm::WRITTEN
                    .file(p)
                    .map_err(|e| Error::io("digest a checkpoint file", p, e))?;
                let rel = p.strip_prefix(&root).unwrap_or(p).to_string_lossy().into_owned();
                out.push((rel, FileDigest { size, digest }));
            }
            Ok::<_, Error>(out)
        });
    }
    let mut files: BTreeMap<String, FileDigest> = early.into_iter().collect();
    while let Some(r) = tasks.join_next().await {
        let part = r.map_err(|e| Error::io("digest task", dir, std::io::Error::other(e)))??;
        files.extend(part);
    }
    Ok(files)
}

/// The directory a dump writes into until it is complete; removed when dropped uncommitted.
/// The dump's journal lists it, and says when it is committed.
struct Staging {
    dest: PathBuf,
    dir: PathBuf,
    /// The destination existed (empty) and is written in place.
    in_place: bool,
    committed: bool,
    journal: Arc<Journal>,
}

impl Staging {
    /// The staging directory of a dump into `dest`, recorded in `journal`.
    fn new(dest: &Path, journal: Arc<Journal>) -> Result<Self> {
        let staging = Self::make(dest, journal)?;
        staging.journal.update(|e| {
            e.staging = staging.dir.clone();
            e.in_place = staging.in_place;
        })?;
        Ok(staging)
    }

    fn make(dest: &Path, journal: Arc<Journal>) -> Result<Self> {
        let exists_empty = match std::fs::read_dir(dest) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(Error::InvalidCheckpoint {
                        path: dest.to_path_buf(),
                        reason: "the destination exists and is not empty".into(),
                    });
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io("inspect the destination", dest, e)),
        };
        if exists_empty {
            return Ok(Self {
                dest: dest.to_path_buf(),
                dir: dest.to_path_buf(),
                in_place: true,
                committed: false,
                journal,
            });
        }
        let parent = dest.parent().unwrap_or(Path::new("."));
        create_private_dir(parent)?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove a stale staging dir", &dir, e))?;
        }
        create_private_dir(&dir)?;
        Ok(Self {
            dest: dest.to_path_buf(),
            dir,
            in_place: false,
            committed: false,
            journal,
        })
    }

    /// Moves the complete checkpoint into place (once; later calls do nothing), the journal
    /// saying `phase` (what a recovery must then finish: never undo) before the move, and
    /// dumping again if the move fails (the output is then removed as uncommitted).
    fn commit(&mut self, phase: journal::Phase) -> Result<()> {
        if self.committed {
            return Ok(());
        }
        self.journal.update(|e| e.phase = phase)?;
        let moved = match self.in_place {
            true => Ok(()),
            false => std::fs::rename(&self.dir, &self.dest)
                .map_err(|e| Error::io("move the checkpoint into place", &self.dest, e)),
        }
        .and_then(|()| sync_dir(self.dest.parent().unwrap_or(Path::new("."))));
        if let Err(e) = moved {
            if let Err(j) = self.journal.update(|e| e.phase = journal::Phase::Dumping) {
                log::warn!("{j}");
            }
            return Err(e);
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let res = if self.in_place {
            crate::fs::remove::remove_contents(&self.dir)
        } else {
            std::fs::remove_dir_all(&self.dir)
        };
        if let Err(e) = res {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("remove partial checkpoint {}: {e}", self.dir.display());
            }
        }
    }
}

/// Writes a [`PartReady`] for every container into `<dest>.parts` when the caller made that
/// directory (a real one, not a symlink). Best effort: a caller that finds no announcement
/// compresses the part after the dump, as without one.
fn announce_parts(d: &PodDump, dir: &Path) {
    let parts = parts_dir(&d.dest);
    if !std::fs::symlink_metadata(&parts).is_ok_and(|m| m.is_dir()) {
        return;
    }
    for t in &d.targets {
        let part = t.entry.dir().to_string_lossy().into_owned();
        let mut files = Vec::new();
        if let Err(e) = list_files(dir, &dir.join(&part), &mut files) {
            log::warn!("{}: not announced: {e}", part);
            continue;
        }
        files.sort();
        let ready = PartReady {
            root: dir.to_path_buf(),
            part,
            files,
        };
        let path = parts.join(format!("{}.json", t.entry.name));
        let tmp = parts.join(format!(".{}.json.tmp", t.entry.name));
        let written = serde_json::to_vec(&ready)
            .map_err(std::io::Error::other)
            .and_then(|json| write_private(&tmp, &json).map_err(std::io::Error::other))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            log::warn!("{}: not announced: {e}", path.display());
        }
    }
}

/// Every regular file under `dir`, relative to `root`.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            list_files(root, &entry.path(), out)?;
        } else if kind.is_file() {
            let rel = entry.path();
            let rel = rel.strip_prefix(root).map_err(std::io::Error::other)?;
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// The runtime a KEP-2008 `config.dump` names.
const RUNTIME_TYPE: &str = "io.containerd.podsnap.v1";

/// A KEP-2008 `config.dump` (what CRI's CheckpointContainer writes beside the images: id,
/// name, image, runtime, creation and checkpoint times) and, when the container removed image
/// files, `deleted.files`: with `checkpoint/`, `spec.dump` and `rootfs-diff.tar` a tar of the
/// container's directory is such an archive.
fn write_kep_metadata(
    cdir: &Path,
    entry: &ContainerEntry,
    created: Option<std::time::SystemTime>,
    at: time::OffsetDateTime,
) -> Result<()> {
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| Error::io("format a time", cdir, std::io::Error::other(e)))
    };
    let mut config = serde_json::json!({
        "id": entry.id,
        "name": entry.name,
        "rootfsImageName": entry.image.as_deref().unwrap_or_default(),
        "runtime": RUNTIME_TYPE,
        "checkpointedTime": rfc3339(at)?,
        "restored": false,
    });
    if let Some(created) = created {
        config["createdTime"] = serde_json::json!(rfc3339(time::OffsetDateTime::from(created))?);
    }
    let encode = |v: &serde_json::Value| {
        serde_json::to_vec_pretty(v).map_err(|e| Error::io("encode", cdir, std::io::Error::other(e)))
    };
    write_private(&cdir.join(CONFIG_DUMP), &encode(&config)?)?;
    let deletions = cdir.join(ROOTFS_DELETED);
    if deletions.exists() {
        let deleted = crate::format::deletions::Deletions::read(&deletions)?.deleted;
        if !deleted.is_empty() {
            let list = deleted.into_iter().map(|p| format!("/{p}")).collect::<Vec<_>>();
            write_private(&cdir.join(DELETED_FILES), &encode(&serde_json::json!(list))?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_dir_names_come_from_kubelet_paths() {
        assert_eq!(
            empty_dir_name("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/data"),
            Some("data")
        );
        assert_eq!(
            empty_dir_name("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~secret/x"),
            None
        );
        assert_eq!(
            empty_dir_name("/x/volumes/kubernetes.io~empty-dir/../../etc"),
            None
        );
    }

    #[tokio::test]
    async fn every_file_of_a_dump_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        let criu = t.path().join("containers/app/criu");
        std::fs::create_dir_all(&criu).expect("mkdir");
        std::fs::set_permissions(&criu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(criu.join("core-1.img"), b"x").expect("write");
        std::fs::set_permissions(criu.join("core-1.img"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let files = digest_tree(t.path(), &HashMap::new()).await.expect("digests");
        assert_eq!(files.len(), 1);
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&criu.join("core-1.img")), 0o600);
        assert_eq!(mode(&criu), 0o700);
    }

    #[test]
    fn staging_refuses_a_non_empty_destination_and_cleans_up() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("f"), b"x").expect("write");
        let journal = Arc::new(Journal::none());
        assert!(Staging::new(t.path(), journal.clone()).is_err());
        let dest = t.path().join("new");
        let s = Staging::new(&dest, journal.clone()).expect("staging");
        let staged = s.dir.clone();
        std::fs::write(staged.join("partial"), b"x").expect("write");
        drop(s);
        assert!(
            !staged.exists() && !dest.exists(),
            "uncommitted output is removed"
        );
        let mut s = Staging::new(&dest, journal.clone()).expect("staging");
        write_synced(&s.dir.join(MANIFEST), b"{}").expect("manifest");
        s.commit(journal::Phase::Committed).expect("commit");
        drop(s);
        assert!(dest.join(MANIFEST).exists(), "committed output stays");
        std::fs::remove_dir_all(&dest).expect("rm");
        std::fs::create_dir(&dest).expect("an empty destination");
        let s = Staging::new(&dest, journal.clone()).expect("in place");
        std::fs::write(s.dir.join("partial"), b"x").expect("write");
        drop(s);
        assert!(dest.is_dir(), "a destination podsnap did not create stays");
        assert_eq!(std::fs::read_dir(&dest).expect("list").count(), 0);
    }
}
