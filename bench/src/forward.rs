//! The `forward` mode's forwarder: the cheapest userspace relay we could write, no TLS, no
//! reactor, so the bench can measure what any three-leg userspace relay pays on this
//! topology before a byte is encrypted.
//!
//! Each accepted connection gets a dialled twin and one blocking thread per direction doing
//! `read` → `write` and nothing else: a 64 B message costs the relay one wake-up (the blocked
//! `read` returning), one `write` and the next `read` that blocks, the least a process in the
//! path can do (an event loop adds its `epoll_wait`, a splice a pipe and a second call).
//! Half-close is passed on (EOF in one direction shuts down that direction's write side
//! only), so request/response protocols that end with a shutdown keep working.
//!
//! Threads are kept for the next connection instead of exiting: a thread's context switches
//! vanish from `/proc/<pid>/task` when it exits, and the bench counts the proxies' switches
//! per round trip there; a pool also spares churn a `clone` per connection.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    thread,
};

use anyhow::{Context as _, Result, bail};

/// One listener and where its connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

impl std::str::FromStr for Route {
    type Err = anyhow::Error;

    /// `LISTEN=TARGET`, e.g. `127.0.0.1:5201=10.88.2.3:25201`.
    fn from_str(s: &str) -> Result<Self> {
        let Some((l, t)) = s.split_once('=') else {
            bail!("route {s:?}: expected LISTEN=TARGET (two socket addresses)");
        };
        Ok(Self {
            listen: l
                .parse()
                .with_context(|| format!("route {s:?}: listen address {l:?}"))?,
            target: t
                .parse()
                .with_context(|| format!("route {s:?}: target address {t:?}"))?,
        })
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.listen, self.target)
    }
}

/// Bytes per `read`: one iperf3 write (128 KiB) fits, so bulk costs one read and one write
/// per application write, as for the agent's relay.
const BUF: usize = 128 * 1024;

type Job = Box<dyn FnOnce(&Pool) + Send>;

/// Threads that wait for the next job when theirs is done; a job finding none idle gets a new
/// thread. Blocking copies need a thread each for as long as their connection lives, so the
/// pool grows to the most connections open at once and stays there.
#[derive(Clone)]
pub struct Pool {
    tx: Sender<Job>,
    rx: Arc<Mutex<Receiver<Job>>>,
    /// Threads waiting (or about to wait) on `rx`: each job sent consumes one.
    idle: Arc<AtomicUsize>,
    /// Threads started so far (tests read it).
    started: Arc<AtomicUsize>,
}

impl Default for Pool {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            tx,
            rx: Arc::new(Mutex::new(rx)),
            idle: Arc::new(AtomicUsize::new(0)),
            started: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Pool {
    /// Runs `job` on an idle thread, or on a new one when none is idle.
    pub fn run(&self, job: impl FnOnce(&Pool) + Send + 'static) {
        let job: Job = Box::new(job);
        let claimed = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if claimed {
            // A claimed thread is waiting on (or about to take) the channel; it lives as long
            // as the pool, so the send cannot fail.
            let _ = self.tx.send(job);
            return;
        }
        self.started.fetch_add(1, Ordering::Relaxed);
        let pool = self.clone();
        thread::spawn(move || {
            job(&pool);
            loop {
                pool.idle.fetch_add(1, Ordering::AcqRel);
                let next = pool
                    .rx
                    .lock()
                    .map_err(drop)
                    .and_then(|rx| rx.recv().map_err(drop));
                match next {
                    Ok(job) => job(&pool),
                    Err(()) => return,
                }
            }
        });
    }

    pub fn threads(&self) -> usize {
        self.started.load(Ordering::Relaxed)
    }
}

/// Binds every route's listener (all before any is served, so a bad address fails the start
/// rather than a later connection), then serves them until the process is killed.
pub fn run(routes: &[Route]) -> Result<()> {
    let listeners = bind(routes)?;
    let pool = Pool::default();
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|(l, target)| {
            let pool = pool.clone();
            thread::spawn(move || serve(&l, target, &pool))
        })
        .collect();
    for h in handles {
        // `serve` returns only when accepting fails for good.
        h.join()
            .map_err(|_| anyhow::anyhow!("an accept thread panicked"))??;
    }
    Ok(())
}

