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
    /// The pod's cgroup v2 directory. Left out (empty) when the agent enrolls pods by network
    /// namespace (`cni:`): the programs then run from the parent cgroup for every pod.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub cgroup: PathBuf,
    /// The pod's network namespace (a bind mount such as /run/netns/<name>).
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

impl Workload {
    /// The pod's own cgroup, when it is enrolled by cgroup.
    pub fn own_cgroup(&self) -> Option<&Path> {
        (!path_is_empty(&self.cgroup)).then_some(self.cgroup.as_path())
    }
}

#[allow(clippy::ptr_arg)] // serde's `skip_serializing_if` passes the field as it is
fn path_is_empty(p: &PathBuf) -> bool {
    p.as_os_str().is_empty()
}

/// `cni:` of the node config: pods are enrolled by network namespace (ARCHITECTURE.md,
/// "Enrollment keying"), by the CNI plugin, and named by a pod directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CniSettings {
    /// Where the outbound programs are attached, once: a cgroup holding every pod cgroup
    /// (kubelet's `kubepods`). The cgroup2 root when left out.
    #[serde(default)]
    pub parent_cgroup: Option<PathBuf>,
    /// Which namespaces are in the mesh, written for the CNI plugin to read while the agent
    /// is unreachable.
    #[serde(default = "default_membership_file")]
    pub membership_file: PathBuf,
    /// How long an enrollment waits for the directory to know the pod.
    #[serde(default = "default_lookup_timeout_ms")]
    pub lookup_timeout_ms: u64,
    /// The static pod directory (hosts without an API server): namespace → its labels;
    /// `interceptor.io/mtls: enabled` puts the namespace in the mesh.
    #[serde(default)]
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The static pod directory: who each pod is.
    #[serde(default)]
    pub pods: Vec<StaticPod>,
}

fn default_membership_file() -> PathBuf {
    PathBuf::from("/run/interceptor/cni-membership.json")
}
fn default_lookup_timeout_ms() -> u64 {
    10_000
}

/// A pod of the static directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticPod {
    pub namespace: String,
    pub name: String,
    /// When given, only a pod with this UID matches.
    #[serde(default)]
    pub uid: String,
    pub service_account: String,
    /// `interceptor.io/mtls: disabled` opts the pod out of an enabled namespace.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
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
    /// Netns-keyed enrollment by the CNI plugin; absent: pods are enrolled by cgroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<CniSettings>,
    /// Kubernetes mode: pods, namespaces, services and Istio policy come from the API server
    /// (added to whatever the file/static fields above say).
    #[serde(default)]
    pub kubernetes: Option<KubernetesSettings>,
    /// Metrics, health and debug HTTP listener, and the access log.
    #[serde(default)]
    pub observability: Observability,
}

/// `observability:` of the node config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Observability {
    /// Where `/metrics`, `/healthz`, `/readyz` and `/debug/*` are served, in the node's network
    /// namespace (pods have their own, so a pod's loopback is not this one); `null` turns the
    /// listener off. Port 0 picks a free port (tests).
    pub listen: Option<std::net::SocketAddr>,
    pub access_log: AccessLog,
}

impl Default for Observability {
    fn default() -> Self {
        Self {
            listen: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 15020))),
            access_log: AccessLog::default(),
        }
    }
}

/// `observability.accessLog`: one line per connection at close (and per refusal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AccessLog {
    pub enabled: bool,
    pub format: AccessLogFormat,
    /// Share of connections logged, in percent (the metrics count all of them).
    pub sample_percent: u8,
    /// At most this many lines per second; the rest are counted
    /// (`interceptor_access_log_dropped_total`). 0: no limit.
    pub max_per_second: u32,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            enabled: true,
            format: AccessLogFormat::Logfmt,
            sample_percent: 100,
            max_per_second: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    Json,
    #[default]
    Logfmt,
}

/// `kubernetes:` of the node config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesSettings {
    /// A kubeconfig file (development); absent: the pod's service account (in-cluster).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The node this agent runs on (`spec.nodeName` of its pods); absent: the `NODE_NAME`
    /// environment variable, which a DaemonSet sets from the downward API.
    #[serde(default)]
    pub node_name: Option<String>,
    /// The label key of enablement: namespaces with `<meshLabel>: enabled` are in the mesh,
    /// a pod with `<meshLabel>: disabled` opts out.
    #[serde(default = "default_mesh_label")]
    pub mesh_label: String,
}

