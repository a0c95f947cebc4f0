//! The same-node fast path (`tuning.sameNodeFastPath`, issue 17 §4), end to end with the
//! real agent binary: two enrolled pods on one agent talk without TLS over two loopback legs,
//! and nothing of it crosses either pod's link; policy is still decided with both identities
//! (AuthorizationPolicy DENY on the client's principal, STRICT against a client outside the
//! mesh, a DISABLE port); `flows --json` and the access log name both principals with mode
//! `local`. With the fast path off, the same pods get mesh mTLS as before.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use interceptor::{
    config::SameNodeJoin,
    intercept::table::{Direction, FlowRow, Protection},
    telemetry::Mode,
};
use interceptor_tests::{
    agent::{PinCleanup, RunningAgent, TempDir},
    apps::{
        curl, curl_upload, random_payload, serve_http_enrolled, serve_http_on, serve_upload_hasher,
        sha256_hex,
    },
    connect_from,
    mesh::{PolicyDir, workload},
    process::{AgentProcess, access_lines, assert_log_bytes_match},
    require_privileged,
    scenario::{self, Www, expected_protection},
    topology::{Node, Pod},
    wire::{Capture, Streams, assert_no_plaintext, assert_tls_records},
};

const SLEEP_ID: &str = "spiffe://cluster.local/ns/full/sa/sleep";
const HTTPBIN_ID: &str = "spiffe://cluster.local/ns/full/sa/httpbin";

/// httpbin: STRICT, but port 81 DISABLE; the `other` namespace's client is denied.
const POLICY: &str = "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: httpbin
  namespace: full
spec:
  selector:
    matchLabels:
      app: httpbin
  mtls:
    mode: STRICT
  portLevelMtls:
    81:
      mode: DISABLE
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-other
  namespace: full
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/other/sa/other]
";

/// The app port of the upload hasher in the httpbin pod.
const UPLOAD_PORT: u16 = 8081;

/// Captures on both pods' links (in the node's netns) while `f` runs.
fn on_both_links<T>(node: &Node, pods: [&Pod; 2], f: impl FnOnce() -> T) -> (T, Vec<Streams>) {
    let captures: Vec<Capture> = pods
        .iter()
        .map(|p| Capture::start_in(&node.ns.path(), &p.host_if))
        .collect();
    let out = f();
    let streams = captures.into_iter().map(Capture::stop_streams).collect();
    (out, streams)
}

