//! Tests for the policy module, cheapest first: parsing and its error messages, then each
//! decision, then the seed documents' curl matrices replayed at the decision level.

mod inbound;
mod outbound;
mod parse;
mod peer_auth;
mod seeds;

use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::identity::SpiffeId;

/// Loads one file called `test.yaml`, panicking with the error text if it is rejected.
fn load(yaml: &str) -> PolicySet {
    load_documents(&[("test.yaml".to_owned(), yaml.to_owned())])
        .unwrap_or_else(|e| panic!("policy rejected:\n{e}"))
}

/// The rejection of one file called `test.yaml`, as the CLI would print it.
fn load_error(yaml: &str) -> String {
    match load_documents(&[("test.yaml".to_owned(), yaml.to_owned())]) {
        Ok(set) => panic!("policy accepted: {set:#?}"),
        Err(e) => e.to_string(),
    }
}

fn engine(yaml: &str, inventory: Inventory) -> Engine {
    Engine::new(load(yaml), Settings::default(), inventory)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test socket address")
}

fn id(namespace: &str, service_account: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/{namespace}/sa/{service_account}")
        .parse()
        .expect("test identity")
}

/// A mesh workload with `app=<service account>` and one address.
fn mesh(namespace: &str, service_account: &str, address: &str) -> Workload {
    let mut w = Workload::new(namespace, service_account);
    w.labels
        .insert("app".to_owned(), service_account.to_owned());
    w.ips.push(ip(address));
    w
}

/// A workload without an agent.
fn legacy(namespace: &str, service_account: &str, address: &str) -> Workload {
    Workload {
        mesh: false,
        ..mesh(namespace, service_account, address)
    }
}

fn with_label(mut w: Workload, key: &str, value: &str) -> Workload {
    w.labels.insert(key.to_owned(), value.to_owned());
    w
}

/// A service with one port `port → target` named `http`.
fn service(
    name: &str,
    namespace: &str,
    vip: Option<&str>,
    port: u16,
    target: u16,
    endpoints: &[&str],
) -> Service {
    Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        vip: vip.map(ip),
        ports: vec![ServicePort {
            name: Some("http".to_owned()),
            port,
            target_port: Some(target),
        }],
        endpoints: endpoints.iter().map(|e| ip(e)).collect(),
    }
}

/// The `httpbin` service of `namespace` at `vip`: port 8000 → 80 named `http`.
fn httpbin(namespace: &str, vip: &str, endpoints: &[&str]) -> Service {
    service("httpbin", namespace, Some(vip), 8000, 80, endpoints)
}

fn plaintext<'a>(source: &str, destination: &str) -> InboundRequest<'a> {
    InboundRequest {
        source: addr(source),
        destination: addr(destination),
        peer: None,
    }
}

fn mtls<'a>(source: &str, destination: &str, peer: &'a SpiffeId) -> InboundRequest<'a> {
    InboundRequest {
        peer: Some(peer),
        ..plaintext(source, destination)
    }
}

#[test]
fn engine_can_be_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Engine>();
    shared::<PolicySet>();
}

#[test]
fn inventory_problems_are_warnings() {
    let inventory = Inventory {
        workloads: vec![
            mesh("foo", "a", "10.0.0.1"),
            mesh("foo", "b", "10.0.0.1"),
            mesh("foo", "Bad_SA", "10.0.0.3"),
        ],
        services: Vec::new(),
    };
    let e = engine("", inventory);
    let warnings: Vec<_> = e.warnings().iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "inventory: workloads[1].ips: 10.0.0.1 already belongs to workloads[0]; the first \
             one keeps it",
            "inventory: workloads[2]: service account `Bad_SA` is not a kubernetes object \
             name: it may contain only lowercase letters, digits, `-` and `.`; the workload is \
             treated as outside the mesh",
        ]
    );
    // The first workload keeps the address.
    let peer = id("foo", "c");
    let v = e.inbound(&mtls("10.0.0.9:1", "10.0.0.1:80", &peer));
    assert!(v.is_allowed());
    // Outbound from the workload without an identity is left alone.
    let o = e
        .outbound(&OutboundRequest {
            source: ip("10.0.0.3"),
            destination: addr("10.0.0.1:80"),
            pick: Pick::Next(0),
        })
        .expect("known client");
    assert_eq!(o.reason, TlsReason::ClientOutsideMesh);
}

#[test]
fn host_patterns_rank_like_istio() {
    let host = "httpbin.bar.svc.cluster.local";
    let rank =
        |pattern: &str| HostPattern::resolve(pattern, "foo", "cluster.local").specificity(host);
    assert_eq!(rank("httpbin.bar.svc.cluster.local"), Some(usize::MAX));
    assert!(rank("*.bar.svc.cluster.local") > rank("*.svc.cluster.local"));
    assert!(rank("*.svc.cluster.local") > rank("*.local"));
    assert!(rank("*.local") > rank("*"));
    assert_eq!(rank("*"), Some(0));
    // Short names are relative to the rule's namespace, not the service's.
    assert_eq!(rank("httpbin"), None);
    assert_eq!(rank("*.foo.svc.cluster.local"), None);
    assert_eq!(rank("*.httpbin.bar.svc.cluster.local"), None);
    assert_eq!(
        HostPattern::resolve("HTTPBIN", "bar", "cluster.local").specificity(host),
        Some(usize::MAX)
    );
}
