//! Connections of the migration channel: TCP, the TLS handshake with pinned keys, the first
//! messages (`welcome`, `hello`, `accept` | `refuse`), then frames both ways with heartbeats.
//!
//! A [`Channel`] is read by its owner and written by a task of its own, which sends a `ping`
//! whenever it had nothing else to send for a heartbeat; a read that sees no frame at all (pings
//! included) for the peer timeout fails with [`Error::PeerLost`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use podsnap_checkpoint::config::MigrationPolicy;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::error::{Error, Result};
use super::frame::{read_frame, write_frame, Frame, FrameError, Hello, Message, Purpose, PROTOCOL};
use super::identity::{Identity, Peers};
use super::tls::{is_access_denied, Tls};

/// How long connecting, the handshake and a silent peer may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A peer that sends no frame for this long is lost; also bounds connecting and each step
    /// of the handshake.
    pub peer: Duration,
    /// How often an idle side sends `ping`.
    pub heartbeat: Duration,
}

impl Timeouts {
    /// The heartbeat is a quarter of the peer timeout, at most 1 s.
    pub fn new(peer: Duration) -> Timeouts {
        Timeouts {
            peer,
            heartbeat: (peer / 4).min(Duration::from_secs(1)),
        }
    }
}

/// Frames queued for the writer task (a few data frames: at most 4 MiB in flight).
const QUEUE: usize = 16;

/// This node's side of the channel: its key, its peers, its timeouts.
#[derive(Clone)]
pub struct Endpoint {
    tls: Arc<Tls>,
    key_id: String,
    node: String,
    timeouts: Timeouts,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("key_id", &self.key_id)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// The endpoint `[migration]` of the node configuration (named `config`) describes.
    pub fn from_policy(policy: &MigrationPolicy, config: &str) -> Result<Endpoint> {
        let (identity, peers) = super::identity::load(policy, config)?;
        Endpoint::new(&identity, peers, Timeouts::new(policy.peer_timeout()))
    }

    /// An endpoint from keys held in memory.
    pub fn new(identity: &Identity, peers: Peers, timeouts: Timeouts) -> Result<Endpoint> {
        let tls = Tls::new(identity, Arc::new(peers))?;
        let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Ok(Endpoint {
            tls: Arc::new(tls),
            key_id: identity.key_id().to_owned(),
            node,
            timeouts,
        })
    }

    /// This node's key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Connects to `addr` for `purpose`: TCP, TLS with pinned keys, `welcome`, `hello`, then
    /// the server's `accept` (a `refuse` is [`Error::Refused`]). Nothing is sent before the
    /// server's `welcome` proved it accepted this node's key.
    pub async fn connect(&self, addr: &str, purpose: Purpose) -> Result<Channel> {
        let t = self.timeouts.peer;
        let tcp = within(t, addr, "connecting", async {
            TcpStream::connect(addr).await.map_err(|source| Error::Connect {
                addr: addr.to_owned(),
                source,
            })
        })
        .await?;
        let _ = tcp.set_nodelay(true);
        let (config, pinned) = self.tls.client()?;
        let connector = tokio_rustls::TlsConnector::from(config);
        // No name is checked (the key is), and none is sent (no SNI).
        let name = rustls::pki_types::ServerName::IpAddress(
            tcp.peer_addr()
                .map(|a| a.ip())
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
                .into(),
        );
        let handshake = within(t, addr, "the TLS handshake", async {
            connector
                .connect(name, tcp)
                .await
                .map_err(|e| match pinned.refusal() {
                    Some(refusal) => refusal.into_error(addr),
                    None => self.tls_error(addr, e),
                })
        })
        .await?;
        let stream = tokio_rustls::TlsStream::Client(handshake);
        let mut channel = Channel::start(stream, addr.to_owned(), self.timeouts);
        // The server verified our key if it speaks: its refusal arrives as an alert here.
        let welcome = channel.recv().await.map_err(|e| self.refused_by(addr, e))?;
        match welcome {
            Frame::Message(Message::Welcome { protocols, node, key }) => {
                if !protocols.contains(&PROTOCOL) {
                    return Err(Error::Protocol {
                        peer: channel.peer.clone(),
                        reason: format!(
                            "it speaks migration protocol {protocols:?}, this node {PROTOCOL}: \
                             run the same podsnap release on both nodes"
                        ),
                    });
                }
                channel.peer = format!("{node} ({addr}, key {})", short_id(&key));
            }
            other => return Err(channel.unexpected(&other, "welcome")),
        }
        channel
            .send(Frame::Message(Message::Hello(Hello {
                protocol: PROTOCOL,
                node: self.node.clone(),
                purpose,
            })))
            .await?;
        match channel.recv_message().await? {
            Message::Accept => Ok(channel),
            Message::Refuse { reason } => Err(Error::Refused {
                peer: channel.peer.clone(),
                reason,
            }),
            other => Err(channel.unexpected(&Frame::Message(other), "accept or refuse")),
        }
    }

