//! Results: raw samples, medians with quartiles, paired per-round ratios, the issue's targets,
//! and their renderings (JSON for machines, Markdown for people, an SVG plot).
//!
//! Every ratio is computed within a round (mode X in round r ÷ plaintext in round r) and the
//! median of those ratios is reported: on a 2-core machine the plaintext ceiling itself moves
//! by ±25 % between runs, and pairing cancels most of that drift.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::{Deserialize, Serialize};

use crate::{
    modes::Mode,
    plot::{Chart, Series, page},
    topology::Layout,
    workloads::{SCALE_FLOWS, SCALE_THREADS, Workload},
};

/// One measured value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    pub mode: Mode,
    pub workload: Workload,
    pub metric: String,
    pub value: f64,
}

/// Something that did not produce a number, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub round: Option<usize>,
    pub mode: Mode,
    pub workload: Option<Workload>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub median: f64,
    pub q1: f64,
    pub q3: f64,
    pub n: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub median: f64,
    pub per_round: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: Workload,
    pub metric: String,
    pub unit: &'static str,
    pub lower_is_better: bool,
    pub medians: BTreeMap<Mode, Stat>,
    /// mode ÷ plaintext, per round.
    pub vs_plaintext: BTreeMap<Mode, Ratio>,
    /// interceptor mode ÷ HAProxy pair, per round.
    pub vs_haproxy: BTreeMap<Mode, Ratio>,
    /// interceptor mode ÷ ztunnel's default (pooled HBONE), per round.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub vs_ztunnel: BTreeMap<Mode, Ratio>,
    /// interceptor mode ÷ ztunnel with one stream per HBONE connection, per round.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub vs_ztunnel_1stream: BTreeMap<Mode, Ratio>,
    /// Every proxied mode ÷ the `forward` floor (no TLS, blocking forwarders on the same
    /// legs), per round: what a relay costs above the least any three-leg relay pays.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub vs_forward: BTreeMap<Mode, Ratio>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: Option<f64>,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayoutResults {
    pub layout: Layout,
    /// Modes that could not run at all here, with the reason.
    pub unavailable: BTreeMap<Mode, String>,
    pub samples: Vec<Sample>,
    pub failures: Vec<Failure>,
    /// Derived from `samples` by [`LayoutResults::summarise`]; recomputed when a saved
    /// report is rendered again.
    #[serde(default, skip_deserializing)]
    pub rows: Vec<Row>,
    #[serde(default, skip_deserializing)]
    pub targets: Vec<Target>,
}

impl LayoutResults {
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            unavailable: BTreeMap::new(),
            samples: Vec::new(),
            failures: Vec::new(),
            rows: Vec::new(),
            targets: Vec::new(),
        }
    }

    fn values(&self, mode: Mode, w: Workload, metric: &str) -> BTreeMap<usize, f64> {
        self.samples
            .iter()
            .filter(|s| s.mode == mode && s.workload == w && s.metric == metric)
            .map(|s| (s.round, s.value))
            .collect()
    }

    fn ratio(&self, num: Mode, den: Mode, w: Workload, metric: &str) -> Option<Ratio> {
        let a = self.values(num, w, metric);
        let b = self.values(den, w, metric);
        let per_round: Vec<f64> = a
            .iter()
            .filter_map(|(r, x)| b.get(r).filter(|y| **y != 0.0).map(|y| x / y))
            .collect();
        (!per_round.is_empty()).then(|| Ratio {
            median: median(&per_round),
            per_round,
        })
    }

    /// Computes rows and targets from the samples.
    pub fn summarise(&mut self) {
        let mut keys: Vec<(Workload, String)> = self
            .samples
            .iter()
            .map(|s| (s.workload, s.metric.clone()))
            .collect();
        keys.sort();
        keys.dedup();
        let modes: Vec<Mode> = {
            let mut m: Vec<Mode> = self.samples.iter().map(|s| s.mode).collect();
            m.sort();
            m.dedup();
            m
        };
        self.rows = keys
            .into_iter()
            .map(|(w, metric)| {
                let (unit, lower) = meta(&metric);
                let mut row = Row {
                    workload: w,
                    metric: metric.clone(),
                    unit,
                    lower_is_better: lower,
                    medians: BTreeMap::new(),
                    vs_plaintext: BTreeMap::new(),
                    vs_haproxy: BTreeMap::new(),
                    vs_ztunnel: BTreeMap::new(),
                    vs_ztunnel_1stream: BTreeMap::new(),
                    vs_forward: BTreeMap::new(),
                };
                for &m in &modes {
                    let v: Vec<f64> = self.values(m, w, &metric).into_values().collect();
                    if !v.is_empty() {
                        row.medians.insert(m, stat(&v));
                    }
                    if m != Mode::Plaintext
                        && let Some(r) = self.ratio(m, Mode::Plaintext, w, &metric)
                    {
                        row.vs_plaintext.insert(m, r);
                    }
                    if m.is_interceptor()
                        && let Some(r) = self.ratio(m, Mode::HaproxyPair, w, &metric)
                    {
                        row.vs_haproxy.insert(m, r);
                    }
                    if !matches!(m, Mode::Plaintext | Mode::Forward)
                        && let Some(r) = self.ratio(m, Mode::Forward, w, &metric)
                    {
                        row.vs_forward.insert(m, r);
                    }
                    if m.is_interceptor() {
                        if let Some(r) = self.ratio(m, Mode::ZtunnelDefault, w, &metric) {
                            row.vs_ztunnel.insert(m, r);
                        }
                        if let Some(r) = self.ratio(m, Mode::ZtunnelOneStream, w, &metric) {
                            row.vs_ztunnel_1stream.insert(m, r);
                        }
                    }
                }
                row
            })
            .collect();
        self.targets = self.targets();
    }

    /// The issue's targets, evaluated for the userspace relay (the mode that runs on hosts
    /// without kTLS) and, where it ran, kTLS against the relay.
    fn targets(&self) -> Vec<Target> {
        let relay = Mode::InterceptorRelay;
        let hap = Mode::HaproxyPair;
        let mut t = Vec::new();
        let r = self.ratio(relay, hap, Workload::Iperf1, "mb_s");
        t.push(target(
            "throughput, relay ÷ HAProxy pair (iperf3 1 stream)",
            "≥ 2.5",
            r.map(|r| r.median),
            |v| v >= 2.5,
        ));
        let r = self.ratio(relay, hap, Workload::Iperf1, "cpu_s_per_gb");
        t.push(target(
            "CPU-s per GB (pods + agents), relay ÷ HAProxy pair",
            "≤ 0.4",
            r.map(|r| r.median),
            |v| v <= 0.4,
        ));
        // Added round trip: (mode − plaintext) per round, relay's over the pair's.
        let plain = self.values(Mode::Plaintext, Workload::Rr64, "p50_us");
        let ours = self.values(relay, Workload::Rr64, "p50_us");
        let theirs = self.values(hap, Workload::Rr64, "p50_us");
        let per_round: Vec<f64> = plain
            .iter()
            .filter_map(|(r, p)| {
                let o = ours.get(r)? - p;
                let h = theirs.get(r)? - p;
                (h > 0.0).then_some(o / h)
            })
            .collect();
        t.push(target(
            "added p50 round trip (64 B), relay's added ÷ pair's added",
            "≤ 0.3",
            (!per_round.is_empty()).then(|| median(&per_round)),
            |v| v <= 0.3,
        ));
        let v: Vec<f64> = self
            .values(relay, Workload::Churn, "setups_per_proxy_core_s")
            .into_values()
            .collect();
        t.push(target(
            "full mTLS connection setups per agent CPU-second (relay)",
            "≥ 4000",
            (!v.is_empty()).then(|| median(&v)),
            |v| v >= 4000.0,
        ));
        let v: Vec<f64> = self
            .values(relay, Workload::Idle, "max_proxy_rss_mb")
            .into_values()
            .collect();
        t.push(target(
            "agent RSS with the idle flows open (relay), MB",
            "≤ 32",
            (!v.is_empty()).then(|| median(&v)),
            |v| v <= 32.0,
        ));
        let r = self.ratio(Mode::InterceptorKtls, relay, Workload::Iperf1, "mb_s");
        t.push(target(
            "throughput, kTLS ÷ userspace relay (same run)",
            "≥ 1.0",
            r.map(|r| r.median),
            |v| v >= 1.0,
        ));
        t
    }
}

