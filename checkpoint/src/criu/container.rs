//! Checkpoint and restore of one container with runc and CRIU, with podsnap's guarantees:
//!
//! - a failed dump leaves the container as it was (running, or paused if it was paused) and
//!   removes whatever it wrote; its error quotes the tail of CRIU's log;
//! - the CRIU options a dump used are kept beside its images (`podsnap-criu.json`), so a restore
//!   passes the matching flags (established TCP, external unix sockets, file locks, shell job,
//!   empty namespaces, cgroups mode) even when the restoring client does not repeat them;
//! - a restore checks the images exist before anything is created, and a failed restore removes
//!   what runc left of the container.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use podsnap_runtime::cgroup::CgroupPaths;
use podsnap_runtime::launcher::Limit;
use podsnap_runtime::runc::{CgroupsMode, CheckpointOpts, CriuOpts, ProcessStdio, RestoreOpts, Runc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fs::private::{create_private_dir, write_private};

/// The file, beside the CRIU images, recording the options the dump used.
pub const CRIU_OPTIONS_FILE: &str = "podsnap-criu.json";

/// The CRIU configuration file of a container, in its bundle: runc hands its path to CRIU
/// (the spec's [`CRIU_CONFIG_ANNOTATION`]) on every dump and restore, and CRIU reads it when it
/// exists. The shim points every container it creates at it; a pod dump writes it for the
/// length of the dump (CRIU's per-container network lock skipped under the pod's own lock),
/// a restore for the length of the restore (`tcp-close`).
pub const CRIU_CONFIG_FILE: &str = "criu.conf";

/// runc's spec annotation naming the CRIU configuration file of a container.
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// The CRIU configuration file runc gives CRIU for the container of `bundle`, when it is the
/// bundle's own [`CRIU_CONFIG_FILE`] (not one the user named, nor another bundle's).
pub fn own_criu_config(bundle: &Path, spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    let own = bundle.join(CRIU_CONFIG_FILE);
    let named = spec.annotations().as_ref()?.get(CRIU_CONFIG_ANNOTATION)?;
    (Path::new(named) == own).then_some(own)
}

/// CRIU's own image that every dump writes first; its absence means "not a checkpoint".
const CRIU_INVENTORY: &str = "inventory.img";

/// How many lines of CRIU's log an error quotes.
const LOG_TAIL_LINES: usize = 15;

/// How many of CRIU's error lines before the tail an error quotes.
const LOG_CAUSE_LINES: usize = 5;

/// The CRIU choices a dump made, which its restore must repeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpOptions {
    pub tcp_established: bool,
    pub external_unix_sockets: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    /// soft, full, strict, ignore; empty for runc's default.
    pub cgroups_mode: String,
    /// CRIU ran in the container's network namespace (a pod's, which podsnap locked): CRIU
    /// takes such a namespace as its own, so it neither walks it (links, conntrack tables)
    /// nor runs its network-lock scripts while the pod is frozen, and the images hold no
    /// network namespace. Their restore must run CRIU in the network namespace the
    /// container is to have (its spec's path): CRIU leaves the processes in its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub criu_in_netns: bool,
    /// The container's masked directories (read-only empty tmpfs mounts) are external mounts
    /// of key [`MASKED_TMPFS_KEY`] in the images (see
    /// `podsnap_checkpoint::pod::dump::criu_configs::masked_tmpfs`): their restore must name
    /// an empty tmpfs for that key (`external mnt[KEY]:PATH`), which CRIU bind-mounts at each.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub masked_tmpfs_external: bool,
    /// What the tmpfs runc mounts on `/sys/fs/cgroup` (cgroup v1) holds, when it was an
    /// external mount of key [`CGROUP_TMPFS_KEY`] in the images: a directory per hierarchy
    /// (each a mount point of the hierarchy) and a symbolic link per co-mounted controller. Its
    /// restore makes a tmpfs holding the same and names it for that key; CRIU bind-mounts it
    /// there and the hierarchies on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup_tmpfs: Vec<CgroupTmpfsEntry>,
    /// A lazy dump (live migration): the anonymous memory is not in the images, CRIU's page
    /// server handed it out after the dump (its pagemap entries are marked lazy). Only a
    /// restore whose lazy-pages daemon is fed by that page server can use these images.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lazy_pages: bool,
}

