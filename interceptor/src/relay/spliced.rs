//! Two plain TCP legs joined by `splice(2)` through one pipe per direction: the same-node
//! fast path's relay. The bytes go socket → pipe → socket inside the kernel (no copy into
//! the agent), with exact half-close, the idle timeout and byte counts of every relay.
//!
//! With the sk_msg leg join ([`Join`], `tuning.sameNodeJoin: skMsg`) the apps' bytes mostly
//! bypass this relay: the join program sends them out of the other leg inside the app's
//! `sendmsg`. What it passes (bytes sent before the agent allowed the join, and whatever it
//! sends while the outgoing leg has no room) arrives here as before; after writing it on, the
//! relay publishes how far it got and how much room the leg has, which lets the program
//! redirect again only behind everything relayed. What the program redirected joins the
//! flow's byte counts when the relay looks (idle checks, before each half-close, at the end):
//! read off the outgoing leg, the agent's own socket, as everything it queued less what the
//! relay wrote, because the app socket's entry in the program's map goes with the socket,
//! which can close before the relay looks.
//!
//! Readiness follows the kTLS relay's rule (see `kernel.rs`): a non-blocking splice that
//! returns `EAGAIN` while its pipe holds data may have met a full pipe rather than an empty
//! source, so the source's readiness is kept and the drain side decides what to wait for.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering},
    task::{Context, Poll},
};

use interceptor_common::{JOIN_EGRESS, JoinGrant, LegKey};
use tokio::{io::Interest, net::TcpStream};
use tracing::debug;

use crate::datapath::JoinMaps;

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
    /// Bytes written into the destination.
    written: u64,
    /// Carries the client's bytes (toward the peer leg).
    up: bool,
}

impl Lane {
    fn new(size: usize, up: bool) -> io::Result<Lane> {
        let (r, w) = ksys::pipe2(true)?;
        let cap = sys::set_pipe_size(w.as_fd(), size.min(MAX_PIPE)).unwrap_or(DEFAULT_PIPE);
        Ok(Lane {
            r,
            w,
            cap,
            in_pipe: 0,
            eof: false,
            shut: false,
            written: 0,
            up,
        })
    }

