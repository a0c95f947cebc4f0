//! The node configuration (`interceptor run --config FILE`): the YAML contract platform teams
//! write. Parsing is pure (the caller reads the file) and strict: an unknown field is an error
//! that names it, because a typo that silently disables mTLS is worse than a refused start.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{handshake::CryptoPolicy, identity::TrustDomain, policy};

/// Whether the agent offloads record encryption to kernel TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KtlsMode {
    /// kTLS when the start-up probe says it works, the userspace relay otherwise.
    #[default]
    Auto,
    /// Refuse to start without kTLS.
    Required,
    /// Always the userspace relay.
    Off,
}

/// One pod enrolled on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
    /// The pod's network namespace (a bind mount such as /run/netns/<name>).
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

/// A mesh workload whose agent runs on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
}

/// A Kubernetes Service as kube-proxy and EndpointSlices would describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// The cluster IP; absent for a headless service (clients dial endpoint addresses).
    #[serde(default)]
    pub vip: Option<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Endpoint addresses; whether each is a mesh workload comes from `workloads`/`peers`.
    #[serde(default)]
    pub endpoints: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    /// The endpoints' port; defaults to `port`, as in Kubernetes.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePort {
    /// The port on the endpoints.
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub trust_domain: TrustDomain,
    /// Trust domains treated as this one when matching principals (Istio's aliases).
    #[serde(default)]
    pub trust_domain_aliases: Vec<String>,
    pub ca_dir: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Upgrades without dropped connections (`interceptor run --takeover`): where the running
    /// agent offers its listeners to a successor, and how long a stopping agent waits for one
    /// and for its open flows. Absent: no handover socket, SIGTERM exits at once.
    #[serde(default)]
    pub handover: Option<HandoverSettings>,
    #[serde(default)]
    pub ktls: KtlsMode,
    /// Key exchange and suites for mesh and originated TLS (`compliancePolicy`,
    /// `requireAes256Gcm`); re-read while the agent runs.
    #[serde(default)]
    pub crypto: CryptoPolicy,
    /// Where pins live; must be on a bpffs (mounted there when absent).
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub peers: Vec<Peer>,
    #[serde(default)]
    pub services: Vec<Service>,
    /// Istio's mesh-wide scope.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Istio security YAML, watched.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// How policy may reach the node's files.
    #[serde(default)]
    pub policy: PolicyOptions,
    /// kubelet/node addresses whose plaintext probes pass STRICT.
    #[serde(default)]
    pub probe_sources: Vec<IpAddr>,
    /// The cluster DNS suffix: services are `<name>.<namespace>.svc.<clusterDomain>`, which is
    /// what DestinationRule hosts match.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    #[serde(default)]
    pub tuning: Tuning,
    /// Workload certificate lifetime and renewal, and how the CA files are watched.
    #[serde(default)]
    pub identity: IdentitySettings,
}

/// `handover:` of the node config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HandoverSettings {
    /// The unix socket a successor connects to (its directory is made 0700, the socket 0600).
    pub socket: PathBuf,
    /// After SIGTERM, or after a successor took the listeners: how long open flows may take to
    /// end on their own before the agent exits (and resets what is left). Without a successor
    /// the agent keeps accepting meanwhile, so the pods lose nothing while a successor is late.
    pub drain_window: Ttl,
}

impl Default for HandoverSettings {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/interceptor/handover.sock"),
            drain_window: Ttl(std::time::Duration::from_secs(30)),
        }
    }
}

/// `identity:` of the node config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IdentitySettings {
    /// Lifetime of workload certificates, such as `24h`, `90m`, `7d` or `1h30m`.
    pub leaf_ttl: Ttl,
    /// Renew a leaf once this share of its lifetime (in percent) has passed.
    pub renew_percent: u8,
    /// How often the agent looks for changes in the files of `caDir`.
    pub ca_poll_ms: u64,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            leaf_ttl: Ttl(crate::ca::DEFAULT_LEAF_TTL),
            renew_percent: 50,
            ca_poll_ms: 1_000,
        }
    }
}

