//! The pod record: what the shim knows of every container of a pod, in the order the pod was
//! built. The coordinator plans dumps and restores from it (sandbox first, init containers in
//! creation order, sidecars before apps).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A container's role in its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The pause container holding the pod's network and IPC namespaces.
    Sandbox,
    /// Any other container of the pod.
    Container,
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Stopped,
}

/// One container of the pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    /// Name in the pod spec (for the sandbox: the pod's name), when CRI gave one.
    pub name: Option<String>,
    pub role: Role,
    pub image: Option<String>,
    /// 1-based position among the pod's containers by creation.
    pub created_order: u64,
    /// 1-based position among the pod's containers by start; `None` until started.
    pub started_order: Option<u64>,
    pub state: ContainerState,
    pub pid: i32,
    pub exit_code: Option<u32>,
}

/// Every container of one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// The sandbox id (the grouping key), or the container id outside Kubernetes.
    pub pod_id: String,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    pub containers: Vec<ContainerRecord>,
}

impl PodRecord {
    /// Containers ordered by start (never-started ones last, by creation).
    pub fn in_start_order(&self) -> Vec<&ContainerRecord> {
        let mut v: Vec<_> = self.containers.iter().collect();
        v.sort_by_key(|c| (c.started_order.unwrap_or(u64::MAX), c.created_order));
        v
    }

    /// Writes the record as JSON, atomically, readable by root only.
    pub fn write_to(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, created: u64, started: Option<u64>) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            name: None,
            role: Role::Container,
            image: None,
            created_order: created,
            started_order: started,
            state: ContainerState::Running,
            pid: 1,
            exit_code: None,
        }
    }

    #[test]
    fn start_order_puts_unstarted_last() {
        let r = PodRecord {
            pod_id: "p".into(),
            containers: vec![c("a", 1, Some(2)), c("b", 2, None), c("c", 3, Some(1))],
            ..Default::default()
        };
        let ids: Vec<_> = r.in_start_order().iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["c", "a", "b"]);
    }

    #[test]
    fn record_round_trips_with_private_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pods/p.json");
        let r = PodRecord {
            pod_id: "p".into(),
            containers: vec![c("a", 1, Some(1))],
            ..Default::default()
        };
        r.write_to(&path).expect("write");
        let back: PodRecord = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
        assert_eq!(back, r);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
