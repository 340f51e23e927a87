//! The pod checkpoint on disk, format version 3.
//!
//! ```text
//! <checkpoint>/                          0700, written as <checkpoint>.tmp-<pid> and renamed
//!   manifest.json                        written last (temporary file, fsync, rename)
//!   containers/<name>/spec.dump          the container's OCI spec at dump time
//!   containers/<name>/config.dump        what a KEP-2008 archive's config.dump says (id, name,
//!                                        image, runtime, times): for checkpointctl
//!   containers/<name>/checkpoint/        CRIU images (only containers that were running)
//!   containers/<name>/checkpoint/podsnap-criu.json   CRIU options the dump used
//!   containers/<name>/rootfs-diff.tar    files the container added or changed in its rootfs
//!   containers/<name>/rootfs-deleted.json      paths it removed from its image's files, and
//!                                        directories it replaced whole
//!   containers/<name>/deleted.files      the removed paths as a KEP-2008 archive lists them
//!                                        (a JSON list; written when there are any)
//!   volumes/<volume>.tar                 each emptyDir volume of the pod
//!   pod/dev-shm.tar                      the pod's /dev/shm (its IPC namespace's POSIX shm)
//!   host/cpuinfo.img                     the dumping node's CPU features (CRIU's cpuinfo image)
//! ```
//!
//! Every file is 0600, every directory 0700. `manifest.json` names every other file with its
//! size and digest, and the checkpoint is exactly that: a checkpoint is refused before use when
//! the manifest is missing, too large, of another format or version, or names a digest
//! algorithm this podsnap does not know; when any listed file is
//! missing, of another size or digest, escapes the checkpoint directory or is larger than its
//! cap; and when the directory holds anything the manifest does not list (a file, a symlink, a
//! directory that holds no listed file). [`Manifest::load_listed`] checks all but the digests
//! (cheap: for early, clear errors); [`Manifest::load_verified`] checks the digests too. A
//! restore runs [`Manifest::verify_sealed`], once: the digests, unless the files are still
//! exactly those a dump or pull hashed ([`crate::trust::seal`]).
//!
//! Digests: version 2 (what this code writes) names its algorithm in `digest_algorithm`,
//! `blake3` (hashed on every core: a checkpoint is hundreds of MiB, hashed once at the dump
//! and once at the restore), and each file's `digest` is hex. Version 1 checkpoints (SHA-256,
//! each file's digest under `sha256`) are still read and verified.
//!
//! Container parts: since version 3 a container's directory holds what a KEP-2008 container
//! checkpoint archive (CRI `CheckpointContainer`) holds, under the same names, so that a tar of
//! it is such an archive (`checkpointctl show` reads it). Versions 1 and 2 named the images
//! directory `criu/` and the spec `config.json`, and had no `config.dump` or `deleted.files`:
//! [`Manifest::part_names`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::format::digest::{DigestAlgorithm, FileDigest};
use crate::format::listing::{check_listing, verify_digests};
pub use crate::format::names::{safe_relative, validate_name};
use crate::format::record::{ContainerState, Role};
use crate::fs::read::read_capped;

/// `format` of a podsnap pod checkpoint.
pub const FORMAT: &str = "podsnap.io/pod-checkpoint";
/// The newest version this code reads and writes: 5 for a checkpoint that carries persistent
/// volumes ([`crate::format::persistent::PersistentVolume::carried`]), whose content an older
/// restore would not put back, or whose containers' CRIU ran in the pod's network namespace
/// ([`crate::criu::container::DumpOptions::criu_in_netns`]: images without one, whose
/// processes an older restore would bring back in the host's network); 4 ([`BASE_VERSION`])
/// otherwise.
pub const VERSION: u32 = 5;
/// The version of a checkpoint that carries no volume (4: [`Manifest::unix_links`] and
/// [`Manifest::adopted`], which an older restore would not bring back).
pub const BASE_VERSION: u32 = 4;
/// The oldest version this code reads (SHA-256 digests, no `digest_algorithm`).
pub const OLDEST_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The largest manifest read back.
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
/// The most files a checkpoint may list.
pub const MAX_FILES: usize = 100_000;
/// The largest JSON file of a checkpoint other than the manifest (specs, deletion lists, CRIU
/// options): they are read whole.
pub const MAX_JSON_BYTES: u64 = 16 * 1024 * 1024;
/// What a container's directory holds, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartNames {
    /// The CRIU images directory.
    pub images: &'static str,
    /// The OCI runtime spec.
    pub spec: &'static str,
}

