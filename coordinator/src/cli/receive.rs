//! `podsnap receive --listen ADDR` and `podsnap migrate --to-node HOST:PORT`: direct
//! migration between two nodes over the `[migration]` channel.

use std::io::Write;

use anyhow::Context as _;
use podsnap_coordinator::dump::{short, DumpRequest};
use podsnap_coordinator::migrate::{live, short_id, source, target, Endpoint};
use podsnap_coordinator::restore::RestoreRequest;
use podsnap_coordinator::summary::human_bytes;
use podsnap_coordinator::{pod, progress};

use super::args::{DrainArgs, ReceiveArgs};
use super::Context;

/// This node's migration endpoint, from `[migration]` of the node configuration.
fn endpoint(ctx: &Context) -> anyhow::Result<Endpoint> {
    // The channel's tasks need the runtime (the writer task is spawned on it).
    let _entered = ctx.runtime.enter();
    Endpoint::from_policy(&ctx.config.migration, &ctx.config.describe())
        .context("the node's [migration] key and peers")
}

/// `podsnap receive`.
pub(crate) fn run(ctx: &Context, args: ReceiveArgs) -> anyhow::Result<()> {
    if let Some(from) = &args.from {
        return claim(ctx, from, &args);
    }
    let endpoint = endpoint(ctx)?;
    let mut restore = RestoreRequest::new(ctx.checkpoint_root.clone());
    restore.runtime_endpoint = ctx.runtime_endpoint.clone();
    restore.checkpoint_root = ctx.checkpoint_root.clone();
    restore.pods_dir = args.pods_dir;
    restore.logs_dir = args.logs_dir;
    restore.handler = pod::HANDLER.to_owned();
    restore.config = ctx.config.clone();
    let request = target::ReceiveRequest {
        listen: args.listen.unwrap_or_default(),
        restore,
        once: args.once,
    };
    let progress = progress::for_stderr();
    let key = endpoint.key_id().to_owned();
    let listening = move |addr: std::net::SocketAddr| {
        println!("listening    {addr} (this node's key {key})");
        let _ = std::io::stdout().flush();
    };
    let done = |outcome: &podsnap_coordinator::Result<target::Received>| {
        match outcome {
            Ok(r) => {
                println!("received     {} from {}", r.dir.display(), r.peer);
                println!("files        {} ({})", r.files, human_bytes(r.bytes));
                println!(
                    "pod          {}/{} (uid {})",
                    r.pod.namespace, r.pod.name, r.pod.uid
                );
                println!("id           {}", r.pod.id);
                println!(
                    "ip           {}",
                    if r.pod.ip.is_empty() { "-" } else { &r.pod.ip }
                );
                for (name, id) in &r.pod.containers {
                    println!("restored     {name} ({})", short(id));
                }
            }
            Err(e) => println!("failed       {e:#}"),
        }
        let _ = std::io::stdout().flush();
    };
    ctx.runtime
        .block_on(target::receive(
            &request,
            &endpoint,
            progress.as_ref(),
            &listening,
            &done,
        ))
        .context("podsnap receive")?;
    Ok(())
}

/// Where `podsnap migrate` moves a pod to another node.
pub(crate) enum Target<'a> {
    /// `--to-node HOST:PORT` (`--copy`: not live).
    Node { to: &'a str, copy: bool },
    /// `--listen HOST:PORT`: the node that claims the pod with its ticket (kubelet's path).
    Claimed {
        listen: &'a str,
        advertise: Option<&'a str>,
        wait: std::time::Duration,
    },
}

