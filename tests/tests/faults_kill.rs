//! Fault injection: the real agent process (`interceptor run`) is SIGKILLed while flows move
//! bulk data both ways. Runs on the host (userspace relay) and in both VMs (kernel TLS, whose
//! sessions die with the sockets the killed process held).
//!
//! What must hold: no payload byte ever crosses the pods' links in clear (the wire oracle,
//! over the whole run); what the apps received before the kill is an exact prefix of what was
//! sent; while the agent is down the pods fail closed (outbound mesh connects refused, inbound
//! SYNs dropped) while non-mesh traffic still flows; the restarted agent adopts the pinned
//! links and serves new flows within a second of being started.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use interceptor_tests::{
    agent::{PinCleanup, workload},
    apps::{serve_http, serve_upload_hasher},
    in_vm,
    mesh::{Curl, curl},
    process::AgentProcess,
    require_privileged,
    scenario::{Cluster, Scenario, expected_protection, serve_blob},
    topology::Pod,
    wire::{Capture, assert_no_plaintext},
};

/// Rate of the interrupted upload (curl's `--limit-rate`): the receiver reads at once, so
/// nothing piles up in socket buffers and the upload is in flight when the agent is killed.
const RATE: &str = "512K";

/// The interrupted download is paced by its server the same way: 64 KiB every 30 ms (about
/// 2 MiB/s), so almost nothing of it sits in socket buffers when the agent dies (a fast
/// server would have the whole body buffered near the client, and the kill would cut
/// nothing).
const PACE: (usize, Duration) = (64 << 10, Duration::from_millis(30));

/// An HTTP server on `port` of the pod's address, run by the test process (outside the pod's
/// cgroup), answering every request with `body` written at [`PACE`]; `sent` counts the body
/// bytes written.
fn serve_paced(pod: &Pod, port: u16, body: Arc<Vec<u8>>, sent: Arc<AtomicUsize>) {
    use std::io::{BufRead as _, BufReader, Write as _};
    let addr = SocketAddr::from((pod.ip, port));
    let listener = pod.ns.run(move || std::net::TcpListener::bind(addr));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let body = Arc::clone(&body);
            let sent = Arc::clone(&sent);
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut reader = BufReader::new(conn.try_clone()?);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                        break;
                    }
                }
                let mut conn = conn;
                write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )?;
                for chunk in body.chunks(PACE.0) {
                    conn.write_all(chunk)?;
                    sent.fetch_add(chunk.len(), Ordering::Relaxed);
                    std::thread::sleep(PACE.1);
                }
                Ok(())
            });
        }
    });
}

/// How long a restarted agent may take, from exec to the first new flow that completes.
fn restart_budget() -> Duration {
    // The VM emulates its CPU (TCG, no KVM) with a debug build of the agent: loading and
    // verifying the eBPF programs, the CA and the first leaves take tens of times longer
    // there (measured on 6.1: ready after 16 s, first flow after 23 s). The 1 s budget is
    // held on the host, on a real CPU.
    if in_vm() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(1)
    }
}

