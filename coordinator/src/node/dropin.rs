//! What the installer writes into containerd's configuration: the runtime's drop-in (or a block
//! appended to a k3s/RKE2 template) and the one `imports` entry that makes containerd read it.
//!
//! The main file is edited with `toml_edit`, so its comments, order and formatting stay as they
//! were; only the `imports` array changes. Everything written is parsed back and checked before
//! it goes to disk ([`check_drop_in`], [`check_main`]).

use std::path::Path;

use super::discover::{cri_plugin, parse, ContainerdConfig};
use super::Error;

/// The runtime type of podsnap's shim.
pub const RUNTIME_TYPE: &str = "io.containerd.podsnap.v1";
/// The CRI runtime handler.
pub const HANDLER: &str = "podsnap";

/// Marks the block appended to a k3s/RKE2 template.
const BLOCK_BEGIN: &str = "# --- podsnap node install: begin (podsnap node uninstall removes this block) ---";
const BLOCK_END: &str = "# --- podsnap node install: end ---";

/// The runtime's tables for a configuration of `version` (without the `version` line).
fn runtime_tables(version: i64, systemd_cgroup: Option<bool>) -> String {
    let plugin = cri_plugin(version);
    let mut text = format!(
        "[plugins.'{plugin}'.containerd.runtimes.{HANDLER}]\n\
         \x20 runtime_type = '{RUNTIME_TYPE}'\n\
         \x20 # podsnap.io/restore-from (and the other podsnap.io/* annotations) reach the shim.\n\
         \x20 pod_annotations = ['podsnap.io/*']\n\
         \x20 # kubelet's restart count tells the shim a restart of a restored container.\n\
         \x20 container_annotations = ['podsnap.io/*', 'io.kubernetes.container.restartCount']\n"
    );
    if let Some(on) = systemd_cgroup {
        text.push_str(&format!(
            "\x20 # The cgroup driver of the node's runc runtime.\n\
             \x20 [plugins.'{plugin}'.containerd.runtimes.{HANDLER}.options]\n\
             \x20   SystemdCgroup = {on}\n"
        ));
    }
    text
}

/// The drop-in file for `config`: the same `version` as the main file (see
/// [`super::discover`]) and the runtime under that version's CRI plugin name.
pub fn drop_in(config: &ContainerdConfig) -> String {
    format!(
        "# Written by `podsnap node install`: the CRI runtime handler `{HANDLER}` (podsnap's shim).\n\
         # `podsnap node uninstall` removes it; a reinstall writes it again.\n\
         version = {}\n\n{}",
        config.version,
        runtime_tables(config.version, config.systemd_cgroup)
    )
}

/// A k3s/RKE2 template with the runtime appended (created from the base template when missing).
pub fn template_with_runtime(config: &ContainerdConfig) -> String {
    let mut text = match &config.original {
        Some(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        None => "{{ template \"base\" . }}\n".to_owned(),
    };
    if text.contains(BLOCK_BEGIN) {
        text = template_without_runtime(&text);
    }
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!(
        "\n{BLOCK_BEGIN}\n{}{BLOCK_END}\n",
        runtime_tables(config.version, config.systemd_cgroup)
    ));
    text
}

/// A template with podsnap's block taken out.
pub fn template_without_runtime(text: &str) -> String {
    match (text.find(BLOCK_BEGIN), text.find(BLOCK_END)) {
        (Some(begin), Some(end)) if end > begin => {
            let mut head = text[..begin].to_owned();
            // The blank line put before the block.
            if head.ends_with("\n\n") {
                head.pop();
            }
            let tail = &text[end + BLOCK_END.len()..];
            head + tail.strip_prefix('\n').unwrap_or(tail)
        }
        _ => text.to_owned(),
    }
}

