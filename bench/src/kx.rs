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
use interceptor::handshake::{self, CompliancePolicy, CryptoPolicy, MeshCrypto, MeshSuite};
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
    /// Per round, for the spread.
    pub rounds_conn_per_s: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seconds_per_round: f64,
    pub rounds: usize,
    pub variants: Vec<Variant>,
}

fn variants() -> Result<Vec<(&'static str, MeshCrypto)>> {
    let fips = CryptoPolicy {
        compliance_policy: CompliancePolicy::Fips1402,
        require_aes256_gcm: false,
    };
    Ok(vec![
        ("default (hybrid)", MeshCrypto::default_aes_gcm()),
        (
            "older agent (x25519)",
            MeshCrypto::legacy_classical(MeshSuite::AES_GCM)?,
        ),
        (
            "fips-140-2 (secp256r1)",
            MeshCrypto::new(fips, MeshSuite::AES_GCM)?,
        ),
    ])
}

/// Runs every variant `rounds` times for `secs` seconds each, interleaved.
pub fn run(secs: f64, rounds: usize) -> Result<Report> {
    let mut out = Vec::new();
    let variants = variants()?;
    let meshes: Vec<Mesh> = variants
        .iter()
        .map(|(_, c)| Mesh::with(c, c))
        .collect::<Result<_>>()?;
    let mut per_round: Vec<Vec<(f64, f64)>> = vec![Vec::new(); variants.len()];
    for _ in 0..rounds {
        for (i, mesh) in meshes.iter().enumerate() {
            per_round[i].push(churn(mesh, Duration::from_secs_f64(secs))?);
        }
    }
    for (((name, _), mesh), rounds) in variants.iter().zip(&meshes).zip(per_round) {
        let (client_hello_bytes, server_flight_bytes, group) = sizes(mesh)?;
        let rates: Vec<f64> = rounds.iter().map(|r| r.0).collect();
        out.push(Variant {
            name: (*name).to_owned(),
            group,
            client_hello_bytes,
            server_flight_bytes,
            conn_per_s: median(&rates),
            cpu_us_per_conn: median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>()),
            handshake_cpu_us_in_memory: in_memory_us(mesh, Duration::from_secs_f64(secs))?,
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
        let base = self.variants.get(1).map_or(1.0, |v| v.conn_per_s);
        let mut s = String::from(
            "| variant | group | ClientHello B | server flight B | new conn/s | ÷ x25519 | CPU µs/conn | handshake CPU µs (in memory) |\n|---|---|---|---|---|---|---|---|\n",
        );
        for v in &self.variants {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {:.0} | {:.2} | {:.0} | {:.0} |\n",
                v.name,
                v.group,
                v.client_hello_bytes,
                v.server_flight_bytes,
                v.conn_per_s,
                v.conn_per_s / base,
                v.cpu_us_per_conn,
                v.handshake_cpu_us_in_memory,
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

/// ClientHello and server first-flight sizes, and the group, from one in-memory handshake.
fn sizes(mesh: &Mesh) -> Result<(usize, usize, String)> {
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
    let group = c
        .negotiated_key_exchange_group()
        .map(|g| handshake::group_name(g.name()))
        .unwrap_or_default();
    Ok((client_hello, flight.len(), group))
}

/// Microseconds per in-memory handshake (both ends on this thread; wall time of pure CPU
/// work, as the criterion benchmark measures it).
fn in_memory_us(mesh: &Mesh, budget: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget / 2 || n < 10 {
        mesh.handshake()?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// New connections for `budget` over loopback: `(connections/s, process CPU µs per connection)`.
fn churn(mesh: &Mesh, budget: Duration) -> Result<(f64, f64)> {
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
    let cpu = process_cpu()?;
    let start = Instant::now();
    let mut n = 0u64;
    let result = (|| -> Result<()> {
        while start.elapsed() < budget {
            one_connection(mesh, addr)?;
            n += 1;
        }
        Ok(())
    })();
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

fn one_connection(mesh: &Mesh, addr: SocketAddr) -> Result<()> {
    let mut sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let name = ServerName::IpAddress(addr.ip().into());
    let mut conn = ClientConnection::new(Arc::clone(&mesh.client), name)?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.write_all(b"x")?;
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte)?;
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
