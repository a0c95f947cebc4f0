//! Derived connection keys (`tuning.connectionKeys: derived`) between two nodes, on the wire
//! of the link between them:
//!
//! 1. the first connection to the server's address is a TLS handshake and leaves both agents
//!    a root (`derived.kept`);
//! 2. the next one has no handshake at all: its client → server stream starts with the
//!    derived header and then carries only TLS application_data records, the server's starts
//!    with the 16-byte acceptance and then records; the body arrives intact and nothing is in
//!    clear;
//! 3. that connection's header sent again (from an unenrolled socket in the client pod) is
//!    refused: reset, no acceptance, `derived.replayed` on the server's agent;
//! 4. a policy reload on the server's node retires the root: the next connection's header is
//!    refused (`derived.generation`), the client's agent dials again with a handshake and the
//!    request succeeds; the one after is derived again;
//! 5. a restarted server agent knows no root: the client falls back (`derived.fallback`),
//!    the request succeeds, no flow fails.
//!
//! The second test follows the app's first bytes (0-RTT): they ride behind the header as
//! one application_data record (in the first segment, the SYN with Fast Open); a replay of
//! that flight and a header the server refuses deliver nothing to the server's app, and after
//! a refusal the client's agent sends them again on a handshake: the server's app receives
//! each upload exactly once, hash-checked, on exactly one connection per upload.
//!
//! The third test: a client in the default mode toward a server agent that keeps no roots
//! resumes its handshakes there after one refused root. The fourth: a root serves at most
//! `derivedRootMaxConnections` connections, then a handshake (no refused header) makes a new
//! one. The fifth: two connections dialed concurrently on a root whose handshake the server
//! has not finished yet (its Finished held on the wire) both wait for it and are derived.
//! The sixth: leaf renewals on both ends keep the root (no refused header, no new handshake).
//!
//! On the host the userspace relay's own record layer carries the derived keys; in the VM
//! (`cargo xtask vm-test --kernel 6.1 --filter derived_e2e`) both agents install them in
//! kTLS, and every flow's protection says which.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use interceptor::config::{Config, ConnectionKeysMode};
use interceptor_tests::{
    agent::{RunningAgent, TempDir, peer, workload},
    apps::{answer_digest, curl, curl_upload, random_payload, read_request_head, sha256_hex},
    crypto::{any_port, hellos},
    digest::Sha256,
    mesh::{PolicyDir, stat, stats_delta, unrelated_policy, wait_generation},
    require_privileged,
    scenario::{Cluster, expected_protection, serve_blob},
    topology::{Node, Pod, wire},
    wire::{Capture, Frame, Stream, Streams, assert_no_plaintext},
};

/// The first bytes of a derived connection (`handshake::derived::MAGIC`).
const MAGIC: [u8; 4] = [0xd1, b'i', b'k', 1];
const HEADER_LEN: usize = 44;
const ACCEPT_LEN: usize = 16;

/// The content types of the TLS records that fill `bytes` exactly (panics on a torn record).
fn record_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        assert!(at + 5 <= bytes.len(), "torn record header at {at}");
        let len = usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
        assert_eq!(&bytes[at + 1..at + 3], &[3, 3], "record version at {at}");
        types.push(bytes[at]);
        at += 5 + len;
    }
    assert_eq!(at, bytes.len(), "the last record is torn");
    types
}

/// The agent-to-agent connections to `server` opened during the capture (their SYN is in it),
/// client → server and back, in order. Each step captures anew, and the previous step's
/// connection may still be closing when the next capture starts: its FINs alone are no
/// connection of this step.
fn connections(streams: &Streams, server: SocketAddr) -> Vec<(&Stream, Option<&Stream>)> {
    streams
        .streams
        .iter()
        .filter(|s| s.dst == server && s.syn)
        .map(|s| (s, streams.get(server, s.src)))
        .collect()
}

/// What an assertion message shows of the connections: first bytes and sizes.
fn summary(conns: &[(&Stream, Option<&Stream>)]) -> Vec<String> {
    conns
        .iter()
        .map(|(up, down)| {
            let head = |s: &Stream| {
                format!(
                    "{:02x?} ({} B, rst {})",
                    &s.bytes[..s.bytes.len().min(6)],
                    s.bytes.len(),
                    s.rst
                )
            };
            format!("up {} down {}", head(up), down.map_or("-".to_owned(), head))
        })
        .collect()
}

/// Sends `bytes` to `dst` from the client pod's network namespace, outside its cgroup (so
/// its own agent does not intercept it), and returns what came back before the connection
/// ended, and whether it ended with a reset.
fn send_raw(pod: &Pod, dst: SocketAddr, bytes: Vec<u8>) -> (Vec<u8>, bool) {
    let ns = std::fs::File::open(pod.netns_path()).expect("open pod netns");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on this thread only, with a descriptor that lives for the call.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&bytes).expect("send");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return (got, false),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
                Err(e) => panic!("raw connection: {e}"),
            }
        }
    })
    .join()
    .expect("raw sender")
}

/// The set-up of the tests here: two nodes joined by a wire, a client pod on the first, a
/// server pod on the second, and each node's config (the default tuning) naming the other's
/// pod as its peer; `tag` names the pods (`<tag>client`, `<tag>server`) and their workloads.
struct TwoNodes {
    node1: Node,
    /// Held: dropping a node removes its namespace.
    _node2: Node,
    wire_if: String,
    client: Pod,
    server: Pod,
    c1: Config,
    c2: Config,
    /// Holds the CA and the nodes' state that `c1` and `c2` point into.
    _cluster: Cluster,
}

