//! `/etc/podsnap/installed.json`: everything `podsnap node install` changed on the host, so that
//! `uninstall` puts back exactly what was there and removes exactly what it added.
//!
//! ```text
//! {
//!   "format": 1,
//!   "podsnap_version": "0.1.0",
//!   "containerd_config": "/etc/containerd/config.toml",   // the file edited (or a template)
//!   "config_version": 3,
//!   "import": "/etc/podsnap/containerd.toml",             // the imports entry added, if any
//!   "files": [                                            // in the order they were written
//!     {"path": "/usr/local/bin/containerd-shim-podsnap-v1", "role": "shim",
//!      "digest": "sha256:...",                             // what the installer wrote
//!      "previous": null},                                  // nothing was there
//!     {"path": "/etc/containerd/config.toml", "role": "containerd-config",
//!      "digest": "sha256:...",
//!      "previous": {"digest": "sha256:...",                // what was there
//!                   "backup": "/etc/podsnap/backup/etc%containerd%config.toml"}}
//!   ],
//!   "dirs": ["/etc/podsnap"]                               // created, outermost first
//! }
//! ```
//! The record and the backups are root's alone (0600 in a 0700 directory).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::host_root::HostRoot;
use super::Error;

/// Where the record lives (a host path).
pub const RECORD: &str = "/etc/podsnap/installed.json";
/// Where copies of replaced files live.
pub const BACKUP_DIR: &str = "/etc/podsnap/backup";
/// The record's format.
pub const FORMAT: u32 = 1;

/// What a file is to podsnap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// `containerd-shim-podsnap-v1`.
    Shim,
    /// `podsnap`.
    Cli,
    /// `podsnap-cni-ipam`.
    CniIpam,
    /// The node configuration (`/etc/podsnap/config.toml`).
    NodeConfig,
    /// The runtime's drop-in.
    DropIn,
    /// containerd's main configuration (or a k3s/RKE2 template).
    ContainerdConfig,
}

impl Role {
    /// Whether containerd reads this file at start (a change needs a restart).
    pub fn read_by_containerd(self) -> bool {
        matches!(self, Role::DropIn | Role::ContainerdConfig)
    }
}

/// A file that was there before the install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Previous {
    /// Its digest.
    pub digest: String,
    /// Where a copy of it is kept (host path).
    pub backup: PathBuf,
}

/// One file the installer wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    /// Host path.
    pub path: PathBuf,
    /// What it is.
    pub role: Role,
    /// The digest of what the installer wrote.
    pub digest: String,
    /// What was there before the first install; `None`: nothing.
    pub previous: Option<Previous>,
}

/// The whole record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// [`FORMAT`].
    pub format: u32,
    /// The podsnap that installed.
    pub podsnap_version: String,
    /// The configuration file edited.
    pub containerd_config: PathBuf,
    /// Its version.
    pub config_version: i64,
    /// The `imports` entry added to it, if one was.
    pub import: Option<String>,
    /// Files written, in order.
    pub files: Vec<FileChange>,
    /// Directories created, outermost first.
    pub dirs: Vec<PathBuf>,
}

impl Record {
    /// The record of the host, `None` when podsnap is not installed.
    pub fn read(host: &HostRoot) -> Result<Option<Record>, Error> {
        let path = Path::new(RECORD);
        let Some(bytes) = host
            .read(path)
            .map_err(Error::io("reading the install record", path))?
        else {
            return Ok(None);
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: format!("not an install record: {e}"),
        })?;
        if record.format != FORMAT {
            return Err(Error::Config {
                path: path.to_path_buf(),
                reason: format!(
                    "install record format {} is not {FORMAT}: uninstall with the podsnap that \
                     installed ({})",
                    record.format, record.podsnap_version
                ),
            });
        }
        Ok(Some(record))
    }

    /// Bytes of the record as it is written.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// The entry of `path`.
    pub fn file(&self, path: &Path) -> Option<&FileChange> {
        self.files.iter().find(|f| f.path == path)
    }
}

/// Where a copy of `path` is kept.
pub fn backup_path(path: &Path) -> PathBuf {
    let flat = path
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('%', "%25")
        .replace('/', "%");
    Path::new(BACKUP_DIR).join(flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_backup_names() {
        let record = Record {
            format: FORMAT,
            podsnap_version: "0.1.0".to_owned(),
            containerd_config: PathBuf::from("/etc/containerd/config.toml"),
            config_version: 3,
            import: Some("/etc/podsnap/containerd.toml".to_owned()),
            files: vec![FileChange {
                path: PathBuf::from("/etc/containerd/config.toml"),
                role: Role::ContainerdConfig,
                digest: "sha256:aa".to_owned(),
                previous: Some(Previous {
                    digest: "sha256:bb".to_owned(),
                    backup: backup_path(Path::new("/etc/containerd/config.toml")),
                }),
            }],
            dirs: vec![PathBuf::from("/etc/podsnap")],
        };
        let text = String::from_utf8(record.to_bytes()).expect("utf8");
        assert!(text.contains("\"role\": \"containerd-config\""), "{text}");
        assert_eq!(serde_json::from_str::<Record>(&text).expect("parse"), record);
        assert_eq!(
            backup_path(Path::new("/etc/containerd/config.toml")),
            PathBuf::from("/etc/podsnap/backup/etc%containerd%config.toml")
        );
    }
}