/// An entry of the tmpfs on a container's `/sys/fs/cgroup` (see [`DumpOptions::cgroup_tmpfs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupTmpfsEntry {
    /// Its name (one path component).
    pub name: String,
    /// A symbolic link to this name (one path component) rather than a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symlink: Option<String>,
}

impl CgroupTmpfsEntry {
    /// Whether `name` can be an entry's name or link target: one path component.
    pub fn valid_name(name: &str) -> bool {
        !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
    }
}

/// Where runc mounts the tmpfs of [`DumpOptions::cgroup_tmpfs`] in a container.
pub const CGROUP_TMPFS_AT: &str = "/sys/fs/cgroup";
/// The key of that tmpfs as an external mount in the container's CRIU images.
pub const CGROUP_TMPFS_KEY: &str = "podsnap-cgroup-tmpfs";

/// The key of a container's masked directories as external mounts in its CRIU images.
pub const MASKED_TMPFS_KEY: &str = "podsnap-masked";

/// The empty read-only tmpfs a restore hands CRIU for the masked directories of images
/// dumped with [`DumpOptions::masked_tmpfs_external`] (what runc mounts there: a tmpfs,
/// read-only from the start, so empty). Mounted in the restore's work directory for the
/// length of the restore; unmounted when dropped (the restored container keeps its binds).
pub struct MaskedTmpfs {
    dir: PathBuf,
}

impl MaskedTmpfs {
    /// Mounts it at `masked` in `work_dir` (made if missing).
    pub fn mount(work_dir: &Path) -> Result<Self> {
        use nix::mount::MsFlags;
        let dir = work_dir.join("masked");
        create_private_dir(&dir)?;
        // Read-only and nothing else, as runc mounts it: CRIU gives the first mount of the key
        // its recorded flags, and leaves a later bind of it with the same flags as its own
        // source's (this mount's).
        nix::mount::mount(
            Some(MASKED_TMPFS_KEY),
            &dir,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            Some("size=4k,nr_inodes=1"),
        )
        .map_err(|e| Error::io("mount the tmpfs of the masked directories", &dir, e.into()))?;
        Ok(MaskedTmpfs { dir })
    }

    /// CRIU's configuration line naming it for the masked directories of the images.
    pub fn line(&self) -> String {
        format!("external mnt[{MASKED_TMPFS_KEY}]:{}\n", self.dir.display())
    }

    /// Mounts, at `cgroup` in `work_dir`, the tmpfs of a container's `/sys/fs/cgroup` holding
    /// `entries` ([`DumpOptions::cgroup_tmpfs`]), read-only once they are made.
    pub fn mount_cgroup(work_dir: &Path, entries: &[CgroupTmpfsEntry]) -> Result<Self> {
        use nix::mount::MsFlags;
        let invalid = |reason: String| Error::InvalidCheckpoint {
            path: PathBuf::from(CRIU_OPTIONS_FILE),
            reason,
        };
        for e in entries {
            if !CgroupTmpfsEntry::valid_name(&e.name)
                || e.symlink
                    .as_deref()
                    .is_some_and(|l| !CgroupTmpfsEntry::valid_name(l))
            {
                return Err(invalid(format!("cgroup_tmpfs: {e:?} is not one path component")));
            }
        }
        let dir = work_dir.join("cgroup");
        create_private_dir(&dir)?;
        let what = "mount the tmpfs of /sys/fs/cgroup";
        nix::mount::mount(
            Some(CGROUP_TMPFS_KEY),
            &dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=755"),
        )
        .map_err(|e| Error::io(what, &dir, e.into()))?;
        let mounted = MaskedTmpfs { dir };
        for e in entries {
            let at = mounted.dir.join(&e.name);
            match &e.symlink {
                Some(to) => std::os::unix::fs::symlink(to, &at),
                None => std::fs::create_dir(&at),
            }
            .map_err(|err| Error::io(what, &at, err))?;
        }
        let ro = MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC;
        nix::mount::mount(None::<&str>, &mounted.dir, None::<&str>, ro, Some("mode=755"))
            .map_err(|e| Error::io(what, &mounted.dir, e.into()))?;
        Ok(mounted)
    }

