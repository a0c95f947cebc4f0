//! `cargo xtask bench [--vm] [--quick] [--rounds N] [--modes ...]`: builds the agent and the
//! benchmark harness in release mode (debug builds of TLS proxies are ~4× slower and prove
//! nothing) and runs `interceptor-bench run` as root, on this host or, with `--vm`, inside the
//! QEMU guest on Debian 6.1/6.12 so the kTLS mode has numbers. Results land in
//! `target/bench/<host|vm-6.1|vm-6.12>/results.{json,md,svg}`; method and caveats are in
//! `bench/README.md`.

mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::{build_release_with_agent, run};

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Run inside the QEMU VM (Debian kernels with the tls module) instead of on this host.
    #[arg(long)]
    pub vm: bool,
    /// Debian kernel series for --vm; `all` boots each in turn.
    #[arg(long, default_value = "6.1", value_parser = ["6.1", "6.12", "all"])]
    pub kernel: String,
    /// Short durations and 2 rounds: a smoke run, not a result.
    #[arg(long)]
    pub quick: bool,
    /// Measured rounds (default 5, --quick 2).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Modes, comma separated: plaintext, ktls, relay, haproxy, skmsg (default: all).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Workloads, comma separated: iperf1 iperf4 rr64 rr1k http churn idle (default: all), and
    /// the opt-in churn2 (2 client threads), sustained, scale.
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Topologies, comma separated: same-node, cross-node (default: both).
    #[arg(long, value_delimiter = ',')]
    pub topology: Vec<String>,
    /// Pin the client pod to CPU 0 and the server pod to CPU 1 ("two one-core nodes").
    #[arg(long)]
    pub pin: bool,
    /// Also run the criterion microbenchmarks (`cargo bench -p interceptor-bench`), host only.
    #[arg(long)]
    pub micro: bool,
    /// The AEAD the guest kernel offers kTLS (--vm only): `aes-gcm` and `chacha20-poly1305`
    /// (default: both, so the agent negotiates AES-128-GCM), or `chacha20-poly1305` alone: the
    /// guest then has no `gcm(aes)` at all (its `aesni_intel` and `gcm` modules are left
    /// out), the agent's kTLS probe finds ChaCha20-Poly1305 only and kTLS flows use it, while
    /// the userspace relay stays on AES-GCM (the relay offers nothing else).
    #[arg(long, default_value = "all", value_parser = ["all", "chacha20-poly1305"])]
    pub kernel_aead: String,
}

impl BenchArgs {
    /// The arguments `interceptor-bench run` gets, besides `--agent` and `--out`.
    fn harness_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if self.quick {
            a.push("--quick".to_owned());
        }
        if let Some(r) = self.rounds {
            a.extend(["--rounds".to_owned(), r.to_string()]);
        }
        for (flag, list) in [
            ("--modes", &self.modes),
            ("--workloads", &self.workloads),
            ("--topology", &self.topology),
        ] {
            if !list.is_empty() {
                a.extend([flag.to_owned(), list.join(",")]);
            }
        }
        if self.pin {
            a.push("--pin".to_owned());
        }
        a
    }
}

/// The release binaries a run needs.
pub(crate) struct Binaries {
    pub(crate) agent: PathBuf,
    pub(crate) harness: PathBuf,
}

pub fn bench(root: &Path, args: &BenchArgs) -> Result<()> {
    let bins = build(root)?;
    if args.micro {
        run(
            root,
            Command::new("cargo").args(["bench", "-p", "interceptor-bench"]),
        )?;
    }
    if args.vm {
        return vm::bench_in_vm(root, &bins, args);
    }
    if !is_root() {
        bail!(
            "the benchmark needs root (network namespaces, cgroups, eBPF); run `sudo -E cargo \
             xtask bench`"
        );
    }
    let out = target_dir(root).join("bench/host");
    let mut cmd = Command::new(&bins.harness);
    cmd.arg("run")
        .arg("--agent")
        .arg(&bins.agent)
        .arg("--out")
        .arg(&out)
        .args(args.harness_args());
    run(root, &mut cmd)
}

/// Effective UID 0, from `/proc/self/status` (xtask has no libc dependency).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn build(root: &Path) -> Result<Binaries> {
    build_release_with_agent(root, "interceptor-bench", "interceptor-bench")?;
    let release = target_dir(root).join("release");
    let bins = Binaries {
        agent: release.join("interceptor"),
        harness: release.join("interceptor-bench"),
    };
    for b in [&bins.agent, &bins.harness] {
        if !b.is_file() {
            bail!("cargo build succeeded but {} is missing", b.display());
        }
    }
    Ok(bins)
}

/// Honours `CARGO_TARGET_DIR`, like `vm-test`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}