/// The metrics a reader looks at first, in reading order.
const HEADLINE: [(Workload, &str, &str); 18] = [
    (Workload::Iperf1, "mb_s", "bulk 1 stream, MB/s"),
    (Workload::Iperf4, "mb_s", "bulk 4 streams, MB/s"),
    (
        Workload::Iperf1,
        "cpu_s_per_gb",
        "CPU-s per GB, pods + proxies (1 stream)",
    ),
    (
        Workload::Iperf1,
        "proxy_cpu_s_per_gb",
        "CPU-s per GB, proxies only (1 stream)",
    ),
    (Workload::Rr64, "p50_us", "RTT 64 B p50, µs"),
    (Workload::Rr64, "p99_us", "RTT 64 B p99, µs"),
    (
        Workload::Rr64,
        "p99_block_median_us",
        "RTT 64 B p99, median of 1 000-trip blocks, µs",
    ),
    (Workload::Rr1k, "p50_us", "RTT 1 KiB p50, µs"),
    (Workload::Http, "p50_us", "HTTP p50 at the fixed rate, µs"),
    (Workload::Http, "p90_us", "HTTP p90, µs"),
    (Workload::Http, "p99_us", "HTTP p99, µs"),
    (
        Workload::Http,
        "proxy_vcpu_per_krps",
        "proxy vCPU per 1000 rps",
    ),
    (
        Workload::Churn,
        "conn_per_s",
        "new connections/s (1 client thread)",
    ),
    (Workload::Churn, "p99_us", "connect → first byte p99, µs"),
    (
        Workload::Churn,
        "setups_per_proxy_core_s",
        "mTLS setups per proxy CPU-s (full, or resumed where on)",
    ),
    (
        Workload::Churn2,
        "conn_per_s",
        "new connections/s (2 client threads)",
    ),
    (
        Workload::Churn2,
        "proxy_cpu_ms_per_conn",
        "proxy CPU-ms per connection (2 client threads)",
    ),
    (
        Workload::Idle,
        "max_proxy_rss_mb",
        "largest proxy RSS with idle flows, MB",
    ),
];