impl TwoNodes {
    fn new(first_node: u8, tag: &str) -> Self {
        let node1 = Node::new(first_node);
        let node2 = Node::new(first_node + 1);
        let wire_if = wire(&node1, &node2);
        let client = node1.pod(&format!("{tag}client"), 2);
        let server = node2.pod(&format!("{tag}server"), 3);
        let cluster = Cluster::new(tag);
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        let c1 = cluster.node_config(
            "n1",
            vec![workload(&client, &a, "client")],
            vec![peer(&server, &b, "server")],
        );
        let c2 = cluster.node_config(
            "n2",
            vec![workload(&server, &b, "server")],
            vec![peer(&client, &a, "client")],
        );
        TwoNodes {
            node1,
            _node2: node2,
            wire_if,
            client,
            server,
            c1,
            c2,
            _cluster: cluster,
        }
    }

    /// One `curl` of `url` from the client pod with the wire captured: the body must be
    /// `want`; the frames are added to `all`, the step's streams returned.
    fn fetch(&self, url: &str, want: &str, step: &str, all: &mut Vec<Frame>) -> Streams {
        let capture = Capture::start_in(&self.node1.ns.path(), &self.wire_if);
        let f = curl(self.client.command("curl"), url);
        assert_eq!(
            (f.code.as_str(), f.sha256()),
            ("200", want.to_owned()),
            "{step}"
        );
        let frames = capture.stop();
        all.extend(frames.iter().cloned());
        Streams::from_frames(frames)
    }
}

#[test]
fn a_second_connection_needs_no_handshake_and_refused_headers_fall_back() {
    require_privileged();
    let mut t = TwoNodes::new(112, "dk");
    let www = serve_blob(&mut t.server, "wwwdk", 64 << 10);
    let http = SocketAddr::from((t.server.ip, 80));
    let url = format!("http://{http}/blob");
    let client = &t.client;

    let (policy1, policy2) = (PolicyDir::new(), PolicyDir::new());
    let (mut c1, mut c2) = (t.c1.clone(), t.c2.clone());
    c1.tuning.connection_keys = ConnectionKeysMode::Derived;
    c2.tuning.connection_keys = ConnectionKeysMode::Derived;
    c1.policy_dir = Some(policy1.path());
    c2.policy_dir = Some(policy2.path());
    let agent1 = RunningAgent::start(c1);
    let mut agent2 = Some(RunningAgent::start(c2.clone()));
    let server_agent = |a: &Option<RunningAgent>| std::sync::Arc::clone(&a.as_ref().unwrap().agent);
    let mut all_frames = Vec::new();
    let mut get = |step: &str| t.fetch(&url, &www.want, step, &mut all_frames);
    let deltas =
        |c0: &BTreeMap<String, u64>, s0: &BTreeMap<String, u64>, a2: &Option<RunningAgent>| {
            (
                stats_delta(c0, &agent1.agent.policy_stats()),
                stats_delta(s0, &server_agent(a2).policy_stats()),
            )
        };

    // 1. A handshake (the first byte is a TLS handshake record), which leaves both a root.
    let (c0, s0) = (
        agent1.agent.policy_stats(),
        server_agent(&agent2).policy_stats(),
    );
    let streams = get("first connection");
    let conns = connections(&streams, http);
    assert_eq!(conns.len(), 1, "{:?}", summary(&conns));
    assert_eq!(conns[0].0.bytes.first(), Some(&22), "a ClientHello first");
    let (dc, ds) = deltas(&c0, &s0, &agent2);
    assert_eq!(
        (stat(&dc, "derived.kept"), stat(&ds, "derived.kept")),
        (1, 1),
        "{dc:?} {ds:?}"
    );

    // 2. Derived: header, acceptance, then nothing but application_data records either way.
    let (c0, s0) = (
        agent1.agent.policy_stats(),
        server_agent(&agent2).policy_stats(),
    );
    let streams = get("derived connection");
    let conns = connections(&streams, http);
    assert_eq!(
        conns.len(),
        1,
        "one connection, no fallback: {:?}",
        summary(&conns)
    );
    let (up, down) = (conns[0].0, conns[0].1.expect("the server's direction"));
    up.assert_complete();
    down.assert_complete();
    assert_eq!(&up.bytes[..4], &MAGIC, "the derived header first");
    let header = up.bytes[..HEADER_LEN].to_vec();
    let up_types = record_types(&up.bytes[HEADER_LEN..]);
    let down_types = record_types(&down.bytes[ACCEPT_LEN..]);
    assert!(
        up_types.iter().chain(&down_types).all(|t| *t == 23),
        "only application_data records: {up_types:?} {down_types:?}"
    );
    assert!(!up_types.is_empty() && !down_types.is_empty());
    assert_no_plaintext(&streams, &www.payload);
    let (dc, ds) = deltas(&c0, &s0, &agent2);
    assert_eq!(
        (stat(&dc, "derived.used"), stat(&ds, "derived.accepted")),
        (1, 1),
        "{dc:?} {ds:?}"
    );
    assert_eq!(stat(&dc, "derived.kept") + stat(&ds, "derived.kept"), 0);
    // Both ends of the derived connection on this environment's record layer (kTLS in the VM).
    for (agent, pod) in [
        (&agent1.agent, "dkclient"),
        (&server_agent(&agent2), "dkserver"),
    ] {
        let row = agent
            .flows_with_recent()
            .into_iter()
            .filter(|r| r.pod == pod)
            .max_by_key(|r| r.id)
            .expect("a flow");
        assert_eq!(
            (
                row.protection,
                row.resumed,
                row.bytes_from_peer + row.bytes_to_peer > 0
            ),
            (expected_protection(), Some(true), true),
            "{row:?}"
        );
    }

    // 3. The same header again: refused, nothing accepted, counted as a replay.
    let s0 = server_agent(&agent2).policy_stats();
    let (answer, _) = send_raw(client, http, header);
    assert!(
        answer.len() < ACCEPT_LEN,
        "a replay got an acceptance: {answer:?}"
    );
    let ds = stats_delta(&s0, &server_agent(&agent2).policy_stats());
    assert_eq!(
        (stat(&ds, "derived.replayed"), stat(&ds, "derived.accepted")),
        (1, 0),
        "{ds:?}"
    );
    // The same refusal on the metrics endpoint, by its reason.
    let line = r#"interceptor_derived_connections_total{outcome="replayed"} "#;
    let text = server_agent(&agent2)
        .telemetry()
        .encode(false)
        .expect("encode metrics");
    let replayed: Option<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|v| v.trim().parse().ok());
    assert_eq!(replayed, Some(1), "metrics: {text}");

    // 4. A policy reload on the server's node: the root is refused, the flow falls back to a
    //    handshake on a second connection and succeeds; the next one is derived again.
    let agent2_now = server_agent(&agent2);
    let g = agent2_now.policy_generation();
    policy2.write("unrelated.yaml", &unrelated_policy("unrelated"));
    wait_generation(&agent2_now, g);
    let (c0, s0) = (agent1.agent.policy_stats(), agent2_now.policy_stats());
    // The agent must be able to go away in step 5.
    drop(agent2_now);
    let streams = get("after the server's policy reload");
    let conns = connections(&streams, http);
    assert_eq!(
        conns.len(),
        2,
        "a refused derived connection, then a handshake"
    );
    assert_eq!(&conns[0].0.bytes[..4], &MAGIC);
    assert_eq!(conns[1].0.bytes.first(), Some(&22));
    let (dc, ds) = deltas(&c0, &s0, &agent2);
    assert_eq!(
        (
            stat(&dc, "derived.fallback"),
            stat(&ds, "derived.generation")
        ),
        (1, 1),
        "{dc:?} {ds:?}"
    );
    let streams = get("derived again after the reload");
    let conns = connections(&streams, http);
    assert_eq!(conns.len(), 1, "{:?}", summary(&conns));
    assert_eq!(&conns[0].0.bytes[..4], &MAGIC);

    // 5. The server's agent restarts: no root there, the client falls back, nothing fails.
    let pins = agent2.take().unwrap().kill();
    c2.bpffs = pins;
    agent2 = Some(RunningAgent::start(c2));
    let (c0, s0) = (
        agent1.agent.policy_stats(),
        server_agent(&agent2).policy_stats(),
    );
    let streams = get("after the server agent restarted");
    let conns = connections(&streams, http);
    assert_eq!(
        conns.len(),
        2,
        "a refused derived connection, then a handshake"
    );
    let (dc, ds) = deltas(&c0, &s0, &agent2);
    assert_eq!(
        (
            stat(&dc, "derived.fallback"),
            stat(&ds, "derived.unknown"),
            stat(&dc, "flows_failed")
        ),
        (1, 1, 0),
        "{dc:?} {ds:?}"
    );
    get("derived after the restart");

    // Nothing in clear between the nodes, in any of it.
    assert_no_plaintext(&all_frames, &www.payload);
    drop(agent2);
}

