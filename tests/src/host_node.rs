//! A private node laid out like a host, for `podsnap node install` ([`NodeOptions::host_root`]).
//!
//! ```text
//! <node>/host/                        the host root given to the installer (--host-root)
//!   etc/containerd/config.toml        containerd's configuration, in a [`ConfigStyle`]
//!   etc/containerd/conf.d/            (ConfigStyle::V3ConfD: imported, one drop-in already in it)
//!   etc/podsnap/                      made by the installer
//!   run/containerd/containerd.sock    containerd's gRPC (CRI) socket
//!   usr/local/bin/                    first on containerd's PATH: where the installer puts the shim
//! <node>/etc-real/                    a mount point (see below)
//! <node>/restart-containerd           the restart command (`sh` script), for --restart-command
//! <node>/restart.request, .reply      FIFOs between that script and the restart service
//! ```
//!
//! containerd reads host paths (the installer writes `imports = ["/etc/podsnap/containerd.toml"]`,
//! the shim reads `/etc/podsnap/config.toml`), so it runs in a mount namespace of its own where
//! `/etc` is a tmpfs of symlinks: every entry of the machine's `/etc` (through a bind mount of it
//! at `<node>/etc-real`; symlinks copied as they are), except `containerd` and `podsnap`, which
//! point into the host root; `/` is made shared again (as on a systemd host: a pod's
//! `HostToContainer` mount needs it), in a peer group of that namespace's own. Nothing outside
//! that namespace changes.
//!
//! The restart command asks the test process to restart containerd, as `systemctl restart` asks
//! systemd: it writes `restart` into one FIFO and reads the answer from the other. The service (a
//! thread of the test) stops containerd (SIGTERM, then SIGKILL after 10 s), starts it again
//! (still a child of the test, with the same command), and answers `ok` once the socket accepts
//! connections, or `failed: ...` when containerd exits first (a broken configuration), as
//! systemd's restart of a `Type=notify` unit fails. So a restart is possible from anywhere on
//! the machine, from inside a pod in the host's namespaces too.

use std::io::{BufRead, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::node::{stop_process, NodeFiles};

/// The node's containerd process, shared with the restart service.
pub type Containerd = Arc<Mutex<Option<Child>>>;

/// Locks the containerd slot (a panic elsewhere does not make it unusable).
pub fn lock(containerd: &Containerd) -> MutexGuard<'_, Option<Child>> {
    containerd.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run by `sh -c` in containerd's private mount namespace: `/etc` becomes a tmpfs of symlinks
/// (see the module header), then containerd. `$1` is the node directory.
const ETC_NAMESPACE_SCRIPT: &str = r#"set -e
node=$1; shift
real="$node/etc-real"
mount --bind /etc "$real"
mount -t tmpfs -o mode=0755 podsnap-host-etc /etc
for entry in "$real"/* "$real"/.[!.]*; do
  [ -e "$entry" ] || [ -L "$entry" ] || continue
  name=${entry##*/}
  case "$name" in containerd|podsnap) continue ;; esac
  if [ -L "$entry" ]; then ln -s "$(readlink "$entry")" "/etc/$name"; else ln -s "$entry" "/etc/$name"; fi
done
ln -s "$node/host/etc/containerd" /etc/containerd
ln -s "$node/host/etc/podsnap" /etc/podsnap
# Shared, as / is on a systemd host (a pod's HostToContainer mount of the host needs it); the
# peer group is this namespace's own.
mount --make-rshared /
exec "$@"
"#;

/// Run by `sh -c` inside `unshare --mount --propagation private` before containerd: the
/// hybrid tree at /sys/fs/cgroup goes (in this namespace only) and cgroup2 takes its place.
const CGROUP2_NAMESPACE_SCRIPT: &str =
    "umount -l /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && exec \"$@\"";

/// How a node's containerd is started.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// containerd's binary.
    pub containerd: PathBuf,
    /// The node's files.
    pub files: NodeFiles,
    /// Its environment (PATH, TMPDIR, ...).
    pub env: Vec<(String, String)>,
    /// On cgroup2 in a private mount namespace.
    pub cgroup2: bool,
    /// A host-root node: `/etc` of its own.
    pub host_root: bool,
}

