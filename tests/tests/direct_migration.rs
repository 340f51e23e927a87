//! Direct migration between two nodes (issue 23): `podsnap receive --listen` on node B,
//! `podsnap migrate --to-node` on node A (two private containerds, their own roots and pod
//! subnets, real runc, CRIU and CNI), over mutual TLS with the keys of `[migration]`:
//!
//! - a three-container pod moves live from A to B (and again with `--copy`, not live): B
//!   restores it from a verified checkpoint in its root (0700 directories, 0600 files), its
//!   counters go on, the volume holds what was written, init does not run again, the app reaches
//!   its sidecar on 127.0.0.1; the pod on A is stopped at the snapshot, its network locked;
//! - a pod of two containers of 256 MiB moves live: far less than its memory is sent before the
//!   switch, the memory on B is A's to the byte (checksums), A's containers are stopped once B
//!   has every page;
//! - the source lost after the switch, memory still missing on B (A's pages held back, then
//!   `migrate` SIGKILLed): B kills its containers and says why, A's pod stays frozen and locked;
//! - a node whose key B does not list is refused before anything is sent: both sides name its
//!   key id, the pod on A runs on untouched (its counters advance), nothing is dumped on A and
//!   nothing appears on B;
//! - `migrate` SIGKILLed mid-transfer: A's shim resumes the pod by itself (thawed, unlocked,
//!   its counters going on); B creates no pod;
//! - a lazy dump out of room (ENOSPC while CRIU writes): `migrate` says so, A's pod runs on,
//!   no CRIU of it is left, nothing is left in the root;
//! - B killed mid-transfer (held after the first file, then SIGKILL): A resumes the pod, which
//!   runs on as it was; B created no pod, and its next `podsnap receive` removes what the
//!   killed one left in the root;
//! - kubelet's path: `migrate --listen` on A prints the pod's `podsnap://` reference; a pod
//!   annotated with a wrong ticket is refused at RunPodSandbox, one annotated with the
//!   reference claims the pod (its containers created and started through CRI, restored
//!   lazily), checksums match;
//! - another pod on B restoring the received checkpoint gets none of its memory: `receive`
//!   carries the page streams for the pod it created only, and the other pod's container is
//!   killed, not run;
//! - `podsnap drain --parallel 2` moves the three pods of A to B, two at a time, live.

mod pod_checkpoint_support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use pod_checkpoint_support::*;
use podsnap_tests::command::output_text as text;
use podsnap_tests::kubelet::{run_three_container_pod, wait_count_above, PodOptions, APP_PORT, SIDECAR_PORT};
use podsnap_tests::node::{Node, NodeOptions};
use podsnap_tests::HANDLER;
use sha2::{Digest, Sha256};

/// Keys and node configurations, in a directory of the test's own.
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// An ed25519 key pair made with openssl (the private key 0600): (private, public).
    fn pair(&self, name: &str) -> (PathBuf, PathBuf) {
        let (private, public) = podsnap_tests::registry::key_pair(self.dir.path(), name);
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        (private, public)
    }

    /// The configurations of nodes A and B, each listing the other's key; and B's public key.
    fn for_a_and_b(&self) -> (PathBuf, PathBuf, PathBuf) {
        let (a_key, a_pub) = self.pair("node-a");
        let (b_key, b_pub) = self.pair("node-b");
        let config_a = self.config("a", &a_key, &[&b_pub]);
        let config_b = self.config("b", &b_key, &[&a_pub]);
        (config_a, config_b, b_pub)
    }

    /// A node configuration with `[migration] key` and `peers`.
    fn config(&self, name: &str, key: &Path, peers: &[&Path]) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        let peers: Vec<String> = peers.iter().map(|p| format!("\"{}\"", p.display())).collect();
        std::fs::write(
            &path,
            format!(
                "[migration]\nkey = \"{}\"\npeers = [{}]\npeer_timeout_seconds = 10\n",
                key.display(),
                peers.join(", ")
            ),
        )
        .expect("config");
        path
    }
}

/// The key id podsnap names: hex SHA-256 of the raw 32-byte key (the end of the public key's
/// DER), computed here with openssl.
fn key_id(public: &Path) -> String {
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-in"])
        .arg(public)
        .args(["-outform", "DER"])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl pkey: {}", text(&out));
    let raw = &out.stdout[out.stdout.len() - 32..];
    hex::encode(Sha256::digest(raw))
}

/// `podsnap ARGS` on `node` with `config`.
fn podsnap(node: &Node, config: &Path, args: &[&str]) -> std::process::Output {
    let docker = tempfile::tempdir().expect("docker config dir");
    podsnap_tests::registry::podsnap_on(&podsnap_binary(), config, docker.path(), node, args)
}

/// A running `podsnap receive --listen 127.0.0.1:0` on a node.
struct Receiver {
    child: Child,
    addr: String,
    stdout: Arc<Mutex<String>>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start(node: &Node, config: &Path, holds: Option<&Path>, once: bool) -> Receiver {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr = dir.path().join("stderr");
        let kubelet = node.files().kubelet();
        let mut command = Command::new(podsnap_binary());
        command
            .args(["receive", "--listen", "127.0.0.1:0", "--pods-dir"])
            .arg(kubelet.join("pods"))
            .arg("--logs-dir")
            .arg(kubelet.join("logs/pods"))
            .env("PODSNAP_CONFIG", config)
            .env("CONTAINER_RUNTIME_ENDPOINT", node.endpoint())
            .env("CONTAINERD_ADDRESS", node.address())
            .env("PODSNAP_CHECKPOINT_ROOT", node.files().checkpoints())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        if once {
            command.arg("--once");
        }
        if let Some(holds) = holds {
            command.env(podsnap_tests::paths::FAILPOINT_HOLD_ENV, holds);
        }
        let mut child = command.spawn().expect("podsnap receive");
        let out = child.stdout.take().expect("stdout");
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening") {
                    let addr = addr.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = tx.send(addr);
                }
                let mut text = shared.lock().expect("lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "podsnap receive did not listen: {}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        };
        Receiver {
            child,
            addr,
            stdout,
            stderr,
            _dir: dir,
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().expect("lock").clone()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (bounded) for the receiver to exit; its exit status.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "podsnap receive did not exit: {}\n{}",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of the output line starting with `key`.
    fn field(&self, key: &str) -> String {
        let out = self.stdout();
        out.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {key:?} in {out}\n{}", self.stderr()))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn workload() -> NodeOptions {
    NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")))
}

/// Every directory under `dir` is 0700 and every file 0600.
fn assert_private(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mode = std::fs::metadata(&d).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let entry = entry.expect("entry");
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                let mode = meta.permissions().mode() & 0o7777;
                assert!(meta.is_file(), "{} is not a regular file", entry.path().display());
                assert_eq!(mode, 0o600, "{} is {mode:o}", entry.path().display());
            }
        }
    }
}

