//! The table of open flows behind `interceptor flows`: what each connection is, who the peer
//! proved to be, how it is encrypted, and live byte counts.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use rustls::{CipherSuite, CommonState, HandshakeKind, NamedGroup};
use tokio::sync::Notify;

use crate::{
    handshake::{self, MeshCrypto, Negotiated},
    identity::SpiffeId,
    policy::FlowTls,
    refusal::RefusalCode,
    relay::{RelayMode, RelayStats},
    telemetry::{self, FlowEnd, FlowMeta, Mode, Outcome, TcpLabels, Telemetry},
};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Outbound,
    Inbound,
}

/// How a flow's bytes are protected on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protection {
    /// mTLS with records encrypted by the kernel.
    Ktls,
    /// mTLS with records encrypted by rustls in the agent.
    Userspace,
    /// No TLS from the agent (non-mesh peer, or policy said so).
    Plaintext,
    /// TLS the agent originated to a server outside the mesh (DestinationRule SIMPLE or
    /// MUTUAL), relayed by rustls.
    Tls,
    /// Both ends are pods this agent enrolled (the same-node fast path): no TLS, and no byte
    /// on any link; both identities come from the kernel.
    Local,
}

/// Kept per open flow for its whole life, so its strings are shared where they can be: the
/// pod's name with the pod, identities with whoever verified them, the suite's name static.
#[derive(Debug, Clone)]
pub struct FlowInfo {
    pub pod: Arc<str>,
    pub direction: Direction,
    /// Outbound: where the app connected; inbound: the pod address the client reached.
    pub destination: SocketAddr,
    /// Outbound: the app socket; inbound: the client.
    pub source: SocketAddr,
    pub peer_id: Option<SpiffeId>,
    pub cipher: Option<Cow<'static, str>>,
    /// Suite and key-exchange group of the flow's TLS session, if it has one.
    pub session: Option<SessionCrypto>,
    pub protection: Protection,
    /// Outbound: the address the agent connected to (a service VIP's chosen endpoint).
    pub endpoint: Option<SocketAddr>,
    /// The policy decision that let the flow through (mode or rule).
    pub reason: Option<Cow<'static, str>>,
}

/// What a flow's TLS session negotiated, kept so a new crypto policy can judge it again.
#[derive(Debug, Clone, Copy)]
pub struct SessionCrypto {
    pub suite: CipherSuite,
    pub group: Option<NamedGroup>,
    /// A HelloRetryRequest was needed.
    pub retried: bool,
    /// The session resumed an earlier one with a ticket (mesh only).
    pub resumed: bool,
    /// Mesh mTLS (else TLS the agent originated to a server outside the mesh).
    pub mesh: bool,
}

/// A suite's name as flows list it: static for every suite rustls knows.
pub fn suite_name(suite: CipherSuite) -> Cow<'static, str> {
    suite
        .as_str()
        .map_or_else(|| format!("{suite:?}").into(), Cow::Borrowed)
}

impl SessionCrypto {
    pub fn mesh(negotiated: &Negotiated) -> Self {
        Self {
            suite: negotiated.suite.suite(),
            group: negotiated.group,
            retried: negotiated.retried,
            resumed: negotiated.resumed,
            mesh: true,
        }
    }

    /// An originated session, once its handshake is done.
    pub fn originated(conn: &CommonState) -> Option<Self> {
        Some(Self {
            suite: conn.negotiated_cipher_suite()?.suite(),
            group: conn.negotiated_key_exchange_group().map(|g| g.name()),
            retried: conn.handshake_kind() == Some(HandshakeKind::FullWithHelloRetryRequest),
            resumed: conn.handshake_kind() == Some(HandshakeKind::Resumed),
            mesh: false,
        })
    }

    /// The group as `interceptor flows` shows it.
    pub fn group_label(&self) -> Option<String> {
        let name = handshake::group_name(self.group?);
        Some(if self.retried {
            format!("{name} (retry)")
        } else {
            name
        })
    }

    /// Why `crypto` would not allow this session now, if it would not.
    pub fn refused_by(&self, crypto: &MeshCrypto) -> Option<String> {
        if self.mesh {
            crypto.refuses(self.suite, self.group)
        } else {
            handshake::origination_refuses(crypto.policy(), self.suite, self.group)
        }
    }
}