impl LayoutResults {
    /// A compact table: headline metrics, each mode's median, and the paired ratios that
    /// matter (÷ plaintext, relay ÷ HAProxy, kTLS ÷ relay).
    pub fn headline(&self, modes: &[Mode]) -> String {
        let mut s = String::new();
        let _ = write!(s, "| metric |");
        for m in modes {
            let _ = write!(s, " {} |", short(*m));
        }
        s.push_str(" relay ÷ HAProxy | kTLS ÷ relay | relay ÷ no resumption |\n");
        let _ = writeln!(s, "|---|{}---|---|---|", "---|".repeat(modes.len()));
        for (w, metric, label) in HEADLINE {
            let Some(row) = self
                .rows
                .iter()
                .find(|r| r.workload == w && r.metric == metric)
            else {
                continue;
            };
            let _ = write!(s, "| {label} |");
            for m in modes {
                let cell = match (row.medians.get(m), row.vs_plaintext.get(m)) {
                    (Some(st), Some(r)) => {
                        format!("{} ({}×)", fmt_num(st.median), fmt_num(r.median))
                    }
                    (Some(st), None) => fmt_num(st.median),
                    _ => "—".to_owned(),
                };
                let _ = write!(s, " {cell} |");
            }
            let rh = row
                .vs_haproxy
                .get(&Mode::InterceptorRelay)
                .map_or("—".to_owned(), |r| fmt_num(r.median));
            let kr = self
                .ratio(Mode::InterceptorKtls, Mode::InterceptorRelay, w, metric)
                .map_or("—".to_owned(), |r| fmt_num(r.median));
            let rr = self
                .ratio(
                    Mode::InterceptorRelay,
                    Mode::InterceptorRelayFull,
                    w,
                    metric,
                )
                .map_or("—".to_owned(), |r| fmt_num(r.median));
            let _ = writeln!(s, " {rh} | {kr} | {rr} |");
        }
        s.push_str(
            "\nCells: median over rounds (median of per-round ratios to plaintext). Ratio \
             columns: medians of per-round ratios.\n\n",
        );
        s
    }
}

impl LayoutResults {
    /// Ours ÷ ztunnel (default and 1-stream) for every metric both measured, paired per round;
    /// empty when no ztunnel mode ran.
    pub fn ztunnel_table(&self, ours: &[Mode]) -> String {
        let mut s = String::new();
        let rows: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| !r.vs_ztunnel.is_empty() || !r.vs_ztunnel_1stream.is_empty())
            .collect();
        if rows.is_empty() {
            return s;
        }
        let _ = writeln!(
            s,
            "\nOurs ÷ ztunnel, median of per-round ratios (↑: higher is better for us, ↓: lower \
             is better):\n"
        );
        let _ = write!(s, "| workload | metric | dir |");
        for m in ours {
            let _ = write!(
                s,
                " {0} ÷ ztunnel default | {0} ÷ ztunnel 1-stream |",
                short(*m)
            );
        }
        s.push('\n');
        let _ = writeln!(s, "|---|---|---|{}", "---|---|".repeat(ours.len()));
        for r in rows {
            let dir = if r.lower_is_better { "↓" } else { "↑" };
            let _ = write!(s, "| {} | {} | {dir} |", r.workload.label(), r.metric);
            for m in ours {
                for map in [&r.vs_ztunnel, &r.vs_ztunnel_1stream] {
                    let _ = write!(s, " {} |", map.get(m).map_or("—".to_owned(), fmt_ratio));
                }
            }
            s.push('\n');
        }
        s.push_str("\nCells: median [lowest–highest] of the per-round ratios.\n");
        s
    }

    /// The three-leg floor: every proxied mode ÷ `forward` per round for every metric, then
    /// the rr64 round trip per process hop; empty when `forward` did not run.
    pub fn floor_table(&self) -> String {
        let mut s = String::new();
        let modes: Vec<Mode> = Mode::ALL
            .into_iter()
            .filter(|m| self.rows.iter().any(|r| r.vs_forward.contains_key(m)))
            .collect();
        if modes.is_empty() {
            return s;
        }
        let _ = writeln!(
            s,
            "\nEach mode ÷ forward (the three-leg floor: no TLS, blocking forwarders on the \
             same legs), per-round ratios: median [lowest–highest]:\n"
        );
        let _ = write!(s, "| workload | metric | dir |");
        for m in &modes {
            let _ = write!(s, " {} ÷ forward |", short(*m));
        }
        s.push_str(" forward ÷ ztunnel |\n");
        let _ = writeln!(s, "|---|---|---|{}---|", "---|".repeat(modes.len()));
        for r in self.rows.iter().filter(|r| !r.vs_forward.is_empty()) {
            let dir = if r.lower_is_better { "↓" } else { "↑" };
            let _ = write!(s, "| {} | {} | {dir} |", r.workload.label(), r.metric);
            for m in &modes {
                let _ = write!(
                    s,
                    " {} |",
                    r.vs_forward.get(m).map_or("—".to_owned(), fmt_ratio)
                );
            }
            let fz = self.ratio(Mode::Forward, Mode::ZtunnelDefault, r.workload, &r.metric);
            let _ = writeln!(s, " {} |", fz.as_ref().map_or("—".to_owned(), fmt_ratio));
        }
        let hops = self.per_hop();
        if !hops.is_empty() {
            let _ = writeln!(
                s,
                "\nrr64 p50 per process hop (per round: p50 ÷ hops; added: (p50 − plaintext's) ÷ \
                 the hops beyond plaintext's 2), median [lowest–highest] µs:\n"
            );
            let _ = writeln!(
                s,
                "| mode | hops per round trip | p50 ÷ hops | added per added hop |"
            );
            let _ = writeln!(s, "|---|---|---|---|");
            for (m, n, per, added) in hops {
                let _ = writeln!(
                    s,
                    "| {} | {n} | {} | {} |",
                    short(m),
                    fmt_ratio(&per),
                    added.as_ref().map_or("—".to_owned(), fmt_ratio)
                );
            }
        }
        s
    }

    /// For each mode with a known hop count that ran rr64: (mode, hops, p50 ÷ hops, and
    /// (p50 − plaintext p50) ÷ (hops − 2) where plaintext ran in the same round).
    pub fn per_hop(&self) -> Vec<(Mode, u32, Ratio, Option<Ratio>)> {
        let plain = self.values(Mode::Plaintext, Workload::Rr64, "p50_us");
        Mode::ALL
            .into_iter()
            .filter_map(|m| {
                let n = process_hops(m)?;
                let v = self.values(m, Workload::Rr64, "p50_us");
                let per: Vec<f64> = v.values().map(|x| x / f64::from(n)).collect();
                if per.is_empty() {
                    return None;
                }
                let added: Vec<f64> = v
                    .iter()
                    .filter(|_| n > 2)
                    .filter_map(|(r, x)| Some((x - plain.get(r)?) / f64::from(n - 2)))
                    .collect();
                let ratio = |v: Vec<f64>| Ratio {
                    median: median(&v),
                    per_round: v,
                };
                Some((m, n, ratio(per), (!added.is_empty()).then(|| ratio(added))))
            })
            .collect()
    }

    /// The agent under test ÷ the baseline agent (`--baseline-agent`), paired per round, for
    /// every metric both measured; empty without the baseline mode.
    pub fn baseline_table(&self) -> String {
        let mut s = String::new();
        let (ours, base) = (Mode::InterceptorRelay, Mode::InterceptorRelayBase);
        let rows: Vec<(&Row, Ratio)> = self
            .rows
            .iter()
            .filter_map(|r| Some((r, self.ratio(ours, base, r.workload, &r.metric)?)))
            .collect();
        if rows.is_empty() {
            return s;
        }
        let _ = writeln!(
            s,
            "\nThis agent ÷ the baseline agent (relay), per-round ratios: median [lowest–highest]:\n"
        );
        let _ = writeln!(s, "| workload | metric | dir | relay ÷ baseline |");
        let _ = writeln!(s, "|---|---|---|---|");
        for (r, ratio) in rows {
            let dir = if r.lower_is_better { "↓" } else { "↑" };
            let _ = writeln!(
                s,
                "| {} | {} | {dir} | {} |",
                r.workload.label(),
                r.metric,
                fmt_ratio(&ratio)
            );
        }
        s
    }
}

