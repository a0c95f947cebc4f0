//! Per-pod interception: the agent's listeners inside each enrolled pod's netns, and what
//! happens to every connection they accept (outbound: dial the original destination, mTLS,
//! kTLS, relay; inbound: classify, mTLS or plaintext per policy, relay to the app).

pub mod enforce;
pub mod files;
pub mod limits;
pub mod originate;
pub mod peek;
pub mod table;

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use rustls::{ClientConfig, ServerConfig};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpSocket, TcpStream},
};
use tracing::{debug, info, warn};

use crate::{
    ca::{
        CertificateAuthority, LeafCert,
        renew::{Clock, HoldsLeaf, LeafStore, RenewPolicy},
    },
    config::{Tuning, Workload},
    datapath::Datapath,
    handshake::{self, CryptoPolicy, HandshakeError, MeshCrypto, MeshSuite, driver},
    identity::{SpiffeId, TrustDomain},
    policy::FlowTls,
    relay, sys,
};
use interceptor_common::{
    ACTION_STEER, POD_FLAG_LOCAL_LEG_SKMSG, POD_FLAG_STEER_INBOUND, PodConfig,
};

use self::{
    enforce::{Enforcer, Generation, Plan, Refused, Transport},
    limits::{AcceptBackoff, CapExceeded, FlowPermit, LogLimiter, PodLimits},
    peek::FirstBytes,
    table::{
        Cancel, Direction, FlowCheck, FlowGuard, FlowInfo, FlowTable, InboundCheck, OutboundCheck,
        Protection, SessionCrypto,
    },
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

/// One service account's credentials and the rustls configs built from them.
struct Credentials {
    leaf: LeafCert,
    server: Arc<ServerConfig>,
    /// The trust store the configs were built with (client configs are built lazily).
    roots: Arc<rustls::RootCertStore>,
    /// Client configs by expected server identity (the verifier pins it).
    clients: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

impl HoldsLeaf for Credentials {
    fn leaf(&self) -> &LeafCert {
        &self.leaf
    }
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
    credentials: LeafStore<Credentials>,
    /// Bumped by every crypto policy change, so leaves' configs are rebuilt under it.
    crypto_generation: AtomicU64,
    /// Samples the warnings a remote party can cause (refusals, failed flows, failed
    /// accepts); see [`Shared::sample`].
    log_limiter: Mutex<LogLimiter>,
    log_flush_started: AtomicBool,
    /// The node's crypto policy over the suites `offload` carries; see [`Shared::set_crypto`].
    crypto: RwLock<Arc<MeshCrypto>>,
}

/// Per reason, the first [`LOG_BURST`] warnings of every [`LOG_INTERVAL`] are logged; the
/// rest are summed into one line when the interval ends. Counters count every event.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
const LOG_BURST: u32 = 5;

impl Shared {
    // Each argument is one independent piece of node state the agent decided at start-up.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trust_domain: TrustDomain,
        ca: Arc<dyn CertificateAuthority>,
        identity: Identity,
        offload: Offload,
        tuning: Tuning,
        datapath: Datapath,
        policy: Enforcer,
        crypto: CryptoPolicy,
    ) -> anyhow::Result<Self> {
        let roots = handshake::mesh_roots(ca.roots()).context("mesh roots")?;
        let crypto = MeshCrypto::new(crypto, suites(&offload)).context("crypto")?;
        crypto.warm_up();
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
            flows: FlowTable::default(),
            credentials: LeafStore::new(identity.clock, identity.renew),
            crypto_generation: AtomicU64::new(0),
            log_limiter: Mutex::new(LogLimiter::new(LOG_INTERVAL, LOG_BURST)),
            log_flush_started: AtomicBool::new(false),
            crypto: RwLock::new(Arc::new(crypto)),
        })
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
                return true;
            };
            let refused = Refused {
                code: "crypto_policy",
                reason: why,
            };
            Refusal::of(check, &info.pod).log_closed_by(self, "the new crypto policy", &refused);
            false
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
        let server = handshake::server_config(
            &leaf,
            Arc::clone(&material.roots),
            &self.trust_domain,
            &self.crypto(),
        )?;
        Ok(Credentials {
            leaf,
            server,
            roots: Arc::clone(&material.roots),
            clients: Mutex::new(HashMap::new()),
        })
    }

    fn client_config(
        &self,
        me: &Credentials,
        expected: &SpiffeId,
    ) -> anyhow::Result<Arc<ClientConfig>> {
        let mut clients = me.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(expected) {
            return Ok(Arc::clone(c));
        }
        let c = handshake::client_config(
            &me.leaf,
            Arc::clone(&me.roots),
            &self.trust_domain,
            expected,
            &self.crypto(),
        )?;
        clients.insert(expected.clone(), Arc::clone(&c));
        Ok(c)
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

/// An enrolled pod: its listeners live as long as this value.
pub struct PodHandle {
    pub workload: Workload,
    pub netns_cookie: u64,
    slot: u32,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PodHandle {
    pub fn slot(&self) -> u32 {
        self.slot
    }
}

impl Drop for PodHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A pod-side context every handler gets.
struct PodCtx {
    name: String,
    id: SpiffeId,
    ips: Vec<IpAddr>,
    netns: std::fs::File,
    netns_cookie: u64,
    /// What the agent holds for this pod as a client (one bucket) and as a server (one bucket
    /// per source address).
    outbound_limits: Arc<PodLimits>,
    inbound_limits: Arc<PodLimits>,
}

/// Opens the pod's listeners inside its netns, registers it with the datapath and starts
/// accepting. `slot` must be unique among enrolled pods (sk_lookup's sockmap index).
///
/// A failure undoes what the attempt had set in the kernel (map entries, the ports it added
/// to the pod's reserved ports, links not yet pinned), so the error changes nothing; links
/// and pins of a previous agent for the pod are left as they were (see
/// [`Datapath::attach_pod`](crate::datapath::Datapath::attach_pod)).
pub fn enroll(shared: &Arc<Shared>, workload: &Workload, slot: u32) -> anyhow::Result<PodHandle> {
    let id = SpiffeId::new(
        shared.trust_domain.clone(),
        &workload.namespace,
        &workload.service_account,
    )?;
    shared.credentials(&id)?;
    let t = shared.tuning.clone();
    let pod = workload.name.clone();
    let (listeners, reserved) = sys::in_netns(&workload.netns, move || {
        let reserved = match sys::reserve_local_ports(&[t.outbound_port, t.inbound_port]) {
            Ok(added) => added,
            Err(e) => {
                // Not fatal: it only matters if the pod widens its ephemeral port range.
                warn!(
                    pod,
                    "cannot reserve the agent's ports against ephemeral use: {e}"
                );
                Vec::new()
            }
        };
        let bind = || -> std::io::Result<_> {
            let out4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, t.outbound_port))?;
            // IPv6 may be disabled in the pod; IPv4 still works then.
            let out6 = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, t.outbound_port)).ok();
            let in4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, t.inbound_port))?;
            let in6 = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, t.inbound_port)).ok();
            Ok((out4, out6, in4, in6))
        };
        match bind() {
            Ok(l) => Ok((l, reserved)),
            Err(e) => {
                let _ = sys::release_local_ports(&reserved);
                Err(e)
            }
        }
    })
    .with_context(|| format!("listeners in netns {}", workload.netns.display()))?;
    let release_ports = |workload: &Workload| {
        if reserved.is_empty() {
            return;
        }
        let ports = reserved.clone();
        if let Err(e) = sys::in_netns(&workload.netns, move || sys::release_local_ports(&ports)) {
            warn!(pod = %workload.name, "cannot release the reserved ports: {e}");
        }
    };
    let (out4, out6, in4, in6) = listeners;
    let netns_cookie = match sys::netns_cookie(out4.as_fd()) {
        Ok(c) => c,
        Err(e) => {
            release_ports(workload);
            return Err(e.into());
        }
    };
    let registered = register(shared, workload, slot, netns_cookie, &in4, in6.as_ref());
    if let Err(e) = registered {
        shared
            .datapath()
            .rollback_pod(netns_cookie, slot, &workload.ips);
        release_ports(workload);
        return Err(e);
    }
    let started = (|| -> anyhow::Result<PodHandle> {
        let ctx = Arc::new(PodCtx {
            name: workload.name.clone(),
            id,
            ips: workload.ips.clone(),
            netns: std::fs::File::open(&workload.netns)?,
            netns_cookie,
            outbound_limits: pod_limits(&shared.tuning),
            inbound_limits: pod_limits(&shared.tuning),
        });
        shared.start_log_flush();
        let mut tasks = Vec::new();
        for (l, direction) in std::iter::once(out4)
            .chain(out6)
            .map(|l| (l, Direction::Outbound))
            .chain(
                std::iter::once(in4)
                    .chain(in6)
                    .map(|l| (l, Direction::Inbound)),
            )
        {
            l.set_nonblocking(true)?;
            tasks.push(accept_loop(
                shared,
                &ctx,
                TcpListener::from_std(l)?,
                direction,
            ));
        }
        Ok(PodHandle {
            workload: workload.clone(),
            netns_cookie,
            slot,
            tasks,
        })
    })();
    match started {
        Ok(handle) => {
            info!(pod = %workload.name, netns_cookie, "enrolled");
            release_free_heap();
            Ok(handle)
        }
        Err(e) => {
            let mut dp = shared.datapath();
            dp.unenroll_cgroup(&workload.cgroup);
            dp.stop_inbound(netns_cookie, slot, &workload.ips);
            dp.rollback_pod(netns_cookie, slot, &workload.ips);
            drop(dp);
            release_ports(workload);
            Err(e)
        }
    }
}

