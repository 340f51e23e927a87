//! Pods made the way kubelet makes them.
//!
//! Kubelet (cgroupfs driver) sends RunPodSandbox with the pod's metadata, `io.kubernetes.pod.*`
//! labels, a log directory `/var/log/pods/<ns>_<name>_<uid>`, DNS, a linux security context with
//! pod-level network and IPC namespaces, and a cgroup parent `/kubepods/<qos>/pod<uid>`. For
//! each container it looks the image up (ImageStatus) and sends its id, mounts the volumes,
//! `/etc/hosts` and `/dev/termination-log`, sets `io.kubernetes.container.*` labels and
//! annotations, a log path `<name>/<restart count>.log`, BestEffort resources and the default
//! masked and read-only paths. We do the same, with the node directory standing in for
//! `/var/lib/kubelet` and `/var/log/pods`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1 as cri;
use tonic::Status;

use crate::node::{make_dir, make_file, Node};

/// Kubelet's default masked paths.
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// Kubelet's default read-only paths.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The volume name of the pods' shared emptyDir.
pub const DATA_VOLUME: &str = "data";
/// Where the shared emptyDir is mounted in containers.
pub const DATA_MOUNT: &str = "/data";
/// The sidecar's port in the three-container pod.
pub const SIDECAR_PORT: u16 = 9090;
/// The app's port in the three-container pod.
pub const APP_PORT: u16 = 8080;

/// A random pod uid in the usual 8-4-4-4-12 form.
pub fn new_uid() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut file) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut file, &mut bytes);
    }
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// What a pod is: name, namespace, handler, annotations.
#[derive(Debug, Clone)]
pub struct PodOptions {
    /// metadata.name.
    pub name: String,
    /// metadata.namespace.
    pub namespace: String,
    /// The RuntimeClass handler.
    pub handler: String,
    /// Pod labels (kubelet adds `io.kubernetes.pod.*`).
    pub labels: HashMap<String, String>,
    /// Pod annotations, e.g. `podsnap.io/...`.
    pub annotations: HashMap<String, String>,
    /// `shareProcessNamespace`: one PID namespace for the pod (its pause process is PID 1).
    pub share_process_namespace: bool,
    /// kubelet's cgroup driver is systemd's: the pod's cgroup parent is its slice
    /// (`kubepods-besteffort-pod<uid>.slice`) instead of `/kubepods/besteffort/pod<uid>`.
    /// [`run_pod`] sets it from the node.
    pub systemd_cgroups: bool,
}

impl PodOptions {
    /// A pod named `name` in namespace `default` run by `handler`.
    pub fn new(name: &str, handler: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: "default".to_owned(),
            handler: handler.to_owned(),
            labels: HashMap::from([("app".to_owned(), name.to_owned())]),
            annotations: HashMap::new(),
            share_process_namespace: false,
            systemd_cgroups: false,
        }
    }
}

/// A running pod sandbox and where kubelet keeps its files.
#[derive(Debug, Clone)]
pub struct KubePod {
    /// The sandbox id.
    pub id: String,
    /// metadata.uid.
    pub uid: String,
    /// metadata.name.
    pub name: String,
    /// metadata.namespace.
    pub namespace: String,
    /// The runtime handler.
    pub handler: String,
    /// The config sent with RunPodSandbox (and with every CreateContainer).
    pub config: cri::PodSandboxConfig,
    /// `<kubelet>/pods/<uid>`.
    pub pod_dir: PathBuf,
    /// `<kubelet>/logs/pods/<ns>_<name>_<uid>`.
    pub log_dir: PathBuf,
    /// The pod IP from CNI.
    pub ip: String,
    /// The pod's network namespace path.
    pub netns: Option<String>,
    /// Whether its cgroup parent is a systemd slice.
    pub systemd_cgroups: bool,
}

impl KubePod {
    /// The host directory of an emptyDir volume (created on first use).
    pub fn empty_dir(&self, volume: &str) -> Result<PathBuf> {
        let dir = self.pod_dir.join("volumes/kubernetes.io~empty-dir").join(volume);
        make_dir(&dir)?;
        Ok(dir)
    }

