//! Who the pods are. In Kubernetes mode nobody hands the agent a `Workload`: the CNI plugin
//! names a pod (namespace, name, UID, netns, IPs) and the agent asks a directory for the rest
//! (service account, labels, whether the pod is in the mesh). The directory is the API-server
//! reflector in a cluster and a static table on hosts without one; both answer through this
//! trait so enrollment has one code path.

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
}
