//! Harness for the upgrade (handover) tests: an echo server that records what each flow
//! delivered, the `upgrade_load` client driven from a test, and their verdicts.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use interceptor::{
    config::{AccessLogFormat, Config, HandoverSettings, Ttl},
    intercept::table::Protection,
};

use crate::{
    agent::{PinCleanup, workload},
    apps::random_payload,
    crypto::tls_stat,
    digest::Sha256,
    in_vm,
    process::AgentProcess,
    require_privileged,
    scenario::{Cluster, Scenario, expected_protection},
    topology::Pod,
    wire::{Capture, assert_no_plaintext},
};

/// The echo server's port in the server pod.
pub const ECHO_PORT: u16 = 9000;

/// What the echo server received on one flow (by the id the flow starts with): bytes and
/// SHA-256, recorded when the client half-closes.
pub type Received = Arc<Mutex<HashMap<u64, (usize, String)>>>;

/// Echoes every byte back on `port` of the pod's address (run by the test process in the
/// pod's netns, outside its cgroup, as a server app would be reached through sk_lookup), and
/// records each flow's bytes and hash.
pub fn echo_server(pod: &Pod, port: u16) -> Received {
    let addr = SocketAddr::from((pod.ip, port));
    let listener = pod.ns.run(move || std::net::TcpListener::bind(addr));
    let received: Received = Arc::default();
    let rec = Arc::clone(&received);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let rec = Arc::clone(&rec);
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut h = Sha256::new();
                let mut n = 0usize;
                let mut id = [0u8; 8];
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let k = conn.read(&mut buf)?;
                    if k == 0 {
                        break;
                    }
                    if n < 8 {
                        let take = k.min(8 - n);
                        id[n..n + take].copy_from_slice(&buf[..take]);
                    }
                    h.update(&buf[..k]);
                    n += k;
                    conn.write_all(&buf[..k])?;
                }
                let hex = h.hex();
                rec.lock()
                    .expect("echo records")
                    .insert(u64::from_be_bytes(id), (n, hex));
                conn.shutdown(std::net::Shutdown::Write)
            });
        }
    });
    received
}

/// One flow as the client saw it.
#[derive(Debug, Clone)]
pub struct FlowResult {
    pub id: u64,
    pub sent: usize,
    pub sent_sha: String,
    pub recv: usize,
    pub recv_sha: String,
    pub error: Option<String>,
}

/// A running `upgrade_load flows` client in a pod.
pub struct Flows {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    /// Closing it ends the transfers before their time ([`Flows::stop`]).
    stdin: Option<std::process::ChildStdin>,
}

impl Flows {
    /// Starts `n` flows to `dst` for `secs` seconds; returns once every flow is set up end to
    /// end (its id echoed back), when the transfers start.
    pub fn start(
        mut cmd: Command,
        dst: SocketAddr,
        n: usize,
        secs: f64,
        payload: &std::path::Path,
    ) -> Flows {
        cmd.arg("flows")
            .arg(dst.to_string())
            .arg(n.to_string())
            .arg(secs.to_string())
            .arg(payload)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn upgrade_load flows");
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("upgrade_load output");
        assert_eq!(line.trim(), "started", "upgrade_load flows said {line:?}");
        Flows { child, out, stdin }
    }

    /// Ends the transfers now: every flow half-closes and reads the rest of its echo.
    pub fn stop(&mut self) {
        self.stdin = None;
    }