    /// CRIU's configuration line naming it for the `/sys/fs/cgroup` tmpfs of the images.
    pub fn cgroup_line(&self) -> String {
        format!("external mnt[{CGROUP_TMPFS_KEY}]:{}\n", self.dir.display())
    }
}

impl Drop for MaskedTmpfs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
            log::warn!("unmount {}: {e}", self.dir.display());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl DumpOptions {
    fn criu(&self, image_path: &Path, work_path: Option<PathBuf>) -> Result<CriuOpts> {
        Ok(CriuOpts {
            image_path: image_path.to_path_buf(),
            work_path,
            tcp_established: self.tcp_established,
            external_unix_sockets: self.external_unix_sockets,
            shell_job: self.shell_job,
            file_locks: self.file_locks,
            empty_namespaces: self.empty_namespaces.clone(),
            cgroups_mode: CgroupsMode::parse(&self.cgroups_mode).map_err(|e| Error::InvalidCheckpoint {
                path: image_path.to_path_buf(),
                reason: e.to_string(),
            })?,
        })
    }
}

/// A request to dump one container.
#[derive(Debug, Clone)]
pub struct Dump {
    pub id: String,
    pub image_dir: PathBuf,
    /// Where CRIU writes its logs; the image directory when `None`.
    pub work_dir: Option<PathBuf>,
    pub options: DumpOptions,
    /// Keep the container running after the dump (otherwise it exits).
    pub leave_running: bool,
    /// The container's cgroups, to make sure a failed dump leaves it thawed.
    pub cgroups: Option<CgroupPaths>,
    /// Whether the container was paused before the dump (then it stays paused).
    pub was_paused: bool,
    /// When runc and CRIU must be stopped.
    pub limit: Limit,
    /// The network namespace runc and CRIU run in (set with `options.criu_in_netns`: the
    /// container's own).
    pub netns: Option<PathBuf>,
    /// A lazy dump (`options.lazy_pages`): CRIU's page server serves the memory on this
    /// connected socket, inherited at [`PS_SOCKET_FD`] (the container's CRIU configuration
    /// file says `ps-socket`), until the lazy-pages daemon at the other end has every page.
    /// runc ends only then.
    pub serve: Option<Arc<std::os::fd::OwnedFd>>,
}

/// Where a lazy dump's CRIU finds its page server's connected socket.
pub const PS_SOCKET_FD: std::os::fd::RawFd = 1000;

/// Dumps a container into `dump.image_dir` (created 0700 if missing).
pub async fn dump(runc: &Runc, d: &Dump) -> Result<()> {
    let created_dir = !d.image_dir.exists();
    create_private_dir(&d.image_dir)?;
    let before = listing(&d.image_dir);
    // CRIU's log exists before CRIU starts: on a filesystem out of inodes CRIU can still say
    // in it why it failed (its log needs no new inode), and a log that cannot be made fails
    // here with the filesystem's own error.
    let log_dir = d.work_dir.as_deref().unwrap_or(&d.image_dir);
    if log_dir.is_dir() {
        use std::os::unix::fs::OpenOptionsExt;
        let log = log_dir.join("dump.log");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log)
            .map_err(|e| Error::io("create CRIU's log", &log, e))?;
    }
    let criu = d.options.criu(&d.image_dir, d.work_dir.clone())?;
    let opts = CheckpointOpts {
        criu,
        parent_path: None,
        leave_running: d.leave_running,
        limit: d.limit.clone(),
        netns: d.netns.clone(),
        // The page server uses the inherited socket: the address is never listened on.
        lazy_pages: d.serve.as_ref().map(|_| "127.0.0.1:1".to_owned()),
        inherit_fds: d.serve.iter().map(|fd| (PS_SOCKET_FD, fd.clone())).collect(),
    };
    if d.serve.is_some() {
        // A lazy dump's images are complete (and used) long before runc ends.
        write_options(&d.image_dir, &d.options)?;
    }
    match runc.checkpoint(&d.id, &opts).await {
        Ok(()) if d.serve.is_some() => Ok(()),
        Ok(()) => write_options(&d.image_dir, &d.options),
        Err(source) => {
            let log_dir = d.work_dir.as_deref().unwrap_or(&d.image_dir);
            // No log to quote when CRIU could not even write it: a full filesystem, say so.
            let log_tail = log_tail(&log_dir.join("dump.log")).or_else(|| full_filesystem(log_dir));
            // A lazy dump's images are the pod dump's to remove (they may be committed).
            if d.serve.is_none() {
                remove_partial(&d.image_dir, created_dir, &before);
            }
            if d.leave_running && !d.was_paused {
                if let Some(cg) = &d.cgroups {
                    if let Err(e) = cg.set_frozen(false) {
                        log::warn!("container {}: thaw after a failed dump: {e}", d.id);
                    }
                }
            }
            Err(Error::Dump {
                id: d.id.clone(),
                source: Box::new(source),
                log_tail,
            })
        }
    }
}

