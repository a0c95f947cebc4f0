//! `Engine::outbound`: endpoint picking, automatic mTLS and DestinationRule lookup.

use super::*;

fn inventory() -> Inventory {
    let mut headless = service("db", "data", None, 5432, 5432, &["10.0.3.1"]);
    headless.ports[0].name = Some("pg".to_owned());
    Inventory {
        workloads: vec![
            mesh("foo", "sleep", "10.0.0.2"),
            mesh("bar", "sleep", "10.0.1.2"),
            mesh("foo", "httpbin", "10.0.0.1"),
            legacy("foo", "httpbin-legacy", "10.0.0.9"),
            mesh("bar", "httpbin", "10.0.1.1"),
            legacy("data", "db", "10.0.3.1"),
            legacy("out", "client", "10.0.4.1"),
        ],
        services: vec![
            httpbin("foo", "10.96.0.1", &["10.0.0.1", "10.0.0.9"]),
            httpbin("bar", "10.96.0.2", &["10.0.1.1"]),
            service("empty", "bar", Some("10.96.0.3"), 80, 80, &[]),
            headless,
        ],
    }
}

fn request(source: &str, destination: &str, pick: u64) -> OutboundRequest {
    OutboundRequest {
        source: ip(source),
        destination: addr(destination),
        pick: Pick::Next(pick),
    }
}

/// `(endpoint, transport code, reason)` for compact assertions.
fn decide(
    e: &Engine,
    source: &str,
    destination: &str,
    pick: u64,
) -> (String, &'static str, String) {
    let o = e
        .outbound(&request(source, destination, pick))
        .unwrap_or_else(|r| panic!("refused: {r}"));
    (o.endpoint.to_string(), o.tls.code(), o.reason.to_string())
}

/// What [`decide`] returns for `endpoint`, `transport` and `reason`.
fn decision(
    endpoint: &str,
    transport: &'static str,
    reason: &str,
) -> (String, &'static str, String) {
    (endpoint.to_owned(), transport, reason.to_owned())
}

fn dr(name: &str, namespace: &str, host: &str, tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  host: \"{host}\"
  trafficPolicy:
    tls: {tls}
---
"
    )
}

/// One file of [`dr`]s, in order.
fn drs(rules: &[(&str, &str, &str, &str)]) -> String {
    rules
        .iter()
        .map(|&(name, namespace, host, tls)| dr(name, namespace, host, tls))
        .collect()
}

/// Asserts for each `(source, destination, reason)` the reason [`decide`] gives at pick 0.
#[track_caller]
fn assert_reasons(e: &Engine, expected: &[(&str, &str, &str)]) {
    for (source, destination, want) in expected {
        assert_eq!(
            decide(e, source, destination, 0).2,
            *want,
            "{source} to {destination}"
        );
    }
}

#[test]
fn auto_mtls_alternates_between_mesh_and_legacy_endpoints() {
    let e = engine("", inventory());
    let picks: Vec<_> = (0..4)
        .map(|pick| decide(&e, "10.0.0.2", "10.96.0.1:8000", pick))
        .collect();
    assert_eq!(
        picks[0],
        decision(
            "10.0.0.1:80",
            "mesh_mtls",
            "automatic: endpoint is PERMISSIVE (default)"
        )
    );
    assert_eq!(
        picks[1],
        decision(
            "10.0.0.9:80",
            "plaintext",
            "automatic: endpoint is outside the mesh"
        )
    );
    assert_eq!(picks[2], picks[0]);
    assert_eq!(picks[3], picks[1]);
    // Any counter value works, including one that has wrapped.
    assert_eq!(decide(&e, "10.0.0.2", "10.96.0.1:8000", u64::MAX), picks[1]);
    let o = e
        .outbound(&request("10.0.0.2", "10.96.0.1:8000", 0))
        .expect("ok");
    assert_eq!(
        o.tls,
        OutboundTls::Mesh {
            server: Some(&id("foo", "httpbin"))
        }
    );
    assert_eq!(o.service, Some("httpbin.foo.svc.cluster.local"));
}

