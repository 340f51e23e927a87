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

pub use error::{Error, Result};
pub use format::record::{ContainerState, Role};

// The module paths before the layers, for the shim, the CLI and the tests until they name the
// layered ones. Re-exports only; nothing inside this crate uses them.
pub mod manifest {
    pub use crate::format::digest::*;
    pub use crate::format::manifest::*;
    pub use crate::fs::read::{read_capped, read_full};
}
pub mod record {
    pub use crate::format::record::*;
}
pub mod confined {
    pub use crate::fs::confined::*;
}
pub mod container {
    pub use crate::criu::container::*;
    pub use crate::fs::private::{create_private_dir, replace_private, write_private};
    pub use crate::fs::remove::{remove_leftover, RemoveOnDrop};
}
pub mod criu_hold {
    pub use crate::criu::hold::*;
}
pub mod criu_image {
    pub use crate::criu::image::*;
}
pub mod kdat {
    pub use crate::criu::kdat::*;
}
pub mod rootfs {
    pub use crate::archive::rootfs::*;
    pub use crate::format::deletions::{Deletions, MAX_DELETIONS_BYTES};
}
pub mod policy {
    pub use crate::trust::policy::*;
}
pub mod host {
    pub use crate::trust::identity::*;
}
pub mod seal {
    pub use crate::trust::seal::*;
}
pub mod store {
    pub use crate::node::store::*;
}
pub mod lease {
    pub use crate::node::lease::*;
}
pub mod import {
    pub use crate::node::import::*;
}
pub mod retention {
    pub use crate::node::retention::*;
}
pub mod links {
    pub use crate::pod::shared::links::*;
}
pub mod netlock {
    pub use crate::pod::shared::netlock::*;
}
pub mod sysv {
    pub use crate::format::layout::SYSV_STATE;
    pub use crate::pod::shared::sysv::*;
}
pub mod dump {
    pub use crate::config::DEFAULT_DEADLINE;
    pub use crate::format::layout::{
        empty_dir_name, parts_dir, PartReady, DEV_SHM_ARCHIVE, EMPTY_DIR_MARK, PARTS_SUFFIX,
    };
    pub use crate::fs::private::write_synced;
    pub use crate::pod::dump::*;
    pub use crate::pod::spec::{dev_shm_source, empty_dirs, joined_ipc_ns};
}
pub mod journal {
    pub use crate::fs::proc::{alive, start_time, this_process};
    pub use crate::fs::remove::remove_contents;
    pub use crate::pod::dump::journal::*;
}
pub mod prehash {
    pub use crate::pod::dump::prehash::*;
}
pub mod preflight {
    pub use crate::pod::dump::preflight::*;
}
