//! The seed documents' curl matrices, replayed at the decision level.
//!
//! [`curl`] plays both agents: the client's outbound decision (or kernel NAT for a client
//! without an agent), then the server's inbound decision (or a plain server without one).
//! Outcomes map to what curl printed in the seeds: `Mtls(client)` is a 200 whose headers show
//! `URI=spiffe://…` of the client, `Plain` a 200 without it, `Refused` a connection the agent
//! resets where Envoy answered 503 or 403 (curl: `000`, exit 56).

use super::*;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// 200 over mesh mTLS; the server saw this client identity.
    Mtls(String),
    /// 200 in plaintext.
    Plain,
    /// 200 over TLS the client agent originated with DestinationRule files.
    Originated(TlsMode),
    /// Reset (Envoy: 503 or 403), with the refusing code.
    Refused(&'static str),
}

use Outcome::{Mtls, Plain, Refused};

/// STRICT refusing plaintext: Envoy's reset, curl's `000` and exit 56.
const STRICT_REFUSED: Outcome = Refused("plaintext_refused_strict");

fn uri(namespace: &str, service_account: &str) -> Outcome {
    Mtls(format!(
        "spiffe://cluster.local/ns/{namespace}/sa/{service_account}"
    ))
}

/// One curl from the workload at `from` to `to`, with round-robin position `pick`.
fn curl(e: &Engine, inventory: &Inventory, from: &str, to: &str, pick: u64) -> Outcome {
    let client = find(inventory, from);
    let source = SocketAddr::new(ip(from), 40000);
    let (endpoint, transport) = if client.mesh {
        match e.outbound(&OutboundRequest {
            source: ip(from),
            destination: addr(to),
            pick: Pick::Next(pick),
        }) {
            Ok(o) => (o.endpoint, o.tls),
            Err(r) => return Refused(r.code().as_str()),
        }
    } else {
        (
            kernel_nat(inventory, addr(to), pick),
            OutboundTls::Plaintext,
        )
    };
    let server = inventory
        .workloads
        .iter()
        .find(|w| w.ips.contains(&endpoint.ip()));
    let server_has_agent = server.is_some_and(|w| w.mesh);
    let peer = (client.mesh && matches!(transport, OutboundTls::Mesh { .. }))
        .then(|| id(&client.namespace, &client.service_account));
    match (transport, server_has_agent) {
        (OutboundTls::Originate(tls), _) => Outcome::Originated(tls.mode),
        // A plaintext server cannot complete a mesh handshake (Envoy: 503).
        (OutboundTls::Mesh { .. }, false) => Refused("handshake_failed"),
        (_, false) => Plain,
        (_, true) => {
            let verdict = e.inbound(&InboundRequest {
                source,
                destination: endpoint,
                peer: peer.as_ref(),
            });
            match (verdict.is_allowed(), &peer) {
                (false, _) => Refused(verdict.code()),
                (true, Some(peer)) => Mtls(peer.to_string()),
                (true, None) => Plain,
            }
        }
    }
}

/// What kube-proxy does for a client without an agent: VIP → endpoint, nothing else.
fn kernel_nat(inventory: &Inventory, to: SocketAddr, pick: u64) -> SocketAddr {
    for service in &inventory.services {
        let port = service.ports.iter().find(|p| p.port == to.port());
        if let (Some(port), Some(vip)) = (port, service.vip)
            && vip == to.ip()
        {
            let n = u64::try_from(service.endpoints.len()).expect("small");
            let i = usize::try_from(pick % n).expect("small");
            return SocketAddr::new(service.endpoints[i], port.target());
        }
    }
    to
}

fn find<'a>(inventory: &'a Inventory, address: &str) -> &'a Workload {
    inventory
        .workloads
        .iter()
        .find(|w| w.ips.contains(&ip(address)))
        .unwrap_or_else(|| panic!("no workload at {address}"))
}

