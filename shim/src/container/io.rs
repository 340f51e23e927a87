//! A process's stdio: containerd's FIFOs or a terminal (through runc's console socket), the
//! pipes runc's process gets, and the copies between them; pid files; private writes.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use containerd_shim::asynchronous::io::{Pty, Stdio};
use podsnap_runtime::runc::ProcessStdio;
use podsnap_runtime::stdio::{self, ConsoleSocket, ShimEnds, Wanted};
use tokio::net::unix::pipe;

use super::{CONSOLE_DIR, CONSOLE_TIMEOUT};
use crate::error::{Error, Result};
use crate::process::{lock, Process};

/// Makes the pipes or console socket a process's stdio needs.
pub(crate) fn prepare_io(s: &Stdio) -> Result<(ProcessStdio, ShimEnds, Option<ConsoleSocket>)> {
    for path in [&s.stdin, &s.stdout, &s.stderr] {
        if path.contains("://") && !path.starts_with("fifo://") {
            return Err(Error::InvalidArgument(format!(
                "stdio {path}: only FIFO paths are supported by the podsnap shim"
            )));
        }
    }
    if s.terminal {
        std::fs::create_dir_all(CONSOLE_DIR)
            .map_err(|e| Error::Internal(format!("create {CONSOLE_DIR}: {e}")))?;
        let path = Path::new(CONSOLE_DIR).join(format!("{}-{}.sock", std::process::id(), unique()));
        let console = ConsoleSocket::bind(path).map_err(Error::runtime("make a console socket"))?;
        return Ok((ProcessStdio::default(), ShimEnds::default(), Some(console)));
    }
    let (process, ends) = stdio::pipes(Wanted {
        stdin: !s.stdin.is_empty(),
        stdout: !s.stdout.is_empty(),
        stderr: !s.stderr.is_empty(),
    })
    .map_err(Error::runtime("make stdio pipes"))?;
    Ok((process, ends, None))
}

/// Runs the runc command that starts a process (`create`, `exec`, `restore`) and, when the
/// process gets a terminal, attaches to it as soon as runc hands it over: before runc returns,
/// so a short-lived process cannot finish (and hang up its terminal) before its output is read.
pub(crate) async fn run_attached<F>(p: &Process, console: Option<ConsoleSocket>, run: F) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    let Some(console) = console else {
        return run.await;
    };
    let attach = async {
        let master = tokio::time::timeout(CONSOLE_TIMEOUT, console.receive_master())
            .await
            .map_err(|_| Error::Internal(format!("{}: runc sent no terminal", p.describe())))?
            .map_err(Error::runtime("receive the terminal"))?;
        attach_terminal(p, master)
    };
    tokio::pin!(run, attach);
    let mut attached: Option<Result<()>> = None;
    let ran = loop {
        tokio::select! {
            r = &mut run => break r,
            a = &mut attach, if attached.is_none() => attached = Some(a),
        }
    };
    ran?;
    match attached {
        Some(a) => a,
        None => attach.await,
    }
}

/// Copies between a terminal's master side and containerd's FIFOs.
fn attach_terminal(p: &Process, master: std::fs::File) -> Result<()> {
    let s = &p.stdio;
    let io_err = |e: containerd_shim::Error| Error::Internal(format!("{} stdio: {e}", p.describe()));
    let pty = Pty::new(master).map_err(io_err)?;
    if !s.stdin.is_empty() {
        p.io.copy_from_fifo(&fifo_path(&s.stdin), pty.clone())
            .map_err(io_err)?;
    }
    if !s.stdout.is_empty() {
        p.io.copy_to_fifo(pty.clone(), &fifo_path(&s.stdout))
            .map_err(io_err)?;
    }
    *lock(&p.pty) = Some(pty);
    Ok(())
}

/// Starts copying between a process's pipes and containerd's FIFOs (pipes keep what the
/// process wrote, so this can wait until runc returned).
pub(crate) fn connect_pipes(p: &Process, ends: ShimEnds) -> Result<()> {
    let s = &p.stdio;
    let io_err = |e: containerd_shim::Error| Error::Internal(format!("{} stdio: {e}", p.describe()));
    if let Some(w) = ends.stdin {
        p.io.copy_from_fifo(&fifo_path(&s.stdin), sender(w)?)
            .map_err(io_err)?;
    }
    if let Some(r) = ends.stdout {
        p.io.copy_to_fifo(receiver(r)?, &fifo_path(&s.stdout))
            .map_err(io_err)?;
    }
    if let Some(r) = ends.stderr {
        p.io.copy_to_fifo(receiver(r)?, &fifo_path(&s.stderr))
            .map_err(io_err)?;
    }
    Ok(())
}

fn fifo_path(path: &str) -> String {
    path.trim_start_matches("fifo://").to_string()
}

fn sender(fd: OwnedFd) -> Result<pipe::Sender> {
    pipe::Sender::from_owned_fd(fd).map_err(|e| Error::Internal(format!("stdin pipe: {e}")))
}

fn receiver(fd: OwnedFd) -> Result<pipe::Receiver> {
    pipe::Receiver::from_owned_fd(fd).map_err(|e| Error::Internal(format!("output pipe: {e}")))
}

pub(crate) async fn read_pid(path: &Path) -> Result<i32> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| Error::Internal(format!("read pid file {}: {e}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|_| Error::Internal(format!("pid file {} holds {text:?}", path.display())))
}

/// Writes a file only root can read (exec specs can carry secrets in their environment).
pub async fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (path, data) = (path.to_path_buf(), data.to_vec());
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&data))
            .map_err(|e| Error::Internal(format!("write {}: {e}", path.display())))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
