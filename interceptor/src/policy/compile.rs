//! Lowers a [`PolicySet`] and an [`Inventory`] into an [`Engine`]: every selector, service
//! target and trust-domain alias is resolved once, so per-connection decisions are a few
//! hash lookups and short scans that never allocate.
//!
//! Build a new engine whenever the policy files or the inventory change, and swap it in
//! whole; nothing in it is mutable.

use std::{
    collections::{HashMap, hash_map::Entry},
    net::{IpAddr, SocketAddr},
};

use super::{
    inventory::{Inventory, Service, ServicePort, Settings, Workload},
    model::{
        Action, AuthorizationPolicy, Constraint, DestinationRule, HostPattern, Labels, Mode,
        PeerAuthentication, PeerTarget, PolicySet, PortRef, ServiceTarget, Warning,
    },
};
use crate::identity::SpiffeId;

/// Compiled policy and inventory: the input of every per-connection decision.
#[derive(Debug)]
pub struct Engine {
    pub(super) settings: Settings,
    pub(super) peer_authentications: Vec<PeerAuthentication>,
    pub(super) destination_rules: Vec<CompiledRule>,
    pub(super) authorization_policies: Vec<AuthorizationPolicy>,
    pub(super) workloads: Vec<WorkloadEntry>,
    pub(super) workload_by_ip: HashMap<IpAddr, u32>,
    pub(super) services: Vec<ServiceEntry>,
    /// `(virtual IP, service port)` → `(service, index into its ports)`.
    pub(super) service_by_vip: HashMap<SocketAddr, (u32, u16)>,
    /// `(endpoint IP, target port)` → `(service, index into its ports)`, for headless services
    /// and direct pod connections; the first service listed wins.
    pub(super) service_by_endpoint: HashMap<SocketAddr, (u32, u16)>,
    /// DestinationRule indexes by namespace, in file order.
    pub(super) rules_by_namespace: HashMap<String, Vec<u32>>,
    pub(super) probe_sources: Vec<IpAddr>,
    warnings: Vec<Warning>,
}

/// Identifies a service of an [`Engine`], so callers can keep per-service round-robin
/// counters in a plain vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceId(pub(super) u32);

/// A workload with everything that decides its connections resolved.
#[derive(Debug)]
pub(super) struct WorkloadEntry {
    pub(super) workload: Workload,
    /// `None` when the namespace or service account cannot form a SPIFFE ID; such a workload
    /// cannot hold a mesh certificate, so it is treated as outside the mesh.
    pub(super) identity: Option<SpiffeId>,
    pub(super) peer_auth: ResolvedPeerAuth,
    /// Applicable AuthorizationPolicy indexes by action, in file order.
    pub(super) custom: Vec<u32>,
    pub(super) deny: Vec<u32>,
    pub(super) allow: Vec<u32>,
}

/// The composed peer authentication of one workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ResolvedPeerAuth {
    /// The workload-wide mode (never `Unset`).
    pub(super) mode: Decided,
    /// Workload ports with their own mode.
    pub(super) ports: Vec<(u16, Decided)>,
}

/// A mode and the peer authentication that set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Decided {
    pub(super) mode: Mode,
    /// Index into `peer_authentications`; `None` for the built-in PERMISSIVE default.
    pub(super) policy: Option<u32>,
    pub(super) port_level: bool,
}

#[derive(Debug)]
pub(super) struct ServiceEntry {
    pub(super) service: Service,
    /// `<name>.<namespace>.svc.<cluster domain>`, what DestinationRule hosts match.
    pub(super) host: String,
}

#[derive(Debug)]
pub(super) struct CompiledRule {
    pub(super) rule: DestinationRule,
    pub(super) host: HostPattern,
}

// === impl Engine ===

