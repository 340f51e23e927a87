//! A pod: its containers (`target`), what their specs say (`spec`), what they share (`shared`)
//! and the pod dump (`dump`), phase by phase.
//! The top layer: it may name every layer below.

pub mod dump;
pub mod shared;
pub mod spec;
pub mod target;