    /// The cgroup parent kubelet gives a BestEffort pod.
    pub fn cgroup_parent(&self) -> String {
        cgroup_parent(&self.uid, self.systemd_cgroups)
    }

    /// A container's log file (kubelet's `<log_dir>/<name>/<restart count>.log`).
    pub fn container_log(&self, container: &str) -> PathBuf {
        self.log_dir.join(container).join("0.log")
    }
}

/// The cgroup parent kubelet gives the BestEffort pod `uid`: with the cgroupfs driver
/// `/kubepods/besteffort/pod<uid>`, with the systemd driver the pod's slice
/// `kubepods-besteffort-pod<uid, dashes as underscores>.slice` (systemd nests it in
/// `kubepods.slice/kubepods-besteffort.slice`).
pub fn cgroup_parent(uid: &str, systemd: bool) -> String {
    if systemd {
        format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"))
    } else {
        format!("/kubepods/besteffort/pod{uid}")
    }
}

/// kubelet's namespace options: the pod's network and IPC; the PID namespace per container
/// unless the pod shares one.
fn namespace_options(share_pid: bool) -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: if share_pid {
            cri::NamespaceMode::Pod
        } else {
            cri::NamespaceMode::Container
        } as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn unconfined() -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile {
        profile_type: cri::security_profile::ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    })
}

/// The PodSandboxConfig kubelet sends for `options` with `uid`, logs under `log_dir`.
pub fn pod_sandbox_config(options: &PodOptions, uid: &str, log_dir: &str) -> cri::PodSandboxConfig {
    let mut labels = options.labels.clone();
    labels.insert("io.kubernetes.pod.name".into(), options.name.clone());
    labels.insert("io.kubernetes.pod.namespace".into(), options.namespace.clone());
    labels.insert("io.kubernetes.pod.uid".into(), uid.to_owned());
    let mut annotations = options.annotations.clone();
    annotations.insert("kubernetes.io/config.source".into(), "api".into());
    annotations.insert(
        "kubernetes.io/config.seen".into(),
        "2024-01-01T00:00:00.000000000Z".into(),
    );
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: options.name.clone(),
            uid: uid.to_owned(),
            namespace: options.namespace.clone(),
            attempt: 0,
        }),
        hostname: options.name.clone(),
        log_directory: log_dir.to_owned(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec![
                format!("{}.svc.cluster.local", options.namespace),
                "svc.cluster.local".into(),
                "cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: Vec::new(),
        labels,
        annotations,
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent(uid, options.systemd_cgroups),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options(options.share_process_namespace)),
                seccomp: unconfined(),
                ..Default::default()
            }),
            sysctls: HashMap::new(),
            ..Default::default()
        }),
        windows: None,
    }
}

/// RunPodSandbox as kubelet does it: pod and log directories first, then the call; records the
/// pod's uid and netns with the node so teardown removes them.
pub fn run_pod(node: &Node, options: &PodOptions) -> Result<KubePod> {
    let uid = new_uid();
    let kubelet = node.files().kubelet();
    let pod_dir = kubelet.join("pods").join(&uid);
    let log_dir = kubelet
        .join("logs/pods")
        .join(format!("{}_{}_{uid}", options.namespace, options.name));
    make_dir(&pod_dir)?;
    make_dir(&log_dir)?;
    make_file(
        &pod_dir.join("etc-hosts"),
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    )?;
    let mut options = options.clone();
    options.systemd_cgroups |= node.systemd_cgroups();
    let options = &options;
    let config = pod_sandbox_config(options, &uid, &log_dir.to_string_lossy());
    node.record_pod(&uid, None)?;
    let id = node
        .cri()
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: options.handler.clone(),
        })
        .map_err(|s| {
            anyhow::anyhow!(
                "RunPodSandbox {} ({}): {}",
                options.name,
                options.handler,
                s.message()
            )
        })?
        .pod_sandbox_id;
    let netns = node.cri().pod_netns(&id).ok().flatten();
    node.record_pod(&uid, netns.as_deref())?;
    let ip = node
        .cri()
        .pod_ip(&id)
        .map_err(|s| anyhow::anyhow!("PodSandboxStatus {id}: {}", s.message()))?;
    Ok(KubePod {
        id,
        uid,
        name: options.name.clone(),
        namespace: options.namespace.clone(),
        handler: options.handler.clone(),
        config,
        pod_dir,
        log_dir,
        ip,
        netns,
        systemd_cgroups: options.systemd_cgroups,
    })
}

