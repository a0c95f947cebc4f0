//! Spare mesh sessions (`tuning.meshSpares`) across two nodes, each with its own agent: the
//! client pod's agent keeps spares toward the server pod, and requests use them. What must
//! hold, each checked on both agents' counters and on the app's bytes (hashes):
//!
//! 1. a request finds a spare ready: the client's agent claims it (`spares.used`), the
//!    server's agent decides the flow only then (`spares.claimed`);
//! 2. after a policy reload on the client's node, no spare made before it is used
//!    (`spares.stale_policy`), and the request still succeeds on a fresh dial;
//! 3. after the CA bundle changes (a new leaf), no spare made with the old leaf is used
//!    (`spares.stale_cert`);
//! 4. a DENY put into effect on the server's node refuses the request that claims a spare
//!    made before it: the server's agent decides when the spare is claimed;
//! 5. after the server's agent restarts, the spares it held are dead (`spares.dead`) and the
//!    next requests succeed on fresh dials: no failure the app sees;
//! 6. the wire oracle: no payload byte in clear on the link between the nodes.
//!
//! Host only: spares serve flows the userspace relay carries.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use interceptor::{
    app::Agent,
    ca::{Ca, OnExisting},
    config::ConnectionKeysMode,
};
use interceptor_tests::{
    agent::{RunningAgent, TempDir, peer, workload},
    apps::curl,
    mesh::{PolicyDir, stat, stats_delta, unrelated_policy, wait_generation},
    require_privileged,
    scenario::{Cluster, serve_blob},
    topology::{Node, wire},
    wire::{Capture, assert_no_plaintext},
};

const SPARES: u32 = 2;

/// DENY the client everywhere (written on the server's node).
const DENY_CLIENT: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: spb}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/spa/sa/client"]
"#;

/// Spares the client's agent holds now: every opened spare ends in exactly one outcome.
fn ready(agent: &Agent) -> u64 {
    let s = agent.policy_stats();
    let ended: u64 = ["used", "stale_cert", "stale_policy", "expired", "dead"]
        .iter()
        .map(|o| stat(&s, &format!("spares.{o}")))
        .sum();
    stat(&s, "spares.opened").saturating_sub(ended)
}

