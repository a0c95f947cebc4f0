//! Enrolling a pod: the agent's listeners inside its netns, its datapath registration, and
//! the accept loops that hand every connection to [`flow::serve`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{info, warn};

use super::{
    Shared, flow,
    limits::{self, AcceptBackoff, CapExceeded, FlowPermit, PodLimits},
    table::Direction,
};
use crate::{
    config::{Tuning, Workload},
    datapath::{Destination, PodSettings},
    handover::{ListenerRole, ListenerSpec, take::GivenListener},
    identity::SpiffeId,
    sys,
};

/// An enrolled pod: its listeners live as long as this value.
pub struct PodHandle {
    pub workload: Workload,
    pub netns_cookie: u64,
    slot: u32,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Copies of the listeners the accept loops own, for a successor agent (handover).
    listeners: Vec<(ListenerSpec, OwnedFd)>,
}

impl PodHandle {
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Duplicates of the pod's listeners and what each is, to hand over to a successor.
    pub fn listener_copies(&self) -> std::io::Result<(Vec<ListenerSpec>, Vec<OwnedFd>)> {
        let mut specs = Vec::with_capacity(self.listeners.len());
        let mut fds = Vec::with_capacity(self.listeners.len());
        for (spec, fd) in &self.listeners {
            specs.push(*spec);
            fds.push(fd.try_clone()?);
        }
        Ok((specs, fds))
    }

