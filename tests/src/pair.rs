//! Two agents back to back on loopback, for the relay tests.
//!
//! ```text
//! client app ──▶ [client agent: accept, dial, mTLS client, relay] ══mTLS══▶
//!                        [server agent: accept, mTLS server, dial app, relay] ──▶ server app
//! ```
//!
//! Both agents run in-process on the test's tokio runtime and use the same handshake driver
//! and relay as the node agent; only steering is left out (the client app dials the client
//! agent directly, which dials the server agent at a fixed address). Each flow's outcome is
//! reported per agent, so a test can assert *why* a flow ended, not just that it did.
//!
//! The server agent can be told to misbehave ([`ServerAgent`]) to exercise the client agent's
//! policy on tickets and truncation. Shared by `relay_userspace.rs` (host) and `relay_ktls.rs`
//! (VM).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    digest::Sha256,
    wire::{Capture, Filter, Stream, assert_no_plaintext, find_plaintext},
};
use interceptor::{
    ca::{Ca, CertificateAuthority, DEFAULT_LEAF_TTL},
    handshake::{MeshCrypto, client_config, driver, mesh_roots, server_config},
    identity::{SpiffeId, TrustDomain},
    ktls::{self, Cipher, content_type},
    relay::{self, RecordLayer, RelayConfig, RelayError, RelayStats},
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

pub const TRUST_DOMAIN: &str = "cluster.local";
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/frontend/sa/web";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/backend/sa/api";

/// Generous per-step timeout: a hung relay fails the test instead of hanging it.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(600);

/// Which record layer both agents use after the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    Userspace,
    Kernel,
}

/// What the server agent does after its handshake.
#[derive(Clone, Debug, Default)]
pub enum ServerAgent {
    /// Dials the server app and relays, like the real agent.
    #[default]
    Relay,
    /// Waits this long after the handshake, then relays: lets the client's data and FIN
    /// arrive first.
    RelayAfter(Duration),
    /// Kernel layer only: right after installing kTLS, sends one record of `content_type`
    /// with `body` through the kernel (a NewSessionTicket, as a TLS stack with tickets enabled
    /// would send; a KeyUpdate; an alert), then relays.
    RecordThenRelay { content_type: u8, body: Vec<u8> },
    /// Sends these bytes as application data, then a FIN without close_notify, as a cut
    /// connection (or a forged FIN) looks; never dials the server app.
    Truncate(Vec<u8>),
}

/// Whose certificate the server agent presents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerCa {
    /// The mesh CA both agents trust.
    #[default]
    Mesh,
    /// Another CA for the same trust domain (a second cluster that also ran `ca init`).
    Foreign,
}

#[derive(Clone, Debug)]
pub struct PairOptions {
    pub layer: Layer,
    /// The SPIFFE ID the client agent expects the server to present.
    pub client_expects: String,
    pub server_ca: ServerCa,
    pub server_agent: ServerAgent,
    pub relay: RelayConfig,
    pub handshake_timeout: Duration,
    /// Both agents call `relay::prepare_socket` before the handshake, as the node agent does.
    /// Off, a peer that half-closes right after the handshake makes that flow fall back to
    /// userspace.
    pub prepare_socket: bool,
}

impl PairOptions {
    pub fn new(layer: Layer) -> PairOptions {
        PairOptions {
            layer,
            client_expects: SERVER_ID.to_string(),
            server_ca: ServerCa::Mesh,
            server_agent: ServerAgent::Relay,
            relay: RelayConfig {
                idle_timeout: STEP_TIMEOUT,
                ..RelayConfig::default()
            },
            handshake_timeout: Duration::from_secs(10),
            prepare_socket: true,
        }
    }
}

/// Which agent a report comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Server,
}

/// Why a flow failed at one agent.
#[derive(Debug)]
pub enum FlowError {
    Handshake(driver::DriveError),
    Relay(RelayError),
    Setup(String),
}

/// How one flow ended at one agent.
#[derive(Debug)]
pub struct FlowReport {
    pub side: Side,
    pub result: Result<(), FlowError>,
    pub stats: Arc<RelayStats>,
}

