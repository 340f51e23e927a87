//! `ctr` against the private node: `ctr -a <socket> -n <namespace> ...`.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::command::{output_within, run_within, CommandError, CommandOutput};

/// The containerd namespace CRI uses.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The namespace `ctr` uses by default.
pub const DEFAULT_NAMESPACE: &str = "default";

/// How long a `ctr` call may take unless the caller says otherwise.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `ctr` against one containerd.
#[derive(Debug, Clone)]
pub struct Ctr {
    bin: PathBuf,
    address: PathBuf,
}

impl Ctr {
    /// A `ctr` for the containerd listening on `address`.
    pub fn new(bin: impl Into<PathBuf>, address: impl Into<PathBuf>) -> Self {
        Self {
            bin: bin.into(),
            address: address.into(),
        }
    }

    /// The containerd socket.
    pub fn address(&self) -> &Path {
        &self.address
    }

    /// `ctr -a <socket> -n <namespace>`, ready for more arguments.
    pub fn command(&self, namespace: &str) -> Command {
        let mut command = Command::new(&self.bin);
        command.arg("-a").arg(&self.address).arg("-n").arg(namespace);
        command
    }

    /// Runs `ctr ... <args>` and returns its stdout, or an error quoting its stderr when it
    /// exits non-zero or takes longer than [`CTR_TIMEOUT`].
    pub fn run(&self, namespace: &str, args: &[&str]) -> Result<String, CommandError> {
        run_within(self.command(namespace).args(args), CTR_TIMEOUT)
    }

    /// Runs `ctr ... <args>` and returns its output whatever its exit status.
    pub fn output(&self, namespace: &str, args: &[&str]) -> Result<CommandOutput, CommandError> {
        output_within(self.command(namespace).args(args), CTR_TIMEOUT)
    }

