//! `podsnap-workload`: the program our test images run.
//!
//! One small, single-threaded binary with a few roles, so a pod's state is easy to observe and
//! survives a CRIU checkpoint (no helper threads, no timers outside the main loop):
//!
//! - `pause`: the sandbox's pause process. Sleeps, reaps children, exits 0 on SIGTERM/SIGINT.
//! - `serve --name N --port P [--volume DIR] [--interval-ms MS] [--log-every TICKS]`: keeps an
//!   in-memory counter that advances once per interval, appends a line to `DIR/N.log` and prints a
//!   line to stdout every `TICKS` ticks, and answers a line protocol on `0.0.0.0:P`:
//!   - `count` -> the counter; `ping` -> `pong N`; `pid` -> its pid (in its PID namespace);
//!   - `shm-write KEY VAL` / `shm-read KEY`: a SysV shared memory segment with ipc key KEY;
//!   - `posix-shm-write NAME VAL` / `posix-shm-read NAME`: the file `/dev/shm/NAME`;
//!   - `get HOST:PORT CMD`: sends CMD to another server and answers its reply;
//!   - `touch PATH`: writes a file (in the container's rootfs or a volume);
//!   - `exit CODE`: answers `bye` and exits with CODE;
//!   - `held`: the state of the `--hold-file` descriptor (`fd N path P pos X flags 0O`);
//!   - `loop-check`: sends a line each way over every `--loopback-pairs` connection
//!     (`loop ok pairs=N checks=K ports=P,...`);
//!   - `ballast-sum`: a checksum of the `--ballast-mib` memory (`ballast MiB sum S`);
//!   - `ipc-check`: the `--ipc-probe` objects as this process sees them, through the mappings
//!     it made at start (`ipc shm S sem A,B msg N FIRST posix P`);
//!   - `spawn-daemon PORT`: starts a server on PORT that daemonizes (double fork): its parent
//!     exits, so it is adopted (by the pod's pause process when the pod shares one PID
//!     namespace); answers its pid;
//!   - `spawn-child SKIP`: lets SKIP short-lived processes come and go (the PID namespace's
//!     next ids pass by), then starts a `pause` child that stays in its process tree; answers
//!     the child's pid;
//!   - `peer-connect tcp HOST:PORT` / `peer-connect unix PATH`: opens a connection to another
//!     server and keeps it; `peer-check`: sends `ping` over that same connection
//!     (`peer ok kind K local L checks N reply R`); `peer-send CMD`: sends CMD over it and
//!     leaves the reply unread (`sent`); `peer-read`: reads the next line (`peer read R`);
//!     `peer-pending`: how many bytes wait unread on it (`pending N`).
//!
//!   Checkpoint/restore probes (all off by default): `--hold-file PATH` opens PATH with
//!   O_APPEND at start, keeps it open and appends a line every tick; `--loopback-pairs N` makes
//!   N TCP connections to its own listener over 127.0.0.1 at start and keeps both ends;
//!   `--ballast-mib N` allocates N MiB and writes every page (`--ballast-content uniform`: one
//!   byte value per page; `mixed`: a quarter each of such pages, random bytes, text and
//!   pointer-like words, closer to a real heap for compression); `--ipc-probe KEY` makes a SysV
//!   segment (key KEY, kept attached), a semaphore set (KEY+1) and a queue of two messages
//!   (KEY+2), and a `/dev/shm/probe-KEY` file kept mapped (not open); `--unix-listen PATH`
//!   also answers the line protocol on a unix socket bound at PATH (`@NAME`: NAME in the
//!   abstract namespace; `peer-connect unix` takes the same); `--children N` forks N child
//!   processes at start, each writing every page of `--child-kib K` KiB of its own memory
//!   (default 64) and then sleeping until SIGTERM/SIGINT (a container of many processes).
//!
//!   Every reply is one line; a failure is `error: <what>`.
//! - `init --marker FILE`: appends one line to FILE and exits 0 (an init container).
//! - `client HOST:PORT CMD...`: sends CMD, prints the reply; exits 1 when the server cannot be
//!   reached and 2 when it answered `error: ...`.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A unix socket address: `@NAME` is NAME in the abstract namespace (of the network
/// namespace), anything else a path.
fn unix_address(address: &str) -> Result<std::os::unix::net::SocketAddr, String> {
    use std::os::linux::net::SocketAddrExt;
    match address.strip_prefix('@') {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()),
        None => std::os::unix::net::SocketAddr::from_pathname(address),
    }
    .map_err(|e| format!("unix address {address:?}: {e}"))
}

/// How long `get` and `client` wait to connect, and then for a reply.
const NET_TIMEOUT: Duration = Duration::from_secs(5);
/// Size of the SysV segments `shm-write` creates.
const SHM_SIZE: usize = 4096;
/// A client that sends more than this without a newline is dropped.
const MAX_LINE: usize = 64 * 1024;

