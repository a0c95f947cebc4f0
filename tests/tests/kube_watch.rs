//! The agent's Kubernetes watchers against the fake API server (`interceptor_tests::apiserver`,
//! which speaks the list/watch wire protocol; no real API server can be installed here): the
//! first full sync, pod, namespace and policy changes, and the faults a real cluster has
//! (dropped streams, `410 Gone` as an event and as an HTTP status, expired continue tokens,
//! a restarted server) without losing or duplicating a pod. No privileges needed.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use interceptor::{
    cluster::{
        Membership, PodDirectory as _, PodRef,
        kube::{ClusterView, KubeDirectory},
    },
    config::KubernetesSettings,
};
use interceptor_tests::apiserver::{FakeApiServer, Faults};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(30);

fn namespace(name: &str, enabled: bool) -> Value {
    let labels = if enabled {
        json!({"interceptor.io/mtls": "enabled", "kubernetes.io/metadata.name": name})
    } else {
        json!({"kubernetes.io/metadata.name": name})
    };
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": labels},
           "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels,
                     "annotations": {"kubernetes.io/psp": "x"}},
        "spec": {"nodeName": node, "serviceAccountName": format!("sa-{name}"),
                 "serviceAccount": format!("sa-{name}"),
                 "containers": [{"name": "app", "image": "busybox", "ports": [{"containerPort": 80}]}],
                 "restartPolicy": "Always"},
        "status": {"phase": "Running", "hostIP": "192.168.0.1", "podIP": ip,
                   "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    })
}

fn authz(ns: &str, name: &str, version: &str) -> Value {
    json!({"apiVersion": format!("security.istio.io/{version}"), "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": ns, "generation": 1},
           "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]}})
}

struct Harness {
    server: FakeApiServer,
    directory: KubeDirectory,
    runtime: tokio::runtime::Runtime,
    _dir: Scratch,
}

/// A scratch directory removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Self {
        let p = std::env::temp_dir().join(interceptor_tests::unique_name("kube-watch"));
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Harness {
    fn new(server: FakeApiServer) -> Self {
        let dir = Scratch::new();
        let kubeconfig = dir.0.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let settings = KubernetesSettings {
            kubeconfig: Some(kubeconfig),
            node_name: Some(NODE.to_owned()),
            mesh_label: "interceptor.io/mtls".to_owned(),
        };
        let directory = runtime.block_on(async {
            let client = interceptor::cluster::kube::client(&settings)
                .await
                .expect("client");
            interceptor::cluster::kube::start(client, NODE.to_owned(), settings.mesh_label)
        });
        Self {
            server,
            directory,
            runtime,
            _dir: dir,
        }
    }

    /// Waits until `check` holds for the published view; panics with `what` and the view.
    fn until(
        &self,
        what: &str,
        check: impl Fn(&ClusterView) -> bool,
    ) -> std::sync::Arc<ClusterView> {
        let deadline = Instant::now() + WAIT;
        loop {
            let view = self.directory.view();
            if check(&view) {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {WAIT:?}; view: {view:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Stop the watchers before the server goes.
        let rt = std::mem::replace(
            &mut self.runtime,
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
        );
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}

fn local_names(view: &ClusterView) -> BTreeSet<String> {
    view.local
        .keys()
        .map(|(ns, n)| format!("{ns}/{n}"))
        .collect()
}

fn peer_ips(view: &ClusterView) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = view.peers.iter().flat_map(|p| p.ips.clone()).collect();
    ips.sort();
    ips
}

fn seeded() -> FakeApiServer {
    let server = FakeApiServer::start();
    server.apply(namespace("full", true));
    server.apply(namespace("legacy", false));
    server.apply(pod(
        "full",
        "sleep",
        NODE,
        "10.1.0.2",
        json!({"app": "sleep"}),
    ));
    server.apply(pod("legacy", "old", NODE, "10.1.0.3", json!({})));
    server.apply(pod(
        "full",
        "httpbin",
        "node-b",
        "10.2.0.2",
        json!({"app": "httpbin"}),
    ));
    server.apply(pod("legacy", "remote-old", "node-b", "10.2.0.3", json!({})));
    server.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": "full"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "ports": [{"name": "http", "port": 8000, "protocol": "TCP", "targetPort": 80}],
                 "selector": {"app": "httpbin"}}
    }));
    server.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "httpbin-x1", "namespace": "full",
                     "labels": {"kubernetes.io/service-name": "httpbin"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.2.0.2"], "conditions": {"ready": true},
                       "nodeName": "node-b",
                       "targetRef": {"kind": "Pod", "namespace": "full", "name": "httpbin"}}],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]
    }));
    server
}

