//! What the numbers were measured on: recorded with every result file, because a ratio from a
//! 2-vCPU VM without VAES says little about a 64-core host with it.

use std::{collections::BTreeMap, fs, path::Path, process::Command};

use crate::report::Machine;

fn read(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// First line of a tool's version output (stdout or stderr), or "not installed".
fn version(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("unknown")
                .to_owned()
        }
        Err(_) => "not installed".to_owned(),
    }
}

pub fn collect(agent: Option<&Path>) -> Machine {
    let cpuinfo = read("/proc/cpuinfo");
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let mut tools = BTreeMap::new();
    tools.insert("iperf3".to_owned(), version("iperf3", &["--version"]));
    tools.insert("sockperf".to_owned(), version("sockperf", &["--version"]));
    tools.insert("haproxy".to_owned(), version("haproxy", &["-v"]));
    tools.insert("openssl".to_owned(), version("openssl", &["version"]));
    let mut agent_probe = None;
    if let Some(agent) = agent {
        tools.insert(
            "interceptor".to_owned(),
            version(&agent.to_string_lossy(), &["--version"]),
        );
        if let Ok(out) = Command::new(agent).args(["probe", "--json"]).output() {
            agent_probe = serde_json::from_slice(&out.stdout).ok();
        }
    }
    let git_commit = std::env::var("INTERCEPTOR_BENCH_GIT_COMMIT")
        .ok()
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        });
    Machine {
        hostname: read("/proc/sys/kernel/hostname"),
        kernel: read("/proc/sys/kernel/osrelease"),
        cpu_model: field("model name"),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_flags: field("flags"),
        tcp_available_ulp: read("/proc/sys/net/ipv4/tcp_available_ulp"),
        clocksource: read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        governor: read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        in_vm: std::env::var_os("INTERCEPTOR_IN_VM").is_some(),
        tools,
        agent_probe,
        git_commit,
    }
}
