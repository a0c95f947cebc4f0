//! The relay with kernel TLS as the record layer: `splice(2)` through one pipe per direction.
//!
//! Readiness and pipes: a non-blocking splice that returns `EAGAIN` does not say which end
//! blocked. When its pipe is empty the source must be empty, so the source's readiness is
//! cleared and awaited. When the pipe holds data the pipe may be full instead; then the
//! source's readiness is left alone and the drain side decides: it either makes room (and the
//! fill is retried on the next turn) or waits for the destination to become writable. So a
//! direction never waits on something that cannot wake it, and never spins on a readiness
//! flag it cannot clear.
//!
//! End of stream toward the peer: kTLS may keep encrypted records queued inside the kernel
//! (not yet in TCP) when the send buffer was full, pushing them later from a work item; a FIN
//! sent before then would overtake them. After close_notify the relay therefore waits until
//! TCP has taken every byte kTLS produced (checked with [`sys::tcp_bytes_queued`] against the
//! record count) before `shutdown(SHUT_WR)`.

use std::{
    future::Future as _,
    io,
    os::fd::{AsFd, OwnedFd},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::AlertDescription;
use tokio::{
    io::Interest,
    net::TcpStream,
    time::{Sleep, sleep},
};

use super::{
    IdleTimer, RelayConfig, RelayError, RelayStats, Step, YIELD_AFTER_BYTES, await_peer_fin,
    await_request, buf::Buf, ktls_record_limit, reset, shutdown_write, wait_ready,
};
use crate::{
    handshake::driver::TicketSink,
    ktls::{
        self, Cipher, Direction, content_type,
        sys::{self as ksys, SpliceFlags},
    },
    sys,
};

/// The exact TX record count is read back from the kernel after this much plaintext.
const RECORD_CHECK_BYTES: u64 = 1 << 20;

/// TLS 1.3 record expansion under kTLS: 5-byte header, 1-byte inner content type, 16-byte
/// AEAD tag (all three supported AEADs); the kernel never pads.
const RECORD_OVERHEAD: u64 = 22;

/// Largest record body the kernel can hand back from `recvmsg`.
const MAX_RECORD: usize = (1 << 14) + 256;

/// How often the end-of-stream flush check is repeated while kTLS still holds records.
const FLUSH_RECHECK: Duration = Duration::from_millis(1);

/// Linux's default pipe size, if resizing is refused.
const DEFAULT_PIPE: usize = 64 << 10;

/// Bound on the pipe size: one pipe's worth is the slack in the record-limit check.
const MAX_PIPE: usize = 1 << 20;

fn flags() -> SpliceFlags {
    SpliceFlags::NONBLOCK | SpliceFlags::MOVE
}

pub(super) async fn run(
    app: TcpStream,
    peer: TcpStream,
    cipher: Cipher,
    leftover: Vec<u8>,
    tickets: Option<TicketSink>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
    let setup = (|| -> io::Result<(Lane, Lane, u64)> {
        Ok((
            if config.app_leg_redirected {
                Lane::copying(config.pipe_size)
            } else {
                Lane::new(config.pipe_size)?
            },
            Lane::new(config.pipe_size)?,
            ktls::record_seq(peer.as_fd(), Direction::Tx)?,
        ))
    })();
    let (up, down, seq_base) = match setup {
        Ok(v) => v,
        Err(e) => {
            reset(&app);
            reset(&peer);
            // Boxed: only a failed set-up makes this wait.
            Box::pin(await_request(&app, &config, &stats)).await;
            return Err(RelayError::Setup(e));
        }
    };
    // Without tcp_info's byte counter the flush check is skipped (shutdown right after
    // close_notify), which only matters when the send buffer is full at the very end.
    let queued_base = sys::tcp_bytes_queued(peer.as_fd()).ok();
    let relay = Kernel {
        stats,
        up,
        app_eof: false,
        close_notify_sent: false,
        peer_write_shut: false,
        peer_fin_first: config.peer_fin_first,
        tx: TxAccount {
            seq_base,
            queued_base,
            plaintext: 0,
            since_check: 0,
            limit: config.max_tx_records.or_else(|| ktls_record_limit(cipher)),
        },
        flush_wait: None,
        down,
        to_app: leftover,
        to_app_off: 0,
        peer_closed: false,
        app_write_shut: false,
        record: None,
        parked: false,
        tickets,
        app,
        peer,
    };
    drive(relay, IdleTimer::new(config.idle_timeout), config).await
}

/// Runs the relay to its end, or until the flow is parked for a successor agent
/// ([`RelayStats::request_park`]): then the sockets and pipes leave in a [`ParkedKtls`] left in
/// `stats`, untouched (no reset, no FIN), and the future ends with `Ok`. A cancelled flow
/// ([`RelayStats::cancel`]) is reset on both sides and ends with `Ok`.
async fn drive(
    mut relay: Kernel,
    mut idle: IdleTimer,
    config: RelayConfig,
) -> Result<(), RelayError> {
    let result = std::future::poll_fn(|cx| relay.poll(cx, &mut idle, config)).await;
    if relay.parked {
        match relay.park(&idle, config) {
            Ok(parked) => {
                relay.stats.deposit(parked);
                return Ok(());
            }
            // Nothing left this process: the flow cannot continue, here or elsewhere.
            Err(e) => {
                reset(&relay.app);
                reset(&relay.peer);
                return Err(RelayError::Setup(e));
            }
        }
    }
    if relay.stats.cancelled() {
        reset(&relay.app);
        reset(&relay.peer);
        return Ok(());
    }
    if result.is_err() {
        reset(&relay.app);
        reset(&relay.peer);
        // Boxed: only a failed flow makes this wait.
        Box::pin(await_request(&relay.app, &config, &relay.stats)).await;
    } else if relay.peer_fin_first {
        await_peer_fin(&relay.peer).await;
    }
    result
}

/// The part of a kernel relay's state that is not a descriptor: what a successor agent needs,
/// with the flow's two sockets and both pipes, to continue the relay where it stopped. The
/// kernel keeps the TLS state (keys, record sequence numbers) in the peer socket itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KtlsRelayState {
    /// Bytes sitting in the app → peer pipe, and that pipe's size.
    pub up_in_pipe: usize,
    pub up_cap: usize,
    pub down_in_pipe: usize,
    pub down_cap: usize,
    pub app_eof: bool,
    pub close_notify_sent: bool,
    pub peer_write_shut: bool,
    pub peer_fin_first: bool,
    pub peer_closed: bool,
    pub app_write_shut: bool,
    /// Plaintext for the app that did not come through the pipe (read with `recvmsg`).
    pub to_app: Vec<u8>,
    pub tx_seq_base: u64,
    pub tx_queued_base: Option<u64>,
    pub tx_plaintext: u64,
    pub tx_since_check: u64,
    pub tx_limit: Option<u64>,
    /// How long the flow had been idle when it was parked: its idle deadline moves with it.
    pub idle_for_ms: u64,
    pub bytes_app_to_peer: u64,
    pub bytes_peer_to_app: u64,
}

