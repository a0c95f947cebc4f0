//! Loading: what each kind becomes, what is warned about, and the exact error text
//! `interceptor policy check` prints.

use super::*;

fn warnings_of(yaml: &str) -> Vec<String> {
    load(yaml)
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// Asserts that every needle is part of some warning.
#[track_caller]
fn assert_warned(warnings: &[String], needles: &[&str]) {
    for needle in needles {
        assert!(
            warnings.iter().any(|w| w.contains(needle)),
            "{needle} not in {warnings:#?}"
        );
    }
}

#[test]
fn peer_authentication_v1_and_v1beta1() {
    let set = load(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  selector:
    matchLabels: {app: httpbin}
  mtls: {mode: PERMISSIVE}
  portLevelMtls:
    8080: {mode: DISABLE}
    \"9090\": {}
",
    );
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    let [ns, sel] = &set.peer_authentications[..] else {
        panic!("{set:#?}")
    };
    assert_eq!(ns.target, PeerTarget::Namespace);
    assert_eq!(ns.mode, Mode::Strict);
    assert_eq!(ns.resource.to_string(), "PeerAuthentication foo/default");
    assert_eq!(ns.resource.location.document, 1);
    assert_eq!(sel.resource.location.document, 2);
    assert_eq!(
        sel.target,
        PeerTarget::Selector([("app".to_owned(), "httpbin".to_owned())].into())
    );
    assert_eq!(
        sel.port_modes,
        [
            (PortRef::Number(8080), Mode::Disable),
            (PortRef::Number(9090), Mode::Unset)
        ]
    );
}

#[test]
fn port_level_mtls_without_selector_is_dropped_with_a_warning() {
    let yaml = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec:
  selector: {matchLabels: {}}
  mtls: {mode: STRICT}
  portLevelMtls: {80: {mode: DISABLE}}
";
    let set = load(yaml);
    assert!(set.peer_authentications[0].port_modes.is_empty());
    assert_eq!(
        set.warnings[0].to_string(),
        "test.yaml: document 1: spec.portLevelMtls: ignored: Istio honours port-level mTLS \
         only in a policy with a selector"
    );
}

#[test]
fn empty_spec_and_missing_namespace() {
    let set = load(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
",
    );
    let pa = &set.peer_authentications[0];
    assert_eq!(
        (pa.mode, pa.resource.namespace.as_str()),
        (Mode::Unset, "default")
    );
    assert_eq!(
        set.warnings[0].to_string(),
        "test.yaml: document 1: metadata.namespace: missing; assuming `default` as kubectl \
         does without -n"
    );
}

#[test]
fn legacy_policies_translate_with_a_deprecation_warning() {
    let set = load(
        "apiVersion: authentication.istio.io/v1alpha1
kind: MeshPolicy
metadata: {name: default}
spec:
  peers:
  - mtls: {}
---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: default, namespace: foo}
spec:
  peers:
  - mtls:
      mode: PERMISSIVE
---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: httpbin, namespace: bar}
spec:
  targets:
  - name: httpbin
    ports: [{number: 8000}, {name: grpc}]
  peers:
  - mtls:
---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: httpbin, namespace: full}
spec:
  targets:
  - name: httpbin
",
    );
    let modes: Vec<_> = set
        .peer_authentications
        .iter()
        .map(|pa| (pa.resource.kind, pa.mode))
        .collect();
    assert_eq!(
        modes,
        [
            (Kind::MeshPolicy, Mode::Strict),
            (Kind::Policy, Mode::Permissive),
            (Kind::Policy, Mode::Strict),
            (Kind::Policy, Mode::Disable),
        ]
    );
    assert_eq!(set.peer_authentications[0].target, PeerTarget::Mesh);
    assert_eq!(
        set.peer_authentications[0].resource.to_string(),
        "MeshPolicy default"
    );
    assert_eq!(set.peer_authentications[1].target, PeerTarget::Namespace);
    assert_eq!(
        set.peer_authentications[2].target,
        PeerTarget::Services(vec![ServiceTarget {
            name: "httpbin".to_owned(),
            labels: Labels::new(),
            ports: vec![PortRef::Number(8000), PortRef::Name("grpc".to_owned())],
        }])
    );
    let deprecations = set
        .warnings
        .iter()
        .filter(|w| w.field == "apiVersion" && w.message.contains("deprecated"))
        .count();
    assert_eq!(deprecations, 4);
    assert!(
        set.warnings[0]
            .message
            .contains("translated to a mesh-wide PeerAuthentication with mode STRICT")
    );
}

