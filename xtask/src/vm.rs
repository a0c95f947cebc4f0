//! `cargo xtask vm-test`: runs the `interceptor-tests` binaries as root inside QEMU on Debian
//! kernels, because kernel TLS (`CONFIG_TLS`) and the other kernel features the agent needs
//! cannot be assumed on a development host or CI runner.
//!
//! The flow is: build the test binaries and the agent on the host, fetch and cache a Debian
//! kernel package per series (`kernel`), pack a busybox initramfs around them (`initramfs`),
//! then boot it and judge the serial console (`qemu`). The guest prints exactly one
//! `VM-VERDICT:` line; no verdict, a kernel fault, a hang or a timeout is a failure.

pub(crate) mod initramfs;
pub(crate) mod kernel;
mod qemu;

use std::{
    env,
    ffi::OsString,
    io::BufReader,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use cargo_metadata::Message;

use self::{kernel::Series, qemu::Outcome};

/// Options of `cargo xtask vm-test [--kernel 6.1|6.12|all] [FILTER]`.
#[derive(Debug, Clone, clap::Args)]
pub struct VmTestArgs {
    /// Debian kernel series to boot; `all` boots each in turn.
    #[arg(long, default_value = "all", value_parser = ["6.1", "6.12", "all"])]
    pub kernel: String,
    /// Run only the tests whose name contains this string (passed to libtest as its filter).
    pub filter: Option<String>,
    /// Build the test binaries and the agent with the release profile.
    #[arg(long)]
    pub release: bool,
    /// How many guests boot at once (`--kernel all`). A TCG guest leaves the host's cores
    /// idle while its tests wait on timers and each other, so two guests overlap well.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub jobs: u8,
}

/// Host tools the VM run shells out to; `cargo xtask setup` installs the ones Debian does not
/// ship by default (qemu-system-x86, busybox-static, cpio, kmod, xz-utils).
const REQUIRED_HOST_TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "busybox",
    "cpio",
    "depmod",
    "xz",
    "gzip",
    "ldd",
    "dpkg-deb",
    "apt-get",
    "apt-cache",
];

/// Test suites the host runs (`cargo xtask test`) and the VM skips: they exercise only the
/// userspace relay, or kernel behaviour no different in the guests (port choice, TIME_WAIT,
/// resource limits, libfaketime which the guest lacks). One per line, so parallel additions merge cleanly.
const HOST_ONLY: &[&str] = &[
    "churn_e2e",
    "cni_enroll",
    "cni_podman",
    "crypto_e2e",
    "enroll_e2e",
    "faults_e2e",
    "identity_clock",
    "intercept_netns",
    // The harness library's own unit tests (packet parsing, the wire oracle): no kernel in them.
    "interceptor_tests",
    "kube_e2e",
    "kube_watch",
    "limits_e2e",
    "limits_flood",
    "metrics_e2e",
    "relay_userspace",
    "resumption_e2e",
    "samenode_e2e",
    "spares_e2e",
    "upgrade_e2e",
];

/// A test harness binary built by cargo, named by its target so guest logs stay readable.
#[derive(Debug, Clone)]
pub(crate) struct TestBinary {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
}

/// Everything a guest runs, built once and shared by every kernel.
#[derive(Debug)]
struct Binaries {
    tests: Vec<TestBinary>,
    agent: PathBuf,
    /// Helper programs the suites run in pods, installed as `/bin/<name>` in the guest.
    helpers: Vec<TestBinary>,
}

/// `interceptor-tests` programs a VM suite runs (found in the guest at `/bin/<name>`).
const GUEST_HELPERS: &[&str] = &["upgrade_load"];

/// How one kernel's run ended, kept for the closing summary.
struct KernelReport {
    label: &'static str,
    package: String,
    release: String,
    prepare: Duration,
    outcome: Outcome,
}

