//! Kubernetes mode: the agent learns pods, namespaces, services and Istio policy from the API
//! server, with one list-then-watch stream per kind (kube-rs' watcher, which resumes a
//! dropped stream from the last resource version and lists again after `410 Gone`).
//!
//! Every stream feeds one reducer task that owns the [`State`]; after each burst of events it
//! derives a [`ClusterView`] and publishes it on a `watch` channel when it changed. The
//! [`KubeDirectory`] answers [`PodDirectory`] from the latest view; the app follows the
//! channel to rebuild policy, steer peers and enroll or unenroll pods whose membership
//! changed.
//!
//! Watched: Pods on this node (`spec.nodeName=<node>`) and on all other nodes
//! (`spec.nodeName!=<node>`: mesh peers, so no `peers:` list is needed), Namespaces
//! (enablement label), Services and EndpointSlices, and PeerAuthentication,
//! AuthorizationPolicy and DestinationRule as dynamic objects in the newest version the
//! server serves. An Istio kind whose CRD is not installed counts as empty (and is looked for
//! again every [`ABSENT_RECHECK`]), so a cluster without Istio works.

mod state;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use ::kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, TypeMeta},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use state::{ClusterView, POLICY_KINDS, PolicyKind, State, Store};

use super::{Membership, PodDirectory, PodInfo, PodRef};
use crate::config::KubernetesSettings;

/// How often a kind whose CRD is missing is looked for again.
pub const ABSENT_RECHECK: Duration = Duration::from_secs(30);

/// A client for the configured cluster: the kubeconfig if one is given, else the pod's
/// service account.
pub async fn client(settings: &KubernetesSettings) -> anyhow::Result<Client> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("kubernetes.kubeconfig {}", path.display()))?;
            ::kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubernetes.kubeconfig {}", path.display()))?
        }
        None => ::kube::Config::incluster()
            .context("in-cluster service account (set kubernetes.kubeconfig outside a pod)")?,
    };
    Client::try_from(config).context("Kubernetes client")
}

/// The directory of this node's pods, answering from the latest [`ClusterView`].
#[derive(Clone)]
pub struct KubeDirectory {
    view: watch::Receiver<Arc<ClusterView>>,
}

impl KubeDirectory {
    /// The latest view (what the app reconciles against).
    pub fn view(&self) -> Arc<ClusterView> {
        Arc::clone(&self.view.borrow())
    }

    /// A receiver that wakes on every published change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view.clone()
    }
}

impl PodDirectory for KubeDirectory {
    fn lookup(&self, pod: &PodRef) -> Option<PodInfo> {
        let view = self.view.borrow();
        let info = view.local.get(&(pod.namespace.clone(), pod.name.clone()))?;
        (pod.uid.is_empty() || pod.uid == info.pod.uid).then(|| info.clone())
    }

    fn synced(&self) -> bool {
        self.view.borrow().synced
    }

    fn mesh_namespaces(&self) -> Option<BTreeMap<String, bool>> {
        let view = self.view.borrow();
        view.synced.then(|| {
            view.namespaces
                .iter()
                .map(|(ns, m)| (ns.clone(), *m == Membership::Mesh))
                .collect()
        })
    }
}

/// One watcher event, tagged with the store it belongs to.
enum Update {
    LocalPod(watcher::Event<Pod>),
    RemotePod(watcher::Event<Pod>),
    Namespace(watcher::Event<Namespace>),
    Service(watcher::Event<Service>),
    Slice(watcher::Event<EndpointSlice>),
    Policy(usize, watcher::Event<DynamicObject>),
    PolicyAbsent(usize),
}

impl State {
    fn update(&mut self, update: Update) -> bool {
        match update {
            Update::LocalPod(e) => self.local_pods.apply(e),
            Update::RemotePod(e) => self.remote_pods.apply(e),
            Update::Namespace(e) => self.namespaces.apply(e),
            Update::Service(e) => self.services.apply(e),
            Update::Slice(e) => self.slices.apply(e),
            Update::Policy(i, e) => self.policies.get_mut(i).is_some_and(|s| s.apply(e)),
            Update::PolicyAbsent(i) => self.policies.get_mut(i).is_some_and(Store::absent),
        }
    }
}