impl Engine {
    /// Resolves `policies` against `inventory`.
    ///
    /// Never fails: anything that cannot be honoured is added to [`Engine::warnings`], after
    /// the policy set's own warnings.
    pub fn new(policies: PolicySet, settings: Settings, inventory: Inventory) -> Self {
        let mut warnings = policies.warnings;
        let (workload_by_ip, identities) =
            index_workloads(&inventory.workloads, &settings, &mut warnings);
        let services: Vec<ServiceEntry> = inventory
            .services
            .into_iter()
            .map(|service| ServiceEntry {
                host: service_host(&service, &settings.cluster_domain),
                service,
            })
            .collect();
        let (service_by_vip, service_by_endpoint) = index_services(&services);
        let destination_rules = compile_rules(policies.destination_rules, &settings, &mut warnings);
        let rules_by_namespace = rules_by_namespace(&destination_rules);
        let authorization_policies = fold_aliases(policies.authorization_policies, &settings);
        let peer_authentications = policies.peer_authentications;
        let peer = PeerScopes::new(&peer_authentications, &services, &settings, &mut warnings);
        let workloads = inventory
            .workloads
            .into_iter()
            .zip(identities)
            .map(|(workload, identity)| {
                let peer_auth =
                    peer.resolve(&workload, &peer_authentications, &services, &mut warnings);
                let (custom, deny, allow) =
                    applicable_authz(&workload, &authorization_policies, &settings);
                WorkloadEntry {
                    workload,
                    identity,
                    peer_auth,
                    custom,
                    deny,
                    allow,
                }
            })
            .collect();
        let probe_sources = settings
            .probe_sources
            .iter()
            .map(|ip| ip.to_canonical())
            .collect();
        Self {
            settings,
            peer_authentications,
            destination_rules,
            authorization_policies,
            workloads,
            workload_by_ip,
            services,
            service_by_vip,
            service_by_endpoint,
            rules_by_namespace,
            probe_sources,
            warnings,
        }
    }

    /// Everything loaded or resolved but not honoured as written.
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// The settings the engine was built with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The service whose virtual IP (or, for headless services, endpoint) and port `address`
    /// is, so a caller can keep a round-robin counter per service.
    pub fn service_at(&self, address: SocketAddr) -> Option<ServiceId> {
        let address = canonical(address);
        self.service_by_vip
            .get(&address)
            .or_else(|| self.service_by_endpoint.get(&address))
            .map(|&(service, _)| ServiceId(service))
    }

    /// How many services there are; every [`ServiceId`] indexes below this.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub(super) fn workload(&self, ip: IpAddr) -> Option<&WorkloadEntry> {
        let i = *self.workload_by_ip.get(&ip.to_canonical())?;
        self.workloads.get(i as usize)
    }
}

// === impl ServiceId ===

impl ServiceId {
    /// The position of the service in the inventory, for indexing counters.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

// === impl Decided ===

impl Decided {
    /// Istio's default when no policy sets a mode.
    const DEFAULT: Self = Self {
        mode: Mode::Permissive,
        policy: None,
        port_level: false,
    };

    /// `mode` from policy `policy` if it is set; UNSET inherits `self`.
    fn overridden(self, mode: Mode, policy: u32, port_level: bool) -> Self {
        if mode == Mode::Unset {
            self
        } else {
            Self {
                mode,
                policy: Some(policy),
                port_level,
            }
        }
    }
}

// === impl ResolvedPeerAuth ===

impl ResolvedPeerAuth {
    pub(super) fn for_port(&self, port: u16) -> Decided {
        self.ports
            .iter()
            .find(|(p, _)| *p == port)
            .map_or(self.mode, |&(_, decided)| decided)
    }
}

// === peer authentication ===

/// The mesh-wide and namespace-wide peer authentications, picked once for all workloads.
struct PeerScopes {
    mesh: Option<u32>,
    namespaces: HashMap<String, u32>,
    root_namespace: String,
}

impl PeerScopes {
    fn new(
        policies: &[PeerAuthentication],
        services: &[ServiceEntry],
        settings: &Settings,
        warnings: &mut Vec<Warning>,
    ) -> Self {
        let mut mesh: Option<u32> = None;
        let mut namespaces: HashMap<String, u32> = HashMap::new();
        for (i, pa) in policies.iter().enumerate() {
            if let PeerTarget::Services(targets) = &pa.target {
                check_targets(pa, targets, services, warnings);
            }
            let in_root = pa.resource.namespace == settings.root_namespace;
            let slot = match pa.target {
                PeerTarget::Mesh => Some(&mut mesh),
                PeerTarget::Namespace if in_root => Some(&mut mesh),
                PeerTarget::Namespace => match namespaces.entry(pa.resource.namespace.clone()) {
                    Entry::Vacant(e) => {
                        e.insert(index(i));
                        None
                    }
                    Entry::Occupied(e) => {
                        conflict(warnings, pa, &policies[*e.get() as usize], "namespace-wide");
                        None
                    }
                },
                PeerTarget::Selector(_) | PeerTarget::Services(_) if in_root => {
                    warnings.push(pa_warning(
                        pa,
                        "ignored: Istio applies workload-specific peer authentication in the \
                         root namespace to no workload; remove the selector for a mesh-wide \
                         policy",
                    ));
                    None
                }
                PeerTarget::Selector(_) | PeerTarget::Services(_) => None,
            };
            if let Some(slot) = slot {
                match slot {
                    None => *slot = Some(index(i)),
                    Some(first) => conflict(warnings, pa, &policies[*first as usize], "mesh-wide"),
                }
            }
        }
        Self {
            mesh,
            namespaces,
            root_namespace: settings.root_namespace.clone(),
        }
    }

