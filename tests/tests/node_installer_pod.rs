//! The installer as a pod: the node image built by `packaging/node-image.sh`, pushed to a local
//! registry, pulled through CRI and run on the private node the way the DaemonSet runs it
//! (its command and arguments from the rendered manifest, privileged, host PID and network, the
//! host root at /host, the node configuration from the ConfigMap). It installs podsnap into the
//! node; a podsnap pod then runs; stopping the installer (what deleting the DaemonSet does)
//! uninstalls it and the node is as it was.
//!
//! Two things differ from a cluster, both because there is no cluster here: the node's CRI
//! socket is named with CONTAINER_RUNTIME_ENDPOINT (the test configuration's gRPC address is a
//! path of the test node, not /run/containerd/...), and `--label-node` is left out (no API
//! server: the label's PATCH is unit-tested against fake HTTP and TLS servers), with
//! `--restart-command` added (no systemd runs here).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use podsnap_tests::cri::CriClient;
use podsnap_tests::host_node::{config_bytes, tree, ConfigStyle};
use podsnap_tests::kubelet::{
    container_config, new_uid, pod_sandbox_config, remove_pod, run_container, run_pod, wait_answering,
    ContainerSpec, KubePod, PodOptions, APP_PORT,
};
use podsnap_tests::node::{make_dir, make_file, Node, NodeOptions};
use podsnap_tests::registry::Registry;

const KUBECTL: &str = "/usr/local/lib/podsnap/kubectl/kubectl";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bins() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// The rendered DaemonSet and the ConfigMap's node configuration.
fn rendered() -> (serde_json::Value, String) {
    let output = Command::new(KUBECTL)
        .arg("kustomize")
        .arg(repo().join("packaging/deploy"))
        .output()
        .expect("kubectl kustomize (install-deps installs sid's kubectl)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("utf8");
    let objects: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(d).expect("yaml"))
                .expect("json")
        })
        .collect();
    let ds = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("a DaemonSet")
        .clone();
    let config = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap")
        .and_then(|o| o["data"]["config.toml"].as_str())
        .expect("the node configuration")
        .to_owned();
    (ds, config)
}

fn handler_served(node: &Node) -> Option<bool> {
    let cri = CriClient::connect(&node.endpoint()).ok()?;
    let status = cri.status(cri::StatusRequest { verbose: false }).ok()?;
    Some(status.runtime_handlers.iter().any(|h| h.name == "podsnap"))
}

