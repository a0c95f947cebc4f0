//! Istio security policy end to end (issue 4): the seed documents' curl matrices with real curl
//! and busybox httpd in pods, through the in-process agent, with policy files in a watched
//! directory and services reached through their VIPs (the agent picks endpoints for enrolled
//! clients; kube-proxy-style nftables DNAT does it for the others).
//!
//! Where the seeds show Envoy's 503 or 403, the agent resets the connection: curl prints `000`
//! and exits with 56 (reset while waiting for the response) or 52 (closed before any response
//! byte). Where the seeds show `URI=spiffe://…` (the client certificate Envoy forwards to
//! httpbin), the proof here is the server-side agent's flow table: the inbound flow of that
//! request carries the client's SPIFFE ID.
//!
//! On the host the mesh leg is the userspace rustls relay; in the VM (`cargo xtask vm-test`)
//! it is kernel TLS.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use interceptor::{
    app::Agent,
    config::{Config, Service, Workload},
    intercept::table::{Direction, FlowRow, Protection},
};
use interceptor_tests::{
    agent::{RunningAgent, TempDir},
    in_vm,
    mesh::{
        self, Curl, PolicyDir, STRICT_HTTPBIN, curl, flows_after, httpbin_root, kube_proxy,
        last_flow_id, serve_http, service, stats_delta, wait_generation, workload,
    },
    require_privileged,
    scenario::{self, expected_protection},
    topology::{Node, Pod},
};

/// A test cluster on one node: a CA, a policy directory and the agent's config.
struct Cluster {
    base: scenario::Cluster,
    policy: PolicyDir,
}

impl Cluster {
    fn new() -> Self {
        Self {
            base: scenario::Cluster::new("policye2e"),
            policy: PolicyDir::new(),
        }
    }

    fn config(&self, workloads: Vec<Workload>, services: Vec<Service>) -> Config {
        let mut c = self.base.config(workloads, vec![]);
        c.services = services;
        c.policy_dir = Some(self.policy.path());
        if in_vm() {
            // The VM emulates its CPU: a mesh client's first ClientHello can take longer
            // than the default wait for a silent (server-speaks-first) plaintext client.
            // curl always speaks first, so no request here pays the wait.
            c.tuning.first_byte_wait_ms = 2_000;
        }
        c
    }

    fn start(&self, workloads: Vec<Workload>, services: Vec<Service>) -> RunningAgent {
        RunningAgent::start(self.config(workloads, services))
    }

    /// Writes policy files and waits until the agent runs them.
    fn apply(&self, agent: &Agent, files: &[(&str, &str)]) {
        let before = agent.policy_generation();
        for (name, yaml) in files {
            self.policy.write(name, yaml);
        }
        wait_generation(agent, before);
    }

    /// Applies `files`, runs the phase's curl matrix and returns how the policy counters
    /// moved meanwhile.
    fn phase(
        &self,
        agent: &Agent,
        files: &[(&str, &str)],
        phase: &str,
        rows: &[(&Client<'_>, &Target<'_>, Want)],
    ) -> std::collections::BTreeMap<String, u64> {
        let before = agent.policy_stats();
        self.apply(agent, files);
        matrix(agent, phase, rows);
        stats_delta(&before, &agent.policy_stats())
    }

    fn delete(&self, agent: &Agent, names: &[&str]) {
        let before = agent.policy_generation();
        for name in names {
            self.policy.remove(name);
        }
        wait_generation(agent, before);
    }
}

/// A client pod: enrolled (its curl goes through the agent) or legacy.
struct Client<'a> {
    label: &'a str,
    pod: &'a Pod,
    /// The SPIFFE ID of an enrolled client.
    id: Option<&'a str>,
}

impl<'a> Client<'a> {
    /// An enrolled client with SPIFFE ID `id`.
    fn mesh(label: &'a str, pod: &'a Pod, id: &'a str) -> Self {
        Self {
            label,
            pod,
            id: Some(id),
        }
    }

    fn legacy(label: &'a str, pod: &'a Pod) -> Self {
        Self {
            label,
            pod,
            id: None,
        }
    }

    fn command(&self) -> Command {
        if self.id.is_some() {
            self.pod.command("curl")
        } else {
            self.pod.command_unenrolled("curl")
        }
    }
}

/// A service as the seeds' curls address it.
struct Target<'a> {
    label: &'a str,
    url: String,
    /// More curl arguments (`--insecure` for the API server).
    extra: Vec<&'static str>,
    /// Endpoints (ip:targetPort) with an agent; mTLS is expected exactly there.
    mesh_endpoints: Vec<SocketAddr>,
}

/// What the seed shows for one curl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// 200 with `URI=spiffe://…` of the client.
    Mtls,
    /// 200 without it.
    Plain,
    /// Envoy's 503/403: here a reset, curl `000` with exit 56 or 52.
    Reset,
    /// A service with a mesh and a legacy endpoint: whichever the round robin picked, mTLS
    /// exactly when it was the mesh endpoint.
    ByEndpoint,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Got {
    Mtls,
    Plain,
    Reset,
    Other(String),
}

/// Runs one curl and classifies it from curl's result and the agent's flow table.
fn request(agent: &Agent, client: &Client<'_>, target: &Target<'_>) -> (Got, String) {
    let last = last_flow_id(agent);
    let c: Curl = curl(client.command(), &target.url, &target.extra);
    let flows = flows_after(agent, last);
    let inbound: Vec<&FlowRow> = flows
        .iter()
        .filter(|r| r.direction == Direction::Inbound)
        .collect();
    let outbound = flows.iter().find(|r| r.direction == Direction::Outbound);
    let endpoint = outbound.and_then(|r| r.endpoint);
    let note = format!(
        "curl {} exit {}{}",
        c.code,
        c.exit,
        endpoint.map_or_else(String::new, |e| format!(", endpoint {e}"))
    );
    let got = match c.code.as_str() {
        "200" => {
            let peers: Vec<Option<&str>> = inbound.iter().map(|r| r.peer_id.as_deref()).collect();
            match client.id {
                Some(id) if peers.contains(&Some(id)) => {
                    for r in inbound.iter().filter(|r| r.peer_id.is_some()) {
                        assert_eq!(r.protection, expected_protection(), "{r:?}");
                    }
                    Got::Mtls
                }
                _ if peers.iter().all(Option::is_none) => Got::Plain,
                _ => Got::Other(format!("200 but inbound peers {peers:?}")),
            }
        }
        // 35: the reset arrived during curl's own TLS handshake (https to the API server).
        "000" if matches!(c.exit, 52 | 56 | 35) => Got::Reset,
        _ => Got::Other(note.clone()),
    };
    // For a round-robin target, which endpoint decides what was right.
    let note = match (got.clone(), endpoint) {
        (Got::Mtls | Got::Plain, Some(e)) if target.mesh_endpoints.contains(&e) => {
            format!("{note} (mesh endpoint)")
        }
        _ => note,
    };
    (got, note)
}

