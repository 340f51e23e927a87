//! A process's stdio plumbing: the pipes between the shim and a container process, and the
//! console socket through which runc hands back a terminal's master side.
//!
//! Container processes get pipes rather than containerd's FIFOs directly: the shim keeps copying
//! while containerd restarts, and CRIU can dump and restore pipes (runc records them in
//! `descriptors.json`), which it cannot do for a FIFO whose other end lives outside the container.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::runc::ProcessStdio;
use crate::{Error, Result};

/// The shim's ends of a process's stdio pipes.
#[derive(Debug, Default)]
pub struct ShimEnds {
    /// Write end of the process's stdin.
    pub stdin: Option<OwnedFd>,
    /// Read end of the process's stdout.
    pub stdout: Option<OwnedFd>,
    /// Read end of the process's stderr.
    pub stderr: Option<OwnedFd>,
}

/// Which of the three streams a process has.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wanted {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// Creates the pipes for a process; returns the process's ends (for runc) and the shim's.
pub fn pipes(wanted: Wanted) -> Result<(ProcessStdio, ShimEnds)> {
    let mut process = ProcessStdio::default();
    let mut shim = ShimEnds::default();
    if wanted.stdin {
        let (r, w) = pipe()?;
        process.stdin = Some(r);
        shim.stdin = Some(w);
    }
    if wanted.stdout {
        let (r, w) = pipe()?;
        process.stdout = Some(w);
        shim.stdout = Some(r);
    }
    if wanted.stderr {
        let (r, w) = pipe()?;
        process.stderr = Some(w);
        shim.stderr = Some(r);
    }
    Ok((process, shim))
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::sys("create a stdio pipe", e))
}

/// A listening unix socket runc connects to, to send a new terminal's master side.
#[derive(Debug)]
pub struct ConsoleSocket {
    path: PathBuf,
    listener: tokio::net::UnixListener,
}

impl ConsoleSocket {
    /// Listens at `path` (which must not exist yet; its directory must).
    pub fn bind(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| Error::io("listen on console socket", &path, e))?;
        Ok(Self { path, listener })
    }

    /// Where runc must connect (`--console-socket`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for runc to connect and send the terminal master; returns it.
    pub async fn receive_master(&self) -> Result<File> {
        let (stream, _) = self
            .listener
            .accept()
            .await
            .map_err(|e| Error::io("accept on console socket", &self.path, e))?;
        loop {
            stream
                .readable()
                .await
                .map_err(|e| Error::io("wait on console socket", &self.path, e))?;
            match stream.try_io(tokio::io::Interest::READABLE, || {
                recv_fd(stream.as_raw_fd()).map_err(std::io::Error::from)
            }) {
                Ok(Some(file)) => return Ok(file),
                Ok(None) => {
                    return Err(Error::Invalid {
                        what: "console socket message",
                        reason: "runc sent no file descriptor".into(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Error::io("receive the terminal from runc", &self.path, e)),
            }
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Receives one message and the first descriptor passed with it. Every other descriptor the
/// peer passed along is closed: each is owned the moment it is received.
fn recv_fd(sock: RawFd) -> nix::Result<Option<File>> {
    let mut name = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut name)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut received: Vec<OwnedFd> = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in our table for this message; nothing
                // else owns it, so the OwnedFd takes sole ownership (and closes it if unused).
                received.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    // The extras (a peer that sent more than the terminal) close as `received` drops.
    Ok(received.into_iter().next().map(File::from))
}

/// Sets a terminal's window size.
pub fn resize(master: &impl AsRawFd, width: u16, height: u16) -> Result<()> {
    let ws = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(Error::sys("resize the terminal", nix::Error::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn recv_fd_keeps_the_first_descriptor_and_closes_the_others() {
        use nix::sys::socket::{sendmsg, socketpair, AddressFamily, ControlMessage, SockFlag, SockType};
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("socketpair");
        let first = File::open("/dev/null").expect("open /dev/null");
        // The second descriptor is a pipe's write end: once every copy of it is closed, the
        // read end sees end-of-file.
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe");
        let fds = [first.as_raw_fd(), write_end.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(b"x")];
        sendmsg::<()>(theirs.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).expect("sendmsg");
        drop(write_end);
        drop(first);

        let got = recv_fd(ours.as_raw_fd()).expect("recv").expect("a descriptor");
        let meta = got.metadata().expect("fstat the received descriptor");
        let null = std::fs::metadata("/dev/null").expect("stat /dev/null");
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(meta.rdev(), null.rdev(), "the first descriptor is /dev/null");
        }

        // Other tests of this process may fork: a copy can live for the instant between a fork
        // and its exec, so allow a moment.
        let mut read = File::from(read_end);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut buf = [0u8; 1];
            match read.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => panic!("nothing was written to the pipe"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the second descriptor passed is still open"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    #[test]
    fn pipes_connect_process_and_shim_ends() {
        let (process, shim) = pipes(Wanted {
            stdin: true,
            stdout: true,
            stderr: false,
        })
        .expect("pipes");
        assert!(process.stderr.is_none() && shim.stderr.is_none());
        let mut w = File::from(process.stdout.expect("stdout"));
        w.write_all(b"hello").expect("write");
        drop(w);
        let mut r = File::from(shim.stdout.expect("stdout"));
        let mut s = String::new();
        r.read_to_string(&mut s).expect("read");
        assert_eq!(s, "hello");
    }
}
