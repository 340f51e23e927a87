//! Pod dump: every container of a pod captured at one instant.
//!
//! [`dump_pod_on`] reads as the pipeline, one file per phase, in this order: `plan.rs` (step 1
//! below), `hold.rs` (2, 3 and the network lock of 4), `freeze.rs` (the freeze and checks of 4),
//! `dumps.rs` (5), `adopted.rs` (5, processes the pause process adopted), `resume.rs` (6) and
//! `finish.rs` (7). Each phase takes the state the one before returned, by value (`Planned`,
//! `Held`, `Frozen`, `Dumped`, `Captured`, `Thawed`), and on an error undoes what came before
//! (`unwind`) before returning it. Cgroup and /proc work goes through
//! [`podsnap_runtime::host::Host`], so the decisions are unit tested on a fake host.
//!
//! 1. pre-flight: the persistent volumes to carry are there and within the node's bound; the
//!    memory in use, the rootfs changes and the volumes must fit in the free
//!    space of the destination's filesystem (leaving the node's reserve), or the dump is
//!    refused up front with the numbers;
//! 2. the crash journal ([`journal`]) records what is about to be frozen and where the staging
//!    output goes;
//! 3. start each running container's `runc checkpoint` (leave running) while the pod still
//!    runs; its CRIU starts, probes the kernel and waits in a pre-dump script before it
//!    touches a process ([`crate::criu::hold`]). The container's CRIU configuration file says
//!    so, and `network-lock skip` under the pod's lock;
//! 4. quiesce: lock the pod's network namespace once ([`crate::pod::shared::netlock`]), then,
//!    once every CRIU waits, freeze each running container's own cgroup (CRIU cannot see a parent's
//!    freeze): v1 `freezer.state`, or v2 `cgroup.freeze` until `cgroup.events` says
//!    `frozen 1`; check the frozen pod (processes that would be lost, SysV segments and unix
//!    connections shared by two containers: the dump is refused and every CRIU gives up);
//! 5. while frozen, in parallel: let every CRIU dump its container, capture the rootfs
//!    changes (from the overlay upper directory mountinfo names; a container whose changes
//!    cannot be found fails the dump: see [`crate::archive::rootfs::upperdir_for_dump`]),
//!    archive the pod's emptyDir volumes, the persistent volumes it carries (`carry`),
//!    `/dev/shm` and SysV IPC;
//! 6. resume: thaw every container, then unlock the network. With `stop`, the checkpoint is
//!    first completed (specs, digests, manifest, renamed into place) while everything is
//!    still frozen, then every process of the pod is killed before the thaw: nothing runs
//!    after the snapshot, and the network stays locked (no FIN or reset of a dying socket
//!    reaches a peer whose connection a restore brings back);
//! 7. otherwise after the thaw: specs, digests, manifest last (temporary file, fsync, rename),
//!    and the staging directory renamed into place.
//!
//! A pod dumped as one of a group (`podsnap dump --selector`, see [`group`]) meets the other
//! pods between 3 and 4 (every pod held, its network locked, before any is frozen) and between
//! 5 and 6 (every pod dumped before any is thawed).
//!
//! Before the digests (in 6 or 7) each container's part is complete; when the caller made
//! `<dest>.parts` the dump announces each there ([`crate::format::layout::PartReady`]), so a push can start on them.
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

// The pipeline's phases, in the order of the flow; each takes the state the one before
// returned, by value, and returns its own.
mod adopted; // 5 -> Captured
mod dumps; // 4 -> Dumped
mod finish;
mod freeze; // 3 -> Frozen
pub mod group; // between phases: a group's pods meet
mod hold; // 2 -> Held
mod plan; // 1 -> Planned
mod resume; // 6 -> Thawed (or, with `stop`, the report) // 7 -> the report
pub mod serve; // 6, a lazy dump for a live migration -> the report and the served pod

// What the phases use.
mod beside;
mod capture;
mod carry;
mod checks;
mod criu_configs;
mod criu_runs;
mod digests;
pub mod journal;
mod kep;
mod limits;
mod parts;
pub mod preflight;
pub mod prehash;
mod staging;
#[cfg(test)]
mod tests;
mod volumes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use podsnap_runtime::host::{Host, LinuxHost};
use podsnap_runtime::launcher::Launcher;

use crate::error::Result;
use crate::format::manifest::PodInfo;
pub use crate::pod::target::Target;
pub use carry::{asked, Asked};
pub use serve::{Serve, ServedPod};

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
    /// Leave it locked when the dump is over (its caller paused the pod, and unlocks the
    /// network when it resumes it; see `layout::DumpAsk::hold_network`).
    pub hold_network: bool,
    /// Digest page images as CRIU writes them (the node's `[dump] digests`: `"early"`, or `"auto"`
    /// with a core to spare).
    pub early_digests: bool,
    /// Free space the dump must leave on the destination's filesystem (the node's
    /// `[dump] reserve_bytes`).
    pub reserve_bytes: u64,
    /// The persistent volumes to carry in the checkpoint (see `carry`).
    pub carry: crate::format::persistent::Carry,
    /// The most they may hold together (the node's `[dump] carry_volumes_max_bytes`).
    pub carry_max_bytes: u64,
    /// The group this pod is dumped with at one instant (see `group`).
    pub group: Option<crate::format::layout::GroupAsk>,
    /// A lazy dump for a live migration, its memory served on these sockets (see [`serve`]):
    /// only through [`dump_pod_serving`].
    pub serve: Option<Serve>,
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

