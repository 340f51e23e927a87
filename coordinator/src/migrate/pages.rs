//! A live migration's page streams over the channel. Each container whose memory is served has
//! one stream: on the source between the shim (which carries its CRIU's page server) and this
//! process, on the target between this process and the shim (which carries its lazy-pages
//! daemon), both over unix sockets; between the nodes as `pages` frames of that stream's number
//! on the one channel, beside the messages. The bytes are CRIU's page-server protocol,
//! carried unchanged.
//!
//! Once [`Pages::start`] runs, one task reads the channel: pages frames go to their stream's
//! socket, `pages_end` ends its sending side, every other message goes to [`Pages::message`].
//! A stream whose socket ends sends `pages_end`; on the target, `complete` says whether the
//! daemon had asked for the transfer's end first (it does once it has every page): CRIU's
//! page-server protocol from the daemon is a run of 32-byte requests, the last of which is
//! that end.
//!
//! When the channel is lost, every stream's socket is closed: the shims then do what a lost
//! stream asks (the source's keeps its pod frozen, the target's kills its container before its
//! daemon sees the end).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use super::channel::Channel;
use super::error::{Error, Result};
use super::frame::{Frame, Message, MAX_DATA_BYTES};

/// Where a stream's local socket comes from.
pub enum Local {
    /// Connected already (the source: the shim connected before the dump).
    Connected(UnixStream),
    /// Accepted when the shim connects (the target: at the container's restore), and kept
    /// only from the shim of the pod this migration created: its sandbox id, once known,
    /// in `pod`. Another pod restoring the same received checkpoint is turned away.
    Listening {
        listener: UnixListener,
        pod: watch::Receiver<Option<String>>,
    },
}

/// How long a connecting shim has to name its pod.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Accepts connections on `listener` until one comes from the shim of the pod `pod` names
/// (the first line it writes, [`podsnap_checkpoint::format::layout::page_stream_hello`]);
/// others are closed, and logged.
async fn accept_own(
    i: u32,
    listener: &UnixListener,
    pod: &watch::Receiver<Option<String>>,
) -> std::io::Result<UnixStream> {
    use podsnap_checkpoint::format::layout::{parse_page_stream_hello, PAGE_STREAM_HELLO_MAX};
    loop {
        let (mut socket, _) = listener.accept().await?;
        let mut line = Vec::new();
        let read = tokio::time::timeout(HELLO_TIMEOUT, async {
            let mut byte = [0u8; 1];
            while line.len() < PAGE_STREAM_HELLO_MAX {
                if socket.read(&mut byte).await? == 0 {
                    break;
                }
                if byte[0] == b'\n' {
                    return Ok::<bool, std::io::Error>(true);
                }
                line.push(byte[0]);
            }
            Ok(false)
        })
        .await;
        let named = match read {
            Ok(Ok(true)) => parse_page_stream_hello(&line).map(str::to_owned),
            _ => None,
        };
        let Some(named) = named else {
            log::warn!("page stream {i}: closed a connection that did not name its pod");
            continue;
        };
        // The sandbox's id is known before any of its containers is created: a shim that
        // connects before is another pod's.
        let expected = pod.borrow().clone();
        match expected {
            Some(own) if own == named => return Ok(socket),
            own => log::warn!(
                "page stream {i}: refused the shim of pod sandbox {named}: this stream belongs to \
                 the pod this migration restores ({})",
                own.as_deref().unwrap_or("not created yet")
            ),
        }
    }
}

/// The state of one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamState {
    /// This side's socket ended (and `pages_end` went), with whether the daemon asked for
    /// the end (the target's view).
    pub local_ended: Option<bool>,
    /// The peer's `pages_end` came, with its `complete`.
    pub remote_ended: Option<bool>,
    /// Bytes carried from the peer, and to it.
    pub received: u64,
    pub sent: u64,
}

/// The page streams of a live migration and the channel's reader.
pub struct Pages {
    /// Set at the switch (a hold point of the fault suite looks at it).
    switched: Arc<std::sync::atomic::AtomicBool>,
    sender: mpsc::Sender<Frame>,
    messages: mpsc::Receiver<Result<Message>>,
    states: watch::Receiver<Vec<StreamState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    peer: String,
}

/// A daemon's requests: 32-byte headers, `cmd` first (host order); these end the transfer.
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_IOV_BYTES: usize = 32;

