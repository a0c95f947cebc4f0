//! Who the pods are. In Kubernetes mode nobody hands the agent a `Workload`: the CNI plugin
//! names a pod (namespace, name, UID, netns, IPs) and the agent asks a directory for the rest
//! (service account, labels, whether the pod is in the mesh). The directory is the API-server
//! reflector in a cluster and a static table on hosts without one; both answer through this
//! trait so enrollment has one code path.

#[cfg(feature = "kubernetes")]
pub mod kube;

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// How the CNI plugin (or an operator) names a pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Empty when the caller does not know it; a known UID must match, so a pod recreated
    /// under the same name is never mistaken for its predecessor.
    #[serde(default)]
    pub uid: String,
}

/// Whether a pod belongs in the mesh, as the namespace label and the pod's opt-out say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    Mesh,
    Outside,
}

/// What the directory knows of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub pod: PodRef,
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    pub membership: Membership,
}

/// The answer to "who is this pod?".
pub trait PodDirectory: Send + Sync + 'static {
    /// `None` while the directory has not (yet) seen the pod: the caller retries for a
    /// bounded time and then refuses, so a pod is never enrolled under a guessed identity.
    fn lookup(&self, pod: &PodRef) -> Option<PodInfo>;
    /// True once the first full list has been applied (a static table always is).
    fn synced(&self) -> bool;
    /// Every namespace the directory knows and whether it is in the mesh, once it can say so
    /// for all of them (`None` before the first full list). The agent writes it to the node
    /// for the CNI plugin, which must decide while the agent is unreachable whether a pod may
    /// start without it. A directory that cannot list namespaces keeps the default: the
    /// plugin then treats every namespace as possibly in the mesh (fail closed).
    fn mesh_namespaces(&self) -> Option<BTreeMap<String, bool>> {
        None
    }
}

/// The namespace label that puts a namespace in the mesh (`enabled`) and, on a pod, takes the
/// pod out of it (`disabled`).
pub const MESH_LABEL: &str = "interceptor.io/mtls";

/// Whether a namespace with these labels is in the mesh.
pub fn namespace_in_mesh(namespace_labels: &BTreeMap<String, String>) -> bool {
    namespace_labels.get(MESH_LABEL).map(String::as_str) == Some("enabled")
}

/// Membership from the namespace's and the pod's labels, as Istio users know it: the
/// namespace opts in, a pod may opt out.
pub fn membership(
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> Membership {
    if namespace_in_mesh(namespace_labels)
        && pod_labels.get(MESH_LABEL).map(String::as_str) != Some("disabled")
    {
        Membership::Mesh
    } else {
        Membership::Outside
    }
}

/// The directory of a host without an API server: namespaces and pods listed in the node
/// config (`cni.namespaces`, `cni.pods`). A pod in a mesh namespace that the table does not
/// list is unknown (`None`), so it is refused rather than given a made-up identity; a pod in
/// any other namespace is outside the mesh whether listed or not.
#[derive(Debug, Clone, Default)]
pub struct StaticDirectory {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: BTreeMap<(String, String), crate::config::StaticPod>,
}

impl StaticDirectory {
    pub fn new(settings: &crate::config::CniSettings) -> Self {
        Self {
            namespaces: settings.namespaces.clone(),
            pods: settings
                .pods
                .iter()
                .map(|p| ((p.namespace.clone(), p.name.clone()), p.clone()))
                .collect(),
        }
    }
}

impl PodDirectory for StaticDirectory {
    fn lookup(&self, pod: &PodRef) -> Option<PodInfo> {
        let empty = BTreeMap::new();
        let ns_labels = self.namespaces.get(&pod.namespace).unwrap_or(&empty);
        let listed = self
            .pods
            .get(&(pod.namespace.clone(), pod.name.clone()))
            .filter(|p| p.uid.is_empty() || pod.uid.is_empty() || p.uid == pod.uid);
        match listed {
            Some(p) => Some(PodInfo {
                pod: pod.clone(),
                service_account: p.service_account.clone(),
                labels: p.labels.clone(),
                ips: Vec::new(),
                membership: membership(ns_labels, &p.labels),
            }),
            None if namespace_in_mesh(ns_labels) => None,
            None => Some(PodInfo {
                pod: pod.clone(),
                service_account: "default".to_owned(),
                labels: BTreeMap::new(),
                ips: Vec::new(),
                membership: Membership::Outside,
            }),
        }
    }

    fn synced(&self) -> bool {
        true
    }

    fn mesh_namespaces(&self) -> Option<BTreeMap<String, bool>> {
        Some(
            self.namespaces
                .iter()
                .map(|(ns, labels)| (ns.clone(), namespace_in_mesh(labels)))
                .collect(),
        )
    }
}

/// What the agent writes to `cni.membershipFile` (the CNI plugin's copy of this format is
/// `interceptor-cni`'s `MembershipCache`): namespace → in the mesh, and whether a namespace
/// not listed is known to be outside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembershipFile {
    pub version: u32,
    pub namespaces: BTreeMap<String, bool>,
    pub complete: bool,
}