/// Checks every `(client, server, outcomes by pick)` row; a row lists one outcome per
/// round-robin position to try.
fn check(phase: &str, e: &Engine, inventory: &Inventory, rows: &[(&str, &str, &[Outcome])]) {
    let names = |address: &str| {
        let w = find(inventory, address);
        format!(
            "{}.{}",
            w.name.as_deref().unwrap_or(&w.service_account),
            w.namespace
        )
    };
    for (from, to, expected) in rows {
        for (pick, want) in expected.iter().enumerate() {
            let got = curl(e, inventory, from, to, u64::try_from(pick).expect("small"));
            assert_eq!(&got, want, "{phase}: {} to {to} (pick {pick})", names(from));
        }
    }
}

/// Loads `yaml` over `inventory` and [`check`]s the rows.
fn replay(inventory: Inventory, phase: &str, yaml: &str, rows: &[(&str, &str, &[Outcome])]) {
    let e = engine(yaml, inventory.clone());
    check(phase, &e, &inventory, rows);
}

// === seed 004: automatic mutual TLS ===

mod seed_004 {
    use super::*;

    const SLEEP_FULL: &str = "10.88.0.11";
    const SLEEP_LEGACY: &str = "10.88.0.31";
    const HTTPBIN_FULL: &str = "10.96.0.10:8000";
    const HTTPBIN_PARTIAL: &str = "10.96.0.20:8000";
    const HTTPBIN_LEGACY: &str = "10.96.0.30:8000";

    /// Namespaces full (all mesh), partial (httpbin with and without sidecar behind one
    /// service) and legacy (no mesh).
    fn inventory() -> Inventory {
        let named = |mut w: Workload, name: &str| {
            w.name = Some(name.to_owned());
            w
        };
        Inventory {
            workloads: vec![
                named(mesh("full", "httpbin", "10.88.0.10"), "httpbin"),
                named(mesh("full", "sleep", SLEEP_FULL), "sleep"),
                named(
                    with_label(mesh("partial", "httpbin", "10.88.0.20"), "version", "v1"),
                    "httpbin",
                ),
                named(
                    with_label(
                        legacy("partial", "httpbin", "10.88.0.21"),
                        "version",
                        "nosidecar",
                    ),
                    "httpbin-nosidecar",
                ),
                named(legacy("legacy", "httpbin", "10.88.0.30"), "httpbin"),
                named(legacy("legacy", "sleep", SLEEP_LEGACY), "sleep"),
            ],
            services: vec![
                httpbin("full", "10.96.0.10", &["10.88.0.10"]),
                httpbin("partial", "10.96.0.20", &["10.88.0.20", "10.88.0.21"]),
                httpbin("legacy", "10.96.0.30", &["10.88.0.30"]),
                service("sleep", "full", Some("10.96.0.11"), 80, 80, &[SLEEP_FULL]),
            ],
        }
    }

    /// The demo profile's mesh policy, which the seed shows as PERMISSIVE.
    const MESH_PERMISSIVE: &str = "apiVersion: authentication.istio.io/v1alpha1
kind: MeshPolicy
metadata: {name: default}
spec:
  peers:
  - mtls: {mode: PERMISSIVE}
";

    /// The seed's `kubectl apply -n full` policy; files carry the namespace explicitly.
    const STRICT_HTTPBIN_FULL: &str = "---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: httpbin, namespace: full}
spec:
  targets:
  - name: httpbin
  peers:
  - mtls: {}
";

    const PLAINTEXT_HTTPBIN_FULL: &str = "---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: httpbin, namespace: full}
spec:
  targets:
  - name: httpbin
";

    const ISTIO_MUTUAL_HTTPBIN_FULL: &str = "---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: httpbin-full-mtls, namespace: full}
spec:
  host: httpbin.full.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";

    fn run(phase: &str, yaml: &str, rows: &[(&str, &str, &[Outcome])]) {
        replay(inventory(), phase, yaml, rows);
    }

    /// `sleep.full → httpbin.partial` alternates: pick 0 is the sidecar endpoint, pick 1 the
    /// one without.
    fn full_to_partial() -> Vec<Outcome> {
        vec![uri("full", "sleep"), Plain]
    }

