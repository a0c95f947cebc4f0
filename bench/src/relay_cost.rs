//! What the userspace relay costs per byte and per round trip, counted rather than timed
//! (`interceptor-bench relay-cost`).
//!
//! Two relays, the client agent's and the server agent's, run the agent's own relay code
//! (`interceptor::relay::relay_userspace` on the own record layer, the agent's buffer size)
//! over a mesh session from the agent's own TLS configurations, joined by loopback TCP: app →
//! client relay → peer leg → server relay → app, the three legs of a flow through two agents.
//! Everything runs on one thread (a current-thread runtime with the two apps as tasks), and
//! loopback TCP delivers in the sender's call, so the reads, writes and records of a run do not
//! depend on the machine's load: instruction counts (`valgrind --tool=callgrind`), system calls
//! (`strace -c -f`) and allocations of two runs of different sizes differ by the cost of the
//! bytes or round trips between them, repeatably. What it leaves out: a worker thread waking
//! another, and the veth and softirq work of the bench's pods.

use std::{net::Ipv4Addr, sync::Arc, time::Instant};

use anyhow::{Context as _, Result, bail, ensure};
use interceptor::{
    handshake::{MeshCrypto, SessionResumption},
    relay::{self, RelayConfig, RelayStats},
};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::micro::Mesh;

/// iperf3's default write size.
const BULK_WRITE: usize = 128 << 10;
/// The `rr64` workload's message.
const RR_MESSAGE: usize = 64;

/// What one run moved (the counters themselves come from the tool the run is started under).
#[derive(Debug, Serialize)]
pub struct Report {
    pub bulk_bytes: u64,
    pub round_trips: u64,
    pub bulk_secs: f64,
    pub rr_secs: f64,
}

/// Moves `bulk_mb` MiB one way through a flow, then does `round_trips` 64-byte round trips on a
/// second flow. Either may be 0: a run with both 0 is the fixed cost to subtract.
/// `buffer_size` is the relays' (`RelayConfig::buffer_size`); `None` keeps the agent's.
pub fn run(bulk_mb: u64, round_trips: u64, buffer_size: Option<usize>) -> Result<Report> {
    let mut config = RelayConfig {
        own_record_layer: true,
        ..RelayConfig::default()
    };
    if let Some(size) = buffer_size {
        config.buffer_size = size;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let crypto = MeshCrypto::default_aes_gcm();
    let resumption = SessionResumption::new(SessionResumption::DEFAULT_LIFETIME, Arc::default());
    let mesh = Mesh::resuming(&crypto, &crypto, &resumption)?;
    rt.block_on(async {
        let bulk_bytes = bulk_mb << 20;
        let started = Instant::now();
        if bulk_bytes > 0 {
            bulk(&mesh, config, bulk_bytes).await?;
        }
        let bulk_secs = started.elapsed().as_secs_f64();
        let started = Instant::now();
        if round_trips > 0 {
            ping_pong(&mesh, config, round_trips).await?;
        }
        Ok(Report {
            bulk_bytes,
            round_trips,
            bulk_secs,
            rr_secs: started.elapsed().as_secs_f64(),
        })
    })
}

/// One flow through both relays: the client app's end and the server app's end, with the
/// relays running as tasks on this runtime.
async fn flow(mesh: &Mesh, config: RelayConfig) -> Result<(TcpStream, TcpStream)> {
    let (client, server) = mesh.handshake()?;
    let (client_app, client_app_far) = pair().await?;
    let (client_peer, server_peer) = pair().await?;
    let (server_app, server_app_far) = pair().await?;
    let dialing = RelayConfig {
        peer_fin_first: true,
        ..config
    };
    for (app, peer, conn, config) in [
        (
            client_app,
            client_peer,
            rustls::Connection::from(client),
            dialing,
        ),
        (
            server_app,
            server_peer,
            rustls::Connection::from(server),
            config,
        ),
    ] {
        tokio::spawn(relay::relay_userspace(
            app,
            peer,
            conn,
            Vec::new(),
            config,
            RelayStats::new(),
        ));
    }
    Ok((client_app_far, server_app_far))
}

/// A connected loopback pair with `TCP_NODELAY` on both ends (the agent's legs have it).
async fn pair() -> Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let a = TcpStream::connect(l.local_addr()?).await?;
    let (b, _) = l.accept().await?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

async fn bulk(mesh: &Mesh, config: RelayConfig, total: u64) -> Result<()> {
    let (mut client, mut server) = flow(mesh, config).await?;
    let pattern: Vec<u8> = (0..BULK_WRITE).map(|i| (i % 251) as u8).collect();
    let expected = pattern.clone();
    let writer = tokio::spawn(async move {
        let mut left = total;
        while left > 0 {
            let n = usize::try_from(left).map_or(BULK_WRITE, |l| l.min(BULK_WRITE));
            client.write_all(&pattern[..n]).await?;
            left -= n as u64;
        }
        client.shutdown().await?;
        anyhow::Ok(client)
    });
    let mut buf = vec![0u8; BULK_WRITE];
    let mut got = 0u64;
    loop {
        let n = server.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        // The stream is the pattern repeated: check every byte against it.
        let mut at = usize::try_from(got % BULK_WRITE as u64)?;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let k = rest.len().min(BULK_WRITE - at);
            ensure!(rest[..k] == expected[at..at + k], "bulk bytes corrupted");
            rest = &rest[k..];
            at = (at + k) % BULK_WRITE;
        }
        got += n as u64;
    }
    ensure!(got == total, "bulk moved {got} of {total} bytes");
    writer.await??;
    Ok(())
}

async fn ping_pong(mesh: &Mesh, config: RelayConfig, round_trips: u64) -> Result<()> {
    let (mut client, mut server) = flow(mesh, config).await?;
    let echo = tokio::spawn(async move {
        let mut msg = [0u8; RR_MESSAGE];
        loop {
            match server.read_exact(&mut msg).await {
                Ok(_) => server.write_all(&msg).await?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return anyhow::Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    });
    let mut msg = [0u8; RR_MESSAGE];
    let mut back = [0u8; RR_MESSAGE];
    for i in 0..round_trips {
        msg[..8].copy_from_slice(&i.to_le_bytes());
        client.write_all(&msg).await?;
        client.read_exact(&mut back).await?;
        if back != msg {
            bail!("round trip {i} came back changed");
        }
    }
    client.shutdown().await?;
    echo.await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both workloads move their bytes through the two relays intact (the counts a run is
    /// measured by are only worth something if the run did the work).
    #[test]
    fn bytes_and_round_trips_go_through_both_relays() {
        let r = run(2, 50, None).unwrap();
        assert_eq!(r.bulk_bytes, 2 << 20);
        assert_eq!(r.round_trips, 50);
    }
}
