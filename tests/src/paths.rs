//! Names of podsnap the suite uses: paths on the node, environment switches and the restore
//! annotation, as the docs (README.md, docs/) and the checkpoint crate's module headers state
//! them. Written out here, not imported from the crates under test, so a renamed path is a
//! visible change of behaviour that a test catches.

use std::path::PathBuf;

/// Where CRIU keeps its kernel feature cache (docs/node-notes.md).
pub const KDAT_RUN_DIR: &str = "/run";
/// CRIU's kernel feature cache, in [`KDAT_RUN_DIR`].
pub const KDAT_CACHE: &str = "criu.kdat";
/// What podsnap made that cache for, beside it.
pub const KDAT_RECORD: &str = "criu.kdat.podsnap";
/// Set to `off` to leave CRIU's cache alone.
pub const KDAT_SWITCH_ENV: &str = "PODSNAP_CRIU_KDAT_CACHE";
/// The test hold points of a dump or restore (`checkpoint/src/failpoint.rs`): a directory.
pub const FAILPOINT_HOLD_ENV: &str = "PODSNAP_FAILPOINT_HOLD";
/// Where a running pod dump keeps its crash journal (docs/guarantees.md).
pub const JOURNAL_DIR: &str = "/run/podsnap/dumps";
/// The pod annotation naming the checkpoint a pod is restored from.
pub const RESTORE_ANNOTATION: &str = "podsnap.io/restore-from";
/// The CRIU options a container's dump used, in its images directory (the layout drawn in
/// the checkpoint crate's manifest module).
pub const CRIU_OPTIONS_FILE: &str = "podsnap-criu.json";

/// The journal of a dump of the pod sandbox `sandbox`.
pub fn journal(sandbox: &str) -> PathBuf {
    PathBuf::from(JOURNAL_DIR).join(format!("{sandbox}.json"))
}
