//! Looking at (and cleaning) the host: processes, mounts, network namespaces, cgroups, links.

use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The directory CRI puts pod network namespaces in (containerd's default,
/// `netns_mounts_under_state_dir = false`).
pub const NETNS_DIR: &str = "/var/run/netns";
/// The cgroup v1 hierarchy root.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A process's command line, split at NULs; `None` when it is gone or a kernel thread.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if bytes.is_empty() {
        return None;
    }
    Some(
        bytes
            .split(|&b| b == 0)
            .filter(|part| !part.is_empty())
            .map(|part| String::from_utf8_lossy(part).into_owned())
            .collect(),
    )
}

/// Every process with a command line: (pid, argv).
pub fn processes() -> Vec<(i32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, cmdline(pid)?)))
        .collect()
}

fn argv0_name(argv: &[String]) -> &str {
    argv.first()
        .map(|a| a.rsplit('/').next().unwrap_or(a))
        .unwrap_or_default()
}

fn has_address(argv: &[String], address: &Path) -> bool {
    let address = address.to_string_lossy();
    argv.windows(2)
        .any(|w| w[0] == "-address" && w[1] == address.as_ref())
}

/// Shim processes of binary `name` (e.g. `containerd-shim-podsnap-v1`) serving the containerd
/// at `address`: argv[0] ends with `name` and the arguments hold `-address <address>`.
pub fn shim_pids(name: &str, address: &Path) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, argv)| argv0_name(argv) == name && has_address(argv, address))
        .map(|(pid, _)| pid)
        .collect()
}

/// Every shim (any `containerd-shim-*` binary) serving the containerd at `address`.
pub fn all_shim_pids(address: &Path) -> Vec<i32> {
    processes()
        .into_iter()
        .filter(|(_, argv)| argv0_name(argv).starts_with("containerd-shim") && has_address(argv, address))
        .map(|(pid, _)| pid)
        .collect()
}

/// Where containerd's shim API puts a shim's socket: `/run/containerd/s/<hex sha256 of
/// "<containerd address>/<namespace>/<id>">` (the id is the group's, for a pod the sandbox id).
pub fn shim_socket(address: &Path, namespace: &str, id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let key = format!("{}/{namespace}/{id}", address.display());
    Path::new(SHIM_SOCKET_DIR).join(hex::encode(Sha256::digest(key.as_bytes())))
}

/// The directory of shim sockets, shared by every containerd on the host.
pub const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

/// runc state roots of the runtimes we run: containerd's Go shim uses
/// `/run/containerd/runc/<namespace>`, ours `/run/podsnap/runc/<namespace>`.
pub const RUNC_ROOT_PARENTS: [&str; 2] = ["/run/containerd/runc", "/run/podsnap/runc"];

/// Every file or directory under `roots` whose name contains one of `ids` (state a runtime
/// keeps per container: runc state dirs, pod records, console sockets).
pub fn paths_named_after(roots: &[&str], ids: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = roots.iter().map(PathBuf::from).collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if ids.iter().any(|id| !id.is_empty() && name.contains(id)) {
                found.push(entry.path());
            } else if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(entry.path());
            }
        }
    }
    found
}

/// Whether `pid` exists (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: i32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid), signal);
}

/// Waits up to `timeout` for every pid in `pids` to be gone; returns the ones still alive.
pub fn wait_gone(pids: &[i32], timeout: std::time::Duration) -> Vec<i32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || std::time::Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The mount points of this process's mount namespace, in `/proc/self/mountinfo`'s order
/// (field 5, its `\ooo` escapes decoded).
pub fn mount_points() -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStringExt;
    let table = std::fs::read("/proc/self/mountinfo")?;
    let mut points = Vec::new();
    for line in table.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let field = line.split(|b| *b == b' ').nth(4).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a mountinfo line of under 5 fields",
            )
        })?;
        let mut point = Vec::with_capacity(field.len());
        let mut i = 0;
        while i < field.len() {
            let octal = field
                .get(i + 1..i + 4)
                .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
                .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')));
            match octal.and_then(|v| u8::try_from(v).ok()) {
                Some(byte) => {
                    point.push(byte);
                    i += 4;
                }
                None => {
                    point.push(field[i]);
                    i += 1;
                }
            }
        }
        points.push(PathBuf::from(std::ffi::OsString::from_vec(point)));
    }
    Ok(points)
}