#[test]
fn auto_mtls_respects_the_endpoint_port_mode() {
    let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  portLevelMtls: {80: {mode: DISABLE}}
";
    let e = engine(yaml, inventory());
    let (_, code, reason) = decide(&e, "10.0.0.2", "10.96.0.1:8000", 0);
    assert_eq!(code, "plaintext");
    assert_eq!(
        reason,
        "automatic: endpoint is DISABLE (port level, PeerAuthentication foo/httpbin)"
    );
    // Direct pod connections on another port still get mTLS.
    assert_eq!(decide(&e, "10.0.0.2", "10.0.0.1:9000", 0).1, "mesh_mtls");
}

#[test]
fn non_service_destinations_pass_through() {
    let e = engine("", inventory());
    assert_eq!(
        decide(&e, "10.0.0.2", "93.184.216.34:443", 7),
        decision(
            "93.184.216.34:443",
            "plaintext",
            "automatic: endpoint is outside the mesh"
        )
    );
    // A VIP on a port the service does not expose is not the service.
    assert_eq!(
        decide(&e, "10.0.0.2", "10.96.0.1:9999", 0).0,
        "10.96.0.1:9999"
    );
}

#[test]
fn refusals() {
    let e = engine("", inventory());
    let err = e
        .outbound(&request("10.0.0.2", "10.96.0.3:80", 0))
        .expect_err("no endpoints");
    assert_eq!(err.code(), "no_endpoints");
    assert_eq!(
        err.to_string(),
        "service empty.bar.svc.cluster.local has no endpoints"
    );
    let err = e
        .outbound(&request("10.9.9.9", "10.96.0.1:8000", 0))
        .expect_err("unknown");
    assert_eq!(err, Refusal::UnknownClient);
    let o = e
        .outbound(&request("10.0.4.1", "10.96.0.1:8000", 0))
        .expect("ok");
    assert_eq!(
        (o.tls, o.reason),
        (OutboundTls::Plaintext, TlsReason::ClientOutsideMesh)
    );
}

#[test]
fn destination_rule_modes() {
    let e = engine(
        &drs(&[
            (
                "a",
                "foo",
                "httpbin.bar.svc.cluster.local",
                "{mode: DISABLE}",
            ),
            ("b", "foo", "httpbin", "{mode: ISTIO_MUTUAL}"),
            (
                "c",
                "foo",
                "db.data.svc.cluster.local",
                "{mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, sni: db}",
            ),
        ]),
        inventory(),
    );
    assert_eq!(
        decide(&e, "10.0.0.2", "10.96.0.2:8000", 0),
        decision("10.0.1.1:80", "plaintext", "DestinationRule foo/a")
    );
    // ISTIO_MUTUAL also to the legacy endpoint: the handshake will fail, as in Istio.
    let (_, code, reason) = decide(&e, "10.0.0.2", "10.96.0.1:8000", 1);
    assert_eq!(
        (code, reason.as_str()),
        ("mesh_mtls", "DestinationRule foo/b")
    );
    let o = e
        .outbound(&request("10.0.0.2", "10.0.3.1:5432", 0))
        .expect("ok");
    let OutboundTls::Originate(tls) = o.tls else {
        panic!("{o:?}")
    };
    assert_eq!(
        (
            tls.mode,
            tls.client_certificate.as_deref(),
            tls.sni.as_deref()
        ),
        (TlsMode::Mutual, Some("/c.pem"), Some("db"))
    );
    assert_eq!(o.tls.code(), "mutual");
    assert_eq!(o.service, Some("db.data.svc.cluster.local"));
    // Rules in foo are not seen from bar.
    assert_eq!(decide(&e, "10.0.1.2", "10.96.0.2:8000", 0).1, "mesh_mtls");
}

#[test]
fn simple_and_unusable_mutual() {
    let e = engine(
        &drs(&[
            (
                "s",
                "bar",
                "httpbin",
                "{mode: SIMPLE, caCertificates: /ca.pem}",
            ),
            ("m", "foo", "*", "{mode: MUTUAL, credentialName: secret}"),
        ]),
        inventory(),
    );
    assert_eq!(decide(&e, "10.0.1.2", "10.96.0.2:8000", 0).1, "simple");
    let err = e
        .outbound(&request("10.0.0.2", "10.96.0.1:8000", 0))
        .expect_err("refused");
    assert_eq!(err.code(), "credentials_unavailable");
    assert_eq!(
        err.to_string(),
        "DestinationRule foo/m needs client credentials from a Kubernetes secret the agent \
         cannot read"
    );
}

