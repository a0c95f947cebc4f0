//! Validated Istio security resources, independent of their YAML spelling.
//!
//! Every resource here has already passed the checks Istio's admission webhook would make, and
//! every field the agent cannot honour has been reported as a [`Warning`]; what remains is
//! exactly what evaluation uses. Authorization rules are already projected to L4 (see
//! [`Rule::needs_l7`]).

use std::{collections::BTreeMap, fmt, sync::Arc};

use serde::Deserialize;

use super::matcher::{IpBlock, StrMatch};

/// Kubernetes labels, as used by selectors.
pub type Labels = BTreeMap<String, String>;

/// Every resource and warning loaded from a set of files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicySet {
    /// Peer authentication in file order, including translated `v1alpha1` policies; the order
    /// stands in for Istio's "oldest wins" tie-break.
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Destination rules in file order.
    pub destination_rules: Vec<DestinationRule>,
    /// Authorization policies in file order.
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Everything loaded but not (fully) honoured, so nothing is silently dropped.
    pub warnings: Vec<Warning>,
}

/// Where a resource was read from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Location {
    /// The file name as the caller passed it.
    pub file: Arc<str>,
    /// The 1-based index of the YAML document within the file.
    pub document: usize,
}

/// The kinds of resource that can decide a connection's fate, named as in the YAML.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication,
    /// `networking.istio.io` DestinationRule.
    DestinationRule,
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `authentication.istio.io/v1alpha1` Policy, translated to peer authentication.
    Policy,
    /// `authentication.istio.io/v1alpha1` MeshPolicy, translated to mesh-wide peer
    /// authentication.
    MeshPolicy,
}

/// Names one loaded resource in logs, reasons and warnings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ResourceRef {
    /// What kind of resource it is.
    pub kind: Kind,
    /// Its namespace; empty for the cluster-scoped `MeshPolicy`.
    pub namespace: String,
    /// Its `metadata.name`.
    pub name: String,
    /// Where it was read from.
    pub location: Location,
}

/// Something loaded but not honoured as written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Warning {
    /// The document the warning is about; `None` for the inventory, which is not a file.
    pub location: Option<Location>,
    /// The field path, such as `spec.rules[0].to[0].operation.methods` or
    /// `workloads[2].serviceAccount`; empty for the whole document.
    pub field: String,
    /// What was not honoured and what the agent does instead.
    pub message: String,
}

/// A peer authentication mode (`PeerAuthentication.MutualTLS.Mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    /// Only mutual TLS is accepted.
    Strict,
    /// Mutual TLS and plaintext are both accepted.
    Permissive,
    /// Only plaintext is accepted: the agent does not terminate mesh TLS.
    Disable,
    /// Inherit from the enclosing scope.
    Unset,
}

/// PeerAuthentication (or a translated `v1alpha1` Policy/MeshPolicy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// Which resource this is.
    pub resource: ResourceRef,
    /// The workloads it applies to.
    pub target: PeerTarget,
    /// The workload-wide mode; `Unset` inherits.
    pub mode: Mode,
    /// Per-port modes, keyed by workload (container) port for selector policies and by service
    /// port reference for service targets. Empty for namespace and mesh policies: Istio only
    /// honours port-level settings with a selector.
    pub port_modes: Vec<(PortRef, Mode)>,
}

/// How a peer authentication picks its workloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerTarget {
    /// No selector: every workload in the namespace, or the whole mesh in the root namespace.
    Namespace,
    /// Mesh-wide regardless of namespace (a `MeshPolicy`, which is cluster-scoped).
    Mesh,
    /// Workloads in the namespace whose labels include these.
    Selector(Labels),
    /// `v1alpha1` `targets`: endpoints of these services in the policy's namespace.
    ///
    /// Services carry no selector in the agent's inventory, so targets are resolved through
    /// service endpoint addresses when the engine is built (see `Engine::new`).
    Services(Vec<ServiceTarget>),
}

/// A `v1alpha1` `targets` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTarget {
    /// The service name in the policy's namespace.
    pub name: String,
    /// Only endpoints whose workload also carries these labels (empty: all endpoints).
    pub labels: Labels,
    /// The service ports the policy covers; empty for all ports.
    pub ports: Vec<PortRef>,
}