#[test]
fn same_node_fast_path_policy_matrix_wire_and_principals() {
    require_privileged();
    let node = Node::new(92);
    let mut httpbin = node.pod("httpbin", 10);
    let sleep = node.pod("sleep", 11);
    let other = node.pod("other", 12);
    let legacy = node.pod("legacy", 30);
    let www = Www::with_blob("samenode", 4 << 20);
    let ip = httpbin.ip;
    serve_http_on(&mut httpbin, www.path(), "80", SocketAddr::from((ip, 80)));
    serve_http_on(&mut httpbin, www.path(), "81", SocketAddr::from((ip, 81)));
    serve_upload_hasher(&httpbin, UPLOAD_PORT);

    let cluster = scenario::Cluster::new("samenode");
    let policy = PolicyDir::new();
    policy.write("policy.yaml", POLICY);
    let mut config = cluster.config(
        vec![
            workload(&httpbin, "full", "httpbin", &[("app", "httpbin")]),
            workload(&sleep, "full", "sleep", &[("app", "sleep")]),
            workload(&other, "other", "other", &[("app", "other")]),
        ],
        vec![],
    );
    // The agent's default; the test helper turns it off for the suites that test mTLS.
    config.tuning.same_node_fast_path = true;
    config.policy_dir = Some(policy.path());
    let _pins = PinCleanup(config.bpffs.clone());
    let (agent, log_path) = AgentProcess::start_logging_json(&mut config, &cluster.scratch.0);

    // Allowed, both directions, with the links of both pods captured: byte-exact, and not
    // one segment of the flow on either link (it never leaves the node's loopbacks).
    let blob = format!("http://{}:80/blob", httpbin.ip);
    let (fetch, links) = on_both_links(&node, [&sleep, &httpbin], || {
        curl(sleep.command("curl"), &blob)
    });
    assert_eq!(fetch.code, "200", "sleep → httpbin, same node");
    assert_eq!(
        fetch.sha256(),
        www.want,
        "download corrupted on the fast path"
    );
    let upload = random_payload(3 << 20);
    let upload_file = TempDir::new("samenode-up");
    let upload_path = upload_file.0.join("up");
    std::fs::write(&upload_path, &upload).expect("write upload");
    let up_url = format!("http://{}:{UPLOAD_PORT}/", httpbin.ip);
    let (sent, up_links) = on_both_links(&node, [&sleep, &httpbin], || {
        curl_upload(sleep.command("curl"), &up_url, &upload_path)
    });
    assert_eq!(sent.code, "200", "upload sleep → httpbin");
    assert_eq!(
        String::from_utf8_lossy(&sent.body).trim(),
        sha256_hex(&upload),
        "upload corrupted on the fast path"
    );
    for (streams, payload) in links
        .iter()
        .map(|s| (s, &www.payload))
        .chain(up_links.iter().map(|s| (s, &upload)))
    {
        assert_no_plaintext(streams, payload);
        let on_link: Vec<_> = streams
            .streams
            .iter()
            .filter(|s| {
                [80, UPLOAD_PORT].contains(&s.src.port())
                    || [80, UPLOAD_PORT].contains(&s.dst.port())
            })
            .map(|s| (s.src, s.dst, s.bytes.len()))
            .collect();
        assert!(
            on_link.is_empty(),
            "the flow crossed a pod link: {on_link:?}"
        );
    }

    // Refused as the server's agent would refuse it: a denied principal, and plaintext from
    // outside the mesh to a STRICT port.
    let before = agent.stats();
    let denied = curl(other.command("curl"), &blob);
    assert_eq!(denied.code, "000", "other → httpbin must be denied");
    let strict = curl(legacy.command_unenrolled("curl"), &blob);
    assert_eq!(
        strict.code, "000",
        "plaintext to a STRICT port must be refused"
    );
    // DISABLE: the workload takes no mesh TLS there; automatic mTLS sends plaintext, which the
    // fast path leaves to the plaintext path (as on another node).
    let disabled = curl(
        sleep.command("curl"),
        &format!("http://{}:81/blob", httpbin.ip),
    );
    assert_eq!(disabled.code, "200", "DISABLE port");
    assert_eq!(disabled.sha256(), www.want);
    let after = agent.stats();
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert_eq!(delta("refused.deny_rule"), 1, "{after:?}");
    assert_eq!(delta("refused.plaintext_refused_strict"), 1, "{after:?}");

    // One row per same-node connection, both principals, mode local; the DISABLE request
    // is plaintext on both sides.
    let flows = agent.flows();
    let local: Vec<&FlowRow> = flows
        .iter()
        .filter(|r| r.protection == Protection::Local)
        .collect();
    assert_eq!(local.len(), 2, "{flows:#?}");
    for r in &local {
        assert_eq!(r.pod, "sleep");
        assert_eq!(r.direction, Direction::Outbound);
        assert_eq!(r.peer_id.as_deref(), Some(HTTPBIN_ID), "{r:?}");
        assert_eq!(r.mode, Some(Mode::Local), "{r:?}");
        assert!(r.cipher.is_none(), "{r:?}");
    }
    let download = local
        .iter()
        .find(|r| r.destination.port() == 80)
        .expect("download row");
    assert!(
        download.bytes_from_peer as usize > www.payload.len(),
        "{download:?}"
    );
    assert!(
        !flows
            .iter()
            .any(|r| r.destination.port() == 80 && r.pod == "httpbin"),
        "a same-node flow must not also run the inbound path: {flows:#?}"
    );
    let plain: Vec<&FlowRow> = flows
        .iter()
        .filter(|r| r.destination.port() == 81)
        .collect();
    assert_eq!(plain.len(), 2, "{flows:#?}");
    assert!(plain.iter().all(|r| r.protection == Protection::Plaintext));

    // The access log: each local flow once, with both principals and the flow table's bytes.
    let lines = access_lines(&log_path, 6);
    let local_lines: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["mode"] == "local").collect();
    assert_eq!(local_lines.len(), 2, "{lines:#?}");
    for line in local_lines {
        assert_eq!(line["event"], "flow_closed");
        assert_eq!(line["outcome"], "closed", "{line}");
        assert_eq!(line["src_spiffe"], SLEEP_ID, "{line}");
        assert_eq!(line["dst_spiffe"], HTTPBIN_ID, "{line}");
        assert_eq!(line["src_workload"], "sleep", "{line}");
        assert_eq!(line["dst_workload"], "httpbin", "{line}");
        assert_eq!(line["ktls"], false, "{line}");
        let row = local
            .iter()
            .find(|r| r.source.to_string() == line["src_addr"].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("no flow row for {line}"));
        assert_log_bytes_match(line, row);
    }
    let refusals: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["event"] == "refused").collect();
    let denied = refusals
        .iter()
        .find(|l| l["code"] == "deny_rule")
        .unwrap_or_else(|| panic!("no deny_rule line: {lines:#?}"));
    assert_eq!(
        denied["src_spiffe"],
        "spiffe://cluster.local/ns/other/sa/other"
    );
    assert_eq!(denied["dst_spiffe"], HTTPBIN_ID);

    // A policy change decides an open same-node flow again on the server's half: a DENY of
    // the client's principal closes it.
    assert_deny_closes_a_held_local_flow(&agent, &sleep, ip, &policy);
}

