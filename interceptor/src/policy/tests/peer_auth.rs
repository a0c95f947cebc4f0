//! `effective_peer_auth`: precedence, inheritance, port-level modes and conflicts.

use super::*;

const MESH_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
";

fn inventory() -> Inventory {
    Inventory {
        workloads: vec![
            mesh("foo", "httpbin", "10.0.0.1"),
            mesh("foo", "sleep", "10.0.0.2"),
            mesh("bar", "httpbin", "10.0.0.3"),
        ],
        services: vec![service(
            "httpbin",
            "foo",
            Some("10.96.0.1"),
            8000,
            80,
            &["10.0.0.1"],
        )],
    }
}

fn mode_of(engine: &Engine, address: &str, port: u16) -> (Mode, Option<String>, bool) {
    let m = engine
        .effective_peer_auth(ip(address), port)
        .expect("known workload");
    (m.mode, m.policy.map(|p| p.name.clone()), m.port_level)
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
        assert_eq!(
            mode_of(&e, w, 80),
            (Mode::Strict, Some("default".into()), false)
        );
    }
}

#[test]
fn namespace_overrides_mesh_and_selector_overrides_namespace() {
    let yaml = format!(
        "{MESH_STRICT}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: ns, namespace: foo}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: httpbin, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  mtls: {{mode: DISABLE}}
"
    );
    let e = engine(&yaml, inventory());
    assert_eq!(
        mode_of(&e, "10.0.0.1", 80),
        (Mode::Disable, Some("httpbin".into()), false)
    );
    assert_eq!(
        mode_of(&e, "10.0.0.2", 80),
        (Mode::Permissive, Some("ns".into()), false)
    );
    assert_eq!(
        mode_of(&e, "10.0.0.3", 80),
        (Mode::Strict, Some("default".into()), false)
    );
}

#[test]
fn unset_inherits_from_the_parent() {
    let yaml = format!(
        "{MESH_STRICT}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: ns, namespace: foo}}
spec: {{mtls: {{mode: UNSET}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: httpbin, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
"
    );
    let e = engine(&yaml, inventory());
    assert_eq!(
        mode_of(&e, "10.0.0.1", 80),
        (Mode::Strict, Some("default".into()), false)
    );
    assert_eq!(
        mode_of(&e, "10.0.0.2", 80),
        (Mode::Strict, Some("default".into()), false)
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
    assert_eq!(
        mode_of(&e, "10.0.0.1", 80),
        (Mode::Permissive, Some("httpbin".into()), false)
    );
    assert_eq!(
        mode_of(&e, "10.0.0.1", 8080),
        (Mode::Disable, Some("httpbin".into()), true)
    );
    assert_eq!(
        mode_of(&e, "10.0.0.1", 9090),
        (Mode::Permissive, Some("httpbin".into()), false)
    );
    // Port-level settings of a selector policy do not leak to other workloads.
    assert_eq!(
        mode_of(&e, "10.0.0.2", 8080),
        (Mode::Strict, Some("default".into()), false)
    );
}

#[test]
fn port_level_mode_with_unset_workload_mode_inherits_namespace() {
    let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: foo}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
";
    let e = engine(yaml, inventory());
    assert_eq!(
        mode_of(&e, "10.0.0.1", 80),
        (Mode::Strict, Some("ns".into()), false)
    );
    assert_eq!(
        mode_of(&e, "10.0.0.1", 8080),
        (Mode::Permissive, Some("httpbin".into()), true)
    );
}

#[test]
fn first_selector_policy_in_file_order_wins_with_a_warning() {
    let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: first, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: second, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: DISABLE}
";
    let e = engine(yaml, inventory());
    assert_eq!(
        mode_of(&e, "10.0.0.1", 80),
        (Mode::Strict, Some("first".into()), false)
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
    let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a, namespace: foo}
spec: {mtls: {mode: DISABLE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b, namespace: foo}
spec: {mtls: {mode: STRICT}}
";
    let e = engine(yaml, inventory());
    assert_eq!(
        mode_of(&e, "10.0.0.2", 80),
        (Mode::Disable, Some("a".into()), false)
    );
    assert!(
        e.warnings()[0]
            .message
            .contains("PeerAuthentication foo/a is also namespace-wide")
    );
}

#[test]
fn selector_policies_in_the_root_namespace_apply_to_nothing() {
    let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: sel, namespace: istio-system}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
";
    let e = engine(yaml, inventory());
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
    let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh-root}
spec: {mtls: {mode: STRICT}}
";
    let e = Engine::new(load(yaml), settings, inventory());
    assert_eq!(
        mode_of(&e, "10.0.0.3", 80),
        (Mode::Strict, Some("default".into()), false)
    );
    let e = engine(yaml, inventory());
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
    let mut bar = service("httpbin", "bar", Some("10.96.0.3"), 8000, 80, &["10.0.0.3"]);
    bar.ports.push(ServicePort {
        name: Some("admin".to_owned()),
        port: 9000,
        target_port: None,
    });
    inv.services.push(bar);
    let e = engine(yaml, inv);
    assert_eq!(
        mode_of(&e, "10.0.0.1", 80),
        (Mode::Strict, Some("httpbin".into()), false)
    );
    // sleep in foo is not an endpoint of httpbin.
    assert_eq!(mode_of(&e, "10.0.0.2", 80), (Mode::Permissive, None, false));
    // Only the named service port's target port is STRICT.
    assert_eq!(
        mode_of(&e, "10.0.0.3", 80),
        (Mode::Strict, Some("ported".into()), true)
    );
    assert_eq!(
        mode_of(&e, "10.0.0.3", 9000),
        (Mode::Permissive, None, false)
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
