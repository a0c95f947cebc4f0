//! Agent upgrades with kernel-TLS flows open (VM only: the host has no `tls` module). Open
//! kTLS flows move to the new agent with their sockets, pipes and relay state; the kernel's
//! TLS state never leaves the sockets.
//!
//! One agent lineage, one set of flows mid-transfer (bulk and request/response), many
//! upgrades: every step below must leave every flow with the same bytes at both ends
//! (SHA-256 of what each side sent and received), no payload byte in clear on the pods' link,
//! and new connections working throughout. One test instead of one per scenario because under
//! TCG an agent start and N handshakes cost seconds each: the flows are set up once and
//! carried through every step.
//!
//! 1. upgrade: the new agent lists every flow as handed over, and `/proc/net/tls_stat` of
//!    both pods' netns is unchanged (no kTLS socket closed or installed); the old agent's
//!    access log closes each moved flow end with outcome `handed_over`, and the new agent's
//!    `interceptor_handover_flows_total` counts as many `received`, none `refused` (so for
//!    every upgrade below);
//! 2. four more upgrades in a row under a connection loop (five in all), each successor
//!    holding every flow and its predecessor exiting;
//! 3. a successor killed mid-handover (after it holds the listeners, before `taken`): the
//!    running agent keeps the flows and keeps serving;
//! 4. rollback to an agent speaking only protocol version 1 (the release before flows moved):
//!    the flows stay in the old agent, which finishes them; the new one serves new
//!    connections.

use std::time::Duration;

use interceptor_tests::upgrade::{
    Bench, assert_churn_clean, assert_exits, assert_handover_accounted, assert_intact,
    assert_tls_sockets_unchanged, await_handed_over_within, await_ktls_flows, flows_move,
    handed_over, handed_over_lines, handover_count, predecessor_flows, tls_sockets,
};

/// Flows open across the upgrades: half bulk, half request/response.
const FLOWS: usize = 10;
/// Seconds the flows and the connection loop run unless stopped (they are, at the end).
const LIFETIME: f64 = 1800.0;

/// Progress on stderr as it happens, past libtest's capture (which holds `eprintln!` until
/// the test ends): the VM console then shows how far a slow run got, and its silence
/// watchdog sees a test that is slow, not hung.
fn say(what: &str, since: std::time::Instant) {
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr().lock(),
        "upgrade_ktls: {:>5.1} s {what}",
        since.elapsed().as_secs_f64()
    );
}