/// The datapath half of [`enroll`]: map entries first, then the links, which are pinned last
/// (so a failure before leaves nothing pinned for [`enroll`] to undo).
fn register(
    shared: &Shared,
    workload: &Workload,
    slot: u32,
    netns_cookie: u64,
    in4: &std::net::TcpListener,
    in6: Option<&std::net::TcpListener>,
) -> anyhow::Result<()> {
    let mut dp = shared.datapath();
    let mut flags = POD_FLAG_STEER_INBOUND;
    if shared.tuning.sk_msg_local_leg {
        flags |= POD_FLAG_LOCAL_LEG_SKMSG;
    }
    dp.enroll_pod_netns(
        netns_cookie,
        PodConfig {
            outbound_port_be: shared.tuning.outbound_port.to_be(),
            inbound_port_be: shared.tuning.inbound_port.to_be(),
            inbound_slot: slot,
            flags,
            _pad: 0,
        },
        &workload.ips,
    )?;
    dp.steer_inbound(slot, in4, in6, &workload.ips)?;
    for ip in &workload.ips {
        dp.set_destination(*ip, None, ACTION_STEER)?;
    }
    dp.attach_pod(&workload.cgroup, netns_cookie, &workload.netns)?;
    Ok(())
}

/// Gives the heap's free pages back to the kernel. Start-up (the eBPF object parsed and
/// loaded, the config, the CA) leaves a couple of MB freed but resident in the main heap that
/// glibc keeps until asked; enrolling a pod is rare, so it asks then.
fn release_free_heap() {
    crate::sys::trim_heap();
}

