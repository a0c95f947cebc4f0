//! Agent upgrades (`interceptor run --takeover`, `handover:` in the node config) with the real
//! agent binary, on the host (userspace relay: open flows stay in the old agent until they
//! end) and in the VMs (kTLS: open flows move to the new agent, sockets and all).
//!
//! What must hold across an upgrade: every flow open during it ends with the same bytes at
//! both ends (SHA-256 of what each side sent and received), a client opening new connections
//! in a loop throughout sees no failure (the listeners are handed over, never closed), and no
//! payload byte crosses the pods' link in clear. The same holds when the new agent is killed
//! half-way, when the protocol versions differ by one either way (upgrade and rollback), for
//! five upgrades in a row, and for SIGTERM without a successor (drain).

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use std::collections::HashMap;

use interceptor::{
    config::{Config, HandoverSettings, Ttl},
    intercept::table::Protection,
};
use interceptor_tests::{
    agent::{PinCleanup, workload},
    apps::random_payload,
    crypto::tls_stat,
    in_vm,
    process::AgentProcess,
    require_privileged,
    scenario::{Cluster, Scenario, expected_protection},
    upgrade::{Churn, Flows, Received, assert_intact, echo_server},
    wire::{Capture, assert_no_plaintext},
};

/// The load client: built beside this suite, installed at `/bin` in the VM guest.
fn load() -> &'static str {
    if in_vm() {
        "/bin/upgrade_load"
    } else {
        env!("CARGO_BIN_EXE_upgrade_load")
    }
}
const PORT: u16 = 9000;
/// Flows open across each upgrade on the host. Under TCG on a loaded machine 100 mTLS
/// handshakes at once do not finish within the load client's 20 s read timeout, so the VMs
/// run fewer.
const HOST_FLOWS: usize = 100;
const VM_FLOWS: usize = 20;

fn flows_n() -> usize {
    if in_vm() { VM_FLOWS } else { HOST_FLOWS }
}

/// One node, a client and a server pod, an echo server, and the agent's config with a
/// handover socket; everything removed when dropped (pins included).
struct Bench {
    scenario: Scenario,
    _cluster: Cluster,
    cfg: Config,
    file: PathBuf,
    payload: Vec<u8>,
    payload_file: PathBuf,
    received: Received,
    dst: SocketAddr,
    _pins: PinCleanup,
}

impl Bench {
    fn new(node: u8, tag: &str, drain: Duration) -> Bench {
        require_privileged();
        let scenario = Scenario::new(node, &format!("{tag}c"), &format!("{tag}s"));
        let cluster = Cluster::new(tag);
        let mut cfg = cluster.config(
            vec![
                workload(&scenario.client, "up", "client"),
                workload(&scenario.server, "up", "server"),
            ],
            vec![],
        );
        // The echo app never speaks first: a client agent slowed by a loaded machine must not
        // have its mTLS flow taken for plaintext after the default 200 ms.
        cfg.tuning.first_byte_wait_ms = 5_000;
        // 100 handshakes at once under TCG (the VMs) take longer than the default 5 s.
        if in_vm() {
            cfg.tuning.handshake_timeout_ms = 30_000;
        }
        cfg.handover = Some(HandoverSettings {
            socket: cluster.scratch.0.join("handover").join("handover.sock"),
            drain_window: Ttl(drain),
        });
        let pins = PinCleanup(cfg.bpffs.clone());
        let file = cluster.scratch.0.join("node.yaml");
        let payload = random_payload(1 << 20);
        let payload_file = cluster.scratch.0.join("payload");
        std::fs::write(&payload_file, &payload).expect("write payload");
        let received = echo_server(&scenario.server, PORT);
        let dst = SocketAddr::from((scenario.server.ip, PORT));
        Bench {
            scenario,
            _cluster: cluster,
            cfg,
            file,
            payload,
            payload_file,
            received,
            dst,
            _pins: pins,
        }
    }

    fn start(&self, args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        AgentProcess::start_with(&self.cfg, &self.file, args, env)
    }

    fn takeover(&self, env: &[(&str, &str)]) -> AgentProcess {
        self.start(&["--takeover"], env)
    }

    fn capture(&self) -> Capture {
        Capture::start_in(&self.scenario.node.ns.path(), &self.scenario.server.host_if)
    }

    fn flows(&self, n: usize, secs: f64) -> Flows {
        Flows::start(
            self.scenario.client.command(load()),
            self.dst,
            n,
            secs,
            &self.payload_file,
        )
    }