const POLICY_DENY_SLEEP: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: full
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/full/sa/sleep]
";

/// Polls `cond` for up to 10 s.
/// Holds a same-node flow from `sleep` to port 80 open, then writes a DENY of sleep's
/// principal: the server's half decides the open flow again, so it must close with the
/// `deny_rule` reason, exactly once.
fn assert_deny_closes_a_held_local_flow(
    agent: &AgentProcess,
    sleep: &Pod,
    ip: std::net::Ipv4Addr,
    policy: &PolicyDir,
) {
    let held = connect_from(
        Some(&sleep.cgroup.path),
        &sleep.netns_path(),
        SocketAddr::from((ip, 80)),
        b"",
    );
    assert_eq!(held.peer, Ok(SocketAddr::from((ip, 80))));
    let open = || {
        agent
            .flows()
            .iter()
            .any(|r| r.protection == Protection::Local && !r.closed)
    };
    wait_until("the held flow is listed", open);
    let before = agent.stats();
    policy.write("deny-sleep.yaml", POLICY_DENY_SLEEP);
    wait_until("the held flow is closed by the new policy", || !open());
    let after = agent.stats();
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert_eq!(delta("closed.deny_rule"), 1, "{after:?}");
    drop(held);
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// With `sameNodeFastPath: false` the same two pods get mesh mTLS on the wire, as before.
#[test]
fn same_node_fast_path_off_keeps_mesh_mtls() {
    require_privileged();
    let node = Node::new(93);
    let mut httpbin = node.pod("httpbin", 10);
    let sleep = node.pod("sleep", 11);
    let www = Www::with_blob("samenodeoff", 1 << 20);
    let ip = httpbin.ip;
    serve_http_on(&mut httpbin, www.path(), "80", SocketAddr::from((ip, 80)));
    let cluster = scenario::Cluster::new("samenodeoff");
    let mut config = cluster.config(
        vec![
            workload(&httpbin, "full", "httpbin", &[]),
            workload(&sleep, "full", "sleep", &[]),
        ],
        vec![],
    );
    config.tuning.same_node_fast_path = false;
    let agent = RunningAgent::start(config);
    let (fetch, links) = on_both_links(&node, [&sleep, &httpbin], || {
        curl(
            sleep.command("curl"),
            &format!("http://{}:80/blob", httpbin.ip),
        )
    });
    assert_eq!(fetch.code, "200");
    assert_eq!(fetch.sha256(), www.want);
    let server = SocketAddr::from((httpbin.ip, 80));
    for streams in &links {
        assert_no_plaintext(streams, &www.payload);
        let mesh: Vec<_> = streams
            .streams
            .iter()
            .filter(|s| s.src == server || s.dst == server)
            .collect();
        assert!(mesh.len() >= 2, "no mTLS streams on the link");
        for s in mesh {
            assert_tls_records(&s.bytes);
        }
    }
    let flows = agent.agent.flows_with_recent();
    assert!(
        flows.iter().all(|r| r.protection == expected_protection()),
        "{flows:#?}"
    );
    assert_eq!(flows.len(), 2, "outbound and inbound rows: {flows:#?}");
}

/// A raw sink in `pod` (a thread of the test, in the pod's netns): waits `stall` before its
/// first read, then reads in 16 KiB steps with a pause between them until EOF, and answers
/// `"<bytes> <sha256>\n"` before it closes. A writer meets a full leg: what the join must
/// then hand to the splice relay without losing order or failing the sender.
fn serve_slow_sink(pod: &Pod, port: u16, stall: Duration) {
    use std::io::{Read as _, Write as _};
    let addr = SocketAddr::from((pod.ip, port));
    let listener = pod.ns.run(move || std::net::TcpListener::bind(addr));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || -> std::io::Result<()> {
                std::thread::sleep(stall);
                let mut hasher = interceptor_tests::digest::Sha256::new();
                let (mut buf, mut total) = (vec![0u8; 16 << 10], 0usize);
                loop {
                    let n = conn.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    total += n;
                    std::thread::sleep(Duration::from_micros(500));
                }
                let line = format!("{total} {}\n", hasher.hex());
                conn.write_all(line.as_bytes())
            });
        }
    });
}

