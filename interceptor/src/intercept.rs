//! Per-pod interception: the agent's listeners inside each enrolled pod's netns, and what
//! happens to every connection they accept (outbound: dial the original destination, mTLS,
//! kTLS, relay; inbound: classify, mTLS or plaintext per policy, relay to the app).

pub mod enforce;
pub mod originate;
pub mod peek;
pub mod table;

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::{
    ca::{CertificateAuthority, DEFAULT_LEAF_TTL, LeafCert},
    config::{Tuning, Workload},
    datapath::Datapath,
    handshake::{self, MeshSuite, driver},
    identity::{SpiffeId, TrustDomain},
    policy::FlowTls,
    relay, sys,
};
use interceptor_common::{
    ACTION_STEER, POD_FLAG_LOCAL_LEG_SKMSG, POD_FLAG_STEER_INBOUND, PodConfig,
};

use self::{
    enforce::{Enforcer, Generation, Plan, Refused, Transport},
    peek::FirstBytes,
    table::{
        Cancel, Direction, FlowCheck, FlowGuard, FlowInfo, FlowTable, InboundCheck, OutboundCheck,
        Protection,
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
    /// Client configs by expected server identity (the verifier pins it).
    clients: Mutex<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

/// Everything the flow handlers share.
pub struct Shared {
    pub trust_domain: TrustDomain,
    pub ca: Arc<dyn CertificateAuthority>,
    pub roots: Arc<rustls::RootCertStore>,
    pub offload: Offload,
    pub tuning: Tuning,
    pub datapath: Mutex<Datapath>,
    /// Istio security policy: the current generation and how to load the next.
    pub policy: Enforcer,
    pub flows: FlowTable,
    credentials: Mutex<HashMap<SpiffeId, Arc<Credentials>>>,
}

impl Shared {
    pub fn new(
        trust_domain: TrustDomain,
        ca: Arc<dyn CertificateAuthority>,
        offload: Offload,
        tuning: Tuning,
        datapath: Datapath,
        policy: Enforcer,
    ) -> anyhow::Result<Self> {
        let roots = handshake::mesh_roots(ca.roots()).context("mesh roots")?;
        Ok(Self {
            trust_domain,
            ca,
            roots,
            offload,
            tuning,
            datapath: Mutex::new(datapath),
            policy,
            flows: FlowTable::default(),
            credentials: Mutex::new(HashMap::new()),
        })
    }

    fn suites(&self) -> &[MeshSuite] {
        match &self.offload {
            Offload::Kernel(s) => s,
            Offload::Userspace => MeshSuite::AES_GCM,
        }
    }

    /// The leaf and server config of a service account, minted on first use (24 h TTL).
    fn credentials(&self, id: &SpiffeId) -> anyhow::Result<Arc<Credentials>> {
        let mut map = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(id) {
            return Ok(Arc::clone(c));
        }
        let leaf = self
            .ca
            .issue(id, DEFAULT_LEAF_TTL)
            .context("issue leaf certificate")?;
        let server = handshake::server_config(
            &leaf,
            Arc::clone(&self.roots),
            &self.trust_domain,
            self.suites(),
        )?;
        let c = Arc::new(Credentials {
            leaf,
            server,
            clients: Mutex::new(HashMap::new()),
        });
        map.insert(id.clone(), Arc::clone(&c));
        Ok(c)
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
            Arc::clone(&self.roots),
            &self.trust_domain,
            expected,
            self.suites(),
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
}

/// Opens the pod's listeners inside its netns, registers it with the datapath and starts
/// accepting. `slot` must be unique among enrolled pods (sk_lookup's sockmap index).
pub fn enroll(shared: &Arc<Shared>, workload: &Workload, slot: u32) -> anyhow::Result<PodHandle> {
    let id = SpiffeId::new(
        shared.trust_domain.clone(),
        &workload.namespace,
        &workload.service_account,
    )?;
    shared.credentials(&id)?;
    let t = shared.tuning.clone();
    let pod = workload.name.clone();
    let (out4, out6, in4, in6) = sys::in_netns(&workload.netns, move || {
        if let Err(e) = sys::reserve_local_ports(&[t.outbound_port, t.inbound_port]) {
            // Not fatal: it only matters if the pod widens its ephemeral port range.
            warn!(
                pod,
                "cannot reserve the agent's ports against ephemeral use: {e}"
            );
        }
        let out4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, t.outbound_port))?;
        // IPv6 may be disabled in the pod; IPv4 still works then.
        let out6 = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, t.outbound_port)).ok();
        let in4 = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, t.inbound_port))?;
        let in6 = std::net::TcpListener::bind((Ipv6Addr::LOCALHOST, t.inbound_port)).ok();
        Ok((out4, out6, in4, in6))
    })
    .with_context(|| format!("listeners in netns {}", workload.netns.display()))?;
    let netns_cookie = sys::netns_cookie(out4.as_fd())?;
    {
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
        dp.steer_inbound(
            netns_cookie,
            &workload.netns,
            slot,
            &in4,
            in6.as_ref(),
            &workload.ips,
        )?;
        dp.enroll_cgroup(&workload.cgroup)?;
        for ip in &workload.ips {
            dp.set_destination(*ip, None, ACTION_STEER)?;
        }
    }
    let ctx = Arc::new(PodCtx {
        name: workload.name.clone(),
        id,
        ips: workload.ips.clone(),
        netns: std::fs::File::open(&workload.netns)?,
        netns_cookie,
    });
    let mut tasks = Vec::new();
    for l in std::iter::once(out4).chain(out6) {
        l.set_nonblocking(true)?;
        tasks.push(accept_loop(
            shared,
            &ctx,
            TcpListener::from_std(l)?,
            Direction::Outbound,
        ));
    }
    for l in std::iter::once(in4).chain(in6) {
        l.set_nonblocking(true)?;
        tasks.push(accept_loop(
            shared,
            &ctx,
            TcpListener::from_std(l)?,
            Direction::Inbound,
        ));
    }
    info!(pod = %workload.name, netns_cookie, "enrolled");
    release_free_heap();
    Ok(PodHandle {
        workload: workload.clone(),
        netns_cookie,
        slot,
        tasks,
    })
}

