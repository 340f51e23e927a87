//! Phase 7, finish: the specs, KEP-2008 metadata, the part announcements, the digests (early
//! ones from the prehash, the rest on every core) and the manifest last, while the network is
//! unlocked beside; then the commit (the staging directory renamed into place) and the seal.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::failpoint::hold as hold_point;
use crate::format::manifest::{
    ContainerEntry, DigestAlgorithm, DumpStats, FileDigest, Manifest, PodInfo, UnixLink, BASE_VERSION,
    FORMAT, MANIFEST, PART_NAMES, VERSION,
};
use crate::format::record::Role;
use crate::fs::private::{write_private, write_synced};
use crate::pod::dump::beside::Recorded;
use crate::pod::dump::criu_configs::without_own_criu_config;
use crate::pod::dump::digests::digest_tree;
use crate::pod::dump::hold::Held;
use crate::pod::dump::journal::{Journal, Phase};
use crate::pod::dump::kep::write_kep_metadata;
use crate::pod::dump::limits::check;
use crate::pod::dump::parts::announce_parts;
use crate::pod::dump::plan::Planned;
use crate::pod::dump::prehash::Prehash;
use crate::pod::dump::resume::{Contents, Thawed};
use crate::pod::dump::staging::Staging;
use crate::pod::dump::DumpReport;

/// Finishes the thawed dump `t`: the checkpoint written, committed and sealed.
pub(super) async fn finish(t: Thawed) -> Result<DumpReport> {
    let Thawed {
        held,
        contents,
        frozen_for,
    } = t;
    let Held {
        mut runs,
        configs,
        mut beside,
        netlock,
        staging,
        journal,
        mut planned,
    } = held;
    // Everything is thawed: the lock goes while the checkpoint is finished.
    let prehash = runs.prehash.take();
    let finishing = async {
        hold_point("thawed").await;
        check(&planned.limit, planned.req.deadline, "after the thaw")?;
        let recorded = beside.done().await?;
        write(&planned, &staging.dir, prehash, contents, recorded, frozen_for).await
    };
    drop(configs);
    let hold = planned.req.hold_network;
    let unlocked = async move {
        if hold {
            netlock.leave_locked();
        } else {
            netlock.release().await;
        }
    };
    let ((), bytes) = tokio::join!(unlocked, finishing);
    drop((runs, beside));
    match bytes {
        Ok(bytes) => planned.report.bytes = bytes,
        Err(e) => {
            drop(staging);
            drop(journal);
            return Err(e);
        }
    }
    planned.report.phases.mark("finished");
    close(staging, journal, planned).await
}

/// The commit (unless `stop` made it already), then the journal goes, and the seal.
pub(super) async fn close(
    mut staging: Staging,
    journal: Arc<Journal>,
    planned: Planned,
) -> Result<DumpReport> {
    if !staging.committed {
        // Complete, and the pod thawed: from here on a recovery keeps the checkpoint.
        staging.commit(Phase::Committed)?;
        hold_point("committed").await;
    }
    drop(staging);
    drop(journal);
    let Planned {
        req,
        mut report,
        started,
        ..
    } = planned;
    report.phases.mark("committed");
    // The digests were just computed from these files: a restore of them needs not read them
    // again while they stay as they are.
    let sealed = Manifest::load_listed(&req.dest)
        .and_then(|m| crate::trust::seal::record(Path::new(crate::trust::seal::SEAL_DIR), &req.dest, &m));
    if let Err(e) = sealed {
        log::warn!("{e}");
    }
    report.total = started.elapsed();
    Ok(report)
}