/// One container of a pod spec.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// The container's name.
    pub name: String,
    /// The image, by name (kubelet resolves it to an id).
    pub image: String,
    /// `command` (replaces the image's entrypoint); empty keeps it.
    pub command: Vec<String>,
    /// `args` (replaces the image's cmd).
    pub args: Vec<String>,
    /// emptyDir volumes: (volume name, mount path).
    pub empty_dirs: Vec<(String, String)>,
    /// hostPath volumes: (host path, mount path, read-only).
    pub host_paths: Vec<(PathBuf, String, bool)>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// `securityContext.capabilities.add`.
    pub add_capabilities: Vec<String>,
    /// kubelet's attempt (restart count) of this container.
    pub attempt: u32,
    /// `resources.limits.memory` in bytes (0: none).
    pub memory_limit: i64,
}

impl ContainerSpec {
    /// A container `name` of the workload image with `args` to `podsnap-workload`.
    /// The workload serving on `port` as `name`, with `mib` MiB of memory written as
    /// `content` (`zero`, `random`, `mixed`: see the workload's `--ballast-content`).
    pub fn ballast(name: &str, port: u16, mib: &str, content: &str) -> Self {
        let port = port.to_string();
        Self::workload(
            name,
            &[
                "serve",
                "--name",
                name,
                "--port",
                &port,
                "--ballast-mib",
                mib,
                "--ballast-content",
                content,
            ],
        )
    }

    pub fn workload(name: &str, args: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            image: crate::WORKLOAD_IMAGE.to_owned(),
            command: Vec::new(),
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            empty_dirs: Vec::new(),
            host_paths: Vec::new(),
            env: Vec::new(),
            add_capabilities: Vec::new(),
            attempt: 0,
            memory_limit: 0,
        }
    }

    /// Replaces the image's entrypoint.
    pub fn with_command(mut self, command: &[&str]) -> Self {
        self.command = command.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Mounts the emptyDir `volume` at `path`.
    pub fn with_empty_dir(mut self, volume: &str, path: &str) -> Self {
        self.empty_dirs.push((volume.to_owned(), path.to_owned()));
        self
    }

    /// Mounts the host path `host` at `path` (a hostPath volume), read-only if `readonly`.
    pub fn with_host_path(mut self, host: &Path, path: &str, readonly: bool) -> Self {
        self.host_paths
            .push((host.to_path_buf(), path.to_owned(), readonly));
        self
    }
}

