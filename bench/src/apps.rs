//! The small programs the benchmark runs inside the pods, as subcommands of the bench binary:
//!
//! - `serve`: an HTTP/1.1 server (1 KiB body, keep-alive, `/peer` answers who connected) and
//!   a TCP echo server, on one tokio thread.
//! - `http-load`: an open-loop, fixed-rate HTTP/1.1 load generator (wrk2 is not packaged by
//!   Debian). Request *i* is due at `start + i/rate`, requests are dealt round-robin to the
//!   connections, and latency is measured from the *due* time, so a stall delays the
//!   following requests and is charged to them (coordinated omission corrected, as wrk2 and
//!   fortio's constant-QPS mode do).
//! - `churn`: new connection per request, one request/response each, timing connect → first
//!   response byte: through the agent or the sidecars that is the full mTLS setup.
//! - `idle`: opens N connections, exchanges one byte on each (so every flow is established end
//!   to end, mTLS included), and holds them.
//!
//! Load generators use blocking threads with a 1 ns timer slack rather than tokio's 1 ms
//! timer wheel: at 1 000 rps a millisecond of timer error would dwarf the latencies measured.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

/// Size of the HTTP response body (Istio's benchmark uses 1 kB payloads).
pub const BODY_LEN: usize = 1024;

pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 7000;

// ---------------------------------------------------------------------------------------------
// serve

/// Runs the HTTP and echo servers until killed.
pub fn serve(http: SocketAddr, echo: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
        let http_l = tokio::net::TcpListener::bind(http)
            .await
            .with_context(|| format!("bind {http}"))?;
        let echo_l = tokio::net::TcpListener::bind(echo)
            .await
            .with_context(|| format!("bind {echo}"))?;
        let h = tokio::spawn(accept_loop(http_l, Service::Http));
        let e = tokio::spawn(accept_loop(echo_l, Service::Echo));
        let (h, e) = tokio::join!(h, e);
        h.context("http accept loop")??;
        e.context("echo accept loop")??;
        anyhow::Ok(())
    })
}

#[derive(Clone, Copy)]
enum Service {
    Http,
    Echo,
}

async fn accept_loop(l: tokio::net::TcpListener, svc: Service) -> Result<()> {
    loop {
        let (s, peer) = match l.accept().await {
            Ok(x) => x,
            // EMFILE and friends: keep serving the connections we have.
            Err(e) => {
                eprintln!("serve: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let r = match svc {
                Service::Http => http_conn(s, peer).await,
                Service::Echo => echo_conn(s).await,
            };
            // Resets are normal at the end of a run.
            drop(r);
        });
    }
}

async fn echo_conn(mut s: tokio::net::TcpStream) -> io::Result<()> {
    let (mut r, mut w) = s.split();
    tokio::io::copy(&mut r, &mut w).await.map(drop)
}

async fn http_conn(mut s: tokio::net::TcpStream, peer: SocketAddr) -> io::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = vec![b'x'; BODY_LEN];
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end + 4;
            }
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let close = head.contains("connection: close");
        let path_peer = head.starts_with("get /peer ");
        buf.drain(..end);
        let payload: Vec<u8> = if path_peer {
            format!("peer={peer}\n").into_bytes()
        } else {
            body.clone()
        };
        let mut resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
            payload.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        resp.extend_from_slice(&payload);
        s.write_all(&resp).await?;
        if close {
            s.shutdown().await?;
            return Ok(());
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// HTTP client pieces

/// Reads one HTTP/1.1 response (headers + Content-Length body) from `s`, keeping any excess
/// in `buf`. Returns the body.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed before the response headers");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        bail!("unexpected response: {}", head.lines().next().unwrap_or(""));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .context("response without content-length")?;
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed inside the response body");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Ok(body)
}