/// Specs, digests of every file, and the manifest last, into the checkpoint at `dir`. Returns
/// the checkpoint's size.
pub(super) async fn write(
    p: &Planned,
    dir: &Path,
    prehash: Option<Prehash>,
    contents: Contents,
    recorded: Recorded,
    frozen: Duration,
) -> Result<u64> {
    let d = &p.req;
    let checkpointed = time::OffsetDateTime::now_utc();
    for t in &d.targets {
        let cdir = dir.join(t.entry.dir());
        let spec = match &t.spec {
            Some(spec) => spec.clone(),
            None => {
                let src = t.bundle.join("config.json");
                std::fs::read(&src).map_err(|e| Error::io("read a container spec", &src, e))?
            }
        };
        write_private(
            &cdir.join(PART_NAMES.spec),
            &without_own_criu_config(spec, &t.bundle),
        )?;
        write_kep_metadata(&cdir, &t.entry, t.created, checkpointed)?;
    }
    check_linked_queues(dir, &contents.unix_links)?;
    // Every container's part is complete: a caller pushing the checkpoint may start on them
    // while the rest (digests, manifest, and with `stop` the sync and the kill) goes on.
    announce_parts(&d.dest, &d.targets, dir);
    hold_point("parts-ready").await;
    p.report.phases.mark("described");
    let threads = prehash.as_ref().map_or(0, Prehash::threads);
    let prehashed = match prehash {
        Some(p) => tokio::task::spawn_blocking(move || p.finish())
            .await
            .unwrap_or_default(),
        None => HashMap::new(),
    };
    let files = digest_tree(dir, &prehashed).await?;
    let early: Vec<&FileDigest> = prehashed
        .iter()
        .filter_map(|(p, h)| {
            let rel = p.strip_prefix(dir).ok()?.to_string_lossy().into_owned();
            files.get(&rel).filter(|f| **f == h.digest)
        })
        .collect();
    log::info!(
        "pod {}: {} of {} files ({} of {} bytes) digested as CRIU closed them, on {threads} threads",
        d.pod.sandbox_id,
        early.len(),
        files.len(),
        early.iter().map(|f| f.size).sum::<u64>(),
        files.values().map(|f| f.size).sum::<u64>()
    );
    p.report.phases.mark("digested");
    let bytes = files.values().map(|f| f.size).sum();
    let mut containers: Vec<ContainerEntry> = d
        .targets
        .iter()
        .map(|t| {
            let mut e = t.entry.clone();
            e.dumped = p.running.iter().any(|r| r.entry.id == t.entry.id);
            if e.role == Role::Container && e.rootfs_layers.is_empty() {
                e.rootfs_layers =
                    crate::archive::rootfs::lowerdirs_of(&t.bundle.join("rootfs")).unwrap_or_default();
            }
            e
        })
        .collect();
    containers.sort_by_key(|c| c.created_order);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: if contents.persistent_volumes.iter().any(|v| v.carried.is_some())
            || criu_ran_in_netns(dir, &p.running)
        {
            VERSION
        } else {
            BASE_VERSION
        },
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        pod: PodInfo {
            ips: recorded.ips,
            ..d.pod.clone()
        },
        host: recorded.host,
        tcp_established: d.tcp_established,
        containers,
        volumes: contents.shared.volumes,
        digest_algorithm: DigestAlgorithm::WRITTEN,
        dev_shm: contents.shared.dev_shm,
        sysv_ipc: contents.shared.sysv_ipc,
        loopback_linked: contents.loopback_linked,
        unix_links: contents.unix_links,
        adopted: contents.adopted,
        after_dump: Some(if d.serve.is_some() {
            crate::format::persistent::AfterDump::Migrating
        } else if d.stop {
            crate::format::persistent::AfterDump::Stopped
        } else {
            crate::format::persistent::AfterDump::LeftRunning
        }),
        persistent_volumes: contents.persistent_volumes,
        files,
        stats: DumpStats {
            frozen_us: frozen.as_micros() as u64,
            slowest_dump_us: p.report.slowest_dump.as_micros() as u64,
        },
    };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| Error::io("encode the manifest", dir, e.into()))?;
    write_synced(&dir.join(MANIFEST), &json)?;
    Ok(bytes)
}

/// Checks that CRIU dumped each end of `links` and that what sat in its queue can be handed
/// back (bytes, no descriptors): a checkpoint a restore would refuse is not written.
/// Whether the CRIU of a container of `running` ran in the pod's network namespace (its images
/// hold none: a restore that does not know it brings the processes back in the host's network).
fn criu_ran_in_netns(dir: &Path, running: &[crate::pod::target::Target]) -> bool {
    running.iter().any(|t| {
        let options = dir
            .join(t.entry.dir())
            .join(PART_NAMES.images)
            .join(crate::criu::container::CRIU_OPTIONS_FILE);
        crate::fs::read::read_capped(&options, 64 * 1024)
            .ok()
            .and_then(|b| serde_json::from_slice::<crate::criu::container::DumpOptions>(&b).ok())
            .is_some_and(|o| o.criu_in_netns)
    })
}

fn check_linked_queues(dir: &Path, links: &[UnixLink]) -> Result<()> {
    for end in links.iter().flat_map(|l| &l.ends) {
        let images = dir.join(end.images(PART_NAMES));
        let socket =
            crate::criu::image::unix_socket(&images, end.ino)?.ok_or_else(|| Error::InvalidCheckpoint {
                path: images.clone(),
                reason: format!(
                    "CRIU's images of container {:?} hold no unix socket {}",
                    end.container, end.ino
                ),
            })?;
        crate::criu::image::queued_packets(&images, socket.id)?;
    }
    Ok(())
}
