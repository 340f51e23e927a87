//! Pod dump: every container of a pod captured at one instant.
//!
//! 1. quiesce: freeze each running container's own cgroup (CRIU cannot see a parent's freeze);
//! 2. while frozen, in parallel: dump each container with CRIU (leave running), capture its
//!    rootfs changes, archive the pod's emptyDir volumes;
//! 3. thaw every container, whatever happened;
//! 4. copy specs, digest every file, write the manifest last (temporary file, fsync, rename),
//!    and rename the staging directory into place.
//!
//! Any failure removes all output and returns an error naming the container, with the tail of
//! CRIU's log. Containers that are not running (completed init containers) are recorded only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use podsnap_runtime::cgroup::CgroupPaths;
use podsnap_runtime::launcher::Launcher;
use podsnap_runtime::runc::Runc;

use crate::container::{self, create_private_dir, Dump, DumpOptions};
use crate::error::{Error, Result};
use crate::manifest::{
    validate_name, ContainerEntry, DumpStats, FileDigest, HostInfo, Manifest, PodInfo, VolumeEntry,
    VolumeMount, CPUINFO, FORMAT, MANIFEST, VERSION,
};
use crate::record::{ContainerState, Role};
use crate::rootfs;

/// Path fragment of a kubelet emptyDir volume's host directory.
pub const EMPTY_DIR_MARK: &str = "/volumes/kubernetes.io~empty-dir/";

/// A container of the pod, as the shim knows it.
#[derive(Debug, Clone)]
pub struct Target {
    pub entry: ContainerEntry,
    pub runc: Runc,
    pub bundle: PathBuf,
    pub cgroups: Option<CgroupPaths>,
    /// The container's OCI spec when its bundle is gone (a completed container whose task was
    /// deleted); read from the bundle otherwise.
    pub spec: Option<Vec<u8>>,
}

/// What to dump and where.
#[derive(Clone)]
pub struct PodDump {
    pub dest: PathBuf,
    pub pod: PodInfo,
    pub host: HostInfo,
    pub targets: Vec<Target>,
    /// Keep established TCP connections on restore (they are always captured).
    pub tcp_established: bool,
    /// Runs the programs of the dump that are not runc (`criu cpuinfo`).
    pub launcher: std::sync::Arc<dyn Launcher>,
}

impl std::fmt::Debug for PodDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodDump")
            .field("dest", &self.dest)
            .field("pod", &self.pod.sandbox_id)
            .field("targets", &self.targets.len())
            .finish()
    }
}

/// How a dump went.
#[derive(Debug, Clone, Default)]
pub struct DumpReport {
    /// First freeze to last thaw.
    pub frozen: Duration,
    /// The slowest single container's CRIU dump.
    pub slowest_dump: Duration,
    pub total: Duration,
    pub bytes: u64,
    pub dumped: Vec<String>,
}

/// Dumps a pod; see the module documentation.
pub async fn dump_pod(d: PodDump) -> Result<DumpReport> {
    let started = Instant::now();
    for t in &d.targets {
        validate_name(&t.entry.name).map_err(|reason| Error::InvalidCheckpoint {
            path: d.dest.clone(),
            reason,
        })?;
    }
    let staging = Staging::new(&d.dest)?;
    match dump_into(&d, staging.dir()).await {
        Ok(mut report) => {
            staging.commit()?;
            report.total = started.elapsed();
            Ok(report)
        }
        Err(e) => {
            staging.abandon();
            Err(e)
        }
    }
}

