use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use super::*;
use crate::{
    config::{AccessLog as Settings, AccessLogFormat},
    health::Readiness,
};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn replicas_share_their_workload_name() {
    let deploy = labels(&[("app", "web"), ("pod-template-hash", "7d9c6b5f4")]);
    assert_eq!(workload_name("web-7d9c6b5f4-x2v8q", &deploy), "web");
    assert_eq!(workload_name("web-api-7d9c6b5f4-abcde", &deploy), "web-api");
    // A hash that is not in the name: the pod is its own workload.
    assert_eq!(workload_name("other-1", &deploy), "other-1");
    let sts = labels(&[("controller-revision-hash", "db-5f6")]);
    assert_eq!(workload_name("db-0", &sts), "db");
    assert_eq!(workload_name("bare", &labels(&[])), "bare");
    // A peer has no pod name: its app label, or unknown.
    assert_eq!(workload_name("", &labels(&[("app", "httpbin")])), "httpbin");
    assert_eq!(workload_name("", &labels(&[])), UNKNOWN);
    let w = WorkloadLabels::of(
        "web-7d9c6b5f4-x2v8q",
        "shop",
        &labels(&[
            ("app", "web"),
            ("pod-template-hash", "7d9c6b5f4"),
            ("service.istio.io/canonical-name", "frontend"),
        ]),
    );
    assert_eq!(&*w.workload, "web");
    assert_eq!(&*w.canonical_service, "frontend");
    assert_eq!(&*w.app, "web");
}

fn settings(format: AccessLogFormat) -> Settings {
    Settings {
        format,
        ..Default::default()
    }
}

const CLIENT: &str = "spiffe://cluster.local/ns/a/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/b/sa/server";

fn telemetry() -> Telemetry {
    let t = Telemetry::new(&settings(AccessLogFormat::Json));
    t.add_workload(
        "client",
        &["10.0.0.1".parse().unwrap()],
        WorkloadLabels::of("client", "a", &labels(&[("app", "client")])).with_principal(CLIENT),
    );
    t.add_workload(
        "",
        &["10.0.0.2".parse().unwrap()],
        WorkloadLabels::of("", "b", &labels(&[("app", "server")])),
    );
    t
}

fn outbound(mode: Mode, peer: Option<&str>) -> FlowMeta {
    FlowMeta {
        handed_over: false,
        direction: Direction::Outbound,
        mode,
        pod: "client".into(),
        source: "10.0.0.1:40000".parse().unwrap(),
        destination: "10.96.0.1:80".parse().unwrap(),
        endpoint: Some("10.0.0.2:8080".parse().unwrap()),
        peer_principal: peer.map(str::to_owned),
        cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
        group: Some("X25519MLKEM768".into()),
        decision: Some("auto_mtls".into()),
    }
}

fn metric_lines(t: &Telemetry, name: &str) -> Vec<String> {
    t.encode(false)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(name))
        .map(str::to_owned)
        .collect()
}