/// What an open flow was decided on, kept so a new policy can decide it again.
#[derive(Debug, Clone)]
pub enum FlowCheck {
    Inbound(InboundCheck),
    Outbound(OutboundCheck),
    /// A same-node flow: the client's outbound decision and the server's inbound one, both
    /// taken again.
    Local(Box<LocalCheck>),
}

/// Both halves of a same-node flow's decision.
#[derive(Debug, Clone)]
pub struct LocalCheck {
    pub outbound: OutboundCheck,
    pub inbound: InboundCheck,
}

/// An inbound flow: who connected to which workload port, with which proven identity.
#[derive(Debug, Clone)]
pub struct InboundCheck {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub peer: Option<SpiffeId>,
}

/// An outbound flow: the endpoint it is connected to (a service VIP's pick must not change
/// when it is decided again) and the protection it actually runs.
#[derive(Debug, Clone)]
pub struct OutboundCheck {
    /// The client workload's address (its pod IP, which policy knows) and the app's port.
    pub source: SocketAddr,
    /// Where the app connected.
    pub destination: SocketAddr,
    pub endpoint: SocketAddr,
    pub client: SpiffeId,
    pub tls: FlowTls,
}

/// Closes a flow from outside its task: the flow's relay waits on it next to the data.
#[derive(Debug, Default)]
pub struct Cancel {
    notify: Notify,
    fired: AtomicBool,
    /// Why a policy change closed the flow, for its access-log line.
    code: std::sync::OnceLock<RefusalCode>,
    /// An upgrade asks the flow's relay to park; its state goes to this sender (dropped
    /// unsent if the flow ends first, or its relay cannot park).
    park: Mutex<Option<tokio::sync::oneshot::Sender<Parked>>>,
}

/// A kTLS flow stopped for a successor agent: the relay's sockets, pipes and state.
pub type Parked = Box<crate::relay::ParkedKtls>;

/// A flow being parked: what it is, and where its relay's state arrives.
pub struct Parking {
    pub info: FlowInfo,
    pub check: Option<FlowCheck>,
    pub relay: tokio::sync::oneshot::Receiver<Parked>,
}

impl Cancel {
    /// Asks the flow to close; true the first time.
    pub fn fire(&self) -> bool {
        let first = !self.fired.swap(true, Ordering::AcqRel);
        if first {
            // Stores a permit if the flow is not waiting yet.
            self.notify.notify_one();
        }
        first
    }

    /// Asks the flow to park its relay for a successor; its state arrives on the receiver.
    fn park(&self) -> tokio::sync::oneshot::Receiver<Parked> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        *self.park.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        self.notify.notify_one();
        rx
    }

    /// Whether an upgrade asked the flow to park.
    pub fn parking(&self) -> bool {
        self.park
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Hands the parked relay to whoever asked; gives it back if they went away.
    pub fn parked(&self, relay: Parked) -> Result<(), Parked> {
        match self.park.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(tx) => tx.send(relay),
            None => Err(relay),
        }
    }

    /// [`Cancel::fire`] for a flow a policy no longer allows.
    pub fn fire_because(&self, code: RefusalCode) -> bool {
        let _ = self.code.set(code);
        self.fire()
    }

    /// The refusal that closed the flow, if a policy did.
    pub fn code(&self) -> Option<RefusalCode> {
        self.code.get().copied()
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Completes once [`Cancel::fire`] was called.
    pub async fn fired(&self) {
        self.notify.notified().await;
    }
}

#[derive(Debug)]
struct Entry {
    info: FlowInfo,
    stats: Arc<RelayStats>,
    check: Option<FlowCheck>,
    cancel: Arc<Cancel>,
    /// The metrics labels it was counted under when listed (its close counts there too).
    labels: Arc<TcpLabels>,
    opened: std::time::Instant,
    /// Taken over from the agent this one replaced (an upgrade), relay state and all.
    handed_over: bool,
}

