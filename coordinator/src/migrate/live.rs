//! Live migration (post-copy): the pod's memory moves after the switch, not before it.
//!
//! The source asks its shim for a lazy pod dump (`DumpAsk::serve`): every container's CRIU
//! dumps all but the anonymous memory while the pod is frozen, and then serves that memory from
//! its page server. The dump returns with the pod still frozen and its network locked. The
//! checkpoint (a few MiB: images without memory, rootfs changes, volumes) goes to the target,
//! which restores every container lazily: its lazy-pages daemons ask for pages on demand and
//! in the background, through the page streams this module carries (`pages.rs`). The downtime
//! is the freeze, the small transfer and the lazy restore: it does not grow with memory.
//!
//! ```text
//! source                                         target
//!   connect, hello                      <---->  (as a direct migration)
//!   lazy dump: the pod frozen, memory served
//!   manifest, files                     ----->  checked, written, restored lazily through CRI
//!   pages (daemon requests / CRIU pages) <---->  each container's daemon to the source's CRIU
//!                                       <-----  restored  (every container runs)
//!   "switched" to the shim; commit      ----->
//!                                       <-----  kept
//!   pages ...                           <---->  until each daemon has every page
//!                                       <-----  pages_end {stream, complete} per container
//!   "release" to the shim (the pod is stopped at its snapshot)
//!   released {killed}                   ----->
//! ```
//!
//! Failure, before the switch (`commit`): the source's shim kills CRIU, thaws the pod and unlocks
//! its network (the pod runs on as it was), and the target removes what it restored. After the
//! switch, nothing goes back: the target's pod may have run. A source lost then (the node, this
//! process, the channel) leaves the target's containers without the pages still missing: the
//! target's shim kills them before their lazy-pages daemons see the loss, so they never run
//! with zero-filled memory, and the pod is lost; the source's pod stays frozen and locked, for
//! an operator who knows the target's copy is gone to resume. The window is from the switch to
//! the release, measured and printed.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podsnap_checkpoint::format::layout::{
    page_stream_socket, serve_socket, LIVE_PREFIX, MIGRATE_RUN_DIR, SERVE_CONTROL,
};
use podsnap_checkpoint::format::manifest::Manifest;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::channel::Endpoint;
use super::frame::{Message, Purpose};
use super::pages::{Local, Pages};
use super::source::{interrupted, resumed, running_containers, send_checkpoint, Moved};
use crate::dump::{dump, DumpRequest};
use crate::error::{Error, Result};
use crate::pod::find_ready_pod;
use crate::progress::Progress;

/// The pipe size CRIU's page server needs (`fs.pipe-max-size`): it sizes its pipes to 4 MiB
/// and, without CAP_SYS_RESOURCE above the limit, fails at the first page with a misleading
/// `splice: Bad file descriptor`.
const PIPE_MAX_NEEDED: u64 = 4 << 20;

/// Refuses a live migration on a node whose `fs.pipe-max-size` CRIU's page server cannot use.
pub fn check_pipe_max() -> Result<()> {
    let path = "/proc/sys/fs/pipe-max-size";
    let now: u64 = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    if now < PIPE_MAX_NEEDED {
        return Err(Error::Refused(format!(
            "live migration needs fs.pipe-max-size of at least {PIPE_MAX_NEEDED} (CRIU's page \
             server sizes its pipes so); this node has {now}: `sysctl -w fs.pipe-max-size={PIPE_MAX_NEEDED}` \
             (packaging/install-deps.sh sets it)"
        )));
    }
    Ok(())
}

/// How a live migration's memory went.
#[derive(Debug, Clone)]
pub struct PagesMoved {
    /// Switch (the target's `restored`) to the release: the window in which losing the source
    /// loses the pod.
    pub window: Duration,
    /// Of the window: the switch until the target had every page (the rest is the source's
    /// release: CRIU's end, the pod stopped at its snapshot).
    pub filled: Duration,
    /// Page-stream bytes from the source after the dump, and requests from the target.
    pub sent: u64,
    /// Of `sent`, the bytes sent after the switch.
    pub sent_after_switch: u64,
    pub received: u64,
    pub killed: u64,
}

/// The directory where `migrate` listens for its shim (0700, under [`MIGRATE_RUN_DIR`]);
/// removed when dropped.
struct ServeDir {
    dir: PathBuf,
    control: UnixListener,
    streams: Vec<(String, UnixListener)>,
}