/// How a host's cgroups are laid out at a root (`/sys/fs/cgroup`): the statfs magic of the
/// root, or of its `unified` directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v1 only.
    Legacy,
    /// v1, with cgroup2 at `unified/`.
    Hybrid,
    /// cgroup2 at the root.
    Unified,
}

impl CgroupMode {
    pub fn detect(root: &Path) -> Self {
        let is_cgroup2 = |p: &Path| {
            nix::sys::statfs::statfs(p)
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        };
        if is_cgroup2(root) {
            Self::Unified
        } else if is_cgroup2(&root.join("unified")) {
            Self::Hybrid
        } else {
            Self::Legacy
        }
    }
}

/// `dir` and every directory below it, parents before children.
pub fn cgroup_tree(dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
            let below: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect();
            dirs.extend(below);
        }
        i += 1;
    }
    dirs
}

/// Mount points in this process's mount namespace (the host's) at or under `prefix`,
/// deepest (and most recently mounted) first: the order to unmount them in.
pub fn mounts_under(prefix: &Path) -> Vec<PathBuf> {
    let Ok(table) = mount_points() else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = table
        .into_iter()
        .filter(|point| point.starts_with(prefix))
        .collect();
    // Later mounts may sit on top of earlier ones: reverse mount order, then deepest first.
    mounts.reverse();
    mounts.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    mounts
}

/// Unmounts everything at or under `prefix`, deepest first, lazily when a plain unmount fails.
/// Returns what could not be unmounted, with the reason.
pub fn unmount_all_under(prefix: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    // A path can be mounted several times over; go round until nothing is left.
    for _ in 0..8 {
        let mounts = mounts_under(prefix);
        if mounts.is_empty() {
            return failures;
        }
        for point in mounts {
            if umount2(&point, MntFlags::empty()).is_err() {
                if let Err(e) = umount2(&point, MntFlags::MNT_DETACH) {
                    failures.push(format!("umount {}: {e}", point.display()));
                }
            }
        }
    }
    failures.extend(
        mounts_under(prefix)
            .into_iter()
            .map(|p| format!("still mounted: {}", p.display())),
    );
    failures
}

/// Removes a network namespace bind mount (`/var/run/netns/cni-...`): unmount, then unlink.
pub fn remove_netns(path: &Path) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    let _ = umount2(path, MntFlags::MNT_DETACH);
    std::fs::remove_file(path).map_err(|e| format!("remove netns {}: {e}", path.display()))
}

/// Whether a network link named `name` exists.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The cgroup directories of pod `uid` in every hierarchy: `<hierarchy>/kubepods[/<qos>]/pod<uid>`
/// (the v1 ones and `unified` under `/sys/fs/cgroup`, or `/sys/fs/cgroup` itself on a
/// unified host).
pub fn pod_cgroup_dirs(uid: &str) -> Vec<PathBuf> {
    let wanted = format!("pod{uid}");
    let mut found = Vec::new();
    let Ok(hierarchies) = std::fs::read_dir(CGROUP_ROOT) else {
        return found;
    };
    let hierarchies =
        std::iter::once(PathBuf::from(CGROUP_ROOT)).chain(hierarchies.flatten().map(|e| e.path()));
    for hierarchy in hierarchies {
        let kubepods = hierarchy.join("kubepods");
        let direct = kubepods.join(&wanted);
        if direct.is_dir() {
            found.push(direct);
        }
        let Ok(classes) = std::fs::read_dir(&kubepods) else {
            continue;
        };
        for class in classes.flatten() {
            let pod = class.path().join(&wanted);
            if pod.is_dir() {
                found.push(pod);
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Every directory under `dir` (excluded), deepest first.
fn subdirectories(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&current) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                all.push(entry.path());
                stack.push(entry.path());
            }
        }
    }
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    all
}

