use serde_json::{Value, json};

use super::*;

fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                     "resourceVersion": "1", "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": format!("sa-{name}"),
                 "containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

fn namespace(name: &str, enabled: bool) -> Namespace {
    let labels = if enabled {
        json!({"interceptor.io/mtls": "enabled"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": "1", "labels": labels}
    }))
    .unwrap()
}

fn listed<K>(store: &mut Store<K>, objects: Vec<K>)
where
    K: ::kube::Resource,
{
    store.apply(WatchEvent::Init);
    for o in objects {
        store.apply(WatchEvent::InitApply(o));
    }
    store.apply(WatchEvent::InitDone);
}

fn synced_state() -> State {
    let mut s = State::new("node-a".into(), "interceptor.io/mtls".into());
    listed(
        &mut s.namespaces,
        vec![namespace("full", true), namespace("legacy", false)],
    );
    listed(
        &mut s.local_pods,
        vec![
            pod(
                "full",
                "sleep",
                "node-a",
                "10.0.0.2",
                json!({"app": "sleep"}),
            ),
            pod(
                "full",
                "optout",
                "node-a",
                "10.0.0.3",
                json!({"interceptor.io/mtls": "disabled"}),
            ),
            pod("legacy", "old", "node-a", "10.0.0.4", json!({})),
        ],
    );
    listed(
        &mut s.remote_pods,
        vec![
            pod(
                "full",
                "httpbin",
                "node-b",
                "10.0.1.2",
                json!({"app": "httpbin"}),
            ),
            pod("legacy", "other", "node-b", "10.0.1.3", json!({})),
        ],
    );
    listed(&mut s.services, Vec::new());
    listed(&mut s.slices, Vec::new());
    for p in &mut s.policies {
        p.absent();
    }
    s
}