    /// Whether the client is still running (its flows not all done).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for every flow to end (at most `limit`) and returns what each saw.
    pub fn finish(mut self, limit: Duration) -> Vec<FlowResult> {
        let deadline = Instant::now() + limit;
        loop {
            if self.child.try_wait().expect("wait upgrade_load").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the flows did not end within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut rest = String::new();
        self.out
            .read_to_string(&mut rest)
            .expect("upgrade_load output");
        rest.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("flow json");
                FlowResult {
                    id: v["id"].as_u64().unwrap_or(u64::MAX),
                    sent: v["sent"].as_u64().unwrap_or(0) as usize,
                    sent_sha: v["sentSha"].as_str().unwrap_or_default().to_owned(),
                    recv: v["recv"].as_u64().unwrap_or(0) as usize,
                    recv_sha: v["recvSha"].as_str().unwrap_or_default().to_owned(),
                    error: v["error"].as_str().map(str::to_owned),
                }
            })
            .collect()
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts every flow ended cleanly with the same bytes at both ends: the client got back
/// exactly what it sent (the echo crossed the agents both ways), and the server received
/// exactly that too.
pub fn assert_intact(results: &[FlowResult], n: usize, received: &Received) {
    assert_eq!(results.len(), n, "flows reported");
    let server = received.lock().expect("echo records");
    let mut bad = Vec::new();
    for r in results {
        let at_server = server.get(&r.id);
        let ok = r.error.is_none()
            && r.sent > 8
            && r.recv == r.sent
            && r.recv_sha == r.sent_sha
            && at_server == Some(&(r.sent, r.sent_sha.clone()));
        if !ok {
            bad.push(format!(
                "flow {}: sent {} recv {} error {:?} server {:?}",
                r.id,
                r.sent,
                r.recv,
                r.error,
                at_server.map(|s| s.0)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {n} flows broken: {:#?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
}

/// A running `upgrade_load loop` client.
pub struct Churn {
    child: Child,
    /// A connection that has not echoed within this fails.
    timeout: Duration,
    /// Closing it ends the loop before its time ([`Churn::stop`]).
    stdin: Option<std::process::ChildStdin>,
}

impl Churn {
    pub fn start(mut cmd: Command, dst: SocketAddr, secs: f64, timeout: Duration) -> Churn {
        cmd.arg("loop")
            .arg(dst.to_string())
            .arg(secs.to_string())
            .arg(timeout.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn upgrade_load loop");
        let stdin = child.stdin.take();
        Churn {
            child,
            timeout,
            stdin,
        }
    }

    /// Ends the loop after the connection in progress.
    pub fn stop(&mut self) {
        self.stdin = None;
    }

    /// `(connections that worked, that failed, the first errors)`; the slowest connections
    /// go to stderr. `limit` is on top of the connection in progress.
    pub fn finish(mut self, limit: Duration) -> (u64, u64, Vec<String>) {
        let deadline = Instant::now() + limit + self.timeout;
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "the connection loop did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("loop output");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("loop json");
        // Past libtest's capture: how slow the slowest connections were is wanted from
        // passing runs too (the VMs' timing).
        let _ = writeln!(
            std::io::stderr().lock(),
            "connection loop: {} ok, {} failed; slowest [ms into the loop, ms taken]: {} \
             (timeout {} ms)",
            v["ok"],
            v["failed"],
            v["slowest"],
            self.timeout.as_millis()
        );
        let errors = v["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        (
            v["ok"].as_u64().unwrap_or(0),
            v["failed"].as_u64().unwrap_or(u64::MAX),
            errors,
        )
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node, a client and a server pod, an echo server, and the agent's config with a
/// handover socket; everything removed when dropped (pins included).
pub struct Bench {
    pub scenario: Scenario,
    _cluster: Cluster,
    pub cfg: Config,
    pub file: PathBuf,
    pub payload: Vec<u8>,
    pub payload_file: PathBuf,
    pub received: Received,
    pub dst: SocketAddr,
    load: String,
    /// A new connection of [`Bench::churn`] that has not echoed within this fails (5 s
    /// unless a test measured what this machine needs).
    pub conn_timeout: Duration,
    /// Agents started so far (each writes its access log to its own file).
    agents: std::sync::atomic::AtomicUsize,
    _pins: PinCleanup,
}

impl Bench {
    /// `load`: the `upgrade_load` program as the pods run it.
    pub fn new(node: u8, tag: &str, drain: Duration, load: &str) -> Bench {
        require_privileged();
        let scenario = Scenario::new(node, &format!("{tag}c"), &format!("{tag}s"));
        let cluster = Cluster::new(tag);
        let mut cfg = cluster.config(
            vec![
                workload(&scenario.client, "up", "client"),
                workload(&scenario.server, "up", "server"),
            ],
            vec![],
        );
        // The echo app never speaks first: a client agent slowed by a loaded machine must not
        // have its mTLS flow taken for plaintext after the default 200 ms.
        cfg.tuning.first_byte_wait_ms = 5_000;
        // 100 handshakes at once under TCG (the VMs) take longer than the default 5 s.
        if in_vm() {
            cfg.tuning.handshake_timeout_ms = 30_000;
        }
        // Every flow end in the access log, as JSON: the tests match the lines of a handover
        // against the successor's flows.
        cfg.observability.access_log.format = AccessLogFormat::Json;
        cfg.observability.access_log.max_per_second = 0;
        cfg.handover = Some(HandoverSettings {
            socket: cluster.scratch.0.join("handover").join("handover.sock"),
            drain_window: Ttl(drain),
        });
        let pins = PinCleanup(cfg.bpffs.clone());
        let file = cluster.scratch.0.join("node.yaml");
        let payload = random_payload(1 << 20);
        let payload_file = cluster.scratch.0.join("payload");
        std::fs::write(&payload_file, &payload).expect("write payload");
        let received = echo_server(&scenario.server, ECHO_PORT);
        let dst = SocketAddr::from((scenario.server.ip, ECHO_PORT));
        Bench {
            scenario,
            _cluster: cluster,
            cfg,
            file,
            payload,
            payload_file,
            received,
            dst,
            load: load.to_owned(),
            conn_timeout: Duration::from_secs(5),
            agents: Default::default(),
            _pins: pins,
        }
    }

    /// Starts an agent on the bench's config, its access log in `agent-<n>.log`.
    pub fn start(&self, args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        let n = self
            .agents
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.file.with_file_name(format!("agent-{n}.log"));
        // Each handover step is one info line on either side: with them a slow or stuck
        // upgrade shows where it was.
        let mut env = env.to_vec();
        let filter = std::env::var("INTERCEPTOR_LOG").unwrap_or_else(|_| {
            "warn,interceptor::handover=info,interceptor::app::upgrade=info".to_owned()
        });
        env.push(("INTERCEPTOR_LOG", &filter));
        AgentProcess::start_logged(&self.cfg, &self.file, args, &env, &log)
    }

    pub fn takeover(&self, env: &[(&str, &str)]) -> AgentProcess {
        self.start(&["--takeover"], env)
    }

    pub fn capture(&self) -> Capture {
        Capture::start_in(&self.scenario.node.ns.path(), &self.scenario.server.host_if)
    }

    pub fn flows(&self, n: usize, secs: f64) -> Flows {
        Flows::start(
            self.scenario.client.command(&self.load),
            self.dst,
            n,
            secs,
            &self.payload_file,
        )
    }

    /// A connection loop whose connections fail after [`Bench::conn_timeout`].
    pub fn churn(&self, secs: f64) -> Churn {
        Churn::start(
            self.scenario.client.command(&self.load),
            self.dst,
            secs,
            self.conn_timeout,
        )
    }

    /// Waits until a mesh connection works (the first one mints both leaves).
    pub fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, _, _) = self.churn(0.2).finish(Duration::from_secs(20));
            if ok > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "no flow served");
        }
    }

    /// A short loop of new connections that must all work.
    pub fn assert_serving(&self, what: &str) {
        let (ok, failed, errors) = self.churn(0.5).finish(Duration::from_secs(20));
        assert!(
            ok > 0 && failed == 0,
            "{what}: {ok} connections worked, {failed} failed: {errors:?}"
        );
    }

    pub fn assert_no_plaintext(&self, capture: Capture) {
        let frames = capture.stop();
        assert_no_plaintext(&frames, &self.payload);
    }
}

/// Whether open flows move to the new agent here: kTLS flows do (the VMs), userspace-relay
/// flows stay in the old agent (the host).
pub fn flows_move() -> bool {
    expected_protection() == Protection::Ktls
}

/// Open flows the agent lists as handed over by its predecessor (two rows per connection:
/// the client pod's outbound flow and the server pod's inbound one).
pub fn handed_over(agent: &AgentProcess) -> usize {
    agent
        .flows()
        .iter()
        .filter(|r| r.handed_over && !r.closed)
        .count()
}

/// Waits until `agent` lists `want` handed-over flows (at most 120 s in the VMs, 30 s on a
/// host).
pub fn await_handed_over(agent: &AgentProcess, want: usize, what: &str) {
    let limit = Duration::from_secs(if in_vm() { 120 } else { 30 });
    await_handed_over_within(agent, want, what, limit);
}

/// [`await_handed_over`] with a bound of the test's choosing (measured on the machine).
pub fn await_handed_over_within(agent: &AgentProcess, want: usize, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let got = handed_over(agent);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the new agent lists {got} handed-over flows, not {want}, after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `agent` relays `want` open flows with kTLS (set-up done: only those move).
pub fn await_ktls_flows(agent: &AgentProcess, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = agent
            .flows()
            .iter()
            .filter(|r| !r.closed && r.protection == Protection::Ktls)
            .count();
        if got >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{got} open kTLS flows, not the {want} expected"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The kernel's TLS counters in both pods did not move between `before` and `after` (no kTLS
/// socket was made or torn down), and at least `flows` kTLS sockets were open in each.
pub fn assert_tls_sockets_unchanged(
    before: &[HashMap<String, u64>; 2],
    after: &[HashMap<String, u64>; 2],
    flows: usize,
) {
    for (pod, (before, after)) in ["client", "server"].iter().zip(before.iter().zip(after)) {
        for key in ["TlsCurrTxSw", "TlsCurrRxSw", "TlsTxSw", "TlsRxSw"] {
            assert_eq!(
                before.get(key),
                after.get(key),
                "{pod} netns {key}: before {before:?}, after {after:?}"
            );
        }
        let open = before.get("TlsCurrTxSw").copied().unwrap_or(0);
        assert!(
            open >= flows as u64,
            "{pod} netns: {open} kTLS sockets open, fewer than the {flows} flows"
        );
    }
}

/// The kTLS counters of both pods' netns.
pub fn tls_sockets(b: &Bench) -> [HashMap<String, u64>; 2] {
    [tls_stat(&b.scenario.client), tls_stat(&b.scenario.server)]
}

/// The old agent exits once its flows are done (well before its drain window).
pub fn assert_exits(agent: &mut AgentProcess, limit: Duration, what: &str) {
    let status = agent.wait_exit(limit);
    assert!(status.is_some(), "{what} still running after {limit:?}");
}

/// `handover.predecessor_flows` of `flows --stats`.
pub fn predecessor_flows(agent: &AgentProcess) -> u64 {
    agent
        .stats()
        .get("handover.predecessor_flows")
        .copied()
        .expect("handover.predecessor_flows in flows --stats")
}

pub fn assert_churn_clean(churn: Churn, what: &str) -> u64 {
    let (ok, failed, errors) = churn.finish(Duration::from_secs(30));
    assert!(
        failed == 0 && ok > 10,
        "{what}: {ok} new connections worked, {failed} failed: {errors:?}"
    );
    ok
}

/// `handover.flows_<result>` of `flows --stats`: `interceptor_handover_flows_total{result}`.
pub fn handover_count(agent: &AgentProcess, result: &str) -> u64 {
    let key = format!("handover.flows_{result}");
    agent
        .stats()
        .get(&key)
        .copied()
        .unwrap_or_else(|| panic!("{key} in flows --stats"))
}

/// The old agent's access-log lines closing a flow end it handed over.
pub fn handed_over_lines(old: &AgentProcess) -> Vec<serde_json::Value> {
    old.access_lines()
        .into_iter()
        .filter(|l| l["outcome"] == "handed_over")
        .collect()
}

/// A handover of at least `moved` flow ends from `old` (exited: its log is complete) to
/// `new`, as both report it: the old agent's access log closes each with outcome
/// `handed_over`, naming (pod, addresses) a flow the new agent lists as handed over; every
/// handed-over flow the new agent has open is among them; and the new agent counted exactly
/// that many received, none refused (`interceptor_handover_flows_total`). More than `moved`
/// only when a connection of a connect loop was moved too (it may have ended since).
pub fn assert_handover_accounted(old: &AgentProcess, new: &AgentProcess, moved: usize, what: &str) {
    type Named = std::collections::BTreeSet<(String, String, String)>;
    let lines = handed_over_lines(old);
    let named: Named = lines
        .iter()
        .map(|l| {
            let field = |k: &str| l[k].as_str().unwrap_or_default().to_owned();
            (field("pod"), field("src_addr"), field("dst_addr"))
        })
        .collect();
    let rows = new.flows();
    let name = |r: &interceptor::intercept::table::FlowRow| {
        (
            r.pod.clone(),
            r.source.to_string(),
            r.destination.to_string(),
        )
    };
    let listed: Named = rows.iter().filter(|r| r.handed_over).map(name).collect();
    let open: Named = rows
        .iter()
        .filter(|r| r.handed_over && !r.closed)
        .map(name)
        .collect();
    assert!(
        lines.len() >= moved && named.len() == lines.len(),
        "{what}: {} `handed_over` lines in the old agent's access log ({} flows), want {moved} \
         at least, one per flow end: {lines:#?}",
        lines.len(),
        named.len()
    );
    assert!(
        named.is_subset(&listed) && open.is_subset(&named),
        "{what}: the old agent logged as handed over {named:#?}\nthe new one lists {listed:#?}, \
         open {open:#?}"
    );
    // Counted once the whole transfer is read, a moment after the flows are listed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counted = (
            handover_count(new, "received"),
            handover_count(new, "refused"),
        );
        if counted == (lines.len() as u64, 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the new agent counted (received, refused) {counted:?}, not ({}, 0)",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `interceptor-cni` plugin binary, built beside the agent (`cargo build -p
/// interceptor-cni`; CI's dev image build makes it).
pub fn cni_plugin() -> PathBuf {
    let bin = crate::demo::agent_binary().with_file_name("interceptor-cni");
    assert!(
        bin.exists(),
        "{} not built: cargo build -p interceptor-cni",
        bin.display()
    );
    bin
}

/// Gives the agent of `cfg` a CNI pod directory: `namespace` in the mesh with `pod` (service
/// account = its name) in it. Pods are then enrolled by netns, the configured ones too: the
/// outbound programs go on the cgroup of `clients` (the one pod whose processes connect
/// out; never the host's root cgroup).
pub fn enable_cni(cfg: &mut Config, clients: &Pod, pod: &Pod, namespace: &str) {
    let scratch = cfg.state_dir.clone();
    for w in &mut cfg.workloads {
        w.cgroup = PathBuf::new();
    }
    cfg.cni = Some(interceptor::config::CniSettings {
        parent_cgroup: Some(clients.cgroup.path.clone()),
        membership_file: scratch.join("cni-membership.json"),
        lookup_timeout_ms: 2_000,
        namespaces: [(
            namespace.to_owned(),
            [("interceptor.io/mtls".to_owned(), "enabled".to_owned())]
                .into_iter()
                .collect(),
        )]
        .into_iter()
        .collect(),
        pods: vec![interceptor::config::StaticPod {
            namespace: namespace.to_owned(),
            name: pod.name.clone(),
            uid: String::new(),
            service_account: pod.name.clone(),
            labels: Default::default(),
        }],
    });
}

/// Runs the CNI plugin's ADD for `pod` (in `namespace`) against the agent of `cfg`, as a
/// runtime does after the main plugin gave the pod its address; returns its output and how
/// long it took.
pub fn cni_add(cfg: &Config, pod: &Pod, namespace: &str) -> (std::process::Output, Duration) {
    let cni = cfg.cni.as_ref().expect("enable_cni first");
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "upgrade",
        "type": "interceptor-cni",
        "adminSocket": cfg.admin_socket,
        "membershipFile": cni.membership_file,
        "timeoutSeconds": 20,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
            "ips": [{"interface": 0, "address": format!("{}/24", pod.ip)}],
        },
    });
    let started = Instant::now();
    let mut child = Command::new(cni_plugin())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", format!("sandbox-{}", pod.name))
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={}", pod.name),
        )
        .env("CNI_PATH", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn interceptor-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("network config to the plugin");
    let out = child.wait_with_output().expect("interceptor-cni");
    (out, started.elapsed())
}

/// One admin request line to whoever answers at `socket`, and its answer.
pub fn ask_admin(socket: &std::path::Path, request: &serde_json::Value) -> serde_json::Value {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("admin socket");
    writeln!(s, "{request}").expect("write");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("read");
    serde_json::from_str(&line).expect("answer")
}
