//! Persistent volumes: what a pod mounts that its checkpoint does not carry (the records the
//! manifest keeps of them, and which mounts they are).
//!
//! A pod's emptyDir volumes, `/dev/shm` and SysV IPC are captured with it. A PersistentVolume
//! (CSI, local, NFS...) or a host directory is not: it stays where it is and goes on changing
//! if the pod keeps running. CRIU restores a process with its open files at their recorded
//! offsets, and checks only a file's size; a database's preallocated log segments keep their
//! size while their content moves on, so a restore over a volume that changed resumes the
//! process on data it never wrote, or without data it committed.
//!
//! So a dump records, for every such volume: where kubelet put it (plugin and volume name from
//! the host path of the mount), where each container mounts it, whether it lives on this node
//! only, and every regular file a process of the pod holds open on it (descriptors and mapped
//! files) with its size, mode and times. A restore checks, before anything is created, that the
//! new pod mounts the same volumes at the same container paths and that each held file is still
//! there unchanged (size and modification time); otherwise it refuses, naming each difference.
//!
//! The dump's record is `pod::dump::volumes`; the restore's check is `trust::volumes`.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

/// The plugin name recorded for a host directory mounted directly (a `hostPath` volume or any
/// other bind mount of the node's files that is not the pod's own).
pub const HOST_PATH: &str = "host-path";

/// Kubelet plugins whose volumes kubelet makes again from the API for every pod (or that the
/// checkpoint carries): never persistent.
const EPHEMERAL_PLUGINS: [&str; 6] = [
    "empty-dir",
    "secret",
    "configmap",
    "projected",
    "downward-api",
    "git-repo",
];

/// Kubelet plugins whose volumes exist on one node only.
const NODE_LOCAL_PLUGINS: [&str; 2] = ["local-volume", HOST_PATH];

/// What became of the pod at the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterDump {
    /// Killed at the snapshot (`--stop`): its volumes stayed as the checkpoint saw them, unless
    /// something else wrote to them.
    Stopped,
    /// Left running (`--leave-running`): its volumes went on changing after the checkpoint.
    LeftRunning,
    /// Dumped for a live migration: held frozen at the snapshot, then stopped, while its
    /// anonymous memory went to the target straight from the source's CRIU (it is not in the
    /// checkpoint: only the migration's target can restore it).
    Migrating,
}

impl AfterDump {
    pub fn describe(self) -> &'static str {
        match self {
            AfterDump::Stopped => "stopped at the snapshot (--stop)",
            AfterDump::LeftRunning => "left running (--leave-running)",
            AfterDump::Migrating => {
                "held for a live migration (its memory went to the target, not into the checkpoint)"
            }
        }
    }
}

/// A volume a pod mounts that the checkpoint does not carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistentVolume {
    /// Kubelet's plugin directory without `kubernetes.io~` (`csi`, `local-volume`, `nfs`...),
    /// or [`HOST_PATH`].
    pub plugin: String,
    /// The volume's name (kubelet's directory: the PersistentVolume's name for CSI, local and
    /// NFS volumes), or the host path for [`HOST_PATH`].
    pub name: String,
    /// Whether the volume exists on this node only (its content cannot follow the pod elsewhere
    /// unless the checkpoint carries it).
    pub node_local: bool,
    /// Where containers mount it.
    pub mounts: Vec<PvMount>,
    /// Regular files on it the pod's processes held open at the dump.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_files: Vec<HeldFile>,
    /// The archive of its content at the dump instant, relative to the checkpoint (see
    /// [`carried_archive`]), when the dump carried it (`podsnap dump --volumes`); `None`: the
    /// volume stayed where it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried: Option<String>,
}

impl PersistentVolume {
    /// `plugin/name`, as messages name it.
    pub fn label(&self) -> String {
        format!("{}/{}", self.plugin, self.name)
    }
}

/// The pod annotation that asks every dump of the pod to carry volumes, as `--volumes` does
/// (`local`, or volume names separated by commas): for dumps asked without the CLI (kubelet's
/// checkpoint API, `ctr`).
pub const CARRY_ANNOTATION: &str = "podsnap.io/carry-volumes";

/// Which of the pod's persistent volumes a dump carries in the checkpoint (their content
/// archived at the dump instant, like an emptyDir's, and put back before the restore).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Carry {
    /// None: every persistent volume stays where it is (the default).
    #[default]
    Nothing,
    /// Every node-local volume (`local-volume`, host paths): those that cannot follow the pod
    /// to another node otherwise.
    NodeLocal,
    /// The volumes named: a PersistentVolume's name, `plugin/name`, or a host path.
    Named(Vec<String>),
}

impl Carry {
    /// `none`, `local`, or names separated by commas.
    pub fn parse(text: &str) -> Result<Carry, String> {
        let text = text.trim();
        match text {
            "" | "none" => return Ok(Carry::Nothing),
            "local" => return Ok(Carry::NodeLocal),
            _ => {}
        }
        let names: Vec<String> = text
            .split(',')
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() || names.iter().any(|n| n.contains('\0') || n.len() > 4096) {
            return Err(format!(
                "{text:?}: say `local`, `none`, or the volumes' names separated by commas"
            ));
        }
        Ok(Carry::Named(names))
    }

