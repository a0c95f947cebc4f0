//! `interceptor probe`: what this kernel offers and what the agent will do with it, measured
//! (programs loaded through the verifier, kTLS installed on real sockets), never inferred from
//! version numbers: Debian backports change behaviour inside one kernel series.

use std::path::PathBuf;

use serde::Serialize;

use crate::{datapath, ktls, sys};

/// The data path the agent will use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Session keys go to kernel TLS; bytes move with splice(2).
    Ktls,
    /// The kernel lacks the `tls` ULP (or every cipher): rustls relays in userspace.
    Userspace,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgramCheck {
    pub program: String,
    pub kind: String,
    pub loads: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CipherCheck {
    pub cipher: String,
    pub tx: bool,
    pub rx: bool,
}

/// Everything `interceptor probe` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cgroup2: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    pub programs: Vec<ProgramCheck>,
    pub tls_ulp: bool,
    pub ktls_ciphers: Vec<CipherCheck>,
    pub rx_expect_no_pad: bool,
    pub mode: Mode,
    /// Why the agent cannot run here; empty when it can.
    pub missing: Vec<String>,
    pub notes: Vec<String>,
}

/// Runs every check. `require_ktls` turns a missing kTLS into a missing requirement
/// (`ktls: required` in the config).
pub fn run(require_ktls: bool) -> Report {
    let mut missing = Vec::new();
    let mut notes = Vec::new();
    let cgroup2 = match sys::cgroup2_mount() {
        Ok(p) => Some(p),
        Err(e) => {
            missing.push(format!("cgroup v2: {e}"));
            None
        }
    };
    let bpffs = sys::mount_of_type("bpf").ok().flatten();
    if bpffs.is_none() {
        notes.push("bpffs is not mounted; `interceptor run` mounts one at /sys/fs/bpf".to_owned());
    }
    let programs = match datapath::probe_programs() {
        Ok(reports) => reports
            .into_iter()
            .map(|r| ProgramCheck {
                program: r.name,
                kind: r.kind.to_owned(),
                loads: r.result.is_ok(),
                error: r.result.err(),
            })
            .collect(),
        Err(e) => {
            missing.push(format!("eBPF: {}", crate::error::chain(&e)));
            Vec::new()
        }
    };
    for p in programs.iter().filter(|p| !p.loads) {
        missing.push(format!(
            "eBPF program {} ({}) does not load: {}",
            p.program,
            p.kind,
            p.error.as_deref().unwrap_or("?")
        ));
    }
    let k = ktls::probe();
    let ktls_ciphers = ktls::Cipher::ALL
        .into_iter()
        .map(|c| CipherCheck {
            cipher: match c {
                ktls::Cipher::Aes128Gcm => "AES-128-GCM",
                ktls::Cipher::Aes256Gcm => "AES-256-GCM",
                ktls::Cipher::Chacha20Poly1305 => "CHACHA20-POLY1305",
            }
            .to_owned(),
            tx: k.tx.get(c),
            rx: k.rx.get(c),
        })
        .collect();
    let mode = if k.supports(ktls::Cipher::Aes128Gcm) || k.supports(ktls::Cipher::Aes256Gcm) {
        Mode::Ktls
    } else {
        Mode::Userspace
    };
    if mode == Mode::Userspace {
        let why = format!(
            "kernel TLS unusable ({}); relaying through rustls in userspace",
            k.problems.join("; ")
        );
        if require_ktls {
            missing.push(why);
        } else {
            notes.push(why);
        }
    }
    Report {
        kernel: sys::kernel_release(),
        cgroup2,
        bpffs,
        programs,
        tls_ulp: k.ulp,
        ktls_ciphers,
        rx_expect_no_pad: k.rx_expect_no_pad,
        mode,
        missing,
        notes,
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

impl Report {
    /// The human table.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let path = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("-".to_owned(), |p| p.display().to_string())
        };
        let _ = writeln!(s, "{:<28} {}", "kernel", self.kernel);
        let _ = writeln!(s, "{:<28} {}", "cgroup2 mount", path(&self.cgroup2));
        let _ = writeln!(s, "{:<28} {}", "bpffs mount", path(&self.bpffs));
        for p in &self.programs {
            let _ = writeln!(
                s,
                "{:<28} {}",
                format!(
                    "bpf {} ({})",
                    p.program.trim_start_matches("intercept_"),
                    p.kind
                ),
                if p.loads { "loads" } else { "REJECTED" }
            );
        }
        let _ = writeln!(s, "{:<28} {}", "tls ULP", yes(self.tls_ulp));
        for c in &self.ktls_ciphers {
            let _ = writeln!(
                s,
                "{:<28} tx {:<3}  rx {}",
                format!("kTLS TLS1.3 {}", c.cipher),
                yes(c.tx),
                yes(c.rx)
            );
        }
        let _ = writeln!(
            s,
            "{:<28} {}",
            "kTLS rx expect-no-pad",
            yes(self.rx_expect_no_pad)
        );
        let _ = writeln!(
            s,
            "{:<28} {}",
            "data path",
            match self.mode {
                Mode::Ktls => "kTLS (kernel encrypts, splice relay)",
                Mode::Userspace => "userspace fallback (rustls relay)",
            }
        );
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        for m in &self.missing {
            let _ = writeln!(s, "MISSING: {m}");
        }
        s
    }
}