impl KubernetesSettings {
    /// The node name from the config or, failing that, from `env` (the value of `NODE_NAME`).
    pub fn node(&self, env: Option<String>) -> Result<String, String> {
        self.node_name
            .clone()
            .or(env)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                "kubernetes.nodeName: not set, and NODE_NAME is not in the environment".to_owned()
            })
    }
}

fn default_mesh_label() -> String {
    "interceptor.io/mtls".to_owned()
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

/// Longest resumption ticket lifetime: tickets skip the certificate checks, so they stay
/// short next to leaves (hours).
pub const MAX_TICKET_LIFETIME_SECS: u64 = 3_600;
/// `tuning.derivedRootLifetimeSecs` by default: two minutes of traffic per stolen root at
/// most, against one handshake per two minutes per (client identity, server address).
pub const DEFAULT_DERIVED_ROOT_LIFETIME_SECS: u64 = 120;
/// The longest `tuning.derivedRootLifetimeSecs` allowed (as a ticket's).
pub const MAX_DERIVED_ROOT_LIFETIME_SECS: u64 = 3_600;
/// `tuning.derivedRootMaxConnections` by default: one handshake per 1 000 connections costs
/// well under 1 % of their set-up (bench/README.md "Bounded roots").
pub const DEFAULT_DERIVED_ROOT_MAX_CONNECTIONS: u64 = 1_000;
/// The most `tuning.derivedRootMaxConnections` allowed.
pub const MAX_DERIVED_ROOT_MAX_CONNECTIONS: u64 = 1_000_000;

/// Spares per (pod, server identity, endpoint): each is an open connection on both agents and
/// a pending set-up on the server's, so a handful covers bursts without turning into a pool.
pub const MAX_MESH_SPARES: u32 = 16;

/// A spare is a session nobody uses yet: it should not outlive a short pause in traffic.
pub const MAX_SPARE_IDLE_MS: u64 = 60_000;

/// More runtime workers than any node has cores is a typo, not a setting.
pub const MAX_WORKER_THREADS: u16 = 1_024;
/// `tuning.schedSliceUs`: the range the kernel accepts for a fair task's slice (0.1–100 ms).
pub const SCHED_SLICE_US: std::ops::RangeInclusive<u32> = 100..=100_000;
/// `tuning.relayBusyPollUs`: the longest a relay may spin for a reply. A cross-node round trip
/// is ~50-150 µs on the nodes measured (bench/README.md "Round trip: bounded busy polling"):
/// a wait longer than a millisecond is not a round trip being caught, it is a core burnt.
pub const MAX_RELAY_BUSY_POLL_US: u32 = 1_000;

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
    /// TCP Fast Open on the agent-to-agent leg: a mesh connection's ClientHello rides in its
    /// SYN once the client pod holds the server pod's cookie (its first connection there
    /// fetches one), saving a round trip and leaving the server's agent nothing to wait for
    /// before it classifies the connection. On: the agent sets the server bit of
    /// `net.ipv4.tcp_fastopen` in each pod it enrolls and the option on its inbound listeners
    /// only (ARCHITECTURE.md "TCP Fast Open between agents"). Off, or where a pod's kernel
    /// refuses it: ordinary connects.
    pub tcp_fast_open: bool,
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
    /// TLS 1.3 session resumption between agents: a workload's next connection to the same
    /// server address skips certificates and signatures (still a fresh key exchange, still
    /// one TLS session per connection). Off: every connection is a full handshake.
    pub session_resumption: bool,
    /// How long a resumption ticket stays usable, on both ends; no ticket outlives a policy
    /// reload or a new certificate either.
    pub ticket_lifetime_secs: u64,
    /// How a mesh connection gets its keys. `derived` (the default): after one handshake to a
    /// server address, the next connections there open with a 44-byte header and keys
    /// expanded from a secret (a root) that handshake exported, for at most
    /// `derivedRootLifetimeSecs` and `derivedRootMaxConnections` and while the policy
    /// generation holds: no key exchange and no handshake round trip, one TLS record stream
    /// (own keys, kTLS-installable) per connection still, but the secrecy of `psk_ke`, i.e. of
    /// a pooled proxy: whoever learns a root from either agent's memory can read every
    /// connection derived from it, which is why a root is short-lived and capped
    /// (ARCHITECTURE.md "Derived connection keys"). `handshake`: a TLS handshake per
    /// connection (resumed where a ticket allows), forward secrecy per connection.
    pub connection_keys: ConnectionKeysMode,
    /// The longest a root of derived connection keys is used, from the handshake that made
    /// it, on both ends (`connectionKeys: derived`); then the next connection makes a new one
    /// with a handshake and the old root is erased. Bounds how long one stolen root reads
    /// traffic.
    pub derived_root_lifetime_secs: u64,
    /// The most connections derived from one root (counters 1 to this, on both ends); the
    /// next one makes a new root with a handshake. Bounds how many connections one stolen
    /// root reads.
    pub derived_root_max_connections: u64,
    /// Spare mesh sessions a pod keeps ready per (server identity, endpoint) it has called
    /// within `spareIdleMs`: opened ahead, so an app connection there waits for no agent
    /// handshake (still one TLS session per app connection; the server's agent decides the
    /// flow when a spare is claimed). 0, the default, opens none. Agents always accept them.
    pub mesh_spares: u32,
    /// How long a spare waits to be claimed (the client's agent closes it then, and stops
    /// refilling a (server, endpoint) no connection went to for this long); the server's
    /// agent closes an unclaimed one after this plus `handshakeTimeoutMs`.
    pub spare_idle_ms: u64,
    /// Same-node fast path: a mesh flow whose destination is a pod this agent enrolled is
    /// decided with both pods' identities (which pod each socket belongs to is the kernel's
    /// word, not a certificate's) and relayed between the two pods' loopback legs, with no
    /// TLS and no leg on the pods' links. Off: such flows run mesh mTLS like any other, for a
    /// rule that demands encryption even between two pods of one node.
    pub same_node_fast_path: bool,
    /// How the fast path joins its two loopback legs: `splice` (the agent moves the bytes
    /// through a pipe, waking for each burst) or `skMsg` (an sk_msg program sends what each
    /// app writes straight out of the agent's other leg, inside the app's `sendmsg`, once the
    /// agent has relayed everything sent before and while that leg has room; otherwise the
    /// splice relay carries it). `skMsg` gives every app socket that talks to the agent a
    /// kernel psock, so all of them pay the sk_msg send path (ARCHITECTURE.md "Same-node fast
    /// path").
    pub same_node_join: SameNodeJoin,
    /// The app leg of a mesh flow relayed in userspace (no kTLS): `tcp` (loopback TCP, as
    /// any socket pair) or `skMsg` (an sk_msg program puts what the app sends straight into
    /// the receive queue of the agent's end, inside the app's `sendmsg`, within a window the
    /// agent grants ahead of what it has read; beyond it, or before the agent armed the flow,
    /// TCP). Like `sameNodeJoin: skMsg`, `skMsg` gives every app socket that talks to the
    /// agent a kernel psock, so all of them take the sk_msg send path (ARCHITECTURE.md
    /// "The userspace relay's app leg"). `tcp` by default: the round trip gained less than
    /// the benchmark's noise, and bulk senders lost.
    pub relay_app_leg: RelayAppLeg,
    /// Threads that run flows (the async runtime's workers). 0, the default: one per CPU the
    /// agent may run on. Fewer keeps each flow's wake-ups on fewer threads: on a node whose
    /// agent shares few cores with busy pods, 1 set up connections with less CPU each in the
    /// benchmark (bench/README.md "Runtime shape"), at the price of one core for all relaying.
    pub worker_threads: u16,
    /// How flows are spread over those threads: `shared` (one multi-threaded runtime: a
    /// flow's readiness may be seen by one worker and its task run, or stolen, by another)
    /// or `perThread` (one single-threaded runtime per thread; each accepted connection is
    /// handed to one of them and stays there, so its wake-ups, its task and its sockets'
    /// readiness are one thread's), or `perCpu` (as `perThread`, one runtime per CPU the
    /// agent may run on, each thread pinned to its CPU, and a connection handed to the
    /// runtime of the CPU its packets arrive on; `workerThreads` is not read).
    /// ARCHITECTURE.md "Runtime shape".
    pub runtime: RuntimeShape,
    /// The fair scheduler's slice for the threads that run flows, in microseconds (Linux
    /// ≥ 6.12, EEVDF's per-task `sched_runtime`; older kernels ignore it). 0, the default:
    /// the kernel's own. Measured on the 64-B round trip, where most of an agent's context
    /// switches are preemptions by the reader its own send woke (bench/README.md "Round
    /// trip: the scheduler's slice"); kept off because no value moved it beyond the noise.
    pub sched_slice_us: u32,
    /// After a userspace relay forwards a small message and both of its sockets are drained,
    /// it keeps polling them without blocking for up to this many microseconds before it
    /// waits in the reactor, so a reply a few hops away is picked up by a thread that is
    /// running instead of one that must be woken (bench/README.md "Round trip: bounded busy
    /// polling"). 0, the default: never spin. At most [`MAX_RELAY_BUSY_POLL_US`]. Flows that
    /// move more than a record per wake-up, or whose sockets are full, never spin.
    pub relay_busy_poll_us: u32,
}

