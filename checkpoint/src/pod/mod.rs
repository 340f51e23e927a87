//! A pod: what its containers share (`shared`) and the pod dump (`dump`), phase by phase.
//! The top layer: it may name every layer below.

pub mod dump;
pub mod shared;