pub fn bind(routes: &[Route]) -> Result<Vec<(TcpListener, SocketAddr)>> {
    if routes.is_empty() {
        bail!("no route given (--route LISTEN=TARGET)");
    }
    routes
        .iter()
        .map(|r| {
            let l = TcpListener::bind(r.listen).with_context(|| format!("bind {}", r.listen))?;
            Ok((l, r.target))
        })
        .collect()
}

/// Accepts on `listener` and relays each connection to `target` until accepting fails.
pub fn serve(listener: &TcpListener, target: SocketAddr, pool: &Pool) -> Result<()> {
    loop {
        let (down, _) = match listener.accept() {
            Ok(c) => c,
            // A connection that was reset while queued, or a transient shortage: the next
            // one may be fine.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                ) || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) =>
            {
                continue;
            }
            Err(e) => return Err(e).context("accept"),
        };
        pool.run(move |pool| {
            // A target that refuses: the client sees its connection closed, as behind any
            // proxy whose upstream is down.
            if let Err(e) = relay(down, target, pool) {
                eprintln!("forward to {target}: {e:#}");
            }
        });
    }
}

/// Dials `target` for the accepted `down` and copies both directions, this thread one and a
/// pool thread the other. Returns when the dial failed or this thread's direction ended.
pub fn relay(down: TcpStream, target: SocketAddr, pool: &Pool) -> Result<()> {
    let up = TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
    // Small messages go out at once, as every proxy in this bench sends them.
    down.set_nodelay(true)?;
    up.set_nodelay(true)?;
    let (down2, up2) = (down.try_clone()?, up.try_clone()?);
    pool.run(move |_| copy(up2, down2));
    copy(down, up);
    Ok(())
}

