//! The pod a shim serves: its containers and what happens to them, without protobuf or ttrpc
//! (`task.rs` maps containerd's calls onto [`Pod`], `convert.rs` the messages).
//!
//! - `gate.rs`: the lifecycle gate (a pod checkpoint runs alone);
//! - `exit.rs`: exits reported in containerd's order (TaskExit after the event announcing the
//!   process);
//! - `create.rs`: Create, fresh, exited or restored (the decision is `restore::Restores::plan`'s);
//! - `control.rs`: Start, Delete, Kill, Exec, Pause/Resume, Update, Pids, Stats, ...;
//! - `checkpoint.rs`: a container's checkpoint, and the pod's (asked on its sandbox), whose dump
//!   runs in `dump.rs`.
//!
//! Containers are made through a [`ContainerFactory`] (runc in the shim, a fake in unit tests).

pub mod checkpoint;
pub mod control;
pub mod create;
pub mod dump;
pub mod exit;
pub mod gate;
pub mod request;
pub mod serve;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use containerd_shim::asynchronous::ExitSignal;
use podsnap_checkpoint::pod::dump::Target;

use crate::container::factory::ContainerFactory;
use crate::container::Container;
use crate::error::{Error, Result};
use crate::exits::ExitRouter;
use crate::process::lock;
use crate::restore::Restores;
use crate::task_event::{EventSink, TaskEvent};

use self::gate::LifecycleGate;

/// One pod's containers and their lifecycle.
pub struct Pod {
    namespace: String,
    events: Arc<dyn EventSink>,
    exit: Arc<ExitSignal>,
    factory: Arc<dyn ContainerFactory>,
    containers: Mutex<BTreeMap<String, Arc<Container>>>,
    exits: ExitRouter,
    created: AtomicU64,
    started: AtomicU64,
    /// A pod dump runs alone; lifecycle calls enter side by side.
    pub gate: LifecycleGate,
    restores: Restores,
    /// Containers of the pod whose tasks were deleted after they exited (completed init
    /// containers): a pod checkpoint records them. By name; the newest wins.
    departed: Mutex<BTreeMap<String, Target>>,
    /// containerd asked the shim to exit while containers were left: it exits with the last.
    shutdown_asked: AtomicBool,
    /// Containers being restored (id -> name in the pod): marked restored once they are.
    restoring: Mutex<BTreeMap<String, String>>,
    /// Containers that were paused at their checkpoint: paused again once restored.
    pause_after_restore: Mutex<HashSet<String>>,
}

impl Pod {
    pub fn new(
        namespace: String,
        events: Arc<dyn EventSink>,
        exit: Arc<ExitSignal>,
        factory: Arc<dyn ContainerFactory>,
    ) -> Self {
        Self::with_gate(namespace, events, exit, factory, LifecycleGate::default())
    }

    pub fn with_gate(
        namespace: String,
        events: Arc<dyn EventSink>,
        exit: Arc<ExitSignal>,
        factory: Arc<dyn ContainerFactory>,
        gate: LifecycleGate,
    ) -> Self {
        Self {
            namespace,
            events,
            exit,
            factory,
            containers: Mutex::new(BTreeMap::new()),
            exits: ExitRouter::default(),
            created: AtomicU64::new(0),
            started: AtomicU64::new(0),
            gate,
            restores: Restores::default(),
            departed: Mutex::new(BTreeMap::new()),
            shutdown_asked: AtomicBool::new(false),
            restoring: Mutex::new(BTreeMap::new()),
            pause_after_restore: Mutex::new(HashSet::new()),
        }
    }

