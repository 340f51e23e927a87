//! `podsnap dump` and `podsnap migrate --to REF` (a dump, stopped, pushed while it finishes).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use podsnap_checkpoint::config::NodeConfig;
use podsnap_coordinator::dump::{dump as dump_pod, DumpRequest};
use podsnap_coordinator::group::Members;
use podsnap_coordinator::{oci, progress};

use super::args::{DumpArgs, MigrateArgs};
use super::registry::{push_checkpoint, push_request};
use super::Context;

/// `podsnap dump`.
pub(crate) fn dump(ctx: &Context, args: DumpArgs) -> anyhow::Result<()> {
    let members = match (&args.selector, args.pod.as_slice()) {
        (Some(selector), _) => Some(Members::selector(selector)?),
        (None, [_, _, ..]) => Some(Members::Named(args.pod.clone())),
        (None, _) => None,
    };
    let pod = args.pod.first().cloned().unwrap_or_default();
    let mut request = ctx.dump_request(args.namespace, pod, args.tcp_established, args.timeout);
    request.dir = args.dir;
    request.stop = args.stop && !args.leave_running;
    request.carry_volumes = args.volumes;
    if let Some(members) = members {
        anyhow::ensure!(
            args.push.is_none(),
            "--push takes one pod: push each pod's part of the group (podsnap push DIR/POD REF)"
        );
        return dump_group(ctx, &request, &members);
    }
    let push = args.push.map(|r| (r, args.zstd_level));
    dump_and_push(&ctx.runtime, &ctx.config, &request, push).map(drop)
}

/// `podsnap dump` of several pods at one instant.
fn dump_group(
    ctx: &Context,
    request: &podsnap_coordinator::dump::DumpRequest,
    members: &Members,
) -> anyhow::Result<()> {
    let progress = progress::for_stderr();
    let outcome = ctx.runtime.block_on(podsnap_coordinator::group::dump_group(
        request,
        members,
        progress.as_ref(),
    ));
    progress.finish();
    let outcome = outcome.with_context(|| format!("group dump in namespace {}", request.namespace))?;
    println!("group        {}", outcome.dir.display());
    for (pod, summary) in &outcome.pods {
        println!("--- pod {pod}");
        println!("{summary}");
    }
    println!(
        "took         {:.1?}{}",
        outcome.took,
        if request.stop { " (pods stopped)" } else { "" }
    );
    Ok(())
}

/// `podsnap migrate`.
pub(crate) fn migrate(ctx: &Context, args: MigrateArgs) -> anyhow::Result<()> {
    let mut request = ctx.dump_request(args.namespace, args.pod, args.tcp_established, args.timeout);
    request.stop = true;
    request.carry_volumes = args.volumes;
    // (clap does not check `requires` against an argument that conflicts with one given.)
    if args.listen.is_none() && (args.wait.is_some() || args.advertise.is_some()) {
        anyhow::bail!("--wait and --advertise go with --listen");
    }
    if let Some(listen) = &args.listen {
        let wait = args
            .wait
            .map(std::time::Duration::from_secs)
            .unwrap_or(podsnap_coordinator::migrate::live::CLAIM_WAIT);
        let target = super::receive::Target::Claimed {
            listen,
            advertise: args.advertise.as_deref(),
            wait,
        };
        return super::receive::migrate_to_node(ctx, &request, target);
    }
    let to = match (args.to, args.to_node) {
        (_, Some(node)) => {
            let target = super::receive::Target::Node {
                to: &node,
                copy: args.copy,
            };
            return super::receive::migrate_to_node(ctx, &request, target);
        }
        (Some(to), None) => to,
        (None, None) => anyhow::bail!("migrate takes --to REF, --to-node HOST:PORT or --listen HOST:PORT"),
    };
    let started = std::time::Instant::now();
    let (dumped, pushed) = dump_and_push(
        &ctx.runtime,
        &ctx.config,
        &request,
        Some((to.clone(), args.zstd_level)),
    )?;
    println!(
        "phases       dump {:.2?} (frozen {:.2?}), push {:.2?}; {:.2?} in all",
        dumped.took,
        dumped.frozen,
        pushed.unwrap_or_default(),
        started.elapsed()
    );
    println!("next         on the target node: podsnap restore --from {to}");
    Ok(())
}
/// What `dump_and_push` reports of its dump.
pub(crate) struct Dumped {
    took: std::time::Duration,
    frozen: std::time::Duration,
}

/// `podsnap dump`, then, with `push = Some((REF, level))`, `podsnap push` of the checkpoint it
/// wrote. Prints what each did; returns the dump's times and how long the push took.
pub(crate) fn dump_and_push(
    runtime: &tokio::runtime::Runtime,
    config: &NodeConfig,
    request: &DumpRequest,
    push: Option<(String, i32)>,
) -> anyhow::Result<(Dumped, Option<std::time::Duration>)> {
    // With a push, the container parts start uploading as soon as the dump announces them
    // (`<dest>.parts`), while it digests, writes the manifest and, with --stop, syncs.
    let mut request = request.clone();
    let early = match &push {
        Some((reference, zstd_level)) => {
            let dest = podsnap_coordinator::dump::destination(&request)?;
            request.dir = Some(dest.clone());
            let push = push_request(config, dest.clone(), reference.clone(), *zstd_level);
            let parts = Announcements::create(&dest)?;
            let early = runtime
                .block_on(oci::EarlyPush::start(&push, &dest, parts.0.clone()))
                .with_context(|| format!("push to {reference}"))?;
            Some((early, parts))
        }
        None => None,
    };
    let progress = progress::for_stderr();
    let outcome = runtime.block_on(dump_pod(&request, progress.as_ref()));
    progress.finish();
    let prebuilt = match early {
        Some((early, parts)) => {
            let prebuilt = runtime.block_on(early.finish());
            drop(parts);
            prebuilt
        }
        None => Default::default(),
    };
    let outcome = outcome.with_context(|| format!("dump of pod {}/{}", request.namespace, request.pod))?;
    println!("{}", outcome.summary);
    println!(
        "took         {:.1?}{}",
        outcome.took,
        if request.stop { " (pod stopped)" } else { "" }
    );
    let dumped = Dumped {
        took: outcome.took,
        frozen: outcome.summary.frozen,
    };
    let Some((reference, zstd_level)) = push else {
        return Ok((dumped, None));
    };
    let started = std::time::Instant::now();
    // The dump has just written and digested every file of it: no second pass before the push.
    let mut push = push_request(config, outcome.summary.dir.clone(), reference, zstd_level);
    push.just_dumped = true;
    push.prebuilt = prebuilt;
    let pushed = push_checkpoint(runtime, &push)?;
    println!(
        "pushed       {} ({} layers, {} uploaded, {} of them during the dump)",
        pushed.pushed,
        pushed.layers,
        pushed.uploaded + pushed.early,
        pushed.early
    );
    Ok((dumped, Some(started.elapsed())))
}

/// `<dest>.parts`, where a dump announces its complete container parts; removed on drop.
pub(crate) struct Announcements(PathBuf);

impl Announcements {
    fn create(dest: &Path) -> anyhow::Result<Announcements> {
        let dir = podsnap_checkpoint::format::layout::parts_dir(dest);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing a stale {}", dir.display()))
            }
            _ => {}
        }
        podsnap_checkpoint::fs::private::create_private_dir(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        Ok(Announcements(dir))
    }
}

impl Drop for Announcements {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            log::warn!("removing {}: {e}", self.0.display());
        }
    }
}
