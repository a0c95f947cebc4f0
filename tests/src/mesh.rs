//! Helpers for the policy end-to-end tests: Kubernetes-like services in the test topology
//! (kube-proxy's DNAT with nftables, round robin), HTTP servers and curl in pods, a watched
//! policy directory, and reading the agent's flow table per request.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use interceptor::{
    app::Agent,
    config::{Service, ServicePort, Workload},
    intercept::table::FlowRow,
};

pub use crate::apps::busybox;
use crate::{agent::TempDir, apps, topology::Pod};

/// A mesh workload entry for a pod, with the given labels (`app` is the usual selector).
pub fn workload(
    pod: &Pod,
    namespace: &str,
    service_account: &str,
    labels: &[(&str, &str)],
) -> Workload {
    Workload {
        name: pod.name.clone(),
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        cgroup: pod.cgroup.path.clone(),
        netns: pod.netns_path(),
        ips: vec![pod.ip.into(), pod.ip6.into()],
    }
}

/// A service with one port `port → target_port` named `http`.
pub fn service(
    name: &str,
    namespace: &str,
    vip: Option<Ipv4Addr>,
    port: u16,
    target_port: u16,
    endpoints: &[&Pod],
) -> Service {
    Service {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        vip: vip.map(IpAddr::V4),
        ports: vec![ServicePort {
            name: Some("http".to_owned()),
            port,
            target_port: Some(target_port),
        }],
        endpoints: endpoints.iter().map(|p| IpAddr::V4(p.ip)).collect(),
    }
}

/// What kube-proxy does for clients without an agent: DNAT from each service VIP port to its
/// endpoints, round robin, here in the OUTPUT hook of every pod's own netns (so replies are
/// un-NATed there, whatever path they take on the bridge). Enrolled pods get the same rules;
/// their connections to a VIP never reach them, because connect4 steers them to the agent.
pub fn kube_proxy(pods: &[&Pod], services: &[Service]) {
    let mut chains = String::new();
    let mut rules = String::new();
    for (i, s) in services.iter().enumerate() {
        let Some(IpAddr::V4(vip)) = s.vip else {
            continue;
        };
        if s.endpoints.is_empty() {
            continue;
        }
        for (j, p) in s.ports.iter().enumerate() {
            let mut map = Vec::new();
            for (k, ep) in s.endpoints.iter().enumerate() {
                let chain = format!("ep_{i}_{j}_{k}");
                chains.push_str(&format!(
                    "  chain {chain} {{\n    meta l4proto tcp dnat to {ep}:{}\n  }}\n",
                    p.target()
                ));
                map.push(format!("{k} : goto {chain}"));
            }
            rules.push_str(&format!(
                "    ip daddr {vip} tcp dport {} numgen inc mod {} vmap {{ {} }}\n",
                p.port,
                s.endpoints.len(),
                map.join(", ")
            ));
        }
    }
    let script = format!(
        "table ip kube_proxy {{\n{chains}  chain output {{\n    type nat hook output priority -100; policy accept;\n{rules}  }}\n}}\n"
    );
    for pod in pods {
        let mut cmd = pod.command_unenrolled("nft");
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run nft (nftables must be installed)");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(script.as_bytes()).expect("nft script");
        }
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft in {}: {}\n{script}",
            pod.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// busybox httpd serving `dir` on `port` in the pod (outside its cgroup: the server itself is
/// never steered; inbound interception works on its address).
pub fn serve_http(pod: &mut Pod, dir: &Path, port: u16) {
    let probe = SocketAddr::from((pod.ip, port));
    apps::serve_http_on(pod, dir, &port.to_string(), probe);
}

/// A web root with the paths the seeds' curls ask for (`/headers`, `/ip`).
pub fn httpbin_root() -> TempDir {
    let www = TempDir::new("httpbin");
    std::fs::write(www.0.join("headers"), "{\"headers\": {}}\n").expect("www");
    std::fs::write(www.0.join("ip"), "{\"origin\": \"\"}\n").expect("www");
    www
}

/// What one curl returned.
#[derive(Debug, Clone)]
pub struct Curl {
    /// `%{http_code}`: `000` when no response arrived.
    pub code: String,
    /// curl's exit status (56: receive failure, 52: empty reply, 7: could not connect).
    pub exit: i32,
    pub body: Vec<u8>,
}

/// Runs `curl -s -m 10 [extra] url` as `cmd` (a pod command, enrolled or not).
pub fn curl(mut cmd: Command, url: &str, extra: &[&str]) -> Curl {
    let out = cmd
        .args(["-s", "-m", "10", "-o", "-", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&body[nl..]).trim().to_owned();
    body.truncate(nl);
    Curl {
        code,
        exit: out.status.code().unwrap_or(-1),
        body,
    }
}

/// httpbin (namespace `full`, `app: httpbin`) takes mTLS only.
pub const STRICT_HTTPBIN: &str = "apiVersion: security.istio.io/v1beta1
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
";

/// A policy directory the agent watches.
pub struct PolicyDir {
    pub dir: TempDir,
}

impl PolicyDir {
    pub fn new() -> Self {
        Self {
            dir: TempDir::new("policy"),
        }
    }

    /// A new directory holding `name` with `yaml`.
    pub fn with(name: &str, yaml: &str) -> Self {
        let dir = Self::new();
        dir.write(name, yaml);
        dir
    }

    pub fn path(&self) -> PathBuf {
        self.dir.0.clone()
    }

    /// Writes `name` atomically (as a ConfigMap update would appear).
    pub fn write(&self, name: &str, yaml: &str) {
        let tmp = self.dir.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write policy");
        std::fs::rename(&tmp, self.dir.0.join(name)).expect("rename policy");
    }

    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.0.join(name));
    }
}

