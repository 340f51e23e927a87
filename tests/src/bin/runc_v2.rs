//! `podsnap-test-runc`: a stand-in `runc` for the cgroup v2 end-to-end tests, test-only.
//!
//! On these machines a cgroup v2 node exists only as a private cgroup2 mount whose root has no
//! controller (every controller stays bound to its v1 hierarchy), so runc fails on the first
//! resource file it writes (`cpu.weight`, `pids.max`, `memory.max`...). containerd's default
//! spec and CRI's sandbox and container configs always carry such settings.
//!
//! For `create`, `run` and `restore` this program rewrites the bundle's `config.json`, dropping
//! every member of `linux.resources` except `devices` (runc applies device rules on v2 as an
//! eBPF program on the cgroup, which needs no controller), appends one line per container to
//! `$PODSNAP_TEST_RUNC_LOG` naming what it dropped, then runs `$PODSNAP_TEST_REAL_RUNC` with
//! the same arguments. Every other command goes to the real runc untouched. `runc update`
//! (containerd's Update) is not rewritten: it fails there, as the node cannot honour it.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

/// runc's global options that take a value.
const GLOBAL_WITH_VALUE: [&str; 4] = ["--root", "--log", "--log-format", "--criu"];

fn main() {
    let Some(real) = std::env::var_os("PODSNAP_TEST_REAL_RUNC") else {
        eprintln!("podsnap-test-runc: PODSNAP_TEST_REAL_RUNC is not set");
        std::process::exit(2);
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if let Err(e) = rewrite_bundle(&args) {
        eprintln!("podsnap-test-runc: {e}");
        std::process::exit(2);
    }
    let e = std::process::Command::new(&real).args(&args).exec();
    eprintln!("podsnap-test-runc: cannot run {}: {e}", real.to_string_lossy());
    std::process::exit(2);
}

fn rewrite_bundle(args: &[OsString]) -> Result<(), String> {
    let strs: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut i = 0;
    while i < strs.len() && strs[i].starts_with('-') {
        let takes_value = GLOBAL_WITH_VALUE.contains(&strs[i].as_str());
        i += if takes_value { 2 } else { 1 };
    }
    let Some(command) = strs.get(i) else {
        return Ok(());
    };
    if !["create", "run", "restore"].contains(&command.as_str()) {
        return Ok(());
    }
    let rest = &strs[i + 1..];
    let mut bundle = None;
    for (j, a) in rest.iter().enumerate() {
        if a == "--bundle" || a == "-b" {
            bundle = rest.get(j + 1).cloned();
        } else if let Some(v) = a.strip_prefix("--bundle=") {
            bundle = Some(v.to_owned());
        }
    }
    let id = rest.last().cloned().unwrap_or_default();
    let bundle = match bundle {
        Some(b) => PathBuf::from(b),
        None => std::env::current_dir().map_err(|e| format!("current directory: {e}"))?,
    };
    let config = bundle.join("config.json");
    let text = std::fs::read(&config).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", config.display()))?;
    let mut dropped = Vec::new();
    if let Some(resources) = spec
        .get_mut("linux")
        .and_then(|l| l.get_mut("resources"))
        .and_then(|r| r.as_object_mut())
    {
        let keys: Vec<String> = resources.keys().filter(|k| *k != "devices").cloned().collect();
        for k in keys {
            if let Some(v) = resources.remove(&k) {
                dropped.push(format!("{k}={v}"));
            }
        }
    }
    if !dropped.is_empty() {
        let tmp = bundle.join(".config.json.podsnap-test-runc");
        let out = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, out).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &config).map_err(|e| format!("{}: {e}", config.display()))?;
    }
    if let Some(log) = std::env::var_os("PODSNAP_TEST_RUNC_LOG") {
        let line = format!("{command} {id} dropped: {}\n", dropped.join(" "));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("{}: {e}", PathBuf::from(&log).display()))?;
        f.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    }
    Ok(())
}
