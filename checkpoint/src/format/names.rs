//! Names and paths a checkpoint may hold: container and volume names, relative paths that stay
//! inside their root.

use std::path::{Component, Path};

/// Accepts a relative path that stays inside its root: no absolute paths, no `..`.
pub fn safe_relative(path: &str) -> std::result::Result<&Path, String> {
    let p = Path::new(path);
    if path.is_empty() || p.is_absolute() {
        return Err(format!("path {path:?} is not relative"));
    }
    if p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("path {path:?} leaves the checkpoint"));
    }
    Ok(p)
}

/// Container and volume names become directory names: letters, digits, `-`, `_`, `.`, and not
/// `.` or `..`.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid container or volume name"))
    }
}
