//! Sustained connection churn into an enrolled pod. The agent's leg to the app closes first
//! (it forwards the client's FIN), so every connection leaves a TIME_WAIT socket on the
//! agent's side of that leg, from the agent's source address (127.0.0.6, or ::1). The server
//! pod gets a narrow ephemeral port range, so those sockets cover every port within a few
//! seconds: a dial that makes the kernel choose its port at bind time then fails
//! (`EADDRINUSE`), while one that leaves the port to `connect()` reuses a loopback TIME_WAIT
//! socket once it is a second old and keeps going.
//!
//! In the `into_a_pod` tests the client is a plain process in another pod (not enrolled), so
//! the flows are inbound plaintext through the agent: the same `dial` as every mesh flow's app
//! leg, at a rate a test can pace. The `mesh` tests put the narrow range in the client pod
//! and churn mesh flows between two enrolled pods: there the TIME_WAIT socket of each mesh
//! connection must land in the server pod (the dialing agent lets the peer agent close
//! first), or the client agent's dials run out of ports.
//!
//! The mesh tests also run the server's agent with `firstByteWaitMs: 0`, in PERMISSIVE mode:
//! a connection whose first bytes are not in the queue when the agent first looks is taken
//! for plaintext and handed to the app, which echoes the ClientHello back, and the flow fails.
//! Mesh connections carry their ClientHello in the SYN (TCP Fast Open between agents), so it
//! is there before the connection can be accepted, whatever the load; without Fast Open this
//! run fails within its first connections.

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
    agent::{RunningAgent, workload},
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

#[test]
fn sustained_mesh_churn_between_pods_ipv4() {
    mesh_churn(72, false);
}

#[test]
fn sustained_mesh_churn_between_pods_ipv6() {
    mesh_churn(73, true);
}

/// The client of [`mesh_churn`], in a process of its own inside the client pod's cgroup
/// (only then is it steered): the test binary runs again with only this test and
/// `CHURN_CLIENT_TARGET` set. Without that variable it does nothing.
#[test]
fn churn_client_process() {
    let Ok(target) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let target: SocketAddr = target.parse().expect("client target");
    // The client pod's first connection to the server's address has no Fast Open cookie yet
    // (the server's SYN-ACK brings one), so its ClientHello follows the handshake as without
    // Fast Open, and a zero first-byte wait may take it for plaintext: its outcome is not
    // what this test judges.
    let _ = one_connection(target, usize::MAX);
    if let Err((i, e)) = run_clients(target) {
        panic!("connection {i} of {CONNECTIONS} to {target} failed: {e}");
    }
}

const CLIENT_ENV: &str = "CHURN_CLIENT_TARGET";

