//! Istio YAML in, validated [`model`](super::model) resources out.
//!
//! Each file is read twice: once into untyped values to learn every document's `kind`, then
//! again into the typed schema of that kind. The second pass deserializes straight from the
//! text, so yaml_serde reports the field path and line of a bad value, which `policy check`
//! hands to the user. Closed Istio schemas use `deny_unknown_fields`; valid Istio fields the
//! agent cannot honour are accepted and reported as warnings.

use std::{fmt, sync::Arc};

use serde::Deserialize;
use yaml_serde::Value;

use super::{
    authz::authorization_policy,
    model::{
        AuthorizationPolicy, ClientTls, DestinationRule, ExportTo, Kind, Labels, Location, Mode,
        PeerAuthentication, PeerTarget, PolicySet, PortRef, ResourceRef, ServiceTarget, TlsMode,
        Warning,
    },
    schema::{
        ClientTlsSpec, DestinationRuleSpec, LegacyMode, LegacyPolicySpec, LegacyTargetSpec,
        Metadata, PeerAuthenticationSpec, PortNumber, PortSelectorSpec, PortTrafficPolicySpec,
        Resource, TrafficPolicySpec, WorkloadSelectorSpec,
    },
};

/// Why a set of policy files was rejected; lists every bad document, not just the first.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", join_lines(.errors))]
pub struct PolicyError {
    errors: Vec<DocumentError>,
}

/// One rejected document: the file, the document, the field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct DocumentError {
    /// The file and 1-based document index.
    pub location: Location,
    /// The field path such as `spec.mtls.mode`; empty when the document as a whole is wrong.
    pub field: String,
    /// What is wrong, and where possible what would be right.
    pub message: String,
    /// The 1-based line and column in the file, when the parser knows them.
    pub position: Option<(usize, usize)>,
}

// === kinds ===

/// The resource kinds this module understands, by API group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    PeerAuthentication,
    DestinationRule,
    AuthorizationPolicy,
    LegacyPolicy,
    LegacyMeshPolicy,
}

struct KindInfo {
    group: &'static str,
    kind: &'static str,
    versions: &'static [&'static str],
    known: Known,
}

const KINDS: &[KindInfo] = &[
    KindInfo {
        group: "security.istio.io",
        kind: "PeerAuthentication",
        versions: &["v1", "v1beta1"],
        known: Known::PeerAuthentication,
    },
    KindInfo {
        group: "security.istio.io",
        kind: "AuthorizationPolicy",
        versions: &["v1", "v1beta1"],
        known: Known::AuthorizationPolicy,
    },
    KindInfo {
        group: "networking.istio.io",
        kind: "DestinationRule",
        versions: &["v1", "v1beta1", "v1alpha3"],
        known: Known::DestinationRule,
    },
    KindInfo {
        group: "authentication.istio.io",
        kind: "Policy",
        versions: &["v1alpha1"],
        known: Known::LegacyPolicy,
    },
    KindInfo {
        group: "authentication.istio.io",
        kind: "MeshPolicy",
        versions: &["v1alpha1"],
        known: Known::LegacyMeshPolicy,
    },
];

/// What the first pass learned about one document.
enum Header {
    /// Empty document (`---` with nothing after it).
    Empty,
    /// A kind this module does not evaluate.
    Ignored,
    /// A kind to parse in the second pass.
    Parse(Known),
}

/// Collects warnings and errors for one document.
pub(super) struct Ctx<'a> {
    location: Location,
    warnings: &'a mut Vec<Warning>,
    errors: &'a mut Vec<DocumentError>,
}

// === loading ===

/// Parses every document of every file; see [`super::load_documents`].
pub(super) fn load(files: &[(String, String)]) -> Result<PolicySet, PolicyError> {
    let mut set = PolicySet::default();
    let mut errors = Vec::new();
    for (name, contents) in files {
        load_file(name, contents, &mut set, &mut errors);
    }
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(PolicyError { errors })
    }
}

/// Loads one file, reporting its warnings and errors in document order although the two
/// passes find them out of order.
fn load_file(name: &str, contents: &str, set: &mut PolicySet, errors: &mut Vec<DocumentError>) {
    let (first_warning, first_error) = (set.warnings.len(), errors.len());
    parse_file(name, contents, set, errors);
    set.warnings[first_warning..].sort_by_key(|w| w.location.as_ref().map(|l| l.document));
    errors[first_error..].sort_by_key(|e| e.location.document);
}

