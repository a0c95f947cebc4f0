//! Two plain TCP legs joined by `splice(2)` through one pipe per direction: the same-node
//! fast path's relay. The bytes go socket → pipe → socket inside the kernel (no copy into
//! the agent), with exact half-close, the idle timeout and byte counts of every relay.
//!
//! Readiness follows the kTLS relay's rule (see `kernel.rs`): a non-blocking splice that
//! returns `EAGAIN` while its pipe holds data may have met a full pipe rather than an empty
//! source, so the source's readiness is kept and the drain side decides what to wait for.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    task::{Context, Poll},
};

use tokio::{io::Interest, net::TcpStream};

use super::{IdleTimer, RelayConfig, RelayError, RelayStats, YIELD_AFTER_BYTES, reset};
use crate::{
    ktls::sys::{self as ksys, SpliceFlags},
    sys,
};

/// Linux's default pipe size, if resizing is refused.
const DEFAULT_PIPE: usize = 64 << 10;
/// Bound on the pipe size.
const MAX_PIPE: usize = 1 << 20;

fn flags() -> SpliceFlags {
    SpliceFlags::NONBLOCK | SpliceFlags::MOVE
}

/// One direction: its pipe, what sits in it, and how far its end of stream got.
struct Lane {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
    in_pipe: usize,
    /// The source sent FIN.
    eof: bool,
    /// FIN passed on to the destination.
    shut: bool,
}

impl Lane {
    fn new(size: usize) -> io::Result<Lane> {
        let (r, w) = ksys::pipe2(true)?;
        let cap = sys::set_pipe_size(w.as_fd(), size.min(MAX_PIPE)).unwrap_or(DEFAULT_PIPE);
        Ok(Lane {
            r,
            w,
            cap,
            in_pipe: 0,
            eof: false,
            shut: false,
        })
    }

    /// Moves what it can from `src` to `dst`; `Ok(true)` when something moved or ended.
    /// Registers `cx` for what it waits on when it returns `Ok(false)`.
    fn step(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &AtomicU64,
        cx: &mut Context<'_>,
        moved: &mut usize,
    ) -> io::Result<bool> {
        let mut progress = false;
        if !self.eof && self.in_pipe < self.cap {
            let (w, room, in_pipe) = (&self.w, self.cap - self.in_pipe, self.in_pipe);
            let filled = src.try_io(Interest::READABLE, || {
                match ksys::splice(src.as_fd(), w.as_fd(), room, flags()) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && in_pipe > 0 => Ok(None),
                    r => r.map(Some),
                }
            });
            match filled {
                Ok(Some(0)) => {
                    self.eof = true;
                    progress = true;
                }
                Ok(Some(n)) => {
                    self.in_pipe += n;
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    *moved += n;
                    progress = true;
                }
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if self.in_pipe > 0 {
            let (r, in_pipe) = (&self.r, self.in_pipe);
            match dst.try_io(Interest::WRITABLE, || {
                ksys::splice(r.as_fd(), dst.as_fd(), in_pipe, flags())
            }) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "splice into the socket moved nothing",
                    ));
                }
                Ok(n) => {
                    self.in_pipe -= n;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if self.eof && self.in_pipe == 0 && !self.shut {
            super::shutdown_write(dst)?;
            self.shut = true;
            progress = true;
        }
        if progress {
            return Ok(true);
        }
        // Nothing moved: wait for what can unblock this lane.
        let ready = if self.in_pipe > 0 {
            dst.poll_write_ready(cx)
        } else if !self.eof {
            src.poll_read_ready(cx)
        } else {
            Poll::Pending
        };
        match ready {
            Poll::Ready(Ok(())) => Ok(true),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(false),
        }
    }
}

/// Relays until both directions ended; a flow idle for `config.idle_timeout`, or one where
/// either socket fails, is reset on both sides.
pub(super) async fn run(
    app: TcpStream,
    peer: TcpStream,
    config: RelayConfig,
    stats: Arc<RelayStats>,
) -> Result<(), RelayError> {
    let (mut up, mut down) = match (Lane::new(config.pipe_size), Lane::new(config.pipe_size)) {
        (Ok(up), Ok(down)) => (up, down),
        (Err(e), _) | (_, Err(e)) => {
            reset(&app);
            reset(&peer);
            return Err(RelayError::Setup(e));
        }
    };
    let mut idle = IdleTimer::new(config.idle_timeout);
    let result = std::future::poll_fn(|cx| {
        let mut moved = 0usize;
        loop {
            let a = up.step(&app, &peer, &stats.app_to_peer, cx, &mut moved);
            let b = down.step(&peer, &app, &stats.peer_to_app, cx, &mut moved);
            let (a, b) = match (a, b) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => return Poll::Ready(Err(RelayError::Passthrough(e))),
            };
            if up.shut && down.shut {
                return Poll::Ready(Ok(()));
            }
            if a || b {
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
    })
    .await;
    if result.is_err() {
        reset(&app);
        reset(&peer);
    }
    result
}
