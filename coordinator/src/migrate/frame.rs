//! Frames and messages of the migration channel (the layout is drawn in the module header of
//! `migrate`). Reading checks each length against its kind's cap before allocating.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this build speaks.
pub const PROTOCOL: u32 = 1;
/// The largest message frame (JSON).
pub const MAX_MESSAGE_BYTES: u32 = 64 * 1024;
/// The largest data frame.
pub const MAX_DATA_BYTES: u32 = 256 * 1024;
/// The largest manifest frame (the checkpoint format's own cap on `manifest.json`).
pub const MAX_MANIFEST_BYTES: u32 = {
    let max = podsnap_checkpoint::format::manifest::MAX_MANIFEST_BYTES;
    assert!(max <= u32::MAX as u64);
    max as u32
};
/// The longest string field a message may hold where the protocol names something (a path,
/// a container, a node, a reason); a message as a whole is capped by [`MAX_MESSAGE_BYTES`].
pub const MAX_NAME_BYTES: usize = 4096;

const KIND_MESSAGE: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_MANIFEST: u8 = 3;
const KIND_PING: u8 = 4;
const KIND_PAGES: u8 = 5;
const HEADER_BYTES: usize = 5;
/// A pages frame's stream number, before its bytes.
const STREAM_BYTES: usize = 4;

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A protocol message.
    Message(Message),
    /// Bytes of a file (1 byte to [`MAX_DATA_BYTES`]).
    Data(Bytes),
    /// A checkpoint's `manifest.json`, byte for byte.
    Manifest(Bytes),
    /// A heartbeat.
    Ping,
    /// Bytes of a live migration's page stream `stream` (one per container whose memory is
    /// served), either way: 1 byte to [`MAX_DATA_BYTES`].
    Pages { stream: u32, data: Bytes },
}

/// What a connection is for (`hello`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Purpose {
    /// A migration: its control messages and its files on one connection. `ticket` will name
    /// the migration on the kubelet path (the keys are the authentication, the ticket only
    /// says which migration); `podsnap receive` takes none.
    Control { ticket: Option<String> },
}

/// The client's first message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The protocol version the client speaks (one the server's `welcome` offered).
    pub protocol: u32,
    /// The client node's name (for logs; the key is what authenticates).
    pub node: String,
    pub purpose: Purpose,
}

/// A protocol message (JSON in a message frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// The server's first message, sent once the client's key is verified.
    Welcome {
        /// Protocol versions the server speaks.
        protocols: Vec<u32>,
        /// The server node's name (for logs).
        node: String,
        /// The server's key id (the same key TLS authenticated).
        key: String,
    },
    /// The client's first message.
    Hello(Hello),
    /// The server takes the connection for what `hello` said.
    Accept,
    /// The server does not (a ticket it does not know, a migration already running, a
    /// policy); or, after the source's manifest, the target will not take this checkpoint.
    Refuse { reason: String },
    /// A file of the checkpoint follows (source to target): exactly `size` bytes of data
    /// frames. `path` is relative to the checkpoint and listed in its manifest.
    File { path: String, size: u64 },
    /// The target restored the pod and every container runs (target to source).
    Restored {
        /// The new pod's namespace/name.
        pod: String,
        /// The new sandbox id.
        id: String,
        /// The new pod IP (empty for a host-network pod).
        ip: String,
        /// The containers running.
        containers: Vec<String>,
    },
    /// The source stops its pod: the target keeps the one it restored (source to target).
    Commit,
    /// The target keeps its pod (target to source): the source's pod may go.
    Kept,
    /// The migration is abandoned; say why.
    Abort { reason: String },
    /// A live migration: this side's end of page stream `stream` ended (target to source:
    /// its lazy-pages daemon ended, `complete` when it had asked for the end of the
    /// transfer, i.e. it had every page; source to target: the source's CRIU ended it).
    PagesEnd { stream: u32, complete: bool },
    /// A live migration: the source stopped its pod, every page served (source to target).
    Released { killed: u64 },
}

