//! Who may restore what: the checks a restore passes before anything of it runs.
//!
//! A checkpoint holds a pod's memory (secrets) and its processes' credentials, so restoring it
//! is granting them. The rules, each named in the refusal it causes:
//!
//! - `restore.enabled`, `restore.namespaces` (node configuration): restores on this node at
//!   all, and which namespaces' pods may restore.
//! - `namespace`: a pod restores only checkpoints taken in its own namespace, unless
//!   `restore.allow_from` names the checkpoint's namespace for the pod's (or for `*`).
//! - `image`: each container comes back on the image it was checkpointed with: the same image
//!   name, the same image id (digest) where the restore can see it (the CLI asks CRI), and, on
//!   the node the checkpoint was taken on, the very same layers (overlay lower directories).
//! - `privilege`: a restored container gets no more privilege than the checkpointed one had:
//!   the same user and group and no new supplementary groups, no capability it lacked, no
//!   dropped `no_new_privileges`, the same seccomp, AppArmor and SELinux confinement, no host
//!   namespace it did not share, no device it could not use, no masked or read-only path
//!   uncovered, no read-only root made writable.
//! - `compatibility`: the node can run the images: the same architecture, a CRIU and a kernel
//!   at least as new as the checkpoint's, and CPU features CRIU accepts.
//! - `restore.host_paths` (node configuration): `podsnap restore`, which makes the pod through
//!   CRI itself (no admission control sees it), bind-mounts a host path of a checkpointed spec
//!   again only under a prefix the node allows ([`check_host_path`]). Under kubelet the pod
//!   spec says what is mounted, and this rule does not apply.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::Serialize;

use crate::config::RestorePolicy;
pub use crate::error::Violation;
use crate::format::manifest::{ContainerEntry, HostInfo};

/// May a pod of namespace `target` restore a checkpoint taken in namespace `source`?
pub fn check_namespace(
    policy: &RestorePolicy,
    source: Option<&str>,
    target: &str,
    config_name: &str,
) -> Result<(), Violation> {
    if !policy.enabled {
        return Err(Violation::new(
            "restore.enabled",
            format!("restores are turned off on this node ({config_name})"),
        ));
    }
    if let Some(allowed) = &policy.namespaces {
        if !allowed.iter().any(|n| n == target) {
            return Err(Violation::new(
                "restore.namespaces",
                format!("pods of namespace {target:?} may not restore on this node ({config_name})"),
            ));
        }
    }
    let source = source.unwrap_or("");
    if source == target {
        return Ok(());
    }
    let widened = [target, "*"]
        .iter()
        .filter_map(|key| policy.allow_from.get(*key))
        .flatten()
        .any(|n| n == source);
    if widened {
        return Ok(());
    }
    Err(Violation::new(
        "namespace",
        format!(
            "the checkpoint was taken in namespace {source:?} and the pod is in {target:?}; a pod \
             restores only checkpoints of its own namespace unless restore.allow_from in \
             {config_name} allows {source:?} for {target:?}"
        ),
    ))
}

/// What the restoring side knows of the image a new container runs.
#[derive(Debug, Clone, Default)]
pub struct NewImage<'a> {
    /// The image name (CRI's `io.kubernetes.cri.image-name`).
    pub name: Option<&'a str>,
    /// The image id (digest), when the restoring side can ask CRI.
    pub id: Option<&'a str>,
    /// The overlay lower directories of the new rootfs, top first.
    pub layers: Option<&'a [String]>,
    /// Whether this node is the one the checkpoint was taken on (layers are node-local).
    pub same_node: bool,
}

