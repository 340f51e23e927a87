//! One container checkpointed and restored through containerd, the three ways a client reaches
//! the shim's task API (see DESIGN.md, "How stock ctr reaches the shim"):
//!
//! - containerd's API with runc `CheckpointOptions{image_path}`: a plain directory; restored by
//!   Tasks.Create with runc `Options{criu_image_path}` (the Go client's `WithRestoreImagePath`),
//!   which containerd hands to the shim as the task's checkpoint path;
//! - `ctr task checkpoint` and `ctr container checkpoint --task --rw --image` / `ctr container
//!   restore --live --rw`: containerd's content store;
//! - CRI CheckpointContainer: containerd's KEP-2008 archive around the task checkpoint.
//!
//! Every container joins a network namespace by path (`ctr run --with-ns network:PATH`, with
//! loopback up), the way a Kubernetes pod's containers do: runc always dumps and restores a
//! container's network namespace empty (`--empty-ns network`, "runc doesn't manage network
//! devices"), so a container with a private namespace comes back with loopback down, under
//! containerd's Go shim as under ours. A namespace given by path is external to CRIU and is
//! rejoined on restore.
//!
//! After a restore the workload's in-memory counter goes on from where it was, the file it held
//! open is open at the same descriptor, its listener accepts, rootfs changes are back (`--rw`),
//! and with `open_tcp` its established loopback connections still carry data. A dump CRIU
//! refuses leaves the container running and thawed and removes the directory it made; a restore
//! from a missing or damaged directory leaves no task, runc container, mount or shim behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podsnap_tests::containerd_api::{CheckpointOptions, ContainerdApi};
use podsnap_tests::ctr::{Ctr, DEFAULT_NAMESPACE as NS};
use podsnap_tests::host::Netns;
use podsnap_tests::kubelet::{self, ContainerSpec, PodOptions};
use podsnap_tests::node::Node;
use podsnap_tests::{handler, host, runtime_type, start_node, WORKLOAD_IMAGE};

/// The port every test server listens on (each container has its own network namespace).
const PORT: &str = "7070";

/// How a test container is made: extra `ctr run`/`ctr container create` flags and the serve
/// flags after `--name N --port P`.
#[derive(Debug, Clone, Default)]
struct Server {
    ctr_flags: Vec<String>,
    serve_flags: Vec<String>,
}