impl Launcher {
    /// Starts containerd, its output appended to the node's log, its pid written to the pid
    /// file.
    pub fn spawn(&self) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.files.log())
            .context("opening containerd.log")?;
        let err_log = log.try_clone()?;
        // `exec` keeps the pid: the child is containerd itself, as without a namespace.
        let mut command = if self.host_root {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(ETC_NAMESPACE_SCRIPT)
                .arg("containerd-host-etc")
                .arg(&self.files.dir);
            if self.cgroup2 {
                c.args(["sh", "-c", CGROUP2_NAMESPACE_SCRIPT, "containerd-on-cgroup2"]);
            }
            c.arg(&self.containerd);
            c
        } else if self.cgroup2 {
            let mut c = Command::new("unshare");
            c.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(CGROUP2_NAMESPACE_SCRIPT)
                .arg("containerd-on-cgroup2")
                .arg(&self.containerd);
            c
        } else {
            Command::new(&self.containerd)
        };
        // containerd's temporary files under the node (a task created from a checkpoint image
        // leaves its `ctrd-checkpoint*` directory behind there): gone with the node.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.files.dir.join("tmp"))
            .context("creating the node's TMPDIR")?;
        let child = command
            .arg("--config")
            .arg(self.files.config())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log))
            // Its own process group: a ^C aimed at the test runner does not kill it halfway.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", self.containerd.display()))?;
        std::fs::write(self.files.pid_file(), child.id().to_string())?;
        Ok(child)
    }
}

/// The host root's directories (and the mount point of the machine's `/etc`).
pub fn lay_out(files: &NodeFiles) -> Result<()> {
    let host = files.host_root();
    for dir in ["etc/containerd", "run/containerd", "usr/local/bin"] {
        std::fs::create_dir_all(host.join(dir))?;
    }
    std::fs::create_dir_all(files.dir.join("etc-real"))?;
    Ok(())
}

/// The shape of a host-root node's containerd configuration (podsnap's runtime is never in it:
/// the installer adds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigStyle {
    /// Version 3, no `imports`.
    V3,
    /// Version 3 importing `/etc/containerd/conf.d/*.toml` (containerd 2.2's default), with a
    /// drop-in of the admin's already there (`10-nri.toml`).
    V3ConfD,
    /// Version 2 (containerd 1.7's; 2.x migrates it at start).
    V2,
}

impl ConfigStyle {
    /// The configuration text (and, for [`ConfigStyle::V3ConfD`], the admin's drop-in, written
    /// here).
    pub fn render(self, files: &NodeFiles, level: &str, cni_bin_dirs: &str) -> String {
        let dir = files.dir.display();
        let socket = files.socket();
        let socket = socket.display();
        let pause = crate::PAUSE_IMAGE;
        match self {
            ConfigStyle::V3 | ConfigStyle::V3ConfD => {
                let (imports, nri) = if self == ConfigStyle::V3ConfD {
                    let conf_d = files.host_root().join("etc/containerd/conf.d");
                    let _ = std::fs::create_dir_all(&conf_d);
                    let _ = std::fs::write(
                        conf_d.join("10-nri.toml"),
                        "# the admin's drop-in\nversion = 3\n\n[plugins.'io.containerd.nri.v1.nri']\n  disable = true\n",
                    );
                    ("imports = ['/etc/containerd/conf.d/*.toml']\n", "")
                } else {
                    (
                        "",
                        "\n  [plugins.'io.containerd.nri.v1.nri']\n    disable = true\n",
                    )
                };
                format!(
                    r#"# podsnap test host {dir}: a containerd 2.x node without podsnap
version = 3
root = '{dir}/root'
state = '{dir}/state'
{imports}
[grpc]
  address = '{socket}'

[ttrpc]
  address = '{socket}.ttrpc'

[debug]
  level = '{level}'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{pause}'
    [plugins.'io.containerd.cri.v1.images'.registry]
      config_path = '{dir}/certs.d'

  [plugins.'io.containerd.cri.v1.runtime']
    # This VM withholds CAP_SYS_RESOURCE: the pause container's -998 would fail in runc init.
    restrict_oom_score_adj = true
    enable_cdi = false
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = [{cni_bin_dirs}]
      conf_dir = '{dir}/cni/net.d'
      max_conf_num = 1

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
    stream_server_port = '0'

  [plugins.'io.containerd.transfer.v1.local']
    config_path = '{dir}/certs.d'
{nri}
  [plugins.'io.containerd.internal.v1.opt']
    path = '{dir}/opt'
"#
                )
            }
            ConfigStyle::V2 => format!(
                r#"# podsnap test host {dir}: a containerd 1.7-era (version 2) configuration
version = 2
root = "{dir}/root"
state = "{dir}/state"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "{level}"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{pause}"
    restrict_oom_score_adj = true
    enable_cdi = false
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dirs = [{cni_bin_dirs}]
      conf_dir = "{dir}/cni/net.d"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{dir}/certs.d"

  [plugins."io.containerd.transfer.v1.local"]
    config_path = "{dir}/certs.d"

  [plugins."io.containerd.nri.v1.nri"]
    disable = true

  [plugins."io.containerd.internal.v1.opt"]
    path = "{dir}/opt"
"#
            ),
        }
    }
}