/// The names this code writes: those of a KEP-2008 container checkpoint archive.
pub const PART_NAMES: PartNames = PartNames {
    images: "checkpoint",
    spec: "spec.dump",
};

/// The names of format versions 1 and 2.
const LEGACY_PART_NAMES: PartNames = PartNames {
    images: "criu",
    spec: "config.json",
};

/// A container part's KEP-2008 metadata file (`config.dump`).
pub const CONFIG_DUMP: &str = "config.dump";
/// A container part's archive of its root filesystem changes.
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
/// What a container removed from its image's files, and directories it replaced whole
/// (podsnap's own; what a restore reads).
pub const ROOTFS_DELETED: &str = "rootfs-deleted.json";
/// The removed paths as a KEP-2008 archive lists them (for other tools; never read back).
pub const DELETED_FILES: &str = "deleted.files";

/// The names of a container's files in a checkpoint of format `version`.
pub fn part_names(version: u32) -> PartNames {
    if version >= 3 {
        PART_NAMES
    } else {
        LEGACY_PART_NAMES
    }
}

/// Where the dumping node's CPU features are kept.
pub const CPUINFO: &str = "host/cpuinfo.img";

/// The manifest of a pod checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Seconds since the epoch when the dump finished.
    pub created_unix: u64,
    pub pod: PodInfo,
    pub host: HostInfo,
    /// Whether established TCP connections were captured (they are restored only on request).
    pub tcp_established: bool,
    /// Containers in creation order.
    pub containers: Vec<ContainerEntry>,
    pub volumes: Vec<VolumeEntry>,
    /// How [`Manifest::files`] are digested (absent in version 1: SHA-256).
    #[serde(default)]
    pub digest_algorithm: DigestAlgorithm,
    /// The pod's `/dev/shm` (POSIX shared memory of its IPC namespace), captured once for the
    /// pod: `pod/dev-shm.tar` relative to the checkpoint root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_shm: Option<String>,
    /// The SysV IPC objects of the pod's IPC namespace, captured once for the pod:
    /// [`crate::format::layout::SYSV_STATE`] (and a data file per segment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sysv_ipc: Option<String>,
    /// Containers at either end of a TCP connection over loopback to another container of the
    /// pod: a restore keeps the pod's network locked until all of them are back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loopback_linked: Vec<String>,
    /// Connected unix sockets with one end in each of two containers of the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unix_links: Vec<UnixLink>,
    /// Processes the pod's pause process adopted, each dumped with its descendants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adopted: Vec<AdoptedProcess>,
    /// What became of the pod at the dump (absent for older writers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_dump: Option<crate::format::persistent::AfterDump>,
    /// Volumes the pod mounts that the checkpoint does not carry, with the files its processes
    /// held open on them: a restore checks them before it creates anything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persistent_volumes: Vec<crate::format::persistent::PersistentVolume>,
    /// Every other file of the checkpoint, by path relative to its root.
    pub files: BTreeMap<String, FileDigest>,
    /// How the dump went (informational).
    #[serde(default)]
    pub stats: DumpStats,
}

/// A connected unix socket with its two ends in two containers of the pod. Each container's
/// CRIU dumps its end as external (`external unix[INO]`, with what sat in its receive queue);
/// a restore makes one new connected pair and hands each container's CRIU its end
/// (`inherit-fd`), the queued bytes already in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixLink {
    pub kind: UnixKind,
    pub ends: [UnixEnd; 2],
}

/// The kind of a linked unix socket (a connected datagram socket is not linked: refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnixKind {
    Stream,
    Seqpacket,
}

impl UnixKind {
    /// The socket type (`SOCK_STREAM`, `SOCK_SEQPACKET`).
    pub fn socket_type(self) -> u32 {
        match self {
            UnixKind::Stream => libc::SOCK_STREAM as u32,
            UnixKind::Seqpacket => libc::SOCK_SEQPACKET as u32,
        }
    }
}

