//! containerd's protobuf messages to our own types and back: the task requests (`pod::request`),
//! the answers (states, pids, stats), the events ([`TaskEvent`]) and timestamps. Nothing here
//! decides anything.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_shim::asynchronous::io::Stdio;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM,
    TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn};
use containerd_shim::protos::shim::oci::{CheckpointOptions, ProcessDetails};
use containerd_shim::protos::types::task::{ProcessInfo, Status as ApiStatus};
use containerd_shim::TtrpcContext;
use podsnap_runtime::cgroup::Stats;

use crate::container::Container;
use crate::error::{Error, Result};
use crate::events;
use crate::metrics;
use crate::options::runc_from_options;
use crate::pod::request::{CheckpointTask, CreateTask, ExecTask, KillTask, UpdateTask};
use crate::process::{Process, State, Status};
use crate::task_event::{Mount, TaskEvent, TaskIo};

pub fn create_task(namespace: &str, req: api::CreateTaskRequest) -> CreateTask {
    let (namespace, options) = (namespace.to_owned(), req.options.clone().into_option());
    CreateTask {
        runc: Box::new(move || runc_from_options(&namespace, options.as_ref())),
        stdio: Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        rootfs: req.rootfs.iter().map(mount_from).collect(),
        bundle: PathBuf::from(req.bundle),
        checkpoint: req.checkpoint,
        id: req.id,
    }
}

pub fn mount_from(m: &api::Mount) -> Mount {
    Mount {
        kind: m.type_.clone(),
        source: m.source.clone(),
        target: m.target.clone(),
        options: m.options.clone(),
    }
}

pub fn mount_to(m: &Mount) -> api::Mount {
    api::Mount {
        type_: m.kind.clone(),
        source: m.source.clone(),
        target: m.target.clone(),
        options: m.options.clone(),
        ..Default::default()
    }
}

/// A Checkpoint's options: runc's CheckpointOptions (or none); the image directory is runc's
/// `image_path` when given, else the request's `path`, and one of them must be.
pub fn checkpoint_task(req: &api::CheckpointTaskRequest) -> Result<CheckpointTask> {
    let opts = match req.options.as_ref() {
        Some(any) if any.type_url.ends_with("containerd.runc.v1.CheckpointOptions") => {
            CheckpointOptions::parse_from_bytes(&any.value)
                .map_err(|e| Error::InvalidArgument(format!("checkpoint options: {e}")))?
        }
        Some(any) if !any.type_url.is_empty() => {
            return Err(Error::InvalidArgument(format!(
                "checkpoint options of type {} are not runc CheckpointOptions",
                any.type_url
            )))
        }
        _ => CheckpointOptions::default(),
    };
    let image_dir = if opts.image_path.is_empty() {
        req.path.clone()
    } else {
        opts.image_path.clone()
    };
    if image_dir.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "checkpoint of {}: no image path given",
            req.id
        )));
    }
    Ok(CheckpointTask {
        image_dir,
        work_dir: (!opts.work_path.is_empty()).then(|| PathBuf::from(&opts.work_path)),
        exit: opts.exit,
        open_tcp: opts.open_tcp,
        external_unix_sockets: opts.external_unix_sockets,
        terminal: opts.terminal,
        file_locks: opts.file_locks,
        empty_namespaces: opts.empty_namespaces.clone(),
        cgroups_mode: opts.cgroups_mode.clone(),
    })
}

pub fn kill_task(req: api::KillRequest) -> KillTask {
    KillTask {
        id: req.id,
        exec_id: req.exec_id,
        signal: req.signal,
        all: req.all,
    }
}

pub fn exec_task(req: api::ExecProcessRequest) -> ExecTask {
    ExecTask {
        stdio: Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        spec: req.spec.as_ref().map(|a| a.value.clone()),
        id: req.id,
        exec_id: req.exec_id,
    }
}

pub fn update_task(req: api::UpdateTaskRequest) -> UpdateTask {
    UpdateTask {
        resources: req
            .resources
            .as_ref()
            .map(|a| (a.type_url.clone(), a.value.clone())),
        id: req.id,
    }
}

pub fn state_response(c: &Container, p: &Process, exec_id: String) -> api::StateResponse {
    let s = p.state();
    api::StateResponse {
        id: if exec_id.is_empty() {
            c.id.clone()
        } else {
            exec_id.clone()
        },
        bundle: c.bundle.path().display().to_string(),
        pid: s.pid as u32,
        status: api_status(s.status).into(),
        stdin: p.stdio.stdin.clone(),
        stdout: p.stdio.stdout.clone(),
        stderr: p.stdio.stderr.clone(),
        terminal: p.stdio.terminal,
        exit_status: s.exit_code,
        exited_at: s.exited_at.map(|t| timestamp(Some(t))).into(),
        exec_id,
        ..Default::default()
    }
}

pub fn delete_response(s: State) -> api::DeleteResponse {
    api::DeleteResponse {
        pid: s.pid as u32,
        exit_status: s.exit_code,
        exited_at: Some(timestamp(s.exited_at)).into(),
        ..Default::default()
    }
}

