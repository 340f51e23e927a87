//! What links a pod's containers besides their shared volumes: TCP connections over loopback
//! and connected unix sockets with one end in each of two containers. Read while the pod is
//! frozen.
//!
//! Each container is dumped and restored by its own CRIU run. A TCP connection over loopback
//! survives that (both ends come back through TCP repair; the restore keeps the pod's network
//! locked until both are back, see the shim's restore), so the containers at its ends are
//! recorded. A connected unix socket with an end in each of two containers is dumped by each
//! container's CRIU as external, and recorded: the restore hands both ends of a new pair in.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

use podsnap_runtime::launcher::{Capture, Launcher};

use crate::error::{Error, Result};

/// The sockets of the pod's processes: socket inode -> (container name, pid).
pub struct SocketOwners(HashMap<u64, (String, i32)>);

impl SocketOwners {
    /// Reads the descriptors of `procs` (each container's processes).
    pub fn read(procs: &[(String, Vec<i32>)]) -> SocketOwners {
        let mut owner = HashMap::new();
        for (name, pids) in procs {
            for pid in pids {
                let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                    continue;
                };
                for fd in fds.flatten() {
                    let Ok(link) = std::fs::read_link(fd.path()) else {
                        continue;
                    };
                    let link = link.to_string_lossy();
                    if let Some(ino) = link.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                        if let Ok(ino) = ino.parse() {
                            owner.insert(ino, (name.clone(), *pid));
                        }
                    }
                }
            }
        }
        SocketOwners(owner)
    }

    fn name(&self, inode: u64) -> Option<&str> {
        self.0.get(&inode).map(|(n, _)| n.as_str())
    }
}

/// The containers (names) at either end of an established TCP connection over loopback whose
/// other end is in another container: `procs` lists each container's processes. Read while the
/// pod is frozen, from the pod's `/proc/<pid>/net/tcp{,6}` and its processes' descriptors.
pub fn loopback_linked(procs: &[(String, Vec<i32>)], owners: &SocketOwners) -> BTreeSet<String> {
    let Some(pid) = procs.iter().flat_map(|(_, p)| p).next() else {
        return BTreeSet::new();
    };
    let mut ends: HashMap<(String, String), Vec<&str>> = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for c in parse_tcp_table(&text) {
            if let Some(name) = owners.name(c.inode) {
                // One key for both ends of a connection.
                let key = if c.local < c.remote {
                    (c.local.clone(), c.remote.clone())
                } else {
                    (c.remote.clone(), c.local.clone())
                };
                ends.entry(key).or_default().push(name);
            }
        }
    }
    ends.values()
        .filter(|names| names.len() == 2 && names[0] != names[1])
        .flat_map(|names| names.iter().map(|n| (*n).to_owned()))
        .collect()
}

/// An established loopback connection of a `/proc/net/tcp{,6}` table.
#[derive(Debug, PartialEq, Eq)]
struct LoopbackConnection {
    local: String,
    remote: String,
    inode: u64,
}

/// The established connections of a `/proc/net/tcp` or `tcp6` text whose both ends are on
/// loopback (127.0.0.0/8 or ::1; addresses as the kernel prints them).
fn parse_tcp_table(text: &str) -> Vec<LoopbackConnection> {
    const ESTABLISHED: &str = "01";
    let loopback = |endpoint: &str| {
        let addr = endpoint.split(':').next().unwrap_or_default();
        // IPv4: little-endian hex, first byte last; IPv6: four little-endian words.
        (addr.len() == 8 && addr.ends_with("7F")) || addr == "00000000000000000000000001000000"
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, state, inode) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(9)?);
            (*state == ESTABLISHED && loopback(local) && loopback(remote)).then(|| LoopbackConnection {
                local: (*local).to_owned(),
                remote: (*remote).to_owned(),
                inode: inode.parse().unwrap_or(0),
            })
        })
        .collect()
}

/// A connected unix socket of the pod's processes (both ends held by them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixConnection {
    /// `ss`'s name of its kind: `u_str`, `u_seq` or `u_dgr`.
    pub kind: String,
    /// (container name, socket inode, pid holding it), the lower inode first.
    pub ends: [(String, u64, i32); 2],
}

