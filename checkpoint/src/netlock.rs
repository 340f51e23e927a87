//! The pod's network lock: from before the first container is frozen until every container is
//! thawed (or killed at the snapshot), no packet enters or leaves the pod's network namespace
//! (loopback excepted: the pod's own containers are frozen together), so the kernel cannot
//! move the TCP state of sockets already dumped while their neighbours are still being dumped.
//!
//! One iptables chain of podsnap's own, `PODSNAP-LOCK`, jumped to first from INPUT and OUTPUT
//! of the pod's namespace, entered with `nsenter --net`. CRIU 4.2.1 still takes its own lock
//! around each container's dump (it has no method to skip it); that lock lives inside this one,
//! in a chain of its own name, and changes nothing for the pod.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use podsnap_runtime::launcher::{Capture, Launcher};

use crate::error::{Error, Result};

/// podsnap's chain in the pod's namespace.
pub const CHAIN: &str = "PODSNAP-LOCK";

/// The rules that lock the namespace (for `iptables-restore --noflush`).
fn lock_rules() -> String {
    format!(
        "*filter\n:{CHAIN} - [0:0]\n-I INPUT 1 -j {CHAIN}\n-I OUTPUT 1 -j {CHAIN}\n\
         -A {CHAIN} -i lo -j ACCEPT\n-A {CHAIN} -o lo -j ACCEPT\n-A {CHAIN} -j DROP\nCOMMIT\n"
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

/// The rules that remove the lock in one transaction (fails, changing nothing, when the lock
/// is not exactly there).
fn unlock_rules() -> String {
    format!("*filter\n-D INPUT -j {CHAIN}\n-D OUTPUT -j {CHAIN}\n-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n")
}

/// Runs `iptables-restore --noflush` of `rules` in `netns`.
async fn restore(
    launcher: &dyn Launcher,
    netns: &Path,
    rules: &str,
) -> Result<podsnap_runtime::launcher::Outcome> {
    let file = tempfile::NamedTempFile::new()
        .map_err(|e| Error::io("write the network lock rules", std::env::temp_dir(), e))?;
    std::fs::write(file.path(), rules)
        .map_err(|e| Error::io("write the network lock rules", file.path(), e))?;
    let mut cmd = in_netns(netns, "iptables-restore");
    cmd.arg("--noflush").arg(file.path());
    launcher
        .run(cmd, Capture::Output)
        .await
        .map_err(|e| Error::io("lock the pod's network (nsenter iptables-restore)", netns, e))
}

/// Locks the network namespace at `netns`.
pub async fn lock(launcher: &dyn Launcher, netns: &Path) -> Result<()> {
    // A lock left by a dump that died is replaced, not stacked.
    let mut listed = in_netns(netns, "iptables");
    listed.args(["-w", "5", "-S", CHAIN]);
    if launcher
        .run(listed, Capture::Output)
        .await
        .is_ok_and(|out| out.success())
    {
        unlock(launcher, netns).await;
    }
    let out = restore(launcher, netns, &lock_rules()).await?;
    if !out.success() {
        return Err(Error::io(
            "lock the pod's network (nsenter iptables-restore)",
            netns,
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        ));
    }
    Ok(())
}

/// Unlocks the network namespace at `netns` (nothing happens if it is not locked or gone).
pub async fn unlock(launcher: &dyn Launcher, netns: &Path) {
    if !netns.exists() {
        return;
    }
    // The lock as this code takes it goes in one call; anything else (half a lock, a jump
    // twice) rule by rule.
    if restore(launcher, netns, &unlock_rules())
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
        let mut cmd = in_netns(netns, "iptables");
        cmd.args(["-w", "5"]).args(&args);
        // A missing rule or chain is what "not locked" looks like: nothing to report.
        let _ = launcher.run(cmd, Capture::Output).await;
    }
}

/// The pod's network lock while a dump runs; unlocked explicitly, or in the background if the
/// dump stops half-way (dropped).
pub struct NetLock {
    netns: Option<PathBuf>,
    launcher: std::sync::Arc<dyn Launcher>,
}

impl NetLock {
    /// Locks `netns` (no lock when `None`: a pod on the host's network).
    pub async fn take(launcher: std::sync::Arc<dyn Launcher>, netns: Option<&Path>) -> Result<NetLock> {
        if let Some(ns) = netns {
            lock(launcher.as_ref(), ns).await?;
        }
        Ok(NetLock {
            netns: netns.map(Path::to_path_buf),
            launcher,
        })
    }

    /// Unlocks now.
    pub async fn release(mut self) {
        if let Some(ns) = self.netns.take() {
            unlock(self.launcher.as_ref(), &ns).await;
        }
    }
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
    fn the_lock_drops_all_but_loopback_in_a_chain_of_its_own() {
        let rules = lock_rules();
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
}
