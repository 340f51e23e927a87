//! The pod's network lock: from before the first container is frozen until every container is
//! thawed (or killed at the snapshot), no packet moves in the pod's network namespace, loopback
//! included, so the kernel cannot move the TCP state of sockets already dumped while their
//! neighbours are still being dumped. Freezing stops the processes, not their kernel: an ACK
//! on loopback from a container dumped first would let the other end's kernel send data that
//! is in neither image, or count as received data one image lacks.
//!
//! One iptables chain of podsnap's own, `PODSNAP-LOCK`, jumped to first from INPUT and OUTPUT
//! of the pod's namespace, entered with `nsenter --net`. Under it each container's CRIU skips
//! its own lock (`network-lock skip` in the container's CRIU configuration file, see
//! the pod dump): CRIU's iptables lock and unlock of the same namespace per container, all
//! inside the frozen window, cost more than the dump of a container's memory. What a dropped
//! loopback packet costs is a retransmission after the thaw.
//!
//! Every iptables call waits for the xtables lock (`-w`), which kube-proxy or a CNI plugin may
//! hold on a node running legacy iptables: taking the lock waits no longer than the dump's
//! deadline allows (then the dump fails, saying so, before anything was frozen); an unlock
//! waits up to [`XTABLES_WAIT`] whatever the deadline, since a pod left locked loses every
//! packet.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use podsnap_runtime::launcher::{Capture, Launcher, Limit};

use crate::error::{Error, Result};

/// podsnap's chain in the pod's namespace.
pub const CHAIN: &str = "PODSNAP-LOCK";

/// How long an unlock (and a lock with no deadline of its own) waits for the xtables lock.
pub const XTABLES_WAIT: Duration = Duration::from_secs(60);

/// What a lock lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Loopback traffic passes.
    AllButLoopback,
    /// Nothing passes, loopback included (a dump, see the module header; a restore: a
    /// connection between two containers must not see a reset while one end is restored and
    /// the other not yet).
    All,
}

/// The rules that lock the namespace (for `iptables-restore --noflush`).
fn lock_rules(scope: Scope) -> String {
    let loopback = match scope {
        Scope::AllButLoopback => format!("-A {CHAIN} -i lo -j ACCEPT\n-A {CHAIN} -o lo -j ACCEPT\n"),
        Scope::All => String::new(),
    };
    format!(
        "*filter\n:{CHAIN} - [0:0]\n-I INPUT 1 -j {CHAIN}\n-I OUTPUT 1 -j {CHAIN}\n\
         {loopback}-A {CHAIN} -j DROP\nCOMMIT\n"
    )
}

fn in_netns(netns: &Path, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(program)
        .stdin(Stdio::null());
    cmd
}

/// `iptables`/`iptables-restore` in `netns`, waiting for the xtables lock until `limit`'s
/// deadline (whole seconds left, at least one; [`XTABLES_WAIT`] without a deadline).
fn xtables(netns: &Path, program: &str, limit: &Limit) -> Command {
    let wait = limit.deadline.map_or(XTABLES_WAIT, |at| {
        at.saturating_duration_since(tokio::time::Instant::now())
    });
    let mut cmd = in_netns(netns, program);
    cmd.arg("-w").arg(wait.as_secs().max(1).to_string());
    cmd
}

/// The rules that remove the lock in one transaction (fails, changing nothing, when the lock
/// is not exactly there).
fn unlock_rules() -> String {
    format!("*filter\n-D INPUT -j {CHAIN}\n-D OUTPUT -j {CHAIN}\n-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n")
}

/// Runs `iptables-restore --noflush` of `rules` in `netns`, within `limit`.
async fn restore(
    launcher: &dyn Launcher,
    netns: &Path,
    rules: &str,
    limit: &Limit,
) -> Result<podsnap_runtime::launcher::Outcome> {
    let file = tempfile::NamedTempFile::new()
        .map_err(|e| Error::io("write the network lock rules", std::env::temp_dir(), e))?;
    std::fs::write(file.path(), rules)
        .map_err(|e| Error::io("write the network lock rules", file.path(), e))?;
    let mut cmd = xtables(netns, "iptables-restore", limit);
    cmd.arg("--noflush").arg(file.path());
    launcher
        .run_limited(cmd, Capture::Output, limit)
        .await
        .map_err(|e| Error::io("lock the pod's network (nsenter iptables-restore)", netns, e))
}

