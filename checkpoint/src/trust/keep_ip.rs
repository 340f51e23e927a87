//! `podsnap.io/keep-ip` that cannot keep the address says so.
//!
//! A restored pod keeps its address at the checkpoint only when the node's CNI configuration
//! hands addresses out through `podsnap-cni-ipam` (it asks its delegate for exactly that
//! address). Without it the pod comes up with a new address and every connection the
//! checkpoint holds points at one the pod no longer has. Two checks, one per way in:
//! - `podsnap restore --keep-ip` reads the network configuration containerd loaded (CRI's
//!   verbose status, `cniconfig`) before it creates anything ([`cni_keeps_addresses`]);
//! - a pod kubelet creates with the annotation: the shim compares the global addresses of the
//!   pod's network namespace with the checkpoint's before it restores any container
//!   ([`check_kept`]).

use std::net::IpAddr;

/// The IPAM plugin that keeps a restored pod's address.
pub const CNI_IPAM: &str = "podsnap-cni-ipam";

/// Whether the pod network containerd loaded (the JSON of CRI's `cniconfig` status entry)
/// allocates addresses through [`CNI_IPAM`]; the error says what the configuration lacks.
pub fn cni_keeps_addresses(cniconfig: &str) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_str(cniconfig).map_err(|e| format!("containerd's CNI status is not JSON: {e}"))?;
    let conf_dir = value["PluginConfDir"]
        .as_str()
        .unwrap_or("the CNI configuration directory");
    let networks = value["Networks"].as_array().cloned().unwrap_or_default();
    // containerd's loopback network comes first; the pod network is the one on eth0 (or any
    // that is not loopback).
    let pod_networks: Vec<_> = networks
        .iter()
        .filter(|n| {
            let plugins = n["Config"]["Plugins"].as_array();
            !plugins.is_some_and(|p| p.iter().all(|p| p["Network"]["type"] == "loopback"))
        })
        .collect();
    if pod_networks.is_empty() {
        return Err(format!("containerd loaded no pod network from {conf_dir}"));
    }
    let mut ipams = Vec::new();
    for network in &pod_networks {
        let name = network["Config"]["Name"].as_str().unwrap_or("?");
        for plugin in network["Config"]["Plugins"].as_array().into_iter().flatten() {
            let ipam = plugin["Network"]["ipam"]["type"].as_str().unwrap_or_default();
            if ipam == CNI_IPAM {
                return Ok(());
            }
            if !ipam.is_empty() {
                ipams.push(format!(
                    "{name}: {} with ipam {ipam}",
                    plugin["Network"]["type"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    Err(format!(
        "the node's CNI configuration ({conf_dir}) does not allocate addresses through {CNI_IPAM} \
         ({}): a restored pod would get a new address. Set \"ipam\": {{\"type\": \"{CNI_IPAM}\", \
         \"delegate\": {{...the current ipam...}}}} in the pod network's configuration, or \
         restore without keeping the address",
        if ipams.is_empty() {
            "no IPAM plugin found".to_owned()
        } else {
            ipams.join(", ")
        }
    ))
}

/// The refusal when a pod asked to keep its address does not have it: `None` when every
/// address of the checkpoint is the pod's now.
pub fn check_kept(wanted: &[IpAddr], now: &[IpAddr]) -> Option<String> {
    let missing: Vec<String> = wanted
        .iter()
        .filter(|ip| !now.contains(ip))
        .map(ToString::to_string)
        .collect();
    if missing.is_empty() {
        return None;
    }
    let now: Vec<String> = now.iter().map(ToString::to_string).collect();
    Some(format!(
        "podsnap.io/keep-ip: the pod's address at the checkpoint ({}) is not the pod's: it was \
         given {}. The node's CNI configuration does not allocate addresses through {CNI_IPAM}; \
         set it as the pod network's ipam (with the current one as its delegate), or restore \
         without keeping the address",
        missing.join(", "),
        if now.is_empty() {
            "none".to_owned()
        } else {
            now.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_address_check_names_both() {
        let now: Vec<IpAddr> = vec!["10.88.0.7".parse().expect("ip")];
        assert_eq!(check_kept(&["10.88.0.7".parse().expect("ip")], &now), None);
        let why = check_kept(&["10.88.0.9".parse().expect("ip")], &now).expect("refused");
        assert!(
            why.contains("(10.88.0.9)") && why.contains("given 10.88.0.7"),
            "{why}"
        );
        assert!(why.contains(CNI_IPAM), "{why}");
        let why = check_kept(&["10.88.0.9".parse().expect("ip")], &[]).expect("refused");
        assert!(why.contains("given none"), "{why}");
    }

    fn status(ipam: &str) -> String {
        serde_json::json!({
            "PluginConfDir": "/etc/cni/net.d",
            "Networks": [
                {"Config": {"Name": "cni-loopback", "Plugins": [{"Network": {"type": "loopback", "ipam": {}}}]}, "IFName": "lo"},
                {"Config": {"Name": "pods", "Plugins": [
                    {"Network": {"type": "bridge", "ipam": {"type": ipam}}},
                    {"Network": {"type": "portmap", "ipam": {}}}
                ]}, "IFName": "eth0"}
            ]
        })
        .to_string()
    }

    #[test]
    fn the_cni_configuration_must_use_podsnaps_ipam() {
        assert_eq!(cni_keeps_addresses(&status(CNI_IPAM)), Ok(()));
        let why = cni_keeps_addresses(&status("host-local")).expect_err("refused");
        assert!(why.contains("pods: bridge with ipam host-local"), "{why}");
        assert!(why.contains("/etc/cni/net.d"), "{why}");
        let none = serde_json::json!({"Networks": [
            {"Config": {"Name": "cni-loopback", "Plugins": [{"Network": {"type": "loopback"}}]}}
        ]});
        assert!(cni_keeps_addresses(&none.to_string())
            .expect_err("no pod network")
            .contains("no pod network"));
        assert!(cni_keeps_addresses("{").is_err());
    }
}