/// One row of `interceptor flows --json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct FlowRow {
    pub id: u64,
    pub pod: String,
    pub direction: Direction,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub peer_id: Option<String>,
    pub cipher: Option<String>,
    /// The key-exchange group (`X25519MLKEM768`, `x25519`, …; ` (retry)` after a
    /// HelloRetryRequest).
    #[serde(default)]
    pub group: Option<String>,
    /// Whether the TLS session resumed an earlier one (a ticket) instead of a full
    /// handshake; absent for flows without TLS.
    #[serde(default)]
    pub resumed: Option<bool>,
    pub protection: Protection,
    pub bytes_to_peer: u64,
    pub bytes_from_peer: u64,
    /// A recently closed flow (listed with `--all`).
    #[serde(default)]
    pub closed: bool,
    /// Outbound: where the agent connected (the endpoint a service VIP resolved to).
    #[serde(default)]
    pub endpoint: Option<SocketAddr>,
    /// The policy decision that let the flow through.
    #[serde(default)]
    pub reason: Option<String>,
    /// The `mode` label its metrics carry (`ktls`, `userspace`, `tls`, `plaintext`,
    /// `passthrough`), fixed when it was listed.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// The flow was opened by the agent this one replaced and handed over, open, in an
    /// upgrade (closed rows of the old agent say so with `handed_over` too).
    #[serde(default)]
    pub handed_over: bool,
}

/// How many closed flows `interceptor flows --all` still shows.
const RECENT: usize = 256;

#[derive(Debug, Default)]
pub struct FlowTable {
    /// Counts every flow listed and closed here, so the metrics and `interceptor flows` have
    /// one source.
    telemetry: Arc<Telemetry>,
    next: AtomicU64,
    /// Boxed rows: ids only grow, so the map's nodes are barely half full, and an inline row
    /// (over 500 bytes) would cost about twice its size per open flow.
    flows: Mutex<BTreeMap<u64, Box<Entry>>>,
    /// The last closed flows with their final counts: short connections (a curl) are gone
    /// before anyone can list them, yet operators and the demo want to see how they went.
    /// Kept as they were listed and turned into rows only when someone lists them: every flow
    /// closes, few are ever listed, and a row is several strings (an identity formatted).
    recent: Mutex<std::collections::VecDeque<Closed>>,
}

/// A closed flow in [`FlowTable::recent`]: its row's makings, not its row.
#[derive(Debug)]
struct Closed {
    id: u64,
    info: FlowInfo,
    relay: Option<RelayMode>,
    to_peer: u64,
    from_peer: u64,
    mode: Mode,
    handed_over: bool,
}

impl Closed {
    fn row(&self) -> FlowRow {
        let mut row = row_of(
            self.id,
            &self.info,
            self.relay,
            (self.to_peer, self.from_peer),
            self.mode,
            self.handed_over,
        );
        row.closed = true;
        row
    }
}

/// Removes its flow from the table when the connection ends, however it ends, and counts
/// its close.
pub struct FlowGuard<'a> {
    table: &'a FlowTable,
    id: u64,
    pub stats: Arc<RelayStats>,
    pub cancel: Arc<Cancel>,
    /// How the relay ended; a guard dropped without [`FlowGuard::ended`] (the task was
    /// dropped with the runtime) counts as failed.
    outcome: Outcome,
    reason: Option<String>,
    failure: Option<&'static str>,
}

