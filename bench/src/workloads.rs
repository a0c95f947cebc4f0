//! The workloads every mode runs in every round, and the CPU/memory accounting around them.
//!
//! Each workload is an external process started inside the client pod (its cgroup and netns,
//! so the agent's eBPF programs see it as the pod's traffic), bounded in time, with
//! system-wide CPU (`/proc/stat`) and the proxies' CPU (agent cgroup `cpu.stat`, or
//! `/proc/<pid>/stat` of each sidecar) read around it.

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{
    apps::{ChurnReport, ECHO_PORT, HTTP_PORT, LoadReport},
    modes::{Active, Env, IPERF_PORTS, SOCKPERF_PORT},
    procs::{self, Proc, SystemCpu},
    topology::Topology,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    Iperf1,
    Iperf4,
    Rr64,
    Rr1k,
    Http,
    Churn,
    /// The churn workload with 2 client threads (opt-in): the setup rate when the proxies,
    /// not one client's round trips, are the limit.
    Churn2,
    Idle,
    /// Sustained churn (opt-in, minutes long): not in [`Workload::ALL`].
    Sustained,
    /// Scaling curves (opt-in): bulk with 1/16/256 concurrent flows, 1 000 and 10 000 idle
    /// connections, setup rate at 1 and 2 client threads.
    Scale,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Iperf1,
        Workload::Iperf4,
        Workload::Rr64,
        Workload::Rr1k,
        Workload::Http,
        Workload::Churn,
        Workload::Idle,
    ];

    /// Every workload `--workloads` accepts: [`Workload::ALL`] (the default set) and the
    /// long ones that run only when named.
    pub const KNOWN: [Workload; 10] = [
        Workload::Iperf1,
        Workload::Iperf4,
        Workload::Rr64,
        Workload::Rr1k,
        Workload::Http,
        Workload::Churn,
        Workload::Churn2,
        Workload::Idle,
        Workload::Sustained,
        Workload::Scale,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Workload::Iperf1 => "iperf1",
            Workload::Iperf4 => "iperf4",
            Workload::Rr64 => "rr64",
            Workload::Rr1k => "rr1k",
            Workload::Http => "http",
            Workload::Churn => "churn",
            Workload::Churn2 => "churn2",
            Workload::Idle => "idle",
            Workload::Sustained => "sustained",
            Workload::Scale => "scale",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Workload::KNOWN
            .into_iter()
            .find(|w| w.label() == s)
            .with_context(|| {
                format!(
                    "unknown workload {s:?}: expected iperf1 iperf4 rr64 rr1k http churn idle \
                     churn2 sustained scale"
                )
            })
    }
}

/// Durations and sizes; `--quick` and the VM shrink them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub iperf_secs: u64,
    pub rr_secs: u64,
    pub http_secs: f64,
    pub http_warmup_secs: f64,
    pub http_rate: f64,
    pub http_conns: usize,
    pub churn_secs: f64,
    /// churn and churn2 stop after this many connections per client thread instead of at
    /// `churn_secs` (`--churn-count`): the same work in every mode, for profiling.
    #[serde(default)]
    pub churn_count: Option<u64>,
    pub idle_flows: usize,
    /// Sustained churn: seconds per client-thread count, and the window the rate is
    /// reported in.
    #[serde(default)]
    pub sustained_secs: f64,
    #[serde(default)]
    pub sustained_window_secs: f64,
    /// Sustained churn at this offered rate (conn/s) instead of closed-loop
    /// (`--sustained-rate`).
    #[serde(default)]
    pub sustained_rate: Option<f64>,
}

impl Params {
    pub fn full() -> Self {
        Self {
            iperf_secs: 10,
            rr_secs: 5,
            http_secs: 10.0,
            http_warmup_secs: 1.0,
            http_rate: 1000.0,
            http_conns: 16,
            churn_secs: 5.0,
            churn_count: None,
            idle_flows: 1000,
            sustained_secs: 120.0,
            sustained_window_secs: 10.0,
            sustained_rate: None,
        }
    }

    pub fn quick() -> Self {
        Self {
            iperf_secs: 3,
            rr_secs: 2,
            http_secs: 3.0,
            http_warmup_secs: 0.5,
            http_rate: 1000.0,
            http_conns: 16,
            churn_secs: 2.0,
            churn_count: None,
            idle_flows: 1000,
            sustained_secs: 20.0,
            sustained_window_secs: 5.0,
            sustained_rate: None,
        }
    }

    /// The warm-up pass before round 1: every path touched once, nothing recorded.
    pub fn warmup(&self) -> Self {
        Self {
            iperf_secs: 1,
            rr_secs: 1,
            http_secs: 1.0,
            http_warmup_secs: 0.2,
            churn_secs: 0.5,
            churn_count: None,
            idle_flows: self.idle_flows.min(50),
            sustained_secs: 2.0,
            sustained_window_secs: 1.0,
            ..self.clone()
        }
    }
}

