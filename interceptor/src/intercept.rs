//! Per-pod interception: the agent's listeners inside each enrolled pod's netns, and what
//! happens to every connection they accept. The modules follow the data:
//!
//! * `pod`: enrolling a pod (listeners, datapath registration) and its accept loops;
//! * `flow`: one accepted connection, from set-up to the end of its relay; the one place a
//!   refused connection is counted, logged and answered;
//! * `outbound`: decide, dial, then one set-up per transport (plaintext, mesh mTLS,
//!   TLS origination);
//! * `inbound`: classify the first bytes, then mesh mTLS or plaintext per policy, dial the app;
//! * `local`: the same-node fast path, for an outbound flow to a pod this agent enrolled;
//! * `handoff`: list an established flow and start its relay (kTLS, userspace, plain);
//! * `revalidate`: decide open flows again when policy changes.

mod counters;
pub mod enforce;
pub mod files;
mod flow;
mod handoff;
mod inbound;
pub mod limits;
mod local;
pub mod originate;
mod outbound;
pub mod peek;
mod pod;
mod revalidate;
mod spare;
pub mod table;

pub use self::{
    counters::{Counters, DerivedOutcome, SpareOutcome},
    handoff::adopt_parked,
    pod::{PodHandle, enroll, pod_netns_cookie, unenroll},
    revalidate::{apply_steering, decide_handed_over, revalidate},
};

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tracing::{debug, warn};

use crate::{
    ca::{
        CertificateAuthority,
        renew::{Clock, LeafStore, RenewPolicy},
    },
    config::Tuning,
    datapath::Datapath,
    handshake::{
        self, Credentials, CryptoPolicy, MeshCrypto, MeshSuite, SessionResumption, driver,
    },
    identity::{SpiffeId, TrustDomain},
    refusal::RefusalCode,
    telemetry::Telemetry,
};

use self::{
    enforce::{Enforcer, Refused},
    limits::LogLimiter,
    table::FlowTable,
};

/// The agent reaches apps from this address; sk_lookup never steers it (see `lookup.rs`).
pub const AGENT_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// How the agent protects mesh flows on this node, decided once from the start-up probe.
#[derive(Debug, Clone)]
pub enum Offload {
    /// kTLS with these suites (the kernel accepted them on a real socket at start-up).
    Kernel(Vec<MeshSuite>),
    Userspace,
}

/// The CA material in effect: the signer and the trust bundle, replaced as a whole when the
/// files in `caDir` change.
pub struct Material {
    pub ca: Arc<dyn CertificateAuthority>,
    pub roots: Arc<rustls::RootCertStore>,
    /// Bumped on every replacement; credentials minted under an older one are renewed.
    pub generation: u64,
}

/// How workload certificates are renewed, and the wall clock that decides it.
pub struct Identity {
    pub renew: RenewPolicy,
    pub clock: Arc<dyn Clock>,
}

/// Everything the flow handlers share.
pub struct Shared {
    pub trust_domain: TrustDomain,
    material: RwLock<Arc<Material>>,
    pub offload: Offload,
    pub tuning: Tuning,
    pub datapath: Mutex<Datapath>,
    /// Istio security policy: the current generation and how to load the next.
    pub policy: Enforcer,
    pub flows: FlowTable,
    /// Refusals and policy closes by code, failed flows and accepts.
    pub counters: Counters,
    /// Metrics and the access log (the flow table counts into it too).
    pub telemetry: Arc<Telemetry>,
    credentials: LeafStore<Credentials>,
    /// Each identity's store of derived-key roots, handed from a leaf to its renewal; every
    /// one alive is swept by [`Shared::renew_due`], which erases the expired and spent roots
    /// there, so a root lives no longer than its bound even on an agent that no connection
    /// touches.
    derived_stores: handshake::derived::Stores,
    /// Bumped by every crypto policy change, so leaves' configs are rebuilt under it.
    crypto_generation: AtomicU64,
    /// Samples the warnings a remote party can cause (refusals, failed flows, failed
    /// accepts); see [`Shared::sample`].
    log_limiter: Mutex<LogLimiter>,
    log_flush_started: AtomicBool,
    /// The node's crypto policy over the suites `offload` carries; see [`Shared::set_crypto`].
    crypto: RwLock<Arc<MeshCrypto>>,
    /// Session resumption between agents (`tuning.sessionResumption`): configs minted from
    /// now on issue and keep tickets under it. Its epoch is the policy generation, so no
    /// ticket outlives a policy reload; a new leaf, CA or crypto policy builds new configs,
    /// whose stores start empty.
    resumption: SessionResumption,
    /// Whether accept loops accept. Closed while a new agent takes listeners over: the old
    /// agent accepts on them until it confirms it stopped, so only one process ever accepts
    /// and a successor killed half-way has taken no connection with it.
    pub accepting: tokio::sync::watch::Sender<bool>,
    /// Connections accepted and not yet closed, set-up included (the flow table lists a flow
    /// only once it is decided): what a draining agent waits for before it exits.
    pub live: AtomicU64,
    /// The pods this agent enrolled, by address: the same-node fast path's directory (see
    /// `local`). Weak, so a pod whose listeners and flows are gone is gone here too.
    local_pods: RwLock<HashMap<IpAddr, Weak<pod::PodCtx>>>,
}