    /// Composes mesh, namespace and workload policies as Istio's
    /// `ComposePeerAuthentication` does: each level that is not UNSET overrides the one above,
    /// and port-level modes (selector policies only) override the result, UNSET inheriting it.
    fn resolve(
        &self,
        workload: &Workload,
        policies: &[PeerAuthentication],
        services: &[ServiceEntry],
        warnings: &mut Vec<Warning>,
    ) -> ResolvedPeerAuth {
        let mut mode = Decided::DEFAULT;
        let namespace_policy = self.namespaces.get(&workload.namespace).copied();
        for i in [self.mesh, namespace_policy].into_iter().flatten() {
            mode = mode.overridden(policies[i as usize].mode, i, false);
        }
        let Some((i, ports)) = self.workload_policy(workload, policies, services, warnings) else {
            return ResolvedPeerAuth {
                mode,
                ports: Vec::new(),
            };
        };
        let pa = &policies[i as usize];
        let (base, port_modes) = match ports {
            // A service-targeted legacy policy with ports sets only those ports.
            Some(ports) => (
                Mode::Unset,
                ports.into_iter().map(|p| (p, pa.mode)).collect(),
            ),
            None => (pa.mode, selector_ports(pa)),
        };
        let mode = mode.overridden(base, i, false);
        let ports = port_modes
            .into_iter()
            .map(|(port, m)| (port, mode.overridden(m, i, true)))
            .collect();
        ResolvedPeerAuth { mode, ports }
    }

