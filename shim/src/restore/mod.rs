//! Kubelet-driven restore: a pod carrying the annotation `podsnap.io/restore-from: <name>` has
//! each of its containers brought back from the checkpoint `<name>` in the node's checkpoint
//! root instead of started fresh.
//!
//! At the sandbox's Create, before anything of the pod exists:
//! 1. `<name>` is resolved inside the root (absolute paths, `..` and symlinks out of it are
//!    refused), and the pod takes a lease on the checkpoint for the life of this shim
//!    ([`podsnap_checkpoint::lease`]: `podsnap rm` and retention leave it alone);
//! 2. the checkpoint must be exactly what its manifest lists (no unlisted file);
//! 3. the restore policy of the node configuration: may a pod of this namespace restore a
//!    checkpoint of that one ([`podsnap_checkpoint::policy`]);
//! 4. the node can run it: architecture, CRIU, kernel, CPU features;
//! 5. every digest, once for the pod's life in this shim.
//!
//! At each container's Create: the container's recorded state comes back as it was. Running
//! and paused containers are restored from their CRIU images after the image and privilege
//! checks (a paused one is paused again right after its restore); a container that had exited is answered with its recorded exit code without
//! running; one that was created but never started is created fresh (it never ran). Only
//! attempt 0 is restored: kubelet's restarts of a container start fresh from the image. The
//! attempt is kubelet's restart count annotation; without it, a second Create of a name this
//! pod already restored counts as a restart.
//!
//! Established connections are always restored ([`NetHold`]), so a TCP connection between two
//! containers of the pod comes back whole: when the dump found such connections, the pod's
//! network is locked, loopback included, until the containers at their ends are all restored
//! (no packet of a restored end reaches the other before it exists: the kernel would answer
//! with a reset). The pod's addresses at the dump are lent to its loopback device meanwhile, for
//! the connections bound to them; the connections to outside the pod are closed after each
//! container's restore unless the checkpoint was taken to keep them (`--tcp-established`) and
//! the pod's address is the same.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_spec::runtime::Spec;
use podsnap_checkpoint::config::{NodeConfig, LAZY_ANNOTATION, RESTORE_ANNOTATION};
use podsnap_checkpoint::container::{DumpOptions, InheritedSocket};
use podsnap_checkpoint::dump::empty_dir_name;
use podsnap_checkpoint::lease::{self, Holder, Lease, LEASE_DIR};
use podsnap_checkpoint::manifest::{
    read_capped, Manifest, CPUINFO, MAX_JSON_BYTES, ROOTFS_DELETED, ROOTFS_DIFF,
};
use podsnap_checkpoint::policy::{self, NewImage, Violation};
use podsnap_checkpoint::ContainerState;
use podsnap_runtime::bundle::PodIdentity;

use crate::container::{Lazy, RestoreSource};
use crate::error::{Error, Result};
use crate::exits::MonitorLauncher;
use crate::lazy_pages::LeaseFor;
use crate::process::lock;

/// The snapshotter directory overlay layers live in (`.../snapshots/<n>/fs` -> `...`): two
/// containerds on one machine (their own roots) are two nodes.
fn snapshot_root(layers: &[String]) -> Option<&str> {
    layers.first()?.rsplit_once("/snapshots/").map(|(root, _)| root)
}

/// A restore annotation naming a checkpoint in an OCI registry: `oci://REF`.
pub const OCI_PREFIX: &str = "oci://";

/// The name in the checkpoint root of the copy of an `oci://` checkpoint pulled for the pod
/// with sandbox id `sandbox`: it belongs to that pod, and goes when the pod is refused or
/// removed ([`remove_pulled`]). `oci-` and the id's first 16 characters; the id must be a
/// containerd identifier (ASCII letters and digits, `.`, `_`, `-` between them: CRI's are
/// hex), so the name is one path component of ASCII (the annotation comes from the pod spec:
/// a `/`, a `..` or a multi-byte character is refused, not sliced).
pub fn pulled_name(sandbox: &str) -> Result<String> {
    let valid = sandbox.len() <= 76
        && sandbox.starts_with(|c: char| c.is_ascii_alphanumeric())
        && sandbox
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: the pod's sandbox id {sandbox:?} is not a containerd identifier \
             (ASCII letters, digits, '.', '_', '-'): no checkpoint is pulled for it"
        )));
    }
    Ok(format!("oci-{}", &sandbox[..sandbox.len().min(16)]))
}

/// Removes the copy pulled for the pod with sandbox id `sandbox` from `root`, if there is one
/// (never while a lease holds it: a lazy restore's daemon may still read it).
pub fn remove_pulled(root: &Path, sandbox: &str) {
    // Nothing was pulled for an id that names none.
    let Ok(name) = pulled_name(sandbox) else {
        return;
    };
    if std::fs::symlink_metadata(root.join(&name)).is_err() {
        return;
    }
    match podsnap_checkpoint::store::remove(root, &name, Path::new(LEASE_DIR)) {
        Ok(_) => log::info!("pod {sandbox}: removed checkpoint {name}, pulled for it"),
        Err(e) => log::warn!("pod {sandbox}: the checkpoint {name} pulled for it stays: {e}"),
    }
}

