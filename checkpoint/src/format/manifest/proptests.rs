//! Properties of the manifest reader, the first thing a restore reads of a checkpoint (and what
//! a pull reads of a registry before any layer). A full manifest (every optional part set) is
//! mutated as bytes and as JSON: the reader answers without panicking, in memory proportional
//! to the manifest, and every path a manifest it accepts leads to stays inside the checkpoint.

use std::path::{Component, Path};

use proptest::prelude::*;

use super::*;
use crate::testkit::{assert_bounded, cases, mutate, mutate_json, Mutation};

fn digest() -> FileDigest {
    FileDigest {
        size: 4,
        digest: "ab".repeat(32),
    }
}

/// A manifest with every part a dump may write: dumped containers with CRI configs, a volume,
/// /dev/shm, SysV state, links, an adopted process.
fn full() -> Manifest {
    let mut m = tests::sample();
    m.pod.namespace = Some("team-a".into());
    m.pod
        .annotations
        .insert("podsnap.io/keep-ip".into(), "true".into());
    m.pod.cri_config = Some(serde_json::json!({"metadata": {"name": "web"}, "hostname": "web"}));
    m.pod.ips = vec!["10.0.0.7".parse().expect("ip")];
    for c in m.containers.iter_mut().filter(|c| c.role == Role::Container) {
        c.dumped = true;
        c.image = Some("docker.io/library/busybox:latest".into());
        c.rootfs_layers = vec!["/var/lib/containerd/snapshots/2/fs".into()];
        c.cri_config = Some(serde_json::json!({"metadata": {"name": c.name}, "command": ["sh"]}));
    }
    let images = PART_NAMES.images;
    for (rel, _) in [
        (format!("containers/app/{images}/inventory.img"), ()),
        (format!("containers/app/{images}/pages-1.img"), ()),
        (format!("containers/sidecar/{images}/inventory.img"), ()),
        (format!("containers/app/adopted/12/{images}/inventory.img"), ()),
        ("containers/app/spec.dump".into(), ()),
        ("containers/app/rootfs-diff.tar".into(), ()),
        ("containers/app/rootfs-deleted.json".into(), ()),
        ("volumes/cache.tar".into(), ()),
        ("pod/dev-shm.tar".into(), ()),
        (crate::format::layout::SYSV_STATE.into(), ()),
        (CPUINFO.into(), ()),
    ] {
        m.files.insert(rel, digest());
    }
    m.volumes.push(VolumeEntry {
        name: "cache".into(),
        archive: "volumes/cache.tar".into(),
        mounts: vec![VolumeMount {
            container: "app".into(),
            path: "/cache".into(),
        }],
    });
    m.dev_shm = Some("pod/dev-shm.tar".into());
    m.sysv_ipc = Some(crate::format::layout::SYSV_STATE.into());
    m.loopback_linked = vec!["app".into(), "sidecar".into()];
    m.unix_links.push(UnixLink {
        kind: UnixKind::Stream,
        ends: [
            UnixEnd {
                container: "app".into(),
                ino: 10,
            },
            UnixEnd {
                container: "sidecar".into(),
                ino: 11,
            },
        ],
    });
    m.adopted.push(AdoptedProcess {
        container: "app".into(),
        pid: 12,
    });
    m
}

/// Whether `rel` stays inside the directory it is joined to: relative, normal components only.
fn inside(rel: &Path) -> bool {
    !rel.as_os_str().is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Every path a restore derives from an accepted manifest stays in the checkpoint.
fn check_accepted(m: &Manifest) -> std::result::Result<(), TestCaseError> {
    let names = m.part_names();
    for rel in m.files.keys() {
        prop_assert!(inside(Path::new(rel)), "file {rel:?}");
    }
    for c in &m.containers {
        prop_assert!(inside(&c.dir()), "container {:?}", c.name);
        prop_assert!(inside(Path::new(&c.file(names.spec))), "container {:?}", c.name);
        prop_assert!(inside(Path::new(&c.file(names.images))), "container {:?}", c.name);
    }
    for v in &m.volumes {
        prop_assert!(inside(Path::new(&v.archive)), "volume {:?}", v.archive);
    }
    if let Some(a) = &m.dev_shm {
        prop_assert!(inside(Path::new(a)), "dev_shm {a:?}");
    }
    if let Some(a) = &m.sysv_ipc {
        prop_assert!(inside(Path::new(a)), "sysv {a:?}");
    }
    for link in &m.unix_links {
        for end in &link.ends {
            prop_assert!(
                inside(Path::new(&end.images(names))),
                "unix end {:?}",
                end.container
            );
        }
    }
    for a in &m.adopted {
        prop_assert!(inside(Path::new(&a.images(names))), "adopted {:?}", a.container);
    }
    let _ = m.restore_order();
    Ok(())
}

#[test]
fn the_full_manifest_is_valid() {
    let m = full();
    let parsed = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect("valid");
    assert_eq!(parsed, m);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Byte mutations of the manifest's JSON.
    #[test]
    fn mutated_manifest_bytes_are_parsed_or_refused(m in prop::collection::vec(any::<Mutation>(), 1..8)) {
        let bytes = mutate(&serde_json::to_vec(&full()).expect("json"), &m);
        let parsed = assert_bounded("Manifest::parse", bytes.len(), 32, 64 << 10, || Manifest::parse(&bytes));
        if let Ok(m) = parsed {
            check_accepted(&m)?;
        }
    }

    /// JSON mutations: fields set to escapes, edge numbers, other types; removed; duplicated.
    #[test]
    fn mutated_manifest_fields_are_parsed_or_refused(
        picks in prop::collection::vec(any::<(u32, u8, u32)>(), 1..6),
    ) {
        let mut v = serde_json::to_value(full()).expect("json");
        mutate_json(&mut v, &picks);
        let bytes = serde_json::to_vec(&v).expect("json");
        let parsed = assert_bounded("Manifest::parse", bytes.len(), 32, 64 << 10, || Manifest::parse(&bytes));
        if let Ok(m) = parsed {
            check_accepted(&m)?;
        }
    }

    /// Any bytes at all.
    #[test]
    fn any_bytes_are_refused_or_parsed(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = Manifest::parse(&bytes) {
            check_accepted(&m)?;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(100),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A checkpoint on disk whose manifest is mutated: the listing check answers, and accepts
    /// only a directory holding exactly what the manifest lists.
    #[test]
    fn a_checkpoint_with_a_mutated_manifest_loads_or_is_refused(
        picks in prop::collection::vec(any::<(u32, u8, u32)>(), 1..4),
    ) {
        let t = tempfile::tempdir().expect("tempdir");
        let m = full();
        for rel in m.files.keys() {
            let path = t.path().join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, b"data").expect("write");
        }
        let mut v = serde_json::to_value(&m).expect("json");
        mutate_json(&mut v, &picks);
        std::fs::write(t.path().join(MANIFEST), serde_json::to_vec(&v).expect("json")).expect("write");
        if let Ok(loaded) = Manifest::load_listed(t.path()) {
            check_accepted(&loaded)?;
            for (rel, f) in &loaded.files {
                let meta = std::fs::symlink_metadata(t.path().join(rel)).expect("listed files exist");
                prop_assert!(meta.is_file() && meta.len() == f.size);
            }
        }
    }
}
