//! `podsnap dump`: checkpoint a whole pod into a directory.
//!
//! The pod is found through CRI by its Kubernetes namespace and name; the checkpoint itself is a
//! containerd Tasks.Checkpoint on the pod's sandbox task with runc `CheckpointOptions`, which the
//! podsnap shim answers by quiescing and dumping every container of the pod into `image_path`.
//! A failed dump leaves the pod running and no directory behind (the shim guarantees it); its
//! error names the container and quotes CRIU's log.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podsnap_checkpoint::format::manifest::{Manifest, MANIFEST, MAX_MANIFEST_BYTES};

use crate::containerd::{CheckpointOptions, Containerd, CRI_NAMESPACE};
use crate::cri;
use crate::error::{Error, Result};
use crate::pod::{find_ready_pod, PodRef};
use crate::progress::Progress;
use crate::summary::CheckpointSummary;

/// What to dump, where, and how.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// CRI endpoint (`unix:///run/containerd/containerd.sock`).
    pub runtime_endpoint: String,
    /// containerd's socket.
    pub address: PathBuf,
    /// The node's checkpoint root (the default destination's parent).
    pub checkpoint_root: PathBuf,
    pub namespace: String,
    pub pod: String,
    /// Destination; `<root>/<namespace>-<pod>-<UTC time>` when `None`. Must not exist or be empty.
    pub dir: Option<PathBuf>,
    /// Stop the pod's containers after the dump instead of leaving them running.
    pub stop: bool,
    /// Keep established TCP connections on restore.
    pub tcp_established: bool,
    /// The runtime handler pods must run on.
    pub handler: String,
    /// Give up on the dump after this long (the shim then thaws the pod and removes the
    /// output); the node's dump deadline applies either way.
    pub timeout: Option<Duration>,
    /// The persistent volumes to carry (`local`, or names separated by commas); asked of the
    /// shim through `<dest>.request`.
    pub carry_volumes: Option<String>,
    /// Leave the pod's network locked after the dump (the caller paused the pod and unlocks
    /// it when it resumes it: `migrate --to-node`); asked through `<dest>.request` too.
    pub hold_network: bool,
    /// A lazy dump for a live migration: the directory where `migrate` listens (see
    /// `DumpAsk::serve`).
    pub serve_dir: Option<PathBuf>,
}

impl DumpRequest {
    /// A request with the standard sockets, root and handler.
    pub fn new(namespace: &str, pod: &str) -> Self {
        Self {
            runtime_endpoint: format!("unix://{}", crate::containerd::DEFAULT_ADDRESS),
            address: PathBuf::from(crate::containerd::DEFAULT_ADDRESS),
            checkpoint_root: PathBuf::from(crate::DEFAULT_CHECKPOINT_ROOT),
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            dir: None,
            stop: false,
            tcp_established: false,
            timeout: None,
            handler: crate::pod::HANDLER.to_owned(),
            carry_volumes: None,
            hold_network: false,
            serve_dir: None,
        }
    }
}

/// A finished dump.
#[derive(Debug, Clone)]
pub struct DumpOutcome {
    pub pod: PodRef,
    pub summary: CheckpointSummary,
    /// Wall time of the whole operation.
    pub took: Duration,
}

/// Checkpoints pod `request.namespace/request.pod`; see the module documentation.
pub async fn dump(request: &DumpRequest, progress: &dyn Progress) -> Result<DumpOutcome> {
    let started = Instant::now();
    progress.step(&format!("finding pod {}/{}", request.namespace, request.pod));
    let clients = cri::connect(&request.runtime_endpoint).await?;
    let pod = find_ready_pod(&clients, &request.namespace, &request.pod, &request.handler).await?;
    let dir = destination(request)?;
    let containerd = Containerd::connect(&request.address, CRI_NAMESPACE).await?;
    progress.step(&format!(
        "checkpointing pod {pod} (sandbox {}) into {}",
        short(&pod.id),
        dir.display()
    ));
    // What containerd's checkpoint options cannot say goes beside the destination, for the
    // dump's time only.
    let ask = podsnap_checkpoint::format::layout::DumpAsk {
        carry_volumes: request.carry_volumes.clone(),
        group: None,
        hold_network: request.hold_network,
        serve: request
            .serve_dir
            .clone()
            .map(|dir| podsnap_checkpoint::format::layout::ServeAsk { dir }),
    };
    let (dumped, images) = tokio::join!(
        checkpoint_pod(&containerd, &pod, &dir, request, &ask),
        ImageIds::of(&clients, &pod.id)
    );
    dumped?;
    progress.step("recording the containers' image ids");
    images?.record(&dir)?;
    let manifest = read_manifest(&dir)?;
    let summary = CheckpointSummary::new(&dir, &manifest, &request.checkpoint_root);
    log::info!(
        "pod {pod} (sandbox {}): dumped {:?} into {}",
        pod.id,
        summary.dumped,
        dir.display()
    );
    Ok(DumpOutcome {
        pod,
        summary,
        took: started.elapsed(),
    })
}

