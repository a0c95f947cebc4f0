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
//! rustls: from then on [`record::RecordLayer`] seals `up` straight into `tls_out` and opens
//! records in place in `tls_in`, so an idle flow holds two AEAD contexts and no buffer.

use std::{
    future::Future,
    io::{self, BufRead, IoSlice, Write},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::{AlertDescription, Connection};
use tokio::{io::AsyncWrite as _, net::TcpStream};

use super::{
    IdleTimer, RelayConfig, RelayError, RelayStats, Step, YIELD_AFTER_BYTES, await_peer_fin,
    buf::Buf,
    record::{self, Boundary, Opened, RecordError, RecordLayer},
    reset, wait_ready,
};

/// Builds the relay's state now; the future owns only that state. `leftover` is plaintext
/// for the app, `leftover_tls` records from the peer not yet given to `conn`; both precede
/// anything on the sockets.
pub(super) fn run(
    app: TcpStream,
    peer: TcpStream,
    mut conn: Box<Connection>,
    leftover: Vec<u8>,
    leftover_tls: Vec<u8>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> impl Future<Output = Result<(), RelayError>> + Send {
    let size = config.buffer_size.max(16 << 10);
    conn.set_buffer_limit(Some(size));
    let mut relay = Userspace {
        app,
        peer,
        layer: Layer::Rustls(conn),
        fed: Boundary::default(),
        peer_data_seen: false,
        tls_out: Vec::new(),
        tls_out_sent: 0,
        out_limit: size,
        opened: None,
        alert: Vec::new(),
        stats,
        up: Buf::new(size),
        app_eof: false,
        close_notify_queued: false,
        peer_write_shut: false,
        peer_fin_first: config.peer_fin_first,
        tls_in: Buf::with_content(leftover_tls, size),
        down: Buf::with_content(leftover, size),
        peer_eof: false,
        peer_closed: false,
        app_write_shut: false,
    };
    async move {
        let mut idle = IdleTimer::new(config.idle_timeout);
        let result = std::future::poll_fn(|cx| relay.poll(cx, &mut idle, config)).await;
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

/// Plaintext of an opened record still in `tls_in`, not yet copied to `down`.
#[derive(Clone, Copy)]
struct OpenedData {
    from: usize,
    to: usize,
    record_len: usize,
}

struct Userspace {
    app: TcpStream,
    peer: TcpStream,
    layer: Layer,
    /// Where the bytes given to rustls stand against record boundaries.
    fed: Boundary,
    /// rustls returned plaintext at least once: any session ticket came before it.
    peer_data_seen: bool,
    /// Own layer: sealed records not yet sent, from `tls_out_sent` on.
    tls_out: Vec<u8>,
    tls_out_sent: usize,
    /// Own layer: how much to seal ahead of the socket (the configured buffer size).
    out_limit: usize,
    /// Own layer: plaintext opened in place in `tls_in`.
    opened: Option<OpenedData>,
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
    /// Plaintext from the peer not yet written to the app.
    down: Buf,
    peer_eof: bool,
    /// close_notify received: no more data will come from the peer.
    peer_closed: bool,
    app_write_shut: bool,
}

impl Userspace {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        idle: &mut IdleTimer,
        config: RelayConfig,
    ) -> Poll<Result<(), RelayError>> {
        let mut moved = 0usize;
        loop {
            let mut progress = false;
            progress |= self.app_to_peer(cx, &mut moved)?;
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
            if idle.poll_expired(cx).is_ready() {
                return Poll::Ready(Err(RelayError::IdleTimeout(config.idle_timeout)));
            }
            // Both directions wait for their sockets: whatever is drained goes back to the
            // allocator, so a quiet flow holds no buffer, and rustls goes once it can (mesh
            // sessions only: see `RelayConfig::own_record_layer`).
            if config.own_record_layer {
                self.take_over()?;
            }
            self.up.release();
            self.tls_in.release();
            self.down.release();
            if self.tls_out_sent == self.tls_out.len() {
                self.tls_out = Vec::new();
                self.tls_out_sent = 0;
            }
            return Poll::Pending;
        }
    }

    fn app_to_peer(&mut self, cx: &mut Context<'_>, moved: &mut usize) -> Result<bool, RelayError> {
        let mut progress = match &mut self.layer {
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

        if !self.app_eof && self.up.is_empty() {
            self.up.clear();
            let app = &self.app;
            match self.up.fill(|v| app.try_read_buf(v)) {
                Ok(0) => {
                    self.app_eof = true;
                    progress = true;
                }
                Ok(n) => {
                    *moved += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Step::Progress =
                        wait_ready(self.app.poll_read_ready(cx)).map_err(RelayError::App)?
                    {
                        progress = true;
                    }
                }
                Err(e) => return Err(RelayError::App(e)),
            }
        }
        Ok(progress)
    }

    /// Records still to send toward the peer.
    fn wants_write(&self) -> bool {
        match &self.layer {
            Layer::Rustls(conn) => conn.wants_write(),
            Layer::Own(_) | Layer::Moving => self.tls_out_sent < self.tls_out.len(),
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
            while self.tls_out_sent < self.tls_out.len() {
                match self.peer.try_write(&self.tls_out[self.tls_out_sent..]) {
                    Ok(n) => {
                        self.tls_out_sent += n;
                        *moved += n;
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match wait_ready(self.peer.poll_write_ready(cx))
                            .map_err(RelayError::Peer)?
                        {
                            Step::Progress => continue,
                            Step::Idle => return Ok(progress),
                        }
                    }
                    Err(e) => return Err(RelayError::Peer(e)),
                }
            }
            self.tls_out.clear();
            self.tls_out_sent = 0;

            if !self.up.is_empty() {
                if self.tls_out.capacity() == 0 {
                    let records = self.up.pending().len().div_ceil(record::MAX_PLAINTEXT);
                    let want = (records * record::MAX_RECORD).min(self.out_limit);
                    self.tls_out.reserve_exact(want.max(record::MAX_RECORD));
                }
                while !self.up.is_empty()
                    && self.tls_out.len() + record::MAX_RECORD <= self.tls_out.capacity()
                {
                    let n = self.up.pending().len().min(record::MAX_PLAINTEXT);
                    layer
                        .seal_data(&self.up.pending()[..n], &mut self.tls_out)
                        .map_err(sealing_error)?;
                    self.up.consume(n);
                    self.stats.add_app_to_peer(n);
                }
                progress = true;
                continue;
            }
            if self.app_eof && !self.close_notify_queued {
                layer
                    .seal_alert(AlertDescription::CloseNotify, &mut self.tls_out)
                    .map_err(sealing_error)?;
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
        self.layer = Layer::Own(Box::new(own));
        // Whole records only from here on: the buffer must be able to hold the largest one.
        // (`tls_in` is empty here; `down` may still hold plaintext for a slow app and stays.)
        self.tls_in = Buf::new(self.out_limit.max(record::MAX_RECORD));
        Ok(())
    }

    fn peer_to_app(&mut self, cx: &mut Context<'_>, moved: &mut usize) -> Result<bool, RelayError> {
        let mut progress = false;

        if !self.down.is_empty() {
            match self.app.try_write(self.down.pending()) {
                Ok(n) => {
                    self.down.consume(n);
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

        if !self.peer_closed {
            progress |= match self.layer {
                Layer::Rustls(_) => self.decrypt_into_down(cx, moved)?,
                Layer::Own(_) => self.open_into_down(cx, moved)?,
                Layer::Moving => return Err(RelayError::Tls(lost_session())),
            };
        }

        if self.peer_closed && self.down.is_empty() && !self.app_write_shut {
            shutdown_write(&mut self.app, cx).map_err(RelayError::App)?;
            self.app_write_shut = true;
            progress = true;
        }
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
            let peer = &self.peer;
            match self.tls_in.fill(|v| peer.try_read_buf(v)) {
                Ok(0) => {
                    self.peer_eof = true;
                    // An empty read tells rustls the transport ended; it then reports clean
                    // close (after close_notify) or truncation through the reader.
                    conn.read_tls(&mut &[][..]).map_err(RelayError::Peer)?;
                    conn.process_new_packets().map_err(tls_error)?;
                    progress = true;
                }
                Ok(n) => {
                    *moved += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match wait_ready(self.peer.poll_read_ready(cx)).map_err(RelayError::Peer)? {
                        Step::Progress => continue,
                        Step::Idle => return Ok(progress),
                    }
                }
                Err(e) => return Err(RelayError::Peer(e)),
            }
        }
    }
    /// Own layer: fills `down` with the plaintext of whole records, reading ciphertext as
    /// needed, until `down` is full, the peer has nothing more for now, or it closed.
    fn open_into_down(
        &mut self,
        cx: &mut Context<'_>,
        moved: &mut usize,
    ) -> Result<bool, RelayError> {
        let Layer::Own(layer) = &mut self.layer else {
            return Ok(false);
        };
        let mut progress = false;
        loop {
            if self.down.is_empty() {
                self.down.clear();
            }
            if let Some(open) = self.opened {
                let room = self.down.spare_len();
                if room == 0 {
                    return Ok(progress);
                }
                let plain = &self.tls_in.pending()[open.from..open.to];
                let n = plain.len().min(room);
                self.down
                    .fill(|v| {
                        v.extend_from_slice(&plain[..n]);
                        Ok(n)
                    })
                    .map_err(RelayError::App)?;
                if n == plain.len() {
                    self.tls_in.consume(open.record_len);
                    self.opened = None;
                } else {
                    self.opened = Some(OpenedData {
                        from: open.from + n,
                        ..open
                    });
                }
                progress = true;
                continue;
            }

            match record::record_len(self.tls_in.pending()) {
                Ok(Some(len)) => {
                    match layer.open(&mut self.tls_in.pending_mut()[..len]) {
                        Ok(Opened::Data(n)) => {
                            self.opened = Some(OpenedData {
                                from: record::HEADER_LEN,
                                to: record::HEADER_LEN + n,
                                record_len: len,
                            });
                        }
                        Ok(Opened::Nothing) => self.tls_in.consume(len),
                        Ok(Opened::CloseNotify) => {
                            self.tls_in.consume(len);
                            self.peer_closed = true;
                            return Ok(true);
                        }
                        Err(e) => return Err(self.refuse(e)),
                    }
                    progress = true;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(self.refuse(e)),
            }
            if self.peer_eof {
                // The stream ended without close_notify, possibly inside a record.
                return Err(RelayError::Truncated);
            }

            if self.tls_in.is_empty() {
                self.tls_in.clear();
            } else {
                self.tls_in.make_room(record::MAX_RECORD);
            }
            let peer = &self.peer;
            match self.tls_in.fill(|v| peer.try_read_buf(v)) {
                Ok(0) => {
                    self.peer_eof = true;
                    progress = true;
                }
                Ok(n) => {
                    *moved += n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match wait_ready(self.peer.poll_read_ready(cx)).map_err(RelayError::Peer)? {
                        Step::Progress => continue,
                        Step::Idle => return Ok(progress),
                    }
                }
                Err(e) => return Err(RelayError::Peer(e)),
            }
        }
    }

    /// Ends the flow for a record the peer should not have sent: seals the alert to send
    /// (best effort, only behind whole records) and names the failure.
    fn refuse(&mut self, e: RecordError) -> RelayError {
        if let (Layer::Own(layer), Some(alert)) = (&mut self.layer, e.alert())
            && self.tls_out_sent == self.tls_out.len()
        {
            let _ = layer.seal_alert(alert, &mut self.alert);
        }
        record_error(e)
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

/// A record from the peer the own layer refuses, as the relay reports it.
fn record_error(e: RecordError) -> RelayError {
    match e {
        RecordError::Alert(alert) => RelayError::PeerAlert(alert),
        RecordError::BadRecordMac => RelayError::Tls(rustls::Error::DecryptError),
        RecordError::RecordLimit(records) => RelayError::RecordLimit { records },
        e => RelayError::UnexpectedRecord {
            content_type: 23,
            detail: e.to_string(),
        },
    }
}

/// Sealing fails only at the AEAD usage limit (or for a bug, reported as is).
fn sealing_error(e: RecordError) -> RelayError {
    match e {
        RecordError::RecordLimit(records) => RelayError::RecordLimit { records },
        e => RelayError::Tls(rustls::Error::General(e.to_string())),
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

/// `shutdown(SHUT_WR)` without the descriptor duplicate `super::shutdown_write` needs for a
/// shared socket: tokio's `poll_shutdown` on a TCP stream is that one system call, made at once.
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