/// Records the options of the dump into `image_dir` (the restore reads them).
fn write_options(image_dir: &Path, options: &DumpOptions) -> Result<()> {
    let meta = serde_json::to_vec_pretty(options).map_err(|e| Error::InvalidCheckpoint {
        path: image_dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_private(&image_dir.join(CRIU_OPTIONS_FILE), &meta)
}

/// Checks that `dir` holds a container checkpoint (CRIU images) and reads the options its dump
/// used. A missing options file (a dump made by another tool) means defaults.
pub fn inspect(dir: &Path) -> Result<DumpOptions> {
    let invalid = |reason: String| Error::InvalidCheckpoint {
        path: dir.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(dir).map_err(|e| invalid(format!("cannot read it: {e}")))?;
    if !meta.is_dir() {
        return Err(invalid("not a directory".into()));
    }
    if !dir.join(CRIU_INVENTORY).is_file() {
        return Err(invalid(format!(
            "no CRIU {CRIU_INVENTORY}: this is not a checkpoint"
        )));
    }
    let options = match crate::fs::read::read_capped(&dir.join(CRIU_OPTIONS_FILE), 64 * 1024) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("{CRIU_OPTIONS_FILE}: {e}")))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DumpOptions::default(),
        Err(e) => return Err(invalid(format!("{CRIU_OPTIONS_FILE}: {e}"))),
    };
    check_memory_images(dir, options.lazy_pages).map_err(invalid)?;
    Ok(options)
}

use crate::criu::image::{PAGEMAP_MAGIC, PSTREE_MAGIC};
const PSTREE_IMAGE: &str = "pstree.img";
/// `pagemap_entry.flags`: the pages are in this image's pages file.
const PE_PRESENT: u64 = 1 << 2;
/// `pagemap_entry.flags`: the pages were left to the dump's page server (a lazy dump), not
/// written to the pages file.
const PE_LAZY: u64 = 1 << 1;
/// The largest `pagemap-*.img` read (about 16 bytes an entry: some 4 million runs of pages).
const MAX_PAGEMAP_BYTES: u64 = 64 << 20;

/// Checks every `pagemap-*.img` against its `pages-*.img`: the pages the map says are present
/// must be exactly what the pages file holds. A truncated or missing pages file is caught here,
/// before CRIU (whose restorer can spin forever on a short read) sees it.
fn check_memory_images(dir: &Path, lazy_dump: bool) -> std::result::Result<(), String> {
    let page = 4096u64;
    let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("pagemap-") && name.ends_with(".img")) || name.starts_with("pagemap-shmem") {
            continue;
        }
        let data = crate::fs::read::read_capped(&entry.path(), MAX_PAGEMAP_BYTES).map_err(|e| {
            format!(
                "{name}: {e} (podsnap reads at most {} MiB of a pagemap)",
                MAX_PAGEMAP_BYTES >> 20
            )
        })?;
        let (pages_id, present, lazy) = parse_pagemap_lazy(&data).map_err(|e| format!("{name}: {e}"))?;
        // CRIU flags pages lazy (may be restored on demand) in every dump; only a lazy dump
        // leaves them out of the pages file.
        let present = match lazy_dump {
            true => present - lazy,
            false => present,
        };
        let pages = format!("pages-{pages_id}.img");
        let size = match std::fs::metadata(dir.join(&pages)) {
            Ok(m) => m.len(),
            Err(_) if present == 0 => 0,
            Err(e) => return Err(format!("{pages} (named by {name}): {e}")),
        };
        // A crafted map may claim more pages than a byte count holds.
        let Some(mapped) = present.checked_mul(page) else {
            return Err(format!(
                "{name} maps {present} pages, more than any memory: the memory image is damaged"
            ));
        };
        if size != mapped {
            return Err(format!(
                "{pages} holds {size} bytes but {name} maps {mapped} bytes of pages: the memory image is damaged"
            ));
        }
    }
    Ok(())
}

