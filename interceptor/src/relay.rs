//! Moves bytes between an app's plain TCP connection and the mesh connection to the peer agent.
//!
//! Two record layers, one set of rules:
//!
//! * **kernel** ([`relay_ktls`]): the peer socket carries kTLS TX and RX; plaintext is spliced
//!   through one pipe per direction and never enters userspace. Non-data records stop
//!   `splice(2)` with `EINVAL` and are read with `recvmsg` + cmsg (research T6).
//! * **userspace** ([`relay_userspace`]): rustls keeps the record layer, for kernels without
//!   kTLS or ciphers the kernel lacks.
//!
//! The rules both follow, because the app must not be able to tell them apart:
//!
//! * **Half-close is exact.** EOF from the app becomes close_notify then FIN toward the peer;
//!   close_notify from the peer becomes `shutdown(SHUT_WR)` toward the app. The other direction
//!   keeps flowing, so request / half-close / response protocols work.
//! * **Truncation fails closed.** A FIN from the peer without close_notify means someone cut
//!   the stream; the app gets a reset, never a clean EOF that would make a cut-off response
//!   look complete. Every other failure (fatal alert, unexpected record, socket error, idle
//!   timeout, record limit) resets both sides too.
//! * **Session tickets are dropped**; the mesh never resumes. Any other post-handshake
//!   handshake message (KeyUpdate in particular, which these kernels cannot follow) is fatal
//!   in kernel mode.
//! * **Back-pressure holds.** A direction stops reading its source while its buffer (pipe or
//!   userspace buffer) toward the destination is full, so memory per flow is bounded and a slow
//!   reader slows the writer instead of growing a queue.
//! * **Both directions progress independently**, so neither side can deadlock the other by
//!   writing while the other writes.
//!
//! A flow's life: [`prepare_socket`] on the socket to the peer agent right after connect or
//! accept, the handshake (`handshake::driver`), then [`relay`] with the [`RecordLayer`] the
//! node supports, sharing a [`RelayStats`] with the flow table.
//!
//! Each relay is one future that polls both directions; it uses socket readiness only (no
//! spinning, no extra tasks), and yields after [`YIELD_AFTER_BYTES`] so one fast flow cannot
//! starve others on the same worker.

mod appleg;
mod buf;
mod kernel;
mod plain;
pub mod record;
mod spliced;
mod userspace;

pub use kernel::{KtlsRelayState, ParkedKtls};

use std::{
    future::Future,
    io,
    os::fd::AsFd,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use rustls::AlertDescription;
use tokio::{
    net::TcpStream,
    time::{Instant, Sleep},
};

use crate::{
    handshake::driver::{Established, Session},
    ktls::{self, Cipher, KtlsError},
};

/// A relay gives other tasks a turn after moving this much in one poll.
pub const YIELD_AFTER_BYTES: usize = 4 << 20;

/// The userspace relay keeps its buffers while its flow has moved bytes within this long, and
/// gives them back once it has been quiet for it. Released at every wait instead, a busy flow
/// paid an allocation, a fresh zeroed output buffer and (glibc trimming the heap's top) a
/// `brk` and page faults every time a socket made it wait: 22 `brk` per MB through two relays
/// (`interceptor-bench relay-cost`, bench/README.md). An idle flow still holds no buffer.
/// Short, because flows that go quiet together hold their buffers together and glibc keeps
/// the peak: at 100 ms the agents' RSS growth for 1 000 idle flows doubled (20.2 against
/// 9.3 MB), while a busy flow's waits last well under a millisecond.
pub const RELEASE_AFTER: Duration = Duration::from_millis(5);

/// Which record layer carries a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RelayMode {
    /// Kernel TLS on the peer socket, splice(2) in both directions.
    Ktls,
    /// rustls in the agent.
    Userspace,
}