fn satisfied(want: Want, got: &Got, note: &str) -> bool {
    match want {
        Want::Mtls => *got == Got::Mtls,
        Want::Plain => *got == Got::Plain,
        Want::Reset => *got == Got::Reset,
        Want::ByEndpoint => match got {
            Got::Mtls => note.ends_with("(mesh endpoint)"),
            Got::Plain => !note.ends_with("(mesh endpoint)"),
            _ => false,
        },
    }
}

/// Runs a curl matrix, prints it like the seed does, and fails listing every mismatch.
fn matrix(agent: &Agent, phase: &str, rows: &[(&Client<'_>, &Target<'_>, Want)]) {
    let mut report = format!("== {phase}\n");
    let mut failures = Vec::new();
    for (client, target, want) in rows {
        let (got, note) = request(agent, client, target);
        let _ = writeln!(
            report,
            "{} to {}: {:?} ({note}){}",
            client.label,
            target.label,
            got,
            client
                .id
                .filter(|_| got == Got::Mtls)
                .map_or_else(String::new, |id| format!(" URI={id}"))
        );
        if !satisfied(*want, &got, &note) {
            failures.push(format!(
                "{} to {}: want {want:?}, got {got:?} ({note})",
                client.label, target.label
            ));
        }
    }
    interceptor_tests::demo::say(&report);
    assert!(failures.is_empty(), "{phase}:\n{}", failures.join("\n"));
}

fn vip(node: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, node, host)
}

/// httpbin in `namespace` as the seeds deploy it: VIP 10.96.<node>.<host> port 8000, served
/// on port 80 of `pods`.
fn httpbin_service(namespace: &str, node: u8, host: u8, pods: &[&Pod]) -> Service {
    service("httpbin", namespace, Some(vip(node, host)), 8000, 80, pods)
}

/// `path` of an [`httpbin_service`] at `vip`, with mTLS expected on the `mesh` pods.
fn target<'a>(label: &'a str, vip: Ipv4Addr, path: &str, mesh: &[&Pod]) -> Target<'a> {
    Target {
        label,
        url: format!("http://{vip}:8000{path}"),
        extra: Vec::new(),
        mesh_endpoints: mesh.iter().map(|p| SocketAddr::from((p.ip, 80))).collect(),
    }
}

const SLEEP_FULL_ID: &str = "spiffe://cluster.local/ns/full/sa/sleep";

// === seed 004: automatic mutual TLS ===

const MESH_PERMISSIVE: &str = "apiVersion: authentication.istio.io/v1alpha1
kind: MeshPolicy
metadata:
  name: default
spec:
  peers:
  - mtls:
      mode: PERMISSIVE
";

const STRICT_HTTPBIN_FULL: &str = "apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata:
  name: httpbin
  namespace: full
spec:
  targets:
  - name: httpbin
  peers:
  - mtls: {}
";

const PLAINTEXT_HTTPBIN_FULL: &str = "apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata:
  name: httpbin
  namespace: full
spec:
  targets:
  - name: httpbin
";

const ISTIO_MUTUAL_HTTPBIN_FULL: &str = "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: httpbin-full-mtls
  namespace: full
spec:
  host: httpbin.full.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";

