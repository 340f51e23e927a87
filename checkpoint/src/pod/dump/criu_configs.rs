//! What each container's CRIU is told for a dump, in its own configuration file: its hold,
//! `network-lock skip` under the pod's lock, which unix sockets are external, and its masked
//! directories and its cgroup v1 `/sys/fs/cgroup` tmpfs as external mounts (see
//! [`masked_tmpfs`], [`cgroup_tmpfs`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::criu::container::{
    CgroupTmpfsEntry, CGROUP_TMPFS_AT, CGROUP_TMPFS_KEY, CRIU_CONFIG_ANNOTATION, CRIU_CONFIG_FILE,
    MASKED_TMPFS_KEY,
};
use crate::criu::hold::Hold;
use crate::error::{Error, Result};
use crate::fs::private::write_private;
use crate::pod::target::Target;

/// What the containers' CRIU runs were told of unix connections between containers.
#[derive(Default)]
pub(super) struct ToldEnds {
    /// (container name, socket inode) ends they were told are external.
    pub(super) ends: HashSet<(String, u64)>,
    /// Containers whose CRIU reads podsnap's configuration file (only those can be told).
    pub(super) configured: HashSet<String>,
    /// Containers whose CRIU was told that their masked directories are external mounts.
    pub(super) masked: HashSet<String>,
    /// Containers whose CRIU was told that their `/sys/fs/cgroup` tmpfs is an external
    /// mount, with what it holds.
    pub(super) cgroup_tmpfs: HashMap<String, Vec<CgroupTmpfsEntry>>,
}

/// The CRIU configuration files of the dumped containers (see
/// [`CRIU_CONFIG_FILE`]) for the length of the dump: removed when dropped.
pub(super) struct CriuConfigs(Vec<PathBuf>);

impl CriuConfigs {
    /// No configuration file (unit tests of the phases).
    #[cfg(test)]
    pub(super) fn none() -> Self {
        CriuConfigs(Vec::new())
    }

    /// What CRIU is told for this dump, for each of `running` whose bundle has podsnap's file
    /// (the others get their CRIU started once the pod is frozen, with CRIU's own network
    /// lock): its hold ([`crate::criu::hold`]), `network-lock skip` when the pod's network is
    /// locked by podsnap, and `external unix[INO]` for each of its sockets in `unix_ends`
    /// (container name -> inodes: ends of connections to other containers). A file left by a
    /// restore (`tcp-close`) is replaced. Returns the holds, one place per container of
    /// `running`, and the (container, inode) ends its CRIU was told of.
    pub(super) fn write(
        running: &[Target],
        pod_locked: bool,
        unix_ends: &HashMap<String, BTreeSet<u64>>,
        lazy: bool,
    ) -> Result<(Self, Vec<Option<Hold>>, ToldEnds)> {
        let mut files = CriuConfigs(Vec::new());
        let mut holds = Vec::new();
        let mut told = ToldEnds::default();
        for t in running {
            let bundle = podsnap_runtime::bundle::Bundle::new(&t.bundle);
            let Some(conf) = bundle
                .spec()
                .ok()
                .and_then(|spec| crate::criu::container::own_criu_config(&t.bundle, &spec))
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
            if lazy {
                // The page server of a lazy dump: the connected socket the dump hands runc.
                text.push_str(&format!("ps-socket {}\n", crate::criu::container::PS_SOCKET_FD));
            }
            for ino in unix_ends.get(&t.entry.name).into_iter().flatten() {
                text.push_str(&format!("external unix[{ino}]\n"));
                told.ends.insert((t.entry.name.clone(), *ino));
            }
            let masked = t
                .pid
                .zip(bundle.spec().ok())
                .map(|(pid, spec)| masked_tmpfs(pid, &spec))
                .unwrap_or_default();
            for path in &masked {
                text.push_str(&format!("external mnt[{path}]:{MASKED_TMPFS_KEY}\n"));
            }
            if !masked.is_empty() {
                told.masked.insert(t.entry.name.clone());
            }
            if let Some(entries) = t.pid.and_then(cgroup_tmpfs) {
                text.push_str(&format!("external mnt[{CGROUP_TMPFS_AT}]:{CGROUP_TMPFS_KEY}\n"));
                told.cgroup_tmpfs.insert(t.entry.name.clone(), entries);
            }
            write_private(&conf, text.as_bytes())?;
            holds.push(hold);
        }
        Ok((files, holds, told))
    }
}

/// The masked directories of the container whose init is `pid` (its spec's `maskedPaths`) that
/// are what runc makes of them: an empty read-only tmpfs on top of the directory. CRIU would
/// archive each such tmpfs (a `tar --gzip` it forks, per container, while the pod is frozen),
/// although its content is nothing and always was (it is mounted read-only); told that they
/// are external mounts (`external mnt[PATH]:KEY`, one key for all of them), CRIU records only
/// where they are and their flags, and its restore bind-mounts the empty tmpfs the restore
/// names for that key there ([`crate::criu::container::DumpOptions::masked_tmpfs_external`])
/// and makes it read-only again. A path CRIU's configuration syntax cannot carry, a mount
/// that is not a read-only tmpfs, and a directory that is not empty are left to CRIU.
pub fn masked_tmpfs(pid: i32, spec: &oci_spec::runtime::Spec) -> Vec<String> {
    let Some(paths) = spec.linux().as_ref().and_then(|l| l.masked_paths().clone()) else {
        return Vec::new();
    };
    let Ok(mounts) = podsnap_runtime::mountinfo::read(Path::new(&format!("/proc/{pid}/mountinfo"))) else {
        return Vec::new();
    };
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    paths
        .into_iter()
        .filter(|p| p.starts_with('/') && !p.contains(|c: char| c.is_whitespace() || "[]:\"'\\".contains(c)))
        .filter(|p| {
            podsnap_runtime::mountinfo::top_at(&mounts, Path::new(p))
                .is_some_and(|m| m.fs_type == "tmpfs" && m.options.split(',').any(|o| o == "ro"))
        })
        .filter(|p| {
            std::fs::read_dir(root.join(p.trim_start_matches('/'))).is_ok_and(|mut d| d.next().is_none())
        })
        .collect()
}