async fn dump_into(d: &PodDump, dir: &Path) -> Result<DumpReport> {
    let mut report = DumpReport::default();
    let running: Vec<&Target> = d
        .targets
        .iter()
        .filter(|t| {
            t.entry.role == Role::Container
                && matches!(t.entry.state, ContainerState::Running | ContainerState::Paused)
        })
        .collect();
    for t in &d.targets {
        create_private_dir(&dir.join(t.entry.dir()))?;
    }
    // The CPU this pod runs on, so a restore elsewhere is checked before it starts (outside
    // the frozen window).
    let host_dir = dir
        .join(CPUINFO)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    create_private_dir(&host_dir)?;
    crate::host::dump_cpuinfo(d.launcher.as_ref(), &host_dir).await?;

    // 1. Quiesce.
    let freeze_start = Instant::now();
    let mut frozen: Vec<&Target> = Vec::new();
    let mut freeze_error = None;
    for t in running
        .iter()
        .filter(|t| t.entry.state == ContainerState::Running)
    {
        let Some(cg) = t.cgroups.clone() else {
            freeze_error = Some(format!("container {}: its cgroups are unknown", t.entry.name));
            break;
        };
        match tokio::task::spawn_blocking(move || cg.set_frozen(true)).await {
            Ok(Ok(())) => frozen.push(t),
            Ok(Err(e)) => {
                freeze_error = Some(format!("freeze container {}: {e}", t.entry.name));
                break;
            }
            Err(e) => {
                freeze_error = Some(format!("freeze container {}: {e}", t.entry.name));
                break;
            }
        }
    }

    // 2. Capture while frozen.
    let captured = if freeze_error.is_none() {
        capture_all(d, dir, &running).await
    } else {
        Ok((Duration::ZERO, Vec::new()))
    };

    // 3. Resume, always.
    for t in &frozen {
        if let Some(cg) = t.cgroups.clone() {
            match tokio::task::spawn_blocking(move || cg.set_frozen(false)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::error!("container {}: thaw after the dump failed: {e}", t.entry.id),
                Err(e) => log::error!("container {}: thaw after the dump failed: {e}", t.entry.id),
            }
        }
    }
    report.frozen = freeze_start.elapsed();
    if let Some(reason) = freeze_error {
        return Err(Error::InvalidCheckpoint {
            path: d.dest.clone(),
            reason,
        });
    }
    let (slowest, volumes) = captured?;
    report.slowest_dump = slowest;
    report.dumped = running.iter().map(|t| t.entry.name.clone()).collect();

    // 4. Specs, digests, manifest.
    for t in &d.targets {
        let dst = dir.join(t.entry.dir()).join("config.json");
        let spec = match &t.spec {
            Some(spec) => spec.clone(),
            None => {
                let src = t.bundle.join("config.json");
                std::fs::read(&src).map_err(|e| Error::io("read a container spec", &src, e))?
            }
        };
        container::write_private(&dst, &spec)?;
    }
    let files = digest_tree(dir).await?;
    report.bytes = files.values().map(|f| f.size).sum();
    let mut containers: Vec<ContainerEntry> = d
        .targets
        .iter()
        .map(|t| {
            let mut e = t.entry.clone();
            e.dumped = running.iter().any(|r| r.entry.id == t.entry.id);
            if e.role == Role::Container && e.rootfs_layers.is_empty() {
                e.rootfs_layers = rootfs::lowerdirs_of(&t.bundle.join("rootfs")).unwrap_or_default();
            }
            e
        })
        .collect();
    containers.sort_by_key(|c| c.created_order);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        pod: d.pod.clone(),
        host: d.host.clone(),
        tcp_established: d.tcp_established,
        containers,
        volumes,
        files,
        stats: DumpStats {
            frozen_us: report.frozen.as_micros() as u64,
            slowest_dump_us: report.slowest_dump.as_micros() as u64,
        },
    };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| Error::io("encode the manifest", dir, e.into()))?;
    write_synced(&dir.join(MANIFEST), &json)?;
    Ok(report)
}