/// The image id kubelet puts in ContainerConfig (ImageStatus of the name).
pub fn image_id(node: &Node, image: &str) -> Result<String, Status> {
    let answer = node.cri().image_status(cri::ImageStatusRequest {
        image: Some(cri::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        verbose: false,
    })?;
    answer
        .image
        .map(|i| i.id)
        .ok_or_else(|| Status::not_found(format!("image {image} is not on the node")))
}

/// The ContainerConfig kubelet sends for `spec` in `pod`, with `image_ref` the image id.
pub fn container_config(
    pod: &KubePod,
    spec: &ContainerSpec,
    image_ref: &str,
) -> Result<cri::ContainerConfig> {
    let mut mounts = Vec::new();
    for (volume, path) in &spec.empty_dirs {
        mounts.push(cri::Mount {
            container_path: path.clone(),
            host_path: pod.empty_dir(volume)?.to_string_lossy().into_owned(),
            ..Default::default()
        });
    }
    for (host, path, readonly) in &spec.host_paths {
        mounts.push(cri::Mount {
            container_path: path.clone(),
            host_path: host.to_string_lossy().into_owned(),
            readonly: *readonly,
            ..Default::default()
        });
    }
    mounts.push(cri::Mount {
        container_path: "/etc/hosts".into(),
        host_path: pod.pod_dir.join("etc-hosts").to_string_lossy().into_owned(),
        ..Default::default()
    });
    let termination_log = pod
        .pod_dir
        .join("containers")
        .join(&spec.name)
        .join(&new_uid()[..8]);
    make_file(&termination_log, "")?;
    mounts.push(cri::Mount {
        container_path: "/dev/termination-log".into(),
        host_path: termination_log.to_string_lossy().into_owned(),
        ..Default::default()
    });
    make_dir(&pod.log_dir.join(&spec.name))?;

    let labels = HashMap::from([
        ("io.kubernetes.container.name".to_owned(), spec.name.clone()),
        ("io.kubernetes.pod.name".to_owned(), pod.name.clone()),
        ("io.kubernetes.pod.namespace".to_owned(), pod.namespace.clone()),
        ("io.kubernetes.pod.uid".to_owned(), pod.uid.clone()),
    ]);
    let annotations = HashMap::from([
        ("io.kubernetes.container.hash".to_owned(), "5f4f2f0e".to_owned()),
        (
            "io.kubernetes.container.restartCount".to_owned(),
            spec.attempt.to_string(),
        ),
        (
            "io.kubernetes.container.terminationMessagePath".to_owned(),
            "/dev/termination-log".to_owned(),
        ),
        (
            "io.kubernetes.container.terminationMessagePolicy".to_owned(),
            "File".to_owned(),
        ),
        (
            "io.kubernetes.pod.terminationGracePeriod".to_owned(),
            "30".to_owned(),
        ),
    ]);
    let mut envs = vec![
        cri::KeyValue {
            key: "KUBERNETES_SERVICE_HOST".into(),
            value: "10.96.0.1".into(),
        },
        cri::KeyValue {
            key: "KUBERNETES_SERVICE_PORT".into(),
            value: "443".into(),
        },
    ];
    envs.extend(spec.env.iter().map(|(key, value)| cri::KeyValue {
        key: key.clone(),
        value: value.clone(),
    }));
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: spec.name.clone(),
            attempt: spec.attempt,
        }),
        image: Some(cri::ImageSpec {
            image: image_ref.to_owned(),
            user_specified_image: spec.image.clone(),
            ..Default::default()
        }),
        command: spec.command.clone(),
        args: spec.args.clone(),
        working_dir: String::new(),
        envs,
        mounts,
        labels,
        annotations,
        log_path: format!("{}/0.log", spec.name),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 0,
                cpu_shares: 2,
                memory_limit_in_bytes: spec.memory_limit,
                oom_score_adj: 1000,
                ..Default::default()
            }),
            security_context: Some(cri::LinuxContainerSecurityContext {
                // The pod's, as kubelet passes them to each of its containers.
                namespace_options: pod
                    .config
                    .linux
                    .as_ref()
                    .and_then(|l| l.security_context.as_ref())
                    .and_then(|s| s.namespace_options.clone())
                    .or_else(|| Some(namespace_options(false))),
                masked_paths: MASKED_PATHS.iter().map(|s| (*s).to_owned()).collect(),
                readonly_paths: READONLY_PATHS.iter().map(|s| (*s).to_owned()).collect(),
                seccomp: unconfined(),
                capabilities: (!spec.add_capabilities.is_empty()).then(|| cri::Capability {
                    add_capabilities: spec.add_capabilities.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    })
}

/// CreateContainer as kubelet does it; returns the container id. A harness failure (a file it
/// could not make) comes back as an `internal` status saying so.
pub fn create_container(node: &Node, pod: &KubePod, spec: &ContainerSpec) -> Result<String, Status> {
    let image_ref = image_id(node, &spec.image)?;
    let config = container_config(pod, spec, &image_ref)
        .map_err(|e| Status::internal(format!("test harness: {e:#}")))?;
    Ok(node
        .cri()
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        })?
        .container_id)
}

