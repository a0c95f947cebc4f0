//! Workload certificate rotation against the wall clock, with two agents whose clock jumps a
//! day and three days ahead (libfaketime; monotonic time untouched, as on a real node after
//! suspend/resume or an NTP step). New connections must keep working over mTLS with freshly
//! minted certificates, and a connection opened before the jump must keep carrying data.
//!
//! The test re-runs itself in a child process with libfaketime preloaded, so its in-process
//! agents, its verifying client and the curl it starts all share the moved clock.

use std::{net::SocketAddr, time::Duration};

use interceptor_tests::{
    agent::{RunningAgent, peer, workload},
    apps::{curl, random_payload, sha256_hex},
    identity::{FakeClock, MeshReply, mesh_request},
    mesh::{NcSession, busybox, echo_server},
    require_privileged,
    scenario::{Cluster, expected_protection, serve_blob},
    topology::{Node, wire},
    wire::{Capture, assert_no_plaintext},
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/foo/sa/sleep";
const SERVER_ID: &str = "spiffe://cluster.local/ns/bar/sa/httpbin";
const ECHO_PORT: u16 = 7000;
const HOUR: Duration = Duration::from_secs(3600);

/// Sends `n` random lines on the open flow and returns (sha256 sent, sha256 echoed).
fn stream_lines(flow: &mut NcSession, n: usize, seed: usize) -> (String, String) {
    let (mut sent, mut got) = (Vec::new(), Vec::new());
    for i in 0..n {
        let line = sha256_hex(&random_payload(seed * 1000 + i + 1));
        sent.extend_from_slice(line.as_bytes());
        let echoed = flow
            .echo(&line, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the open flow ended at line {i} of batch {seed}"));
        got.extend_from_slice(echoed.as_bytes());
    }
    (sha256_hex(&sent), sha256_hex(&got))
}

#[test]
fn leaves_renew_across_clock_jumps_while_open_flows_keep_transferring() {
    require_privileged();
    let Some(clock) = FakeClock::reexec(
        "leaves_renew_across_clock_jumps_while_open_flows_keep_transferring",
        Duration::from_secs(180),
    ) else {
        return;
    };
    let node1 = Node::new(73);
    let node2 = Node::new(74);
    let wire_if = wire(&node1, &node2);
    let client = node1.pod("ckclient", 2);
    let mut server = node2.pod("ckserver", 3);
    let www = serve_blob(&mut server, "wwwck", 256 << 10);
    echo_server(&server, ECHO_PORT);

    let cluster = Cluster::new("clockca");
    let _agent1 = RunningAgent::start(cluster.node_config(
        "n1",
        vec![workload(&client, "foo", "sleep")],
        vec![peer(&server, "bar", "httpbin")],
    ));
    let agent2 = RunningAgent::start(cluster.node_config(
        "n2",
        vec![workload(&server, "bar", "httpbin")],
        vec![peer(&client, "foo", "sleep")],
    ));

    // What the server agent presents to a verifying mesh client (its clock is moved too, so
    // it checks the certificate against the moved time), and a request through it.
    let probe = |when: &str| -> MeshReply {
        let reply = mesh_request(
            &client.netns_path(),
            &cluster.ca,
            CLIENT_ID,
            SERVER_ID,
            SocketAddr::from((server.ip, 80)),
            b"GET /blob HTTP/1.0\r\n\r\n",
        )
        .unwrap_or_else(|e| panic!("{when}: verifying mesh client: {e:#}"));
        let body_at = reply
            .response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("{when}: no HTTP response"))
            + 4;
        assert_eq!(
            sha256_hex(&reply.response[body_at..]),
            www.want,
            "{when}: body through the verified mTLS connection"
        );
        reply
    };
    // A request between the enrolled pods, agent to agent, captured on the wire.
    let through_mesh = |when: &str| {
        let capture = Capture::start_in(&node1.ns.path(), &wire_if);
        let f = curl(
            client.command("curl"),
            &format!("http://{}/blob", server.ip),
        );
        let frames = capture.stop();
        assert_eq!(
            (f.code.as_str(), f.sha256()),
            ("200", www.want.clone()),
            "{when}: pod to pod through both agents"
        );
        assert_no_plaintext(&frames, &www.payload);
    };

    let day0 = probe("day 0");
    through_mesh("day 0");
    let dst = SocketAddr::from((server.ip, ECHO_PORT));
    let mut flow = NcSession::open(client.command(busybox()), dst);
    let (sent, got) = stream_lines(&mut flow, 20, 0);
    assert_eq!(sent, got, "open flow before the jump");
    let open = agent2
        .agent
        .flows()
        .into_iter()
        .find(|r| r.destination.port() == ECHO_PORT)
        .expect("the open flow on the server agent");
    assert_eq!(open.peer_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(open.protection, expected_protection());

    let mut serials = vec![day0.serial.clone()];
    for (offset, ahead) in [("+25h", 25 * HOUR), ("+73h", 73 * HOUR)] {
        clock.set(offset, ahead);
        // Every day-0 leaf has expired now: the first handshake must renew before presenting.
        let reply = probe(offset);
        assert!(
            !serials.contains(&reply.serial),
            "{offset}: the server presented an old certificate (serial {})",
            reply.serial
        );
        serials.push(reply.serial.clone());
        through_mesh(offset);
        // The flow opened on day 0 still carries data, byte for byte.
        let (sent, got) = stream_lines(&mut flow, 20, serials.len());
        assert_eq!(sent, got, "{offset}: open flow across the rotation");
        assert!(
            agent2
                .agent
                .flows()
                .iter()
                .any(|r| r.id == open.id && r.destination.port() == ECHO_PORT),
            "{offset}: the day-0 flow is still open on the server agent"
        );
    }
    assert_eq!(serials.len(), 3);
}
