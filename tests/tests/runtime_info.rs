//! containerd asks a runtime what it supports through the shim's runtime info (Introspection
//! `PluginInfo`, which runs `containerd-shim-podsnap-v1 -info`): podsnap answers as containerd's
//! runc shim does, so containerd sees the same OCI features for both (recursive read-only
//! mounts among them).

use podsnap_tests::containerd_api::ContainerdApi;
use podsnap_tests::start_node;

#[test]
fn podsnap_reports_the_same_runtime_features_as_runc() {
    let node = start_node!();
    let api = ContainerdApi::connect(&node.address(), "k8s.io").expect("containerd API");
    let podsnap = api
        .runtime_info("io.containerd.podsnap.v1")
        .expect("podsnap's runtime info");
    let runc = api
        .runtime_info("io.containerd.runc.v2")
        .expect("runc's runtime info");
    assert_eq!(podsnap.name, "io.containerd.podsnap.v1");
    assert!(
        podsnap.version.as_ref().is_some_and(|v| !v.version.is_empty()),
        "{podsnap:?}"
    );
    let features = |info: &containerd_client::types::RuntimeInfo| -> serde_json::Value {
        let any = info.features.as_ref().expect("features");
        assert_eq!(
            any.type_url,
            "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
        );
        serde_json::from_slice(&any.value).expect("features are JSON")
    };
    let (ours, theirs) = (features(&podsnap), features(&runc));
    assert_eq!(ours, theirs, "podsnap and runc answer the same features");
    let mount_options = ours["mountOptions"].as_array().expect("mount options");
    assert!(
        mount_options.iter().any(|o| o == "rro"),
        "recursive read-only mounts are among them: {mount_options:?}"
    );
}