fn parse_file(name: &str, contents: &str, set: &mut PolicySet, errors: &mut Vec<DocumentError>) {
    let file: Arc<str> = name.into();
    let location = |index: usize| Location {
        file: Arc::clone(&file),
        document: index + 1,
    };
    let mut headers = Vec::new();
    for (index, document) in yaml_serde::Deserializer::from_str(contents).enumerate() {
        match Value::deserialize(document) {
            Ok(value) => {
                let mut ctx = Ctx {
                    location: location(index),
                    warnings: &mut set.warnings,
                    errors,
                };
                headers.push(header(&value, &mut ctx));
            }
            Err(e) => {
                // The parser cannot resynchronise after a syntax error (it would report the
                // same error for every later document), so the rest of the file is skipped.
                errors.push(DocumentError::from_yaml(location(index), &e));
                return;
            }
        }
    }
    let documents = yaml_serde::Deserializer::from_str(contents);
    for (index, (document, header)) in documents.zip(headers).enumerate() {
        let Header::Parse(known) = header else {
            continue;
        };
        let mut ctx = Ctx {
            location: location(index),
            warnings: &mut set.warnings,
            errors,
        };
        match parse_document(known, document, &mut ctx) {
            Some(Parsed::Peer(pa)) => set.peer_authentications.push(pa),
            Some(Parsed::Rule(dr)) => set.destination_rules.push(dr),
            Some(Parsed::Authz(ap)) => set.authorization_policies.push(ap),
            None => {}
        }
    }
}

