//! `podsnap push` and `podsnap pull`: checkpoints as signed OCI artifacts.

use std::path::PathBuf;

use anyhow::Context as _;
use podsnap_checkpoint::config::NodeConfig;
use podsnap_coordinator::oci;
use podsnap_coordinator::summary::human_bytes;

use super::Context;

/// `podsnap push DIR REF`.
pub(crate) fn push(ctx: &Context, dir: PathBuf, reference: String, zstd_level: i32) -> anyhow::Result<()> {
    let Context { runtime, config, .. } = ctx;
    let pushed = push_checkpoint(runtime, &push_request(config, dir, reference, zstd_level))?;
    println!("pushed       {}", pushed.pushed);
    println!(
        "layers       {} ({} uploaded, {}; {} already in the registry)",
        pushed.layers,
        pushed.uploaded,
        human_bytes(pushed.uploaded_bytes),
        pushed.layers - pushed.uploaded
    );
    match &pushed.signed_by {
        Some(key) => println!("signed by    key {key}"),
        None => println!("signed by    nobody (allow_unsigned)"),
    }
    Ok(())
}

/// `podsnap pull REF DIR`.
pub(crate) fn pull(
    ctx: &Context,
    reference: String,
    dir: PathBuf,
    for_namespace: Option<String>,
) -> anyhow::Result<()> {
    let Context {
        runtime,
        config,
        checkpoint_root,
        ..
    } = ctx;
    let request = oci::PullRequest {
        reference,
        dest: dir,
        checkpoint_root: checkpoint_root.clone(),
        policy: config.registry.clone(),
        config_name: config.describe(),
        restore_check: for_namespace.map(|namespace| oci::RestoreCheck {
            namespace: Some(namespace),
            policy: config.restore.clone(),
        }),
    };
    let pulled = runtime
        .block_on(oci::pull(&request))
        .with_context(|| format!("pull {}", request.reference))?;
    println!("pulled       {} ({})", request.reference, pulled.digest);
    println!("checkpoint   {}", pulled.dir.display());
    println!("layers       {} ({})", pulled.layers, human_bytes(pulled.bytes));
    match &pulled.verified_by {
        Some(key) => println!("verified by  trusted key {key}"),
        None => println!("verified by  nobody (allow_unsigned)"),
    }
    Ok(())
}

/// A push of `dir` to `reference` under the node's `[registry]` rules.
pub(crate) fn push_request(
    config: &NodeConfig,
    dir: PathBuf,
    reference: String,
    zstd_level: i32,
) -> oci::PushRequest {
    oci::PushRequest {
        dir,
        reference,
        policy: config.registry.clone(),
        config_name: config.describe(),
        zstd_level,
        just_dumped: false,
        prebuilt: Default::default(),
    }
}

/// `podsnap push DIR REF`.
pub(crate) fn push_checkpoint(
    runtime: &tokio::runtime::Runtime,
    request: &oci::PushRequest,
) -> anyhow::Result<oci::PushOutcome> {
    runtime
        .block_on(oci::push(request))
        .with_context(|| format!("push {} to {}", request.dir.display(), request.reference))
}
