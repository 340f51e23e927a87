//! Trust, against the real stack: who may restore what (the node configuration's restore
//! policy, image and privilege checks), a restore that never touches the host through an image
//! symlink, checkpoints that never change the mode of a directory podsnap did not create, and
//! containers that come back in their recorded state (exited with their code, created, running)
//! with kubelet's restarts starting fresh.

mod pod_checkpoint_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use k8s_cri::v1 as cri;
use pod_checkpoint_support::*;
use podsnap_tests::checkpoint::MANIFEST;
use podsnap_tests::ctr::CRI_NAMESPACE;
use podsnap_tests::kubelet::{
    ask, create_container, run_container, run_pod, run_three_container_pod, start_container, wait_answering,
    ContainerSpec, KubePod, PodOptions, APP_PORT, DATA_MOUNT, DATA_VOLUME, SIDECAR_PORT,
};
use podsnap_tests::node::Node;
use podsnap_tests::{start_node, HANDLER, PAUSE_IMAGE};

/// The sidecar container of the three-container pod, as kubelet would create it again.
fn sidecar_spec() -> ContainerSpec {
    let port = SIDECAR_PORT.to_string();
    ContainerSpec::workload(
        "sidecar",
        &[
            "serve", "--name", "sidecar", "--port", &port, "--volume", DATA_MOUNT,
        ],
    )
    .with_empty_dir(DATA_VOLUME, DATA_MOUNT)
}

/// The app container of the three-container pod, as kubelet would create it again.
fn app_spec() -> ContainerSpec {
    let port = APP_PORT.to_string();
    ContainerSpec::workload(
        "app",
        &["serve", "--name", "app", "--port", &port, "--volume", DATA_MOUNT],
    )
    .with_empty_dir(DATA_VOLUME, DATA_MOUNT)
}

fn restore_annotated(name: &str, namespace: &str, checkpoint: &str) -> PodOptions {
    let mut options = PodOptions::new(name, HANDLER);
    options.namespace = namespace.to_owned();
    options
        .annotations
        .insert("podsnap.io/restore-from".to_owned(), checkpoint.to_owned());
    options
}

fn sandboxes(node: &Node) -> usize {
    node.cri()
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .expect("ListPodSandbox")
        .items
        .len()
}