pub fn vm_test(workspace_root: &Path, args: &VmTestArgs) -> Result<()> {
    let series = match args.kernel.as_str() {
        "6.1" => vec![Series::V6_1],
        "6.12" => vec![Series::V6_12],
        "all" => vec![Series::V6_1, Series::V6_12],
        other => bail!("unknown kernel series {other:?}: expected 6.1, 6.12 or all"),
    };
    check_host_tools()?;
    let limits = qemu::Limits::from_env()?;

    let binaries = build_binaries(workspace_root, args.release)?;
    let vm_dir = target_dir(workspace_root).join("vm");
    let kernel_cache = vm_dir.join("kernels");

    // Fetching kernels and packing initramfs images is quick and shares one cache: do it in
    // turn, then boot the guests (at most `jobs` at a time).
    let mut guests = Vec::new();
    for series in series {
        let started = Instant::now();
        let kernel = kernel::fetch(&kernel_cache, series)?;
        let payload = initramfs::Payload {
            tests: &binaries.tests,
            agent: &binaries.agent,
            helpers: &binaries.helpers,
            filter: args.filter.as_deref(),
        };
        let initrd = initramfs::build(&vm_dir.join(series.label()), &kernel, &payload)?;
        guests.push((series, kernel, initrd, started.elapsed()));
    }
    let boot = |(series, kernel, initrd, prepare): (Series, kernel::Kernel, PathBuf, Duration)| {
        println!(
            "vm-test: [{}] booting {} ({}) under {}",
            crate::elapsed(),
            kernel.package,
            kernel.release,
            limits.accel_name()
        );
        let outcome = qemu::run(series.label(), &kernel.vmlinuz, &initrd, &limits)?;
        anyhow::Ok(KernelReport {
            label: series.label(),
            package: kernel.package,
            release: kernel.release,
            prepare,
            outcome,
        })
    };
    let mut reports = Vec::new();
    while !guests.is_empty() {
        let batch: Vec<_> = guests
            .drain(..usize::from(args.jobs).min(guests.len()))
            .collect();
        let outcomes = std::thread::scope(|scope| {
            let running: Vec<_> = batch
                .into_iter()
                .map(|guest| scope.spawn(|| boot(guest)))
                .collect();
            running
                .into_iter()
                .map(|guest| {
                    guest
                        .join()
                        .unwrap_or_else(|_| bail!("a guest's watcher panicked"))
                })
                .collect::<Vec<_>>()
        });
        for outcome in outcomes {
            reports.push(outcome?);
        }
    }

    println!();
    println!("vm-test summary ({}):", limits.accel_name());
    for report in &reports {
        let outcome = &report.outcome;
        let status = match outcome.failure() {
            None => "ok".to_owned(),
            Some(reason) => format!("FAILED: {reason}"),
        };
        let counts = outcome.verdict.as_ref().map_or_else(
            || "no verdict".to_owned(),
            |v| format!("{} passed, {} failed", v.passed, v.failed),
        );
        println!(
            "  {:<5} {} ({}): {status}; {counts}; boot+run {:.1} s, fetch+initramfs {:.1} s",
            report.label,
            report.package,
            report.release,
            outcome.elapsed.as_secs_f64(),
            report.prepare.as_secs_f64(),
        );
        for warning in &outcome.warnings {
            println!("        kernel warning: {warning}");
        }
    }
    let failed: Vec<_> = reports
        .iter()
        .filter(|r| r.outcome.failure().is_some())
        .map(|r| r.label)
        .collect();
    ensure!(
        failed.is_empty(),
        "VM tests failed on kernel {}",
        failed.join(", ")
    );
    Ok(())
}

fn check_host_tools() -> Result<()> {
    let missing: Vec<_> = REQUIRED_HOST_TOOLS
        .iter()
        .copied()
        .filter(|tool| which::which(tool).is_err())
        .collect();
    ensure!(
        missing.is_empty(),
        "missing host tools for vm-test: {}; run `cargo xtask setup` (installs qemu-system-x86 \
         busybox-static cpio kmod xz-utils)",
        missing.join(", ")
    );
    Ok(())
}

/// Honours `CARGO_TARGET_DIR` so the VM cache lands next to the binaries it packs.
fn target_dir(workspace_root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root.join(dir),
        None => workspace_root.join("target"),
    }
}

fn build_binaries(workspace_root: &Path, release: bool) -> Result<Binaries> {
    let profile: &[&str] = if release { &["--release"] } else { &[] };

    let mut test_args = vec!["test", "--no-run", "-p", "interceptor-tests"];
    test_args.extend_from_slice(profile);
    let mut tests = Vec::new();
    let mut helpers = Vec::new();
    for artifact in cargo_artifacts(workspace_root, &test_args)? {
        if GUEST_HELPERS.contains(&artifact.target.name.as_str())
            && !artifact.profile.test
            && let Some(path) = &artifact.executable
        {
            helpers.push(TestBinary {
                name: artifact.target.name.clone(),
                path: path.clone().into_std_path_buf(),
            });
        }
        // A bin target's unit-test harness (e.g. the `demo` binary's) is not a test suite.
        // Host-only suites cover the userspace relay, which the host runs; the VM's time goes
        // to what only it can test (kTLS).
        let is_bin = artifact.target.kind.iter().any(|k| k.to_string() == "bin")
            || HOST_ONLY.contains(&artifact.target.name.as_str());
        if let (true, false, Some(path)) = (artifact.profile.test, is_bin, artifact.executable) {
            tests.push(TestBinary {
                name: artifact.target.name,
                path: path.into_std_path_buf(),
            });
        }
    }
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    ensure!(
        !tests.is_empty(),
        "cargo built no test binaries for interceptor-tests"
    );
    if let Some(pair) = tests.windows(2).find(|pair| pair[0].name == pair[1].name) {
        bail!("two test binaries share the target name {:?}", pair[0].name);
    }

    let mut agent_args = vec!["build", "-p", "interceptor", "--bin", "interceptor"];
    agent_args.extend_from_slice(profile);
    let agent = cargo_artifacts(workspace_root, &agent_args)?
        .into_iter()
        .filter(|a| a.target.name == "interceptor" && !a.profile.test)
        .find_map(|a| a.executable)
        .context("cargo reported no executable for the interceptor agent")?
        .into_std_path_buf();

    Ok(Binaries {
        tests,
        agent,
        helpers,
    })
}

/// Runs cargo with JSON messages on stdout; diagnostics are still rendered to the terminal.
fn cargo_artifacts(workspace_root: &Path, args: &[&str]) -> Result<Vec<cargo_metadata::Artifact>> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut child = Command::new(&cargo)
        .current_dir(workspace_root)
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("failed to run cargo {}", args.join(" ")))?;
    let stdout = child
        .stdout
        .take()
        .context("cargo's stdout was not captured")?;
    let mut artifacts = Vec::new();
    for message in Message::parse_stream(BufReader::new(stdout)) {
        let message = message.context("failed to read cargo's JSON messages")?;
        if let Message::CompilerArtifact(artifact) = message {
            artifacts.push(artifact);
        }
    }
    let status = child.wait().context("failed to wait for cargo")?;
    ensure!(
        status.success(),
        "cargo {} failed: {status}",
        args.join(" ")
    );
    Ok(artifacts)
}