#[test]
fn flows_are_counted_with_istio_labels_and_bytes_by_direction() {
    let t = telemetry();
    let flow = outbound(Mode::Ktls, Some(SERVER));
    let l = t.labels(&flow);
    assert_eq!(l.reporter, "source");
    assert_eq!(&*l.source_workload, "client");
    assert_eq!(&*l.source_principal, CLIENT);
    // The endpoint a VIP resolved to names the other end.
    assert_eq!(&*l.destination_workload, "server");
    assert_eq!(&*l.destination_workload_namespace, "b");
    assert_eq!(&*l.destination_principal, SERVER);
    assert_eq!(l.connection_security_policy, "mutual_tls");
    let held = t.flow_opened(&flow);
    assert_eq!(*held, l);
    assert!(
        Arc::ptr_eq(&held, &t.flow_opened(&flow)),
        "one copy per label set"
    );
    t.flow_closed(
        flow.direction,
        &held,
        &FlowEnd {
            outcome: Outcome::Closed,
            to_peer: 100,
            from_peer: 7_000,
            duration: Duration::from_millis(3),
            reason: None,
            failure: None,
        },
        t.admit_line().map(|format| (format, flow.clone())),
    );
    let opened = metric_lines(&t, "istio_tcp_connections_opened_total{");
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert!(opened[0].ends_with(" 2"), "{opened:?}");
    assert!(opened[0].contains("mode=\"ktls\""), "{opened:?}");
    assert!(opened[0].contains("direction=\"outbound\""), "{opened:?}");
    let closed = metric_lines(&t, "istio_tcp_connections_closed_total{");
    assert!(closed[0].contains("outcome=\"closed\"") && closed[0].ends_with(" 1"));
    // Outbound: the app is the client, so its bytes are the request (received).
    assert!(metric_lines(&t, "istio_tcp_received_bytes_total{")[0].ends_with(" 100"));
    assert!(metric_lines(&t, "istio_tcp_sent_bytes_total{")[0].ends_with(" 7000"));

    // Inbound plaintext: nothing proves the client, its principal stays unknown.
    let inbound = FlowMeta {
        handed_over: false,
        direction: Direction::Inbound,
        mode: Mode::Passthrough,
        source: "10.0.0.9:1234".parse().unwrap(),
        destination: "10.0.0.1:80".parse().unwrap(),
        endpoint: None,
        peer_principal: None,
        ..outbound(Mode::Passthrough, None)
    };
    let l = t.labels(&inbound);
    assert_eq!(l.reporter, "destination");
    assert_eq!(&*l.source_principal, UNKNOWN);
    assert_eq!(&*l.source_workload, UNKNOWN);
    assert_eq!(&*l.destination_workload, "client");
    assert_eq!(&*l.destination_principal, CLIENT);
    assert_eq!(l.connection_security_policy, "none");
    t.flow_closed(
        inbound.direction,
        &l,
        &FlowEnd {
            outcome: Outcome::Failed,
            to_peer: 5,
            from_peer: 9,
            duration: Duration::ZERO,
            reason: None,
            failure: Some("record_layer"),
        },
        t.admit_line().map(|format| (format, inbound.clone())),
    );
    let sent = metric_lines(&t, "istio_tcp_sent_bytes_total{");
    assert!(
        sent.iter()
            .any(|l| l.contains("direction=\"inbound\"") && l.ends_with(" 5")),
        "{sent:?}"
    );
    // A failure is counted by its name; every other name's series exists at zero.
    let failures = metric_lines(&t, "interceptor_flow_failures_total{");
    let count = |direction: &str, reason: &str| {
        failures
            .iter()
            .find(|l| {
                l.contains(&format!("direction=\"{direction}\""))
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
    };
    assert_eq!(
        count("inbound", "record_layer").as_deref(),
        Some("1"),
        "{failures:?}"
    );
    assert_eq!(
        count("outbound", "record_layer").as_deref(),
        Some("0"),
        "{failures:?}"
    );
    assert_eq!(
        count("inbound", "truncated").as_deref(),
        Some("0"),
        "{failures:?}"
    );
}

#[test]
fn refusals_and_handshakes_are_counted_by_bounded_labels() {
    let t = telemetry();
    let r = RefusalMeta {
        direction: Direction::Inbound,
        pod: "client",
        source: "10.0.0.9:1".parse().unwrap(),
        destination: "10.0.0.1:80".parse().unwrap(),
        endpoint: None,
        client: None,
        server: Some(CLIENT.into()),
        code: "plaintext_refused_strict",
        reason: "plaintext to a STRICT port".into(),
    };
    for _ in 0..3 {
        t.refused(Direction::Inbound, r.code, || r.clone());
    }
    t.policy_closed(Direction::Outbound, "deny_rule");
    let refused: Vec<String> = metric_lines(&t, "interceptor_connections_refused_total{")
        .into_iter()
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert_eq!(
        metric_lines(&t, "interceptor_connections_refused_total{").len(),
        2 * crate::refusal::RefusalCode::ALL.len(),
        "every direction and code from the start"
    );
    assert_eq!(
        refused,
        [
            "interceptor_connections_refused_total{direction=\"inbound\",reason=\"plaintext_refused_strict\"} 3"
        ]
    );
    t.handshake_done(
        Direction::Outbound,
        Mode::Ktls,
        "client",
        Duration::from_millis(2),
    );
    let count = metric_lines(&t, "interceptor_handshake_duration_seconds_count{");
    assert_eq!(
        count,
        [
            "interceptor_handshake_duration_seconds_count{direction=\"outbound\",mode=\"ktls\",workload=\"client\",workload_namespace=\"a\"} 1"
        ]
    );
    t.policy_reload(true);
    t.policy_reload(false);
    let mut reloads = metric_lines(&t, "interceptor_policy_reloads_total{");
    reloads.sort();
    assert_eq!(
        reloads,
        [
            "interceptor_policy_reloads_total{outcome=\"applied\"} 1",
            "interceptor_policy_reloads_total{outcome=\"rejected\"} 1"
        ]
    );
}

struct Fake;

impl Observed for Fake {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            open_flows: [((Direction::Inbound, Mode::Ktls), 4)]
                .into_iter()
                .collect(),
            enrolled_pods: 2,
            certificates: vec![(CLIENT.into(), 3600.0)],
            signer_expiry: Some(86_400.0),
            maps: vec![("ORIG_DST_BY_COOKIE", 3, 65_536)],
            datapath: vec![(snake_case("ConnectSteered"), 11)],
            ..Default::default()
        }
    }
    fn flows(&self, all: bool) -> serde_json::Value {
        serde_json::json!({ "all": all })
    }
    fn config(&self) -> serde_json::Value {
        redact(serde_json::json!({
            "caDir": "/etc/ca",
            "tls": { "privateKey": "-----BEGIN PRIVATE KEY-----", "privateKeyFile": "/k.pem" },
            "kubernetes": { "token": "abc", "kubeconfig": "/etc/kube" },
        }))
    }
}