/// The Tasks.Checkpoint of `pod`'s sandbox into `dir`, with `ask` beside it (when it asks
/// anything) for the call's time: what the shim answers for the whole pod.
pub(crate) async fn checkpoint_pod(
    containerd: &Containerd,
    pod: &PodRef,
    dir: &Path,
    request: &DumpRequest,
    ask: &podsnap_checkpoint::format::layout::DumpAsk,
) -> Result<()> {
    if let Some(text) = &ask.carry_volumes {
        podsnap_checkpoint::format::persistent::Carry::parse(text)
            .map_err(|why| Error::Refused(format!("--volumes {why}")))?;
    }
    let _asked = match *ask != Default::default() {
        true => Some(Asked::write(dir, ask)?),
        false => None,
    };
    let options = CheckpointOptions {
        image_path: dir.to_string_lossy().into_owned(),
        exit: request.stop,
        open_tcp: request.tcp_established,
        ..Default::default()
    };
    containerd
        .checkpoint_task(&pod.id, &options, request.timeout)
        .await
        .map_err(|e| {
            log::error!("pod {pod} (sandbox {}): dump failed: {e}", pod.id);
            match e {
                crate::containerd::Error::Call { status, .. } => Error::Dump {
                    pod: pod.to_string(),
                    sandbox: short(&pod.id).to_owned(),
                    code: status.code(),
                    message: status.message().to_owned(),
                },
                other => Error::Containerd(other),
            }
        })
        .map(drop)
}

/// `<dest>.request` while the dump runs; removed on drop.
struct Asked(PathBuf);

impl Asked {
    fn write(dest: &Path, ask: &podsnap_checkpoint::format::layout::DumpAsk) -> Result<Asked> {
        let path = podsnap_checkpoint::format::layout::request_file(dest);
        let json =
            serde_json::to_vec(ask).map_err(|e| Error::io("encode the dump request", &path)(e.into()))?;
        podsnap_checkpoint::fs::private::replace_private(&path, &json, "write the dump request")?;
        Ok(Asked(path))
    }
}

impl Drop for Asked {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The absolute destination, checked to be absent or empty; the root is created if missing.
pub fn destination(request: &DumpRequest) -> Result<PathBuf> {
    let dir = match &request.dir {
        Some(dir) => dir.clone(),
        None => {
            create_private_dir_all(&request.checkpoint_root)?;
            free_name(
                &request.checkpoint_root,
                &default_name(&request.namespace, &request.pod, time::OffsetDateTime::now_utc()),
            )
        }
    };
    let dir = std::path::absolute(&dir).map_err(Error::io("resolve the destination", &dir))?;
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Error::Refused(format!(
                    "the destination {} exists and is not empty: give a new directory with --dir",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(Error::Refused(format!(
                "the destination {} exists and is not a directory",
                dir.display()
            )))
        }
        Err(e) => return Err(Error::io("inspect the destination", &dir)(e)),
    }
    Ok(dir)
}

/// `root/base`, or `root/base-2`, `-3`... when a checkpoint already has that name (two dumps
/// of a pod in one second).
fn free_name(root: &Path, base: &str) -> PathBuf {
    let mut dir = root.join(base);
    let mut n = 2;
    while std::fs::symlink_metadata(&dir).is_ok() {
        dir = root.join(format!("{base}-{n}"));
        n += 1;
    }
    dir
}

/// `<namespace>-<pod>-<YYYYMMDDTHHMMSSZ>`.
pub fn default_name(namespace: &str, pod: &str, at: time::OffsetDateTime) -> String {
    format!("{namespace}-{pod}-{}", utc_stamp(at))
}

/// `YYYYMMDDTHHMMSSZ` (UTC): sorts by time, safe in file names.
pub fn utc_stamp(at: time::OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

/// Reads and parses a checkpoint's manifest (digests are not checked: the dump just wrote them).
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let meta = std::fs::metadata(&path).map_err(Error::io("read the manifest", &path))?;
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(Error::Refused(format!(
            "{} is larger than {MAX_MANIFEST_BYTES} bytes",
            path.display()
        )));
    }
    let bytes = std::fs::read(&path).map_err(Error::io("read the manifest", &path))?;
    Ok(Manifest::parse(&bytes)?)
}