/// Reads `apiVersion` and `kind` to decide how (and whether) to parse the document.
fn header(value: &Value, ctx: &mut Ctx<'_>) -> Header {
    if value.is_null() {
        return Header::Empty;
    }
    let Some(map) = value.as_mapping() else {
        ctx.error(
            "",
            "document is not a mapping with apiVersion, kind and spec",
        );
        return Header::Ignored;
    };
    let text = |key: &str| map.get(key).and_then(Value::as_str);
    let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
        let missing = if text("apiVersion").is_none() {
            "apiVersion"
        } else {
            "kind"
        };
        ctx.error(
            missing,
            "missing or not a string; every document needs apiVersion and kind",
        );
        return Header::Ignored;
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    if let Some(info) = KINDS.iter().find(|k| k.group == group && k.kind == kind) {
        if info.versions.contains(&version) {
            return Header::Parse(info.known);
        }
        ctx.error(
            "apiVersion",
            format!(
                "`{api_version}` does not serve {kind}; use {}",
                info.versions
                    .iter()
                    .map(|v| format!("{group}/{v}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        );
        return Header::Ignored;
    }
    ctx.warn("kind", ignored_kind_message(group, kind));
    Header::Ignored
}

fn ignored_kind_message(group: &str, kind: &str) -> String {
    match (group, kind) {
        ("", "List") => "a List is ignored; write its items as separate documents".to_owned(),
        ("security.istio.io", "RequestAuthentication") => {
            "RequestAuthentication (JWT) is L7 and ignored by the L4 agent".to_owned()
        }
        _ if group.ends_with("istio.io") => {
            format!("{kind} ({group}) is not a security policy the agent enforces; ignored")
        }
        _ => format!("unknown kind {kind} ({}); ignored", display_group(group)),
    }
}

fn display_group(group: &str) -> &str {
    if group.is_empty() { "core" } else { group }
}

/// One parsed resource, before it joins the set.
enum Parsed {
    Peer(PeerAuthentication),
    Rule(DestinationRule),
    Authz(AuthorizationPolicy),
}

fn parse_document(
    known: Known,
    document: yaml_serde::Deserializer<'_>,
    ctx: &mut Ctx<'_>,
) -> Option<Parsed> {
    match known {
        Known::PeerAuthentication => {
            peer_authentication(typed(document, ctx)?, ctx).map(Parsed::Peer)
        }
        Known::DestinationRule => destination_rule(typed(document, ctx)?, ctx).map(Parsed::Rule),
        Known::AuthorizationPolicy => {
            authorization_policy(typed(document, ctx)?, ctx).map(Parsed::Authz)
        }
        Known::LegacyPolicy | Known::LegacyMeshPolicy => {
            let mesh = known == Known::LegacyMeshPolicy;
            legacy_policy(typed(document, ctx)?, mesh, ctx).map(Parsed::Peer)
        }
    }
}

fn typed<'de, S: Deserialize<'de>>(
    document: yaml_serde::Deserializer<'de>,
    ctx: &mut Ctx<'_>,
) -> Option<Resource<S>> {
    Resource::deserialize(document)
        .map_err(|e| {
            ctx.errors
                .push(DocumentError::from_yaml(ctx.location.clone(), &e))
        })
        .ok()
}

// === metadata ===

/// The resource's reference; `None` (with an error) when it has no name.
pub(super) fn resource_ref(
    kind: Kind,
    metadata: Metadata,
    ctx: &mut Ctx<'_>,
) -> Option<ResourceRef> {
    let Some(name) = metadata.name.filter(|n| !n.is_empty()) else {
        ctx.error("metadata.name", "missing; every resource needs a name");
        return None;
    };
    let namespace = if kind == Kind::MeshPolicy {
        String::new()
    } else if let Some(ns) = metadata.namespace.filter(|n| !n.is_empty()) {
        ns
    } else {
        // Files carry no `kubectl -n`, so the namespace must be explicit; kubectl's default
        // is the best guess and the warning says so.
        ctx.warn(
            "metadata.namespace",
            "missing; assuming `default` as kubectl does without -n",
        );
        "default".to_owned()
    };
    Some(ResourceRef {
        kind,
        namespace,
        name,
        location: ctx.location.clone(),
    })
}

pub(super) fn selector_labels(selector: Option<WorkloadSelectorSpec>) -> Option<Labels> {
    selector
        .and_then(|s| s.match_labels)
        .filter(|labels| !labels.is_empty())
}

// === PeerAuthentication ===

fn peer_authentication(
    resource: Resource<PeerAuthenticationSpec>,
    ctx: &mut Ctx<'_>,
) -> Option<PeerAuthentication> {
    let resource_ref = resource_ref(Kind::PeerAuthentication, resource.metadata, ctx)?;
    let spec = resource.spec.unwrap_or_default();
    let target = selector_labels(spec.selector).map_or(PeerTarget::Namespace, PeerTarget::Selector);
    let mode = spec.mtls.and_then(|m| m.mode).unwrap_or(Mode::Unset);
    let mut port_modes = Vec::new();
    for (PortNumber(port), mtls) in spec.port_level_mtls.unwrap_or_default() {
        port_modes.push((PortRef::Number(port), mtls.mode.unwrap_or(Mode::Unset)));
    }
    if target == PeerTarget::Namespace && !port_modes.is_empty() {
        ctx.warn(
            "spec.portLevelMtls",
            "ignored: Istio honours port-level mTLS only in a policy with a selector",
        );
        port_modes.clear();
    }
    Some(PeerAuthentication {
        resource: resource_ref,
        target,
        mode,
        port_modes,
    })
}

/// Translates a `v1alpha1` Policy or MeshPolicy into the PeerAuthentication it meant.
fn legacy_policy(
    resource: Resource<LegacyPolicySpec>,
    mesh: bool,
    ctx: &mut Ctx<'_>,
) -> Option<PeerAuthentication> {
    let kind = if mesh { Kind::MeshPolicy } else { Kind::Policy };
    let resource_ref = resource_ref(kind, resource.metadata, ctx)?;
    let spec = resource.spec.unwrap_or_default();
    let mode = legacy_mode(&spec, ctx);
    warn_legacy_unsupported(&spec, ctx);
    let targets = spec.targets.unwrap_or_default();
    let (target, scope) = match (mesh, targets.is_empty()) {
        (true, empty) => {
            if !empty {
                ctx.warn(
                    "spec.targets",
                    "ignored: a MeshPolicy applies to the whole mesh",
                );
            }
            (PeerTarget::Mesh, "mesh-wide")
        }
        (false, true) => (PeerTarget::Namespace, "namespace-wide"),
        (false, false) => (
            PeerTarget::Services(legacy_targets(targets, ctx)),
            "service-targeted",
        ),
    };
    if !matches!(target, PeerTarget::Services(_)) && resource_ref.name != "default" {
        ctx.warn(
            "metadata.name",
            format!(
                "Istio honoured a {kind} without targets only when named `default`; \
                 translated anyway"
            ),
        );
    }
    ctx.warn(
        "apiVersion",
        format!(
            "authentication.istio.io/v1alpha1 {kind} is deprecated (removed in Istio 1.6); \
             translated to a {scope} PeerAuthentication with mode {mode}: migrate to \
             security.istio.io/v1"
        ),
    );
    Some(PeerAuthentication {
        resource: resource_ref,
        target,
        mode,
        port_modes: Vec::new(),
    })
}

/// `peers` with an `mtls` entry meant mutual TLS (STRICT unless PERMISSIVE was asked for);
/// no `mtls` peer meant no peer authentication at all, which is DISABLE.
fn legacy_mode(spec: &LegacyPolicySpec, ctx: &mut Ctx<'_>) -> Mode {
    let peers = spec.peers.as_deref().unwrap_or_default();
    let mut mode = None;
    for (i, peer) in peers.iter().enumerate() {
        if peer.jwt.is_some() {
            ctx.warn(
                format!("spec.peers[{i}].jwt"),
                "JWT peer authentication is L7 and ignored",
            );
        }
        let Some(mtls) = &peer.mtls else { continue };
        if mode.is_some() {
            ctx.warn(
                format!("spec.peers[{i}]"),
                "ignored: only the first mtls peer counts",
            );
            continue;
        }
        let settings = mtls.as_ref();
        if settings.and_then(|s| s.allow_tls).is_some() {
            ctx.warn(
                format!("spec.peers[{i}].mtls.allowTls"),
                "deprecated and ignored",
            );
        }
        mode = Some(match settings.and_then(|s| s.mode) {
            Some(LegacyMode::Permissive) => Mode::Permissive,
            Some(LegacyMode::Strict) | None => Mode::Strict,
        });
    }
    mode.unwrap_or(Mode::Disable)
}

fn warn_legacy_unsupported(spec: &LegacyPolicySpec, ctx: &mut Ctx<'_>) {
    if spec.peer_is_optional == Some(true) {
        ctx.warn(
            "spec.peerIsOptional",
            "ignored: peer authentication is never optional here",
        );
    }
    let jwt = [
        ("spec.origins", spec.origins.is_some()),
        ("spec.originIsOptional", spec.origin_is_optional.is_some()),
        ("spec.principalBinding", spec.principal_binding.is_some()),
    ];
    for (field, set) in jwt {
        if set {
            ctx.warn(field, "origin (JWT) authentication is L7 and ignored");
        }
    }
}

fn legacy_targets(targets: Vec<LegacyTargetSpec>, ctx: &mut Ctx<'_>) -> Vec<ServiceTarget> {
    let mut out = Vec::with_capacity(targets.len());
    for (i, target) in targets.into_iter().enumerate() {
        let mut ports = Vec::new();
        for (j, port) in target.ports.unwrap_or_default().into_iter().enumerate() {
            match (port.number, port.name) {
                (Some(PortNumber(n)), None) => ports.push(PortRef::Number(n)),
                (None, Some(name)) => ports.push(PortRef::Name(name)),
                _ => ctx.error(
                    format!("spec.targets[{i}].ports[{j}]"),
                    "set exactly one of number and name",
                ),
            }
        }
        out.push(ServiceTarget {
            name: target.name,
            labels: target.labels.unwrap_or_default(),
            ports,
        });
    }
    out
}

// === DestinationRule ===

fn destination_rule(
    resource: Resource<DestinationRuleSpec>,
    ctx: &mut Ctx<'_>,
) -> Option<DestinationRule> {
    let resource_ref = resource_ref(Kind::DestinationRule, resource.metadata, ctx)?;
    let Some(spec) = resource.spec else {
        ctx.error("spec", "missing; a DestinationRule needs spec.host");
        return None;
    };
    check_host(&spec.host, ctx)?;
    if spec.subsets.as_ref().is_some_and(|s| !s.is_empty()) {
        ctx.warn(
            "spec.subsets",
            "ignored: subsets are chosen by VirtualService routing, which an L4 agent does not do",
        );
    }
    let export_to = export_to(spec.export_to, &resource_ref.namespace);
    let workload_selector = selector_labels(spec.workload_selector);
    let (tls, port_level) = match spec.traffic_policy {
        Some(policy) => traffic_policy(policy, ctx),
        None => (None, Vec::new()),
    };
    Some(DestinationRule {
        resource: resource_ref,
        host: spec.host,
        export_to,
        workload_selector,
        tls,
        port_level,
    })
}

fn check_host(host: &str, ctx: &mut Ctx<'_>) -> Option<()> {
    let wildcard_ok = host == "*" || !host.contains('*') || {
        host.starts_with("*.") && !host[1..].contains('*')
    };
    if host.is_empty() || !wildcard_ok {
        ctx.error(
            "spec.host",
            format!("`{host}` is not a host; use a name, `*.suffix` or `*`"),
        );
        return None;
    }
    if !host.contains('*') && host.matches('.').count() == 1 {
        let (name, ns) = host.split_once('.').unwrap_or((host, ""));
        ctx.warn(
            "spec.host",
            format!(
                "`{host}` is taken as a fully qualified name, as Istio does; for service \
                 {name} in namespace {ns} write `{name}.{ns}.svc.cluster.local`"
            ),
        );
    }
    Some(())
}

fn export_to(list: Option<Vec<String>>, own_namespace: &str) -> ExportTo {
    let list = list.unwrap_or_default();
    if list.is_empty() || list.iter().any(|ns| ns == "*") {
        return ExportTo::All;
    }
    let namespaces = list
        .into_iter()
        .filter(|ns| ns != "~")
        .map(|ns| {
            if ns == "." {
                own_namespace.to_owned()
            } else {
                ns
            }
        })
        .collect();
    ExportTo::Namespaces(namespaces)
}

type PortTls = Vec<(u16, Option<ClientTls>)>;

fn traffic_policy(policy: TrafficPolicySpec, ctx: &mut Ctx<'_>) -> (Option<ClientTls>, PortTls) {
    let field = "spec.trafficPolicy";
    warn_unsupported(
        field,
        &[
            ("loadBalancer", policy.load_balancer.is_some()),
            ("connectionPool", policy.connection_pool.is_some()),
            ("outlierDetection", policy.outlier_detection.is_some()),
            ("tunnel", policy.tunnel.is_some()),
            ("proxyProtocol", policy.proxy_protocol.is_some()),
            ("retryBudget", policy.retry_budget.is_some()),
        ],
        ctx,
    );
    let tls = policy
        .tls
        .and_then(|tls| client_tls(tls, &format!("{field}.tls"), ctx));
    let mut port_level: PortTls = Vec::new();
    let settings = policy.port_level_settings.unwrap_or_default();
    for (i, setting) in settings.into_iter().enumerate() {
        let field = format!("{field}.portLevelSettings[{i}]");
        if let Some(entry) = port_traffic_policy(setting, &field, &port_level, ctx) {
            port_level.push(entry);
        }
    }
    (tls, port_level)
}

/// One `portLevelSettings` entry, unless it lacks a port or repeats one in `seen`.
fn port_traffic_policy(
    setting: PortTrafficPolicySpec,
    field: &str,
    seen: &PortTls,
    ctx: &mut Ctx<'_>,
) -> Option<(u16, Option<ClientTls>)> {
    warn_unsupported(
        field,
        &[
            ("loadBalancer", setting.load_balancer.is_some()),
            ("connectionPool", setting.connection_pool.is_some()),
            ("outlierDetection", setting.outlier_detection.is_some()),
        ],
        ctx,
    );
    let Some(PortSelectorSpec {
        number: PortNumber(port),
    }) = setting.port
    else {
        ctx.error(
            format!("{field}.port"),
            "missing; port-level settings need a port number",
        );
        return None;
    };
    if seen.iter().any(|(p, _)| *p == port) {
        ctx.warn(
            format!("{field}.port"),
            format!("duplicate port {port}; the first entry wins"),
        );
        return None;
    }
    let tls = setting
        .tls
        .and_then(|tls| client_tls(tls, &format!("{field}.tls"), ctx));
    Some((port, tls))
}

fn warn_unsupported(parent: &str, fields: &[(&str, bool)], ctx: &mut Ctx<'_>) {
    for (name, set) in fields {
        if *set {
            ctx.warn(
                format!("{parent}.{name}"),
                "ignored: the L4 agent only honours `tls`",
            );
        }
    }
}

fn client_tls(spec: ClientTlsSpec, field: &str, ctx: &mut Ctx<'_>) -> Option<ClientTls> {
    // The protobuf default of TLSmode is DISABLE, so `tls: {}` means plaintext.
    let mode = spec.mode.unwrap_or(TlsMode::Disable);
    if spec.ca_crl.is_some() {
        ctx.warn(
            format!("{field}.caCrl"),
            "ignored: revocation lists are not checked",
        );
    }
    check_tls_fields(&spec, mode, field, ctx)?;
    Some(ClientTls {
        mode,
        client_certificate: spec.client_certificate,
        private_key: spec.private_key,
        ca_certificates: spec.ca_certificates,
        sni: spec.sni,
        subject_alt_names: spec.subject_alt_names.unwrap_or_default(),
        insecure_skip_verify: spec.insecure_skip_verify.unwrap_or(false),
        credential_name: spec.credential_name,
    })
}

/// Istio's validation of which fields go with which mode, plus warnings for fields the
/// agent cannot use (it reads files, never Kubernetes secrets).
fn check_tls_fields(
    spec: &ClientTlsSpec,
    mode: TlsMode,
    field: &str,
    ctx: &mut Ctx<'_>,
) -> Option<()> {
    let has_key_pair = spec.client_certificate.is_some() && spec.private_key.is_some();
    let has_any_file = spec.client_certificate.is_some()
        || spec.private_key.is_some()
        || spec.ca_certificates.is_some();
    let credential = format!("{field}.credentialName");
    match mode {
        TlsMode::IstioMutual if has_any_file || spec.credential_name.is_some() => {
            ctx.error(
                field,
                "ISTIO_MUTUAL uses the mesh identity: remove clientCertificate, privateKey, \
                 caCertificates and credentialName",
            );
            return None;
        }
        TlsMode::IstioMutual if spec.sni.is_some() || spec.subject_alt_names.is_some() => {
            ctx.warn(
                field,
                "sni and subjectAltNames are ignored for ISTIO_MUTUAL: the server must \
                 present the identity of the endpoint the agent picked",
            );
        }
        TlsMode::Mutual if spec.credential_name.is_some() && !has_key_pair => ctx.warn(
            credential,
            "the agent does not read Kubernetes secrets: connections using this rule are \
             refused",
        ),
        TlsMode::Mutual if !has_key_pair => {
            ctx.error(field, "MUTUAL requires clientCertificate and privateKey");
            return None;
        }
        TlsMode::Mutual | TlsMode::Simple if spec.credential_name.is_some() => ctx.warn(
            credential,
            "ignored: the agent does not read Kubernetes secrets",
        ),
        _ => {}
    }
    if mode == TlsMode::Simple && (spec.client_certificate.is_some() || spec.private_key.is_some())
    {
        ctx.warn(
            field,
            "clientCertificate and privateKey are ignored for SIMPLE",
        );
    }
    Some(())
}

// === impl Ctx ===

impl Ctx<'_> {
    pub(super) fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning {
            location: Some(self.location.clone()),
            field: field.into(),
            message: message.into(),
        });
    }

    pub(super) fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(DocumentError {
            location: self.location.clone(),
            field: field.into(),
            message: message.into(),
            position: None,
        });
    }
}