/// A kernel relay stopped between two polls, for a successor agent: its sockets (no longer
/// registered with this process's reactor), its pipes with whatever they hold, and its state.
#[derive(Debug)]
pub struct ParkedKtls {
    pub app: std::net::TcpStream,
    pub peer: std::net::TcpStream,
    /// Read and write ends, app → peer then peer → app.
    pub pipes: [OwnedFd; 4],
    pub state: KtlsRelayState,
}

impl ParkedKtls {
    /// The descriptors in the order [`ParkedKtls::from_parts`] takes them.
    pub fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; 6] {
        let [a, b, c, d] = &self.pipes;
        [
            self.app.as_fd(),
            self.peer.as_fd(),
            a.as_fd(),
            b.as_fd(),
            c.as_fd(),
            d.as_fd(),
        ]
    }

    /// Rebuilds a parked relay from descriptors received in [`ParkedKtls::fds`] order.
    pub fn from_parts(fds: Vec<OwnedFd>, state: KtlsRelayState) -> io::Result<ParkedKtls> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
        let [app, peer, a, b, c, d]: [OwnedFd; 6] = fds
            .try_into()
            .map_err(|_| bad("a parked kTLS relay carries six descriptors"))?;
        if state.up_cap > MAX_PIPE
            || state.down_cap > MAX_PIPE
            || state.to_app.len() > MAX_RECORD * 4
        {
            return Err(bad("parked relay state out of bounds"));
        }
        // The relay's byte counts must be what the pipes hold: the relay splices out exactly
        // that many. They may exceed the pipe's size (a spliced buffer can hold more than a
        // page), so the pipes themselves are asked.
        for (what, fd, want) in [
            ("app → peer", &a, state.up_in_pipe),
            ("peer → app", &c, state.down_in_pipe),
        ] {
            let got = ksys::pipe_len(fd.as_fd())?;
            if got != want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{what} pipe holds {got} bytes, the relay state says {want}"),
                ));
            }
        }
        Ok(ParkedKtls {
            app: std::net::TcpStream::from(app),
            peer: std::net::TcpStream::from(peer),
            pipes: [a, b, c, d],
            state,
        })
    }
}

