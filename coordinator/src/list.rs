//! `podsnap list`: the checkpoints of the node's checkpoint root, for a person (a table that
//! fits a terminal) or a script (`-o json`, a JSON array).
//!
//! Each checkpoint ([`podsnap_checkpoint::node::store`]): its name (what `podsnap.io/restore-from`
//! and `podsnap rm` take), its pod, when it was taken (UTC), its size, its containers, whether
//! its digests were verified (`--verify` reads every file; otherwise `-`), and the pods
//! restored from it that still hold it ([`podsnap_checkpoint::node::lease`]). Broken checkpoints are
//! listed with why.

use std::path::{Path, PathBuf};

use podsnap_checkpoint::format::manifest::Manifest;
use podsnap_checkpoint::node::store::{self, Content};
use podsnap_checkpoint::Role;
use serde::Serialize;

use crate::error::Result;
use crate::progress::Progress;
use crate::summary::human_bytes;

/// One checkpoint of the root, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    /// Its name in the root.
    pub name: String,
    pub path: PathBuf,
    /// `namespace/name` of its pod (`None`: broken).
    pub pod: Option<String>,
    /// Seconds since the epoch, and the same in RFC 3339 (UTC).
    pub created_unix: Option<u64>,
    pub created: Option<String>,
    /// Its listed files and its manifest.
    pub size_bytes: Option<u64>,
    /// Its containers in restore order (the sandbox left out).
    pub containers: Vec<String>,
    /// Every digest checked: `Some(true)`; a damaged file: `Some(false)`; not checked: `None`.
    pub verified: Option<bool>,
    /// Why it is broken or damaged.
    pub problem: Option<String>,
    /// The pods restored from it that hold it.
    pub in_use_by: Vec<User>,
}

/// A pod holding a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub sandbox_id: String,
    /// `namespace/name`, when known.
    pub pod: Option<String>,
    /// The container whose lazy-pages daemon reads the checkpoint (a lazy restore still
    /// bringing memory back); absent for the pod's own hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_pages_of: Option<String>,
}

/// Lists the checkpoints of `root`; leases live under `leases`. With `verify`, every digest of
/// every valid checkpoint is read.
pub fn list(root: &Path, leases: &Path, verify: bool, progress: &dyn Progress) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for stored in store::list(root)? {
        let in_use_by = podsnap_checkpoint::node::lease::holders(leases, &stored.dir)?
            .into_iter()
            .map(|h| User {
                sandbox_id: h.sandbox_id,
                pod: h.pod,
                lazy_pages_of: h.lazy_pages_of,
            })
            .collect();
        let mut row = Listed {
            name: stored.name.clone(),
            path: stored.dir.clone(),
            pod: None,
            created_unix: None,
            created: None,
            size_bytes: None,
            containers: Vec::new(),
            verified: None,
            problem: None,
            in_use_by,
        };
        match &stored.content {
            Content::Broken(reason) => row.problem = Some(reason.clone()),
            Content::Valid { manifest, bytes } => {
                row.pod = Some(store::pod_of(manifest));
                row.created_unix = Some(manifest.created_unix);
                row.created = Some(utc(manifest.created_unix, 'T', true) + "Z");
                row.size_bytes = Some(*bytes);
                row.containers = containers(manifest);
                if verify {
                    progress.step(&format!("verifying {} ({})", stored.name, human_bytes(*bytes)));
                    match Manifest::load_verified(&stored.dir) {
                        Ok(_) => row.verified = Some(true),
                        Err(e) => {
                            row.verified = Some(false);
                            row.problem = Some(match e {
                                podsnap_checkpoint::Error::InvalidCheckpoint { reason, .. } => reason,
                                other => other.to_string(),
                            });
                        }
                    }
                }
            }
        }
        out.push(row);
    }
    Ok(out)
}

fn containers(m: &Manifest) -> Vec<String> {
    m.restore_order()
        .into_iter()
        .filter(|c| c.role != Role::Sandbox)
        .map(|c| c.name.clone())
        .collect()
}

/// `YYYY-MM-DD<sep>HH:MM[:SS]` in UTC.
fn utc(unix: u64, sep: char, seconds: bool) -> String {
    let at = i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut s = format!(
        "{:04}-{:02}-{:02}{sep}{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute()
    );
    if seconds {
        s.push_str(&format!(":{:02}", at.second()));
    }
    s
}