impl MembershipFile {
    /// From what `directory` can say now: complete once it has listed every namespace.
    pub fn of(directory: &dyn PodDirectory) -> Self {
        match directory.mesh_namespaces() {
            Some(namespaces) => Self {
                version: 1,
                namespaces,
                complete: true,
            },
            None => Self {
                version: 1,
                namespaces: BTreeMap::new(),
                complete: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CniSettings, StaticPod};

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn pod(ns: &str, name: &str) -> PodRef {
        PodRef {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            uid: String::new(),
        }
    }

    #[test]
    fn the_static_directory_answers_like_the_labels_say() {
        let settings = CniSettings {
            parent_cgroup: None,
            membership_file: "/run/m.json".into(),
            lookup_timeout_ms: 1,
            namespaces: [
                ("full".to_owned(), labels(&[(MESH_LABEL, "enabled")])),
                ("legacy".to_owned(), labels(&[("team", "a")])),
            ]
            .into_iter()
            .collect(),
            pods: vec![
                StaticPod {
                    namespace: "full".into(),
                    name: "sleep".into(),
                    uid: "u1".into(),
                    service_account: "sleep".into(),
                    labels: labels(&[("app", "sleep")]),
                },
                StaticPod {
                    namespace: "full".into(),
                    name: "batch".into(),
                    uid: String::new(),
                    service_account: "batch".into(),
                    labels: labels(&[(MESH_LABEL, "disabled")]),
                },
            ],
        };
        let d = StaticDirectory::new(&settings);
        let info = d.lookup(&pod("full", "sleep")).unwrap();
        assert_eq!(info.membership, Membership::Mesh);
        assert_eq!(info.service_account, "sleep");
        assert_eq!(info.labels, labels(&[("app", "sleep")]));
        // A known UID must match.
        let mut other = pod("full", "sleep");
        other.uid = "u2".into();
        assert_eq!(d.lookup(&other), None);
        // Opted out.
        assert_eq!(
            d.lookup(&pod("full", "batch")).unwrap().membership,
            Membership::Outside
        );
        // In a mesh namespace but not listed: unknown, never guessed.
        assert_eq!(d.lookup(&pod("full", "stranger")), None);
        // Elsewhere: outside, listed or not.
        for ns in ["legacy", "nowhere"] {
            assert_eq!(
                d.lookup(&pod(ns, "x")).unwrap().membership,
                Membership::Outside
            );
        }
        assert!(d.synced());
        let file = MembershipFile::of(&d);
        assert!(file.complete);
        assert_eq!(
            file.namespaces,
            [("full".to_owned(), true), ("legacy".to_owned(), false)]
                .into_iter()
                .collect()
        );
    }
}
