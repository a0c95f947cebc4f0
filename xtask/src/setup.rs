//! `cargo xtask setup`: installs the toolchain pieces and Debian packages the build and the
//! tests need, and does nothing when they are present.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// Debian packages: QEMU and an initramfs toolkit for the kTLS VM, the network tools the
/// end-to-end tests drive, Prometheus for the metrics test, the clients, servers and sidecar
/// proxy the benchmark compares, and the container runtime the CNI plugin is tested under.
const DEBIAN_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "xz-utils",
    "iproute2",
    "nftables",
    "tcpdump",
    "curl",
    "faketime",
    "iperf3",
    "haproxy",
    "sockperf",
    "wrk",
    // The bench's ztunnel modes: in-pod redirection as Istio ambient installs it.
    "iptables",
    // The CNI plugin's end-to-end test and `demo --containers`: a real container runtime
    // with the CNI network backend (runc: crun refuses hybrid cgroup hosts).
    "podman",
    "runc",
    "containernetworking-plugins",
    // A real Prometheus (and promtool) for the metrics end-to-end test.
    "prometheus",
];

const BPF_LINKER_SERIES: &str = "0.13";

pub(crate) fn setup(root: &Path) -> Result<()> {
    nightly_rust_src(root)?;
    bpf_linker(root)?;
    cargo_fuzz(root)?;
    debian_packages(root)?;
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("cannot run rustc +nightly")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing (the eBPF crate needs it): rustup toolchain install nightly\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn nightly_rust_src(root: &Path) -> Result<()> {
    let sysroot = nightly_sysroot()?;
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    run(
        root,
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

/// bpf-linker must be built against the very libLLVM nightly rustc uses, or the bitcode it
/// links will not match; nightly ships that library in its sysroot, so we point
/// `LLVM_PREFIX` at a directory holding a `libLLVM.so` link to it.
fn bpf_linker(root: &Path) -> Result<()> {
    let lib_dir = nightly_sysroot()?.join("lib");
    // The linker is dynamically linked to nightly's libLLVM, which is only found through the
    // toolchain's library path (as `rustup run nightly` sets it for aya-build).
    if let Ok(out) = Command::new("bpf-linker")
        .arg("--version")
        .env("LD_LIBRARY_PATH", &lib_dir)
        .output()
        && String::from_utf8_lossy(&out.stdout).contains(&format!("bpf-linker {BPF_LINKER_SERIES}"))
    {
        return Ok(());
    }
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("read {}", lib_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let name = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM file name")?;
    // libLLVM.so.22.1-rust-1.97.0-nightly → 22
    let major = name
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .context("libLLVM version")?;
    let prefix = home()?.join(".cache/interceptor/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)
        .with_context(|| format!("symlink {}", link.display()))?;
    run(
        root,
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                &format!("^{BPF_LINKER_SERIES}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// `cargo fuzz` drives the libFuzzer targets in `fuzz/` (with the nightly toolchain).
fn cargo_fuzz(root: &Path) -> Result<()> {
    if Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    run(
        root,
        Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]),
    )
}

fn home() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn debian_packages(root: &Path) -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    run(root, Command::new("apt-get").args(["update", "-qq"]))?;
    run(
        root,
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
