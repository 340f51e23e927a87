//! Which runc a container runs with and how: containerd's runtime options turned into our own
//! types, checked ids, and the runc choice recorded in the bundle so that `delete` after a shim
//! died reaches the container where it was created.
//!
//! The options come in one of two messages. `ctr` and containerd's API clients send runc's own
//! `containerd.runc.v1.Options`. containerd's CRI plugin sends that message to runtimes of type
//! `io.containerd.runc.v2` only; to every other type, ours included, it sends
//! `runtimeoptions.v1.Options`, whose `config_body` is the TOML of the handler's `options`
//! table (or whose `config_path` names a TOML file instead). podsnap reads runc's keys from it,
//! as containerd's runc shim reads them from runc's message, so a handler configured as
//!
//! ```toml
//! [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.podsnap.options]
//!   BinaryName = '/usr/local/lib/podsnap/runc-1.3/runc'
//!   SystemdCgroup = true
//! ```
//!
//! runs that runc with the systemd cgroup driver (`podsnap node install` writes `SystemdCgroup`
//! there, following runc's entry). Keys: `BinaryName`, `Root`, `SystemdCgroup`,
//! `NoPivotRoot`, `NoNewKeyring` (matched without regard to case, as containerd does); others are
//! logged and ignored.
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

/// The type containerd's CRI plugin gives the options of a runtime that is not runc's.
const RUNTIME_OPTIONS_TYPE: &str = "runtimeoptions.v1.Options";

/// The most of a runtime options file (`config_path`) read.
const RUNTIME_OPTIONS_FILE_CAP: u64 = 64 * 1024;

/// runc's `Options` from any message containerd sends a shim: runc's own, or the generic
/// `runtimeoptions.v1.Options` carrying the handler's TOML. `None`: no options, or a type
/// podsnap does not read (logged).
pub fn runc_options(options: Option<&Any>) -> Result<Option<Options>> {
    let Some(any) = options.filter(|a| !a.value.is_empty() || !a.type_url.is_empty()) else {
        return Ok(None);
    };
    if any.type_url.ends_with("containerd.runc.v1.Options") {
        return Options::parse_from_bytes(&any.value)
            .map(Some)
            .map_err(|e| Error::InvalidArgument(format!("runtime options: {e}")));
    }
    if any.type_url.trim_start_matches("types.containerd.io/") == RUNTIME_OPTIONS_TYPE {
        return options_from_runtime_options(&any.value).map(Some);
    }
    log::warn!("ignoring runtime options of type {}", any.type_url);
    Ok(None)
}

/// Reads `runtimeoptions.v1.Options` (`type_url` = 1, `config_path` = 2, `config_body` = 3;
/// the message is not among the crate's protos, so its fields are read as the unknown fields
/// of an empty message) and the TOML it carries or names.
fn options_from_runtime_options(bytes: &[u8]) -> Result<Options> {
    use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
    use containerd_shim::protos::protobuf::UnknownValueRef;
    let message = Empty::parse_from_bytes(bytes)
        .map_err(|e| Error::InvalidArgument(format!("runtime options ({RUNTIME_OPTIONS_TYPE}): {e}")))?;
    let field = |n: u32| match message.special_fields.unknown_fields().get(n) {
        Some(UnknownValueRef::LengthDelimited(b)) => Ok(b.to_vec()),
        None => Ok(Vec::new()),
        Some(_) => Err(Error::InvalidArgument(format!(
            "runtime options ({RUNTIME_OPTIONS_TYPE}): field {n} is not a string"
        ))),
    };
    let path = String::from_utf8(field(2)?).map_err(|e| {
        Error::InvalidArgument(format!(
            "runtime options ({RUNTIME_OPTIONS_TYPE}): config_path: {e}"
        ))
    })?;
    let (text, from) = if path.is_empty() {
        (field(3)?, "the handler's options".to_owned())
    } else {
        let mut raw = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(RUNTIME_OPTIONS_FILE_CAP + 1).read_to_end(&mut raw))
            .map_err(|e| Error::InvalidArgument(format!("runtime options file {path}: {e}")))?;
        if raw.len() as u64 > RUNTIME_OPTIONS_FILE_CAP {
            return Err(Error::InvalidArgument(format!(
                "runtime options file {path} is larger than {RUNTIME_OPTIONS_FILE_CAP} bytes"
            )));
        }
        (raw, path)
    };
    let text = String::from_utf8(text)
        .map_err(|e| Error::InvalidArgument(format!("runtime options ({from}): {e}")))?;
    options_from_toml(&text, &from)
}

