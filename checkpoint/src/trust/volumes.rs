//! A restore over volumes the checkpoint does not carry (see `format::persistent`): the new pod
//! must mount the same volumes at the same container paths, and every file the pod held open on
//! them must be as the checkpoint saw it (size and modification time), checked before anything
//! is created. A tenant controls what its volume holds: files are looked up beneath the volume
//! by the kernel, never through a symlink.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::format::persistent::{is_normal_relative, kubelet_volume, HeldFile, PersistentVolume, HOST_PATH};

/// One mount of the new pod: container, container path, host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMount {
    pub container: String,
    pub path: String,
    pub source: PathBuf,
}

/// How a held file compares with what the volume holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileNow {
    Same,
    Gone,
    Changed { size: u64, mtime: (i64, i64) },
}

/// What the check of the new pod found: every difference, each a sentence naming the volume
/// and the file or mount; and the carried volumes to put back, (archive relative to the
/// checkpoint, host directory).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Checked {
    pub problems: Vec<String>,
    pub fills: Vec<(String, PathBuf)>,
}

/// Checks the new pod against the checkpoint's persistent volumes before anything is created:
/// every recorded mount is there (the same volume at the same container path of the same
/// container), and every held file is unchanged. `stat` gives a file's metadata under a host
/// directory (confined beneath it: see [`stat_beneath`]).
///
/// A volume the checkpoint carries may be another one at the same container path (another
/// node's local volume): an empty directory (`empty`, see [`empty_or_missing`]) gets the
/// carried content; one with content must be the same volume with its held files unchanged (a
/// restore in place after `--stop`), and keeps its content.
pub fn check(
    volumes: &[PersistentVolume],
    new_mounts: &[NewMount],
    created_unix: u64,
    stat: impl Fn(&Path, &str) -> std::io::Result<std::fs::Metadata>,
    empty: impl Fn(&Path) -> bool,
) -> Checked {
    let mut out = Checked::default();
    for volume in volumes {
        let mut source_now = None;
        for mount in &volume.mounts {
            let new = new_mounts
                .iter()
                .find(|m| m.container == mount.container && m.path == mount.path);
            let Some(new) = new else {
                out.problems.push(format!(
                    "volume {} is not mounted at {} in container {} of the new pod",
                    volume.label(),
                    mount.path,
                    mount.container
                ));
                continue;
            };
            let text = new.source.to_string_lossy();
            let same = match kubelet_volume(&text) {
                Some(v) => v.plugin == volume.plugin && v.name == volume.name,
                None => volume.plugin == HOST_PATH && text == volume.name.as_str(),
            };
            let filled = volume.carried.is_some() && empty(&new.source);
            if !same && !filled {
                out.problems.push(match volume.carried {
                    Some(_) => format!(
                        "volume {} is carried by the checkpoint, but container {} mounts {} at {}, \
                         which is not empty: the carried content goes only into an empty directory",
                        volume.label(),
                        mount.container,
                        text,
                        mount.path
                    ),
                    None => format!(
                        "container {} mounts {} at {}, not volume {} as at the checkpoint",
                        mount.container,
                        text,
                        mount.path,
                        volume.label()
                    ),
                });
                continue;
            }
            if filled {
                if let Some(archive) = &volume.carried {
                    if !out.fills.iter().any(|(_, dst)| *dst == new.source) {
                        out.fills.push((archive.clone(), new.source.clone()));
                    }
                }
                continue;
            }
            source_now.get_or_insert_with(|| new.source.clone());
        }
        let Some(root) = source_now else { continue };
        for held in &volume.held_files {
            match compare(&held_now(held, &root, &stat), held) {
                None => {}
                Some(why) => out.problems.push(format!(
                    "the volume changed since the checkpoint (taken at {}): {} on {}: {why}{}",
                    utc(created_unix as i64, 0),
                    held.path,
                    volume.label(),
                    if volume.carried.is_some() {
                        " (the checkpoint carries the volume's content: an empty directory gets it back)"
                    } else {
                        ""
                    }
                )),
            }
        }
    }
    out
}

