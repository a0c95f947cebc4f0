//! How policy cost grows with the number of AuthorizationPolicies (`interceptor-bench
//! scale-policy`): at 10, 1 000 and 10 000 policies, the time to load them (parse, validate
//! and compile into the `Engine` the agent swaps in on a reload) and the time of one inbound
//! decision, allowed (a rule of the destination's namespace matches) and denied (none does:
//! every rule that applies is walked). In process, unprivileged, on this thread's CPU clock.
//!
//! The policies spread over 100 namespaces with 5 workloads each: policy `i` lives in
//! namespace `i % 100`, selects workload `i % 5` there, and allows one principal on one port,
//! so both the number of policies per namespace and per workload grow with the count.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use interceptor::{
    identity::SpiffeId,
    policy::{Engine, InboundRequest, Inventory, Settings, Workload, load_documents},
};
use serde::Serialize;

use crate::plot::{Chart, Series, page};

const NAMESPACES: usize = 100;
const PER_NAMESPACE: usize = 5;

/// The policy counts of the curve.
pub const COUNTS: [usize; 3] = [10, 1_000, 10_000];

/// One point of the curve: medians over rounds, and every round's values.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub policies: usize,
    pub yaml_bytes: usize,
    pub load_ms: f64,
    pub allowed_us: f64,
    pub denied_us: f64,
    pub rounds_load_ms: Vec<f64>,
    pub rounds_allowed_us: Vec<f64>,
    pub rounds_denied_us: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rounds: usize,
    pub points: Vec<Point>,
}

fn pod_ip(ns: usize, w: usize) -> IpAddr {
    // ns < 100, w < 5: both fit an octet.
    IpAddr::V4(Ipv4Addr::new(10, 88, ns as u8, 10 + w as u8))
}

fn inventory() -> Inventory {
    let mut inv = Inventory::default();
    for ns in 0..NAMESPACES {
        for w in 0..PER_NAMESPACE {
            let mut wl = Workload::new(&format!("ns{ns}"), &format!("sa{w}"));
            wl.labels.insert("app".to_owned(), format!("app{w}"));
            wl.ips.push(pod_ip(ns, w));
            inv.workloads.push(wl);
        }
    }
    inv
}

/// `count` ALLOW policies as one YAML stream.
pub fn policies(count: usize) -> String {
    let mut y = String::new();
    for i in 0..count {
        let ns = i % NAMESPACES;
        let w = (i / NAMESPACES) % PER_NAMESPACE;
        let from = (i * 7) % NAMESPACES;
        let port = 9000 + (i / (NAMESPACES * PER_NAMESPACE)) % 1000;
        let _ = write!(
            y,
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: \
             p{i}, namespace: ns{ns}}}\nspec:\n  selector:\n    matchLabels: {{app: app{w}}}\n  \
             action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: \
             ['cluster.local/ns/ns{from}/sa/sa{w}']\n    to:\n    - operation:\n        ports: \
             ['{port}']\n"
        );
    }
    y
}

/// One round's `(load ms, allowed µs, denied µs)`.
type Sample = (f64, f64, f64);

/// Runs every count `rounds` times, interleaved.
pub fn run(rounds: usize) -> Result<Report> {
    let rounds = rounds.max(1);
    let mut per: Vec<(usize, Vec<Sample>)> = COUNTS.iter().map(|&c| (c, Vec::new())).collect();
    let docs: Vec<String> = COUNTS.iter().map(|&c| policies(c)).collect();
    for _ in 0..rounds {
        for ((count, out), yaml) in per.iter_mut().zip(&docs) {
            out.push(one(*count, yaml)?);
        }
    }
    let points = per
        .into_iter()
        .zip(&docs)
        .map(|((policies, rows), yaml)| {
            let col = |f: fn(&Sample) -> f64| rows.iter().map(f).collect::<Vec<_>>();
            let (l, a, d) = (col(|r| r.0), col(|r| r.1), col(|r| r.2));
            Point {
                policies,
                yaml_bytes: yaml.len(),
                load_ms: median(&l),
                allowed_us: median(&a),
                denied_us: median(&d),
                rounds_load_ms: l,
                rounds_allowed_us: a,
                rounds_denied_us: d,
            }
        })
        .collect();
    Ok(Report { rounds, points })
}