/// What the tmpfs runc mounts on `/sys/fs/cgroup` of the container whose init is `pid` holds
/// (cgroup v1: a directory per hierarchy, each a mount point of it, a symbolic link per
/// co-mounted controller), when that is all it holds. CRIU would archive it (a `tar --gzip`
/// per container while the pod is frozen, after cloning the mount to see beneath the
/// hierarchies); told it is an external mount, it records only where it is and its flags, and
/// the restore makes the same tmpfs from this list
/// ([`crate::criu::container::DumpOptions::cgroup_tmpfs`]). `None` on cgroup v2 and for
/// anything else.
pub fn cgroup_tmpfs(pid: i32) -> Option<Vec<CgroupTmpfsEntry>> {
    let mounts = podsnap_runtime::mountinfo::read(Path::new(&format!("/proc/{pid}/mountinfo"))).ok()?;
    let at = Path::new(CGROUP_TMPFS_AT);
    if podsnap_runtime::mountinfo::top_at(&mounts, at)?.fs_type != "tmpfs" {
        return None;
    }
    let dir = PathBuf::from(format!("/proc/{pid}/root{CGROUP_TMPFS_AT}"));
    let mut entries = Vec::new();
    for e in std::fs::read_dir(&dir).ok()? {
        let e = e.ok()?;
        let name = e.file_name().into_string().ok()?;
        let kind = e.file_type().ok()?;
        let symlink = if kind.is_symlink() {
            Some(
                std::fs::read_link(e.path())
                    .ok()?
                    .into_os_string()
                    .into_string()
                    .ok()?,
            )
        } else if kind.is_dir() && podsnap_runtime::mountinfo::top_at(&mounts, &at.join(&name)).is_some() {
            None
        } else {
            return None;
        };
        let entry = CgroupTmpfsEntry { name, symlink };
        if !CgroupTmpfsEntry::valid_name(&entry.name)
            || entry
                .symlink
                .as_deref()
                .is_some_and(|l| !CgroupTmpfsEntry::valid_name(l))
        {
            return None;
        }
        entries.push(entry);
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    (!entries.is_empty()).then_some(entries)
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

/// A container's spec as the checkpoint keeps it: without the annotation pointing runc at the
/// container's own CRIU configuration file (the shim's, in a bundle a restore does not have).
pub(super) fn without_own_criu_config(spec: Vec<u8>, bundle: &Path) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&spec) else {
        return spec;
    };
    let own = bundle.join(CRIU_CONFIG_FILE).display().to_string();
    let Some(annotations) = value
        .get_mut("annotations")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return spec;
    };
    if annotations.get(CRIU_CONFIG_ANNOTATION).and_then(|v| v.as_str()) != Some(own.as_str()) {
        return spec;
    }
    annotations.remove(CRIU_CONFIG_ANNOTATION);
    serde_json::to_vec(&value).unwrap_or(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_kept_loses_only_the_annotation_naming_our_own_file() {
        let bundle = Path::new("/run/b");
        let own = bundle.join(CRIU_CONFIG_FILE).display().to_string();
        let spec = serde_json::json!({"annotations": {CRIU_CONFIG_ANNOTATION: own, "k": "v"}});
        let kept: serde_json::Value = serde_json::from_slice(&without_own_criu_config(
            serde_json::to_vec(&spec).expect("json"),
            bundle,
        ))
        .expect("json");
        assert_eq!(kept["annotations"], serde_json::json!({"k": "v"}));
    }

    #[test]
    fn a_spec_naming_another_criu_file_is_kept_byte_for_byte() {
        let spec = serde_json::to_vec(&serde_json::json!({
            "annotations": {CRIU_CONFIG_ANNOTATION: "/etc/criu/mine.conf"}
        }))
        .expect("json");
        assert_eq!(without_own_criu_config(spec.clone(), Path::new("/run/b")), spec);
        let not_json = b"not json".to_vec();
        assert_eq!(
            without_own_criu_config(not_json.clone(), Path::new("/run/b")),
            not_json
        );
    }

    #[test]
    fn configuration_files_go_with_the_dump() {
        let t = tempfile::tempdir().expect("tempdir");
        let conf = t.path().join(CRIU_CONFIG_FILE);
        std::fs::write(&conf, b"external unix[1]\n").expect("write");
        drop(CriuConfigs(vec![conf.clone(), t.path().join("never-written")]));
        assert!(
            !conf.exists(),
            "removed when the dump ends; a missing one is fine"
        );
    }
}