/// One measured value.
pub type Metric = (&'static str, f64);

/// Runs one workload against an active mode and returns its metrics.
pub fn run(
    w: Workload,
    topo: &Topology,
    active: &Active,
    env: &Env,
    p: &Params,
) -> Result<Vec<Metric>> {
    match w {
        Workload::Iperf1 => iperf(topo, active, env, p, 1),
        Workload::Iperf4 => iperf(topo, active, env, p, 4),
        Workload::Rr64 => sockperf(topo, active, env, p, 64),
        Workload::Rr1k => sockperf(topo, active, env, p, 1024),
        Workload::Http => http(topo, active, env, p),
        Workload::Churn => churn(topo, active, env, p, 1),
        Workload::Churn2 => churn(topo, active, env, p, 2),
        Workload::Idle => idle(topo, active, env, p),
        Workload::Sustained => sustained(topo, active, env, p),
        Workload::Scale => scale(topo, active, env, p),
    }
}

/// CPU snapshot around a workload.
struct CpuWindow {
    start: Instant,
    system: SystemCpu,
    proxy: f64,
    attributed: f64,
}

/// CPU seconds over one workload.
struct Cpu {
    wall: f64,
    /// System-wide busy time (`/proc/stat`): includes softirq work no process is charged for,
    /// and anything else running on the machine.
    busy: f64,
    /// The proxies (agents or sidecars) alone.
    proxy: f64,
    /// Both pods' cgroups plus the agents' cgroups: the apps and the proxies, nothing else on
    /// the machine. On a shared machine this is the figure to trust for comparisons.
    attributed: f64,
}

impl CpuWindow {
    fn open(topo: &Topology, active: &Active) -> Result<Self> {
        Ok(Self {
            start: Instant::now(),
            system: SystemCpu::read()?,
            proxy: proxy_cpu(active)?,
            attributed: attributed_cpu(topo, active)?,
        })
    }

    fn close(self, topo: &Topology, active: &Active) -> Result<Cpu> {
        let system = SystemCpu::read()?.since(&self.system);
        Ok(Cpu {
            wall: self.start.elapsed().as_secs_f64(),
            busy: system.busy,
            proxy: proxy_cpu(active)? - self.proxy,
            attributed: attributed_cpu(topo, active)? - self.attributed,
        })
    }
}

/// Pod cgroups (apps, and sidecars, which live in their pods) plus agent cgroups.
fn attributed_cpu(topo: &Topology, active: &Active) -> Result<f64> {
    let mut usec = topo.client.cgroup.cpu_usec()? + topo.server.cgroup.cpu_usec()?;
    for c in &active.proxy_cgroups {
        usec += c.cpu_usec()?;
    }
    Ok(usec as f64 / 1e6)
}

/// Agents: their cgroup's `cpu.stat` (every thread and child); sidecars: `/proc/<pid>/stat`.
fn proxy_cpu(active: &Active) -> Result<f64> {
    if active.proxy_cgroups.is_empty() {
        return active.proxy_cpu();
    }
    let mut usec = 0u64;
    for c in &active.proxy_cgroups {
        usec += c.cpu_usec()?;
    }
    Ok(usec as f64 / 1e6)
}

fn has_proxy(active: &Active) -> bool {
    !active.proxies.is_empty()
}

fn iperf(
    topo: &Topology,
    active: &Active,
    env: &Env,
    p: &Params,
    streams: usize,
) -> Result<Vec<Metric>> {
    let (sum, cpu) = iperf_clients(topo, active, env, p, streams, None, 30)?;
    let IperfSum {
        bytes,
        secs,
        retrans,
    } = sum;
    let gb = (bytes / 1e9).max(1e-12);
    let mut m = vec![
        ("mb_s", bytes / secs.max(1e-9) / 1e6),
        ("cpu_s_per_gb", cpu.attributed / gb),
        ("busy_cpu_s_per_gb", cpu.busy / gb),
        ("tcp_retransmits", retrans),
    ];
    if has_proxy(active) {
        m.push(("proxy_cpu_s_per_gb", cpu.proxy / gb));
    }
    Ok(m)
}

/// What a set of iperf3 clients reported, summed.
struct IperfSum {
    bytes: f64,
    /// The longest client's.
    secs: f64,
    retrans: f64,
}

/// Runs `clients` iperf3 clients at once (one per server port; with `streams`, that many
/// streams each) for `p.iperf_secs` inside one CPU window, and sums their reports. Every
/// client is waited for (each bounded by three times its run plus `slack_secs`) before the
/// first failure is returned.
fn iperf_clients(
    topo: &Topology,
    active: &Active,
    env: &Env,
    p: &Params,
    clients: usize,
    streams: Option<usize>,
    slack_secs: u64,
) -> Result<(IperfSum, Cpu)> {
    let mut children = Vec::new();
    let win = CpuWindow::open(topo, active)?;
    for port in IPERF_PORTS.iter().take(clients) {
        let target = active.target(*port);
        let mut cmd = topo.client.command("iperf3", env.client_cpu())?;
        cmd.args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &port.to_string(),
            "-t",
            &p.iperf_secs.to_string(),
        ]);
        if let Some(n) = streams {
            cmd.args(["-P", &n.to_string()]);
        }
        cmd.arg("-J");
        let timeout = Duration::from_secs(p.iperf_secs * 3 + slack_secs);
        children.push(thread::spawn(move || {
            procs::run_bounded("iperf3", &mut cmd, timeout)
        }));
    }
    let mut sum = IperfSum {
        bytes: 0.0,
        secs: 0.0,
        retrans: 0.0,
    };
    let mut first_err = None;
    for c in children {
        match c.join() {
            Ok(Ok(out)) => match parse_iperf(&out.stdout) {
                Ok((b, s, r)) => {
                    sum.bytes += b;
                    sum.secs = sum.secs.max(s);
                    sum.retrans += r;
                }
                Err(e) => first_err = first_err.or(Some(e)),
            },
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(anyhow::anyhow!("iperf3 thread panicked"))),
        }
    }
    let cpu = win.close(topo, active)?;
    match first_err {
        Some(e) => Err(e),
        None => Ok((sum, cpu)),
    }
}

