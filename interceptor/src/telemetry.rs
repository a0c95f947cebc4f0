//! What an operator scrapes: Prometheus metrics (`prometheus-client`), the per-connection
//! access log, and the HTTP listener that serves them with the health and debug endpoints.
//!
//! Counters are counted where the connection path decides (a flow listed, a refusal, a
//! handshake done, a flow closed); everything that already has a source of truth elsewhere
//! (open flows in the flow table, enrolled pods, certificate lifetimes, eBPF map fill levels
//! and counters) is read from it at scrape time through [`Observed`], so `/metrics`,
//! `/debug/flows` and `interceptor flows` cannot disagree.
//!
//! Labels are bounded: workloads (a Deployment's pods share one name, see [`workload_name`]),
//! namespaces, SPIFFE principals, and small enums. Nothing is labelled per connection. The TCP
//! metrics carry Istio's names and labels, so dashboards built for Istio work unchanged.

pub mod access;
pub mod server;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock, RwLock, Weak},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
    },
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::config::AccessLogFormat;

/// Which side of a flow this agent is: the client's (`outbound`) or the server's (`inbound`).
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }

    /// Istio's `reporter`: the client side reports as `source`, the server side as
    /// `destination`.
    fn reporter(self) -> &'static str {
        match self {
            Self::Outbound => "source",
            Self::Inbound => "destination",
        }
    }
}

/// How a flow's bytes travel between the agents (or to the peer outside the mesh).
#[derive(
    Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Mesh mTLS, records encrypted by kernel TLS.
    Ktls,
    /// Mesh mTLS, records encrypted by rustls in the agent.
    Userspace,
    /// TLS the agent originated to a server outside the mesh (DestinationRule SIMPLE/MUTUAL).
    Tls,
    /// Plaintext between mesh workloads that policy allows (PERMISSIVE, DISABLE).
    Plaintext,
    /// Plaintext with a peer outside the mesh.
    Passthrough,
    /// Both ends on this node, short-circuited locally.
    Local,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Self::Ktls,
        Self::Userspace,
        Self::Tls,
        Self::Plaintext,
        Self::Passthrough,
        Self::Local,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ktls => "ktls",
            Self::Userspace => "userspace",
            Self::Tls => "tls",
            Self::Plaintext => "plaintext",
            Self::Passthrough => "passthrough",
            Self::Local => "local",
        }
    }

    /// Istio's `connection_security_policy`: mesh mTLS or not.
    fn security_policy(self) -> &'static str {
        match self {
            Self::Ktls | Self::Userspace => "mutual_tls",
            Self::Tls | Self::Plaintext | Self::Passthrough | Self::Local => "none",
        }
    }

    fn ktls(self) -> bool {
        self == Self::Ktls
    }
}

/// How a listed flow ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Both sides closed (or the idle timeout ended it).
    Closed,
    /// The relay failed (reset by a side, an I/O or TLS error).
    Failed,
    /// A policy or crypto policy change closed it.
    PolicyClosed,
    /// Still open: handed, with its relay, to the agent that replaced this one.
    HandedOver,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Failed => "failed",
            Self::PolicyClosed => "policy_closed",
            Self::HandedOver => "handed_over",
        }
    }
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value!(Direction, Mode, Outcome);

/// What the metrics say about one workload (an enrolled pod, or a peer on another node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
///
/// Its values are shared ([`Label`]): every flow's label set is made of them, and a clone is a
/// reference count, not an allocation per label per flow.
pub struct WorkloadLabels {
    /// The workload (Deployment, StatefulSet, DaemonSet) the pod belongs to, see
    /// [`workload_name`].
    pub workload: Label,
    pub namespace: Label,
    /// The `app` label (Istio's `*_app`).
    pub app: Label,
    /// Istio's canonical service: `service.istio.io/canonical-name`, else
    /// `app.kubernetes.io/name`, else `app`, else the workload.
    pub canonical_service: Label,
    /// An enrolled pod's SPIFFE ID (its end of a flow needs no proof); empty for a peer,
    /// whose identity counts only when its certificate proved it.
    pub principal: Label,
}

