//! Publishing task events to containerd.

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::context::Context;

/// Sends events to containerd's event service in the shim's namespace.
pub struct Events {
    publisher: RemotePublisher,
    namespace: String,
}

impl Events {
    pub fn new(publisher: RemotePublisher, namespace: String) -> Self {
        Self { publisher, namespace }
    }

    /// Publishes `event` on `topic`; a failure is logged, never returned: the task API call that
    /// caused the event has already happened.
    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            log::warn!("publishing {topic} failed: {e}");
        }
    }
}

pub use topics::{
    TASK_CHECKPOINTED_EVENT_TOPIC as CHECKPOINTED, TASK_CREATE_EVENT_TOPIC as CREATE,
    TASK_DELETE_EVENT_TOPIC as DELETE, TASK_EXEC_ADDED_EVENT_TOPIC as EXEC_ADDED,
    TASK_EXEC_STARTED_EVENT_TOPIC as EXEC_STARTED, TASK_EXIT_EVENT_TOPIC as EXIT,
    TASK_OOM_EVENT_TOPIC as OOM, TASK_PAUSED_EVENT_TOPIC as PAUSED, TASK_RESUMED_EVENT_TOPIC as RESUMED,
    TASK_START_EVENT_TOPIC as START,
};
