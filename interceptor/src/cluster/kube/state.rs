//! What the watched objects mean to the agent, without I/O: per-kind stores that apply
//! watcher events (a relist replaces a store whole, so nothing is lost or counted twice), and
//! the [`ClusterView`] derived from them: this node's pods and their mesh membership, the
//! mesh pods of other nodes (peers), services with their endpoints, and the Istio policy
//! objects as documents for the same loader that reads policy files.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ::kube::{
    Resource, ResourceExt as _, api::DynamicObject, runtime::watcher::Event as WatchEvent,
};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    cluster::{Membership, PodInfo, PodRef},
    config,
};

/// Objects of one kind by `namespace/name`, as the last list and the watch events since say.
#[derive(Debug)]
pub struct Store<K> {
    live: BTreeMap<String, K>,
    /// Objects of a relist in progress; they replace `live` whole when it completes, so a
    /// relist after `410 Gone` or a restarted API server drops what was deleted meanwhile and
    /// never holds an object twice.
    pending: Option<BTreeMap<String, K>>,
    synced: bool,
}

impl<K> Default for Store<K> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            pending: None,
            synced: false,
        }
    }
}

impl<K: Resource> Store<K> {
    /// Applies one watcher event; true when the live contents changed.
    pub fn apply(&mut self, event: WatchEvent<K>) -> bool {
        match event {
            WatchEvent::Init => {
                self.pending = Some(BTreeMap::new());
                false
            }
            WatchEvent::InitApply(object) => {
                self.pending
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&object), object);
                false
            }
            WatchEvent::InitDone => {
                self.live = self.pending.take().unwrap_or_default();
                self.synced = true;
                true
            }
            WatchEvent::Apply(object) => {
                self.live.insert(key(&object), object);
                true
            }
            WatchEvent::Delete(object) => self.live.remove(&key(&object)).is_some(),
        }
    }

    /// Marks the kind as absent from the cluster (its CRD is not installed): empty and synced.
    pub fn absent(&mut self) -> bool {
        let changed = !self.live.is_empty() || !self.synced;
        self.live.clear();
        self.pending = None;
        self.synced = true;
        changed
    }

    /// Whether a full list has been applied.
    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn objects(&self) -> impl Iterator<Item = &K> {
        self.live.values()
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&K> {
        self.live.get(&format!("{namespace}/{name}"))
    }
}

fn key<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// An Istio kind read as a dynamic object, in the versions the agent understands (newest
/// first: the first one the API server serves is watched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyKind {
    pub group: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub versions: &'static [&'static str],
}

pub const POLICY_KINDS: [PolicyKind; 3] = [
    PolicyKind {
        group: "security.istio.io",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        versions: &["v1", "v1beta1"],
    },
    PolicyKind {
        group: "security.istio.io",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        versions: &["v1", "v1beta1"],
    },
    PolicyKind {
        group: "networking.istio.io",
        kind: "DestinationRule",
        plural: "destinationrules",
        versions: &["v1", "v1beta1", "v1alpha3"],
    },
];

/// Everything the watchers feed.
#[derive(Debug)]
pub struct State {
    pub node: String,
    pub mesh_label: String,
    pub local_pods: Store<Pod>,
    pub remote_pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    /// One store per [`POLICY_KINDS`] entry.
    pub policies: [Store<DynamicObject>; 3],
}

/// What the agent acts on, derived from [`State`]; published whole on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Every watched kind has been listed once.
    pub synced: bool,
    /// This node's pods by `(namespace, name)`.
    pub local: BTreeMap<(String, String), PodInfo>,
    /// Mesh pods on other nodes, with addresses.
    pub peers: Vec<config::Peer>,
    /// Services with a TCP port, their VIP and ready endpoints.
    pub services: Vec<config::Service>,
    /// The Istio objects as `(name, JSON)` policy documents, oldest first (Istio keeps the
    /// oldest of conflicting policies); the name says which object a load error is about.
    pub documents: Vec<(String, String)>,
    /// Namespaces and whether they are enabled.
    pub namespaces: BTreeMap<String, Membership>,
}

impl State {
    pub fn new(node: String, mesh_label: String) -> Self {
        Self {
            node,
            mesh_label,
            local_pods: Store::default(),
            remote_pods: Store::default(),
            namespaces: Store::default(),
            services: Store::default(),
            slices: Store::default(),
            policies: Default::default(),
        }
    }

    /// Whether every kind has been listed once.
    pub fn synced(&self) -> bool {
        self.local_pods.synced()
            && self.remote_pods.synced()
            && self.namespaces.synced()
            && self.services.synced()
            && self.slices.synced()
            && self.policies.iter().all(Store::synced)
    }

