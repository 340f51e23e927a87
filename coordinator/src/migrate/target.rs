//! `podsnap receive --listen ADDR`: the target of a direct migration. Several migrations may
//! run at once (a source draining its node moves pods in parallel), each on its own connection,
//! into its own staging directory, restoring its own pod.
//!
//! For each migration: the source's manifest first, checked against the node's restore policy
//! (a checkpoint this node may not restore is refused before any file is sent); then every
//! file the manifest lists, written into a staging directory inside the checkpoint root
//! (`.<name>.tmp-<pid>`, 0700, files 0600, created once, never through a symlink), each of the
//! listed size and digest as it is written (the same checks as a registry pull:
//! [`crate::oci::ListedFile`]); nothing unlisted, nothing missing ([`Manifest::load_listed`]);
//! then renamed to `received-<namespace>-<pod>-<UTC time>` and restored through CRI as
//! `podsnap restore` does. `restored` goes to the source only once every container runs; the
//! pod is kept only if the source answers `commit`, and removed (with the received checkpoint)
//! on any failure before that. A receiver that is killed leaves its staging directory; the
//! next `podsnap receive` on the node removes those of receivers that are gone.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use std::collections::BTreeSet;

use podsnap_checkpoint::format::manifest::{Manifest, MANIFEST};

use super::channel::{Channel, Endpoint};
use super::error::Error as ChannelError;
use super::frame::{Frame, Message};
use super::pages::Pages;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::restore::{restore_undoable, RestoreRequest, RestoredPod};

/// What `podsnap receive` does with what it receives.
#[derive(Debug, Clone)]
pub struct ReceiveRequest {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// The restore of each received pod: endpoint, checkpoint root, kubelet directories,
    /// handler, node configuration (its `checkpoint_dir` is replaced by the received one).
    pub restore: RestoreRequest,
    /// Return after the first migration that got past the handshake (its result).
    pub once: bool,
}

/// One migration received and kept.
#[derive(Debug)]
pub struct Received {
    /// Who sent it.
    pub peer: String,
    /// The received checkpoint.
    pub dir: PathBuf,
    /// Files and bytes received.
    pub files: usize,
    pub bytes: u64,
    /// The pod restored from it.
    pub pod: RestoredPod,
}

/// Listens and receives migrations until stopped (or, with `once`, the first one). `listening`
/// is told the address once the socket is bound; `done` each migration's outcome.
pub async fn receive(
    request: &ReceiveRequest,
    endpoint: &Endpoint,
    progress: &dyn Progress,
    listening: &(dyn Fn(std::net::SocketAddr) + Sync),
    done: &(dyn Fn(&Result<Received>) + Sync),
) -> Result<()> {
    use futures::StreamExt;
    remove_stale_staging(&request.restore.checkpoint_root);
    let listener = endpoint.bind(&request.listen).await?;
    listening(listener.local_addr()?);
    // Connections under way, each through its handshake and then its migration (several at
    // once: a source draining its node moves pods in parallel); with `once`, one at a time,
    // until the first that got past its handshake is over.
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            // Only the TCP accept here: dropped when a migration ends first, it loses nothing.
            connection = listener.connection(), if !request.once || running.is_empty() => {
                let (tcp, from) = connection?;
                let listener = &listener;
                running.push(async move {
                    let incoming = match listener.handshake(tcp, from).await {
                        Ok(incoming) => incoming,
                        Err(e @ ChannelError::Config { .. }) => return Some(Err(e.into())),
                        Err(e) => {
                            // A refused or broken handshake is no migration: nothing was received.
                            log::warn!("migration: {e}");
                            eprintln!("podsnap receive: {e}");
                            return None;
                        }
                    };
                    let peer = incoming.peer().to_owned();
                    log::info!("migration: {peer} connected (key {})", incoming.key_id);
                    let outcome = match incoming.accept().await {
                        Ok(channel) => receive_one(request, channel, progress).await,
                        Err(e) => Err(e.into()),
                    };
                    if let Err(e) = &outcome {
                        log::error!("migration from {peer}: {e}");
                    }
                    Some(outcome)
                });
            }
            Some(outcome) = running.next(), if !running.is_empty() => {
                let Some(outcome): Option<Result<Received>> = outcome else { continue };
                // This node's own configuration cannot serve anyone: over.
                if matches!(&outcome, Err(Error::Migration(ChannelError::Config { .. }))) {
                    return outcome.map(drop);
                }
                done(&outcome);
                if request.once {
                    return outcome.map(drop);
                }
            }
        }
    }
}

