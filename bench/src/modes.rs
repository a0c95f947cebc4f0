//! The five ways a client pod's bytes reach the server pod, set up and torn down on the same
//! topology, and the check that each one really takes the path it claims.
//!
//! - plaintext: app → veth → app.
//! - interceptor, kTLS / userspace relay / sk_msg local leg: the real agent binary
//!   (`interceptor run --config FILE`), started outside every pod cgroup, in the node's netns;
//!   cross-node, one agent per node, each knowing the other pod as a peer.
//! - HAProxy sidecar pair: in each pod, app → 127.0.0.1 local HAProxy → mTLS (TLS 1.3,
//!   TLS_AES_128_GCM_SHA256, X25519, certificates from the same CA) → remote HAProxy → app.
//! - forward: the HAProxy pair's legs with the cheapest userspace relay instead (no TLS, a
//!   blocking thread per direction, [`crate::forward`]): the floor of any three-leg relay.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    apps::{ECHO_PORT, HTTP_PORT},
    forward::Route,
    pki::{self, Pki},
    procs::{self, Proc},
    topology::{self, Cgroup, Layout, Topology},
};

/// Server-side application ports: iperf3 ×4, sockperf, HTTP, echo.
pub const IPERF_PORTS: [u16; 4] = [5201, 5202, 5203, 5204];
pub const SOCKPERF_PORT: u16 = 11111;
pub const APP_PORTS: [u16; 7] = [5201, 5202, 5203, 5204, SOCKPERF_PORT, HTTP_PORT, ECHO_PORT];
/// The server sidecar listens on app port + this offset (TLS), the client sidecar on the app
/// port itself at 127.0.0.1.
const SIDECAR_OFFSET: u16 = 20000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Plaintext,
    InterceptorKtls,
    InterceptorRelay,
    HaproxyPair,
    InterceptorSkmsg,
    /// The relay with `tuning.sessionResumption: false`: every connection a full handshake,
    /// as before resumption existed; the same-run baseline for what resumption buys.
    InterceptorRelayFull,
    /// The agent with `tuning.sameNodeFastPath` (its default): both pods on this agent, no
    /// TLS, two loopback legs. Same node only (cross-node it would be the relay again).
    /// Every other agent mode turns the fast path off, so same-node numbers stay mTLS.
    InterceptorLocal,
    /// Istio ambient's ztunnel, its default: app connections multiplexed as HTTP/2 streams
    /// over pooled HBONE connections (see `crate::ztunnel`).
    ZtunnelDefault,
    /// ztunnel with `POOL_MAX_STREAMS_PER_CONNECTION=1`: one HBONE (mTLS) connection per app
    /// connection, the like-for-like case for connection setup.
    ZtunnelOneStream,
    /// The relay run by a second agent build (`--baseline-agent`): a change to the agent
    /// measured before and after in the same rounds, paired like every other mode.
    InterceptorRelayBase,
    /// The fast path with `tuning.sameNodeJoin: skMsg`: the two loopback legs joined by the
    /// sk_msg leg join instead of the splice relay. Same node only.
    InterceptorLocalSkmsg,
    /// No TLS, no agent: a forwarder in each pod (`interceptor-bench forward`, blocking
    /// `read` → `write` per direction) on the relay's legs (app → loopback → forwarder →
    /// node link → forwarder → loopback → app). What the three process hops of any userspace
    /// relay cost on this topology, before any TLS or policy work.
    Forward,
}