/// Every pinned file under `dir`, relative to it, sorted.
fn pins(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap_or(&p).display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn agent_sigkill_mid_transfer_fails_closed_and_restart_serves_within_a_second() {
    require_privileged();
    let Scenario {
        client,
        mut server,
        node,
    } = Scenario::new(90, "fkc", "fks");
    let mut legacy = node.pod("fkl", 4);
    let www = serve_blob(&mut server, "fkwww", 8 << 20);
    let small_want = www.add("small", 4 << 10);
    let mid_want = www.add("mid", 256 << 10);
    // The legacy pod serves other bytes: its plaintext is legitimate and must not match.
    let outside_www = interceptor_tests::agent::TempDir::new("fkout");
    std::fs::write(outside_www.0.join("small"), b"outside the mesh\n").expect("write");
    serve_http(&mut legacy, &outside_www.0);
    serve_upload_hasher(&server, 8080);
    let paced = Arc::new(www.payload.clone());
    let sent = Arc::new(AtomicUsize::new(0));
    serve_paced(&server, 8081, Arc::clone(&paced), Arc::clone(&sent));
    let blob = www.path().join("blob");

    let cluster = Cluster::new("fkill");
    let cfg = cluster.config(
        vec![
            workload(&client, "fk", "client"),
            workload(&server, "fk", "server"),
        ],
        vec![],
    );
    // Declared before the agents: dropped after them, also when the test fails.
    let pin_dir = PinCleanup(cfg.bpffs.clone());
    let cfg_file = cluster.scratch.0.join("node.yaml");
    let agent = AgentProcess::start(&cfg, &cfg_file);

    // The server pod's link (every client↔server byte crosses it) for the whole run: kill,
    // downtime and restart included.
    let capture = Capture::start_in(&node.ns.path(), &server.host_if);
    let small = format!("http://{}/small", server.ip);
    let upload_url = format!("http://{}:8080/", server.ip);
    // The first flow mints both leaves; under TCG that can outlast the server agent's
    // first-byte wait, and that one connection fails (handshake_failed). Retried, as a client
    // would.
    let deadline = Instant::now() + restart_budget();
    while curl(client.command("curl"), &small, &[]).code != "200" {
        assert!(Instant::now() < deadline, "no flow served before the kill");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A paced download and a rate-limited upload, in flight when the agent dies.
    let download = std::thread::spawn({
        let cmd = client.command("curl");
        let url = format!("http://{}:8081/", server.ip);
        move || curl(cmd, &url, &[])
    });
    let upload = std::thread::spawn({
        let cmd = client.command("curl");
        let (url, blob) = (upload_url.clone(), blob.clone());
        move || {
            let blob = blob.display().to_string();
            curl(
                cmd,
                &url,
                &["--limit-rate", RATE, "-H", "Expect:", "-T", &blob],
            )
        }
    });
    // Mid-transfer: a good part of the download is through (the VM needs longer to get there).
    let deadline = Instant::now() + Duration::from_secs(30);
    while sent.load(Ordering::Relaxed) < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "the download did not start within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pinned = pins(&pin_dir.0);
    assert!(
        pinned.iter().any(|p| p.starts_with("links/")),
        "no pinned links: {pinned:?}"
    );
    agent.kill9();
    let killed = Instant::now();

    let check_cut = |what: &str, got: Curl| {
        assert_ne!(
            got.exit,
            0,
            "the {what} completed although the agent was killed mid-transfer: HTTP {}, {} bytes",
            got.code,
            got.body.len()
        );
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the {what} did not end promptly after the kill"
        );
        got
    };
    let down = check_cut("download", download.join().expect("download thread"));
    let n = down.body.len();
    assert!(
        n > 0 && n < www.payload.len(),
        "the download was not mid-transfer at the kill: {n} bytes"
    );
    assert!(
        down.body[..] == www.payload[..n],
        "the {n} bytes received before the kill are not the payload's prefix"
    );
    let up = check_cut("upload", upload.join().expect("upload thread"));
    assert_ne!(
        String::from_utf8_lossy(&up.body),
        www.want,
        "the server saw the whole upload"
    );

    // Down: the links stay pinned, mesh connects are refused at once, inbound SYNs go nowhere,
    // traffic outside the mesh is untouched.
    assert_eq!(
        pins(&pin_dir.0),
        pinned,
        "pins changed while the agent is down"
    );
    let refused = curl(client.command("curl"), &small, &[]);
    assert_eq!(
        (refused.code.as_str(), refused.exit),
        ("000", 7),
        "an outbound mesh connect while the agent is down must be refused"
    );
    let inbound = curl(
        legacy.command_unenrolled("curl"),
        &small,
        &["--connect-timeout", "2"],
    );
    assert_eq!(
        inbound.code, "000",
        "an inbound connection reached the server while its agent was down"
    );
    let outside = curl(
        client.command("curl"),
        &format!("http://{}/small", legacy.ip),
        &[],
    );
    assert_eq!(
        outside.code, "200",
        "traffic outside the mesh must not depend on the agent"
    );

    // Restart on the same pins: adopted, and a new flow completes within the budget.
    let agent = AgentProcess::start(&cfg, &cfg_file);
    let ready = agent.started.elapsed();
    let served = loop {
        let f = curl(client.command("curl"), &small, &["-m", "2"]);
        if f.code == "200" {
            assert_eq!(
                interceptor_tests::apps::sha256_hex(&f.body),
                small_want,
                "first flow after the restart"
            );
            break agent.started.elapsed();
        }
        assert!(
            agent.started.elapsed() < restart_budget(),
            "no flow completed within {:?} of the restart: {f:?}",
            restart_budget()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    // Straight to stderr (not captured by the harness): the numbers belong in every CI log.
    interceptor_tests::demo::say(&format!(
        "restart: agent ready {ready:?} after exec, first new flow served {served:?} after exec\n"
    ));
    assert!(
        served <= restart_budget(),
        "the restarted agent served its first new flow {served:?} after exec (budget {:?})",
        restart_budget()
    );
    assert_eq!(
        pins(&pin_dir.0),
        pinned,
        "the restarted agent must adopt the same pins"
    );
    let f = curl(
        client.command("curl"),
        &format!("http://{}/mid", server.ip),
        &[],
    );
    assert_eq!(
        (
            f.code.as_str(),
            interceptor_tests::apps::sha256_hex(&f.body)
        ),
        ("200", mid_want.clone()),
        "download after the restart"
    );
    let f = curl(
        client.command("curl"),
        &upload_url,
        &[
            "-H",
            "Expect:",
            "-T",
            &www.path().join("mid").display().to_string(),
        ],
    );
    assert_eq!(
        (f.code.as_str(), String::from_utf8_lossy(&f.body).as_ref()),
        ("200", mid_want.as_str()),
        "upload after the restart"
    );
    let rows = agent.flows();
    let out = rows
        .iter()
        .rfind(|r| r.pod == "fkc")
        .expect("client flow after the restart");
    assert_eq!(out.protection, expected_protection(), "{out:?}");
    assert_eq!(
        out.peer_id.as_deref(),
        Some("spiffe://cluster.local/ns/fk/sa/server")
    );

    // Reassembled, so a window split between two segments is found too.
    assert_no_plaintext(&capture.stop_streams(), &www.payload);
    drop(agent);
    drop(pin_dir);
    let _ = &mut legacy;
}
