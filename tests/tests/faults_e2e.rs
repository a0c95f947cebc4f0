//! Fault injection on the host (userspace relay): policy flapping under load, and peer resets
//! in the handshake and mid-flow. One connection may be lost to a fault; the agent and every
//! other flow must not notice.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use interceptor_tests::{
    agent::{RunningAgent, workload},
    apps::{busybox, serve_upload_hasher, sha256_hex},
    mesh::{NcSession, PolicyDir, curl, echo_server, stats_delta},
    require_privileged,
    scenario::{Cluster, Scenario, serve_blob},
    wire::{Capture, assert_no_plaintext},
};

/// A mesh-wide PeerAuthentication in `mode`, and an AuthorizationPolicy that lets the
/// service accounts `accounts` of namespace `ns` (and no one else) reach the pods of `ns`
/// labelled `app: <server>`.
fn mesh_policy(mode: &str, ns: &str, server: &str, accounts: &[&str]) -> String {
    let principals = accounts
        .iter()
        .map(|sa| format!("cluster.local/ns/{ns}/sa/{sa}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: {mode}
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: server
  namespace: {ns}
spec:
  selector:
    matchLabels:
      app: {server}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [{principals}]
"
    )
}

/// Bulk flows through a path both generations allow, while the policy alternates every
/// 100 ms (each change a new generation that decides every open flow again): every transfer
/// arrives byte-exact and none is closed, while the other pod's flows, which generation B
/// refuses, are closed by the flapping (so the re-decisions really ran).
#[test]
fn policy_flapping_every_100ms_leaves_allowed_bulk_flows_byte_exact() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(92, "ffc", "ffs");
    let other = node.pod("ffx", 4);
    let www = serve_blob(&mut server, "ffwww", 1 << 20);
    serve_upload_hasher(&server, 8080);
    // Generation A: STRICT, and both the client and the other pod may reach the server.
    let policy_a = mesh_policy("STRICT", "ff", "ffs", &["client", "other"]);
    // Generation B: PERMISSIVE, and only the client may reach the server.
    let policy_b = mesh_policy("PERMISSIVE", "ff", "ffs", &["client"]);
    let policy = PolicyDir::with("mesh.yaml", &policy_a);
    let cluster = Cluster::new("fflap");
    let pods = [(&client, "client"), (&server, "server"), (&other, "other")];
    let mut cfg = cluster.config_in("ff", &pods, &policy);
    cfg.tuning.policy_poll_ms = 20;
    let agent = RunningAgent::start(cfg);
    let url = format!("http://{}/blob", server.ip);
    assert_eq!(curl(client.command("curl"), &url, &[]).code, "200");

    let capture = Capture::start_in(&node.ns.path(), &server.host_if);
    let before = agent.agent.policy_stats();
    let generation = agent.agent.policy_generation();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut loads = Vec::new();
    // Two downloads and an upload of 1 MiB at 512 KiB/s: each spans about 20 flips.
    for upload in [false, false, true] {
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        let cmd = || client.command("curl");
        let mut cmds: Vec<_> = (0..32).map(|_| cmd()).collect();
        let (url, up_url, file, want) = (
            url.clone(),
            format!("http://{}:8080/", server.ip),
            www.path().join("blob").display().to_string(),
            www.want.clone(),
        );
        loads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // Prepared up front (a command is a process in the pod's cgroup and netns);
                // on a fast machine the load simply stops when they are used up.
                let Some(cmd) = cmds.pop() else { break };
                let (code, got) = if upload {
                    let f = curl(
                        cmd,
                        &up_url,
                        &["--limit-rate", "512K", "-H", "Expect:", "-T", &file],
                    );
                    (f.code, String::from_utf8_lossy(&f.body).into_owned())
                } else {
                    let f = curl(cmd, &url, &["--limit-rate", "512K"]);
                    (f.code, sha256_hex(&f.body))
                };
                assert_eq!(
                    (code.as_str(), got.as_str()),
                    ("200", want.as_str()),
                    "an allowed {} failed or arrived corrupted under policy flapping",
                    if upload { "upload" } else { "download" }
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // The other pod's flows: allowed in A, refused in B.
    let other_load = {
        let stop = Arc::clone(&stop);
        let mut cmds: Vec<_> = (0..64).map(|_| other.command("curl")).collect();
        let (url, want) = (url.clone(), www.want.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(cmd) = cmds.pop() else { break };
                let f = curl(cmd, &url, &["--limit-rate", "512K"]);
                assert!(
                    f.code != "200" || f.exit != 0 || sha256_hex(&f.body) == want,
                    "a complete transfer of the other pod arrived corrupted"
                );
            }
        })
    };
    let started = Instant::now();
    let mut flips = 0u64;
    while started.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(100));
        flips += 1;
        policy.write(
            "mesh.yaml",
            if flips % 2 == 1 { &policy_b } else { &policy_a },
        );
    }
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        l.join().expect("an allowed flow failed (see above)");
    }
    other_load.join().expect("the other pod's load");
    let frames = capture.stop();
    let generations = agent.agent.policy_generation() - generation;
    let delta = stats_delta(&before, &agent.agent.policy_stats());
    let transfers = done.load(Ordering::Relaxed);
    println!(
        "{flips} flips, {generations} generations, {transfers} allowed transfers byte-exact; {delta:?}"
    );
    assert!(
        generations >= flips / 2,
        "the agent applied {generations} generations for {flips} flips"
    );
    assert!(
        transfers >= 6,
        "only {transfers} allowed transfers completed"
    );
    let closed_other: u64 = delta
        .iter()
        .filter(|(k, _)| k.starts_with("closed."))
        .map(|(_, v)| v)
        .sum();
    assert!(
        closed_other > 0,
        "no open flow was closed by the flapping: the re-decisions did not run ({delta:?})"
    );
    assert_no_plaintext(
        &interceptor_tests::wire::Streams::from_frames(frames),
        &www.payload,
    );
}