/// A label value shared by every series and flow that carries it.
pub type Label = Arc<str>;

/// [`UNKNOWN`] as a shared [`Label`].
fn unknown() -> Label {
    static LABEL: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| UNKNOWN.into());
    Arc::clone(&LABEL)
}

impl WorkloadLabels {
    /// The labels of a pod named `pod` (empty for a peer, whose pod name is not known).
    pub fn of(pod: &str, namespace: &str, labels: &BTreeMap<String, String>) -> Self {
        let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        let workload = workload_name(pod, labels);
        let canonical_service = get("service.istio.io/canonical-name")
            .or_else(|| get("app.kubernetes.io/name"))
            .or_else(|| get("app"))
            .unwrap_or_else(|| workload.clone());
        Self {
            workload: workload.into(),
            namespace: namespace.into(),
            app: get("app").map_or_else(unknown, Label::from),
            canonical_service: canonical_service.into(),
            principal: "".into(),
        }
    }

    /// With the enrolled pod's SPIFFE ID.
    pub fn with_principal(mut self, principal: impl ToString) -> Self {
        self.principal = principal.to_string().into();
        self
    }
}

/// Istio's value for a label the agent cannot know.
pub const UNKNOWN: &str = "unknown";

/// The workload a pod belongs to, so every replica shares one label value: a Deployment's
/// pod (`pod-template-hash` label, named `<deployment>-<hash>-<suffix>`) is named by its
/// Deployment, a StatefulSet's or DaemonSet's (`controller-revision-hash`, named
/// `<name>-<ordinal or suffix>`) by its controller. A bare pod is its own workload (the one
/// case where the label is per pod). Without a pod name (a peer) the `app` label stands in.
pub fn workload_name(pod: &str, labels: &BTreeMap<String, String>) -> String {
    if pod.is_empty() {
        return labels
            .get("app")
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or_else(|| UNKNOWN.to_owned());
    }
    if let Some(hash) = labels.get("pod-template-hash").filter(|h| !h.is_empty())
        && let Some((rest, _suffix)) = pod.rsplit_once('-')
        && let Some(deployment) = rest.strip_suffix(hash.as_str())
        && let Some(deployment) = deployment.strip_suffix('-')
        && !deployment.is_empty()
    {
        return deployment.to_owned();
    }
    if labels.contains_key("controller-revision-hash")
        && let Some((controller, _)) = pod.rsplit_once('-')
        && !controller.is_empty()
    {
        return controller.to_owned();
    }
    pod.to_owned()
}

/// Istio's TCP labels (the subset an L4 agent can fill), plus the agent's `direction` and
/// `mode`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_canonical_service: Label,
    pub destination_workload: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_canonical_service: Label,
    pub request_protocol: &'static str,
    pub connection_security_policy: &'static str,
    pub direction: Direction,
    pub mode: Mode,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    #[prometheus(flatten)]
    tcp: TcpLabels,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    direction: Direction,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: Direction,
    mode: Mode,
    workload: Label,
    workload_namespace: Label,
}