fn exec_ok(node: &Node, id: &str, script: &str) -> String {
    let out = node.cri().exec(id, &["sh", "-c", script], 10).expect("ExecSync");
    assert_eq!(
        out.exit_code,
        0,
        "{script}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Creates and starts `spec` in `pod`, expecting the start to be refused; removes the refused
/// container (its name is free again) and returns the refusal.
fn refused_start(node: &Node, pod: &KubePod, spec: &ContainerSpec) -> String {
    let id = create_container(node, pod, spec).expect("CreateContainer");
    let status = start_container(node, &id).expect_err("StartContainer must be refused");
    node.cri()
        .remove_container(cri::RemoveContainerRequest { container_id: id })
        .expect("RemoveContainer");
    status.message().to_owned()
}

#[test]
fn restores_follow_the_namespace_policy_and_refuse_other_images_and_more_privilege() {
    let node = start_node!();
    let name = node.unique("trust");
    let mut options = PodOptions::new(&name, HANDLER);
    options.namespace = "alpha".to_owned();
    let pod = run_three_container_pod(&node, &options).expect("the pod runs in alpha");
    let before = mark_and_count(&pod);
    let dir = node.files().checkpoints().join("alpha-ckpt");
    let request = dump_request(&node, &name, "alpha", Some(dir.clone()));
    block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Lines,
    ))
    .expect("podsnap dump");
    let manifest = verified(&node, &dir);
    assert_eq!(manifest.pod.namespace.as_deref(), Some("alpha"));
    let app = manifest.container("app").expect("app recorded");
    assert!(
        app.image_id
            .as_deref()
            .is_some_and(|id| id.starts_with("sha256:")),
        "the dump records the image id: {app:?}"
    );
    assert!(
        !app.rootfs_layers.is_empty(),
        "the dump records the layers: {app:?}"
    );

    // A tenant of namespace beta names alpha's checkpoint: refused, by both drivers, before
    // anything is created.
    let count = sandboxes(&node);
    let mut cli = restore_request(&node, &dir);
    cli.namespace = Some("beta".to_owned());
    let err = restore(&node, &cli)
        .expect_err("a cross-namespace restore")
        .to_string();
    assert!(
        err.contains("rule: namespace") && err.contains("\"alpha\""),
        "{err}"
    );
    let err = format!(
        "{:#}",
        run_pod(&node, &restore_annotated(&name, "beta", "alpha-ckpt")).expect_err("kubelet, beta")
    );
    assert!(err.contains("rule: namespace"), "{err}");
    assert_eq!(sandboxes(&node), count, "a refused restore created nothing");

    // The node's configuration lets beta restore alpha's checkpoints.
    node.set_podsnap_config("[restore.allow_from]\nbeta = [\"alpha\"]\n")
        .expect("config");
    let beta = run_pod(&node, &restore_annotated(&name, "beta", "alpha-ckpt"))
        .expect("RunPodSandbox in beta, allowed by the policy");
    // Another image under the container's name: refused (containerd creates the task, and so
    // asks the shim, at StartContainer).
    let mut other_image = app_spec();
    other_image.image = PAUSE_IMAGE.to_owned();
    let err = refused_start(&node, &beta, &other_image);
    assert!(err.contains("rule: image"), "{err}");
    // More privilege than the checkpointed container had: refused.
    let mut privileged = app_spec();
    privileged.add_capabilities = vec!["SYS_ADMIN".to_owned()];
    let err = refused_start(&node, &beta, &privileged);
    assert!(
        err.contains("rule: privilege") && err.contains("CAP_SYS_ADMIN"),
        "{err}"
    );
    // The very same container: restored, its counter goes on.
    run_container(&node, &beta, &app_spec()).expect("the app restores in beta");
    wait_answering(&beta.ip, APP_PORT, Duration::from_secs(20)).expect("the restored app answers");
    let after: u64 = ask(&beta.ip, APP_PORT, "count")
        .expect("count")
        .parse()
        .expect("a number");
    assert!(
        after >= before.app,
        "restored, not restarted: {after} < {}",
        before.app
    );

    // Restores turned off, then narrowed to other namespaces: refused even in alpha.
    let cfg = node
        .set_podsnap_config("[restore]\nenabled = false\n")
        .expect("config");
    let err = format!(
        "{:#}",
        run_pod(&node, &restore_annotated(&name, "alpha", "alpha-ckpt")).expect_err("off")
    );
    assert!(err.contains("rule: restore.enabled"), "{err}");
    let mut cli = restore_request(&node, &dir);
    cli.config = cfg;
    let err = restore(&node, &cli).expect_err("off, CLI").to_string();
    assert!(err.contains("rule: restore.enabled"), "{err}");
    node.set_podsnap_config("[restore]\nnamespaces = [\"gamma\"]\n")
        .expect("config");
    let err = format!(
        "{:#}",
        run_pod(&node, &restore_annotated(&name, "alpha", "alpha-ckpt")).expect_err("narrowed")
    );
    assert!(err.contains("rule: restore.namespaces"), "{err}");
}

/// Rewrites one file of a checkpoint and its size and digest in the manifest, as an attacker
/// with write access to a copy of it could.
fn forge(dir: &Path, rel: &str, content: &[u8]) {
    std::fs::write(dir.join(rel), content).expect("write the forged file");
    podsnap_tests::checkpoint::redigest(dir, rel);
}

fn copy_checkpoint(from: &Path, to: &Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(status.success());
}