#[test]
fn not_synced_until_every_kind_is_listed_then_the_view_is_the_cluster() {
    let server = seeded();
    server.set_faults(Faults {
        stall_lists: true,
        ..Faults::default()
    });
    let h = Harness::new(server);
    std::thread::sleep(Duration::from_millis(800));
    assert!(!h.directory.synced(), "synced while lists are stalled");
    let sleep = PodRef {
        namespace: "full".into(),
        name: "sleep".into(),
        uid: String::new(),
    };
    assert_eq!(h.directory.lookup(&sleep), None, "no guess before the list");
    h.server.set_faults(Faults::default());
    let view = h.until("first sync", |v| v.synced);
    assert_eq!(
        local_names(&view),
        ["full/sleep", "legacy/old"].map(String::from).into()
    );
    let info = h.directory.lookup(&sleep).expect("sleep is on this node");
    assert_eq!(info.membership, Membership::Mesh);
    assert_eq!(info.service_account, "sa-sleep");
    assert_eq!(info.ips, ["10.1.0.2".parse::<IpAddr>().unwrap()]);
    assert!(!info.pod.uid.is_empty());
    // A known UID must match.
    let stale = PodRef {
        uid: "some-other-uid".into(),
        ..sleep.clone()
    };
    assert_eq!(h.directory.lookup(&stale), None);
    assert_eq!(
        view.local[&("legacy".into(), "old".into())].membership,
        Membership::Outside
    );
    // Peers: the mesh pod on node-b, not the legacy one, not our own.
    assert_eq!(peer_ips(&view), ["10.2.0.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(view.peers[0].service_account, "sa-httpbin");
    assert_eq!(view.services.len(), 1);
    assert_eq!(view.services[0].vip, Some("10.96.0.10".parse().unwrap()));
    assert_eq!(view.services[0].ports[0].target(), 80);
    assert!(view.documents.is_empty());
    // Our pods were asked for with the node's field selector, the others with its negation.
    let requests = h.server.requests().join("\n");
    assert!(
        requests.contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{requests}"
    );
    assert!(
        requests.contains("fieldSelector=spec.nodeName%21%3Dnode-a"),
        "{requests}"
    );
}

#[test]
fn pods_namespace_labels_and_policy_objects_follow_the_server() {
    let h = Harness::new(seeded());
    h.until("first sync", |v| v.synced);
    let s = &h.server;
    // A new pod on this node, relabelled to opt out, then deleted.
    s.apply(pod("full", "new", NODE, "10.1.0.9", json!({})));
    h.until("new pod", |v| {
        v.local.contains_key(&("full".into(), "new".into()))
    });
    s.apply(pod(
        "full",
        "new",
        NODE,
        "10.1.0.9",
        json!({"interceptor.io/mtls": "disabled"}),
    ));
    h.until("opt-out", |v| {
        v.local
            .get(&("full".into(), "new".into()))
            .is_some_and(|p| p.membership == Membership::Outside)
    });
    assert!(s.delete("v1", "Pod", "full", "new"));
    h.until("pod deleted", |v| {
        !v.local.contains_key(&("full".into(), "new".into()))
    });
    // Label removed from the namespace: its pods (and peers) leave the mesh; back again.
    s.apply(namespace("full", false));
    let view = h.until("namespace disabled", |v| {
        v.local[&("full".into(), "sleep".into())].membership == Membership::Outside
    });
    assert!(view.peers.is_empty());
    s.apply(namespace("full", true));
    h.until("namespace enabled again", |v| {
        v.local[&("full".into(), "sleep".into())].membership == Membership::Mesh
            && v.peers.len() == 1
    });
    // A policy object appears, in the version the server serves, with apiVersion and kind
    // for the loader although list items carry neither.
    s.apply(authz("full", "deny-8080", "v1"));
    let view = h.until("policy object", |v| v.documents.len() == 1);
    let (name, text) = &view.documents[0];
    assert!(
        name.contains("AuthorizationPolicy full/deny-8080"),
        "{name}"
    );
    let doc: Value = serde_json::from_str(text).unwrap();
    assert_eq!(doc["apiVersion"], "security.istio.io/v1");
    assert_eq!(doc["kind"], "AuthorizationPolicy");
    assert_eq!(doc["spec"]["action"], "DENY");
    s.apply(
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                   "metadata": {"name": "deny-8080", "namespace": "full"},
                   "spec": {"action": "ALLOW"}}),
    );
    h.until("policy object modified", |v| {
        v.documents.len() == 1 && v.documents[0].1.contains("ALLOW")
    });
    assert!(s.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "full",
        "deny-8080"
    ));
    h.until("policy object deleted", |v| v.documents.is_empty());
}

#[test]
fn older_crd_versions_are_used_and_missing_crds_count_as_empty() {
    let server = seeded();
    // An older Istio: AuthorizationPolicy only in v1beta1; no DestinationRule CRD at all.
    server.serve_versions("security.istio.io", "authorizationpolicies", &["v1beta1"]);
    server.serve_versions("networking.istio.io", "destinationrules", &[]);
    server.apply(authz("full", "old-api", "v1beta1"));
    let h = Harness::new(server);
    let view = h.until("synced without the DestinationRule CRD", |v| {
        v.synced && v.documents.len() == 1
    });
    let doc: Value = serde_json::from_str(&view.documents[0].1).unwrap();
    assert_eq!(doc["apiVersion"], "security.istio.io/v1beta1");
    interceptor::policy::load_documents(&view.documents).expect("loads as policy");
}

