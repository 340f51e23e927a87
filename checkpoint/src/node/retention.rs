//! Retention: the bounds of the node configuration's `[retention]` table on the checkpoint
//! root, applied by the shim after each pod dump into the root (whoever asked for the dump).
//!
//! Which checkpoints go ([`select`]), in this order:
//! 1. `max_age_seconds`: every checkpoint older than that (its manifest's `created_unix`);
//! 2. `max_per_pod`: for each pod (`namespace/name` as the manifest records it), the oldest
//!    until the pod has no more than that many;
//! 3. `max_total_bytes`: the oldest of the root until the valid checkpoints together fit.
//!
//! Oldest first by `created_unix` (then by name); never the checkpoint just written, never one
//! in use ([`crate::node::lease`]): those still count towards the bounds, so a bound may stay
//! exceeded while they are kept. Broken checkpoints (see [`crate::node::store`]) are neither counted
//! nor removed: `podsnap list` shows them for an admin to look at. Each removal goes through
//! [`crate::node::store::remove`] (which checks the leases again) and is logged.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::config::RetentionPolicy;
use crate::error::{Error, Result};
use crate::node::store::{self, Content};

/// A checkpoint as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// `namespace/name` of its pod.
    pub pod: String,
    pub created_unix: u64,
    pub bytes: u64,
    /// It was just written, or a restored pod holds a lease on it: it stays.
    pub kept: bool,
}

/// Why a checkpoint goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Older than `max` seconds.
    Age { age: u64, max: u64 },
    /// Its pod had `count` checkpoints, more than `max`.
    PerPod { pod: String, count: usize, max: u64 },
    /// The root held `total` bytes, more than `max`.
    Total { total: u64, max: u64 },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Age { age, max } => {
                write!(f, "{age} s old, older than max_age_seconds = {max}")
            }
            Reason::PerPod { pod, count, max } => {
                write!(
                    f,
                    "pod {pod} had {count} checkpoints, more than max_per_pod = {max}"
                )
            }
            Reason::Total { total, max } => write!(
                f,
                "the root held {} in checkpoints, more than max_total_bytes = {max} ({})",
                crate::fs::units::mib(*total),
                crate::fs::units::mib(*max)
            ),
        }
    }
}

/// The checkpoints to remove under `policy` at `now` (seconds since the epoch), as indices into
/// `candidates` with the reason, in the order they go; see the module documentation.
pub fn select(candidates: &[Candidate], policy: &RetentionPolicy, now: u64) -> Vec<(usize, Reason)> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&candidates[a], &candidates[b]);
        (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name))
    });
    let mut gone = vec![false; candidates.len()];
    let mut out = Vec::new();
    let removable = |i: usize, gone: &[bool]| !candidates[i].kept && !gone[i];

    if let Some(max) = policy.max_age_seconds {
        for &i in &order {
            let age = now.saturating_sub(candidates[i].created_unix);
            if age > max && removable(i, &gone) {
                gone[i] = true;
                out.push((i, Reason::Age { age, max }));
            }
        }
    }
    if let Some(max) = policy.max_per_pod {
        let mut pods: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for &i in &order {
            pods.entry(candidates[i].pod.as_str()).or_default().push(i);
        }
        for (pod, members) in pods {
            let mut count = members.iter().filter(|&&i| !gone[i]).count();
            let had = count;
            for &i in &members {
                if count as u64 <= max {
                    break;
                }
                if removable(i, &gone) {
                    gone[i] = true;
                    count -= 1;
                    out.push((
                        i,
                        Reason::PerPod {
                            pod: pod.to_owned(),
                            count: had,
                            max,
                        },
                    ));
                }
            }
        }
    }
    if let Some(max) = policy.max_total_bytes {
        let mut total: u64 = (0..candidates.len())
            .filter(|&i| !gone[i])
            .map(|i| candidates[i].bytes)
            .sum();
        let had = total;
        for &i in &order {
            if total <= max {
                break;
            }
            if removable(i, &gone) {
                gone[i] = true;
                total -= candidates[i].bytes;
                out.push((i, Reason::Total { total: had, max }));
            }
        }
    }
    out
}