/// (bytes received, seconds, retransmits) from `iperf3 -J`.
fn parse_iperf(json: &str) -> Result<(f64, f64, f64)> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 -J output")?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {err}");
    }
    let end = &v["end"];
    let bytes = end["sum_received"]["bytes"]
        .as_f64()
        .context("iperf3: no end.sum_received.bytes")?;
    let secs = end["sum_received"]["seconds"]
        .as_f64()
        .context("iperf3: no end.sum_received.seconds")?;
    let retrans = end["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0);
    Ok((bytes, secs, retrans))
}

/// Round trips per block for `p99_block_median_us`: a block's p99 is its 10th slowest.
const RR_BLOCK: usize = 1000;

/// Fewer round trips than this in the measured part of a run make its p99 rest on fewer than
/// ten samples: the run is reported as failed rather than as a number.
const RR_MIN_SAMPLES: usize = 1000;

fn sockperf(
    topo: &Topology,
    active: &Active,
    env: &Env,
    p: &Params,
    size: usize,
) -> Result<Vec<Metric>> {
    let target = active.target(SOCKPERF_PORT);
    // Every round trip of the measured part (sockperf leaves out its warm-up and the end).
    let log = env.work_dir.join(format!("sockperf-{size}.csv"));
    let _ = std::fs::remove_file(&log);
    let mut cmd = topo.client.command("sockperf", env.client_cpu())?;
    cmd.args([
        "ping-pong",
        "--tcp",
        "-i",
        &target.ip().to_string(),
        "-p",
        &SOCKPERF_PORT.to_string(),
        "-m",
        &size.to_string(),
        "-t",
        &p.rr_secs.to_string(),
        "--full-rtt",
        "--full-log",
    ])
    .arg(&log);
    let counts = RoundTripCounts::open(topo, active)?;
    procs::run_bounded(
        "sockperf",
        &mut cmd,
        Duration::from_secs(p.rr_secs * 3 + 30),
    )?;
    let counts = counts.close(topo, active)?;
    let text = std::fs::read_to_string(&log)
        .with_context(|| format!("sockperf wrote no log {}", log.display()))?;
    let _ = std::fs::remove_file(&log);
    let rtts = round_trips(&text)?;
    if rtts.len() < RR_MIN_SAMPLES {
        bail!(
            "sockperf measured {} round trips, fewer than the {RR_MIN_SAMPLES} a p99 needs",
            rtts.len()
        );
    }
    let mut m = rr_metrics(&rtts);
    m.extend(counts.per_round_trip(rtts.len() as f64, has_proxy(active)));
    Ok(m)
}

/// What one sockperf run cost, for per-round-trip counts: CPU, the proxies' context
/// switches, NET_RX softirqs. Divided by the logged round trips, which leave out sockperf's
/// warm-up (~0.4 s of the run), so every figure is a few per cent high, the same for every
/// mode of a run.
struct RoundTripCounts {
    cpu: CpuWindow,
    switches: u64,
    softirqs: u64,
}

struct RoundTripTotals {
    cpu: Cpu,
    switches: u64,
    softirqs: u64,
}