/// The highest process or thread id of the container's processes in CRIU's images at `dir`
/// (`pstree.img`), as its PID namespace numbers them: a restore into a PID namespace shared
/// with other containers must find these free.
pub fn highest_pid(dir: &Path) -> Result<u32> {
    let invalid = |reason: String| Error::InvalidCheckpoint {
        path: dir.join(PSTREE_IMAGE),
        reason,
    };
    let data = crate::fs::read::read_capped(&dir.join(PSTREE_IMAGE), 64 << 20)
        .map_err(|e| invalid(e.to_string()))?;
    let mut highest = 0u64;
    for entry in crate::criu::image::entries(&data, PSTREE_MAGIC, "process tree").map_err(invalid)? {
        // pstree_entry: pid = 1, ppid = 2, pgid = 3, sid = 4, threads = 5 (repeated).
        for (field, value) in crate::criu::image::varints(entry).map_err(invalid)? {
            if field == 1 || field == 5 {
                highest = highest.max(value);
            }
        }
    }
    u32::try_from(highest)
        .ok()
        .filter(|h| *h > 0)
        .ok_or_else(|| invalid(format!("no valid process id (highest {highest})")))
}

/// Makes the PID namespace at `pidns` hand out ids above `highest` from now on: the next
/// process any container of the pod starts (a restored server's new thread, a CRIU helper)
/// cannot take an id a later restore of a container in the same namespace needs (CRIU asks
/// the kernel for each recorded id, which fails with "File exists" when it is taken).
pub async fn reserve_pids(
    launcher: &dyn podsnap_runtime::launcher::Launcher,
    pidns: &Path,
    highest: u32,
) -> Result<()> {
    use podsnap_runtime::launcher::Capture;
    // A process in the namespace writes its counter (`ns_last_pid` is the writer's own
    // namespace's); the host's /proc is the one it sees, nsenter --pid forks into it.
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--pid={}", pidns.display()))
        .args([
            "--",
            "sh",
            "-c",
            "echo \"$1\" > /proc/sys/kernel/ns_last_pid",
            "sh",
        ])
        .arg(highest.to_string())
        .stdin(std::process::Stdio::null());
    let what = "reserve the recorded process ids (nsenter --pid, ns_last_pid)";
    let out = launcher
        .run(cmd, Capture::Output)
        .await
        .map_err(|e| Error::io(what, pidns, e))?;
    if !out.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(Error::io(what, pidns, std::io::Error::other(stderr)));
    }
    Ok(())
}

/// Reads a pagemap image: its pages id and the number of pages present in its pages file.
#[cfg(test)]
fn parse_pagemap(data: &[u8]) -> std::result::Result<(u64, u64), String> {
    parse_pagemap_lazy(data).map(|(id, present, _)| (id, present))
}