impl Pages {
    /// Starts carrying `locals` (stream `i` is `locals[i]`) over `channel`, which it reads from
    /// now on. `watch_requests`: this side's sockets carry a lazy-pages daemon's requests (the
    /// target), whose end of transfer is looked for.
    pub fn start(channel: Channel, locals: Vec<Local>, watch_requests: bool) -> Result<Pages> {
        let peer = channel.peer().to_owned();
        let sender = channel
            .sender()
            .ok_or_else(|| Error::Closed { peer: peer.clone() })?;
        let (state_tx, states) = watch::channel(vec![StreamState::default(); locals.len()]);
        let state_tx = Arc::new(state_tx);
        let (message_tx, messages) = mpsc::channel(16);
        let mut to_locals = Vec::new();
        let mut tasks = Vec::new();
        let switched = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for (i, local) in locals.into_iter().enumerate() {
            let (tx, rx) = mpsc::channel::<Option<Bytes>>(64);
            to_locals.push(tx);
            tasks.push(tokio::spawn(stream(
                i as u32,
                local,
                rx,
                sender.clone(),
                state_tx.clone(),
                watch_requests,
                switched.clone(),
            )));
        }
        tasks.push(tokio::spawn(read_channel(
            channel, to_locals, message_tx, state_tx,
        )));
        Ok(Pages {
            switched,
            sender,
            messages,
            states,
            tasks,
            peer,
        })
    }

    /// The target runs the pod from now on.
    pub fn switch(&self) {
        self.switched.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Sends a message beside the streams.
    pub async fn send(&self, message: Message) -> Result<()> {
        self.sender
            .send(Frame::Message(message))
            .await
            .map_err(|_| Error::Closed {
                peer: self.peer.clone(),
            })
    }

    /// The next message that is not about a stream; an error when the channel broke.
    pub async fn message(&mut self) -> Result<Message> {
        match self.messages.recv().await {
            Some(Ok(Message::Abort { reason })) => Err(Error::Aborted {
                peer: self.peer.clone(),
                reason,
            }),
            Some(m) => m,
            None => Err(Error::Closed {
                peer: self.peer.clone(),
            }),
        }
    }

    /// Waits until `done` holds of the streams' states (or the channel breaks: its error).
    pub async fn until(&mut self, done: impl Fn(&[StreamState]) -> bool) -> Result<Vec<StreamState>> {
        loop {
            {
                let now = self.states.borrow_and_update();
                if done(&now) {
                    return Ok(now.clone());
                }
            }
            tokio::select! {
                changed = self.states.changed() => {
                    if changed.is_err() {
                        return Err(Error::Closed { peer: self.peer.clone() });
                    }
                }
                m = self.messages.recv() => match m {
                    Some(Err(e)) => return Err(e),
                    Some(Ok(Message::Abort { reason })) => {
                        return Err(Error::Aborted { peer: self.peer.clone(), reason })
                    }
                    Some(Ok(other)) => {
                        return Err(Error::Protocol {
                            peer: self.peer.clone(),
                            reason: format!("unexpected {other:?} while pages were carried"),
                        })
                    }
                    None => return Err(Error::Closed { peer: self.peer.clone() }),
                },
            }
        }
    }

    /// The streams' states now.
    pub fn states(&self) -> Vec<StreamState> {
        self.states.borrow().clone()
    }

    /// Gives up before the switch: `abort {reason}` goes to the peer, then the streams close.
    pub async fn abort(self, reason: String) {
        let _ = self.send(Message::Abort { reason }).await;
        self.finish().await;
    }

    /// Waits (at most 2 s) until what is queued was handed to the channel's writer, then a
    /// moment for it to write it; the channel closes when this is dropped.
    pub async fn finish(self) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.sender.capacity() < self.sender.max_capacity() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // Every local socket closes: the shims see their streams lost.
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Reads the channel: pages to their stream, the rest to `messages`.
async fn read_channel(
    mut channel: Channel,
    to_locals: Vec<mpsc::Sender<Option<Bytes>>>,
    messages: mpsc::Sender<Result<Message>>,
    states: Arc<watch::Sender<Vec<StreamState>>>,
) {
    loop {
        let frame = match channel.recv().await {
            Ok(f) => f,
            Err(e) => {
                let _ = messages.send(Err(e)).await;
                return;
            }
        };
        match frame {
            Frame::Pages { stream, data } => {
                let Some(tx) = to_locals.get(stream as usize) else {
                    let _ = messages
                        .send(Err(Error::Protocol {
                            peer: channel.peer().to_owned(),
                            reason: format!("pages of stream {stream}, which does not exist"),
                        }))
                        .await;
                    return;
                };
                let len = data.len() as u64;
                states.send_modify(|s| s[stream as usize].received += len);
                if tx.send(Some(data)).await.is_err() {
                    log::debug!("page stream {stream}: its socket is gone");
                }
            }
            Frame::Message(Message::PagesEnd { stream, complete }) => {
                if let Some(tx) = to_locals.get(stream as usize) {
                    states.send_modify(|s| s[stream as usize].remote_ended = Some(complete));
                    let _ = tx.send(None).await;
                }
            }
            Frame::Message(m) => {
                if messages.send(Ok(m)).await.is_err() {
                    return;
                }
            }
            other => {
                let _ = messages
                    .send(Err(channel.unexpected(&other, "pages or a message")))
                    .await;
                return;
            }
        }
    }
}

/// One stream: its socket (accepted first if need be) read into pages frames, and the peer's
/// pages written to it.
async fn stream(
    i: u32,
    local: Local,
    mut from_peer: mpsc::Receiver<Option<Bytes>>,
    sender: mpsc::Sender<Frame>,
    states: Arc<watch::Sender<Vec<StreamState>>>,
    watch_requests: bool,
    switched: Arc<std::sync::atomic::AtomicBool>,
) {
    let socket = match local {
        Local::Connected(s) => s,
        Local::Listening { listener, pod } => match accept_own(i, &listener, &pod).await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("page stream {i}: accept: {e}");
                return;
            }
        },
    };
    let (mut read, mut write) = socket.into_split();
    let writer = async move {
        while let Some(chunk) = from_peer.recv().await {
            match chunk {
                Some(data) => {
                    if let Err(e) = write.write_all(&data).await {
                        log::warn!("page stream {i}: writing to the shim: {e}");
                        return;
                    }
                }
                None => {
                    let _ = write.shutdown().await;
                    // Kept open for reading: the other half may still carry requests.
                    std::future::pending::<()>().await;
                }
            }
        }
    };
    let started = std::time::Instant::now();
    let reader = async {
        let requests = Mutex::new(Requests::default());
        let mut buf = vec![0u8; MAX_DATA_BYTES as usize];
        loop {
            let n = match read.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    log::warn!("page stream {i}: reading from the shim: {e}");
                    break;
                }
            };
            if watch_requests {
                if let Ok(mut r) = requests.lock() {
                    r.feed(&buf[..n]);
                }
            } else if switched.load(std::sync::atomic::Ordering::SeqCst) {
                // The fault suite holds the source's memory back after the switch (a source
                // lost with pages still missing on the target).
                podsnap_checkpoint::failpoint::hold("migration-pages").await;
            }
            states.send_modify(|s| s[i as usize].sent += n as u64);
            let data = Bytes::copy_from_slice(&buf[..n]);
            if sender.send(Frame::Pages { stream: i, data }).await.is_err() {
                return;
            }
        }
        if watch_requests {
            if let Ok(r) = requests.lock() {
                log::info!(
                    "page stream {i}: the daemon asked {} times for {} pages ({} per request on \
                     average, {} at most) in {:.2?}",
                    r.asked,
                    r.pages,
                    r.pages.checked_div(r.asked).unwrap_or(0),
                    r.largest,
                    started.elapsed()
                );
            }
        }
        let complete = requests.lock().map(|r| r.closed).unwrap_or(false) || !watch_requests;
        states.send_modify(|s| s[i as usize].local_ended = Some(complete));
        let _ = sender
            .send(Frame::Message(Message::PagesEnd { stream: i, complete }))
            .await;
    };
    tokio::join!(reader, writer);
}

