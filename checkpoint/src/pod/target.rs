//! A container of a pod as the shim knows it: what a dump is given for each.

use std::path::PathBuf;

use podsnap_runtime::cgroup::CgroupPaths;
use podsnap_runtime::runc::Runc;

use crate::format::manifest::ContainerEntry;
use crate::format::record::{ContainerState, Role};

/// A container of the pod, as the shim knows it.
#[derive(Debug, Clone)]
pub struct Target {
    pub entry: ContainerEntry,
    pub runc: Runc,
    pub bundle: PathBuf,
    pub cgroups: Option<CgroupPaths>,
    /// The host pid of its init process, while it runs.
    pub pid: Option<i32>,
    /// The container's OCI spec when its bundle is gone (a completed container whose task was
    /// deleted); read from the bundle otherwise.
    pub spec: Option<Vec<u8>>,
    /// (host pid, start time) of its processes restored as adopted by the pod's pause process
    /// (a shim restoring them became their parent): dumped as adopted again.
    pub adopted: Vec<(i32, u64)>,
    /// When the runtime created it (its `config.dump`'s `createdTime`), when known.
    pub created: Option<std::time::SystemTime>,
}

impl Target {
    /// Whether its processes are dumped: a container (not the sandbox) running or paused.
    pub fn is_dumped(&self) -> bool {
        self.entry.role == Role::Container
            && matches!(self.entry.state, ContainerState::Running | ContainerState::Paused)
    }

    /// Whether the dump freezes it: running (one its owner paused stays as it is).
    pub fn is_frozen_by_dump(&self) -> bool {
        self.is_dumped() && self.entry.state == ContainerState::Running
    }
}

/// The containers whose processes are dumped (running or paused).
pub fn running(targets: &[Target]) -> Vec<&Target> {
    targets.iter().filter(|t| t.is_dumped()).collect()
}