/// Undoes [`enroll`]: new connections of the pod use plain networking again.
pub fn unenroll(shared: &Shared, pod: PodHandle) {
    {
        let mut dp = shared.datapath();
        dp.unenroll_cgroup(&pod.workload.cgroup);
        dp.unenroll_pod_netns(pod.netns_cookie, &pod.workload.ips);
        dp.stop_inbound(pod.netns_cookie, pod.slot, &pod.workload.ips);
    }
    info!(pod = %pod.workload.name, "unenrolled");
}

fn pod_limits(t: &Tuning) -> Arc<PodLimits> {
    PodLimits::new(
        t.max_connections_per_pod as usize,
        t.max_pending_handshakes_per_pod as usize,
    )
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

fn accept_loop(
    shared: &Arc<Shared>,
    ctx: &Arc<PodCtx>,
    listener: TcpListener,
    direction: Direction,
) -> tokio::task::JoinHandle<()> {
    let shared = Arc::clone(shared);
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        let mut backoff = AcceptBackoff::default();
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => {
                    backoff.succeeded();
                    c
                }
                Err(e) => {
                    // Out of descriptors or memory: retrying at once cannot succeed, and
                    // would log and spin; wait, longer each time, until an accept succeeds.
                    let name = limits::accept_error_name(&e);
                    shared.policy.count(format!("accept_failed.{name}"));
                    let wait = backoff.failed(&e);
                    if shared.sample("failed accepts", name) {
                        warn!(pod = %ctx.name, ?direction, error = %e, retry_in = ?wait, "accept failed");
                    }
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    continue;
                }
            };
            let Some(mut permit) = admit(&shared, &ctx, direction, &stream, peer) else {
                reset(stream);
                continue;
            };
            let shared = Arc::clone(&shared);
            let ctx = Arc::clone(&ctx);
            tokio::spawn(async move {
                // Two phases, each boxed: the set-up (decision, dial, handshake, configs) is
                // freed before the relay starts, and the task itself stays a few words, so
                // an idle flow holds only what its relay needs.
                let setup: Setup<'_> = match direction {
                    Direction::Outbound => Box::pin(outbound(&shared, &ctx, stream, peer)),
                    Direction::Inbound => Box::pin(inbound(&shared, &ctx, stream, peer)),
                };
                let result = match setup.await {
                    Ok(Some(relay)) => {
                        permit.set_up();
                        relay.await
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                drop(permit);
                if let Err(e) = result {
                    shared.policy.count("flows_failed".to_owned());
                    if shared.sample("failed flows", "flow") {
                        warn!(pod = %ctx.name, ?direction, %peer, "flow failed: {e:#}");
                    }
                }
            });
        }
    })
}

/// Takes a share of the pod's caps for a connection just accepted from `peer` (outbound: the
/// app's own socket; inbound: the client, whose address is the per-source bucket), or logs
/// and counts the refusal and returns `None` (the caller resets the connection).
fn admit(
    shared: &Shared,
    ctx: &PodCtx,
    direction: Direction,
    stream: &TcpStream,
    peer: SocketAddr,
) -> Option<FlowPermit> {
    let (limits, source) = match direction {
        Direction::Outbound => (&ctx.outbound_limits, None),
        Direction::Inbound => (&ctx.inbound_limits, Some(peer.ip())),
    };
    let cap = match limits.admit(source) {
        Ok(permit) => return Some(permit),
        Err(cap) => cap,
    };
    let code = cap.code();
    shared.policy.count(format!("refused.{code}"));
    if shared.sample("refused", code) {
        let (held, pending) = limits.usage(source);
        let (limit, what) = match cap {
            CapExceeded::Connections => (shared.tuning.max_connections_per_pod, "flows held"),
            CapExceeded::Handshakes => (
                shared.tuning.max_pending_handshakes_per_pod,
                "flows in set-up",
            ),
        };
        let local = stream
            .local_addr()
            .map_or_else(|_| "-".to_owned(), |a| a.to_string());
        warn!(
            target: "interceptor::policy",
            "refused {} {peer} -> {local} pod={}: {what} for this {} reached the cap of {limit} \
             ({held} held, {pending} in set-up) [{code}]",
            match direction {
                Direction::Outbound => "outbound",
                Direction::Inbound => "inbound",
            },
            ctx.name,
            match direction {
                Direction::Outbound => "pod",
                Direction::Inbound => "source",
            },
        );
    }
    None
}

/// A socket in the pod's netns, so the connection leaves with the pod's address.
fn pod_socket(ctx: &PodCtx, v6: bool) -> anyhow::Result<TcpSocket> {
    let fd: OwnedFd = sys::tcp_socket_in(ctx.netns.as_fd(), v6)?;
    Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(fd)))
}