/// iptables' exit status for a resource problem: the xtables lock not had within `-w`.
const RESOURCE_PROBLEM: i32 = 4;

/// Whether podsnap's chain is in the namespace at `netns` (`iptables -S`), within `limit`; an
/// error when iptables could not tell (the xtables lock not had in time).
async fn chain_present(launcher: &dyn Launcher, netns: &Path, limit: &Limit) -> Result<bool> {
    const DOING: &str = "look for the pod's network lock (nsenter iptables -S)";
    let mut listed = xtables(netns, "iptables", limit);
    listed.args(["-S", CHAIN]);
    let out = launcher
        .run_limited(listed, Capture::Output, limit)
        .await
        .map_err(|e| Error::io(DOING, netns, e))?;
    match out.code {
        0 => Ok(true),
        RESOURCE_PROBLEM => Err(Error::io(
            DOING,
            netns,
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        )),
        // No such chain (what "not locked" looks like).
        _ => Ok(false),
    }
}

/// Locks the network namespace at `netns` for a dump (loopback too: see the module header),
/// waiting for the xtables lock no longer than `limit` allows.
pub async fn lock(launcher: &dyn Launcher, netns: &Path, limit: &Limit) -> Result<()> {
    lock_with(launcher, netns, Scope::All, limit).await
}

/// Locks the network namespace at `netns`, letting `scope` through, waiting for the xtables
/// lock no longer than `limit` allows.
pub async fn lock_with(launcher: &dyn Launcher, netns: &Path, scope: Scope, limit: &Limit) -> Result<()> {
    clear_stale(launcher, netns, limit).await?;
    lock_cleared(launcher, netns, scope, limit).await
}

/// Removes a lock left in `netns` by a dump that died, so that the next lock replaces it
/// rather than stacks on it (what [`lock_with`] does first; a dump does it while its CRIU runs
/// start, off the path to the freeze).
pub async fn clear_stale(launcher: &dyn Launcher, netns: &Path, limit: &Limit) -> Result<()> {
    if chain_present(launcher, netns, limit).await? {
        unlock(launcher, netns).await;
    }
    Ok(())
}

/// Locks `netns`, whose stale lock [`clear_stale`] removed.
async fn lock_cleared(launcher: &dyn Launcher, netns: &Path, scope: Scope, limit: &Limit) -> Result<()> {
    let out = restore(launcher, netns, &lock_rules(scope), limit).await?;
    if !out.success() {
        return Err(Error::io(
            "lock the pod's network (nsenter iptables-restore)",
            netns,
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ));
    }
    Ok(())
}

/// Unlocks the network namespace at `netns` (nothing happens if it is not locked or gone),
/// waiting up to [`XTABLES_WAIT`] for the xtables lock; a lock it cannot remove is logged as
/// an error with the commands that remove it.
pub async fn unlock(launcher: &dyn Launcher, netns: &Path) {
    if !netns.exists() {
        return;
    }
    let limit = Limit::after(XTABLES_WAIT, None);
    // The lock as this code takes it goes in one call; anything else (half a lock, a jump
    // twice) rule by rule.
    if restore(launcher, netns, &unlock_rules(), &limit)
        .await
        .is_ok_and(|out| out.success())
    {
        return;
    }
    for args in [
        vec!["-D", "INPUT", "-j", CHAIN],
        vec!["-D", "OUTPUT", "-j", CHAIN],
        vec!["-F", CHAIN],
        vec!["-X", CHAIN],
    ] {
        let mut cmd = xtables(netns, "iptables", &limit);
        cmd.args(&args);
        // A missing rule or chain is what "not locked" looks like: nothing to report.
        let _ = launcher.run_limited(cmd, Capture::Output, &limit).await;
    }
    let left = match chain_present(launcher, netns, &Limit::after(XTABLES_WAIT, None)).await {
        Ok(false) => return,
        Ok(true) => format!("podsnap could not remove its {CHAIN} chain"),
        Err(e) => e.to_string(),
    };
    log::error!(
        "pod network {ns} may still be locked ({left}): no packet reaches the pod while it is; \
         remove the lock with `nsenter --net={ns} iptables -w -D INPUT -j {CHAIN}`, the same \
         for OUTPUT, then `-F {CHAIN}` and `-X {CHAIN}`",
        ns = netns.display()
    );
}