/// StartContainer.
pub fn start_container(node: &Node, container_id: &str) -> Result<(), Status> {
    node.cri()
        .start_container(cri::StartContainerRequest {
            container_id: container_id.to_owned(),
        })
        .map(|_| ())
}

/// CreateContainer then StartContainer, with errors that name the container.
pub fn run_container(node: &Node, pod: &KubePod, spec: &ContainerSpec) -> Result<String> {
    let id = create_container(node, pod, spec)
        .map_err(|s| anyhow::anyhow!("CreateContainer {}: {}", spec.name, s.message()))?;
    start_container(node, &id)
        .map_err(|s| anyhow::anyhow!("StartContainer {} ({id}): {}", spec.name, s.message()))?;
    Ok(id)
}

/// The three-container pod every suite uses.
#[derive(Debug, Clone)]
pub struct ThreeContainerPod {
    /// The sandbox.
    pub pod: KubePod,
    /// The completed init container (`init --marker /data/init.log`), left exited.
    pub init_id: String,
    /// `serve --name sidecar --port 9090 --volume /data`.
    pub sidecar_id: String,
    /// `serve --name app --port 8080 --volume /data`.
    pub app_id: String,
    /// The shared emptyDir's host directory.
    pub volume: PathBuf,
}

impl ThreeContainerPod {
    /// (name, id) of each container in start order.
    pub fn containers(&self) -> [(&'static str, &str); 3] {
        [
            ("init", self.init_id.as_str()),
            ("sidecar", self.sidecar_id.as_str()),
            ("app", self.app_id.as_str()),
        ]
    }
}

/// The three-container pod's containers, in its spec's order: an init container writing a
/// marker in the emptyDir, a sidecar and an app serving on their ports and logging there.
pub fn three_container_specs() -> [ContainerSpec; 3] {
    let sidecar_port = SIDECAR_PORT.to_string();
    let app_port = APP_PORT.to_string();
    [
        ContainerSpec::workload("init", &["init", "--marker", "/data/init.log"])
            .with_empty_dir(DATA_VOLUME, DATA_MOUNT),
        ContainerSpec::workload(
            "sidecar",
            &[
                "serve",
                "--name",
                "sidecar",
                "--port",
                &sidecar_port,
                "--volume",
                DATA_MOUNT,
            ],
        )
        .with_empty_dir(DATA_VOLUME, DATA_MOUNT),
        ContainerSpec::workload(
            "app",
            &[
                "serve", "--name", "app", "--port", &app_port, "--volume", DATA_MOUNT,
            ],
        )
        .with_empty_dir(DATA_VOLUME, DATA_MOUNT),
    ]
}

/// Runs the three-container pod like kubelet: sandbox; init container to completion (exit 0
/// required, then left exited); sidecar; app; waits until both answer on the pod IP (a TCP
/// readiness probe from the host, as kubelet probes).
pub fn run_three_container_pod(node: &Node, options: &PodOptions) -> Result<ThreeContainerPod> {
    let pod = run_pod(node, options)?;
    let volume = pod.empty_dir(DATA_VOLUME)?;
    let [init, sidecar, app] = three_container_specs();
    let init_id = run_container(node, &pod, &init)?;
    let status = node.cri().wait_container_state(
        &init_id,
        cri::ContainerState::ContainerExited,
        Duration::from_secs(30),
    )?;
    if status.exit_code != 0 {
        bail!(
            "init container {init_id} exited with {} (reason {:?}, message {:?})",
            status.exit_code,
            status.reason,
            status.message
        );
    }
    let sidecar_id = run_container(node, &pod, &sidecar)?;
    let app_id = run_container(node, &pod, &app)?;
    if pod.ip.is_empty() {
        bail!("pod {} has no IP", pod.id);
    }
    for port in [SIDECAR_PORT, APP_PORT] {
        wait_answering(&pod.ip, port, Duration::from_secs(30))?;
    }
    Ok(ThreeContainerPod {
        pod,
        init_id,
        sidecar_id,
        app_id,
        volume,
    })
}

/// Sends one command line to a workload server at `ip:port` and returns its reply line.
pub fn ask(ip: &str, port: u16, command: &str) -> Result<String> {
    let address: SocketAddr = format!("{ip}:{port}")
        .parse()
        .with_context(|| format!("address {ip}:{port}"))?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .with_context(|| format!("reading {address}'s reply to {command:?}"))?;
    if reply.is_empty() {
        bail!("{address} closed the connection without answering {command:?}");
    }
    Ok(reply.trim_end().to_owned())
}

/// Waits until the server at `ip:port` answers `ping`.
pub fn wait_answering(ip: &str, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match ask(ip, port, "ping") {
            Ok(reply) if reply.starts_with("pong") => return Ok(()),
            Ok(reply) => bail!("{ip}:{port} answered ping with {reply:?}"),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{ip}:{port} not answering after {timeout:?}")))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Waits (at most `timeout`) until the `count` of the server at `ip:port` is above `above`,
/// and returns it: a process that runs on is seen to, however slow the machine, with no fixed
/// sleep.
pub fn wait_count_above(ip: &str, port: u16, above: u64, timeout: Duration) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = ask(ip, port, "count").and_then(|reply| {
            reply
                .parse::<u64>()
                .with_context(|| format!("{ip}:{port} answered count with {reply:?}"))
        });
        match last {
            Ok(n) if n > above => return Ok(n),
            Ok(n) if Instant::now() >= deadline => {
                bail!("{ip}:{port} counted {n}, not past {above}, after {timeout:?}")
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{ip}:{port} not counting past {above} after {timeout:?}")))
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Stops and removes a pod (StopPodSandbox, RemovePodSandbox), then removes its cgroups as
/// kubelet would.
pub fn remove_pod(node: &Node, pod: &KubePod) -> Result<()> {
    node.cri()
        .stop_and_remove_pod(&pod.id)
        .map_err(|s| anyhow::anyhow!("stopping/removing pod {}: {}", pod.id, s.message()))?;
    let failures = crate::host::remove_pod_cgroups(&pod.uid);
    if !failures.is_empty() {
        bail!("pod {} left cgroups: {failures:?}", pod.id);
    }
    Ok(())
}

/// One line of a CRI container log: `<RFC3339Nano time> <stdout|stderr> <F|P> <text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriLogLine {
    /// The timestamp as written.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `F` (full line) or `P` (partial).
    pub tag: String,
    /// The logged text.
    pub text: String,
}

/// Parses a CRI log line, checking the timestamp is RFC 3339 with fractional seconds.
pub fn parse_cri_log_line(line: &str) -> Result<CriLogLine> {
    let mut parts = line.splitn(4, ' ');
    let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("not a CRI log line: {line:?}");
    };
    let text = parts.next().unwrap_or_default();
    let bytes = time.as_bytes();
    let well_formed = bytes.len() >= 20
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes[10] == b'T'
        && bytes[13] == b':'
        && bytes[16] == b':'
        && bytes[19] == b'.'
        && (time.ends_with('Z') || time[19..].contains(['+', '-']))
        && time[..4].chars().all(|c| c.is_ascii_digit());
    if !well_formed {
        bail!("bad RFC3339Nano timestamp {time:?} in {line:?}");
    }
    if stream != "stdout" && stream != "stderr" {
        bail!("bad stream {stream:?} in {line:?}");
    }
    if tag != "F" && tag != "P" {
        bail!("bad tag {tag:?} in {line:?}");
    }
    Ok(CriLogLine {
        time: time.to_owned(),
        stream: stream.to_owned(),
        tag: tag.to_owned(),
        text: text.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines() {
        let line = parse_cri_log_line("2024-05-01T10:11:12.123456789Z stdout F app count 10")
            .expect("a CRI log line");
        assert_eq!(line.text, "app count 10");
        assert!(parse_cri_log_line("app count 10").is_err());
        assert!(parse_cri_log_line("2024-05-01T10:11:12.1+02:00 stderr P x").is_ok());
        assert_eq!(new_uid().len(), 36);
    }
}
