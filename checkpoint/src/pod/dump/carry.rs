//! Persistent volumes a dump carries (`podsnap dump --volumes`, or the pod's
//! [`CARRY_ANNOTATION`](crate::format::persistent::CARRY_ANNOTATION)): chosen and sized before
//! anything is frozen, refused above the node's `[dump] carry_volumes_max_bytes`; their content
//! is archived while the pod is frozen, beside the CRIU dumps, like an emptyDir's, so memory and
//! disk come back from the same instant.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::persistent::{bind_mounts, persistent_source, Carry, PersistentVolume, VolumeSource};
use crate::fs::units::mib;
use crate::pod::target::Target;

/// The largest request file read.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// What a dump's caller asked beyond containerd's checkpoint options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Asked {
    /// Which persistent volumes to carry.
    pub carry: Carry,
    /// The group the pod is dumped with at one instant.
    pub group: Option<crate::format::layout::GroupAsk>,
    /// Leave the pod's network locked after the dump.
    pub hold_network: bool,
    /// A lazy dump for a live migration: the checked directory where its caller listens.
    pub serve: Option<std::path::PathBuf>,
}

/// What a dump into `dest` is asked: what its caller wrote in `<dest>.request` (see
/// [`crate::format::layout::DumpAsk`]) and, for the volumes to carry when it says nothing of
/// them, the pod's annotation. The request file is honoured only as a regular file (not
/// through a symlink) owned by this process's user and writable by no one else.
pub fn asked(dest: &Path, annotations: &std::collections::BTreeMap<String, String>) -> Result<Asked> {
    let path = crate::format::layout::request_file(dest);
    let refused = |reason: String| Error::DumpRefused {
        path: dest.to_path_buf(),
        reason,
    };
    let ask = read_request(&path).map_err(|why| refused(format!("{}: {why}", path.display())))?;
    let ask = ask.unwrap_or_default();
    if let Some(group) = &ask.group {
        super::group::check(group).map_err(|why| refused(format!("{}: {why}", path.display())))?;
    }
    let carry = match (
        &ask.carry_volumes,
        annotations.get(crate::format::persistent::CARRY_ANNOTATION),
    ) {
        (Some(text), _) => {
            Carry::parse(text).map_err(|why| refused(format!("{}: carry_volumes {why}", path.display())))?
        }
        (None, Some(text)) => Carry::parse(text).map_err(|why| {
            refused(format!(
                "annotation {}: {why}",
                crate::format::persistent::CARRY_ANNOTATION
            ))
        })?,
        (None, None) => Carry::Nothing,
    };
    let serve = match &ask.serve {
        Some(serve) => Some(
            serve
                .checked_dir()
                .map_err(|why| refused(format!("{}: serve: {why}", path.display())))?
                .to_path_buf(),
        ),
        None => None,
    };
    if serve.is_some() && ask.group.is_some() {
        return Err(refused(format!(
            "{}: a live migration's dump cannot be one of a group",
            path.display()
        )));
    }
    Ok(Asked {
        carry,
        group: ask.group,
        hold_network: ask.hold_network,
        serve,
    })
}

fn read_request(path: &Path) -> std::result::Result<Option<crate::format::layout::DumpAsk>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open the dump request: {e}")),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_file() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(format!(
            "the dump request must be a regular file owned by uid {me} and writable by no one else \
             (it is mode {:o}, uid {})",
            meta.mode(),
            meta.uid()
        ));
    }
    let mut text = Vec::new();
    file.take(MAX_REQUEST_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_REQUEST_BYTES {
        return Err(format!(
            "the dump request is larger than {MAX_REQUEST_BYTES} bytes"
        ));
    }
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| format!("the dump request is not valid: {e}"))
}

/// A volume the dump will carry, as found before the freeze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ToCarry {
    pub(super) source: VolumeSource,
    /// Its host directory.
    pub(super) dir: PathBuf,
    /// What it holds now (regular files' sizes).
    pub(super) bytes: u64,
}

/// The persistent volumes of the `running` containers that `carry` selects, with their sizes;
/// refused when a name asked for matches no volume, when a volume is not a directory, or when
/// they hold more than `max_bytes` together.
pub(super) fn choose(dest: &Path, running: &[Target], carry: &Carry, max_bytes: u64) -> Result<Vec<ToCarry>> {
    if *carry == Carry::Nothing {
        return Ok(Vec::new());
    }
    let mut found: Vec<(VolumeSource, PathBuf)> = Vec::new();
    for t in running {
        let Ok(spec) = podsnap_runtime::bundle::Bundle::new(&t.bundle).spec() else {
            continue;
        };
        for mount in bind_mounts(&spec) {
            if let Some(source) = persistent_source(&mount) {
                if !found.iter().any(|(s, _)| *s == source) {
                    found.push((source, PathBuf::from(&mount.source)));
                }
            }
        }
    }
    let refused = |reason: String| Error::DumpRefused {
        path: dest.to_path_buf(),
        reason,
    };
    let sources: Vec<VolumeSource> = found.iter().map(|(s, _)| s.clone()).collect();
    let unmatched = carry.unmatched(&sources);
    if !unmatched.is_empty() {
        let have: Vec<String> = sources
            .iter()
            .map(|s| format!("{}/{}", s.plugin, s.name))
            .collect();
        return Err(refused(format!(
            "--volumes names {} but the pod mounts no such volume (its persistent volumes: {})",
            unmatched.join(", "),
            if have.is_empty() {
                "none".to_owned()
            } else {
                have.join(", ")
            }
        )));
    }
    let mut chosen = Vec::new();
    for (source, dir) in found.into_iter().filter(|(s, _)| carry.selects(s)) {
        let meta =
            std::fs::symlink_metadata(&dir).map_err(|e| Error::io("read a volume to carry", &dir, e))?;
        if !meta.is_dir() {
            return Err(refused(format!(
                "volume {}/{} ({}) is not a directory: only a directory's content can be carried",
                source.plugin,
                source.name,
                dir.display()
            )));
        }
        let bytes = super::preflight::tree_size(&dir);
        chosen.push(ToCarry { source, dir, bytes });
    }
    let total: u64 = chosen.iter().map(|c| c.bytes).sum();
    if total > max_bytes {
        let each: Vec<String> = chosen
            .iter()
            .map(|c| format!("{}/{} {}", c.source.plugin, c.source.name, mib(c.bytes)))
            .collect();
        return Err(refused(format!(
            "the volumes to carry hold {} ({}), more than the node allows ([dump] \
             carry_volumes_max_bytes = {max_bytes}); carry fewer, or raise the limit",
            mib(total),
            each.join(", ")
        )));
    }
    Ok(chosen)
}