#[test]
fn legacy_jwt_fields_are_reported() {
    let warnings = warnings_of(
        "apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: default, namespace: foo}
spec:
  peers:
  - jwt: {issuer: x}
  origins:
  - jwt: {issuer: y}
  principalBinding: USE_ORIGIN
",
    );
    assert_warned(
        &warnings,
        &[
            "spec.peers[0].jwt: JWT peer authentication is L7",
            "spec.origins: origin (JWT) authentication is L7",
            "spec.principalBinding: origin (JWT)",
            "with mode DISABLE",
        ],
    );
}

#[test]
fn destination_rule_versions_and_tls() {
    let set = load(
        "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: db-mtls, namespace: mtls-test}
spec:
  host: mongo.mongo.svc.cluster.local
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: /pem/client.pem
      privateKey: /pem/client.key
      caCertificates: /pem/ca.pem
      sni: mongo
      subjectAltNames: [mongo]
    portLevelSettings:
    - port: {number: 8080}
      tls: {mode: DISABLE}
    - port: {number: 9090}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: default, namespace: istio-system}
spec:
  host: \"*.local\"
  exportTo: [\".\", other]
  trafficPolicy:
    tls: {}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
",
    );
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    let [db, wildcard, short] = &set.destination_rules[..] else {
        panic!("{set:#?}")
    };
    let tls = db.tls.as_ref().expect("tls");
    assert_eq!(tls.mode, TlsMode::Mutual);
    assert_eq!(tls.client_certificate.as_deref(), Some("/pem/client.pem"));
    assert_eq!(tls.sni.as_deref(), Some("mongo"));
    assert_eq!(tls.subject_alt_names, ["mongo"]);
    assert_eq!(db.port_level.len(), 2);
    assert_eq!(
        db.port_level[0].1.as_ref().map(|t| t.mode),
        Some(TlsMode::Disable)
    );
    assert_eq!(db.port_level[1], (9090, None));
    // `tls: {}` is DISABLE, the protobuf default.
    assert_eq!(
        wildcard.tls.as_ref().map(|t| t.mode),
        Some(TlsMode::Disable)
    );
    assert_eq!(
        wildcard.export_to,
        ExportTo::Namespaces(vec!["istio-system".to_owned(), "other".to_owned()])
    );
    assert_eq!(short.tls, None);
    assert_eq!(
        HostPattern::resolve(&short.host, "default", "cluster.local"),
        HostPattern::Exact("reviews.default.svc.cluster.local".to_owned())
    );
}

#[test]
fn destination_rule_unsupported_fields_warn() {
    let warnings = warnings_of(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: ns}
spec:
  host: httpbin.full
  exportTo: ['*']
  workloadSelector: {matchLabels: {app: sleep}}
  subsets:
  - name: v1
    labels: {version: v1}
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 1}}
    tls:
      mode: SIMPLE
      credentialName: secret
      caCrl: /crl.pem
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: s, namespace: ns}
spec:
  host: x.ns.svc.cluster.local
  trafficPolicy:
    tls:
      mode: MUTUAL
      credentialName: db-credentials
",
    );
    assert_warned(
        &warnings,
        &[
            "document 1: spec.host: `httpbin.full` is taken as a fully qualified name",
            "write `httpbin.full.svc.cluster.local`",
            "document 1: spec.subsets: ignored",
            "document 1: spec.trafficPolicy.loadBalancer: ignored",
            "document 1: spec.trafficPolicy.connectionPool: ignored",
            "document 1: spec.trafficPolicy.tls.credentialName: ignored",
            "document 1: spec.trafficPolicy.tls.caCrl: ignored",
            "document 2: spec.trafficPolicy.tls.credentialName: the agent does not read \
             Kubernetes secrets: connections using this rule are refused",
        ],
    );
}

#[test]
fn authorization_policy_is_projected_to_l4() {
    let set = load(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-get, namespace: mtls-test}
spec:
  action: DENY
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/full/sa/sleep]
    to:
    - operation:
        methods: [GET]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: mtls-test}