fn wait_handler(node: &Node, served: bool, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while handler_served(node) != Some(served) {
        assert!(
            Instant::now() < deadline,
            "the handler is {} after 90 s; installer log:\n{}",
            if served { "not served" } else { "still served" },
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_installer_pod_installs_and_its_deletion_uninstalls() {
    let registry = Registry::start();
    let mut options = NodeOptions::new(PathBuf::from(env!("CARGO_BIN_EXE_podsnap-workload")));
    options.host_root = Some(ConfigStyle::V3);
    options.podsnap_shim = false;
    let mut node = Node::start(options);
    node.allow_registry(&registry.host()).expect("hosts.toml");
    let host_root = node.host_root();
    let config_before = config_bytes(node.files());
    let tree_before = tree(&host_root);

    // The image, as a release would build it (from the debug binaries here).
    let image = format!("{}/podsnap/node:test", registry.host());
    let built = Command::new("bash")
        .arg(repo().join("packaging/node-image.sh"))
        .arg("--binaries")
        .arg(bins())
        .arg("--insecure")
        .arg(&image)
        .output()
        .expect("packaging/node-image.sh");
    assert!(
        built.status.success(),
        "node-image.sh: {}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let pulled = node
        .cri()
        .pull_image(cri::PullImageRequest {
            image: Some(podsnap_coordinator::cri::image_spec(&image)),
            ..Default::default()
        })
        .expect("CRI PullImage of the node image from the registry")
        .image_ref;

    // The DaemonSet's pod: host network and PID, privileged.
    let (ds, node_config) = rendered();
    let pod_spec = &ds["spec"]["template"]["spec"];
    assert_eq!(pod_spec["hostPID"], true);
    assert_eq!(pod_spec["hostNetwork"], true);
    let container = &pod_spec["containers"][0];
    assert_eq!(container["securityContext"]["privileged"], true);
    let mut pod_options = PodOptions::new(&node.unique("podsnap-node"), "runc");
    pod_options.namespace = "podsnap-system".to_owned();
    let uid = new_uid();
    let kubelet = node.files().kubelet();
    let pod_dir = kubelet.join("pods").join(&uid);
    let log_dir = kubelet
        .join("logs/pods")
        .join(format!("podsnap-system_{}_{uid}", pod_options.name));
    make_dir(&pod_dir).expect("pod dir");
    make_dir(&log_dir).expect("log dir");
    make_file(&pod_dir.join("etc-hosts"), "127.0.0.1\tlocalhost\n").expect("hosts");
    let mut config = pod_sandbox_config(&pod_options, &uid, &log_dir.to_string_lossy());
    // kubelet sends no hostname for a host-network pod (it has the node's).
    config.hostname = String::new();
    if let Some(security) = config.linux.as_mut().and_then(|l| l.security_context.as_mut()) {
        security.privileged = true;
        let ns = security.namespace_options.get_or_insert_with(Default::default);
        ns.network = cri::NamespaceMode::Node as i32;
        ns.pid = cri::NamespaceMode::Node as i32;
    }
    node.record_pod(&uid, None).expect("ledger");
    let pod_id = node
        .cri()
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "runc".to_owned(),
        })
        .expect("RunPodSandbox of the installer")
        .pod_sandbox_id;
    let pod = KubePod {
        id: pod_id.clone(),
        uid: uid.clone(),
        name: pod_options.name.clone(),
        namespace: pod_options.namespace.clone(),
        handler: "runc".to_owned(),
        config: config.clone(),
        pod_dir: pod_dir.clone(),
        log_dir: log_dir.clone(),
        ip: String::new(),
        netns: None,
        systemd_cgroups: node.systemd_cgroups(),
    };

    // The container: the manifest's command and arguments (`--label-node` left out, the restart
    // command added: see the module header), its volumes at its mount paths.
    let command: Vec<String> = container["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect();
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .filter(|a| !a.starts_with("--label-node"))
        .collect();
    args.push(format!("--restart-command={}", node.restart_command()));
    let config_dir = node.dir().join("configmap");
    std::fs::create_dir_all(&config_dir).expect("configmap dir");
    std::fs::write(config_dir.join("config.toml"), &node_config).expect("config.toml");
    let mut spec = ContainerSpec::workload("installer", &[]);
    spec.image = image.clone();
    spec.command = command;
    spec.args = args;
    spec.env = vec![
        ("NODE_NAME".to_owned(), node.name().to_owned()),
        (
            "CONTAINER_RUNTIME_ENDPOINT".to_owned(),
            "unix:///host/run/containerd/containerd.sock".to_owned(),
        ),
    ];
    let mut ctr_config = container_config(&pod, &spec, &pulled).expect("container config");
    for mount in container["volumeMounts"].as_array().expect("mounts") {
        let (name, path) = (
            mount["name"].as_str().expect("name"),
            mount["mountPath"].as_str().expect("path"),
        );
        let (host_path, propagation, readonly) = match name {
            "host" => (
                host_root.clone(),
                cri::MountPropagation::PropagationHostToContainer,
                false,
            ),
            "node-config" => (
                config_dir.clone(),
                cri::MountPropagation::PropagationPrivate,
                true,
            ),
            other => panic!("the DaemonSet mounts a volume this test does not know: {other}"),
        };
        ctr_config.mounts.push(cri::Mount {
            container_path: path.to_owned(),
            host_path: host_path.display().to_string(),
            readonly,
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    if let Some(security) = ctr_config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
    {
        security.privileged = true;
        security.masked_paths.clear();
        security.readonly_paths.clear();
    }
    let installer = node
        .cri()
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.clone(),
            config: Some(ctr_config),
            sandbox_config: Some(config.clone()),
        })
        .expect("CreateContainer of the installer")
        .container_id;
    node.cri()
        .start_container(cri::StartContainerRequest {
            container_id: installer.clone(),
        })
        .expect("StartContainer of the installer");
    let log = log_dir.join("installer/0.log");

    // It installs: containerd restarted by it serves the handler; it waits.
    wait_handler(&node, true, &log);
    node.reconnect().expect("CRI after the install");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("waiting      for SIGTERM")
    {
        assert!(
            Instant::now() < deadline,
            "the installer does not wait: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let installed = std::fs::read_to_string(&log).unwrap_or_default();
    for path in [
        "usr/local/bin/containerd-shim-podsnap-v1",
        "usr/local/bin/podsnap",
        "opt/cni/bin/podsnap-cni-ipam",
        "etc/podsnap/containerd.toml",
        "etc/podsnap/installed.json",
    ] {
        assert!(
            host_root.join(path).is_file(),
            "{path} installed; log:\n{installed}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(host_root.join("etc/podsnap/config.toml")).expect("node config"),
        node_config,
        "the ConfigMap's node configuration"
    );
    // A pod of the handler runs on the shim the installer put there.
    let app_pod =
        run_pod(&node, &PodOptions::new(&node.unique("on-podsnap"), "podsnap")).expect("a podsnap pod");
    let port = APP_PORT.to_string();
    run_container(
        &node,
        &app_pod,
        &ContainerSpec::workload("app", &["serve", "--name", "app", "--port", &port]),
    )
    .expect("its container runs");
    wait_answering(&app_pod.ip, APP_PORT, Duration::from_secs(30)).expect("it answers");
    remove_pod(&node, &app_pod).expect("removed");

    // Deleting the pod: kubelet stops its container with the grace period (SIGTERM). The
    // installer restarts containerd during the call, which may then fail: wait for the exit.
    let grace = pod_spec["terminationGracePeriodSeconds"].as_i64().expect("grace");
    let _ = node.cri().stop_container(cri::StopContainerRequest {
        container_id: installer.clone(),
        timeout: grace,
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let exit = loop {
        let state = CriClient::connect(&node.endpoint())
            .ok()
            .and_then(|c| c.container(&installer).ok());
        if let Some(status) = state.filter(|s| s.state == cri::ContainerState::ContainerExited as i32) {
            break status.exit_code;
        }
        assert!(
            Instant::now() < deadline,
            "the installer did not exit after SIGTERM: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(exit, 0, "the installer's uninstall: {out}");
    assert!(out.contains("SIGTERM      uninstalling"), "{out}");
    wait_handler(&node, false, &log);
    node.reconnect().expect("CRI after the uninstall");
    assert_eq!(config_bytes(node.files()), config_before, "config.toml as before");
    assert_eq!(
        tree(&host_root),
        tree_before,
        "nothing of podsnap left on the host"
    );
    node.cri()
        .stop_and_remove_pod(&pod_id)
        .expect("the installer pod goes");
}
