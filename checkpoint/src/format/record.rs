//! What a checkpoint records of each container of a pod: its role and its state.

use serde::{Deserialize, Serialize};

/// A container's role in its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The pause container holding the pod's network and IPC namespaces.
    Sandbox,
    /// Any other container of the pod.
    Container,
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Stopped,
}