impl Tuning {
    /// Whether app sockets that talk to the agent enter the sk_msg join program: for the
    /// same-node join (`sameNodeJoin: skMsg` with the fast path on), for the userspace
    /// relay's app leg (`relayAppLeg: skMsg`), or both (one program, two rules).
    pub fn joins_app_sockets(&self) -> bool {
        self.same_node_joins() || self.relay_app_leg == RelayAppLeg::SkMsg
    }

    /// The same-node fast path joins its legs with sk_msg.
    pub fn same_node_joins(&self) -> bool {
        self.same_node_fast_path && self.same_node_join == SameNodeJoin::SkMsg
    }

    /// How long a resumption ticket stays usable (both ends), and how long a client stops
    /// offering derived connections to a server whose agent refused a fresh root.
    pub fn ticket_lifetime(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ticket_lifetime_secs)
    }

    /// How long a root of derived connection keys stays usable, on both ends.
    pub fn derived_root_lifetime(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.derived_root_lifetime_secs)
    }
}

/// `tuning.connectionKeys`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConnectionKeysMode {
    Handshake,
    #[default]
    Derived,
}

/// `tuning.runtime`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RuntimeShape {
    #[default]
    Shared,
    PerThread,
    PerCpu,
}

/// `tuning.relayAppLeg`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RelayAppLeg {
    #[default]
    Tcp,
    SkMsg,
}