fn target(name: &str, goal: &str, measured: Option<f64>, ok: impl Fn(f64) -> bool) -> Target {
    Target {
        name: name.to_owned(),
        goal: goal.to_owned(),
        measured,
        met: measured.map(ok),
    }
}

/// (unit, lower is better) of a metric.
fn meta(metric: &str) -> (&'static str, bool) {
    match metric {
        "mb_s" => ("MB/s", false),
        "cpu_s_per_gb" | "busy_cpu_s_per_gb" | "proxy_cpu_s_per_gb" => ("CPU-s/GB", true),
        "tcp_retransmits" => ("count", true),
        "p50_us"
        | "p90_us"
        | "p99_us"
        | "p999_us"
        | "sender_lateness_p99_us"
        | "p99_block_median_us" => ("µs", true),
        "round_trips" => ("count", false),
        "cpu_us_per_rt" | "proxy_cpu_us_per_rt" => ("CPU-µs per round trip", true),
        "proxy_switches_per_rt" | "net_rx_softirqs_per_rt" => ("per round trip", true),
        "achieved_rps" => ("req/s", false),
        "errors" => ("count", true),
        "vcpu_per_krps" | "proxy_vcpu_per_krps" => ("vCPU per 1000 rps", true),
        "conn_per_s" => ("conn/s", false),
        "cpu_ms_per_conn" | "proxy_cpu_ms_per_conn" => ("CPU-ms/conn", true),
        "setups_per_proxy_core_s" => ("setups per CPU-s", false),
        "proxy_rss_mb" | "max_proxy_rss_mb" | "proxy_rss_delta_mb" => ("MB", true),
        // Sustained churn: `t<threads>_<name>`.
        m if m.ends_with("conn_per_s") => ("conn/s", false),
        m if m.ends_with("_over_first") => ("ratio", false),
        m if m.ends_with("cpu_ms_per_conn") => ("CPU-ms/conn", true),
        m if m.ends_with("p99_us") => ("µs", true),
        m if m.ends_with("connections") => ("count", false),
        m if m.ends_with("time_wait") => ("count", true),
        // Scaling curves: `bulk_p<flows>_…`, `idle_n<count>_…`, `setup_t<threads>_…`.
        m if m.ends_with("_mb_s") => ("MB/s", false),
        m if m.ends_with("cpu_s_per_gb") => ("CPU-s/GB", true),
        m if m.ends_with("rss_kb_per_conn") => ("KB/conn", true),
        m if m.ends_with("fds_per_conn") => ("fds/conn", true),
        m if m.ends_with("rss_mb") => ("MB", true),
        _ => ("", true),
    }
}

pub fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// Linear-interpolated quantile (like numpy's default).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// A paired ratio with its spread: the median, and the lowest and highest round where there
/// are three or more (one disturbed round shows as a wide bracket, not as a moved median).
fn fmt_ratio(r: &Ratio) -> String {
    if r.per_round.len() < 3 {
        return fmt_num(r.median);
    }
    let lo = r.per_round.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = r
        .per_round
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    format!("{} [{}–{}]", fmt_num(r.median), fmt_num(lo), fmt_num(hi))
}

