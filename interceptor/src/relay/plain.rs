//! Plaintext passthrough (a destination outside the mesh, or plaintext a policy allows): the
//! kernel's copy with exact half-close both ways, under the same idle timeout and byte counts
//! as the TLS relays. Without the timeout a peer that goes silent holds two sockets in the
//! agent for ever.

use std::{
    future::Future as _,
    io,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{IdleTimer, RelayConfig, RelayError, RelayStats, reset};

/// One end of the passthrough, adding what is read from it to a byte counter.
struct Counted<'a> {
    sock: &'a mut TcpStream,
    counter: &'a std::sync::atomic::AtomicU64,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.sock).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.sock).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.sock).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.sock).poll_shutdown(cx)
    }
}

/// Copies both ways until both sides closed; a flow idle for `config.idle_timeout`, or one
/// where either socket fails, is reset on both sides.
pub(super) async fn run(
    mut app: TcpStream,
    mut peer: TcpStream,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
    let moved = |s: &RelayStats| s.bytes_app_to_peer() + s.bytes_peer_to_app();
    let result = {
        let mut a = Counted {
            sock: &mut app,
            counter: &stats.app_to_peer,
        };
        let mut b = Counted {
            sock: &mut peer,
            counter: &stats.peer_to_app,
        };
        let mut copy = std::pin::pin!(tokio::io::copy_bidirectional(&mut a, &mut b));
        let mut idle = IdleTimer::new(config.idle_timeout);
        let mut seen = 0;
        std::future::poll_fn(|cx| {
            if stats.cancelled() {
                return Poll::Ready(Ok(()));
            }
            if let Poll::Ready(r) = copy.as_mut().poll(cx) {
                return Poll::Ready(r.map(|_| ()).map_err(RelayError::Passthrough));
            }
            let now = moved(&stats);
            if now != seen {
                seen = now;
                idle.progressed();
            }
            match idle.poll_expired(cx) {
                Poll::Ready(()) => Poll::Ready(Err(RelayError::IdleTimeout(config.idle_timeout))),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    };
    // A cancelled flow (see `RelayStats::cancel`) is reset too, and ends with `Ok`.
    if result.is_err() || stats.cancelled() {
        reset(&app);
        reset(&peer);
    }
    result
}
