//! Sustained connection churn into an enrolled pod. The agent's leg to the app closes first
//! (it forwards the client's FIN), so every connection leaves a TIME_WAIT socket on the
//! agent's side of that leg, from the agent's source address (127.0.0.6, or ::1). The server
//! pod gets a narrow ephemeral port range, so those sockets cover every port within a few
//! seconds: a dial that makes the kernel choose its port at bind time then fails
//! (`EADDRINUSE`), while one that leaves the port to `connect()` reuses a loopback TIME_WAIT
//! socket once it is a second old and keeps going.
//!
//! The client is a plain process in another pod (not enrolled), so the flows are inbound
//! plaintext through the agent: the same `dial` as every mesh flow's app leg, at a rate a
//! test can pace.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use interceptor_tests::{
    NetNs,
    agent::workload,
    require_privileged,
    scenario::{Cluster, Scenario},
};

/// The server pod's ephemeral ports: `LOW..=LOW + PORTS - 1`.
const LOW: u16 = 40_000;
const PORTS: u16 = 64;
/// Connections per test: five times the range, so a dial that cannot reuse a TIME_WAIT port
/// fails in the first fifth.
const CONNECTIONS: usize = 5 * PORTS as usize;
/// Pace: every port comes round again after `PORTS * PACE` = 2.6 s, more than the second
/// after which the kernel lets a loopback connect reuse a TIME_WAIT 4-tuple (`tcp_tw_reuse`
/// 2; kernels before 6.13 count it in whole seconds, so up to 2 s).
const PACE: Duration = Duration::from_millis(40);
const APP_PORT: u16 = 7000;

#[test]
fn sustained_churn_into_a_pod_ipv4() {
    churn(70, false);
}

#[test]
fn sustained_churn_into_a_pod_ipv6() {
    churn(71, true);
}

fn churn(node: u8, v6: bool) {
    require_privileged();
    let scenario = Scenario::new(node, "churner", "echo");
    let (client, server) = (&scenario.client, &scenario.server);
    let range = format!("{LOW} {}", LOW + PORTS - 1);
    server
        .ns
        .sysctl("net.ipv4.ip_local_port_range", &range)
        .expect("narrow port range");
    // The kernel's default, stated: loopback connects may reuse TIME_WAIT 4-tuples.
    server
        .ns
        .sysctl("net.ipv4.tcp_tw_reuse", "2")
        .expect("tcp_tw_reuse");
    let server_ip: IpAddr = if v6 {
        server.ip6.into()
    } else {
        server.ip.into()
    };
    let target = SocketAddr::new(server_ip, APP_PORT);
    let echo = EchoServer::start(&server.ns, target);

    let cluster = Cluster::new("churn");
    let _agent = cluster.start(vec![workload(server, "churn", "echo")], vec![]);

    let started = Instant::now();
    let outcome = client.ns.run(move || Ok(run_clients(target)));
    let elapsed = started.elapsed();
    let waiting = agent_time_wait(&server.ns, v6);
    drop(echo);
    if let Err((i, e)) = outcome {
        panic!(
            "connection {i} of {CONNECTIONS} to {target} failed after {elapsed:?}: {e} \
             ({waiting} TIME_WAIT sockets from the agent's source in the server pod, \
             ephemeral range {range})"
        );
    }
    // Kernel state: the condition this test is about really held. Every port of the range
    // was taken by a TIME_WAIT socket on the agent's leg at some point; at least half are
    // still there (each lasts 60 s and is replaced when reused).
    assert!(
        waiting >= usize::from(PORTS / 2),
        "only {waiting} TIME_WAIT sockets from the agent's source in the server pod after \
         {CONNECTIONS} connections: the agent's leg did not close first, so this test \
         proves nothing"
    );
}

/// Connects `CONNECTIONS` times at `PACE`: request, echoed reply, close (the client closes
/// first, as most clients do). The first failure ends the run with its index.
fn run_clients(target: SocketAddr) -> Result<(), (usize, String)> {
    let start = Instant::now();
    for i in 0..CONNECTIONS {
        let due = start + PACE * u32::try_from(i).unwrap_or(u32::MAX);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        one_connection(target, i).map_err(|e| (i, e))?;
    }
    Ok(())
}

fn one_connection(target: SocketAddr, i: usize) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let msg = format!("ping {i}\n");
    s.write_all(msg.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)
        .map_err(|e| format!("no echo (the agent could not reach the app): {e}"))?;
    if got != msg.as_bytes() {
        return Err(format!(
            "echo corrupted: {:?}",
            String::from_utf8_lossy(&got)
        ));
    }
    drop(s);
    Ok(())
}

/// TIME_WAIT sockets in `ns` whose local address is the agent's source toward apps.
fn agent_time_wait(ns: &NetNs, v6: bool) -> usize {
    let (file, local) = if v6 {
        ("tcp6", "00000000000000000000000001000000:")
    } else {
        // 127.0.0.6 as /proc/net/tcp prints it (a little-endian u32 in hex).
        ("tcp", "0600007F:")
    };
    let table = ns.proc_net(file).expect("read the socket table");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].starts_with(local) && f[3] == "06"
        })
        .count()
}

/// An echo server on a thread, listening in a pod's netns; stops when dropped.
struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: &NetNs, addr: SocketAddr) -> Self {
        let listener = ns.run(move || {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        thread::spawn(move || echo(s));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("echo server accept: {e}"),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

/// Echoes until the peer's FIN, then closes (second, after the agent's leg).
fn echo(mut s: TcpStream) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Both);
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
