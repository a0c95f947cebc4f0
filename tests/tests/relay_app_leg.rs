//! The userspace relay's app leg under sk_msg (`tuning.relayAppLeg: skMsg`), end to end with
//! the agent: what the apps send reaches the agent's ends of their loopback connections by
//! redirect (counted by the program), every byte arrives exactly once and in order (hashes,
//! both directions, bulk beyond the window included), nothing crosses the pods' link in
//! clear, and the join's map entries go when the flows end. (An agent's end that closes
//! leaves the socket map by itself, and the program then sends by TCP: `skmsg_join.rs`.)

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use interceptor::{config::RelayAppLeg, datapath::Counter, intercept::table::Protection};
use interceptor_tests::{
    agent::{RunningAgent, workload},
    apps::{assert_bulk_both_ways, curl, serve_http_enrolled, serve_upload_hasher, sha256_hex},
    in_vm,
    scenario::{Cluster, Scenario, Www},
    wire::{Capture, assert_no_plaintext},
};

/// Waits (5 s at most) until the join's maps hold nothing for ended flows.
fn join_maps_empty(agent: &RunningAgent) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let entries = agent.agent.join_entries().expect("the join is on");
        if entries == (0, 0, 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "join entries (grants, peer sockets, sent counts) left after the flows ended: \
             {entries:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn relay_app_leg_redirects_exactly_once_in_order_and_leaves_nothing_behind() {
    interceptor_tests::require_privileged();
    if in_vm() {
        // kTLS flows are never armed (their relay splices the app leg); the host runs the
        // userspace relay this option is for.
        eprintln!("skipped: the VM runs kTLS");
        return;
    }
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(46, "ralc", "rals");
    let www = Www::with_blob("wwwral", 256 << 10);
    // Beyond the window (1 MiB) both ways.
    let bulk_want = www.add("bulk", 24 << 20);
    // Inside the server pod's cgroup: sockops registers only enrolled pods' sockets.
    let probe = SocketAddr::from((server.ip, 8081));
    serve_http_enrolled(&mut server, www.path(), "8081", probe);
    serve_upload_hasher(&server, 8080);
    let cluster = Cluster::new("agentral");
    let mut cfg = cluster.config(
        vec![
            workload(&client, "a", "client"),
            workload(&server, "a", "server"),
        ],
        vec![],
    );
    cfg.tuning.relay_app_leg = RelayAppLeg::SkMsg;
    let agent = RunningAgent::start(cfg);
    let before = agent.agent.counters();
    let capture = Capture::start_in(&node.ns.path(), &server.host_if);
    for _ in 0..3 {
        let f = curl(
            client.command("curl"),
            &format!("http://{}:8081/blob", server.ip),
        );
        assert_eq!(
            (f.code.as_str(), f.sha256().as_str()),
            ("200", www.want.as_str())
        );
    }
    let after = agent.agent.counters();
    let redirected = after.get(Counter::JoinRedirected) - before.get(Counter::JoinRedirected);
    // Per connection at least the head of the server's response (the client's only request
    // is sent before the agent has armed the flow, so it takes TCP).
    assert!(
        redirected >= 3,
        "the program redirected {redirected} messages for 3 requests: {before:?} → {after:?}"
    );
    // Bulk, server app → agent (the download) and client app → agent (the upload), each
    // past the window: they fall back to TCP, still byte-exact.
    assert_bulk_both_ways(
        &client,
        &format!("http://{}:8081/bulk", server.ip),
        &format!("http://{}:8080/", server.ip),
        &www.path().join("bulk"),
        &bulk_want,
        "past the window",
    );
    let end = agent.agent.counters();
    assert!(
        end.get(Counter::JoinFellBack) > after.get(Counter::JoinFellBack),
        "bulk never went past the window: {after:?} → {end:?}"
    );
    assert_no_plaintext(&capture.stop(), &www.payload);
    let rows = agent.agent.flows_with_recent();
    assert!(
        rows.iter().any(|r| r.pod == "ralc"),
        "no client flow listed"
    );
    for r in rows.iter().filter(|r| r.pod == "ralc" || r.pod == "rals") {
        assert_eq!(r.protection, Protection::Userspace, "{r:?}");
    }
    join_maps_empty(&agent);

    // One keep-alive connection, 20 requests on it: every response byte-exact, in order, and
    // the client's requests after the first redirected (the first read is published).
    let before = agent.agent.counters().get(Counter::JoinRedirected);
    let url = format!("http://{}:8081/blob", server.ip);
    let out = client
        .command("curl")
        .args(["-sS", "--max-time", "30"])
        .args(std::iter::repeat_n(url.as_str(), 20))
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl: {out:?}");
    assert_eq!(
        sha256_hex(&out.stdout),
        sha256_hex(&www.payload.repeat(20)),
        "20 responses on one connection"
    );
    let redirected = agent.agent.counters().get(Counter::JoinRedirected) - before;
    assert!(
        redirected >= 19 + 20,
        "{redirected} messages redirected for 20 requests and responses on one connection"
    );
    join_maps_empty(&agent);
}