/// `(load ms, allowed decision µs, denied decision µs)` for one policy set.
fn one(count: usize, yaml: &str) -> Result<Sample> {
    let cpu = thread_cpu_ns()?;
    let set = load_documents(&[("scale.yaml".to_owned(), yaml.to_owned())])
        .map_err(|e| anyhow::anyhow!("generated policies rejected:\n{e}"))?;
    let engine = Engine::new(set, Settings::default(), inventory());
    let load_ms = (thread_cpu_ns()? - cpu) as f64 / 1e6;

    // Policy 0 (ns0, app0) allows ns0/sa0 on port 9000; ns99/sa4 matches nothing there.
    let allowed_peer: SpiffeId = "spiffe://cluster.local/ns/ns0/sa/sa0"
        .parse()
        .context("id")?;
    let denied_peer: SpiffeId = "spiffe://cluster.local/ns/ns99/sa/sa4"
        .parse()
        .context("id")?;
    let dst = SocketAddr::new(pod_ip(0, 0), 9000);
    let allowed = InboundRequest {
        source: SocketAddr::new(pod_ip(0, 0), 40000),
        destination: dst,
        peer: Some(&allowed_peer),
    };
    let denied = InboundRequest {
        source: SocketAddr::new(pod_ip(99, 4), 40000),
        destination: dst,
        peer: Some(&denied_peer),
    };
    if !engine.inbound(&allowed).is_allowed() || engine.inbound(&denied).is_allowed() {
        bail!("{count} policies: the probe decisions are not the expected allow and deny");
    }
    let time = |req: &InboundRequest<'_>| -> Result<f64> {
        let budget = Duration::from_millis(200);
        let start = Instant::now();
        let cpu = thread_cpu_ns()?;
        let mut n = 0u64;
        while n < 100 || start.elapsed() < budget {
            for _ in 0..100 {
                std::hint::black_box(engine.inbound(std::hint::black_box(req)).is_allowed());
            }
            n += 100;
        }
        Ok((thread_cpu_ns()? - cpu) as f64 / 1e3 / n as f64)
    };
    Ok((load_ms, time(&allowed)?, time(&denied)?))
}

use crate::procs::thread_cpu_ns;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| AuthorizationPolicies | YAML KB | load + compile, ms CPU | inbound allowed, µs | inbound denied, µs |\n|---|---|---|---|---|\n",
        );
        for p in &self.points {
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.1} | {:.2} | {:.2} |",
                p.policies,
                p.yaml_bytes as f64 / 1e3,
                p.load_ms,
                p.allowed_us,
                p.denied_us
            );
        }
        s
    }

    pub fn svg(&self) -> String {
        let pts = |f: fn(&Point) -> f64| -> Vec<(f64, f64)> {
            self.points
                .iter()
                .map(|p| (p.policies as f64, f(p)))
                .collect()
        };
        let charts = [
            Chart {
                title: "policy load (reload) time",
                x_label: "AuthorizationPolicies",
                y_label: "ms CPU",
                log_x: true,
                log_y: true,
                series: vec![Series {
                    name: "parse + compile",
                    color: "#7570b3",
                    points: pts(|p| p.load_ms),
                }],
            },
            Chart {
                title: "inbound decision per connection",
                x_label: "AuthorizationPolicies",
                y_label: "µs CPU",
                log_x: true,
                log_y: true,
                series: vec![
                    Series {
                        name: "allowed",
                        color: "#1b9e77",
                        points: pts(|p| p.allowed_us),
                    },
                    Series {
                        name: "denied",
                        color: "#d95f02",
                        points: pts(|p| p.denied_us),
                    },
                ],
            },
        ];
        page(
            "Policy scaling (interceptor-bench scale-policy)",
            &charts,
            2,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_policies_load_and_decide_as_probed() {
        let (load, allowed, denied) = one(10, &policies(10)).unwrap();
        assert!(load > 0.0 && allowed > 0.0 && denied > 0.0);
    }
}