#[test]
fn policy_seed_004_automatic_mtls_all_phases() {
    require_privileged();
    const N: u8 = 70;
    let node = Node::new(N);
    let mut httpbin_full = node.pod("httpbin-full", 10);
    let sleep_full = node.pod("sleep-full", 11);
    let mut httpbin_partial = node.pod("httpbin-partial", 20);
    let mut httpbin_nosidecar = node.pod("httpbin-nosidecar", 21);
    let mut httpbin_legacy = node.pod("httpbin-legacy", 30);
    let sleep_legacy = node.pod("sleep-legacy", 31);
    let www = httpbin_root();
    for pod in [
        &mut httpbin_full,
        &mut httpbin_partial,
        &mut httpbin_nosidecar,
        &mut httpbin_legacy,
    ] {
        serve_http(pod, &www.0, 80);
    }
    let services = vec![
        httpbin_service("full", N, 10, &[&httpbin_full]),
        httpbin_service("partial", N, 20, &[&httpbin_partial, &httpbin_nosidecar]),
        httpbin_service("legacy", N, 30, &[&httpbin_legacy]),
    ];
    kube_proxy(
        &[
            &httpbin_full,
            &sleep_full,
            &httpbin_partial,
            &httpbin_nosidecar,
            &httpbin_legacy,
            &sleep_legacy,
        ],
        &services,
    );
    let cluster = Cluster::new();
    cluster.policy.write("00-mesh.yaml", MESH_PERMISSIVE);
    let agent = cluster.start(
        vec![
            workload(&httpbin_full, "full", "httpbin", &[("app", "httpbin")]),
            workload(&sleep_full, "full", "sleep", &[("app", "sleep")]),
            workload(
                &httpbin_partial,
                "partial",
                "httpbin",
                &[("app", "httpbin"), ("version", "v1")],
            ),
        ],
        services,
    );
    let agent = &agent.agent;

    let from_full = Client::mesh("sleep.full", &sleep_full, SLEEP_FULL_ID);
    let from_legacy = Client::legacy("sleep.legacy", &sleep_legacy);
    let to_full = target("httpbin.full", vip(N, 10), "/headers", &[&httpbin_full]);
    let to_partial = target(
        "httpbin.partial",
        vip(N, 20),
        "/headers",
        &[&httpbin_partial],
    );
    let to_legacy = target("httpbin.legacy", vip(N, 30), "/headers", &[]);
    // The seed's matrix: what each of these six requests must get, in this order.
    let all = |wants: [Want; 6]| {
        let [a, b, c, d, e, f] = wants;
        [
            (&from_full, &to_full, a),
            (&from_full, &to_partial, b),
            (&from_full, &to_legacy, c),
            (&from_legacy, &to_full, d),
            (&from_legacy, &to_partial, e),
            (&from_legacy, &to_legacy, f),
        ]
    };
    use Want::{ByEndpoint, Mtls, Plain, Reset};

    // Setup check: "All requests should succeed with HTTP 200".
    matrix(
        agent,
        "PERMISSIVE (seed: start from permissive mode)",
        &all([Mtls, ByEndpoint, Plain, Plain, Plain, Plain]),
    );

    // Sidecar migration: ten requests to httpbin.partial alternate between its endpoints.
    let mut mtls = 0;
    let mut plain = 0;
    for _ in 0..10 {
        let (got, note) = request(agent, &from_full, &to_partial);
        assert!(satisfied(Want::ByEndpoint, &got, &note), "{got:?} {note}");
        match got {
            Got::Mtls => mtls += 1,
            _ => plain += 1,
        }
    }
    assert_eq!((mtls, plain), (5, 5), "round robin over the two endpoints");

    // Lock down to STRICT: sleep.legacy → httpbin.full fails (000, exit 56).
    let delta = cluster.phase(
        agent,
        &[("10-httpbin-full.yaml", STRICT_HTTPBIN_FULL)],
        "STRICT on httpbin.full",
        &all([Mtls, ByEndpoint, Plain, Reset, Plain, Plain]),
    );
    assert_eq!(
        delta.get("refused.plaintext_refused_strict"),
        Some(&1),
        "{delta:?}"
    );

    // A broken edit at runtime: the last good policy (STRICT) stays, the failure is counted.
    let generation = agent.policy_generation();
    cluster
        .policy
        .write("10-httpbin-full.yaml", "apiVersion: [broken\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.policy_stats()["policy.reload_failures"] == 0 {
        assert!(Instant::now() < deadline, "the broken file was not noticed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(agent.policy_generation(), generation);
    matrix(
        agent,
        "broken file: STRICT stays",
        &[
            (&from_full, &to_full, Want::Mtls),
            (&from_legacy, &to_full, Want::Reset),
        ],
    );

    // DISABLE: automatic mTLS sends plaintext to httpbin.full.
    cluster.phase(
        agent,
        &[("10-httpbin-full.yaml", PLAINTEXT_HTTPBIN_FULL)],
        "DISABLE on httpbin.full",
        &all([Plain, ByEndpoint, Plain, Plain, Plain, Plain]),
    );

    // A DestinationRule forcing ISTIO_MUTUAL onto the DISABLE server: sleep.full fails.
    let delta = cluster.phase(
        agent,
        &[("20-dr.yaml", ISTIO_MUTUAL_HTTPBIN_FULL)],
        "DestinationRule ISTIO_MUTUAL override",
        &all([Reset, ByEndpoint, Plain, Plain, Plain, Plain]),
    );
    assert_eq!(
        delta.get("refused.mtls_refused_disable"),
        Some(&1),
        "{delta:?}"
    );
    assert_eq!(delta.get("refused.handshake_failed"), Some(&1), "{delta:?}");

    // Cleanup restores the setup.
    cluster.delete(agent, &["10-httpbin-full.yaml", "20-dr.yaml"]);
    matrix(
        agent,
        "policies deleted",
        &[
            (&from_full, &to_full, Want::Mtls),
            (&from_legacy, &to_full, Want::Plain),
        ],
    );

    // The counters as operators read them: `interceptor flows --stats`.
    let out = Command::new(interceptor_tests::demo::agent_binary())
        .args(["flows", "--stats", "--admin-socket"])
        .arg(cluster.base.scratch.0.join("admin.sock"))
        .output()
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    for key in [
        "refused.plaintext_refused_strict",
        "refused.mtls_refused_disable",
        "refused.handshake_failed",
    ] {
        assert!(stats[key].as_u64() >= Some(1), "{key}: {stats:#}");
    }
    assert_eq!(
        stats["policy.reload_failures"].as_u64(),
        Some(1),
        "{stats:#}"
    );
}

// === changes apply to open flows ===

const DENY_SLEEP_FULL: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep-full
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

/// Reads from a plain connection until it ends; returns when.
fn wait_plain_closed(conn: &mut std::net::TcpStream, timeout: Duration) -> Option<Instant> {
    use std::io::Read as _;
    conn.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return None;
            }
            Err(_) => return Some(Instant::now()),
        }
    }
}

fn plain_echo(conn: &mut std::net::TcpStream, line: &str) -> bool {
    use std::io::{Read as _, Write as _};
    conn.set_read_timeout(Some(ECHO)).unwrap();
    if conn.write_all(line.as_bytes()).is_err() {
        return false;
    }
    let mut buf = vec![0u8; line.len()];
    conn.read_exact(&mut buf).is_ok() && buf == line.as_bytes()
}

#[test]
fn policy_changes_apply_to_open_flows_within_a_second() {
    require_privileged();
    const N: u8 = 71;
    let node = Node::new(N);
    let server = node.pod("httpbin-full", 10);
    let client = node.pod("sleep-full", 11);
    let other = node.pod("other-full", 12);
    let legacy = node.pod("sleep-legacy", 31);
    mesh::echo_server(&server, 9000);
    let cluster = Cluster::new();
    let agent = cluster.start(
        vec![
            workload(&server, "full", "httpbin", &[("app", "httpbin")]),
            workload(&client, "full", "sleep", &[("app", "sleep")]),
            workload(&other, "full", "other", &[("app", "other")]),
        ],
        vec![],
    );
    let agent = &agent.agent;
    let dst = SocketAddr::from((server.ip, 9000));

    // Three open flows: plaintext from a legacy pod, mTLS from sleep and from other.
    let mut plain = legacy.ns.run(move || std::net::TcpStream::connect(dst));
    assert!(plain_echo(&mut plain, "plain-1\n"));
    let mut sleep = mesh::NcSession::open(client.command(mesh::busybox()), dst);
    assert_eq!(sleep.echo("sleep-1", ECHO).as_deref(), Some("sleep-1"));
    let mut other_flow = mesh::NcSession::open(other.command(mesh::busybox()), dst);
    assert_eq!(other_flow.echo("other-1", ECHO).as_deref(), Some("other-1"));
    let open = agent
        .flows()
        .into_iter()
        .filter(|r| r.direction == Direction::Inbound)
        .count();
    assert_eq!(open, 3, "{:#?}", agent.flows());

    // STRICT: the plaintext flow is reset within a second; the mTLS flows are untouched.
    let before = agent.policy_stats();
    let t0 = Instant::now();
    cluster.policy.write("strict.yaml", STRICT_HTTPBIN);
    let closed = wait_plain_closed(&mut plain, Duration::from_secs(3))
        .expect("the plaintext flow was not closed");
    assert!(closed - t0 < SECOND, "closed after {:?}", closed - t0);
    assert_eq!(sleep.echo("sleep-2", ECHO).as_deref(), Some("sleep-2"));
    assert_eq!(other_flow.echo("other-2", ECHO).as_deref(), Some("other-2"));
    let delta = stats_delta(&before, &agent.policy_stats());
    assert_eq!(
        delta.get("closed.plaintext_refused_strict"),
        Some(&1),
        "{delta:?}"
    );

    // DENY sleep's principal: its flow is reset within a second; other's stays.
    let t0 = Instant::now();
    cluster.policy.write("deny.yaml", DENY_SLEEP_FULL);
    let closed = sleep
        .wait_closed(Duration::from_secs(3))
        .expect("the denied mTLS flow was not closed");
    assert!(closed - t0 < SECOND, "closed after {:?}", closed - t0);
    assert_eq!(other_flow.echo("other-3", ECHO).as_deref(), Some("other-3"));
    let delta = stats_delta(&before, &agent.policy_stats());
    assert_eq!(delta.get("closed.deny_rule"), Some(&1), "{delta:?}");

    // New connections follow the new policy too.
    let mut again = mesh::NcSession::open(client.command(mesh::busybox()), dst);
    assert_eq!(again.echo("sleep-3", ECHO), None);
    let refused = legacy
        .ns
        .run(move || Ok(std::net::TcpStream::connect(dst)))
        .map(|mut c| plain_echo(&mut c, "plain-2\n"));
    assert!(!refused.unwrap_or(false), "plaintext must be refused");
}

