//! Per-connection decisions: which peer authentication mode applies, whether an inbound
//! connection is accepted, and how an outbound connection is originated.
//!
//! Decisions borrow from the [`Engine`] and never allocate, so they can run on every
//! connection; each carries the reason (mode or rule) for the one-line log and a stable
//! [`code`](Verdict::code) for per-reason counters.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use super::{
    compile::{CompiledRule, Decided, Engine, ServiceEntry, WorkloadEntry, canonical, selects},
    inventory::ServicePort,
    matcher::Principal,
    model::{Action, AuthorizationPolicy, ClientTls, Constraint, Mode, ResourceRef, Rule, TlsMode},
};
use crate::{
    identity::{SpiffeId, TrustDomain},
    refusal::RefusalCode,
};

/// The peer authentication mode in force for one workload port, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EffectiveMode<'e> {
    /// STRICT, PERMISSIVE or DISABLE; never UNSET.
    pub mode: Mode,
    /// The policy that set it; `None` for the built-in PERMISSIVE default.
    pub policy: Option<&'e ResourceRef>,
    /// Whether a port-level setting decided it.
    pub port_level: bool,
}

/// One accepted inbound connection, as the agent sees it after peeking (and, for mesh
/// clients, after the handshake).
#[derive(Clone, Copy, Debug)]
pub struct InboundRequest<'a> {
    /// The client address.
    pub source: SocketAddr,
    /// The original destination: a local workload address and port.
    pub destination: SocketAddr,
    /// The verified client identity for mesh mTLS; `None` for plaintext.
    pub peer: Option<&'a SpiffeId>,
}

/// Whether to accept an inbound connection, and why.
///
/// Where Envoy would answer 403 or 503, the agent resets the connection (see the module
/// documentation of [`policy`](super)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict<'e> {
    /// Peer authentication accepts the transport and no AuthorizationPolicy applies.
    Accepted {
        /// The mode that accepted it.
        mode: EffectiveMode<'e>,
        /// Whether the connection is mesh mTLS.
        mtls: bool,
    },
    /// Plaintext from a configured probe source: exempt from STRICT and authorization.
    Probe,
    /// An ALLOW rule matched.
    AllowedBy {
        /// The policy.
        policy: &'e ResourceRef,
        /// The 0-based index of the rule in `spec.rules`.
        rule: usize,
    },
    /// Plaintext to a STRICT port.
    PlaintextRefused {
        /// The STRICT mode and where it came from.
        mode: EffectiveMode<'e>,
    },
    /// Mesh mTLS to a DISABLE port: the agent does not terminate mesh TLS there, as an Istio
    /// sidecar would not (seed 004's last phase).
    MtlsRefused {
        /// The DISABLE mode and where it came from.
        mode: EffectiveMode<'e>,
    },
    /// The peer's trust domain is neither the local one nor an alias.
    ForeignTrustDomain,
    /// A DENY rule, or a CUSTOM rule enforced as DENY, matched.
    DeniedBy {
        /// The policy.
        policy: &'e ResourceRef,
        /// The 0-based index of the rule in `spec.rules`.
        rule: usize,
        /// DENY or CUSTOM.
        action: Action,
    },
    /// ALLOW policies apply to the workload and none matched.
    NotAllowed {
        /// The first ALLOW policy that applies, for the log.
        policy: &'e ResourceRef,
        /// How many ALLOW policies apply.
        policies: usize,
    },
    /// The destination address is not a workload in the inventory, so no policy can be
    /// evaluated: refused (fail closed).
    UnknownWorkload,
}

/// One outbound connection from an enrolled workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboundRequest {
    /// The client workload's address.
    pub source: IpAddr,
    /// The address the application connected to: a service VIP, an endpoint or anything else.
    pub destination: SocketAddr,
    /// Which endpoint a service VIP goes to.
    pub pick: Pick,
}