/// Dials `dst` from inside the pod, optionally from a fixed source address.
///
/// The local port is always left to `connect()`, which picks it with the whole 4-tuple known
/// (`sys::bind_address_no_port` before a bind): the agent's leg to an app closes first and
/// leaves a TIME_WAIT socket per connection, and a port chosen at bind time would have to
/// avoid all of them, so sustained churn to one app port would slow to a crawl and then fail.
async fn dial(ctx: &PodCtx, dst: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let sock = pod_socket(ctx, dst.is_ipv6())?;
    sock.set_nodelay(true)?;
    if let Some(src) = source {
        sys::bind_address_no_port(sock.as_fd()).context("IP_BIND_ADDRESS_NO_PORT")?;
        sock.bind(SocketAddr::new(src, 0))
            .with_context(|| format!("bind {src}"))?;
    }
    tokio::time::timeout(Duration::from_secs(10), sock.connect(dst))
        .await
        .with_context(|| format!("connect to {dst} timed out"))?
        .with_context(|| format!("connect to {dst}"))
}

/// The pod's own address of the family of `destination`: the source policy knows it by.
fn pod_ip(ctx: &PodCtx, v6: bool) -> IpAddr {
    ctx.ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv6() == v6)
        .or_else(|| ctx.ips.first().copied())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// One refused connection: one log line with both ends, both identities and the reason, and
/// a per-reason counter.
struct Refusal<'a> {
    direction: Direction,
    pod: &'a str,
    source: SocketAddr,
    destination: SocketAddr,
    /// Outbound: the endpoint the agent picked, when it differs from the destination.
    endpoint: Option<SocketAddr>,
    client: Option<&'a SpiffeId>,
    server: Option<&'a SpiffeId>,
}

impl<'a> Refusal<'a> {
    /// An open flow's ends and identities, as its check recorded them.
    fn of(check: &'a FlowCheck, pod: &'a str) -> Self {
        match check {
            FlowCheck::Inbound(c) => Refusal {
                direction: Direction::Inbound,
                pod,
                source: c.source,
                destination: c.destination,
                endpoint: None,
                client: c.peer.as_ref(),
                server: None,
            },
            FlowCheck::Outbound(c) => Refusal {
                direction: Direction::Outbound,
                pod,
                source: c.source,
                destination: c.destination,
                endpoint: Some(c.endpoint),
                client: Some(&c.client),
                server: match &c.tls {
                    FlowTls::Mesh(server) => Some(server),
                    FlowTls::Plaintext | FlowTls::Originate(_) => None,
                },
            },
        }
    }

    /// `DIRECTION SRC -> DST [via ENDPOINT] pod=… client=… server=…`
    fn describe(&self) -> String {
        let id = |i: Option<&SpiffeId>| i.map_or_else(|| "-".to_owned(), ToString::to_string);
        let via = match self.endpoint {
            Some(e) if e != self.destination => format!(" via {e}"),
            _ => String::new(),
        };
        format!(
            "{} {} -> {}{via} pod={} client={} server={}",
            match self.direction {
                Direction::Outbound => "outbound",
                Direction::Inbound => "inbound",
            },
            self.source,
            self.destination,
            self.pod,
            id(self.client),
            id(self.server),
        )
    }

    /// Counted every time; logged as a sample (see [`Shared::sample`]): whoever can open
    /// connections can cause refusals.
    fn log(&self, shared: &Shared, refused: &Refused) {
        shared.policy.count(format!("refused.{}", refused.code));
        if shared.sample("refused", refused.code) {
            warn!(
                target: "interceptor::policy",
                "refused {}: {} [{}]",
                self.describe(),
                refused.reason,
                refused.code,
            );
        }
    }

    /// An open flow a new generation no longer allows.
    fn log_closed(&self, shared: &Shared, generation: u64, refused: &Refused) {
        self.log_closed_by(shared, &format!("policy generation {generation}"), refused);
    }