impl Mode {
    /// Round order (A B C D E F G H I J K L).
    pub const ALL: [Mode; 12] = [
        Mode::Plaintext,
        Mode::InterceptorKtls,
        Mode::InterceptorRelay,
        Mode::HaproxyPair,
        Mode::InterceptorSkmsg,
        Mode::InterceptorRelayFull,
        Mode::InterceptorLocal,
        Mode::ZtunnelDefault,
        Mode::ZtunnelOneStream,
        Mode::InterceptorRelayBase,
        Mode::InterceptorLocalSkmsg,
        Mode::Forward,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Plaintext => "plaintext",
            Mode::InterceptorKtls => "interceptor-ktls",
            Mode::InterceptorRelay => "interceptor-relay",
            Mode::HaproxyPair => "haproxy-pair",
            Mode::InterceptorSkmsg => "interceptor-skmsg",
            Mode::InterceptorRelayFull => "interceptor-relay-full",
            Mode::InterceptorLocal => "interceptor-local",
            Mode::ZtunnelDefault => "ztunnel",
            Mode::ZtunnelOneStream => "ztunnel-1stream",
            Mode::InterceptorRelayBase => "interceptor-relay-base",
            Mode::InterceptorLocalSkmsg => "interceptor-local-skmsg",
            Mode::Forward => "forward",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "plaintext" | "plain" => Mode::Plaintext,
            "interceptor-ktls" | "ktls" => Mode::InterceptorKtls,
            "interceptor-relay" | "relay" | "userspace" => Mode::InterceptorRelay,
            "haproxy-pair" | "haproxy" | "sidecar" => Mode::HaproxyPair,
            "interceptor-skmsg" | "skmsg" | "sk-msg" => Mode::InterceptorSkmsg,
            "interceptor-relay-full" | "relay-full" | "no-resumption" => Mode::InterceptorRelayFull,
            "interceptor-local" | "local" | "same-node-fast-path" => Mode::InterceptorLocal,
            "ztunnel" | "ztunnel-default" => Mode::ZtunnelDefault,
            "ztunnel-1stream" | "ztunnel-1" => Mode::ZtunnelOneStream,
            "interceptor-relay-base" | "relay-base" | "baseline" => Mode::InterceptorRelayBase,
            "interceptor-local-skmsg" | "local-skmsg" => Mode::InterceptorLocalSkmsg,
            "forward" | "floor" => Mode::Forward,
            other => {
                bail!(
                    "unknown mode {other:?}: expected plaintext, ktls, relay, haproxy, skmsg, \
                     relay-full, local, local-skmsg, ztunnel, ztunnel-1stream, relay-base or forward"
                )
            }
        })
    }

    pub fn is_ztunnel(self) -> bool {
        matches!(self, Mode::ZtunnelDefault | Mode::ZtunnelOneStream)
    }

    pub fn is_interceptor(self) -> bool {
        matches!(
            self,
            Mode::InterceptorKtls
                | Mode::InterceptorRelay
                | Mode::InterceptorSkmsg
                | Mode::InterceptorRelayFull
                | Mode::InterceptorLocal
                | Mode::InterceptorRelayBase
                | Mode::InterceptorLocalSkmsg
        )
    }

    /// The same-node fast path, by either join.
    pub fn is_local(self) -> bool {
        matches!(self, Mode::InterceptorLocal | Mode::InterceptorLocalSkmsg)
    }

    /// Whether the mode means anything on `layout` (the fast path needs both pods on one
    /// agent).
    pub fn runs_on(self, layout: Layout) -> bool {
        !self.is_local() || layout == Layout::SameNode
    }
}

/// Where the harness finds its tools and puts its files.
#[derive(Debug, Clone)]
pub struct Env {
    pub agent_bin: Option<PathBuf>,
    /// A second agent build for the `relay-base` mode (`--baseline-agent`).
    pub baseline_agent_bin: Option<PathBuf>,
    /// `tuning.meshSpares` for `agent_bin` (see `--mesh-spares`).
    pub mesh_spares: u32,
    /// `tuning.workerThreads` for `agent_bin` (see `--worker-threads`).
    pub worker_threads: u16,
    /// `tuning.connectionKeys: derived` for `agent_bin` (see `--derived-keys`).
    pub derived_keys: bool,
    /// The same for the baseline agent (see `--baseline-derived-keys`).
    pub baseline_derived_keys: bool,
    /// `tuning.relayAppLeg: skMsg` for `agent_bin` (see `--app-leg-skmsg`).
    pub app_leg_skmsg: bool,
    /// `tuning.runtime: perThread` for `agent_bin` (see `--per-thread-runtime`).
    pub per_thread_runtime: bool,
    /// `tuning.runtime: perCpu` for `agent_bin` (see `--per-cpu-runtime`).
    pub per_cpu_runtime: bool,
    /// `tuning.schedSliceUs` for `agent_bin` when not 0 (see `--sched-slice-us`).
    pub sched_slice_us: u32,
    /// `tuning.relayBusyPollUs` for `agent_bin` when not 0 (see `--relay-busy-poll-us`).
    pub relay_busy_poll_us: u32,
    /// ztunnel, built outside this project (`--ztunnel` or `ZTUNNEL_BIN`).
    pub ztunnel_bin: Option<PathBuf>,
    pub bench_bin: PathBuf,
    pub work_dir: PathBuf,
    pub log_dir: PathBuf,
    pub pki: Pki,
    /// §9.3 "two one-core nodes": client pod (and its sidecar) on CPU 0, server pod on CPU 1.
    pub pin: bool,
}

impl Env {
    pub fn client_cpu(&self) -> topology::CpuSet {
        self.pin.then_some(0)
    }
    pub fn server_cpu(&self) -> topology::CpuSet {
        self.pin.then_some(1)
    }
}

