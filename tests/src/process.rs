//! The real agent binary (`interceptor run`) as a child process, for the tests that must kill
//! it the way a node does (SIGKILL: no destructor, no flush) and measure it from outside
//! (resident memory and descriptors in `/proc/<pid>`). The in-process agent of
//! [`crate::agent`] shares the test's descriptors and address space, so neither is visible
//! there.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use interceptor::{config::Config, intercept::table::FlowRow};

use crate::demo::agent_binary;

/// A running `interceptor run --config FILE`; killed (SIGKILL) on drop if still alive.
pub struct AgentProcess {
    child: Child,
    pub bin: PathBuf,
    pub admin: PathBuf,
    /// A `--takeover` agent answers here until its hand-over completes, then moves the socket
    /// onto `admin` (the predecessor answers there meanwhile).
    staged: Option<PathBuf>,
    /// When the process was spawned.
    pub started: Instant,
    /// Where its stdout (the access log) goes, when a test reads it.
    pub access_log: Option<PathBuf>,
}

/// Reads a JSON access log until it holds `n` lines (or 10 s pass): the agent writes a line
/// when a connection closes, a little after the client saw its end.
pub fn access_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An access-log line and the flow table agree on the bytes each way.
pub fn assert_log_bytes_match(line: &serde_json::Value, row: &FlowRow) {
    assert_eq!(
        line["bytes_sent"].as_u64(),
        Some(row.bytes_to_peer),
        "{line}"
    );
    assert_eq!(
        line["bytes_received"].as_u64(),
        Some(row.bytes_from_peer),
        "{line}"
    );
}

/// `config` with `tuning.runtime` as `INTERCEPTOR_TEST_RUNTIME` (`shared` or `perThread`)
/// says, when set: the suites that run the agent binary run under either runtime shape.
fn with_test_runtime(config: &Config) -> std::borrow::Cow<'_, Config> {
    let Ok(shape) = std::env::var("INTERCEPTOR_TEST_RUNTIME") else {
        return std::borrow::Cow::Borrowed(config);
    };
    let mut config = config.clone();
    config.tuning.runtime = serde_json::from_value(serde_json::Value::String(shape.clone()))
        .unwrap_or_else(|e| panic!("INTERCEPTOR_TEST_RUNTIME={shape}: {e}"));
    std::borrow::Cow::Owned(config)
}

impl AgentProcess {
    /// Writes `config` to `file` and starts the agent on it; returns once its admin socket
    /// answers (at most 30 s: the VM emulates its CPU).
    pub fn start(config: &Config, file: &Path) -> AgentProcess {
        Self::start_with(config, file, &[], &[])
    }

    /// [`AgentProcess::start`] on `dir/node.yaml` with the access log in JSON, written to
    /// `dir/access.log` (its path is returned), for tests that read what the agent logged.
    pub fn start_logging_json(config: &mut Config, dir: &Path) -> (AgentProcess, PathBuf) {
        config.observability.access_log.format = interceptor::config::AccessLogFormat::Json;
        let log_path = dir.join("access.log");
        let log = std::fs::File::create(&log_path).expect("access log file");
        let mut agent = Self::spawn(config, &dir.join("node.yaml"), &[], &[], Stdio::from(log));
        agent.access_log = Some(log_path.clone());
        (agent, log_path)
    }