    fn log_closed_by(&self, shared: &Shared, by: &str, refused: &Refused) {
        shared.policy.count(format!("closed.{}", refused.code));
        if shared.sample("closed", refused.code) {
            warn!(
                target: "interceptor::policy",
                "closing {}: no longer allowed by {by}: {} [{}]",
                self.describe(),
                refused.reason,
                refused.code,
            );
        }
    }
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Why a mesh handshake failed, for the refusal log: a crypto mismatch this side detected is
/// `crypto_mismatch` and names what this node offers; an abort by the peer names it too,
/// since the peer's policy may be what refused it.
fn handshake_refused(shared: &Shared, e: &driver::DriveError) -> Refused {
    let crypto = shared.crypto();
    match e {
        driver::DriveError::Handshake(HandshakeError::NoCommonCrypto(_)) => Refused {
            code: "crypto_mismatch",
            reason: format!(
                "mTLS handshake failed: {e}; this node's {} offers {}",
                crypto.policy(),
                crypto.offer()
            ),
        },
        driver::DriveError::Handshake(HandshakeError::RefusedByPeer(
            rustls::AlertDescription::HandshakeFailure,
        )) => Refused {
            code: "handshake_failed",
            reason: format!(
                "mTLS handshake failed: {e} (this node's {} offers {}; the peer's crypto policy \
                 may not accept it)",
                crypto.policy(),
                crypto.offer()
            ),
        },
        _ => Refused {
            code: "handshake_failed",
            reason: format!("mTLS handshake failed: {}", chain(e)),
        },
    }
}

/// A session negotiated under a crypto policy that changed during the handshake.
fn crypto_refuses(shared: &Shared, negotiated: &handshake::Negotiated) -> Option<Refused> {
    let reason = shared
        .crypto()
        .refuses(negotiated.suite.suite(), negotiated.group)?;
    Some(Refused {
        code: "crypto_policy",
        reason,
    })
}

/// Makes the close that follows send RST (curl: `000`, exit 56 or 52), then closes.
fn reset(sock: TcpStream) {
    let _ = sock.set_zero_linger();
    drop(sock);
}

/// Refuses an app's outbound connection the way Envoy answers 503: once the app has sent its
/// request (or after a wait, for an app that waits for the server to speak), reset. An
/// app then sees the reset while waiting for the response (curl: `000`, exit 56) rather than
/// as a failed connect, which is what an immediate reset can look like.
async fn refuse_app(shared: &Shared, app: TcpStream) {
    let wait = Duration::from_millis(shared.tuning.first_byte_wait_ms).max(REFUSE_WAIT);
    let mut byte = [0u8; 1];
    let _ = tokio::time::timeout(wait, app.peek(&mut byte)).await;
    reset(app);
}

/// The least [`refuse_app`] waits for an app's request.
const REFUSE_WAIT: Duration = Duration::from_secs(1);

/// SO_LINGER 0 on a duplicate of a socket: the socket is reset when its last descriptor
/// closes.
fn zero_linger(fd: &OwnedFd) {
    let _ = crate::sys::set_zero_linger(fd.as_fd());
}

/// Runs a relay until it ends or the flow's policy check fails (see [`revalidate`]); then
/// both connections are reset, and the relay is dropped. `socks` are duplicates of the relay's
/// two sockets, taken before they moved into it.
async fn cancellable(
    cancel: &Cancel,
    socks: &[OwnedFd],
    relay: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::select! {
        r = relay => r,
        () = cancel.fired() => {
            for fd in socks {
                zero_linger(fd);
            }
            // `revalidate` logged and counted it.
            Ok(())
        }
    }
}

/// The second phase of a flow: its relay, owning the sockets, the session and the flow-table
/// row, and nothing else of the set-up.
type Relay<'a> = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// The first phase of a flow: decide, dial, handshake; `None` when the flow was refused.
type Setup<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Option<Relay<'a>>>> + Send + 'a>>;

/// A listed flow's relay, cancellable through its row (see [`cancellable`]). `socks` are
/// duplicates of its two sockets, app side first; they keep both open until the relay's
/// future is done, so the reset a failed relay asked for goes out when they drop.
///
/// With `hold_reset` (outbound TLS flows, which count the app's bytes), a flow that fails before
/// the app sent a byte (the server side refused it right after the handshake) holds that
/// reset until the app's request arrives, as
/// [`refuse_app`] does: an app still finishing its own connect would otherwise see a failed
/// connect (curl exit 7) instead of a refused request (exit 56), depending on scheduling.
fn relaying<'a>(
    guard: FlowGuard<'a>,
    socks: Vec<OwnedFd>,
    hold_reset: bool,
    relay: impl Future<Output = anyhow::Result<()>> + Send + 'a,
) -> Relay<'a> {
    Box::pin(async move {
        let result = cancellable(&guard.cancel, &socks, relay).await;
        if result.is_err()
            && hold_reset
            && guard.stats.bytes_app_to_peer() == 0
            && let Some(app) = socks.first()
        {
            await_request(app.as_fd()).await;
        }
        result
    })
}

/// Waits (at most [`REFUSE_WAIT`]) until the app has sent something or closed.
async fn await_request(app: BorrowedFd<'_>) {
    let Ok(dup) = app.try_clone_to_owned() else {
        return;
    };
    let Ok(sock) = TcpStream::from_std(std::net::TcpStream::from(dup)) else {
        return;
    };
    let _ = tokio::time::timeout(REFUSE_WAIT, sock.readable()).await;
}

fn dups(socks: [&TcpStream; 2]) -> Vec<OwnedFd> {
    socks
        .iter()
        .filter_map(|s| s.as_fd().try_clone_to_owned().ok())
        .collect()
}

/// Decides every open flow again under `generation`: a flow it refuses is reset within one
/// poll of the relay, with one log line and a `closed.<reason>` count; allowed flows are
/// untouched.
///
/// Inbound flows are decided as new connections with the same client, identity and
/// destination. Outbound flows are decided on the endpoint they are connected to and closed
/// when the generation refuses them or needs protection they lack
/// ([`Generation::outbound_still`]: `transport_changed`); a flow already stronger than
/// required stays.
pub fn revalidate(shared: &Shared, generation: &Generation) -> usize {
    shared
        .flows
        .revalidate(|info, check| match recheck(generation, check) {
            Ok(()) => true,
            Err(refused) => {
                Refusal::of(check, &info.pod).log_closed(shared, generation.number, &refused);
                false
            }
        })
}

/// Decides an open flow again under `generation`.
fn recheck(generation: &Generation, check: &FlowCheck) -> Result<(), Refused> {
    match check {
        FlowCheck::Inbound(c) => generation
            .inbound(c.source, c.destination, c.peer.as_ref())
            .map(|_| ()),
        FlowCheck::Outbound(c) => {
            generation.outbound_still(c.source.ip(), c.destination, c.endpoint, &c.tls)
        }
    }
}

/// Brings connect4's steering in line with a new generation (service VIPs, non-mesh endpoints
/// a DestinationRule may originate TLS to); `old` is what the previous generation steered.
pub fn apply_steering(
    shared: &Shared,
    old: &BTreeSet<SocketAddr>,
    new: &BTreeSet<SocketAddr>,
) -> anyhow::Result<()> {
    let mut dp = shared.datapath();
    for gone in old.difference(new) {
        dp.clear_destination(gone.ip(), Some(gone.port()));
    }
    for added in new.difference(old) {
        dp.set_destination(added.ip(), Some(added.port()), ACTION_STEER)
            .with_context(|| format!("steer {added}"))?;
    }
    Ok(())
}

