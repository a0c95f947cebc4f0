//! `cargo xtask bench --vm`: the same harness inside the QEMU guest, because the host kernel
//! has no `tls` ULP and kernel TLS numbers can only come from a kernel that has one.
//!
//! The guest is a busybox initramfs (built with `vm::initramfs::build_custom`) holding the
//! release agent, the harness, and the host's iperf3, sockperf and haproxy with their shared
//! libraries. Its `/init` runs `interceptor-bench run` with VM-sized parameters and prints
//! `results.json` and `results.md` between markers on the serial console; the host cuts them
//! out and writes `target/bench/vm-<series>/`.
//!
//! Under TCG, AES runs ~135× and TCP ~51× slower than on the host (baseline measurements), so
//! VM runs use lower rates and fewer idle flows, and their ratios to plaintext are reported as
//! emulator artefacts, never as results; what they show is kTLS vs the userspace relay within
//! the same boot.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{BenchArgs, Binaries, target_dir};
use crate::vm::{
    initramfs::{self, SYSTEM_MOUNTS, shell_quote},
    kernel,
};

const BEGIN_JSON: &str = "BENCH-RESULTS-JSON-BEGIN";
const END_JSON: &str = "BENCH-RESULTS-JSON-END";
const BEGIN_MD: &str = "BENCH-RESULTS-MD-BEGIN";
const END_MD: &str = "BENCH-RESULTS-MD-END";

/// Debian tools the guest needs from the host (with their libraries).
const TOOLS: &[&str] = &["iperf3", "sockperf", "haproxy"];

pub(super) fn bench_in_vm(root: &Path, bins: &Binaries, args: &BenchArgs) -> Result<()> {
    let series = match args.kernel.as_str() {
        "6.1" => vec![kernel::Series::V6_1],
        "6.12" => vec![kernel::Series::V6_12],
        "all" => vec![kernel::Series::V6_1, kernel::Series::V6_12],
        other => bail!("unknown kernel series {other:?}"),
    };
    let target = target_dir(root);
    let kernel_cache = target.join("vm/kernels");
    let mut tool_paths = Vec::new();
    for tool in TOOLS {
        let path = which::which(tool)
            .with_context(|| format!("{tool} is not installed on the host (cargo xtask setup)"))?;
        tool_paths.push((path, format!("usr/bin/{tool}")));
    }
    let git = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut harness_args = args.harness_args();
    if !args.quick {
        // Full-length runs under TCG would take hours; the VM answers a narrower question.
        harness_args.push("--quick".to_owned());
    }
    harness_args.extend(
        [
            "--http-rate",
            "200",
            "--idle-flows",
            "100",
            "--agent",
            "/bin/interceptor",
            "--out",
            "/tmp/bench",
        ]
        .map(str::to_owned),
    );
    for series in series {
        let label = series.label();
        let kernel = kernel::fetch(&kernel_cache, series)?;
        let work = target.join(format!("bench/vm-{label}/initramfs"));
        fs::create_dir_all(&work)?;
        let mut exes: Vec<(&Path, &str)> = vec![
            (bins.agent.as_path(), "bin/interceptor"),
            (bins.harness.as_path(), "bin/interceptor-bench"),
        ];
        for (p, d) in &tool_paths {
            exes.push((p.as_path(), d.as_str()));
        }
        let chacha_only = args.kernel_aead == "chacha20-poly1305";
        let initrd = initramfs::build_custom(&work, &kernel, &exes, |modules| {
            init_script(modules, &harness_args, &git, chacha_only)
        })?;
        println!(
            "bench: booting {} ({}) with the benchmark",
            kernel.package, kernel.release
        );
        let console = boot(label, &kernel.vmlinuz, &initrd)?;
        let out = target.join(format!("bench/vm-{label}"));
        let json = between(&console, BEGIN_JSON, END_JSON)
            .with_context(|| format!("the {label} guest printed no results (see above)"))?;
        serde_json::from_str::<serde_json::Value>(&json)
            .context("the guest's results.json does not parse")?;
        fs::write(out.join("results.json"), &json)?;
        if let Some(md) = between(&console, BEGIN_MD, END_MD) {
            fs::write(out.join("results.md"), md)?;
        }
        fs::write(out.join("console.log"), console.join("\n"))?;
        // The SVG (and a fresh summary) are rendered on the host from the guest's samples.
        crate::run(root, Command::new(&bins.harness).arg("render").arg(&out))?;
        println!("bench: VM {label} results in {}", out.display());
    }
    Ok(())
}

