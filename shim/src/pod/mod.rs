//! The pod a shim serves.

pub mod dump;