/// The pod's network lock while a dump runs; unlocked explicitly, or in the background if the
/// dump stops half-way (dropped).
pub struct NetLock {
    netns: Option<PathBuf>,
    launcher: std::sync::Arc<dyn Launcher>,
}

impl NetLock {
    /// Locks `netns` (no lock when `None`: a pod on the host's network), within `limit`;
    /// a stale lock there was removed already ([`clear_stale`]).
    pub async fn take_cleared(
        launcher: std::sync::Arc<dyn Launcher>,
        netns: Option<&Path>,
        limit: &Limit,
    ) -> Result<NetLock> {
        if let Some(ns) = netns {
            lock_cleared(launcher.as_ref(), ns, Scope::All, limit).await?;
        }
        Ok(NetLock {
            netns: netns.map(Path::to_path_buf),
            launcher,
        })
    }

    /// Leaves the namespace locked for good: the pod was stopped at the snapshot, and no packet
    /// of its dying sockets (a FIN, a reset) may tell a peer its connection ended, since a
    /// restore brings it back. The lock goes with the namespace.
    pub fn leave_locked(mut self) {
        if let Some(ns) = self.netns.take() {
            log::info!(
                "pod network {} stays locked after the dump: the pod stays at its snapshot",
                ns.display()
            );
        }
    }

    /// Unlocks now.
    pub async fn release(mut self) {
        if let Some(ns) = self.netns.take() {
            unlock(self.launcher.as_ref(), &ns).await;
        }
    }
}

/// The global addresses of the network namespace at `netns` (`ip -o addr show scope global`).
pub async fn addresses(launcher: &dyn Launcher, netns: &Path) -> Result<Vec<std::net::IpAddr>> {
    let mut cmd = in_netns(netns, "ip");
    cmd.args(["-o", "addr", "show", "scope", "global"]);
    let out = launcher
        .run(cmd, Capture::Output)
        .await
        .map_err(|e| Error::io("list the pod's addresses (nsenter ip addr)", netns, e))?;
    if !out.success() {
        return Err(Error::io(
            "list the pod's addresses (nsenter ip addr)",
            netns,
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ));
    }
    Ok(parse_addresses(&String::from_utf8_lossy(&out.stdout)))
}

/// The addresses of `ip -o addr` lines (`2: eth0    inet 10.1.0.5/24 brd ...`).
fn parse_addresses(text: &str) -> Vec<std::net::IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace().skip_while(|w| *w != "inet" && *w != "inet6");
            words.next()?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// Adds (`true`) or removes the host addresses `ips` on the loopback device of the namespace at
/// `netns`: while a pod is restored with another address than at its dump, CRIU can bring back
/// the connections bound to the old one (they are closed after the restore).
pub async fn borrow_addresses(
    launcher: &dyn Launcher,
    netns: &Path,
    ips: &[std::net::IpAddr],
    add: bool,
) -> Result<()> {
    for ip in ips {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let mut cmd = in_netns(netns, "ip");
        cmd.args(["addr", if add { "add" } else { "del" }])
            .arg(format!("{ip}/{prefix}"))
            .args(["dev", "lo"]);
        let out = launcher
            .run(cmd, Capture::Output)
            .await
            .map_err(|e| Error::io("set a pod address (nsenter ip addr)", netns, e))?;
        if !out.success() && add {
            return Err(Error::io(
                "add the pod's old address (nsenter ip addr add)",
                netns,
                std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            ));
        }
    }
    Ok(())
}