#[test]
fn lookup_order_client_then_service_then_root_namespace() {
    let yaml = drs(&[
        ("root", "istio-system", "*.local", "{mode: ISTIO_MUTUAL}"),
        (
            "svc",
            "bar",
            "httpbin.bar.svc.cluster.local",
            "{mode: SIMPLE}",
        ),
        (
            "client",
            "foo",
            "*.bar.svc.cluster.local",
            "{mode: DISABLE}",
        ),
    ]);
    let e = engine(&yaml, inventory());
    assert_reasons(
        &e,
        &[
            // The client's namespace wins even with a less specific host.
            ("10.0.0.2", "10.96.0.2:8000", "DestinationRule foo/client"),
            // From bar: the service namespace's rule.
            ("10.0.1.2", "10.96.0.2:8000", "DestinationRule bar/svc"),
            // httpbin.foo from bar: only the root rule matches.
            (
                "10.0.1.2",
                "10.96.0.1:8000",
                "DestinationRule istio-system/root",
            ),
        ],
    );
}

#[test]
fn most_specific_host_wins_within_a_namespace() {
    let yaml = drs(&[
        ("any", "istio-system", "*", "{mode: SIMPLE}"),
        ("local", "istio-system", "*.local", "{mode: ISTIO_MUTUAL}"),
        (
            "ns",
            "istio-system",
            "*.bar.svc.cluster.local",
            "{mode: SIMPLE}",
        ),
        (
            "exact",
            "istio-system",
            "httpbin.bar.svc.cluster.local",
            "{mode: DISABLE}",
        ),
    ]);
    let e = engine(&yaml, inventory());
    assert_reasons(
        &e,
        &[
            (
                "10.0.0.2",
                "10.96.0.2:8000",
                "DestinationRule istio-system/exact",
            ),
            (
                "10.0.0.2",
                "10.96.0.1:8000",
                "DestinationRule istio-system/local",
            ),
        ],
    );
    // A host only `*` matches.
    let e = engine(
        &dr("any", "istio-system", "*", "{mode: DISABLE}"),
        inventory(),
    );
    assert_eq!(
        decide(&e, "10.0.0.2", "10.96.0.1:8000", 0).2,
        "DestinationRule istio-system/any"
    );
}

#[test]
fn port_level_settings_override_without_inheriting() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: foo}
spec:
  host: httpbin
  trafficPolicy:
    tls: {mode: DISABLE}
    portLevelSettings:
    - port: {number: 8000}
      tls: {mode: ISTIO_MUTUAL}
    - port: {number: 9000}
";
    let mut inv = inventory();
    inv.services[0].ports.push(ServicePort {
        name: None,
        port: 9000,
        target_port: Some(90),
    });
    inv.services[0].ports.push(ServicePort {
        name: None,
        port: 7000,
        target_port: None,
    });
    let e = engine(yaml, inv);
    assert_eq!(
        decide(&e, "10.0.0.2", "10.96.0.1:8000", 0),
        decision(
            "10.0.0.1:80",
            "mesh_mtls",
            "DestinationRule foo/r (port level)"
        )
    );
    // A port-level entry without tls falls back to automatic mTLS, not to the rule's tls.
    assert_eq!(
        decide(&e, "10.0.0.2", "10.96.0.1:9000", 0),
        decision(
            "10.0.0.1:90",
            "mesh_mtls",
            "automatic: endpoint is PERMISSIVE (default)"
        )
    );
    assert_eq!(
        decide(&e, "10.0.0.2", "10.96.0.1:7000", 0).2,
        "DestinationRule foo/r"
    );
}

#[test]
fn export_to_and_workload_selector_limit_visibility() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: private, namespace: bar}
spec:
  host: httpbin
  exportTo: [.]
  trafficPolicy: {tls: {mode: DISABLE}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: selected, namespace: foo}
spec:
  host: httpbin.foo.svc.cluster.local
  workloadSelector: {matchLabels: {app: httpbin}}
  trafficPolicy: {tls: {mode: DISABLE}}
