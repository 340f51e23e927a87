//! Step 3: RunPodSandbox, then CreateContainer (and StartContainer) for each container in its
//! recorded order and state, as kubelet would.

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use podsnap_checkpoint::config::{KEEP_IP_ANNOTATION, LAZY_ANNOTATION};

use crate::cri::CriClients;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::spec::{sandbox_config, ContainerPlan};

/// CRI's runtime service client.
type RuntimeClient = k8s_cri::v1::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>;

use super::*;

/// (name, container id) pairs.
pub(super) type Named = Vec<(String, String)>;

/// What the CRI calls made.
pub(super) struct Created {
    pub(super) id: String,
    pub(super) restored: Named,
    pub(super) completed: Named,
    pub(super) left_created: Named,
    pub(super) ip: String,
}

/// The CRI calls, recording in `undo` everything made.
pub(super) async fn create(
    request: &RestoreRequest,
    plan: &Plan,
    checkpoint: &str,
    clients: &CriClients,
    undo: &mut Undo,
    progress: &dyn Progress,
) -> Result<Created> {
    let pod = &plan.pod;
    undo.cgroup = Some(pod.cgroup_dir());
    make_dir(&pod.pod_dir, 0o750, undo)?;
    make_dir(&pod.log_dir, 0o755, undo)?;
    let mut config = sandbox_config(
        &plan.manifest,
        plan.sandbox.as_ref(),
        &plan.namespaces,
        pod,
        checkpoint,
    );
    if request.keep_ip {
        config
            .annotations
            .insert(KEEP_IP_ANNOTATION.to_owned(), "true".to_owned());
    }
    if request.lazy {
        config
            .annotations
            .insert(LAZY_ANNOTATION.to_owned(), "true".to_owned());
    }
    progress.step(&format!(
        "creating pod {}/{} (uid {}) from checkpoint {checkpoint}",
        pod.namespace, pod.name, pod.uid
    ));
    let mut runtime = clients.runtime.clone();
    let id = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: request.handler.clone(),
        })
        .await
        .map_err(Error::cri(format!(
            "RunPodSandbox {}/{}",
            pod.namespace, pod.name
        )))?
        .into_inner()
        .pod_sandbox_id;
    undo.sandbox = Some(id.clone());
    log::info!("pod {}/{}: sandbox {id} created", pod.namespace, pod.name);
    if let Some(created) = &request.sandbox_created {
        created.send_replace(Some(id.clone()));
    }

    let mut started = Vec::new();
    let mut completed = Vec::new();
    let mut left_created = Vec::new();
    // Containers that completed or never started are made one after another in their recorded
    // order (completed ones answered at once, in order, as kubelet ran them). Those that ran
    // are created together, then their restores, the slow part, start together: they ran side
    // by side at the checkpoint, each comes back at that instant, and none waits for another
    // (a live migration's downtime counts every one of these calls).
    let mut to_create = Vec::new();
    for (c, then, _) in &plan.containers {
        progress.step(&match then {
            Then::Restore => format!("restoring container {}", c.name),
            Then::Exited(code) => format!(
                "recreating exited container {} (exit {code}, not run again)",
                c.name
            ),
            Then::LeaveCreated => format!("recreating container {} (never started)", c.name),
        });
        for dir in &c.empty_dirs {
            make_dir(dir, 0o777, undo)?;
        }
        for file in &c.files {
            if let Some(parent) = file.parent() {
                make_dir(parent, 0o750, undo)?;
            }
            std::fs::File::create(file).map_err(Error::io("create the termination log", file))?;
        }
        make_dir(&pod.log_dir.join(&c.name), 0o755, undo)?;
        match then {
            Then::Restore => to_create.push(c),
            Then::LeaveCreated => {
                let container_id = create_container(&mut runtime, &id, c, &config).await?;
                left_created.push((c.name.clone(), container_id));
            }
            Then::Exited(code) => {
                let container_id = create_container(&mut runtime, &id, c, &config).await?;
                runtime
                    .start_container(cri::StartContainerRequest {
                        container_id: container_id.clone(),
                    })
                    .await
                    .map_err(Error::cri(format!("StartContainer {}", c.name)))?;
                wait_exited(&mut runtime, &c.name, &container_id, *code).await?;
                completed.push((c.name.clone(), container_id));
            }
        }
    }
    let creations = to_create.iter().map(|c| {
        let (mut runtime, id, config) = (runtime.clone(), &id, &config);
        async move { create_container(&mut runtime, id, c, config).await }
    });
    let to_restore = futures::future::join_all(creations)
        .await
        .into_iter()
        .zip(&to_create)
        .map(|(created, c)| created.map(|container_id| (c.name.clone(), container_id)))
        .collect::<Result<Vec<_>>>()?;
    let starts = to_restore.iter().map(|(name, container_id)| {
        let mut runtime = runtime.clone();
        async move {
            runtime
                .start_container(cri::StartContainerRequest {
                    container_id: container_id.clone(),
                })
                .await
                .map_err(Error::cri(format!("StartContainer {name}")))
        }
    });
    let mut first_error = None;
    for ((name, container_id), result) in to_restore.iter().zip(futures::future::join_all(starts).await) {
        match result {
            Ok(_) => {
                log::info!(
                    "pod {}/{}: container {name} ({container_id}) restored",
                    pod.namespace,
                    pod.name
                );
                started.push((name.clone(), container_id.clone()));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let ip = runtime
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .map_err(Error::cri(format!("PodSandboxStatus {id}")))?
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .unwrap_or_default();
    Ok(Created {
        id,
        restored: started,
        completed,
        left_created,
        ip,
    })
}

/// CreateContainer of `c` in sandbox `sandbox`: its container id.
async fn create_container(
    runtime: &mut RuntimeClient,
    sandbox: &str,
    c: &ContainerPlan,
    sandbox_config: &cri::PodSandboxConfig,
) -> Result<String> {
    Ok(runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.to_owned(),
            config: Some(c.config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        })
        .await
        .map_err(Error::cri(format!("CreateContainer {}", c.name)))?
        .into_inner()
        .container_id)
}

/// How long a completed container may take to be reported exited.
pub(super) const COMPLETED_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until CRI reports a completed container exited with its recorded code (the shim
/// answers it at once, without running it).
pub(super) async fn wait_exited(runtime: &mut RuntimeClient, name: &str, id: &str, code: u32) -> Result<()> {
    let deadline = Instant::now() + COMPLETED_EXIT_TIMEOUT;
    loop {
        let status = runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(Error::cri(format!("ContainerStatus {name}")))?
            .into_inner()
            .status;
        if let Some(s) = status.filter(|s| s.state == cri::ContainerState::ContainerExited as i32) {
            if i64::from(s.exit_code) == i64::from(code) {
                return Ok(());
            }
            return Err(Error::Refused(format!(
                "container {name} had completed with exit code {code} but exited with {}",
                s.exit_code
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Refused(format!(
                "container {name} had completed before the checkpoint but did not exit within \
                 {COMPLETED_EXIT_TIMEOUT:?}: is the pod's runtime handler podsnap?"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