pub fn wait_response(s: State) -> api::WaitResponse {
    api::WaitResponse {
        exit_status: s.exit_code,
        exited_at: Some(timestamp(s.exited_at)).into(),
        ..Default::default()
    }
}

/// The processes of a container: pid, and the exec id of those that are execs.
pub fn pids_response(processes: Vec<(i32, Option<String>)>) -> Result<api::PidsResponse> {
    let mut out = Vec::with_capacity(processes.len());
    for (pid, exec_id) in processes {
        let mut info = ProcessInfo {
            pid: pid as u32,
            ..Default::default()
        };
        if let Some(exec_id) = exec_id {
            let details = ProcessDetails {
                exec_id,
                ..Default::default()
            };
            info.info = Some(to_any(&details)?).into();
        }
        out.push(info);
    }
    Ok(api::PidsResponse {
        processes: out,
        ..Default::default()
    })
}

pub fn stats_response(stats: &Stats) -> Result<api::StatsResponse> {
    let any = match stats {
        Stats::V1(s) => to_any(&metrics::v1(s))?,
        Stats::V2(s) => to_any(&metrics::v2(s))?,
    };
    Ok(api::StatsResponse {
        stats: Some(any).into(),
        ..Default::default()
    })
}

/// containerd's topic and message for an event.
pub fn event_message(event: TaskEvent) -> (&'static str, Box<dyn MessageDyn>) {
    match event {
        TaskEvent::Create {
            container_id,
            bundle,
            rootfs,
            io,
            checkpoint,
            pid,
        } => (
            events::CREATE,
            Box::new(TaskCreate {
                container_id,
                bundle,
                rootfs: rootfs.iter().map(mount_to).collect(),
                io: Some(TaskIO {
                    stdin: io.stdin,
                    stdout: io.stdout,
                    stderr: io.stderr,
                    terminal: io.terminal,
                    ..Default::default()
                })
                .into(),
                checkpoint,
                pid,
                ..Default::default()
            }),
        ),
        TaskEvent::Start { container_id, pid } => (
            events::START,
            Box::new(TaskStart {
                container_id,
                pid,
                ..Default::default()
            }),
        ),
        TaskEvent::Delete {
            container_id,
            pid,
            exit_status,
            exited_at,
        } => (
            events::DELETE,
            Box::new(TaskDelete {
                id: container_id.clone(),
                container_id,
                pid,
                exit_status,
                exited_at: Some(timestamp(exited_at)).into(),
                ..Default::default()
            }),
        ),
        TaskEvent::ExecAdded {
            container_id,
            exec_id,
        } => (
            events::EXEC_ADDED,
            Box::new(TaskExecAdded {
                container_id,
                exec_id,
                ..Default::default()
            }),
        ),
        TaskEvent::ExecStarted {
            container_id,
            exec_id,
            pid,
        } => (
            events::EXEC_STARTED,
            Box::new(TaskExecStarted {
                container_id,
                exec_id,
                pid,
                ..Default::default()
            }),
        ),
        TaskEvent::Exit {
            container_id,
            id,
            pid,
            exit_status,
            exited_at,
        } => (
            events::EXIT,
            Box::new(TaskExit {
                container_id,
                id,
                pid,
                exit_status,
                exited_at: Some(timestamp(exited_at)).into(),
                ..Default::default()
            }),
        ),
        TaskEvent::Paused { container_id } => (
            events::PAUSED,
            Box::new(TaskPaused {
                container_id,
                ..Default::default()
            }),
        ),
        TaskEvent::Resumed { container_id } => (
            events::RESUMED,
            Box::new(TaskResumed {
                container_id,
                ..Default::default()
            }),
        ),
        TaskEvent::Checkpointed {
            container_id,
            checkpoint,
        } => (
            events::CHECKPOINTED,
            Box::new(TaskCheckpointed {
                container_id,
                checkpoint,
                ..Default::default()
            }),
        ),
        TaskEvent::Oom { container_id } => (
            events::OOM,
            Box::new(TaskOOM {
                container_id,
                ..Default::default()
            }),
        ),
    }
}

/// The stdio paths of a Create, for its event.
pub fn task_io(s: &Stdio) -> TaskIo {
    TaskIo {
        stdin: s.stdin.clone(),
        stdout: s.stdout.clone(),
        stderr: s.stderr.clone(),
        terminal: s.terminal,
    }
}

pub fn api_status(s: Status) -> ApiStatus {
    match s {
        Status::Created => ApiStatus::CREATED,
        Status::Running => ApiStatus::RUNNING,
        Status::Paused => ApiStatus::PAUSED,
        Status::Stopped => ApiStatus::STOPPED,
    }
}