/// A running pair of agents. Dropping it stops both.
pub struct Pair {
    /// Where the client app connects: the client agent's listener.
    pub entry: SocketAddr,
    /// The server agent's listener: the agent-to-agent (mesh) leg ends here.
    pub mesh: SocketAddr,
    /// The server app's listener; tests accept the relayed connections here.
    pub server_app: TcpListener,
    reports: HashMap<Side, mpsc::UnboundedReceiver<FlowReport>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Agent {
    layer: Layer,
    prepare_socket: bool,
    relay: RelayConfig,
    handshake_timeout: Duration,
    reports: mpsc::UnboundedSender<FlowReport>,
}

impl Pair {
    /// Issues certificates, binds the three listeners on 127.0.0.1 and starts both agents.
    pub async fn start(opts: PairOptions) -> Pair {
        let td: TrustDomain = TRUST_DOMAIN.parse().expect("trust domain");
        let ca = Ca::generate(&td).expect("mesh CA");
        let roots = mesh_roots(ca.roots()).expect("roots");
        let client_leaf = ca
            .issue(&id(CLIENT_ID), DEFAULT_LEAF_TTL)
            .expect("client leaf");
        let (server_leaf, server_roots) = match opts.server_ca {
            ServerCa::Mesh => (
                ca.issue(&id(SERVER_ID), DEFAULT_LEAF_TTL)
                    .expect("server leaf"),
                Arc::clone(&roots),
            ),
            ServerCa::Foreign => {
                let other = Ca::generate(&td).expect("foreign CA");
                (
                    other
                        .issue(&id(SERVER_ID), DEFAULT_LEAF_TTL)
                        .expect("foreign server leaf"),
                    mesh_roots(other.roots()).expect("foreign roots"),
                )
            }
        };
        let suites = &MeshCrypto::default_aes_gcm();
        let client_cfg = client_config(&client_leaf, roots, &td, &id(&opts.client_expects), suites)
            .expect("client config");
        let server_cfg =
            server_config(&server_leaf, server_roots, &td, suites).expect("server config");

        let entry_l = listen().await;
        let mesh_l = listen().await;
        let server_app = listen().await;
        let entry = entry_l.local_addr().expect("addr");
        let mesh = mesh_l.local_addr().expect("addr");
        let app_addr = server_app.local_addr().expect("addr");

        let (client_tx, client_rx) = mpsc::unbounded_channel();
        let (server_tx, server_rx) = mpsc::unbounded_channel();
        let client_agent = Arc::new(Agent {
            layer: opts.layer,
            prepare_socket: opts.prepare_socket,
            relay: opts.relay,
            handshake_timeout: opts.handshake_timeout,
            reports: client_tx,
        });
        let server_agent = Arc::new(Agent {
            layer: opts.layer,
            prepare_socket: opts.prepare_socket,
            relay: opts.relay,
            handshake_timeout: opts.handshake_timeout,
            reports: server_tx,
        });

        let behaviour = opts.server_agent.clone();
        let tasks = vec![
            tokio::spawn(accept_loop(entry_l, move |app| {
                let agent = Arc::clone(&client_agent);
                let cfg = Arc::clone(&client_cfg);
                async move { agent.outbound(app, mesh, cfg).await }
            })),
            tokio::spawn(accept_loop(mesh_l, move |peer| {
                let agent = Arc::clone(&server_agent);
                let cfg = Arc::clone(&server_cfg);
                let behaviour = behaviour.clone();
                async move { agent.inbound(peer, app_addr, cfg, behaviour).await }
            })),
        ];
        let mut reports = HashMap::new();
        reports.insert(Side::Client, client_rx);
        reports.insert(Side::Server, server_rx);
        Pair {
            entry,
            mesh,
            server_app,
            reports,
            tasks,
        }
    }

    /// The next flow report from `side`'s agent.
    pub async fn report(&mut self, side: Side) -> FlowReport {
        let rx = self.reports.get_mut(&side).expect("side");
        tokio::time::timeout(STEP_TIMEOUT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{side:?} agent reported nothing within {STEP_TIMEOUT:?}"))
            .expect("agent stopped")
    }

    /// Accepts the relayed connection at the server app.
    pub async fn accept_app(&self) -> TcpStream {
        tokio::time::timeout(STEP_TIMEOUT, self.server_app.accept())
            .await
            .expect("server agent never dialed the server app")
            .expect("accept")
            .0
    }
}

async fn listen() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind 127.0.0.1")
}

fn id(s: &str) -> SpiffeId {
    s.parse().expect("SPIFFE ID")
}

async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                let _ = sock.set_nodelay(true);
                tokio::spawn(handle(sock));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

impl Agent {
    fn report(&self, side: Side, result: Result<(), FlowError>, stats: Arc<RelayStats>) {
        let _ = self.reports.send(FlowReport {
            side,
            result,
            stats,
        });
    }