impl Message {
    /// The longest string the message holds, and its field.
    fn longest_name(&self) -> (usize, &'static str) {
        let one = |s: &str, field| (s.len(), field);
        match self {
            Message::Welcome { node, key, .. } => one(node, "node").max(one(key, "key")),
            Message::Hello(hello) => {
                let node = one(&hello.node, "node");
                match &hello.purpose {
                    Purpose::Control { ticket } => node.max(one(ticket.as_deref().unwrap_or(""), "ticket")),
                }
            }
            Message::Accept
            | Message::Commit
            | Message::Kept
            | Message::PagesEnd { .. }
            | Message::Released { .. } => (0, ""),
            Message::Refuse { reason } | Message::Abort { reason } => one(reason, "reason"),
            Message::File { path, .. } => one(path, "path"),
            Message::Restored {
                pod,
                id,
                ip,
                containers,
            } => containers
                .iter()
                .fold(one(pod, "pod").max(one(id, "id")).max(one(ip, "ip")), |m, c| {
                    m.max(one(c, "containers"))
                }),
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The transport failed (or ended in the middle of a frame).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The frame breaks the protocol.
    #[error("{0}")]
    Protocol(String),
}

fn protocol(reason: String) -> FrameError {
    FrameError::Protocol(reason)
}

/// The cap of a frame kind, and its name; `None`: an unknown kind.
fn cap(kind: u8) -> Option<(u32, &'static str)> {
    Some(match kind {
        KIND_MESSAGE => (MAX_MESSAGE_BYTES, "message"),
        KIND_DATA => (MAX_DATA_BYTES, "data"),
        KIND_MANIFEST => (MAX_MANIFEST_BYTES, "manifest"),
        KIND_PING => (0, "ping"),
        KIND_PAGES => (MAX_DATA_BYTES + STREAM_BYTES as u32, "pages"),
        _ => return None,
    })
}

/// Reads one frame; `Ok(None)` when the stream ended cleanly where a frame would begin.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; HEADER_BYTES];
    // The first byte alone: an orderly end between frames is not an error.
    if reader.read(&mut header[..1]).await? == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut header[1..]).await?;
    let kind = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let Some((max, name)) = cap(kind) else {
        return Err(protocol(format!(
            "unknown frame kind {kind} (length {len}): it speaks another protocol"
        )));
    };
    if len > max {
        return Err(protocol(format!(
            "a {name} frame of {len} bytes, more than the {max} allowed"
        )));
    }
    if kind == KIND_DATA && len == 0 {
        return Err(protocol("an empty data frame".into()));
    }
    if kind == KIND_PAGES && len as usize <= STREAM_BYTES {
        return Err(protocol("a pages frame without bytes".into()));
    }
    let payload = read_payload(reader, len).await?;
    Ok(Some(match kind {
        KIND_MESSAGE => {
            let message: Message = serde_json::from_slice(&payload)
                .map_err(|e| protocol(format!("a message that does not parse: {e}")))?;
            let (longest, field) = message.longest_name();
            if longest > MAX_NAME_BYTES {
                return Err(protocol(format!(
                    "a message whose {field} has {longest} bytes, more than {MAX_NAME_BYTES}"
                )));
            }
            Frame::Message(message)
        }
        KIND_DATA => Frame::Data(payload),
        KIND_MANIFEST => Frame::Manifest(payload),
        KIND_PAGES => Frame::Pages {
            stream: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
            data: payload.slice(STREAM_BYTES..),
        },
        _ => Frame::Ping,
    }))
}

async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> Result<Bytes, FrameError> {
    let len = len as usize;
    let mut payload = BytesMut::zeroed(len);
    reader.read_exact(&mut payload).await?;
    Ok(payload.freeze())
}

