//! Announcements of each complete container part beside the destination (`<dest>.parts`),
//! for a caller that pushes a checkpoint while the dump finishes.

use std::path::Path;

use crate::format::layout::{parts_dir, PartReady};
use crate::fs::private::replace_private;
use crate::pod::target::Target;

/// Writes a [`PartReady`] for every container into `<dest>.parts` when the caller made that
/// directory (a real one, not a symlink). Best effort: a caller that finds no announcement
/// compresses the part after the dump, as without one.
pub(super) fn announce_parts(dest: &Path, targets: &[Target], dir: &Path) {
    let parts = parts_dir(dest);
    if !std::fs::symlink_metadata(&parts).is_ok_and(|m| m.is_dir()) {
        return;
    }
    for t in targets {
        let part = t.entry.dir().to_string_lossy().into_owned();
        let mut files = Vec::new();
        if let Err(e) = list_files(dir, &dir.join(&part), &mut files) {
            log::warn!("{}: not announced: {e}", part);
            continue;
        }
        files.sort();
        let ready = PartReady {
            root: dir.to_path_buf(),
            part,
            files,
        };
        let path = parts.join(format!("{}.json", t.entry.name));
        let written = serde_json::to_vec(&ready)
            .map_err(std::io::Error::other)
            .and_then(|json| replace_private(&path, &json, "announce a part").map_err(std::io::Error::other));
        if let Err(e) = written {
            log::warn!("{}: not announced: {e}", path.display());
        }
    }
}

/// Every regular file under `dir`, relative to `root`.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            list_files(root, &entry.path(), out)?;
        } else if kind.is_file() {
            let rel = entry.path();
            let rel = rel.strip_prefix(root).map_err(std::io::Error::other)?;
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::ContainerEntry;
    use crate::format::record::{ContainerState, Role};
    use std::sync::Arc;

    fn target(name: &str) -> Target {
        Target {
            entry: ContainerEntry {
                name: name.into(),
                id: name.into(),
                role: Role::Container,
                image: None,
                image_id: None,
                image_digest: None,
                rootfs_layers: Vec::new(),
                created_order: 0,
                started_order: None,
                state: ContainerState::Running,
                exit_code: None,
                dumped: true,
                cri_config: None,
            },
            runc: podsnap_runtime::runc::Runc::new(
                "runc",
                "/run/x",
                Arc::new(podsnap_runtime::launcher::TokioLauncher),
            ),
            bundle: "/nonexistent".into(),
            cgroups: None,
            pid: None,
            spec: None,
            adopted: Vec::new(),
            created: None,
        }
    }

    #[test]
    fn each_part_is_announced_only_where_the_caller_asked() {
        let t = tempfile::tempdir().expect("tempdir");
        let (dest, staging) = (t.path().join("ckpt"), t.path().join(".ckpt.tmp-1"));
        std::fs::create_dir_all(staging.join("containers/app/checkpoint")).expect("mkdir");
        std::fs::write(staging.join("containers/app/checkpoint/pages-1.img"), b"x").expect("write");
        std::fs::write(staging.join("containers/app/spec.dump"), b"{}").expect("write");
        let targets = [target("app")];
        announce_parts(&dest, &targets, &staging);
        assert!(
            !parts_dir(&dest).exists(),
            "no announcement unless the caller made the dir"
        );
        std::fs::create_dir(parts_dir(&dest)).expect("mkdir");
        announce_parts(&dest, &targets, &staging);
        let ready: PartReady =
            serde_json::from_slice(&std::fs::read(parts_dir(&dest).join("app.json")).expect("announced"))
                .expect("json");
        assert_eq!(ready.root, staging);
        assert_eq!(ready.part, "containers/app");
        assert_eq!(
            ready.files,
            [
                "containers/app/checkpoint/pages-1.img",
                "containers/app/spec.dump"
            ]
        );
    }
}