/// The widest a cell of each column but NAME and IN USE BY may be; longer ones are cut with
/// `…` (`-o json` has them whole). NAME is as wide as the longest name: it is what `rm` takes.
const POD_WIDTH: usize = 24;
const CONTAINERS_WIDTH: usize = 24;
/// In-use pods shown by sandbox id (13 characters, as crictl does), at most this many.
const USERS_SHOWN: usize = 2;

/// The checkpoints as a table, one line each, then a line for each problem.
pub fn table(rows: &[Listed]) -> String {
    let header = [
        "NAME",
        "POD",
        "CREATED (UTC)",
        "SIZE",
        "CONTAINERS",
        "VERIFIED",
        "IN USE BY",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let broken = r.pod.is_none();
            let dash = || "-".to_owned();
            let users: Vec<&str> = r
                .in_use_by
                .iter()
                .map(|u| u.sandbox_id.get(..13).unwrap_or(&u.sandbox_id))
                .collect();
            let mut in_use = users
                .iter()
                .take(USERS_SHOWN)
                .copied()
                .collect::<Vec<_>>()
                .join(",");
            if users.len() > USERS_SHOWN {
                in_use.push_str(&format!(" +{}", users.len() - USERS_SHOWN));
            }
            [
                r.name.clone(),
                r.pod.clone().map_or_else(dash, |p| cut(&p, POD_WIDTH)),
                r.created_unix.map_or_else(dash, |t| utc(t, ' ', false)),
                r.size_bytes.map_or_else(dash, human_bytes),
                if broken {
                    dash()
                } else {
                    cut(&r.containers.join(","), CONTAINERS_WIDTH)
                },
                match (broken, r.verified) {
                    (true, _) => "BROKEN".to_owned(),
                    (false, Some(true)) => "ok".to_owned(),
                    (false, Some(false)) => "DAMAGED".to_owned(),
                    (false, None) => dash(),
                },
                if in_use.is_empty() { dash() } else { in_use },
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |row: &[String]| {
        let mut s = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i == 3 {
                s.push_str(&" ".repeat(pad)); // sizes line up on the right
                s.push_str(cell);
            } else if i + 1 == row.len() {
                s.push_str(cell); // no trailing blanks
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(pad));
            }
            if i + 1 < row.len() {
                s.push_str("  ");
            }
        }
        s
    };
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut out = vec![line(&header)];
    out.extend(cells.iter().map(|row| line(&row[..])));
    for r in rows {
        if let Some(problem) = &r.problem {
            let what = if r.pod.is_none() { "broken" } else { "damaged" };
            out.push(format!("{}: {what}: {problem}", r.name));
        }
    }
    if rows.is_empty() {
        out.push("(no checkpoints)".to_owned());
    }
    out.join("\n")
}