/// Decides, before any round, whether a mode can run here at all. `Err` is the reason it
/// cannot, printed as "unavailable (...)" or "not runnable: ...": never a faked number.
pub fn availability(mode: Mode, env: &Env) -> Result<(), String> {
    match mode {
        // The forwarder is this binary's `forward` subcommand.
        Mode::Plaintext | Mode::Forward => Ok(()),
        Mode::HaproxyPair => which("haproxy").map(drop),
        Mode::ZtunnelDefault | Mode::ZtunnelOneStream => {
            crate::ztunnel::availability(env.ztunnel_bin.as_deref())
        }
        Mode::InterceptorRelayBase => match env.baseline_agent_bin.as_deref() {
            Some(bin) => agent_runnable(Some(bin)),
            None => Err("unavailable (no --baseline-agent)".to_owned()),
        },
        Mode::InterceptorKtls
        | Mode::InterceptorRelay
        | Mode::InterceptorSkmsg
        | Mode::InterceptorRelayFull
        | Mode::InterceptorLocal
        | Mode::InterceptorLocalSkmsg => {
            agent_runnable(env.agent_bin.as_deref())?;
            if mode == Mode::InterceptorKtls {
                let support = interceptor::ktls::probe();
                if !support.ulp {
                    return Err("unavailable (no tls ULP)".to_owned());
                }
                // Any suite the agent offers will do: a guest left with ChaCha20-Poly1305
                // alone (`cargo xtask bench --vm --kernel-aead chacha20-poly1305`) runs its
                // kTLS flows on it.
                let any = [
                    interceptor::ktls::Cipher::Aes128Gcm,
                    interceptor::ktls::Cipher::Aes256Gcm,
                    interceptor::ktls::Cipher::Chacha20Poly1305,
                ]
                .into_iter()
                .any(|c| support.supports(c));
                if !any {
                    return Err(format!(
                        "unavailable (kernel TLS takes none of the mesh suites: {})",
                        support.summary()
                    ));
                }
            }
            Ok(())
        }
    }
}

fn which(tool: &str) -> Result<PathBuf, String> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("not runnable: `{tool}` is not installed (cargo xtask setup)"))
}

/// The agent must exist and have the `run` subcommand (`interceptor run --config FILE`).
fn agent_runnable(bin: Option<&Path>) -> Result<(), String> {
    let Some(bin) = bin else {
        return Err("not runnable: no agent binary was given (--agent)".to_owned());
    };
    if !bin.is_file() {
        return Err(format!(
            "not runnable: agent binary {} does not exist",
            bin.display()
        ));
    }
    let out = Command::new(bin)
        .args(["run", "--help"])
        .output()
        .map_err(|e| format!("not runnable: cannot execute {}: {e}", bin.display()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let first = why.lines().next().unwrap_or("").trim();
        return Err(format!(
            "not runnable: `interceptor run` is not available in this build ({first})"
        ));
    }
    Ok(())
}

/// A mode that is up: its proxies run and the client knows where to connect.
#[derive(Debug)]
pub struct Active {
    pub mode: Mode,
    /// Address the client app dials for a server app port: the server pod's IP, or the local
    /// sidecar on 127.0.0.1.
    dial_ip: Ipv4Addr,
    /// The proxies whose CPU and memory are charged to the mode (agents or sidecars).
    pub proxies: Vec<Proc>,
    /// The agents' own cgroups (CPU from `cpu.stat`, which includes every thread).
    pub proxy_cgroups: Vec<Cgroup>,
    /// Pin directories the agents leave on bpffs: removed at teardown so the next mode's
    /// pods are not steered to an agent that no longer runs.
    bpffs_dirs: Vec<PathBuf>,
    /// Apps in the server pod (iperf3 ×4, sockperf, HTTP/echo server).
    servers: Vec<Proc>,
    /// What the server app must see as the peer of a connection from the client pod.
    expect_peer: IpAddr,
    /// The ztunnel modes' redirection and ZDS servers, removed after the proxies stop.
    ztunnel: Option<crate::ztunnel::Deployment>,
    /// The agents' admin sockets (the path check reads their flow tables).
    admin_sockets: Vec<PathBuf>,
}

impl Active {
    pub fn target(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.dial_ip, port))
    }

    pub fn proxy_pids(&self) -> Vec<u32> {
        self.proxies.iter().map(Proc::pid).collect()
    }

    /// Sum of the proxies' CPU seconds.
    pub fn proxy_cpu(&self) -> Result<f64> {
        procs::processes_cpu(&self.proxy_pids())
    }

    /// Stops proxies (gracefully, so agents unpin nothing they should keep) and servers, then
    /// removes the agents' pins.
    pub fn teardown(mut self) -> Result<()> {
        for p in &mut self.proxies {
            p.stop(Duration::from_secs(3));
        }
        self.proxies.clear();
        self.servers.clear();
        let mut problems = String::new();
        if let Some(mut z) = self.ztunnel.take()
            && let Err(e) = z.stop()
        {
            let _ = write!(problems, "{e:#}; ");
        }
        for dir in self.bpffs_dirs.drain(..) {
            if dir.exists()
                && let Err(e) = fs::remove_dir_all(&dir)
            {
                let _ = write!(problems, "remove {}: {e}; ", dir.display());
            }
        }
        if !problems.is_empty() {
            bail!("teardown: {problems}");
        }
        Ok(())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.proxies.clear();
        for dir in &self.bpffs_dirs {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Starts the server apps and the mode's proxies, then proves the path with one request.
pub fn start(mode: Mode, topo: &Topology, env: &Env, tag: &str) -> Result<Active> {
    let servers = start_servers(topo, env)?;
    let mut active = Active {
        mode,
        dial_ip: topo.server.ip,
        proxies: Vec::new(),
        proxy_cgroups: Vec::new(),
        bpffs_dirs: Vec::new(),
        servers,
        expect_peer: IpAddr::V4(topo.client.ip),
        ztunnel: None,
        admin_sockets: Vec::new(),
    };
    match mode {
        Mode::Plaintext => {}
        Mode::HaproxyPair => start_haproxy(&mut active, topo, env, tag)?,
        Mode::Forward => start_forwarders(&mut active, topo, env, tag)?,
        Mode::InterceptorKtls
        | Mode::InterceptorRelay
        | Mode::InterceptorSkmsg
        | Mode::InterceptorRelayFull
        | Mode::InterceptorLocal
        | Mode::InterceptorLocalSkmsg
        | Mode::InterceptorRelayBase => start_agents(&mut active, topo, env, tag)?,
        Mode::ZtunnelDefault | Mode::ZtunnelOneStream => {
            let bin = env.ztunnel_bin.as_deref().context("no ztunnel binary")?;
            active.expect_peer = IpAddr::V4(crate::ztunnel::expected_peer(topo));
            let sink = crate::ztunnel::Sink {
                procs: &mut active.proxies,
                cgroups: &mut active.proxy_cgroups,
            };
            let one_stream = mode == Mode::ZtunnelOneStream;
            active.ztunnel = Some(crate::ztunnel::start(
                bin, topo, env, tag, one_stream, sink,
            )?);
        }
    }
    verify_path(&mut active, topo, env)?;
    Ok(active)
}

/// Starts the server apps, retrying for a few seconds when one exits at once: a port can stay
/// busy briefly after the previous mode (sockets held by BPF maps are released from deferred
/// work after their pins go; seen in the VM after the sk_msg mode).
fn start_servers(topo: &Topology, env: &Env) -> Result<Vec<Proc>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match try_start_servers(topo, env) {
            Ok(servers) => return Ok(servers),
            Err(e) if Instant::now() < deadline => {
                procs::check_interrupted()?;
                eprintln!("  server apps did not start ({e:#}); retrying");
                procs::sleep(Duration::from_secs(1))?;
            }
            Err(e) => return Err(e),
        }
    }
}

