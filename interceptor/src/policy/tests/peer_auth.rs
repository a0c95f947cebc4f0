//! `effective_peer_auth`: precedence, inheritance, port-level modes and conflicts.

use super::*;

const MESH_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

/// Selects the httpbin workloads, as a `spec` field of [`peer_authentication`].
const SELECT_HTTPBIN: &str = "selector: {matchLabels: {app: httpbin}}";

/// A `security.istio.io/v1` PeerAuthentication document whose `spec` holds `fields`, one
/// flow-style `key: value` each.
fn peer_authentication(name: &str, namespace: &str, fields: &[&str]) -> String {
    let mut document = format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {name}, namespace: {namespace}}}
spec:
"
    );
    for field in fields {
        document.push_str("  ");
        document.push_str(field);
        document.push('\n');
    }
    document
}

/// One file of YAML documents.
fn documents(documents: &[&str]) -> String {
    documents.join("---\n")
}

fn inventory() -> Inventory {
    Inventory {
        workloads: vec![
            mesh("foo", "httpbin", "10.0.0.1"),
            mesh("foo", "sleep", "10.0.0.2"),
            mesh("bar", "httpbin", "10.0.0.3"),
        ],
        services: vec![httpbin("foo", "10.96.0.1", &["10.0.0.1"])],
    }
}

/// A workload's mode, the name of the policy that set it, and whether a port-level setting did.
type ModeOf = (Mode, Option<String>, bool);

fn mode_of(engine: &Engine, address: &str, port: u16) -> ModeOf {
    let m = engine
        .effective_peer_auth(ip(address), port)
        .expect("known workload");
    (m.mode, m.policy.map(|p| p.name.clone()), m.port_level)
}

/// What [`mode_of`] returns for a mode set by the policy called `policy`.
fn by(mode: Mode, policy: &str, port_level: bool) -> ModeOf {
    (mode, Some(policy.to_owned()), port_level)
}

/// Asserts [`mode_of`] for each `(address, port, expected)`.
#[track_caller]
fn assert_modes(engine: &Engine, expected: &[(&str, u16, ModeOf)]) {
    for (address, port, want) in expected {
        assert_eq!(&mode_of(engine, address, *port), want, "{address}:{port}");
    }
}

#[test]
fn default_is_permissive() {
    let e = engine("", inventory());
    assert_eq!(mode_of(&e, "10.0.0.1", 80), (Mode::Permissive, None, false));
    assert_eq!(e.effective_peer_auth(ip("10.9.9.9"), 80), None);
}

#[test]
fn mesh_policy_applies_everywhere() {
    let e = engine(MESH_STRICT, inventory());
    for w in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
        assert_eq!(mode_of(&e, w, 80), by(Mode::Strict, "default", false));
    }
}

#[test]
fn namespace_overrides_mesh_and_selector_overrides_namespace() {
    let yaml = documents(&[
        MESH_STRICT,
        &peer_authentication("ns", "foo", &["mtls: {mode: PERMISSIVE}"]),
        &peer_authentication("httpbin", "foo", &[SELECT_HTTPBIN, "mtls: {mode: DISABLE}"]),
    ]);
    let e = engine(&yaml, inventory());
    assert_modes(
        &e,
        &[
            ("10.0.0.1", 80, by(Mode::Disable, "httpbin", false)),
            ("10.0.0.2", 80, by(Mode::Permissive, "ns", false)),
            ("10.0.0.3", 80, by(Mode::Strict, "default", false)),
        ],
    );
}

#[test]
fn unset_inherits_from_the_parent() {
    let yaml = documents(&[
        MESH_STRICT,
        &peer_authentication("ns", "foo", &["mtls: {mode: UNSET}"]),
        &peer_authentication("httpbin", "foo", &[SELECT_HTTPBIN]),
    ]);
    let e = engine(&yaml, inventory());
    assert_modes(
        &e,
        &[
            ("10.0.0.1", 80, by(Mode::Strict, "default", false)),
            ("10.0.0.2", 80, by(Mode::Strict, "default", false)),
        ],
    );
}

#[test]
fn port_level_modes_apply_to_selected_workloads_and_unset_inherits() {
    let yaml = format!(
        "{MESH_STRICT}---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: httpbin, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  mtls: {{mode: PERMISSIVE}}
  portLevelMtls:
    8080: {{mode: DISABLE}}
    9090: {{mode: UNSET}}
"
    );
    let e = engine(&yaml, inventory());
    assert_modes(
        &e,
        &[
            ("10.0.0.1", 80, by(Mode::Permissive, "httpbin", false)),
            ("10.0.0.1", 8080, by(Mode::Disable, "httpbin", true)),
            ("10.0.0.1", 9090, by(Mode::Permissive, "httpbin", false)),
            // Port-level settings of a selector policy do not leak to other workloads.
            ("10.0.0.2", 8080, by(Mode::Strict, "default", false)),
        ],
    );
}