impl RoundTripCounts {
    fn open(topo: &Topology, active: &Active) -> Result<Self> {
        Ok(Self {
            cpu: CpuWindow::open(topo, active)?,
            switches: procs::processes_context_switches(&active.proxy_pids())?,
            softirqs: procs::net_rx_softirqs()?,
        })
    }

    fn close(self, topo: &Topology, active: &Active) -> Result<RoundTripTotals> {
        Ok(RoundTripTotals {
            cpu: self.cpu.close(topo, active)?,
            switches: procs::processes_context_switches(&active.proxy_pids())?
                .saturating_sub(self.switches),
            softirqs: procs::net_rx_softirqs()?.saturating_sub(self.softirqs),
        })
    }
}

impl RoundTripTotals {
    fn per_round_trip(&self, round_trips: f64, proxy: bool) -> Vec<Metric> {
        let n = round_trips.max(1.0);
        let mut m = vec![
            ("cpu_us_per_rt", self.cpu.attributed * 1e6 / n),
            ("net_rx_softirqs_per_rt", self.softirqs as f64 / n),
        ];
        if proxy {
            m.push(("proxy_cpu_us_per_rt", self.cpu.proxy * 1e6 / n));
            m.push(("proxy_switches_per_rt", self.switches as f64 / n));
        }
        m
    }
}

/// The round-trip times (µs) of a sockperf `--full-log`, in the order they were sent: lines
/// `packet, txTime(sec), rxTime(sec), rtt(usec)` after the summary it starts with.
fn round_trips(log: &str) -> Result<Vec<f64>> {
    let mut rtts = Vec::new();
    let mut header = false;
    for line in log.lines() {
        if !header {
            header = line.starts_with("packet,");
            continue;
        }
        let Some(rtt) = line.rsplit(',').next().and_then(|v| v.trim().parse().ok()) else {
            // The closing rule, or a line this parser does not know: the samples end there.
            break;
        };
        rtts.push(rtt);
    }
    if !header {
        bail!("sockperf's log has no sample header (`packet, txTime(sec), …`)");
    }
    Ok(rtts)
}

/// p50/p99/p99.9 over the whole run, and the median over consecutive blocks of [`RR_BLOCK`]
/// round trips of each block's p99. On a machine others share, one burst of foreign load
/// decides the whole run's p99 (a few hundred slow round trips among 30 000 are enough), so
/// it swings tenfold between rounds; the block median moves only when most of the run was
/// slow, which is the proxy's own tail rather than the neighbours'.
fn rr_metrics(rtts: &[f64]) -> Vec<Metric> {
    let mut sorted = rtts.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut blocks: Vec<f64> = rtts
        .chunks(RR_BLOCK)
        .filter(|b| b.len() == RR_BLOCK)
        .map(|b| {
            let mut b = b.to_vec();
            b.sort_by(f64::total_cmp);
            nearest_rank(&b, 0.99)
        })
        .collect();
    blocks.sort_by(f64::total_cmp);
    let mut m = vec![
        ("p50_us", nearest_rank(&sorted, 0.5)),
        ("p99_us", nearest_rank(&sorted, 0.99)),
        ("p999_us", nearest_rank(&sorted, 0.999)),
        ("round_trips", rtts.len() as f64),
    ];
    if blocks.len() >= 3 {
        m.push(("p99_block_median_us", nearest_rank(&blocks, 0.5)));
    }
    m
}

/// The `q` quantile of sorted values by nearest rank (what sockperf prints).
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn bench_in_client(topo: &Topology, env: &Env) -> Result<std::process::Command> {
    topo.client
        .command(&env.bench_bin.to_string_lossy(), env.client_cpu())
}

fn http(topo: &Topology, active: &Active, env: &Env, p: &Params) -> Result<Vec<Metric>> {
    let mut cmd = bench_in_client(topo, env)?;
    cmd.args([
        "http-load",
        "--target",
        &active.target(HTTP_PORT).to_string(),
        "--rate",
        &p.http_rate.to_string(),
        "--conns",
        &p.http_conns.to_string(),
        "--duration",
        &p.http_secs.to_string(),
        "--warmup",
        &p.http_warmup_secs.to_string(),
    ]);
    let (r, cpu): (LoadReport, Cpu) = measured(
        topo,
        active,
        "http-load",
        &mut cmd,
        Duration::from_secs_f64((p.http_secs + p.http_warmup_secs) * 3.0 + 30.0),
    )?;
    // The offered rate holds for the whole invocation (warm-up included), so CPU over the
    // whole window divided by that rate is the cost per 1000 rps.
    let krps = p.http_rate / 1000.0;
    let mut m = vec![
        ("p50_us", r.latency.p50_us),
        ("p90_us", r.latency.p90_us),
        ("p99_us", r.latency.p99_us),
        ("achieved_rps", r.achieved_rps),
        ("errors", r.errors as f64),
        ("vcpu_per_krps", cpu.attributed / cpu.wall / krps),
        ("sender_lateness_p99_us", r.send_lateness_p99_us),
    ];
    if has_proxy(active) {
        m.push(("proxy_vcpu_per_krps", cpu.proxy / cpu.wall / krps));
    }
    Ok(m)
}