/// Whether `dir` is a pod's part of a group checkpoint (its parent holds `group.json`).
fn in_group(dir: &Path) -> bool {
    dir.parent()
        .is_some_and(|g| g.join(crate::format::group::GROUP_MANIFEST).exists())
}

/// A checkpoint retention removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub name: String,
    pub pod: String,
    pub bytes: u64,
    pub reason: Reason,
}

/// Applies `policy` to `root` after a dump wrote `written` (a checkpoint in it); leases live
/// under `leases`. Returns what it removed; a checkpoint it could not remove is logged and
/// left.
pub fn apply(
    root: &Path,
    written: &Path,
    policy: &RetentionPolicy,
    leases: &Path,
    now: u64,
) -> Result<Vec<Pruned>> {
    if policy.unbounded() {
        return Ok(Vec::new());
    }
    let written =
        std::fs::canonicalize(written).map_err(|e| Error::io("open the new checkpoint", written, e))?;
    let mut candidates = Vec::new();
    for stored in store::list(root)? {
        let Content::Valid { manifest, bytes } = &stored.content else {
            continue;
        };
        let in_use = !crate::node::lease::holders(leases, &stored.dir)?.is_empty();
        candidates.push(Candidate {
            pod: store::pod_of(manifest),
            created_unix: manifest.created_unix,
            bytes: *bytes,
            // A pod's part of a group checkpoint goes with its group or not at all: retention
            // never breaks a group (it still counts toward the root's total).
            kept: in_use || stored.dir == written || in_group(&stored.dir),
            name: stored.name,
        });
    }
    let mut pruned = Vec::new();
    for (i, reason) in select(&candidates, policy, now) {
        let c = &candidates[i];
        match store::remove(root, &c.name, leases) {
            Ok(_) => {
                log::info!(
                    "retention: removed checkpoint {} of pod {} ({}): {reason}",
                    c.name,
                    c.pod,
                    crate::fs::units::mib(c.bytes)
                );
                pruned.push(Pruned {
                    name: c.name.clone(),
                    pod: c.pod.clone(),
                    bytes: c.bytes,
                    reason,
                });
            }
            Err(e) => log::warn!("retention: checkpoint {} stays: {e}", c.name),
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, pod: &str, created_unix: u64, bytes: u64) -> Candidate {
        Candidate {
            name: name.into(),
            pod: pod.into(),
            created_unix,
            bytes,
            kept: false,
        }
    }

    fn names(cs: &[Candidate], picked: &[(usize, Reason)]) -> Vec<String> {
        picked.iter().map(|(i, _)| cs[*i].name.clone()).collect()
    }

    #[test]
    fn nothing_goes_without_a_bound() {
        let cs = vec![c("a", "ns/p", 1, 1 << 40), c("b", "ns/p", 2, 1 << 40)];
        assert!(select(&cs, &RetentionPolicy::default(), u64::MAX).is_empty());
    }

    #[test]
    fn per_pod_counts_drop_the_oldest_of_each_pod() {
        let cs = vec![
            c("web-3", "ns/web", 30, 1),
            c("web-1", "ns/web", 10, 1),
            c("db-1", "ns/db", 15, 1),
            c("web-2", "ns/web", 20, 1),
            c("db-2", "ns/db", 25, 1),
        ];
        let policy = RetentionPolicy {
            max_per_pod: Some(1),
            ..Default::default()
        };
        let picked = select(&cs, &policy, 100);
        assert_eq!(names(&cs, &picked), ["db-1", "web-1", "web-2"]);
        assert_eq!(
            picked[1].1.to_string(),
            "pod ns/web had 3 checkpoints, more than max_per_pod = 1"
        );
    }

    #[test]
    fn kept_checkpoints_count_but_stay_and_the_next_oldest_goes() {
        let mut cs = vec![
            c("old-in-use", "ns/web", 10, 1),
            c("middle", "ns/web", 20, 1),
            c("newer", "ns/web", 30, 1),
            c("just-written", "ns/web", 5, 1), // an odd clock: still never removed
        ];
        cs[0].kept = true;
        cs[3].kept = true;
        let policy = RetentionPolicy {
            max_per_pod: Some(2),
            ..Default::default()
        };
        assert_eq!(names(&cs, &select(&cs, &policy, 100)), ["middle", "newer"]);
        let policy = RetentionPolicy {
            max_per_pod: Some(1),
            ..Default::default()
        };
        assert_eq!(
            names(&cs, &select(&cs, &policy, 100)),
            ["middle", "newer"],
            "the bound stays exceeded while kept ones remain"
        );
    }

    #[test]
    fn total_bytes_drop_the_oldest_of_the_root_until_it_fits() {
        let cs = vec![
            c("a", "ns/x", 10, 400),
            c("b", "ns/y", 20, 300),
            c("c", "ns/x", 30, 200),
            c("d", "ns/y", 40, 100),
        ];
        let policy = RetentionPolicy {
            max_total_bytes: Some(350),
            ..Default::default()
        };
        let picked = select(&cs, &policy, 100);
        assert_eq!(names(&cs, &picked), ["a", "b"]);
        assert!(picked[0].1.to_string().starts_with("the root held 0.0 MiB"));
        let policy = RetentionPolicy {
            max_total_bytes: Some(1000),
            ..Default::default()
        };
        assert!(select(&cs, &policy, 100).is_empty(), "1000 bytes fit");
    }

    #[test]
    fn age_goes_first_and_later_bounds_count_what_is_left() {
        let cs = vec![
            c("ancient", "ns/x", 1, 500),
            c("old", "ns/x", 50, 100),
            c("new", "ns/x", 90, 100),
            c("newest", "ns/x", 95, 100),
        ];
        let policy = RetentionPolicy {
            max_age_seconds: Some(60),
            max_per_pod: Some(2),
            max_total_bytes: Some(150),
        };
        let picked = select(&cs, &policy, 100);
        assert_eq!(names(&cs, &picked), ["ancient", "old", "new"]);
        assert_eq!(picked[0].1, Reason::Age { age: 99, max: 60 });
        assert!(matches!(picked[1].1, Reason::PerPod { count: 3, .. }));
        assert!(matches!(picked[2].1, Reason::Total { total: 200, .. }));
        assert!(
            select(
                &cs[1..],
                &RetentionPolicy {
                    max_age_seconds: Some(60),
                    ..Default::default()
                },
                0
            )
            .is_empty(),
            "a clock before the checkpoints removes nothing"
        );
    }

    #[test]
    fn apply_removes_from_the_root_but_not_what_was_just_written_or_is_leased() {
        use crate::node::store::tests::write_checkpoint;
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        let leases = t.path().join("leases");
        write_checkpoint(&root.join("web-1"), "ns", "web", 10, 10);
        write_checkpoint(&root.join("web-2"), "ns", "web", 20, 10);
        write_checkpoint(&root.join("web-3"), "ns", "web", 30, 10);
        write_checkpoint(&root.join("db-1"), "ns", "db", 5, 10);
        std::fs::create_dir_all(root.join("broken/containers")).expect("mkdir");
        let held = std::fs::canonicalize(root.join("web-1")).expect("canonical");
        let lease = crate::node::lease::take(
            &leases,
            &crate::node::lease::Holder::this_process("sb", None, &held),
        )
        .expect("lease");
        let policy = RetentionPolicy {
            max_per_pod: Some(1),
            ..Default::default()
        };
        let pruned = apply(&root, &root.join("web-2"), &policy, &leases, 100).expect("apply");
        let gone: Vec<&str> = pruned.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(gone, ["web-3"]);
        let left: Vec<String> = store::list(&root)
            .expect("list")
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(left, ["broken", "db-1", "web-1", "web-2"]);
        drop(lease);
        // A pod's part of a group is never taken out of its group.
        write_checkpoint(&root.join("set/web"), "ns", "web", 1, 10);
        std::fs::write(root.join("set").join(crate::format::group::GROUP_MANIFEST), b"{}").expect("group");
        let pruned = apply(&root, &root.join("web-2"), &policy, &leases, 100).expect("apply");
        let gone: Vec<&str> = pruned.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(gone, ["web-1"], "the lease is gone; the group's part stays");
        assert!(root
            .join("set/web")
            .join(crate::format::manifest::MANIFEST)
            .exists());
        assert!(apply(
            &root,
            &root.join("web-2"),
            &RetentionPolicy::default(),
            &leases,
            100
        )
        .expect("unbounded")
        .is_empty());
    }
}