/// A checkpoint received whole, checked, in place in the root and sealed.
pub(super) struct Landed {
    pub(super) manifest: Manifest,
    pub(super) name: String,
    pub(super) dir: PathBuf,
    pub(super) files: usize,
    pub(super) bytes: u64,
}

/// Receives a checkpoint on `channel`: the manifest, checked by `check` (its reason to refuse
/// otherwise, answered `refuse`), then `accept` and every file it lists into a staging
/// directory, each checked as it is written; renamed into `root` as `name` (a new
/// `received-...` name when `None`) and sealed. Any other failure is answered `abort`. The
/// channel comes back with the checkpoint.
pub(super) async fn land(
    mut channel: Channel,
    root: &Path,
    name: Option<String>,
    check: impl FnOnce(&[u8]) -> std::result::Result<Manifest, String>,
    progress: &dyn Progress,
) -> Result<(Channel, Landed)> {
    let peer = channel.peer().to_owned();
    progress.step(&format!("receiving a pod from {peer}"));
    let raw = match channel.recv().await? {
        Frame::Manifest(raw) => raw,
        other => return Err(channel.unexpected(&other, "the checkpoint's manifest").into()),
    };
    let manifest = match check(&raw) {
        Ok(m) => m,
        Err(reason) => {
            let _ = channel
                .send_message(Message::Refuse {
                    reason: reason.clone(),
                })
                .await;
            channel.close().await;
            return Err(Error::Refused(format!("refused the pod from {peer}: {reason}")));
        }
    };
    let name = name.unwrap_or_else(|| received_name(root, &manifest));
    let landed = async {
        let staging = Staging::create(root, &name)?;
        crate::oci::write_new(&staging.dir.join(MANIFEST), &raw)?;
        channel.send_message(Message::Accept).await?;
        let (files, bytes) = receive_files(&mut channel, &staging.dir, &manifest, progress).await?;
        let staged = staging.dir.clone();
        let checked = tokio::task::spawn_blocking(move || Manifest::load_listed(&staged))
            .await
            .map_err(|e| Error::Refused(format!("checking the received checkpoint: {e}")))?;
        checked.map_err(Box::new)?;
        let dir = staging.keep_as(&root.join(&name))?;
        Ok::<_, Error>((dir, files, bytes))
    }
    .await;
    let (dir, files, bytes) = match landed {
        Ok(l) => l,
        Err(e) => {
            log::error!("migration: {e}");
            channel.abort(&e.to_string()).await;
            return Err(e);
        }
    };
    // Every file's digest was checked as it was written, as a pull does: sealed.
    let seals = Path::new(podsnap_checkpoint::trust::seal::SEAL_DIR);
    if let Err(e) = podsnap_checkpoint::trust::seal::record(seals, &dir, &manifest) {
        log::warn!("{e}");
    }
    Ok((
        channel,
        Landed {
            manifest,
            name,
            dir,
            files,
            bytes,
        },
    ))
}

