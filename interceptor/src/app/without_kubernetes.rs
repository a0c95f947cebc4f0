//! Kubernetes mode in an agent built without the `kubernetes` feature: a config that asks for
//! it is refused at start-up, naming the missing feature, instead of running as a static node
//! that silently ignores the cluster.

use std::{sync::Arc, time::Duration};

use super::Agent;
use crate::{
    cluster::{PodDirectory, PodInfo, PodRef},
    config::KubernetesSettings,
};

/// No value exists: without the feature there is never a cluster directory.
#[derive(Clone)]
pub(super) enum KubeDirectory {}

impl PodDirectory for KubeDirectory {
    fn lookup(&self, _: &PodRef) -> Option<PodInfo> {
        match *self {}
    }

    fn synced(&self) -> bool {
        match *self {}
    }
}

pub(super) const SYNC_WAIT: Duration = Duration::from_secs(10);

pub(super) async fn connect(_: &KubernetesSettings) -> anyhow::Result<KubeDirectory> {
    anyhow::bail!("`kubernetes:` is set, but this agent was built without the `kubernetes` feature")
}

pub(super) async fn wait_synced(directory: &KubeDirectory, _: Duration) -> bool {
    match *directory {}
}

pub(super) async fn start_following(_: Arc<Agent>, directory: KubeDirectory) {
    match directory {}
}
