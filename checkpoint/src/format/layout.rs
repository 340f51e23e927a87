//! Names in the checkpoint's layout that are not the manifest's own: the pod's shared state,
//! emptyDir volume names, and the files beside a dump's destination (its caller's request,
//! the part announcements).

use std::path::{Path, PathBuf};

use crate::format::manifest::validate_name;

/// The state of the pod's SysV objects, relative to the checkpoint root.
pub const SYSV_STATE: &str = "pod/sysv-ipc.json";

/// The pod's `/dev/shm` archive in a checkpoint.
pub const DEV_SHM_ARCHIVE: &str = "pod/dev-shm.tar";

/// Path fragment of a kubelet emptyDir volume's host directory.
pub const EMPTY_DIR_MARK: &str = "/volumes/kubernetes.io~empty-dir/";

/// The volume name of a kubelet emptyDir host path.
pub fn empty_dir_name(source: &str) -> Option<&str> {
    let (_, rest) = source.split_once(EMPTY_DIR_MARK)?;
    let name = rest.trim_end_matches('/');
    (validate_name(name).is_ok()).then_some(name)
}

/// The suffix of the directory beside a dump's destination where the dump announces each
/// container part once it is complete (`<dest>.parts/<container>.json`, a [`PartReady`]): a
/// caller that pushes the checkpoint creates it to upload parts while the dump finishes.
pub const PARTS_SUFFIX: &str = ".parts";

/// `<dest>.parts`.
pub fn parts_dir(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(PARTS_SUFFIX);
    dest.with_file_name(name)
}

/// The suffix of the file beside a dump's destination where its caller asks for more than
/// containerd's checkpoint options can say (`<dest>.request`, a [`DumpAsk`] in JSON): written
/// by `podsnap dump` before it asks containerd for the dump, removed after.
pub const REQUEST_SUFFIX: &str = ".request";

/// `<dest>.request`.
pub fn request_file(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(REQUEST_SUFFIX);
    dest.with_file_name(name)
}

/// Where live migrations keep their page-stream sockets: the source's `podsnap migrate` one
/// directory per migration ([`ServeAsk::dir`]), the target's `podsnap receive` one socket per
/// restored container ([`page_stream_socket`]). Root's only (0700).
pub const MIGRATE_RUN_DIR: &str = "/run/podsnap/migrate";
/// The socket of a live migration's control, in its [`ServeAsk::dir`].
pub const SERVE_CONTROL: &str = "control.sock";

/// The socket in a live migration's [`ServeAsk::dir`] where container `name`'s page server is
/// carried (a short name: a socket path holds at most 107 bytes).
pub fn serve_socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}.sock", short_hash(name)))
}

/// The socket where a live migration's target (`podsnap receive`) carries the page stream of
/// container `name` of the received checkpoint named `checkpoint` (its directory's name in the
/// checkpoint root): the restore's lazy-pages daemon reads its memory from there.
pub fn page_stream_socket(checkpoint: &str, name: &str) -> PathBuf {
    let key = format!("{checkpoint}\0{name}");
    Path::new(MIGRATE_RUN_DIR).join(format!("pages-{}.sock", short_hash(&key)))
}

/// The first line a shim writes on a target's page stream ([`page_stream_socket`]), before
/// CRIU's bytes: the sandbox id of the pod whose container it restores. `podsnap receive`
/// carries the stream only for the pod it created itself; another pod restoring the same
/// received checkpoint gets the stream closed (and its container killed by its shim).
pub fn page_stream_hello(sandbox_id: &str) -> String {
    format!("{PAGE_STREAM_HELLO} {sandbox_id}\n")
}

/// The word that starts a [`page_stream_hello`].
const PAGE_STREAM_HELLO: &str = "podsnap-pages-for";
/// The longest hello accepted, its newline included.
pub const PAGE_STREAM_HELLO_MAX: usize = 128;

/// The sandbox id a hello line (without its newline) names, if it is one.
pub fn parse_page_stream_hello(line: &[u8]) -> Option<&str> {
    let line = std::str::from_utf8(line).ok()?;
    let id = line.strip_prefix(PAGE_STREAM_HELLO)?.strip_prefix(' ')?;
    let valid = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    valid.then_some(id)
}

/// A restore annotation naming a live migration's source on kubelet's path:
/// `podsnap://HOST:PORT/TICKET`, printed by `podsnap migrate --listen` on the source.
pub const LIVE_PREFIX: &str = "podsnap://";

/// A ticket's length: 128 bits in lowercase hex.
pub const TICKET_LEN: usize = 32;

/// `(HOST:PORT, TICKET)` of a `podsnap://HOST:PORT/TICKET` reference (without the prefix), or
/// why it is not one. The address is a host (a name, an IPv4 address or a bracketed IPv6 one)
/// and a port; the ticket 32 lowercase hex digits. Nothing else (no path, query, user).
pub fn parse_live_reference(rest: &str) -> Result<(String, String), String> {
    let why = |what: &str| format!("{LIVE_PREFIX}{rest:?}: {what} (expected {LIVE_PREFIX}HOST:PORT/TICKET)");
    let (addr, ticket) = rest.split_once('/').ok_or_else(|| why("no ticket"))?;
    let valid_ticket = ticket.len() == TICKET_LEN
        && ticket
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if !valid_ticket {
        return Err(why("the ticket is not 32 lowercase hex digits"));
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| why("no port"))?;
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(why("the port is not a number from 1 to 65535"));
    }
    let valid_host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        }
    };
    if !valid_host {
        return Err(why("the host is not a name or an address"));
    }
    Ok((addr.to_owned(), ticket.to_owned()))
}

