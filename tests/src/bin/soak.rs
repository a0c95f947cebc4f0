//! `cargo xtask soak`: the real agent under mixed load for a long time, to find what only time
//! finds (memory or descriptors that grow, a flow that goes wrong once in ten thousand).
//!
//! One node, two enrolled pods: the client pod runs connection churn (curl fetching a small
//! file over 20 fresh connections per run), a bulk download and a bulk upload in loops, all
//! to the server pod over mTLS. Every body is checked byte for byte (exact bytes or SHA-256);
//! the server pod's link is captured without a gap (each 10 s window starts before the
//! previous one stops) and every window is searched for plaintext of the payload. Every 10 s
//! the agent's resident memory and descriptors are sampled.
//!
//! Fails (exit 1) on any failed or corrupted transfer, any plaintext on the wire, resident
//! memory at the end above the value after warm-up by more than [`RSS_GROWTH`], or
//! descriptors after the load stops above the idle baseline by more than [`FD_SLACK`].
//!
//! `soak [--minutes N]` (default 10)

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use interceptor_tests::{
    agent::{PinCleanup, workload},
    apps::{serve_upload_hasher, sha256_hex},
    mesh::curl,
    process::AgentProcess,
    require_privileged,
    scenario::{Cluster, Scenario, serve_blob},
    topology::Pod,
    wire::{Capture, PlaintextIndex},
};

/// Resident memory at the end may exceed the value after warm-up by this share.
const RSS_GROWTH: f64 = 0.20;
/// Descriptors once the load has stopped may exceed the idle baseline by this many.
const FD_SLACK: usize = 4;
const SAMPLE: Duration = Duration::from_secs(10);
/// Connections per churn run (one curl, one fresh connection per URL: busybox httpd closes
/// each after its response).
const CHURN_BATCH: usize = 20;
const BULK: usize = 16 << 20;
const UPLOAD: usize = 4 << 20;

#[derive(Default)]
struct Totals {
    connections: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
}

impl Totals {
    fn fail(&self, what: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        eprintln!("soak: FAILED {what}");
    }
}

fn parse_minutes() -> f64 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => 10.0,
        [flag, n] if flag == "--minutes" => n
            .parse()
            .ok()
            .filter(|m: &f64| *m > 0.0)
            .unwrap_or_else(|| panic!("--minutes wants a positive number, got {n:?}")),
        other => panic!("usage: soak [--minutes N] (got {other:?})"),
    }
}

fn main() {
    require_privileged();
    let minutes = parse_minutes();
    let ok = run(Duration::from_secs_f64(minutes * 60.0));
    std::process::exit(if ok { 0 } else { 1 });
}

/// Runs `job` in a loop on its own thread until `stop`.
fn looping(
    stop: &Arc<AtomicBool>,
    mut job: impl FnMut() + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            job();
        }
    })
}

fn churn(client: &Pod, url: &str, small: &[u8], totals: &Totals) {
    let urls: Vec<&str> = std::iter::repeat_n(url, CHURN_BATCH).collect();
    let out = client
        .command("curl")
        .args(["-s", "-m", "30", "-w", "%{http_code}\n"])
        .args(&urls)
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let mut want = Vec::new();
    for _ in 0..CHURN_BATCH {
        want.extend_from_slice(small);
        want.extend_from_slice(b"200\n");
    }
    totals
        .connections
        .fetch_add(CHURN_BATCH as u64, Ordering::Relaxed);
    if out.stdout == want && out.status.success() {
        totals
            .bytes
            .fetch_add(small.len() as u64 * CHURN_BATCH as u64, Ordering::Relaxed);
    } else {
        totals.fail(&format!(
            "churn run: curl {}, {} of {} bytes as expected",
            out.status,
            out.stdout
                .iter()
                .zip(&want)
                .take_while(|(a, b)| a == b)
                .count(),
            want.len()
        ));
    }
}