    /// Listens on `addr`.
    pub async fn bind(&self, addr: &str) -> Result<Listener> {
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Listen {
            addr: addr.to_owned(),
            source,
        })?;
        Ok(Listener {
            listener,
            endpoint: self.clone(),
        })
    }

    fn tls_error(&self, addr: &str, e: std::io::Error) -> Error {
        if is_access_denied(&e) {
            Error::RefusedByPeer {
                addr: addr.to_owned(),
                own_key_id: self.key_id.clone(),
            }
        } else {
            Error::Tls {
                addr: addr.to_owned(),
                source: e,
            }
        }
    }

    /// A failure while waiting for `welcome`: the server's `access_denied` alert means it
    /// refused this node's key.
    fn refused_by(&self, addr: &str, e: Error) -> Error {
        match e {
            Error::PeerLost { reason, .. } if reason.contains("AccessDenied") => Error::RefusedByPeer {
                addr: addr.to_owned(),
                own_key_id: self.key_id.clone(),
            },
            other => other,
        }
    }
}

/// A listening socket of the channel.
pub struct Listener {
    listener: TcpListener,
    endpoint: Endpoint,
}

impl Listener {
    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().map_err(|source| Error::Listen {
            addr: "the listening socket".into(),
            source,
        })
    }

    /// Waits for the next connection and takes it through the handshake and `hello`. A peer
    /// whose key is not listed fails here ([`Error::PeerNotListed`], naming its key id) and
    /// got nothing; the listener goes on listening either way.
    pub async fn accept(&self) -> Result<Incoming> {
        let (tcp, from) = self.connection().await?;
        self.handshake(tcp, from).await
    }

    /// Waits for the next TCP connection, nothing more: safe to drop while it waits (a
    /// `select!` branch), unlike [`Listener::accept`], whose handshake would be cut off.
    pub async fn connection(&self) -> Result<(TcpStream, SocketAddr)> {
        self.listener.accept().await.map_err(|source| Error::Listen {
            addr: "the listening socket".into(),
            source,
        })
    }

    /// Takes a connection from [`Listener::connection`] through the handshake and `hello`
    /// (see [`Listener::accept`]).
    pub async fn handshake(&self, tcp: TcpStream, from: SocketAddr) -> Result<Incoming> {
        let _ = tcp.set_nodelay(true);
        let addr = from.to_string();
        let endpoint = &self.endpoint;
        let t = endpoint.timeouts.peer;
        let (config, pinned) = endpoint.tls.server()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let stream = within(t, &addr, "the TLS handshake", async {
            acceptor.accept(tcp).await.map_err(|e| match pinned.refusal() {
                Some(refusal) => refusal.into_error(&addr),
                None => endpoint.tls_error(&addr, e),
            })
        })
        .await?;
        let peer_key = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| super::identity::key_from_spki(c.as_ref()).ok())
            .map(|k| crate::oci::key_id(&k))
            .unwrap_or_default();
        let mut channel = Channel::start(
            tokio_rustls::TlsStream::Server(stream),
            format!("{addr} (key {})", short_id(&peer_key)),
            endpoint.timeouts,
        );
        channel
            .send(Frame::Message(Message::Welcome {
                protocols: vec![PROTOCOL],
                node: endpoint.node.clone(),
                key: endpoint.key_id.clone(),
            }))
            .await?;
        match channel.recv_message().await? {
            Message::Hello(hello) => {
                channel.peer = format!("{} ({addr}, key {})", hello.node, short_id(&peer_key));
                if hello.protocol != PROTOCOL {
                    let reason = format!(
                        "it speaks migration protocol {}, this node {PROTOCOL}",
                        hello.protocol
                    );
                    let _ = channel
                        .send(Frame::Message(Message::Refuse {
                            reason: reason.clone(),
                        }))
                        .await;
                    let peer = channel.peer.clone();
                    channel.close().await;
                    return Err(Error::Protocol { peer, reason });
                }
                Ok(Incoming {
                    channel,
                    hello,
                    key_id: peer_key,
                })
            }
            other => Err(channel.unexpected(&Frame::Message(other), "hello")),
        }
    }
}