    /// Moves what it can from `src` to `dst`; `Ok(true)` when something moved or ended.
    /// Registers `cx` for what it waits on when it returns `Ok(false)`.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &AtomicU64,
        cx: &mut Context<'_>,
        moved: &mut usize,
        join: Option<&Join>,
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
                    self.written += n as u64;
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if self.eof && self.in_pipe == 0 && !self.shut {
            if let Some(join) = join {
                // The source's FIN came after every byte it redirected, and ours must not
                // be counted as one.
                join.collect(self.up, self.written, dst, true);
            }
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

/// One direction of the sk_msg leg join: the app socket whose bytes it carries, seen from
/// the app, and how far the relay published.
struct JoinSide {
    app: LegKey,
    /// What the outgoing leg had queued when the join was armed (the kernel counts the
    /// handshake into it, and bytes the agent wrote before the relay began).
    base: u64,
    published: u64,
    /// What the program had redirected at the last look (already in the flow's counts).
    redirected: u64,
    /// The direction's FIN went out: its count is final (and the outgoing leg's counter
    /// would count the FIN once acknowledged).
    done: bool,
}

/// A flow's sk_msg leg join, from arming to disarming (on drop, so a cancelled relay
/// disarms too). The relay hands it the outgoing leg of a direction when it counts, since a
/// direction's redirected bytes are in that leg's send queue (see [`Join::collect`]).
pub struct Join {
    maps: Arc<Mutex<JoinMaps>>,
    stats: Arc<super::RelayStats>,
    /// The client app's socket: its bytes leave by the peer leg.
    up: Mutex<JoinSide>,
    /// The server app's socket: its bytes leave by the app leg.
    down: Mutex<JoinSide>,
}

impl Join {
    /// `client` is the app socket on the far end of `app`, `server` the one on the far end of
    /// `peer`. Arms both directions with nothing relayed yet: bytes the apps sent before
    /// this make the program pass until the relay has written them on.
    pub fn arm(
        maps: Arc<Mutex<JoinMaps>>,
        stats: Arc<super::RelayStats>,
        app: &TcpStream,
        peer: &TcpStream,
        client: LegKey,
        server: LegKey,
    ) -> Result<Join, crate::datapath::DatapathError> {
        let side = |app, out: &TcpStream| {
            Mutex::new(JoinSide {
                app,
                base: crate::sys::tcp_bytes_queued(out.as_fd()).unwrap_or(0),
                published: 0,
                redirected: 0,
                done: false,
            })
        };
        let join = Join {
            maps,
            stats,
            up: side(client, peer),
            down: side(server, app),
        };
        {
            let mut maps = join.lock();
            for (key, out) in [(client, peer), (server, app)] {
                let granted = crate::sys::tcp_send_room(out.as_fd()).unwrap_or(0);
                let grant = JoinGrant {
                    relayed: 0,
                    granted,
                    kind: JOIN_EGRESS,
                };
                maps.arm(key, out.as_fd(), grant)?;
            }
        }
        Ok(join)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JoinMaps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds what the program redirected in one direction since the last look to the flow's
    /// counts; `true` when it grew. `out` is the direction's outgoing leg and `written` what
    /// the relay wrote into it: the program's redirects go into the same send queue, inside
    /// the app's `sendmsg`, so the leg's count of everything queued less `written` is what it
    /// redirected, exact at any moment the relay is not writing. `last` freezes the count
    /// (called before the direction's FIN is queued).
    fn collect(&self, up: bool, written: u64, out: &TcpStream, last: bool) -> bool {
        let (side, counter) = if up {
            (&self.up, &self.stats.app_to_peer)
        } else {
            (&self.down, &self.stats.peer_to_app)
        };
        let mut side = side.lock().unwrap_or_else(|p| p.into_inner());
        if side.done {
            return false;
        }
        side.done = last;
        let Ok(queued) = crate::sys::tcp_bytes_queued(out.as_fd()) else {
            return false;
        };
        let redirected = queued.saturating_sub(side.base).saturating_sub(written);
        if redirected <= side.redirected {
            return false;
        }
        counter.fetch_add(redirected - side.redirected, Ordering::Relaxed);
        side.redirected = redirected;
        true
    }

    /// After the relay wrote `written` bytes of a direction into `out`: lets the program
    /// redirect again behind them, into the room `out` has. Only called when `written`
    /// grew, i.e. while the program is passing (it saw `passed` ahead of the last
    /// `relayed`), so its redirected count cannot move under this.
    fn publish(&self, up: bool, written: u64, out: &TcpStream) {
        let side = if up { &self.up } else { &self.down };
        let mut side = side.lock().unwrap_or_else(|p| p.into_inner());
        if written == side.published {
            return;
        }
        let mut maps = self.lock();
        let Some(sent) = maps.sent(side.app) else {
            return;
        };
        let room = crate::sys::tcp_send_room(out.as_fd()).unwrap_or(0);
        let grant = JoinGrant {
            relayed: written,
            granted: sent.redirected.saturating_add(room),
            kind: JOIN_EGRESS,
        };
        if let Err(e) = maps.set_grant(side.app, grant) {
            // The program keeps passing: the flow stays on this relay, correct and slower.
            debug!(error = %e, "sk_msg join grant not updated");
        }
        side.published = written;
    }
}

impl Drop for Join {
    fn drop(&mut self) {
        let mut maps = self.lock();
        for side in [&self.up, &self.down] {
            maps.disarm(side.lock().unwrap_or_else(|p| p.into_inner()).app);
        }
    }
}

/// Relays until both directions ended; a flow idle for `config.idle_timeout`, or one where
/// either socket fails, is reset on both sides. With `join`, idle means neither this relay
/// nor the join program moved a byte.
pub(super) async fn run(
    app: TcpStream,
    peer: TcpStream,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    join: Option<Join>,
) -> Result<(), RelayError> {
    let (mut up, mut down) = match (
        Lane::new(config.pipe_size, true),
        Lane::new(config.pipe_size, false),
    ) {
        (Ok(up), Ok(down)) => (up, down),
        (Err(e), _) | (_, Err(e)) => {
            reset(&app);
            reset(&peer);
            return Err(RelayError::Setup(e));
        }
    };
    let join = join.as_ref();
    let mut idle = IdleTimer::new(config.idle_timeout);
    let result = std::future::poll_fn(|cx| {
        if stats.cancelled() {
            return Poll::Ready(Ok(()));
        }
        let mut moved = 0usize;
        loop {
            let a = up.step(&app, &peer, &stats.app_to_peer, cx, &mut moved, join);
            let b = down.step(&peer, &app, &stats.peer_to_app, cx, &mut moved, join);
            let (a, b) = match (a, b) {
                (Ok(a), Ok(b)) => (a, b),
                (Err(e), _) | (_, Err(e)) => return Poll::Ready(Err(RelayError::Passthrough(e))),
            };
            if let Some(join) = join {
                join.publish(true, up.written, &peer);
                join.publish(false, down.written, &app);
            }
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
                // Whether the program moved anything since the last look.
                if join.is_some_and(|join| {
                    let a = join.collect(true, up.written, &peer, false);
                    join.collect(false, down.written, &app, false) || a
                }) {
                    idle.progressed();
                    continue;
                }
                return Poll::Ready(Err(RelayError::IdleTimeout(config.idle_timeout)));
            }
            return Poll::Pending;
        }
    })
    .await;
    if let Some(join) = join {
        join.collect(true, up.written, &peer, true);
        join.collect(false, down.written, &app, true);
    }
    // A cancelled flow (see `RelayStats::cancel`) is reset too, and ends with `Ok`.
    if result.is_err() || stats.cancelled() {
        reset(&app);
        reset(&peer);
    }
    result
}
