//! The checkpoint on disk: the manifest (types, parsing, validation, digests, names and the
//! layout's file names) and the records it holds. Names only `error` and `fs`.

pub mod deletions;
pub mod digest;
pub mod group;
pub mod layout;
pub mod listing;
pub mod manifest;
pub mod names;
pub mod persistent;
pub mod record;