/// One TCP connection reset by its peer, once while the inbound handshake is under way and
/// once mid-flow on the mesh leg between the two agents' sockets: that connection ends, and
/// the agent keeps serving every other flow.
#[test]
fn peer_resets_in_handshake_and_mid_flow_cost_one_connection() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(93, "frc", "frs");
    let legacy = node.pod("frl", 4);
    let www = serve_blob(&mut server, "frwww", 64 << 10);
    echo_server(&server, 9000);
    let cluster = Cluster::new("frst");
    let agent = cluster.start(
        vec![
            workload(&client, "fr", "client"),
            workload(&server, "fr", "server"),
        ],
        vec![],
    );
    let dst = SocketAddr::from((server.ip, 9000));
    let rtt = Duration::from_secs(5);
    let inbound_sources = || -> Vec<SocketAddr> {
        agent
            .agent
            .flows()
            .iter()
            .filter(|r| r.pod == "frs")
            .map(|r| r.source)
            .collect()
    };
    let mut a = NcSession::open(client.command(busybox()), dst);
    assert_eq!(a.echo("a1", rtt).as_deref(), Some("a1"));
    let a_source = *inbound_sources()
        .first()
        .expect("inbound flow of session a");
    let mut b = NcSession::open(client.command(busybox()), dst);
    assert_eq!(b.echo("b1", rtt).as_deref(), Some("b1"));
    assert_eq!(inbound_sources().len(), 2);

    // Handshake: connections from outside the mesh that start a ClientHello offering the mesh
    // ALPN (the agent begins its handshake, or is still waiting for the rest of the record),
    // then reset.
    let before = agent.agent.policy_stats();
    let legacy_ns = legacy.netns_path();
    let hello = interceptor_tests::flood::mesh_client_hello();
    for i in 0..40 {
        let bytes = if i % 2 == 0 {
            hello.clone()
        } else {
            hello[..hello.len() / 2].to_vec()
        };
        interceptor::sys::in_netns(&legacy_ns, move || {
            let s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
            std::io::Write::write_all(&mut &s, &bytes)?;
            std::thread::sleep(Duration::from_millis(20));
            reset(&s);
            Ok(())
        })
        .expect("reset a handshake");
    }
    assert_eq!(
        a.echo("a2", rtt).as_deref(),
        Some("a2"),
        "after handshake resets"
    );
    assert_eq!(
        b.echo("b2", rtt).as_deref(),
        Some("b2"),
        "after handshake resets"
    );
    // None of them is left behind in the agent.
    let deadline = Instant::now() + Duration::from_secs(5);
    while inbound_sources().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "reset handshakes left flows behind: {:?}",
            agent.agent.flows()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Mid-flow: the server-side agent's mesh socket of session a is aborted by the kernel
    // (`ss -K`: tcp_abort sends the client's agent a RST).
    let out = std::process::Command::new("ss")
        .args(["-K", "-N", &server.ns.name, "dst"])
        .arg(a_source.ip().to_string())
        .args(["dport", "=", &format!(":{}", a_source.port())])
        .args(["sport", "=", ":9000"])
        .output()
        .expect("ss -K");
    assert!(
        out.status.success(),
        "ss -K: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        a.wait_closed(Duration::from_secs(5)).is_some(),
        "the reset flow did not end for its app"
    );
    assert_eq!(
        b.echo("b3", rtt).as_deref(),
        Some("b3"),
        "the other flow after the reset"
    );
    let f = curl(
        client.command("curl"),
        &format!("http://{}/blob", server.ip),
        &[],
    );
    assert_eq!(
        (f.code.as_str(), sha256_hex(&f.body)),
        ("200", www.want.clone()),
        "a new flow after the resets"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while inbound_sources().contains(&a_source) {
        assert!(
            Instant::now() < deadline,
            "the reset flow is still listed: {:?}",
            agent.agent.flows()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "counted: {:?}",
        stats_delta(&before, &agent.agent.policy_stats())
    );
    assert_eq!(b.echo("b4", rtt).as_deref(), Some("b4"));
}

/// Closes with SO_LINGER 0: the peer gets a RST.
fn reset(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid struct of the size passed, `s` an open socket.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

/// 10 000 connections from one pod outside the mesh to an enrolled server under STRICT, each
/// connected and silent: the agent holds at most `maxPendingHandshakesPerPod` of them while it
/// waits for a first byte, resets the rest, refuses each held one at the handshake deadline,
/// and meanwhile another pod's mTLS requests keep succeeding. The agent (the real binary, so
/// its descriptors are its own) ends with the descriptors it had before.
#[test]
fn ten_thousand_silent_connections_cost_bounded_descriptors_and_no_service() {
    use interceptor_tests::{flood::Flood, process::AgentProcess};
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(94, "fhc", "fhs");
    let flooder = node.pod("fhf", 4);
    let www = serve_blob(&mut server, "fhwww", 16 << 10);
    let policy = PolicyDir::with(
        "mesh.yaml",
        &mesh_policy("STRICT", "fh", "fhs", &["client", "other"]),
    );
    let cluster = Cluster::new("fhalf");
    let mut cfg = cluster.config_in("fh", &[(&client, "client"), (&server, "server")], &policy);
    cfg.tuning.handshake_timeout_ms = 2_000;
    let pending_cap = cfg.tuning.max_pending_handshakes_per_pod as usize;
    let _pins = interceptor_tests::agent::PinCleanup(cfg.bpffs.clone());
    let agent = AgentProcess::start(&cfg, &cluster.scratch.0.join("node.yaml"));
    let url = format!("http://{}/blob", server.ip);
    let fetch = |what: &str| {
        let f = curl(client.command("curl"), &url, &[]);
        assert_eq!(
            (f.code.as_str(), sha256_hex(&f.body)),
            ("200", www.want.clone()),
            "{what}"
        );
    };
    fetch("before the flood");
    std::thread::sleep(Duration::from_millis(500));
    let baseline = agent.fd_count();

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let requests = std::thread::spawn({
        let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
        let mut cmds: Vec<_> = (0..400).map(|_| client.command("curl")).collect();
        let (url, want) = (url.clone(), www.want.clone());
        move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(cmd) = cmds.pop() else { break };
                let f = curl(cmd, &url, &[]);
                assert_eq!(
                    (f.code.as_str(), sha256_hex(&f.body).as_str()),
                    ("200", want.as_str()),
                    "the other pod's request failed during the flood"
                );
                served.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    // Ten processes of 1 000 each: one process connecting in sequence spends its time on the
    // SYNs the full accept queue drops (those stay half-open too, on the flooder's side).
    let target = format!("{}:80", server.ip);
    let floods: Vec<Flood> = (0..10)
        .map(|_| {
            std::thread::spawn({
                let cmd = flooder.command_unenrolled(env!("CARGO_BIN_EXE_flood"));
                let target = target.clone();
                move || Flood::start(cmd, &[&target, "1000"])
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("flood"))
        .collect();
    let mut fds_max = agent.fd_count();
    let held_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < held_until {
        fds_max = fds_max.max(agent.fd_count());
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = agent.stats();
    stop.store(true, Ordering::Relaxed);
    requests
        .join()
        .expect("the other pod's requests (see above)");
    let connected: usize = floods.iter().map(|f| f.connected).sum();
    let failed: usize = floods.iter().map(|f| f.failed).sum();
    drop(floods);
    let settle = Instant::now();
    let mut fds_end = agent.fd_count();
    while fds_end > baseline + 4 && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        fds_end = agent.fd_count();
    }
    println!(
        "flood: {connected} connected, {failed} failed; other pod: {} requests served; agent fds \
         {baseline} before, {fds_max} max, {fds_end} after {:?}; refused: {:?}",
        served.load(Ordering::Relaxed),
        settle.elapsed(),
        stats
            .iter()
            .filter(|(k, v)| k.starts_with("refused.") && **v > 0)
            .collect::<Vec<_>>()
    );
    assert!(
        connected > 2 * pending_cap,
        "the flood connected only {connected} of 10 000 ({failed} failed): the cap was not tested"
    );
    assert!(
        served.load(Ordering::Relaxed) >= 5,
        "the other pod was barely served"
    );
    assert!(
        fds_max <= baseline + pending_cap + 64,
        "the agent held {fds_max} descriptors during the flood (baseline {baseline}, pending cap {pending_cap})"
    );
    assert!(
        fds_end <= baseline + 4,
        "agent descriptors did not return to the baseline: {baseline} before, {fds_end} after"
    );
    fetch("after the flood");
}
