use super::*;
use crate::format::digest::{blake3_file, sha256_file};

pub(crate) fn sample() -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        created_unix: 1,
        pod: PodInfo {
            sandbox_id: "sb".into(),
            name: Some("webapp-123".into()),
            ..Default::default()
        },
        host: HostInfo::default(),
        tcp_established: false,
        containers: vec![
            ContainerEntry {
                name: "app".into(),
                id: "c2".into(),
                role: Role::Container,
                image: None,
                image_id: None,
                image_digest: None,
                rootfs_layers: vec![],
                created_order: 3,
                started_order: Some(3),
                state: ContainerState::Running,
                exit_code: None,
                dumped: false,
                cri_config: None,
            },
            ContainerEntry {
                name: "webapp-123".into(),
                id: "sb".into(),
                role: Role::Sandbox,
                image: None,
                image_id: None,
                image_digest: None,
                rootfs_layers: vec![],
                created_order: 1,
                started_order: Some(1),
                state: ContainerState::Running,
                exit_code: None,
                dumped: false,
                cri_config: None,
            },
            ContainerEntry {
                name: "sidecar".into(),
                id: "c1".into(),
                role: Role::Container,
                image: None,
                image_id: None,
                image_digest: None,
                rootfs_layers: vec![],
                created_order: 2,
                started_order: Some(2),
                state: ContainerState::Running,
                exit_code: None,
                dumped: false,
                cri_config: None,
            },
        ],
        volumes: vec![],
        digest_algorithm: DigestAlgorithm::WRITTEN,
        dev_shm: None,
        sysv_ipc: None,
        loopback_linked: Vec::new(),
        unix_links: Vec::new(),
        adopted: Vec::new(),
        after_dump: None,
        persistent_volumes: Vec::new(),
        files: BTreeMap::new(),
        stats: DumpStats::default(),
    }
}

#[test]
fn restore_order_is_sandbox_then_start_order() {
    let m = sample();
    let names: Vec<_> = m.restore_order().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["webapp-123", "sidecar", "app"]);
}

#[test]
fn dumped_containers_need_their_images_under_the_versions_name() {
    let digest = || FileDigest {
        size: 1,
        digest: "00".into(),
    };
    for (version, images, other) in [(3, "checkpoint", "criu"), (2, "criu", "checkpoint")] {
        let mut m = sample();
        m.version = version;
        m.containers[0].dumped = true;
        m.files
            .insert(format!("containers/app/{other}/inventory.img"), digest());
        let err = Manifest::parse(&serde_json::to_vec(&m).expect("json"))
            .expect_err("the images under the other version's name");
        assert!(err.to_string().contains("CRIU images are not listed"), "{err}");
        m.files
            .insert(format!("containers/app/{images}/inventory.img"), digest());
        let parsed = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect("valid");
        assert_eq!(parsed.part_names().images, images, "version {version}");
    }
    assert_eq!(part_names(1).spec, "config.json");
    assert_eq!(part_names(VERSION).spec, "spec.dump");
}

#[test]
fn unknown_version_and_format_are_refused() {
    let mut m = sample();
    m.version = VERSION + 1;
    let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("newer");
    assert!(
        err.to_string()
            .contains(&format!("format version {} is not supported", VERSION + 1)),
        "{err}"
    );
    let mut m = sample();
    m.format = "other".into();
    assert!(Manifest::parse(&serde_json::to_vec(&m).expect("json")).is_err());
}

#[test]
fn escaping_paths_are_refused() {
    for bad in ["/etc/passwd", "../x", "a/../../b", ""] {
        let mut m = sample();
        m.files.insert(
            bad.into(),
            FileDigest {
                size: 0,
                digest: String::new(),
            },
        );
        assert!(
            Manifest::parse(&serde_json::to_vec(&m).expect("json")).is_err(),
            "{bad:?} accepted"
        );
    }
    let mut m = sample();
    m.containers[0].name = "..".into();
    assert!(Manifest::parse(&serde_json::to_vec(&m).expect("json")).is_err());
}

fn write_checkpoint(dir: &Path) -> Manifest {
    let mut m = sample();
    std::fs::create_dir_all(dir.join("containers/app")).expect("mkdir");
    std::fs::write(dir.join("containers/app/config.json"), b"{}").expect("write");
    m.files.insert(
        "containers/app/config.json".into(),
        FileDigest {
            size: 2,
            digest: DigestAlgorithm::WRITTEN
                .file(&dir.join("containers/app/config.json"))
                .expect("digest"),
        },
    );
    std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).expect("json")).expect("write");
    m
}

#[test]
fn verified_load_catches_flipped_byte_and_missing_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let m = write_checkpoint(root.path());
    assert_eq!(Manifest::load_verified(root.path()).expect("valid"), m);
    std::fs::write(root.path().join("containers/app/config.json"), b"{]").expect("flip");
    let err = Manifest::load_verified(root.path())
        .expect_err("flipped")
        .to_string();
    assert!(err.contains("is damaged"), "{err}");
    std::fs::remove_file(root.path().join("containers/app/config.json")).expect("rm");
    let err = Manifest::load_verified(root.path())
        .expect_err("missing")
        .to_string();
    assert!(err.contains("containers/app/config.json"), "{err}");
}