/// Pulls the checkpoint at `reference` into the checkpoint root for the pod of `identity`, once
/// per pod (the sandbox's plan pulls it, its containers' find it): `podsnap pull`, so the
/// node's `[registry]` rules apply (allowed registries, trusted signing keys), the restore
/// policy is checked against the checkpoint's manifest before any layer is downloaded
/// (`--for-namespace`), and every digest is checked before the checkpoint lands in the root.
/// Returns its name there.
async fn pull_for_pod(reference: &str, identity: &PodIdentity, root: &Path) -> Result<String> {
    let sandbox = identity.sandbox_id.as_deref().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: {OCI_PREFIX}{reference}: no sandbox id"
        ))
    })?;
    let name = pulled_name(sandbox)?;
    if root.join(&name).is_dir() {
        return Ok(name);
    }
    if !identity.is_sandbox {
        return Err(Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: {OCI_PREFIX}{reference} was not pulled at the pod's creation"
        )));
    }
    let mut cmd = std::process::Command::new("podsnap");
    cmd.arg("pull")
        .arg(reference)
        .arg(&name)
        .arg("--for-namespace")
        .arg(identity.pod_namespace.as_deref().unwrap_or(""))
        .env("PODSNAP_CHECKPOINT_ROOT", root)
        .stdin(std::process::Stdio::null());
    log::info!("pod {sandbox}: pulling checkpoint {reference} as {name}");
    let out = podsnap_runtime::launcher::Launcher::run(
        &MonitorLauncher,
        cmd,
        podsnap_runtime::launcher::Capture::Output,
    )
    .await
    .map_err(|e| Error::InvalidArgument(format!("{RESTORE_ANNOTATION}: podsnap pull {reference}: {e}")))?;
    if !out.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: {OCI_PREFIX}{reference}: {}",
            stderr.trim().trim_start_matches("podsnap: error: ")
        )));
    }
    Ok(name)
}

/// kubelet's container annotation counting the container's restarts (its attempt).
pub const RESTART_COUNT_ANNOTATION: &str = "io.kubernetes.container.restartCount";

/// Resolves a checkpoint name inside `root`, refusing anything that leads elsewhere.
pub fn resolve(root: &Path, name: &str) -> Result<PathBuf> {
    podsnap_checkpoint::store::resolve(root, name).map_err(|why| {
        Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: {name:?} is refused: {why}; it must name a checkpoint inside {}",
            root.display()
        ))
    })
}

/// What to do with a container at Create.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Create and start it as usual.
    Fresh,
    /// Do not run it: it had exited with this code.
    Exited(u32),
    /// Restore it from CRIU images.
    Restore(Box<RestorePlan>),
}

impl Plan {
    /// A restore from CRIU images containerd names itself (a Create's `checkpoint`: `ctr`'s
    /// path), not from a pod checkpoint.
    pub fn from_images(image_dir: PathBuf) -> Result<Plan> {
        let options = podsnap_checkpoint::container::inspect(&image_dir)?;
        Ok(Plan::Restore(Box::new(RestorePlan {
            image_dir,
            options,
            rootfs_changes: None,
            volumes: Vec::new(),
            sysv_ipc: None,
            started_order: None,
            name: None,
            paused: false,
            lazy: None,
            unix_ends: Vec::new(),
            adopted: Vec::new(),
        })))
    }
}

/// A container's restore prepared at its Create: what its Start restores from.
pub struct Prepared {
    pub source: RestoreSource,
    /// It was paused at the checkpoint: paused again once restored.
    pub paused: bool,
}

/// Everything a container's restore needs from its checkpoint.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    pub image_dir: PathBuf,
    pub options: DumpOptions,
    /// rootfs-diff.tar and rootfs-deleted.json, when the checkpoint lists them.
    pub rootfs_changes: Option<(PathBuf, PathBuf)>,
    /// (archive, host directory) of each emptyDir volume this container mounts, and of the
    /// pod's `/dev/shm`.
    pub volumes: Vec<(PathBuf, PathBuf)>,
    /// (checkpoint directory, the new pod's IPC namespace) when the checkpoint holds SysV IPC
    /// objects of the pod: created there once, before the pod's first container.
    pub sysv_ipc: Option<(PathBuf, PathBuf)>,
    /// The container's name in its pod (kubelet path), marked restored once created.
    pub name: Option<String>,
    /// Its place in the pod's start order at the checkpoint.
    pub started_order: Option<u64>,
    /// It was paused at the checkpoint: it comes back paused.
    pub paused: bool,
    /// Restore it lazily (`podsnap.io/restore-lazy`).
    pub lazy: Option<Lazy>,
    /// Its ends of the checkpoint's unix connections to other containers.
    pub unix_ends: Vec<InheritedSocket>,
    /// (PID in the pod, CRIU images) of each of its processes the pod's pause process had
    /// adopted: restored beside it.
    pub adopted: Vec<(u32, PathBuf)>,
}