    /// The workload-specific policy that applies, if any: the first in file order (Istio
    /// picks the oldest), with a warning naming the ones passed over. For service targets,
    /// also the workload ports the policy is limited to (`None`: all ports).
    fn workload_policy(
        &self,
        workload: &Workload,
        policies: &[PeerAuthentication],
        services: &[ServiceEntry],
        warnings: &mut Vec<Warning>,
    ) -> Option<(u32, Option<Vec<u16>>)> {
        if workload.namespace == self.root_namespace {
            return None;
        }
        let mut chosen: Option<(u32, Option<Vec<u16>>)> = None;
        for (i, pa) in policies.iter().enumerate() {
            if pa.resource.namespace != workload.namespace {
                continue;
            }
            let ports = match &pa.target {
                PeerTarget::Selector(labels) if selects(labels, &workload.labels) => None,
                PeerTarget::Services(targets) => {
                    match service_target_ports(pa, targets, workload, services) {
                        Some(ports) => ports,
                        None => continue,
                    }
                }
                _ => continue,
            };
            match &chosen {
                None => chosen = Some((index(i), ports)),
                Some((first, _)) => {
                    let first = &policies[*first as usize];
                    warnings.push(pa_warning(
                        pa,
                        format!(
                            "workload {} is also selected by {} (earlier in file order), \
                             which wins as the oldest would in Istio; this policy does not \
                             apply to it",
                            workload_name(workload),
                            first.resource
                        ),
                    ));
                }
            }
        }
        chosen
    }
}

/// Port modes of a selector policy; only numeric ports exist there.
fn selector_ports(pa: &PeerAuthentication) -> Vec<(u16, Mode)> {
    pa.port_modes
        .iter()
        .filter_map(|(port, mode)| match port {
            PortRef::Number(n) => Some((*n, *mode)),
            PortRef::Name(_) => None,
        })
        .collect()
}

/// Whether a legacy service-targeted policy covers `workload`, and on which workload ports.
///
/// `None`: not covered. `Some(None)`: covered on every port. A workload is covered when one
/// of its addresses is an endpoint of a target service (in the policy's namespace) and it
/// carries the target's labels; named or numbered service ports map to their target ports.
fn service_target_ports(
    pa: &PeerAuthentication,
    targets: &[ServiceTarget],
    workload: &Workload,
    services: &[ServiceEntry],
) -> Option<Option<Vec<u16>>> {
    let mut covered = false;
    let mut ports = Vec::new();
    let mut all_ports = false;
    for target in targets {
        let Some(entry) = services.iter().find(|s| {
            s.service.name == target.name && s.service.namespace == pa.resource.namespace
        }) else {
            continue;
        };
        let service = &entry.service;
        let is_endpoint = workload.ips.iter().any(|ip| service.endpoints.contains(ip));
        if !is_endpoint || !selects(&target.labels, &workload.labels) {
            continue;
        }
        covered = true;
        if target.ports.is_empty() {
            all_ports = true;
        }
        for port in &target.ports {
            let found = service.ports.iter().find(|p| match port {
                PortRef::Number(n) => p.port == *n,
                PortRef::Name(name) => p.name.as_deref() == Some(name.as_str()),
            });
            ports.extend(found.map(ServicePort::target));
        }
    }
    covered.then(|| (!all_ports).then_some(ports))
}

/// Warns once per policy about targets that name no known service or service port.
fn check_targets(
    pa: &PeerAuthentication,
    targets: &[ServiceTarget],
    services: &[ServiceEntry],
    warnings: &mut Vec<Warning>,
) {
    let namespace = &pa.resource.namespace;
    for target in targets {
        let Some(entry) = services
            .iter()
            .find(|s| s.service.name == target.name && s.service.namespace == *namespace)
        else {
            warnings.push(pa_warning(
                pa,
                format!(
                    "targets service {namespace}/{}, which is not in the inventory; it applies \
                     to no workload",
                    target.name
                ),
            ));
            continue;
        };
        for port in &target.ports {
            let known = entry.service.ports.iter().any(|p| match port {
                PortRef::Number(n) => p.port == *n,
                PortRef::Name(name) => p.name.as_deref() == Some(name.as_str()),
            });
            if !known {
                warnings.push(pa_warning(
                    pa,
                    format!(
                        "service {namespace}/{} has no port {port}; that target port is ignored",
                        target.name
                    ),
                ));
            }
        }
    }
}

fn conflict(
    warnings: &mut Vec<Warning>,
    loser: &PeerAuthentication,
    winner: &PeerAuthentication,
    scope: &str,
) {
    warnings.push(pa_warning(
        loser,
        format!(
            "ignored: {} is also {scope} and comes first in file order (Istio keeps the oldest)",
            winner.resource
        ),
    ));
}

fn pa_warning(pa: &PeerAuthentication, message: impl Into<String>) -> Warning {
    Warning {
        location: Some(pa.resource.location.clone()),
        field: String::new(),
        message: message.into(),
    }
}

// === authorization ===

/// Rewrites principal patterns written for a trust-domain alias to the local trust domain;
/// peer identities are folded the same way at evaluation.
fn fold_aliases(
    mut policies: Vec<AuthorizationPolicy>,
    settings: &Settings,
) -> Vec<AuthorizationPolicy> {
    if settings.trust_domain_aliases.is_empty() {
        return policies;
    }
    let local = settings.trust_domain.as_str();
    let constraints = policies.iter_mut().flat_map(|p| {
        p.rules.iter_mut().flat_map(|r| {
            r.from
                .iter_mut()
                .chain(r.to.iter_mut())
                .flatten()
                .chain(r.when.iter_mut())
        })
    });
    for constraint in constraints {
        let Constraint::Principal { values, .. } = constraint else {
            continue;
        };
        for value in values.iter_mut() {
            for alias in &settings.trust_domain_aliases {
                if let Some(folded) = value.with_trust_domain(alias.as_str(), local) {
                    *value = folded;
                    break;
                }
            }
        }
    }
    policies
}

/// The AuthorizationPolicies that apply to `workload`, split by action: those in its
/// namespace and those in the root namespace, either without a selector or with one its labels
/// satisfy. AUDIT and gateway-attached policies never apply.
fn applicable_authz(
    workload: &Workload,
    policies: &[AuthorizationPolicy],
    settings: &Settings,
) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (mut custom, mut deny, mut allow) = (Vec::new(), Vec::new(), Vec::new());
    for (i, p) in policies.iter().enumerate() {
        let ns = &p.resource.namespace;
        let in_scope = *ns == workload.namespace || *ns == settings.root_namespace;
        let selected = p
            .selector
            .as_ref()
            .is_none_or(|labels| selects(labels, &workload.labels));
        if p.detached || !in_scope || !selected {
            continue;
        }
        match p.action {
            Action::Custom => custom.push(index(i)),
            Action::Deny => deny.push(index(i)),
            Action::Allow => allow.push(index(i)),
            Action::Audit => {}
        }
    }
    (custom, deny, allow)
}

// === destination rules ===

