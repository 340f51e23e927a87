//! `podsnap://` restores (kubelet's path of a live migration): the shim of the pod's sandbox
//! runs `podsnap receive --from`, which claims the pod from its source, puts its checkpoint in
//! the node's root as `live-<sandbox>` and then carries its memory; the checkpoint is removed
//! with the pod (`pull::remove_pulled`).

use std::path::Path;

use podsnap_checkpoint::config::RESTORE_ANNOTATION;
use podsnap_runtime::bundle::PodIdentity;

use super::pull::name_for_pod;
use crate::error::{Error, Result};

/// The name in the checkpoint root of the checkpoint a live migration sent to the pod with
/// sandbox id `sandbox` (a `podsnap://` restore): `live-` and the id's first 16 characters, as
/// [`super::pull::pulled_name`].
pub fn claimed_name(sandbox: &str) -> Result<String> {
    name_for_pod("live-", sandbox)
}

/// The `podsnap receive --from` of each pod still receiving (sandbox id, its pid).
static CLAIMS: std::sync::Mutex<Vec<(String, u32)>> = std::sync::Mutex::new(Vec::new());

/// How long a claim may take to put the checkpoint in place.
const CLAIM_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// Stops the `podsnap receive --from` of pod `sandbox`, if one runs (its pod was refused or
/// removed): its source then resumes its own pod.
pub(super) fn stop_claim(sandbox: &str) {
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
