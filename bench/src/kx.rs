//! What the hybrid post-quantum key exchange costs (`interceptor-bench kx`): the agent's own
//! mesh configs with `X25519MLKEM768` against an agent that offers classical groups only
//! (`x25519`), and the FIPS policy's `secp256r1`, in the same run, rounds interleaved.
//!
//! Per variant:
//! - **new connections/s** over loopback TCP, one connection at a time (connect, full mutual
//!   handshake with SPIFFE checks on both ends, one byte each way, close), both ends in this
//!   process on two threads: the rate one agent could set up connections if it ran both ends;
//! - **CPU per connection** (user + system time of this process, both ends and the kernel's
//!   TCP work, divided by connections);
//! - **handshake CPU in memory** (no sockets: the TLS work alone, both ends on one thread);
//! - **ClientHello size** and the **server's first flight** (ServerHello through Finished).
//!
//! Two more variants resume (TLS 1.3 `psk_dhe_ke`, as agents do between each other): after the
//! first connection each handshake resumes with the previous connection's ticket, so the
//! certificates and signatures drop out and the key exchange stays. rustls offers no
//! `psk_ke` (its client always sends `psk_dhe_ke` only, and its server resumes only when that
//! mode is offered), so what `psk_ke` would cost is estimated from the same run as the
//! resumed handshake minus the key exchange alone.
//!
//! No privileges needed; nothing leaves loopback.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use interceptor::handshake::{
    self, CompliancePolicy, CryptoPolicy, MeshCrypto, MeshSuite, SessionResumption,
};
use rustls::{ClientConnection, ServerConnection, pki_types::ServerName};
use serde::Serialize;

use crate::micro::Mesh;

/// One key-exchange variant's results (medians over rounds).
#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub name: String,
    /// The group both ends negotiated (checked on every connection).
    pub group: String,
    pub client_hello_bytes: usize,
    pub server_flight_bytes: usize,
    pub conn_per_s: f64,
    pub cpu_us_per_conn: f64,
    pub handshake_cpu_us_in_memory: f64,
    /// The key exchange alone (client key generation, server encapsulation or agreement,
    /// client completion), CPU µs: the part of the handshake the group decides.
    pub key_exchange_cpu_us: f64,
    /// Whether the handshakes after the first resume (checked on every connection).
    pub resumed: bool,
    /// Per round, for the spread.
    pub rounds_conn_per_s: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seconds_per_round: f64,
    pub rounds: usize,
    pub variants: Vec<Variant>,
}

fn variants() -> Result<Vec<(&'static str, MeshCrypto, bool)>> {
    let fips = CryptoPolicy {
        compliance_policy: CompliancePolicy::Fips1402,
        require_aes256_gcm: false,
    };
    Ok(vec![
        ("default (hybrid)", MeshCrypto::default_aes_gcm(), false),
        (
            "older agent (x25519)",
            MeshCrypto::legacy_classical(MeshSuite::AES_GCM)?,
            false,
        ),
        (
            "fips-140-2 (secp256r1)",
            MeshCrypto::new(fips, MeshSuite::AES_GCM)?,
            false,
        ),
        (
            "default, resumed (psk_dhe_ke)",
            MeshCrypto::default_aes_gcm(),
            true,
        ),
        (
            "x25519, resumed (psk_dhe_ke)",
            MeshCrypto::legacy_classical(MeshSuite::AES_GCM)?,
            true,
        ),
    ])
}

