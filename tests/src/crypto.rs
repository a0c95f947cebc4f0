//! Helpers for the crypto policy tests: a mesh client run by the test itself (standing in for an
//! agent of another version or policy, on an unenrolled pod), and the hellos of captured
//! connections, read with the wire oracle's parsers.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use interceptor::{
    app::Agent,
    ca::{Ca, CertificateAuthority as _, DEFAULT_LEAF_TTL},
    config::Config,
    handshake::{self, CryptoPolicy, MeshCrypto, Negotiated},
    identity::SpiffeId,
};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::{
    topology::{Node, Pod},
    wire::{
        Capture, ClientHello, ServerHello, Streams, group_name, parse_client_hello,
        parse_server_hello,
    },
};

/// IANA code points the tests assert on.
pub const X25519MLKEM768: u16 = 0x11ec;
pub const X25519: u16 = 0x001d;
pub const SECP256R1: u16 = 0x0017;
pub const AES_128_GCM: u16 = 0x1301;
pub const AES_256_GCM: u16 = 0x1302;

/// Runs `f` while capturing the server pod's link; returns its result and the streams.
pub fn captured<T>(node: &Node, server: &Pod, f: impl FnOnce() -> T) -> (T, Streams) {
    let capture = Capture::start_in(&node.ns.path(), &server.host_if);
    let out = f();
    (out, capture.stop_streams())
}