/// One migration on an accepted channel.
async fn receive_one(
    request: &ReceiveRequest,
    channel: Channel,
    progress: &dyn Progress,
) -> Result<Received> {
    let peer = channel.peer().to_owned();
    let root = &request.restore.checkpoint_root;
    let (mut channel, landed) = land(
        channel,
        root,
        None,
        |raw| check_manifest(&request.restore, raw, None),
        progress,
    )
    .await?;
    let Landed {
        manifest,
        name,
        dir,
        files,
        bytes,
    } = landed;
    let remove_received = |why: &str| {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            log::warn!("removing the received checkpoint {} ({why}): {e}", dir.display());
        }
    };
    if manifest.after_dump == Some(podsnap_checkpoint::format::persistent::AfterDump::Migrating) {
        let live = receive_live(request, channel, &manifest, &name, &dir, progress).await;
        return live.map(|pod| Received {
            peer,
            dir: dir.clone(),
            files,
            bytes,
            pod,
        });
    }
    progress.step(&format!(
        "restoring {}/{} from {}",
        manifest.pod.namespace.as_deref().unwrap_or("default"),
        manifest.pod.name.as_deref().unwrap_or("-"),
        dir.display()
    ));
    let mut restore = request.restore.clone();
    restore.checkpoint_dir = dir.clone();
    let (pod, rollback) = match restore_undoable(&restore, progress).await {
        Ok(restored) => restored,
        Err(e) => {
            channel
                .abort(&format!("the restore on the target failed: {e}"))
                .await;
            remove_received("the restore failed");
            return Err(e);
        }
    };
    // Every container must run before the source is told.
    let undo = |reason: String| async {
        let cleanup = rollback.run(&restore).await;
        remove_received("the migration was undone");
        (reason, cleanup)
    };
    if let Err(e) = all_running(&restore, &pod).await {
        let (reason, cleanup) = undo(e.to_string()).await;
        channel.abort(&reason).await;
        return Err(Error::Refused(format!("{reason}\n{cleanup}")));
    }
    let restored = Message::Restored {
        pod: format!("{}/{}", pod.namespace, pod.name),
        id: pod.id.clone(),
        ip: pod.ip.clone(),
        containers: pod.containers.iter().map(|(n, _)| n.clone()).collect(),
    };
    progress.step("every container runs: asking the source to commit");
    let committed = async {
        channel.send_message(restored).await?;
        match channel.recv_message().await? {
            Message::Commit => {}
            other => return Err(channel.unexpected(&Frame::Message(other), "commit")),
        }
        channel.send_message(Message::Kept).await?;
        Ok(())
    }
    .await;
    if let Err(e) = committed {
        let (reason, cleanup) = undo(format!(
            "the source did not commit ({e}): the restored pod was removed, the source keeps its own"
        ))
        .await;
        channel.close().await;
        return Err(Error::Refused(format!("{reason}\n{cleanup}")));
    }
    // Kept: if this last message is lost, the source leaves its pod paused (never running
    // twice) and says so.
    if let Err(e) = channel.finish().await {
        log::warn!("migration from {peer}: after kept: {e}");
    }
    Ok(Received {
        peer,
        dir,
        files,
        bytes,
        pod,
    })
}

/// A live migration's target, once the checkpoint (all but the memory) is in place: the pod is
/// restored lazily, its memory carried from the source's CRIU to each container's lazy-pages
/// daemon, and kept once the source commits; then the memory keeps coming until every daemon
/// has every page (see `live.rs`).
async fn receive_live(
    request: &ReceiveRequest,
    channel: Channel,
    manifest: &Manifest,
    name: &str,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<RestoredPod> {
    let remove_received = |why: &str| {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            log::warn!("removing the received checkpoint {} ({why}): {e}", dir.display());
        }
    };
    if let Err(e) = super::live::check_pipe_max() {
        channel.abort(&e.to_string()).await;
        remove_received("refused");
        return Err(e);
    }
    // The streams go to the shims of the pod created below, and to no other.
    let (created, pod_created) = tokio::sync::watch::channel(None);
    let (sockets, locals) = match super::live::PageSockets::listen(name, manifest, &pod_created) {
        Ok(s) => s,
        Err(e) => {
            channel.abort(&e.to_string()).await;
            remove_received("no page streams");
            return Err(e);
        }
    };
    let pages = Pages::start(channel, locals, true)?;
    progress.step(&format!(
        "restoring {}/{} lazily from {} (its memory from the source)",
        manifest.pod.namespace.as_deref().unwrap_or("default"),
        manifest.pod.name.as_deref().unwrap_or("-"),
        dir.display()
    ));
    podsnap_checkpoint::failpoint::hold("migration-restore").await;
    let mut restore = request.restore.clone();
    restore.checkpoint_dir = dir.to_path_buf();
    restore.sandbox_created = Some(std::sync::Arc::new(created));
    let (pod, rollback) = match restore_undoable(&restore, progress).await {
        Ok(restored) => restored,
        Err(e) => {
            pages
                .abort(format!("the restore on the target failed: {e}"))
                .await;
            drop(sockets);
            remove_received("the restore failed");
            return Err(e);
        }
    };
    let undo = |reason: String| async {
        let cleanup = rollback.run(&restore).await;
        remove_received("the migration was undone");
        (reason, cleanup)
    };
    if let Err(e) = all_running(&restore, &pod).await {
        pages.abort(e.to_string()).await;
        let (reason, cleanup) = undo(e.to_string()).await;
        return Err(Error::Refused(format!("{reason}\n{cleanup}")));
    }
    let restored = Message::Restored {
        pod: format!("{}/{}", pod.namespace, pod.name),
        id: pod.id.clone(),
        ip: pod.ip.clone(),
        containers: pod.containers.iter().map(|(n, _)| n.clone()).collect(),
    };
    let label = format!("{}/{}", pod.namespace, pod.name);
    match switch_and_fill(pages, restored, manifest, &label, progress).await {
        Ok(()) => {
            drop(sockets);
            Ok(pod)
        }
        Err(Unfilled::NotCommitted(e)) => {
            let (reason, cleanup) = undo(format!(
                "the source did not commit ({e}): the restored pod was removed, the source keeps its own"
            ))
            .await;
            Err(Error::Refused(format!("{reason}\n{cleanup}")))
        }
        Err(Unfilled::Lost(e)) => Err(e),
    }
}

