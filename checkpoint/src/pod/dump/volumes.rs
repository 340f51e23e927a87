//! The pod's persistent volumes at the dump (see `format::persistent`): which volumes the
//! running containers mount and which regular files their processes hold open on them, read
//! while the pod is frozen.

use std::collections::BTreeMap;
use std::path::Path;

use crate::format::persistent::{
    held_file, is_normal_relative, on_mount, persistent_source, PersistentVolume, PvMount, SpecMount,
    VolumeSource,
};

/// The regular files a process holds open or mapped, by the path its mount namespace gives and
/// the metadata of the file itself (read through `/proc/<pid>/fd/<n>` and
/// `/proc/<pid>/map_files/<range>`, so a file renamed since it was opened is still the right
/// one). Deleted files are left out (CRIU carries those itself). `proc` is `/proc` but for tests.
pub fn open_files(proc: &Path, pid: i32) -> Vec<(String, std::fs::Metadata)> {
    let mut found = BTreeMap::new();
    for dir in ["fd", "map_files"] {
        let Ok(entries) = std::fs::read_dir(proc.join(pid.to_string()).join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let link = entry.path();
            let Ok(target) = std::fs::read_link(&link) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            if !target.starts_with('/') || target.ends_with(" (deleted)") {
                continue; // sockets, pipes, anon inodes; deleted files
            }
            let Ok(meta) = std::fs::metadata(&link) else {
                continue;
            };
            if meta.is_file() {
                found.entry(target).or_insert(meta);
            }
        }
    }
    found.into_iter().collect()
}

/// One container at the dump: its name, its bind mounts and the host pids of its processes
/// (the pod frozen).
pub struct ContainerAtDump {
    pub name: String,
    pub mounts: Vec<SpecMount>,
    pub pids: Vec<i32>,
}

/// The pod's persistent volumes with the files its processes hold open on them, read while
/// the pod is frozen. `proc` is `/proc` but for tests.
pub fn record(containers: &[ContainerAtDump], proc: &Path) -> Vec<PersistentVolume> {
    let mut volumes: BTreeMap<(String, String), PersistentVolume> = BTreeMap::new();
    for c in containers {
        let persistent: Vec<(&SpecMount, VolumeSource)> = c
            .mounts
            .iter()
            .filter_map(|m| Some((m, persistent_source(m)?)))
            .collect();
        for (mount, source) in &persistent {
            let volume = volumes
                .entry((source.plugin.clone(), source.name.clone()))
                .or_insert_with(|| PersistentVolume {
                    plugin: source.plugin.clone(),
                    name: source.name.clone(),
                    node_local: source.node_local,
                    mounts: Vec::new(),
                    held_files: Vec::new(),
                    carried: None,
                });
            volume.mounts.push(PvMount {
                container: c.name.clone(),
                path: mount.destination.clone(),
                source: mount.source.clone(),
                read_only: mount.read_only,
            });
        }
        if persistent.is_empty() {
            continue;
        }
        for pid in &c.pids {
            for (path, meta) in open_files(proc, *pid) {
                let Some(((_, source), rel)) = on_mount(&persistent, &path, |(m, _)| m.destination.as_str())
                else {
                    continue;
                };
                if !is_normal_relative(&rel) {
                    continue; // the mount's root itself
                }
                let Some(volume) = volumes.get_mut(&(source.plugin.clone(), source.name.clone())) else {
                    continue;
                };
                if !volume.held_files.iter().any(|h| h.path == rel) {
                    volume.held_files.push(held_file(rel, &meta));
                }
            }
        }
    }
    let mut out: Vec<PersistentVolume> = volumes.into_values().collect();
    for v in &mut out {
        v.mounts.sort();
        v.held_files.sort();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn held_files_are_recorded_on_the_volume_they_lie_on() {
        let tmp = tempfile::tempdir().expect("tmp");
        // A fake /proc: pid 7 holds data/wal/0001 (on the volume) and /etc/passwd (not).
        let volume = tmp.path().join("pods/u/volumes/kubernetes.io~csi/pv-1/mount");
        std::fs::create_dir_all(volume.join("wal")).expect("mkdir");
        std::fs::write(volume.join("wal/0001"), b"12345").expect("write");
        let fd = tmp.path().join("proc/7/fd");
        std::fs::create_dir_all(&fd).expect("mkdir");
        // The link text is the container's view; the metadata comes through the link, so here
        // the link points at the real file and the text is checked by name only.
        std::os::unix::fs::symlink(volume.join("wal/0001"), fd.join("3")).expect("symlink");
        let containers = [ContainerAtDump {
            name: "db".into(),
            mounts: vec![SpecMount {
                source: volume.to_string_lossy().into_owned(),
                destination: volume.to_string_lossy().into_owned(),
                read_only: false,
            }],
            pids: vec![7],
        }];
        let volumes = record(&containers, &tmp.path().join("proc"));
        assert_eq!(volumes.len(), 1);
        assert_eq!(volumes[0].label(), "csi/pv-1");
        assert_eq!(volumes[0].mounts[0].container, "db");
        assert_eq!(volumes[0].held_files.len(), 1, "{volumes:?}");
        assert_eq!(volumes[0].held_files[0].path, "wal/0001");
        assert_eq!(volumes[0].held_files[0].size, 5);
    }

    #[test]
    fn open_files_reads_descriptors_of_a_live_process() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("held");
        std::fs::write(&path, b"abc").expect("write");
        let _held = File::open(&path).expect("open");
        let files = open_files(Path::new("/proc"), std::process::id() as i32);
        let found = files
            .iter()
            .find(|(p, _)| Path::new(p) == path)
            .expect("this process holds the file");
        assert_eq!(found.1.size(), 3);
    }
}
