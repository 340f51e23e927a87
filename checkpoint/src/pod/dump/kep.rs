//! KEP-2008 metadata: what CRI's CheckpointContainer writes beside a container's images.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::deletions::Deletions;
use crate::format::manifest::{ContainerEntry, CONFIG_DUMP, DELETED_FILES, ROOTFS_DELETED};
use crate::fs::private::write_private;

/// The runtime a KEP-2008 `config.dump` names.
const RUNTIME_TYPE: &str = "io.containerd.podsnap.v1";

/// A KEP-2008 `config.dump` (what CRI's CheckpointContainer writes beside the images: id,
/// name, image, runtime, creation and checkpoint times) and, when the container removed image
/// files, `deleted.files`: with `checkpoint/`, `spec.dump` and `rootfs-diff.tar` a tar of the
/// container's directory is such an archive.
pub(super) fn write_kep_metadata(
    cdir: &Path,
    entry: &ContainerEntry,
    created: Option<std::time::SystemTime>,
    at: time::OffsetDateTime,
) -> Result<()> {
    let rfc3339 = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| Error::io("format a time", cdir, std::io::Error::other(e)))
    };
    let mut config = serde_json::json!({
        "id": entry.id,
        "name": entry.name,
        "rootfsImageName": entry.image.as_deref().unwrap_or_default(),
        "runtime": RUNTIME_TYPE,
        "checkpointedTime": rfc3339(at)?,
        "restored": false,
    });
    if let Some(created) = created {
        config["createdTime"] = serde_json::json!(rfc3339(time::OffsetDateTime::from(created))?);
    }
    let encode = |v: &serde_json::Value| {
        serde_json::to_vec_pretty(v).map_err(|e| Error::io("encode", cdir, std::io::Error::other(e)))
    };
    write_private(&cdir.join(CONFIG_DUMP), &encode(&config)?)?;
    let deletions = cdir.join(ROOTFS_DELETED);
    if deletions.exists() {
        let deleted = Deletions::read(&deletions)?.deleted;
        if !deleted.is_empty() {
            let list = deleted.into_iter().map(|p| format!("/{p}")).collect::<Vec<_>>();
            write_private(&cdir.join(DELETED_FILES), &encode(&serde_json::json!(list))?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::record::{ContainerState, Role};

    #[test]
    fn config_dump_names_the_container_and_deleted_files_are_absolute() {
        let t = tempfile::tempdir().expect("tempdir");
        let entry = ContainerEntry {
            name: "app".into(),
            id: "c1".into(),
            role: Role::Container,
            image: Some("docker.io/library/nginx:1".into()),
            image_id: None,
            image_digest: None,
            rootfs_layers: Vec::new(),
            created_order: 0,
            started_order: None,
            state: ContainerState::Running,
            exit_code: None,
            dumped: true,
            cri_config: None,
        };
        let deletions = Deletions {
            deleted: vec!["etc/motd".into()],
            opaque: Vec::new(),
        };
        std::fs::write(
            t.path().join(ROOTFS_DELETED),
            serde_json::to_vec(&deletions).expect("json"),
        )
        .expect("write");
        let at = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        write_kep_metadata(t.path(), &entry, None, at).expect("metadata");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(t.path().join(CONFIG_DUMP)).expect("read")).expect("json");
        assert_eq!(config["id"], "c1");
        assert_eq!(config["runtime"], RUNTIME_TYPE);
        assert_eq!(config["rootfsImageName"], "docker.io/library/nginx:1");
        assert_eq!(config["checkpointedTime"], "2023-11-14T22:13:20Z");
        assert!(config.get("createdTime").is_none());
        let deleted: Vec<String> =
            serde_json::from_slice(&std::fs::read(t.path().join(DELETED_FILES)).expect("read"))
                .expect("json");
        assert_eq!(deleted, ["/etc/motd"]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(t.path().join(CONFIG_DUMP))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
