//! `tuning.runtime: perThread` and `perCpu` with the real agent binary: accepted connections
//! are spread over every flow thread (perCpu: one pinned to each of the agent's CPUs), each
//! flow's bytes arrive intact both ways, and the agent's admin socket and SIGTERM drain work
//! with the control plane on the main thread. `tuning.schedSliceUs`: the runtime's threads
//! run with the slice asked for (read from the kernel), and flows stay intact.
//!
//! (The suites that run the agent binary run under either shape with
//! `INTERCEPTOR_TEST_RUNTIME=perThread`.)

use std::{collections::BTreeMap, time::Duration};

use interceptor::config::RuntimeShape;
use interceptor_tests::{
    in_vm,
    upgrade::{Bench, ask_admin, assert_exits, assert_intact},
};

fn load() -> &'static str {
    if in_vm() {
        "/bin/upgrade_load"
    } else {
        env!("CARGO_BIN_EXE_upgrade_load")
    }
}

/// Context switches so far of each of the process's threads named `flows-N`: a flow thread
/// that served nothing sleeps in `epoll_wait` and counts none.
fn flow_thread_switches(pid: i32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = task.expect("task").path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        if !comm.starts_with("flows-") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).expect("status");
        let switches = status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .map(|v| v.trim().parse::<u64>().expect("a count"))
            .sum();
        out.insert(comm.to_owned(), switches);
    }
    out
}

#[test]
fn per_thread_runtime_spreads_flows_over_every_flow_thread_with_their_bytes_intact() {
    const THREADS: u16 = 2;
    const FLOWS: usize = 16;
    let window = Duration::from_secs(3);
    let mut b = Bench::new(86, "rtp", window, load());
    b.cfg.tuning.runtime = RuntimeShape::PerThread;
    b.cfg.tuning.worker_threads = THREADS;
    let mut agent = b.start(&[], &[]);
    b.wait_serving();
    let before = flow_thread_switches(agent.pid());
    let names: Vec<String> = (0..THREADS)
        .map(|i| interceptor::runtimes::flow_thread_name(usize::from(i)))
        .collect();
    assert_eq!(
        before.keys().cloned().collect::<Vec<_>>(),
        names,
        "the agent's flow threads"
    );
    let flows = b.flows(FLOWS, 2.0);
    // The admin socket answers while flows run (the control plane's own runtime).
    let listed = ask_admin(&agent.admin, &serde_json::json!({"cmd": "flows"}));
    assert!(
        listed["flows"].as_array().is_some_and(|f| f.len() >= FLOWS),
        "{listed}"
    );
    assert_intact(&flows.finish(Duration::from_secs(30)), FLOWS, &b.received);
    let after = flow_thread_switches(agent.pid());
    for name in &names {
        let served = after[name] - before[name];
        // Each of 16 flows moving 2 s of echoed bytes wakes its thread far more than this.
        assert!(
            served >= 50,
            "{name} switched {served} times while {FLOWS} flows ran: {before:?} → {after:?}"
        );
    }
    // SIGTERM without a successor: new connections are still served in the drain window,
    // then the agent exits.
    agent.sigterm();
    b.assert_serving("after SIGTERM, inside the drain window");
    assert_exits(&mut agent, window + Duration::from_secs(5), "the agent");
}

/// `Cpus_allowed_list` of one of the agent's threads, as CPU numbers.
fn allowed_cpus(status: &str) -> Vec<usize> {
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

#[test]
fn per_cpu_runtime_pins_a_flow_thread_to_each_cpu_and_keeps_flows_intact() {
    const FLOWS: usize = 16;
    let window = Duration::from_secs(3);
    let mut b = Bench::new(87, "rtc", window, load());
    b.cfg.tuning.runtime = RuntimeShape::PerCpu;
    let mut agent = b.start(&[], &[]);
    b.wait_serving();
    let pid = agent.pid();
    let main_status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let cpus = allowed_cpus(&main_status);
    // One flow thread per CPU the agent may run on, each pinned to its own.
    let mut pinned = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = task.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if let Some(i) = comm.trim().strip_prefix("flows-") {
            let status = std::fs::read_to_string(dir.join("status")).expect("status");
            pinned.insert(i.parse::<usize>().expect("index"), allowed_cpus(&status));
        }
    }
    let expected: BTreeMap<usize, Vec<usize>> = cpus
        .iter()
        .enumerate()
        .map(|(i, &c)| (i, vec![c]))
        .collect();
    assert_eq!(
        pinned, expected,
        "flow threads and their CPUs (agent's: {cpus:?})"
    );
    let flows = b.flows(FLOWS, 2.0);
    assert_intact(&flows.finish(Duration::from_secs(30)), FLOWS, &b.received);
    let switched = flow_thread_switches(pid);
    assert!(
        switched.values().sum::<u64>() >= 50,
        "the flow threads served nothing: {switched:?}"
    );
    agent.sigterm();
    b.assert_serving("after SIGTERM, inside the drain window");
    assert_exits(&mut agent, window + Duration::from_secs(5), "the agent");
}

/// The fair-scheduler slice (`se.slice`, ns) of thread `tid` of `pid`, where the kernel
/// shows it (`/proc/.../sched`), and whether this kernel takes a custom one (Linux ≥ 6.12).
fn slice_ns(pid: i32, tid: &str) -> Option<u64> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut v = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    if (v.next()?, v.next()?) < (6, 12) {
        return None;
    }
    let sched = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/sched")).ok()?;
    sched
        .lines()
        .find_map(|l| l.strip_prefix("se.slice"))?
        .trim_start_matches([' ', ':'])
        .trim()
        .parse()
        .ok()
}

#[test]
fn sched_slice_reaches_every_worker_and_flows_stay_intact() {
    const FLOWS: usize = 8;
    const SLICE_US: u32 = 5_000;
    let window = Duration::from_secs(3);
    let mut b = Bench::new(88, "rsl", window, load());
    b.cfg.tuning.sched_slice_us = SLICE_US;
    let mut agent = b.start(&[], &[]);
    b.wait_serving();
    let pid = agent.pid();
    // The runtime's threads (tokio's workers, which run the flows under `shared`, and its
    // blocking pool) carry the slice; the agent's other threads keep the kernel's.
    let mut workers = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let dir = task.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("tokio") {
            continue;
        }
        let tid = dir
            .file_name()
            .expect("a tid")
            .to_string_lossy()
            .into_owned();
        if let Some(ns) = slice_ns(pid, &tid) {
            workers.insert(format!("{tid} {}", comm.trim()), ns);
        }
    }
    if slice_ns(pid, &pid.to_string()).is_some() {
        assert!(!workers.is_empty(), "no worker thread seen");
        assert!(
            workers
                .values()
                .all(|&ns| ns == u64::from(SLICE_US) * 1_000),
            "the workers' slices: {workers:?}"
        );
    }
    let flows = b.flows(FLOWS, 2.0);
    assert_intact(&flows.finish(Duration::from_secs(30)), FLOWS, &b.received);
    agent.sigterm();
    assert_exits(&mut agent, window + Duration::from_secs(5), "the agent");
}
