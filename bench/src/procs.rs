//! Processes the benchmark starts, and the CPU and memory counters it reads.
//!
//! Every child is owned by a [`Proc`] that kills it on drop, so an early return or a ctrl-c
//! never leaves an iperf3 or a sidecar running. Every foreground run has a deadline
//! ([`run_bounded`]): a workload that hangs (a blackholed connection, a stuck handshake) is
//! killed and reported, never waited on forever.

use std::{
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Set by SIGINT/SIGTERM; every wait loop checks it, so ctrl-c ends the run at the next
/// poll and the drop guards clean up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT/SIGTERM handler that sets [`INTERRUPTED`] (an atomic store is
/// async-signal-safe).
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only performs an atomic store.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// Fails once the run has been interrupted.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps in small steps so an interrupt is noticed promptly.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        check_interrupted()?;
        thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// A background process, killed (SIGTERM, then SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    /// Where its stdout and stderr go, when [`Proc::spawn_logged`] started it: an early exit
    /// quotes the log's last line (sockperf reports a failed bind there and exits with 0).
    log: Option<PathBuf>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", display(cmd)))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: None,
        })
    }

    /// Like [`Proc::spawn`], with stdout and stderr written to `log` (truncated first).
    pub fn spawn_logged(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        let out = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdout(out.try_clone()?).stderr(out);
        let mut p = Self::spawn(name, cmd)?;
        p.log = Some(log.to_owned());
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has already exited (a server that could not bind, a proxy that
    /// rejected its configuration).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let last = self
                .log
                .as_ref()
                .and_then(|l| fs::read_to_string(l).ok())
                .and_then(|t| {
                    t.lines()
                        .rev()
                        .map(str::trim)
                        .find(|l| !l.is_empty())
                        .map(str::to_owned)
                });
            match last {
                Some(last) => bail!("{} exited early with {status}: {last}", self.name),
                None => bail!("{} exited early with {status}", self.name),
            }
        }
        Ok(())
    }

    /// Stops the process gracefully: SIGTERM, up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    /// Takes the child's stdout pipe, if it was captured.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_millis(500));
    }
}

/// What a bounded foreground run produced.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion with captured output, killing it after `timeout` (or on
/// interrupt). A non-zero exit is an error that carries the tool's own words.
pub fn run_bounded(name: &str, cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {name} ({})", display(cmd)))?;
    let mut out_pipe = child.stdout.take().context("stdout not captured")?;
    let mut err_pipe = child.stderr.take().context("stderr not captured")?;
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline || INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = out_reader.join();
            let stderr = err_reader.join().unwrap_or_default();
            check_interrupted()?;
            bail!(
                "{name} did not finish within {} s and was killed: {}",
                timeout.as_secs(),
                stderr.trim()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "{name} failed ({status}): {}{}",
            stderr.trim(),
            if stderr.trim().is_empty() {
                stdout.trim()
            } else {
                ""
            }
        );
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Clock ticks per second for `/proc` CPU fields.
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// System-wide CPU time from `/proc/stat`: busy (user+nice+system+irq+softirq, i.e. not
/// idle, iowait or steal) and total, in seconds summed over all CPUs.
///
/// This is the primary CPU figure: veth receive work runs in softirq on whichever CPU sent the
/// packet, outside any process's accounting, so per-process numbers alone under-count.
#[derive(Debug, Clone, Copy)]
pub struct SystemCpu {
    pub busy: f64,
    pub total: f64,
}

impl SystemCpu {
    pub fn read() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no cpu line in /proc/stat")?;
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 8 {
            bail!("short cpu line in /proc/stat: {line}");
        }
        let t = ticks_per_sec();
        // user nice system idle iowait irq softirq steal
        let busy = v[0] + v[1] + v[2] + v[5] + v[6];
        let total = busy + v[3] + v[4] + v[7];
        Ok(Self {
            busy: busy / t,
            total: total / t,
        })
    }

    pub fn since(&self, earlier: &SystemCpu) -> SystemCpu {
        SystemCpu {
            busy: self.busy - earlier.busy,
            total: self.total - earlier.total,
        }
    }
}

/// utime + stime of a whole process (all threads), in seconds.
pub fn process_cpu(pid: u32) -> Result<f64> {
    let stat =
        fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("pid {pid}"))?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(0) ppid(1) ... utime is field 14 overall → index 11 here, stime 12.
    let utime: f64 = f.get(11).and_then(|x| x.parse().ok()).context("utime")?;
    let stime: f64 = f.get(12).and_then(|x| x.parse().ok()).context("stime")?;
    Ok((utime + stime) / ticks_per_sec())
}