/// What the upload sink saw on one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// SHA-256 of the request body.
    body: String,
    /// Every byte that arrived on the connection, request head included, until its end.
    total: usize,
}

/// An HTTP PUT sink on `port` of the pod's address, run by the test (unenrolled): each
/// connection's body is hashed and answered with its SHA-256; every connection is recorded
/// once it ends, so a second delivery of anything (another connection, extra bytes) shows.
fn serve_recording_sink(pod: &Pod, port: u16) -> std::sync::Arc<std::sync::Mutex<Vec<Seen>>> {
    use std::io::BufReader;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let addr = SocketAddr::from((pod.ip, port));
    let listener = pod.ns.run(move || std::net::TcpListener::bind(addr));
    let record = std::sync::Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let record = std::sync::Arc::clone(&record);
            std::thread::spawn(move || -> std::io::Result<()> {
                conn.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut reader = BufReader::new(conn.try_clone()?);
                let head = read_request_head(&mut reader)?;
                let mut total = head.bytes;
                let mut body = vec![0u8; head.content_length];
                reader.read_exact(&mut body)?;
                total += head.content_length;
                let mut hasher = Sha256::new();
                hasher.update(&body);
                let digest = hasher.hex();
                answer_digest(conn, &digest)?;
                // Anything after the request is counted too, until the client's end.
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest);
                total += rest.len();
                record.lock().unwrap().push(Seen {
                    body: digest,
                    total,
                });
                Ok(())
            });
        }
    });
    seen
}

/// The first client → server segment with payload of each connection to `server`, and
/// whether it was the SYN (Fast Open).
fn first_segments(frames: &[Frame], server: SocketAddr) -> Vec<(Vec<u8>, bool)> {
    let mut firsts: Vec<(SocketAddr, Vec<u8>, bool)> = Vec::new();
    for seg in frames.iter().filter_map(Frame::tcp) {
        if seg.dst != server || seg.payload.is_empty() {
            continue;
        }
        if firsts.iter().any(|(src, _, _)| *src == seg.src) {
            continue;
        }
        firsts.push((seg.src, seg.payload.to_vec(), seg.flags & 0x02 != 0));
    }
    firsts.into_iter().map(|(_, p, syn)| (p, syn)).collect()
}

/// Payload bytes the client sent to `server` on its first connection before the first
/// payload byte came back, in capture order.
fn client_bytes_before_answer(frames: &[Frame], server: SocketAddr) -> usize {
    let mut client = None;
    let mut sent = 0;
    for seg in frames.iter().filter_map(Frame::tcp) {
        if seg.payload.is_empty() {
            continue;
        }
        if seg.dst == server && client.is_none_or(|c| c == seg.src) {
            client = Some(seg.src);
            sent += seg.payload.len();
        } else if seg.src == server && Some(seg.dst) == client {
            break;
        }
    }
    sent
}

