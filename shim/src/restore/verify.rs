//! Verify, once per checkpoint for the pod's life in this shim: exactly the files its manifest
//! lists, the node's restore policy (namespace), this node can run it (architecture, CRIU,
//! kernel, CPU features), every digest (or the seal of a dump or pull that just hashed them).
//! Every container's Create passes the namespace rule again.

use std::path::Path;
use std::sync::Arc;

use podsnap_checkpoint::config::NodeConfig;
use podsnap_checkpoint::format::manifest::{Manifest, CPUINFO};
use podsnap_checkpoint::trust::policy::{self, Violation};
use podsnap_runtime::bundle::PodIdentity;

use super::open::Opened;
use super::pull::forget_pulled;
use super::{Restores, Verified};
use crate::error::{Error, Result};
use crate::exits::MonitorLauncher;
use crate::process::lock;

/// An opened checkpoint, verified for the pod.
pub struct Checked {
    pub opened: Opened,
    pub(super) verified: Arc<Verified>,
}

/// Verifies the opened checkpoint (once per pod); a sandbox refused here holds no lease and
/// keeps nothing it pulled.
pub async fn verify(r: &Restores, opened: Opened, identity: &PodIdentity) -> Result<Checked> {
    match r
        .verified(&opened.dir, &opened.name, &opened.config, identity)
        .await
    {
        Ok(verified) => Ok(Checked { opened, verified }),
        Err(e) => {
            if identity.is_sandbox {
                // The pod is refused: it holds nothing.
                lock(&r.leases).remove(&opened.dir);
            }
            forget_pulled(opened.pulled, identity, &opened.root).await;
            Err(e)
        }
    }
}

impl Restores {
    /// The checkpoint at `dir`, checked against the node's policy and verified, once per pod.
    async fn verified(
        &self,
        dir: &Path,
        name: &str,
        config: &NodeConfig,
        identity: &PodIdentity,
    ) -> Result<Arc<Verified>> {
        let refused = |v: Violation| Error::from(podsnap_checkpoint::Error::refused(name, v));
        let cached = lock(&self.verified).get(dir).cloned();
        let checked = match cached {
            Some(v) => v,
            None => {
                let d = dir.to_path_buf();
                let manifest = tokio::task::spawn_blocking(move || Manifest::load_listed(&d))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??;
                // The cheap refusals first: no digest of another namespace's checkpoint is read.
                policy::check_namespace(
                    &config.restore,
                    manifest.pod.namespace.as_deref(),
                    identity.pod_namespace.as_deref().unwrap_or(""),
                    &config.describe(),
                )
                .map_err(refused)?;
                // (Only CRIU's version, the kernel and the architecture are compared.)
                let here =
                    podsnap_checkpoint::trust::identity::this_node(&MonitorLauncher, Path::new("runc")).await;
                policy::check_host(&manifest.host, &here).map_err(refused)?;
                if manifest.lists(CPUINFO) {
                    let host_dir = dir.join(CPUINFO);
                    let host_dir = host_dir.parent().unwrap_or(dir);
                    podsnap_checkpoint::trust::identity::check_cpuinfo(&MonitorLauncher, host_dir)
                        .await
                        .map_err(refused)?;
                }
                // The digests of the manifest already checked (parsed and listed once); not
                // read again when podsnap sealed these very files (see
                // `podsnap_checkpoint::trust::seal`): right after the dump or pull that hashed them.
                let d = dir.to_path_buf();
                let (manifest, how) = tokio::task::spawn_blocking(move || {
                    let seals = Path::new(podsnap_checkpoint::trust::seal::SEAL_DIR);
                    manifest.verify_sealed(&d, seals).map(|how| (manifest, how))
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
                log::info!("checkpoint {name}: digests {how:?}");
                let v = Arc::new(Verified {
                    manifest,
                    node_id: here.node_id,
                });
                lock(&self.verified).insert(dir.to_path_buf(), v.clone());
                return Ok(v);
            }
        };
        // Every container of the pod passes the namespace rule, not only the sandbox.
        policy::check_namespace(
            &config.restore,
            checked.manifest.pod.namespace.as_deref(),
            identity.pod_namespace.as_deref().unwrap_or(""),
            &config.describe(),
        )
        .map_err(refused)?;
        Ok(checked)
    }
}