fn compile_rules(
    rules: Vec<DestinationRule>,
    settings: &Settings,
    warnings: &mut Vec<Warning>,
) -> Vec<CompiledRule> {
    let mut seen: HashMap<(String, HostPattern), usize> = HashMap::new();
    let mut out: Vec<CompiledRule> = Vec::with_capacity(rules.len());
    for rule in rules {
        let host = HostPattern::resolve(
            &rule.host,
            &rule.resource.namespace,
            &settings.cluster_domain,
        );
        let key = (rule.resource.namespace.clone(), host.clone());
        if rule.workload_selector.is_none() {
            if let Some(&first) = seen.get(&key) {
                warnings.push(Warning {
                    location: Some(rule.resource.location.clone()),
                    field: "spec.host".to_owned(),
                    message: format!(
                        "{} also configures host {host} in this namespace and comes first; \
                         Istio would merge the two, the agent uses only the first",
                        out[first].rule.resource
                    ),
                });
            } else {
                seen.insert(key, out.len());
            }
        }
        out.push(CompiledRule { rule, host });
    }
    out
}

fn rules_by_namespace(rules: &[CompiledRule]) -> HashMap<String, Vec<u32>> {
    let mut by_namespace: HashMap<String, Vec<u32>> = HashMap::new();
    for (i, r) in rules.iter().enumerate() {
        by_namespace
            .entry(r.rule.resource.namespace.clone())
            .or_default()
            .push(index(i));
    }
    by_namespace
}

// === inventory ===

fn index_workloads(
    workloads: &[Workload],
    settings: &Settings,
    warnings: &mut Vec<Warning>,
) -> (HashMap<IpAddr, u32>, Vec<Option<SpiffeId>>) {
    let mut by_ip = HashMap::new();
    let mut identities = Vec::with_capacity(workloads.len());
    for (i, w) in workloads.iter().enumerate() {
        let identity = SpiffeId::new(
            settings.trust_domain.clone(),
            &w.namespace,
            &w.service_account,
        );
        identities.push(match identity {
            Ok(id) => Some(id),
            Err(e) => {
                if w.mesh {
                    warnings.push(inventory_warning(
                        format!("workloads[{i}]"),
                        format!("{e}; the workload is treated as outside the mesh"),
                    ));
                }
                None
            }
        });
        for ip in &w.ips {
            match by_ip.entry(ip.to_canonical()) {
                Entry::Vacant(e) => {
                    e.insert(index(i));
                }
                Entry::Occupied(e) => warnings.push(inventory_warning(
                    format!("workloads[{i}].ips"),
                    format!(
                        "{ip} already belongs to workloads[{}]; the first one keeps it",
                        e.get()
                    ),
                )),
            }
        }
    }
    (by_ip, identities)
}

type ServiceIndex = HashMap<SocketAddr, (u32, u16)>;

fn index_services(services: &[ServiceEntry]) -> (ServiceIndex, ServiceIndex) {
    let mut by_vip = HashMap::new();
    let mut by_endpoint = HashMap::new();
    for (i, entry) in services.iter().enumerate() {
        let service = &entry.service;
        for (j, port) in service.ports.iter().enumerate() {
            let value = (index(i), u16::try_from(j).unwrap_or(u16::MAX));
            if let Some(vip) = service.vip {
                by_vip
                    .entry(SocketAddr::new(vip.to_canonical(), port.port))
                    .or_insert(value);
            }
            for ip in &service.endpoints {
                by_endpoint
                    .entry(SocketAddr::new(ip.to_canonical(), port.target()))
                    .or_insert(value);
            }
        }
    }
    (by_vip, by_endpoint)
}

fn inventory_warning(field: String, message: String) -> Warning {
    Warning {
        location: None,
        field,
        message,
    }
}

// === helpers ===

/// Whether a selector's labels are all present on the workload.
pub(super) fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub(super) fn service_host(service: &Service, cluster_domain: &str) -> String {
    format!(
        "{}.{}.svc.{cluster_domain}",
        service.name, service.namespace
    )
    .to_ascii_lowercase()
}

pub(super) fn workload_name(w: &Workload) -> String {
    match (&w.name, w.ips.first()) {
        (Some(name), _) => format!("{}/{name}", w.namespace),
        (None, Some(ip)) => format!("{}/{} ({ip})", w.namespace, w.service_account),
        (None, None) => format!("{}/{}", w.namespace, w.service_account),
    }
}

pub(super) fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// Indexes are `u32` to keep per-workload lists small; more than 4 billion policies is not a
/// configuration anyone can load.
fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}
