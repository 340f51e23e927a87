//! Create: a container's task comes to be, fresh, answered as exited (a completed container of
//! a restored pod) or prepared to be restored at its Start. What to do is decided before
//! anything exists ([`Restores::plan`](crate::restore::Restores::plan)); a failed create leaves
//! nothing registered or mounted.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use podsnap_runtime::bundle::{Bundle, PodIdentity};

use super::exit::Announcing;
use super::request::CreateTask;
use super::Pod;
use crate::container::CreateParams;
use crate::convert::task_io;
use crate::error::{Error, Result};
use crate::oom;
use crate::options::validate_id;
use crate::process::lock;
use crate::restore::{NewContainer, Plan};
use crate::task_event::{Mount, TaskEvent};

impl Pod {
    /// Creates a container's task; returns its init's pid (0 before a restore or for a
    /// container that will not run).
    pub async fn create(self: &Arc<Self>, req: CreateTask) -> Result<i32> {
        let id = req.id.clone();
        validate_id(&id)?;
        if lock(&self.containers).contains_key(&id) {
            return Err(Error::AlreadyExists(format!("container {id}")));
        }
        let (choice, flags) = (req.runc)()?;
        let bundle = req.bundle;
        let spec = Bundle::new(&bundle)
            .spec()
            .map_err(Error::runtime(format!("create container {id}")))?;
        let identity = PodIdentity::from_spec(&spec);
        let layers = rootfs_layers(&req.rootfs);
        // Decide before anything exists: a bad or forbidden checkpoint is refused here.
        let plan = if req.checkpoint.is_empty() {
            self.restores
                .plan(&NewContainer {
                    spec: &spec,
                    identity: &identity,
                    layers: &layers,
                })
                .await?
        } else {
            Plan::from_images(req.checkpoint.clone().into())?
        };
        // From the checkpoint (by name, kubelet path): once restored (at Start) or answered as
        // exited (now), the next Create of that name is a restart.
        let (restored_name, restoring_name) = match &plan {
            Plan::Restore(p) => (None, p.name.clone()),
            Plan::Exited(_) => (identity.name.clone(), None),
            Plan::Fresh => (None, None),
        };
        // Before runc runs: `delete` after a shim died must find the container where it is.
        choice.record(&bundle).await?;
        let rootfs = bundle.join("rootfs");
        let mounted = !req.rootfs.is_empty();
        if mounted {
            self.factory.mount_rootfs(&req.rootfs, &rootfs).await?;
        }
        let params = CreateParams {
            id: id.clone(),
            bundle: bundle.clone(),
            stdio: req.stdio.clone(),
            runc: choice.runc(),
            flags,
            rootfs_mounted: mounted,
            created_order: self.created.fetch_add(1, Ordering::SeqCst) + 1,
            rootfs_layers: layers,
        };
        let created = match plan {
            Plan::Fresh => self.factory.create(params, &self.exits).await,
            Plan::Exited(code) => {
                log::info!(
                    "container {id}: completed in its checkpoint (exit {code}); it will not run again"
                );
                self.factory.exited(params, code)
            }
            Plan::Restore(plan) => match self.restores.prepare(*plan, &rootfs).await {
                Ok(prepared) => {
                    if prepared.paused {
                        lock(&self.pause_after_restore).insert(id.clone());
                    }
                    log::info!(
                        "container {id}: will be restored from {}",
                        prepared.source.image_dir.display()
                    );
                    self.factory.prepare_restore(params, prepared.source)
                }
                Err(e) => Err(e),
            },
        };
        let container = match created {
            Ok(c) => c,
            Err(e) => {
                if mounted {
                    self.factory.unmount_rootfs(&rootfs);
                }
                log::error!("container {id}: create failed: {e}");
                return Err(e);
            }
        };
        let pid = container.init.state().pid;
        log::info!(
            "container {id}: created, pid {pid}, pod {:?} ({})",
            container.identity.sandbox_id,
            if container.identity.is_sandbox {
                "sandbox"
            } else {
                "container"
            }
        );
        lock(&self.containers).insert(id.clone(), container.clone());
        // The init's exit (it can die before it is started) follows TaskCreate.
        let announcing = Announcing::hold(self, &container.init);
        if let Some(name) = restored_name {
            self.restores.mark_restored(&name);
        }
        if let Some(name) = restoring_name {
            lock(&self.restoring).insert(id.clone(), name);
        }
        if !container.restore_pending() && container.exited_plan().is_none() {
            oom::watch(&container, self.events.clone());
        }
        self.publish(TaskEvent::Create {
            container_id: id,
            bundle: bundle.display().to_string(),
            rootfs: req.rootfs,
            io: task_io(&req.stdio),
            checkpoint: req.checkpoint,
            pid: pid as u32,
        })
        .await;
        announcing.release().await;
        if let Some(code) = container.init.take_early_exit() {
            self.process_exited(&container.init, code).await;
        }
        Ok(pid)
    }
}

