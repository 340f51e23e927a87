//! Checkpoints through an OCI registry, against a real one (Debian's `docker-registry` on
//! 127.0.0.1, its own port and storage) and the `podsnap` binary:
//!
//! - a pod checkpoint pushed and pulled back is the same files (digests), inside the node's
//!   checkpoint root, directories 0700 and files 0600;
//! - a second push of the same checkpoint uploads no blob (the registry's access log sees no
//!   upload) and gives the same manifest digest;
//! - a pull signed by a key that is not trusted is refused, leaving nothing behind;
//! - a layer changed in the registry's storage is refused, leaving nothing behind;
//! - a registry that is not allowed is refused before any network call (a listener on its
//!   port sees no connection);
//! - a pod moves between two nodes (two private containerds, their own roots and pod subnets):
//!   `podsnap dump --stop --push REF` on one, `podsnap restore --from REF` on the other,
//!   `podsnap migrate` on, and back through the annotation `podsnap.io/restore-from: oci://REF`.

mod pod_checkpoint_support;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use pod_checkpoint_support::*;
use podsnap_tests::command::output_text as text;
use podsnap_tests::kubelet::{
    ask, run_container, run_pod, run_three_container_pod, wait_answering, PodOptions, APP_PORT, SIDECAR_PORT,
};
use podsnap_tests::registry::{Registry, RestoredFrom};
use podsnap_tests::{start_node, HANDLER};
use sha2::{Digest, Sha256};

/// Relative path -> (SHA-256, mode) of each regular file.
type Files = BTreeMap<String, (String, u32)>;

/// Every regular file under `dir`, and every directory's mode.
fn tree(dir: &Path) -> (Files, Vec<(String, u32)>) {
    let mut files = BTreeMap::new();
    let mut dirs = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let entry = entry.expect("entry");
            let meta = entry.metadata().expect("metadata");
            let rel = entry
                .path()
                .strip_prefix(dir)
                .expect("beneath")
                .to_string_lossy()
                .into_owned();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                dirs.push((rel, mode));
                stack.push(entry.path());
            } else {
                assert!(meta.is_file(), "{rel} is not a regular file");
                let digest = hex::encode(Sha256::digest(std::fs::read(entry.path()).expect("read")));
                files.insert(rel, (digest, mode));
            }
        }
    }
    (files, dirs)
}

struct Setup {
    dir: tempfile::TempDir,
    binary: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("docker")).expect("docker config dir");
        Setup {
            dir,
            binary: podsnap_binary(),
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// An ed25519 key pair made with openssl, as the README says: (private, public).
    fn key_pair(&self, name: &str) -> (PathBuf, PathBuf) {
        podsnap_tests::registry::key_pair(self.dir.path(), name)
    }

    fn config(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!("checkpoint_root = \"{}\"\n{text}", self.root().display()),
        )
        .expect("config");
        path
    }

    fn podsnap(&self, config: &Path, args: &[&str]) -> Output {
        Command::new(&self.binary)
            .args(args)
            .env("PODSNAP_CONFIG", config)
            .env_remove("PODSNAP_CHECKPOINT_ROOT")
            .env("DOCKER_CONFIG", self.dir.path().join("docker"))
            .output()
            .expect("running podsnap")
    }

    /// `podsnap ARGS` against `node` (its CRI and containerd sockets and checkpoint root).
    fn podsnap_on(&self, config: &Path, node: &podsnap_tests::node::Node, args: &[&str]) -> Output {
        let docker = self.dir.path().join("docker");
        podsnap_tests::registry::podsnap_on(&self.binary, config, &docker, node, args)
    }
}

/// `podsnap dump --stop --namespace default --pod NAME --push REF`'s arguments.
fn dump_stop_push<'a>(name: &'a str, reference: &'a str) -> [&'a str; 8] {
    [
        "dump",
        "--stop",
        "--namespace",
        "default",
        "--pod",
        name,
        "--push",
        reference,
    ]
}

/// `podsnap restore --from REF` on `node` (see `podsnap_tests::registry::restore_from`).
fn restore_from(
    setup: &Setup,
    config: &Path,
    node: &podsnap_tests::node::Node,
    reference: &str,
) -> RestoredFrom {
    let docker = setup.dir.path().join("docker");
    podsnap_tests::registry::restore_from(&setup.binary, config, &docker, node, reference)
}