fn stat(v: &[f64]) -> Stat {
    Stat {
        median: median(v),
        q1: quantile(v, 0.25),
        q3: quantile(v, 0.75),
        n: v.len(),
    }
}

/// Machine and software the numbers came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub hostname: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub cpu_flags: String,
    pub tcp_available_ulp: String,
    pub clocksource: String,
    pub governor: String,
    pub in_vm: bool,
    pub tools: BTreeMap<String, String>,
    pub agent_probe: Option<serde_json::Value>,
    pub git_commit: Option<String>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub started_unix: u64,
    pub finished_unix: u64,
    pub rounds: usize,
    pub quick: bool,
    pub pinned: bool,
    pub params: crate::workloads::Params,
    pub machine: Machine,
    /// The kTLS hand-off timed in this run's kernel (absent in results from older runs).
    #[serde(default)]
    pub handoff: Option<crate::handoff::Handoff>,
    pub layouts: Vec<LayoutResults>,
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "—".to_owned()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn short(mode: Mode) -> &'static str {
    match mode {
        Mode::Plaintext => "plaintext",
        Mode::InterceptorKtls => "kTLS",
        Mode::InterceptorRelay => "relay",
        Mode::HaproxyPair => "HAProxy pair",
        Mode::InterceptorSkmsg => "+sk_msg",
        Mode::InterceptorRelayFull => "relay, no resumption",
        Mode::ZtunnelDefault => "ztunnel",
        Mode::ZtunnelOneStream => "ztunnel 1-stream",
        Mode::InterceptorLocal => "same-node fast path",
        Mode::InterceptorLocalSkmsg => "same-node fast path, sk_msg join",
        Mode::InterceptorRelayBase => "relay, baseline agent",
        Mode::Forward => "forward",
    }
}