    /// The ids `ctr <object> ls -q` prints (`tasks`, `containers`, `images`, `namespaces`...).
    pub fn list_ids(&self, namespace: &str, object: &str) -> Result<Vec<String>, CommandError> {
        Ok(self
            .run(namespace, &[object, "ls", "-q"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// The status column of `ctr task ls` for `id` (`RUNNING`, `PAUSED`, `STOPPED`...).
    pub fn task_status(&self, namespace: &str, id: &str) -> Result<Option<String>, CommandError> {
        let listing = self.run(namespace, &["tasks", "ls"])?;
        Ok(listing.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [task, _pid, status, ..] if *task == id => Some((*status).to_owned()),
                _ => None,
            }
        }))
    }

    /// Waits until `ctr task ls` shows task `id` in `status`.
    ///
    /// # Panics
    /// When it is not there within `timeout`.
    pub fn wait_task_status(&self, namespace: &str, id: &str, status: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let seen = self.task_status(namespace, id).expect("ctr task ls");
            if seen.as_deref() == Some(status) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "task {id} is {seen:?}, not {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `command` to the workload server on `127.0.0.1:port` inside container `id`
    /// (`ctr task exec` of `podsnap-workload client`): the reply line, or the error.
    pub fn ask_workload(
        &self,
        namespace: &str,
        id: &str,
        port: u16,
        command: &str,
    ) -> Result<String, String> {
        static EXEC_COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let exec_id = format!(
            "ask{}",
            EXEC_COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let address = format!("127.0.0.1:{port}");
        let mut args = vec![
            "task",
            "exec",
            "--exec-id",
            &exec_id,
            id,
            "podsnap-workload",
            "client",
            &address,
        ];
        args.extend(command.split(' '));
        self.run(namespace, &args)
            .map(|out| out.trim().to_owned())
            .map_err(|e| e.to_string())
    }
}

/// What a program run on a pseudo-terminal printed.
#[derive(Debug, Clone)]
pub struct PtyOutput {
    /// Its exit status.
    pub status: std::process::ExitStatus,
    /// Everything written to the terminal (stdout and stderr, with `\r\n` line ends).
    pub output: String,
}

impl Ctr {
    /// Runs `ctr ... <args>` with a fresh pseudo-terminal as its stdin, stdout and stderr (what
    /// `ctr run -t` and `ctr task exec -t` need), killing it after `timeout`.
    pub fn run_in_pty(
        &self,
        namespace: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<PtyOutput, CommandError> {
        use std::io::Read;
        use std::process::Stdio;

        let mut command = self.command(namespace);
        command.args(args);
        let line = crate::command::describe(&command);
        let failed = |stderr: String| CommandError {
            command: line.clone(),
            status: None,
            stdout: String::new(),
            stderr,
        };
        let pty = nix::pty::openpty(None, None).map_err(|e| failed(format!("openpty: {e}")))?;
        let slave = |fd: &std::os::fd::OwnedFd| {
            fd.try_clone()
                .map(Stdio::from)
                .map_err(|e| failed(format!("dup: {e}")))
        };
        let mut child = command
            .stdin(slave(&pty.slave)?)
            .stdout(slave(&pty.slave)?)
            .stderr(slave(&pty.slave)?)
            .spawn()
            .map_err(|e| failed(format!("cannot run it: {e}")))?;
        // Close every slave descriptor of ours (the Command holds copies), or the terminal
        // never reports its end.
        drop(command);
        drop(pty.slave);
        let mut master = std::fs::File::from(pty.master);
        // Reads until EIO: every slave descriptor is closed once ctr (and what it started on
        // the terminal) exited.
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut buffer = [0u8; 4096];
            while let Ok(n) = master.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                bytes.extend_from_slice(&buffer[..n]);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        });
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while !reader.is_finished() && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let output = if reader.is_finished() {
            reader.join().unwrap_or_default()
        } else {
            String::from("<terminal output not collected: the terminal is still open>")
        };
        match status {
            Some(status) => Ok(PtyOutput { status, output }),
            None => Err(CommandError {
                command: line,
                status: None,
                stdout: output,
                stderr: format!("killed after {timeout:?}"),
            }),
        }
    }
}

/// `ctr events` running in the background, its lines collected; killed on drop.
pub struct EventWatch {
    child: Child,
    seen: Arc<Mutex<String>>,
}

impl EventWatch {
    pub fn start(mut child: Child) -> Self {
        let seen = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("ctr events stdout");
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut s = sink.lock().expect("events lock");
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self { child, seen }
    }

    /// Waits (at most 20 s) until `ctr events` is subscribed: labels `namespace` with a new
    /// value (containerd publishes `/namespaces/update`) until the watch prints it, so every
    /// event from now on is seen.
    pub fn wait_subscribed(&self, ctr: &Ctr, namespace: &str) {
        static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let value = format!("probe-{}-{n}", std::process::id());
            ctr.run(
                namespace,
                &[
                    "namespaces",
                    "label",
                    namespace,
                    &format!("podsnap.test/events={value}"),
                ],
            )
            .expect("ctr namespaces label");
            let round = Instant::now() + Duration::from_millis(500);
            while Instant::now() < round {
                if self.text().contains(&value) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                Instant::now() < deadline,
                "ctr events printed no event within 20 s: {}",
                self.text()
            );
        }
    }

    /// Everything printed so far.
    pub fn text(&self) -> String {
        self.seen.lock().expect("events lock").clone()
    }

    /// Waits (up to 20 s) until `topic` was seen for container `id`; returns all events.
    pub fn wait_for(&self, id: &str, topic: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.text();
            if topics_for(&text, id).iter().any(|t| t == topic) || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The topics `ctr events` printed for container `id` (its lines name the topic and carry the
/// container id in the event body).
pub fn topics_for(events: &str, id: &str) -> Vec<String> {
    events
        .lines()
        .filter(|l| l.contains(id))
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("/tasks/"))
                .map(str::to_owned)
        })
        .collect()
}
