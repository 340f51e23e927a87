//! `podsnap node uninstall`: what the record says the install changed, put back. Refused while
//! pods of the `podsnap` handler run on the node (their shims need the binary and the handler
//! until they end), unless forced.
//!
//! Each file the install wrote: if it still holds what the install wrote, the file that was there
//! before comes back from its copy (byte for byte), or the file goes if there was none. A file
//! someone changed since is left as it is and reported, except containerd's configuration, from
//! which only podsnap's `imports` entry is taken out (their other changes kept). Then containerd
//! is restarted if its configuration changed, and the uninstall waits until CRI no longer serves
//! the handler. Last the copies, the record and the directories the install created (if empty).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::dropin;
use super::host_root::{digest_bytes, HostRoot};
use super::record::{Record, Role, RECORD};
use super::{cri_state, restart, Error};

/// What to uninstall.
#[derive(Debug, Clone)]
pub struct UninstallRequest {
    /// The host's `/` as the installer sees it.
    pub host_root: PathBuf,
    /// How to restart containerd; systemd's way when `None`.
    pub restart_command: Option<String>,
    /// The CRI endpoint; else the configuration's socket under the host root.
    pub runtime_endpoint: Option<String>,
    /// Uninstall even while podsnap pods run.
    pub force: bool,
    /// How long containerd may take to come back.
    pub timeout: Duration,
}

/// What an uninstall did.
#[derive(Debug, Clone, Default)]
pub struct Uninstalled {
    /// Files put back or removed.
    pub restored: Vec<PathBuf>,
    /// Files left because someone changed them after the install.
    pub kept: Vec<String>,
    /// Whether containerd was restarted (and how).
    pub restarted: Option<String>,
    /// Whether podsnap was installed at all.
    pub was_installed: bool,
}

