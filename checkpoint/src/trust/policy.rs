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
mod tests {
    use super::*;
    use crate::format::record::{ContainerState, Role};
    use std::collections::BTreeMap;

    fn policy() -> RestorePolicy {
        RestorePolicy::default()
    }

    #[test]
    fn own_namespace_only_by_default() {
        assert!(check_namespace(&policy(), Some("alpha"), "alpha", "cfg").is_ok());
        let v = check_namespace(&policy(), Some("alpha"), "beta", "cfg").expect_err("cross");
        assert_eq!(v.rule, "namespace");
        assert!(
            v.reason.contains("\"alpha\"") && v.reason.contains("\"beta\""),
            "{v:?}"
        );
        assert!(check_namespace(&policy(), None, "beta", "cfg").is_err());
    }

    #[test]
    fn the_policy_widens_and_narrows() {
        let mut p = policy();
        p.allow_from = BTreeMap::from([("beta".into(), vec!["alpha".into()])]);
        assert!(check_namespace(&p, Some("alpha"), "beta", "cfg").is_ok());
        assert!(check_namespace(&p, Some("beta"), "alpha", "cfg").is_err());
        p.allow_from = BTreeMap::from([("*".into(), vec!["shared".into()])]);
        assert!(check_namespace(&p, Some("shared"), "anyone", "cfg").is_ok());
        p.namespaces = Some(vec!["alpha".into()]);
        let v = check_namespace(&p, Some("beta"), "beta", "cfg").expect_err("narrowed");
        assert_eq!(v.rule, "restore.namespaces");
        p.enabled = false;
        let v = check_namespace(&p, Some("alpha"), "alpha", "cfg").expect_err("off");
        assert_eq!(v.rule, "restore.enabled");
    }

    fn entry(image: &str) -> ContainerEntry {
        ContainerEntry {
            name: "app".into(),
            id: "c".into(),
            role: Role::Container,
            image: Some(image.into()),
            image_id: Some("sha256:aaa".into()),
            image_digest: None,
            rootfs_layers: vec!["/s/2/fs".into(), "/s/1/fs".into()],
            created_order: 1,
            started_order: Some(1),
            state: ContainerState::Running,
            exit_code: None,
            dumped: true,
            cri_config: None,
        }
    }

    #[test]
    fn images_must_match_by_name_id_and_layers() {
        let e = entry("docker.io/library/busybox:latest");
        let layers = vec!["/s/2/fs".to_string(), "/s/1/fs".to_string()];
        let same = NewImage {
            name: Some("busybox"),
            id: Some("sha256:aaa"),
            layers: Some(&layers),
            same_node: true,
        };
        assert!(check_image(&e, &same).is_ok());
        let other_name = NewImage {
            name: Some("alpine"),
            ..same.clone()
        };
        assert_eq!(check_image(&e, &other_name).expect_err("name").rule, "image");
        let other_id = NewImage {
            id: Some("sha256:bbb"),
            ..same.clone()
        };
        assert!(check_image(&e, &other_id).is_err());
        let moved = vec!["/s/3/fs".to_string()];
        let other_layers = NewImage {
            layers: Some(&moved),
            ..same.clone()
        };
        assert!(check_image(&e, &other_layers).is_err());
        let elsewhere = NewImage {
            layers: Some(&moved),
            same_node: false,
            ..same
        };
        assert!(check_image(&e, &elsewhere).is_ok(), "layers are node-local");
    }