impl ServeDir {
    fn create(names: &[String]) -> Result<ServeDir> {
        let base = Path::new(MIGRATE_RUN_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(base)
            .map_err(Error::io("create the migration directory", base))?;
        let mark = podsnap_runtime::launcher::new_mark().map_err(Error::io("make a name", base))?;
        let dir = base.join(format!("m-{}", &mark[..16]));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io("create the migration directory", &dir))?;
        let made = (|| {
            let control = UnixListener::bind(dir.join(SERVE_CONTROL))?;
            let mut streams = Vec::new();
            for name in names {
                streams.push((name.clone(), UnixListener::bind(serve_socket(&dir, name))?));
            }
            Ok::<_, std::io::Error>((control, streams))
        })();
        match made {
            Ok((control, streams)) => Ok(ServeDir {
                dir,
                control,
                streams,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(Error::io("listen for the shim", &dir)(e))
            }
        }
    }

    /// The shim's connections: control, then each container's stream.
    async fn accept(&self) -> Result<(UnixStream, HashMap<String, UnixStream>)> {
        let io = |e| Error::io("accept the shim's connection", &self.dir)(e);
        let (control, _) = self.control.accept().await.map_err(io)?;
        let mut streams = HashMap::new();
        for (name, listener) in &self.streams {
            let (s, _) = listener.accept().await.map_err(io)?;
            streams.insert(name.clone(), s);
        }
        Ok((control, streams))
    }
}

impl Drop for ServeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The control connection to the shim holding the frozen pod (see `pod::serve` in the shim).
struct Control {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Control {
    fn new(stream: UnixStream) -> Control {
        let (read, write) = stream.into_split();
        Control {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    async fn say(&mut self, word: &str) -> Result<()> {
        self.write
            .write_all(format!("{word}\n").as_bytes())
            .await
            .map_err(|e| Error::Refused(format!("the shim's control connection: {e}")))
    }

    async fn answer(&mut self, within: Duration) -> Result<String> {
        match tokio::time::timeout(within, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => Err(Error::Refused("the shim closed the migration's control".into())),
            Ok(Err(e)) => Err(Error::Refused(format!("the shim's control connection: {e}"))),
            Err(_) => Err(Error::Refused(format!(
                "the shim did not answer within {within:?}"
            ))),
        }
    }

    /// Before the switch: the shim resumes the pod as it was.
    async fn abort(&mut self) {
        if self.say("abort").await.is_ok() {
            match self.answer(Duration::from_secs(60)).await {
                Ok(a) if a == "aborted" => {}
                other => log::error!("resuming the pod: the shim answered {other:?}"),
            }
        }
    }
}

/// Moves pod `request.namespace/request.pod` live to the node at `to`; see the module header.
pub async fn migrate_live(
    request: &DumpRequest,
    to: &str,
    endpoint: &Endpoint,
    progress: &dyn Progress,
) -> Result<(Moved, PagesMoved)> {
    let (clients, pod) = find_movable(request, progress).await?;
    progress.step(&format!("connecting to {to}"));
    let channel = endpoint.connect(to, Purpose::Control { ticket: None }).await?;
    live_over(request, channel, &clients, pod, progress).await
}

/// The pod to move, on a node that can serve its memory.
async fn find_movable(
    request: &DumpRequest,
    progress: &dyn Progress,
) -> Result<(crate::cri::CriClients, crate::pod::PodRef)> {
    progress.step(&format!("finding pod {}/{}", request.namespace, request.pod));
    let clients = crate::cri::connect(&request.runtime_endpoint).await?;
    let pod = find_ready_pod(&clients, &request.namespace, &request.pod, &request.handler).await?;
    check_pipe_max()?;
    Ok((clients, pod))
}

/// How long `podsnap migrate --listen` waits for a node to claim the pod, by default.
pub const CLAIM_WAIT: Duration = Duration::from_secs(300);

/// Moves pod `request.namespace/request.pod` live to the node that claims it (kubelet's
/// path): listens on `listen`, tells `ticketed` the pod's `podsnap://HOST:PORT/TICKET`
/// (`advertise` as HOST:PORT when given, else the address bound), and waits at most `wait`
/// for a node of `[migration] peers` to connect with that ticket: the shim of a pod annotated
/// `podsnap.io/restore-from` with it, through `podsnap receive --from`. A wrong ticket is
/// refused (and the wait goes on); the pod is untouched until the claim. Then as
/// [`migrate_live`], the roles of the connection aside.
pub async fn migrate_live_claimed(
    request: &DumpRequest,
    listen: &str,
    advertise: Option<&str>,
    wait: Duration,
    endpoint: &Endpoint,
    progress: &dyn Progress,
    ticketed: &(dyn Fn(&str) + Sync),
) -> Result<(Moved, PagesMoved)> {
    let (clients, pod) = find_movable(request, progress).await?;
    let listener = endpoint.bind(listen).await?;
    let ticket = podsnap_runtime::launcher::new_mark()
        .map_err(Error::io("make a ticket", Path::new("/dev/urandom")))?;
    let addr = match advertise {
        Some(a) => a.to_owned(),
        None => listener.local_addr()?.to_string(),
    };
    ticketed(&format!("{LIVE_PREFIX}{addr}/{ticket}"));
    progress.step(&format!(
        "waiting (at most {wait:?}) for a node to claim {pod} with its ticket"
    ));
    let channel = tokio::select! {
        c = claimed(&listener, &ticket) => c?,
        _ = tokio::time::sleep(wait) => {
            return Err(Error::Refused(format!(
                "no node claimed the pod with its ticket within {wait:?}: the pod {pod} runs on \
                 here, untouched"
            )))
        }
        why = interrupted() => {
            return Err(Error::Refused(format!("{why} before a node claimed the pod: it runs on here, untouched")))
        }
    };
    drop(listener);
    live_over(request, channel, &clients, pod, progress).await
}

/// The first connection of a listed node that names `ticket`; a wrong one is refused.
async fn claimed(listener: &super::channel::Listener, ticket: &str) -> Result<super::channel::Channel> {
    loop {
        let incoming = match listener.accept().await {
            Ok(i) => i,
            Err(e @ super::Error::Config { .. }) => return Err(e.into()),
            Err(e) => {
                // Refused in the handshake (an unlisted key) or broken: nothing was sent.
                log::warn!("migration: {e}");
                continue;
            }
        };
        let named = match &incoming.hello.purpose {
            Purpose::Control { ticket } => ticket.clone().unwrap_or_default(),
        };
        if same_ticket(&named, ticket) {
            log::info!("migration: {} claimed the pod", incoming.peer());
            return Ok(incoming.accept().await?);
        }
        log::warn!(
            "migration: {} named a ticket that is not this pod's",
            incoming.peer()
        );
        incoming
            .refuse("no pod waits here with this ticket (it is printed by `podsnap migrate --listen`)")
            .await;
    }
}

/// Whether two tickets are the same, in a time that does not depend on where they differ.
fn same_ticket(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The live move once the channel to the target is up (either side may have connected).
async fn live_over(
    request: &DumpRequest,
    mut channel: super::channel::Channel,
    clients: &crate::cri::CriClients,
    pod: crate::pod::PodRef,
    progress: &dyn Progress,
) -> Result<(Moved, PagesMoved)> {
    let target = channel.peer().to_owned();
    let containers = running_containers(clients, &pod.id).await?;
    let names: Vec<String> = containers.iter().map(|(n, _)| n.clone()).collect();
    let serve = ServeDir::create(&names)?;
    let mut req = request.clone();
    req.stop = false;
    req.dir = None;
    req.hold_network = false;
    req.serve_dir = Some(serve.dir.clone());
    progress.step(&format!(
        "dumping {pod} lazily: frozen until {target} runs it, its memory served from here"
    ));
    let started = Instant::now();
    let dumped = tokio::select! {
        d = async { tokio::try_join!(dump(&req, progress), serve.accept()) } => d,
        why = interrupted() => Err(Error::Refused(format!("{why} during the dump"))),
    };
    let (outcome, (control, mut streams)) = match dumped {
        Ok(d) => d,
        Err(e) => {
            channel.abort(&format!("the source's dump failed: {e}")).await;
            return Err(Error::Refused(format!(
                "{e}\nthe pod {pod} runs on this node as before"
            )));
        }
    };
    let mut control = Control::new(control);
    let dir = outcome.summary.dir.clone();
    let dumped_at = Instant::now();
    // Until the switch, every failure resumes the pod here.
    let before_switch = async {
        let (files, bytes) = send_checkpoint(&dir, &mut channel, progress).await?;
        Ok::<_, Error>((files, bytes))
    };
    let sent = tokio::select! {
        s = before_switch => s,
        why = interrupted() => Err(Error::Refused(format!("{why} before the target had the pod"))),
    };
    let (files, bytes) = match sent {
        Ok(s) => s,
        Err(e) => {
            control.abort().await;
            channel.abort(&format!("the source gave up: {e}")).await;
            return Err(resumed(e, &pod));
        }
    };
    let sent_at = Instant::now();
    let manifest = crate::dump::read_manifest(&dir)?;
    let mut locals = Vec::new();
    for name in served_containers(&manifest) {
        match streams.remove(&name) {
            Some(s) => locals.push(Local::Connected(s)),
            None => {
                control.abort().await;
                channel.abort("internal: a container without a page stream").await;
                return Err(resumed(
                    Error::Refused(format!("container {name} has no page stream")),
                    &pod,
                ));
            }
        }
    }
    let mut pages = Pages::start(channel, locals, false)?;
    progress.step(&format!("{target} restores the pod lazily"));
    let restored = tokio::select! {
        m = pages.message() => m.map_err(Error::from),
        why = interrupted() => Err(Error::Refused(format!("{why} before the target had the pod"))),
    };
    let (restored_pod, restored_id, restored_ip, restored_containers) = match restored {
        Ok(Message::Restored {
            pod,
            id,
            ip,
            containers,
        }) => (pod, id, ip, containers),
        other => {
            let e = match other {
                Err(e) => e,
                Ok(m) => Error::Refused(format!("the target answered {m:?}, not restored")),
            };
            control.abort().await;
            pages.abort(format!("the source gave up: {e}")).await;
            return Err(resumed(e, &pod));
        }
    };
    // The switch: from here on the target may run the pod, and nothing goes back.
    let switched_at = Instant::now();
    let lost = |e: Error, pages: &Pages| {
        Error::Refused(format!(
            "{e}\nthe migration was lost after the switch ({} bytes of memory served): the pod \
             {pod} stays frozen on this node with its network locked, and the target kills its \
             copy rather than run it with missing memory. If the target's copy is gone, resume \
             this one (`ctr -n k8s.io task resume ID` for each container, and unlock its network)",
            pages.states().iter().map(|s| s.sent).sum::<u64>()
        ))
    };
    control.say("switched").await?;
    pages.switch();
    let sent_at_switch: u64 = pages.states().iter().map(|s| s.sent).sum();
    progress.step(&format!("{target} runs the pod: serving the rest of its memory"));
    let kept = async {
        pages.send(Message::Commit).await?;
        match pages.message().await? {
            Message::Kept => Ok(()),
            other => Err(super::Error::Protocol {
                peer: target.clone(),
                reason: format!("expected kept, got {other:?}"),
            }),
        }
    }
    .await;
    if let Err(e) = kept {
        return Err(lost(e.into(), &pages));
    }
    let ended = pages
        .until(|s| s.iter().all(|st| st.remote_ended.is_some()))
        .await;
    let states = match ended {
        Ok(states) => states,
        Err(e) => return Err(lost(e.into(), &pages)),
    };
    if let Some(i) = states.iter().position(|s| s.remote_ended != Some(true)) {
        return Err(lost(
            Error::Refused(format!(
                "the target's lazy-pages daemon of container {i} ended before it had every page"
            )),
            &pages,
        ));
    }
    let filled = switched_at.elapsed();
    // Every page went: the shim stops the pod at its snapshot.
    control.say("release").await?;
    let answer = control.answer(Duration::from_secs(90)).await?;
    let killed = match answer.strip_prefix("released ") {
        Some(n) => n.trim().parse::<u64>().unwrap_or(0),
        None => {
            return Err(Error::Refused(format!(
                "every page reached the target, but the shim could not stop the pod here: {answer}"
            )))
        }
    };
    let window = switched_at.elapsed();
    let _ = pages.send(Message::Released { killed }).await;
    let states = pages.states();
    pages.finish().await;
    let moved = Moved {
        pod,
        target,
        restored_pod,
        restored_id,
        restored_ip,
        containers: restored_containers,
        checkpoint: dir,
        files,
        bytes,
        paused_for: switched_at - started,
        dump: dumped_at - started,
        send: sent_at - dumped_at,
        restore: switched_at - sent_at,
    };
    Ok((
        moved,
        PagesMoved {
            window,
            filled,
            sent: states.iter().map(|s| s.sent).sum(),
            sent_after_switch: states
                .iter()
                .map(|s| s.sent)
                .sum::<u64>()
                .saturating_sub(sent_at_switch),
            received: states.iter().map(|s| s.received).sum(),
            killed,
        },
    ))
}

/// The containers whose memory a lazy dump serves, in the order both sides number their page
/// streams: the manifest's, those dumped.
pub fn served_containers(manifest: &Manifest) -> Vec<String> {
    manifest
        .containers
        .iter()
        .filter(|c| c.dumped)
        .map(|c| c.name.clone())
        .collect()
}

/// The target's listeners for the page streams of the received checkpoint `name`: one socket
/// per served container, which the container's restore (its lazy-pages daemon) connects to.
pub struct PageSockets {
    paths: Vec<PathBuf>,
}

impl PageSockets {
    /// `pod`: the sandbox id of the pod the migration creates, once it is known; only its
    /// shims get the streams.
    pub fn listen(
        name: &str,
        manifest: &Manifest,
        pod: &tokio::sync::watch::Receiver<Option<String>>,
    ) -> Result<(PageSockets, Vec<Local>)> {
        let base = Path::new(MIGRATE_RUN_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(base)
            .map_err(Error::io("create the migration directory", base))?;
        let mut sockets = PageSockets { paths: Vec::new() };
        let mut locals = Vec::new();
        for container in served_containers(manifest) {
            let path = page_stream_socket(name, &container);
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).map_err(Error::io("listen for a page stream", &path))?;
            sockets.paths.push(path.clone());
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(Error::io("make a page stream private", &path))?;
            locals.push(Local::Listening {
                listener,
                pod: pod.clone(),
            });
        }
        Ok((sockets, locals))
    }
}

impl Drop for PageSockets {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}
