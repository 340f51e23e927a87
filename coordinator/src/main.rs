//! `podsnap`: checkpoint a whole Kubernetes pod on this node and bring it back.
//!
//! The command line is in `cli/args.rs`; each command group has its file under `cli/`, over the
//! library's modules (`podsnap_coordinator`).

use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::args::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Node(_) | Command::Receive(_)) {
        // The installer's steps are worth seeing in a pod's log; `receive` serves for long,
        // and what it refuses (a peer, a pod's shim on a page stream) is logged.
        cli::logging::init();
    }
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podsnap: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
