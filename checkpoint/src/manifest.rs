//! The pod checkpoint on disk, format version 1.
//!
//! ```text
//! <checkpoint>/                          0700, written as <checkpoint>.tmp-<pid> and renamed
//!   manifest.json                        written last (temporary file, fsync, rename)
//!   containers/<name>/config.json        the container's OCI spec at dump time
//!   containers/<name>/criu/              CRIU images (only containers that were running)
//!   containers/<name>/criu/podsnap-criu.json   CRIU options the dump used
//!   containers/<name>/rootfs-diff.tar    files the container added or changed in its rootfs
//!   containers/<name>/rootfs-deleted.json      paths it removed from its image's files
//!   volumes/<volume>.tar                 each emptyDir volume of the pod
//! ```
//!
//! Every file is 0600. `manifest.json` names every other file with its size and SHA-256; a
//! checkpoint is refused before use when the manifest is missing, too large, of another format
//! or version, or when any listed file is missing, of another size or digest, or escapes the
//! checkpoint directory.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::record::{ContainerState, Role};

/// `format` of a podsnap pod checkpoint.
pub const FORMAT: &str = "podsnap.io/pod-checkpoint";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The largest manifest read back.
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
/// The most files a checkpoint may list.
pub const MAX_FILES: usize = 100_000;

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
    /// Every other file of the checkpoint, by path relative to its root.
    pub files: BTreeMap<String, FileDigest>,
    /// How the dump went (informational).
    #[serde(default)]
    pub stats: DumpStats,
}

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
}

/// Where the checkpoint was taken: restore on a different CRIU or architecture may fail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub criu_version: String,
    pub runc_version: String,
    pub kernel: String,
    pub arch: String,
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
    pub sha256: String,
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
        if head.version != VERSION {
            return Err(invalid(format!(
                "format version {} is not supported (this podsnap reads version {VERSION})",
                head.version
            )));
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
        for c in &m.containers {
            validate_name(&c.name).map_err(invalid)?;
        }
        for v in &m.volumes {
            validate_name(&v.name).map_err(invalid)?;
            safe_relative(&v.archive).map_err(invalid)?;
        }
        Ok(m)
    }

    /// Reads `<dir>/manifest.json` and verifies every file it lists (size, then SHA-256).
    pub fn load_verified(dir: &Path) -> Result<Manifest> {
        let invalid = |reason: String| Error::InvalidCheckpoint {
            path: dir.to_path_buf(),
            reason,
        };
        let path = dir.join(MANIFEST);
        let meta = std::fs::metadata(&path).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(invalid(format!(
                "{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
        let m = Manifest::parse(&bytes).map_err(|e| match e {
            Error::InvalidCheckpoint { reason, .. } => invalid(reason),
            other => other,
        })?;
        // Sizes first: a missing or truncated file is found without reading gigabytes.
        for (rel, want) in &m.files {
            let p = dir.join(rel);
            let meta = std::fs::symlink_metadata(&p).map_err(|e| invalid(format!("{rel}: {e}")))?;
            if !meta.is_file() {
                return Err(invalid(format!("{rel} is not a regular file")));
            }
            if meta.len() != want.size {
                return Err(invalid(format!(
                    "{rel} has {} bytes, the manifest says {}",
                    meta.len(),
                    want.size
                )));
            }
        }
        verify_digests(dir, &m.files).map_err(invalid)?;
        Ok(m)
    }
}

/// Checks every file's SHA-256, largest files first, on as many threads as there are cores.
fn verify_digests(dir: &Path, files: &BTreeMap<String, FileDigest>) -> std::result::Result<(), String> {
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
                    let got = sha256_file(&dir.join(rel)).map_err(|e| format!("{rel}: {e}"))?;
                    if got != want.sha256 {
                        // Stop the other workers early.
                        next.store(usize::MAX / 2, std::sync::atomic::Ordering::Relaxed);
                        return Err(format!(
                            "{rel} is damaged: its SHA-256 does not match the manifest"
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
mod tests {
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
                    created_order: 3,
                    started_order: Some(3),
                    state: ContainerState::Running,
                    exit_code: None,
                    dumped: true,
                    cri_config: None,
                },
                ContainerEntry {
                    name: "webapp-123".into(),
                    id: "sb".into(),
                    role: Role::Sandbox,
                    image: None,
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
                    created_order: 2,
                    started_order: Some(2),
                    state: ContainerState::Running,
                    exit_code: None,
                    dumped: true,
                    cri_config: None,
                },
            ],
            volumes: vec![],
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
    fn unknown_version_and_format_are_refused() {
        let mut m = sample();
        m.version = 2;
        let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("v2");
        assert!(
            err.to_string().contains("format version 2 is not supported"),
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
                    sha256: String::new(),
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
                sha256: sha256_file(&dir.join("containers/app/config.json")).expect("digest"),
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