/// A verified connection whose `hello` is read, not yet answered.
pub struct Incoming {
    channel: Channel,
    /// What the client asked for.
    pub hello: Hello,
    /// The client's key id.
    pub key_id: String,
}

impl Incoming {
    /// Who connected.
    pub fn peer(&self) -> &str {
        &self.channel.peer
    }

    /// Takes the connection: `accept`.
    pub async fn accept(mut self) -> Result<Channel> {
        self.channel.send(Frame::Message(Message::Accept)).await?;
        Ok(self.channel)
    }

    /// Turns it down: `refuse {reason}`.
    pub async fn refuse(mut self, reason: &str) {
        let _ = self
            .channel
            .send(Frame::Message(Message::Refuse {
                reason: reason.to_owned(),
            }))
            .await;
        self.channel.close().await;
    }
}

type Stream = tokio_rustls::TlsStream<TcpStream>;

/// An authenticated connection, past `hello`.
pub struct Channel {
    /// Who is at the other end (node name, address, key id).
    peer: String,
    reader: ReadHalf<Stream>,
    queue: Option<mpsc::Sender<Frame>>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
    timeouts: Timeouts,
}

impl Channel {
    /// Tells the peer the migration is abandoned (why, cut to a frame's size), and closes.
    pub async fn abort(mut self, reason: &str) {
        let _ = self
            .send_message(Message::Abort {
                reason: reason.chars().take(super::frame::MAX_NAME_BYTES / 2).collect(),
            })
            .await;
        self.close().await;
    }

    fn start(stream: Stream, peer: String, timeouts: Timeouts) -> Channel {
        let (reader, writer) = tokio::io::split(stream);
        let (queue, frames) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(write_frames(writer, frames, timeouts.heartbeat));
        Channel {
            peer,
            reader,
            queue: Some(queue),
            writer: Some(writer),
            timeouts,
        }
    }

