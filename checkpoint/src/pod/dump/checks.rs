//! What the frozen pod is checked for before its dump goes on, decided over facts read through
//! the [`Host`]: processes that would be lost (outside their container's tree and not adopted
//! by the pod's pause process), SysV segments two containers attach, unix connections between
//! containers a restore could not bring back. Each refusal names what it found.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use podsnap_runtime::host::Host;

use crate::error::{Error, Result};
use crate::format::manifest::UnixLink;
use crate::format::record::Role;
use crate::pod::dump::criu_configs::ToldEnds;
use crate::pod::dump::PodDump;
use crate::pod::shared::links::{SocketOwners, UnixConnection};
use crate::pod::spec::joined_ipc_ns;
use crate::pod::target::Target;

/// The processes of a container's cgroup (none when it is unknown).
pub(super) fn cgroup_procs(host: &dyn Host, t: &Target) -> Vec<i32> {
    t.cgroups
        .as_ref()
        .and_then(|c| host.cgroup_processes(c).ok())
        .unwrap_or_default()
}

/// A process of a container that the pod's pause process adopted, with its descendants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AdoptedRoot {
    /// Its container, an index into the dump's running containers.
    pub(super) container: usize,
    /// Its host pid: the root of what is dumped.
    pub(super) root: i32,
    /// It and its descendants (host pids).
    pub(super) members: Vec<i32>,
}

/// The processes of `running`'s containers (`procs`) outside their container's process tree
/// that the pod's pause process (of `targets`) adopted (in a pod sharing one PID namespace),
/// or that this shim restored as such (their parent is now the shim; see `Target::adopted`),
/// grouped by the root each is dumped from. Any other process outside its container's tree
/// (one started by exec) would be lost: refused, naming them.
pub(super) fn adopted_processes(
    host: &dyn Host,
    targets: &[Target],
    running: &[Target],
    procs: &[(String, Vec<i32>)],
) -> Result<Vec<AdoptedRoot>> {
    let pause = targets
        .iter()
        .find(|t| t.entry.role == Role::Sandbox)
        .and_then(|t| t.pid);
    let comm = |pid: i32| host.comm(pid).unwrap_or_else(|| "?".into());
    let mut adopted: Vec<AdoptedRoot> = Vec::new();
    let mut lost = Vec::new();
    for (container, (t, (_, pids))) in running.iter().zip(procs).enumerate() {
        let Some(init) = t.pid else { continue };
        for &pid in pids {
            let Some((top, parent)) = outside_tree(host, pid, init) else {
                continue;
            };
            let restored_as_adopted = || {
                t.adopted
                    .iter()
                    .any(|(p, start)| *p == top && host.start_time(top) == Some(*start))
            };
            if Some(parent) == pause || restored_as_adopted() {
                match adopted.iter_mut().find(|a| a.root == top) {
                    Some(a) => a.members.push(pid),
                    None => adopted.push(AdoptedRoot {
                        container,
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

/// `None` if `pid` is `init` or descends from it; otherwise the topmost ancestor that does not
/// (in the container's cgroup) and its parent (the process that adopted or started it).
fn outside_tree(host: &dyn Host, pid: i32, init: i32) -> Option<(i32, i32)> {
    let same_cgroup =
        |a: i32, b: i32| matches!((host.cgroup_of(a), host.cgroup_of(b)), (Some(x), Some(y)) if x == y);
    let mut cursor = pid;
    for _ in 0..4096 {
        if cursor == init {
            return None;
        }
        let parent = host.parent(cursor)?; // gone meanwhile: nothing to lose
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

/// The pod's IPC namespace and which SysV segments its containers' processes attach.
#[derive(Debug)]
pub(super) struct PodIpc {
    pub(super) ns: PathBuf,
    /// Segment id -> the container (name) whose processes attach it.
    pub(super) attached: BTreeMap<i32, String>,
    /// Container id -> the segments its processes attach, for each container of the namespace.
    pub(super) members: BTreeMap<String, BTreeSet<i32>>,
}

/// Reads, while the pod is frozen, which SysV segments each container of the pod's IPC
/// namespace attaches. A segment attached in two containers cannot come back (each container's
/// CRIU run would create it), so such a dump is refused, naming both.
pub(super) fn pod_ipc(
    host: &dyn Host,
    running: &[Target],
    procs: &[(String, Vec<i32>)],
) -> Result<Option<PodIpc>> {
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
        let segments = host.sysv_attached(pids);
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

/// The ends of the unix connections between containers of the running pod, by container: what
/// each container's CRIU is told are external sockets.
pub(super) async fn planned_unix_ends(
    req: &PodDump,
    host: &dyn Host,
    running: &[Target],
) -> Result<HashMap<String, BTreeSet<u64>>> {
    let procs: Vec<(String, Vec<i32>)> = running
        .iter()
        .map(|t| (t.entry.name.clone(), cgroup_procs(host, t)))
        .collect();
    let owners = SocketOwners::read(&procs);
    let found = crate::pod::shared::links::unix_connections(
        req.launcher.as_ref(),
        req.netns.as_deref(),
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

/// The unix connections between containers of the frozen pod (see [`unix_links`]).
pub(super) async fn checked_unix_links(
    req: &PodDump,
    procs: &[(String, Vec<i32>)],
    owners: &SocketOwners,
    told: &ToldEnds,
    adopted: &[AdoptedRoot],
) -> Result<Vec<UnixLink>> {
    let found = crate::pod::shared::links::unix_connections(
        req.launcher.as_ref(),
        req.netns.as_deref(),
        procs,
        owners,
        !adopted.is_empty(),
    )
    .await?;
    unix_links(&found, told, adopted)
}

/// The connections `found` between containers, as the manifest records them. Refused, naming
/// the containers or processes: a connected datagram socket (its peer is a bound socket of the
/// other container, not a pair); a connection whose ends' CRIU runs were not told of it
/// (opened after they started: a dump again finds it from the start; or a container whose CRIU
/// configuration is not podsnap's); a connection held by a process the pause process adopted,
/// to anything outside its own tree (its CRIU run is its own); more ends in one container than
/// a restore hands runc.
pub(super) fn unix_links(
    found: &[UnixConnection],
    told: &ToldEnds,
    adopted: &[AdoptedRoot],
) -> Result<Vec<UnixLink>> {
    let refuse = |reason: String| Error::InvalidCheckpoint {
        path: "pod".into(),
        reason: format!("{reason}; the pod was left running"),
    };
    let tree_of = |pid: i32| adopted.iter().find(|a| a.members.contains(&pid)).map(|a| a.root);
    let mut links = Vec::new();
    let mut per_container: HashMap<&str, usize> = HashMap::new();
    for c in found {
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
