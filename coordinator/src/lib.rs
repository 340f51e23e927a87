//! podsnap's coordinator: finds pods through CRI and drives pod dump and restore.
//!
//! The `podsnap` binary is a thin clap front end over these modules; tests call them directly.
//! tonic and the CRI types live here only (never in the shim).

pub mod containerd;
pub mod cri;
pub mod dump;
pub mod error;
pub mod group;
pub mod inspect;
pub mod list;
pub mod migrate;
pub mod node;
pub mod oci;
pub mod pod;
pub mod progress;
pub mod restore;
pub mod spec;
pub mod summary;

pub use error::{Error, Result};

/// The node configuration (`/etc/podsnap/config.toml`), a part of [`restore::RestoreRequest`].
pub use podsnap_checkpoint::config::{DigestTiming, NodeConfig};

/// Where checkpoints live on a node unless `PODSNAP_CHECKPOINT_ROOT` or the node configuration
/// says otherwise (one definition, shared with the shim).
pub use podsnap_checkpoint::config::DEFAULT_CHECKPOINT_ROOT;

/// Unit tests count what each thread allocates (the parser properties bound it).
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: podsnap_checkpoint::testkit::Counting = podsnap_checkpoint::testkit::Counting;
