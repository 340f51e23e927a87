//! The node's checkpoint root: the store (list, resolve, remove), leases, import, retention.
//! Names the layers below (`error` to `trust`).

pub mod import;
pub mod lease;
pub mod retention;
pub mod store;