/// Writes one frame (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame) -> std::io::Result<()> {
    if let Frame::Pages { stream, data } = frame {
        if data.is_empty() || data.len() > MAX_DATA_BYTES as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a pages frame of {} bytes", data.len()),
            ));
        }
        let mut header = [0u8; HEADER_BYTES + STREAM_BYTES];
        header[0] = KIND_PAGES;
        header[1..HEADER_BYTES].copy_from_slice(&((data.len() + STREAM_BYTES) as u32).to_be_bytes());
        header[HEADER_BYTES..].copy_from_slice(&stream.to_be_bytes());
        writer.write_all(&header).await?;
        return writer.write_all(data).await;
    }
    let json;
    let (kind, payload): (u8, &[u8]) = match frame {
        Frame::Message(message) => {
            json = serde_json::to_vec(message).map_err(std::io::Error::other)?;
            (KIND_MESSAGE, &json)
        }
        Frame::Data(data) => (KIND_DATA, data),
        Frame::Manifest(bytes) => (KIND_MANIFEST, bytes),
        Frame::Ping => (KIND_PING, &[]),
        Frame::Pages { .. } => unreachable!("written above"),
    };
    let Some((max, name)) = cap(kind) else {
        return Err(std::io::Error::other(format!("frame kind {kind} has no cap")));
    };
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a {name} frame of {} bytes, more than the {max} allowed",
                    payload.len()
                ),
            )
        })?;
    if kind == KIND_DATA && len == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an empty data frame",
        ));
    }
    let mut header = [0u8; HEADER_BYTES];
    header[0] = kind;
    header[1..].copy_from_slice(&len.to_be_bytes());
    writer.write_all(&header).await?;
    writer.write_all(payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(frame: Frame) -> Frame {
        let mut wire = Vec::new();
        write_frame(&mut wire, &frame).await.expect("write");
        let mut reader = wire.as_slice();
        let back = read_frame(&mut reader).await.expect("read").expect("a frame");
        assert!(reader.is_empty(), "the frame was read whole");
        back
    }

    fn header(kind: u8, len: u32) -> Vec<u8> {
        let mut h = vec![kind];
        h.extend_from_slice(&len.to_be_bytes());
        h
    }

    async fn read_err(wire: &[u8]) -> String {
        let mut reader = wire;
        match read_frame(&mut reader).await {
            Err(e) => e.to_string(),
            Ok(f) => panic!("read {f:?} from {wire:?}"),
        }
    }

    #[tokio::test]
    async fn frames_round_trip() {
        for frame in [
            Frame::Ping,
            Frame::Data(Bytes::from_static(b"pages")),
            Frame::Data(Bytes::from(vec![7u8; MAX_DATA_BYTES as usize])),
            Frame::Manifest(Bytes::from_static(b"{\"format\":1}")),
            Frame::Message(Message::Hello(Hello {
                protocol: PROTOCOL,
                node: "node-a".into(),
                purpose: Purpose::Control { ticket: None },
            })),
            Frame::Message(Message::Welcome {
                protocols: vec![PROTOCOL],
                node: "node-b".into(),
                key: "ab".repeat(32),
            }),
            Frame::Message(Message::File {
                path: "containers/app/criu/core-1.img".into(),
                size: 1 << 40,
            }),
            Frame::Message(Message::Abort {
                reason: "restore failed".into(),
            }),
            Frame::Message(Message::Restored {
                pod: "default/web".into(),
                id: "0123".into(),
                ip: "10.0.0.2".into(),
                containers: vec!["app".into(), "sidecar".into()],
            }),
            Frame::Message(Message::Commit),
            Frame::Message(Message::Kept),
        ] {
            assert_eq!(round_trip(frame.clone()).await, frame);
        }
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty).await.expect("clean end").is_none());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_their_payload_is_read() {
        // Only the header is on the wire: a reader that tried to read (or allocate) the
        // announced payload would fail with an early end instead.
        let err = read_err(&header(KIND_DATA, MAX_DATA_BYTES + 1)).await;
        assert!(
            err.contains("data frame of 262145 bytes, more than the 262144"),
            "{err}"
        );
        let err = read_err(&header(KIND_MESSAGE, MAX_MESSAGE_BYTES + 1)).await;
        assert!(err.contains("message frame"), "{err}");
        let err = read_err(&header(KIND_MANIFEST, u32::MAX)).await;
        assert!(err.contains("manifest frame of 4294967295 bytes"), "{err}");
        let err = read_err(&header(KIND_PING, 1)).await;
        assert!(err.contains("ping frame of 1 bytes"), "{err}");
        let err = read_err(&header(KIND_PAGES, MAX_DATA_BYTES + STREAM_BYTES as u32 + 1)).await;
        assert!(err.contains("pages frame of 262149 bytes"), "{err}");
        let err = read_err(&header(KIND_PAGES, STREAM_BYTES as u32)).await;
        assert!(err.contains("a pages frame without bytes"), "{err}");
        let err = read_err(&header(6, 0)).await;
        assert!(err.contains("unknown frame kind 6"), "{err}");
        let err = read_err(&header(9, 0)).await;
        assert!(err.contains("unknown frame kind 9"), "{err}");
        let err = read_err(&header(KIND_DATA, 0)).await;
        assert!(err.contains("empty data frame"), "{err}");
        // Our own writer refuses them too.
        let mut sink = Vec::new();
        let too_big = Frame::Data(Bytes::from(vec![0u8; MAX_DATA_BYTES as usize + 1]));
        assert!(write_frame(&mut sink, &too_big).await.is_err());
        assert!(write_frame(&mut sink, &Frame::Data(Bytes::new())).await.is_err());
        let empty_pages = Frame::Pages {
            stream: 0,
            data: Bytes::new(),
        };
        assert!(write_frame(&mut sink, &empty_pages).await.is_err());
        assert!(sink.is_empty(), "nothing written for a refused frame");
    }

    #[tokio::test]
    async fn page_stream_bytes_keep_their_stream_and_bytes() {
        let frame = Frame::Pages {
            stream: 70000,
            data: Bytes::from(vec![7u8; MAX_DATA_BYTES as usize]),
        };
        assert_eq!(round_trip(frame.clone()).await, frame);
        let end = Frame::Message(Message::PagesEnd {
            stream: 2,
            complete: true,
        });
        assert_eq!(round_trip(end.clone()).await, end);
    }

    #[tokio::test]
    async fn messages_are_checked() {
        let frame = |json: &str| {
            let mut wire = header(KIND_MESSAGE, json.len() as u32);
            wire.extend_from_slice(json.as_bytes());
            wire
        };
        let err = read_err(&frame("{\"type\":\"refuse\",\"reason\":\"r\",\"extra\":1}")).await;
        assert!(err.contains("does not parse"), "{err}");
        let err = read_err(&frame("{\"type\":\"launch\"}")).await;
        assert!(err.contains("does not parse"), "{err}");
        let err = read_err(&frame("not json")).await;
        assert!(err.contains("does not parse"), "{err}");
        let long = format!(
            "{{\"type\":\"file\",\"path\":\"{}\",\"size\":1}}",
            "a".repeat(MAX_NAME_BYTES + 1)
        );
        let err = read_err(&frame(&long)).await;
        assert!(err.contains("path has 4097 bytes"), "{err}");
        // Cut in the middle of a frame: an error, not a clean end.
        let mut cut = frame("{\"type\":\"accept\"}");
        cut.truncate(cut.len() - 2);
        let err = read_err(&cut).await;
        assert!(err.contains("early eof"), "{err}");
        let err = read_err(&[KIND_PING, 0, 0]).await;
        assert!(err.contains("early eof"), "{err}");
    }
}