#[test]
fn port_level_mode_with_unset_workload_mode_inherits_namespace() {
    let yaml = documents(&[
        &peer_authentication("ns", "foo", &["mtls: {mode: STRICT}"]),
        &peer_authentication(
            "httpbin",
            "foo",
            &[SELECT_HTTPBIN, "portLevelMtls: {8080: {mode: PERMISSIVE}}"],
        ),
    ]);
    let e = engine(&yaml, inventory());
    assert_modes(
        &e,
        &[
            ("10.0.0.1", 80, by(Mode::Strict, "ns", false)),
            ("10.0.0.1", 8080, by(Mode::Permissive, "httpbin", true)),
        ],
    );
}

#[test]
fn first_selector_policy_in_file_order_wins_with_a_warning() {
    let yaml = documents(&[
        &peer_authentication("first", "foo", &[SELECT_HTTPBIN, "mtls: {mode: STRICT}"]),
        &peer_authentication("second", "foo", &[SELECT_HTTPBIN, "mtls: {mode: DISABLE}"]),
    ]);
    let e = engine(&yaml, inventory());
    assert_eq!(
        mode_of(&e, "10.0.0.1", 80),
        by(Mode::Strict, "first", false)
    );
    let warning = e.warnings()[0].to_string();
    assert_eq!(
        warning,
        "test.yaml: document 2: workload foo/httpbin (10.0.0.1) is also selected by \
         PeerAuthentication foo/first (earlier in file order), which wins as the oldest would \
         in Istio; this policy does not apply to it"
    );
}

#[test]
fn duplicate_namespace_policies_keep_the_first() {
    let yaml = documents(&[
        &peer_authentication("a", "foo", &["mtls: {mode: DISABLE}"]),
        &peer_authentication("b", "foo", &["mtls: {mode: STRICT}"]),
    ]);
    let e = engine(&yaml, inventory());
    assert_eq!(mode_of(&e, "10.0.0.2", 80), by(Mode::Disable, "a", false));
    assert!(
        e.warnings()[0]
            .message
            .contains("PeerAuthentication foo/a is also namespace-wide")
    );
}

#[test]
fn selector_policies_in_the_root_namespace_apply_to_nothing() {
    let yaml = peer_authentication(
        "sel",
        "istio-system",
        &[SELECT_HTTPBIN, "mtls: {mode: STRICT}"],
    );
    let e = engine(&yaml, inventory());
    assert_eq!(mode_of(&e, "10.0.0.1", 80), (Mode::Permissive, None, false));
    assert!(
        e.warnings()[0]
            .message
            .contains("root namespace to no workload")
    );
}

#[test]
fn custom_root_namespace() {
    let settings = Settings {
        root_namespace: "mesh-root".to_owned(),
        ..Settings::default()
    };
    let yaml = peer_authentication("default", "mesh-root", &["mtls: {mode: STRICT}"]);
    let e = Engine::new(load(&yaml), settings, inventory());
    assert_eq!(
        mode_of(&e, "10.0.0.3", 80),
        by(Mode::Strict, "default", false)
    );
    let e = engine(&yaml, inventory());
    assert_eq!(mode_of(&e, "10.0.0.3", 80), (Mode::Permissive, None, false));
}

#[test]
fn legacy_service_targets_resolve_through_endpoints() {
    let yaml = "apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: httpbin, namespace: foo}
spec:
  targets: [{name: httpbin}]
  peers: [{mtls: {}}]
---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: ported, namespace: bar}
spec:
  targets:
  - name: httpbin
    ports: [{name: http}]
  peers: [{mtls: {}}]
";
    let mut inv = inventory();
    let mut bar = httpbin("bar", "10.96.0.3", &["10.0.0.3"]);
    bar.ports.push(ServicePort {
        name: Some("admin".to_owned()),
        port: 9000,
        target_port: None,
    });
    inv.services.push(bar);
    let e = engine(yaml, inv);
    assert_modes(
        &e,
        &[
            ("10.0.0.1", 80, by(Mode::Strict, "httpbin", false)),
            // sleep in foo is not an endpoint of httpbin.
            ("10.0.0.2", 80, (Mode::Permissive, None, false)),
            // Only the named service port's target port is STRICT.
            ("10.0.0.3", 80, by(Mode::Strict, "ported", true)),
            ("10.0.0.3", 9000, (Mode::Permissive, None, false)),
        ],
    );
}

#[test]
fn legacy_target_of_an_unknown_service_applies_to_nothing() {
    let yaml = "apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: ghost, namespace: foo}
spec:
  targets: [{name: ghost}]
  peers: [{mtls: {}}]
";
    let e = engine(yaml, inventory());
    assert_eq!(mode_of(&e, "10.0.0.1", 80), (Mode::Permissive, None, false));
    let messages: Vec<_> = e.warnings().iter().map(|w| w.message.as_str()).collect();
    assert!(
        messages.contains(
            &"targets service foo/ghost, which is not in the inventory; it applies to no workload"
        ),
        "{messages:#?}"
    );
}