/// `text` cut to `width` characters, with `…` in place of what is cut.
fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut s: String = text.chars().take(width.saturating_sub(1)).collect();
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str) -> Listed {
        Listed {
            name: name.to_owned(),
            path: PathBuf::from("/r").join(name),
            pod: Some("default/webapp-123".to_owned()),
            created_unix: Some(1_700_000_000),
            created: Some("2023-11-14T22:13:20Z".to_owned()),
            size_bytes: Some(12 << 20),
            containers: vec!["init".into(), "sidecar".into(), "app".into()],
            verified: None,
            problem: None,
            in_use_by: Vec::new(),
        }
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(utc(1_700_000_000, ' ', false), "2023-11-14 22:13");
        assert_eq!(utc(1_700_000_000, 'T', true), "2023-11-14T22:13:20");
    }

    #[test]
    fn the_table_keeps_its_columns_and_cuts_long_cells() {
        let mut long = row("default-webapp-123-20231114T221320Z");
        long.pod = Some(format!("namespace-with-a-long-name/{}", "p".repeat(60)));
        long.containers = (0..20).map(|i| format!("container-{i}")).collect();
        long.verified = Some(true);
        long.in_use_by = (0..3)
            .map(|i| User {
                sandbox_id: format!("{i}{}", "a".repeat(63)),
                pod: None,
                lazy_pages_of: None,
            })
            .collect();
        let mut broken = row("partial");
        broken.pod = None;
        broken.created_unix = None;
        broken.size_bytes = None;
        broken.containers.clear();
        broken.problem = Some("no manifest.json".to_owned());
        let text = table(&[long, row("b"), broken]);
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("{text}");
        assert_eq!(lines.len(), 5, "header, three rows, one problem");
        assert!(lines[0].starts_with("NAME"));
        let pod_at = lines[0].find("POD").expect("POD");
        let size_end = lines[0].find("SIZE").expect("SIZE") + 4;
        for line in &lines[1..4] {
            assert_eq!(line.chars().nth(pod_at - 1), Some(' '), "{line}");
            assert!(line.chars().count() <= 160, "{line}");
        }
        // Sizes line up on the right under SIZE.
        assert_eq!(&lines[2][size_end - 8..size_end], "12.0 MiB");
        assert!(lines[1].contains("namespace-with-a-long-n…"), "{}", lines[1]);
        assert!(
            lines[1].contains("0aaaaaaaaaaaa,1aaaaaaaaaaaa +1"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains(" ok "), "{}", lines[1]);
        assert!(lines[3].contains("BROKEN"), "{}", lines[3]);
        assert_eq!(lines[4], "partial: broken: no manifest.json");
        assert!(lines.iter().all(|l| !l.ends_with(' ')));
        assert!(table(&[]).ends_with("(no checkpoints)"));
    }

    #[test]
    fn json_is_an_array_for_scripts() {
        let mut r = row("a");
        r.in_use_by.push(User {
            sandbox_id: "sb".into(),
            pod: Some("default/web".into()),
            lazy_pages_of: None,
        });
        let v = serde_json::to_value([r]).expect("json");
        assert_eq!(v[0]["name"], "a");
        assert_eq!(v[0]["pod"], "default/webapp-123");
        assert_eq!(v[0]["size_bytes"], 12 << 20);
        assert_eq!(v[0]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(v[0]["verified"], serde_json::Value::Null);
        assert_eq!(v[0]["in_use_by"][0]["sandbox_id"], "sb");
    }

    #[test]
    fn listing_a_root_reads_leases_and_verifies_on_request() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        let leases = t.path().join("leases");
        let dir = root.join("a");
        std::fs::create_dir_all(dir.join("containers/app")).expect("mkdir");
        std::fs::write(dir.join("containers/app/config.json"), b"{}").expect("write");
        let mut files = std::collections::BTreeMap::new();
        files.insert(
            "containers/app/config.json".to_owned(),
            serde_json::json!({"size": 2, "digest": "00"}),
        );
        let manifest = serde_json::json!({
            "format": podsnap_checkpoint::format::manifest::FORMAT,
            "version": podsnap_checkpoint::format::manifest::VERSION,
            "created_unix": 1_700_000_000u64,
            "pod": {"sandbox_id": "old", "name": "web", "namespace": "default"},
            "host": {"criu_version": "", "runc_version": "", "kernel": "", "arch": ""},
            "tcp_established": false,
            "containers": [],
            "volumes": [],
            "digest_algorithm": "blake3",
            "files": files,
        });
        std::fs::write(dir.join("manifest.json"), manifest.to_string()).expect("manifest");
        let canonical = std::fs::canonicalize(&dir).expect("canonical");
        let _lease = podsnap_checkpoint::node::lease::take(
            &leases,
            &podsnap_checkpoint::node::lease::Holder::this_process(
                "sb1",
                Some("default/web-2".into()),
                &canonical,
            ),
        )
        .expect("lease");
        let quiet = crate::progress::Quiet;
        let rows = list(&root, &leases, false, &quiet).expect("list");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].pod.as_deref(), Some("default/web"));
        assert_eq!(rows[0].verified, None);
        assert_eq!(rows[0].in_use_by[0].sandbox_id, "sb1");
        let rows = list(&root, &leases, true, &quiet).expect("list --verify");
        assert_eq!(rows[0].verified, Some(false), "the digest is wrong");
        assert!(
            rows[0]
                .problem
                .as_deref()
                .is_some_and(|p| p.contains("is damaged")),
            "{rows:?}"
        );
    }
}