/// Polls `done` every 50 ms until it holds or `timeout` passes; says whether it held.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// The names in the checkpoint root, hidden ones (staging directories) included.
fn root_names(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .map(|d| {
            d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn pushed_digest(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("pushed"))
        .and_then(|l| l.trim().rsplit_once('@'))
        .map(|(_, d)| d.to_owned())
        .unwrap_or_else(|| panic!("no pushed digest in {}", text(out)))
}

#[test]
fn a_pod_checkpoint_travels_through_a_registry_signed_and_comes_back_identical() {
    let node = start_node!();
    let setup = Setup::new();
    let name = node.unique("reg");
    let pod = run_three_container_pod(&node, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let source = node.dir().join("source");
    dump(&node, &pod, Some(source.clone())).expect("podsnap dump");
    let (source_files, _) = tree(&source);
    assert!(
        source_files.keys().any(|p| p.starts_with("volumes/")) && source_files.contains_key("manifest.json"),
        "the checkpoint has a volume and a manifest: {:?}",
        source_files.keys()
    );

    let registry = Registry::start();
    let (signing, trusted) = setup.key_pair("node-a");
    let (_, stranger) = setup.key_pair("stranger");
    let registry_section = format!(
        "[registry]\nallowed = [\"{}\"]\nsigning_key = \"{}\"\ntrusted_keys = [\"{}\"]\n",
        registry.host(),
        signing.display(),
        trusted.display()
    );
    let config = setup.config("node", &registry_section);
    let reference = format!("{}/checkpoints/web:v1", registry.host());
    let source_arg = source.to_str().expect("utf8");

    // Push: every layer uploaded, signed.
    let out = setup.podsnap(&config, &["push", source_arg, &reference]);
    assert!(out.status.success(), "push: {}", text(&out));
    let digest = pushed_digest(&out);
    let first_uploads = registry.uploads();
    // containers init, sidecar, app; the volume; pod/host; the config; the signature and its
    // empty config.
    assert!(
        first_uploads >= 6,
        "uploads seen: {first_uploads}\n{}",
        registry.log()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("signed by    key"),
        "{}",
        text(&out)
    );

    // A second push of the same checkpoint uploads nothing.
    let out = setup.podsnap(&config, &["push", source_arg, &reference]);
    assert!(out.status.success(), "second push: {}", text(&out));
    assert_eq!(
        pushed_digest(&out),
        digest,
        "the same checkpoint gives the same manifest"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(0 uploaded"),
        "{}",
        text(&out)
    );
    assert_eq!(
        registry.uploads(),
        first_uploads,
        "the second push uploaded blobs:\n{}",
        registry.log()
    );

    // Pull by tag into the root: the same files, 0700/0600.
    let out = setup.podsnap(&config, &["pull", &reference, "pulled"]);
    assert!(out.status.success(), "pull: {}", text(&out));
    let pulled = setup.root().join("pulled");
    let (pulled_files, pulled_dirs) = tree(&pulled);
    let digests = |t: &Files| -> BTreeMap<String, String> {
        t.iter().map(|(k, (d, _))| (k.clone(), d.clone())).collect()
    };
    assert_eq!(
        digests(&pulled_files),
        digests(&source_files),
        "pulled files differ from the pushed ones"
    );
    for (path, (_, mode)) in &pulled_files {
        assert_eq!(*mode, 0o600, "{path} has mode {mode:o}");
    }
    for (path, mode) in &pulled_dirs {
        assert_eq!(*mode, 0o700, "{path} has mode {mode:o}");
    }
    let root_mode = std::fs::metadata(&pulled).expect("pulled").permissions().mode() & 0o7777;
    assert_eq!(root_mode, 0o700);
    verified(&node, &pulled);
    // By digest too; a destination outside the root is refused.
    let by_digest = format!("{}/checkpoints/web@{digest}", registry.host());
    let out = setup.podsnap(&config, &["pull", &by_digest, "by-digest"]);
    assert!(out.status.success(), "pull by digest: {}", text(&out));
    let outside = setup.dir.path().join("elsewhere");
    let out = setup.podsnap(&config, &["pull", &reference, outside.to_str().expect("utf8")]);
    assert!(
        !out.status.success() && text(&out).contains("checkpoint root"),
        "{}",
        text(&out)
    );
    assert!(!outside.exists());
    assert_eq!(root_names(&setup.root()), ["by-digest", "pulled"]);

    // Signed by a key this node does not trust: refused, nothing written.
    let untrusting = setup.config(
        "untrusting",
        &format!(
            "[registry]\nallowed = [\"{}\"]\ntrusted_keys = [\"{}\"]\n",
            registry.host(),
            stranger.display()
        ),
    );
    let out = setup.podsnap(&untrusting, &["pull", &reference, "untrusted"]);
    assert!(
        !out.status.success(),
        "an untrusted checkpoint was pulled: {}",
        text(&out)
    );
    assert!(text(&out).contains("not a trusted key"), "{}", text(&out));
    assert_eq!(root_names(&setup.root()), ["by-digest", "pulled"]);

    // A layer changed in the registry's storage: refused, nothing left behind.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(registry.blob(&digest)).expect("the manifest blob in the registry's storage"),
    )
    .expect("manifest JSON");
    let layer = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap_or(0))
        .expect("a layer");
    let blob = registry.blob(layer["digest"].as_str().expect("digest"));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&blob)
        .expect("open the layer blob");
    let middle = file.metadata().expect("meta").len() / 2;
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(middle)).expect("seek");
    file.read_exact(&mut byte).expect("read");
    byte[0] ^= 0xff;
    file.seek(SeekFrom::Start(middle)).expect("seek");
    file.write_all(&byte).expect("write");
    drop(file);
    let out = setup.podsnap(&config, &["pull", &reference, "tampered"]);
    assert!(
        !out.status.success(),
        "a tampered layer was pulled: {}",
        text(&out)
    );
    assert!(
        text(&out).contains(&format!(
            "part {} (",
            layer["annotations"]["io.podsnap.checkpoint.part"]
                .as_str()
                .expect("part")
        )) && text(&out).contains("is refused"),
        "{}",
        text(&out)
    );
    assert_eq!(root_names(&setup.root()), ["by-digest", "pulled"]);
}