/// Continues a relay another agent parked; `stats` starts from the counts it carries.
pub(super) async fn resume(
    parked: ParkedKtls,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
    let ParkedKtls {
        app,
        peer,
        pipes: [ur, uw, dr, dw],
        state: s,
    } = parked;
    stats.add_app_to_peer(usize::try_from(s.bytes_app_to_peer).unwrap_or(usize::MAX));
    stats.add_peer_to_app(usize::try_from(s.bytes_peer_to_app).unwrap_or(usize::MAX));
    let streams = (|| -> io::Result<(TcpStream, TcpStream)> {
        app.set_nonblocking(true)?;
        peer.set_nonblocking(true)?;
        Ok((TcpStream::from_std(app)?, TcpStream::from_std(peer)?))
    })();
    let (app, peer) = streams.map_err(RelayError::Setup)?;
    let lane = |r, w, in_pipe, cap| Lane {
        carrier: Carrier::Pipe { r, w },
        in_pipe,
        cap,
    };
    let relay = Kernel {
        stats,
        up: lane(ur, uw, s.up_in_pipe, s.up_cap),
        app_eof: s.app_eof,
        close_notify_sent: s.close_notify_sent,
        peer_write_shut: s.peer_write_shut,
        peer_fin_first: s.peer_fin_first,
        tx: TxAccount {
            seq_base: s.tx_seq_base,
            queued_base: s.tx_queued_base,
            plaintext: s.tx_plaintext,
            since_check: s.tx_since_check,
            limit: s.tx_limit,
        },
        flush_wait: None,
        down: lane(dr, dw, s.down_in_pipe, s.down_cap),
        to_app: s.to_app,
        to_app_off: 0,
        peer_closed: s.peer_closed,
        app_write_shut: s.app_write_shut,
        record: None,
        parked: false,
        // The client's rustls remainder stays with the old agent: tickets that arrive after
        // the takeover are dropped, and the next connection does a full handshake.
        tickets: None,
        app,
        peer,
    };
    let mut idle = IdleTimer::new(config.idle_timeout);
    idle.last_progress = idle
        .last_progress
        .checked_sub(Duration::from_millis(s.idle_for_ms))
        .unwrap_or(idle.last_progress);
    drive(relay, idle, config).await
}

/// One direction's pipe (or copy buffer) and how many bytes sit in it.
struct Lane {
    carrier: Carrier,
    in_pipe: usize,
    cap: usize,
}

