//! `podsnap restore`: from a checkpoint directory, or pulled `--from` a registry first.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use podsnap_checkpoint::node::lease::LEASE_DIR;
use podsnap_checkpoint::node::store;
use podsnap_coordinator::dump::short;
use podsnap_coordinator::restore::{restore, RestoreRequest};
use podsnap_coordinator::{oci, pod, progress};

use super::args::RestoreArgs;
use super::Context;

/// `podsnap restore`.
pub(crate) fn run(ctx: Context, args: RestoreArgs) -> anyhow::Result<()> {
    let Context {
        runtime,
        config,
        checkpoint_root,
        runtime_endpoint,
        ..
    } = ctx;
    let mut pulled_name = None;
    let checkpoint_dir = match (args.checkpoint_dir, args.from) {
        (Some(dir), None) => dir,
        (None, Some(reference)) => {
            let name: String = format!(
                "pulled-{}-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                std::process::id()
            );
            let pull = oci::PullRequest {
                reference,
                dest: PathBuf::from(&name),
                checkpoint_root: checkpoint_root.clone(),
                policy: config.registry.clone(),
                config_name: config.describe(),
                restore_check: Some(oci::RestoreCheck {
                    namespace: args.namespace.clone(),
                    policy: config.restore.clone(),
                }),
            };
            let pulled = runtime
                .block_on(oci::pull(&pull))
                .with_context(|| format!("pull {}", pull.reference))?;
            println!("pulled       {} ({})", pull.reference, pulled.digest);
            pulled_name = Some(name);
            pulled.dir
        }
        _ => anyhow::bail!("restore takes one of --checkpoint-dir and --from"),
    };
    let request = RestoreRequest {
        runtime_endpoint,
        checkpoint_root,
        checkpoint_dir,
        namespace: args.namespace,
        name: args.name,
        pods_dir: args.pods_dir,
        logs_dir: args.logs_dir,
        handler: pod::HANDLER.to_owned(),
        config,
        keep_ip: args.keep_ip,
        lazy: args.lazy,
        sandbox_created: None,
    };
    if pulled_name.is_none() {
        if let Some(group) = podsnap_coordinator::group::load_group(&request.checkpoint_dir)? {
            let progress = progress::for_stderr();
            let restored = runtime.block_on(podsnap_coordinator::group::restore_group(
                &request,
                &group,
                progress.as_ref(),
                &|one, pod, ready| {
                    println!("--- pod {}/{}", pod.namespace, pod.name);
                    print_restored(one, pod);
                    if let Some(ready) = ready {
                        println!("ready        {ready}");
                    }
                },
            ));
            progress.finish();
            let pods =
                restored.with_context(|| format!("restore from {}", request.checkpoint_dir.display()))?;
            println!("group        {} pods restored", pods.len());
            return Ok(());
        }
    }
    let progress = progress::for_stderr();
    let restored = runtime.block_on(restore(&request, progress.as_ref()));
    progress.finish();
    if let (Err(_), Some(name)) = (&restored, &pulled_name) {
        // A refused or failed restore keeps nothing of what it pulled.
        if let Err(e) = store::remove(&request.checkpoint_root, name, Path::new(LEASE_DIR)) {
            log::warn!("the pulled checkpoint {name} stays in the root: {e}");
        }
    }
    let pod = restored.with_context(|| format!("restore from {}", request.checkpoint_dir.display()))?;
    print_restored(&request, &pod);
    Ok(())
}

/// What `podsnap restore` prints of a pod it made.
fn print_restored(request: &RestoreRequest, pod: &podsnap_coordinator::restore::RestoredPod) {
    println!("pod          {}/{} (uid {})", pod.namespace, pod.name, pod.uid);
    println!("id           {}", pod.id);
    println!("ip           {}", if pod.ip.is_empty() { "-" } else { &pod.ip });
    for (name, id) in &pod.containers {
        println!("restored     {name} ({})", short(id));
    }
    for (name, id) in &pod.completed {
        println!("completed    {name} ({}): not run again", short(id));
    }
    for (name, id) in &pod.left_created {
        println!(
            "created      {name} ({}): never started at the checkpoint, left created",
            short(id)
        );
    }
    for image in &pod.images_pulled {
        println!("image pulled {image} (it was not on this node)");
    }
    match &pod.imported {
        Some(imported) => println!(
            "checkpoint   {} (brought in as {}: {} files linked, {} copied; removed after the restore)",
            request.checkpoint_dir.display(),
            pod.checkpoint,
            imported.linked,
            imported.copied
        ),
        None => println!("checkpoint   {}", pod.checkpoint),
    }
    println!("took         {:.1?}", pod.took);
}