/// Process wake-ups a 64 B round trip takes on the path of `mode` (a blocked reader made
/// runnable): plaintext's two apps, plus two relays' three hops each way for the modes with
/// a userspace proxy in each pod or on each node. `None` where the count is not that simple
/// (kTLS hands the bytes to the kernel; the fast path has one agent and two legs).
pub fn process_hops(mode: Mode) -> Option<u32> {
    match mode {
        Mode::Plaintext => Some(2),
        Mode::Forward
        | Mode::InterceptorRelay
        | Mode::InterceptorRelayBase
        | Mode::InterceptorRelayFull
        | Mode::HaproxyPair
        | Mode::ZtunnelDefault
        | Mode::ZtunnelOneStream => Some(6),
        Mode::InterceptorKtls
        | Mode::InterceptorSkmsg
        | Mode::InterceptorLocal
        | Mode::InterceptorLocalSkmsg => None,
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "# interceptor benchmark results\n");
        let _ = writeln!(
            s,
            "Machine: {} ({} CPUs, {}), kernel {}, tcp ULPs: `{}`{}. Rounds: {}{}{}.\n",
            m.cpu_model,
            m.cpus,
            if m.in_vm { "QEMU guest" } else { "host" },
            m.kernel,
            m.tcp_available_ulp.trim(),
            m.git_commit
                .as_deref()
                .map(|c| format!(", commit {c}"))
                .unwrap_or_default(),
            self.rounds,
            if self.quick { " (--quick)" } else { "" },
            if self.pinned {
                ", client pod on CPU 0 / server pod on CPU 1"
            } else {
                ", unpinned"
            },
        );
        let _ = writeln!(
            s,
            "Tools: {}.\n",
            m.tools
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if m.in_vm {
            let _ = writeln!(
                s,
                "**Emulated (QEMU TCG): AES is ~135× and TCP ~51× slower than on the host. \
                 Read the ratios between modes of this same run; the absolute numbers and the \
                 ratios to plaintext are not results for real hardware.**\n"
            );
        }
        if let Some(h) = &self.handoff {
            let _ = writeln!(
                s,
                "kTLS hand-off per connection ({} samples, µs p50 / p90 / p99): secret \
                 extraction + conversion {} / {} / {}; {}\n",
                h.samples,
                fmt_num(h.extract_us.p50),
                fmt_num(h.extract_us.p90),
                fmt_num(h.extract_us.p99),
                match (&h.install_us, &h.install_unavailable) {
                    (Some(i), _) => format!(
                        "setsockopt TCP_ULP + TLS_TX + TLS_RX + TLS_RX_EXPECT_NO_PAD {} / {} / {}",
                        fmt_num(i.p50),
                        fmt_num(i.p90),
                        fmt_num(i.p99)
                    ),
                    (None, why) => format!(
                        "setsockopt part unavailable on this kernel ({})",
                        why.as_deref().unwrap_or("no tls ULP")
                    ),
                },
            );
        }
        for l in &self.layouts {
            let _ = writeln!(s, "## {}\n", l.layout.label());
            for (mode, why) in &l.unavailable {
                let _ = writeln!(s, "- {}: {why}", mode.label());
            }
            if !l.unavailable.is_empty() {
                s.push('\n');
            }
            let modes: Vec<Mode> = Mode::ALL
                .into_iter()
                .filter(|m| l.rows.iter().any(|r| r.medians.contains_key(m)))
                .collect();
            s.push_str(&l.headline(&modes));
            let _ = writeln!(
                s,
                "All metrics, medians over rounds (IQR in brackets where n ≥ 3):\n"
            );
            let _ = write!(s, "| workload | metric | unit |");
            for m in &modes {
                let _ = write!(s, " {} |", short(*m));
            }
            s.push('\n');
            let _ = writeln!(s, "|---|---|---|{}", "---|".repeat(modes.len()));
            for r in &l.rows {
                let _ = write!(s, "| {} | {} | {} |", r.workload.label(), r.metric, r.unit);
                for m in &modes {
                    match r.medians.get(m) {
                        Some(st) if st.n >= 3 => {
                            let _ = write!(
                                s,
                                " {} [{}–{}] |",
                                fmt_num(st.median),
                                fmt_num(st.q1),
                                fmt_num(st.q3)
                            );
                        }
                        Some(st) => {
                            let _ = write!(s, " {} |", fmt_num(st.median));
                        }
                        None => s.push_str(" — |"),
                    }
                }
                s.push('\n');
            }
            let ratio_modes: Vec<Mode> = modes
                .iter()
                .copied()
                .filter(|m| *m != Mode::Plaintext)
                .collect();
            let ours: Vec<Mode> = modes
                .iter()
                .copied()
                .filter(|m| m.is_interceptor())
                .collect();
            let _ = writeln!(
                s,
                "\nMedian of per-round ratios (÷ plaintext of the same round; ours ÷ HAProxy pair \
                 of the same round):\n"
            );
            let _ = write!(s, "| workload | metric |");
            for m in &ratio_modes {
                let _ = write!(s, " {} ÷ plain |", short(*m));
            }
            for m in &ours {
                let _ = write!(s, " {} ÷ HAProxy |", short(*m));
            }
            s.push('\n');
            let _ = writeln!(
                s,
                "|---|---|{}",
                "---|".repeat(ratio_modes.len() + ours.len())
            );
            for r in &l.rows {
                if r.vs_plaintext.is_empty() && r.vs_haproxy.is_empty() {
                    continue;
                }
                let _ = write!(s, "| {} | {} |", r.workload.label(), r.metric);
                for m in &ratio_modes {
                    let _ = write!(
                        s,
                        " {} |",
                        r.vs_plaintext
                            .get(m)
                            .map_or("—".to_owned(), |x| fmt_num(x.median))
                    );
                }
                for m in &ours {
                    let _ = write!(
                        s,
                        " {} |",
                        r.vs_haproxy
                            .get(m)
                            .map_or("—".to_owned(), |x| fmt_num(x.median))
                    );
                }
                s.push('\n');
            }
            s.push_str(&l.ztunnel_table(&ours));
            s.push_str(&l.baseline_table());
            s.push_str(&l.floor_table());
            let _ = writeln!(s, "\nTargets (issue 5):\n");
            let _ = writeln!(s, "| target | goal | measured | met |");
            let _ = writeln!(s, "|---|---|---|---|");
            for t in &l.targets {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    t.name,
                    t.goal,
                    t.measured.map_or("—".to_owned(), fmt_num),
                    match t.met {
                        Some(true) => "yes",
                        Some(false) => "**no**",
                        None => "not measured",
                    }
                );
            }
            if !l.failures.is_empty() {
                let _ = writeln!(s, "\nFailures:\n");
                for f in &l.failures {
                    let _ = writeln!(
                        s,
                        "- round {}, {}, {}: {}",
                        f.round.map_or("—".to_owned(), |r| r.to_string()),
                        f.mode.label(),
                        f.workload.map_or("setup", |w| w.label()),
                        f.message.replace('\n', " ")
                    );
                }
            }
            s.push('\n');
        }
        s
    }

    /// Grouped bars: for each headline metric, each mode's median ratio to plaintext, one
    /// panel per layout. Bars above 1 are better for throughput metrics and worse for
    /// latency and cost metrics; the caption says which.
    pub fn svg(&self) -> String {
        const HEADLINE: [(Workload, &str, &str); 6] = [
            (Workload::Iperf1, "mb_s", "iperf3 1 stream MB/s"),
            (Workload::Iperf4, "mb_s", "iperf3 4 streams MB/s"),
            (Workload::Iperf1, "cpu_s_per_gb", "CPU-s/GB (1 stream)"),
            (Workload::Rr64, "p50_us", "RTT p50 64 B"),
            (Workload::Http, "p99_us", "HTTP p99, fixed rate"),
            (Workload::Churn, "conn_per_s", "new conn/s"),
        ];
        let colors = [
            (Mode::InterceptorKtls, "#1b9e77"),
            (Mode::InterceptorRelay, "#7570b3"),
            (Mode::InterceptorSkmsg, "#66a61e"),
            (Mode::InterceptorRelayFull, "#e7298a"),
            (Mode::ZtunnelDefault, "#e6ab02"),
            (Mode::ZtunnelOneStream, "#a6761d"),
            (Mode::InterceptorLocal, "#666666"),
            (Mode::InterceptorLocalSkmsg, "#1b9e77"),
            (Mode::HaproxyPair, "#d95f02"),
        ];
        let panel_w = 900.0;
        let panel_h = 300.0;
        let top = 60.0;
        let h = top + panel_h * self.layouts.len() as f64 + 40.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{panel_w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="15">Median per-round ratio to plaintext (log scale; 1 = plaintext){}</text>"#,
            if self.machine.in_vm {
                " — QEMU TCG: emulation distorts, compare modes only"
            } else {
                ""
            }
        );
        let mut lx = 10.0;
        for (mode, color) in colors {
            let _ = writeln!(
                s,
                r#"<rect x="{lx}" y="32" width="12" height="12" fill="{color}"/><text x="{}" y="42">{}</text>"#,
                lx + 16.0,
                short(mode)
            );
            lx += 130.0;
        }
        // log10 axis from 0.01 to 100
        let (lo, hi) = (-2.0f64, 2.0f64);
        for (pi, l) in self.layouts.iter().enumerate() {
            let y0 = top + panel_h * pi as f64;
            let plot_top = y0 + 25.0;
            let plot_bottom = y0 + panel_h - 45.0;
            let left = 50.0;
            let y_of = |ratio: f64| {
                let v = ratio.max(1e-9).log10().clamp(lo, hi);
                plot_bottom - (v - lo) / (hi - lo) * (plot_bottom - plot_top)
            };
            let _ = writeln!(
                s,
                r#"<text x="10" y="{}" font-size="13" font-weight="bold">{}</text>"#,
                y0 + 15.0,
                l.layout.label()
            );
            for tick in [0.01, 0.1, 1.0, 10.0, 100.0] {
                let y = y_of(tick);
                let _ = writeln!(
                    s,
                    r##"<line x1="{left}" x2="{}" y1="{y}" y2="{y}" stroke="{}"/><text x="10" y="{}">{tick}</text>"##,
                    panel_w - 10.0,
                    if tick == 1.0 { "#000" } else { "#ddd" },
                    y + 4.0
                );
            }
            let group_w = (panel_w - left - 10.0) / HEADLINE.len() as f64;
            for (gi, (w, metric, label)) in HEADLINE.iter().enumerate() {
                let gx = left + group_w * gi as f64;
                let row = l
                    .rows
                    .iter()
                    .find(|r| r.workload == *w && r.metric == *metric);
                let bar_w = (group_w - 20.0) / colors.len() as f64;
                for (ci, (mode, color)) in colors.iter().enumerate() {
                    let Some(ratio) = row.and_then(|r| r.vs_plaintext.get(mode)) else {
                        continue;
                    };
                    let x = gx + 10.0 + bar_w * ci as f64;
                    let y1 = y_of(1.0);
                    let y = y_of(ratio.median);
                    let (ytop, hgt) = if y < y1 { (y, y1 - y) } else { (y1, y - y1) };
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{ytop:.1}" width="{:.1}" height="{hgt:.1}" fill="{color}"><title>{}: {:.3}</title></rect>"#,
                        bar_w - 2.0,
                        short(*mode),
                        ratio.median
                    );
                }
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                    gx + group_w / 2.0,
                    plot_bottom + 18.0
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}">Higher is better for MB/s and conn/s; lower is better for CPU-s/GB and latency.</text>"#,
            h - 12.0
        );
        s.push_str("</svg>\n");
        s
    }
}