    /// The shim's containerd namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Where child exits are routed to the pod's processes.
    pub fn exits(&self) -> &ExitRouter {
        &self.exits
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    pub fn container_count(&self) -> usize {
        lock(&self.containers).len()
    }

    async fn publish(&self, event: TaskEvent) {
        self.events.publish(event).await;
    }

    /// containerd asks the shim to go: now when no container is left (or `now`), else with the
    /// last container's Delete.
    pub fn shutdown(&self, id: &str, now: bool) {
        let left = self.container_count();
        log::debug!("shutdown asked for {id} (now: {now}), {left} containers left");
        if left == 0 || now {
            log::info!("no containers left: shim exits");
            self.exit.signal();
        } else {
            // containerd asks once, when the sandbox's task is deleted; the pod's other
            // containers may be deleted after it.
            self.shutdown_asked
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
pub mod fake {
    //! A pod over a fake container factory, for unit tests: containers are made without runc
    //! (their init "created", pid 0) in bundles under a temporary directory.

    use std::path::{Path, PathBuf};

    use async_trait::async_trait;

    use super::*;
    use crate::container::{CreateParams, RestoreSource};
    use crate::task_event::fake::Recorded;
    use crate::task_event::Mount;

    #[derive(Default)]
    pub struct FakeFactory {
        /// What happened, in order: "mount", "unmount", "create", "exited", "restore".
        pub calls: Mutex<Vec<String>>,
        /// Create fails with this message.
        pub fail_create: Mutex<Option<String>>,
        /// The created init exits at once with this code (seen before it is announced).
        pub early_exit: Mutex<Option<i32>>,
    }

    impl FakeFactory {
        pub fn calls(&self) -> Vec<String> {
            lock(&self.calls).clone()
        }
        fn note(&self, what: &str) {
            lock(&self.calls).push(what.to_owned());
        }
    }

    #[async_trait]
    impl ContainerFactory for FakeFactory {
        async fn mount_rootfs(&self, _mounts: &[Mount], _rootfs: &Path) -> Result<()> {
            self.note("mount");
            Ok(())
        }
        fn unmount_rootfs(&self, _rootfs: &Path) {
            self.note("unmount");
        }
        async fn create(&self, p: CreateParams, _exits: &ExitRouter) -> Result<Arc<Container>> {
            self.note("create");
            if let Some(why) = lock(&self.fail_create).clone() {
                return Err(Error::Internal(why));
            }
            // No runc container behind it (nothing for a unit test's Delete to run runc on).
            let c = Container::exited(p, 0)?;
            if let Some(code) = *lock(&self.early_exit) {
                c.init.set_early_exit(code);
            }
            Ok(c)
        }
        fn exited(&self, p: CreateParams, code: u32) -> Result<Arc<Container>> {
            self.note("exited");
            Container::exited(p, code)
        }
        fn prepare_restore(&self, p: CreateParams, src: RestoreSource) -> Result<Arc<Container>> {
            self.note("restore");
            Container::prepare_restore(p, src)
        }
    }

    pub struct FakePod {
        pub pod: Arc<Pod>,
        pub events: Arc<Recorded>,
        pub factory: Arc<FakeFactory>,
        pub exit: Arc<ExitSignal>,
        pub dir: tempfile::TempDir,
    }

    impl FakePod {
        pub fn new() -> Self {
            let events = Arc::new(Recorded::default());
            let factory = Arc::new(FakeFactory::default());
            let exit = Arc::new(ExitSignal::default());
            let pod = Arc::new(Pod::new(
                "test".into(),
                events.clone(),
                exit.clone(),
                factory.clone(),
            ));
            Self {
                pod,
                events,
                factory,
                exit,
                dir: tempfile::tempdir().expect("tempdir"),
            }
        }

        /// Whether the pod told the shim to exit.
        pub fn exit_signalled(&self) -> bool {
            futures::FutureExt::now_or_never(self.exit.wait()).is_some()
        }

        /// A bundle named `id` with a spec carrying `annotations`.
        pub fn bundle(&self, id: &str, annotations: serde_json::Value) -> PathBuf {
            let b = self.dir.path().join(id);
            std::fs::create_dir_all(&b).expect("bundle");
            let spec = serde_json::json!({
                "ociVersion": "1.0.2",
                "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
                "root": {"path": "rootfs"},
                "annotations": annotations
            });
            std::fs::write(b.join("config.json"), spec.to_string()).expect("spec");
            b
        }
    }
}