/// The main file with `entry` added to `imports` (the key created after the file's top-level
/// keys when missing); everything else byte for byte as it was. A missing file becomes
/// `version = N` and the import.
pub fn main_with_import(config: &ContainerdConfig, entry: &str) -> Result<String, Error> {
    let Some(original) = &config.original else {
        return Ok(format!(
            "# Written by `podsnap node install` (containerd ran on its defaults); `podsnap node \
             uninstall` removes it.\nversion = {}\nimports = ['{entry}']\n",
            config.version
        ));
    };
    let mut doc = edit_doc(&config.path, original)?;
    match doc.get_mut("imports") {
        Some(item) => {
            let array = item.as_array_mut().ok_or_else(|| Error::Config {
                path: config.path.clone(),
                reason: "`imports` is not an array".to_owned(),
            })?;
            if !array.iter().any(|v| v.as_str() == Some(entry)) {
                array.push(entry);
            }
        }
        None => {
            let mut array = toml_edit::Array::new();
            array.push(entry);
            doc.insert("imports", toml_edit::value(array));
        }
    }
    Ok(doc.to_string())
}

/// The main file without `entry` in `imports` (the key removed if it holds nothing else and
/// `remove_key`).
pub fn main_without_import(path: &Path, text: &[u8], entry: &str) -> Result<String, Error> {
    let mut doc = edit_doc(path, text)?;
    let mut now_empty = false;
    if let Some(array) = doc.get_mut("imports").and_then(|i| i.as_array_mut()) {
        array.retain(|v| v.as_str() != Some(entry));
        now_empty = array.is_empty();
    }
    if now_empty {
        doc.remove("imports");
    }
    Ok(doc.to_string())
}

fn edit_doc(path: &Path, bytes: &[u8]) -> Result<toml_edit::DocumentMut, Error> {
    let text = std::str::from_utf8(bytes).map_err(|_| Error::Config {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".to_owned(),
    })?;
    text.parse::<toml_edit::DocumentMut>().map_err(|e| Error::Config {
        path: path.to_path_buf(),
        reason: format!("not valid TOML: {e}"),
    })
}

/// Checks a drop-in before it is written: valid TOML, the main file's version, the runtime
/// table with podsnap's runtime type under the version's plugin name.
pub fn check_drop_in(path: &Path, text: &str, version: i64) -> Result<(), Error> {
    let table = parse(path, text.as_bytes())?;
    let bad = |reason: &str| Error::Config {
        path: path.to_path_buf(),
        reason: format!("the drop-in podsnap would write is wrong ({reason}): this is a bug"),
    };
    if table.get("version").and_then(|v| v.as_integer()) != Some(version) {
        return Err(bad("version"));
    }
    let runtime_type = table
        .get("plugins")
        .and_then(|p| p.get(cri_plugin(version)))
        .and_then(|c| c.get("containerd"))
        .and_then(|c| c.get("runtimes"))
        .and_then(|r| r.get(HANDLER))
        .and_then(|h| h.get("runtime_type"))
        .and_then(|t| t.as_str());
    if runtime_type != Some(RUNTIME_TYPE) {
        return Err(bad("runtime table"));
    }
    Ok(())
}

