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

use std::time::{Duration, Instant};

use std::net::SocketAddr;

use interceptor_tests::{
    in_vm,
    process::AgentProcess,
    scenario::expected_protection,
    upgrade::{
        Bench, ECHO_PORT, Flows, ask_admin, assert_churn_clean, assert_exits, assert_intact,
        assert_tls_sockets_unchanged, await_handed_over, await_ktls_flows, cni_add, echo_server,
        enable_cni, flows_move, handed_over, handed_over_lines, handover_count, predecessor_flows,
        tls_sockets,
    },
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
/// Flows open across each upgrade on the host. Under TCG on a loaded machine 100 mTLS
/// handshakes at once do not finish within the load client's 20 s read timeout, so the VMs
/// run fewer.
const HOST_FLOWS: usize = 100;
const VM_FLOWS: usize = 20;

fn flows_n() -> usize {
    if in_vm() { VM_FLOWS } else { HOST_FLOWS }
}

#[test]
fn upgrade_under_load_keeps_every_flow_and_refuses_no_connection() {
    let b = Bench::new(94, "upa", Duration::from_secs(30), load());
    let mut old = b.start(&[], &[]);
    b.wait_serving();
    let capture = b.capture();
    // Under TCG (the VMs) 100 handshakes take a while: the flows last until all of them are
    // relayed by kTLS and the upgrade is done, and the connect loop starts once they are. On
    // the host they last until the new agent has reported them (below): a takeover under load
    // took over 4 s, longer than the 5 s flows had left.
    let flows = b.flows(flows_n(), if flows_move() { 40.0 } else { 20.0 });
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
        // The check must not depend on when they end: a poll that found none just before the
        // old agent's flows closed, while the load process was still finishing, used to fail
        // it. The flows outlast the takeover, so the count must show up while they run.
        while flows.running() && reported == 0 {
            reported = predecessor_flows(&new);
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            reported > 0,
            "the new agent never reported the flows its predecessor kept (the flows ended \
             before it did)"
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
    if !flows_move() {
        // Userspace flows: none moved, so none counted received and none logged handed
        // over; the old agent closed every one of them itself, with both ends' bytes.
        assert_eq!(
            handover_count(&new, "received"),
            0,
            "userspace flows received"
        );
        let lines = old.access_lines();
        assert!(
            handed_over_lines(&old).is_empty(),
            "userspace flows logged as handed over"
        );
        let ours = lines
            .iter()
            .filter(|l| l["dst_addr"] == b.dst.to_string() && l["outcome"] == "closed")
            .count();
        assert!(
            ours >= 2 * flows_n(),
            "{ours} flow ends to the echo server closed by the old agent, fewer than the {} \
             it kept",
            2 * flows_n()
        );
    }
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
    assert_tls_sockets_unchanged(&before, &after, flows_n());
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
    let mut b = Bench::new(95, "upk", Duration::from_secs(30), load());
    // A pod the CNI plugin enrolls during the second handover (below).
    let late = b.scenario.node.pod("upkl", 4);
    let late_received = echo_server(&late, ECHO_PORT);
    enable_cni(&mut b.cfg, &b.scenario.client, &late, "up");
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
    // Operators still reach the agent that serves: the killed successor never had the
    // admin socket's path.
    old.stats();
    b.assert_serving("after the killed handover");
    // A restart recovers: the next successor takes over. It stalls for 3 s holding the
    // listeners, before it confirms: a pod whose sandbox is set up meanwhile asks the old
    // agent, which has sent its pods and must not enroll one the successor would not get.
    let new = b.takeover(&[("INTERCEPTOR_HANDOVER_STALL_MS", "3000")]);
    let late_name = format!("up/{}", late.name);
    let answer = ask_admin(
        &b.cfg.admin_socket,
        &serde_json::json!({"cmd": "enroll-pod", "pod": {"namespace": "up", "name": late.name},
            "netns": late.netns_path(), "ips": [late.ip], "containerId": "direct"}),
    );
    assert_eq!(
        (&answer["result"], &answer["code"]),
        (&"error".into(), &"handing_over".into()),
        "the old agent's answer to an enrollment during the handover: {answer}"
    );
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(message.contains("handing its pods over"), "{message}");
    // The plugin asks again with backoff and reaches the successor once it answers on the
    // admin socket's path.
    let (out, took) = cni_add(&b.cfg, &late, "up");
    assert!(
        out.status.success(),
        "CNI ADD during the handover failed after {took:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("upgrade: CNI ADD during the handover took {took:?}");
    assert_exits(&mut old, Duration::from_secs(10), "the old agent");
    b.assert_serving("after the second handover");
    // Served by the successor: mTLS to the late pod, both ends' bytes hashed, nothing in
    // clear on its link.
    let late_capture = Capture::start_in(&b.scenario.node.ns.path(), &late.host_if);
    let late_dst = SocketAddr::from((late.ip, ECHO_PORT));
    let flows = Flows::start(
        b.scenario.client.command(load()),
        late_dst,
        4,
        1.0,
        &b.payload_file,
    );
    assert_intact(&flows.finish(Duration::from_secs(30)), 4, &late_received);
    let served = new
        .flows()
        .into_iter()
        .filter(|r| r.pod == late_name && r.protection == expected_protection())
        .count();
    assert!(
        served >= 4,
        "the successor lists {served} protected flows of {late_name}, not the 4 made"
    );
    assert_no_plaintext(&late_capture.stop(), &b.payload);
    b.assert_no_plaintext(capture);
}

#[test]
fn handover_between_protocol_versions_upgrade_rollback_and_fallback() {
    let b = Bench::new(96, "upv", Duration::from_secs(30), load());
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
    let b = Bench::new(97, "up5", Duration::from_secs(30), load());
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
    let b = Bench::new(98, "upd", window, load());
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

/// Only a process of the agent's own uid (root) may hand over or take listeners: the socket
/// file's mode keeps others out, and behind it the kernel's record of the peer
/// (`SO_PEERCRED`) is checked. A process that connected as another uid is refused, whichever
/// side it plays, before a message is read.
#[test]
fn a_handover_peer_of_another_uid_is_refused() {
    use std::os::unix::net::UnixListener;
    interceptor_tests::require_privileged();
    let dir = std::env::temp_dir().join(interceptor_tests::unique_name("hocred"));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    let path = dir.join("handover.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))
        .expect("chmod");
    // SAFETY: an all-zero sockaddr_un is valid; the path fits (checked below).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child makes only async-signal-safe calls on memory prepared before fork,
    // and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: raw syscalls on valid arguments; the child never returns.
        unsafe {
            interceptor_tests::close_all_but(&mut []);
            if libc::setuid(65534) != 0 {
                libc::_exit(2);
            }
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if s < 0 || libc::connect(s, (&raw const addr).cast(), len) != 0 {
                libc::_exit(3);
            }
            let mut b = [0u8; 1];
            libc::read(s, b.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    let (sock, _) = listener.accept().expect("accept");
    let refused = interceptor::handover::channel::Channel::new(sock).err();
    let mut status = 0;
    // SAFETY: waiting for our own child, which exits once the socket is closed.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    let _ = std::fs::remove_dir_all(&dir);
    let e = format!("{:#}", refused.expect("a peer of uid 65534 was accepted"));
    assert!(e.contains("uid 65534"), "{e}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "the child could not connect");
}