/// Runs the client pod's bench command `cmd` (`what` names it) inside a CPU window, bounded
/// by `limit`, and parses the JSON report it prints.
fn measured<T: serde::de::DeserializeOwned>(
    topo: &Topology,
    active: &Active,
    what: &str,
    cmd: &mut std::process::Command,
    limit: Duration,
) -> Result<(T, Cpu)> {
    let win = CpuWindow::open(topo, active)?;
    let out = procs::run_bounded(what, cmd, limit)?;
    let cpu = win.close(topo, active)?;
    let report = serde_json::from_str(&out.stdout).with_context(|| format!("{what} output"))?;
    Ok((report, cpu))
}

fn churn(
    topo: &Topology,
    active: &Active,
    env: &Env,
    p: &Params,
    threads: usize,
) -> Result<Vec<Metric>> {
    // A fixed count may run under a profiler, many times slower: a generous cap instead.
    let secs = match p.churn_count {
        Some(_) => p.churn_secs.max(600.0),
        None => p.churn_secs,
    };
    let mut cmd = bench_in_client(topo, env)?;
    cmd.args([
        "churn",
        "--target",
        &active.target(HTTP_PORT).to_string(),
        "--duration",
        &secs.to_string(),
        "--threads",
        &threads.to_string(),
    ]);
    if let Some(c) = p.churn_count {
        cmd.args(["--count", &c.to_string()]);
    }
    let (r, cpu): (ChurnReport, Cpu) = measured(
        topo,
        active,
        "churn",
        &mut cmd,
        Duration::from_secs_f64(secs * 3.0 + 30.0),
    )?;
    let n = (r.connections as f64).max(1.0);
    let mut m = vec![
        ("conn_per_s", r.conn_per_s),
        ("p50_us", r.first_byte.p50_us),
        ("p99_us", r.first_byte.p99_us),
        ("errors", r.errors as f64),
        ("cpu_ms_per_conn", cpu.attributed * 1000.0 / n),
    ];
    if has_proxy(active) {
        m.push(("proxy_cpu_ms_per_conn", cpu.proxy * 1000.0 / n));
        // Both ends' handshakes (client and server side) are in the proxies' CPU, so this is
        // full mTLS connection setups per proxy CPU-second.
        m.push(("setups_per_proxy_core_s", n / cpu.proxy.max(1e-9)));
    }
    Ok(m)
}

/// Sustained churn to one app port (the echo server; the client closes first): 1 client
/// thread for `sustained_secs`, then 2 threads as long, on the same topology without a
/// pause, so the second phase starts with the first one's TIME_WAIT sockets. Reports the
/// rate of every window, first and last window and their ratio (the target: last ≥ 0.9×
/// first), and the TIME_WAIT sockets each pod holds at the end of each phase.
///
/// Both pods run with a pod's default `tcp_tw_reuse` (2: loopback only) and ephemeral range
/// for the workload, not the bench's widened ones (see `topology::pod`): where TIME_WAIT
/// sockets land, and whether anything can reuse them, is what this workload measures.
fn sustained(topo: &Topology, active: &Active, env: &Env, p: &Params) -> Result<Vec<Metric>> {
    let _defaults = PodDefaults::apply(topo)?;
    let mut m = Vec::new();
    for threads in [1usize, 2] {
        let mut cmd = bench_in_client(topo, env)?;
        cmd.args([
            "churn",
            "--echo",
            "--target",
            &active.target(ECHO_PORT).to_string(),
            "--duration",
            &p.sustained_secs.to_string(),
            "--threads",
            &threads.to_string(),
            "--window",
            &p.sustained_window_secs.to_string(),
        ]);
        if let Some(rate) = p.sustained_rate {
            cmd.args(["--rate", &rate.to_string()]);
        }
        let (r, cpu): (ChurnReport, Cpu) = measured(
            topo,
            active,
            "sustained churn",
            &mut cmd,
            Duration::from_secs_f64(p.sustained_secs * 2.0 + 60.0),
        )?;
        let w = &r.window_conn_per_s;
        let (Some(&first), Some(&last)) = (w.first(), w.last()) else {
            bail!("sustained churn reported no windows");
        };
        let worst = w.iter().copied().fold(f64::INFINITY, f64::min);
        let n = (r.connections as f64).max(1.0);
        let t = |name: &str| -> &'static str {
            // Metric names are static in the report; a handful are built once per run.
            Box::leak(format!("t{threads}_{name}").into_boxed_str())
        };
        m.push((t("connections"), r.connections as f64));
        m.push((t("errors"), r.errors as f64));
        m.push((t("first_conn_per_s"), first));
        m.push((t("last_conn_per_s"), last));
        m.push((t("last_over_first"), last / first.max(1e-9)));
        m.push((t("worst_over_first"), worst / first.max(1e-9)));
        m.push((t("p99_us"), r.first_byte.p99_us));
        m.push((t("cpu_ms_per_conn"), cpu.attributed * 1000.0 / n));
        if has_proxy(active) {
            m.push((t("proxy_cpu_ms_per_conn"), cpu.proxy * 1000.0 / n));
        }
        for (i, rate) in w.iter().enumerate() {
            m.push((t(&format!("w{i:02}_conn_per_s")), *rate));
        }
        for (i, us) in r.window_first_byte_mean_us.iter().enumerate() {
            m.push((t(&format!("w{i:02}_first_byte_mean_us")), *us));
        }
        m.push((t("server_time_wait"), time_wait(&topo.server)? as f64));
        m.push((t("client_time_wait"), time_wait(&topo.client)? as f64));
        println!(
            "  sustained, {threads} thread(s), {} connections; conn/s per {} s window: {}; \
             mean first byte µs: {}",
            r.connections,
            p.sustained_window_secs,
            w.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" "),
            r.window_first_byte_mean_us
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(m)
}