/// A port as a policy names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    /// A port number: a workload port in `portLevelMtls`, a service port in `targets`.
    Number(u16),
    /// A named service port (only in `v1alpha1` targets).
    Name(String),
}

/// DestinationRule: how clients originate TLS to a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationRule {
    /// Which resource this is.
    pub resource: ResourceRef,
    /// The host as written; the engine resolves it with [`HostPattern::resolve`], because
    /// short names depend on the cluster domain setting.
    pub host: String,
    /// Which client namespaces see this rule.
    pub export_to: ExportTo,
    /// Only client workloads in the rule's namespace with these labels use the rule.
    pub workload_selector: Option<Labels>,
    /// Destination-wide TLS; `None` leaves the choice to automatic mTLS.
    pub tls: Option<ClientTls>,
    /// Per service-port settings; a matching entry replaces `tls` even when its own `tls` is
    /// `None`, because Istio's port-level settings do not inherit.
    pub port_level: Vec<(u16, Option<ClientTls>)>,
}

/// A DestinationRule `host`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// One fully qualified name such as `httpbin.full.svc.cluster.local`.
    Exact(String),
    /// `*.suffix`: any name ending in `.suffix` (stored with the leading dot).
    Wildcard(String),
    /// `*`: every host.
    Any,
}

/// DestinationRule `exportTo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExportTo {
    /// Visible to every namespace (the default, and `*`).
    All,
    /// Visible to these namespaces only (`.` is resolved to the rule's own namespace; `~`
    /// contributes nothing).
    Namespaces(Vec<String>),
}

/// `ClientTLSSettings`, reduced to what the agent can originate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    /// The origination mode.
    pub mode: TlsMode,
    /// PEM client certificate file, for `MUTUAL`.
    pub client_certificate: Option<String>,
    /// PEM private key file, for `MUTUAL`.
    pub private_key: Option<String>,
    /// PEM CA bundle to verify the server with; `None` leaves verification to the system
    /// roots, as Istio does since `VERIFY_CERTIFICATE_AT_CLIENT` became the default.
    pub ca_certificates: Option<String>,
    /// The SNI to present.
    pub sni: Option<String>,
    /// Names the server certificate must carry, if any.
    pub subject_alt_names: Vec<String>,
    /// Skip verifying the server certificate.
    pub insecure_skip_verify: bool,
    /// A Kubernetes secret holding the credentials, which the agent cannot read: a `MUTUAL`
    /// rule that relies on it refuses connections instead of sending them without a client
    /// certificate.
    pub credential_name: Option<String>,
}

/// `ClientTLSSettings.TLSmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Plaintext to the upstream.
    Disable,
    /// One-way TLS origination.
    Simple,
    /// Mutual TLS with user-provided client certificates.
    Mutual,
    /// Mesh mutual TLS with the workload's own identity.
    IstioMutual,
}

/// AuthorizationPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// Which resource this is.
    pub resource: ResourceRef,
    /// Workloads it applies to; `None` means the whole namespace (the whole mesh in the root
    /// namespace).
    pub selector: Option<Labels>,
    /// What a matching rule does.
    pub action: Action,
    /// The rules, projected to L4.
    pub rules: Vec<Rule>,
    /// The policy attaches through `targetRef(s)` to a gateway or waypoint, so it never
    /// applies to workloads here.
    pub detached: bool,
}

/// AuthorizationPolicy `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    /// Allow matching connections; once any ALLOW policy applies, others are denied.
    Allow,
    /// Deny matching connections.
    Deny,
    /// Log only in Istio; unsupported here and ignored.
    Audit,
    /// External authorization, which the agent cannot call: enforced as DENY (fail closed).
    Custom,
}

/// One AuthorizationPolicy rule: it matches when any `from`, any `to` and every `when` match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Source alternatives, each a conjunction; empty matches every source.
    pub from: Vec<Vec<Constraint>>,
    /// Operation alternatives, each a conjunction; empty matches every operation.
    pub to: Vec<Vec<Constraint>>,
    /// Conditions that must all hold.
    pub when: Vec<Constraint>,
    /// The rule had L7 fields, which were removed. An ALLOW rule with L7 fields never matches
    /// (fail safe); a DENY rule applies with its L4 parts only, so it denies more.
    pub needs_l7: bool,
}