/// Gives the heap's free pages back to the kernel. Start-up (the eBPF object parsed and
/// loaded, the config, the CA) leaves a couple of MB freed but resident in the main heap that
/// glibc keeps until asked; enrolling a pod is rare, so it asks then.
fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
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

fn accept_loop(
    shared: &Arc<Shared>,
    ctx: &Arc<PodCtx>,
    listener: TcpListener,
    direction: Direction,
) -> tokio::task::JoinHandle<()> {
    let shared = Arc::clone(shared);
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(pod = %ctx.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
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
                    Ok(Some(relay)) => relay.await,
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    warn!(pod = %ctx.name, ?direction, %peer, "flow failed: {e:#}");
                }
            });
        }
    })
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

    fn log(&self, shared: &Shared, refused: &Refused) {
        warn!(
            target: "interceptor::policy",
            "refused {}: {} [{}]",
            self.describe(),
            refused.reason,
            refused.code,
        );
        shared.policy.count(format!("refused.{}", refused.code));
    }

    /// An open flow a new generation no longer allows.
    fn log_closed(&self, shared: &Shared, generation: u64, refused: &Refused) {
        warn!(
            target: "interceptor::policy",
            "closing {}: no longer allowed by policy generation {generation}: {} [{}]",
            self.describe(),
            refused.reason,
            refused.code,
        );
        shared.policy.count(format!("closed.{}", refused.code));
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
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is an open socket and the option value is a valid `linger` of the size
    // passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
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
            Ok(Some(relaying(guard, socks, false, plain(app, peer))))
        }
        Transport::Mesh(None) => unreachable!("refused above"),
        Transport::Mesh(Some(expected)) => {
            let me = shared.credentials(&ctx.id)?;
            let config = shared.client_config(&me, &expected)?;
            prepare_peer(shared, &peer);
            let est = match driver::client_handshake_with(
                &mut peer,
                config,
                rustls_pki_types::ServerName::IpAddress(endpoint.ip().into()),
                timeout,
                shared.handshake_reads(),
            )
            .await
            {
                Ok(est) => est,
                Err(e) => {
                    let refused = Refused {
                        code: "handshake_failed",
                        reason: format!("mTLS handshake failed: {}", chain(&e)),
                    };
                    refusal.log(shared, &refused);
                    refuse_app(shared, app).await;
                    reset(peer);
                    return Ok(None);
                }
            };
            flow.peer_id = Some(est.peer().to_string());
            flow.cipher = Some(format!("{:?}", est.negotiated.suite.suite()));
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

/// Plaintext passthrough (non-mesh destination, or plaintext a policy allows): the kernel's
/// copy with exact half-close in both directions.
async fn plain(mut a: TcpStream, mut b: TcpStream) -> anyhow::Result<()> {
    tokio::io::copy_bidirectional(&mut a, &mut b).await?;
    Ok(())
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
                    let refused = Refused {
                        code: "handshake_failed",
                        reason: format!("mTLS handshake failed: {}", chain(&e)),
                    };
                    refusal.log(shared, &refused);
                    reset(client);
                    return Ok(None);
                }
            };
            let peer = est.peer().clone();
            refusal.client = Some(&peer);
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
            let app = dial(ctx, dst, Some(app_source)).await?;
            debug!(pod = %ctx.name, %source, %peer, "inbound mTLS");
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
            Ok(Some(relaying(guard, socks, false, plain(client, app))))
        }
    }
}

/// Waits for the client's first bytes (at most `wait` for a silent, server-speaks-first
/// client) and classifies them without consuming anything.
async fn classify(client: &TcpStream, wait: Duration) -> anyhow::Result<FirstBytes> {
    let mut buf = vec![0u8; peek::MAX_PEEK];
    let deadline = tokio::time::Instant::now() + wait;
    let mut last = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
            Ok(r) => r?,
            // Silence: a server-speaks-first protocol. Plaintext.
            Err(_) => return Ok(FirstBytes::Other),
        };
        if n == 0 {
            return Ok(FirstBytes::Other);
        }
        match peek::classify(&buf[..n]) {
            FirstBytes::NeedMore if n < buf.len() => {
                if n == last {
                    // peek returns immediately while bytes are queued; wait for more.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(FirstBytes::Other);
                    }
                }
                last = n;
            }
            other => return Ok(other),
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
