//! `packaging/deploy` as `kubectl apply -k` sees it: rendered by kubectl 1.36's kustomize (the
//! one install-deps puts in /usr/local/lib/podsnap/kubectl), and every object deserialized into
//! the Kubernetes API types of that release (k8s-openapi) and serialized back: the round trip
//! must give the same document, so a misspelt or misplaced field (which the types ignore)
//! fails. Then what the objects must say for the installer to work: the RuntimeClass selects
//! the label the installer sets, the DaemonSet's privileges, mounts and arguments, RBAC, the
//! node configuration parses.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use podsnap_coordinator::node::kube::{READY_LABEL, READY_VALUE};

/// The kubectl install-deps installs beside the system's.
const KUBECTL: &str = "/usr/local/lib/podsnap/kubectl/kubectl";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/deploy")
}

/// `kubectl kustomize packaging/deploy`, as JSON values.
fn render() -> Vec<serde_json::Value> {
    assert!(
        Path::new(KUBECTL).is_file(),
        "{KUBECTL} is missing: packaging/install-deps.sh installs sid's kubectl there"
    );
    let output = Command::new(KUBECTL)
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
        .expect("running kubectl kustomize");
    assert!(
        output.status.success(),
        "kubectl kustomize failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("UTF-8 YAML");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("a YAML document");
            serde_json::to_value(value).expect("YAML that maps to JSON")
        })
        .collect()
}

/// Deserializes `value` into `T` and back; the documents must be equal.
fn round_trip<T>(value: &serde_json::Value) -> Result<T, String>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| format!("does not deserialize: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back != value {
        return Err(format!(
            "fields the API types do not know (misspelt or misplaced):\n  written: {value}\n  typed:   {back}"
        ));
    }
    Ok(typed)
}

/// Checks one object by its kind; returns its kind.
fn check(value: &serde_json::Value) -> Result<String, String> {
    let api = value["apiVersion"].as_str().unwrap_or_default();
    let kind = value["kind"].as_str().unwrap_or_default();
    let name = value["metadata"]["name"].as_str().unwrap_or_default();
    let cluster_scoped = matches!(
        kind,
        "Namespace"
            | "ClusterRole"
            | "ClusterRoleBinding"
            | "RuntimeClass"
            | "ValidatingAdmissionPolicy"
            | "ValidatingAdmissionPolicyBinding"
    );
    let namespace = value["metadata"]["namespace"].as_str();
    if cluster_scoped && namespace.is_some() {
        return Err(format!("{kind} {name} is cluster-scoped but has a namespace"));
    }
    if !cluster_scoped && namespace != Some("podsnap-system") {
        return Err(format!("{kind} {name} is not in podsnap-system: {namespace:?}"));
    }
    let result = match (api, kind) {
        ("v1", "Namespace") => round_trip::<Namespace>(value).map(drop),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(value).map(drop),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(value).map(drop),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(value).map(drop),
        ("node.k8s.io/v1", "RuntimeClass") => round_trip::<RuntimeClass>(value).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(value).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(value).map(drop)
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
            round_trip::<ValidatingAdmissionPolicy>(value).map(drop)
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
            round_trip::<ValidatingAdmissionPolicyBinding>(value).map(drop)
        }
        _ => Err(format!("{api} {kind} is not a kind this check knows: add it")),
    };
    result
        .map(|()| kind.to_owned())
        .map_err(|e| format!("{kind} {name}: {e}"))
}

fn find<'a>(objects: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn the_deploy_tree_renders_into_valid_kubernetes_objects() {
    let objects = render();
    let mut kinds: Vec<String> = objects
        .iter()
        .map(|o| check(o).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "RuntimeClass",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );

    // The RuntimeClass: podsnap's handler, only on nodes the installer has labelled.
    let class: RuntimeClass = round_trip(find(&objects, "RuntimeClass")).expect("typed");
    assert_eq!(class.handler, "podsnap");
    assert_eq!(
        class
            .scheduling
            .and_then(|s| s.node_selector)
            .and_then(|n| n.get(READY_LABEL).cloned())
            .as_deref(),
        Some(READY_VALUE),
        "the RuntimeClass selects the label the installer sets"
    );

    // The DaemonSet: install --wait with the label, the host at /host, privileged, hostPID.
    let ds: DaemonSet = round_trip(find(&objects, "DaemonSet")).expect("typed");
    let pod = ds.spec.and_then(|s| s.template.spec).expect("a pod spec");
    assert_eq!(pod.host_pid, Some(true), "systemctl runs in PID 1's namespaces");
    assert_eq!(pod.service_account_name.as_deref(), Some("podsnap-node"));
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        grace >= 120,
        "time for an uninstall's containerd restart: {grace}"
    );
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default();
    for wanted in [
        "node",
        "install",
        "--host-root=/host",
        "--wait",
        "--label-node=$(NODE_NAME)",
    ] {
        assert!(args.iter().any(|a| a == wanted), "{wanted} in {args:?}");
    }
    let env = container.env.clone().unwrap_or_default();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );
    assert_eq!(
        container.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host = volumes
        .iter()
        .find(|v| v.name == "host")
        .expect("the host volume");
    assert_eq!(host.host_path.as_ref().map(|h| h.path.as_str()), Some("/"));
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    assert!(mounts.iter().any(|m| m.name == "host" && m.mount_path == "/host"));
    // The ConfigMap the DaemonSet mounts is the generated one, and a valid node configuration.
    let config_volume = volumes
        .iter()
        .find_map(|v| v.config_map.as_ref())
        .expect("a ConfigMap volume");
    let config_map: ConfigMap = round_trip(find(&objects, "ConfigMap")).expect("typed");
    assert_eq!(
        Some(config_volume.name.as_str()),
        config_map.metadata.name.as_deref()
    );
    let text = config_map
        .data
        .and_then(|d| d.get("config.toml").cloned())
        .expect("config.toml in the ConfigMap");
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write");
    podsnap_coordinator::NodeConfig::read(file.path()).expect("the ConfigMap's node configuration parses");

    // RBAC: patch on nodes, bound to the installer's service account.
    let role: ClusterRole = round_trip(find(&objects, "ClusterRole")).expect("typed");
    assert!(role.rules.unwrap_or_default().iter().any(|r| {
        r.resources
            .as_deref()
            .unwrap_or_default()
            .contains(&"nodes".to_owned())
            && r.verbs.contains(&"patch".to_owned())
    }));
    let binding: ClusterRoleBinding = round_trip(find(&objects, "ClusterRoleBinding")).expect("typed");
    let subject = &binding.subjects.unwrap_or_default()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "podsnap-node", Some("podsnap-system"))
    );
}

#[test]
fn the_check_catches_a_misspelt_field() {
    // The check itself: a field the type does not have fails the round trip.
    let objects = render();
    let mut ds = find(&objects, "DaemonSet").clone();
    check(&ds).expect("the rendered DaemonSet passes");
    let spec = ds["spec"]["template"]["spec"].as_object_mut().expect("pod spec");
    let value = spec.remove("hostPID").expect("hostPID");
    spec.insert("hostPid".to_owned(), value);
    let err = check(&ds).expect_err("hostPid is not a field");
    assert!(err.contains("hostPid"), "{err}");
}
