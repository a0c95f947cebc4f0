//! Drives the `flood` helper binary (a misbehaving client in a pod) from a test.

use std::{
    io::BufRead as _,
    process::{Child, ChildStdin, Command, Stdio},
};

/// A running flood: its connections stay open until this is dropped.
pub struct Flood {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Connections that were established, and those that failed to connect.
    pub connected: usize,
    pub failed: usize,
}

impl Flood {
    /// Runs `cmd` (the `flood` binary, made a pod command) with `args` and waits until it has
    /// opened its connections.
    pub fn start(mut cmd: Command, args: &[&str]) -> Flood {
        let mut child = cmd
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn flood");
        let stdin = child.stdin.take();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("flood report");
        let n: Vec<usize> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(n.len(), 2, "flood said {line:?}");
        Flood {
            child,
            stdin,
            connected: n[0],
            failed: n[1],
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

/// A minimal ClientHello record offering the mesh ALPN (not a complete TLS 1.3 hello: the
/// agent classifies it as mesh, then its handshake fails).
pub fn mesh_client_hello() -> Vec<u8> {
    let mut alpn = vec![0, 0, interceptor::handshake::MESH_ALPN.len() as u8];
    alpn.extend_from_slice(interceptor::handshake::MESH_ALPN);
    let list_len = (alpn.len() - 2) as u16;
    alpn[..2].copy_from_slice(&list_len.to_be_bytes());
    let mut ext = vec![0x00, 0x10];
    ext.extend_from_slice(&(alpn.len() as u16).to_be_bytes());
    ext.extend_from_slice(&alpn);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    assert_eq!(
        interceptor::intercept::peek::classify(&rec),
        interceptor::intercept::peek::FirstBytes::Mesh
    );
    rec
}