/// The restart service of a host-root node (see the module header).
pub struct RestartService {
    files: NodeFiles,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for RestartService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestartService")
            .field("dir", &self.files.dir)
            .finish()
    }
}

/// The restart command's path.
pub fn restart_script(files: &NodeFiles) -> PathBuf {
    files.dir.join("restart-containerd")
}

fn request_fifo(files: &NodeFiles) -> PathBuf {
    files.dir.join("restart.request")
}

fn reply_fifo(files: &NodeFiles) -> PathBuf {
    files.dir.join("restart.reply")
}

impl RestartService {
    /// Makes the FIFOs and the script and starts serving.
    pub fn start(files: &NodeFiles, containerd: Containerd, launcher: Launcher) -> Result<RestartService> {
        for fifo in [request_fifo(files), reply_fifo(files)] {
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .with_context(|| format!("mkfifo {}", fifo.display()))?;
        }
        let script = restart_script(files);
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# Asks the podsnap test harness to restart this node's containerd, as \
                 `systemctl restart` asks systemd.\nset -e\necho restart > '{}'\nread -r answer < '{}'\n\
                 echo \"$answer\"\n[ \"$answer\" = ok ]\n",
                request_fifo(files).display(),
                reply_fifo(files).display()
            ),
        )?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (files2, stop2) = (files.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("containerd-restarts".to_owned())
            .spawn(move || serve(&files2, &containerd, &launcher, &stop2))?;
        Ok(RestartService {
            files: files.clone(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops serving (the thread wakes up on a `quit` line).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut fifo) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(request_fifo(&self.files))
        {
            let _ = fifo.write_all(b"quit\n");
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(files: &NodeFiles, containerd: &Containerd, launcher: &Launcher, stop: &AtomicBool) {
    loop {
        // Blocks until a writer opens the FIFO.
        let Ok(fifo) = std::fs::File::open(request_fifo(files)) else {
            return;
        };
        let mut line = String::new();
        let _ = std::io::BufReader::new(fifo).read_line(&mut line);
        if stop.load(Ordering::SeqCst) || line.trim() == "quit" {
            return;
        }
        if line.trim() != "restart" {
            continue;
        }
        let answer = match restart(files, containerd, launcher) {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("failed: {e:#}"),
        };
        eprintln!("podsnap-tests: restart of containerd asked for: {answer}");
        // The script opens the reply right after its request; give it 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(reply_fifo(files))
            {
                Ok(mut reply) => {
                    let _ = writeln!(reply, "{}", answer.replace('\n', " "));
                    break;
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
    }
}

/// Stops containerd and starts it again; `Ok` once its socket accepts connections.
fn restart(files: &NodeFiles, containerd: &Containerd, launcher: &Launcher) -> Result<()> {
    let old = lock(containerd).take();
    if let Some(mut child) = old {
        stop_process(&mut child, Duration::from_secs(10));
    }
    let _ = std::fs::remove_file(files.socket());
    let child = launcher.spawn()?;
    *lock(containerd) = Some(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(child) = lock(containerd).as_mut() {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("containerd exited at start ({status}): see containerd.log");
            }
        }
        if std::os::unix::net::UnixStream::connect(files.socket()).is_ok() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "containerd did not listen within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node's containerd configuration as it is now (for byte-for-byte comparisons).
pub fn config_bytes(files: &NodeFiles) -> Vec<u8> {
    std::fs::read(files.config()).unwrap_or_default()
}

/// Every file under `dir` (relative paths), sorted, for "what was added" comparisons.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(dir).unwrap_or(&path).display().to_string();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                found.push(format!("{rel}/"));
                stack.push(path);
            } else {
                found.push(rel);
            }
        }
    }
    found.sort();
    found
}
