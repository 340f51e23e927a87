//! Running host programs (ctr, runc, ip, ldd) with a deadline.

use std::fmt;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a finished program printed.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output, lossily decoded.
    pub stdout: String,
    /// Its standard error, lossily decoded.
    pub stderr: String,
}

/// A program that could not run, timed out, or exited non-zero.
#[derive(Debug, Clone)]
pub struct CommandError {
    /// The command line, for the message.
    pub command: String,
    /// The exit status, when it exited.
    pub status: Option<ExitStatus>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error, or why it did not run.
    pub stderr: String,
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "`{}` failed ({status})", self.command)?,
            None => write!(f, "`{}` did not finish", self.command)?,
        }
        let stderr = self.stderr.trim();
        if !stderr.is_empty() {
            write!(f, ": {stderr}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CommandError {}

/// A finished command's exit status, stdout and stderr, for messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Renders a command line for messages.
pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `command` with stdin closed, kills it after `timeout`, and returns its output whatever
/// its exit status.
pub fn output_within(command: &mut Command, timeout: Duration) -> Result<CommandOutput, CommandError> {
    let line = describe(command);
    let failed = |stderr: String| CommandError {
        command: line.clone(),
        status: None,
        stdout: String::new(),
        stderr,
    };
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run it: {e}")))?;
    let stdout = child.stdout.take().map(drain);
    let stderr = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let collect = |reader: Option<std::thread::JoinHandle<String>>| {
        let Some(reader) = reader else {
            return String::new();
        };
        let until = Instant::now() + PIPE_GRACE;
        while !reader.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if reader.is_finished() {
            reader.join().unwrap_or_default()
        } else {
            String::from("<output not collected: a descendant still holds the pipe>")
        }
    };
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    match status {
        Some(status) => Ok(CommandOutput {
            status,
            stdout,
            stderr,
        }),
        None => Err(CommandError {
            command: line,
            status: None,
            stdout,
            stderr: format!("killed after {timeout:?}; stderr so far: {stderr}"),
        }),
    }
}

/// Runs `command` like [`output_within`] and fails unless it exits 0; returns its stdout.
pub fn run_within(command: &mut Command, timeout: Duration) -> Result<String, CommandError> {
    let line = describe(command);
    let output = output_within(command, timeout)?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(CommandError {
            command: line,
            status: Some(output.status),
            stdout: output.stdout,
            stderr: output.stderr,
        })
    }
}

/// How long to wait for a pipe's end once the program exited (a descendant it left running may
/// hold the pipe open; we then give up on the rest of the output rather than hang).
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// Reads a pipe to its end on a helper thread, so a chatty child never blocks on a full pipe.
fn drain<R: Read + Send + 'static>(mut reader: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = reader.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}