enum Carrier {
    Pipe {
        r: OwnedFd,
        w: OwnedFd,
    },
    /// Read and write through memory instead of splicing from the source: with the sk_msg
    /// local-leg option the app's bytes arrive on the psock's ingress list, which `splice(2)`
    /// cannot read (it takes only the TCP receive queue), while `recv` drains both in order.
    Copy(Buf),
}

impl Lane {
    fn new(size: usize) -> io::Result<Lane> {
        let (r, w) = ksys::pipe2(true)?;
        let cap = sys::set_pipe_size(w.as_fd(), size.min(MAX_PIPE)).unwrap_or(DEFAULT_PIPE);
        Ok(Lane {
            carrier: Carrier::Pipe { r, w },
            in_pipe: 0,
            cap,
        })
    }

    fn copying(size: usize) -> Lane {
        let cap = size.clamp(DEFAULT_PIPE, MAX_PIPE);
        Lane {
            carrier: Carrier::Copy(Buf::new(cap)),
            in_pipe: 0,
            cap,
        }
    }

    /// Moves what `src` has into the lane. `Ok(None)`: `EAGAIN` while the pipe held data, so
    /// the pipe may be the one that is full (or the copy buffer is full); `src`'s readiness is
    /// kept.
    fn fill(&mut self, src: &TcpStream) -> io::Result<Option<usize>> {
        let in_pipe = self.in_pipe;
        match &mut self.carrier {
            Carrier::Pipe { w, .. } => src.try_io(Interest::READABLE, || {
                match ksys::splice(src.as_fd(), w.as_fd(), self.cap, flags()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && in_pipe > 0 => Ok(None),
                    r => r.map(Some),
                }
            }),
            Carrier::Copy(buf) => {
                buf.clear();
                if buf.spare_len() == 0 {
                    return Ok(None);
                }
                // Unlike splice, EAGAIN here can only mean the source is empty.
                buf.fill(|v| src.try_read_buf(v)).map(Some)
            }
        }
    }

    /// Moves the lane's content into `dst`.
    fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
        let in_pipe = self.in_pipe;
        match &mut self.carrier {
            Carrier::Pipe { r, .. } => dst.try_io(Interest::WRITABLE, || {
                ksys::splice(r.as_fd(), dst.as_fd(), in_pipe, flags())
            }),
            Carrier::Copy(buf) => {
                let n = dst.try_write(buf.pending())?;
                buf.consume(n);
                Ok(n)
            }
        }
    }

    /// Gives a drained copy buffer's memory back while the flow waits (pipes hold no pages
    /// when empty).
    fn release(&mut self) {
        if let Carrier::Copy(buf) = &mut self.carrier {
            buf.release();
        }
    }
}

/// What the kernel was asked to send on the peer socket, to check the AEAD limit and to tell
/// when kTLS has pushed everything into TCP.
struct TxAccount {
    seq_base: u64,
    queued_base: Option<u64>,
    /// Plaintext bytes handed to kTLS, close_notify included.
    plaintext: u64,
    since_check: u64,
    limit: Option<u64>,
}

struct Kernel {
    app: TcpStream,
    peer: TcpStream,
    stats: Arc<RelayStats>,

    up: Lane,
    app_eof: bool,
    close_notify_sent: bool,
    /// Our direction toward the peer is finished (close_notify flushed, then FIN unless
    /// `peer_fin_first`).
    peer_write_shut: bool,
    peer_fin_first: bool,
    tx: TxAccount,
    flush_wait: Option<Pin<Box<Sleep>>>,

    down: Lane,
    /// Plaintext that did not come through the pipe (the handshake's leftover, or a data record
    /// read with `recvmsg`), written to the app once the pipe ahead of it is empty.
    to_app: Vec<u8>,
    to_app_off: usize,
    /// close_notify received: nothing more is read from the peer.
    peer_closed: bool,
    app_write_shut: bool,
    /// Buffer for non-data records, allocated the first time one arrives.
    record: Option<Box<[u8]>>,
    /// Stopped for a successor agent: the poll returned without finishing.
    parked: bool,
    /// A client's rustls remainder, which stores the server's tickets for resumption; `None`
    /// on the server side (and for callers that do not resume), where tickets are dropped.
    tickets: Option<TicketSink>,
}