/// Uninstalls (see the module header).
pub async fn uninstall(request: &UninstallRequest) -> Result<Uninstalled, Error> {
    let host =
        HostRoot::open(&request.host_root).map_err(Error::io("opening the host root", &request.host_root))?;
    let Some(record) = Record::read(&host)? else {
        return Ok(Uninstalled::default());
    };
    let config = super::discover::read(
        &host,
        &record.containerd_config,
        super::discover::discover(&host, Some(&record.containerd_config))
            .map(|c| c.flavor)
            .unwrap_or(super::discover::Flavor::Containerd),
    )
    .ok();
    let endpoint = match &config {
        Some(c) => super::install::endpoint(request.runtime_endpoint.as_deref(), &host, c),
        None => request.runtime_endpoint.clone().unwrap_or_else(|| {
            format!(
                "unix://{}",
                host.outside(Path::new(super::discover::CONTAINERD_SOCKET))
                    .display()
            )
        }),
    };
    let running = cri_state::podsnap_pods(&endpoint).await;
    match running {
        Ok(pods) if !pods.is_empty() && !request.force => {
            return Err(Error::Refused(format!(
                "pods of the `podsnap` runtime handler run on this node: {}; remove them first \
                 (or uninstall with --force: their shims keep running on a deleted binary and \
                 containerd can no longer clean them up)",
                pods.join(", ")
            )))
        }
        Ok(pods) if !pods.is_empty() => {
            log::warn!("--force: uninstalling under running pods {}", pods.join(", "))
        }
        Ok(_) => {}
        Err(e) if request.force => log::warn!("{e} (--force: going on)"),
        Err(e) => return Err(e),
    }
    let mut done = Uninstalled {
        was_installed: true,
        ..Default::default()
    };
    let mut containerd_changed = false;
    // Newest first: the import goes before the drop-in it names.
    for file in record.files.iter().rev() {
        let current = host
            .digest(&file.path)
            .map_err(Error::io("reading", host.outside(&file.path)))?;
        if current.as_deref() != Some(file.digest.as_str()) {
            if file.role == Role::ContainerdConfig && !is_template(&file.path) {
                if let (Some(entry), Some(_)) = (&record.import, &current) {
                    let bytes = host
                        .read(&file.path)
                        .map_err(Error::io("reading", host.outside(&file.path)))?
                        .unwrap_or_default();
                    let text = dropin::main_without_import(&file.path, &bytes, entry)?;
                    if digest_bytes(text.as_bytes()) != current.clone().unwrap_or_default() {
                        host.write_atomic(&file.path, text.as_bytes(), mode_of(&host, &file.path))
                            .map_err(Error::io("writing", host.outside(&file.path)))?;
                        containerd_changed = true;
                    }
                    done.kept.push(format!(
                        "{}: changed since the install; only podsnap's import ({entry}) was taken out",
                        file.path.display()
                    ));
                    continue;
                }
            }
            if file.role == Role::ContainerdConfig && is_template(&file.path) && current.is_some() {
                let bytes = host
                    .read(&file.path)
                    .map_err(Error::io("reading", host.outside(&file.path)))?
                    .unwrap_or_default();
                let text = dropin::template_without_runtime(&String::from_utf8_lossy(&bytes));
                host.write_atomic(&file.path, text.as_bytes(), mode_of(&host, &file.path))
                    .map_err(Error::io("writing", host.outside(&file.path)))?;
                containerd_changed = true;
                done.kept.push(format!(
                    "{}: changed since the install; only podsnap's block was taken out",
                    file.path.display()
                ));
                continue;
            }
            done.kept.push(match current {
                None => format!("{}: already gone", file.path.display()),
                Some(_) => format!(
                    "{}: changed since the install, left as it is",
                    file.path.display()
                ),
            });
            continue;
        }
        match &file.previous {
            Some(previous) => {
                let bytes = host
                    .read_any(&previous.backup)
                    .map_err(Error::io("reading the copy", host.outside(&previous.backup)))?;
                match bytes {
                    Some(bytes) if digest_bytes(&bytes) == previous.digest => {
                        host.write_atomic(&file.path, &bytes, mode_of(&host, &file.path))
                            .map_err(Error::io("putting back", host.outside(&file.path)))?;
                    }
                    _ => {
                        done.kept.push(format!(
                            "{}: its copy {} is missing or damaged, left as podsnap wrote it",
                            file.path.display(),
                            previous.backup.display()
                        ));
                        continue;
                    }
                }
            }
            None => {
                host.remove_file(&file.path)
                    .map_err(Error::io("removing", host.outside(&file.path)))?;
            }
        }
        if file.role.read_by_containerd() {
            containerd_changed = true;
        }
        log::info!("put back {}", file.path.display());
        done.restored.push(file.path.clone());
    }
    if containerd_changed {
        let flavor = config
            .as_ref()
            .map(|c| c.flavor)
            .unwrap_or(super::discover::Flavor::Containerd);
        let restart = restart::restarter(&host, flavor, request.restart_command.as_deref(), &endpoint)?;
        restart.run(request.timeout).await?;
        cri_state::wait_for(&endpoint, false, request.timeout).await?;
        done.restarted = Some(restart.to_string());
    }
    for file in &record.files {
        if let Some(previous) = &file.previous {
            host.remove_file(&previous.backup)
                .map_err(Error::io("removing", host.outside(&previous.backup)))?;
        }
    }
    host.remove_file(Path::new(RECORD))
        .map_err(Error::io("removing", host.outside(Path::new(RECORD))))?;
    for dir in record.dirs.iter().rev() {
        if !host
            .remove_dir_if_empty(dir)
            .map_err(Error::io("removing", host.outside(dir)))?
            && host.exists(dir)
        {
            done.kept.push(format!("{}: not empty, left", dir.display()));
        }
    }
    Ok(done)
}

fn is_template(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tmpl")
}

fn mode_of(host: &HostRoot, path: &Path) -> u32 {
    std::fs::metadata(host.outside(path))
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
        .unwrap_or(0o644)
}
