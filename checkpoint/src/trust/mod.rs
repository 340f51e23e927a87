//! What a restore may trust: the restore policy, this node's identity (and the facts of it
//! kept across dumps), seals of verified checkpoints. Names the layers below (`error` to `archive`).

pub mod facts;
pub mod identity;
pub mod keep_ip;
pub mod policy;
pub mod seal;
pub mod volumes;
