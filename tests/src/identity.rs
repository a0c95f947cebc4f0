//! Identity lifecycle harness: a wall clock a test can move under a running agent (libfaketime),
//! and a verifying mesh client that reports which certificate a server agent presented.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use interceptor::{
    ca::{Ca, CertificateAuthority as _, LeafCert, cert_info},
    handshake,
    identity::SpiffeId,
};

use crate::agent::TempDir;

/// Set in the child process that runs a test under libfaketime: the file holding the offset.
const CHILD_ENV: &str = "INTERCEPTOR_FAKETIME_FILE";

/// The wall clock of this test process (and so of its in-process agents), moved by rewriting
/// libfaketime's timestamp file. Monotonic time is left alone (`FAKETIME_DONT_FAKE_MONOTONIC`),
/// as it is when a real node's clock is stepped: tokio's timers do not jump.
pub struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    /// In the parent: runs the test `name` of this binary again in a child process with
    /// libfaketime preloaded, waits for it (at most `limit`) and fails unless it passed;
    /// returns `None`. In that child: returns the clock to move.
    pub fn reexec(name: &str, limit: Duration) -> Option<FakeClock> {
        if let Some(file) = std::env::var_os(CHILD_ENV) {
            return Some(FakeClock { file: file.into() });
        }
        let lib = libfaketime();
        let dir = TempDir::new("faketime");
        let file = dir.0.join("offset");
        std::fs::write(&file, "+0\n").expect("write faketime offset");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env("LD_PRELOAD", &lib)
            .env("FAKETIME_TIMESTAMP_FILE", &file)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env(CHILD_ENV, &file)
            .spawn()
            .expect("spawn the test under libfaketime");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the child test") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name} under libfaketime did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            status.success(),
            "{name} under libfaketime failed: {status}"
        );
        None
    }

    /// Moves the wall clock to `offset` from real time (libfaketime syntax: `+25h`, `+3d`),
    /// and checks that it really moved while the monotonic clock did not: a test whose clock
    /// silently stayed put would prove nothing.
    pub fn set(&self, offset: &str, expect: Duration) {
        let mono = Instant::now();
        std::fs::write(&self.file, format!("{offset}\n")).expect("write faketime offset");
        let real = real_time();
        let now = SystemTime::now();
        let ahead = now.duration_since(real).unwrap_or_default();
        assert!(
            ahead + Duration::from_secs(5) >= expect && ahead <= expect + Duration::from_secs(5),
            "libfaketime did not move the wall clock to {offset}: {ahead:?} ahead"
        );
        assert!(
            mono.elapsed() < Duration::from_secs(5),
            "the monotonic clock jumped with the wall clock"
        );
    }
}

/// The real wall-clock time, read by a process without libfaketime.
fn real_time() -> SystemTime {
    let out = Command::new("date")
        .arg("+%s")
        .env_remove("LD_PRELOAD")
        .output()
        .expect("date");
    let secs: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("date +%s");
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn libfaketime() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("libfaketime not found (apt-get install faketime, or `cargo xtask setup`)")
        })
}

/// What a verifying mesh client saw of a server agent.
#[derive(Debug, Clone)]
pub struct MeshReply {
    /// The serial of the server's leaf, in hex.
    pub serial: String,
    /// Subject of the certificate that signed the server's leaf.
    pub leaf_issuer: String,
    /// How many certificates the server presented.
    pub chain_len: usize,
    pub response: Vec<u8>,
}

/// Connects from the network namespace `netns` to `dst` as mesh client `client` (a leaf
/// issued by the CA in `ca_dir`, trusting that directory's roots), requires the server to
/// prove `server`, sends `request` and reads the response to its end. The client runs outside
/// every enrolled cgroup, so it speaks mTLS itself and the server agent answers it like any
/// peer agent.
pub fn mesh_request(
    netns: &Path,
    ca_dir: &Path,
    client: &str,
    server: &str,
    dst: SocketAddr,
    request: &[u8],
) -> anyhow::Result<MeshReply> {
    let ca = Ca::load(ca_dir)?;
    let me: SpiffeId = client.parse()?;
    let leaf = ca.issue(&me, Duration::from_secs(600))?;
    mesh_request_as(netns, &leaf, ca_dir, server, dst, request)
}

/// [`mesh_request`] presenting a given `leaf` (the same bytes every time, as a peer agent
/// between renewals does) and trusting the roots of `ca_dir`.
pub fn mesh_request_as(
    netns: &Path,
    leaf: &LeafCert,
    ca_dir: &Path,
    server: &str,
    dst: SocketAddr,
    request: &[u8],
) -> anyhow::Result<MeshReply> {
    let ca = Ca::load(ca_dir)?;
    let expected: SpiffeId = server.parse()?;
    let roots = handshake::mesh_roots(ca.roots())?;
    let config = handshake::client_config(
        leaf,
        roots,
        ca.trust_domain(),
        &expected,
        &handshake::MeshCrypto::default_aes_gcm(),
    )?;
    let tcp = interceptor::sys::in_netns(netns, move || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    })?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ClientConnection::new(Arc::clone(&config), dst.ip().into())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(request)?;
    tls.flush()?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // The agent may close without close_notify once the app is done.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e.into()),
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
    let chain = tls
        .conn
        .peer_certificates()
        .ok_or_else(|| anyhow::anyhow!("server presented no certificate"))?;
    let info = cert_info(&chain[0]).map_err(anyhow::Error::msg)?;
    Ok(MeshReply {
        serial: info.serial,
        leaf_issuer: info.issuer,
        chain_len: chain.len(),
        response,
    })
}
