//! TLS 1.3 session resumption between agents, end to end and on the wire (the ClientHello's
//! `pre_shared_key` offer and the ServerHello's acceptance, in a capture of the server pod's
//! link): the first connection between two workloads is a full handshake, the next one to the
//! same address resumes; on a resumed connection the server agent's policy decision uses the
//! client identity restored from the ticket (an ALLOW naming only that principal lets it
//! through, a DENY naming it on another port refuses it); and after a policy reload no ticket
//! issued before it is offered or accepted, so a policy that now denies the client refuses it
//! on a full handshake.
//!
//! A resumed connection offers x25519 alone, so its ClientHello fits in the SYN (TCP Fast
//! Open between agents) and the server's flight follows the SYN-ACK: on the wire of the
//! server pod's link, the client waits once for the server before its Finished, where a full
//! handshake (hybrid, too large for the SYN) waits twice; no HelloRetryRequest either way.
//!
//! When the server's agent restarts between two connections, the ticket the client's agent
//! holds is declined: the client's agent counts it (`tickets.declined`,
//! `interceptor_resumption_tickets_declined_total`), drops the session (a full handshake on
//! the resumed offer's x25519) and dials again with the full hybrid offer, and the app's
//! request succeeds with its bytes intact.
//!
//! Host only: the userspace relay, where the client agent's rustls keeps the tickets.

use std::net::SocketAddr;

use interceptor::{app::Agent, config::ConnectionKeysMode, intercept::table::FlowRow};
use interceptor_tests::{
    agent::{RunningAgent, peer, workload},
    apps::curl,
    crypto::{X25519, X25519MLKEM768, any_port, assert_hello, captured, hellos},
    mesh::{PolicyDir, stats_delta, unrelated_policy, wait_generation},
    require_privileged,
    scenario::{Cluster, Scenario, serve_blob},
    topology::{Node, wire},
    wire::{Capture, Frame, Streams, assert_no_plaintext, parse_client_hello, parse_server_hello},
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/resume/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/resume/sa/server";

/// ALLOW the client on port 80, DENY it on port 81: both rules need the client's identity.
const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client-80, namespace: resume}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/resume/sa/client"]
    to:
    - operation:
        ports: ["80"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client-81, namespace: resume}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/resume/sa/client"]
    to:
    - operation:
        ports: ["81"]
"#;

/// The client is denied everywhere.
const DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: resume}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/resume/sa/client"]
"#;

/// Whether the one captured connection from the client pod to `server` offered a ticket,
/// and whether the server accepted it; panics if no ServerHello crossed the wire.
fn psk_on_the_wire(
    streams: &Streams,
    client: &interceptor_tests::topology::Pod,
    server: SocketAddr,
) -> (usize, Option<u16>) {
    let (ch, sh) = hellos(streams, any_port(client.ip), server);
    let sh = sh.unwrap_or_else(|e| panic!("no ServerHello to {server}: {e}"));
    // psk_dhe_ke only, and a fresh key share either way.
    assert_eq!(ch.psk_modes, [1], "{ch:?}");
    assert!(sh.key_share_len > 0);
    (ch.psk_identities, sh.psk_identity)
}

/// The newest flow of `pod` (open or just closed).
fn last_flow(agent: &Agent, pod: &str) -> FlowRow {
    agent
        .flows_with_recent()
        .into_iter()
        .filter(|r| r.pod == pod)
        .max_by_key(|r| r.id)
        .unwrap_or_else(|| panic!("no flow of {pod}"))
}

