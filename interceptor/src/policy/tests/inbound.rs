//! `Engine::inbound`: peer authentication modes, probe sources, trust domains and
//! AuthorizationPolicy evaluation.

use super::*;

const HTTPBIN: &str = "10.0.0.1:80";

fn inventory() -> Inventory {
    Inventory {
        workloads: vec![
            with_label(mesh("foo", "httpbin", "10.0.0.1"), "version", "v1"),
            mesh("foo", "sleep", "10.0.0.2"),
            mesh("bar", "sleep", "10.0.0.3"),
            mesh("istio-system", "gateway", "10.0.0.4"),
        ],
        services: Vec::new(),
    }
}

fn pa(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: httpbin, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  mtls: {{mode: {mode}}}
  portLevelMtls: {{8080: {{mode: PERMISSIVE}}}}
"
    )
}

fn authz(namespace: &str, action: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {action}-policy, namespace: {namespace}}}
spec:
  action: {action}
{spec}"
    )
}

fn verdict_code(e: &Engine, request: &InboundRequest<'_>) -> &'static str {
    e.inbound(request).code()
}

#[test]
fn permissive_accepts_both_transports() {
    let e = engine(&pa("PERMISSIVE"), inventory());
    let peer = id("foo", "sleep");
    let v = e.inbound(&plaintext("10.0.0.2:5000", HTTPBIN));
    assert!(v.is_allowed());
    assert_eq!(v.code(), "plaintext");
    assert_eq!(
        v.to_string(),
        "plaintext accepted under PERMISSIVE (PeerAuthentication foo/httpbin)"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:5000", HTTPBIN, &peer)),
        "mtls"
    );
}

#[test]
fn strict_refuses_plaintext_but_not_mtls() {
    let e = engine(&pa("STRICT"), inventory());
    let peer = id("foo", "sleep");
    let v = e.inbound(&plaintext("10.0.0.2:5000", HTTPBIN));
    assert!(!v.is_allowed());
    assert_eq!(v.code(), "plaintext_refused_strict");
    assert_eq!(
        v.to_string(),
        "plaintext refused: STRICT (PeerAuthentication foo/httpbin)"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:5000", HTTPBIN, &peer)),
        "mtls"
    );
    // The port-level override makes 8080 PERMISSIVE.
    assert_eq!(
        verdict_code(&e, &plaintext("10.0.0.2:5000", "10.0.0.1:8080")),
        "plaintext"
    );
}

#[test]
fn strict_lets_probe_sources_through_in_plaintext_only() {
    let settings = Settings {
        probe_sources: vec![ip("10.88.0.1")],
        ..Settings::default()
    };
    let deny_all = authz("foo", "ALLOW", "");
    let yaml = format!("{}---\n{deny_all}", pa("STRICT"));
    let e = Engine::new(load(&yaml), settings, inventory());
    assert_eq!(
        verdict_code(&e, &plaintext("10.88.0.1:40000", HTTPBIN)),
        "probe"
    );
    // Written as a v4-mapped address by a dual-stack socket: still the probe source.
    assert_eq!(
        verdict_code(&e, &plaintext("[::ffff:10.88.0.1]:40000", HTTPBIN)),
        "probe"
    );
    assert_eq!(
        verdict_code(&e, &plaintext("10.88.0.2:40000", HTTPBIN)),
        "plaintext_refused_strict"
    );
}

#[test]
fn disable_accepts_plaintext_and_refuses_mesh_mtls() {
    let e = engine(&pa("DISABLE"), inventory());
    let peer = id("foo", "sleep");
    assert_eq!(
        verdict_code(&e, &plaintext("10.0.0.2:5000", HTTPBIN)),
        "plaintext"
    );
    let v = e.inbound(&mtls("10.0.0.2:5000", HTTPBIN, &peer));
    assert_eq!(v.code(), "mtls_refused_disable");
    assert_eq!(
        v.to_string(),
        "mTLS refused: DISABLE (PeerAuthentication foo/httpbin) does not terminate mesh TLS"
    );
}

#[test]
fn foreign_trust_domains_are_refused_and_aliases_accepted() {
    let settings = Settings {
        trust_domain_aliases: vec!["old.td".parse().expect("trust domain")],
        ..Settings::default()
    };
    let allow = authz(
        "foo",
        "ALLOW",
        "  rules:
  - from:
    - source:
        principals: [old.td/ns/foo/sa/sleep, cluster.local/ns/bar/*]
",
    );
    let e = Engine::new(load(&allow), settings, inventory());
    let aliased: SpiffeId = "spiffe://old.td/ns/foo/sa/sleep".parse().expect("id");
    let foreign: SpiffeId = "spiffe://evil.td/ns/foo/sa/sleep".parse().expect("id");
    let aliased_bar: SpiffeId = "spiffe://old.td/ns/bar/sa/sleep".parse().expect("id");
    // A policy written for the alias matches the local identity and vice versa.
    let local = id("foo", "sleep");
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:1", HTTPBIN, &local)),
        "allow_rule"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:1", HTTPBIN, &aliased)),
        "allow_rule"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.3:1", HTTPBIN, &aliased_bar)),
        "allow_rule"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:1", HTTPBIN, &foreign)),
        "foreign_trust_domain"
    );
}

#[test]
fn unknown_destination_is_refused() {
    let e = engine("", inventory());
    assert_eq!(
        verdict_code(&e, &plaintext("10.0.0.2:1", "10.9.9.9:80")),
        "unknown_workload"
    );
}

#[test]
fn deny_by_principal_with_wildcards() {
    for (pattern, denied) in [
        ("cluster.local/ns/foo/sa/sleep", true),
        ("cluster.local/ns/foo/*", true),
        ("*/sa/sleep", true),
        ("*", true),
        ("cluster.local/ns/bar/*", false),
        ("*/sa/other", false),
    ] {
        let yaml = authz(
            "foo",
            "DENY",
            &format!("  rules:\n  - from:\n    - source:\n        principals: ['{pattern}']\n"),
        );
        let e = engine(&yaml, inventory());
        let peer = id("foo", "sleep");
        let v = e.inbound(&mtls("10.0.0.2:1", HTTPBIN, &peer));
        assert_eq!(!v.is_allowed(), denied, "{pattern}: {v}");
        if denied {
            assert_eq!(
                v.to_string(),
                "denied by AuthorizationPolicy foo/DENY-policy rule 0 (DENY)"
            );
        }
        // Plaintext carries no principal: even `*` does not match it.
        assert!(
            e.inbound(&plaintext("10.0.0.2:1", HTTPBIN)).is_allowed(),
            "{pattern}"
        );
    }
}

#[test]
fn not_principals_match_plaintext() {
    let yaml = authz(
        "foo",
        "DENY",
        "  rules:\n  - from:\n    - source:\n        notPrincipals: ['*']\n",
    );
    let e = engine(&yaml, inventory());
    let peer = id("foo", "sleep");
    assert_eq!(
        verdict_code(&e, &plaintext("10.0.0.2:1", HTTPBIN)),
        "deny_rule"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:1", HTTPBIN, &peer)),
        "mtls"
    );
}

#[test]
fn allow_policies_require_a_match_once_any_applies() {
    let yaml = authz(
        "foo",
        "ALLOW",
        "  selector: {matchLabels: {app: httpbin}}
  rules:
  - from:
    - source: {namespaces: [bar]}
  - to:
    - operation: {ports: ['8080']}
",
    );
    let e = engine(&yaml, inventory());
    let from_bar = id("bar", "sleep");
    let from_foo = id("foo", "sleep");
    let v = e.inbound(&mtls("10.0.0.3:1", HTTPBIN, &from_bar));
    assert_eq!(
        v.to_string(),
        "allowed by AuthorizationPolicy foo/ALLOW-policy rule 0"
    );
    let v = e.inbound(&mtls("10.0.0.2:1", HTTPBIN, &from_foo));
    assert_eq!(v.code(), "no_allow_match");
    assert_eq!(
        v.to_string(),
        "no ALLOW rule matched (1 ALLOW policies apply, first AuthorizationPolicy \
         foo/ALLOW-policy)"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:1", "10.0.0.1:8080", &from_foo)),
        "allow_rule"
    );
    // The selector does not pick sleep: no ALLOW policy applies to it.
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.3:1", "10.0.0.2:80", &from_bar)),
        "mtls"
    );
}

#[test]
fn allow_nothing_and_allow_all() {
    let nothing = engine(&authz("foo", "ALLOW", ""), inventory());
    assert_eq!(
        verdict_code(&nothing, &plaintext("10.0.0.2:1", HTTPBIN)),
        "no_allow_match"
    );
    let all = engine(&authz("foo", "ALLOW", "  rules: [{}]\n"), inventory());
    assert_eq!(
        verdict_code(&all, &plaintext("10.0.0.2:1", HTTPBIN)),
        "allow_rule"
    );
    // A DENY policy without rules denies nothing.
    let deny = engine(&authz("foo", "DENY", ""), inventory());
    assert_eq!(
        verdict_code(&deny, &plaintext("10.0.0.2:1", HTTPBIN)),
        "plaintext"
    );
}

#[test]
fn deny_wins_over_allow() {
    let yaml = format!(
        "{}---\n{}",
        authz("foo", "ALLOW", "  rules: [{}]\n"),
        authz(
            "foo",
            "DENY",
            "  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/30]\n"
        )
    );
    let e = engine(&yaml, inventory());
    assert_eq!(
        verdict_code(&e, &plaintext("10.0.0.2:1", HTTPBIN)),
        "deny_rule"
    );
    assert_eq!(
        verdict_code(&e, &plaintext("10.0.0.4:1", HTTPBIN)),
        "allow_rule"
    );
}

#[test]
fn l7_allow_rules_never_match_and_l7_deny_rules_apply_at_l4() {
    let allow = authz(
        "foo",
        "ALLOW",
        "  rules:
  - from:
    - source: {namespaces: [foo]}
    to:
    - operation: {methods: [GET]}
",
    );
    let e = engine(&allow, inventory());
    let peer = id("foo", "sleep");
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:1", HTTPBIN, &peer)),
        "no_allow_match"
    );

    let deny = authz(
        "foo",
        "DENY",
        "  rules:
  - from:
    - source: {namespaces: [foo]}
    to:
    - operation: {paths: [/admin]}
    when:
    - key: request.headers[x]
      values: [y]
",
    );
    let e = engine(&deny, inventory());
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:1", HTTPBIN, &peer)),
        "deny_rule"
    );
    let other = id("bar", "sleep");
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.3:1", HTTPBIN, &other)),
        "mtls"
    );
}

