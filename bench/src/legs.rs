//! `interceptor-bench legs-probe` (root): the same-node fast path's two plain loopback legs
//! (app → agent, agent → app) joined four ways, side by side in one process and one run:
//!
//! * `direct`: no agent, the client connects to the server (the floor);
//! * `splice`: the agent's relay (`relay::relay_spliced` on a tokio runtime like the agent's);
//! * `sk_skb`: a stream verdict on the agent's two sockets sends what one receives out of
//!   the other; the agent is not woken;
//! * `sk_msg`: sk_msg on the apps' sockets pushes what each app sends straight out of the
//!   agent's other leg, inside the app's `sendmsg`.
//! * `ingress`: no agent, one connection as `direct`, but the client's sends go straight
//!   into the server's receive queue by sk_msg (`tuning.relayAppLeg: skMsg`'s redirect, the
//!   join program with an unlimited `JOIN_INGRESS` grant): against `direct`, what one
//!   loopback TCP traversal per round trip costs.
//!
//! Per variant: 64 B ping-pong round trips, each echo checked (a reordered or lost message
//! fails the run). Bulk and back-pressure of the kernel joins are not measured here yet;
//! ARCHITECTURE.md "Same-node fast path" reads the numbers and the kernel code.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsFd as _,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use interceptor::{datapath::LegJoins, relay};
use serde::Serialize;

pub const VARIANTS: [&str; 5] = ["direct", "splice", "sk_skb", "sk_msg", "ingress"];

#[derive(Debug, Serialize, Clone)]
pub struct Sample {
    pub variant: String,
    pub round: usize,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// Round trips measured (for per-message costs from `strace -c` or `perf stat`).
    pub round_trips: usize,
}

/// Three connected legs of one variant: the client app's socket, the server app's socket,
/// and whatever must stay alive between them.
struct Path {
    client: TcpStream,
    server: TcpStream,
    _hold: Vec<TcpStream>,
    _runtime: Option<tokio::runtime::Runtime>,
}

fn listener() -> Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")
}

fn pair(to: &TcpListener) -> Result<(TcpStream, TcpStream)> {
    let c = TcpStream::connect(to.local_addr()?)?;
    let (s, _) = to.accept()?;
    for s in [&c, &s] {
        s.set_nodelay(true)?;
    }
    Ok((c, s))
}

fn path(variant: &str, joins: &mut LegJoins) -> Result<Path> {
    let front = listener()?;
    let app = listener()?;
    if variant == "direct" || variant == "ingress" {
        let (client, server) = pair(&app)?;
        if variant == "ingress" {
            let key = joins.join_msg(
                client.as_fd(),
                client.local_addr()?,
                client.peer_addr()?,
                server.as_fd(),
            )?;
            let grant = interceptor_common::JoinGrant {
                relayed: 0,
                granted: u64::MAX,
                kind: interceptor_common::JOIN_INGRESS,
            };
            joins.set_grant(key, grant)?;
        }
        return Ok(Path {
            client,
            server,
            _hold: Vec::new(),
            _runtime: None,
        });
    }
    let (client, a) = pair(&front)?;
    let (b, server) = pair(&app)?;
    match variant {
        "splice" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let (a2, b2) = (a.try_clone()?, b.try_clone()?);
            rt.spawn(async move {
                let (Ok(a), Ok(b)) = (
                    a2.set_nonblocking(true)
                        .and_then(|()| tokio::net::TcpStream::from_std(a2)),
                    b2.set_nonblocking(true)
                        .and_then(|()| tokio::net::TcpStream::from_std(b2)),
                ) else {
                    return;
                };
                let _ = relay::relay_spliced(
                    a,
                    b,
                    relay::RelayConfig::default(),
                    relay::RelayStats::new(),
                )
                .await;
            });
            Ok(Path {
                client,
                server,
                _hold: vec![a, b],
                _runtime: Some(rt),
            })
        }
        "sk_skb" => {
            joins.join_skb(a.as_fd(), b.as_fd())?;
            Ok(Path {
                client,
                server,
                _hold: vec![a, b],
                _runtime: None,
            })
        }
        "sk_msg" => {
            joins.join_msg(
                client.as_fd(),
                client.local_addr()?,
                client.peer_addr()?,
                b.as_fd(),
            )?;
            joins.join_msg(
                server.as_fd(),
                server.local_addr()?,
                server.peer_addr()?,
                a.as_fd(),
            )?;
            Ok(Path {
                client,
                server,
                _hold: vec![a, b],
                _runtime: None,
            })
        }
        other => bail!("unknown variant `{other}` (one of {VARIANTS:?})"),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// 64 B ping-pong for `secs`; the server echoes on its own thread.
fn rtt(p: &mut Path, secs: f64) -> Result<(f64, f64, usize)> {
    let mut server = p.server.try_clone()?;
    let echo = thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; 64];
        loop {
            if let Err(e) = server.read_exact(&mut buf) {
                return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            if buf[0] == 0xff {
                return Ok(());
            }
            server.write_all(&buf)?;
        }
    });
    let mut buf = [7u8; 64];
    let mut samples = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut i = 0u8;
    while Instant::now() < end {
        i = i.wrapping_add(1) % 0xfe;
        buf[0] = i;
        let t = Instant::now();
        p.client.write_all(&buf)?;
        p.client.read_exact(&mut buf)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        if buf[0] != i {
            bail!("echo out of order: sent {i}, got {}", buf[0]);
        }
    }
    buf[0] = 0xff;
    p.client.write_all(&buf)?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    samples.sort_by(f64::total_cmp);
    Ok((
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.len(),
    ))
}

/// Every variant, `rounds` times, interleaved (A B C D, A B C D, ...).
pub fn run(secs: f64, rounds: usize, variants: &[String]) -> Result<Vec<Sample>> {
    let mut joins = LegJoins::load().context("loading the leg-join programs (root needed)")?;
    let mut out = Vec::new();
    for round in 0..rounds {
        for v in variants {
            let mut p = path(v, &mut joins).with_context(|| format!("setting up {v}"))?;
            let (p50, p99, round_trips) = rtt(&mut p, secs).with_context(|| format!("{v}: rtt"))?;
            let _ = p.client.shutdown(Shutdown::Both);
            let s = Sample {
                variant: v.clone(),
                round,
                rtt_p50_us: p50,
                rtt_p99_us: p99,
                round_trips,
            };
            eprintln!("{s:?}");
            out.push(s);
        }
    }
    Ok(out)
}

/// Medians per variant as a Markdown table.
pub fn markdown(samples: &[Sample], variants: &[String]) -> String {
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let mut s =
        String::from("| variant | RTT p50 µs | RTT p99 µs | round trips |\n|---|---|---|---|\n");
    for v in variants {
        let of = |f: fn(&Sample) -> f64| {
            med(samples.iter().filter(|x| &x.variant == v).map(f).collect())
        };
        s.push_str(&format!(
            "| {v} | {:.1} | {:.1} | {:.0} |\n",
            of(|x| x.rtt_p50_us),
            of(|x| x.rtt_p99_us),
            of(|x| x.round_trips as f64),
        ));
    }
    s
}
