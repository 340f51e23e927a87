//! The `.deb` of `packaging/deb.sh`, installed for real with `dpkg -i` on this Debian machine
//! and removed with `dpkg -r`, then purged with `dpkg -P`: the programs run from /usr/bin while
//! it is installed, and nothing of it is left after. The host-wide test lock is held throughout
//! (no other test runs a node meanwhile), and a guard purges the package if the test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PACKAGE: &str = "podsnap";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bins() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `dpkg-query` says the package is installed.
fn installed() -> bool {
    let out = run("dpkg-query", &["-W", "-f=${Status}", PACKAGE]);
    String::from_utf8_lossy(&out.stdout).contains("install ok installed")
}

/// Whether dpkg knows the package at all (a removed one keeps its record until purged).
fn known() -> bool {
    run("dpkg-query", &["-W", PACKAGE]).status.success()
}

/// Purges the package if a failed test left it installed.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if known() {
            let out = run("dpkg", &["-P", PACKAGE]);
            eprintln!("deb_package: purged after a failure: {}", text(&out));
        }
    }
}

#[test]
fn the_deb_installs_runs_and_is_removed_cleanly() {
    let _lock = podsnap_tests::serial::serial();
    assert!(
        !known(),
        "a podsnap package is already on this machine: remove it first (dpkg -P podsnap)"
    );
    assert!(
        !Path::new("/etc/podsnap/installed.json").exists(),
        "podsnap is installed on this machine's own containerd: the package's prerm would uninstall it"
    );
    let out_dir = tempfile::tempdir().expect("tempdir");
    let built = Command::new("bash")
        .arg(repo().join("packaging/deb.sh"))
        .arg("--binaries")
        .arg(bins())
        .arg("--output")
        .arg(out_dir.path())
        .output()
        .expect("packaging/deb.sh");
    assert!(built.status.success(), "deb.sh: {}", text(&built));
    let deb = String::from_utf8_lossy(&built.stdout).trim().to_owned();
    assert!(deb.ends_with("_amd64.deb"), "{deb}");

    let _purge = Purge;
    let out = run("dpkg", &["-i", &deb]);
    assert!(out.status.success(), "dpkg -i: {}", text(&out));
    assert!(installed());
    let listed = run("dpkg", &["-L", PACKAGE]);
    let files: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|f| Path::new(f).is_file())
        .collect();
    for wanted in [
        "/usr/bin/podsnap",
        "/usr/bin/containerd-shim-podsnap-v1",
        "/usr/bin/podsnap-cni-ipam",
    ] {
        assert!(files.iter().any(|f| f == wanted), "{wanted} in {files:?}");
    }
    let version = run("/usr/bin/podsnap", &["--version"]);
    assert!(
        version.status.success() && String::from_utf8_lossy(&version.stdout).starts_with("podsnap "),
        "the installed CLI runs: {}",
        text(&version)
    );
    let status = run(
        "/usr/bin/podsnap",
        &[
            "node",
            "status",
            "--host-root",
            out_dir.path().to_str().expect("utf8"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("installed    no"),
        "{}",
        text(&status)
    );

    let out = run("dpkg", &["-r", PACKAGE]);
    assert!(out.status.success(), "dpkg -r: {}", text(&out));
    assert!(!installed());
    for file in &files {
        assert!(!Path::new(file).exists(), "{file} left after dpkg -r");
    }
    let out = run("dpkg", &["-P", PACKAGE]);
    assert!(out.status.success(), "dpkg -P: {}", text(&out));
    assert!(!known(), "dpkg forgot the package");
    assert!(!Path::new("/usr/share/doc/podsnap").exists());
}