/// Closes (`SOCK_DESTROY`, through `ss -K`) the established TCP connections of the namespace at
/// `netns` whose peer is not on loopback, of the processes `pids` only: after the restore of a
/// container that was not asked to keep them (or could not: the pod's address changed), its
/// connections to outside the pod go, those between its containers stay (those CRIU brought
/// back). A connection another container of the pod accepted since its own restore (a client
/// that came back as soon as that container answered) is a new one and stays. Returns how many
/// were closed.
pub async fn close_outside_connections_of(
    launcher: &dyn Launcher,
    netns: &Path,
    pids: &[i32],
) -> Result<usize> {
    let inodes = socket_inodes(pids);
    if inodes.is_empty() {
        return Ok(0);
    }
    let mut cmd = in_netns(netns, "ss");
    cmd.args([
        "-t",
        "-n",
        "-H",
        "-e",
        "state",
        "established",
        "( not dst 127.0.0.0/8 and not dst [::1] )",
    ]);
    let out = launcher
        .run(cmd, Capture::Output)
        .await
        .map_err(|e| Error::io("list connections (nsenter ss)", netns, e))?;
    if !out.success() {
        return Err(Error::io(
            "list connections (nsenter ss)",
            netns,
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ));
    }
    let mut closed = 0;
    for (local, peer) in connections_of(&String::from_utf8_lossy(&out.stdout), &inodes) {
        let mut cmd = in_netns(netns, "ss");
        cmd.args([
            "-K",
            "-t",
            "-n",
            "-H",
            "state",
            "established",
            "src",
            &local,
            "dst",
            &peer,
        ]);
        match launcher.run(cmd, Capture::Output).await {
            Ok(out) if out.success() => closed += 1,
            Ok(out) => log::warn!(
                "close {local} -> {peer}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => log::warn!("close {local} -> {peer}: {e}"),
        }
    }
    Ok(closed)
}

/// The inodes of the sockets the processes `pids` hold.
fn socket_inodes(pids: &[i32]) -> std::collections::HashSet<u64> {
    let mut inodes = std::collections::HashSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(ino) = target
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse().ok())
            {
                inodes.insert(ino);
            }
        }
    }
    inodes
}

/// (local, peer) of the connections in `ss -t -n -H -e state established` output whose socket
/// inode is one of `inodes`.
fn connections_of(listing: &str, inodes: &std::collections::HashSet<u64>) -> Vec<(String, String)> {
    listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, peer) = (fields.get(2)?, fields.get(3)?);
            let ino: u64 = fields.iter().find_map(|f| f.strip_prefix("ino:"))?.parse().ok()?;
            inodes
                .contains(&ino)
                .then(|| ((*local).to_owned(), (*peer).to_owned()))
        })
        .collect()
}

