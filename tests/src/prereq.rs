//! The host programs a node needs. A missing one is a panic that says what to install: CI
//! installs everything with `packaging/install-deps.sh`, so a skip would only hide a broken setup.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::command::run_within;

/// Where the CNI plugins live.
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The CNI plugins our conflist uses.
pub const CNI_PLUGINS: [&str; 3] = ["bridge", "host-local", "loopback"];
/// The static busybox the workload image carries.
pub const BUSYBOX: &str = "/bin/busybox";
/// Where `packaging/install-deps.sh` installs runc 1.3 (Debian sid's, beside bookworm's 1.1.5).
pub const RUNC_1_3: &str = "/usr/local/lib/podsnap/runc-1.3/runc";
/// Chooses the runc of the suite: `1.3` (the default), `1.1`, or a path to a runc binary.
pub const RUNC_VARIABLE: &str = "PODSNAP_TEST_RUNC";

const INSTALL_HINT: &str = "install the node stack with packaging/install-deps.sh";

/// Absolute paths of the host programs a node runs.
#[derive(Debug, Clone)]
pub struct HostTools {
    /// containerd 2.x.
    pub containerd: PathBuf,
    /// containerd's CLI.
    pub ctr: PathBuf,
    /// The OCI runtime every node runs ([`runc_under_test`]; checked to run and say its
    /// release).
    pub runc: PathBuf,
    /// CRIU 4.
    pub criu: PathBuf,
    /// containerd's Go runc shim, the baseline handler.
    pub runc_shim: PathBuf,
    /// `ip` (iproute2), to remove the CNI bridge.
    pub ip: PathBuf,
}

/// Finds `name` on `PATH` or in the sbin directories root's `PATH` may lack.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .chain([
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ])
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| is_executable(candidate));
    found
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn require(name: &str, what: &str) -> PathBuf {
    find_program(name)
        .unwrap_or_else(|| panic!("prerequisite missing: `{name}` ({what}) is not on PATH; {INSTALL_HINT}"))
}

/// Checks every host prerequisite of a node and returns the programs' paths.
///
/// # Panics
/// When a program, a CNI plugin or busybox is missing, or containerd is older than 2.0.
pub fn check_host() -> HostTools {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the podsnap integration tests run containerd, runc and CRIU and must run as root"
    );
    let runc = runc_under_test();
    runc_version(&runc);
    let tools = HostTools {
        runc,
        containerd: require("containerd", "containerd 2.x"),
        ctr: require("ctr", "containerd's CLI"),
        criu: require("criu", "CRIU 4, for checkpoints"),
        runc_shim: require("containerd-shim-runc-v2", "containerd's runc shim"),
        ip: require("ip", "iproute2"),
    };
    let version = run_within(
        Command::new(&tools.containerd).arg("--version"),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("prerequisite broken: {e}; {INSTALL_HINT}"));
    let major = version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.trim_start_matches('v').split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    assert!(
        matches!(major, Some(m) if m >= 2),
        "prerequisite too old: the shim speaks task API v3 and needs containerd >= 2.0, found \
         {version:?}; {INSTALL_HINT}"
    );
    for plugin in CNI_PLUGINS {
        let path = Path::new(CNI_BIN_DIR).join(plugin);
        assert!(
            is_executable(&path),
            "prerequisite missing: CNI plugin {} (containernetworking-plugins); {INSTALL_HINT}",
            path.display()
        );
    }
    assert!(
        is_executable(Path::new(BUSYBOX)),
        "prerequisite missing: {BUSYBOX} (busybox-static) for the workload image; {INSTALL_HINT}"
    );
    tools
}

/// The runc the suite runs on, as [`RUNC_VARIABLE`] says: `1.3` or unset is [`RUNC_1_3`]
/// (nodes with containerd 2.x run runc 1.2-1.3); `1.1` is bookworm's 1.1.5 (`runc` on
/// `PATH`, `/usr/sbin/runc`); anything else is taken as the path of a runc binary.
///
/// # Panics
/// When that runc does not exist.
pub fn runc_under_test() -> PathBuf {
    let choice = std::env::var(RUNC_VARIABLE).unwrap_or_default();
    let runc = match choice.as_str() {
        "" | "1.3" => PathBuf::from(RUNC_1_3),
        "1.1" => require("runc", "bookworm's runc 1.1.5"),
        path => PathBuf::from(path),
    };
    assert!(
        is_executable(&runc),
        "prerequisite missing: runc {} ({RUNC_VARIABLE}={choice:?}) does not exist; {INSTALL_HINT}",
        runc.display()
    );
    runc
}

