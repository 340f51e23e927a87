use super::*;
use crate::format::record::{ContainerState, Role};
use std::collections::BTreeMap;

fn policy() -> RestorePolicy {
    RestorePolicy::default()
}

#[test]
fn own_namespace_only_by_default() {
    assert!(check_namespace(&policy(), Some("alpha"), "alpha", "cfg").is_ok());
    let v = check_namespace(&policy(), Some("alpha"), "beta", "cfg").expect_err("cross");
    assert_eq!(v.rule, "namespace");
    assert!(
        v.reason.contains("\"alpha\"") && v.reason.contains("\"beta\""),
        "{v:?}"
    );
    assert!(check_namespace(&policy(), None, "beta", "cfg").is_err());
}

#[test]
fn the_policy_widens_and_narrows() {
    let mut p = policy();
    p.allow_from = BTreeMap::from([("beta".into(), vec!["alpha".into()])]);
    assert!(check_namespace(&p, Some("alpha"), "beta", "cfg").is_ok());
    assert!(check_namespace(&p, Some("beta"), "alpha", "cfg").is_err());
    p.allow_from = BTreeMap::from([("*".into(), vec!["shared".into()])]);
    assert!(check_namespace(&p, Some("shared"), "anyone", "cfg").is_ok());
    p.namespaces = Some(vec!["alpha".into()]);
    let v = check_namespace(&p, Some("beta"), "beta", "cfg").expect_err("narrowed");
    assert_eq!(v.rule, "restore.namespaces");
    p.enabled = false;
    let v = check_namespace(&p, Some("alpha"), "alpha", "cfg").expect_err("off");
    assert_eq!(v.rule, "restore.enabled");
}

fn entry(image: &str) -> ContainerEntry {
    ContainerEntry {
        name: "app".into(),
        id: "c".into(),
        role: Role::Container,
        image: Some(image.into()),
        image_id: Some("sha256:aaa".into()),
        image_digest: None,
        rootfs_layers: vec!["/s/2/fs".into(), "/s/1/fs".into()],
        created_order: 1,
        started_order: Some(1),
        state: ContainerState::Running,
        exit_code: None,
        dumped: true,
        cri_config: None,
    }
}

#[test]
fn images_must_match_by_name_id_and_layers() {
    let e = entry("docker.io/library/busybox:latest");
    let layers = vec!["/s/2/fs".to_string(), "/s/1/fs".to_string()];
    let same = NewImage {
        name: Some("busybox"),
        id: Some("sha256:aaa"),
        layers: Some(&layers),
        same_node: true,
    };
    assert!(check_image(&e, &same).is_ok());
    let other_name = NewImage {
        name: Some("alpine"),
        ..same.clone()
    };
    assert_eq!(check_image(&e, &other_name).expect_err("name").rule, "image");
    let other_id = NewImage {
        id: Some("sha256:bbb"),
        ..same.clone()
    };
    assert!(check_image(&e, &other_id).is_err());
    let moved = vec!["/s/3/fs".to_string()];
    let other_layers = NewImage {
        layers: Some(&moved),
        ..same.clone()
    };
    assert!(check_image(&e, &other_layers).is_err());
    let elsewhere = NewImage {
        layers: Some(&moved),
        same_node: false,
        ..same
    };
    assert!(check_image(&e, &elsewhere).is_ok(), "layers are node-local");
}

fn spec(extra: serde_json::Value) -> Spec {
    let mut base = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "args": ["sh"], "cwd": "/",
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [1000]},
            "noNewPrivileges": true,
            "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"],
                             "permitted": ["CAP_CHOWN"]},
            "apparmorProfile": "cri-default"
        },
        "root": {"path": "rootfs", "readonly": true},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/a"},
                           {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
            "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
            "resources": {"devices": [{"allow": false, "access": "rwm"}]}
        }
    });
    merge(&mut base, extra);
    serde_json::from_value(base).expect("spec")
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

#[test]
fn the_same_spec_is_not_more_privilege() {
    let old = spec(serde_json::json!({}));
    let new = spec(serde_json::json!({"linux": {"namespaces": [
        {"type": "pid"}, {"type": "network", "path": "/var/run/netns/other"},
        {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}}));
    assert!(check_privilege("app", &old, &new).is_ok());
    let less = spec(serde_json::json!({"process": {"capabilities": {"bounding": []}}}));
    assert!(check_privilege("app", &old, &less).is_ok());
}

#[test]
fn every_kind_of_escalation_is_named() {
    let old = spec(serde_json::json!({}));
    let cases = [
        (
            serde_json::json!({"process": {"user": {"uid": 0}}}),
            "runs as 0:1000",
        ),
        (
            serde_json::json!({"process": {"user": {"additionalGids": [1000, 0]}}}),
            "supplementary groups [0]",
        ),
        (
            serde_json::json!({"process": {"capabilities": {"bounding": ["CAP_CHOWN", "CAP_SYS_ADMIN"]}}}),
            "bounding capabilities CAP_SYS_ADMIN added",
        ),
        (
            serde_json::json!({"process": {"noNewPrivileges": false}}),
            "no_new_privileges dropped",
        ),
        (
            serde_json::json!({"process": {"apparmorProfile": "unconfined"}}),
            "AppArmor profile",
        ),
        (serde_json::json!({"root": {"readonly": false}}), "read-only root"),
        (
            serde_json::json!({"linux": {"seccomp": null}}),
            "seccomp filter removed",
        ),
        (
            serde_json::json!({"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}}),
            "different seccomp",
        ),
        (
            serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]}}),
            "host's network namespace",
        ),
        (
            serde_json::json!({"linux": {"devices": [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]}}),
            "device nodes /dev/sda",
        ),
        (
            serde_json::json!({"linux": {"resources": {"devices": [{"allow": true, "access": "rwm"}]}}}),
            "device access",
        ),
        (
            serde_json::json!({"linux": {"maskedPaths": []}}),
            "masked paths /proc/kcore uncovered",
        ),
        (
            serde_json::json!({"linux": {"readonlyPaths": []}}),
            "read-only paths /proc/sys uncovered",
        ),
    ];
    for (change, want) in cases {
        let new = spec(change.clone());
        let v = check_privilege("app", &old, &new).expect_err(&change.to_string());
        assert_eq!(v.rule, "privilege");
        assert!(v.reason.contains(want), "{change}: {}", v.reason);
    }
}

