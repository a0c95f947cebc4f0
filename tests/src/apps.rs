//! The real applications the end-to-end tests and the demo run in pods: busybox httpd as the
//! server, curl as the client, and the payloads whose hashes prove integrity.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    digest::{Sha256, sha256},
    topology::Pod,
};

/// busybox: /bin/busybox in the VM guest, from PATH on the host.
pub fn busybox() -> &'static str {
    if Path::new("/bin/busybox").exists() {
        "/bin/busybox"
    } else {
        "busybox"
    }
}

/// Waits until something accepts on `addr` inside the pod's netns.
pub fn wait_listening(pod: &Pod, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let ns = pod.netns_path();
    while Instant::now() < deadline {
        let up = interceptor::sys::in_netns(&ns, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).map(|_| ())
        });
        if up.is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr} in {}", pod.name);
}

/// Serves `dir` over HTTP from the pod (busybox httpd in the foreground, killed with the pod)
/// on `listen` (e.g. "80" or "[::]:80"), and waits until it answers on `probe`.
pub fn serve_http_on(pod: &mut Pod, dir: &Path, listen: &str, probe: SocketAddr) {
    let cmd = pod.command_unenrolled(busybox());
    serve_http_with(pod, cmd, dir, listen, probe);
}

/// [`serve_http_on`] from inside the pod's cgroup, as an enrolled pod's app runs: its sockets
/// get the pod's socket programs (sockops, the sk_msg leg join), which a server outside the
/// cgroup never sees.
pub fn serve_http_enrolled(pod: &mut Pod, dir: &Path, listen: &str, probe: SocketAddr) {
    let cmd = pod.command(busybox());
    serve_http_with(pod, cmd, dir, listen, probe);
}

fn serve_http_with(pod: &mut Pod, mut cmd: Command, dir: &Path, listen: &str, probe: SocketAddr) {
    cmd.args(["httpd", "-f", "-p", listen, "-h"]).arg(dir);
    pod.spawn(cmd);
    wait_listening(pod, probe);
}

/// [`serve_http_on`] port 80 of the pod's IPv4 address.
pub fn serve_http(pod: &mut Pod, dir: &Path) {
    let probe = SocketAddr::from((pod.ip, 80));
    serve_http_on(pod, dir, "80", probe);
}

/// What curl got.
pub struct Fetch {
    /// `%{http_code}`: "000" when the connection failed or was reset.
    pub code: String,
    pub body: Vec<u8>,
}

impl Fetch {
    pub fn sha256(&self) -> String {
        hex(&sha256(&self.body))
    }
}

/// Runs `curl` from `cmd` (built by [`Pod::command`] or [`Pod::command_unenrolled`]).
pub fn curl(mut cmd: Command, url: &str) -> Fetch {
    let out = cmd
        .args(["-s", "-m", "20", "-o", "-", "-w", "\n%{http_code}", url])
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').unwrap_or(0);
    let code = String::from_utf8_lossy(&body[nl..]).trim().to_owned();
    body.truncate(nl);
    Fetch { code, body }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn sha256_hex(b: &[u8]) -> String {
    hex(&sha256(b))
}

/// Deterministic incompressible bytes (xorshift), so a leak of any 16-byte window is
/// unambiguous on the wire.
pub fn random_payload(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An HTTP upload sink on `port` of the pod's IPv4 address, run by the test process
/// (unenrolled): each request's body is hashed as it streams in and the SHA-256 hex is the
/// response, so an upload of any size is checked without holding it. Lives as long as the
/// test.
pub fn serve_upload_hasher(pod: &Pod, port: u16) {
    use std::io::{BufReader, Read as _};
    let addr = SocketAddr::from((pod.ip, port));
    let listener = pod.ns.run(move || std::net::TcpListener::bind(addr));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut reader = BufReader::new(conn.try_clone()?);
                let head = read_request_head(&mut reader)?;
                if head.ended {
                    return Ok(());
                }
                let mut hasher = Sha256::new();
                let mut body = reader.take(head.content_length as u64);
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = body.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                answer_digest(conn, &hasher.hex())
            });
        }
    });
}

/// An HTTP request head as an upload sink reads it.
pub struct RequestHead {
    /// `Content-Length`, 0 when absent or unreadable.
    pub content_length: usize,
    /// Bytes of the head, blank line included.
    pub bytes: usize,
    /// The connection ended before the blank line.
    pub ended: bool,
}

/// Reads a request head line by line up to its blank line (or the connection's end).
pub fn read_request_head(reader: &mut impl std::io::BufRead) -> std::io::Result<RequestHead> {
    let mut head = RequestHead {
        content_length: 0,
        bytes: 0,
        ended: false,
    };
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        head.bytes += n;
        if n == 0 {
            head.ended = true;
            return Ok(head);
        }
        if line.trim_end().is_empty() {
            return Ok(head);
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            head.content_length = value.trim().parse().unwrap_or(0);
        }
    }
}

/// Answers an upload with its SHA-256 as the body, and closes.
pub fn answer_digest(mut conn: std::net::TcpStream, digest: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{digest}",
        digest.len()
    )
}

/// Uploads `file` with `curl -T` (no `Expect: 100-continue` round trip) and returns what the
/// server answered.
pub fn curl_upload(mut cmd: Command, url: &str, file: &Path) -> Fetch {
    cmd.args(["-H", "Expect:", "-T"]).arg(file);
    curl(cmd, url)
}

/// From `client`: downloads `down` and uploads `file` to a [`serve_upload_hasher`] at `up`;
/// both must answer 200 and `want`, the file's SHA-256 (byte-exact both ways). `what` names
/// the path under test in a failure.
pub fn assert_bulk_both_ways(
    client: &Pod,
    down: &str,
    up: &str,
    file: &Path,
    want: &str,
    what: &str,
) {
    let f = curl(client.command("curl"), down);
    assert_eq!(
        (f.code.as_str(), f.sha256().as_str()),
        ("200", want),
        "bulk download {what}"
    );
    let f = curl_upload(client.command("curl"), up, file);
    assert_eq!(
        (f.code.as_str(), String::from_utf8_lossy(&f.body).as_ref()),
        ("200", want),
        "bulk upload {what}"
    );
}