/// Counts one accepted connection in [`Shared::live`] for as long as it is held.
pub(crate) struct Live(Arc<Shared>);

impl Live {
    pub(crate) fn count(shared: &Arc<Shared>) -> Live {
        shared.live.fetch_add(1, Ordering::Relaxed);
        Live(Arc::clone(shared))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per reason, the first [`LOG_BURST`] warnings of every [`LOG_INTERVAL`] are logged; the
/// rest are summed into one line when the interval ends. Counters count every event.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
const LOG_BURST: u32 = 5;

/// The node state start-up decided, each piece by its own step, that [`Shared`] is built on.
pub struct NodeParts {
    pub trust_domain: TrustDomain,
    pub ca: Arc<dyn CertificateAuthority>,
    pub identity: Identity,
    pub offload: Offload,
    pub tuning: Tuning,
    pub datapath: Datapath,
    pub policy: Enforcer,
    pub crypto: CryptoPolicy,
    pub telemetry: Arc<Telemetry>,
}

impl Shared {
    /// A peer agent declined the ticket a resumed offer carried; the flow dials again with a
    /// full handshake. Counted for `flows --stats` (`tickets.declined`) and the metrics
    /// (`interceptor_resumption_tickets_declined_total`).
    pub(crate) fn ticket_declined(&self) {
        self.counters.ticket_declined();
        self.telemetry.ticket_declined();
    }

    /// One derived-key connection's outcome, for the flow stats and the metrics alike.
    pub(crate) fn derived(&self, outcome: DerivedOutcome) {
        self.counters.derived(outcome);
        self.telemetry.derived_at(outcome.index(), outcome.name());
    }

    /// The sk_msg leg join's maps, when `tuning.sameNodeJoin: skMsg` turned it on.
    pub(crate) fn join_maps(&self) -> Option<Arc<std::sync::Mutex<crate::datapath::JoinMaps>>> {
        self.datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join_maps()
    }

    pub fn new(parts: NodeParts) -> anyhow::Result<Self> {
        let NodeParts {
            trust_domain,
            ca,
            identity,
            offload,
            tuning,
            datapath,
            policy,
            crypto,
            telemetry,
        } = parts;
        let roots = handshake::mesh_roots(ca.roots()).context("mesh roots")?;
        let crypto = MeshCrypto::new(crypto, suites(&offload)).context("crypto")?;
        crypto.warm_up();
        let resumption = if tuning.session_resumption {
            SessionResumption::new(tuning.ticket_lifetime(), policy.generation_counter())
        } else {
            SessionResumption::disabled()
        };
        Ok(Self {
            trust_domain,
            material: RwLock::new(Arc::new(Material {
                ca,
                roots,
                generation: 0,
            })),
            offload,
            tuning,
            datapath: Mutex::new(datapath),
            policy,
            counters: Counters::default(),
            flows: FlowTable::new(Arc::clone(&telemetry)),
            telemetry,
            credentials: LeafStore::new(identity.clock, identity.renew),
            derived_stores: handshake::derived::Stores::default(),
            crypto_generation: AtomicU64::new(0),
            log_limiter: Mutex::new(LogLimiter::new(LOG_INTERVAL, LOG_BURST)),
            log_flush_started: AtomicBool::new(false),
            crypto: RwLock::new(Arc::new(crypto)),
            resumption,
            accepting: tokio::sync::watch::Sender::new(true),
            live: AtomicU64::new(0),
            local_pods: RwLock::new(HashMap::new()),
        })
    }

    /// Every identity with a leaf and when that leaf expires.
    pub fn certificate_expiries(&self) -> Vec<(SpiffeId, SystemTime)> {
        self.credentials.expiries()
    }

    /// The signer and trust bundle new handshakes use.
    pub fn material(&self) -> Arc<Material> {
        Arc::clone(&self.material.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts new CA material into effect: every identity's leaf is reissued by the new signer
    /// and its configs rebuilt on the new bundle at its next handshake (or sweep). Open flows
    /// are untouched. Fails, keeping the current material, if the bundle is unusable.
    pub fn replace_ca(&self, ca: Arc<dyn CertificateAuthority>) -> anyhow::Result<u64> {
        let roots = handshake::mesh_roots(ca.roots()).context("mesh roots")?;
        let generation = self.material().generation + 1;
        let material = Arc::new(Material {
            ca,
            roots,
            generation,
        });
        // Mint under the new material before publishing it, so the handshakes right after a
        // reload do not each wait for a key generation (the peer may be timing our first
        // bytes). A handshake that still sees the old material keeps using these.
        let minted = self.credentials.sweep(
            self.leaf_generation(&material),
            Duration::ZERO,
            |id, now, ttl| self.mint(&material, id, now, ttl),
        );
        *self.material.write().unwrap_or_else(|p| p.into_inner()) = material;
        debug!(generation, minted, "CA material replaced");
        Ok(generation)
    }

    /// What a held leaf's configs were built under: CA material and crypto policy. Both only
    /// grow, so their sum grows whenever either changes, and the leaf store replaces any leaf
    /// built under a smaller one.
    fn leaf_generation(&self, material: &Material) -> u64 {
        material.generation + self.crypto_generation.load(Ordering::SeqCst)
    }

    /// Renews every leaf due within `ahead` or minted under older material; returns how many.
    pub fn renew_due(&self, ahead: Duration) -> usize {
        // The same periodic sweep retires derived-key roots (seconds late at most).
        let retired = self.retire_derived_roots();
        if retired > 0 {
            debug!(retired, "derived-key roots erased");
        }
        let material = self.material();
        self.credentials
            .sweep(self.leaf_generation(&material), ahead, |id, now, ttl| {
                self.mint(&material, id, now, ttl)
            })
    }

    /// Whether to log this occurrence of `kind` (`refused`, `flow_failed`, ...) with `code`:
    /// true for the first few of each interval. Logs the summary of a previous interval
    /// whose occurrences were left out.
    fn sample(&self, kind: &'static str, code: &'static str) -> bool {
        let (log, summary) = self
            .log_limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check((kind, code), std::time::Instant::now());
        if let Some(s) = summary {
            log_suppressed(&s);
        }
        log
    }

    /// Reports left-out warnings even when the flood that caused them stopped: a task that
    /// flushes the limiter every interval while `self` lives.
    fn start_log_flush(self: &Arc<Self>) {
        if self
            .log_flush_started
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let weak: Weak<Shared> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOG_INTERVAL);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                let summaries = shared
                    .log_limiter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .flush(std::time::Instant::now());
                for s in &summaries {
                    log_suppressed(s);
                }
            }
        });
    }