    #[test]
    fn phase_1_permissive() {
        run(
            "PERMISSIVE",
            MESH_PERMISSIVE,
            &[
                (SLEEP_FULL, HTTPBIN_FULL, &[uri("full", "sleep")]),
                (SLEEP_FULL, HTTPBIN_PARTIAL, &full_to_partial()),
                (SLEEP_FULL, HTTPBIN_LEGACY, &[Plain]),
                (SLEEP_LEGACY, HTTPBIN_FULL, &[Plain]),
                (SLEEP_LEGACY, HTTPBIN_PARTIAL, &[Plain, Plain]),
                (SLEEP_LEGACY, HTTPBIN_LEGACY, &[Plain]),
            ],
        );
    }

    #[test]
    fn sidecar_migration_alternates_over_ten_requests() {
        let inventory = inventory();
        let e = engine(MESH_PERMISSIVE, inventory.clone());
        let outcomes: Vec<_> = (0..10)
            .map(|pick| curl(&e, &inventory, SLEEP_FULL, HTTPBIN_PARTIAL, pick))
            .collect();
        let mtls = outcomes
            .iter()
            .filter(|o| **o == uri("full", "sleep"))
            .count();
        assert_eq!((mtls, outcomes.len() - mtls), (5, 5), "{outcomes:?}");
        assert!(
            outcomes
                .iter()
                .all(|o| *o == uri("full", "sleep") || *o == Plain)
        );
    }

    #[test]
    fn phase_2_strict_on_httpbin_full() {
        run(
            "STRICT",
            &format!("{MESH_PERMISSIVE}{STRICT_HTTPBIN_FULL}"),
            &[
                (SLEEP_FULL, HTTPBIN_FULL, &[uri("full", "sleep")]),
                (SLEEP_FULL, HTTPBIN_PARTIAL, &full_to_partial()),
                (SLEEP_FULL, HTTPBIN_LEGACY, &[Plain]),
                (
                    SLEEP_LEGACY,
                    HTTPBIN_FULL,
                    &[Refused("plaintext_refused_strict")],
                ),
                // The policy lives in `full`: partial's sidecar endpoint stays PERMISSIVE,
                // whatever the seed's prose says.
                (SLEEP_LEGACY, HTTPBIN_PARTIAL, &[Plain, Plain]),
                (SLEEP_LEGACY, HTTPBIN_LEGACY, &[Plain]),
            ],
        );
    }

    #[test]
    fn phase_3_disable_on_httpbin_full() {
        run(
            "DISABLE",
            &format!("{MESH_PERMISSIVE}{PLAINTEXT_HTTPBIN_FULL}"),
            &[
                (SLEEP_FULL, HTTPBIN_FULL, &[Plain]),
                // The seed's single sample hit the endpoint without sidecar; the sidecar
                // endpoint is still PERMISSIVE and gets mTLS.
                (SLEEP_FULL, HTTPBIN_PARTIAL, &full_to_partial()),
                (SLEEP_FULL, HTTPBIN_LEGACY, &[Plain]),
                (SLEEP_LEGACY, HTTPBIN_FULL, &[Plain]),
                (SLEEP_LEGACY, HTTPBIN_PARTIAL, &[Plain, Plain]),
                (SLEEP_LEGACY, HTTPBIN_LEGACY, &[Plain]),
            ],
        );
    }

    #[test]
    fn phase_4_destination_rule_overrides() {
        run(
            "ISTIO_MUTUAL override",
            &format!("{MESH_PERMISSIVE}{PLAINTEXT_HTTPBIN_FULL}{ISTIO_MUTUAL_HTTPBIN_FULL}"),
            &[
                // Envoy: 503; the agent at httpbin.full does not terminate mesh TLS.
                (SLEEP_FULL, HTTPBIN_FULL, &[Refused("mtls_refused_disable")]),
                (SLEEP_FULL, HTTPBIN_PARTIAL, &full_to_partial()),
                (SLEEP_FULL, HTTPBIN_LEGACY, &[Plain]),
                (SLEEP_LEGACY, HTTPBIN_FULL, &[Plain]),
                (SLEEP_LEGACY, HTTPBIN_PARTIAL, &[Plain, Plain]),
                (SLEEP_LEGACY, HTTPBIN_LEGACY, &[Plain]),
            ],
        );
    }