/// Drops every segment but a SYN-ACK from `server` forwarded through `node` for `hold`, then
/// lets them pass again: the server's answer to a derived header (acceptance or reset)
/// reaches the client only after the app's first bytes have surely gone out behind the
/// header (the client's kernel resends what was not acknowledged; a reset comes back in
/// answer to that). Without it which comes first is a race with the app's first write.
fn hold_answers(node: &Node, server: SocketAddr, hold: Duration) -> std::thread::JoinHandle<()> {
    let net = format!("--net={}", node.ns.path().display());
    let nft = move |args: &str| {
        let out = std::process::Command::new("nsenter")
            .args([net.as_str(), "nft"])
            .arg(args)
            .output()
            .expect("run nft");
        assert!(out.status.success(), "nft {args}: {out:?}");
    };
    nft("add table ip zrhold");
    nft("add chain ip zrhold held { type filter hook forward priority 0 ; }");
    nft(&format!(
        "add rule ip zrhold held ip saddr {} tcp sport {} tcp flags & syn == 0 drop",
        server.ip(),
        server.port()
    ));
    std::thread::spawn(move || {
        std::thread::sleep(hold);
        nft("delete table ip zrhold");
    })
}

#[test]
fn the_apps_first_bytes_ride_behind_the_header_and_arrive_exactly_once() {
    require_privileged();
    const HOLD: Duration = Duration::from_millis(400);
    let node1 = Node::new(121);
    let node2 = Node::new(122);
    let wire_if = wire(&node1, &node2);
    let client = node1.pod("zrclient", 2);
    let server = node2.pod("zrserver", 3);
    let sink = SocketAddr::from((server.ip, 7000));
    let seen = serve_recording_sink(&server, 7000);
    let url = format!("http://{sink}/up");
    let dir = TempDir::new("zerortt");
    let payload = random_payload(48 << 10);
    let file = dir.0.join("body");
    std::fs::write(&file, &payload).unwrap();
    let want = sha256_hex(&payload);

    let cluster = Cluster::new("zerortt");
    let policy2 = PolicyDir::new();
    let mut c1 = cluster.node_config(
        "n1",
        vec![workload(&client, "zra", "client")],
        vec![peer(&server, "zrb", "server")],
    );
    let mut c2 = cluster.node_config(
        "n2",
        vec![workload(&server, "zrb", "server")],
        vec![peer(&client, "zra", "client")],
    );
    c1.tuning.connection_keys = ConnectionKeysMode::Derived;
    c2.tuning.connection_keys = ConnectionKeysMode::Derived;
    c2.policy_dir = Some(policy2.path());
    let timeout = Duration::from_millis(c1.tuning.handshake_timeout_ms);
    let agent1 = RunningAgent::start(c1);
    let agent2 = RunningAgent::start(c2);
    let (a1, a2) = (&agent1.agent, &agent2.agent);
    let mut uploads = 0;
    let mut upload = |step: &str| {
        let capture = Capture::start_in(&node1.ns.path(), &wire_if);
        let f = curl_upload(client.command("curl"), &url, &file);
        uploads += 1;
        assert_eq!(
            (
                f.code.as_str(),
                String::from_utf8_lossy(&f.body).into_owned()
            ),
            ("200", want.clone()),
            "{step}"
        );
        capture.stop()
    };

    // A handshake leaves the root.
    let (c0, s0) = (a1.policy_stats(), a2.policy_stats());
    upload("first connection");
    let (dc, ds) = (
        stats_delta(&c0, &a1.policy_stats()),
        stats_delta(&s0, &a2.policy_stats()),
    );
    assert_eq!(
        (stat(&dc, "derived.kept"), stat(&ds, "derived.kept")),
        (1, 1),
        "{dc:?} {ds:?}"
    );

    // 0-RTT: the first segment is the header and then a record, never the request in clear.
    let (c0, s0) = (a1.policy_stats(), a2.policy_stats());
    let held = hold_answers(&node2, sink, HOLD);
    let frames = upload("derived connection");
    held.join().unwrap();
    let streams = Streams::from_frames(frames.clone());
    let conns = connections(&streams, sink);
    assert_eq!(conns.len(), 1, "{:?}", summary(&conns));
    let up = conns[0].0;
    up.assert_complete();
    let firsts = first_segments(&frames, sink);
    let (first, in_syn) = &firsts[0];
    assert_eq!(&first[..4], &MAGIC, "the header first");
    assert!(
        first.len() == HEADER_LEN || first[HEADER_LEN..HEADER_LEN + 3] == [23, 3, 3],
        "behind the header in its segment only a record: {:02x?}",
        &first[..first.len().min(HEADER_LEN + 8)]
    );
    // 0-RTT on the wire: more than the header left the client before the server's first
    // byte (its acceptance) came back.
    let before_answer = client_bytes_before_answer(&frames, sink);
    assert!(
        before_answer > HEADER_LEN + 5,
        "the app's bytes waited for the acceptance: {before_answer} B before it"
    );
    eprintln!(
        "derived connection: first segment {} B (header {HEADER_LEN}), in the SYN: {in_syn}; \
         {before_answer} B sent before the acceptance",
        first.len()
    );
    let early_len = usize::from(u16::from_be_bytes([
        up.bytes[HEADER_LEN + 3],
        up.bytes[HEADER_LEN + 4],
    ]));
    let flight = up.bytes[..HEADER_LEN + 5 + early_len].to_vec();
    assert!(
        record_types(&up.bytes[HEADER_LEN..])
            .iter()
            .all(|t| *t == 23)
    );
    assert_no_plaintext(&frames, b"PUT /up HTTP/1.1");
    assert_no_plaintext(&frames, &payload);
    let (dc, ds) = (
        stats_delta(&c0, &a1.policy_stats()),
        stats_delta(&s0, &a2.policy_stats()),
    );
    assert_eq!(
        (
            stat(&dc, "derived.used"),
            stat(&dc, "derived.early"),
            stat(&ds, "derived.accepted")
        ),
        (1, 1, 1),
        "{dc:?} {ds:?}"
    );

    // The same flight replayed from outside the agent: refused, and its record never
    // reaches the sink (counted at the end).
    let s0 = a2.policy_stats();
    let (answer, _) = send_raw(&client, sink, flight);
    assert!(answer.len() < ACCEPT_LEN, "a replay got an acceptance");
    let ds = stats_delta(&s0, &a2.policy_stats());
    assert_eq!(stat(&ds, "derived.replayed"), 1, "{ds:?}");

    // A header the server refuses (its policy reloaded): the request went behind it, the
    // server's agent resets it unread, the client's agent sends it again on a handshake.
    let g = a2.policy_generation();
    policy2.write("unrelated.yaml", &unrelated_policy("unrelated"));
    wait_generation(a2, g);
    let (c0, s0) = (a1.policy_stats(), a2.policy_stats());
    let held = hold_answers(&node2, sink, HOLD);
    let frames = upload("after the server's policy reload");
    held.join().unwrap();
    let streams = Streams::from_frames(frames.clone());
    let conns = connections(&streams, sink);
    assert_eq!(
        conns.len(),
        2,
        "refused, then a handshake: {:?}",
        summary(&conns)
    );
    let (refused_up, refused_down) = (conns[0].0, conns[0].1);
    assert_eq!(&refused_up.bytes[..4], &MAGIC);
    assert_eq!(
        refused_up.bytes.get(HEADER_LEN),
        Some(&23),
        "the request rode behind the refused header"
    );
    assert!(
        refused_down.is_none_or(|d| d.bytes.len() < ACCEPT_LEN && d.rst),
        "no acceptance, a reset: {:?}",
        summary(&conns)
    );
    assert_eq!(conns[1].0.bytes.first(), Some(&22), "a ClientHello");
    assert_no_plaintext(&frames, &payload);
    let (dc, ds) = (
        stats_delta(&c0, &a1.policy_stats()),
        stats_delta(&s0, &a2.policy_stats()),
    );
    assert_eq!(
        (
            stat(&dc, "derived.early"),
            stat(&dc, "derived.fallback"),
            stat(&dc, "derived.resent"),
            stat(&ds, "derived.generation"),
            stat(&dc, "flows_failed"),
        ),
        (0, 1, 1, 1, 0),
        "{dc:?} {ds:?}"
    );

    // A peer that takes the header and the request and never answers (its answers dropped
    // past the handshake timeout): the client's agent cannot know whether the sink got the
    // bytes, so it resets the app's connection and never sends them again. The request is
    // 48 KiB and early data stops at 16 KiB, so the sink never completes (records) it.
    let (c0, s0) = (a1.policy_stats(), a2.policy_stats());
    // The client waits the handshake timeout, plus the agent's 10 s connect timeout when
    // the header rode in a Fast Open SYN (its connect completes only with the answer).
    let held = hold_answers(&node2, sink, timeout + Duration::from_secs(11));
    let f = curl_upload(client.command("curl"), &url, &file);
    held.join().unwrap();
    assert_eq!(f.code, "000", "a silent peer: the app's connection fails");
    let (dc, ds) = (
        stats_delta(&c0, &a1.policy_stats()),
        stats_delta(&s0, &a2.policy_stats()),
    );
    assert_eq!(
        (
            stat(&dc, "derived.early_unknown"),
            stat(&dc, "derived.resent"),
            stat(&dc, "flows_failed"),
            stat(&ds, "derived.accepted"),
        ),
        (1, 0, 1, 1),
        "{dc:?} {ds:?}"
    );

    // Exactly one connection per upload reached the sink, each with the whole body once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < uploads && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Anything the replay or the refused header had delivered would be a further connection
    // (or longer one); the agents' flows are all ended by now.
    std::thread::sleep(Duration::from_millis(300));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), uploads, "{seen:?}");
    assert!(seen.iter().all(|s| s.body == want), "{seen:?}");
    assert!(
        seen.iter().all(|s| s.total == seen[0].total),
        "the same bytes on every connection: {seen:?}"
    );
}