/// Starts every watcher on the current tokio runtime and returns the directory. Nothing is
/// awaited here: the directory says `synced() == false` until every kind was listed once.
pub fn start(client: Client, node: String, mesh_label: String) -> KubeDirectory {
    let (updates, rx) = mpsc::channel(1024);
    let (publish, view) = watch::channel(Arc::new(ClusterView::default()));
    let local = format!("spec.nodeName={node}");
    let remote = format!("spec.nodeName!={node}");
    spawn_kind(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&local),
        "pods on this node",
        updates.clone(),
        Update::LocalPod,
    );
    spawn_kind(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&remote),
        "pods on other nodes",
        updates.clone(),
        |e: watcher::Event<Pod>| {
            // Peers need addresses, service account, labels and phase: drop the rest.
            Update::RemotePod(e.modify(|p| {
                p.metadata.managed_fields = None;
                p.metadata.annotations = None;
                if let Some(spec) = &mut p.spec {
                    spec.containers.clear();
                    spec.init_containers = None;
                    spec.volumes = None;
                }
                if let Some(status) = &mut p.status {
                    status.conditions = None;
                    status.container_statuses = None;
                    status.init_container_statuses = None;
                }
            }))
        },
    );
    spawn_kind(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        "namespaces",
        updates.clone(),
        Update::Namespace,
    );
    spawn_kind(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        "services",
        updates.clone(),
        Update::Service,
    );
    spawn_kind(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        "endpointslices",
        updates.clone(),
        Update::Slice,
    );
    for (index, kind) in POLICY_KINDS.iter().enumerate() {
        tokio::spawn(watch_policy_kind(
            client.clone(),
            index,
            *kind,
            updates.clone(),
        ));
    }
    drop(updates);
    tokio::spawn(reduce(State::new(node, mesh_label), rx, publish));
    KubeDirectory { view }
}

/// Applies updates as they come and publishes the view after each burst.
async fn reduce(
    mut state: State,
    mut rx: mpsc::Receiver<Update>,
    publish: watch::Sender<Arc<ClusterView>>,
) {
    let mut was_synced = false;
    while let Some(first) = rx.recv().await {
        let mut changed = state.update(first);
        while let Ok(more) = rx.try_recv() {
            changed |= state.update(more);
        }
        if !changed {
            continue;
        }
        let view = state.view();
        if view.synced && !was_synced {
            was_synced = true;
            info!(
                local_pods = view.local.len(),
                peers = view.peers.len(),
                services = view.services.len(),
                policies = view.documents.len(),
                "cluster state synced"
            );
        }
        if **publish.borrow() != view {
            publish.send_replace(Arc::new(view));
        }
    }
}

fn spawn_kind<K, F>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    updates: mpsc::Sender<Update>,
    wrap: F,
) where
    K: ::kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    F: Fn(watcher::Event<K>) -> Update + Send + Sync + 'static,
{
    tokio::spawn(async move { follow(api, config, what, &updates, &wrap).await });
}

/// Follows one kind until the reducer is gone. Errors are retried with kube-rs' backoff; a
/// `410 Gone` answer to a watch request (some servers send it as the HTTP status instead of
/// a watch event) restarts the watcher, which lists again, since resuming from that resource
/// version can never succeed.
async fn follow<K, F>(
    api: Api<K>,
    config: watcher::Config,
    what: &str,
    updates: &mpsc::Sender<Update>,
    wrap: &F,
) where
    K: ::kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    F: Fn(watcher::Event<K>) -> Update + Sync,
{
    loop {
        let mut stream = watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed();
        let mut last_error = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(event) => {
                    last_error.clear();
                    if updates.send(wrap(event)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let gone_at_start = matches!(
                        &e,
                        watcher::Error::WatchStartFailed(::kube::Error::Api(s)) if s.code == 410
                    );
                    let text = e.to_string();
                    if text != last_error {
                        warn!(kind = what, "Kubernetes watch: {text}; retrying");
                        last_error = text;
                    }
                    if gone_at_start {
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Finds the newest version of `kind` the server serves and follows it; while none is
/// served (Istio's CRDs are not installed), the kind counts as empty.
async fn watch_policy_kind(
    client: Client,
    index: usize,
    kind: PolicyKind,
    updates: mpsc::Sender<Update>,
) {
    let mut absent_reported = false;
    loop {
        match served_version(&client, &kind).await {
            Ok(Some(resource)) => {
                info!(
                    kind = kind.kind,
                    api_version = %resource.api_version,
                    "watching Istio policy objects"
                );
                let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
                // List items come without apiVersion and kind; the policy loader needs both.
                let types = TypeMeta {
                    api_version: resource.api_version.clone(),
                    kind: resource.kind.clone(),
                };
                let wrap = move |e: watcher::Event<DynamicObject>| {
                    Update::Policy(
                        index,
                        e.modify(|o| {
                            o.types.get_or_insert_with(|| types.clone());
                        }),
                    )
                };
                follow(api, watcher::Config::default(), kind.kind, &updates, &wrap).await;
                return;
            }
            Ok(None) => {
                if !absent_reported {
                    info!(
                        kind = kind.kind,
                        group = kind.group,
                        "CRD not installed; no such policy until it is"
                    );
                    absent_reported = true;
                }
                if updates.send(Update::PolicyAbsent(index)).await.is_err() {
                    return;
                }
                tokio::time::sleep(ABSENT_RECHECK).await;
            }
            Err(e) => {
                warn!(kind = kind.kind, "Kubernetes: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The first of `kind.versions` the server lists; `None` when each is not found.
async fn served_version(
    client: &Client,
    kind: &PolicyKind,
) -> Result<Option<ApiResource>, ::kube::Error> {
    for version in kind.versions {
        let gvk = GroupVersionKind::gvk(kind.group, version, kind.kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, kind.plural);
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(Some(resource)),
            Err(::kube::Error::Api(s)) if s.code == 404 => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
