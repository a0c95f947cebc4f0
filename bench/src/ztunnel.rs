//! The `ztunnel` benchmark modes: Istio ambient's node proxy, run the way ambient runs it, on
//! the same topology and in the same rounds as our modes.
//!
//! - One ztunnel per node (`PROXY_MODE=shared`), in the node's namespace and its own cgroup
//!   (its CPU from `cpu.stat`, like the agent's).
//! - Pods are handed to it over ZDS by our own server ([`crate::zds`]) with their netns fds;
//!   ztunnel opens its listeners (15001 outbound, 15006 inbound plaintext, 15008 HBONE) inside
//!   each pod's namespace.
//! - In-pod redirection as ambient's CNI plugin installs it: NAT `REDIRECT` of the pod's
//!   outbound TCP to 15001 and of its inbound TCP (except HBONE) to 15006; ztunnel's own
//!   sockets carry mark 0x539 and are exempt; connections ztunnel opens to the local app get
//!   connmark 0x111, whose replies are routed by policy table 100 (`local default dev lo`) back
//!   to ztunnel's transparent socket (the app sees the client pod's address).
//! - Identities from `FAKE_CA` (certificates made in-process), workloads from a local file
//!   (`LOCAL_XDS_PATH`, no istiod).
//!
//! ztunnel is not part of this project: the harness takes a binary built elsewhere
//! (`--ztunnel` or `ZTUNNEL_BIN`; bench/README.md says how to build one) and reports the modes
//! "unavailable (no ztunnel binary)" without one.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::{
    pki, procs,
    procs::Proc,
    topology::{self, Cgroup, Layout, Pod, Topology},
    zds,
};

/// Mark on ztunnel's own sockets (its in-pod default).
pub const MARK: &str = "0x539/0xfff";
/// Connmark of connections ztunnel opened to a local app.
pub const CONNMARK: &str = "0x111/0xfff";
/// Policy routing table for replies to those connections.
pub const ROUTE_TABLE: &str = "100";
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAIN_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

/// The binary from the flag, else from `ZTUNNEL_BIN`.
pub fn binary(flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("ZTUNNEL_BIN")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// Why the ztunnel modes cannot run here, if they cannot.
pub fn availability(bin: Option<&Path>) -> Result<(), String> {
    let Some(bin) = bin else {
        return Err("unavailable (no ztunnel binary)".to_owned());
    };
    if !bin.is_file() {
        return Err(format!(
            "unavailable (no ztunnel binary: {} does not exist)",
            bin.display()
        ));
    }
    for tool in ["iptables", "ip"] {
        let found = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .any(|d| d.join(tool).is_file());
        if !found {
            return Err(format!(
                "not runnable: `{tool}` is not installed (cargo xtask setup)"
            ));
        }
    }
    Ok(())
}

/// The redirection rules for one pod, as `iptables` argument lists (table first).
pub fn redirect_rules() -> Vec<Vec<String>> {
    let (out, inb, hbone) = (OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT);
    let all = 0xffff_ffff_u32;
    [
        // Connections ztunnel opens to the local app: remember them on the connection...
        format!("-t mangle -A PREROUTING -m mark --mark {MARK} -j CONNMARK --set-xmark {CONNMARK}"),
        // ...and mark the app's replies so policy routing hands them back to ztunnel.
        format!(
            "-t mangle -A OUTPUT -m connmark --mark {CONNMARK} -j CONNMARK --restore-mark \
             --nfmask {all:#x} --ctmask {all:#x}"
        ),
        // The pod's own outbound TCP (not ztunnel's, not loopback) → outbound listener.
        format!(
            "-t nat -A OUTPUT -p tcp ! -d 127.0.0.1/32 -m mark ! --mark {MARK} \
             -j REDIRECT --to-ports {out}"
        ),
        // Not in ambient's rules: counts new HBONE connections into the pod (a no-op RETURN
        // to the chain's ACCEPT policy), for the path check.
        format!("-t nat -A PREROUTING -p tcp --dport {hbone} -j RETURN"),
        // Inbound TCP except HBONE → plaintext inbound listener.
        format!(
            "-t nat -A PREROUTING -p tcp ! -d 127.0.0.1/32 ! --dport {hbone} \
             -m mark ! --mark {MARK} -j REDIRECT --to-ports {inb}"
        ),
    ]
    .iter()
    .map(|rule| rule.split_whitespace().map(str::to_owned).collect())
    .collect()
}

fn run_in(netns: &Path, program: &str, args: &[String]) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    topology::enter(&mut cmd, None, Some(netns), None)?;
    procs::run_bounded(program, &mut cmd, Duration::from_secs(10))
        .with_context(|| format!("{program} {}", args.join(" ")))?;
    Ok(())
}