impl Server {
    fn new(serve_flags: &[&str]) -> Self {
        Self {
            ctr_flags: Vec::new(),
            serve_flags: serve_flags.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Joins the network namespace at `netns`.
    fn with_netns(mut self, netns: &Netns) -> Self {
        self.ctr_flags.push("--with-ns".to_owned());
        self.ctr_flags.push(format!("network:{}", netns.path.display()));
        self
    }

    /// Bind-mounts host directory `src` at `dst`.
    fn with_bind(mut self, src: &Path, dst: &str) -> Self {
        self.ctr_flags.push("--mount".to_owned());
        self.ctr_flags.push(format!(
            "type=bind,src={},dst={dst},options=rbind:rw",
            src.display()
        ));
        self
    }

    /// `ctr <verb...> --runtime R <flags> IMAGE id podsnap-workload serve ...`.
    fn args(&self, verb: &[&str], id: &str) -> Vec<String> {
        let mut args: Vec<String> = verb.iter().map(|s| (*s).to_owned()).collect();
        args.extend(["--runtime".to_owned(), runtime_type(&handler()).to_owned()]);
        args.extend(self.ctr_flags.iter().cloned());
        args.extend(
            [
                WORKLOAD_IMAGE,
                id,
                "podsnap-workload",
                "serve",
                "--name",
                id,
                "--port",
                PORT,
            ]
            .map(str::to_owned),
        );
        args.extend(self.serve_flags.iter().cloned());
        args
    }

    /// `ctr run -d`, then waits until it answers.
    fn run(&self, ctr: &Ctr, id: &str) {
        let args = self.args(&["run", "-d"], id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ctr.run(NS, &args).unwrap_or_else(|e| panic!("ctr run {id}: {e}"));
        wait_status(ctr, id, "RUNNING");
        wait_answering(ctr, id);
    }

    /// `ctr container create`: a container with no task, to restore into.
    fn create(&self, ctr: &Ctr, id: &str) {
        let args = self.args(&["container", "create"], id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ctr.run(NS, &args)
            .unwrap_or_else(|e| panic!("ctr container create {id}: {e}"));
    }
}

/// Waits until `ctr task ls` shows `id` in `status`.
fn wait_status(ctr: &Ctr, id: &str, status: &str) {
    ctr.wait_task_status(NS, id, status, Duration::from_secs(30));
}

/// Sends `command` to the container's server from inside it (`ctr task exec` of the workload's
/// client on 127.0.0.1): the reply line, or the error.
fn try_ask(ctr: &Ctr, id: &str, command: &str) -> Result<String, String> {
    ctr.ask_workload(NS, id, PORT.parse().expect("port"), command)
}

fn ask(ctr: &Ctr, id: &str, command: &str) -> String {
    try_ask(ctr, id, command).unwrap_or_else(|e| panic!("{command} to {id}: {e}"))
}

fn wait_answering(ctr: &Ctr, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match try_ask(ctr, id, "ping") {
            Ok(reply) if reply.starts_with("pong") => return,
            other => assert!(Instant::now() < deadline, "{id} does not answer ping: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn count(ctr: &Ctr, id: &str) -> u64 {
    let reply = ask(ctr, id, "count");
    reply
        .parse()
        .unwrap_or_else(|e| panic!("count of {id}: {reply:?}: {e}"))
}

/// Waits until the counter of `id` passes `at_least`.
fn wait_count(ctr: &Ctr, id: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = count(ctr, id);
        if now >= at_least {
            return now;
        }
        assert!(Instant::now() < deadline, "{id} counts {now}, never {at_least}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `held` reply as fields: fd, path, pos, flags.
fn held(ctr: &Ctr, id: &str) -> BTreeMap<String, String> {
    let reply = ask(ctr, id, "held");
    let words: Vec<&str> = reply.split(' ').collect();
    assert!(words.len() == 8 && words[0] == "fd", "held of {id}: {reply:?}");
    words
        .chunks(2)
        .map(|kv| (kv[0].to_owned(), kv[1].to_owned()))
        .collect()
}

/// The task's init pid (`ctr task ls`).
fn task_pid(ctr: &Ctr, id: &str) -> i32 {
    let listing = ctr.run(NS, &["task", "ls"]).expect("ctr task ls");
    listing
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.first() == Some(&id)).then(|| fields.get(1)?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no task {id} in {listing}"))
}

/// The v1 freezer state (`THAWED`, `FROZEN`) of the cgroup process `pid` is in.
fn freezer_state(pid: i32) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("/proc/pid/cgroup");
    let path = cgroups
        .lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "freezer")
                .then(|| path.to_owned())
        })
        .expect("a v1 freezer cgroup");
    let file = format!("/sys/fs/cgroup/freezer{path}/freezer.state");
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .trim()
        .to_owned()
}

/// Checks `dir` holds CRIU images of a dump and podsnap's record of its options.
fn assert_images(dir: &Path) -> serde_json::Value {
    assert!(
        dir.join("inventory.img").is_file(),
        "{} has no inventory.img",
        dir.display()
    );
    let names: Vec<String> = std::fs::read_dir(dir)
        .expect("image dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("pages-") && n.ends_with(".img")),
        "no pages-*.img in {}: {names:?}",
        dir.display()
    );
    let options = std::fs::read(dir.join("podsnap-criu.json")).expect("podsnap-criu.json");
    serde_json::from_slice(&options).expect("podsnap-criu.json is JSON")
}

/// Kills, deletes and removes a container.
fn remove(ctr: &Ctr, id: &str) {
    if ctr.task_status(NS, id).expect("ctr task ls").is_some() {
        let _ = ctr.run(NS, &["task", "kill", "-s", "SIGKILL", id]);
        wait_status(ctr, id, "STOPPED");
        ctr.run(NS, &["task", "delete", id])
            .unwrap_or_else(|e| panic!("ctr task delete {id}: {e}"));
    }
    ctr.run(NS, &["container", "rm", id])
        .unwrap_or_else(|e| panic!("ctr container rm {id}: {e}"));
}

/// What a container of the default namespace may leave on the host: runc state named after
/// it, mounts whose path names it (its rootfs, CRIU's cgroup yard in its bundle), its bundle.
fn leftovers(node: &Node, id: &str) -> Vec<String> {
    let mut found: Vec<String> = host::paths_named_after(&host::RUNC_ROOT_PARENTS, &[id])
        .into_iter()
        .map(|p| format!("runc state {}", p.display()))
        .collect();
    let mounts = host::mount_points().expect("this process's mount table");
    found.extend(
        mounts
            .iter()
            .map(|m| m.to_string_lossy())
            .filter(|point| point.contains(id))
            .map(|point| format!("mount {point}")),
    );
    let bundles = node.dir().join("state/io.containerd.runtime.v2.task").join(NS);
    for name in [id.to_owned(), format!(".{id}")] {
        if bundles.join(&name).exists() {
            found.push(format!("bundle {}", bundles.join(&name).display()));
        }
    }
    found
}

fn api(node: &Node) -> ContainerdApi {
    ContainerdApi::connect(&node.address(), NS).expect("containerd API")
}

/// A directory in the node (under its checkpoint root) for image directories and volumes.
fn node_dir(node: &Node, name: &str) -> PathBuf {
    node.dir().join("checkpoints").join(name)
}

#[test]
fn directory_checkpoint_through_the_api_keeps_state_files_and_connections() {
    let mut node = start_node!();
    let ctr = node.ctr().clone();
    let api = api(&node);
    let volume = node_dir(&node, "volume");
    std::fs::create_dir_all(&volume).expect("volume dir");
    let server =
        Server::new(&["--hold-file", "/vol/held.log", "--loopback-pairs", "2"]).with_bind(&volume, "/vol");
    let (first_netns, second_netns) = (Netns::new(&node, "tcp-a"), Netns::new(&node, "tcp-b"));
    let original = node.unique("tcp");
    server.clone().with_netns(&first_netns).run(&ctr, &original);
    let first_check = ask(&ctr, &original, "loop-check");
    assert!(
        first_check.starts_with("loop ok pairs=2 checks=1 "),
        "{first_check}"
    );
    let ports = first_check.rsplit(' ').next().expect("ports").to_owned();

    // Without open_tcp CRIU refuses the established connections: the container goes on as if
    // nothing happened, and the directory the shim made is gone.
    let refused = node_dir(&node, "refused");
    let error = api
        .checkpoint(
            &original,
            &CheckpointOptions {
                image_path: refused.to_string_lossy().into_owned(),
                ..Default::default()
            },
        )
        .expect_err("CRIU cannot dump established TCP without open_tcp");
    let message = error.to_string();
    assert!(
        message.contains(&original),
        "the error names the container: {message}"
    );
    // CRIU's cause ("Connected TCP socket, consider using --tcp-established option"), not only
    // its closing "Dumping FAILED".
    assert!(
        message.contains("--- CRIU log") && message.contains("tcp-established"),
        "the error quotes the cause from CRIU's log: {message}"
    );
    assert!(!refused.exists(), "the failed dump left {}", refused.display());
    let pid = task_pid(&ctr, &original);
    assert_eq!(freezer_state(pid), "THAWED", "the failed dump left it frozen");
    assert_eq!(
        ctr.task_status(NS, &original).expect("ls").as_deref(),
        Some("RUNNING")
    );
    let after_failure = count(&ctr, &original);
    wait_count(&ctr, &original, after_failure + 3);
    assert!(ask(&ctr, &original, "loop-check").starts_with("loop ok pairs=2 checks=2 "));

    // With open_tcp: a plain directory, and the container keeps running.
    let before_held = held(&ctr, &original);
    let before = count(&ctr, &original);
    let images = node_dir(&node, "images");
    api.checkpoint(
        &original,
        &CheckpointOptions {
            image_path: images.to_string_lossy().into_owned(),
            open_tcp: true,
            ..Default::default()
        },
    )
    .expect("checkpoint with open_tcp into a directory");
    let options = assert_images(&images);
    assert_eq!(options["tcp_established"], true, "{options}");
    assert_eq!(
        ctr.task_status(NS, &original).expect("ls").as_deref(),
        Some("RUNNING")
    );
    assert_eq!(freezer_state(task_pid(&ctr, &original)), "THAWED");
    wait_count(&ctr, &original, before + 3);
    remove(&ctr, &original);

    // Restore into a new container through Tasks.Create with criu_image_path.
    let restored = node.unique("tcp-restored");
    server.with_netns(&second_netns).create(&ctr, &restored);
    api.create_restored_task(&restored, &images)
        .expect("Tasks.Create from the image directory");
    assert_eq!(
        ctr.task_status(NS, &restored).expect("ls").as_deref(),
        Some("CREATED")
    );
    api.start(&restored).expect("Tasks.Start restores");
    wait_status(&ctr, &restored, "RUNNING");

    let resumed = count(&ctr, &restored);
    assert!(
        resumed >= before,
        "the counter went on from {before}, not from zero: {resumed}"
    );
    wait_count(&ctr, &restored, resumed + 3);
    // The established connections were restored: the checks made before the dump count on.
    let check = ask(&ctr, &restored, "loop-check");
    assert_eq!(
        check,
        format!("loop ok pairs=2 checks=3 {ports}"),
        "after restore"
    );
    // The O_APPEND file is open at the same descriptor and still being written.
    let after_held = held(&ctr, &restored);
    for key in ["fd", "path", "flags"] {
        assert_eq!(after_held[key], before_held[key], "{key} of the held file");
    }
    let pos = |m: &BTreeMap<String, String>| m["pos"].parse::<u64>().expect("pos");
    assert!(
        pos(&after_held) >= pos(&before_held),
        "{after_held:?} vs {before_held:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pos(&held(&ctr, &restored)) <= pos(&after_held) {
        assert!(Instant::now() < deadline, "the restored process appends");
        std::thread::sleep(Duration::from_millis(50));
    }

    remove(&ctr, &restored);
    let left = leftovers(&node, &restored);
    assert!(left.is_empty(), "left behind: {left:?}");
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

#[test]
fn paused_task_checkpoints_and_stays_paused() {
    let mut node = start_node!();
    let ctr = node.ctr().clone();
    let api = api(&node);
    let server = Server::new(&[]);
    let (first_netns, second_netns) = (Netns::new(&node, "paused-a"), Netns::new(&node, "paused-b"));
    let id = node.unique("paused");
    server.clone().with_netns(&first_netns).run(&ctr, &id);
    let before = wait_count(&ctr, &id, 10);
    ctr.run(NS, &["task", "pause", &id]).expect("ctr task pause");
    wait_status(&ctr, &id, "PAUSED");

    let images = node_dir(&node, "images");
    api.checkpoint(
        &id,
        &CheckpointOptions {
            image_path: images.to_string_lossy().into_owned(),
            ..Default::default()
        },
    )
    .expect("checkpoint of a paused task");
    assert_images(&images);
    assert_eq!(ctr.task_status(NS, &id).expect("ls").as_deref(), Some("PAUSED"));
    assert_eq!(freezer_state(task_pid(&ctr, &id)), "FROZEN");

    // The content-store form on the paused task too.
    let image = ctr
        .run(NS, &["task", "checkpoint", &id])
        .expect("ctr task checkpoint of a paused task");
    assert!(!image.trim().is_empty(), "ctr prints the checkpoint image");
    assert_eq!(ctr.task_status(NS, &id).expect("ls").as_deref(), Some("PAUSED"));

    ctr.run(NS, &["task", "resume", &id]).expect("ctr task resume");
    wait_status(&ctr, &id, "RUNNING");
    let resumed = count(&ctr, &id);
    assert!(resumed >= before, "{resumed} < {before}");
    remove(&ctr, &id);

    let restored = node.unique("paused-restored");
    server.with_netns(&second_netns).create(&ctr, &restored);
    api.create_restored_task(&restored, &images)
        .expect("Tasks.Create");
    api.start(&restored).expect("Tasks.Start");
    wait_status(&ctr, &restored, "RUNNING");
    let after = count(&ctr, &restored);
    assert!(after >= before, "restored at {after}, paused at {before}");
    wait_count(&ctr, &restored, after + 3);
    remove(&ctr, &restored);
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// The digest of the first manifest of `media_type` in image `name`'s index.
fn index_manifest(ctr: &Ctr, name: &str, media_type: &str) -> Option<String> {
    let listing = ctr.run(NS, &["images", "ls"]).expect("ctr images ls");
    let digest = listing.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.first() == Some(&name)).then(|| {
            fields
                .iter()
                .find(|f| f.starts_with("sha256:"))
                .map(|f| (*f).to_owned())
        })?
    })?;
    let index = ctr
        .run(NS, &["content", "get", &digest])
        .expect("ctr content get index");
    let index: serde_json::Value = serde_json::from_str(&index).expect("index JSON");
    index["manifests"]
        .as_array()?
        .iter()
        .find(|m| m["mediaType"] == media_type)
        .and_then(|m| m["digest"].as_str().map(str::to_owned))
}

/// The entry names of a tar blob of the content store.
fn blob_entries(ctr: &Ctr, digest: &str) -> Vec<String> {
    let output = ctr
        .command(NS)
        .args(["content", "get", digest])
        .output()
        .expect("ctr content get");
    assert!(output.status.success(), "ctr content get {digest}");
    tar_entries(&output.stdout[..])
}

fn tar_entries(reader: impl std::io::Read) -> Vec<String> {
    let mut archive = tar::Archive::new(reader);
    archive
        .entries()
        .expect("a tar archive")
        .flatten()
        .filter_map(|e| {
            e.path()
                .ok()
                .map(|p| p.to_string_lossy().trim_start_matches("./").to_owned())
        })
        .collect()
}

/// containerd's media type of a CRIU checkpoint tar.
const CRIU_TAR: &str = "application/vnd.containerd.container.criu.checkpoint.criu.tar";

#[test]
fn ctr_checkpoint_and_restore_through_the_content_store() {
    let mut node = start_node!();
    let ctr = node.ctr().clone();
    // ctr container restore takes the spec from the checkpoint: the same namespace, which the
    // original leaves before the restore.
    let netns = Netns::new(&node, "store");
    let server = Server::new(&["--hold-file", "/var/held.log"]).with_netns(&netns);
    let id = node.unique("store");
    server.run(&ctr, &id);
    wait_count(&ctr, &id, 5);

    // ctr task checkpoint: a checkpoint image in the content store.
    let first_checkpoint = std::time::SystemTime::now();
    let image = ctr
        .run(NS, &["task", "checkpoint", &id])
        .expect("ctr task checkpoint")
        .trim()
        .to_owned();
    assert!(!image.is_empty(), "ctr prints the checkpoint image's name");
    let criu = index_manifest(&ctr, &image, CRIU_TAR)
        .unwrap_or_else(|| panic!("image {image} has no CRIU checkpoint manifest"));
    let entries = blob_entries(&ctr, &criu);
    for wanted in ["inventory.img", "podsnap-criu.json"] {
        assert!(entries.iter().any(|e| e == wanted), "{wanted} not in {entries:?}");
    }
    assert!(entries.iter().any(|e| e.starts_with("pages-")), "{entries:?}");
    assert_eq!(ctr.task_status(NS, &id).expect("ls").as_deref(), Some("RUNNING"));

    // ctr task checkpoint --image-path: ctr 2.1 sends runc CheckpointOptions whatever the
    // runtime, so the directory reaches the shim.
    let images = node_dir(&node, "ctr-image-path");
    // ctr names checkpoint images by the second: do not reuse the previous one's name (wait
    // until the clock is a whole second past the previous checkpoint's end).
    let second = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    let taken = second(std::time::SystemTime::now()).max(second(first_checkpoint));
    while second(std::time::SystemTime::now()) <= taken {
        std::thread::sleep(Duration::from_millis(20));
    }
    ctr.run(
        NS,
        &[
            "task",
            "checkpoint",
            "--image-path",
            &images.to_string_lossy(),
            &id,
        ],
    )
    .expect("ctr task checkpoint --image-path");
    assert_images(&images);
    assert_eq!(ctr.task_status(NS, &id).expect("ls").as_deref(), Some("RUNNING"));

    // ctr container checkpoint --task --rw --image, then restore --live --rw.
    assert_eq!(ask(&ctr, &id, "touch /touched"), "ok");
    let before_held = held(&ctr, &id);
    let before = count(&ctr, &id);
    let reference = format!("localhost/podsnap/checkpoint-{id}:1");
    ctr.run(
        NS,
        &[
            "container",
            "checkpoint",
            "--task",
            "--rw",
            "--image",
            &id,
            &reference,
        ],
    )
    .expect("ctr container checkpoint --task --rw --image");
    assert_eq!(ctr.task_status(NS, &id).expect("ls").as_deref(), Some("RUNNING"));
    wait_count(&ctr, &id, before + 3);
    remove(&ctr, &id);

    let restored = node.unique("store-restored");
    ctr.run(
        NS,
        &["container", "restore", "--live", "--rw", &restored, &reference],
    )
    .expect("ctr container restore --live --rw");
    if ctr.task_status(NS, &restored).expect("ls").as_deref() == Some("CREATED") {
        ctr.run(NS, &["task", "start", "-d", &restored])
            .expect("ctr task start");
    }
    wait_status(&ctr, &restored, "RUNNING");
    let resumed = count(&ctr, &restored);
    assert!(resumed >= before, "the counter went on from {before}: {resumed}");
    wait_count(&ctr, &restored, resumed + 3);
    // An exec's output has once come back empty through ctr (exit 0, nothing printed; seen
    // once in ~500 runs, not reproduced): read again then, saying so. A file missing fails the
    // exec, one that came back empty stays empty on every read.
    let mut touched = String::new();
    for attempt in 0..3 {
        touched = ctr
            .run(
                NS,
                &[
                    "task",
                    "exec",
                    "--exec-id",
                    &format!("cat{attempt}"),
                    &restored,
                    "cat",
                    "/touched",
                ],
            )
            .expect("cat /touched in the restored container");
        if !touched.is_empty() {
            break;
        }
        eprintln!("podsnap-tests: ctr task exec cat /touched printed nothing (attempt {attempt})");
    }
    assert!(touched.starts_with(&id), "the rw layer came back: {touched:?}");
    let after_held = held(&ctr, &restored);
    for key in ["fd", "path", "flags"] {
        assert_eq!(after_held[key], before_held[key], "{key} of the held file");
    }
    remove(&ctr, &restored);
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

#[test]
fn cri_checkpoint_container_writes_the_archive_and_keeps_running() {
    let mut node = start_node!();
    let pod =
        kubelet::run_pod(&node, &PodOptions::new(&node.unique("ckpt"), &handler())).expect("RunPodSandbox");
    let spec = ContainerSpec::workload("app", &["serve", "--name", "app", "--port", PORT]);
    let app = kubelet::run_container(&node, &pod, &spec).expect("app container");
    let port: u16 = PORT.parse().expect("port");
    kubelet::wait_answering(&pod.ip, port, Duration::from_secs(30)).expect("app answers");
    let before: u64 = kubelet::ask(&pod.ip, port, "count")
        .expect("count")
        .parse()
        .expect("number");

    let archive = node_dir(&node, "app-checkpoint.tar");
    ContainerdApi::connect(&node.address(), podsnap_tests::ctr::CRI_NAMESPACE)
        .expect("API")
        .cri_checkpoint(&node.endpoint(), &app, &archive)
        .expect("CRI CheckpointContainer");
    let entries = tar_entries(std::fs::File::open(&archive).expect("the archive exists"));
    for wanted in ["checkpoint/inventory.img", "config.dump", "spec.dump"] {
        assert!(entries.iter().any(|e| e == wanted), "{wanted} not in {entries:?}");
    }
    assert!(
        entries.iter().any(|e| e.starts_with("checkpoint/pages-")),
        "{entries:?}"
    );
    let status = node.cri().container(&app).expect("status");
    assert_eq!(status.state, k8s_cri::v1::ContainerState::ContainerRunning as i32);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now: u64 = kubelet::ask(&pod.ip, port, "count")
            .expect("count")
            .parse()
            .expect("number");
        if now > before + 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the app stopped counting at {now}");
        std::thread::sleep(Duration::from_millis(100));
    }
    kubelet::remove_pod(&node, &pod).expect("remove the pod");
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}

/// How long a restore from a damaged checkpoint may take to fail.
const RESTORE_DEADLINE: Duration = Duration::from_secs(60);

/// Ends a restore that does not: kills the half-restored task (every process in the
/// container's freezer cgroup), so CRIU and runc report the failure and the shim cleans up as
/// after any failed restore.
fn kill_restore_of(id: &str) {
    let procs = format!("/sys/fs/cgroup/freezer/{NS}/{id}/cgroup.procs");
    let doomed: Vec<i32> = std::fs::read_to_string(&procs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(
        !doomed.is_empty(),
        "no process in {procs} to end the restore with"
    );
    for &pid in &doomed {
        host::signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
    host::wait_gone(&doomed, Duration::from_secs(10));
}

#[test]
fn restore_from_a_missing_or_damaged_directory_fails_cleanly() {
    let mut node = start_node!();
    let ctr = node.ctr().clone();
    let api = api(&node);
    let (first_netns, second_netns) = (Netns::new(&node, "source"), Netns::new(&node, "target"));
    let server = Server::new(&[]);
    let id = node.unique("source");
    server.clone().with_netns(&first_netns).run(&ctr, &id);
    wait_count(&ctr, &id, 3);
    let images = node_dir(&node, "images");
    api.checkpoint(
        &id,
        &CheckpointOptions {
            image_path: images.to_string_lossy().into_owned(),
            exit: true,
            ..Default::default()
        },
    )
    .expect("checkpoint --exit");
    wait_status(&ctr, &id, "STOPPED");
    remove(&ctr, &id);
    assert_images(&images);
    let shim = podsnap_tests::shim_binary(&handler());
    let shims_before = node.shim_pids(shim).len();

    let copy = |name: &str| {
        let dir = node_dir(&node, name);
        std::fs::create_dir_all(&dir).expect("copy dir");
        for entry in std::fs::read_dir(&images).expect("images").flatten() {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy an image");
        }
        dir
    };
    let pages_of = |dir: &Path| {
        std::fs::read_dir(dir)
            .expect("image dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("pages-"))
            })
            .expect("a pages image")
    };
    let no_inventory = copy("no-inventory");
    std::fs::remove_file(no_inventory.join("inventory.img")).expect("rm inventory.img");
    let no_pages = copy("no-pages");
    std::fs::remove_file(pages_of(&no_pages)).expect("rm pages-*.img");
    let truncated = copy("truncated");
    let pages = pages_of(&truncated);
    let size = std::fs::metadata(&pages).expect("pages size").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .and_then(|f| f.set_len(size / 2))
        .expect("truncate the pages");

    let mut problems = Vec::new();
    for (case, dir) in [
        ("missing", node_dir(&node, "does-not-exist")),
        ("no-inventory", no_inventory),
        ("no-pages", no_pages),
        ("truncated", truncated),
    ] {
        let target = node.unique(case);
        server.clone().with_netns(&second_netns).create(&ctr, &target);
        let outcome = api
            .create_restored_task(&target, &dir)
            .and_then(|_| api.start_within(&target, RESTORE_DEADLINE));
        let error = outcome.expect_err(&format!("restore from the {case} checkpoint"));
        let message = error.to_string();
        if message.contains("took longer than") {
            // The restore never ends: stop it ourselves so the rest can be checked.
            problems.push(format!("{case}: {message}"));
            kill_restore_of(&target);
        } else {
            let dir_text = dir.to_string_lossy().into_owned();
            assert!(
                message.contains(&target) || message.contains(&dir_text),
                "{case}: the error names the container or the checkpoint: {message}"
            );
        }
        // containerd keeps the task of a failed Start (stopped) for the client to delete.
        // (After a restore that hung, the shim takes a while to answer again.)
        let deadline = Instant::now() + Duration::from_secs(90);
        while let Some(task) = api.task(&target).expect("Tasks.Get") {
            if task.status == "STOPPED" || task.status == "CREATED" {
                ctr.run(NS, &["task", "delete", &target])
                    .unwrap_or_else(|e| panic!("{case}: ctr task delete: {e}"));
                break;
            }
            assert!(Instant::now() < deadline, "{case}: the task stays {task:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        ctr.run(NS, &["container", "rm", &target])
            .unwrap_or_else(|e| panic!("{case}: ctr container rm: {e}"));
        let left = leftovers(&node, &target);
        if !left.is_empty() {
            problems.push(format!("{case}: left behind: {left:?}"));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.shim_pids(shim).len() > shims_before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if node.shim_pids(shim).len() != shims_before {
            problems.push(format!("{case}: a shim stayed"));
        }
    }
    assert!(
        problems.is_empty(),
        "restores from missing or damaged checkpoints did not fail cleanly (a restore that \
         never returns: the shim has no deadline on runc restore, and CRIU 4.2.1's restorer \
         spins on a short pages image):\n{}",
        problems.join("\n")
    );
    let problems = node.teardown();
    assert!(problems.is_empty(), "teardown: {problems:?}");
}