/// A lifetime written as a sequence of `<number><unit>` with units `d`, `h`, `m`, `s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ttl(pub std::time::Duration);

impl TryFrom<String> for Ttl {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Ttl> for String {
    fn from(ttl: Ttl) -> String {
        ttl.to_string()
    }
}

impl std::str::FromStr for Ttl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a duration such as `24h`, `90m`, `7d` or `1h30m`");
        let mut total: u64 = 0;
        let mut digits = String::new();
        for c in text.trim().chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let unit = match c {
                'd' => 86_400,
                'h' => 3_600,
                'm' => 60,
                's' => 1,
                _ => return Err(bad()),
            };
            let n: u64 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(bad)?;
        }
        if !digits.is_empty() || total == 0 {
            return Err(bad());
        }
        Ok(Ttl(std::time::Duration::from_secs(total)))
    }
}

impl std::fmt::Display for Ttl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut secs = self.0.as_secs();
        if secs == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
            if secs >= size {
                write!(f, "{}{unit}", secs / size)?;
                secs %= size;
            }
        }
        Ok(())
    }
}

/// Shortest leaf lifetime: long enough that renewal at half-life is not a storm, short enough
/// that a test can watch rotation on a real clock.
pub const MIN_LEAF_TTL: std::time::Duration = std::time::Duration::from_secs(5 * 60);
/// Longest leaf lifetime: leaves are not revocable, so they stay short-lived.
pub const MAX_LEAF_TTL: std::time::Duration = std::time::Duration::from_secs(90 * 86_400);

/// What policy may read from the node besides `policyDir`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PolicyOptions {
    /// The only directories DestinationRule `caCertificates`, `clientCertificate` and
    /// `privateKey` files may be in. Whoever writes policy picks those paths and the agent
    /// reads them as root, so none are allowed unless listed here.
    pub cert_dirs: Vec<PathBuf>,
}

