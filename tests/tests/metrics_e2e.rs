//! Observability end to end (issue 13 §1): the agent's `/metrics` scraped by a real
//! Prometheus (Debian's `prometheus`, installed by `cargo xtask setup`), after a known curl
//! matrix: mesh mTLS allowed, plaintext passthrough to a pod outside the mesh, an
//! AuthorizationPolicy DENY and plaintext to a STRICT port. The counts are read back through
//! Prometheus' HTTP API and must be exact per direction, mode and reason; `promtool check
//! metrics` must accept the exposition; `/debug/flows` (what `interceptor flows --json --all`
//! prints) must agree with the counters; `/healthz` and `/readyz` answer.
//!
//! Host only: the counts do not depend on the record layer (the mesh mode is `userspace`
//! here, `ktls` where the kernel offloads).

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use interceptor::intercept::table::Protection;
use interceptor_tests::{
    agent::{PinCleanup, RunningAgent, TempDir},
    mesh::{PolicyDir, STRICT_HTTPBIN, curl, httpbin_root, serve_http, service, workload},
    process::{AgentProcess, access_lines, assert_log_bytes_match},
    require_privileged,
    scenario::{self, expected_protection},
    topology::Node,
};

/// Beside [`STRICT_HTTPBIN`]: the intruder may not reach httpbin.
const DENY_INTRUDER: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-intruder
  namespace: full
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/full/sa/intruder]
";

/// A Prometheus server on loopback scraping one target every second, with its own storage;
/// killed (and its storage removed) on drop, however the test ends.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr").port()
}

