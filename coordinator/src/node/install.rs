//! `podsnap node install`: the binaries, the node configuration, the runtime's drop-in and its
//! import, then a restart of containerd if (and only if) a file containerd reads changed, and a
//! wait until CRI serves the `podsnap` handler. Any failure puts everything back (and restarts
//! containerd again if it had been restarted), so the node ends as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::discover::{self, ContainerdConfig};
use super::dropin;
use super::host_root::{digest_bytes, digest_reader, HostRoot};
use super::record::{Record, Role, FORMAT};
use super::restart::{self, Restarter};
use super::transaction::Transaction;
use super::{cri_state, Error};

/// The shim's binary name.
pub const SHIM: &str = "containerd-shim-podsnap-v1";
/// The CLI's.
pub const CLI: &str = "podsnap";
/// The CNI IPAM plugin's.
pub const CNI_IPAM: &str = "podsnap-cni-ipam";
/// The node configuration (host path).
pub const NODE_CONFIG: &str = "/etc/podsnap/config.toml";

/// What to install where.
#[derive(Debug, Clone)]
pub struct InstallRequest {
    /// The host's `/` as the installer sees it.
    pub host_root: PathBuf,
    /// containerd's configuration (host path); found when `None`.
    pub containerd_config: Option<PathBuf>,
    /// How to restart containerd; systemd's way when `None`.
    pub restart_command: Option<String>,
    /// The CRI endpoint as the installer reaches it; else the configuration's socket under the
    /// host root.
    pub runtime_endpoint: Option<String>,
    /// Where the binaries to install are (the installer's own directory by default).
    pub binaries: PathBuf,
    /// Where the shim and the CLI go (host path, on containerd's `PATH`).
    pub bin_dir: PathBuf,
    /// Where `podsnap-cni-ipam` goes (host path), if it is to be installed.
    pub cni_bin_dir: Option<PathBuf>,
    /// A node configuration to write to `/etc/podsnap/config.toml` unless one is there.
    pub node_config: Option<PathBuf>,
    /// How long containerd may take to come back.
    pub timeout: Duration,
}

/// What an install did.
#[derive(Debug, Clone)]
pub struct Installed {
    /// Files written (host paths); empty for a reinstall of the same thing.
    pub written: Vec<PathBuf>,
    /// Whether containerd was restarted (and how).
    pub restarted: Option<String>,
    /// The drop-in's path.
    pub drop_in: PathBuf,
    /// containerd's version as CRI reports it.
    pub containerd: String,
    /// The configuration edited.
    pub config: PathBuf,
}

/// The CRI endpoint: the request's, else the configuration's socket under the host root.
pub fn endpoint(explicit: Option<&str>, host: &HostRoot, config: &ContainerdConfig) -> String {
    match explicit {
        Some(e) => e.to_owned(),
        None => format!("unix://{}", host.outside(&config.socket).display()),
    }
}