/// How an outbound decision chooses the endpoint of a service VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// The caller's round-robin counter for this connection (for example a per-service
    /// counter, see [`Engine::service_at`]): endpoint `n % endpoints`.
    Next(u64),
    /// The endpoint an open flow already connected to. Deciding an open flow again under a new
    /// policy must judge the connection that exists, not whichever endpoint the round robin
    /// would hand out next. The endpoint is kept even if the service no longer lists it: as
    /// with kube-proxy and Envoy, endpoint changes do not cut open connections; policy does.
    Endpoint(SocketAddr),
}

/// The transport an open outbound flow runs, owned so a later generation can judge it after
/// the [`Engine`] that chose it is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowTls {
    /// Plaintext.
    Plaintext,
    /// Mesh mTLS that verified this server identity.
    Mesh(SpiffeId),
    /// TLS originated with these DestinationRule settings.
    Originate(ClientTls),
}

/// How to originate an outbound connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outbound<'e> {
    /// Where to connect: the chosen endpoint (pod address and target port) for a service VIP,
    /// otherwise the original destination.
    pub endpoint: SocketAddr,
    /// The service host (`name.namespace.svc.<domain>`) the destination belongs to, if any;
    /// a fallback SNI or verification name for TLS origination.
    pub service: Option<&'e str>,
    /// The transport.
    pub tls: OutboundTls<'e>,
    /// Why this transport.
    pub reason: TlsReason<'e>,
}

/// The transport of an outbound connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundTls<'e> {
    /// Plaintext.
    Plaintext,
    /// Mesh mTLS with the client workload's identity.
    Mesh {
        /// The identity the server must present; `None` when the endpoint is not in the
        /// inventory, and any identity of the local trust domain will do.
        server: Option<&'e SpiffeId>,
    },
    /// TLS with the DestinationRule's settings: `SIMPLE` or `MUTUAL` (with a client
    /// certificate and key present).
    Originate(&'e ClientTls),
}

/// Why an outbound connection uses its transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsReason<'e> {
    /// A DestinationRule's TLS settings.
    Rule {
        /// The rule.
        rule: &'e ResourceRef,
        /// Whether a `portLevelSettings` entry decided.
        port_level: bool,
    },
    /// Automatic mTLS: mesh mTLS exactly when the endpoint is a mesh workload whose port is not
    /// DISABLE.
    Auto {
        /// The endpoint's mode, or `None` when the endpoint is not a mesh workload.
        server: Option<EffectiveMode<'e>>,
    },
    /// The client is not a mesh workload, so the agent leaves the connection alone.
    ClientOutsideMesh,
}

/// Why an outbound connection cannot be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal<'e> {
    /// The service VIP has no endpoints (Envoy's 503 "no healthy upstream").
    NoEndpoints {
        /// The service host.
        service: &'e str,
    },
    /// A `MUTUAL` rule whose client credentials are only in a `credentialName` secret, which
    /// the agent cannot read; sending without a certificate would fail or mislead.
    CredentialsUnavailable {
        /// The rule.
        rule: &'e ResourceRef,
    },
    /// The source address is not a workload in the inventory.
    UnknownClient,
}

/// The service (and port) a destination belongs to, if any, and the address to connect to.
type Routed<'e> = (Option<(&'e ServiceEntry, &'e ServicePort)>, SocketAddr);

/// The facts about one inbound connection that rules test.
struct Conn<'a> {
    principal: Option<Principal<'a>>,
    peer: Option<&'a SpiffeId>,
    source: IpAddr,
    destination: IpAddr,
    port: u16,
}

// === impl Engine ===