/// A client agent in the default `derived` mode toward a server agent that keeps no roots
/// (`connectionKeys: handshake`): after the one refused root the client stops offering them
/// to that address and keeps tickets again, so its next connections there are resumed
/// handshakes, not full ones. In the VM this is the kTLS client, whose handshake that leaves
/// a root drops its ticket (ARCHITECTURE.md "Derived connection keys", kTLS): before
/// `wants_root` every connection of it to such a server was a full handshake. Fails if the
/// client keeps offering roots, or if its handshakes there stay full.
///
/// 1. a full handshake, a root kept by the client only;
/// 2. the root's first use is refused (a derived header, then a handshake on a second
///    connection, `derived.fallback`), the request still succeeds;
/// 3. and 4. one connection each, no header: a ClientHello offering a ticket that the server
///    takes (psk on the wire), both agents' flows resumed and on this environment's record
///    layer (kTLS in the VM), no derived offer, no root kept.
#[test]
fn a_derived_client_resumes_toward_a_server_that_keeps_no_roots() {
    require_privileged();
    let mut t = TwoNodes::new(123, "nr");
    let www = serve_blob(&mut t.server, "wwwnr", 64 << 10);
    let http = SocketAddr::from((t.server.ip, 80));
    let url = format!("http://{http}/blob");
    let (c1, mut c2) = (t.c1.clone(), t.c2.clone());
    assert_eq!(
        c1.tuning.connection_keys,
        ConnectionKeysMode::Derived,
        "the client runs the default, derived"
    );
    assert!(c1.tuning.session_resumption && c1.tuning.tcp_fast_open);
    c2.tuning.connection_keys = ConnectionKeysMode::Handshake;
    let agent1 = RunningAgent::start(c1);
    let agent2 = RunningAgent::start(c2);
    let (ca, sa) = (&agent1.agent, &agent2.agent);
    let mut all_frames = Vec::new();
    let mut get = |step: &str| {
        let (c0, s0) = (ca.policy_stats(), sa.policy_stats());
        (
            t.fetch(&url, &www.want, step, &mut all_frames),
            stats_delta(&c0, &ca.policy_stats()),
            stats_delta(&s0, &sa.policy_stats()),
        )
    };
    let latest = |agent: &interceptor::app::Agent, pod: &str| {
        let row = agent
            .flows_with_recent()
            .into_iter()
            .filter(|r| r.pod == pod)
            .max_by_key(|r| r.id)
            .unwrap_or_else(|| panic!("no flow of {pod}"));
        (row.protection, row.resumed)
    };

    // 1. Full handshake; the client keeps a root, the server none.
    let (streams, dc, ds) = get("first connection");
    let conns = connections(&streams, http);
    assert_eq!(conns.len(), 1, "{:?}", summary(&conns));
    assert_eq!(conns[0].0.bytes.first(), Some(&22), "a ClientHello first");
    assert_eq!(
        (stat(&dc, "derived.kept"), stat(&ds, "derived.kept")),
        (1, 0),
        "{dc:?} {ds:?}"
    );
    assert_eq!(
        latest(ca, "nrclient"),
        (expected_protection(), Some(false)),
        "connection 1: a full handshake"
    );

    // 2. The root's first use: refused by an agent that keeps none, a handshake instead.
    let (streams, dc, _) = get("the refused root");
    let conns = connections(&streams, http);
    assert_eq!(
        conns.len(),
        2,
        "a derived header, then a handshake: {:?}",
        summary(&conns)
    );
    assert_eq!(&conns[0].0.bytes[..4], &MAGIC);
    assert_eq!(conns[1].0.bytes.first(), Some(&22));
    assert_eq!(
        (
            stat(&dc, "derived.offered"),
            stat(&dc, "derived.fallback"),
            stat(&dc, "derived.kept"),
            stat(&dc, "flows_failed")
        ),
        (1, 1, 0, 0),
        "{dc:?}"
    );

    // 3. and 4. No more roots offered to that address; the handshakes resume.
    for step in ["third connection", "fourth connection"] {
        let (streams, dc, ds) = get(step);
        let conns = connections(&streams, http);
        assert_eq!(conns.len(), 1, "{step}: {:?}", summary(&conns));
        assert_eq!(conns[0].0.bytes.first(), Some(&22), "{step}: a ClientHello");
        let (ch, sh) = hellos(&streams, any_port(t.client.ip), http);
        let sh = sh.unwrap_or_else(|e| panic!("{step}: no ServerHello: {e}"));
        assert_eq!(
            (ch.psk_identities, sh.psk_identity),
            (1, Some(0)),
            "{step}: a ticket offered and taken on the wire"
        );
        assert_eq!(
            (
                stat(&dc, "derived.offered"),
                stat(&dc, "derived.kept"),
                stat(&ds, "derived.accepted")
            ),
            (0, 0, 0),
            "{step}: {dc:?} {ds:?}"
        );
        assert_eq!(
            latest(ca, "nrclient"),
            (expected_protection(), Some(true)),
            "{step}: the client agent's flow"
        );
        assert_eq!(
            latest(sa, "nrserver"),
            (expected_protection(), Some(true)),
            "{step}: the server agent's flow"
        );
    }
    assert_no_plaintext(&all_frames, &www.payload);
}

