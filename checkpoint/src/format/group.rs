//! A group checkpoint: several pods dumped at one instant (`podsnap dump --selector` or
//! several `--pod`s). The group's directory holds one pod checkpoint per pod, each complete
//! and usable on its own, and `group.json` listing them. The pods' own manifests are what is
//! verified; the group's lists only names, each a directory inside the group's.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::names::validate_name;
use crate::fs::read::read_capped;

/// The group's manifest, in the group's directory.
pub const GROUP_MANIFEST: &str = "group.json";
/// Its `format`.
pub const GROUP_FORMAT: &str = "podsnap.io/pod-group-checkpoint";
/// The version this code reads and writes.
pub const GROUP_VERSION: u32 = 1;
/// The largest group manifest read.
const MAX_GROUP_BYTES: u64 = 1024 * 1024;

/// `group.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupManifest {
    pub format: String,
    pub version: u32,
    /// When the group was dumped (seconds since the epoch).
    pub created_unix: u64,
    /// The pods' Kubernetes namespace.
    pub namespace: String,
    /// The pods, each a pod checkpoint in the directory of its name.
    pub pods: Vec<GroupPod>,
}

/// One pod of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupPod {
    /// The pod's name; also its checkpoint's directory in the group's.
    pub name: String,
}

impl GroupManifest {
    /// Reads `<dir>/group.json`, if there is one; refuses one that is not a group podsnap wrote.
    pub fn load(dir: &Path) -> Result<Option<GroupManifest>> {
        let path = dir.join(GROUP_MANIFEST);
        let invalid = |reason: String| Error::InvalidCheckpoint {
            path: path.clone(),
            reason,
        };
        let bytes = match read_capped(&path, MAX_GROUP_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(invalid(e.to_string())),
        };
        let group: GroupManifest = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if group.format != GROUP_FORMAT || group.version != GROUP_VERSION {
            return Err(invalid(format!(
                "format {:?} version {} is not a podsnap group checkpoint this podsnap reads ({GROUP_FORMAT:?} {GROUP_VERSION})",
                group.format, group.version
            )));
        }
        if group.pods.is_empty() {
            return Err(invalid("the group lists no pod".to_owned()));
        }
        for (i, pod) in group.pods.iter().enumerate() {
            validate_name(&pod.name).map_err(invalid)?;
            if group.pods[..i].iter().any(|p| p.name == pod.name) {
                return Err(invalid(format!("pod {:?} is listed twice", pod.name)));
            }
        }
        Ok(Some(group))
    }

    /// The order pods come back in: chains restored one pod after another, the chains side by
    /// side. A StatefulSet's members (`<set>-<ordinal>`, two or more sharing `<set>`) form one
    /// chain, by ordinal; every other pod is a chain of its own.
    pub fn restore_chains(&self) -> Vec<Vec<String>> {
        let ordinal = |name: &str| -> Option<(String, u64)> {
            let (set, n) = name.rsplit_once('-')?;
            let n = n.parse().ok().filter(|_| !n.starts_with('+'))?;
            Some((set.to_owned(), n))
        };
        let mut sets: std::collections::BTreeMap<String, Vec<(u64, String)>> = Default::default();
        for pod in &self.pods {
            if let Some((set, n)) = ordinal(&pod.name) {
                sets.entry(set).or_default().push((n, pod.name.clone()));
            }
        }
        let mut chains = Vec::new();
        for pod in &self.pods {
            match ordinal(&pod.name).and_then(|(set, _)| Some((sets.get_mut(&set)?, set))) {
                Some((members, _)) if members.len() > 1 => {
                    // The set's chain, where its first member is listed.
                    let mut members = std::mem::take(members);
                    members.sort();
                    chains.push(members.into_iter().map(|(_, n)| n).collect());
                }
                Some((members, _)) if members.is_empty() => {} // in its set's chain already
                _ => chains.push(vec![pod.name.clone()]),
            }
        }
        chains
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(names: &[&str]) -> GroupManifest {
        GroupManifest {
            format: GROUP_FORMAT.into(),
            version: GROUP_VERSION,
            created_unix: 1,
            namespace: "default".into(),
            pods: names.iter().map(|n| GroupPod { name: (*n).into() }).collect(),
        }
    }

    #[test]
    fn statefulset_members_come_back_by_ordinal_other_pods_side_by_side() {
        let g = group(&["web-10", "cache", "web-2", "db-0", "web-0"]);
        assert_eq!(
            g.restore_chains(),
            vec![
                vec!["web-0".to_owned(), "web-2".to_owned(), "web-10".to_owned()],
                vec!["cache".to_owned()],
                vec!["db-0".to_owned()],
            ]
        );
    }

    #[test]
    fn a_crafted_group_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert_eq!(GroupManifest::load(tmp.path()).expect("no group"), None);
        for (what, json) in [
            ("a path", serde_json::to_vec(&group(&["../etc"])).expect("json")),
            ("twice", serde_json::to_vec(&group(&["a", "a"])).expect("json")),
            ("empty", serde_json::to_vec(&group(&[])).expect("json")),
            ("unknown field", br#"{"format":"podsnap.io/pod-group-checkpoint","version":1,"created_unix":1,"namespace":"d","pods":[{"name":"a","dir":"/"}]}"#.to_vec()),
        ] {
            std::fs::write(tmp.path().join(GROUP_MANIFEST), json).expect("write");
            assert!(GroupManifest::load(tmp.path()).is_err(), "{what}");
        }
        std::fs::write(
            tmp.path().join(GROUP_MANIFEST),
            serde_json::to_vec(&group(&["web-0", "web-1"])).expect("json"),
        )
        .expect("write");
        assert_eq!(
            GroupManifest::load(tmp.path())
                .expect("valid")
                .expect("a group")
                .pods
                .len(),
            2
        );
    }
}