#[test]
fn a_registry_that_is_not_allowed_is_refused_before_any_network_call() {
    let setup = Setup::new();
    let listener = TcpListener::bind("127.0.0.1:0").expect("a listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let (signing, trusted) = setup.key_pair("node");
    let config = setup.config(
        "node",
        &format!(
            "[registry]\nallowed = [\"127.0.0.1:1\"]\nsigning_key = \"{}\"\ntrusted_keys = [\"{}\"]\n",
            signing.display(),
            trusted.display()
        ),
    );
    let checkpoint = setup.dir.path().join("some-checkpoint");
    std::fs::create_dir(&checkpoint).expect("mkdir");
    let reference = format!("127.0.0.1:{port}/checkpoints/web:v1");
    for args in [
        vec!["push", checkpoint.to_str().expect("utf8"), &reference],
        vec!["pull", &reference, "pulled"],
    ] {
        let out = setup.podsnap(&config, &args);
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let shown = text(&out);
        assert!(
            shown.contains(&format!("registry 127.0.0.1:{port}")) && shown.contains("not allowed"),
            "{args:?}: {shown}"
        );
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{args:?} connected to the registry that is not allowed: {other:?}"),
        }
    }
    assert!(!setup.root().join("pulled").exists());
    // No [registry] section at all: nothing is allowed.
    let bare = setup.config("bare", "");
    let out = setup.podsnap(&bare, &["pull", &reference, "pulled"]);
    assert!(
        !out.status.success() && text(&out).contains("not allowed"),
        "{}",
        text(&out)
    );
}