/// Mesh flows (mTLS between two enrolled pods), the client closing first. Each flow's mesh
/// connection leaves one TIME_WAIT socket, and it must not be on the client's side: there it
/// would hold a port of the client pod's own address, so, with a narrow ephemeral range in
/// the client pod, the agent's dial to the server would fail (`EADDRNOTAVAIL`) once every
/// port holds one. The dialing agent lets the peer agent send the first FIN, so the
/// TIME_WAIT lands in the server pod, where it holds no port the client side needs.
fn mesh_churn(node: u8, v6: bool) {
    require_privileged();
    let scenario = Scenario::new(node, "churner", "echo");
    let (client, server) = (&scenario.client, &scenario.server);
    let range = format!("{LOW} {}", LOW + PORTS - 1);
    for (key, value) in [
        ("net.ipv4.ip_local_port_range", range.as_str()),
        ("net.ipv4.tcp_tw_reuse", "2"),
    ] {
        client.ns.sysctl(key, value).expect("client pod sysctl");
    }
    let (client_ip, server_ip): (IpAddr, IpAddr) = if v6 {
        (client.ip6.into(), server.ip6.into())
    } else {
        (client.ip.into(), server.ip.into())
    };
    let target = SocketAddr::new(server_ip, APP_PORT);
    let echo = EchoServer::start(&server.ns, target);

    let cluster = Cluster::new("meshchurn");
    let mut config = cluster.config(
        vec![
            workload(client, "churn", "client"),
            workload(server, "churn", "echo"),
        ],
        vec![],
    );
    // No wait at all: only a ClientHello already queued at accept is seen (module doc).
    config.tuning.first_byte_wait_ms = 0;
    let _agent = RunningAgent::start(config);
    let fast_open_before = fast_open_counts(&client.ns, &server.ns);

    let exe = std::env::current_exe().expect("test binary");
    let started = Instant::now();
    let out = client
        .command(&exe.to_string_lossy())
        .args(["--exact", "churn_client_process", "--nocapture"])
        .env(CLIENT_ENV, target.to_string())
        .output()
        .expect("run the client process");
    let elapsed = started.elapsed();
    let client_waiting = time_wait_from(&client.ns, client_ip, None);
    let server_waiting = time_wait_from(&server.ns, server_ip, Some(APP_PORT));
    drop(echo);
    let fast_open = fast_open_counts(&client.ns, &server.ns);
    assert!(
        out.status.success(),
        "mesh churn from {client_ip} to {target} failed after {elapsed:?} \
         ({client_waiting} TIME_WAIT sockets from the client pod's address in the client pod, \
         {server_waiting} on the server's port in the server pod; client ephemeral range \
         {range}; Fast Open active/passive {fast_open_before:?} before, {fast_open:?} \
         after):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Kernel state: the mesh connections' TIME_WAIT sockets are on the server's side. A new
    // connection on a 4-tuple takes its TIME_WAIT socket over, so there are at most as many
    // as client ports in use (connect() tries the even half of the range first).
    assert!(
        server_waiting >= usize::from(PORTS / 4),
        "only {server_waiting} TIME_WAIT sockets on {target} in the server pod after \
         {CONNECTIONS} mesh connections"
    );
    assert!(
        client_waiting <= CONNECTIONS / 20,
        "{client_waiting} TIME_WAIT sockets from {client_ip} in the client pod: the client \
         side closed its mesh connections first"
    );
    // Kernel state: every mesh connection after the first went out with its ClientHello in
    // the SYN (the client pod's kernel counts it) and the server pod's kernel accepted it.
    let (active, passive) = (
        fast_open.0 - fast_open_before.0,
        fast_open.1 - fast_open_before.1,
    );
    assert!(
        active >= CONNECTIONS as u64 && passive >= CONNECTIONS as u64,
        "of {CONNECTIONS} mesh connections after the first, {active} sent their ClientHello in \
         the SYN (TCPFastOpenActive, client pod) and {passive} were accepted with it \
         (TCPFastOpenPassive, server pod)"
    );
}

/// `TcpExt` counters of SYNs sent with data the server accepted (`TCPFastOpenActive`, in
/// `client`) and of connections accepted with data in their SYN (`TCPFastOpenPassive`, in
/// `server`).
fn fast_open_counts(client: &NetNs, server: &NetNs) -> (u64, u64) {
    (
        client.tcp_ext("TCPFastOpenActive"),
        server.tcp_ext("TCPFastOpenPassive"),
    )
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
    // Kernel state: the condition this test is about really held: TIME_WAIT sockets piled up
    // on the agent's leg (each lasts 60 s; a connect() that reuses one replaces it, and
    // connect() takes the even half of the range first, so about PORTS / 2 remain).
    assert!(
        waiting >= usize::from(PORTS / 4),
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

/// TIME_WAIT sockets in `ns` with local address `ip` (and port `port`, if given).
fn time_wait_from(ns: &NetNs, ip: IpAddr, port: Option<u16>) -> usize {
    let (file, addr) = match ip {
        IpAddr::V4(a) => ("tcp", format!("{:08X}", u32::from_le_bytes(a.octets()))),
        IpAddr::V6(a) => (
            "tcp6",
            a.octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
                .collect(),
        ),
    };
    let local = match port {
        Some(p) => format!("{addr}:{p:04X}"),
        None => format!("{addr}:"),
    };
    let table = ns.proc_net(file).expect("read the socket table");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].starts_with(&local) && f[3] == "06"
        })
        .count()
}

/// TIME_WAIT sockets in `ns` whose local address is the agent's source toward apps.
fn agent_time_wait(ns: &NetNs, v6: bool) -> usize {
    let source = if v6 {
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(interceptor::intercept::AGENT_SOURCE_V4)
    };
    time_wait_from(ns, source, None)
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