    fn churn(&self, secs: f64) -> Churn {
        Churn::start(self.scenario.client.command(load()), self.dst, secs)
    }

    /// Waits until a mesh connection works (the first one mints both leaves).
    fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, _, _) = self.churn(0.2).finish(Duration::from_secs(20));
            if ok > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "no flow served");
        }
    }

    /// A short loop of new connections that must all work.
    fn assert_serving(&self, what: &str) {
        let (ok, failed, errors) = self.churn(0.5).finish(Duration::from_secs(20));
        assert!(
            ok > 0 && failed == 0,
            "{what}: {ok} connections worked, {failed} failed: {errors:?}"
        );
    }

    fn assert_no_plaintext(&self, capture: Capture) {
        let frames = capture.stop();
        assert_no_plaintext(&frames, &self.payload);
    }
}

/// Whether open flows move to the new agent here: kTLS flows do (the VMs), userspace-relay
/// flows stay in the old agent (the host).
fn flows_move() -> bool {
    expected_protection() == Protection::Ktls
}

/// Open flows the agent lists as handed over by its predecessor (two rows per connection:
/// the client pod's outbound flow and the server pod's inbound one).
fn handed_over(agent: &AgentProcess) -> usize {
    agent
        .flows()
        .iter()
        .filter(|r| r.handed_over && !r.closed)
        .count()
}