/// Resident set size of a process in bytes (`VmRSS`).
pub fn process_rss(pid: u32) -> Result<u64> {
    status_kb(pid, "VmRSS:").map(|kb| kb * 1024)
}

/// Resident anonymous memory of a process in bytes (`RssAnon`: heap, stacks, the runtime's
/// own pages). `VmRSS` also counts the pages of the binary and its libraries mapped in, which
/// vary with the build's code layout and what the page cache holds (an agent's text alone is
/// ~9-10 MB of its ~16 MB at start); this part is what the agent allocates.
pub fn process_rss_anon(pid: u32) -> Result<u64> {
    status_kb(pid, "RssAnon:").map(|kb| kb * 1024)
}

fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Sum of [`process_cpu`] over several processes (the two sidecars, or two agents).
pub fn processes_cpu(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|p| process_cpu(*p)).sum()
}

/// Context switches (voluntary and involuntary) of every thread of these processes so far:
/// how often a proxy was put to sleep or off its CPU, a cost a busy host turns into waiting.
pub fn processes_context_switches(pids: &[u32]) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let tasks = format!("/proc/{pid}/task");
        for task in std::fs::read_dir(&tasks).with_context(|| format!("read {tasks}"))? {
            let status = task?.path().join("status");
            // A thread that ended since the listing has nothing more to add.
            let Ok(text) = std::fs::read_to_string(&status) else {
                continue;
            };
            for line in text.lines() {
                if let Some(v) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    total += v
                        .trim()
                        .parse::<u64>()
                        .with_context(|| format!("{}: context switches {v:?}", status.display()))?;
                }
            }
        }
    }
    Ok(total)
}

/// NET_RX softirqs run on every CPU so far (`/proc/softirqs`): each loopback or veth
/// segment is received in one. System-wide, so other network work on the host adds to it.
pub fn net_rx_softirqs() -> Result<u64> {
    parse_net_rx(&std::fs::read_to_string("/proc/softirqs").context("read /proc/softirqs")?)
}

fn parse_net_rx(text: &str) -> Result<u64> {
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("NET_RX:"))
        .context("/proc/softirqs has no NET_RX line")?;
    line.split_whitespace()
        .map(|v| {
            v.parse::<u64>()
                .with_context(|| format!("/proc/softirqs: NET_RX count {v:?}"))
        })
        .sum()
}

/// Descriptors the harness asks for (children inherit them): 10 000 idle flows through an
/// agent are 20 000 descriptors there (two sockets per flow end), plus its own.
const NOFILE_WANTED: libc::rlim_t = 1 << 17;

/// Raises the open-file limit (children inherit it): to [`NOFILE_WANTED`] where allowed (root),
/// else the soft limit to the hard one. 1 000 idle flows need several thousand descriptors in
/// the agent, the holder and the echo server.
pub fn raise_nofile_limit() -> Result<u64> {
    let mut lim = nofile_rlimit()?;
    // The `scale` workload holds 10 000 idle flows: two descriptors each in an agent.
    // As root the hard limit may rise too (up to fs.nr_open); if it may not, keep it.
    let wanted = libc::rlimit {
        rlim_cur: NOFILE_WANTED.max(lim.rlim_max),
        rlim_max: NOFILE_WANTED.max(lim.rlim_max),
    };
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const wanted) } == 0 {
        return Ok(wanted.rlim_cur);
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads the struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(lim.rlim_cur)
}

/// The open-file limit this process (and every child it starts) runs under.
pub fn nofile_limit() -> Result<u64> {
    Ok(nofile_rlimit()?.rlim_cur)
}

fn nofile_rlimit() -> Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok(lim)
}

/// This thread's CPU time in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`): fine-grained where
/// `/proc` ticks (10 ms) are too coarse, e.g. for one policy load.
pub fn thread_cpu_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) } != 0 {
        return Err(std::io::Error::last_os_error()).context("clock_gettime(thread CPU)");
    }
    Ok(u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_rx_softirqs_sum_every_cpu() {
        let text = "                    CPU0       CPU1\n          HI:          1          0\n      NET_TX:          5          7\n      NET_RX:     123456      65432\n       BLOCK:          0          0\n";
        assert_eq!(parse_net_rx(text).unwrap(), 123_456 + 65_432);
        assert!(parse_net_rx("      NET_TX: 1 2\n").is_err());
        assert!(parse_net_rx("      NET_RX: 1 x\n").is_err());
    }
}