";
    let e = engine(yaml, inventory());
    // From foo, bar's private rule is invisible: automatic mTLS.
    assert_eq!(decide(&e, "10.0.0.2", "10.96.0.2:8000", 0).1, "mesh_mtls");
    assert_eq!(
        decide(&e, "10.0.1.2", "10.96.0.2:8000", 0).2,
        "DestinationRule bar/private"
    );
    // sleep does not carry app=httpbin, httpbin does.
    assert_eq!(decide(&e, "10.0.0.2", "10.96.0.1:8000", 0).1, "mesh_mtls");
    assert_eq!(
        decide(&e, "10.0.0.1", "10.96.0.1:8000", 0).2,
        "DestinationRule foo/selected"
    );
}

#[test]
fn service_ids_for_round_robin_counters() {
    let e = engine("", inventory());
    assert_eq!(e.service_count(), 4);
    let id = e.service_at(addr("10.96.0.2:8000")).expect("vip");
    assert_eq!(id.index(), 1);
    assert_eq!(
        e.service_at(addr("10.0.3.1:5432")).map(ServiceId::index),
        Some(3)
    );
    assert_eq!(e.service_at(addr("10.96.0.2:1")), None);
}

fn pinned(source: &str, destination: &str, endpoint: &str) -> OutboundRequest {
    OutboundRequest {
        source: ip(source),
        destination: addr(destination),
        pick: Pick::Endpoint(addr(endpoint)),
    }
}

#[test]
fn a_pinned_endpoint_is_decided_for_itself_whatever_the_round_robin() {
    let e = engine("", inventory());
    // The VIP alternates, but an open flow to the legacy endpoint stays with it.
    for _ in 0..3 {
        let o = e
            .outbound(&pinned("10.0.0.2", "10.96.0.1:8000", "10.0.0.9:80"))
            .expect("ok");
        assert_eq!(o.endpoint, addr("10.0.0.9:80"));
        assert_eq!(o.tls, OutboundTls::Plaintext);
        assert_eq!(o.service, Some("httpbin.foo.svc.cluster.local"));
    }
    let o = e
        .outbound(&pinned("10.0.0.2", "10.96.0.1:8000", "10.0.0.1:80"))
        .expect("ok");
    assert_eq!(
        o.tls,
        OutboundTls::Mesh {
            server: Some(&id("foo", "httpbin"))
        }
    );
    // The service's rules still apply to the pinned endpoint.
    let e = engine(
        &dr("b", "foo", "httpbin", "{mode: ISTIO_MUTUAL}"),
        inventory(),
    );
    let o = e
        .outbound(&pinned("10.0.0.2", "10.96.0.1:8000", "10.0.0.9:80"))
        .expect("ok");
    assert_eq!(
        (o.endpoint, o.tls.code(), o.reason.to_string()),
        (
            addr("10.0.0.9:80"),
            "mesh_mtls",
            "DestinationRule foo/b".to_owned()
        )
    );
    // An endpoint the service no longer lists keeps its flow: endpoint changes do not cut open
    // connections, and a service without endpoints has nothing to pick but still a pinned one.
    let o = e
        .outbound(&pinned("10.0.0.2", "10.96.0.3:80", "10.0.1.1:80"))
        .expect("pinned");
    assert_eq!(o.endpoint, addr("10.0.1.1:80"));
    assert_eq!(o.service, Some("empty.bar.svc.cluster.local"));
    // A direct destination keeps its own address and service.
    let o = e
        .outbound(&pinned("10.0.0.2", "10.0.3.1:5432", "10.0.3.1:5432"))
        .expect("ok");
    assert_eq!(o.endpoint, addr("10.0.3.1:5432"));
    assert_eq!(o.service, Some("db.data.svc.cluster.local"));
    // Refusals that do not depend on the endpoint still apply.
    assert_eq!(
        e.outbound(&pinned("10.9.9.9", "10.96.0.1:8000", "10.0.0.9:80")),
        Err(Refusal::UnknownClient)
    );
}

#[test]
fn a_pinned_ipv4_mapped_endpoint_is_canonical() {
    let e = engine("", inventory());
    let o = e
        .outbound(&pinned(
            "10.0.0.2",
            "10.96.0.1:8000",
            "[::ffff:10.0.0.1]:80",
        ))
        .expect("ok");
    assert_eq!(o.endpoint, addr("10.0.0.1:80"));
    assert!(matches!(o.tls, OutboundTls::Mesh { server: Some(_) }));
}