const DR_DB_SIMPLE_HTTPBIN_DISABLE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: db
  namespace: full
spec:
  host: db.data.svc.cluster.local
  trafficPolicy:
    tls:
      mode: SIMPLE
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
  namespace: full
spec:
  host: httpbin.full.svc.cluster.local
  trafficPolicy:
    tls:
      mode: DISABLE
";

const DR_CACHE_ISTIO_MUTUAL: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: cache
  namespace: full
spec:
  host: cache.data.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";

/// Outbound flows are decided again on the endpoint they are connected to: a plaintext flow
/// that the new policy wants protected (TLS origination, then mesh mTLS) is reset within a
/// second; a mesh flow to a service now set to DISABLE is stronger than needed and stays, as
/// does a plaintext flow no rule touches.
#[test]
fn policy_changes_close_open_outbound_flows_that_need_more_protection() {
    require_privileged();
    const N: u8 = 74;
    let node = Node::new(N);
    let httpbin = node.pod("httpbin-full", 10);
    let client = node.pod("sleep-full", 11);
    let db = node.pod("db", 50);
    let cache = node.pod("cache", 51);
    for pod in [&httpbin, &db, &cache] {
        mesh::echo_server(pod, 9000);
    }
    let services = vec![
        service("db", "data", Some(vip(N, 1)), 9000, 9000, &[&db]),
        service("cache", "data", Some(vip(N, 2)), 9000, 9000, &[&cache]),
        service("httpbin", "full", Some(vip(N, 3)), 9000, 9000, &[&httpbin]),
    ];
    let cluster = Cluster::new();
    let agent = cluster.start(
        vec![
            workload(&httpbin, "full", "httpbin", &[("app", "httpbin")]),
            workload(&client, "full", "sleep", &[("app", "sleep")]),
        ],
        services,
    );
    let agent = &agent.agent;
    let open = |host: u8| {
        let dst = SocketAddr::from((vip(N, host), 9000));
        mesh::NcSession::open(client.command(mesh::busybox()), dst)
    };

    // Through the VIPs: plaintext to the two legacy services, mTLS to httpbin.
    let mut to_db = open(1);
    assert_eq!(to_db.echo("db-1", ECHO).as_deref(), Some("db-1"));
    let mut to_cache = open(2);
    assert_eq!(to_cache.echo("cache-1", ECHO).as_deref(), Some("cache-1"));
    let mut to_httpbin = open(3);
    assert_eq!(
        to_httpbin.echo("httpbin-1", ECHO).as_deref(),
        Some("httpbin-1")
    );
    let outbound = |agent: &Agent| -> Vec<FlowRow> {
        agent
            .flows()
            .into_iter()
            .filter(|r| r.direction == Direction::Outbound)
            .collect()
    };
    let protection = |rows: &[FlowRow], server: &Pod| {
        rows.iter()
            .find(|r| r.endpoint == Some(SocketAddr::from((server.ip, 9000))))
            .map(|r| r.protection)
    };
    let rows = outbound(agent);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert_eq!(protection(&rows, &db), Some(Protection::Plaintext));
    assert_eq!(protection(&rows, &cache), Some(Protection::Plaintext));
    assert_eq!(protection(&rows, &httpbin), Some(expected_protection()));

    // db now wants TLS origination: its plaintext flow is reset. httpbin may now be
    // plaintext: the mTLS flow is stronger than that and stays.
    let before = agent.policy_stats();
    let t0 = Instant::now();
    cluster
        .policy
        .write("dr.yaml", DR_DB_SIMPLE_HTTPBIN_DISABLE);
    let closed = to_db
        .wait_closed(Duration::from_secs(3))
        .expect("the plaintext flow to db was not closed");
    assert!(closed - t0 < SECOND, "closed after {:?}", closed - t0);
    assert_eq!(to_cache.echo("cache-2", ECHO).as_deref(), Some("cache-2"));
    assert_eq!(
        to_httpbin.echo("httpbin-2", ECHO).as_deref(),
        Some("httpbin-2")
    );
    let delta = stats_delta(&before, &agent.policy_stats());
    let closed_counts: Vec<_> = delta
        .iter()
        .filter(|(k, _)| k.starts_with("closed."))
        .collect();
    assert_eq!(
        closed_counts,
        [(&"closed.transport_changed".to_owned(), &1)],
        "{delta:?}"
    );
    let rows = outbound(agent);
    assert_eq!(protection(&rows, &db), None, "{rows:#?}");
    assert_eq!(protection(&rows, &httpbin), Some(expected_protection()));

    // cache now wants mesh mTLS (ISTIO_MUTUAL): its plaintext flow is reset too.
    let t0 = Instant::now();
    cluster.policy.write("cache.yaml", DR_CACHE_ISTIO_MUTUAL);
    let closed = to_cache
        .wait_closed(Duration::from_secs(3))
        .expect("the plaintext flow to cache was not closed");
    assert!(closed - t0 < SECOND, "closed after {:?}", closed - t0);
    assert_eq!(
        to_httpbin.echo("httpbin-3", ECHO).as_deref(),
        Some("httpbin-3")
    );
    let delta = stats_delta(&before, &agent.policy_stats());
    assert_eq!(delta.get("closed.transport_changed"), Some(&2), "{delta:?}");
    assert_eq!(outbound(agent).len(), 1, "{:#?}", agent.flows());
}