spec:
  rules:
  - from:
    - source:
        namespaces: [\"full\"]
        notIpBlocks: [10.0.0.0/8]
    to:
    - operation: {ports: [\"80\"], notPorts: [\"81\"]}
    when:
    - key: destination.port
      values: [\"80\"]
      notValues: [\"82\"]
  - to:
    - operation: {paths: [/admin]}
",
    );
    let [deny, allow] = &set.authorization_policies[..] else {
        panic!("{set:#?}")
    };
    assert_eq!(deny.action, Action::Deny);
    let rule = &deny.rules[0];
    assert!(rule.needs_l7);
    // The operation had only L7 fields: its L4 projection matches every operation.
    assert_eq!(rule.to, [Vec::<Constraint>::new()]);
    assert_eq!(
        rule.from,
        [vec![Constraint::Principal {
            values: vec![StrMatch::Exact("cluster.local/ns/full/sa/sleep".into())],
            negated: false
        }]]
    );
    assert_eq!(allow.action, Action::Allow);
    assert!(!allow.rules[0].needs_l7);
    assert_eq!(allow.rules[0].from[0].len(), 2);
    assert_eq!(
        allow.rules[0].to[0],
        [
            Constraint::DestinationPort {
                ports: vec![80],
                negated: false
            },
            Constraint::DestinationPort {
                ports: vec![81],
                negated: true
            },
        ]
    );
    assert_eq!(allow.rules[0].when.len(), 2);
    assert!(allow.rules[1].needs_l7);
    let warnings: Vec<_> = set.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "test.yaml: document 1: spec.rules[0]: uses L7 fields an L4 agent cannot see \
             (methods): this rule is enforced on its L4 parts alone, so it refuses every \
             connection they match",
            "test.yaml: document 2: spec.rules[1]: uses L7 fields an L4 agent cannot see \
             (paths): this ALLOW rule never matches (fail safe)",
        ]
    );
}

#[test]
fn authorization_policy_unsupported_actions_and_fields() {
    let warnings = warnings_of(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: ns}
spec:
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: ns}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules:
  - from:
    - source:
        remoteIpBlocks: [1.2.3.4]
        requestPrincipals: ['*']
    when:
    - key: request.headers[x-user]
      values: [admin]
    - key: remote.ip
      values: [1.2.3.4]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: ns}
spec:
  targetRefs:
  - {kind: Service, group: '', name: httpbin}
  rules:
  - from:
    - source:
        principals: [spiffe://cluster.local/ns/a/sa/b]
",
    );
    assert_warned(
        &warnings,
        &[
            "document 1: spec.action: AUDIT is not supported",
            "document 2: spec.action: CUSTOM (external authorization) is not supported: its \
             rules are enforced as DENY",
            "document 2: spec.rules[0].from[0].source.remoteIpBlocks: evaluated against the \
             connection's source address",
            "document 2: spec.rules[0].when[1].key: evaluated against",
            "document 2: spec.rules[0]: uses L7 fields an L4 agent cannot see \
             (requestPrincipals, when request.headers[x-user])",
            "document 3: spec.targetRefs: ignored",
            "document 3: spec.rules[0].from[0].source.principals: Istio principals omit the \
             spiffe:// scheme",
        ],
    );
}

#[test]
fn unknown_kinds_are_ignored_with_a_warning() {
    let set = load(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: ns}
spec: {hosts: [a]}
---
apiVersion: kyverno.io/v1
kind: Policy
metadata: {name: p, namespace: ns}
spec: {rules: []}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
data: {a: b}
---
",
    );
    assert!(set.peer_authentications.is_empty());
    let warnings: Vec<_> = set.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "test.yaml: document 1: kind: VirtualService (networking.istio.io) is not a \
             security policy the agent enforces; ignored",
            "test.yaml: document 2: kind: unknown kind Policy (kyverno.io); ignored",
            "test.yaml: document 3: kind: unknown kind ConfigMap (core); ignored",
        ]
    );
}

#[test]
fn check_files_returns_warnings_or_every_error() {
    let good = (
        "a.yaml".to_owned(),
        "apiVersion: v1\nkind: Secret\n".to_owned(),
    );
    let warnings = check_files(std::slice::from_ref(&good)).expect("valid");
    assert_eq!(warnings.len(), 1);
    let bad = |name: &str| {
        (
            name.to_owned(),
            "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: x, namespace: y}
spec: {mtls: {mode: strict}}
"
            .to_owned(),
        )
    };
    let err = check_files(&[bad("b.yaml"), good, bad("c.yaml")]).expect_err("invalid");
    assert_eq!(err.errors().len(), 2);
    assert_eq!(err.errors()[0].location.file.as_ref(), "b.yaml");
    assert_eq!(err.errors()[1].location.file.as_ref(), "c.yaml");
    assert_eq!(err.errors()[1].field, "spec.mtls.mode");
    assert_eq!(err.errors()[1].position, Some((4, 21)));
}

// === error messages, as `interceptor policy check` prints them ===

#[test]
fn error_wrong_enum_value_names_file_document_and_field() {
    let err = load_error(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: foo}
spec:
  mtls:
    mode: STRICTT
",
    );
    assert_eq!(
        err,
        "test.yaml: document 2: spec.mtls.mode: unknown variant `STRICTT`, expected one of \
         `STRICT`, `PERMISSIVE`, `DISABLE`, `UNSET` (line 12, column 11)"
    );
}

