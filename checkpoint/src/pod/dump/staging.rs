//! The staging directory a dump writes into until the checkpoint is complete.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::fs::private::{create_private_dir, sync_dir};
use crate::pod::dump::journal::{self, Journal};

/// The directory a dump writes into until it is complete; removed when dropped uncommitted.
/// The dump's journal lists it, and says when it is committed.
pub(super) struct Staging {
    dest: PathBuf,
    pub(super) dir: PathBuf,
    /// The destination existed (empty) and is written in place.
    in_place: bool,
    pub(super) committed: bool,
    pub(super) journal: Arc<Journal>,
}

impl Staging {
    /// The staging directory of a dump into `dest`, recorded in `journal`.
    pub(super) fn new(dest: &Path, journal: Arc<Journal>) -> Result<Self> {
        let staging = Self::make(dest, journal)?;
        staging.journal.update(|e| {
            e.staging = staging.dir.clone();
            e.in_place = staging.in_place;
        })?;
        Ok(staging)
    }

    fn make(dest: &Path, journal: Arc<Journal>) -> Result<Self> {
        let exists_empty = match std::fs::read_dir(dest) {
            Ok(mut rd) => {
                if rd.next().is_some() {
                    return Err(Error::InvalidCheckpoint {
                        path: dest.to_path_buf(),
                        reason: "the destination exists and is not empty".into(),
                    });
                }
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io("inspect the destination", dest, e)),
        };
        if exists_empty {
            return Ok(Self {
                dest: dest.to_path_buf(),
                dir: dest.to_path_buf(),
                in_place: true,
                committed: false,
                journal,
            });
        }
        let parent = dest.parent().unwrap_or(Path::new("."));
        create_private_dir(parent)?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io("remove a stale staging dir", &dir, e))?;
        }
        create_private_dir(&dir)?;
        Ok(Self {
            dest: dest.to_path_buf(),
            dir,
            in_place: false,
            committed: false,
            journal,
        })
    }

    /// Moves the complete checkpoint into place (once; later calls do nothing), the journal
    /// saying `phase` (what a recovery must then finish: never undo) before the move, and
    /// dumping again if the move fails (the output is then removed as uncommitted).
    pub(super) fn commit(&mut self, phase: journal::Phase) -> Result<()> {
        if self.committed {
            return Ok(());
        }
        self.journal.update(|e| e.phase = phase)?;
        let moved = match self.in_place {
            true => Ok(()),
            false => std::fs::rename(&self.dir, &self.dest)
                .map_err(|e| Error::io("move the checkpoint into place", &self.dest, e)),
        }
        .and_then(|()| sync_dir(self.dest.parent().unwrap_or(Path::new("."))));
        if let Err(e) = moved {
            if let Err(j) = self.journal.update(|e| e.phase = journal::Phase::Dumping) {
                log::warn!("{j}");
            }
            return Err(e);
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let res = if self.in_place {
            crate::fs::remove::remove_contents(&self.dir)
        } else {
            std::fs::remove_dir_all(&self.dir)
        };
        if let Err(e) = res {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("remove partial checkpoint {}: {e}", self.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::MANIFEST;
    use crate::fs::private::write_synced;

    #[test]
    fn staging_refuses_a_non_empty_destination_and_cleans_up() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("f"), b"x").expect("write");
        let journal = Arc::new(Journal::none());
        assert!(Staging::new(t.path(), journal.clone()).is_err());
        let dest = t.path().join("new");
        let s = Staging::new(&dest, journal.clone()).expect("staging");
        let staged = s.dir.clone();
        std::fs::write(staged.join("partial"), b"x").expect("write");
        drop(s);
        assert!(
            !staged.exists() && !dest.exists(),
            "uncommitted output is removed"
        );
        let mut s = Staging::new(&dest, journal.clone()).expect("staging");
        write_synced(&s.dir.join(MANIFEST), b"{}").expect("manifest");
        s.commit(journal::Phase::Committed).expect("commit");
        drop(s);
        assert!(dest.join(MANIFEST).exists(), "committed output stays");
        std::fs::remove_dir_all(&dest).expect("rm");
        std::fs::create_dir(&dest).expect("an empty destination");
        let s = Staging::new(&dest, journal.clone()).expect("in place");
        std::fs::write(s.dir.join("partial"), b"x").expect("write");
        drop(s);
        assert!(dest.is_dir(), "a destination podsnap did not create stays");
        assert_eq!(std::fs::read_dir(&dest).expect("list").count(), 0);
    }

    fn read_entry(path: &Path) -> journal::Entry {
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
    }

    #[test]
    fn a_commit_records_its_phase_in_the_journal_before_the_move() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("journal.json");
        let journal = Arc::new(Journal::begin(&path, journal::Entry::default()).expect("journal"));
        let dest = t.path().join("ckpt");
        let mut s = Staging::new(&dest, journal.clone()).expect("staging");
        let recorded = read_entry(&path);
        assert_eq!(recorded.staging, s.dir, "the journal lists the staging dir");
        s.commit(journal::Phase::Stopping).expect("commit");
        assert_eq!(read_entry(&path).phase, journal::Phase::Stopping);
        assert!(dest.is_dir() && !recorded.staging.exists(), "moved into place");
    }
}