const SECOND: Duration = Duration::from_secs(1);
/// How long a round trip may take on a live flow (the VM emulates its CPU).
const ECHO: Duration = Duration::from_secs(10);

// === TLS servers outside the mesh ===

/// A private CA with a server certificate for `server_names` and a client certificate, as the
/// seed's `openssl` commands make for MongoDB; PEM files for the DestinationRule.
struct Pki {
    dir: TempDir,
    server_chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    server_key: rustls::pki_types::PrivateKeyDer<'static>,
    ca: rustls::pki_types::CertificateDer<'static>,
    /// The client certificate the agent presents (to recognise it on the server).
    client: rustls::pki_types::CertificateDer<'static>,
}

impl Pki {
    fn new(server_names: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = TempDir::new("pki");
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "root");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let names: Vec<String> = server_names.iter().map(|n| (*n).to_owned()).collect();
        let server = CertificateParams::new(names)
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "client");
        let client = client_params.signed_by(&client_key, &issuer).unwrap();
        std::fs::write(dir.0.join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.0.join("client.pem"), client.pem()).unwrap();
        std::fs::write(dir.0.join("client.key"), client_key.serialize_pem()).unwrap();
        Self {
            dir,
            server_chain: vec![server.der().clone()],
            server_key: rustls::pki_types::PrivatePkcs8KeyDer::from(server_key.serialize_der())
                .into(),
            ca: ca_cert.der().clone(),
            client: client.der().clone(),
        }
    }

    fn file(&self, name: &str) -> String {
        self.dir.0.join(name).display().to_string()
    }

    /// A server config; with `require_client` it refuses clients without a certificate from
    /// this CA (MongoDB's `requireTLS` with `--sslCAFile`).
    fn server(&self, require_client: bool) -> std::sync::Arc<rustls::ServerConfig> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(std::sync::Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())
            .unwrap();
        std::sync::Arc::new(config)
    }
}

/// An HTTPS server (keep-alive, rustls defaults: TLS 1.3 session tickets after the handshake)
/// on `port` of the pod, answering every request with `client=<name>` naming the client
/// certificate it saw (`none` without one).
fn https_server(
    pod: &Pod,
    port: u16,
    config: std::sync::Arc<rustls::ServerConfig>,
    client: Option<rustls::pki_types::CertificateDer<'static>>,
) {
    let addr = SocketAddr::from((pod.ip, port));
    let listener = pod.ns.run(move || std::net::TcpListener::bind(addr));
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { continue };
            let config = std::sync::Arc::clone(&config);
            let client = client.clone();
            std::thread::spawn(move || {
                let _ = serve_tls(sock, config, client.as_ref());
            });
        }
    });
}