/// What went wrong once the target's pod ran.
pub(super) enum Unfilled {
    /// The source did not commit (why): nothing switched, the pod here must go (the page
    /// streams are closed already: its shims killed its containers).
    NotCommitted(String),
    /// After the switch: the source or a daemon was lost; the shims killed the containers
    /// whose memory was missing.
    Lost(Error),
}

/// Every container runs here: tells the source (`restored`), takes its `commit` and answers
/// `kept` (the switch); then carries the pages until every daemon has every page, and takes
/// the source's `released`. The page streams close when this returns, whatever the outcome.
pub(super) async fn switch_and_fill(
    mut pages: Pages,
    restored: Message,
    manifest: &Manifest,
    pod: &str,
    progress: &dyn Progress,
) -> std::result::Result<(), Unfilled> {
    progress.step("every container runs: asking the source to commit");
    let committed = async {
        pages.send(restored).await?;
        match pages.message().await? {
            Message::Commit => pages.send(Message::Kept).await,
            other => Err(ChannelError::Protocol {
                peer: "the source".into(),
                reason: format!("expected commit, got {other:?}"),
            }),
        }
    }
    .await;
    if let Err(e) = committed {
        drop(pages);
        return Err(Unfilled::NotCommitted(e.to_string()));
    }
    // Switched: the pod runs here, its memory still coming.
    progress.step("the pod runs here: receiving the rest of its memory");
    let states = match pages.until(|s| s.iter().all(|st| st.local_ended.is_some())).await {
        Ok(states) => states,
        Err(e) => {
            // Dropping the streams makes each shim kill its container before its daemon
            // sees the end.
            drop(pages);
            return Err(Unfilled::Lost(Error::Refused(format!(
                "the source was lost after the switch ({e}): the pod {pod}'s containers were \
                 killed rather than run with missing memory"
            ))));
        }
    };
    if let Some(i) = states.iter().position(|s| s.local_ended != Some(true)) {
        return Err(Unfilled::Lost(Error::Refused(format!(
            "the lazy-pages daemon of container {} ended before it had every page: the shim killed it",
            super::live::served_containers(manifest)
                .get(i)
                .cloned()
                .unwrap_or_default()
        ))));
    }
    match pages.message().await {
        Ok(Message::Released { killed }) => {
            log::info!("the source stopped its pod ({killed} processes)");
        }
        other => log::warn!("every page arrived, but the source did not say it let go: {other:?}"),
    }
    pages.finish().await;
    Ok(())
}