/// One scaling curve: title, x label, y label, the x values (`None`: the idle counts the
/// run held, see `workloads::scale_idle_counts`), the metric name at an x.
type Curve = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static [usize]>,
    fn(usize) -> String,
);

const CURVES: [Curve; 7] = [
    (
        "bulk throughput",
        "concurrent flows",
        "MB/s",
        Some(&SCALE_FLOWS),
        |x| format!("bulk_p{x}_mb_s"),
    ),
    (
        "proxy CPU per GB",
        "concurrent flows",
        "CPU-s/GB",
        Some(&SCALE_FLOWS),
        |x| format!("bulk_p{x}_proxy_cpu_s_per_gb"),
    ),
    (
        "proxy peak RSS during bulk",
        "concurrent flows",
        "MB",
        Some(&SCALE_FLOWS),
        |x| format!("bulk_p{x}_proxy_peak_rss_mb"),
    ),
    (
        "proxy RSS per idle connection",
        "idle connections",
        "KB",
        None,
        |x| format!("idle_n{x}_rss_kb_per_conn"),
    ),
    (
        "proxy descriptors per idle connection",
        "idle connections",
        "fds",
        None,
        |x| format!("idle_n{x}_fds_per_conn"),
    ),
    (
        "new connections/s",
        "client threads",
        "conn/s",
        Some(&SCALE_THREADS),
        |x| format!("setup_t{x}_conn_per_s"),
    ),
    (
        "proxy CPU per new connection",
        "client threads",
        "CPU-ms",
        Some(&SCALE_THREADS),
        |x| format!("setup_t{x}_proxy_cpu_ms_per_conn"),
    ),
];