impl UnixConnection {
    /// The link a manifest records; `None` for a kind podsnap cannot hand back (datagrams).
    pub fn link(&self) -> Option<crate::format::manifest::UnixLink> {
        use crate::format::manifest::{UnixEnd, UnixKind, UnixLink};
        let kind = match self.kind.as_str() {
            "u_str" => UnixKind::Stream,
            "u_seq" => UnixKind::Seqpacket,
            _ => return None,
        };
        let end = |(container, ino, _): &(String, u64, i32)| UnixEnd {
            container: container.clone(),
            ino: *ino,
        };
        Some(UnixLink {
            kind,
            ends: [end(&self.ends[0]), end(&self.ends[1])],
        })
    }

    /// Whether its ends are in two containers.
    pub fn between_containers(&self) -> bool {
        self.ends[0].0 != self.ends[1].0
    }

    /// The two containers and pids, for an error.
    pub fn shown(&self) -> String {
        let [(na, _, pa), (nb, _, pb)] = &self.ends;
        format!("{na:?} (pid {pa}) and {nb:?} (pid {pb})")
    }
}

/// The connected unix sockets with both ends held by the pod's processes (`procs`, each
/// container's). `netns` is the pod's network namespace (`None`: the host's), whose unix
/// sockets `ss` lists with their peers. Unless `within_containers`, only connections that can
/// link two containers are looked for (none when fewer than two hold unix sockets).
pub async fn unix_connections(
    launcher: &dyn Launcher,
    netns: Option<&Path>,
    procs: &[(String, Vec<i32>)],
    owners: &SocketOwners,
    within_containers: bool,
) -> Result<Vec<UnixConnection>> {
    // Most pods have no unix sockets in two containers (and `ss` costs a nsenter and an ss).
    let unix = unix_inodes(procs);
    let holders: BTreeSet<&str> = owners
        .0
        .iter()
        .filter(|(ino, _)| unix.contains(ino))
        .map(|(_, (name, _))| name.as_str())
        .collect();
    let wanted = match within_containers {
        true => !holders.is_empty(),
        false => holders.len() >= 2,
    };
    if !wanted {
        return Ok(Vec::new());
    }
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("--").arg("ss");
            c
        }
        None => Command::new("ss"),
    };
    cmd.args(["-x", "-n", "-H"]).stdin(Stdio::null());
    let out = launcher
        .run(cmd, Capture::Output)
        .await
        .map_err(|e| Error::io("list the pod's unix sockets (ss -x)", "pod", e))?;
    if !out.success() {
        return Err(Error::io(
            "list the pod's unix sockets (ss -x)",
            "pod",
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ));
    }
    let mut found = Vec::new();
    for (kind, a, b) in parse_unix_pairs(&String::from_utf8_lossy(&out.stdout)) {
        if let (Some((na, pa)), Some((nb, pb))) = (owners.0.get(&a), owners.0.get(&b)) {
            if a < b {
                found.push(UnixConnection {
                    kind,
                    ends: [(na.clone(), a, *pa), (nb.clone(), b, *pb)],
                });
            }
        }
    }
    Ok(found)
}