impl FlowGuard<'_> {
    /// Records how the flow ended, for the close count and the access log.
    pub fn ended(&mut self, outcome: Outcome, reason: Option<String>) {
        self.outcome = outcome;
        self.reason = reason;
    }

    /// Records a failure: `failure` is its short name (counted by it), `reason` the detail.
    pub fn failed(&mut self, failure: &'static str, reason: String) {
        self.outcome = Outcome::Failed;
        self.reason = Some(reason);
        self.failure = Some(failure);
    }
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        let telemetry = &self.table.telemetry;
        let (entry, direction, line) = {
            // `recent` before `flows`, as in `rows_with_recent`: a listing never sees a
            // closing flow in neither place.
            let mut recent = self.table.recent.lock().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = self.table.lock().remove(&self.id) else {
                return;
            };
            let Entry {
                info,
                stats,
                labels,
                opened,
                handed_over,
                ..
            } = *entry;
            // The access line's view of the flow, built only when a line is written: the
            // flow's info then moves into `recent` as it is.
            let line = telemetry.admit_line().map(|format| {
                (
                    format,
                    meta(&info, labels.mode, handed_over, MetaFor::AccessLine),
                )
            });
            let direction = direction(info.direction);
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(Closed {
                id: self.id,
                info,
                relay: stats.mode(),
                to_peer: stats.bytes_app_to_peer(),
                from_peer: stats.bytes_peer_to_app(),
                mode: labels.mode,
                handed_over,
            });
            ((stats, labels, opened), direction, line)
        };
        let (stats, labels, opened) = entry;
        let end = FlowEnd {
            outcome: self.outcome,
            to_peer: stats.bytes_app_to_peer(),
            from_peer: stats.bytes_peer_to_app(),
            duration: opened.elapsed(),
            reason: self.reason.as_deref(),
            failure: self.failure,
        };
        telemetry.flow_closed(direction, &labels, &end, line);
    }
}

/// The telemetry direction of a flow.
pub fn direction(d: Direction) -> telemetry::Direction {
    match d {
        Direction::Outbound => telemetry::Direction::Outbound,
        Direction::Inbound => telemetry::Direction::Inbound,
    }
}

/// The metrics mode of a flow as listed: plaintext is `plaintext` with a mesh workload this
/// node knows and `passthrough` with anyone else.
fn mode(t: &Telemetry, info: &FlowInfo) -> Mode {
    match info.protection {
        Protection::Ktls => Mode::Ktls,
        Protection::Userspace => Mode::Userspace,
        Protection::Tls => Mode::Tls,
        Protection::Local => Mode::Local,
        Protection::Plaintext => t.plaintext_mode(match info.direction {
            Direction::Outbound => info.endpoint.unwrap_or(info.destination).ip(),
            Direction::Inbound => info.source.ip(),
        }),
    }
}

/// Who a [`FlowMeta`] is built for.
#[derive(Clone, Copy, PartialEq)]
enum MetaFor {
    /// The metrics labels: the ends and the mode, no more.
    Labels,
    /// An access line: the session (cipher, group) and the decision too.
    AccessLine,
}

/// The flow as its metrics labels or its access line see it; each field is set once.
fn meta(info: &FlowInfo, mode: Mode, handed_over: bool, wanted: MetaFor) -> FlowMeta {
    let line = wanted == MetaFor::AccessLine;
    FlowMeta {
        handed_over,
        direction: direction(info.direction),
        mode,
        pod: info.pod.to_string(),
        source: info.source,
        destination: info.destination,
        endpoint: info.endpoint.filter(|e| *e != info.destination),
        peer_principal: info.peer_id.as_ref().map(ToString::to_string),
        cipher: line
            .then(|| info.cipher.as_deref().map(str::to_owned))
            .flatten(),
        group: line
            .then(|| info.session.and_then(|s| s.group_label()))
            .flatten(),
        decision: line
            .then(|| info.reason.as_deref().map(str::to_owned))
            .flatten(),
    }
}

fn row(id: u64, entry: &Entry) -> FlowRow {
    let c = &entry.stats;
    row_of(
        id,
        &entry.info,
        c.mode(),
        (c.bytes_app_to_peer(), c.bytes_peer_to_app()),
        entry.labels.mode,
        entry.handed_over,
    )
}

/// A flow's row from what it was listed with, its relay's mode and byte counts (to the
/// peer, from the peer).
fn row_of(
    id: u64,
    i: &FlowInfo,
    relay: Option<RelayMode>,
    (to_peer, from_peer): (u64, u64),
    mode: Mode,
    handed_over: bool,
) -> FlowRow {
    FlowRow {
        id,
        pod: i.pod.to_string(),
        direction: i.direction,
        source: i.source,
        destination: i.destination,
        peer_id: i.peer_id.as_ref().map(ToString::to_string),
        cipher: i.cipher.as_deref().map(str::to_owned),
        group: i.session.and_then(|s| s.group_label()),
        resumed: i.session.map(|s| s.resumed),
        protection: protection(i.protection, relay),
        bytes_to_peer: to_peer,
        bytes_from_peer: from_peer,
        closed: false,
        endpoint: i.endpoint,
        reason: i.reason.as_deref().map(str::to_owned),
        mode: Some(mode),
        handed_over,
    }
}

