//! What the pod tells containerd about its tasks, in our own terms: `pod/`, `container/` and
//! `oom.rs` publish a [`TaskEvent`] through an [`EventSink`]; `events.rs` turns it into
//! containerd's protobuf message and forwards it. Unit tests collect them with a fake sink.

use std::time::SystemTime;

use async_trait::async_trait;

/// A mount of a container's rootfs, as containerd sends it with a Create.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

/// The stdio paths a Create named.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskIo {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// One event of containerd's task topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    Create {
        container_id: String,
        bundle: String,
        rootfs: Vec<Mount>,
        io: TaskIo,
        checkpoint: String,
        pid: u32,
    },
    Start {
        container_id: String,
        pid: u32,
    },
    Delete {
        container_id: String,
        pid: u32,
        exit_status: u32,
        /// `None`: now.
        exited_at: Option<SystemTime>,
    },
    ExecAdded {
        container_id: String,
        exec_id: String,
    },
    ExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    Exit {
        container_id: String,
        /// The exec id, or the container id for its init process.
        id: String,
        pid: u32,
        exit_status: u32,
        /// `None`: now.
        exited_at: Option<SystemTime>,
    },
    Paused {
        container_id: String,
    },
    Resumed {
        container_id: String,
    },
    Checkpointed {
        container_id: String,
        checkpoint: String,
    },
    Oom {
        container_id: String,
    },
}

impl TaskEvent {
    /// A short name, for tests.
    #[cfg(test)]
    pub fn kind(&self) -> &'static str {
        match self {
            TaskEvent::Create { .. } => "create",
            TaskEvent::Start { .. } => "start",
            TaskEvent::Delete { .. } => "delete",
            TaskEvent::ExecAdded { .. } => "exec-added",
            TaskEvent::ExecStarted { .. } => "exec-started",
            TaskEvent::Exit { .. } => "exit",
            TaskEvent::Paused { .. } => "paused",
            TaskEvent::Resumed { .. } => "resumed",
            TaskEvent::Checkpointed { .. } => "checkpointed",
            TaskEvent::Oom { .. } => "oom",
        }
    }
}

/// Where task events go. A failure is the sink's to log: the call that caused the event has
/// already happened.
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn publish(&self, event: TaskEvent);
}

#[cfg(test)]
pub mod fake {
    use std::sync::Mutex;

    use super::*;

    /// Collects the events published, in order.
    #[derive(Default)]
    pub struct Recorded(pub Mutex<Vec<TaskEvent>>);

    impl Recorded {
        pub fn kinds(&self) -> Vec<&'static str> {
            crate::process::lock(&self.0)
                .iter()
                .map(TaskEvent::kind)
                .collect()
        }
    }

    #[async_trait]
    impl EventSink for Recorded {
        async fn publish(&self, event: TaskEvent) {
            crate::process::lock(&self.0).push(event);
        }
    }
}