#[test]
fn membership_follows_namespace_label_and_pod_opt_out() {
    let s = synced_state();
    let v = s.view();
    assert!(v.synced);
    let m = |name: &str, ns: &str| v.local[&(ns.to_owned(), name.to_owned())].membership;
    assert_eq!(m("sleep", "full"), Membership::Mesh);
    assert_eq!(m("optout", "full"), Membership::Outside);
    assert_eq!(m("old", "legacy"), Membership::Outside);
    let sleep = &v.local[&("full".to_owned(), "sleep".to_owned())];
    assert_eq!(sleep.service_account, "sa-sleep");
    assert_eq!(sleep.pod.uid, "uid-sleep");
    assert_eq!(sleep.ips, ["10.0.0.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(sleep.labels["app"], "sleep");
    // Only mesh pods of other nodes are peers.
    assert_eq!(v.peers.len(), 1);
    assert_eq!(v.peers[0].service_account, "sa-httpbin");
    assert_eq!(v.peers[0].ips, ["10.0.1.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(v.namespaces["full"], Membership::Mesh);
}

#[test]
fn label_removed_then_restored_flips_membership() {
    let mut s = synced_state();
    assert!(
        s.namespaces
            .apply(WatchEvent::Apply(namespace("full", false)))
    );
    let v = s.view();
    assert_eq!(
        v.local[&("full".to_owned(), "sleep".to_owned())].membership,
        Membership::Outside
    );
    assert!(
        v.peers.is_empty(),
        "peers of a disabled namespace leave too"
    );
    s.namespaces
        .apply(WatchEvent::Apply(namespace("full", true)));
    let v = s.view();
    assert_eq!(
        v.local[&("full".to_owned(), "sleep".to_owned())].membership,
        Membership::Mesh
    );
}

#[test]
fn not_synced_until_every_kind_was_listed() {
    let mut s = State::new("node-a".into(), "interceptor.io/mtls".into());
    assert!(!s.view().synced);
    listed(&mut s.namespaces, Vec::new());
    listed(&mut s.local_pods, Vec::new());
    listed(&mut s.remote_pods, Vec::new());
    listed(&mut s.services, Vec::new());
    listed(&mut s.slices, Vec::new());
    s.policies[0].absent();
    s.policies[1].absent();
    assert!(!s.view().synced, "DestinationRules not listed yet");
    listed(&mut s.policies[2], Vec::new());
    assert!(s.view().synced);
}

/// A relist (after 410 Gone or a restarted server) replaces the store: a pod deleted while
/// the watch was down is gone, a pod listed again is held once, and nothing changes before
/// the relist is complete.
#[test]
fn relist_replaces_whole_without_loss_or_duplicates() {
    let mut store = Store::<Pod>::default();
    listed(
        &mut store,
        vec![
            pod("a", "one", "n", "10.0.0.1", json!({})),
            pod("a", "two", "n", "10.0.0.2", json!({})),
        ],
    );
    assert!(store.apply(WatchEvent::Apply(pod(
        "a",
        "two",
        "n",
        "10.0.0.9",
        json!({})
    ))));
    assert_eq!(store.len(), 2);
    store.apply(WatchEvent::Init);
    store.apply(WatchEvent::InitApply(pod(
        "a",
        "two",
        "n",
        "10.0.0.9",
        json!({}),
    )));
    assert_eq!(
        store.len(),
        2,
        "the old contents stay until the relist is done"
    );
    // A relist interrupted by a second one starts over.
    store.apply(WatchEvent::Init);
    store.apply(WatchEvent::InitApply(pod(
        "a",
        "two",
        "n",
        "10.0.0.9",
        json!({}),
    )));
    store.apply(WatchEvent::InitApply(pod(
        "a",
        "three",
        "n",
        "10.0.0.3",
        json!({}),
    )));
    assert!(store.apply(WatchEvent::InitDone));
    let names: Vec<String> = store.objects().map(|p| p.name_any()).collect();
    assert_eq!(names, ["three", "two"]);
    assert!(store.apply(WatchEvent::Delete(pod("a", "two", "n", "", json!({})))));
    assert!(!store.apply(WatchEvent::Delete(pod("a", "two", "n", "", json!({})))));
    assert_eq!(store.len(), 1);
}

#[test]
fn services_take_vip_tcp_ports_and_ready_endpoints() {
    let mut s = synced_state();
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": "full", "resourceVersion": "1"},
        "spec": {"clusterIP": "10.96.0.10", "type": "ClusterIP", "ports": [
            {"name": "http", "port": 8000, "protocol": "TCP", "targetPort": "web"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
            {"name": "raw", "port": 9000, "targetPort": 9090}
        ]}
    }))
    .unwrap();
    let headless: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "full", "resourceVersion": "1"},
        "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}
    }))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "httpbin-abc", "namespace": "full", "resourceVersion": "1",
                     "labels": {"kubernetes.io/service-name": "httpbin"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.0.1.2"], "conditions": {"ready": true}},
            {"addresses": ["10.0.1.9"], "conditions": {"ready": false}},
            {"addresses": ["10.0.0.2"]}
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))
    .unwrap();
    listed(&mut s.services, vec![svc, headless]);
    listed(&mut s.slices, vec![slice]);
    let v = s.view();
    assert_eq!(v.services.len(), 2);
    let db = &v.services[0];
    assert_eq!((db.name.as_str(), db.vip), ("db", None));
    assert_eq!(db.ports[0].target(), 5432);
    let h = &v.services[1];
    assert_eq!(h.vip, Some("10.96.0.10".parse().unwrap()));
    let ports: Vec<(u16, u16)> = h.ports.iter().map(|p| (p.port, p.target())).collect();
    assert_eq!(
        ports,
        [(8000, 8080), (9000, 9090)],
        "UDP left out, names resolved"
    );
    let want: Vec<IpAddr> = ["10.0.1.2", "10.0.0.2"]
        .iter()
        .map(|i| i.parse().unwrap())
        .collect();
    assert_eq!(h.endpoints, want);
}

#[test]
fn policy_objects_become_documents_the_loader_reads() {
    let mut s = synced_state();
    let strict: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "full", "resourceVersion": "7",
                     "uid": "u1", "creationTimestamp": "2026-01-02T00:00:00Z",
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": {"mtls": {"mode": "STRICT"}}
    }))
    .unwrap();
    let deny: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "full", "resourceVersion": "8",
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}
    }))
    .unwrap();
    listed(&mut s.policies[0], vec![strict]);
    listed(&mut s.policies[1], vec![deny]);
    let v = s.view();
    assert_eq!(v.documents.len(), 2);
    assert!(
        v.documents[0]
            .0
            .starts_with("AuthorizationPolicy full/deny"),
        "oldest first: {:?}",
        v.documents[0].0
    );
    assert!(!v.documents[1].1.contains("managedFields"));
    let set = crate::policy::load_documents(&v.documents).unwrap();
    assert_eq!(set.peer_authentications.len(), 1);
    assert_eq!(set.authorization_policies.len(), 1);
    // A bad object is named in the error.
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "typo", "namespace": "full", "resourceVersion": "9"},
        "spec": {"mtls": {"mode": "STRICTLY"}}
    }))
    .unwrap();
    s.policies[0].apply(WatchEvent::Apply(bad));
    let e = crate::policy::load_documents(&s.view().documents)
        .unwrap_err()
        .to_string();
    assert!(e.contains("PeerAuthentication full/typo"), "{e}");
    assert!(e.contains("STRICTLY"), "{e}");
}