/// What a mesh flow's relay actually runs, not what the node offered: a flow the kernel
/// would not take (the ULP refused on a socket the peer had already half-closed) is relayed by
/// rustls and must be listed as such.
fn protection(planned: Protection, relay: Option<RelayMode>) -> Protection {
    match (planned, relay) {
        (Protection::Ktls | Protection::Userspace, Some(RelayMode::Ktls)) => Protection::Ktls,
        (Protection::Ktls | Protection::Userspace, Some(RelayMode::Userspace)) => {
            Protection::Userspace
        }
        (planned, _) => planned,
    }
}

impl FlowTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Box<Entry>>> {
        // A panic while holding the lock cannot leave the map inconsistent (single insert or
        // remove), so a poisoned lock is still usable.
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A table whose flows are counted in `telemetry`.
    pub fn new(telemetry: Arc<Telemetry>) -> Self {
        Self {
            telemetry,
            ..Default::default()
        }
    }

    pub fn insert(&self, info: FlowInfo) -> FlowGuard<'_> {
        self.insert_checked(info, None)
    }

    /// Inserts a flow whose admission `check` is re-decided when the policy changes.
    pub fn insert_checked(&self, info: FlowInfo, check: Option<FlowCheck>) -> FlowGuard<'_> {
        self.insert_entry(info, check, false)
    }

    /// Lists a flow a predecessor agent handed over, open (see `handover`).
    pub fn insert_handed_over(&self, info: FlowInfo, check: Option<FlowCheck>) -> FlowGuard<'_> {
        self.insert_entry(info, check, true)
    }

    fn insert_entry(
        &self,
        info: FlowInfo,
        check: Option<FlowCheck>,
        handed_over: bool,
    ) -> FlowGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let stats = RelayStats::new();
        let cancel = Arc::new(Cancel::default());
        let labels = self.telemetry.flow_opened(&meta(
            &info,
            mode(&self.telemetry, &info),
            handed_over,
            MetaFor::Labels,
        ));
        self.lock().insert(
            id,
            Box::new(Entry {
                info,
                stats: Arc::clone(&stats),
                check,
                cancel: Arc::clone(&cancel),
                labels,
                opened: std::time::Instant::now(),
                handed_over,
            }),
        );
        FlowGuard {
            table: self,
            id,
            stats,
            cancel,
            outcome: Outcome::Failed,
            reason: None,
            failure: None,
        }
    }

    /// Updates a flow once the handshake has told us who the peer is.
    pub fn update(&self, id: u64, f: impl FnOnce(&mut FlowInfo)) {
        if let Some(entry) = self.lock().get_mut(&id) {
            f(&mut entry.info);
        }
    }

    /// Re-decides every open flow that has a check: `allowed` returning the refusal closes it
    /// (its relay resets both connections). Returns how many were closed.
    pub fn revalidate(
        &self,
        mut allowed: impl FnMut(&FlowInfo, &FlowCheck) -> Result<(), RefusalCode>,
    ) -> usize {
        let mut closed = 0;
        for entry in self.lock().values() {
            let Some(check) = &entry.check else { continue };
            if entry.cancel.is_fired() {
                continue;
            }
            if let Err(code) = allowed(&entry.info, check)
                && entry.cancel.fire_because(code)
            {
                closed += 1;
            }
        }
        closed
    }

    /// Asks every open kTLS flow with a policy check (mesh flows) to park its relay for a
    /// successor agent. Flows being closed by a policy change are left to close.
    pub fn park_ktls(&self) -> Vec<Parking> {
        self.lock()
            .values()
            .filter(|e| e.stats.mode() == Some(RelayMode::Ktls) && !e.cancel.is_fired())
            .filter(|e| e.check.is_some())
            .map(|e| Parking {
                info: e.info.clone(),
                check: e.check.clone(),
                relay: e.cancel.park(),
            })
            .collect()
    }

    /// Open flows.
    pub fn rows(&self) -> Vec<FlowRow> {
        self.lock().iter().map(|(id, e)| row(*id, e)).collect()
    }

    /// Recently closed flows, oldest first, then the open ones.
    pub fn rows_with_recent(&self) -> Vec<FlowRow> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<FlowRow> = recent.iter().map(Closed::row).collect();
        rows.extend(self.rows());
        rows
    }
}