    #[test]
    fn setup_check_all_namespaces_reach_each_other() {
        // "All requests should succeed with HTTP 200", with mTLS where both ends have agents.
        let inventory = inventory();
        let e = engine(MESH_PERMISSIVE, inventory.clone());
        assert_eq!(
            curl(&e, &inventory, SLEEP_FULL, HTTPBIN_FULL, 0),
            uri("full", "sleep")
        );
        assert_eq!(
            curl(&e, &inventory, SLEEP_LEGACY, "10.96.0.11:80", 0),
            Plain
        );
    }
}

// === seed 001: mesh, namespace and service scoped policies ===

mod seed_001 {
    use super::*;

    const SLEEP_FOO: &str = "10.88.1.11";
    const SLEEP_BAR: &str = "10.88.2.11";
    const SLEEP_LEGACY: &str = "10.88.3.11";
    const HTTPBIN_FOO: &str = "10.96.1.10:8000";
    const HTTPBIN_BAR: &str = "10.96.2.10:8000";
    const HTTPBIN_LEGACY: &str = "10.96.3.10:8000";
    const KUBERNETES: &str = "10.96.0.1:443";

    fn inventory() -> Inventory {
        Inventory {
            workloads: vec![
                mesh("foo", "httpbin", "10.88.1.10"),
                mesh("foo", "sleep", SLEEP_FOO),
                mesh("bar", "httpbin", "10.88.2.10"),
                mesh("bar", "sleep", SLEEP_BAR),
                legacy("legacy", "httpbin", "10.88.3.10"),
                legacy("legacy", "sleep", SLEEP_LEGACY),
            ],
            services: vec![
                httpbin("foo", "10.96.1.10", &["10.88.1.10"]),
                httpbin("bar", "10.96.2.10", &["10.88.2.10"]),
                httpbin("legacy", "10.96.3.10", &["10.88.3.10"]),
                // The API server: not a pod, not in the mesh.
                service(
                    "kubernetes",
                    "default",
                    Some("10.96.0.1"),
                    443,
                    6443,
                    &["192.168.0.10"],
                ),
            ],
        }
    }

    const MESH_STRICT: &str = "apiVersion: authentication.istio.io/v1alpha1
kind: MeshPolicy
metadata: {name: default}
spec:
  peers:
  - mtls: {}
";

    const MESH_PERMISSIVE: &str = "apiVersion: authentication.istio.io/v1alpha1
kind: MeshPolicy
metadata: {name: default}
spec:
  peers:
  - mtls: {mode: PERMISSIVE}
";

    const DR_ALL_LOCAL: &str = "---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: default, namespace: istio-system}
spec:
  host: \"*.local\"
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";

    const DR_LEGACY_DISABLE: &str = "---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: httpbin-legacy, namespace: legacy}
spec:
  host: httpbin.legacy.svc.cluster.local
  trafficPolicy:
    tls:
      mode: DISABLE
";

    const DR_API_SERVER: &str = "---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: api-server, namespace: istio-system}
spec:
  host: kubernetes.default.svc.cluster.local
  trafficPolicy:
    tls:
      mode: DISABLE
";

    const FOO_NAMESPACE_STRICT: &str = "---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: default, namespace: foo}
spec:
  peers:
  - mtls: {}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: default, namespace: foo}
spec:
  host: \"*.foo.svc.cluster.local\"
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";

    const BAR_HTTPBIN_STRICT: &str = "---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: httpbin, namespace: bar}
spec:
  targets:
  - name: httpbin
  peers:
  - mtls: {}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: httpbin, namespace: bar}
