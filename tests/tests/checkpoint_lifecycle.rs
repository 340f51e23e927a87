//! Checkpoints on a node, against the real stack: no hidden copies, and a lifecycle an admin
//! can see and bound.
//!
//! - `podsnap restore` from outside the checkpoint root hard-links the checkpoint in (the
//!   imported files are the source's inodes, seen while the restore runs), copies only from
//!   another filesystem, and leaves the root as it was afterwards: on success, on a refusal
//!   before anything is made, and on a failure in the shim after the import;
//! - `podsnap list` (table and `-o json`) and `podsnap rm` (the binary) on a root with several
//!   checkpoints, one broken, one in a folder, one in use by a pod restored from it through
//!   kubelet's path (refused until that pod and its shim are gone);
//! - retention after dumps into the root: by count per pod (sparing a checkpoint in use), by
//!   total bytes, by age; nothing for a dump elsewhere;
//! - the free-space reserve refusing a dump, with the numbers, writing nothing.

mod pod_checkpoint_support;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pod_checkpoint_support::*;
use podsnap_coordinator::progress::Progress;
use podsnap_tests::checkpoint::MANIFEST;
use podsnap_tests::cli::{podsnap, text};
use podsnap_tests::host::Tmpfs;
use podsnap_tests::kubelet::{
    ask, remove_pod, run_pod, run_three_container_pod, KubePod, PodOptions, APP_PORT, DATA_VOLUME,
};
use podsnap_tests::node::Node;
use podsnap_tests::{start_node, HANDLER};

/// `cp -a`: owner, mode and contents as they are (root's 0600 files stay linkable).
fn copy_checkpoint(from: &Path, to: &Path) {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

/// Edits a checkpoint's manifest.json (not in its own file list: the checkpoint stays valid).
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(MANIFEST);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read manifest")).expect("manifest JSON");
    edit(&mut m);
    std::fs::write(&path, serde_json::to_vec_pretty(&m).expect("JSON")).expect("write manifest");
}

/// Every regular file under `dir`: relative path -> ((device, inode), link count).
fn files_of(dir: &Path) -> BTreeMap<String, ((u64, u64), u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(dir)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.insert(rel, ((meta.dev(), meta.ino()), meta.nlink()));
            }
        }
    }
    out
}

/// Watches a restore: when the pod is about to be created (the checkpoint is in the root by
/// then), records how many files the imported checkpoint has and how many of them are the
/// source's own inodes.
struct Probe {
    root: PathBuf,
    source: PathBuf,
    before: Vec<String>,
    lines: Mutex<Vec<String>>,
    seen: Mutex<Option<(usize, usize)>>,
}

impl Probe {
    fn new(root: &Path, source: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            source: source.to_path_buf(),
            before: names_in(root),
            lines: Mutex::new(Vec::new()),
            seen: Mutex::new(None),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn seen(&self) -> Option<(usize, usize)> {
        self.seen.lock().ok().and_then(|s| *s)
    }
}

impl Progress for Probe {
    fn step(&self, message: &str) {
        eprintln!("podsnap: {message}");
        if let Ok(mut lines) = self.lines.lock() {
            lines.push(message.to_owned());
        }
        if !message.starts_with("creating pod") {
            return;
        }
        let new: Vec<String> = names_in(&self.root)
            .into_iter()
            .filter(|n| !self.before.contains(n))
            .collect();
        let [name] = new.as_slice() else {
            eprintln!("expected one new entry in the root, found {new:?}");
            return;
        };
        let imported = files_of(&self.root.join(name));
        let source = files_of(&self.source);
        let shared = imported
            .iter()
            .filter(|(rel, (inode, _))| source.get(*rel).is_some_and(|(s, _)| s == inode))
            .count();
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some((imported.len(), shared));
        }
    }
}

fn volume_of(node: &Node, uid: &str) -> PathBuf {
    pods_dir(node)
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(DATA_VOLUME)
}