/// The dump's span (`pod_dump`, with the sandbox id and the pod's name): each phase records
/// when it ended, in milliseconds from the dump's start, as a field of its own. A subscriber
/// (the shim's) writes the span's fields in one line when it closes, after the report that
/// holds it is dropped.
#[derive(Debug, Clone)]
pub struct Phases {
    span: tracing::Span,
    start: Instant,
}

/// The phases' marks and their fields in the span, in the order of the flow.
const PHASE_FIELDS: [(&str, &str); 13] = [
    ("preflight", "preflight_ms"),
    ("journal", "journal_ms"),
    ("criu held", "criu_held_ms"),
    ("network locked", "network_locked_ms"),
    ("criu waiting", "criu_waiting_ms"),
    ("frozen", "frozen_ms"),
    ("checked", "checked_ms"),
    ("dumped", "dumped_ms"),
    ("thawed", "thawed_ms"),
    ("described", "described_ms"),
    ("digested", "digested_ms"),
    ("finished", "finished_ms"),
    ("committed", "committed_ms"),
];

impl Default for Phases {
    fn default() -> Self {
        Self {
            span: tracing::Span::none(),
            start: Instant::now(),
        }
    }
}

impl Phases {
    /// The span of the dump of `pod`, its clock started.
    fn begin(pod: &PodInfo) -> Self {
        let span = tracing::info_span!(
            "pod_dump",
            sandbox = %pod.sandbox_id,
            pod = %format!(
                "{}/{}",
                pod.namespace.as_deref().unwrap_or("?"),
                pod.name.as_deref().unwrap_or("?")
            ),
            preflight_ms = tracing::field::Empty,
            journal_ms = tracing::field::Empty,
            criu_held_ms = tracing::field::Empty,
            network_locked_ms = tracing::field::Empty,
            criu_waiting_ms = tracing::field::Empty,
            frozen_ms = tracing::field::Empty,
            checked_ms = tracing::field::Empty,
            dumped_ms = tracing::field::Empty,
            thawed_ms = tracing::field::Empty,
            described_ms = tracing::field::Empty,
            digested_ms = tracing::field::Empty,
            finished_ms = tracing::field::Empty,
            committed_ms = tracing::field::Empty,
        );
        Self {
            span,
            start: Instant::now(),
        }
    }

    /// Records that `phase` (one of [`PHASE_FIELDS`]) ended now.
    fn mark(&self, phase: &'static str) {
        let field = PHASE_FIELDS
            .iter()
            .find(|(name, _)| *name == phase)
            .map(|(_, f)| *f);
        debug_assert!(field.is_some(), "a phase without a field: {phase}");
        if let Some(field) = field {
            self.span.record(field, self.start.elapsed().as_millis() as u64);
        }
    }

    /// The dump's span.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }
}

/// Dumps a pod; see the module documentation.
pub async fn dump_pod(req: PodDump) -> Result<DumpReport> {
    dump_pod_on(req, Arc::new(LinuxHost)).await
}

/// Dumps a pod on `host`: the pipeline, phase by phase. A phase that fails undoes what the
/// phases before it did (in their reverse order) before it returns its error.
pub async fn dump_pod_on(req: PodDump, host: Arc<dyn Host>) -> Result<DumpReport> {
    if req.serve.is_some() {
        return Err(crate::error::Error::Stopped {
            reason: "internal: a lazy dump is made by dump_pod_serving".into(),
        });
    }
    let stop = req.stop;
    run(req, host, move |captured| async move {
        match stop {
            true => resume::stop_at_snapshot(captured).await,
            false => finish::finish(resume::thaw(captured)).await,
        }
    })
    .await
}

/// Dumps a pod lazily for a live migration (`req.serve`): returns once every image is written
/// and every container's memory is being served, the pod frozen; see [`serve`].
pub async fn dump_pod_serving(req: PodDump) -> Result<(DumpReport, ServedPod)> {
    if req.serve.is_none() || req.group.is_some() || req.stop {
        return Err(crate::error::Error::Stopped {
            reason: "internal: a lazy dump needs its sockets, and no group or stop".into(),
        });
    }
    run(req, Arc::new(LinuxHost), resume::serve).await
}

/// The pipeline up to the captured pod, then `end` (which thaws, stops or serves it).
async fn run<T, F, Fut>(req: PodDump, host: Arc<dyn Host>, end: F) -> Result<T>
where
    F: FnOnce(adopted::Captured) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    use tracing::Instrument;
    let phases = Phases::begin(&req.pod);
    let span = phases.span().clone();
    let group = req.group.clone();
    let dumped = async move {
        let planned = plan::plan(req, host, phases).await?;
        let held = hold::hold(planned).await?;
        // A group's pods are all held (networks locked, CRIU waiting) before any is frozen...
        let held = group::meet_held(held).await?;
        let frozen = freeze::freeze(held).await?;
        let dumped = dumps::dump_containers(frozen).await?;
        let captured = adopted::dump_adopted(dumped).await?;
        // ...and all dumped before any is thawed.
        let captured = group::meet_dumped(captured).await?;
        end(captured).await
    }
    .instrument(span)
    .await;
    if let (Err(_), Some(g)) = (&dumped, &group) {
        group::fail(g);
    }
    dumped
}
