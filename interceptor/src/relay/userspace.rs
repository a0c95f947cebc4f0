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
    io::{self, IoSlice, Read, Write},
    sync::Arc,
    task::{Context, Poll},
};

use rustls::Connection;
use tokio::net::TcpStream;

use super::{
    IdleTimer, RelayConfig, RelayError, RelayStats, Step, YIELD_AFTER_BYTES, reset, shutdown_write,
    wait_ready,
};

pub(super) async fn run(
    app: TcpStream,
    peer: TcpStream,
    mut conn: Connection,
    leftover: Vec<u8>,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
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
        tls_in: Buf::new(size),
        down: Buf::with_content(leftover, size),
        peer_eof: false,
        peer_closed: false,
        app_write_shut: false,
    };
    let mut idle = IdleTimer::new(config.idle_timeout);
    let result = std::future::poll_fn(|cx| relay.poll(cx, &mut idle, config)).await;
    if let Err(e) = &result {
        if matches!(e, RelayError::Tls(_)) {
            // Best effort: tell the peer agent why (rustls queued the alert).
            let _ = relay.conn.write_tls(&mut SocketWriter(&relay.peer));
        }
        reset(&relay.app);
        reset(&relay.peer);
    }
    result
}

struct Userspace {
    app: TcpStream,
    peer: TcpStream,
    conn: Connection,
    stats: Arc<RelayStats>,

    /// Plaintext read from the app that rustls has not taken yet.
    up: Buf,
    app_eof: bool,
    close_notify_queued: bool,
    peer_write_shut: bool,

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
            shutdown_write(&self.peer).map_err(RelayError::Peer)?;
            self.peer_write_shut = true;
            progress = true;
        }

        if !self.app_eof && self.up.is_empty() {
            self.up.clear();
            match self.app.try_read(self.up.spare()) {
                Ok(0) => {
                    self.app_eof = true;
                    progress = true;
                }
                Ok(n) => {
                    self.up.filled(n);
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
            shutdown_write(&self.app).map_err(RelayError::App)?;
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
            if self.down.spare().is_empty() {
                return Ok(progress);
            }
            match self.conn.reader().read(self.down.spare()) {
                Ok(0) => {
                    // close_notify, after every byte before it.
                    self.peer_closed = true;
                    return Ok(true);
                }
                Ok(n) => {
                    self.down.filled(n);
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
            match self.peer.try_read(self.tls_in.spare()) {
                Ok(0) => {
                    self.peer_eof = true;
                    // An empty read tells rustls the transport ended; it then reports clean
                    // close (after close_notify) or truncation through the reader.
                    self.conn.read_tls(&mut &[][..]).map_err(RelayError::Peer)?;
                    self.conn.process_new_packets().map_err(tls_error)?;
                    progress = true;
                }
                Ok(n) => {
                    self.tls_in.filled(n);
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

fn tls_error(e: rustls::Error) -> RelayError {
    match e {
        rustls::Error::AlertReceived(alert) => RelayError::PeerAlert(alert),
        e => RelayError::Tls(e),
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

/// A fixed buffer with a consumed prefix: filled at the end, drained from the front, and only
/// rewound once empty (so no byte is ever moved within it).
struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(size: usize) -> Buf {
        Buf {
            data: vec![0u8; size].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn with_content(mut content: Vec<u8>, size: usize) -> Buf {
        let end = content.len();
        content.resize(size.max(end), 0);
        Buf {
            data: content.into_boxed_slice(),
            start: 0,
            end,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// Rewinds an empty buffer so the whole of it is spare again.
    fn clear(&mut self) {
        if self.is_empty() {
            self.start = 0;
            self.end = 0;
        }
    }

    fn spare(&mut self) -> &mut [u8] {
        &mut self.data[self.end..]
    }

    fn filled(&mut self, n: usize) {
        self.end += n;
    }
}