#[test]
fn a_second_connection_resumes_and_policy_still_decides_with_the_restored_identity() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(95, "res-client", "res-server");
    let www = serve_blob(&mut server, "resume-www", 128 << 10);
    let cluster = Cluster::new("resume");
    let policy = PolicyDir::with("policy.yaml", POLICY);
    let pods = [(&client, "client"), (&server, "server")];
    let mut config = cluster.config_in("resume", &pods, &policy);
    // About handshakes (tickets, their ClientHellos): derived keys would skip them.
    config.tuning.connection_keys = ConnectionKeysMode::Handshake;
    assert!(
        config.tuning.session_resumption,
        "resumption is on by default"
    );
    let agent = RunningAgent::start(config);
    let agent = &agent.agent;
    let (http, other) = (
        SocketAddr::from((server.ip, 80)),
        SocketAddr::from((server.ip, 81)),
    );
    let get = |addr: SocketAddr| {
        captured(&node, &server, || {
            curl(client.command("curl"), &format!("http://{addr}/blob"))
        })
    };

    // 1. The first connection is a full handshake: no ticket offered, none accepted.
    let (f, streams) = get(http);
    assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
    assert_eq!(psk_on_the_wire(&streams, &client, http), (0, None));
    assert_no_plaintext(&streams, &www.payload);
    let row = last_flow(agent, "res-server");
    assert_eq!(
        (row.peer_id.as_deref(), row.resumed),
        (Some(CLIENT_ID), Some(false))
    );

    // 2. The next one resumes with the ticket the first brought back, on both agents' sides;
    //    the ALLOW rule naming only the client's principal let it through, so the decision
    //    saw the identity restored from the ticket.
    let (f, streams) = get(http);
    assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
    assert_eq!(psk_on_the_wire(&streams, &client, http), (1, Some(0)));
    assert_no_plaintext(&streams, &www.payload);
    let row = last_flow(agent, "res-server");
    assert_eq!(
        (row.peer_id.as_deref(), row.resumed),
        (Some(CLIENT_ID), Some(true)),
        "{row:?}"
    );
    let row = last_flow(agent, "res-client");
    assert_eq!(
        (row.peer_id.as_deref(), row.resumed),
        (Some(SERVER_ID), Some(true)),
        "{row:?}"
    );

    // 3. A resumed connection to port 81 (tickets are per server address) is refused by the
    //    DENY rule naming the client: the restored identity is decided on every connection.
    let before = agent.policy_stats();
    let (f, streams) = get(other);
    assert_eq!(f.code, "000", "port 81 must be refused");
    assert_eq!(psk_on_the_wire(&streams, &client, other), (1, Some(0)));
    let delta = stats_delta(&before, &agent.policy_stats());
    assert_eq!(delta.get("refused.deny_rule"), Some(&1), "{delta:?}");

    // 4. After a reload that denies the client, no ticket from before counts: the client
    //    offers none, and the full handshake's identity is refused.
    let generation = agent.policy_generation();
    policy.write("deny.yaml", DENY_ALL);
    wait_generation(agent, generation);
    let before = agent.policy_stats();
    let (f, streams) = get(http);
    assert_eq!(f.code, "000", "the client must be refused after the reload");
    assert_eq!(psk_on_the_wire(&streams, &client, http), (0, None));
    let delta = stats_delta(&before, &agent.policy_stats());
    assert_eq!(delta.get("refused.deny_rule"), Some(&1), "{delta:?}");
    // The refused connection's handshake had finished, so its ticket (issued under the new
    // generation) may have reached the client: resumed or not, the next one is refused too.
    let before = agent.policy_stats();
    let (f, streams) = get(http);
    assert_eq!(f.code, "000");
    let (_, accepted) = psk_on_the_wire(&streams, &client, http);
    let delta = stats_delta(&before, &agent.policy_stats());
    assert_eq!(
        delta.get("refused.deny_rule"),
        Some(&1),
        "resumed: {}; {delta:?}",
        accepted.is_some()
    );

    // 5. Lifting the deny: a full handshake first (a new generation again), then resumption.
    let generation = agent.policy_generation();
    policy.remove("deny.yaml");
    wait_generation(agent, generation);
    let (f, streams) = get(http);
    assert_eq!(f.code, "200");
    assert_eq!(psk_on_the_wire(&streams, &client, http).1, None);
    let (f, streams) = get(http);
    assert_eq!(f.code, "200");
    assert_eq!(psk_on_the_wire(&streams, &client, http), (1, Some(0)));
}

const SYN: u8 = 0x02;
const FIN: u8 = 0x01;

/// What the capture shows of the one connection from `client` to `server`.
#[derive(Debug)]
struct SetUp {
    /// The ClientHello record's size.
    hello: usize,
    /// Bytes the client's SYN carried.
    syn_data: usize,
    /// Times the client sent (a SYN or bytes) after the server had sent, up to and with the
    /// segment carrying its first byte past the ClientHello (its second flight: Finished):
    /// one more than the round trips it waited for before it.
    client_turns: usize,
}

