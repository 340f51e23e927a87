//! Live migration between nodes (issue 23): the channel two podsnap nodes speak over. This is
//! the foundation the migration itself (`podsnap migrate --to-node`, `podsnap receive`,
//! `podsnap drain`) is built on; it does not dump or restore anything itself.
//!
//! # Who may talk to whom
//! Every connection is TLS 1.3 (rustls, the aws-lc-rs provider; no TLS 1.2 code is built)
//! with mutual authentication by **pinned ed25519 keys**, presented as RFC 7250 raw public keys
//! (no certificates: nothing to expire, no names, no chain; see `tls.rs`):
//! - each node proves itself with `[migration] key` (ed25519, PKCS#8 PEM, as the registry's
//!   `signing_key`) and accepts only the keys of `[migration] peers` (`identity.rs`);
//! - a peer whose key is not listed is refused inside the handshake (alert `access_denied`),
//!   before any application byte is sent, and the refusal names its key id: the hex SHA-256 of
//!   its raw 32-byte public key, the format of a registry signature's `key` field
//!   ([`crate::oci::key_id`]). The refused side names its own key id ("... refused this
//!   node's key <id>");
//! - no session resumption, tickets or early data: every connection is verified against the
//!   peer list as it is at that moment;
//! - key exchange is X25519MLKEM768 only (hybrid post-quantum): the channel carries a pod's
//!   memory, its secrets included, and a recording of it must not become readable later;
//! - **the server speaks first**. In TLS 1.3 the client's handshake is complete before the
//!   server has checked the client's key, so a client that wrote at once could write to a
//!   server that is about to refuse it. Here the server sends `welcome` only once the client is
//!   verified, and the client sends nothing before it has read `welcome`.
//!
//! # Frames (`frame.rs`)
//! After the handshake, both directions carry frames:
//! ```text
//! +------+-----------------+----------------------------+
//! | kind | length (u32 BE) | payload (length bytes)      |
//! +------+-----------------+----------------------------+
//!   1 message   JSON, a `Message` (welcome, hello, accept, refuse, file, file_end, done,
//!               abort)                                      at most 64 KiB
//!   2 data      raw bytes: the body of a file, or page-stream bytes     1 B .. 256 KiB
//!   3 manifest  a checkpoint's manifest.json, byte for byte             at most 16 MiB
//!   4 ping      heartbeat, empty
//!   5 closed    page streams: the local CRIU closed its end, empty
//! ```
//! Every length read from the peer is checked against its kind's cap before anything is
//! allocated; an unknown kind, an oversized or empty data frame, or a message that does not
//! parse ends the connection with an error naming the peer.
//!
//! # Conversation
//! ```text
//! client (connects)                         server (listens)
//!   TCP connect, TLS 1.3 handshake  <---->  keys checked against [migration] peers
//!                                   <-----  welcome {protocols, node, key}
//!   hello {protocol, node, purpose} ----->
//!                                   <-----  accept | refuse {reason}
//!   ... frames both ways, a ping from each side every heartbeat when idle ...
//! ```
//! `purpose` is `control` (with the migration's ticket, if any: the kubelet path) or
//! `page_stream` (session, container, token): one connection per container's CRIU page stream,
//! so a page fault never waits behind bulk data of another stream.
//!
//! # Liveness (`channel.rs`)
//! Each side sends `ping` when it has had nothing else to send for a heartbeat (at most 1 s,
//! a quarter of the peer timeout). A side that receives no frame for `[migration]
//! peer_timeout_seconds` (default 10) while it waits for one counts the peer as lost and ends
//! the channel with an error saying so. Time spent waiting for a slow local consumer (CRIU,
//! a disk) does not count: that is not the peer's silence.
//!
//! # Page streams (`pages.rs`)
//! CRIU's page-server protocol has no authentication, no version and treats a closed
//! connection between requests as a successful end (so a target that dies could make the
//! source's CRIU report success and kill the source pod). podsnap therefore never lets CRIU
//! talk to the network: on each side CRIU gets a unix socket (`ps-socket` on the source,
//! `criu lazy-pages --ps-socket` on the target), and [`pages::bridge`] carries its bytes over an
//! authenticated connection. A close by one CRIU becomes a `closed` frame, never a close of the
//! other CRIU's socket: the bridge hands the socket back open, and whoever owns the migration
//! decides (kill CRIU first, then close).
//!
//! # Files (`file.rs`)
//! A file is `file {path, size}`, exactly `size` bytes of data frames, then `file_end
//! {blake3}`; the receiver refuses a size over its limit before writing, more bytes than
//! announced, a path that is not plain and relative, and a digest that does not match.
//!
//! # Preflight (`preflight.rs`)
//! CRIU's lazy page server needs pipes of 4 MiB (`fs.pipe-max-size`), checked before anything
//! is frozen.

mod channel;
mod error;
pub mod file;
pub mod frame;
pub mod identity;
pub mod pages;
pub mod preflight;
mod tls;

pub use channel::{Channel, Endpoint, Incoming, Listener, Peer, Timeouts};
pub use error::{Error, Result};
pub use frame::{Frame, Hello, Message, Purpose, PROTOCOL};
pub use identity::{Identity, PeerKey, Peers};