/// Installs (see the module header).
pub async fn install(request: &InstallRequest) -> Result<Installed, Error> {
    let host =
        HostRoot::open(&request.host_root).map_err(Error::io("opening the host root", &request.host_root))?;
    let old = Record::read(&host)?;
    let explicit = request
        .containerd_config
        .clone()
        .or_else(|| old.as_ref().map(|r| r.containerd_config.clone()));
    let config = discover::discover(&host, explicit.as_deref())?;
    if let Some(old) = &old {
        if old.config_version != config.version && old.containerd_config == config.path {
            log::warn!(
                "{} is now version {} (it was {} at the last install): the drop-in follows it",
                config.path.display(),
                config.version,
                old.config_version
            );
        }
    }
    let endpoint = endpoint(request.runtime_endpoint.as_deref(), &host, &config);
    let before = cri_state::served(&endpoint).await.map_err(|e| {
        Error::NotReady(format!(
            "containerd does not answer on {endpoint} ({e}); nothing was changed (give the CRI \
             socket with --runtime-endpoint if it is elsewhere)"
        ))
    })?;
    let sources = Sources::find(request)?;
    let record = old.clone().unwrap_or_else(|| Record {
        format: FORMAT,
        podsnap_version: env!("CARGO_PKG_VERSION").to_owned(),
        containerd_config: config.path.clone(),
        config_version: config.version,
        import: None,
        files: Vec::new(),
        dirs: Vec::new(),
    });
    let mut tx = Transaction::new(&host, record)?;
    tx.record.podsnap_version = env!("CARGO_PKG_VERSION").to_owned();
    tx.record.config_version = config.version;
    let mut written = Vec::new();
    let (drop_in_path, _) = config.drop_in_place();
    let outcome = write_all(request, &host, &config, &sources, &mut tx, &mut written).await;
    if let Err(e) = outcome {
        let problems = tx.rollback();
        return Err(rolled_back(e, problems, None));
    }
    // A restart only when containerd would read something new, or does not serve the handler.
    if !tx.containerd_changed && before.handler {
        if let Err(e) = tx.save_record() {
            let problems = tx.rollback();
            return Err(rolled_back(e, problems, None));
        }
        return Ok(Installed {
            written,
            restarted: None,
            drop_in: drop_in_path,
            containerd: before.version,
            config: config.path,
        });
    }
    let restart = match restart::restarter(
        &host,
        config.flavor,
        request.restart_command.as_deref(),
        &endpoint,
    ) {
        Ok(r) => r,
        Err(e) => {
            let problems = tx.rollback();
            return Err(rolled_back(e, problems, None));
        }
    };
    if let Err(e) = tx.save_record() {
        let problems = tx.rollback();
        return Err(rolled_back(e, problems, None));
    }
    log::info!("restarting containerd with {restart}");
    let up = match restart.run(request.timeout).await {
        Ok(()) => cri_state::wait_for(&endpoint, true, request.timeout).await,
        Err(e) => Err(e),
    };
    match up {
        Ok(served) => Ok(Installed {
            written,
            restarted: Some(restart.to_string()),
            drop_in: drop_in_path,
            containerd: served.version,
            config: config.path,
        }),
        Err(e) => {
            log::error!("{e}: rolling back");
            let problems = tx.rollback();
            let again = restart_back(&restart, &endpoint, before.handler, request.timeout).await;
            Err(rolled_back(e, problems, Some(again)))
        }
    }
}

/// After a rollback: containerd restarted on the old configuration and waited for.
async fn restart_back(restart: &Restarter, endpoint: &str, handler: bool, timeout: Duration) -> String {
    match restart.run(timeout).await {
        Err(e) => format!("restarting containerd on the old configuration failed too: {e}"),
        Ok(()) => match cri_state::wait_for(endpoint, handler, timeout).await {
            Ok(_) => "containerd was restarted on the old configuration and serves CRI again".to_owned(),
            Err(e) => format!("containerd was restarted on the old configuration but: {e}"),
        },
    }
}

fn rolled_back(e: Error, problems: Vec<String>, restart: Option<String>) -> Error {
    let mut what = if problems.is_empty() {
        "every file podsnap had written was put back as it was".to_owned()
    } else {
        format!("the rollback could not put back: {}", problems.join("; "))
    };
    if let Some(restart) = restart {
        what.push_str("; ");
        what.push_str(&restart);
    }
    Error::RolledBack {
        source: Box::new(e),
        what,
    }
}

/// The binaries to install, found in the request's directory.
struct Sources {
    shim: PathBuf,
    cli: PathBuf,
    ipam: Option<PathBuf>,
}

impl Sources {
    fn find(request: &InstallRequest) -> Result<Sources, Error> {
        let need = |name: &str| -> Result<PathBuf, Error> {
            let path = request.binaries.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(Error::Refused(format!(
                    "{} is missing: the binaries to install are looked for in {} (--binaries)",
                    path.display(),
                    request.binaries.display()
                )))
            }
        };
        Ok(Sources {
            shim: need(SHIM)?,
            cli: need(CLI)?,
            ipam: match request.cni_bin_dir {
                Some(_) => Some(need(CNI_IPAM)?),
                None => None,
            },
        })
    }
}

