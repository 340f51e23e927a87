//! `containerd-shim-podsnap-v1`: the containerd runtime shim of podsnap (`io.containerd.podsnap.v1`).
//!
//! One shim process serves a whole pod: containers are grouped by their CRI sandbox id. The shim
//! is a thin adapter from containerd's task API to `podsnap-runtime` (runc) and
//! `podsnap-checkpoint`; protobuf stays in this crate.

mod container;
mod convert;
mod error;
mod events;
mod exits;
mod info;
mod lazy_pages;
mod metrics;
mod oom;
mod options;
mod page_stream;
mod pod;
mod process;
mod restore;
mod service;
mod spans;
mod task;
mod task_event;

/// The runtime type containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.podsnap.v1";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    spans::install();
    containerd_shim::asynchronous::run::<service::PodShim>(RUNTIME_ID, None).await;
}