/// The connection cap of a root (`tuning.derivedRootMaxConnections`) between two agents in
/// the default mode, on the wire: with a cap of 2, connection 1 is a handshake that leaves
/// both agents a root, 2 and 3 open with derived headers (counters 1 and 2), and 4 is a
/// handshake again on one connection (the client knows the root is spent: no refused header
/// first) that leaves a new root, which 5 uses from counter 1. Fails if either end ignores
/// the cap or if a spent root costs a refused connection.
#[test]
fn a_root_serves_at_most_its_connection_cap_then_a_handshake_makes_a_new_one() {
    require_privileged();
    let mut t = TwoNodes::new(125, "cap");
    let www = serve_blob(&mut t.server, "wwwcap", 32 << 10);
    let http = SocketAddr::from((t.server.ip, 80));
    let url = format!("http://{http}/blob");
    let (mut c1, mut c2) = (t.c1.clone(), t.c2.clone());
    for c in [&mut c1, &mut c2] {
        assert_eq!(c.tuning.connection_keys, ConnectionKeysMode::Derived);
        c.tuning.derived_root_max_connections = 2;
    }
    let agent1 = RunningAgent::start(c1);
    let agent2 = RunningAgent::start(c2);
    let (ca, sa) = (&agent1.agent, &agent2.agent);
    let mut all_frames = Vec::new();
    let mut get = |step: &str| {
        let (c0, s0) = (ca.policy_stats(), sa.policy_stats());
        let streams = t.fetch(&url, &www.want, step, &mut all_frames);
        let conns = connections(&streams, http);
        assert_eq!(
            conns.len(),
            1,
            "{step}: one connection: {:?}",
            summary(&conns)
        );
        let first = conns[0].0.bytes[..HEADER_LEN.min(conns[0].0.bytes.len())].to_vec();
        (
            first,
            stats_delta(&c0, &ca.policy_stats()),
            stats_delta(&s0, &sa.policy_stats()),
        )
    };
    let counter = |header: &[u8]| u64::from_be_bytes(header[20..28].try_into().unwrap());
    let mut ids = Vec::new();
    for (step, derived_counter) in [
        ("connection 1", None),
        ("connection 2", Some(1)),
        ("connection 3", Some(2)),
        ("connection 4, past the cap", None),
        ("connection 5, the new root", Some(1)),
    ] {
        let (first, dc, ds) = get(step);
        match derived_counter {
            None => {
                assert_eq!(first.first(), Some(&22), "{step}: a ClientHello");
                assert_eq!(
                    (stat(&dc, "derived.kept"), stat(&ds, "derived.kept")),
                    (1, 1),
                    "{step}: a new root on both ends {dc:?} {ds:?}"
                );
            }
            Some(n) => {
                assert_eq!(&first[..4], &MAGIC, "{step}: a derived header");
                assert_eq!(counter(&first), n, "{step}: its counter");
                ids.push(first[4..20].to_vec());
                assert_eq!(
                    (stat(&dc, "derived.used"), stat(&ds, "derived.accepted")),
                    (1, 1),
                    "{step}: {dc:?} {ds:?}"
                );
            }
        }
        assert_eq!(
            (
                stat(&dc, "derived.fallback"),
                stat(&ds, "derived.expired"),
                stat(&dc, "flows_failed")
            ),
            (0, 0, 0),
            "{step}: no refused header, nothing failed {dc:?} {ds:?}"
        );
    }
    assert_eq!(ids[0], ids[1], "connections 2 and 3 share a root");
    assert_ne!(ids[1], ids[2], "connection 5 runs on a new root");
    // The client dropped the spent first root when it found it spent (connection 4); the
    // server, which cannot know no late counter is coming, keeps it until the agent's
    // periodic sweep (every 5 s) erases it, and only it: the second root has one of its two
    // connections left.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let retired = [ca, sa].map(|a| stat(&a.policy_stats(), "derived.retired"));
        if retired == [0, 1] {
            break;
        }
        assert!(
            retired[0] == 0 && retired[1] <= 1 && std::time::Instant::now() < deadline,
            "spent roots erased by the sweep (client, server): {retired:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_no_plaintext(&all_frames, &www.payload);
}

/// Holds back, on the client's node, the client → server segments of a handshake's second
/// flight (Certificate, CertificateVerify, Finished: large segments that are not a
/// ClientHello), while letting SYNs, ClientHellos and small segments (a derived header with
/// the app's request) through, until the returned closure is called; TCP then resends them.
fn hold_client_finished(node: &Node, server: SocketAddr) -> impl FnOnce() {
    let net = format!("--net={}", node.ns.path().display());
    let nft = move |args: &str| {
        let out = std::process::Command::new("nsenter")
            .args([net.as_str(), "nft"])
            .arg(args)
            .output()
            .expect("run nft");
        assert!(out.status.success(), "nft {args}: {out:?}");
    };
    nft("add table ip zfhold");
    nft("add chain ip zfhold held { type filter hook forward priority 0 ; }");
    nft(&format!(
        "add rule ip zfhold held ip daddr {} tcp dport {} tcp flags & syn == 0 ip length > 600 \
         @ih,0,8 != 0x16 drop",
        server.ip(),
        server.port()
    ));
    move || nft("delete table ip zfhold")
}

/// The first-use race of a fresh root: the client's agent keeps its root once it has sent
/// its Finished, the server's agent once it has read it and decided policy. Here the
/// Finished is held on the wire while two app connections are dialed concurrently on the
/// fresh root: both headers reach the server's agent before the root they name exists there.
/// Both must be accepted as derived connections once the handshake completes: no refused
/// header (`derived.unknown`), no fallback, no flow failed, both bodies intact, and the root
/// still offered afterwards (on main the first refusal made the client take the server for
/// one that keeps no roots, and every later connection was a handshake).
#[test]
fn concurrent_dials_on_a_fresh_root_wait_for_it_and_are_derived() {
    require_privileged();
    let mut t = TwoNodes::new(127, "race");
    let www = serve_blob(&mut t.server, "wwwrace", 16 << 10);
    let http = SocketAddr::from((t.server.ip, 80));
    let url = format!("http://{http}/blob");
    let (c1, c2) = (t.c1.clone(), t.c2.clone());
    for c in [&c1, &c2] {
        assert_eq!(
            c.tuning.connection_keys,
            ConnectionKeysMode::Derived,
            "the default"
        );
    }
    let agent1 = RunningAgent::start(c1);
    let agent2 = RunningAgent::start(c2);
    let (ca, sa) = (&agent1.agent, &agent2.agent);
    let (c0, s0) = (ca.policy_stats(), sa.policy_stats());
    let curl_in_thread = |pod: &Pod| {
        let cmd = pod.command("curl");
        let url = url.clone();
        std::thread::spawn(move || curl(cmd, &url))
    };

    // The handshake connection, its client's second flight held.
    let release = hold_client_finished(&t.node1, http);
    let first = curl_in_thread(&t.client);
    // The client's agent keeps the root as soon as it has sent (into the hold) its Finished.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stat(&stats_delta(&c0, &ca.policy_stats()), "derived.kept") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the client kept no root"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        stat(&stats_delta(&s0, &sa.policy_stats()), "derived.kept"),
        0,
        "the server's agent kept its root before the Finished arrived: the hold did not hold"
    );
    // Two app connections at once on the fresh root, while the Finished is still held, and
    // held until both headers are out (their SYNs cross a veth pair; the margin is for a
    // slow emulated VM), well within the server's handshake timeout (5 s).
    let racing = [curl_in_thread(&t.client), curl_in_thread(&t.client)];
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while stat(&stats_delta(&c0, &ca.policy_stats()), "derived.offered") < 2
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(500));
    release();
    for (i, f) in std::iter::once(first)
        .chain(racing)
        .map(|h| h.join().expect("curl thread"))
        .enumerate()
    {
        assert_eq!(
            (f.code.as_str(), f.sha256()),
            ("200", www.want.clone()),
            "connection {i}"
        );
    }
    let (dc, ds) = (
        stats_delta(&c0, &ca.policy_stats()),
        stats_delta(&s0, &sa.policy_stats()),
    );
    assert_eq!(
        (
            stat(&dc, "derived.kept"),
            stat(&dc, "derived.used"),
            stat(&dc, "derived.fallback"),
            stat(&dc, "flows_failed"),
        ),
        (1, 2, 0, 0),
        "client: one root, both racing connections derived, no fallback {dc:?}"
    );
    assert_eq!(
        (
            stat(&ds, "derived.kept"),
            stat(&ds, "derived.accepted"),
            stat(&ds, "derived.unknown"),
            stat(&ds, "derived.awaited"),
        ),
        (1, 2, 0, 2),
        "server: both headers waited for the root's handshake and were accepted {ds:?}"
    );
    // And the root is still offered: the next connection is derived too.
    let (c1, s1) = (ca.policy_stats(), sa.policy_stats());
    let f = curl(t.client.command("curl"), &url);
    assert_eq!((f.code.as_str(), f.sha256()), ("200", www.want.clone()));
    let (dc, ds) = (
        stats_delta(&c1, &ca.policy_stats()),
        stats_delta(&s1, &sa.policy_stats()),
    );
    assert_eq!(
        (
            stat(&dc, "derived.used"),
            stat(&ds, "derived.accepted"),
            stat(&dc, "derived.kept")
        ),
        (1, 1, 0),
        "the connection after: {dc:?} {ds:?}"
    );
}

