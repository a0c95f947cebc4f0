//! One pod flooding the agent with connections must not deny service to the others: the
//! agent holds at most `maxConnectionsPerPod` flows for it (`maxPendingHandshakesPerPod` of
//! them in set-up) and resets the rest, so another pod's requests keep succeeding over mTLS.
//!
//! The agent runs in this process; the process's descriptor limit is lowered (its own test
//! binary, so no other test shares it) to stand for a node's, scaled down: without the caps
//! the flood's flows take every descriptor and the other pod's connections are never
//! accepted.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::Duration,
};

use interceptor_tests::{
    agent::workload,
    apps::busybox,
    flood::Flood,
    mesh::{PolicyDir, flows_after, last_flow_id, stats_delta},
    require_privileged,
    scenario::{Cluster, Scenario, expected_protection, serve_blob},
    topology::Pod,
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

/// A shell in a pod that runs curl on request.
struct Shell {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    body: String,
}

impl Shell {
    fn start(pod: &Pod, body: &Path) -> Shell {
        let mut child = pod
            .command(busybox())
            .arg("sh")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("shell in pod");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Shell {
            child,
            stdin,
            stdout,
            body: body.display().to_string(),
        }
    }

    /// `(HTTP code, hex SHA-256 of the body)` of a GET.
    fn fetch(&mut self, url: &str) -> (String, String) {
        self.send(url);
        self.result()
    }

    /// Starts a GET (curl gives up after 10 s); [`Shell::result`] waits for it.
    fn send(&mut self, url: &str) {
        let b = &self.body;
        writeln!(
            self.stdin,
            "rm -f {b}; c=$(curl -s -m 10 -o {b} -w '%{{http_code}}' {url}); \
             echo \"$c $(sha256sum < {b} 2>/dev/null)\""
        )
        .expect("shell stdin");
    }

    fn result(&mut self) -> (String, String) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("shell stdout");
        let mut words = line.split_whitespace();
        let code = words.next().unwrap_or("").to_owned();
        let hash = words.next().unwrap_or("").to_owned();
        (code, hash)
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tests of this file run one at a time: both exhaust this process's descriptors.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn a_flooding_pod_cannot_stop_another_pods_requests() {
    require_privileged();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    lower_fd_limit(FD_LIMIT);
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(61, "sleep", "httpbin");
    let flooder = node.pod("flooder", 4);
    let www = serve_blob(&mut server, "www", 64 << 10);
    interceptor_tests::mesh::echo_server(&server, 9000);
    let policy = PolicyDir::with("mesh.yaml", STRICT_MESH);
    let cluster = Cluster::new("flood");
    let pods = [
        (&client, "sleep"),
        (&server, "httpbin"),
        (&flooder, "flooder"),
    ];
    let mut config = cluster.config_in("full", &pods, &policy);
    config.tuning.max_connections_per_pod = 64;
    config.tuning.max_pending_handshakes_per_pod = 16;
    let agent = interceptor_tests::agent::RunningAgent::start(config);
    let before = agent.agent.policy_stats();
    // Started before the flood: running curl later needs no descriptor of this process (which
    // the agent shares).
    let mut shell = Shell::start(&client, &cluster.scratch.0.join("body"));

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
        let (code, hash) = shell.fetch(&format!("http://{}/blob", server.ip));
        assert_eq!(
            code, "200",
            "request {i} of the other pod failed during the flood"
        );
        assert_eq!(hash, www.want, "payload corrupted");
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

/// Out of descriptors, the agent's accept fails: it backs off (10 ms doubling to 1 s) rather
/// than retrying every few milliseconds, counts each failure, and serves the waiting
/// connection once descriptors are free again.
#[test]
fn accept_backs_off_while_out_of_descriptors_and_recovers() {
    require_privileged();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let Scenario {
        client,
        mut server,
        node: _node,
    } = Scenario::new(64, "sleep", "httpbin");
    let www = serve_blob(&mut server, "www", 1024);
    let cluster = Cluster::new("emfile");
    let agent = interceptor_tests::agent::RunningAgent::start(cluster.config(
        vec![
            workload(&client, "full", "sleep"),
            workload(&server, "full", "httpbin"),
        ],
        vec![],
    ));
    let mut shell = Shell::start(&client, &cluster.scratch.0.join("body"));
    let url = format!("http://{}/blob", server.ip);
    assert_eq!(shell.fetch(&url).0, "200", "before the exhaustion");
    let before = agent.agent.policy_stats();

    // Take every descriptor this process (and so the agent) may open.
    let mut hog = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hog.push(f);
    }
    shell.send(&url);
    std::thread::sleep(Duration::from_secs(3));
    let failed = stats_delta(&before, &agent.agent.policy_stats())
        .get("accept_failed.emfile")
        .copied()
        .unwrap_or(0);
    drop(hog);
    println!("out of descriptors for 3 s: {failed} failed accepts");
    // 10 + 20 + ... + 1000 ms: about ten attempts in 3 s (a 50 ms retry made sixty).
    assert!(
        (1..=20).contains(&failed),
        "{failed} failed accepts counted in 3 s out of descriptors"
    );
    let (code, hash) = shell.result();
    assert_eq!(
        code, "200",
        "the waiting request was not served after recovery"
    );
    assert_eq!(hash, www.want);
}