/// `tuning.sameNodeJoin`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SameNodeJoin {
    #[default]
    Splice,
    SkMsg,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            handshake_timeout_ms: 5_000,
            first_byte_wait_ms: 200,
            tcp_fast_open: true,
            idle_timeout_secs: 3_600,
            max_connections_per_pod: 4_096,
            max_pending_handshakes_per_pod: 512,
            sk_msg_local_leg: false,
            policy_poll_ms: 500,
            session_resumption: true,
            ticket_lifetime_secs: 300,
            connection_keys: ConnectionKeysMode::Derived,
            derived_root_lifetime_secs: DEFAULT_DERIVED_ROOT_LIFETIME_SECS,
            derived_root_max_connections: DEFAULT_DERIVED_ROOT_MAX_CONNECTIONS,
            mesh_spares: 0,
            spare_idle_ms: 5_000,
            same_node_fast_path: true,
            same_node_join: SameNodeJoin::Splice,
            relay_app_leg: RelayAppLeg::Tcp,
            worker_threads: 0,
            runtime: RuntimeShape::Shared,
            sched_slice_us: 0,
            relay_busy_poll_us: 0,
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
        for (label, w) in &labelled {
            check_cgroup_mode(label, w, self.cni.is_some())?;
        }
        if let Some(cni) = &self.cni {
            if let Some(p) = &cni.parent_cgroup {
                check_relative(p, "cni.parentCgroup")?;
            }
            check_relative(&cni.membership_file, "cni.membershipFile")?;
            if cni.lookup_timeout_ms == 0 {
                return Err("cni.lookupTimeoutMs: must be at least 1".to_owned());
            }
            let mut seen = std::collections::HashSet::new();
            for (i, p) in cni.pods.iter().enumerate() {
                if p.namespace.is_empty() || p.name.is_empty() {
                    return Err(format!(
                        "cni.pods[{i}]: namespace and name must not be empty"
                    ));
                }
                crate::identity::SpiffeId::new(
                    self.trust_domain.clone(),
                    &p.namespace,
                    &p.service_account,
                )
                .map_err(|e| format!("cni.pods[{i}]: {e}"))?;
                if !seen.insert((&p.namespace, &p.name)) {
                    return Err(format!(
                        "cni.pods[{i}]: {}/{} is listed twice",
                        p.namespace, p.name
                    ));
                }
            }
        }
        if let Some(k) = &self.kubernetes {
            if let Some(path) = &k.kubeconfig {
                check_relative(path, "kubernetes.kubeconfig")?;
            }
            if k.node_name.as_deref() == Some("") {
                return Err("kubernetes.nodeName: must not be empty".to_owned());
            }
            if k.mesh_label.is_empty() || k.mesh_label.contains(char::is_whitespace) {
                return Err(format!(
                    "kubernetes.meshLabel: `{}` is not a label key",
                    k.mesh_label
                ));
            }
        }
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
        if !(1..=MAX_TICKET_LIFETIME_SECS).contains(&t.ticket_lifetime_secs) {
            return Err(format!(
                "tuning.ticketLifetimeSecs: {} is outside 1 to {MAX_TICKET_LIFETIME_SECS}",
                t.ticket_lifetime_secs
            ));
        }
        if !(1..=MAX_DERIVED_ROOT_LIFETIME_SECS).contains(&t.derived_root_lifetime_secs) {
            return Err(format!(
                "tuning.derivedRootLifetimeSecs: {} is outside 1 to \
                 {MAX_DERIVED_ROOT_LIFETIME_SECS}",
                t.derived_root_lifetime_secs
            ));
        }
        if !(1..=MAX_DERIVED_ROOT_MAX_CONNECTIONS).contains(&t.derived_root_max_connections) {
            return Err(format!(
                "tuning.derivedRootMaxConnections: {} is outside 1 to \
                 {MAX_DERIVED_ROOT_MAX_CONNECTIONS}",
                t.derived_root_max_connections
            ));
        }
        if t.idle_timeout_secs == 0 {
            return Err("tuning.idleTimeoutSecs: must be at least 1".to_owned());
        }
        if t.mesh_spares > MAX_MESH_SPARES {
            return Err(format!(
                "tuning.meshSpares: {} is more than {MAX_MESH_SPARES}",
                t.mesh_spares
            ));
        }
        if !(100..=MAX_SPARE_IDLE_MS).contains(&t.spare_idle_ms) {
            return Err(format!(
                "tuning.spareIdleMs: {} is outside 100 to {MAX_SPARE_IDLE_MS}",
                t.spare_idle_ms
            ));
        }
        if t.worker_threads > MAX_WORKER_THREADS {
            return Err(format!(
                "tuning.workerThreads: {} is more than {MAX_WORKER_THREADS}",
                t.worker_threads
            ));
        }
        if t.sched_slice_us != 0 && !SCHED_SLICE_US.contains(&t.sched_slice_us) {
            return Err(format!(
                "tuning.schedSliceUs: {} is outside {} to {} (or 0, the kernel's own)",
                t.sched_slice_us,
                SCHED_SLICE_US.start(),
                SCHED_SLICE_US.end()
            ));
        }
        if t.relay_busy_poll_us > MAX_RELAY_BUSY_POLL_US {
            return Err(format!(
                "tuning.relayBusyPollUs: {} is more than {MAX_RELAY_BUSY_POLL_US} (0 turns it off)",
                t.relay_busy_poll_us
            ));
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
        let log = &self.observability.access_log;
        if log.sample_percent > 100 {
            return Err(format!(
                "observability.accessLog.samplePercent: {} is outside 0 to 100",
                log.sample_percent
            ));
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
        check_relative(&w.netns, &format!("{label}.netns"))?;
        if let Some(cgroup) = w.own_cgroup() {
            check_relative(cgroup, &format!("{label}.cgroup"))?;
            if let Some(prev) = cgroups.insert(cgroup, label) {
                return Err(format!(
                    "{label}.cgroup: {} is also the cgroup of {prev}",
                    cgroup.display()
                ));
            }
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

/// A pod has a cgroup exactly when the agent enrolls by cgroup: with `cni:` the programs run
/// from the parent cgroup, and a pod cgroup of its own would run them a second time.
pub fn check_cgroup_mode(label: &str, w: &Workload, netns_keyed: bool) -> Result<(), String> {
    match (w.own_cgroup(), netns_keyed) {
        (None, false) => Err(format!(
            "{label}.cgroup: required (pods are enrolled by cgroup unless `cni:` is configured)"
        )),
        (Some(c), true) => Err(format!(
            "{label}.cgroup: {} given, but with `cni:` pods are enrolled by network namespace \
             and their cgroup is left out",
            c.display()
        )),
        _ => Ok(()),
    }
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

    /// The DaemonSet and the node config it ships name the same paths: every directory the
    /// config writes is a writable mount, the CA is the Secret, and the admin socket's
    /// directory is the same path on the node (where the CNI plugin connects to it).
    #[test]
    fn the_shipped_daemonset_mounts_what_the_config_names() {
        let cm: yaml_serde::Value =
            yaml_serde::from_str(include_str!("../../deploy/base/configmap.yaml")).unwrap();
        let config = Config::parse("configmap", cm["data"]["node.yaml"].as_str().unwrap()).unwrap();
        let ds: yaml_serde::Value =
            yaml_serde::from_str(include_str!("../../deploy/base/daemonset.yaml")).unwrap();
        let pod = &ds["spec"]["template"]["spec"];
        let agent = pod["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "agent")
            .unwrap();
        let volume = |name: &yaml_serde::Value| {
            pod["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| &v["name"] == name)
                .unwrap()
                .clone()
        };
        // (mount path, read-only, volume)
        let mounts: Vec<(PathBuf, bool, yaml_serde::Value)> = agent["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    PathBuf::from(m["mountPath"].as_str().unwrap()),
                    m["readOnly"].as_bool().unwrap_or(false),
                    volume(&m["name"]),
                )
            })
            .collect();
        let mount_of = |p: &Path| {
            mounts
                .iter()
                .filter(|(m, _, _)| p.starts_with(m))
                .max_by_key(|(m, _, _)| m.components().count())
                .unwrap_or_else(|| panic!("{} is on no volume", p.display()))
        };
        for writable in [
            config.state_dir.as_path(),
            config.admin_socket.parent().unwrap(),
            config.bpffs.as_path(),
        ] {
            assert!(!mount_of(writable).1, "{} is read-only", writable.display());
        }
        let (_, _, ca) = mount_of(&config.ca_dir);
        assert_eq!(ca["secret"]["secretName"], "cacerts");
        assert_eq!(ca["secret"]["defaultMode"].as_u64(), Some(0o400));
        let (mount, _, run) = mount_of(&config.admin_socket);
        assert_eq!(run["hostPath"]["path"].as_str(), mount.to_str());
        let args: Vec<&str> = agent["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args.iter().position(|a| *a == "--config").unwrap();
        let (_, _, cfg) = mount_of(Path::new(args[at + 1]));
        assert_eq!(cfg["configMap"]["name"], cm["metadata"]["name"]);
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

    /// `cni:` switches enrollment to network namespaces: pods then have no cgroup of their
    /// own, and the static directory is checked like workloads are.
    #[test]
    fn cni_mode_and_the_static_directory() {
        let cni = "cni:\n  parentCgroup: /sys/fs/cgroup/kubepods\n  namespaces:\n    \
                   full: {interceptor.io/mtls: enabled}\n    legacy: {}\n  pods:\n    \
                   - {namespace: full, name: sleep, serviceAccount: sleep, labels: {app: s}}\n";
        let netns_keyed = EXAMPLE.replace("    cgroup: /sys/fs/cgroup/pods/sleep-full\n", "");
        let c = Config::parse("n", &format!("{netns_keyed}{cni}")).unwrap();
        let settings = c.cni.as_ref().unwrap();
        assert_eq!(
            settings.parent_cgroup.as_deref(),
            Some(Path::new("/sys/fs/cgroup/kubepods"))
        );
        assert_eq!(
            settings.membership_file,
            Path::new("/run/interceptor/cni-membership.json")
        );
        assert_eq!(settings.pods[0].service_account, "sleep");
        assert_eq!(c.workloads[0].own_cgroup(), None);
        // Round trip keeps the cgroup out.
        let again = yaml_serde::to_string(&c).unwrap();
        assert!(!again.contains("cgroup: ''"), "{again}");
        assert_eq!(Config::parse("n", &again).unwrap(), c);

        let e = Config::parse("n", &format!("{EXAMPLE}{cni}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("workloads[0].cgroup") && e.contains("network namespace"),
            "{e}"
        );
        let e = Config::parse("n", &netns_keyed).unwrap_err().to_string();
        assert!(e.contains("workloads[0].cgroup: required"), "{e}");
        let twice = cni.replace(
            "labels: {app: s}}\n",
            "labels: {app: s}}\n    - {namespace: full, name: sleep, serviceAccount: x}\n",
        );
        let e = Config::parse("n", &format!("{netns_keyed}{twice}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cni.pods[1]") && e.contains("twice"), "{e}");
        let e = Config::parse(
            "n",
            &format!(
                "{netns_keyed}{}",
                cni.replace("/sys/fs/cgroup/kubepods", "kubepods")
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cni.parentCgroup"), "{e}");
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
    fn kubernetes_section_parses_strictly() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert_eq!(c.kubernetes, None, "absent: file/static mode");
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}kubernetes:\n{yaml}"));
        let c = with("  kubeconfig: /etc/kube/config\n  nodeName: node-a\n").unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.kubeconfig.as_deref(), Some(Path::new("/etc/kube/config")));
        assert_eq!(k.mesh_label, "interceptor.io/mtls");
        assert_eq!(k.node(Some("env".into())).unwrap(), "node-a");
        let c = Config::parse("n", &format!("{EXAMPLE}kubernetes: {{}}\n")).unwrap();
        let k = c.kubernetes.unwrap();
        assert_eq!(k.kubeconfig, None, "in-cluster");
        assert_eq!(k.node(Some("from-env".into())).unwrap(), "from-env");
        assert!(k.node(None).unwrap_err().contains("NODE_NAME"));
        for (yaml, named) in [
            ("  nodename: a\n", "nodename"),
            ("  kubeconfig: rel/path\n", "kubernetes.kubeconfig"),
            ("  nodeName: \"\"\n", "kubernetes.nodeName"),
            ("  meshLabel: \"a b\"\n", "kubernetes.meshLabel"),
        ] {
            let e = with(yaml).unwrap_err().to_string();
            assert!(e.contains(named), "{yaml}: {e}");
        }
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

    #[test]
    fn resumption_knobs_parse_with_bounds() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert!(c.tuning.session_resumption);
        assert_eq!(c.tuning.ticket_lifetime_secs, 300);
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}tuning:\n{yaml}"));
        let c = with("  sessionResumption: false\n  ticketLifetimeSecs: 60\n").unwrap();
        assert!(!c.tuning.session_resumption);
        assert_eq!(c.tuning.ticket_lifetime_secs, 60);
        assert_eq!(c.tuning.connection_keys, ConnectionKeysMode::Derived);
        assert_eq!(
            (
                c.tuning.derived_root_lifetime_secs,
                c.tuning.derived_root_max_connections
            ),
            (120, 1_000)
        );
        let c = with("  connectionKeys: handshake\n").unwrap();
        assert_eq!(c.tuning.connection_keys, ConnectionKeysMode::Handshake);
        let c = with("  derivedRootLifetimeSecs: 30\n  derivedRootMaxConnections: 5\n").unwrap();
        assert_eq!(
            (
                c.tuning.derived_root_lifetime(),
                c.tuning.derived_root_max_connections
            ),
            (std::time::Duration::from_secs(30), 5)
        );
        for (yaml, field) in [
            ("  derivedRootLifetimeSecs: 0\n", "derivedRootLifetimeSecs"),
            (
                "  derivedRootLifetimeSecs: 3601\n",
                "derivedRootLifetimeSecs",
            ),
            (
                "  derivedRootMaxConnections: 0\n",
                "derivedRootMaxConnections",
            ),
            (
                "  derivedRootMaxConnections: 1000001\n",
                "derivedRootMaxConnections",
            ),
        ] {
            let e = with(yaml).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
        let e = with("  connectionKeys: pooled\n").unwrap_err().to_string();
        assert!(e.contains("connectionKeys") || e.contains("pooled"), "{e}");
        let c = with("  meshSpares: 2\n  spareIdleMs: 2000\n").unwrap();
        assert_eq!((c.tuning.mesh_spares, c.tuning.spare_idle_ms), (2, 2_000));
        for (yaml, field) in [
            (
                "  ticketLifetimeSecs: 0\n",
                "tuning.ticketLifetimeSecs: 0 is outside 1 to 3600",
            ),
            ("  ticketLifetimeSecs: 86400\n", "tuning.ticketLifetimeSecs"),
            ("  sessionResumption: maybe\n", "sessionResumption"),
            (
                "  meshSpares: 17\n",
                "tuning.meshSpares: 17 is more than 16",
            ),
            (
                "  spareIdleMs: 10\n",
                "tuning.spareIdleMs: 10 is outside 100 to 60000",
            ),
        ] {
            let e = with(yaml).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }
    #[test]
    fn tcp_fast_open_is_on_unless_turned_off() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert!(c.tuning.tcp_fast_open);
        let off = Config::parse("n", &format!("{EXAMPLE}tuning:\n  tcpFastOpen: false\n")).unwrap();
        assert!(!off.tuning.tcp_fast_open);
    }
    #[test]
    fn worker_threads_default_to_one_per_cpu_and_are_bounded() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert_eq!(c.tuning.worker_threads, 0);
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}tuning:\n{yaml}"));
        assert_eq!(
            with("  workerThreads: 1\n").unwrap().tuning.worker_threads,
            1
        );
        for (yaml, field) in [
            (
                "  workerThreads: 5000\n",
                "tuning.workerThreads: 5000 is more than 1024",
            ),
            ("  workerThreads: -1\n", "workerThreads"),
        ] {
            let e = with(yaml).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }

    #[test]
    fn sched_slice_is_the_kernels_unless_set_and_is_bounded() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert_eq!(c.tuning.sched_slice_us, 0);
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}tuning:\n{yaml}"));
        assert_eq!(
            with("  schedSliceUs: 100\n").unwrap().tuning.sched_slice_us,
            100
        );
        for (yaml, field) in [
            (
                "  schedSliceUs: 99\n",
                "tuning.schedSliceUs: 99 is outside 100 to 100000",
            ),
            (
                "  schedSliceUs: 100001\n",
                "tuning.schedSliceUs: 100001 is outside 100 to 100000",
            ),
            ("  schedSliceUs: -1\n", "schedSliceUs"),
        ] {
            let e = with(yaml).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }

    #[test]
    fn relay_busy_poll_is_off_unless_set_and_is_bounded() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert_eq!(c.tuning.relay_busy_poll_us, 0);
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}tuning:\n{yaml}"));
        for us in [1, 100, 1_000] {
            let yaml = format!("  relayBusyPollUs: {us}\n");
            assert_eq!(with(&yaml).unwrap().tuning.relay_busy_poll_us, us);
        }
        for (yaml, field) in [
            (
                "  relayBusyPollUs: 1001\n",
                "tuning.relayBusyPollUs: 1001 is more than 1000",
            ),
            ("  relayBusyPollUs: -1\n", "relayBusyPollUs"),
            ("  relayBusyPollUs: fast\n", "relayBusyPollUs"),
        ] {
            let e = with(yaml).unwrap_err().to_string();
            assert!(e.contains(field), "{yaml}: {e}");
        }
    }

    #[test]
    fn runtime_defaults_to_shared_and_names_bad_values() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert_eq!(c.tuning.runtime, RuntimeShape::Shared);
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}tuning:\n{yaml}"));
        assert_eq!(
            with("  runtime: perThread\n").unwrap().tuning.runtime,
            RuntimeShape::PerThread
        );
        let e = with("  runtime: perCore\n").unwrap_err().to_string();
        assert!(e.contains("perCore") && e.contains("runtime"), "{e}");
    }

    #[test]
    fn relay_app_leg_defaults_to_tcp_and_names_bad_values() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert_eq!(c.tuning.relay_app_leg, RelayAppLeg::Tcp);
        assert!(!c.tuning.joins_app_sockets());
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}tuning:\n{yaml}"));
        let t = with("  relayAppLeg: skMsg\n").unwrap().tuning;
        assert_eq!(t.relay_app_leg, RelayAppLeg::SkMsg);
        assert!(t.joins_app_sockets());
        let e = with("  relayAppLeg: skb\n").unwrap_err().to_string();
        assert!(e.contains("relayAppLeg") && e.contains("skMsg"), "{e}");
    }

    #[test]
    fn same_node_fast_path_is_on_by_default_and_can_be_turned_off() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert!(c.tuning.same_node_fast_path);
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}tuning:\n{yaml}"));
        assert!(
            !with("  sameNodeFastPath: false\n")
                .unwrap()
                .tuning
                .same_node_fast_path
        );
        let e = with("  sameNodeFastPath: sometimes\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sameNodeFastPath"), "{e}");
    }

    #[test]
    fn same_node_join_defaults_to_splice_and_names_bad_values() {
        let c = Config::parse("n", EXAMPLE).unwrap();
        assert_eq!(c.tuning.same_node_join, SameNodeJoin::Splice);
        let with = |yaml: &str| Config::parse("n", &format!("{EXAMPLE}tuning:\n{yaml}"));
        assert_eq!(
            with("  sameNodeJoin: skMsg\n")
                .unwrap()
                .tuning
                .same_node_join,
            SameNodeJoin::SkMsg
        );
        let e = with("  sameNodeJoin: skb\n").unwrap_err().to_string();
        assert!(e.contains("sameNodeJoin") && e.contains("skMsg"), "{e}");
    }
}