/// Waits until the client's agent holds all its spares again.
fn wait_ready(agent: &Agent, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready(agent) < u64::from(SPARES) {
        assert!(
            Instant::now() < deadline,
            "{step}: spares not refilled: {:?}",
            agent.policy_stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_atomic(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn spares_are_used_and_never_outlive_policy_leaf_or_peer() {
    require_privileged();
    let node1 = Node::new(97);
    let node2 = Node::new(98);
    let wire_if = wire(&node1, &node2);
    let client = node1.pod("spclient", 2);
    let mut server = node2.pod("spserver", 3);
    let www = serve_blob(&mut server, "wwwsp", 96 << 10);
    let url = format!("http://{}/blob", server.ip);

    let cluster = Cluster::new("spares");
    let (policy1, policy2) = (PolicyDir::new(), PolicyDir::new());
    let mut c1 = cluster.node_config(
        "n1",
        vec![workload(&client, "spa", "client")],
        vec![peer(&server, "spb", "server")],
    );
    let mut c2 = cluster.node_config(
        "n2",
        vec![workload(&server, "spb", "server")],
        vec![peer(&client, "spa", "client")],
    );
    // Spares stand in for handshakes; with derived keys (the default) a connection after
    // the first needs neither, so this counts spares in `handshake` mode.
    c1.tuning.connection_keys = ConnectionKeysMode::Handshake;
    c2.tuning.connection_keys = ConnectionKeysMode::Handshake;
    c1.tuning.mesh_spares = SPARES;
    c1.tuning.spare_idle_ms = 30_000;
    c1.identity.ca_poll_ms = 100;
    c1.policy_dir = Some(policy1.path());
    c2.policy_dir = Some(policy2.path());
    let agent1 = RunningAgent::start(c1);
    let mut agent2 = Some(RunningAgent::start(c2.clone()));
    let server_agent = |a: &Option<RunningAgent>| std::sync::Arc::clone(&a.as_ref().unwrap().agent);
    let capture = Capture::start_in(&node1.ns.path(), &wire_if);
    let get = |step: &str| {
        let f = curl(client.command("curl"), &url);
        assert_eq!(
            (f.code.as_str(), f.sha256()),
            ("200", www.want.clone()),
            "{step}"
        );
    };

    // 1. The first request dials; the spares it leaves behind carry the next ones.
    get("first request");
    wait_ready(&agent1.agent, "after the first request");
    for i in 0..3 {
        let (c0, s0) = (
            agent1.agent.policy_stats(),
            server_agent(&agent2).policy_stats(),
        );
        get(&format!("request {i} on a spare"));
        let dc = stats_delta(&c0, &agent1.agent.policy_stats());
        let ds = stats_delta(&s0, &server_agent(&agent2).policy_stats());
        assert_eq!(stat(&dc, "spares.used"), 1, "client: {dc:?}");
        assert_eq!(stat(&ds, "spares.claimed"), 1, "server: {ds:?}");
        wait_ready(&agent1.agent, "after a spare was used");
    }

    // 2. A policy reload on the client's node: the spares made before it are not used.
    let c0 = agent1.agent.policy_stats();
    let g = agent1.agent.policy_generation();
    policy1.write("unrelated.yaml", &unrelated_policy("unrelated"));
    wait_generation(&agent1.agent, g);
    get("after a policy reload");
    let dc = stats_delta(&c0, &agent1.agent.policy_stats());
    assert_eq!(stat(&dc, "spares.used"), 0, "{dc:?}");
    assert_eq!(
        stat(&dc, "spares.stale_policy"),
        u64::from(SPARES),
        "{dc:?}"
    );
    wait_ready(&agent1.agent, "after the policy reload");

    // 3. A new root in the CA bundle: the client's leaf and configs are minted again, and
    //    the spares made with the old ones are not used.
    let extra = TempDir::new("spares-root");
    Ca::init(
        &"cluster.local".parse().unwrap(),
        &extra.0.join("b"),
        OnExisting::Refuse,
    )
    .expect("second root");
    let bundle = cluster.ca.join("root-cert.pem");
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&bundle).expect("bundle"),
        std::fs::read_to_string(extra.0.join("b").join("root-cert.pem")).expect("root b")
    );
    let c0 = agent1.agent.policy_stats();
    let before = agent1.agent.ca_generation();
    write_atomic(&bundle, both.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent1.agent.ca_generation() <= before {
        assert!(
            Instant::now() < deadline,
            "the client's agent did not reload its CA"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    get("after a new leaf");
    let dc = stats_delta(&c0, &agent1.agent.policy_stats());
    assert_eq!(stat(&dc, "spares.used"), 0, "{dc:?}");
    assert_eq!(stat(&dc, "spares.stale_cert"), u64::from(SPARES), "{dc:?}");
    wait_ready(&agent1.agent, "after the new leaf");

    // 4. DENY on the server's node, spares ready on the client's (made before it): the
    //    claimed spare is refused by the server's agent.
    let s0 = server_agent(&agent2).policy_stats();
    let c0 = agent1.agent.policy_stats();
    let g = server_agent(&agent2).policy_generation();
    policy2.write("deny.yaml", DENY_CLIENT);
    wait_generation(&server_agent(&agent2), g);
    let f = curl(client.command("curl"), &url);
    assert_eq!(f.code, "000", "the DENY must refuse the request on a spare");
    let dc = stats_delta(&c0, &agent1.agent.policy_stats());
    let ds = stats_delta(&s0, &server_agent(&agent2).policy_stats());
    assert_eq!(stat(&dc, "spares.used"), 1, "client: {dc:?}");
    assert_eq!(
        (stat(&ds, "spares.claimed"), stat(&ds, "refused.deny_rule")),
        (1, 1),
        "server: {ds:?}"
    );
    let g = server_agent(&agent2).policy_generation();
    policy2.remove("deny.yaml");
    wait_generation(&server_agent(&agent2), g);
    wait_ready(&agent1.agent, "after the deny");

    // 5. The server's agent restarts (same pins): the spares it held are dead, and no
    //    request fails.
    let pins = agent2.take().unwrap().kill();
    c2.bpffs = pins;
    agent2 = Some(RunningAgent::start(c2));
    let c0 = agent1.agent.policy_stats();
    for i in 0..3 {
        get(&format!("request {i} after the server agent restarted"));
    }
    let dc = stats_delta(&c0, &agent1.agent.policy_stats());
    assert_eq!(stat(&dc, "spares.dead"), u64::from(SPARES), "{dc:?}");
    assert_eq!(stat(&dc, "flows_failed"), 0, "{dc:?}");

    // 6. Nothing in clear between the nodes.
    let frames = capture.stop();
    assert_no_plaintext(&frames, &www.payload);
    drop(agent2);
}