fn binary(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is missing: install the Debian package `prometheus` (`cargo xtask setup`)"
            )
        })
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: interceptor\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus.yml");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("log");
        let child = Command::new(binary("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(&format!("http://{addr}/-/ready")).0 != 200 {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 20 s: {}",
                std::fs::read_to_string(p._dir.0.join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// An instant query's samples as `(labels, value)`.
    fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let out = Command::new("curl")
            .args(["-s", "-m", "5", "-G"])
            .arg(format!("http://{}/api/v1/query", self.addr))
            .arg("--data-urlencode")
            .arg(format!("query={promql}"))
            .output()
            .expect("curl the query API");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{promql}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(v["status"], "success", "{promql}: {v}");
        v["data"]["result"]
            .as_array()
            .expect("vector result")
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let value = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .expect("sample value");
                (labels, value)
            })
            .collect()
    }

    /// Whether Prometheus accepts `promql` (it parses and evaluates).
    fn accepts(&self, promql: &str) -> Result<(), String> {
        let out = Command::new("curl")
            .args(["-s", "-m", "5", "-G"])
            .arg(format!("http://{}/api/v1/query", self.addr))
            .arg("--data-urlencode")
            .arg(format!("query={promql}"))
            .output()
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}"))?;
        if v["status"] == "success" {
            Ok(())
        } else {
            Err(v.to_string())
        }
    }

    /// `sum by (by) (promql)` as `label value → count`.
    fn sum_by(&self, promql: &str, by: &str) -> BTreeMap<String, u64> {
        self.query(&format!("sum by ({by}) ({promql})"))
            .into_iter()
            .map(|(l, v)| {
                let key = by
                    .split(',')
                    .map(|k| l.get(k.trim()).cloned().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("/");
                (key, v as u64)
            })
            .filter(|(_, v)| *v > 0)
            .collect()
    }

    /// Waits until Prometheus has scraped `want` for `sum_by(promql, by)` (at most 15 s),
    /// then returns what it holds, so the caller's assertion shows the difference.
    fn settled(
        &self,
        promql: &str,
        by: &str,
        want: &BTreeMap<String, u64>,
    ) -> BTreeMap<String, u64> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self.sum_by(promql, by);
            if &got == want || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET with curl: status and body.
fn http_get(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-o", "-", "-w", "\n%{http_code}", url])
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn map(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

#[test]
fn prometheus_scrapes_exact_counts_after_a_curl_matrix() {
    require_privileged();
    let node = Node::new(83);
    let mut httpbin = node.pod("httpbin", 10);
    let sleep = node.pod("sleep", 11);
    let intruder = node.pod("intruder", 12);
    let mut outside = node.pod("outside", 30);
    let www = httpbin_root();
    serve_http(&mut httpbin, &www.0, 80);
    serve_http(&mut outside, &www.0, 8080);
    let cluster = scenario::Cluster::new("metricse2e");
    let policy = PolicyDir::new();
    policy.write(
        "10-httpbin.yaml",
        &format!("{STRICT_HTTPBIN}---\n{DENY_INTRUDER}"),
    );
    let mut config = cluster.config(
        vec![
            workload(&httpbin, "full", "httpbin", &[("app", "httpbin")]),
            workload(&sleep, "full", "sleep", &[("app", "sleep")]),
            workload(&intruder, "full", "intruder", &[("app", "intruder")]),
        ],
        vec![],
    );
    config.policy_dir = Some(policy.path());
    // Exact handshake counts: every mesh connection a handshake (derived connections are
    // none). `access_log_has_one_json_line_per_connection` runs in the default.
    config.tuning.connection_keys = interceptor::config::ConnectionKeysMode::Handshake;
    // Plaintext passthrough: a service whose endpoint is outside the mesh (the agent steers
    // service VIPs and mesh workloads, nothing else).
    let outside_vip = std::net::Ipv4Addr::new(10, 96, 83, 30);
    config.services = vec![service(
        "outside",
        "legacy",
        Some(outside_vip),
        8080,
        8080,
        &[&outside],
    )];
    config.observability.access_log.format = interceptor::config::AccessLogFormat::Json;
    let agent = RunningAgent::start(config);
    let agent = &agent.agent;
    let listen = agent.observability_addr().expect("observability listener");
    let mesh = match expected_protection() {
        Protection::Ktls => "ktls",
        _ => "userspace",
    };

    // Health and readiness before anything else: every start-up step is done.
    assert_eq!(
        http_get(&format!("http://{listen}/healthz")),
        (200, "ok\n".into())
    );
    assert_eq!(
        http_get(&format!("http://{listen}/readyz")),
        (200, "ready\n".into())
    );
    // Not reachable from a pod: the listener is on the node's loopback, and a pod's loopback
    // is its own network namespace's.
    assert!(listen.ip().is_loopback(), "{listen}");
    let from_pod = curl(
        sleep.command("curl"),
        &format!("http://{listen}/metrics"),
        &[],
    );
    assert_eq!(from_pod.code, "000", "a pod reached /metrics: {from_pod:?}");
    let prometheus = Prometheus::start(listen);

    // The matrix. Each curl is checked, so a count that matches for the wrong reason fails.
    let to_httpbin = format!("http://{}:80/headers", httpbin.ip);
    let to_outside = format!("http://{outside_vip}:8080/headers");
    for _ in 0..3 {
        let c = curl(sleep.command("curl"), &to_httpbin, &[]);
        assert_eq!(c.code, "200", "mTLS sleep → httpbin: {c:?}");
    }
    for _ in 0..2 {
        let c = curl(sleep.command("curl"), &to_outside, &[]);
        assert_eq!(c.code, "200", "passthrough sleep → outside: {c:?}");
    }
    for _ in 0..2 {
        let c = curl(intruder.command("curl"), &to_httpbin, &[]);
        assert_eq!(c.code, "000", "DENY intruder → httpbin: {c:?}");
    }
    for _ in 0..2 {
        let c = curl(outside.command_unenrolled("curl"), &to_httpbin, &[]);
        assert_eq!(c.code, "000", "plaintext outside → STRICT httpbin: {c:?}");
    }

    // Refusals: exact per direction and reason, nothing else refused.
    let want = map(&[
        ("inbound/deny_rule", 2),
        ("inbound/plaintext_refused_strict", 2),
    ]);
    let got = prometheus.settled(
        "interceptor_connections_refused_total",
        "direction,reason",
        &want,
    );
    assert_eq!(got, want, "refusals in Prometheus");

    // Flows sleep opened, by direction and mode: 3 mTLS out and in (the server side sees
    // sleep as the source), 2 passthrough out. All closed again.
    let sleep_flows = "{source_workload=\"sleep\",source_workload_namespace=\"full\"}";
    let want = map(&[
        (&format!("inbound/{mesh}"), 3),
        (&format!("outbound/{mesh}"), 3),
        ("outbound/passthrough", 2),
    ]);
    let got = prometheus.settled(
        &format!("istio_tcp_connections_opened_total{sleep_flows}"),
        "direction,mode",
        &want,
    );
    assert_eq!(got, want, "flows opened by sleep");
    let got = prometheus.settled(
        &format!("istio_tcp_connections_closed_total{sleep_flows}"),
        "direction,mode",
        &want,
    );
    assert_eq!(got, want, "flows closed by sleep");
    // The mTLS ones carry both principals and Istio's security policy label.
    let got = prometheus.sum_by(
        "istio_tcp_connections_opened_total{connection_security_policy=\"mutual_tls\",\
         source_principal=\"spiffe://cluster.local/ns/full/sa/sleep\",\
         destination_principal=\"spiffe://cluster.local/ns/full/sa/httpbin\",\
         destination_workload=\"httpbin\"}",
        "reporter",
    );
    assert_eq!(
        got,
        map(&[("destination", 3), ("source", 3)]),
        "mTLS labels"
    );

    // Handshakes: httpbin's agent side finished 5 (3 allowed, 2 denied after the handshake).
    let got = prometheus.sum_by(
        "interceptor_handshake_duration_seconds_count{workload=\"httpbin\"}",
        "direction",
    );
    assert_eq!(got, map(&[("inbound", 5)]), "handshakes");

    // `/debug/flows?all` (= `interceptor flows --json --all`) agrees with the counters: the
    // same flows by direction and mode, and the same bytes.
    let (status, body) = http_get(&format!("http://{listen}/debug/flows?all"));
    assert_eq!(status, 200);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).expect("flows json");
    let mut by_mode = BTreeMap::new();
    let mut request_bytes = 0;
    for r in &rows {
        let key = format!(
            "{}/{}",
            r["direction"].as_str().unwrap(),
            r["mode"].as_str().unwrap()
        );
        *by_mode.entry(key).or_insert(0u64) += 1;
        if r["direction"] == "outbound" {
            request_bytes += r["bytes_to_peer"].as_u64().unwrap();
        }
    }
    let metric = prometheus.settled(
        "istio_tcp_connections_closed_total",
        "direction,mode",
        &by_mode,
    );
    assert_eq!(
        by_mode, metric,
        "/debug/flows vs the closed counter\n{body}"
    );
    let bytes = prometheus.sum_by(
        "istio_tcp_received_bytes_total{direction=\"outbound\"}",
        "direction",
    );
    assert_eq!(bytes, map(&[("outbound", request_bytes)]), "request bytes");
    assert!(request_bytes > 0);

    // Open flows are back to zero; one pod per workload is enrolled.
    let open = prometheus.query("sum(interceptor_open_flows)");
    assert_eq!(open.first().map(|s| s.1), Some(0.0), "open flows");
    let enrolled = prometheus.query("interceptor_enrolled_pods");
    assert_eq!(enrolled.first().map(|s| s.1), Some(3.0), "enrolled pods");
    let leaves = prometheus.query("interceptor_certificate_expiry_seconds > 3600");
    assert_eq!(
        leaves.len(),
        3,
        "a valid leaf per identity that handshook: {leaves:?}"
    );

    // The exposition passes promtool's linter.
    let (status, text) = http_get(&format!("http://{listen}/metrics"));
    assert_eq!(status, 200);
    let mut check = Command::new(binary("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use std::io::Write as _;
        check
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("feed promtool");
    }
    let out = check.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every query of the Grafana dashboard parses, and names only metrics the agent serves.
    let dashboard: serde_json::Value = serde_json::from_str(include_str!(
        "../../deploy/grafana/interceptor-dashboard.json"
    ))
    .expect("dashboard json");
    let served: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let promql = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*")
                .replace("$namespace", ".*")
                .replace("$workload", ".*");
            if let Err(e) = prometheus.accepts(&promql) {
                panic!("dashboard panel {}: {promql}: {e}", panel["title"]);
            }
            let names = promql
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("istio_") || w.starts_with("interceptor_"));
            for name in names {
                let family = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                assert!(
                    served.contains(name) || served.contains(family),
                    "dashboard panel {} uses {name}, which /metrics does not serve",
                    panel["title"]
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} dashboard queries");

    // The config without key material.
    let (status, body) = http_get(&format!("http://{listen}/debug/config"));
    assert_eq!(status, 200);
    assert!(body.contains("\"caDir\""), "{body}");
    assert!(!body.contains("PRIVATE KEY"), "{body}");
}

/// The access log of the real binary: one JSON line per connection on stdout, whatever
/// `INTERCEPTOR_LOG` says, agreeing with `interceptor flows --json --all` on bytes and
/// identities.
#[test]
fn access_log_has_one_json_line_per_connection() {
    require_privileged();
    let node = Node::new(84);
    let mut httpbin = node.pod("httpbin", 10);
    let sleep = node.pod("sleep", 11);
    let legacy = node.pod("legacy", 30);
    let www = httpbin_root();
    serve_http(&mut httpbin, &www.0, 80);
    let cluster = scenario::Cluster::new("accesslog");
    let mut config = cluster.config(
        vec![
            workload(&httpbin, "full", "httpbin", &[("app", "httpbin")]),
            workload(&sleep, "full", "sleep", &[("app", "sleep")]),
        ],
        vec![],
    );
    let _pins = PinCleanup(config.bpffs.clone());
    let (agent, log_path) = AgentProcess::start_logging_json(&mut config, &cluster.scratch.0);
    let url = format!("http://{}:80/headers", httpbin.ip);
    let c = curl(sleep.command("curl"), &url, &[]);
    assert_eq!(c.code, "200", "mTLS: {c:?}");
    let c = curl(legacy.command_unenrolled("curl"), &url, &[]);
    assert_eq!(c.code, "200", "plaintext from outside the mesh: {c:?}");

    // sleep's outbound and httpbin's inbound of the mTLS request, and the inbound plaintext.
    let lines = access_lines(&log_path, 3);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let flows = agent.flows();
    let mesh = match expected_protection() {
        Protection::Ktls => "ktls",
        _ => "userspace",
    };
    for (direction, pod, mode, src) in [
        (
            "outbound",
            "sleep",
            mesh,
            Some("spiffe://cluster.local/ns/full/sa/sleep"),
        ),
        (
            "inbound",
            "httpbin",
            mesh,
            Some("spiffe://cluster.local/ns/full/sa/sleep"),
        ),
        ("inbound", "httpbin", "passthrough", None),
    ] {
        let line = lines
            .iter()
            .find(|l| l["direction"] == direction && l["pod"] == pod && l["mode"] == mode)
            .unwrap_or_else(|| panic!("no {direction} {pod} {mode} line in {lines:#?}"));
        assert_eq!(line["event"], "flow_closed");
        assert_eq!(line["outcome"], "closed", "{line}");
        assert_eq!(line["src_spiffe"].as_str(), src, "{line}");
        assert_eq!(line["ktls"], mode == "ktls", "{line}");
        assert_eq!(line["dst_workload"], "httpbin", "{line}");
        if mode != "passthrough" {
            assert_eq!(
                line["dst_spiffe"],
                "spiffe://cluster.local/ns/full/sa/httpbin"
            );
            assert!(
                line["cipher"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("TLS13_")),
                "{line}"
            );
        }
        // The same bytes as the flow table's row of that connection.
        let row = flows
            .iter()
            .find(|r| {
                r.source.to_string() == line["src_addr"].as_str().unwrap_or_default()
                    && r.pod == pod
            })
            .unwrap_or_else(|| panic!("no flow row for {line}"));
        assert_log_bytes_match(line, row);
        assert!(row.bytes_from_peer > 0 && row.bytes_to_peer > 0, "{row:?}");
    }
}
