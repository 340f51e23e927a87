//! The OCI bundle: reading its spec and the annotations that say what a container is in its pod.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

use crate::{Error, Result};

/// CRI annotation: "sandbox" or "container".
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI annotation: the pod sandbox id a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI annotation: the container's name in the pod spec.
pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
/// CRI annotation: the pod's name.
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// CRI annotation: the pod's namespace.
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// CRI annotation: the pod's uid.
pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
/// CRI annotation: the image a container runs.
pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";

/// A container's bundle directory.
#[derive(Debug, Clone)]
pub struct Bundle {
    path: PathBuf,
}

impl Bundle {
    /// The bundle at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The bundle directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.json")
    }

    /// The rootfs mount point.
    pub fn rootfs(&self) -> PathBuf {
        self.path.join("rootfs")
    }

    /// Reads and checks the runtime spec.
    pub fn spec(&self) -> Result<Spec> {
        let path = self.config_path();
        let text = std::fs::read(&path).map_err(|e| Error::io("read the OCI spec", &path, e))?;
        let spec: Spec = serde_json::from_slice(&text).map_err(|e| Error::Invalid {
            what: "OCI spec (config.json)",
            reason: e.to_string(),
        })?;
        if spec.process().is_none() {
            return Err(Error::Invalid {
                what: "OCI spec (config.json)",
                reason: "it has no process".into(),
            });
        }
        Ok(spec)
    }
}

/// A container's place in its pod, from its spec's CRI annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    /// The pod sandbox id (for the sandbox container, its own id).
    pub sandbox_id: Option<String>,
    /// Whether this is the sandbox (pause) container.
    pub is_sandbox: bool,
    /// Name in the pod spec (containers), or the pod's name (sandbox).
    pub name: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    pub image: Option<String>,
}

impl PodIdentity {
    /// Reads the identity from a spec's annotations.
    pub fn from_spec(spec: &Spec) -> Self {
        let empty = Default::default();
        let a = spec.annotations().as_ref().unwrap_or(&empty);
        let get = |k: &str| a.get(k).filter(|v| !v.is_empty()).cloned();
        let is_sandbox = get(CONTAINER_TYPE).as_deref() == Some("sandbox");
        Self {
            sandbox_id: get(SANDBOX_ID),
            is_sandbox,
            name: if is_sandbox {
                get(SANDBOX_NAME)
            } else {
                get(CONTAINER_NAME)
            },
            pod_name: get(SANDBOX_NAME),
            pod_namespace: get(SANDBOX_NAMESPACE),
            pod_uid: get(SANDBOX_UID),
            image: get(IMAGE_NAME),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_from_cri_annotations() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.sandbox-id": "abc",
                "io.kubernetes.cri.container-name": "app",
                "io.kubernetes.cri.sandbox-name": "webapp-123",
                "io.kubernetes.cri.sandbox-namespace": "default"
            }
        }))
        .expect("spec");
        let id = PodIdentity::from_spec(&spec);
        assert_eq!(id.sandbox_id.as_deref(), Some("abc"));
        assert!(!id.is_sandbox);
        assert_eq!(id.name.as_deref(), Some("app"));
        assert_eq!(id.pod_name.as_deref(), Some("webapp-123"));
    }

    #[test]
    fn broken_spec_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("config.json"), "{not json").expect("write");
        let err = Bundle::new(dir.path()).spec().expect_err("must fail");
        assert!(
            err.to_string().starts_with("invalid OCI spec (config.json)"),
            "{err}"
        );
    }
}