impl Kernel {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        idle: &mut IdleTimer,
        config: RelayConfig,
    ) -> Poll<Result<(), RelayError>> {
        let mut moved = 0usize;
        loop {
            // Between two polls every byte is in a socket, a pipe or `to_app`: a consistent
            // point to stop. A copying lane (sk_msg local leg) holds bytes in this process's
            // memory and is not parked; its flow ends here.
            if self.stats.cancelled() {
                return Poll::Ready(Ok(()));
            }
            if self.stats.park_requested() && self.parkable() {
                self.parked = true;
                return Poll::Ready(Ok(()));
            }
            let mut again = false;
            let mut progress = self.app_to_peer(cx, &mut moved, &mut again)?;
            progress |= self.peer_to_app(cx, &mut moved)?;

            if self.peer_write_shut && self.app_write_shut {
                return Poll::Ready(Ok(()));
            }
            if progress {
                idle.progressed();
                if moved >= YIELD_AFTER_BYTES {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                continue;
            }
            if again {
                continue;
            }
            if idle.poll_expired(cx).is_ready() {
                return Poll::Ready(Err(RelayError::IdleTimeout(config.idle_timeout)));
            }
            self.up.release();
            return Poll::Pending;
        }
    }

    fn parkable(&self) -> bool {
        matches!(self.up.carrier, Carrier::Pipe { .. })
            && matches!(self.down.carrier, Carrier::Pipe { .. })
    }

    /// Takes the relay apart for a successor: duplicates of the sockets (the originals leave
    /// this process's reactor when the relay drops), both pipes, and the rest as a
    /// [`KtlsRelayState`]. On error nothing was taken and the caller resets the flow.
    fn park(&mut self, idle: &IdleTimer, config: RelayConfig) -> io::Result<ParkedKtls> {
        let app = self.app.as_fd().try_clone_to_owned()?;
        let peer = self.peer.as_fd().try_clone_to_owned()?;
        let take = |lane: &mut Lane| match std::mem::replace(
            &mut lane.carrier,
            Carrier::Copy(Buf::new(0)),
        ) {
            Carrier::Pipe { r, w } => Ok((r, w)),
            Carrier::Copy(_) => Err(io::Error::other("a copying lane cannot be parked")),
        };
        let (ur, uw) = take(&mut self.up)?;
        let (dr, dw) = take(&mut self.down)?;
        let off = self.to_app_off.min(self.to_app.len());
        let state = KtlsRelayState {
            up_in_pipe: self.up.in_pipe,
            up_cap: self.up.cap,
            down_in_pipe: self.down.in_pipe,
            down_cap: self.down.cap,
            app_eof: self.app_eof,
            close_notify_sent: self.close_notify_sent,
            peer_write_shut: self.peer_write_shut,
            peer_fin_first: config.peer_fin_first,
            peer_closed: self.peer_closed,
            app_write_shut: self.app_write_shut,
            to_app: self.to_app.split_off(off),
            tx_seq_base: self.tx.seq_base,
            tx_queued_base: self.tx.queued_base,
            tx_plaintext: self.tx.plaintext,
            tx_since_check: self.tx.since_check,
            tx_limit: self.tx.limit,
            idle_for_ms: u64::try_from(idle.last_progress.elapsed().as_millis())
                .unwrap_or(u64::MAX),
            bytes_app_to_peer: self.stats.bytes_app_to_peer(),
            bytes_peer_to_app: self.stats.bytes_peer_to_app(),
        };
        Ok(ParkedKtls {
            app: std::net::TcpStream::from(app),
            peer: std::net::TcpStream::from(peer),
            pipes: [ur, uw, dr, dw],
            state,
        })
    }

    fn app_to_peer(
        &mut self,
        cx: &mut Context<'_>,
        moved: &mut usize,
        again: &mut bool,
    ) -> Result<bool, RelayError> {
        let mut progress = false;

        if !self.app_eof {
            match self.up.fill(&self.app) {
                Ok(Some(0)) => {
                    self.app_eof = true;
                    progress = true;
                }
                Ok(Some(n)) => {
                    self.up.in_pipe += n;
                    *moved += n;
                    progress = true;
                }
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Step::Progress =
                        wait_ready(self.app.poll_read_ready(cx)).map_err(RelayError::App)?
                    {
                        *again = true;
                    }
                }
                Err(e) => return Err(RelayError::App(e)),
            }
        }

        if self.up.in_pipe > 0 {
            match self.up.drain(&self.peer) {
                Ok(0) => {
                    return Err(RelayError::Peer(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice into the peer socket moved nothing",
                    )));
                }
                Ok(n) => {
                    self.up.in_pipe -= n;
                    self.stats.add_app_to_peer(n);
                    self.tx.plaintext += n as u64;
                    self.tx.since_check += n as u64;
                    *moved += n;
                    progress = true;
                    if self.tx.since_check >= RECORD_CHECK_BYTES {
                        self.check_record_limit()?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Step::Progress =
                        wait_ready(self.peer.poll_write_ready(cx)).map_err(RelayError::Peer)?
                    {
                        *again = true;
                    }
                }
                Err(e) => return Err(RelayError::Peer(e)),
            }
        }

        if self.app_eof && self.up.in_pipe == 0 && !self.close_notify_sent {
            let peer = &self.peer;
            match peer.try_io(Interest::WRITABLE, || ktls::send_close_notify(peer.as_fd())) {
                Ok(()) => {
                    self.close_notify_sent = true;
                    self.tx.plaintext += 2;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Step::Progress =
                        wait_ready(self.peer.poll_write_ready(cx)).map_err(RelayError::Peer)?
                    {
                        *again = true;
                    }
                }
                Err(e) => return Err(RelayError::Peer(e)),
            }
        }

        if self.close_notify_sent && !self.peer_write_shut {
            if self.tx_flushed()? {
                self.flush_wait = None;
                if !self.peer_fin_first {
                    shutdown_write(&self.peer).map_err(RelayError::Peer)?;
                }
                self.peer_write_shut = true;
                progress = true;
            } else {
                let wait = self
                    .flush_wait
                    .get_or_insert_with(|| Box::pin(sleep(FLUSH_RECHECK)));
                if wait.as_mut().poll(cx).is_ready() {
                    self.flush_wait = None;
                    *again = true;
                }
            }
        }
        Ok(progress)
    }

    fn peer_to_app(&mut self, cx: &mut Context<'_>, moved: &mut usize) -> Result<bool, RelayError> {
        let mut progress = false;

        if self.to_app_off < self.to_app.len() && self.down.in_pipe == 0 {
            match self.app.try_write(&self.to_app[self.to_app_off..]) {
                Ok(n) => {
                    self.to_app_off += n;
                    self.stats.add_peer_to_app(n);
                    *moved += n;
                    progress = true;
                    if self.to_app_off == self.to_app.len() {
                        self.to_app = Vec::new();
                        self.to_app_off = 0;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Step::Progress =
                        wait_ready(self.app.poll_write_ready(cx)).map_err(RelayError::App)?
                    {
                        progress = true;
                    }
                }
                Err(e) => return Err(RelayError::App(e)),
            }
        }

        if !self.peer_closed && self.to_app.is_empty() {
            match self.down.fill(&self.peer) {
                // The kernel reports close_notify as a record before any FIN; a FIN without
                // one is a cut stream.
                Ok(Some(0)) => return Err(RelayError::Truncated),
                Ok(Some(n)) => {
                    self.down.in_pipe += n;
                    *moved += n;
                    progress = true;
                }
                Ok(None) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if let Step::Progress = self.non_data_record(cx)? {
                        progress = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Step::Progress =
                        wait_ready(self.peer.poll_read_ready(cx)).map_err(RelayError::Peer)?
                    {
                        progress = true;
                    }
                }
                Err(e) => return Err(RelayError::Peer(e)),
            }
        }

        if self.down.in_pipe > 0 {
            match self.down.drain(&self.app) {
                Ok(0) => {
                    return Err(RelayError::App(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice into the app socket moved nothing",
                    )));
                }
                Ok(n) => {
                    self.down.in_pipe -= n;
                    self.stats.add_peer_to_app(n);
                    *moved += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Step::Progress =
                        wait_ready(self.app.poll_write_ready(cx)).map_err(RelayError::App)?
                    {
                        progress = true;
                    }
                }
                Err(e) => return Err(RelayError::App(e)),
            }
        }

        if self.peer_closed
            && self.down.in_pipe == 0
            && self.to_app.is_empty()
            && !self.app_write_shut
        {
            shutdown_write(&self.app).map_err(RelayError::App)?;
            self.app_write_shut = true;
            progress = true;
        }
        Ok(progress)
    }

    /// Reads the record that stopped `splice` and applies the policy: tickets are dropped,
    /// close_notify ends the peer's direction, anything else ends the flow.
    fn non_data_record(&mut self, cx: &mut Context<'_>) -> Result<Step, RelayError> {
        let buf = self
            .record
            .get_or_insert_with(|| vec![0u8; MAX_RECORD].into_boxed_slice());
        let peer = &self.peer;
        let (kind, n) =
            match peer.try_io(Interest::READABLE, || ksys::recv_record(peer.as_fd(), buf)) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return wait_ready(peer.poll_read_ready(cx)).map_err(RelayError::Peer);
                }
                Err(e) => return Err(RelayError::Peer(e)),
            };
        let body = &buf[..n];
        match kind {
            content_type::HANDSHAKE => {
                let tickets =
                    session_tickets(body).map_err(|detail| RelayError::UnexpectedRecord {
                        content_type: kind,
                        detail,
                    })?;
                if let Some(sink) = &mut self.tickets {
                    for ticket in tickets {
                        sink.handle_new_session_ticket(ticket)
                            .map_err(RelayError::Tls)?;
                    }
                }
                Ok(Step::Progress)
            }
            content_type::ALERT => match body {
                // TLS 1.3 ignores the level; description 0 is close_notify.
                [_, 0] => {
                    self.peer_closed = true;
                    Ok(Step::Progress)
                }
                [_, description] => {
                    Err(RelayError::PeerAlert(AlertDescription::from(*description)))
                }
                _ => Err(RelayError::UnexpectedRecord {
                    content_type: kind,
                    detail: format!("{n}-byte alert"),
                }),
            },
            content_type::APPLICATION_DATA if n == 0 => Err(RelayError::Truncated),
            content_type::APPLICATION_DATA => {
                self.to_app.extend_from_slice(body);
                Ok(Step::Progress)
            }
            _ => Err(RelayError::UnexpectedRecord {
                content_type: kind,
                detail: format!("{n} bytes"),
            }),
        }
    }

    fn check_record_limit(&mut self) -> Result<(), RelayError> {
        self.tx.since_check = 0;
        if let Some(limit) = self.tx.limit {
            let records =
                ktls::record_seq(self.peer.as_fd(), Direction::Tx).map_err(RelayError::Peer)?;
            if records >= limit {
                return Err(RelayError::RecordLimit { records });
            }
        }
        Ok(())
    }

    /// Whether TCP has taken every byte kTLS produced: the bytes queued since the relay
    /// started must equal the plaintext plus the per-record expansion.
    fn tx_flushed(&self) -> Result<bool, RelayError> {
        let Some(base) = self.tx.queued_base else {
            return Ok(true);
        };
        let fd = self.peer.as_fd();
        let records = ktls::record_seq(fd, Direction::Tx)
            .map_err(RelayError::Peer)?
            .saturating_sub(self.tx.seq_base);
        let expected = base + self.tx.plaintext + records * RECORD_OVERHEAD;
        let queued = sys::tcp_bytes_queued(fd).map_err(RelayError::Peer)?;
        Ok(queued >= expected)
    }
}

