//! Kubernetes mode in the running agent: follows the cluster view the watchers publish and
//! keeps the agent in line with it. Policy gets the Istio objects, the mesh pods of other
//! nodes and the services; connect4 steers those peers' addresses; and a pod enrolled here
//! whose namespace loses the enablement label (or that opts out) is unenrolled, and enrolled
//! again when it is back in the mesh.
//!
//! An enrolled workload is taken to be the pod of the same namespace and name (CNI
//! enrollments are named `namespace/name`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tracing::{info, warn};

use super::{Agent, applied};
use crate::{
    cluster::{
        Membership,
        kube::{self, ClusterView},
    },
    config::{KubernetesSettings, Workload},
    intercept::enforce::ClusterInputs,
    telemetry::WorkloadLabels,
};

pub(super) use crate::cluster::kube::KubeDirectory;

/// How long start-up waits for the first full sync before serving anyway (not ready).
pub(super) const SYNC_WAIT: Duration = Duration::from_secs(10);

/// Connects to the cluster and starts the watchers.
pub(super) async fn connect(settings: &KubernetesSettings) -> anyhow::Result<KubeDirectory> {
    let node = settings
        .node(std::env::var("NODE_NAME").ok())
        .map_err(anyhow::Error::msg)?;
    let client = kube::client(settings).await?;
    info!(node = %node, "Kubernetes mode: watching the API server");
    Ok(kube::start(client, node, settings.mesh_label.clone()))
}

/// Waits (at most `limit`) for the first full sync; false when it did not come.
pub(super) async fn wait_synced(directory: &KubeDirectory, limit: Duration) -> bool {
    let mut rx = directory.subscribe();
    matches!(
        tokio::time::timeout(limit, rx.wait_for(|v| v.synced)).await,
        Ok(Ok(_))
    )
}

/// Applies every published view to the agent, for as long as the watchers run; returns
/// once the current one is applied.
pub(super) async fn start_following(agent: Arc<Agent>, directory: KubeDirectory) {
    let (first, applied_once) = tokio::sync::oneshot::channel();
    tokio::spawn(follow(agent, directory, first));
    let _ = applied_once.await;
}

async fn follow(
    agent: Arc<Agent>,
    directory: KubeDirectory,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let mut rx = directory.subscribe();
    let mut followed = Followed::default();
    let mut first = Some(first);
    loop {
        let view = Arc::clone(&rx.borrow_and_update());
        followed.apply(&agent, &view).await;
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// What the last applied view put in place.
#[derive(Default)]
struct Followed {
    inputs: ClusterInputs,
    /// Peer addresses steered because of the cluster (not the node config's).
    steered: BTreeSet<IpAddr>,
    /// Workloads unenrolled because their pod left the mesh, by name.
    parked: BTreeMap<String, Workload>,
    /// The steered peers as telemetry knows them, by their addresses: a view registers only
    /// the peers that are new or whose labels changed.
    labeled: BTreeMap<Vec<IpAddr>, WorkloadLabels>,
}

impl Followed {
    async fn apply(&mut self, agent: &Agent, view: &ClusterView) {
        let _change = agent.changes.lock().await;
        self.membership(agent, view);
        let inputs = ClusterInputs {
            documents: view.documents.clone(),
            peers: view.peers.clone(),
            services: view.services.clone(),
        };
        if inputs != self.inputs {
            let reload = agent.shared.policy.set_cluster(inputs.clone());
            if let Some((old, new)) = &reload.generation {
                applied(&agent.shared, &old.steer, new);
            }
            self.inputs = inputs;
        }
        self.steer_peers(agent, view);
        agent.write_membership();
        if view.synced && !agent.readiness.cluster_synced.swap(true, Ordering::AcqRel) {
            info!("cluster synced: ready as far as Kubernetes goes");
        }
    }

    /// Unenrolls pods that left the mesh and enrolls parked ones that are back.
    fn membership(&mut self, agent: &Agent, view: &ClusterView) {
        // Enrolled by name (`interceptor enroll`, `workloads:`) or as `namespace/name` (CNI).
        let membership = |w: &Workload| {
            let prefix = format!("{}/", w.namespace);
            let name = w.name.strip_prefix(&prefix).unwrap_or(&w.name);
            view.local
                .get(&(w.namespace.clone(), name.to_owned()))
                .map(|info| info.membership)
        };
        let mut changed = false;
        for w in agent.enrolled_workloads() {
            if membership(&w) == Some(Membership::Outside) {
                agent.unenroll_pod(&w.name);
                info!(
                    pod = %w.name,
                    namespace = %w.namespace,
                    "unenrolled: the namespace is not enabled or the pod opted out"
                );
                self.parked.insert(w.name.clone(), w);
                changed = true;
            }
        }
        for (name, w) in std::mem::take(&mut self.parked) {
            match membership(&w) {
                Some(Membership::Mesh) => {
                    match agent.validate(&w).and_then(|()| agent.enroll(&w)) {
                        Ok(()) => {
                            info!(pod = %name, namespace = %w.namespace, "enrolled again: back in the mesh");
                            changed = true;
                        }
                        Err(e) => {
                            warn!(pod = %name, "cannot enroll again: {e:#}");
                            self.parked.insert(name, w);
                        }
                    }
                }
                // The pod is gone: nothing to bring back.
                None if view.synced => {}
                _ => {
                    self.parked.insert(name, w);
                }
            }
        }
        if changed && let Err(e) = agent.sync_policy() {
            warn!("policy for the enrolled pods: {e:#}");
        }
    }

    /// Steers the addresses of the cluster's mesh peers to the agent (and stops steering
    /// those that left), leaving the node config's peers and enrolled pods alone.
    fn steer_peers(&mut self, agent: &Agent, view: &ClusterView) {
        let own: BTreeSet<IpAddr> = agent
            .peers
            .iter()
            .flat_map(|p| p.ips.iter())
            .copied()
            .chain(
                agent
                    .enrolled_workloads()
                    .into_iter()
                    .flat_map(|w| w.ips.into_iter()),
            )
            .map(|ip| ip.to_canonical())
            .collect();
        let want: BTreeSet<IpAddr> = view
            .peers
            .iter()
            .flat_map(|p| p.ips.iter())
            .map(|ip| ip.to_canonical())
            .filter(|ip| !own.contains(ip))
            .collect();
        let mut dp = agent
            .shared
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for gone in self.steered.difference(&want) {
            if !own.contains(gone) {
                dp.clear_destination(*gone, None);
                agent.telemetry.remove_workload("", &[*gone]);
            }
        }
        // Metrics and the access log name these peers as they name the node config's.
        let mut labeled = BTreeMap::new();
        for peer in &view.peers {
            if peer.ips.iter().any(|ip| want.contains(&ip.to_canonical())) {
                let labels = WorkloadLabels::of("", &peer.namespace, &peer.labels);
                if self.labeled.get(&peer.ips) != Some(&labels) {
                    agent.telemetry.add_workload("", &peer.ips, labels.clone());
                }
                labeled.insert(peer.ips.clone(), labels);
            }
        }
        self.labeled = labeled;
        for added in want.difference(&self.steered) {
            if let Err(e) = dp.set_destination(*added, None, crate::datapath::Destination::Steer) {
                warn!(peer = %added, "cannot steer a mesh peer: {e:#}");
            }
        }
        self.steered = want;
    }
}
