//! A live migration's page streams through the shim. CRIU speaks its page-server protocol on a
//! socket of a socketpair (its `ps-socket`, inherited); the shim carries the bytes between the
//! other end (inner) and a unix socket of the podsnap CLI that carries the migration between
//! nodes (outer), unchanged, both ways, with two threads.
//!
//! The shim stands in between for one reason: CRIU must never see an end of file it did not
//! ask for. On the source, CRIU's page server takes an end of file between two requests as the
//! normal end of the transfer; on the target, the lazy-pages daemon that loses its source
//! lets the kernel fill every missing page with zeros and the restored processes run on them.
//! So when the outer side ends first (the CLI died, the other node was lost), the inner side is
//! left open: the caller decides (the source keeps its pod frozen; the target kills its
//! container first, and only then closes the daemon's socket).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The copy buffer of each direction.
const BUFFER: usize = 1 << 20;

/// Carries the stream `name` between `outer` and `inner` on two threads. When `inner` ends
/// (CRIU closed its socket), `outer`'s sending side is shut: the CLI sees the stream's end.
/// When `outer` ends or fails first, `on_lost` runs with why, on the copying thread, and
/// `inner` is left as it is.
pub fn carry(
    name: String,
    outer: UnixStream,
    inner: Arc<UnixStream>,
    on_lost: Box<dyn FnOnce(String) + Send>,
) -> std::io::Result<()> {
    let outer = Arc::new(outer);
    let inner_done = Arc::new(AtomicBool::new(false));
    {
        let (outer, inner, done, name) = (outer.clone(), inner.clone(), inner_done.clone(), name.clone());
        std::thread::Builder::new()
            .name("pages-out".into())
            .spawn(move || {
                let ended = copy(&inner, &outer);
                done.store(true, Ordering::SeqCst);
                match ended {
                    Ok(bytes) => log::info!("page stream {name}: CRIU ended it ({bytes} bytes sent)"),
                    Err(e) => log::warn!("page stream {name}: sending stopped: {e}"),
                }
                let _ = outer.shutdown(std::net::Shutdown::Write);
            })?;
    }
    std::thread::Builder::new()
        .name("pages-in".into())
        .spawn(move || {
            let ended = copy(&outer, &inner);
            if inner_done.load(Ordering::SeqCst) {
                return;
            }
            let why = match ended {
                Ok(_) => "the migration's other end closed the stream before CRIU was done".to_owned(),
                Err(e) => format!("the migration's stream failed: {e}"),
            };
            on_lost(why);
        })?;
    Ok(())
}

/// Copies `from` to `to` until `from` ends; the bytes copied.
fn copy(from: &UnixStream, to: &UnixStream) -> std::io::Result<u64> {
    let mut buf = vec![0u8; BUFFER];
    let mut total = 0u64;
    let (mut from, mut to) = (from, to);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// A socketpair: (the end CRIU inherits, the shim's end).
pub fn pair() -> std::io::Result<(std::os::fd::OwnedFd, Arc<UnixStream>)> {
    let (criu, shim) = UnixStream::pair()?;
    Ok((criu.into(), Arc::new(shim)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_go_both_ways_and_the_inner_end_is_told_to_the_outer() {
        let (outer_cli, outer_shim) = UnixStream::pair().expect("pair");
        let (inner_criu, inner_shim) = UnixStream::pair().expect("pair");
        let (tx, rx) = std::sync::mpsc::channel();
        carry(
            "t".into(),
            outer_shim,
            Arc::new(inner_shim),
            Box::new(move |why| {
                let _ = tx.send(why);
            }),
        )
        .expect("carry");
        let (mut cli, mut criu) = (&outer_cli, &inner_criu);
        cli.write_all(b"request").expect("write");
        let mut got = [0u8; 7];
        criu.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"request");
        criu.write_all(b"pages").expect("write");
        let mut got = [0u8; 5];
        cli.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"pages");
        // CRIU ends: the CLI sees the end; then the CLI's close is no loss.
        drop(inner_criu);
        let mut rest = Vec::new();
        cli.read_to_end(&mut rest).expect("end");
        assert!(rest.is_empty());
        drop(outer_cli);
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(),
            "an end after CRIU's is no loss"
        );
    }

    #[test]
    fn the_outer_end_lost_first_is_told_and_never_reaches_criu() {
        let (outer_cli, outer_shim) = UnixStream::pair().expect("pair");
        let (inner_criu, inner_shim) = UnixStream::pair().expect("pair");
        let (tx, rx) = std::sync::mpsc::channel();
        let inner_shim = Arc::new(inner_shim);
        carry(
            "t".into(),
            outer_shim,
            inner_shim.clone(),
            Box::new(move |why| {
                let _ = tx.send(why);
            }),
        )
        .expect("carry");
        drop(outer_cli);
        let why = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the loss is told");
        assert!(why.contains("closed the stream before CRIU was done"), "{why}");
        // CRIU's end sees no end of file while the shim holds the inner end.
        inner_criu
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        let read = (&inner_criu).read(&mut buf);
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "CRIU saw {read:?}"
        );
    }
}
