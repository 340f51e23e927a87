//! Migration between nodes (issue 23): the channel two podsnap nodes speak over, and the
//! direct migration built on it: `podsnap migrate --to-node HOST:PORT` on the source,
//! `podsnap receive --listen ADDR` on the target (`target.rs`), `podsnap drain` (`drain.rs`).
//!
//! A move is live by default (`live.rs`): the pod is dumped without its memory, restored on the
//! target at once, and its memory follows through page streams carried on the channel
//! (`pages.rs`). `--copy` moves the whole checkpoint before the switch (`source.rs`). Kubelet's path
//! (`claim.rs`): `podsnap migrate --listen` on the source prints a `podsnap://HOST:PORT/TICKET`;
//! a pod annotated `podsnap.io/restore-from` with it is created on the target, and its shim
//! claims the pod (`podsnap receive --from`): the target connects, the ticket names the pod.
//!
//! # Who may talk to whom
//! Every connection is TLS 1.3 (rustls, the aws-lc-rs provider)
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
//!   1 message   JSON, a `Message`                          at most 64 KiB
//!   2 data      raw bytes: the body of a file              1 B .. 256 KiB
//!   3 manifest  a checkpoint's manifest.json, byte for byte             at most 16 MiB
//!   4 ping      heartbeat, empty
//!   5 pages     stream number (u32 BE) + page-stream bytes  1 B .. 256 KiB of bytes
//! ```
//! Every length read from the peer is checked against its kind's cap before anything is
//! allocated; an unknown kind, an oversized or empty data frame, or a message that does not
//! parse ends the connection with an error naming the peer.
//!
//! # Conversation
//! ```text
//! source (client, connects)                 target (server, `podsnap receive --listen`)
//!   TCP connect, TLS 1.3 handshake  <---->  keys checked against [migration] peers
//!                                   <-----  welcome {protocols, node, key}
//!   hello {protocol, node, purpose} ----->
//!                                   <-----  accept | refuse {reason}
//!   (pauses the pod, dumps it)
//!   manifest                        ----->  restore policy checked
//!                                   <-----  accept | refuse {reason}
//!   file {path, size} + data ...    ----->  written into staging, size and digest checked
//!                                           (every listed file, nothing else), restored
//!                                   <-----  restored {pod, id, ip, containers} | abort {reason}
//!   commit                          ----->
//!                                   <-----  kept
//!   (kills its paused pod)
//! ```
//! That is `--copy`; a live move carries `pages` both ways from the files' end, the target
//! answers `pages_end` per stream once its daemon has every page, and the source `released`
//! (see `live.rs`).
//! Either side may send `abort {reason}` instead of its next message; a `ping` goes from each
//! side whenever it had nothing to send for a heartbeat.
//!
//! # Liveness (`channel.rs`)
//! Each side sends `ping` when it has had nothing else to send for a heartbeat (a quarter of
//! the peer timeout, at most 1 s). A side that receives no frame for `[migration]
//! peer_timeout_seconds` (default 10) while it waits for one counts the peer as lost and ends
//! the migration with an error saying so.

mod channel;
pub mod claim;
pub mod drain;
mod error;
pub mod frame;
pub mod identity;
pub mod live;
pub mod pages;
pub mod source;
pub mod target;
mod tls;

pub use channel::{short_id, Channel, Endpoint, Incoming, Listener, Timeouts};
pub use error::{Error, Result};
pub use frame::{Frame, Hello, Message, Purpose, PROTOCOL};
pub use identity::{Identity, PeerKey, Peers};