impl Engine {
    /// The peer authentication mode for `port` (a workload port) of the workload at `ip`;
    /// `None` when no workload has that address.
    pub fn effective_peer_auth(&self, ip: IpAddr, port: u16) -> Option<EffectiveMode<'_>> {
        let workload = self.workload(ip)?;
        Some(self.effective(workload.peer_auth.for_port(port)))
    }

    /// Decides an inbound connection: peer authentication first (probe sources, STRICT,
    /// DISABLE, trust domain), then CUSTOM and DENY policies, then ALLOW policies.
    pub fn inbound(&self, request: &InboundRequest<'_>) -> Verdict<'_> {
        let destination = canonical(request.destination);
        let Some(workload) = self.workload(destination.ip()) else {
            return Verdict::UnknownWorkload;
        };
        let decided = workload.peer_auth.for_port(destination.port());
        let source = request.source.ip().to_canonical();
        let principal = match request.peer {
            None if self.probe_sources.contains(&source) => return Verdict::Probe,
            None if decided.mode == Mode::Strict => {
                return Verdict::PlaintextRefused {
                    mode: self.effective(decided),
                };
            }
            None => None,
            Some(_) if decided.mode == Mode::Disable => {
                return Verdict::MtlsRefused {
                    mode: self.effective(decided),
                };
            }
            Some(peer) => {
                let Some(trust_domain) = self.local_trust_domain(peer.trust_domain()) else {
                    return Verdict::ForeignTrustDomain;
                };
                Some(Principal::new(
                    trust_domain,
                    peer.namespace(),
                    peer.service_account(),
                ))
            }
        };
        let conn = Conn {
            principal,
            peer: request.peer,
            source,
            destination: destination.ip(),
            port: destination.port(),
        };
        self.authorize(workload, &conn, decided)
    }

    /// Decides how to originate an outbound connection: pick an endpoint for a service VIP,
    /// then apply the DestinationRule TLS settings that the client sees for the service (its
    /// own namespace's rules, then the service namespace's, then the root namespace's; the
    /// most specific host wins within a namespace), or automatic mTLS without one.
    pub fn outbound(&self, request: &OutboundRequest) -> Result<Outbound<'_>, Refusal<'_>> {
        let client = self
            .workload(request.source)
            .ok_or(Refusal::UnknownClient)?;
        let (service, endpoint) = self.route(canonical(request.destination), request.pick)?;
        let outbound = |tls, reason| Outbound {
            endpoint,
            service: service.map(|(entry, _)| entry.host.as_str()),
            tls,
            reason,
        };
        if !client.workload.mesh || client.identity.is_none() {
            return Ok(outbound(
                OutboundTls::Plaintext,
                TlsReason::ClientOutsideMesh,
            ));
        }
        let server = self.workload(endpoint.ip());
        let configured = service.and_then(|(entry, port)| self.configured_tls(client, entry, port));
        let (tls, reason) = match configured {
            Some((rule, tls, port_level)) => {
                let tls = rule_transport(rule, tls, server)?;
                (tls, TlsReason::Rule { rule, port_level })
            }
            None => self.auto_transport(server, endpoint.port()),
        };
        Ok(outbound(tls, reason))
    }

    /// The TLS settings of the DestinationRule the client sees for the service port, if it
    /// has any; a matching port-level entry without `tls` leaves the port to automatic mTLS,
    /// because Istio's port-level settings do not inherit.
    fn configured_tls(
        &self,
        client: &WorkloadEntry,
        service: &ServiceEntry,
        port: &ServicePort,
    ) -> Option<(&ResourceRef, &ClientTls, bool)> {
        let rule = &self.destination_rule(client, service)?.rule;
        match rule.port_level.iter().find(|(p, _)| *p == port.port) {
            Some((_, tls)) => Some((&rule.resource, tls.as_ref()?, true)),
            None => Some((&rule.resource, rule.tls.as_ref()?, false)),
        }
    }

    /// Automatic mTLS: mesh mTLS exactly when the endpoint is a mesh workload whose port is
    /// not DISABLE.
    fn auto_transport<'e>(
        &'e self,
        server: Option<&'e WorkloadEntry>,
        port: u16,
    ) -> (OutboundTls<'e>, TlsReason<'e>) {
        let Some(server) = server.filter(|s| s.workload.mesh && s.identity.is_some()) else {
            return (OutboundTls::Plaintext, TlsReason::Auto { server: None });
        };
        let decided = server.peer_auth.for_port(port);
        let tls = if decided.mode == Mode::Disable {
            OutboundTls::Plaintext
        } else {
            OutboundTls::Mesh {
                server: server.identity.as_ref(),
            }
        };
        let reason = TlsReason::Auto {
            server: Some(self.effective(decided)),
        };
        (tls, reason)
    }

    fn effective(&self, decided: Decided) -> EffectiveMode<'_> {
        EffectiveMode {
            mode: decided.mode,
            policy: decided
                .policy
                .and_then(|i| self.peer_authentications.get(i as usize))
                .map(|pa| &pa.resource),
            port_level: decided.port_level,
        }
    }

    /// The local trust domain if `trust_domain` is it or one of its aliases.
    fn local_trust_domain(&self, trust_domain: &TrustDomain) -> Option<&str> {
        let settings = &self.settings;
        let trusted = *trust_domain == settings.trust_domain
            || settings.trust_domain_aliases.contains(trust_domain);
        trusted.then(|| settings.trust_domain.as_str())
    }

    fn authorize(
        &self,
        workload: &WorkloadEntry,
        conn: &Conn<'_>,
        decided: Decided,
    ) -> Verdict<'_> {
        let policy = |i: u32| &self.authorization_policies[i as usize];
        for (list, action) in [
            (&workload.custom, Action::Custom),
            (&workload.deny, Action::Deny),
        ] {
            for &i in list {
                if let Some(rule) = first_match(policy(i), conn, false) {
                    return Verdict::DeniedBy {
                        policy: &policy(i).resource,
                        rule,
                        action,
                    };
                }
            }
        }
        let Some(&first) = workload.allow.first() else {
            return Verdict::Accepted {
                mode: self.effective(decided),
                mtls: conn.peer.is_some(),
            };
        };
        for &i in &workload.allow {
            if let Some(rule) = first_match(policy(i), conn, true) {
                return Verdict::AllowedBy {
                    policy: &policy(i).resource,
                    rule,
                };
            }
        }
        Verdict::NotAllowed {
            policy: &policy(first).resource,
            policies: workload.allow.len(),
        }
    }

    /// The service and endpoint for a destination: a VIP picks an endpoint round robin (or
    /// keeps the pinned one); an endpoint address maps back to its service for
    /// DestinationRule lookup.
    fn route(&self, destination: SocketAddr, pick: Pick) -> Result<Routed<'_>, Refusal<'_>> {
        let lookup = |(service, port): (u32, u16)| {
            let entry = self.services.get(service as usize)?;
            Some((entry, entry.service.ports.get(usize::from(port))?))
        };
        if let Some((entry, port)) = self
            .service_by_vip
            .get(&destination)
            .copied()
            .and_then(lookup)
        {
            let n = match pick {
                Pick::Next(n) => n,
                Pick::Endpoint(endpoint) => {
                    return Ok((Some((entry, port)), canonical(endpoint)));
                }
            };
            let endpoints = &entry.service.endpoints;
            let Some(&ip) = endpoints.get(nth(n, endpoints.len())) else {
                return Err(Refusal::NoEndpoints {
                    service: &entry.host,
                });
            };
            let endpoint = SocketAddr::new(ip.to_canonical(), port.target());
            return Ok((Some((entry, port)), endpoint));
        }
        let service = self
            .service_by_endpoint
            .get(&destination)
            .copied()
            .and_then(lookup);
        let endpoint = match pick {
            Pick::Next(_) => destination,
            Pick::Endpoint(endpoint) => canonical(endpoint),
        };
        Ok((service, endpoint))
    }

    /// The DestinationRule a client sees for a service, in Istio's lookup order.
    fn destination_rule(
        &self,
        client: &WorkloadEntry,
        service: &ServiceEntry,
    ) -> Option<&CompiledRule> {
        let client_ns = client.workload.namespace.as_str();
        let service_ns = service.service.namespace.as_str();
        let root = self.settings.root_namespace.as_str();
        let host = service.host.as_str();
        let local = |r: &CompiledRule| {
            r.rule.export_to.includes(client_ns)
                && r.rule
                    .workload_selector
                    .as_ref()
                    .is_none_or(|s| selects(s, &client.workload.labels))
        };
        let exported = |r: &CompiledRule| {
            r.rule.workload_selector.is_none() && r.rule.export_to.includes(client_ns)
        };
        self.best_rule(client_ns, host, local)
            .or_else(|| {
                (service_ns != client_ns)
                    .then(|| self.best_rule(service_ns, host, exported))
                    .flatten()
            })
            .or_else(|| {
                (root != client_ns && root != service_ns)
                    .then(|| self.best_rule(root, host, exported))
                    .flatten()
            })
    }

    /// The most specific visible rule for `host` in `namespace`; the first in file order on a
    /// tie.
    fn best_rule(
        &self,
        namespace: &str,
        host: &str,
        visible: impl Fn(&CompiledRule) -> bool,
    ) -> Option<&CompiledRule> {
        let mut best: Option<(usize, &CompiledRule)> = None;
        for &i in self.rules_by_namespace.get(namespace)? {
            let rule = &self.destination_rules[i as usize];
            let Some(specificity) = rule.host.specificity(host) else {
                continue;
            };
            if visible(rule) && best.is_none_or(|(b, _)| specificity > b) {
                best = Some((specificity, rule));
            }
        }
        best.map(|(_, rule)| rule)
    }
}

