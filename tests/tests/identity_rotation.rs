//! Root CA rotation without an outage, as ARCHITECTURE.md documents it: (a) add the new root to
//! every node's bundle, (b) switch every node's signer to an intermediate of the new root,
//! (c) remove the old root. Two agents go through the steps one node at a time (so the nodes
//! are at different steps in between) while a pod keeps sending requests from one node to the
//! other and a connection opened at the start stays open: every request must succeed, over
//! mTLS, and the open connection must keep carrying data. On the host the mesh leg is the
//! userspace relay; in the VM the open flow is kernel TLS while both agents reload.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use interceptor::{
    app::Agent,
    ca::{Ca, CertificateAuthority as _, OnExisting},
};
use interceptor_tests::{
    agent::{RunningAgent, TempDir, peer, workload},
    apps::{curl, random_payload, sha256_hex},
    identity::{mesh_request, mesh_request_as},
    in_vm,
    mesh::{NcSession, busybox, echo_server},
    require_privileged,
    scenario::{Cluster, expected_protection, serve_blob},
    topology::{Node, Pod, wire},
    wire::{Capture, assert_no_plaintext},
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/foo/sa/sleep";
const SERVER_ID: &str = "spiffe://cluster.local/ns/bar/sa/httpbin";
const ECHO_PORT: u16 = 7001;
const BLOB: usize = 64 << 10;

/// Replaces a file the way a secret volume update or `mv` does: the watcher never reads half.
fn write_atomic(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn pem(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).expect("read pem")
}

/// Waits until `agent` has put one more CA reload into effect than `before`.
fn wait_reload(agent: &Agent, before: u64, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.ca_generation() <= before {
        assert!(
            Instant::now() < deadline,
            "{step}: the agent did not reload its CA directory"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Requests in a loop from the client pod until `stop` exists, one result line per request
/// (`<http code> <bytes>`).
struct Traffic {
    child: Child,
    out: PathBuf,
    stop: PathBuf,
}

impl Traffic {
    fn start(client: &Pod, url: &str, dir: &Path) -> Self {
        let out = dir.join("traffic.log");
        let stop = dir.join("traffic.stop");
        let script = format!(
            "while [ ! -e {stop} ]; do curl -s -m 10 -o /dev/null -w '%{{http_code}} %{{size_download}}\\n' {url} >> {out}; sleep {pause}; done",
            stop = stop.display(),
            out = out.display(),
            // The emulated CPU of the VM is shared with the agents under test.
            pause = if in_vm() { "0.3" } else { "0.05" },
        );
        let child = client
            .command("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .expect("traffic loop");
        Self { child, out, stop }
    }

    fn results(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until two more requests finished than `seen`: at least one of them was sent
    /// after the caller's step began, so every step of the rotation is crossed by traffic
    /// however slow the machine (a fixed request count raced the VM's emulated CPU).
    fn wait_past(&self, seen: usize, step: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.results().len() < seen + 2 {
            assert!(
                Instant::now() < deadline,
                "{step}: no background request finished in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn finish(mut self) -> Vec<String> {
        std::fs::write(&self.stop, "").expect("stop traffic");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "the traffic loop did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.results()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn staggered_root_rotation_loses_no_request_and_no_open_flow() {
    require_privileged();
    let node1 = Node::new(75);
    let node2 = Node::new(76);
    let wire_if = wire(&node1, &node2);
    let client = node1.pod("rtclient", 2);
    let mut server = node2.pod("rtserver", 3);
    let www = serve_blob(&mut server, "wwwrt", BLOB);
    echo_server(&server, ECHO_PORT);

    // Two roots; each node signs with its own intermediate of root A and trusts A.
    let pki = TempDir::new("rotation");
    let (root_a, root_b) = (pki.0.join("root-a"), pki.0.join("root-b"));
    Ca::init(
        &"cluster.local".parse().unwrap(),
        &root_a,
        OnExisting::Refuse,
    )
    .expect("root A");
    Ca::init(
        &"cluster.local".parse().unwrap(),
        &root_b,
        OnExisting::Refuse,
    )
    .expect("root B");
    let (ca1, ca2) = (pki.0.join("node1"), pki.0.join("node2"));
    let month = Duration::from_secs(90 * 86_400);
    for dir in [&ca1, &ca2] {
        Ca::intermediate(&root_a, dir, month, None, OnExisting::Refuse).expect("intermediate");
    }
    let both_roots = format!(
        "{}{}",
        pem(&root_a, "root-cert.pem"),
        pem(&root_b, "root-cert.pem")
    );
    let only_b = pem(&root_b, "root-cert.pem");

    let cluster = Cluster::new("rotationca");
    let mut c1 = cluster.node_config(
        "n1",
        vec![workload(&client, "foo", "sleep")],
        vec![peer(&server, "bar", "httpbin")],
    );
    let mut c2 = cluster.node_config(
        "n2",
        vec![workload(&server, "bar", "httpbin")],
        vec![peer(&client, "foo", "sleep")],
    );
    c1.ca_dir = ca1.clone();
    c2.ca_dir = ca2.clone();
    for c in [&mut c1, &mut c2] {
        c.identity.ca_poll_ms = 100;
        if in_vm() {
            // The VM emulates its CPU: a mesh client's first ClientHello can take longer than
            // the default wait for a silent (server-speaks-first) plaintext client.
            c.tuning.first_byte_wait_ms = 2_000;
        }
    }
    let agent1 = RunningAgent::start(c1);
    let agent2 = RunningAgent::start(c2);

    let url = format!("http://{}/blob", server.ip);
    let capture = Capture::start_in(&node1.ns.path(), &wire_if);
    let mut flow = NcSession::open(
        client.command(busybox()),
        SocketAddr::from((server.ip, ECHO_PORT)),
    );
    assert_eq!(
        flow.echo("start", Duration::from_secs(10)).as_deref(),
        Some("start")
    );
    let open_id = agent2
        .agent
        .flows()
        .into_iter()
        .find(|r| r.destination.port() == ECHO_PORT)
        .map(|r| {
            assert_eq!(r.peer_id.as_deref(), Some(CLIENT_ID));
            assert_eq!(r.protection, expected_protection());
            r.id
        })
        .expect("the open flow on the server agent");
    let traffic = Traffic::start(&client, &url, &pki.0);

    // The server agent chains to `root` (a verifying client trusting only that root accepts
    // it), or not.
    let chains_to = |root: &Path| {
        mesh_request(
            &client.netns_path(),
            root,
            CLIENT_ID,
            SERVER_ID,
            SocketAddr::from((server.ip, 80)),
            b"GET /blob HTTP/1.0\r\n\r\n",
        )
        .is_ok()
    };
    let mut batch = 0;
    let mut check = |step: &str, flow: &mut NcSession| {
        let f = curl(client.command("curl"), &url);
        assert_eq!(
            (f.code.as_str(), f.sha256()),
            ("200", www.want.clone()),
            "{step}: request across the nodes"
        );
        batch += 1;
        let line = sha256_hex(&random_payload(batch));
        assert_eq!(
            flow.echo(&line, Duration::from_secs(10)).as_deref(),
            Some(line.as_str()),
            "{step}: the flow opened before the rotation"
        );
    };
    // Requests keep flowing between steps, so every reload happens under load.
    let settle = || std::thread::sleep(Duration::from_millis(300));

    check("before", &mut flow);
    assert!(chains_to(&root_a));
    // One root-A client leaf, kept: node2 accepts it now (and its verifier remembers the
    // chain); once root A left node2's bundle the same bytes must be refused.
    let old_client = Ca::load(&root_a)
        .expect("root A")
        .issue(
            &CLIENT_ID.parse().expect("client id"),
            Duration::from_secs(3600),
        )
        .expect("root-A client leaf");
    let as_old_client = || {
        mesh_request_as(
            &client.netns_path(),
            &old_client,
            &root_b,
            SERVER_ID,
            SocketAddr::from((server.ip, 80)),
            b"GET /blob HTTP/1.0\r\n\r\n",
        )
    };

    // A bad change (a bundle cut in half) is refused; the previous material stays in effect
    // and is reloaded once the file is whole again. (Host only: the reload path is the same
    // in the VM, whose emulated CPU is better spent on the rotation itself.)
    if !in_vm() {
        let good = pem(&ca1, "root-cert.pem");
        let before = agent1.agent.ca_generation();
        write_atomic(
            &ca1.join("root-cert.pem"),
            &good.as_bytes()[..good.len() / 2],
        );
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(
            agent1.agent.ca_generation(),
            before,
            "a truncated bundle was put into effect"
        );
        check("bad bundle on node1", &mut flow);
        write_atomic(&ca1.join("root-cert.pem"), good.as_bytes());
        wait_reload(&agent1.agent, before, "bundle repaired");
        check("bundle repaired", &mut flow);
    }

    let steps: [(&str, &Path, &RunningAgent, &dyn Fn()); 6] = [
        ("(a) node1 trusts A+B", &ca1, &agent1, &|| {
            write_atomic(&ca1.join("root-cert.pem"), both_roots.as_bytes())
        }),
        ("(a) node2 trusts A+B", &ca2, &agent2, &|| {
            write_atomic(&ca2.join("root-cert.pem"), both_roots.as_bytes())
        }),
        ("(b) node1 signs with B", &ca1, &agent1, &|| {
            Ca::intermediate(&root_b, &ca1, month, None, OnExisting::Replace).expect("int B");
        }),
        ("(b) node2 signs with B", &ca2, &agent2, &|| {
            Ca::intermediate(&root_b, &ca2, month, None, OnExisting::Replace).expect("int B");
        }),
        ("(c) node1 trusts B only", &ca1, &agent1, &|| {
            write_atomic(&ca1.join("root-cert.pem"), only_b.as_bytes())
        }),
        ("(c) node2 trusts B only", &ca2, &agent2, &|| {
            write_atomic(&ca2.join("root-cert.pem"), only_b.as_bytes())
        }),
    ];
    for (step, _dir, agent, apply) in steps {
        let before = agent.agent.ca_generation();
        let seen = traffic.results().len();
        apply();
        wait_reload(&agent.agent, before, step);
        settle();
        check(step, &mut flow);
        traffic.wait_past(seen, step);
        if step == "(b) node2 signs with B" {
            // It presents its new intermediate at once (and only that).
            assert!(chains_to(&root_b) && !chains_to(&root_a), "{step}");
            // ...and still accepts a root-A client, twice (the second from its chain cache).
            for _ in 0..2 {
                as_old_client().unwrap_or_else(|e| panic!("{step}: root-A client: {e:#}"));
            }
        }
    }
    // The old root is gone everywhere: a client of root A is refused by node2, including the
    // exact chain node2 accepted (and cached) before.
    assert!(!chains_to(&root_a), "a root-A client after (c)");
    match as_old_client() {
        Ok(_) => panic!("node2 still accepts a root-A chain after root A left its bundle"),
        // The refusal comes from node2 (an alert, or the connection closed after the client's
        // certificate), not from this client rejecting node2's chain.
        Err(e) => assert!(
            !format!("{e:#}").contains("invalid peer certificate"),
            "{e:#}"
        ),
    }

    let results = traffic.finish();
    let frames = capture.stop();
    let want = format!("200 {BLOB}");
    let failed: Vec<&String> = results.iter().filter(|r| **r != want).collect();
    assert!(
        results.len() >= 10 && failed.is_empty(),
        "{} of {} background requests failed: {failed:?}",
        failed.len(),
        results.len()
    );
    assert_no_plaintext(&frames, &www.payload);
    assert!(
        agent2.agent.flows().iter().any(|r| r.id == open_id),
        "the flow opened before the rotation is still open"
    );
    eprintln!(
        "rotation: {} background requests, all 200 over mTLS",
        results.len()
    );
}