/// What the shim knows of a container being created.
pub struct NewContainer<'a> {
    pub spec: &'a Spec,
    pub identity: &'a PodIdentity,
    /// The overlay lower directories of its rootfs, top first (from the Create request).
    pub layers: &'a [String],
}

/// A checkpoint verified for this pod.
struct Verified {
    manifest: Manifest,
    /// This node's identity, to tell node-local facts apart.
    node_id: String,
}

/// Verified checkpoints, filled volumes and restored containers, for the life of the pod's shim.
#[derive(Default)]
pub struct Restores {
    verified: Mutex<HashMap<PathBuf, Arc<Verified>>>,
    filled: Mutex<HashSet<PathBuf>>,
    /// Held while what the pod's containers share is filled (volumes, SysV IPC): containers
    /// of a pod are created at once (`podsnap restore` starts their restores together), and
    /// the first fills, the others wait and find it filled.
    filling: tokio::sync::Mutex<()>,
    /// Names of the containers restored (or answered as exited) in this pod: a second Create
    /// of one of them is a restart, which starts fresh.
    restored: Mutex<HashSet<String>>,
    /// The pod's leases on the checkpoints it restores from, by checkpoint directory: held
    /// for the life of the shim (released as it exits, see `service.rs`).
    leases: Mutex<HashMap<PathBuf, Lease>>,
    /// The pod's network while its containers are restored.
    net: Arc<tokio::sync::Mutex<Option<NetHold>>>,
    /// Set once the pod's shared PID namespace hands out ids above the checkpoint's.
    pids_reserved: tokio::sync::OnceCell<()>,
    /// The new connections of the checkpoint's unix links between containers, by checkpoint
    /// directory and link: made by the first restore of a container at either end, each end
    /// taken by the restore of its container.
    unix_pairs: Arc<Mutex<HashMap<(PathBuf, usize), NewPair>>>,
}

/// A new unix connection for a link of the checkpoint: each container's restore gets a copy of
/// its end; the shim's copies go once both restores are over (else the peer of a container
/// that died would never see the end of the stream), or when the pod's restore is.
struct NewPair {
    ends: [std::os::fd::OwnedFd; 2],
    containers: [String; 2],
    over: [bool; 2],
}

/// The new pod's network namespace while its containers are restored: its addresses at the
/// dump lent to its loopback device until every container the checkpoint holds running is
/// restored (or its restore failed), and locked (loopback too) until those linked by TCP over
/// loopback are; released [`NET_HOLD_IDLE`] after a restore when no other container's began (a
/// pod that restores only some of them), at the latest [`NET_HOLD_LIMIT`] after the first.
pub struct NetHold {
    netns: PathBuf,
    /// Names of the containers still to restore.
    waiting: HashSet<String>,
    /// Those of them at an end of a connection over loopback to another container.
    linked: HashSet<String>,
    locked: bool,
    /// The checkpoint asked to keep connections to outside the pod.
    keep_outside: bool,
    /// The pod's addresses at the dump that this pod does not have, lent to its loopback device
    /// while CRIU restores the connections bound to them.
    borrowed: Vec<std::net::IpAddr>,
    /// Counts the pod's container restores planned and finished (the idle timer's clock).
    generation: u64,
}

/// The longest the pod's network stays locked waiting for its containers' restores.
const NET_HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);
/// How long after a container's restore the next one must begin for the lock to wait for it.
const NET_HOLD_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