/// The pod's sidecar and app run (not paused: their counters advance) past `before`.
fn runs_on(ip: &str, before: Before, what: &str) {
    for (port, was) in [(SIDECAR_PORT, before.sidecar), (APP_PORT, before.app)] {
        wait_count_above(ip, port, was, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{what}: the counter on port {port} does not advance: {e:#}"));
    }
}

#[test]
fn a_pod_moves_to_another_node_over_the_migration_channel() {
    moves(false);
}

/// `--copy`: not live, the memory sent before the switch (nodes without userfaultfd).
#[test]
fn a_pod_moves_with_its_memory_copied_first() {
    moves(true);
}

fn moves(copy: bool) {
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let keys = Keys::new();
    let (config_a, config_b, _) = keys.for_a_and_b();
    let name = node_a.unique("moved");
    let pod = run_three_container_pod(&node_a, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let before = mark_and_count(&pod);
    let sandboxes_b = sandbox_ids(&node_b);

    let mut receiver = Receiver::start(&node_b, &config_b, None, true);
    let mut args = vec![
        "migrate",
        "--namespace",
        "default",
        "--pod",
        &name,
        "--to-node",
        &receiver.addr,
    ];
    if copy {
        args.push("--copy");
    }
    let out = podsnap(&node_a, &config_a, &args);
    assert!(
        out.status.success(),
        "migrate --to-node: {}\nreceiver:\n{}\n{}",
        text(&out),
        receiver.stdout(),
        receiver.stderr()
    );
    let status = receiver.wait(Duration::from_secs(60));
    assert!(
        status.success(),
        "receive: {status:?}\n{}\n{}",
        receiver.stdout(),
        receiver.stderr()
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("podsnap migrate --to-node:\n{stdout}");
    assert!(
        stdout.contains(&format!("moved        default/{name} to ")),
        "{stdout}"
    );
    assert!(stdout.contains("containers   sidecar, app"), "{stdout}");
    assert!(stdout.contains("phases       dump "), "{stdout}");
    assert_eq!(
        stdout.contains("memory       "),
        !copy,
        "only a live move serves memory after the dump: {stdout}"
    );

    // On B: one new pod, restored from a checkpoint received into B's root.
    let id = receiver.field("id ");
    let ip = receiver.field("ip ");
    let uid = receiver
        .field("pod ")
        .rsplit_once("(uid ")
        .and_then(|(_, u)| u.strip_suffix(')'))
        .expect("the new pod's uid")
        .to_owned();
    let netns = node_b.cri().pod_netns(&id).ok().flatten();
    node_b.record_pod(&uid, netns.as_deref()).expect("record the pod");
    let mut after = sandbox_ids(&node_b);
    after.retain(|s| !sandboxes_b.contains(s));
    assert_eq!(after, std::slice::from_ref(&id), "one new pod on B");
    let received = PathBuf::from(receiver.field("received ").split(" from ").next().expect("a dir"));
    assert!(
        received.starts_with(node_b.files().checkpoints()),
        "{} is in B's checkpoint root",
        received.display()
    );
    assert_private(&received);
    verified(&node_b, &received);

    // A stopped its pod at the snapshot, its network locked since the dump: nothing of it
    // (a reset, a FIN, an acknowledgement of data the copy on B never saw) reaches a peer.
    for (cname, cid) in [("sidecar", &pod.sidecar_id), ("app", &pod.app_id)] {
        node_a
            .cri()
            .wait_container_state(cid, cri::ContainerState::ContainerExited, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{cname} on node A stopped after the move: {e:#}"));
    }
    let netns_a = pod.pod.netns.as_deref().expect("the pod's netns on A");
    assert!(
        podsnap_tests::host::network_locked(netns_a),
        "A's pod network stays locked after the move"
    );
    remove_original(&node_a, &pod);

    // B's pod goes on from where A's was.
    let app_id = container_named(&node_b, &id, "app").id;
    let volume = pods_dir(&node_b)
        .join(&uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(podsnap_tests::kubelet::DATA_VOLUME);
    check_restored(&node_b, &ip, &pod.pod.ip, &volume, &app_id, before);
}

/// Two containers of 256 MiB of memory each, on ports 8081 and 8082.
const BALLAST: [(&str, u16); 2] = [("one", 8081), ("two", 8082)];

/// Container `name` of [`BALLAST`], serving on `port`.
fn ballast_spec(name: &str, port: u16) -> podsnap_tests::kubelet::ContainerSpec {
    podsnap_tests::kubelet::ContainerSpec::ballast(name, port, "256", "mixed")
}

/// `migrate` and `receive` both succeeded.
fn both_succeeded(out: &std::process::Output, receiver: &mut Receiver) {
    assert!(
        out.status.success(),
        "migrate --to-node: {}\nreceiver:\n{}\n{}",
        text(out),
        receiver.stdout(),
        receiver.stderr()
    );
    assert!(
        receiver.wait(Duration::from_secs(60)).success(),
        "{}",
        receiver.stderr()
    );
}

/// The memory of every [`BALLAST`] container of the pod at `ip` is `sums`, and the containers
/// `ids` on the source stopped.
fn memory_moved(ip: &str, sums: &[String], source: &Node, ids: &[String]) {
    for ((cname, port), sum) in BALLAST.iter().zip(sums) {
        let after = podsnap_tests::kubelet::ask(ip, *port, "ballast-sum").expect("ballast-sum on B");
        assert_eq!(&after, sum, "the memory of {cname} on B is the source's");
    }
    for id in ids {
        source
            .cri()
            .wait_container_state(id, cri::ContainerState::ContainerExited, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{id} on A stopped after the move: {e:#}"));
    }
}

/// A pod of [`BALLAST`] on `node`, every container answering; its ballast checksums.
fn ballast_pod(node: &Node, name: &str) -> (podsnap_tests::kubelet::KubePod, Vec<String>, Vec<String>) {
    use podsnap_tests::kubelet;
    let pod = kubelet::run_pod(node, &PodOptions::new(name, HANDLER)).expect("RunPodSandbox");
    let ids: Vec<String> = BALLAST
        .iter()
        .map(|(cname, port)| {
            kubelet::run_container(node, &pod, &ballast_spec(cname, *port)).expect("a container")
        })
        .collect();
    let sums = BALLAST
        .iter()
        .map(|(_, port)| {
            kubelet::wait_answering(&pod.ip, *port, Duration::from_secs(120)).expect("answers");
            kubelet::ask(&pod.ip, *port, "ballast-sum").expect("ballast-sum")
        })
        .collect();
    (pod, ids, sums)
}

/// Live: the target runs the pod as soon as the checkpoint without its memory is restored; the
/// memory follows, and it is the source's to the byte (the ballast checksums); the source is
/// stopped at its snapshot once the target has every page.
#[test]
fn a_pod_moves_live_with_its_memory_following() {
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let keys = Keys::new();
    let (config_a, config_b, _) = keys.for_a_and_b();
    let name = node_a.unique("live");
    let (pod, ids, sums) = ballast_pod(&node_a, &name);
    let mut receiver = Receiver::start(&node_b, &config_b, None, true);
    let out = podsnap(
        &node_a,
        &config_a,
        &[
            "migrate",
            "--namespace",
            "default",
            "--pod",
            &name,
            "--to-node",
            &receiver.addr,
        ],
    );
    both_succeeded(&out, &mut receiver);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("podsnap migrate --to-node:\n{stdout}");
    // The checkpoint sent before the switch holds no memory: far less than the 512 MiB.
    let sent = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sent "))
        .expect("a sent line")
        .to_owned();
    assert!(sent.contains("KiB") || sent.contains(" MiB)"), "{sent}");
    assert!(!sent.contains("GiB"), "{sent}");
    let memory = stdout
        .lines()
        .find(|l| l.starts_with("memory "))
        .expect("a memory line")
        .to_owned();
    assert!(memory.contains("MiB served from here after the dump"), "{memory}");
    let ip = receiver.field("ip ");
    memory_moved(&ip, &sums, &node_a, &ids);
    let _ = podsnap_tests::kubelet::remove_pod(&node_a, &pod);
}

/// `podsnap migrate --to-node ADDR` of pod `name` on `node` with `config`, output piped.
fn spawn_migrate(node: &Node, config: &Path, name: &str, addr: &str, docker: &Path) -> Command {
    let mut command = Command::new(podsnap_binary());
    command
        .args([
            "migrate",
            "--namespace",
            "default",
            "--pod",
            name,
            "--to-node",
            addr,
        ])
        .env("PODSNAP_CONFIG", config)
        .env("DOCKER_CONFIG", docker)
        .env("CONTAINER_RUNTIME_ENDPOINT", node.endpoint())
        .env("CONTAINERD_ADDRESS", node.address())
        .env("PODSNAP_CHECKPOINT_ROOT", node.files().checkpoints())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Another pod on the target restoring the received checkpoint (kubelet's path, a name in the
/// root, while `receive` holds before its own restore: hold point `migration-restore`) gets
/// no memory: its shim names its pod on the page stream, `receive` closes the stream of a pod
/// it did not create, and that container is killed, not run. The migration's own pod then
/// gets every page: its checksums are A's.
#[test]
fn another_pod_restoring_the_received_checkpoint_gets_none_of_its_memory() {
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let keys = Keys::new();
    let (config_a, config_b, _) = keys.for_a_and_b();
    let name = node_a.unique("own");
    let (pod, ids, sums) = ballast_pod(&node_a, &name);
    let holds = tempfile::tempdir().expect("hold points");
    let armed = holds.path().join("migration-restore");
    std::fs::write(&armed, b"").expect("arm the hold point");
    let mut receiver = Receiver::start(&node_b, &config_b, Some(holds.path()), true);
    let docker = tempfile::tempdir().expect("docker config dir");
    let migrate = spawn_migrate(&node_a, &config_a, &name, &receiver.addr, docker.path())
        .spawn()
        .expect("podsnap migrate");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !holds.path().join("migration-restore.reached").exists() {
        assert!(
            Instant::now() < deadline,
            "receive never held before its restore:\n{}\n{}",
            receiver.stdout(),
            receiver.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let received = std::fs::read_dir(node_b.files().checkpoints())
        .expect("B's checkpoint root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("received-"))
        .expect("the received checkpoint in B's root");

    // The other pod: the same namespace (the restore policy lets it), the same container.
    use podsnap_tests::kubelet;
    let mut options = PodOptions::new(&node_b.unique("other"), HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), received.clone());
    let other = kubelet::run_pod(&node_b, &options).expect("RunPodSandbox of the other pod");
    let (cname, port) = BALLAST[0];
    let started = kubelet::run_container(&node_b, &other, &ballast_spec(cname, port));
    let refused = format!("refused the shim of pod sandbox {}", other.id);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !receiver.stderr().contains(&refused) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        receiver.stderr().contains(&refused),
        "receive did not refuse the other pod's shim (started: {started:?}):\n{}",
        receiver.stderr()
    );
    match &started {
        // Its restore fails: CRIU's, when its daemon ended first, or the shim's own check.
        Err(e) => assert!(
            format!("{e:#}").contains("restore of container"),
            "the other pod's container failed, but not its restore: {e:#}"
        ),
        Ok(id) => {
            // Started: then killed at once, never answering with the migrated memory.
            node_b
                .cri()
                .wait_container_state(id, cri::ContainerState::ContainerExited, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("the other pod's {cname} runs without its memory: {e:#}"));
        }
    }
    assert!(
        kubelet::ask(&other.ip, port, "ballast-sum").is_err(),
        "the other pod answers with the migrated pod's memory"
    );
    kubelet::remove_pod(&node_b, &other).expect("remove the other pod");

    // The migration goes on: its own pod gets every page.
    std::fs::remove_file(&armed).expect("release the hold point");
    let out = migrate.wait_with_output().expect("podsnap migrate");
    both_succeeded(&out, &mut receiver);
    let ip = receiver.field("ip ");
    memory_moved(&ip, &sums, &node_a, &ids);
    let _ = kubelet::remove_pod(&node_a, &pod);
}

/// Nodes A and B for kubelet's path: B's shim runs with B's node configuration (its
/// `[migration]` key and peers); A's configuration for `migrate`. The keys live as long as the
/// returned [`Keys`].
fn kubelet_pair() -> (Node, Node, Keys, PathBuf) {
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let keys = Keys::new();
    let (config_a, config_b, _) = keys.for_a_and_b();
    node_b
        .set_podsnap_config(&std::fs::read_to_string(&config_b).expect("B's configuration"))
        .expect("the node's configuration");
    (node_a, node_b, keys, config_a)
}

/// A running `podsnap migrate --listen 127.0.0.1:0` and the reference it printed.
struct Listening {
    child: Child,
    stdout: Arc<Mutex<String>>,
    reference: String,
}

impl Listening {
    fn start(node: &Node, config: &Path, name: &str, docker: &Path) -> Listening {
        let mut command = Command::new(podsnap_binary());
        command
            .args([
                "migrate",
                "--namespace",
                "default",
                "--pod",
                name,
                "--listen",
                "127.0.0.1:0",
                "--wait",
                "120",
            ])
            .env("PODSNAP_CONFIG", config)
            .env("DOCKER_CONFIG", docker)
            .env("CONTAINER_RUNTIME_ENDPOINT", node.endpoint())
            .env("CONTAINERD_ADDRESS", node.address())
            .env("PODSNAP_CHECKPOINT_ROOT", node.files().checkpoints())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("podsnap migrate --listen");
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (out, shared) = (child.stdout.take().expect("stdout"), stdout.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(reference) = line.strip_prefix("ticket") {
                        let _ = tx.send(reference.trim().to_owned());
                    }
                    let mut text = shared.lock().expect("lock");
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        let reference = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("migrate --listen prints the pod's reference");
        Listening {
            child,
            stdout,
            reference,
        }
    }

    /// Waits (at most `timeout`, then kills it) for `migrate` to exit: its status, stdout and
    /// stderr.
    fn wait(&mut self, timeout: Duration) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            use std::io::Read;
            let _ = err.read_to_string(&mut stderr);
        }
        let stdout = self.stdout.lock().expect("lock").clone();
        (status, stdout, stderr)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kubelet's path, given up before the switch: the pod claimed on B (A's pod frozen and dumped
/// lazily for it) is removed before kubelet starts any container. B's shim stops its receiver
/// with the pod, A's `migrate` fails, and A's pod runs on as it was; nothing is left of the
/// claim on B.
#[test]
fn a_claimed_pod_removed_before_its_containers_run_leaves_the_source_running() {
    use podsnap_tests::kubelet;
    let (node_a, node_b, _keys, config_a) = kubelet_pair();
    let name = node_a.unique("dropped");
    let pod = run_three_container_pod(&node_a, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let before = mark_and_count(&pod);
    let docker = tempfile::tempdir().expect("docker config dir");
    let mut migrate = Listening::start(&node_a, &config_a, &name, docker.path());
    let mut options = PodOptions::new(&name, HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), migrate.reference.clone());
    let claimed = kubelet::run_pod(&node_b, &options).expect("RunPodSandbox claims the pod");
    // A's pod is frozen for the move now; its network locked.
    let netns = pod.pod.netns.as_deref().expect("the pod's netns");
    assert!(
        podsnap_tests::host::network_locked(netns),
        "A's pod is held for the move"
    );
    let root_b = node_b.files().checkpoints();
    assert!(
        names_in(&root_b).iter().any(|n| n.starts_with("live-")),
        "the claimed checkpoint is in B's root"
    );
    kubelet::remove_pod(&node_b, &claimed).expect("remove the claimed pod");
    let (status, stdout, stderr) = migrate.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "migrate succeeded without its target: {stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("runs on this node as before"),
        "{stdout}\n{stderr}"
    );
    runs_on(&pod.pod.ip, before, "after the claimed pod was removed");
    for (cname, cid) in [("sidecar", &pod.sidecar_id), ("app", &pod.app_id)] {
        let freezer = podsnap_tests::host::freezer_state_of(cid);
        assert_eq!(freezer.as_deref(), Some("THAWED"), "{cname} on A is thawed");
    }
    assert!(
        !podsnap_tests::host::network_locked(netns),
        "A's pod network is unlocked"
    );
    let marker = std::fs::read_to_string(pod.volume.join("init.log")).expect("the init marker");
    assert_eq!(marker.lines().count(), 1, "init ran once: {marker:?}");
    assert!(sandbox_ids(&node_b).is_empty(), "no pod on B");
    let deadline = Instant::now() + Duration::from_secs(10);
    while names_in(&root_b).iter().any(|n| n.starts_with("live-")) {
        assert!(
            Instant::now() < deadline,
            "the claimed checkpoint stays in B's root: {:?}",
            names_in(&root_b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kubelet's path: `podsnap migrate --listen` on A prints the pod's `podsnap://` reference, and
/// waits; a pod annotated `podsnap.io/restore-from` with it is created on B the way kubelet
/// creates one (RunPodSandbox, then CreateContainer and StartContainer for each container). Its
/// shim claims the pod with B's `[migration]` key, each container is restored lazily, and the
/// memory follows: the checksums are A's, A's containers stop once B has every page. First a
/// pod naming a wrong ticket is refused at RunPodSandbox, and A's pod is untouched.
#[test]
fn a_pod_annotated_with_the_podsnap_reference_claims_the_pod_live() {
    use podsnap_tests::kubelet;
    let (node_a, node_b, _keys, config_a) = kubelet_pair();
    let name = node_a.unique("claimed");
    let (pod, ids, sums) = ballast_pod(&node_a, &name);
    let docker = tempfile::tempdir().expect("docker config dir");
    let mut migrate = Listening::start(&node_a, &config_a, &name, docker.path());
    let reference = migrate.reference.clone();
    assert!(reference.starts_with("podsnap://127.0.0.1:"), "{reference}");

    // A ticket that is not the pod's: refused at RunPodSandbox, no pod on B, A's pod runs on.
    let (addr, ticket) = reference.rsplit_once('/').expect("podsnap://HOST:PORT/TICKET");
    let wrong: String = ticket.chars().rev().collect();
    assert_ne!(wrong, ticket);
    let mut options = PodOptions::new(&node_b.unique("wrong"), HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), format!("{addr}/{wrong}"));
    let err = format!(
        "{:#}",
        kubelet::run_pod(&node_b, &options).expect_err("a wrong ticket is refused")
    );
    assert!(err.contains("no pod waits here with this ticket"), "{err}");
    assert!(sandbox_ids(&node_b).is_empty(), "no pod on B");
    for (cname, port) in BALLAST {
        kubelet::wait_answering(&pod.ip, port, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{cname} on A stopped after a wrong claim: {e:#}"));
    }

    // The pod's reference: claimed, restored container by container, its memory following.
    let mut options = PodOptions::new(&name, HANDLER);
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), reference.clone());
    let claimed = kubelet::run_pod(&node_b, &options).expect("RunPodSandbox claims the pod");
    for (cname, port) in BALLAST {
        kubelet::run_container(&node_b, &claimed, &ballast_spec(cname, port))
            .unwrap_or_else(|e| panic!("{cname} restored on B: {e:#}"));
    }
    let (status, said, stderr) = migrate.wait(Duration::from_secs(120));
    assert!(status.success(), "migrate --listen: {status}\n{said}\n{stderr}");
    eprintln!("podsnap migrate --listen:\n{said}");
    assert!(said.contains("MiB served from here after the dump"), "{said}");
    memory_moved(&claimed.ip, &sums, &node_a, &ids);
    let _ = kubelet::remove_pod(&node_b, &claimed);
    let _ = kubelet::remove_pod(&node_a, &pod);
}

/// Waits (at most 120 s) until hold point `point` in `holds` is reached while `migrate` runs;
/// panics with `what`, `migrate`'s output and the receiver's, if it exits or time runs out.
fn wait_held(holds: &Path, point: &str, mut migrate: Child, receiver: &Receiver, what: &str) -> Child {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !holds.join(format!("{point}.reached")).exists() {
        if Instant::now() > deadline || migrate.try_wait().expect("try_wait").is_some() {
            let _ = migrate.kill();
            let out = migrate.wait_with_output().expect("migrate output");
            panic!(
                "{what}: {}\nreceiver:\n{}\n{}",
                text(&out),
                receiver.stdout(),
                receiver.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    migrate
}

/// What vanishes on the source after the switch.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Vanishes {
    /// `podsnap migrate`, which carries the pages over the channel.
    Migrate,
    /// The pod's shim, which carries each container's pages from its CRIU to `migrate`.
    Shim,
}

/// A live migration whose source vanishes after the switch, with memory still missing on the
/// target: the source's pages are held back once the target committed (hold point
/// `migration-pages`), then `podsnap migrate` is SIGKILLed. The target kills its containers
/// (never runs them on zero-filled pages) and says why; the source's pod stays frozen with its
/// network locked (the target may have run it), until an operator resumes it.
#[test]
fn a_source_lost_after_the_switch_makes_the_target_kill_its_pod() {
    source_lost_after_the_switch(Vanishes::Migrate);
}

/// As above, but the source pod's shim is SIGKILLed instead (`migrate` lives on): the page
/// streams end at the source. The target kills its containers just the same, and the source's
/// pod runs nowhere: containerd, seeing its shim gone, has the tasks deleted, or they stay
/// frozen; none is running thawed.
#[test]
fn a_source_shim_killed_after_the_switch_makes_the_target_kill_its_pod() {
    source_lost_after_the_switch(Vanishes::Shim);
}

fn source_lost_after_the_switch(vanishes: Vanishes) {
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let keys = Keys::new();
    let (config_a, config_b, _) = keys.for_a_and_b();
    let name = node_a.unique("lost");
    let (pod, ids, _) = ballast_pod(&node_a, &name);
    let mut receiver = Receiver::start(&node_b, &config_b, None, true);
    let holds = tempfile::tempdir().expect("hold points");
    std::fs::write(holds.path().join("migration-pages"), b"").expect("arm the hold point");
    let docker = tempfile::tempdir().expect("docker config dir");
    let migrate = spawn_migrate(&node_a, &config_a, &name, &receiver.addr, docker.path())
        .env(podsnap_tests::paths::FAILPOINT_HOLD_ENV, holds.path())
        .spawn()
        .expect("podsnap migrate");
    let mut migrate = wait_held(
        holds.path(),
        "migration-pages",
        migrate,
        &receiver,
        "no memory was held back after the switch (did every page arrive before it?)",
    );
    let shims = node_a.shim_pids(podsnap_tests::PODSNAP_SHIM);
    match vanishes {
        Vanishes::Migrate => {
            migrate.kill().expect("SIGKILL podsnap migrate");
            let _ = migrate.wait();
        }
        Vanishes::Shim => {
            assert_eq!(shims.len(), 1, "one shim for the pod on A: {shims:?}");
            // SAFETY: kill(2) with a pid and a signal number.
            let killed = unsafe { libc::kill(shims[0], libc::SIGKILL) };
            assert_eq!(killed, 0, "SIGKILL the shim");
            // migrate carries on: what the dead shim had sent, then the streams' end.
            std::fs::remove_file(holds.path().join("migration-pages")).expect("let the pages go");
        }
    }
    let status = receiver.wait(Duration::from_secs(60));
    assert!(
        !status.success(),
        "the receiver reported success without the memory"
    );
    let said = format!("{}\n{}", receiver.stdout(), receiver.stderr());
    let why = match vanishes {
        // The channel broke: every stream is lost at once.
        Vanishes::Migrate => {
            said.contains("the source was lost after the switch")
                && said.contains("killed rather than run with missing memory")
        }
        // The streams ended at the source: each daemon ends short of its pages.
        Vanishes::Shim => {
            said.contains("ended before it had every page") && said.contains("the shim killed it")
        }
    };
    assert!(why, "{vanishes:?}: {said}");
    // B's containers were killed, not left running on zero-filled pages.
    let restored = sandbox_ids(&node_b);
    assert_eq!(restored.len(), 1, "the restored pod on B: {restored:?}");
    for (cname, _) in BALLAST {
        let c = container_named(&node_b, &restored[0], cname);
        node_b
            .cri()
            .wait_container_state(
                &c.id,
                cri::ContainerState::ContainerExited,
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("{cname} on B was not killed: {e:#}"));
    }
    if vanishes == Vanishes::Shim {
        // migrate, left with a channel and no pages to carry, fails and says so.
        let out = wait_output(migrate, Duration::from_secs(60));
        assert!(!out.status.success(), "migrate succeeded: {}", text(&out));
        // A's pod runs nowhere: each container is frozen, or gone once containerd has seen
        // its shim die (it has the tasks deleted); none runs thawed.
        for id in &ids {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let state = node_a.cri().container(id).map(|c| c.state());
                let freezer = podsnap_tests::host::freezer_state_of(id);
                let running = matches!(state, Ok(cri::ContainerState::ContainerRunning));
                if !running || freezer.as_deref() == Some("FROZEN") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{id} on A runs thawed ({state:?}, freezer {freezer:?}) while B may have run it"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = node_a.ctr().run("k8s.io", &["task", "resume", id]);
        }
        let _ = std::fs::remove_file(holds.path().join("migration-pages"));
        let _ = podsnap_tests::kubelet::remove_pod(&node_a, &pod);
        return;
    }
    // A's pod stays, frozen and locked: it must not run on both nodes.
    let netns_a = pod.netns.as_deref().expect("the pod's netns on A");
    assert!(
        podsnap_tests::host::network_locked(netns_a),
        "A's pod network stays locked"
    );
    for id in &ids {
        let state = node_a.cri().container(id).expect("ContainerStatus").state();
        assert_eq!(
            state,
            cri::ContainerState::ContainerRunning,
            "{id} on A stays (frozen)"
        );
        let freezer = podsnap_tests::host::freezer_state_of(id);
        assert_eq!(freezer.as_deref(), Some("FROZEN"), "{id} on A is frozen");
        // Thawed for the cleanup.
        let _ = node_a.ctr().run("k8s.io", &["task", "resume", id]);
    }
    let _ = std::fs::remove_file(holds.path().join("migration-pages"));
    let _ = podsnap_tests::kubelet::remove_pod(&node_a, &pod);
}

/// `child`'s output once it exits, SIGKILLed first if it runs longer than `limit`.
fn wait_output(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().expect("the child's output")
}

/// `podsnap migrate` SIGKILLed before the switch (the pod frozen and dumped lazily, the target
/// held after the first file): nothing is left to resume the pod but its shim, which sees the
/// migration's control end and resumes it by itself. The pod goes on where it was (its counters
/// advance, init did not run again), its containers thawed and its network unlocked; the target
/// creates no pod.
#[test]
fn a_migrate_killed_before_the_switch_leaves_the_pod_running_on_the_source() {
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let keys = Keys::new();
    let (config_a, config_b, _) = keys.for_a_and_b();
    let name = node_a.unique("killed");
    let pod = run_three_container_pod(&node_a, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let before = mark_and_count(&pod);
    let holds = tempfile::tempdir().expect("hold points");
    std::fs::write(holds.path().join("migration-receiving"), b"").expect("arm the hold");
    let mut receiver = Receiver::start(&node_b, &config_b, Some(holds.path()), true);
    let docker = tempfile::tempdir().expect("docker config dir");
    let migrate = spawn_migrate(&node_a, &config_a, &name, &receiver.addr, docker.path())
        .spawn()
        .expect("podsnap migrate");
    let mut migrate = wait_held(
        holds.path(),
        "migration-receiving",
        migrate,
        &receiver,
        "the target never held mid-transfer",
    );
    // Frozen for the move, right now.
    let netns = pod.pod.netns.as_deref().expect("the pod's netns");
    assert!(
        podsnap_tests::host::network_locked(netns),
        "locked during the move"
    );
    migrate.kill().expect("SIGKILL podsnap migrate");
    let _ = migrate.wait();
    // The shim resumes it, with no one asking.
    runs_on(&pod.pod.ip, before, "after migrate was killed");
    for (cname, cid) in [("sidecar", &pod.sidecar_id), ("app", &pod.app_id)] {
        let state = node_a.cri().container(cid).expect("ContainerStatus").state();
        assert_eq!(state, cri::ContainerState::ContainerRunning, "{cname} on A");
        let freezer = podsnap_tests::host::freezer_state_of(cid);
        assert_eq!(freezer.as_deref(), Some("THAWED"), "{cname} on A is thawed");
    }
    assert!(
        !podsnap_tests::host::network_locked(netns),
        "A's pod network is unlocked"
    );
    let marker = std::fs::read_to_string(pod.volume.join("init.log")).expect("the init marker");
    assert_eq!(marker.lines().count(), 1, "init ran once: {marker:?}");
    // The target saw its source go before any pod was made.
    let _ = std::fs::remove_file(holds.path().join("migration-receiving"));
    assert!(
        !receiver.wait(Duration::from_secs(60)).success(),
        "the receiver reported success without its source"
    );
    assert!(sandbox_ids(&node_b).is_empty(), "no pod on B");
}

/// A lazy dump that runs out of room (its checkpoint root a tmpfs of 30 inodes: ENOSPC in the
/// middle of the dump; on runc 1.3.6 while CRIU writes its images): `migrate` fails saying so,
/// the pod runs on as it was (thawed, unlocked, its counters going on), no CRIU of that dump is left,
/// nothing is left in the root, and B has no pod.
#[test]
fn a_lazy_dump_out_of_room_leaves_the_pod_running() {
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let keys = Keys::new();
    let (config_a, config_b, _) = keys.for_a_and_b();
    let name = node_a.unique("full");
    let pod = run_three_container_pod(&node_a, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let before = mark_and_count(&pod);
    let receiver = Receiver::start(&node_b, &config_b, None, false);
    let few = podsnap_tests::host::Tmpfs::mount(&node_a.dir().join("inodes"), "size=512m,nr_inodes=30");
    let docker = tempfile::tempdir().expect("docker config dir");
    let out = spawn_migrate(&node_a, &config_a, &name, &receiver.addr, docker.path())
        .env("PODSNAP_CHECKPOINT_ROOT", &few.0)
        .output()
        .expect("podsnap migrate");
    let said = text(&out);
    eprintln!("podsnap migrate with no room:\n{said}");
    assert!(!out.status.success(), "a dump with no room succeeded: {said}");
    assert!(said.to_lowercase().contains("no space left on device"), "{said}");
    runs_on(&pod.pod.ip, before, "after the lazy dump ran out of room");
    for (cname, cid) in [("sidecar", &pod.sidecar_id), ("app", &pod.app_id)] {
        let freezer = podsnap_tests::host::freezer_state_of(cid);
        assert_eq!(freezer.as_deref(), Some("THAWED"), "{cname} on A is thawed");
    }
    let netns = pod.pod.netns.as_deref().expect("the pod's netns");
    assert!(
        !podsnap_tests::host::network_locked(netns),
        "A's pod network is unlocked"
    );
    let left: Vec<_> = std::fs::read_dir(&few.0)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "the partial output was removed: {left:?}");
    // No CRIU of the dump serves on: none names the root it wrote to.
    let root = few.0.display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let serving: Vec<String> = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&root) && (c.contains("criu") || c.contains("runc")))
            .collect();
        if serving.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left running: {serving:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(sandbox_ids(&node_b).is_empty(), "no pod on B");
    drop(few);
}

#[test]
fn an_unlisted_node_is_refused_and_a_target_killed_mid_transfer_leaves_the_pod_running() {
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let keys = Keys::new();
    let (config_a, config_b, b_pub) = keys.for_a_and_b();
    let (stranger_key, stranger_pub) = keys.pair("stranger");
    // A node that trusts B but that B does not list.
    let config_stranger = keys.config("stranger", &stranger_key, &[&b_pub]);
    let name = node_a.unique("stays");
    let pod = run_three_container_pod(&node_a, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let before = mark_and_count(&pod);
    let (sandboxes_b, root_b, root_a) = (
        sandbox_ids(&node_b),
        names_in(&node_b.files().checkpoints()),
        names_in(&node_a.files().checkpoints()),
    );
    let migrate = |config: &Path, to: &str| {
        podsnap(
            &node_a,
            config,
            &[
                "migrate",
                "--namespace",
                "default",
                "--pod",
                &name,
                "--to-node",
                to,
            ],
        )
    };

    // 1. Refused in the handshake: both sides name the stranger's key id; nothing happened.
    let holds = tempfile::tempdir().expect("hold points");
    let receiver = Receiver::start(&node_b, &config_b, Some(holds.path()), false);
    let out = migrate(&config_stranger, &receiver.addr);
    assert!(
        !out.status.success(),
        "an unlisted node got through: {}",
        text(&out)
    );
    let stranger = key_id(&stranger_pub);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains(&format!("refused this node's key {stranger}")),
        "{}",
        text(&out)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !receiver.stderr().contains(&stranger) {
        assert!(
            Instant::now() < deadline,
            "the receiver does not name the refused key {stranger}: {}",
            receiver.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        receiver.stderr().contains("is not one of [migration] peers"),
        "{}",
        receiver.stderr()
    );
    runs_on(&pod.pod.ip, before, "after the refusal");
    assert_eq!(
        names_in(&node_a.files().checkpoints()),
        root_a,
        "nothing dumped on A"
    );
    assert_eq!(
        names_in(&node_b.files().checkpoints()),
        root_b,
        "nothing received on B"
    );
    assert_eq!(sandbox_ids(&node_b), sandboxes_b, "no pod on B");

    // 2. B dies mid-transfer: held once the first file is written, then SIGKILLed.
    std::fs::write(holds.path().join("migration-receiving"), b"").expect("arm the hold");
    let mut receiver = receiver;
    let addr = receiver.addr.clone();
    let (out, reached) = std::thread::scope(|scope| {
        let moving = scope.spawn(|| migrate(&config_a, &addr));
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut reached = false;
        while Instant::now() < deadline && !moving.is_finished() {
            if holds.path().join("migration-receiving.reached").exists() {
                reached = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        receiver.child.kill().expect("SIGKILL the receiver");
        let _ = receiver.child.wait();
        let _ = std::fs::remove_file(holds.path().join("migration-receiving"));
        let out = moving.join().expect("the migrate thread");
        (out, reached)
    });
    assert!(
        reached,
        "the receiver never held mid-transfer: {}\n{}",
        text(&out),
        receiver.stderr()
    );
    assert!(
        !out.status.success(),
        "the migration succeeded without its target: {}",
        text(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains("was resumed and runs on this node as before"),
        "{}",
        text(&out)
    );
    // The pod on A goes on from where it was: resumed, not restarted.
    runs_on(&pod.pod.ip, before, "after the target died");
    for (cname, cid) in [("sidecar", &pod.sidecar_id), ("app", &pod.app_id)] {
        let state = node_a.cri().container(cid).expect("ContainerStatus").state();
        assert_eq!(state, cri::ContainerState::ContainerRunning, "{cname} on A");
    }
    let marker = std::fs::read_to_string(pod.volume.join("init.log")).expect("the init marker");
    assert_eq!(marker.lines().count(), 1, "init ran once: {marker:?}");
    assert_eq!(sandbox_ids(&node_b), sandboxes_b, "no pod on B");
    // The killed receiver's staging directory is all it left; the next receiver removes it.
    let left: Vec<String> = names_in(&node_b.files().checkpoints())
        .into_iter()
        .filter(|n| !root_b.contains(n))
        .collect();
    assert!(
        left.iter().all(|n| n.starts_with(".received-")),
        "B's root holds {left:?}"
    );
    let next = Receiver::start(&node_b, &config_b, None, false);
    assert_eq!(
        names_in(&node_b.files().checkpoints()),
        root_b,
        "the next receiver removed the killed one's staging directory"
    );
    drop(next);

    // 3. B has no room for the checkpoint with the reserve it keeps: refused before any file
    //    comes, with the numbers; A resumes the pod.
    let full_b = {
        let path = keys.dir.path().join("b-full.toml");
        let text = std::fs::read_to_string(&config_b).expect("B's config");
        std::fs::write(&path, format!("{text}\n[dump]\nreserve_bytes = {}\n", 1u64 << 60)).expect("config");
        path
    };
    let full = Receiver::start(&node_b, &full_b, None, true);
    let out = migrate(&config_a, &full.addr);
    assert!(!out.status.success(), "moved to a full node: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains("free there ([dump] reserve_bytes)"),
        "{}",
        text(&out)
    );
    assert!(
        stderr.contains("was resumed and runs on this node as before"),
        "{}",
        text(&out)
    );
    runs_on(&pod.pod.ip, before, "after the full node refused");
    assert_eq!(sandbox_ids(&node_b), sandboxes_b, "no pod on B");
    assert_eq!(
        names_in(&node_b.files().checkpoints()),
        root_b,
        "nothing in B's root"
    );
}

/// `podsnap drain --to-node --parallel 2` moves the three pods of A's `podsnap` handler to B
/// (one `podsnap receive` taking them, two at once): a line per pod, a table of downtimes and
/// bytes, every pod running on B from where it was (counters continue), every one stopped on A.
#[test]
fn drain_moves_every_pod_of_the_node_two_at_a_time() {
    let (node_a, node_b) = Node::start_pair(workload(), workload());
    let keys = Keys::new();
    let (config_a, config_b, _) = keys.for_a_and_b();
    let pods: Vec<_> = (0..3)
        .map(|i| {
            let name = node_a.unique(&format!("drained-{i}"));
            run_three_container_pod(&node_a, &PodOptions::new(&name, HANDLER)).expect("the pod runs")
        })
        .collect();
    let before: Vec<Before> = pods.iter().map(mark_and_count).collect();
    let sandboxes_b = sandbox_ids(&node_b);

    let receiver = Receiver::start(&node_b, &config_b, None, false);
    let out = podsnap(
        &node_a,
        &config_a,
        &["drain", "--to-node", &receiver.addr, "--parallel", "2"],
    );
    eprintln!("podsnap drain:\n{}", text(&out));
    assert!(
        out.status.success(),
        "drain: {}\nreceiver:\n{}\n{}",
        text(&out),
        receiver.stdout(),
        receiver.stderr()
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for pod in &pods {
        let name = format!("default/{}", pod.pod.name);
        assert!(stdout.contains(&format!("moved        {name} to ")), "{stdout}");
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&name) && l.contains("moved to"))
            .unwrap_or_else(|| panic!("no table row for {name}: {stdout}"));
        // pod, downtime (seconds), bytes, result.
        let downtime = row.split_whitespace().nth(1).unwrap_or_default();
        assert!(
            downtime
                .strip_suffix('s')
                .is_some_and(|d| d.parse::<f64>().is_ok_and(|d| d > 0.0)),
            "a downtime in {row}"
        );
    }
    assert!(stdout.contains("drained      3 of 3 pods"), "{stdout}");
    // The steps of the moves that ran at once are each named by their pod.
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for pod in &pods {
        assert!(
            stderr.contains(&format!("[default/{}] dumping", pod.pod.name)),
            "{stderr}"
        );
    }

    // B: three new pods, one per migration, read from what receive printed of each.
    let deadline = Instant::now() + Duration::from_secs(60);
    let restored = loop {
        let text = receiver.stdout();
        let blocks: Vec<(String, String, String)> = text
            .split("received     ")
            .skip(1)
            .filter_map(|b| {
                let field = |k: &str| {
                    b.lines()
                        .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_owned()))
                };
                Some((field("pod ")?, field("id ")?, field("ip ")?))
            })
            .collect();
        if blocks.len() == pods.len() {
            break blocks;
        }
        assert!(
            Instant::now() < deadline,
            "three pods received: {text}\n{}",
            receiver.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut new_ids: Vec<String> = Vec::new();
    for (pod_line, id, _) in &restored {
        let uid = pod_line
            .rsplit_once("(uid ")
            .and_then(|(_, u)| u.strip_suffix(')'))
            .expect("the new pod's uid");
        let netns = node_b.cri().pod_netns(id).ok().flatten();
        node_b.record_pod(uid, netns.as_deref()).expect("record the pod");
        new_ids.push(id.clone());
    }
    let mut after = sandbox_ids(&node_b);
    after.retain(|s| !sandboxes_b.contains(s));
    new_ids.sort();
    assert_eq!(after, new_ids, "three new pods on B");
    for (pod, was) in pods.iter().zip(&before) {
        let name = &pod.pod.name;
        let (_, _, ip) = restored
            .iter()
            .find(|(line, _, _)| line.starts_with(&format!("default/{name} ")))
            .unwrap_or_else(|| panic!("{name} restored on B: {restored:?}"));
        // Goes on from where it was on A: its counters continue, not from zero.
        runs_on(ip, *was, &format!("{name} on B"));
        for (cname, cid) in [("sidecar", &pod.sidecar_id), ("app", &pod.app_id)] {
            node_a
                .cri()
                .wait_container_state(cid, cri::ContainerState::ContainerExited, Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("{name}/{cname} on node A stopped after the drain: {e:#}"));
        }
        remove_original(&node_a, pod);
    }
}
