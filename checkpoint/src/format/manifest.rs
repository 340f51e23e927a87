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
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::record::{ContainerState, Role};
use crate::fs::read::{read_capped, read_full};

/// `format` of a podsnap pod checkpoint.
pub const FORMAT: &str = "podsnap.io/pod-checkpoint";
/// The version this code writes (4: [`Manifest::unix_links`] and [`Manifest::adopted`], which
/// an older restore would not bring back).
pub const VERSION: u32 = 4;
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

/// A file's size and content digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    /// Hex, of the manifest's [`DigestAlgorithm`] (`sha256` in version 1 manifests).
    #[serde(alias = "sha256")]
    pub digest: String,
}

/// The digest algorithm of a checkpoint's files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestAlgorithm {
    /// Version 1 checkpoints.
    #[default]
    Sha256,
    /// What this code writes.
    Blake3,
}

impl DigestAlgorithm {
    /// The algorithm new checkpoints are written with.
    pub const WRITTEN: DigestAlgorithm = DigestAlgorithm::Blake3;
    /// The names a manifest may give.
    pub const KNOWN: [&'static str; 2] = ["sha256", "blake3"];

    /// The name a manifest gives it.
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Blake3 => "blake3",
        }
    }

    /// The hex digest of the file at `path`.
    pub fn file(self, path: &Path) -> std::io::Result<String> {
        match self {
            DigestAlgorithm::Sha256 => sha256_file(path),
            DigestAlgorithm::Blake3 => blake3_file(path),
        }
    }

    /// The display name in messages.
    fn shown(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "SHA-256",
            DigestAlgorithm::Blake3 => "BLAKE3",
        }
    }
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

/// The checkpoint directory holds exactly the manifest and the listed files, each a regular
/// file of its listed size; directories only where a listed file needs them.
fn check_listing(dir: &Path, files: &BTreeMap<String, FileDigest>) -> std::result::Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let mut needed_dirs = std::collections::HashSet::new();
    for rel in files.keys() {
        let mut p = Path::new(rel).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            needed_dirs.insert(d.to_path_buf());
            p = d.parent();
        }
    }
    let mut seen = 0usize;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let abs = dir.join(&rel_dir);
        let entries = std::fs::read_dir(&abs).map_err(|e| format!("{}: {e}", abs.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", abs.display()))?;
            let rel = rel_dir.join(entry.file_name());
            let rel_str = rel.to_string_lossy().into_owned();
            let ft = entry.file_type().map_err(|e| format!("{rel_str}: {e}"))?;
            if ft.is_dir() {
                if !needed_dirs.contains(&rel) {
                    return Err(format!(
                        "{rel_str}/ is not part of the checkpoint (the manifest lists nothing in it)"
                    ));
                }
                stack.push(rel);
            } else if ft.is_file() {
                if rel_str == MANIFEST {
                    continue;
                }
                let Some(want) = files.get(&rel_str) else {
                    return Err(format!("{rel_str} is not listed in the manifest"));
                };
                let len = entry.metadata().map_err(|e| format!("{rel_str}: {e}"))?.len();
                if len != want.size {
                    return Err(format!(
                        "{rel_str} has {len} bytes, the manifest says {}",
                        want.size
                    ));
                }
                seen += 1;
            } else {
                let kind = if ft.is_symlink() {
                    "a symlink"
                } else if ft.is_fifo() {
                    "a FIFO"
                } else if ft.is_socket() {
                    "a socket"
                } else {
                    "a device node"
                };
                return Err(format!("{rel_str} is {kind}, not a regular file"));
            }
        }
    }
    if seen != files.len() {
        let missing = files
            .keys()
            .find(|rel| !dir.join(rel).is_file())
            .cloned()
            .unwrap_or_default();
        return Err(format!("{missing}: listed in the manifest but missing"));
    }
    Ok(())
}

/// Checks every file's digest, largest files first, on as many threads as there are cores.
fn verify_digests(
    dir: &Path,
    algorithm: DigestAlgorithm,
    files: &BTreeMap<String, FileDigest>,
) -> std::result::Result<(), String> {
    let mut todo: Vec<(&String, &FileDigest)> = files.iter().collect();
    todo.sort_by_key(|(_, d)| std::cmp::Reverse(d.size));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(todo.len().max(1));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((rel, want)) = todo.get(i) else {
                        return Ok(());
                    };
                    let got = algorithm
                        .file(&dir.join(rel))
                        .map_err(|e| format!("{rel}: {e}"))?;
                    if got != want.digest {
                        // Stop the other workers early.
                        next.store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
                        return Err(format!(
                            "{rel} is damaged: its {} does not match the manifest",
                            algorithm.shown()
                        ));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a digest worker panicked".into()))
            })
            .collect::<std::result::Result<Vec<()>, String>>()
            .map(drop)
    })
}