/// Dumps every running container and archives volumes, in parallel.
async fn capture_all(d: &PodDump, dir: &Path, running: &[&Target]) -> Result<(Duration, Vec<VolumeEntry>)> {
    let mut tasks = tokio::task::JoinSet::new();
    for t in running {
        let t = (*t).clone();
        let cdir = dir.join(t.entry.dir());
        tasks.spawn(async move {
            let began = Instant::now();
            let dump = Dump {
                id: t.entry.id.clone(),
                image_dir: cdir.join("criu"),
                work_dir: None,
                options: DumpOptions {
                    tcp_established: true,
                    file_locks: true,
                    ..Default::default()
                },
                leave_running: true,
                cgroups: None,
                was_paused: true,
            };
            container::dump(&t.runc, &dump).await.map_err(|e| match e {
                Error::Dump { source, log_tail, .. } => Error::Dump {
                    id: format!("{} ({})", t.entry.name, t.entry.id),
                    source,
                    log_tail,
                },
                other => other,
            })?;
            let took = began.elapsed();
            let rootfs_dir = t.bundle.join("rootfs");
            let tar = cdir.join("rootfs-diff.tar");
            let del = cdir.join("rootfs-deleted.json");
            tokio::task::spawn_blocking(move || match rootfs::upperdir_of(&rootfs_dir) {
                Some(upper) => rootfs::capture(&upper, &tar, &del).map(drop),
                None => {
                    log::info!(
                        "{}: rootfs is not an overlay, no changes captured",
                        rootfs_dir.display()
                    );
                    Ok(())
                }
            })
            .await
            .map_err(|e| Error::io("capture rootfs changes", &t.bundle, std::io::Error::other(e)))??;
            Ok::<Duration, Error>(took)
        });
    }
    let volumes = empty_dirs(&d.targets);
    if !volumes.is_empty() {
        create_private_dir(&dir.join("volumes"))?;
    }
    for (name, (src, _)) in &volumes {
        let src = src.clone();
        let tar = dir.join("volumes").join(format!("{name}.tar"));
        tasks.spawn(async move {
            tokio::task::spawn_blocking(move || rootfs::archive_dir(&src, &tar))
                .await
                .map_err(|e| Error::io("archive a volume", "volumes", std::io::Error::other(e)))??;
            Ok(Duration::ZERO)
        });
    }
    let mut slowest = Duration::ZERO;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(took)) => slowest = slowest.max(took),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::io("dump task", dir, std::io::Error::other(e)));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let entries = volumes
        .into_iter()
        .map(|(name, (_, mounts))| VolumeEntry {
            archive: format!("volumes/{name}.tar"),
            name,
            mounts,
        })
        .collect();
    Ok((slowest, entries))
}

/// The pod's emptyDir volumes: name -> (host directory, mounts), from the containers' specs.
pub fn empty_dirs(targets: &[Target]) -> BTreeMap<String, (PathBuf, Vec<VolumeMount>)> {
    let mut out: BTreeMap<String, (PathBuf, Vec<VolumeMount>)> = BTreeMap::new();
    for t in targets.iter().filter(|t| t.entry.role == Role::Container) {
        let Ok(spec) = podsnap_runtime::bundle::Bundle::new(&t.bundle).spec() else {
            continue;
        };
        for m in spec.mounts().iter().flatten() {
            let Some(src) = m.source().as_ref().and_then(|s| s.to_str()) else {
                continue;
            };
            let Some(name) = empty_dir_name(src) else { continue };
            let entry = out
                .entry(name.to_string())
                .or_insert_with(|| (PathBuf::from(src), Vec::new()));
            entry.1.push(VolumeMount {
                container: t.entry.name.clone(),
                path: m.destination().display().to_string(),
            });
        }
    }
    out
}

/// The volume name of a kubelet emptyDir host path.
pub fn empty_dir_name(source: &str) -> Option<&str> {
    let (_, rest) = source.split_once(EMPTY_DIR_MARK)?;
    let name = rest.trim_end_matches('/');
    (validate_name(name).is_ok()).then_some(name)
}