/// One L4 test on a connection, from a `source`, `operation` or `when` field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Constraint {
    /// The peer principal matches one of the patterns (`principals`, `source.principal`).
    Principal {
        /// The patterns, trust-domain aliases not yet folded.
        values: Vec<StrMatch>,
        /// `notPrincipals`/`notValues`: matches when none does.
        negated: bool,
    },
    /// The peer namespace (from its identity) matches (`namespaces`, `source.namespace`).
    Namespace {
        /// The patterns.
        values: Vec<StrMatch>,
        /// Negated form.
        negated: bool,
    },
    /// The peer's `<namespace>/<service account>` is one of these (`serviceAccounts`).
    ServiceAccount {
        /// `(namespace, service account)` pairs.
        values: Vec<(String, String)>,
        /// Negated form.
        negated: bool,
    },
    /// The source address lies in a block (`ipBlocks`, `remoteIpBlocks`, `source.ip`,
    /// `remote.ip`: at L4 without PROXY protocol the remote address is the source address).
    SourceIp {
        /// The blocks.
        blocks: Vec<IpBlock>,
        /// Negated form.
        negated: bool,
    },
    /// The destination address lies in a block (`destination.ip`).
    DestinationIp {
        /// The blocks.
        blocks: Vec<IpBlock>,
        /// Negated form.
        negated: bool,
    },
    /// The destination (workload) port is one of these (`ports`, `destination.port`).
    DestinationPort {
        /// The ports.
        ports: Vec<u16>,
        /// Negated form.
        negated: bool,
    },
}

// === impl Kind ===

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PeerAuthentication => "PeerAuthentication",
            Self::DestinationRule => "DestinationRule",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::Policy => "Policy",
            Self::MeshPolicy => "MeshPolicy",
        })
    }
}

// === impl ResourceRef ===

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

// === impl Location ===

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)
    }
}

// === impl Warning ===

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(location) => write!(f, "{location}: ")?,
            None => f.write_str("inventory: ")?,
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

// === impl Mode ===

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Strict => "STRICT",
            Self::Permissive => "PERMISSIVE",
            Self::Disable => "DISABLE",
            Self::Unset => "UNSET",
        })
    }
}

// === impl TlsMode ===

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disable => "DISABLE",
            Self::Simple => "SIMPLE",
            Self::Mutual => "MUTUAL",
            Self::IstioMutual => "ISTIO_MUTUAL",
        })
    }
}

// === impl Action ===

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
            Self::Custom => "CUSTOM",
        })
    }
}

// === impl PortRef ===

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Name(name) => write!(f, "`{name}`"),
        }
    }
}

// === impl HostPattern ===

impl HostPattern {
    /// Resolves a DestinationRule host written in `namespace` the way Istio does: a name
    /// without dots is a short name in the rule's namespace; anything else is taken as written.
    pub fn resolve(host: &str, namespace: &str, cluster_domain: &str) -> Self {
        if host == "*" {
            Self::Any
        } else if let Some(suffix) = host.strip_prefix('*') {
            Self::Wildcard(suffix.to_ascii_lowercase())
        } else if host.contains('.') {
            Self::Exact(host.to_ascii_lowercase())
        } else {
            Self::Exact(format!("{host}.{namespace}.svc.{cluster_domain}").to_ascii_lowercase())
        }
    }

    /// How specifically this pattern matches `host`, or `None` if it does not: an exact match
    /// beats any wildcard, and a longer wildcard beats a shorter one, as in Istio's
    /// `MostSpecificHostMatch`.
    pub fn specificity(&self, host: &str) -> Option<usize> {
        match self {
            Self::Exact(h) => (h == host).then_some(usize::MAX),
            Self::Wildcard(suffix) => {
                (host.len() > suffix.len() && host.ends_with(&**suffix)).then_some(suffix.len() + 1)
            }
            Self::Any => Some(0),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(h) => f.write_str(h),
            Self::Wildcard(s) => write!(f, "*{s}"),
            Self::Any => f.write_str("*"),
        }
    }
}

// === impl ExportTo ===

impl ExportTo {
    /// Whether clients in `namespace` see the rule.
    pub fn includes(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Namespaces(list) => list.iter().any(|ns| ns == namespace),
        }
    }
}
