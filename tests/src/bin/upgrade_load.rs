//! Client load for the upgrade tests, run inside a pod (`Pod::command`) against an echo
//! server whose per-flow hashes the test records (`interceptor_tests::upgrade::EchoServer`).
//!
//! `upgrade_load flows DST N SECS PAYLOAD`: N connections at once, each starting with its
//! 8-byte id; once every id came back (both agents' handshakes done), even ids stream PAYLOAD
//! (rotated per flow) in 2 KiB steps every 20 ms (bulk, 100 KB/s each), odd ids send a 64-byte
//! message every 20 ms (interactive, request/response sized). After SECS every flow
//! half-closes and reads the rest of the echo. Prints `started` once every flow is set up,
//! then one JSON line per flow: `{"id","sent","sentSha","recv","recvSha","error"}`.
//!
//! `upgrade_load loop DST SECS [TIMEOUT_MS]`: opens a new connection after another for SECS
//! (each sends 16 bytes and reads them back, then closes), or until stdin closes; a connection
//! that has not echoed within TIMEOUT_MS (default 5 000) fails. Prints
//! `{"ok","failed","errors","slowest"}`: `slowest` lists the five slowest connections as
//! `[ms after the loop started, ms it took]`.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use interceptor_tests::digest::Sha256;

/// The id the loop client's connections carry (the echo server records no hash for it).
const LOOP_ID: u64 = u64::MAX;
const STEP: usize = 2 << 10;
const PACE: Duration = Duration::from_millis(20);
/// How long a flow may take to be set up end to end (N handshakes at once under TCG).
const SETUP: Duration = Duration::from_secs(60);

fn flow(
    conn: std::io::Result<TcpStream>,
    id: u64,
    until: Instant,
    stop: &AtomicBool,
    payload: &[u8],
) -> serde_json::Value {
    let mut sent_sha = Sha256::new();
    let mut sent = 0usize;
    let result = (|| -> std::io::Result<(usize, String)> {
        let mut s = conn?;
        sent_sha_id(&mut sent_sha, &mut sent, id);
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut reader = s.try_clone()?;
        let echo = std::thread::spawn(move || -> std::io::Result<(usize, String)> {
            // The id's echo was read before the transfer started (see `main`).
            let mut h = Sha256::new();
            h.update(&id.to_be_bytes());
            let mut n = 8;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let k = reader.read(&mut buf)?;
                if k == 0 {
                    return Ok((n, h.hex()));
                }
                h.update(&buf[..k]);
                n += k;
            }
        });
        let mut send = |s: &mut TcpStream, b: &[u8]| -> std::io::Result<()> {
            s.write_all(b)?;
            sent_sha.update(b);
            sent += b.len();
            Ok(())
        };
        let mut at = (id as usize * 4099) % payload.len();
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            let len = if id.is_multiple_of(2) { STEP } else { 64 };
            let end = (at + len).min(payload.len());
            send(&mut s, &payload[at..end])?;
            at = if end == payload.len() { 0 } else { end };
            std::thread::sleep(PACE);
        }
        s.shutdown(Shutdown::Write)?;
        echo.join()
            .map_err(|_| std::io::Error::other("echo reader panicked"))?
    })();
    let (recv, recv_sha, error) = match result {
        Ok((n, h)) => (n, h, None),
        Err(e) => (0, String::new(), Some(e.to_string())),
    };
    serde_json::json!({
        "id": id,
        "sent": sent,
        "sentSha": sent_sha.hex(),
        "recv": recv,
        "recvSha": recv_sha,
        "error": error,
    })
}

/// The id went out at connect time; it counts toward what the flow sent.
fn sent_sha_id(h: &mut Sha256, sent: &mut usize, id: u64) {
    h.update(&id.to_be_bytes());
    *sent += 8;
}

/// Waits (at most [`SETUP`]) for the echo of the id a new flow sent.
fn echoed_id(mut s: TcpStream, id: u64) -> std::io::Result<TcpStream> {
    s.set_read_timeout(Some(SETUP))?;
    let mut back = [0u8; 8];
    s.read_exact(&mut back)?;
    if back != id.to_be_bytes() {
        return Err(std::io::Error::other("the id came back changed"));
    }
    Ok(s)
}

fn one_connection(dst: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&dst, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut msg = [0x5au8; 16];
    msg[..8].copy_from_slice(&LOOP_ID.to_be_bytes());
    s.write_all(&msg)?;
    let mut back = [0u8; 16];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// Set once stdin reaches its end: the test ends a run before SECS by closing it.
fn stop_at_stdin_eof() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let eof = Arc::clone(&stop);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        eof.store(true, Ordering::Relaxed);
    });
    stop
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dst: SocketAddr = args[1].parse().expect("DST");
    match args[0].as_str() {
        "flows" => {
            let n: u64 = args[2].parse().expect("N");
            let secs: f64 = args[3].parse().expect("SECS");
            let payload = Arc::new(std::fs::read(&args[4]).expect("PAYLOAD"));
            // Every flow is set up end to end (its id came back through both agents, so both
            // mTLS handshakes are done) before any transfer starts: the transfer's read timeout
            // then measures stalls, not how long a slow machine takes for N handshakes at once.
            let conns: Vec<_> = (0..n)
                .map(|id| {
                    TcpStream::connect_timeout(&dst, Duration::from_secs(5)).and_then(|mut s| {
                        s.write_all(&id.to_be_bytes())?;
                        Ok(s)
                    })
                })
                .collect();
            let conns: Vec<_> = conns
                .into_iter()
                .zip(0..n)
                .map(|(conn, id)| conn.and_then(|s| echoed_id(s, id)))
                .collect();
            let until = Instant::now() + Duration::from_secs_f64(secs);
            let stop = stop_at_stdin_eof();
            let threads: Vec<_> = conns
                .into_iter()
                .zip(0..n)
                .map(|(conn, id)| {
                    let payload = Arc::clone(&payload);
                    let stop = Arc::clone(&stop);
                    std::thread::spawn(move || flow(conn, id, until, &stop, &payload))
                })
                .collect();
            println!("started");
            let _ = std::io::stdout().flush();
            for t in threads {
                let line = t
                    .join()
                    .unwrap_or_else(|_| serde_json::json!({"error": "panic"}));
                println!("{line}");
            }
        }
        "loop" => {
            let secs: f64 = args[2].parse().expect("SECS");
            let timeout = Duration::from_millis(
                args.get(3)
                    .map_or(5_000, |t| t.parse().expect("TIMEOUT_MS")),
            );
            let start = Instant::now();
            let until = start + Duration::from_secs_f64(secs);
            let stop = stop_at_stdin_eof();
            let (mut ok, mut failed, mut errors) = (0u64, 0u64, Vec::new());
            let mut slowest: Vec<(u128, u128)> = Vec::new();
            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                let result = one_connection(dst, timeout);
                slowest.push((
                    began.duration_since(start).as_millis(),
                    began.elapsed().as_millis(),
                ));
                slowest.sort_by_key(|&(_, took)| std::cmp::Reverse(took));
                slowest.truncate(5);
                match result {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        failed += 1;
                        if errors.len() < 5 {
                            errors.push(format!(
                                "{e} (after {} ms, {} ms into the loop)",
                                began.elapsed().as_millis(),
                                began.duration_since(start).as_millis()
                            ));
                        }
                    }
                }
            }
            println!(
                "{}",
                serde_json::json!({"ok": ok, "failed": failed, "errors": errors, "slowest": slowest})
            );
        }
        other => panic!("unknown mode {other}"),
    }
}