/// Outcomes of derived-key connections [`Telemetry::derived_at`] can count by index.
pub const DERIVED_SLOTS: usize = 32;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DroppedLabels {
    why: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandoverLabels {
    /// `sent` (parked here and sent: the successor continues it), `received` (continued
    /// here), `kept` (parked but not sent: continued by the agent that had it), `refused`
    /// (received but failed its checks here: reset).
    result: &'static str,
}

/// One flow as the metrics and the access log see it: who is on each end and how it runs.
/// Built once when the flow is listed; [`Telemetry::flow_closed`] gets it back.
#[derive(Clone, Debug)]
pub struct FlowMeta {
    pub direction: Direction,
    pub mode: Mode,
    /// The enrolled pod this flow belongs to.
    pub pod: String,
    /// Outbound: the app's socket; inbound: the client.
    pub source: std::net::SocketAddr,
    /// Outbound: where the app connected; inbound: the pod address the client reached.
    pub destination: std::net::SocketAddr,
    /// Outbound: the address the agent connected to, when it differs (a service VIP's pick).
    pub endpoint: Option<std::net::SocketAddr>,
    /// The peer's proven SPIFFE ID (mesh mTLS only).
    pub peer_principal: Option<String>,
    pub cipher: Option<String>,
    /// The key-exchange group, as `interceptor flows` shows it.
    pub group: Option<String>,
    /// The policy decision that let the flow through.
    pub decision: Option<String>,
    /// Opened by the agent this one replaced, and handed over open (an upgrade).
    pub handed_over: bool,
}

/// How a listed flow ended, with its final byte counts.
#[derive(Clone, Copy, Debug)]
pub struct FlowEnd<'a> {
    pub outcome: Outcome,
    /// Bytes the enrolled pod's app sent to the peer.
    pub to_peer: u64,
    /// Bytes the app received from the peer.
    pub from_peer: u64,
    /// From listing to close.
    pub duration: Duration,
    /// Why it ended, when not by itself (a refusal code of a policy change, an error).
    pub reason: Option<&'a str>,
    /// A failed flow's short failure name (`RelayError::reason`), counted by it.
    pub failure: Option<&'static str>,
}

/// One refused connection, for the counters and the access log.
#[derive(Clone, Debug)]
pub struct RefusalMeta<'a> {
    pub direction: Direction,
    pub pod: &'a str,
    pub source: std::net::SocketAddr,
    pub destination: std::net::SocketAddr,
    pub endpoint: Option<std::net::SocketAddr>,
    pub client: Option<String>,
    pub server: Option<String>,
    /// The stable refusal code (README's table).
    pub code: &'static str,
    pub reason: std::borrow::Cow<'a, str>,
}

/// What is read at scrape time from where it is kept.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Listed flows by direction and mode (the flow table `interceptor flows` reads).
    pub open_flows: BTreeMap<(Direction, Mode), u64>,
    pub enrolled_pods: u64,
    pub stale_enrollments: u64,
    pub policy_generation: u64,
    pub ca_generation: u64,
    /// Seconds until each held workload certificate expires (negative once expired).
    pub certificates: Vec<(String, f64)>,
    /// Seconds until the signing CA certificate expires.
    pub signer_expiry: Option<f64>,
    /// eBPF maps: name → (entries, capacity).
    pub maps: Vec<(&'static str, u64, u64)>,
    /// eBPF program counters by name.
    pub datapath: Vec<(String, u64)>,
}

/// The running agent, as seen from the HTTP listener and the scrape-time collector.
pub trait Observed: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
    /// `/debug/flows`: what `interceptor flows --json [--all]` prints.
    fn flows(&self, all: bool) -> serde_json::Value;
    /// `/debug/config`: the node config and what is in force, without key material.
    fn config(&self) -> serde_json::Value;
}

/// Where the agent is, once it exists (the listener serves health before it does).
#[derive(Default)]
struct Slot(OnceLock<Weak<dyn Observed>>);

impl Slot {
    fn get(&self) -> Option<Arc<dyn Observed>> {
        self.0.get()?.upgrade()
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

/// The node agent's metrics and access log.
pub struct Telemetry {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    policy_closed: Family<RefusedLabels, Counter>,
    flow_failures: Family<RefusedLabels, Counter>,
    handshake: Family<HandshakeLabels, Histogram>,
    policy_reloads: Family<OutcomeLabels, Counter>,
    config_reloads: Family<OutcomeLabels, Counter>,
    ca_reloads: Family<OutcomeLabels, Counter>,
    access_dropped: Family<DroppedLabels, Counter>,
    handover_flows: Family<HandoverLabels, Counter>,
    tickets_declined: Counter,
    derived: Family<OutcomeLabels, Counter>,
    /// `derived`'s series by the outcome's index, each taken from the family on its first
    /// use: counting a connection is then one atomic add, not hashing its label into the map.
    derived_by: [OnceLock<Counter>; DERIVED_SLOTS],
    /// One shared copy of each label set flows hold (a flow keeps its open labels until it
    /// closes, so both counts land on the same series).
    interned: Mutex<HashSet<Arc<TcpLabels>>>,
    /// Who is at an address: enrolled pods and peers, for the other end's labels.
    workloads: RwLock<HashMap<IpAddr, Arc<WorkloadLabels>>>,
    /// Enrolled pods by name.
    pods: RwLock<HashMap<String, Arc<WorkloadLabels>>>,
    access: access::AccessLog,
    observed: Arc<Slot>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// Interned label sets beyond which unused ones are swept (at each power of two).
const INTERNED_SWEEP: usize = 1_024;

/// Handshake buckets: 0.25 ms to ~4 s (a TCG-emulated VM is slow, a busy node too).
fn handshake_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_25, 2.0, 15)
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new(&crate::config::AccessLog::default())
    }
}

