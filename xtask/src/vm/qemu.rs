//! Boots a kernel and initramfs under QEMU and judges the run from the serial console alone,
//! streaming it live so a developer sees the guest as it runs.
//!
//! TCG is the default: nested KVM on CI and development VMs often exists but hangs, and a
//! kTLS test suite needs correctness, not speed. `INTERCEPTOR_VM_KVM=1` opts into KVM.

use std::{
    env,
    io::Read,
    path::Path,
    process::{Child, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use super::initramfs::qemu_command;

/// Watchdogs for one QEMU run, from the environment.
#[derive(Debug)]
pub(crate) struct Limits {
    /// `INTERCEPTOR_VM_TIMEOUT`: the whole boot and test run.
    total: Duration,
    /// `INTERCEPTOR_VM_HANG_TIMEOUT`: the longest the console may stay silent.
    silence: Duration,
    kvm: bool,
}

impl Limits {
    pub(crate) fn from_env() -> Result<Self> {
        let kvm = env::var("INTERCEPTOR_VM_KVM").is_ok_and(|v| v == "1");
        if kvm {
            ensure!(
                Path::new("/dev/kvm").exists(),
                "INTERCEPTOR_VM_KVM=1 but /dev/kvm does not exist"
            );
        }
        Ok(Self {
            total: seconds_from_env("INTERCEPTOR_VM_TIMEOUT", 1500)?,
            silence: seconds_from_env("INTERCEPTOR_VM_HANG_TIMEOUT", 300)?,
            kvm,
        })
    }

    pub(crate) fn accel_name(&self) -> &'static str {
        if self.kvm { "KVM" } else { "TCG" }
    }
}

fn seconds_from_env(name: &str, default: u64) -> Result<Duration> {
    let seconds = match env::var(name) {
        Ok(value) => value
            .trim()
            .parse()
            .with_context(|| format!("{name}={value:?} is not a number of seconds"))?,
        Err(_) => default,
    };
    ensure!(seconds > 0, "{name} must be positive");
    Ok(Duration::from_secs(seconds))
}

/// The guest's own count, from its `VM-VERDICT: <N> passed, <M> failed` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) passed: u64,
    pub(crate) failed: u64,
}

/// Everything the host observed about one run.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) verdict: Option<Verdict>,
    /// Kernel faults seen on the console, and watchdog or QEMU failures.
    pub(crate) problems: Vec<String>,
    /// Kernel `WARNING: CPU:` reports: worth a look, but not a failure on their own.
    pub(crate) warnings: Vec<String>,
    pub(crate) elapsed: Duration,
}

impl Outcome {
    /// Why the run does not count as a pass, or `None` if it does.
    pub(crate) fn failure(&self) -> Option<String> {
        if let Some(first) = self.problems.first() {
            return Some(match self.problems.len() {
                1 => first.clone(),
                n => format!("{first} (and {} more)", n - 1),
            });
        }
        match self.verdict {
            None => Some("the guest printed no VM-VERDICT".to_owned()),
            Some(v) if v.failed > 0 => Some(format!("{} test(s) failed", v.failed)),
            Some(v) if v.passed == 0 => Some("no test ran".to_owned()),
            Some(_) => None,
        }
    }
}