    /// Stops accepting and returns once this process holds none of the pod's listeners (a
    /// successor that holds them keeps the accept queues open). Open flows are not touched.
    pub async fn stop(mut self) {
        self.listeners.clear();
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
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
pub(super) struct PodCtx {
    /// Shared with every open flow's row.
    pub(super) name: Arc<str>,
    pub(super) id: SpiffeId,
    pub(super) ips: Vec<IpAddr>,
    pub(super) netns: std::fs::File,
    pub(super) netns_cookie: u64,
    /// What the agent holds for this pod as a client (one bucket) and as a server (one bucket
    /// per source address).
    pub(super) outbound_limits: Arc<PodLimits>,
    pub(super) inbound_limits: Arc<PodLimits>,
    /// Sockets made in the pod's netns ahead of its dials (see [`SocketStash`]).
    pub(super) sockets: SocketStash,
    /// Spare mesh sessions toward the servers this pod calls (see `spare`).
    pub(super) spares: super::spare::Spares,
}

/// How many sockets one trip into a pod's netns makes: the agent's thread enters the netns
/// and leaves it again (two setns calls) once per this many dials instead of once per dial.
const STASH_BATCH: usize = 8;

/// Unconnected sockets made in one pod's netns, per address family. A socket keeps the
/// netns it was made in, so dials take one from here and only an empty stash costs a trip
/// into the netns ([`sys::tcp_sockets_in`]). At most `STASH_BATCH - 1` sockets wait per
/// family (an unconnected TCP socket is a few KB of kernel memory and one descriptor); they
/// close with the pod's context.
#[derive(Default)]
pub(super) struct SocketStash {
    v4: std::sync::Mutex<Vec<OwnedFd>>,
    v6: std::sync::Mutex<Vec<OwnedFd>>,
}

impl SocketStash {
    fn take(&self, netns: &std::fs::File, v6: bool) -> std::io::Result<OwnedFd> {
        let slot = if v6 { &self.v6 } else { &self.v4 };
        let mut stash = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(sock) = stash.pop() {
            return Ok(sock);
        }
        let mut batch = sys::tcp_sockets_in(netns.as_fd(), v6, STASH_BATCH)?;
        let sock = batch
            .pop()
            .ok_or_else(|| std::io::Error::other("no socket made"))?;
        *stash = batch;
        Ok(sock)
    }
}

/// Opens the pod's listeners inside its netns, registers it with the datapath and starts
/// accepting. `slot` must be unique among enrolled pods (sk_lookup's sockmap index).
///
/// A failure undoes what the attempt had set in the kernel (map entries, the ports it added
/// to the pod's reserved ports, links not yet pinned), so the error changes nothing; links
/// and pins of a previous agent for the pod are left as they were (see
/// [`Datapath::attach_pod`](crate::datapath::Datapath::attach_pod)).
///
/// `given`: listeners a previous agent handed over (the same sockets, so their accept queues
/// were never closed), used instead of binding new ones.
pub fn enroll(
    shared: &Arc<Shared>,
    workload: &Workload,
    slot: u32,
    given: Option<Vec<GivenListener>>,
) -> anyhow::Result<PodHandle> {
    let id = SpiffeId::new(
        shared.trust_domain.clone(),
        &workload.namespace,
        &workload.service_account,
    )?;
    shared.credentials(&id)?;
    let t = shared.tuning.clone();
    let pod = workload.name.clone();
    let (listeners, reserved) = sys::in_netns(&workload.netns, move || {
        let ports = match sys::reserve_local_ports(&[t.outbound_port, t.inbound_port]) {
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
        let fast_open = t.tcp_fast_open && enable_fast_open(&pod);
        let reserved = NetnsChanges { ports, fast_open };
        if let Some(given) = given {
            return Ok((sort_given(given)?, reserved));
        }
        let bind = || -> std::io::Result<_> {
            let out4 = sys::tcp_listener((Ipv4Addr::LOCALHOST, t.outbound_port).into())?;
            // IPv6 may be disabled in the pod; IPv4 still works then.
            let out6 = sys::tcp_listener((Ipv6Addr::LOCALHOST, t.outbound_port).into()).ok();
            let in4 = sys::tcp_listener((Ipv4Addr::LOCALHOST, t.inbound_port).into())?;
            let in6 = sys::tcp_listener((Ipv6Addr::LOCALHOST, t.inbound_port).into()).ok();
            Ok((out4, out6, in4, in6))
        };
        match bind() {
            Ok(l) => Ok((l, reserved)),
            Err(e) => {
                reserved.undo();
                Err(e)
            }
        }
    })
    .with_context(|| format!("listeners in netns {}", workload.netns.display()))?;
    let release_ports = |workload: &Workload| {
        if reserved.is_empty() {
            return;
        }
        let changes = reserved.clone();
        if let Err(e) = sys::in_netns(&workload.netns, move || {
            changes.undo();
            Ok(())
        }) {
            warn!(pod = %workload.name, "cannot undo the pod's sysctl changes: {e}");
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
            name: workload.name.as_str().into(),
            id,
            ips: workload.ips.clone(),
            netns: std::fs::File::open(&workload.netns)?,
            netns_cookie,
            outbound_limits: pod_limits(&shared.tuning),
            inbound_limits: pod_limits(&shared.tuning),
            sockets: SocketStash::default(),
            spares: Default::default(),
        });
        shared.start_log_flush();
        if shared.tuning.same_node_fast_path {
            shared.add_local_pod(&ctx);
        }
        let mut tasks = Vec::new();
        let mut copies = Vec::new();
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
            // Inherited by every accepted connection (the app's and the peer agent's legs),
            // so no setsockopt per connection. Set on handed-over listeners too.
            sys::set_nodelay(l.as_fd())?;
            if direction == Direction::Inbound && shared.tuning.tcp_fast_open {
                // Peer agents' SYNs may carry their ClientHello (see `dial_mesh`). Not fatal:
                // without it they connect as before.
                if let Err(e) = sys::set_fastopen_listener(l.as_fd(), FAST_OPEN_QUEUE) {
                    warn!(pod = %workload.name, "TCP Fast Open refused on the inbound listener: {e}");
                }
            }
            let at = l.local_addr()?;
            copies.push((
                ListenerSpec {
                    role: match direction {
                        Direction::Outbound => ListenerRole::Outbound,
                        Direction::Inbound => ListenerRole::Inbound,
                    },
                    ip: at.ip(),
                    port: at.port(),
                },
                OwnedFd::from(l.try_clone()?),
            ));
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
            listeners: copies,
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

/// What [`enroll`] changed in a pod's network namespace, to undo if the enrollment fails.
/// (Kept after an unenrollment: an agent restart or a successor needs both again, and neither
/// changes what the pod's own sockets see.)
#[derive(Clone)]
struct NetnsChanges {
    /// Ports added to `net.ipv4.ip_local_reserved_ports`.
    ports: Vec<u16>,
    /// Whether the server bit of `net.ipv4.tcp_fastopen` was set here.
    fast_open: bool,
}

impl NetnsChanges {
    fn is_empty(&self) -> bool {
        self.ports.is_empty() && !self.fast_open
    }

    /// Undoes the changes in the calling thread's network namespace, best effort.
    fn undo(&self) {
        let _ = sys::release_local_ports(&self.ports);
        if self.fast_open {
            let _ = sys::disable_fastopen_server();
        }
    }
}

/// Mesh connections to a pod whose SYN carried data and whose client has not acknowledged the
/// SYN-ACK yet, per inbound listener; beyond it SYN data waits for the handshake (the client's
/// kernel sends it again), so a flood of cookie-bearing SYNs costs a bounded queue.
const FAST_OPEN_QUEUE: libc::c_int = 1024;

/// Sets the server bit of `net.ipv4.tcp_fastopen` in the calling thread's network namespace
/// (the pod's) so the agent's inbound listener accepts a peer agent's ClientHello in its SYN
/// (see [`sys::enable_fastopen_server`] for why this is safe); returns whether it was set
/// here. A pod where it cannot be set still works: its clients connect without Fast Open.
fn enable_fast_open(pod: &str) -> bool {
    match sys::enable_fastopen_server() {
        Ok(set) => set,
        Err(e) => {
            warn!(
                pod,
                "cannot enable TCP Fast Open for the agent's inbound listener: {e}"
            );
            false
        }
    }
}

type Listeners = (
    std::net::TcpListener,
    Option<std::net::TcpListener>,
    std::net::TcpListener,
    Option<std::net::TcpListener>,
);

/// Orders handed-over listeners as [`enroll`] binds them: outbound v4, v6, inbound v4, v6.
fn sort_given(given: Vec<GivenListener>) -> std::io::Result<Listeners> {
    let (mut out4, mut out6, mut in4, mut in6) = (None, None, None, None);
    for (spec, l) in given {
        let slot = match (spec.role, spec.ip.is_ipv6()) {
            (ListenerRole::Outbound, false) => &mut out4,
            (ListenerRole::Outbound, true) => &mut out6,
            (ListenerRole::Inbound, false) => &mut in4,
            (ListenerRole::Inbound, true) => &mut in6,
        };
        *slot = Some(l);
    }
    let missing = |what| std::io::Error::other(format!("no {what} listener handed over"));
    Ok((
        out4.ok_or_else(|| missing("outbound IPv4"))?,
        out6,
        in4.ok_or_else(|| missing("inbound IPv4"))?,
        in6,
    ))
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
    dp.enroll_pod_netns(
        netns_cookie,
        PodSettings {
            outbound_port: shared.tuning.outbound_port,
            inbound_port: shared.tuning.inbound_port,
            inbound_slot: slot,
            steer_inbound: true,
            local_leg_skmsg: shared.tuning.sk_msg_local_leg,
            // `relayAppLeg: skMsg` arms userspace-relay flows only: on a kTLS node the app
            // sockets would pay the sk_msg send path for nothing.
            join_skmsg: shared.tuning.same_node_joins()
                || (shared.tuning.relay_app_leg == crate::config::RelayAppLeg::SkMsg
                    && matches!(shared.offload, super::Offload::Userspace)),
        },
        &workload.ips,
    )?;
    dp.steer_inbound(slot, in4, in6, &workload.ips)?;
    for ip in &workload.ips {
        dp.set_destination(*ip, None, Destination::Steer)?;
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
        // Its addresses are no longer a mesh destination: the next pod given one of them
        // (IPAM reuses addresses) may be outside the mesh.
        for ip in &pod.workload.ips {
            dp.clear_destination(*ip, None);
        }
    }
    shared.remove_local_pod(&pod.workload.ips);
    info!(pod = %pod.workload.name, "unenrolled");
}

fn pod_limits(t: &Tuning) -> Arc<PodLimits> {
    PodLimits::new(
        t.max_connections_per_pod as usize,
        t.max_pending_handshakes_per_pod as usize,
    )
}

/// Accepts on one of the pod's listeners and serves each connection in its own task.
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
        // Connections wait in the listener's queue meanwhile (see `Shared::accepting`).
        let _ = shared.accepting.subscribe().wait_for(|open| *open).await;
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
                    shared.counters.accept_failed(name);
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
            let Some(permit) = admit(&shared, &ctx, direction, &stream, peer) else {
                flow::reset(stream);
                continue;
            };
            let (live, ctx) = (super::Live::count(&shared), Arc::clone(&ctx));
            crate::runtimes::spawn_accepted(stream, move |stream| {
                flow::serve(live, ctx, direction, Box::new((stream, peer)), permit)
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
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let ends = flow::Ends::accepted(ctx, direction, peer, local);
    flow::refused(shared, cap.code(), &ends, || {
        let (held, pending) = limits.usage(source);
        let (limit, what) = match cap {
            CapExceeded::Connections => (shared.tuning.max_connections_per_pod, "flows held"),
            CapExceeded::Handshakes => (
                shared.tuning.max_pending_handshakes_per_pod,
                "flows in set-up",
            ),
        };
        format!(
            "{what} for this {} reached the cap of {limit} ({held} held, {pending} in set-up)",
            match direction {
                Direction::Outbound => "pod",
                Direction::Inbound => "source",
            },
        )
        .into()
    });
    None
}

/// A socket in the pod's netns, so the connection leaves with the pod's address.
fn pod_socket(ctx: &PodCtx, v6: bool) -> anyhow::Result<TcpSocket> {
    let fd: OwnedFd = ctx.sockets.take(&ctx.netns, v6)?;
    Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(fd)))
}

/// How long a dial waits for the TCP handshake (the SYN retried at 1 s, 3 s and 7 s).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to a peer agent from inside the pod, with TCP Fast Open where the pod's kernel
/// allows it (`tuning.tcpFastOpen`).
pub(super) struct MeshDial {
    pub(super) sock: TcpStream,
    /// The connect was deferred to the first write, which sends the SYN with the data (a Fast
    /// Open cookie for `dst` was cached): the socket is not established yet, so the `tls` ULP
    /// cannot be attached before the peer's first bytes, a failure to reach the peer shows up
    /// in the handshake instead of the connect, and the handshake's bound must include the
    /// connect's ([`CONNECT_TIMEOUT`]): a SYN the peer's full accept queue drops is retried
    /// after 1 s and 3 s.
    pub(super) deferred: bool,
}

/// Dials a peer agent at `dst` from inside the pod. With `fast_open`, the first write (the
/// ClientHello, built before this call) rides in the SYN when the pod's kernel holds a cookie
/// for `dst`; the first connection to `dst` asks for one. The server's agent then has the
/// whole ClientHello in its queue when it accepts the connection, so neither its first-byte
/// wait nor the client's scheduling can make it look like a silent plaintext client, and the
/// handshake saves a round trip.
pub(super) async fn dial_mesh(
    ctx: &PodCtx,
    dst: SocketAddr,
    fast_open: bool,
) -> anyhow::Result<MeshDial> {
    let sock = pod_socket(ctx, dst.is_ipv6())?;
    sock.set_nodelay(true)?;
    // Refused (EOPNOTSUPP) where the pod turned client Fast Open off: an ordinary connect.
    let fast_open = fast_open && sys::set_fastopen_connect(sock.as_fd()).is_ok();
    let sock = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst))
        .await
        .with_context(|| format!("connect to {dst} timed out"))?
        .with_context(|| format!("connect to {dst}"))?;
    let deferred = fast_open && sys::syn_sent(sock.as_fd()).unwrap_or(false);
    Ok(MeshDial { sock, deferred })
}

/// Dials `dst` from inside the pod, optionally from a fixed source address.
///
/// The local port is always left to `connect()`, which picks it with the whole 4-tuple known
/// (`sys::bind_address_no_port` before a bind): the agent's leg to an app closes first and
/// leaves a TIME_WAIT socket per connection, and a port chosen at bind time would have to
/// avoid all of them, so sustained churn to one app port would slow to a crawl and then fail.
pub(super) async fn dial(
    ctx: &PodCtx,
    dst: SocketAddr,
    source: Option<IpAddr>,
) -> anyhow::Result<TcpStream> {
    let sock = pod_socket(ctx, dst.is_ipv6())?;
    sock.set_nodelay(true)?;
    if let Some(src) = source {
        sys::bind_address_no_port(sock.as_fd()).context("IP_BIND_ADDRESS_NO_PORT")?;
        sock.bind(SocketAddr::new(src, 0))
            .with_context(|| format!("bind {src}"))?;
    }
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst))
        .await
        .with_context(|| format!("connect to {dst} timed out"))?
        .with_context(|| format!("connect to {dst}"))
}

/// The agent's source address toward a pod's app (sk_lookup never steers it back to the
/// agent): 127.0.0.6, or ::1 (IPv6 loopback is one address).
pub(super) fn agent_source(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(super::AGENT_SOURCE_V4)
    }
}

/// The pod's own address of the family of `destination`: the source policy knows it by.
pub(super) fn pod_ip(ctx: &PodCtx, v6: bool) -> IpAddr {
    ctx.ips
        .iter()
        .copied()
        .find(|ip| ip.is_ipv6() == v6)
        .or_else(|| ctx.ips.first().copied())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Reads the original-destination key path for tests and the CLI.
pub fn pod_netns_cookie(netns: &Path) -> anyhow::Result<u64> {
    sys::in_netns(netns, || {
        let s = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        sys::netns_cookie(s.as_fd())
    })
    .context("netns cookie")
}