/// Size and SHA-256 of every regular file under `dir` (but the manifest), in parallel.
async fn digest_tree(dir: &Path) -> Result<BTreeMap<String, FileDigest>> {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)
            .map_err(|e| Error::io("list the checkpoint", &d, e))?
            .flatten()
        {
            let p = e.path();
            let ft = e
                .file_type()
                .map_err(|err| Error::io("stat a checkpoint file", &p, err))?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() && p != dir.join(MANIFEST) {
                paths.push(p);
            }
        }
    }
    // Largest first, over as many workers as there are cores.
    paths.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let paths = std::sync::Arc::new(paths);
    let next = std::sync::Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (paths, next, root) = (paths.clone(), next.clone(), dir.to_path_buf());
        tasks.spawn_blocking(move || {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(p) = paths.get(i) else { break };
                let size = std::fs::metadata(p)
                    .map_err(|e| Error::io("stat a checkpoint file", p, e))?
                    .len();
                let sha256 = crate::manifest::sha256_file(p)
                    .map_err(|e| Error::io("digest a checkpoint file", p, e))?;
                let rel = p.strip_prefix(&root).unwrap_or(p).to_string_lossy().into_owned();
                out.push((rel, FileDigest { size, sha256 }));
            }
            Ok::<_, Error>(out)
        });
    }
    let mut files = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let part = r.map_err(|e| Error::io("digest task", dir, std::io::Error::other(e)))??;
        files.extend(part);
    }
    Ok(files)
}

/// Writes a file durably and atomically: temporary name, fsync, rename, fsync the directory.
pub fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = rootfs::create_private(&tmp)?;
    f.write_all(data).map_err(|e| Error::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| Error::io("sync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync a directory", dir, e))
}

/// The directory a dump writes into until it is complete.
struct Staging {
    dest: PathBuf,
    dir: PathBuf,
    /// The destination existed (empty) and is written in place.
    in_place: bool,
}

impl Staging {
    fn new(dest: &Path) -> Result<Self> {
        let exists_empty = match std::fs::read_dir(dest) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(Error::InvalidCheckpoint {
                        path: dest.to_path_buf(),
                        reason: "the destination exists and is not empty".into(),
                    });
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io("inspect the destination", dest, e)),
        };
        if exists_empty {
            create_private_dir(dest)?;
            return Ok(Self {
                dest: dest.to_path_buf(),
                dir: dest.to_path_buf(),
                in_place: true,
            });
        }
        let parent = dest.parent().unwrap_or(Path::new("."));
        create_private_dir(parent)?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove a stale staging dir", &dir, e))?;
        }
        create_private_dir(&dir)?;
        Ok(Self {
            dest: dest.to_path_buf(),
            dir,
            in_place: false,
        })
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn commit(&self) -> Result<()> {
        if !self.in_place {
            std::fs::rename(&self.dir, &self.dest)
                .map_err(|e| Error::io("move the checkpoint into place", &self.dest, e))?;
        }
        sync_dir(self.dest.parent().unwrap_or(Path::new(".")))
    }

    fn abandon(&self) {
        let res = if self.in_place {
            std::fs::read_dir(&self.dir).map(|rd| {
                for e in rd.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            })
        } else {
            std::fs::remove_dir_all(&self.dir)
        };
        if let Err(e) = res {
            log::warn!("remove partial checkpoint {}: {e}", self.dir.display());
        }
    }
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
    fn staging_refuses_a_non_empty_destination_and_cleans_up() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("f"), b"x").expect("write");
        assert!(Staging::new(t.path()).is_err());
        let dest = t.path().join("new");
        let s = Staging::new(&dest).expect("staging");
        std::fs::write(s.dir().join("partial"), b"x").expect("write");
        s.abandon();
        assert!(!s.dir().exists() && !dest.exists());
        let s = Staging::new(&dest).expect("staging");
        write_synced(&s.dir().join(MANIFEST), b"{}").expect("manifest");
        s.commit().expect("commit");
        assert!(dest.join(MANIFEST).exists());
    }
}