impl Default for PolicyDir {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits (up to 5 s) until the agent runs a policy generation newer than `after`; returns it.
pub fn wait_generation(agent: &Agent, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let g = agent.policy_generation();
        if g > after {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not apply the new policy (still generation {g})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The highest flow id so far (open or recently closed), to find the flows of the next request.
pub fn last_flow_id(agent: &Agent) -> Option<u64> {
    agent.flows_with_recent().iter().map(|r| r.id).max()
}

/// Flows (open or closed) that started after `last`.
pub fn flows_after(agent: &Agent, last: Option<u64>) -> Vec<FlowRow> {
    let mut rows: Vec<FlowRow> = agent
        .flows_with_recent()
        .into_iter()
        .filter(|r| last.is_none_or(|l| r.id > l))
        .collect();
    rows.sort_by_key(|r| r.id);
    rows.dedup_by_key(|r| r.id);
    rows
}

/// Counter deltas between two `policy_stats` snapshots (only keys that changed).
pub fn stats_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0 && !k.starts_with("policy.")).then(|| (k.clone(), d))
        })
        .collect()
}

/// A counter of a `policy_stats` snapshot or delta; absent means it never moved.
pub fn stat(stats: &BTreeMap<String, u64>, name: &str) -> u64 {
    stats.get(name).copied().unwrap_or(0)
}

/// An AuthorizationPolicy named `name` that matches no workload of the tests: loading it
/// starts a new policy generation and changes no decision.
pub fn unrelated_policy(name: &str) -> String {
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: elsewhere}}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/elsewhere/sa/nobody"]
"#
    )
}

/// A TCP echo server on `port` of the pod's address, run by the test process (unenrolled);
/// lives as long as the test.
pub fn echo_server(pod: &Pod, port: u16) {
    let addr = SocketAddr::from((pod.ip, port));
    let listener = pod.ns.run(move || std::net::TcpListener::bind(addr));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut read = conn.try_clone().expect("clone");
                let _ = std::io::copy(&mut read, &mut conn);
            });
        }
    });
}

/// A long-lived line-oriented connection held by a child process (`busybox nc`) in a pod, so
/// an enrolled pod's connection is steered like any app's.
pub struct NcSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<Option<String>>,
}

impl NcSession {
    pub fn open(mut cmd: Command, dst: SocketAddr) -> Self {
        let mut child = cmd
            .args(["nc", &dst.ip().to_string(), &dst.port().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nc");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(Some(line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(None);
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Sends a line and waits up to `timeout` for its echo; `None` if the connection ended.
    pub fn echo(&mut self, line: &str, timeout: Duration) -> Option<String> {
        use std::io::Write as _;
        if writeln!(self.stdin, "{line}").is_err() {
            return None;
        }
        self.lines.recv_timeout(timeout).ok().flatten()
    }

    /// Waits up to `timeout` for the connection to end; returns when it did.
    pub fn wait_closed(&mut self, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Some(Instant::now());
                }
                Ok(Some(_)) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return None,
            }
        }
    }
}

impl Drop for NcSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