/// Knobs with safe defaults; the benchmark decides the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Tuning {
    /// The agent's outbound listener port inside each pod netns (loopback only).
    pub outbound_port: u16,
    /// The agent's inbound listener port inside each pod netns (loopback; sk_lookup feeds it).
    pub inbound_port: u16,
    pub handshake_timeout_ms: u64,
    /// How long inbound waits for a first byte before treating a silent client as plaintext
    /// (server-speaks-first protocols). Mesh clients always speak first, so never pay it.
    pub first_byte_wait_ms: u64,
    /// A flow (mTLS or plaintext passthrough) with no byte in either direction for this long
    /// is reset.
    pub idle_timeout_secs: u64,
    /// Flows the agent holds at once for one pod: as a client (its outbound connections),
    /// and as a server per source address. Beyond it new connections are reset and counted
    /// (`refused.pod_connection_limit`), so one pod cannot use up the agent's descriptors.
    pub max_connections_per_pod: u32,
    /// Of those, how many may be in set-up (classification, handshake, dial) at once
    /// (`refused.pod_handshake_limit`): set-up is where a stalled peer costs the agent.
    pub max_pending_handshakes_per_pod: u32,
    /// sk_msg short-circuit of the plain app↔agent leg (Merbridge-style). Off by default: the
    /// benchmark shows no gain over loopback TCP, and each leg falls back to TCP after
    /// `SKMSG_LEG_BUDGET` bytes anyway (ARCHITECTURE.md explains why).
    pub sk_msg_local_leg: bool,
    /// How often the agent looks for changes in `policyDir` (and the certificate files its
    /// DestinationRules name).
    pub policy_poll_ms: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            handshake_timeout_ms: 5_000,
            first_byte_wait_ms: 200,
            idle_timeout_secs: 3_600,
            max_connections_per_pod: 4_096,
            max_pending_handshakes_per_pod: 512,
            sk_msg_local_leg: false,
            policy_poll_ms: 500,
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/interceptor")
}
fn default_admin_socket() -> PathBuf {
    PathBuf::from("/run/interceptor/admin.sock")
}
fn default_bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/interceptor")
}
fn default_root_namespace() -> String {
    "istio-system".to_owned()
}
fn default_cluster_domain() -> String {
    "cluster.local".to_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

impl Config {
    /// Parses and validates `text`; `file` names the source in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: Config = yaml_serde::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            file: file.to_owned(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let labelled: Vec<(String, &Workload)> = self
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("workloads[{i}]"), w))
            .collect();
        let mut ips = std::collections::HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            for ip in &w.ips {
                ips.insert(ip.to_canonical(), format!("workloads[{i}]"));
            }
        }
        for (i, p) in self.peers.iter().enumerate() {
            for ip in &p.ips {
                if let Some(prev) = ips.insert(ip.to_canonical(), format!("peers[{i}]")) {
                    return Err(format!("peers[{i}].ips: {ip} is also used by {prev}"));
                }
            }
        }
        for (i, alias) in self.trust_domain_aliases.iter().enumerate() {
            alias
                .parse::<TrustDomain>()
                .map_err(|e| format!("trustDomainAliases[{i}]: `{alias}`: {e}"))?;
        }
        if self.root_namespace.is_empty() {
            return Err("rootNamespace: must not be empty".to_owned());
        }
        if self.cluster_domain.is_empty() || self.cluster_domain.starts_with('.') {
            return Err(format!(
                "clusterDomain: `{}` is not a DNS suffix",
                self.cluster_domain
            ));
        }
        let mut vips = std::collections::HashMap::new();
        for (i, s) in self.services.iter().enumerate() {
            if s.name.is_empty() || s.namespace.is_empty() {
                return Err(format!(
                    "services[{i}]: name and namespace must not be empty"
                ));
            }
            if s.ports.is_empty() {
                return Err(format!("services[{i}].ports: a service needs a port"));
            }
            for (j, p) in s.ports.iter().enumerate() {
                if p.port == 0 || p.target() == 0 {
                    return Err(format!("services[{i}].ports[{j}]: ports must be non-zero"));
                }
                let Some(vip) = s.vip else { continue };
                if let Some(prev) = vips.insert((vip, p.port), format!("services[{i}]")) {
                    return Err(format!(
                        "services[{i}].ports[{j}]: {vip}:{} is also a port of {prev}",
                        p.port
                    ));
                }
            }
            if let Some(vip) = s.vip
                && let Some(owner) = ips.get(&vip.to_canonical())
            {
                return Err(format!(
                    "services[{i}].vip: {vip} is the address of {owner}, not a virtual IP"
                ));
            }
        }
        check_workloads(&self.trust_domain, &labelled, &self.peers, &self.services)?;
        for (i, d) in self.policy.cert_dirs.iter().enumerate() {
            check_relative(d, &format!("policy.certDirs[{i}]"))?;
        }
        let t = &self.tuning;
        if t.outbound_port == 0 || t.inbound_port == 0 || t.outbound_port == t.inbound_port {
            return Err(
                "tuning: outboundPort and inboundPort must be distinct and non-zero".to_owned(),
            );
        }
        if t.policy_poll_ms == 0 {
            return Err("tuning.policyPollMs: must be at least 1".to_owned());
        }
        if t.idle_timeout_secs == 0 {
            return Err("tuning.idleTimeoutSecs: must be at least 1".to_owned());
        }
        if t.max_connections_per_pod == 0 || t.max_pending_handshakes_per_pod == 0 {
            return Err(
                "tuning: maxConnectionsPerPod and maxPendingHandshakesPerPod must be at least 1"
                    .to_owned(),
            );
        }
        let id = &self.identity;
        if id.leaf_ttl.0 < MIN_LEAF_TTL || id.leaf_ttl.0 > MAX_LEAF_TTL {
            return Err(format!(
                "identity.leafTtl: {} is outside {} to {}",
                id.leaf_ttl,
                Ttl(MIN_LEAF_TTL),
                Ttl(MAX_LEAF_TTL)
            ));
        }
        if !(10..=90).contains(&id.renew_percent) {
            return Err(format!(
                "identity.renewPercent: {} is outside 10 to 90",
                id.renew_percent
            ));
        }
        if id.ca_poll_ms == 0 {
            return Err("identity.caPollMs: must be at least 1".to_owned());
        }
        Ok(())
    }

    /// The mesh settings policy decisions need.
    pub fn policy_settings(&self) -> policy::Settings {
        policy::Settings {
            root_namespace: self.root_namespace.clone(),
            trust_domain: self.trust_domain.clone(),
            // Validated in `parse`; a config built in code with a bad alias just loses it.
            trust_domain_aliases: self
                .trust_domain_aliases
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
            cluster_domain: self.cluster_domain.clone(),
            probe_sources: self.probe_sources.clone(),
        }
    }

    /// Every mesh workload known to this node (enrolled here or listed as a peer), as
    /// `(ip, namespace, service account)`.
    pub fn mesh_addresses(&self) -> impl Iterator<Item = (IpAddr, &str, &str)> {
        let local = self.workloads.iter().flat_map(|w| {
            w.ips
                .iter()
                .map(move |ip| (*ip, w.namespace.as_str(), w.service_account.as_str()))
        });
        let remote = self.peers.iter().flat_map(|p| {
            p.ips
                .iter()
                .map(move |ip| (*ip, p.namespace.as_str(), p.service_account.as_str()))
        });
        local.chain(remote)
    }
}

