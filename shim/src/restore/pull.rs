//! `oci://` restores: the checkpoint is pulled into the node's checkpoint root for the pod,
//! once, by `podsnap pull` (the node's registry rules apply), and removed with the pod (as
//! a live migration's received one is, `claim.rs`).

use std::path::Path;

use podsnap_checkpoint::config::RESTORE_ANNOTATION;
use podsnap_checkpoint::node::lease::LEASE_DIR;
use podsnap_runtime::bundle::PodIdentity;

use crate::error::{Error, Result};
use crate::exits::MonitorLauncher;

/// A restore annotation naming a checkpoint in an OCI registry: `oci://REF`.
pub const OCI_PREFIX: &str = "oci://";

/// The name in the checkpoint root of the copy of an `oci://` checkpoint pulled for the pod
/// with sandbox id `sandbox`: it belongs to that pod, and goes when the pod is refused or
/// removed ([`remove_pulled`]). `oci-` and the id's first 16 characters; the id must be a
/// containerd identifier (ASCII letters and digits, `.`, `_`, `-` between them: CRI's are
/// hex), so the name is one path component of ASCII (the annotation comes from the pod spec:
/// a `/`, a `..` or a multi-byte character is refused, not sliced).
pub fn pulled_name(sandbox: &str) -> Result<String> {
    name_for_pod("oci-", sandbox)
}

/// `prefix` and the first 16 characters of `sandbox`, a containerd identifier.
pub(super) fn name_for_pod(prefix: &str, sandbox: &str) -> Result<String> {
    let valid = sandbox.len() <= 76
        && sandbox.starts_with(|c: char| c.is_ascii_alphanumeric())
        && sandbox
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: the pod's sandbox id {sandbox:?} is not a containerd identifier \
             (ASCII letters, digits, '.', '_', '-'): no checkpoint is pulled for it"
        )));
    }
    Ok(format!("{prefix}{}", &sandbox[..sandbox.len().min(16)]))
}

/// Removes the copies pulled or received for the pod with sandbox id `sandbox` from `root`, if
/// there are (never while a lease holds one: a lazy restore's daemon may still read it); a
/// live migration still receiving for it is stopped first.
pub fn remove_pulled(root: &Path, sandbox: &str) {
    super::claim::stop_claim(sandbox);
    // Nothing was pulled for an id that names none.
    for name in [pulled_name(sandbox), super::claim::claimed_name(sandbox)]
        .into_iter()
        .flatten()
    {
        if std::fs::symlink_metadata(root.join(&name)).is_err() {
            continue;
        }
        match podsnap_checkpoint::node::store::remove(root, &name, Path::new(LEASE_DIR)) {
            Ok(_) => log::info!("pod {sandbox}: removed checkpoint {name}, fetched for it"),
            Err(e) => log::warn!("pod {sandbox}: the checkpoint {name} fetched for it stays: {e}"),
        }
    }
}

/// Pulls the checkpoint at `reference` into the checkpoint root for the pod of `identity`, once
/// per pod (the sandbox's plan pulls it, its containers' find it): `podsnap pull`, so the
/// node's `[registry]` rules apply (allowed registries, trusted signing keys), the restore
/// policy is checked against the checkpoint's manifest before any layer is downloaded
/// (`--for-namespace`), and every digest is checked before the checkpoint lands in the root.
/// Returns its name there.
pub async fn pull_for_pod(reference: &str, identity: &PodIdentity, root: &Path) -> Result<String> {
    let sandbox = identity.sandbox_id.as_deref().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: {OCI_PREFIX}{reference}: no sandbox id"
        ))
    })?;
    let name = pulled_name(sandbox)?;
    if root.join(&name).is_dir() {
        return Ok(name);
    }
    if !identity.is_sandbox {
        return Err(Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: {OCI_PREFIX}{reference} was not pulled at the pod's creation"
        )));
    }
    let mut cmd = std::process::Command::new("podsnap");
    cmd.arg("pull")
        .arg(reference)
        .arg(&name)
        .arg("--for-namespace")
        .arg(identity.pod_namespace.as_deref().unwrap_or(""))
        .env("PODSNAP_CHECKPOINT_ROOT", root)
        .stdin(std::process::Stdio::null());
    log::info!("pod {sandbox}: pulling checkpoint {reference} as {name}");
    let out = podsnap_runtime::launcher::Launcher::run(
        &MonitorLauncher,
        cmd,
        podsnap_runtime::launcher::Capture::Output,
    )
    .await
    .map_err(|e| Error::InvalidArgument(format!("{RESTORE_ANNOTATION}: podsnap pull {reference}: {e}")))?;
    if !out.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::InvalidArgument(format!(
            "{RESTORE_ANNOTATION}: {OCI_PREFIX}{reference}: {}",
            stderr.trim().trim_start_matches("podsnap: error: ")
        )));
    }
    Ok(name)
}

/// A pod refused at its sandbox's Create does not keep what was pulled for it.
pub async fn forget_pulled(pulled: bool, identity: &PodIdentity, root: &Path) {
    if let (true, true, Some(sandbox)) = (pulled, identity.is_sandbox, identity.sandbox_id.as_deref()) {
        let (root, sandbox) = (root.to_path_buf(), sandbox.to_owned());
        let _ = tokio::task::spawn_blocking(move || remove_pulled(&root, &sandbox)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulled_checkpoint_is_named_after_a_valid_sandbox_id_only() {
        let hex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            pulled_name(hex).expect("a CRI sandbox id"),
            "oci-0123456789abcdef"
        );
        assert_eq!(pulled_name("web-1").expect("a short id"), "oci-web-1");
        // A multi-byte character across the 16th byte, a path, and nothing at all: refused
        // with the id quoted, never a panic or a name outside the root.
        for bad in [
            "aaaaaaaaaaaaaaa\u{e9}tail",
            "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}",
            "../../etc",
            "a/b",
            ".hidden",
            "",
        ] {
            let e = pulled_name(bad).expect_err(bad).to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
