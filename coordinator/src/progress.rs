//! What a long operation tells its operator while it runs: a spinner for a person at a terminal,
//! plain lines for logs and pipes, nothing for library callers that do not care.

use std::io::IsTerminal;
use std::time::Duration;

/// Receives the steps of an operation as they begin.
pub trait Progress: Send + Sync {
    /// A new step begins (`"checkpointing pod default/web"`).
    fn step(&self, message: &str);
    /// The operation is over (successfully or not): clear any live display.
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Progress for Quiet {
    fn step(&self, _message: &str) {}
}

/// One line per step on stderr, for logs and pipes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Lines;

impl Progress for Lines {
    fn step(&self, message: &str) {
        eprintln!("podsnap: {message}");
    }
}

/// A spinner on stderr with the current step and the time spent in it.
#[derive(Debug)]
pub struct Spinner {
    bar: indicatif::ProgressBar,
}

impl Spinner {
    pub fn new() -> Self {
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(100));
        Self { bar }
    }
}

impl Default for Spinner {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Spinner {
    fn step(&self, message: &str) {
        // Keep finished steps visible above the spinner, with how long they took.
        if let Some(previous) = Some(self.bar.message()).filter(|m| !m.is_empty()) {
            self.bar
                .println(format!("  {previous} ({:.1?})", self.bar.elapsed()));
            self.bar.reset_elapsed();
        }
        self.bar.set_message(message.to_owned());
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A spinner when stderr is a terminal, plain lines otherwise.
pub fn for_stderr() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Spinner::new())
    } else {
        Box::new(Lines)
    }
}