/// Runs every variant `rounds` times for `secs` seconds each, interleaved.
pub fn run(secs: f64, rounds: usize) -> Result<Report> {
    let mut out = Vec::new();
    let variants = variants()?;
    let resumption = SessionResumption::new(SessionResumption::DEFAULT_LIFETIME, Arc::default());
    let meshes: Vec<Mesh> = variants
        .iter()
        .map(|(_, c, resume)| {
            if *resume {
                Mesh::resuming(c, c, &resumption)
            } else {
                Mesh::with(c, c)
            }
        })
        .collect::<Result<_>>()?;
    let mut per_round: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); variants.len()];
    let budget = Duration::from_secs_f64(secs);
    for _ in 0..rounds {
        for (i, (mesh, (_, crypto, resume))) in meshes.iter().zip(&variants).enumerate() {
            let (rate, cpu) = churn(mesh, budget, *resume)?;
            let in_memory = in_memory_us(mesh, budget / 2, *resume)?;
            let kx = key_exchange_us(crypto, budget / 4)?;
            per_round[i].push((rate, cpu, in_memory, kx));
        }
    }
    for (((name, _, resume), mesh), rounds) in variants.iter().zip(&meshes).zip(per_round) {
        let (client_hello_bytes, server_flight_bytes, group) = sizes(mesh, *resume)?;
        let rates: Vec<f64> = rounds.iter().map(|r| r.0).collect();
        out.push(Variant {
            name: (*name).to_owned(),
            group,
            client_hello_bytes,
            server_flight_bytes,
            conn_per_s: median(&rates),
            cpu_us_per_conn: median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>()),
            handshake_cpu_us_in_memory: median(&rounds.iter().map(|r| r.2).collect::<Vec<_>>()),
            key_exchange_cpu_us: median(&rounds.iter().map(|r| r.3).collect::<Vec<_>>()),
            resumed: *resume,
            rounds_conn_per_s: rates,
        });
    }
    Ok(Report {
        seconds_per_round: secs,
        rounds,
        variants: out,
    })
}

impl Report {
    pub fn markdown(&self) -> String {
        let (base, base_cpu) = self
            .variants
            .get(1)
            .map_or((1.0, 1.0), |v| (v.conn_per_s, v.cpu_us_per_conn));
        let mut s = String::from(
            "| variant | group | ClientHello B | server flight B | new conn/s | ÷ x25519 | CPU µs/conn | conn per CPU-s ÷ x25519 | handshake CPU µs (in memory) | key exchange CPU µs | psk_ke estimate µs |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for v in &self.variants {
            let psk_ke = if v.resumed {
                format!(
                    "{:.0}",
                    (v.handshake_cpu_us_in_memory - v.key_exchange_cpu_us).max(0.0)
                )
            } else {
                "—".to_owned()
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} | {psk_ke} |\n",
                v.name,
                v.group,
                v.client_hello_bytes,
                v.server_flight_bytes,
                v.conn_per_s,
                v.conn_per_s / base,
                v.cpu_us_per_conn,
                base_cpu / v.cpu_us_per_conn,
                v.handshake_cpu_us_in_memory,
                v.key_exchange_cpu_us,
            ));
        }
        s
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// ClientHello and server first-flight sizes, and the group, from one in-memory handshake
/// (a resumed one when `resume`: a full one first fetches the ticket).
fn sizes(mesh: &Mesh, resume: bool) -> Result<(usize, usize, String)> {
    if resume {
        mesh.handshake()?;
    } else if mesh.handshake()?.0.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        bail!("a handshake resumed without resumption configured");
    }
    let name = ServerName::try_from("10.88.1.3").context("server name")?;
    let mut c = ClientConnection::new(Arc::clone(&mesh.client), name)?;
    let mut s = ServerConnection::new(Arc::clone(&mesh.server))?;
    let mut hello = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut hello)?;
    }
    // The handshake message inside the record(s): what the key shares make grow.
    let client_hello = hello.len();
    s.read_tls(&mut &hello[..])?;
    s.process_new_packets()?;
    let mut flight = Vec::new();
    while s.wants_write() {
        s.write_tls(&mut flight)?;
    }
    c.read_tls(&mut &flight[..])?;
    c.process_new_packets()?;
    if c.handshake_kind() == Some(rustls::HandshakeKind::Resumed) && !resume {
        bail!("a handshake resumed without resumption configured");
    }
    let group = c
        .negotiated_key_exchange_group()
        .map(|g| handshake::group_name(g.name()))
        .unwrap_or_default();
    Ok((client_hello, flight.len(), group))
}

