//! podsnap-runtime: the layer that drives the OCI runtime (the runc CLI) and the kernel pieces a
//! container needs around it: bundles and specs, stdio plumbing (pipes, console sockets), cgroups
//! (v1, hybrid and v2; cgroupfs and systemd paths: freezing, statistics, OOM notification),
//! and the launching of external programs.
//!
//! It knows nothing of containerd, ttrpc or protobuf: the shim adapts its types to the task API.
//! Every external program is started through a [`launcher::Launcher`], so the shim can make the
//! real one wait through its child reaper, and unit tests can inject a fake. Cgroup and /proc
//! work goes through [`host::Host`] for the same reason (a scripted fake: feature `fake-host`).

pub mod bundle;
pub mod cgroup;
pub mod error;
pub mod host;
pub mod launcher;
pub mod mount;
pub mod mountinfo;
pub mod runc;
pub mod stdio;

pub use error::{Error, Result};
