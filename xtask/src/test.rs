//! `cargo xtask test`: what CI runs, cheapest first, so a formatting slip fails in seconds and
//! not after the VM boots.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};

use crate::{deploy, fuzz, run, run_within, vm};

/// Test targets of `interceptor-tests` that need kernel TLS: they run only in the VM (and fail
/// loudly if started on a host without the `tls` ULP).
const VM_ONLY: &[&str] = &["ktls_guards", "relay_ktls", "crypto_ktls", "upgrade_ktls"];

#[derive(Debug, clap::Args)]
pub(crate) struct TestArgs {
    /// Skip the QEMU run (for quick local iterations; CI never passes this).
    #[arg(long)]
    no_vm: bool,
}

pub(crate) fn test(root: &Path, args: &TestArgs) -> Result<()> {
    run(
        root,
        Command::new("cargo").args(["fmt", "--all", "--", "--check"]),
    )?;
    deploy::validate_manifests(root)?;
    run(
        root,
        Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]),
    )?;
    deploy::deny(root)?;
    // The eBPF crate is not a default member (it only builds for bpfel-unknown-none).
    run(
        root,
        Command::new("cargo").args([
            "+nightly",
            "clippy",
            "-p",
            "interceptor-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--bins",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        root,
        Command::new("cargo").args([
            "test",
            "-p",
            "interceptor-common",
            "-p",
            "interceptor",
            "-p",
            "xtask",
            "-p",
            "interceptor-bench",
            "-p",
            "interceptor-cni",
            "-p",
            "interceptor-wire",
        ]),
    )?;
    host_privileged(root)?;
    fuzz::fuzz(
        root,
        &fuzz::FuzzArgs {
            smoke: true,
            time: None,
            targets: Vec::new(),
        },
    )?;
    if args.no_vm {
        eprintln!("--no-vm: VM tests NOT run; this is not a full test run");
        return Ok(());
    }
    vm::vm_test(
        root,
        &vm::VmTestArgs {
            kernel: "all".to_owned(),
            filter: None,
            release: false,
            jobs: 1,
        },
    )
}

/// Every host-capable integration test of `interceptor-tests`, as root, with skips turned into
/// failures.
fn host_privileged(root: &Path) -> Result<()> {
    // The demo test drives the real `interceptor` binary, and the CNI tests the real
    // `interceptor-cni`, found next to the test executables; cni_podman runs both from the
    // image, as the DaemonSet does. The dev image builds those two binaries and packs them (no
    // release build).
    deploy::image(
        root,
        &deploy::ImageArgs {
            profile: deploy::ImageProfile::Dev,
        },
    )?;
    let metadata = cargo_metadata::MetadataCommand::new()
        .current_dir(root)
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "interceptor-tests")
        .context("interceptor-tests package")?;
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "-p", "interceptor-tests", "--lib"]);
    for target in &package.targets {
        if target.kind.iter().any(|k| k.to_string() == "test")
            && !VM_ONLY.contains(&target.name.as_str())
        {
            cmd.args(["--test", &target.name]);
        }
    }
    cmd.env("INTERCEPTOR_REQUIRE_PRIVILEGED", "1");
    // Build and run take ~4 min on a fresh machine; a hang must not take CI's 90.
    run_within(root, &mut cmd, Duration::from_secs(20 * 60))
}