spec:
  host: httpbin.bar.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";

    fn run(phase: &str, yaml: &str, rows: &[(&str, &str, &[Outcome])]) {
        replay(inventory(), phase, yaml, rows);
    }

    #[test]
    fn global_mtls_with_automatic_mtls_needs_no_destination_rule() {
        // The seed predates automatic mTLS: without a DestinationRule its clients sent
        // plaintext and got 503. With the agent, mesh clients always originate mTLS to mesh
        // servers, so these succeed; the seed's own next step (the `*.local` rule) gives
        // the same result.
        run(
            "MeshPolicy STRICT",
            MESH_STRICT,
            &[
                (SLEEP_FOO, HTTPBIN_FOO, &[uri("foo", "sleep")]),
                (SLEEP_FOO, HTTPBIN_BAR, &[uri("foo", "sleep")]),
                (SLEEP_BAR, HTTPBIN_FOO, &[uri("bar", "sleep")]),
                (SLEEP_BAR, HTTPBIN_BAR, &[uri("bar", "sleep")]),
            ],
        );
    }

    #[test]
    fn global_mtls_with_istio_mutual_everywhere() {
        run(
            "MeshPolicy STRICT + *.local ISTIO_MUTUAL",
            &format!("{MESH_STRICT}{DR_ALL_LOCAL}"),
            &[
                (SLEEP_FOO, HTTPBIN_FOO, &[uri("foo", "sleep")]),
                (SLEEP_FOO, HTTPBIN_BAR, &[uri("foo", "sleep")]),
                (SLEEP_BAR, HTTPBIN_FOO, &[uri("bar", "sleep")]),
                (SLEEP_BAR, HTTPBIN_BAR, &[uri("bar", "sleep")]),
                // Non-mesh to mesh: 000, exit 56.
                (SLEEP_LEGACY, HTTPBIN_FOO, &[STRICT_REFUSED]),
                (SLEEP_LEGACY, HTTPBIN_BAR, &[STRICT_REFUSED]),
                // Mesh to non-mesh under ISTIO_MUTUAL: Envoy's 503.
                (SLEEP_FOO, HTTPBIN_LEGACY, &[Refused("handshake_failed")]),
                (SLEEP_BAR, HTTPBIN_LEGACY, &[Refused("handshake_failed")]),
                (SLEEP_FOO, KUBERNETES, &[Refused("handshake_failed")]),
            ],
        );
    }

    #[test]
    fn disable_for_the_legacy_service_and_the_api_server() {
        run(
            "+ httpbin-legacy DISABLE + api-server DISABLE",
            &format!("{MESH_STRICT}{DR_ALL_LOCAL}{DR_LEGACY_DISABLE}{DR_API_SERVER}"),
            &[
                // The legacy namespace's rule is seen from foo and bar (the service's
                // namespace comes before the root namespace) and beats `*.local`.
                (SLEEP_FOO, HTTPBIN_LEGACY, &[Plain]),
                (SLEEP_BAR, HTTPBIN_LEGACY, &[Plain]),
                // curl speaks TLS to the API server itself; the agent passes it through.
                (SLEEP_FOO, KUBERNETES, &[Plain]),
                (SLEEP_FOO, HTTPBIN_BAR, &[uri("foo", "sleep")]),
            ],
        );
    }

    #[test]
    fn namespace_scoped_policy() {
        run(
            "Policy default in foo",
            &format!("{MESH_PERMISSIVE}{FOO_NAMESPACE_STRICT}"),
            &[
                (SLEEP_FOO, HTTPBIN_FOO, &[uri("foo", "sleep")]),
                (SLEEP_FOO, HTTPBIN_BAR, &[uri("foo", "sleep")]),
                (SLEEP_FOO, HTTPBIN_LEGACY, &[Plain]),
                (SLEEP_BAR, HTTPBIN_FOO, &[uri("bar", "sleep")]),
                (SLEEP_BAR, HTTPBIN_BAR, &[uri("bar", "sleep")]),
                (SLEEP_BAR, HTTPBIN_LEGACY, &[Plain]),
                (SLEEP_LEGACY, HTTPBIN_FOO, &[STRICT_REFUSED]),
                (SLEEP_LEGACY, HTTPBIN_BAR, &[Plain]),
                (SLEEP_LEGACY, HTTPBIN_LEGACY, &[Plain]),
            ],
        );
    }

    #[test]
    fn service_scoped_policy() {
        let yaml = format!("{MESH_PERMISSIVE}{FOO_NAMESPACE_STRICT}{BAR_HTTPBIN_STRICT}");
        run(
            "+ Policy httpbin in bar",
            &yaml,
            &[
                (SLEEP_FOO, HTTPBIN_FOO, &[uri("foo", "sleep")]),
                (SLEEP_FOO, HTTPBIN_BAR, &[uri("foo", "sleep")]),
                (SLEEP_FOO, HTTPBIN_LEGACY, &[Plain]),
                (SLEEP_BAR, HTTPBIN_FOO, &[uri("bar", "sleep")]),
                (SLEEP_BAR, HTTPBIN_BAR, &[uri("bar", "sleep")]),
                (SLEEP_BAR, HTTPBIN_LEGACY, &[Plain]),
                (SLEEP_LEGACY, HTTPBIN_FOO, &[STRICT_REFUSED]),
                (SLEEP_LEGACY, HTTPBIN_BAR, &[STRICT_REFUSED]),
                (SLEEP_LEGACY, HTTPBIN_LEGACY, &[Plain]),
            ],
        );
        // Only httpbin is targeted: sleep in bar keeps the mesh-wide PERMISSIVE.
        let e = engine(&yaml, inventory());
        let sleep_bar = e.effective_peer_auth(ip(SLEEP_BAR), 80).expect("known");
        assert_eq!(sleep_bar.mode, Mode::Permissive);
        assert_eq!(sleep_bar.policy.map(|p| p.kind), Some(Kind::MeshPolicy));
        let httpbin_bar = e.effective_peer_auth(ip("10.88.2.10"), 80).expect("known");
        assert_eq!(httpbin_bar.to_string(), "STRICT (Policy bar/httpbin)");
    }
}