fn between(lines: &[String], begin: &str, end: &str) -> Option<String> {
    let start = lines.iter().position(|l| l.trim_end() == begin)?;
    let stop = start + lines[start..].iter().position(|l| l.trim_end() == end)?;
    Some(lines[start + 1..stop].join("\n"))
}

/// The guest's PID 1: mount, load modules, run the harness, print the results, power off.
/// It must never exit (the kernel would panic), so everything ends in `poweroff -f`.
fn init_script(
    modules: &[String],
    harness_args: &[String],
    git: &str,
    chacha_only: bool,
) -> String {
    let args: Vec<String> = harness_args.iter().map(|a| shell_quote(a)).collect();
    // Without these nothing in the guest provides `gcm(aes)` (the kernel would load them on
    // demand; without GHASH not even a built-in `gcm` template can): kTLS then has
    // ChaCha20-Poly1305 alone.
    let (drop_aes, modules) = if chacha_only {
        (
            "find /lib/modules \\( -name 'aesni-intel.ko*' -o -name 'gcm.ko*' -o -name 'ghash-*.ko*' \\) -exec rm -f {} \\;\n\
             echo \"bench-init: AES-GCM modules removed (kTLS offers ChaCha20-Poly1305 only)\"\n",
            modules
                .iter()
                .filter(|m| {
                    !matches!(
                        m.as_str(),
                        "aesni_intel" | "gcm" | "ghash_generic" | "ghash_clmulni_intel"
                    )
                })
                .cloned()
                .collect::<Vec<_>>(),
        )
    } else {
        ("", modules.to_vec())
    };
    format!(
        r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb RUST_BACKTRACE=1 INTERCEPTOR_IN_VM=1
export INTERCEPTOR_BENCH_GIT_COMMIT={git}
{SYSTEM_MOUNTS}mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname vm
ulimit -l unlimited
ulimit -n 65536
{drop_aes}for m in {modules}; do
    modprobe "$m" 2>/dev/null || echo "bench-init: modprobe $m failed"
done
ip link set lo up
echo "bench-init: kernel $(uname -r), tcp_available_ulp: $(cat /proc/sys/net/ipv4/tcp_available_ulp)"
cd /tmp
/bin/interceptor-bench run {args}
echo "bench-init: harness exit status $?"
echo {BEGIN_JSON}
cat /tmp/bench/results.json 2>/dev/null
echo
echo {END_JSON}
echo {BEGIN_MD}
cat /tmp/bench/results.md 2>/dev/null
echo {END_MD}
sync
poweroff -f
"#,
        git = shell_quote(git),
        modules = modules.join(" "),
        drop_aes = drop_aes,
        args = args.join(" "),
    )
}

/// Boots the guest, echoing the console live, and returns it line by line. Bounded by
/// `INTERCEPTOR_BENCH_VM_TIMEOUT` (default 5400 s) and by 900 s of console silence.
fn boot(label: &str, kernel: &Path, initrd: &Path) -> Result<Vec<String>> {
    let total = Duration::from_secs(
        std::env::var("INTERCEPTOR_BENCH_VM_TIMEOUT")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(5400),
    );
    let silence = Duration::from_secs(900);
    let kvm = std::env::var("INTERCEPTOR_VM_KVM").is_ok_and(|v| v == "1");
    let mut cmd = initramfs::qemu_command(kernel, initrd, kvm, "tcg,thread=multi");
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let started = Instant::now();
    let mut child = cmd.spawn().context("failed to start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("QEMU stdout not captured")?;
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line: String = String::from_utf8_lossy(&line)
                .chars()
                .filter(|c| *c != '\r' && (!c.is_control() || *c == '\t'))
                .collect();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut last = Instant::now();
    let mut problem = None;
    loop {
        let left = total
            .saturating_sub(started.elapsed())
            .min(silence.saturating_sub(last.elapsed()));
        match rx.recv_timeout(left) {
            Ok(line) => {
                last = Instant::now();
                println!("[vm {label}] {line}");
                if line.contains("Kernel panic") {
                    problem = Some(format!("kernel panic: {line}"));
                }
                lines.push(line);
            }
            Err(RecvTimeoutError::Timeout) => {
                problem = Some(if started.elapsed() >= total {
                    format!("timed out after {} s", total.as_secs())
                } else {
                    format!("console silent for {} s", silence.as_secs())
                });
                let _ = child.kill();
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("wait for QEMU")?;
    let _ = reader.join();
    if let Some(p) = problem {
        bail!("VM {label}: {p}");
    }
    ensure!(status.success(), "QEMU exited with {status}");
    Ok(lines)
}