impl Telemetry {
    pub fn new(access: &crate::config::AccessLog) -> Self {
        let mut registry = Registry::default();
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<ClosedLabels, Counter>::default();
        let sent = Family::<TcpLabels, Counter>::default();
        let received = Family::<TcpLabels, Counter>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let policy_closed = Family::<RefusedLabels, Counter>::default();
        let flow_failures = Family::<RefusedLabels, Counter>::default();
        let handshake = Family::<HandshakeLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(handshake_buckets())) as fn() -> Histogram,
        );
        let policy_reloads = Family::<OutcomeLabels, Counter>::default();
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        let ca_reloads = Family::<OutcomeLabels, Counter>::default();
        let access_dropped = Family::<DroppedLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_opened",
            "Flows the agent listed (admitted and relayed); refusals are counted in \
             interceptor_connections_refused_total instead",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "Listed flows that ended, by outcome",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes the server side sent (response direction), counted when the flow closes",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes the client side sent (request direction), counted when the flow closes",
            received.clone(),
        );
        registry.register(
            "interceptor_connections_refused",
            "Connections refused before they were listed, by direction and reason code",
            refused.clone(),
        );
        registry.register(
            "interceptor_connections_policy_closed",
            "Listed flows a policy or crypto policy change closed, by reason code",
            policy_closed.clone(),
        );
        registry.register(
            "interceptor_flow_failures",
            "Listed flows that failed, by direction and failure (the relay's name for it; \
             `other` for a failure outside the relay)",
            flow_failures.clone(),
        );
        registry.register(
            "interceptor_handshake_duration_seconds",
            "Completed TLS handshakes (mesh mTLS and originated TLS), from the first flight to \
             the peer's Finished",
            handshake.clone(),
        );
        registry.register(
            "interceptor_policy_reloads",
            "Policy directory reloads: applied, or rejected (a file or object that does not \
             load; the previous generation stays)",
            policy_reloads.clone(),
        );
        registry.register(
            "interceptor_config_reloads",
            "Node config changes: applied, or rejected (the running config stays)",
            config_reloads.clone(),
        );
        registry.register(
            "interceptor_ca_reloads",
            "CA directory changes: applied, or rejected (the previous material stays)",
            ca_reloads.clone(),
        );
        registry.register(
            "interceptor_access_log_dropped",
            "Access log lines not written: not sampled, or over the rate limit",
            access_dropped.clone(),
        );
        // Bounded label sets start at zero, so every series exists from the first scrape
        // (`increase()` sees the first event, dashboards show 0 rather than no data).
        for direction in [Direction::Outbound, Direction::Inbound] {
            for code in crate::refusal::RefusalCode::ALL {
                let labels = RefusedLabels {
                    direction,
                    reason: code.as_str(),
                };
                let _ = refused.get_or_create(&labels);
                let _ = policy_closed.get_or_create(&labels);
            }
            for &reason in crate::relay::RelayError::REASONS.iter().chain(&["other"]) {
                let _ = flow_failures.get_or_create(&RefusedLabels { direction, reason });
            }
        }
        for outcome in ["applied", "rejected"] {
            let labels = OutcomeLabels { outcome };
            let _ = policy_reloads.get_or_create(&labels);
            let _ = config_reloads.get_or_create(&labels);
            let _ = ca_reloads.get_or_create(&labels);
        }
        for why in ["not_sampled", "rate_limited"] {
            let _ = access_dropped.get_or_create(&DroppedLabels { why });
        }
        let handover_flows = Family::<HandoverLabels, Counter>::default();
        registry.register(
            "interceptor_handover_flows",
            "Open kTLS flows moved between agents in upgrades, by result",
            handover_flows.clone(),
        );
        for result in ["sent", "received", "kept", "refused"] {
            let _ = handover_flows.get_or_create(&HandoverLabels { result });
        }
        let tickets_declined = Counter::default();
        registry.register(
            "interceptor_resumption_tickets_declined",
            "Resumption tickets a peer agent declined (it restarted, or its policy changed): \
             the connection dialed again with a full handshake",
            tickets_declined.clone(),
        );
        let derived = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "interceptor_derived_connections",
            "Connections on derived keys (tuning.connectionKeys: derived), by outcome: a root \
             kept, offered, used, fallback, accepted, or the reason the server refused a header",
            derived.clone(),
        );
        let observed = Arc::new(Slot::default());
        registry.register_collector(Box::new(ScrapeTime(Arc::clone(&observed))));
        Self {
            registry,
            opened,
            closed,
            sent,
            received,
            refused,
            policy_closed,
            flow_failures,
            handshake,
            policy_reloads,
            config_reloads,
            ca_reloads,
            access_dropped,
            handover_flows,
            tickets_declined,
            derived,
            derived_by: Default::default(),
            interned: Mutex::new(HashSet::new()),
            workloads: RwLock::new(HashMap::new()),
            pods: RwLock::new(HashMap::new()),
            access: access::AccessLog::new(access),
            observed,
        }
    }

    /// Points the scrape-time collector and the debug endpoints at the running agent. Only
    /// the first call counts (there is one agent per process).
    pub fn observe(&self, agent: Weak<dyn Observed>) {
        let _ = self.observed.0.set(agent);
    }

    fn observed(&self) -> Option<Arc<dyn Observed>> {
        self.observed.get()
    }

    /// Remembers who is at `ips`: an enrolled pod (`pod` names it) or a peer (`pod` empty).
    pub fn add_workload(&self, pod: &str, ips: &[IpAddr], labels: WorkloadLabels) {
        let labels = Arc::new(labels);
        let mut w = self.workloads.write().unwrap_or_else(|p| p.into_inner());
        for ip in ips {
            w.insert(ip.to_canonical(), Arc::clone(&labels));
        }
        if !pod.is_empty() {
            self.pods
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(pod.to_owned(), labels);
        }
    }

    /// Forgets an unenrolled pod.
    pub fn remove_workload(&self, pod: &str, ips: &[IpAddr]) {
        let mut w = self.workloads.write().unwrap_or_else(|p| p.into_inner());
        for ip in ips {
            w.remove(&ip.to_canonical());
        }
        self.pods
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(pod);
    }

    /// A plaintext flow's mode: `plaintext` when the peer is a mesh workload this node knows
    /// (policy let plaintext through), `passthrough` when it is outside the mesh.
    pub fn plaintext_mode(&self, peer: IpAddr) -> Mode {
        if self.at(peer).is_some() {
            Mode::Plaintext
        } else {
            Mode::Passthrough
        }
    }

    fn pod(&self, name: &str) -> Option<Arc<WorkloadLabels>> {
        self.pods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    fn at(&self, ip: IpAddr) -> Option<Arc<WorkloadLabels>> {
        self.workloads
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip.to_canonical())
            .cloned()
    }

    /// Istio's labels for a flow: the enrolled pod on one end, whoever is at the peer's
    /// address on the other.
    pub fn labels(&self, flow: &FlowMeta) -> TcpLabels {
        let local = self.pod(&flow.pod);
        let peer_ip = match flow.direction {
            Direction::Outbound => flow.endpoint.unwrap_or(flow.destination).ip(),
            Direction::Inbound => flow.source.ip(),
        };
        let peer = self.at(peer_ip);
        let side = |w: &Option<Arc<WorkloadLabels>>| match w {
            Some(w) => (
                Arc::clone(&w.workload),
                Arc::clone(&w.namespace),
                Arc::clone(&w.app),
                Arc::clone(&w.canonical_service),
            ),
            None => (unknown(), unknown(), unknown(), unknown()),
        };
        let local_principal = local
            .as_ref()
            .map(|w| Arc::clone(&w.principal))
            .filter(|p| !p.is_empty())
            .unwrap_or_else(unknown);
        let (local, peer) = (side(&local), side(&peer));
        let peer_principal = flow
            .peer_principal
            .as_deref()
            .map_or_else(unknown, Label::from);
        // Without mTLS nothing proves who the client is, so Istio leaves it unknown; the
        // agent's own pod is known either way.
        let (src, dst, src_principal, dst_principal) = match flow.direction {
            Direction::Outbound => (local, peer, local_principal, peer_principal),
            Direction::Inbound => (peer, local, peer_principal, local_principal),
        };
        TcpLabels {
            reporter: flow.direction.reporter(),
            source_workload: src.0,
            source_workload_namespace: src.1,
            source_principal: src_principal,
            source_app: src.2,
            source_canonical_service: src.3,
            destination_workload: dst.0,
            destination_workload_namespace: dst.1,
            destination_principal: dst_principal,
            destination_app: dst.2,
            destination_canonical_service: dst.3,
            request_protocol: "tcp",
            connection_security_policy: flow.mode.security_policy(),
            direction: flow.direction,
            mode: flow.mode,
        }
    }

    /// A flow was listed (admitted, about to relay): counts it and returns the labels its
    /// close must be counted under.
    pub fn flow_opened(&self, flow: &FlowMeta) -> Arc<TcpLabels> {
        let labels = self.intern(self.labels(flow));
        self.opened.get_or_create(&labels).inc();
        labels
    }

    fn intern(&self, labels: TcpLabels) -> Arc<TcpLabels> {
        let mut set = self.interned.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = set.get(&labels) {
            return Arc::clone(held);
        }
        // Label sets of departed workloads are dropped once no flow holds them.
        if set.len() >= INTERNED_SWEEP && set.len().is_power_of_two() {
            set.retain(|l| Arc::strong_count(l) > 1);
        }
        let labels = Arc::new(labels);
        set.insert(Arc::clone(&labels));
        labels
    }

    /// A listed flow ended: closed count, bytes, and its access log line when `line` holds one
    /// (see [`Telemetry::admit_line`]). `to_peer` are the bytes the enrolled pod's app sent,
    /// `from_peer` those it received.
    ///
    /// The line is admitted by the caller, before the flow leaves the table: the flow's
    /// [`FlowMeta`] is built only for a line that will be written, from the flow's state while
    /// the table still owns it, so the table can move that state into its recent list instead
    /// of copying it for a line that is usually never written.
    pub fn flow_closed(
        &self,
        direction: Direction,
        labels: &TcpLabels,
        end: &FlowEnd<'_>,
        line: Option<(AccessLogFormat, FlowMeta)>,
    ) {
        let FlowEnd {
            outcome,
            to_peer,
            from_peer,
            duration,
            reason,
            failure,
        } = *end;
        if let Some(reason) = failure {
            self.flow_failures
                .get_or_create(&RefusedLabels { direction, reason })
                .inc();
        }
        self.closed
            .get_or_create(&ClosedLabels {
                tcp: labels.clone(),
                outcome,
            })
            .inc();
        // Istio: received = request bytes (client → server), sent = response bytes.
        let (request, response) = match direction {
            Direction::Outbound => (to_peer, from_peer),
            Direction::Inbound => (from_peer, to_peer),
        };
        self.received.get_or_create(labels).inc_by(request);
        self.sent.get_or_create(labels).inc_by(response);
        if let Some((format, flow)) = line {
            access::emit(&access::flow_line(
                format,
                &access::FlowLine {
                    flow: &flow,
                    labels,
                    outcome: outcome.as_str(),
                    reason,
                    code: failure,
                    to_peer,
                    from_peer,
                    duration,
                },
            ));
        }
    }

    /// A connection was refused before it was listed; `refusal` builds its access line, if
    /// one is written.
    pub fn refused<'a>(
        &self,
        direction: Direction,
        code: &'static str,
        refusal: impl FnOnce() -> RefusalMeta<'a>,
    ) {
        self.refused
            .get_or_create(&RefusedLabels {
                direction,
                reason: code,
            })
            .inc();
        self.log(|format| access::refusal_line(format, &refusal()));
    }

    /// `interceptor_handover_flows_total{result}` as counted so far (for `flows --stats`).
    pub fn handover_flows_counted(&self, result: &'static str) -> u64 {
        self.handover_flows
            .get_or_create(&HandoverLabels { result })
            .get()
    }

    /// Open flows moved in an upgrade: `sent`, `received`, `kept` or `refused` (see the
    /// metric).
    pub fn handover_flows(&self, result: &'static str, n: u64) {
        self.handover_flows
            .get_or_create(&HandoverLabels { result })
            .inc_by(n);
    }

    /// A peer agent declined a resumption ticket and the flow dialed again.
    pub fn ticket_declined(&self) {
        self.tickets_declined.inc();
    }

    /// One derived-key connection's outcome (`derived.<outcome>` in the flow stats).
    pub fn derived(&self, outcome: &'static str) {
        self.derived.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// [`Telemetry::derived`] for an outcome that also has a fixed `index` (below
    /// [`DERIVED_SLOTS`]; `intercept::DerivedOutcome`): the same series, found by the index.
    pub fn derived_at(&self, index: usize, outcome: &'static str) {
        match self.derived_by.get(index) {
            Some(slot) => {
                slot.get_or_init(|| {
                    self.derived
                        .get_or_create(&OutcomeLabels { outcome })
                        .clone()
                })
                .inc();
            }
            None => self.derived(outcome),
        }
    }

    /// A listed flow was closed by a policy change (its close line follows with the relay).
    pub fn policy_closed(&self, direction: Direction, code: &'static str) {
        self.policy_closed
            .get_or_create(&RefusedLabels {
                direction,
                reason: code,
            })
            .inc();
    }

    /// A handshake of a flow of `pod` completed in `took`.
    pub fn handshake_done(&self, direction: Direction, mode: Mode, pod: &str, took: Duration) {
        let local = self.pod(pod);
        let (workload, namespace) = match &local {
            Some(w) => (Arc::clone(&w.workload), Arc::clone(&w.namespace)),
            None => (unknown(), unknown()),
        };
        self.handshake
            .get_or_create(&HandshakeLabels {
                direction,
                mode,
                workload,
                workload_namespace: namespace,
            })
            .observe(took.as_secs_f64());
    }

    pub fn policy_reload(&self, applied: bool) {
        self.policy_reloads
            .get_or_create(&OutcomeLabels {
                outcome: applied_or_rejected(applied),
            })
            .inc();
    }

    pub fn config_reload(&self, applied: bool) {
        self.config_reloads
            .get_or_create(&OutcomeLabels {
                outcome: applied_or_rejected(applied),
            })
            .inc();
    }

    pub fn ca_reload(&self, applied: bool) {
        self.ca_reloads
            .get_or_create(&OutcomeLabels {
                outcome: applied_or_rejected(applied),
            })
            .inc();
    }

    /// Writes one access line if sampling and the rate limit let it through.
    fn log(&self, line: impl FnOnce(AccessLogFormat) -> String) {
        if let Some(format) = self.admit_line() {
            access::emit(&line(format));
        }
    }

    /// Whether the next access line is written (sampling and the rate limit let it through),
    /// and in which format; a line left out is counted here. One call per event.
    pub fn admit_line(&self) -> Option<AccessLogFormat> {
        let why = match self.access.admit() {
            access::Admit::Write(format) => return Some(format),
            access::Admit::Off => return None,
            access::Admit::NotSampled => "not_sampled",
            access::Admit::RateLimited => "rate_limited",
        };
        self.access_dropped
            .get_or_create(&DroppedLabels { why })
            .inc();
        None
    }

    /// The Prometheus text format (0.0.4), or OpenMetrics when `openmetrics`.
    pub fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }
}