/// 32 hex digits of BLAKE3 of `s`.
fn short_hash(s: &str) -> String {
    blake3::hash(s.as_bytes()).to_hex()[..32].to_owned()
}

/// A lazy dump for a live migration (`podsnap migrate --to-node`): where its caller listens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeAsk {
    /// A directory right under [`MIGRATE_RUN_DIR`], root's, where the caller listens on
    /// [`SERVE_CONTROL`] and on each running container's [`serve_socket`].
    pub dir: PathBuf,
}

impl ServeAsk {
    /// The directory, if it is one a lazy dump may connect in: right under
    /// [`MIGRATE_RUN_DIR`], a plain name, a directory owned by root and private to it.
    pub fn checked_dir(&self) -> Result<&Path, String> {
        use std::os::unix::fs::MetadataExt;
        let name = self
            .dir
            .strip_prefix(MIGRATE_RUN_DIR)
            .ok()
            .and_then(|rest| rest.to_str())
            .filter(|rest| validate_name(rest).is_ok())
            .ok_or_else(|| {
                format!(
                    "{} is not a directory right under {MIGRATE_RUN_DIR}",
                    self.dir.display()
                )
            })?;
        let meta =
            std::fs::symlink_metadata(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
            return Err(format!(
                "{} ({name}) is not a directory private to root",
                self.dir.display()
            ));
        }
        Ok(&self.dir)
    }
}

/// What a dump's caller asks beyond containerd's checkpoint options.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpAsk {
    /// The persistent volumes to carry (`local`, `none`, or names separated by commas: see
    /// [`crate::format::persistent::Carry`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carry_volumes: Option<String>,
    /// The group this pod is dumped with at one instant (`podsnap dump --selector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupAsk>,
    /// Leave the pod's network locked after the dump (its caller paused the pod and unlocks
    /// the network itself when it resumes it: `podsnap migrate --to-node`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold_network: bool,
    /// A lazy dump for a live migration: the pod is held frozen and its memory served on the
    /// caller's sockets (see `podsnap_checkpoint::pod::dump::serve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<ServeAsk>,
}

/// One pod's place in a group dump, as its caller asks it (see `layout::DumpAsk`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupAsk {
    /// Where the members meet.
    pub dir: PathBuf,
    /// This pod's name in the group.
    pub me: String,
    /// Every member's name, this pod's included.
    pub members: Vec<String>,
}

/// A complete container part of a dump still being finished.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartReady {
    /// The checkpoint directory being written (the staging directory until it is committed).
    pub root: PathBuf,
    /// `containers/<name>`.
    pub part: String,
    /// Its files, relative to `root`, sorted: what the manifest will list for the part.
    pub files: Vec<String>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_live_reference_is_a_host_a_port_and_a_ticket_and_nothing_else() {
        let ticket = "0123456789abcdef0123456789abcdef";
        for (rest, addr) in [
            (format!("10.0.0.7:7443/{ticket}"), "10.0.0.7:7443"),
            (format!("node-a.example:7443/{ticket}"), "node-a.example:7443"),
            (format!("[fd00::1]:7443/{ticket}"), "[fd00::1]:7443"),
        ] {
            assert_eq!(
                parse_live_reference(&rest),
                Ok((addr.to_owned(), ticket.to_owned())),
                "{rest}"
            );
        }
        for bad in [
            "10.0.0.7:7443".to_owned(),
            format!("10.0.0.7/{ticket}"),
            format!("10.0.0.7:0/{ticket}"),
            format!("10.0.0.7:99999/{ticket}"),
            format!(":7443/{ticket}"),
            format!("a b:7443/{ticket}"),
            format!("user@host:7443/{ticket}"),
            format!("[zz]:7443/{ticket}"),
            "host:7443/0123456789ABCDEF0123456789ABCDEF".to_owned(),
            "host:7443/short".to_owned(),
            format!("host:7443/{ticket}/../x"),
            format!("host:7443/{ticket}?x"),
        ] {
            let e = parse_live_reference(&bad).expect_err(&bad);
            assert!(e.starts_with(LIVE_PREFIX), "{e}");
        }
    }

    #[test]
    fn a_page_stream_hello_names_a_sandbox_id_and_nothing_else() {
        let hello = page_stream_hello("0123abcd");
        assert!(hello.len() <= PAGE_STREAM_HELLO_MAX);
        let line = hello.strip_suffix('\n').expect("ends with a newline");
        assert_eq!(parse_page_stream_hello(line.as_bytes()), Some("0123abcd"));
        for bad in [
            "podsnap-pages-for ",
            "podsnap-pages-for a b",
            "podsnap-pages-for ../x",
            "podsnap-pages-forabc",
            "hello abc",
            "podsnap-pages-for \u{e9}",
        ] {
            assert_eq!(parse_page_stream_hello(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(parse_page_stream_hello(&[0xff, 0xfe]), None);
    }

    use super::*;

    #[test]
    fn empty_dir_names_come_from_kubelet_paths() {
        assert_eq!(
            empty_dir_name("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/data"),
            Some("data")
        );
        assert_eq!(
            empty_dir_name("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~secret/x"),
            None
        );
        assert_eq!(
            empty_dir_name("/x/volumes/kubernetes.io~empty-dir/../../etc"),
            None
        );
    }

    #[test]
    fn the_parts_dir_sits_beside_the_destination() {
        assert_eq!(
            parts_dir(Path::new("/ckpt/web")),
            PathBuf::from("/ckpt/web.parts")
        );
    }
}