impl Drop for NetLock {
    fn drop(&mut self) {
        if let Some(ns) = self.netns.take() {
            let launcher = self.launcher.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { unlock(launcher.as_ref(), &ns).await });
                }
                Err(_) => log::error!(
                    "pod network {} left locked: no runtime to unlock it",
                    ns.display()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_connections_of_the_given_sockets_are_picked() {
        let listing = "0      0      10.1.0.5:8081 10.1.0.1:47486 ino:15755248 sk:169e9 cgroup:/ <->\n\
                       0      0      [fd00::5]:8082 [fd00::1]:5000 timer:(keepalive,1min,0) ino:77 sk:2 <->\n\
                       0      0      10.1.0.5:8081 10.1.0.1:50000 ino:99 sk:3 <->\n";
        let inodes = std::collections::HashSet::from([15755248, 77]);
        assert_eq!(
            connections_of(listing, &inodes),
            vec![
                ("10.1.0.5:8081".to_owned(), "10.1.0.1:47486".to_owned()),
                ("[fd00::5]:8082".to_owned(), "[fd00::1]:5000".to_owned()),
            ]
        );
    }

    #[test]
    fn the_lock_drops_all_but_loopback_in_a_chain_of_its_own() {
        let rules = lock_rules(Scope::AllButLoopback);
        assert!(rules.starts_with("*filter\n:PODSNAP-LOCK - [0:0]\n"), "{rules}");
        assert!(rules.contains("-I INPUT 1 -j PODSNAP-LOCK\n-I OUTPUT 1 -j PODSNAP-LOCK\n"));
        assert!(rules.contains("-A PODSNAP-LOCK -i lo -j ACCEPT\n"));
        assert!(rules.ends_with("-A PODSNAP-LOCK -j DROP\nCOMMIT\n"));
        let unlock = unlock_rules();
        assert_eq!(
            unlock,
            "*filter\n-D INPUT -j PODSNAP-LOCK\n-D OUTPUT -j PODSNAP-LOCK\n-F PODSNAP-LOCK\n-X PODSNAP-LOCK\nCOMMIT\n"
        );
    }

    #[test]
    fn addresses_come_from_ip_addr_lines() {
        let text =
            "2: eth0    inet 10.88.0.5/16 brd 10.88.255.255 scope global eth0\\       valid_lft forever\n\
                    2: eth0    inet6 fd00::5/64 scope global \\       valid_lft forever\n";
        assert_eq!(
            parse_addresses(text),
            vec![
                "10.88.0.5".parse::<std::net::IpAddr>().expect("ip"),
                "fd00::5".parse().expect("ip")
            ]
        );
        assert!(parse_addresses("garbage\n").is_empty());
    }

    /// Records every command and the limit it ran within; answers success, or for `-S` (the
    /// stale-lock listing) what `listed` says.
    struct Recorder {
        runs: std::sync::Mutex<Vec<(Vec<String>, Option<tokio::time::Instant>)>>,
        listed: bool,
    }

    #[async_trait::async_trait]
    impl Launcher for Recorder {
        async fn run(
            &self,
            cmd: Command,
            capture: Capture,
        ) -> std::io::Result<podsnap_runtime::launcher::Outcome> {
            self.run_limited(cmd, capture, &Limit::default()).await
        }

        async fn run_limited(
            &self,
            cmd: Command,
            _capture: Capture,
            limit: &Limit,
        ) -> std::io::Result<podsnap_runtime::launcher::Outcome> {
            let argv: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            let code = i32::from(argv.iter().any(|a| a == "-S") && !self.listed);
            self.runs.lock().expect("lock").push((argv, limit.deadline));
            Ok(podsnap_runtime::launcher::Outcome {
                code,
                ..Default::default()
            })
        }
    }

    /// The `-w` seconds of a recorded command.
    fn waits(argv: &[String]) -> Option<u64> {
        let at = argv.iter().position(|a| a == "-w")?;
        argv.get(at + 1)?.parse().ok()
    }

    #[tokio::test]
    async fn every_iptables_call_waits_for_the_xtables_lock_within_its_limit() {
        let t = tempfile::tempdir().expect("tempdir");
        let netns = t.path();
        let launcher = Recorder {
            runs: std::sync::Mutex::new(Vec::new()),
            listed: true,
        };
        // A dump with 30 s left: the listing, the unlock of the stale lock it found, the lock.
        let limit = Limit::after(Duration::from_secs(30), None);
        lock(&launcher, netns, &limit).await.expect("locked");
        let runs = launcher.runs.lock().expect("lock").clone();
        assert_eq!(runs.len(), 3, "{runs:?}");
        let (listing, stale, locked) = (&runs[0], &runs[1], &runs[2]);
        assert!(listing.0.contains(&"-S".to_owned()) && locked.0.contains(&"--noflush".to_owned()));
        for (argv, deadline) in [listing, locked] {
            let w = waits(argv).unwrap_or_else(|| panic!("no -w in {argv:?}"));
            assert!((28..=30).contains(&w), "-w {w} for 30 s left: {argv:?}");
            assert_eq!(
                *deadline, limit.deadline,
                "killed at the dump's deadline: {argv:?}"
            );
        }
        // The unlock waits its own bound, whatever the dump's deadline.
        let w = waits(&stale.0).unwrap_or_else(|| panic!("no -w in {:?}", stale.0));
        assert!(w > 30 && w <= XTABLES_WAIT.as_secs(), "{stale:?}");
        // Less than a second left still waits a second, not forever (`-w 0` is no wait at all
        // on some versions, none is forever on others).
        launcher.runs.lock().expect("lock").clear();
        let almost = Limit::after(Duration::from_millis(300), None);
        let _ = lock_with(&launcher, netns, Scope::AllButLoopback, &almost).await;
        let runs = launcher.runs.lock().expect("lock").clone();
        assert!(
            runs.iter().all(|(argv, _)| waits(argv).is_some_and(|w| w >= 1)),
            "{runs:?}"
        );
    }

    #[test]
    fn the_restore_lock_drops_loopback_too() {
        let rules = lock_rules(Scope::All);
        assert!(!rules.contains("lo"), "{rules}");
        assert!(rules.contains("-I INPUT 1 -j PODSNAP-LOCK\n-I OUTPUT 1 -j PODSNAP-LOCK\n"));
        assert!(rules.ends_with("-A PODSNAP-LOCK -j DROP\nCOMMIT\n"));
    }
}