#[test]
fn the_digest_algorithm_is_named_and_an_unknown_one_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path();
    write_checkpoint(dir);
    let path = dir.join(MANIFEST);
    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    assert_eq!(written["digest_algorithm"], "blake3");
    assert_eq!(written["version"], VERSION);
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut m = written.clone();
        f(&mut m);
        std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write");
        Manifest::load_verified(dir).map_err(|e| e.to_string())
    };
    for (what, change) in [
        (
            "unknown",
            &(|m: &mut serde_json::Value| m["digest_algorithm"] = "md5".into())
                as &dyn Fn(&mut serde_json::Value),
        ),
        ("not a name", &|m: &mut serde_json::Value| {
            m["digest_algorithm"] = 3.into()
        }),
    ] {
        let err = edit(change).expect_err(what);
        assert!(
            err.contains("is not supported (this podsnap verifies sha256 and blake3)"),
            "{what}: {err}"
        );
    }
    let err = edit(&|m| {
        m.as_object_mut().expect("object").remove("digest_algorithm");
    })
    .expect_err("unnamed");
    assert!(err.contains("names no digest_algorithm"), "{err}");
    // The BLAKE3 digest verified as SHA-256 (a downgrade) does not match.
    let err = edit(&|m| m["digest_algorithm"] = "sha256".into()).expect_err("other algorithm");
    assert!(err.contains("its SHA-256 does not match"), "{err}");
    edit(&|_| {}).expect("as written");
}

#[test]
fn version_1_checkpoints_still_verify_with_sha256() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path();
    write_checkpoint(dir);
    let file = dir.join("containers/app/config.json");
    let path = dir.join(MANIFEST);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    m["version"] = 1.into();
    m.as_object_mut().expect("object").remove("digest_algorithm");
    m["files"]["containers/app/config.json"] = serde_json::json!({
        "size": 2, "sha256": sha256_file(&file).expect("digest")
    });
    std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write");
    let loaded = Manifest::load_verified(dir).expect("a version 1 checkpoint verifies");
    assert_eq!(loaded.digest_algorithm, DigestAlgorithm::Sha256);
    std::fs::write(&file, b"{]").expect("flip");
    let err = Manifest::load_verified(dir).expect_err("flipped").to_string();
    assert!(err.contains("its SHA-256 does not match"), "{err}");
    m["digest_algorithm"] = "blake3".into();
    std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write");
    let err = Manifest::load_listed(dir)
        .expect_err("v1 with blake3")
        .to_string();
    assert!(err.contains("version 1 digests with SHA-256 only"), "{err}");
}

#[test]
fn blake3_digests_match_the_reference_and_span_blocks() {
    let t = tempfile::tempdir().expect("tempdir");
    let p = t.path().join("f");
    // Larger than one read block, not a multiple of it.
    let data: Vec<u8> = (0..(9u32 << 20) + 12345).map(|i| (i % 251) as u8).collect();
    std::fs::write(&p, &data).expect("write");
    assert_eq!(
        blake3_file(&p).expect("digest"),
        blake3::hash(&data).to_hex().to_string()
    );
    std::fs::write(&p, b"").expect("write");
    assert_eq!(
        blake3_file(&p).expect("digest"),
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    );
}

#[test]
fn unlisted_files_and_directories_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path();
    write_checkpoint(dir);
    Manifest::load_listed(dir).expect("exactly as listed");
    std::fs::write(dir.join("containers/app/rootfs-diff.tar"), b"sneaked in").expect("write");
    let err = Manifest::load_listed(dir).expect_err("unlisted").to_string();
    assert!(err.contains("rootfs-diff.tar is not listed"), "{err}");
    std::fs::remove_file(dir.join("containers/app/rootfs-diff.tar")).expect("rm");
    std::fs::create_dir(dir.join("volumes")).expect("mkdir");
    let err = Manifest::load_listed(dir).expect_err("empty dir").to_string();
    assert!(err.contains("volumes/ is not part of the checkpoint"), "{err}");
    std::fs::remove_dir(dir.join("volumes")).expect("rm");
    std::os::unix::fs::symlink("/etc/passwd", dir.join("containers/x")).expect("symlink");
    let err = Manifest::load_listed(dir).expect_err("symlink").to_string();
    assert!(err.contains("containers/x is a symlink"), "{err}");
    std::fs::remove_file(dir.join("containers/x")).expect("rm");
    std::fs::write(dir.join("containers/app/config.json"), b"{}\n").expect("grow");
    let err = Manifest::load_listed(dir).expect_err("size").to_string();
    assert!(err.contains("has 3 bytes, the manifest says 2"), "{err}");
}