    /// Whether the volume of `source` is carried.
    pub fn selects(&self, source: &VolumeSource) -> bool {
        match self {
            Carry::Nothing => false,
            Carry::NodeLocal => source.node_local,
            Carry::Named(names) => names
                .iter()
                .any(|n| *n == source.name || *n == format!("{}/{}", source.plugin, source.name)),
        }
    }

    /// The names asked for that no volume of the pod answers.
    pub fn unmatched<'a>(&'a self, sources: &[VolumeSource]) -> Vec<&'a str> {
        match self {
            Carry::Named(names) => names
                .iter()
                .filter(|n| {
                    !sources
                        .iter()
                        .any(|s| Carry::Named(vec![(*n).clone()]).selects(s))
                })
                .map(String::as_str)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Where the content of the `index`th carried volume goes in the checkpoint. The `~` keeps it
/// apart from the emptyDir archives (`volumes/<name>.tar`, whose names cannot hold one).
pub fn carried_archive(index: usize) -> String {
    format!("volumes/carried~{index}.tar")
}

/// One container's mount of a persistent volume.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PvMount {
    pub container: String,
    /// The mount's path in the container.
    pub path: String,
    /// The host directory mounted (on the node that took the checkpoint).
    pub source: String,
    pub read_only: bool,
}

/// A regular file on a persistent volume a process of the pod held open (a descriptor or a
/// mapping) at the dump, as it was then.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HeldFile {
    /// Relative to the volume's root (normal components only).
    pub path: String,
    pub size: u64,
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: (i64, i64),
    /// Inode change time.
    pub ctime: (i64, i64),
}

/// What a mount's host path says about the volume behind it, if it is a persistent one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSource {
    pub plugin: String,
    pub name: String,
    pub node_local: bool,
}

/// Classifies a kubelet volume by its host path: `<kubelet>/pods/<uid>/volumes/kubernetes.io~<plugin>/<name>[/...]`.
/// `None` for anything else and for the plugins kubelet makes again for every pod.
pub fn kubelet_volume(source: &str) -> Option<VolumeSource> {
    const MARK: &str = "/volumes/kubernetes.io~";
    let at = source.find(MARK)?;
    // `/pods/<uid>` just before the mark.
    let before = &source[..at];
    let (pods, _uid) = before.rsplit_once('/')?;
    if !pods.ends_with("/pods") {
        return None;
    }
    let rest = &source[at + MARK.len()..];
    let mut parts = rest.split('/');
    let plugin = parts.next().filter(|p| normal_name(p))?;
    let name = parts.next().filter(|n| normal_name(n))?;
    if EPHEMERAL_PLUGINS.contains(&plugin) {
        return None;
    }
    Some(VolumeSource {
        plugin: plugin.to_owned(),
        name: name.to_owned(),
        node_local: NODE_LOCAL_PLUGINS.contains(&plugin),
    })
}

/// A host directory mounted into a container that is neither a kubelet volume nor one of the
/// pod's own files (those the caller filters out first): a `hostPath` volume.
pub fn host_path_volume(source: &str) -> VolumeSource {
    VolumeSource {
        plugin: HOST_PATH.to_owned(),
        name: source.to_owned(),
        node_local: true,
    }
}

fn normal_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('\0')
}

/// A relative path with normal components only (what a held file's path must be).
pub fn is_normal_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Where a container path lies on the given mounts: the mount with the longest path that holds
/// it (whole components), and the path relative to that mount's root.
pub fn on_mount<'a, M>(
    mounts: &'a [M],
    path: &str,
    mount_path: impl Fn(&M) -> &str,
) -> Option<(&'a M, String)> {
    let path = Path::new(path);
    mounts
        .iter()
        .filter_map(|m| {
            let rel = path.strip_prefix(mount_path(m)).ok()?;
            Some((m, rel.to_string_lossy().into_owned(), mount_path(m).len()))
        })
        .max_by_key(|(_, _, len)| *len)
        .map(|(m, rel, _)| (m, rel))
}

/// The facts of a held file from its metadata (`path` relative to the volume root).
pub fn held_file(path: String, meta: &std::fs::Metadata) -> HeldFile {
    HeldFile {
        path,
        size: meta.size(),
        mode: meta.mode(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    }
}

/// Mount destinations CRI fills in for every container of a pod (the pod's own files).
const CRI_MANAGED: [&str; 5] = [
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/dev/shm",
    "/dev/termination-log",
];

/// A bind mount of a container as its spec gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecMount {
    pub source: String,
    pub destination: String,
    pub read_only: bool,
}