/// `tuning.sameNodeJoin: skMsg`: the same flows, now mostly carried by the sk_msg join. Both
/// directions byte-exact with the join redirecting (kernel counters), nothing on either
/// pod's link, a writer far faster than its reader (the join falls back to the relay and
/// back; byte-exact, the sender never fails), a client half-close answered after it, byte
/// counts that include the redirected bytes in the flow table and the access log, and a
/// policy change that still closes an open joined flow.
#[test]
fn same_node_sk_msg_join_order_backpressure_half_close_counts_and_reset() {
    require_privileged();
    let node = Node::new(94);
    let mut httpbin = node.pod("httpbin", 10);
    let sleep = node.pod("sleep", 11);
    let www = Www::with_blob("samenodejoin", 4 << 20);
    let ip = httpbin.ip;
    // In the pod's cgroup, so its sends enter the join (a server outside it is never joined).
    serve_http_enrolled(&mut httpbin, www.path(), "80", SocketAddr::from((ip, 80)));
    serve_upload_hasher(&httpbin, UPLOAD_PORT);
    const SINK_PORT: u16 = 9090;
    serve_slow_sink(&httpbin, SINK_PORT, Duration::from_millis(400));

    let cluster = scenario::Cluster::new("samenodejoin");
    let policy = PolicyDir::new();
    policy.write("policy.yaml", POLICY);
    let mut config = cluster.config(
        vec![
            workload(&httpbin, "full", "httpbin", &[("app", "httpbin")]),
            workload(&sleep, "full", "sleep", &[("app", "sleep")]),
        ],
        vec![],
    );
    config.tuning.same_node_fast_path = true;
    config.tuning.same_node_join = SameNodeJoin::SkMsg;
    config.policy_dir = Some(policy.path());
    let _pins = PinCleanup(config.bpffs.clone());
    let (agent, log_path) = AgentProcess::start_logging_json(&mut config, &cluster.scratch.0);

    // Download (the server app's sends are joined) and upload (curl's, non-blocking).
    let before = agent.stats();
    let blob = format!("http://{ip}:80/blob");
    let upload = random_payload(3 << 20);
    let upload_file = TempDir::new("samenodejoin-up");
    let upload_path = upload_file.0.join("up");
    std::fs::write(&upload_path, &upload).expect("write upload");
    let up_url = format!("http://{ip}:{UPLOAD_PORT}/");
    let ((fetch, sent), links) = on_both_links(&node, [&sleep, &httpbin], || {
        (
            curl(sleep.command("curl"), &blob),
            curl_upload(sleep.command("curl"), &up_url, &upload_path),
        )
    });
    assert_eq!(fetch.code, "200", "download over the join");
    assert_eq!(fetch.sha256(), www.want, "download corrupted by the join");
    assert_eq!(sent.code, "200", "upload over the join");
    assert_eq!(
        String::from_utf8_lossy(&sent.body).trim(),
        sha256_hex(&upload),
        "upload corrupted by the join"
    );
    let after = agent.stats();
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    assert!(
        delta("JoinRedirected") > 0,
        "the join redirected nothing: {after:?}"
    );

    // A writer faster than its reader, half-closing at the end: the sink stalls, then reads
    // slowly; the leg fills, the join hands over to the relay.
    let before = agent.stats();
    let bulk = random_payload(12 << 20);
    let bulk_path = upload_file.0.join("bulk");
    std::fs::write(&bulk_path, &bulk).expect("write bulk");
    let (answer, bulk_links) = on_both_links(&node, [&sleep, &httpbin], || {
        let out = sleep
            .command("busybox")
            .args(["nc", &ip.to_string(), &SINK_PORT.to_string()])
            .stdin(std::fs::File::open(&bulk_path).expect("open bulk"))
            .output()
            .expect("nc");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    });
    assert_eq!(
        answer,
        format!("{} {}", bulk.len(), {
            let mut h = interceptor_tests::digest::Sha256::new();
            h.update(&bulk);
            h.hex()
        }),
        "slow reader: bytes lost, reordered, or the half-close not answered"
    );
    let after = agent.stats();
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    // The hand-over to the relay must happen (the leg fills). Whether the join takes over
    // again depends on when the slow reader lets the queue drain below the grant, which is
    // scheduling, not correctness: the hash above is what proves order across the switches,
    // and `skmsg_join` proves each rule of the program on its own.
    assert!(
        delta("JoinFellBack") > 0,
        "a full leg must hand over to the relay: {after:?}"
    );

    for (streams, payload) in links
        .iter()
        .map(|s| (s, &www.payload))
        .chain(links.iter().map(|s| (s, &upload)))
        .chain(bulk_links.iter().map(|s| (s, &bulk)))
    {
        assert_no_plaintext(streams, payload);
        let ports = [80, UPLOAD_PORT, SINK_PORT];
        assert!(
            !streams
                .streams
                .iter()
                .any(|s| ports.contains(&s.src.port()) || ports.contains(&s.dst.port())),
            "a joined flow crossed a pod link"
        );
    }

    // Byte counts include what the program redirected, in the table and the access log.
    let flows = agent.flows();
    let local: Vec<&FlowRow> = flows
        .iter()
        .filter(|r| r.protection == Protection::Local)
        .collect();
    assert_eq!(local.len(), 3, "{flows:#?}");
    let row = |port: u16| {
        *local
            .iter()
            .find(|r| r.destination.port() == port)
            .unwrap_or_else(|| panic!("no row for port {port}: {flows:#?}"))
    };
    assert!(
        row(80).bytes_from_peer as usize > www.payload.len(),
        "{:?}",
        row(80)
    );
    assert!(
        row(UPLOAD_PORT).bytes_to_peer as usize > upload.len(),
        "{:?}",
        row(UPLOAD_PORT)
    );
    assert_eq!(
        row(SINK_PORT).bytes_to_peer as usize,
        bulk.len(),
        "{:?}",
        row(SINK_PORT)
    );
    let answer_len = answer.len() as u64 + 1;
    assert_eq!(
        row(SINK_PORT).bytes_from_peer,
        answer_len,
        "{:?}",
        row(SINK_PORT)
    );
    let lines = access_lines(&log_path, 3);
    for line in lines.iter().filter(|l| l["mode"] == "local") {
        let row = local
            .iter()
            .find(|r| r.source.to_string() == line["src_addr"].as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("no flow row for {line}"));
        assert_log_bytes_match(line, row);
    }

    // A policy change still closes an open joined flow.
    assert_deny_closes_a_held_local_flow(&agent, &sleep, ip, &policy);
}