/// runc's `Options` from TOML holding its keys (`BinaryName = "..."`, `SystemdCgroup = true`).
fn options_from_toml(text: &str, from: &str) -> Result<Options> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("runtime options ({from}): {e}")))?;
    let mut o = Options::default();
    for (key, value) in &table {
        let wrong = |want: &str| {
            Error::InvalidArgument(format!(
                "runtime options ({from}): {key} must be {want}, not {}",
                value.type_str()
            ))
        };
        let string = || value.as_str().map(str::to_owned).ok_or_else(|| wrong("a string"));
        let flag = || value.as_bool().ok_or_else(|| wrong("true or false"));
        match key.to_ascii_lowercase().as_str() {
            "binaryname" => o.binary_name = string()?,
            "root" => o.root = string()?,
            "systemdcgroup" => o.systemd_cgroup = flag()?,
            "nopivotroot" => o.no_pivot_root = flag()?,
            "nonewkeyring" => o.no_new_keyring = flag()?,
            _ => log::warn!("runtime options ({from}): {key} is not read by podsnap"),
        }
    }
    Ok(o)
}

/// runc and its flags as the create request's runtime options ask.
pub fn runc_from_options(namespace: &str, options: Option<&Any>) -> Result<(RuncChoice, RuncFlags)> {
    let mut choice = RuncChoice::default_for(namespace);
    let mut flags = RuncFlags::default();
    let Some(o) = runc_options(options)? else {
        return Ok((choice, flags));
    };
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

    /// `runtimeoptions.v1.Options` as containerd's CRI plugin encodes it: (field, bytes).
    fn runtime_options(fields: &[(u32, &[u8])]) -> Any {
        use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
        let mut m = Empty::new();
        for (n, v) in fields {
            m.special_fields
                .mut_unknown_fields()
                .add_length_delimited(*n, v.to_vec());
        }
        Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: m.write_to_bytes().expect("encode"),
            ..Default::default()
        }
    }

    #[test]
    fn cri_handler_options_reach_runc() {
        // containerd marshals the handler's options table as TOML into config_body.
        let body = b"BinaryName = '/usr/local/lib/podsnap/runc-1.3/runc'\nSystemdCgroup = true\n\
                     Root = '/run/r'\nnopivotroot = true\nShimCgroup = ''\n";
        let any = runtime_options(&[(3, body)]);
        let (choice, flags) = runc_from_options("k8s.io", Some(&any)).expect("options");
        assert_eq!(choice.binary, Path::new("/usr/local/lib/podsnap/runc-1.3/runc"));
        assert!(choice.systemd_cgroup);
        assert_eq!(choice.root, Path::new("/run/r/k8s.io"));
        assert!(flags.no_pivot, "keys match without regard to case");
        assert!(!flags.no_new_keyring);

        // A file named by config_path instead of a body.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("podsnap-runc.toml");
        std::fs::write(&file, "SystemdCgroup = true\n").expect("write");
        let any = runtime_options(&[(2, file.to_string_lossy().as_bytes()), (3, b"ignored = 1")]);
        let (choice, _) = runc_from_options("k8s.io", Some(&any)).expect("options file");
        assert!(choice.systemd_cgroup);
        assert_eq!(choice.binary, Path::new("runc"));

        // No options table at all: an empty message, podsnap's defaults.
        let (choice, _) = runc_from_options("k8s.io", Some(&runtime_options(&[]))).expect("empty");
        assert_eq!(choice, RuncChoice::default_for("k8s.io"));
    }

    #[test]
    fn bad_cri_handler_options_are_refused_with_the_key() {
        let wrong_type = runtime_options(&[(3, b"SystemdCgroup = 'yes'\n")]);
        let err = runc_from_options("k8s.io", Some(&wrong_type)).expect_err("a string flag");
        assert!(
            err.to_string().contains("SystemdCgroup must be true or false"),
            "{err}"
        );
        let not_toml = runtime_options(&[(3, b"BinaryName = \n")]);
        assert!(runc_from_options("k8s.io", Some(&not_toml)).is_err());
        let missing = runtime_options(&[(2, b"/nonexistent/podsnap-options.toml")]);
        let err = runc_from_options("k8s.io", Some(&missing)).expect_err("no file");
        assert!(
            err.to_string().contains("/nonexistent/podsnap-options.toml"),
            "{err}"
        );
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
