//! The relay with rustls as the record layer.
//!
//! Data path per direction, and why:
//! * app → peer: one large `read` from the app into `up`, then `writer().write` lets rustls
//!   cut and seal records into its own queue (capped at `buffer_size` by
//!   `set_buffer_limit`), which `write_tls` sends with `writev`. The app is read only once
//!   `up` has been taken entirely, so at most two buffers' worth is in flight.
//! * peer → app: one large `read` of ciphertext into `tls_in`, fed to rustls in the slices it
//!   accepts, and the plaintext collected into `down` until it is full or the peer has no
//!   more for now, then written to the app in one call. rustls' own plaintext queue is always
//!   emptied before it is fed more, so it never reports itself full.
//!
//! Once rustls has nothing left to do (handshake over, a client holding the server's session
//! ticket, every record given to it whole and processed, nothing queued either way) the first
//! time the flow goes quiet, the relay takes the keys (`dangerous_extract_secrets`) and drops
//! rustls: from then on [`record::RecordLayer`] seals `up` straight into `tls_out` (out of
//! place: no copy before the AEAD) and opens records in place in `tls_in`, from where their
//! plaintext goes to the app in one `writev` (`send` for one record; no copy into `down`), so
//! an idle flow holds two AEAD contexts and no buffer.

use std::{
    io::{self, BufRead, IoSlice, Write},
    os::fd::AsFd as _,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use rustls::{AlertDescription, Connection};
use tokio::{io::AsyncWrite as _, net::TcpStream};

use super::{
    BUSY_POLLS, IdleTimer, Quiet, RelayConfig, RelayError, RelayStats, Step, YIELD_AFTER_BYTES,
    appleg::AppLeg,
    await_peer_fin, await_request,
    buf::Buf,
    record::{self, Boundary, Opened, RecordError, RecordLayer},
    reset, wait_ready,
};

/// Builds the relay's state now; [`Userspace::run`] makes the future, which owns only that
/// state. `leftover` is plaintext for the app, `leftover_tls` records from the peer not yet
/// given to `conn`; both precede anything on the sockets.
pub(super) fn with_rustls(
    app: TcpStream,
    peer: TcpStream,
    conn: Box<Connection>,
    leftover: Vec<u8>,
    leftover_tls: Vec<u8>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Userspace {
    let mut conn = conn;
    conn.set_buffer_limit(Some(config.buffer_size.max(16 << 10)));
    Userspace::new(
        app,
        peer,
        Layer::Rustls(conn),
        leftover,
        leftover_tls,
        config,
        stats,
    )
}

/// [`with_rustls`] for a session that never had rustls state (keys derived for the
/// connection, `handshake::derived`): the relay's own record layer from the first record.
pub(super) fn with_own(
    app: TcpStream,
    peer: TcpStream,
    own: Box<RecordLayer>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Userspace {
    Userspace::new(
        app,
        peer,
        Layer::Own(own),
        Vec::new(),
        Vec::new(),
        config,
        stats,
    )
}

impl Userspace {
    /// `tuning.relayAppLeg: skMsg`: the app's bytes may also arrive by redirect (`appleg`).
    pub(super) fn with_app_leg(mut self, app_leg: Option<Box<AppLeg>>) -> Userspace {
        self.app_leg = app_leg;
        self
    }

    /// The relay itself: moves bytes until both directions are closed or the flow fails.
    pub(super) async fn run(mut self) -> Result<(), RelayError> {
        let config = self.config;
        let relay = &mut self;
        let mut idle = IdleTimer::new(config.idle_timeout);
        let result = std::future::poll_fn(|cx| {
            if relay.stats.cancelled() {
                return Poll::Ready(Ok(()));
            }
            relay.poll(cx, &mut idle, config)
        })
        .await;
        if relay.stats.cancelled() {
            reset(&relay.app);
            reset(&relay.peer);
            return Ok(());
        }
        if let Err(e) = &result {
            match &mut relay.layer {
                Layer::Rustls(conn) if matches!(e, RelayError::Tls(_)) => {
                    // Best effort: tell the peer agent why (rustls queued the alert).
                    let _ = conn.write_tls(&mut SocketWriter(&relay.peer));
                }
                Layer::Own(_) if !relay.alert.is_empty() => {
                    let _ = relay.peer.try_write(&relay.alert);
                }
                _ => {}
            }
            reset(&relay.app);
            reset(&relay.peer);
            // Boxed: only a failed flow makes this wait.
            Box::pin(await_request(&relay.app, &config, &relay.stats)).await;
        } else if relay.peer_fin_first && !relay.peer_eof {
            // Boxed: its timer and readiness future would otherwise size the state of every
            // flow, idle or not, for a wait made once at the end.
            Box::pin(await_peer_fin(&relay.peer)).await;
        }
        result
    }
}

/// Who seals and opens records for the flow.
enum Layer {
    /// rustls, until the flow first goes quiet with nothing left for it to do.
    Rustls(Box<Connection>),
    /// Our own record layer, with the keys rustls had.
    Own(Box<RecordLayer>),
    /// Only while the keys move from one to the other; a failed move ends the flow.
    Moving,
}

/// Busy polling: spins one poll of a flow may make. Each follows a message forwarded, so two
/// cover an agent's two waits of a round trip (the reply a few hops away, then the app's
/// next request); the cap keeps one chatty flow from holding its worker from the others.
const MAX_SPINS_PER_POLL: u8 = 2;

/// Busy polling: a flow spins only if it moved at most this many bytes (read and written,
/// both directions) since the poll began or its last spin: one record's worth. A bulk flow
/// moves more per wake-up, and must not have a core burnt behind each of its reads.
const SPIN_AFTER_AT_MOST: usize = 1 << 14;

/// Busy polling: a flow's first quiet moments after a small message are not spun for. A
/// connect/echo/close connection has two and ends: its spins would only hold its worker
/// from the other connections' accepts and handshakes (churn lost 8 % of its connections/s
/// when every flow spun, bench/README.md "Round trip: bounded busy polling").
const SPIN_FROM_EXCHANGE: u8 = 4;

/// Busy polling: after a spin for one of a flow's two waits (a reply from the peer, the app's
/// next message) ran out, that wait is not spun for the next this many times, then tried
/// again. An app that pauses between requests would otherwise have every message followed by
/// a whole spin for nothing.
const SKIP_AFTER_MISS: u8 = 16;

/// How many opened records one `writev` to the app may carry: 128 KiB of plaintext, more than
/// one read of ciphertext at the default buffer size.
const MAX_OPENED: usize = 8;

/// Own layer: the records at the front of `tls_in` that are opened in place and whose
/// plaintext is not yet all written to the app. The plaintext goes to the app straight from
/// there, in one `writev`, instead of being copied into `down` first.
#[derive(Default)]
struct OpenedRecords {
    /// Record length and plaintext length of each, in order from the front of `tls_in`
    /// (records are at most [`record::MAX_RECORD`] long, so `u16` holds both).
    spans: [(u16, u16); MAX_OPENED],
    count: u8,
    /// Plaintext of the first record already written to the app.
    written: u16,
}

impl OpenedRecords {
    fn is_full(&self) -> bool {
        usize::from(self.count) == MAX_OPENED
    }

    /// Bytes of `tls_in` the opened records cover.
    fn len(&self) -> usize {
        self.spans[..usize::from(self.count)]
            .iter()
            .map(|&(record, _)| usize::from(record))
            .sum()
    }

    fn push(&mut self, record_len: usize, plain_len: usize) {
        debug_assert!(!self.is_full() && record_len <= record::MAX_RECORD);
        // Both fit: a record is at most `MAX_RECORD` (under 2^16) bytes.
        self.spans[usize::from(self.count)] = (
            u16::try_from(record_len).unwrap_or(u16::MAX),
            u16::try_from(plain_len).unwrap_or(u16::MAX),
        );
        self.count += 1;
    }

    /// The plaintext not yet written, as slices of `records` (the pending part of `tls_in`).
    fn slices<'a>(&self, records: &'a [u8]) -> ([IoSlice<'a>; MAX_OPENED], usize) {
        let mut slices = [IoSlice::new(&[]); MAX_OPENED];
        let mut n = 0;
        let mut at = 0;
        let mut skip = usize::from(self.written);
        for &(record, plain) in &self.spans[..usize::from(self.count)] {
            let (record, plain) = (usize::from(record), usize::from(plain));
            if plain > skip {
                slices[n] =
                    IoSlice::new(&records[at + record::HEADER_LEN + skip..][..plain - skip]);
                n += 1;
            }
            skip = 0;
            at += record;
        }
        (slices, n)
    }

    /// Counts `n` bytes as written and gives every record written in full back to `tls_in`
    /// (records without plaintext too, once nothing before them is owed).
    fn written(&mut self, mut n: usize, tls_in: &mut Buf) {
        let mut done = 0;
        for &(record, plain) in &self.spans[..usize::from(self.count)] {
            let left = usize::from(plain) - usize::from(self.written);
            if n < left {
                // Less than a record's plaintext: `n` is below `plain`, a `u16`.
                self.written += u16::try_from(n).unwrap_or(0);
                break;
            }
            n -= left;
            self.written = 0;
            tls_in.consume(usize::from(record));
            done += 1;
        }
        self.spans.copy_within(done..usize::from(self.count), 0);
        self.count -= u8::try_from(done).unwrap_or(0);
    }
}

pub(super) struct Userspace {
    /// What it was built with; [`Userspace::run`] takes its timeouts and modes from here.
    config: RelayConfig,
    app: TcpStream,
    peer: TcpStream,
    layer: Layer,
    /// Where the bytes given to rustls stand against record boundaries.
    fed: Boundary,
    /// rustls returned plaintext at least once: any session ticket came before it.
    peer_data_seen: bool,
    /// Own layer: sealed records not yet sent, `tls_out_sent..tls_out_end`. The rest of its
    /// length is initialised room the next records are sealed into (the AEAD writes there
    /// straight from `up`), kept until the flow goes quiet.
    tls_out: Vec<u8>,
    tls_out_sent: usize,
    tls_out_end: usize,
    /// Own layer: how much to seal ahead of the socket (the configured buffer size).
    out_limit: usize,
    /// Own layer: records opened in place in `tls_in`, plaintext owed to the app.
    opened: OpenedRecords,
    /// Own layer: the alert record to send, best effort, when a record from the peer fails.
    alert: Vec<u8>,
    stats: Arc<RelayStats>,

    /// Plaintext read from the app that rustls has not taken yet.
    up: Buf,
    app_eof: bool,
    close_notify_queued: bool,
    /// Our direction toward the peer is finished (close_notify sent, then FIN unless
    /// `peer_fin_first`).
    peer_write_shut: bool,
    peer_fin_first: bool,

    /// Ciphertext read from the peer that rustls has not taken yet.
    tls_in: Buf,
    /// Plaintext from the peer not yet written to the app: everything rustls opens, and what
    /// is still owed when the own layer takes over (written before its first record).
    down: Buf,
    peer_eof: bool,
    /// close_notify received: no more data will come from the peer.
    peer_closed: bool,
    app_write_shut: bool,
    /// `tuning.relayAppLeg: skMsg`: the app's bytes may arrive in the app socket's redirected
    /// queue as well as its TCP queue (see `appleg`).
    app_leg: Option<Box<AppLeg>>,
    /// A spin (`RelayConfig::busy_poll`) saw a socket readable: the next pass reads with
    /// `recv` straight away, since tokio's readiness changes only when its reactor runs.
    /// Such reads register no waker, so a pass through the reactor's readiness follows
    /// before the flow waits.
    spin_read: bool,
    /// Busy polling: the flow's quiet moments after a small message so far (saturating at
    /// [`SPIN_FROM_EXCHANGE`]); a flow spins only once it has had that many.
    exchanges: u8,
    /// Busy polling: the last bytes forwarded went to the peer, so the flow waits for its
    /// reply (else for the app's next message).
    awaits_peer: bool,
    /// Busy polling, per wait (index: `awaits_peer`): chances still to let pass after a spin
    /// for that wait ran out.
    spin_skip: [u8; 2],
}

impl Userspace {
    fn new(
        app: TcpStream,
        peer: TcpStream,
        layer: Layer,
        leftover: Vec<u8>,
        leftover_tls: Vec<u8>,
        config: RelayConfig,
        stats: Arc<RelayStats>,
    ) -> Userspace {
        let size = config.buffer_size.max(16 << 10);
        Userspace {
            app,
            peer,
            layer,
            fed: Boundary::default(),
            peer_data_seen: false,
            tls_out: Vec::new(),
            tls_out_sent: 0,
            tls_out_end: 0,
            out_limit: size,
            opened: OpenedRecords::default(),
            alert: Vec::new(),
            stats,
            up: Buf::new(size),
            app_eof: false,
            close_notify_queued: false,
            peer_write_shut: false,
            peer_fin_first: config.peer_fin_first,
            config,
            tls_in: Buf::with_content(leftover_tls, size),
            down: Buf::with_content(leftover, size),
            peer_eof: false,
            peer_closed: false,
            app_write_shut: false,
            app_leg: None,
            spin_read: false,
            exchanges: 0,
            awaits_peer: false,
            spin_skip: [0; 2],
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        idle: &mut IdleTimer,
        config: RelayConfig,
    ) -> Poll<Result<(), RelayError>> {
        let mut moved = 0usize;
        let (mut up, mut down) = (true, true);
        // Busy polling: spins made in this poll, and `moved` when the last one ended.
        let (mut spins, mut moved_at_spin) = (0u8, 0usize);
        loop {
            let (mut up_settled, mut down_settled) = (false, false);
            let sent = up && self.app_to_peer(cx, &mut moved, &mut up_settled)?;
            let received = down && self.peer_to_app(cx, &mut moved, &mut down_settled)?;

            if self.peer_write_shut && self.app_write_shut {
                return Poll::Ready(Ok(()));
            }
            if sent || received {
                // `received` last: the peer's bytes were the last moved when both moved.
                self.awaits_peer = !received;
                idle.progressed();
                if moved >= YIELD_AFTER_BYTES {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                // Only a direction that moved goes again: one that did not is waiting on its
                // own socket with a waker registered, and under the own record layer the
                // directions share nothing else (the peer socket's read and write readiness
                // are separate), so the other's progress cannot unblock it. rustls can queue
                // records to send while it reads (an alert, a key update): under it both go
                // again. A direction that moved and ended waiting on its socket (`settled`)
                // has nothing to find in another pass either. A 64-byte round trip made ten
                // direction calls per relay, four now (bench/README.md "Round trip, counted").
                let coupled = matches!(self.layer, Layer::Rustls(_));
                up = (sent && !up_settled) || coupled;
                down = (received && !down_settled) || coupled;
                if up || down {
                    continue;
                }
            }
            if std::mem::take(&mut self.spin_read) {
                // Reads without the reactor registered no waker: one pass through it first.
                (up, down) = (true, true);
                continue;
            }
            if !config.busy_poll.is_zero()
                && spins < MAX_SPINS_PER_POLL
                && (1..=SPIN_AFTER_AT_MOST).contains(&(moved - moved_at_spin))
                && self.may_spin()
            {
                spins += 1;
                moved_at_spin = moved;
                let wait = usize::from(self.awaits_peer);
                if self.exchanges < SPIN_FROM_EXCHANGE {
                    self.exchanges += 1;
                } else if self.spin_skip[wait] > 0 {
                    self.spin_skip[wait] -= 1;
                } else if let Some((app, peer)) = self.spin(config.busy_poll) {
                    (up, down) = (app, peer);
                    self.spin_read = true;
                    continue;
                } else {
                    self.spin_skip[wait] = SKIP_AFTER_MISS;
                }
            }
            // Both directions wait for their sockets: rustls goes once it can (mesh sessions
            // only: see `RelayConfig::own_record_layer`), and whatever is drained goes back to
            // the allocator once the flow has been quiet for `RELEASE_AFTER`, so a quiet flow
            // holds no buffer and a busy one does not allocate at every wait.
            if config.own_record_layer {
                self.take_over()?;
            }
            match idle.poll_quiet(cx, self.holds_drained_buffers()) {
                Quiet::Expired => {
                    return Poll::Ready(Err(RelayError::IdleTimeout(config.idle_timeout)));
                }
                Quiet::Waiting { release } => {
                    if release {
                        self.release_drained_buffers();
                    }
                }
            }
            return Poll::Pending;
        }
    }

    /// Whether the flow looks like request/response at rest: the own record layer (rustls'
    /// queues are not looked into), both directions open and drained (nothing owed to
    /// either socket: a direction that waits for room is busy, never spun for), the app's
    /// bytes by TCP only.
    fn may_spin(&self) -> bool {
        matches!(self.layer, Layer::Own(_))
            && self.app_leg.is_none()
            && !(self.app_eof || self.peer_eof || self.peer_closed)
            && self.up.is_empty()
            && self.down.is_empty()
            && self.opened.count == 0
            && self.tls_out_sent == self.tls_out_end
    }

    /// Polls both sockets without blocking for up to `bound`, yielding the CPU between
    /// polls: which of (app, peer) has something to read, or `None` once the bound passed
    /// with nothing. A failed `poll` counts as readable, so the reads that follow report the
    /// socket's error.
    fn spin(&self, bound: Duration) -> Option<(bool, bool)> {
        let start = Instant::now();
        loop {
            let ready = crate::sys::readable_now(self.app.as_fd(), self.peer.as_fd())
                .unwrap_or((true, true));
            if ready.0 || ready.1 {
                BUSY_POLLS.spun(true, start.elapsed());
                return Some(ready);
            }
            let took = start.elapsed();
            if took >= bound {
                BUSY_POLLS.spun(false, took);
                return None;
            }
            // Any other task runnable on this CPU (the app or the other agent that makes the
            // reply, on a node whose cores are shared) runs first: a plain spin held it off
            // for the whole bound (bench/README.md "Round trip: bounded busy polling").
            std::thread::yield_now();
        }
    }

    /// A buffer is allocated with nothing in it: what [`Userspace::release_drained_buffers`]
    /// would free.
    fn holds_drained_buffers(&self) -> bool {
        self.up.is_drained_allocation()
            || self.tls_in.is_drained_allocation()
            || self.down.is_drained_allocation()
            || (self.tls_out.capacity() != 0 && self.tls_out_sent == self.tls_out_end)
    }

    fn release_drained_buffers(&mut self) {
        self.up.release();
        self.tls_in.release();
        self.down.release();
        if self.tls_out_sent == self.tls_out_end {
            self.tls_out = Vec::new();
            self.tls_out_sent = 0;
            self.tls_out_end = 0;
        }
    }

    /// Seals and sends what the app wrote, reading more once `up` is taken, until the app or
    /// the peer socket makes it wait (or it has moved [`YIELD_AFTER_BYTES`]): what it read is
    /// sealed and sent in the same call, not in the next pass of [`Userspace::poll`].
    /// `settled`: under the own record layer, it ended waiting for the app's or the peer
    /// socket's readiness with a waker registered, so another call would find nothing.
    fn app_to_peer(
        &mut self,
        cx: &mut Context<'_>,
        moved: &mut usize,
        settled: &mut bool,
    ) -> Result<bool, RelayError> {
        let mut progress = false;
        loop {
            progress |= match &mut self.layer {
                Layer::Rustls(_) => self.seal_with_rustls(cx, moved)?,
                Layer::Own(_) => self.seal_own(cx, moved)?,
                Layer::Moving => return Err(RelayError::Tls(lost_session())),
            };

            if self.close_notify_queued && !self.wants_write() && !self.peer_write_shut {
                if !self.peer_fin_first {
                    shutdown_write(&mut self.peer, cx).map_err(RelayError::Peer)?;
                }
                self.peer_write_shut = true;
                progress = true;
            }

            if self.app_eof || !self.up.is_empty() {
                // `up` is left only when sending made it wait (`seal_own` takes all of it
                // otherwise).
                *settled = !self.app_eof && matches!(self.layer, Layer::Own(_));
                return Ok(progress);
            }
            self.up.clear();
            let read = match &mut self.app_leg {
                None => read_into(
                    &mut self.app,
                    &mut self.up,
                    usize::MAX,
                    (cx, self.spin_read),
                    moved,
                    RelayError::App,
                )?,
                Some(leg) => {
                    let read = read_joined(&self.app, &mut self.up, cx, moved)?;
                    leg.read(self.up.pending().len());
                    read
                }
            };
            match read {
                Read::Eof => self.app_eof = true,
                Read::Data => {}
                Read::Blocked => {
                    *settled = matches!(self.layer, Layer::Own(_));
                    return Ok(progress);
                }
            }
            progress = true;
            if *moved >= YIELD_AFTER_BYTES {
                return Ok(progress);
            }
        }
    }

    /// Records still to send toward the peer.
    fn wants_write(&self) -> bool {
        match &self.layer {
            Layer::Rustls(conn) => conn.wants_write(),
            Layer::Own(_) | Layer::Moving => self.tls_out_sent < self.tls_out_end,
        }
    }

    fn seal_with_rustls(
        &mut self,
        cx: &mut Context<'_>,
        moved: &mut usize,
    ) -> Result<bool, RelayError> {
        let Layer::Rustls(conn) = &mut self.layer else {
            return Ok(false);
        };
        let mut progress = false;

        if !self.up.is_empty() {
            let n = conn
                .writer()
                .write(self.up.pending())
                .map_err(RelayError::Peer)?;
            if n > 0 {
                self.up.consume(n);
                self.stats.add_app_to_peer(n);
                progress = true;
            }
        }
        if self.app_eof && self.up.is_empty() && !self.close_notify_queued {
            conn.send_close_notify();
            self.close_notify_queued = true;
            progress = true;
        }

        while conn.wants_write() {
            if self.peer_write_shut {
                // Only something rustls wants to say after our close_notify (a KeyUpdate
                // reply); TLS 1.3 lets the peer ignore its absence.
                let _ = conn.write_tls(&mut io::sink());
                continue;
            }
            match conn.write_tls(&mut SocketWriter(&self.peer)) {
                Ok(n) => {
                    *moved += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match wait_ready(self.peer.poll_write_ready(cx)).map_err(RelayError::Peer)? {
                        Step::Progress => continue,
                        Step::Idle => break,
                    }
                }
                Err(e) => return Err(RelayError::Peer(e)),
            }
        }
        Ok(progress)
    }

    /// Own layer: sends what is sealed, then seals more of `up` (up to `out_limit` ahead of
    /// the socket), then close_notify after the app's EOF.
    fn seal_own(&mut self, cx: &mut Context<'_>, moved: &mut usize) -> Result<bool, RelayError> {
        let Layer::Own(layer) = &mut self.layer else {
            return Ok(false);
        };
        let mut progress = false;
        loop {
            while self.tls_out_sent < self.tls_out_end {
                // `poll_write`: a short write marks the socket full, so the next attempt
                // waits for epoll instead of costing a `sendto` that returns EAGAIN.
                match Pin::new(&mut self.peer)
                    .poll_write(cx, &self.tls_out[self.tls_out_sent..self.tls_out_end])
                {
                    Poll::Ready(Ok(n)) => {
                        self.tls_out_sent += n;
                        *moved += n;
                        progress = true;
                    }
                    Poll::Ready(Err(e)) => return Err(RelayError::Peer(e)),
                    Poll::Pending => return Ok(progress),
                }
            }
            self.tls_out_sent = 0;
            self.tls_out_end = 0;

            if !self.up.is_empty() {
                // Room for what `up` holds, up to `out_limit` (at least one record): zeroed
                // once when it grows, then reused while the flow is busy.
                let pending = self.up.pending().len();
                let full = layer.sealed_data_len(record::MAX_PLAINTEXT);
                let want = (pending / record::MAX_PLAINTEXT * full
                    + layer.sealed_data_len(pending % record::MAX_PLAINTEXT))
                .min(self.out_limit.max(full));
                if self.tls_out.len() < want {
                    self.tls_out.resize(want, 0);
                }
                while !self.up.is_empty() {
                    let n = self.up.pending().len().min(record::MAX_PLAINTEXT);
                    if self.tls_out_end + layer.sealed_data_len(n) > self.tls_out.len() {
                        break;
                    }
                    self.tls_out_end += layer
                        .seal_data_into(
                            &self.up.pending()[..n],
                            &mut self.tls_out[self.tls_out_end..],
                        )
                        .map_err(record_error)?;
                    self.up.consume(n);
                    self.stats.add_app_to_peer(n);
                }
                progress = true;
                continue;
            }
            if self.app_eof && !self.close_notify_queued {
                self.tls_out.truncate(self.tls_out_end);
                layer
                    .seal_alert(AlertDescription::CloseNotify, &mut self.tls_out)
                    .map_err(record_error)?;
                self.tls_out_end = self.tls_out.len();
                self.close_notify_queued = true;
                progress = true;
                continue;
            }
            return Ok(progress);
        }
    }

    /// Replaces rustls with [`RecordLayer`] if rustls has nothing left to do: no handshake
    /// message still to come (a client waits for the server's ticket or its first data, which
    /// the ticket precedes), nothing queued in either direction, no partial record inside it,
    /// and neither side closing.
    fn take_over(&mut self) -> Result<(), RelayError> {
        let Layer::Rustls(conn) = &mut self.layer else {
            return Ok(());
        };
        if conn.is_handshaking()
            || conn.wants_write()
            || !self.fed.at_record_start()
            || !self.tls_in.is_empty()
            || self.app_eof
            || self.close_notify_queued
            || self.peer_eof
            || self.peer_closed
        {
            return Ok(());
        }
        let is_client = match &**conn {
            Connection::Client(c) => {
                if c.tls13_tickets_received() == 0 && !self.peer_data_seen {
                    return Ok(());
                }
                true
            }
            Connection::Server(_) => false,
        };
        let state = conn.process_new_packets().map_err(tls_error)?;
        if state.plaintext_bytes_to_read() != 0 || state.tls_bytes_to_write() != 0 {
            return Ok(());
        }
        let Layer::Rustls(conn) = std::mem::replace(&mut self.layer, Layer::Moving) else {
            return Ok(());
        };
        let secrets = conn.dangerous_extract_secrets().map_err(RelayError::Tls)?;
        let own = RecordLayer::new(secrets, is_client).map_err(RelayError::Tls)?;
        let full = own.sealed_data_len(record::MAX_PLAINTEXT);
        self.layer = Layer::Own(Box::new(own));
        // Whole records only from here on: the buffer must be able to hold the largest one,
        // and its sizes are whole numbers of full records (two at first), which the reads
        // are cut to. (`tls_in` is empty here; `down` may still hold plaintext for a slow app
        // and stays.)
        self.tls_in = Buf::sized(2 * full, self.out_limit.div_ceil(full).max(2) * full);
        Ok(())
    }

    /// `settled`: under the own record layer, it ended waiting for the peer's next bytes with
    /// a waker registered and nothing owed to the app, so another call would find nothing.
    fn peer_to_app(
        &mut self,
        cx: &mut Context<'_>,
        moved: &mut usize,
        settled: &mut bool,
    ) -> Result<bool, RelayError> {
        let mut progress = false;
        let mut read_blocked = false;

        if !self.down.is_empty() {
            match Pin::new(&mut self.app).poll_write(cx, self.down.pending()) {
                Poll::Ready(Ok(n)) => {
                    self.down.consume(n);
                    self.stats.add_peer_to_app(n);
                    *moved += n;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(RelayError::App(e)),
                Poll::Pending => {}
            }
        }

        if !self.peer_closed {
            progress |= match self.layer {
                Layer::Rustls(_) => self.decrypt_into_down(cx, moved)?,
                Layer::Own(_) => self.open_to_app(cx, moved, &mut read_blocked)?,
                Layer::Moving => return Err(RelayError::Tls(lost_session())),
            };
        } else if self.opened.count != 0 {
            progress |= self.open_to_app(cx, moved, &mut read_blocked)?;
        }

        if self.peer_closed
            && self.down.is_empty()
            && self.opened.count == 0
            && !self.app_write_shut
        {
            shutdown_write(&mut self.app, cx).map_err(RelayError::App)?;
            self.app_write_shut = true;
            progress = true;
        }
        *settled = read_blocked && self.down.is_empty();
        Ok(progress)
    }

    /// Fills `down` with plaintext, reading and feeding ciphertext as needed, until `down` is
    /// full, the peer has nothing more for now, or the peer closed.
    fn decrypt_into_down(
        &mut self,
        cx: &mut Context<'_>,
        moved: &mut usize,
    ) -> Result<bool, RelayError> {
        let Layer::Rustls(conn) = &mut self.layer else {
            return Ok(false);
        };
        let mut progress = false;
        loop {
            if self.down.is_empty() {
                self.down.clear();
            }
            if self.down.spare_len() == 0 {
                return Ok(progress);
            }
            match self.down.fill(|v| read_plaintext(conn, v)) {
                Ok(0) => {
                    // close_notify, after every byte before it.
                    self.peer_closed = true;
                    return Ok(true);
                }
                Ok(_) => {
                    self.peer_data_seen = true;
                    progress = true;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(RelayError::Truncated);
                }
                Err(e) => return Err(RelayError::Peer(e)),
            }

            if !self.tls_in.is_empty() {
                let n = conn
                    .read_tls(&mut self.tls_in.pending())
                    .map_err(RelayError::Peer)?;
                self.fed.advance(&self.tls_in.pending()[..n]);
                self.tls_in.consume(n);
                conn.process_new_packets().map_err(tls_error)?;
                progress = true;
                continue;
            }
            if self.peer_eof {
                // rustls knows of the EOF and still reports no state change: cannot happen,
                // but a cut stream is what it would mean.
                return Err(RelayError::Truncated);
            }

            self.tls_in.clear();
            match read_into(
                &mut self.peer,
                &mut self.tls_in,
                usize::MAX,
                (cx, self.spin_read),
                moved,
                RelayError::Peer,
            )? {
                Read::Eof => {
                    self.peer_eof = true;
                    // An empty read tells rustls the transport ended; it then reports clean
                    // close (after close_notify) or truncation through the reader.
                    conn.read_tls(&mut &[][..]).map_err(RelayError::Peer)?;
                    conn.process_new_packets().map_err(tls_error)?;
                    progress = true;
                }
                Read::Data => progress = true,
                Read::Blocked => return Ok(progress),
            }
        }
    }
    /// Own layer: opens the whole records in `tls_in` in place and writes their plaintext to
    /// the app straight from there (after anything still in `down`), reading ciphertext while
    /// there is room, until the app or the peer blocks or the peer closed.
    /// `read_blocked`: it ended because the peer had nothing more to read (a waker is
    /// registered), after every opened record was written or the app made it wait.
    fn open_to_app(
        &mut self,
        cx: &mut Context<'_>,
        moved: &mut usize,
        read_blocked: &mut bool,
    ) -> Result<bool, RelayError> {
        let mut progress = false;
        loop {
            let Layer::Own(layer) = &mut self.layer else {
                return Ok(progress);
            };
            let full = layer.sealed_data_len(record::MAX_PLAINTEXT);
            let mut at = self.opened.len();
            while !self.peer_closed && !self.opened.is_full() {
                let len = match record::record_len(&self.tls_in.pending()[at..]) {
                    Ok(Some(len)) => len,
                    Ok(None) => break,
                    Err(e) => return Err(self.refuse(e)),
                };
                let plain = match layer.open(&mut self.tls_in.pending_mut()[at..at + len]) {
                    Ok(Opened::Data(n)) => n,
                    Ok(Opened::Nothing) => 0,
                    Ok(Opened::CloseNotify) => {
                        self.peer_closed = true;
                        0
                    }
                    Err(e) => return Err(self.refuse(e)),
                };
                self.opened.push(len, plain);
                at += len;
                progress = true;
            }
            // Records without plaintext leave at once when nothing before them is owed.
            self.opened.written(0, &mut self.tls_in);

            let (slices, n) = self.opened.slices(self.tls_in.pending());
            if n > 0 && self.down.is_empty() {
                match poll_write_vectored(&self.app, cx, &slices[..n]) {
                    Poll::Ready(Ok(n)) => {
                        self.opened.written(n, &mut self.tls_in);
                        self.stats.add_peer_to_app(n);
                        *moved += n;
                        progress = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Err(RelayError::App(e)),
                    Poll::Pending => {}
                }
            }

            if self.peer_closed {
                return Ok(progress);
            }
            if self.peer_eof {
                if self.opened.is_full() {
                    return Ok(progress);
                }
                // The stream ended without close_notify, possibly inside a record.
                return Err(RelayError::Truncated);
            }
            if self.opened.is_full() {
                // The app has not taken what is opened yet; its write readiness wakes us.
                return Ok(progress);
            }
            // Every whole record is opened: what follows them is the start of the next one.
            let partial = &self.tls_in.pending()[self.opened.len()..];
            let need = match record::announced_len(partial) {
                Ok(Some(len)) => len.saturating_sub(partial.len()).max(1),
                // No header yet: a busy peer sends full records.
                Ok(None) => full.saturating_sub(partial.len()),
                Err(e) => return Err(self.refuse(e)),
            };
            if self.tls_in.is_empty() {
                self.tls_in.clear();
            } else if self.opened.count == 0 && self.tls_in.spare_len() < need {
                // Only part of a record left, and no room behind it for the rest: to the
                // front, with room for the largest.
                self.tls_in.make_room(record::MAX_RECORD);
            }
            let spare = self.tls_in.spare_len();
            if spare == 0 {
                return Ok(progress);
            }
            // Reads end where a record does when the peer's records are full: the rest of the
            // one begun, then whole ones. A read cut inside a record would leave its start to
            // be moved to the front of the buffer before the rest can follow.
            let limit = if spare >= need + full {
                need + (spare - need) / full * full
            } else {
                spare
            };
            match read_into(
                &mut self.peer,
                &mut self.tls_in,
                limit,
                (cx, self.spin_read),
                moved,
                RelayError::Peer,
            )? {
                Read::Eof => {
                    self.peer_eof = true;
                    progress = true;
                }
                Read::Data => progress = true,
                Read::Blocked => {
                    *read_blocked = true;
                    return Ok(progress);
                }
            }
        }
    }

    /// Ends the flow for a record the peer should not have sent: seals the alert to send
    /// (best effort, only behind whole records) and names the failure.
    fn refuse(&mut self, e: RecordError) -> RelayError {
        if let (Layer::Own(layer), Some(alert)) = (&mut self.layer, e.alert())
            && self.tls_out_sent == self.tls_out_end
        {
            let _ = layer.seal_alert(alert, &mut self.alert);
        }
        record_error(e)
    }
}

/// What one non-blocking read from a socket did.
enum Read {
    /// The stream ended (FIN).
    Eof,
    /// Bytes arrived.
    Data,
    /// Nothing to read; the task wakes when there is.
    Blocked,
}

/// Reads at most `limit` bytes from `sock` into `buf`'s spare room (there must be some: an
/// empty read means EOF); `side` names the socket in an error. A short read leaves the socket
/// waiting for epoll (`sys::poll_read_spare`), so a drained socket costs no extra `recvfrom`.
/// `(cx, raw)`: with `raw` (a spin saw the socket readable) the read asks the kernel without
/// the reactor's readiness, and registers no waker.
fn read_into(
    sock: &mut TcpStream,
    buf: &mut Buf,
    limit: usize,
    (cx, raw): (&mut Context<'_>, bool),
    moved: &mut usize,
    side: fn(io::Error) -> RelayError,
) -> Result<Read, RelayError> {
    let read = buf.fill(|v| {
        if raw {
            return crate::sys::recv_spare(sock.as_fd(), v, limit);
        }
        match crate::sys::poll_read_spare(sock, cx, v, limit) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    });
    match read {
        Ok(0) => Ok(Read::Eof),
        Ok(n) => {
            *moved += n;
            Ok(Read::Data)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Read::Blocked),
        Err(e) => Err(side(e)),
    }
}

/// [`read_into`] for an app socket under `tuning.relayAppLeg: skMsg`. The kernel reads the
/// redirected queue before the TCP queue and returns from the first alone, so a short read
/// does not mean the socket is drained (TCP bytes, whose wake-up has been consumed, may
/// wait behind it): the readiness is kept until a read finds nothing, at the price of one
/// `recvfrom` that returns `EAGAIN` per burst.
fn read_joined(
    sock: &TcpStream,
    buf: &mut Buf,
    cx: &mut Context<'_>,
    moved: &mut usize,
) -> Result<Read, RelayError> {
    loop {
        match sock.poll_read_ready(cx) {
            Poll::Pending => return Ok(Read::Blocked),
            Poll::Ready(Err(e)) => return Err(RelayError::App(e)),
            Poll::Ready(Ok(())) => {}
        }
        // `try_read_buf` clears the readiness only on `EAGAIN`; the next pass then registers
        // the waker.
        match buf.fill(|v| sock.try_read_buf(v)) {
            Ok(0) => return Ok(Read::Eof),
            Ok(n) => {
                *moved += n;
                return Ok(Read::Data);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(RelayError::App(e)),
        }
    }
}

/// One `writev` of `bufs` to `sock` once it is writable. A short write marks the socket full,
/// as tokio's `poll_write` does for one buffer (its `poll_write_vectored` does not), so the next
/// attempt waits for epoll instead of costing a `writev` that returns EAGAIN: a busy flow whose
/// app reads slower than the peer sends made one such call per short write.
///
/// One slice (a request/response flow's every message) goes by `send` instead: `writev` takes
/// the file layer first (copying in the vector, the LSM file hook, fsnotify), which `send`
/// skips for the same TCP work.
fn poll_write_vectored(
    sock: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    loop {
        std::task::ready!(sock.poll_write_ready(cx))?;
        let mut written = 0;
        // `try_io` clears the socket's write readiness when its closure reports WouldBlock:
        // a short write reports it after keeping the count.
        match sock.try_io(tokio::io::Interest::WRITABLE, || {
            written = match bufs {
                [one] => sock.try_write(one)?,
                _ => sock.try_write_vectored(bufs)?,
            };
            if written < total {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        }) {
            Ok(()) => return Poll::Ready(Ok(written)),
            Err(_) if written > 0 => return Poll::Ready(Ok(written)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Moves the plaintext of one received record (or the part that fits) into `into`'s spare
/// capacity, with `Read::read`'s results: `Ok(0)` after close_notify, `WouldBlock` when rustls
/// has nothing, `UnexpectedEof` after a cut stream. Through `fill_buf` the destination need not
/// be initialised first.
fn read_plaintext(conn: &mut Connection, into: &mut Vec<u8>) -> io::Result<usize> {
    let mut reader = conn.reader();
    let chunk = reader.fill_buf()?;
    let n = chunk.len().min(into.capacity() - into.len());
    into.extend_from_slice(&chunk[..n]);
    reader.consume(n);
    Ok(n)
}

/// A record the own layer refuses (or cannot seal), as the relay reports it: the peer's own
/// alert and the AEAD usage limit keep the names every relay gives them; everything else is
/// the record layer's own failure.
fn record_error(e: RecordError) -> RelayError {
    match e {
        RecordError::Alert(alert) => RelayError::PeerAlert(alert),
        RecordError::RecordLimit(records) => RelayError::RecordLimit { records },
        e => RelayError::RecordLayer(e),
    }
}

fn lost_session() -> rustls::Error {
    rustls::Error::General("the session was lost while its keys moved to the relay".into())
}

fn tls_error(e: rustls::Error) -> RelayError {
    match e {
        rustls::Error::AlertReceived(alert) => RelayError::PeerAlert(alert),
        e => RelayError::Tls(e),
    }
}

/// `shutdown(SHUT_WR)` through tokio: `poll_shutdown` on a TCP stream is that one system
/// call, made at once.
fn shutdown_write(sock: &mut TcpStream, cx: &mut Context<'_>) -> io::Result<()> {
    match Pin::new(sock).poll_shutdown(cx) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::Error::other(
            "shutdown of a TCP stream did not complete",
        )),
    }
}

/// rustls writes through `io::Write`; this maps it onto tokio's non-blocking socket calls, so
/// a full socket surfaces as `WouldBlock` with the readiness bookkeeping tokio needs.
struct SocketWriter<'a>(&'a TcpStream);

impl Write for SocketWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::{
        relay::RelayStats,
        test_tls::{finished_pair, tcp_pair},
    };

    /// Seals `data` as one record with the peer's rustls and sends it.
    async fn send(client: &mut rustls::ClientConnection, sock: &mut TcpStream, data: &[u8]) {
        client.writer().write_all(data).unwrap();
        let mut records = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut records).unwrap();
        }
        sock.write_all(&records).await.unwrap();
    }

    /// A server-side relay allowed to switch to the own record layer, over a finished TLS 1.3
    /// session whose client end the test holds, with the far ends of both legs.
    async fn own_layer_relay() -> (
        rustls::ClientConnection,
        Userspace,
        TcpStream,
        TcpStream,
        RelayConfig,
    ) {
        let (client, server) = finished_pair(cs::TLS13_AES_128_GCM_SHA256, 1);
        let (app, app_far) = tcp_pair().await;
        let (peer, peer_far) = tcp_pair().await;
        let config = RelayConfig {
            own_record_layer: true,
            ..RelayConfig::default()
        };
        let mut conn = Box::new(Connection::from(server));
        conn.set_buffer_limit(Some(config.buffer_size));
        let relay = Userspace::new(
            app,
            peer,
            Layer::Rustls(conn),
            Vec::new(),
            Vec::new(),
            config,
            RelayStats::new(),
        );
        (client, relay, app_far, peer_far, config)
    }

    /// Plaintext rustls opened that the app has not taken yet stays owed to the app when the
    /// own record layer takes over, and reaches it before anything opened after the switch
    /// (the switch once replaced that buffer and dropped it).
    #[tokio::test]
    async fn plaintext_owed_to_a_slow_app_survives_the_record_layer_switch() {
        let (mut client, mut relay, mut app_far, mut peer_far, config) = own_layer_relay().await;

        // rustls opens the first record into `down`; the app has not been written to yet.
        let before: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        send(&mut client, &mut peer_far, &before).await;
        let mut moved = 0;
        tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| match relay.decrypt_into_down(cx, &mut moved) {
                Ok(_) if relay.down.pending().len() == before.len() => Poll::Ready(()),
                Ok(_) => Poll::Pending,
                Err(e) => panic!("{e}"),
            }),
        )
        .await
        .expect("rustls opened the first record");

        relay.take_over().unwrap();
        assert!(
            matches!(relay.layer, Layer::Own(_)),
            "the own layer took over"
        );
        assert_eq!(relay.down.pending(), &before[..], "owed plaintext kept");

        // The peer goes on with the same session; the own layer opens what follows.
        let after: Vec<u8> = (0..40_000u32).map(|i| (i % 241) as u8).collect();
        send(&mut client, &mut peer_far, &after).await;
        let task = tokio::spawn(async move {
            let mut idle = IdleTimer::new(config.idle_timeout);
            std::future::poll_fn(|cx| relay.poll(cx, &mut idle, config)).await
        });
        let mut got = vec![0; before.len() + after.len()];
        tokio::time::timeout(Duration::from_secs(5), app_far.read_exact(&mut got))
            .await
            .expect("the app got every byte")
            .unwrap();
        assert!(got[..before.len()] == before[..], "owed plaintext first");
        assert!(got[before.len()..] == after[..], "then the own layer's");
        task.abort();
    }

    /// Full records queued from the peer are read whole: the reads end where records do, so
    /// no record's start has to be moved to the front of the buffer before its rest can be
    /// read (reads of the buffer's size cut one record in four and moved its start).
    #[tokio::test]
    async fn full_records_are_read_whole_without_moving_a_partial_one() {
        let (mut client, mut relay, mut app_far, mut peer_far, config) = own_layer_relay().await;
        relay.take_over().unwrap();
        assert!(
            matches!(relay.layer, Layer::Own(_)),
            "the own layer took over"
        );

        // Four full records, queued on the peer socket before the relay reads any of them.
        let data: Vec<u8> = (0..4 * record::MAX_PLAINTEXT as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        send(&mut client, &mut peer_far, &data).await;
        tokio::time::sleep(Duration::from_millis(50)).await;

        let task = tokio::spawn(async move {
            let mut idle = IdleTimer::new(config.idle_timeout);
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                std::future::poll_fn(|cx| relay.poll(cx, &mut idle, config)),
            )
            .await;
            relay.tls_in.moved
        });
        let mut got = vec![0; data.len()];
        tokio::time::timeout(Duration::from_secs(5), app_far.read_exact(&mut got))
            .await
            .expect("the app got every byte")
            .unwrap();
        assert!(got == data, "the app got the peer's bytes");
        drop(peer_far);
        let moved = task.await.unwrap();
        assert_eq!(
            moved, 0,
            "bytes of a cut record moved to the buffer's front"
        );
    }

    /// A flow keeps its buffers across the waits of a busy spell (releasing them at every wait
    /// cost an allocation, a zeroed output buffer and heap trims per wait) and gives them back
    /// once it has been quiet for `RELEASE_AFTER`.
    #[tokio::test]
    async fn buffers_stay_across_waits_and_go_once_the_flow_is_quiet() {
        let (_client, mut relay, mut app_far, _peer_far, config) = own_layer_relay().await;
        relay.take_over().unwrap();
        let mut idle = IdleTimer::new(config.idle_timeout);
        let since = std::time::Instant::now();
        app_far.write_all(b"request").await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = relay.poll(cx, &mut idle, config) {
                    panic!("the relay ended: {r:?}");
                }
                if relay.stats.bytes_app_to_peer() == 7 {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }),
        )
        .await
        .expect("the request was sealed and sent");
        // The poll that sent it ended waiting for both sockets.
        if since.elapsed() < super::super::RELEASE_AFTER {
            assert!(relay.up.is_drained_allocation(), "app buffer kept");
            assert!(relay.tls_out.capacity() != 0, "output buffer kept");
        }
        tokio::time::sleep(super::super::RELEASE_AFTER + Duration::from_millis(20)).await;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(relay.poll(&mut cx, &mut idle, config).is_pending());
        assert!(!relay.up.is_drained_allocation(), "app buffer released");
        assert!(
            !relay.tls_in.is_drained_allocation(),
            "peer buffer released"
        );
        assert_eq!(relay.tls_out.capacity(), 0, "output buffer released");
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Yields (keeping the paused clock still) until `wakes` has counted past `before`.
    async fn woken(wakes: &Wakes, before: usize, what: &str) {
        for _ in 0..100_000 {
            if wakes.0.load(std::sync::atomic::Ordering::SeqCst) > before {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{what}: the relay was not woken by its socket");
    }

    /// Each pass that ends leaves a waker with every socket a direction waits on, including
    /// the passes a direction skips once it moved and settled: messages either way wake the
    /// relay through the sockets alone. The clock is paused and the test never lets the
    /// runtime idle, so no timer (buffer release, idle timeout) can stand in for a waker a
    /// pass forgot.
    #[tokio::test(start_paused = true)]
    async fn every_message_wakes_the_relay_through_its_socket_alone() {
        let (mut client, mut relay, mut app_far, mut peer_far, config) = own_layer_relay().await;
        relay.take_over().unwrap();
        let mut idle = IdleTimer::new(config.idle_timeout);
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);
        assert!(relay.poll(&mut cx, &mut idle, config).is_pending());
        let start = tokio::time::Instant::now();
        for i in 0..50u8 {
            let before = wakes.0.load(std::sync::atomic::Ordering::SeqCst);
            app_far.write_all(&[i; 64]).await.unwrap();
            woken(&wakes, before, "app to peer").await;
            assert!(relay.poll(&mut cx, &mut idle, config).is_pending());
            // One sealed record: header, 64 bytes, content type, tag.
            let mut record = [0u8; 5 + 64 + 1 + 16];
            peer_far.read_exact(&mut record).await.unwrap();
            client.read_tls(&mut &record[..]).unwrap();
            client.process_new_packets().unwrap();
            let mut plain = [0u8; 64];
            std::io::Read::read_exact(&mut client.reader(), &mut plain).unwrap();
            assert_eq!(plain, [i; 64]);

            let before = wakes.0.load(std::sync::atomic::Ordering::SeqCst);
            send(&mut client, &mut peer_far, &[!i; 64]).await;
            woken(&wakes, before, "peer to app").await;
            assert!(relay.poll(&mut cx, &mut idle, config).is_pending());
            app_far.read_exact(&mut plain).await.unwrap();
            assert_eq!(plain, [!i; 64]);
        }
        assert_eq!(tokio::time::Instant::now(), start, "a timer woke the relay");
    }

    /// A record the own layer refuses ends the flow as a `record_layer` failure, with the
    /// bad_record_mac alert sealed for the peer.
    #[tokio::test]
    async fn a_tampered_record_is_a_record_layer_failure() {
        let (mut client, mut relay, _app_far, mut peer_far, config) = own_layer_relay().await;
        relay.take_over().unwrap();
        assert!(
            matches!(relay.layer, Layer::Own(_)),
            "the own layer took over"
        );

        client.writer().write_all(b"tampered").unwrap();
        let mut record = Vec::new();
        client.write_tls(&mut record).unwrap();
        record[record::HEADER_LEN + 2] ^= 1;
        peer_far.write_all(&record).await.unwrap();
        let mut idle = IdleTimer::new(config.idle_timeout);
        let e = tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| relay.poll(cx, &mut idle, config)),
        )
        .await
        .expect("the relay ended")
        .expect_err("a tampered record fails the flow");
        assert!(
            matches!(e, RelayError::RecordLayer(RecordError::BadRecordMac)),
            "{e:?}"
        );
        assert_eq!(e.reason(), "record_layer");
        assert!(
            !relay.alert.is_empty(),
            "bad_record_mac sealed for the peer"
        );
    }

    /// The app leg's write takes one slice by `send` and several by `writev`; either way a
    /// short write (an app that does not read) returns what went, the next call waits for the
    /// socket with the waker kept instead of trying again, and once the app reads every byte
    /// arrives in order.
    #[tokio::test]
    async fn a_short_write_of_one_slice_or_several_waits_for_the_app() {
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        for slices in [1usize, 3] {
            let (app, mut app_far) = tcp_pair().await;
            let wakes = Arc::new(Wakes::default());
            let waker = std::task::Waker::from(Arc::clone(&wakes));
            let mut cx = Context::from_waker(&waker);
            let cut = |from: usize| -> Vec<IoSlice<'_>> {
                let rest = &data[from..];
                rest.chunks(rest.len().div_ceil(slices).max(1))
                    .map(IoSlice::new)
                    .collect()
            };
            let mut sent = 0;
            loop {
                let bufs = cut(sent);
                match poll_write_vectored(&app, &mut cx, &bufs) {
                    Poll::Ready(Ok(n)) => {
                        assert!(n > 0, "{slices} slice(s): a write of nothing");
                        sent += n;
                        assert!(
                            sent < data.len(),
                            "{slices} slice(s): the app took 8 MiB unread"
                        );
                    }
                    Poll::Ready(Err(e)) => panic!("{slices} slice(s): {e}"),
                    Poll::Pending => break,
                }
            }
            let before = wakes.0.load(std::sync::atomic::Ordering::SeqCst);
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                app_far.read_to_end(&mut got).await.unwrap();
                got
            });
            woken(&wakes, before, "the app's reads").await;
            let mut app = app;
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            while sent < data.len() {
                let bufs = cut(sent);
                match poll_write_vectored(&app, &mut cx, &bufs) {
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => panic!("{slices} slice(s): {e}"),
                    Poll::Pending => tokio::task::yield_now().await,
                }
            }
            app.shutdown().await.unwrap();
            let got = reader.await.unwrap();
            assert!(got == data, "{slices} slice(s): the app got other bytes");
        }
    }
}
