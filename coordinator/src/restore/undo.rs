//! Step 4: what a failed restore made, removed again (the sandbox, the pod's directories, its
//! cgroups, what was brought into the root); and the new pod's uid.

use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use podsnap_runtime::cgroup::{CgroupMode, CgroupPaths, CGROUP_ROOT};

use crate::cri::CriClients;
use crate::error::{Error, Result};

/// Makes `dir` (and missing parents, which are recorded too) with `mode`.
pub(super) fn make_dir(dir: &Path, mode: u32, undo: &mut Undo) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut missing = Vec::new();
    let mut cursor = Some(dir);
    while let Some(p) = cursor.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(p.to_path_buf());
        cursor = p.parent();
    }
    for p in missing.iter().rev() {
        std::fs::create_dir(p).map_err(Error::io("create a directory", p))?;
        undo.dirs.push(p.clone());
    }
    if !missing.is_empty() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(Error::io("chmod a directory", dir))?;
    }
    Ok(())
}

/// What a failed restore must remove.
#[derive(Debug, Default)]
pub(super) struct Undo {
    pub(super) sandbox: Option<String>,
    /// The pod's cgroup, relative to each hierarchy's root.
    pub(super) cgroup: Option<PathBuf>,
    /// Directories made, in creation order.
    pub(super) dirs: Vec<PathBuf>,
    pub(super) imported: Option<PathBuf>,
}

impl Undo {
    /// Removes everything recorded; returns a line per thing done or failed.
    pub(super) async fn run(self, clients: &CriClients) -> String {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut runtime = clients.runtime.clone();
        if let Some(id) = &self.sandbox {
            let stopped = runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
            let removed = runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                })
                .await;
            match (stopped, removed) {
                (_, Ok(_)) => done.push(format!("pod sandbox {id} and its containers")),
                (Err(s), Err(r)) => failed.push(format!(
                    "pod sandbox {id}: stop: {}; remove: {}",
                    s.message(),
                    r.message()
                )),
                (Ok(_), Err(r)) => failed.push(format!("pod sandbox {id}: remove: {}", r.message())),
            }
        }
        if let Some(rel) = &self.cgroup {
            failed.extend(remove_pod_cgroups(rel));
        }
        // The earliest directory made contains the later ones.
        let mut removed: Vec<PathBuf> = Vec::new();
        for dir in &self.dirs {
            if removed.iter().any(|r| dir.starts_with(r)) {
                continue;
            }
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {
                    done.push(dir.display().to_string());
                    removed.push(dir.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => failed.push(format!("{}: {e}", dir.display())),
            }
        }
        if let Some(imported) = &self.imported {
            match std::fs::remove_dir_all(imported) {
                Ok(()) => done.push(format!("the imported checkpoint {}", imported.display())),
                Err(e) => failed.push(format!("the imported checkpoint {}: {e}", imported.display())),
            }
        }
        let mut report = format!(
            "removed: {}",
            if done.is_empty() {
                "nothing".to_owned()
            } else {
                done.join(", ")
            }
        );
        if !failed.is_empty() {
            report.push_str(&format!(
                "\nNOT removed (clean up by hand): {}",
                failed.join("; ")
            ));
        }
        report
    }
}

/// Removes the pod's (now empty) cgroup `rel` and those below it, in every v1 hierarchy or
/// the v2 one, as kubelet does once a pod is gone. Returns what could not be removed.
pub(super) fn remove_pod_cgroups(rel: &Path) -> Vec<String> {
    let mut failed = Vec::new();
    if rel.as_os_str().is_empty() {
        return failed; // never a hierarchy's root
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let paths = CgroupPaths::at(rel, &own, Path::new(CGROUP_ROOT), CgroupMode::of_node());
    for pod in paths.dirs() {
        if !pod.is_dir() {
            continue;
        }
        for dir in podsnap_runtime::cgroup::tree(pod).iter().rev() {
            if let Err(e) = std::fs::remove_dir(dir) {
                failed.push(format!("cgroup {}: {e}", dir.display()));
            }
        }
    }
    failed
}

/// A random pod uid in the usual 8-4-4-4-12 form.
pub(super) fn new_uid() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::io("read random bytes", "/dev/urandom"))?;
    // Version 4, variant 1.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}