/// One GET on a fresh connection; returns the body. Used for the `/peer` path check.
pub fn http_get(target: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connect {target}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut buf = Vec::new();
    let body = read_response(&mut s, &mut buf)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Minimises timer slack so `thread::sleep` wakes when asked (default slack is 50 µs).
fn precise_timers() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    /// From latencies in nanoseconds (sorted in place). Nearest-rank percentiles.
    pub fn from_ns(v: &mut [u64]) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_unstable();
        let at = |q: f64| {
            let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[idx] as f64 / 1000.0
        };
        Self {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: v[v.len() - 1] as f64 / 1000.0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// http-load

/// Result of one fixed-rate run, printed as JSON on stdout.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub measured_secs: f64,
    pub achieved_rps: f64,
    #[serde(flatten)]
    pub latency: Percentiles,
    /// How late the sender woke relative to the due time (p99, µs): the load generator's own
    /// noise floor, included in every latency above.
    pub send_lateness_p99_us: f64,
}

/// Open-loop fixed-rate HTTP/1.1 keep-alive load: `rate` requests/s in total over `conns`
/// connections for `warmup + duration`; only requests due after the warm-up are recorded.
pub fn http_load(
    target: SocketAddr,
    rate: f64,
    conns: usize,
    duration: Duration,
    warmup: Duration,
) -> Result<LoadReport> {
    if rate <= 0.0 || conns == 0 {
        bail!("rate and connections must be positive");
    }
    let total = ((warmup + duration).as_secs_f64() * rate).round() as u64;
    let warm_n = (warmup.as_secs_f64() * rate).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    // Connect everything before the clock starts.
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("connect {target}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        streams.push(s);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let lat = Arc::new(Mutex::new(Vec::with_capacity((total - warm_n) as usize)));
    let late = Arc::new(Mutex::new(Vec::with_capacity((total - warm_n) as usize)));
    let errors = Arc::new(Mutex::new(0u64));
    let mut handles = Vec::new();
    for (c, mut s) in streams.into_iter().enumerate() {
        let (lat, late, errors) = (Arc::clone(&lat), Arc::clone(&late), Arc::clone(&errors));
        handles.push(thread::spawn(move || {
            precise_timers();
            let req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
            let mut buf = Vec::with_capacity(16 * 1024);
            let mut my_lat = Vec::new();
            let mut my_late = Vec::new();
            let mut my_err = 0u64;
            let mut i = c as u64;
            while i < total {
                let due = start + interval.mul_f64(i as f64);
                let now = Instant::now();
                if due > now {
                    thread::sleep(due - now);
                }
                let sent = Instant::now();
                let ok = s.write_all(req).is_ok() && read_response(&mut s, &mut buf).is_ok();
                let done = Instant::now();
                if i >= warm_n {
                    if ok {
                        my_lat.push((done - due).as_nanos() as u64);
                        my_late.push(sent.saturating_duration_since(due).as_nanos() as u64);
                    } else {
                        my_err += 1;
                    }
                }
                if !ok {
                    // A broken connection stays broken: count the rest of its share as errors.
                    my_err += (total.saturating_sub(i) / conns as u64).saturating_sub(1);
                    break;
                }
                i += conns as u64;
            }
            if let Ok(mut l) = lat.lock() {
                l.extend(my_lat);
            }
            if let Ok(mut l) = late.lock() {
                l.extend(my_late);
            }
            if let Ok(mut e) = errors.lock() {
                *e += my_err;
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    let end = Instant::now();
    let mut lat = std::mem::take(&mut *lat.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let mut late = std::mem::take(&mut *late.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let errors = *errors.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let measured = (end - (start + warmup)).as_secs_f64();
    let requests = lat.len() as u64;
    Ok(LoadReport {
        requests,
        errors,
        measured_secs: measured,
        achieved_rps: requests as f64 / measured.max(1e-9),
        latency: Percentiles::from_ns(&mut lat),
        send_lateness_p99_us: Percentiles::from_ns(&mut late).p99_us,
    })
}

// ---------------------------------------------------------------------------------------------
// churn

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnReport {
    pub connections: u64,
    pub errors: u64,
    pub secs: f64,
    pub conn_per_s: f64,
    /// connect() start → first response byte.
    #[serde(flatten)]
    pub first_byte: Percentiles,
    /// Completed connections per second in each window, when windows were asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub window_conn_per_s: Vec<f64>,
    /// Mean connect → first byte time of the connections completed in each window (µs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub window_first_byte_mean_us: Vec<f64>,
}

/// New connection per request, closed-loop, one thread, for `duration`.
pub fn churn(target: SocketAddr, duration: Duration) -> Result<ChurnReport> {
    churn_with(
        target,
        &ChurnShape {
            duration,
            threads: 1,
            window: None,
            echo: false,
            count: None,
            rate: None,
        },
    )
}

/// What a churn client does.
#[derive(Debug, Clone)]
pub struct ChurnShape {
    pub duration: Duration,
    /// Client threads, each making connections one after another.
    pub threads: usize,
    /// Count connections per window of this length (the sustained-churn report).
    pub window: Option<Duration>,
    /// Echo pattern (64 bytes to the echo server, the same 64 back, then the client closes
    /// first, as most clients do) instead of one HTTP request with `Connection: close`
    /// (after which the server closes first).
    pub echo: bool,
    /// Stop after this many connections per thread (or at `duration`, whichever comes
    /// first): a fixed amount of work, so per-connection counts (instructions, system calls)
    /// can be taken as the difference of two runs.
    pub count: Option<u64>,
    /// Offer this many connections per second in all (each thread its share, on a fixed
    /// schedule) instead of as many as the path takes: below saturation, the cost of a
    /// connection (CPU, first-byte time) can be compared between the first and the last
    /// windows without the rate itself moving.
    pub rate: Option<f64>,
}

/// Connections one after another on `shape.threads` threads for `shape.duration`.
pub fn churn_with(target: SocketAddr, shape: &ChurnShape) -> Result<ChurnReport> {
    let start = Instant::now();
    let windows = shape.window.map_or(0, |w| {
        (shape.duration.as_secs_f64() / w.as_secs_f64()).ceil() as usize
    });
    let workers: Vec<_> = (0..shape.threads.max(1))
        .map(|_| {
            let shape = shape.clone();
            thread::spawn(move || churn_thread(target, &shape, start, windows))
        })
        .collect();
    let mut lat = Vec::new();
    let mut errors = 0u64;
    let mut per_window = vec![0u64; windows];
    let mut window_ns = vec![0u64; windows];
    for w in workers {
        let r = w
            .join()
            .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
        lat.extend(r.lat);
        errors += r.errors;
        for (sum, n) in per_window.iter_mut().zip(r.per_window) {
            *sum += n;
        }
        for (sum, ns) in window_ns.iter_mut().zip(r.window_ns) {
            *sum += ns;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let connections = lat.len() as u64;
    let window_conn_per_s = match shape.window {
        Some(w) => per_window
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                // The last window may be cut short by the deadline.
                let begin = w.as_secs_f64() * i as f64;
                let len = (secs.min(begin + w.as_secs_f64()) - begin).max(1e-9);
                n as f64 / len
            })
            .collect(),
        None => Vec::new(),
    };
    let window_first_byte_mean_us = per_window
        .iter()
        .zip(&window_ns)
        .map(|(&n, &ns)| ns as f64 / 1000.0 / (n.max(1) as f64))
        .collect();
    Ok(ChurnReport {
        connections,
        errors,
        secs,
        conn_per_s: connections as f64 / secs,
        first_byte: Percentiles::from_ns(&mut lat),
        window_conn_per_s,
        window_first_byte_mean_us,
    })
}

struct ThreadResult {
    lat: Vec<u64>,
    errors: u64,
    per_window: Vec<u64>,
    /// Sum of first-byte times per window (ns).
    window_ns: Vec<u64>,
}

fn churn_thread(
    target: SocketAddr,
    shape: &ChurnShape,
    start: Instant,
    windows: usize,
) -> Result<ThreadResult> {
    let req: &[u8] = if shape.echo {
        &[b'e'; 64]
    } else {
        b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    };
    let mut lat = Vec::new();
    let mut errors = 0u64;
    let mut per_window = vec![0u64; windows];
    let mut window_ns = vec![0u64; windows];
    let mut buf = [0u8; 4096];
    let mut made = 0u64;
    // This thread's share of a fixed rate: connection `made` is due at `start + made × gap`.
    let gap = shape
        .rate
        .map(|r| Duration::from_secs_f64(shape.threads.max(1) as f64 / r.max(1e-3)));
    while start.elapsed() < shape.duration && shape.count.is_none_or(|c| made < c) {
        if let Some(gap) = gap {
            let due = start + gap.mul_f64(made as f64);
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        }
        made += 1;
        let t0 = Instant::now();
        let one = (|| -> io::Result<Duration> {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(req)?;
            if shape.echo {
                let mut got = [0u8; 64];
                s.read_exact(&mut got[..1])?;
                let first = t0.elapsed();
                s.read_exact(&mut got[1..])?;
                // Dropped here: the client closes first.
                return Ok(first);
            }
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no response"));
            }
            let first = t0.elapsed();
            while s.read(&mut buf)? > 0 {}
            let _ = s.shutdown(Shutdown::Both);
            Ok(first)
        })();
        match one {
            Ok(d) => {
                lat.push(d.as_nanos() as u64);
                if let Some(w) = shape.window {
                    let i = (start.elapsed().as_secs_f64() / w.as_secs_f64()) as usize;
                    let i = i.min(windows.saturating_sub(1));
                    if let Some(n) = per_window.get_mut(i) {
                        *n += 1;
                    }
                    if let Some(ns) = window_ns.get_mut(i) {
                        *ns += d.as_nanos() as u64;
                    }
                }
            }
            Err(_) => {
                errors += 1;
                if errors > 1000 && lat.is_empty() {
                    bail!("churn: every connection to {target} fails");
                }
            }
        }
    }
    Ok(ThreadResult {
        lat,
        errors,
        per_window,
        window_ns,
    })
}

// ---------------------------------------------------------------------------------------------
// idle

/// Opens `count` echo connections, proves each one carries a byte both ways, prints
/// `ready <count>` and holds them for `hold` (the harness kills it sooner).
pub fn idle(target: SocketAddr, count: usize, hold: Duration) -> Result<()> {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("connection {i} to {target}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("echo on connection {i}"))?;
        held.push(s);
    }
    println!("ready {}", held.len());
    io::stdout().flush()?;
    thread::sleep(hold);
    Ok(())
}