/// The pages file's id, the pages the map says are present, and how many of those are flagged
/// lazy (a lazy dump leaves those to its page server; any other dump writes them too).
fn parse_pagemap_lazy(data: &[u8]) -> std::result::Result<(u64, u64, u64), String> {
    let mut pages_id = None;
    let mut present = 0u64;
    let mut lazy = 0u64;
    for msg in crate::criu::image::entries(data, PAGEMAP_MAGIC, "pagemap")? {
        let fields = crate::criu::image::varints(msg)?;
        let get = |n: u64| fields.iter().find(|(f, _)| *f == n).map(|(_, v)| *v);
        if pages_id.is_none() {
            pages_id = Some(get(1).unwrap_or(0)); // pagemap_head.pages_id
            continue;
        }
        // CRIU 4 moved the page count to a 64-bit field 5, leaving field 2 at 0.
        let nr_pages = get(5).or(get(2)).unwrap_or(0);
        let in_parent = get(3).unwrap_or(0) != 0;
        let flags = get(4);
        let is_present = match flags {
            Some(flags) => flags & PE_PRESENT != 0,
            None => !in_parent,
        };
        if !is_present {
            continue;
        }
        present = present
            .checked_add(nr_pages)
            .ok_or("more present pages than a 64-bit count holds")?;
        if flags.is_some_and(|f| f & PE_LAZY != 0) {
            lazy += nr_pages; // at most `present`, which did not overflow
        }
    }
    Ok((pages_id.ok_or("no pagemap head")?, present, lazy))
}

/// A request to restore one container from its images.
#[derive(Debug, Clone)]
pub struct Restore {
    pub id: String,
    pub bundle: PathBuf,
    pub image_dir: PathBuf,
    /// Where CRIU writes its restore log (must be writable).
    pub work_dir: PathBuf,
    pub options: DumpOptions,
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
    /// runc's JSON log.
    pub log: PathBuf,
    /// Memory comes back through a lazy-pages daemon already listening in `work_dir`.
    pub lazy_pages: bool,
    /// Sockets CRIU takes as they are for the socket of the same inode at the dump (ends of
    /// unix connections to other containers, see the pod's shared links); the CRIU configuration
    /// file must name them ([`inherit_lines`]).
    pub inherited: Vec<InheritedSocket>,
    /// The network namespace runc and CRIU run in: required when the dump ran CRIU in the
    /// container's ([`DumpOptions::criu_in_netns`]), where the processes come back.
    pub netns: Option<PathBuf>,
}

/// A socket handed to a container's restore in place of one its CRIU images hold.
#[derive(Debug, Clone)]
pub struct InheritedSocket {
    /// The socket's inode at the dump.
    pub ino: u64,
    pub fd: std::sync::Arc<std::os::fd::OwnedFd>,
}

/// The descriptor number the first inherited socket has in runc and CRIU.
const INHERITED_FD_BASE: i32 = 1000;

/// The CRIU configuration lines naming `inherited` (`inherit-fd fd[N]:socket:[INO]`), at the
/// numbers [`restore`] gives them.
pub fn inherit_lines(inherited: &[InheritedSocket]) -> String {
    inherited
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "inherit-fd fd[{}]:socket:[{}]\n",
                INHERITED_FD_BASE + i as i32,
                s.ino
            )
        })
        .collect()
}

/// Restores a container (`runc restore --detach`); its process gets `stdio`.
pub async fn restore(runc: &Runc, r: &Restore, stdio: ProcessStdio) -> Result<()> {
    create_private_dir(&r.work_dir)?;
    let criu = r.options.criu(&r.image_dir, Some(r.work_dir.clone()))?;
    let opts = RestoreOpts {
        criu,
        pid_file: r.pid_file.clone(),
        console_socket: r.console_socket.clone(),
        no_pivot: r.no_pivot,
        log: r.log.clone(),
        deadline: Some(restore_deadline(&r.image_dir)),
        lazy_pages: r.lazy_pages,
        inherit_fds: r
            .inherited
            .iter()
            .enumerate()
            .map(|(i, s)| (INHERITED_FD_BASE + i as i32, s.fd.clone()))
            .collect(),
        netns: r.netns.clone(),
    };
    match runc.restore(&r.id, &r.bundle, opts, stdio).await {
        Ok(()) => Ok(()),
        Err(source) => {
            let log_tail = log_tail(&r.work_dir.join("restore.log"));
            if let Err(e) = runc.delete(&r.id, true).await {
                log::debug!(
                    "container {}: nothing to remove after a failed restore: {e}",
                    r.id
                );
            }
            // CRIU mounts a cgroup yard in its work directory; a killed restore leaves it.
            podsnap_runtime::mount::unmount_under(&r.work_dir);
            Err(Error::Restore {
                id: r.id.clone(),
                source: Box::new(source),
                log_tail,
            })
        }
    }
}