impl Restores {
    /// Decides how to create a container from its spec's annotations; refuses (before
    /// anything is created) whatever the node's restore policy forbids.
    pub async fn plan(&self, new: &NewContainer<'_>) -> Result<Plan> {
        let Some(name) = new
            .spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(RESTORE_ANNOTATION))
            .filter(|v| !v.is_empty())
            .cloned()
        else {
            return Ok(Plan::Fresh);
        };
        let identity = new.identity;
        let cname = identity.name.clone().unwrap_or_default();
        // Checked on the sandbox too: a pod asking for something else is refused whole.
        let lazy = lazy_asked(new.spec)?;
        if !identity.is_sandbox {
            match restart_count(new.spec) {
                // kubelet says which attempt this is (the drop-in passes its annotation).
                Some(attempt) if attempt > 0 => {
                    log::info!("container {cname}: attempt {attempt} of a restored pod starts fresh");
                    return Ok(Plan::Fresh);
                }
                Some(_) => {}
                // Without it: a second Create of a name already restored is a restart.
                None if lock(&self.restored).contains(&cname) => {
                    log::info!("container {cname}: restarted in a restored pod, starts fresh");
                    return Ok(Plan::Fresh);
                }
                None => {}
            }
        }
        let config = NodeConfig::load()?;
        let root = config.checkpoint_root();
        let (name, pulled) = match name.strip_prefix(OCI_PREFIX) {
            Some(reference) => (pull_for_pod(reference, identity, &root).await?, true),
            None => (name, false),
        };
        let opened = async {
            let dir = resolve(&root, &name)?;
            self.lease(&root, &name, &dir, identity)?;
            let verified = self.verified(&dir, &name, &config, identity).await;
            if verified.is_err() && identity.is_sandbox {
                // The pod is refused: it holds nothing.
                lock(&self.leases).remove(&dir);
            }
            Ok::<_, Error>((dir, verified?))
        };
        let (dir, verified) = match opened.await {
            Ok(opened) => opened,
            Err(e) => {
                if let (true, true, Some(sandbox)) =
                    (pulled, identity.is_sandbox, identity.sandbox_id.as_deref())
                {
                    // Nor does the root keep what was pulled for it.
                    let (root, sandbox) = (root.clone(), sandbox.to_owned());
                    let _ = tokio::task::spawn_blocking(move || remove_pulled(&root, &sandbox)).await;
                }
                return Err(e);
            }
        };
        let manifest = &verified.manifest;
        if identity.is_sandbox {
            return Ok(Plan::Fresh); // a new sandbox; the checks above refused a bad checkpoint
        }
        let refused = |v: Violation| Error::from(podsnap_checkpoint::Error::refused(&name, v));
        let entry = manifest.container(&cname).ok_or_else(|| {
            Error::InvalidArgument(format!("container {cname:?} is not in checkpoint {name:?}"))
        })?;
        match entry.state {
            ContainerState::Created => {
                log::info!("container {cname}: was created but never started; created fresh");
                lock(&self.restored).insert(cname);
                return Ok(Plan::Fresh);
            }
            ContainerState::Stopped => {
                // The manifest parser refuses a stopped container without an exit code.
                return Ok(Plan::Exited(entry.exit_code.unwrap_or(u32::MAX)));
            }
            ContainerState::Running | ContainerState::Paused if !entry.dumped => {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint {name:?} records container {cname:?} as running but holds no images of it"
                )));
            }
            ContainerState::Running | ContainerState::Paused => {}
        }
        let image = NewImage {
            name: identity.image.as_deref(),
            id: None,
            layers: Some(new.layers),
            // The same machine and the same containerd (snapshotter root): layer paths compare.
            same_node: !verified.node_id.is_empty()
                && manifest.host.node_id == verified.node_id
                && snapshot_root(&entry.rootfs_layers) == snapshot_root(new.layers),
        };
        policy::check_image(entry, &image).map_err(refused)?;
        let names = manifest.part_names();
        let spec_file = dir.join(entry.file(names.spec));
        let old: Spec = read_capped(&spec_file, MAX_JSON_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| {
                Error::InvalidArgument(format!("checkpoint {name:?}: {}: {e}", spec_file.display()))
            })?;
        policy::check_privilege(&cname, &old, new.spec).map_err(refused)?;

        let image_dir = dir.join(entry.dir()).join(names.images);
        let mut options = podsnap_checkpoint::container::inspect(&image_dir)?;
        // Connections are always captured and restored: those to outside the pod are closed
        // after the last container's restore unless the dump asked to keep them.
        options.tcp_established = true;
        self.hold_network(new.spec, manifest).await?;
        self.reserve_pids(new.spec, manifest, &dir).await?;
        let adopted = manifest
            .adopted
            .iter()
            .filter(|a| a.container == cname)
            .map(|a| (a.pid, dir.join(a.images(names))))
            .collect();
        podsnap_checkpoint::kdat::ensure_logged(&MonitorLauncher).await;
        let (tar, del) = (entry.file(ROOTFS_DIFF), entry.file(ROOTFS_DELETED));
        let rootfs_changes =
            (manifest.lists(&tar) && manifest.lists(&del)).then(|| (dir.join(tar), dir.join(del)));
        let mut volumes = Vec::new();
        for m in new.spec.mounts().iter().flatten() {
            let Some(src) = m.source().as_ref().and_then(|s| s.to_str()) else {
                continue;
            };
            let Some(vname) = empty_dir_name(src) else {
                continue;
            };
            if let Some(v) = manifest.volumes.iter().find(|v| v.name == vname) {
                if manifest.lists(&v.archive) {
                    volumes.push((dir.join(&v.archive), PathBuf::from(src)));
                }
            }
        }
        // The pod's /dev/shm comes back before its first container does (files its processes
        // hold open or mapped must be there for CRIU).
        if let (Some(archive), Some(dst)) = (
            manifest.dev_shm.as_ref().filter(|a| manifest.lists(a)),
            podsnap_checkpoint::dump::dev_shm_source(new.spec),
        ) {
            volumes.push((dir.join(archive), dst));
        }
        let sysv_ipc = match manifest.sysv_ipc.as_ref().filter(|a| manifest.lists(a)) {
            Some(_) => Some((
                dir.clone(),
                podsnap_checkpoint::dump::joined_ipc_ns(new.spec).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "checkpoint {name:?} holds the pod's SysV IPC objects but container \
                         {cname:?} joins no IPC namespace of a pod"
                    ))
                })?,
            )),
            None => None,
        };
        let lazy = lazy.then(|| Lazy {
            lease_for: identity.sandbox_id.as_ref().map(|sandbox_id| LeaseFor {
                sandbox_id: sandbox_id.clone(),
                pod: match (&identity.pod_namespace, &identity.pod_name) {
                    (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
                    _ => None,
                },
                checkpoint: dir.clone(),
            }),
        });
        if lazy.is_some() {
            log::info!("container {cname}: will be restored lazily (its memory on demand)");
        }
        // Last: every check above passed.
        let unix_ends = self.unix_ends(&dir, manifest, &cname)?;
        Ok(Plan::Restore(Box::new(RestorePlan {
            image_dir,
            options,
            rootfs_changes,
            volumes,
            sysv_ipc,
            name: Some(cname),
            started_order: entry.started_order,
            paused: entry.state == ContainerState::Paused,
            lazy,
            unix_ends,
            adopted,
        })))
    }

    /// Container `cname`'s ends of the unix connections between containers of the checkpoint
    /// at `dir`: each link's pair is made once (the first restore at either end makes it, with
    /// the queued bytes of both ends in it); each restore gets a copy of its end.
    fn unix_ends(&self, dir: &Path, manifest: &Manifest, cname: &str) -> Result<Vec<InheritedSocket>> {
        let mut ends = Vec::new();
        let mut pairs = lock(&self.unix_pairs);
        for (i, link) in manifest.unix_links.iter().enumerate() {
            let Some(side) = link.ends.iter().position(|e| e.container == cname) else {
                continue;
            };
            let pair = match pairs.entry((dir.to_path_buf(), i)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let made = podsnap_checkpoint::links::connect_link(dir, manifest.part_names(), link)?;
                    log::info!(
                        "unix connection {i} of the checkpoint: {:?} <-> {:?}, made for the restore",
                        link.ends[0],
                        link.ends[1]
                    );
                    e.insert(NewPair {
                        ends: made,
                        containers: [link.ends[0].container.clone(), link.ends[1].container.clone()],
                        over: [false; 2],
                    })
                }
            };
            let fd = pair.ends[side]
                .try_clone()
                .map_err(|e| Error::Internal(format!("copy a unix connection's end: {e}")))?;
            ends.push(InheritedSocket {
                ino: link.ends[side].ino,
                fd: Arc::new(fd),
            });
        }
        Ok(ends)
    }

    /// Takes this pod's lease on the checkpoint at `dir` (named `name` in `root`), once; then
    /// checks the checkpoint is still there: a removal that did not see the lease has moved
    /// it away (see [`podsnap_checkpoint::lease`]).
    fn lease(&self, root: &Path, name: &str, dir: &Path, identity: &PodIdentity) -> Result<()> {
        if lock(&self.leases).contains_key(dir) {
            return Ok(());
        }
        let Some(sandbox) = identity.sandbox_id.as_deref() else {
            log::warn!(
                "container {:?}: no sandbox id: restores from {name} without a lease",
                identity.name
            );
            return Ok(());
        };
        let pod = match (&identity.pod_namespace, &identity.pod_name) {
            (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
            _ => None,
        };
        let lease = lease::take(Path::new(LEASE_DIR), &Holder::this_process(sandbox, pod, dir))?;
        if resolve(root, name)? != dir {
            return Err(Error::InvalidArgument(format!(
                "{RESTORE_ANNOTATION}: checkpoint {name:?} changed while it was being opened; try again"
            )));
        }
        log::info!("pod {sandbox}: holds a lease on checkpoint {name}");
        lock(&self.leases).insert(dir.to_path_buf(), lease);
        Ok(())
    }

    /// Prepares the pod's network before the first of its containers is restored: lends it its
    /// addresses at the dump, and locks it when containers are linked by TCP over loopback.
    async fn hold_network(&self, spec: &Spec, manifest: &Manifest) -> Result<()> {
        use podsnap_checkpoint::netlock;
        let mut net = self.net.lock().await;
        if let Some(h) = net.as_mut() {
            h.generation += 1;
            return Ok(());
        }
        let Some(netns) = crate::pod::dump::pod_netns(spec) else {
            return Ok(()); // the host's network: nothing of the pod's own to hold
        };
        let waiting: HashSet<String> = manifest
            .containers
            .iter()
            .filter(|c| c.dumped && matches!(c.state, ContainerState::Running | ContainerState::Paused))
            .map(|c| c.name.clone())
            .collect();
        let linked: HashSet<String> = manifest
            .loopback_linked
            .iter()
            .filter(|n| waiting.contains(*n))
            .cloned()
            .collect();
        let now = netlock::addresses(&MonitorLauncher, &netns).await?;
        let borrowed: Vec<_> = manifest
            .pod
            .ips
            .iter()
            .filter(|ip| !now.contains(ip))
            .copied()
            .collect();
        let mut h = NetHold {
            netns,
            waiting,
            linked,
            locked: false,
            keep_outside: manifest.tcp_established,
            borrowed: Vec::new(),
            generation: 0,
        };
        if !h.linked.is_empty() {
            let wait = podsnap_runtime::launcher::Limit::after(netlock::XTABLES_WAIT, None);
            netlock::lock_with(&MonitorLauncher, &h.netns, netlock::Scope::All, &wait).await?;
            h.locked = true;
            log::info!(
                "pod network {} locked until {:?} (linked over loopback) are restored",
                h.netns.display(),
                h.linked
            );
        }
        // Connections come back bound to the pod's addresses at the dump.
        let lent = netlock::borrow_addresses(&MonitorLauncher, &h.netns, &borrowed, true).await;
        h.borrowed = borrowed;
        if let Err(e) = lent {
            release_network(&mut h).await;
            return Err(e.into());
        }
        *net = Some(h);
        let held = self.net.clone();
        tokio::spawn(async move {
            tokio::time::sleep(NET_HOLD_LIMIT).await;
            if let Some(h) = held.lock().await.as_mut().filter(|h| !h.waiting.is_empty()) {
                log::warn!(
                    "pod network {}: still waiting for {:?} after {:?}; released",
                    h.netns.display(),
                    h.waiting,
                    NET_HOLD_LIMIT
                );
                release_network(h).await;
            }
        });
        Ok(())
    }

    /// In a pod sharing one PID namespace, before the first of its containers is restored:
    /// makes the namespace hand out ids above every id the checkpoint's processes had. The
    /// containers' restores run side by side, and a restored process's new thread or a CRIU
    /// helper would otherwise take the next free id, which may be one another container's
    /// restore needs.
    async fn reserve_pids(&self, spec: &Spec, manifest: &Manifest, dir: &Path) -> Result<()> {
        let Some(pidns) =
            crate::pod::dump::joined_namespace(spec, oci_spec::runtime::LinuxNamespaceType::Pid)
        else {
            return Ok(()); // a PID namespace of its own (or the host's): nothing is shared
        };
        self.pids_reserved
            .get_or_try_init(|| async {
                let names = manifest.part_names();
                let mut highest = 1;
                for c in manifest.containers.iter().filter(|c| {
                    c.dumped && matches!(c.state, ContainerState::Running | ContainerState::Paused)
                }) {
                    let images = dir.join(c.dir()).join(names.images);
                    highest = highest.max(podsnap_checkpoint::container::highest_pid(&images)?);
                }
                for a in &manifest.adopted {
                    let images = dir.join(a.images(names));
                    highest = highest.max(podsnap_checkpoint::container::highest_pid(&images)?);
                }
                podsnap_checkpoint::container::reserve_pids(&MonitorLauncher, &pidns, highest).await?;
                log::info!(
                    "pod PID namespace {}: ids up to {highest} kept for the restores",
                    pidns.display()
                );
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Container `name`'s restore is over (restored or failed): its connections to outside the
    /// pod are closed unless kept; the lock goes once every linked container is back, the lent
    /// addresses once every container is.
    pub async fn restore_over(&self, name: &str) {
        lock(&self.unix_pairs).retain(|_, p| {
            for (c, over) in p.containers.iter().zip(p.over.iter_mut()) {
                *over |= c == name;
            }
            !p.over.iter().all(|o| *o)
        });
        let mut net = self.net.lock().await;
        let Some(h) = net.as_mut() else { return };
        if !h.waiting.remove(name) {
            return;
        }
        close_outside(h).await;
        h.linked.remove(name);
        if h.locked && h.linked.is_empty() {
            podsnap_checkpoint::netlock::unlock(&MonitorLauncher, &h.netns).await;
            h.locked = false;
            log::info!(
                "pod network {} unlocked: its linked containers are back",
                h.netns.display()
            );
        }
        if h.waiting.is_empty() {
            release_network(h).await;
            lock(&self.unix_pairs).clear(); // every restore of the pod is over
            return;
        }
        h.generation += 1;
        let (held, generation) = (self.net.clone(), h.generation);
        let pairs = self.unix_pairs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(NET_HOLD_IDLE).await;
            let mut net = held.lock().await;
            if let Some(h) = net
                .as_mut()
                .filter(|h| h.generation == generation && !h.waiting.is_empty())
            {
                log::warn!(
                    "pod network {}: no restore of {:?} began within {:?}; released",
                    h.netns.display(),
                    h.waiting,
                    NET_HOLD_IDLE
                );
                release_network(h).await;
                lock(&pairs).clear(); // the restores that did not come never will
            }
        });
    }

    /// Remembers that container `name` of this pod came back from the checkpoint: its next
    /// Create is a restart.
    pub fn mark_restored(&self, name: &str) {
        lock(&self.restored).insert(name.to_owned());
    }

    /// The checkpoint at `dir`, checked against the node's policy and verified, once per pod.
    async fn verified(
        &self,
        dir: &Path,
        name: &str,
        config: &NodeConfig,
        identity: &PodIdentity,
    ) -> Result<Arc<Verified>> {
        let refused = |v: Violation| Error::from(podsnap_checkpoint::Error::refused(name, v));
        let cached = lock(&self.verified).get(dir).cloned();
        let checked = match cached {
            Some(v) => v,
            None => {
                let d = dir.to_path_buf();
                let manifest = tokio::task::spawn_blocking(move || Manifest::load_listed(&d))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??;
                // The cheap refusals first: no digest of another namespace's checkpoint is read.
                policy::check_namespace(
                    &config.restore,
                    manifest.pod.namespace.as_deref(),
                    identity.pod_namespace.as_deref().unwrap_or(""),
                    &config.describe(),
                )
                .map_err(refused)?;
                // (Only CRIU's version, the kernel and the architecture are compared.)
                let here = podsnap_checkpoint::host::this_node(&MonitorLauncher, Path::new("runc")).await;
                policy::check_host(&manifest.host, &here).map_err(refused)?;
                if manifest.lists(CPUINFO) {
                    let host_dir = dir.join(CPUINFO);
                    let host_dir = host_dir.parent().unwrap_or(dir);
                    podsnap_checkpoint::host::check_cpuinfo(&MonitorLauncher, host_dir)
                        .await
                        .map_err(refused)?;
                }
                // The digests of the manifest already checked (parsed and listed once); not
                // read again when podsnap sealed these very files (see
                // `podsnap_checkpoint::seal`): right after the dump or pull that hashed them.
                let d = dir.to_path_buf();
                let (manifest, how) = tokio::task::spawn_blocking(move || {
                    let seals = Path::new(podsnap_checkpoint::seal::SEAL_DIR);
                    manifest.verify_sealed(&d, seals).map(|how| (manifest, how))
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
                log::info!("checkpoint {name}: digests {how:?}");
                let v = Arc::new(Verified {
                    manifest,
                    node_id: here.node_id,
                });
                lock(&self.verified).insert(dir.to_path_buf(), v.clone());
                return Ok(v);
            }
        };
        // Every container of the pod passes the namespace rule, not only the sandbox.
        policy::check_namespace(
            &config.restore,
            checked.manifest.pod.namespace.as_deref(),
            identity.pod_namespace.as_deref().unwrap_or(""),
            &config.describe(),
        )
        .map_err(refused)?;
        Ok(checked)
    }

    /// Prepares a container's filesystem for its restore: emptyDir volumes (once per pod) and
    /// its rootfs changes. A volume counts as filled only once its archive is unpacked.
    pub async fn prepare(&self, plan: RestorePlan, rootfs: &Path) -> Result<Prepared> {
        self.prepare_files(&plan, rootfs).await?;
        Ok(Prepared {
            paused: plan.paused,
            source: RestoreSource {
                image_dir: plan.image_dir,
                options: plan.options,
                started_order: plan.started_order,
                lazy: plan.lazy,
                unix_ends: plan.unix_ends,
                adopted: plan.adopted,
            },
        })
    }

    async fn prepare_files(&self, plan: &RestorePlan, rootfs: &Path) -> Result<()> {
        let filling = self.filling.lock().await;
        for (archive, dst) in &plan.volumes {
            if lock(&self.filled).contains(dst) {
                continue;
            }
            let (a, d) = (archive.clone(), dst.clone());
            tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&d)
                    .map_err(|e| podsnap_checkpoint::Error::io("create a volume", &d, e))?;
                podsnap_checkpoint::rootfs::unpack(&a, &d)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            lock(&self.filled).insert(dst.clone());
        }
        if let Some((dir, ns)) = plan.sysv_ipc.clone() {
            // Keyed by the namespace: once for the pod.
            if !lock(&self.filled).contains(&ns) {
                let n = ns.clone();
                tokio::task::spawn_blocking(move || {
                    let path = dir.join(podsnap_checkpoint::sysv::SYSV_STATE);
                    let state: podsnap_checkpoint::sysv::SysvState = read_capped(&path, MAX_JSON_BYTES)
                        .map_err(|e| e.to_string())
                        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                        .map_err(|reason| podsnap_checkpoint::Error::InvalidCheckpoint {
                            path: path.clone(),
                            reason,
                        })?;
                    podsnap_checkpoint::sysv::restore(&n, &dir, &state)
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
                lock(&self.filled).insert(ns);
            }
        }
        drop(filling);
        if let Some((tar, del)) = plan.rootfs_changes.clone() {
            let r = rootfs.to_path_buf();
            tokio::task::spawn_blocking(move || podsnap_checkpoint::rootfs::apply(&r, &tar, &del))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
        }
        Ok(())
    }
}

/// Closes the pod's connections to outside unless they are kept (and can be: its address did
/// not change).
async fn close_outside(h: &NetHold) {
    if h.keep_outside && h.borrowed.is_empty() {
        return;
    }
    if h.keep_outside {
        log::warn!(
            "pod network {}: the pod's address changed ({:?} at the dump): its connections to \
             outside the pod cannot be kept",
            h.netns.display(),
            h.borrowed
        );
    }
    match podsnap_checkpoint::netlock::close_outside_connections(&MonitorLauncher, &h.netns).await {
        Ok(0) => {}
        Ok(n) => log::info!(
            "pod network {}: closed {n} connections to outside the pod",
            h.netns.display()
        ),
        Err(e) => log::warn!("pod network {}: {e}", h.netns.display()),
    }
}

/// Unlocks the pod's network and takes the lent addresses back: nothing more is waited for.
async fn release_network(h: &mut NetHold) {
    use podsnap_checkpoint::netlock;
    if h.locked {
        netlock::unlock(&MonitorLauncher, &h.netns).await;
        h.locked = false;
    }
    if let Err(e) = netlock::borrow_addresses(&MonitorLauncher, &h.netns, &h.borrowed, false).await {
        log::warn!("pod network {}: {e}", h.netns.display());
    }
    h.borrowed.clear();
    h.waiting.clear();
    h.linked.clear();
    log::info!("pod network {} released", h.netns.display());
}

/// Whether the pod asks for a lazy restore: `podsnap.io/restore-lazy` is `"true"`; absent, empty
/// or `"false"` is an eager one; anything else is refused.
fn lazy_asked(spec: &Spec) -> Result<bool> {
    match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(LAZY_ANNOTATION))
        .map(|v| v.trim())
    {
        None | Some("" | "false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Error::InvalidArgument(format!(
            "{LAZY_ANNOTATION}: {other:?} is neither \"true\" nor \"false\""
        ))),
    }
}

/// kubelet's restart count of a container (0 for its first attempt), when it passes one.
fn restart_count(spec: &Spec) -> Option<u64> {
    spec.annotations()
        .as_ref()?
        .get(RESTART_COUNT_ANNOTATION)?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_name_is_reported_as_the_annotation_it_came_from() {
        // Which names are refused is podsnap_checkpoint::store::resolve's (tested there).
        let t = tempfile::tempdir().expect("tempdir");
        let err = resolve(t.path(), "../outside").expect_err("refused").to_string();
        assert!(
            err.starts_with(&format!("{RESTORE_ANNOTATION}: \"../outside\" is refused: ")),
            "{err}"
        );
        assert!(err.ends_with(&format!("inside {}", t.path().display())), "{err}");
    }

    #[test]
    fn a_pulled_checkpoint_is_named_after_a_valid_sandbox_id_only() {
        let hex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            pulled_name(hex).expect("a CRI sandbox id"),
            "oci-0123456789abcdef"
        );
        assert_eq!(pulled_name("web-1").expect("a short id"), "oci-web-1");
        // A multi-byte character across the 16th byte, a path, and nothing at all: refused
        // with the id quoted, never a panic or a name outside the root.
        for bad in [
            "aaaaaaaaaaaaaaa\u{e9}tail",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
            "../../etc",
            "a/b",
            ".hidden",
            "",
        ] {
            let e = pulled_name(bad).expect_err(bad).to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn layers_compare_only_within_one_snapshotter() {
        let a = vec!["/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/7/fs".to_owned()];
        let b = vec!["/srv/ctr/io.containerd.snapshotter.v1.overlayfs/snapshots/7/fs".to_owned()];
        assert_eq!(
            snapshot_root(&a),
            Some("/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs")
        );
        assert_ne!(snapshot_root(&a), snapshot_root(&b));
        assert_eq!(snapshot_root(&[]), None);
    }

    /// A minimal spec with annotation `key` set to `value`, or without it.
    fn annotated(key: &str, value: Option<&str>) -> Spec {
        let mut a = serde_json::Map::new();
        if let Some(v) = value {
            a.insert(key.into(), v.into());
        }
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "annotations": a
        }))
        .expect("spec")
    }

    #[test]
    fn a_lazy_restore_is_asked_with_true_and_nothing_else() {
        let spec = |value: Option<&str>| annotated(LAZY_ANNOTATION, value);
        assert!(!lazy_asked(&spec(None)).expect("absent"));
        assert!(!lazy_asked(&spec(Some("false"))).expect("false"));
        assert!(!lazy_asked(&spec(Some(""))).expect("empty"));
        assert!(lazy_asked(&spec(Some("true"))).expect("true"));
        let err = lazy_asked(&spec(Some("yes"))).expect_err("refused").to_string();
        assert!(err.contains("podsnap.io/restore-lazy: \"yes\""), "{err}");
    }

    #[test]
    fn restart_counts_come_from_kubelet_annotations() {
        let spec = |count: Option<&str>| annotated(RESTART_COUNT_ANNOTATION, count);
        assert_eq!(restart_count(&spec(None)), None);
        assert_eq!(restart_count(&spec(Some("0"))), Some(0));
        assert_eq!(restart_count(&spec(Some("3"))), Some(3));
        assert_eq!(restart_count(&spec(Some("x"))), None);
    }
}