/// Sets up an outbound flow: decides it, dials, handshakes. Returns the relay to run, or
/// `None` when the flow was refused (and already answered).
async fn outbound<'a>(
    shared: &'a Shared,
    ctx: &PodCtx,
    app: TcpStream,
    app_addr: SocketAddr,
) -> anyhow::Result<Option<Relay<'a>>> {
    let Some(dst) = shared
        .datapath()
        .original_destination(ctx.netns_cookie, app_addr)
    else {
        reset(app);
        anyhow::bail!("no original destination recorded for this connection");
    };
    app.set_nodelay(true)?;
    let generation = shared.policy.current();
    let source = SocketAddr::new(pod_ip(ctx, dst.is_ipv6()), app_addr.port());
    let mut refusal = Refusal {
        direction: Direction::Outbound,
        pod: &ctx.name,
        source,
        destination: dst,
        endpoint: None,
        client: Some(&ctx.id),
        server: None,
    };
    let plan = match generation.outbound(source.ip(), dst) {
        Ok(plan) => plan,
        Err(refused) => {
            refusal.log(shared, &refused);
            refuse_app(shared, app).await;
            return Ok(None);
        }
    };
    let decided_by = generation.number;
    drop(generation);
    let Plan {
        endpoint,
        transport,
        reason,
    } = plan;
    refusal.endpoint = Some(endpoint);
    let expected = match &transport {
        Transport::Mesh(id) => id.clone(),
        _ => None,
    };
    refusal.server = expected.as_ref();
    let mut flow = FlowInfo {
        pod: ctx.name.clone(),
        direction: Direction::Outbound,
        destination: dst,
        source: app_addr,
        peer_id: None,
        cipher: None,
        session: None,
        protection: Protection::Plaintext,
        endpoint: Some(endpoint),
        reason: Some(reason),
    };
    let Some(tls) = transport.to_flow() else {
        refusal.log(shared, &enforce::mesh_identity_unknown());
        refuse_app(shared, app).await;
        return Ok(None);
    };
    let check = FlowCheck::Outbound(OutboundCheck {
        source,
        destination: dst,
        endpoint,
        client: ctx.id.clone(),
        tls,
    });
    // A mesh client's first flight is built before the connect: the server's agent waits
    // only `firstByteWaitMs` for it before treating the connection as plaintext.
    let prepared = match &transport {
        Transport::Mesh(Some(expected)) => {
            let me = shared.credentials(&ctx.id)?;
            let config = shared.client_config(&me, expected)?;
            let name = rustls_pki_types::ServerName::IpAddress(endpoint.ip().into());
            match driver::client_connection(config, name) {
                Ok(conn) => Some(conn),
                Err(e) => {
                    let e = driver::DriveError::from(e);
                    refusal.log(shared, &handshake_refused(shared, &e));
                    refuse_app(shared, app).await;
                    return Ok(None);
                }
            }
        }
        _ => None,
    };
    let mut peer = match dial(ctx, endpoint, None).await {
        Ok(peer) => peer,
        Err(e) => {
            let refused = Refused {
                code: "connect_failed",
                reason: format!("{e:#}"),
            };
            refusal.log(shared, &refused);
            refuse_app(shared, app).await;
            return Ok(None);
        }
    };
    let timeout = Duration::from_millis(shared.tuning.handshake_timeout_ms);
    match transport {
        Transport::Plaintext => {
            if !admitted_now(shared, decided_by, &check, &ctx.name) {
                refuse_app(shared, app).await;
                reset(peer);
                return Ok(None);
            }
            let guard = shared.flows.insert_checked(flow, Some(check));
            let socks = dups([&app, &peer]);
            let relay = plain(shared, app, peer, &guard);
            Ok(Some(relaying(guard, socks, false, relay)))
        }
        Transport::Mesh(None) => unreachable!("refused above"),
        Transport::Mesh(Some(_)) => {
            let Some(conn) = prepared else {
                unreachable!("prepared above for every mesh transport")
            };
            prepare_peer(shared, &peer);
            let est = match driver::client_handshake_prepared(
                &mut peer,
                conn,
                timeout,
                shared.handshake_reads(),
            )
            .await
            {
                Ok(est) => est,
                Err(e) => {
                    refusal.log(shared, &handshake_refused(shared, &e));
                    refuse_app(shared, app).await;
                    reset(peer);
                    return Ok(None);
                }
            };
            if let Some(refused) = crypto_refuses(shared, &est.negotiated) {
                refusal.log(shared, &refused);
                refuse_app(shared, app).await;
                reset(peer);
                return Ok(None);
            }
            flow.peer_id = Some(est.peer().to_string());
            flow.cipher = Some(format!("{:?}", est.negotiated.suite.suite()));
            let session = SessionCrypto::mesh(&est.negotiated);
            flow.session = Some(session);
            debug!(
                target: "interceptor::access",
                pod = %ctx.name, %dst, peer = %est.peer(), cipher = ?session.suite,
                group = session.group_label().as_deref().unwrap_or("-"),
                "outbound mTLS"
            );
            Ok(relay_mesh(shared, flow, check, decided_by, app, peer, est))
        }
        Transport::Originate {
            config, name, mode, ..
        } => {
            let (conn, leftover) =
                match originate::handshake(&mut peer, config, name.clone(), timeout).await {
                    Ok(session) => session,
                    Err(e) => {
                        let refused = Refused {
                            code: "origination_failed",
                            reason: format!(
                                "{mode} TLS origination to {}: {}",
                                name.to_str(),
                                chain(&e)
                            ),
                        };
                        refusal.log(shared, &refused);
                        refuse_app(shared, app).await;
                        reset(peer);
                        return Ok(None);
                    }
                };
            flow.protection = Protection::Tls;
            flow.cipher = conn
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()));
            flow.session = SessionCrypto::originated(&conn);
            if !admitted_now(shared, decided_by, &check, &ctx.name) {
                reset(app);
                reset(peer);
                return Ok(None);
            }
            let guard = shared.flows.insert_checked(flow, Some(check));
            let config = relay_config(shared);
            let socks = dups([&app, &peer]);
            let stats = Arc::clone(&guard.stats);
            // Boxed before the future captures it: see `relay::relay_userspace`.
            let conn = Box::new(conn);
            let relay = relay::relay_userspace(app, peer, conn, leftover, config, stats);
            Ok(Some(relaying(guard, socks, true, async move {
                Ok(relay.await?)
            })))
        }
    }
}