#[test]
fn recorded_states_restarts_and_a_replaced_image_symlink_come_back_as_they_were() {
    let node = start_node!();
    let name = node.unique("states");
    let pod = run_three_container_pod(&node, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    // A container that crashed (exit 3). (One created through CRI but never started is not
    // seen by the runtime at all: containerd creates its task at StartContainer.)
    let crasher_spec = ContainerSpec::workload("crasher", &["serve", "--name", "crasher", "--port", "7070"]);
    let crasher = run_container(&node, &pod.pod, &crasher_spec).expect("crasher runs");
    wait_answering(&pod.pod.ip, 7070, Duration::from_secs(20)).expect("crasher answers");
    let _ = ask(&pod.pod.ip, 7070, "exit 3");
    let status = node
        .cri()
        .wait_container_state(
            &crasher,
            cri::ContainerState::ContainerExited,
            Duration::from_secs(10),
        )
        .expect("crasher exits");
    assert_eq!(status.exit_code, 3);
    // The app replaces the image's /var/run -> /run symlink by a directory of its own. The
    // host's /run holds a canary that a restore following that symlink would touch.
    let canary = Path::new("/run").join(format!("podsnap-canary-{}", node.unique("c")));
    std::fs::write(&canary, b"host file").expect("canary");
    exec_ok(
        &node,
        &pod.app_id,
        "test -L /var/run && rm /var/run && mkdir /var/run && echo mine > /var/run/app.pid",
    );
    let before = mark_and_count(&pod);
    // The sidecar is paused (as `ctr task pause` does) when the pod is dumped.
    node.ctr()
        .run(CRI_NAMESPACE, &["task", "pause", &pod.sidecar_id])
        .expect("ctr task pause");

    // Dumped under a world-writable sticky directory of the root: it keeps its mode.
    let shared = node.files().checkpoints().join("shared");
    std::fs::create_dir_all(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let dir = shared.join("states");
    let request = dump_request(&node, &name, "default", Some(dir.clone()));
    block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Lines,
    ))
    .expect("podsnap dump");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(
        mode(&shared),
        0o1777,
        "the dump changed a directory it did not create"
    );
    assert_eq!(mode(&dir), 0o700);
    let m = verified(&node, &dir);
    let state = |n: &str| {
        let c = m.container(n).expect(n);
        (c.state.clone(), c.exit_code)
    };
    let stopped = "stopped".to_owned();
    assert_eq!(state("crasher"), (stopped.clone(), Some(3)));
    assert_eq!(state("sidecar"), ("paused".to_owned(), None));
    assert_eq!(state("init"), (stopped, Some(0)));
    remove_original(&node, &pod);

    // kubelet path: every container in its recorded state.
    let new_pod = run_pod(&node, &restore_annotated(&name, "default", "shared/states")).expect("sandbox");
    let exited_with = |pod: &KubePod, spec: &ContainerSpec| {
        let id = create_container(&node, pod, spec).expect("create");
        start_container(&node, &id).expect("start");
        node.cri()
            .wait_container_state(&id, cri::ContainerState::ContainerExited, Duration::from_secs(10))
            .expect("exited at once")
            .exit_code
    };
    let init_spec = ContainerSpec::workload("init", &["init", "--marker", "/data/init.log"])
        .with_empty_dir(DATA_VOLUME, DATA_MOUNT);
    assert_eq!(exited_with(&new_pod, &init_spec), 0);
    assert_eq!(
        exited_with(&new_pod, &crasher_spec),
        3,
        "the crash comes back as a crash"
    );
    let sidecar = run_container(&node, &new_pod, &sidecar_spec()).expect("sidecar restored");
    assert_eq!(
        node.ctr()
            .task_status(CRI_NAMESPACE, &sidecar)
            .expect("ctr task ls")
            .as_deref(),
        Some("PAUSED"),
        "the sidecar was paused at the checkpoint and comes back paused"
    );
    node.ctr()
        .run(CRI_NAMESPACE, &["task", "resume", &sidecar])
        .expect("ctr task resume");
    wait_answering(&new_pod.ip, SIDECAR_PORT, Duration::from_secs(20)).expect("sidecar answers");
    let count: u64 = ask(&new_pod.ip, SIDECAR_PORT, "count")
        .expect("count")
        .parse()
        .expect("n");
    assert!(count >= before.sidecar, "restored: {count} < {}", before.sidecar);
    let app = run_container(&node, &new_pod, &app_spec()).expect("app restored");
    wait_answering(&new_pod.ip, APP_PORT, Duration::from_secs(20)).expect("app answers");
    assert_eq!(
        exec_ok(
            &node,
            &app,
            "test -d /var/run && ! test -L /var/run && cat /var/run/app.pid"
        ),
        "mine",
        "the directory that replaced the image symlink is back as the container saw it"
    );
    assert_eq!(std::fs::read(&canary).expect("the host canary"), b"host file");
    let count: u64 = ask(&new_pod.ip, APP_PORT, "count")
        .expect("count")
        .parse()
        .expect("n");
    assert!(count >= before.app, "restored: {count} < {}", before.app);

    // kubelet restarts the app (attempt 1): it starts fresh from its image.
    node.cri()
        .stop_container(cri::StopContainerRequest {
            container_id: app.clone(),
            timeout: 0,
        })
        .expect("StopContainer app");
    let mut restart = app_spec();
    restart.attempt = 1;
    let fresh = run_container(&node, &new_pod, &restart).expect("attempt 1 starts");
    wait_answering(&new_pod.ip, APP_PORT, Duration::from_secs(20)).expect("fresh app answers");
    let count: u64 = ask(&new_pod.ip, APP_PORT, "count")
        .expect("count")
        .parse()
        .expect("n");
    assert!(
        count < before.app,
        "attempt 1 started fresh, not restored: {count}"
    );
    exec_ok(&node, &fresh, "test -L /var/run");

    // podsnap restore: the same states through the CLI.
    let restored = restore(&node, &restore_request(&node, &dir)).expect("podsnap restore");
    let names = |v: &[(String, String)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&restored.completed), ["init", "crasher"]);
    assert!(restored.left_created.is_empty());
    assert_eq!(names(&restored.containers), ["sidecar", "app"]);

    // A forged copy whose deletions reach through the image symlink into the host's /run.
    let forged = shared.join("forged");
    copy_checkpoint(&dir, &forged);
    let deletions = serde_json::json!({
        "deleted": [format!("var/run/{}", canary.file_name().and_then(|n| n.to_str()).expect("name"))],
        "opaque": [],
    });
    forge(
        &forged,
        "containers/app/rootfs-deleted.json",
        deletions.to_string().as_bytes(),
    );
    // A well-formed archive (owner, mode, time set, as a capture writes them), so that the
    // refusal is the deletion's and not the archive's.
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(4);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1);
    header.set_cksum();
    tar.append_data(&mut header, "tmp/forged", &b"evil"[..])
        .expect("tar");
    forge(
        &forged,
        "containers/app/rootfs-diff.tar",
        &tar.into_inner().expect("tar bytes"),
    );
    let hostile = run_pod(&node, &restore_annotated(&name, "default", "shared/forged")).expect("sandbox");
    let err = format!(
        "{:#}",
        run_container(&node, &hostile, &app_spec())
            .map(|id| format!("restored as {id}"))
            .expect_err("the forged deletion is refused")
    );
    let canary_name = canary.file_name().and_then(|n| n.to_str()).expect("name");
    assert!(
        err.contains(&format!(
            "deleted path var/run/{canary_name} passes through a symlink"
        )),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&canary).expect("the host canary survives a forged deletion"),
        b"host file"
    );
    // A checkpoint from a node this one cannot run (another architecture): refused by both
    // drivers, before anything is created, saying what differs.
    let foreign = shared.join("foreign");
    copy_checkpoint(&dir, &foreign);
    let path = foreign.join(MANIFEST);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("json");
    m["host"]["arch"] = serde_json::json!("riscv64");
    std::fs::write(&path, serde_json::to_vec_pretty(&m).expect("json")).expect("write");
    let count = sandboxes(&node);
    let err = format!(
        "{:#}",
        run_pod(&node, &restore_annotated(&name, "default", "shared/foreign")).expect_err("foreign")
    );
    assert!(
        err.contains("rule: compatibility") && err.contains("riscv64"),
        "{err}"
    );
    let err = restore(&node, &restore_request(&node, &foreign))
        .expect_err("foreign, CLI")
        .to_string();
    assert!(
        err.contains("rule: compatibility") && err.contains("riscv64"),
        "{err}"
    );
    assert_eq!(sandboxes(&node), count, "nothing created");

    // An unlisted file in a checkpoint: refused before anything is created.
    let unlisted = shared.join("unlisted");
    copy_checkpoint(&dir, &unlisted);
    std::fs::write(unlisted.join("containers/app/extra.img"), b"x").expect("write");
    let err = format!(
        "{:#}",
        run_pod(&node, &restore_annotated(&name, "default", "shared/unlisted")).expect_err("unlisted")
    );
    assert!(err.contains("extra.img is not listed"), "{err}");
    std::fs::remove_file(&canary).expect("remove the canary");
}