/// `read` → `write` from `from` to `to` until EOF (then shuts down `to`'s write side only:
/// the other direction may still be talking) or an error (then both sockets entirely, so the
/// thread blocked on the other direction wakes up).
fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{Ipv4Addr, TcpListener, TcpStream},
        thread,
        time::Duration,
    };

    use super::*;

    /// A forwarder in front of `upstream`, on an ephemeral loopback port.
    fn forwarder(upstream: SocketAddr) -> SocketAddr {
        forwarder_with(upstream, Pool::default())
    }

    fn forwarder_with(upstream: SocketAddr, pool: Pool) -> SocketAddr {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || serve(&l, upstream, &pool));
        addr
    }

    fn timeouts(s: &TcpStream) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    }

    /// A pattern no shifted or dropped chunk reproduces.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    /// Both directions at once, several times the buffer each way, bytes compared whole;
    /// then each side's EOF arrives at the other after its last byte.
    #[test]
    fn both_directions_arrive_intact_and_end_with_eof() {
        let up = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let up_addr = up.local_addr().unwrap();
        let to_server = pattern(3 * BUF + 17, 1);
        let to_client = pattern(2 * BUF + 5, 2);
        let (want_s, send_c) = (to_server.clone(), to_client.clone());
        let server = thread::spawn(move || {
            let (mut s, peer) = up.accept().unwrap();
            timeouts(&s);
            let mut w = s.try_clone().unwrap();
            let writer = thread::spawn(move || {
                w.write_all(&send_c).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            writer.join().unwrap();
            assert!(
                got == want_s,
                "server got {} bytes, not the pattern",
                got.len()
            );
            peer
        });
        let fwd = forwarder(up_addr);
        let mut c = TcpStream::connect(fwd).unwrap();
        timeouts(&c);
        let mut w = c.try_clone().unwrap();
        let send_s = to_server.clone();
        let writer = thread::spawn(move || {
            w.write_all(&send_s).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert!(
            got == to_client,
            "client got {} bytes, not the pattern",
            got.len()
        );
        // The server's peer is the forwarder's dialled socket, not the client.
        let peer = server.join().unwrap();
        assert_ne!(peer, c.local_addr().unwrap());
    }

    /// The client shuts down its write side after the request; the server reads to EOF and
    /// only then answers, over the direction that is still open.
    #[test]
    fn half_close_keeps_the_other_direction_open() {
        let up = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let up_addr = up.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = up.accept().unwrap();
            timeouts(&s);
            let mut req = Vec::new();
            s.read_to_end(&mut req).unwrap();
            let answer = format!("got {} bytes: {}", req.len(), String::from_utf8_lossy(&req));
            s.write_all(answer.as_bytes()).unwrap();
        });
        let mut c = TcpStream::connect(forwarder(up_addr)).unwrap();
        timeouts(&c);
        c.write_all(b"request").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "got 7 bytes: request");
        server.join().unwrap();
    }

    /// Small messages go back and forth one at a time (the rr64 shape) in order, each a
    /// separate write the forwarder must not hold back.
    #[test]
    fn ping_pong_messages_cross_one_at_a_time() {
        let up = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let up_addr = up.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = up.accept().unwrap();
            let mut m = [0u8; 64];
            while s.read_exact(&mut m).is_ok() {
                m[0] = m[0].wrapping_add(1);
                s.write_all(&m).unwrap();
            }
        });
        let mut c = TcpStream::connect(forwarder(up_addr)).unwrap();
        timeouts(&c);
        for i in 0..200u8 {
            let mut m = [i; 64];
            c.write_all(&m).unwrap();
            c.read_exact(&mut m).unwrap();
            assert_eq!(m[0], i.wrapping_add(1));
            assert!(m[1..].iter().all(|b| *b == i));
        }
    }

    /// A target that refuses: the client's connection is closed (EOF or reset), not left
    /// hanging, and the forwarder keeps serving the next one.
    #[test]
    fn a_refused_dial_closes_the_client_and_serving_goes_on() {
        let dead = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap()
        };
        let fwd = forwarder(dead);
        for _ in 0..2 {
            let mut c = TcpStream::connect(fwd).unwrap();
            timeouts(&c);
            let mut buf = [0u8; 8];
            match c.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => panic!("{n} bytes from a refused upstream"),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
            }
        }
    }

    /// The upstream resets mid-stream: the client's direction ends too (no thread stays
    /// blocked forever on a dead pair).
    #[test]
    fn an_upstream_reset_ends_the_client_side() {
        let up = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let up_addr = up.local_addr().unwrap();
        thread::spawn(move || {
            let (s, _) = up.accept().unwrap();
            // Closing with unread bytes in the receive queue sends RST, not FIN.
            let mut b = [0u8; 1];
            s.peek(&mut b).unwrap();
            drop(s);
        });
        let mut c = TcpStream::connect(forwarder(up_addr)).unwrap();
        timeouts(&c);
        c.write_all(b"x").unwrap();
        let mut buf = [0u8; 8];
        match c.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{n} bytes after the upstream reset"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
        }
    }

    #[test]
    fn routes_parse_and_name_what_is_wrong() {
        let r: Route = "127.0.0.1:5201=10.88.2.3:25201".parse().unwrap();
        assert_eq!(r.listen, "127.0.0.1:5201".parse().unwrap());
        assert_eq!(r.target, "10.88.2.3:25201".parse().unwrap());
        assert_eq!(r.to_string(), "127.0.0.1:5201=10.88.2.3:25201");
        let e = "127.0.0.1:5201".parse::<Route>().unwrap_err();
        assert!(format!("{e:#}").contains("LISTEN=TARGET"), "{e:#}");
        let e = "127.0.0.1:5201=nowhere".parse::<Route>().unwrap_err();
        assert!(
            format!("{e:#}").contains("target address \"nowhere\""),
            "{e:#}"
        );
        let e = bind(&[]).unwrap_err();
        assert!(format!("{e:#}").contains("no route"), "{e:#}");
    }

    /// Connections one after another reuse the threads of the ones before: the pool stays at
    /// two threads (one per direction) however many connections pass.
    #[test]
    fn sequential_connections_reuse_the_pool_threads() {
        let up = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let up_addr = up.local_addr().unwrap();
        thread::spawn(move || {
            for s in up.incoming() {
                let mut s = s.unwrap();
                let mut m = [0u8; 4];
                s.read_exact(&mut m).unwrap();
                s.write_all(&m).unwrap();
            }
        });
        let pool = Pool::default();
        let fwd = forwarder_with(up_addr, pool.clone());
        for i in 0..20u32 {
            let mut c = TcpStream::connect(fwd).unwrap();
            timeouts(&c);
            c.write_all(&i.to_le_bytes()).unwrap();
            let mut m = [0u8; 4];
            c.read_exact(&mut m).unwrap();
            assert_eq!(u32::from_le_bytes(m), i);
            c.shutdown(Shutdown::Write).unwrap();
            // EOF: both directions of this connection are done, its threads idle again.
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty());
            // The reverse copy may still be between its last write and going idle.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while pool.idle.load(Ordering::Acquire) < 2 && std::time::Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(pool.threads(), 2);
    }
}
