//! systemd as the init of a test node, for the systemd cgroup driver end to end
//! ([`crate::node::NodeOptions::systemd`]).
//!
//! These machines run no systemd, but systemd 252 is installed and runs as PID 1 of private
//! PID, mount, cgroup, UTS and IPC namespaces, as it does in a container. [`Systemd::start`]:
//!
//! 1. makes a cgroup of its own below the test process's in every host hierarchy
//!    (`<hierarchy>/<own path>/podsnap-systemd-<node>`), moves the launcher into it and only
//!    then unshares the cgroup namespace: that cgroup is the root systemd sees, so every slice
//!    and scope it makes (`system.slice`, `kubepods.slice`, each container's scope) lands below
//!    it, never at a hierarchy's root;
//! 2. in the new mount namespace (private propagation): a tmpfs on `/run` (systemd's and
//!    containerd's runtime files, the pods' netns files, runc's state: none of it reaches the
//!    host's `/run`, where a `/run/systemd/system` would make other nodes' containerd think
//!    systemd runs), and the cgroup filesystems mounted again, so they are rooted at the
//!    namespace's root: the host's v1 hierarchies and its cgroup2 as they are (a hybrid node),
//!    or cgroup2 alone on `/sys/fs/cgroup` (a v2 node; on this machine every controller stays
//!    bound to v1, see ENVIRONMENT.md);
//! 3. `exec /lib/systemd/systemd --system --unit=minimal.target` with `SYSTEMD_UNIT_PATH`
//!    holding only the units the node needs: an empty `minimal.target`, and `dbus.socket` and
//!    `dbus.service` (dbus-daemon 1.14, the system bus, started before containerd);
//! 4. waits until `systemctl is-system-running` says `running` (or `degraded`).
//!
//! The node then starts containerd as a transient service of that systemd (`systemd-run`,
//! `Delegate=yes`, `KillMode=process`, as containerd.service has it); shims, runc and CRIU run
//! below it in the namespaces, and runc talks to this systemd over D-Bus.
//!
//! Teardown ([`clean`]): SIGKILL to systemd ends its PID namespace and every process in it
//! (dbus-daemon, containerd, shims, containers); the mount namespace goes with its last
//! process (the `/run` tmpfs, the containers' mounts, the pods' netns files); then the cgroups
//! of step 1 are removed deepest first. The node's ledger records systemd's pid and each
//! cgroup before they exist, so a node left by a killed test is cleaned the same way.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::command::run_within;
use crate::host;

/// systemd's binary.
pub const SYSTEMD: &str = "/lib/systemd/systemd";
/// How long systemd may take to say it is running.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the processes of its namespace may take to go after SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// The prefix of the cgroup made for a node's systemd in each hierarchy.
pub const CGROUP_PREFIX: &str = "podsnap-systemd-";

const MINIMAL_TARGET: &str = "[Unit]\nDescription=podsnap test node\n";
const DBUS_SOCKET: &str = "[Unit]\nDescription=D-Bus System Message Bus Socket\n\
    DefaultDependencies=no\n\n[Socket]\nListenStream=/run/dbus/system_bus_socket\n";
const DBUS_SERVICE: &str = "[Unit]\nDescription=D-Bus System Message Bus\n\
    DefaultDependencies=no\nRequires=dbus.socket\n\n[Service]\n\
    ExecStart=/usr/bin/dbus-daemon --system --address=systemd: --nofork --nopidfile \
    --systemd-activation --syslog-only\n";

/// One cgroup hierarchy of the host, as this process sees it.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    /// Where it is mounted (`/sys/fs/cgroup/memory`, `/sys/fs/cgroup/unified`).
    pub mount_point: PathBuf,
    /// `cgroup` or `cgroup2`.
    pub fstype: String,
    /// Its mount options (`memory`, `none,name=systemd`; empty for cgroup2).
    pub options: String,
    /// This process's cgroup in it (`/`, `/process_api/...`).
    pub own: String,
}