/// The manifest parsed and checked against the node's restore policy (the pod keeps its
/// namespace and name): the reason to refuse it otherwise.
pub(super) fn check_manifest(
    restore: &RestoreRequest,
    raw: &[u8],
    into_namespace: Option<&str>,
) -> std::result::Result<Manifest, String> {
    let manifest = Manifest::parse(raw).map_err(|e| format!("its manifest: {e}"))?;
    // Room for it in the checkpoint root, the node's reserve left: refused before any file
    // comes, rather than failed half-way with the disk full.
    let root = &restore.checkpoint_root;
    let needed: u64 = manifest.files.values().map(|f| f.size).sum();
    let reserve = restore.config.dump.reserve_bytes;
    let (fs, free) = podsnap_checkpoint::pod::dump::preflight::free_space(root).map_err(|e| e.to_string())?;
    if let Some(why) = no_room(needed, free, reserve) {
        return Err(format!("{why} ({} on {})", root.display(), fs.display()));
    }
    let config = &restore.config;
    let source = manifest.pod.namespace.as_deref();
    podsnap_checkpoint::trust::policy::check_namespace(
        &config.restore,
        source,
        into_namespace.or(source).unwrap_or_default(),
        &config.describe(),
    )
    .map_err(|v| podsnap_checkpoint::Error::refused("the received checkpoint", v).to_string())?;
    Ok(manifest)
}

/// Why `needed` bytes do not fit in `free` with `reserve` kept, if they do not.
fn no_room(needed: u64, free: u64, reserve: u64) -> Option<String> {
    (needed.saturating_add(reserve) > free).then(|| {
        format!(
            "the checkpoint holds {}; the checkpoint root has {} free and the node keeps {} free \
             there ([dump] reserve_bytes)",
            crate::summary::human_bytes(needed),
            crate::summary::human_bytes(free),
            crate::summary::human_bytes(reserve)
        )
    })
}

/// Every file the manifest lists, each once, in any order; returns (files, bytes).
async fn receive_files(
    channel: &mut Channel,
    staging: &Path,
    manifest: &Manifest,
    progress: &dyn Progress,
) -> Result<(usize, u64)> {
    let peer = channel.peer().to_owned();
    let refuse = |path: &str, reason: String| {
        Error::Migration(ChannelError::File {
            peer: peer.clone(),
            path: path.to_owned(),
            reason,
        })
    };
    let total: u64 = manifest.files.values().map(|f| f.size).sum();
    progress.step(&format!(
        "receiving {} files ({} bytes)",
        manifest.files.len(),
        total
    ));
    let mut seen = BTreeSet::new();
    let mut bytes = 0u64;
    while seen.len() < manifest.files.len() {
        let (path, size) = match channel.recv_message().await? {
            Message::File { path, size } => (path, size),
            other => return Err(channel.unexpected(&Frame::Message(other), "a file").into()),
        };
        if !seen.insert(path.clone()) {
            return Err(refuse(&path, "sent twice".into()));
        }
        let mut file = crate::oci::ListedFile::create(staging, manifest, &path, size)
            .map_err(|reason| refuse(&path, reason))?;
        while file.remaining() > 0 {
            match channel.recv().await? {
                Frame::Data(data) => file.write(&data).map_err(|reason| refuse(&path, reason))?,
                other => return Err(channel.unexpected(&other, "the file's data").into()),
            }
        }
        file.finish().map_err(|reason| refuse(&path, reason))?;
        bytes += size;
        if seen.len() == 1 {
            podsnap_checkpoint::failpoint::hold("migration-receiving").await;
        }
    }
    Ok((seen.len(), bytes))
}