#[test]
fn open_flows_keep_only_what_still_meets_the_new_decision() {
    let httpbin = id("foo", "httpbin");
    let other = id("bar", "httpbin");
    let simple = ClientTls {
        mode: TlsMode::Simple,
        client_certificate: None,
        private_key: None,
        ca_certificates: Some("/ca.pem".to_owned()),
        sni: None,
        subject_alt_names: Vec::new(),
        insecure_skip_verify: false,
        credential_name: None,
    };
    let mutual = ClientTls {
        mode: TlsMode::Mutual,
        client_certificate: Some("/c.pem".to_owned()),
        private_key: Some("/k.pem".to_owned()),
        ..simple.clone()
    };
    let other_ca = ClientTls {
        ca_certificates: Some("/other-ca.pem".to_owned()),
        ..simple.clone()
    };
    let plain = FlowTls::Plaintext;
    let mesh = FlowTls::Mesh(httpbin.clone());
    let originated = FlowTls::Originate(simple.clone());

    // Plaintext now: whatever the flow has is at least that.
    for held in [&plain, &mesh, &originated] {
        assert!(OutboundTls::Plaintext.met_by(held), "{held}");
    }
    // Mesh mTLS now: only mesh mTLS to the same identity.
    let to_httpbin = OutboundTls::Mesh {
        server: Some(&httpbin),
    };
    assert!(to_httpbin.met_by(&mesh));
    assert!(!to_httpbin.met_by(&plain));
    assert!(!to_httpbin.met_by(&originated));
    assert!(
        !OutboundTls::Mesh {
            server: Some(&other)
        }
        .met_by(&mesh)
    );
    assert!(!OutboundTls::Mesh { server: None }.met_by(&mesh));
    // Origination now: only origination with the same settings.
    assert!(OutboundTls::Originate(&simple).met_by(&originated));
    assert!(!OutboundTls::Originate(&simple).met_by(&plain));
    assert!(!OutboundTls::Originate(&simple).met_by(&mesh));
    assert!(!OutboundTls::Originate(&mutual).met_by(&originated));
    assert!(!OutboundTls::Originate(&other_ca).met_by(&originated));

    // What a decision's flow runs, and how the log names both sides.
    assert_eq!(to_httpbin.to_flow(), Some(mesh.clone()));
    assert_eq!(OutboundTls::Mesh { server: None }.to_flow(), None);
    assert_eq!(
        OutboundTls::Originate(&simple).to_flow(),
        Some(originated.clone())
    );
    assert_eq!(
        mesh.to_string(),
        "mesh mTLS to spiffe://cluster.local/ns/foo/sa/httpbin"
    );
    assert_eq!(originated.to_string(), "SIMPLE TLS origination");
    assert_eq!(
        OutboundTls::Originate(&mutual).to_string(),
        "MUTUAL TLS origination"
    );
}

#[test]
fn deciding_an_open_flow_again_after_a_rule_change() {
    // The flow was made under automatic mTLS to the legacy endpoint: plaintext.
    let before = engine("", inventory());
    let request = pinned("10.0.0.2", "10.96.0.1:8000", "10.0.0.9:80");
    let held = before
        .outbound(&request)
        .expect("ok")
        .tls
        .to_flow()
        .expect("known");
    assert_eq!(held, FlowTls::Plaintext);
    // SIMPLE origination for the service: the plaintext flow falls short.
    let after = engine(&dr("s", "foo", "httpbin", "{mode: SIMPLE}"), inventory());
    assert!(!after.outbound(&request).expect("ok").tls.met_by(&held));
    // DISABLE: still plaintext, untouched; and a mesh flow to the other endpoint is stronger
    // than DISABLE needs, so it stays too.
    let after = engine(&dr("d", "foo", "httpbin", "{mode: DISABLE}"), inventory());
    assert!(after.outbound(&request).expect("ok").tls.met_by(&held));
    let mesh = FlowTls::Mesh(id("foo", "httpbin"));
    let to_mesh = pinned("10.0.0.2", "10.96.0.1:8000", "10.0.0.1:80");
    assert!(after.outbound(&to_mesh).expect("ok").tls.met_by(&mesh));
}
