//! Istio policy YAML is written by whoever may write policy in the cluster, and the agent
//! loads it as root on every node: loading, compiling against an inventory and deciding
//! connections must never panic, whatever the files say.
//!
//! Input: policy files separated by NUL bytes. When there are several parts and the last one
//! parses as an inventory (workloads and services), decisions use it instead of the built-in
//! one, so selectors, targets and service ports are fuzzed too.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use interceptor::{
    identity::SpiffeId,
    policy::{Engine, InboundRequest, Inventory, OutboundRequest, Pick, Settings, load_documents},
};
use libfuzzer_sys::fuzz_target;

/// The seeds' world in miniature: mesh and legacy workloads, a VIP service with a mesh and a
/// legacy endpoint, a headless service.
const INVENTORY: &str = r#"
workloads:
  - {name: sleep, namespace: foo, serviceAccount: sleep, labels: {app: sleep}, ips: [10.88.0.11]}
  - {name: httpbin, namespace: foo, serviceAccount: httpbin, labels: {app: httpbin, version: v1}, ips: [10.88.0.10, "fd00::10"]}
  - {name: httpbin-bar, namespace: bar, serviceAccount: httpbin, labels: {app: httpbin}, ips: [10.88.1.10]}
  - {name: legacy, namespace: legacy, serviceAccount: default, labels: {app: httpbin}, ips: [10.88.2.10], mesh: false}
services:
  - name: httpbin
    namespace: foo
    vip: 10.96.0.10
    ports: [{name: http, port: 8000, targetPort: 80}, {name: grpc, port: 9000}]
    endpoints: [10.88.0.10, 10.88.2.10]
  - name: db
    namespace: bar
    ports: [{port: 5432}]
    endpoints: [10.88.1.10]
"#;

/// At most this many workloads, services, sources, destinations and peers take part in
/// decisions, so a huge fuzzed inventory costs parsing, not a cubic loop.
const CAP: usize = 6;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts: Vec<&str> = text.split('\0').collect();
    let mut inventory = None;
    if parts.len() > 1
        && let Some(last) = parts.last()
        && let Ok(inv) = yaml_serde::from_str::<Inventory>(last)
    {
        inventory = Some(inv);
        parts.pop();
    }
    let inventory = match inventory {
        Some(inv) => inv,
        None => default_inventory().clone(),
    };
    let files: Vec<(String, String)> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("{i:02}.yaml"), (*p).to_owned()))
        .collect();

    let set = match load_documents(&files) {
        Ok(set) => set,
        Err(e) => {
            assert!(!e.errors().is_empty(), "a rejection without a reason");
            let text = e.to_string();
            for d in e.errors() {
                assert!(
                    text.contains(&*d.location.file),
                    "error text does not name {}: {text}",
                    d.location.file
                );
            }
            return;
        }
    };
    for w in &set.warnings {
        let _ = w.to_string();
    }

    let settings = Settings {
        trust_domain_aliases: vec!["old.example".parse().expect("alias")],
        probe_sources: vec!["10.88.0.1".parse().expect("probe source")],
        ..Settings::default()
    };
    let engine = Engine::new(set, settings, inventory.clone());
    for w in engine.warnings() {
        let _ = w.to_string();
    }
    decide_everything(&engine, &inventory);
});

/// Parsed once: parsing it for every input would cost as much as the input itself.
fn default_inventory() -> &'static Inventory {
    static INV: std::sync::OnceLock<Inventory> = std::sync::OnceLock::new();
    INV.get_or_init(|| yaml_serde::from_str(INVENTORY).expect("built-in inventory"))
}

fn decide_everything(engine: &Engine, inventory: &Inventory) {
    let mut peers: Vec<SpiffeId> = [
        "spiffe://old.example/ns/foo/sa/sleep",
        "spiffe://evil.example/ns/foo/sa/sleep",
    ]
    .iter()
    .map(|s| s.parse().expect("peer"))
    .collect();
    let mut ips: Vec<IpAddr> = vec![
        "10.88.0.1".parse().expect("probe"),
        "10.99.9.9".parse().expect("outside"),
    ];
    for w in inventory.workloads.iter().take(CAP) {
        ips.extend(w.ips.iter().take(2));
        let id = format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            w.namespace, w.service_account
        );
        if let Ok(id) = id.parse::<SpiffeId>() {
            peers.push(id);
        }
    }
    let mut destinations: Vec<SocketAddr> = Vec::new();
    for s in inventory.services.iter().take(CAP) {
        for p in s.ports.iter().take(2) {
            if let Some(vip) = s.vip {
                destinations.push(SocketAddr::new(vip, p.port));
            }
            for e in s.endpoints.iter().take(2) {
                destinations.push(SocketAddr::new(*e, p.target()));
            }
        }
    }
    for ip in &ips {
        destinations.push(SocketAddr::new(*ip, 80));
    }
    ips.truncate(CAP);
    destinations.truncate(2 * CAP);
    peers.truncate(CAP / 2);

    for &source in &ips {
        for &destination in &destinations {
            let _ = engine.effective_peer_auth(destination.ip(), destination.port());
            for pick in 0..2 {
                let Ok(first) = engine.outbound(&OutboundRequest {
                    source,
                    destination,
                    pick: Pick::Next(pick),
                }) else {
                    continue;
                };
                let _ = (first.tls.to_string(), first.reason.to_string());
                // Deciding the flow again under the same engine must keep it: the agent
                // re-decides open flows on every policy change, and a flow cut by its own
                // policy would be a reset storm.
                let again = engine
                    .outbound(&OutboundRequest {
                        source,
                        destination,
                        pick: Pick::Endpoint(first.endpoint),
                    })
                    .unwrap_or_else(|r| panic!("{destination} accepted, then refused: {r}"));
                assert_eq!(again.endpoint, first.endpoint);
                if let Some(held) = first.tls.to_flow() {
                    assert!(again.tls.met_by(&held), "{held} does not meet itself");
                }
            }
            let src = SocketAddr::new(source, 40000);
            for peer in std::iter::once(None).chain(peers.iter().map(Some)) {
                let v = engine.inbound(&InboundRequest {
                    source: src,
                    destination,
                    peer,
                });
                let _ = (v.code(), v.to_string(), v.is_allowed());
            }
        }
    }
}