/// The transport a DestinationRule's TLS settings ask for.
fn rule_transport<'e>(
    rule: &'e ResourceRef,
    tls: &'e ClientTls,
    server: Option<&'e WorkloadEntry>,
) -> Result<OutboundTls<'e>, Refusal<'e>> {
    Ok(match tls.mode {
        TlsMode::Disable => OutboundTls::Plaintext,
        // Even towards a server that will refuse it, as Istio does (seed 004's last phase).
        TlsMode::IstioMutual => OutboundTls::Mesh {
            server: server.and_then(|s| s.identity.as_ref()),
        },
        TlsMode::Mutual if tls.client_certificate.is_none() || tls.private_key.is_none() => {
            return Err(Refusal::CredentialsUnavailable { rule });
        }
        TlsMode::Simple | TlsMode::Mutual => OutboundTls::Originate(tls),
    })
}

// === rule matching ===

/// The index of the first matching rule. ALLOW rules that needed L7 fields never match.
fn first_match(policy: &AuthorizationPolicy, conn: &Conn<'_>, allow: bool) -> Option<usize> {
    policy
        .rules
        .iter()
        .position(|rule| !(allow && rule.needs_l7) && rule_matches(rule, conn))
}

fn rule_matches(rule: &Rule, conn: &Conn<'_>) -> bool {
    let any = |alternatives: &[Vec<Constraint>]| {
        alternatives.is_empty() || alternatives.iter().any(|all| all_match(all, conn))
    };
    any(&rule.from) && any(&rule.to) && all_match(&rule.when, conn)
}