enum Event {
    Output(Stream, Vec<u8>),
    Closed(Stream),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stream {
    Console,
    QemuStderr,
}

/// Boots the guest and watches it until it powers off, faults fatally or a watchdog fires.
/// Only a failure to start QEMU is an `Err`; everything else is recorded in the outcome.
pub(crate) fn run(label: &str, kernel: &Path, initrd: &Path, limits: &Limits) -> Result<Outcome> {
    let mut command = qemu_command(kernel, initrd, limits.kvm, "tcg");
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command
        .spawn()
        .context("failed to start qemu-system-x86_64")?;

    let (sender, events) = mpsc::channel();
    let stdout = child
        .stdout
        .take()
        .context("QEMU's stdout was not captured")?;
    let stderr = child
        .stderr
        .take()
        .context("QEMU's stderr was not captured")?;
    let readers = [
        forward(stdout, Stream::Console, sender.clone()),
        forward(stderr, Stream::QemuStderr, sender),
    ];

    let mut watcher = Watcher::new(label);
    let mut open_streams = 2;
    let mut last_output = Instant::now();
    while open_streams > 0 {
        let now = Instant::now();
        let total_left = limits.total.saturating_sub(now - started);
        let silence_left = limits.silence.saturating_sub(now - last_output);
        match events.recv_timeout(total_left.min(silence_left)) {
            Ok(Event::Output(stream, bytes)) => {
                last_output = Instant::now();
                watcher.feed(stream, &bytes);
            }
            Ok(Event::Closed(stream)) => {
                watcher.flush(stream);
                open_streams -= 1;
            }
            Err(RecvTimeoutError::Timeout) => {
                let reason = if Instant::now() - started >= limits.total {
                    format!(
                        "timed out after {} s (INTERCEPTOR_VM_TIMEOUT)",
                        limits.total.as_secs()
                    )
                } else {
                    format!(
                        "guest silent for {} s, presumed hung (INTERCEPTOR_VM_HANG_TIMEOUT)",
                        limits.silence.as_secs()
                    )
                };
                watcher.flush(Stream::Console);
                println!("[vm {label}] vm-test: {reason}; killing QEMU");
                watcher.problems.push(reason);
                kill(&mut child);
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }

    let status = child.wait().context("failed to wait for QEMU")?;
    let elapsed = started.elapsed();
    for reader in readers {
        // The pipes close once QEMU is gone, so the readers end; a panic there is a bug.
        let _ = reader.join();
    }
    if watcher.problems.is_empty() && !status.success() {
        watcher.problems.push(format!("QEMU exited with {status}"));
    }
    Ok(Outcome {
        verdict: watcher.verdict,
        problems: watcher.problems,
        warnings: watcher.warnings,
        elapsed,
    })
}

fn forward(
    mut pipe: impl Read + Send + 'static,
    stream: Stream,
    sender: mpsc::Sender<Event>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buffer = [0; 8192];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sender
                        .send(Event::Output(stream, buffer[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = sender.send(Event::Closed(stream));
    })
}

fn kill(child: &mut Child) {
    // Already exited is the only expected error, and then there is nothing left to stop.
    let _ = child.kill();
}

/// Splits the console into lines, echoes them with the kernel's label, and looks for the
/// verdict and for kernel faults.
struct Watcher<'a> {
    label: &'a str,
    console: Vec<u8>,
    stderr: Vec<u8>,
    verdict: Option<Verdict>,
    problems: Vec<String>,
    warnings: Vec<String>,
}

impl<'a> Watcher<'a> {
    fn new(label: &'a str) -> Self {
        Self {
            label,
            console: Vec::new(),
            stderr: Vec::new(),
            verdict: None,
            problems: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn feed(&mut self, stream: Stream, bytes: &[u8]) {
        let buffer = match stream {
            Stream::Console => &mut self.console,
            Stream::QemuStderr => &mut self.stderr,
        };
        buffer.extend_from_slice(bytes);
        let Some(end) = buffer.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = buffer.drain(..=end).collect();
        for line in complete[..end].split(|&b| b == b'\n') {
            self.line(stream, line);
        }
    }

    fn flush(&mut self, stream: Stream) {
        let rest = match stream {
            Stream::Console => std::mem::take(&mut self.console),
            Stream::QemuStderr => std::mem::take(&mut self.stderr),
        };
        if !rest.is_empty() {
            self.line(stream, &rest);
        }
    }

    fn line(&mut self, stream: Stream, raw: &[u8]) {
        let line = clean(raw);
        if stream == Stream::QemuStderr {
            if !line.is_empty() {
                println!("[vm {} qemu] {line}", self.label);
            }
            return;
        }
        println!("[vm {}] {line}", self.label);
        if let Some(verdict) = parse_verdict(&line) {
            self.verdict = Some(verdict);
        }
        // /init replays dmesg at the end: faults there were already seen live on the
        // console, but kernel warnings only show up in that replay.
        if let Some(replayed) = line.split_once(DMESG_REPLAY).map(|(_, rest)| rest) {
            if replayed.contains("WARNING: CPU:") {
                self.warnings.push(replayed.trim().to_owned());
            }
        } else if let Some(fault) = kernel_fault(&line) {
            self.problems.push(format!("kernel fault: {fault}"));
        }
    }
}

/// Drops carriage returns and the terminal escapes firmware and the kernel emit.
fn clean(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            b'\r' => {}
            0x1b => {
                // CSI sequences run to a final byte in 0x40..=0x7e; other escapes are 2 bytes.
                if bytes.next() == Some(b'[') {
                    for b in bytes.by_ref() {
                        if (0x40..=0x7e).contains(&b) {
                            break;
                        }
                    }
                }
            }
            _ => out.push(b),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_verdict(line: &str) -> Option<Verdict> {
    let rest = &line[line.find("VM-VERDICT: ")? + "VM-VERDICT: ".len()..];
    let (passed, rest) = rest.split_once(" passed, ")?;
    let failed = rest.strip_suffix(" failed")?;
    Some(Verdict {
        passed: passed.trim().parse().ok()?,
        failed: failed.trim().parse().ok()?,
    })
}

/// Prefix of the kernel log lines /init replays before powering off.
const DMESG_REPLAY: &str = "vm-init: dmesg: ";

/// Recognises the first line of a kernel oops, BUG or panic report.
fn kernel_fault(line: &str) -> Option<&str> {
    const MARKERS: &[&str] = &["Kernel panic", "BUG: ", "Oops: "];
    MARKERS
        .iter()
        .any(|marker| line.contains(marker))
        .then_some(line.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_is_parsed() {
        assert_eq!(
            parse_verdict("VM-VERDICT: 12 passed, 0 failed"),
            Some(Verdict {
                passed: 12,
                failed: 0
            })
        );
        assert_eq!(parse_verdict("echo VM-VERDICT: $passed passed"), None);
    }

    #[test]
    fn escapes_and_carriage_returns_are_dropped() {
        assert_eq!(clean(b"\x1b[2J\x1bcSeaBIOS\r"), "SeaBIOS");
    }

    #[test]
    fn kernel_faults_are_recognised() {
        assert!(kernel_fault("[   12.3] BUG: kernel NULL pointer dereference").is_some());
        assert!(
            kernel_fault("[    1.0] Kernel panic - not syncing: Attempted to kill init!").is_some()
        );
        assert!(kernel_fault("test ktls::tx ... ok").is_none());
    }
}