    fn spec(extra: serde_json::Value) -> Spec {
        let mut base = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "args": ["sh"], "cwd": "/",
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [1000]},
                "noNewPrivileges": true,
                "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"],
                                 "permitted": ["CAP_CHOWN"]},
                "apparmorProfile": "cri-default"
            },
            "root": {"path": "rootfs", "readonly": true},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/a"},
                               {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"],
                "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
                "resources": {"devices": [{"allow": false, "access": "rwm"}]}
            }
        });
        merge(&mut base, extra);
        serde_json::from_value(base).expect("spec")
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn the_same_spec_is_not_more_privilege() {
        let old = spec(serde_json::json!({}));
        let new = spec(serde_json::json!({"linux": {"namespaces": [
            {"type": "pid"}, {"type": "network", "path": "/var/run/netns/other"},
            {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}}));
        assert!(check_privilege("app", &old, &new).is_ok());
        let less = spec(serde_json::json!({"process": {"capabilities": {"bounding": []}}}));
        assert!(check_privilege("app", &old, &less).is_ok());
    }

    #[test]
    fn every_kind_of_escalation_is_named() {
        let old = spec(serde_json::json!({}));
        let cases = [
            (
                serde_json::json!({"process": {"user": {"uid": 0}}}),
                "runs as 0:1000",
            ),
            (
                serde_json::json!({"process": {"user": {"additionalGids": [1000, 0]}}}),
                "supplementary groups [0]",
            ),
            (
                serde_json::json!({"process": {"capabilities": {"bounding": ["CAP_CHOWN", "CAP_SYS_ADMIN"]}}}),
                "bounding capabilities CAP_SYS_ADMIN added",
            ),
            (
                serde_json::json!({"process": {"noNewPrivileges": false}}),
                "no_new_privileges dropped",
            ),
            (
                serde_json::json!({"process": {"apparmorProfile": "unconfined"}}),
                "AppArmor profile",
            ),
            (serde_json::json!({"root": {"readonly": false}}), "read-only root"),
            (
                serde_json::json!({"linux": {"seccomp": null}}),
                "seccomp filter removed",
            ),
            (
                serde_json::json!({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}}),
                "different seccomp",
            ),
            (
                serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}}),
                "host's network namespace",
            ),
            (
                serde_json::json!({"linux": {"devices": [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]}}),
                "device nodes /dev/sda",
            ),
            (
                serde_json::json!({"linux": {"resources": {"devices": [{"allow": true, "access": "rwm"}]}}}),
                "device access",
            ),
            (
                serde_json::json!({"linux": {"maskedPaths": []}}),
                "masked paths /proc/kcore uncovered",
            ),
            (
                serde_json::json!({"linux": {"readonlyPaths": []}}),
                "read-only paths /proc/sys uncovered",
            ),
        ];
        for (change, want) in cases {
            let new = spec(change.clone());
            let v = check_privilege("app", &old, &new).expect_err(&change.to_string());
            assert_eq!(v.rule, "privilege");
            assert!(v.reason.contains(want), "{change}: {}", v.reason);
        }
    }

    #[test]
    fn hosts_must_be_able_to_run_the_images() {
        let rec = HostInfo {
            criu_version: "4.2.1".into(),
            runc_version: "1.1.5".into(),
            kernel: "6.18.0".into(),
            arch: "x86_64".into(),
            node_id: "n1".into(),
        };
        assert!(check_host(&rec, &rec).is_ok());
        let newer = HostInfo {
            criu_version: "4.3".into(),
            kernel: "6.19.1-custom".into(),
            ..rec.clone()
        };
        assert!(check_host(&rec, &newer).is_ok());
        let old = HostInfo {
            criu_version: "4.1.1".into(),
            kernel: "6.1.0".into(),
            arch: "aarch64".into(),
            ..rec.clone()
        };
        let v = check_host(&rec, &old).expect_err("old");
        assert_eq!(v.rule, "compatibility");
        for want in ["aarch64", "CRIU 4.1.1", "6.1.0"] {
            assert!(v.reason.contains(want), "{}", v.reason);
        }
    }

    #[test]
    fn host_paths_are_allowed_by_whole_resolved_components() {
        let t = tempfile::tempdir().expect("tempdir");
        let base = std::fs::canonicalize(t.path()).expect("canonical");
        for d in ["etc/ssl", "etcfoo", "allowed/sub", "secret"] {
            std::fs::create_dir_all(base.join(d)).expect("mkdir");
        }
        std::os::unix::fs::symlink(base.join("secret"), base.join("allowed/link")).expect("symlink");
        std::os::unix::fs::symlink(base.join("gone"), base.join("allowed/dangling")).expect("symlink");
        let mut p = policy();
        p.host_paths = vec![base.join("etc/"), base.join("secret/../allowed")];
        let check = |source: PathBuf| check_host_path(&p, "app", "/mnt", &source, "cfg");
        for (source, resolved) in [
            (base.join("etc"), base.join("etc")),
            (base.join("etc/ssl"), base.join("etc/ssl")),
            (base.join("etc//ssl/./"), base.join("etc/ssl")),
            (base.join("etc/ssl/not-yet"), base.join("etc/ssl/not-yet")),
            (base.join("allowed/sub"), base.join("allowed/sub")),
            (base.join("etcfoo/../etc/ssl"), base.join("etc/ssl")),
        ] {
            assert_eq!(check(source.clone()), Ok(resolved), "{}", source.display());
        }
        for (source, named) in [
            (base.join("etcfoo"), base.join("etcfoo")),
            (base.join("allowed/../etcfoo"), base.join("etcfoo")),
            (base.join("allowed/link"), base.join("secret")),
            (base.join("allowed/link/x"), base.join("secret/x")),
            (base.clone(), base.clone()),
        ] {
            let v = check(source.clone()).expect_err(&source.display().to_string());
            assert_eq!(v.rule, "restore.host_paths");
            assert!(
                v.reason.contains(&format!("host path {} ", named.display()))
                    && v.reason.contains("container app")
                    && v.reason.contains("cfg"),
                "{}: {}",
                source.display(),
                v.reason
            );
        }
        for (source, why) in [
            (base.join("allowed/nothing/../../etcfoo"), "'..'"),
            (base.join("allowed/dangling"), "a symlink to nothing"),
            (PathBuf::from("etc"), "not an absolute path"),
        ] {
            let v = check(source.clone()).expect_err(&source.display().to_string());
            assert!(v.reason.contains(why), "{}: {}", source.display(), v.reason);
        }
        // None allowed by default, / allows every path.
        let v = check_host_path(&policy(), "app", "/mnt", &base.join("etc"), "cfg");
        assert!(v.is_err());
        p.host_paths = vec![PathBuf::from("/")];
        assert!(check_host_path(&p, "app", "/mnt", &base.join("etcfoo"), "cfg").is_ok());
    }

    #[test]
    fn image_names_normalize_like_docker() {
        assert!(same_image_name("busybox", "docker.io/library/busybox:latest"));
        assert!(same_image_name(
            "localhost/podsnap/workload:1",
            "localhost/podsnap/workload:1"
        ));
        assert!(!same_image_name("busybox:1", "busybox:2"));
        assert!(!same_image_name("a/b", "c/b"));
    }

    #[test]
    fn a_tag_and_a_digest_of_one_repository_agree() {
        for (reference, repository) in [
            ("busybox", "docker.io/library/busybox"),
            ("busybox:1.36", "docker.io/library/busybox"),
            ("docker.io/library/busybox@sha256:ab", "docker.io/library/busybox"),
            ("team/app:v1", "docker.io/team/app"),
            ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app"),
            ("127.0.0.1:5000/team/app@sha256:ab", "127.0.0.1:5000/team/app"),
            ("localhost/podsnap/workload:1", "localhost/podsnap/workload"),
        ] {
            assert_eq!(image_repository(reference), repository, "{reference}");
        }
    }
}

#[cfg(test)]
mod proptests;