/// CRIU's configuration line for the restore by `runc` of container `id`, dumped with
/// `options`, when that runc cannot pass the dump's cgroups mode: a dump that left cgroups to
/// runc (`ignore`, runc 1.2+) restored by an older runc. Its default mode would move the
/// processes into the cgroups they were dumped from, which the images do not record (on a
/// hybrid node CRIU fails: "cg: Can't move into unified//kubepods/.../<old id>/cgroup.procs:
/// No such file or directory"); the configuration file overrides runc's options, so CRIU
/// leaves the processes where runc puts it, in the container's new cgroups. `options` then
/// asks runc for its default mode.
pub async fn cgroups_mode_by_config(
    runc: &Runc,
    id: &str,
    options: &mut DumpOptions,
) -> Option<&'static str> {
    if options.cgroups_mode != "ignore" {
        return None;
    }
    let offered = match runc.features().await {
        Ok(f) => f.cgroups_mode_ignore(),
        Err(e) => {
            log::warn!("container {id}: runc's features are unknown: {e}");
            false
        }
    };
    if offered {
        return None;
    }
    log::info!(
        "container {id}: dumped with cgroups mode ignore, which this runc does not pass: \
         told to CRIU through its configuration file"
    );
    options.cgroups_mode.clear();
    Some("manage-cgroups=ignore\n")
}

/// How long a restore may take: a minute, plus a second per 32 MiB of memory images (a damaged
/// image can make CRIU's restorer spin forever).
pub fn restore_deadline(image_dir: &Path) -> std::time::Duration {
    let bytes: u64 = std::fs::read_dir(image_dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    std::time::Duration::from_secs(60 + bytes / (32 << 20))
}

/// Says so when the filesystem holding `dir` (or its nearest existing parent) has no space or
/// no inode left.
fn full_filesystem(dir: &Path) -> Option<String> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    let (blocks, inodes) = (st.blocks_available(), st.files_available());
    (blocks == 0 || inodes == 0).then(|| {
        format!(
            "No space left on device: {} has {} bytes and {inodes} inodes free",
            existing.display(),
            blocks * st.fragment_size()
        )
    })
}

/// The last lines of a CRIU log, if it exists, after the log's first error lines when those
/// come before the tail: CRIU states the cause (`Connected TCP socket, consider using
/// --tcp-established option`) long before its closing `Dumping FAILED`.
pub fn log_tail(path: &Path) -> Option<String> {
    let text = read_log_end(path)?;
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES);
    let causes: Vec<&str> = lines[..start]
        .iter()
        .copied()
        .filter(|line| is_criu_error(line))
        .take(LOG_CAUSE_LINES)
        .collect();
    let tail = lines[start..].join("\n");
    if causes.is_empty() {
        Some(tail)
    } else {
        Some(format!("{}\n...\n{tail}", causes.join("\n")))
    }
}

/// The last 1 MiB of a log (a CRIU log can grow large; the cause and the tail are near its end).
fn read_log_end(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let keep = 1 << 20;
    if len > keep {
        f.seek(SeekFrom::Start(len - keep)).ok()?;
    }
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    // Drop a partial first line.
    Some(if len > keep {
        text.split_once('\n')
            .map(|(_, rest)| rest.to_string())
            .unwrap_or(text)
    } else {
        text
    })
}

/// A CRIU error line, leaving out the one every run logs (CRIU cannot raise RLIMIT_NOFILE
/// without CAP_SYS_RESOURCE; harmless).
fn is_criu_error(line: &str) -> bool {
    line.contains("Error (") && !line.contains("RLIMIT_NOFILE")
}

fn listing(dir: &Path) -> HashSet<OsString> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// Removes what a failed dump wrote: the whole directory if the dump made it, else the new
/// entries only.
fn remove_partial(dir: &Path, created_dir: bool, before: &HashSet<OsString>) {
    if created_dir {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            log::warn!("remove partial checkpoint {}: {e}", dir.display());
        }
        return;
    }
    for name in listing(dir).difference(before) {
        let path = dir.join(name);
        let res = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = res {
            log::warn!("remove partial checkpoint file {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