/// What a pod left in its cgroups: child cgroups (containers) and processes, per hierarchy.
pub fn pod_cgroup_leftovers(uid: &str) -> Vec<String> {
    let mut leftovers = Vec::new();
    for pod in pod_cgroup_dirs(uid) {
        for child in subdirectories(&pod) {
            leftovers.push(format!("cgroup {}", child.display()));
        }
        let procs = std::fs::read_to_string(pod.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() {
            leftovers.push(format!(
                "processes {} in {}",
                procs.split_whitespace().collect::<Vec<_>>().join(","),
                pod.display()
            ));
        }
    }
    leftovers
}

/// Removes pod `uid`'s cgroup directories (what kubelet does after the pod is gone).
/// Returns what could not be removed.
pub fn remove_pod_cgroups(uid: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for pod in pod_cgroup_dirs(uid) {
        for dir in subdirectories(&pod).into_iter().chain([pod.clone()]) {
            if let Err(e) = std::fs::remove_dir(&dir) {
                failures.push(format!("rmdir {}: {e}", dir.display()));
            }
        }
    }
    failures
}

/// A named network namespace with loopback up, removed on drop: containers join it by path,
/// as a pod's do (runc restores a private namespace empty, with loopback down).
pub struct Netns {
    pub name: String,
    pub path: PathBuf,
    ip: PathBuf,
}

impl Netns {
    pub fn new(node: &crate::node::Node, base: &str) -> Self {
        let name = format!("podsnap-{}", node.unique(base));
        let ip = node.tools().ip.clone();
        for args in [
            vec!["netns", "add", name.as_str()],
            vec!["-n", name.as_str(), "link", "set", "lo", "up"],
        ] {
            let status = std::process::Command::new(&ip)
                .args(&args)
                .status()
                .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
            assert!(status.success(), "ip {args:?}: {status}");
        }
        Self {
            path: Path::new(NETNS_DIR).join(&name),
            name,
            ip,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.ip)
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A tmpfs mounted for a test or a bench (another filesystem, or a small one); unmounted and
/// its mount point removed when dropped, also when the test fails.
#[derive(Debug)]
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs with `options` (e.g. `size=64k`, `size=512m,nr_inodes=12`) at `at`.
    pub fn mount(at: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mkdir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .status()
            .expect("mount");
        assert!(status.success(), "mount a tmpfs ({options}) at {}", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Every cgroup directory of pod `uid`, in every hierarchy: the pod's and all below them.
pub fn pod_cgroup_tree(uid: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = pod_cgroup_dirs(uid);
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        out.push(d);
    }
    out
}

/// Whether podsnap's network lock (its `PODSNAP-LOCK` chain) is in the network namespace at
/// `netns`.
pub fn network_locked(netns: &str) -> bool {
    std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["--", "iptables", "-w", "5", "-S", "PODSNAP-LOCK"])
        .output()
        .expect("nsenter iptables")
        .status
        .success()
}

/// The v1 freezer state (`FROZEN`, `THAWED`...) of container `id`'s cgroup, or on cgroup v2
/// `FROZEN`/`THAWED` from its `cgroup.events`; `None` when no cgroup of that name is found.
pub fn freezer_state_of(id: &str) -> Option<String> {
    fn find(dir: &std::path::Path, id: &str, depth: usize) -> Option<std::path::PathBuf> {
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            if !entry.file_type().ok()?.is_dir() {
                continue;
            }
            if entry.file_name().to_string_lossy() == id {
                return Some(path);
            }
            if depth > 0 {
                if let Some(found) = find(&path, id, depth - 1) {
                    return Some(found);
                }
            }
        }
        None
    }
    let v1 = std::path::Path::new("/sys/fs/cgroup/freezer");
    if v1.is_dir() {
        let dir = find(v1, id, 5)?;
        return std::fs::read_to_string(dir.join("freezer.state"))
            .ok()
            .map(|s| s.trim().to_owned());
    }
    let dir = find(std::path::Path::new("/sys/fs/cgroup"), id, 6)?;
    let events = std::fs::read_to_string(dir.join("cgroup.events")).ok()?;
    Some(
        if events.lines().any(|l| l == "frozen 1") {
            "FROZEN"
        } else {
            "THAWED"
        }
        .to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_processs_mount_table_has_its_root_and_proc() {
        let points = mount_points().expect("/proc/self/mountinfo");
        assert!(points.iter().any(|p| p == Path::new("/")), "{points:?}");
        assert!(points.iter().any(|p| p == Path::new("/proc")), "{points:?}");
        assert!(!cgroup_tree(Path::new("/sys/fs/cgroup")).is_empty());
    }
}