/// The bodies of the NewSessionTicket messages a handshake record holds, if it holds nothing
/// else; anything else is named in the error. A client keeps them (see [`TicketSink`]), a
/// server never gets any.
pub(super) fn session_tickets(body: &[u8]) -> Result<Vec<&[u8]>, String> {
    const NEW_SESSION_TICKET: u8 = 4;
    const KEY_UPDATE: u8 = 24;
    if body.is_empty() {
        return Err("empty handshake record".into());
    }
    let mut tickets = Vec::new();
    let mut rest = body;
    while let [kind, l0, l1, l2, tail @ ..] = rest {
        let len = u32::from_be_bytes([0, *l0, *l1, *l2]) as usize;
        if tail.len() < len {
            return Err("handshake message continues in another record".into());
        }
        match *kind {
            NEW_SESSION_TICKET => tickets.push(&tail[..len]),
            KEY_UPDATE => {
                return Err("KeyUpdate, which these kernels cannot follow (no rekey)".into());
            }
            other => return Err(format!("post-handshake message of type {other}")),
        }
        rest = &tail[len..];
    }
    if rest.is_empty() {
        Ok(tickets)
    } else {
        Err("truncated handshake message header".into())
    }
}

#[cfg(test)]
mod tests {
    use super::session_tickets;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut m = vec![kind, len[1], len[2], len[3]];
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn tickets_alone_are_accepted() {
        assert_eq!(session_tickets(&msg(4, &[0; 40])), Ok(vec![&[0u8; 40][..]]));
        let two = [msg(4, &[1; 20]), msg(4, &[])].concat();
        assert_eq!(session_tickets(&two), Ok(vec![&[1u8; 20][..], &[][..]]));
    }