/// Makes the new connection of a recorded unix `link` of the checkpoint at `dir` (its parts
/// named as `names`): one connected pair of the link's kind, end `i` for the container of
/// `link.ends[i]`. What sat in each end's receive queue at the dump is sent from the other end
/// first, so it waits there again; then each end gets its recorded shutdown and `O_NONBLOCK`.
/// CRIU, handed an end as the socket of that inode (`inherit-fd`), takes it as it is.
pub fn connect_link(
    dir: &Path,
    names: crate::format::manifest::PartNames,
    link: &crate::format::manifest::UnixLink,
) -> Result<[OwnedFd; 2]> {
    let mut raw = [0; 2];
    let kind = link.kind.socket_type() as i32;
    // SAFETY: socketpair writes two new descriptors into `raw` when it succeeds.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0, raw.as_mut_ptr()) } != 0 {
        return Err(Error::io(
            "make a unix socket pair",
            dir,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    let pair = unsafe { [OwnedFd::from_raw_fd(raw[0]), OwnedFd::from_raw_fd(raw[1])] };
    let mut sockets = Vec::new();
    for (i, end) in link.ends.iter().enumerate() {
        let images = dir.join(end.images(names));
        let invalid = |reason: String| Error::InvalidCheckpoint {
            path: images.clone(),
            reason,
        };
        let socket = crate::criu::image::unix_socket(&images, end.ino)?.ok_or_else(|| {
            invalid(format!(
                "container {:?}: no unix socket {} in its CRIU images",
                end.container, end.ino
            ))
        })?;
        if socket.kind != link.kind.socket_type() {
            return Err(invalid(format!(
                "container {:?}: unix socket {} is of type {}, not the recorded {:?}",
                end.container, end.ino, socket.kind, link.kind
            )));
        }
        let packets = crate::criu::image::queued_packets(&images, socket.id)?;
        let queued: usize = packets.iter().map(Vec::len).sum();
        if queued > 0 {
            make_room(&pair[1 - i], queued);
        }
        for packet in packets {
            send_queued(&pair[1 - i], &packet).map_err(|e| {
                invalid(format!(
                    "container {:?}: the {} bytes queued at unix socket {} do not fit a new \
                     connection: {e}",
                    end.container,
                    packet.len(),
                    end.ino
                ))
            })?;
        }
        sockets.push(socket);
    }
    for (fd, socket) in pair.iter().zip(&sockets) {
        let how = match socket.shutdown {
            0 => None,
            1 => Some(libc::SHUT_RD),
            2 => Some(libc::SHUT_WR),
            _ => Some(libc::SHUT_RDWR),
        };
        // SAFETY: plain calls on a descriptor this function owns.
        let failed = unsafe {
            how.is_some_and(|how| libc::shutdown(fd.as_raw_fd(), how) != 0)
                || (socket.flags & libc::O_NONBLOCK as u32 != 0
                    && libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_RDWR | libc::O_NONBLOCK) != 0)
        };
        if failed {
            return Err(Error::io(
                "set up a restored unix socket",
                dir,
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(pair)
}

/// Raises the send buffer of `fd` so that `queued` bytes fit without waiting for a reader (the
/// original socket held them; its buffer may have been raised). Root's `SO_SNDBUFFORCE`
/// passes the node's `wmem_max`; a refusal leaves the default, and a send that does not fit
/// then fails with its error.
fn make_room(fd: &OwnedFd, queued: usize) {
    // The kernel doubles the value for its bookkeeping and counts each packet's overhead.
    let want = i32::try_from(queued.saturating_mul(2).saturating_add(1 << 16)).unwrap_or(i32::MAX / 2);
    // SAFETY: setsockopt reads an int from a valid pointer of the given length.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&want as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

/// Sends one queued packet whole without waiting (a stream may take it in parts).
fn send_queued(fd: &OwnedFd, mut packet: &[u8]) -> std::io::Result<()> {
    while !packet.is_empty() {
        // SAFETY: the buffer is valid for its length; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        packet = &packet[n as usize..];
    }
    Ok(())
}

/// The inodes of the unix sockets in the network namespaces of `procs` (each container's
/// first process's `/proc/<pid>/net/unix`).
fn unix_inodes(procs: &[(String, Vec<i32>)]) -> HashSet<u64> {
    let mut out = HashSet::new();
    for pid in procs.iter().filter_map(|(_, pids)| pids.first()) {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap_or_default();
        out.extend(parse_unix_table(&text));
    }
    out
}

/// The inodes of a `/proc/net/unix` text (`Num RefCount Protocol Flags Type St Inode Path`).
fn parse_unix_table(text: &str) -> impl Iterator<Item = u64> + '_ {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(6)?.parse().ok())
}

/// (kind, socket inode, peer inode) of every connected unix socket in `ss -x -n -H` output
/// (the kind is the first word; the inodes the third-last and last: a path may hold spaces, an
/// inode cannot).
fn parse_unix_pairs(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let n = w.len();
            if n < 8 {
                return None;
            }
            let (local, peer) = (w[n - 3].parse().ok()?, w[n - 1].parse().ok()?);
            (peer != 0).then(|| (w[0].to_owned(), local, peer))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_connections_come_from_the_tcp_table() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0\n\
   1: 0100007F:A1B2 0100007F:2382 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0\n\
   2: 0100007F:2382 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0\n\
   3: 0500580A:1F90 0100580A:D431 01 00000000:00000000 00:00000000 00000000     0        0 1004 1 0\n";
        let c = parse_tcp_table(text);
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].inode, 1002);
        assert_eq!(
            (c[1].local.as_str(), c[1].remote.as_str()),
            ("0100007F:2382", "0100007F:A1B2")
        );
    }

    #[test]
    fn unix_inodes_come_from_proc_net_unix() {
        let text = "Num       RefCount Protocol Flags    Type St Inode Path\n\
                    ffff8f0a00000000: 00000002 00000000 00010000 0001 01 2728739 /tmp/a.sock\n\
                    ffff8f0a00000001: 00000003 00000000 00000000 0001 03 2728740\n";
        assert_eq!(parse_unix_table(text).collect::<Vec<_>>(), vec![2728739, 2728740]);
    }

    #[test]
    fn unix_pairs_come_from_ss() {
        let text = "u_str ESTAB 0      0                     * 2728740 * 2728741\n\
                    u_str ESTAB 0      0      /tmp/a b.sock 2728739 * 2728738\n\
                    u_seq ESTAB 0      0                     * 17 * 18\n\
                    u_str LISTEN 0      4096      /run/x.sock 1234 * 0\n";
        assert_eq!(
            parse_unix_pairs(text),
            vec![
                ("u_str".to_owned(), 2728740, 2728741),
                ("u_str".to_owned(), 2728739, 2728738),
                ("u_seq".to_owned(), 17, 18)
            ]
        );
    }

    fn end(container: &str, ino: u64) -> crate::format::manifest::UnixEnd {
        crate::format::manifest::UnixEnd {
            container: container.into(),
            ino,
        }
    }

    fn read_available(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        // SAFETY: the buffer is valid for its length; MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        buf.truncate(n.max(0) as usize);
        buf
    }

    #[test]
    fn a_linked_pair_gets_each_ends_queue_shutdown_and_flags() {
        use crate::criu::image::{testing::write_socket_images, UnixSocket};
        use crate::format::manifest::{UnixKind, UnixLink};
        let t = tempfile::tempdir().expect("tempdir");
        let stream = libc::SOCK_STREAM as u32;
        let app = UnixSocket {
            id: 7,
            ino: 100,
            kind: stream,
            flags: libc::O_RDWR as u32 | libc::O_NONBLOCK as u32,
            shutdown: 0,
        };
        let sidecar = UnixSocket {
            id: 9,
            ino: 200,
            kind: stream,
            flags: libc::O_RDWR as u32,
            shutdown: 2,
        };
        write_socket_images(
            &t.path().join("containers/app/checkpoint"),
            &[app],
            &[(7, b"to the app\n"), (8, b"someone else's")],
        );
        write_socket_images(
            &t.path().join("containers/sidecar/checkpoint"),
            &[sidecar],
            &[(9, b"to the sidecar\n")],
        );
        let link = UnixLink {
            kind: UnixKind::Stream,
            ends: [end("app", 100), end("sidecar", 200)],
        };
        let [a, s] = connect_link(t.path(), crate::format::manifest::PART_NAMES, &link).expect("pair");
        assert_eq!(read_available(&a), b"to the app\n");
        assert_eq!(read_available(&s), b"to the sidecar\n");
        // The sidecar had shut its writing side: the app reads the end of the stream.
        assert!(read_available(&a).is_empty());
        // SAFETY: plain fcntl on owned descriptors.
        let nonblocking =
            |fd: &OwnedFd| unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } & libc::O_NONBLOCK != 0;
        assert!(nonblocking(&a) && !nonblocking(&s));

        // A recorded kind the images contradict, and an end the images do not hold.
        let seqpacket = UnixLink {
            kind: UnixKind::Seqpacket,
            ..link.clone()
        };
        let err = connect_link(t.path(), crate::format::manifest::PART_NAMES, &seqpacket)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("not the recorded"), "{err}");
        let missing = UnixLink {
            ends: [end("app", 100), end("sidecar", 201)],
            ..link
        };
        let err = connect_link(t.path(), crate::format::manifest::PART_NAMES, &missing)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("no unix socket 201"), "{err}");
    }

    #[test]
    fn only_stream_and_seqpacket_connections_are_linked() {
        let c = |kind: &str| UnixConnection {
            kind: kind.into(),
            ends: [("a".into(), 1, 10), ("b".into(), 2, 20)],
        };
        assert_eq!(
            c("u_str").link().expect("stream").kind,
            crate::format::manifest::UnixKind::Stream
        );
        assert_eq!(
            c("u_seq").link().expect("seqpacket").kind,
            crate::format::manifest::UnixKind::Seqpacket
        );
        assert!(c("u_dgr").link().is_none());
        assert_eq!(c("u_str").shown(), "\"a\" (pid 10) and \"b\" (pid 20)");
    }
}

#[cfg(test)]
mod proptests;