/// Live byte counts of one flow, shared with whoever lists flows (updated as bytes move, read
/// without locking).
#[derive(Debug, Default)]
pub struct RelayStats {
    mode: AtomicU8,
    app_to_peer: AtomicU64,
    peer_to_app: AtomicU64,
    /// An agent upgrade asks the kernel relay to stop at its next poll and leave its state
    /// in `parked` (see [`ParkedKtls`]); other relays ignore it and run on.
    park: AtomicBool,
    parked: std::sync::Mutex<Option<Box<ParkedKtls>>>,
    /// The flow's owner closed it (a policy change): the relay resets both of its sockets
    /// at its next poll and ends with `Ok` (see [`RelayStats::cancel`]).
    cancel: AtomicBool,
}

impl RelayStats {
    pub fn new() -> Arc<RelayStats> {
        Arc::new(RelayStats::default())
    }

    /// The record layer, once the relay has started (`None` while the flow is still
    /// handshaking).
    pub fn mode(&self) -> Option<RelayMode> {
        match self.mode.load(Ordering::Relaxed) {
            1 => Some(RelayMode::Ktls),
            2 => Some(RelayMode::Userspace),
            _ => None,
        }
    }

    /// Plaintext bytes the app sent that were handed to the peer's record layer.
    pub fn bytes_app_to_peer(&self) -> u64 {
        self.app_to_peer.load(Ordering::Relaxed)
    }

    /// Plaintext bytes from the peer delivered to the app's socket.
    pub fn bytes_peer_to_app(&self) -> u64 {
        self.peer_to_app.load(Ordering::Relaxed)
    }

    /// Asks the kernel relay to park at its next poll (the caller polls it again).
    pub fn request_park(&self) {
        self.park.store(true, Ordering::Release);
    }

    fn park_requested(&self) -> bool {
        self.park.load(Ordering::Acquire)
    }