/// Whether every restored container runs (CRI's state), else which does not.
async fn all_running(request: &RestoreRequest, pod: &RestoredPod) -> Result<()> {
    let clients = crate::cri::connect(&request.runtime_endpoint).await?;
    for (name, id) in &pod.containers {
        let status = clients
            .runtime
            .clone()
            .container_status(k8s_cri::v1::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .map_err(Error::cri(format!("ContainerStatus of {name}")))?
            .into_inner()
            .status;
        let state = status
            .map(|s| s.state())
            .unwrap_or(k8s_cri::v1::ContainerState::ContainerUnknown);
        if state != k8s_cri::v1::ContainerState::ContainerRunning {
            return Err(Error::Refused(format!(
                "container {name} ({id}) of the restored pod is {state:?}, not running"
            )));
        }
    }
    Ok(())
}

/// `received-<namespace>-<pod>-<UTC time>`, or with `-2`, `-3`... when taken.
fn received_name(root: &Path, manifest: &Manifest) -> String {
    let base = crate::dump::default_name(
        manifest.pod.namespace.as_deref().unwrap_or("default"),
        manifest.pod.name.as_deref().unwrap_or("pod"),
        time::OffsetDateTime::now_utc(),
    );
    let base = format!("received-{base}");
    let base = match podsnap_checkpoint::format::names::validate_name(&base) {
        Ok(()) => base,
        Err(_) => format!(
            "received-{}",
            crate::dump::utc_stamp(time::OffsetDateTime::now_utc())
        ),
    };
    let mut name = base.clone();
    let mut n = 2;
    while std::fs::symlink_metadata(root.join(&name)).is_ok() {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// Removes `.received-*.tmp-<pid>` directories of receivers that died (SIGKILL, a crash):
/// their migrations failed, and their sources resumed their pods.
fn remove_stale_staging(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(".received-")
            .and_then(|rest| rest.rsplit_once(".tmp-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => log::info!(
                "removed {}: left by a receiver (pid {pid}) that is gone",
                path.display()
            ),
            Err(e) => log::warn!("removing {}: {e}", path.display()),
        }
    }
}

/// A staging directory inside the root, removed on drop unless kept.
struct Staging {
    dir: PathBuf,
    kept: bool,
}

impl Staging {
    fn create(root: &Path, name: &str) -> Result<Staging> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(Error::io("create the checkpoint root", root))?;
        let dir = root.join(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io("create a staging directory", &dir))?;
        Ok(Staging { dir, kept: false })
    }

    fn keep_as(mut self, dest: &Path) -> Result<PathBuf> {
        std::fs::rename(&self.dir, dest)
            .map_err(Error::io("move the received checkpoint into place", dest))?;
        self.kept = true;
        Ok(dest.to_path_buf())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.kept {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                log::warn!("removing {}: {e}", self.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sha2::{Digest, Sha256};

    /// A manifest listing `files` (path, content), as a trusted but hostile peer would craft.
    fn crafted_manifest(files: &[(&str, &[u8])]) -> Vec<u8> {
        let listed: serde_json::Map<String, serde_json::Value> = files
            .iter()
            .map(|(path, data)| {
                let digest = hex::encode(Sha256::digest(data));
                (
                    (*path).to_owned(),
                    serde_json::json!({"size": data.len(), "digest": digest}),
                )
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "format": podsnap_checkpoint::format::manifest::FORMAT,
            "version": podsnap_checkpoint::format::manifest::VERSION,
            "digest_algorithm": "sha256",
            "created_unix": 0,
            "pod": {"sandbox_id": "s", "name": "web", "namespace": "default", "uid": null, "hostname": null},
            "host": {"criu_version": "4.2.1", "runc_version": "1.3.6", "kernel": "6.18", "arch": "x86_64"},
            "tcp_established": false,
            "containers": [], "volumes": [], "files": listed,
        }))
        .expect("json")
    }

    /// What a peer sends after its manifest (once accepted).
    enum Send {
        File(&'static str, u64),
        Data(&'static [u8]),
    }

    /// Lands what a listed peer sends (its manifest, then `sends`) into a fresh checkpoint
    /// root; returns the outcome, what the peer heard last, and what the root holds after.
    async fn land_crafted(manifest: Vec<u8>, sends: Vec<Send>) -> (Result<()>, String, Vec<String>) {
        let (mut peer, target) = crate::migrate::channel::tests::connected().await;
        let root = tempfile::tempdir().expect("tempdir");
        let sender = tokio::spawn(async move {
            peer.send(Frame::Manifest(Bytes::from(manifest)))
                .await
                .expect("manifest");
            let answer = peer.recv_message().await;
            if matches!(answer, Ok(Message::Accept)) {
                for send in sends {
                    let frame = match send {
                        Send::File(path, size) => Frame::Message(Message::File {
                            path: path.to_owned(),
                            size,
                        }),
                        Send::Data(data) => Frame::Data(Bytes::from_static(data)),
                    };
                    if peer.send(frame).await.is_err() {
                        break;
                    }
                }
                return format!("{:?}", peer.recv_message().await);
            }
            format!("{answer:?}")
        });
        let check = |raw: &[u8]| Manifest::parse(raw).map_err(|e| format!("its manifest: {e}"));
        // The channel dropped as the target returns: the peer hears the end either way.
        let landed = land(target, root.path(), None, check, &crate::progress::Quiet)
            .await
            .map(|_| ());
        let heard = sender.await.expect("the peer's task");
        let left: Vec<String> = std::fs::read_dir(root.path())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        (landed, heard, left)
    }

    #[tokio::test]
    async fn a_listed_peer_sending_crafted_files_is_refused_and_nothing_is_left() {
        let listed: &[(&str, &[u8])] = &[("containers/web/a", b"abc")];
        // The honest transfer lands: the harness can tell a refusal from success.
        let (ok, _, left) = land_crafted(
            crafted_manifest(listed),
            vec![Send::File("containers/web/a", 3), Send::Data(b"abc")],
        )
        .await;
        ok.expect("the listed file, its bytes");
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].starts_with("received-"), "{left:?}");

        // One listed file: (what, the path announced, its size announced, the bytes sent, what
        // the refusal names).
        let one_file: [(&str, &'static str, u64, &'static [u8], &str); 5] = [
            (
                "a path out of the checkpoint",
                "../../etc/cron.d/x",
                3,
                b"abc",
                "../../etc/cron.d/x",
            ),
            (
                "a file the manifest does not list",
                "containers/web/b",
                3,
                b"abc",
                "containers/web/b",
            ),
            (
                "another size than listed",
                "containers/web/a",
                4,
                b"abcd",
                "containers/web/a",
            ),
            (
                "other bytes than the digest",
                "containers/web/a",
                3,
                b"abd",
                "digest",
            ),
            (
                "more bytes than announced in a frame",
                "containers/web/a",
                3,
                b"abcdef",
                "containers/web/a",
            ),
        ];
        let mut cases: Vec<(&str, Vec<u8>, Vec<Send>, &str)> = one_file
            .into_iter()
            .map(|(what, path, size, data, says)| {
                let sends = vec![Send::File(path, size), Send::Data(data)];
                (what, crafted_manifest(listed), sends, says)
            })
            .collect();
        let unparsable = b"{\"format\":".to_vec();
        cases.push((
            "a manifest that does not parse",
            unparsable,
            vec![],
            "its manifest",
        ));
        let file_a = || [Send::File("containers/web/a", 3), Send::Data(b"abc")];
        let two_listed = crafted_manifest(&[("containers/web/a", b"abc"), ("containers/web/b", b"x")]);
        let twice = file_a().into_iter().chain(file_a()).collect();
        cases.push(("the same file twice", two_listed, twice, "sent twice"));
        let data_first = vec![Send::Data(b"abc")];
        let protocol = "broke the migration protocol";
        cases.push((
            "data where a file was due",
            crafted_manifest(listed),
            data_first,
            protocol,
        ));
        for (what, manifest, sends, says) in cases {
            let (landed, heard, left) = land_crafted(manifest, sends).await;
            let err = landed.expect_err(what).to_string();
            assert!(err.contains(says), "{what}: {err}");
            assert!(
                heard.contains("Refuse") || heard.contains("Abort"),
                "{what}: the peer is told: {heard}"
            );
            assert!(left.is_empty(), "{what}: the root holds {left:?}");
        }
    }

    #[test]
    fn a_checkpoint_that_does_not_fit_with_the_reserve_is_refused_with_the_numbers() {
        assert_eq!(no_room(100, 1000, 100), None);
        assert_eq!(no_room(900, 1000, 100), None, "exactly fits");
        let why = no_room(901, 1000, 100).expect("one byte too many");
        assert!(
            why.contains("holds 901 B") && why.contains("1000 B free"),
            "{why}"
        );
        assert!(no_room(u64::MAX, 1000, 100).is_some(), "no overflow");
    }
}
