//! What install and uninstall print for the operator (one line per fact, as the other commands
//! print).

use super::{Installed, Uninstalled};

/// An install's lines.
pub fn installed(done: &Installed) -> String {
    let mut lines = Vec::new();
    lines.push(format!("config       {}", done.config.display()));
    lines.push(format!("drop-in      {}", done.drop_in.display()));
    if done.written.is_empty() {
        lines.push("written      nothing: already installed as it is".to_owned());
    }
    for path in &done.written {
        lines.push(format!("written      {}", path.display()));
    }
    lines.push(match &done.restarted {
        Some(how) => format!("restarted    containerd, with {how}"),
        None => "restarted    no (containerd reads nothing new)".to_owned(),
    });
    lines.push(format!(
        "containerd   {}: serves the podsnap handler",
        done.containerd
    ));
    lines.join("\n")
}

/// An uninstall's lines.
pub fn uninstalled(done: &Uninstalled) -> String {
    if !done.was_installed {
        return "uninstalled  nothing: podsnap is not installed here (no install record)".to_owned();
    }
    let mut lines = Vec::new();
    for path in &done.restored {
        lines.push(format!("put back     {}", path.display()));
    }
    for kept in &done.kept {
        lines.push(format!("kept         {kept}"));
    }
    lines.push(match &done.restarted {
        Some(how) => format!("restarted    containerd, with {how}: the podsnap handler is gone"),
        None => "restarted    no".to_owned(),
    });
    lines.join("\n")
}
