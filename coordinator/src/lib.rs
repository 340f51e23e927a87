//! podsnap's coordinator: finds pods through CRI and drives pod dump and restore.

pub mod containerd;
pub mod cri;