/// The overlay lower directories (the image's layers, top first) of a Create's rootfs mounts.
pub fn rootfs_layers(mounts: &[Mount]) -> Vec<String> {
    mounts
        .iter()
        .filter(|m| m.kind == "overlay")
        .flat_map(|m| m.options.iter())
        .filter_map(|o| o.strip_prefix("lowerdir="))
        .flat_map(|v| v.split(':'))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use containerd_shim::asynchronous::io::Stdio;

    use super::*;
    use crate::options::RuncChoice;
    use crate::pod::fake::FakePod;

    fn request(id: &str, bundle: PathBuf, rootfs: Vec<Mount>) -> CreateTask {
        CreateTask {
            id: id.into(),
            bundle,
            rootfs,
            stdio: Stdio::default(),
            checkpoint: String::new(),
            runc: Box::new(|| Ok((RuncChoice::default_for("test"), Default::default()))),
        }
    }

    fn overlay() -> Vec<Mount> {
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec!["lowerdir=/l/2:/l/1".into(), "upperdir=/u".into()],
            ..Default::default()
        }]
    }

    #[tokio::test]
    async fn a_bad_or_duplicate_id_is_refused_before_anything_is_made() {
        let f = FakePod::new();
        let b = f.bundle("c1", serde_json::json!({}));
        let e = f
            .pod
            .create(request("../x", b.clone(), overlay()))
            .await
            .expect_err("bad id");
        assert!(e.to_string().contains("\"../x\" is not a valid id"), "{e}");
        f.pod
            .create(request("c1", b.clone(), overlay()))
            .await
            .expect("created");
        assert_eq!(f.factory.calls(), ["mount", "create"]);
        let e = f
            .pod
            .create(request("c1", b, overlay()))
            .await
            .expect_err("duplicate");
        assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
        assert_eq!(
            f.factory.calls(),
            ["mount", "create"],
            "nothing made for the refusals"
        );
        assert_eq!(f.pod.container_count(), 1);
    }

    #[tokio::test]
    async fn the_runtime_options_are_read_only_after_the_id_checks() {
        let f = FakePod::new();
        let b = f.bundle("c1", serde_json::json!({}));
        let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut req = request("../x", b, Vec::new());
        let seen = read.clone();
        req.runc = Box::new(move || {
            seen.store(true, Ordering::SeqCst);
            Err(Error::InvalidArgument("bad options".into()))
        });
        let e = f.pod.create(req).await.expect_err("bad id").to_string();
        assert!(e.contains("is not a valid id"), "{e}");
        assert!(!read.load(Ordering::SeqCst), "options read for a refused id");
    }

    #[tokio::test]
    async fn a_failed_create_unmounts_the_rootfs_and_registers_nothing() {
        let f = FakePod::new();
        *lock(&f.factory.fail_create) = Some("runc create failed".into());
        let b = f.bundle("c1", serde_json::json!({}));
        let e = f
            .pod
            .create(request("c1", b, overlay()))
            .await
            .expect_err("failed");
        assert!(e.to_string().contains("runc create failed"), "{e}");
        assert_eq!(f.factory.calls(), ["mount", "create", "unmount"]);
        assert_eq!(f.pod.container_count(), 0);
        assert!(f.events.kinds().is_empty(), "{:?}", f.events.kinds());
    }

    #[tokio::test]
    async fn an_init_that_exits_during_create_is_reported_after_task_create() {
        let f = FakePod::new();
        *lock(&f.factory.early_exit) = Some(1);
        let b = f.bundle("c1", serde_json::json!({}));
        f.pod.create(request("c1", b, Vec::new())).await.expect("created");
        assert_eq!(f.events.kinds(), ["create", "exit"]);
        assert_eq!(f.factory.calls(), ["create"], "no rootfs mounts: nothing mounted");
    }

    #[tokio::test]
    async fn a_pod_without_a_restore_annotation_is_created_fresh() {
        let f = FakePod::new();
        // Other annotations (kubelet's) do not make a restore.
        let b = f.bundle(
            "c1",
            serde_json::json!({"io.kubernetes.cri.container-type": "container", "io.kubernetes.container.restartCount": "0"}),
        );
        f.pod.create(request("c1", b, Vec::new())).await.expect("created");
        assert_eq!(f.factory.calls(), ["create"]);
        assert!(!f.pod.container("c1").expect("registered").restore_pending());
    }

    #[tokio::test]
    async fn a_restore_annotation_that_is_not_allowed_is_refused_before_anything_is_made() {
        let f = FakePod::new();
        let b = f.bundle(
            "c1",
            serde_json::json!({
                podsnap_checkpoint::config::RESTORE_ANNOTATION: "web",
                podsnap_checkpoint::config::LAZY_ANNOTATION: "maybe",
            }),
        );
        let e = f
            .pod
            .create(request("c1", b, overlay()))
            .await
            .expect_err("refused");
        assert!(
            e.to_string().contains("podsnap.io/restore-lazy: \"maybe\""),
            "{e}"
        );
        assert!(f.factory.calls().is_empty(), "{:?}", f.factory.calls());
        assert!(f.events.kinds().is_empty());
    }

    #[test]
    fn the_image_layers_are_the_overlay_lower_directories_top_first() {
        let mut mounts = overlay();
        mounts.push(Mount {
            kind: "bind".into(),
            options: vec!["lowerdir=/not/a/layer".into()],
            ..Default::default()
        });
        assert_eq!(rootfs_layers(&mounts), ["/l/2", "/l/1"]);
        assert!(rootfs_layers(&[]).is_empty());
    }
}
