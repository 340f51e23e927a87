//! Phase 5, adopted processes: each process the pod's pause process adopted is dumped by a
//! CRIU run of its own, once its container's run is over (both seize every task of the
//! container's cgroup), the pod still frozen. runc dumps only a container's init, so each goes
//! through a runc state of its own for the length of its dump: its container's, naming the
//! adopted process as init (runc then tells CRIU the container's mounts, namespaces and cgroup,
//! all of which the process shares). It was started in a session whose leader is gone, which
//! CRIU dumps only as a shell job; its images are then made to lead a session of their own (see
//! [`crate::criu::image::make_session_leader`]).

use std::time::Instant;

use podsnap_runtime::host::Host;
use podsnap_runtime::launcher::Limit;

use crate::criu::container::{self, Dump, DumpOptions};
use crate::error::{Error, Result};
use crate::failpoint::hold as hold_point;
use crate::format::manifest::{AdoptedProcess, MAX_JSON_BYTES, PART_NAMES};
use crate::fs::private::{create_private_dir, write_private};
use crate::fs::read::read_capped;
use crate::fs::remove::RemoveOnDrop;
use crate::pod::dump::checks::AdoptedRoot;
use crate::pod::dump::dumps::Dumped;
use crate::pod::dump::limits::check;
use crate::pod::target::Target;

/// Every process of the pod dumped, the pod still frozen.
pub(super) struct Captured {
    pub(super) dumped: Dumped,
    /// Processes the pause process adopted, dumped.
    pub(super) adopted: Vec<AdoptedProcess>,
    /// Containers linked by TCP over loopback.
    pub(super) loopback_linked: Vec<String>,
}

/// Dumps the adopted processes of the dumped pod `d`, and ends the frozen dump phases.
pub(super) async fn dump_adopted(mut d: Dumped) -> Result<Captured> {
    match adopted_and_linked(&mut d).await {
        Ok((adopted, loopback_linked)) => Ok(Captured {
            dumped: d,
            adopted,
            loopback_linked,
        }),
        Err(e) => {
            d.frozen.unwind().await;
            Err(e)
        }
    }
}

async fn adopted_and_linked(d: &mut Dumped) -> Result<(Vec<AdoptedProcess>, Vec<String>)> {
    let f = &mut d.frozen;
    let p = &f.held.planned;
    if p.req.serve.is_some() && !f.checked.adopted.is_empty() {
        return Err(crate::error::Error::Stopped {
            reason: "the pod's pause process adopted processes: they cannot be migrated live".into(),
        });
    }
    let pod_locked = p.req.netns.is_some() && p.req.lock_network;
    let adopted = dump_each(
        p.host.as_ref(),
        &f.held.staging.dir,
        &p.running,
        &f.checked.adopted,
        pod_locked,
        &p.limit,
    )
    .await?;
    let p = &mut f.held.planned;
    p.report.dumped = p.running.iter().map(|t| t.entry.name.clone()).collect();
    let loopback_linked = match f.checked.loopback.take() {
        Some(task) => task
            .await
            .map_err(|e| Error::io("list loopback connections", "pod", std::io::Error::other(e)))?,
        None => Default::default(),
    };
    p.report.slowest_dump = d.slowest;
    p.report.phases.mark("dumped");
    hold_point("dumped").await;
    check(&p.limit, p.req.deadline, "after the containers were dumped")?;
    Ok((adopted, loopback_linked.into_iter().collect()))
}

/// Dumps each process of `adopted` (a root in one of `running`, with its descendants) into
/// `containers/<name>/adopted/<pid>/` under `dir`, one at a time.
async fn dump_each(
    host: &dyn Host,
    dir: &std::path::Path,
    running: &[Target],
    adopted: &[AdoptedRoot],
    pod_locked: bool,
    limit: &Limit,
) -> Result<Vec<AdoptedProcess>> {
    let mut out = Vec::new();
    for a in adopted {
        let (t, pid) = (&running[a.container], &a.root);
        let record = AdoptedProcess {
            container: t.entry.name.clone(),
            pid: pid_in_namespace(host, *pid)?,
        };
        let images = dir.join(record.images(PART_NAMES));
        let fake = format!("{}-adopted-{}", t.entry.id, record.pid);
        let state = adopted_state(host, t, &fake, *pid, pod_locked)?;
        let began = Instant::now();
        let dumped = container::dump(
            &t.runc,
            &Dump {
                id: fake,
                image_dir: images.clone(),
                work_dir: None,
                options: DumpOptions {
                    tcp_established: true,
                    file_locks: true,
                    shell_job: true,
                    ..Default::default()
                },
                leave_running: true,
                cgroups: None,
                was_paused: true,
                limit: limit.clone(),
                netns: None,
                serve: None,
            },
        )
        .await;
        drop(state);
        dumped.map_err(|e| match e {
            Error::Dump { source, log_tail, .. } => Error::Dump {
                id: format!(
                    "pid {pid} adopted by the pod's pause process, of container {:?}",
                    t.entry.name
                ),
                source,
                log_tail,
            },
            other => other,
        })?;
        crate::criu::image::make_session_leader(&images)?;
        log::info!(
            "container {}: pid {pid} (pid {} in the pod), adopted by the pause process, dumped in {} ms",
            t.entry.name,
            record.pid,
            began.elapsed().as_millis()
        );
        out.push(record);
    }
    Ok(out)
}

/// Writes the runc state of an adopted process's dump (see [`dump_each`]) and its CRIU
/// configuration file; both are removed when the answer is dropped. Never `runc delete`d: that
/// would kill the container's cgroup.
fn adopted_state(host: &dyn Host, t: &Target, id: &str, pid: i32, pod_locked: bool) -> Result<RemoveOnDrop> {
    let source = t.runc.root().join(&t.entry.id).join("state.json");
    let bytes = read_capped(&source, MAX_JSON_BYTES)
        .map_err(|e| Error::io("read the container's runc state", &source, e))?;
    let mut state: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::io("read the container's runc state", &source, e.into()))?;
    let conf = t.bundle.join(format!("criu-adopted-{pid}.conf"));
    let dir = t.runc.root().join(id);
    let this = RemoveOnDrop(vec![dir.clone(), conf.clone()]);
    write_private(
        &conf,
        if pod_locked { "network-lock skip\n" } else { "" }.as_bytes(),
    )?;
    state["id"] = id.into();
    state["init_process_pid"] = pid.into();
    // As runc records its init's: `/proc/<pid>/stat`'s start time.
    let start = host.start_time(pid).ok_or_else(|| {
        Error::io(
            "read a process's start",
            format!("/proc/{pid}/stat"),
            std::io::Error::other("gone"),
        )
    })?;
    state["init_process_start"] = start.into();
    if let Some(labels) = state.pointer_mut("/config/labels").and_then(|l| l.as_array_mut()) {
        labels.retain(|l| !l.as_str().is_some_and(|l| l.starts_with("org.criu.config=")));
        labels.push(format!("org.criu.config={}", conf.display()).into());
    }
    create_private_dir(&dir)?;
    let json = serde_json::to_vec(&state).map_err(|e| Error::io("write a runc state", &dir, e.into()))?;
    write_private(&dir.join("state.json"), &json)?;
    Ok(this)
}

/// `pid` as its own PID namespace numbers it (the last of `NSpid` in its status).
fn pid_in_namespace(host: &dyn Host, pid: i32) -> Result<u32> {
    host.ns_pid(pid)
        .map_err(|e| Error::io("read a process's status", format!("/proc/{pid}/status"), e))
}
