//! What the migration channel can fail with. Every message names the peer (node name, address
//! and key id once known) and says what to do where there is something to do.

use std::path::PathBuf;
use std::time::Duration;

/// A failure of the migration channel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `[migration]` of the node configuration cannot be used as it is.
    #[error("[migration] of {config}: {reason}")]
    Config {
        /// How the configuration is named (its file).
        config: String,
        reason: String,
    },
    /// A key file could not be read.
    #[error("{context} {}: {source}", .path.display())]
    KeyFile {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No TCP connection to the peer.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The listening socket could not be made or failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// We refused the peer: its key is not one of ours to trust.
    #[error(
        "refused {addr}: its key {key_id} is not one of [migration] peers (to trust that node, \
         add its public key file to [migration] peers)"
    )]
    PeerNotListed { addr: String, key_id: String },
    /// We refused the peer: it presented something that is not an ed25519 key.
    #[error("refused {addr}: {reason}")]
    PeerKeyInvalid { addr: String, reason: String },
    /// The peer refused us (TLS alert `access_denied`): our key is not among its peers.
    #[error(
        "{addr} refused this node's key {own_key_id}: add this node's public key to [migration] \
         peers of that node"
    )]
    RefusedByPeer { addr: String, own_key_id: String },
    /// The TLS handshake or the TLS layer failed otherwise.
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// A step of setting up a connection took longer than the peer timeout.
    #[error("{addr}: {what} took longer than {after:?} ([migration] peer_timeout_seconds)")]
    Timeout {
        addr: String,
        what: &'static str,
        after: Duration,
    },
    /// The peer went silent or its connection broke without an orderly end.
    #[error("lost {peer}: {reason}")]
    PeerLost { peer: String, reason: String },
    /// The peer closed the connection in an orderly way (TLS close_notify) where more was
    /// expected.
    #[error("{peer} closed the connection")]
    PeerClosed { peer: String },
    /// The peer sent something the protocol does not allow (an oversized or unknown frame, a
    /// message out of place).
    #[error("{peer} broke the migration protocol: {reason}")]
    Protocol { peer: String, reason: String },
    /// The peer answered `refuse`.
    #[error("{peer} refused: {reason}")]
    Refused { peer: String, reason: String },
    /// The peer sent `abort`.
    #[error("{peer} aborted: {reason}")]
    Aborted { peer: String, reason: String },
    /// A file sent or received is not what was announced.
    #[error("file {path:?} from {peer}: {reason}")]
    File {
        peer: String,
        path: String,
        reason: String,
    },
    /// Reading or writing the local side (a file, CRIU's unix socket) failed.
    #[error("{context}: {source}")]
    Local {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The channel is closed (this side closed it, or it failed before and that error was
    /// reported already).
    #[error("the channel to {peer} is closed")]
    Closed { peer: String },
    /// CRIU's lazy page server would fail on this node.
    #[error(
        "fs.pipe-max-size is {current} bytes and this process may not exceed it ({detail}): \
         CRIU's lazy page server needs pipes of {needed} bytes and fails without them at its \
         first page ('splice: Bad file descriptor'). Raise it before migrating: `sysctl -w \
         fs.pipe-max-size={needed}` (and in /etc/sysctl.d/ to keep it)"
    )]
    PipeMaxSize {
        current: u64,
        needed: u64,
        detail: String,
    },
    /// The pipe-size preflight itself could not run.
    #[error("cannot check fs.pipe-max-size: {0}")]
    Preflight(String),
}

/// Result of the migration channel.
pub type Result<T> = std::result::Result<T, Error>;
