//! What a pod checkpoint holds, in a few lines for the operator (`podsnap dump`, `podsnap
//! inspect`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use podsnap_checkpoint::format::manifest::{Manifest, MANIFEST};
use podsnap_checkpoint::format::persistent::AfterDump;
use podsnap_checkpoint::Role;

/// A pod checkpoint at a glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointSummary {
    pub dir: PathBuf,
    /// `namespace/name` of the pod, as recorded.
    pub pod: String,
    /// The sandbox id at dump time.
    pub sandbox_id: String,
    /// Containers whose processes were dumped, in restore order.
    pub dumped: Vec<String>,
    /// Containers recorded only (completed init containers), with their exit codes.
    pub recorded: Vec<(String, Option<u32>)>,
    /// Emptydir volumes captured.
    pub volumes: Vec<String>,
    /// First freeze to last resume.
    pub frozen: Duration,
    /// The slowest single container's CRIU dump.
    pub slowest_dump: Duration,
    /// Bytes of every file, the manifest included.
    pub bytes: u64,
    pub tcp_established: bool,
    /// The name a pod's `podsnap.io/restore-from` annotation gives it, when the checkpoint lies
    /// inside the node's checkpoint root.
    pub restore_name: Option<String>,
    /// What became of the pod at the dump, when the checkpoint says.
    pub after_dump: Option<AfterDump>,
    /// Volumes the checkpoint does not carry: `plugin/name (container:path, ...; N files held
    /// open; node-local)`.
    pub not_carried: Vec<String>,
    /// Persistent volumes the checkpoint carries: `plugin/name (container:path, ...; size)`.
    pub carried: Vec<String>,
}

impl CheckpointSummary {
    /// Summarizes `manifest` of the checkpoint in `dir`; `root` is the node's checkpoint root.
    pub fn new(dir: &Path, manifest: &Manifest, root: &Path) -> Self {
        let mut dumped = Vec::new();
        let mut recorded = Vec::new();
        for c in manifest.restore_order() {
            if c.role == Role::Sandbox {
                continue;
            }
            if c.dumped {
                dumped.push(c.name.clone());
            } else {
                recorded.push((c.name.clone(), c.exit_code));
            }
        }
        let manifest_bytes = std::fs::metadata(dir.join(MANIFEST))
            .map(|m| m.len())
            .unwrap_or(0);
        let pod = format!(
            "{}/{}",
            manifest.pod.namespace.as_deref().unwrap_or("?"),
            manifest.pod.name.as_deref().unwrap_or("?")
        );
        Self {
            dir: dir.to_path_buf(),
            pod,
            sandbox_id: manifest.pod.sandbox_id.clone(),
            dumped,
            recorded,
            volumes: manifest.volumes.iter().map(|v| v.name.clone()).collect(),
            frozen: Duration::from_micros(manifest.stats.frozen_us),
            slowest_dump: Duration::from_micros(manifest.stats.slowest_dump_us),
            bytes: manifest.files.values().map(|f| f.size).sum::<u64>() + manifest_bytes,
            tcp_established: manifest.tcp_established,
            restore_name: name_in_root(dir, root),
            after_dump: manifest.after_dump,
            not_carried: manifest
                .persistent_volumes
                .iter()
                .filter(|v| v.carried.is_none())
                .map(|v| {
                    format!(
                        "{} ({}; {} file{} held open{})",
                        v.label(),
                        pv_mounts(v),
                        v.held_files.len(),
                        if v.held_files.len() == 1 { "" } else { "s" },
                        if v.node_local { "; node-local" } else { "" }
                    )
                })
                .collect(),
            carried: manifest
                .persistent_volumes
                .iter()
                .filter_map(|v| {
                    let archive = v.carried.as_ref()?;
                    let size = manifest.files.get(archive).map(|f| f.size).unwrap_or(0);
                    Some(format!("{} ({}; {})", v.label(), pv_mounts(v), human_bytes(size)))
                })
                .collect(),
        }
    }
}

/// `container:path, ...` of a persistent volume.
fn pv_mounts(v: &podsnap_checkpoint::format::persistent::PersistentVolume) -> String {
    v.mounts
        .iter()
        .map(|m| format!("{}:{}", m.container, m.path))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `dir` relative to `root`, when `dir` lies inside it (both resolved).
pub fn name_in_root(dir: &Path, root: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let root = std::fs::canonicalize(root).ok()?;
    let rel = dir.strip_prefix(&root).ok()?;
    let name = rel.to_str()?;
    (!name.is_empty()).then(|| name.to_owned())
}

/// `12.3 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl fmt::Display for CheckpointSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "checkpoint   {}", self.dir.display())?;
        writeln!(f, "pod          {} (sandbox {})", self.pod, self.sandbox_id)?;
        writeln!(f, "dumped       {}", list_or_none(&self.dumped))?;
        let recorded: Vec<String> = self
            .recorded
            .iter()
            .map(|(name, code)| match code {
                Some(code) => format!("{name} (exited {code})"),
                None => format!("{name} (not running)"),
            })
            .collect();
        writeln!(f, "recorded     {}", list_or_none(&recorded))?;
        writeln!(f, "volumes      {}", list_or_none(&self.volumes))?;
        writeln!(
            f,
            "frozen       {:.1?} (slowest container dump {:.1?})",
            self.frozen, self.slowest_dump
        )?;
        write!(f, "size         {}", human_bytes(self.bytes))?;
        if self.tcp_established {
            write!(f, "\ntcp          established connections kept")?;
        }
        if let Some(after) = self.after_dump {
            write!(f, "\npod after    {}", after.describe())?;
            if after == AfterDump::LeftRunning && !self.not_carried.is_empty() {
                write!(f, ": the volumes below may have moved on since")?;
            }
        }
        for volume in &self.carried {
            write!(f, "\ncarried      {volume}")?;
        }
        for volume in &self.not_carried {
            write!(f, "\nnot carried  {volume}")?;
        }
        if let Some(name) = &self.restore_name {
            write!(f, "\nrestore-from {name}")?;
        }
        Ok(())
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn names_inside_the_root_only() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::create_dir_all(t.path().join("out")).expect("mkdir");
        assert_eq!(name_in_root(&root.join("a/b"), &root).as_deref(), Some("a/b"));
        assert_eq!(name_in_root(&t.path().join("out"), &root), None);
        assert_eq!(name_in_root(&root, &root), None);
    }
}
