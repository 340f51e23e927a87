//! CRI configs rebuilt from a checkpoint: the PodSandboxConfig and each ContainerConfig that
//! `podsnap restore` sends, derived from the manifest and the OCI specs saved at dump time
//! (`containers/<name>/config.json`), the way kubelet would have sent them for the new pod.
//!
//! What is kept: command (the whole `process.args`), environment, working directory, terminal,
//! user, resources, masked and read-only paths, seccomp (unconfined or the runtime default),
//! namespace modes, and bind mounts of host paths (listed in [`ContainerPlan::host_mounts`]: the
//! restore mounts them only where the node configuration allows, see
//! [`podsnap_checkpoint::trust::policy::check_host_path`]). What changes: the pod uid, the cgroup parent
//! (`/kubepods/besteffort/pod<uid>`, or `kubepods-besteffort-pod<uid>.slice` on a node with the
//! systemd cgroup driver), the log directory, and the pod's own files: emptyDir
//! volumes move to `<pods dir>/<uid>/volumes/kubernetes.io~empty-dir/<volume>` (created empty;
//! the shim fills them from the checkpoint) and the termination log gets a fresh file, as kubelet
//! makes one per container. What is dropped: the mounts CRI makes itself (`/etc/hosts`,
//! `/etc/hostname`, `/etc/resolv.conf`, `/dev/shm`, anything under containerd's own
//! directories) and the runtime's kernel filesystems (proc, sysfs, cgroup, devpts, mqueue).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use k8s_cri::v1 as cri;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use podsnap_checkpoint::format::layout::empty_dir_name;
use podsnap_checkpoint::format::manifest::Manifest;
use podsnap_runtime::cgroup::systemd;

/// The pod annotation that makes the shim restore the pod's containers.
pub use podsnap_checkpoint::config::RESTORE_ANNOTATION;
/// containerd's annotation with a container's image name.
pub const IMAGE_NAME_ANNOTATION: &str = "io.kubernetes.cri.image-name";
/// Where kubelet mounts the termination log unless the pod says otherwise.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// Mount destinations CRI fills in itself for every container of a pod.
pub const CRI_MANAGED: [&str; 4] = ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/dev/shm"];
/// Path fragment of containerd's own state and root directories (`io.containerd.grpc.v1.cri`).
const CONTAINERD_DIR_MARK: &str = "/io.containerd.";

/// The pod being created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// `<pods dir>/<uid>`.
    pub pod_dir: PathBuf,
    /// `<logs dir>/<namespace>_<name>_<uid>`.
    pub log_dir: PathBuf,
    /// The node's cgroup driver (CRI's RuntimeConfig), which names the pod's cgroup.
    pub cgroup_driver: CgroupDriver,
}

/// How the node names cgroups: kubelet's and containerd's cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupDriver {
    /// Paths: `/kubepods/besteffort/pod<uid>/<id>`.
    #[default]
    Cgroupfs,
    /// systemd units: `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`.
    Systemd,
}

impl NewPod {
    /// The pod's paths laid out like kubelet's.
    pub fn new(name: &str, namespace: &str, uid: &str, pods_dir: &Path, logs_dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            uid: uid.to_owned(),
            pod_dir: pods_dir.join(uid),
            log_dir: logs_dir.join(format!("{namespace}_{name}_{uid}")),
            cgroup_driver: CgroupDriver::default(),
        }
    }

    /// The host directory of emptyDir `volume`.
    pub fn empty_dir(&self, volume: &str) -> PathBuf {
        self.pod_dir.join("volumes/kubernetes.io~empty-dir").join(volume)
    }

    /// kubelet's cgroup parent for a BestEffort pod: `/kubepods/besteffort/pod<uid>` with the
    /// cgroupfs driver, `kubepods-besteffort-pod<uid, - as _>.slice` with the systemd driver
    /// (containerd then places each container at `<that slice>:cri-containerd:<id>`).
    pub fn cgroup_parent(&self) -> String {
        match self.cgroup_driver {
            CgroupDriver::Cgroupfs => format!("/kubepods/besteffort/pod{}", self.uid),
            CgroupDriver::Systemd => systemd::besteffort_pod_slice(&self.uid),
        }
    }

    /// The pod's cgroup directory relative to each hierarchy's root.
    pub fn cgroup_dir(&self) -> PathBuf {
        match self.cgroup_driver {
            CgroupDriver::Cgroupfs => PathBuf::from(format!("kubepods/besteffort/pod{}", self.uid)),
            CgroupDriver::Systemd => systemd::expand_slice(&self.cgroup_parent()).unwrap_or_default(),
        }
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            ("io.kubernetes.pod.name".to_owned(), self.name.clone()),
            ("io.kubernetes.pod.namespace".to_owned(), self.namespace.clone()),
            ("io.kubernetes.pod.uid".to_owned(), self.uid.clone()),
        ])
    }
}