fn serve_tls(
    sock: std::net::TcpStream,
    config: std::sync::Arc<rustls::ServerConfig>,
    client: Option<&rustls::pki_types::CertificateDer<'static>>,
) -> std::io::Result<()> {
    use std::io::{Read as _, Write as _};
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            let presented = tls
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| if Some(c) == client { "client" } else { "other" })
                .unwrap_or("none");
            let body = format!("client={presented}\n");
            write!(
                tls,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            tls.flush()?;
        }
        let n = tls.read(&mut buf)?;
        if n == 0 {
            tls.conn.send_close_notify();
            let _ = tls.flush();
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

// === seed 001: mesh, namespace and service scoped policies, DISABLE for legacy and the API
// server ===

const MESH_STRICT: &str = "apiVersion: authentication.istio.io/v1alpha1
kind: MeshPolicy
metadata:
  name: default
spec:
  peers:
  - mtls: {}
";

const DR_ALL_LOCAL: &str = "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: default
  namespace: istio-system
spec:
  host: \"*.local\"
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";

const DR_LEGACY_DISABLE: &str = "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
 name: \"httpbin-legacy\"
 namespace: \"legacy\"
spec:
 host: \"httpbin.legacy.svc.cluster.local\"
 trafficPolicy:
   tls:
     mode: DISABLE
";

const DR_API_SERVER: &str = "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
 name: \"api-server\"
 namespace: istio-system
spec:
 host: \"kubernetes.default.svc.cluster.local\"
 trafficPolicy:
   tls:
     mode: DISABLE
";

const FOO_NAMESPACE_STRICT: &str = "apiVersion: \"authentication.istio.io/v1alpha1\"
kind: \"Policy\"
metadata:
  name: \"default\"
  namespace: \"foo\"
spec:
  peers:
  - mtls: {}
---
apiVersion: \"networking.istio.io/v1alpha3\"
kind: \"DestinationRule\"
metadata:
  name: \"default\"
  namespace: \"foo\"
spec:
  host: \"*.foo.svc.cluster.local\"
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";

const BAR_HTTPBIN_STRICT: &str = "apiVersion: \"authentication.istio.io/v1alpha1\"
kind: \"Policy\"
metadata:
  name: \"httpbin\"
  namespace: bar
spec:
  targets:
  - name: httpbin
  peers:
  - mtls: {}
---
apiVersion: \"networking.istio.io/v1alpha3\"
kind: \"DestinationRule\"
metadata:
  name: \"httpbin\"
  namespace: bar
spec:
  host: \"httpbin.bar.svc.cluster.local\"
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
";

#[test]
fn policy_seed_001_mesh_namespace_and_service_policies() {
    require_privileged();
    const N: u8 = 72;
    let node = Node::new(N);
    let mut httpbin_foo = node.pod("httpbin-foo", 10);
    let sleep_foo = node.pod("sleep-foo", 11);
    let mut httpbin_bar = node.pod("httpbin-bar", 20);
    let sleep_bar = node.pod("sleep-bar", 21);
    let mut httpbin_legacy = node.pod("httpbin-legacy", 30);
    let sleep_legacy = node.pod("sleep-legacy", 31);
    let apiserver = node.pod("apiserver", 40);
    let www = httpbin_root();
    for pod in [&mut httpbin_foo, &mut httpbin_bar, &mut httpbin_legacy] {
        serve_http(pod, &www.0, 80);
    }
    let pki = Pki::new(&["kubernetes.default.svc.cluster.local"]);
    https_server(&apiserver, 6443, pki.server(false), None);
    let services = vec![
        httpbin_service("foo", N, 10, &[&httpbin_foo]),
        httpbin_service("bar", N, 20, &[&httpbin_bar]),
        httpbin_service("legacy", N, 30, &[&httpbin_legacy]),
        service(
            "kubernetes",
            "default",
            Some(vip(N, 1)),
            443,
            6443,
            &[&apiserver],
        ),
    ];
    kube_proxy(
        &[
            &httpbin_foo,
            &sleep_foo,
            &httpbin_bar,
            &sleep_bar,
            &httpbin_legacy,
            &sleep_legacy,
            &apiserver,
        ],
        &services,
    );
    let cluster = Cluster::new();
    cluster.policy.write("00-mesh.yaml", MESH_STRICT);
    let agent = cluster.start(
        vec![
            workload(&httpbin_foo, "foo", "httpbin", &[("app", "httpbin")]),
            workload(&sleep_foo, "foo", "sleep", &[("app", "sleep")]),
            workload(&httpbin_bar, "bar", "httpbin", &[("app", "httpbin")]),
            workload(&sleep_bar, "bar", "sleep", &[("app", "sleep")]),
        ],
        services,
    );
    let agent = &agent.agent;

    let foo = Client::mesh(
        "sleep.foo",
        &sleep_foo,
        "spiffe://cluster.local/ns/foo/sa/sleep",
    );
    let bar = Client::mesh(
        "sleep.bar",
        &sleep_bar,
        "spiffe://cluster.local/ns/bar/sa/sleep",
    );
    let legacy = Client::legacy("sleep.legacy", &sleep_legacy);
    let to_foo = target("httpbin.foo", vip(N, 10), "/ip", &[&httpbin_foo]);
    let to_bar = target("httpbin.bar", vip(N, 20), "/ip", &[&httpbin_bar]);
    let to_legacy = target("httpbin.legacy", vip(N, 30), "/ip", &[]);
    let to_kubernetes = Target {
        label: "kubernetes.default",
        url: format!("https://{}:443/api", vip(N, 1)),
        extra: vec!["--insecure"],
        mesh_endpoints: Vec::new(),
    };

    // The seed predates automatic mTLS (its clients sent plaintext and got 503 until the
    // `*.local` rule): with the agent, mesh clients reach mesh servers over mTLS at once.
    matrix(
        agent,
        "MeshPolicy STRICT",
        &[
            (&foo, &to_foo, Want::Mtls),
            (&foo, &to_bar, Want::Mtls),
            (&bar, &to_foo, Want::Mtls),
            (&bar, &to_bar, Want::Mtls),
            (&legacy, &to_foo, Want::Reset),
        ],
    );

    cluster.apply(agent, &[("10-dr-all.yaml", DR_ALL_LOCAL)]);
    matrix(
        agent,
        "MeshPolicy STRICT + *.local ISTIO_MUTUAL",
        &[
            (&foo, &to_foo, Want::Mtls),
            (&foo, &to_bar, Want::Mtls),
            (&bar, &to_foo, Want::Mtls),
            (&bar, &to_bar, Want::Mtls),
            // Non-mesh to mesh: 000, exit 56.
            (&legacy, &to_foo, Want::Reset),
            (&legacy, &to_bar, Want::Reset),
            // Mesh to non-mesh under ISTIO_MUTUAL: Envoy's 503.
            (&foo, &to_legacy, Want::Reset),
            (&bar, &to_legacy, Want::Reset),
            (&foo, &to_kubernetes, Want::Reset),
        ],
    );

    cluster.apply(
        agent,
        &[
            ("20-dr-legacy.yaml", DR_LEGACY_DISABLE),
            ("20-dr-api-server.yaml", DR_API_SERVER),
        ],
    );
    matrix(
        agent,
        "+ DestinationRules DISABLE for httpbin.legacy and the API server",
        &[
            (&foo, &to_legacy, Want::Plain),
            (&bar, &to_legacy, Want::Plain),
            // curl speaks TLS to the API server itself; the agent passes it through.
            (&foo, &to_kubernetes, Want::Plain),
            (&foo, &to_bar, Want::Mtls),
        ],
    );

    // Namespace-scoped policy: back to the demo's PERMISSIVE mesh policy, foo STRICT.
    cluster.delete(
        agent,
        &[
            "10-dr-all.yaml",
            "20-dr-legacy.yaml",
            "20-dr-api-server.yaml",
        ],
    );
    cluster.apply(
        agent,
        &[
            ("00-mesh.yaml", MESH_PERMISSIVE),
            ("30-foo.yaml", FOO_NAMESPACE_STRICT),
        ],
    );
    let all = |legacy_to_bar: Want| {
        [
            (&foo, &to_foo, Want::Mtls),
            (&foo, &to_bar, Want::Mtls),
            (&foo, &to_legacy, Want::Plain),
            (&bar, &to_foo, Want::Mtls),
            (&bar, &to_bar, Want::Mtls),
            (&bar, &to_legacy, Want::Plain),
            (&legacy, &to_foo, Want::Reset),
            (&legacy, &to_bar, legacy_to_bar),
            (&legacy, &to_legacy, Want::Plain),
        ]
    };
    matrix(agent, "Policy default in foo", &all(Want::Plain));

    // Service-scoped policy: httpbin in bar STRICT too.
    cluster.apply(agent, &[("40-bar-httpbin.yaml", BAR_HTTPBIN_STRICT)]);
    matrix(agent, "+ Policy httpbin in bar", &all(Want::Reset));
}

// === seed 003: STRICT by selector, DENY by principal, MUTUAL to a database, probes ===

/// The seed applied the DestinationRule without a namespace; files get `default` (with a
/// warning), as kubectl would.
const STRICT_HTTPBIN_MTLS_TEST: &str = "apiVersion: \"networking.istio.io/v1alpha3\"
kind: \"DestinationRule\"
metadata:
  name: \"httpbin-mtls-test-mtls\"
spec:
  host: httpbin.mtls-test.svc.cluster.local
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
---
apiVersion: \"security.istio.io/v1beta1\"
kind: \"PeerAuthentication\"
metadata:
  name: \"httpbin\"
  namespace: \"mtls-test\"
spec:
  selector:
    matchLabels:
      app: httpbin
  mtls:
    mode: STRICT
";

const DENY_SLEEP_FULL_GET: &str = "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: httpbin.mtls-test.svc.cluster.local
  namespace: mtls-test
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/full/sa/sleep
    to:
    - operation:
        methods:
        - GET
  selector:
    matchLabels:
      app: httpbin
";

const STRICT_PROBE: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: httpbin-probe
  namespace: mtls-test
spec:
  selector:
    matchLabels:
      app: httpbin-probe
  mtls:
    mode: STRICT
";

fn db_mtls(pki: &Pki) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  namespace: mtls-test
  name: db-mtls
spec:
  host: mongo.mongo.svc.cluster.local
  trafficPolicy:
    tls:
      mode: MUTUAL
      clientCertificate: {}
      privateKey: {}
      caCertificates: {}
",
        pki.file("client.pem"),
        pki.file("client.key"),
        pki.file("ca.pem")
    )
}

