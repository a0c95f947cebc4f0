//! One pod flooding the agent with connections must not deny service to the others: the
//! agent holds at most `maxConnectionsPerPod` flows for it (`maxPendingHandshakesPerPod` of
//! them in set-up) and resets the rest, so another pod's requests keep succeeding over mTLS.
//!
//! The agent runs in this process; the process's descriptor limit is lowered (its own test
//! binary, so no other test shares it) to stand for a node's, scaled down: without the caps
//! the flood's flows take every descriptor and the other pod's connections are never
//! accepted.

use std::time::Duration;

use interceptor_tests::{
    agent::workload,
    flood::Flood,
    mesh::{PolicyDir, curl, flows_after, last_flow_id, stats_delta},
    require_privileged,
    scenario::{Cluster, Scenario, expected_protection, serve_blob},
};

const FD_LIMIT: u64 = 3072;
const STRICT_MESH: &str = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
";

fn lower_fd_limit(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: `lim` is a valid rlimit for the duration of the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
    assert_eq!(rc, 0, "setrlimit");
}

#[test]
fn a_flooding_pod_cannot_stop_another_pods_requests() {
    require_privileged();
    lower_fd_limit(FD_LIMIT);
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(61, "sleep", "httpbin");
    let flooder = node.pod("flooder", 4);
    let www = serve_blob(&mut server, "www", 64 << 10);
    interceptor_tests::mesh::echo_server(&server, 9000);
    let policy = PolicyDir::new();
    policy.write("mesh.yaml", STRICT_MESH);
    let cluster = Cluster::new("flood");
    let mut config = cluster.config(
        vec![
            workload(&client, "full", "sleep"),
            workload(&server, "full", "httpbin"),
            workload(&flooder, "full", "flooder"),
        ],
        vec![],
    );
    config.policy_dir = Some(policy.path());
    config.tuning.max_connections_per_pod = 64;
    config.tuning.max_pending_handshakes_per_pod = 16;
    let agent = interceptor_tests::agent::RunningAgent::start(config);
    let before = agent.agent.policy_stats();

    // 1500 connections held open by the flooder, each a mesh flow through the agent to the
    // echo server if admitted: far more than the agent's descriptors allow.
    let flood = Flood::start(
        flooder.command(env!("CARGO_BIN_EXE_flood")),
        &[&format!("{}:9000", server.ip), "1500", "68690a"],
    );
    assert!(flood.connected > 0, "the flood opened nothing");
    std::thread::sleep(Duration::from_millis(500));

    // While it holds them: the other pod's requests succeed, over mTLS (STRICT: plaintext
    // would be refused), with the payload intact.
    for i in 0..5 {
        let last = last_flow_id(&agent.agent);
        let f = curl(
            client.command("curl"),
            &format!("http://{}/blob", server.ip),
            &["-m", "5"],
        );
        assert_eq!(
            f.code, "200",
            "request {i} of the other pod failed during the flood (curl exit {})",
            f.exit
        );
        assert_eq!(
            interceptor_tests::apps::sha256_hex(&f.body),
            www.want,
            "payload corrupted"
        );
        let flows = flows_after(&agent.agent, last);
        let out = flows
            .iter()
            .find(|r| r.pod == "sleep")
            .unwrap_or_else(|| panic!("no outbound flow of the client pod: {flows:?}"));
        assert_eq!(out.protection, expected_protection(), "{out:?}");
        assert_eq!(
            out.peer_id.as_deref(),
            Some("spiffe://cluster.local/ns/full/sa/httpbin")
        );
    }

    // The flood was capped, and every refusal counted by reason.
    let held = agent
        .agent
        .flows()
        .iter()
        .filter(|r| r.pod == "flooder")
        .count();
    assert!(held <= 64, "{held} flows held for the flooding pod, cap 64");
    let delta = stats_delta(&before, &agent.agent.policy_stats());
    let refused = delta
        .get("refused.pod_connection_limit")
        .copied()
        .unwrap_or(0)
        + delta
            .get("refused.pod_handshake_limit")
            .copied()
            .unwrap_or(0);
    assert!(
        refused as usize + held >= flood.connected.min(1500) / 2,
        "flood of {} connections: {refused} refusals counted, {held} held: {delta:?}",
        flood.connected
    );
    drop(flood);
}