/// Installs the redirection in a pod's namespace.
pub fn redirect(pod: &Pod) -> Result<()> {
    let ns = pod.ns.path();
    for r in redirect_rules() {
        run_in(&ns, "iptables", &r)?;
    }
    let ip = |args: &[&str]| {
        run_in(
            &ns,
            "ip",
            &args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )
    };
    ip(&[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        ROUTE_TABLE,
    ])?;
    ip(&[
        "rule",
        "add",
        "fwmark",
        CONNMARK,
        "pref",
        "32764",
        "lookup",
        ROUTE_TABLE,
    ])?;
    Ok(())
}

/// Removes everything [`redirect`] installed, so the next mode on this topology is not
/// redirected to a proxy that no longer runs. Best effort: used on teardown paths.
pub fn unredirect(netns: &Path) -> Result<()> {
    let mut problems = Vec::new();
    for table in ["nat", "mangle"] {
        if let Err(e) = run_in(netns, "iptables", &["-t".into(), table.into(), "-F".into()]) {
            problems.push(format!("{e:#}"));
        }
    }
    let _ = run_in(
        netns,
        "ip",
        &["rule", "del", "fwmark", CONNMARK, "lookup", ROUTE_TABLE].map(str::to_owned),
    );
    let _ = run_in(
        netns,
        "ip",
        &["route", "flush", "table", ROUTE_TABLE].map(str::to_owned),
    );
    if !problems.is_empty() {
        bail!("remove the ztunnel redirection: {}", problems.join("; "));
    }
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalConfig {
    workloads: Vec<LocalWorkload>,
    policies: Vec<()>,
    services: Vec<()>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalWorkload {
    uid: String,
    name: String,
    namespace: &'static str,
    service_account: &'static str,
    workload_ips: Vec<IpAddr>,
    protocol: &'static str,
    node: String,
    network: &'static str,
    /// Required by ztunnel's local config (service name → port map); no services here.
    services: std::collections::BTreeMap<String, std::collections::BTreeMap<u16, u16>>,
}

pub fn node_name(index: usize) -> String {
    format!("bench-node{}", index + 1)
}

fn uid(pod: &Pod) -> String {
    format!("bench//Pod/{}/bench-{}", pki::NAMESPACE, pod.name)
}

fn service_account(pod: &Pod, topo: &Topology) -> &'static str {
    if std::ptr::eq(pod, &topo.client) {
        pki::CLIENT_SA
    } else {
        pki::SERVER_SA
    }
}

/// Both pods, each on its node, speaking HBONE: what istiod would send every ztunnel.
fn local_config(topo: &Topology) -> LocalConfig {
    let server_node = match topo.layout {
        Layout::SameNode => 0,
        Layout::CrossNode => 1,
    };
    let workloads = [(&topo.client, 0), (&topo.server, server_node)]
        .into_iter()
        .map(|(pod, node)| LocalWorkload {
            uid: uid(pod),
            name: format!("bench-{}", pod.name),
            namespace: pki::NAMESPACE,
            service_account: service_account(pod, topo),
            workload_ips: vec![IpAddr::V4(pod.ip)],
            protocol: "HBONE",
            node: node_name(node),
            network: "",
            services: Default::default(),
        })
        .collect();
    LocalConfig {
        workloads,
        policies: Vec::new(),
        services: Vec::new(),
    }
}

/// What a ztunnel deployment leaves besides its processes (which the caller holds with the
/// other modes' proxies): the ZDS servers feeding it, and the pods whose redirection must be
/// removed once ztunnel has stopped.
pub struct Deployment {
    servers: Vec<zds::Server>,
    redirected: Vec<PathBuf>,
}

impl std::fmt::Debug for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployment")
            .field("redirected", &self.redirected)
            .finish_non_exhaustive()
    }
}