impl Report {
    /// The `scale` workload's curves, per layout: one chart per measure, one line per mode,
    /// each point the median over rounds (every round's value stays in results.json).
    pub fn scaling_svg(&self) -> Option<String> {
        let colors = [
            (Mode::Plaintext, "#666666"),
            (Mode::InterceptorKtls, "#1b9e77"),
            (Mode::InterceptorRelay, "#7570b3"),
            (Mode::HaproxyPair, "#d95f02"),
            (Mode::InterceptorSkmsg, "#66a61e"),
            (Mode::InterceptorRelayFull, "#e7298a"),
            (Mode::ZtunnelDefault, "#e6ab02"),
            (Mode::ZtunnelOneStream, "#a6761d"),
            (Mode::InterceptorLocal, "#666666"),
            (Mode::InterceptorLocalSkmsg, "#1b9e77"),
        ];
        let titles: Vec<String> = self
            .layouts
            .iter()
            .flat_map(|l| {
                CURVES
                    .iter()
                    .map(move |c| format!("{}: {}", l.layout.label(), c.0))
            })
            .collect();
        let mut charts = Vec::new();
        let mut any = false;
        for (i, l) in self.layouts.iter().enumerate() {
            // The idle counts held: the host's open-file limit may cap them.
            let mut idle: Vec<usize> = l
                .rows
                .iter()
                .filter(|r| r.workload == Workload::Scale)
                .filter_map(|r| {
                    r.metric
                        .strip_prefix("idle_n")?
                        .strip_suffix("_rss_kb_per_conn")?
                        .parse()
                        .ok()
                })
                .collect();
            idle.sort_unstable();
            idle.dedup();
            for (j, (_, x_label, y_label, xs, metric)) in CURVES.iter().enumerate() {
                let xs = xs.unwrap_or(&idle);
                let series: Vec<Series<'_>> = colors
                    .iter()
                    .filter_map(|(mode, color)| {
                        let points: Vec<(f64, f64)> =
                            xs.iter()
                                .filter_map(|&x| {
                                    let name = metric(x);
                                    let row = l.rows.iter().find(|r| {
                                        r.workload == Workload::Scale && r.metric == name
                                    })?;
                                    Some((x as f64, row.medians.get(mode)?.median))
                                })
                                .collect();
                        (!points.is_empty()).then(|| Series {
                            name: short(*mode),
                            color,
                            points,
                        })
                    })
                    .collect();
                any |= !series.is_empty();
                charts.push(Chart {
                    title: &titles[i * CURVES.len() + j],
                    x_label,
                    y_label,
                    log_x: xs.len() > 2,
                    log_y: false,
                    series,
                });
            }
        }
        any.then(|| {
            page(
                "Scaling curves (medians over rounds; every round in results.json)",
                &charts,
                2,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.25), 2.0);
    }

    #[test]
    fn ratios_pair_rounds() {
        let mut l = LayoutResults::new(Layout::SameNode);
        for (round, plain, relay) in [(0, 100.0, 50.0), (1, 200.0, 50.0), (2, 100.0, 80.0)] {
            for (mode, v) in [(Mode::Plaintext, plain), (Mode::InterceptorRelay, relay)] {
                l.samples.push(Sample {
                    round,
                    mode,
                    workload: Workload::Iperf1,
                    metric: "mb_s".into(),
                    value: v,
                });
            }
        }
        l.summarise();
        let row = &l.rows[0];
        let r = &row.vs_plaintext[&Mode::InterceptorRelay];
        assert_eq!(r.per_round, vec![0.5, 0.25, 0.8]);
        assert_eq!(r.median, 0.5);
        assert_eq!(row.medians[&Mode::Plaintext].median, 100.0);
    }

    /// `forward` is paired like every mode: relay ÷ forward per round in the rows (and so in
    /// the JSON), forward ÷ ztunnel and the per-hop figures in the Markdown.
    #[test]
    fn forward_is_the_floor_of_the_proxied_modes() {
        let mut l = LayoutResults::new(Layout::CrossNode);
        let rounds = [
            // (plaintext, forward, relay, ztunnel) rr64 p50 µs
            (40.0, 100.0, 140.0, 160.0),
            (50.0, 110.0, 121.0, 165.0),
            (44.0, 92.0, 138.0, 184.0),
        ];
        for (round, (p, f, r, z)) in rounds.into_iter().enumerate() {
            for (mode, v) in [
                (Mode::Plaintext, p),
                (Mode::Forward, f),
                (Mode::InterceptorRelay, r),
                (Mode::ZtunnelDefault, z),
            ] {
                l.samples.push(Sample {
                    round,
                    mode,
                    workload: Workload::Rr64,
                    metric: "p50_us".into(),
                    value: v,
                });
            }
        }
        l.summarise();
        let row = &l.rows[0];
        assert_eq!(
            row.vs_forward[&Mode::InterceptorRelay].per_round,
            vec![1.4, 1.1, 1.5]
        );
        assert_eq!(
            row.vs_forward[&Mode::ZtunnelDefault].per_round,
            vec![1.6, 1.5, 2.0]
        );
        assert!(!row.vs_forward.contains_key(&Mode::Plaintext));
        assert!(!row.vs_forward.contains_key(&Mode::Forward));
        // Not the agent: no ÷ ztunnel column of its own in the ours ÷ ztunnel table.
        assert!(!row.vs_ztunnel.contains_key(&Mode::Forward));
        let json = serde_json::to_value(&l).unwrap();
        let rr = &json["rows"][0];
        assert_eq!(rr["medians"]["forward"]["median"], 100.0);
        assert_eq!(rr["vs_forward"]["interceptor-relay"]["median"], 1.4);
        let hops = l.per_hop();
        let fwd = hops.iter().find(|h| h.0 == Mode::Forward).unwrap();
        assert_eq!(fwd.1, 6);
        // 100/6, 110/6, 92/6 → median 100/6; added: (60, 60, 48) / 4 → 15.
        assert!((fwd.2.median - 100.0 / 6.0).abs() < 1e-9);
        assert_eq!(fwd.3.as_ref().unwrap().median, 15.0);
        let plain = hops.iter().find(|h| h.0 == Mode::Plaintext).unwrap();
        assert_eq!((plain.1, plain.2.median), (2, 22.0));
        assert!(plain.3.is_none());
        let md = l.floor_table();
        assert!(md.contains("| relay ÷ forward |"), "{md}");
        assert!(md.contains("| forward ÷ ztunnel |"), "{md}");
        // forward ÷ ztunnel per round: 0.625, 0.667, 0.5.
        assert!(md.contains("0.625 [0.500–0.667]"), "{md}");
        assert!(md.contains("| forward | 6 |"), "{md}");
        assert!(
            LayoutResults::new(Layout::CrossNode)
                .floor_table()
                .is_empty()
        );
    }
}