/// Waits until `agent` lists `want` handed-over flows.
fn await_handed_over(agent: &AgentProcess, want: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = handed_over(agent);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the new agent lists {got} handed-over flows, not {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `agent` relays `want` open flows with kTLS (set-up done: only those move).
fn await_ktls_flows(agent: &AgentProcess, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = agent
            .flows()
            .iter()
            .filter(|r| !r.closed && r.protection == Protection::Ktls)
            .count();
        if got >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{got} open kTLS flows, not the {want} expected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The kTLS counters of both pods' netns.
fn tls_sockets(b: &Bench) -> [HashMap<String, u64>; 2] {
    [tls_stat(&b.scenario.client), tls_stat(&b.scenario.server)]
}

/// The old agent exits once its flows are done (well before its drain window).
fn assert_exits(agent: &mut AgentProcess, limit: Duration, what: &str) {
    let status = agent.wait_exit(limit);
    assert!(status.is_some(), "{what} still running after {limit:?}");
}

/// `handover.predecessor_flows` of `flows --stats`.
fn predecessor_flows(agent: &AgentProcess) -> u64 {
    agent
        .stats()
        .get("handover.predecessor_flows")
        .copied()
        .expect("handover.predecessor_flows in flows --stats")
}

fn assert_churn_clean(churn: Churn, what: &str) -> u64 {
    let (ok, failed, errors) = churn.finish(Duration::from_secs(30));
    assert!(
        failed == 0 && ok > 10,
        "{what}: {ok} new connections worked, {failed} failed: {errors:?}"
    );
    ok
}

#[test]
fn upgrade_under_load_keeps_every_flow_and_refuses_no_connection() {
    let b = Bench::new(94, "upa", Duration::from_secs(30));
    let mut old = b.start(&[], &[]);
    b.wait_serving();
    let capture = b.capture();
    // Under TCG (the VMs) 100 handshakes take a while: the flows last until all of them are
    // relayed by kTLS and the upgrade is done, and the connect loop starts once they are.
    let flows = b.flows(flows_n(), if flows_move() { 40.0 } else { 5.0 });
    if flows_move() {
        await_ktls_flows(&old, 2 * flows_n());
    }
    let churn = b.churn(5.0);
    std::thread::sleep(Duration::from_secs(1));
    let new = b.takeover(&[]);
    let mut flows = flows;
    let mut reported = 0;
    if flows_move() {
        // kTLS: every open flow moves, both of its rows, and the old agent keeps none.
        await_handed_over(&new, 2 * flows_n(), "upgrade");
        assert!(flows.running(), "the flows ended before the check");
    } else {
        // The old agent keeps the open flows and reports them to the new one until they end.
        let mut reported_while_running = false;
        while flows.running() && reported == 0 {
            reported = predecessor_flows(&new);
            reported_while_running = flows.running();
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            reported > 0 || !reported_while_running,
            "the new agent never reported the flows its predecessor kept"
        );
        assert_eq!(handed_over(&new), 0, "userspace flows are not handed over");
    }
    let results = flows.finish(Duration::from_secs(40));
    assert_intact(&results, flows_n(), &b.received);
    let ok = assert_churn_clean(churn, "during the upgrade");
    eprintln!(
        "upgrade: {} flows intact, {ok} new connections, none failed",
        flows_n()
    );
    assert_exits(&mut old, Duration::from_secs(10), "the old agent");
    let deadline = Instant::now() + Duration::from_secs(5);
    while predecessor_flows(&new) != 0 {
        assert!(
            Instant::now() < deadline,
            "flows of an exited predecessor still reported"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("upgrade: the new agent saw {reported} flows kept by its predecessor");
    b.assert_serving("after the old agent exited");
    // The new agent carries the new flows, and says which pods it took over.
    assert!(!new.flows().is_empty(), "the new agent lists no flow");
    if flows_move() {
        assert_ktls_sockets_survive(&b, new);
    }
    b.assert_no_plaintext(capture);
}

/// kTLS flows mid-transfer move to the next agent without a new kTLS socket: the kernel's
/// counters of both pods' netns are the same before and after (no socket closed, none
/// installed), with no other connection made meanwhile.
fn assert_ktls_sockets_survive(b: &Bench, mut old: AgentProcess) {
    let flows = b.flows(flows_n(), 15.0);
    await_ktls_flows(&old, 2 * flows_n());
    let before = tls_sockets(b);
    let new = b.takeover(&[]);
    await_handed_over(&new, 2 * flows_n(), "second upgrade");
    let after = tls_sockets(b);
    for (pod, (before, after)) in ["client", "server"].iter().zip(before.iter().zip(&after)) {
        for key in ["TlsCurrTxSw", "TlsCurrRxSw", "TlsTxSw", "TlsRxSw"] {
            assert_eq!(
                before.get(key),
                after.get(key),
                "{pod} netns {key}: before {before:?}, after {after:?}"
            );
        }
        let open = before.get("TlsCurrTxSw").copied().unwrap_or(0);
        assert!(
            open >= flows_n() as u64,
            "{pod} netns: {open} kTLS sockets open, fewer than the {} flows",
            flows_n()
        );
    }
    eprintln!("upgrade: tls_stat unchanged across the takeover: {after:?}");
    assert_exits(
        &mut old,
        Duration::from_secs(10),
        "the agent that handed its flows over",
    );
    assert_intact(
        &flows.finish(Duration::from_secs(40)),
        flows_n(),
        &b.received,
    );
}

#[test]
fn killing_the_new_agent_mid_handover_leaves_the_old_one_serving() {
    let b = Bench::new(95, "upk", Duration::from_secs(30));
    let mut old = b.start(&[], &[]);
    b.wait_serving();
    let capture = b.capture();
    let flows = b.flows(flows_n() / 2, 5.0);
    let churn = b.churn(5.0);
    std::thread::sleep(Duration::from_millis(500));
    // The new agent holds every listener (and its programs are attached and pinned), but has
    // not told the old one yet: killed there, the old one must go on as if it had never come.
    let new = b.takeover(&[("INTERCEPTOR_HANDOVER_STALL_MS", "60000")]);
    std::thread::sleep(Duration::from_millis(500));
    new.kill9();
    let results = flows.finish(Duration::from_secs(40));
    assert_intact(&results, flows_n() / 2, &b.received);
    assert_churn_clean(churn, "across the killed handover");
    assert!(
        old.running(),
        "the old agent exited after the failed handover"
    );
    b.assert_serving("after the killed handover");
    // A restart recovers: the next successor takes over.
    let _new = b.takeover(&[]);
    assert_exits(&mut old, Duration::from_secs(10), "the old agent");
    b.assert_serving("after the second handover");
    b.assert_no_plaintext(capture);
}

#[test]
fn handover_between_protocol_versions_upgrade_rollback_and_fallback() {
    let b = Bench::new(96, "upv", Duration::from_secs(30));
    // N → N+1: an agent speaking only 1 hands over to one speaking 1-2 (they agree on 1).
    let mut old = b.start(&[], &[("INTERCEPTOR_HANDOVER_VERSIONS", "1")]);
    b.wait_serving();
    let capture = b.capture();
    let flows = b.flows(20, 3.0);
    let churn = b.churn(3.0);
    std::thread::sleep(Duration::from_millis(500));
    let mut next = b.takeover(&[("INTERCEPTOR_HANDOVER_VERSIONS", "1-2")]);
    assert_intact(&flows.finish(Duration::from_secs(30)), 20, &b.received);
    assert_churn_clean(churn, "upgrade N to N+1");
    assert_exits(&mut old, Duration::from_secs(10), "agent N");
    // N+1 → N: rollback.
    let flows = b.flows(20, 3.0);
    let churn = b.churn(3.0);
    std::thread::sleep(Duration::from_millis(500));
    let mut back = b.takeover(&[("INTERCEPTOR_HANDOVER_VERSIONS", "1")]);
    assert_intact(&flows.finish(Duration::from_secs(30)), 20, &b.received);
    assert_churn_clean(churn, "rollback N+1 to N");
    assert_exits(&mut next, Duration::from_secs(10), "agent N+1");
    // No common version: the old agent closes its listeners and keeps its flows, the new
    // one binds its own (a restart: new connections may be refused meanwhile, never clear).
    let flows = b.flows(20, 3.0);
    std::thread::sleep(Duration::from_millis(500));
    let _far = b.takeover(&[("INTERCEPTOR_HANDOVER_VERSIONS", "3")]);
    assert_intact(&flows.finish(Duration::from_secs(30)), 20, &b.received);
    assert_exits(
        &mut back,
        Duration::from_secs(10),
        "the agent that stepped down",
    );
    b.assert_serving("after the fallback restart");
    b.assert_no_plaintext(capture);
}

#[test]
fn five_upgrades_in_a_row_under_load() {
    let b = Bench::new(97, "up5", Duration::from_secs(30));
    let mut agents = vec![b.start(&[], &[])];
    b.wait_serving();
    let capture = b.capture();
    // kTLS flows move with every upgrade: each successor waits until it holds them all (the
    // VM is slow enough that five agents starting at once would starve the handshakes).
    let secs = if flows_move() { 30.0 } else { 6.0 };
    let flows = b.flows(flows_n(), secs);
    let churn = b.churn(secs);
    if flows_move() {
        await_ktls_flows(&agents[0], 2 * flows_n());
    }
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        agents.push(b.takeover(&[]));
        if flows_move() {
            let new = agents.last().expect("agents");
            await_handed_over(new, 2 * flows_n(), &format!("upgrade {}", i + 1));
        }
    }
    assert_intact(
        &flows.finish(Duration::from_secs(40)),
        flows_n(),
        &b.received,
    );
    let ok = assert_churn_clean(churn, "five upgrades");
    eprintln!(
        "five upgrades: {} flows intact, {ok} new connections, none failed",
        flows_n()
    );
    let last = agents.pop().expect("agents");
    for (i, a) in agents.iter_mut().enumerate() {
        assert_exits(a, Duration::from_secs(10), &format!("agent {i}"));
    }
    b.assert_serving("after five upgrades");
    drop(last);
    b.assert_no_plaintext(capture);
}

#[test]
fn sigterm_without_a_successor_serves_through_the_drain_window_then_fails_closed() {
    let window = Duration::from_secs(5);
    let b = Bench::new(98, "upd", window);
    let mut agent = b.start(&[], &[]);
    b.wait_serving();
    let capture = b.capture();
    let flows = b.flows(20, 2.0);
    agent.sigterm();
    let stopped = Instant::now();
    // Still accepting while it waits for a successor: nothing is refused.
    assert_churn_clean(b.churn(2.5), "after SIGTERM, inside the drain window");
    assert_intact(&flows.finish(Duration::from_secs(30)), 20, &b.received);
    assert_exits(
        &mut agent,
        window + Duration::from_secs(5),
        "the draining agent",
    );
    assert!(
        stopped.elapsed() >= window - Duration::from_millis(500),
        "exited after {:?}, before its drain window ({window:?}) without a successor",
        stopped.elapsed()
    );
    // Down: the pods fail closed (the mesh destination is steered to nothing).
    let (ok, failed, _) = b.churn(0.3).finish(Duration::from_secs(20));
    assert!(
        ok == 0 && failed > 0,
        "with no agent, {ok} connections worked"
    );
    // And a successor arriving during a drain takes over at once.
    let mut agent = b.start(&[], &[]);
    b.wait_serving();
    let flows = b.flows(20, 3.0);
    agent.sigterm();
    std::thread::sleep(Duration::from_millis(300));
    let _next = b.takeover(&[]);
    assert_intact(&flows.finish(Duration::from_secs(30)), 20, &b.received);
    assert_exits(
        &mut agent,
        Duration::from_secs(5),
        "the agent that handed over",
    );
    b.assert_serving("after the handover during a drain");
    b.assert_no_plaintext(capture);
}
