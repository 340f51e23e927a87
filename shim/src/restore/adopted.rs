//! The processes of a container that the pod's pause process had adopted (their parent had
//! died), restored beside the container once it is back.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use podsnap_checkpoint::criu::container as ckpt;
use podsnap_runtime::cgroup::CgroupPaths;
use podsnap_runtime::runc::ProcessStdio;

use super::criu::Restored;
use crate::container::io::{read_pid, write_private};
use crate::container::Container;
use crate::error::{Error, Result};
use crate::process::lock;

/// Restores the container's adopted processes; on failure nothing half-restored stays: the
/// container goes with what was restored of it.
pub async fn restore(c: &Container, restored: Restored) -> Result<Restored> {
    if let Err(e) = restore_adopted(
        c,
        &restored.adopted,
        &restored.work_dir,
        restored.tcp_close,
        restored.cgroups.as_ref(),
        &restored.output,
    )
    .await
    {
        let _ = c.runc.delete(&c.id, true).await;
        c.init.io.abort().await;
        return Err(e);
    }
    Ok(restored)
}

/// Restores the processes of this container that the pod's pause process had adopted
/// (`adopted`: PID in the pod and CRIU images), each with its descendants, once the
/// container itself is back. runc restores a container's init only, so each comes back as
/// a container of its own for the length of its restore: this container's spec (its root,
/// mounts, the pod's namespaces; no terminal, no hooks) with a cgroup of its own, so a
/// failed restore removes nothing of this container's. CRIU leaves the restored processes
/// stopped; each moves into this container's cgroups (`into`), then they go on, and that
/// container's runc state goes (not `runc delete`, which would kill them). A failure after
/// CRIU's kills what it restored. Their output goes where the container's does (`output`:
/// copies of its stdout and stderr).
async fn restore_adopted(
    c: &Container,
    adopted: &[(u32, PathBuf)],
    work_dir: &Path,
    tcp_close: bool,
    into: Option<&CgroupPaths>,
    output: &(Option<OwnedFd>, Option<OwnedFd>),
) -> Result<()> {
    for (pid, images) in adopted {
        let id = format!("{}-adopted-{pid}", c.id);
        let dir = c.bundle.path().join(format!("adopted-{pid}"));
        let _cleanup =
            podsnap_checkpoint::fs::remove::RemoveOnDrop(vec![c.runc.root().join(&id), dir.clone()]);
        podsnap_checkpoint::fs::private::create_private_dir(&dir)?;
        let raw = tokio::fs::read(c.bundle.config_path())
            .await
            .map_err(|e| Error::Internal(format!("read {}: {e}", c.bundle.config_path().display())))?;
        let mut spec: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| Error::Internal(format!("parse the spec: {e}")))?;
        let root = spec
            .pointer("/root/path")
            .and_then(|p| p.as_str())
            .unwrap_or("rootfs");
        spec["root"]["path"] = c.bundle.path().join(root).display().to_string().into();
        if let Some(cg) = spec.pointer_mut("/linux/cgroupsPath") {
            let own = format!("{}-adopted-{pid}", cg.as_str().unwrap_or_default());
            *cg = own.into();
        }
        if let Some(terminal) = spec.pointer_mut("/process/terminal") {
            *terminal = false.into(); // its descriptors come from its images
        }
        if let Some(spec) = spec.as_object_mut() {
            spec.remove("hooks"); // the container's ran when it was created
        }
        let conf = dir.join(ckpt::CRIU_CONFIG_FILE);
        let text = format!("leave-stopped\n{}", if tcp_close { "tcp-close\n" } else { "" });
        write_private(&conf, text.as_bytes()).await?;
        if let Some(a) = spec.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            a.insert(
                ckpt::CRIU_CONFIG_ANNOTATION.into(),
                conf.display().to_string().into(),
            );
        }
        let out = serde_json::to_vec(&spec).map_err(|e| Error::Internal(e.to_string()))?;
        write_private(&dir.join("config.json"), &out).await?;
        let mut options = ckpt::inspect(images)?;
        options.tcp_established = true;
        // Dumped as a shell job (its session's leader was gone); its images now lead a
        // session of their own, which a restore into the pod's PID namespace can make.
        options.shell_job = false;
        let r = ckpt::Restore {
            id: id.clone(),
            bundle: dir.clone(),
            image_dir: images.clone(),
            work_dir: work_dir.join(format!("adopted-{pid}")),
            options,
            pid_file: dir.join("pid"),
            console_socket: None,
            no_pivot: c.flags.no_pivot,
            log: dir.join("log.json"),
            lazy_pages: false,
            inherited: Vec::new(),
            netns: None,
        };
        let stdio = ProcessStdio {
            stdin: None,
            stdout: output.0.as_ref().and_then(|f| f.try_clone().ok()),
            stderr: output.1.as_ref().and_then(|f| f.try_clone().ok()),
        };
        ckpt::restore(&c.runc, &r, stdio).await?;
        let stopped = match read_pid(&r.pid_file).await {
            Ok(root) => podsnap_runtime::cgroup::process_tree(root),
            Err(e) => {
                // Restored, but which processes is unknown: what runc made goes whole.
                let _ = c.runc.delete(&id, true).await;
                return Err(e);
            }
        };
        // Where CRIU put them: runc's cgroup for it, or (v2) the path they were dumped from.
        let landed = stopped.first().and_then(|p| CgroupPaths::of_pid(*p).ok());
        let went_on = (|| {
            let moved = match into {
                Some(into) => into.add_processes(&stopped).map_err(|e| {
                    Error::Internal(format!("move adopted pid {pid} into its container's cgroup: {e}"))
                })?,
                None => 0,
            };
            for p in &stopped {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::SIGCONT);
            }
            Ok::<usize, Error>(moved)
        })();
        let moved = match went_on {
            Ok(moved) => moved,
            Err(e) => {
                for p in &stopped {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::SIGKILL);
                }
                let _ = c.runc.delete(&id, true).await;
                return Err(e);
            }
        };
        // The cgroups they left and the one runc made for it, empty now (rmdir removes
        // nothing that is not; the container's own are kept).
        let keep: Vec<&Path> = into.map(|c| c.dirs()).unwrap_or_default();
        for d in landed.iter().flat_map(|c| c.dirs()).filter(|d| !keep.contains(d)) {
            let _ = std::fs::remove_dir(d);
        }
        if let Some(own) = spec
            .pointer("/linux/cgroupsPath")
            .and_then(|p| p.as_str())
            .and_then(|p| CgroupPaths::of_container(p, c.runc.systemd_cgroup(), None).ok())
        {
            for d in own.dirs() {
                let _ = std::fs::remove_dir(d);
            }
        }
        let root = stopped.first().copied().unwrap_or_default();
        lock(&c.adopted).extend(
            stopped
                .first()
                .and_then(|p| Some((*p, podsnap_checkpoint::fs::proc::start_time(*p as u32)?))),
        );
        log::info!(
            "container {}: pid {pid} (adopted by the pod's pause process) restored as pid \
             {root}, {} processes, {moved} moved into the container's cgroup",
            c.id,
            stopped.len()
        );
    }
    Ok(())
}