/// The one validation of a set of pods enrolled on this node, for the `workloads:` of the
/// config and for `interceptor enroll` alike (the agent checks the enrolled pods plus the new
/// one): `label` names each entry in errors (`workloads[2]`, or `workload `name``).
///
/// Two pods sharing an address would share the kernel's per-address entries (inbound slot,
/// steering), so unenrolling one would stop protecting the other; two sharing a cgroup would
/// share its programs. Loopback, unspecified and multicast addresses are never a pod's.
pub fn check_workloads(
    trust_domain: &TrustDomain,
    workloads: &[(String, &Workload)],
    peers: &[Peer],
    services: &[Service],
) -> Result<(), String> {
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut cgroups: HashMap<&Path, &str> = HashMap::new();
    let mut netns: HashMap<&Path, &str> = HashMap::new();
    let mut ips: HashMap<IpAddr, String> = HashMap::new();
    for (i, p) in peers.iter().enumerate() {
        for ip in &p.ips {
            ips.insert(ip.to_canonical(), format!("peers[{i}]"));
        }
    }
    let vips: HashMap<IpAddr, &str> = services
        .iter()
        .filter_map(|s| Some((s.vip?.to_canonical(), s.name.as_str())))
        .collect();
    for (label, w) in workloads {
        if w.name.is_empty() {
            return Err(format!("{label}.name: must not be empty"));
        }
        if let Some(prev) = names.insert(&w.name, label) {
            return Err(format!(
                "{label}.name: `{}` is already enrolled as {prev}",
                w.name
            ));
        }
        crate::identity::SpiffeId::new(trust_domain.clone(), &w.namespace, &w.service_account)
            .map_err(|e| format!("{label}: {e}"))?;
        check_relative(&w.cgroup, &format!("{label}.cgroup"))?;
        check_relative(&w.netns, &format!("{label}.netns"))?;
        if let Some(prev) = cgroups.insert(&w.cgroup, label) {
            return Err(format!(
                "{label}.cgroup: {} is also the cgroup of {prev}",
                w.cgroup.display()
            ));
        }
        if let Some(prev) = netns.insert(&w.netns, label) {
            return Err(format!(
                "{label}.netns: {} is also the network namespace of {prev}",
                w.netns.display()
            ));
        }
        if w.ips.is_empty() {
            return Err(format!(
                "{label}.ips: a workload needs at least one address"
            ));
        }
        for ip in &w.ips {
            let ip = ip.to_canonical();
            if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
                return Err(format!("{label}.ips: {ip} cannot be a pod's address"));
            }
            if let Some(service) = vips.get(&ip) {
                return Err(format!(
                    "{label}.ips: {ip} is the virtual IP of service {service}"
                ));
            }
            if let Some(prev) = ips.insert(ip, label.clone()) {
                return Err(format!("{label}.ips: {ip} is also used by {prev}"));
            }
        }
    }
    Ok(())
}