/// This thread's CPU microseconds per in-memory handshake (both ends on this thread). CPU
/// time, not wall time, so other work on a shared machine does not count.
fn in_memory_us(mesh: &Mesh, budget: Duration, resume: bool) -> Result<f64> {
    if resume {
        // Fetch a ticket (or use one an earlier round left).
        mesh.handshake()?;
    }
    let start = Instant::now();
    let cpu = thread_cpu()?;
    let mut n = 0u64;
    while start.elapsed() < budget || n < 10 {
        let (c, _) = mesh.handshake()?;
        check_kind(&c, resume)?;
        n += 1;
    }
    Ok((thread_cpu()? - cpu) * 1e6 / n as f64)
}

/// This thread's CPU microseconds per key exchange in the variant's first group, both ends.
fn key_exchange_us(crypto: &MeshCrypto, budget: Duration) -> Result<f64> {
    let provider = crypto.provider();
    let group = *provider.kx_groups.first().context("no group")?;
    let start = Instant::now();
    let cpu = thread_cpu()?;
    let mut n = 0u64;
    while start.elapsed() < budget || n < 10 {
        let client = group.start()?;
        let server = group.start_and_complete(client.pub_key())?;
        client.complete(&server.pub_key)?;
        n += 1;
    }
    Ok((thread_cpu()? - cpu) * 1e6 / n as f64)
}

/// utime + stime of the calling thread, in seconds (clock ticks).
fn thread_cpu() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").context("thread stat")?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/thread-self/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|x| x.parse::<f64>().ok())
            .context("utime/stime")
    };
    // Kernel USER_HZ, 100 on every Linux this runs on.
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// A resuming variant must resume every time (each connection brings the next ticket), a
/// full one never: otherwise the row would not measure what it is labelled.
fn check_kind(conn: &rustls::ClientConnection, resume: bool) -> Result<()> {
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    if resumed != resume {
        bail!("handshake resumed: {resumed}, expected {resume}");
    }
    Ok(())
}

/// New connections for `budget` over loopback: `(connections/s, process CPU µs per connection)`.
fn churn(mesh: &Mesh, budget: Duration, resume: bool) -> Result<(f64, f64)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let config = Arc::clone(&mesh.server);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || -> Result<()> {
            for sock in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut sock = sock?;
                let mut conn = ServerConnection::new(Arc::clone(&config))?;
                let mut tls = rustls::Stream::new(&mut conn, &mut sock);
                let mut byte = [0u8; 1];
                tls.read_exact(&mut byte)?;
                tls.write_all(&byte)?;
            }
            Ok(())
        })
    };
    let mut n = 0u64;
    let mut measured = || -> Result<(Instant, f64)> {
        if resume {
            // The first connection fetches a ticket (or uses one an earlier round left) and
            // is not counted.
            one_connection(mesh, addr, None)?;
        }
        let cpu = process_cpu()?;
        let start = Instant::now();
        while start.elapsed() < budget {
            one_connection(mesh, addr, Some(resume))?;
            n += 1;
        }
        Ok((start, cpu))
    };
    let result = measured();
    let (start, cpu) = match &result {
        Ok(v) => *v,
        Err(_) => (Instant::now(), 0.0),
    };
    let elapsed = start.elapsed();
    let used = process_cpu()? - cpu;
    stop.store(true, Ordering::Relaxed);
    // Wake the acceptor so it sees the flag.
    let _ = TcpStream::connect(addr);
    let served = server.join();
    result?;
    match served {
        Ok(r) => r?,
        Err(_) => bail!("server thread panicked"),
    }
    let n = n.max(1) as f64;
    Ok((n / elapsed.as_secs_f64(), used * 1e6 / n))
}

/// One connection; `resume` is what its handshake must have been, if anything.
fn one_connection(mesh: &Mesh, addr: SocketAddr, resume: Option<bool>) -> Result<()> {
    let mut sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut conn = ClientConnection::new(Arc::clone(&mesh.client), name)?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(b"x")?;
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte)?;
    if let Some(resume) = resume {
        check_kind(&conn, resume)?;
    }
    let negotiated = handshake::negotiated(&conn)?;
    if negotiated.group.is_none() {
        bail!("no key-exchange group negotiated");
    }
    Ok(())
}

/// utime + stime of this process (all threads), in seconds (clock-tick resolution, fine over
/// rounds of seconds).
fn process_cpu() -> Result<f64> {
    crate::procs::process_cpu(std::process::id())
}