#[test]
fn declined_tickets_are_counted_from_zero() {
    let t = telemetry();
    let name = "interceptor_resumption_tickets_declined_total";
    assert_eq!(metric_lines(&t, name), [format!("{name} 0")]);
    t.ticket_declined();
    t.ticket_declined();
    assert_eq!(metric_lines(&t, name), [format!("{name} 2")]);
}

#[test]
fn derived_key_outcomes_are_counted_by_outcome() {
    let t = telemetry();
    let name = "interceptor_derived_connections_total";
    assert!(metric_lines(&t, name).is_empty());
    t.derived("used");
    // By index: the same series as by name, before and after the index's first use.
    t.derived_at(2, "used");
    t.derived_at(11, "replayed");
    t.derived_at(2, "used");
    t.derived_at(DERIVED_SLOTS, "replayed");
    let mut lines = metric_lines(&t, name);
    lines.sort();
    assert_eq!(
        lines,
        [
            format!("{name}{{outcome=\"replayed\"}} 2"),
            format!("{name}{{outcome=\"used\"}} 3"),
        ]
    );
}

#[test]
fn scrape_time_values_come_from_the_agent() {
    let t = telemetry();
    // Before the agent exists: counters only, no error.
    assert!(!t.encode(false).unwrap().contains("interceptor_open_flows"));
    let agent: Arc<dyn Observed> = Arc::new(Fake);
    t.observe(Arc::downgrade(&agent));
    let text = t.encode(false).unwrap();
    for line in [
        "interceptor_open_flows{direction=\"inbound\",mode=\"ktls\"} 4",
        "interceptor_open_flows{direction=\"outbound\",mode=\"passthrough\"} 0",
        "interceptor_enrolled_pods 2",
        "interceptor_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/a/sa/client\"} 3600.0",
        "interceptor_signer_expiry_seconds 86400.0",
        "interceptor_bpf_map_entries{map=\"ORIG_DST_BY_COOKIE\"} 3",
        "interceptor_bpf_map_capacity{map=\"ORIG_DST_BY_COOKIE\"} 65536",
        "interceptor_bpf_events_total{event=\"connect_steered\"} 11",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }
    // OpenMetrics for Prometheus ends with its EOF marker.
    assert!(t.encode(true).unwrap().ends_with("# EOF\n"));
}