    fn prepare(&self, peer: &TcpStream) {
        if self.prepare_socket {
            relay::prepare_socket(peer, self.record_layer()).expect("prepare socket for kTLS");
        }
    }

    fn record_layer(&self) -> RecordLayer {
        match self.layer {
            Layer::Userspace => RecordLayer::Userspace,
            Layer::Kernel => RecordLayer::Kernel {
                expect_no_pad: true,
            },
        }
    }

    /// The client agent: dial the server agent, handshake, relay. A refused handshake resets
    /// the app's connection (fail closed: the app must not mistake it for an empty reply).
    async fn outbound(
        self: Arc<Self>,
        app: TcpStream,
        mesh: SocketAddr,
        cfg: Arc<rustls::ClientConfig>,
    ) {
        let stats = RelayStats::new();
        let mut peer = match TcpStream::connect(mesh).await {
            Ok(p) => p,
            Err(e) => {
                let _ = app.set_zero_linger();
                return self.report(Side::Client, Err(FlowError::Setup(e.to_string())), stats);
            }
        };
        let _ = peer.set_nodelay(true);
        self.prepare(&peer);
        let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
        let est = match driver::client_handshake(&mut peer, cfg, name, self.handshake_timeout).await
        {
            Ok(est) => est,
            Err(e) => {
                let _ = app.set_zero_linger();
                return self.report(Side::Client, Err(FlowError::Handshake(e)), stats);
            }
        };
        let r = relay::relay(
            app,
            peer,
            est,
            self.record_layer(),
            self.relay,
            Arc::clone(&stats),
        )
        .await;
        self.report(Side::Client, r.map_err(FlowError::Relay), stats);
    }

    /// The server agent: handshake, then relay to the server app (or misbehave).
    async fn inbound(
        self: Arc<Self>,
        mut peer: TcpStream,
        app_addr: SocketAddr,
        cfg: Arc<rustls::ServerConfig>,
        behaviour: ServerAgent,
    ) {
        let stats = RelayStats::new();
        self.prepare(&peer);
        let est = match driver::server_handshake(&mut peer, cfg, self.handshake_timeout).await {
            Ok(est) => est,
            Err(e) => return self.report(Side::Server, Err(FlowError::Handshake(e)), stats),
        };
        let r = match behaviour {
            ServerAgent::Relay | ServerAgent::RelayAfter(_) => {
                if let ServerAgent::RelayAfter(d) = behaviour {
                    tokio::time::sleep(d).await;
                }
                self.relay_to_app(peer, app_addr, est, &stats).await
            }
            ServerAgent::RecordThenRelay { content_type, body } => {
                self.record_then_relay(peer, app_addr, est, content_type, &body, &stats)
                    .await
            }
            ServerAgent::Truncate(data) => truncate(peer, est, self.layer, &data).await,
        };
        self.report(Side::Server, r, stats);
    }

    async fn relay_to_app(
        &self,
        peer: TcpStream,
        app_addr: SocketAddr,
        est: driver::Established,
        stats: &Arc<RelayStats>,
    ) -> Result<(), FlowError> {
        let app = TcpStream::connect(app_addr)
            .await
            .map_err(|e| FlowError::Setup(format!("dial server app: {e}")))?;
        let _ = app.set_nodelay(true);
        relay::relay(
            app,
            peer,
            est,
            self.record_layer(),
            self.relay,
            Arc::clone(stats),
        )
        .await
        .map_err(FlowError::Relay)
    }