/// One container to create and start, with the host paths it needs made first.
#[derive(Debug, Clone)]
pub struct ContainerPlan {
    pub name: String,
    /// The image name (must be on the node).
    pub image: String,
    pub config: cri::ContainerConfig,
    /// EmptyDir directories to create (empty) before CreateContainer.
    pub empty_dirs: Vec<PathBuf>,
    /// Empty files to create before CreateContainer (the termination log).
    pub files: Vec<PathBuf>,
    /// Indices in `config.mounts` of the bind mounts of host paths the checkpointed spec names
    /// (not the pod's own emptyDir volumes and termination log, which the restore makes).
    pub host_mounts: Vec<usize>,
}

/// The pod's namespace modes from the saved specs: network and IPC from the sandbox (a
/// namespace of its own means `POD`, none means the node's), PID from the containers (a path
/// to the sandbox's means `POD`, its own means `CONTAINER`, none means the node's).
pub fn namespace_options(sandbox: Option<&Spec>, containers: &[&Spec]) -> cri::NamespaceOption {
    let has = |spec: Option<&Spec>, kind: LinuxNamespaceType| {
        spec.and_then(|s| s.linux().as_ref())
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|n| n.iter().find(|ns| ns.typ() == kind))
            .map(|ns| ns.path().is_some())
    };
    let mode = |present: Option<bool>| match present {
        Some(_) => cri::NamespaceMode::Pod as i32,
        None => cri::NamespaceMode::Node as i32,
    };
    let pid = match containers.first() {
        None => cri::NamespaceMode::Container as i32,
        Some(spec) => match has(Some(spec), LinuxNamespaceType::Pid) {
            Some(true) => cri::NamespaceMode::Pod as i32,
            Some(false) => cri::NamespaceMode::Container as i32,
            None => cri::NamespaceMode::Node as i32,
        },
    };
    cri::NamespaceOption {
        network: if sandbox.is_some() {
            mode(has(sandbox, LinuxNamespaceType::Network))
        } else {
            cri::NamespaceMode::Pod as i32
        },
        pid,
        ipc: if sandbox.is_some() {
            mode(has(sandbox, LinuxNamespaceType::Ipc))
        } else {
            cri::NamespaceMode::Pod as i32
        },
        ..Default::default()
    }
}

/// Unconfined unless the saved spec carried a seccomp filter (then the runtime's default).
fn seccomp_of(spec: Option<&Spec>) -> Option<cri::SecurityProfile> {
    let filtered = spec
        .and_then(|s| s.linux().as_ref())
        .is_some_and(|l| l.seccomp().is_some());
    let profile_type = if filtered {
        cri::security_profile::ProfileType::RuntimeDefault
    } else {
        cri::security_profile::ProfileType::Unconfined
    };
    Some(cri::SecurityProfile {
        profile_type: profile_type as i32,
        localhost_ref: String::new(),
    })
}

/// The PodSandboxConfig of the new pod: the saved pod annotations (but containerd's own
/// `io.kubernetes.cri.*`), the restore annotation naming `checkpoint`, kubelet's labels, log
/// directory and cgroup parent, the saved hostname and sysctls.
pub fn sandbox_config(
    manifest: &Manifest,
    sandbox: Option<&Spec>,
    namespaces: &cri::NamespaceOption,
    pod: &NewPod,
    checkpoint: &str,
) -> cri::PodSandboxConfig {
    let mut annotations: HashMap<String, String> = manifest
        .pod
        .annotations
        .iter()
        .filter(|(k, _)| !k.starts_with("io.kubernetes.cri."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert(RESTORE_ANNOTATION.to_owned(), checkpoint.to_owned());
    let hostname = sandbox
        .and_then(|s| s.hostname().clone())
        .or_else(|| manifest.pod.hostname.clone())
        .filter(|h| !h.is_empty() && manifest.pod.name.as_deref() == Some(pod.name.as_str()))
        .unwrap_or_else(|| pod.name.clone());
    let sysctls = sandbox
        .and_then(|s| s.linux().as_ref())
        .and_then(|l| l.sysctl().clone())
        .unwrap_or_default();
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            namespace: pod.namespace.clone(),
            attempt: 0,
        }),
        hostname,
        log_directory: pod.log_dir.to_string_lossy().into_owned(),
        labels: pod.labels(),
        annotations,
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: pod.cgroup_parent(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces.clone()),
                seccomp: seccomp_of(sandbox),
                ..Default::default()
            }),
            sysctls,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The ContainerConfig of container `name` from its saved spec.
