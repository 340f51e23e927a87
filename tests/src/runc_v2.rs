//! A cgroup v2 node on this hybrid machine: containerd in a private mount namespace with
//! cgroup2 on `/sys/fs/cgroup` ([`crate::node::NodeOptions::cgroup2`]) and, first on its `PATH`,
//! `podsnap-test-runc` as `runc` (src/bin/runc_v2.rs): it drops the `linux.resources` settings
//! (all but `devices`) that runc cannot write on a cgroup2 root without controllers, and logs
//! what it dropped, then runs the real runc. Test-only.

use std::path::{Path, PathBuf};

use crate::node::NodeOptions;

/// The stand-in runc's directory and log, removed on drop.
#[derive(Debug)]
pub struct RuncV2 {
    dir: tempfile::TempDir,
}

impl RuncV2 {
    /// Puts `wrapper` (the `podsnap-test-runc` binary) as `runc` into a new directory.
    pub fn new(wrapper: &Path) -> Self {
        assert!(
            wrapper.is_file(),
            "the stand-in runc {} does not exist (cargo builds it for the tests)",
            wrapper.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("podsnap-runc-v2-")
            .tempdir()
            .expect("a directory for the stand-in runc");
        std::os::unix::fs::symlink(wrapper, dir.path().join("runc")).expect("link the stand-in runc");
        Self { dir }
    }

    /// `options` for a cgroup v2 node whose runc is the stand-in.
    pub fn node_options(&self, mut options: NodeOptions) -> NodeOptions {
        let real = options.runc.clone();
        options.cgroup2 = true;
        options.path_prefix.insert(0, self.dir.path().to_path_buf());
        options.extra_env.extend([
            (
                "PODSNAP_TEST_REAL_RUNC".to_owned(),
                real.to_string_lossy().into_owned(),
            ),
            (
                "PODSNAP_TEST_RUNC_LOG".to_owned(),
                self.log().to_string_lossy().into_owned(),
            ),
        ]);
        options
    }

    /// One line per `create`/`run`/`restore`: `<command> <id> dropped: <key>=<json> ...`.
    pub fn log(&self) -> PathBuf {
        self.dir.path().join("dropped.log")
    }

    /// The log's lines.
    pub fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}
