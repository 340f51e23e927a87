//! What a pod's containers share, captured once for the pod: unix connections between
//! containers, the network lock, SysV IPC.

pub mod links;
pub mod netlock;
pub mod sysv;