fn web_simple(pki: &Pki, sans: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  namespace: mtls-test
  name: web-tls
spec:
  host: web.mongo.svc.cluster.local
  trafficPolicy:
    tls:
      mode: SIMPLE
      sni: web.example.internal
      caCertificates: {}
      subjectAltNames: {sans}
",
        pki.file("ca.pem")
    )
}

#[test]
fn policy_seed_003_strict_deny_database_mutual_tls_and_probes() {
    require_privileged();
    const N: u8 = 73;
    let node = Node::new(N);
    let mut httpbin = node.pod("httpbin", 10);
    let sleep_test = node.pod("sleep", 11);
    let mongo_client = node.pod("mongo-client", 12);
    let mut probe_pod = node.pod("httpbin-probe", 13);
    let sleep_legacy = node.pod("sleep-legacy", 31);
    let sleep_full = node.pod("sleep-full", 41);
    let mongo = node.pod("mongo", 50);
    let www = httpbin_root();
    serve_http(&mut httpbin, &www.0, 80);
    serve_http(&mut probe_pod, &www.0, 80);
    let pki = Pki::new(&["mongo.mongo.svc.cluster.local", "web.example.internal"]);
    // MongoDB with `--tlsMode requireTLS --sslCAFile`: client certificates required.
    https_server(&mongo, 27017, pki.server(true), Some(pki.client.clone()));
    // A one-way TLS server for SIMPLE.
    https_server(&mongo, 8443, pki.server(false), None);
    let services = vec![
        httpbin_service("mtls-test", N, 10, &[&httpbin]),
        // Headless, as in the seed: clients dial the pod address.
        service("mongo", "mongo", None, 27017, 27017, &[&mongo]),
        service("web", "mongo", None, 8443, 8443, &[&mongo]),
    ];
    kube_proxy(
        &[
            &httpbin,
            &sleep_test,
            &mongo_client,
            &probe_pod,
            &sleep_legacy,
            &sleep_full,
            &mongo,
        ],
        &services,
    );
    let cluster = Cluster::new();
    let mut cfg = cluster.config(
        vec![
            workload(
                &httpbin,
                "mtls-test",
                "httpbin",
                &[("app", "httpbin"), ("version", "v1")],
            ),
            workload(&sleep_test, "mtls-test", "sleep", &[("app", "sleep")]),
            workload(
                &mongo_client,
                "mtls-test",
                "mongo-client",
                &[("app", "mongo-client")],
            ),
            workload(
                &probe_pod,
                "mtls-test",
                "httpbin-probe",
                &[("app", "httpbin-probe")],
            ),
            workload(&sleep_full, "full", "sleep", &[("app", "sleep")]),
        ],
        services,
    );
    // kubelet probes come from the node: here the bridge address.
    cfg.probe_sources = vec![IpAddr::V4(Ipv4Addr::new(10, 88, N, 1))];
    // The DestinationRules' certificate files are read from here only.
    cfg.policy.cert_dirs = vec![pki.dir.0.clone()];
    let agent = RunningAgent::start(cfg);
    let agent = &agent.agent;

    let test = Client::mesh(
        "sleep.mtls-test",
        &sleep_test,
        "spiffe://cluster.local/ns/mtls-test/sa/sleep",
    );
    let legacy = Client::legacy("sleep.legacy", &sleep_legacy);
    let full = Client::mesh("sleep.full", &sleep_full, SLEEP_FULL_ID);
    let to_httpbin = target("httpbin.mtls-test", vip(N, 10), "/headers", &[&httpbin]);

    matrix(
        agent,
        "default PERMISSIVE",
        &[
            (&test, &to_httpbin, Want::Mtls),
            (&legacy, &to_httpbin, Want::Plain),
            (&full, &to_httpbin, Want::Mtls),
        ],
    );

    cluster.phase(
        agent,
        &[("10-strict.yaml", STRICT_HTTPBIN_MTLS_TEST)],
        "STRICT by selector (+ ISTIO_MUTUAL)",
        &[
            (&test, &to_httpbin, Want::Mtls),
            (&legacy, &to_httpbin, Want::Reset),
            (&full, &to_httpbin, Want::Mtls),
        ],
    );

    // Envoy answers 403 to GET; the agent cannot see methods, so the DENY rule applies to
    // every connection from sleep.full (the seed's matrix has only GETs).
    let delta = cluster.phase(
        agent,
        &[("20-deny.yaml", DENY_SLEEP_FULL_GET)],
        "DENY cluster.local/ns/full/sa/sleep",
        &[
            (&test, &to_httpbin, Want::Mtls),
            (&legacy, &to_httpbin, Want::Reset),
            (&full, &to_httpbin, Want::Reset),
        ],
    );
    assert_eq!(delta.get("refused.deny_rule"), Some(&1), "{delta:?}");
    assert_eq!(
        delta.get("refused.plaintext_refused_strict"),
        Some(&1),
        "{delta:?}"
    );

    // MUTUAL: the app speaks plaintext; the agent presents the client certificate from the
    // rule's files to a server that requires one. Two requests on one connection, after the
    // server's session tickets: both answered.
    cluster.apply(agent, &[("30-db.yaml", &db_mtls(&pki))]);
    let db = format!("http://{}:27017/", mongo.ip);
    let last = last_flow_id(agent);
    let c = curl(mongo_client.command("curl"), &db, &[&db]);
    assert_eq!(c.code, "200", "{c:?}");
    let body = String::from_utf8_lossy(&c.body);
    assert_eq!(body.matches("client=client").count(), 2, "{body}");
    let flows = flows_after(agent, last);
    let out: Vec<&FlowRow> = flows
        .iter()
        .filter(|r| r.direction == Direction::Outbound)
        .collect();
    assert_eq!(out.len(), 1, "one connection for both requests: {flows:#?}");
    assert_eq!(out[0].protection, Protection::Tls, "{:?}", out[0]);
    assert_eq!(out[0].endpoint, Some(SocketAddr::from((mongo.ip, 27017))));
    // A client in another namespace does not see mtls-test's rule: plaintext, which the
    // database refuses, as the seed's `mongo --host mongo` without TLS.
    let c = curl(sleep_full.command("curl"), &db, &[]);
    assert_ne!(c.code, "200", "{c:?}");
    // Nor does a legacy client get through without its own certificate.
    let c = curl(sleep_legacy.command_unenrolled("curl"), &db, &[]);
    assert_ne!(c.code, "200", "{c:?}");

    // SIMPLE: one-way TLS, the server verified against the rule's CA and the SNI name, or
    // against subjectAltNames when the rule lists them.
    let web = format!("http://{}:8443/", mongo.ip);
    for (sans, ok) in [
        ("[]", true),
        ("[web.example.internal]", true),
        ("[spiffe://cluster.local/ns/mongo/sa/web]", false),
        ("[other.example.internal]", false),
    ] {
        let before = agent.policy_stats();
        cluster.apply(agent, &[("40-web.yaml", &web_simple(&pki, sans))]);
        let c = curl(mongo_client.command("curl"), &web, &[]);
        let delta = stats_delta(&before, &agent.policy_stats());
        if ok {
            assert_eq!(
                (c.code.as_str(), String::from_utf8_lossy(&c.body).trim()),
                ("200", "client=none"),
                "subjectAltNames {sans}: {c:?}"
            );
        } else {
            assert_eq!(
                (c.code.as_str(), c.exit == 56 || c.exit == 52),
                ("000", true),
                "subjectAltNames {sans}: {c:?}"
            );
            assert_eq!(
                delta.get("refused.origination_failed"),
                Some(&1),
                "{delta:?}"
            );
        }
    }

    // Probes: STRICT on httpbin-probe, yet kubelet's plaintext probe from the node passes.
    cluster.apply(agent, &[("50-probe.yaml", STRICT_PROBE)]);
    let probe_url = format!("http://{}:80/headers", probe_pod.ip);
    let last = last_flow_id(agent);
    let mut kubelet = Command::new("ip");
    kubelet.args(["netns", "exec", &node.ns.name, "curl"]);
    let c = curl(kubelet, &probe_url, &[]);
    assert_eq!(c.code, "200", "probe from the node: {c:?}");
    let flows = flows_after(agent, last);
    let probe = flows
        .iter()
        .find(|r| r.direction == Direction::Inbound && r.pod == "httpbin-probe")
        .expect("inbound probe flow");
    assert_eq!(
        (
            probe.peer_id.as_deref(),
            probe.reason.as_deref(),
            probe.source.ip()
        ),
        (None, Some("probe"), IpAddr::V4(Ipv4Addr::new(10, 88, N, 1)))
    );
    let c = curl(sleep_legacy.command_unenrolled("curl"), &probe_url, &[]);
    assert_eq!(
        (c.code.as_str(), c.exit),
        ("000", 56),
        "plaintext from a pod: {c:?}"
    );
}