impl Deployment {
    /// Removes the redirection from the pods (call after ztunnel has stopped).
    pub fn stop(&mut self) -> Result<()> {
        self.servers.clear();
        let mut problems = Vec::new();
        for ns in self.redirected.drain(..) {
            if let Err(e) = unredirect(&ns) {
                problems.push(format!("{e:#}"));
            }
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        Ok(())
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Where ztunnel's processes and cgroups go (the mode's proxies).
pub struct Sink<'a> {
    pub procs: &'a mut Vec<Proc>,
    pub cgroups: &'a mut Vec<Cgroup>,
}

/// Starts one ztunnel per node with the pods of that node, `one_stream` setting
/// `POOL_MAX_STREAMS_PER_CONNECTION=1` (one HBONE connection per app connection).
pub fn start(
    bin: &Path,
    topo: &Topology,
    env: &crate::modes::Env,
    tag: &str,
    one_stream: bool,
    sink: Sink<'_>,
) -> Result<Deployment> {
    let (work_dir, log_dir) = (&env.work_dir, &env.log_dir);
    let mut dep = Deployment {
        servers: Vec::new(),
        redirected: Vec::new(),
    };
    for pod in [&topo.client, &topo.server] {
        dep.redirected.push(pod.ns.path());
        redirect(pod).with_context(|| format!("in-pod redirection in pod {}", pod.name))?;
    }
    let config = local_config(topo);
    let per_node: Vec<(usize, Vec<&Pod>)> = match topo.layout {
        Layout::SameNode => vec![(0, vec![&topo.client, &topo.server])],
        Layout::CrossNode => vec![(0, vec![&topo.client]), (1, vec![&topo.server])],
    };
    for (node, pods) in per_node {
        let dir = work_dir.join(format!("ztunnel{node}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let xds = dir.join("workloads.yaml");
        // JSON is YAML.
        fs::write(&xds, serde_json::to_vec_pretty(&config)?)?;
        let sock = dir.join("zds.sock");
        let server = zds::Server::start(
            &sock,
            pods.iter()
                .map(|p| zds::Pod {
                    uid: uid(p),
                    info: zds::WorkloadInfo {
                        name: format!("bench-{}", p.name),
                        namespace: pki::NAMESPACE.to_owned(),
                        service_account: service_account(p, topo).to_owned(),
                    },
                    netns: p.ns.path(),
                })
                .collect(),
        )?;
        let cgroup = Cgroup::new(&format!("ztunnel{node}-"))?;
        let log = fs::File::create(log_dir.join(format!("ztunnel{node}-{tag}.log")))?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PROXY_MODE", "shared")
            .env("INPOD_UDS", &sock)
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("LOCAL_XDS_PATH", &xds)
            .env("NODE_NAME", node_name(node))
            .env("POD_NAME", format!("ztunnel-{node}"))
            .env("POD_NAMESPACE", "istio-system")
            .env("CLUSTER_ID", "bench")
            .env("ZTUNNEL_WORKER_THREADS", "2")
            // Our agent runs at `warn` too: no per-connection access log on either side.
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        if one_stream {
            cmd.env("POOL_MAX_STREAMS_PER_CONNECTION", "1");
        }
        let node_ns = topo.nodes[node].ns.path();
        topology::enter(&mut cmd, Some(&cgroup.path), Some(&node_ns), None)?;
        let proc = Proc::spawn(&format!("ztunnel node {}", node + 1), &mut cmd)?;
        sink.procs.push(proc);
        sink.cgroups.push(cgroup);
        server
            .wait_snapshot(Duration::from_secs(30))
            .with_context(|| format!("ztunnel log in {}", log_dir.display()))?;
        dep.servers.push(server);
        for pod in &pods {
            wait_listening(pod, sink.procs)?;
        }
    }
    Ok(dep)
}

/// TCP sockets of a pod's namespace with `port` as local (or, with `remote`, peer) port, and
/// their kernel state (hex as in /proc/net/tcp: 0A listen, 01 established, 06 time-wait...).
pub fn sockets_on(pod: &Pod, port: u16, remote: bool) -> Vec<String> {
    let mut out = Vec::new();
    for file in ["tcp", "tcp6"] {
        let Ok(text) = pod.ns.proc_net(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let addr = if remote { f[2] } else { f[1] };
            let p = addr
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) {
                out.push(f[3].to_owned());
            }
        }
    }
    out
}

fn wait_listening(pod: &Pod, procs: &mut [Proc]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = [OUTBOUND_PORT, INBOUND_PLAIN_PORT, HBONE_PORT]
            .iter()
            .all(|p| sockets_on(pod, *p, false).iter().any(|s| s == "0A"));
        if up {
            return Ok(());
        }
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if Instant::now() > deadline {
            bail!(
                "ztunnel did not listen on {OUTBOUND_PORT}/{INBOUND_PLAIN_PORT}/{HBONE_PORT} in \
                 pod {} within 20 s",
                pod.name
            );
        }
        procs::sleep(Duration::from_millis(100))?;
    }
}

/// New TCP connections a pod's NAT table has counted per redirection rule since the rules
/// were installed (NAT rules see the first packet of each connection only).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// The pod's own outbound connections sent to ztunnel's outbound listener (15001).
    pub outbound: u64,
    /// Inbound plaintext connections sent to ztunnel's inbound listener (15006).
    pub inbound_plain: u64,
    /// Inbound HBONE connections (to 15008).
    pub hbone: u64,
}