fn set_up(frames: &[Frame], client: std::net::IpAddr, server: SocketAddr) -> SetUp {
    let segs: Vec<_> = frames.iter().filter_map(Frame::tcp).collect();
    let syn = segs
        .iter()
        .find(|s| s.src.ip() == client && s.dst == server && s.flags & SYN != 0)
        .unwrap_or_else(|| panic!("no SYN {client} → {server} in {} segments", segs.len()));
    let (from, isn) = (syn.src, syn.seq);
    let streams = Streams::from_frames(frames.to_vec());
    let (ch, _) = hellos(&streams, from, server);
    let hello = 5 + ch.message_len;
    let mut turns = 0;
    let mut last_up = false;
    for s in &segs {
        let up = s.src == from && s.dst == server;
        let down = s.src == server && s.dst == from;
        if !(up || down) {
            continue;
        }
        if s.payload.is_empty() && s.flags & (SYN | FIN) == 0 {
            continue;
        }
        if up && !last_up {
            turns += 1;
        }
        last_up = up;
        let start = if s.flags & SYN != 0 {
            0
        } else {
            s.seq.wrapping_sub(isn.wrapping_add(1)) as usize
        };
        if up && start + s.payload.len() > hello {
            return SetUp {
                hello,
                syn_data: syn.payload.len(),
                client_turns: turns,
            };
        }
    }
    panic!("the client never sent past its ClientHello ({hello} bytes)");
}

#[test]
fn a_resumed_client_hello_rides_in_the_syn_and_saves_a_round_trip() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(99, "tfo-client", "tfo-server");
    let www = serve_blob(&mut server, "tfo-www", 64 << 10);
    let cluster = Cluster::new("resume-tfo");
    let policy = PolicyDir::with("policy.yaml", POLICY);
    let pods = [(&client, "client"), (&server, "server")];
    let mut config = cluster.config_in("resume", &pods, &policy);
    // About handshakes (tickets, their ClientHellos): derived keys would skip them.
    config.tuning.connection_keys = ConnectionKeysMode::Handshake;
    assert!(config.tuning.tcp_fast_open && config.tuning.session_resumption);
    let agent = RunningAgent::start(config);
    let agent = &agent.agent;
    let http = SocketAddr::from((server.ip, 80));
    let get = || {
        let capture = Capture::start_in(&node.ns.path(), &server.host_if);
        let f = curl(client.command("curl"), &format!("http://{http}/blob"));
        assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
        let frames = capture.stop();
        let streams = Streams::from_frames(frames.clone());
        assert_no_plaintext(&streams, &www.payload);
        (frames, streams)
    };

    // The first connection fetches the Fast Open cookie and the first ticket.
    get();

    // Resumed: x25519 alone, the whole ClientHello in the SYN, the server's flight right
    // behind the SYN-ACK; the server took the offered share (no HelloRetryRequest).
    let fast_open = client.ns.tcp_ext("TCPFastOpenActive");
    let (frames, streams) = get();
    let (ch, sh) = hellos(&streams, any_port(client.ip), http);
    assert_eq!(
        (ch.groups.first(), ch.key_shares.as_slice()),
        (Some(&X25519), &[(X25519, 32)][..])
    );
    assert_eq!(ch.psk_identities, 1);
    assert_hello(&sh, X25519, sh.as_ref().unwrap().cipher_suite, None);
    assert_eq!(
        sh.as_ref().unwrap().psk_identity,
        Some(0),
        "the ticket was accepted"
    );
    let resumed = set_up(&frames, client.ip.into(), http);
    assert_eq!(
        (resumed.syn_data, resumed.client_turns),
        (resumed.hello, 2),
        "resumed: {resumed:?}"
    );
    assert!(client.ns.tcp_ext("TCPFastOpenActive") > fast_open);
    let row = last_flow(agent, "tfo-client");
    assert_eq!(
        (row.resumed, row.group.as_deref()),
        (Some(true), Some("x25519")),
        "{row:?}"
    );

    // Full (a policy reload retires every ticket; the cookie stays): the hybrid, a
    // ClientHello larger than the SYN carries, one more round trip.
    let generation = agent.policy_generation();
    policy.write("unrelated.yaml", &unrelated_policy("deny-nobody"));
    wait_generation(agent, generation);
    let (frames, streams) = get();
    let (ch, sh) = hellos(&streams, any_port(client.ip), http);
    assert_eq!(ch.groups.first(), Some(&X25519MLKEM768));
    assert_eq!(ch.psk_identities, 0);
    assert_hello(&sh, X25519MLKEM768, sh.as_ref().unwrap().cipher_suite, None);
    let full = set_up(&frames, client.ip.into(), http);
    assert!(
        full.syn_data > 0 && full.syn_data < full.hello && full.client_turns == 3,
        "full: {full:?}"
    );
    eprintln!("ClientHello in the SYN: resumed {resumed:?}, full {full:?}");
}