/// The server's truth for the resilience tests: `n` pods here and `n` on node-b, all in the
/// mesh, named by index.
fn churn_server(n: usize) -> FakeApiServer {
    let server = FakeApiServer::start();
    server.apply(namespace("full", true));
    for i in 0..n {
        server.apply(pod(
            "full",
            &format!("here-{i}"),
            NODE,
            &format!("10.1.1.{i}"),
            json!({}),
        ));
        server.apply(pod(
            "full",
            &format!("there-{i}"),
            "node-b",
            &format!("10.2.1.{i}"),
            json!({}),
        ));
    }
    server
}

/// Changes made while the watchers are cut off: pods deleted, added and changed.
fn churn(server: &FakeApiServer, round: usize) {
    server.delete("v1", "Pod", "full", &format!("here-{round}"));
    server.delete("v1", "Pod", "full", &format!("there-{round}"));
    server.apply(pod(
        "full",
        &format!("late-{round}"),
        NODE,
        &format!("10.1.2.{round}"),
        json!({}),
    ));
    server.apply(pod(
        "full",
        &format!("far-{round}"),
        "node-b",
        &format!("10.2.2.{round}"),
        json!({}),
    ));
    server.apply(pod(
        "full",
        &format!("here-{}", round + 10),
        NODE,
        &format!("10.1.3.{round}"),
        json!({}),
    ));
}

/// The view holds exactly the server's pods: none lost, none twice, none stale.
fn exact(h: &Harness, what: &str) {
    let server_truth = || {
        let mut local = BTreeSet::new();
        let mut remote = Vec::new();
        for p in &h.server.objects("", "pods") {
            let name = format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap(),
                p["metadata"]["name"].as_str().unwrap()
            );
            if p["spec"]["nodeName"] == NODE {
                local.insert(name);
            } else {
                remote.push(
                    p["status"]["podIP"]
                        .as_str()
                        .unwrap()
                        .parse::<IpAddr>()
                        .unwrap(),
                );
            }
        }
        remote.sort();
        (local, remote)
    };
    let (local, remote) = server_truth();
    let view = h.until(what, |v| local_names(v) == local && peer_ips(v) == remote);
    // Every local pod's address is its own, once.
    let ips: Vec<IpAddr> = view.local.values().flat_map(|p| p.ips.clone()).collect();
    let unique: BTreeSet<&IpAddr> = ips.iter().collect();
    assert_eq!(ips.len(), unique.len(), "{what}: an address twice");
}

#[test]
fn dropped_streams_and_410_gone_lose_no_pod_and_duplicate_none() {
    let server = churn_server(12);
    // Small pages, so the initial list is paged with continue tokens.
    server.set_faults(Faults {
        max_page: 5,
        ..Faults::default()
    });
    let h = Harness::new(server);
    h.until("first sync", |v| v.synced);
    exact(&h, "initial list in pages");
    assert!(
        h.server.requests().iter().any(|r| r.contains("continue=")),
        "the list was not paged"
    );
    // 1. Streams cut mid-stream, changes meanwhile: resumed from the last version.
    churn(&h.server, 0);
    h.server.drop_streams();
    churn(&h.server, 1);
    exact(&h, "after dropped streams");
    // 2. History compacted, streams cut: resuming gets an ERROR 410 event, then a relist.
    let lists_before = list_count(&h.server);
    h.server.compact();
    h.server.drop_streams();
    churn(&h.server, 2);
    exact(&h, "after 410 Gone on resume");
    assert!(list_count(&h.server) > lists_before, "no relist after 410");
    // 3. An ERROR 410 event on the open streams.
    churn(&h.server, 3);
    h.server.send_gone();
    churn(&h.server, 4);
    exact(&h, "after an ERROR 410 event");
    // 4. 410 as the HTTP status of the watch request.
    h.server.set_faults(Faults {
        watch_gone_as_http: true,
        max_page: 5,
        ..Faults::default()
    });
    h.server.compact();
    h.server.drop_streams();
    churn(&h.server, 5);
    exact(&h, "after HTTP 410 on the watch");
    assert!(h.directory.synced());
}

fn list_count(server: &FakeApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods") && !r.contains("watch=true"))
        .count()
}

#[test]
fn a_restarted_api_server_loses_no_pod_and_duplicates_none() {
    let server = churn_server(8);
    server.set_faults(Faults {
        max_page: 3,
        ..Faults::default()
    });
    let h = Harness::new(server);
    h.until("first sync", |v| v.synced);
    exact(&h, "initial list");
    // Restart with the history intact: watches resume.
    let server = &h.server;
    server.go_down();
    churn(server, 0);
    std::thread::sleep(Duration::from_millis(500));
    server.come_up();
    exact(&h, "after a restart");
    // Restart with a compacted history (a new watch cache): a relist.
    server.go_down();
    server.compact();
    churn(server, 1);
    server.come_up();
    exact(&h, "after a restart that lost the history");
    // An expired continue token in the middle of a paged relist starts the list over.
    server.set_faults(Faults {
        max_page: 3,
        expire_continues: 2,
        ..Faults::default()
    });
    server.compact();
    server.drop_streams();
    churn(server, 2);
    exact(&h, "after a relist whose continue token expired");
    assert!(h.directory.synced());
}