/// `podsnap restore` mounts a host path of the checkpoint again only where the node
/// configuration's `[restore] host_paths` allows it (the pod's own emptyDir and termination log
/// need no allowance: the restore makes them anew). A pod that mounted a host directory (a
/// hostPath volume) is refused, naming the directory, before anything is created: with no
/// prefix configured, and with one that matches only as a string (`.../host` for
/// `.../hostdata`). Copies whose spec reaches the directory through `..` or a symlink under an
/// allowed prefix are refused as well. Allowed, the pod comes back with the mount.
#[test]
fn a_cli_restore_mounts_again_only_the_host_paths_the_node_allows() {
    let node = start_node!();
    let name = node.unique("hostpath");
    let host = node.dir().join("hostdata");
    std::fs::create_dir_all(&host).expect("mkdir");
    std::fs::write(host.join("greeting"), "from the host").expect("write");
    let host = std::fs::canonicalize(&host).expect("the host directory");
    let pod = run_pod(&node, &PodOptions::new(&name, HANDLER)).expect("the pod runs");
    let app_id = run_container(&node, &pod, &app_spec().with_host_path(&host, "/host", true))
        .expect("the app runs with the host directory");
    wait_answering(&pod.ip, APP_PORT, Duration::from_secs(20)).expect("the app answers");
    assert_eq!(exec_ok(&node, &app_id, "cat /host/greeting"), "from the host");
    let dir = node.files().checkpoints().join("hostpath");
    let request = dump_request(&node, &name, "default", Some(dir.clone()));
    block_on(podsnap_coordinator::dump::dump(
        &request,
        &podsnap_coordinator::progress::Lines,
    ))
    .expect("podsnap dump");
    podsnap_tests::kubelet::remove_pod(&node, &pod).expect("the original pod removed");

    let pods = pods_dir(&node);
    let (count, pod_dirs) = (sandboxes(&node), names_in(&pods));
    let refused = |toml: &str, checkpoint: &Path| {
        let mut cli = restore_request(&node, checkpoint);
        cli.config = node.set_podsnap_config(toml).expect("config");
        let err = restore(&node, &cli)
            .map(|p| format!("restored as pod {}", p.id))
            .expect_err(&format!(
                "a host path the node does not allow ({toml:?}), restored"
            ))
            .to_string();
        assert!(
            err.contains(&host.display().to_string()) && err.contains("host_paths"),
            "{toml}: {err}"
        );
        assert_eq!(sandboxes(&node), count, "{toml}: a refused restore created a pod");
        assert_eq!(
            names_in(&pods),
            pod_dirs,
            "{toml}: a refused restore made a pod directory"
        );
    };
    refused("", &dir);
    let prefix = node.dir().join("host");
    refused(
        &format!("[restore]\nhost_paths = [\"{}\"]\n", prefix.display()),
        &dir,
    );
    // Forged copies: the mount's source rewritten to reach the directory from an allowed one.
    let allowed = node.dir().join("allowed");
    std::fs::create_dir_all(&allowed).expect("mkdir");
    std::os::unix::fs::symlink(&host, allowed.join("link")).expect("symlink");
    let only_allowed = format!("[restore]\nhost_paths = [\"{}\"]\n", allowed.display());
    for (copy, source) in [
        ("dotdot", allowed.join("../hostdata")),
        ("symlink", allowed.join("link")),
    ] {
        let forged = node.files().checkpoints().join(copy);
        copy_checkpoint(&dir, &forged);
        let rel = "containers/app/spec.dump";
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(forged.join(rel)).expect("the saved spec")).expect("json");
        let mounts = spec["mounts"].as_array_mut().expect("mounts");
        let mount = mounts
            .iter_mut()
            .find(|m| m["destination"] == "/host")
            .expect("the host mount in the saved spec");
        mount["source"] = serde_json::json!(source);
        forge(&forged, rel, &serde_json::to_vec_pretty(&spec).expect("json"));
        refused(&only_allowed, &forged);
    }

    // Allowed (a trailing slash is the same prefix): the pod comes back with the mount.
    let mut cli = restore_request(&node, &dir);
    cli.config = node
        .set_podsnap_config(&format!("[restore]\nhost_paths = [\"{}/\"]\n", host.display()))
        .expect("config");
    let restored = restore(&node, &cli).expect("podsnap restore, the host path allowed");
    let app = restored
        .containers
        .iter()
        .find(|(n, _)| n == "app")
        .map(|(_, id)| id.clone())
        .expect("the app restored");
    wait_answering(&restored.ip, APP_PORT, Duration::from_secs(20)).expect("the restored app answers");
    assert_eq!(exec_ok(&node, &app, "cat /host/greeting"), "from the host");
}
