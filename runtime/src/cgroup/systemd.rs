//! Where a spec's `linux.cgroupsPath` puts a container, for both cgroup drivers.
//!
//! - cgroupfs: the path itself, relative to each hierarchy's root (`/kubepods/besteffort/
//!   pod<uid>/<id>` is `<root>[/<controller>]/kubepods/besteffort/pod<uid>/<id>`).
//! - systemd (`runc --systemd-cgroup`, containerd's `SystemdCgroup = true`): the path is
//!   `slice:prefix:name`. The container gets the unit `<prefix>-<name>.scope` (or the unit
//!   `name` when that is itself a `.slice`) inside `slice`, and systemd nests a slice in the
//!   slices its dashes name: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`; `-.slice` is the
//!   root; an empty slice means `system.slice`. kubelet's pod slices read
//!   `kubepods-besteffort-pod<uid with _ for ->.slice`.

use std::path::PathBuf;

use crate::{Error, Result};

/// The container's cgroup directory relative to each hierarchy's root.
pub fn relative_dir(cgroups_path: &str, systemd: bool) -> Result<PathBuf> {
    if systemd {
        return systemd_dir(cgroups_path);
    }
    if cgroups_path.is_empty() {
        return Err(invalid(cgroups_path, "it is empty"));
    }
    if !cgroups_path.starts_with('/') {
        // runc nests a relative path under its own cgroup, which only the process can tell.
        return Err(invalid(cgroups_path, "it is relative to runc's own cgroup"));
    }
    let rel = PathBuf::from(cgroups_path.trim_start_matches('/'));
    if rel
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(invalid(cgroups_path, "it leaves the hierarchy"));
    }
    Ok(rel)
}

/// `slice:prefix:name` resolved to its directory relative to the hierarchy's root.
pub fn systemd_dir(cgroups_path: &str) -> Result<PathBuf> {
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err(invalid(
            cgroups_path,
            "the systemd driver takes slice:prefix:name",
        ));
    };
    if name.is_empty() || name.contains('/') || prefix.contains('/') {
        return Err(invalid(cgroups_path, "the unit name is empty or holds a /"));
    }
    let slice = if slice.is_empty() { "system.slice" } else { slice };
    let mut dir = expand_slice(slice).map_err(|reason| invalid(cgroups_path, &reason))?;
    if name.ends_with(".slice") {
        dir.push(name);
    } else {
        dir.push(format!("{prefix}-{name}.scope"));
    }
    Ok(dir)
}

/// A slice unit's directory: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`, `-.slice` the
/// root (an empty path).
pub fn expand_slice(slice: &str) -> std::result::Result<PathBuf, String> {
    let Some(base) = slice.strip_suffix(".slice") else {
        return Err(format!("{slice:?} is not a slice (no .slice suffix)"));
    };
    if base == "-" {
        return Ok(PathBuf::new());
    }
    if base.is_empty()
        || base.contains('/')
        || base.starts_with('-')
        || base.ends_with('-')
        || base.contains("--")
    {
        return Err(format!("{slice:?} is not a valid slice name"));
    }
    let mut dir = PathBuf::new();
    let mut prefix = String::new();
    for part in base.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        dir.push(format!("{prefix}.slice"));
    }
    Ok(dir)
}

/// kubelet's slice for a BestEffort pod under the systemd driver (dashes of the uid become
/// underscores, since a dash nests).
pub fn besteffort_pod_slice(uid: &str) -> String {
    format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"))
}

fn invalid(cgroups_path: &str, reason: &str) -> Error {
    Error::Invalid {
        what: "cgroups path",
        reason: format!("{cgroups_path:?}: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn slices_nest_by_their_dashes() {
        assert_eq!(
            expand_slice("kubepods-besteffort-pod1_2.slice").expect("valid"),
            Path::new("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice")
        );
        assert_eq!(
            expand_slice("system.slice").expect("valid"),
            Path::new("system.slice")
        );
        assert_eq!(expand_slice("-.slice").expect("root"), Path::new(""));
        for bad in [
            "kubepods",
            "-a.slice",
            "a-.slice",
            "a--b.slice",
            "a/b.slice",
            ".slice",
        ] {
            assert!(expand_slice(bad).is_err(), "{bad} is refused");
        }
    }

    #[test]
    fn kubelet_and_containerd_paths_resolve_to_the_scope() {
        let uid = "0f1e2d3c-aaaa-bbbb-cccc-123456789abc";
        let path = format!("{}:cri-containerd:abc123", besteffort_pod_slice(uid));
        assert_eq!(
            relative_dir(&path, true).expect("systemd"),
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod0f1e2d3c_aaaa_bbbb_cccc_123456789abc.slice/\
                 cri-containerd-abc123.scope"
            )
        );
        assert_eq!(
            relative_dir(":runc:c1", true).expect("default slice"),
            Path::new("system.slice/runc-c1.scope")
        );
        assert_eq!(
            relative_dir("-.slice:x:inner.slice", true).expect("a slice unit"),
            Path::new("inner.slice")
        );
        for bad in [
            "kubepods.slice:cri-containerd",
            "a:b:c:d",
            "kubepods:p:n",
            "a.slice:p:",
            "a.slice:p:x/y",
        ] {
            assert!(relative_dir(bad, true).is_err(), "{bad} is refused");
        }
    }

    #[test]
    fn cgroupfs_paths_are_taken_as_they_are() {
        assert_eq!(
            relative_dir("/kubepods/besteffort/podu/c1", false).expect("cgroupfs"),
            Path::new("kubepods/besteffort/podu/c1")
        );
        assert!(relative_dir("", false).is_err());
        assert!(relative_dir("relative/x", false).is_err());
        assert!(relative_dir("/a/../../etc", false).is_err());
        // A systemd-looking path under the cgroupfs driver is a plain (odd) directory name.
        assert_eq!(
            relative_dir("/a.slice:p:n", false).expect("cgroupfs"),
            Path::new("a.slice:p:n")
        );
    }
}