/// Whether `dir` holds nothing (or is not there yet: the restore makes it): where a carried
/// volume's content can go. Anything that cannot be read counts as not empty.
pub fn empty_or_missing(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

fn held_now(
    held: &HeldFile,
    root: &Path,
    stat: &impl Fn(&Path, &str) -> std::io::Result<std::fs::Metadata>,
) -> FileNow {
    if !is_normal_relative(&held.path) {
        return FileNow::Gone;
    }
    match stat(root, &held.path) {
        Ok(meta) if meta.is_file() => {
            if meta.size() == held.size && (meta.mtime(), meta.mtime_nsec()) == held.mtime {
                FileNow::Same
            } else {
                FileNow::Changed {
                    size: meta.size(),
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                }
            }
        }
        _ => FileNow::Gone,
    }
}

/// The sentence for a held file that is not as it was, if it is not.
pub fn compare(now: &FileNow, held: &HeldFile) -> Option<String> {
    match now {
        FileNow::Same => None,
        FileNow::Gone => Some("gone, or no longer a regular file".to_owned()),
        FileNow::Changed { size, mtime } => {
            let mut why = Vec::new();
            if *size != held.size {
                why.push(format!("{} bytes at the checkpoint, {size} now", held.size));
            }
            if *mtime != held.mtime {
                why.push(format!(
                    "modified at {}, the checkpoint saw {}",
                    utc(mtime.0, mtime.1),
                    utc(held.mtime.0, held.mtime.1)
                ));
            }
            Some(why.join("; "))
        }
    }
}

/// The metadata of `rel` beneath `root`, resolved by the kernel with no symlink and no `..`
/// leaving `root` (a tenant controls what its volume holds).
pub fn stat_beneath(root: &Path, rel: &str) -> std::io::Result<std::fs::Metadata> {
    let dir = File::open(root)?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let fd = nix::fcntl::openat2(dir.as_fd(), rel, how).map_err(std::io::Error::from)?;
    File::from(fd).metadata()
}

/// `YYYY-MM-DD hh:mm:ss.nnnnnnnnn UTC` (civil from days, proleptic Gregorian).
pub fn utc(secs: i64, nanos: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{nanos:09} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::persistent::{held_file, PvMount};

    #[test]
    fn utc_formats_civil_time() {
        assert_eq!(utc(0, 0), "1970-01-01 00:00:00.000000000 UTC");
        assert_eq!(utc(951_782_400, 5), "2000-02-29 00:00:00.000000005 UTC");
        assert_eq!(utc(1_796_619_602, 0), "2026-12-07 05:00:02.000000000 UTC");
    }

    fn volume(dir: &Path, held: Vec<HeldFile>) -> PersistentVolume {
        PersistentVolume {
            plugin: "csi".into(),
            name: "pv-data".into(),
            node_local: false,
            mounts: vec![PvMount {
                container: "db".into(),
                path: "/var/lib/db".into(),
                source: dir.to_string_lossy().into_owned(),
                read_only: false,
            }],
            held_files: held,
            carried: None,
        }
    }

    fn csi_dir(root: &Path, uid: &str) -> PathBuf {
        let dir = root
            .join("pods")
            .join(uid)
            .join("volumes/kubernetes.io~csi/pv-data/mount");
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn a_restore_over_the_same_unchanged_volume_passes_and_a_changed_file_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let old = csi_dir(tmp.path(), "old");
        let new = csi_dir(tmp.path(), "new");
        std::fs::create_dir(new.join("wal")).expect("mkdir");
        std::fs::write(new.join("wal/0001"), vec![0u8; 4096]).expect("write");
        let meta = std::fs::metadata(new.join("wal/0001")).expect("stat");
        let held = held_file("wal/0001".into(), &meta);
        let volumes = vec![volume(&old, vec![held.clone()])];
        let mounts = vec![NewMount {
            container: "db".into(),
            path: "/var/lib/db".into(),
            source: new.clone(),
        }];
        assert_eq!(
            check(&volumes, &mounts, 0, stat_beneath, empty_or_missing).problems,
            Vec::<String>::new()
        );

        // Same size, content moved on (a preallocated segment): the mtime tells.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(new.join("wal/0001"))
            .expect("open");
        f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000))
            .expect("touch");
        let problems = check(&volumes, &mounts, 0, stat_beneath, empty_or_missing).problems;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("wal/0001 on csi/pv-data"), "{}", problems[0]);
        assert!(problems[0].contains("modified at 2033-05-18"), "{}", problems[0]);
        assert!(
            !problems[0].contains("bytes"),
            "the size did not change: {}",
            problems[0]
        );

        std::fs::write(new.join("wal/0001"), vec![0u8; 5000]).expect("grow");
        let problems = check(&volumes, &mounts, 0, stat_beneath, empty_or_missing).problems;
        assert!(
            problems[0].contains("4096 bytes at the checkpoint, 5000 now"),
            "{}",
            problems[0]
        );

        std::fs::remove_file(new.join("wal/0001")).expect("rm");
        std::os::unix::fs::symlink("/etc/passwd", new.join("wal/0001")).expect("symlink");
        let problems = check(&volumes, &mounts, 0, stat_beneath, empty_or_missing).problems;
        assert!(
            problems[0].contains("gone"),
            "a symlink is not followed: {}",
            problems[0]
        );
    }

    #[test]
    fn a_new_pod_without_the_volume_or_with_another_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let old = csi_dir(tmp.path(), "old");
        let volumes = vec![volume(&old, Vec::new())];
        let problems = check(&volumes, &[], 0, stat_beneath, empty_or_missing).problems;
        assert_eq!(
            problems,
            vec!["volume csi/pv-data is not mounted at /var/lib/db in container db of the new pod"]
        );
        let other = tmp
            .path()
            .join("pods/new/volumes/kubernetes.io~csi/pv-other/mount");
        let mounts = vec![NewMount {
            container: "db".into(),
            path: "/var/lib/db".into(),
            source: other,
        }];
        let problems = check(&volumes, &mounts, 0, stat_beneath, empty_or_missing).problems;
        assert!(problems[0].contains("not volume csi/pv-data"), "{problems:?}");
    }

    #[test]
    fn a_carried_volume_fills_an_empty_directory_and_refuses_another_with_content() {
        let tmp = tempfile::tempdir().expect("tmp");
        let old = csi_dir(tmp.path(), "old");
        std::fs::write(old.join("seed"), b"x").expect("write");
        let held = held_file("seed".into(), &std::fs::metadata(old.join("seed")).expect("stat"));
        let mut carried = volume(&old, vec![held]);
        carried.carried = Some("volumes/carried~0.tar".into());
        let volumes = vec![carried];
        let at = |source: PathBuf| {
            vec![NewMount {
                container: "db".into(),
                path: "/var/lib/db".into(),
                source,
            }]
        };
        // Another node's volume, empty (or not made yet): filled, whatever its name.
        let elsewhere = tmp
            .path()
            .join("pods/new/volumes/kubernetes.io~local-volume/pv-9");
        let got = check(
            &volumes,
            &at(elsewhere.clone()),
            0,
            stat_beneath,
            empty_or_missing,
        );
        assert_eq!(got.problems, Vec::<String>::new());
        assert_eq!(
            got.fills,
            vec![("volumes/carried~0.tar".to_owned(), elsewhere.clone())]
        );
        // The same one with the same content (in place after --stop): kept, nothing filled.
        let got = check(&volumes, &at(old.clone()), 0, stat_beneath, empty_or_missing);
        assert_eq!(got, Checked::default());
        // Another one with content: refused, named.
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        std::fs::write(elsewhere.join("other"), b"y").expect("write");
        let got = check(&volumes, &at(elsewhere), 0, stat_beneath, empty_or_missing);
        assert_eq!(got.fills, Vec::new());
        assert_eq!(got.problems.len(), 1, "{:?}", got.problems);
        assert!(
            got.problems[0].contains("carried by the checkpoint") && got.problems[0].contains("not empty"),
            "{}",
            got.problems[0]
        );
    }
}