#[test]
fn error_unknown_field() {
    let err = load_error(
        "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: r, namespace: ns}
spec:
  host: a
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
      clientCert: /a.pem
",
    );
    assert_eq!(
        err,
        "test.yaml: document 1: spec.trafficPolicy.tls: unknown field `clientCert`, expected \
         one of `mode`, `clientCertificate`, `privateKey`, `caCertificates`, \
         `credentialName`, `subjectAltNames`, `sni`, `insecureSkipVerify`, `caCrl` \
         (line 9, column 7)"
    );
}

#[test]
fn error_bad_indentation() {
    let err = load_error(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: foo}
spec:
  mtls:
    mode: STRICT
   selector: {}
",
    );
    assert_eq!(
        err,
        "test.yaml: document 1: did not find expected key at line 7 column 4, while parsing \
         a block mapping at line 5 column 3 (line 7, column 4)"
    );
}

#[test]
fn error_wrong_type() {
    let err = load_error(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from:
      source:
        principals: [a]
",
    );
    assert_eq!(
        err,
        "test.yaml: document 1: spec.rules[0].from: invalid type: map, expected a sequence \
         (line 7, column 7)"
    );
}

#[test]
fn error_bad_port_key() {
    let err = load_error(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: p, namespace: ns}
spec:
  selector: {matchLabels: {app: a}}
  portLevelMtls:
    70000: {mode: STRICT}
",
    );
    assert_eq!(
        err,
        "test.yaml: document 1: spec.portLevelMtls: invalid value: integer `70000`, expected \
         a port number (1-65535) (line 7, column 5)"
    );
}

#[test]
fn error_semantic_checks_name_the_field() {
    let err = load_error(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: ns}
spec:
  rules:
  - from:
    - source:
        ipBlocks: [10.0.0.0/8, 10.0.0.0/40]
    - source: {}
    to:
    - operation: {ports: [http]}
    when:
    - key: source.namespaces
      values: [a]
    - key: source.principal
      values: ['a*b']
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: ns}
spec:
  host: a.b.svc.cluster.local
  trafficPolicy:
    tls: {mode: MUTUAL, caCertificates: /ca.pem}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {namespace: ns}
spec:
  host: 'a*'
---
apiVersion: security.istio.io/v2
kind: PeerAuthentication
metadata: {name: p, namespace: ns}
---
kind: PeerAuthentication
metadata: {name: p, namespace: ns}
",
    );
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "test.yaml: document 1: spec.rules[0].from[0].source.ipBlocks[1]: `10.0.0.0/40` \
             is not an IP address or CIDR block such as 10.0.0.0/16",
            "test.yaml: document 1: spec.rules[0].from[1].source: must not be empty",
            "test.yaml: document 1: spec.rules[0].to[0].operation.ports[0]: `http` is not a \
             port number (1-65535)",
            "test.yaml: document 1: spec.rules[0].when[0].key: unknown attribute \
             `source.namespaces`",
            "test.yaml: document 1: spec.rules[0].when[1].values[0]: `a*b` has a `*` in the \
             middle or more than one; Istio allows one leading or trailing `*`",
            "test.yaml: document 2: spec.trafficPolicy.tls: MUTUAL requires \
             clientCertificate and privateKey",
            "test.yaml: document 3: metadata.name: missing; every resource needs a name",
            "test.yaml: document 4: apiVersion: `security.istio.io/v2` does not serve \
             PeerAuthentication; use security.istio.io/v1 or security.istio.io/v1beta1",
            "test.yaml: document 5: apiVersion: missing or not a string; every document \
             needs apiVersion and kind",
        ]
    );
}

#[test]
fn error_istio_mutual_with_files() {
    let err = load_error(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: ns}
spec:
  host: a
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: ISTIO_MUTUAL, caCertificates: /ca.pem}
    - tls: {mode: DISABLE}
",
    );
    assert_eq!(
        err,
        "test.yaml: document 1: spec.trafficPolicy.portLevelSettings[0].tls: ISTIO_MUTUAL \
         uses the mesh identity: remove clientCertificate, privateKey, caCertificates and \
         credentialName\n\
         test.yaml: document 1: spec.trafficPolicy.portLevelSettings[1].port: missing; \
         port-level settings need a port number"
    );
}

#[test]
fn error_syntax_skips_the_rest_of_the_file_only() {
    let files = [
        ("a.yaml".to_owned(), "a: [\n---\nb: c\n".to_owned()),
        (
            "b.yaml".to_owned(),
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x}\n\
             spec: {mtls: 3}\n"
                .to_owned(),
        ),
    ];
    let err = load_documents(&files).expect_err("invalid");
    assert_eq!(err.errors().len(), 2, "{err}");
    assert_eq!(err.errors()[0].location.file.as_ref(), "a.yaml");
    assert_eq!(
        err.errors()[1].to_string(),
        "b.yaml: document 1: spec.mtls: invalid type: integer `3`, expected a mapping such \
         as {mode: STRICT} (line 4, column 14)"
    );
}