fn all_match(constraints: &[Constraint], conn: &Conn<'_>) -> bool {
    constraints.iter().all(|c| constraint_matches(c, conn))
}

fn constraint_matches(constraint: &Constraint, conn: &Conn<'_>) -> bool {
    let (hit, negated) = match constraint {
        Constraint::Principal { values, negated } => (
            conn.principal
                .as_ref()
                .is_some_and(|p| values.iter().any(|v| v.matches_principal(p))),
            *negated,
        ),
        Constraint::Namespace { values, negated } => {
            let namespace = conn.peer.map(SpiffeId::namespace);
            (values.iter().any(|v| v.matches(namespace)), *negated)
        }
        Constraint::ServiceAccount { values, negated } => (
            conn.peer.is_some_and(|p| {
                values
                    .iter()
                    .any(|(ns, sa)| p.namespace() == ns && p.service_account() == sa)
            }),
            *negated,
        ),
        Constraint::SourceIp { blocks, negated } => {
            (blocks.iter().any(|b| b.contains(conn.source)), *negated)
        }
        Constraint::DestinationIp { blocks, negated } => (
            blocks.iter().any(|b| b.contains(conn.destination)),
            *negated,
        ),
        Constraint::DestinationPort { ports, negated } => (ports.contains(&conn.port), *negated),
    };
    hit != negated
}

