//! `podsnap node status`: what the record says was installed, whether each file still holds what
//! was written, the versions, and whether containerd serves the `podsnap` handler.

use std::fmt;
use std::path::{Path, PathBuf};

use super::host_root::HostRoot;
use super::record::Record;
use super::{cri_state, discover, install, Error};

/// The state of a node.
#[derive(Debug, Clone)]
pub struct Status {
    /// The record, if podsnap is installed.
    pub record: Option<Record>,
    /// Per recorded file: its path and `ok`, `changed` or `missing`.
    pub files: Vec<(PathBuf, &'static str)>,
    /// containerd's configuration file.
    pub config: Option<PathBuf>,
    /// CRI's answer, or why there was none.
    pub served: Result<cri_state::Served, String>,
    /// podsnap pods running.
    pub pods: Vec<String>,
}

/// Reads the node's state.
pub async fn status(host_root: &Path, runtime_endpoint: Option<&str>) -> Result<Status, Error> {
    let host = HostRoot::open(host_root).map_err(Error::io("opening the host root", host_root))?;
    let record = Record::read(&host)?;
    let mut files = Vec::new();
    for file in record.iter().flat_map(|r| &r.files) {
        let state = match host.digest(&file.path) {
            Ok(Some(d)) if d == file.digest => "ok",
            Ok(Some(_)) => "changed",
            Ok(None) => "missing",
            Err(_) => "unreadable",
        };
        files.push((file.path.clone(), state));
    }
    let config = discover::discover(&host, record.as_ref().map(|r| r.containerd_config.as_path())).ok();
    let endpoint = match &config {
        Some(c) => install::endpoint(runtime_endpoint, &host, c),
        None => runtime_endpoint.map(str::to_owned).unwrap_or_else(|| {
            format!(
                "unix://{}",
                host.outside(Path::new(discover::CONTAINERD_SOCKET)).display()
            )
        }),
    };
    let served = cri_state::served(&endpoint).await;
    let pods = cri_state::podsnap_pods(&endpoint).await.unwrap_or_default();
    Ok(Status {
        record,
        files,
        config: config.map(|c| c.path),
        served,
        pods,
    })
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.record {
            Some(r) => writeln!(
                f,
                "installed    podsnap {} (this podsnap: {})",
                r.podsnap_version,
                env!("CARGO_PKG_VERSION")
            )?,
            None => writeln!(f, "installed    no (no {})", super::record::RECORD)?,
        }
        if let Some(config) = &self.config {
            write!(f, "config       {}", config.display())?;
            match self.record.as_ref().and_then(|r| r.import.as_ref()) {
                Some(import) => writeln!(f, " (imports {import})")?,
                None => writeln!(f)?,
            }
        }
        for (path, state) in &self.files {
            writeln!(f, "file         {} ({state})", path.display())?;
        }
        match &self.served {
            Ok(s) => {
                writeln!(f, "containerd   {}", s.version)?;
                writeln!(
                    f,
                    "handler      podsnap {}",
                    if s.handler { "served" } else { "NOT served" }
                )?;
            }
            Err(e) => writeln!(f, "containerd   not reachable: {e}")?,
        }
        match self.pods.len() {
            0 => write!(f, "pods         none of the podsnap handler"),
            _ => write!(f, "pods         {}", self.pods.join(", ")),
        }
    }
}