    /// Another sender of frames on this channel (a live migration's page streams).
    pub fn sender(&self) -> Option<mpsc::Sender<Frame>> {
        self.queue.clone()
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Queues a frame for the writer.
    pub async fn send(&mut self, frame: Frame) -> Result<()> {
        let sent = match &self.queue {
            Some(queue) => queue.send(frame).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        // The writer stopped: say why.
        Err(match self.writer.take() {
            Some(writer) => match writer.await {
                Ok(Err(e)) => Error::PeerLost {
                    peer: self.peer.clone(),
                    reason: format!("sending failed: {e}"),
                },
                _ => Error::Closed {
                    peer: self.peer.clone(),
                },
            },
            None => Error::Closed {
                peer: self.peer.clone(),
            },
        })
    }

    /// A message.
    pub async fn send_message(&mut self, message: Message) -> Result<()> {
        self.send(Frame::Message(message)).await
    }

    /// The next frame that is not a `ping`; fails when the peer stays silent for the peer
    /// timeout, breaks the protocol, or the connection ends.
    pub async fn recv(&mut self) -> Result<Frame> {
        loop {
            let read = tokio::time::timeout(self.timeouts.peer, read_frame(&mut self.reader)).await;
            match read {
                Err(_) => {
                    return Err(Error::PeerLost {
                        peer: self.peer.clone(),
                        reason: format!(
                            "nothing received for {:?} ([migration] peer_timeout_seconds)",
                            self.timeouts.peer
                        ),
                    })
                }
                Ok(Ok(Some(Frame::Ping))) => continue,
                Ok(Ok(Some(frame))) => return Ok(frame),
                Ok(Ok(None)) => {
                    return Err(Error::PeerClosed {
                        peer: self.peer.clone(),
                    })
                }
                Ok(Err(FrameError::Protocol(reason))) => {
                    return Err(Error::Protocol {
                        peer: self.peer.clone(),
                        reason,
                    })
                }
                Ok(Err(FrameError::Io(e))) => {
                    return Err(Error::PeerLost {
                        peer: self.peer.clone(),
                        reason: describe_io(&e),
                    })
                }
            }
        }
    }

    /// The next frame, which must be a message; an `abort` is [`Error::Aborted`].
    pub async fn recv_message(&mut self) -> Result<Message> {
        match self.recv().await? {
            Frame::Message(Message::Abort { reason }) => Err(Error::Aborted {
                peer: self.peer.clone(),
                reason,
            }),
            Frame::Message(message) => Ok(message),
            other => Err(self.unexpected(&other, "a message")),
        }
    }

    /// The error for a frame that is not what the protocol expects here.
    pub fn unexpected(&self, frame: &Frame, wanted: &str) -> Error {
        let got = match frame {
            Frame::Message(Message::Abort { reason }) => {
                return Error::Aborted {
                    peer: self.peer.clone(),
                    reason: reason.clone(),
                }
            }
            Frame::Message(m) => format!("{m:?}").chars().take(200).collect(),
            Frame::Data(d) => format!("{} bytes of data", d.len()),
            Frame::Manifest(_) => "a manifest".into(),
            Frame::Ping => "ping".into(),
            Frame::Pages { stream, data } => format!("{} bytes of page stream {stream}", data.len()),
        };
        Error::Protocol {
            peer: self.peer.clone(),
            reason: format!("expected {wanted}, got {got}"),
        }
    }

    /// Sends what is queued, ends the TLS stream (close_notify) and waits for the writer:
    /// `Ok` once everything queued was handed to the kernel.
    pub async fn finish(mut self) -> Result<()> {
        self.queue = None;
        match self.writer.take() {
            Some(writer) => match writer.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Error::PeerLost {
                    peer: self.peer.clone(),
                    reason: format!("sending failed: {e}"),
                }),
                Err(e) => Err(Error::PeerLost {
                    peer: self.peer.clone(),
                    reason: format!("the sending task failed: {e}"),
                }),
            },
            None => Err(Error::Closed {
                peer: self.peer.clone(),
            }),
        }
    }

    /// [`Channel::finish`], its result only logged.
    pub async fn close(self) {
        let peer = self.peer.clone();
        if let Err(e) = self.finish().await {
            log::debug!("migration: closing the channel to {peer}: {e}");
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
    }
}

/// The writer task: frames from the queue, a `ping` after each idle heartbeat; at the queue's
/// end, flush and close_notify.
async fn write_frames(
    mut writer: WriteHalf<Stream>,
    mut frames: mpsc::Receiver<Frame>,
    heartbeat: Duration,
) -> std::io::Result<()> {
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => {
                    write_frame(&mut writer, &frame).await?;
                    if frames.is_empty() {
                        writer.flush().await?;
                    }
                }
                None => break,
            },
            _ = tokio::time::sleep(heartbeat) => {
                write_frame(&mut writer, &Frame::Ping).await?;
                writer.flush().await?;
            }
        }
    }
    writer.flush().await?;
    writer.shutdown().await
}

/// Runs `step` for at most `after`.
async fn within<T>(
    after: Duration,
    addr: &str,
    what: &'static str,
    step: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(after, step)
        .await
        .map_err(|_| Error::Timeout {
            addr: addr.to_owned(),
            what,
            after,
        })?
}

fn describe_io(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => format!("it sent the TLS alert {alert:?}"),
        _ if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the connection ended in the middle of a frame (no TLS close_notify)".into()
        }
        _ => e.to_string(),
    }
}