fn file_digest(path: &Path) -> Result<String, Error> {
    std::fs::File::open(path)
        .and_then(digest_reader)
        .map_err(Error::io("reading", path))
}

/// Writes everything that differs from what the host has, in an order that keeps containerd's
/// configuration valid at every step: binaries first, then the drop-in, the import last.
async fn write_all(
    request: &InstallRequest,
    host: &HostRoot,
    config: &ContainerdConfig,
    sources: &Sources,
    tx: &mut Transaction<'_>,
    written: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    let mut binaries = vec![
        (&sources.shim, request.bin_dir.join(SHIM), Role::Shim),
        (&sources.cli, request.bin_dir.join(CLI), Role::Cli),
    ];
    if let (Some(ipam), Some(dir)) = (&sources.ipam, &request.cni_bin_dir) {
        binaries.push((ipam, dir.join(CNI_IPAM), Role::CniIpam));
    }
    for (source, target, role) in binaries {
        let digest = file_digest(source)?;
        let wrote = tx.put(&target, role, &digest, 0o755, |h| {
            let copied = h.copy_in(source, &target, 0o755)?;
            if copied != digest {
                return Err(std::io::Error::other(format!(
                    "{} changed while it was copied",
                    source.display()
                )));
            }
            Ok(())
        })?;
        if wrote {
            written.push(target);
        }
    }
    if let Some(node_config) = &request.node_config {
        let target = Path::new(NODE_CONFIG);
        let owned = tx.record.file(target).is_some();
        if !host.exists(target) || owned {
            let bytes = std::fs::read(node_config).map_err(Error::io("reading", node_config))?;
            podsnap_checkpoint::config::NodeConfig::read(node_config).map_err(|e| Error::Config {
                path: node_config.clone(),
                reason: format!("not a podsnap node configuration: {e}"),
            })?;
            if tx.put(target, Role::NodeConfig, &digest_bytes(&bytes), 0o644, |h| {
                h.write_atomic(target, &bytes, 0o644)
            })? {
                written.push(target.to_path_buf());
            }
        } else {
            log::info!("{NODE_CONFIG} exists and is not podsnap's: kept as it is");
        }
    }
    let (drop_in_path, import) = config.drop_in_place();
    if config.template {
        let text = dropin::template_with_runtime(config);
        if tx.put(
            &config.path,
            Role::ContainerdConfig,
            &digest_bytes(text.as_bytes()),
            0o644,
            |h| h.write_atomic(&config.path, text.as_bytes(), 0o644),
        )? {
            written.push(config.path.clone());
        }
        return Ok(());
    }
    let text = dropin::drop_in(config);
    dropin::check_drop_in(&drop_in_path, &text, config.version)?;
    if tx.put(
        &drop_in_path,
        Role::DropIn,
        &digest_bytes(text.as_bytes()),
        0o644,
        |h| h.write_atomic(&drop_in_path, text.as_bytes(), 0o644),
    )? {
        written.push(drop_in_path.clone());
    }
    // An earlier install into a directory the configuration imported, now into our own file (or
    // the other way round): the old drop-in goes.
    let stale: Vec<PathBuf> = tx
        .record
        .files
        .iter()
        .filter(|f| f.role == Role::DropIn && f.path != drop_in_path)
        .map(|f| f.path.clone())
        .collect();
    for path in stale {
        log::warn!(
            "{} was podsnap's drop-in; the configuration now takes {}",
            path.display(),
            drop_in_path.display()
        );
    }
    if let Some(entry) = import {
        let new = dropin::main_with_import(config, &entry)?;
        dropin::check_main(&config.path, config.original.as_deref(), &new, &entry)?;
        let mode = std::fs::metadata(host.outside(&config.path))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
            .unwrap_or(0o644);
        if tx.put(
            &config.path,
            Role::ContainerdConfig,
            &digest_bytes(new.as_bytes()),
            mode,
            |h| h.write_atomic(&config.path, new.as_bytes(), mode),
        )? {
            written.push(config.path.clone());
        }
        tx.record.import = Some(entry);
    }
    tx.record.containerd_config = config.path.clone();
    Ok(())
}