/// Reads [`Captured`] from `iptables-save -c -t nat` output (`[packets:bytes] -A CHAIN ...`).
pub fn parse_captured(save: &str) -> Captured {
    let mut c = Captured::default();
    for line in save.lines() {
        let Some((count, rule)) = line.strip_prefix('[').and_then(|l| l.split_once("] ")) else {
            continue;
        };
        let packets: u64 = count
            .split(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let words: Vec<&str> = rule.split_whitespace().collect();
        let has = |pair: [&str; 2]| words.windows(2).any(|w| w == pair);
        let out = OUTBOUND_PORT.to_string();
        let inb = INBOUND_PLAIN_PORT.to_string();
        let hbone = HBONE_PORT.to_string();
        if has(["--to-ports", &out]) {
            c.outbound += packets;
        } else if has(["--to-ports", &inb]) {
            c.inbound_plain += packets;
        } else if has(["--dport", &hbone]) && has(["-j", "RETURN"]) {
            c.hbone += packets;
        }
    }
    c
}

/// What the redirection rules in `pod` have counted so far.
pub fn captured(pod: &Pod) -> Result<Captured> {
    let mut cmd = Command::new("iptables-save");
    cmd.args(["-c", "-t", "nat"]);
    topology::enter(&mut cmd, None, Some(&pod.ns.path()), None)?;
    let out = procs::run_bounded("iptables-save", &mut cmd, Duration::from_secs(10))
        .with_context(|| format!("iptables-save in pod {}", pod.name))?;
    Ok(parse_captured(&out.stdout))
}

/// The path check's second half (the first: the server app saw the client pod's address):
/// the client pod's connection went to ztunnel's outbound listener, the server pod received
/// HBONE, and no connection reached the server pod in plaintext (which ztunnel's inbound
/// plaintext listener would also have passed to the app with the client's address).
pub fn check_hbone(topo: &Topology) -> Result<()> {
    let client = captured(&topo.client)?;
    let server = captured(&topo.server)?;
    if client.outbound == 0 {
        bail!(
            "no connection from pod {} was redirected to ztunnel's outbound listener \
             ({OUTBOUND_PORT}): the request did not go through ztunnel",
            topo.client.name
        );
    }
    if server.hbone == 0 {
        bail!(
            "no HBONE connection reached {}:{HBONE_PORT}: the request did not go through \
             ztunnel's tunnel",
            topo.server.ip
        );
    }
    if server.inbound_plain != 0 {
        bail!(
            "{} connection(s) reached pod {} in plaintext (redirected to {INBOUND_PLAIN_PORT}), \
             not over HBONE",
            server.inbound_plain,
            topo.server.name
        );
    }
    Ok(())
}

/// What the server app sees as the peer: ztunnel connects to it from the client pod's
/// address (original source), as in ambient.
pub fn expected_peer(topo: &Topology) -> Ipv4Addr {
    topo.client.ip
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_without_a_binary() {
        assert_eq!(
            availability(None).unwrap_err(),
            "unavailable (no ztunnel binary)"
        );
        let missing = Path::new("/nonexistent/ztunnel");
        let why = availability(Some(missing)).unwrap_err();
        assert!(why.starts_with("unavailable (no ztunnel binary"), "{why}");
    }

    #[test]
    fn rules_exempt_ztunnel_and_hbone() {
        let rules = redirect_rules();
        let joined: Vec<String> = rules.iter().map(|r| r.join(" ")).collect();
        let out = joined
            .iter()
            .find(|r| r.contains("--to-ports 15001"))
            .unwrap();
        assert!(out.contains("-t nat -A OUTPUT"), "{out}");
        assert!(out.contains("! --mark 0x539/0xfff"), "{out}");
        let inb = joined
            .iter()
            .find(|r| r.contains("--to-ports 15006"))
            .unwrap();
        assert!(inb.contains("-A PREROUTING"), "{inb}");
        assert!(inb.contains("! --dport 15008"), "{inb}");
        assert!(joined.iter().any(|r| r.contains("--dport 15008 -j RETURN")));
        assert!(joined.iter().any(|r| r.contains("--set-xmark 0x111/0xfff")));
        assert!(joined.iter().any(|r| r.contains("--restore-mark")));
    }

    /// The counters as `iptables-save -c` prints them after a request went client pod →
    /// 15001 → HBONE, with the rules [`redirect_rules`] installs (as iptables normalises them).
    #[test]
    fn counts_captured_connections_per_rule() {
        let save = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [3:180]\n\
            :OUTPUT ACCEPT [2:120]\n\
            [2:120] -A PREROUTING -p tcp -m tcp --dport 15008 -j RETURN\n\
            [1:60] -A PREROUTING ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! \
            --mark 0x539/0xfff -j REDIRECT --to-ports 15006\n\
            [5:300] -A OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j \
            REDIRECT --to-ports 15001\nCOMMIT\n";
        assert_eq!(
            parse_captured(save),
            Captured {
                outbound: 5,
                inbound_plain: 1,
                hbone: 2
            }
        );
        assert_eq!(parse_captured(""), Captured::default());
    }
}