/// One end of a [`UnixLink`]: the container holding it and the socket's inode at the dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixEnd {
    pub container: String,
    pub ino: u64,
}

impl UnixEnd {
    /// The CRIU images of its container, relative to the checkpoint root.
    pub fn images(&self, names: PartNames) -> String {
        format!("containers/{}/{}", self.container, names.images)
    }
}

/// A process of a container that the pod's pause process adopted (a server's double fork, in a
/// pod sharing one PID namespace), with its descendants: outside its container's process tree,
/// it is dumped by a CRIU run of its own into [`AdoptedProcess::images`] and restored beside
/// its container, into its container's cgroup, with its PID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedProcess {
    pub container: String,
    /// Its PID in the pod's PID namespace (the root of what was dumped).
    pub pid: u32,
}

impl AdoptedProcess {
    /// Its CRIU images, relative to the checkpoint root.
    pub fn images(&self, names: PartNames) -> String {
        format!(
            "containers/{}/adopted/{}/{}",
            self.container, self.pid, names.images
        )
    }
}

/// The most adopted processes a checkpoint may record.
pub const MAX_ADOPTED: usize = 1024;

/// The most unix links a checkpoint may record.
pub const MAX_UNIX_LINKS: usize = 1024;

/// Timings of the dump that wrote a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpStats {
    /// First freeze to last thaw, in microseconds.
    pub frozen_us: u64,
    /// The slowest single container's CRIU dump, in microseconds.
    pub slowest_dump_us: u64,
}

/// Who the pod was.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    /// The sandbox id at dump time.
    pub sandbox_id: String,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub uid: Option<String>,
    pub hostname: Option<String>,
    /// The pod's annotations at dump time (from the sandbox spec), for a faithful re-creation.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The CRI PodSandboxConfig as JSON, when the dump was driven through CRI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cri_config: Option<serde_json::Value>,
    /// The pod's addresses at dump time (its network namespace's global addresses): the local
    /// addresses of its connections to outside.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<std::net::IpAddr>,
}

/// Where the checkpoint was taken: restore on a different CRIU or architecture may fail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub criu_version: String,
    pub runc_version: String,
    pub kernel: String,
    pub arch: String,
    /// The node's identity (`/etc/machine-id`): node-local facts (image layers) are compared
    /// only on the node that recorded them.
    #[serde(default)]
    pub node_id: String,
}

/// One container of the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerEntry {
    /// Name in the pod (a directory name under `containers/`).
    pub name: String,
    /// Container id at dump time.
    pub id: String,
    pub role: Role,
    pub image: Option<String>,
    /// The image id (digest, CRI's image ref), when the dump could ask CRI for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// The image pinned by its manifest digest (`registry/repo@sha256:...`, one of CRI's repo
    /// digests of the image), when the node knew where it came from: a restore on a node that
    /// lacks the image pulls exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// The overlay lower directories of the container's root filesystem, top first: the
    /// image's layers on the node that took the checkpoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rootfs_layers: Vec<String>,
    pub created_order: u64,
    pub started_order: Option<u64>,
    pub state: ContainerState,
    pub exit_code: Option<u32>,
    /// Whether CRIU images were taken (running or paused containers).
    pub dumped: bool,
    /// The CRI ContainerConfig as JSON, when the dump was driven through CRI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cri_config: Option<serde_json::Value>,
}

impl ContainerEntry {
    /// A completed container (an init container that ran to the end): recorded, not dumped,
    /// never run again.
    pub fn completed(&self) -> bool {
        self.state == ContainerState::Stopped && self.exit_code == Some(0)
    }

    /// `containers/<name>` relative to the checkpoint root.
    pub fn dir(&self) -> PathBuf {
        Path::new("containers").join(&self.name)
    }

    /// `containers/<name>/<file>` as the manifest lists it.
    pub fn file(&self, file: &str) -> String {
        format!("containers/{}/{file}", self.name)
    }
}

/// An emptyDir volume of the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub name: String,
    /// `volumes/<name>.tar` relative to the checkpoint root.
    pub archive: String,
    /// Where containers mounted it.
    pub mounts: Vec<VolumeMount>,
}

/// One container's mount of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    pub container: String,
    pub path: String,
}

