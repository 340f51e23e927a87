//! The shim's answer to containerd's runtime info request (`containerd-shim-podsnap-v1 -info`,
//! behind containerd's Introspection `PluginInfo` for the task runtime): the same answer
//! containerd's runc shim gives, since podsnap runs containers with runc. Its name and version,
//! the runc options it was handed, and runc's own features (`runc features`: OCI versions,
//! hooks, mount options such as `rro`, namespaces, seccomp), which containerd reads to decide
//! what the runtime supports (recursive read-only mounts, user namespaces).
//!
//! This runs before the shim's reaper is set up, as a plain process: `runc features` is waited
//! for directly.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// The type containerd registers for runtime-spec's `features.Features` (JSON-encoded).
pub const FEATURES_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The runtime info of `runtime_id`, given containerd's runtime options.
pub fn runtime_info(runtime_id: &str, options: Option<&Any>) -> containerd_shim::Result<RuntimeInfo> {
    let mut info = RuntimeInfo {
        name: runtime_id.to_owned(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut binary = "runc".to_owned();
    let opts = crate::options::runc_options(options)
        .map_err(|e| containerd_shim::Error::InvalidArgument(e.to_string()))?;
    if let (Some(opts), Some(any)) = (opts, options) {
        if !opts.binary_name.is_empty() {
            binary = opts.binary_name.clone();
        }
        info.options = MessageField::some(any.clone());
    }
    if let Some(json) = runc_features(&binary) {
        info.features = MessageField::some(Any {
            type_url: FEATURES_TYPE_URL.to_owned(),
            value: json,
            ..Default::default()
        });
    }
    Ok(info)
}

/// `runc features` (JSON), if this runc has the command.
fn runc_features(binary: &str) -> Option<Vec<u8>> {
    let out = std::process::Command::new(binary)
        .arg("features")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let valid = out.status.success() && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok();
    valid.then_some(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::Message;
    use containerd_shim::protos::shim::oci::Options;

    /// runc `Options` naming `binary`, as containerd sends them.
    fn runc_options(binary: &str) -> Any {
        let opts = Options {
            binary_name: binary.into(),
            root: "/run/x".into(),
            ..Default::default()
        };
        Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: opts.write_to_bytes().expect("encode"),
            ..Default::default()
        }
    }

    #[test]
    fn the_answer_names_the_runtime_and_echoes_runc_options() {
        let info = runtime_info("io.containerd.podsnap.v1", Some(&runc_options("runc"))).expect("info");
        assert_eq!(info.name, "io.containerd.podsnap.v1");
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.options.type_url, "containerd.runc.v1.Options");
        // runc is installed wherever the tests run: its features come along, as JSON.
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        let features: serde_json::Value = serde_json::from_slice(&info.features.value).expect("JSON");
        assert!(features["ociVersionMax"].is_string(), "{features}");
    }

    #[test]
    fn a_runtime_without_features_answers_without_them() {
        let info = runtime_info("io.containerd.podsnap.v1", Some(&runc_options("/bin/false"))).expect("info");
        assert!(info.features.is_none());
    }
}
