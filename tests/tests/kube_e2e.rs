//! Kubernetes mode end to end: the real agent (in process) reads its cluster from the fake API
//! server (`interceptor_tests::apiserver`; no real API server can be installed here), and
//! the Istio objects served there are enforced on real connections between pods, changing
//! when the objects change. A bad object keeps the last good policy; a namespace that loses
//! the enablement label gets its pods unenrolled, and enrolled again when it is back.
//! Privileged (network namespaces, cgroups, eBPF); host only.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use interceptor::{
    app::Agent,
    config::KubernetesSettings,
    intercept::table::{Direction, Protection},
};
use interceptor_tests::{
    agent::RunningAgent,
    apiserver::FakeApiServer,
    mesh::{self, wait_generation, workload},
    require_privileged, scenario,
    topology::{Node, Pod},
};
use serde_json::{Value, json};

const NODE_NAME: &str = "node-kube";
const ECHO: Duration = Duration::from_secs(10);

fn namespace(name: &str, enabled: bool) -> Value {
    let mut labels = json!({"kubernetes.io/metadata.name": name});
    if enabled {
        labels["interceptor.io/mtls"] = json!("enabled");
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod_object(pod: &Pod, namespace: &str, sa: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"nodeName": NODE_NAME, "serviceAccountName": sa,
                 "containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": pod.ip.to_string(),
                   "podIPs": [{"ip": pod.ip.to_string()}, {"ip": pod.ip6.to_string()}]}
    })
}

const STRICT: &str = r#"{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
  "metadata": {"name": "httpbin", "namespace": "full"},
  "spec": {"selector": {"matchLabels": {"app": "httpbin"}}, "mtls": {"mode": "STRICT"}}}"#;

const DENY_SLEEP: &str = r#"{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
  "metadata": {"name": "deny-sleep", "namespace": "full"},
  "spec": {"selector": {"matchLabels": {"app": "httpbin"}}, "action": "DENY",
           "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/full/sa/sleep"]}}]}]}}"#;

const BAD: &str = r#"{"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
  "metadata": {"name": "typo", "namespace": "full"},
  "spec": {"mtls": {"mode": "STRICTLY"}}}"#;

fn obj(text: &str) -> Value {
    serde_json::from_str(text).expect("object JSON")
}

/// A plaintext round trip from `pod` to `dst`.
fn plain_ok(pod: &Pod, dst: SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    let conn = pod.ns.run(move || Ok(std::net::TcpStream::connect(dst)));
    let Ok(mut conn) = conn else { return false };
    conn.set_read_timeout(Some(ECHO)).unwrap();
    if conn.write_all(b"plain\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 6];
    conn.read_exact(&mut buf).is_ok() && &buf == b"plain\n"
}

/// An echo through the mesh from `pod` (a fresh connection each time).
fn mesh_ok(pod: &Pod, dst: SocketAddr, line: &str) -> bool {
    let mut s = mesh::NcSession::open(pod.command(mesh::busybox()), dst);
    s.echo(line, ECHO).as_deref() == Some(line)
}

fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a generation after `after` and returns it.
fn next_generation(agent: &Agent, after: u64) -> u64 {
    wait_generation(agent, after)
}

#[test]
fn policy_objects_from_the_api_server_are_enforced_and_follow_changes() {
    require_privileged();
    let node = Node::new(108);
    let server = node.pod("httpbin-kube", 10);
    let client = node.pod("sleep-kube", 11);
    let legacy = node.pod("legacy-kube", 31);
    mesh::echo_server(&server, 9000);
    let dst = SocketAddr::from((server.ip, 9000));

    let api = FakeApiServer::start();
    api.apply(namespace("full", true));
    api.apply(namespace("legacy", false));
    api.apply(pod_object(&server, "full", "httpbin", "httpbin"));
    api.apply(pod_object(&client, "full", "sleep", "sleep"));
    api.apply(pod_object(&legacy, "legacy", "default", "legacy"));

    let cluster = scenario::Cluster::new("kubee2e");
    let kubeconfig = cluster.scratch.0.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig);
    let mut config = cluster.config(
        vec![
            workload(&server, "full", "httpbin", &[("app", "httpbin")]),
            workload(&client, "full", "sleep", &[("app", "sleep")]),
        ],
        vec![],
    );
    config.kubernetes = Some(KubernetesSettings {
        kubeconfig: Some(kubeconfig),
        node_name: Some(NODE_NAME.to_owned()),
        mesh_label: "interceptor.io/mtls".to_owned(),
    });
    let running = RunningAgent::start(config);
    let agent = &running.agent;
    let ready = agent.readiness();
    assert!(
        ready.ready(),
        "not ready after start: {:?}",
        ready.missing()
    );

    // No policy object: automatic mTLS between the mesh pods, plaintext from legacy passes.
    assert!(mesh_ok(&client, dst, "hello-1"));
    let rows = agent.flows_with_recent();
    let inbound = rows
        .iter()
        .find(|r| r.direction == Direction::Inbound)
        .expect("an inbound flow for sleep's request");
    assert_eq!(inbound.protection, Protection::Userspace, "{inbound:?}");
    assert_eq!(
        inbound.peer_id.as_deref(),
        Some("spiffe://cluster.local/ns/full/sa/sleep"),
        "{inbound:?}"
    );
    assert!(plain_ok(&legacy, dst), "plaintext before STRICT");

    // STRICT served by the API server: legacy's plaintext is refused, the mesh client is not.
    let g = agent.policy_generation();
    api.apply(obj(STRICT));
    let g = next_generation(agent, g);
    assert!(!plain_ok(&legacy, dst), "plaintext refused under STRICT");
    assert!(mesh_ok(&client, dst, "hello-2"));

    // DENY sleep's principal: the mesh client is refused too.
    api.apply(obj(DENY_SLEEP));
    next_generation(agent, g);
    assert!(!mesh_ok(&client, dst, "hello-3"), "DENY must refuse sleep");

    // A bad object: named, counted, and the last good policy (STRICT + DENY) stays.
    let before = agent.policy_stats();
    api.apply(obj(BAD));
    until("the bad object is rejected", || {
        agent.policy_stats()["policy.reload_failures"] > before["policy.reload_failures"]
    });
    assert!(!plain_ok(&legacy, dst), "STRICT still in force");
    assert!(!mesh_ok(&client, dst, "hello-4"), "DENY still in force");

    // Objects removed (the bad one with them): back to automatic mTLS and plaintext.
    let g = agent.policy_generation();
    api.delete("security.istio.io/v1", "PeerAuthentication", "full", "typo");
    api.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "full",
        "deny-sleep",
    );
    api.delete(
        "security.istio.io/v1",
        "PeerAuthentication",
        "full",
        "httpbin",
    );
    next_generation(agent, g);
    until("policy lifted", || plain_ok(&legacy, dst));
    assert!(mesh_ok(&client, dst, "hello-5"));

    // The namespace loses its label: its pods are unenrolled; the label is back: enrolled.
    api.apply(namespace("full", false));
    until("pods unenrolled", || agent.enrolled().is_empty());
    api.apply(namespace("full", true));
    until("pods enrolled again", || agent.enrolled().len() == 2);
    assert!(mesh_ok(&client, dst, "hello-6"));
    let rows = agent.flows_with_recent();
    assert!(
        rows.iter().any(|r| r.direction == Direction::Inbound
            && r.peer_id.as_deref() == Some("spiffe://cluster.local/ns/full/sa/sleep")
            && r.id > inbound.id),
        "mTLS again after re-enrollment: {rows:#?}"
    );
}