    async fn record_then_relay(
        &self,
        peer: TcpStream,
        app_addr: SocketAddr,
        est: driver::Established,
        content_type: u8,
        body: &[u8],
        stats: &Arc<RelayStats>,
    ) -> Result<(), FlowError> {
        assert_eq!(self.layer, Layer::Kernel, "record injection needs kTLS");
        let h = est
            .into_ktls_secrets()
            .map_err(|e| FlowError::Setup(e.to_string()))?;
        h.secrets
            .install(peer.as_fd(), true)
            .map_err(|e| FlowError::Setup(e.to_string()))?;
        let n = ktls::sys::send_record(peer.as_fd(), content_type, body)
            .map_err(|e| FlowError::Setup(format!("send record: {e}")))?;
        assert_eq!(n, body.len());
        let app = TcpStream::connect(app_addr)
            .await
            .map_err(|e| FlowError::Setup(format!("dial server app: {e}")))?;
        relay::relay_ktls(
            app,
            peer,
            h.secrets.cipher,
            h.leftover_plaintext,
            self.relay,
            Arc::clone(stats),
        )
        .await
        .map_err(FlowError::Relay)
    }
}

/// A well-formed TLS 1.3 NewSessionTicket handshake message (RFC 8446 §4.6.1) with an
/// opaque 32-byte ticket, as a TLS stack with tickets enabled sends after the handshake.
pub fn new_session_ticket() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&7200u32.to_be_bytes()); // ticket_lifetime
    body.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // ticket_age_add
    body.extend_from_slice(&[8, 1, 2, 3, 4, 5, 6, 7, 8]); // ticket_nonce
    body.extend_from_slice(&32u16.to_be_bytes()); // ticket
    body.extend_from_slice(&[0xab; 32]);
    body.extend_from_slice(&0u16.to_be_bytes()); // extensions
    let len = u32::try_from(body.len()).expect("small");
    let mut msg = vec![4]; // new_session_ticket
    msg.extend_from_slice(&len.to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    msg
}

/// The server agent as a cut connection: data, then FIN, no close_notify.
async fn truncate(
    mut peer: TcpStream,
    est: driver::Established,
    layer: Layer,
    data: &[u8],
) -> Result<(), FlowError> {
    let setup = |e: io::Error| FlowError::Setup(e.to_string());
    match layer {
        Layer::Userspace => {
            let mut conn = est
                .conn
                .into_rustls()
                .unwrap_or_else(|_| panic!("a buffered session"));
            io::Write::write_all(&mut conn.writer(), data).map_err(setup)?;
            let mut out = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut out).map_err(setup)?;
            }
            peer.write_all(&out).await.map_err(setup)?;
        }
        Layer::Kernel => {
            let h = est
                .into_ktls_secrets()
                .map_err(|e| FlowError::Setup(e.to_string()))?;
            h.secrets
                .install(peer.as_fd(), true)
                .map_err(|e| FlowError::Setup(e.to_string()))?;
            // Through kTLS: encrypted, but the kernel never adds close_notify.
            peer.write_all(data).await.map_err(setup)?;
        }
    }
    peer.shutdown().await.map_err(setup)?;
    // Keep the socket until the client agent gives up on it.
    let mut sink = [0u8; 4096];
    while let Ok(n) = peer.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Payloads

/// A deterministic pseudo-random byte stream (xorshift64*): gigabytes can be sent and checked
/// without holding them, and no 16-byte window repeats, as the wire oracle needs.
#[derive(Clone)]
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Fills `buf`; the stream continues across calls only at multiples of 8 bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// What one side of an exchange sent and received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest32 {
    pub len: u64,
    pub sha256: [u8; 32],
}

/// Writes `len` pattern bytes in `chunk`-sized writes and returns their digest.
pub async fn send_pattern<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: u64,
    chunk: usize,
) -> io::Result<Digest32> {
    let mut p = Pattern::new(seed);
    let mut buf = vec![0u8; chunk.max(1)];
    let mut h = Sha256::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    Ok(Digest32 {
        len,
        sha256: h.finish(),
    })
}

/// Reads to EOF and returns the digest of everything read.
pub async fn read_digest<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Digest32> {
    let mut buf = vec![0u8; 256 << 10];
    let mut h = Sha256::new();
    let mut len = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok(Digest32 {
        len,
        sha256: h.finish(),
    })
}

/// The outcome of [`exchange`].
#[derive(Debug)]
pub struct Exchanged {
    pub elapsed: Duration,
    pub client_addr: SocketAddr,
}

/// The pattern seeds [`exchange`] uses for the client's and the server's bytes, so a test can
/// regenerate the payloads (with [`Pattern::bytes`]; `chunk` must be a multiple of 8).
pub fn seeds(up: u64, down: u64) -> (u64, u64) {
    (up ^ 0x5eed_0001, down ^ 0x5eed_0002)
}

