//! One install's changes to the host, undoable: every file written (its bytes before, kept in
//! memory), every directory created, and the record as it was. [`Transaction::rollback`] puts all
//! of it back, newest first, so a failed install leaves the node as it found it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::host_root::{HostRoot, Kind};
use super::record::{backup_path, FileChange, Previous, Record, Role, BACKUP_DIR, RECORD};
use super::Error;

/// What a file was before this run.
struct Before {
    path: PathBuf,
    /// Content and mode; `None`: it did not exist.
    content: Option<(Vec<u8>, u32)>,
}

/// The changes of one run.
pub struct Transaction<'a> {
    host: &'a HostRoot,
    journal: Vec<Before>,
    dirs: Vec<PathBuf>,
    /// The record being built (starts as the host's).
    pub record: Record,
    record_before: Option<Vec<u8>>,
    /// Whether a file containerd reads changed.
    pub containerd_changed: bool,
}

impl<'a> Transaction<'a> {
    /// Starts from the host's record (or a new one).
    pub fn new(host: &'a HostRoot, record: Record) -> Result<Self, Error> {
        let record_before = host
            .read(Path::new(RECORD))
            .map_err(Error::io("reading the install record", RECORD))?;
        Ok(Self {
            host,
            journal: Vec::new(),
            dirs: Vec::new(),
            record,
            record_before,
            containerd_changed: false,
        })
    }

    /// Creates directory `dir` (and parents) with `mode`, remembering what it created.
    pub fn create_dirs(&mut self, dir: &Path, mode: u32) -> Result<(), Error> {
        let created = self
            .host
            .create_dirs(dir, mode)
            .map_err(Error::io("creating", self.host.outside(dir)))?;
        for d in created {
            if !self.record.dirs.contains(&d) {
                self.record.dirs.push(d.clone());
            }
            self.dirs.push(d);
        }
        Ok(())
    }

    /// Writes `path` (role `role`, mode `mode`) from `write` unless it already has digest
    /// `digest`; returns whether it wrote. The first time podsnap replaces a file it did not
    /// write, a copy goes to the backup directory and the record names it.
    pub fn put(
        &mut self,
        path: &Path,
        role: Role,
        digest: &str,
        mode: u32,
        write: impl FnOnce(&HostRoot) -> std::io::Result<()>,
    ) -> Result<bool, Error> {
        let outside = self.host.outside(path);
        let current = self
            .host
            .digest(path)
            .map_err(Error::io("reading", outside.clone()))?;
        if current.as_deref() == Some(digest) {
            return Ok(false);
        }
        if let Some(parent) = path.parent() {
            self.create_dirs(parent, 0o755)?;
        }
        let before = match self
            .host
            .kind(path)
            .map_err(Error::io("reading", outside.clone()))?
        {
            Kind::Missing => None,
            _ => {
                let bytes = read_whole(self.host, path)?;
                let mode = std::fs::metadata(&outside)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(mode);
                Some((bytes, mode))
            }
        };
        // The first change of a file podsnap did not write: keep a copy.
        let previous = match self.record.file(path) {
            Some(entry) => entry.previous.clone(),
            None => match (&before, &current) {
                (Some((bytes, _)), Some(current)) => {
                    let backup = backup_path(path);
                    self.create_dirs(Path::new(BACKUP_DIR), 0o700)?;
                    self.journal.push(Before {
                        path: backup.clone(),
                        content: None,
                    });
                    self.host
                        .write_atomic(&backup, bytes, 0o600)
                        .map_err(Error::io("keeping a copy of", outside.clone()))?;
                    Some(Previous {
                        digest: current.clone(),
                        backup,
                    })
                }
                _ => None,
            },
        };
        self.journal.push(Before {
            path: path.to_path_buf(),
            content: before,
        });
        write(self.host).map_err(Error::io("writing", outside))?;
        log::info!("wrote {}", path.display());
        let entry = FileChange {
            path: path.to_path_buf(),
            role,
            digest: digest.to_owned(),
            previous,
        };
        match self.record.files.iter_mut().find(|f| f.path == path) {
            Some(existing) => *existing = entry,
            None => self.record.files.push(entry),
        }
        if role.read_by_containerd() {
            self.containerd_changed = true;
        }
        Ok(true)
    }

    /// Writes the record (0600).
    pub fn save_record(&mut self) -> Result<(), Error> {
        self.create_dirs(Path::new(RECORD).parent().unwrap_or(Path::new("/")), 0o755)?;
        self.host
            .write_atomic(Path::new(RECORD), &self.record.to_bytes(), 0o600)
            .map_err(Error::io(
                "writing the install record",
                self.host.outside(Path::new(RECORD)),
            ))
    }

    /// Puts every file and directory back as it was before this run, newest first; returns
    /// what could not be put back (empty when all was).
    pub fn rollback(self) -> Vec<String> {
        let mut problems = Vec::new();
        for before in self.journal.iter().rev() {
            let done = match &before.content {
                Some((bytes, mode)) => self.host.write_atomic(&before.path, bytes, *mode).map(drop),
                None => self.host.remove_file(&before.path).map(drop),
            };
            match done {
                Ok(()) => log::info!("rolled back {}", before.path.display()),
                Err(e) => problems.push(format!("{}: {e}", before.path.display())),
            }
        }
        let record = match &self.record_before {
            Some(bytes) => self.host.write_atomic(Path::new(RECORD), bytes, 0o600),
            None => self.host.remove_file(Path::new(RECORD)).map(drop),
        };
        if let Err(e) = record {
            problems.push(format!("{RECORD}: {e}"));
        }
        for dir in self.dirs.iter().rev() {
            if let Err(e) = self.host.remove_dir_if_empty(dir) {
                problems.push(format!("{}: {e}", dir.display()));
            }
        }
        problems
    }
}

/// A whole file (binaries too), for the journal.
fn read_whole(host: &HostRoot, path: &Path) -> Result<Vec<u8>, Error> {
    Ok(host
        .read_any(path)
        .map_err(Error::io("reading", host.outside(path)))?
        .unwrap_or_default())
}