/// Kubernetes' defaults for TIME_WAIT reuse and the ephemeral range in both pods while it
/// lives; the bench's own settings come back when it drops.
struct PodDefaults<'a>(&'a Topology);

impl<'a> PodDefaults<'a> {
    const SET: [(&'static str, &'static str, &'static str); 2] = [
        // (sysctl, pod default, the bench's setting)
        ("net.ipv4.tcp_tw_reuse", "2", "1"),
        ("net.ipv4.ip_local_port_range", "32768 60999", "10000 64999"),
    ];

    fn apply(topo: &'a Topology) -> Result<Self> {
        let guard = PodDefaults(topo);
        for pod in [&topo.client, &topo.server] {
            for (key, default, _) in Self::SET {
                pod.ns.sysctl(key, default)?;
            }
        }
        Ok(guard)
    }
}

impl Drop for PodDefaults<'_> {
    fn drop(&mut self) {
        for pod in [&self.0.client, &self.0.server] {
            for (key, _, bench) in Self::SET {
                if let Err(e) = pod.ns.sysctl(key, bench) {
                    eprintln!("bench: cannot restore {key} in pod {}: {e:#}", pod.name);
                }
            }
        }
    }
}

/// TIME_WAIT sockets (IPv4 and IPv6) in a pod's netns.
fn time_wait(pod: &crate::topology::Pod) -> Result<usize> {
    let mut n = 0;
    for file in ["tcp", "tcp6"] {
        let table = pod.ns.proc_net(file)?;
        n += table
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().nth(3) == Some("06"))
            .count();
    }
    Ok(n)
}

/// Memory with `idle_flows` established, idle connections through the mode.
fn idle(topo: &Topology, active: &Active, env: &Env, p: &Params) -> Result<Vec<Metric>> {
    if !has_proxy(active) {
        return Ok(Vec::new());
    }
    let held = hold_idle(topo, active, env, p.idle_flows)?;
    Ok(vec![
        ("proxy_rss_mb", held.rss_mb),
        ("max_proxy_rss_mb", held.max_rss_mb),
        ("proxy_rss_delta_mb", held.rss_mb - held.rss_before_mb),
        ("proxy_anon_rss_mb", held.anon_mb),
    ])
}

/// The proxies with `count` idle connections open through them.
struct Held {
    rss_before_mb: f64,
    rss_mb: f64,
    max_rss_mb: f64,
    /// `RssAnon` of the proxies with the flows open (see [`procs::process_rss_anon`]).
    anon_mb: f64,
    fds_before: f64,
    fds: f64,
}

/// Open file descriptors of the proxies.
fn proxy_fds(active: &Active) -> Result<f64> {
    let mut n = 0usize;
    for pid in active.proxy_pids() {
        n += std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("/proc/{pid}/fd"))?
            .count();
    }
    Ok(n as f64)
}