#[test]
fn caps_and_recorded_states_are_checked() {
    let mut m = sample();
    m.files.insert(
        "containers/app/config.json".into(),
        FileDigest {
            size: MAX_JSON_BYTES + 1,
            digest: String::new(),
        },
    );
    let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("cap");
    assert!(err.to_string().contains("more than"), "{err}");
    let mut m = sample();
    m.containers[0].state = ContainerState::Stopped;
    let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("exit code");
    assert!(err.to_string().contains("without an exit code"), "{err}");
    let mut m = sample();
    m.containers[0].dumped = true;
    let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("images");
    assert!(err.to_string().contains("CRIU images are not listed"), "{err}");
    let mut m = sample();
    m.containers[2].name = "app".into();
    assert!(Manifest::parse(&serde_json::to_vec(&m).expect("json")).is_err());
}

#[test]
fn unix_links_are_checked() {
    let end = |container: &str, ino: u64| UnixEnd {
        container: container.into(),
        ino,
    };
    // `sidecar` and `app` dumped, their images listed.
    let dumped = || {
        let mut m = sample();
        for c in m.containers.iter_mut().filter(|c| c.name != "webapp-123") {
            c.dumped = true;
            let inventory = c.file("checkpoint/inventory.img");
            m.files.insert(
                inventory,
                FileDigest {
                    size: 0,
                    digest: String::new(),
                },
            );
        }
        m
    };
    let with = |ends: [UnixEnd; 2]| {
        let mut m = dumped();
        m.unix_links.push(UnixLink {
            kind: UnixKind::Stream,
            ends,
        });
        Manifest::parse(&serde_json::to_vec(&m).expect("json"))
    };
    let ok = with([end("app", 10), end("sidecar", 11)]).expect("a link between two dumped containers");
    assert_eq!(ok.unix_links.len(), 1);
    for (ends, says) in [
        ([end("app", 10), end("app", 11)], "both ends"),
        ([end("app", 10), end("webapp-123", 11)], "holds no images"),
        ([end("app", 10), end("nobody", 11)], "holds no images"),
        ([end("app", 0), end("sidecar", 11)], "inode 0"),
        ([end("app", 1 << 40), end("sidecar", 11)], "inode"),
    ] {
        let err = with(ends).expect_err("refused").to_string();
        assert!(err.contains(says), "{says}: {err}");
    }
    let mut m = dumped();
    let link = UnixLink {
        kind: UnixKind::Stream,
        ends: [end("app", 10), end("sidecar", 11)],
    };
    m.unix_links = vec![link.clone(), link];
    let err = Manifest::parse(&serde_json::to_vec(&m).expect("json")).expect_err("twice");
    assert!(err.to_string().contains("linked twice"), "{err}");
}

#[test]
fn adopted_processes_are_checked() {
    let mut m = sample();
    m.containers[2].dumped = true;
    let listed = |m: &mut Manifest, rel: String| {
        m.files.insert(
            rel,
            FileDigest {
                size: 0,
                digest: String::new(),
            },
        )
    };
    let images = m.containers[2].file("checkpoint/inventory.img");
    listed(&mut m, images);
    let adopted = AdoptedProcess {
        container: m.containers[2].name.clone(),
        pid: 12,
    };
    listed(&mut m, format!("{}/inventory.img", adopted.images(PART_NAMES)));
    m.adopted.push(adopted.clone());
    let parse = |m: &Manifest| Manifest::parse(&serde_json::to_vec(m).expect("json"));
    assert_eq!(parse(&m).expect("valid").adopted, vec![adopted.clone()]);
    for (edit, says) in [
        (
            AdoptedProcess {
                pid: 13,
                ..adopted.clone()
            },
            "no CRIU images",
        ),
        (
            AdoptedProcess {
                pid: 1,
                ..adopted.clone()
            },
            "not a valid",
        ),
        (
            AdoptedProcess {
                pid: 1 << 30,
                ..adopted.clone()
            },
            "not a valid",
        ),
        (
            AdoptedProcess {
                container: "app".into(),
                ..adopted.clone()
            },
            "holds no images",
        ),
    ] {
        let mut bad = m.clone();
        bad.adopted = vec![edit];
        let err = parse(&bad).expect_err("refused").to_string();
        assert!(err.contains(says), "{says}: {err}");
    }
    let mut twice = m.clone();
    twice.adopted.push(adopted);
    assert!(parse(&twice).expect_err("twice").to_string().contains("single"));
}

/// Property: arbitrary bytes never make the parser panic, and whatever it accepts has only
/// safe paths and names.
#[test]
fn parser_survives_arbitrary_input() {
    let base = serde_json::to_vec(&sample()).expect("json");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..5000 {
        let mut bytes = base.clone();
        let flips = 1 + (next() % 8) as usize;
        for _ in 0..flips {
            let i = (next() as usize) % bytes.len();
            bytes[i] = (next() & 0xff) as u8;
        }
        if next() % 4 == 0 {
            bytes.truncate((next() as usize) % bytes.len());
        }
        if let Ok(m) = Manifest::parse(&bytes) {
            assert!(m.files.keys().all(|p| safe_relative(p).is_ok()));
            assert!(m.containers.iter().all(|c| validate_name(&c.name).is_ok()));
        }
    }
}