fn relay_config(shared: &Shared) -> relay::RelayConfig {
    relay::RelayConfig {
        idle_timeout: Duration::from_secs(shared.tuning.idle_timeout_secs),
        app_leg_redirected: shared.tuning.sk_msg_local_leg,
        ..Default::default()
    }
}

/// Hands an established mesh session to kTLS (or keeps it in rustls) and relays.
/// Attaches the `tls` ULP to the peer socket before the handshake when kTLS is in use: the
/// kernel refuses the ULP once the peer's FIN has arrived, and a peer that half-closes right
/// behind its Finished would otherwise push the flow to userspace. Failure is not fatal: the
/// relay then keeps the flow in rustls.
fn prepare_peer(shared: &Shared, peer: &TcpStream) {
    if let Offload::Kernel(_) = shared.offload {
        let _ = relay::prepare_socket(
            peer,
            relay::RecordLayer::Kernel {
                expect_no_pad: true,
            },
        );
    }
}

/// The relay of an established mesh flow, listed with `check` (decided under generation
/// `decided_by`) so that policy changes decide it again; `None` if a policy change in the
/// meantime refused it (both sockets reset).
fn relay_mesh(
    shared: &Shared,
    mut flow: FlowInfo,
    check: FlowCheck,
    decided_by: u64,
    app: TcpStream,
    peer: TcpStream,
    est: driver::Established,
) -> Option<Relay<'_>> {
    let layer = match &shared.offload {
        Offload::Kernel(_) => {
            flow.protection = Protection::Ktls;
            // The peer is another agent, which never pads records.
            relay::RecordLayer::Kernel {
                expect_no_pad: true,
            }
        }
        Offload::Userspace => {
            flow.protection = Protection::Userspace;
            relay::RecordLayer::Userspace
        }
    };
    if !admitted_now(shared, decided_by, &check, &flow.pod) {
        reset(app);
        reset(peer);
        return None;
    }
    let hold_reset = flow.direction == Direction::Outbound;
    let guard = shared.flows.insert_checked(flow, Some(check));
    let config = relay::RelayConfig {
        // The dialing agent leaves the first FIN, and with it the TIME_WAIT socket, to the
        // peer agent (see the field).
        peer_fin_first: hold_reset,
        ..relay_config(shared)
    };
    let socks = dups([&app, &peer]);
    let stats = Arc::clone(&guard.stats);
    let relay = relay::relay(app, peer, est, layer, config, stats);
    Some(relaying(guard, socks, hold_reset, async move {
        Ok(relay.await?)
    }))
}

/// Closes the window between deciding a flow and listing it (a handshake, a dial): a
/// generation applied in between revalidated the table without this flow, so it is decided
/// again here, as [`revalidate`] would have.
fn admitted_now(shared: &Shared, decided_by: u64, check: &FlowCheck, pod: &str) -> bool {
    let generation = shared.policy.current();
    if generation.number == decided_by {
        return true;
    }
    match recheck(&generation, check) {
        Ok(()) => true,
        Err(refused) => {
            Refusal::of(check, pod).log(shared, &refused);
            false
        }
    }
}

/// Plaintext passthrough (non-mesh destination, or plaintext a policy allows), under the idle
/// timeout like every other flow; `a` is the side whose bytes count as app → peer.
fn plain(
    shared: &Shared,
    a: TcpStream,
    b: TcpStream,
    guard: &FlowGuard<'_>,
) -> impl Future<Output = anyhow::Result<()>> + Send + 'static {
    let relay = relay::relay_plain(a, b, relay_config(shared), Arc::clone(&guard.stats));
    async move { Ok(relay.await?) }
}

