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

use std::{
    future::Future,
    io::{self, BufRead, IoSlice, Write},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::Connection;
use tokio::{io::AsyncWrite as _, net::TcpStream};

use super::{
    IdleTimer, RelayConfig, RelayError, RelayStats, Step, YIELD_AFTER_BYTES, await_peer_fin,
    buf::Buf, reset, wait_ready,
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
        conn,
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
            if matches!(e, RelayError::Tls(_)) {
                // Best effort: tell the peer agent why (rustls queued the alert).
                let _ = relay.conn.write_tls(&mut SocketWriter(&relay.peer));
            }
            reset(&relay.app);
            reset(&relay.peer);
        } else if relay.peer_fin_first && !relay.peer_eof {
            await_peer_fin(&relay.peer).await;
        }
        result
    }
}

struct Userspace {
    app: TcpStream,
    peer: TcpStream,
    conn: Box<Connection>,
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
            // allocator, so a quiet flow holds no buffer.
            self.up.release();
            self.tls_in.release();
            self.down.release();
            return Poll::Pending;
        }
    }

    fn app_to_peer(&mut self, cx: &mut Context<'_>, moved: &mut usize) -> Result<bool, RelayError> {
        let mut progress = false;

        if !self.up.is_empty() {
            let n = self
                .conn
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
            self.conn.send_close_notify();
            self.close_notify_queued = true;
            progress = true;
        }

        while self.conn.wants_write() {
            if self.peer_write_shut {
                // Only something rustls wants to say after our close_notify (a KeyUpdate
                // reply); TLS 1.3 lets the peer ignore its absence.
                let _ = self.conn.write_tls(&mut io::sink());
                continue;
            }
            match self.conn.write_tls(&mut SocketWriter(&self.peer)) {
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

        if self.close_notify_queued && !self.conn.wants_write() && !self.peer_write_shut {
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
            progress |= self.decrypt_into_down(cx, moved)?;
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
        let mut progress = false;
        loop {
            if self.down.is_empty() {
                self.down.clear();
            }
            if self.down.spare_len() == 0 {
                return Ok(progress);
            }
            let conn = &mut self.conn;
            match self.down.fill(|v| read_plaintext(conn, v)) {
                Ok(0) => {
                    // close_notify, after every byte before it.
                    self.peer_closed = true;
                    return Ok(true);
                }
                Ok(_) => {
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
                let n = self
                    .conn
                    .read_tls(&mut self.tls_in.pending())
                    .map_err(RelayError::Peer)?;
                self.tls_in.consume(n);
                self.conn.process_new_packets().map_err(tls_error)?;
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
                    self.conn.read_tls(&mut &[][..]).map_err(RelayError::Peer)?;
                    self.conn.process_new_packets().map_err(tls_error)?;
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
