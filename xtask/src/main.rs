//! `cargo xtask`: the project's build, test and demo entry points. Every command first runs
//! `setup`, so a fresh machine needs nothing but the Rust toolchains.

mod bench;
mod deploy;
mod fuzz;
mod setup;
mod soak;
mod test;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::LazyLock,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, test and demo the interceptor")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (no-op when present).
    Setup,
    /// Everything CI runs: setup, fmt, clippy, unit tests, privileged host tests, VM tests.
    Test(test::TestArgs),
    /// Boot Debian kernels in QEMU and run the test binaries there (kTLS lives there).
    VmTest(vm::VmTestArgs),
    /// The main job: set up, build, probe, then run the agent on a throwaway node (two enrolled
    /// pods, one legacy) and print the curl matrix and the wire check.
    Demo(DemoArgs),
    /// libFuzzer runs of the input parsers (`--smoke` for CI, `--time SECS` for a long run).
    Fuzz(fuzz::FuzzArgs),
    /// Side-by-side benchmark: interceptor vs HAProxy mTLS sidecars vs plaintext.
    Bench(bench::BenchArgs),
    /// The deploy/ manifests against the Kubernetes schemas, and `cargo deny` (both are part
    /// of `test`).
    DeployCheck,
    /// The container image the DaemonSet names (`FROM scratch`, podman), and its size.
    Image(deploy::ImageArgs),
    /// Long run of the real agent under mixed churn and bulk: transfers, wire, memory and
    /// descriptors checked (not part of CI).
    Soak(soak::SoakArgs),
}

/// When this xtask started: every step prints its offset and duration, so a slow CI run says
/// which step grew without anyone re-running it under a stopwatch.
static STARTED: LazyLock<Instant> = LazyLock::new(Instant::now);

/// `mm:ss` since the xtask started.
pub(crate) fn elapsed() -> String {
    let secs = STARTED.elapsed().as_secs();
    format!("{:02}:{:02}", secs / 60, secs % 60)
}

fn main() -> Result<()> {
    LazyLock::force(&STARTED);
    let cli = Cli::parse();
    let root = workspace_root()?;
    setup::setup(&root)?;
    match cli.command {
        Cmd::Setup => Ok(()),
        Cmd::Test(args) => test::test(&root, &args),
        Cmd::VmTest(args) => vm::vm_test(&root, &args),
        Cmd::Demo(args) => demo(&root, &args),
        Cmd::Fuzz(args) => fuzz::fuzz(&root, &args),
        Cmd::Bench(args) => bench::bench(&root, &args),
        Cmd::DeployCheck => deploy::validate_manifests(&root).and_then(|()| deploy::deny(&root)),
        Cmd::Image(args) => deploy::image(&root, &args),
        Cmd::Soak(args) => soak::soak(&root, &args),
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_owned)
        .context("xtask has no parent directory")
}

/// Runs a command in the workspace, echoing it, and fails naming it when it fails.
pub(crate) fn run(root: &Path, cmd: &mut Command) -> Result<()> {
    eprintln!("+ [{}] {}", elapsed(), display(cmd));
    let step = Instant::now();
    let status = cmd
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot start {}", display(cmd)))?;
    finish(cmd, step, status)
}

/// [`run`] with a deadline, for steps whose tests fork and could hang: the whole process
/// group (cargo, the test binaries, their children) is killed at `limit`, so a hung test
/// fails CI in minutes, with cargo's "has been running for over 60 seconds" lines naming it
/// above, instead of using up CI's time.
pub(crate) fn run_within(root: &Path, cmd: &mut Command, limit: Duration) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    eprintln!("+ [{}] {}", elapsed(), display(cmd));
    let step = Instant::now();
    let mut child = cmd
        .current_dir(root)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", display(cmd)))?;
    let status = loop {
        if let Some(status) = child.try_wait().context("wait")? {
            break status;
        }
        if step.elapsed() > limit {
            // The group's id is the child's pid (process_group(0)).
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            bail!(
                "`{}` did not finish within {} s: killed (a hung test; cargo named the tests \
                 still running above)",
                display(cmd),
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    finish(cmd, step, status)
}

fn finish(cmd: &Command, step: Instant, status: std::process::ExitStatus) -> Result<()> {
    eprintln!(
        "  [{}] {:.0} s: {}",
        elapsed(),
        step.elapsed().as_secs_f64(),
        cmd.get_program().to_string_lossy()
    );
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

pub(crate) fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Run the demo inside the QEMU VM on Debian 6.1, where the kernel has TLS.
    #[arg(long)]
    vm: bool,
    /// Real containers instead: podman pods (CNI backend) enrolled by `interceptor-cni`.
    #[arg(long, conflicts_with = "vm")]
    containers: bool,
}

/// `cargo build --release` of the agent and `package`'s binary `bin`, in one cargo run.
fn build_release_with_agent(root: &Path, package: &str, bin: &str) -> Result<()> {
    run(
        root,
        Command::new("cargo").args([
            "build",
            "--release",
            "-p",
            "interceptor",
            "--bin",
            "interceptor",
            "-p",
            package,
            "--bin",
            bin,
        ]),
    )
}

fn demo(root: &Path, args: &DemoArgs) -> Result<()> {
    if args.containers {
        // The container end-to-end test, narrating: it runs the agent and the installer from
        // the dev image, and its plugin binaries sit next to it.
        deploy::image(
            root,
            &deploy::ImageArgs {
                profile: deploy::ImageProfile::Dev,
            },
        )?;
        return run(
            root,
            Command::new("cargo")
                .args([
                    "test",
                    "-p",
                    "interceptor-tests",
                    "--test",
                    "cni_podman",
                    "--",
                    "--nocapture",
                ])
                .env("INTERCEPTOR_DEMO", "1")
                .env("INTERCEPTOR_REQUIRE_PRIVILEGED", "1"),
        );
    }
    if args.vm {
        return vm::vm_test(
            root,
            &vm::VmTestArgs {
                kernel: "6.1".to_owned(),
                filter: Some("demo_matrix".to_owned()),
                release: true,
                jobs: 1,
            },
        );
    }
    build_release_with_agent(root, "interceptor-tests", "demo")?;
    let bin = root.join("target/release/interceptor");
    // The probe exits non-zero when a required capability is missing; the demo shows that
    // verdict and goes on (without kTLS it runs the userspace relay).
    let status = Command::new(&bin).arg("probe").status()?;
    eprintln!("interceptor probe exited with {status}\n");
    run(
        root,
        Command::new(root.join("target/release/demo")).env("INTERCEPTOR_AGENT_BIN", &bin),
    )
}