fn hold_idle(topo: &Topology, active: &Active, env: &Env, count: usize) -> Result<Held> {
    let rss = |active: &Active| -> Result<(f64, f64)> {
        let mut sum = 0u64;
        let mut max = 0u64;
        for pid in active.proxy_pids() {
            let r = procs::process_rss(pid)?;
            sum += r;
            max = max.max(r);
        }
        Ok((sum as f64 / 1e6, max as f64 / 1e6))
    };
    let (before, _) = rss(active)?;
    let fds_before = proxy_fds(active)?;
    let mut cmd = bench_in_client(topo, env)?;
    cmd.args([
        "idle",
        "--target",
        &active.target(ECHO_PORT).to_string(),
        "--count",
        &count.to_string(),
        "--hold-secs",
        "600",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut holder = Proc::spawn("idle flows", &mut cmd)?;
    let stdout = holder.take_stdout().context("idle stdout")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Set-up runs at hundreds of connections per second or more even on a busy host; a
    // holder that stalls (a proxy out of descriptors) fails the point within minutes.
    let deadline = Instant::now() + Duration::from_secs(60 + count as u64 / 50);
    loop {
        procs::check_interrupted()?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.starts_with("ready") => break,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                holder.check_alive()?;
            }
            Err(_) => bail!("the idle-flow holder did not report its connections in time"),
        }
    }
    // Let allocators settle after the burst of handshakes.
    procs::sleep(Duration::from_millis(500))?;
    let (sum, max) = rss(active)?;
    let mut anon = 0u64;
    for pid in active.proxy_pids() {
        anon += procs::process_rss_anon(pid)?;
    }
    let fds = proxy_fds(active)?;
    drop(holder);
    Ok(Held {
        rss_before_mb: before,
        rss_mb: sum,
        max_rss_mb: max,
        anon_mb: anon as f64 / 1e6,
        fds_before,
        fds,
    })
}

/// Scaling curves, each point a metric of its own so the JSON keeps every one: bulk
/// throughput and proxy CPU per GB with 1, 16 and 256 concurrent flows (iperf3 `-P`, at most
/// 128 streams per process); new connections/s and proxy CPU per connection with 1 and 2
/// client threads. The idle points (proxy RSS and descriptors per idle connection with
/// 1 000 and 10 000 held) are [`scale_idle`], each on proxies the runner starts fresh: held
/// flows would otherwise reuse the memory the bulk and churn points left freed but resident,
/// and look cheaper than they are.
fn scale(topo: &Topology, active: &Active, env: &Env, p: &Params) -> Result<Vec<Metric>> {
    let name = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let mut m = Vec::new();
    // A point that fails (a host limit, a timeout under load) is reported and marked
    // `<point>_failed`; the other points are kept.
    let failed = |point: String, e: anyhow::Error, m: &mut Vec<Metric>| {
        eprintln!("  scale: {point} failed: {e:#}");
        m.push((name(format!("{point}_failed")), 1.0));
    };
    for flows in SCALE_FLOWS {
        match iperf_parallel(topo, active, env, p, flows) {
            Ok(r) => {
                for (k, v) in r {
                    m.push((name(format!("bulk_p{flows}_{k}")), v));
                }
            }
            Err(e) => failed(format!("bulk_p{flows}"), e, &mut m),
        }
    }
    for threads in SCALE_THREADS {
        let mut cmd = bench_in_client(topo, env)?;
        cmd.args([
            "churn",
            "--target",
            &active.target(HTTP_PORT).to_string(),
            "--duration",
            &p.churn_secs.to_string(),
            "--threads",
            &threads.to_string(),
        ]);
        let (r, cpu): (ChurnReport, Cpu) = measured(
            topo,
            active,
            "churn",
            &mut cmd,
            Duration::from_secs_f64(p.churn_secs * 3.0 + 30.0),
        )?;
        let n = (r.connections as f64).max(1.0);
        m.push((name(format!("setup_t{threads}_conn_per_s")), r.conn_per_s));
        m.push((
            name(format!("setup_t{threads}_p99_us")),
            r.first_byte.p99_us,
        ));
        if has_proxy(active) {
            m.push((
                name(format!("setup_t{threads}_proxy_cpu_ms_per_conn")),
                cpu.proxy * 1000.0 / n,
            ));
        }
    }
    Ok(m)
}

/// One idle point of the scaling curves: proxy RSS and descriptors per connection with
/// `count` idle connections held through `active`, which the runner started fresh for it
/// (see [`scale_idle_counts`]). Nothing for modes without a proxy.
pub fn scale_idle(
    topo: &Topology,
    active: &Active,
    env: &Env,
    count: usize,
) -> Result<Vec<Metric>> {
    if !has_proxy(active) {
        return Ok(Vec::new());
    }
    let name = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let h = match hold_idle(topo, active, env, count) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("  scale: idle_n{count} failed: {e:#}");
            return Ok(vec![(name(format!("idle_n{count}_failed")), 1.0)]);
        }
    };
    let n = count as f64;
    Ok(vec![
        (
            name(format!("idle_n{count}_rss_kb_per_conn")),
            (h.rss_mb - h.rss_before_mb) * 1e3 / n,
        ),
        (
            name(format!("idle_n{count}_fds_per_conn")),
            (h.fds - h.fds_before) / n,
        ),
        (name(format!("idle_n{count}_proxy_rss_mb")), h.rss_mb),
    ])
}