/// `pick % len` without a lossy cast; `len` is 0 only for an empty list, which has no index.
fn nth(pick: u64, len: usize) -> usize {
    let len64 = u64::try_from(len).unwrap_or(u64::MAX);
    pick.checked_rem(len64)
        .and_then(|i| usize::try_from(i).ok())
        .unwrap_or(usize::MAX)
}

// === impl EffectiveMode ===

impl fmt::Display for EffectiveMode<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.policy {
            None => write!(f, "{} (default)", self.mode),
            Some(policy) if self.port_level => write!(f, "{} (port level, {policy})", self.mode),
            Some(policy) => write!(f, "{} ({policy})", self.mode),
        }
    }
}

// === impl Verdict ===

impl Verdict<'_> {
    /// Whether to accept the connection.
    pub fn is_allowed(&self) -> bool {
        self.refusal().is_none()
    }

    /// A stable, low-cardinality name for counters and logs: the [`RefusalCode`] of a
    /// refusing verdict, or the name of the accepting one.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Accepted { mtls: true, .. } => "mtls",
            Self::Accepted { mtls: false, .. } => "plaintext",
            Self::Probe => "probe",
            Self::AllowedBy { .. } => "allow_rule",
            refusing => refusing.refusal().map_or("", RefusalCode::as_str),
        }
    }

    /// Why this verdict refuses; `None` when it accepts.
    pub fn refusal(&self) -> Option<RefusalCode> {
        Some(match self {
            Self::Accepted { .. } | Self::Probe | Self::AllowedBy { .. } => return None,
            Self::PlaintextRefused { .. } => RefusalCode::PlaintextRefusedStrict,
            Self::MtlsRefused { .. } => RefusalCode::MtlsRefusedDisable,
            Self::ForeignTrustDomain => RefusalCode::ForeignTrustDomain,
            Self::DeniedBy {
                action: Action::Custom,
                ..
            } => RefusalCode::CustomRule,
            Self::DeniedBy { .. } => RefusalCode::DenyRule,
            Self::NotAllowed { .. } => RefusalCode::NoAllowMatch,
            Self::UnknownWorkload => RefusalCode::UnknownWorkload,
        })
    }
}

impl fmt::Display for Verdict<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Accepted { mode, mtls: true } => write!(f, "mTLS accepted under {mode}"),
            Self::Accepted { mode, mtls: false } => write!(f, "plaintext accepted under {mode}"),
            Self::Probe => f.write_str("plaintext from a probe source"),
            Self::AllowedBy { policy, rule } => write!(f, "allowed by {policy} rule {rule}"),
            Self::PlaintextRefused { mode } => write!(f, "plaintext refused: {mode}"),
            Self::MtlsRefused { mode } => {
                write!(f, "mTLS refused: {mode} does not terminate mesh TLS")
            }
            Self::ForeignTrustDomain => f.write_str("peer trust domain is not trusted"),
            Self::DeniedBy {
                policy,
                rule,
                action,
            } => write!(f, "denied by {policy} rule {rule} ({action})"),
            Self::NotAllowed { policy, policies } => write!(
                f,
                "no ALLOW rule matched ({policies} ALLOW policies apply, first {policy})"
            ),
            Self::UnknownWorkload => f.write_str("destination is not a known workload"),
        }
    }
}

