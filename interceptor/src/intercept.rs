//! Per-pod interception: the agent's listeners inside each enrolled pod's netns, and what
//! happens to every connection they accept (outbound: dial the original destination, mTLS,
//! kTLS, relay; inbound: classify, mTLS or plaintext per policy, relay to the app).

pub mod peek;
pub mod table;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::{Arc, Mutex, RwLock},
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
    relay, sys,
};
use interceptor_common::{
    ACTION_STEER, POD_FLAG_LOCAL_LEG_SKMSG, POD_FLAG_STEER_INBOUND, PodConfig,
};

use self::{
    peek::FirstBytes,
    table::{Direction, FlowInfo, FlowTable, Protection},
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

/// A mesh workload's identity by address: auto-mTLS needs to know, for a destination IP, whom
/// to expect at the other end.
#[derive(Debug, Default)]
pub struct Directory {
    by_ip: HashMap<IpAddr, SpiffeId>,
}

impl Directory {
    pub fn insert(&mut self, ip: IpAddr, id: SpiffeId) {
        self.by_ip.insert(ip, id);
    }
    pub fn remove(&mut self, ip: &IpAddr) {
        self.by_ip.remove(ip);
    }
    pub fn lookup(&self, ip: &IpAddr) -> Option<&SpiffeId> {
        self.by_ip.get(ip)
    }
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
    pub directory: RwLock<Directory>,
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
    ) -> anyhow::Result<Self> {
        let roots = handshake::mesh_roots(ca.roots()).context("mesh roots")?;
        Ok(Self {
            trust_domain,
            ca,
            roots,
            offload,
            tuning,
            datapath: Mutex::new(datapath),
            directory: RwLock::new(Directory::default()),
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
    let (out4, out6, in4, in6) = sys::in_netns(&workload.netns, move || {
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
    {
        let mut dir = shared.directory.write().unwrap_or_else(|p| p.into_inner());
        for ip in &workload.ips {
            dir.insert(*ip, id.clone());
        }
    }
    let ctx = Arc::new(PodCtx {
        name: workload.name.clone(),
        id,
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
    Ok(PodHandle {
        workload: workload.clone(),
        netns_cookie,
        slot,
        tasks,
    })
}

/// Undoes [`enroll`]: new connections of the pod use plain networking again.
pub fn unenroll(shared: &Shared, pod: PodHandle) {
    {
        let mut dp = shared.datapath();
        dp.unenroll_cgroup(&pod.workload.cgroup);
        dp.unenroll_pod_netns(pod.netns_cookie, &pod.workload.ips);
        dp.stop_inbound(pod.netns_cookie, pod.slot, &pod.workload.ips);
    }
    let mut dir = shared.directory.write().unwrap_or_else(|p| p.into_inner());
    for ip in &pod.workload.ips {
        dir.remove(ip);
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
                let result = match direction {
                    Direction::Outbound => outbound(&shared, &ctx, stream, peer).await,
                    Direction::Inbound => inbound(&shared, &ctx, stream, peer).await,
                };
                if let Err(e) = result {
                    warn!(pod = %ctx.name, ?direction, %peer, "flow refused: {e:#}");
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
async fn dial(ctx: &PodCtx, dst: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let sock = pod_socket(ctx, dst.is_ipv6())?;
    sock.set_nodelay(true)?;
    if let Some(src) = source {
        sock.bind(SocketAddr::new(src, 0))?;
    }
    tokio::time::timeout(Duration::from_secs(10), sock.connect(dst))
        .await
        .with_context(|| format!("connect to {dst} timed out"))?
        .with_context(|| format!("connect to {dst}"))
}

async fn outbound(
    shared: &Shared,
    ctx: &PodCtx,
    app: TcpStream,
    app_addr: SocketAddr,
) -> anyhow::Result<()> {
    let dst = shared
        .datapath()
        .original_destination(ctx.netns_cookie, app_addr)
        .context("no original destination recorded for this connection")?;
    app.set_nodelay(true)?;
    let expected = shared
        .directory
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .lookup(&dst.ip())
        .cloned();
    let mut flow = FlowInfo {
        pod: ctx.name.clone(),
        direction: Direction::Outbound,
        destination: dst,
        source: app_addr,
        peer_id: None,
        cipher: None,
        protection: Protection::Plaintext,
    };
    let mut peer = dial(ctx, dst, None).await?;
    let Some(expected) = expected else {
        // Not a mesh workload: plaintext passthrough.
        let _guard = shared.flows.insert(flow);
        return plain(app, peer).await;
    };
    let me = shared.credentials(&ctx.id)?;
    let config = shared.client_config(&me, &expected)?;
    let est = driver::client_handshake(
        &mut peer,
        config,
        rustls_pki_types::ServerName::IpAddress(dst.ip().into()),
        Duration::from_millis(shared.tuning.handshake_timeout_ms),
    )
    .await
    .with_context(|| format!("mTLS to {dst} (expected {expected})"))?;
    flow.peer_id = Some(est.peer().to_string());
    flow.cipher = Some(format!("{:?}", est.negotiated.suite.suite()));
    relay_mesh(shared, flow, app, peer, est).await
}

/// Hands an established mesh session to kTLS (or keeps it in rustls) and relays.
async fn relay_mesh(
    shared: &Shared,
    mut flow: FlowInfo,
    app: TcpStream,
    peer: TcpStream,
    est: driver::Established,
) -> anyhow::Result<()> {
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
    let guard = shared.flows.insert(flow);
    let config = relay::RelayConfig {
        idle_timeout: Duration::from_secs(shared.tuning.idle_timeout_secs),
        ..Default::default()
    };
    relay::relay(app, peer, est, layer, config, Arc::clone(&guard.stats)).await?;
    Ok(())
}

/// Plaintext passthrough (non-mesh destination, or plaintext a policy allows): the kernel's
/// copy with exact half-close in both directions.
async fn plain(mut a: TcpStream, mut b: TcpStream) -> anyhow::Result<()> {
    tokio::io::copy_bidirectional(&mut a, &mut b).await?;
    Ok(())
}

async fn inbound(
    shared: &Shared,
    ctx: &PodCtx,
    mut client: TcpStream,
    source: SocketAddr,
) -> anyhow::Result<()> {
    // sk_lookup delivered the connection unchanged: our local address is what the client dialed.
    let dst = client.local_addr()?;
    client.set_nodelay(true)?;
    let kind = classify(
        &client,
        Duration::from_millis(shared.tuning.first_byte_wait_ms),
    )
    .await?;
    let mut flow = FlowInfo {
        pod: ctx.name.clone(),
        direction: Direction::Inbound,
        destination: dst,
        source,
        peer_id: None,
        cipher: None,
        protection: Protection::Plaintext,
    };
    let app_source = if dst.is_ipv6() {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(AGENT_SOURCE_V4)
    };
    match kind {
        FirstBytes::Mesh => {
            let me = shared.credentials(&ctx.id)?;
            let est = driver::server_handshake(
                &mut client,
                Arc::clone(&me.server),
                Duration::from_millis(shared.tuning.handshake_timeout_ms),
            )
            .await
            .with_context(|| format!("mTLS from {source}"))?;
            flow.peer_id = Some(est.peer().to_string());
            flow.cipher = Some(format!("{:?}", est.negotiated.suite.suite()));
            let app = dial(ctx, dst, Some(app_source)).await?;
            debug!(pod = %ctx.name, %source, peer = %est.peer(), "inbound mTLS");
            relay_mesh(shared, flow, app, client, est).await
        }
        FirstBytes::Other | FirstBytes::NeedMore => {
            let app = dial(ctx, dst, Some(app_source)).await?;
            let _guard = shared.flows.insert(flow);
            plain(client, app).await
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