/// The bind mounts of an OCI spec.
pub fn bind_mounts(spec: &oci_spec::runtime::Spec) -> Vec<SpecMount> {
    spec.mounts()
        .iter()
        .flatten()
        .filter_map(|m| {
            let options = m.options().clone().unwrap_or_default();
            let bind =
                m.typ().as_deref() == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind");
            let source = m.source().as_ref().filter(|_| bind)?;
            Some(SpecMount {
                source: source.to_string_lossy().into_owned(),
                destination: m.destination().to_string_lossy().into_owned(),
                read_only: options.iter().any(|o| o == "ro"),
            })
        })
        .collect()
}

/// The persistent volume behind a container's bind mount, if it is one: a kubelet volume of a
/// plugin that is not made again for every pod, or a host directory that is neither the pod's
/// own (kubelet's pod directory, containerd's state) nor one CRI fills in.
pub fn persistent_source(mount: &SpecMount) -> Option<VolumeSource> {
    if CRI_MANAGED.contains(&mount.destination.as_str()) || mount.source.contains("/io.containerd.") {
        return None;
    }
    if mount.source.contains("/volumes/kubernetes.io~") {
        return kubelet_volume(&mount.source);
    }
    if in_kubelet_pod_dir(&mount.source) {
        return None;
    }
    Some(host_path_volume(&mount.source))
}

/// `.../pods/<uid>/{etc-hosts,containers,plugins,volumes}...`: a pod's own files kubelet keeps.
fn in_kubelet_pod_dir(source: &str) -> bool {
    let parts: Vec<&str> = source.split('/').collect();
    parts.windows(3).any(|w| {
        w[0] == "pods"
            && matches!(
                w[2],
                "etc-hosts" | "containers" | "plugins" | "volumes" | "volume-subpaths"
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_volumes_are_named_by_plugin_and_volume() {
        let csi =
            kubelet_volume("/var/lib/kubelet/pods/u-1/volumes/kubernetes.io~csi/pvc-9/mount").expect("csi");
        assert_eq!(
            (csi.plugin.as_str(), csi.name.as_str(), csi.node_local),
            ("csi", "pvc-9", false)
        );
        let local = kubelet_volume("/k/pods/u/volumes/kubernetes.io~local-volume/pv-local").expect("local");
        assert!(local.node_local);
        let nfs = kubelet_volume("/k/pods/u/volumes/kubernetes.io~nfs/share").expect("nfs");
        assert!(!nfs.node_local);
        for ephemeral in ["empty-dir", "secret", "configmap", "projected", "downward-api"] {
            assert_eq!(
                kubelet_volume(&format!("/k/pods/u/volumes/kubernetes.io~{ephemeral}/x")),
                None,
                "{ephemeral}"
            );
        }
        assert_eq!(kubelet_volume("/k/pods/u/volumes/kubernetes.io~csi/../etc"), None);
        assert_eq!(kubelet_volume("/k/pods/u/volumes/kubernetes.io~csi/"), None);
        assert_eq!(kubelet_volume("/k/notpods/u/volumes/kubernetes.io~csi/pv"), None);
        assert_eq!(kubelet_volume("/srv/data"), None);
    }

    #[test]
    fn a_path_lies_on_the_deepest_mount_by_whole_components() {
        let mounts = ["/data", "/data/wal", "/database"];
        let on = |p| on_mount(&mounts, p, |m| m).map(|(m, rel)| (*m, rel));
        assert_eq!(on("/data/wal/0001"), Some(("/data/wal", "0001".to_owned())));
        assert_eq!(on("/data/base/1"), Some(("/data", "base/1".to_owned())));
        assert_eq!(on("/database/x"), Some(("/database", "x".to_owned())));
        assert_eq!(on("/datab"), None);
    }

    #[test]
    fn held_file_paths_must_be_plain_relative() {
        assert!(is_normal_relative("pg_wal/0001"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "./a"] {
            assert!(!is_normal_relative(bad), "{bad}");
        }
    }

    #[test]
    fn only_volumes_that_outlive_the_pod_are_persistent() {
        let m = |source: &str, destination: &str| SpecMount {
            source: source.into(),
            destination: destination.into(),
            read_only: false,
        };
        let p = |source: &str, destination: &str| persistent_source(&m(source, destination));
        assert_eq!(p("/k/pods/u/etc-hosts", "/etc/hosts"), None);
        assert_eq!(
            p(
                "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/x/hostname",
                "/etc/hostname"
            ),
            None
        );
        assert_eq!(p("/k/pods/u/containers/app/1234", "/dev/termination-log"), None);
        assert_eq!(
            p("/k/pods/u/volumes/kubernetes.io~secret/token", "/var/run/secrets"),
            None
        );
        assert_eq!(
            p("/k/pods/u/volumes/kubernetes.io~empty-dir/scratch", "/scratch"),
            None
        );
        assert_eq!(
            p("/k/pods/u/volumes/kubernetes.io~csi/pv-1/mount", "/data").map(|v| v.name),
            Some("pv-1".into())
        );
        let host = p("/srv/db", "/var/lib/db").expect("a host directory");
        assert_eq!(
            (host.plugin.as_str(), host.name.as_str(), host.node_local),
            (HOST_PATH, "/srv/db", true)
        );
    }
}