// === seed 003: STRICT by selector, DENY by principal, MUTUAL to a database, probes ===

mod seed_003 {
    use super::*;

    const SLEEP_TEST: &str = "10.88.4.11";
    const SLEEP_LEGACY: &str = "10.88.3.11";
    const SLEEP_FULL: &str = "10.88.0.11";
    const HTTPBIN_TEST: &str = "10.96.4.10:8000";
    const PROBE_SOURCE: &str = "10.88.0.1";

    fn inventory() -> Inventory {
        let mut mongo = service("mongo", "mongo", None, 27017, 27017, &["10.88.5.10"]);
        mongo.ports[0].name = None;
        Inventory {
            workloads: vec![
                with_label(mesh("mtls-test", "httpbin", "10.88.4.10"), "version", "v1"),
                mesh("mtls-test", "sleep", SLEEP_TEST),
                mesh("mtls-test", "mongo-client", "10.88.4.12"),
                mesh("mtls-test", "httpbin-probe", "10.88.4.13"),
                legacy("legacy", "sleep", SLEEP_LEGACY),
                mesh("full", "sleep", SLEEP_FULL),
                legacy("mongo", "mongo", "10.88.5.10"),
            ],
            services: vec![httpbin("mtls-test", "10.96.4.10", &["10.88.4.10"]), mongo],
        }
    }

    /// The seed applied this DestinationRule without a namespace: files need one, and
    /// `default` (kubectl's) is assumed with a warning; it does not change the outcome
    /// because automatic mTLS already picks mesh mTLS.
    const STRICT_HTTPBIN: &str = "apiVersion: \"networking.istio.io/v1alpha3\"
kind: \"DestinationRule\"
metadata:
  name: \"httpbin-mtls-test-mtls\"
spec:
  host: httpbin.mtls-test.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
---
apiVersion: \"security.istio.io/v1beta1\"
kind: \"PeerAuthentication\"
metadata:
  name: \"httpbin\"
  namespace: \"mtls-test\"
spec:
  selector:
    matchLabels:
      app: httpbin
  mtls:
    mode: STRICT
---
";

    const DENY_SLEEP_FULL: &str = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: httpbin.mtls-test.svc.cluster.local
  namespace: mtls-test
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/full/sa/sleep
    to:
    - operation:
        methods:
        - GET
  selector:
    matchLabels:
      app: httpbin
---
";

    const DB_MTLS: &str = "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  namespace: mtls-test
  name: db-mtls
spec:
  host: mongo.mongo.svc.cluster.local
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: /pem/client.pem
      privateKey: /pem/client.key
      caCertificates: /pem/ca.pem
";