#[test]
fn ktls_flows_survive_five_upgrades_a_killed_successor_and_a_rollback() {
    let t0 = std::time::Instant::now();
    let mut b = Bench::new(92, "ukt", Duration::from_secs(30), "/bin/upgrade_load");
    assert!(
        flows_move(),
        "kTLS flows need the VMs' kernels (cargo xtask vm-test)"
    );
    say("bench set up", t0);
    let mut old = b.start(&[], &[]);
    b.wait_serving();
    say("agent serving", t0);
    let capture = b.capture();
    // Ended by `stop` once every step is done; the limit only bounds a stuck run. Not 300 s:
    // at host load 9 the steps took longer, the flows ended on their own during upgrade 4,
    // and it found nothing to hand over.
    let mut flows = b.flows(FLOWS, LIFETIME);
    await_ktls_flows(&old, 2 * FLOWS);
    say("flows relayed by kTLS", t0);

    // 1. No other connection is made meanwhile, so the kernel's counters must not move.
    let before = tls_sockets(&b);
    let upgrade = std::time::Instant::now();
    let mut agent = b.takeover(&[]);
    // Nothing measured yet: the bound of the old agent's wait for `taken`.
    await_handed_over_within(&agent, 2 * FLOWS, "upgrade 1", Duration::from_secs(180));
    let upgrade = upgrade.elapsed();
    say("upgrade 1: flows listed by the successor", t0);
    let after = tls_sockets(&b);
    assert_tls_sockets_unchanged(&before, &after, FLOWS);
    assert_exits(
        &mut old,
        Duration::from_secs(15),
        "the agent that handed over",
    );
    assert_handover_accounted(&old, &agent, 2 * FLOWS, "upgrade 1");
    assert!(flows.running(), "the flows ended before the first upgrade");
    say(
        "upgrade 1: flows moved, tls_stat unchanged, counted and logged",
        t0,
    );

    // 2. Four more, with new connections opened in a loop throughout. A new connection made
    //    while the listeners pass between agents waits in their accept queue until the
    //    successor accepts, which under TCG on a loaded host has taken over 4 s: the bound
    //    is twice what a whole takeover took here just now (at least the 5 s of the host
    //    tests). A refused, reset or never-served connection still fails.
    let timeout = (2 * upgrade).clamp(Duration::from_secs(5), Duration::from_secs(120));
    // Each later takeover may take as long as the first, with the connection loop beside it:
    // three times what it took (at least the usual 120 s). Seen: 76 s for the first one at
    // host load 9, and a fourth one not done within 120 s.
    let takeover = (3 * upgrade).clamp(Duration::from_secs(120), Duration::from_secs(600));
    say(
        &format!(
            "upgrade 1 took {:.1} s: new connections fail after {:.1} s",
            upgrade.as_secs_f64(),
            timeout.as_secs_f64()
        ),
        t0,
    );
    b.conn_timeout = timeout;
    let churn = b.churn(LIFETIME);
    for i in 2..=5 {
        let next = b.takeover(&[]);
        await_handed_over_within(&next, 2 * FLOWS, &format!("upgrade {i}"), takeover);
        let mut prev = std::mem::replace(&mut agent, next);
        assert_exits(
            &mut prev,
            Duration::from_secs(15),
            &format!("agent {}", i - 1),
        );
        assert_handover_accounted(&prev, &agent, 2 * FLOWS, &format!("upgrade {i}"));
        say(&format!("upgrade {i}: flows moved, counted and logged"), t0);
    }
    assert!(flows.running(), "the flows ended before the fifth upgrade");

    // 3. Killed while it holds the listeners, before it told the running agent anything.
    let doomed = b.takeover(&[("INTERCEPTOR_HANDOVER_STALL_MS", "60000")]);
    std::thread::sleep(Duration::from_secs(1));
    doomed.kill9();
    assert!(
        agent.running(),
        "the running agent exited after the killed handover"
    );
    assert_eq!(
        handed_over(&agent),
        2 * FLOWS,
        "flows after the killed handover"
    );
    b.assert_serving("after the killed handover");
    say("killed successor: the running agent kept every flow", t0);

    // 4. Rollback: a version-1 successor takes the listeners, the flows stay here.
    let mut back = b.takeover(&[("INTERCEPTOR_HANDOVER_VERSIONS", "1")]);
    assert_eq!(
        (handed_over(&back), handover_count(&back, "received")),
        (0, 0),
        "a version-1 successor took kTLS flows"
    );
    assert!(
        predecessor_flows(&back) >= 2 * FLOWS as u64,
        "the rolled-back agent does not report the flows its predecessor kept"
    );
    assert!(flows.running(), "the flows ended before the rollback");
    say("rollback: flows stay with the old agent", t0);

    flows.stop();
    let results = flows.finish(Duration::from_secs(60));
    assert_intact(&results, FLOWS, &b.received);
    let sent: usize = results.iter().map(|r| r.sent).sum();
    let mut churn = churn;
    churn.stop();
    let ok = assert_churn_clean(churn, "across the upgrades");
    assert_exits(
        &mut agent,
        Duration::from_secs(15),
        "the agent that kept its flows at the rollback",
    );
    assert!(
        handed_over_lines(&agent).is_empty(),
        "the agent that kept its flows logged some as handed over"
    );
    b.assert_serving("after the rollback");
    say(
        &format!("{FLOWS} flows intact ({sent} bytes each way), {ok} new connections, none failed"),
        t0,
    );
    assert!(back.running(), "the rolled-back agent exited");
    b.assert_no_plaintext(capture);
}