/// Follows a daemon's requests (32-byte headers: `cmd` u32, padding, `nr_pages` u64, `vaddr`
/// u64, `dst_id` u64) for the end of the transfer, and counts them.
#[derive(Default)]
struct Requests {
    partial: Vec<u8>,
    closed: bool,
    /// Requests for pages, the pages they asked for, and the largest.
    asked: u64,
    pages: u64,
    largest: u64,
}

impl Requests {
    fn feed(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let whole = self.partial.len() / PS_IOV_BYTES * PS_IOV_BYTES;
        for header in self.partial[..whole].chunks_exact(PS_IOV_BYTES) {
            let cmd = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
            if cmd == PS_IOV_CLOSE || cmd == PS_IOV_FORCE_CLOSE {
                self.closed = true;
            } else {
                let mut n = [0u8; 8];
                n.copy_from_slice(&header[8..16]);
                let pages = u64::from_ne_bytes(n);
                self.asked += 1;
                self.pages = self.pages.saturating_add(pages);
                self.largest = self.largest.max(pages);
            }
        }
        self.partial.drain(..whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(cmd: u32) -> Vec<u8> {
        let mut h = vec![0u8; PS_IOV_BYTES];
        h[..4].copy_from_slice(&cmd.to_ne_bytes());
        h
    }

    #[test]
    fn the_end_of_transfer_is_seen_across_reads_and_only_at_a_header() {
        let mut r = Requests::default();
        let mut bytes = header(7);
        bytes.extend(header(7));
        r.feed(&bytes[..40]);
        r.feed(&bytes[40..]);
        assert!(!r.closed, "page requests only");
        let close = header(PS_IOV_FORCE_CLOSE);
        r.feed(&close[..5]);
        assert!(!r.closed, "half a header");
        r.feed(&close[5..]);
        assert!(r.closed);
        assert_eq!((r.asked, r.pages), (2, 0), "two requests, no pages in them");
        let mut ask = header(7);
        ask[8..16].copy_from_slice(&512u64.to_ne_bytes());
        r.feed(&ask);
        assert_eq!((r.asked, r.pages, r.largest), (3, 512, 512));
        let mut r = Requests::default();
        let mut shifted = vec![0u8; 8];
        shifted.extend(header(PS_IOV_CLOSE));
        r.feed(&shifted[..PS_IOV_BYTES]);
        assert!(!r.closed, "a close word off a header's start is not one");
    }
}
