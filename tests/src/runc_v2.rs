//! A cgroup v2 node on any host ([`V2Plan`]): on a unified host containerd runs as it is; on a
//! hybrid or v1 host it runs in a private mount namespace with cgroup2 on `/sys/fs/cgroup`
//! ([`crate::node::NodeOptions::cgroup2`]). Where that cgroup2 root offers the controllers
//! runc writes CRI's resources with, the real runc runs and the tests check the resources in
//! the containers' cgroups; where it offers none (a hybrid host, whose controllers stay bound
//! to v1, like these machines), `podsnap-test-runc` goes first on containerd's `PATH` as `runc`
//! (src/bin/runc_v2.rs): it drops the `linux.resources` settings (all but `devices`) runc
//! cannot write there, logs what it dropped, then runs the real runc. Test-only.

use std::path::{Path, PathBuf};

use crate::host::CgroupMode;

use crate::node::NodeOptions;

/// The controllers runc writes CRI's resource settings with (`cpu.weight`, `memory.max`,
/// `pids.max`): a cgroup2 root offering all of them takes a pod's resources as they are.
pub const RESOURCE_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// How a cgroup v2 node runs on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V2Plan {
    /// The host is not unified: containerd gets a private mount namespace with cgroup2 on
    /// `/sys/fs/cgroup`.
    pub private_namespace: bool,
    /// The cgroup2 root offers [`RESOURCE_CONTROLLERS`]: the real runc runs and resource
    /// handling is tested; otherwise the stand-in runc drops the resources.
    pub resources: bool,
}

impl V2Plan {
    /// The plan for a host whose `/sys/fs/cgroup` is `host`, the cgroup2 root the node sees
    /// listing `controllers` (its `cgroup.controllers`).
    pub fn decide(host: CgroupMode, controllers: &str) -> Self {
        let offered: Vec<&str> = controllers.split_whitespace().collect();
        Self {
            private_namespace: host != CgroupMode::Unified,
            resources: RESOURCE_CONTROLLERS.iter().all(|c| offered.contains(c)),
        }
    }

    /// This host's plan: its layout at `/sys/fs/cgroup`, and the controllers of the cgroup2
    /// hierarchy a node would get (a cgroup2 mount in a private namespace is the hierarchy
    /// mounted at `/sys/fs/cgroup/unified` on a hybrid host).
    pub fn of_host() -> Self {
        let root = Path::new("/sys/fs/cgroup");
        let mode = CgroupMode::detect(root);
        let controllers = controllers_file(root, mode)
            .and_then(|f| std::fs::read_to_string(f).ok())
            .unwrap_or_default();
        Self::decide(mode, &controllers)
    }
}

/// Where the controllers of the cgroup2 hierarchy are listed on a host of layout `mode` whose
/// cgroups are mounted at `root` (none on a v1-only host: its controllers are all bound to v1).
pub fn controllers_file(root: &Path, mode: CgroupMode) -> Option<PathBuf> {
    match mode {
        CgroupMode::Unified => Some(root.join("cgroup.controllers")),
        CgroupMode::Hybrid => Some(root.join("unified/cgroup.controllers")),
        CgroupMode::Legacy => None,
    }
}

/// The runc a v2 node runs: the real one, or the stand-in (its directory and log, removed on
/// drop).
#[derive(Debug)]
pub struct RuncV2 {
    plan: V2Plan,
    dir: tempfile::TempDir,
}

impl RuncV2 {
    /// The runc for `plan`: with no resource controllers, `wrapper` (the `podsnap-test-runc`
    /// binary) as `runc` in a new directory.
    pub fn new(wrapper: &Path, plan: V2Plan) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("podsnap-runc-v2-")
            .tempdir()
            .expect("a directory for the stand-in runc");
        if !plan.resources {
            assert!(
                wrapper.is_file(),
                "the stand-in runc {} does not exist (cargo builds it for the tests)",
                wrapper.display()
            );
            std::os::unix::fs::symlink(wrapper, dir.path().join("runc")).expect("link the stand-in runc");
        }
        Self { plan, dir }
    }

    /// The plan this runc serves.
    pub fn plan(&self) -> V2Plan {
        self.plan
    }

    /// `options` for a cgroup v2 node of this plan: a private cgroup2 namespace unless the
    /// host is unified; the stand-in first on `PATH` unless the resources can be written.
    pub fn node_options(&self, mut options: NodeOptions) -> NodeOptions {
        options.cgroup2 = self.plan.private_namespace;
        if !self.plan.resources {
            let real = options.runc.clone();
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
        }
        options
    }

    /// The stand-in's log: one line per `create`/`run`/`restore`, `<command> <id> dropped:
    /// <key>=<json> ...` (never written when the real runc runs).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v2_host_with_controllers_runs_the_real_runc_without_a_namespace() {
        let plan = V2Plan::decide(
            CgroupMode::Unified,
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        );
        assert_eq!(
            plan,
            V2Plan {
                private_namespace: false,
                resources: true
            }
        );
        // The node it makes: containerd as it is, the real runc first (no stand-in, no log).
        let runc = RuncV2::new(Path::new("/nonexistent/podsnap-test-runc"), plan);
        let options = runc.node_options(NodeOptions::new(PathBuf::from("/bin/true")));
        assert!(!options.cgroup2, "no private namespace on a unified host");
        assert!(options.path_prefix.is_empty(), "{:?}", options.path_prefix);
        assert!(
            !options
                .extra_env
                .iter()
                .any(|(k, _)| k.starts_with("PODSNAP_TEST_")),
            "{:?}",
            options.extra_env
        );
        assert!(runc.lines().is_empty());
    }

    #[test]
    fn a_host_without_the_controllers_gets_the_stand_in_and_a_hybrid_one_a_namespace() {
        // These machines: hybrid, only hugetlb on the cgroup2 hierarchy.
        assert_eq!(
            V2Plan::decide(CgroupMode::Hybrid, "hugetlb\n"),
            V2Plan {
                private_namespace: true,
                resources: false
            }
        );
        // A unified host that delegates no controller, a v1 host, a partial set.
        assert_eq!(
            V2Plan::decide(CgroupMode::Unified, ""),
            V2Plan {
                private_namespace: false,
                resources: false
            }
        );
        assert!(V2Plan::decide(CgroupMode::Legacy, "").private_namespace);
        assert!(!V2Plan::decide(CgroupMode::Unified, "cpu memory").resources);
        // A hybrid host booted with cgroup_no_v1=all: its cgroup2 hierarchy has them.
        assert_eq!(
            V2Plan::decide(CgroupMode::Hybrid, "cpu memory pids"),
            V2Plan {
                private_namespace: true,
                resources: true
            }
        );
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            controllers_file(root, CgroupMode::Hybrid),
            Some(root.join("unified/cgroup.controllers"))
        );
        assert_eq!(
            controllers_file(root, CgroupMode::Unified),
            Some(root.join("cgroup.controllers"))
        );
        assert_eq!(controllers_file(root, CgroupMode::Legacy), None);
    }
}