/// Seconds until the leaf of the agent's one local identity expires (its `/metrics` gauge):
/// it jumps up when the leaf is renewed.
fn leaf_expiry(agent: &interceptor::app::Agent) -> f64 {
    use interceptor::telemetry::Observed as _;
    let certificates = agent.snapshot().certificates;
    assert_eq!(
        certificates.len(),
        1,
        "one local identity: {certificates:?}"
    );
    certificates[0].1
}

/// Leaf renewals on both ends keep the root (leaves of 5 min renewed at 10 %: each agent
/// renews within about 30 s). Connections run one after another across the server's renewal
/// and the client's: every one after the first is derived from the first handshake's root,
/// no header is refused and no flow fails. Before session 15 a renewal started an empty root
/// store: the server's refused the next header (`unknown`, one fallback handshake), the
/// client's made a handshake for a new root (`derived.kept` 2 or more), and a handshake that
/// straddled the server's renewal kept its root in the replaced store (unit test
/// `a_renewed_leaf_keeps_its_roots_and_what_the_client_learned` holds that moment still).
#[test]
fn leaf_renewals_on_either_end_keep_the_root() {
    require_privileged();
    let mut t = TwoNodes::new(131, "renew");
    let www = serve_blob(&mut t.server, "wwwrenew", 16 << 10);
    let http = SocketAddr::from((t.server.ip, 80));
    let url = format!("http://{http}/blob");
    let (mut c1, mut c2) = (t.c1.clone(), t.c2.clone());
    for c in [&mut c1, &mut c2] {
        assert_eq!(c.tuning.connection_keys, ConnectionKeysMode::Derived);
        c.identity.leaf_ttl = interceptor::config::Ttl(Duration::from_secs(300));
        c.identity.renew_percent = 10;
        assert!(
            c.tuning.derived_root_lifetime_secs >= 120,
            "the root outlives the test"
        );
    }
    let agent1 = RunningAgent::start(c1);
    let agent2 = RunningAgent::start(c2);
    let (ca, sa) = (&agent1.agent, &agent2.agent);
    let (c0, s0) = (ca.policy_stats(), sa.policy_stats());
    let get = |i: usize| {
        let f = curl(t.client.command("curl"), &url);
        assert_eq!(
            (f.code.as_str(), f.sha256()),
            ("200", www.want.clone()),
            "connection {i}"
        );
    };
    get(0);
    // The time left on a leaf only falls, until the leaf is renewed.
    let mut left = [leaf_expiry(ca), leaf_expiry(sa)];
    let mut renewed = [false, false];
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut n = 1;
    // Until both have renewed, and a few connections after the later renewal.
    let mut after = 0;
    while after < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "not both renewed within 90 s (client, server): {renewed:?}"
        );
        get(n);
        n += 1;
        for (i, agent) in [ca, sa].into_iter().enumerate() {
            let now = leaf_expiry(agent);
            renewed[i] |= now > left[i] + 1.0;
            left[i] = now;
        }
        if renewed == [true, true] {
            after += 1;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (dc, ds) = (
        stats_delta(&c0, &ca.policy_stats()),
        stats_delta(&s0, &sa.policy_stats()),
    );
    let connections = u64::try_from(n).unwrap();
    assert_eq!(
        (
            stat(&dc, "derived.kept"),
            stat(&dc, "derived.used"),
            stat(&dc, "derived.fallback"),
            stat(&dc, "flows_failed"),
        ),
        (1, connections - 1, 0, 0),
        "client: one root for all {connections} connections across both renewals {dc:?}"
    );
    assert_eq!(
        (
            stat(&ds, "derived.kept"),
            stat(&ds, "derived.accepted"),
            stat(&ds, "derived.unknown"),
        ),
        (1, connections - 1, 0),
        "server: the root survived its own renewal {ds:?}"
    );
}
