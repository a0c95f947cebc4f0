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
