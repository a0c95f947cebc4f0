//! What a misbehaving client may cost the agent: stalled ClientHellos cost no CPU while they
//! wait (classification is readiness-driven, with a deadline), a ClientHello that arrives in
//! pieces is still recognised, and a plaintext passthrough flow is subject to the idle
//! timeout like every other flow.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use interceptor_tests::{
    agent::{RunningAgent, workload},
    apps::busybox,
    flood::{Flood, mesh_client_hello},
    mesh::{NcSession, echo_server, stats_delta},
    require_privileged,
    scenario::{Cluster, Scenario, serve_blob},
};

/// The tests of this file run one at a time: one measures the CPU time of the whole process.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The agent's CPU time so far (it runs in this process): utime + stime from /proc.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    // Fields 14 and 15 of stat(5), counted from the state field (3).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn stalled_client_hellos_cost_no_cpu_and_split_ones_are_still_mesh() {
    require_privileged();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Scenario {
        client: legacy,
        mut server,
        node: _node,
    } = Scenario::new(62, "legacy", "httpbin");
    let _www = serve_blob(&mut server, "www", 1024);
    let cluster = Cluster::new("stall");
    let mut config = cluster.config(vec![workload(&server, "full", "httpbin")], vec![]);
    // A stalled classification lasts this long; the measurement runs well inside it.
    config.tuning.first_byte_wait_ms = 6_000;
    config.tuning.max_pending_handshakes_per_pod = 1_000;
    config.tuning.max_connections_per_pod = 1_000;
    let agent = RunningAgent::start(config);
    let dst = format!("{}:80", server.ip);

    // 300 connections that stop after a TLS record header announcing a 512-byte ClientHello.
    let stalled = Flood::start(
        legacy.command(env!("CARGO_BIN_EXE_flood")),
        &[&dst, "300", "160301020001"],
    );
    assert_eq!((stalled.connected, stalled.failed), (300, 0));
    std::thread::sleep(Duration::from_millis(300));
    let (t0, cpu0) = (Instant::now(), process_cpu());
    std::thread::sleep(Duration::from_secs(2));
    let (wall, cpu) = (t0.elapsed(), process_cpu() - cpu0);
    println!("agent CPU with 300 stalled ClientHellos: {cpu:?} in {wall:?}");
    assert!(
        cpu < Duration::from_millis(100),
        "300 stalled ClientHellos cost {cpu:?} of CPU in {wall:?}"
    );

    // A ClientHello whose first bytes come 300 ms before the rest is still classified as
    // mesh (the agent then handshakes, and this fake client fails it), not as plaintext.
    let hello = mesh_client_hello();
    let before = agent.agent.policy_stats();
    let split = Flood::start(
        legacy.command(env!("CARGO_BIN_EXE_flood")),
        &[&dst, "1", &hex(&hello[..6]), "300", &hex(&hello[6..])],
    );
    assert_eq!(split.connected, 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let delta = stats_delta(&before, &agent.agent.policy_stats());
        if delta.get("refused.handshake_failed") == Some(&1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a split mesh ClientHello was not handshaken: {delta:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(split);
    drop(stalled);
}

#[test]
fn idle_plaintext_passthrough_is_reset_after_the_idle_timeout() {
    require_privileged();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Scenario {
        client: legacy,
        server,
        node: _node,
    } = Scenario::new(63, "legacy", "echo");
    echo_server(&server, 9000);
    let cluster = Cluster::new("idle");
    let mut config = cluster.config(vec![workload(&server, "full", "echo")], vec![]);
    config.tuning.idle_timeout_secs = 1;
    let agent = RunningAgent::start(config);
    let dst = SocketAddr::from((server.ip, 9000));

    // Talking every 300 ms for 2.5 s: never idle for the timeout, stays open.
    let mut busy = NcSession::open(legacy.command(busybox()), dst);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2_500) {
        assert_eq!(
            busy.echo("ping", Duration::from_secs(2)).as_deref(),
            Some("ping"),
            "an active passthrough flow was closed after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let flows = agent.agent.flows();
    assert!(
        flows.iter().any(|r| r.pod == "echo"),
        "the flow is not an agent passthrough flow: {flows:?}"
    );

    // Silent: reset about one second after its last byte.
    let mut idle = NcSession::open(legacy.command(busybox()), dst);
    assert_eq!(
        idle.echo("hello", Duration::from_secs(2)).as_deref(),
        Some("hello")
    );
    let quiet = Instant::now();
    let closed = idle
        .wait_closed(Duration::from_secs(5))
        .expect("an idle passthrough flow was still open 5 s after its last byte");
    let after = closed - quiet;
    assert!(
        after >= Duration::from_millis(800),
        "closed after only {after:?}"
    );
    drop(busy);
}