/// The SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The BLAKE3 digest of a file, hex: read in large blocks, each hashed on every core (rayon),
/// so one large file (a container's memory) is not left to one core.
pub fn blake3_file(path: &Path) -> std::io::Result<String> {
    /// Below this a block is hashed on the calling thread (splitting costs more than it saves).
    const PARALLEL_FROM: usize = 256 * 1024;
    let mut f = std::fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        if n >= PARALLEL_FROM {
            h.update_rayon(&buf[..n]);
        } else {
            h.update(&buf[..n]);
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// A file's digest computed over its bytes as they pass (a pull checks each file as it writes
/// it instead of reading the checkpoint again).
pub enum StreamDigest {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl StreamDigest {
    pub fn new(algorithm: DigestAlgorithm) -> Self {
        match algorithm {
            DigestAlgorithm::Sha256 => StreamDigest::Sha256(Sha256::new()),
            DigestAlgorithm::Blake3 => StreamDigest::Blake3(Box::default()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        /// Below this a block is hashed on the calling thread.
        const PARALLEL_FROM: usize = 256 * 1024;
        match self {
            StreamDigest::Sha256(h) => h.update(bytes),
            StreamDigest::Blake3(h) if bytes.len() >= PARALLEL_FROM => {
                h.update_rayon(bytes);
            }
            StreamDigest::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// Hex, as the manifest lists it.
    pub fn finish(self) -> String {
        match self {
            StreamDigest::Sha256(h) => hex::encode(h.finalize()),
            StreamDigest::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

/// Accepts a relative path that stays inside its root: no absolute paths, no `..`.
pub fn safe_relative(path: &str) -> std::result::Result<&Path, String> {
    let p = Path::new(path);
    if path.is_empty() || p.is_absolute() {
        return Err(format!("path {path:?} is not relative"));
    }
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("path {path:?} leaves the checkpoint"));
    }
    Ok(p)
}

/// Container and volume names become directory names: letters, digits, `-`, `_`, `.`, and not
/// `.` or `..`.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid container or volume name"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            created_unix: 1,
            pod: PodInfo {
                sandbox_id: "sb".into(),
                name: Some("webapp-123".into()),
                ..Default::default()
            },
            host: HostInfo::default(),
            tcp_established: false,
            containers: vec![
                ContainerEntry {
                    name: "app".into(),
                    id: "c2".into(),
                    role: Role::Container,
                    image: None,
                    image_id: None,
                    image_digest: None,
                    rootfs_layers: vec![],
                    created_order: 3,
                    started_order: Some(3),
                    state: ContainerState::Running,
                    exit_code: None,
                    dumped: false,
                    cri_config: None,
                },
                ContainerEntry {
                    name: "webapp-123".into(),
                    id: "sb".into(),
                    role: Role::Sandbox,
                    image: None,
                    image_id: None,
                    image_digest: None,
                    rootfs_layers: vec![],
                    created_order: 1,
                    started_order: Some(1),
                    state: ContainerState::Running,
                    exit_code: None,
                    dumped: false,
                    cri_config: None,
                },
                ContainerEntry {
                    name: "sidecar".into(),
                    id: "c1".into(),
                    role: Role::Container,
                    image: None,
                    image_id: None,
                    image_digest: None,
                    rootfs_layers: vec![],
                    created_order: 2,
                    started_order: Some(2),
                    state: ContainerState::Running,
                    exit_code: None,
                    dumped: false,
                    cri_config: None,
                },
            ],
            volumes: vec![],
            digest_algorithm: DigestAlgorithm::WRITTEN,
            dev_shm: None,
            sysv_ipc: None,
            loopback_linked: Vec::new(),
            unix_links: Vec::new(),
            adopted: Vec::new(),
            files: BTreeMap::new(),
            stats: DumpStats::default(),
        }
    }

    #[test]
    fn restore_order_is_sandbox_then_start_order() {
        let m = sample();
        let names: Vec<_> = m.restore_order().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["webapp-123", "sidecar", "app"]);
    }

    #[test]
    fn dumped_containers_need_their_images_under_the_versions_name() {
        let digest = || FileDigest {
            size: 1,
            digest: "00".into(),
        };
        for (version, images, other) in [(3, "checkpoint", "criu"), (2, "criu", "checkpoint")] {
            let mut m = sample();
            m.version = version;
            m.containers[0].dumped = true;
            m.files
                .insert(format!("containers/app/{other}/inventory.img"), digest());
            let err = Manifest::parse(&serde_json::to_vec(&m).expect("json"))
                .expect_err("the images under the other version's name");
            assert!(err.to_string().contains("CRIU images are not listed"), "{err}");
            m.files
                .insert(format!("containers/app/{images}/inventory.img"), digest());
            let parsed = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect("valid");
            assert_eq!(parsed.part_names().images, images, "version {version}");
        }
        assert_eq!(part_names(1).spec, "config.json");
        assert_eq!(part_names(VERSION).spec, "spec.dump");
    }

    #[test]
    fn unknown_version_and_format_are_refused() {
        let mut m = sample();
        m.version = VERSION + 1;
        let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("newer");
        assert!(
            err.to_string()
                .contains(&format!("format version {} is not supported", VERSION + 1)),
            "{err}"
        );
        let mut m = sample();
        m.format = "other".into();
        assert!(Manifest::parse(&serde_json::to_vec(&m).expect("json")).is_err());
    }

    #[test]
    fn escaping_paths_are_refused() {
        for bad in ["/etc/passwd", "../x", "a/../../b", ""] {
            let mut m = sample();
            m.files.insert(
                bad.into(),
                FileDigest {
                    size: 0,
                    digest: String::new(),
                },
            );
            assert!(
                Manifest::parse(&serde_json::to_vec(&m).expect("json")).is_err(),
                "{bad:?} accepted"
            );
        }
        let mut m = sample();
        m.containers[0].name = "..".into();
        assert!(Manifest::parse(&serde_json::to_vec(&m).expect("json")).is_err());
    }

    fn write_checkpoint(dir: &Path) -> Manifest {
        let mut m = sample();
        std::fs::create_dir_all(dir.join("containers/app")).expect("mkdir");
        std::fs::write(dir.join("containers/app/config.json"), b"{}").expect("write");
        m.files.insert(
            "containers/app/config.json".into(),
            FileDigest {
                size: 2,
                digest: DigestAlgorithm::WRITTEN
                    .file(&dir.join("containers/app/config.json"))
                    .expect("digest"),
            },
        );
        std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).expect("json")).expect("write");
        m
    }

    #[test]
    fn verified_load_catches_flipped_byte_and_missing_file() {
        let root = tempfile::tempdir().expect("tempdir");
        let m = write_checkpoint(root.path());
        assert_eq!(Manifest::load_verified(root.path()).expect("valid"), m);
        std::fs::write(root.path().join("containers/app/config.json"), b"{]").expect("flip");
        let err = Manifest::load_verified(root.path())
            .expect_err("flipped")
            .to_string();
        assert!(err.contains("is damaged"), "{err}");
        std::fs::remove_file(root.path().join("containers/app/config.json")).expect("rm");
        let err = Manifest::load_verified(root.path())
            .expect_err("missing")
            .to_string();
        assert!(err.contains("containers/app/config.json"), "{err}");
    }

    #[test]
    fn the_digest_algorithm_is_named_and_an_unknown_one_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path();
        write_checkpoint(dir);
        let path = dir.join(MANIFEST);
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(written["digest_algorithm"], "blake3");
        assert_eq!(written["version"], VERSION);
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut m = written.clone();
            f(&mut m);
            std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write");
            Manifest::load_verified(dir).map_err(|e| e.to_string())
        };
        for (what, change) in [
            (
                "unknown",
                &(|m: &mut serde_json::Value| m["digest_algorithm"] = "md5".into())
                    as &dyn Fn(&mut serde_json::Value),
            ),
            ("not a name", &|m: &mut serde_json::Value| {
                m["digest_algorithm"] = 3.into()
            }),
        ] {
            let err = edit(change).expect_err(what);
            assert!(
                err.contains("is not supported (this podsnap verifies sha256 and blake3)"),
                "{what}: {err}"
            );
        }
        let err = edit(&|m| {
            m.as_object_mut().expect("object").remove("digest_algorithm");
        })
        .expect_err("unnamed");
        assert!(err.contains("names no digest_algorithm"), "{err}");
        // The BLAKE3 digest verified as SHA-256 (a downgrade) does not match.
        let err = edit(&|m| m["digest_algorithm"] = "sha256".into()).expect_err("other algorithm");
        assert!(err.contains("its SHA-256 does not match"), "{err}");
        edit(&|_| {}).expect("as written");
    }

    #[test]
    fn version_1_checkpoints_still_verify_with_sha256() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path();
        write_checkpoint(dir);
        let file = dir.join("containers/app/config.json");
        let path = dir.join(MANIFEST);
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        m["version"] = 1.into();
        m.as_object_mut().expect("object").remove("digest_algorithm");
        m["files"]["containers/app/config.json"] = serde_json::json!({
            "size": 2, "sha256": sha256_file(&file).expect("digest")
        });
        std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write");
        let loaded = Manifest::load_verified(dir).expect("a version 1 checkpoint verifies");
        assert_eq!(loaded.digest_algorithm, DigestAlgorithm::Sha256);
        std::fs::write(&file, b"{]").expect("flip");
        let err = Manifest::load_verified(dir).expect_err("flipped").to_string();
        assert!(err.contains("its SHA-256 does not match"), "{err}");
        m["digest_algorithm"] = "blake3".into();
        std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write");
        let err = Manifest::load_listed(dir)
            .expect_err("v1 with blake3")
            .to_string();
        assert!(err.contains("version 1 digests with SHA-256 only"), "{err}");
    }

    #[test]
    fn blake3_digests_match_the_reference_and_span_blocks() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("f");
        // Larger than one read block, not a multiple of it.
        let data: Vec<u8> = (0..(9u32 << 20) + 12345).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).expect("write");
        assert_eq!(
            blake3_file(&p).expect("digest"),
            blake3::hash(&data).to_hex().to_string()
        );
        std::fs::write(&p, b"").expect("write");
        assert_eq!(
            blake3_file(&p).expect("digest"),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn unlisted_files_and_directories_are_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path();
        write_checkpoint(dir);
        Manifest::load_listed(dir).expect("exactly as listed");
        std::fs::write(dir.join("containers/app/rootfs-diff.tar"), b"sneaked in").expect("write");
        let err = Manifest::load_listed(dir).expect_err("unlisted").to_string();
        assert!(err.contains("rootfs-diff.tar is not listed"), "{err}");
        std::fs::remove_file(dir.join("containers/app/rootfs-diff.tar")).expect("rm");
        std::fs::create_dir(dir.join("volumes")).expect("mkdir");
        let err = Manifest::load_listed(dir).expect_err("empty dir").to_string();
        assert!(err.contains("volumes/ is not part of the checkpoint"), "{err}");
        std::fs::remove_dir(dir.join("volumes")).expect("rm");
        std::os::unix::fs::symlink("/etc/passwd", dir.join("containers/x")).expect("symlink");
        let err = Manifest::load_listed(dir).expect_err("symlink").to_string();
        assert!(err.contains("containers/x is a symlink"), "{err}");
        std::fs::remove_file(dir.join("containers/x")).expect("rm");
        std::fs::write(dir.join("containers/app/config.json"), b"{}\n").expect("grow");
        let err = Manifest::load_listed(dir).expect_err("size").to_string();
        assert!(err.contains("has 3 bytes, the manifest says 2"), "{err}");
    }

    #[test]
    fn caps_and_recorded_states_are_checked() {
        let mut m = sample();
        m.files.insert(
            "containers/app/config.json".into(),
            FileDigest {
                size: MAX_JSON_BYTES + 1,
                digest: String::new(),
            },
        );
        let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("cap");
        assert!(err.to_string().contains("more than"), "{err}");
        let mut m = sample();
        m.containers[0].state = ContainerState::Stopped;
        let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("exit code");
        assert!(err.to_string().contains("without an exit code"), "{err}");
        let mut m = sample();
        m.containers[0].dumped = true;
        let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("images");
        assert!(err.to_string().contains("CRIU images are not listed"), "{err}");
        let mut m = sample();
        m.containers[2].name = "app".into();
        assert!(Manifest::parse(&serde_json::to_vec(&m).expect("json")).is_err());
    }

    #[test]
    fn unix_links_are_checked() {
        let end = |container: &str, ino: u64| UnixEnd {
            container: container.into(),
            ino,
        };
        // `sidecar` and `app` dumped, their images listed.
        let dumped = || {
            let mut m = sample();
            for c in m.containers.iter_mut().filter(|c| c.name != "webapp-123") {
                c.dumped = true;
                let inventory = c.file("checkpoint/inventory.img");
                m.files.insert(
                    inventory,
                    FileDigest {
                        size: 0,
                        digest: String::new(),
                    },
                );
            }
            m
        };
        let with = |ends: [UnixEnd; 2]| {
            let mut m = dumped();
            m.unix_links.push(UnixLink {
                kind: UnixKind::Stream,
                ends,
            });
            Manifest::parse(&serde_json::to_vec(&m).expect("json"))
        };
        let ok = with([end("app", 10), end("sidecar", 11)]).expect("a link between two dumped containers");
        assert_eq!(ok.unix_links.len(), 1);
        for (ends, says) in [
            ([end("app", 10), end("app", 11)], "both ends"),
            ([end("app", 10), end("webapp-123", 11)], "holds no images"),
            ([end("app", 10), end("nobody", 11)], "holds no images"),
            ([end("app", 0), end("sidecar", 11)], "inode 0"),
            ([end("app", 1 << 40), end("sidecar", 11)], "inode"),
        ] {
            let err = with(ends).expect_err("refused").to_string();
            assert!(err.contains(says), "{says}: {err}");
        }
        let mut m = dumped();
        let link = UnixLink {
            kind: UnixKind::Stream,
            ends: [end("app", 10), end("sidecar", 11)],
        };
        m.unix_links = vec![link.clone(), link];
        let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("twice");
        assert!(err.to_string().contains("linked twice"), "{err}");
    }

    #[test]
    fn adopted_processes_are_checked() {
        let mut m = sample();
        m.containers[2].dumped = true;
        let listed = |m: &mut Manifest, rel: String| {
            m.files.insert(
                rel,
                FileDigest {
                    size: 0,
                    digest: String::new(),
                },
            )
        };
        let images = m.containers[2].file("checkpoint/inventory.img");
        listed(&mut m, images);
        let adopted = AdoptedProcess {
            container: m.containers[2].name.clone(),
            pid: 12,
        };
        listed(&mut m, format!("{}/inventory.img", adopted.images(PART_NAMES)));
        m.adopted.push(adopted.clone());
        let parse = |m: &Manifest| Manifest::parse(&serde_json::to_vec(m).expect("json"));
        assert_eq!(parse(&m).expect("valid").adopted, vec![adopted.clone()]);
        for (edit, says) in [
            (
                AdoptedProcess {
                    pid: 13,
                    ..adopted.clone()
                },
                "no CRIU images",
            ),
            (
                AdoptedProcess {
                    pid: 1,
                    ..adopted.clone()
                },
                "not a valid",
            ),
            (
                AdoptedProcess {
                    pid: 1 << 30,
                    ..adopted.clone()
                },
                "not a valid",
            ),
            (
                AdoptedProcess {
                    container: "app".into(),
                    ..adopted.clone()
                },
                "holds no images",
            ),
        ] {
            let mut bad = m.clone();
            bad.adopted = vec![edit];
            let err = parse(&bad).expect_err("refused").to_string();
            assert!(err.contains(says), "{says}: {err}");
        }
        let mut twice = m.clone();
        twice.adopted.push(adopted);
        assert!(parse(&twice).expect_err("twice").to_string().contains("single"));
    }

    /// Property: arbitrary bytes never make the parser panic, and whatever it accepts has only
    /// safe paths and names.
    #[test]
    fn parser_survives_arbitrary_input() {
        let base = serde_json::to_vec(&sample()).expect("json");
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5000 {
            let mut bytes = base.clone();
            let flips = 1 + (next() % 8) as usize;
            for _ in 0..flips {
                let i = (next() as usize) % bytes.len();
                bytes[i] = (next() & 0xff) as u8;
            }
            if next() % 4 == 0 {
                bytes.truncate((next() as usize) % bytes.len());
            }
            if let Ok(m) = Manifest::parse(&bytes) {
                assert!(m.files.keys().all(|p| safe_relative(p).is_ok()));
                assert!(m.containers.iter().all(|c| validate_name(&c.name).is_ok()));
            }
        }
    }
}

#[cfg(test)]
mod proptests;