/// `interceptor_resumption_tickets_declined_total` as `agent` serves it.
fn declined_metric(agent: &Agent) -> u64 {
    let name = "interceptor_resumption_tickets_declined_total ";
    let text = agent.telemetry().encode(false).expect("encode metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
        .trim()
        .parse()
        .expect("a count")
}

/// Every captured connection from `client` to `server`, in the order they started: tickets
/// the ClientHello offered, its first group, and the ticket the ServerHello accepted.
fn connections(
    streams: &Streams,
    client: std::net::IpAddr,
    server: SocketAddr,
) -> Vec<(usize, Option<u16>, Option<u16>)> {
    streams
        .streams
        .iter()
        .filter(|s| s.src.ip() == client && s.dst == server && !s.bytes.is_empty())
        .map(|up| {
            let ch = parse_client_hello(&up.bytes).unwrap_or_else(|e| panic!("ClientHello: {e}"));
            let sh = streams
                .get(server, up.src)
                .map(|down| parse_server_hello(&down.bytes));
            let accepted = match sh {
                Some(Ok(sh)) => sh.psk_identity,
                _ => None,
            };
            (ch.psk_identities, ch.groups.first().copied(), accepted)
        })
        .collect()
}

#[test]
fn a_ticket_the_restarted_server_agent_declines_costs_a_redial_not_the_request() {
    require_privileged();
    let node1 = Node::new(111);
    let node2 = Node::new(112);
    let wire_if = wire(&node1, &node2);
    let client = node1.pod("rdclient", 2);
    let mut server = node2.pod("rdserver", 3);
    let www = serve_blob(&mut server, "rdwww", 96 << 10);
    let http = SocketAddr::from((server.ip, 80));
    let url = format!("http://{http}/blob");

    let cluster = Cluster::new("resume-restart");
    let mut c1 = cluster.node_config(
        "n1",
        vec![workload(&client, "rda", "client")],
        vec![peer(&server, "rdb", "server")],
    );
    let mut c2 = cluster.node_config(
        "n2",
        vec![workload(&server, "rdb", "server")],
        vec![peer(&client, "rda", "client")],
    );
    // About handshakes (tickets, their ClientHellos): derived keys would skip them.
    // (derived_e2e restarts a server agent in the default mode.)
    c1.tuning.connection_keys = ConnectionKeysMode::Handshake;
    c2.tuning.connection_keys = ConnectionKeysMode::Handshake;
    assert!(c1.tuning.session_resumption && c2.tuning.session_resumption);
    let agent1 = RunningAgent::start(c1);
    let client_agent = &agent1.agent;
    let mut agent2 = Some(RunningAgent::start(c2.clone()));
    let get = |step: &str| {
        let capture = Capture::start_in(&node1.ns.path(), &wire_if);
        let f = curl(client.command("curl"), &url);
        let streams = capture.stop_streams();
        assert_eq!(
            (f.code.as_str(), f.sha256()),
            ("200", www.want.clone()),
            "{step}"
        );
        assert_no_plaintext(&streams, &www.payload);
        connections(&streams, client.ip.into(), http)
    };

    // 1. A full handshake brings the first ticket back; 2. the next connection resumes.
    let hybrid = Some(X25519MLKEM768);
    assert_eq!(get("first"), [(0, hybrid, None)]);
    assert_eq!(get("second"), [(1, Some(X25519), Some(0))]);
    let row = last_flow(client_agent, "rdclient");
    assert_eq!(row.resumed, Some(true), "{row:?}");
    assert_eq!(declined_metric(client_agent), 0);

    // 3. The server's agent restarts (same pins): its ticket store is new. The client's agent
    //    offers the ticket it holds, the server declines it, and the flow dials again with
    //    the full offer: two connections on the wire, one request that succeeds.
    let pins = agent2.take().unwrap().kill();
    c2.bpffs = pins;
    agent2 = Some(RunningAgent::start(c2));
    let before = client_agent.policy_stats();
    assert_eq!(
        get("after the server agent restarted"),
        [(1, Some(X25519), None), (0, hybrid, None)]
    );
    let delta = stats_delta(&before, &client_agent.policy_stats());
    assert_eq!(delta.get("tickets.declined"), Some(&1), "{delta:?}");
    assert_eq!(delta.get("flows_failed"), None, "{delta:?}");
    assert_eq!(declined_metric(client_agent), 1);
    let row = last_flow(client_agent, "rdclient");
    assert_eq!(
        (row.resumed, row.group.as_deref()),
        (Some(false), Some("X25519MLKEM768")),
        "{row:?}"
    );

    // 4. The redial brought a ticket from the new agent: the next connection resumes, and
    //    nothing more is declined.
    assert_eq!(get("fourth"), [(1, Some(X25519), Some(0))]);
    assert_eq!(declined_metric(client_agent), 1);
    drop(agent2);
}