/// Sets up an inbound flow: classifies it, handshakes or not per policy, dials the app.
/// Returns the relay to run, or `None` when the flow was refused (and already reset).
async fn inbound<'a>(
    shared: &'a Shared,
    ctx: &PodCtx,
    mut client: TcpStream,
    source: SocketAddr,
) -> anyhow::Result<Option<Relay<'a>>> {
    // sk_lookup delivered the connection unchanged: our local address is what the client dialed.
    let dst = client.local_addr()?;
    client.set_nodelay(true)?;
    let generation = shared.policy.current();
    let wait = if generation.requires_mtls(source, dst) {
        Duration::from_millis(shared.tuning.handshake_timeout_ms)
    } else {
        Duration::from_millis(shared.tuning.first_byte_wait_ms)
    };
    let kind = classify(&client, wait).await?;
    let mut refusal = Refusal {
        direction: Direction::Inbound,
        pod: &ctx.name,
        source,
        destination: dst,
        endpoint: None,
        client: None,
        server: Some(&ctx.id),
    };
    let mut flow = FlowInfo {
        pod: ctx.name.clone(),
        direction: Direction::Inbound,
        destination: dst,
        source,
        peer_id: None,
        cipher: None,
        session: None,
        protection: Protection::Plaintext,
        endpoint: None,
        reason: None,
    };
    let app_source = if dst.is_ipv6() {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(AGENT_SOURCE_V4)
    };
    match kind {
        FirstBytes::Mesh => {
            if let Some(refused) = generation.refuses_mtls(dst) {
                refusal.log(shared, &refused);
                reset(client);
                return Ok(None);
            }
            let me = shared.credentials(&ctx.id)?;
            prepare_peer(shared, &client);
            let est = match driver::server_handshake_with(
                &mut client,
                Arc::clone(&me.server),
                Duration::from_millis(shared.tuning.handshake_timeout_ms),
                shared.handshake_reads(),
            )
            .await
            {
                Ok(est) => est,
                Err(e) => {
                    refusal.log(shared, &handshake_refused(shared, &e));
                    reset(client);
                    return Ok(None);
                }
            };
            let peer = est.peer().clone();
            refusal.client = Some(&peer);
            if let Some(refused) = crypto_refuses(shared, &est.negotiated) {
                refusal.log(shared, &refused);
                reset(client);
                return Ok(None);
            }
            match generation.inbound(source, dst, Some(&peer)) {
                Ok(code) => flow.reason = Some(code.to_owned()),
                Err(refused) => {
                    refusal.log(shared, &refused);
                    reset(client);
                    return Ok(None);
                }
            }
            let decided_by = generation.number;
            drop(generation);
            flow.peer_id = Some(peer.to_string());
            flow.cipher = Some(format!("{:?}", est.negotiated.suite.suite()));
            let session = SessionCrypto::mesh(&est.negotiated);
            flow.session = Some(session);
            let app = dial(ctx, dst, Some(app_source)).await?;
            debug!(
                target: "interceptor::access",
                pod = %ctx.name, %source, %peer, cipher = ?session.suite,
                group = session.group_label().as_deref().unwrap_or("-"),
                "inbound mTLS"
            );
            let check = FlowCheck::Inbound(InboundCheck {
                source,
                destination: dst,
                peer: Some(peer.clone()),
            });
            Ok(relay_mesh(
                shared, flow, check, decided_by, app, client, est,
            ))
        }
        FirstBytes::Other | FirstBytes::NeedMore => {
            match generation.inbound(source, dst, None) {
                Ok(code) => flow.reason = Some(code.to_owned()),
                Err(refused) => {
                    refusal.log(shared, &refused);
                    reset(client);
                    return Ok(None);
                }
            }
            let decided_by = generation.number;
            drop(generation);
            let app = dial(ctx, dst, Some(app_source)).await?;
            let check = FlowCheck::Inbound(InboundCheck {
                source,
                destination: dst,
                peer: None,
            });
            if !admitted_now(shared, decided_by, &check, &ctx.name) {
                reset(client);
                reset(app);
                return Ok(None);
            }
            let guard = shared.flows.insert_checked(flow, Some(check));
            let socks = dups([&client, &app]);
            let relay = plain(shared, client, app, &guard);
            Ok(Some(relaying(guard, socks, false, relay)))
        }
    }
}

/// Waits for the client's first bytes (at most `wait` for a silent, server-speaks-first
/// client, or one that stops inside a ClientHello) and classifies them without consuming
/// anything.
///
/// Readiness-driven: the socket is peeked when the kernel reports new bytes, never on a
/// clock, so a stalled client costs nothing until its deadline. (A peek that finds only the
/// bytes already seen reports `WouldBlock` to tokio, which then waits for the next readiness
/// event: new data, FIN or RST.)
async fn classify(client: &TcpStream, wait: Duration) -> anyhow::Result<FirstBytes> {
    let mut buf = vec![0u8; peek::MAX_PEEK];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let ready = match tokio::time::timeout_at(deadline, client.ready(Interest::READABLE)).await
        {
            Ok(r) => r?,
            // Silence, or a ClientHello that never completes: plaintext (a policy that
            // requires mTLS refuses it).
            Err(_) => return Ok(FirstBytes::Other),
        };
        let peeked = client.try_io(Interest::READABLE, || {
            let n = sys::peek(client.as_fd(), &mut buf)?;
            if n == 0 {
                return Ok(FirstBytes::Other);
            }
            match peek::classify(&buf[..n]) {
                FirstBytes::NeedMore if n < buf.len() => Err(std::io::ErrorKind::WouldBlock.into()),
                FirstBytes::NeedMore => Ok(FirstBytes::Other),
                decided => Ok(decided),
            }
        });
        match peeked {
            Ok(kind) => return Ok(kind),
            // The client half-closed inside a ClientHello: no more bytes will come.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && ready.is_read_closed() => {
                return Ok(FirstBytes::Other);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads the original-destination key path for tests and the CLI.
pub fn pod_netns_cookie(netns: &Path) -> anyhow::Result<u64> {
    sys::in_netns(netns, || {
        let s = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        sys::netns_cookie(s.as_fd())
    })
    .context("netns cookie")
}
