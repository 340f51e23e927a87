//! `podsnap-cni-ipam`: a CNI IPAM plugin that hands a restored pod its address at the checkpoint.
//!
//! It wraps the node's IPAM plugin (`ipam.delegate` in the network configuration, e.g.
//! host-local) and passes every call through to it unchanged, but one: an ADD for a pod annotated
//! `podsnap.io/keep-ip: "true"` and `podsnap.io/restore-from: <checkpoint>` asks the delegate for
//! the addresses the pod had at that checkpoint (CNI's `ips` runtime config, which host-local
//! honours). containerd passes a pod's annotations to plugins that declare the
//! `io.kubernetes.cri.pod-annotations` capability. Before asking, it checks what the shim's
//! restore checks again later: the checkpoint resolves inside the node's checkpoint root, the
//! node's restore policy lets the pod's namespace restore it, and it was taken on this node (an
//! address means nothing on another one). The annotation carries no address: a pod can only get
//! back the address of a checkpoint it may restore. When the address is taken, the ADD fails
//! with an error that says so, and the pod is not created.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use podsnap_checkpoint::config::{NodeConfig, KEEP_IP_ANNOTATION, RESTORE_ANNOTATION};
use podsnap_checkpoint::format::manifest::Manifest;
use serde_json::{json, Value};

/// The capability under which containerd passes a pod's annotations.
const POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";
const SUPPORTED: [&str; 6] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0", "1.1.1"];

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return fail(
            "",
            11,
            &format!("podsnap-cni-ipam: reading the configuration: {e}"),
        );
    }
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let conf: Value = match serde_json::from_slice(&stdin) {
        Ok(v) => v,
        Err(e) if command == "VERSION" => {
            let _ = e;
            Value::Null
        }
        Err(e) => {
            return fail(
                "",
                6,
                &format!("podsnap-cni-ipam: the network configuration: {e}"),
            )
        }
    };
    let version = conf["cniVersion"].as_str().unwrap_or("1.0.0").to_owned();
    if command == "VERSION" {
        println!(
            "{}",
            json!({ "cniVersion": version, "supportedVersions": SUPPORTED })
        );
        return ExitCode::SUCCESS;
    }
    let mut delegated = conf.clone();
    let Some(delegate) = conf["ipam"]["delegate"].as_object().cloned() else {
        return fail(
            &version,
            7,
            "podsnap-cni-ipam: the network configuration has no ipam.delegate",
        );
    };
    let Some(plugin) = delegate.get("type").and_then(Value::as_str).map(str::to_owned) else {
        return fail(&version, 7, "podsnap-cni-ipam: ipam.delegate has no type");
    };
    delegated["ipam"] = Value::Object(delegate);
    let mut wanted = Vec::new();
    if command == "ADD" {
        let annotations = &conf["runtimeConfig"][POD_ANNOTATIONS];
        if annotations[KEEP_IP_ANNOTATION].as_str() == Some("true") {
            match kept_addresses(annotations) {
                Ok(ips) => wanted = ips,
                Err(e) => return fail(&version, 7, &format!("{KEEP_IP_ANNOTATION}: {e}")),
            }
            delegated["runtimeConfig"]["ips"] = json!(wanted);
        }
    }
    run_delegate(&plugin, &delegated, &version, &wanted)
}

/// The addresses the pod had at the checkpoint its annotations name, after the checks above.
fn kept_addresses(annotations: &Value) -> Result<Vec<String>, String> {
    let name = annotations[RESTORE_ANNOTATION]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            format!("only a pod restored from a checkpoint ({RESTORE_ANNOTATION}) keeps its address")
        })?;
    let config = NodeConfig::load().map_err(|e| e.to_string())?;
    let root = config.checkpoint_root();
    let dir = podsnap_checkpoint::node::store::resolve(&root, name)
        .map_err(|reason| format!("checkpoint {name:?}: {reason}"))?;
    let manifest = Manifest::load_listed(&dir).map_err(|e| e.to_string())?;
    let namespace = cni_arg("K8S_POD_NAMESPACE").unwrap_or_default();
    podsnap_checkpoint::trust::policy::check_namespace(
        &config.restore,
        manifest.pod.namespace.as_deref(),
        &namespace,
        &config.describe(),
    )
    .map_err(|v| podsnap_checkpoint::Error::refused(name, v).to_string())?;
    let here = podsnap_checkpoint::trust::identity::node_id();
    if here.is_empty() || manifest.host.node_id != here {
        return Err(format!(
            "checkpoint {name:?} was taken on another node: its address means nothing here"
        ));
    }
    if manifest.pod.ips.is_empty() {
        return Err(format!("checkpoint {name:?} records no address of the pod"));
    }
    Ok(manifest.pod.ips.iter().map(|ip| ip.to_string()).collect())
}

/// A `KEY=value` of `CNI_ARGS`.
fn cni_arg(key: &str) -> Option<String> {
    std::env::var("CNI_ARGS").ok()?.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

/// Runs the delegate plugin (found in `CNI_PATH`) with `conf`, passing its answer through; a
/// failure to get the kept addresses says so.
fn run_delegate(plugin: &str, conf: &Value, version: &str, wanted: &[String]) -> ExitCode {
    if plugin.contains('/') || plugin == "podsnap-cni-ipam" {
        return fail(
            version,
            7,
            &format!("podsnap-cni-ipam: bad delegate type {plugin:?}"),
        );
    }
    let path = std::env::var("CNI_PATH").unwrap_or_default();
    let Some(binary) = path
        .split(':')
        .map(|d| PathBuf::from(d).join(plugin))
        .find(|p| p.is_file())
    else {
        return fail(
            version,
            7,
            &format!("podsnap-cni-ipam: no {plugin} plugin in CNI_PATH {path:?}"),
        );
    };
    let child = Command::new(&binary)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return fail(
                version,
                11,
                &format!("podsnap-cni-ipam: running {}: {e}", binary.display()),
            )
        }
    };
    if let Some(mut input) = child.stdin.take() {
        if let Err(e) = input.write_all(conf.to_string().as_bytes()) {
            return fail(
                version,
                11,
                &format!("podsnap-cni-ipam: writing to {plugin}: {e}"),
            );
        }
    }
    let out = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => {
            return fail(
                version,
                11,
                &format!("podsnap-cni-ipam: waiting for {plugin}: {e}"),
            )
        }
    };
    if !out.status.success() && !wanted.is_empty() {
        let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let msg = answer["msg"].as_str().unwrap_or("failed");
        let code = answer["code"].as_u64().unwrap_or(11);
        let text = format!(
            "{KEEP_IP_ANNOTATION}: the pod's address at the checkpoint ({}) cannot be had: {msg}",
            wanted.join(", ")
        );
        return fail(version, code, &text);
    }
    let _ = std::io::stdout().write_all(&out.stdout);
    if out.status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(u8::try_from(out.status.code().unwrap_or(1)).unwrap_or(1))
    }
}

/// Prints a CNI error and fails.
fn fail(version: &str, code: u64, msg: &str) -> ExitCode {
    let version = if version.is_empty() { "1.0.0" } else { version };
    println!("{}", json!({ "cniVersion": version, "code": code, "msg": msg }));
    ExitCode::FAILURE
}
