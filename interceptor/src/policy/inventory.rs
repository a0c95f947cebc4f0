//! What evaluation needs to know besides the policy files: mesh settings, workloads and
//! services.
//!
//! These mirror the node config's `rootNamespace`, `probeSources`, `services` and `peers`
//! sections (field names match, so the config module can embed them), and stand in for what
//! Istio learns from the Kubernetes API.

use std::net::IpAddr;

use serde::Deserialize;

use super::model::Labels;
use crate::identity::TrustDomain;

/// Mesh-wide settings that change how policies are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The namespace whose policies apply mesh-wide (Istio's `rootNamespace`).
    pub root_namespace: String,
    /// The local trust domain.
    pub trust_domain: TrustDomain,
    /// Other trust domains treated as the local one, in peer identities and in policies
    /// (Istio's `trustDomainAliases`), for trust-domain migrations.
    pub trust_domain_aliases: Vec<TrustDomain>,
    /// The cluster DNS suffix used to resolve short DestinationRule hosts and to name
    /// services (`<name>.<namespace>.svc.<cluster_domain>`).
    pub cluster_domain: String,
    /// Addresses (kubelet, node) whose plaintext connections pass STRICT mode and
    /// authorization, as Istio's probe rewriting lets kubelet probes through.
    pub probe_sources: Vec<IpAddr>,
}

/// The workloads and services the decisions refer to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    /// Known workloads, mesh and legacy.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Known services.
    #[serde(default)]
    pub services: Vec<Service>,
}

/// One pod (or VM) as seen by policy.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Workload {
    /// A name for logs, such as the pod name; optional.
    #[serde(default)]
    pub name: Option<String>,
    /// The Kubernetes namespace.
    pub namespace: String,
    /// The service account, which with the namespace makes the SPIFFE identity.
    pub service_account: String,
    /// Pod labels, for selectors.
    #[serde(default)]
    pub labels: Labels,
    /// Pod addresses.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Whether an agent enrolls this workload (it accepts and originates mesh mTLS). Legacy
    /// workloads are listed with `false` so that their addresses are known not to speak mTLS.
    #[serde(default = "yes")]
    pub mesh: bool,
}

/// A Kubernetes Service: a virtual IP in front of endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    /// The service name.
    pub name: String,
    /// The service namespace.
    pub namespace: String,
    /// The cluster IP; `None` for a headless service, reached through endpoint addresses.
    #[serde(default)]
    pub vip: Option<IpAddr>,
    /// The service ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Endpoint (pod) addresses; their mesh status comes from the workloads.
    #[serde(default)]
    pub endpoints: Vec<IpAddr>,
}

/// One service port.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    /// The port name, which `v1alpha1` policy targets may refer to.
    #[serde(default)]
    pub name: Option<String>,
    /// The port on the virtual IP; DestinationRule `portLevelSettings` refer to it.
    pub port: u16,
    /// The port on the endpoints; PeerAuthentication and AuthorizationPolicy ports refer to
    /// it. Defaults to `port`, as in Kubernetes.
    #[serde(default)]
    pub target_port: Option<u16>,
}

// === impl Settings ===

impl Settings {
    /// Istio's defaults: root namespace `istio-system`, trust domain and cluster domain
    /// `cluster.local`, no aliases and no probe sources.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            root_namespace: "istio-system".to_owned(),
            trust_domain,
            trust_domain_aliases: Vec::new(),
            cluster_domain: "cluster.local".to_owned(),
            probe_sources: Vec::new(),
        }
    }
}

impl Default for Settings {
    // A constant, checked by every test that builds default settings; no input reaches it.
    #[allow(clippy::expect_used)]
    fn default() -> Self {
        let cluster_local = "cluster.local"
            .parse()
            .expect("`cluster.local` is a valid trust domain");
        Self::new(cluster_local)
    }
}

// === impl Workload ===

impl Workload {
    /// A mesh workload with no name, labels or addresses yet; for building inventories in
    /// code.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            name: None,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            labels: Labels::new(),
            ips: Vec::new(),
            mesh: true,
        }
    }
}

// === impl ServicePort ===

impl ServicePort {
    /// The endpoint port traffic to this service port is sent to.
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

fn yes() -> bool {
    true
}
