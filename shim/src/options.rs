//! Which runc a container runs with and how: containerd's runtime options (runc's `Options`, or
//! the `runtimeoptions.v1.Options` containerd's CRI sends for a runtime that is not runc's, whose
//! TOML body holds the handler's `options` table with runc's names: `SystemdCgroup`,
//! `BinaryName`, `Root`, `NoPivotRoot`, `NoNewKeyring`) turned into our own types, checked ids, and the runc choice recorded in the bundle so that
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
    if any.type_url.ends_with("runtimeoptions.v1.Options") {
        // containerd's CRI sends a runtime that is not runc's its `options` table as TOML text
        // (`podsnap node install` writes `SystemdCgroup` there, following runc's entry).
        let body = runtime_options_body(&any.value)?;
        apply_toml_options(&body, &mut choice, &mut flags)?;
        return Ok((choice, flags));
    }
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

/// `config_body` (field 3) of containerd's `runtimeoptions.v1.Options`
/// (`type_url` = 1, `config_path` = 2, `config_body` = 3).
fn runtime_options_body(bytes: &[u8]) -> Result<Vec<u8>> {
    let bad = |e: String| Error::InvalidArgument(format!("runtime options: {e}"));
    let mut input = containerd_shim::protos::protobuf::CodedInputStream::from_bytes(bytes);
    let mut body = Vec::new();
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(|e| bad(e.to_string()))? {
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (3, 2) => body = input.read_bytes().map_err(|e| bad(e.to_string()))?,
            (2, 2) => {
                let path = input.read_string().map_err(|e| bad(e.to_string()))?;
                if !path.is_empty() {
                    log::warn!(
                        "runtime options name a config file ({path}): only the inline options table is read"
                    );
                }
            }
            (_, 2) => drop(input.read_bytes().map_err(|e| bad(e.to_string()))?),
            (_, 0) => drop(input.read_uint64().map_err(|e| bad(e.to_string()))?),
            _ => return Err(bad(format!("unexpected field {field} of wire type {wire}"))),
        }
    }
    Ok(body)
}

/// runc's option names (as in runc's `options` table) out of a TOML `options` table.
fn apply_toml_options(body: &[u8], choice: &mut RuncChoice, flags: &mut RuncFlags) -> Result<()> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Error::InvalidArgument("runtime options: the options table is not UTF-8".to_owned()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| Error::InvalidArgument(format!("runtime options: {}", e.message())))?;
    let namespace_root = choice.root.file_name().map(|n| n.to_owned());
    for (key, value) in &table {
        match (key.as_str(), value) {
            ("SystemdCgroup", toml::Value::Boolean(on)) => choice.systemd_cgroup = *on,
            ("BinaryName", toml::Value::String(b)) if !b.is_empty() => choice.binary = PathBuf::from(b),
            ("Root", toml::Value::String(r)) if !r.is_empty() => {
                choice.root = Path::new(r).join(namespace_root.clone().unwrap_or_default())
            }
            ("NoPivotRoot", toml::Value::Boolean(on)) => flags.no_pivot = *on,
            ("NoNewKeyring", toml::Value::Boolean(on)) => flags.no_new_keyring = *on,
            (other, _) => log::warn!("ignoring runtime option {other} = {value:?}"),
        }
    }
    Ok(())
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
    fn cri_options_table_of_a_non_runc_runtime() {
        // What containerd's CRI sends for `[...runtimes.podsnap.options] SystemdCgroup = true`:
        // runtimeoptions.v1.Options{config_body: the table as TOML}.
        let body = b"SystemdCgroup = true\nBinaryName = '/usr/local/sbin/runc'\n";
        let mut value = vec![0x1a, body.len() as u8];
        value.extend_from_slice(body);
        let mut any = Any::new();
        any.type_url = "runtimeoptions.v1.Options".to_owned();
        any.value = value;
        let (choice, _) = runc_from_options("k8s.io", Some(&any)).expect("options");
        assert!(choice.systemd_cgroup);
        assert_eq!(choice.binary, Path::new("/usr/local/sbin/runc"));
        assert_eq!(choice.root, Path::new("/run/podsnap/runc/k8s.io"));
        let mut broken = any.clone();
        broken.value = vec![0x1a, 3, b'[', b'x', b'='];
        assert!(runc_from_options("k8s.io", Some(&broken)).is_err());
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