#[test]
fn custom_is_enforced_as_deny_and_audit_is_ignored() {
    let yaml = format!(
        "{}---\n{}",
        authz("foo", "AUDIT", "  rules: [{}]\n"),
        authz(
            "foo",
            "CUSTOM",
            "  provider: {name: ext}\n  rules:\n  - to:\n    - operation: {ports: ['80']}\n"
        )
    );
    let e = engine(&yaml, inventory());
    let v = e.inbound(&plaintext("10.0.0.2:1", HTTPBIN));
    assert_eq!(v.code(), "custom_rule");
    assert_eq!(
        v.to_string(),
        "denied by AuthorizationPolicy foo/CUSTOM-policy rule 0 (CUSTOM)"
    );
    assert_eq!(
        verdict_code(&e, &plaintext("10.0.0.2:1", "10.0.0.1:81")),
        "plaintext"
    );
}

#[test]
fn conditions_on_l4_attributes() {
    let yaml = authz(
        "foo",
        "ALLOW",
        "  rules:
  - when:
    - key: source.principal
      values: ['*/ns/bar/sa/sleep']
    - key: source.namespace
      notValues: [foo]
    - key: source.ip
      values: [10.0.0.0/24]
    - key: destination.port
      values: ['80']
    - key: destination.ip
      values: [10.0.0.1]
",
    );
    let e = engine(&yaml, inventory());
    let bar = id("bar", "sleep");
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.3:1", HTTPBIN, &bar)),
        "allow_rule"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.1.0.3:1", HTTPBIN, &bar)),
        "no_allow_match"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.3:1", "10.0.0.1:81", &bar)),
        "no_allow_match"
    );
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.3:1", "10.0.0.2:80", &bar)),
        "no_allow_match"
    );
}

