//! The demo (`cargo xtask demo`): a node with two enrolled pods and one legacy pod, the real
//! `interceptor run` binary, a curl matrix between the pods, the flow table, and a capture of
//! the link that must hold no plaintext. Also run as a test, so the demo cannot rot.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use interceptor::{config::KtlsMode, intercept::table::FlowRow};

use crate::{
    agent::{TempDir, config, make_ca, workload},
    apps::{Fetch, curl, random_payload, serve_http},
    digest::sha256,
    topology::Node,
    wire::{self, Capture},
};

/// One row of the demo's table.
#[derive(Debug, Clone)]
pub struct Row {
    pub from: String,
    pub to: String,
    pub code: String,
    pub intact: bool,
    pub protection: String,
    /// Who the server-side agent saw (the client's SPIFFE ID), if mTLS.
    pub client_id: Option<String>,
    /// Who the client-side agent verified (the server's SPIFFE ID), if mTLS.
    pub server_id: Option<String>,
}

pub struct Report {
    pub rows: Vec<Row>,
    pub capture_frames: usize,
    pub capture_tls_records: usize,
    pub ktls: bool,
    /// `interceptor run` exited with status 0 on SIGTERM.
    pub clean_exit: bool,
}

/// Writes straight to fd 2: the test harness captures `eprintln!`, and the demo's table is the
/// point of running it.
/// The copy is close-on-exec (a plain dup(2) was not: a pod command spawned by another test
/// thread meanwhile kept the harness's stderr open).
pub fn say(s: &str) {
    use std::os::fd::AsFd as _;
    if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
        let _ = std::fs::File::from(fd).write_all(s.as_bytes());
    }
}

/// The agent binary: `INTERCEPTOR_AGENT_BIN`, else next to this executable (target/<profile>).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("INTERCEPTOR_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    for candidate in [dir.join("interceptor"), dir.join("../interceptor")] {
        if candidate.exists() {
            return candidate;
        }
    }
    panic!(
        "agent binary not found next to {}: set INTERCEPTOR_AGENT_BIN or build -p interceptor",
        exe.display()
    );
}

struct AgentProc {
    child: Child,
    admin: PathBuf,
    bin: PathBuf,
}

impl AgentProc {
    fn flows(&self) -> Vec<FlowRow> {
        let out = Command::new(&self.bin)
            .args(["flows", "--all", "--json", "--admin-socket"])
            .arg(&self.admin)
            .output()
            .expect("interceptor flows");
        assert!(
            out.status.success(),
            "interceptor flows: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("flows json")
    }
}

impl AgentProc {
    /// SIGTERM, as a DaemonSet rollout sends it; returns whether the agent exited cleanly
    /// (status 0) within 5 s.
    fn terminate(&mut self) -> bool {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if !self.terminate() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the whole demo and returns what it saw; panics (with the reason) if the environment
/// cannot run it.
pub fn run(ktls: KtlsMode) -> Report {
    let bin = agent_binary();
    let node = Node::new(50);
    let mut sleep = node.pod("sleep", 2);
    let mut httpbin = node.pod("httpbin", 3);
    let mut legacy = node.pod("legacy", 4);
    let www = TempDir::new("demo-www");
    let body = random_payload(256 << 10);
    std::fs::write(www.0.join("data"), &body).expect("write payload");
    let want = sha256(&body);
    serve_http(&mut httpbin, &www.0);
    serve_http(&mut legacy, &www.0);

    let scratch = TempDir::new("demo-agent");
    let ca = scratch.0.join("ca");
    make_ca(&ca, "cluster.local");
    let cfg = config(
        &ca,
        &scratch.0,
        ktls,
        vec![
            workload(&sleep, "full", "sleep"),
            workload(&httpbin, "full", "httpbin"),
        ],
        vec![],
    );
    let pins = crate::agent::PinCleanup(cfg.bpffs.clone());
    let cfg_path = scratch.0.join("node.yaml");
    std::fs::write(&cfg_path, yaml_serde::to_string(&cfg).expect("yaml")).expect("write config");
    let child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("INTERCEPTOR_LOG", "warn")
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    let agent = AgentProc {
        child,
        admin: cfg.admin_socket.clone(),
        bin: bin.clone(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.admin.exists() {
        assert!(Instant::now() < deadline, "agent did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }

    let pods = [("sleep", &sleep, true), ("legacy", &legacy, false)];
    let targets = [("httpbin", httpbin.ip), ("legacy", legacy.ip)];
    let mut rows = Vec::new();
    let mut capture_frames = 0;
    let mut capture_tls_records = 0;
    for (from, pod, enrolled) in pods {
        for (to, ip) in targets {
            let seen_before = agent.flows().iter().map(|r| r.id).max();
            let capture = (from == "sleep" && to == "httpbin")
                .then(|| Capture::start_in(&node.ns.path(), &httpbin.host_if));
            let cmd = if enrolled {
                pod.command("curl")
            } else {
                pod.command_unenrolled("curl")
            };
            let Fetch { code, body: got } = curl(cmd, &format!("http://{ip}/data"));
            if let Some(capture) = capture {
                let frames = capture.stop();
                wire::assert_no_plaintext(&frames, &body);
                capture_frames = frames.len();
                let streams = wire::Streams::from_frames(frames);
                let server = SocketAddr::from((httpbin.ip, 80));
                for s in streams
                    .streams
                    .iter()
                    .filter(|s| s.src == server || s.dst == server)
                {
                    capture_tls_records += wire::assert_tls_records(&s.bytes).len();
                }
            }
            let new: Vec<FlowRow> = agent
                .flows()
                .into_iter()
                .filter(|r| seen_before.is_none_or(|m| r.id > m))
                .collect();
            let out = new.iter().find(|r| r.pod == "sleep");
            let inb = new.iter().find(|r| r.pod == "httpbin");
            let protection = out.or(inb).map_or("plaintext (no agent)".to_owned(), |r| {
                format!("{:?}", r.protection).to_lowercase()
            });
            rows.push(Row {
                from: from.to_owned(),
                to: to.to_owned(),
                code,
                intact: sha256(&got) == want,
                protection,
                client_id: inb.and_then(|r| r.peer_id.clone()),
                server_id: out.and_then(|r| r.peer_id.clone()),
            });
        }
    }
    let mut agent = agent;
    let clean_exit = agent.terminate();
    drop(agent);
    drop(pins);
    let _ = (&mut sleep, &mut legacy);
    Report {
        rows,
        capture_frames,
        capture_tls_records,
        ktls: ktls == KtlsMode::Required,
        clean_exit,
    }
}

impl Report {
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<8} {:<8} {:<5} {:<7} {:<22} {:<42} CLIENT VERIFIED (server id)",
            "FROM", "TO", "HTTP", "BODY", "MODE", "SERVER SAW (client id)"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<8} {:<8} {:<5} {:<7} {:<22} {:<42} {}",
                r.from,
                r.to,
                r.code,
                if r.intact { "sha ok" } else { "BAD" },
                r.protection,
                r.client_id.as_deref().unwrap_or("-"),
                r.server_id.as_deref().unwrap_or("-"),
            );
        }
        let _ = writeln!(
            s,
            "\nwire capture of the httpbin pod's link during sleep → httpbin: {} frames, every agent↔agent payload parsed as {} TLS records, no 16-byte window of the 256 KiB body in clear",
            self.capture_frames, self.capture_tls_records
        );
        s
    }
}
