//! The shim's side of a live migration's source (`podsnap migrate --to-node`, asked in the
//! dump request's `serve`): before the dump, the shim connects to the CLI's control socket
//! and to one socket per running container in the directory it names, and carries each
//! container's page stream between its CRIU and that socket ([`crate::page_stream`]). The pod
//! dump is lazy ([`podsnap_checkpoint::pod::dump::serve`]); once it returns, a task holds the
//! frozen pod until the CLI settles it on the control socket, one line each way:
//!
//! ```text
//! CLI -> shim   switched     the target runs the pod: from now on a loss keeps it frozen here
//!               release      every page went: stop the pod at its snapshot
//!               abort        before the switch: resume the pod as it was
//! shim -> CLI   released N   (N processes killed) | failed REASON
//! ```
//! The control socket ending before a word (the CLI died, SIGKILL included) is `abort` before
//! `switched` and, after it, leaves the pod frozen and locked (see `ServedPod::abandon`).

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use podsnap_checkpoint::format::layout::{serve_socket, SERVE_CONTROL};
use podsnap_checkpoint::pod::dump::{Serve, ServedPod};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::error::{Error, Result};

/// The sockets of a lazy dump, connected.
pub struct Connected {
    control: UnixStream,
    pub serve: Serve,
    /// The shim's ends of CRIU's sockets: open until the pod is settled.
    keep: Vec<Arc<UnixStream>>,
}

/// Connects to the CLI's sockets in `dir` for the containers `names` (the running ones) and
/// starts carrying their page streams.
pub fn connect(dir: &Path, names: &[String]) -> Result<Connected> {
    let failed = |what: &Path, e: std::io::Error| {
        Error::FailedPrecondition(format!("live migration: connect to {}: {e}", what.display()))
    };
    let control_path = dir.join(SERVE_CONTROL);
    let control = UnixStream::connect(&control_path).map_err(|e| failed(&control_path, e))?;
    let mut sockets = HashMap::new();
    let mut keep = Vec::new();
    for name in names {
        let path = serve_socket(dir, name);
        let outer = UnixStream::connect(&path).map_err(|e| failed(&path, e))?;
        let (criu, shim) = crate::page_stream::pair().map_err(|e| failed(&path, e))?;
        let stream = name.clone();
        crate::page_stream::carry(
            name.clone(),
            outer,
            shim.clone(),
            Box::new(move |why| log::warn!("page stream of container {stream}: {why}")),
        )
        .map_err(|e| failed(&path, e))?;
        sockets.insert(name.clone(), Arc::new(criu));
        keep.push(shim);
    }
    Ok(Connected {
        control,
        serve: Serve { sockets },
        keep,
    })
}

/// How long the last runc may take to end once the CLI says every page went.
const RELEASE_WITHIN: Duration = Duration::from_secs(60);

/// Holds the served pod until the CLI settles it (see the module documentation).
pub fn settle(pod: String, served: ServedPod, connected: Connected) {
    let Connected { control, serve, keep } = connected;
    tokio::spawn(async move {
        let control = match control
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(control))
        {
            Ok(c) => c,
            Err(e) => {
                log::error!("pod {pod}: live migration control: {e}");
                served.abandon().await;
                return;
            }
        };
        let (read, mut write) = control.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut switched = false;
        loop {
            let line = lines.next_line().await;
            match line.as_ref().map(|l| l.as_deref().map(str::trim)) {
                Ok(Some("switched")) => {
                    log::info!(
                        "pod {pod}: the target runs the pod: it stays frozen here until every page went"
                    );
                    switched = true;
                }
                Ok(Some("release")) => {
                    let answer = match served.release(RELEASE_WITHIN).await {
                        Ok(killed) => format!("released {killed}\n"),
                        Err(e) => format!("failed {}\n", e.to_string().replace('\n', " ")),
                    };
                    let _ = write.write_all(answer.as_bytes()).await;
                    break;
                }
                Ok(Some("abort")) => {
                    served.abort().await;
                    let _ = write.write_all(b"aborted\n").await;
                    break;
                }
                Ok(Some(other)) => {
                    log::warn!("pod {pod}: live migration control: ignored {other:?}");
                }
                Ok(None) | Err(_) => {
                    match switched {
                        false => {
                            log::warn!("pod {pod}: the migration's control ended before the switch: resuming the pod");
                            served.abort().await;
                        }
                        true => {
                            log::error!("pod {pod}: the migration's control ended after the switch");
                            served.abandon().await;
                        }
                    }
                    break;
                }
            }
        }
        // Settled: CRIU is gone; its sockets may close.
        drop(serve);
        for shim in keep {
            let _ = shim.shutdown(std::net::Shutdown::Both);
        }
    });
}