    /// [`AgentProcess::start_with`] with the access log (stdout) written to `log`, which
    /// outlives the process: what an agent logged as it handed over and exited.
    pub fn start_logged(
        config: &Config,
        file: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> AgentProcess {
        let out = std::fs::File::create(log).expect("access log file");
        let mut agent = Self::spawn(config, file, args, env, Stdio::from(out));
        agent.access_log = Some(log.to_owned());
        agent
    }

    /// The JSON access-log lines written so far (see [`AgentProcess::start_logged`]).
    pub fn access_lines(&self) -> Vec<serde_json::Value> {
        let path = self
            .access_log
            .as_deref()
            .expect("an agent started with a log");
        // Only whole lines: a running agent may be writing the last one.
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }

    /// [`AgentProcess::start`] with extra `run` arguments (such as `--takeover`) and
    /// environment. The admin socket of an agent already running on `config` is removed
    /// first, so readiness is this agent's own.
    pub fn start_with(
        config: &Config,
        file: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProcess {
        Self::spawn(config, file, args, env, Stdio::inherit())
    }

    fn spawn(
        config: &Config,
        file: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        stdout: Stdio,
    ) -> AgentProcess {
        let yaml = yaml_serde::to_string(&with_test_runtime(config)).expect("config to yaml");
        std::fs::write(file, yaml).expect("write node config");
        // A successor must leave the running agent's socket alone: it stays the one that
        // answers on the path until the hand-over completes.
        let staged = args
            .contains(&"--takeover")
            .then(|| interceptor::admin::staged_path(&config.admin_socket));
        match &staged {
            Some(staged) => {
                let _ = std::fs::remove_file(staged);
            }
            None => {
                let _ = std::fs::remove_file(&config.admin_socket);
            }
        }
        let predecessor_socket = inode(&config.admin_socket);
        let bin = agent_binary();
        let started = Instant::now();
        let child = Command::new(&bin)
            .args(["run", "--config"])
            .arg(file)
            .stdout(stdout)
            .args(args)
            .env(
                "INTERCEPTOR_LOG",
                std::env::var("INTERCEPTOR_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .envs(env.iter().copied())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut agent = AgentProcess {
            child,
            bin,
            admin: config.admin_socket.clone(),
            staged,
            started,
            access_log: None,
        };
        // Under TCG an agent loading its programs beside another one (a takeover) can take
        // longer than on a host: 76 s for a takeover with 10 kTLS flows open on a host at
        // load 9 (upgrade_ktls). Below the 180 s the old agent waits for `taken`.
        let limit = if crate::in_vm() { 150 } else { 30 };
        agent.wait_ready(Duration::from_secs(limit), predecessor_socket);
        agent
    }

    /// Ready once this process answers: on its staged path, or on the real one after it
    /// replaced the predecessor's socket file there (a different inode).
    fn wait_ready(&mut self, limit: Duration, predecessor_socket: Option<u64>) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the agent exited during start: {status}");
            }
            let ours = match &self.staged {
                Some(staged) if staged.exists() => admin_stats(&self.bin, staged).is_some(),
                Some(_) => {
                    inode(&self.admin).is_some_and(|i| Some(i) != predecessor_socket)
                        && self.try_stats().is_some()
                }
                None => self.admin.exists() && self.try_stats().is_some(),
            };
            if ours {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL, then reaps it: its sockets close in the kernel, its bpffs pins stay.
    pub fn kill9(mut self) {
        self.sigkill();
    }

    fn sigkill(&mut self) {
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    /// SIGTERM: the agent drains (see the `handover` config) and exits.
    pub fn sigterm(&self) {
        // SAFETY: signalling our own, not yet reaped, child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` for the process to exit on its own; its exit status, or `None`
    /// if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `interceptor flows --all --json`: open and recently closed flows.
    pub fn flows(&self) -> Vec<FlowRow> {
        if let Some(staged) = self.staged.as_deref().filter(|s| s.exists()) {
            // The staged socket is renamed away once the hand-over completes; a query that
            // lost that race asks the real path, where this agent now answers.
            if let Some(rows) = try_admin_flows(&self.bin, staged) {
                return rows;
            }
        }
        admin_flows(&self.bin, &self.admin)
    }

    /// `interceptor flows --stats`: the counters.
    pub fn stats(&self) -> BTreeMap<String, u64> {
        self.try_stats().expect("interceptor flows --stats")
    }

    fn try_stats(&self) -> Option<BTreeMap<String, u64>> {
        self.staged
            .as_deref()
            .filter(|s| s.exists())
            .and_then(|s| admin_stats(&self.bin, s))
            .or_else(|| admin_stats(&self.bin, &self.admin))
    }

    /// Open descriptors of the agent process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident set size of the agent process, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.sigkill();
        }
    }
}

/// `bin flows --all --json` against the agent behind `admin`: open and recently closed flows.
pub fn admin_flows(bin: &Path, admin: &Path) -> Vec<FlowRow> {
    let out = flows_json(bin, admin).expect("interceptor flows");
    assert!(
        out.status.success(),
        "interceptor flows: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("flows json")
}

/// [`admin_flows`], `None` while nothing answers at `admin`.
fn try_admin_flows(bin: &Path, admin: &Path) -> Option<Vec<FlowRow>> {
    let out = flows_json(bin, admin).ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn flows_json(bin: &Path, admin: &Path) -> std::io::Result<std::process::Output> {
    Command::new(bin)
        .args(["flows", "--all", "--json", "--admin-socket"])
        .arg(admin)
        .output()
}

/// The inode of the socket file at `path`, if there is one.
fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// `bin flows --stats` against the agent behind `admin`; `None` while it does not answer.
pub fn admin_stats(bin: &Path, admin: &Path) -> Option<BTreeMap<String, u64>> {
    let out = Command::new(bin)
        .args(["flows", "--stats", "--admin-socket"])
        .arg(admin)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}