    /// What mesh handshakes offer and accept now.
    pub fn crypto(&self) -> Arc<MeshCrypto> {
        Arc::clone(&self.crypto.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// `policy` over the suites this node's data path carries; an error if none is left.
    pub fn resolve_crypto(
        &self,
        policy: CryptoPolicy,
    ) -> Result<MeshCrypto, handshake::TlsConfigError> {
        MeshCrypto::new(policy, suites(&self.offload))
    }

    /// Puts new crypto into effect: handshakes from now on use it, and every open flow whose
    /// session it would not allow is closed (logged, `closed.crypto_policy`). Returns how many
    /// were closed.
    pub fn set_crypto(&self, crypto: MeshCrypto) -> usize {
        crypto.warm_up();
        let crypto = Arc::new(crypto);
        *self.crypto.write().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&crypto);
        // Configs are rebuilt at their next use: the policy is written before the generation
        // moves, so a config built under the new generation reads the new policy.
        self.crypto_generation.fetch_add(1, Ordering::SeqCst);
        self.flows.revalidate(|info, check| {
            let Some(why) = info.session.and_then(|s| s.refused_by(&crypto)) else {
                return Ok(());
            };
            let refused = Refused {
                code: RefusalCode::CryptoPolicy,
                reason: why,
            };
            flow::closed(
                self,
                &flow::Ends::of(check, &info.pod),
                "the new crypto policy",
                &refused,
            );
            Err(refused.code)
        })
    }

    /// The leaf and server config of a service account, current at this moment: minted on
    /// first use and renewed when due, when the CA material changed, or when the wall clock is
    /// outside the leaf's validity (see `ca::renew`). A handshake never presents a leaf that is
    /// not valid now; with none left and the CA failing, the flow is refused.
    fn credentials(&self, id: &SpiffeId) -> anyhow::Result<Arc<Credentials>> {
        let material = self.material();
        self.credentials
            .get(id, self.leaf_generation(&material), |id, now, ttl| {
                self.mint(&material, id, now, ttl)
            })
            .map_err(|e| e.context(format!("credentials of {id}")))
    }

    fn mint(
        &self,
        material: &Material,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> anyhow::Result<Credentials> {
        let leaf = material
            .ca
            .issue_at(id, ttl, now)
            .context("issue leaf certificate")?;
        // A renewal under the same CA material and crypto policy keeps the identity's roots
        // (see `derived::Stores`): a handshake that began under the old leaf keeps its root
        // where the next header looks, and the client keeps what it learned of its servers.
        let derived = self
            .derived_stores
            .for_leaf(id, self.leaf_generation(material));
        let credentials = Credentials::new(
            leaf,
            Arc::clone(&material.roots),
            &self.trust_domain,
            self.crypto(),
            &self.resumption,
            derived,
        )?;
        Ok(credentials)
    }

    /// Erases every root of derived connection keys past its lifetime or connection budget
    /// (`tuning.derivedRootLifetimeSecs`, `derivedRootMaxConnections`); returns how many.
    pub fn retire_derived_roots(&self) -> usize {
        let stores = self.derived_stores.live();
        let retired = stores.iter().map(|s| s.retire_expired()).sum();
        for _ in 0..retired {
            self.derived(DerivedOutcome::Retired);
        }
        retired
    }

    /// Roots of derived connection keys held in memory now, as server and as client, over
    /// every store still alive (a replaced generation's lives while a flow holds it): what
    /// a soak watches to see the stores stay bounded.
    pub fn derived_roots_held(&self) -> (usize, usize) {
        let stores = self.derived_stores.live();
        stores
            .iter()
            .map(|s| s.len())
            .fold((0, 0), |(a, b), (s, c)| (a + s, b + c))
    }

    /// Record-exact handshake reads where kTLS may take the session over (the kernel must
    /// find the peer's first records still queued); reads ahead, with fewer system calls,
    /// where the session stays in rustls anyway.
    fn handshake_reads(&self) -> driver::Reads {
        match self.offload {
            Offload::Kernel(_) => driver::Reads::RecordExact,
            Offload::Userspace => driver::Reads::Ahead,
        }
    }

    /// Lists an enrolled pod's addresses in the same-node directory.
    fn add_local_pod(&self, ctx: &Arc<pod::PodCtx>) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        for ip in &ctx.ips {
            pods.insert(ip.to_canonical(), Arc::downgrade(ctx));
        }
    }

    /// Takes an unenrolled pod's addresses out of the same-node directory (an address IPAM
    /// gives to the next pod must not lead to the old one).
    fn remove_local_pod(&self, ips: &[IpAddr]) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        for ip in ips {
            pods.remove(&ip.to_canonical());
        }
    }

    /// The pod this agent enrolled at `ip`, if any.
    fn local_pod(&self, ip: IpAddr) -> Option<Arc<pod::PodCtx>> {
        self.local_pods
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip.to_canonical())
            .and_then(Weak::upgrade)
    }

    fn datapath(&self) -> std::sync::MutexGuard<'_, Datapath> {
        self.datapath.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The suites the data path carries.
fn suites(offload: &Offload) -> &[MeshSuite] {
    match offload {
        Offload::Kernel(s) => s,
        Offload::Userspace => MeshSuite::AES_GCM,
    }
}

/// One sampled line for the warnings of one kind and code left out of the last interval.
fn log_suppressed(s: &limits::Suppressed) {
    let (kind, code) = s.key;
    warn!(
        target: "interceptor::policy",
        "{} more {kind} [{code}] in the last {:?} not logged (all counted)",
        s.count,
        s.interval,
    );
}