/// What policy decisions know about workloads and services: `workloads` (enrolled on this
/// node) and `peers` are mesh workloads; a service endpoint that is neither is a workload
/// outside the mesh, in the service's namespace with the `default` service account.
pub fn policy_inventory(
    workloads: &[Workload],
    peers: &[Peer],
    services: &[Service],
) -> policy::Inventory {
    let mut inventory = policy::Inventory::default();
    let mut known = std::collections::HashSet::new();
    for w in workloads {
        known.extend(w.ips.iter().map(|ip| ip.to_canonical()));
        inventory.workloads.push(policy::Workload {
            name: Some(w.name.clone()),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            labels: w.labels.clone(),
            ips: w.ips.clone(),
            mesh: true,
        });
    }
    for p in peers {
        known.extend(p.ips.iter().map(|ip| ip.to_canonical()));
        inventory.workloads.push(policy::Workload {
            name: None,
            namespace: p.namespace.clone(),
            service_account: p.service_account.clone(),
            labels: p.labels.clone(),
            ips: p.ips.clone(),
            mesh: true,
        });
    }
    for s in services {
        for ip in &s.endpoints {
            if known.insert(ip.to_canonical()) {
                inventory.workloads.push(policy::Workload {
                    name: Some(format!("{} endpoint {ip}", s.name)),
                    namespace: s.namespace.clone(),
                    service_account: "default".to_owned(),
                    labels: Default::default(),
                    ips: vec![*ip],
                    mesh: false,
                });
            }
        }
        inventory.services.push(policy::Service {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            vip: s.vip,
            ports: s
                .ports
                .iter()
                .map(|p| policy::ServicePort {
                    name: p.name.clone(),
                    port: p.port,
                    target_port: Some(p.target()),
                })
                .collect(),
            endpoints: s.endpoints.clone(),
        });
    }
    inventory
}

fn check_relative(p: &Path, field: &str) -> Result<(), String> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "{field}: `{}` must be an absolute path",
            p.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
trustDomain: cluster.local
caDir: /var/lib/interceptor/ca
stateDir: /var/lib/interceptor
adminSocket: /run/interceptor/admin.sock
ktls: auto
workloads:
  - name: sleep-full
    namespace: full
    serviceAccount: sleep
    labels: {app: sleep}
    cgroup: /sys/fs/cgroup/pods/sleep-full
    netns: /run/netns/sleep-full
    ips: [10.88.0.2, fd00:88::2]