/// The first 16 hex digits of a key id, as logs show it (the full id is 64).
pub fn short_id(key_id: &str) -> &str {
    key_id.get(..16).unwrap_or(key_id)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::migrate::identity::tests::{signing_key, write_keys};

    fn endpoint(seed: u8, peers: &[u8]) -> Endpoint {
        let identity = Identity::from_signing_key(signing_key(seed));
        let peers = Peers::from_keys(peers.iter().map(|s| signing_key(*s).verifying_key())).expect("peers");
        Endpoint::new(&identity, peers, Timeouts::new(Duration::from_millis(800))).expect("endpoint")
    }

    fn id(seed: u8) -> String {
        crate::oci::key_id(&signing_key(seed).verifying_key())
    }

    const CONTROL: Purpose = Purpose::Control { ticket: None };

    /// Connects `client` to `server`; returns both sides' results.
    async fn pair(client: &Endpoint, server: &Endpoint) -> (Result<Channel>, Result<Incoming>) {
        let listener = server.bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepting = tokio::spawn(async move {
            let incoming = listener.accept().await;
            match incoming {
                Ok(incoming) => {
                    let hello = incoming.hello.clone();
                    let key_id = incoming.key_id.clone();
                    let channel = incoming.accept().await.expect("accept");
                    // Hand the accepted side back as an Incoming-like result.
                    Ok((channel, hello, key_id))
                }
                Err(e) => Err(e),
            }
        });
        let connected = client.connect(&addr, CONTROL).await;
        let accepted = accepting.await.expect("the accepting task");
        (
            connected,
            accepted.map(|(channel, hello, key_id)| Incoming {
                channel,
                hello,
                key_id,
            }),
        )
    }

    /// Two peers that list each other, connected: (client, server).
    pub(crate) async fn connected() -> (Channel, Channel) {
        let (a, b) = (endpoint(1, &[2]), endpoint(2, &[1]));
        let (client, server) = pair(&a, &b).await;
        (
            client.expect("a connects to b"),
            server.expect("b accepts a").channel,
        )
    }

    #[tokio::test]
    async fn a_listed_peer_connects_and_both_sides_talk() {
        let (a, b) = (endpoint(1, &[2]), endpoint(2, &[1]));
        let (client, server) = pair(&a, &b).await;
        let mut client = client.expect("a connects to b");
        let server = server.expect("b accepts a");
        assert_eq!(server.hello.purpose, CONTROL);
        assert_eq!(server.key_id, id(1), "b saw a's key");
        assert!(client.peer().contains(short_id(&id(2))), "{}", client.peer());
        let mut server = server.channel;
        client
            .send(Frame::Data(bytes::Bytes::from_static(b"pages")))
            .await
            .expect("send");
        assert_eq!(
            server.recv().await.expect("recv"),
            Frame::Data(bytes::Bytes::from_static(b"pages"))
        );
        // Silence longer than the peer timeout is fine while the heartbeats flow.
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2000)).await;
            server.send_message(Message::Kept).await.expect("send");
            server.finish().await.expect("finish");
        });
        assert_eq!(client.recv_message().await.expect("kept"), Message::Kept);
        later.await.expect("the server task");
        let err = client.recv().await.expect_err("closed");
        assert!(matches!(err, Error::PeerClosed { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_unlisted_client_is_refused_and_both_sides_name_its_key() {
        // b trusts 3 only: a (1) is refused in the handshake.
        let (a, b) = (endpoint(1, &[2]), endpoint(2, &[3]));
        let (client, server) = pair(&a, &b).await;
        let server = server.err().expect("b refuses a");
        assert!(
            matches!(&server, Error::PeerNotListed { key_id, .. } if *key_id == id(1)),
            "{server}"
        );
        assert!(server.to_string().contains(&id(1)), "{server}");
        let client = client.err().expect("a is refused");
        assert!(
            matches!(&client, Error::RefusedByPeer { own_key_id, .. } if *own_key_id == id(1)),
            "{client}"
        );
        assert!(client.to_string().contains(&id(1)), "{client}");
    }

    #[tokio::test]
    async fn a_client_refuses_a_server_it_does_not_list_before_sending_anything() {
        // a trusts 3 only: b (2) is refused by a; b learns it from a's alert.
        let (a, b) = (endpoint(1, &[3]), endpoint(2, &[1]));
        let (client, server) = pair(&a, &b).await;
        let client = client.err().expect("a refuses b");
        assert!(
            matches!(&client, Error::PeerNotListed { key_id, .. } if *key_id == id(2)),
            "{client}"
        );
        let server = server.err().expect("b is refused");
        assert!(
            matches!(&server, Error::RefusedByPeer { own_key_id, .. } if *own_key_id == id(2)),
            "{server}"
        );
    }

    #[tokio::test]
    async fn a_tampered_peer_key_file_trusts_nobody_and_names_the_real_key() {
        // a's peer file for b has one byte of the key changed: b's real key is not listed.
        let dir = tempfile::tempdir().expect("tempdir");
        let (a_key, _) = write_keys(dir.path(), "a", 1);
        let (_, b_pub) = write_keys(dir.path(), "b", 2);
        let pem = std::fs::read_to_string(&b_pub).expect("read");
        let der = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<String>();
        use base64::Engine;
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(der)
            .expect("base64");
        let pem = |raw: &[u8]| {
            format!(
                "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        };
        // Not every changed byte is still a point of the curve: such a file is refused when
        // it is read; the first change that still decodes is a key of nobody here.
        let last = raw.len() - 1;
        let original = raw[last];
        let mut refused_at_load = 0;
        for flip in 1..=255u8 {
            raw[last] = original ^ flip;
            std::fs::write(&b_pub, pem(&raw)).expect("tamper");
            match Peers::load(std::slice::from_ref(&b_pub)) {
                Ok(_) => break,
                Err(e) => {
                    assert!(e.to_string().contains("not an ed25519 public key"), "{e}");
                    refused_at_load += 1;
                }
            }
        }
        assert!(refused_at_load < 255, "no changed key decodes");
        let policy = MigrationPolicy {
            key: Some(a_key),
            peers: vec![b_pub],
            peer_timeout_seconds: Some(2),
        };
        let a = Endpoint::from_policy(&policy, "a.toml").expect("still an ed25519 key");
        let b = endpoint(2, &[1]);
        let (client, _) = pair(&a, &b).await;
        let err = client.err().expect("refused");
        assert!(
            matches!(&err, Error::PeerNotListed { key_id, .. } if *key_id == id(2)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_peer_that_speaks_no_tls_fails_the_handshake_and_the_listener_goes_on() {
        let b = endpoint(2, &[1]);
        let listener = b.bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let garbage = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
            let mut buf = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf).await;
            buf
        });
        let err = listener.accept().await.err().expect("not TLS");
        assert!(matches!(err, Error::Tls { .. }), "{err}");
        let answered = garbage.await.expect("task");
        assert!(
            !answered.windows(7).any(|w| w == b"welcome"),
            "nothing of the protocol was sent"
        );
        // The listener still takes a listed peer.
        let a = endpoint(1, &[2]);
        let addr = addr.to_string();
        let server = tokio::spawn(async move {
            listener
                .accept()
                .await
                .expect("accepted")
                .accept()
                .await
                .expect("accept")
        });
        a.connect(&addr, CONTROL).await.expect("connected");
        server.await.expect("the accepting task");
    }

    #[tokio::test]
    async fn a_silent_peer_is_lost_after_the_peer_timeout() {
        let a = endpoint(1, &[2]);
        // A TLS-less listener that never answers: the handshake times out.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("addr").to_string();
        let _held = tokio::spawn(async move {
            let (s, _) = silent.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(s);
        });
        let started = std::time::Instant::now();
        let err = a.connect(&addr, CONTROL).await.err().expect("timed out");
        assert!(
            matches!(
                err,
                Error::Timeout {
                    what: "the TLS handshake",
                    ..
                }
            ),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = a.connect("127.0.0.1:1", CONTROL).await.err().expect("refused");
        assert!(matches!(err, Error::Connect { .. }), "{err}");
    }
}
