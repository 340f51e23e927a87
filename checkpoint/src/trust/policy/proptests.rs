//! Properties of the restore policy checks, whose inputs come from a checkpoint (its recorded
//! specs, images and host): any input answers without panicking, and nothing is more privilege
//! than itself.

use proptest::prelude::*;

use super::*;
use crate::testkit::{cases, mutate_json};

/// A container spec with every part the privilege check compares.
fn spec_json() -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": true},
        "process": {
            "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
            "args": ["sh"],
            "cwd": "/",
            "noNewPrivileges": true,
            "apparmorProfile": "runtime/default",
            "selinuxLabel": "system_u:system_r:container_t:s0",
            "capabilities": {
                "bounding": ["CAP_CHOWN", "CAP_KILL"],
                "effective": ["CAP_CHOWN"],
                "permitted": ["CAP_CHOWN"],
            },
        },
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/1/ns/net"}, {"type": "mount"}],
            "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
            "resources": {"devices": [{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}]},
            "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]},
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
        },
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(1000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A mutated spec is no more privilege than itself, and comparing it with the original
    /// either way answers.
    #[test]
    fn a_spec_is_no_more_privilege_than_itself(picks in prop::collection::vec(any::<(u32, u8, u32)>(), 0..6)) {
        let base: Spec = serde_json::from_value(spec_json()).expect("spec");
        let mut v = spec_json();
        mutate_json(&mut v, &picks);
        if let Ok(spec) = serde_json::from_value::<Spec>(v) {
            prop_assert_eq!(check_privilege("c", &spec, &spec), Ok(()));
            let _ = check_privilege("c", &base, &spec);
            let _ = check_privilege("c", &spec, &base);
        }
    }

    /// Image names, ids and host versions from a checkpoint: any text answers; a name is the
    /// same image as itself and a host can run what it took.
    #[test]
    fn images_and_hosts_take_any_text(
        a in "\\PC{0,40}",
        b in "[a-z0-9./:@-]{0,40}",
        version in "\\PC{0,16}",
        arch in "\\PC{0,8}",
    ) {
        prop_assert!(same_image_name(&a, &a));
        let _ = same_image_name(&a, &b);
        let _ = image_repository(&a);
        let _ = image_repository(&b);
        let host = HostInfo {
            criu_version: version.clone(),
            runc_version: version.clone(),
            kernel: version.clone(),
            arch,
            node_id: String::new(),
        };
        prop_assert_eq!(check_host(&host, &host), Ok(()));
        let _ = check_host(&host, &HostInfo::default());
        let _ = check_host(&HostInfo::default(), &host);
    }
}