/// Does the new container run the image the checkpointed one ran?
pub fn check_image(entry: &ContainerEntry, new: &NewImage<'_>) -> Result<(), Violation> {
    let who = &entry.name;
    if let (Some(old), Some(new)) = (entry.image.as_deref(), new.name) {
        if !same_image_name(old, new) {
            return Err(Violation::new(
                "image",
                format!("container {who} was checkpointed on image {old} and would run {new}"),
            ));
        }
    }
    if let (Some(old), Some(new)) = (entry.image_id.as_deref(), new.id) {
        if old != new {
            return Err(Violation::new(
                "image",
                format!("container {who} was checkpointed on image id {old} and the node's image is {new}"),
            ));
        }
    }
    if new.same_node && !entry.rootfs_layers.is_empty() {
        if let Some(layers) = new.layers {
            if layers != entry.rootfs_layers.as_slice() {
                return Err(Violation::new(
                    "image",
                    format!(
                        "container {who}'s new root filesystem is not made of the layers it was \
                         checkpointed on (the image changed since the checkpoint)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `docker.io/library/busybox:latest` and `busybox` name the same image.
fn same_image_name(a: &str, b: &str) -> bool {
    fn normal(n: &str) -> String {
        let (name, digest) = match n.split_once('@') {
            Some((name, d)) => (name, Some(d)),
            None => (n, None),
        };
        let last = name.rsplit('/').next().unwrap_or(name);
        let mut name = name.to_owned();
        if digest.is_none() && !last.contains(':') {
            name.push_str(":latest");
        }
        let first = name.split('/').next().unwrap_or("");
        let has_registry =
            name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
        if !has_registry {
            name = if name.contains('/') {
                format!("docker.io/{name}")
            } else {
                format!("docker.io/library/{name}")
            };
        }
        match digest {
            Some(d) => format!("{name}@{d}"),
            None => name,
        }
    }
    a == b || normal(a) == normal(b)
}

/// The repository an image reference names, normalized as containerd does (`busybox:1`,
/// `docker.io/library/busybox@sha256:...` -> `docker.io/library/busybox`): what a tag and a
/// digest of the same image have in common.
pub fn image_repository(reference: &str) -> String {
    let name = reference.split_once('@').map_or(reference, |(n, _)| n);
    // A tag follows the last ':' after the last '/' (a registry's port comes before it).
    let name = match name.rfind(':') {
        Some(colon) if !name[colon..].contains('/') => &name[..colon],
        _ => name,
    };
    let first = name.split('/').next().unwrap_or("");
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    match (has_registry, name.contains('/')) {
        (true, _) => name.to_owned(),
        (false, true) => format!("docker.io/{name}"),
        (false, false) => format!("docker.io/library/{name}"),
    }
}

/// May `podsnap restore` bind-mount the host path `source` (container `name`'s mount at
/// `destination` in the checkpointed spec) again? Only under a prefix of `restore.host_paths`,
/// compared by whole path components once both are resolved ([`resolve_host_path`]): `/etc`
/// allows `/etc/ssl`, never `/etcfoo`, and neither `..` nor a symlink under an allowed prefix
/// leads out of it. Returns the resolved path: the one to mount, so the mount is made where
/// the check looked.
pub fn check_host_path(
    policy: &RestorePolicy,
    name: &str,
    destination: &str,
    source: &Path,
    config_name: &str,
) -> Result<PathBuf, Violation> {
    let rule = "restore.host_paths";
    let resolved = resolve_host_path(source).map_err(|why| {
        Violation::new(
            rule,
            format!(
                "container {name} mounts host path {} at {destination}, which is refused: {why}",
                source.display()
            ),
        )
    })?;
    let allowed = policy
        .host_paths
        .iter()
        .filter_map(|prefix| resolve_host_path(prefix).ok())
        .any(|prefix| resolved.starts_with(prefix));
    if allowed {
        return Ok(resolved);
    }
    let named = if resolved == source {
        String::new()
    } else {
        format!(" (the checkpoint names {})", source.display())
    };
    Err(Violation::new(
        rule,
        format!(
            "container {name} mounts host path {}{named} at {destination}, and no prefix in \
             [restore] host_paths of {config_name} allows it: add one there to let podsnap \
             restore mount it again (a restore through kubelet mounts what the pod spec asks)",
            resolved.display()
        ),
    ))
}

/// `path` as the kernel reaches it: its existing part with every symlink, `.` and `..`
/// resolved (`realpath`), then the part that does not exist yet (CRI creates a missing host
/// path) as written, which may hold no `..` and pass through no dangling symlink.
pub fn resolve_host_path(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err("it is not an absolute path".into());
    }
    let mut existing = path.to_path_buf();
    let mut missing: Vec<OsString> = Vec::new();
    let real = loop {
        match std::fs::canonicalize(&existing) {
            Ok(real) => break real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::fs::symlink_metadata(&existing).is_ok() {
                    return Err(format!("{} is a symlink to nothing", existing.display()));
                }
                match existing.components().next_back() {
                    Some(Component::Normal(last)) => missing.push(last.to_os_string()),
                    Some(Component::ParentDir) => {
                        return Err("'..' follows a directory that does not exist".into())
                    }
                    _ => return Err(format!("it cannot be resolved ({e})")),
                }
                existing.pop();
            }
            Err(e) => return Err(format!("it cannot be resolved ({e})")),
        }
    };
    Ok(missing.iter().rev().fold(real, |mut p, c| {
        p.push(c);
        p
    }))
}

/// Everything the new spec grants that the checkpointed one did not.
pub fn check_privilege(name: &str, old: &Spec, new: &Spec) -> Result<(), Violation> {
    let found = more_privilege(old, new);
    if found.is_empty() {
        return Ok(());
    }
    Err(Violation::new(
        "privilege",
        format!(
            "container {name} would get more privilege than it was checkpointed with: {}",
            found.join("; ")
        ),
    ))
}

fn more_privilege(old: &Spec, new: &Spec) -> Vec<String> {
    let mut out = Vec::new();
    let (op, np) = (old.process().as_ref(), new.process().as_ref());
    if let (Some(op), Some(np)) = (op, np) {
        let (ou, nu) = (op.user(), np.user());
        if ou.uid() != nu.uid() || ou.gid() != nu.gid() {
            out.push(format!(
                "runs as {}:{} instead of {}:{}",
                nu.uid(),
                nu.gid(),
                ou.uid(),
                ou.gid()
            ));
        }
        let old_groups: HashSet<u32> = ou.additional_gids().iter().flatten().copied().collect();
        let extra: Vec<u32> = nu
            .additional_gids()
            .iter()
            .flatten()
            .filter(|g| !old_groups.contains(g))
            .copied()
            .collect();
        if !extra.is_empty() {
            out.push(format!("supplementary groups {extra:?} added"));
        }
        let caps = |p: &oci_spec::runtime::Process| {
            p.capabilities().as_ref().map(|c| {
                [
                    ("bounding", c.bounding().clone()),
                    ("effective", c.effective().clone()),
                    ("permitted", c.permitted().clone()),
                    ("inheritable", c.inheritable().clone()),
                    ("ambient", c.ambient().clone()),
                ]
            })
        };
        let (oc, nc) = (caps(op), caps(np));
        for i in 0..5 {
            let set_name = ["bounding", "effective", "permitted", "inheritable", "ambient"][i];
            let old_set = oc.as_ref().and_then(|c| c[i].1.clone()).unwrap_or_default();
            let new_set = nc.as_ref().and_then(|c| c[i].1.clone()).unwrap_or_default();
            let mut added: Vec<String> = new_set
                .difference(&old_set)
                .map(|c| to_json(c).trim_matches('"').to_owned())
                .collect();
            if !added.is_empty() {
                added.sort();
                out.push(format!("{set_name} capabilities {} added", added.join(", ")));
            }
        }
        if op.no_new_privileges() == Some(true) && np.no_new_privileges() != Some(true) {
            out.push("no_new_privileges dropped".into());
        }
        confinement(
            &mut out,
            "AppArmor profile",
            op.apparmor_profile().as_deref(),
            np.apparmor_profile().as_deref(),
        );
        confinement(
            &mut out,
            "SELinux label",
            op.selinux_label().as_deref(),
            np.selinux_label().as_deref(),
        );
    }
    if old.root().as_ref().and_then(|r| r.readonly()) == Some(true)
        && new.root().as_ref().and_then(|r| r.readonly()) != Some(true)
    {
        out.push("read-only root filesystem made writable".into());
    }
    let (ol, nl) = (old.linux().as_ref(), new.linux().as_ref());
    let Some(ol) = ol else {
        return out;
    };
    let Some(nl) = nl else {
        out.push("no Linux confinement at all".into());
        return out;
    };
    let json = |v: &Option<oci_spec::runtime::LinuxSeccomp>| v.as_ref().map(to_json);
    match (json(ol.seccomp()), json(nl.seccomp())) {
        (Some(_), None) => out.push("seccomp filter removed".into()),
        (Some(a), Some(b)) if a != b => out.push("a different seccomp filter".into()),
        _ => {}
    }
    let kinds = |l: &oci_spec::runtime::Linux| -> HashSet<String> {
        l.namespaces()
            .iter()
            .flatten()
            .map(|n| format!("{:?}", n.typ()))
            .collect()
    };
    let (on, nn) = (kinds(ol), kinds(nl));
    for t in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
        LinuxNamespaceType::User,
        LinuxNamespaceType::Cgroup,
    ] {
        let k = format!("{t:?}");
        if on.contains(&k) && !nn.contains(&k) {
            out.push(format!("shares the host's {} namespace", k.to_lowercase()));
        }
    }
    let nodes = |l: &oci_spec::runtime::Linux| -> HashSet<String> {
        l.devices()
            .iter()
            .flatten()
            .map(|d| {
                format!(
                    "{} ({:?} {}:{})",
                    d.path().display(),
                    d.typ(),
                    d.major(),
                    d.minor()
                )
            })
            .collect()
    };
    let old_nodes = nodes(ol);
    let mut extra: Vec<String> = nodes(nl).difference(&old_nodes).cloned().collect();
    extra.sort();
    if !extra.is_empty() {
        out.push(format!("device nodes {} added", extra.join(", ")));
    }
    let allowed = |l: &oci_spec::runtime::Linux| -> HashSet<String> {
        l.resources()
            .as_ref()
            .and_then(|r| r.devices().clone())
            .unwrap_or_default()
            .iter()
            .filter(|d| d.allow())
            .map(to_json)
            .collect()
    };
    let old_allowed = allowed(ol);
    let extra: Vec<String> = allowed(nl).difference(&old_allowed).cloned().collect();
    if !extra.is_empty() {
        out.push(format!("device access {} allowed", extra.join(", ")));
    }
    let paths = |v: &Option<Vec<String>>| -> HashSet<String> { v.iter().flatten().cloned().collect() };
    for (what, o, n) in [
        ("masked", ol.masked_paths(), nl.masked_paths()),
        ("read-only", ol.readonly_paths(), nl.readonly_paths()),
    ] {
        let now = paths(n);
        let mut lost: Vec<String> = paths(o).difference(&now).cloned().collect();
        lost.sort();
        if !lost.is_empty() {
            out.push(format!("{what} paths {} uncovered", lost.join(", ")));
        }
    }
    out
}

fn confinement(out: &mut Vec<String>, what: &str, old: Option<&str>, new: Option<&str>) {
    fn confining(p: Option<&str>) -> Option<&str> {
        p.filter(|p| !p.is_empty() && *p != "unconfined")
    }
    if let Some(o) = confining(old) {
        if confining(new) != Some(o) {
            out.push(format!("{what} {o} replaced by {}", new.unwrap_or("none")));
        }
    }
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Can this node run images taken on `recorded`? (CPU features are checked by CRIU apart.)
pub fn check_host(recorded: &HostInfo, here: &HostInfo) -> Result<(), Violation> {
    let mut found = Vec::new();
    if !recorded.arch.is_empty() && recorded.arch != here.arch {
        found.push(format!(
            "taken on {} and this node is {}",
            recorded.arch, here.arch
        ));
    }
    if older(&here.criu_version, &recorded.criu_version) {
        found.push(format!(
            "taken with CRIU {} and this node has CRIU {}",
            recorded.criu_version, here.criu_version
        ));
    }
    if older(&here.kernel, &recorded.kernel) {
        found.push(format!(
            "taken on Linux {} and this node runs the older {}",
            recorded.kernel, here.kernel
        ));
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(Violation::new("compatibility", found.join("; ")))
    }
}

/// Whether version `a` is older than `b` by major.minor (unknown versions are not compared).
fn older(a: &str, b: &str) -> bool {
    fn major_minor(v: &str) -> Option<(u64, u64)> {
        let mut parts = v
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<u64>().ok());
        Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
    }
    match (major_minor(a), major_minor(b)) {
        (Some(a), Some(b)) => a < b,
        _ => false,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