const USAGE: &str = "usage:
  podsnap-workload pause
  podsnap-workload serve --name N --port P [--volume DIR] [--interval-ms 100] [--log-every 10]
                         [--hold-file PATH] [--loopback-pairs N] [--ballast-mib N]
                         [--ballast-content uniform|mixed]
                         [--ipc-probe KEY] [--unix-listen PATH] [--children N]
                         [--child-kib K]
  podsnap-workload init --marker FILE
  podsnap-workload client HOST:PORT CMD...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("pause") => pause(),
        Some("serve") => ServeOptions::parse(&args[1..]).and_then(serve),
        Some("init") => init(&args[1..]),
        Some("client") => return client(&args[1..]),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("podsnap-workload: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a line to stdout, ignoring a closed pipe (the shim may be gone; we keep running).
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn errno_message(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

// ---------------------------------------------------------------------------------------------
// pause

fn pause() -> Result<(), String> {
    // SAFETY: a zeroed sigset_t is a valid argument for sigemptyset, which initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t for each call.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed. Blocking these signals
    // lets sigwait collect them; as PID 1 they would otherwise be ignored.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } != 0 {
        return Err(errno_message("sigprocmask"));
    }
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` is initialised and `signal` is a valid out pointer.
        let rc = unsafe { libc::sigwait(&set, &mut signal) };
        if rc != 0 {
            continue;
        }
        match signal {
            libc::SIGTERM | libc::SIGINT => return Ok(()),
            _ => reap_children(),
        }
    }
}

fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG and a valid status pointer has no other preconditions.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// init

fn init(args: &[String]) -> Result<(), String> {
    let flags = parse_flags(args, &["--marker"])?;
    let marker = flags
        .get("--marker")
        .ok_or_else(|| format!("init needs --marker FILE\n{USAGE}"))?;
    let line = format!("init ran pid={} at={}\n", std::process::id(), unix_seconds());
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(marker)
        .and_then(|mut file| file.write_all(line.as_bytes()))
        .map_err(|e| format!("cannot append to {marker}: {e}"))?;
    say(&format!("init wrote {marker}"));
    Ok(())
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// client

fn client(args: &[String]) -> ExitCode {
    let Some((address, command)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(1);
    };
    if command.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(1);
    }
    match request(address, &command.join(" ")) {
        Ok(reply) => {
            say(&reply);
            if reply.starts_with("error:") {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(message) => {
            eprintln!("podsnap-workload client: {message}");
            ExitCode::from(1)
        }
    }
}

/// Sends one command line to `address` and returns the reply line.
fn request(address: &str, command: &str) -> Result<String, String> {
    let target: SocketAddr = address
        .to_socket_addrs()
        .map_err(|e| format!("bad address {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("bad address {address}"))?;
    let mut stream = TcpStream::connect_timeout(&target, NET_TIMEOUT)
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    stream
        .set_read_timeout(Some(NET_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(NET_TIMEOUT)))
        .and_then(|()| stream.write_all(format!("{command}\n").as_bytes()))
        .map_err(|e| format!("cannot send to {address}: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("no reply from {address}: {e}"))?;
    if reply.is_empty() {
        return Err(format!("{address} closed the connection without a reply"));
    }
    Ok(reply.trim_end().to_owned())
}

// ---------------------------------------------------------------------------------------------
// serve

struct ServeOptions {
    name: String,
    port: u16,
    volume: Option<PathBuf>,
    interval: Duration,
    log_every: u64,
    hold_file: Option<PathBuf>,
    loopback_pairs: usize,
    ballast_mib: usize,
    ballast_mixed: bool,
    ipc_probe: Option<libc::key_t>,
    unix_listen: Option<PathBuf>,
    children: usize,
    child_kib: usize,
}

impl ServeOptions {
    fn parse(args: &[String]) -> Result<Self, String> {
        let flags = parse_flags(
            args,
            &[
                "--name",
                "--port",
                "--volume",
                "--interval-ms",
                "--log-every",
                "--hold-file",
                "--loopback-pairs",
                "--ballast-mib",
                "--ballast-content",
                "--ipc-probe",
                "--unix-listen",
                "--children",
                "--child-kib",
            ],
        )?;
        let name = flags
            .get("--name")
            .ok_or_else(|| format!("serve needs --name\n{USAGE}"))?
            .clone();
        let port = flags
            .get("--port")
            .ok_or_else(|| format!("serve needs --port\n{USAGE}"))?
            .parse()
            .map_err(|e| format!("--port: {e}"))?;
        let interval_ms: u64 = match flags.get("--interval-ms") {
            Some(v) => v.parse().map_err(|e| format!("--interval-ms: {e}"))?,
            None => 100,
        };
        let log_every: u64 = match flags.get("--log-every") {
            Some(v) => v.parse().map_err(|e| format!("--log-every: {e}"))?,
            None => 10,
        };
        Ok(Self {
            name,
            port,
            volume: flags.get("--volume").map(PathBuf::from),
            interval: Duration::from_millis(interval_ms.max(1)),
            log_every: log_every.max(1),
            hold_file: flags.get("--hold-file").map(PathBuf::from),
            loopback_pairs: count_flag(&flags, "--loopback-pairs")?,
            ballast_mib: count_flag(&flags, "--ballast-mib")?,
            ballast_mixed: match flags.get("--ballast-content").map(String::as_str) {
                None | Some("uniform") => false,
                Some("mixed") => true,
                Some(other) => return Err(format!("--ballast-content: {other:?} is not uniform or mixed")),
            },
            ipc_probe: flags.get("--ipc-probe").map(|k| parse_key(k)).transpose()?,
            unix_listen: flags.get("--unix-listen").map(PathBuf::from),
            children: count_flag(&flags, "--children")?,
            child_kib: match flags.get("--child-kib") {
                Some(v) => v.parse().map_err(|e| format!("--child-kib: {e}"))?,
                None => 64,
            },
        })
    }
}

/// The signal that asked us to stop, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signal: libc::c_int) {
    STOP_SIGNAL.store(signal, Ordering::SeqCst);
}

fn install_stop_handlers() -> Result<(), String> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; we fill in the handler and an empty mask. No
        // SA_RESTART, so a signal interrupts poll() and the loop sees the flag at once.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(errno_message("sigaction"));
        }
    }
    Ok(())
}

/// A connection the server answers: over TCP or a unix socket.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }

    fn set_timeouts(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s
                .set_read_timeout(Some(NET_TIMEOUT))
                .and_then(|()| s.set_write_timeout(Some(NET_TIMEOUT))),
            Stream::Unix(s) => s
                .set_read_timeout(Some(NET_TIMEOUT))
                .and_then(|()| s.set_write_timeout(Some(NET_TIMEOUT))),
        }
    }

    /// Where this end is: the local TCP port, or the socket's inode for a unix socket.
    fn local(&self) -> String {
        match self {
            Stream::Tcp(s) => s.local_addr().map(|a| a.port().to_string()).unwrap_or_default(),
            Stream::Unix(s) => std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd()))
                .map(|l| l.display().to_string())
                .unwrap_or_default(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Connection {
    stream: Stream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// The peer shut its side down: answer what is buffered, then close.
    eof: bool,
}

struct Server {
    options: ServeOptions,
    counter: u64,
    probes: Probes,
}

/// What a checkpoint must carry over besides the counter: an open file, established loopback
/// connections, dirtied memory.
#[derive(Default)]
struct Probes {
    held: Option<(std::fs::File, PathBuf)>,
    pairs: Vec<LoopbackPair>,
    ballast: Vec<u8>,
    ballast_mixed: bool,
    ipc: Option<IpcProbe>,
    /// A kept connection to another server (`peer-connect`), and how often it was checked.
    peer: Option<(Stream, &'static str, u64)>,
}

/// SysV objects and a mapped `/dev/shm` file, made at start.
struct IpcProbe {
    shm: *mut u8,
    sem: libc::c_int,
    msg: libc::c_int,
    posix: *mut u8,
}

/// Size of the probe's SysV segment and `/dev/shm` file.
const PROBE_SIZE: usize = 64 * 1024;

/// Both ends of one TCP connection to our own listener.
struct LoopbackPair {
    client: TcpStream,
    server: TcpStream,
    checks: u64,
}

/// The page size the ballast is written in.
const PAGE: usize = 4096;

fn serve(options: ServeOptions) -> Result<(), String> {
    install_stop_handlers()?;
    for index in 0..options.children {
        spawn_sleeper(index, options.child_kib)?;
    }
    let listener = TcpListener::bind(("0.0.0.0", options.port))
        .map_err(|e| format!("cannot listen on 0.0.0.0:{}: {e}", options.port))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    say(&format!(
        "{} serving on 0.0.0.0:{} pid={}",
        options.name,
        options.port,
        std::process::id()
    ));
    let unix_listener = match &options.unix_listen {
        Some(path) => {
            let l = UnixListener::bind_addr(&unix_address(&path.to_string_lossy())?)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            l.set_nonblocking(true)
                .map_err(|e| format!("unix listener: {e}"))?;
            Some(l)
        }
        None => None,
    };
    let probes = Probes::open(&options, &listener)?;
    let mut server = Server {
        options,
        counter: 0,
        probes,
    };
    let mut connections: Vec<Connection> = Vec::new();
    let mut next_tick = Instant::now() + server.options.interval;

    loop {
        let stop = STOP_SIGNAL.load(Ordering::SeqCst);
        if stop != 0 {
            say(&format!(
                "{} stopping on signal {stop} at count {}",
                server.options.name, server.counter
            ));
            return Ok(());
        }

        let mut fds = Vec::with_capacity(connections.len() + 2);
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // The unix listener, when there is one, polled in place of a second TCP one.
        fds.push(libc::pollfd {
            fd: unix_listener.as_ref().map_or(-1, |l| l.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        });
        for connection in &connections {
            let mut events = libc::POLLIN;
            if !connection.output.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: connection.stream.fd(),
                events,
                revents: 0,
            });
        }
        let wait = next_tick.saturating_duration_since(Instant::now());
        let timeout = libc::c_int::try_from(wait.as_millis().max(1)).unwrap_or(1000);
        let nfds = libc::nfds_t::try_from(fds.len()).map_err(|e| format!("poll: {e}"))?;
        // SAFETY: `fds` is a live, exclusively borrowed array of `nfds` pollfd structs.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {error}"));
        }

        if Instant::now() >= next_tick {
            server.tick();
            next_tick = Instant::now() + server.options.interval;
        }

        if fds[0].revents != 0 {
            accept_all(&listener, &mut connections);
        }
        if let Some(l) = unix_listener.as_ref().filter(|_| fds[1].revents != 0) {
            accept_all_unix(l, &mut connections);
        }
        // Connections accepted just now are not in `fds`; they are polled next round.
        for (connection, pollfd) in connections.iter_mut().zip(&fds[2..]) {
            if pollfd.revents != 0 {
                server.service(connection);
            }
        }
        connections.retain(|c| !(c.eof && c.output.is_empty()));
    }
}

fn accept_all(listener: &TcpListener, connections: &mut Vec<Connection>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_ok() {
                    connections.push(Connection {
                        stream: Stream::Tcp(stream),
                        input: Vec::new(),
                        output: Vec::new(),
                        eof: false,
                    });
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // WouldBlock: nothing more to accept. Other errors (EMFILE, a reset peer) are
            // transient for us: try again on the next readiness.
            Err(_) => return,
        }
    }
}

fn accept_all_unix(listener: &UnixListener, connections: &mut Vec<Connection>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_ok() {
                    connections.push(Connection {
                        stream: Stream::Unix(stream),
                        input: Vec::new(),
                        output: Vec::new(),
                        eof: false,
                    });
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

impl Probes {
    /// Opens what `options` asks for. Runs before the listener has served anyone, so every
    /// connection it accepts is one of its own pairs.
    fn open(options: &ServeOptions, listener: &TcpListener) -> Result<Self, String> {
        let mut probes = Probes::default();
        if let Some(path) = &options.hold_file {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            probes.held = Some((file, path.clone()));
        }
        for _ in 0..options.loopback_pairs {
            let client = TcpStream::connect(("127.0.0.1", options.port))
                .map_err(|e| format!("loopback connect: {e}"))?;
            let deadline = Instant::now() + NET_TIMEOUT;
            let server = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => return Err(format!("loopback accept: {e}")),
                }
            };
            for stream in [&client, &server] {
                stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_read_timeout(Some(NET_TIMEOUT)))
                    .map_err(|e| format!("loopback pair: {e}"))?;
            }
            probes.pairs.push(LoopbackPair {
                client,
                server,
                checks: 0,
            });
        }
        let bytes = options.ballast_mib * 1024 * 1024;
        let mut ballast = vec![0u8; bytes];
        for (index, page) in ballast.chunks_mut(PAGE).enumerate() {
            fill_page(page, index, options.ballast_mixed);
        }
        probes.ballast = ballast;
        probes.ballast_mixed = options.ballast_mixed;
        if let Some(key) = options.ipc_probe {
            probes.ipc = Some(IpcProbe::make(key)?);
        }
        Ok(probes)
    }

    /// `ipc-check`: reads every probe object through what this process attached at start.
    fn ipc_check(&self) -> Result<String, String> {
        let ipc = self.ipc.as_ref().ok_or("no --ipc-probe")?;
        // SAFETY: both mappings are PROBE_SIZE bytes long and stay mapped for the process's
        // life.
        let (shm, posix) = unsafe {
            (
                std::slice::from_raw_parts(ipc.shm, PROBE_SIZE),
                std::slice::from_raw_parts(ipc.posix, PROBE_SIZE),
            )
        };
        let mut values = [0u16; 2];
        // SAFETY: GETALL writes one unsigned short per semaphore (the set has two).
        if unsafe { libc::semctl(ipc.sem, 0, libc::GETALL, values.as_mut_ptr()) } != 0 {
            return Err(errno_message("semctl GETALL"));
        }
        // SAFETY: IPC_STAT into a zeroed buffer.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: `ds` is a valid out pointer.
        if unsafe { libc::msgctl(ipc.msg, libc::IPC_STAT, &mut ds) } != 0 {
            return Err(errno_message("msgctl IPC_STAT"));
        }
        let mut buf = [0u8; 8 + 256];
        // SAFETY: `buf` is an mtype and 256 bytes; MSG_COPY (0o40000) leaves the message queued.
        let n = unsafe {
            libc::msgrcv(
                ipc.msg,
                buf.as_mut_ptr().cast(),
                256,
                0,
                libc::IPC_NOWAIT | 0o40000,
            )
        };
        if n < 0 {
            return Err(errno_message("msgrcv MSG_COPY"));
        }
        let first = String::from_utf8_lossy(&buf[8..8 + n as usize]).into_owned();
        Ok(format!(
            "ipc shm {} sem {},{} msg {} {first} posix {}",
            checksum(shm),
            values[0],
            values[1],
            ds.msg_qnum,
            checksum(posix)
        ))
    }

    /// `peer-connect KIND ADDRESS`.
    fn peer_connect(&mut self, rest: &str) -> Result<String, String> {
        let (kind, address) = two_args(rest, "peer-connect tcp|unix ADDRESS")?;
        let stream = match kind {
            "tcp" => Stream::Tcp(
                TcpStream::connect(address).map_err(|e| format!("cannot connect to {address}: {e}"))?,
            ),
            "unix" => Stream::Unix(
                UnixStream::connect_addr(&unix_address(address)?)
                    .map_err(|e| format!("cannot connect to {address}: {e}"))?,
            ),
            other => return Err(format!("peer-connect: unknown kind {other:?}")),
        };
        stream.set_timeouts().map_err(|e| format!("peer: {e}"))?;
        let kind = if kind == "tcp" { "tcp" } else { "unix" };
        self.peer = Some((stream, kind, 0));
        Ok("ok".to_owned())
    }

    /// `peer-check`: one `ping` over the kept connection.
    fn peer_check(&mut self) -> Result<String, String> {
        self.peer_send("ping")?;
        let reply = self.peer_line()?;
        let (stream, kind, checks) = self.peer.as_mut().ok_or("no peer-connect")?;
        *checks += 1;
        Ok(format!(
            "peer ok kind {kind} local {} checks {checks} reply {reply}",
            stream.local(),
        ))
    }

    /// `peer-send CMD`: sends CMD over the kept connection and leaves the reply unread.
    fn peer_send(&mut self, command: &str) -> Result<String, String> {
        let (stream, _, _) = self.peer.as_mut().ok_or("no peer-connect")?;
        stream
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| format!("peer send: {e}"))?;
        Ok("sent".to_owned())
    }

    /// `peer-pending`: how many bytes wait unread on the kept connection (`FIONREAD`).
    fn peer_pending(&self) -> Result<String, String> {
        let (stream, _, _) = self.peer.as_ref().ok_or("no peer-connect")?;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which is valid.
        if unsafe { libc::ioctl(stream.fd(), libc::FIONREAD, &mut n) } != 0 {
            return Err(errno_message("ioctl FIONREAD"));
        }
        Ok(format!("pending {n}"))
    }

    /// `peer-read`: the next line from the kept connection.
    fn peer_line(&mut self) -> Result<String, String> {
        let (stream, _, _) = self.peer.as_mut().ok_or("no peer-connect")?;
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            match stream.read(&mut byte) {
                Ok(0) => return Err("peer closed the connection".to_owned()),
                Ok(_) => reply.push(byte[0]),
                Err(e) => return Err(format!("peer receive: {e}")),
            }
        }
        Ok(String::from_utf8_lossy(&reply).trim().to_owned())
    }

    /// `held`: the descriptor's number, path, offset and flags as the kernel reports them.
    fn held(&self) -> Result<String, String> {
        let (file, path) = self.held.as_ref().ok_or("no --hold-file")?;
        let fd = file.as_raw_fd();
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map_err(|e| format!("fd {fd} of {}: {e}", path.display()))?;
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .map_err(|e| format!("fdinfo {fd}: {e}"))?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                .unwrap_or_default()
        };
        Ok(format!(
            "fd {fd} path {} pos {} flags {}",
            target.display(),
            field("pos:"),
            field("flags:")
        ))
    }

    /// `loop-check`: one line each way over every pair.
    fn loop_check(&mut self) -> Result<String, String> {
        if self.pairs.is_empty() {
            return Err("no --loopback-pairs".to_owned());
        }
        let mut ports = Vec::new();
        for (index, pair) in self.pairs.iter_mut().enumerate() {
            pair.checks += 1;
            let token = format!("check {index} {}\n", pair.checks);
            send_and_receive(&mut pair.client, &mut pair.server, &token)?;
            send_and_receive(&mut pair.server, &mut pair.client, &token)?;
            let port = pair
                .client
                .local_addr()
                .map_err(|e| format!("pair {index}: {e}"))?
                .port();
            ports.push(port.to_string());
        }
        let checks = self.pairs.iter().map(|p| p.checks).min().unwrap_or(0);
        Ok(format!(
            "loop ok pairs={} checks={checks} ports={}",
            self.pairs.len(),
            ports.join(",")
        ))
    }

    /// `ballast-sum`: checks every page still holds what was written, and sums them.
    fn ballast_sum(&self) -> Result<String, String> {
        let mut sum: u64 = 0;
        let mut want = vec![0u8; PAGE];
        for (index, page) in self.ballast.chunks(PAGE).enumerate() {
            let want = &mut want[..page.len()];
            fill_page(want, index, self.ballast_mixed);
            if page != want {
                return Err(format!("ballast page {index} changed"));
            }
            sum = sum.wrapping_add(u64::from(want[0]));
        }
        Ok(format!(
            "ballast {} MiB sum {sum}",
            self.ballast.len() / (1024 * 1024)
        ))
    }
}

/// Forks a child that writes every page of `kib` KiB of its own (each child's bytes differ)
/// and sleeps until SIGTERM/SIGINT.
fn spawn_sleeper(index: usize, kib: usize) -> Result<(), String> {
    // SAFETY: this program is single-threaded; the child only allocates, writes its memory,
    // waits for signals and exits.
    match unsafe { libc::fork() } {
        p if p < 0 => Err(errno_message("fork")),
        0 => {
            let mut memory = vec![0u8; kib * 1024];
            for (page, bytes) in memory.chunks_mut(PAGE).enumerate() {
                fill_page(bytes, index.wrapping_mul(1 << 20) + page, false);
            }
            while STOP_SIGNAL.load(Ordering::SeqCst) == 0 {
                // SAFETY: pause has no preconditions; it returns when a signal was handled.
                unsafe {
                    libc::pause();
                }
            }
            std::hint::black_box(&memory);
            // SAFETY: _exit ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) }
        }
        _ => Ok(()),
    }
}

/// `spawn-child SKIP`: SKIP forks that exit at once, then a `pause` child kept as ours.
fn spawn_child(skip: &str) -> Result<String, String> {
    let skip: u32 = skip.parse().map_err(|e| format!("spawn-child SKIP: {e}"))?;
    for _ in 0..skip {
        // SAFETY: single-threaded; the child only calls _exit.
        let pid = unsafe { libc::fork() };
        match pid {
            p if p < 0 => return Err(errno_message("fork")),
            // SAFETY: the child leaves at once, touching nothing.
            0 => unsafe { libc::_exit(0) },
            p => {
                let mut status = 0;
                // SAFETY: reaping the child just forked.
                unsafe { libc::waitpid(p, &mut status, 0) };
            }
        }
    }
    let child = std::process::Command::new("/proc/self/exe")
        .arg("pause")
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the child: {e}"))?;
    let pid = child.id();
    // Kept running as our child for as long as we run (a zombie if it exits first).
    std::mem::forget(child);
    Ok(format!("child pid {pid}"))
}

/// `spawn-daemon PORT`: a double fork; the grandchild becomes `serve --name daemon --port PORT`.
fn spawn_daemon(port: &str) -> Result<String, String> {
    let port: u16 = port.parse().map_err(|e| format!("spawn-daemon PORT: {e}"))?;
    let exe = std::ffi::CString::new("/proc/self/exe").map_err(|e| e.to_string())?;
    let args: Vec<std::ffi::CString> = ["podsnap-workload", "serve", "--name", "daemon", "--port"]
        .iter()
        .map(|a| (*a).to_owned())
        .chain([port.to_string()])
        .map(|a| std::ffi::CString::new(a).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for two descriptors.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return Err(errno_message("pipe"));
    }
    // SAFETY: this program is single-threaded; the child only calls async-signal-safe
    // functions (fork, setsid, write, execv, _exit).
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(errno_message("fork"));
    }
    if child == 0 {
        // SAFETY: see above.
        unsafe {
            libc::close(pipe[0]);
            libc::setsid();
            let grandchild = libc::fork();
            if grandchild == 0 {
                libc::close(pipe[1]);
                libc::execv(exe.as_ptr(), argv.as_ptr());
                libc::_exit(127);
            }
            let bytes = grandchild.to_ne_bytes();
            libc::write(pipe[1], bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end, reading the grandchild's pid, reaping the child.
    let pid = unsafe {
        libc::close(pipe[1]);
        let mut bytes = [0u8; std::mem::size_of::<libc::pid_t>()];
        let n = libc::read(pipe[0], bytes.as_mut_ptr().cast(), bytes.len());
        libc::close(pipe[0]);
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
        if n != bytes.len() as isize {
            return Err("the daemon's pid did not come".to_owned());
        }
        libc::pid_t::from_ne_bytes(bytes)
    };
    Ok(format!("daemon pid {pid}"))
}

/// A sum of `bytes` that changes if any byte does.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().enumerate().fold(0u64, |sum, (i, b)| {
        sum.wrapping_mul(31).wrapping_add(u64::from(*b) ^ (i as u64))
    })
}

impl IpcProbe {
    fn make(key: libc::key_t) -> Result<Self, String> {
        // SAFETY: plain SysV calls; the segment is attached for the life of the process.
        let shm = unsafe {
            let id = libc::shmget(key, PROBE_SIZE, libc::IPC_CREAT | libc::IPC_EXCL | 0o600);
            if id < 0 {
                return Err(errno_message("shmget (probe)"));
            }
            let addr = libc::shmat(id, std::ptr::null(), 0);
            if addr as isize == -1 {
                return Err(errno_message("shmat (probe)"));
            }
            addr.cast::<u8>()
        };
        let label = format!("probe-{key}");
        // SAFETY: the segment is PROBE_SIZE bytes, mapped read-write above.
        let bytes = unsafe { std::slice::from_raw_parts_mut(shm, PROBE_SIZE) };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i % 253) as u8 | 1;
        }
        bytes[..label.len()].copy_from_slice(label.as_bytes());
        bytes[label.len()] = 0;
        // SAFETY: a set of two semaphores, set to 3 and 7.
        let sem = unsafe {
            let id = libc::semget(key + 1, 2, libc::IPC_CREAT | libc::IPC_EXCL | 0o600);
            let mut values: [u16; 2] = [3, 7];
            if id < 0 || libc::semctl(id, 0, libc::SETALL, values.as_mut_ptr()) != 0 {
                return Err(errno_message("semget/SETALL (probe)"));
            }
            id
        };
        // SAFETY: a queue with two messages.
        let msg = unsafe {
            let id = libc::msgget(key + 2, libc::IPC_CREAT | libc::IPC_EXCL | 0o600);
            if id < 0 {
                return Err(errno_message("msgget (probe)"));
            }
            for (t, text) in [(1 as libc::c_long, &b"alpha"[..]), (2, &b"beta"[..])] {
                let mut buf = t.to_ne_bytes().to_vec();
                buf.extend_from_slice(text);
                if libc::msgsnd(id, buf.as_ptr().cast(), text.len(), libc::IPC_NOWAIT) != 0 {
                    return Err(errno_message("msgsnd (probe)"));
                }
            }
            id
        };
        let path = format!("/dev/shm/probe-{key}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("cannot create {path}: {e}"))?;
        file.set_len(PROBE_SIZE as u64)
            .map_err(|e| format!("cannot size {path}: {e}"))?;
        // SAFETY: a shared mapping of the whole file; kept for the life of the process (the
        // descriptor is closed when `file` drops: the file stays mapped, not open).
        let posix = unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                PROBE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            if addr == libc::MAP_FAILED {
                return Err(errno_message("mmap (probe)"));
            }
            addr.cast::<u8>()
        };
        // SAFETY: the mapping is PROBE_SIZE bytes, read-write.
        let mapped = unsafe { std::slice::from_raw_parts_mut(posix, PROBE_SIZE) };
        for (i, b) in mapped.iter_mut().enumerate() {
            *b = (i % 241) as u8 ^ 0x5a;
        }
        Ok(IpcProbe { shm, sem, msg, posix })
    }
}

/// What ballast page `index` is filled with (never zero: a zero page costs nothing to dump).
fn page_byte(index: usize) -> u8 {
    u8::try_from(index % 251).unwrap_or(0) + 1
}

/// Writes ballast page `index`: one byte value, or (mixed) by the page's index modulo 4 that,
/// random bytes, words of text or pointer-like 8-byte words; the same bytes for the same index.
fn fill_page(page: &mut [u8], index: usize, mixed: bool) {
    if !mixed || index.is_multiple_of(4) {
        page.fill(page_byte(index));
        return;
    }
    let mut state = (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    match index % 4 {
        1 => {
            for chunk in page.chunks_mut(8) {
                let bytes = next().to_le_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
        }
        2 => {
            const WORDS: [&str; 16] = [
                "pod ",
                "container ",
                "checkpoint ",
                "restore ",
                "the ",
                "memory ",
                "of ",
                "node ",
                "request=",
                "200 ",
                "GET /api/v1/",
                "namespace ",
                "and ",
                "\n",
                "status: ok ",
                "id=",
            ];
            let mut at = 0;
            while at < page.len() {
                let word = WORDS[(next() % 16) as usize].as_bytes();
                let n = word.len().min(page.len() - at);
                page[at..at + n].copy_from_slice(&word[..n]);
                at += n;
            }
        }
        _ => {
            let base = 0x7f3a_0000_0000u64 + ((index as u64) << 16);
            for (i, chunk) in page.chunks_mut(8).enumerate() {
                let r = next();
                let word = if i % 2 == 0 {
                    base + (r % 4096) * 16
                } else {
                    r % 64
                };
                chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
            }
        }
    }
}

/// Writes `line` into `from` and reads it back, whole, from `to`.
fn send_and_receive(from: &mut TcpStream, to: &mut TcpStream, line: &str) -> Result<(), String> {
    from.write_all(line.as_bytes())
        .map_err(|e| format!("loopback send: {e}"))?;
    let mut got = vec![0u8; line.len()];
    to.read_exact(&mut got)
        .map_err(|e| format!("loopback receive: {e}"))?;
    if got != line.as_bytes() {
        return Err(format!(
            "loopback received {:?}, sent {line:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    Ok(())
}

fn count_flag(flags: &HashMap<String, String>, name: &str) -> Result<usize, String> {
    match flags.get(name) {
        Some(v) => v.parse().map_err(|e| format!("{name}: {e}")),
        None => Ok(0),
    }
}

impl Server {
    fn tick(&mut self) {
        self.counter += 1;
        if let Some((file, path)) = &mut self.probes.held {
            if let Err(e) = writeln!(file, "{} tick {}", self.options.name, self.counter) {
                eprintln!("podsnap-workload: cannot append to {}: {e}", path.display());
            }
        }
        if !self.counter.is_multiple_of(self.options.log_every) {
            return;
        }
        let line = format!("{} count {}", self.options.name, self.counter);
        say(&line);
        if let Some(volume) = &self.options.volume {
            let path = volume.join(format!("{}.log", self.options.name));
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
            if let Err(e) = appended {
                eprintln!("podsnap-workload: cannot append to {}: {e}", path.display());
            }
        }
    }

    /// Reads what the peer sent, answers every complete line, writes what it can.
    fn service(&mut self, connection: &mut Connection) {
        let mut buffer = [0u8; 4096];
        while !connection.eof {
            match connection.stream.read(&mut buffer) {
                Ok(0) => connection.eof = true,
                Ok(n) => connection.input.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    // Reset by the peer: nobody to answer.
                    connection.eof = true;
                    connection.output.clear();
                    connection.input.clear();
                }
            }
        }
        while let Some(end) = connection.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = connection.input.drain(..=end).collect();
            let reply = self.answer(String::from_utf8_lossy(&line).trim());
            connection.output.extend_from_slice(reply.as_bytes());
            connection.output.push(b'\n');
        }
        if connection.eof && !connection.input.is_empty() {
            // A last command without a newline.
            let line = std::mem::take(&mut connection.input);
            let reply = self.answer(String::from_utf8_lossy(&line).trim());
            connection.output.extend_from_slice(reply.as_bytes());
            connection.output.push(b'\n');
        }
        if connection.input.len() > MAX_LINE {
            connection.input.clear();
            connection.output.extend_from_slice(b"error: line too long\n");
            connection.eof = true;
        }
        while !connection.output.is_empty() {
            match connection.stream.write(&connection.output) {
                Ok(0) => break,
                Ok(n) => {
                    connection.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    connection.output.clear();
                    connection.eof = true;
                }
            }
        }
    }

    fn answer(&mut self, line: &str) -> String {
        match self.dispatch(line) {
            Ok(reply) => reply,
            Err(message) => format!("error: {message}"),
        }
    }

    fn dispatch(&mut self, line: &str) -> Result<String, String> {
        let mut words = line.splitn(2, ' ');
        let command = words.next().unwrap_or_default();
        let rest = words.next().unwrap_or_default().trim();
        match command {
            "count" => Ok(self.counter.to_string()),
            "ping" => Ok(format!("pong {}", self.options.name)),
            "pid" => Ok(std::process::id().to_string()),
            "shm-write" => {
                let (key, value) = two_args(rest, "shm-write KEY VAL")?;
                sysv_shm_write(parse_key(key)?, value)?;
                Ok("ok".to_owned())
            }
            "shm-read" => sysv_shm_read(parse_key(rest)?),
            "posix-shm-write" => {
                let (name, value) = two_args(rest, "posix-shm-write NAME VAL")?;
                let path = posix_shm_path(name)?;
                std::fs::write(&path, value).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                Ok("ok".to_owned())
            }
            "posix-shm-read" => {
                let path = posix_shm_path(rest)?;
                std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
            }
            "get" => {
                let (address, forwarded) = two_args(rest, "get HOST:PORT CMD")?;
                request(address, forwarded)
            }
            "touch" => {
                if rest.is_empty() {
                    return Err("usage: touch PATH".to_owned());
                }
                let content = format!("{} count {}\n", self.options.name, self.counter);
                std::fs::write(rest, content).map_err(|e| format!("cannot write {rest}: {e}"))?;
                Ok("ok".to_owned())
            }
            "held" => self.probes.held(),
            "loop-check" => self.probes.loop_check(),
            "ballast-sum" => self.probes.ballast_sum(),
            "ipc-check" => self.probes.ipc_check(),
            "peer-connect" => self.probes.peer_connect(rest),
            "peer-check" => self.probes.peer_check(),
            "peer-send" => self.probes.peer_send(rest),
            "peer-read" => self.probes.peer_line().map(|l| format!("peer read {l}")),
            "peer-pending" => self.probes.peer_pending(),
            "spawn-daemon" => spawn_daemon(rest),
            "spawn-child" => spawn_child(rest),
            "exit" => {
                let code: i32 = rest.parse().map_err(|e| format!("exit CODE: {e}"))?;
                say(&format!("{} exiting with {code}", self.options.name));
                std::process::exit(code);
            }
            "" => Err("empty command".to_owned()),
            other => Err(format!("unknown command {other:?}")),
        }
    }
}

fn two_args<'a>(rest: &'a str, usage: &str) -> Result<(&'a str, &'a str), String> {
    let mut parts = rest.splitn(2, ' ');
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) if !a.is_empty() && !b.trim().is_empty() => Ok((a, b.trim())),
        _ => Err(format!("usage: {usage}")),
    }
}

fn parse_key(text: &str) -> Result<libc::key_t, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16),
        None => text.parse::<i64>(),
    };
    let key = parsed.map_err(|e| format!("bad ipc key {text:?}: {e}"))?;
    libc::key_t::try_from(key).map_err(|e| format!("bad ipc key {text:?}: {e}"))
}

fn posix_shm_path(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(format!("bad shm name {name:?}"));
    }
    Ok(Path::new("/dev/shm").join(name))
}

fn sysv_shm_write(key: libc::key_t, value: &str) -> Result<(), String> {
    if value.len() >= SHM_SIZE {
        return Err(format!("value longer than {} bytes", SHM_SIZE - 1));
    }
    // SAFETY: shmget takes plain integers.
    let id = unsafe { libc::shmget(key, SHM_SIZE, libc::IPC_CREAT | 0o666) };
    if id < 0 {
        return Err(errno_message("shmget"));
    }
    // SAFETY: `id` names a segment of SHM_SIZE bytes; a null address lets the kernel choose.
    let address = unsafe { libc::shmat(id, std::ptr::null(), 0) };
    if address as isize == -1 {
        return Err(errno_message("shmat"));
    }
    // SAFETY: the mapping is SHM_SIZE bytes long and writable; value.len() + 1 <= SHM_SIZE.
    unsafe {
        let base = address.cast::<u8>();
        std::ptr::copy_nonoverlapping(value.as_ptr(), base, value.len());
        *base.add(value.len()) = 0;
        libc::shmdt(address);
    }
    Ok(())
}

fn sysv_shm_read(key: libc::key_t) -> Result<String, String> {
    // SAFETY: shmget takes plain integers.
    let id = unsafe { libc::shmget(key, 0, 0) };
    if id < 0 {
        return Err(errno_message("shmget"));
    }
    // SAFETY: a zeroed shmid_ds is a valid out buffer for IPC_STAT.
    let mut info: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: `id` is a segment id and `info` a valid out pointer.
    if unsafe { libc::shmctl(id, libc::IPC_STAT, &mut info) } != 0 {
        return Err(errno_message("shmctl"));
    }
    // SAFETY: `id` names an existing segment; we map it read-only.
    let address = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
    if address as isize == -1 {
        return Err(errno_message("shmat"));
    }
    // SAFETY: the mapping is `shm_segsz` bytes long and readable; we stop at the first NUL or
    // the end of the segment, then detach.
    let bytes = unsafe {
        let slice = std::slice::from_raw_parts(address.cast::<u8>(), info.shm_segsz);
        let end = slice.iter().position(|&b| b == 0).unwrap_or(slice.len());
        let copy = slice[..end].to_vec();
        libc::shmdt(address);
        copy
    };
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

// ---------------------------------------------------------------------------------------------
// arguments

/// Parses `--flag value` pairs, accepting only `known` flags.
fn parse_flags(args: &[String], known: &[&str]) -> Result<HashMap<String, String>, String> {
    let mut flags = HashMap::new();
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name, value.to_owned()),
            None => {
                let value = iter
                    .next()
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
                (flag.as_str(), value.clone())
            }
        };
        if !known.contains(&name) {
            return Err(format!("unknown flag {name}\n{USAGE}"));
        }
        flags.insert(name.to_owned(), value);
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        let args: Vec<String> = ["--name", "app", "--port=8080"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let options = ServeOptions::parse(&args).expect("valid flags");
        assert_eq!(options.name, "app");
        assert_eq!(options.port, 8080);
        assert!(ServeOptions::parse(&["--bogus".to_owned(), "1".to_owned()]).is_err());
    }

    #[test]
    fn keys_and_names() {
        assert_eq!(parse_key("0x10").expect("hex key"), 16);
        assert_eq!(parse_key("42").expect("decimal key"), 42);
        assert!(posix_shm_path("../etc").is_err());
        assert_eq!(
            two_args("a b c", "x").expect("two args"),
            ("a", "b c"),
            "the value keeps its spaces"
        );
    }
}