/// A runc release, from the first line of `runc --version` (`runc version 1.3.6+ds1`): the
/// suite's own reading of what runc prints, not the runtime crate's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuncVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl RuncVersion {
    /// `None` when the first line names no `X.Y[.Z]` release.
    pub fn parse(version_output: &str) -> Option<Self> {
        let v = version_output
            .lines()
            .next()?
            .trim()
            .strip_prefix("runc version")?
            .trim();
        let release = v.split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?;
        let mut parts = release.split('.').map(|p| p.parse::<u32>().ok());
        let (major, minor) = (parts.next()??, parts.next()??);
        Some(Self {
            major,
            minor,
            patch: parts.next().flatten().unwrap_or(0),
        })
    }
}

impl std::fmt::Display for RuncVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The release of the runc at `runc` (`runc --version`).
///
/// # Panics
/// When it does not run or does not say its release.
pub fn runc_version(runc: &Path) -> RuncVersion {
    let out = run_within(Command::new(runc).arg("--version"), Duration::from_secs(20)).unwrap_or_else(|e| {
        panic!(
            "prerequisite broken: {} does not run: {e}; {INSTALL_HINT}",
            runc.display()
        )
    });
    RuncVersion::parse(&out)
        .unwrap_or_else(|| panic!("{} --version names no release: {out:?}", runc.display()))
}

/// Finds our shim binary: `$PODSNAP_SHIM_DIR/containerd-shim-podsnap-v1` if that variable is
/// set, else next to the `podsnap-workload` binary cargo built (the same target directory and
/// profile). Warns when the binary is older than the shim's sources.
///
/// # Panics
/// When the binary does not exist: build it with `cargo build -p containerd-shim-podsnap-v1`.
pub fn podsnap_shim(workload_bin: &Path) -> PathBuf {
    let dir = match std::env::var_os("PODSNAP_SHIM_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workload_bin.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let shim = dir.join(crate::PODSNAP_SHIM);
    assert!(
        is_executable(&shim),
        "prerequisite missing: {} does not exist; build it first with `cargo build -p \
         containerd-shim-podsnap-v1` (same profile as the tests), or point PODSNAP_SHIM_DIR at \
         the directory holding it",
        shim.display()
    );
    warn_if_stale(&shim);
    shim
}

/// Prints a warning when a source file of the shim's crates is newer than the binary: cargo
/// does not rebuild the shim for `cargo test -p podsnap-tests`.
fn warn_if_stale(shim: &Path) {
    let Ok(built) = std::fs::metadata(shim).and_then(|m| m.modified()) else {
        return;
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for crate_dir in ["shim", "runtime", "checkpoint"] {
        let mut stack = vec![workspace.join(crate_dir).join("src")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                    if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                        newest = Some((modified, path));
                    }
                }
            }
        }
    }
    if let Some((modified, path)) = newest {
        if modified > built {
            eprintln!(
                "podsnap-tests: WARNING: {} is older than {}; rebuild it with `cargo build -p \
                 containerd-shim-podsnap-v1`",
                shim.display(),
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RuncVersion;

    #[test]
    fn runc_releases_are_read_from_the_first_line() {
        let v = |s: &str| RuncVersion::parse(s).map(|v| v.to_string());
        assert_eq!(
            v("runc version 1.3.6+ds1\ncommit: x\nspec: 1.2.1").as_deref(),
            Some("1.3.6")
        );
        assert_eq!(v("runc version 1.1.5").as_deref(), Some("1.1.5"));
        assert_eq!(v("runc version 1.2").as_deref(), Some("1.2.0"));
        assert_eq!(v("runc version unknown"), None);
        assert_eq!(v("crun version 1.8"), None);
        assert!(
            RuncVersion::parse("runc version 1.10.0") > RuncVersion::parse("runc version 1.9.9"),
            "compared as numbers"
        );
    }
}