// === impl OutboundTls ===

impl OutboundTls<'_> {
    /// A stable name for counters and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Mesh { .. } => "mesh_mtls",
            Self::Originate(ClientTls {
                mode: TlsMode::Mutual,
                ..
            }) => "mutual",
            Self::Originate(_) => "simple",
        }
    }
}

impl OutboundTls<'_> {
    /// What a flow made with this transport runs; `None` for mesh mTLS without a known server
    /// identity, which is never let through.
    pub fn to_flow(&self) -> Option<FlowTls> {
        Some(match self {
            Self::Plaintext => FlowTls::Plaintext,
            Self::Mesh { server } => FlowTls::Mesh((*server)?.clone()),
            Self::Originate(tls) => FlowTls::Originate((*tls).clone()),
        })
    }

    /// Whether an open flow running `held` gives at least the protection this (new) decision
    /// asks for, so a policy change can leave it alone.
    ///
    /// Plaintext is met by anything: a flow already stronger than required (mesh mTLS or
    /// originated TLS where plaintext would now do) keeps working, as closing it would protect
    /// nothing. Mesh mTLS is met only by mesh mTLS that verified the same server identity, and
    /// origination only by origination with the same settings (mode, credentials, CA, SNI,
    /// SANs): the flow's handshake proved what the old settings asked, not the new ones.
    pub fn met_by(&self, held: &FlowTls) -> bool {
        match (self, held) {
            (Self::Plaintext, _) => true,
            (Self::Mesh { server: Some(want) }, FlowTls::Mesh(has)) => *want == has,
            (Self::Originate(want), FlowTls::Originate(has)) => *want == has,
            _ => false,
        }
    }
}

// === impl FlowTls ===

impl fmt::Display for FlowTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plaintext => f.write_str("plaintext"),
            Self::Mesh(server) => write!(f, "mesh mTLS to {server}"),
            Self::Originate(tls) => write!(f, "{} TLS origination", tls.mode),
        }
    }
}

impl fmt::Display for OutboundTls<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plaintext => f.write_str("plaintext"),
            Self::Mesh { server: Some(id) } => write!(f, "mesh mTLS to {id}"),
            Self::Mesh { server: None } => f.write_str("mesh mTLS to an unknown identity"),
            Self::Originate(tls) => write!(f, "{} TLS origination", tls.mode),
        }
    }
}

// === impl TlsReason ===

impl fmt::Display for TlsReason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rule {
                rule,
                port_level: false,
            } => write!(f, "{rule}"),
            Self::Rule {
                rule,
                port_level: true,
            } => write!(f, "{rule} (port level)"),
            Self::Auto { server: None } => f.write_str("automatic: endpoint is outside the mesh"),
            Self::Auto { server: Some(mode) } => write!(f, "automatic: endpoint is {mode}"),
            Self::ClientOutsideMesh => f.write_str("client is outside the mesh"),
        }
    }
}

// === impl Refusal ===

impl Refusal<'_> {
    /// The stable name for counters and logs.
    pub fn code(&self) -> RefusalCode {
        match self {
            Self::NoEndpoints { .. } => RefusalCode::NoEndpoints,
            Self::CredentialsUnavailable { .. } => RefusalCode::CredentialsUnavailable,
            Self::UnknownClient => RefusalCode::UnknownClient,
        }
    }
}

impl fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoEndpoints { service } => write!(f, "service {service} has no endpoints"),
            Self::CredentialsUnavailable { rule } => write!(
                f,
                "{rule} needs client credentials from a Kubernetes secret the agent cannot read"
            ),
            Self::UnknownClient => f.write_str("source is not a known workload"),
        }
    }
}