#[test]
fn hosts_must_be_able_to_run_the_images() {
    let rec = HostInfo {
        criu_version: "4.2.1".into(),
        runc_version: "1.1.5".into(),
        kernel: "6.18.0".into(),
        arch: "x86_64".into(),
        node_id: "n1".into(),
    };
    assert!(check_host(&rec, &rec).is_ok());
    let newer = HostInfo {
        criu_version: "4.3".into(),
        kernel: "6.19.1-custom".into(),
        ..rec.clone()
    };
    assert!(check_host(&rec, &newer).is_ok());
    let old = HostInfo {
        criu_version: "4.1.1".into(),
        kernel: "6.1.0".into(),
        arch: "aarch64".into(),
        ..rec.clone()
    };
    let v = check_host(&rec, &old).expect_err("old");
    assert_eq!(v.rule, "compatibility");
    for want in ["aarch64", "CRIU 4.1.1", "6.1.0"] {
        assert!(v.reason.contains(want), "{}", v.reason);
    }
}

#[test]
fn host_paths_are_allowed_by_whole_resolved_components() {
    let t = tempfile::tempdir().expect("tempdir");
    let base = std::fs::canonicalize(t.path()).expect("canonical");
    for d in ["etc/ssl", "etcfoo", "allowed/sub", "secret"] {
        std::fs::create_dir_all(base.join(d)).expect("mkdir");
    }
    std::os::unix::fs::symlink(base.join("secret"), base.join("allowed/link")).expect("symlink");
    std::os::unix::fs::symlink(base.join("gone"), base.join("allowed/dangling")).expect("symlink");
    let mut p = policy();
    p.host_paths = vec![base.join("etc/"), base.join("secret/../allowed")];
    let check = |source: PathBuf| check_host_path(&p, "app", "/mnt", &source, "cfg");
    for (source, resolved) in [
        (base.join("etc"), base.join("etc")),
        (base.join("etc/ssl"), base.join("etc/ssl")),
        (base.join("etc//ssl/./"), base.join("etc/ssl")),
        (base.join("etc/ssl/not-yet"), base.join("etc/ssl/not-yet")),
        (base.join("allowed/sub"), base.join("allowed/sub")),
        (base.join("etcfoo/../etc/ssl"), base.join("etc/ssl")),
    ] {
        assert_eq!(check(source.clone()), Ok(resolved), "{}", source.display());
    }
    for (source, named) in [
        (base.join("etcfoo"), base.join("etcfoo")),
        (base.join("allowed/../etcfoo"), base.join("etcfoo")),
        (base.join("allowed/link"), base.join("secret")),
        (base.join("allowed/link/x"), base.join("secret/x")),
        (base.clone(), base.clone()),
    ] {
        let v = check(source.clone()).expect_err(&source.display().to_string());
        assert_eq!(v.rule, "restore.host_paths");
        assert!(
            v.reason.contains(&format!("host path {} ", named.display()))
                && v.reason.contains("container app")
                && v.reason.contains("cfg"),
            "{}: {}",
            source.display(),
            v.reason
        );
    }
    for (source, why) in [
        (base.join("allowed/nothing/../../etcfoo"), "'..'"),
        (base.join("allowed/dangling"), "a symlink to nothing"),
        (PathBuf::from("etc"), "not an absolute path"),
    ] {
        let v = check(source.clone()).expect_err(&source.display().to_string());
        assert!(v.reason.contains(why), "{}: {}", source.display(), v.reason);
    }
    // None allowed by default, / allows every path.
    let v = check_host_path(&policy(), "app", "/mnt", &base.join("etc"), "cfg");
    assert!(v.is_err());
    p.host_paths = vec![PathBuf::from("/")];
    assert!(check_host_path(&p, "app", "/mnt", &base.join("etcfoo"), "cfg").is_ok());
}

#[test]
fn image_names_normalize_like_docker() {
    assert!(same_image_name("busybox", "docker.io/library/busybox:latest"));
    assert!(same_image_name(
        "localhost/podsnap/workload:1",
        "localhost/podsnap/workload:1"
    ));
    assert!(!same_image_name("busybox:1", "busybox:2"));
    assert!(!same_image_name("a/b", "c/b"));
}

#[test]
fn a_tag_and_a_digest_of_one_repository_agree() {
    for (reference, repository) in [
        ("busybox", "docker.io/library/busybox"),
        ("busybox:1.36", "docker.io/library/busybox"),
        ("docker.io/library/busybox@sha256:ab", "docker.io/library/busybox"),
        ("team/app:v1", "docker.io/team/app"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app"),
        ("127.0.0.1:5000/team/app@sha256:ab", "127.0.0.1:5000/team/app"),
        ("localhost/podsnap/workload:1", "localhost/podsnap/workload"),
    ] {
        assert_eq!(image_repository(reference), repository, "{reference}");
    }
}