    pub fn view(&self) -> ClusterView {
        let namespaces: BTreeMap<String, Membership> = self
            .namespaces
            .objects()
            .map(|ns| (ns.name_any(), self.namespace_membership(ns)))
            .collect();
        let local = self
            .local_pods
            .objects()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&self.node))
            .filter_map(|p| {
                let info = self.pod_info(p, &namespaces)?;
                Some(((info.pod.namespace.clone(), info.pod.name.clone()), info))
            })
            .collect();
        ClusterView {
            synced: self.synced(),
            local,
            peers: self.peers(&namespaces),
            services: self.services(),
            documents: self.documents(),
            namespaces,
        }
    }

    fn namespace_membership(&self, ns: &Namespace) -> Membership {
        if ns.labels().get(&self.mesh_label).map(String::as_str) == Some("enabled") {
            Membership::Mesh
        } else {
            Membership::Outside
        }
    }

    /// A pod as the directory answers for it; `None` for a pod without a name or namespace.
    fn pod_info(&self, pod: &Pod, namespaces: &BTreeMap<String, Membership>) -> Option<PodInfo> {
        let namespace = pod.metadata.namespace.clone()?;
        let name = pod.metadata.name.clone()?;
        let spec = pod.spec.as_ref();
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let opted_out = pod.labels().get(&self.mesh_label).map(String::as_str) == Some("disabled");
        // A pod on the host's network has the node's address, which is not its own.
        let membership =
            if namespaces.get(&namespace) == Some(&Membership::Mesh) && !opted_out && !host_network
            {
                Membership::Mesh
            } else {
                Membership::Outside
            };
        Some(PodInfo {
            pod: PodRef {
                namespace,
                name,
                uid: pod.metadata.uid.clone().unwrap_or_default(),
            },
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|sa| !sa.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            labels: pod.labels().clone(),
            ips: pod_ips(pod),
            membership,
        })
    }

    /// Mesh pods of other nodes that hold addresses; an address is given to one peer only
    /// (a finished pod's address may already belong to a new one, so finished pods are left
    /// out).
    fn peers(&self, namespaces: &BTreeMap<String, Membership>) -> Vec<config::Peer> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for pod in self.remote_pods.objects() {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                continue;
            }
            if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&self.node) {
                continue;
            }
            let Some(info) = self.pod_info(pod, namespaces) else {
                continue;
            };
            if info.membership != Membership::Mesh {
                continue;
            }
            let ips: Vec<IpAddr> = info
                .ips
                .into_iter()
                .filter(|ip| seen.insert(ip.to_canonical()))
                .collect();
            if ips.is_empty() {
                continue;
            }
            out.push(config::Peer {
                namespace: info.pod.namespace,
                service_account: info.service_account,
                labels: info.labels,
                ips,
            });
        }
        out
    }

    /// Services as the policy inventory takes them: TCP ports only (the agent steers TCP),
    /// the primary cluster IP as VIP (none for headless), and the addresses of endpoints not
    /// known to be unready.
    fn services(&self) -> Vec<config::Service> {
        let mut out = Vec::new();
        for svc in self.services.objects() {
            let Some(spec) = &svc.spec else { continue };
            if spec.type_.as_deref() == Some("ExternalName") {
                continue;
            }
            let namespace = svc.namespace().unwrap_or_default();
            let name = svc.name_any();
            let slices: Vec<&EndpointSlice> = self
                .slices
                .objects()
                .filter(|s| {
                    s.metadata.namespace.as_deref() == Some(namespace.as_str())
                        && s.labels().get("kubernetes.io/service-name") == Some(&name)
                })
                .collect();
            let ports: Vec<config::ServicePort> = spec
                .ports
                .iter()
                .flatten()
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
                .filter_map(|p| {
                    let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
                    let target = target_port(p, &slices).unwrap_or(port);
                    Some(config::ServicePort {
                        name: p.name.clone(),
                        port,
                        target_port: Some(target),
                    })
                })
                .collect();
            if ports.is_empty() {
                continue;
            }
            let vip = spec
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok());
            let mut endpoints = Vec::new();
            for slice in &slices {
                if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                    continue;
                }
                for e in &slice.endpoints {
                    if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                        continue;
                    }
                    for a in &e.addresses {
                        if let Ok(ip) = a.parse::<IpAddr>()
                            && !endpoints.contains(&ip)
                        {
                            endpoints.push(ip);
                        }
                    }
                }
            }
            out.push(config::Service {
                name,
                namespace,
                vip,
                ports,
                endpoints,
            });
        }
        out
    }

    /// The policy objects as documents, oldest first, then by kind, namespace and name.
    fn documents(&self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String, String)> = Vec::new();
        for (kind, store) in POLICY_KINDS.iter().zip(&self.policies) {
            for object in store.objects() {
                let created = object
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default();
                let mut object = object.clone();
                object.metadata.managed_fields = None;
                let api_version = object
                    .types
                    .as_ref()
                    .map_or_else(|| kind.group.to_owned(), |t| t.api_version.clone());
                let name = format!(
                    "{} {}/{} ({api_version} from the API server)",
                    kind.kind,
                    object.metadata.namespace.as_deref().unwrap_or_default(),
                    object.metadata.name.as_deref().unwrap_or_default(),
                );
                // Serializing a value that came from JSON cannot fail; an empty document
                // would be reported by the loader, naming the object.
                let text = serde_json::to_string(&object).unwrap_or_default();
                all.push((created, name, text));
            }
        }
        all.sort();
        all.into_iter()
            .map(|(_, name, text)| (name, text))
            .collect()
    }
}

/// The pod's addresses (`status.podIPs`, else `status.podIP`).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

/// The endpoints' port for a service port: what the EndpointSlices say for a port of that
/// name (they resolve named target ports), else a numeric `targetPort`.
fn target_port(
    port: &k8s_openapi::api::core::v1::ServicePort,
    slices: &[&EndpointSlice],
) -> Option<u16> {
    let from_slice = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.name == port.name && p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok());
    from_slice.or(match &port.target_port {
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|p| *p != 0),
        _ => None,
    })
}

#[cfg(test)]
mod tests;
