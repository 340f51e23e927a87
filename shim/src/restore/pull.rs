//! `oci://` restores: the checkpoint is pulled into the node's checkpoint root for the pod,
//! once, by `podsnap pull` (the node's registry rules apply), and removed with the pod.

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

/// The name in the checkpoint root of the checkpoint a live migration sent to the pod with
/// sandbox id `sandbox` (a `podsnap://` restore): `live-` and the id's first 16 characters, as
/// [`pulled_name`].
pub fn claimed_name(sandbox: &str) -> Result<String> {
    name_for_pod("live-", sandbox)
}

/// `prefix` and the first 16 characters of `sandbox`, a containerd identifier.
fn name_for_pod(prefix: &str, sandbox: &str) -> Result<String> {
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
    stop_claim(sandbox);
    // Nothing was pulled for an id that names none.
    for name in [pulled_name(sandbox), claimed_name(sandbox)]
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

/// The `podsnap receive --from` of each pod still receiving (sandbox id, its pid).
static CLAIMS: std::sync::Mutex<Vec<(String, u32)>> = std::sync::Mutex::new(Vec::new());

/// How long a claim may take to put the checkpoint in place.
const CLAIM_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// Stops the `podsnap receive --from` of pod `sandbox`, if one runs (its pod was refused or
/// removed): its source then resumes its own pod.
fn stop_claim(sandbox: &str) {
    let pid = {
        let mut claims = crate::process::lock(&CLAIMS);
        let found = claims.iter().position(|(s, _)| s == sandbox);
        found.map(|i| claims.swap_remove(i).1)
    };
    if let Some(pid) = pid {
        // Not reaped while it runs (the shim's reaper takes it when it exits): the pid is its.
        if Path::new(&format!("/proc/{pid}")).exists() {
            log::info!("pod {sandbox}: stopping its live migration's receiver (pid {pid})");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// Claims the pod a live migration's source offers at `reference` (`podsnap://HOST:PORT/TICKET`,
/// from `podsnap migrate --listen`) for the pod of `identity`, once per pod (the sandbox's
/// Create claims it, its containers find it): starts `podsnap receive --from`, which connects
/// with the node's `[migration]` key, checks the pod against the restore policy, puts the
/// checkpoint (without its memory) in the root and says so, then stays to carry the memory of
/// this pod's containers to their lazy restores. Returns the checkpoint's name there.
pub async fn claim_for_pod(reference: &str, identity: &PodIdentity, root: &Path) -> Result<String> {
    use podsnap_checkpoint::format::layout::{parse_live_reference, LIVE_PREFIX};
    let refused = |why: String| {
        Error::InvalidArgument(format!("{RESTORE_ANNOTATION}: {LIVE_PREFIX}{reference}: {why}"))
    };
    parse_live_reference(reference)
        .map_err(|e| Error::InvalidArgument(format!("{RESTORE_ANNOTATION}: {e}")))?;
    let sandbox = identity
        .sandbox_id
        .as_deref()
        .ok_or_else(|| refused("no sandbox id".into()))?;
    let name = claimed_name(sandbox)?;
    if root.join(&name).is_dir() {
        return Ok(name);
    }
    if !identity.is_sandbox {
        return Err(refused("the pod was not claimed at its creation".into()));
    }
    // containerd tells its shims where its API is; the receiver polls CRI there.
    let grpc = std::env::var("GRPC_ADDRESS")
        .ok()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            refused("containerd gave this shim no GRPC_ADDRESS (containerd 1.7 or later does)".into())
        })?;
    let mut cmd = std::process::Command::new("podsnap");
    cmd.arg("receive")
        .arg("--from")
        .arg(format!("{LIVE_PREFIX}{reference}"))
        .arg("--into")
        .arg(&name)
        .arg("--sandbox")
        .arg(sandbox)
        .arg("--for-namespace")
        .arg(identity.pod_namespace.as_deref().unwrap_or(""))
        .env("PODSNAP_CHECKPOINT_ROOT", root)
        .env(
            "CONTAINER_RUNTIME_ENDPOINT",
            format!("unix://{}", grpc.trim_start_matches("unix://")),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    log::info!("pod {sandbox}: claiming the pod offered at {LIVE_PREFIX}{reference} as {name}");
    let mut child = cmd
        .spawn()
        .map_err(|e| refused(format!("podsnap receive --from: {e}")))?;
    let pid = child.id();
    let stdout = child.stdout.take();
    // Its progress and log lines go into the shim's log, for as long as it runs.
    if let Some(err) = child.stderr.take() {
        let who = format!("pod {sandbox}: receive (pid {pid})");
        let _ = std::thread::Builder::new()
            .name("claim-log".into())
            .spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(err)
                    .lines()
                    .map_while(std::result::Result::ok)
                {
                    log::info!("{who}: {line}");
                }
            });
    }
    // The shim's reaper waits for it once it exits; it is not waited for here.
    drop(child);
    crate::process::lock(&CLAIMS).push((sandbox.to_owned(), pid));
    let first = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        if let Some(out) = stdout {
            let _ = std::io::BufReader::new(out).read_line(&mut line);
        }
        line
    });
    let line = match tokio::time::timeout(CLAIM_DEADLINE, first).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => {
            stop_claim(sandbox);
            return Err(refused(format!("podsnap receive --from: {e}")));
        }
        Err(_) => {
            stop_claim(sandbox);
            return Err(refused(format!(
                "the checkpoint was not in place within {CLAIM_DEADLINE:?}"
            )));
        }
    };
    let line = line.trim_end();
    match line.strip_prefix("received ") {
        Some(got) if got == name => Ok(name),
        _ => {
            stop_claim(sandbox);
            let why = line.strip_prefix("failed ").unwrap_or(line);
            let why = why.trim_start_matches("podsnap: error: ");
            Err(refused(if why.is_empty() {
                "podsnap receive --from ended without a word (see the shim's log)".into()
            } else {
                why.to_owned()
            }))
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