#[test]
fn service_accounts_and_not_ip_blocks() {
    let yaml = authz(
        "foo",
        "DENY",
        "  rules:
  - from:
    - source:
        serviceAccounts: [bar/sleep]
        notIpBlocks: [10.0.0.4]
",
    );
    let e = engine(&yaml, inventory());
    let bar = id("bar", "sleep");
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.3:1", HTTPBIN, &bar)),
        "deny_rule"
    );
    assert_eq!(verdict_code(&e, &mtls("10.0.0.4:1", HTTPBIN, &bar)), "mtls");
    let foo = id("foo", "sleep");
    assert_eq!(verdict_code(&e, &mtls("10.0.0.3:1", HTTPBIN, &foo)), "mtls");
}

#[test]
fn root_namespace_policies_apply_mesh_wide_and_by_selector() {
    let yaml = format!(
        "{}---\n{}",
        authz(
            "istio-system",
            "DENY",
            "  rules:\n  - from:\n    - source: {namespaces: [bar]}\n"
        ),
        authz(
            "istio-system",
            "ALLOW",
            "  selector: {matchLabels: {version: v1}}\n  rules:\n  - from:\n    - source: \
             {namespaces: [foo]}\n"
        )
    );
    let e = engine(&yaml, inventory());
    let bar = id("bar", "sleep");
    let foo = id("foo", "sleep");
    // Mesh-wide DENY reaches foo's workloads.
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.3:1", "10.0.0.2:80", &bar)),
        "deny_rule"
    );
    // The root-namespace selector matches httpbin (version v1) in foo.
    assert_eq!(
        verdict_code(&e, &mtls("10.0.0.2:1", HTTPBIN, &foo)),
        "allow_rule"
    );
    assert_eq!(
        verdict_code(&e, &plaintext("10.0.0.2:1", HTTPBIN)),
        "no_allow_match"
    );
    // Other namespaces' policies do not apply.
    let other = engine(&authz("bar", "ALLOW", ""), inventory());
    assert_eq!(
        verdict_code(&other, &plaintext("10.0.0.2:1", HTTPBIN)),
        "plaintext"
    );
}

#[test]
fn gateway_attached_policies_do_not_apply() {
    let yaml = authz(
        "foo",
        "ALLOW",
        "  targetRefs: [{kind: Gateway, name: gw}]\n",
    );
    let e = engine(&yaml, inventory());
    assert_eq!(
        verdict_code(&e, &plaintext("10.0.0.2:1", HTTPBIN)),
        "plaintext"
    );
}