/// Checks the edited main file: valid TOML, the same version as before, `entry` imported, and
/// every other key as it was.
pub fn check_main(path: &Path, before: Option<&[u8]>, after: &str, entry: &str) -> Result<(), Error> {
    let new = parse(path, after.as_bytes())?;
    let bad = |reason: &str| Error::Config {
        path: path.to_path_buf(),
        reason: format!("the edit podsnap would write is wrong ({reason}): this is a bug"),
    };
    let imports: Vec<&str> = new
        .get("imports")
        .and_then(|i| i.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    if !imports.contains(&entry) {
        return Err(bad("import missing"));
    }
    if let Some(before) = before {
        let mut old = parse(path, before)?;
        let mut new = new.clone();
        old.remove("imports");
        new.remove("imports");
        if old != new {
            return Err(bad("keys other than `imports` changed"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::node::discover::Flavor;

    fn config(text: Option<&str>, version: i64, systemd: Option<bool>) -> ContainerdConfig {
        ContainerdConfig {
            path: PathBuf::from("/etc/containerd/config.toml"),
            flavor: Flavor::Containerd,
            template: false,
            original: text.map(|t| t.as_bytes().to_vec()),
            version,
            imports: Vec::new(),
            systemd_cgroup: systemd,
            socket: PathBuf::from("/run/containerd/containerd.sock"),
        }
    }

    #[test]
    fn the_drop_in_matches_the_packaged_one() {
        let packaged = include_str!("../../../packaging/containerd-podsnap.toml");
        let c = config(None, 3, None);
        let ours = drop_in(&c);
        check_drop_in(Path::new("/x"), &ours, 3).expect("valid");
        let parsed = |t: &str| t.parse::<toml::Table>().expect("toml");
        assert_eq!(
            parsed(&ours),
            parsed(packaged),
            "the README's drop-in and the installer's agree"
        );
        // Version 2: the old plugin name; the options of runc's entry.
        let v2 = drop_in(&config(None, 2, Some(true)));
        check_drop_in(Path::new("/x"), &v2, 2).expect("valid");
        let table = parsed(&v2);
        let podsnap = &table["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["podsnap"];
        assert_eq!(podsnap["options"]["SystemdCgroup"].as_bool(), Some(true));
        assert_eq!(podsnap["pod_annotations"][0].as_str(), Some("podsnap.io/*"));
        assert!(check_drop_in(Path::new("/x"), &v2, 3).is_err());
    }

    #[test]
    fn the_import_edit_keeps_everything_else_and_reverts_exactly() {
        let original = "# node config, hand-written\nversion = 3\nroot = \"/var/lib/containerd\" # where\n\n\
                        [plugins]\n  # CRI\n  [plugins.'io.containerd.cri.v1.runtime']\n    enable_cdi = true\n";
        let c = config(Some(original), 3, None);
        let edited = main_with_import(&c, "/etc/podsnap/containerd.toml").expect("edit");
        check_main(
            c.path.as_path(),
            Some(original.as_bytes()),
            &edited,
            "/etc/podsnap/containerd.toml",
        )
        .expect("checked");
        assert!(edited.starts_with(
            "# node config, hand-written\nversion = 3\nroot = \"/var/lib/containerd\" # where\nimports = [\"/etc/podsnap/containerd.toml\"]\n"
        ), "{edited}");
        assert!(
            edited.ends_with("  # CRI\n  [plugins.'io.containerd.cri.v1.runtime']\n    enable_cdi = true\n")
        );
        let reverted = main_without_import(
            c.path.as_path(),
            edited.as_bytes(),
            "/etc/podsnap/containerd.toml",
        )
        .expect("revert");
        assert_eq!(reverted, original);
        // An existing array gets one more entry, and loses only it.
        let with = "version = 2\nimports = ['/etc/a.toml'] # mine\n";
        let c = config(Some(with), 2, None);
        let edited = main_with_import(&c, "/etc/podsnap/containerd.toml").expect("edit");
        assert!(
            edited.contains("imports = ['/etc/a.toml', \"/etc/podsnap/containerd.toml\"] # mine"),
            "{edited}"
        );
        let reverted = main_without_import(
            c.path.as_path(),
            edited.as_bytes(),
            "/etc/podsnap/containerd.toml",
        )
        .expect("revert");
        assert_eq!(reverted, with);
        // A missing main file.
        let fresh = main_with_import(&config(None, 3, None), "/etc/podsnap/containerd.toml").expect("new");
        check_main(Path::new("/x"), None, &fresh, "/etc/podsnap/containerd.toml").expect("checked");
    }

    #[test]
    fn template_block_round_trip() {
        let base = "{{ template \"base\" . }}\n[plugins.'x']\n  a = 1\n";
        let mut c = config(Some(base), 3, Some(false));
        c.template = true;
        let with = template_with_runtime(&c);
        assert!(with.starts_with(base));
        assert!(with.contains("runtimes.podsnap]"));
        assert_eq!(template_without_runtime(&with), base);
        // Appending again replaces the block.
        c.original = Some(with.clone().into_bytes());
        assert_eq!(template_with_runtime(&c), with);
    }
}