fn run(duration: Duration) -> bool {
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(97, "soakc", "soaks");
    let www = serve_blob(&mut server, "soakwww", BULK);
    let small_len = 4 << 10;
    www.add("small", small_len);
    let upload_want = www.add("upload", UPLOAD);
    serve_upload_hasher(&server, 8080);
    let payload = Arc::new(www.payload.clone());

    let cluster = Cluster::new("soak");
    let cfg = cluster.config(
        vec![
            workload(&client, "soak", "client"),
            workload(&server, "soak", "server"),
        ],
        vec![],
    );
    let pins = PinCleanup(cfg.bpffs.clone());
    let agent = AgentProcess::start(&cfg, &cluster.scratch.0.join("node.yaml"));
    std::thread::sleep(Duration::from_secs(1));
    let fd_baseline = agent.fd_count();
    let rss_start = agent.rss_kib();
    println!(
        "soak: {:.1} min; agent pid {} idle: RSS {rss_start} KiB, {fd_baseline} fds",
        duration.as_secs_f64() / 60.0,
        agent.pid()
    );

    // The first window starts before the load does.
    let first_window = Capture::start_in(&node.ns.path(), &server.host_if);
    let totals = Arc::new(Totals::default());
    let stop = Arc::new(AtomicBool::new(false));
    let client = Arc::new(client);
    let base = format!("http://{}", server.ip);
    let mut workers = Vec::new();
    workers.push(looping(&stop, {
        let (client, totals) = (Arc::clone(&client), Arc::clone(&totals));
        let url = format!("{base}/small");
        let small = payload[..small_len].to_vec();
        move || churn(&client, &url, &small, &totals)
    }));
    workers.push(looping(&stop, {
        let (client, totals) = (Arc::clone(&client), Arc::clone(&totals));
        let url = format!("{base}/blob");
        let want = www.want.clone();
        move || {
            let f = curl(
                client.command("curl"),
                &url,
                &["--limit-rate", "2M", "-m", "60"],
            );
            totals.connections.fetch_add(1, Ordering::Relaxed);
            if f.code == "200" && sha256_hex(&f.body) == want {
                totals.bytes.fetch_add(BULK as u64, Ordering::Relaxed);
            } else {
                totals.fail(&format!(
                    "bulk download: HTTP {}, curl exit {}, {} bytes",
                    f.code,
                    f.exit,
                    f.body.len()
                ));
            }
        }
    }));
    workers.push(looping(&stop, {
        let (client, totals) = (Arc::clone(&client), Arc::clone(&totals));
        let url = format!("http://{}:8080/", server.ip);
        let file = www.path().join("upload").display().to_string();
        move || {
            let f = curl(
                client.command("curl"),
                &url,
                &[
                    "--limit-rate",
                    "1M",
                    "-m",
                    "60",
                    "-H",
                    "Expect:",
                    "-T",
                    &file,
                ],
            );
            totals.connections.fetch_add(1, Ordering::Relaxed);
            if f.code == "200" && f.body == upload_want.as_bytes() {
                totals.bytes.fetch_add(UPLOAD as u64, Ordering::Relaxed);
            } else {
                totals.fail(&format!(
                    "bulk upload: HTTP {}, curl exit {}, answer {:?}",
                    f.code,
                    f.exit,
                    String::from_utf8_lossy(&f.body)
                ));
            }
        }
    }));

    // The wire check runs on its own thread, so the samples keep their 10 s cadence however
    // long a window takes to search. The next window starts before the previous one stops:
    // no byte goes unchecked.
    let wire_bytes = Arc::new(AtomicU64::new(0));
    let clear = Arc::new(AtomicU64::new(0));
    // Stopped only once the load has: the last transfers are captured too.
    let wire_stop = Arc::new(AtomicBool::new(false));
    let checker = {
        let (stop, wire_bytes, clear) = (
            Arc::clone(&wire_stop),
            Arc::clone(&wire_bytes),
            Arc::clone(&clear),
        );
        let (netns, ifname, payload) =
            (node.ns.path(), server.host_if.clone(), Arc::clone(&payload));
        std::thread::spawn(move || {
            let index = PlaintextIndex::new(&payload);
            let check = |streams: &interceptor_tests::wire::Streams| {
                for s in &streams.streams {
                    wire_bytes.fetch_add(s.bytes.len() as u64, Ordering::Relaxed);
                    if let Some((at, off, len)) = index.find_in(&s.bytes) {
                        clear.fetch_add(len as u64, Ordering::Relaxed);
                        eprintln!(
                            "soak: FAILED plaintext on the wire: {len} bytes of the payload (offset {off}) at byte {at} of {} -> {}",
                            s.src, s.dst
                        );
                    }
                }
            };
            let mut capture = first_window;
            loop {
                let last = stop.load(Ordering::Relaxed);
                if !last {
                    std::thread::sleep(SAMPLE);
                }
                let next = (!last).then(|| Capture::start_in(&netns, &ifname));
                let streams = match next {
                    Some(next) => std::mem::replace(&mut capture, next).stop_streams(),
                    None => {
                        let streams = capture.stop_streams();
                        check(&streams);
                        return;
                    }
                };
                check(&streams);
            }
        })
    };
    let warm_up = (duration / 10).clamp(Duration::from_secs(10), Duration::from_secs(60));
    let mut rss_warm = None;
    let mut rss_max = 0;
    let mut fds_max = 0;
    let started = Instant::now();
    while started.elapsed() < duration {
        std::thread::sleep(SAMPLE.min(duration.saturating_sub(started.elapsed())));
        let (rss, fds) = (agent.rss_kib(), agent.fd_count());
        rss_max = rss_max.max(rss);
        fds_max = fds_max.max(fds);
        if rss_warm.is_none() && started.elapsed() >= warm_up {
            rss_warm = Some(rss);
        }
        println!(
            "soak: t={:>4}s RSS {rss} KiB, {fds} fds; {} connections, {} MiB checked, {} MiB of wire searched, {} clear bytes, {} failures",
            started.elapsed().as_secs(),
            totals.connections.load(Ordering::Relaxed),
            totals.bytes.load(Ordering::Relaxed) >> 20,
            wire_bytes.load(Ordering::Relaxed) >> 20,
            clear.load(Ordering::Relaxed),
            totals.failures.load(Ordering::Relaxed),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    wire_stop.store(true, Ordering::Relaxed);
    checker.join().expect("wire checker");
    let (wire_bytes, clear) = (
        wire_bytes.load(Ordering::Relaxed),
        clear.load(Ordering::Relaxed),
    );
    // Flows end when their sockets close; give the agent a moment to reap them.
    let settle = Instant::now();
    let mut fds_end = agent.fd_count();
    while fds_end > fd_baseline + FD_SLACK && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        fds_end = agent.fd_count();
    }
    let rss_end = agent.rss_kib();
    let rss_warm = rss_warm.unwrap_or(rss_end);
    let rss_bound = (rss_warm as f64 * (1.0 + RSS_GROWTH)) as u64;
    let connections = totals.connections.load(Ordering::Relaxed);
    let bytes = totals.bytes.load(Ordering::Relaxed);
    let failures = totals.failures.load(Ordering::Relaxed);
    println!(
        "soak: done after {:.1} min: {connections} connections, {} MiB transferred and checked, \
         {} MiB of wire captured, {clear} clear bytes found, {failures} failed transfers",
        started.elapsed().as_secs_f64() / 60.0,
        bytes >> 20,
        wire_bytes >> 20
    );
    println!(
        "soak: agent RSS {rss_start} KiB idle, {rss_warm} KiB after {}s warm-up, {rss_max} KiB max, \
         {rss_end} KiB at the end (bound {rss_bound} KiB = warm-up + {:.0} %)",
        warm_up.as_secs(),
        RSS_GROWTH * 100.0
    );
    println!(
        "soak: agent fds {fd_baseline} idle, {fds_max} max under load, {fds_end} after the load \
         stopped (bound {} = idle + {FD_SLACK})",
        fd_baseline + FD_SLACK
    );
    let mut ok = true;
    for (bad, what) in [
        (failures > 0, "transfers failed or arrived corrupted"),
        (clear > 0, "payload bytes crossed the wire in clear"),
        (
            rss_end > rss_bound,
            "agent resident memory grew past its bound",
        ),
        (
            fds_end > fd_baseline + FD_SLACK,
            "agent descriptors did not return to the idle baseline",
        ),
        (connections == 0, "no load ran"),
    ] {
        if bad {
            println!("soak: FAILED: {what}");
            ok = false;
        }
    }
    if ok {
        println!("soak: ok");
    }
    drop(agent);
    drop(pins);
    drop(client);
    drop(server);
    drop(node);
    ok
}