/// One flow through the pair: the client app sends `up` bytes while the server app sends
/// `down` bytes; each half-closes after sending and reads to EOF. Panics unless both
/// directions arrive intact (SHA-256 and length) and both agents report a clean end with
/// matching byte counts.
pub async fn exchange(pair: &mut Pair, up: u64, down: u64, chunk: usize) -> Exchanged {
    let start = Instant::now();
    let client = TcpStream::connect(pair.entry).await.expect("connect entry");
    let client_addr = client.local_addr().expect("addr");
    let server = pair.accept_app().await;
    // Small writes stay small segments (and small records), the harder case for the relay.
    client.set_nodelay(true).expect("nodelay");
    server.set_nodelay(true).expect("nodelay");
    let (seed_up, seed_down) = seeds(up, down);
    let side = |sock: TcpStream, seed: u64, len: u64| async move {
        let (mut r, mut w) = sock.into_split();
        let (sent, got) = tokio::join!(
            async {
                let d = send_pattern(&mut w, seed, len, chunk).await?;
                w.shutdown().await?;
                Ok::<_, io::Error>(d)
            },
            read_digest(&mut r)
        );
        (sent, got)
    };
    let ((c_sent, c_got), (s_sent, s_got)) = tokio::time::timeout(STEP_TIMEOUT, async {
        tokio::join!(side(client, seed_up, up), side(server, seed_down, down))
    })
    .await
    .expect("exchange timed out");
    let (c_sent, c_got, s_sent, s_got) = match (c_sent, c_got, s_sent, s_got) {
        (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
        (a, b, c, d) => {
            // The apps' view says a flow failed; the agents' reports say why.
            let wait = Duration::from_secs(5);
            let client = tokio::time::timeout(wait, pair.report(Side::Client))
                .await
                .map(|r| r.result);
            let server = tokio::time::timeout(wait, pair.report(Side::Server))
                .await
                .map(|r| r.result);
            panic!(
                "exchange of {up}/{down} bytes failed: client app sent {a:?}, received {b:?}; \
                 server app sent {c:?}, received {d:?}; client agent: {client:?}; server agent: \
                 {server:?}"
            );
        }
    };
    let elapsed = start.elapsed();
    assert_eq!(s_got, c_sent, "client -> server bytes differ ({up} sent)");
    assert_eq!(c_got, s_sent, "server -> client bytes differ ({down} sent)");
    for side in [Side::Client, Side::Server] {
        let r = pair.report(side).await;
        assert!(r.result.is_ok(), "{side:?} agent: {:?}", r.result);
        let (to_peer, to_app) = match side {
            Side::Client => (up, down),
            Side::Server => (down, up),
        };
        assert_eq!(
            r.stats.bytes_app_to_peer(),
            to_peer,
            "{side:?} app->peer count"
        );
        assert_eq!(
            r.stats.bytes_peer_to_app(),
            to_app,
            "{side:?} peer->app count"
        );
    }
    Exchanged {
        elapsed,
        client_addr,
    }
}

/// Reads until EOF or error, returning the bytes and how the stream ended.
pub async fn read_until_end(sock: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match tokio::time::timeout(STEP_TIMEOUT, sock.read(&mut buf)).await {
            Err(_) => return (out, Err(io::ErrorKind::TimedOut.into())),
            Ok(Ok(0)) => return (out, Ok(())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (out, Err(e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Environment

/// Runs `f` on a fresh multi-threaded runtime, with the open-file limit raised: a kTLS flow
/// through the pair holds fourteen descriptors (two sockets and two pipes in each agent, plus
/// both app sockets), so 200 flows exceed the usual soft limit of 1024.
pub fn run<F: Future>(f: F) -> F::Output {
    raise_nofile_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (best effort).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
        }
    }
}

/// Moves the calling thread into a fresh network namespace with `lo` up, so a capture on `lo`
/// and `/proc/thread-self/net/tls_stat` see only this test. Threads spawned afterwards (the
/// runtime's workers) inherit it. Needs root.
pub fn private_netns() {
    // SAFETY: unshare(CLONE_NEWNET) only changes this thread's namespace; no memory involved.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        r,
        0,
        "unshare(CLONE_NEWNET): {} (needs root: run via `cargo xtask vm-test` or as root)",
        io::Error::last_os_error()
    );
    // SAFETY: plain socket(2); wrapped in OwnedFd immediately.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let s = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name[..2].copy_from_slice(&[b'l' as libc::c_char, b'o' as libc::c_char]);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the flags of a valid ifreq.
    unsafe {
        assert_eq!(
            libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &raw mut ifr),
            0
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &raw mut ifr),
            0,
            "bring lo up: {}",
            io::Error::last_os_error()
        );
    }
}

/// Fails the test unless this kernel runs TLS 1.3 AES-GCM in kTLS both ways: the kTLS relay
/// tests must never pass by skipping.
pub fn require_ktls() {
    let s = ktls::probe();
    assert!(
        s.supports(Cipher::Aes128Gcm),
        "kernel TLS is not usable here ({}). The kTLS relay tests run on the supported Debian \
         kernels: `cargo xtask vm-test relay_ktls` (in_vm={})",
        s.summary(),
        crate::in_vm()
    );
}

/// `/proc/net/tls_stat` of the calling thread's network namespace.
pub fn tls_stat() -> HashMap<String, i64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/tls_stat")
        .expect("read /proc/thread-self/net/tls_stat (is the tls module loaded?)");
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// Whether `bytes` (one direction of the agent-to-agent leg) is a well-formed TLS 1.3
/// connection: the first record is a handshake record (a ClientHello may carry the legacy
/// record version 0x0301), every later record is one of ChangeCipherSpec or encrypted
/// (content type 23, version 0x0303), and the stream ends on a record boundary. Returns the
/// number of records.
pub fn tls13_stream(bytes: &[u8]) -> Result<usize, String> {
    let mut off = 0;
    let mut n = 0;
    while off < bytes.len() {
        let h = bytes
            .get(off..off + 5)
            .ok_or_else(|| format!("partial record header at {off}"))?;
        let version = u16::from_be_bytes([h[1], h[2]]);
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        let ok = match (n, h[0]) {
            (0, content_type::HANDSHAKE) => version == 0x0301 || version == 0x0303,
            (_, content_type::CHANGE_CIPHER_SPEC | content_type::APPLICATION_DATA) => {
                version == 0x0303
            }
            _ => false,
        };
        if !ok || len > (1 << 14) + 256 {
            return Err(format!(
                "record {n} at offset {off}: type {}, version {version:#06x}, length {len}",
                h[0]
            ));
        }
        off += 5 + len;
        if off > bytes.len() {
            return Err(format!("record {n} runs past the end of the stream"));
        }
        n += 1;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// Scenarios shared by the userspace (host) and kernel (VM) relay tests

/// Client writes a request and half-closes; the server reads to EOF, only then answers and
/// closes; the client reads the answer to EOF. Both agents must end cleanly.
pub async fn request_half_close_response(opts: PairOptions) {
    let mut pair = Pair::start(opts).await;
    let mut client = TcpStream::connect(pair.entry).await.expect("connect");
    let mut server = pair.accept_app().await;
    let request = Pattern::bytes(1, 100_001);
    let response = Pattern::bytes(2, 300_007);

    client.write_all(&request).await.expect("write request");
    client.shutdown().await.expect("half-close");
    let (got, end) = read_until_end(&mut server).await;
    end.expect("server reads the request to a clean EOF");
    assert!(got == request, "request corrupted");

    server.write_all(&response).await.expect("write response");
    drop(server);
    let (got, end) = read_until_end(&mut client).await;
    end.expect("client reads the response to a clean EOF");
    assert!(got == response, "response corrupted");

    for side in [Side::Client, Side::Server] {
        let r = pair.report(side).await;
        assert!(r.result.is_ok(), "{side:?}: {:?}", r.result);
    }
}

/// `flows` connections at once, each sending a distinct payload that the server app echoes
/// after reading it to EOF.
pub async fn concurrent_flows(opts: PairOptions, flows: usize) {
    let mut pair = Pair::start(opts).await;
    let server_app = async {
        let mut echoes = Vec::new();
        for _ in 0..flows {
            let mut s = pair.accept_app().await;
            echoes.push(tokio::spawn(async move {
                let (data, end) = read_until_end(&mut s).await;
                end.map_err(|e| format!("echo server reads to EOF: {e}"))?;
                s.write_all(&data)
                    .await
                    .map_err(|e| format!("echo server writes: {e}"))
            }));
        }
        let mut failures = Vec::new();
        for e in echoes {
            if let Err(e) = e.await.expect("echo task") {
                failures.push(e);
            }
        }
        failures
    };
    let entry = pair.entry;
    let clients = async {
        let mut tasks = Vec::new();
        for i in 0..flows {
            tasks.push(tokio::spawn(async move {
                let payload = Pattern::bytes(i as u64, (16 << 10) | i);
                let mut c = TcpStream::connect(entry)
                    .await
                    .map_err(|e| format!("flow {i}: connect: {e}"))?;
                c.write_all(&payload)
                    .await
                    .map_err(|e| format!("flow {i}: write: {e}"))?;
                c.shutdown()
                    .await
                    .map_err(|e| format!("flow {i}: half-close: {e}"))?;
                let (echo, end) = read_until_end(&mut c).await;
                end.map_err(|e| format!("flow {i}: client reads the echo to EOF: {e}"))?;
                if echo != payload {
                    return Err(format!("flow {i}: echo differs"));
                }
                Ok(())
            }));
        }
        let mut failures = Vec::new();
        for t in tasks {
            if let Err(e) = t.await.expect("client task") {
                failures.push(e);
            }
        }
        failures
    };
    let (server_failures, client_failures) = tokio::join!(server_app, clients);
    let mut agent_failures = Vec::new();
    for side in [Side::Client, Side::Server] {
        for _ in 0..flows {
            let r = pair.report(side).await;
            if let Err(e) = r.result {
                agent_failures.push(format!("{side:?} agent: {e:?}"));
            }
        }
    }
    assert!(
        server_failures.is_empty() && client_failures.is_empty() && agent_failures.is_empty(),
        "{} client app, {} server app and {} agent failures:\n{}\n{}\n{}",
        client_failures.len(),
        server_failures.len(),
        agent_failures.len(),
        client_failures.join("\n"),
        server_failures.join("\n"),
        agent_failures.join("\n"),
    );
}

/// A server that speaks first (SMTP, SSH banners) is heard promptly without the client
/// sending anything.
pub async fn server_speaks_first(opts: PairOptions) {
    let pair = Pair::start(opts).await;
    let t0 = Instant::now();
    let mut client = TcpStream::connect(pair.entry).await.expect("connect");
    let mut server = pair.accept_app().await;
    server.write_all(b"220 banner\r\n").await.expect("banner");
    let mut banner = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(1), client.read_exact(&mut banner))
        .await
        .expect("banner did not arrive within 1 s")
        .expect("read banner");
    assert_eq!(&banner, b"220 banner\r\n");
    eprintln!("banner after {:?}", t0.elapsed());
    client.shutdown().await.expect("half-close");
    let (rest, end) = read_until_end(&mut server).await;
    assert!(rest.is_empty() && end.is_ok(), "{end:?}");
    drop(server);
    let (rest, end) = read_until_end(&mut client).await;
    assert!(rest.is_empty() && end.is_ok(), "{end:?}");
}

/// Connects and expects the agent to reset the connection after at most `prefix` arrived.
pub async fn app_sees_reset(pair: &Pair, prefix: &[u8]) {
    let mut client = match TcpStream::connect(pair.entry).await {
        Ok(c) => c,
        // On loopback the agent can refuse and reset before connect() even returns.
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect: {e}"),
    };
    let (got, end) = read_until_end(&mut client).await;
    assert!(
        prefix.starts_with(&got),
        "unexpected bytes before the reset: {got:?}"
    );
    let e = end.expect_err("the flow must not end cleanly");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
}

/// A FIN from the peer without close_notify: the app gets a reset after whatever arrived,
/// never an EOF that would make the cut-off reply look complete.
pub async fn fin_without_close_notify_resets_the_app(mut opts: PairOptions) {
    let partial = b"partial respo";
    opts.server_agent = ServerAgent::Truncate(partial.to_vec());
    let mut pair = Pair::start(opts).await;
    app_sees_reset(&pair, partial).await;
    let r = pair.report(Side::Client).await;
    assert!(
        matches!(r.result, Err(FlowError::Relay(RelayError::Truncated))),
        "client agent: {:?}",
        r.result
    );
}

/// No 16-byte window of either payload crosses the agent-to-agent leg in the clear, and that
/// leg is pure TLS 1.3 records in both directions. Negative control: the payload *is* found
/// on the app's leg, proving the capture sees the traffic. Call it in a private netns.
pub async fn wire_oracle(opts: PairOptions) {
    let mut pair = Pair::start(opts).await;
    // Odd sizes over many records (16 KiB), pipe loads (64 KiB) and the userspace record
    // layer's batches (8 records) each way. A quarter under emulation, where reassembling and
    // searching the capture with unoptimised code took a minute: 64 and 48 records still.
    let (up, down) = if crate::in_vm() {
        ((1 << 20) + 5, (3 << 18) + 7)
    } else {
        (4 * (1 << 20) + 5, 3 * (1 << 20) + 7)
    };
    let cap = Capture::start_filtered(
        "lo",
        Filter::TcpPorts(vec![pair.entry.port(), pair.mesh.port()]),
    );
    let x = exchange(&mut pair, up, down, 64 << 10).await;
    let streams = cap.stop_streams();
    let (seed_up, seed_down) = seeds(up, down);
    let payload_up = Pattern::bytes(seed_up, up as usize);
    let payload_down = Pattern::bytes(seed_down, down as usize);

    let mesh: Vec<&Stream> = streams
        .streams
        .iter()
        .filter(|s| s.src == pair.mesh || s.dst == pair.mesh)
        .collect();
    assert_eq!(
        mesh.len(),
        2,
        "one agent-to-agent connection, both directions"
    );
    for s in &mesh {
        s.assert_complete();
        let records = tls13_stream(&s.bytes)
            .unwrap_or_else(|e| panic!("{} -> {}: not TLS 1.3: {e}", s.src, s.dst));
        assert!(records > 0);
    }
    let carried: usize = mesh.iter().map(|s| s.bytes.len()).sum();
    assert!(
        carried as u64 > up + down,
        "capture missed traffic: {carried} bytes"
    );
    assert_no_plaintext(&mesh, &payload_up);
    assert_no_plaintext(&mesh, &payload_down);

    let app_leg: Vec<&Stream> = streams
        .streams
        .iter()
        .filter(|s| s.src == x.client_addr || s.dst == x.client_addr)
        .collect();
    assert!(
        find_plaintext(&app_leg, &payload_up).is_some(),
        "negative control: the app leg carries the payload in the clear and must be found"
    );
}

/// While the server app does not read, the client app's writes stall after a bounded amount
/// (socket buffers plus the relays' fixed buffers, less than `limit` bytes), proving nothing
/// queues without bound; then the client writes a little more (so the buffers are full again)
/// and half-closes with everything still in flight (the close_notify must queue behind it),
/// the server reads, and every byte must arrive (length and SHA-256). The bytes are made as
/// they are written: what is sent is what the stall needs, not `limit`.
pub async fn slow_reader_back_pressure(opts: PairOptions, limit: usize) {
    const CHUNK: usize = 1 << 20;
    /// Written after the stall, before the half-close: more than the reader frees at once.
    const AFTER_STALL: usize = 2 * CHUNK;
    let mut pair = Pair::start(opts).await;
    let mut client = TcpStream::connect(pair.entry).await.expect("connect");
    let mut server = pair.accept_app().await;
    let mut pattern = Pattern::new(9);
    let mut chunk = vec![0u8; CHUNK];
    let mut sent = Sha256::new();
    let mut written = 0;
    // chunk[at..] is made (and hashed) but not written yet.
    let mut at = CHUNK;
    loop {
        if at == CHUNK {
            pattern.fill(&mut chunk);
            sent.update(&chunk);
            at = 0;
        }
        let w = tokio::time::timeout(Duration::from_millis(500), client.write(&chunk[at..]));
        match w.await {
            Ok(Ok(n)) => {
                written += n;
                at += n;
            }
            Ok(Err(e)) => panic!("write: {e}"),
            Err(_) => break,
        }
        assert!(
            written < limit,
            "{written} bytes accepted with nobody reading"
        );
    }
    eprintln!("writer stalled with {} KiB in flight", written >> 10);
    let reader = tokio::spawn(async move {
        read_digest(&mut server)
            .await
            .expect("server app reads to a clean EOF")
    });
    client
        .write_all(&chunk[at..])
        .await
        .expect("write the rest");
    let mut total = written + (CHUNK - at);
    for _ in 0..AFTER_STALL / CHUNK {
        pattern.fill(&mut chunk);
        sent.update(&chunk);
        client.write_all(&chunk).await.expect("write the rest");
        total += CHUNK;
    }
    client.shutdown().await.expect("half-close");
    let got = reader.await.expect("reader");
    let want = Digest32 {
        len: total as u64,
        sha256: sent.finish(),
    };
    assert!(
        got == want,
        "data lost or corrupted under back-pressure: {} of {total} bytes arrived, SHA-256 {}",
        got.len,
        if got.sha256 == want.sha256 {
            "equal"
        } else {
            "differs"
        }
    );
    let (rest, end) = read_until_end(&mut client).await;
    assert!(rest.is_empty() && end.is_ok(), "{end:?}");
    for side in [Side::Client, Side::Server] {
        let r = pair.report(side).await;
        assert!(r.result.is_ok(), "{side:?}: {:?}", r.result);
    }
}
