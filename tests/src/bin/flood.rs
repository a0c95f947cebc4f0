//! A misbehaving client for the limits tests, run inside a pod (`Pod::command`): opens COUNT
//! connections to DST, sends FIRST (hex) on each, optionally REST (hex) on each after
//! DELAY_MS, prints `connected N failed M` and holds every connection until its stdin closes.
//! A connect may take one SYN retransmit (up to 3 s); connecting stops after 5 s (an agent
//! that no longer accepts would otherwise keep it here for COUNT connect timeouts); the rest
//! count as failed.
//!
//! `flood DST COUNT [FIRST [DELAY_MS REST]]`

use std::{
    io::{BufRead as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex payload"))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dst: SocketAddr = args[0].parse().expect("DST");
    let count: usize = args[1].parse().expect("COUNT");
    let first = args.get(2).map(|h| unhex(h)).unwrap_or_default();
    let rest = args.get(3).zip(args.get(4)).map(|(d, h)| {
        (
            Duration::from_millis(d.parse().expect("DELAY_MS")),
            unhex(h),
        )
    });
    let mut held = Vec::with_capacity(count);
    let mut failed = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failed += 1;
            continue;
        }
        match TcpStream::connect_timeout(&dst, left.min(Duration::from_secs(3))) {
            Ok(mut s) => {
                if !first.is_empty() {
                    let _ = s.write_all(&first);
                }
                held.push(s);
            }
            Err(_) => failed += 1,
        }
    }
    if let Some((delay, rest)) = rest {
        std::thread::sleep(delay);
        for s in &mut held {
            let _ = s.write_all(&rest);
        }
    }
    println!("connected {} failed {failed}", held.len());
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().lock().lines().count();
}