/// `podsnap receive --from podsnap://HOST:PORT/TICKET` (the shim runs it): one line on stdout,
/// `received NAME` once the checkpoint is in place or `failed REASON` before; the rest on
/// stderr (the shim's log).
fn claim(ctx: &Context, from: &str, args: &ReceiveArgs) -> anyhow::Result<()> {
    use podsnap_coordinator::migrate::claim::{receive_claimed, ClaimRequest, RUNNING_DEADLINE};
    let said = std::sync::atomic::AtomicBool::new(false);
    let say = |line: &str| {
        if !said.swap(true, std::sync::atomic::Ordering::SeqCst) {
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
    };
    let outcome = (|| {
        let endpoint = endpoint(ctx)?;
        let mut restore = RestoreRequest::new(ctx.checkpoint_root.clone());
        restore.runtime_endpoint = ctx.runtime_endpoint.clone();
        restore.checkpoint_root = ctx.checkpoint_root.clone();
        restore.config = ctx.config.clone();
        let request = ClaimRequest {
            reference: from.to_owned(),
            name: args.into.clone().unwrap_or_default(),
            sandbox: args.sandbox.clone().unwrap_or_default(),
            namespace: args.for_namespace.clone().unwrap_or_default(),
            restore,
            deadline: RUNNING_DEADLINE,
        };
        let progress = progress::Lines;
        let ready = |name: &str| say(&format!("received {name}"));
        ctx.runtime
            .block_on(receive_claimed(&request, &endpoint, &progress, &ready))
            .with_context(|| format!("receive the pod claimed with {from}"))
    })();
    if let Err(e) = &outcome {
        say(&format!("failed {}", format!("{e:#}").replace('\n', " ")));
    }
    outcome
}

/// `podsnap migrate --to-node HOST:PORT` or `--listen HOST:PORT`.
pub(crate) fn migrate_to_node(ctx: &Context, request: &DumpRequest, target: Target) -> anyhow::Result<()> {
    let endpoint = endpoint(ctx)?;
    let progress = progress::for_stderr();
    let ticketed = |reference: &str| {
        println!("ticket       {reference}");
        let _ = std::io::stdout().flush();
    };
    let moved = ctx.runtime.block_on(async {
        match target {
            Target::Node { to, copy: true } => {
                source::migrate_to_node(request, to, &endpoint, progress.as_ref())
                    .await
                    .map(|moved| (moved, None))
            }
            Target::Node { to, copy: false } => live::migrate_live(request, to, &endpoint, progress.as_ref())
                .await
                .map(|(moved, memory)| (moved, Some(memory))),
            Target::Claimed {
                listen,
                advertise,
                wait,
            } => live::migrate_live_claimed(
                request,
                listen,
                advertise,
                wait,
                &endpoint,
                progress.as_ref(),
                &ticketed,
            )
            .await
            .map(|(moved, memory)| (moved, Some(memory))),
        }
    });
    progress.finish();
    let (moved, memory) = moved.with_context(|| {
        let to = match target {
            Target::Node { to, .. } => to.to_owned(),
            Target::Claimed { listen, .. } => format!("the node that claims it at {listen}"),
        };
        format!("migrate pod {}/{} to {to}", request.namespace, request.pod)
    })?;
    println!("moved        {} to {}", moved.pod, moved.target);
    println!(
        "target pod   {} (sandbox {}, ip {})",
        moved.restored_pod,
        short(&moved.restored_id),
        if moved.restored_ip.is_empty() {
            "-"
        } else {
            &moved.restored_ip
        }
    );
    println!("containers   {}", moved.containers.join(", "));
    println!(
        "sent         {} files ({})",
        moved.files,
        human_bytes(moved.bytes)
    );
    println!("checkpoint   {} (kept on this node)", moved.checkpoint.display());
    println!(
        "phases       dump {:.2?}, send {:.2?}, restore {:.2?}; paused {:.2?} in all",
        moved.dump, moved.send, moved.restore, moved.paused_for
    );
    if let Some(memory) = memory {
        println!(
            "memory       {} served from here after the dump, {} of it after the switch ({} of \
             requests); every page there {:.2?} after the switch; source released {:.2?} after \
             the switch ({} processes stopped)",
            human_bytes(memory.sent),
            human_bytes(memory.sent_after_switch),
            human_bytes(memory.received),
            memory.filled,
            memory.window,
            memory.killed
        );
    }
    println!(
        "source       stopped at the snapshot (key {})",
        short_id(endpoint.key_id())
    );
    Ok(())
}

/// `podsnap drain --to-node HOST:PORT`.
pub(crate) fn drain(ctx: &Context, args: DrainArgs) -> anyhow::Result<()> {
    use podsnap_coordinator::migrate::drain::{drain, DrainRequest, Drained};
    let endpoint = endpoint(ctx)?;
    let request = DrainRequest {
        each: ctx.dump_request(String::new(), String::new(), args.tcp_established, args.timeout),
        to: args.to_node.clone(),
        parallel: usize::from(args.parallel),
    };
    // Several pods move at once: plain lines, each naming its pod (no spinner).
    let progress = progress::Lines;
    let each = |d: &Drained| {
        match &d.outcome {
            Ok(m) => println!(
                "moved        {} to {} ({}; paused {:.2?})",
                d.pod,
                m.target,
                human_bytes(m.bytes),
                m.paused_for
            ),
            Err(e) => println!("left         {} running here: {}", d.pod, first_line(e)),
        }
        let _ = std::io::stdout().flush();
    };
    let drained = ctx
        .runtime
        .block_on(drain(&request, &endpoint, &progress, &each))
        .with_context(|| format!("drain this node to {}", args.to_node))?;
    println!();
    println!("{:<40} {:>10} {:>10}  result", "pod", "downtime", "bytes");
    for d in &drained {
        match &d.outcome {
            Ok(m) => println!(
                "{:<40} {:>9.2}s {:>10}  moved to {}",
                d.pod,
                m.paused_for.as_secs_f64(),
                human_bytes(m.bytes),
                m.target
            ),
            Err(e) => println!(
                "{:<40} {:>10} {:>10}  left running: {}",
                d.pod,
                "-",
                "-",
                first_line(e)
            ),
        }
    }
    let failed: Vec<&str> = drained
        .iter()
        .filter(|d| d.outcome.is_err())
        .map(|d| d.pod.as_str())
        .collect();
    println!(
        "drained      {} of {} pods",
        drained.len() - failed.len(),
        drained.len()
    );
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of {} pods could not move and run here still: {}",
            failed.len(),
            drained.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// The first line of a (multi-line) error.
fn first_line(e: &str) -> &str {
    e.lines().next().unwrap_or_default()
}
