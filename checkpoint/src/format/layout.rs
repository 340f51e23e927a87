//! Names in the checkpoint's layout that are not the manifest's own: the pod's shared state,
//! emptyDir volume names, and the files beside a dump's destination (its caller's request,
//! the part announcements).

use std::path::{Path, PathBuf};

use crate::format::manifest::validate_name;

/// The state of the pod's SysV objects, relative to the checkpoint root.
pub const SYSV_STATE: &str = "pod/sysv-ipc.json";

/// The pod's `/dev/shm` archive in a checkpoint.
pub const DEV_SHM_ARCHIVE: &str = "pod/dev-shm.tar";

/// Path fragment of a kubelet emptyDir volume's host directory.
pub const EMPTY_DIR_MARK: &str = "/volumes/kubernetes.io~empty-dir/";

/// The volume name of a kubelet emptyDir host path.
pub fn empty_dir_name(source: &str) -> Option<&str> {
    let (_, rest) = source.split_once(EMPTY_DIR_MARK)?;
    let name = rest.trim_end_matches('/');
    (validate_name(name).is_ok()).then_some(name)
}

/// The suffix of the directory beside a dump's destination where the dump announces each
/// container part once it is complete (`<dest>.parts/<container>.json`, a [`PartReady`]): a
/// caller that pushes the checkpoint creates it to upload parts while the dump finishes.
pub const PARTS_SUFFIX: &str = ".parts";

/// `<dest>.parts`.
pub fn parts_dir(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(PARTS_SUFFIX);
    dest.with_file_name(name)
}

/// The suffix of the file beside a dump's destination where its caller asks for more than
/// containerd's checkpoint options can say (`<dest>.request`, a [`DumpAsk`] in JSON): written
/// by `podsnap dump` before it asks containerd for the dump, removed after.
pub const REQUEST_SUFFIX: &str = ".request";

/// `<dest>.request`.
pub fn request_file(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(REQUEST_SUFFIX);
    dest.with_file_name(name)
}

/// What a dump's caller asks beyond containerd's checkpoint options.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpAsk {
    /// The persistent volumes to carry (`local`, `none`, or names separated by commas: see
    /// [`crate::format::persistent::Carry`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carry_volumes: Option<String>,
    /// The group this pod is dumped with at one instant (`podsnap dump --selector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupAsk>,
    /// Leave the pod's network locked after the dump (its caller paused the pod and unlocks
    /// the network itself when it resumes it: `podsnap migrate --to-node`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold_network: bool,
}

/// One pod's place in a group dump, as its caller asks it (see `layout::DumpAsk`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupAsk {
    /// Where the members meet.
    pub dir: PathBuf,
    /// This pod's name in the group.
    pub me: String,
    /// Every member's name, this pod's included.
    pub members: Vec<String>,
}

/// A complete container part of a dump still being finished.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartReady {
    /// The checkpoint directory being written (the staging directory until it is committed).
    pub root: PathBuf,
    /// `containers/<name>`.
    pub part: String,
    /// Its files, relative to `root`, sorted: what the manifest will list for the part.
    pub files: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_dir_names_come_from_kubelet_paths() {
        assert_eq!(
            empty_dir_name("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/data"),
            Some("data")
        );
        assert_eq!(
            empty_dir_name("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~secret/x"),
            None
        );
        assert_eq!(
            empty_dir_name("/x/volumes/kubernetes.io~empty-dir/../../etc"),
            None
        );
    }

    #[test]
    fn the_parts_dir_sits_beside_the_destination() {
        assert_eq!(
            parts_dir(Path::new("/ckpt/web")),
            PathBuf::from("/ckpt/web.parts")
        );
    }
}