    fn run(phase: &str, yaml: &str, rows: &[(&str, &str, &[Outcome])]) {
        replay(inventory(), phase, yaml, rows);
    }

    #[test]
    fn default_permissive() {
        run(
            "PERMISSIVE",
            "",
            &[
                (SLEEP_TEST, HTTPBIN_TEST, &[uri("mtls-test", "sleep")]),
                (SLEEP_LEGACY, HTTPBIN_TEST, &[Plain]),
                (SLEEP_FULL, HTTPBIN_TEST, &[uri("full", "sleep")]),
            ],
        );
    }

    #[test]
    fn strict_by_selector() {
        run(
            "STRICT",
            STRICT_HTTPBIN,
            &[
                (SLEEP_TEST, HTTPBIN_TEST, &[uri("mtls-test", "sleep")]),
                (
                    SLEEP_LEGACY,
                    HTTPBIN_TEST,
                    &[Refused("plaintext_refused_strict")],
                ),
                (SLEEP_FULL, HTTPBIN_TEST, &[uri("full", "sleep")]),
            ],
        );
        let set = load(STRICT_HTTPBIN);
        assert_eq!(set.destination_rules[0].resource.namespace, "default");
        assert!(set.warnings[0].message.contains("assuming `default`"));
    }

    #[test]
    fn deny_by_principal() {
        run(
            "DENY sleep.full",
            &format!("{STRICT_HTTPBIN}{DENY_SLEEP_FULL}"),
            &[
                (SLEEP_TEST, HTTPBIN_TEST, &[uri("mtls-test", "sleep")]),
                (
                    SLEEP_LEGACY,
                    HTTPBIN_TEST,
                    &[Refused("plaintext_refused_strict")],
                ),
                // Envoy: 403 for GET. The agent cannot see the method, so the DENY rule
                // applies to every connection from sleep.full.
                (SLEEP_FULL, HTTPBIN_TEST, &[Refused("deny_rule")]),
            ],
        );
    }

    #[test]
    fn mutual_tls_origination_to_a_database() {
        let inventory = inventory();
        let e = engine(DB_MTLS, inventory.clone());
        // Headless service: the client connects to the pod address directly.
        assert_eq!(
            curl(&e, &inventory, "10.88.4.12", "10.88.5.10:27017", 0),
            Outcome::Originated(TlsMode::Mutual)
        );
        let o = e
            .outbound(&OutboundRequest {
                source: ip("10.88.4.12"),
                destination: addr("10.88.5.10:27017"),
                pick: Pick::Next(0),
            })
            .expect("allowed");
        let OutboundTls::Originate(tls) = o.tls else {
            panic!("{o:?}")
        };
        assert_eq!(tls.client_certificate.as_deref(), Some("/pem/client.pem"));
        assert_eq!(tls.private_key.as_deref(), Some("/pem/client.key"));
        assert_eq!(tls.ca_certificates.as_deref(), Some("/pem/ca.pem"));
        assert_eq!(o.service, Some("mongo.mongo.svc.cluster.local"));
        // A client in another namespace does not see mtls-test's rule: plaintext, which
        // the database (requireTLS) refuses, as in the seed's first attempt.
        assert_eq!(
            curl(&e, &inventory, SLEEP_FULL, "10.88.5.10:27017", 0),
            Plain
        );
    }

    #[test]
    fn probes_pass_strict() {
        let settings = Settings {
            probe_sources: vec![ip(PROBE_SOURCE)],
            ..Settings::default()
        };
        let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: probe, namespace: mtls-test}
spec:
  selector: {matchLabels: {app: httpbin-probe}}
  mtls: {mode: STRICT}
";
        let e = Engine::new(load(yaml), settings, inventory());
        let probe = e.inbound(&plaintext("10.88.0.1:51000", "10.88.4.13:80"));
        assert_eq!((probe.is_allowed(), probe.code()), (true, "probe"));
        let other = e.inbound(&plaintext("10.88.3.11:51000", "10.88.4.13:80"));
        assert_eq!(other.code(), "plaintext_refused_strict");
    }
}