/// Marks the carried volumes among those recorded at the freeze, each with its archive, and
/// returns what to archive: (host directory, archive relative to the checkpoint).
pub(super) fn mark(volumes: &mut [PersistentVolume], chosen: &[ToCarry]) -> Vec<(PathBuf, String)> {
    let mut archives = Vec::new();
    for volume in volumes.iter_mut() {
        let Some(c) = chosen
            .iter()
            .find(|c| c.source.plugin == volume.plugin && c.source.name == volume.name)
        else {
            continue;
        };
        let archive = crate::format::persistent::carried_archive(archives.len());
        volume.carried = Some(archive.clone());
        archives.push((c.dir.clone(), archive));
    }
    archives
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::persistent::PvMount;

    fn volume(plugin: &str, name: &str) -> PersistentVolume {
        PersistentVolume {
            plugin: plugin.into(),
            name: name.into(),
            node_local: true,
            mounts: vec![PvMount {
                container: "db".into(),
                path: "/data".into(),
                source: format!("/k/{name}"),
                read_only: false,
            }],
            held_files: Vec::new(),
            carried: None,
        }
    }

    #[test]
    fn only_the_chosen_volumes_get_an_archive_each() {
        let mut volumes = vec![
            volume("csi", "pv-a"),
            volume("local-volume", "pv-b"),
            volume("local-volume", "pv-c"),
        ];
        let chosen = vec![
            ToCarry {
                source: VolumeSource {
                    plugin: "local-volume".into(),
                    name: "pv-c".into(),
                    node_local: true,
                },
                dir: PathBuf::from("/k/pv-c"),
                bytes: 1,
            },
            ToCarry {
                source: VolumeSource {
                    plugin: "local-volume".into(),
                    name: "pv-b".into(),
                    node_local: true,
                },
                dir: PathBuf::from("/k/pv-b"),
                bytes: 1,
            },
        ];
        let archives = mark(&mut volumes, &chosen);
        assert_eq!(volumes[0].carried, None);
        assert_eq!(volumes[1].carried.as_deref(), Some("volumes/carried~0.tar"));
        assert_eq!(volumes[2].carried.as_deref(), Some("volumes/carried~1.tar"));
        assert_eq!(
            archives,
            vec![
                (PathBuf::from("/k/pv-b"), "volumes/carried~0.tar".to_owned()),
                (PathBuf::from("/k/pv-c"), "volumes/carried~1.tar".to_owned())
            ]
        );
    }

    #[test]
    fn the_request_beside_the_destination_asks_first_then_the_annotation() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tmp");
        let dest = tmp.path().join("ck");
        let mut annotations = std::collections::BTreeMap::new();
        assert_eq!(
            asked(&dest, &annotations).expect("nothing asked").carry,
            Carry::Nothing
        );
        annotations.insert(
            crate::format::persistent::CARRY_ANNOTATION.to_owned(),
            "pv-a, local-volume/pv-b".to_owned(),
        );
        assert_eq!(
            asked(&dest, &annotations).expect("annotation").carry,
            Carry::Named(vec!["pv-a".into(), "local-volume/pv-b".into()])
        );
        let request = crate::format::layout::request_file(&dest);
        std::fs::write(&request, br#"{"carry_volumes":"local"}"#).expect("write");
        std::fs::set_permissions(&request, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            asked(&dest, &annotations).expect("request").carry,
            Carry::NodeLocal
        );
        // Writable by others: not trusted.
        std::fs::set_permissions(&request, std::fs::Permissions::from_mode(0o622)).expect("chmod");
        let err = asked(&dest, &annotations).expect_err("a request others can write");
        assert!(err.to_string().contains("writable by no one else"), "{err}");
        // Through a symlink: not followed.
        std::fs::remove_file(&request).expect("rm");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::write(&elsewhere, br#"{"carry_volumes":"local"}"#).expect("write");
        std::os::unix::fs::symlink(&elsewhere, &request).expect("symlink");
        assert!(
            asked(&dest, &annotations).is_err(),
            "a symlinked request is refused"
        );
        std::fs::remove_file(&request).expect("rm");
        std::fs::write(&request, br#"{"carry_volumes":"local","more":1}"#).expect("write");
        std::fs::set_permissions(&request, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(asked(&dest, &annotations).is_err(), "an unknown field is refused");
    }
}