fn app_id(containers: &[(String, String)]) -> &str {
    containers
        .iter()
        .find(|(n, _)| n == "app")
        .map(|(_, id)| id.as_str())
        .expect("the app was restored")
}

#[test]
fn a_restore_from_outside_the_root_links_it_in_and_leaves_the_root_as_it_was() {
    let node = start_node!();
    let root = node.files().checkpoints();
    let name = node.unique("linked");
    let pod = run_three_container_pod(&node, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let before = mark_and_count(&pod);
    // Dumped into the root, then moved out of it, on the same filesystem (the node directory).
    dump(&node, &pod, Some(root.join("source"))).expect("podsnap dump");
    let outside = node.dir().join("outside");
    std::fs::create_dir_all(&outside).expect("mkdir");
    let source = outside.join("source");
    std::fs::rename(root.join("source"), &source).expect("move the checkpoint out of the root");
    let files = podsnap_tests::checkpoint::verify(&source)
        .expect("valid")
        .files
        .len()
        + 1;
    let mode = |p: &Path| std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777;
    for rel in files_of(&source).keys() {
        assert_eq!(mode(&source.join(rel)), 0o600, "{rel}: a dump's files are 0600");
    }
    remove_original(&node, &pod);
    let root_before = names_in(&root);
    let sandboxes_before = sandbox_ids(&node);

    // Refused before anything is made (a listed file is missing): nothing brought in.
    let missing = outside.join("missing");
    copy_checkpoint(&source, &missing);
    std::fs::remove_file(missing.join("containers/app/spec.dump")).expect("rm");
    let err = restore(&node, &restore_request(&node, &missing))
        .map(|p| p.id)
        .expect_err("a checkpoint missing a file")
        .to_string();
    assert!(err.contains("containers/app/spec.dump"), "{err}");
    assert_eq!(
        names_in(&root),
        root_before,
        "refused early: the root is as it was"
    );

    // Brought in, then refused by the shim (a damaged image): removed with the rest.
    let damaged = outside.join("damaged");
    copy_checkpoint(&source, &damaged);
    let victim = files_of(&damaged.join("containers/app/checkpoint"))
        .into_keys()
        .max_by_key(|rel| {
            std::fs::metadata(damaged.join("containers/app/checkpoint").join(rel))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .expect("a CRIU image");
    let path = damaged.join("containers/app/checkpoint").join(victim);
    let mut bytes = std::fs::read(&path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, bytes).expect("write");
    let probe = Probe::new(&root, &damaged);
    let err = restore_with(&node, &restore_request(&node, &damaged), &probe)
        .map(|p| p.id)
        .expect_err("a damaged checkpoint")
        .to_string();
    assert!(err.contains("is damaged"), "{err}");
    assert!(err.contains("the imported checkpoint"), "{err}");
    assert!(!err.contains("NOT removed"), "{err}");
    assert_eq!(
        probe.seen(),
        Some((files, files)),
        "the damaged checkpoint was linked in"
    );
    assert_eq!(
        names_in(&root),
        root_before,
        "the failed restore's import is gone"
    );
    assert_eq!(sandbox_ids(&node), sandboxes_before);

    // Restored: every file the source's own inode while the restore runs; nothing left after.
    let probe = Probe::new(&root, &source);
    let restored =
        restore_with(&node, &restore_request(&node, &source), &probe).expect("podsnap restore from outside");
    assert_eq!(
        probe.seen(),
        Some((files, files)),
        "every imported file is a hard link to the source: no data copied"
    );
    let imported = restored.imported.clone().expect("brought in");
    assert_eq!((imported.linked, imported.copied), (files, 0));
    assert!(
        !probe.lines().iter().any(|l| l.contains("copying")),
        "{:?}",
        probe.lines()
    );
    assert_eq!(
        names_in(&root),
        root_before,
        "the import is removed once restored"
    );
    assert!(
        files_of(&source).values().all(|(_, links)| *links == 1),
        "no link to the source is left"
    );
    verified(&node, &source);
    check_restored(
        &node,
        &restored.ip,
        &pod.pod.ip,
        &volume_of(&node, &restored.uid),
        app_id(&restored.containers),
        before,
    );

    // From another filesystem: copied, said so, and removed after all the same.
    let tmpfs = Tmpfs::mount(&node.dir().join("other-fs"), "size=512m");
    let elsewhere = tmpfs.0.join("source");
    copy_checkpoint(&source, &elsewhere);
    let probe = Probe::new(&root, &elsewhere);
    let mut request = restore_request(&node, &elsewhere);
    request.name = Some(format!("{name}-copied"));
    let copied = restore_with(&node, &request, &probe).expect("podsnap restore from a tmpfs");
    let imported = copied.imported.clone().expect("brought in");
    assert_eq!((imported.linked, imported.copied), (0, files));
    assert_eq!(probe.seen(), Some((files, 0)), "copies, not links");
    assert!(
        probe
            .lines()
            .iter()
            .any(|l| l.contains("on another filesystem") && l.contains("copying")),
        "{:?}",
        probe.lines()
    );
    assert_eq!(names_in(&root), root_before);
    let count: u64 = ask(&copied.ip, APP_PORT, "count")
        .expect("count")
        .parse()
        .expect("a number");
    assert!(count >= before.app, "restored from the copy: {count}");
    drop(tmpfs);
}

/// `podsnap list -o json`, by name.
fn list_json(node: &Node, binary: &Path) -> BTreeMap<String, serde_json::Value> {
    let out = podsnap(node, binary, &["list", "-o", "json"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "podsnap list: {stdout}{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).expect("a JSON array");
    rows.into_iter()
        .map(|r| (r["name"].as_str().expect("a name").to_owned(), r))
        .collect()
}

fn restore_annotated(name: &str, checkpoint: &str) -> PodOptions {
    let mut options = PodOptions::new(name, HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), checkpoint.to_owned());
    options
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn list_shows_every_checkpoint_and_rm_never_removes_one_in_use() {
    let node = start_node!();
    let binary = podsnap_binary();
    let root = node.files().checkpoints();
    let name = node.unique("listed");
    let pod = run_three_container_pod(&node, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    mark_and_count(&pod);
    dump(&node, &pod, Some(root.join("a"))).expect("dump a");
    dump(&node, &pod, Some(root.join("team/b"))).expect("dump team/b");
    std::fs::create_dir_all(root.join("partial/containers/app")).expect("a partial checkpoint");
    remove_original(&node, &pod);

    let rows = list_json(&node, &binary);
    assert_eq!(
        rows.keys().collect::<Vec<_>>(),
        ["a", "partial", "team/b"],
        "{rows:#?}"
    );
    let a = &rows["a"];
    assert_eq!(a["pod"], format!("default/{name}"));
    assert!(a["size_bytes"].as_u64().is_some_and(|b| b > 0), "{a}");
    assert!(a["created"].as_str().is_some_and(|c| c.ends_with('Z')), "{a}");
    assert_eq!(a["containers"], serde_json::json!(["init", "sidecar", "app"]));
    assert_eq!(a["verified"], serde_json::Value::Null);
    assert_eq!(a["in_use_by"], serde_json::json!([]));
    let partial = &rows["partial"];
    assert_eq!(partial["pod"], serde_json::Value::Null);
    assert!(
        partial["problem"]
            .as_str()
            .is_some_and(|p| p.contains("no manifest.json")),
        "{partial}"
    );

    let out = podsnap(&node, &binary, &["list", "--verify"]);
    let (table, stderr) = text(&out);
    assert!(out.status.success(), "podsnap list --verify: {table}{stderr}");
    eprintln!("{table}");
    let line = |n: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{n} ")))
            .unwrap_or_else(|| panic!("no line for {n}:\n{table}"))
            .to_owned()
    };
    assert!(table.starts_with("NAME"), "{table}");
    assert!(line("a").contains(" ok "), "{table}");
    assert!(line("a").contains(&format!("default/{name}")), "{table}");
    assert!(line("team/b").contains("init,sidecar,app"), "{table}");
    assert!(line("partial").contains("BROKEN"), "{table}");
    assert!(table.contains("partial: broken: no manifest.json"), "{table}");

    // A pod restored from `a` through kubelet's path holds it.
    let restored = run_pod(&node, &restore_annotated(&node.unique("from-a"), "a")).expect("restored sandbox");
    let rows = list_json(&node, &binary);
    assert_eq!(rows["a"]["in_use_by"][0]["sandbox_id"], restored.id, "{rows:#?}");
    assert_eq!(
        rows["a"]["in_use_by"][0]["pod"],
        format!("default/{}", node.unique("from-a"))
    );
    let out = podsnap(&node, &binary, &["rm", "a"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "rm of a checkpoint in use: {stdout}");
    assert!(
        stderr.contains("checkpoint \"a\" is in use by pod default/") && stderr.contains(&restored.id[..13]),
        "{stderr}"
    );
    assert!(root.join("a").join(MANIFEST).exists(), "left as it was");

    // Not checkpoints: a folder, a name leading out of the root. Several names at once.
    for (bad, why) in [
        ("team", "a folder"),
        ("../outside", "'..'"),
        ("nothing", "no such checkpoint"),
    ] {
        let out = podsnap(&node, &binary, &["rm", bad]);
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "rm {bad}");
        assert!(
            stderr.contains("is not a checkpoint") && stderr.contains(why),
            "{bad}: {stderr}"
        );
    }
    let out = podsnap(&node, &binary, &["rm", "team/b", "partial"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "rm team/b partial: {stdout}{stderr}");
    assert!(stdout.contains("removed      team/b (pod default/"), "{stdout}");
    assert!(stdout.contains("removed      partial (broken)"), "{stdout}");
    assert_eq!(list_json(&node, &binary).keys().collect::<Vec<_>>(), ["a"]);

    // The pod and its shim gone, the checkpoint is free.
    remove_pod(&node, &restored).expect("remove the restored pod");
    wait_for(
        "the lease on a to go with the shim",
        Duration::from_secs(30),
        || list_json(&node, &binary)["a"]["in_use_by"] == serde_json::json!([]),
    );
    let out = podsnap(&node, &binary, &["rm", "a"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "rm a: {stdout}{stderr}");
    assert!(list_json(&node, &binary).is_empty());
    assert!(
        names_in(&root).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        names_in(&root)
    );
}

/// Names of the valid checkpoints of the node's root (`podsnap list`: no problem).
fn valid_in(node: &Node) -> Vec<String> {
    list_json(node, podsnap_bin())
        .into_iter()
        .filter(|(_, row)| row["problem"].is_null())
        .map(|(name, _)| name)
        .collect()
}

/// The size `podsnap list` gives a valid checkpoint of the node's root.
fn size_of(node: &Node, name: &str) -> u64 {
    list_json(node, podsnap_bin())
        .get(name)
        .and_then(|row| row["size_bytes"].as_u64())
        .unwrap_or_else(|| panic!("no valid checkpoint {name}"))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .expect("a clock after 1970")
}

/// Waits until `podsnap list` shows no pod using the checkpoint at `dir`.
fn wait_unleased(node: &Node, dir: &Path) {
    wait_for(
        &format!("the leases on {} to go", dir.display()),
        Duration::from_secs(30),
        || podsnap_tests::cli::users_of(node, podsnap_bin(), dir).is_empty(),
    );
}

#[test]
fn retention_bounds_the_root_by_count_bytes_and_age_and_spares_what_is_in_use() {
    let node = start_node!();
    let root = node.files().checkpoints();
    let name = node.unique("kept");
    let pod = run_three_container_pod(&node, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let dump_as = |ckpt: &str| {
        dump(&node, &pod, Some(root.join(ckpt))).unwrap_or_else(|e| panic!("dump {ckpt}: {e:#}"));
    };

    // Unbounded (no [retention]): everything stays.
    dump_as("r1");
    dump_as("r2");
    // A checkpoint of another pod: its own count.
    copy_checkpoint(&root.join("r1"), &root.join("other"));
    edit_manifest(&root.join("other"), |m| {
        m["pod"]["name"] = serde_json::json!("someone-else")
    });
    assert_eq!(valid_in(&node), ["other", "r1", "r2"]);

    // By count per pod: the oldest of this pod goes.
    node.set_podsnap_config("[retention]\nmax_per_pod = 2\n")
        .expect("config");
    dump_as("r3");
    assert_eq!(valid_in(&node), ["other", "r2", "r3"]);

    // A checkpoint in use (a pod restored from it through kubelet's path) stays; the next
    // oldest goes instead.
    let restored =
        run_pod(&node, &restore_annotated(&node.unique("from-r2"), "r2")).expect("restored sandbox");
    dump_as("r4");
    assert_eq!(valid_in(&node), ["other", "r2", "r4"]);
    remove_pod(&node, &restored).expect("remove the restored pod");
    wait_unleased(&node, &root.join("r2"));
    podsnap_tests::cli::rm(&node, podsnap_bin(), "other").expect("rm other");

    // By total size: the oldest go until the root fits.
    let size = size_of(&node, "r4");
    node.set_podsnap_config(&format!("[retention]\nmax_total_bytes = {}\n", size + size / 2))
        .expect("config");
    dump_as("r5");
    assert_eq!(valid_in(&node), ["r5"]);

    // By age (the manifest's created_unix, backdated): the old one goes, not the new one.
    edit_manifest(&root.join("r5"), |m| {
        m["created_unix"] = serde_json::json!(now() - 7200)
    });
    node.set_podsnap_config("[retention]\nmax_age_seconds = 3600\n")
        .expect("config");
    dump_as("r6");
    assert_eq!(valid_in(&node), ["r6"]);

    // A dump elsewhere leaves the root alone, bounds or not.
    edit_manifest(&root.join("r6"), |m| {
        m["created_unix"] = serde_json::json!(now() - 7200)
    });
    dump(&node, &pod, Some(node.dir().join("elsewhere/r7"))).expect("dump outside the root");
    assert_eq!(valid_in(&node), ["r6"]);
    assert!(
        names_in(&root).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        names_in(&root)
    );
}

#[test]
fn the_reserve_refuses_a_dump_that_would_cross_it_with_the_numbers() {
    let node = start_node!();
    let root = node.files().checkpoints();
    let pod = run_three_container_pod(&node, &PodOptions::new(&node.unique("reserve"), HANDLER))
        .expect("the pod runs");
    let st = nix::sys::statvfs::statvfs(&root).expect("statvfs");
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let reserve = free + (1 << 30);
    node.set_podsnap_config(&format!("[dump]\nreserve_bytes = {reserve}\n"))
        .expect("config");
    let before = names_in(&root);
    let err = dump(&node, &pod, Some(root.join("too-big")))
        .map(|o| o.summary.dir)
        .expect_err("a dump into the reserve");
    let err = format!("{err:#}");
    assert!(
        err.contains("not enough space")
            && err.contains(&format!("reserve_bytes = {reserve}"))
            && err.contains("MiB free"),
        "{err}"
    );
    assert_eq!(names_in(&root), before, "nothing written");
    let count = |pod: &KubePod| -> u64 {
        ask(&pod.ip, APP_PORT, "count")
            .expect("count")
            .parse()
            .expect("a number")
    };
    let first = count(&pod.pod);
    podsnap_tests::kubelet::wait_count_above(&pod.pod.ip, APP_PORT, first, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the pod runs on: {e:#}"));

    node.set_podsnap_config("").expect("no reserve");
    dump(&node, &pod, Some(root.join("fits"))).expect("a dump without the reserve");
    assert_eq!(valid_in(&node), ["fits"]);
}