    /// Asks the relay to reset both its sockets and end at its next poll (the caller polls
    /// it again; it ends with `Ok`). The relay owns the flow's only descriptors of them: a
    /// flow end costs its two sockets and nothing kept aside to reset them from outside.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Release);
    }

    /// Whether the flow's owner cancelled it; a relay checks it at the start of every poll
    /// and, once its loop has ended, to reset instead of closing.
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    fn deposit(&self, parked: ParkedKtls) {
        *self.parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(parked));
    }

    /// The relay's state if it parked (its future then ended with `Ok`).
    pub fn take_parked(&self) -> Option<Box<ParkedKtls>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn set_mode(&self, mode: RelayMode) {
        let v = match mode {
            RelayMode::Ktls => 1,
            RelayMode::Userspace => 2,
        };
        self.mode.store(v, Ordering::Relaxed);
    }

    fn add_app_to_peer(&self, n: usize) {
        self.app_to_peer.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn add_peer_to_app(&self, n: usize) {
        self.peer_to_app.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Tuning of one relay.
#[derive(Clone, Copy, Debug)]
pub struct RelayConfig {
    /// A flow that moves no byte in either direction for this long is reset.
    pub idle_timeout: Duration,
    /// Userspace mode: the largest each of the three per-flow buffers (app reads, peer
    /// ciphertext reads, plaintext toward the app) grows to, and the cap on rustls' queue of
    /// encrypted records; memory per busy flow is up to 4x this. The buffers start at one
    /// record (16 KiB), grow only while reads fill them, and are freed once the flow has
    /// waited [`RELEASE_AFTER`] with them drained, so an idle flow holds none. 128 KiB: less
    /// than half the system calls per MB of 64 KiB through two relays (57.9 against 130,
    /// `interceptor-bench relay-cost`) and 1.24x the single-stream bulk across two nodes in a
    /// paired run, at the same agent CPU per GB (bench/README.md "Bulk CPU per MB, counted").
    pub buffer_size: usize,
    /// Kernel mode: requested size of each of the two pipes, at most 1 MiB (the record-limit
    /// arithmetic assumes it). The kernel rounds it up to a power of two pages, and without
    /// CAP_SYS_RESOURCE refuses more than `/proc/sys/fs/pipe-max-size` (then 64 KiB stays).
    pub pipe_size: usize,
    /// Kernel mode: the app leg is short-circuited by sk_msg (`tuning.skMsgLocalLeg`), so the
    /// app's bytes are read with `recv` into a buffer rather than spliced (splice cannot see
    /// sk_msg-redirected data). The peer side stays zero-copy.
    pub app_leg_redirected: bool,
    /// Kernel mode: reset the flow once this many records were sent under the one key.
    /// `None` takes the cipher's limit ([`ktls_record_limit`]); set a small value only to
    /// test the limit.
    pub max_tx_records: Option<u64>,
    /// The peer is another agent and sends the first FIN: after our close_notify this side
    /// sends no FIN of its own (close_notify is what the peer agent acts on) and closes the
    /// connection only once the peer has closed it (at most [`PEER_FIN_WAIT`] later). The
    /// side that sends the first FIN keeps the connection's TIME_WAIT socket; on the
    /// dialing side that socket would hold a port of the pod's own address toward that one
    /// server port for 60 s, and under sustained churn to one port the dialing side runs
    /// out of them, so the dialing agent sets this and the TIME_WAIT stays with the server.
    pub peer_fin_first: bool,
    /// Userspace mode: the peer is another agent (a mesh session), so once rustls is idle the
    /// relay may continue on its own record layer, which refuses KeyUpdate and late
    /// post-handshake messages as the kernel's does. A TLS server outside the mesh (a
    /// DestinationRule's origination) may send those at any time, and its session was not
    /// made to give up its secrets: such flows keep rustls for their whole life. Set by
    /// [`relay`] for the mesh sessions it is given; other callers leave it off.
    pub own_record_layer: bool,
    /// A flow that fails before the app sent a byte (the server side refused it right after
    /// the handshake) holds the app's reset until the app's request arrives, at most this
    /// long, as a refused outbound connection is answered: an app still finishing its own
    /// connect would otherwise see a failed connect (curl exit 7) instead of a refused
    /// request (exit 56), depending on scheduling. Set for outbound TLS flows, which count
    /// the app's bytes.
    pub reset_after_request: Option<Duration>,
    /// Userspace mode, own record layer: `tuning.relayBusyPollUs`. After the flow forwarded a
    /// small message and both its sockets are drained, the relay polls them without blocking
    /// for up to this long before it waits in the reactor (see [`BusyPolls`]). Zero: never.
    pub busy_poll: Duration,
}

/// How long a relay with [`RelayConfig::peer_fin_first`] waits for the peer's FIN after both
/// close_notify alerts; the peer agent sends it right behind its close_notify.
pub const PEER_FIN_WAIT: Duration = Duration::from_secs(1);

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            idle_timeout: Duration::from_secs(3600),
            buffer_size: 128 << 10,
            pipe_size: 256 << 10,
            app_leg_redirected: false,
            max_tx_records: None,
            peer_fin_first: false,
            own_record_layer: false,
            reset_after_request: None,
            busy_poll: Duration::ZERO,
        }
    }
}

/// What the relays' bounded busy polling did, process-wide (`relay.busy_poll_*` in `flows
/// --stats`): a spin that found bytes saved the flow a wake-up through the reactor; one that
/// timed out burnt its whole bound for nothing. The ratio of the two, and the time spun, are
/// what says whether `tuning.relayBusyPollUs` earns its CPU on a node.
#[derive(Debug, Default)]
pub struct BusyPolls {
    found: AtomicU64,
    timed_out: AtomicU64,
    spun_ns: AtomicU64,
}

/// The one set of [`BusyPolls`] counters: every relay of the process counts here (a relay
/// has no handle on its agent's counters, and one agent runs per process).
pub static BUSY_POLLS: BusyPolls = BusyPolls {
    found: AtomicU64::new(0),
    timed_out: AtomicU64::new(0),
    spun_ns: AtomicU64::new(0),
};

