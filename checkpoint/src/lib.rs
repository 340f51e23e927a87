//! podsnap-checkpoint: the pod checkpoint. Layers, lowest first; a module names only lower ones:
//!   error, failpoint      errors (one enum) and test hold points
//!   fs/                   private files and dirs, synced writes, capped reads, /proc, confined apply
//!   format/ config/       the checkpoint on disk; the node configuration and pod annotations
//!   criu/ archive/        one container's CRIU work; tar archives of rootfs changes and volumes
//!   trust/                restore policy, node identity, seals
//!   node/                 the checkpoint root: store, leases, import, retention
//!   pod/                  a pod's spec and shared state; pod/dump, phase by phase
//! Follow a dump: pod/dump/mod.rs, then the phases it names in order.
//! No protobuf and no ttrpc here: the shim adapts. tests/tests/layering.rs checks the layers.

pub mod archive;
pub mod config;
pub mod criu;
pub mod error;
pub mod failpoint;
pub mod format;
pub mod fs;
pub mod node;
pub mod pod;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod trust;

/// Unit tests count what each thread allocates (the parser properties bound it).
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: testkit::Counting = testkit::Counting;

// The crate root keeps only what every caller names: the error and a container's role and
// state in a checkpoint. Everything else is named by its layer (`format::manifest::Manifest`).
pub use error::{Error, Result};
pub use format::record::{ContainerState, Role};
