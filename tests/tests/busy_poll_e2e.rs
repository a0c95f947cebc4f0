//! `tuning.relayBusyPollUs` with the real agent binary: the userspace relay's bounded busy
//! polling moves its `flows --stats` counters (spins that found the reply, spins that ran out)
//! while every flow's bytes arrive intact both ways, and an agent without the key never spins.
//!
//! Both pods are on the agent's node with the same-node fast path off, so each flow is relayed
//! twice by the one agent (client side and server side), in userspace (`ktls: off`, also in
//! the VMs). The load's flows send a 64-byte message or a 2 KiB step every 20 ms and the echo
//! server answers at once: each forwarded message is followed by a reply a hop or two away
//! (a spin finds it) and then 20 ms of nothing (a spin runs out).

use std::time::Duration;

use interceptor::config::KtlsMode;
use interceptor_tests::{
    in_vm,
    upgrade::{Bench, assert_exits, assert_intact},
};

fn load() -> &'static str {
    if in_vm() {
        "/bin/upgrade_load"
    } else {
        env!("CARGO_BIN_EXE_upgrade_load")
    }
}

const FLOWS: usize = 8;

/// Runs [`FLOWS`] flows for 2 s through an agent with `tuning.relayBusyPollUs: us` and
/// returns its `relay.busy_poll_*` counters (found, timed out, µs spun) once they ended, and
/// how many messages the flows sent.
fn run(node: u8, tag: &str, us: u32) -> ((u64, u64, u64), u64) {
    let window = Duration::from_secs(3);
    let mut b = Bench::new(node, tag, window, load());
    b.cfg.ktls = KtlsMode::Off;
    b.cfg.tuning.same_node_fast_path = false;
    b.cfg.tuning.relay_busy_poll_us = us;
    let mut agent = b.start(&[], &[]);
    b.wait_serving();
    let flows = b.flows(FLOWS, 2.0).finish(Duration::from_secs(30));
    assert_intact(&flows, FLOWS, &b.received);
    // `upgrade_load`: odd ids send 64-byte messages, even ids 2 KiB steps.
    let messages = flows
        .iter()
        .map(|f| f.sent as u64 / if f.id % 2 == 1 { 64 } else { 2 << 10 })
        .sum();
    let stats = agent.stats();
    let get = |key: &str| stats.get(key).copied().unwrap_or(0);
    let counts = (
        get("relay.busy_poll_found"),
        get("relay.busy_poll_timed_out"),
        get("relay.busy_poll_spun_us"),
    );
    agent.sigterm();
    assert_exits(&mut agent, window + Duration::from_secs(5), "the agent");
    (counts, messages)
}

#[test]
fn busy_polling_finds_replies_and_keeps_flows_intact() {
    const US: u32 = 200;
    let ((found, timed_out, spun_us), messages) = run(89, "bsp", US);
    eprintln!(
        "busy polls: {found} found, {timed_out} timed out, {spun_us} µs spun; {messages} messages"
    );
    // Every message is echoed: the spin after forwarding it finds the echo on its way back
    // (a hop away for the server side, three for the client side) unless the machine is
    // too loaded for even one of the ~800 messages; the pause behind each echo outlasts any
    // bound, so spins also run out.
    assert!(found > 0, "no spin found bytes ({timed_out} timed out)");
    assert!(timed_out > 0, "no spin ran out ({found} found)");
    // The wait for the app's next message (20 ms away) runs out every time: spun for after
    // every message, each of the two relays misses once per message (2 412 misses for ~800
    // messages at 7af2d88). After a miss that wait is left alone for 16 chances, so misses
    // stay well below one per message however loaded the machine is.
    assert!(
        timed_out < messages,
        "{timed_out} spins ran out for {messages} messages: a wait that runs out is spun for again and again"
    );
    // A spin that ran out spun at least its bound.
    assert!(
        spun_us >= timed_out * u64::from(US),
        "{spun_us} µs spun for {timed_out} spins of {US} µs that ran out"
    );
}

#[test]
fn without_the_key_the_relay_never_spins() {
    assert_eq!(run(85, "bso", 0).0, (0, 0, 0));
}