/// A protobuf timestamp; `None` is now.
pub fn timestamp(t: Option<SystemTime>) -> Timestamp {
    let d = t
        .unwrap_or_else(SystemTime::now)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

pub fn to_any(m: &dyn MessageDyn) -> Result<Any> {
    let mut any = Any::new();
    any.type_url = m.descriptor_dyn().full_name().to_string();
    any.value = m
        .write_to_bytes_dyn()
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(any)
}

/// What is left of the caller's deadline (ttrpc carries it as `timeout_nano`).
pub fn request_deadline(ctx: &TtrpcContext) -> Option<Duration> {
    (ctx.timeout_nano > 0).then(|| Duration::from_nanos(ctx.timeout_nano as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint_request(options: Option<Any>, path: &str) -> api::CheckpointTaskRequest {
        api::CheckpointTaskRequest {
            id: "c1".into(),
            path: path.into(),
            options: options.into(),
            ..Default::default()
        }
    }

    fn runc_options(o: CheckpointOptions) -> Option<Any> {
        let mut any = to_any(&o).expect("encode");
        any.type_url = format!("type.googleapis.com/{}", any.type_url);
        Some(any)
    }

    #[test]
    fn checkpoint_options_of_another_type_are_refused() {
        let any = Any {
            type_url: "example.com/Other".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        };
        let e = checkpoint_task(&checkpoint_request(Some(any), "/ckpt"))
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("checkpoint options of type example.com/Other are not runc CheckpointOptions"),
            "{e}"
        );
    }

    #[test]
    fn the_image_path_of_the_options_wins_over_the_request_path_and_one_is_needed() {
        let o = CheckpointOptions {
            image_path: "/images".into(),
            work_path: "/work".into(),
            exit: true,
            open_tcp: true,
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        let t = checkpoint_task(&checkpoint_request(runc_options(o), "/path")).expect("parsed");
        assert_eq!(t.image_dir, "/images");
        assert_eq!(t.work_dir, Some(PathBuf::from("/work")));
        assert!(t.exit && t.open_tcp && !t.file_locks);
        assert_eq!(t.empty_namespaces, vec!["network".to_owned()]);

        let t = checkpoint_task(&checkpoint_request(None, "/path")).expect("no options");
        assert_eq!((t.image_dir.as_str(), t.work_dir), ("/path", None));

        let e = checkpoint_task(&checkpoint_request(None, ""))
            .expect_err("no path")
            .to_string();
        assert!(e.contains("checkpoint of c1: no image path given"), "{e}");
    }

    #[test]
    fn mounts_and_create_events_survive_the_round_trip() {
        let api_mount = api::Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            target: "/t".into(),
            options: vec!["lowerdir=/a:/b".into(), "upperdir=/u".into()],
            ..Default::default()
        };
        let ours = mount_from(&api_mount);
        assert_eq!(ours.kind, "overlay");
        assert_eq!(mount_to(&ours), api_mount);

        let (topic, msg) = event_message(TaskEvent::Create {
            container_id: "c1".into(),
            bundle: "/b".into(),
            rootfs: vec![ours],
            io: TaskIo {
                stdout: "/out".into(),
                terminal: true,
                ..Default::default()
            },
            checkpoint: String::new(),
            pid: 42,
        });
        assert_eq!(topic, events::CREATE);
        let bytes = msg.write_to_bytes_dyn().expect("encode");
        let back = TaskCreate::parse_from_bytes(&bytes).expect("decode");
        assert_eq!((back.container_id.as_str(), back.pid), ("c1", 42));
        assert_eq!(back.rootfs, vec![api_mount]);
        assert_eq!(back.io.stdout, "/out");
        assert!(back.io.terminal);
    }

    #[test]
    fn an_exit_keeps_its_time_and_names_the_exec_or_the_container() {
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let (topic, msg) = event_message(TaskEvent::Exit {
            container_id: "c1".into(),
            id: "e1".into(),
            pid: 7,
            exit_status: 137,
            exited_at: Some(at),
        });
        assert_eq!(topic, events::EXIT);
        let back = TaskExit::parse_from_bytes(&msg.write_to_bytes_dyn().expect("encode")).expect("decode");
        assert_eq!((back.container_id.as_str(), back.id.as_str()), ("c1", "e1"));
        assert_eq!((back.pid, back.exit_status), (7, 137));
        assert_eq!((back.exited_at.seconds, back.exited_at.nanos), (1_700_000_000, 5));
    }

    #[test]
    fn statuses_and_pids_map_to_containerds() {
        assert_eq!(api_status(Status::Paused), ApiStatus::PAUSED);
        assert_eq!(api_status(Status::Stopped), ApiStatus::STOPPED);
        let r = pids_response(vec![(1, None), (9, Some("e1".into()))]).expect("pids");
        assert_eq!(r.processes.len(), 2);
        assert!(r.processes[0].info.is_none());
        let info = r.processes[1].info.as_ref().expect("exec details");
        let d = ProcessDetails::parse_from_bytes(&info.value).expect("details");
        assert_eq!(d.exec_id, "e1");
        assert!(info.type_url.ends_with("ProcessDetails"), "{}", info.type_url);
    }
}
