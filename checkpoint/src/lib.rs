//! podsnap-checkpoint: the pod checkpoint. Its on-disk format, the pod plan (which containers,
//! in which order, in which role), and dump/restore orchestration on top of `podsnap-runtime`.
//!
//! No protobuf and no ttrpc here: the shim adapts.

pub mod config;
pub mod confined;
pub mod container;
pub mod criu_hold;
pub mod criu_image;
pub mod dump;
pub mod error;
pub mod failpoint;
pub mod host;
pub mod import;
pub mod journal;
pub mod kdat;
pub mod lease;
pub mod links;
pub mod manifest;
pub mod netlock;
pub mod policy;
pub mod preflight;
pub mod prehash;
pub mod record;
pub mod retention;
pub mod rootfs;
pub mod seal;
pub mod store;
pub mod sysv;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

/// Unit tests count what each thread allocates (the parser properties bound it).
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: testkit::Counting = testkit::Counting;

pub use error::{Error, Result};
pub use record::{ContainerState, Role};