/// Rewrites the node config `file` with another crypto policy (atomically, as a ConfigMap
/// update appears) and waits (10 s at most) until the agent runs it.
pub fn reconfigure(agent: &Agent, file: &Path, config: &mut Config, crypto: CryptoPolicy) {
    config.crypto = crypto;
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, yaml_serde::to_string(&config).expect("yaml")).expect("write config");
    std::fs::rename(&tmp, file).expect("rename config");
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.crypto_policy() != crypto {
        assert!(
            Instant::now() < deadline,
            "the agent did not apply {crypto} (still {})",
            agent.crypto_policy()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts the ServerHello's group, suite and HelloRetryRequest group, and TLS 1.3.
pub fn assert_hello(sh: &Result<ServerHello, String>, group: u16, suite: u16, retry: Option<u16>) {
    let sh = sh
        .as_ref()
        .unwrap_or_else(|e| panic!("no ServerHello: {e}"));
    assert_eq!(
        (group_name(sh.group), sh.cipher_suite, sh.retry_group),
        (group_name(group), suite, retry),
        "ServerHello on the wire: {sh:?}"
    );
    assert_eq!(sh.version, 0x0304, "TLS 1.3");
}

/// `/proc/net/tls_stat` of a pod's netns (per namespace; empty without kTLS).
pub fn tls_stat(pod: &Pod) -> HashMap<String, u64> {
    pod.ns
        .proc_net("tls_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_owned(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// Asserts that kernel TLS carried traffic both ways in `pod` since `before` (its
/// [`tls_stat`] then) and never failed to decrypt a record: the proof that the keys the agent
/// installed match the peer's, not just that a socket accepted them.
pub fn assert_ktls_moved_bytes(pod: &Pod, before: &HashMap<String, u64>, context: &str) {
    let after = tls_stat(pod);
    let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    for key in ["TlsTxSw", "TlsRxSw"] {
        assert!(
            get(&after, key) > get(before, key),
            "{context}: {key} did not rise in {}: {before:?} → {after:?}",
            pod.name
        );
    }
    assert_eq!(
        get(&after, "TlsDecryptError"),
        get(before, "TlsDecryptError"),
        "{context}: kTLS decrypt errors in {}",
        pod.name
    );
}

/// The identity the stand-in client presents.
pub const PEER_ID: &str = "spiffe://cluster.local/ns/elsewhere/sa/peer";

/// A mesh client config with `crypto`, a leaf for [`PEER_ID`] from the cluster CA in `ca_dir`,
/// expecting the server `expected` (a SPIFFE ID).
pub fn peer_client(ca_dir: &Path, crypto: &MeshCrypto, expected: &str) -> Arc<ClientConfig> {
    let ca = Ca::load(ca_dir).expect("load the cluster CA");
    let me: SpiffeId = PEER_ID.parse().expect("peer id");
    let leaf = ca.issue(&me, DEFAULT_LEAF_TTL).expect("peer leaf");
    let roots = handshake::mesh_roots(ca.roots()).expect("roots");
    let expected: SpiffeId = expected.parse().expect("expected server id");
    handshake::client_config(&leaf, roots, ca.trust_domain(), &expected, crypto)
        .expect("peer client config")
}

/// [`peer_client`] that keeps the tickets the server sends and resumes with them, as a
/// client agent does.
pub fn peer_client_resuming(
    ca_dir: &Path,
    crypto: &MeshCrypto,
    expected: &str,
) -> Arc<ClientConfig> {
    let ca = Ca::load(ca_dir).expect("load the cluster CA");
    let me: SpiffeId = PEER_ID.parse().expect("peer id");
    let leaf = ca.issue(&me, DEFAULT_LEAF_TTL).expect("peer leaf");
    let roots = handshake::mesh_roots(ca.roots()).expect("roots");
    let expected: SpiffeId = expected.parse().expect("expected server id");
    let resumption = handshake::SessionResumption::new(Duration::from_secs(60), Arc::default());
    handshake::client_config_with(
        &leaf,
        roots,
        ca.trust_domain(),
        &expected,
        crypto,
        &resumption,
    )
    .expect("peer client config")
}

/// A mesh TLS session the test holds from an unenrolled pod.
pub struct MeshSession {
    pub local: SocketAddr,
    pub negotiated: Negotiated,
    stream: StreamOwned<ClientConnection, TcpStream>,
}

impl MeshSession {
    /// Connects from `pod`'s netns to `dst` and completes the mesh handshake; the error says
    /// why it failed (the peer's alert, for a refusal).
    pub fn open(pod: &Pod, dst: SocketAddr, config: Arc<ClientConfig>) -> Result<Self, String> {
        let tcp = pod.ns.run(move || {
            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        });
        let local = tcp.local_addr().map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::IpAddress(dst.ip().into());
        let conn = ClientConnection::new(config, name).map_err(|e| e.to_string())?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| format!("mesh handshake from {local} to {dst}: {e}"))?;
        }
        let negotiated = handshake::negotiated(&stream.conn).map_err(|e| e.to_string())?;
        Ok(Self {
            local,
            negotiated,
            stream,
        })
    }

    /// Sends `bytes` through the session.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// `GET path` (HTTP/1.0, so the server closes after the response); returns the body.
    pub fn get(mut self, path: &str) -> Result<Vec<u8>, String> {
        self.send(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        match self.stream.read_to_end(&mut response) {
            Ok(_) => {}
            // busybox httpd closes without close_notify after HTTP/1.0: the body is complete.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(format!("read response: {e}")),
        }
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("no HTTP response ({} bytes)", response.len()))?;
        Ok(response[split + 4..].to_vec())
    }

    /// Whether the session ends (reset or EOF) within `wait` without data arriving.
    pub fn ends_within(&mut self, wait: Duration) -> bool {
        let _ = self.stream.sock.set_read_timeout(Some(wait));
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

/// The hellos of the one captured connection from `client` (an address, or any port of the
/// address when its port is 0) to `server`: the ClientHello, and the ServerHello or why there
/// is none (a refused handshake has an alert instead).
pub fn hellos(
    streams: &Streams,
    client: SocketAddr,
    server: SocketAddr,
) -> (ClientHello, Result<ServerHello, String>) {
    let matches = |a: SocketAddr| a.ip() == client.ip() && (client.port() == 0 || a == client);
    let up: Vec<_> = streams
        .streams
        .iter()
        .filter(|s| s.dst == server && matches(s.src) && !s.bytes.is_empty())
        .collect();
    assert_eq!(
        up.len(),
        1,
        "expected one captured connection {client} → {server}, found {}",
        up.len()
    );
    let up = up[0];
    let down = streams
        .get(server, up.src)
        .unwrap_or_else(|| panic!("no captured bytes {server} → {}", up.src));
    let ch = parse_client_hello(&up.bytes).unwrap_or_else(|e| panic!("ClientHello: {e}"));
    (ch, parse_server_hello(&down.bytes))
}

/// The fatal `handshake_failure` alert (RFC 8446 §6), as it crosses the wire in clear.
pub const HANDSHAKE_FAILURE_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 40];

/// Whether the server→client direction of the connection from `client` carries the plaintext
/// `handshake_failure` alert.
pub fn refused_with_handshake_failure(
    streams: &Streams,
    client: SocketAddr,
    server: SocketAddr,
) -> bool {
    streams.get(server, client).is_some_and(|s| {
        s.bytes
            .windows(HANDSHAKE_FAILURE_ALERT.len())
            .any(|w| w == HANDSHAKE_FAILURE_ALERT)
    })
}

/// `client` with port 0: any connection from that address.
pub fn any_port(ip: impl Into<IpAddr>) -> SocketAddr {
    SocketAddr::new(ip.into(), 0)
}
