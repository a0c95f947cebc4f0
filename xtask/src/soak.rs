//! `cargo xtask soak [--minutes N]`: the real agent on two nodes, in its defaults, under mixed
//! churn and bulk load with roots retiring, policy reloads and leaf renewals for N minutes
//! (default 10), checking every transfer, the wire, both agents' memory and descriptors and
//! that derived connection keys hold up (see `tests/src/bin/soak.rs`). Not part of CI: it is
//! long by design.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::run;

#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// How long the load runs, in minutes.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
}

pub(crate) fn soak(root: &Path, args: &SoakArgs) -> Result<()> {
    anyhow::ensure!(
        args.minutes > 0.0,
        "--minutes must be positive, got {}",
        args.minutes
    );
    // The wire check searches every captured byte: the harness is optimised (its
    // dependencies and the agent keep the dev profile, so nothing else is rebuilt).
    run(
        root,
        Command::new("cargo").args([
            "build",
            "-p",
            "interceptor",
            "--bin",
            "interceptor",
            "-p",
            "interceptor-tests",
            "--bin",
            "soak",
            "--config",
            "profile.dev.package.interceptor-tests.opt-level=2",
        ]),
    )?;
    let bin = target_dir(root).join("debug");
    run(
        root,
        Command::new(bin.join("soak"))
            .args(["--minutes", &args.minutes.to_string()])
            .env("INTERCEPTOR_AGENT_BIN", bin.join("interceptor")),
    )
}

/// Honours `CARGO_TARGET_DIR`, as cargo does.
fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}