    #[test]
    fn a_parked_relay_s_pipe_counts_must_be_what_its_pipes_hold() {
        use super::{KtlsRelayState, ParkedKtls, ksys};
        use std::os::fd::OwnedFd;
        let parts = |in_up: usize| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let app = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (peer, _) = l.accept().unwrap();
            let (ur, uw) = ksys::pipe2(true).unwrap();
            let (dr, dw) = ksys::pipe2(true).unwrap();
            let mut w = std::fs::File::from(uw.try_clone().unwrap());
            std::io::Write::write_all(&mut w, &[1; 100]).unwrap();
            let fds: Vec<OwnedFd> = vec![app.into(), peer.into(), ur, uw, dr, dw];
            // Counts above the pipe's size are legal: a spliced buffer may exceed a page.
            let state = KtlsRelayState {
                up_in_pipe: in_up,
                up_cap: 64,
                down_cap: 64,
                ..KtlsRelayState::default()
            };
            ParkedKtls::from_parts(fds, state)
        };
        assert!(parts(100).is_ok());
        let Err(e) = parts(99) else {
            panic!("a state that miscounts its pipe admitted");
        };
        assert!(e.to_string().contains("holds 100 bytes"), "{e}");
    }

    #[test]
    fn anything_else_is_named() {
        let e = session_tickets(&msg(24, &[0])).unwrap_err();
        assert!(e.contains("KeyUpdate"), "{e}");
        let e = session_tickets(&[msg(4, &[0; 8]), msg(13, &[])].concat()).unwrap_err();
        assert!(e.contains("type 13"), "{e}");
        assert!(session_tickets(&[]).is_err());
        // A ticket split across records, and a stray partial header.
        assert!(session_tickets(&msg(4, &[0; 8])[..10]).is_err());
        assert!(session_tickets(&[msg(4, &[]), vec![4, 0]].concat()).is_err());
    }
}