/// A pod moves between two nodes (two private containerds, their own roots, sockets and pod
/// subnets) through the registry: on node A `podsnap dump --stop --push REF` (the pod stops at
/// the snapshot), on node B `podsnap restore --from REF` (allowed registry, signature and
/// digests checked): the counters go on, the volume holds what was written, the init container
/// does not run again, the app reaches its sidecar on localhost. Then B moves it on with
/// `podsnap migrate`, and A brings it back the kubelet way, through the annotation
/// `podsnap.io/restore-from: oci://REF`; a registry A does not allow fails the pod first.
#[test]
fn dump_push_and_restore_from_move_a_pod_through_the_registry() {
    let workload =
        || podsnap_tests::node::NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    // Node A's shim can be held once the dump has announced its container parts.
    let holds = tempfile::tempdir().expect("a directory of hold points");
    let mut a = workload();
    a.extra_env.push((
        podsnap_tests::paths::FAILPOINT_HOLD_ENV.to_owned(),
        holds.path().display().to_string(),
    ));
    let (node_a, node_b) = podsnap_tests::node::Node::start_pair(a, workload());
    assert_ne!(node_a.subnet(), node_b.subnet(), "two pod networks");
    let setup = Setup::new();
    let name = node_a.unique("move");
    let pod = run_three_container_pod(&node_a, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let before = mark_and_count(&pod);
    let registry = Registry::start();
    let (signing, trusted) = setup.key_pair("node");
    let config = setup.config(
        "node",
        &format!(
            "[registry]\nallowed = [\"{}\"]\nsigning_key = \"{}\"\ntrusted_keys = [\"{}\"]\n",
            registry.host(),
            signing.display(),
            trusted.display()
        ),
    );
    let reference = format!("{}/moves/{name}:v1", registry.host());
    let podsnap = |node: &podsnap_tests::node::Node, args: &[&str]| setup.podsnap_on(&config, node, args);
    // The container parts go up while the dump is still finishing: held once they are
    // announced (the pod frozen, nothing digested yet), the registry receives one layer per
    // container (sandbox, init, sidecar, app) before the dump may go on.
    std::fs::write(holds.path().join("parts-ready"), b"").expect("arm the hold");
    let dumping = std::thread::scope(|scope| {
        let dumping = scope.spawn(|| podsnap(&node_a, &dump_stop_push(&name, &reference)));
        let waited = wait_until(Duration::from_secs(60), || {
            holds.path().join("parts-ready.reached").exists() && registry.completed_uploads() >= 4
        });
        std::fs::remove_file(holds.path().join("parts-ready")).expect("release the hold");
        let out = dumping.join().expect("the dump thread");
        assert!(
            waited,
            "the container parts were not uploaded while the dump was held ({} uploads): {}\n{}",
            registry.completed_uploads(),
            text(&out),
            registry.log()
        );
        out
    });
    let out = dumping;
    assert!(out.status.success(), "dump --push: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4 of them during the dump)"),
        "{}",
        text(&out)
    );
    for (cname, id) in [("sidecar", &pod.sidecar_id), ("app", &pod.app_id)] {
        node_a
            .cri()
            .wait_container_state(id, cri::ContainerState::ContainerExited, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{cname} on node A stopped at the snapshot: {e:#}"));
    }
    remove_original(&node_a, &pod);

    let node = &node_b;
    let pods = pods_dir(node);
    let restored = restore_from(&setup, &config, node, &reference);
    assert!(
        restored.field("pulled ").contains("sha256:"),
        "{}",
        restored.stdout
    );
    let RestoredFrom { ip, id, uid, .. } = restored;
    let app_id = container_named(node, &id, "app").id;
    let volume = pods
        .join(&uid)
        .join("volumes/kubernetes.io~empty-dir")
        .join(podsnap_tests::kubelet::DATA_VOLUME);
    check_restored(node, &ip, &pod.pod.ip, &volume, &app_id, before);
    // The pull checked every file's digest as it wrote it and sealed the checkpoint: the
    // shim did not read them all again.
    let log = node.log_tail(3000);
    assert!(
        log.contains(": digests Sealed"),
        "the pulled checkpoint was sealed"
    );
    assert!(!log.contains(": digests Hashed"), "and not hashed again");

    // And on: `podsnap migrate` dumps the restored pod stopped at the snapshot and pushes it,
    // saying how long each phase took; the pushed checkpoint pulls back verified.
    let again = format!("{}/moves/{name}:v2", registry.host());
    let out = podsnap(
        node,
        &[
            "migrate",
            "--namespace",
            "default",
            "--pod",
            &name,
            "--to",
            &again,
        ],
    );
    assert!(out.status.success(), "migrate: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("phases       dump "), "{stdout}");
    assert!(
        stdout.contains(&format!("podsnap restore --from {again}")),
        "{stdout}"
    );
    node.cri()
        .wait_container_state(
            &app_id,
            cri::ContainerState::ContainerExited,
            Duration::from_secs(10),
        )
        .expect("migrate stops the pod at the snapshot");
    let out = podsnap(node, &["pull", &again, "moved-again"]);
    assert!(out.status.success(), "pull of the migrated pod: {}", text(&out));
    verified(node, &node.files().checkpoints().join("moved-again"));
    // Back on node A, the kubelet way.
    let node = &node_a;

    // The kubelet path on the target: a pod annotated `podsnap.io/restore-from: oci://REF` is
    // pulled by the shim under the node's rules and restored; a registry the node does not
    // allow is refused before the pod exists. (The node's own configuration is the shim's.)
    node.set_podsnap_config(&std::fs::read_to_string(&config).expect("config"))
        .expect("the node's configuration");
    let mut refused = PodOptions::new(&format!("{name}-x"), HANDLER);
    refused.annotations.insert(
        podsnap_tests::paths::RESTORE_ANNOTATION.to_owned(),
        "oci://registry.invalid:5000/x/y:z".to_owned(),
    );
    let err = format!(
        "{:#}",
        run_pod(node, &refused).expect_err("a registry not allowed")
    );
    assert!(err.contains("registry.invalid:5000"), "{err}");
    let mut annotated = PodOptions::new(&name, HANDLER);
    annotated.annotations.insert(
        podsnap_tests::paths::RESTORE_ANNOTATION.to_owned(),
        format!("oci://{again}"),
    );
    let kube = run_pod(node, &annotated).expect("RunPodSandbox with oci:// restore-from");
    let [init, sidecar, app] = podsnap_tests::kubelet::three_container_specs();
    let init_id = run_container(node, &kube, &init).expect("init (answered as completed)");
    node.cri()
        .wait_container_state(
            &init_id,
            cri::ContainerState::ContainerExited,
            Duration::from_secs(10),
        )
        .expect("the init container does not run again");
    run_container(node, &kube, &sidecar).expect("sidecar restored");
    run_container(node, &kube, &app).expect("app restored");
    let count = |port| {
        wait_answering(&kube.ip, port, Duration::from_secs(20)).expect("answers");
        ask(&kube.ip, port, "count")
            .expect("count")
            .parse::<u64>()
            .expect("n")
    };
    assert!(count(APP_PORT) >= before.app, "the app's counter goes on");
    assert!(
        count(SIDECAR_PORT) >= before.sidecar,
        "the sidecar's counter goes on"
    );
}

/// A container image the target node does not have is pulled by the digest the checkpoint
/// pinned, not by its tag: node A pulls the app's image from the registry through CRI (as
/// kubelet does, so that CRI knows its repo digest), runs it and moves the pod with
/// `podsnap dump --stop --push`; node B, which never had the image, pulls
/// `REPO@sha256:...` during `podsnap restore --from`, and the app's counter goes on. The tag
/// is then pointed at another image in the registry: the restore still gets the pinned one.
#[test]
fn a_container_image_missing_on_the_target_is_pulled_by_its_digest() {
    let workload =
        || podsnap_tests::node::NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    let (node_a, node_b) = podsnap_tests::node::Node::start_pair(workload(), workload());
    let setup = Setup::new();
    let registry = Registry::start();
    let image = format!("{}/images/workload:1", registry.host());
    for node in [&node_a, &node_b] {
        node.allow_registry(&registry.host())
            .expect("the registry reachable");
    }
    // Into the registry from node A's content store, then A's copy is dropped and pulled back
    // through CRI: the image now has a repo digest, as any image pulled by kubelet has.
    let ctr = |node: &podsnap_tests::node::Node, args: &[&str]| {
        node.ctr()
            .run("k8s.io", args)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}"));
    };
    ctr(&node_a, &["images", "tag", podsnap_tests::WORKLOAD_IMAGE, &image]);
    ctr(&node_a, &["images", "push", "--plain-http", &image]);
    ctr(&node_a, &["images", "rm", &image]);
    let pull = |node: &podsnap_tests::node::Node, reference: &str| {
        node.cri()
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: reference.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("CRI PullImage {reference}: {e}"))
    };
    pull(&node_a, &image);
    let status = |node: &podsnap_tests::node::Node, reference: &str| {
        node.cri()
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: reference.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .expect("ImageStatus")
            .image
    };
    let on_a = status(&node_a, &image).expect("the image on node A");
    let pinned = on_a
        .repo_digests
        .iter()
        .find(|d| d.starts_with(&format!("{}/images/workload@sha256:", registry.host())))
        .unwrap_or_else(|| panic!("a repo digest of {image}: {:?}", on_a.repo_digests))
        .clone();
    assert!(status(&node_b, &image).is_none(), "node B does not have {image}");

    let name = node_a.unique("pin");
    let pod = run_pod(&node_a, &PodOptions::new(&name, HANDLER)).expect("the pod");
    let mut app = podsnap_tests::kubelet::ContainerSpec::workload(
        "app",
        &["serve", "--name", "app", "--port", &APP_PORT.to_string()],
    );
    app.image = image.clone();
    run_container(&node_a, &pod, &app).expect("the app on the registry's image");
    wait_answering(&pod.ip, APP_PORT, Duration::from_secs(30)).expect("the app answers");
    let count = |ip: &str| {
        ask(ip, APP_PORT, "count")
            .expect("count")
            .parse::<u64>()
            .expect("a number")
    };
    let before = count(&pod.ip);

    let (signing, trusted) = setup.key_pair("node");
    let config = setup.config(
        "node",
        &format!(
            "[registry]\nallowed = [\"{}\"]\nsigning_key = \"{}\"\ntrusted_keys = [\"{}\"]\n",
            registry.host(),
            signing.display(),
            trusted.display()
        ),
    );
    let podsnap = |node: &podsnap_tests::node::Node, args: &[&str]| setup.podsnap_on(&config, node, args);
    let reference = format!("{}/moves/{name}:v1", registry.host());
    let out = podsnap(&node_a, &dump_stop_push(&name, &reference));
    assert!(out.status.success(), "dump --push: {}", text(&out));
    podsnap_tests::kubelet::remove_pod(&node_a, &pod).expect("the original pod removed");

    // The tag moves on in the registry: an image the checkpoint was not taken on.
    ctr(&node_a, &["images", "tag", podsnap_tests::PAUSE_IMAGE, &image]);
    ctr(&node_a, &["images", "push", "--plain-http", &image]);

    let restored = restore_from(&setup, &config, &node_b, &reference);
    assert!(
        restored
            .stdout
            .contains(&format!("image pulled {pinned} (it was not on this node)")),
        "{}",
        restored.stdout
    );
    let RestoredFrom { ip, id, .. } = restored;
    wait_answering(&ip, APP_PORT, Duration::from_secs(20)).expect("the restored app answers");
    assert!(count(&ip) >= before, "the app's counter goes on");
    let on_b = status(&node_b, &pinned).expect("the pinned image on node B");
    assert_eq!(
        on_b.id, on_a.id,
        "node B runs the image the checkpoint was taken on"
    );
    let restored = container_named(&node_b, &id, "app");
    assert_eq!(
        restored.image_ref, on_a.id,
        "the restored container runs the pinned image"
    );
    assert_eq!(
        restored.image.map(|i| i.user_specified_image).unwrap_or_default(),
        image,
        "the pod still names the image by its tag, as it asked"
    );
}

/// A tenant's pod annotated `podsnap.io/restore-from: oci://REF` that the node's restore policy
/// refuses (a pod of team-b naming team-a's signed checkpoint) is refused on the checkpoint's
/// manifest (the config blob), before any layer is downloaded: the checkpoint root holds
/// nothing new, however often kubelet tries again. The copy an allowed pod pulled goes with
/// the pod.
#[test]
fn a_refused_oci_restore_leaves_nothing_in_the_root() {
    let node = start_node!();
    let setup = Setup::new();
    let name = node.unique("tenant");
    let mut options = PodOptions::new(&name, HANDLER);
    options.namespace = "team-a".to_owned();
    let pod = run_three_container_pod(&node, &options).expect("team-a's pod runs");
    let source = node.dir().join("team-a-checkpoint");
    dump(&node, &pod, Some(source.clone())).expect("podsnap dump");
    let registry = Registry::start();
    let (signing, trusted) = setup.key_pair("node");
    let config = setup.config(
        "node",
        &format!(
            "[registry]\nallowed = [\"{}\"]\nsigning_key = \"{}\"\ntrusted_keys = [\"{}\"]\n",
            registry.host(),
            signing.display(),
            trusted.display()
        ),
    );
    let reference = format!("{}/team-a/{name}:v1", registry.host());
    let out = setup.podsnap(&config, &["push", source.to_str().expect("utf8"), &reference]);
    assert!(out.status.success(), "push: {}", text(&out));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(registry.blob(&pushed_digest(&out))).expect("the pushed manifest"),
    )
    .expect("manifest JSON");
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("a layer digest").to_owned())
        .collect();
    assert!(!layers.is_empty());
    node.set_podsnap_config(&std::fs::read_to_string(&config).expect("config"))
        .expect("the node's configuration");
    let root = node.files().checkpoints();
    let before = root_names(&root);
    let annotated = |pod_name: String, namespace: &str, reference: &str| {
        let mut options = PodOptions::new(&pod_name, HANDLER);
        options.namespace = namespace.to_owned();
        options.annotations.insert(
            podsnap_tests::paths::RESTORE_ANNOTATION.to_owned(),
            format!("oci://{reference}"),
        );
        options
    };
    for attempt in 0..2 {
        let err = format!(
            "{:#}",
            run_pod(&node, &annotated(format!("{name}-b"), "team-b", &reference))
                .map(|p| format!("created pod {}", p.id))
                .expect_err("team-b restoring team-a's checkpoint")
        );
        assert!(
            err.contains("rule: namespace") && err.contains("\"team-a\""),
            "attempt {attempt}: {err}"
        );
        assert_eq!(
            root_names(&root),
            before,
            "attempt {attempt}: the refused pod left what it pulled in the checkpoint root"
        );
    }
    let log = registry.log();
    for layer in &layers {
        assert!(
            !log.lines()
                .any(|l| l.contains("\"GET /v2/") && l.contains(layer.as_str())),
            "layer {layer} was downloaded for a refused pod:\n{log}"
        );
    }

    // team-a's own pod pulls it; the copy goes when the pod does.
    let allowed = run_pod(&node, &annotated(format!("{name}-a"), "team-a", &reference))
        .expect("team-a's pod restores from the registry");
    let pulled: Vec<String> = root_names(&root)
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    assert!(
        pulled.len() == 1 && pulled[0].starts_with("oci-"),
        "the pod's pulled copy: {pulled:?}"
    );
    podsnap_tests::kubelet::remove_pod(&node, &allowed).expect("the restored pod removed");
    assert!(
        wait_until(Duration::from_secs(30), || root_names(&root) == before),
        "the removed pod's pulled copy is still in the root: {:?}",
        root_names(&root)
    );

    // A signed checkpoint this node cannot run (another architecture): pulled for team-a's pod
    // (its namespace is right), refused by the compatibility rule after the pull; the copy goes
    // with the refusal. `podsnap restore --from` removes what it pulled as well.
    let foreign = node.dir().join("foreign-checkpoint");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&source)
        .arg(&foreign)
        .status()
        .expect("cp");
    assert!(copied.success());
    let path = foreign.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("json");
    m["host"]["arch"] = serde_json::json!("riscv64");
    std::fs::write(&path, serde_json::to_vec_pretty(&m).expect("json")).expect("write");
    let foreign_ref = format!("{}/team-a/{name}:riscv64", registry.host());
    let out = setup.podsnap(&config, &["push", foreign.to_str().expect("utf8"), &foreign_ref]);
    assert!(out.status.success(), "push: {}", text(&out));
    let err = format!(
        "{:#}",
        run_pod(&node, &annotated(format!("{name}-r"), "team-a", &foreign_ref))
            .map(|p| format!("created pod {}", p.id))
            .expect_err("a checkpoint of another architecture")
    );
    assert!(
        err.contains("rule: compatibility") && err.contains("riscv64"),
        "{err}"
    );
    assert_eq!(
        root_names(&root),
        before,
        "the pod refused after its pull left the copy in the root"
    );
    let (pods, logs) = (pods_dir(&node), logs_dir(&node));
    let out = setup.podsnap_on(
        &config,
        &node,
        &[
            "restore",
            "--from",
            &foreign_ref,
            "--pods-dir",
            pods.to_str().expect("utf8"),
            "--logs-dir",
            logs.to_str().expect("utf8"),
        ],
    );
    assert!(
        !out.status.success() && text(&out).contains("riscv64"),
        "restore --from: {}",
        text(&out)
    );
    assert_eq!(
        root_names(&root),
        before,
        "a failed restore --from left what it pulled in the root"
    );
}
