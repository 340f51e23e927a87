//! The task calls in our own terms (made from containerd's protobuf requests by `convert.rs`).
//! Parts that can be refused are judged by the pod where it always did (a Checkpoint's options
//! after the container is found, a Create's runtime options after the id checks).

use std::path::PathBuf;

use containerd_shim::asynchronous::io::Stdio;

use crate::error::Result;
use crate::options::{RuncChoice, RuncFlags};
use crate::task_event::Mount;

/// Reads a Create's runtime options.
pub type RuncOptions = Box<dyn FnOnce() -> Result<(RuncChoice, RuncFlags)> + Send>;

/// Create a container's task.
pub struct CreateTask {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<Mount>,
    pub stdio: Stdio,
    /// A checkpoint directory to restore from (containerd's own path); empty for none.
    pub checkpoint: String,
    /// Which runc and its flags, read from the Create's options when called (after the id
    /// checks, as before: reading them may log or read a runtime options file).
    pub runc: RuncOptions,
}

/// Signal a container's init process (and with `all` every process of it) or an exec.
pub struct KillTask {
    pub id: String,
    pub exec_id: String,
    pub signal: u32,
    pub all: bool,
}

/// Add an exec process to a container.
pub struct ExecTask {
    pub id: String,
    pub exec_id: String,
    pub stdio: Stdio,
    /// The OCI process spec (JSON); `None` when the request carried none.
    pub spec: Option<Vec<u8>>,
}

/// Change a container's resources.
pub struct UpdateTask {
    pub id: String,
    /// (type URL, OCI LinuxResources JSON); `None` when the request carried none.
    pub resources: Option<(String, Vec<u8>)>,
}

/// Checkpoint a container, or the whole pod when asked on its sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointTask {
    /// Where the images go (runc's `image_path` over the request's `path`); never empty.
    pub image_dir: String,
    pub work_dir: Option<PathBuf>,
    /// Stop the container (the pod) after the checkpoint.
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub cgroups_mode: String,
}