peers:
  - {namespace: bar, serviceAccount: httpbin, ips: [10.88.1.3]}
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse("node.yaml", EXAMPLE).unwrap();
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.ktls, KtlsMode::Auto);
        assert_eq!(c.workloads[0].ips.len(), 2);
        assert_eq!(c.workloads[0].labels["app"], "sleep");
        assert_eq!(c.peers[0].service_account, "httpbin");
        assert_eq!(c.mesh_addresses().count(), 3);
        assert_eq!(c.tuning, Tuning::default());
        assert_eq!(c.root_namespace, "istio-system");
    }

    /// The README's knob block states the defaults: it must parse, and say exactly them.
    #[test]
    fn readme_knobs_are_the_defaults() {
        let readme = include_str!("../../README.md");
        let block = readme
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .find(|b| b.contains("tuning:"))
            .expect("README has a yaml block with `tuning:`");
        let text = format!("trustDomain: cluster.local\ncaDir: /ca\n{block}");
        let c = Config::parse("README.md", &text).unwrap();
        assert_eq!(c.tuning, Tuning::default());
        assert_eq!(c.bpffs, default_bpffs());
        assert_eq!(c.crypto, CryptoPolicy::default());
        let block = readme
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .find(|b| b.contains("identity:"))
            .expect("README has a yaml block with `identity:`");
        let text = format!("trustDomain: cluster.local\ncaDir: /ca\n{block}");
        let c = Config::parse("README.md", &text).unwrap();
        assert_eq!(c.identity, IdentitySettings::default());
    }

    #[test]
    fn unknown_fields_are_errors_naming_the_field() {
        let bad = EXAMPLE.replace("ktls: auto", "ktls: auto\nktlss: on");
        let e = Config::parse("node.yaml", &bad).unwrap_err().to_string();
        assert!(e.contains("node.yaml") && e.contains("ktlss"), "{e}");
        let bad = EXAMPLE.replace(
            "serviceAccount: sleep",
            "serviceAccount: sleep\n    serviceAcount: x",
        );
        let e = Config::parse("node.yaml", &bad).unwrap_err().to_string();
        assert!(e.contains("serviceAcount"), "{e}");
    }

    #[test]
    fn the_shipped_deploy_config_parses() {
        let cm: yaml_serde::Value =
            yaml_serde::from_str(include_str!("../../deploy/base/configmap.yaml")).unwrap();
        let node = cm["data"]["node.yaml"].as_str().unwrap();
        Config::parse("deploy/base/configmap.yaml", node).unwrap();
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::parse("n", &EXAMPLE.replace("ktls: auto", "ktls: maybe"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("maybe"), "{e}");
        let e = Config::parse("n", &EXAMPLE.replace("10.88.1.3", "10.88.0.2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("peers[0].ips") && e.contains("10.88.0.2"), "{e}");
        let e = Config::parse(
            "n",
            &EXAMPLE.replace("trustDomain: cluster.local", "trustDomain: Bad Domain"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("trust"), "{e}");
        let e = Config::parse(
            "n",
            &EXAMPLE.replace("netns: /run/netns/sleep-full", "netns: sleep-full"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("workloads[0].netns"), "{e}");
    }

    /// The validation `interceptor enroll` shares with `workloads:`: a conflict names both
    /// pods and what they share.
    #[test]
    fn one_workload_validation_for_config_and_runtime_enroll() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        let td = c.trust_domain.clone();
        let first = c.workloads[0].clone();
        let check = |new: &Workload| {
            let all = [
                ("workload `sleep-full`".to_owned(), &first),
                (format!("workload `{}`", new.name), new),
            ];
            check_workloads(&td, &all, &c.peers, &c.services)
        };
        let fresh = Workload {
            name: "other".to_owned(),
            cgroup: "/sys/fs/cgroup/pods/other".into(),
            netns: "/run/netns/other".into(),
            ips: vec!["10.88.0.9".parse().unwrap()],
            ..first.clone()
        };
        check(&fresh).unwrap();
        type Edit = Box<dyn Fn(&mut Workload)>;
        let cases: [(&str, Edit); 9] = [
            (
                "10.88.0.2 is also used by workload `sleep-full`",
                Box::new(|w| w.ips = vec!["10.88.0.2".parse().unwrap()]),
            ),
            (
                // The same address, IPv4-mapped: the kernel maps key it the same way.
                "10.88.0.2 is also used by workload `sleep-full`",
                Box::new(|w| w.ips = vec!["::ffff:10.88.0.2".parse().unwrap()]),
            ),
            (
                "10.88.1.3 is also used by peers[0]",
                Box::new(|w| w.ips = vec!["10.88.1.3".parse().unwrap()]),
            ),
            ("at least one address", Box::new(|w| w.ips.clear())),
            (
                "127.0.0.1 cannot be a pod's address",
                Box::new(|w| w.ips = vec!["127.0.0.1".parse().unwrap()]),
            ),
            (
                "`sleep-full` is already enrolled",
                Box::new(|w| w.name = "sleep-full".to_owned()),
            ),
            (
                "is also the cgroup of workload `sleep-full`",
                Box::new(|w| w.cgroup = "/sys/fs/cgroup/pods/sleep-full".into()),
            ),
            (
                "is also the network namespace",
                Box::new(|w| w.netns = "/run/netns/sleep-full".into()),
            ),
            (
                "namespace",
                Box::new(|w| w.namespace = "Not A Label".into()),
            ),
        ];
        for (want, change) in cases {
            let mut w = fresh.clone();
            change(&mut w);
            let e = check(&w).unwrap_err();
            assert!(
                e.contains(want) && e.starts_with("workload `"),
                "{want}: {e}"
            );
        }
        // The config path gives the same answers, naming entries by index.
        let twice = EXAMPLE.replace(
            "peers:",
            "  - {name: b, namespace: full, serviceAccount: s, cgroup: /c, netns: /n, \
             ips: [10.88.0.2]}\npeers:",
        );
        let e = Config::parse("n", &twice).unwrap_err().to_string();
        assert!(
            e.contains("workloads[1].ips: 10.88.0.2 is also used by workloads[0]"),
            "{e}"
        );
    }

    #[test]
    fn crypto_policy_parses_with_istios_names() {
        use crate::handshake::CompliancePolicy;
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert_eq!(
            c.crypto,
            CryptoPolicy::default(),
            "absent: the default policy"
        );
        assert_eq!(c.crypto.compliance_policy, CompliancePolicy::Default);
        assert!(!c.crypto.require_aes256_gcm);
        for (name, want) in [
            ("default", CompliancePolicy::Default),
            ("pqc", CompliancePolicy::Pqc),
            ("fips-140-2", CompliancePolicy::Fips1402),
        ] {
            let text = format!("{EXAMPLE}crypto:\n  compliancePolicy: {name}\n");
            let c = Config::parse("n", &text).unwrap();
            assert_eq!(c.crypto.compliance_policy, want);
            assert_eq!(want.name(), name);
        }
        let text = format!("{EXAMPLE}crypto: {{compliancePolicy: pqc, requireAes256Gcm: true}}\n");
        let c = Config::parse("n", &text).unwrap();
        assert!(c.crypto.require_aes256_gcm);
        // A misspelt value or field is refused, naming it.
        for (bad, named) in [
            ("crypto: {compliancePolicy: fips}", "fips"),
            ("crypto: {compliancePolicy: PQC}", "PQC"),
            ("crypto: {requireAes256: true}", "requireAes256"),
        ] {
            let e = Config::parse("n", &format!("{EXAMPLE}{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{bad}: {e}");
        }
    }

    const POLICY: &str = r#"
rootNamespace: mesh-root
policyDir: /etc/interceptor/policies
probeSources: [10.88.0.1]
trustDomainAliases: [old.example]
clusterDomain: corp.local
services:
  - name: httpbin
    namespace: partial
    vip: 10.96.0.20
    ports: [{name: http, port: 8000, targetPort: 80}]
    endpoints: [10.88.0.2, 10.88.0.8]
  - name: mongo
    namespace: mongo
    ports: [{port: 27017}]
    endpoints: [10.88.5.10]
tuning:
  firstByteWaitMs: 100
"#;

    #[test]
    fn policy_inputs_parse_and_become_settings_and_inventory() {
        let c = Config::parse("node.yaml", &format!("{EXAMPLE}{POLICY}")).unwrap();
        assert_eq!(c.tuning.first_byte_wait_ms, 100);
        assert_eq!(
            c.tuning.policy_poll_ms, 500,
            "other tuning keeps its defaults"
        );
        for (knob, zero) in [
            ("maxConnectionsPerPod", "maxConnectionsPerPod: 0"),
            (
                "maxPendingHandshakesPerPod",
                "maxPendingHandshakesPerPod: 0",
            ),
            ("idleTimeoutSecs", "idleTimeoutSecs: 0"),
        ] {
            let text = format!("{EXAMPLE}{POLICY}  {zero}\n");
            let e = Config::parse("node.yaml", &text).unwrap_err().to_string();
            assert!(e.contains(knob), "{e}");
        }
        let settings = c.policy_settings();
        assert_eq!(settings.root_namespace, "mesh-root");
        assert_eq!(settings.cluster_domain, "corp.local");
        assert_eq!(settings.trust_domain_aliases[0].as_str(), "old.example");
        assert_eq!(
            settings.probe_sources,
            ["10.88.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.services[1].vip, None);
        assert_eq!(c.services[1].ports[0].target(), 27017);

        let inv = policy_inventory(&c.workloads, &c.peers, &c.services);
        let mesh = |ip: &str| {
            let ip: IpAddr = ip.parse().unwrap();
            inv.workloads
                .iter()
                .find(|w| w.ips.contains(&ip))
                .map(|w| (w.mesh, w.namespace.clone()))
        };
        // 10.88.0.2 is the enrolled sleep-full; 10.88.0.8 and the database are not enrolled.
        assert_eq!(mesh("10.88.0.2"), Some((true, "full".to_owned())));
        assert_eq!(mesh("10.88.1.3"), Some((true, "bar".to_owned())));
        assert_eq!(mesh("10.88.0.8"), Some((false, "partial".to_owned())));
        assert_eq!(mesh("10.88.5.10"), Some((false, "mongo".to_owned())));
        assert_eq!(inv.services.len(), 2);
        assert_eq!(inv.services[0].ports[0].target(), 80);
    }

    #[test]
    fn bad_policy_inputs_are_named() {
        let cases = [
            ("old.example", "Bad Alias", "trustDomainAliases[0]"),
            ("vip: 10.96.0.20", "vip: 10.88.0.2", "services[0].vip"),
            ("{port: 27017}", "{port: 0}", "services[1].ports[0]"),
            (
                "clusterDomain: corp.local",
                "clusterDomain: .x",
                "clusterDomain",
            ),
            ("firstByteWaitMs: 100", "policyPollMs: 0", "policyPollMs"),
            ("vip: 10.96.0.20", "vip: 10.96.0.20\n    vipp: 1", "vipp"),
        ];
        for (from, to, field) in cases {
            let text = format!("{EXAMPLE}{POLICY}").replace(from, to);
            let e = Config::parse("n", &text).unwrap_err().to_string();
            assert!(e.contains(field), "{to}: {e}");
        }
        let twice = format!("{EXAMPLE}{POLICY}")
            .replace(
                "name: mongo\n    namespace: mongo\n",
                "name: mongo\n    namespace: mongo\n    vip: 10.96.0.20\n",
            )
            .replace("{port: 27017}", "{port: 8000}");
        let e = Config::parse("n", &twice).unwrap_err().to_string();
        assert!(e.contains("10.96.0.20:8000"), "{e}");
    }

    #[test]
    fn identity_knobs_parse_with_bounds() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert_eq!(c.identity, IdentitySettings::default());
        assert_eq!(
            c.identity.leaf_ttl.0,
            std::time::Duration::from_secs(86_400)
        );
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}identity:\n{yaml}"));
        let c = with("  leafTtl: 1h30m\n  renewPercent: 60\n").unwrap();
        assert_eq!(c.identity.leaf_ttl.0.as_secs(), 5_400);
        assert_eq!(c.identity.leaf_ttl.to_string(), "1h30m");
        assert_eq!(c.identity.renew_percent, 60);
        for (yaml, field) in [
            (
                "  leafTtl: 4m\n",
                "identity.leafTtl: 4m is outside 5m to 90d",
            ),
            ("  leafTtl: 91d\n", "identity.leafTtl"),
            ("  leafTtl: 24\n", "`24` is not a duration"),
            ("  leafTtl: 1x\n", "`1x` is not a duration"),
            ("  leafTtl: h\n", "`h` is not a duration"),
            (
                "  renewPercent: 95\n",
                "identity.renewPercent: 95 is outside 10 to 90",
            ),
            ("  caPollMs: 0\n", "identity.caPollMs"),
            ("  leafTTL: 1h\n", "leafTTL"),
        ] {
            let e = with(yaml).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }
}
