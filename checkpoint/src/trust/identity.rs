//! The node a checkpoint is taken on or restored to: the versions and CPU features a restore
//! depends on. A dump records them ([`this_node`], [`dump_cpuinfo`]); a restore compares them
//! with its own node before anything is created ([`crate::trust::policy::check_host`],
//! [`check_cpuinfo`]).

use std::path::Path;
use std::process::{Command, Stdio};

use podsnap_runtime::launcher::{Capture, Launcher};

use crate::error::{Error, Result};
use crate::format::manifest::HostInfo;
use crate::trust::facts::Facts;
use crate::trust::policy::Violation;

/// Where the node's identity is read.
const MACHINE_ID: &str = "/etc/machine-id";

/// The versions, architecture and identity of this node; `runc` is the runc binary the pod's
/// containers run with (a node may have more than one).
pub async fn this_node(launcher: &dyn Launcher, runc: &Path) -> HostInfo {
    async fn first_line(launcher: &dyn Launcher, cmd: &Path, arg: &str, prefix: &str) -> String {
        let mut c = Command::new(cmd);
        c.arg(arg).stdin(Stdio::null());
        match launcher.run(c, Capture::Output).await {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix(prefix).map(|v| v.trim().to_string()))
                .unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
    let uname = nix::sys::utsname::uname().ok();
    let facts = Facts::default();
    let criu = Path::new("criu");
    let (criu_version, runc_version) = tokio::join!(
        facts.version(criu, first_line(launcher, criu, "--version", "Version:")),
        facts.version(runc, first_line(launcher, runc, "--version", "runc version")),
    );
    HostInfo {
        criu_version,
        runc_version,
        kernel: uname
            .as_ref()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        node_id: node_id(),
    }
}

/// This node's identity (`/etc/machine-id`; empty when unknown).
pub fn node_id() -> String {
    std::fs::read_to_string(MACHINE_ID)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Writes CRIU's image of this node's CPU features into `dir` (`cpuinfo.img`).
/// The image is made once per CRIU binary and boot (see [`crate::trust::facts`]).
pub async fn dump_cpuinfo(launcher: &dyn Launcher, dir: &Path) -> Result<()> {
    let ask = async {
        let out = run_cpuinfo(launcher, "dump", dir).await?;
        if out.0 {
            Ok(())
        } else {
            Err(Error::io(
                "record the CPU features (criu cpuinfo dump)",
                dir,
                std::io::Error::other(out.1),
            ))
        }
    };
    Facts::default()
        .cpuinfo(Path::new("criu"), &dir.join(CPUINFO_IMAGE), ask)
        .await
}

/// The file `criu cpuinfo dump` writes.
const CPUINFO_IMAGE: &str = "cpuinfo.img";

/// Whether this node's CPU can run processes dumped on the CPU recorded in `dir`.
pub async fn check_cpuinfo(launcher: &dyn Launcher, dir: &Path) -> std::result::Result<(), Violation> {
    match run_cpuinfo(launcher, "check", dir).await {
        Ok((true, _)) => Ok(()),
        Ok((false, log)) => Err(Violation {
            rule: "compatibility",
            reason: format!("this node's CPU lacks features the checkpointed processes may use (criu cpuinfo check: {log})"),
        }),
        Err(e) => Err(Violation {
            rule: "compatibility",
            reason: format!("the CPU features could not be compared: {e}"),
        }),
    }
}

/// Runs `criu cpuinfo <action> -D dir` with its log in a scratch directory (nothing but the
/// image is written into `dir`); returns success and the log's error lines.
async fn run_cpuinfo(launcher: &dyn Launcher, action: &str, dir: &Path) -> Result<(bool, String)> {
    let work = tempfile::Builder::new()
        .prefix("podsnap-cpuinfo-")
        .tempdir()
        .map_err(|e| Error::io("make a scratch directory", std::env::temp_dir(), e))?;
    let mut cmd = Command::new("criu");
    cmd.args(["cpuinfo", action, "-D"])
        .arg(dir)
        .arg("-W")
        .arg(work.path())
        .args(["-o", "cpuinfo.log", "-v2"])
        .stdin(Stdio::null());
    let out = launcher
        .run(cmd, Capture::Output)
        .await
        .map_err(|e| Error::io("run criu cpuinfo", dir, e))?;
    let log = std::fs::read_to_string(work.path().join("cpuinfo.log")).unwrap_or_default();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error") || l.contains("mismatch") || l.contains("missing"))
        .filter(|l| !l.contains("RLIMIT_NOFILE"))
        .take(5)
        .collect();
    let mut text = errors.join(" / ");
    if text.is_empty() {
        text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    }
    Ok((out.success(), text))
}