// === impl PolicyError ===

impl PolicyError {
    /// Every rejected document, in file and document order.
    pub fn errors(&self) -> &[DocumentError] {
        &self.errors
    }
}

// === impl DocumentError ===

impl DocumentError {
    /// Splits yaml_serde's `path: message at line L column C` into its parts.
    fn from_yaml(location: Location, error: &yaml_serde::Error) -> Self {
        let position = error.location().map(|l| (l.line(), l.column()));
        let mut text = error.to_string();
        if let Some((line, column)) = position {
            let suffix = format!(" at line {line} column {column}");
            if let Some(stripped) = text.strip_suffix(&suffix) {
                text = stripped.to_owned();
            }
        }
        // yaml_serde prefixes the path only below the root; a path contains no spaces, a
        // message always does.
        let (field, message) = match text.split_once(": ") {
            Some((path, rest)) if !path.is_empty() && !path.contains(' ') => {
                (path.to_owned(), rest.to_owned())
            }
            _ => (String::new(), text),
        };
        Self {
            location,
            field,
            message,
            position,
        }
    }
}

impl fmt::Display for DocumentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.location)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if let Some((line, column)) = self.position {
            write!(f, " (line {line}, column {column})")?;
        }
        Ok(())
    }
}

// === helpers ===

fn join_lines(errors: &[DocumentError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