impl Manifest {
    /// The container named `name`.
    pub fn container(&self, name: &str) -> Option<&ContainerEntry> {
        self.containers.iter().find(|c| c.name == name)
    }

    /// Containers to bring back, in their recorded start order: the sandbox first, then those
    /// that were started (sidecars before apps as they were started), then created ones.
    pub fn restore_order(&self) -> Vec<&ContainerEntry> {
        let mut v: Vec<_> = self.containers.iter().collect();
        v.sort_by_key(|c| {
            (
                c.role != Role::Sandbox,
                c.started_order.unwrap_or(u64::MAX),
                c.created_order,
            )
        });
        v
    }

    /// Parses a manifest and checks its format, version and paths (not the files).
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        #[derive(Deserialize)]
        struct Head {
            format: String,
            version: u32,
            #[serde(default)]
            digest_algorithm: Option<serde_json::Value>,
        }
        let invalid = |reason: String| Error::InvalidCheckpoint {
            path: PathBuf::from(MANIFEST),
            reason,
        };
        let head: Head =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a manifest: {e}")))?;
        if head.format != FORMAT {
            return Err(invalid(format!("format {:?} is not {FORMAT:?}", head.format)));
        }
        if !(OLDEST_VERSION..=VERSION).contains(&head.version) {
            return Err(invalid(format!(
                "format version {} is not supported (this podsnap reads versions {OLDEST_VERSION} to {VERSION})",
                head.version
            )));
        }
        match (&head.digest_algorithm, head.version) {
            (None, 1) => {}
            (None, _) => {
                return Err(invalid(format!(
                    "format version {} names no digest_algorithm",
                    head.version
                )))
            }
            (Some(serde_json::Value::String(name)), 1) if name == "sha256" => {}
            (Some(_), 1) => {
                return Err(invalid("format version 1 digests with SHA-256 only".into()));
            }
            (Some(serde_json::Value::String(name)), _) if DigestAlgorithm::KNOWN.contains(&name.as_str()) => {
            }
            (Some(other), _) => {
                return Err(invalid(format!(
                    "digest algorithm {other} is not supported (this podsnap verifies {})",
                    DigestAlgorithm::KNOWN.join(" and ")
                )))
            }
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        if m.files.len() > MAX_FILES {
            return Err(invalid(format!(
                "lists {} files, more than {MAX_FILES}",
                m.files.len()
            )));
        }
        for path in m.files.keys() {
            safe_relative(path).map_err(invalid)?;
        }
        for (path, f) in &m.files {
            if path.ends_with(".json") && f.size > MAX_JSON_BYTES {
                return Err(invalid(format!(
                    "{path} has {} bytes, more than the {MAX_JSON_BYTES} a checkpoint's JSON file may have",
                    f.size
                )));
            }
        }
        let mut names = std::collections::HashSet::new();
        for c in &m.containers {
            validate_name(&c.name).map_err(invalid)?;
            if !names.insert(c.name.as_str()) {
                return Err(invalid(format!("container {:?} is listed twice", c.name)));
            }
            if c.state == ContainerState::Stopped && c.exit_code.is_none() {
                return Err(invalid(format!(
                    "container {:?} is recorded as exited without an exit code",
                    c.name
                )));
            }
            let inventory = format!("{}/inventory.img", m.part_names().images);
            if c.dumped && !m.files.contains_key(&c.file(&inventory)) {
                return Err(invalid(format!(
                    "container {:?} is recorded as dumped but its CRIU images are not listed",
                    c.name
                )));
            }
        }
        for v in &m.volumes {
            validate_name(&v.name).map_err(invalid)?;
            safe_relative(&v.archive).map_err(invalid)?;
        }
        for v in &m.persistent_volumes {
            if let Some(a) = &v.carried {
                safe_relative(a).map_err(invalid)?;
                if !a.starts_with("volumes/") || !m.files.contains_key(a) {
                    return Err(invalid(format!(
                        "the content of volume {} is said to be {a:?}, which is not a listed archive under volumes/",
                        v.label()
                    )));
                }
            }
        }
        if let Some(a) = &m.dev_shm {
            safe_relative(a).map_err(invalid)?;
        }
        check_unix_links(&m).map_err(invalid)?;
        check_adopted(&m).map_err(invalid)?;
        if let Some(a) = m
            .sysv_ipc
            .as_deref()
            .filter(|a| *a != crate::format::layout::SYSV_STATE)
        {
            return Err(invalid(format!(
                "the SysV IPC state is {a:?}, not {:?}",
                crate::format::layout::SYSV_STATE
            )));
        }
        Ok(m)
    }