// === `interceptor policy check` and a bad policy at start ===

const MALFORMED: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: fine
  namespace: foo
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: typo
  namespace: foo
spec:
  mtls:
    mode: STRIKT
";

#[test]
fn policy_check_names_file_document_and_field() {
    let dir = PolicyDir::new();
    dir.write("00-mesh.yaml", MESH_PERMISSIVE);
    dir.write(
        "10-vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x, namespace: foo}\nspec: {}\n",
    );
    // The library function the agent and the CLI share.
    let warnings = interceptor::intercept::enforce::check_dir(&dir.path(), &[]).unwrap();
    assert!(
        warnings.iter().any(|w| w.contains("VirtualService")),
        "{warnings:?}"
    );

    let bin = interceptor_tests::demo::agent_binary();
    let out = Command::new(&bin)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("VirtualService"),
        "{stderr}"
    );
    assert!(stderr.contains("deprecated"), "MeshPolicy warns: {stderr}");

    dir.write("20-bad.yaml", MALFORMED);
    let out = Command::new(&bin)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("20-bad.yaml"))
        .unwrap_or_else(|| panic!("no line names the file: {stderr}"));
    assert!(
        line.contains("document 2") && line.contains("spec.mtls.mode") && line.contains("STRIKT"),
        "{line}"
    );
    assert!(line.contains("line 17"), "position: {line}");

    // YAML that does not parse at all.
    dir.write("20-bad.yaml", "apiVersion: v1\nkind: [unclosed\n");
    let out = Command::new(&bin)
        .args(["policy", "check"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("20-bad.yaml: document 1"), "{stderr}");

    // `interceptor run` refuses to start on it, naming the same place, before it touches
    // anything.
    dir.write("20-bad.yaml", MALFORMED);
    let scratch = TempDir::new("badstart");
    let node_yaml = scratch.0.join("node.yaml");
    std::fs::write(
        &node_yaml,
        format!(
            "trustDomain: cluster.local\ncaDir: {}\npolicyDir: {}\nadminSocket: {}\n",
            scratch.0.join("ca").display(),
            dir.path().display(),
            scratch.0.join("admin.sock").display()
        ),
    )
    .unwrap();
    let out = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&node_yaml)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("20-bad.yaml: document 2") && stderr.contains("spec.mtls.mode"),
        "{stderr}"
    );
}

/// `interceptor policy check` with DestinationRule files: outside `--cert-dir` (the node's
/// `policy.certDirs`) they are refused without being opened, and inside it a FIFO is refused
/// at once instead of blocking the check forever (as it did: the reader waited for a writer).
#[test]
fn policy_check_reads_rule_files_only_inside_cert_dirs_and_never_blocks() {
    let dir = PolicyDir::new();
    let certs = interceptor_tests::agent::TempDir::new("certs");
    let fifo = certs.0.join("ca.pem");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let rule = |ca: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: mongo}}
spec:
  host: mongo.mongo.svc.cluster.local
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {ca}}}
"
        )
    };
    let bin = interceptor_tests::demo::agent_binary();
    let check = |extra: &[&std::ffi::OsStr]| {
        let mut child = Command::new(&bin)
            .args(["policy", "check"])
            .arg(dir.path())
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run interceptor policy check");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("interceptor policy check {extra:?} did not finish within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("read stderr");
        (status.code(), stderr)
    };
    let cert_dir = [std::ffi::OsStr::new("--cert-dir"), certs.0.as_os_str()];

    dir.write("dr.yaml", &rule(&fifo.display().to_string()));
    let (code, stderr) = check(&cert_dir);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("caCertificates") && stderr.contains("is a FIFO"),
        "{stderr}"
    );
    let (code, stderr) = check(&[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("not inside policy.certDirs (none configured)"),
        "{stderr}"
    );
    dir.write("dr.yaml", &rule("/dev/zero"));
    let (code, stderr) = check(&cert_dir);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("`/dev/zero` is not inside"), "{stderr}");
}
