//! Publishing task events to containerd.
//!
//! Events go, in the order they were published, through one queue to containerd's event service
//! (`TTRPC_ADDRESS`, which containerd gives every shim it starts). A forward that fails for any
//! reason drops the connection and the next try connects again, with a growing pause. The
//! containerd-shim crate's own publisher reconnects only when ttrpc reports the connection
//! closed; after containerd restarts, ttrpc reports "reserve channel capacity failed: channel
//! closed" instead, and every event (a TaskExit among them) was lost: CRI went on believing an
//! exited container ran.

use std::time::Duration;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_async::EventsClient;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc;
use containerd_shim::protos::ttrpc::context::Context;
use tokio::sync::mpsc;

/// The environment variable in which containerd gives a shim its ttrpc address.
const TTRPC_ADDRESS: &str = "TTRPC_ADDRESS";
/// Events waiting to be forwarded, at most.
const QUEUE: usize = 1024;
/// Tries to forward one event before it is dropped (with its pauses, about a minute in all).
const TRIES: u32 = 16;
/// How long one forward may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends events to containerd's event service in the shim's namespace.
pub struct Events {
    queue: Option<mpsc::Sender<Envelope>>,
    /// containerd-shim's publisher, used only when containerd's address is unknown.
    fallback: RemotePublisher,
    namespace: String,
}

impl Events {
    pub fn new(fallback: RemotePublisher, namespace: String) -> Self {
        let queue = std::env::var(TTRPC_ADDRESS)
            .ok()
            .filter(|a| !a.is_empty())
            .map(|address| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(forward(address, rx));
                tx
            });
        Self {
            queue,
            fallback,
            namespace,
        }
    }

    /// Publishes `event` on `topic`; a failure is logged, never returned: the task API call that
    /// caused the event has already happened.
    pub async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let Some(queue) = &self.queue else {
            if let Err(e) = self
                .fallback
                .publish(Context::default(), topic, &self.namespace, event)
                .await
            {
                log::warn!("publishing {topic} failed: {e}");
            }
            return;
        };
        let envelope = match envelope(topic, &self.namespace, event) {
            Ok(e) => e,
            Err(e) => {
                log::warn!("publishing {topic} failed: {e}");
                return;
            }
        };
        if let Err(e) = queue.send_timeout(envelope, Duration::from_secs(3)).await {
            log::warn!("publishing {topic} failed: the event queue is full or gone ({e})");
        }
    }
}

#[async_trait::async_trait]
impl crate::task_event::EventSink for Events {
    async fn publish(&self, event: crate::task_event::TaskEvent) {
        let (topic, message) = crate::convert::event_message(event);
        Events::publish(self, topic, message).await;
    }
}

fn envelope(topic: &str, namespace: &str, event: Box<dyn MessageDyn>) -> containerd_shim::Result<Envelope> {
    let mut e = Envelope::new();
    e.set_topic(topic.to_owned());
    e.set_namespace(namespace.to_owned());
    e.set_timestamp(containerd_shim::util::timestamp()?);
    e.set_event(containerd_shim::util::convert_to_any(event)?);
    Ok(e)
}

async fn connect(address: &str) -> containerd_shim::Result<EventsClient> {
    let address = address.to_owned();
    let fd = tokio::task::spawn_blocking(move || containerd_shim::util::connect(address))
        .await
        .map_err(|e| containerd_shim::Error::Other(e.to_string()))??;
    // SAFETY: `fd` is a connected unix socket `connect` returned; the client owns it from here.
    let client = unsafe { ttrpc::r#async::Client::from_raw_unix_socket_fd(fd) };
    Ok(EventsClient::new(client))
}

/// Forwards the queued events one by one, in order.
async fn forward(address: String, mut queue: mpsc::Receiver<Envelope>) {
    let mut client: Option<EventsClient> = None;
    while let Some(envelope) = queue.recv().await {
        let mut req = ForwardRequest::new();
        req.set_envelope(envelope);
        let mut pause = Duration::from_millis(50);
        for attempt in 1..=TRIES {
            if client.is_none() {
                match connect(&address).await {
                    Ok(c) => client = Some(c),
                    Err(e) => log::debug!("connect to containerd's events at {address}: {e}"),
                }
            }
            if let Some(c) = &client {
                let ctx = Context {
                    timeout_nano: FORWARD_TIMEOUT.as_nanos() as i64,
                    ..Default::default()
                };
                match c.forward(ctx, &req).await {
                    Ok(_) => break,
                    Err(e) => {
                        log::warn!(
                            "forwarding {} to containerd failed (try {attempt} of {TRIES}): {e}; reconnecting",
                            req.envelope().topic()
                        );
                        client = None;
                    }
                }
            }
            if attempt == TRIES {
                log::error!(
                    "event {} dropped: containerd did not take it",
                    req.envelope().topic()
                );
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
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
