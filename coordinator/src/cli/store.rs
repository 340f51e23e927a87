//! The node's checkpoint root: `podsnap list`, `podsnap rm`, `podsnap inspect`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use podsnap_checkpoint::node::lease::LEASE_DIR;
use podsnap_checkpoint::node::store;
use podsnap_coordinator::summary::human_bytes;
use podsnap_coordinator::{inspect, list, progress};

use super::args::{ListArgs, Output};
use super::Context;

/// `podsnap list`.
pub(crate) fn list(ctx: &Context, args: ListArgs) -> anyhow::Result<()> {
    let checkpoint_root = &ctx.checkpoint_root;
    let progress = progress::for_stderr();
    let rows = list::list(
        checkpoint_root,
        Path::new(LEASE_DIR),
        args.verify,
        progress.as_ref(),
    );
    progress.finish();
    let rows = rows.with_context(|| format!("list {}", checkpoint_root.display()))?;
    match args.output {
        Output::Table => println!("{}", list::table(&rows)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("encode the list")?
        ),
    }
    Ok(())
}

/// `podsnap rm NAME...`.
pub(crate) fn rm(ctx: &Context, names: Vec<String>) -> anyhow::Result<()> {
    let checkpoint_root = &ctx.checkpoint_root;
    let mut refused = 0;
    for name in &names {
        match store::remove(checkpoint_root, name, Path::new(LEASE_DIR)) {
            Ok(removed) => println!(
                "removed      {}{}",
                removed.name,
                match (&removed.pod, removed.bytes) {
                    (Some(pod), Some(bytes)) => format!(" (pod {pod}, {})", human_bytes(bytes)),
                    _ => " (broken)".to_owned(),
                }
            ),
            Err(e) => {
                eprintln!("podsnap: error: {e}");
                refused += 1;
            }
        }
    }
    if refused > 0 {
        anyhow::bail!("{refused} of {} checkpoints not removed", names.len());
    }
    Ok(())
}

/// `podsnap inspect DIR` (`-o json`: [`inspect::inspect_json`]).
pub(crate) fn inspect(ctx: &Context, dir: PathBuf, output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        let inspected = inspect::inspect_json(&dir).with_context(|| format!("inspect {}", dir.display()))?;
        println!(
            "{}",
            serde_json::to_string_pretty(&inspected).context("encode the checkpoint")?
        );
        if let Some(problem) = inspected.problem {
            anyhow::bail!("inspect {}: {problem}", dir.display());
        }
        return Ok(());
    }
    let checkpoint_root = &ctx.checkpoint_root;
    let summary =
        inspect::inspect(&dir, checkpoint_root).with_context(|| format!("inspect {}", dir.display()))?;
    println!("{summary}");
    println!("digests      all {} verified", human_bytes(summary.bytes));
    Ok(())
}