impl BusyPolls {
    fn spun(&self, found: bool, took: Duration) {
        if found {
            self.found.fetch_add(1, Ordering::Relaxed);
        } else {
            self.timed_out.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.spun_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Spins that found bytes to read within the bound.
    pub fn found(&self) -> u64 {
        self.found.load(Ordering::Relaxed)
    }

    /// Spins that reached the bound with nothing to read.
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// Time spent spinning, both outcomes, in microseconds.
    pub fn spun_us(&self) -> u64 {
        self.spun_ns.load(Ordering::Relaxed) / 1_000
    }
}

/// The number of records the kernel relay lets one flow send before resetting it.
///
/// RFC 8446 §5.5 allows AES-GCM 2^24.5 full-size records per key. The relay cannot rekey
/// (these kernels have no KeyUpdate support) and reads the kernel's exact TX record sequence
/// back only after every 1 MiB of plaintext; since every record carries at least one byte, it
/// can overshoot by at most that plus one pipe's worth (pipes are capped at 1 MiB), under 2^21
/// records. Stopping at 2^24 therefore stays below 2^24.5 in every case. ChaCha20-Poly1305 has
/// no practical limit.
pub fn ktls_record_limit(cipher: Cipher) -> Option<u64> {
    cipher.record_limit().map(|_| 1 << 24)
}

/// Which record layer [`relay`] should use for an established session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordLayer {
    /// Keep rustls.
    Userspace,
    /// Install the keys into the kernel, then splice. `expect_no_pad` enables TLS 1.3
    /// decrypt-in-place (the peer is another agent, which never pads).
    Kernel { expect_no_pad: bool },
}

/// Why a flow ended other than by both sides closing cleanly. Both sockets have been reset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The peer's stream ended without close_notify: it was cut, so the app's data may be
    /// incomplete.
    #[error("peer connection ended without close_notify (truncated); app connection reset")]
    Truncated,
    /// The peer sent a fatal alert.
    #[error("peer sent alert `{0:?}`; connection reset")]
    PeerAlert(AlertDescription),
    /// A record the relay cannot pass on: a KeyUpdate, an unknown content type, a malformed
    /// alert. Kernel mode and the userspace relay's own record layer (rustls handles these
    /// itself).
    #[error(
        "peer sent a TLS record of content type {content_type} the relay cannot handle \
         ({detail}); connection reset"
    )]
    UnexpectedRecord { content_type: u8, detail: String },
    /// rustls refused something the peer sent.
    #[error("tls error on the peer connection; connection reset")]
    Tls(#[source] rustls::Error),
    /// Nothing moved in either direction for the idle timeout.
    #[error("no data in either direction for {0:?}; connection reset")]
    IdleTimeout(Duration),
    /// The session reached the AEAD usage limit (kernel mode: no rekey possible).
    #[error("{records} TLS records sent under one key, the AEAD usage limit; connection reset")]
    RecordLimit { records: u64 },
    /// The session keys could not be given to the kernel.
    #[error("cannot hand the session to kernel TLS; connection reset")]
    Ktls(#[source] KtlsError),
    /// Local resources for the relay (pipes) could not be set up.
    #[error("cannot set up the relay; connection reset")]
    Setup(#[source] io::Error),
    /// The app-side socket failed (reset by the app, for example).
    #[error("app socket: {0}; peer connection reset")]
    App(#[source] io::Error),
    /// The peer-side socket failed.
    #[error("peer socket: {0}; app connection reset")]
    Peer(#[source] io::Error),
    /// Plaintext passthrough: either socket failed.
    #[error("passthrough: {0}; both connections reset")]
    Passthrough(#[source] io::Error),
    /// The userspace relay's own record layer ([`record::RecordLayer`], after rustls) refused
    /// a record from the peer (authentication, framing, a message it does not follow) or could
    /// not seal one.
    #[error("record layer: {0}; connection reset")]
    RecordLayer(#[source] record::RecordError),
}

/// Writes [`RelayError::reason`] and [`RelayError::REASONS`] from one table, so the list the
/// metrics start at zero cannot miss a reason the match returns (the match is exhaustive, so
/// a new variant does not compile without its row).
macro_rules! relay_error_reasons {
    ($($variant:pat => $reason:literal,)+) => {
        impl RelayError {
            /// Every [`RelayError::reason`], for metrics that start each series at zero.
            pub const REASONS: &'static [&'static str] = &[$($reason),+];

            /// A short, stable name of why the flow failed: the `reason` label of failed flows
            /// and the `code` of their access log lines.
            pub fn reason(&self) -> &'static str {
                match self {
                    $($variant => $reason,)+
                }
            }
        }
    };
}

relay_error_reasons! {
    RelayError::Truncated => "truncated",
    RelayError::PeerAlert(_) => "peer_alert",
    RelayError::UnexpectedRecord { .. } => "unexpected_record",
    RelayError::Tls(_) => "tls",
    RelayError::IdleTimeout(_) => "idle_timeout",
    RelayError::RecordLimit { .. } => "record_limit",
    RelayError::Ktls(_) => "ktls",
    RelayError::Setup(_) => "setup",
    RelayError::App(_) => "app",
    RelayError::Peer(_) => "peer",
    RelayError::Passthrough(_) => "passthrough",
    RelayError::RecordLayer(_) => "record_layer",
}

/// Readies the socket to the peer agent for `layer`; call it right after connect/accept,
/// before the handshake.
///
/// For the kernel layer this attaches the `tls` ULP while the socket is certainly ESTABLISHED.
/// The kernel refuses the ULP on a socket that has already received the peer's FIN
/// (CLOSE_WAIT, `ENOTCONN`), and a peer that sends its request and half-closes right behind its
/// Finished gets there before our handshake returns; attached early, the keys can still be
/// installed afterwards. Without this call [`relay`] still works, but such flows fall back to
/// userspace. An error here is not fatal for the flow: it means kTLS will not be used.
pub fn prepare_socket(peer: &TcpStream, layer: RecordLayer) -> Result<(), KtlsError> {
    match layer {
        RecordLayer::Userspace => Ok(()),
        RecordLayer::Kernel { .. } => ktls::attach_ulp(peer.as_fd()),
    }
}

/// Relays an established session with the record layer the caller chose.
///
/// With [`RecordLayer::Kernel`] the `tls` ULP is attached before the keys leave rustls; if the
/// kernel refuses it (the peer already half-closed and [`prepare_socket`] was not called, or
/// the ULP is unavailable) the flow is relayed in userspace instead, which [`RelayStats::mode`]
/// shows. Once the keys have left rustls there is no way back: a failure to install them
/// resets both sockets.
///
/// The record layer is chosen (and the keys handed to the kernel) at the call; the returned
/// future, boxed, holds only the state of the relay that runs. A flow lives as long as this
/// future, so neither the arguments nor the other record layer's (larger) state stay with it.
pub fn relay(
    app: TcpStream,
    peer: TcpStream,
    session: Established,
    layer: RecordLayer,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Pin<Box<dyn Future<Output = Result<(), RelayError>> + Send>> {
    relay_joining(app, peer, session, layer, config, stats, None)
}

/// [`relay`], and with `join` (`tuning.relayAppLeg: skMsg`) a flow that stays in userspace
/// has its app leg armed for the join program (`appleg`): what the app sends lands in the
/// agent's end without crossing loopback TCP. A kTLS flow is never armed (its relay splices
/// the app leg, and splice cannot see redirected bytes), nor one whose arming failed (it
/// relays over TCP as without the option).
pub fn relay_joining(
    app: TcpStream,
    peer: TcpStream,
    session: Established,
    layer: RecordLayer,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    join: Option<Arc<std::sync::Mutex<crate::datapath::JoinMaps>>>,
) -> Pin<Box<dyn Future<Output = Result<(), RelayError>> + Send>> {
    let app_leg = |app: &TcpStream| {
        let maps = join.clone()?;
        match appleg::AppLeg::arm(maps, app) {
            Ok(leg) => Some(Box::new(leg)),
            Err(e) => {
                tracing::debug!(error = %e, "sk_msg app leg not armed; loopback TCP only");
                None
            }
        }
    };
    let expect_no_pad = match layer {
        // Records read past the handshake cannot be given to the kernel (see
        // `Established::leftover_ciphertext`): such a session stays in userspace.
        RecordLayer::Kernel { expect_no_pad }
            if session.leftover_ciphertext.is_empty() && ktls::attach_ulp(peer.as_fd()).is_ok() =>
        {
            expect_no_pad
        }
        _ => {
            let conn = match session.conn.into_rustls() {
                Ok(conn) => conn,
                // Derived keys (`handshake::derived`): no rustls state, the relay's own record
                // layer from the first record, sequence numbers from 0.
                Err(Session::Derived { secrets, is_client }) => {
                    stats.set_mode(RelayMode::Userspace);
                    let config = RelayConfig {
                        own_record_layer: true,
                        ..config
                    };
                    return match record::RecordLayer::new(*secrets, is_client) {
                        Ok(own) => {
                            let leg = app_leg(&app);
                            let relay =
                                userspace::with_own(app, peer, Box::new(own), config, stats);
                            Box::pin(relay.with_app_leg(leg).run())
                        }
                        Err(e) => failed_at_start(app, peer, config, stats, RelayError::Tls(e)),
                    };
                }
                Err(_) => {
                    // A kernel-only client session (the node runs kTLS, and the ULP attached
                    // before its handshake); losing the ULP since cannot happen short of the
                    // socket failing, so the flow ends.
                    return failed_at_start(
                        app,
                        peer,
                        config,
                        stats,
                        RelayError::Ktls(KtlsError::UnsupportedSecrets(
                            "the kernel refused the tls ULP after a handshake that only kernel \
                             TLS can carry on"
                                .into(),
                        )),
                    );
                }
            };
            stats.set_mode(RelayMode::Userspace);
            let config = RelayConfig {
                own_record_layer: true,
                ..config
            };
            let leg = app_leg(&app);
            let relay = userspace::with_rustls(
                app,
                peer,
                conn,
                session.leftover_plaintext,
                session.leftover_ciphertext,
                config,
                stats,
            );
            return Box::pin(relay.with_app_leg(leg).run());
        }
    };
    let handoff = session
        .into_ktls_secrets()
        .and_then(|h| h.secrets.install(peer.as_fd(), expect_no_pad).map(|()| h));
    match handoff {
        Ok(h) => {
            stats.set_mode(RelayMode::Ktls);
            Box::pin(kernel::run(
                app,
                peer,
                h.secrets.cipher,
                h.leftover_plaintext,
                h.tickets,
                config,
                stats,
            ))
        }
        Err(e) => failed_at_start(app, peer, config, stats, RelayError::Ktls(e)),
    }
}

/// A relay that failed before it started: both sockets reset, the app's held as
/// [`RelayConfig::reset_after_request`] says.
fn failed_at_start(
    app: TcpStream,
    peer: TcpStream,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    e: RelayError,
) -> Pin<Box<dyn Future<Output = Result<(), RelayError>> + Send>> {
    reset(&app);
    reset(&peer);
    Box::pin(async move {
        await_request(&app, &config, &stats).await;
        drop(peer);
        Err(e)
    })
}

/// Userspace relay: `conn` is the finished session on `peer`; `leftover` is plaintext the
/// handshake already decrypted, delivered to the app first.
///
/// Takes the session boxed or not. Boxed (as [`Established`] holds it), the relay's future
/// stays a few hundred bytes; a session inline is over a kilobyte, copied into every future
/// between here and the flow's task, all of which live as long as the flow. The relay's
/// state is built at the call and the future holds only that (not the arguments too).
pub fn relay_userspace(
    app: TcpStream,
    peer: TcpStream,
    conn: impl Into<Box<rustls::Connection>>,
    leftover: Vec<u8>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> impl Future<Output = Result<(), RelayError>> + Send {
    stats.set_mode(RelayMode::Userspace);
    userspace::with_rustls(app, peer, conn.into(), leftover, Vec::new(), config, stats).run()
}

/// Kernel relay: `peer` already has kTLS TX and RX installed for `cipher`; `leftover` is
/// plaintext the handshake already decrypted, delivered to the app first.
pub async fn relay_ktls(
    app: TcpStream,
    peer: TcpStream,
    cipher: Cipher,
    leftover: Vec<u8>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
    stats.set_mode(RelayMode::Ktls);
    kernel::run(app, peer, cipher, leftover, None, config, stats).await
}

/// Continues a kernel relay that an agent parked for this one (an upgrade): the sockets keep
/// their kTLS state in the kernel, the pipes their bytes.
pub async fn resume_ktls(
    parked: ParkedKtls,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
    stats.set_mode(RelayMode::Ktls);
    kernel::resume(parked, config, stats).await
}

/// Plaintext passthrough between the app and a peer outside the mesh (or one a policy lets
/// through in clear): the kernel's copy, exact half-close, the same idle timeout and byte
/// counts as the TLS relays.
pub async fn relay_plain(
    app: TcpStream,
    peer: TcpStream,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
    plain::run(app, peer, config, stats).await
}

/// Two plain legs joined by `splice(2)` (the same-node fast path): the bytes stay in the
/// kernel, with exact half-close, the idle timeout and byte counts.
pub async fn relay_spliced(
    app: TcpStream,
    peer: TcpStream,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
    spliced::run(app, peer, config, stats, None).await
}

/// [`relay_spliced`] under the sk_msg leg join (`tuning.sameNodeJoin: skMsg`): the apps'
/// bytes leave by the other leg inside their `sendmsg` whenever order and room allow, and
/// through the splice relay otherwise. `client`/`server` are the app sockets at the far ends
/// of `app`/`peer`, as the join program keys them. When the join cannot be armed the flow
/// runs on the splice relay alone.
pub async fn relay_joined(
    app: TcpStream,
    peer: TcpStream,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    maps: Arc<std::sync::Mutex<crate::datapath::JoinMaps>>,
    client: interceptor_common::LegKey,
    server: interceptor_common::LegKey,
) -> Result<(), RelayError> {
    let join = match spliced::Join::arm(maps, Arc::clone(&stats), &app, &peer, client, server) {
        Ok(join) => Some(join),
        Err(e) => {
            tracing::debug!(error = %e, "sk_msg join not armed; splice relay only");
            None
        }
    };
    spliced::run(app, peer, config, stats, join).await
}

/// Makes the close that follows send RST: the other side must see the flow failed, not end.
fn reset(sock: &TcpStream) {
    let _ = sock.set_zero_linger();
}

/// `shutdown(SHUT_WR)` on a tokio socket from synchronous code, on the borrowed descriptor.
fn shutdown_write(sock: &TcpStream) -> io::Result<()> {
    crate::sys::shutdown_write(sock.as_fd())
}

/// Holds a failed flow's reset (see [`RelayConfig::reset_after_request`]): while the app has
/// sent nothing, waits until it sends something or closes, at most that long. The caller
/// reset the sockets already; they go out when it drops them.
async fn await_request(app: &TcpStream, config: &RelayConfig, stats: &RelayStats) {
    let Some(wait) = config.reset_after_request else {
        return;
    };
    if stats.bytes_app_to_peer() == 0 {
        let _ = tokio::time::timeout(wait, app.readable()).await;
    }
}

/// Waits (at most [`PEER_FIN_WAIT`]) until the peer's FIN has arrived, after its
/// close_notify; whatever else arrives ends the wait too (the caller closes either way).
async fn await_peer_fin(peer: &TcpStream) {
    let wait = async {
        let mut byte = [0u8; 1];
        loop {
            if peer.readable().await.is_err() {
                return;
            }
            match peer.try_read(&mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(PEER_FIN_WAIT, wait).await;
}

/// Idle detection that costs one clock read per poll rather than a timer reset per byte.
struct IdleTimer {
    timeout: Duration,
    last_progress: Instant,
    sleep: std::pin::Pin<Box<Sleep>>,
}

impl IdleTimer {
    fn new(timeout: Duration) -> IdleTimer {
        let now = Instant::now();
        IdleTimer {
            timeout,
            last_progress: now,
            sleep: Box::pin(tokio::time::sleep_until(now + timeout)),
        }
    }

    fn progressed(&mut self) {
        self.last_progress = Instant::now();
    }

    /// For a relay that keeps buffers while its flow is busy: [`Quiet::Expired`] once nothing
    /// has moved for the whole timeout, and `release` once nothing has moved for
    /// [`RELEASE_AFTER`] while `holding` (the caller then gives its buffers back). The timer is
    /// moved at most once per busy period and once per [`RELEASE_AFTER`] while the flow stays
    /// busy, not at every wait.
    fn poll_quiet(&mut self, cx: &mut Context<'_>, holding: bool) -> Quiet {
        let release_at = self.last_progress + RELEASE_AFTER;
        if holding && self.sleep.deadline() > release_at {
            self.sleep.as_mut().reset(release_at);
        }
        let mut release = false;
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Quiet::Waiting { release };
            }
            let now = Instant::now();
            let expiry = self.last_progress + self.timeout;
            if now >= expiry {
                return Quiet::Expired;
            }
            let next = if holding && !release {
                if now >= release_at {
                    release = true;
                    expiry
                } else {
                    release_at
                }
            } else {
                expiry
            };
            self.sleep.as_mut().reset(next);
        }
    }

    /// Ready once nothing has moved for the whole timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.last_progress + self.timeout;
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
}

/// What [`IdleTimer::poll_quiet`] found.
enum Quiet {
    /// The flow may wait on; `release`: it has been quiet long enough to give its buffers back.
    Waiting { release: bool },
    /// Nothing moved for the idle timeout.
    Expired,
}

/// Outcome of one attempt at a non-blocking operation inside a poll loop.
enum Step {
    /// Bytes moved (or state advanced): loop again.
    Progress,
    /// Nothing to do now; a waker is registered where needed.
    Idle,
}

/// Turns "the socket said WouldBlock" into either a retry (readiness arrived meanwhile) or a
/// registered waker.
fn wait_ready(ready: Poll<io::Result<()>>) -> io::Result<Step> {
    match ready {
        Poll::Ready(Ok(())) => Ok(Step::Progress),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(Step::Idle),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{IdleTimer, Quiet, RELEASE_AFTER, RelayError};

    fn poll_quiet_once(idle: &mut IdleTimer, holding: bool) -> Quiet {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        idle.poll_quiet(&mut cx, holding)
    }

    /// A relay holding buffers is told to release them only after `RELEASE_AFTER` without
    /// progress (not at the first wait), once per quiet period, and the idle timeout still
    /// ends the flow.
    #[tokio::test]
    async fn buffers_are_released_after_a_quiet_spell_not_at_every_wait() {
        let mut idle = IdleTimer::new(Duration::from_millis(400));
        idle.progressed();
        let since = std::time::Instant::now();
        let first = poll_quiet_once(&mut idle, true);
        if since.elapsed() < RELEASE_AFTER {
            assert!(
                matches!(first, Quiet::Waiting { release: false }),
                "released at the first wait"
            );
        }
        tokio::time::sleep(RELEASE_AFTER + Duration::from_millis(20)).await;
        assert!(
            matches!(
                poll_quiet_once(&mut idle, true),
                Quiet::Waiting { release: true }
            ),
            "not released after a quiet spell"
        );
        // Released: nothing more to give back, the flow waits on for its idle timeout.
        assert!(matches!(
            poll_quiet_once(&mut idle, false),
            Quiet::Waiting { release: false }
        ));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(matches!(poll_quiet_once(&mut idle, false), Quiet::Expired));
    }

    /// Each reason is its own metric series and access-log code: two variants sharing one, or
    /// one named like the `other` series for failures that are not relay errors, would merge
    /// causes an operator must tell apart.
    #[test]
    fn every_relay_error_reason_is_distinct_and_not_other() {
        let mut seen = std::collections::HashSet::new();
        for r in RelayError::REASONS {
            assert!(seen.insert(*r), "reason {r:?} listed twice");
            assert_ne!(*r, "other");
            assert!(
                r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{r:?} is not a snake_case label value"
            );
        }
        let truncated = RelayError::Truncated;
        assert!(RelayError::REASONS.contains(&truncated.reason()));
    }
}
