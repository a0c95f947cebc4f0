//! The real applications the end-to-end tests and the demo run in pods: busybox httpd as the
//! server, curl as the client, and the payloads whose hashes prove integrity.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sha2::{Digest as _, Sha256};

use crate::topology::Pod;

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
    let mut cmd = pod.command_unenrolled(busybox());
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
        hex(&Sha256::digest(&self.body))
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
    hex(&Sha256::digest(b))
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
