//! The `podsnap` CLI run against a node, as an operator runs it: its CRI and containerd
//! sockets, its checkpoint root and its node configuration. The suite checks checkpoints and
//! the root through these public commands (or [`crate::checkpoint`]), never through the crates
//! under test.

use std::path::Path;
use std::process::{Command, Output};

use crate::node::Node;

/// `podsnap ARGS` against `node`.
pub fn podsnap(node: &Node, binary: &Path, args: &[&str]) -> Output {
    Command::new(binary)
        .args(args)
        .env("CONTAINER_RUNTIME_ENDPOINT", node.endpoint())
        .env("CONTAINERD_ADDRESS", node.address())
        .env("PODSNAP_CHECKPOINT_ROOT", node.files().checkpoints())
        .env("PODSNAP_CONFIG", node.files().podsnap_config())
        .output()
        .expect("running podsnap")
}

/// Its stdout and stderr, as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `podsnap inspect -o json DIR`: `{"dir", "verified", "sealed", "problem"?, "manifest"?}`,
/// and whether the command succeeded (it fails when the checkpoint is not verified).
pub fn inspect_json(node: &Node, binary: &Path, dir: &Path) -> (serde_json::Value, bool) {
    let out = podsnap(node, binary, &["inspect", "-o", "json", &dir.to_string_lossy()]);
    let (stdout, stderr) = text(&out);
    let value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("podsnap inspect -o json printed no JSON ({e}): {stdout}{stderr}"));
    (value, out.status.success())
}

/// `podsnap list -o json`: one object per checkpoint of the node's root.
pub fn list_json(node: &Node, binary: &Path) -> Vec<serde_json::Value> {
    let out = podsnap(node, binary, &["list", "-o", "json"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "podsnap list: {stdout}{stderr}");
    serde_json::from_str(&stdout).expect("a JSON array")
}

/// The `in_use_by` entries `podsnap list -o json` shows for the checkpoint at `dir`.
pub fn users_of(node: &Node, binary: &Path, dir: &Path) -> Vec<serde_json::Value> {
    let dir = std::fs::canonicalize(dir).expect("the checkpoint directory");
    let rows = list_json(node, binary);
    let row = rows
        .iter()
        .find(|r| {
            r["path"]
                .as_str()
                .and_then(|p| std::fs::canonicalize(p).ok())
                .is_some_and(|p| p == dir)
        })
        .unwrap_or_else(|| panic!("{} is not listed: {rows:?}", dir.display()));
    row["in_use_by"].as_array().cloned().unwrap_or_default()
}

/// `podsnap rm NAME`: Ok with its stdout, or Err with its stderr.
pub fn rm(node: &Node, binary: &Path, name: &str) -> Result<String, String> {
    let out = podsnap(node, binary, &["rm", name]);
    let (stdout, stderr) = text(&out);
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(stderr)
    }
}