#[test]
fn debug_config_keeps_paths_and_hides_key_material() {
    let v = Fake.config();
    assert_eq!(v["caDir"], "/etc/ca");
    assert_eq!(v["tls"]["privateKey"], "[redacted]");
    assert_eq!(v["tls"]["privateKeyFile"], "/k.pem");
    assert_eq!(v["kubernetes"]["token"], "[redacted]");
    assert_eq!(v["kubernetes"]["kubeconfig"], "/etc/kube");
}

#[test]
fn access_lines_are_json_or_logfmt_with_every_field() {
    let t = telemetry();
    let flow = outbound(Mode::Ktls, Some(SERVER));
    let l = t.labels(&flow);
    let line = |format| {
        access::flow_line(
            format,
            &access::FlowLine {
                flow: &flow,
                labels: &l,
                outcome: "closed",
                reason: None,
                code: None,
                to_peer: 10,
                from_peer: 20,
                duration: Duration::from_millis(1500),
            },
        )
    };
    let json: serde_json::Value = serde_json::from_str(&line(AccessLogFormat::Json)).unwrap();
    assert_eq!(json["src_spiffe"], CLIENT);
    assert_eq!(json["dst_spiffe"], SERVER);
    assert_eq!(json["dst_workload"], "server");
    assert_eq!(json["ktls"], true);
    assert_eq!(json["bytes_sent"], 10);
    assert_eq!(json["bytes_received"], 20);
    assert_eq!(json["duration_ms"], 1500);
    assert_eq!(json["reason"], "auto_mtls");
    assert_eq!(json["cipher"], "TLS13_AES_128_GCM_SHA256");
    let logfmt = line(AccessLogFormat::Logfmt);
    assert!(logfmt.starts_with("ts="), "{logfmt}");
    assert!(logfmt.contains(" mode=ktls "), "{logfmt}");
    assert!(logfmt.contains(" ktls=true "), "{logfmt}");
    assert!(logfmt.contains(" dst_addr=10.96.0.1:80 "), "{logfmt}");
    let r = access::refusal_line(
        AccessLogFormat::Logfmt,
        &RefusalMeta {
            direction: Direction::Inbound,
            pod: "p",
            source: "10.0.0.9:1".parse().unwrap(),
            destination: "10.0.0.1:80".parse().unwrap(),
            endpoint: None,
            client: None,
            server: None,
            code: "deny_rule",
            reason: "DENY \"x\" matched".into(),
        },
    );
    assert!(r.contains(" code=deny_rule "), "{r}");
    assert!(r.ends_with(" reason=\"DENY \\\"x\\\" matched\""), "{r}");
    assert!(!r.contains("src_spiffe"), "null fields are left out: {r}");
}

#[test]
fn access_log_samples_evenly_and_rate_limits() {
    let tally = |s: Settings, n: usize| {
        let log = access::AccessLog::new(&s);
        let mut written = 0;
        let mut limited = 0;
        for _ in 0..n {
            match log.decide() {
                access::Admit::Write(_) => written += 1,
                access::Admit::RateLimited => limited += 1,
                _ => {}
            }
        }
        (written, limited)
    };
    let base = Settings {
        max_per_second: 0,
        ..Default::default()
    };
    assert_eq!(tally(base.clone(), 200), (200, 0));
    let ten = Settings {
        sample_percent: 10,
        ..base.clone()
    };
    assert_eq!(tally(ten, 200), (20, 0));
    let none = Settings {
        sample_percent: 0,
        ..base.clone()
    };
    assert_eq!(tally(none, 50), (0, 0));
    let limited = Settings {
        max_per_second: 5,
        ..base
    };
    assert_eq!(tally(limited, 50), (5, 45));
}

