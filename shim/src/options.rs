//! Which runc a container runs with and how: containerd's runtime options (runc's `Options`)
//! turned into our own types, checked ids, and the runc choice recorded in the bundle so that
//! `delete` after a shim died reaches the container where it was created.
//!
//! The record (`podsnap-runc.json` in the bundle, 0600) is written at Create, before runc runs:
//!
//! ```text
//! {"binary": "runc", "root": "/run/podsnap/runc/<namespace>", "systemd_cgroup": false}
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::Options;
use podsnap_runtime::runc::Runc;
use serde::{Deserialize, Serialize};

use crate::container::write_private;
use crate::error::{Error, Result};
use crate::exits::MonitorLauncher;

/// Where runc keeps state for podsnap containers, per containerd namespace.
pub const RUNC_ROOT: &str = "/run/podsnap/runc";

/// The file in a container's bundle that records its runc.
pub const RUNC_RECORD: &str = "podsnap-runc.json";

/// The most of a runc record read back (it holds two paths and a flag).
const RUNC_RECORD_CAP: u64 = 16 * 1024;

/// runc options that apply to one container.
#[derive(Debug, Clone, Default)]
pub struct RuncFlags {
    pub no_pivot: bool,
    pub no_new_keyring: bool,
}

/// The runc a container runs with: its binary, its state directory and its cgroup driver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuncChoice {
    pub binary: PathBuf,
    pub root: PathBuf,
    #[serde(default)]
    pub systemd_cgroup: bool,
}

impl RuncChoice {
    /// podsnap's defaults for a containerd namespace.
    pub fn default_for(namespace: &str) -> Self {
        Self {
            binary: PathBuf::from("runc"),
            root: Path::new(RUNC_ROOT).join(namespace),
            systemd_cgroup: false,
        }
    }

    /// A runc client for this choice, waiting through the shim's reaper.
    pub fn runc(&self) -> Runc {
        Runc::new(&self.binary, &self.root, Arc::new(MonitorLauncher))
            .with_systemd_cgroup(self.systemd_cgroup)
    }

    /// Records the choice in the container's bundle, readable by root only.
    pub async fn record(&self, bundle: &Path) -> Result<()> {
        let json = serde_json::to_vec(self).map_err(|e| Error::Internal(e.to_string()))?;
        write_private(&bundle.join(RUNC_RECORD), &json).await
    }

    /// The choice recorded in `bundle`: `Ok(None)` when there is no record.
    pub fn recorded(bundle: &Path) -> std::io::Result<Option<Self>> {
        let path = bundle.join(RUNC_RECORD);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut raw = Vec::new();
        file.take(RUNC_RECORD_CAP + 1).read_to_end(&mut raw)?;
        if raw.len() as u64 > RUNC_RECORD_CAP {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is larger than {RUNC_RECORD_CAP} bytes", path.display()),
            ));
        }
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// Ids name files and sockets: refuse anything that could escape a directory.
pub fn validate_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 256 || id.contains('/') || id == "." || id == ".." || id.contains('\0') {
        return Err(Error::InvalidArgument(format!("{id:?} is not a valid id")));
    }
    Ok(())
}

/// runc and its flags as the create request's runtime options ask.
pub fn runc_from_options(namespace: &str, options: Option<&Any>) -> Result<(RuncChoice, RuncFlags)> {
    let mut choice = RuncChoice::default_for(namespace);
    let mut flags = RuncFlags::default();
    let Some(any) = options.filter(|a| !a.value.is_empty() || !a.type_url.is_empty()) else {
        return Ok((choice, flags));
    };
    if !any.type_url.ends_with("containerd.runc.v1.Options") {
        log::warn!("ignoring runtime options of type {}", any.type_url);
        return Ok((choice, flags));
    }
    let o = Options::parse_from_bytes(&any.value)
        .map_err(|e| Error::InvalidArgument(format!("runtime options: {e}")))?;
    if !o.binary_name.is_empty() {
        choice.binary = PathBuf::from(&o.binary_name);
    }
    if !o.root.is_empty() {
        choice.root = Path::new(&o.root).join(namespace);
    }
    choice.systemd_cgroup = o.systemd_cgroup;
    flags.no_pivot = o.no_pivot_root;
    flags.no_new_keyring = o.no_new_keyring;
    Ok((choice, flags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::MessageDyn;

    fn to_any(m: &dyn MessageDyn) -> Any {
        let mut any = Any::new();
        any.type_url = m.descriptor_dyn().full_name().to_string();
        any.value = m.write_to_bytes_dyn().expect("encode");
        any
    }

    #[test]
    fn ids_cannot_name_other_paths() {
        for bad in ["", "..", ".", "a/b", "../x"] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_id("0123abcdef").is_ok());
    }

    #[test]
    fn runc_options_override_binary_and_root() {
        let o = Options {
            binary_name: "/usr/sbin/runc".into(),
            root: "/run/x".into(),
            no_pivot_root: true,
            ..Default::default()
        };
        let any = to_any(&o);
        assert_eq!(any.type_url, "containerd.runc.v1.Options");
        let (choice, flags) = runc_from_options("k8s.io", Some(&any)).expect("options");
        assert_eq!(choice.root, Path::new("/run/x/k8s.io"));
        assert_eq!(choice.binary, Path::new("/usr/sbin/runc"));
        assert_eq!(choice.runc().root(), Path::new("/run/x/k8s.io"));
        assert!(flags.no_pivot);
    }

    #[test]
    fn no_options_mean_podsnaps_runc() {
        let (choice, _) = runc_from_options("default", None).expect("options");
        assert_eq!(choice, RuncChoice::default_for("default"));
        assert_eq!(choice.root, Path::new("/run/podsnap/runc/default"));
    }

    #[tokio::test]
    async fn the_runc_record_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let bundle = tempfile::tempdir().expect("tempdir");
        assert!(RuncChoice::recorded(bundle.path()).expect("read").is_none());
        let choice = RuncChoice {
            binary: PathBuf::from("/usr/local/sbin/runc"),
            root: PathBuf::from("/run/other/k8s.io"),
            systemd_cgroup: true,
        };
        choice.record(bundle.path()).await.expect("record");
        let back = RuncChoice::recorded(bundle.path()).expect("read");
        assert_eq!(back, Some(choice));
        let mode = std::fs::metadata(bundle.path().join(RUNC_RECORD))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_runc_record_is_an_error() {
        let bundle = tempfile::tempdir().expect("tempdir");
        std::fs::write(bundle.path().join(RUNC_RECORD), b"{not json").expect("write");
        assert!(RuncChoice::recorded(bundle.path()).is_err());
        let huge = vec![b' '; RUNC_RECORD_CAP as usize + 10];
        std::fs::write(bundle.path().join(RUNC_RECORD), huge).expect("write");
        assert!(RuncChoice::recorded(bundle.path()).is_err());
    }
}