impl Hierarchy {
    /// The directory of this process's cgroup in it.
    pub fn own_dir(&self) -> PathBuf {
        self.mount_point.join(self.own.trim_start_matches('/'))
    }
}

/// The host's cgroup hierarchies mounted under `/sys/fs/cgroup`, with this process's place in
/// each: `/proc/self/mountinfo` (mount point, type, controllers) joined with
/// `/proc/self/cgroup` (the path) by their controllers.
pub fn hierarchies() -> Result<Vec<Hierarchy>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let own = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or_default();
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or_default();
        let super_options = right.nth(1).unwrap_or_default();
        if !mount_point.starts_with("/sys/fs/cgroup") {
            continue;
        }
        let controllers: Vec<&str> = super_options
            .split(',')
            .filter(|o| {
                !matches!(
                    *o,
                    "rw" | "ro" | "none" | "nsdelegate" | "memory_recursiveprot" | "clone_children"
                ) && !o.starts_with("release_agent=")
            })
            .collect();
        let path = match fstype {
            "cgroup2" => own.lines().find_map(|l| l.strip_prefix("0::")),
            "cgroup" => own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                let mut names: Vec<&str> = names.split(',').collect();
                let mut wanted = controllers.clone();
                names.sort_unstable();
                wanted.sort_unstable();
                (!names.is_empty() && names == wanted).then_some(path)
            }),
            _ => continue,
        };
        let Some(path) = path else { continue };
        out.push(Hierarchy {
            mount_point: PathBuf::from(mount_point),
            fstype: fstype.to_owned(),
            options: if fstype == "cgroup" {
                let mut o = controllers.join(",");
                if o.starts_with("name=") {
                    o.insert_str(0, "none,");
                }
                o
            } else {
                String::new()
            },
            own: path.to_owned(),
        });
    }
    if !out.iter().any(|h| h.fstype == "cgroup2") && !out.iter().any(|h| h.fstype == "cgroup") {
        bail!("no cgroup hierarchy is mounted under /sys/fs/cgroup");
    }
    Ok(out)
}

/// A running systemd of a node.
#[derive(Debug)]
pub struct Systemd {
    /// systemd's pid in the host's PID namespace.
    pub pid: i32,
    /// The directory of its units (`SYSTEMD_UNIT_PATH`).
    pub units: PathBuf,
    /// The cgroup made for it in each host hierarchy: the root of its cgroup namespace.
    pub cgroups: Vec<PathBuf>,
    /// `unshare`, systemd's parent (reaped at teardown).
    launcher: Option<Child>,
}

