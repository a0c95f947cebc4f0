//! Harness for the upgrade (handover) tests: an echo server that records what each flow
//! delivered, the `upgrade_load` client driven from a test, and their verdicts.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use crate::topology::Pod;

/// What the echo server received on one flow (by the id the flow starts with): bytes and
/// SHA-256, recorded when the client half-closes.
pub type Received = Arc<Mutex<HashMap<u64, (usize, String)>>>;

/// Echoes every byte back on `port` of the pod's address (run by the test process in the
/// pod's netns, outside its cgroup, as a server app would be reached through sk_lookup), and
/// records each flow's bytes and hash.
pub fn echo_server(pod: &Pod, port: u16) -> Received {
    let addr = SocketAddr::from((pod.ip, port));
    let listener = pod.ns.run(move || std::net::TcpListener::bind(addr));
    let received: Received = Arc::default();
    let rec = Arc::clone(&received);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let rec = Arc::clone(&rec);
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut h = Sha256::new();
                let mut n = 0usize;
                let mut id = [0u8; 8];
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let k = conn.read(&mut buf)?;
                    if k == 0 {
                        break;
                    }
                    if n < 8 {
                        let take = k.min(8 - n);
                        id[n..n + take].copy_from_slice(&buf[..take]);
                    }
                    h.update(&buf[..k]);
                    n += k;
                    conn.write_all(&buf[..k])?;
                }
                let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
                rec.lock()
                    .expect("echo records")
                    .insert(u64::from_be_bytes(id), (n, hex));
                conn.shutdown(std::net::Shutdown::Write)
            });
        }
    });
    received
}

/// One flow as the client saw it.
#[derive(Debug, Clone)]
pub struct FlowResult {
    pub id: u64,
    pub sent: usize,
    pub sent_sha: String,
    pub recv: usize,
    pub recv_sha: String,
    pub error: Option<String>,
}

/// A running `upgrade_load flows` client in a pod.
pub struct Flows {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Flows {
    /// Starts `n` flows to `dst` for `secs` seconds; returns once all are connected.
    pub fn start(
        mut cmd: Command,
        dst: SocketAddr,
        n: usize,
        secs: f64,
        payload: &std::path::Path,
    ) -> Flows {
        cmd.arg("flows")
            .arg(dst.to_string())
            .arg(n.to_string())
            .arg(secs.to_string())
            .arg(payload)
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn upgrade_load flows");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("upgrade_load output");
        assert_eq!(line.trim(), "started", "upgrade_load flows said {line:?}");
        Flows { child, out }
    }

    /// Whether the client is still running (its flows not all done).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for every flow to end (at most `limit`) and returns what each saw.
    pub fn finish(mut self, limit: Duration) -> Vec<FlowResult> {
        let deadline = Instant::now() + limit;
        loop {
            if self.child.try_wait().expect("wait upgrade_load").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the flows did not end within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut rest = String::new();
        self.out
            .read_to_string(&mut rest)
            .expect("upgrade_load output");
        rest.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("flow json");
                FlowResult {
                    id: v["id"].as_u64().unwrap_or(u64::MAX),
                    sent: v["sent"].as_u64().unwrap_or(0) as usize,
                    sent_sha: v["sentSha"].as_str().unwrap_or_default().to_owned(),
                    recv: v["recv"].as_u64().unwrap_or(0) as usize,
                    recv_sha: v["recvSha"].as_str().unwrap_or_default().to_owned(),
                    error: v["error"].as_str().map(str::to_owned),
                }
            })
            .collect()
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts every flow ended cleanly with the same bytes at both ends: the client got back
/// exactly what it sent (the echo crossed the agents both ways), and the server received
/// exactly that too.
pub fn assert_intact(results: &[FlowResult], n: usize, received: &Received) {
    assert_eq!(results.len(), n, "flows reported");
    let server = received.lock().expect("echo records");
    let mut bad = Vec::new();
    for r in results {
        let at_server = server.get(&r.id);
        let ok = r.error.is_none()
            && r.sent > 8
            && r.recv == r.sent
            && r.recv_sha == r.sent_sha
            && at_server == Some(&(r.sent, r.sent_sha.clone()));
        if !ok {
            bad.push(format!(
                "flow {}: sent {} recv {} error {:?} server {:?}",
                r.id,
                r.sent,
                r.recv,
                r.error,
                at_server.map(|s| s.0)
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of {n} flows broken: {:#?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
}

/// A running `upgrade_load loop` client.
pub struct Churn(Child);

impl Churn {
    pub fn start(mut cmd: Command, dst: SocketAddr, secs: f64) -> Churn {
        cmd.arg("loop")
            .arg(dst.to_string())
            .arg(secs.to_string())
            .stdout(Stdio::piped());
        Churn(cmd.spawn().expect("spawn upgrade_load loop"))
    }

    /// `(connections that worked, that failed, the first errors)`.
    pub fn finish(mut self, limit: Duration) -> (u64, u64, Vec<String>) {
        let deadline = Instant::now() + limit;
        while self.0.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "the connection loop did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut out = String::new();
        self.0
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("loop output");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("loop json");
        let errors = v["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        (
            v["ok"].as_u64().unwrap_or(0),
            v["failed"].as_u64().unwrap_or(u64::MAX),
            errors,
        )
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