    /// Reads `<dir>/manifest.json` and checks the checkpoint is exactly what it lists, with
    /// the listed sizes; digests are not read (see [`Manifest::load_verified`]).
    pub fn load_listed(dir: &Path) -> Result<Manifest> {
        let invalid = |reason: String| Error::InvalidCheckpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let path = dir.join(MANIFEST);
        let bytes =
            read_capped(&path, MAX_MANIFEST_BYTES).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
        let m = Manifest::parse(&bytes).map_err(|e| match e {
            Error::InvalidCheckpoint { reason, .. } => invalid(reason),
            other => other,
        })?;
        check_listing(dir, &m.files).map_err(invalid)?;
        Ok(m)
    }

    /// [`Manifest::load_listed`], then every listed file's digest.
    pub fn load_verified(dir: &Path) -> Result<Manifest> {
        let m = Self::load_listed(dir)?;
        m.verify(dir)?;
        Ok(m)
    }

    /// Checks every listed file's digest in `dir` (for a manifest read by
    /// [`Manifest::load_listed`], whose checks already passed).
    pub fn verify(&self, dir: &Path) -> Result<()> {
        verify_digests(dir, self.digest_algorithm, &self.files).map_err(|reason| Error::InvalidCheckpoint {
            path: dir.to_path_buf(),
            reason,
        })
    }

    /// The names of a container's files in this checkpoint (by its format version).
    pub fn part_names(&self) -> PartNames {
        part_names(self.version)
    }

    /// Whether the checkpoint lists `rel` (relative to its root).
    pub fn lists(&self, rel: &str) -> bool {
        self.files.contains_key(rel)
    }
}

/// Checks the recorded adopted processes: of dumped containers, each once, with CRIU images.
fn check_adopted(m: &Manifest) -> std::result::Result<(), String> {
    if m.adopted.len() > MAX_ADOPTED {
        return Err(format!(
            "records {} adopted processes, more than {MAX_ADOPTED}",
            m.adopted.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for a in &m.adopted {
        if !m.container(&a.container).is_some_and(|c| c.dumped) {
            return Err(format!(
                "an adopted process names container {:?}, which the checkpoint holds no images of",
                a.container
            ));
        }
        // The kernel's largest PID_MAX_LIMIT.
        if !(2..=4_194_304).contains(&a.pid) || !seen.insert(a.pid) {
            return Err(format!(
                "adopted process {} is not a valid, single process id",
                a.pid
            ));
        }
        let inventory = format!("{}/inventory.img", a.images(m.part_names()));
        if !m.files.contains_key(&inventory) {
            return Err(format!(
                "adopted process {} of container {:?} has no CRIU images listed",
                a.pid, a.container
            ));
        }
    }
    Ok(())
}

/// Checks the recorded unix socket links: between two dumped containers, each socket once.
fn check_unix_links(m: &Manifest) -> std::result::Result<(), String> {
    if m.unix_links.len() > MAX_UNIX_LINKS {
        return Err(format!(
            "records {} unix socket links, more than {MAX_UNIX_LINKS}",
            m.unix_links.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for link in &m.unix_links {
        let [a, b] = &link.ends;
        if a.container == b.container {
            return Err(format!(
                "a unix socket link has both ends in container {:?}",
                a.container
            ));
        }
        for end in &link.ends {
            if !m.container(&end.container).is_some_and(|c| c.dumped) {
                return Err(format!(
                    "a unix socket link names container {:?}, which the checkpoint holds no images of",
                    end.container
                ));
            }
            if end.ino == 0 || end.ino > u64::from(u32::MAX) {
                return Err(format!("a unix socket link names socket inode {}", end.ino));
            }
            if !seen.insert((end.container.as_str(), end.ino)) {
                return Err(format!(
                    "socket {} of container {:?} is linked twice",
                    end.ino, end.container
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod proptests;