/// The image of each container of a sandbox, as CRI knows it: its id and its repo digests, by
/// container id. The manifest records them because the shim cannot see them: each container's
/// image id (a restore refuses a container whose image changed since), and its image pinned by
/// a repo digest (a node lacking the image pulls exactly it).
#[derive(Debug, Default)]
pub(crate) struct ImageIds(std::collections::HashMap<String, (String, Vec<String>)>);

impl ImageIds {
    /// Asks CRI for the images of sandbox `sandbox`'s containers. Keyed by container id, so the
    /// manifest gets the image of the very container the dump took, even if kubelet restarted
    /// one meanwhile; this runs beside the dump rather than after it, outside the pod's downtime.
    pub(crate) async fn of(clients: &cri::CriClients, sandbox: &str) -> Result<Self> {
        let listed = clients
            .runtime
            .clone()
            .list_containers(k8s_cri::v1::ListContainersRequest {
                filter: Some(k8s_cri::v1::ContainerFilter {
                    pod_sandbox_id: sandbox.to_owned(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(Error::cri(format!("ListContainers of sandbox {sandbox}")))?
            .into_inner()
            .containers;
        let images: std::collections::BTreeSet<&str> = listed
            .iter()
            .map(|c| c.image_ref.as_str())
            .filter(|i| !i.is_empty())
            .collect();
        let statuses = images.into_iter().map(|image| async move {
            let repo_digests = cri::image_status(clients, image)
                .await?
                .map(|i| i.repo_digests)
                .unwrap_or_default();
            Ok::<_, Error>((image, repo_digests))
        });
        let digests: std::collections::HashMap<&str, Vec<String>> = futures::future::try_join_all(statuses)
            .await?
            .into_iter()
            .collect();
        Ok(Self(
            listed
                .iter()
                .filter_map(|c| {
                    let repo_digests = digests.get(c.image_ref.as_str())?;
                    Some((c.id.clone(), (c.image_ref.clone(), repo_digests.clone())))
                })
                .collect(),
        ))
    }

    /// Records them in the manifest of the checkpoint just dumped into `dir` (each container's
    /// image id, and the pinned reference of its image when one is clear), where it does not
    /// say them yet.
    pub(crate) fn record(&self, dir: &Path) -> Result<()> {
        let mut manifest = read_manifest(dir)?;
        let mut changed = false;
        for entry in manifest.containers.iter_mut() {
            let Some((id, repo_digests)) = self.0.get(&entry.id) else {
                continue;
            };
            if entry.image_id.is_none() {
                entry.image_id = Some(id.clone());
                changed = true;
            }
            if entry.image_digest.is_none() {
                entry.image_digest = pinned_reference(entry.image.as_deref(), repo_digests);
                changed |= entry.image_digest.is_some();
            }
        }
        if changed {
            write_manifest(dir, &manifest)?;
        }
        Ok(())
    }
}

/// Replaces the manifest of the checkpoint the dump just wrote in `dir` by `manifest` (the same
/// files, more said of them).
pub(crate) fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<()> {
    let json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| Error::Refused(format!("encode the manifest: {e}")))?;
    // The dump sealed its files (`podsnap_checkpoint::trust::seal`); a new manifest listing the
    // same files keeps them sealed only if they still were.
    let seals = Path::new(podsnap_checkpoint::trust::seal::SEAL_DIR);
    let sealed = podsnap_checkpoint::trust::seal::holds(seals, dir, manifest);
    podsnap_checkpoint::fs::private::write_synced(&dir.join(MANIFEST), &json).map_err(Box::new)?;
    if sealed {
        if let Err(e) = podsnap_checkpoint::trust::seal::record(seals, dir, manifest) {
            log::warn!("{e}");
        }
    }
    Ok(())
}

/// Of an image's repo digests (`repo@sha256:...`), the one of the repository the container
/// named (`repo:tag`), else the only one; none when it is ambiguous.
fn pinned_reference(image: Option<&str>, repo_digests: &[String]) -> Option<String> {
    let pinned = repo_digests.iter().filter(|d| d.contains("@sha256:"));
    if let Some(image) = image {
        let wanted = podsnap_checkpoint::trust::policy::image_repository(image);
        if let Some(found) = pinned
            .clone()
            .find(|d| podsnap_checkpoint::trust::policy::image_repository(d) == wanted)
        {
            return Some(found.clone());
        }
    }
    let all: Vec<&String> = pinned.collect();
    match all.as_slice() {
        [only] => Some((*only).clone()),
        _ => None,
    }
}

pub(crate) fn create_private_dir_all(dir: &Path) -> Result<()> {
    podsnap_checkpoint::fs::private::create_private_dir(dir).map_err(|e| Box::new(e).into())
}

/// The first 13 characters of an id, as `crictl` shows them.
pub fn short(id: &str) -> &str {
    id.get(..13).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_dump_in_the_same_second_gets_a_name_of_its_own() {
        let root = tempfile::tempdir().expect("tmp");
        let base = "default-web-20261207T094811Z";
        assert_eq!(free_name(root.path(), base), root.path().join(base));
        std::fs::create_dir(root.path().join(base)).expect("the first dump");
        assert_eq!(
            free_name(root.path(), base),
            root.path().join(format!("{base}-2"))
        );
        std::fs::create_dir(root.path().join(format!("{base}-2"))).expect("the second");
        assert_eq!(
            free_name(root.path(), base),
            root.path().join(format!("{base}-3"))
        );
    }

    #[test]
    fn default_names_sort_by_time() {
        let at = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("a time");
        assert_eq!(default_name("default", "web", at), "default-web-20231114T221320Z");
    }

    #[test]
    fn destinations_must_be_new_or_empty() {
        let t = tempfile::tempdir().expect("tempdir");
        let mut request = DumpRequest::new("default", "web");
        request.checkpoint_root = t.path().join("root");
        let dir = destination(&request).expect("default destination");
        assert!(dir.starts_with(t.path().join("root")) && dir.is_absolute());
        assert!(t.path().join("root").is_dir(), "the root is created");
        request.dir = Some(t.path().join("root"));
        assert!(destination(&request).is_ok(), "an empty directory is fine");
        std::fs::write(t.path().join("root/x"), b"x").expect("write");
        let err = destination(&request).expect_err("not empty");
        assert!(err.to_string().contains("is not empty"), "{err}");
        request.dir = Some(t.path().join("root/x"));
        assert!(destination(&request).is_err(), "a file");
    }

    #[test]
    fn the_pinned_reference_is_of_the_containers_repository() {
        let digests = [
            "mirror.example/team/app@sha256:1111".to_owned(),
            "127.0.0.1:5000/team/app@sha256:2222".to_owned(),
        ];
        assert_eq!(
            pinned_reference(Some("127.0.0.1:5000/team/app:v1"), &digests).as_deref(),
            Some("127.0.0.1:5000/team/app@sha256:2222")
        );
        assert_eq!(
            pinned_reference(Some("127.0.0.1:5000/team/app"), &digests).as_deref(),
            Some("127.0.0.1:5000/team/app@sha256:2222"),
            "no tag"
        );
        assert_eq!(
            pinned_reference(Some("other/app:v1"), &digests),
            None,
            "ambiguous"
        );
        assert_eq!(
            pinned_reference(Some("other/app:v1"), &digests[..1]).as_deref(),
            Some("mirror.example/team/app@sha256:1111"),
            "the only one"
        );
        assert_eq!(
            pinned_reference(Some("app:v1"), &[]),
            None,
            "imported, never pulled"
        );
    }
}