impl FlowGuard<'_> {
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The human table.
pub fn render(rows: &[FlowRow]) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<16} {:<8} {:<24} {:<48} {:<12} {:<16} {:<7} {:<10} {:>12} {:>12}\n",
        "POD",
        "DIR",
        "DESTINATION",
        "PEER",
        "CIPHER",
        "GROUP",
        "RESUMED",
        "MODE",
        "BYTES_OUT",
        "BYTES_IN"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<16} {:<8} {:<24} {:<48} {:<12} {:<16} {:<7} {:<10} {:>12} {:>12}",
            r.pod,
            match r.direction {
                Direction::Outbound => "out",
                Direction::Inbound => "in",
            },
            r.destination.to_string(),
            r.peer_id.as_deref().unwrap_or("-"),
            r.cipher.as_deref().unwrap_or("-"),
            r.group.as_deref().unwrap_or("-"),
            match r.resumed {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            },
            match r.protection {
                Protection::Ktls => "ktls",
                Protection::Userspace => "userspace",
                Protection::Plaintext => "plaintext",
                Protection::Tls => "tls",
                Protection::Local => "local",
            },
            r.bytes_to_peer,
            r.bytes_from_peer
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_protection_follows_the_relay_that_runs() {
        use Protection::*;
        // Planned kTLS, relay fell back to rustls: the listing must say userspace.
        assert_eq!(protection(Ktls, Some(RelayMode::Userspace)), Userspace);
        assert_eq!(protection(Ktls, Some(RelayMode::Ktls)), Ktls);
        assert_eq!(protection(Userspace, Some(RelayMode::Userspace)), Userspace);
        // Still handshaking: the plan is all there is.
        assert_eq!(protection(Ktls, None), Ktls);
        // Plaintext and origination flows have no mesh record layer to report.
        assert_eq!(protection(Plaintext, Some(RelayMode::Userspace)), Plaintext);
        assert_eq!(protection(Tls, Some(RelayMode::Userspace)), Tls);
    }

    #[test]
    fn a_policy_close_keeps_its_refusal_code_for_the_access_log() {
        let cancel = Cancel::default();
        assert_eq!(cancel.code(), None);
        assert!(cancel.fire_because(RefusalCode::DenyRule));
        // A second decision does not rewrite why the flow was closed.
        assert!(!cancel.fire_because(RefusalCode::CryptoPolicy));
        assert!(cancel.is_fired());
        assert_eq!(cancel.code(), Some(RefusalCode::DenyRule));
    }

    fn outbound_info() -> FlowInfo {
        FlowInfo {
            pod: Arc::from("web"),
            direction: Direction::Outbound,
            destination: "10.96.0.10:80".parse().unwrap(),
            source: "10.88.0.2:40000".parse().unwrap(),
            peer_id: Some("spiffe://cluster.local/ns/a/sa/b".parse().unwrap()),
            cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
            session: Some(SessionCrypto {
                suite: CipherSuite::TLS13_AES_128_GCM_SHA256,
                group: Some(NamedGroup::X25519),
                retried: false,
                resumed: true,
                mesh: true,
            }),
            protection: Protection::Userspace,
            endpoint: Some("10.88.1.3:80".parse().unwrap()),
            reason: Some(String::from("auto mTLS (STRICT)").into()),
        }
    }

    /// What the table keeps does not grow with the flows it has carried: open flows only,
    /// and the last [`RECENT`] closed ones (sustained churn closes hundreds of thousands).
    #[test]
    fn the_table_keeps_open_flows_and_a_bounded_recent_list() {
        let table = FlowTable::default();
        let held = table.insert(outbound_info());
        for _ in 0..10_000 {
            drop(table.insert(outbound_info()));
        }
        assert_eq!(table.lock().len(), 1);
        assert_eq!(
            table.recent.lock().unwrap_or_else(|p| p.into_inner()).len(),
            RECENT
        );
        let rows = table.rows_with_recent();
        assert_eq!(rows.len(), RECENT + 1);
        assert_eq!(rows.iter().filter(|r| !r.closed).count(), 1);
        drop(held);
        assert!(table.lock().is_empty());
    }

    #[test]
    fn labels_leave_the_session_out_and_access_lines_keep_it() {
        let info = outbound_info();
        let labels = meta(&info, Mode::Userspace, false, MetaFor::Labels);
        let line = meta(&info, Mode::Userspace, false, MetaFor::AccessLine);
        assert_eq!(
            (&labels.cipher, &labels.group, &labels.decision),
            (&None, &None, &None)
        );
        assert_eq!(
            (
                line.cipher.as_deref(),
                line.group.as_deref(),
                line.decision.as_deref()
            ),
            (
                Some("TLS13_AES_128_GCM_SHA256"),
                Some("x25519"),
                Some("auto mTLS (STRICT)")
            )
        );
        // The ends are the same for both.
        for m in [&labels, &line] {
            assert_eq!(
                (m.pod.as_str(), m.peer_principal.as_deref(), m.endpoint),
                (
                    "web",
                    Some("spiffe://cluster.local/ns/a/sa/b"),
                    info.endpoint
                )
            );
        }
    }

    #[test]
    fn a_closed_flow_keeps_everything_it_was_listed_with() {
        let table = FlowTable::default();
        let guard = table.insert(outbound_info());
        let open = table.rows();
        drop(guard);
        assert!(table.rows().is_empty());
        let recent = table.rows_with_recent();
        assert_eq!(recent.len(), 1);
        let closed = &recent[0];
        assert!(closed.closed);
        let mut want = open[0].clone();
        want.closed = true;
        assert_eq!(
            serde_json::to_value(closed).unwrap(),
            serde_json::to_value(&want).unwrap()
        );
        assert_eq!(closed.reason.as_deref(), Some("auto mTLS (STRICT)"));
    }

    fn session_resumed(s: &SessionCrypto) -> Option<bool> {
        Some(s.resumed)
    }

    #[test]
    fn flows_show_the_negotiated_group_beside_the_suite() {
        let session = SessionCrypto {
            suite: CipherSuite::TLS13_AES_128_GCM_SHA256,
            group: Some(NamedGroup::secp256r1),
            retried: true,
            resumed: true,
            mesh: true,
        };
        assert_eq!(session.group_label().as_deref(), Some("secp256r1 (retry)"));
        let row = FlowRow {
            id: 1,
            pod: "web".into(),
            direction: Direction::Inbound,
            source: "10.88.0.2:40000".parse().unwrap(),
            destination: "10.88.0.3:80".parse().unwrap(),
            peer_id: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
            group: Some("X25519MLKEM768".into()),
            resumed: session_resumed(&session),
            protection: Protection::Ktls,
            bytes_to_peer: 0,
            bytes_from_peer: 0,
            closed: false,
            endpoint: None,
            reason: None,
            mode: None,
            handed_over: false,
        };
        let table = render(std::slice::from_ref(&row));
        let header = table.lines().next().unwrap();
        let line = table.lines().nth(1).unwrap();
        assert!(
            header.contains("CIPHER") && header.contains("GROUP"),
            "{table}"
        );
        assert!(line.contains("X25519MLKEM768"), "{table}");
        assert!(
            header.contains("RESUMED") && line.contains(" yes "),
            "{table}"
        );
        // `--json` carries it; rows from an agent without the field still parse.
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(json["group"], "X25519MLKEM768");
        let mut old = json.clone();
        assert_eq!(json["resumed"], true);
        old.as_object_mut().unwrap().remove("group");
        old.as_object_mut().unwrap().remove("resumed");
        let parsed: FlowRow = serde_json::from_value(old).unwrap();
        assert_eq!(parsed.group, None);
        assert_eq!(parsed.resumed, None);
    }
}