fn try_start_servers(topo: &Topology, env: &Env) -> Result<Vec<Proc>> {
    let cpu = env.server_cpu();
    let mut out = Vec::new();
    for port in IPERF_PORTS {
        let mut cmd = topo.server.command("iperf3", cpu)?;
        cmd.args(["-s", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        out.push(Proc::spawn(&format!("iperf3 -s :{port}"), &mut cmd)?);
    }
    // SO_REUSEADDR (`--uc-reuseaddr`, which sockperf also applies to TCP): the previous
    // mode's agent leaves its accepted mesh sockets in TIME_WAIT with the app's address as
    // their local one (the agent takes inbound connections transparently, and closes first
    // when the client's side ended the flow), so a plain bind of this port fails for the
    // 60 s TIME_WAIT lasts; those sockets carry SO_REUSEADDR from the agent's listener, so
    // a listener that sets it too may bind. iperf3 and the bench's own servers set it already.
    let mut cmd = topo.server.command("sockperf", cpu)?;
    cmd.args([
        "server",
        "--tcp",
        "--uc-reuseaddr",
        "-i",
        "0.0.0.0",
        "-p",
        &SOCKPERF_PORT.to_string(),
    ]);
    out.push(Proc::spawn_logged(
        "sockperf server",
        &mut cmd,
        &env.log_dir.join("sockperf-server.log"),
    )?);
    let bench = env.bench_bin.to_string_lossy().into_owned();
    let mut cmd = topo.server.command(&bench, cpu)?;
    cmd.args([
        "serve",
        "--http",
        &format!("0.0.0.0:{HTTP_PORT}"),
        "--echo",
        &format!("0.0.0.0:{ECHO_PORT}"),
    ])
    .stdout(Stdio::null());
    out.push(Proc::spawn("http/echo server", &mut cmd)?);
    // Listening sockets appear within milliseconds; check that every process is still up.
    procs::sleep(Duration::from_millis(300))?;
    for p in &mut out {
        p.check_alive()?;
    }
    Ok(out)
}

/// Proves that a request from the client pod takes the mode's path: the server app sees
/// the client pod's IP (plaintext), 127.0.0.1 (its local sidecar) or 127.0.0.6 (the agent).
/// For kTLS, the server pod's `/proc/net/tls_stat` must count new kernel TLS sessions.
fn verify_path(active: &mut Active, topo: &Topology, env: &Env) -> Result<()> {
    if active.mode == Mode::InterceptorKtls {
        // tls_stat exists only with the tls module loaded; its absence fails the check below.
        let _ = topo.server.ns.proc_net("tls_stat");
    }
    let tls_before = tls_sessions(topo);
    let target = active.target(HTTP_PORT);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let mut cmd = topo
            .client
            .command(&env.bench_bin.to_string_lossy(), env.client_cpu())?;
        cmd.args([
            "http-get",
            "--target",
            &target.to_string(),
            "--path",
            "/peer",
        ]);
        match procs::run_bounded("path check", &mut cmd, Duration::from_secs(20)) {
            Ok(out) => break out.stdout,
            Err(e) if Instant::now() < deadline => {
                procs::check_interrupted()?;
                for p in &mut active.proxies {
                    p.check_alive()?;
                }
                let _ = e;
                procs::sleep(Duration::from_millis(200))?;
            }
            Err(e) => return Err(e.context(format!("{} path check", active.mode.label()))),
        }
    };
    let seen: IpAddr = body
        .trim()
        .strip_prefix("peer=")
        .and_then(|s| s.parse::<SocketAddr>().ok())
        .map(|s| s.ip())
        .with_context(|| format!("unexpected /peer answer {body:?}"))?;
    if seen != active.expect_peer {
        bail!(
            "{}: the server saw the connection from {seen}, expected {} — the traffic did not \
             take this mode's path",
            active.mode.label(),
            active.expect_peer
        );
    }
    if active.mode.is_ztunnel() {
        crate::ztunnel::check_hbone(topo)
            .with_context(|| format!("{} path check", active.mode.label()))?;
    }
    if active.mode.is_interceptor() {
        check_fast_path(active, env)?;
    }
    if active.mode == Mode::InterceptorKtls {
        let after = tls_sessions(topo);
        if after <= tls_before {
            bail!(
                "interceptor-ktls: /proc/net/tls_stat in the server pod shows no new kernel TLS \
                 session ({tls_before} → {after}); the agent did not use kTLS"
            );
        }
    }
    Ok(())
}

/// `TlsTxSw` (cumulative software kTLS TX sessions) in the server pod's namespace.
fn tls_sessions(topo: &Topology) -> u64 {
    topo.server
        .ns
        .proc_net("tls_stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TlsTxSw"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// HAProxy

/// TLS settings shared by both sidecars: TLS 1.3 only, one suite, mutual verification against
/// the mesh root. The server side pins X25519 (HAProxy 2.6 has no `curves` on server lines; the
/// server's choice decides the group). `no-ssl-reuse`: every connection is a full handshake,
/// as it is for the agent, which never resumes.
const TLS_COMMON: &str =
    "ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3 ciphersuites TLS_AES_128_GCM_SHA256";

fn haproxy_config(side: &str, pki: &Pki, server_ip: Ipv4Addr) -> String {
    let mut c = String::from(
        "global\n    nbthread 2\n    maxconn 5000\n    log stderr format short local0 err\n\n\
         defaults\n    mode tcp\n    maxconn 5000\n    timeout connect 5s\n    \
         timeout client 1h\n    timeout server 1h\n\n",
    );
    for port in APP_PORTS {
        let tls = port + SIDECAR_OFFSET;
        if side == "client" {
            let _ = write!(
                c,
                "frontend out_{port}\n    bind 127.0.0.1:{port}\n    default_backend up_{port}\n\
                 backend up_{port}\n    server s {server_ip}:{tls} ssl {TLS_COMMON} crt {crt} \
                 ca-file {ca} verify required no-ssl-reuse\n\n",
                crt = pki.client_pem.display(),
                ca = pki.ca_pem.display(),
            );
        } else {
            let _ = write!(
                c,
                "frontend in_{port}\n    bind {server_ip}:{tls} ssl crt {crt} ca-file {ca} \
                 verify required {TLS_COMMON} curves X25519\n    default_backend app_{port}\n\
                 backend app_{port}\n    server a 127.0.0.1:{port}\n\n",
                crt = pki.server_pem.display(),
                ca = pki.ca_pem.display(),
            );
        }
    }
    c
}

fn start_haproxy(active: &mut Active, topo: &Topology, env: &Env, tag: &str) -> Result<()> {
    active.dial_ip = Ipv4Addr::LOCALHOST;
    active.expect_peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    for (side, pod, cpu) in [
        ("server", &topo.server, env.server_cpu()),
        ("client", &topo.client, env.client_cpu()),
    ] {
        let cfg = env.work_dir.join(format!("haproxy-{side}.cfg"));
        fs::write(&cfg, haproxy_config(side, &env.pki, topo.server.ip))
            .with_context(|| format!("write {}", cfg.display()))?;
        let log = fs::File::create(env.log_dir.join(format!("haproxy-{side}-{tag}.log")))?;
        let mut cmd = pod.command("haproxy", cpu)?;
        cmd.arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log);
        let p = Proc::spawn(&format!("haproxy {side} sidecar"), &mut cmd)?;
        active.proxies.push(p);
    }
    procs::sleep(Duration::from_millis(300))?;
    for p in &mut active.proxies {
        p.check_alive()
            .with_context(|| format!("see {}", env.log_dir.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// forward: the three-leg floor

/// The forwarders' routes, (client pod's, server pod's): the client app dials its own
/// forwarder at 127.0.0.1:port (a loopback leg, as to the agent), which dials the server pod
/// at port + [`SIDECAR_OFFSET`] across the nodes' link, whose forwarder dials the app at
/// 127.0.0.1:port (a loopback leg, as from the agent). Addresses instead of redirection: the
/// agent steers by eBPF at connect and accept only, so no per-packet NAT on either side.
pub fn forward_routes(server_ip: Ipv4Addr) -> (Vec<Route>, Vec<Route>) {
    let lo = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let wire = |port: u16| SocketAddr::from((server_ip, port + SIDECAR_OFFSET));
    APP_PORTS
        .iter()
        .map(|&port| {
            (
                Route {
                    listen: lo(port),
                    target: wire(port),
                },
                Route {
                    listen: wire(port),
                    target: lo(port),
                },
            )
        })
        .unzip()
}

/// One forwarder per pod, each in a cgroup of its own (its CPU is the proxies' CPU, as an
/// agent's) and in its pod's namespace; the server side first, so the client's first dial
/// finds it.
fn start_forwarders(active: &mut Active, topo: &Topology, env: &Env, tag: &str) -> Result<()> {
    active.dial_ip = Ipv4Addr::LOCALHOST;
    active.expect_peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (client_routes, server_routes) = forward_routes(topo.server.ip);
    for (side, pod, routes, cpu) in [
        ("server", &topo.server, server_routes, env.server_cpu()),
        ("client", &topo.client, client_routes, env.client_cpu()),
    ] {
        let cgroup = Cgroup::new(&format!("forward-{side}-"))?;
        let log = fs::File::create(env.log_dir.join(format!("forward-{side}-{tag}.log")))?;
        let mut cmd = Command::new(&env.bench_bin);
        cmd.arg("forward");
        for r in &routes {
            cmd.arg("--route").arg(r.to_string());
        }
        cmd.stdout(Stdio::null()).stderr(log);
        topology::enter(&mut cmd, Some(&cgroup.path), Some(&pod.ns.path()), cpu)?;
        let p = Proc::spawn(&format!("forwarder in pod {}", pod.name), &mut cmd)?;
        active.proxies.push(p);
        active.proxy_cgroups.push(cgroup);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !routes.iter().all(|r| {
            crate::ztunnel::sockets_on(pod, r.listen.port(), false)
                .iter()
                .any(|s| s == "0A")
        }) {
            for p in &mut active.proxies {
                p.check_alive()
                    .with_context(|| format!("see {}", env.log_dir.display()))?;
            }
            if Instant::now() > deadline {
                bail!(
                    "the forwarder in pod {} did not listen within 20 s",
                    pod.name
                );
            }
            procs::sleep(Duration::from_millis(50))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// interceptor agent

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentConfig {
    trust_domain: &'static str,
    ca_dir: PathBuf,
    state_dir: PathBuf,
    admin_socket: PathBuf,
    ktls: &'static str,
    bpffs: PathBuf,
    workloads: Vec<WorkloadCfg>,
    peers: Vec<PeerCfg>,
    tuning: TuningCfg,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadCfg {
    name: String,
    namespace: &'static str,
    service_account: &'static str,
    cgroup: PathBuf,
    netns: PathBuf,
    ips: Vec<IpAddr>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PeerCfg {
    namespace: &'static str,
    service_account: &'static str,
    ips: Vec<IpAddr>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TuningCfg {
    sk_msg_local_leg: bool,
    session_resumption: bool,
    same_node_fast_path: bool,
    same_node_join: &'static str,
    /// Room for the `scale` workload's 10 000 idle connections from one pod.
    max_connections_per_pod: u32,
    outbound_port: u16,
    inbound_port: u16,
    handshake_timeout_ms: u64,
    first_byte_wait_ms: u64,
    idle_timeout_secs: u64,
    /// Left out for the baseline agent, which may not know it (unknown fields are errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_spares: Option<u32>,
    /// Left out for the baseline agent, like `mesh_spares`.
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_threads: Option<u16>,
    /// Left out for the baseline agent, like `mesh_spares`.
    #[serde(skip_serializing_if = "Option::is_none")]
    connection_keys: Option<&'static str>,
    /// Left out for the baseline agent, like `mesh_spares`.
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_app_leg: Option<&'static str>,
    /// Left out for the baseline agent, like `mesh_spares`.
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<&'static str>,
    /// Left out for the baseline agent, like `mesh_spares`.
    #[serde(skip_serializing_if = "Option::is_none")]
    sched_slice_us: Option<u32>,
    /// Left out for the baseline agent, like `mesh_spares`.
    #[serde(skip_serializing_if = "Option::is_none")]
    relay_busy_poll_us: Option<u32>,
}

fn workload(pod: &topology::Pod, sa: &'static str) -> WorkloadCfg {
    WorkloadCfg {
        name: format!("bench-{}", pod.name),
        namespace: pki::NAMESPACE,
        service_account: sa,
        cgroup: pod.cgroup.path.clone(),
        netns: pod.ns.path(),
        ips: vec![IpAddr::V4(pod.ip)],
    }
}

fn peer(pod: &topology::Pod, sa: &'static str) -> PeerCfg {
    PeerCfg {
        namespace: pki::NAMESPACE,
        service_account: sa,
        ips: vec![IpAddr::V4(pod.ip)],
    }
}

fn start_agents(active: &mut Active, topo: &Topology, env: &Env, tag: &str) -> Result<()> {
    let agent = if active.mode == Mode::InterceptorRelayBase {
        env.baseline_agent_bin.as_deref()
    } else {
        env.agent_bin.as_deref()
    }
    .context("no agent binary")?;
    active.expect_peer = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
    let ktls = match active.mode {
        // `required`: a kernel that cannot take the keys fails the start instead of
        // silently measuring the userspace relay under the kTLS label.
        Mode::InterceptorKtls => "required",
        // The option on top of the node's default data path: kTLS where the kernel has it
        // (the VM), the userspace relay where it does not (this host).
        Mode::InterceptorSkmsg => "auto",
        _ => "off",
    };
    let client = || {
        (
            workload(&topo.client, pki::CLIENT_SA),
            peer(&topo.client, pki::CLIENT_SA),
        )
    };
    let server = || {
        (
            workload(&topo.server, pki::SERVER_SA),
            peer(&topo.server, pki::SERVER_SA),
        )
    };
    // (node namespace, enrolled workloads, peers on other nodes)
    let plans: Vec<(PathBuf, Vec<WorkloadCfg>, Vec<PeerCfg>)> = match topo.layout {
        Layout::SameNode => vec![(
            topo.nodes[0].ns.path(),
            vec![client().0, server().0],
            vec![],
        )],
        Layout::CrossNode => vec![
            (topo.nodes[0].ns.path(), vec![client().0], vec![server().1]),
            (
                topo.node_of_server().ns.path(),
                vec![server().0],
                vec![client().1],
            ),
        ],
    };
    for (i, (node_ns, workloads, peers)) in plans.into_iter().enumerate() {
        let dir = env.work_dir.join(format!("agent{i}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let bpffs = PathBuf::from("/sys/fs/bpf").join(topology::unique_bpffs_name("agent"));
        active.bpffs_dirs.push(bpffs.clone());
        let cfg = AgentConfig {
            trust_domain: pki::TRUST_DOMAIN,
            ca_dir: env.pki.ca_dir.clone(),
            state_dir: dir.join("state"),
            admin_socket: dir.join("admin.sock"),
            ktls,
            bpffs,
            workloads,
            peers,
            tuning: TuningCfg {
                sk_msg_local_leg: active.mode == Mode::InterceptorSkmsg,
                session_resumption: active.mode != Mode::InterceptorRelayFull,
                same_node_fast_path: active.mode.is_local(),
                same_node_join: if active.mode == Mode::InterceptorLocalSkmsg {
                    "skMsg"
                } else {
                    "splice"
                },
                max_connections_per_pod: 16_384,
                // Not the agent's defaults (15001/15006): those are ztunnel's fixed in-pod
                // ports, and the agent's TIME_WAIT sockets on them (left by a churn run in
                // the same pods) make ztunnel's bind fail with EADDRINUSE for 60 s.
                outbound_port: 15011,
                inbound_port: 15016,
                handshake_timeout_ms: 5_000,
                first_byte_wait_ms: 200,
                idle_timeout_secs: 3_600,
                mesh_spares: (active.mode != Mode::InterceptorRelayBase && env.mesh_spares > 0)
                    .then_some(env.mesh_spares),
                worker_threads: (active.mode != Mode::InterceptorRelayBase
                    && env.worker_threads > 0)
                    .then_some(env.worker_threads),
                connection_keys: if active.mode == Mode::InterceptorRelayBase {
                    env.baseline_derived_keys
                } else {
                    env.derived_keys
                }
                .then_some("derived"),
                relay_app_leg: (active.mode != Mode::InterceptorRelayBase && env.app_leg_skmsg)
                    .then_some("skMsg"),
                runtime: if active.mode == Mode::InterceptorRelayBase {
                    None
                } else if env.per_cpu_runtime {
                    Some("perCpu")
                } else {
                    env.per_thread_runtime.then_some("perThread")
                },
                sched_slice_us: (active.mode != Mode::InterceptorRelayBase
                    && env.sched_slice_us > 0)
                    .then_some(env.sched_slice_us),
                relay_busy_poll_us: (active.mode != Mode::InterceptorRelayBase
                    && env.relay_busy_poll_us > 0)
                    .then_some(env.relay_busy_poll_us),
            },
        };
        // JSON is YAML, and serde_json is already here.
        let cfg_path = dir.join("node.yaml");
        fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?)?;
        let cgroup = Cgroup::new(&format!("agent{i}-"))?;
        let log = fs::File::create(env.log_dir.join(format!("agent{i}-{tag}.log")))?;
        let mut cmd = Command::new(agent);
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .env("INTERCEPTOR_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        topology::enter(&mut cmd, Some(&cgroup.path), Some(&node_ns), None)?;
        let proc = Proc::spawn(&format!("interceptor agent {i}"), &mut cmd)?;
        active.proxies.push(proc);
        active.proxy_cgroups.push(cgroup);
        wait_ready(&cfg.admin_socket, active, env)?;
        active.admin_sockets.push(cfg.admin_socket);
    }
    Ok(())
}

/// Whether the agents listed the path check's flow as same-node (`protection: local`): the
/// fast path mode must, every other mode must not (or its same-node numbers would not be
/// mesh mTLS).
fn check_fast_path(active: &Active, env: &Env) -> Result<()> {
    let agent = env.agent_bin.as_deref().context("no agent binary")?;
    let mut local = false;
    for socket in &active.admin_sockets {
        let mut cmd = Command::new(agent);
        cmd.args(["flows", "--json", "--all", "--admin-socket"])
            .arg(socket);
        let out = procs::run_bounded("flows --json", &mut cmd, Duration::from_secs(10))?;
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&out.stdout).context("flows --json")?;
        local |= rows.iter().any(|r| r["protection"] == "local");
    }
    let want = active.mode.is_local();
    if local != want {
        bail!(
            "{}: the agent {} the path check's flow as same-node fast path",
            active.mode.label(),
            if local { "listed" } else { "did not list" }
        );
    }
    Ok(())
}

/// The agent binds its admin socket last, after enrolling every pod. Generous: an agent run
/// under a profiler (`--churn-count`) starts tens of times slower; a dead one fails at once.
fn wait_ready(socket: &Path, active: &mut Active, env: &Env) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !socket.exists() {
        for p in &mut active.proxies {
            p.check_alive()
                .with_context(|| format!("agent log in {}", env.log_dir.display()))?;
        }
        if Instant::now() > deadline {
            bail!("the agent did not create {} within 120 s", socket.display());
        }
        procs::sleep(Duration::from_millis(50))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_is_a_mode_of_its_own() {
        assert_eq!(Mode::parse("forward").unwrap(), Mode::Forward);
        assert_eq!(Mode::parse("floor").unwrap(), Mode::Forward);
        assert_eq!(Mode::Forward.label(), "forward");
        assert!(Mode::ALL.contains(&Mode::Forward));
        // Not one of ours: no ÷ HAProxy / ÷ ztunnel columns as if it were the agent, and no
        // agent flow table to read in the path check.
        assert!(!Mode::Forward.is_interceptor());
        assert!(!Mode::Forward.is_ztunnel());
        assert!(Mode::Forward.runs_on(Layout::CrossNode));
        assert!(Mode::Forward.runs_on(Layout::SameNode));
        let e = Mode::parse("forwarder").unwrap_err();
        assert!(format!("{e}").contains("forward"), "{e}");
        // The label round-trips through the report's JSON.
        let json = serde_json::to_string(&Mode::Forward).unwrap();
        assert_eq!(json, "\"forward\"");
        assert_eq!(serde_json::from_str::<Mode>(&json).unwrap(), Mode::Forward);
    }

    /// Every app port has a chain client loopback → server pod → server loopback, so the
    /// legs are the relay's: two loopback legs and one across the node link.
    #[test]
    fn forward_routes_chain_each_app_port_over_three_legs() {
        let server = Ipv4Addr::new(10, 88, 2, 3);
        let (client, srv) = forward_routes(server);
        assert_eq!(client.len(), APP_PORTS.len());
        assert_eq!(srv.len(), APP_PORTS.len());
        for port in APP_PORTS {
            let c = client
                .iter()
                .find(|r| r.listen == SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
                .unwrap_or_else(|| panic!("no client route for {port}"));
            assert_eq!(c.target.ip(), IpAddr::V4(server));
            let s = srv
                .iter()
                .find(|r| r.listen == c.target)
                .unwrap_or_else(|| panic!("nothing listens on {}", c.target));
            assert_eq!(s.target, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
        }
        // No wire port collides with an app port the server pod's apps listen on.
        for r in &srv {
            assert!(!APP_PORTS.contains(&r.listen.port()), "{r}");
        }
    }
}