#[test]
fn http_routes_answer_health_readiness_metrics_and_debug() {
    use http_body_util::BodyExt as _;
    let t = telemetry();
    let ready = Readiness::default();
    let get = |t: &Telemetry, path: &str, accept: Option<&str>| {
        let mut req = hyper::Request::get(path);
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let resp = server::route(&req.body(()).unwrap(), t, &ready);
        let status = resp.status().as_u16();
        let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
        let body = futures_body(resp.into_body());
        (status, ctype, body)
    };
    fn futures_body(b: http_body_util::Full<bytes::Bytes>) -> String {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt.block_on(b.collect()).unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }
    assert_eq!(get(&t, "/healthz", None).0, 200);
    let (status, _, body) = get(&t, "/readyz", None);
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "not ready: programs_attached, ca_loaded, policy_loaded, cluster_synced\n"
    );
    ready.programs_attached.store(true, Ordering::Release);
    ready.ca_loaded.store(true, Ordering::Release);
    ready.policy_loaded.store(true, Ordering::Release);
    assert_eq!(get(&t, "/readyz", None).2, "not ready: cluster_synced\n");
    ready.cluster_synced.store(true, Ordering::Release);
    assert_eq!(get(&t, "/readyz", None).0, 200);
    let (status, ctype, body) = get(&t, "/metrics", None);
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    assert!(!body.contains("# EOF"));
    let (_, ctype, body) = get(
        &t,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    );
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(body.ends_with("# EOF\n"));
    assert_eq!(get(&t, "/debug/flows", None).0, 503, "no agent yet");
    let agent: Arc<dyn Observed> = Arc::new(Fake);
    t.observe(Arc::downgrade(&agent));
    let (status, ctype, body) = get(&t, "/debug/flows?all", None);
    assert_eq!((status, ctype.as_str()), (200, "application/json"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["all"],
        true
    );
    assert!(get(&t, "/debug/config", None).2.contains("[redacted]"));
    assert_eq!(get(&t, "/nope", None).0, 404);
    let post = hyper::Request::post("/metrics").body(()).unwrap();
    assert_eq!(server::route(&post, &t, &ready).status().as_u16(), 405);
}

/// A new agent started while the old one holds the port serves as soon as it is free (a
/// rolling update runs both for a while).
#[test]
fn listener_takes_the_port_once_the_previous_agent_lets_go() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let old = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = old.local_addr().unwrap();
        tokio::spawn(server::serve_when_free(
            addr,
            Arc::new(telemetry()),
            Arc::new(Readiness::default()),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(old);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(mut c) = tokio::net::TcpStream::connect(addr).await {
                c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut answer = String::new();
                let _ = c.read_to_string(&mut answer).await;
                if answer.starts_with("HTTP/1.1 200") {
                    assert!(answer.ends_with("ok\n"), "{answer}");
                    return;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "never served");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Retiring closes the listener at once (the successor waits for the port), even while it
/// idles in `accept` or while every connection slot is taken; `/readyz` then says why.
#[test]
fn retiring_gives_the_port_up_at_once() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(Readiness::default());
        let served = tokio::spawn(server::serve(
            listener,
            Arc::new(telemetry()),
            Arc::clone(&ready),
        ));
        // Idle connections hold slots and never send a request head.
        let mut idle = Vec::new();
        for _ in 0..40 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!served.is_finished());
        let retired_at = std::time::Instant::now();
        ready.retire();
        tokio::time::timeout(Duration::from_secs(1), served)
            .await
            .expect("listener closed within a second of retiring")
            .unwrap();
        assert!(retired_at.elapsed() < Duration::from_millis(200));
        tokio::net::TcpListener::bind(addr)
            .await
            .expect("the port is free for the successor");
        assert_eq!(
            ready.missing(),
            vec!["retired (a successor serves the pods)"]
        );
    });
}
