//! Policy evaluation per connection: the decisions the agent takes for every new connection,
//! on a policy set and inventory of a realistic size (100 namespaces × 5 workloads, one
//! Service per workload, mesh-wide STRICT, one ALLOW AuthorizationPolicy per namespace with
//! ten principals and ports, a DENY policy mesh-wide, DestinationRules for half the services).
//!
//! - `inbound_allowed`: an mTLS connection matched by an ALLOW rule (the common case);
//! - `inbound_denied`: a connection no ALLOW rule matches (walks every rule);
//! - `outbound_vip`: a service VIP resolved to an endpoint, DestinationRule lookup, auto-mTLS.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use criterion::{Criterion, criterion_group, criterion_main};
use interceptor::{
    identity::SpiffeId,
    policy::{
        Engine, InboundRequest, Inventory, OutboundRequest, Pick, Service, ServicePort, Settings,
        Workload, load_documents,
    },
};

const NAMESPACES: u8 = 100;
const PER_NAMESPACE: u8 = 5;

fn pod_ip(ns: u8, w: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 88, ns, 10 + w))
}

fn vip(ns: u8, w: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 96, ns, 10 + w))
}

fn inventory() -> Inventory {
    let mut inv = Inventory::default();
    for ns in 0..NAMESPACES {
        for w in 0..PER_NAMESPACE {
            let mut wl = Workload::new(&format!("ns{ns}"), &format!("sa{w}"));
            wl.labels.insert("app".to_owned(), format!("app{w}"));
            wl.ips.push(pod_ip(ns, w));
            inv.workloads.push(wl);
            inv.services.push(Service {
                name: format!("svc{w}"),
                namespace: format!("ns{ns}"),
                vip: Some(vip(ns, w)),
                ports: vec![ServicePort {
                    name: Some("http".to_owned()),
                    port: 80,
                    target_port: Some(8080),
                }],
                endpoints: vec![pod_ip(ns, w)],
            });
        }
    }
    inv
}

fn policies() -> String {
    let mut y = String::from(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, \
         namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-evil, \
         namespace: istio-system}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
         principals: ['cluster.local/ns/evil/*']\n",
    );
    for ns in 0..NAMESPACES {
        let _ = write!(
            y,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: \
             allow, namespace: ns{ns}}}\nspec:\n  action: ALLOW\n  rules:\n"
        );
        for r in 0..10u8 {
            let from = (ns + r) % NAMESPACES;
            let _ = write!(
                y,
                "  - from:\n    - source:\n        principals: ['cluster.local/ns/ns{from}/sa/sa{}']\n    \
                 to:\n    - operation:\n        ports: ['{}']\n",
                r % PER_NAMESPACE,
                if r == 9 { 8080 } else { 9000 + u16::from(r) }
            );
        }
        if ns % 2 == 0 {
            let _ = write!(
                y,
                "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: \
                 dr, namespace: ns{ns}}}\nspec:\n  host: svc0.ns{ns}.svc.cluster.local\n  \
                 trafficPolicy:\n    tls: {{mode: ISTIO_MUTUAL}}\n"
            );
        }
    }
    y
}

fn policy(c: &mut Criterion) {
    let set = match load_documents(&[("bench.yaml".to_owned(), policies())]) {
        Ok(s) => s,
        Err(e) => panic!("the benchmark's policy set was rejected:\n{e}"),
    };
    let engine = Engine::new(set, Settings::default(), inventory());
    // Rule 9 of ns50's ALLOW policy admits ns59/sa4 (from = (50 + 9) % 100, sa = 9 % 5) on
    // port 8080; ns7/sa1 matches none of its rules.
    let allowed_peer: SpiffeId = match "spiffe://cluster.local/ns/ns59/sa/sa4".parse() {
        Ok(id) => id,
        Err(e) => panic!("id: {e}"),
    };
    let denied_peer: SpiffeId = match "spiffe://cluster.local/ns/ns7/sa/sa1".parse() {
        Ok(id) => id,
        Err(e) => panic!("id: {e}"),
    };
    let dst = SocketAddr::new(pod_ip(50, 2), 8080);
    let src = SocketAddr::new(pod_ip(59, 4), 40000);
    let allowed = InboundRequest {
        source: src,
        destination: dst,
        peer: Some(&allowed_peer),
    };
    let denied = InboundRequest {
        source: SocketAddr::new(pod_ip(7, 1), 40000),
        destination: dst,
        peer: Some(&denied_peer),
    };
    assert!(
        engine.inbound(&allowed).is_allowed(),
        "{}",
        engine.inbound(&allowed)
    );
    assert!(!engine.inbound(&denied).is_allowed());

    let mut g = c.benchmark_group("policy");
    g.bench_function("inbound_allowed", |b| {
        b.iter(|| engine.inbound(std::hint::black_box(&allowed)).is_allowed())
    });
    g.bench_function("inbound_denied", |b| {
        b.iter(|| engine.inbound(std::hint::black_box(&denied)).is_allowed())
    });
    let mut pick = 0u64;
    g.bench_function("outbound_vip", |b| {
        b.iter(|| {
            pick += 1;
            let r = OutboundRequest {
                source: pod_ip(3, 1),
                destination: SocketAddr::new(vip(40, 0), 80),
                pick: Pick::Next(pick),
            };
            engine.outbound(std::hint::black_box(&r)).is_ok()
        })
    });
    g.finish();
}

criterion_group!(benches, policy);
criterion_main!(benches);
