//! `cargo xtask soak`: the real agent in its defaults (derived connection keys) for a long
//! time, to find what only time finds: memory or descriptors that grow, a flow that goes wrong
//! once in ten thousand, and what months in a cluster do to the derived-key default (roots
//! retiring under load while several client threads share them, policy reloads, leaf
//! rotations).
//!
//! Two nodes joined by a wire, one agent each (the real binary, as two processes): a client
//! pod on the first, a server pod on the second. The client pod runs, all at once and all to
//! the server pod over mTLS:
//! - [`CHURN_THREADS`] churn threads in one process (connect, send a slice of the payload,
//!   read it echoed back, close), all to one address: they share one root and race for
//!   each fresh one;
//! - a bulk download and a bulk upload in loops (curl, rate-limited).
//!
//! Roots retire under load: the agents run with a short [`ROOT_LIFETIME`] and a small
//! [`ROOT_CAP`]. Both agents reload their policy at a third and at two thirds of the run (a
//! new generation retires every root), and both rotate their leaf about every minute
//! (`leafTtl` 5 m, `renewPercent` 20), which must retire no root: a renewed leaf keeps its
//! identity's root store (since session 15), so a renewal costs no handshake and no refused
//! header, and the bounds below allow it none.
//!
//! Every body is checked byte for byte (exact bytes or SHA-256); the link between the nodes
//! is captured without a gap (each 10 s window starts before the previous one stops) and
//! every window is searched for plaintext of the payload. Every 10 s both agents' resident
//! memory, descriptors and `flows --stats` are sampled.
//!
//! Fails (exit 1) on any failed or corrupted transfer, any plaintext on the wire, resident
//! memory at the end above the value after warm-up by more than [`RSS_GROWTH`], descriptors
//! after the load stops above the idle baseline by more than [`fd_slack`] explains, and on the
//! derived-key default degrading (see [`Bounds`]): handshakes (connections not on derived
//! keys) above what the cap, the lifetime and the reloads and rotations explain, over the run
//! and in every minute; refused derived headers (a refusal storm) above what the reloads and
//! rotations explain; the server's agent keeping roots its client does not; the server's root
//! store holding more roots than handshakes made them in the last lifetime.
//!
//! `soak [--minutes N]` (default 10). `soak churn-client PAYLOAD DST...` is the churn process
//! the soak starts in the client pod (one thread per DST, until its stdin closes).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use interceptor::config::{Config, Ttl};
use interceptor_tests::{
    agent::{PinCleanup, peer, workload},
    apps::{serve_upload_hasher, sha256_hex},
    mesh::{PolicyDir, curl, unrelated_policy},
    process::AgentProcess,
    require_privileged,
    scenario::{Cluster, serve_blob},
    topology::{Node, Pod, wire},
    wire::{Capture, PlaintextIndex},
};

/// Resident memory at the end may exceed the value after warm-up by this share.
const RSS_GROWTH: f64 = 0.20;
/// Descriptors once the load has stopped may exceed the idle baseline (taken before the first
/// connection) by this many, plus [`fd_slack`]'s kept-by-design ones.
const FD_SLACK: usize = 4;
/// Sockets an agent makes ahead per pod and family (`intercept/pod.rs` `STASH_BATCH` - 1):
/// they wait for the next dial, so up to this many stay after the load.
const STASHED_SOCKETS: usize = 7;

/// What an agent keeps open after its first connections by design: the socket stash (both
/// families of its one pod) and, per thread that made a socket in a pod's namespace, a
/// descriptor of its own namespace to return to (`sys::tcp_sockets_in`).
fn fd_slack(pid: i32) -> usize {
    let threads = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    FD_SLACK + 2 * STASHED_SOCKETS + threads
}
const SAMPLE: Duration = Duration::from_secs(10);
const BULK: usize = 16 << 20;
const UPLOAD: usize = 4 << 20;
/// The echo port of the server pod the churn threads connect to.
const ECHO_PORT: u16 = 7000;
/// Bytes each churn connection sends and gets back (a slice of the payload, so the wire
/// check covers it; above one segment).
const SLICE: usize = 2048;
/// Churn threads, all to the server's IPv4 address: they share its root and race for each
/// fresh one. (The test nodes' wire routes IPv4 only.)
const CHURN_THREADS: usize = 3;
/// Client activities that may dial at once: churn threads and the two curl loops. Each may
/// find no root when one retires and make its own handshake.
const CONCURRENCY: u64 = CHURN_THREADS as u64 + 2;
/// `derivedRootLifetimeSecs` and `derivedRootMaxConnections` of both agents: short, so roots
/// retire all the time, by both bounds.
const ROOT_LIFETIME: u64 = 15;
const ROOT_CAP: u64 = 300;
/// Leaves live 5 minutes (the minimum) and renew at 20 % of that, up to 10 % earlier.
const LEAF_TTL: Duration = Duration::from_secs(300);
const RENEW_PERCENT: u8 = 20;
/// The agents' 5 s sweep of spent and expired roots.
const SWEEP: Duration = Duration::from_secs(5);

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

