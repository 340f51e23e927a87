//! Properties of the node configuration reader: a full configuration file, mutated, parses or
//! is refused, and what parses holds the checks `parse` promises.

use proptest::prelude::*;

use super::*;
use crate::testkit::{cases, mutate, Mutation};

const FULL: &str = r#"
checkpoint_root = "/var/lib/podsnap/checkpoints"

[dump]
deadline_seconds = 120
reserve_bytes = 10737418240
digests = "early"
network_lock = "pod"

[retention]
max_per_pod = 3
max_total_bytes = 53687091200
max_age_seconds = 604800

[restore]
enabled = true
namespaces = ["team-a", "team-b"]

[restore.allow_from]
team-b = ["team-a"]
"*" = ["shared"]

[registry]
allowed = ["127.0.0.1:5000", "registry.example.com"]
insecure = ["registry.lan:5000"]
signing_key = "/etc/podsnap/signing.pem"
trusted_keys = ["/etc/podsnap/trusted/node-a.pub"]
allow_unsigned = false
"#;

#[test]
fn the_full_file_parses() {
    let c = NodeConfig::parse(FULL).expect("valid");
    assert_eq!(c.retention.max_per_pod, Some(3));
    assert!(c.registry.allows("registry.example.com:443"));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// A mutated configuration: parsed with its checks holding, or refused.
    #[test]
    fn mutated_configurations_parse_or_are_refused(m in prop::collection::vec(any::<Mutation>(), 1..8)) {
        let text = String::from_utf8_lossy(&mutate(FULL.as_bytes(), &m)).into_owned();
        if let Ok(c) = NodeConfig::parse(&text) {
            prop_assert!(c.checkpoint_root.as_ref().is_none_or(|r| r.is_absolute()));
            prop_assert_ne!(c.retention.max_per_pod, Some(0));
            let r = &c.registry;
            prop_assert!(r.signing_key.iter().chain(&r.trusted_keys).all(|k| k.is_absolute()));
            prop_assert!(r.allowed.iter().chain(&r.insecure).all(|e| !e.trim().is_empty() && !e.contains('/')));
        }
    }

    /// Registry matching and dump deadlines take any text.
    #[test]
    fn registry_names_and_deadlines_take_any_text(
        entry in "\\PC{0,30}",
        registry in "\\PC{0,30}",
        annotation in "\\PC{0,12}",
        request in proptest::option::of(0u64..1000),
    ) {
        let policy = RegistryPolicy {
            allowed: vec![entry.clone()],
            insecure: vec![entry.clone()],
            ..RegistryPolicy::default()
        };
        let _ = registry_matches(&entry, &registry);
        let _ = policy.allows(&registry);
        let _ = policy.is_insecure(&registry);
        let request = request.map(std::time::Duration::from_secs);
        if let Ok(d) = DumpPolicy::default().deadline(Some(&annotation), request) {
            prop_assert!(request.is_none_or(|r| d <= r));
        }
    }
}