fn applied_or_rejected(applied: bool) -> &'static str {
    if applied { "applied" } else { "rejected" }
}

/// The metrics whose source of truth lives elsewhere, read on each scrape.
#[derive(Debug)]
struct ScrapeTime(Arc<Slot>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowGaugeLabels {
    direction: Direction,
    mode: Mode,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

fn gauge<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    values: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, v) in values {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for ScrapeTime {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(agent) = self.0.get() else {
            return Ok(());
        };
        let s = agent.snapshot();
        // Every direction and mode, so a dashboard sees 0 rather than no series.
        let open = [Direction::Outbound, Direction::Inbound]
            .into_iter()
            .flat_map(|d| Mode::ALL.into_iter().map(move |m| (d, m)))
            .map(|(direction, mode)| {
                let n = s.open_flows.get(&(direction, mode)).copied().unwrap_or(0);
                (FlowGaugeLabels { direction, mode }, n as i64)
            });
        gauge(
            &mut encoder,
            "interceptor_open_flows",
            "Flows listed now (what interceptor flows shows)",
            open,
        )?;
        let none: [(&str, &str); 0] = [];
        gauge(
            &mut encoder,
            "interceptor_enrolled_pods",
            "Pods enrolled on this node",
            [(none, s.enrolled_pods as i64)],
        )?;
        gauge(
            &mut encoder,
            "interceptor_stale_enrollments",
            "Persisted enrollments that could not be restored (kept fail-closed)",
            [(none, s.stale_enrollments as i64)],
        )?;
        gauge(
            &mut encoder,
            "interceptor_policy_generation",
            "The policy generation in force",
            [(none, s.policy_generation as i64)],
        )?;
        gauge(
            &mut encoder,
            "interceptor_ca_generation",
            "The CA material generation in force (0 as loaded at start)",
            [(none, s.ca_generation as i64)],
        )?;
        gauge(
            &mut encoder,
            "interceptor_certificate_expiry_seconds",
            "Seconds until the workload certificate held for an identity expires",
            s.certificates.iter().map(|(id, secs)| {
                (
                    IdentityLabels {
                        identity: id.clone(),
                    },
                    *secs,
                )
            }),
        )?;
        gauge(
            &mut encoder,
            "interceptor_signer_expiry_seconds",
            "Seconds until the CA certificate that signs workload certificates expires",
            s.signer_expiry.map(|secs| (none, secs)),
        )?;
        gauge(
            &mut encoder,
            "interceptor_bpf_map_entries",
            "Entries in an eBPF map",
            s.maps
                .iter()
                .map(|(map, used, _)| (MapLabels { map }, *used as i64)),
        )?;
        gauge(
            &mut encoder,
            "interceptor_bpf_map_capacity",
            "Capacity (max entries) of an eBPF map",
            s.maps
                .iter()
                .map(|(map, _, cap)| (MapLabels { map }, *cap as i64)),
        )?;
        let mut events = encoder.encode_descriptor(
            "interceptor_bpf_events",
            "eBPF program events (summed over CPUs)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (event, n) in &s.datapath {
            ConstCounter::new(*n).encode(events.encode_family(&EventLabels {
                event: event.clone(),
            })?)?;
        }
        Ok(())
    }
}

/// `CamelCase` → `snake_case`, for eBPF counter names in labels.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The node config as `/debug/config` shows it: any value under a key that names key
/// material (private keys, tokens, passwords, secrets) is replaced; paths and settings stay.
pub fn redact(mut value: serde_json::Value) -> serde_json::Value {
    fn secret(key: &str) -> bool {
        let k = key.to_ascii_lowercase();
        // A path or directory to a key is fine to show; the key itself is not.
        let names_path = ["dir", "path", "file"].iter().any(|p| k.ends_with(p));
        !names_path
            && [
                "privatekey",
                "token",
                "password",
                "secret",
                "keypem",
                "credential",
            ]
            .iter()
            .any(|s| k.contains(s))
    }
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if secret(k) && !v.is_null() {
                        *v = serde_json::Value::from("[redacted]");
                    } else {
                        walk(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut value);
    value
}

#[cfg(test)]
mod tests;