/// The x values of the scaling curves.
pub const SCALE_FLOWS: [usize; 3] = [1, 16, 256];
pub const SCALE_IDLE: [usize; 2] = [1_000, 10_000];
pub const SCALE_THREADS: [usize; 2] = [1, 2];

/// Descriptors a proxy process holds besides its flows (listeners, eBPF objects, the
/// reactor, logs), with room to spare.
const PROXY_BASE_FDS: u64 = 512;

/// The idle counts the `scale` workload holds under the open-file limit `nofile` (every
/// process inherits it): [`SCALE_IDLE`], each capped at what fits in one agent, which holds two
/// sockets per connection (the app's and the peer agent's), rounded down to 500. The same
/// counts for every mode, so the points stay paired. A host whose hard limit is 20 000 (a
/// container without CAP_SYS_RESOURCE) gets 9 500 instead of 10 000: 10 000 connections
/// through one agent need 20 000 descriptors plus its own.
pub fn scale_idle_counts(nofile: u64) -> Vec<usize> {
    let fits = nofile.saturating_sub(PROXY_BASE_FDS) / 2 / 500 * 500;
    let fits = usize::try_from(fits).unwrap_or(usize::MAX);
    let mut counts: Vec<usize> = SCALE_IDLE.iter().map(|&c| c.min(fits)).collect();
    counts.dedup();
    counts
}

/// iperf3's most streams in one process (`-P`).
const IPERF_MAX_STREAMS: usize = 128;

/// `flows` concurrent bulk streams over as few iperf3 processes as `-P` allows.
fn iperf_parallel(
    topo: &Topology,
    active: &Active,
    env: &Env,
    p: &Params,
    flows: usize,
) -> Result<Vec<Metric>> {
    let procs_needed = flows.div_ceil(IPERF_MAX_STREAMS).max(1);
    if procs_needed > IPERF_PORTS.len() {
        bail!(
            "{flows} flows need more iperf3 servers than the {} running",
            IPERF_PORTS.len()
        );
    }
    let per = flows / procs_needed;
    let sampler = RssSampler::start(active.proxy_pids());
    let sent = iperf_clients(topo, active, env, p, procs_needed, Some(per), 60);
    let peak_rss_mb = sampler.stop();
    let (IperfSum { bytes, secs, .. }, cpu) = sent?;
    let gb = (bytes / 1e9).max(1e-12);
    let mut m = vec![("mb_s", bytes / secs.max(1e-9) / 1e6)];
    if has_proxy(active) {
        m.push(("proxy_cpu_s_per_gb", cpu.proxy / gb));
        m.push(("proxy_peak_rss_mb", peak_rss_mb));
    }
    Ok(m)
}

/// The proxies' RSS, summed, sampled every 100 ms while a workload runs: what busy flows'
/// buffers cost (the relay's buffer size decides it), which the idle points cannot show.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: thread::JoinHandle<f64>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut peak = 0u64;
            loop {
                // A proxy that exited mid-run counts as nothing; the workload reports the failure.
                let sum: u64 = pids
                    .iter()
                    .map(|&pid| procs::process_rss(pid).unwrap_or(0))
                    .sum();
                peak = peak.max(sum);
                if flag.load(Ordering::Relaxed) {
                    return peak as f64 / 1e6;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler { stop, thread }
    }

    /// The largest sum seen, MB.
    fn stop(self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockperf_log_samples_follow_the_header_and_stop_at_the_rule() {
        let log = "sockperf: [Total Run] RunTime=1.263 sec\n\
                   sockperf: ---> percentile 99.000 =   73.026\n\
                   ------------------------------\n\
                   packet, txTime(sec), rxTime(sec), rtt(usec)\n\
                   0, 2.580990282, 2.581017473, 27.191\n\
                   1, 2.581017523, 2.581044033, 26.510\n\
                   ------------------------------\n";
        assert_eq!(round_trips(log).unwrap(), vec![27.191, 26.510]);
        assert!(round_trips("sockperf: no samples\n").is_err());
    }

    /// One slow stretch (a neighbour's compile) owns the run's p99 but not the block median.
    #[test]
    fn a_burst_moves_the_run_p99_not_the_block_median() {
        let mut rtts = vec![100.0; RR_BLOCK * 5];
        for r in &mut rtts[RR_BLOCK..RR_BLOCK + 400] {
            *r = 5000.0;
        }
        let m: std::collections::HashMap<_, _> = rr_metrics(&rtts).into_iter().collect();
        assert_eq!(m["p99_us"], 5000.0);
        assert_eq!(m["p99_block_median_us"], 100.0);
        assert_eq!(m["p50_us"], 100.0);
        assert_eq!(m["round_trips"], (RR_BLOCK * 5) as f64);
    }
}
