//! What links a pod's containers besides their shared volumes: TCP connections over loopback
//! and connected unix sockets with one end in each of two containers. Read while the pod is
//! frozen.
//!
//! Each container is dumped and restored by its own CRIU run. A TCP connection over loopback
//! survives that (both ends come back through TCP repair; the restore keeps the pod's network
//! locked until both are back, see the shim's restore), so the containers at its ends are
//! recorded. A connected unix socket pair cannot: CRIU restores a pair only within one run, so a
//! dump that holds one across two containers is refused, naming them.

use std::collections::{BTreeSet, HashMap, HashSet};
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

/// Refuses a pod whose containers are linked by a connected unix socket (one end in each of two
/// containers), naming them. `netns` is the pod's network namespace (`None`: the host's), whose
/// unix sockets `ss` lists with their peers.
pub async fn refuse_unix_links(
    launcher: &dyn Launcher,
    netns: Option<&Path>,
    procs: &[(String, Vec<i32>)],
    owners: &SocketOwners,
) -> Result<()> {
    // A link needs unix sockets in two containers; most pods have none in two (and `ss`,
    // run while the pod is frozen, costs a nsenter and an ss).
    let unix = unix_inodes(procs);
    let holders: BTreeSet<&str> = owners
        .0
        .iter()
        .filter(|(ino, _)| unix.contains(ino))
        .map(|(_, (name, _))| name.as_str())
        .collect();
    if holders.len() < 2 {
        return Ok(());
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
    let mut links = BTreeSet::new();
    for (a, b) in parse_unix_pairs(&String::from_utf8_lossy(&out.stdout)) {
        if let (Some((na, pa)), Some((nb, pb))) = (owners.0.get(&a), owners.0.get(&b)) {
            if na != nb && a < b {
                links.insert(format!("{na:?} (pid {pa}) and {nb:?} (pid {pb})"));
            }
        }
    }
    if links.is_empty() {
        return Ok(());
    }
    Err(Error::InvalidCheckpoint {
        path: "pod".into(),
        reason: format!(
            "a unix socket connection links containers {}: each container is dumped and restored \
             by its own CRIU run, which restores a connected pair only within one container; \
             close the connection before the dump (a listening socket alone is fine); the pod \
             was left running",
            links.into_iter().collect::<Vec<_>>().join(", ")
        ),
    })
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

/// (socket inode, peer inode) of every connected unix socket in `ss -x -n -H` output (the
/// inodes are the third-last and last words: a path may hold spaces, an inode cannot).
fn parse_unix_pairs(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let n = w.len();
            if n < 8 {
                return None;
            }
            let (local, peer) = (w[n - 3].parse().ok()?, w[n - 1].parse().ok()?);
            (peer != 0).then_some((local, peer))
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
                    u_str LISTEN 0      4096      /run/x.sock 1234 * 0\n";
        assert_eq!(
            parse_unix_pairs(text),
            vec![(2728740, 2728741), (2728739, 2728738)]
        );
    }
}