impl Systemd {
    /// Starts systemd for the node in `dir` named `name`, on cgroup v2 alone when `cgroup2`;
    /// `record(kind, value)` writes the node's ledger (`systemd <pid>`, `cgroup <dir>`) before
    /// each thing exists.
    pub fn start(
        dir: &Path,
        name: &str,
        cgroup2: bool,
        record: &dyn Fn(&str, &str) -> Result<()>,
    ) -> Result<Systemd> {
        for program in [
            SYSTEMD,
            "/usr/bin/systemctl",
            "/usr/bin/systemd-run",
            "/usr/bin/dbus-daemon",
        ] {
            anyhow::ensure!(
                Path::new(program).exists(),
                "prerequisite missing: {program} (systemd 252 and dbus are part of this machine's image)"
            );
        }
        let base = dir.join("systemd");
        let units = base.join("units");
        std::fs::create_dir_all(&units)?;
        std::fs::write(units.join("minimal.target"), MINIMAL_TARGET)?;
        std::fs::write(units.join("dbus.socket"), DBUS_SOCKET)?;
        std::fs::write(units.join("dbus.service"), DBUS_SERVICE)?;

        let hierarchies = hierarchies()?;
        let mut cgroups = Vec::new();
        let mut procs = Vec::new();
        for h in &hierarchies {
            let cgroup = h.own_dir().join(format!("{CGROUP_PREFIX}{name}"));
            record("cgroup", &cgroup.to_string_lossy())?;
            std::fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
            // A new v1 cpuset has no CPUs or memory nodes: a process cannot join it before
            // it gets its parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(h.own_dir().join(file)) {
                    std::fs::write(cgroup.join(file), value.trim())
                        .with_context(|| format!("writing {}/{file}", cgroup.display()))?;
                }
            }
            procs.push(cgroup.join("cgroup.procs"));
            cgroups.push(cgroup);
        }

        let mut inner = String::from("set -e\nmount -t tmpfs -o mode=0755 tmpfs /run\n");
        inner.push_str("umount -l /sys/fs/cgroup\n");
        if cgroup2 {
            inner.push_str("mount -t cgroup2 cgroup2 /sys/fs/cgroup\n");
        } else {
            inner.push_str("mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup\n");
            for h in &hierarchies {
                let point = h.mount_point.display();
                if h.fstype == "cgroup2" {
                    let _ = writeln!(inner, "mkdir -p {point}\nmount -t cgroup2 cgroup2 {point}");
                } else {
                    let _ = writeln!(
                        inner,
                        "mkdir -p {point}\nmount -t cgroup -o {} cgroup {point}",
                        h.options
                    );
                }
            }
            // Links such as cpu -> cpu,cpuacct, as the host has them.
            for entry in std::fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                if let Ok(target) = std::fs::read_link(entry.path()) {
                    let _ = writeln!(inner, "ln -s {} {}", target.display(), entry.path().display());
                }
            }
        }
        let _ = writeln!(
            inner,
            "exec env SYSTEMD_UNIT_PATH={} {SYSTEMD} --system --unit=minimal.target",
            units.display()
        );
        std::fs::write(base.join("inner.sh"), &inner)?;
        // The launcher joins its cgroups first (the cgroup namespace's root is where it is
        // when it unshares), then unshares; `--kill-child`: systemd dies with `unshare`.
        let outer = format!(
            "for procs in \"$@\"; do echo $$ > \"$procs\" || exit 1; done\n\
             exec unshare --pid --fork --kill-child --mount --propagation private --cgroup --uts \
             --ipc --mount-proc sh {}\n",
            base.join("inner.sh").display()
        );
        std::fs::write(base.join("outer.sh"), &outer)?;
        let log = std::fs::File::create(base.join("systemd.log"))?;
        let launcher = Command::new("sh")
            .arg(base.join("outer.sh"))
            .args(&procs)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting unshare for systemd")?;
        let mut systemd = Systemd {
            pid: 0,
            units,
            cgroups,
            launcher: Some(launcher),
        };
        let launcher_pid = systemd.launcher.as_ref().map(|c| c.id() as i32).unwrap_or(0);
        systemd.pid = wait_for_systemd(launcher_pid, &base)?;
        record("systemd", &systemd.pid.to_string())?;
        systemd.wait_running()?;
        systemd
            .systemctl(&["start", "dbus.socket", "dbus.service"])
            .context("starting dbus")?;
        Ok(systemd)
    }

    /// `program` run in systemd's namespaces (mount, PID, cgroup, UTS, IPC).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t")
            .arg(self.pid.to_string())
            .args(["-m", "-p", "-C", "-u", "-i", "--"])
            .arg(program);
        c
    }

    /// `systemctl ARGS` against this systemd; its output.
    pub fn systemctl(&self, args: &[&str]) -> Result<String> {
        Ok(run_within(
            self.command("systemctl").args(args),
            Duration::from_secs(30),
        )?)
    }

    /// A unit's property (`systemctl show -P`).
    pub fn property(&self, unit: &str, property: &str) -> Result<String> {
        Ok(self.systemctl(&["show", "-P", property, unit])?.trim().to_owned())
    }

    fn wait_running(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let state = self
                .command("systemctl")
                .arg("is-system-running")
                .stdin(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            if state == "running" || state == "degraded" {
                return Ok(());
            }
            if !host::alive(self.pid) {
                bail!("systemd (pid {}) ended during startup", self.pid);
            }
            if Instant::now() >= deadline {
                bail!("systemd not running after {START_TIMEOUT:?}: is-system-running says {state:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `/sys/fs/cgroup` as this systemd and everything below it see it.
    pub fn cgroup_root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/sys/fs/cgroup", self.pid))
    }

    /// Reaps `unshare` once [`clean`] ended systemd.
    pub fn reap(&mut self) {
        if let Some(mut child) = self.launcher.take() {
            host::signal(child.id() as i32, Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// systemd's pid: the child of `unshare` (`launcher`) once it runs systemd.
fn wait_for_systemd(launcher: i32, base: &Path) -> Result<i32> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).unwrap_or_default();
        for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
            if host::cmdline(child).is_some_and(|argv| argv.first().is_some_and(|a| a == SYSTEMD)) {
                return Ok(child);
            }
        }
        if !host::alive(launcher) || Instant::now() >= deadline {
            let log = std::fs::read_to_string(base.join("systemd.log")).unwrap_or_default();
            bail!("systemd did not start (launcher pid {launcher}); its output:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is the systemd of the node whose units are in `units`.
fn is_node_systemd(pid: i32, units: &Path) -> bool {
    let wanted = format!("SYSTEMD_UNIT_PATH={}", units.display());
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|&b| b == 0).any(|v| v == wanted.as_bytes()))
        .unwrap_or(false)
}

/// The inode of `pid`'s PID namespace.
fn pid_namespace(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Ends the systemd of the node in `dir` (`pids` from its ledger) and every process of its
/// PID namespace, then removes `cgroups` deepest first. Returns what failed.
pub fn clean(dir: &Path, pids: &[i32], cgroups: &[PathBuf]) -> Vec<String> {
    let mut problems = Vec::new();
    let units = dir.join("systemd").join("units");
    for &pid in pids {
        if !host::alive(pid) || !is_node_systemd(pid, &units) {
            continue;
        }
        let namespace = pid_namespace(pid);
        host::signal(pid, Signal::SIGKILL);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let left: Vec<i32> = match &namespace {
                Some(ns) => host::processes()
                    .into_iter()
                    .map(|(p, _)| p)
                    .filter(|&p| pid_namespace(p).as_ref() == Some(ns))
                    .collect(),
                None => vec![pid].into_iter().filter(|&p| host::alive(p)).collect(),
            };
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                problems.push(format!(
                    "processes of the node's systemd (pid {pid}) survived SIGKILL: {left:?}"
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for top in cgroups {
        // Emptied cgroups may stay busy for a moment after their last process died.
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let mut failed = Vec::new();
            for d in crate::host::cgroup_tree(top).iter().rev() {
                if let Err(e) = std::fs::remove_dir(d) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        failed.push(format!("rmdir {}: {e}", d.display()));
                    }
                }
            }
            if failed.is_empty() || Instant::now() >= deadline {
                problems.extend(failed);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machines_hierarchies_are_found_with_their_paths() {
        let found = hierarchies().expect("hierarchies");
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("own");
        // Every line of /proc/self/cgroup has its mounted hierarchy (where one is mounted).
        for h in &found {
            assert!(h.mount_point.starts_with("/sys/fs/cgroup"), "{h:?}");
            assert!(h.own.starts_with('/'), "{h:?}");
            assert!(h.own_dir().is_dir(), "{h:?}");
        }
        assert!(found.len() <= own.lines().count(), "{found:?} for {own}");
        assert!(
            found
                .iter()
                .any(|h| h.options.contains("name=systemd") && h.options.starts_with("none,"))
                || !own.contains("name=systemd"),
            "{found:?}"
        );
    }
}
