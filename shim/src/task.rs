//! containerd's task API (v3) over ttrpc: a thin adapter. Each call maps its protobuf request to
//! a call on the pod (`convert.rs`), enters the pod's lifecycle gate where the call changes a
//! container, and maps the result back. What happens is `pod/`'s and `container/`'s.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::monitor::monitor_subscribe;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::monitor::{Subject, Topic};
use containerd_shim::protos::api;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::{TtrpcContext, TtrpcResult};

use crate::container::factory::RuncFactory;
use crate::convert;
use crate::events::Events;
use crate::pod::Pod;

/// The task service of one pod's shim.
#[derive(Clone)]
pub struct PodTask {
    pod: Arc<Pod>,
}

impl PodTask {
    pub fn new(namespace: String, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            pod: Arc::new(Pod::new(namespace, Arc::new(events), exit, Arc::new(RuncFactory))),
        }
    }

    /// Starts routing child exits to the pod's processes.
    pub async fn watch_exits(&self) {
        let mut sub = match monitor_subscribe(Topic::All).await {
            Ok(sub) => sub,
            Err(e) => {
                log::error!("cannot watch process exits: {e}");
                return;
            }
        };
        let pod = self.pod.clone();
        tokio::spawn(async move {
            while let Some(ev) = sub.rx.recv().await {
                if let Subject::Pid(pid) = ev.subject {
                    if let Some(p) = pod.exits().exited(pid, ev.exit_code) {
                        pod.process_exited(&p, ev.exit_code).await;
                    }
                }
            }
        });
    }
}

#[async_trait]
impl Task for PodTask {
    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let c = self.pod.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        Ok(convert::state_response(&c, &p, req.exec_id))
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let _pod = self.pod.gate.enter("Create", &req.id).await?;
        let pid = self
            .pod
            .create(convert::create_task(self.pod.namespace(), req))
            .await?;
        Ok(api::CreateTaskResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let _pod = self.pod.gate.enter("Start", &req.id).await?;
        let pid = self.pod.start(&req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let _pod = self.pod.gate.enter("Delete", &req.id).await?;
        let s = self.pod.delete(&req.id, &req.exec_id).await?;
        Ok(convert::delete_response(s))
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = self.pod.pids(&req.id).await?;
        Ok(convert::pids_response(pids)?)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.pod.gate.enter("Pause", &req.id).await?;
        self.pod.pause(&req.id, true).await?;
        Ok(api::Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.pod.gate.enter("Resume", &req.id).await?;
        self.pod.pause(&req.id, false).await?;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        // The gate is the pod's to enter: whole for a pod checkpoint, shared for a container's.
        let task = convert::checkpoint_task(&req);
        self.pod
            .checkpoint(&req.id, task, convert::request_deadline(ctx))
            .await?;
        Ok(api::Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.pod.gate.enter("Kill", &req.id).await?;
        self.pod.kill(convert::kill_task(req)).await?;
        Ok(api::Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.pod.gate.enter("Exec", &req.id).await?;
        self.pod.exec(convert::exec_task(req)).await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        self.pod
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)?;
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        self.pod.close_io(&req.id, &req.exec_id, req.stdin)?;
        Ok(api::Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let _pod = self.pod.gate.enter("Update", &req.id).await?;
        self.pod.update(convert::update_task(req)).await?;
        Ok(api::Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let s = self.pod.wait(&req.id, &req.exec_id).await?;
        Ok(convert::wait_response(s))
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let stats = self.pod.stats(&req.id).await?;
        Ok(convert::stats_response(&stats)?)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .pod
            .container(&req.id)
            .map(|c| c.init.state().pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        self.pod.shutdown(&req.id, req.now);
        Ok(api::Empty::new())
    }
}