fn parse_minutes(args: &[String]) -> f64 {
    match args {
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(("churn-client", rest)) = args.split_first().map(|(a, r)| (a.as_str(), r)) {
        std::process::exit(churn_client(rest));
    }
    require_privileged();
    let minutes = parse_minutes(&args);
    let ok = run(Duration::from_secs_f64(minutes * 60.0));
    std::process::exit(if ok { 0 } else { 1 });
}

/// The churn process (in the client pod's cgroup and netns, so its connections are the
/// pod's): one thread per destination, each connecting, sending a [`SLICE`] of the payload
/// at a moving offset and checking that exactly it comes back before the server closes,
/// until stdin closes. Prints `churn: N connections, M failed` at the end; exit status 0.
fn churn_client(args: &[String]) -> i32 {
    let [payload, dsts @ ..] = args else {
        eprintln!("usage: soak churn-client PAYLOAD DST...");
        return 2;
    };
    let payload = Arc::new(std::fs::read(payload).expect("read the payload"));
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let threads: Vec<_> = dsts
        .iter()
        .enumerate()
        .map(|(i, dst)| {
            let dst: SocketAddr = dst.parse().expect("DST");
            let (payload, stop, done, failed) = (
                Arc::clone(&payload),
                Arc::clone(&stop),
                Arc::clone(&done),
                Arc::clone(&failed),
            );
            std::thread::spawn(move || {
                let mut at = i * 7919;
                while !stop.load(Ordering::Relaxed) {
                    at = (at + 4099) % (payload.len() - SLICE);
                    let want = &payload[at..at + SLICE];
                    match echo_once(dst, want) {
                        Ok(()) => {}
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 20 {
                                eprintln!("soak: FAILED churn connection to {dst}: {e}");
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Runs until the soak closes our stdin.
    let _ = std::io::stdin().lock().lines().count();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    println!(
        "churn: {} connections, {} failed",
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    0
}

fn echo_once(dst: SocketAddr, want: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(want).map_err(|e| format!("send: {e}"))?;
    let mut got = Vec::with_capacity(want.len());
    s.read_to_end(&mut got)
        .map_err(|e| format!("receive after {} bytes: {e}", got.len()))?;
    if got != want {
        return Err(format!(
            "{} bytes back, {} as sent, of {}",
            got.len(),
            got.iter().zip(want).take_while(|(a, b)| a == b).count(),
            want.len()
        ));
    }
    Ok(())
}

/// The server pod's echo app on `addr` (run by the soak process, unenrolled): reads one
/// [`SLICE`], writes it back and closes (the server closes first, as HTTP/1.0 does, so the
/// client pod holds no TIME_WAIT ports).
fn serve_echo_once(pod: &Pod, addr: SocketAddr) {
    let listener = pod.ns.run(move || TcpListener::bind(addr));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                let mut buf = [0u8; SLICE];
                if conn.read_exact(&mut buf).is_ok() {
                    let _ = conn.write_all(&buf);
                }
            });
        }
    });
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

/// One sample of both agents.
struct Sample {
    at: Duration,
    client: BTreeMap<String, u64>,
    server: BTreeMap<String, u64>,
}

fn get(stats: &BTreeMap<String, u64>, name: &str) -> u64 {
    stats.get(name).copied().unwrap_or(0)
}

/// Headers the server's agent refused, by every reason.
const REFUSALS: [&str; 7] = [
    "derived.unknown",
    "derived.expired",
    "derived.generation",
    "derived.peer_expired",
    "derived.bad_mac",
    "derived.replayed",
    "derived.malformed",
];

impl Sample {
    /// Mesh connections the client pod made (connects steered to its agent).
    fn connections(&self) -> u64 {
        get(&self.client, "ConnectSteered")
    }

    /// Connections that did not go on derived keys: each made a handshake (a refused header's
    /// fallback included).
    fn handshakes(&self) -> u64 {
        self.connections()
            .saturating_sub(get(&self.client, "derived.used"))
    }

    fn refused(&self) -> u64 {
        REFUSALS.iter().map(|r| get(&self.server, r)).sum()
    }
}

/// What the derived-key default may cost in a span of the run, from its bounds alone. A root
/// retires after [`ROOT_CAP`] connections or [`ROOT_LIFETIME`], or when an event (a policy
/// reload) retires every root; after each retirement each of the [`CONCURRENCY`] client
/// activities may dial before a new root is kept, each with a handshake. A refused header
/// happens only when an event retires a root a dial is already using (the server reloaded;
/// the client's own reload retires its roots before it offers them), at most one per activity
/// per event. Leaf renewals are no events: the renewed leaf's credentials keep the store
/// (until session 15 each one emptied it, and a handshake straddling the server's renewal
/// kept its root where no header found it; the bounds counted two renewals a minute).
struct Bounds {
    /// Policy reloads the span can hold.
    events: u64,
}

impl Bounds {
    fn new(reloads: u64) -> Self {
        Self { events: reloads }
    }

    fn handshakes(&self, connections: u64, span: Duration) -> u64 {
        let retirements =
            connections.div_ceil(ROOT_CAP) + span.as_secs() / ROOT_LIFETIME + 1 + self.events;
        CONCURRENCY * retirements
    }

    fn refused(&self) -> u64 {
        CONCURRENCY * (self.events + 1)
    }
}

fn run(duration: Duration) -> bool {
    let node1 = Node::new(97);
    let node2 = Node::new(98);
    let wire_if = wire(&node1, &node2);
    let client = node1.pod("soakc", 2);
    let mut server = node2.pod("soaks", 3);
    let www = serve_blob(&mut server, "soakwww", BULK);
    let upload_want = www.add("upload", UPLOAD);
    serve_upload_hasher(&server, 8080);
    serve_echo_once(&server, SocketAddr::new(server.ip.into(), ECHO_PORT));
    let payload = Arc::new(www.payload.clone());

    let cluster = Cluster::new("soak");
    let (policy1, policy2) = (PolicyDir::new(), PolicyDir::new());
    let soak_config = |mut c: Config, policy: &PolicyDir| {
        c.policy_dir = Some(policy.path());
        c.tuning.derived_root_lifetime_secs = ROOT_LIFETIME;
        c.tuning.derived_root_max_connections = ROOT_CAP;
        c.identity.leaf_ttl = Ttl(LEAF_TTL);
        c.identity.renew_percent = RENEW_PERCENT;
        c
    };
    let c1 = soak_config(
        cluster.node_config(
            "n1",
            vec![workload(&client, "soak", "client")],
            vec![peer(&server, "soak", "server")],
        ),
        &policy1,
    );
    let c2 = soak_config(
        cluster.node_config(
            "n2",
            vec![workload(&server, "soak", "server")],
            vec![peer(&client, "soak", "client")],
        ),
        &policy2,
    );
    let pins = (PinCleanup(c1.bpffs.clone()), PinCleanup(c2.bpffs.clone()));
    // The access log (stdout) is written as in production, and thrown away: a soak makes a
    // line per connection.
    let start = |c: &Config, name: &str| {
        AgentProcess::start_logged(
            c,
            &cluster.scratch.0.join(format!("{name}.yaml")),
            &[],
            &[],
            std::path::Path::new("/dev/null"),
        )
    };
    let agents = [start(&c1, "n1"), start(&c2, "n2")];
    std::thread::sleep(Duration::from_secs(1));
    let fd_baseline = agents.each(AgentProcess::fd_count);
    let fd_kinds = agents.each(|a| fd_targets(a.pid()));
    let rss_start = agents.each(AgentProcess::rss_kib);
    println!(
        "soak: {:.1} min; agents (client node, server node) pids {:?}, idle: RSS {rss_start:?} KiB, \
         {fd_baseline:?} fds; roots: lifetime {ROOT_LIFETIME} s, cap {ROOT_CAP}; leaves: {} s, \
         renewed at {RENEW_PERCENT} %; {} churn threads, 2 bulk loops",
        duration.as_secs_f64() / 60.0,
        agents.each(AgentProcess::pid),
        LEAF_TTL.as_secs(),
        CHURN_THREADS,
    );

    // The first window starts before the load does.
    let first_window = Capture::start_in(&node1.ns.path(), &wire_if);
    let totals = Arc::new(Totals::default());
    let stop = Arc::new(AtomicBool::new(false));
    let client = Arc::new(client);
    let base = format!("http://{}", server.ip);

    let exe = std::env::current_exe().expect("the soak binary");
    let mut churn = client
        .command(&exe.to_string_lossy())
        .arg("churn-client")
        .arg(www.path().join("blob"))
        .args(vec![
            SocketAddr::new(server.ip.into(), ECHO_PORT).to_string();
            CHURN_THREADS
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the churn client");

    let mut workers = Vec::new();
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
        let (netns, ifname, payload) = (node1.ns.path(), wire_if.clone(), Arc::clone(&payload));
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
    let mut rss_max = [0; 2];
    let mut fds_max = [0; 2];
    let mut violations: Vec<String> = Vec::new();
    let reload_at = [duration / 3, duration * 2 / 3];
    let mut reloads = 0;
    let started = Instant::now();
    let mut samples = vec![Sample {
        at: Duration::ZERO,
        client: agents[0].stats(),
        server: agents[1].stats(),
    }];
    println!(
        "soak: per 10 s: conns, handshakes (per 1 000), refused headers (server: by reason), \
         client fallbacks, roots kept client/server, roots held client/server, retired; RSS, fds"
    );
    while started.elapsed() < duration {
        std::thread::sleep(SAMPLE.min(duration.saturating_sub(started.elapsed())));
        if reloads < reload_at.len() && started.elapsed() >= reload_at[reloads] {
            reloads += 1;
            for p in [&policy1, &policy2] {
                p.write(
                    &format!("reload{reloads}.yaml"),
                    &unrelated_policy(&format!("unrelated{reloads}")),
                );
            }
            println!(
                "soak: t={:>4}s policy reload {reloads} on both agents",
                started.elapsed().as_secs()
            );
        }
        let (rss, fds) = (
            agents.each(AgentProcess::rss_kib),
            agents.each(AgentProcess::fd_count),
        );
        for i in 0..2 {
            rss_max[i] = rss_max[i].max(rss[i]);
            fds_max[i] = fds_max[i].max(fds[i]);
        }
        if rss_warm.is_none() && started.elapsed() >= warm_up {
            rss_warm = Some(rss);
        }
        let now = Sample {
            at: started.elapsed(),
            client: agents[0].stats(),
            server: agents[1].stats(),
        };
        let prev = samples.last().expect("a first sample");
        let conns = now.connections() - prev.connections();
        let hs = now.handshakes() - prev.handshakes();
        let refused: Vec<String> = REFUSALS
            .iter()
            .filter_map(|r| {
                let d = get(&now.server, r) - get(&prev.server, r);
                (d > 0).then(|| format!("{}={d}", &r["derived.".len()..]))
            })
            .collect();
        let held = (
            get(&now.client, "derived.roots_client"),
            get(&now.server, "derived.roots_server"),
        );
        println!(
            "soak: t={:>4}s {conns:>6} conns, {hs:>5} handshakes ({:>4}), refused {:>3} [{}], \
             fallback {:>3}, kept {}/{}, held {}/{}, retired {}/{}; RSS {rss:?} KiB, {fds:?} fds; \
             {} MiB checked, {} MiB of wire searched, {} clear bytes, {} failures",
            now.at.as_secs(),
            (hs * 1000).checked_div(conns).unwrap_or(0),
            now.refused() - prev.refused(),
            refused.join(" "),
            get(&now.client, "derived.fallback") - get(&prev.client, "derived.fallback"),
            get(&now.client, "derived.kept") - get(&prev.client, "derived.kept"),
            get(&now.server, "derived.kept") - get(&prev.server, "derived.kept"),
            held.0,
            held.1,
            get(&now.client, "derived.retired") - get(&prev.client, "derived.retired"),
            get(&now.server, "derived.retired") - get(&prev.server, "derived.retired"),
            totals.bytes.load(Ordering::Relaxed) >> 20,
            wire_bytes.load(Ordering::Relaxed) >> 20,
            clear.load(Ordering::Relaxed),
            totals.failures.load(Ordering::Relaxed),
        );
        // The server's store holds no root older than its lifetime plus a sweep and a sample:
        // never more than the handshakes of that span made.
        let span = Duration::from_secs(ROOT_LIFETIME) + SWEEP + SAMPLE;
        let before = samples
            .iter()
            .rev()
            .find(|s| s.at + span <= now.at)
            .unwrap_or(&samples[0]);
        let made = get(&now.server, "derived.kept") - get(&before.server, "derived.kept");
        if held.1 > made + CONCURRENCY {
            violations.push(format!(
                "t={}s: the server holds {} roots, but only {made} were made in the last {} s",
                now.at.as_secs(),
                held.1,
                now.at.as_secs() - before.at.as_secs()
            ));
        }
        samples.push(now);
    }
    stop.store(true, Ordering::Relaxed);
    drop(churn.stdin.take());
    let churn_out = churn.wait_with_output().expect("the churn client");
    let churn_line = String::from_utf8_lossy(&churn_out.stdout).trim().to_owned();
    for w in workers {
        let _ = w.join();
    }
    let last = Sample {
        at: started.elapsed(),
        client: agents[0].stats(),
        server: agents[1].stats(),
    };
    wire_stop.store(true, Ordering::Relaxed);
    checker.join().expect("wire checker");
    let (wire_bytes, clear) = (
        wire_bytes.load(Ordering::Relaxed),
        clear.load(Ordering::Relaxed),
    );
    let (churn_done, churn_failed) = parse_churn(&churn_line);
    // Flows end when their sockets close; give the agents a moment to reap them.
    let settle = Instant::now();
    let mut fds_end = agents.each(AgentProcess::fd_count);
    let fd_bound = [0, 1].map(|i| fd_baseline[i] + fd_slack(agents[i].pid()));
    while (0..2).any(|i| fds_end[i] > fd_bound[i]) && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        fds_end = agents.each(AgentProcess::fd_count);
    }
    let rss_end = agents.each(AgentProcess::rss_kib);
    let rss_warm = rss_warm.unwrap_or(rss_end);
    let rss_bound = rss_warm.map(|r| (r as f64 * (1.0 + RSS_GROWTH)) as u64);
    let connections = totals.connections.load(Ordering::Relaxed) + churn_done;
    let bytes = totals.bytes.load(Ordering::Relaxed) + churn_done * SLICE as u64;
    let failures = totals.failures.load(Ordering::Relaxed) + churn_failed;
    println!(
        "soak: done after {:.1} min: {connections} connections ({churn_line}), {} MiB \
         transferred and checked, {} MiB of wire captured, {clear} clear bytes found, \
         {failures} failed transfers",
        started.elapsed().as_secs_f64() / 60.0,
        bytes >> 20,
        wire_bytes >> 20
    );

    // The derived-key default over the whole run, then minute by minute.
    let first = &samples[0];
    let whole = Bounds::new(reloads as u64);
    let (conns, hs) = (
        last.connections() - first.connections(),
        last.handshakes() - first.handshakes(),
    );
    let hs_bound = whole.handshakes(conns, last.at);
    let refused = last.refused() - first.refused();
    let fallback = get(&last.client, "derived.fallback") - get(&first.client, "derived.fallback");
    let kept = (
        get(&last.client, "derived.kept") - get(&first.client, "derived.kept"),
        get(&last.server, "derived.kept") - get(&first.server, "derived.kept"),
    );
    println!(
        "soak: derived keys: {conns} mesh connections, {hs} handshakes ({} per 1 000; bound {hs_bound}, \
         {} per 1 000), {} derived; {refused} headers refused, {fallback} fallbacks (bound {}); \
         roots kept client {} / server {}; {reloads} policy reloads, up to {} events",
        (hs * 1000).checked_div(conns).unwrap_or(0),
        (hs_bound * 1000).checked_div(conns).unwrap_or(0),
        get(&last.client, "derived.used") - get(&first.client, "derived.used"),
        whole.refused(),
        kept.0,
        kept.1,
        whole.events,
    );
    if hs > hs_bound {
        violations.push(format!(
            "{hs} handshakes in {conns} connections, above the {hs_bound} the roots' cap, \
             lifetime and the events explain"
        ));
    }
    if refused > whole.refused() || fallback > whole.refused() {
        violations.push(format!(
            "{refused} refused headers, {fallback} fallbacks: above the {} the events explain \
             (a refusal storm)",
            whole.refused()
        ));
    }
    if kept.1 > kept.0 + whole.refused() {
        violations.push(format!(
            "the server's agent kept {} roots, its client {}: roots nobody will use",
            kept.1, kept.0
        ));
    }
    let minute = Duration::from_secs(60);
    for (i, s) in samples.iter().enumerate() {
        let Some(end) = samples[i..].iter().find(|e| e.at >= s.at + minute) else {
            break;
        };
        if i % 6 != 0 {
            continue;
        }
        let span = end.at - s.at;
        // A minute holds at most both reloads.
        let b = Bounds::new(2);
        let (c, h) = (
            end.connections() - s.connections(),
            end.handshakes() - s.handshakes(),
        );
        if h > b.handshakes(c, span) {
            violations.push(format!(
                "t={}..{}s: {h} handshakes in {c} connections (bound {})",
                s.at.as_secs(),
                end.at.as_secs(),
                b.handshakes(c, span)
            ));
        }
    }
    for (i, (name, bound)) in ["client node", "server node"]
        .iter()
        .zip(rss_bound)
        .enumerate()
    {
        println!(
            "soak: {name} agent RSS {} KiB idle, {} KiB after {}s warm-up, {} KiB max, {} KiB at \
             the end (bound {bound} KiB = warm-up + {:.0} %); fds {} idle, {} max under load, {} \
             after the load stopped (bound {})",
            rss_start[i],
            rss_warm[i],
            warm_up.as_secs(),
            rss_max[i],
            rss_end[i],
            RSS_GROWTH * 100.0,
            fd_baseline[i],
            fds_max[i],
            fds_end[i],
            fd_bound[i]
        );
        if rss_end[i] > bound {
            violations.push(format!(
                "the {name} agent's resident memory grew past its bound"
            ));
        }
        if fds_end[i] > fd_bound[i] {
            violations.push(format!(
                "the {name} agent's descriptors did not return to the idle baseline: {} at \
                 the end, {} idle",
                fd_targets(agents[i].pid()).join(", "),
                fd_kinds[i].join(", ")
            ));
        }
    }
    for (bad, what) in [
        (failures > 0, "transfers failed or arrived corrupted"),
        (clear > 0, "payload bytes crossed the wire in clear"),
        (
            churn_done == 0 || conns == 0,
            "no load ran (or the agents counted none)",
        ),
        (
            get(&last.client, "derived.used") == 0,
            "no connection went on derived keys",
        ),
    ] {
        if bad {
            violations.push(what.to_owned());
        }
    }
    for v in &violations {
        println!("soak: FAILED: {v}");
    }
    let ok = violations.is_empty();
    if ok {
        println!("soak: ok");
    }
    drop(agents);
    drop(pins);
    drop(client);
    drop(server);
    drop((node1, node2));
    ok
}

/// What the process's descriptors point at, counted by kind (`socket`, `anon_inode:[eventfd]`,
/// a path), for a leak's report.
fn fd_targets(pid: i32) -> Vec<String> {
    let mut kinds = BTreeMap::<String, usize>::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(entry.path())
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        let kind = match target.split_once(":[") {
            Some((kind @ ("socket" | "pipe"), _)) => kind.to_owned(),
            _ => target,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds.into_iter().map(|(k, n)| format!("{n} {k}")).collect()
}

/// `churn: N connections, M failed` → (N, M); a missing line is one failure.
fn parse_churn(line: &str) -> (u64, u64) {
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    match nums.as_slice() {
        [done, failed] => (*done, *failed),
        _ => {
            eprintln!("soak: FAILED the churn client said {line:?}");
            (0, 1)
        }
    }
}

/// The same measurement of both agents.
trait Each {
    fn each<T>(&self, f: impl Fn(&AgentProcess) -> T) -> [T; 2];
}

impl Each for [AgentProcess; 2] {
    fn each<T>(&self, f: impl Fn(&AgentProcess) -> T) -> [T; 2] {
        [f(&self[0]), f(&self[1])]
    }
}
