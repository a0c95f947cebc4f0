//! The node configuration (`interceptor run --config FILE`): the YAML contract platform teams
//! write. Parsing is pure (the caller reads the file) and strict: an unknown field is an error
//! that names it, because a typo that silently disables mTLS is worse than a refused start.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::identity::TrustDomain;

/// Whether the agent offloads record encryption to kernel TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KtlsMode {
    /// kTLS when the start-up probe says it works, the userspace relay otherwise.
    #[default]
    Auto,
    /// Refuse to start without kTLS.
    Required,
    /// Always the userspace relay.
    Off,
}

/// One pod enrolled on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// The pod's network namespace (a bind mount such as /run/netns/<name>).
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

/// A mesh workload whose agent runs on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
}

/// A Kubernetes Service as kube-proxy and EndpointSlices would describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vip: IpAddr,
    pub ports: Vec<ServicePort>,
    /// Endpoint addresses; whether each is a mesh workload comes from `workloads`/`peers`.
    #[serde(default)]
    pub endpoints: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    pub target_port: u16,
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub trust_domain: TrustDomain,
    /// Trust domains treated as this one when matching principals (Istio's aliases).
    #[serde(default)]
    pub trust_domain_aliases: Vec<String>,
    pub ca_dir: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    #[serde(default)]
    pub ktls: KtlsMode,
    /// Where pins live; must be on a bpffs (mounted there when absent).
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub peers: Vec<Peer>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Istio's mesh-wide scope.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Istio security YAML, watched.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// kubelet/node addresses whose plaintext probes pass STRICT.
    #[serde(default)]
    pub probe_sources: Vec<IpAddr>,
    #[serde(default)]
    pub tuning: Tuning,
}

/// Knobs with safe defaults; the benchmark decides the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tuning {
    /// The agent's outbound listener port inside each pod netns (loopback only).
    pub outbound_port: u16,
    /// The agent's inbound listener port inside each pod netns (loopback; sk_lookup feeds it).
    pub inbound_port: u16,
    pub handshake_timeout_ms: u64,
    /// How long inbound waits for a first byte before treating a silent client as plaintext
    /// (server-speaks-first protocols). Mesh clients always speak first, so never pay it.
    pub first_byte_wait_ms: u64,
    pub idle_timeout_secs: u64,
    /// sk_msg short-circuit of the plain app↔agent leg.
    pub sk_msg_local_leg: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            handshake_timeout_ms: 5_000,
            first_byte_wait_ms: 200,
            idle_timeout_secs: 3_600,
            sk_msg_local_leg: false,
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/interceptor")
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/interceptor/admin.sock")
}
fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/interceptor")
}
fn default_root_namespace() -> String {
    "istio-system".to_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

impl Config {
    /// Parses and validates `text`; `file` names the source in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: Config = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            file: file.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::HashSet::new();
        let mut ips = std::collections::HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if !names.insert(w.name.as_str()) {
                return Err(format!(
                    "workloads[{i}].name: `{}` is enrolled twice",
                    w.name
                ));
            }
            check_relative(&w.cgroup, &format!("workloads[{i}].cgroup"))?;
            check_relative(&w.netns, &format!("workloads[{i}].netns"))?;
            if w.ips.is_empty() {
                return Err(format!(
                    "workloads[{i}].ips: a workload needs at least one address"
                ));
            }
            for ip in &w.ips {
                if let Some(prev) = ips.insert(*ip, format!("workloads[{i}]")) {
                    return Err(format!("workloads[{i}].ips: {ip} is also used by {prev}"));
                }
            }
        }
        for (i, p) in self.peers.iter().enumerate() {
            for ip in &p.ips {
                if let Some(prev) = ips.insert(*ip, format!("peers[{i}]")) {
                    return Err(format!("peers[{i}].ips: {ip} is also used by {prev}"));
                }
            }
        }
        let t = &self.tuning;
        if t.outbound_port == 0 || t.inbound_port == 0 || t.outbound_port == t.inbound_port {
            return Err(
                "tuning: outboundPort and inboundPort must be distinct and non-zero".to_owned(),
            );
        }
        Ok(())
    }

    /// Every mesh workload known to this node (enrolled here or listed as a peer), as
    /// `(ip, namespace, service account)`.
    pub fn mesh_addresses(&self) -> impl Iterator<Item = (IpAddr, &str, &str)> {
        let local = self.workloads.iter().flat_map(|w| {
            w.ips
                .iter()
                .map(move |ip| (*ip, w.namespace.as_str(), w.service_account.as_str()))
        });
        let remote = self.peers.iter().flat_map(|p| {
            p.ips
                .iter()
                .map(move |ip| (*ip, p.namespace.as_str(), p.service_account.as_str()))
        });
        local.chain(remote)
    }
}

fn check_relative(p: &Path, field: &str) -> Result<(), String> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "{field}: `{}` must be an absolute path",
            p.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
trustDomain: cluster.local
caDir: /var/lib/interceptor/ca
stateDir: /var/lib/interceptor
adminSocket: /run/interceptor/admin.sock
ktls: auto
workloads:
  - name: sleep-full
    namespace: full
    serviceAccount: sleep
    labels: {app: sleep}
    cgroup: /sys/fs/cgroup/pods/sleep-full
    netns: /run/netns/sleep-full
    ips: [10.88.0.2, fd00:88::2]
peers:
  - {namespace: bar, serviceAccount: httpbin, ips: [10.88.1.3]}
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse("node.yaml", EXAMPLE).unwrap();
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.ktls, KtlsMode::Auto);
        assert_eq!(c.workloads[0].ips.len(), 2);
        assert_eq!(c.workloads[0].labels["app"], "sleep");
        assert_eq!(c.peers[0].service_account, "httpbin");
        assert_eq!(c.mesh_addresses().count(), 3);
        assert_eq!(c.tuning, Tuning::default());
        assert_eq!(c.root_namespace, "istio-system");
    }

    #[test]
    fn unknown_fields_are_errors_naming_the_field() {
        let bad = EXAMPLE.replace("ktls: auto", "ktls: auto\nktlss: on");
        let e = Config::parse("node.yaml", &bad).unwrap_err().to_string();
        assert!(e.contains("node.yaml") && e.contains("ktlss"), "{e}");
        let bad = EXAMPLE.replace(
            "serviceAccount: sleep",
            "serviceAccount: sleep\n    serviceAcount: x",
        );
        let e = Config::parse("node.yaml", &bad).unwrap_err().to_string();
        assert!(e.contains("serviceAcount"), "{e}");
    }

    #[test]
    fn the_shipped_deploy_config_parses() {
        let cm: serde_yaml::Value =
            serde_yaml::from_str(include_str!("../../deploy/base/configmap.yaml")).unwrap();
        let node = cm["data"]["node.yaml"].as_str().unwrap();
        Config::parse("deploy/base/configmap.yaml", node).unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::parse("n", &EXAMPLE.replace("ktls: auto", "ktls: maybe"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("maybe"), "{e}");
        let e = Config::parse("n", &EXAMPLE.replace("10.88.1.3", "10.88.0.2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("peers[0].ips") && e.contains("10.88.0.2"), "{e}");
        let e = Config::parse(
            "n",
            &EXAMPLE.replace("trustDomain: cluster.local", "trustDomain: Bad Domain"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("trust"), "{e}");
        let e = Config::parse(
            "n",
            &EXAMPLE.replace("netns: /run/netns/sleep-full", "netns: sleep-full"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("workloads[0].netns"), "{e}");
    }
}