pub fn container_plan(
    name: &str,
    spec: &Spec,
    recorded_image: Option<&str>,
    namespaces: &cri::NamespaceOption,
    pod: &NewPod,
    termination_log_id: &str,
) -> Result<ContainerPlan, String> {
    let annotations = spec.annotations().clone().unwrap_or_default();
    let image = annotations
        .get(IMAGE_NAME_ANNOTATION)
        .map(String::as_str)
        .or(recorded_image)
        .filter(|i| !i.is_empty())
        .ok_or_else(|| format!("container {name}: its saved spec names no image ({IMAGE_NAME_ANNOTATION})"))?
        .to_owned();
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| format!("container {name}: its saved spec has no process"))?;
    let command = process.args().clone().unwrap_or_default();
    if command.is_empty() {
        return Err(format!("container {name}: its saved spec has no command"));
    }
    let envs = process
        .env()
        .iter()
        .flatten()
        .filter_map(|kv| kv.split_once('='))
        .map(|(key, value)| cri::KeyValue {
            key: key.to_owned(),
            value: value.to_owned(),
        })
        .collect();

    let mut mounts = Vec::new();
    let mut empty_dirs = Vec::new();
    let mut files = Vec::new();
    let mut host_mounts = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let options = m.options().clone().unwrap_or_default();
        let is_bind =
            m.typ().as_deref() == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind");
        let Some(source) = m.source().as_ref().filter(|_| is_bind) else {
            continue; // proc, sysfs, tmpfs, cgroup...: the runtime's own
        };
        let destination = m.destination().to_string_lossy().into_owned();
        let source_text = source.to_string_lossy();
        if CRI_MANAGED.contains(&destination.as_str()) || source_text.contains(CONTAINERD_DIR_MARK) {
            continue;
        }
        let host_path = if let Some(volume) = empty_dir_name(&source_text) {
            let dir = pod.empty_dir(volume);
            empty_dirs.push(dir.clone());
            dir
        } else if destination == TERMINATION_LOG {
            let file = pod.pod_dir.join("containers").join(name).join(termination_log_id);
            files.push(file.clone());
            file
        } else {
            host_mounts.push(mounts.len());
            source.clone()
        };
        let propagation = if options.iter().any(|o| o == "rshared" || o == "shared") {
            cri::MountPropagation::PropagationBidirectional
        } else if options.iter().any(|o| o == "rslave" || o == "slave") {
            cri::MountPropagation::PropagationHostToContainer
        } else {
            cri::MountPropagation::PropagationPrivate
        };
        mounts.push(cri::Mount {
            container_path: destination,
            host_path: host_path.to_string_lossy().into_owned(),
            readonly: options.iter().any(|o| o == "ro"),
            propagation: propagation as i32,
            ..Default::default()
        });
    }

    let linux = spec.linux().as_ref();
    let resources = linux.and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let memory = resources.and_then(|r| r.memory().as_ref());
    let to_i64 = |v: Option<u64>| v.and_then(|v| i64::try_from(v).ok()).unwrap_or(0);
    let user = process.user();
    let mut labels = pod.labels();
    labels.insert("io.kubernetes.container.name".to_owned(), name.to_owned());
    // Pod annotations reach containers through the sandbox; containerd's own are its business.
    let container_annotations = annotations
        .into_iter()
        .filter(|(k, _)| !k.starts_with("io.kubernetes.cri.") && !k.starts_with("podsnap.io/"))
        .collect();
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.clone(),
            user_specified_image: image.clone(),
            ..Default::default()
        }),
        command,
        args: Vec::new(),
        working_dir: process.cwd().to_string_lossy().into_owned(),
        envs,
        mounts,
        labels,
        annotations: container_annotations,
        log_path: format!("{name}/0.log"),
        tty: process.terminal().unwrap_or(false),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(cri::LinuxContainerResources {
                cpu_period: to_i64(cpu.and_then(|c| c.period())),
                cpu_quota: cpu.and_then(|c| c.quota()).unwrap_or(0),
                cpu_shares: to_i64(cpu.and_then(|c| c.shares())),
                memory_limit_in_bytes: memory.and_then(|m| m.limit()).unwrap_or(0),
                oom_score_adj: i64::from(process.oom_score_adj().unwrap_or(0)),
                ..Default::default()
            }),
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces.clone()),
                run_as_user: Some(cri::Int64Value {
                    value: i64::from(user.uid()),
                }),
                run_as_group: Some(cri::Int64Value {
                    value: i64::from(user.gid()),
                }),
                masked_paths: linux.and_then(|l| l.masked_paths().clone()).unwrap_or_default(),
                readonly_paths: linux.and_then(|l| l.readonly_paths().clone()).unwrap_or_default(),
                seccomp: seccomp_of(Some(spec)),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    Ok(ContainerPlan {
        name: name.to_owned(),
        image,
        config,
        empty_dirs,
        files,
        host_mounts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).expect("a valid OCI spec")
    }

    fn app_spec() -> Spec {
        spec(serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": ["/usr/local/bin/podsnap-workload", "serve", "--name", "app"],
                "env": ["PATH=/bin", "KUBERNETES_SERVICE_HOST=10.96.0.1"],
                "cwd": "/",
                "oomScoreAdj": 1000
            },
            "root": {"path": "rootfs"},
            "hostname": "web",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind",
                 "source": "/var/lib/kubelet/pods/old/volumes/kubernetes.io~empty-dir/data",
                 "options": ["rbind", "rprivate", "rw"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/kubelet/pods/old/etc-hosts",
                 "options": ["rbind", "rw"]},
                {"destination": "/dev/termination-log", "type": "bind",
                 "source": "/var/lib/kubelet/pods/old/containers/app/abc", "options": ["rbind", "rw"]},
                {"destination": "/etc/hostname", "type": "bind",
                 "source": "/var/lib/containerd/io.containerd.grpc.v1.cri/sandboxes/x/hostname",
                 "options": ["rbind", "rw"]},
                {"destination": "/config", "type": "bind", "source": "/srv/config",
                 "options": ["rbind", "rslave", "ro"]}
            ],
            "annotations": {
                "io.kubernetes.cri.image-name": "localhost/podsnap/workload:1",
                "io.kubernetes.cri.container-name": "app",
                "podsnap.io/restore-from": "old"
            },
            "linux": {
                "resources": {"cpu": {"shares": 2, "period": 100000}},
                "namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/1/ns/ipc"},
                               {"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "mount"}],
                "maskedPaths": ["/proc/kcore"],
                "readonlyPaths": ["/proc/sys"]
            }
        }))
    }

    fn new_pod() -> NewPod {
        NewPod::new("web", "default", "u-1", Path::new("/pods"), Path::new("/logs"))
    }

    #[test]
    fn containers_come_back_with_their_command_mounts_and_new_pod_paths() {
        let pod = new_pod();
        let ns = namespace_options(None, &[&app_spec()]);
        assert_eq!(ns.pid, cri::NamespaceMode::Container as i32);
        let plan = container_plan("app", &app_spec(), None, &ns, &pod, "t1").expect("a plan");
        assert_eq!(plan.image, "localhost/podsnap/workload:1");
        let c = &plan.config;
        assert_eq!(c.command[1], "serve");
        assert!(c.args.is_empty());
        assert!(c
            .envs
            .iter()
            .any(|e| e.key == "KUBERNETES_SERVICE_HOST" && e.value == "10.96.0.1"));
        let mounts: Vec<(&str, &str, bool)> = c
            .mounts
            .iter()
            .map(|m| (m.container_path.as_str(), m.host_path.as_str(), m.readonly))
            .collect();
        assert_eq!(
            mounts,
            [
                ("/data", "/pods/u-1/volumes/kubernetes.io~empty-dir/data", false),
                ("/dev/termination-log", "/pods/u-1/containers/app/t1", false),
                ("/config", "/srv/config", true),
            ]
        );
        assert_eq!(
            c.mounts[2].propagation,
            cri::MountPropagation::PropagationHostToContainer as i32
        );
        assert_eq!(
            plan.empty_dirs,
            [PathBuf::from("/pods/u-1/volumes/kubernetes.io~empty-dir/data")]
        );
        assert_eq!(plan.files, [PathBuf::from("/pods/u-1/containers/app/t1")]);
        assert_eq!(
            plan.host_mounts,
            [2],
            "only /srv/config is a host path of the checkpoint"
        );
        assert!(c.annotations.is_empty(), "{:?}", c.annotations);
        assert_eq!(c.labels["io.kubernetes.pod.uid"], "u-1");
        assert_eq!(c.labels["io.kubernetes.container.name"], "app");
        let linux = c.linux.as_ref().expect("linux");
        let res = linux.resources.as_ref().expect("resources");
        assert_eq!(
            (res.cpu_shares, res.cpu_period, res.oom_score_adj),
            (2, 100_000, 1000)
        );
        let sc = linux.security_context.as_ref().expect("security context");
        assert_eq!(sc.masked_paths, ["/proc/kcore"]);
        assert_eq!(
            sc.seccomp.as_ref().map(|s| s.profile_type),
            Some(cri::security_profile::ProfileType::Unconfined as i32)
        );
    }

    #[test]
    fn a_spec_without_image_or_command_is_refused() {
        let pod = new_pod();
        let ns = namespace_options(None, &[]);
        let bare = spec(
            serde_json::json!({"ociVersion": "1.1.0", "root": {"path": "rootfs"},
            "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "args": ["x"]}}),
        );
        let err = container_plan("c", &bare, None, &ns, &pod, "t").expect_err("no image");
        assert!(err.contains("names no image"), "{err}");
        assert!(container_plan("c", &bare, Some("img"), &ns, &pod, "t").is_ok());
    }

    #[test]
    fn the_sandbox_keeps_pod_annotations_but_containerds() {
        let mut manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format": podsnap_checkpoint::format::manifest::FORMAT,
            "version": podsnap_checkpoint::format::manifest::VERSION,
            "created_unix": 1,
            "pod": {"sandbox_id": "sb", "name": "web", "namespace": "default", "uid": "old",
                    "hostname": "web", "annotations": {}},
            "host": {"criu_version": "", "runc_version": "", "kernel": "", "arch": ""},
            "tcp_established": false, "containers": [], "volumes": [], "files": {},
            "digest_algorithm": "blake3"
        }))
        .expect("a manifest");
        manifest
            .pod
            .annotations
            .insert("io.kubernetes.cri.sandbox-id".into(), "sb".into());
        manifest
            .pod
            .annotations
            .insert("podsnap.io/other".into(), "x".into());
        manifest
            .pod
            .annotations
            .insert(RESTORE_ANNOTATION.into(), "older".into());
        let pod = new_pod();
        let sandbox = spec(
            serde_json::json!({"ociVersion": "1.1.0", "root": {"path": "rootfs"},
            "hostname": "web",
            "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/x"}, {"type": "ipc"}]}}),
        );
        let ns = namespace_options(Some(&sandbox), &[&app_spec()]);
        assert_eq!(ns.network, cri::NamespaceMode::Pod as i32);
        let config = sandbox_config(&manifest, Some(&sandbox), &ns, &pod, "default-web-1");
        assert_eq!(config.annotations.len(), 2, "{:?}", config.annotations);
        assert_eq!(config.annotations[RESTORE_ANNOTATION], "default-web-1");
        assert_eq!(config.hostname, "web");
        assert_eq!(config.log_directory, "/logs/default_web_u-1");
        assert_eq!(
            config.linux.as_ref().map(|l| l.cgroup_parent.as_str()),
            Some("/kubepods/besteffort/podu-1")
        );
        let metadata = config.metadata.expect("metadata");
        assert_eq!((metadata.name.as_str(), metadata.uid.as_str()), ("web", "u-1"));
        assert_eq!(pod.cgroup_dir(), Path::new("kubepods/besteffort/podu-1"));
        // A node with the systemd cgroup driver: kubelet's slice, nested by its dashes.
        let mut pod = new_pod();
        pod.cgroup_driver = CgroupDriver::Systemd;
        let config = sandbox_config(&manifest, Some(&sandbox), &ns, &pod, "default-web-1");
        assert_eq!(
            config.linux.as_ref().map(|l| l.cgroup_parent.as_str()),
            Some("kubepods-besteffort-podu_1.slice")
        );
        assert_eq!(
            pod.cgroup_dir(),
            Path::new("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu_1.slice")
        );
    }
}
