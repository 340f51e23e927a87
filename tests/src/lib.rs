//! podsnap's integration harness.
//!
//! Every integration test runs against real binaries, the way a node runs them: a private
//! containerd ([`node::Node`]) with its own root, state, sockets and CNI network, our shim found
//! through `PATH`, images built here from our own workload program ([`images`]), and pods made
//! the way kubelet makes them ([`kubelet`]) through CRI ([`cri`]) or by `ctr` ([`ctr`]).
//!
//! The tests share hard-coded host paths (`/run/containerd/{s,fifo,runc}`, `/var/run/netns`) and a
//! two-core machine, so one node runs at a time: [`node::Node::start`] takes a host-wide lock
//! ([`serial`]) that also serializes separate test processes (nextest, two `cargo test`s).
//!
//! A missing prerequisite is a test failure with a message saying what to install, never a skip.

pub mod checkpoint;
pub mod checkpoint_image;
pub mod cli;
pub mod command;
pub mod containerd_api;
pub mod cri;
pub mod ctr;
pub mod host;
pub mod host_node;
pub mod images;
pub mod kubelet;
pub mod node;
pub mod paths;
pub mod prereq;
pub mod registry;
pub mod runc_v2;
pub mod serial;
pub mod systemd;

/// The CRI runtime handler (and, through [`runtime_type`], the containerd runtime) the suite
/// tests. Flip to `"runc"` to check a test against containerd's Go runc shim, or set
/// `PODSNAP_TEST_HANDLER=runc` in the environment.
pub const HANDLER: &str = "podsnap";

/// The handler under test: `PODSNAP_TEST_HANDLER` if set, else [`HANDLER`].
pub fn handler() -> String {
    std::env::var("PODSNAP_TEST_HANDLER").unwrap_or_else(|_| HANDLER.to_owned())
}

/// The containerd runtime type behind a CRI handler of our node config.
pub fn runtime_type(handler: &str) -> &'static str {
    match handler {
        "runc" => "io.containerd.runc.v2",
        _ => "io.containerd.podsnap.v1",
    }
}

/// The shim binary that serves a runtime handler.
pub fn shim_binary(handler: &str) -> &'static str {
    match handler {
        "runc" => "containerd-shim-runc-v2",
        _ => PODSNAP_SHIM,
    }
}

/// podsnap's CNI IPAM plugin (built with the CLI, beside the shim).
pub const IPAM_PLUGIN: &str = "podsnap-cni-ipam";

/// Our shim's binary name.
pub const PODSNAP_SHIM: &str = "containerd-shim-podsnap-v1";

/// The sandbox image every pod of the private node uses.
pub const PAUSE_IMAGE: &str = "localhost/podsnap/pause:1";

/// The image with `podsnap-workload` and busybox.
pub const WORKLOAD_IMAGE: &str = "localhost/podsnap/workload:1";

/// Where `podsnap-workload` sits inside both images.
pub const WORKLOAD_IN_IMAGE: &str = "/usr/local/bin/podsnap-workload";

/// Starts a private node for an integration test, with the `podsnap-workload` binary cargo built
/// for this test crate (`env!("CARGO_BIN_EXE_podsnap-workload")` exists only in integration
/// tests and benches, so this is a macro expanded there).
#[macro_export]
macro_rules! start_node {
    () => {
        $crate::node::Node::start($crate::node::NodeOptions::new(::std::path::PathBuf::from(env!(
            "CARGO_BIN_EXE_podsnap-workload"
        ))))
    };
}
